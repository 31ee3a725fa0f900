//! Opening a library's index: busy is not corrupt, a damaged index is set aside and rebuilt, and
//! a library that cannot be written opens read-only (its index copied into memory).

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior, params};

use super::library::{GalleryError, Library, Result, io_error, now_unix};
use super::metadata::probe_writable;
use super::sync::SyncReport;

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
CREATE INDEX IF NOT EXISTS images_created
    ON images(created_unix DESC, id DESC, favourite, model, scheduler, comparison);
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

/// The index's schema version (`PRAGMA user_version`). 2: the index of creation times also
/// holds the filtered columns, so that a page of any filter is read from the index alone.
const SCHEMA_VERSION: i64 = 2;

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

impl Library {
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
}
