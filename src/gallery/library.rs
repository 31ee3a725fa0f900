//! The library: a folder of PNGs (the source of truth) and a SQLite index of their metadata
//! (WAL mode, full-text search over prompts), rebuilt from the PNGs whenever it is missing,
//! corrupt or out of date (opening in `index.rs`, syncing in `sync.rs`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use image::RgbImage;
use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};

use super::metadata::{PngError, publish_temp, temp_path_for, write_png, write_png_new};
use super::png_read::{decode_rgb_bounded, open_regular_file, read_text_bounded};
use super::record::ImageMetadata;
pub use super::sync::SyncReport;

/// Errors of the library.
#[derive(Debug, thiserror::Error)]
pub enum GalleryError {
    /// A file or folder could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file or folder.
        path: String,
        /// The OS error.
        error: std::io::Error,
    },
    /// The index failed (and could not be rebuilt).
    #[error("the gallery index failed: {0}")]
    Database(rusqlite::Error),
    /// Another process holds the index's lock for longer than Atelier waits; nothing was changed.
    #[error(
        "the library index is busy: another Atelier (or another program) is writing to it; try again in a moment"
    )]
    Busy,
    /// The library cannot be written: it was opened read-only.
    #[error(
        "the library {0} is read-only (its folder or index cannot be written): images can be browsed but not saved, changed or deleted"
    )]
    ReadOnly(String),
    /// The library folder does not exist.
    #[error("no library at {0}: the folder does not exist")]
    NoLibrary(String),
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

pub(super) type Result<T> = std::result::Result<T, GalleryError>;

impl From<rusqlite::Error> for GalleryError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => GalleryError::Busy,
            _ => GalleryError::Database(error),
        }
    }
}

pub(super) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GalleryError + '_ {
    move |error| GalleryError::Io {
        path: path.display().to_string(),
        error,
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
    pub(super) root: PathBuf,
    pub(super) db: Connection,
    pub(super) read_only: bool,
}

