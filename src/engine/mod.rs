//! The Stable Diffusion engine: models, text encoding, the denoising loop and previews.
//!
//! Nothing here knows about the window; the UI and the CLI drive it through [`pipeline`].

pub mod bench;
pub mod checkpoint;
pub mod clip;
pub mod config;
pub mod cpu_kernels;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod embeddings;
pub mod error;
pub mod extra_networks;
pub mod file_cache;
pub mod fused;
pub mod init_image;
pub mod lora;
pub mod nn;
pub mod noise;
pub mod npy;
pub mod pipeline;
pub mod preview;
pub mod profile;
pub mod prompt_schedule;
pub mod prompt_syntax;
pub mod random;
pub mod shared_norm;
pub mod source;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vae_tiling;
pub mod weights;

pub use error::{EngineError, Result};

/// What the engine's unit tests share.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::Tensor;

    /// The largest |a - b| of two tensors of one shape.
    pub(crate) fn max_abs_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("tensors of one shape and dtype f32")
    }
}
