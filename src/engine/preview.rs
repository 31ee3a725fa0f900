//! Cheap previews: project the 4 latent channels to RGB with a fixed linear map.

use candle_core::{DType, Tensor};
use image::RgbImage;

use super::error::{EngineError, Result};
use super::pipeline::ModelFamily;

/// Rows = latent channels, columns = R, G, B (AUTOMATIC1111's approximation for SD 1.x/2.x).
const SD1_LATENT_RGB: [[f32; 3]; 4] = [
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
];
const SD1_BIAS: [f32; 3] = [0.0, 0.0, 0.0];

/// SDXL's latent space differs; these are the published SDXL factors and bias (ComfyUI).
const SDXL_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
];
const SDXL_BIAS: [f32; 3] = [0.1084, -0.0175, -0.0011];

/// A linear map from the 4 latent channels (in the UNet's scaled space) to RGB in [-1, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatentProjection {
    /// Rows = latent channels, columns = R, G, B.
    pub factors: [[f32; 3]; 4],
    /// Added to each colour.
    pub bias: [f32; 3],
}

impl LatentProjection {
    /// The published map of the VAE that SD 1.x/2.x or SDXL ship with.
    pub fn published(family: ModelFamily) -> Self {
        match family {
            ModelFamily::Sdxl => Self {
                factors: SDXL_LATENT_RGB,
                bias: SDXL_BIAS,
            },
            ModelFamily::Sd1 | ModelFamily::Sd2 => Self {
                factors: SD1_LATENT_RGB,
                bias: SD1_BIAS,
            },
        }
    }

    /// The least-squares map from `latents` to `colours` (pairs of one latent cell and the
    /// mean colour of the pixels it encodes, in [-1, 1]); `None` with fewer than 5 pairs or
    /// latents that do not span 4 dimensions.
    #[allow(clippy::needless_range_loop)] // matrix elimination reads best with indices
    pub fn fit(latents: &[[f32; 4]], colours: &[[f32; 3]]) -> Option<Self> {
        if latents.len() < 5 || latents.len() != colours.len() {
            return None;
        }
        // Normal equations of [latent, 1] x = colour, one right-hand side per channel.
        let mut gram = [[0f64; 5]; 5];
        let mut rhs = [[0f64; 3]; 5];
        for (latent, colour) in latents.iter().zip(colours) {
            let row = [
                latent[0] as f64,
                latent[1] as f64,
                latent[2] as f64,
                latent[3] as f64,
                1.0,
            ];
            for i in 0..5 {
                for j in 0..5 {
                    gram[i][j] += row[i] * row[j];
                }
                for c in 0..3 {
                    rhs[i][c] += row[i] * colour[c] as f64;
                }
            }
        }
        // Gauss-Jordan elimination with partial pivoting.
        for column in 0..5 {
            let pivot = (column..5)
                .max_by(|a, b| gram[*a][column].abs().total_cmp(&gram[*b][column].abs()))?;
            if gram[pivot][column].abs() < 1e-9 {
                return None;
            }
            gram.swap(column, pivot);
            rhs.swap(column, pivot);
            for row in 0..5 {
                if row != column {
                    let ratio = gram[row][column] / gram[column][column];
                    for k in 0..5 {
                        gram[row][k] -= ratio * gram[column][k];
                    }
                    for c in 0..3 {
                        rhs[row][c] -= ratio * rhs[column][c];
                    }
                }
            }
        }
        let mut factors = [[0f32; 3]; 4];
        let mut bias = [0f32; 3];
        for c in 0..3 {
            for (channel, row) in factors.iter_mut().enumerate() {
                row[c] = (rhs[channel][c] / gram[channel][channel]) as f32;
            }
            bias[c] = (rhs[4][c] / gram[4][4]) as f32;
        }
        Some(Self { factors, bias })
    }