pub(super) fn file_stamp(path: &Path) -> Result<(i64, i64)> {
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

/// The `n`th candidate name for an image based on `stem`: `stem.png`, `stem-2.png`, ...
pub(super) fn numbered_name(stem: &str, n: usize) -> String {
    if n <= 1 {
        format!("{stem}.png")
    } else {
        format!("{stem}-{n}.png")
    }
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

    /// Whether the library was opened read-only (its folder or index cannot be written).
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(GalleryError::ReadOnly(self.root.display().to_string()));
        }
        Ok(())
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
    pub(super) fn saved_favourites(&self) -> BTreeSet<String> {
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
        let temp = path.with_extension(format!(
            "json.{}.{:08x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        let text = serde_json::to_string_pretty(&files).unwrap_or_else(|_| "[]".into());
        std::fs::write(&temp, text).map_err(io_error(&temp))?;
        std::fs::rename(&temp, &path).map_err(io_error(&path))
    }

    /// [`Library::upsert`] in a transaction of its own that takes the write lock first (waiting
    /// for it), so that another process's write in between cannot fail it.
    fn upsert_one(
        &mut self,
        file: &str,
        metadata: &ImageMetadata,
        stamp: (i64, i64),
        favourite: bool,
    ) -> Result<i64> {
        let transaction = self
            .db
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let id = Self::upsert(&transaction, file, metadata, stamp, favourite)?;
        transaction.commit()?;
        Ok(id)
    }

    pub(super) fn upsert(
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

    /// The name stem of a new image made at `created_unix` with `seed`: `20261128-203000-42`.
    /// [`write_png_new`] adds `-2`, `-3`, ... when another image has the name already.
    fn new_file_stem(metadata: &ImageMetadata) -> String {
        let stamp = jiff::Timestamp::from_second(metadata.created_unix)
            .map(|t| t.strftime("%Y%m%d-%H%M%S").to_string())
            .unwrap_or_else(|_| metadata.created_unix.to_string());
        let seed = metadata.seed.map_or(String::new(), |s| format!("-{s}"));
        format!("{stamp}{seed}")
    }

    /// Saves a new image and indexes it. The file is written under a temporary name, synced,
    /// then given a name that no other file has, without ever replacing one, even when other
    /// processes or machines save into the same folder at the same moment.
    pub fn save(&mut self, image: &RgbImage, metadata: &ImageMetadata) -> Result<GalleryEntry> {
        self.check_writable()?;
        let mut metadata = metadata.clone();
        if metadata.created_unix == 0 {
            metadata.created_unix = now_unix();
        }
        // The size is the job's (a hires fix's first pass, as A1111 writes it; "only masked"
        // works at it over a larger picture); the picture's own when unknown.
        if metadata.width == 0 || metadata.height == 0 {
            metadata.width = image.width();
            metadata.height = image.height();
        }
        let stem = Self::new_file_stem(&metadata);
        let chunks = metadata.text_chunks();
        let borrowed: Vec<(&str, &str)> = chunks.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let file = write_png_new(&self.root, |n| numbered_name(&stem, n), image, &borrowed)?;
        let path = self.root.join(&file);
        let id = self.upsert_one(&file, &metadata, file_stamp(&path)?, false)?;
        Ok(GalleryEntry {
            id,
            file,
            metadata,
            favourite: false,
        })
    }

    /// Keeps a picture that a job started from (an init image or a mask) in the library's
    /// `.atelier/inputs`, named by the SHA-256 of its size and pixels, so that ten variations of
    /// one photo store it once; returns that name (see [`Library::input_path`]).
    pub fn store_input(&self, image: &image::DynamicImage) -> Result<String> {
        use sha2::{Digest, Sha256};
        self.check_writable()?;
        let mut hasher = Sha256::new();
        hasher.update(image.width().to_le_bytes());
        hasher.update(image.height().to_le_bytes());
        if !matches!(image, image::DynamicImage::ImageRgb8(_)) {
            // Other kinds of pixels (a mask's grey) never share a name with a colour picture.
            hasher.update(format!("{:?}", image.color()).as_bytes());
        }
        hasher.update(image.as_bytes());
        let name = format!("{}.png", &hex::encode(hasher.finalize())[..32]);
        let path = self.input_path(&name);
        if !path.is_file() {
            let folder = self.root.join(".atelier").join("inputs");
            std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
            write_png_any(&path, image)?;
        }
        Ok(name)
    }

    /// Where a stored input (see [`Library::store_input`]) lives.
    pub fn input_path(&self, name: &str) -> PathBuf {
        input_path(&self.root, name)
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
        let text = read_text_bounded(source)?;
        // Make sure the pixels decode too, before anything is copied.
        decode_rgb_bounded(source)?;
        let mut metadata =
            ImageMetadata::from_chunks(&text.chunks).ok_or(GalleryError::NoMetadata(display))?;
        self.check_writable()?;
        if metadata.created_unix == 0 {
            metadata.created_unix = file_stamp(source)?.1;
        }
        let already_here = source
            .parent()
            .is_some_and(|p| p.canonicalize().ok() == self.root.canonicalize().ok());
        let file = match source.file_name().and_then(|n| n.to_str()) {
            Some(name) if already_here => name.to_string(),
            _ => {
                let stem = source
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .filter(|s| !s.is_empty() && !s.starts_with('.'))
                    .unwrap_or_else(|| "imported".into());
                let temp = temp_path_for(&self.root, &numbered_name(&stem, 1));
                let copied = open_regular_file(source)
                    .map_err(GalleryError::from)
                    .and_then(|mut from| {
                        let mut to = std::fs::OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .open(&temp)
                            .map_err(io_error(&temp))?;
                        std::io::copy(&mut from, &mut to).map_err(io_error(&temp))?;
                        to.sync_all().map_err(io_error(&temp))
                    });
                if let Err(error) = copied {
                    let _ = std::fs::remove_file(&temp);
                    return Err(error);
                }
                publish_temp(&self.root, &temp, |n| numbered_name(&stem, n))?
            }
        };
        let path = self.root.join(&file);
        let id = self.upsert_one(&file, &metadata, file_stamp(&path)?, false)?;
        Ok(GalleryEntry {
            id,
            file,
            metadata,
            favourite: false,
        })
    }

    /// Marks or unmarks a favourite.
    pub fn set_favourite(&mut self, id: i64, favourite: bool) -> Result<()> {
        self.check_writable()?;
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
        self.check_writable()?;
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
        self.check_writable()?;
        let path = self.root.join(&deleted.entry.file);
        std::fs::rename(&deleted.trash_path, &path).map_err(io_error(&deleted.trash_path))?;
        let id = self.upsert_one(
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
        self.check_writable()?;
        let trash = self.trash_dir();
        if trash.exists() {
            std::fs::remove_dir_all(&trash).map_err(io_error(&trash))?;
        }
        Ok(())
    }
}

/// Writes a picture of any kind of pixels as a PNG under a temporary name, then renames it.
fn write_png_any(path: &Path, image: &image::DynamicImage) -> Result<()> {
    let temp = path.with_extension("png.partial");
    image
        .save_with_format(&temp, image::ImageFormat::Png)
        .map_err(|error| GalleryError::Io {
            path: temp.display().to_string(),
            error: std::io::Error::other(error.to_string()),
        })?;
    std::fs::rename(&temp, path).map_err(|error| {
        let _ = std::fs::remove_file(&temp);
        GalleryError::Io {
            path: path.display().to_string(),
            error,
        }
    })
}

/// Where the stored input `name` of the library at `root` lives (names are our own hashes: a
/// name with a path separator or `..` points nowhere).
pub fn input_path(root: &Path, name: &str) -> PathBuf {
    let safe = !name.is_empty()
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
        && !name.contains("..");
    let name = if safe { name } else { "invalid-input-name.png" };
    root.join(".atelier").join("inputs").join(name)
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
        && let Ok(cached) = decode_rgb_bounded(&cache)
    {
        return Ok(cached);
    }
    let full = decode_rgb_bounded(&path)?;
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
