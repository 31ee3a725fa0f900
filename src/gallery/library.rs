//! The library: a folder of PNGs (the source of truth) and a SQLite index of their metadata
//! (WAL mode, full-text search over prompts), rebuilt from the PNGs whenever it is missing,
//! corrupt or out of date.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use image::RgbImage;
use rusqlite::{Connection, OptionalExtension, params};

use super::metadata::{PngError, read_png_text_fast, write_png};
use super::record::{ImageMetadata, MetadataSource};

/// Errors of the library.
#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The index failed (and could not be rebuilt).
    #[error("the gallery index failed: {0}")]
    Database(#[from] rusqlite::Error),
    /// A PNG could not be read or written.
    #[error(transparent)]
    Png(#[from] PngError),
    /// An imported PNG carries no generation metadata that Atelier can read.
    #[error(
        "{0}: no generation parameters found (none of AUTOMATIC1111's, ComfyUI's, InvokeAI's or Atelier's)"
    )]
    NoMetadata(String),
    /// Only PNG files can be imported.
    #[error("{0}: not a PNG file")]
    NotPng(String),
    /// The image is no longer in the library.
    #[error("image {0} is not in the library")]
    NotFound(i64),
}

type Result<T> = std::result::Result<T, GalleryError>;

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GalleryError + '_ {
    move |source| GalleryError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// One image in the library.
#[derive(Debug, Clone, PartialEq)]
pub struct GalleryEntry {
    /// Its row id (stable until the index is rebuilt).
    pub id: i64,
    /// Its file name in the library folder.
    pub file: String,
    /// Its parameters.
    pub metadata: ImageMetadata,
    /// Marked as a favourite.
    pub favourite: bool,
}

/// What to show: every condition must hold; newest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GalleryQuery {
    /// Words that must appear in the prompt or negative prompt (prefix match), empty for all.
    pub text: String,
    /// Only this model.
    pub model: Option<String>,
    /// Only this sampler id.
    pub scheduler: Option<String>,
    /// Only images made at or after this time (seconds since 1970).
    pub since_unix: Option<i64>,
    /// Only favourites.
    pub favourites_only: bool,
    /// Only the cells of this comparison.
    pub comparison: Option<String>,
    /// At most this many (0: no limit).
    pub limit: usize,
}

/// What a sync or rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Images added to the index (new or changed files).
    pub added: usize,
    /// Index rows dropped because their file is gone.
    pub removed: usize,
    /// Whether the index was corrupt and has been rebuilt (the old one is kept aside).
    pub rebuilt_corrupt_index: bool,
}

/// An image moved to the trash, which [`Library::undo_delete`] puts back.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletedImage {
    /// The entry as it was.
    pub entry: GalleryEntry,
    /// Where the file waits.
    pub trash_path: PathBuf,
}

/// The library folder and its index.
pub struct Library {
    root: PathBuf,
    db: Connection,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS images(
    id INTEGER PRIMARY KEY,
    file TEXT NOT NULL UNIQUE,
    created_unix INTEGER NOT NULL,
    prompt TEXT NOT NULL,
    negative_prompt TEXT NOT NULL,
    model TEXT NOT NULL,
    scheduler TEXT NOT NULL,
    source TEXT NOT NULL,
    comparison TEXT,
    favourite INTEGER NOT NULL DEFAULT 0,
    metadata_json TEXT NOT NULL,
    file_size INTEGER NOT NULL,
    file_mtime INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS images_created ON images(created_unix DESC, id DESC);
CREATE INDEX IF NOT EXISTS images_comparison ON images(comparison);
CREATE VIRTUAL TABLE IF NOT EXISTS images_fts USING fts5(
    prompt, negative_prompt, content='images', content_rowid='id'
);
CREATE TRIGGER IF NOT EXISTS images_ai AFTER INSERT ON images BEGIN
    INSERT INTO images_fts(rowid, prompt, negative_prompt)
    VALUES (new.id, new.prompt, new.negative_prompt);
END;
CREATE TRIGGER IF NOT EXISTS images_ad AFTER DELETE ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.id, old.prompt, old.negative_prompt);
END;
CREATE TRIGGER IF NOT EXISTS images_au AFTER UPDATE OF prompt, negative_prompt ON images BEGIN
    INSERT INTO images_fts(images_fts, rowid, prompt, negative_prompt)
    VALUES ('delete', old.id, old.prompt, old.negative_prompt);
    INSERT INTO images_fts(rowid, prompt, negative_prompt)
    VALUES (new.id, new.prompt, new.negative_prompt);
END;
";

/// The index's schema version (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 1;

fn file_stamp(path: &Path) -> Result<(i64, i64)> {
    let meta = std::fs::metadata(path).map_err(io_error(path))?;
    let mtime = meta
        .modified()
        .ok()
        .and_then(|m| m.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs() as i64);
    Ok((meta.len() as i64, mtime))
}

/// Seconds since 1970, now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// An FTS5 query from what an artist typed: every word must match as a prefix.
fn fts_query(text: &str) -> Option<String> {
    let words: Vec<String> = text
        .split(|c: char| !c.is_alphanumeric() && c != '\'' && c != '-' && c != '_')
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect();
    (!words.is_empty()).then(|| words.join(" "))
}

impl Library {
    /// The default library folder: the platform's data directory (`~/.local/share/atelier/
    /// library` on Linux), or `ATELIER_LIBRARY` when set.
    pub fn default_root() -> Option<PathBuf> {
        if let Some(dir) = std::env::var_os("ATELIER_LIBRARY") {
            return Some(PathBuf::from(dir));
        }
        directories::ProjectDirs::from("", "", "atelier").map(|d| d.data_dir().join("library"))
    }

