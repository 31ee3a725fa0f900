//! "Atelier Shapes": the small model trained by `scripts/train_demo_model.py` that ships inside
//! Atelier, so that it draws something on a fresh machine without a download.
//!
//! The model is an ordinary diffusers folder (`assets/atelier-shapes`), loaded by the same code
//! as every other model. The binary carries its files; [`locate`] finds a copy beside the
//! executable (an installation that ships the folder) or writes the carried files once into
//! Atelier's data folder and returns that.

pub mod analyser;
pub mod validation;

use std::path::{Path, PathBuf};

use crate::engine::error::EngineError;
use crate::engine::source::ModelSource;

/// The model's name, as the window shows it.
pub const NAME: &str = "Atelier Shapes";
/// How settings and `--model` name the bundled model.
pub const MODEL_ID: &str = "Atelier Shapes";
/// The folder name of the model (beside the executable, in the data folder).
pub const FOLDER_NAME: &str = "atelier-shapes";
/// What the model draws and how to get a real one, for the window's first start.
pub const ABOUT: &str = "Atelier Shapes is the small model that comes with Atelier: it draws \
circles, squares, triangles, stars and rings in eleven colours (red, orange, yellow, green, blue, \
purple, pink, brown, black, white, gray), small or large, on plain, gradient or textured \
backgrounds, at 128x128 (where it puts them is still up to chance). Try \"a large yellow star \
on a blue background\". For real pictures, choose a Stable \
Diffusion model: a preset from the Hub (downloaded once), a diffusers folder or a checkpoint \
file you have (Folder…, File…), or your models folders in Settings.";

#[cfg(not(feature = "slim"))]
macro_rules! bundled {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/atelier-shapes/", $path)) as &[u8])),*]
    };
}

/// Every file of the model, by its path inside the folder (none in a `slim` build).
#[cfg(feature = "slim")]
pub const FILES: &[(&str, &[u8])] = &[];
/// Every file of the model, by its path inside the folder.
#[cfg(not(feature = "slim"))]
pub const FILES: &[(&str, &[u8])] = bundled!(
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "training.json",
);

/// Errors of finding or unpacking the bundled model.
#[derive(Debug, thiserror::Error)]
pub enum DemoModelError {
    /// No data folder is known on this system (no home directory).
    #[error("no data folder for Atelier on this system (is HOME set?)")]
    NoDataFolder,
    /// Writing the model's files failed.
    #[error("cannot unpack {NAME} into {path}: {source}")]
    Unpack {
        /// The folder it was written to.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The folder of the bundled model: `atelier-shapes` beside the executable (or in
/// `../share/atelier/` from it) when an installation ships it, else the carried files,
/// unpacked once into Atelier's data folder.
pub fn locate() -> Result<PathBuf, DemoModelError> {
    if let Some(folder) = beside_executable() {
        return Ok(folder);
    }
    let data = directories::ProjectDirs::from("", "", "atelier")
        .map(|dirs| dirs.data_dir().join("models"))
        .ok_or(DemoModelError::NoDataFolder)?;
    unpack_into(&data)
}

fn beside_executable() -> Option<PathBuf> {
    let executable = std::env::current_exe().ok()?;
    let folder = executable.parent()?;
    [
        folder.join(FOLDER_NAME),
        folder.join("../share/atelier").join(FOLDER_NAME),
    ]
    .into_iter()
    .find(|candidate| candidate.join("model_index.json").is_file())
}

/// A short fingerprint of the carried files (their sizes and a checksum), so that a newer
/// build replaces an older unpacked copy. Computed once per process.
pub fn fingerprint() -> &'static str {
    static FINGERPRINT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    FINGERPRINT.get_or_init(|| {
        let mut hasher = crc32fast::Hasher::new();
        for (path, bytes) in FILES {
            hasher.update(path.as_bytes());
            hasher.update(&(bytes.len() as u64).to_le_bytes());
            hasher.update(bytes);
        }
        format!("{:08x}", hasher.finalize())
    })
}

/// Writes the carried files into `parent/atelier-shapes` unless a copy with the same
/// fingerprint is there; returns the model's folder. The files are written into a temporary
/// folder first and renamed into place, so a crash never leaves half a model.
pub fn unpack_into(parent: &Path) -> Result<PathBuf, DemoModelError> {
    let folder = parent.join(FOLDER_NAME);
    let stamp = fingerprint();
    let stamp_path = folder.join(".atelier-fingerprint");
    if std::fs::read_to_string(&stamp_path).is_ok_and(|text| text.trim() == stamp) {
        return Ok(folder);
    }
    let unpack_error = |source| DemoModelError::Unpack {
        path: folder.clone(),
        source,
    };
    std::fs::create_dir_all(parent).map_err(unpack_error)?;
    let staging = parent.join(format!(".{FOLDER_NAME}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let write_all = || -> std::io::Result<()> {
        for (path, bytes) in FILES {
            let target = staging.join(path);
            if let Some(dir) = target.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&target, bytes)?;
        }
        std::fs::write(staging.join(".atelier-fingerprint"), stamp)
    };
    if let Err(error) = write_all() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(unpack_error(error));
    }
    // Replace an older copy (another process may have unpacked the same one meanwhile: then
    // theirs is as good as ours).
    let _ = std::fs::remove_dir_all(&folder);
    if let Err(error) = std::fs::rename(&staging, &folder) {
        let _ = std::fs::remove_dir_all(&staging);
        if std::fs::read_to_string(&stamp_path).is_ok_and(|text| text.trim() == stamp) {
            return Ok(folder);
        }
        return Err(unpack_error(error));
    }
    Ok(folder)
}

