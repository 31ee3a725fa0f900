//! The engine's behaviour around the numbers: callbacks, cancel, previews, sources, errors.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use atelier::engine::EngineError;
use atelier::engine::pipeline::{
    GenerationRequest, LoadOptions, ModelFamily, PreviewOptions, StableDiffusion,
};
use atelier::engine::preview::project_latents;
use atelier::engine::source::ModelSource;
use atelier::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};
use common::*;

fn request(steps: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: "a fox".into(),
        steps,
        width: 32,
        height: 32,
        seed: 3,
        ..Default::default()
    }
}

#[test]
fn families_are_detected_from_configs() {
    assert_eq!(load_model("sd1").family(), ModelFamily::Sd1);
    assert_eq!(load_model("sd2").family(), ModelFamily::Sd2);
    let sdxl = load_model("sdxl");
    assert_eq!(sdxl.family(), ModelFamily::Sdxl);
    assert_eq!(sdxl.vae_scale_factor(), 4);
    assert_eq!(load_model("sd1").vae_scale_factor(), 2);
}

#[test]
fn callback_reports_every_step() {
    let model = load_model("sd1");
    let mut seen = Vec::new();
    let mut last_elapsed = 0.0;
    model
        .generate(
            &request(5),
            None,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |step| {
                assert!(step.elapsed_secs >= last_elapsed);
                last_elapsed = step.elapsed_secs;
                assert_eq!(step.total_steps, 5);
                assert_eq!(step.predicted_latents.dims(), &[1, 4, 16, 16]);
                assert!(step.vae_preview.is_none());
                assert!(step.latent_preview.is_none(), "not asked for");
                seen.push((step.step_index, step.timestep));
            },
        )
        .unwrap();
    let indices: Vec<usize> = seen.iter().map(|s| s.0).collect();
    assert_eq!(indices, vec![0, 1, 2, 3, 4]);
    // SD 1.x leading spacing with steps_offset 1: 801, 601, ..., 1.
    let timesteps: Vec<f64> = seen.iter().map(|s| s.1).collect();
    assert_eq!(timesteps, vec![801.0, 601.0, 401.0, 201.0, 1.0]);
}

#[test]
fn latent_previews_come_with_every_step_and_match_the_projection() {
    // On the CPU each step's cheap preview comes with that step, computed on the device the
    // same way as the host projection.
    let model = load_model("sd1");
    let mut previews = 0;
    model
        .generate(
            &request(4),
            None,
            PreviewOptions {
                latent_previews: true,
                ..Default::default()
            },
            &AtomicBool::new(false),
            &mut |step| {
                let preview = step.latent_preview.expect("a preview with every step");
                assert_eq!(preview.dimensions(), (16, 16), "one pixel per latent cell");
                let on_host = model.preview(step.predicted_latents).unwrap();
                let on_device = model
                    .preview_projection()
                    .on_device(step.predicted_latents.device())
                    .unwrap()
                    .project(step.predicted_latents)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<u8>()
                    .unwrap();
                let largest = on_host
                    .as_raw()
                    .iter()
                    .zip(&on_device)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                assert!(largest <= 1, "device projection differs by {largest}");
                assert_eq!(preview, on_host);
                previews += 1;
            },
        )
        .unwrap();
    assert_eq!(previews, 4);
}

#[test]
fn cancel_stops_within_one_step() {
    let model = load_model("sd1");
    let cancel = AtomicBool::new(false);
    let mut calls = 0;
    let result = model.generate(
        &request(10),
        None,
        PreviewOptions::default(),
        &cancel,
        &mut |step| {
            calls += 1;
            if step.step_index == 1 {
                cancel.store(true, Ordering::Relaxed);
            }
        },
    );
    assert!(matches!(result, Err(EngineError::Cancelled)));
    assert_eq!(calls, 2, "no step may run after the flag is set");
}

#[test]
fn vae_previews_come_every_n_steps() {
    let model = load_model("sd1");
    let mut previews = Vec::new();
    model
        .generate(
            &request(5),
            None,
            PreviewOptions {
                vae_decode_every: 2,
                ..Default::default()
            },
            &AtomicBool::new(false),
            &mut |step| {
                if let Some(image) = &step.vae_preview {
                    assert_eq!((image.width(), image.height()), (32, 32));
                    previews.push(step.step_index);
                }
            },
        )
        .unwrap();
    assert_eq!(previews, vec![1, 3]);
}

