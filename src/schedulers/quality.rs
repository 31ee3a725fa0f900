//! How good is a sampler? Drive it with the ideal denoiser of data whose distribution we know
//! and measure how far its samples land from that distribution.
//!
//! With data x0 ~ N(mu, s^2) (or a mixture of Gaussians), the best possible noise prediction
//! at `x_t = sqrt(abar) x0 + sqrt(1 - abar) eps` has a closed form (`../shared/docs/schedulers.md`).
//! A perfect sampler fed with it ends at samples with the data's mean and standard deviation;
//! what is left is the sampler's own discretisation error, which shrinks with more model
//! evaluations. LCM is different: it is meant for consistency-distilled models, which return a
//! clean sample rather than the posterior mean, so it is driven by a denoiser that draws x0 from
//! the exact posterior p(x0 | x_t).

use candle_core::{Device, Tensor};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;

use super::schedule::{ClassDefaults, Schedule, Spacing, interp_index};
use super::{Sampler, SchedulerKind, SigmaSchedule};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::Result;
use crate::schedulers::noise::NoiseGenerator;

/// One Gaussian component of the data distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Component {
    /// Mixture weight (the weights sum to 1).
    pub weight: f64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
}

/// A one-dimensional data distribution (applied independently to every latent value).
#[derive(Debug, Clone, PartialEq)]
pub struct DataDistribution {
    /// The mixture's components (one for a plain Gaussian).
    pub components: Vec<Component>,
}

impl DataDistribution {
    /// N(mean, std^2).
    pub fn gaussian(mean: f64, std: f64) -> Self {
        Self {
            components: vec![Component {
                weight: 1.0,
                mean,
                std,
            }],
        }
    }

    /// The distributions the tests and `atelier schedulers` use: N(0.5, 0.8^2), and an even
    /// mixture of N(-1, 0.3^2) and N(1.5, 0.5^2) (two well separated modes).
    pub fn standard_pair() -> [(&'static str, Self); 2] {
        [
            ("Gaussian", Self::gaussian(0.5, 0.8)),
            (
                "mixture",
                Self {
                    components: vec![
                        Component {
                            weight: 0.5,
                            mean: -1.0,
                            std: 0.3,
                        },
                        Component {
                            weight: 0.5,
                            mean: 1.5,
                            std: 0.5,
                        },
                    ],
                },
            ),
        ]
    }

    /// The true mean.
    pub fn mean(&self) -> f64 {
        self.components.iter().map(|c| c.weight * c.mean).sum()
    }

    /// The true standard deviation.
    pub fn std(&self) -> f64 {
        let mean = self.mean();
        let second: f64 = self
            .components
            .iter()
            .map(|c| c.weight * (c.std * c.std + c.mean * c.mean))
            .sum();
        (second - mean * mean).max(0.0).sqrt()
    }

    /// Posterior weights of the components given `x` at signal level `abar`, with each
    /// component's posterior mean and variance of x0.
    fn posterior(&self, x: f64, abar: f64) -> Vec<(f64, f64, f64)> {
        let root = abar.sqrt();
        let mut parts: Vec<(f64, f64, f64)> = self
            .components
            .iter()
            .map(|c| {
                let variance = abar * c.std * c.std + 1.0 - abar;
                let offset = x - root * c.mean;
                let log_density =
                    c.weight.ln() - 0.5 * (offset * offset / variance + variance.ln());
                let mean = c.mean + root * c.std * c.std * offset / variance;
                let x0_variance = c.std * c.std * (1.0 - abar) / variance;
                (log_density, mean, x0_variance)
            })
            .collect();
        let max = parts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = parts.iter().map(|p| (p.0 - max).exp()).sum();
        for part in &mut parts {
            part.0 = (part.0 - max).exp() / total;
        }
        parts
    }

    /// E[x0 | x_t = x] at signal level `abar`.
    pub fn posterior_mean(&self, x: f64, abar: f64) -> f64 {
        self.posterior(x, abar).iter().map(|p| p.0 * p.1).sum()
    }

    /// A draw of x0 from p(x0 | x_t = x).
    pub fn posterior_sample(&self, x: f64, abar: f64, rng: &mut ChaCha8Rng) -> f64 {
        let parts = self.posterior(x, abar);
        let mut pick = rng.random::<f64>();
        let mut chosen = parts[parts.len() - 1];
        for part in &parts {
            if pick < part.0 {
                chosen = *part;
                break;
            }
            pick -= part.0;
        }
        let z: f64 = rng.sample(StandardNormal);
        chosen.1 + chosen.2.sqrt() * z
    }
}

/// The noise schedule the quality map uses: DDPM's linear betas (1e-4 to 0.02) with trailing
/// spacing, so that every sampler starts at t = 999 where almost no signal is left
/// (sqrt(abar) = 0.006). Stable Diffusion's own schedule keeps sqrt(abar) = 0.068 of the signal
/// at t = 999 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"): starting from
/// pure noise then shifts the mean of every sampler alike, a floor of about 5 % that would hide
/// the differences between samplers.
pub fn reference_config() -> SchedulerConfig {
    SchedulerConfig {
        num_train_timesteps: Some(1000),
        beta_start: Some(0.0001),
        beta_end: Some(0.02),
        beta_schedule: Some("linear".into()),
        prediction_type: Some("epsilon".into()),
        timestep_spacing: Some("trailing".into()),
        clip_sample: Some(false),
        ..Default::default()
    }
}

/// Mean and standard deviation of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleStats {
    /// Sample mean.
    pub mean: f64,
    /// Sample standard deviation.
    pub std: f64,
}

