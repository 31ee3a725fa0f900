//! LMS: linear multistep of order 4 on the sigma schedule, as diffusers'
//! `LMSDiscreteScheduler` (and k-diffusion's `sample_lms`).

use candle_core::Tensor;

use super::schedule::{SigmaSteps, scale_by_sigma};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::Result;
use crate::schedulers::noise::NoiseGenerator;

/// The order diffusers' pipelines use.
const ORDER: usize = 4;

/// Linear multistep on Euler's sigmas.
#[derive(Debug, Clone)]
pub struct LmsScheduler {
    steps: SigmaSteps,
    prediction: Prediction,
    /// The last derivatives dx/dsigma, oldest first.
    derivatives: Vec<Tensor>,
}

impl LmsScheduler {
    /// Prepares LMS for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        Ok(Self {
            steps: SigmaSteps::new(config, steps, schedule.resolve(config))?,
            prediction: Prediction::from_config(config)?,
            derivatives: Vec::new(),
        })
    }

    /// The sigma of each step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.steps.sigmas
    }

    /// The integral over [sigma_t, sigma_t+1] of the Lagrange basis polynomial of the
    /// `current` point among the last `order` sigmas (exact: it is a polynomial).
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let sigmas: Vec<f64> = self.steps.sigmas.iter().map(|&s| s as f64).collect();
        // Expand prod_k (tau - s_k) / (s_cur - s_k) into polynomial coefficients, lowest first.
        let mut poly = vec![1.0f64];
        for k in 0..order {
            if k == current {
                continue;
            }
            let root = sigmas[t - k];
            let scale = sigmas[t - current] - root;
            let mut next = vec![0.0; poly.len() + 1];
            for (power, &c) in poly.iter().enumerate() {
                next[power + 1] += c / scale;
                next[power] -= c * root / scale;
            }
            poly = next;
        }
        let antiderivative = |x: f64| {
            poly.iter()
                .enumerate()
                .map(|(power, &c)| c * x.powi(power as i32 + 1) / (power + 1) as f64)
                .sum::<f64>()
        };
        antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t])
    }
}

impl Scheduler for LmsScheduler {
    fn noise_level(&self, index: usize) -> Result<NoiseLevel> {
        Ok(NoiseLevel::Sigma(super::at_index(
            &self.steps.sigmas,
            index,
        )?))
    }

    fn timesteps(&self) -> &[f64] {
        &self.steps.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.steps.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.steps.sigmas[index])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let sigma = self.steps.sigmas[index] as f64;
        let pred_x0 = self.prediction.x0_at_sigma(model_output, sample, sigma)?;
        let derivative = ((sample - &pred_x0)? / sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (index + 1).min(ORDER);
        let mut prev_sample = sample.clone();
        for (current, derivative) in self.derivatives.iter().rev().enumerate().take(order) {
            let coefficient = self.coefficient(order, index, current);
            prev_sample = (prev_sample + (derivative * coefficient)?)?;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
