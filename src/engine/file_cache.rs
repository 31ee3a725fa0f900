//! Files read once and kept while they do not change on disk (LoRAs, embeddings).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::error::Result;

/// What was read from each file, with the modification time it was read at.
#[derive(Debug)]
pub struct FileCache<T> {
    files: HashMap<PathBuf, (Option<SystemTime>, Arc<T>)>,
}

impl<T> Default for FileCache<T> {
    fn default() -> Self {
        Self {
            files: HashMap::new(),
        }
    }
}

impl<T> FileCache<T> {
    /// What `read` makes of `path`: the kept copy while the file is unchanged, else read again.
    pub fn get(&mut self, path: &Path, read: impl FnOnce(&Path) -> Result<T>) -> Result<Arc<T>> {
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if let Some((when, value)) = self.files.get(path)
            && modified.is_some()
            && *when == modified
        {
            return Ok(value.clone());
        }
        let value = Arc::new(read(path)?);
        self.files
            .insert(path.to_path_buf(), (modified, value.clone()));
        Ok(value)
    }
}