    /// Opens (creating it if needed) the library at `root` and brings the index up to date with
    /// the folder. A corrupt index is set aside and rebuilt from the PNGs.
    pub fn open(root: &Path) -> Result<(Self, SyncReport)> {
        std::fs::create_dir_all(root.join(".atelier").join("thumbs")).map_err(io_error(root))?;
        let db_path = root.join(".atelier").join("index.sqlite3");
        let (db, rebuilt) = match Self::open_index(&db_path) {
            Ok(db) => (db, false),
            Err(_) => {
                // Keep the broken file for inspection; the folder has everything we need.
                let aside = db_path.with_extension(format!("corrupt-{}", now_unix()));
                let _ = std::fs::rename(&db_path, &aside);
                for suffix in ["-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
                }
                (Self::open_index(&db_path)?, true)
            }
        };
        let mut library = Self {
            root: root.to_path_buf(),
            db,
        };
        let mut report = library.sync()?;
        report.rebuilt_corrupt_index = rebuilt;
        Ok((library, report))
    }

    fn open_index(path: &Path) -> Result<Connection> {
        let db = Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        if check != "ok" {
            return Err(GalleryError::Database(rusqlite::Error::InvalidQuery));
        }
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = db.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version != 0 && version != SCHEMA_VERSION {
            // An index from another version: it is only a cache, start again.
            db.execute_batch("DROP TABLE IF EXISTS images_fts; DROP TABLE IF EXISTS images;")?;
        }
        db.execute_batch(SCHEMA)?;
        db.pragma_update(None, "user_version", SCHEMA_VERSION)?;
        Ok(db)
    }

    /// The library folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The full path of an entry's PNG.
    pub fn image_path(&self, entry: &GalleryEntry) -> PathBuf {
        self.root.join(&entry.file)
    }

    fn favourites_path(&self) -> PathBuf {
        self.root.join(".atelier").join("favourites.json")
    }

    fn trash_dir(&self) -> PathBuf {
        self.root.join(".atelier").join("trash")
    }

