//! Single-file checkpoints as artists download them (the original CompVis/A1111 layout in one
//! `.safetensors`): what a file is, read from its header alone (keys and tensor shapes, as
//! diffusers' single-file loader tells them apart), without reading the weights; the key map
//! ([`keys`]) and the architecture ([`architecture`]) that load them, and the sidecar config
//! ([`original_config`]).

use std::io::Read;
use std::path::Path;

use serde_json::Value;

use super::error::{EngineError, Result};

pub mod architecture;
pub mod keys;
pub mod original_config;

/// The largest safetensors header read (a real checkpoint's is a few hundred KiB).
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// The model family a checkpoint holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFamily {
    /// Stable Diffusion 1.x (CLIP ViT-L, 768-wide cross-attention).
    Sd1,
    /// Stable Diffusion 2.x (OpenCLIP ViT-H, 1024-wide cross-attention).
    Sd2,
    /// SDXL base (CLIP ViT-L and OpenCLIP bigG).
    Sdxl,
    /// The SDXL refiner (OpenCLIP bigG only).
    SdxlRefiner,
    /// Stable Diffusion 3 (an MMDiT; Atelier does not run it).
    Sd3,
    /// FLUX (Atelier does not run it).
    Flux,
    /// None of the above: a VAE, a LoRA, an embedding, or another architecture.
    Unknown,
}

impl CheckpointFamily {
    /// Whether Atelier runs checkpoints of this family.
    pub fn runs(self) -> bool {
        matches!(
            self,
            CheckpointFamily::Sd1
                | CheckpointFamily::Sd2
                | CheckpointFamily::Sdxl
                | CheckpointFamily::SdxlRefiner
        )
    }

    /// The name artists know.
    pub fn display_name(self) -> &'static str {
        match self {
            CheckpointFamily::Sd1 => "SD 1.x",
            CheckpointFamily::Sd2 => "SD 2.x",
            CheckpointFamily::Sdxl => "SDXL",
            CheckpointFamily::SdxlRefiner => "SDXL refiner",
            CheckpointFamily::Sd3 => "SD 3",
            CheckpointFamily::Flux => "FLUX",
            CheckpointFamily::Unknown => "not a Stable Diffusion checkpoint",
        }
    }
}

/// What a checkpoint's header says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// The family.
    pub family: CheckpointFamily,
    /// A 9-channel inpainting UNet.
    pub inpainting: bool,
    /// The cross-attention width (768, 1024, 2048, 1280), when the UNet has one.
    pub context_width: Option<usize>,
    /// Whether the model predicts v: from the sidecar `.yaml` beside the file (A1111's
    /// convention, `parameterization: "v"`), else `Some(true)` for SDXL's `v_pred` marker;
    /// `None` when nothing says (the weights do not tell).
    pub v_prediction: Option<bool>,
    /// Whether the VAE is baked in.
    pub has_vae: bool,
    /// Whether the text encoders are baked in.
    pub has_text_encoders: bool,
    /// Whether EMA weights are there too.
    pub has_ema: bool,
    /// The UNet's weights' type (`F16`, `F32`, `BF16`), when there is a UNet.
    pub dtype: Option<String>,
    /// Tensors in the file.
    pub tensor_count: usize,
    /// The file's size in bytes.
    pub file_bytes: u64,
}

impl CheckpointInfo {
    /// "SDXL, inpainting, f16, VAE and text encoders baked in, 6.94 GB".
    pub fn summary(&self) -> String {
        let mut parts = vec![self.family.display_name().to_string()];
        if self.inpainting {
            parts.push("inpainting".into());
        }
        if self.v_prediction == Some(true) {
            parts.push("v-prediction".into());
        }
        if let Some(dtype) = &self.dtype {
            parts.push(dtype.to_lowercase());
        }
        parts.push(
            match (self.has_vae, self.has_text_encoders) {
                (true, true) => "VAE and text encoders baked in",
                (true, false) => "VAE baked in, no text encoders",
                (false, true) => "text encoders baked in, no VAE",
                (false, false) => "UNet only",
            }
            .into(),
        );
        if self.has_ema {
            parts.push("with EMA weights".into());
        }
        parts.push(format!("{:.2} GB", self.file_bytes as f64 / 1e9));
        parts.join(", ")
    }
}

