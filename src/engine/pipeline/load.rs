//! Loading: every component from its own config, checked as it is read.

use std::path::Path;
use std::sync::Arc;

use candle_core::DType;
use serde::de::DeserializeOwned;

use super::{LoadOptions, ModelFamily, StableDiffusion, TextEncoderPart, default_dtype};
use crate::engine::clip::ClipTextEncoder;
use crate::engine::config::{
    CheckedConfig, ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig,
};
use crate::engine::error::{EngineError, Result};
use crate::engine::source::{LoadProgress, ModelFiles, ModelSource};
use crate::engine::tokenizer::ClipTokenizer;
use crate::engine::unet::UNet;
use crate::engine::vae::VaeDecoder;
use crate::engine::weights::{ComponentWeights, WeightTable, record, recording};

/// Reads a component's `config.json` and checks every value before a model is built from it.
pub(super) fn read_json<T: DeserializeOwned + CheckedConfig>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::bad_file(path, e))?;
    let config: T = crate::schedulers::config::from_python_json(&text)
        .map_err(|e| EngineError::bad_file(path, e))?;
    config.check().map_err(|e| EngineError::bad_file(path, e))?;
    Ok(config)
}

/// One text encoder, ready to build.
pub(super) struct TextEncoderSpec {
    /// `text_encoder` or `text_encoder_2` (for messages).
    pub name: &'static str,
    pub config: ClipTextConfig,
    pub weights: ComponentWeights,
    pub tokenizer: ClipTokenizer,
}

/// Every component of a model, described and located, before anything is built.
pub(super) struct ModelSpec {
    pub name: String,
    pub text_encoders: Vec<TextEncoderSpec>,
    pub unet: (UNetConfig, ComponentWeights),
    pub vae: (VaeConfig, ComponentWeights),
    pub scheduler_config: SchedulerConfig,
    pub force_zeros_for_empty_prompt: bool,
}

impl StableDiffusion {
    /// Loads every component of the model at `source` from its own config (a diffusers folder
    /// or repo), or from the shapes of a single-file checkpoint.
    pub fn load(source: ModelSource, options: LoadOptions) -> Result<Self> {
        let mut spec = match &source {
            ModelSource::File(path) => super::load_file::describe(path, &options)?,
            _ => describe_diffusers(source, &options)?,
        };
        if let Some(vae) = &options.overrides.vae {
            let scaling_factor = spec.vae.0.scaling_factor;
            spec.vae = super::load_file::vae_override(vae, scaling_factor)?;
        }
        if let Some(prediction) = options.overrides.prediction {
            spec.scheduler_config.prediction_type = Some(prediction.config_name().into());
        }
        let model = Self::build(spec, &options)?;
        if !model.device.is_cpu() {
            if let Some(progress) = &options.progress {
                progress(LoadProgress::Loading {
                    component: "warm-up".into(),
                });
            }
            // Not fatal: a model that cannot run this tiny job says why in the artist's own.
            let _ = model.warm_up();
        }
        Ok(model)
    }

    /// One job of one guided step at the model's native size (64x64 pixels when its config
    /// does not say), decoded: a GPU's first work in a process (kernel compilation, cuBLAS and
    /// cuDNN handles, memory pools, and timing which convolution route is faster at each of
    /// that size's shapes) is paid here, at load, instead of by the artist's first picture.
    pub fn warm_up(&self) -> Result<()> {
        let side = self.native_size().unwrap_or(8 * self.vae_scale_factor());
        let request = super::GenerationRequest {
            prompt: "warm-up".into(),
            steps: 1,
            width: side,
            height: side,
            ..Default::default()
        };
        let options = super::PreviewOptions {
            latent_previews: true,
            ..Default::default()
        };
        let cancel = std::sync::atomic::AtomicBool::new(false);
        self.generate(&request, None, options, &cancel, &mut |_| {})?;
        self.device.synchronize()?;
        Ok(())
    }

