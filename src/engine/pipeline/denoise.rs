//! The denoising loop: checks, noise, guidance, the scheduler's steps, previews and cancel.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{
    GenerationOutput, GenerationRequest, PreviewOptions, StableDiffusion, StepProgress, Timings,
};
use crate::engine::error::{EngineError, Result};
use crate::engine::noise::NoiseGenerator;
use crate::engine::preview::{PendingPreview, PreviewBuffer};
use crate::engine::prompt_schedule::SchedulePass;
use crate::engine::unet::AddedConditions;

use super::conditioning::{ConditioningSchedule, Context};
use super::modes::{Blend, JobInput};
use crate::schedulers::Scheduler;

/// Whether every value of `tensor` is a finite number (one reduction: the sum of squares is
/// NaN or infinite when any value is, or when values are too large to mean anything).
pub(super) fn all_finite(tensor: &Tensor) -> Result<bool> {
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
        let layers = self.text_encoders[0].encoder.layer_count();
        if request.clip_skip == 0 || request.clip_skip > layers {
            return Err(EngineError::InvalidParameter(format!(
                "clip skip must be from 1 to {layers} (the text encoder's layers), got {}",
                request.clip_skip
            )));
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
        let pass = SchedulePass::First {
            steps: request.steps,
        };
        self.generate_pass(request, input, pass, preview, cancel, on_step)
    }

    /// [`StableDiffusion::generate_with`] as `pass` of a job (prompt editing counts its steps
    /// from the first pass).
    pub(super) fn generate_pass(
        &self,
        request: &GenerationRequest,
        input: &JobInput<'_>,
        pass: SchedulePass,
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
        let plan = self.plan(request, input, scheduler.as_ref())?;
        let encoding_started = Instant::now();
        let conditioning = self.condition_schedule(request, pass)?;
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
        );
        // Make sure queued GPU work is counted as denoising, not decoding.
        self.device.synchronize()?;
        self.release_graph_memory_for_decode(request.batch_size, request.height, request.width);
        let latents = latents?;
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
            warnings: Vec::new(),
        })
    }

    /// The UNet's CUDA graphs keep the memory of their activations between launches: when
    /// the GPU's free memory would not hold an untiled decode of `batch` images of `height_px` x
    /// `width_px`, hands it back to the driver first (the next launch maps it again, which
    /// costs that job a few milliseconds). Nothing to do off CUDA.
    fn release_graph_memory_for_decode(&self, batch: usize, height_px: usize, width_px: usize) {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(cuda) = &self.device
            && self
                .gpu_short_for_untiled_vae(batch, height_px, width_px)
                .unwrap_or(true)
        {
            crate::engine::cuda::trim_graph_memory(cuda);
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (batch, height_px, width_px);
    }

    /// The job's standard-normal noise: `init_noise` when given (checked), else seeded.
    pub(super) fn job_noise(
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

    /// The one denoising loop, for every mode: from `plan`'s first step to the last, the UNet
    /// (twice the batch with classifier-free guidance), the scheduler's step, a preview and the
    /// cancel flag at every step. Returns the final latents.
    #[allow(clippy::too_many_arguments)] // one job's parts, each used once per step
    fn denoise(
        &self,
        request: &GenerationRequest,
        plan: LatentPlan,
        schedule: &ConditioningSchedule,
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
        let projection = match preview.latent_previews {
            true => Some(self.preview_projection().on_device(&self.device)?),
            false => None,
        };
        // The previous step's preview on its way from the GPU, and buffers to reuse.
        let mut pending: Option<PendingPreview> = None;
        let mut buffers: Vec<PreviewBuffer> = Vec::new();
        for (index, &timestep) in timesteps.iter().enumerate().skip(first_index) {
            if cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let conditioning = schedule.at(index - first_index);
            let scaled = scheduler.scale_model_input(&latents, index)?;
            let scaled = match &plan.extra_unet_input {
                Some(extra) => Tensor::cat(&[&scaled, extra], 1)?,
                None => scaled,
            };
            let model_input = if conditioning.parts() > 1 {
                Tensor::cat(&vec![&scaled; conditioning.parts()], 0)?
            } else {
                scaled
            }
            .to_dtype(self.dtype)?;
            let prediction = match &conditioning.context {
                Context::Batched(context) => self.unet.forward_with_guidance(
                    &model_input,
                    timestep,
                    context,
                    conditioning.added.as_ref(),
                    conditioning.guidance_embedding.as_ref(),
                )?,
                Context::Separate(contexts) => {
                    let rows = |t: &Tensor, part: usize| t.narrow(0, part * batch, batch);
                    let mut parts = Vec::with_capacity(contexts.len());
                    for (part, context) in contexts.iter().enumerate() {
                        let added = match &conditioning.added {
                            Some(added) => Some(AddedConditions {
                                text_embeds: rows(&added.text_embeds, part)?,
                                time_ids: rows(&added.time_ids, part)?,
                            }),
                            None => None,
                        };
                        parts.push(self.unet.forward_with_guidance(
                            &rows(&model_input, part)?,
                            timestep,
                            context,
                            added.as_ref(),
                            conditioning.guidance_embedding.as_ref(),
                        )?);
                    }
                    Tensor::cat(&parts, 0)?
                }
            }
            .to_dtype(DType::F32)?;
            let guided_prediction =
                conditioning.combine(&prediction, batch, request.guidance_scale)?;
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
            let latent_preview = match &projection {
                Some(projection) => {
                    let this_step = PendingPreview::start(
                        projection,
                        &step.pred_original_sample,
                        buffers.pop(),
                    )?;
                    // Ready at once on the CPU; on a GPU, the previous step's copy is done (or
                    // nearly) while this step's work is queued behind it.
                    let ready = if this_step.is_ready() {
                        Some(this_step)
                    } else {
                        pending.replace(this_step)
                    };
                    match ready {
                        Some(ready) => {
                            let (image, buffer) = ready.finish()?;
                            buffers.extend(buffer);
                            Some(image)
                        }
                        None => None,
                    }
                }
                None => None,
            };
            on_step(StepProgress {
                step_index: index - first_index,
                total_steps: timesteps.len() - first_index,
                timestep,
                elapsed_secs: started.elapsed().as_secs_f64(),
                predicted_latents: &step.pred_original_sample,
                vae_preview,
                latent_preview,
            });
        }
        Ok(latents)
    }
}

/// How a mode starts the loop and what it feeds the UNet beside the latents: everything a mode
/// (text to image, image to image; inpainting next) changes about the one loop.
pub(super) struct LatentPlan {
    /// The first index into the scheduler's timesteps (0: from pure noise; later for a partial
    /// denoise of an init image).
    pub(super) first_index: usize,
    /// The latents the loop starts from.
    pub(super) latents: Tensor,
    /// Channels concatenated after the latents for the UNet (an inpainting UNet's mask and
    /// masked-image latents).
    pub(super) extra_unet_input: Option<Tensor>,
    /// What happens after each step: an ordinary UNet's inpainting blends the known region back.
    pub(super) blend: Option<Blend>,
}

impl LatentPlan {
    /// Text to image: every step, from the noise scaled to the scheduler's initial sigma.
    pub(super) fn text_to_image(noise: Tensor, scheduler: &dyn Scheduler) -> Result<Self> {
        Ok(Self {
            first_index: 0,
            latents: (noise * scheduler.init_noise_sigma())?,
            extra_unet_input: None,
            blend: None,
        })
    }
}
