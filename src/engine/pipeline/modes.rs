//! What each mode does before the one loop: image to image (the init image encoded and noised to
//! where the schedule starts), latents reworked (a hires fix's second pass) and inpainting (an
//! inpainting UNet's extra input, or the known region to blend back), with the random draws
//! each makes in diffusers' order.

use candle_core::{DType, Tensor};

use super::denoise::{LatentPlan, all_finite};
use super::{GenerationRequest, StableDiffusion};
use crate::engine::error::{EngineError, Result};
use crate::engine::noise::NoiseGenerator;
use crate::schedulers::Scheduler;

/// What a job starts from.
pub enum JobInput<'a> {
    /// Noise: `init_noise` (standard normal, the latent shape) replaces the seeded noise.
    Text {
        /// The starting noise, or `None` for the request's seed.
        init_noise: Option<&'a Tensor>,
    },
    /// An image to rework: `pixels` `(1, 3, height, width)` in [0, 1] at the request's size,
    /// denoised from `strength` (0 to 1: how much of it is repainted).
    Image {
        /// The init image.
        pixels: &'a Tensor,
        /// The denoising strength.
        strength: f64,
        /// The VAE's sampling noise (the latent shape), given instead of seeded.
        sample_noise: Option<&'a Tensor>,
        /// The noise added to the init latents (diffusers' `add_noise`; the latent shape), given
        /// instead of seeded: with `sample_noise`, what checks us against another implementation.
        noise: Option<&'a Tensor>,
    },
    /// Latents to rework without the VAE (a hires fix's upscaled first pass), in the UNet's
    /// scaled space and the job's latent shape, denoised from `strength`.
    Latents {
        /// The latents.
        latents: &'a Tensor,
        /// The denoising strength.
        strength: f64,
        /// The noise added to them, given instead of seeded.
        noise: Option<&'a Tensor>,
    },
    /// An image with a region to repaint: `pixels` as for [`JobInput::Image`], `mask`
    /// `(1, 1, height, width)` in [0, 1], 1 where the picture is repainted (binarized at 0.5, as
    /// diffusers does). An inpainting UNet (9 input channels) reads the mask and the masked
    /// image; an ordinary one gets the known region blended back after every step.
    Inpaint {
        /// The picture.
        pixels: &'a Tensor,
        /// Where to repaint.
        mask: &'a Tensor,
        /// The denoising strength (1: the masked region starts from pure noise).
        strength: f64,
        /// The init image's VAE sampling noise (drawn only when the image is encoded: an ordinary
        /// UNet, or a strength below 1), given instead of seeded.
        sample_noise: Option<&'a Tensor>,
        /// The noise (the starting noise at strength 1, else the noise added to the init latents).
        noise: Option<&'a Tensor>,
        /// The masked image's VAE sampling noise (an inpainting UNet's extra input).
        masked_sample_noise: Option<&'a Tensor>,
        /// A1111's "latent noise" masked content: the masked region of the init latents is
        /// replaced by fresh seeded noise before the start (matters below strength 1).
        latent_noise: bool,
    },
}

/// What an inpainting starts from (see [`JobInput::Inpaint`]).
struct InpaintInput<'a> {
    pixels: &'a Tensor,
    mask: &'a Tensor,
    strength: f64,
    latent_noise: bool,
}

/// The known region of an inpainting with an ordinary UNet, put back after every step.
pub(super) struct Blend {
    /// The init image's latents (scaled).
    pub(super) image_latents: Tensor,
    /// The noise that takes them to each step's level.
    pub(super) noise: Tensor,
    /// `(batch, 1, h, w)` at latent size: 1 where the picture is repainted.
    pub(super) mask: Tensor,
}