/// Refuses pickle files (`.ckpt`, `.pt`, `.bin`, `.pth`) with the reason and the way out.
pub fn refuse_pickle(path: &Path) -> Option<EngineError> {
    let extension = path.extension()?.to_str()?.to_ascii_lowercase();
    matches!(extension.as_str(), "ckpt" | "pt" | "pth" | "bin").then(|| {
        EngineError::Unsupported(format!(
            "{} is a Python pickle: loading one can run arbitrary code, so Atelier does not. \
             Download the .safetensors version of the model, or convert this file once with a \
             trusted tool (A1111's or diffusers' converter) in a sandbox",
            path.display()
        ))
    })
}

/// Reads a `.safetensors` file's header (bounded) and tells what the file holds.
pub fn inspect(path: &Path) -> Result<CheckpointInfo> {
    if let Some(refusal) = refuse_pickle(path) {
        return Err(refusal);
    }
    let bad = |why: String| EngineError::BadFile {
        path: path.to_path_buf(),
        message: why,
    };
    let mut file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let file_bytes = file.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length)
        .map_err(|_| bad("not a safetensors file (too short)".into()))?;
    let header_bytes = u64::from_le_bytes(length);
    if header_bytes > MAX_HEADER_BYTES || header_bytes + 8 > file_bytes {
        return Err(bad(format!(
            "not a safetensors file (a header of {header_bytes} bytes in a file of {file_bytes})"
        )));
    }
    let mut header = vec![0u8; header_bytes as usize];
    file.read_exact(&mut header)
        .map_err(|e| bad(e.to_string()))?;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
    let mut info = classify(&header, file_bytes);
    if let Some(v_prediction) = sidecar_v_prediction(path) {
        info.v_prediction = Some(v_prediction);
    }
    Ok(info)
}

/// What the original inference config beside a checkpoint (`model.yaml` for
/// `model.safetensors`, A1111's convention) says of the prediction; `None` without a sidecar, a
/// readable one, or the key.
pub fn sidecar_v_prediction(path: &Path) -> Option<bool> {
    original_config::OriginalConfig::beside(path)
        .ok()?
        .v_prediction
}

/// Tells the family and variant from a header's keys and shapes.
pub fn classify(header: &serde_json::Map<String, Value>, file_bytes: u64) -> CheckpointInfo {
    let has = |key: &str| header.contains_key(key);
    let any_prefix = |prefix: &str| header.keys().any(|k| k.starts_with(prefix));
    let shape = |key: &str| -> Option<Vec<usize>> {
        header.get(key)?["shape"]
            .as_array()?
            .iter()
            .map(|v| v.as_u64().map(|n| n as usize))
            .collect()
    };
    const UNET: &str = "model.diffusion_model.";
    let conv_in = format!("{UNET}input_blocks.0.0.weight");
    let context_width = header
        .iter()
        .filter(|(key, _)| key.starts_with(UNET) && key.ends_with(".attn2.to_k.weight"))
        .filter_map(|(key, _)| shape(key)?.get(1).copied())
        .next();
    let open_clip = |index: usize| {
        has(&format!(
            "conditioner.embedders.{index}.model.transformer.resblocks.0.attn.in_proj_weight"
        ))
    };
    let family = if header.keys().any(|k| k.contains("joint_blocks.0.")) {
        CheckpointFamily::Sd3
    } else if header
        .keys()
        .any(|k| k.contains("double_blocks.0.img_attn"))
    {
        CheckpointFamily::Flux
    } else if open_clip(1)
        || has(&format!("{UNET}label_emb.0.0.weight")) && context_width == Some(2048)
    {
        CheckpointFamily::Sdxl
    } else if open_clip(0)
        || has(&format!("{UNET}label_emb.0.0.weight")) && context_width == Some(1280)
    {
        CheckpointFamily::SdxlRefiner
    } else if any_prefix("cond_stage_model.model.transformer.") || context_width == Some(1024) {
        CheckpointFamily::Sd2
    } else if any_prefix("cond_stage_model.transformer.") || context_width == Some(768) {
        CheckpointFamily::Sd1
    } else {
        CheckpointFamily::Unknown
    };
    CheckpointInfo {
        family,
        inpainting: shape(&conv_in).is_some_and(|s| s.get(1) == Some(&9)),
        context_width,
        v_prediction: has("v_pred").then_some(true),
        has_vae: any_prefix("first_stage_model."),
        has_text_encoders: any_prefix("cond_stage_model.") || any_prefix("conditioner.embedders."),
        has_ema: any_prefix("model_ema."),
        dtype: header
            .get(&conv_in)
            .and_then(|t| t["dtype"].as_str())
            .map(str::to_string),
        tensor_count: header.keys().filter(|k| *k != "__metadata__").count(),
        file_bytes,
    }
}
