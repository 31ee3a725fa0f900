//! Single-file checkpoints against diffusers' `from_single_file` (`tests/fixtures/single-file/`,
//! written by `scripts/make_single_file_fixture.py`): SD 1.x (f16, no sidecar), SD 2.x 768-v
//! (bf16, OpenCLIP layout, sidecar `.yaml`), SDXL (f16, SGM sidecar), the SDXL refiner (image to
//! image, five time ids with the aesthetic score), a 9-channel inpainting model with EMA copies,
//! and a VAE file in the original layout as an override.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use atelier::engine::checkpoint::CheckpointFamily;
use atelier::engine::pipeline::{
    JobInput, LoadOptions, ModelFamily, PreviewOptions, StableDiffusion,
};
use atelier::engine::source::ModelSource;
use atelier::schedulers::Prediction;
use candle_core::{Device, Tensor};
use common::*;

/// Latents within 1e-3 of diffusers' (relative to their largest value), as the folder models.
const LATENT_TOLERANCE: f64 = 1e-3;

fn folder() -> PathBuf {
    common::fixture_dir("single-file")
}

fn fixture() -> (HashMap<String, Tensor>, Vec<serde_json::Value>) {
    let tensors =
        candle_core::safetensors::load(folder().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("expected.json")).unwrap())
            .unwrap();
    (tensors, meta["runs"].as_array().unwrap().clone())
}

fn load(file: &str, options: impl FnOnce(&mut LoadOptions)) -> StableDiffusion {
    let path = folder().join(file);
    let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
    assert_eq!(source, ModelSource::File(path));
    let mut load_options = LoadOptions::new(test_device());
    load_options.dtype = Some(test_dtype());
    options(&mut load_options);
    StableDiffusion::load(source, load_options).unwrap()
}