impl StableDiffusion {
    /// How `input`'s mode starts the loop.
    pub(super) fn plan(
        &self,
        request: &GenerationRequest,
        input: &JobInput<'_>,
        scheduler: &dyn Scheduler,
    ) -> Result<LatentPlan> {
        Ok(match input {
            JobInput::Text { init_noise } => {
                let noise = self.job_noise(request, *init_noise)?;
                let mut plan = LatentPlan::text_to_image(noise, scheduler)?;
                plan.extra_unet_input = self.blank_inpainting_input(request)?;
                plan
            }
            JobInput::Image {
                pixels,
                strength,
                sample_noise,
                noise,
            } => self.image_to_image_plan(
                request,
                pixels,
                *strength,
                [*sample_noise, *noise],
                scheduler,
            )?,
            JobInput::Latents {
                latents,
                strength,
                noise,
            } => self.latents_plan(request, latents, *strength, *noise, scheduler)?,
            JobInput::Inpaint {
                pixels,
                mask,
                strength,
                sample_noise,
                noise,
                masked_sample_noise,
                latent_noise,
            } => self.inpaint_plan(
                request,
                InpaintInput {
                    pixels,
                    mask,
                    strength: *strength,
                    latent_noise: *latent_noise,
                },
                [*sample_noise, *noise, *masked_sample_noise, None],
                scheduler,
            )?,
        })
    }

    /// Image to image: the init image encoded (a sample of the VAE's distribution), scaled, and
    /// noised to where the schedule starts for `strength`, as diffusers' img2img pipelines do.
    fn image_to_image_plan(
        &self,
        request: &GenerationRequest,
        pixels: &Tensor,
        strength: f64,
        given_noise: [Option<&Tensor>; 2],
        scheduler: &dyn Scheduler,
    ) -> Result<LatentPlan> {
        let first_index = self.first_index_for(request, strength, scheduler)?;
        self.check_init_image(request, pixels)?;
        let drawn = self.job_draws(
            request,
            &[("sampling", true), ("added", true)],
            &given_noise,
        )?;
        let (sample_noise, noise) = (drawn_at(&drawn, 0)?, drawn_at(&drawn, 1)?);
        let init_latents = self.sampled_latents(&((pixels * 2.0)? - 1.0)?, sample_noise)?;
        Ok(LatentPlan {
            first_index,
            latents: scheduler.add_noise(&init_latents, noise, first_index)?,
            extra_unet_input: None,
            blend: None,
        })
    }

    /// Latents reworked without the VAE (a hires fix's second pass): noised to where the
    /// schedule starts for `strength`.
    fn latents_plan(
        &self,
        request: &GenerationRequest,
        latents: &Tensor,
        strength: f64,
        noise: Option<&Tensor>,
        scheduler: &dyn Scheduler,
    ) -> Result<LatentPlan> {
        let first_index = self.first_index_for(request, strength, scheduler)?;
        let shape = self.latent_shape(request);
        if latents.dims() != shape {
            return Err(EngineError::InvalidParameter(format!(
                "the latents have shape {:?}, this job needs {shape:?}",
                latents.dims()
            )));
        }
        let drawn = self.job_draws(request, &[("added", true)], &[noise])?;
        let latents = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
        Ok(LatentPlan {
            first_index,
            latents: scheduler.add_noise(&latents, drawn_at(&drawn, 0)?, first_index)?,
            extra_unet_input: None,
            blend: None,
        })
    }