#[test]
fn projection_preview_uses_the_published_factors() {
    let mut latents = vec![0f32; 4 * 2 * 3];
    latents[0] = 1.0; // channel 0, pixel (0, 0)
    let latents = Tensor::from_vec(latents, (1, 4, 2, 3), &Device::Cpu).unwrap();
    let image = project_latents(&latents, ModelFamily::Sd1).unwrap();
    assert_eq!((image.width(), image.height()), (3, 2));
    let expected = |factor: f32| (((factor + 1.0) / 2.0) * 255.0).round() as u8;
    assert_eq!(
        image.get_pixel(0, 0).0,
        [expected(0.298), expected(0.207), expected(0.208)]
    );
    assert_eq!(image.get_pixel(1, 0).0, [128, 128, 128]);
    let sdxl = project_latents(&latents, ModelFamily::Sdxl).unwrap();
    assert_eq!(sdxl.get_pixel(1, 0).0[0], expected(0.1084));
}

#[test]
fn guidance_of_one_ignores_the_negative_prompt() {
    let model = load_model("sd2");
    let mut with = request(3);
    with.guidance_scale = 1.0;
    with.width = 16;
    with.height = 16;
    with.negative_prompt = "ugly".into();
    let mut without = with.clone();
    without.negative_prompt = "something else entirely".into();
    let run = |r: &GenerationRequest| {
        model
            .generate(
                r,
                None,
                PreviewOptions::default(),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap()
            .latents
    };
    assert_eq!(relative_error(&run(&with), &run(&without)), 0.0);
    with.guidance_scale = 3.0;
    without.guidance_scale = 3.0;
    assert!(relative_error(&run(&with), &run(&without)) > 1e-3);
}

#[test]
fn seeds_are_deterministic_and_distinct() {
    let model = load_model("sdxl");
    let mut r = request(2);
    r.scheduler = SchedulerKind::Ddim;
    let a = model.seeded_noise(&r).unwrap();
    let b = model.seeded_noise(&r).unwrap();
    r.seed += 1;
    let c = model.seeded_noise(&r).unwrap();
    assert_eq!(relative_error(&a, &b), 0.0);
    assert!(relative_error(&a, &c) > 0.5);
    let values: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / values.len() as f32;
    assert!(
        mean.abs() < 0.15 && (var - 1.0).abs() < 0.2,
        "mean {mean}, var {var}"
    );
}

#[test]
fn invalid_requests_get_clear_messages() {
    let model = load_model("sdxl");
    let mut r = request(2);
    r.width = 30; // the SDXL fixture's VAE factor is 4
    let error = model.validate(&r).unwrap_err().to_string();
    assert!(
        error.contains("width 30 must be a positive multiple of 4"),
        "{error}"
    );
    let mut r = request(2);
    r.batch_size = 0;
    assert!(model.validate(&r).is_err());
    let mut r = request(2);
    r.guidance_scale = f64::NAN;
    assert!(model.validate(&r).is_err());
}

#[test]
fn long_prompts_and_different_lengths_generate_without_truncation() {
    let model = load_model("sd1");
    let mut r = request(1);
    r.prompt = vec!["fox"; 100].join(" ");
    let run = |r: &GenerationRequest| {
        model
            .generate(
                r,
                None,
                PreviewOptions::default(),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap()
    };
    // A 100-token prompt against a one-chunk negative prompt: the UNet runs on each with its own
    // length, and nothing is dropped or warned about.
    let long = run(&r);
    assert!(long.warnings.is_empty(), "{:?}", long.warnings);
    // The 25 tokens past the first chunk change the image.
    r.prompt = vec!["fox"; 75].join(" ");
    let first_chunk_only = run(&r);
    assert!(relative_error(&long.latents, &first_chunk_only.latents) > 1e-4);
    // SDXL too, with its pooled text and size conditioning split between the two evaluations;
    // a negative prompt as long as the prompt batches them together again.
    let xl = load_model("sdxl");
    let mut r = request(1);
    r.width = 64;
    r.height = 64;
    r.prompt = vec!["fox"; 100].join(" ");
    r.negative_prompt = "blurry".into();
    let generate = |r: &GenerationRequest| {
        xl.generate(
            r,
            None,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap()
    };
    let separate = generate(&r);
    assert!(all_finite(&separate.latents));
    r.negative_prompt = format!("blurry BREAK {}", ["owl"; 10].join(" "));
    let batched = generate(&r);
    assert!(relative_error(&separate.latents, &batched.latents) > 1e-6);
}

fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|v| v.is_finite())
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The error of loading a copy of the SD 1.x fixture after `damage` was done to it.
fn load_error_after(damage: impl FnOnce(&Path)) -> String {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&model_dir("sd1"), dir.path());
    damage(dir.path());
    StableDiffusion::load(
        ModelSource::Folder(dir.path().to_path_buf()),
        LoadOptions::new(Device::Cpu),
    )
    .err()
    .unwrap()
    .to_string()
}

#[test]
fn missing_weights_are_named() {
    let error = load_error_after(|dir| {
        std::fs::remove_file(dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    });
    assert!(error.contains("unet weights not found"), "{error}");
    assert!(
        error.contains("unet/diffusion_pytorch_model.safetensors"),
        "{error}"
    );
}

#[test]
fn corrupt_config_is_reported_with_its_path() {
    let error = load_error_after(|dir| {
        std::fs::write(dir.join("vae/config.json"), "{ not json").unwrap();
    });
    assert!(error.contains("vae/config.json"), "{error}");
}

#[test]
fn model_sources_parse() {
    assert_eq!(
        ModelSource::parse("stabilityai/sd-turbo").unwrap(),
        ModelSource::Hub("stabilityai/sd-turbo".into())
    );
    let folder = model_dir("sd1");
    assert_eq!(
        ModelSource::parse(folder.to_str().unwrap()).unwrap(),
        ModelSource::Folder(folder)
    );
    assert!(ModelSource::parse("./no/such/folder").is_err());
    assert!(ModelSource::parse("not a repo").is_err());
}

#[test]
fn devices_that_are_not_built_in_are_refused() {
    use atelier::engine::pipeline::DeviceChoice;
    if !candle_core::utils::cuda_is_available() {
        let error = DeviceChoice::Cuda.open().unwrap_err().to_string();
        assert!(error.contains("--features cuda"), "{error}");
    }
    assert!(DeviceChoice::Auto.open().is_ok());
    assert_eq!(
        atelier::engine::pipeline::default_dtype(&Device::Cpu),
        DType::F32
    );
}

/// A model in the Hugging Face cache layout loads offline by repo id; one that is not cached
/// fails with the file's name and what to do.
#[test]
fn hub_models_load_from_the_cache_offline() {
    let home = tempfile::tempdir().unwrap();
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let repo = home.path().join("hub/models--tiny--sd1");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    copy_dir(&model_dir("sd1"), &repo.join("snapshots").join(commit));
    let out = home.path().join("fox.png");
    let run = |model: &str| {
        Command::new(env!("CARGO_BIN_EXE_atelier"))
            .env("HF_HOME", home.path())
            .env("HF_HUB_OFFLINE", "1")
            .args([
                "generate", "--model", model, "--prompt", "a fox", "--steps", "2",
            ])
            .args(["--device", "cpu", "--out"])
            .arg(&out)
            .output()
            .unwrap()
    };
    let cached = run("tiny/sd1");
    assert!(
        cached.status.success(),
        "{}",
        String::from_utf8_lossy(&cached.stderr)
    );
    assert!(out.exists());
    let missing = run("tiny/not-cached");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(!missing.status.success());
    assert!(stderr.contains("model_index.json"), "{stderr}");
    assert!(stderr.contains("HF_HUB_OFFLINE"), "{stderr}");
}

#[test]
fn stochastic_samplers_follow_the_seed() {
    let model = load_model("sd1");
    let mut r = request(4);
    r.scheduler = SchedulerKind::EulerA;
    let run = |r: &GenerationRequest| {
        model
            .generate(
                r,
                None,
                PreviewOptions::default(),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap()
            .latents
    };
    let first = run(&r);
    assert_eq!(
        relative_error(&run(&r), &first),
        0.0,
        "same seed, same image"
    );
    // The same initial noise with other step noise gives another image: the seed drives both.
    let euler = run(&GenerationRequest {
        scheduler: SchedulerKind::Euler,
        ..r.clone()
    });
    assert!(relative_error(&first, &euler) > 1e-3);
}

#[test]
fn progress_counts_model_evaluations() {
    let model = load_model("sd1");
    let mut r = request(4);
    r.scheduler = SchedulerKind::Heun;
    let mut seen = Vec::new();
    model
        .generate(
            &r,
            None,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |step| {
                seen.push((step.step_index, step.total_steps));
            },
        )
        .unwrap();
    // Heun evaluates the model twice per step but once for the last: 2 * 4 - 1.
    assert_eq!(seen.len(), 7);
    assert!(seen.iter().all(|&(_, total)| total == 7));
    assert_eq!(seen.last(), Some(&(6, 7)));
    assert_eq!(SchedulerKind::Heun.model_evaluations(4), 7);
}

#[test]
fn every_fixture_family_warms_up() {
    // GPUs run this one-step job at load (at the native size); it must work for every kind of model.
    for family in ["sd1", "sd2", "sdxl", "lcm", "sd1-inpaint"] {
        let model = load_model(family);
        model.warm_up().unwrap_or_else(|e| panic!("{family}: {e}"));
    }
}
