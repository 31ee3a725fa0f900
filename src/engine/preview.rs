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

/// Projects the first latent of `latents` `(batch, 4, h, w)` (in the UNet's scaled space) to an
/// RGB image of `h x w` pixels, then maps [-1, 1] to [0, 255].
pub fn project_latents(latents: &Tensor, family: ModelFamily) -> Result<RgbImage> {
    let (_, channels, height, width) = latents.dims4()?;
    if channels != 4 {
        return Err(EngineError::Unsupported(format!(
            "latent previews need 4 latent channels, the model has {channels}"
        )));
    }
    let (factors, bias) = match family {
        ModelFamily::Sdxl => (&SDXL_LATENT_RGB, &SDXL_BIAS),
        ModelFamily::Sd1 | ModelFamily::Sd2 => (&SD1_LATENT_RGB, &SD1_BIAS),
    };
    let planes: Vec<Vec<f32>> = latents
        .get(0)?
        .to_dtype(DType::F32)?
        .to_device(&candle_core::Device::Cpu)?
        .flatten_from(1)?
        .to_vec2()?;
    let mut image = RgbImage::new(width as u32, height as u32);
    for (index, pixel) in image.pixels_mut().enumerate() {
        for (rgb, value) in pixel.0.iter_mut().enumerate() {
            let mut sum = bias[rgb];
            for (channel, plane) in planes.iter().enumerate() {
                sum += plane[index] * factors[channel][rgb];
            }
            *value = (((sum + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    Ok(image)
}