    /// Inpainting, as diffusers' inpaint pipelines prepare it: the init latents (noise at
    /// strength 1, else the encoded image noised to the first step), the mask at latent size,
    /// and the masked image's latents beside the latents for an inpainting UNet, or the known
    /// region to blend back for an ordinary one.
    fn inpaint_plan(
        &self,
        request: &GenerationRequest,
        input: InpaintInput<'_>,
        given_noise: [Option<&Tensor>; 4],
        scheduler: &dyn Scheduler,
    ) -> Result<LatentPlan> {
        let InpaintInput {
            pixels,
            mask,
            strength,
            latent_noise,
        } = input;
        let first_index = self.first_index_for(request, strength, scheduler)?;
        self.check_init_image(request, pixels)?;
        let expected = [1, 1, request.height, request.width];
        if mask.dims() != expected {
            return Err(EngineError::InvalidParameter(format!(
                "the mask has shape {:?}, this job needs {expected:?} (resize it first)",
                mask.dims()
            )));
        }
        let [batch, channels, height, width] = self.latent_shape(request);
        let unet_channels = self.unet.config().in_channels;
        let inpainting_unet = unet_channels == 2 * channels + 1;
        if !inpainting_unet && unet_channels != channels {
            return Err(EngineError::Unsupported(format!(
                "a UNet with {unet_channels} input channels (inpainting takes {channels} or {})",
                2 * channels + 1
            )));
        }
        let mask = mask
            .to_device(&self.device)?
            .to_dtype(DType::F32)?
            .ge(0.5)?
            .to_dtype(DType::F32)?;
        if mask.sum_all()?.to_scalar::<f32>()? == 0.0 {
            return Err(EngineError::InvalidParameter(
                "the mask is empty: paint the region to repaint".into(),
            ));
        }
        let strength_max = strength == 1.0;
        let encode_image = !inpainting_unet || !strength_max;
        let drawn = self.job_draws(
            request,
            &[
                ("sampling", encode_image),
                ("starting", true),
                ("masked-image sampling", inpainting_unet),
                // Last, so that the draws before it stay diffusers' order.
                ("latent fill", latent_noise && encode_image && !strength_max),
            ],
            &given_noise,
        )?;
        let pixels = ((pixels.to_device(&self.device)?.to_dtype(DType::F32)? * 2.0)? - 1.0)?;
        let image_latents = match encode_image {
            true => Some(self.sampled_latents(&pixels, drawn_at(&drawn, 0)?)?),
            false => None,
        };
        let noise = drawn_at(&drawn, 1)?;
        let latent_mask = nearest_resize(&mask, height, width)?.repeat((batch, 1, 1, 1))?;
        let latents = match &image_latents {
            Some(image_latents) if !strength_max => {
                let start = match drawn.get(3).and_then(Option::as_ref) {
                    // "Latent noise": fresh noise where the picture is repainted.
                    Some(fill) => {
                        (image_latents.broadcast_mul(&(1.0 - &latent_mask)?)?
                            + fill.broadcast_mul(&latent_mask)?)?
                    }
                    None => image_latents.clone(),
                };
                scheduler.add_noise(&start, noise, first_index)?
            }
            _ => (noise * scheduler.init_noise_sigma())?,
        };
        if inpainting_unet {
            let masked_pixels = pixels.broadcast_mul(&(1.0 - &mask)?)?;
            let masked_latents = self.sampled_latents(&masked_pixels, drawn_at(&drawn, 2)?)?;
            return Ok(LatentPlan {
                first_index,
                latents,
                extra_unet_input: Some(Tensor::cat(&[&latent_mask, &masked_latents], 1)?),
                blend: None,
            });
        }
        let image_latents = image_latents.ok_or_else(|| {
            EngineError::InvalidParameter("the init image was not encoded".into())
        })?;
        Ok(LatentPlan {
            first_index,
            latents,
            extra_unet_input: None,
            blend: Some(Blend {
                image_latents,
                noise: noise.clone(),
                mask: latent_mask,
            }),
        })
    }

    /// For an inpainting UNet asked for text to image, as A1111 feeds it: everything masked
    /// (mask 1) over a mid-gray picture's latents (its distribution's mean); `None` for an
    /// ordinary UNet.
    fn blank_inpainting_input(&self, request: &GenerationRequest) -> Result<Option<Tensor>> {
        let [batch, channels, height, width] = self.latent_shape(request);
        if self.unet.config().in_channels != 2 * channels + 1 {
            return Ok(None);
        }
        let gray = Tensor::zeros(
            (1, 3, request.height, request.width),
            DType::F32,
            &self.device,
        )?;
        let masked = self
            .scale_latents(&self.encode_pixels(&gray)?.mean)?
            .repeat((batch, 1, 1, 1))?;
        let mask = Tensor::ones((batch, 1, height, width), DType::F32, &self.device)?;
        Ok(Some(Tensor::cat(&[&mask, &masked], 1)?))
    }

    /// Latents for the UNet of an image in [-1, 1] `(1, 3, H, W)`: a sample of the VAE's
    /// distribution with `noise` (one row per batch item), scaled as the pipelines scale them.
    fn sampled_latents(&self, pixels: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.scale_latents(&self.encode_pixels(pixels)?.sample(noise)?)
    }

