//! Our schedulers against diffusers' own timesteps and sigmas, for every model config in the
//! fixtures, every sampler and step counts that do and do not divide 1000.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use atelier::engine::config::SchedulerConfig;
use atelier::engine::noise::NoiseGenerator;
use atelier::schedulers::deis::DeisScheduler;
use atelier::schedulers::dpm_solver::DpmSolverMultistep;
use atelier::schedulers::euler::EulerScheduler;
use atelier::schedulers::heun::HeunScheduler;
use atelier::schedulers::lms::LmsScheduler;
use atelier::schedulers::schedule::{ClassDefaults, Schedule, Spacing, interp_index};
use atelier::schedulers::unipc::UniPcScheduler;
use atelier::schedulers::{Sampler, SchedulerKind};
use candle_core::{DType, Device, Tensor};

fn tables() -> Vec<serde_json::Value> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(value: &serde_json::Value) -> Vec<f64> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

/// Relative error of a whole vector: each difference against the vector's largest magnitude
/// (a timestep of 6e-5 against diffusers' 0.0 in a schedule that starts at 999 is a relative
/// error of 6e-8, not of infinity).
fn assert_all_close(what: &str, ours: &[f64], theirs: &[f64], relative: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: {ours:?} vs {theirs:?}");
    let scale = theirs.iter().fold(1.0f64, |m, b| m.max(b.abs()));
    for (a, b) in ours.iter().zip(theirs) {
        assert!(
            (a - b).abs() <= relative * scale,
            "{what}: {ours:?} vs {theirs:?}"
        );
    }
}

