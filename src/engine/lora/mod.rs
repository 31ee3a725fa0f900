//! LoRA and LyCORIS networks as artists download them: kohya/A1111 (`lora_unet_*`, `lora_te*_`,
//! with `alpha`, conv LoRA on 3x3 convolutions), diffusers/PEFT (`lora_A`/`lora_B`), LyCORIS
//! LoHa and LoKr. A file is read into [`LoraFile`]; each module's weight change is computed by
//! [`LoraModule::delta`] and merged into the model by `StableDiffusion::set_loras`.

mod delta;
pub mod names;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::error::{EngineError, Result};

/// One module's trained weights.
#[derive(Debug, Clone)]
pub enum LoraKind {
    /// `up @ down` (kohya `lora_up`/`lora_down`, PEFT `lora_B`/`lora_A`), times alpha / rank.
    LowRank {
        /// `(rank, in)` or a convolution `(rank, in, kh, kw)`.
        down: Tensor,
        /// `(out, rank)` or `(out, rank, 1, 1)`.
        up: Tensor,
    },
    /// LoHa: `(w1a @ w1b) * (w2a @ w2b)`, times alpha / rank.
    LoHa {
        /// `(out, rank)`.
        w1a: Tensor,
        /// `(rank, in * kh * kw)`.
        w1b: Tensor,
        /// `(out, rank)`.
        w2a: Tensor,
        /// `(rank, in * kh * kw)`.
        w2b: Tensor,
    },
    /// LoKr: `kron(w1, w2)`, each factor whole or a low-rank product, times alpha / rank.
    LoKr {
        /// The small factor, whole.
        w1: Option<Tensor>,
        /// The small factor as `w1a @ w1b`.
        w1ab: Option<(Tensor, Tensor)>,
        /// The big factor, whole.
        w2: Option<Tensor>,
        /// The big factor as `w2a @ w2b`.
        w2ab: Option<(Tensor, Tensor)>,
    },
    /// A whole weight difference (LyCORIS "full").
    Full {
        /// The difference, the weight's shape.
        diff: Tensor,
    },
}

/// One module of a network: what it changes, by how much.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The module's name in the file (`lora_unet_down_blocks_0_..._to_q`, `unet.down_blocks.0...to_q`).
    pub key: String,
    /// Its weights.
    pub kind: LoraKind,
    /// Its `alpha` (the scale is alpha / rank); `None`: a scale of 1.
    pub alpha: Option<f64>,
}

/// A LoRA/LyCORIS file read into memory.
#[derive(Debug, Clone)]
pub struct LoraFile {
    /// The name A1111's `<lora:name:weight>` uses: the file's stem.
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its modules.
    pub modules: Vec<LoraModule>,
    /// Keys of the file that belong to no module Atelier understands (reported, never silent).
    pub unknown_keys: Vec<String>,
    /// A1111's short hash for `Lora hashes` (the first 12 hex digits of the SHA-256 of the
    /// tensor data after the header, kohya's "addnet" hash); empty when built in memory.
    pub hash: String,
}

/// The "addnet" hash of a safetensors file: SHA-256 of everything after the header, 12 hex.
pub fn addnet_hash(path: &Path) -> Result<String> {
    use sha2::Digest;
    use std::io::{Read, Seek, SeekFrom};
    let io = |e: std::io::Error| EngineError::bad_file(path, e);
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io)?;
    file.seek(SeekFrom::Start(8 + u64::from_le_bytes(length)))
        .map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize())[..12].to_string())
}

/// Suffixes of a module's tensors, longest first so that `.lora_down.weight` wins over `.weight`.
const SUFFIXES: &[&str] = &[
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_mid.weight",
    ".lora.down.weight",
    ".lora.up.weight",
    "_lora.down.weight",
    "_lora.up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".hada_t1",
    ".hada_t2",
    ".lokr_w1_a",
    ".lokr_w1_b",
    ".lokr_w2_a",
    ".lokr_w2_b",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_t2",
    ".dora_scale",
    ".diff_b",
    ".diff",
    ".alpha",
];

