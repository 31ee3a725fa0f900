//! The text-to-image pipeline: load a model, encode prompts, denoise, decode.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;
use serde::de::DeserializeOwned;

use super::clip::ClipTextEncoder;
use super::config::{
    CheckedConfig, ClipTextConfig, ModelIndex, SchedulerConfig, UNetConfig, VaeConfig,
};
use super::error::{EngineError, Result};
use super::noise::NoiseGenerator;
use super::preview::project_latents;
use super::source::{LoadProgress, LoadProgressFn, ModelFiles, ModelSource};
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedConditions, UNet};
use super::vae::VaeDecoder;
use crate::schedulers::{SchedulerKind, SigmaSchedule};

/// The model families Atelier knows, detected from the configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ModelFamily {
    /// SD 1.x: one CLIP ViT-L encoder.
    Sd1,
    /// SD 2.x (and SD-Turbo): one OpenCLIP ViT-H encoder.
    Sd2,
    /// SDXL (and SDXL-Turbo): two encoders, pooled text and time ids.
    Sdxl,
}

impl ModelFamily {
    /// A short name for the UI and logs.
    pub fn display_name(self) -> &'static str {
        match self {
            ModelFamily::Sd1 => "SD 1.x",
            ModelFamily::Sd2 => "SD 2.x",
            ModelFamily::Sdxl => "SDXL",
        }
    }
}

/// Which device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// The best available: CUDA, then Metal, then CPU.
    Auto,
    /// The CPU, in f32.
    Cpu,
    /// The first CUDA GPU, in f16.
    Cuda,
    /// The Apple GPU, in f16.
    Metal,
}

impl DeviceChoice {
    /// Parses `auto`, `cpu`, `cuda` or `metal`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            "metal" | "mps" => Ok(DeviceChoice::Metal),
            other => Err(EngineError::InvalidParameter(format!(
                "unknown device {other:?}; choose cpu, cuda, metal or auto"
            ))),
        }
    }

    /// Opens the device, with a clear error when this build or machine lacks it.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(EngineError::Device(
                        "this build of Atelier has no CUDA support (build with --features cuda)"
                            .into(),
                    ));
                }
                Device::new_cuda(0)
                    .map_err(|e| EngineError::Device(format!("no usable CUDA GPU: {e}")))
            }
            DeviceChoice::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(EngineError::Device(
                        "this build of Atelier has no Metal support (build with --features metal)"
                            .into(),
                    ));
                }
                Device::new_metal(0)
                    .map_err(|e| EngineError::Device(format!("no usable Metal GPU: {e}")))
            }
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available()
                    && let Ok(device) = Device::new_cuda(0)
                {
                    return Ok(device);
                }
                if candle_core::utils::metal_is_available()
                    && let Ok(device) = Device::new_metal(0)
                {
                    return Ok(device);
                }
                Ok(Device::Cpu)
            }
        }
    }
}

/// The working precision for a device: f32 on the CPU, f16 on GPUs.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::F16
    }
}

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    /// Where the model runs.
    pub device: Device,
    /// Weights and activations; `None` picks [`default_dtype`].
    pub dtype: Option<DType>,
    /// Hears about downloads and components being read.
    pub progress: Option<LoadProgressFn>,
}

impl LoadOptions {
    /// Options for `device` with the default precision and no progress reports.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            dtype: None,
            progress: None,
        }
    }
}

/// How the window (or CLI) wants previews while denoising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreviewOptions {
    /// Decode the predicted x0 with the full VAE every this many steps (0 = never).
    pub vae_decode_every: usize,
}

/// Everything that determines an image.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct GenerationRequest {
    /// What to draw.
    pub prompt: String,
    /// What to avoid; empty means unconditional (zeros for SDXL when the model says so).
    pub negative_prompt: String,
    /// Seed of the first image; image `k` of a batch uses `seed + k`.
    pub seed: u64,
    /// Denoising steps.
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 skips the unconditional pass.
    pub guidance_scale: f64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Images generated together.
    pub batch_size: usize,
    /// The sampler.
    pub scheduler: SchedulerKind,
    /// Its sigma schedule (for samplers that have one).
    pub sigmas: SigmaSchedule,
    /// DDIM's eta: 0 is deterministic DDIM, 1 adds as much noise as DDPM (other samplers
    /// ignore it).
    pub eta: f64,
}

