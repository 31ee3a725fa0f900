//! UniPC (Zhao et al. 2023): a multistep predictor with a corrector that reuses each new model
//! evaluation, as diffusers' `UniPCMultistepScheduler` (bh1/bh2, data prediction, any order).

use candle_core::Tensor;

use super::schedule::{TimestepRounding, alpha_sigma, lambda, multistep_steps};
use super::{NoiseLevel, Prediction, Scheduler, SigmaSchedule, StepOutput};
use crate::schedulers::config::SchedulerConfig;
use crate::schedulers::error::{Result, SchedulerError};
use crate::schedulers::noise::NoiseGenerator;

/// The B(h) of the UniPC papers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Bh1,
    Bh2,
}

/// UniPC on the model's noise schedule.
#[derive(Debug, Clone)]
pub struct UniPcScheduler {
    timesteps: Vec<f64>,
    /// One more than the timesteps: the final sigma is 0.
    sigmas: Vec<f32>,
    prediction: Prediction,
    variant: Variant,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    /// Predicted x0 of the last `solver_order` evaluations, oldest first.
    model_outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

/// Solves `matrix x = rhs` by Gaussian elimination with partial pivoting (tiny systems).
fn solve(mut matrix: Vec<Vec<f64>>, mut rhs: Vec<f64>) -> Vec<f64> {
    let n = rhs.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| matrix[a][col].abs().total_cmp(&matrix[b][col].abs()))
            .unwrap_or(col);
        matrix.swap(col, pivot);
        rhs.swap(col, pivot);
        let pivot_row = matrix[col].clone();
        for row in col + 1..n {
            let factor = matrix[row][col] / pivot_row[col];
            for (value, pivot_value) in matrix[row].iter_mut().zip(&pivot_row).skip(col) {
                *value -= factor * pivot_value;
            }
            rhs[row] -= factor * rhs[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let tail: f64 = (row + 1..n).map(|c| matrix[row][c] * x[c]).sum();
        x[row] = (rhs[row] - tail) / matrix[row][row];
    }
    x
}

/// What a predictor or corrector update needs from the noise levels.
struct Update {
    sigma_ratio: f64,
    alpha_t: f64,
    h_phi_1: f64,
    b_h: f64,
    rks: Vec<f64>,
    b: Vec<f64>,
}

impl UniPcScheduler {
    /// Prepares UniPC for `steps` steps.
    pub fn new(config: &SchedulerConfig, steps: usize, schedule: SigmaSchedule) -> Result<Self> {
        let schedule = schedule.resolve(config);
        if config.predict_x0 == Some(false) || config.thresholding == Some(true) {
            return Err(SchedulerError::Unsupported(
                "UniPC with noise prediction or thresholding".into(),
            ));
        }
        if config
            .final_sigmas_type
            .as_deref()
            .is_some_and(|t| t != "zero")
        {
            return Err(SchedulerError::Unsupported(
                "UniPC with a non-zero final sigma".into(),
            ));
        }
        let variant = match config.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => Variant::Bh1,
            // diffusers maps the DPM-Solver names to bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => Variant::Bh2,
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "UniPC solver_type {other:?}"
                )));
            }
        };
        let (timesteps, mut sigmas) =
            multistep_steps(config, steps, schedule, TimestepRounding::Round)?;
        sigmas.push(0.0);
        Ok(Self {
            timesteps,
            sigmas,
            prediction: Prediction::from_config(config)?,
            variant,
            solver_order: config.solver_order.unwrap_or(2).max(1),
            lower_order_final: config.lower_order_final.unwrap_or(true),
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            model_outputs: Vec::new(),
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
        })
    }

    /// The sigma of each step, then 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn lambda_at(&self, index: usize) -> f64 {
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        lambda(alpha, sigma)
    }

    /// The coefficients of an update from sigma index `from` to `to`, with the history at
    /// indices `from - 1`, `from - 2`, ... for `order - 1` earlier points.
    fn update(&self, from: usize, to: usize, order: usize) -> Update {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[to]);
        let (_, sigma_s0) = alpha_sigma(self.sigmas[from]);
        let lambda_s0 = self.lambda_at(from);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let mut rks: Vec<f64> = (1..order)
            .map(|i| (self.lambda_at(from - i) - lambda_s0) / h)
            .collect();
        rks.push(1.0);
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = match self.variant {
            Variant::Bh1 => hh,
            Variant::Bh2 => hh.exp_m1(),
        };
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f64;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Update {
            sigma_ratio: sigma_t / sigma_s0,
            alpha_t,
            h_phi_1,
            b_h,
            rks,
            b,
        }
    }

    /// The matrix of powers of the r_k.
    fn powers(rks: &[f64], size: usize) -> Vec<Vec<f64>> {
        (0..size)
            .map(|i| rks[..size].iter().map(|r| r.powi(i as i32)).collect())
            .collect()
    }

    /// The differences D1_k = (m_k - m0) / r_k of the history.
    fn differences(&self, rks: &[f64], order: usize, newest: usize) -> Result<Vec<Tensor>> {
        let m0 = &self.model_outputs[newest];
        (1..order)
            .map(|i| Ok(((&self.model_outputs[newest - i] - m0)? / rks[i - 1])?))
            .collect()
    }

    fn predictor(&self, sample: &Tensor, index: usize, order: usize) -> Result<Tensor> {
        let u = self.update(index, index + 1, order);
        let newest = self.model_outputs.len() - 1;
        let m0 = &self.model_outputs[newest];
        let mut x_t = ((sample * u.sigma_ratio)? - (m0 * (u.alpha_t * u.h_phi_1))?)?;
        if order >= 2 {
            let d1s = self.differences(&u.rks, order, newest)?;
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                solve(Self::powers(&u.rks, order - 1), u.b[..order - 1].to_vec())
            };
            for (rho, d) in rhos.iter().zip(&d1s) {
                x_t = (x_t - (d * (u.alpha_t * u.b_h * rho))?)?;
            }
        }
        Ok(x_t)
    }

    fn corrector(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        index: usize,
        order: usize,
    ) -> Result<Tensor> {
        let u = self.update(index - 1, index, order);
        let newest = self.model_outputs.len() - 1;
        let m0 = &self.model_outputs[newest];
        let mut x_t = ((last_sample * u.sigma_ratio)? - (m0 * (u.alpha_t * u.h_phi_1))?)?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(Self::powers(&u.rks, order), u.b.clone())
        };
        let d1s = self.differences(&u.rks, order, newest)?;
        for (rho, d) in rhos.iter().zip(&d1s) {
            x_t = (x_t - (d * (u.alpha_t * u.b_h * rho))?)?;
        }
        let rho_last = rhos[rhos.len() - 1];
        let d1_t = (model_t - m0)?;
        Ok((x_t - (d1_t * (u.alpha_t * u.b_h * rho_last))?)?)
    }
}

impl Scheduler for UniPcScheduler {
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
        let (alpha, sigma) = alpha_sigma(self.sigmas[index]);
        let pred_x0 = self
            .prediction
            .x0_at_alpha_sigma(model_output, sample, alpha, sigma)?;
        let mut sample = sample.clone();
        if let Some(last) = &self.last_sample
            && index > 0
            && !self.disable_corrector.contains(&(index - 1))
        {
            sample = self.corrector(&pred_x0, last, index, self.this_order)?;
        }
        self.model_outputs.push(pred_x0.clone());
        if self.model_outputs.len() > self.solver_order {
            self.model_outputs.remove(0);
        }
        let mut order = self.solver_order;
        if self.lower_order_final {
            order = order.min(self.timesteps.len() - index);
        }
        // The final step to sigma 0 is always first order (higher orders divide by h = inf).
        if index + 1 == self.timesteps.len() {
            order = 1;
        }
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        let prev_sample = self.predictor(&sample, index, self.this_order)?;
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        Ok(StepOutput {
            prev_sample,
            pred_original_sample: pred_x0,
        })
    }
}