    /// Favourites live in the index and, so that a rebuild keeps them, in a small file beside
    /// it (written atomically).
    fn saved_favourites(&self) -> BTreeSet<String> {
        std::fs::read_to_string(self.favourites_path())
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    fn write_favourites(&self) -> Result<()> {
        let mut statement = self
            .db
            .prepare("SELECT file FROM images WHERE favourite = 1 ORDER BY file")?;
        let files: Vec<String> = statement
            .query_map([], |row| row.get(0))?
            .collect::<std::result::Result<_, _>>()?;
        let path = self.favourites_path();
        let temp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(&files).unwrap_or_else(|_| "[]".into());
        std::fs::write(&temp, text).map_err(io_error(&temp))?;
        std::fs::rename(&temp, &path).map_err(io_error(&path))
    }

    /// Brings the index up to date with the folder: PNGs that are new or changed are read, rows
    /// whose file is gone are dropped.
    pub fn sync(&mut self) -> Result<SyncReport> {
        let mut known: HashMap<String, (i64, i64)> = HashMap::new();
        {
            let mut statement = self
                .db
                .prepare("SELECT file, file_size, file_mtime FROM images")?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, (row.get(1)?, row.get(2)?)))
            })?;
            for row in rows {
                let (file, stamp) = row?;
                known.insert(file, stamp);
            }
        }
        let favourites = self.saved_favourites();
        let mut report = SyncReport::default();
        let listing = std::fs::read_dir(&self.root).map_err(io_error(&self.root))?;
        let transaction = self.db.transaction()?;
        for item in listing {
            let item = item.map_err(io_error(&self.root))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let is_png = Path::new(&name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"));
            if name.starts_with('.') || !is_png {
                continue;
            }
            let path = item.path();
            let Ok(stamp) = file_stamp(&path) else {
                continue;
            };
            if known.remove(&name) == Some(stamp) {
                continue;
            }
            // A corrupt PNG in the folder is skipped (and retried at the next sync).
            let Ok(chunks) = read_png_text_fast(&path) else {
                continue;
            };
            let mut metadata = ImageMetadata::from_chunks(&chunks).unwrap_or(ImageMetadata {
                source: MetadataSource::None,
                ..Default::default()
            });
            if metadata.created_unix == 0 {
                metadata.created_unix = stamp.1;
            }
            Self::upsert(
                &transaction,
                &name,
                &metadata,
                stamp,
                favourites.contains(&name),
            )?;
            report.added += 1;
        }
        for gone in known.keys() {
            transaction.execute("DELETE FROM images WHERE file = ?1", params![gone])?;
            report.removed += 1;
        }
        transaction.commit()?;
        Ok(report)
    }

    fn upsert(
        db: &Connection,
        file: &str,
        metadata: &ImageMetadata,
        stamp: (i64, i64),
        favourite: bool,
    ) -> Result<i64> {
        db.execute("DELETE FROM images WHERE file = ?1", params![file])?;
        db.execute(
            "INSERT INTO images(file, created_unix, prompt, negative_prompt, model, scheduler,
                source, comparison, favourite, metadata_json, file_size, file_mtime)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                file,
                metadata.created_unix,
                metadata.prompt,
                metadata.negative_prompt,
                metadata.model,
                metadata.scheduler,
                metadata.source.id(),
                metadata.comparison.as_ref().map(|c| c.id.clone()),
                favourite,
                serde_json::to_string(metadata).unwrap_or_default(),
                stamp.0,
                stamp.1,
            ],
        )?;
        Ok(db.last_insert_rowid())
    }

    /// Throws the index away and reads every PNG again (favourites survive).
    pub fn rebuild(&mut self) -> Result<SyncReport> {
        self.db.execute("DELETE FROM images", [])?;
        self.db
            .execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')", [])?;
        self.sync()
    }

    /// A file name for a new image made at `created_unix` with `seed`, not yet taken.
    fn new_file_name(&self, metadata: &ImageMetadata) -> String {
        let stamp = jiff::Timestamp::from_second(metadata.created_unix)
            .map(|t| t.strftime("%Y%m%d-%H%M%S").to_string())
            .unwrap_or_else(|_| metadata.created_unix.to_string());
        let seed = metadata.seed.map_or(String::new(), |s| format!("-{s}"));
        let mut name = format!("{stamp}{seed}.png");
        let mut n = 2;
        while self.root.join(&name).exists() {
            name = format!("{stamp}{seed}-{n}.png");
            n += 1;
        }
        name
    }

    /// Saves a new image (atomically: a crash leaves no half file) and indexes it.
    pub fn save(&mut self, image: &RgbImage, metadata: &ImageMetadata) -> Result<GalleryEntry> {
        let mut metadata = metadata.clone();
        if metadata.created_unix == 0 {
            metadata.created_unix = now_unix();
        }
        metadata.width = image.width();
        metadata.height = image.height();
        let file = self.new_file_name(&metadata);
        let path = self.root.join(&file);
        let chunks = metadata.text_chunks();
        let borrowed: Vec<(&str, &str)> = chunks.iter().map(|(k, v)| (*k, v.as_str())).collect();
        write_png(&path, image, &borrowed)?;
        let id = Self::upsert(&self.db, &file, &metadata, file_stamp(&path)?, false)?;
        Ok(GalleryEntry {
            id,
            file,
            metadata,
            favourite: false,
        })
    }

    /// Copies a PNG from another tool into the library. A file that is not a readable PNG, or
    /// has no generation metadata, changes nothing and says why.
    pub fn import(&mut self, source: &Path) -> Result<GalleryEntry> {
        let display = source.display().to_string();
        let is_png = source
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"));
        if !is_png {
            return Err(GalleryError::NotPng(display));
        }
        let chunks = read_png_text_fast(source)?;
        // Make sure the pixels decode too, before anything is copied.
        image::open(source).map_err(|e| PngError::Format {
            path: display.clone(),
            message: e.to_string(),
        })?;
        let mut metadata =
            ImageMetadata::from_chunks(&chunks).ok_or(GalleryError::NoMetadata(display))?;
        if metadata.created_unix == 0 {
            metadata.created_unix = file_stamp(source)?.1;
        }
        let already_here = source
            .parent()
            .is_some_and(|p| p.canonicalize().ok() == self.root.canonicalize().ok());
        let file = if already_here {
            source
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        } else {
            let stem = source
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "imported".into());
            let mut name = format!("{stem}.png");
            let mut n = 2;
            while self.root.join(&name).exists() {
                name = format!("{stem}-{n}.png");
                n += 1;
            }
            let target = self.root.join(&name);
            let temp = self.root.join(format!(".{name}.import.tmp"));
            std::fs::copy(source, &temp).map_err(io_error(source))?;
            std::fs::rename(&temp, &target).map_err(io_error(&target))?;
            name
        };
        let path = self.root.join(&file);
        let id = Self::upsert(&self.db, &file, &metadata, file_stamp(&path)?, false)?;
        Ok(GalleryEntry {
            id,
            file,
            metadata,
            favourite: false,
        })
    }

    fn entry_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<GalleryEntry> {
        let json: String = row.get(2)?;
        Ok(GalleryEntry {
            id: row.get(0)?,
            file: row.get(1)?,
            metadata: serde_json::from_str(&json).unwrap_or_default(),
            favourite: row.get(3)?,
        })
    }

    /// The images matching `query`, newest first.
    pub fn search(&self, query: &GalleryQuery) -> Result<Vec<GalleryEntry>> {
        let mut sql = String::from(
            "SELECT images.id, images.file, images.metadata_json, images.favourite FROM images",
        );
        let mut conditions: Vec<String> = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(fts) = fts_query(&query.text) {
            sql.push_str(" JOIN images_fts ON images_fts.rowid = images.id");
            conditions.push("images_fts MATCH ?".into());
            values.push(fts.into());
        }
        if let Some(model) = &query.model {
            conditions.push("images.model = ?".into());
            values.push(model.clone().into());
        }
        if let Some(scheduler) = &query.scheduler {
            conditions.push("images.scheduler = ?".into());
            values.push(scheduler.clone().into());
        }
        if let Some(since) = query.since_unix {
            conditions.push("images.created_unix >= ?".into());
            values.push(since.into());
        }
        if query.favourites_only {
            conditions.push("images.favourite = 1".into());
        }
        if let Some(comparison) = &query.comparison {
            conditions.push("images.comparison = ?".into());
            values.push(comparison.clone().into());
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(" ORDER BY images.created_unix DESC, images.id DESC");
        if query.limit > 0 {
            sql.push_str(&format!(" LIMIT {}", query.limit));
        }
        let mut statement = self.db.prepare(&sql)?;
        let entries = statement
            .query_map(rusqlite::params_from_iter(values), Self::entry_from_row)?
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(entries)
    }

    /// One entry by id.
    pub fn get(&self, id: i64) -> Result<Option<GalleryEntry>> {
        Ok(self
            .db
            .query_row(
                "SELECT id, file, metadata_json, favourite FROM images WHERE id = ?1",
                params![id],
                Self::entry_from_row,
            )
            .optional()?)
    }

    /// Every image in the library.
    pub fn count(&self) -> Result<usize> {
        Ok(self
            .db
            .query_row("SELECT COUNT(*) FROM images", [], |row| {
                row.get::<_, i64>(0)
            })? as usize)
    }

    /// The distinct values of a column (for the filters).
    fn distinct(&self, column: &str) -> Result<Vec<String>> {
        let mut statement = self.db.prepare(&format!(
            "SELECT DISTINCT {column} FROM images WHERE {column} != '' ORDER BY {column}"
        ))?;
        let values = statement
            .query_map([], |row| row.get(0))?
            .collect::<std::result::Result<Vec<String>, _>>()?;
        Ok(values)
    }

    /// The models in the library.
    pub fn models(&self) -> Result<Vec<String>> {
        self.distinct("model")
    }

    /// The samplers in the library.
    pub fn schedulers(&self) -> Result<Vec<String>> {
        self.distinct("scheduler")
    }

    /// Marks or unmarks a favourite.
    pub fn set_favourite(&mut self, id: i64, favourite: bool) -> Result<()> {
        let changed = self.db.execute(
            "UPDATE images SET favourite = ?2 WHERE id = ?1",
            params![id, favourite],
        )?;
        if changed == 0 {
            return Err(GalleryError::NotFound(id));
        }
        self.write_favourites()
    }

    /// Moves an image to the library's trash (undo with [`Library::undo_delete`]).
    pub fn delete(&mut self, id: i64) -> Result<DeletedImage> {
        let entry = self.get(id)?.ok_or(GalleryError::NotFound(id))?;
        let trash = self.trash_dir();
        std::fs::create_dir_all(&trash).map_err(io_error(&trash))?;
        let trash_path = trash.join(&entry.file);
        let path = self.image_path(&entry);
        std::fs::rename(&path, &trash_path).map_err(io_error(&path))?;
        self.db
            .execute("DELETE FROM images WHERE id = ?1", params![id])?;
        if entry.favourite {
            self.write_favourites()?;
        }
        Ok(DeletedImage { entry, trash_path })
    }

    /// Puts a deleted image back, with its favourite mark.
    pub fn undo_delete(&mut self, deleted: &DeletedImage) -> Result<GalleryEntry> {
        let path = self.root.join(&deleted.entry.file);
        std::fs::rename(&deleted.trash_path, &path).map_err(io_error(&deleted.trash_path))?;
        let id = Self::upsert(
            &self.db,
            &deleted.entry.file,
            &deleted.entry.metadata,
            file_stamp(&path)?,
            deleted.entry.favourite,
        )?;
        if deleted.entry.favourite {
            self.write_favourites()?;
        }
        Ok(GalleryEntry {
            id,
            ..deleted.entry.clone()
        })
    }

    /// Empties the trash (images deleted in earlier sessions).
    pub fn empty_trash(&self) -> Result<()> {
        let trash = self.trash_dir();
        if trash.exists() {
            std::fs::remove_dir_all(&trash).map_err(io_error(&trash))?;
        }
        Ok(())
    }
}

