//! DDIM (Song et al. 2020), as diffusers' `DDIMScheduler`.

use candle_core::Tensor;

use super::schedule::{ClassDefaults, Schedule, Spacing};
use super::{NoiseLevel, Prediction, Scheduler, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::Result;
use crate::schedulers::noise::NoiseGenerator;

/// DDIM with stochasticity `eta` (0 = deterministic DDIM, 1 = DDPM-like).
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    discrete: Vec<i64>,
    step_ratio: i64,
    prediction: Prediction,
    clip_sample: Option<f64>,
    eta: f64,
}

impl DdimScheduler {
    /// Prepares DDIM for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize, eta: f64) -> Result<Self> {
        // DDIMScheduler's own defaults: leading spacing, clip_sample and set_alpha_to_one on.
        let schedule = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Leading,
            },
        )?;
        let alphas_cumprod = schedule.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let discrete = schedule.discrete_timesteps(steps);
        Ok(Self {
            final_alpha_cumprod,
            timesteps: discrete.iter().map(|&t| t as f64).collect(),
            discrete,
            step_ratio: (schedule.train_timesteps / steps) as i64,
            prediction: Prediction::from_config(config)?,
            clip_sample: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range.unwrap_or(1.0)),
            eta,
            alphas_cumprod,
        })
    }

    fn alpha_at(&self, timestep: i64) -> f64 {
        if timestep >= 0 {
            let index = (timestep as usize).min(self.alphas_cumprod.len() - 1);
            self.alphas_cumprod[index] as f64
        } else {
            self.final_alpha_cumprod as f64
        }
    }
}

impl Scheduler for DdimScheduler {
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
        let timestep = self.discrete[index];
        let prev_timestep = timestep - self.step_ratio;
        let alpha_t = self.alpha_at(timestep);
        let alpha_prev = self.alpha_at(prev_timestep);
        let beta_t = 1.0 - alpha_t;
        let (mut pred_x0, pred_eps) = match self.prediction {
            Prediction::Epsilon => (
                ((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?,
                model_output.clone(),
            ),
            Prediction::VPrediction => (
                ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?,
                ((model_output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?,
            ),
            Prediction::Sample => (
                model_output.clone(),
                ((sample - (model_output * alpha_t.sqrt())?)? / beta_t.sqrt())?,
            ),
        };
        // diffusers clips x0 but keeps the unclipped epsilon (use_clipped_model_output=False).
        if let Some(range) = self.clip_sample {
            pred_x0 = pred_x0.clamp(-range, range)?;
        }
        let beta_prev = 1.0 - alpha_prev;
        let variance = (beta_prev / beta_t) * (1.0 - alpha_t / alpha_prev);
        let std_dev = self.eta * variance.sqrt();
        let direction = (&pred_eps * (1.0 - alpha_prev - std_dev * std_dev).sqrt())?;
        let mut prev_sample = ((&pred_x0 * alpha_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            let z = noise.randn_like(&prev_sample)?;
            prev_sample = (prev_sample + (z * std_dev)?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
