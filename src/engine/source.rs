//! Where a model's files come from: a local diffusers folder or a Hugging Face Hub repo.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{EngineError, Result};

/// Progress of loading a model, reported to whoever asked for it (CLI progress bar, window).
#[derive(Debug, Clone, PartialEq)]
pub enum LoadProgress {
    /// A file is being downloaded from the Hub.
    Downloading {
        /// The file inside the repo, e.g. `unet/diffusion_pytorch_model.fp16.safetensors`.
        file: String,
        /// Bytes received so far.
        bytes_done: u64,
        /// Size of the file in bytes.
        bytes_total: u64,
    },
    /// A component is being read into memory.
    Loading {
        /// The component, e.g. `unet`.
        component: String,
    },
}

/// A callback for [`LoadProgress`]; called from the loading thread.
pub type LoadProgressFn = Arc<dyn Fn(LoadProgress) + Send + Sync>;

/// Where a model lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A local folder in the diffusers layout.
    Folder(PathBuf),
    /// A Hugging Face Hub repo id such as `stabilityai/sd-turbo`.
    Hub(String),
    /// A single-file checkpoint (`.safetensors` in the original CompVis/SGM layout).
    File(PathBuf),
}

impl ModelSource {
    /// Reads a `--model` argument: an existing folder, else something shaped like `owner/name`.
    pub fn parse(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(ModelSource::Folder(path.to_path_buf()));
        }
        if path.is_file() {
            // A single file: refuse pickles and families Atelier does not run, by name.
            if let Some(refused) = super::checkpoint::refuse_pickle(path) {
                return Err(refused);
            }
            let mut info = super::checkpoint::inspect(path)?;
            if info.context_width.is_some()
                && let Ok(original) =
                    super::checkpoint::original_config::OriginalConfig::beside(path)
                && let Some(family) = original.family
                && !info.family.runs()
            {
                info.family = family;
            }
            if !info.family.runs() {
                return Err(EngineError::Unsupported(format!(
                    "{} is {}; Atelier runs SD 1.x, SD 2.x and SDXL checkpoints",
                    path.display(),
                    info.summary()
                )));
            }
            return Ok(ModelSource::File(path.to_path_buf()));
        }
        let looks_like_repo = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && !spec.starts_with('/')
            && !spec.starts_with('~')
            && spec
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if looks_like_repo {
            Ok(ModelSource::Hub(spec.to_string()))
        } else {
            Err(EngineError::MissingFile {
                what: "model folder".into(),
                path: path.to_path_buf(),
            })
        }
    }

    /// A short name for logs and metadata: the repo id or the folder's name.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::Hub(repo) => repo.clone(),
            ModelSource::File(path) => path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
            ModelSource::Folder(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.display().to_string()),
        }
    }
}

/// Resolves the files of one model, downloading from the Hub when needed.
pub struct ModelFiles {
    source: ModelSource,
    progress: Option<LoadProgressFn>,
}

impl ModelFiles {
    /// Files of `source`; `progress` hears about downloads.
    pub fn new(source: ModelSource, progress: Option<LoadProgressFn>) -> Self {
        Self { source, progress }
    }

    /// The source these files come from.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// Reports progress, if anyone listens.
    pub fn report(&self, event: LoadProgress) {
        if let Some(progress) = &self.progress {
            progress(event);
        }
    }

    /// Whether `relative` exists (locally, in the Hub cache, or on the Hub).
    pub fn exists(&self, relative: &str) -> bool {
        self.optional(relative).ok().flatten().is_some()
    }

    /// The local path of `relative`, or `None` if the model has no such file.
    ///
    /// On the Hub a missing file and a failed download look alike once all else fails, so a
    /// network error is returned as an error and only a clean "not there" is `None`.
    pub fn optional(&self, relative: &str) -> Result<Option<PathBuf>> {
        match &self.source {
            ModelSource::Folder(root) => {
                let path = root.join(relative);
                Ok(path.is_file().then_some(path))
            }
            ModelSource::Hub(repo) => hub_get(repo, relative, self.progress.as_ref()),
            // A single file holds no other files.
            ModelSource::File(_) => Ok(None),
        }
    }

