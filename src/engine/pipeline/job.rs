//! A job as the artist describes it (a prompt, and maybe a picture, a mask, a larger canvas or
//! a hires fix), turned into the engine's passes: the one entry point the window's worker and
//! the command line share, so that both do exactly the same thing with the same settings.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};

use super::{GenerationOutput, GenerationRequest, JobInput, PreviewOptions, StableDiffusion};
use super::{StepProgress, Timings};
use crate::engine::error::{EngineError, Result};
use crate::engine::init_image::{
    HiresUpscaler, MaskedContent, Outpaint, Region, ResizeMode, fill_masked, fit_init_image,
    image_to_tensor, mask_to_tensor, masked_region, paste_back, prepare_mask, resize_latents,
};
use crate::engine::prompt_schedule::SchedulePass;

/// How a picture is worked on: everything but the picture and the mask themselves (what the
/// gallery keeps to redo an image, and what the window's controls edit).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImageOptions {
    /// How much of the picture is repainted, above 0 to 1 (A1111's denoising strength).
    pub strength: f64,
    /// How a picture of another size is fitted to the job's.
    pub resize_mode: ResizeMode,
    /// The mask's Gaussian blur in pixels (A1111's mask blur).
    pub mask_blur: f32,
    /// What the masked region starts from.
    pub masked_content: MaskedContent,
    /// A1111's "only masked": the padding in pixels around the mask's crop; `None` works on the
    /// whole picture.
    pub only_masked_padding: Option<u32>,
    /// Outpainting: pixels added on each side; the new area is the mask.
    pub outpaint: Option<Outpaint>,
    /// Inpainting the whole picture: paste the original pixels back outside the (blurred) mask
    /// after decoding, as A1111 does, so that only the masked region changes. Off, the images
    /// are diffusers' inpainting pipeline's own (every pixel through the VAE). "Only masked"
    /// always pastes its crop back.
    pub keep_unmasked: bool,
}

impl Default for ImageOptions {
    fn default() -> Self {
        Self {
            strength: 0.75,
            resize_mode: ResizeMode::JustResize,
            mask_blur: 4.0,
            masked_content: MaskedContent::Original,
            only_masked_padding: None,
            outpaint: None,
            keep_unmasked: false,
        }
    }
}

/// The largest mask blur, in pixels.
pub const MAX_MASK_BLUR: f32 = 64.0;

/// A checked picture to work on: image to image, inpainting (with a mask) or outpainting (the
/// picture on a larger canvas, the new area masked). Cheap to clone.
#[derive(Debug, Clone)]
pub struct ImageJob {
    /// The picture as given (before outpainting extends it).
    pub image: Arc<RgbImage>,
    /// The mask as given (255: repaint), any size: it is resized to the picture's.
    pub mask: Option<Arc<GrayImage>>,
    /// The settings.
    pub options: ImageOptions,
    /// The picture the job works on (extended when outpainting).
    canvas: Arc<RgbImage>,
    /// Its mask, at the canvas' size.
    canvas_mask: Option<Arc<GrayImage>>,
}

impl ImageJob {
    /// Checks a picture, an optional mask and the settings: the strength and blur in range, a
    /// mask with something to repaint, not both a mask and outpainting, and the inpainting
    /// settings only with a mask.
    pub fn new(
        image: Arc<RgbImage>,
        mask: Option<Arc<GrayImage>>,
        options: ImageOptions,
    ) -> Result<Self> {
        let invalid = |message: String| Err(EngineError::InvalidParameter(message));
        check_strength(options.strength)?;
        if !(options.mask_blur >= 0.0 && options.mask_blur <= MAX_MASK_BLUR) {
            return invalid(format!(
                "the mask blur must be between 0 and {MAX_MASK_BLUR} pixels, got {}",
                options.mask_blur
            ));
        }
        let (width, height) = image.dimensions();
        if width == 0 || height == 0 {
            return invalid("the picture is empty (0 pixels)".into());
        }
        if let Some(mask) = &mask {
            if options.outpaint.is_some() {
                return invalid(
                    "outpainting makes its own mask (the new area): give a mask or outpainting, not both"
                        .into(),
                );
            }
            if !mask.pixels().any(|p| p[0] >= 128) {
                return invalid(
                    "the mask is empty (nothing is white or transparent): nothing would be repainted; paint where to repaint"
                        .into(),
                );
            }
        }
        let (canvas, canvas_mask) = match (options.outpaint, &mask) {
            (Some(outpaint), _) => {
                let (canvas, new_area) = outpaint.extend(&image);
                (Arc::new(canvas), Some(Arc::new(new_area)))
            }
            (None, Some(mask)) if mask.dimensions() != (width, height) => {
                let fitted = image::imageops::resize(
                    mask.as_ref(),
                    width,
                    height,
                    image::imageops::FilterType::Triangle,
                );
                (image.clone(), Some(Arc::new(fitted)))
            }
            (None, mask) => (image.clone(), mask.clone()),
        };
        if canvas_mask.is_none()
            && (options.only_masked_padding.is_some()
                || options.masked_content != MaskedContent::Original)
        {
            return invalid(
                "\"only masked\" and the masked content need a mask (paint one, or outpaint)"
                    .into(),
            );
        }
        Ok(Self {
            image,
            mask,
            options,
            canvas,
            canvas_mask,
        })
    }

