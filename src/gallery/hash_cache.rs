//! Model hashes as A1111 writes them (SHA-256 of the whole file, first 10 hex digits: "AutoV2"),
//! computed once per file version and remembered on disk (`hashes.json` in Atelier's data
//! folder), so a 7 GB checkpoint is read through once, not every session.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One file's hash, valid while its size and modification time are these.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CachedHash {
    size: u64,
    modified_secs: u64,
    hash: String,
}

/// Hashes by file, kept in a JSON file.
#[derive(Debug, Default)]
pub struct HashCache {
    file: Option<PathBuf>,
    entries: BTreeMap<String, CachedHash>,
}

fn version(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    let modified = metadata
        .modified()
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    Some((metadata.len(), modified))
}

impl HashCache {
    /// The cache in Atelier's data folder (in memory only when there is none).
    pub fn open_default() -> Self {
        let file = directories::ProjectDirs::from("", "", "atelier")
            .map(|dirs| dirs.data_dir().join("hashes.json"));
        match file {
            Some(file) => Self::open(&file),
            None => Self::default(),
        }
    }

    /// The cache kept in `file` (an unreadable or damaged file starts an empty cache).
    pub fn open(file: &Path) -> Self {
        let entries = std::fs::read_to_string(file)
            .ok()
            .and_then(|text| serde_json::from_str(&text).ok())
            .unwrap_or_default();
        Self {
            file: Some(file.to_path_buf()),
            entries,
        }
    }

    fn key(path: &Path) -> String {
        std::fs::canonicalize(path)
            .unwrap_or_else(|_| path.to_path_buf())
            .display()
            .to_string()
    }

    /// The hash remembered for the file as it is now, without reading it.
    pub fn cached(&self, path: &Path) -> Option<String> {
        let (size, modified_secs) = version(path)?;
        self.entries
            .get(&Self::key(path))
            .filter(|e| e.size == size && e.modified_secs == modified_secs)
            .map(|e| e.hash.clone())
    }

    /// The file's hash: remembered, or computed (reading the whole file) and remembered.
    pub fn hash(&mut self, path: &Path) -> std::io::Result<String> {
        if let Some(hash) = self.cached(path) {
            return Ok(hash);
        }
        let hash = super::worker::file_hash(path)?;
        if let Some((size, modified_secs)) = version(path) {
            self.entries.insert(
                Self::key(path),
                CachedHash {
                    size,
                    modified_secs,
                    hash: hash.clone(),
                },
            );
            // A cache that cannot be written costs a recomputation next time, nothing more.
            let _ = self.save();
        }
        Ok(hash)
    }

    fn save(&self) -> std::io::Result<()> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = serde_json::to_string_pretty(&self.entries).map_err(std::io::Error::other)?;
        // Two processes may save at once: each writes its own file, the last rename wins.
        let temporary = file.with_extension(format!("json.{}.tmp", std::process::id()));
        std::fs::write(&temporary, text)?;
        std::fs::rename(&temporary, file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_is_computed_once_and_again_when_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("model.safetensors");
        std::fs::write(&model, b"weights").expect("write");
        let cache_file = dir.path().join("hashes.json");
        let mut cache = HashCache::open(&cache_file);
        assert_eq!(cache.cached(&model), None);
        let hash = cache.hash(&model).expect("hash");
        assert_eq!(hash, super::super::worker::file_hash(&model).expect("hash"));
        // Another session reads it back without hashing.
        let reopened = HashCache::open(&cache_file);
        assert_eq!(reopened.cached(&model), Some(hash.clone()));
        // A changed file (another size) is hashed again.
        std::fs::write(&model, b"other weights").expect("write");
        assert_eq!(reopened.cached(&model), None);
        let mut reopened = reopened;
        assert_ne!(reopened.hash(&model).expect("hash"), hash);
        // A damaged cache file is an empty cache.
        std::fs::write(&cache_file, b"{not json").expect("write");
        assert_eq!(HashCache::open(&cache_file).cached(&model), None);
    }
}