/// Whether `spec` (a model setting or `--model`) names the bundled model: "Atelier Shapes",
/// or "atelier-shapes" when no folder of that name is at hand.
pub fn is_model_id(spec: &str) -> bool {
    spec == MODEL_ID || (spec.eq_ignore_ascii_case(FOLDER_NAME) && !Path::new(spec).exists())
}

/// Where to load `spec` from: the bundled model's folder for its id, else what
/// [`ModelSource::parse`] makes of it.
pub fn model_source(spec: &str) -> Result<ModelSource, EngineError> {
    if !is_model_id(spec) {
        return ModelSource::parse(spec);
    }
    match locate() {
        Ok(folder) => Ok(ModelSource::Folder(folder)),
        Err(DemoModelError::NoDataFolder) => Err(EngineError::MissingFile {
            what: "a data folder to unpack Atelier Shapes into".into(),
            path: PathBuf::from("$XDG_DATA_HOME or $HOME"),
        }),
        Err(DemoModelError::Unpack { path, source }) => Err(EngineError::BadFile {
            path,
            message: format!("cannot unpack {NAME}: {source}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_carried_files_are_the_assets_folder() {
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/atelier-shapes");
        for (path, bytes) in FILES {
            let on_disk = std::fs::read(assets.join(path)).expect("asset file");
            assert!(on_disk == *bytes, "{path} differs");
        }
        let total: usize = FILES.iter().map(|(_, bytes)| bytes.len()).sum();
        assert!(total < 20_000_000, "the bundled model is {total} bytes");
    }

    #[test]
    fn unpacking_writes_every_file_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let folder = unpack_into(dir.path()).expect("unpacked");
        for (path, bytes) in FILES {
            assert_eq!(
                std::fs::read(folder.join(path)).expect("file").len(),
                bytes.len()
            );
        }
        // A second call keeps the copy (same fingerprint); a damaged copy is replaced.
        std::fs::write(folder.join("unet/config.json"), b"{}").expect("write");
        std::fs::write(folder.join(".atelier-fingerprint"), b"old").expect("write");
        let again = unpack_into(dir.path()).expect("unpacked again");
        assert_eq!(
            std::fs::read(again.join("unet/config.json")).expect("file"),
            FILES
                .iter()
                .find(|(p, _)| *p == "unet/config.json")
                .expect("config")
                .1
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}
