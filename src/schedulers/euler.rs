//! Euler (Karras et al. 2022, Algorithm 2 without churn), as diffusers' `EulerDiscreteScheduler`.

use candle_core::Tensor;

use super::schedule::{ClassDefaults, Schedule, Spacing, interp_index};
use super::{Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::engine::config::SchedulerConfig;
use crate::engine::noise::NoiseGenerator;
use crate::engine::{EngineError, Result};

/// The Euler sampler on the model's sigma schedule.
#[derive(Debug, Clone)]
pub struct EulerScheduler {
    timesteps: Vec<f64>,
    /// One more than the timesteps: the final sigma is 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
}

impl EulerScheduler {
    /// Prepares Euler for `steps` steps; the config's `use_karras_sigmas` also selects Karras.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let sigma_schedule = match schedule {
            SigmaSchedule::Default if config.use_karras_sigmas == Some(true) => {
                SigmaSchedule::Karras
            }
            other => other,
        };
        if config
            .timestep_type
            .as_deref()
            .is_some_and(|t| t != "discrete")
            || config
                .final_sigmas_type
                .as_deref()
                .is_some_and(|t| t != "zero")
        {
            return Err(EngineError::Unsupported(
                "Euler with continuous timesteps or a non-zero final sigma".into(),
            ));
        }
        // EulerDiscreteScheduler's own default spacing is linspace.
        let schedule = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Linspace,
            },
        )?;
        let alphas_cumprod = schedule.alphas_cumprod();
        // ((1 - abar) / abar) ** 0.5 on a float32 tensor.
        let train_sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt() as f64)
            .collect();
        let mut timesteps = schedule.continuous_timesteps(steps);
        let interpolated: Vec<f64> = match config.interpolation_type.as_deref().unwrap_or("linear")
        {
            "linear" => timesteps
                .iter()
                .map(|&t| interp_index(t, &train_sigmas))
                .collect(),
            other => {
                return Err(EngineError::Unsupported(format!(
                    "Euler interpolation_type {other:?}"
                )));
            }
        };
        let (sigma_max, sigma_min) = (interpolated[0], interpolated[interpolated.len() - 1]);
        let spaced: Option<Vec<f64>> = match sigma_schedule {
            SigmaSchedule::Default => None,
            SigmaSchedule::Karras => Some(karras_sigmas(sigma_min, sigma_max, steps)),
            SigmaSchedule::Exponential => Some(exponential_sigmas(sigma_min, sigma_max, steps)),
        };
        let mut sigmas: Vec<f32> = match spaced {
            None => interpolated.iter().map(|&s| s as f32).collect(),
            Some(spaced) => {
                // log of the float32 training sigmas, as numpy computes it.
                let log_sigmas: Vec<f64> = train_sigmas
                    .iter()
                    .map(|&s| (s as f32).ln() as f64)
                    .collect();
                timesteps = spaced.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
                spaced.iter().map(|&s| s as f32).collect()
            }
        };
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        let init_noise_sigma = match schedule.spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma as f64,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt() as f64,
        };
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            init_noise_sigma,
            prediction: Prediction::from_config(config)?,
        })
    }

    /// The sigma of each step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

/// Karras et al.'s schedule with rho = 7, from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    super::schedule::numpy_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space, from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    super::schedule::numpy_linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .collect()
}

/// The (fractional) training timestep of `sigma`, by linear interpolation in log sigma
/// (diffusers' `_sigma_to_t`).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l >= 0.0)
        .unwrap_or(0);
    let low_index = last_below.min(log_sigmas.len().saturating_sub(2));
    let (low, high) = (log_sigmas[low_index], log_sigmas[low_index + 1]);
    // numpy subtracts the two float32 log sigmas in float32; the rest runs in float64.
    let step = (low as f32 - high as f32) as f64;
    let w = ((low - log_sigma) / step).clamp(0.0, 1.0);
    (1.0 - w) * low_index as f64 + w * (low_index + 1) as f64
}

impl Scheduler for EulerScheduler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index];
        Ok((sample / (sigma * sigma + 1.0).sqrt() as f64)?)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        _noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let sigma = self.sigmas[index] as f64;
        let sigma_next = self.sigmas[index + 1] as f64;
        let pred_x0 = match self.prediction {
            Prediction::Epsilon => (sample - (model_output * sigma)?)?,
            Prediction::VPrediction => {
                let scale = sigma * sigma + 1.0;
                ((model_output * (-sigma / scale.sqrt()))? + (sample / scale)?)?
            }
            Prediction::Sample => model_output.clone(),
        };
        let derivative = ((sample - &pred_x0)? / sigma)?;
        let prev_sample = (sample + (derivative * (sigma_next - sigma))?)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
