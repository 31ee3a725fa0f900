//! DPM++ 2M and DPM++ 2M SDE (Lu et al. 2022, multistep DPM-Solver++ of order 2, midpoint), as
//! diffusers' `DPMSolverMultistepScheduler` with its defaults (`algorithm_type="dpmsolver++"` or
//! `"sde-dpmsolver++"`, `solver_order=2`, `lower_order_final=True`, `final_sigmas_type="zero"`).

use candle_core::Tensor;

use super::schedule::{TimestepRounding, alpha_sigma, lambda, multistep_steps};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// DPM++ 2M on the model's noise schedule.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    timesteps: Vec<f64>,
    /// One more than the timesteps: the final sigma is 0.
    sigmas: Vec<f32>,
    prediction: Prediction,
    /// The previous step's predicted x0.
    previous: Option<Tensor>,
    /// The SDE variant: fresh noise every step (from the job's seeded generator).
    sde: bool,
}

impl DpmSolverMultistep {
    /// Prepares DPM++ 2M (or, with `sde`, DPM++ 2M SDE) for `steps` steps.
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: SigmaSchedule,
        sde: bool,
    ) -> Result<Self> {
        let schedule = schedule.resolve(config);
        if config
            .final_sigmas_type
            .as_deref()
            .is_some_and(|t| t != "zero")
        {
            return Err(SchedulerError::Unsupported(
                "DPM++ 2M with a non-zero final sigma".into(),
            ));
        }
        // diffusers rounds Karras timesteps (except for squaredcos_cap_v2, where it truncates).
        let rounding = if config.beta_schedule.as_deref() == Some("squaredcos_cap_v2") {
            TimestepRounding::Truncate
        } else {
            TimestepRounding::Round
        };
        let (timesteps, mut sigmas) = multistep_steps(config, steps, schedule, rounding)?;
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: Prediction::from_config(config)?,
            previous: None,
            sde,
        })
    }

    /// The sigma of each step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for DpmSolverMultistep {
    fn noise_level(&self, index: usize) -> Result<NoiseLevel> {
        Ok(NoiseLevel::from_sigma_vp(super::at_index(
            &self.sigmas,
            index,
        )?))
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
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let pred_x0 =
            self.prediction
                .x0_at_alpha_sigma(model_output, sample, alpha_s0, sigma_s0)?;
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        // The SDE variant draws its noise every step, before the update (as diffusers does).
        let fresh = if self.sde {
            Some(noise.randn(model_output.dims(), model_output.device())?)
        } else {
            None
        };
        // x_t = a * sample + b * (D0 + D1 / 2) [+ c * noise]; the final step (to sigma 0) and
        // the first are first order (no D1).
        let (a, b) = if self.sde {
            (
                sigma_t / sigma_s0 * (-h).exp(),
                alpha_t * (1.0 - (-2.0 * h).exp()),
            )
        } else {
            (sigma_t / sigma_s0, -alpha_t * ((-h).exp() - 1.0))
        };
        let last = index + 1 == self.timesteps.len();
        let mut prev_sample = ((sample * a)? + (&pred_x0 * b)?)?;
        if let (Some(previous), false) = (&self.previous, last) {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
            let h_0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
            let r0 = h_0 / h;
            let d1 = ((&pred_x0 - previous)? * (1.0 / r0))?;
            prev_sample = (prev_sample + (d1 * (0.5 * b))?)?;
        }
        if let Some(fresh) = fresh {
            let c = sigma_t * (1.0 - (-2.0 * h).exp()).sqrt();
            prev_sample = (prev_sample + (fresh.to_dtype(sample.dtype())? * c)?)?;
        }
        self.previous = Some(pred_x0.clone());
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
