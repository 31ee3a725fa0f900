//! `scheduler/scheduler_config.json`: the one input every scheduler is configured from.

use serde::Deserialize;

/// `scheduler/scheduler_config.json`, as written.
///
/// Every field is optional because each diffusers scheduler class has its own defaults (DDIM
/// clips x0 by default, Euler spaces timesteps by `linspace`, ...): a scheduler resolves the
/// missing ones with its class's defaults, exactly as `XScheduler.from_config` does.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
pub struct SchedulerConfig {
    /// The diffusers class the model was published with.
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training steps T.
    #[serde(default)]
    pub num_train_timesteps: Option<usize>,
    /// First beta.
    #[serde(default)]
    pub beta_start: Option<f64>,
    /// Last beta.
    #[serde(default)]
    pub beta_end: Option<f64>,
    /// `linear`, `scaled_linear` or `squaredcos_cap_v2`.
    #[serde(default)]
    pub beta_schedule: Option<String>,
    /// Explicit betas, overriding the schedule.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction` or `sample`.
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// `leading`, `linspace` or `trailing`.
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// Added to every timestep with `leading` spacing.
    #[serde(default)]
    pub steps_offset: Option<usize>,
    /// DDIM: clip the predicted x0.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: the clip range.
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    /// DDIM: the final alpha is 1 rather than alphas_cumprod[0].
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// Euler: sigma interpolation (`linear` or `log_linear`).
    #[serde(default)]
    pub interpolation_type: Option<String>,
    /// Karras sigmas (rho = 7).
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    /// Rescale betas to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Euler: `discrete` or `continuous` timesteps.
    #[serde(default)]
    pub timestep_type: Option<String>,
    /// Euler: the last sigma, `zero` or `sigma_min`.
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// DDPM: `fixed_small`, `fixed_large`, ...
    #[serde(default)]
    pub variance_type: Option<String>,
    /// PNDM: run PLMS only, without the Runge-Kutta warm-up.
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
    /// Multistep solvers (DPM-Solver++, UniPC, DEIS): the order.
    #[serde(default)]
    pub solver_order: Option<usize>,
    /// Multistep solvers: lower the order for the final steps.
    #[serde(default)]
    pub lower_order_final: Option<bool>,
    /// Dynamic thresholding of x0 (Imagen); not supported.
    #[serde(default)]
    pub thresholding: Option<bool>,
    /// UniPC: `bh1` or `bh2`.
    #[serde(default)]
    pub solver_type: Option<String>,
    /// UniPC: predict x0 (data prediction) rather than noise.
    #[serde(default)]
    pub predict_x0: Option<bool>,
    /// UniPC: steps without the corrector.
    #[serde(default)]
    pub disable_corrector: Option<Vec<usize>>,
    /// DPM-Solver++ / DEIS: the algorithm (`dpmsolver++`, `deis`, ...).
    #[serde(default)]
    pub algorithm_type: Option<String>,
    /// LCM: the step count the model was distilled with.
    #[serde(default)]
    pub original_inference_steps: Option<usize>,
    /// LCM: scales the timestep in the boundary condition.
    #[serde(default)]
    pub timestep_scaling: Option<f64>,
    /// Use exponential sigmas.
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
}

impl SchedulerConfig {
    /// SD 1.5's published scheduler config, for folders that lack one.
    pub fn sd15() -> Self {
        Self {
            class_name: Some("PNDMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            prediction_type: Some("epsilon".into()),
            timestep_spacing: Some("leading".into()),
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            skip_prk_steps: Some(true),
            ..Default::default()
        }
    }

    /// Training steps (1000 unless the config says otherwise; the same default in every class).
    pub fn train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }
}

/// `Err` unless `value` is a finite number (used by every config's check).
pub(crate) fn check_finite(field: &str, value: f64) -> Result<(), String> {
    if !value.is_finite() {
        return Err(format!("{field} must be a finite number, got {value}"));
    }
    Ok(())
}