impl LoraFile {
    /// Reads a `.safetensors` LoRA, LoCon, LoHa or LoKr file (pickles refused).
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(refused) = super::checkpoint::refuse_pickle(path) {
            return Err(refused);
        }
        if !path.is_file() {
            return Err(EngineError::MissingFile {
                what: "LoRA".into(),
                path: path.to_path_buf(),
            });
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| EngineError::bad_file(path, e))?;
        let mut file = Self::from_tensors(path, tensors)?;
        file.hash = addnet_hash(path)?;
        Ok(file)
    }

    /// Groups a file's tensors into modules.
    pub fn from_tensors(
        path: &Path,
        tensors: std::collections::HashMap<String, Tensor>,
    ) -> Result<Self> {
        let mut grouped: BTreeMap<String, BTreeMap<&'static str, Tensor>> = BTreeMap::new();
        let mut unknown_keys = Vec::new();
        for (key, tensor) in tensors {
            match SUFFIXES.iter().find(|suffix| key.ends_with(*suffix)) {
                Some(suffix) => {
                    let module = key[..key.len() - suffix.len()].to_string();
                    grouped.entry(module).or_default().insert(suffix, tensor);
                }
                None => unknown_keys.push(key),
            }
        }
        let bad = |message: String| EngineError::bad_file(path, message);
        let mut modules = Vec::new();
        for (key, mut parts) in grouped {
            let alpha = match parts.remove(".alpha") {
                Some(alpha) => Some(
                    alpha
                        .flatten_all()?
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?
                        .first()
                        .copied()
                        .ok_or_else(|| bad(format!("{key}.alpha is empty")))?,
                ),
                None => None,
            };
            let is_lokr = parts.keys().any(|s| s.starts_with(".lokr_"));
            let mut take = |suffix: &str| parts.remove(suffix);
            let kind = if let (Some(down), Some(up)) = (
                take(".lora_down.weight")
                    .or_else(|| take(".lora.down.weight"))
                    .or_else(|| take("_lora.down.weight"))
                    .or_else(|| take(".lora_A.weight")),
                take(".lora_up.weight")
                    .or_else(|| take(".lora.up.weight"))
                    .or_else(|| take("_lora.up.weight"))
                    .or_else(|| take(".lora_B.weight")),
            ) {
                LoraKind::LowRank { down, up }
            } else if let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
                take(".hada_w1_a"),
                take(".hada_w1_b"),
                take(".hada_w2_a"),
                take(".hada_w2_b"),
            ) {
                LoraKind::LoHa { w1a, w1b, w2a, w2b }
            } else if is_lokr {
                let pair = |a: Option<Tensor>, b: Option<Tensor>| a.zip(b);
                let w1 = take(".lokr_w1");
                let w1ab = pair(take(".lokr_w1_a"), take(".lokr_w1_b"));
                let w2 = take(".lokr_w2");
                let w2ab = pair(take(".lokr_w2_a"), take(".lokr_w2_b"));
                if w1.is_none() && w1ab.is_none() || w2.is_none() && w2ab.is_none() {
                    unknown_keys.push(format!("{key} (an incomplete LoKr module)"));
                    continue;
                }
                LoraKind::LoKr { w1, w1ab, w2, w2ab }
            } else if let Some(diff) = take(".diff") {
                LoraKind::Full { diff }
            } else {
                let found: Vec<&str> = parts.keys().copied().collect();
                unknown_keys.push(format!("{key} ({})", found.join(", ")));
                continue;
            };
            // What is left belongs to variants Atelier does not apply (Tucker cores, DoRA).
            for suffix in parts.keys() {
                unknown_keys.push(format!("{key}{suffix} (not supported: ignored)"));
            }
            modules.push(LoraModule { key, kind, alpha });
        }
        if modules.is_empty() {
            return Err(bad(
                "not a LoRA: no lora_down/lora_up, lora_A/lora_B, LoHa or LoKr weights".into(),
            ));
        }
        unknown_keys.sort();
        Ok(Self {
            name: path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: path.to_path_buf(),
            modules,
            unknown_keys,
            hash: String::new(),
        })
    }
}

/// A LoRA and the strength it is applied at (A1111's `<lora:name:weight>`).
#[derive(Debug, Clone)]
pub struct LoraWeight {
    /// The network.
    pub file: std::sync::Arc<LoraFile>,
    /// Multiplier of its UNet part (negative allowed).
    pub weight: f64,
    /// Multiplier of its text encoder part.
    pub text_encoder_weight: f64,
}

