//! The options of `atelier generate` that pick a mode other than text to image: an init image
//! (image to image), a mask (inpainting), a larger canvas (outpainting), and a second, larger pass
//! (hires fix). Files are read and checked here, before the model loads.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use image::{GrayImage, RgbImage};

use crate::engine::init_image::{
    HiresUpscaler, Outpaint, ResizeMode, fit_init_image, image_to_tensor, mask_from_image,
    mask_to_tensor, prepare_mask,
};
use crate::gallery::png_read::{decode_bounded, decode_rgb_bounded};

/// Image to image, inpainting and outpainting.
#[derive(Debug, Clone, Args)]
pub struct ImageInputArgs {
    /// Image to image: start from this picture (PNG or JPEG) instead of noise.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// With --init-image: how much of it is repainted, above 0 to 1 (A1111's denoising
    /// strength; default 0.75, or 1 when outpainting).
    #[arg(long)]
    pub strength: Option<f64>,
    /// With --init-image of another size: just-resize, crop-and-resize or resize-and-fill.
    #[arg(long, default_value = "just-resize")]
    pub resize_mode: String,
    /// Inpainting: repaint where this image is white (a black-and-white mask) or transparent (an
    /// image with an alpha channel); resized to the output size.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Blur the mask by a Gaussian of this many pixels first (A1111's mask blur).
    #[arg(long, default_value_t = 4.0)]
    pub mask_blur: f32,
    /// Outpainting: extend the init image by LEFT,TOP,RIGHT,BOTTOM pixels and paint the new area.
    #[arg(long)]
    pub outpaint: Option<String>,
}

/// What the image options read: the picture and mask to start from, if any.
pub struct ImageInput {
    image: RgbImage,
    mask: Option<GrayImage>,
    /// The denoising strength.
    pub strength: f64,
    resize_mode: ResizeMode,
    mask_blur: f32,
}

impl ImageInputArgs {
    /// Reads and checks the files; `None` for text to image.
    pub fn load(&self) -> anyhow::Result<Option<ImageInput>> {
        let resize_mode = ResizeMode::parse(&self.resize_mode)?;
        let outpaint = self.outpaint.as_deref().map(Outpaint::parse).transpose()?;
        let Some(path) = &self.init_image else {
            for (given, flag) in [
                (self.mask.is_some(), "--mask"),
                (outpaint.is_some(), "--outpaint"),
                (self.strength.is_some(), "--strength"),
            ] {
                if given {
                    bail!("{flag} needs --init-image (the picture to work on)");
                }
            }
            return Ok(None);
        };
        if !(self.mask_blur >= 0.0 && self.mask_blur <= 64.0) {
            bail!(
                "--mask-blur must be between 0 and 64 pixels, got {}",
                self.mask_blur
            );
        }
        let image =
            decode_rgb_bounded(path).with_context(|| format!("--init-image {}", path.display()))?;
        let mask = match &self.mask {
            Some(mask_path) => {
                if outpaint.is_some() {
                    bail!(
                        "--outpaint makes its own mask (the new area): give one of --mask and --outpaint"
                    );
                }
                let decoded = decode_bounded(mask_path)
                    .with_context(|| format!("--mask {}", mask_path.display()))?;
                let mask = mask_from_image(&decoded);
                if !mask.pixels().any(|p| p[0] >= 128) {
                    bail!(
                        "--mask {}: the mask is empty (nothing is white or transparent): nothing would be repainted",
                        mask_path.display()
                    );
                }
                Some(mask)
            }
            None => None,
        };
        let (image, mask) = match outpaint {
            Some(outpaint) => {
                let (canvas, mask) = outpaint.extend(&image);
                (canvas, Some(mask))
            }
            None => (image, mask),
        };
        Ok(Some(ImageInput {
            image,
            mask,
            strength: self
                .strength
                .unwrap_or(if outpaint.is_some() { 1.0 } else { 0.75 }),
            resize_mode,
            mask_blur: self.mask_blur,
        }))
    }
}