/// The thumbnail of `file` in the library at `root`: cached under `.atelier/thumbs`, remade when
/// the image is newer than its thumbnail. Callable from any thread.
pub fn thumbnail(root: &Path, file: &str, side: u32) -> Result<RgbImage> {
    let path = root.join(file);
    let cache = root
        .join(".atelier")
        .join("thumbs")
        .join(format!("{file}.{side}.png"));
    let image_time = std::fs::metadata(&path)
        .and_then(|m| m.modified())
        .map_err(io_error(&path))?;
    if let Ok(cached_time) = std::fs::metadata(&cache).and_then(|m| m.modified())
        && cached_time >= image_time
        && let Ok(cached) = image::open(&cache)
    {
        return Ok(cached.to_rgb8());
    }
    let full = image::open(&path)
        .map_err(|e| PngError::Format {
            path: path.display().to_string(),
            message: e.to_string(),
        })?
        .to_rgb8();
    let (w, h) = full.dimensions();
    let scale = (side as f32 / w.max(h).max(1) as f32).min(1.0);
    let small = image::imageops::thumbnail(
        &full,
        ((w as f32 * scale).round() as u32).max(1),
        ((h as f32 * scale).round() as u32).max(1),
    );
    // The cache is best effort: a failed write only costs time next run.
    let _ = write_png(&cache, &small, &[]);
    Ok(small)
}

