//! The VAE both ways: latents to pixels (decode, 8-bit images, cheap previews) and pixels to
//! latents (encode, for image to image).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::StableDiffusion;
use crate::engine::error::{EngineError, Result};
use crate::engine::preview::project_latents;
use crate::engine::vae::{LatentDistribution, VaeEncoder};

impl StableDiffusion {
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

    /// The VAE encoder, built from the VAE's weights the first time it is needed.
    fn vae_encoder(&self) -> Result<&VaeEncoder> {
        if let Some(encoder) = self.vae_encoder.get() {
            return Ok(encoder);
        }
        let vb = self.vae_weights.var_builder(self.vae_dtype, &self.device)?;
        let encoder = VaeEncoder::new(self.vae.config(), vb)?;
        // Another thread may have built it meanwhile: either copy is the same.
        Ok(self.vae_encoder.get_or_init(|| encoder))
    }

    /// The latent distribution of images in [-1, 1] `(batch, 3, H, W)`, in the VAE's own
    /// (unscaled) space, f32.
    pub fn encode_pixels(&self, pixels: &Tensor) -> Result<LatentDistribution> {
        let encoder = self.vae_encoder()?;
        let pixels = pixels.to_device(&self.device)?.to_dtype(self.vae_dtype)?;
        let distribution = encoder.encode(&pixels)?;
        Ok(LatentDistribution {
            mean: distribution.mean.to_dtype(DType::F32)?,
            std: distribution.std.to_dtype(DType::F32)?,
        })
    }

    /// Latents for the UNet from the VAE's own: `(x - shift) * scaling_factor`, as diffusers'
    /// pipelines scale encoded images (the inverse of what [`Self::decode_to_tensor`] undoes).
    pub fn scale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let config = self.vae.config();
        let shifted = match config.shift_factor {
            Some(shift) => (latents - shift)?,
            None => latents.clone(),
        };
        Ok((shifted * config.scaling_factor)?)
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