    /// The same picture and mask at another strength (a comparison's rows).
    pub fn with_strength(&self, strength: f64) -> Result<Self> {
        check_strength(strength)?;
        let mut job = self.clone();
        job.options.strength = strength;
        Ok(job)
    }

    /// Whether a region is repainted (inpainting or outpainting) rather than the whole picture.
    pub fn is_inpainting(&self) -> bool {
        self.canvas_mask.is_some()
    }

    /// The picture the job works on: extended when outpainting.
    pub fn canvas(&self) -> &RgbImage {
        &self.canvas
    }

    /// The size a job runs at unless the artist says otherwise: the canvas' size, or `None` for
    /// "only masked", which runs at the model's own size.
    pub fn default_size(&self) -> Option<(u32, u32)> {
        match self.options.only_masked_padding {
            Some(_) => None,
            None => Some(self.canvas.dimensions()),
        }
    }

    /// The "only masked" crop of the canvas, if that is the mode.
    fn crop(&self, width: u32, height: u32) -> Option<Region> {
        let padding = self.options.only_masked_padding?;
        masked_region(self.canvas_mask.as_deref()?, padding, width, height)
    }

    /// The picture (its masked region filled when asked), and the mask if any, fitted to
    /// `width` x `height` as the engine takes them; for "only masked", the crop around the mask.
    pub fn tensors(&self, width: usize, height: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (w, h) = (width as u32, height as u32);
        let mut image = self.canvas.as_ref().clone();
        let mut mask = self.canvas_mask.as_deref().cloned();
        if let (MaskedContent::Fill, Some(mask)) = (self.options.masked_content, &mask) {
            image = fill_masked(&image, mask);
        }
        // "Only masked" works on the crop, stretched to the job's size (same aspect ratio).
        let mode = match self.crop(w, h) {
            Some((x, y, cw, ch)) => {
                image = image::imageops::crop_imm(&image, x, y, cw, ch).to_image();
                mask = mask.map(|m| image::imageops::crop_imm(&m, x, y, cw, ch).to_image());
                ResizeMode::JustResize
            }
            None => self.options.resize_mode,
        };
        let pixels = image_to_tensor(&fit_init_image(&image, w, h, mode), &Device::Cpu)?;
        let mask = match &mask {
            Some(mask) => Some(mask_to_tensor(
                &prepare_mask(mask, w, h, mode, self.options.mask_blur),
                &Device::Cpu,
            )?),
            None => None,
        };
        Ok((pixels, mask))
    }

    /// The engine's images as the artist gets them: for "only masked", each pasted back into the
    /// whole canvas over the crop, blended by the blurred mask (the picture outside it kept as it
    /// was); with `keep_unmasked`, the picture (fitted to the job's size) pasted back outside the
    /// blurred mask; otherwise unchanged.
    pub fn finish(&self, images: Vec<RgbImage>, width: usize, height: usize) -> Vec<RgbImage> {
        let Some(mask) = self.canvas_mask.as_deref() else {
            return images;
        };
        let (w, h) = (width as u32, height as u32);
        if let Some(region) = self.crop(w, h) {
            let (canvas_w, canvas_h) = self.canvas.dimensions();
            let feathered = prepare_mask(
                mask,
                canvas_w,
                canvas_h,
                ResizeMode::JustResize,
                self.options.mask_blur,
            );
            return images
                .iter()
                .map(|image| paste_back(&self.canvas, image, region, &feathered))
                .collect();
        }
        if !self.options.keep_unmasked {
            return images;
        }
        let mode = self.options.resize_mode;
        let original = fit_init_image(&self.canvas, w, h, mode);
        let feathered = prepare_mask(mask, w, h, mode, self.options.mask_blur);
        images
            .iter()
            .map(|image| paste_back(&original, image, (0, 0, w, h), &feathered))
            .collect()
    }
}

/// Refuses a denoising strength outside (0, 1].
fn check_strength(strength: f64) -> Result<()> {
    if strength > 0.0 && strength <= 1.0 {
        Ok(())
    } else {
        Err(EngineError::InvalidParameter(format!(
            "the denoising strength must be above 0 and at most 1, got {strength}"
        )))
    }
}

