//! DPM++ 2M and DPM++ 2M SDE (Lu et al. 2022, multistep DPM-Solver++ of order 2, midpoint), as
//! diffusers' `DPMSolverMultistepScheduler` with its defaults (`algorithm_type="dpmsolver++"` or
//! `"sde-dpmsolver++"`, `solver_order=2`, `lower_order_final=True`, `final_sigmas_type="zero"`).

use candle_core::Tensor;

use super::schedule::{
    ClassDefaults, Schedule, Spacing, exponential_sigmas, interp_index, karras_sigmas,
    numpy_arange, numpy_linspace, sigma_to_t,
};
use super::{Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::engine::config::SchedulerConfig;
use crate::engine::noise::NoiseGenerator;
use crate::engine::{EngineError, Result};

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

/// `alpha_t, sigma_t` of a sigma, as `_sigma_to_alpha_sigma_t` (in float32, like the tensors).
fn alpha_sigma(sigma: f32) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha as f64, (sigma * alpha) as f64)
}

fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
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
            return Err(EngineError::Unsupported(
                "DPM++ 2M with a non-zero final sigma".into(),
            ));
        }
        // DPMSolverMultistepScheduler's own default spacing is linspace.
        let spacing = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Linspace,
            },
        )?;
        let train = spacing.train_timesteps;
        // lambda_min_clipped is -inf by default: the last timestep is T.
        let last_timestep = train as f64;
        let mut timesteps: Vec<f64> = match spacing.spacing {
            Spacing::Linspace => {
                let mut t: Vec<f64> = numpy_linspace(0.0, last_timestep - 1.0, steps + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .rev()
                    .collect();
                t.pop();
                t
            }
            Spacing::Leading => {
                let ratio = (last_timestep as usize / (steps + 1)) as f64;
                let mut t: Vec<f64> = (0..=steps)
                    .rev()
                    .map(|i| (i as f64 * ratio).round_ties_even())
                    .collect();
                t.pop();
                t.iter().map(|v| v + spacing.steps_offset as f64).collect()
            }
            Spacing::Trailing => numpy_arange(last_timestep, 0.0, -(train as f64 / steps as f64))
                .into_iter()
                .map(|t| t.round_ties_even() - 1.0)
                .collect(),
        };
        let train_sigmas = spacing.train_sigmas();
        let log_sigmas = spacing.log_train_sigmas();
        let (sigma_min, sigma_max) = (train_sigmas[0], train_sigmas[train_sigmas.len() - 1]);
        let spaced = match schedule {
            SigmaSchedule::Default => None,
            SigmaSchedule::Karras => Some((karras_sigmas(sigma_min, sigma_max, steps), true)),
            SigmaSchedule::Exponential => {
                Some((exponential_sigmas(sigma_min, sigma_max, steps), false))
            }
        };
        let squaredcos = config.beta_schedule.as_deref() == Some("squaredcos_cap_v2");
        let mut sigmas: Vec<f32> = match spaced {
            None => timesteps
                .iter()
                .map(|&t| interp_index(t, &train_sigmas) as f32)
                .collect(),
            Some((spaced, round)) => {
                // diffusers rounds Karras timesteps (except for squaredcos_cap_v2), then stores
                // them as int64, which truncates what was not rounded.
                timesteps = spaced
                    .iter()
                    .map(|&s| {
                        let t = sigma_to_t(s, &log_sigmas);
                        if round && !squaredcos {
                            t.round_ties_even()
                        } else {
                            t.trunc()
                        }
                    })
                    .collect();
                spaced.iter().map(|&s| s as f32).collect()
            }
        };
        sigmas.push(0.0);
        Ok(Self {
            timesteps: timesteps.iter().map(|t| t.trunc()).collect(),
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
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let pred_x0 = match self.prediction {
            Prediction::Epsilon => ((sample - (model_output * sigma_s0)?)? / alpha_s0)?,
            Prediction::VPrediction => ((sample * alpha_s0)? - (model_output * sigma_s0)?)?,
            Prediction::Sample => model_output.clone(),
        };
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
