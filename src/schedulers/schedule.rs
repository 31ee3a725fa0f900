//! Noise schedules and timestep spacings shared by every scheduler, computed with the same
//! floating-point types and orders of operation as torch and numpy in diffusers.

use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};

/// Timestep spacing (see "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spacing {
    /// Multiples of T / n from 0, plus `steps_offset`.
    Leading,
    /// Evenly from 0 to T - 1.
    Linspace,
    /// Multiples of T / n down from T - 1.
    Trailing,
}

/// The schedule part of a scheduler config, resolved with one class's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Training steps T.
    pub train_timesteps: usize,
    /// The betas, as float32 values.
    pub betas: Vec<f32>,
    /// How inference timesteps are spaced.
    pub spacing: Spacing,
    /// Added to `leading` timesteps.
    pub steps_offset: usize,
}

/// Defaults that differ between diffusers scheduler classes.
#[derive(Debug, Clone, Copy)]
pub struct ClassDefaults {
    /// `timestep_spacing` when the config has none.
    pub spacing: Spacing,
}

impl Schedule {
    /// Resolves the config's schedule with `defaults` for what it leaves out.
    pub fn from_config(config: &SchedulerConfig, defaults: ClassDefaults) -> Result<Self> {
        let spacing = match config.timestep_spacing.as_deref() {
            None => defaults.spacing,
            Some("leading") => Spacing::Leading,
            Some("linspace") => Spacing::Linspace,
            Some("trailing") => Spacing::Trailing,
            Some(other) => {
                return Err(SchedulerError::Unsupported(format!(
                    "timestep_spacing {other:?} (expected leading, linspace or trailing)"
                )));
            }
        };
        if config.rescale_betas_zero_snr == Some(true) {
            return Err(SchedulerError::Unsupported(
                "rescale_betas_zero_snr is not supported yet".into(),
            ));
        }
        let schedule = Self {
            train_timesteps: config.train_timesteps(),
            betas: betas(config)?,
            spacing,
            steps_offset: config.steps_offset.unwrap_or(0),
        };
        // Every training step must keep some signal and add some noise: sigma_max =
        // sqrt((1 - abar) / abar) is 14.6 for SD; above 1e5 (abar < 1e-10) it is no real model,
        // and at abar = 0 it is infinite.
        if schedule
            .alphas_cumprod()
            .last()
            .is_none_or(|&abar| !(1e-10..1.0).contains(&abar))
        {
            return Err(SchedulerError::Unsupported(
                "the noise schedule leaves no signal (or no noise) at its last training step: \
                 check beta_start, beta_end and trained_betas"
                    .into(),
            ));
        }
        Ok(schedule)
    }

