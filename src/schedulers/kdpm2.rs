//! DPM2 and DPM2 a (Karras et al. 2022's second-order sampler with a midpoint in log sigma), as
//! diffusers' `KDPM2DiscreteScheduler` and `KDPM2AncestralDiscreteScheduler`: two model
//! evaluations per step but one for the last (2n - 1).

use candle_core::Tensor;

use super::schedule::{SigmaSteps, log_midpoint_f32, scale_by_sigma, sigma_to_t_f32};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// DPM2, optionally ancestral.
#[derive(Debug, Clone)]
pub struct Kdpm2Scheduler {
    timesteps: Vec<f64>,
    /// The step sigmas s_0 .. s_n-1, then 0.
    sigmas: Vec<f32>,
    /// The midpoint sigma of each step (0 for the last).
    midpoints: Vec<f32>,
    /// Ancestral: noise added after each step, and the sigma the step goes down to.
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    ancestral: bool,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The sample at the start of the step (between its two evaluations).
    saved: Option<Tensor>,
}

impl Kdpm2Scheduler {
    /// Prepares DPM2 (or DPM2 a) for `steps` steps.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
        ancestral: bool,
    ) -> Result<Self> {
        let schedule = schedule.resolve(config);
        let prediction = Prediction::from_config(config)?;
        if prediction == Prediction::Sample {
            return Err(SchedulerError::Unsupported(
                "DPM2 with prediction_type \"sample\"".into(),
            ));
        }
        let base = SigmaSteps::new(config, steps, schedule)?;
        let mut base_timesteps = base.timesteps.clone();
        if schedule == SigmaSchedule::Karras {
            // KDPM2 rounds its Karras timesteps.
            base_timesteps = base_timesteps.iter().map(|t| t.round_ties_even()).collect();
        }
        let sigmas = base.sigmas.clone();
        let n = steps;
        let log_sigmas = &base.log_train_sigmas;
        let mut sigmas_up = vec![0.0f32; n];
        let mut sigmas_down = vec![0.0f32; n];
        let mut midpoints = vec![0.0f32; n];
        let mut timesteps = vec![base_timesteps[0]];
        if ancestral {
            for k in 0..n {
                let (from, to) = (sigmas[k], sigmas[k + 1]);
                // Float32 in diffusers' order of operations; where rounding leaves nothing of
                // to^2 - up^2 (a huge sigma_max), the exact value to^2 / from.
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                sigmas_up[k] = up;
                let down_squared = to * to - up * up;
                sigmas_down[k] = if down_squared > 0.0 || to == 0.0 {
                    down_squared.max(0.0).sqrt()
                } else {
                    to * to / from
                };
            }
            for k in 0..n.saturating_sub(1) {
                midpoints[k] = log_midpoint_f32(sigmas[k], sigmas_down[k]);
            }
            for k in 0..n - 1 {
                timesteps.push(sigma_to_t_f32(midpoints[k], log_sigmas));
                timesteps.push(base_timesteps[k + 1]);
            }
        } else {
            // The midpoint of step k lies between s_k and s_k+1.
            for k in 0..n.saturating_sub(1) {
                midpoints[k] = log_midpoint_f32(sigmas[k + 1], sigmas[k]);
            }
            for k in 0..n - 1 {
                timesteps.push(sigma_to_t_f32(midpoints[k], log_sigmas));
                timesteps.push(base_timesteps[k + 1]);
            }
        }
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            midpoints,
            sigmas_up,
            sigmas_down,
            ancestral,
            init_noise_sigma: base.init_noise_sigma,
            prediction,
            saved: None,
        })
    }

    /// The sigma at which evaluation `index` sees the model.
    fn input_sigma(&self, index: usize) -> f32 {
        let k = index / 2;
        if index.is_multiple_of(2) {
            self.sigmas[k]
        } else {
            self.midpoints[k]
        }
    }
}

impl Scheduler for Kdpm2Scheduler {
    fn order(&self) -> usize {
        2
    }

    // diffusers' sigmas repeat every inner sigma ([s0, s1, s1, s2, s2, ...]): evaluation i
    // starts from s[(i + 1) / 2].
    fn noise_level(&self, index: usize) -> Result<NoiseLevel> {
        Ok(NoiseLevel::Sigma(super::at_index(
            &self.sigmas,
            index.div_ceil(2),
        )?))
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        scale_by_sigma(sample, self.input_sigma(index))
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let k = index / 2;
        let sigma = self.sigmas[k] as f64;
        let sigma_input = self.input_sigma(index) as f64;
        let pred_x0 = self
            .prediction
            .x0_at_sigma(model_output, sample, sigma_input)?;
        let derivative = ((sample - &pred_x0)? / sigma_input)?;
        let prev_sample = if index.is_multiple_of(2) {
            // First half: to the midpoint (the last step goes to 0 and has no second half).
            let dt = self.midpoints[k] as f64 - sigma;
            self.saved = Some(sample.clone());
            (sample + (derivative * dt)?)?
        } else {
            let start = self.saved.take().unwrap_or_else(|| sample.clone());
            if self.ancestral {
                let dt = self.sigmas_down[k] as f64 - sigma;
                let stepped = (start + (derivative * dt)?)?;
                let fresh = noise.randn_like(&stepped)?;
                (stepped + (fresh * self.sigmas_up[k] as f64)?)?
            } else {
                let dt = self.sigmas[k + 1] as f64 - sigma;
                (start + (derivative * dt)?)?
            }
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}

impl Kdpm2Scheduler {
    /// The step sigmas, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}