/// The hires fix: a second pass at a larger size, as A1111's txt2img does it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HiresFix {
    /// The enlargement, above 1 to 4.
    pub scale: f64,
    /// The second pass's denoising strength.
    pub strength: f64,
    /// The second pass's steps (`None`: the first pass's).
    pub steps: Option<usize>,
    /// How the first pass is enlarged.
    pub upscaler: HiresUpscaler,
}

impl Default for HiresFix {
    fn default() -> Self {
        Self {
            scale: 2.0,
            strength: 0.7,
            steps: None,
            upscaler: HiresUpscaler::Latent,
        }
    }
}

impl HiresFix {
    /// Checks the settings.
    pub fn check(&self) -> Result<()> {
        if !(self.scale > 1.0 && self.scale <= 4.0) {
            return Err(EngineError::InvalidParameter(format!(
                "the hires scale must be above 1 and at most 4, got {}",
                self.scale
            )));
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            return Err(EngineError::InvalidParameter(format!(
                "the hires denoising strength must be above 0 and at most 1, got {}",
                self.strength
            )));
        }
        if self.steps == Some(0) {
            return Err(EngineError::InvalidParameter(
                "the hires pass needs at least one step".into(),
            ));
        }
        Ok(())
    }

    /// The second pass's size for a first pass of `width` x `height`, in multiples of `multiple`.
    pub fn size(&self, width: usize, height: usize, multiple: usize) -> (usize, usize) {
        let multiple = multiple.max(1);
        let scaled = |v: usize| {
            let target = (v as f64 * self.scale).round() as usize;
            ((target / multiple) * multiple).max(multiple)
        };
        (scaled(width), scaled(height))
    }

    /// The second pass's request.
    pub fn second_request(&self, first: &GenerationRequest, multiple: usize) -> GenerationRequest {
        let (width, height) = self.size(first.width, first.height, multiple);
        GenerationRequest {
            width,
            height,
            steps: self.steps.unwrap_or(first.steps),
            ..first.clone()
        }
    }
}

/// Everything a job asks for beside the request.
#[derive(Clone, Copy, Default)]
pub struct JobParts<'a> {
    /// A picture to work on.
    pub image: Option<&'a ImageJob>,
    /// A second, larger pass (text to image only).
    pub hires: Option<&'a HiresFix>,
    /// Standard-normal noise of the job's latent shape used instead of the seed's: the starting
    /// noise, or with a picture the noise added to its latents (diffusers' `add_noise`).
    pub noise: Option<&'a Tensor>,
}

/// A job's result: the images as the artist gets them and the request of the last pass.
pub struct JobResult {
    /// The last pass's output (for "only masked", images pasted back into the canvas).
    pub output: GenerationOutput,
    /// The last pass's request (the hires pass's size and steps).
    pub final_request: GenerationRequest,
    /// The first pass's timings when there was a hires pass.
    pub first_pass: Option<Timings>,
}

impl StableDiffusion {
    /// The size a job with `image` runs at when the artist gives none: the picture's, rounded
    /// down to what the model takes, or the model's own.
    pub fn default_size_for(&self, image: Option<&ImageJob>) -> (usize, usize) {
        let native = self.native_size().unwrap_or(512);
        let multiple = self.vae_scale_factor().max(1);
        let fit = |pixels: u32| ((pixels as usize / multiple) * multiple).max(multiple);
        match image.and_then(ImageJob::default_size) {
            Some((w, h)) => (fit(w), fit(h)),
            None => (native, native),
        }
    }

