//! DDPM (Ho et al. 2020) ancestral sampling on spaced timesteps, as diffusers' `DDPMScheduler`
//! with its default `fixed_small` variance.

use candle_core::Tensor;

use super::schedule::{ClassDefaults, Schedule, Spacing};
use super::{NoiseLevel, Prediction, Scheduler, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// DDPM: the posterior q(x_prev | x_t, x0) with fresh noise at every step but the last.
#[derive(Debug, Clone)]
pub struct DdpmScheduler {
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    discrete: Vec<i64>,
    prediction: Prediction,
    clip_sample: Option<f64>,
}

impl DdpmScheduler {
    /// Prepares DDPM for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        if config
            .variance_type
            .as_deref()
            .is_some_and(|v| v != "fixed_small")
        {
            return Err(SchedulerError::Unsupported(format!(
                "DDPM variance_type {:?} (only fixed_small)",
                config.variance_type
            )));
        }
        // DDPMScheduler's own defaults: leading spacing, clip_sample on.
        let schedule = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Leading,
            },
        )?;
        let discrete = schedule.discrete_timesteps(steps);
        Ok(Self {
            alphas_cumprod: schedule.alphas_cumprod(),
            timesteps: discrete.iter().map(|&t| t as f64).collect(),
            discrete,
            prediction: Prediction::from_config(config)?,
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range.unwrap_or(1.0)),
        })
    }
}

impl Scheduler for DdpmScheduler {
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
        let previous = self.discrete.get(index + 1).copied().unwrap_or(-1);
        // The scalars are float32 tensors in diffusers.
        let alpha_t = self.alphas_cumprod[t as usize];
        let alpha_prev = if previous >= 0 {
            self.alphas_cumprod[previous as usize]
        } else {
            1.0
        };
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let current_alpha = alpha_t / alpha_prev;
        let current_beta = 1.0 - current_alpha;
        let mut pred_x0 = self.prediction.x0_at_alpha_sigma(
            model_output,
            sample,
            alpha_t.sqrt() as f64,
            beta_t.sqrt() as f64,
        )?;
        if let Some(range) = self.clip_sample {
            pred_x0 = pred_x0.clamp(-range, range)?;
        }
        let x0_coeff = alpha_prev.sqrt() * current_beta / beta_t;
        let sample_coeff = current_alpha.sqrt() * beta_prev / beta_t;
        let mut prev_sample = ((&pred_x0 * x0_coeff as f64)? + (sample * sample_coeff as f64)?)?;
        if t > 0 {
            let variance = (beta_prev / beta_t * current_beta).max(1e-20);
            let fresh = noise.randn_like(&prev_sample)?;
            prev_sample = (prev_sample + (fresh * variance.sqrt() as f64)?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
