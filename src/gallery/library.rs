//! The library: a folder of PNGs (the source of truth) and a SQLite index of their metadata
//! (WAL mode, full-text search over prompts), rebuilt from the PNGs whenever it is missing,
//! corrupt or out of date.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use image::RgbImage;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};

use super::metadata::{
    PngError, parse_temp_name, probe_writable, publish_temp, temp_path_for, write_png,
    write_png_new,
};
use super::png_read::{decode_rgb_bounded, open_regular_file, read_text_bounded};
use super::record::{ImageMetadata, MetadataSource};

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

type Result<T> = std::result::Result<T, GalleryError>;

impl From<rusqlite::Error> for GalleryError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => GalleryError::Busy,
            _ => GalleryError::Database(error),
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> GalleryError + '_ {
    move |error| GalleryError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// What went wrong opening the index on disk, which decides what happens next.
enum IndexOpenFailure {
    /// The file is damaged (or not a database): set it aside and rebuild.
    Corrupt,
    /// The index cannot be written: open the library read-only.
    ReadOnly,
    /// Anything else (busy, I/O): report it and touch nothing.
    Other(GalleryError),
}

impl From<rusqlite::Error> for IndexOpenFailure {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => IndexOpenFailure::Corrupt,
            Some(ErrorCode::ReadOnly | ErrorCode::PermissionDenied) => IndexOpenFailure::ReadOnly,
            _ => IndexOpenFailure::Other(error.into()),
        }
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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Images added to the index (new or changed files).
    pub added: usize,
    /// Index rows dropped because their file is gone.
    pub removed: usize,
    /// Whether the index was corrupt and has been rebuilt (the old one is kept aside).
    pub rebuilt_corrupt_index: bool,
    /// Complete images left in temporary files by a process that died before naming them, now
    /// in the library.
    pub recovered: usize,
    /// Temporary files of dead processes removed: incomplete, or already named.
    pub removed_partial: usize,
    /// Files in the folder that are not in the gallery, each with the reason (corrupt PNG,
    /// not a regular file, a name that is not UTF-8).
    pub skipped: Vec<(String, String)>,
    /// Images in the gallery with part of their metadata left out, each with what and why.
    pub notes: Vec<(String, String)>,
    /// Whether the library was opened read-only (its folder or index cannot be written).
    pub opened_read_only: bool,
}

