//! DPM++ 2S a: k-diffusion's `sample_dpmpp_2s_ancestral` (A1111's "DPM++ 2S a"), on the
//! model's Euler sigmas. diffusers has no exact class (its `DPMSolverSinglestepScheduler` of order
//! 2 is the non-ancestral sibling); the tests check it against k-diffusion's algorithm written out
//! in torch. Two model evaluations per step (at sigma_k and at the log-midpoint towards the
//! ancestral target), one for the last step, which is an Euler step to 0.

use candle_core::Tensor;

use super::schedule::{SigmaSteps, scale_by_sigma, sigma_to_t};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::Result;
use crate::schedulers::noise::NoiseGenerator;

/// One step's noise levels (float32, as k-diffusion computes them on tensors).
#[derive(Debug, Clone, Copy)]
struct StepSigmas {
    sigma: f32,
    down: f32,
    up: f32,
    midpoint: f32,
}

fn step_sigmas(sigma: f32, next: f32) -> StepSigmas {
    let up = next.min((next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt());
    let down = (next * next - up * up).sqrt();
    let midpoint = if down == 0.0 {
        0.0
    } else {
        let (t, t_next) = (-sigma.ln(), -down.ln());
        (-(t + (t_next - t) * 0.5)).exp()
    };
    StepSigmas {
        sigma,
        down,
        up,
        midpoint,
    }
}

/// DPM++ 2S a.
#[derive(Debug, Clone)]
pub struct DpmPp2sAncestral {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    /// The sample at the start of the step.
    saved: Option<Tensor>,
}

impl DpmPp2sAncestral {
    /// Prepares DPM++ 2S a for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let base = SigmaSteps::new(config, steps, schedule.resolve(config))?;
        let log_sigmas = &base.log_train_sigmas;
        let mut timesteps = Vec::new();
        for k in 0..steps {
            timesteps.push(base.timesteps[k]);
            let s = step_sigmas(base.sigmas[k], base.sigmas[k + 1]);
            if s.down > 0.0 {
                timesteps.push(sigma_to_t(s.midpoint as f64, log_sigmas) as f32 as f64);
            }
        }
        Ok(Self {
            timesteps,
            sigmas: base.sigmas,
            init_noise_sigma: base.init_noise_sigma,
            prediction: Prediction::from_config(config)?,
            saved: None,
        })
    }

    /// The step sigmas, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn step_of(&self, index: usize) -> (StepSigmas, bool) {
        let k = index / 2;
        (
            step_sigmas(self.sigmas[k], self.sigmas[k + 1]),
            index % 2 == 1,
        )
    }
}

impl Scheduler for DpmPp2sAncestral {
    fn order(&self) -> usize {
        2
    }

    // Two evaluations a step, laid out as the other second-order samplers' (s[(i + 1) / 2]).
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
        let (s, second) = self.step_of(index);
        scale_by_sigma(sample, if second { s.midpoint } else { s.sigma })
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let (s, second) = self.step_of(index);
        let sigma_input = if second { s.midpoint } else { s.sigma };
        let denoised = self
            .prediction
            .x0_at_sigma(model_output, sample, sigma_input as f64)?;
        let t = -s.sigma.ln();
        let prev_sample = if s.down == 0.0 {
            // The last step: Euler to 0.
            let derivative = ((sample - &denoised)? / s.sigma as f64)?;
            (sample + (derivative * (s.down - s.sigma) as f64)?)?
        } else if !second {
            // To the midpoint, with the first evaluation.
            let h = -s.down.ln() - t;
            let x_coeff = s.midpoint / (-t).exp();
            let x0_coeff = -(-h * 0.5).exp_m1();
            self.saved = Some(sample.clone());
            ((sample * x_coeff as f64)? + (&denoised * x0_coeff as f64)?)?
        } else {
            let start = self.saved.take().unwrap_or_else(|| sample.clone());
            let t_next = -s.down.ln();
            let h = t_next - t;
            let x_coeff = (-t_next).exp() / (-t).exp();
            let x0_coeff = -(-h).exp_m1();
            let stepped = ((start * x_coeff as f64)? + (&denoised * x0_coeff as f64)?)?;
            let fresh = noise.randn_like(&stepped)?;
            (stepped + (fresh * s.up as f64)?)?
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: denoised,
        })
    }
}
