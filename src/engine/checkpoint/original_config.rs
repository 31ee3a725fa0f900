//! The original inference config beside a checkpoint (`model.yaml` for `model.safetensors`,
//! A1111's convention): the CompVis (`unet_config`, `cond_stage_config`) or SGM
//! (`network_config`, `conditioner_config`, `denoiser_config`) YAML. Atelier reads what the
//! weights cannot tell: the prediction type, head counts, the noise schedule, the VAE's scale.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use crate::engine::error::{EngineError, Result};

/// What a sidecar config says; every field is `None` where it is silent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OriginalConfig {
    /// The file read.
    pub path: Option<PathBuf>,
    /// `parameterization: "v"` (CompVis) or a `VScaling` denoiser (SGM): `Some(true)`;
    /// `"eps"` or `EpsScaling`: `Some(false)`.
    pub v_prediction: Option<bool>,
    /// First beta (`linear_start`).
    pub linear_start: Option<f64>,
    /// Last beta (`linear_end`).
    pub linear_end: Option<f64>,
    /// Training steps (`timesteps`).
    pub timesteps: Option<usize>,
    /// The VAE's latent scale (`scale_factor`).
    pub scale_factor: Option<f64>,
    /// Heads of every attention block (`num_heads`, SD 1.x).
    pub num_heads: Option<usize>,
    /// Channels per head (`num_head_channels`, SD 2.x and SDXL).
    pub num_head_channels: Option<usize>,
    /// Which hidden state the (first) text encoder hands on: `last` or `penultimate`.
    pub text_layer: Option<String>,
    /// The family its text conditioning names (`FrozenCLIPEmbedder`: SD 1.x,
    /// `FrozenOpenCLIPEmbedder`: SD 2.x, an SGM conditioner with CLIP-L and OpenCLIP: SDXL, with
    /// OpenCLIP alone: the refiner), for files whose keys cannot tell (no text encoders inside).
    pub family: Option<super::CheckpointFamily>,
    /// Width of each of SDXL's size/crop embeddings (`outdim` of the conditioner's
    /// timestep embedders).
    pub time_id_width: Option<usize>,
}

/// Numbers in these configs are integers or floats; a missing key or `-1` means "not set".
fn number(yaml: &Yaml) -> Option<f64> {
    match yaml {
        Yaml::Integer(n) => Some(*n as f64),
        Yaml::Real(_) => yaml.as_f64(),
        Yaml::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn positive(yaml: &Yaml) -> Option<usize> {
    number(yaml).filter(|n| *n >= 1.0).map(|n| n as usize)
}

impl OriginalConfig {
    /// The sidecar of `checkpoint` (same stem, `.yaml`), if there is one.
    pub fn beside(checkpoint: &Path) -> Result<Self> {
        let path = checkpoint.with_extension("yaml");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::bad_file(&path, e))?;
        let mut config = Self::parse(&text).map_err(|e| EngineError::bad_file(&path, e))?;
        config.path = Some(path);
        Ok(config)
    }

    /// Reads the YAML text of an original config.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let documents = YamlLoader::load_from_str(text).map_err(|e| e.to_string())?;
        let Some(root) = documents.first() else {
            return Ok(Self::default());
        };
        let params = &root["model"]["params"];
        let unet = match &params["unet_config"]["params"] {
            Yaml::BadValue => &params["network_config"]["params"],
            found => found,
        };
        let v_from_denoiser = params["denoiser_config"]["params"]["scaling_config"]["target"]
            .as_str()
            .map(|target| target.ends_with("VScaling"));
        let v_from_parameterization = params["parameterization"]
            .as_str()
            .map(|p| p.trim().eq_ignore_ascii_case("v"));
        let embedders = params["conditioner_config"]["params"]["emb_models"]
            .as_vec()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let text_layer = params["cond_stage_config"]["params"]["layer"]
            .as_str()
            .map(str::to_string);
        let targets: Vec<&str> = embedders
            .iter()
            .filter_map(|e| e["target"].as_str())
            .collect();
        let family = match params["cond_stage_config"]["target"].as_str() {
            Some(t) if t.ends_with("FrozenOpenCLIPEmbedder") => Some(super::CheckpointFamily::Sd2),
            Some(t) if t.ends_with("FrozenCLIPEmbedder") => Some(super::CheckpointFamily::Sd1),
            _ if targets.iter().any(|t| t.ends_with("FrozenCLIPEmbedder")) => {
                Some(super::CheckpointFamily::Sdxl)
            }
            _ if targets
                .iter()
                .any(|t| t.ends_with("FrozenOpenCLIPEmbedder2")) =>
            {
                Some(super::CheckpointFamily::SdxlRefiner)
            }
            _ if !matches!(params["network_config"], Yaml::BadValue) => {
                Some(super::CheckpointFamily::Sdxl)
            }
            _ => None,
        };
        Ok(Self {
            path: None,
            v_prediction: v_from_parameterization.or(v_from_denoiser),
            linear_start: number(&params["linear_start"]),
            linear_end: number(&params["linear_end"]),
            timesteps: positive(&params["timesteps"]),
            scale_factor: number(&params["scale_factor"]),
            num_heads: positive(&unet["num_heads"]),
            num_head_channels: positive(&unet["num_head_channels"]),
            text_layer,
            family,
            time_id_width: embedders
                .iter()
                .find_map(|embedder| positive(&embedder["params"]["outdim"])),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compvis_sd2_v_config() {
        let text = r#"
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        image_size: 32 # unused
        num_head_channels: 64 # need to fix for flash-attn
        num_heads: -1
        context_dim: 1024
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"#;
        let config = OriginalConfig::parse(text).expect("parses");
        assert_eq!(config.v_prediction, Some(true));
        assert_eq!(config.linear_end, Some(0.012));
        assert_eq!(config.timesteps, Some(1000));
        assert_eq!(config.num_head_channels, Some(64));
        assert_eq!(config.num_heads, None, "-1 means unset");
        assert_eq!(config.text_layer.as_deref(), Some("penultimate"));
        assert_eq!(
            config.family,
            Some(crate::engine::checkpoint::CheckpointFamily::Sd2)
        );
    }

    #[test]
    fn sgm_sdxl_config() {
        let text = r#"
model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling
    network_config:
      target: sgm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        adm_in_channels: 2816
        num_head_channels: 64
        transformer_depth: [0, 2, 10]
    conditioner_config:
      params:
        emb_models:
          - is_trainable: False
            input_key: txt
            target: sgm.modules.encoders.modules.FrozenCLIPEmbedder
            params:
              layer: hidden
              layer_idx: 11
          - is_trainable: False
            input_key: original_size_as_tuple
            target: sgm.modules.encoders.modules.ConcatTimestepEmbedderND
            params:
              outdim: 256
"#;
        let config = OriginalConfig::parse(text).expect("parses");
        assert_eq!(config.v_prediction, Some(false));
        assert_eq!(config.scale_factor, Some(0.13025));
        assert_eq!(config.num_head_channels, Some(64));
        assert_eq!(config.time_id_width, Some(256));
        assert_eq!(
            config.family,
            Some(crate::engine::checkpoint::CheckpointFamily::Sdxl)
        );
    }

    #[test]
    fn broken_yaml_is_an_error_and_empty_yaml_says_nothing() {
        assert!(OriginalConfig::parse("model: [unclosed").is_err());
        assert_eq!(
            OriginalConfig::parse("").expect("empty"),
            OriginalConfig::default()
        );
    }
}
