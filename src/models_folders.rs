//! The folders where artists keep their models, as A1111 (`models/Stable-diffusion`,
//! `models/Lora`, `models/VAE`, `embeddings`) and ComfyUI (`models/checkpoints`, `models/loras`,
//! `models/vae`, `models/embeddings`) lay them out: an artist points Atelier at the
//! installation they already have (its root or its `models` folder).

use std::path::{Path, PathBuf};

/// What a folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Single-file checkpoints.
    Checkpoint,
    /// LoRA and LyCORIS files.
    Lora,
    /// VAE files.
    Vae,
    /// Textual inversion embeddings.
    Embedding,
}

impl ModelKind {
    /// The folder names A1111 and ComfyUI give this kind.
    fn folder_names(self) -> &'static [&'static str] {
        match self {
            ModelKind::Checkpoint => &["Stable-diffusion", "checkpoints"],
            ModelKind::Lora => &["Lora", "LyCORIS", "loras"],
            ModelKind::Vae => &["VAE", "vae"],
            ModelKind::Embedding => &["embeddings"],
        }
    }
}

/// The folders of `kind` under `roots`: each root's `models/<name>` and `<name>` that exist; a
/// root with none of the known layouts' folders counts as a folder of every kind.
pub fn folders(roots: &[PathBuf], kind: ModelKind) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for root in roots {
        let known = |name: &str| [root.join("models").join(name), root.join(name)];
        let all_kinds = [
            ModelKind::Checkpoint,
            ModelKind::Lora,
            ModelKind::Vae,
            ModelKind::Embedding,
        ];
        let has_layout = all_kinds
            .iter()
            .flat_map(|k| k.folder_names())
            .flat_map(|name| known(name))
            .any(|p| p.is_dir());
        if !has_layout {
            if root.is_dir() {
                found.push(root.clone());
            }
            continue;
        }
        for name in kind.folder_names() {
            for candidate in known(name) {
                if candidate.is_dir() && !found.contains(&candidate) {
                    found.push(candidate);
                }
            }
        }
    }
    found
}

/// The `.safetensors` files in `folders` and their subfolders (four levels), sorted.
pub fn files(folders: &[PathBuf]) -> Vec<PathBuf> {
    fn walk(folder: &Path, depth: usize, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(folder) else {
            return;
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if path.is_dir() {
                if depth > 0 {
                    walk(&path, depth - 1, found);
                }
            } else if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
            {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    for folder in folders {
        walk(folder, 4, &mut found);
    }
    found
}

/// A1111's name for a LoRA or embedding file: its stem.
pub fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a1111_comfyui_and_plain_folders() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a1111 = dir.path().join("webui");
        std::fs::create_dir_all(a1111.join("models/Lora/styles")).expect("dirs");
        std::fs::create_dir_all(a1111.join("models/Stable-diffusion")).expect("dirs");
        std::fs::create_dir_all(a1111.join("embeddings")).expect("dirs");
        std::fs::write(a1111.join("models/Lora/styles/ink.safetensors"), b"x").expect("file");
        let comfy = dir.path().join("ComfyUI");
        std::fs::create_dir_all(comfy.join("models/loras")).expect("dirs");
        let plain = dir.path().join("my-loras");
        std::fs::create_dir_all(&plain).expect("dirs");
        let roots = vec![a1111.clone(), comfy.clone(), plain.clone()];
        assert_eq!(
            folders(&roots, ModelKind::Lora),
            vec![
                a1111.join("models/Lora"),
                comfy.join("models/loras"),
                plain.clone()
            ]
        );
        assert_eq!(
            folders(&roots, ModelKind::Embedding),
            vec![a1111.join("embeddings"), plain.clone()]
        );
        let loras = files(&folders(&roots, ModelKind::Lora));
        assert_eq!(
            loras,
            vec![a1111.join("models/Lora/styles/ink.safetensors")]
        );
        assert_eq!(stem(&loras[0]), "ink");
    }
}

/// A checkpoint found in a models folder.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointEntry {
    /// The file.
    pub path: PathBuf,
    /// Its path under the checkpoints folder (`styles/someModelXL_v9.safetensors`).
    pub name: String,
    /// Family, variant, type and size ("SDXL, inpainting, f16, …, 6.94 GB"), or why it cannot
    /// be read.
    pub summary: String,
    /// Whether Atelier runs it.
    pub runs: bool,
    /// A1111's AutoV2 hash, when one was computed before (the picker does not read whole files).
    pub hash: Option<String>,
}

/// What the models folders hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelsScan {
    /// LoRA names (file stems), sorted.
    pub loras: Vec<String>,
    /// Checkpoints, sorted by name.
    pub checkpoints: Vec<CheckpointEntry>,
    /// VAE files.
    pub vaes: Vec<PathBuf>,
}

/// Lists the LoRAs and checkpoints under `roots` (checkpoints read from their headers only).
pub fn scan(roots: &[PathBuf]) -> ModelsScan {
    let mut loras: Vec<String> = files(&folders(roots, ModelKind::Lora))
        .iter()
        .map(|path| stem(path))
        .collect();
    loras.sort_by_key(|n| n.to_lowercase());
    loras.dedup();
    let mut checkpoints = Vec::new();
    let hashes = crate::gallery::hash_cache::HashCache::open_default();
    for folder in folders(roots, ModelKind::Checkpoint) {
        for path in files(std::slice::from_ref(&folder)) {
            let name = path
                .strip_prefix(&folder)
                .unwrap_or(&path)
                .display()
                .to_string();
            let (summary, runs) = match crate::engine::checkpoint::inspect(&path) {
                Ok(info) => (info.summary(), info.family.runs()),
                Err(error) => (error.to_string(), false),
            };
            checkpoints.push(CheckpointEntry {
                hash: hashes.cached(&path),
                path,
                name,
                summary,
                runs,
            });
        }
    }
    checkpoints.sort_by_key(|c| c.name.to_lowercase());
    ModelsScan {
        loras,
        checkpoints,
        vaes: files(&folders(roots, ModelKind::Vae)),
    }
}