/// Runs a fixture run from its recorded noise.
fn generate_run(
    model: &StableDiffusion,
    run: &serde_json::Value,
    noise: &Tensor,
) -> atelier::engine::pipeline::GenerationOutput {
    model
        .generate(
            &request_of(run),
            Some(noise),
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap()
}

#[test]
fn single_files_match_diffusers_from_single_file() {
    let (tensors, runs) = fixture();
    assert_eq!(runs.len(), 8);
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    for run in &runs {
        let key = run["key"].as_str().unwrap();
        let file = run["file"].as_str().unwrap();
        let model = models
            .entry(file.to_string())
            .or_insert_with(|| load(file, |_| {}));
        let request = request_of(run);
        let cancel = AtomicBool::new(false);
        let output = match run.get("draws").and_then(|d| d.as_u64()) {
            Some(2) if run.get("strength").is_some() => {
                // The refiner reworks a picture (image to image).
                let draw = |i: usize| &tensors[&format!("{key}_draw{i}")];
                let input = JobInput::Image {
                    pixels: &tensors[&format!("{key}_image")],
                    strength: run["strength"].as_f64().unwrap(),
                    sample_noise: Some(draw(0)),
                    noise: Some(draw(1)),
                };
                model.generate_with(&request, &input, Default::default(), &cancel, &mut |_| {})
            }
            Some(2) => {
                let draw = |i: usize| &tensors[&format!("{key}_draw{i}")];
                let input = JobInput::Inpaint {
                    pixels: &tensors[&format!("{key}_image")],
                    mask: &tensors[&format!("{key}_mask")],
                    strength: 1.0,
                    sample_noise: None,
                    noise: Some(draw(0)),
                    masked_sample_noise: Some(draw(1)),
                    latent_noise: false,
                };
                model.generate_with(&request, &input, Default::default(), &cancel, &mut |_| {})
            }
            Some(n) => panic!("{key}: {n} draws"),
            None => model.generate(
                &request,
                Some(&tensors[&format!("{key}_noise")]),
                PreviewOptions::default(),
                &cancel,
                &mut |_| {},
            ),
        }
        .unwrap();
        assert_close(
            &format!("{key} latents"),
            &output.latents,
            &tensors[&format!("{key}_latents")],
            LATENT_TOLERANCE,
        );
    }
    // What the shapes and sidecars said.
    assert_eq!(models["sd1.safetensors"].family(), ModelFamily::Sd1);
    assert_eq!(models["sd2-v.safetensors"].family(), ModelFamily::Sd2);
    assert_eq!(models["sdxl.safetensors"].family(), ModelFamily::Sdxl);
    assert_eq!(
        models["sd1-inpaint.safetensors"]
            .unet()
            .config()
            .in_channels,
        9
    );
    assert_eq!(
        models["sd2-v.safetensors"].prediction(),
        Prediction::VPrediction
    );
    assert_eq!(models["sd1.safetensors"].prediction(), Prediction::Epsilon);
    assert_eq!(models["sdxl-refiner.safetensors"].time_id_count(), Some(5));
    assert_eq!(models["sd1.safetensors"].name(), "sd1");
    assert_eq!(
        models["sd1.safetensors"].unet_weights(),
        folder().join("sd1.safetensors"),
        "the whole file is the model's hash"
    );
}

#[test]
fn a_vae_file_overrides_the_baked_in_vae() {
    let (tensors, runs) = fixture();
    let run = runs.iter().find(|r| r["key"] == "sd1_euler").unwrap();
    let model = load("sd1.safetensors", |options| {
        options.overrides.vae = Some(folder().join("vae.safetensors"))
    });
    let output = generate_run(&model, run, &tensors["sd1_euler_noise"]);
    let difference = max_pixel_difference(&output.images[0], &tensors["sd1_vae_override_image"]);
    check(
        difference <= 2.0,
        &format!("the overridden VAE's image differs by {difference}/255"),
    );
}

#[test]
fn the_prediction_override_beats_the_sidecar() {
    let model = load("sd2-v.safetensors", |options| {
        options.overrides.prediction = Some(Prediction::Epsilon)
    });
    assert_eq!(model.prediction(), Prediction::Epsilon);
    let model = load("sd1.safetensors", |options| {
        options.overrides.prediction = Some(Prediction::VPrediction)
    });
    assert_eq!(model.prediction(), Prediction::VPrediction);
}

#[test]
fn headers_tell_family_and_variant() {
    let info = |file: &str| atelier::engine::checkpoint::inspect(&folder().join(file)).unwrap();
    assert_eq!(info("sd1.safetensors").family, CheckpointFamily::Sd1);
    let sd2 = info("sd2-v.safetensors");
    assert_eq!(sd2.family, CheckpointFamily::Sd2);
    assert_eq!(sd2.v_prediction, Some(true), "from the sidecar");
    assert_eq!(sd2.dtype.as_deref(), Some("BF16"));
    assert_eq!(info("sdxl.safetensors").family, CheckpointFamily::Sdxl);
    let inpaint = info("sd1-inpaint.safetensors");
    assert!(inpaint.inpainting && inpaint.has_ema);
    assert_eq!(info("vae.safetensors").family, CheckpointFamily::Unknown);
}

#[test]
fn bad_single_files_get_clear_messages() {
    let dir = tempfile::tempdir().unwrap();
    let error = |path: &std::path::Path| {
        let source = ModelSource::File(path.to_path_buf());
        StableDiffusion::load(source, LoadOptions::new(Device::Cpu))
            .err()
            .unwrap()
            .to_string()
    };
    // A pickle.
    let ckpt = dir.path().join("model.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04").unwrap();
    let message = error(&ckpt);
    assert!(message.contains("arbitrary code"), "{message}");
    // Not a safetensors file.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    assert!(error(&junk).contains("junk.safetensors"));
    // A VAE alone is not a model.
    let message = error(&folder().join("vae.safetensors"));
    assert!(
        message.contains("not a Stable Diffusion checkpoint"),
        "{message}"
    );
    // A missing VAE override.
    let mut options = LoadOptions::new(Device::Cpu);
    options.overrides.vae = Some(dir.path().join("missing-vae.safetensors"));
    let message =
        StableDiffusion::load(ModelSource::File(folder().join("sd1.safetensors")), options)
            .err()
            .unwrap()
            .to_string();
    assert!(message.contains("missing-vae.safetensors"), "{message}");
    // A model file given as the VAE is read for its VAE part; a LoRA-like file is refused.
    let not_vae = dir.path().join("lora.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
            Tensor::zeros((4, 32), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]),
        &not_vae,
    )
    .unwrap();
    let mut options = LoadOptions::new(Device::Cpu);
    options.overrides.vae = Some(not_vae);
    let message =
        StableDiffusion::load(ModelSource::File(folder().join("sd1.safetensors")), options)
            .err()
            .unwrap()
            .to_string();
    assert!(message.contains("not a VAE"), "{message}");
}

