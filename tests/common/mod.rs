//! Shared helpers for the tests: fixture paths, expected values, tolerances.
#![allow(dead_code, clippy::unwrap_used)] // shared by several test crates; panics are test failures

use std::collections::HashMap;
use std::path::PathBuf;

use atelier::engine::pipeline::{LoadOptions, StableDiffusion};
use atelier::engine::source::ModelSource;
use candle_core::{DType, Device, Tensor};

/// The fixture families made by scripts/make_fixtures.py.
pub const FAMILIES: [&str; 3] = ["sd1", "sd2", "sdxl"];

pub fn fixture_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(family)
}

pub fn model_dir(family: &str) -> PathBuf {
    fixture_dir(family).join("model")
}

pub fn load_model(family: &str) -> StableDiffusion {
    StableDiffusion::load(
        ModelSource::Folder(model_dir(family)),
        LoadOptions::new(Device::Cpu),
    )
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
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
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
    let ours = ours.to_dtype(DType::F64).unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
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
    assert!(
        error <= tolerance,
        "{what}: relative error {error:.3e} exceeds {tolerance:.0e}"
    );
}