/// The most training timesteps a scheduler config may name (real models use 1000).
const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl SchedulerConfig {
    /// `Err` with the first field that holds an unusable value, and why (checked when the
    /// config is read and again before a scheduler is built from it).
    pub fn check(&self) -> Result<(), String> {
        let train = self.train_timesteps();
        if train == 0 || train > MAX_TRAIN_TIMESTEPS {
            return Err(format!(
                "num_train_timesteps must be between 1 and {MAX_TRAIN_TIMESTEPS}, got {train}"
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != train {
                return Err(format!(
                    "trained_betas has {} values but num_train_timesteps is {train}",
                    betas.len()
                ));
            }
            if let Some(bad) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
                return Err(format!(
                    "trained_betas: every beta must be between 0 and 1 (exclusive), got {bad}"
                ));
            }
        }
        // A zero beta leaves sigma = 0 at the first training step, whose log the sigma-based
        // samplers interpolate; only schedules that read the betas care.
        let reads_betas = self.trained_betas.is_none()
            && self.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
        for (field, value) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if let Some(beta) = value
                && reads_betas
                && !(beta > 0.0 && beta < 1.0)
            {
                return Err(format!(
                    "{field} must be between 0 and 1 (exclusive), got {beta}"
                ));
            }
        }
        if let Some(offset) = self.steps_offset
            && offset >= train
        {
            return Err(format!(
                "steps_offset {offset} must be below num_train_timesteps {train}"
            ));
        }
        if let Some(order) = self.solver_order
            && !(1..=3).contains(&order)
        {
            return Err(format!("solver_order must be 1, 2 or 3, got {order}"));
        }
        if let Some(steps) = self.original_inference_steps
            && (steps == 0 || steps > train)
        {
            return Err(format!(
                "original_inference_steps must be between 1 and {train}, got {steps}"
            ));
        }
        for (field, value) in [
            ("clip_sample_range", self.clip_sample_range),
            ("timestep_scaling", self.timestep_scaling),
        ] {
            if let Some(value) = value {
                check_finite(field, value)?;
            }
        }
        Ok(())
    }
}

/// Parses a config written by Python's `json` module, which writes `NaN`, `Infinity` and
/// `-Infinity` bare (diffusers' DPM-Solver configs carry `"lambda_min_clipped": -Infinity`).
///
/// Outside strings, infinities become the largest finite `f64` of their sign and `NaN` becomes
/// `null`; everything else is strict JSON.
pub fn from_python_json<T: serde::de::DeserializeOwned>(text: &str) -> serde_json::Result<T> {
    serde_json::from_str(&python_json_to_strict(text))
}

/// `text` with Python's non-standard number literals replaced (see [`from_python_json`]).
fn python_json_to_strict(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut strict = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            strict.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        let replaced = [
            ("-Infinity", "-1.7976931348623157e308"),
            ("Infinity", "1.7976931348623157e308"),
            ("NaN", "null"),
        ]
        .into_iter()
        .find(|(literal, _)| rest.starts_with(literal));
        match replaced {
            Some((literal, value)) => {
                strict.push_str(value);
                rest = &rest[literal.len()..];
            }
            None => {
                if c == '"' {
                    in_string = true;
                }
                strict.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    std::borrow::Cow::Owned(strict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_literals_outside_strings_are_read() {
        let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
            "a": Infinity, "b": NaN, "note": "NaN and -Infinity \" stay", "beta_start": 0.00085}"#;
        let value: serde_json::Value = from_python_json(text).expect("parses");
        assert_eq!(value["lambda_min_clipped"], serde_json::json!(-f64::MAX));
        assert_eq!(value["a"], serde_json::json!(f64::MAX));
        assert!(value["b"].is_null());
        assert_eq!(value["note"], "NaN and -Infinity \" stay");
        let config: SchedulerConfig = from_python_json(text).expect("a scheduler config");
        assert_eq!(config.beta_start, Some(0.00085));
        assert!(from_python_json::<serde_json::Value>("{\"a\": Infinit}").is_err());
    }
}
