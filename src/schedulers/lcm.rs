//! LCM (latent consistency models, Luo et al. 2023), as diffusers' `LCMScheduler`: each step
//! predicts the clean latents through the consistency boundary condition, then re-noises them to
//! the next timestep with fresh noise. Meant for LCM-distilled models (few steps, low guidance).

use candle_core::Tensor;

use super::schedule::{ClassDefaults, Schedule, Spacing};
use super::{NoiseLevel, Prediction, Scheduler, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// The consistency sampler.
#[derive(Debug, Clone)]
pub struct LcmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    discrete: Vec<i64>,
    prediction: Prediction,
    clip_sample: Option<f64>,
    timestep_scaling: f64,
}

impl LcmScheduler {
    /// Prepares LCM for `steps` steps (at most the config's `original_inference_steps`).
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Leading,
            },
        )?;
        if config.thresholding == Some(true) {
            return Err(SchedulerError::Unsupported("LCM with thresholding".into()));
        }
        let original_steps = config.original_inference_steps.unwrap_or(50);
        let train = schedule.train_timesteps;
        if original_steps == 0 || original_steps > train {
            return Err(SchedulerError::InvalidParameter(format!(
                "original_inference_steps {original_steps} must be between 1 and {train}"
            )));
        }
        if steps > original_steps {
            return Err(SchedulerError::InvalidParameter(format!(
                "LCM takes at most {original_steps} steps (the model's original_inference_steps), got {steps}"
            )));
        }
        // The distillation's timesteps, largest first; pick `steps` of them evenly.
        let k = (train / original_steps) as i64;
        let origin: Vec<i64> = (1..=original_steps as i64)
            .rev()
            .map(|i| i * k - 1)
            .collect();
        let discrete: Vec<i64> = (0..steps)
            .map(|i| origin[(i as f64 * origin.len() as f64 / steps as f64).floor() as usize])
            .collect();
        let alphas_cumprod = schedule.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: discrete.iter().map(|&t| t as f64).collect(),
            discrete,
            prediction: Prediction::from_config(config)?,
            // LCMScheduler's own default is no clipping.
            clip_sample: config
                .clip_sample
                .unwrap_or(false)
                .then_some(config.clip_sample_range.unwrap_or(1.0)),
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0),
        })
    }
}

impl Scheduler for LcmScheduler {
    fn noise_level(&self, index: usize) -> Result<NoiseLevel> {
        NoiseLevel::from_alphas_cumprod(
            &self.alphas_cumprod,
            super::at_index(&self.discrete, index)?,
        )
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let t = self.discrete[index];
        let previous = self.discrete.get(index + 1).copied().unwrap_or(t);
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if previous >= 0 {
            self.alphas_cumprod[previous as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let scaled = t as f64 * self.timestep_scaling;
        let sigma_data = 0.5f64;
        let c_skip = sigma_data * sigma_data / (scaled * scaled + sigma_data * sigma_data);
        let c_out = scaled / (scaled * scaled + sigma_data * sigma_data).sqrt();
        let mut pred_x0 = self.prediction.x0_at_alpha_sigma(
            model_output,
            sample,
            alpha_t.sqrt() as f64,
            beta_t.sqrt() as f64,
        )?;
        if let Some(range) = self.clip_sample {
            pred_x0 = pred_x0.clamp(-range, range)?;
        }
        let denoised = ((&pred_x0 * c_out)? + (sample * c_skip)?)?;
        let prev_sample = if index + 1 < self.discrete.len() {
            let fresh = noise.randn_like(&denoised)?;
            ((&denoised * alpha_prev.sqrt() as f64)? + (fresh * beta_prev.sqrt() as f64)?)?
        } else {
            denoised.clone()
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: denoised,
        })
    }
}