    /// Projects the first latent of `latents` `(batch, 4, h, w)` (in the UNet's scaled space)
    /// to an RGB image of `h x w` pixels, mapping [-1, 1] to [0, 255].
    pub fn project(&self, latents: &Tensor) -> Result<RgbImage> {
        let (_, channels, height, width) = latents.dims4()?;
        if channels != 4 {
            return Err(EngineError::Unsupported(format!(
                "latent previews need 4 latent channels, the model has {channels}"
            )));
        }
        let planes: Vec<Vec<f32>> = latents
            .get(0)?
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .flatten_from(1)?
            .to_vec2()?;
        let mut image = RgbImage::new(width as u32, height as u32);
        for (index, pixel) in image.pixels_mut().enumerate() {
            for (rgb, value) in pixel.0.iter_mut().enumerate() {
                let mut sum = self.bias[rgb];
                for (channel, plane) in planes.iter().enumerate() {
                    sum += plane[index] * self.factors[channel][rgb];
                }
                *value = (((sum + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        Ok(image)
    }

    /// The map as tensors on `device`, made once for a job's previews.
    pub fn on_device(&self, device: &candle_core::Device) -> Result<DeviceProjection> {
        let factors: Vec<f32> = self.factors.iter().flatten().copied().collect();
        Ok(DeviceProjection {
            host: *self,
            factors: Tensor::from_vec(factors, (4, 3), device)?,
            bias: Tensor::from_vec(self.bias.to_vec(), (1, 3), device)?,
        })
    }
}

/// A [`LatentProjection`] whose factors and bias are tensors on a device.
#[derive(Debug, Clone)]
pub struct DeviceProjection {
    /// The map itself (for the CPU's direct projection).
    pub host: LatentProjection,
    factors: Tensor,
    bias: Tensor,
}

impl DeviceProjection {
    /// [`LatentProjection::project`]'s pixels computed where `latents` are: `(h, w, 3)` bytes,
    /// contiguous, still on the device (nothing waits for the GPU).
    pub fn project(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, channels, height, width) = latents.dims4()?;
        if channels != 4 {
            return Err(EngineError::Unsupported(format!(
                "latent previews need 4 latent channels, the model has {channels}"
            )));
        }
        // (h * w, 4) x (4, 3) + bias, then [-1, 1] to [0, 255] rounded as `project` does.
        let cells = latents
            .get(0)?
            .to_dtype(DType::F32)?
            .reshape((4, height * width))?
            .t()?
            .contiguous()?;
        let rgb = cells.matmul(&self.factors)?.broadcast_add(&self.bias)?;
        let bytes = (((rgb + 1.0)? * 127.5)?.clamp(0.0, 255.0)?.round()?).to_dtype(DType::U8)?;
        Ok(bytes.reshape((height, width, 3))?)
    }
}

/// A cheap preview on its way from the GPU: the projection and the copy to the host are queued
/// behind the step that made it, and [`PendingPreview::finish`] waits only for that copy (the
/// steps queued since keep the GPU busy). On the CPU it is ready at once.
pub enum PendingPreview {
    /// Already an image (CPU, Metal).
    Ready(RgbImage),
    /// Queued on the CUDA stream.
    #[cfg(feature = "cuda")]
    Copying {
        /// The copy into page-locked memory.
        copy: super::cuda::HostCopy,
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
    },
}

impl PendingPreview {
    /// Starts the preview of `latents`' first image; on CUDA, into `buffer` (page-locked host
    /// memory to reuse, from [`PendingPreview::finish`]) when it is large enough.
    pub fn start(
        projection: &DeviceProjection,
        latents: &Tensor,
        buffer: Option<PreviewBuffer>,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if latents.device().is_cuda() {
            let (_, _, height, width) = latents.dims4()?;
            let bytes = projection.project(latents)?;
            let copy = super::cuda::HostCopy::start(&bytes, buffer.map(|b| b.0))?;
            return Ok(PendingPreview::Copying {
                copy,
                width: width as u32,
                height: height as u32,
            });
        }
        let _ = buffer;
        Ok(PendingPreview::Ready(projection.host.project(latents)?))
    }

    /// Whether it is an image already (no waiting).
    pub fn is_ready(&self) -> bool {
        matches!(self, PendingPreview::Ready(_))
    }

    /// The image, once its copy is done, and the buffer to reuse.
    pub fn finish(self) -> Result<(RgbImage, Option<PreviewBuffer>)> {
        match self {
            PendingPreview::Ready(image) => Ok((image, None)),
            #[cfg(feature = "cuda")]
            PendingPreview::Copying {
                copy,
                width,
                height,
            } => {
                let (bytes, buffer) = copy.finish()?;
                let image = RgbImage::from_raw(width, height, bytes).ok_or_else(|| {
                    EngineError::Unsupported("preview has an unexpected size".into())
                })?;
                Ok((image, Some(PreviewBuffer(buffer))))
            }
        }
    }
}

/// Page-locked host memory that previews are copied into, reused from step to step.
pub struct PreviewBuffer(#[cfg(feature = "cuda")] super::cuda::PinnedBytes);

/// Projects the first latent of `latents` with the published map of `family`'s VAE.
pub fn project_latents(latents: &Tensor, family: ModelFamily) -> Result<RgbImage> {
    LatentProjection::published(family).project(latents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fit_recovers_a_linear_map() {
        let truth = LatentProjection {
            factors: [
                [0.5, -0.2, 0.1],
                [0.0, 0.3, -0.4],
                [0.2, 0.2, 0.2],
                [-0.1, 0.0, 0.6],
            ],
            bias: [0.05, -0.1, 0.2],
        };
        let latents: Vec<[f32; 4]> = (0..40)
            .map(|i| {
                let x = i as f32;
                [
                    (x * 0.37).sin(),
                    (x * 0.91).cos(),
                    (x * 1.3).sin(),
                    (x * 0.17).cos(),
                ]
            })
            .collect();
        let colours: Vec<[f32; 3]> = latents
            .iter()
            .map(|l| {
                let mut c = truth.bias;
                for (channel, value) in l.iter().enumerate() {
                    for (rgb, out) in c.iter_mut().enumerate() {
                        *out += value * truth.factors[channel][rgb];
                    }
                }
                c
            })
            .collect();
        let fitted = LatentProjection::fit(&latents, &colours).expect("a fit");
        for channel in 0..4 {
            for rgb in 0..3 {
                assert!((fitted.factors[channel][rgb] - truth.factors[channel][rgb]).abs() < 1e-4);
            }
        }
        for rgb in 0..3 {
            assert!((fitted.bias[rgb] - truth.bias[rgb]).abs() < 1e-4);
        }
        assert!(LatentProjection::fit(&latents[..3], &colours[..3]).is_none());
    }
}
