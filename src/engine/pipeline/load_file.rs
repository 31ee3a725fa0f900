//! Loading a single-file checkpoint (the original CompVis/SGM layout that A1111 and ComfyUI
//! read) and VAE overrides: configs from the tensors' shapes and the sidecar `.yaml`, weights
//! memory-mapped and served under diffusers' names.

use std::path::Path;

use candle_core::DType;

use super::LoadOptions;
use super::load::{ModelSpec, TextEncoderSpec, read_json};
use crate::engine::checkpoint::architecture::{self, SingleFilePlan};
use crate::engine::checkpoint::original_config::OriginalConfig;
use crate::engine::checkpoint::{self, CheckpointFamily, CheckpointInfo};
use crate::engine::config::{SchedulerConfig, VaeConfig};
use crate::engine::error::{EngineError, Result};
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::weights::{ComponentWeights, MappedFile};
use crate::schedulers::Prediction;

/// The SD 2.x block whose norm bias tells v models from epsilon ones (ComfyUI's heuristic).
const SD2_V_PROBE: &str =
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";

/// Whether a checkpoint predicts v, when neither the override, the sidecar nor a `v_pred` key
/// says: ComfyUI's test for SD 2.x (a spread-out norm bias in the last attention block of
/// 768-v models; SD 2.x inpainting models are epsilon), epsilon otherwise.
fn detect_v_prediction(
    file: &MappedFile,
    shapes: &architecture::Shapes,
    info: &CheckpointInfo,
) -> Result<bool> {
    if info.family != CheckpointFamily::Sd2 || info.inpainting {
        return Ok(false);
    }
    if !shapes.contains_key(SD2_V_PROBE) {
        return Ok(false);
    }
    let bias = file.load(SD2_V_PROBE)?.to_dtype(DType::F32)?;
    // The population standard deviation (torch.std(unbiased=False)).
    let variance = bias
        .broadcast_sub(&bias.mean_all()?)?
        .sqr()?
        .mean_all()?
        .to_scalar::<f32>()?;
    Ok(variance.sqrt() > 0.09)
}

/// Describes a single-file checkpoint: every component's config from its shapes.
pub(super) fn describe(path: &Path, options: &LoadOptions) -> Result<ModelSpec> {
    if let Some(refused) = checkpoint::refuse_pickle(path) {
        return Err(refused);
    }
    let original = OriginalConfig::beside(path)?;
    let mut info = checkpoint::inspect(path)?;
    if info.family == CheckpointFamily::Unknown
        && info.context_width.is_some()
        && let Some(family) = original.family
    {
        // A UNet without its text encoders: the sidecar says the family.
        info.family = family;
    }
    if !info.family.runs() {
        return Err(EngineError::Unsupported(format!(
            "{} is {}; Atelier runs SD 1.x, SD 2.x and SDXL checkpoints",
            path.display(),
            info.summary()
        )));
    }
    let file = MappedFile::open(path)?;
    let (shapes, keys) = file.shapes_and_keys();
    let v_prediction = match options.overrides.prediction {
        Some(prediction) => prediction == Prediction::VPrediction,
        None => match original.v_prediction.or(info.v_prediction) {
            Some(v) => v,
            None => detect_v_prediction(&file, &shapes, &info)?,
        },
    };
    info.v_prediction = Some(v_prediction);
    let baked = architecture::text_encoders(&keys, &shapes, info.family, &original)
        .map_err(|message| EngineError::bad_file(path, message))?;
    let external = match (baked.is_empty(), &options.overrides.text_encoders) {
        (false, _) => None,
        (true, Some(source)) => Some(text_encoders_from(source, info.family, options)?),
        (true, None) => {
            return Err(EngineError::Unsupported(format!(
                "{} has no text encoders baked in: choose where {} text encoders come from \
                 (a diffusers folder or a checkpoint of the same family: --text-encoders, or \
                 Model options -> Text encoders in the window)",
                path.display(),
                info.family.display_name()
            )));
        }
    };
    let pooled_width = external.as_ref().and_then(|specs| {
        specs
            .last()
            .map(|s| s.config.projection_dim.unwrap_or(s.config.hidden_size))
    });
    let plan: SingleFilePlan =
        architecture::plan(&keys, &shapes, &info, &original, baked, pooled_width)
            .map_err(|message| EngineError::bad_file(path, message))?;

    let text_encoders = match external {
        Some(specs) => specs,
        None => encoder_specs(plan.text_encoders, &file)?,
    };
    let vae = match plan.vae {
        Some((config, keys)) => (
            config,
            ComponentWeights::Renamed {
                file: file.clone(),
                keys: keys.into(),
            },
        ),
        None if options.overrides.vae.is_some() => {
            // Replaced by the override before anything is built; its scale is the model's.
            let scale = architecture::scaling_factor(info.family, &original);
            let placeholder: VaeConfig = serde_json::from_value(serde_json::json!({
                "scaling_factor": scale
            }))
            .map_err(|e| EngineError::bad_file(path, e))?;
            (placeholder, ComponentWeights::File(path.to_path_buf()))
        }
        None => {
            return Err(EngineError::Unsupported(format!(
                "{} has no VAE baked in: choose a VAE for it (--vae, or the model's VAE setting)",
                path.display()
            )));
        }
    };
    let mut scheduler_config = SchedulerConfig::sd15();
    scheduler_config.beta_start = original.linear_start.or(scheduler_config.beta_start);
    scheduler_config.beta_end = original.linear_end.or(scheduler_config.beta_end);
    scheduler_config.num_train_timesteps =
        original.timesteps.or(scheduler_config.num_train_timesteps);
    scheduler_config.prediction_type = Some(
        match v_prediction {
            true => Prediction::VPrediction,
            false => Prediction::Epsilon,
        }
        .config_name()
        .into(),
    );
    Ok(ModelSpec {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
        text_encoders,
        unet: (
            plan.unet,
            ComponentWeights::Renamed {
                file,
                keys: plan.unet_keys.into(),
            },
        ),
        vae,
        scheduler_config,
        // SDXL base zeroes an empty negative prompt (its diffusers repo and A1111 both do).
        force_zeros_for_empty_prompt: info.family == CheckpointFamily::Sdxl,
    })
}