#[test]
fn the_cli_generates_from_a_single_file_with_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["generate", "--prompt", "a (red:1.2) fox", "--steps", "3"])
        .args(["--width", "32", "--height", "32", "--device", "cpu"])
        .arg("--model")
        .arg(folder().join("sd2-v.safetensors"))
        .arg("--vae")
        .arg(folder().join("vae.safetensors"))
        .args(["--prediction", "epsilon", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written = image::open(&out).unwrap();
    assert_eq!((written.width(), written.height()), (32, 32));
    let text = atelier::gallery::png_read::read_text_bounded(&out).unwrap();
    let parameters = format!("{text:?}");
    assert!(parameters.contains("Model: sd2-v"), "{parameters}");
    assert!(parameters.contains("VAE: vae.safetensors"), "{parameters}");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args([
            "generate",
            "--prompt",
            "a fox",
            "--prediction",
            "sideways",
            "--out",
        ])
        .arg(&out)
        .arg("--model")
        .arg(folder().join("sd1.safetensors"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("epsilon or v"));
}

/// A copy of a fixture file without the tensors whose keys start with `prefix`.
fn without(file: &str, prefix: &str, dir: &std::path::Path) -> PathBuf {
    let tensors = candle_core::safetensors::load(folder().join(file), &Device::Cpu).unwrap();
    let kept: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(key, _)| !key.starts_with(prefix))
        .collect();
    let path = dir.join(file);
    candle_core::safetensors::save(&kept, &path).unwrap();
    path
}

#[test]
fn a_file_without_its_vae_loads_with_one_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let path = without("sd1.safetensors", "first_stage_model.", dir.path());
    let info = atelier::engine::checkpoint::inspect(&path).unwrap();
    assert!(!info.has_vae && info.has_text_encoders);
    let error = StableDiffusion::load(
        ModelSource::File(path.clone()),
        LoadOptions::new(Device::Cpu),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(error.contains("no VAE baked in"), "{error}");
    // With the VAE file it loads, and decodes as the override test's reference does.
    let (tensors, runs) = fixture();
    let run = runs.iter().find(|r| r["key"] == "sd1_euler").unwrap();
    let mut options = LoadOptions::new(test_device());
    options.dtype = Some(test_dtype());
    options.overrides.vae = Some(folder().join("vae.safetensors"));
    let model = StableDiffusion::load(ModelSource::File(path), options).unwrap();
    let output = generate_run(&model, run, &tensors["sd1_euler_noise"]);
    assert_close(
        "latents",
        &output.latents,
        &tensors["sd1_euler_latents"],
        1e-3,
    );
    let difference = max_pixel_difference(&output.images[0], &tensors["sd1_vae_override_image"]);
    check(
        difference <= 2.0,
        &format!("pixels differ by {difference}/255"),
    );
}

#[test]
fn a_unet_only_file_takes_its_text_encoders_from_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let path = without("sdxl.safetensors", "conditioner.", dir.path());
    // The sidecar says the family (the tiny UNet's widths cannot).
    std::fs::copy(folder().join("sdxl.yaml"), dir.path().join("sdxl.yaml")).unwrap();
    let source = ModelSource::parse(path.to_str().unwrap()).unwrap();
    let error = StableDiffusion::load(source.clone(), LoadOptions::new(Device::Cpu))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("no text encoders baked in"), "{error}");
    assert!(error.contains("--text-encoders"), "{error}");
    // From a checkpoint of the same family: the same model as the whole file.
    let (tensors, runs) = fixture();
    let run = runs.iter().find(|r| r["key"] == "sdxl_euler").unwrap();
    let mut options = LoadOptions::new(test_device());
    options.dtype = Some(test_dtype());
    options.overrides.text_encoders = Some(folder().join("sdxl.safetensors"));
    let model = StableDiffusion::load(source.clone(), options).unwrap();
    let output = generate_run(&model, run, &tensors["sdxl_euler_noise"]);
    assert_close(
        "sdxl without text encoders",
        &output.latents,
        &tensors["sdxl_euler_latents"],
        1e-3,
    );
    // Another family's text encoders are refused, saying why.
    let mut options = LoadOptions::new(Device::Cpu);
    options.overrides.text_encoders = Some(folder().join("sd1.safetensors"));
    let error = StableDiffusion::load(source, options)
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("is SD 1.x, not SDXL"), "{error}");
    // From a diffusers folder (the SD 1.x fixture's encoder for an SD 1.x UNet).
    let sd1 = without("sd1.safetensors", "cond_stage_model.", dir.path());
    std::fs::write(
        dir.path().join("sd1.yaml"),
        "model:\n  params:\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n",
    )
    .unwrap();
    let mut options = LoadOptions::new(Device::Cpu);
    options.overrides.text_encoders = Some(common::model_dir("sd1"));
    let model = StableDiffusion::load(ModelSource::File(sd1), options).unwrap();
    assert_eq!(model.family(), ModelFamily::Sd1);
    let encoded = model.encode_prompt("a fox").unwrap();
    assert_eq!(encoded.context.dims(), &[1, 77, 16]);
}
