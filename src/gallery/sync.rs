//! Bringing the index up to date with the folder: new and changed PNGs read (bounded, outside
//! the write lock), rows of gone files dropped, and what crashed writers left behind recovered.

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{TransactionBehavior, params};

use super::library::{Library, Result, file_stamp, io_error, numbered_name};
use super::metadata::{parse_temp_name, publish_temp};
use super::png_read::{decode_rgb_bounded, read_text_bounded};
use super::record::{ImageMetadata, MetadataSource};

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

    /// Throws the index away and reads every PNG again (favourites survive).
    pub fn rebuild(&mut self) -> Result<SyncReport> {
        self.db.execute("DELETE FROM images", [])?;
        self.db
            .execute("INSERT INTO images_fts(images_fts) VALUES ('rebuild')", [])?;
        self.sync()
    }
}
