//! The VAE both ways: latents to pixels (decode, 8-bit images, cheap previews) and pixels to
//! latents (encode, for image to image).

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::StableDiffusion;
use crate::engine::error::{EngineError, Result};
use crate::engine::preview::LatentProjection;
use crate::engine::vae::{LatentDistribution, VaeEncoder};
use crate::engine::vae_tiling::{
    AUTO_TILING_ABOVE_BYTES, GPU_MARGIN_BYTES, TileSizes, TileStatistics, VaeTiling,
    decode_in_tiles, estimated_untiled_bytes, moments_in_tiles,
};

impl StableDiffusion {
    /// Decodes latents (in the UNet's scaled space) to RGB images in [0, 1] `(batch, 3, H, W)`.
    pub fn decode_to_tensor(&self, latents: &Tensor) -> Result<Tensor> {
        let config = self.vae.config();
        let mut scaled = (latents.to_dtype(DType::F32)? / config.scaling_factor)?;
        if let Some(shift) = config.shift_factor {
            scaled = (scaled + shift)?;
        }
        let scaled = scaled.to_dtype(self.vae_dtype)?;
        let (batch, _, height, width) = scaled.dims4()?;
        let factor = self.vae_scale_factor();
        let decoded = if self.tiles_vae(batch, height * factor, width * factor) {
            decode_in_tiles(
                &self.vae,
                &scaled,
                self.vae_tile_sizes(),
                TileStatistics::Shared,
            )?
        } else {
            self.vae.decode(&scaled)?
        };
        Ok(((decoded.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0.0, 1.0)?)
    }

    /// How decodes and encodes choose between tiles and one pass.
    pub fn vae_tiling(&self) -> VaeTiling {
        self.vae_tiling.get()
    }

    /// Chooses how decodes and encodes run from now on.
    pub fn set_vae_tiling(&self, tiling: VaeTiling) {
        self.vae_tiling.set(tiling);
    }

    /// The VAE's tiles: its config's `sample_size` as diffusers tiles, at most 512 pixels.
    pub fn vae_tile_sizes(&self) -> TileSizes {
        TileSizes::new(self.vae.config().sample_size, self.vae_scale_factor())
    }

    /// Whether a decode or encode of `batch` images of `height_px` x `width_px` goes in tiles.
    pub fn tiles_vae(&self, batch: usize, height_px: usize, width_px: usize) -> bool {
        let tile = self.vae_tile_sizes().sample_px;
        if height_px <= tile && width_px <= tile {
            return false;
        }
        match self.vae_tiling() {
            VaeTiling::Always => true,
            VaeTiling::Never => false,
            VaeTiling::Auto => self
                .gpu_short_for_untiled_vae(batch, height_px, width_px)
                .unwrap_or_else(|| {
                    self.untiled_vae_bytes(batch, height_px, width_px) > AUTO_TILING_ABOVE_BYTES
                }),
        }
    }

    /// The activation memory of an untiled VAE pass over `batch` images of `height_px` x
    /// `width_px` (see [`estimated_untiled_bytes`]).
    fn untiled_vae_bytes(&self, batch: usize, height_px: usize, width_px: usize) -> usize {
        let channels = self.vae.config().block_out_channels.first().copied();
        estimated_untiled_bytes(
            batch,
            height_px,
            width_px,
            channels.unwrap_or(128),
            self.vae_dtype,
        )
    }

    /// Whether the GPU's free memory is short of an untiled VAE pass (with a margin); `None`
    /// where the device does not say (off CUDA).
    pub(super) fn gpu_short_for_untiled_vae(
        &self,
        batch: usize,
        height_px: usize,
        width_px: usize,
    ) -> Option<bool> {
        let free = crate::engine::profile::free_gpu_memory_bytes(&self.device)?;
        let needed = self.untiled_vae_bytes(batch, height_px, width_px) + GPU_MARGIN_BYTES;
        Some(needed > free as usize)
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
        let (batch, _, height, width) = pixels.dims4()?;
        let moments = if self.tiles_vae(batch, height, width) {
            let factor = self.vae_scale_factor();
            moments_in_tiles(
                encoder,
                &pixels,
                self.vae_tile_sizes(),
                factor,
                TileStatistics::Shared,
            )?
        } else {
            encoder.moments(&pixels)?
        };
        encoder.distribution(&moments.to_dtype(DType::F32)?)
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
        self.preview_projection().project(latents)
    }

    /// The latent-to-RGB map of previews: the published one for the VAE that SD 1.x/2.x/XL
    /// ship with (its shape), else one fitted to this VAE by encoding a card of colours.
    pub fn preview_projection(&self) -> LatentProjection {
        *self.preview_projection.get_or_init(|| {
            let config = self.vae.config();
            if config.block_out_channels == [128, 256, 512, 512] {
                return LatentProjection::published(self.family);
            }
            self.fitted_projection()
                .unwrap_or_else(|_| LatentProjection::published(self.family))
        })
    }

    /// Encodes a test card of 16 colours (4 x 4 blocks of 4 x 4 latent cells) and fits the map
    /// from each block's inner latent cells to its colour.
    fn fitted_projection(&self) -> Result<LatentProjection> {
        const PALETTE: [[f32; 3]; 16] = [
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [1.0, 1.0, 0.0],
            [0.0, 1.0, 1.0],
            [1.0, 0.0, 1.0],
            [0.5, 0.5, 0.5],
            [1.0, 0.5, 0.0],
            [1.0, 0.55, 0.75],
            [0.45, 0.27, 0.1],
            [0.5, 0.2, 0.7],
            [0.1, 0.5, 0.5],
            [0.25, 0.25, 0.25],
            [0.8, 0.8, 0.8],
        ];
        const BLOCK_CELLS: usize = 4;
        let factor = self.vae_scale_factor();
        let cells = 4 * BLOCK_CELLS;
        let side = cells * factor;
        let block_of =
            |cell_x: usize, cell_y: usize| (cell_y / BLOCK_CELLS) * 4 + cell_x / BLOCK_CELLS;
        let mut pixels = vec![0f32; 3 * side * side];
        for y in 0..side {
            for x in 0..side {
                let colour = PALETTE[block_of(x / factor, y / factor)];
                for c in 0..3 {
                    pixels[c * side * side + y * side + x] = colour[c] * 2.0 - 1.0;
                }
            }
        }
        let pixels = Tensor::from_vec(pixels, (1, 3, side, side), &Device::Cpu)?;
        let latents = self.scale_latents(&self.encode_pixels(&pixels)?.mean)?;
        let planes: Vec<Vec<f32>> = latents
            .get(0)?
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_from(1)?
            .to_vec2()?;
        if planes.len() != 4 {
            return Err(EngineError::Unsupported(
                "latent previews need 4 latent channels".into(),
            ));
        }
        let mut inputs = Vec::new();
        let mut colours = Vec::new();
        for cell_y in 0..cells {
            for cell_x in 0..cells {
                // Inner cells only: their pixels are all of one colour.
                let (inner_x, inner_y) = (cell_x % BLOCK_CELLS, cell_y % BLOCK_CELLS);
                if inner_x == 0
                    || inner_y == 0
                    || inner_x == BLOCK_CELLS - 1
                    || inner_y == BLOCK_CELLS - 1
                {
                    continue;
                }
                let index = cell_y * cells + cell_x;
                inputs.push([
                    planes[0][index],
                    planes[1][index],
                    planes[2][index],
                    planes[3][index],
                ]);
                colours.push(PALETTE[block_of(cell_x, cell_y)].map(|c| c * 2.0 - 1.0));
            }
        }
        LatentProjection::fit(&inputs, &colours).ok_or_else(|| {
            EngineError::Unsupported("the VAE's latents do not span four dimensions".into())
        })
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
