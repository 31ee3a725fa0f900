//! The text-to-image pipeline: load a model, encode prompts, denoise, decode.
//!
//! One file a concern: [`request`] (what a job asks for), [`load`] (the one assembler of
//! components), [`prompt`] (text encoding), [`denoise`] (the one denoising loop), [`decode`]
//! (latents to pixels and previews), `modes` (what each mode prepares for the loop) and `job`
//! (a whole job as the artist describes it: the entry point of the window and the CLI).

mod conditioning;
mod decode;
mod denoise;
mod job;
mod load;
mod load_file;
mod lora;
mod modes;
mod prompt;
mod request;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::clip::ClipTextEncoder;
use super::config::SchedulerConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::UNet;
use super::vae::{VaeDecoder, VaeEncoder};
use super::weights::{ComponentWeights, WeightTable};

pub use decode::tensor_to_images;
pub use job::{HiresFix, ImageJob, ImageOptions, JobParts, JobResult, MAX_MASK_BLUR};
pub use modes::JobInput;
pub use prompt::PromptEmbeddings;
pub use request::{
    DeviceChoice, GenerationOutput, GenerationRequest, LoadOptions, ModelFamily, ModelOverrides,
    PreviewOptions, StepProgress, Timings, default_dtype,
};

struct TextEncoderPart {
    tokenizer: Arc<ClipTokenizer>,
    encoder: ClipTextEncoder,
    /// Where it runs: the model's device, or the CPU when its memory is kept for the UNet.
    device: Device,
    /// Its weights' precision (f32 on the CPU).
    dtype: DType,
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
    unet_weights: ComponentWeights,
    /// The VAE's weights, read again for the encoder the first time an image is encoded.
    vae_weights: ComponentWeights,
    /// Built on first use: text-to-image never pays for it.
    vae_encoder: std::sync::OnceLock<VaeEncoder>,
    /// The latent-to-RGB map of cheap previews, chosen (or fitted) at the first preview.
    preview_projection: std::sync::OnceLock<crate::engine::preview::LatentProjection>,
    /// Whether decodes and encodes go tile by tile.
    vae_tiling: crate::engine::vae_tiling::VaeTilingCell,
    /// The text encoders' and UNet's weights by name, for LoRAs to change in place.
    weights: WeightTable,
    /// The LoRAs merged into `weights` now, and the originals they changed.
    loras: crate::engine::lora::AppliedLoras,
    /// Textual inversions available to prompts.
    embeddings: Vec<Arc<crate::engine::embeddings::TextualInversion>>,
}

impl StableDiffusion {
    /// Where the text encoders run and in what precision (the CPU in f32 when they are kept
    /// off the GPU, else the model's device and precision).
    pub fn text_encoders_placement(&self) -> (Device, DType) {
        match self.text_encoders.first() {
            Some(part) => (part.device.clone(), part.dtype),
            None => (self.device.clone(), self.dtype),
        }
    }

    /// The UNet's weights file (hashed for the images' metadata): a single file's whole
    /// checkpoint, as A1111 hashes it.
    pub fn unet_weights(&self) -> &Path {
        self.unet_weights.path()
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

    /// What the model predicts (its scheduler config's, after any override); epsilon when the
    /// config names something unknown (the scheduler will refuse it when it is built).
    pub fn prediction(&self) -> crate::schedulers::Prediction {
        crate::schedulers::Prediction::from_config(&self.scheduler_config)
            .unwrap_or(crate::schedulers::Prediction::Epsilon)
    }

    /// How many size/crop/score ids SDXL's added embedding reads: 6 for the base, 5 for the
    /// refiner (no target size, an aesthetic score); `None` for UNets without one.
    pub fn time_id_count(&self) -> Option<usize> {
        let config = self.unet.config();
        let width = config.addition_time_embed_dim.filter(|&w| w > 0)?;
        let input = config.projection_class_embeddings_input_dim?;
        let pooled = self.text_encoders.last().map(|part| {
            let config = part.encoder.config();
            config.projection_dim.unwrap_or(config.hidden_size)
        })?;
        Some(input.checked_sub(pooled)? / width)
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
}
