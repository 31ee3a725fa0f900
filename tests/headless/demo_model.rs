//! Atelier Shapes, the bundled model, end to end on the CPU (offline): the prompt steers the
//! picture. The analyser reads each picture's colours, shape and position back
//! (`atelier::demo_model::analyser`); with guidance and the prompt the colours must be the ones
//! asked for, and with guidance 1 and an empty prompt they must not (so the test can fail).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use atelier::demo_model::analyser::analyse;
use atelier::demo_model::validation::{Accuracy, ValidationPrompt, check, validation_prompts};
use atelier::engine::pipeline::{GenerationRequest, LoadOptions, PreviewOptions, StableDiffusion};
use atelier::engine::source::ModelSource;
use atelier::schedulers::Sampler;

fn bundled_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/atelier-shapes")
}

fn load() -> StableDiffusion {
    StableDiffusion::load(
        ModelSource::Folder(bundled_model_dir()),
        LoadOptions::new(common::test_device()),
    )
    .expect("the bundled model loads")
}

/// Every third validation prompt: all five shapes, most colours and positions.
fn prompts() -> Vec<ValidationPrompt> {
    validation_prompts().into_iter().step_by(3).collect()
}

fn accuracy(model: &StableDiffusion, prompts: &[ValidationPrompt], guided: bool) -> Accuracy {
    let sampler = Sampler::parse("dpmpp-2m").unwrap();
    let cancel = AtomicBool::new(false);
    let mut accuracy = Accuracy::default();
    for prompt in prompts {
        let request = GenerationRequest {
            prompt: if guided {
                prompt.prompt.clone()
            } else {
                String::new()
            },
            seed: prompt.seed,
            steps: 12,
            guidance_scale: if guided { 5.0 } else { 1.0 },
            width: 128,
            height: 128,
            scheduler: sampler.kind,
            sigmas: sampler.sigmas,
            ..Default::default()
        };
        let output = model
            .generate(
                &request,
                None,
                PreviewOptions::default(),
                &cancel,
                &mut |_| {},
            )
            .unwrap();
        let reading = analyse(&output.images[0]);
        let checks = check(prompt, &reading);
        if common::report_only() {
            eprintln!("{:?} -> {reading:?} {checks:?}", request.prompt);
        }
        accuracy.add(checks);
    }
    accuracy
}

#[test]
fn prompts_steer_the_pictures_of_the_bundled_model() {
    let model = load();
    assert_eq!(model.default_size_for(None), (128, 128));
    let prompts = prompts();
    let guided = accuracy(&model, &prompts, true);
    let unguided = accuracy(&model, &prompts, false);
    eprintln!("with the prompts:            {}", guided.summary());
    eprintln!("guidance 1, an empty prompt: {}", unguided.summary());
    assert!(
        guided.fraction(guided.colour) >= 0.9 && guided.fraction(guided.background) >= 0.9,
        "the prompts do not steer the colours: {}",
        guided.summary()
    );
    assert!(
        guided.fraction(guided.shape) >= 0.8,
        "the prompts do not steer the shapes: {}",
        guided.summary()
    );
    assert!(
        unguided.fraction(unguided.colour) < 0.5 && unguided.fraction(unguided.background) < 0.5,
        "without a prompt the colours should be chance: {}",
        unguided.summary()
    );
}

#[test]
fn generate_without_a_model_uses_the_bundled_one() {
    let data = tempfile::tempdir().unwrap();
    let out = data.path().join("star.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args([
            "generate",
            "--prompt",
            "a large yellow star on a blue background",
            "--steps",
            "8",
            "--scheduler",
            "dpmpp-2m",
            "--guidance",
            "5",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--out",
        ])
        .arg(&out)
        // The bundled model is unpacked into the data folder: a fresh one here.
        .env("XDG_DATA_HOME", data.path())
        .env("HOME", data.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("atelier-shapes"), "{stderr}");
    let picture = image::open(&out).unwrap().to_rgb8();
    assert_eq!(picture.dimensions(), (128, 128));
    let reading = analyse(&picture);
    assert_eq!(reading.background, "blue", "{reading:?}");
    assert_eq!(reading.shape.map(|s| s.colour), Some("yellow"));
    assert!(
        data.path()
            .join("atelier/models/atelier-shapes/model_index.json")
            .is_file()
    );
}

/// The live preview of a model with its own VAE shows the picture's colours: the map from
/// latents to colours is fitted to its VAE, not SD's published one.
#[test]
fn the_cheap_preview_shows_the_colours_of_the_picture() {
    let model = load();
    let sampler = Sampler::parse("dpmpp-2m").unwrap();
    let request = GenerationRequest {
        prompt: "a large yellow star on a blue background".into(),
        seed: 7,
        steps: 10,
        guidance_scale: 5.0,
        width: 128,
        height: 128,
        scheduler: sampler.kind,
        sigmas: sampler.sigmas,
        ..Default::default()
    };
    let mut last_preview = None;
    let output = model
        .generate(
            &request,
            None,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |step| last_preview = Some(model.preview(step.predicted_latents).unwrap()),
        )
        .unwrap();
    let preview = last_preview.unwrap();
    assert_eq!(preview.dimensions(), (32, 32));
    let small = image::imageops::resize(
        &output.images[0],
        32,
        32,
        image::imageops::FilterType::Triangle,
    );
    let difference = preview
        .as_raw()
        .iter()
        .zip(small.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / preview.as_raw().len() as f64;
    eprintln!("preview differs from the picture by {difference:.1} of 255");
    assert!(
        difference < 25.0,
        "preview differs by {difference:.1} of 255"
    );
    let reading = analyse(&image::imageops::resize(
        &preview,
        128,
        128,
        image::imageops::FilterType::Nearest,
    ));
    assert_eq!(reading.background, "blue", "{reading:?}");
    assert_eq!(reading.shape.map(|s| s.colour), Some("yellow"));
}