/// Writes `count` small PNGs with A1111 metadata into `folder` (for benchmarks and tests; no
/// fsync): prompts combine 8 subjects, 100 artists and 8 lights.
pub fn write_sample_library(folder: &Path, count: usize) -> Result<()> {
    const WORDS: [&str; 8] = [
        "fox", "castle", "forest", "ocean", "robot", "portrait", "city", "dragon",
    ];
    for i in 0..count {
        let prompt = format!(
            "a {} in the style of artist{}, {} light",
            WORDS[i % 8],
            i % 100,
            WORDS[(i / 8) % 8]
        );
        let text = format!(
            "{prompt}\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: {i}, Size: 8x8"
        );
        let path = folder.join(format!("img-{i:05}.png"));
        let file = std::fs::File::create(&path).map_err(io_error(&path))?;
        let format_error = |e: png::EncodingError| PngError::Format {
            path: path.display().to_string(),
            message: e.to_string(),
        };
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 8, 8);
        encoder.set_color(png::ColorType::Rgb);
        encoder
            .add_text_chunk("parameters".into(), text)
            .map_err(format_error)?;
        let mut writer = encoder.write_header().map_err(format_error)?;
        writer
            .write_image_data(&[(i % 256) as u8; 8 * 8 * 3])
            .map_err(format_error)?;
        writer.finish().map_err(format_error)?;
    }
    Ok(())
}
