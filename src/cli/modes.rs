//! The options of `atelier generate` that pick a mode other than text to image: an init image
//! (image to image), a mask (inpainting), a larger canvas (outpainting), and a second, larger pass
//! (hires fix). Files are read and checked here, before the model loads.

use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{Device, Tensor};
use clap::Args;
use image::{GrayImage, RgbImage};

use crate::engine::init_image::{
    HiresUpscaler, MaskedContent, Outpaint, Region, ResizeMode, fill_masked, fit_init_image,
    image_to_tensor, mask_from_image, mask_to_tensor, masked_region, paste_back, prepare_mask,
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
    /// What the masked region starts from: original, fill (its surroundings smeared in) or noise
    /// (fresh latent noise).
    #[arg(long, default_value = "original")]
    pub masked_content: String,
    /// full (the whole picture at the job's size) or masked (A1111's "only masked": a crop around
    /// the mask at the job's size, pasted back into the picture with a feathered edge).
    #[arg(long, default_value = "full")]
    pub inpaint_area: String,
    /// With --inpaint-area masked: pixels around the mask taken into the crop.
    #[arg(long, default_value_t = 32)]
    pub inpaint_padding: u32,
}

/// What the image options read: the picture and mask to start from, if any.
pub struct ImageInput {
    image: RgbImage,
    mask: Option<GrayImage>,
    /// The denoising strength.
    pub strength: f64,
    resize_mode: ResizeMode,
    mask_blur: f32,
    masked_content: MaskedContent,
    /// "Only masked": the padding around the mask.
    only_masked: Option<u32>,
}

impl ImageInputArgs {
    /// Reads and checks the files; `None` for text to image.
    pub fn load(&self) -> anyhow::Result<Option<ImageInput>> {
        let resize_mode = ResizeMode::parse(&self.resize_mode)?;
        let masked_content = MaskedContent::parse(&self.masked_content)?;
        let only_masked = match self.inpaint_area.as_str() {
            "full" => None,
            "masked" => Some(self.inpaint_padding),
            other => bail!("--inpaint-area takes full or masked, got {other:?}"),
        };
        let outpaint = self.outpaint.as_deref().map(Outpaint::parse).transpose()?;
        let Some(path) = &self.init_image else {
            for (given, flag) in [
                (self.mask.is_some(), "--mask"),
                (outpaint.is_some(), "--outpaint"),
                (self.strength.is_some(), "--strength"),
                (only_masked.is_some(), "--inpaint-area masked"),
                (
                    masked_content != MaskedContent::Original,
                    "--masked-content",
                ),
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
        if mask.is_none() && (only_masked.is_some() || masked_content != MaskedContent::Original) {
            bail!("--inpaint-area masked and --masked-content need a mask (--mask or --outpaint)");
        }
        Ok(Some(ImageInput {
            image,
            mask,
            strength: self
                .strength
                .unwrap_or(if outpaint.is_some() { 1.0 } else { 0.75 }),
            resize_mode,
            mask_blur: self.mask_blur,
            masked_content,
            only_masked,
        }))
    }
}

impl ImageInput {
    /// The size the job runs at unless --width/--height say otherwise: the picture's (after
    /// outpainting), or `None` for "only masked", which runs at the model's own size.
    pub fn default_size(&self) -> Option<(u32, u32)> {
        match self.only_masked {
            Some(_) => None,
            None => Some(self.image.dimensions()),
        }
    }

    /// Whether the masked region starts from fresh latent noise.
    pub fn latent_noise(&self) -> bool {
        self.masked_content == MaskedContent::LatentNoise
    }

    /// The "only masked" crop of the picture, if that is the mode.
    fn crop(&self, width: u32, height: u32) -> Option<Region> {
        let padding = self.only_masked?;
        masked_region(self.mask.as_ref()?, padding, width, height)
    }

    /// The picture (its masked region filled when asked), and the mask if any, fitted to
    /// `width` x `height` as the engine takes them; for "only masked", the crop around the mask.
    pub fn tensors(&self, width: usize, height: usize) -> anyhow::Result<(Tensor, Option<Tensor>)> {
        let (w, h) = (width as u32, height as u32);
        let mut image = self.image.clone();
        if let (MaskedContent::Fill, Some(mask)) = (self.masked_content, &self.mask) {
            image = fill_masked(&image, mask);
        }
        let mut mask = self.mask.clone();
        // "Only masked" works on the crop, stretched to the job's size (same aspect ratio).
        let mode = match self.crop(w, h) {
            Some((x, y, cw, ch)) => {
                image = image::imageops::crop_imm(&image, x, y, cw, ch).to_image();
                mask = mask.map(|m| image::imageops::crop_imm(&m, x, y, cw, ch).to_image());
                ResizeMode::JustResize
            }
            None => self.resize_mode,
        };
        let pixels = image_to_tensor(&fit_init_image(&image, w, h, mode), &Device::Cpu)?;
        let mask = match &mask {
            Some(mask) => Some(mask_to_tensor(
                &prepare_mask(mask, w, h, mode, self.mask_blur),
                &Device::Cpu,
            )?),
            None => None,
        };
        Ok((pixels, mask))
    }

    /// The engine's images as the artist gets them: for "only masked", each pasted back into the
    /// whole picture over the crop, blended by the blurred mask (the picture outside it kept as
    /// it was); otherwise unchanged.
    pub fn finish(&self, images: Vec<RgbImage>, width: usize, height: usize) -> Vec<RgbImage> {
        let (Some(region), Some(mask)) = (self.crop(width as u32, height as u32), &self.mask)
        else {
            return images;
        };
        let (w, h) = self.image.dimensions();
        let feathered = prepare_mask(mask, w, h, ResizeMode::JustResize, self.mask_blur);
        images
            .iter()
            .map(|image| paste_back(&self.image, image, region, &feathered))
            .collect()
    }

    /// A1111's infotext entries for this input.
    pub fn infotext(&self) -> Vec<(String, String)> {
        let mut pairs = vec![("Denoising strength".into(), self.strength.to_string())];
        if self.mask.is_some() {
            pairs.push(("Mask blur".into(), self.mask_blur.to_string()));
            pairs.push((
                "Masked content".into(),
                self.masked_content.display_name().into(),
            ));
            if let Some(padding) = self.only_masked {
                pairs.push(("Inpaint area".into(), "Only masked".into()));
                pairs.push(("Masked area padding".into(), padding.to_string()));
            }
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