impl Default for GenerationRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            seed: 0,
            steps: 30,
            guidance_scale: 7.5,
            width: 512,
            height: 512,
            batch_size: 1,
            scheduler: SchedulerKind::Euler,
            sigmas: SigmaSchedule::Default,
            eta: 0.0,
        }
    }
}

/// What the per-step callback sees.
pub struct StepProgress<'a> {
    /// 0-based index of the step that just finished.
    pub step_index: usize,
    /// Number of steps in this job.
    pub total_steps: usize,
    /// The timestep the model was evaluated at.
    pub timestep: f64,
    /// Seconds since the job started (text encoding included).
    pub elapsed_secs: f64,
    /// The scheduler's predicted clean latents `(batch, 4, h, w)`.
    pub predicted_latents: &'a Tensor,
    /// A full VAE decode of the first predicted image, when [`PreviewOptions`] asked for one.
    pub vae_preview: Option<RgbImage>,
}

/// Seconds spent in each phase of a job.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// Tokenizing and running the text encoders.
    pub text_encoding_secs: f64,
    /// All denoising steps.
    pub denoising_secs: f64,
    /// The final VAE decode.
    pub decode_secs: f64,
    /// The whole job.
    pub total_secs: f64,
}

/// The result of a job.
pub struct GenerationOutput {
    /// One image per batch item.
    pub images: Vec<RgbImage>,
    /// The final latents `(batch, 4, h, w)` in f32, before the VAE.
    pub latents: Tensor,
    /// Where the time went.
    pub timings: Timings,
    /// Things the user should know (e.g. tokens dropped from a long prompt).
    pub warnings: Vec<String>,
}

/// Conditioning for the UNet, for one prompt.
#[derive(Debug, Clone)]
pub struct PromptEmbeddings {
    /// `(1, 77, width)` per-token context.
    pub context: Tensor,
    /// `(1, pooled_width)` pooled text (SDXL only).
    pub pooled: Option<Tensor>,
    /// Prompt tokens dropped because the prompt was longer than the encoder takes.
    pub dropped_tokens: usize,
}

struct TextEncoderPart {
    tokenizer: Arc<ClipTokenizer>,
    encoder: ClipTextEncoder,
}

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    name: String,
    family: ModelFamily,
    device: Device,
    dtype: DType,
    text_encoders: Vec<TextEncoderPart>,
    unet: UNet,
    vae: VaeDecoder,
    vae_dtype: DType,
    scheduler_config: SchedulerConfig,
    force_zeros_for_empty_prompt: bool,
    unet_weights: std::path::PathBuf,
}

/// Whether every value of `tensor` is a finite number (one reduction: the sum of squares is
/// NaN or infinite when any value is, or when values are too large to mean anything).
fn all_finite(tensor: &Tensor) -> Result<bool> {
    let sum_of_squares = tensor
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(sum_of_squares.is_finite())
}

/// Reads a component's `config.json` and checks every value before a model is built from it.
fn read_json<T: DeserializeOwned + CheckedConfig>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::bad_file(path, e))?;
    let config: T = serde_json::from_str(&text).map_err(|e| EngineError::bad_file(path, e))?;
    config.check().map_err(|e| EngineError::bad_file(path, e))?;
    Ok(config)
}

fn var_builder(path: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // SAFETY: the weights file is memory-mapped read-only; Atelier never writes model files,
    // and a file changed underneath us by another program is outside what we can guard against.
    unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
        .map_err(|e| EngineError::bad_file(path, e))
}

