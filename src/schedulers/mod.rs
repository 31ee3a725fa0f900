//! Schedulers (samplers): our own implementations, one file per family, behind one trait.
//!
//! Each is configured from the model's `scheduler_config.json` exactly as diffusers'
//! `XScheduler.from_config(config)` is, and checked against diffusers in the tests.

pub mod config;
pub mod ddim;
pub mod ddpm;
pub mod deis;
pub mod dpm_sde;
pub mod dpm_solver;
pub mod dpmpp_2s;
pub mod error;
pub mod euler;
pub mod heun;
pub mod kdpm2;
pub mod lcm;
pub mod lms;
pub mod noise;
pub mod pndm;
pub mod quality;
pub mod schedule;
pub mod unipc;

use candle_core::Tensor;

use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// What one scheduler step produces.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The latents for the next step.
    pub prev_sample: Tensor,
    /// The scheduler's estimate of the clean latents (used for previews).
    pub pred_original_sample: Tensor,
}

/// A sampler, prepared for a fixed number of steps.
///
/// The loop is: for each index `i` of [`Scheduler::timesteps`], call the model on
/// [`Scheduler::scale_model_input`] at `timesteps()[i]`, then [`Scheduler::step`] with index `i`.
pub trait Scheduler: Send {
    /// The timestep of each model evaluation, in order.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation of the initial noise (the noise is multiplied by this); 1 for the
    /// variance-preserving samplers.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the latents before the model sees them at evaluation `index` (unchanged for the
    /// variance-preserving samplers).
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// Advances the latents after evaluation `index`; stochastic samplers draw from `noise`.
    fn step(
        &mut self,
        model_output: &Tensor,
        index: usize,
        sample: &Tensor,
        noise: &mut NoiseGenerator,
    ) -> Result<StepOutput>;
    /// Model evaluations per step in [`Scheduler::timesteps`] (diffusers' `order`): 2 for the
    /// second-order singlestep samplers, whose timesteps come in pairs; 1 for the rest. A late
    /// start (image to image) begins at a multiple of it.
    fn order(&self) -> usize {
        1
    }
    /// How noisy the latents are before evaluation `index`: what [`Scheduler::add_noise`] mixes.
    fn noise_level(&self, index: usize) -> Result<NoiseLevel>;
    /// Clean latents noised to the level of evaluation `index`, as diffusers' `add_noise` does
    /// at its step index (the start of an image-to-image run, or the known region of an
    /// inpainting after a step).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        Ok(match self.noise_level(index)? {
            NoiseLevel::Sigma(sigma) => (original + (noise * sigma as f64)?)?,
            NoiseLevel::AlphaSigma { alpha, sigma } => {
                ((original * alpha as f64)? + (noise * sigma as f64)?)?
            }
        })
    }
}

/// How much of the clean latents and how much noise the latents hold at a point of the schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NoiseLevel {
    /// The k-diffusion parametrisation: `x = x0 + sigma * noise`.
    Sigma(f32),
    /// The variance-preserving one: `x = alpha * x0 + sigma * noise`.
    AlphaSigma {
        /// The signal's scale, `sqrt(alphas_cumprod)`.
        alpha: f32,
        /// The noise's scale, `sqrt(1 - alphas_cumprod)`.
        sigma: f32,
    },
}

impl NoiseLevel {
    /// The variance-preserving level of training step `timestep`, from `alphas_cumprod` (f32, as
    /// diffusers computes it).
    pub fn from_alphas_cumprod(alphas_cumprod: &[f32], timestep: i64) -> Result<Self> {
        let abar = usize::try_from(timestep)
            .ok()
            .and_then(|t| alphas_cumprod.get(t))
            .copied()
            .ok_or_else(|| {
                SchedulerError::InvalidParameter(format!("no training step {timestep}"))
            })?;
        Ok(NoiseLevel::AlphaSigma {
            alpha: abar.sqrt(),
            sigma: (1.0 - abar).sqrt(),
        })
    }

