//! The denoising loop: checks, noise, guidance, the scheduler's steps, previews and cancel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{
    GenerationOutput, GenerationRequest, PreviewOptions, StableDiffusion, StepProgress, Timings,
};
use crate::engine::error::{EngineError, Result};
use crate::engine::noise::NoiseGenerator;
use crate::engine::unet::AddedConditions;
use crate::schedulers::Scheduler;

/// Whether every value of `tensor` is a finite number (one reduction: the sum of squares is
/// NaN or infinite when any value is, or when values are too large to mean anything).
fn all_finite(tensor: &Tensor) -> Result<bool> {
    let sum_of_squares = tensor
        .to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(sum_of_squares.is_finite())
}

impl StableDiffusion {
    /// Checks a request against the model, with messages an artist can act on.
    pub fn validate(&self, request: &GenerationRequest) -> Result<()> {
        let factor = self.vae_scale_factor();
        for (name, value) in [("width", request.width), ("height", request.height)] {
            if value == 0 || !value.is_multiple_of(factor) {
                return Err(EngineError::InvalidParameter(format!(
                    "{name} {value} must be a positive multiple of {factor} for this model"
                )));
            }
            if value > 4096 {
                return Err(EngineError::InvalidParameter(format!(
                    "{name} {value} is larger than 4096 pixels"
                )));
            }
        }
        if request.batch_size == 0 || request.batch_size > 64 {
            return Err(EngineError::InvalidParameter(format!(
                "batch size must be between 1 and 64, got {}",
                request.batch_size
            )));
        }
        if !request.guidance_scale.is_finite() || request.guidance_scale < 0.0 {
            return Err(EngineError::InvalidParameter(format!(
                "guidance scale must be a non-negative number, got {}",
                request.guidance_scale
            )));
        }
        if request.steps == 0 || request.steps > self.scheduler_config.train_timesteps() {
            return Err(EngineError::InvalidParameter(format!(
                "steps must be between 1 and {}, got {}",
                self.scheduler_config.train_timesteps(),
                request.steps
            )));
        }
        Ok(())
    }

    /// The latent shape of a request: `(batch, channels, height / f, width / f)`.
    pub fn latent_shape(&self, request: &GenerationRequest) -> [usize; 4] {
        let factor = self.vae_scale_factor();
        [
            request.batch_size,
            self.vae.config().latent_channels,
            request.height / factor,
            request.width / factor,
        ]
    }

    /// Seeded standard-normal noise for a request: image `k` from `seed + k`.
    pub fn seeded_noise(&self, request: &GenerationRequest) -> Result<Tensor> {
        let [batch, channels, height, width] = self.latent_shape(request);
        let mut items = Vec::with_capacity(batch);
        for k in 0..batch {
            let mut generator = NoiseGenerator::new(request.seed.wrapping_add(k as u64));
            items.push(generator.randn(&[1, channels, height, width], &self.device)?);
        }
        Ok(Tensor::cat(&items, 0)?)
    }

