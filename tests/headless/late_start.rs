//! A late start (image to image) against diffusers: for every scheduler config of the fixtures,
//! every sampler, 4/10/25 steps and strengths 0.3-1.0, the first index diffusers'
//! `get_timesteps` starts at, the scheduler's order, the timesteps left, and the mix of clean
//! latents and noise that `add_noise` makes there (`tests/fixtures/late_start.json`, written by
//! `scripts/make_late_start_fixture.py`).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use atelier::engine::config::SchedulerConfig;
use atelier::schedulers::{Sampler, first_index_for_strength};
use candle_core::{Device, Tensor};

#[test]
fn late_starts_match_diffusers() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/late_start.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rows = fixture["rows"].as_array().unwrap();
    assert!(rows.len() > 1000, "{} rows", rows.len());
    let x0 = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
    let noise = Tensor::new(&[0.0f32, 1.0], &Device::Cpu).unwrap();
    let mut checked_second_order = 0;
    for row in rows {
        let config: SchedulerConfig =
            serde_json::from_value(fixture["configs"][row["config"].as_str().unwrap()].clone())
                .unwrap();
        let what = format!(
            "{} {} {} steps, strength {}",
            row["config"], row["sampler"], row["steps"], row["strength"]
        );
        let sampler = Sampler::parse(row["sampler"].as_str().unwrap()).unwrap();
        let steps = row["steps"].as_u64().unwrap() as usize;
        let strength = row["strength"].as_f64().unwrap();
        let scheduler = sampler
            .kind
            .build(&config, steps, sampler.sigmas, 0.0)
            .unwrap();
        assert_eq!(
            scheduler.order() as u64,
            row["order"].as_u64().unwrap(),
            "{what}"
        );
        checked_second_order += usize::from(scheduler.order() == 2);
        let first = first_index_for_strength(steps, strength, scheduler.order());
        assert_eq!(first as u64, row["first_index"].as_u64().unwrap(), "{what}");
        let timesteps = scheduler.timesteps();
        assert_eq!(
            (timesteps.len() - first) as u64,
            row["remaining"].as_u64().unwrap(),
            "{what}"
        );
        let expected_t = row["first_timestep"].as_f64().unwrap();
        assert!(
            (timesteps[first] - expected_t).abs() <= 1e-3 * expected_t.abs().max(1.0),
            "{what}: first timestep {} vs {expected_t}",
            timesteps[first]
        );
        let noisy: Vec<f32> = scheduler
            .add_noise(&x0, &noise, first)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (ours, key) in noisy.iter().zip(["alpha", "sigma"]) {
            let theirs = row[key].as_f64().unwrap();
            assert!(
                (*ours as f64 - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
                "{what}: {key} {ours} vs {theirs}"
            );
        }
    }
    assert!(checked_second_order > 100);
}

#[test]
fn a_strength_too_small_for_one_step_leaves_nothing_to_run() {
    // diffusers: int(10 * 0.05) = 0 steps run; the pipeline refuses such a request.
    assert_eq!(first_index_for_strength(10, 0.05, 1), 10);
    assert_eq!(first_index_for_strength(10, 0.1, 2), 18);
    assert_eq!(first_index_for_strength(10, 1.0, 2), 0);
    // Strengths above 1 run every step, as diffusers' min(...) does.
    assert_eq!(first_index_for_strength(10, 1.5, 1), 0);
}
