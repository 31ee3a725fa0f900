//! Inpainting against diffusers (`tests/fixtures/inpaint.*`, written by
//! `scripts/make_inpaint_fixture.py`): StableDiffusionInpaintPipeline with a 9-channel inpainting
//! UNet (the `sd1-inpaint` fixture) and with an ordinary UNet (sd1: the known region blended back
//! after every step), and StableDiffusionXLInpaintPipeline (sdxl), Euler and DDIM, strengths 1
//! and 0.75, from diffusers' own random draws.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;

use atelier::engine::pipeline::JobInput;
use candle_core::{DType, Device, Tensor};
use common::*;

fn fixture() -> (HashMap<String, Tensor>, Vec<serde_json::Value>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors =
        candle_core::safetensors::load(dir.join("inpaint.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("inpaint.json")).unwrap()).unwrap();
    (tensors, meta["runs"].as_array().unwrap().clone())
}

#[test]
fn inpainting_matches_diffusers() {
    let (tensors, runs) = fixture();
    assert_eq!(runs.len(), 12);
    let mut models = HashMap::new();
    for run in &runs {
        let family = run["family"].as_str().unwrap();
        let key = run["key"].as_str().unwrap();
        let model = models
            .entry(family.to_string())
            .or_insert_with(|| load_model(family));
        assert_eq!(
            model.unet().config().in_channels as u64,
            run["unet_in_channels"].as_u64().unwrap()
        );
        let draw = |i: usize| &tensors[&format!("{key}_draw{i}")];
        // diffusers' order: the init image's sample (when it is encoded), the noise, the masked
        // image's sample.
        let (sample_noise, noise, masked) = match run["draws"].as_u64().unwrap() {
            3 => (Some(draw(0)), draw(1), draw(2)),
            2 => (None, draw(0), draw(1)),
            n => panic!("{key}: {n} draws"),
        };
        let input = JobInput::Inpaint {
            pixels: &tensors[&format!("{family}_image")],
            mask: &tensors[&format!("{family}_mask")],
            strength: run["strength"].as_f64().unwrap(),
            sample_noise,
            noise: Some(noise),
            masked_sample_noise: Some(masked),
            latent_noise: false,
        };
        let output = model
            .generate_with(
                &request_of(run),
                &input,
                Default::default(),
                &std::sync::atomic::AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap();
        let error = relative_error(&output.latents, &tensors[&format!("{key}_latents")]);
        check(
            error <= 1e-3,
            &format!("{key}: latents differ by {error:e}"),
        );
        let difference =
            max_pixel_difference(&output.images[0], &tensors[&format!("{key}_pixels")]);
        check(
            difference <= 2.0,
            &format!("{key}: pixels differ by {difference}/255"),
        );
    }
}

#[test]
fn an_empty_or_misshapen_mask_is_refused() {
    let (tensors, runs) = fixture();
    let model = load_model("sd1");
    let request = request_of(&runs[4]);
    let image = &tensors["sd1_image"];
    let attempt = |mask: &Tensor| {
        model
            .generate_with(
                &request,
                &JobInput::Inpaint {
                    pixels: image,
                    mask,
                    strength: 1.0,
                    sample_noise: None,
                    noise: None,
                    masked_sample_noise: None,
                    latent_noise: false,
                },
                Default::default(),
                &std::sync::atomic::AtomicBool::new(false),
                &mut |_| {},
            )
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let empty = Tensor::zeros((1, 1, 48, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(attempt(&empty).contains("the mask is empty"));
    let small = Tensor::ones((1, 1, 24, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(attempt(&small).contains("the mask has shape"));
    // Seeded, it runs.
    assert_eq!(attempt(&tensors["sd1_mask"]), "");
}