    /// The variance-preserving level of a k-diffusion sigma (the multistep solvers keep sigmas).
    pub fn from_sigma_vp(sigma: f32) -> Self {
        let (alpha, sigma) = schedule::alpha_sigma(sigma);
        NoiseLevel::AlphaSigma {
            alpha: alpha as f32,
            sigma: sigma as f32,
        }
    }
}

/// `values[index]`, or an error naming the evaluation index (for [`Scheduler::noise_level`]).
pub fn at_index<T: Copy>(values: &[T], index: usize) -> Result<T> {
    values.get(index).copied().ok_or_else(|| {
        SchedulerError::InvalidParameter(format!(
            "evaluation {index} is past the end of the schedule"
        ))
    })
}

/// Where an image-to-image run of `steps` steps at denoising `strength` (0 to 1) starts in the
/// timesteps of a scheduler of `order`, as diffusers' `get_timesteps` computes it: the last
/// `int(steps * strength)` steps run.
pub fn first_index_for_strength(steps: usize, strength: f64, order: usize) -> usize {
    steps.saturating_sub(steps_for_strength(steps, strength)) * order
}

/// The steps a run of `steps` at denoising `strength` keeps (diffusers' `int(steps *
/// strength)`, at most `steps`; 0 when the strength is too low to run any).
pub fn steps_for_strength(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength) as usize).min(steps)
}

/// The samplers Atelier knows, by the ids the CLI and metadata use
/// (`../shared/docs/schedulers.md` maps each to its diffusers class).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchedulerKind {
    /// DDIM (DDIMScheduler), deterministic unless eta > 0.
    Ddim,
    /// DDPM (DDPMScheduler): stochastic.
    Ddpm,
    /// PLMS (PNDMScheduler with skip_prk_steps): one more evaluation than steps.
    Pndm,
    /// LMS (LMSDiscreteScheduler): linear multistep of order 4.
    Lms,
    /// Euler (EulerDiscreteScheduler).
    Euler,
    /// Euler a (EulerAncestralDiscreteScheduler): stochastic.
    EulerA,
    /// Heun (HeunDiscreteScheduler): two model evaluations per step.
    Heun,
    /// DPM2 (KDPM2DiscreteScheduler): two model evaluations per step.
    Dpm2,
    /// DPM2 a (KDPM2AncestralDiscreteScheduler): two evaluations per step, stochastic.
    Dpm2A,
    /// DPM++ 2M (DPMSolverMultistepScheduler).
    DpmPp2m,
    /// DPM++ 2M SDE (DPMSolverMultistepScheduler, sde-dpmsolver++): stochastic.
    DpmPp2mSde,
    /// DPM++ SDE (DPMSolverSDEScheduler): two evaluations per step, stochastic.
    DpmPpSde,
    /// DPM++ 2S a (k-diffusion's sample_dpmpp_2s_ancestral): two evaluations per step, stochastic.
    DpmPp2sA,
    /// UniPC (UniPCMultistepScheduler).
    UniPc,
    /// DEIS (DEISMultistepScheduler).
    Deis,
    /// LCM (LCMScheduler), for LCM-distilled models: stochastic.
    Lcm,
}

