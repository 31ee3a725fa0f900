//! Heun (Karras et al. 2022, Algorithm 1 without churn), as diffusers' `HeunDiscreteScheduler`:
//! two model evaluations per step, so its timesteps list every evaluation (2n - 1 of them).

use candle_core::Tensor;

use super::euler::EulerScheduler;
use super::schedule::scale_by_sigma;
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::Result;
use crate::schedulers::noise::NoiseGenerator;

/// State kept between the two evaluations of a step.
#[derive(Debug, Clone)]
struct FirstHalf {
    derivative: Tensor,
    dt: f64,
    sample: Tensor,
}

/// Heun's method on the model's sigma schedule.
#[derive(Debug, Clone)]
pub struct HeunScheduler {
    /// `t0, t1, t1, t2, t2, ...`: one entry per model evaluation.
    timesteps: Vec<f64>,
    /// `s0, s1, s1, s2, s2, ..., 0`.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    first_half: Option<FirstHalf>,
}

impl HeunScheduler {
    /// Prepares Heun for `steps` steps (2 * steps - 1 model evaluations).
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        // The schedule is Euler's; Heun visits every inner sigma twice.
        let euler = EulerScheduler::new(config, steps, schedule)?;
        let base_timesteps = euler.timesteps();
        let base_sigmas = euler.sigmas();
        let mut timesteps = vec![base_timesteps[0]];
        for &t in &base_timesteps[1..] {
            timesteps.extend([t, t]);
        }
        let mut sigmas = vec![base_sigmas[0]];
        for &s in &base_sigmas[1..base_sigmas.len() - 1] {
            sigmas.extend([s, s]);
        }
        sigmas.push(base_sigmas[base_sigmas.len() - 1]);
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma: euler.init_noise_sigma(),
            prediction: Prediction::from_config(config)?,
            first_half: None,
        })
    }

    /// The sigma of each evaluation, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for HeunScheduler {
    fn order(&self) -> usize {
        2
    }

    fn noise_level(&self, index: usize) -> Result<NoiseLevel> {
        Ok(NoiseLevel::Sigma(super::at_index(&self.sigmas, index)?))
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let first_order = self.first_half.is_none();
        let (sigma, sigma_next) = if first_order {
            (self.sigmas[index] as f64, self.sigmas[index + 1] as f64)
        } else {
            (self.sigmas[index - 1] as f64, self.sigmas[index] as f64)
        };
        // The prediction is made at the sigma the model was evaluated at.
        let sigma_input = if first_order { sigma } else { sigma_next };
        let pred_x0 = self
            .prediction
            .x0_at_sigma(model_output, sample, sigma_input)?;
        let prev_sample = match self.first_half.take() {
            None => {
                let derivative = ((sample - &pred_x0)? / sigma)?;
                let dt = sigma_next - sigma;
                let prev = (sample + (&derivative * dt)?)?;
                // The last step goes to sigma 0 and has no second evaluation.
                if index + 1 < self.timesteps.len() {
                    self.first_half = Some(FirstHalf {
                        derivative,
                        dt,
                        sample: sample.clone(),
                    });
                }
                prev
            }
            Some(first) => {
                let derivative = ((sample - &pred_x0)? / sigma_next)?;
                let average = ((first.derivative + derivative)? / 2.0)?;
                (first.sample + (average * first.dt)?)?
            }
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
