//! Our schedulers against diffusers' own timesteps and sigmas, for every model config in the
//! fixtures, every sampler and step counts that do and do not divide 1000.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use atelier::engine::config::SchedulerConfig;
use atelier::schedulers::dpm_solver::DpmSolverMultistep;
use atelier::schedulers::euler::EulerScheduler;
use atelier::schedulers::{Sampler, SchedulerKind};

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

fn assert_all_close(what: &str, ours: &[f64], theirs: &[f64], relative: f64) {
    assert_eq!(ours.len(), theirs.len(), "{what}: {ours:?} vs {theirs:?}");
    for (a, b) in ours.iter().zip(theirs) {
        assert!(
            (a - b).abs() <= relative * b.abs().max(1.0),
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
        let scheduler = sampler.kind.build(&config, steps, sampler.sigmas).unwrap();
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
            SchedulerKind::Euler => Some(
                EulerScheduler::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::DpmPp2m => Some(
                DpmSolverMultistep::new(&config, steps, sampler.sigmas)
                    .unwrap()
                    .sigmas()
                    .to_vec(),
            ),
            SchedulerKind::Ddim => None,
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
