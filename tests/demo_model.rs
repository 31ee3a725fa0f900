//! Atelier Shapes, the bundled model, end to end on the CPU (offline): the prompt steers the
//! picture. The analyser reads each picture's colours, shape and position back
//! (`atelier::demo_model::analyser`); with guidance and the prompt the colours must be the ones
//! asked for, and with guidance 1 and an empty prompt they must not (so the test can fail).
#![allow(clippy::unwrap_used)]

mod common;

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
            negative_prompt: String::new(),
            seed: prompt.seed,
            steps: 12,
            guidance_scale: if guided { 5.0 } else { 1.0 },
            width: 128,
            height: 128,
            batch_size: 1,
            scheduler: sampler.kind,
            sigmas: sampler.sigmas,
            eta: 0.0,
            clip_skip: 1,
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
