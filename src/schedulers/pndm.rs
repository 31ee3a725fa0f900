//! PLMS (pseudo linear multistep, Liu et al. 2022), as diffusers' `PNDMScheduler` with
//! `skip_prk_steps=True` (SD 1.5's setting, and A1111's "PLMS"): one more model evaluation than
//! steps, the second being a Heun-like correction of the first.

use candle_core::Tensor;

use super::schedule::{ClassDefaults, Schedule, Spacing};
use super::{NoiseLevel, Prediction, Scheduler, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// PLMS on spaced integer timesteps.
#[derive(Debug, Clone)]
pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    /// One entry per model evaluation (the second timestep appears twice).
    timesteps: Vec<f64>,
    discrete: Vec<i64>,
    step_ratio: i64,
    prediction: Prediction,
    /// The last four noise predictions, oldest first.
    history: Vec<Tensor>,
    /// The sample of the first evaluation, kept for the correction at the second.
    first_sample: Option<Tensor>,
}

impl PndmScheduler {
    /// Prepares PLMS for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        // PNDMScheduler's own defaults: leading spacing, set_alpha_to_one off.
        let schedule = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Leading,
            },
        )?;
        let prediction = Prediction::from_config(config)?;
        if prediction == Prediction::Sample {
            return Err(SchedulerError::Unsupported(
                "PNDM with prediction_type \"sample\"".into(),
            ));
        }
        let alphas_cumprod = schedule.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        // Ascending spaced timesteps; PLMS visits the second one twice.
        let mut ascending = schedule.discrete_timesteps(steps);
        ascending.reverse();
        let count = ascending.len();
        let mut plms: Vec<i64> = ascending[..count - 1].to_vec();
        if count >= 2 {
            plms.push(ascending[count - 2]);
        }
        plms.push(ascending[count - 1]);
        plms.reverse();
        Ok(Self {
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: plms.iter().map(|&t| t as f64).collect(),
            discrete: plms,
            step_ratio: (schedule.train_timesteps / steps) as i64,
            prediction,
            history: Vec::new(),
            first_sample: None,
        })
    }

    fn alpha_at(&self, timestep: i64) -> f32 {
        if timestep >= 0 {
            self.alphas_cumprod[(timestep as usize).min(self.alphas_cumprod.len() - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// Formula (9) of the PNDM paper: x_prev from x_t and a noise estimate.
    fn previous_sample(
        &self,
        sample: &Tensor,
        timestep: i64,
        previous: i64,
        noise_estimate: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let alpha_t = self.alpha_at(timestep);
        let alpha_prev = self.alpha_at(previous);
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let eps = match self.prediction {
            Prediction::VPrediction => {
                ((noise_estimate * alpha_t.sqrt() as f64)? + (sample * beta_t.sqrt() as f64)?)?
            }
            _ => noise_estimate.clone(),
        };
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denominator = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let prev = ((sample * sample_coeff as f64)?
            - (&eps * ((alpha_prev - alpha_t) / denominator) as f64)?)?;
        // x0 implied by the noise estimate, for previews.
        let pred_x0 = ((sample - (&eps * beta_t.sqrt() as f64)?)? / alpha_t.sqrt() as f64)?;
        Ok((prev, pred_x0))
    }
}

impl Scheduler for PndmScheduler {
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
        _noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let mut timestep = self.discrete[index];
        let mut previous = timestep - self.step_ratio;
        if index == 1 {
            // The repeated timestep: correct the first step from the same starting sample.
            previous = timestep;
            timestep += self.step_ratio;
        } else {
            if self.history.len() == 4 {
                self.history.remove(0);
            }
            self.history.push(model_output.clone());
        }
        let h = &self.history;
        let n = h.len();
        let (estimate, from) = if n == 1 && index == 0 {
            self.first_sample = Some(sample.clone());
            (model_output.clone(), sample.clone())
        } else if n == 1 && index == 1 {
            let first = self.first_sample.take().unwrap_or_else(|| sample.clone());
            (((model_output + &h[0])? / 2.0)?, first)
        } else if n == 2 {
            ((((&h[1] * 3.0)? - &h[0])? / 2.0)?, sample.clone())
        } else if n == 3 {
            (
                ((((&h[2] * 23.0)? - (&h[1] * 16.0)?)? + (&h[0] * 5.0)?)? / 12.0)?,
                sample.clone(),
            )
        } else {
            (
                ((((((&h[3] * 55.0)? - (&h[2] * 59.0)?)? + (&h[1] * 37.0)?)? - (&h[0] * 9.0)?)?)
                    / 24.0)?,
                sample.clone(),
            )
        };
        let (prev_sample, pred_original_sample) =
            self.previous_sample(&from, timestep, previous, &estimate)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }
}