impl SyncReport {
    /// What an artist should hear about this sync, one sentence a line (empty when nothing
    /// happened beyond new images being found). At most `examples` files are named per kind.
    pub fn messages(&self, examples: usize) -> Vec<String> {
        let mut lines = Vec::new();
        if self.rebuilt_corrupt_index {
            lines.push("the index was damaged: set aside and rebuilt from the images".into());
        }
        if self.opened_read_only {
            lines.push(
                "the library cannot be written: opened read-only (browse only; new images are not saved here)"
                    .into(),
            );
        }
        if self.recovered > 0 {
            lines.push(format!(
                "{} image(s) left by an interrupted save were recovered",
                self.recovered
            ));
        }
        if self.removed_partial > 0 {
            lines.push(format!(
                "{} incomplete temporary file(s) of an interrupted save were removed",
                self.removed_partial
            ));
        }
        for (kind, list) in [("skipped", &self.skipped), ("partly read", &self.notes)] {
            for (file, why) in list.iter().take(examples) {
                lines.push(format!("{kind} {file}: {why}"));
            }
            if list.len() > examples {
                lines.push(format!("... and {} more {kind}", list.len() - examples));
            }
        }
        lines
    }
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
    read_only: bool,
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

/// What an artist typed in the search box, as conditions: words (anything with a letter or a
/// digit) go to FTS5, each as a prefix; symbols that the full-text index does not hold (emoji,
/// other pictographs) must appear in the prompt or negative prompt as typed. A query of only
/// punctuation is matched as typed too. Blank: no condition.
#[derive(Debug, Default, PartialEq)]
struct TextQuery {
    fts: Option<String>,
    substrings: Vec<String>,
}

fn text_query(text: &str) -> TextQuery {
    let is_word_char = |c: char| c.is_alphanumeric() || c == '\'' || c == '-' || c == '_';
    let words: Vec<String> = text
        .split(|c: char| !is_word_char(c))
        .filter(|w| w.chars().any(char::is_alphanumeric))
        .map(|w| format!("\"{}\"*", w.replace('"', "\"\"")))
        .collect();
    let mut substrings: Vec<String> = text
        .split(|c: char| c.is_alphanumeric() || c.is_whitespace() || c.is_ascii_punctuation())
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if words.is_empty() && substrings.is_empty() && !text.trim().is_empty() {
        substrings.push(text.trim().to_string());
    }
    TextQuery {
        fts: (!words.is_empty()).then(|| words.join(" ")),
        substrings,
    }
}

/// A path for an SQLite URI (`file:...`): bytes outside the unreserved set percent-encoded.
fn uri_escape(path: &Path) -> String {
    let mut out = String::new();
    for byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(*byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// The `n`th candidate name for an image based on `stem`: `stem.png`, `stem-2.png`, ...
fn numbered_name(stem: &str, n: usize) -> String {
    if n <= 1 {
        format!("{stem}.png")
    } else {
        format!("{stem}-{n}.png")
    }
}

/// How old a file is, in seconds (0 when unknown).
fn age_secs(metadata: &std::fs::Metadata) -> u64 {
    metadata
        .modified()
        .ok()
        .and_then(|m| m.elapsed().ok())
        .map_or(0, |d| d.as_secs())
}

/// Whether process `pid` is known to be gone from this machine (Linux: no `/proc/PID`).
/// Elsewhere nothing is known and the temporary file's age decides.
fn process_is_gone(pid: u32) -> bool {
    let proc = Path::new("/proc");
    proc.join("self").exists() && !proc.join(pid.to_string()).exists()
}

/// A temporary file is abandoned when its writer is gone and it has not changed for 10 s, or
/// when it has not changed for 5 minutes whoever wrote it (another machine sharing the folder:
/// writing one PNG takes well under a second).
fn temp_is_abandoned(pid: u32, age_secs: u64) -> bool {
    age_secs >= 300 || (age_secs >= 10 && pid != std::process::id() && process_is_gone(pid))
}

/// Whether a temporary file also has its final name already (a second hard link).
#[cfg(unix)]
fn already_published(metadata: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    metadata.nlink() > 1
}

/// Whether a temporary file also has its final name already (unknown here: no).
#[cfg(not(unix))]
fn already_published(_metadata: &std::fs::Metadata) -> bool {
    false
}

/// How many new or changed files are indexed per transaction: short write locks, so that
/// another process sharing the library never waits long.
const SYNC_BATCH: usize = 256;

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
    /// the folder. A corrupt index is set aside and rebuilt from the PNGs; a busy one is an
    /// error that changes nothing; a library that cannot be written opens read-only.
    pub fn open(root: &Path) -> Result<(Self, SyncReport)> {
        if !root.is_dir() {
            std::fs::create_dir_all(root).map_err(io_error(root))?;
        }
        Self::open_folder(root)
    }

    /// Opens the library at `root` like [`Library::open`], but only if the folder exists (a
    /// mistyped `--library` is an error, not a new empty library).
    pub fn open_existing(root: &Path) -> Result<(Self, SyncReport)> {
        if !root.is_dir() {
            return Err(GalleryError::NoLibrary(root.display().to_string()));
        }
        Self::open_folder(root)
    }

    fn open_folder(root: &Path) -> Result<(Self, SyncReport)> {
        let meta_dir = root.join(".atelier");
        let writable = std::fs::create_dir_all(meta_dir.join("thumbs")).is_ok()
            && probe_writable(root).is_ok()
            && probe_writable(&meta_dir).is_ok();
        let db_path = meta_dir.join("index.sqlite3");
        let mut rebuilt = false;
        let mut read_only = !writable;
        let db = if read_only {
            Self::open_index_read_only(&db_path)?
        } else {
            match Self::open_index_waiting(&db_path) {
                Ok(db) => db,
                Err(IndexOpenFailure::Corrupt) => {
                    // Keep the broken file for inspection; the folder has everything we need.
                    let aside = db_path.with_extension(format!("corrupt-{}", now_unix()));
                    std::fs::rename(&db_path, &aside).map_err(io_error(&db_path))?;
                    for suffix in ["-wal", "-shm"] {
                        let _ = std::fs::remove_file(format!("{}{suffix}", db_path.display()));
                    }
                    rebuilt = true;
                    match Self::open_index(&db_path) {
                        Ok(db) => db,
                        Err(IndexOpenFailure::Other(error)) => return Err(error),
                        Err(_) => {
                            return Err(GalleryError::Io {
                                path: db_path.display().to_string(),
                                error: std::io::Error::other(
                                    "a new index could not be made in place of the damaged one",
                                ),
                            });
                        }
                    }
                }
                Err(IndexOpenFailure::ReadOnly) => {
                    read_only = true;
                    Self::open_index_read_only(&db_path)?
                }
                Err(IndexOpenFailure::Other(error)) => return Err(error),
            }
        };
        let mut library = Self {
            root: root.to_path_buf(),
            db,
            read_only,
        };
        let mut report = library.sync()?;
        report.rebuilt_corrupt_index = rebuilt;
        report.opened_read_only = read_only;
        Ok((library, report))
    }

    /// [`Library::open_index`], tried again for up to 10 s while another process holds a lock
    /// that SQLite does not wait for by itself (creating the index, changing its journal mode).
    fn open_index_waiting(path: &Path) -> std::result::Result<Connection, IndexOpenFailure> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Self::open_index(path) {
                Err(IndexOpenFailure::Other(GalleryError::Busy))
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Opens the index on disk for reading and writing, writing to it only when its schema must
    /// be created or changed (so that opening never waits for another process's write lock).
    fn open_index(path: &Path) -> std::result::Result<Connection, IndexOpenFailure> {
        let db = Connection::open(path)?;
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        if db.is_readonly(rusqlite::MAIN_DB)? {
            return Err(IndexOpenFailure::ReadOnly);
        }
        let check: String = db.query_row("PRAGMA quick_check", [], |row| row.get(0))?;
        if check != "ok" {
            return Err(IndexOpenFailure::Corrupt);
        }
        let mode: String = db.query_row("PRAGMA journal_mode", [], |row| row.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            db.pragma_update(None, "journal_mode", "WAL")?;
        }
        db.pragma_update(None, "synchronous", "NORMAL")?;
        let version: i64 = db.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if version != SCHEMA_VERSION {
            let mut db = db;
            let transaction = db.transaction_with_behavior(TransactionBehavior::Immediate)?;
            // Another process may have made the schema while we waited for the lock.
            let version: i64 =
                transaction.query_row("PRAGMA user_version", [], |row| row.get(0))?;
            if version != SCHEMA_VERSION {
                if version != 0 {
                    // An index from another version: it is only a cache, start again.
                    transaction.execute_batch(
                        "DROP TABLE IF EXISTS images_fts; DROP TABLE IF EXISTS images;",
                    )?;
                }
                transaction.execute_batch(SCHEMA)?;
                transaction.pragma_update(None, "user_version", SCHEMA_VERSION)?;
            }
            transaction.commit()?;
            return Ok(db);
        }
        Ok(db)
    }

    /// An index in memory for a library that cannot be written: the rows of the index on disk
    /// when it can be read (opened immutable, so that SQLite needs to create nothing beside it),
    /// then brought up to date with the folder by [`Library::sync`] like any other.
    fn open_index_read_only(path: &Path) -> Result<Connection> {
        let db = Connection::open_in_memory_with_flags(
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI,
        )?;
        db.execute_batch(SCHEMA)?;
        if path.is_file() {
            let uri = format!("file:{}?immutable=1", uri_escape(path));
            let copied = db
                .execute("ATTACH DATABASE ?1 AS disk", params![uri])
                .and_then(|_| {
                    let version: i64 =
                        db.query_row("PRAGMA disk.user_version", [], |row| row.get(0))?;
                    if version == SCHEMA_VERSION {
                        db.execute_batch("INSERT INTO images SELECT * FROM disk.images")?;
                    }
                    Ok(())
                });
            let _ = db.execute_batch("DETACH DATABASE disk");
            if copied.is_err() {
                // Unreadable: the folder still has everything, sync reads it.
                db.execute("DELETE FROM images", [])?;
            }
        }
        Ok(db)
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
        let temp = path.with_extension(format!(
            "json.{}.{:08x}.tmp",
            std::process::id(),
            rand::random::<u32>()
        ));
        let text = serde_json::to_string_pretty(&files).unwrap_or_else(|_| "[]".into());
        std::fs::write(&temp, text).map_err(io_error(&temp))?;
        std::fs::rename(&temp, &path).map_err(io_error(&path))
    }

    /// Brings the index up to date with the folder: PNGs that are new or changed are read, rows
    /// whose file is gone are dropped, complete images that a dead process left in temporary
    /// files are named and indexed (incomplete ones removed). Files are read outside the
    /// index's write lock and indexed in short transactions.
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
        let mut report = SyncReport::default();
        if !self.read_only {
            self.recover_temp_files(&mut report)?;
        }
        let mut changed = Vec::new();
        let listing = std::fs::read_dir(&self.root).map_err(io_error(&self.root))?;
        for item in listing {
            let item = item.map_err(io_error(&self.root))?;
            let os_name = item.file_name();
            let lossy = os_name.to_string_lossy();
            let is_png = Path::new(&*lossy)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("png"));
            if lossy.starts_with('.') || !is_png {
                continue;
            }
            let Some(name) = os_name.to_str().map(str::to_owned) else {
                report.skipped.push((
                    lossy.into_owned(),
                    "the file name is not valid UTF-8 (rename it to see it in the gallery)".into(),
                ));
                continue;
            };
            let path = item.path();
            // Follows links: a link to a PNG is fine, a FIFO or a folder named x.png is not.
            match std::fs::metadata(&path) {
                Ok(metadata) if metadata.is_file() => {}
                Ok(_) => {
                    known.remove(&name);
                    report.skipped.push((name, "not a regular file".into()));
                    continue;
                }
                Err(error) => {
                    known.remove(&name);
                    report.skipped.push((name, error.to_string()));
                    continue;
                }
            }
            let Ok(stamp) = file_stamp(&path) else {
                continue;
            };
            if known.remove(&name) == Some(stamp) {
                continue;
            }
            changed.push((name, path, stamp));
        }
        let favourites = self.saved_favourites();
        for batch in changed.chunks(SYNC_BATCH) {
            let mut rows = Vec::with_capacity(batch.len());
            for (name, path, stamp) in batch {
                // A corrupt PNG in the folder is skipped, named in the report, and retried at the
                // next sync.
                let text = match read_text_bounded(path) {
                    Ok(text) => text,
                    Err(error) => {
                        report.skipped.push((name.clone(), error.to_string()));
                        continue;
                    }
                };
                for what in &text.skipped {
                    report
                        .notes
                        .push((name.clone(), format!("{what}: left out of the gallery")));
                }
                let mut metadata =
                    ImageMetadata::from_chunks(&text.chunks).unwrap_or(ImageMetadata {
                        source: MetadataSource::None,
                        ..Default::default()
                    });
                if metadata.created_unix == 0 {
                    metadata.created_unix = stamp.1;
                }
                rows.push((name, metadata, *stamp));
            }
            let transaction = self
                .db
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for (name, metadata, stamp) in &rows {
                Self::upsert(
                    &transaction,
                    name,
                    metadata,
                    *stamp,
                    favourites.contains(*name),
                )?;
            }
            transaction.commit()?;
            report.added += rows.len();
        }
        if !known.is_empty() {
            let transaction = self
                .db
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for gone in known.keys() {
                transaction.execute("DELETE FROM images WHERE file = ?1", params![gone])?;
                report.removed += 1;
            }
            transaction.commit()?;
        }
        Ok(report)
    }

    /// Names the complete images that dead processes left in temporary files (see
    /// [`temp_is_abandoned`]) and removes the incomplete ones. The sync that follows indexes
    /// the recovered files.
    fn recover_temp_files(&self, report: &mut SyncReport) -> Result<()> {
        let listing = std::fs::read_dir(&self.root).map_err(io_error(&self.root))?;
        for item in listing.flatten() {
            let Some(temp_name) = item.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Some((name, pid)) = parse_temp_name(&temp_name) else {
                continue;
            };
            let path = item.path();
            let Ok(metadata) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if !metadata.is_file() || !temp_is_abandoned(pid, age_secs(&metadata)) {
                continue;
            }
            if already_published(&metadata) {
                // Killed between naming the file (a hard link) and removing the temporary name.
                if std::fs::remove_file(&path).is_ok() {
                    report.removed_partial += 1;
                }
                continue;
            }
            if decode_rgb_bounded(&path).is_ok() && read_text_bounded(&path).is_ok() {
                let stem = name.strip_suffix(".png").unwrap_or(&name).to_string();
                match publish_temp(&self.root, &path, |n| numbered_name(&stem, n)) {
                    Ok(_) => report.recovered += 1,
                    Err(error) => report.skipped.push((temp_name, error.to_string())),
                }
            } else if std::fs::remove_file(&path).is_ok() {
                report.removed_partial += 1;
            }
        }
        Ok(())
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
        metadata.width = image.width();
        metadata.height = image.height();
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
    pub fn store_input(&self, image: &RgbImage) -> Result<String> {
        use sha2::{Digest, Sha256};
        self.check_writable()?;
        let mut hasher = Sha256::new();
        hasher.update(image.width().to_le_bytes());
        hasher.update(image.height().to_le_bytes());
        hasher.update(image.as_raw());
        let name = format!("{}.png", &hex::encode(hasher.finalize())[..32]);
        let path = self.input_path(&name);
        if !path.is_file() {
            let folder = self.root.join(".atelier").join("inputs");
            std::fs::create_dir_all(&folder).map_err(io_error(&folder))?;
            write_png(&path, image, &[])?;
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
        let text = text_query(&query.text);
        if let Some(fts) = text.fts {
            sql.push_str(" JOIN images_fts ON images_fts.rowid = images.id");
            conditions.push("images_fts MATCH ?".into());
            values.push(fts.into());
        }
        for substring in text.substrings {
            conditions
                .push("instr(images.prompt || char(10) || images.negative_prompt, ?) > 0".into());
            values.push(substring.into());
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
            sql.push_str(" LIMIT ?");
            values.push(i64::try_from(query.limit).unwrap_or(i64::MAX).into());
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
