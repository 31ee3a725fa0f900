//! Init images for image to image: fitted to the job's size as AUTOMATIC1111's resize modes do,
//! and turned into the `(1, 3, H, W)` tensor in [0, 1] that the engine encodes.

use candle_core::{Device, Tensor};
use image::RgbImage;
use image::imageops::FilterType;

use super::error::{EngineError, Result};

/// How an init image of another size is fitted to the job's size (A1111's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Stretch to the size, aspect ratio ignored.
    #[default]
    JustResize,
    /// Scale to cover the size, then cut the overhang evenly from both sides.
    CropAndResize,
    /// Scale to fit inside the size, then fill the rest by extending the edge pixels.
    ResizeAndFill,
}

impl ResizeMode {
    /// Every mode, in menu order.
    pub const ALL: [ResizeMode; 3] = [
        ResizeMode::JustResize,
        ResizeMode::CropAndResize,
        ResizeMode::ResizeAndFill,
    ];

    /// The CLI id, e.g. `crop-and-resize`.
    pub fn id(self) -> &'static str {
        match self {
            ResizeMode::JustResize => "just-resize",
            ResizeMode::CropAndResize => "crop-and-resize",
            ResizeMode::ResizeAndFill => "resize-and-fill",
        }
    }

    /// The name artists know (A1111's), e.g. `Crop and resize`.
    pub fn display_name(self) -> &'static str {
        match self {
            ResizeMode::JustResize => "Just resize",
            ResizeMode::CropAndResize => "Crop and resize",
            ResizeMode::ResizeAndFill => "Resize and fill",
        }
    }

    /// Parses a CLI id; the error lists the valid ones.
    pub fn parse(id: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|mode| mode.id() == id)
            .ok_or_else(|| {
                EngineError::InvalidParameter(format!(
                    "unknown resize mode {id:?}; one of {}",
                    Self::ALL.map(ResizeMode::id).join(", ")
                ))
            })
    }
}

/// `image` fitted to `width` x `height` by `mode` (Lanczos resampling); unchanged when it
/// already has that size.
pub fn fit_init_image(image: &RgbImage, width: u32, height: u32, mode: ResizeMode) -> RgbImage {
    let (w, h) = image.dimensions();
    if (w, h) == (width, height) {
        return image.clone();
    }
    let scaled = |scale: f64| {
        let sw = ((w as f64 * scale).round() as u32).max(1);
        let sh = ((h as f64 * scale).round() as u32).max(1);
        if (sw, sh) == (w, h) {
            return image.clone();
        }
        image::imageops::resize(image, sw, sh, FilterType::Lanczos3)
    };
    match mode {
        ResizeMode::JustResize => {
            image::imageops::resize(image, width, height, FilterType::Lanczos3)
        }
        ResizeMode::CropAndResize => {
            let scale = (width as f64 / w as f64).max(height as f64 / h as f64);
            let cover = scaled(scale);
            let x = (cover.width().saturating_sub(width)) / 2;
            let y = (cover.height().saturating_sub(height)) / 2;
            image::imageops::crop_imm(&cover, x, y, width, height).to_image()
        }
        ResizeMode::ResizeAndFill => {
            let scale = (width as f64 / w as f64).min(height as f64 / h as f64);
            let inside = scaled(scale);
            let x0 = (width.saturating_sub(inside.width())) / 2;
            let y0 = (height.saturating_sub(inside.height())) / 2;
            // Every pixel takes the nearest pixel of the fitted image: the edges extend outward.
            RgbImage::from_fn(width, height, |x, y| {
                let sx = x.saturating_sub(x0).min(inside.width() - 1);
                let sy = y.saturating_sub(y0).min(inside.height() - 1);
                *inside.get_pixel(sx, sy)
            })
        }
    }
}

/// An 8-bit image as the `(1, 3, H, W)` f32 tensor in [0, 1] that image to image takes.
pub fn image_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor> {
    let (width, height) = image.dimensions();
    let values: Vec<f32> = image.as_raw().iter().map(|&b| b as f32 / 255.0).collect();
    let hwc = Tensor::from_vec(values, (height as usize, width as usize, 3), device)?;
    Ok(hwc.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 7])
        })
    }

    #[test]
    fn every_mode_gives_the_size_asked_for() {
        let wide = gradient(40, 20);
        for mode in ResizeMode::ALL {
            assert_eq!(fit_init_image(&wide, 16, 16, mode).dimensions(), (16, 16));
            assert_eq!(fit_init_image(&wide, 30, 10, mode).dimensions(), (30, 10));
        }
        assert_eq!(
            ResizeMode::parse("crop-and-resize").ok(),
            Some(ResizeMode::CropAndResize)
        );
        assert!(ResizeMode::parse("stretch").is_err());
    }

    #[test]
    fn crop_keeps_the_centre_and_fill_extends_the_edges() {
        let wide = gradient(40, 20);
        // Crop: a 20x20 square from the middle of the 40x20 image (no scaling needed).
        let cropped = fit_init_image(&wide, 20, 20, ResizeMode::CropAndResize);
        assert_eq!(cropped.get_pixel(0, 0), wide.get_pixel(10, 0));
        // Fill: the 40x20 image scaled to 20x10 in the middle of 20x20; the top rows repeat the
        // fitted image's first row.
        let filled = fit_init_image(&wide, 20, 20, ResizeMode::ResizeAndFill);
        assert_eq!(filled.get_pixel(7, 0), filled.get_pixel(7, 5));
        assert_eq!(filled.get_pixel(7, 19), filled.get_pixel(7, 14));
    }

    #[test]
    fn the_tensor_is_channels_first_in_zero_to_one() {
        let image = gradient(4, 2);
        let tensor = image_to_tensor(&image, &Device::Cpu).expect("tensor");
        assert_eq!(tensor.dims(), &[1, 3, 2, 4]);
        let red: Vec<f32> = tensor
            .narrow(1, 0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        assert_eq!(red[1], image.get_pixel(1, 0)[0] as f32 / 255.0);
    }
}
