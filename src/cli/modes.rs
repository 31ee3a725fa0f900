//! The options of `atelier generate` that pick a mode other than text to image: an init image
//! (image to image), a mask (inpainting), a larger canvas (outpainting), and a second, larger pass
//! (hires fix). Files are read and checked here, before the model loads.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Args;

use crate::engine::init_image::{
    HiresUpscaler, MaskedContent, Outpaint, ResizeMode, mask_from_image,
};
use crate::engine::pipeline::{HiresFix, ImageJob, ImageOptions};
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
    /// Inpainting the whole picture: paste the original pixels back outside the blurred mask
    /// (A1111's way); without it, every pixel is the VAE's, as diffusers' pipeline returns them.
    #[arg(long)]
    pub keep_unmasked: bool,
}

impl ImageInputArgs {
    /// Reads and checks the files; `None` for text to image.
    pub fn load(&self) -> anyhow::Result<Option<ImageJob>> {
        let resize_mode = ResizeMode::parse(&self.resize_mode)?;
        let masked_content = MaskedContent::parse(&self.masked_content)?;
        let only_masked_padding = match self.inpaint_area.as_str() {
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
                (only_masked_padding.is_some(), "--inpaint-area masked"),
                (self.keep_unmasked, "--keep-unmasked"),
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
        let options = ImageOptions {
            strength: self
                .strength
                .unwrap_or(if outpaint.is_some() { 1.0 } else { 0.75 }),
            resize_mode,
            mask_blur: self.mask_blur,
            masked_content,
            only_masked_padding,
            outpaint,
            keep_unmasked: self.keep_unmasked,
        };
        let image =
            decode_rgb_bounded(path).with_context(|| format!("--init-image {}", path.display()))?;
        let mask = match &self.mask {
            Some(mask_path) => {
                let decoded = decode_bounded(mask_path)
                    .with_context(|| format!("--mask {}", mask_path.display()))?;
                Some(Arc::new(mask_from_image(&decoded)))
            }
            None => None,
        };
        let job = ImageJob::new(Arc::new(image), mask, options).map_err(|error| {
            let named = match &self.mask {
                Some(mask_path) => format!("--mask {}: {error}", mask_path.display()),
                None => error.to_string(),
            };
            anyhow::anyhow!(named)
        })?;
        Ok(Some(job))
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

impl HiresArgs {
    /// The hires fix asked for, checked; `None` without --hires-scale.
    pub fn load(&self, with_init_image: bool) -> anyhow::Result<Option<HiresFix>> {
        let Some(scale) = self.hires_scale else {
            return Ok(None);
        };
        if with_init_image {
            bail!("--hires-scale is a second pass of text to image: it does not take --init-image");
        }
        let hires = HiresFix {
            scale,
            strength: self.hires_strength,
            steps: self.hires_steps,
            upscaler: HiresUpscaler::parse(&self.hires_upscaler)?,
        };
        hires
            .check()
            .map_err(|error| anyhow::anyhow!("--hires-*: {error}"))?;
        Ok(Some(hires))
    }
}
