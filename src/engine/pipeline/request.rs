//! What a job asks for and what it gives back: devices, load options, the request, progress,
//! timings and output.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use crate::engine::error::{EngineError, Result};
use crate::engine::source::LoadProgressFn;
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
                    .map(prepared_cuda_device)
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
                    return Ok(prepared_cuda_device(device));
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
    /// What the model's own files say, overridden (VAE, prediction), and where the text
    /// encoders run.
    pub overrides: ModelOverrides,
}

/// What an artist overrides of a model's own files, remembered per model by the window.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ModelOverrides {
    /// A VAE in place of the model's (a diffusers VAE folder or a single `.safetensors`);
    /// `None`: the baked-in one.
    pub vae: Option<std::path::PathBuf>,
    /// What the model predicts, overriding its config (or a single file's detection).
    pub prediction: Option<crate::schedulers::Prediction>,
    /// Where a single file without text encoders takes them from: a diffusers folder or a
    /// checkpoint of the same family.
    pub text_encoders: Option<std::path::PathBuf>,
    /// Keep the text encoders on the CPU (in f32) when the model runs on a GPU: their weights
    /// (1.6 GB for SDXL's two) never take GPU memory; each prompt costs CPU time instead. Not
    /// a change to the model's files, but remembered with them: a large model needs it where a
    /// small one does not.
    pub text_encoders_on_cpu: bool,
}

impl ModelOverrides {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// The VAE's file or folder name, as A1111's `VAE` metadata names it.
    pub fn vae_name(&self) -> Option<String> {
        let vae = self.vae.as_ref()?;
        Some(
            vae.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| vae.display().to_string()),
        )
    }
}

impl LoadOptions {
    /// Options for `device` with the default precision and no progress reports.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            dtype: None,
            progress: None,
            overrides: ModelOverrides::default(),
        }
    }
}

/// How the window (or CLI) wants previews while denoising.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PreviewOptions {
    /// Decode the predicted x0 with the full VAE every this many steps (0 = never).
    pub vae_decode_every: usize,
    /// A cheap preview (the latents projected to RGB) with every step, copied from the GPU
    /// without stalling it: each step's preview comes with the next step's progress.
    pub latent_previews: bool,
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
    /// A1111's clip skip ("CLIP stop at last layers"): 1 reads the text encoder's last layer, N
    /// the hidden state N layers from the end (then the final layer norm). SD 1.x only, as in
    /// A1111's default settings: SD 2.x and SDXL always read their penultimate layer.
    pub clip_skip: usize,
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
            clip_skip: 1,
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
    /// With [`PreviewOptions::latent_previews`]: the cheap preview of the latest step whose
    /// work the GPU has finished (on the CPU, this step's; on a GPU, the previous one's, so
    /// that nothing waits for the step just queued).
    pub latent_preview: Option<RgbImage>,
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

/// A CUDA device whose tensors do not each create and destroy two CUDA events (candle's device
/// queues its work on the per-thread default stream, which leaves cudarc out of its
/// multi-stream mode, where alone those events are waited on; made and dropped with every
/// tensor, they only cost the CPU time in every operation), and whose memory pool keeps freed
/// memory for reuse ([`crate::engine::cuda::keep_freed_memory`]).
fn prepared_cuda_device(device: Device) -> Device {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = &device {
        // SAFETY: no stream of this context was made with `new_stream`, so cudarc never waits on
        // the events (see above): switching them off loses no synchronisation.
        unsafe { cuda.disable_event_tracking() };
        // Should the driver refuse, the pool only re-maps memory more often: slower, still
        // correct, so there is nothing to report.
        let _ = crate::engine::cuda::keep_freed_memory(cuda);
    }
    device
}