    /// Runs a whole job: text to image, image to image, inpainting or outpainting, then the
    /// hires pass if asked. `on_step` sees the steps of every pass counted together.
    pub fn run_job(
        &self,
        request: &GenerationRequest,
        parts: JobParts<'_>,
        preview: PreviewOptions,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(StepProgress<'_>),
    ) -> Result<JobResult> {
        if let Some(hires) = parts.hires {
            if parts.image.is_some() {
                return Err(EngineError::InvalidParameter(
                    "the hires fix is a second pass of text to image: it does not take a picture"
                        .into(),
                ));
            }
            hires.check()?;
        }
        self.validate(request)?;
        let second = match parts.hires {
            Some(hires) => {
                let second = hires.second_request(request, self.vae_scale_factor());
                self.validate(&second)?;
                Some(second)
            }
            None => None,
        };
        // Steps counted over both passes: the second pass's are estimated until it starts.
        let second_steps = match (&second, parts.hires) {
            (Some(second), Some(hires)) => {
                crate::schedulers::steps_for_strength(second.steps, hires.strength).max(1)
            }
            _ => 0,
        };
        let mut first_total = 0;
        let mut first_on_step = |step: StepProgress<'_>| {
            first_total = step.total_steps;
            on_step(StepProgress {
                total_steps: step.total_steps + second_steps,
                ..step
            })
        };
        let tensors = match parts.image {
            Some(image) => Some(image.tensors(request.width, request.height)?),
            None => None,
        };
        let input = match (&tensors, parts.image) {
            (Some((pixels, Some(mask))), Some(image)) => JobInput::Inpaint {
                pixels,
                mask,
                strength: image.options.strength,
                sample_noise: None,
                noise: parts.noise,
                masked_sample_noise: None,
                latent_noise: image.options.masked_content == MaskedContent::LatentNoise,
            },
            (Some((pixels, None)), Some(image)) => JobInput::Image {
                pixels,
                strength: image.options.strength,
                sample_noise: None,
                noise: parts.noise,
            },
            _ => JobInput::Text {
                init_noise: parts.noise,
            },
        };
        let mut output =
            self.generate_with(request, &input, preview, cancel, &mut first_on_step)?;
        let (Some(second), Some(hires)) = (second, parts.hires) else {
            if let Some(image) = parts.image {
                output.images = image.finish(output.images, request.width, request.height);
            }
            return Ok(JobResult {
                output,
                final_request: request.clone(),
                first_pass: None,
            });
        };
        let first_pass = output.timings;
        let offset = first_total;
        let mut second_on_step = |step: StepProgress<'_>| {
            on_step(StepProgress {
                step_index: offset + step.step_index,
                total_steps: offset + step.total_steps,
                elapsed_secs: first_pass.total_secs + step.elapsed_secs,
                ..step
            })
        };
        let second_output = self.hires_pass(
            &second,
            request.steps,
            &output,
            hires,
            preview,
            cancel,
            &mut second_on_step,
        )?;
        Ok(JobResult {
            output: second_output,
            final_request: second,
            first_pass: Some(first_pass),
        })
    }

    /// The hires fix's second pass: the first pass enlarged (its latents, or its images with
    /// Lanczos, one at a time) and denoised again at `hires.strength`. Prompt editing reads its
    /// steps after the first pass's `first_steps`, as A1111 does.
    #[allow(clippy::too_many_arguments)] // the pass's parts, each used once
    fn hires_pass(
        &self,
        second: &GenerationRequest,
        first_steps: usize,
        first: &GenerationOutput,
        hires: &HiresFix,
        preview: PreviewOptions,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(StepProgress<'_>),
    ) -> Result<GenerationOutput> {
        let pass = SchedulePass::Hires {
            first_steps,
            steps: second.steps,
        };
        match hires.upscaler {
            HiresUpscaler::Latent | HiresUpscaler::LatentNearest => {
                let [_, _, latent_height, latent_width] = self.latent_shape(second);
                let latents = resize_latents(
                    &first.latents,
                    latent_height,
                    latent_width,
                    hires.upscaler == HiresUpscaler::Latent,
                )?;
                let input = JobInput::Latents {
                    latents: &latents,
                    strength: hires.strength,
                    noise: None,
                };
                let mut output =
                    self.generate_pass(second, &input, pass, preview, cancel, on_step)?;
                output.timings.total_secs += first.timings.total_secs;
                Ok(output)
            }
            HiresUpscaler::Lanczos => {
                let mut images = Vec::new();
                let mut latents = Vec::new();
                let mut last = None;
                let mut timings = Timings::default();
                for (k, image) in first.images.iter().enumerate() {
                    let item = GenerationRequest {
                        seed: second.seed.wrapping_add(k as u64),
                        batch_size: 1,
                        ..second.clone()
                    };
                    let big = fit_init_image(
                        image,
                        second.width as u32,
                        second.height as u32,
                        ResizeMode::JustResize,
                    );
                    let pixels = image_to_tensor(&big, &Device::Cpu)?;
                    let input = JobInput::Image {
                        pixels: &pixels,
                        strength: hires.strength,
                        sample_noise: None,
                        noise: None,
                    };
                    let mut output =
                        self.generate_pass(&item, &input, pass, preview, cancel, on_step)?;
                    images.append(&mut output.images);
                    latents.push(output.latents.clone());
                    timings.text_encoding_secs += output.timings.text_encoding_secs;
                    timings.denoising_secs += output.timings.denoising_secs;
                    timings.decode_secs += output.timings.decode_secs;
                    timings.total_secs += output.timings.total_secs;
                    last = Some(output);
                }
                let mut output = last.ok_or_else(|| {
                    EngineError::InvalidParameter("the first pass made no image".into())
                })?;
                output.images = images;
                output.latents = Tensor::cat(&latents, 0)?;
                // Every image's pass, then the first pass before them.
                output.timings = timings;
                output.timings.total_secs += first.timings.total_secs;
                Ok(output)
            }
        }
    }
}