    /// Runs a whole text-to-image job. `init_noise` (standard normal, the latent shape)
    /// replaces the seeded noise, as diffusers' `latents=` argument does; `cancel` is checked
    /// before every step.
    pub fn generate(
        &self,
        request: &GenerationRequest,
        init_noise: Option<&Tensor>,
        preview: PreviewOptions,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(StepProgress<'_>),
    ) -> Result<GenerationOutput> {
        self.generate_with(
            request,
            &JobInput::Text { init_noise },
            preview,
            cancel,
            on_step,
        )
    }

    /// Runs a whole job of any mode: what it starts from is `input`.
    pub fn generate_with(
        &self,
        request: &GenerationRequest,
        input: &JobInput<'_>,
        preview: PreviewOptions,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(StepProgress<'_>),
    ) -> Result<GenerationOutput> {
        let started = Instant::now();
        self.validate(request)?;
        let mut scheduler = request.scheduler.build(
            &self.scheduler_config,
            request.steps,
            request.sigmas,
            request.eta,
        )?;
        let plan = match input {
            JobInput::Text { init_noise } => {
                let noise = self.job_noise(request, *init_noise)?;
                LatentPlan::text_to_image(noise, scheduler.as_ref())?
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
                scheduler.as_ref(),
            )?,
            JobInput::Latents {
                latents,
                strength,
                noise,
            } => {
                let first_index = self.first_index_for(request, *strength, scheduler.as_ref())?;
                let shape = self.latent_shape(request);
                if latents.dims() != shape {
                    return Err(EngineError::InvalidParameter(format!(
                        "the latents have shape {:?}, this job needs {shape:?}",
                        latents.dims()
                    )));
                }
                let drawn = self.job_draws(request, &[("added", true)], &[*noise])?;
                let latents = latents.to_device(&self.device)?.to_dtype(DType::F32)?;
                LatentPlan {
                    first_index,
                    latents: scheduler.add_noise(&latents, drawn_at(&drawn, 0)?, first_index)?,
                    extra_unet_input: None,
                    blend: None,
                }
            }
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
                scheduler.as_ref(),
            )?,
        };
        let encoding_started = Instant::now();
        let conditioning = self.condition(request)?;
        let text_encoding_secs = encoding_started.elapsed().as_secs_f64();
        let denoise_started = Instant::now();
        let latents = self.denoise(
            request,
            plan,
            &conditioning,
            scheduler.as_mut(),
            preview,
            cancel,
            started,
            on_step,
        )?;
        // Make sure queued GPU work is counted as denoising, not decoding.
        self.device.synchronize()?;
        let denoising_secs = denoise_started.elapsed().as_secs_f64();
        if cancel.load(Ordering::Relaxed) {
            return Err(EngineError::Cancelled);
        }
        if !all_finite(&latents)? {
            return Err(EngineError::NotFinite(format!(
                "the denoised latents are not finite numbers (NaN or infinity): the image would be flat. Guidance {} may be too large for this model and sampler",
                request.guidance_scale
            )));
        }
        let decode_started = Instant::now();
        let images = self.decode(&latents)?;
        let decode_secs = decode_started.elapsed().as_secs_f64();
        Ok(GenerationOutput {
            images,
            latents,
            timings: Timings {
                text_encoding_secs,
                denoising_secs,
                decode_secs,
                total_secs: started.elapsed().as_secs_f64(),
            },
            warnings: conditioning.warnings,
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

    /// Latents for the UNet of an image in [-1, 1] `(1, 3, H, W)`: a sample of the VAE's
    /// distribution with `noise` (one row per batch item), scaled as the pipelines scale them.
    fn sampled_latents(&self, pixels: &Tensor, noise: &Tensor) -> Result<Tensor> {
        let batch = noise.dim(0)?;
        let distribution = self.encode_pixels(pixels)?;
        let mean = distribution.mean.repeat((batch, 1, 1, 1))?;
        let std = distribution.std.repeat((batch, 1, 1, 1))?;
        self.scale_latents(&(mean + (std * noise)?)?)
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

    /// The job's standard-normal noise: `init_noise` when given (checked), else seeded.
    fn job_noise(
        &self,
        request: &GenerationRequest,
        init_noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let latent_shape = self.latent_shape(request);
        let Some(noise) = init_noise else {
            return self.seeded_noise(request);
        };
        if noise.dims() != latent_shape {
            return Err(EngineError::InvalidParameter(format!(
                "initial noise has shape {:?}, this job needs {:?}",
                noise.dims(),
                latent_shape
            )));
        }
        let noise = noise.to_device(&self.device)?.to_dtype(DType::F32)?;
        if !all_finite(&noise)? {
            return Err(EngineError::InvalidParameter(
                "the initial noise contains NaN or infinite values".into(),
            ));
        }
        Ok(noise)
    }

    /// Encodes the prompts into what the UNet reads at every step, for the whole batch.
    fn condition(&self, request: &GenerationRequest) -> Result<Conditioning> {
        let mut warnings = Vec::new();
        let batch = request.batch_size;
        let positive = self.encode_prompt(&request.prompt)?;
        if positive.dropped_tokens > 0 {
            warnings.push(format!(
                "the prompt is longer than the text encoder takes: its last {} tokens were dropped",
                positive.dropped_tokens
            ));
        }
        // LCM-distilled UNets take the guidance scale as an embedding and run without
        // classifier-free guidance (as LatentConsistencyModelPipeline does).
        let guidance_embedding = match self.unet.guidance_embedding_dim() {
            Some(dim) => Some(crate::engine::unet::guidance_scale_embedding(
                request.guidance_scale - 1.0,
                dim,
                batch,
                &self.device,
            )?),
            None => None,
        };
        let guided = request.guidance_scale > 1.0 && guidance_embedding.is_none();
        let negative = if guided {
            let negative = self.encode_negative_prompt(&request.negative_prompt, &positive)?;
            if negative.dropped_tokens > 0 {
                warnings.push(format!(
                    "the negative prompt is too long: its last {} tokens were dropped",
                    negative.dropped_tokens
                ));
            }
            Some(negative)
        } else {
            None
        };
        let repeat = |t: &Tensor| -> Result<Tensor> {
            let rows: Vec<Tensor> = (0..batch).map(|_| t.clone()).collect();
            Ok(Tensor::cat(&rows, 0)?)
        };
        let mut contexts = Vec::new();
        let mut pooled = Vec::new();
        for embeddings in negative.iter().chain(std::iter::once(&positive)) {
            contexts.push(repeat(&embeddings.context)?);
            if let Some(p) = &embeddings.pooled {
                pooled.push(repeat(p)?);
            }
        }
        let context = Tensor::cat(&contexts, 0)?.to_dtype(self.dtype)?;
        let model_batch = context.dim(0)?;
        let added = if self.unet.needs_added_conditions() {
            let text_embeds = Tensor::cat(&pooled, 0)?;
            let (h, w) = (request.height as f32, request.width as f32);
            let ids = [h, w, 0.0, 0.0, h, w];
            let time_ids = Tensor::new(&ids, &self.device)?
                .unsqueeze(0)?
                .repeat((model_batch, 1))?;
            Some(AddedConditions {
                text_embeds,
                time_ids,
            })
        } else {
            None
        };
        Ok(Conditioning {
            context,
            added,
            guidance_embedding,
            guided,
            warnings,
        })
    }

    /// The one denoising loop, for every mode: from `plan`'s first step to the last, the UNet
    /// (twice the batch with classifier-free guidance), the scheduler's step, a preview and the
    /// cancel flag at every step. Returns the final latents.
    #[allow(clippy::too_many_arguments)] // one job's parts, each used once per step
    fn denoise(
        &self,
        request: &GenerationRequest,
        plan: LatentPlan,
        conditioning: &Conditioning,
        scheduler: &mut dyn Scheduler,
        preview: PreviewOptions,
        cancel: &AtomicBool,
        started: Instant,
        on_step: &mut dyn FnMut(StepProgress<'_>),
    ) -> Result<Tensor> {
        let batch = request.batch_size;
        let timesteps = scheduler.timesteps().to_vec();
        let first_index = plan.first_index;
        let mut latents = plan.latents.clone();
        let mut generator = NoiseGenerator::new(request.seed ^ 0x5eed_5eed_5eed_5eed);
        for (index, &timestep) in timesteps.iter().enumerate().skip(first_index) {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let scaled = scheduler.scale_model_input(&latents, index)?;
            let scaled = match &plan.extra_unet_input {
                Some(extra) => Tensor::cat(&[&scaled, extra], 1)?,
                None => scaled,
            };
            let model_input = if conditioning.guided {
                Tensor::cat(&[&scaled, &scaled], 0)?
            } else {
                scaled
            }
            .to_dtype(self.dtype)?;
            let prediction = self
                .unet
                .forward_with_guidance(
                    &model_input,
                    timestep,
                    &conditioning.context,
                    conditioning.added.as_ref(),
                    conditioning.guidance_embedding.as_ref(),
                )?
                .to_dtype(DType::F32)?;
            let guided_prediction = if conditioning.guided {
                let uncond = prediction.narrow(0, 0, batch)?;
                let cond = prediction.narrow(0, batch, batch)?;
                (&uncond + ((cond - &uncond)? * request.guidance_scale)?)?
            } else {
                prediction
            };
            let step = scheduler.step(&guided_prediction, index, &latents, &mut generator)?;
            latents = step.prev_sample;
            if let Some(blend) = &plan.blend {
                // The known region, noised to the next step's level (clean after the last).
                let known = if index + 1 < timesteps.len() {
                    scheduler.add_noise(&blend.image_latents, &blend.noise, index + 1)?
                } else {
                    blend.image_latents.clone()
                };
                let keep = (1.0 - &blend.mask)?;
                latents = (known.broadcast_mul(&keep)? + latents.broadcast_mul(&blend.mask)?)?;
            }
            let vae_preview = if preview.vae_decode_every > 0
                && (index + 1) % preview.vae_decode_every == 0
                && index + 1 < timesteps.len()
            {
                let first = step.pred_original_sample.narrow(0, 0, 1)?;
                self.decode(&first)?.into_iter().next()
            } else {
                None
            };
            on_step(StepProgress {
                step_index: index - first_index,
                total_steps: timesteps.len() - first_index,
                timestep,
                elapsed_secs: started.elapsed().as_secs_f64(),
                predicted_latents: &step.pred_original_sample,
                vae_preview,
            });
        }
        Ok(latents)
    }
}

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

/// What the UNet reads besides the latents, the same at every step.
struct Conditioning {
    /// Text embeddings, `(model batch, tokens, width)`: the negative prompt's rows first when
    /// guided.
    context: Tensor,
    /// SDXL's pooled text and size conditioning.
    added: Option<AddedConditions>,
    /// LCM-distilled UNets' guidance-scale embedding.
    guidance_embedding: Option<Tensor>,
    /// Whether classifier-free guidance runs (the UNet sees the batch twice).
    guided: bool,
    /// Prompts that were cut, said to the artist.
    warnings: Vec<String>,
}

/// How a mode starts the loop and what it feeds the UNet beside the latents: everything a mode
/// (text to image, image to image; inpainting next) changes about the one loop.
struct LatentPlan {
    /// The first index into the scheduler's timesteps (0: from pure noise; later for a partial
    /// denoise of an init image).
    first_index: usize,
    /// The latents the loop starts from.
    latents: Tensor,
    /// Channels concatenated after the latents for the UNet (an inpainting UNet's mask and
    /// masked-image latents).
    extra_unet_input: Option<Tensor>,
    /// What happens after each step: an ordinary UNet's inpainting blends the known region back.
    blend: Option<Blend>,
}

/// What an inpainting starts from (see [`JobInput::Inpaint`]).
struct InpaintInput<'a> {
    pixels: &'a Tensor,
    mask: &'a Tensor,
    strength: f64,
    latent_noise: bool,
}

/// The known region of an inpainting with an ordinary UNet, put back after every step.
struct Blend {
    /// The init image's latents (scaled).
    image_latents: Tensor,
    /// The noise that takes them to each step's level.
    noise: Tensor,
    /// `(batch, 1, h, w)` at latent size: 1 where the picture is repainted.
    mask: Tensor,
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

impl LatentPlan {
    /// Text to image: every step, from the noise scaled to the scheduler's initial sigma.
    fn text_to_image(noise: Tensor, scheduler: &dyn Scheduler) -> Result<Self> {
        Ok(Self {
            first_index: 0,
            latents: (noise * scheduler.init_noise_sigma())?,
            extra_unet_input: None,
            blend: None,
        })
    }
}
