//! Shared helpers for the tests: fixture paths, expected values, tolerances.
#![allow(dead_code, clippy::unwrap_used)] // shared by the test binaries; panics are test failures

use std::collections::HashMap;
use std::path::PathBuf;

use atelier::engine::pipeline::{LoadOptions, StableDiffusion};
use atelier::engine::source::ModelSource;
use candle_core::{DType, Device, Tensor};

/// The fixture families made by scripts/make_fixtures.py.
pub const FAMILIES: [&str; 3] = ["sd1", "sd2", "sdxl"];

/// The fixtures under the repository the tests were built in, or under `ATELIER_REPO_DIR` (a
/// test binary carried to the GPU machine runs from another folder).
pub fn fixture_dir(family: &str) -> PathBuf {
    std::env::var_os("ATELIER_REPO_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("tests/fixtures")
        .join(family)
}

pub fn model_dir(family: &str) -> PathBuf {
    fixture_dir(family).join("model")
}

/// The CPU, or the GPU with `ATELIER_TEST_DEVICE=cuda` (a build with the `cuda` feature): the
/// parity tests then check our CUDA kernels against the same diffusers values, in f32.
pub fn test_device() -> Device {
    match std::env::var("ATELIER_TEST_DEVICE").as_deref() {
        Ok("cuda") => Device::new_cuda(0).expect("ATELIER_TEST_DEVICE=cuda needs a CUDA build"),
        _ => Device::Cpu,
    }
}

/// f32, or f16 with `ATELIER_TEST_DTYPE=f16` (diagnostics on the GPU: the tolerances are f32's,
/// so pair it with `ATELIER_TEST_REPORT=1`).
pub fn test_dtype() -> DType {
    match std::env::var("ATELIER_TEST_DTYPE").as_deref() {
        Ok("f16") => DType::F16,
        _ => DType::F32,
    }
}

/// With `ATELIER_TEST_REPORT=1` comparisons print their error instead of failing, so that one
/// run shows every error (used to find where an f16 run departs from diffusers).
pub fn report_only() -> bool {
    std::env::var_os("ATELIER_TEST_REPORT").is_some()
}

/// Asserts `ok`, or only prints `message` in report mode.
pub fn check(ok: bool, message: &str) {
    if report_only() {
        eprintln!("{} {message}", if ok { "ok:  " } else { "FAIL:" });
    } else {
        assert!(ok, "{message}");
    }
}

pub fn load_model(family: &str) -> StableDiffusion {
    let mut options = LoadOptions::new(test_device());
    options.dtype = Some(test_dtype());
    StableDiffusion::load(ModelSource::Folder(model_dir(family)), options)
        .expect("fixture model loads")
}

pub struct Expected {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Expected {
    pub fn load(family: &str) -> Self {
        let dir = fixture_dir(family);
        let tensors =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &test_device())
                .expect("expected.safetensors");
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join("expected.json")).expect("expected.json"),
        )
        .expect("expected.json parses");
        Self { tensors, meta }
    }

    pub fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }
}

/// max |ours - reference| / max |reference|.
pub fn relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let (ours, reference) = (cpu(ours), cpu(reference));
    let diff: f64 = (&ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f64 = reference
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    diff / scale.max(1e-12)
}

pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, tolerance: f64) {
    let error = relative_error(ours, reference);
    check(
        error <= tolerance,
        &format!("{what}: relative error {error:.3e} (tolerance {tolerance:.0e})"),
    );
}

/// The largest difference, in 8-bit steps, between our image and diffusers' float image
/// `(1, H, W, 3)` in [0, 1].
pub fn max_pixel_difference(ours: &image::RgbImage, reference: &Tensor) -> f32 {
    let reference = (reference * 255.0).unwrap();
    let ours: Vec<f32> = ours.as_raw().iter().map(|&b| b as f32).collect();
    let ours = Tensor::from_vec(ours, reference.dims(), reference.device()).unwrap();
    (ours - &reference)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The request of a fixture run recorded as `{prompt, negative_prompt, steps, guidance, width,
/// height, sampler}` (the img2img, inpainting and single-file fixtures).
pub fn request_of(run: &serde_json::Value) -> atelier::engine::pipeline::GenerationRequest {
    atelier::engine::pipeline::GenerationRequest {
        prompt: run["prompt"].as_str().unwrap().into(),
        negative_prompt: run["negative_prompt"].as_str().unwrap().into(),
        steps: run["steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance"].as_f64().unwrap(),
        width: run["width"].as_u64().unwrap() as usize,
        height: run["height"].as_u64().unwrap() as usize,
        scheduler: atelier::schedulers::SchedulerKind::parse(run["sampler"].as_str().unwrap())
            .unwrap(),
        ..Default::default()
    }
}
