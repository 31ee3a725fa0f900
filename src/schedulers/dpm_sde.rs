//! DPM++ SDE (k-diffusion's `sample_dpmpp_sde`, a stochastic second-order singlestep solver), as
//! diffusers' `DPMSolverSDEScheduler`: two model evaluations per step but one for the last.
//!
//! diffusers draws its noise from a Brownian tree (torchsde): the noise of a step's first half
//! (sigma_k to the midpoint) and of the whole step (sigma_k to sigma_k+1) are increments of one
//! Brownian path, so they are correlated. We draw the same two increments from the job's seeded
//! generator: the first half, then the independent remainder, which makes the whole-step noise
//! `(sqrt(a) n1 + sqrt(b) z) / sqrt(a + b)` for half-lengths `a` and `b`.

use candle_core::Tensor;

use super::schedule::{SigmaSteps, scale_by_sigma, sigma_to_t};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// State between the two halves of a step.
#[derive(Debug, Clone)]
struct FirstHalf {
    sample: Tensor,
    /// The normalised Brownian increment from sigma_k to the midpoint.
    noise: Tensor,
}

/// DPM++ SDE on the model's sigma schedule.
#[derive(Debug, Clone)]
pub struct DpmSdeScheduler {
    timesteps: Vec<f64>,
    /// The step sigmas, then 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f64,
    prediction: Prediction,
    first_half: Option<FirstHalf>,
}

/// `exp(-(t + (t_next - t) / 2))` with `t = -ln sigma`, in float32 as diffusers computes it.
fn midpoint_sigma(sigma: f32, sigma_next: f32) -> f32 {
    let (t, t_next) = (-sigma.ln(), -sigma_next.ln());
    (-(t + (t_next - t) * 0.5)).exp()
}

/// The ancestral split of a step from `from` to `to`: the coefficients of `x` and of x0 for
/// the deterministic part, and the noise scale.
fn ancestral_coefficients(from: f32, to: f32) -> (f64, f64, f64) {
    let t = -from.ln();
    let (from, to) = ((-t).exp(), to);
    let up = to.min((to * to * (from * from - to * to) / (from * from)).sqrt());
    let down = (to * to - up * up).sqrt();
    let ancestral_t = -down.ln();
    let x_coeff = (-ancestral_t).exp() / (-t).exp();
    let x0_coeff = -(t - ancestral_t).exp_m1();
    (x_coeff as f64, x0_coeff as f64, up as f64)
}

impl DpmSdeScheduler {
    /// Prepares DPM++ SDE for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let prediction = Prediction::from_config(config)?;
        if prediction == Prediction::Sample {
            return Err(SchedulerError::Unsupported(
                "DPM++ SDE with prediction_type \"sample\"".into(),
            ));
        }
        let base = SigmaSteps::new(config, steps, schedule.resolve(config))?;
        let log_sigmas = &base.log_train_sigmas;
        let mut timesteps = vec![base.timesteps[0]];
        for k in 0..steps - 1 {
            // diffusers computes the midpoint timesteps in float64 from the float64 sigmas.
            let (s, s_next) = (base.sigmas[k] as f64, base.sigmas[k + 1] as f64);
            let (t, t_next) = (-s.ln(), -s_next.ln());
            let midpoint = (-(t + (t_next - t) * 0.5)).exp();
            timesteps.push(sigma_to_t(midpoint, log_sigmas));
            timesteps.push(base.timesteps[k + 1]);
        }
        Ok(Self {
            timesteps,
            sigmas: base.sigmas,
            init_noise_sigma: base.init_noise_sigma,
            prediction,
            first_half: None,
        })
    }

    /// The step sigmas, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn input_sigma(&self, index: usize) -> f32 {
        let k = index / 2;
        if index.is_multiple_of(2) {
            self.sigmas[k]
        } else {
            midpoint_sigma(self.sigmas[k], self.sigmas[k + 1])
        }
    }
}

impl Scheduler for DpmSdeScheduler {
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
        let (sigma, sigma_next) = (self.sigmas[k], self.sigmas[k + 1]);
        let sigma_input = self.input_sigma(index);
        let pred_x0 = self
            .prediction
            .x0_at_sigma(model_output, sample, sigma_input as f64)?;
        if sigma_next == 0.0 {
            // The last step: Euler to sigma 0.
            let derivative = ((sample - &pred_x0)? / sigma as f64)?;
            return Ok(StepOutput {
                prev_sample: (sample + (derivative * -(sigma as f64))?)?,
                pred_original_sample: pred_x0,
            });
        }
        let midpoint = midpoint_sigma(sigma, sigma_next);
        let prev_sample = match self.first_half.take() {
            None => {
                let (x_coeff, x0_coeff, up) = ancestral_coefficients(sigma, midpoint);
                let n1 = noise.randn_like(sample)?;
                let prev = ((sample * x_coeff)? + (&pred_x0 * x0_coeff)?)?;
                let prev = (prev + (&n1 * up)?)?;
                self.first_half = Some(FirstHalf {
                    sample: sample.clone(),
                    noise: n1,
                });
                prev
            }
            Some(first) => {
                let (x_coeff, x0_coeff, up) = ancestral_coefficients(sigma, sigma_next);
                let z = noise.randn_like(sample)?;
                let a = (sigma - midpoint) as f64;
                let b = (midpoint - sigma_next) as f64;
                let whole = (((&first.noise * a.sqrt())? + (z * b.sqrt())?)? / (a + b).sqrt())?;
                let prev = ((&first.sample * x_coeff)? + (&pred_x0 * x0_coeff)?)?;
                (prev + (whole * up)?)?
            }
        };
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