impl StableDiffusion {
    /// Loads every component of the model at `source` from its own config.
    pub fn load(source: ModelSource, options: LoadOptions) -> Result<Self> {
        if let ModelSource::Folder(root) = &source
            && !root.is_dir()
        {
            return Err(EngineError::MissingFile {
                what: "model folder".into(),
                path: root.clone(),
            });
        }
        let files = ModelFiles::new(source, options.progress.clone());
        let device = options.device.clone();
        let dtype = options.dtype.unwrap_or_else(|| default_dtype(&device));
        let prefer_fp16 = dtype != DType::F32;
        // Every diffusers repo on the Hub has a model_index.json; a local folder may lack one.
        let index_path = match files.source() {
            ModelSource::Hub(_) => Some(files.required("model_index.json", "pipeline index")?),
            ModelSource::Folder(_) => files.optional("model_index.json")?,
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
            files.report(LoadProgress::Loading {
                component: encoder_dir.into(),
            });
            let config: ClipTextConfig =
                read_json(&files.required(&config_name, "text encoder config")?)?;
            let weights = files.weights(encoder_dir, "model", prefer_fp16)?;
            let encoder = ClipTextEncoder::new(config, var_builder(&weights, dtype, &device)?)?;
            let tokenizer = ClipTokenizer::load(&files, tokenizer_dir)?;
            let positions = encoder.config().max_position_embeddings;
            if positions < tokenizer.max_length() {
                return Err(EngineError::Unsupported(format!(
                    "{encoder_dir} has {positions} positions but its tokenizer makes {} tokens",
                    tokenizer.max_length()
                )));
            }
            text_encoders.push(TextEncoderPart {
                tokenizer: Arc::new(tokenizer),
                encoder,
            });
        }
        if text_encoders.is_empty() {
            return Err(EngineError::Unsupported(
                "the model has no text encoder (model_index.json lists none)".into(),
            ));
        }

        files.report(LoadProgress::Loading {
            component: "unet".into(),
        });
        let unet_config: UNetConfig =
            read_json(&files.required("unet/config.json", "UNet config")?)?;
        let unet_weights = files.weights("unet", "diffusion_pytorch_model", prefer_fp16)?;
        let unet = UNet::new(unet_config, var_builder(&unet_weights, dtype, &device)?)?;

        let family = if unet.needs_added_conditions() || text_encoders.len() > 1 {
            ModelFamily::Sdxl
        } else if text_encoders[0].encoder.config().hidden_act == "gelu" {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        };

        files.report(LoadProgress::Loading {
            component: "vae".into(),
        });
        let vae_config: VaeConfig = read_json(&files.required("vae/config.json", "VAE config")?)?;
        // SDXL's VAE overflows in f16; its config says so with force_upcast. Like diffusers, only
        // the SDXL pipeline heeds it: SD 1.x/2.x configs default it to true yet decode in f16.
        let vae_dtype =
            if dtype == DType::F16 && vae_config.force_upcast && family == ModelFamily::Sdxl {
                DType::F32
            } else {
                dtype
            };
        let vae_weights = files.weights("vae", "diffusion_pytorch_model", prefer_fp16)?;
        let mut vae = VaeDecoder::new(vae_config, var_builder(&vae_weights, vae_dtype, &device)?)?;
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
            name: files.source().display_name(),
            family,
            device,
            dtype,
            text_encoders,
            unet,
            vae,
            vae_dtype,
            scheduler_config,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
            unet_weights,
        })
    }

    /// The UNet's weights file (hashed for the images' metadata).
    pub fn unet_weights(&self) -> &Path {
        &self.unet_weights
    }

    /// The model's name (repo id or folder name).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The detected family.
    pub fn family(&self) -> ModelFamily {
        self.family
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The working precision.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The parts the benchmark times.
    pub fn bench_target(&self) -> super::bench::BenchTarget<'_> {
        super::bench::BenchTarget {
            text_encoders: self
                .text_encoders
                .iter()
                .map(|part| &part.encoder)
                .collect(),
            unet: &self.unet,
            vae: &self.vae,
            dtype: self.dtype,
            vae_dtype: self.vae_dtype,
            device: &self.device,
        }
    }

    /// The UNet.
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    /// The VAE decoder.
    pub fn vae(&self) -> &VaeDecoder {
        &self.vae
    }

    /// The model's scheduler config.
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Pixels per latent cell along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().scale_factor()
    }

    /// The image size the model was trained at, if its UNet config says.
    pub fn native_size(&self) -> Option<usize> {
        self.unet
            .config()
            .sample_size
            .map(|s| s * self.vae_scale_factor())
    }

    /// Prompt tokens the text encoder takes, without the start and end tokens (75 for CLIP).
    pub fn max_prompt_tokens(&self) -> usize {
        self.text_encoders[0].tokenizer.max_length() - 2
    }

    /// A thread-safe counter of prompt tokens (the first tokenizer's), for the prompt box.
    pub fn token_counter(&self) -> Arc<dyn Fn(&str) -> usize + Send + Sync> {
        let tokenizer = self.text_encoders[0].tokenizer.clone();
        Arc::new(move |prompt: &str| tokenizer.prompt_tokens(prompt).map_or(0, |t| t.len()))
    }

    /// Tokenizes `prompt` with every tokenizer of the model.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<Vec<u32>>> {
        self.text_encoders
            .iter()
            .map(|part| Ok(part.tokenizer.tokenize(prompt)?.ids))
            .collect()
    }

    /// Encodes one prompt as the diffusers pipeline of this family does.
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeddings> {
        let mut contexts = Vec::with_capacity(self.text_encoders.len());
        let mut pooled = None;
        let mut dropped_tokens = 0;
        for part in &self.text_encoders {
            let tokens = part.tokenizer.tokenize(prompt)?;
            dropped_tokens = dropped_tokens.max(tokens.dropped_tokens);
            let encoding = part.encoder.encode(&[tokens.ids], &self.device)?;
            match self.family {
                ModelFamily::Sdxl => {
                    contexts.push(encoding.penultimate_hidden_state);
                    pooled = Some(encoding.pooled);
                }
                ModelFamily::Sd1 | ModelFamily::Sd2 => contexts.push(encoding.last_hidden_state),
            }
        }
        let context = if contexts.len() == 1 {
            contexts.remove(0)
        } else {
            Tensor::cat(&contexts, D::Minus1)?
        };
        Ok(PromptEmbeddings {
            context,
            pooled,
            dropped_tokens,
        })
    }

    /// The negative conditioning: zeros for SDXL models that ask for it when the prompt is empty.
    pub fn encode_negative_prompt(
        &self,
        negative_prompt: &str,
        positive: &PromptEmbeddings,
    ) -> Result<PromptEmbeddings> {
        if negative_prompt.is_empty() && self.force_zeros_for_empty_prompt {
            return Ok(PromptEmbeddings {
                context: positive.context.zeros_like()?,
                pooled: positive
                    .pooled
                    .as_ref()
                    .map(Tensor::zeros_like)
                    .transpose()?,
                dropped_tokens: 0,
            });
        }
        self.encode_prompt(negative_prompt)
    }

    /// Checks a request against the model, with messages an artist can act on.
    pub fn validate(&self, request: &GenerationRequest) -> Result<()> {
        let factor = self.vae_scale_factor();
        for (name, value) in [("width", request.width), ("height", request.height)] {
            if value == 0 || !value.is_multiple_of(factor) {
                return Err(EngineError::InvalidParameter(format!(
                    "{name} {value} must be a positive multiple of {factor} for this model"
                )));
            }
            if value > 4096 {
                return Err(EngineError::InvalidParameter(format!(
                    "{name} {value} is larger than 4096 pixels"
                )));
            }
        }
        if request.batch_size == 0 || request.batch_size > 64 {
            return Err(EngineError::InvalidParameter(format!(
                "batch size must be between 1 and 64, got {}",
                request.batch_size
            )));
        }
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return Err(EngineError::InvalidParameter(format!(
                "guidance scale must be a non-negative number, got {}",
                request.guidance_scale
            )));
        }
        if request.steps == 0 || request.steps > self.scheduler_config.train_timesteps() {
            return Err(EngineError::InvalidParameter(format!(
                "steps must be between 1 and {}, got {}",
                self.scheduler_config.train_timesteps(),
                request.steps
            )));
        }
        Ok(())
    }

    /// The latent shape of a request: `(batch, channels, height / f, width / f)`.
    pub fn latent_shape(&self, request: &GenerationRequest) -> [usize; 4] {
        let factor = self.vae_scale_factor();
        [
            request.batch_size,
            self.unet.config().in_channels,
            request.height / factor,
            request.width / factor,
        ]
    }

    /// Seeded standard-normal noise for a request: image `k` from `seed + k`.
    pub fn seeded_noise(&self, request: &GenerationRequest) -> Result<Tensor> {
        let [batch, channels, height, width] = self.latent_shape(request);
        let mut items = Vec::with_capacity(batch);
        for k in 0..batch {
            let mut generator = NoiseGenerator::new(request.seed.wrapping_add(k as u64));
            items.push(generator.randn(&[1, channels, height, width], &self.device)?);
        }
        Ok(Tensor::cat(&items, 0)?)
    }

    /// Runs a whole job. `init_noise` (standard normal, the latent shape) replaces the seeded
    /// noise, as diffusers' `latents=` argument does; `cancel` is checked before every step.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        init_noise: Option<&Tensor>,
        preview: PreviewOptions,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(StepProgress<'_>),
    ) -> Result<GenerationOutput> {
        let started = Instant::now();
        self.validate(request)?;
        let mut warnings = Vec::new();
        let batch = request.batch_size;
        let latent_shape = self.latent_shape(request);
        let noise = match init_noise {
            Some(noise) => {
                if noise.dims() != latent_shape {
                    return Err(EngineError::InvalidParameter(format!(
                        "initial noise has shape {:?}, this job needs {:?}",
                        noise.dims(),
                        latent_shape
                    )));
                }
                let noise = noise.to_device(&self.device)?.to_dtype(DType::F32)?;
                if !all_finite(&noise)? {
                    return Err(EngineError::InvalidParameter(
                        "the initial noise contains NaN or infinite values".into(),
                    ));
                }
                noise
            }
            None => self.seeded_noise(request)?,
        };

        let positive = self.encode_prompt(&request.prompt)?;
        if positive.dropped_tokens > 0 {
            warnings.push(format!(
                "the prompt is longer than the text encoder takes: its last {} tokens were dropped",
                positive.dropped_tokens
            ));
        }
        // LCM-distilled UNets take the guidance scale as an embedding and run without
        // classifier-free guidance (as LatentConsistencyModelPipeline does).
        let guidance_embedding = match self.unet.guidance_embedding_dim() {
            Some(dim) => Some(super::unet::guidance_scale_embedding(
                request.guidance_scale - 1.0,
                dim,
                batch,
                &self.device,
            )?),
            None => None,
        };
        let guided = request.guidance_scale > 1.0 && guidance_embedding.is_none();
        let negative = if guided {
            let negative = self.encode_negative_prompt(&request.negative_prompt, &positive)?;
            if negative.dropped_tokens > 0 {
                warnings.push(format!(
                    "the negative prompt is too long: its last {} tokens were dropped",
                    negative.dropped_tokens
                ));
            }
            Some(negative)
        } else {
            None
        };
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = (0..batch).map(|_| t.clone()).collect();
            Ok(Tensor::cat(&rows, 0)?)
        };
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        for embeddings in negative.iter().chain(std::iter::once(&positive)) {
            contexts.push(repeat(&embeddings.context)?);
            if let Some(p) = &embeddings.pooled {
                pooled.push(repeat(p)?);
            }
        }
        let context = Tensor::cat(&contexts, 0)?.to_dtype(self.dtype)?;
        let model_batch = context.dim(0)?;
        let added = if self.unet.needs_added_conditions() {
            let text_embeds = Tensor::cat(&pooled, 0)?;
            let (h, w) = (request.height as f32, request.width as f32);
            let ids = [h, w, 0.0, 0.0, h, w];
            let time_ids = Tensor::new(&ids, &self.device)?
                .unsqueeze(0)?
                .repeat((model_batch, 1))?;
            Some(AddedConditions {
                text_embeds,
                time_ids,
            })
        } else {
            None
        };
        let text_encoding_secs = started.elapsed().as_secs_f64();

        let mut scheduler = request.scheduler.build(
            &self.scheduler_config,
            request.steps,
            request.sigmas,
            request.eta,
        )?;
        let timesteps = scheduler.timesteps().to_vec();
        let mut latents = (noise * scheduler.init_noise_sigma())?;
        let mut generator = NoiseGenerator::new(request.seed ^ 0x5eed_5eed_5eed_5eed);
        let denoise_started = Instant::now();
        for (index, &timestep) in timesteps.iter().enumerate() {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let scaled = scheduler.scale_model_input(&latents, index)?;
            let model_input = if guided {
                Tensor::cat(&[&scaled, &scaled], 0)?
            } else {
                scaled
            }
            .to_dtype(self.dtype)?;
            let prediction = self
                .unet
                .forward_with_guidance(
                    &model_input,
                    timestep,
                    &context,
                    added.as_ref(),
                    guidance_embedding.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let guided_prediction = if guided {
                let uncond = prediction.narrow(0, 0, batch)?;
                let cond = prediction.narrow(0, batch, batch)?;
                (&uncond + ((cond - &uncond)? * request.guidance_scale)?)?
            } else {
                prediction
            };
            let step = scheduler.step(&guided_prediction, index, &latents, &mut generator)?;
            latents = step.prev_sample;
            let vae_preview = if preview.vae_decode_every > 0
                && (index + 1) % preview.vae_decode_every == 0
                && index + 1 < timesteps.len()
            {
                let first = step.pred_original_sample.narrow(0, 0, 1)?;
                self.decode(&first)?.into_iter().next()
            } else {
                None
            };
            on_step(StepProgress {
                step_index: index,
                total_steps: timesteps.len(),
                timestep,
                elapsed_secs: started.elapsed().as_secs_f64(),
                predicted_latents: &step.pred_original_sample,
                vae_preview,
            });
        }
        // Make sure queued GPU work is counted as denoising, not decoding.
        self.device.synchronize()?;
        let denoising_secs = denoise_started.elapsed().as_secs_f64();
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        if !all_finite(&latents)? {
            return Err(EngineError::NotFinite(format!(
                "the denoised latents are not finite numbers (NaN or infinity): the image would be flat. Guidance {} may be too large for this model and sampler",
                request.guidance_scale
            )));
        }
        let decode_started = Instant::now();
        let images = self.decode(&latents)?;
        let decode_secs = decode_started.elapsed().as_secs_f64();
        Ok(GenerationOutput {
            images,
            latents,
            timings: Timings {
                text_encoding_secs,
                denoising_secs,
                decode_secs,
                total_secs: started.elapsed().as_secs_f64(),
            },
            warnings,
        })
    }

    /// Decodes latents (in the UNet's scaled space) to RGB images in [0, 1] `(batch, 3, H, W)`.
    pub fn decode_to_tensor(&self, latents: &Tensor) -> Result<Tensor> {
        let config = self.vae.config();
        let mut scaled = (latents.to_dtype(DType::F32)? / config.scaling_factor)?;
        if let Some(shift) = config.shift_factor {
            scaled = (scaled + shift)?;
        }
        let decoded = self.vae.decode(&scaled.to_dtype(self.vae_dtype)?)?;
        Ok(((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0.0, 1.0)?)
    }

    /// Decodes latents to 8-bit RGB images, rounding as diffusers' `numpy_to_pil` does.
    pub fn decode(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let pixels = self.decode_to_tensor(latents)?;
        tensor_to_images(&pixels)
    }

    /// A cheap preview of predicted latents (first image of the batch).
    pub fn preview(&self, latents: &Tensor) -> Result<RgbImage> {
        project_latents(latents, self.family)
    }
}

/// `(batch, 3, H, W)` values in [0, 1] to 8-bit images.
pub fn tensor_to_images(pixels: &Tensor) -> Result<Vec<RgbImage>> {
    let (batch, _, height, width) = pixels.dims4()?;
    let bytes = (pixels.to_device(&Device::Cpu)? * 255.0)?
        .round()?
        .clamp(0.0, 255.0)?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .contiguous()?;
    let mut images = Vec::with_capacity(batch);
    for item in 0..batch {
        let data: Vec<u8> = bytes.get(item)?.flatten_all()?.to_vec1()?;
        let image = RgbImage::from_raw(width as u32, height as u32, data).ok_or_else(|| {
            EngineError::Unsupported("decoded image has an unexpected size".into())
        })?;
        images.push(image);
    }
    Ok(images)
}
