//! Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' `EulerDiscreteScheduler`.

use candle_core::Tensor;

use super::schedule::{SigmaSteps, scale_by_sigma};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// The Euler sampler on the model's sigma schedule.
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    timesteps: Vec<f64>,
    /// One more than the timesteps: the final sigma is 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// Euler a: step down further and add fresh noise (k-diffusion's ancestral sampling).
    ancestral: bool,
}

impl EulerScheduler {
    /// Prepares Euler for `steps` steps; the config's `use_karras_sigmas` also selects Karras.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let sigma_schedule = schedule.resolve(config);
        if config
            .timestep_type
            .as_deref()
            .is_some_and(|t| t != "discrete")
            || config
                .final_sigmas_type
                .as_deref()
                .is_some_and(|t| t != "zero")
        {
            return Err(SchedulerError::Unsupported(
                "Euler with continuous timesteps or a non-zero final sigma".into(),
            ));
        }
        let steps = SigmaSteps::new(config, steps, sigma_schedule)?;
        Ok(Self {
            timesteps: steps.timesteps,
            sigmas: steps.sigmas,
            init_noise_sigma: steps.init_noise_sigma,
            prediction: Prediction::from_config(config)?,
            ancestral: false,
        })
    }

    /// Euler a (diffusers' `EulerAncestralDiscreteScheduler`): the default sigmas, ancestral steps.
    pub fn ancestral(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        // EulerAncestralDiscreteScheduler knows no Karras sigmas; its config flag is ignored there.
        let plain = SchedulerConfig {
            use_karras_sigmas: None,
            use_exponential_sigmas: None,
            ..config.clone()
        };
        let mut scheduler = Self::new(&plain, steps, SigmaSchedule::Default)?;
        scheduler.ancestral = true;
        Ok(scheduler)
    }

    /// The sigma of each step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerScheduler {
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
        noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let sigma = self.sigmas[index] as f64;
        let sigma_next = self.sigmas[index + 1] as f64;
        let pred_x0 = self.prediction.x0_at_sigma(model_output, sample, sigma)?;
        let derivative = ((sample - &pred_x0)? / sigma)?;
        let prev_sample = if self.ancestral {
            // sigma_up and sigma_down in float32, as diffusers computes them on 0-d tensors.
            let (from, to) = (self.sigmas[index], self.sigmas[index + 1]);
            let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
            let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
            let stepped = (sample + (derivative * (sigma_down as f64 - sigma))?)?;
            let fresh = noise.randn_like(&stepped)?;
            (stepped + (fresh * sigma_up as f64)?)?
        } else {
            (sample + (derivative * (sigma_next - sigma))?)?
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