impl SampleStats {
    fn of(values: &[f32]) -> Self {
        let n = values.len().max(1) as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let variance = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        Self {
            mean,
            std: variance.sqrt(),
        }
    }

    /// Distance to the data distribution: the 2-Wasserstein distance between Gaussians with
    /// these moments, `sqrt((m - mu)^2 + (sd - s)^2)`, relative to the data's `s`.
    pub fn error(&self, data: &DataDistribution) -> f64 {
        let (mean, std) = (data.mean(), data.std());
        ((self.mean - mean).powi(2) + (self.std - std).powi(2)).sqrt() / std
    }
}

/// Runs `sampler` for `steps` steps on `samples` independent values of `data`, with the ideal
/// denoiser (a posterior draw for LCM), on the noise schedule of `config` (epsilon prediction).
pub fn sample_ideal(
    sampler: Sampler,
    config: &SchedulerConfig,
    steps: usize,
    data: &DataDistribution,
    samples: usize,
    seed: u64,
) -> Result<SampleStats> {
    let evaluations = sampler.kind.model_evaluations(steps);
    sample_ideal_steps(sampler, config, steps, evaluations, data, samples, seed)
}

/// [`sample_ideal`], stopping after the first `evaluations` model evaluations of the schedule
/// (to check that the measure notices a sampler that stops short).
pub fn sample_ideal_steps(
    sampler: Sampler,
    config: &SchedulerConfig,
    steps: usize,
    evaluations: usize,
    data: &DataDistribution,
    samples: usize,
    seed: u64,
) -> Result<SampleStats> {
    let alphas: Vec<f64> = Schedule::from_config(
        config,
        ClassDefaults {
            spacing: Spacing::Leading,
        },
    )?
    .alphas_cumprod()
    .iter()
    .map(|&a| a as f64)
    .collect();
    let mut scheduler = sampler.kind.build(config, steps, sampler.sigmas, 0.0)?;
    let mut noise = NoiseGenerator::new(seed);
    let mut posterior_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let shape = [1, samples];
    let mut x = (noise.randn(&shape, &Device::Cpu)? * scheduler.init_noise_sigma())?;
    let timesteps = scheduler.timesteps().to_vec();
    for (index, &t) in timesteps.iter().enumerate().take(evaluations) {
        let input: Vec<f32> = scheduler
            .scale_model_input(&x, index)?
            .flatten_all()?
            .to_vec1()?;
        let abar = interp_index(t, &alphas);
        let eps: Vec<f32> = input
            .iter()
            .map(|&value| {
                let value = value as f64;
                let x0 = if sampler.kind == SchedulerKind::Lcm {
                    data.posterior_sample(value, abar, &mut posterior_rng)
                } else {
                    data.posterior_mean(value, abar)
                };
                ((value - abar.sqrt() * x0) / (1.0 - abar).sqrt()) as f32
            })
            .collect();
        let model_output = Tensor::from_vec(eps, &shape, &Device::Cpu)?;
        x = scheduler
            .step(&model_output, index, &x, &mut noise)?
            .prev_sample;
    }
    Ok(SampleStats::of(&x.flatten_all()?.to_vec1()?))
}

/// One sampler's errors at several budgets of model evaluations.
#[derive(Debug, Clone)]
pub struct QualityRow {
    /// The sampler.
    pub sampler: Sampler,
    /// For each budget: (model evaluations used, error per distribution of
    /// [`DataDistribution::standard_pair`]).
    pub cells: Vec<(usize, [f64; 2])>,
}

/// Every sampler with default and Karras sigmas (where it has them), at each evaluation budget.
pub fn quality_map(
    config: &SchedulerConfig,
    budgets: &[usize],
    samples: usize,
    seed: u64,
) -> Result<Vec<QualityRow>> {
    let distributions = DataDistribution::standard_pair();
    let mut rows = Vec::new();
    for &kind in SchedulerKind::ALL {
        for sigmas in [SigmaSchedule::Default, SigmaSchedule::Karras] {
            if !kind.supports(sigmas) {
                continue;
            }
            let sampler = Sampler { kind, sigmas };
            let mut cells = Vec::new();
            for &budget in budgets {
                let steps = kind.steps_for_evaluations(budget);
                let mut errors = [0.0; 2];
                for (error, (_, data)) in errors.iter_mut().zip(&distributions) {
                    *error = sample_ideal(sampler, config, steps, data, samples, seed)?.error(data);
                }
                cells.push((kind.model_evaluations(steps), errors));
            }
            rows.push(QualityRow { sampler, cells });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixture_moments_and_posterior_limits() {
        let [_, (_, mixture)] = DataDistribution::standard_pair();
        assert!((mixture.mean() - 0.25).abs() < 1e-12);
        // Var = E[s^2 + m^2] - mean^2 = 0.5 (0.09 + 1) + 0.5 (0.25 + 2.25) - 0.0625.
        assert!((mixture.std() - (1.7325f64).sqrt()).abs() < 1e-12);
        // Pure noise says nothing about x0; a clean sample says everything.
        assert!((mixture.posterior_mean(3.0, 1e-12) - 0.25).abs() < 1e-4);
        assert!((mixture.posterior_mean(1.2, 1.0 - 1e-12) - 1.2).abs() < 1e-5);
    }
}
