//! DEIS (Zhang & Chen 2022, "logrho" multistep of order 1-3), as diffusers'
//! `DEISMultistepScheduler`. Like diffusers, its last step ends at the smallest training sigma,
//! not at 0.

use candle_core::Tensor;

use super::schedule::{
    ClassDefaults, Schedule, Spacing, TimestepRounding, alpha_sigma, multistep_steps,
};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// DEIS on the model's noise schedule.
#[derive(Debug, Clone)]
pub struct DeisScheduler {
    timesteps: Vec<f64>,
    /// One more than the timesteps.
    sigmas: Vec<f32>,
    prediction: Prediction,
    solver_order: usize,
    lower_order_final: bool,
    /// Noise predictions of the last evaluations, oldest first.
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

impl DeisScheduler {
    /// Prepares DEIS for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let schedule = schedule.resolve(config);
        if config.thresholding == Some(true) {
            return Err(SchedulerError::Unsupported("DEIS with thresholding".into()));
        }
        // diffusers reads a DPM-Solver config's algorithm and solver types as DEIS's own.
        match config.algorithm_type.as_deref() {
            None | Some("deis" | "dpmsolver" | "dpmsolver++") => {}
            Some(other) => {
                return Err(SchedulerError::Unsupported(format!(
                    "DEIS with algorithm_type {other:?}"
                )));
            }
        }
        match config.solver_type.as_deref() {
            None | Some("logrho" | "midpoint" | "heun" | "bh1" | "bh2") => {}
            Some(other) => {
                return Err(SchedulerError::Unsupported(format!(
                    "DEIS with solver_type {other:?}"
                )));
            }
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(SchedulerError::Unsupported(format!(
                "DEIS of order {solver_order} (1 to 3)"
            )));
        }
        let (timesteps, mut sigmas) =
            multistep_steps(config, steps, schedule, TimestepRounding::Round)?;
        let last = match schedule {
            SigmaSchedule::Default => {
                let alphas = Schedule::from_config(
                    config,
                    ClassDefaults {
                        spacing: Spacing::Linspace,
                    },
                )?
                .alphas_cumprod();
                ((1.0 - alphas[0]) / alphas[0]).sqrt()
            }
            _ => sigmas[sigmas.len() - 1],
        };
        sigmas.push(last);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: Prediction::from_config(config)?,
            solver_order,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
        })
    }

    /// The sigma of each step, then the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// sigma / alpha at sigma index `index` (the "rho" of DEIS).
    fn rho(&self, index: usize) -> (f64, f64) {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        (alpha, sigma / alpha)
    }
}

/// The integrated Lagrange basis for order 2 (diffusers' `ind_fn`).
fn ind2(t: f64, b: f64, c: f64) -> f64 {
    t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln())
}

/// The integrated Lagrange basis for order 3.
fn ind3(t: f64, b: f64, c: f64, d: f64) -> f64 {
    let (lt, lc, ld) = (t.ln(), c.ln(), d.ln());
    let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
    numerator / ((b.ln() - lc) * (b.ln() - ld))
}

impl Scheduler for DeisScheduler {
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
        _noise: &mut NoiseGenerator,
    ) -> Result<StepOutput> {
        let count = self.timesteps.len();
        let lower_final = index + 1 == count && self.lower_order_final && count < 15;
        let lower_second = index + 2 == count && self.lower_order_final && count < 15;
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let pred_x0 =
            self.prediction
                .x0_at_alpha_sigma(model_output, sample, alpha_s0, sigma_s0)?;
        // DEIS works on the noise prediction.
        let eps = ((sample - (&pred_x0 * alpha_s0)?)? / sigma_s0)?;
        self.model_outputs.push(eps);
        if self.model_outputs.len() > self.solver_order {
            self.model_outputs.remove(0);
        }
        let n = self.model_outputs.len();
        let m = |i: usize| &self.model_outputs[n - 1 - i];
        let (alpha_t, rho_t) = self.rho(index + 1);
        let prev_sample = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_final {
            let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
            let h = super::schedule::lambda(alpha_t, sigma_t)
                - super::schedule::lambda(alpha_s0, sigma_s0);
            ((sample * (alpha_t / alpha_s0))? - (m(0) * (sigma_t * h.exp_m1()))?)?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_second {
            let (_, rho_s0) = self.rho(index);
            let (_, rho_s1) = self.rho(index - 1);
            let coef1 = ind2(rho_t, rho_s0, rho_s1) - ind2(rho_s0, rho_s0, rho_s1);
            let coef2 = ind2(rho_t, rho_s1, rho_s0) - ind2(rho_s0, rho_s1, rho_s0);
            let inner = (((sample / alpha_s0)? + (m(0) * coef1)?)? + (m(1) * coef2)?)?;
            (inner * alpha_t)?
        } else {
            let (_, rho_s0) = self.rho(index);
            let (_, rho_s1) = self.rho(index - 1);
            let (_, rho_s2) = self.rho(index - 2);
            let coef1 = ind3(rho_t, rho_s0, rho_s1, rho_s2) - ind3(rho_s0, rho_s0, rho_s1, rho_s2);
            let coef2 = ind3(rho_t, rho_s1, rho_s2, rho_s0) - ind3(rho_s0, rho_s1, rho_s2, rho_s0);
            let coef3 = ind3(rho_t, rho_s2, rho_s0, rho_s1) - ind3(rho_s0, rho_s2, rho_s0, rho_s1);
            let inner =
                ((((sample / alpha_s0)? + (m(0) * coef1)?)? + (m(1) * coef2)?)? + (m(2) * coef3)?)?;
            (inner * alpha_t)?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model published with a DPM-Solver config (as many are) runs DEIS as diffusers does:
    /// `DEISMultistepScheduler.from_config` reads dpmsolver/dpmsolver++ and midpoint as its own.
    #[test]
    fn a_dpm_solver_config_configures_deis() {
        let config = |algorithm: &str, solver: &str| -> SchedulerConfig {
            serde_json::from_value(serde_json::json!({
                "_class_name": "DPMSolverMultistepScheduler",
                "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
                "algorithm_type": algorithm, "solver_type": solver, "solver_order": 2,
            }))
            .expect("config")
        };
        let own = DeisScheduler::new(&config("deis", "logrho"), 20, SigmaSchedule::Default)
            .expect("DEIS from its own config");
        for (algorithm, solver) in [("dpmsolver++", "midpoint"), ("dpmsolver", "heun")] {
            let from_dpm =
                DeisScheduler::new(&config(algorithm, solver), 20, SigmaSchedule::Default)
                    .expect("DEIS from a DPM-Solver config");
            assert_eq!(from_dpm.timesteps(), own.timesteps());
        }
        assert!(
            DeisScheduler::new(
                &config("sde-dpmsolver++", "midpoint"),
                20,
                SigmaSchedule::Default
            )
            .is_err()
        );
        assert!(DeisScheduler::new(&config("deis", "euler"), 20, SigmaSchedule::Default).is_err());
    }
}