#[test]
fn timesteps_sigmas_and_initial_sigma_match_diffusers() {
    let tables = tables();
    assert!(tables.len() >= 100);
    for entry in tables {
        let config: SchedulerConfig =
            serde_json::from_value(entry["scheduler_config"].clone()).unwrap();
        let sampler = Sampler::parse(entry["sampler"].as_str().unwrap()).unwrap();
        let steps = entry["steps"].as_u64().unwrap() as usize;
        let what = format!("{} {} {steps} steps", entry["config"], sampler.id());
        let scheduler = sampler
            .kind
            .build(&config, steps, sampler.sigmas, 0.0)
            .unwrap();
        assert_all_close(
            &format!("{what} timesteps"),
            scheduler.timesteps(),
            &floats(&entry["timesteps"]),
            1e-5,
        );
        let init = entry["init_noise_sigma"].as_f64().unwrap();
        assert!(
            (scheduler.init_noise_sigma() - init).abs() <= 1e-5 * init,
            "{what}: initial sigma {} vs {init}",
            scheduler.init_noise_sigma()
        );
        let sigmas: Option<Vec<f32>> = match sampler.kind {
            SchedulerKind::EulerA => Some(
                EulerScheduler::ancestral(&config, steps)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::Euler => Some(
                EulerScheduler::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::DpmPp2m | SchedulerKind::DpmPp2mSde => Some(
                DpmSolverMultistep::new(&config, steps, sampler.sigmas, false)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::Heun => Some(
                HeunScheduler::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::Lms => Some(
                LmsScheduler::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::UniPc => Some(
                UniPcScheduler::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::Deis => Some(
                DeisScheduler::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            // diffusers keeps these sigmas in another layout (repeated per evaluation) or has
            // none; their timesteps above and trajectories below pin them down.
            _ => None,
        };
        if let Some(sigmas) = sigmas {
            let ours: Vec<f64> = sigmas.iter().map(|&s| s as f64).collect();
            assert_all_close(
                &format!("{what} sigmas"),
                &ours,
                &floats(&entry["sigmas"]),
                1e-5,
            );
        }
    }
}

#[test]
fn unknown_ids_list_the_valid_ones() {
    let error = Sampler::parse("dpm9").unwrap_err().to_string();
    assert!(error.contains("euler-karras"), "{error}");
    assert!(
        Sampler::parse("ddim-karras").is_err(),
        "DDIM has no sigma schedule"
    );
    assert_eq!(Sampler::parse("Euler-Karras").unwrap().id(), "euler-karras");
}

/// diffusers' stand-in: the ideal denoiser of data ~ N(mu, s^2), at fractional timesteps by
/// linear interpolation of alphas_cumprod, in f64.
fn ideal_model(
    x: &Tensor,
    t: f64,
    alphas_cumprod: &[f64],
    v_prediction: bool,
    mu: f64,
    s: f64,
) -> Tensor {
    let abar = interp_index(t, alphas_cumprod);
    let x = x.to_dtype(DType::F64).unwrap();
    let eps = (((&x - abar.sqrt() * mu).unwrap() * (1.0 - abar).sqrt()).unwrap()
        / (abar * s * s + 1.0 - abar))
        .unwrap();
    let out = if v_prediction {
        let x0 = ((&x - (&eps * (1.0 - abar).sqrt()).unwrap()).unwrap() / abar.sqrt()).unwrap();
        ((&eps * abar.sqrt()).unwrap() - (x0 * (1.0 - abar).sqrt()).unwrap()).unwrap()
    } else {
        eps
    };
    out.to_dtype(DType::F32).unwrap()
}

/// Whole sampling loops, step by step, against diffusers driven by the same stand-in model from
/// the same noise; stochastic samplers replay diffusers' own step noise.
#[test]
fn trajectories_match_diffusers() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors =
        candle_core::safetensors::load(dir.join("trajectories.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trajectories.json")).unwrap())
            .unwrap();
    let (mu, s) = (meta["mu"].as_f64().unwrap(), meta["s"].as_f64().unwrap());
    let runs = meta["runs"].as_array().unwrap();
    assert!(runs.len() >= 20);
    for run in runs {
        let key = run["key"].as_str().unwrap();
        let config: SchedulerConfig =
            serde_json::from_value(run["scheduler_config"].clone()).unwrap();
        let sampler = Sampler::parse(run["sampler"].as_str().unwrap()).unwrap();
        let steps = run["steps"].as_u64().unwrap() as usize;
        let eta = run["eta"].as_f64().unwrap_or(0.0);
        let mut scheduler = sampler
            .kind
            .build(&config, steps, sampler.sigmas, eta)
            .unwrap();
        let alphas_cumprod: Vec<f64> = Schedule::from_config(
            &config,
            ClassDefaults {
                spacing: Spacing::Leading,
            },
        )
        .unwrap()
        .alphas_cumprod()
        .iter()
        .map(|&a| a as f64)
        .collect();
        let v_prediction = config.prediction_type.as_deref() == Some("v_prediction");
        let mut noise = match tensors.get(&format!("{key}_step_noise")) {
            Some(all) => NoiseGenerator::replay(
                (0..all.dim(0).unwrap())
                    .map(|i| all.narrow(0, i, 1).unwrap())
                    .collect(),
            ),
            None => NoiseGenerator::new(0),
        };
        let expected = &tensors[&format!("{key}_trajectory")];
        let mut sample =
            (&tensors[&format!("{key}_noise")] * scheduler.init_noise_sigma()).unwrap();
        let timesteps = scheduler.timesteps().to_vec();
        assert_eq!(timesteps.len(), expected.dim(0).unwrap(), "{key}");
        for (i, &t) in timesteps.iter().enumerate() {
            let x = scheduler.scale_model_input(&sample, i).unwrap();
            let out = ideal_model(&x, t, &alphas_cumprod, v_prediction, mu, s);
            sample = scheduler
                .step(&out, i, &sample, &mut noise)
                .unwrap()
                .prev_sample;
            let want = expected.narrow(0, i, 1).unwrap();
            let diff: f32 = (&sample - &want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            let scale: f32 = want.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{key} step {i}: off by {diff} (scale {scale})"
            );
        }
    }
}

#[test]
fn progress_counts_every_model_evaluation() {
    let config = SchedulerConfig::sd15();
    for &kind in SchedulerKind::ALL {
        for steps in [1, 2, 3, 4, 10, 25, 33] {
            let scheduler = kind
                .build(
                    &config,
                    steps,
                    atelier::schedulers::SigmaSchedule::Default,
                    0.0,
                )
                .unwrap();
            assert_eq!(
                kind.model_evaluations(steps),
                scheduler.timesteps().len(),
                "{} at {steps} steps",
                kind.id()
            );
        }
        for evaluations in [5, 10, 20, 50] {
            let steps = kind.steps_for_evaluations(evaluations);
            assert!(kind.model_evaluations(steps) <= evaluations);
            assert!(kind.model_evaluations(steps + 1) > evaluations);
        }
    }
}

#[test]
fn every_cli_id_of_the_docs_table_parses() {
    let ids = [
        "ddim",
        "ddpm",
        "pndm",
        "lms",
        "lms-karras",
        "euler",
        "euler-a",
        "heun",
        "dpm2",
        "dpm2-karras",
        "dpm2-a",
        "dpm2-a-karras",
        "dpmpp-2m",
        "dpmpp-2m-karras",
        "dpmpp-2m-sde",
        "dpmpp-2m-sde-karras",
        "dpmpp-sde",
        "dpmpp-sde-karras",
        "dpmpp-2s-a",
        "unipc",
        "deis",
        "lcm",
    ];
    for id in ids {
        assert_eq!(Sampler::parse(id).unwrap().id(), id);
    }
    let error = Sampler::parse("plms-karras").unwrap_err().to_string();
    assert!(
        error.contains("dpmpp-sde-karras") && error.contains("lcm"),
        "{error}"
    );
}

#[test]
fn lcm_refuses_more_steps_than_it_was_distilled_with() {
    let error = SchedulerKind::Lcm
        .build(
            &SchedulerConfig::sd15(),
            51,
            atelier::schedulers::SigmaSchedule::Default,
            0.0,
        )
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("at most 50"), "{error}");
}