    /// The first index of a late start at `strength`, refusing strengths that run no step.
    fn first_index_for(
        &self,
        request: &GenerationRequest,
        strength: f64,
        scheduler: &dyn Scheduler,
    ) -> Result<usize> {
        if !(strength > 0.0 && strength <= 1.0) {
            return Err(EngineError::InvalidParameter(format!(
                "denoising strength must be above 0 and at most 1, got {strength}"
            )));
        }
        let first_index =
            crate::schedulers::first_index_for_strength(request.steps, strength, scheduler.order());
        if first_index >= scheduler.timesteps().len() {
            return Err(EngineError::InvalidParameter(format!(
                "denoising strength {strength} with {} steps leaves no step to run: raise either",
                request.steps
            )));
        }
        Ok(first_index)
    }

    /// An init image must be `(1, 3, height, width)` at the request's size.
    fn check_init_image(&self, request: &GenerationRequest, pixels: &Tensor) -> Result<()> {
        let expected = [1, 3, request.height, request.width];
        if pixels.dims() != expected {
            return Err(EngineError::InvalidParameter(format!(
                "the init image has shape {:?}, this job needs {expected:?} (resize it first)",
                pixels.dims()
            )));
        }
        Ok(())
    }

    /// A job's random draws, each the latent shape: `kinds` in order (name, whether this job
    /// draws it), given ones used as they are, the rest seeded. Image k draws from seed + k in
    /// that order (diffusers' order with one generator per image), so a seed means the same
    /// image whatever is given. Draws the job does not make are `None`.
    fn job_draws(
        &self,
        request: &GenerationRequest,
        kinds: &[(&str, bool)],
        given: &[Option<&Tensor>],
    ) -> Result<Vec<Option<Tensor>>> {
        let [batch, channels, height, width] = self.latent_shape(request);
        let shape = [batch, channels, height, width];
        let mut seeded: Vec<Vec<Tensor>> =
            kinds.iter().map(|_| Vec::with_capacity(batch)).collect();
        for k in 0..batch {
            let mut generator = NoiseGenerator::new(request.seed.wrapping_add(k as u64));
            for (draws, (_, drawn)) in seeded.iter_mut().zip(kinds) {
                if *drawn {
                    draws.push(generator.randn(&[1, channels, height, width], &self.device)?);
                }
            }
        }
        let mut out = Vec::with_capacity(kinds.len());
        for (((what, drawn), given), seeded) in kinds.iter().zip(given).zip(seeded) {
            out.push(match (drawn, given) {
                (false, _) => None,
                (true, Some(tensor)) => {
                    if tensor.dims() != shape {
                        return Err(EngineError::InvalidParameter(format!(
                            "the {what} noise has shape {:?}, this job needs {shape:?}",
                            tensor.dims()
                        )));
                    }
                    let tensor = tensor.to_device(&self.device)?.to_dtype(DType::F32)?;
                    if !all_finite(&tensor)? {
                        return Err(EngineError::InvalidParameter(format!(
                            "the {what} noise contains NaN or infinite values"
                        )));
                    }
                    Some(tensor)
                }
                (true, None) => Some(Tensor::cat(&seeded, 0)?),
            });
        }
        Ok(out)
    }
}

/// Draw `index` of [`StableDiffusion::job_draws`], which the job makes.
fn drawn_at(draws: &[Option<Tensor>], index: usize) -> Result<&Tensor> {
    draws
        .get(index)
        .and_then(Option::as_ref)
        .ok_or_else(|| EngineError::InvalidParameter(format!("no random draw {index}")))
}

/// `(b, c, H, W)` resized to `(b, c, height, width)` by PyTorch's `interpolate(mode="nearest")`:
/// output pixel j takes input pixel floor(j * in / out), the scale computed in f32.
fn nearest_resize(tensor: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, in_height, in_width) = tensor.dims4()?;
    let indices = |input: usize, output: usize| -> Result<Tensor> {
        let scale = input as f32 / output as f32;
        let picked: Vec<u32> = (0..output)
            .map(|j| ((j as f32 * scale).floor() as usize).min(input - 1) as u32)
            .collect();
        Ok(Tensor::new(picked, tensor.device())?)
    };
    Ok(tensor
        .index_select(&indices(in_height, height)?, 2)?
        .index_select(&indices(in_width, width)?, 3)?)
}