    /// The local path of `relative`, which must exist.
    pub fn required(&self, relative: &str, what: &str) -> Result<PathBuf> {
        self.optional(relative)?
            .ok_or_else(|| self.missing(relative, what))
    }

    /// The first of `candidates` that exists; the error names the first candidate.
    pub fn first_of(&self, candidates: &[String], what: &str) -> Result<PathBuf> {
        for candidate in candidates {
            if let Some(path) = self.optional(candidate)? {
                return Ok(path);
            }
        }
        let wanted = candidates.join(" or ");
        Err(self.missing(&wanted, what))
    }

    /// The safetensors weights of `component`, preferring the fp16 variant when `prefer_fp16`.
    pub fn weights(&self, component: &str, stem: &str, prefer_fp16: bool) -> Result<PathBuf> {
        let full = format!("{component}/{stem}.safetensors");
        let half = format!("{component}/{stem}.fp16.safetensors");
        let candidates = if prefer_fp16 {
            [half, full]
        } else {
            [full, half]
        };
        let found = self.first_of(&candidates, &format!("{component} weights"));
        if found.is_err() && self.exists(&format!("{component}/{stem}.bin")) {
            return Err(EngineError::Unsupported(format!(
                "{component} has only PyTorch pickle weights ({stem}.bin); Atelier reads safetensors only"
            )));
        }
        found
    }

    fn missing(&self, relative: &str, what: &str) -> EngineError {
        match &self.source {
            ModelSource::Folder(root) => EngineError::MissingFile {
                what: what.to_string(),
                path: root.join(relative),
            },
            ModelSource::File(path) => EngineError::MissingFile {
                what: what.to_string(),
                path: path.clone(),
            },
            ModelSource::Hub(repo) => EngineError::Download {
                repo: repo.clone(),
                file: relative.to_string(),
                message: if hub_offline() {
                    format!(
                        "{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
                    )
                } else {
                    format!("the repo has no such file ({what})")
                },
            },
        }
    }
}

struct HubProgress {
    file: String,
    bytes_done: u64,
    bytes_total: u64,
    callback: LoadProgressFn,
}

impl hf_hub::api::Progress for HubProgress {
    fn init(&mut self, size: usize, _filename: &str) {
        self.bytes_total = size as u64;
        self.bytes_done = 0;
        self.emit();
    }
    fn update(&mut self, size: usize) {
        self.bytes_done += size as u64;
        self.emit();
    }
    fn finish(&mut self) {
        self.bytes_done = self.bytes_total;
        self.emit();
    }
}

impl HubProgress {
    fn emit(&self) {
        (self.callback)(LoadProgress::Downloading {
            file: self.file.clone(),
            bytes_done: self.bytes_done,
            bytes_total: self.bytes_total,
        });
    }
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

/// Cache first, then the network; `Ok(None)` when the Hub says the file does not exist.
fn hub_get(repo: &str, file: &str, progress: Option<&LoadProgressFn>) -> Result<Option<PathBuf>> {
    let cache = hf_hub::Cache::from_env();
    if let Some(path) = cache.model(repo.to_string()).get(file) {
        return Ok(Some(path));
    }
    if hub_offline() {
        // Offline, the cache is all there is: an uncached file counts as absent.
        return Ok(None);
    }
    let download_error = |message: String| EngineError::Download {
        repo: repo.into(),
        file: file.into(),
        message,
    };
    let api = hf_hub::api::sync::ApiBuilder::from_cache(cache)
        .with_progress(false)
        .build()
        .map_err(|e| download_error(e.to_string()))?;
    let api_repo = api.model(repo.to_string());
    let result = match progress {
        Some(callback) => api_repo.download_with_progress(
            file,
            HubProgress {
                file: file.to_string(),
                bytes_done: 0,
                bytes_total: 0,
                callback: callback.clone(),
            },
        ),
        None => api_repo.download(file),
    };
    match result {
        Ok(path) => Ok(Some(path)),
        Err(error) => {
            let message = error.to_string();
            if message.contains("404") {
                Ok(None)
            } else {
                Err(download_error(format!(
                    "{message} (offline? choose a local model folder instead)"
                )))
            }
        }
    }
}