impl SchedulerKind {
    /// Every scheduler, in menu order.
    pub const ALL: &'static [SchedulerKind] = &[
        SchedulerKind::Euler,
        SchedulerKind::EulerA,
        SchedulerKind::Heun,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mSde,
        SchedulerKind::DpmPpSde,
        SchedulerKind::DpmPp2sA,
        SchedulerKind::Dpm2,
        SchedulerKind::Dpm2A,
        SchedulerKind::Lms,
        SchedulerKind::UniPc,
        SchedulerKind::Deis,
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::Ddpm,
        SchedulerKind::Lcm,
    ];

    /// The CLI id, e.g. `euler`.
    pub fn id(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Ddpm => "ddpm",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::Lms => "lms",
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerA => "euler-a",
            SchedulerKind::Heun => "heun",
            SchedulerKind::Dpm2 => "dpm2",
            SchedulerKind::Dpm2A => "dpm2-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mSde => "dpmpp-2m-sde",
            SchedulerKind::DpmPpSde => "dpmpp-sde",
            SchedulerKind::DpmPp2sA => "dpmpp-2s-a",
            SchedulerKind::UniPc => "unipc",
            SchedulerKind::Deis => "deis",
            SchedulerKind::Lcm => "lcm",
        }
    }

    /// The name artists know (AUTOMATIC1111's), e.g. `Euler`.
    pub fn display_name(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "DDIM",
            SchedulerKind::Ddpm => "DDPM",
            SchedulerKind::Pndm => "PLMS",
            SchedulerKind::Lms => "LMS",
            SchedulerKind::Euler => "Euler",
            SchedulerKind::EulerA => "Euler a",
            SchedulerKind::Heun => "Heun",
            SchedulerKind::Dpm2 => "DPM2",
            SchedulerKind::Dpm2A => "DPM2 a",
            SchedulerKind::DpmPp2m => "DPM++ 2M",
            SchedulerKind::DpmPp2mSde => "DPM++ 2M SDE",
            SchedulerKind::DpmPpSde => "DPM++ SDE",
            SchedulerKind::DpmPp2sA => "DPM++ 2S a",
            SchedulerKind::UniPc => "UniPC",
            SchedulerKind::Deis => "DEIS",
            SchedulerKind::Lcm => "LCM",
        }
    }

    /// Parses a CLI id without a sigma suffix; the error lists the valid ones.
    pub fn parse(id: &str) -> Result<Self> {
        let sampler = Sampler::parse(id)?;
        if sampler.sigmas != SigmaSchedule::Default {
            return Err(SchedulerError::InvalidParameter(format!(
                "{id:?} names a sigma schedule too; give the scheduler alone"
            )));
        }
        Ok(sampler.kind)
    }

    /// Model evaluations for `steps` steps: the second-order singlestep samplers evaluate twice
    /// per step but once for the last; PLMS once more than steps (from 2 steps on).
    pub fn model_evaluations(self, steps: usize) -> usize {
        match self {
            SchedulerKind::Heun
            | SchedulerKind::Dpm2
            | SchedulerKind::Dpm2A
            | SchedulerKind::DpmPpSde
            | SchedulerKind::DpmPp2sA => (2 * steps).saturating_sub(1),
            SchedulerKind::Pndm if steps >= 2 => steps + 1,
            _ => steps,
        }
    }

    /// The most steps whose model evaluations fit in `evaluations` (at least 1).
    pub fn steps_for_evaluations(self, evaluations: usize) -> usize {
        (1..=evaluations.max(1))
            .rev()
            .find(|&steps| self.model_evaluations(steps) <= evaluations)
            .unwrap_or(1)
    }

    /// Whether the family can use a sigma schedule (DDIM-style samplers step on timesteps).
    pub fn supports(self, sigmas: SigmaSchedule) -> bool {
        match self {
            SchedulerKind::Ddim
            | SchedulerKind::Ddpm
            | SchedulerKind::Pndm
            | SchedulerKind::Lcm
            | SchedulerKind::EulerA => sigmas == SigmaSchedule::Default,
            _ => true,
        }
    }

    /// Builds the scheduler from the model's config, prepared for `steps` steps. `eta` is DDIM's
    /// stochasticity (0 = deterministic); the other samplers ignore it.
    pub fn build(
        self,
        config: &SchedulerConfig,
        steps: usize,
        sigmas: SigmaSchedule,
        eta: f64,
    ) -> Result<Box<dyn Scheduler>> {
        config
            .check()
            .map_err(|e| SchedulerError::Unsupported(format!("scheduler config: {e}")))?;
        if !self.supports(sigmas) {
            return Err(SchedulerError::InvalidParameter(format!(
                "{} has no {} sigma schedule",
                self.display_name(),
                sigmas.display_name()
            )));
        }
        if steps == 0 || steps > config.train_timesteps() {
            return Err(SchedulerError::InvalidParameter(format!(
                "steps must be between 1 and {}, got {steps}",
                config.train_timesteps()
            )));
        }
        if !(0.0..=1.0).contains(&eta) {
            return Err(SchedulerError::InvalidParameter(format!(
                "eta must be between 0 and 1, got {eta}"
            )));
        }
        Ok(match self {
            SchedulerKind::Ddim => Box::new(ddim::DdimScheduler::new(config, steps, eta)?),
            SchedulerKind::Ddpm => Box::new(ddpm::DdpmScheduler::new(config, steps)?),
            SchedulerKind::Pndm => Box::new(pndm::PndmScheduler::new(config, steps)?),
            SchedulerKind::Lms => Box::new(lms::LmsScheduler::new(config, steps, sigmas)?),
            SchedulerKind::Euler => Box::new(euler::EulerScheduler::new(config, steps, sigmas)?),
            SchedulerKind::EulerA => Box::new(euler::EulerScheduler::ancestral(config, steps)?),
            SchedulerKind::Heun => Box::new(heun::HeunScheduler::new(config, steps, sigmas)?),
            SchedulerKind::Dpm2 | SchedulerKind::Dpm2A => Box::new(kdpm2::Kdpm2Scheduler::new(
                config,
                steps,
                sigmas,
                self == SchedulerKind::Dpm2A,
            )?),
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mSde => {
                Box::new(dpm_solver::DpmSolverMultistep::new(
                    config,
                    steps,
                    sigmas,
                    self == SchedulerKind::DpmPp2mSde,
                )?)
            }
            SchedulerKind::DpmPpSde => {
                Box::new(dpm_sde::DpmSdeScheduler::new(config, steps, sigmas)?)
            }
            SchedulerKind::DpmPp2sA => {
                Box::new(dpmpp_2s::DpmPp2sAncestral::new(config, steps, sigmas)?)
            }
            SchedulerKind::UniPc => Box::new(unipc::UniPcScheduler::new(config, steps, sigmas)?),
            SchedulerKind::Deis => Box::new(deis::DeisScheduler::new(config, steps, sigmas)?),
            SchedulerKind::Lcm => Box::new(lcm::LcmScheduler::new(config, steps)?),
        })
    }
}