    /// `torch.cumprod(1 - betas)` on float32: torch's CPU kernel accumulates in float64 and
    /// rounds each output to float32.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let mut product = 1.0f64;
        self.betas
            .iter()
            .map(|beta| {
                product *= (1.0 - beta) as f64;
                product as f32
            })
            .collect()
    }

    /// The training sigmas `((1 - abar) / abar) ** 0.5`, computed on float32 as torch does.
    pub fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod()
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt() as f64)
            .collect()
    }

    /// `np.log` of the float32 training sigmas (what `_sigma_to_t` interpolates in).
    pub fn log_train_sigmas(&self) -> Vec<f64> {
        self.train_sigmas()
            .iter()
            .map(|&s| (s as f32).ln() as f64)
            .collect()
    }

    /// Integer timesteps as DDIM/DDPM/PNDM compute them, largest first.
    pub fn discrete_timesteps(&self, steps: usize) -> Vec<i64> {
        let train = self.train_timesteps;
        match self.spacing {
            Spacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => {
                let ratio = (train / steps) as i64;
                (0..steps as i64)
                    .rev()
                    .map(|i| i * ratio + self.steps_offset as i64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                numpy_arange(train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() as i64 - 1)
                    .collect()
            }
        }
    }

    /// Fractional timesteps as the sigma-based schedulers compute them, largest first.
    pub fn continuous_timesteps(&self, steps: usize) -> Vec<f64> {
        let train = self.train_timesteps;
        match self.spacing {
            // np.linspace(..., dtype=np.float32): computed in f64, stored as f32.
            Spacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, steps)
                .into_iter()
                .rev()
                .map(|t| t as f32 as f64)
                .collect(),
            Spacing::Leading => {
                let ratio = (train / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| (i as f64 * ratio).round_ties_even() + self.steps_offset as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = train as f64 / steps as f64;
                numpy_arange(train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| t.round_ties_even() - 1.0)
                    .collect()
            }
        }
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)`, element for element.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in f64.
pub fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// `np.arange(start, stop, step)` in f64 (same element count rule as numpy).
pub fn numpy_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let count = ((stop - start) / step).ceil().max(0.0) as usize;
    (0..count).map(|i| start + i as f64 * step).collect()
}

/// The betas of the config (`trained_betas`, else `beta_schedule`), as float32 values.
fn betas(config: &SchedulerConfig) -> Result<Vec<f32>> {
    if let Some(trained) = &config.trained_betas {
        return Ok(trained.iter().map(|&b| b as f32).collect());
    }
    let n = config.train_timesteps();
    let start = config.beta_start.unwrap_or(0.0001);
    let end = config.beta_end.unwrap_or(0.02);
    Ok(match config.beta_schedule.as_deref().unwrap_or("linear") {
        "linear" => torch_linspace_f32(start as f32, end as f32, n),
        "scaled_linear" => torch_linspace_f32(start.sqrt() as f32, end.sqrt() as f32, n)
            .into_iter()
            .map(|b| b * b)
            .collect(),
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
        other => {
            return Err(SchedulerError::Unsupported(format!(
                "beta_schedule {other:?}"
            )));
        }
    })
}

/// `np.interp(x, arange(len(values)), values)`.
pub fn interp_index(x: f64, values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    if x <= 0.0 {
        return values[0];
    }
    let last = values.len() - 1;
    if x >= last as f64 {
        return values[last];
    }
    let low = x.floor() as usize;
    let frac = x - low as f64;
    values[low] + (values[low + 1] - values[low]) * frac
}

/// Karras et al.'s schedule with rho = 7, from `sigma_max` down to `sigma_min`.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    numpy_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Sigmas evenly spaced in log space, from `sigma_max` down to `sigma_min`.
pub fn exponential_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    numpy_linspace(sigma_max.ln(), sigma_min.ln(), steps)
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

/// Scales latents for the model at noise level `sigma`: `sample / sqrt(sigma^2 + 1)`.
pub fn scale_by_sigma(sample: &candle_core::Tensor, sigma: f32) -> Result<candle_core::Tensor> {
    Ok((sample / (sigma * sigma + 1.0).sqrt() as f64)?)
}

/// The noise levels of the k-diffusion style samplers (Euler, Heun, LMS, DPM2, DPM++ SDE, 2S a),
/// as diffusers' `EulerDiscreteScheduler.set_timesteps` computes them.
#[derive(Debug, Clone, PartialEq)]
pub struct SigmaSteps {
    /// The (fractional) timestep of each step, largest first, as float32 values.
    pub timesteps: Vec<f64>,
    /// The sigma of each step, then 0.
    pub sigmas: Vec<f32>,
    /// Standard deviation of the initial noise.
    pub init_noise_sigma: f64,
    /// `np.log` of the float32 training sigmas (for mapping other sigmas to timesteps).
    pub log_train_sigmas: Vec<f64>,
}

impl SigmaSteps {
    /// Spaces `steps` sigmas by the config's timestep spacing, then by `schedule`; classes whose
    /// default spacing is `linspace` (all of the k-diffusion family in diffusers).
    pub fn new(
        config: &SchedulerConfig,
        steps: usize,
        schedule: super::SigmaSchedule,
    ) -> Result<Self> {
        let spacing = Schedule::from_config(
            config,
            ClassDefaults {
                spacing: Spacing::Linspace,
            },
        )?;
        let train_sigmas = spacing.train_sigmas();
        let log_train_sigmas = spacing.log_train_sigmas();
        let mut timesteps = spacing.continuous_timesteps(steps);
        let interpolated: Vec<f64> = match config.interpolation_type.as_deref().unwrap_or("linear")
        {
            "linear" => timesteps
                .iter()
                .map(|&t| interp_index(t, &train_sigmas))
                .collect(),
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "interpolation_type {other:?}"
                )));
            }
        };
        let (sigma_max, sigma_min) = (interpolated[0], interpolated[interpolated.len() - 1]);
        let spaced: Option<Vec<f64>> = match schedule {
            super::SigmaSchedule::Default => None,
            super::SigmaSchedule::Karras => Some(karras_sigmas(sigma_min, sigma_max, steps)),
            super::SigmaSchedule::Exponential => {
                Some(exponential_sigmas(sigma_min, sigma_max, steps))
            }
        };
        let mut sigmas: Vec<f32> = match spaced {
            None => interpolated.iter().map(|&s| s as f32).collect(),
            Some(spaced) => {
                timesteps = spaced
                    .iter()
                    .map(|&s| sigma_to_t(s, &log_train_sigmas))
                    .collect();
                spaced.iter().map(|&s| s as f32).collect()
            }
        };
        sigmas.push(0.0);
        let max_sigma = sigmas.iter().copied().fold(0.0f32, f32::max);
        let init_noise_sigma = match spacing.spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma as f64,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt() as f64,
        };
        Ok(Self {
            timesteps: timesteps.iter().map(|&t| t as f32 as f64).collect(),
            sigmas,
            init_noise_sigma,
            log_train_sigmas,
        })
    }
}

/// How a multistep solver turns Karras or exponential sigmas back into integer timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepRounding {
    /// Round to the nearest timestep.
    Round,
    /// Truncate (what storing a fractional timestep as int64 does).
    Truncate,
}

/// Timesteps and sigmas of the multistep solvers (DPM-Solver++, UniPC, DEIS), as their
/// `set_timesteps` computes them: `steps + 1` points with the last dropped, integer timesteps.
/// The sigmas have no final entry; each solver appends its own.
pub fn multistep_steps(
    config: &SchedulerConfig,
    steps: usize,
    schedule: super::SigmaSchedule,
    karras_rounding: TimestepRounding,
) -> Result<(Vec<f64>, Vec<f32>)> {
    // These classes' own default spacing is linspace.
    let spacing = Schedule::from_config(
        config,
        ClassDefaults {
            spacing: Spacing::Linspace,
        },
    )?;
    let train = spacing.train_timesteps;
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
            let ratio = (train / (steps + 1)) as f64;
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
        super::SigmaSchedule::Default => None,
        super::SigmaSchedule::Karras => {
            Some((karras_sigmas(sigma_min, sigma_max, steps), karras_rounding))
        }
        super::SigmaSchedule::Exponential => Some((
            exponential_sigmas(sigma_min, sigma_max, steps),
            TimestepRounding::Truncate,
        )),
    };
    let sigmas: Vec<f32> = match spaced {
        None => timesteps
            .iter()
            .map(|&t| interp_index(t, &train_sigmas) as f32)
            .collect(),
        Some((spaced, rounding)) => {
            timesteps = spaced
                .iter()
                .map(|&s| {
                    let t = sigma_to_t(s, &log_sigmas);
                    match rounding {
                        TimestepRounding::Round => t.round_ties_even(),
                        TimestepRounding::Truncate => t.trunc(),
                    }
                })
                .collect();
            spaced.iter().map(|&s| s as f32).collect()
        }
    };
    Ok((timesteps.iter().map(|t| t.trunc()).collect(), sigmas))
}

/// `alpha_t, sigma_t` of a k-diffusion sigma (diffusers' `_sigma_to_alpha_sigma_t`), in float32
/// like the tensors they are computed on.
pub fn alpha_sigma(sigma: f32) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha as f64, (sigma * alpha) as f64)
}

/// Half-log signal-to-noise ratio `log(alpha) - log(sigma)`.
pub fn lambda(alpha: f64, sigma: f64) -> f64 {
    alpha.ln() - sigma.ln()
}

/// [`sigma_to_t`] as diffusers evaluates it on float32 tensors (KDPM2's interpolated sigmas).
pub fn sigma_to_t_f32(sigma: f32, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let last_below = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f32 >= 0.0)
        .unwrap_or(0);
    let low_index = last_below.min(log_sigmas.len().saturating_sub(2));
    let (low, high) = (
        log_sigmas[low_index] as f32,
        log_sigmas[low_index + 1] as f32,
    );
    let w = ((low - log_sigma) / (low - high)).clamp(0.0, 1.0);
    ((1.0 - w) * low_index as f32 + w * (low_index + 1) as f32) as f64
}

/// `torch.lerp(start, end, 0.5)` on float32, in log space, then exponentiated: the geometric
/// mean of two sigmas as KDPM2 computes it (0 when either is 0).
pub fn log_midpoint_f32(a: f32, b: f32) -> f32 {
    let (start, end) = (a.ln(), b.ln());
    // torch's lerp with weight >= 0.5 computes end - (end - start) * (1 - weight).
    (end - (end - start) * 0.5).exp()
}