impl ImageInput {
    /// The picture's size (after outpainting).
    pub fn size(&self) -> (u32, u32) {
        self.image.dimensions()
    }

    /// Whether a region is repainted (inpainting or outpainting).
    pub fn has_mask(&self) -> bool {
        self.mask.is_some()
    }

    /// The picture, and the mask if any, fitted to `width` x `height` as the engine takes them.
    pub fn tensors(&self, width: usize, height: usize) -> anyhow::Result<(Tensor, Option<Tensor>)> {
        let (w, h) = (width as u32, height as u32);
        let pixels = image_to_tensor(
            &fit_init_image(&self.image, w, h, self.resize_mode),
            &Device::Cpu,
        )?;
        let mask = match &self.mask {
            Some(mask) => Some(mask_to_tensor(
                &prepare_mask(mask, w, h, self.resize_mode, self.mask_blur),
                &Device::Cpu,
            )?),
            None => None,
        };
        Ok((pixels, mask))
    }

    /// A1111's infotext entries for this input.
    pub fn infotext(&self) -> Vec<(String, String)> {
        let mut pairs = vec![("Denoising strength".into(), self.strength.to_string())];
        if self.mask.is_some() {
            pairs.push(("Mask blur".into(), self.mask_blur.to_string()));
        }
        pairs
    }
}

/// The hires fix: a second pass at a larger size, as A1111's txt2img does it.
#[derive(Debug, Clone, Args)]
pub struct HiresArgs {
    /// Hires fix: generate at the base size, enlarge by this factor, then denoise again.
    #[arg(long)]
    pub hires_scale: Option<f64>,
    /// The second pass's denoising strength.
    #[arg(long, default_value_t = 0.7)]
    pub hires_strength: f64,
    /// The second pass's steps (default: the same as --steps).
    #[arg(long)]
    pub hires_steps: Option<usize>,
    /// latent (bilinear), latent-nearest or lanczos (the decoded image, encoded again).
    #[arg(long, default_value = "latent")]
    pub hires_upscaler: String,
}

/// A checked hires fix.
#[derive(Debug, Clone, Copy)]
pub struct Hires {
    /// The enlargement.
    pub scale: f64,
    /// The second pass's strength.
    pub strength: f64,
    /// The second pass's steps (`None`: the first pass's).
    pub steps: Option<usize>,
    /// How the first pass is enlarged.
    pub upscaler: HiresUpscaler,
}

impl HiresArgs {
    /// The hires fix asked for, checked; `None` without --hires-scale.
    pub fn load(&self, with_init_image: bool) -> anyhow::Result<Option<Hires>> {
        let Some(scale) = self.hires_scale else {
            return Ok(None);
        };
        if with_init_image {
            bail!("--hires-scale is a second pass of text to image: it does not take --init-image");
        }
        if !(scale > 1.0 && scale <= 4.0) {
            bail!("--hires-scale must be above 1 and at most 4, got {scale}");
        }
        Ok(Some(Hires {
            scale,
            strength: self.hires_strength,
            steps: self.hires_steps,
            upscaler: HiresUpscaler::parse(&self.hires_upscaler)?,
        }))
    }
}

impl Hires {
    /// The second pass's size for a first pass of `width` x `height`, in multiples of `multiple`.
    pub fn size(&self, width: usize, height: usize, multiple: usize) -> (usize, usize) {
        let scaled = |v: usize| {
            let target = (v as f64 * self.scale).round() as usize;
            ((target / multiple) * multiple).max(multiple)
        };
        (scaled(width), scaled(height))
    }

    /// A1111's infotext entries.
    pub fn infotext(&self, steps: usize) -> Vec<(String, String)> {
        vec![
            ("Denoising strength".into(), self.strength.to_string()),
            ("Hires upscale".into(), self.scale.to_string()),
            (
                "Hires steps".into(),
                self.steps.unwrap_or(steps).to_string(),
            ),
            ("Hires upscaler".into(), self.upscaler.display_name().into()),
        ]
    }
}