/// How the noise levels of a sigma-based sampler are spaced.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum SigmaSchedule {
    /// The model's own: the sigmas at the spaced timesteps.
    #[default]
    Default,
    /// Karras et al. (2022), rho = 7: more steps at low noise.
    Karras,
    /// Evenly spaced in log sigma.
    Exponential,
}

impl SigmaSchedule {
    /// Every schedule, in menu order.
    pub const ALL: &'static [SigmaSchedule] = &[
        SigmaSchedule::Default,
        SigmaSchedule::Karras,
        SigmaSchedule::Exponential,
    ];

    /// The name artists know (A1111's "Schedule type").
    pub fn display_name(self) -> &'static str {
        match self {
            SigmaSchedule::Default => "Default",
            SigmaSchedule::Karras => "Karras",
            SigmaSchedule::Exponential => "Exponential",
        }
    }

    /// This schedule, or the config's (`use_karras_sigmas`, `use_exponential_sigmas`) when it is
    /// the default.
    pub fn resolve(self, config: &SchedulerConfig) -> Self {
        match self {
            SigmaSchedule::Default if config.use_karras_sigmas == Some(true) => {
                SigmaSchedule::Karras
            }
            SigmaSchedule::Default if config.use_exponential_sigmas == Some(true) => {
                SigmaSchedule::Exponential
            }
            other => other,
        }
    }

    /// The CLI suffix (`-karras`), empty for the default.
    pub fn suffix(self) -> &'static str {
        match self {
            SigmaSchedule::Default => "",
            SigmaSchedule::Karras => "-karras",
            SigmaSchedule::Exponential => "-exponential",
        }
    }
}