    fn build(spec: ModelSpec, options: &LoadOptions) -> Result<Self> {
        let report = |component: &str| {
            if let Some(progress) = &options.progress {
                progress(LoadProgress::Loading {
                    component: component.into(),
                });
            }
        };
        let device = options.device.clone();
        let dtype = options.dtype.unwrap_or_else(|| default_dtype(&device));
        let (encoder_device, encoder_dtype) = if options.overrides.text_encoders_on_cpu {
            (candle_core::Device::Cpu, DType::F32)
        } else {
            (device.clone(), dtype)
        };
        let mut text_encoders = Vec::new();
        let mut weights = WeightTable::default();
        for part in spec.text_encoders {
            report(part.name);
            let vb = recording(part.weights.var_builder(encoder_dtype, &encoder_device)?);
            let (encoder, table) = record(&format!("{}.", part.name), || {
                ClipTextEncoder::new(part.config, vb)
            })?;
            weights.extend(table);
            let positions = encoder.config().max_position_embeddings;
            if positions < part.tokenizer.max_length() {
                return Err(EngineError::Unsupported(format!(
                    "{} has {positions} positions but its tokenizer makes {} tokens",
                    part.name,
                    part.tokenizer.max_length()
                )));
            }
            text_encoders.push(TextEncoderPart {
                tokenizer: Arc::new(part.tokenizer),
                encoder,
                device: encoder_device.clone(),
                dtype: encoder_dtype,
            });
        }
        if text_encoders.is_empty() {
            return Err(EngineError::Unsupported(
                "the model has no text encoder (model_index.json lists none)".into(),
            ));
        }

        report("unet");
        let (unet_config, unet_weights) = spec.unet;
        let vb = recording(unet_weights.var_builder(dtype, &device)?);
        let (unet, table) = record("unet.", || UNet::new(unet_config, vb))?;
        weights.extend(table);

        let family = if unet.needs_added_conditions() || text_encoders.len() > 1 {
            ModelFamily::Sdxl
        } else if text_encoders[0].encoder.config().hidden_act == "gelu" {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };

        report("vae");
        let (vae_config, vae_weights) = spec.vae;
        // SDXL's VAE overflows in f16; its config says so with force_upcast. Like diffusers, only
        // the SDXL pipeline heeds it: SD 1.x/2.x configs default it to true yet decode in f16.
        let vae_dtype =
            if dtype == DType::F16 && vae_config.force_upcast && family == ModelFamily::Sdxl {
                DType::F32
            } else {
                dtype
            };
        let mut vae = VaeDecoder::new(vae_config, vae_weights.var_builder(vae_dtype, &device)?)?;
        // Upcast from f16: TF32 convolutions, as diffusers' f32 decode gets from cuDNN.
        vae.allow_tf32_convolutions(vae_dtype != dtype);

        let context_width: usize = text_encoders
            .iter()
            .map(|part| part.encoder.config().hidden_size)
            .sum();
        let expected_context = unet.config().cross_attention_dim.at(0).unwrap_or(0);
        if context_width != expected_context {
            return Err(EngineError::Unsupported(format!(
                "the text encoders give {context_width}-wide embeddings but the UNet expects {expected_context}"
            )));
        }
        Ok(Self {
            name: spec.name,
            family,
            device,
            dtype,
            text_encoders,
            unet,
            vae,
            vae_dtype,
            scheduler_config: spec.scheduler_config,
            force_zeros_for_empty_prompt: spec.force_zeros_for_empty_prompt,
            unet_weights,
            vae_weights,
            vae_encoder: std::sync::OnceLock::new(),
            preview_projection: std::sync::OnceLock::new(),
            vae_tiling: Default::default(),
            weights,
            loras: Default::default(),
            embeddings: Vec::new(),
        })
    }
}

/// Reads a diffusers folder's or repo's configs and finds its weights.
fn describe_diffusers(source: ModelSource, options: &LoadOptions) -> Result<ModelSpec> {
    if let ModelSource::Folder(root) = &source
        && !root.is_dir()
    {
        return Err(EngineError::MissingFile {
            what: "model folder".into(),
            path: root.clone(),
        });
    }
    let files = ModelFiles::new(source, options.progress.clone());
    let dtype = options
        .dtype
        .unwrap_or_else(|| default_dtype(&options.device));
    let prefer_fp16 = dtype != DType::F32;
    // Every diffusers repo on the Hub has a model_index.json; a local folder may lack one.
    let index_path = match files.source() {
        ModelSource::Hub(_) => Some(files.required("model_index.json", "pipeline index")?),
        _ => files.optional("model_index.json")?,
    };
    let index: ModelIndex = match index_path {
        Some(path) => read_json(&path)?,
        None => ModelIndex::default(),
    };
    let scheduler_config: SchedulerConfig =
        match files.optional("scheduler/scheduler_config.json")? {
            Some(path) => read_json(&path)?,
            None => SchedulerConfig::sd15(),
        };

    let text_encoders = diffusers_text_encoders(&files, &index, prefer_fp16)?;
    let unet_config: UNetConfig = read_json(&files.required("unet/config.json", "UNet config")?)?;
    let unet_weights = files.weights("unet", "diffusion_pytorch_model", prefer_fp16)?;
    let vae_config: VaeConfig = read_json(&files.required("vae/config.json", "VAE config")?)?;
    let vae_weights = files.weights("vae", "diffusion_pytorch_model", prefer_fp16)?;
    Ok(ModelSpec {
        name: files.source().display_name(),
        text_encoders,
        unet: (unet_config, ComponentWeights::File(unet_weights)),
        vae: (vae_config, ComponentWeights::File(vae_weights)),
        scheduler_config,
        force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
    })
}

/// The text encoders (and tokenizers) of a diffusers folder or repo, as its index lists them.
pub(super) fn diffusers_text_encoders(
    files: &ModelFiles,
    index: &ModelIndex,
    prefer_fp16: bool,
) -> Result<Vec<TextEncoderSpec>> {
    let mut text_encoders = Vec::new();
    for (tokenizer_dir, encoder_dir) in [
        ("tokenizer", "text_encoder"),
        ("tokenizer_2", "text_encoder_2"),
    ] {
        let config_name = format!("{encoder_dir}/config.json");
        // Without a model_index.json, assume the one text encoder of SD 1.x/2.x.
        let wanted = index.has_component(encoder_dir)
            || (encoder_dir == "text_encoder" && index.components.is_empty());
        if !wanted {
            continue;
        }
        let config: ClipTextConfig =
            read_json(&files.required(&config_name, "text encoder config")?)?;
        let weights = files.weights(encoder_dir, "model", prefer_fp16)?;
        text_encoders.push(TextEncoderSpec {
            name: encoder_dir,
            config,
            weights: ComponentWeights::File(weights),
            tokenizer: ClipTokenizer::load(files, tokenizer_dir)?,
        });
    }
    Ok(text_encoders)
}