/// The text encoders of one single file, read from it under transformers' names.
fn encoder_specs(
    plans: Vec<architecture::TextEncoderPlan>,
    file: &MappedFile,
) -> Result<Vec<TextEncoderSpec>> {
    plans
        .into_iter()
        .zip(["text_encoder", "text_encoder_2"])
        .map(|(encoder, name)| {
            Ok(TextEncoderSpec {
                name,
                config: encoder.config,
                weights: ComponentWeights::Renamed {
                    file: file.clone(),
                    keys: encoder.keys.into(),
                },
                tokenizer: ClipTokenizer::bundled(encoder.pad_token)?,
            })
        })
        .collect()
}

/// The text encoders of `source` for a UNet-only file of `family`: a diffusers folder's, or
/// those baked into another single file of the same family.
fn text_encoders_from(
    source: &Path,
    family: CheckpointFamily,
    options: &LoadOptions,
) -> Result<Vec<TextEncoderSpec>> {
    if source.is_dir() {
        let files = crate::engine::source::ModelFiles::new(
            crate::engine::source::ModelSource::Folder(source.to_path_buf()),
            None,
        );
        let index: crate::engine::config::ModelIndex = match files.optional("model_index.json")? {
            Some(path) => read_json(&path)?,
            None => Default::default(),
        };
        let dtype = options
            .dtype
            .unwrap_or_else(|| super::default_dtype(&options.device));
        return super::load::diffusers_text_encoders(&files, &index, dtype != DType::F32);
    }
    if let Some(refused) = checkpoint::refuse_pickle(source) {
        return Err(refused);
    }
    let info = checkpoint::inspect(source)?;
    if info.family != family {
        return Err(EngineError::Unsupported(format!(
            "{} is {}, not {}: its text encoders do not fit",
            source.display(),
            info.family.display_name(),
            family.display_name()
        )));
    }
    let original = OriginalConfig::beside(source)?;
    let file = MappedFile::open(source)?;
    let (shapes, keys) = file.shapes_and_keys();
    let plans = architecture::text_encoders(&keys, &shapes, family, &original)
        .map_err(|message| EngineError::bad_file(source, message))?;
    if plans.is_empty() {
        return Err(EngineError::bad_file(
            source,
            "it has no text encoders either",
        ));
    }
    encoder_specs(plans, &file)
}

/// A VAE chosen in place of the model's: a diffusers VAE folder (`config.json` and weights),
/// or a single `.safetensors` file in the original layout (vae-ft-mse, sdxl-vae-fp16-fix, ...),
/// whose latents are scaled by the model's `scaling_factor`.
pub(super) fn vae_override(
    path: &Path,
    scaling_factor: f64,
) -> Result<(VaeConfig, ComponentWeights)> {
    if path.is_dir() {
        let config: VaeConfig = read_json(&path.join("config.json"))?;
        for name in [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ] {
            let weights = path.join(name);
            if weights.is_file() {
                return Ok((config, ComponentWeights::File(weights)));
            }
        }
        return Err(EngineError::MissingFile {
            what: "VAE weights (diffusion_pytorch_model.safetensors)".into(),
            path: path.join("diffusion_pytorch_model.safetensors"),
        });
    }
    if !path.is_file() {
        return Err(EngineError::MissingFile {
            what: "VAE".into(),
            path: path.to_path_buf(),
        });
    }
    if let Some(refused) = checkpoint::refuse_pickle(path) {
        return Err(refused);
    }
    let file = MappedFile::open(path)?;
    let (shapes, keys) = file.shapes_and_keys();
    // A VAE file has bare keys; a whole checkpoint given as a VAE has them under its prefix.
    let prefix = ["", "first_stage_model.", "vae."]
        .into_iter()
        .find(|prefix| shapes.contains_key(&format!("{prefix}encoder.conv_in.weight")))
        .ok_or_else(|| {
            let diffusers = shapes.contains_key("decoder.up_blocks.0.resnets.0.conv1.weight");
            EngineError::bad_file(
                path,
                if diffusers {
                    "a VAE in diffusers' layout: give its folder (with config.json) instead"
                } else {
                    "not a VAE (no encoder.conv_in.weight)"
                },
            )
        })?;
    let (config, keys) = architecture::vae_plan(&keys, &shapes, prefix, scaling_factor)
        .map_err(|message| EngineError::bad_file(path, message))?;
    Ok((
        config,
        ComponentWeights::Renamed {
            file,
            keys: keys.into(),
        },
    ))
}