/// A sampler with its sigma schedule, as artists pick it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Sampler {
    /// The scheduler family.
    pub kind: SchedulerKind,
    /// Its sigma schedule.
    pub sigmas: SigmaSchedule,
}

impl Sampler {
    /// Parses a CLI id such as `euler`, `euler-karras` or `euler-exponential`; the error lists
    /// the valid ids.
    pub fn parse(id: &str) -> Result<Self> {
        let wanted = id.trim().to_ascii_lowercase();
        for kind in SchedulerKind::ALL {
            for &sigmas in SigmaSchedule::ALL {
                if !kind.supports(sigmas) {
                    continue;
                }
                if wanted == format!("{}{}", kind.id(), sigmas.suffix()) {
                    return Ok(Self {
                        kind: *kind,
                        sigmas,
                    });
                }
            }
        }
        Err(SchedulerError::InvalidParameter(format!(
            "unknown scheduler {id:?}; valid schedulers: {}",
            Self::all_ids().join(", ")
        )))
    }

    /// Every valid CLI id.
    pub fn all_ids() -> Vec<String> {
        let mut ids = Vec::new();
        for kind in SchedulerKind::ALL {
            for &sigmas in SigmaSchedule::ALL {
                if kind.supports(sigmas) {
                    ids.push(format!("{}{}", kind.id(), sigmas.suffix()));
                }
            }
        }
        ids
    }

    /// The CLI id.
    pub fn id(self) -> String {
        format!("{}{}", self.kind.id(), self.sigmas.suffix())
    }
}

/// What the model predicts, from `prediction_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The added noise.
    Epsilon,
    /// The velocity sqrt(abar) eps - sqrt(1 - abar) x0.
    VPrediction,
    /// The clean sample itself.
    Sample,
}

impl Prediction {
    /// The name diffusers' configs give it (`prediction_type`).
    pub fn config_name(self) -> &'static str {
        match self {
            Prediction::Epsilon => "epsilon",
            Prediction::VPrediction => "v_prediction",
            Prediction::Sample => "sample",
        }
    }

    /// The clean sample predicted by `model_output` at noise level `sigma`, for the k-diffusion
    /// style samplers whose latents carry noise of standard deviation `sigma`.
    pub fn x0_at_sigma(self, model_output: &Tensor, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(match self {
            Prediction::Epsilon => (sample - (model_output * sigma)?)?,
            Prediction::VPrediction => {
                let scale = sigma * sigma + 1.0;
                ((model_output * (-sigma / scale.sqrt()))? + (sample / scale)?)?
            }
            Prediction::Sample => model_output.clone(),
        })
    }

    /// The clean sample predicted by `model_output` for latents `sample = alpha x0 + sigma eps`
    /// (the variance-preserving parametrisation of DDPM, DDIM, LCM and the multistep solvers).
    pub fn x0_at_alpha_sigma(
        self,
        model_output: &Tensor,
        sample: &Tensor,
        alpha: f64,
        sigma: f64,
    ) -> Result<Tensor> {
        Ok(match self {
            Prediction::Epsilon => ((sample - (model_output * sigma)?)? / alpha)?,
            Prediction::VPrediction => ((sample * alpha)? - (model_output * sigma)?)?,
            Prediction::Sample => model_output.clone(),
        })
    }

    /// The config's `prediction_type` (epsilon when absent, in every class).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        match config.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" | "original_sample" => Ok(Prediction::Sample),
            other => Err(SchedulerError::Unsupported(format!(
                "prediction_type {other:?}"
            ))),
        }
    }
}