impl LoraWeight {
    /// `file` at `weight` for both parts.
    pub fn new(file: std::sync::Arc<LoraFile>, weight: f64) -> Self {
        Self {
            file,
            weight,
            text_encoder_weight: weight,
        }
    }
}

/// What applying a set of LoRAs did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoraReport {
    /// Per LoRA: its name and how many of the model's weights it changed.
    pub applied: Vec<(String, usize)>,
    /// What did not apply: keys that match nothing, unsupported parts.
    pub warnings: Vec<String>,
}

/// The LoRAs merged into a model now, and the original values of the weights they changed.
#[derive(Debug, Default)]
pub struct AppliedLoras {
    /// `(file, UNet weight, text encoder weight)` of each, in order.
    pub active: Vec<(PathBuf, f64, f64)>,
    /// Weight name to its value before any LoRA (on the model's device).
    pub originals: std::collections::HashMap<String, Tensor>,
}

/// Up to `n` examples from `items`, joined, with the total when there are more.
pub(crate) fn examples(items: &[String], n: usize) -> String {
    let shown: Vec<&str> = items.iter().take(n).map(String::as_str).collect();
    if items.len() > n {
        format!("{}, … ({} in all)", shown.join(", "), items.len())
    } else {
        shown.join(", ")
    }
}

/// Finds `name`'s file (`name.safetensors`, A1111's file-stem rule) in `folders` and their
/// subfolders (four levels at most); `name` may hold a subfolder (`styles/ink`).
pub fn find(name: &str, folders: &[PathBuf]) -> Option<PathBuf> {
    fn search(folder: &Path, name: &str, depth: usize) -> Option<PathBuf> {
        let direct = folder.join(format!("{name}.safetensors"));
        if direct.is_file() {
            return Some(direct);
        }
        if depth == 0 {
            return None;
        }
        let mut subfolders: Vec<PathBuf> = std::fs::read_dir(folder)
            .ok()?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.is_dir())
            .collect();
        subfolders.sort();
        subfolders
            .iter()
            .find_map(|sub| search(sub, name, depth - 1))
    }
    folders.iter().find_map(|folder| search(folder, name, 4))
}

/// LoRA files read once and kept while they do not change on disk.
#[derive(Debug, Default)]
pub struct LoraCache {
    files: super::file_cache::FileCache<LoraFile>,
}

impl LoraCache {
    /// The file at `path`, read unless the copy in the cache is current.
    pub fn get(&mut self, path: &Path) -> Result<std::sync::Arc<LoraFile>> {
        self.files.get(path, LoraFile::open)
    }

    /// The LoRAs a job asks for: `explicit` ones (`--lora FILE:WEIGHT`) and the prompt's
    /// `<lora:name:w>` tags, found in `folders`; names that are not found are warnings (A1111
    /// goes on without them), a malformed tag or an unreadable file is an error.
    pub fn resolve(
        &mut self,
        prompt: &str,
        folders: &[PathBuf],
        explicit: &[(PathBuf, f64)],
    ) -> Result<(Vec<LoraWeight>, Vec<String>)> {
        let mut loras = Vec::new();
        let mut warnings = Vec::new();
        for (path, weight) in explicit {
            loras.push(LoraWeight::new(self.get(path)?, *weight));
        }
        let tags =
            super::extra_networks::lora_tags(prompt).map_err(EngineError::InvalidParameter)?;
        for tag in tags {
            match find(&tag.name, folders) {
                Some(path) => loras.push(LoraWeight {
                    file: self.get(&path)?,
                    weight: tag.unet_weight,
                    text_encoder_weight: tag.text_encoder_weight,
                }),
                None if folders.is_empty() => warnings.push(format!(
                    "<lora:{}>: no LoRA folder is set, so the tag was ignored",
                    tag.name
                )),
                None => warnings.push(format!(
                    "<lora:{}>: no {}.safetensors in {}; the tag was ignored",
                    tag.name,
                    tag.name,
                    folders
                        .iter()
                        .map(|f| f.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        }
        Ok((loras, warnings))
    }
}
