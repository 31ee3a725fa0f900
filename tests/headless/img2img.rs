//! Image to image against diffusers (`tests/fixtures/img2img.*`, written by
//! `scripts/make_img2img_fixture.py`): the VAE encoder's distribution of an image, and whole
//! StableDiffusionImg2ImgPipeline / StableDiffusionXLImg2ImgPipeline runs with Euler and DDIM at
//! two strengths, from diffusers' own draws (the VAE's sampling noise, then the added noise).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;

use atelier::engine::pipeline::{GenerationRequest, JobInput};
use candle_core::{DType, Device, Tensor};
use common::*;

struct Fixture {
    tensors: HashMap<String, Tensor>,
    runs: Vec<serde_json::Value>,
}

fn fixture() -> Fixture {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors =
        candle_core::safetensors::load(dir.join("img2img.safetensors"), &Device::Cpu).unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("img2img.json")).unwrap()).unwrap();
    Fixture {
        tensors,
        runs: meta["runs"].as_array().unwrap().clone(),
    }
}

impl Fixture {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no tensor {name}"))
    }
}

#[test]
fn the_vae_encoder_matches_diffusers() {
    let fixture = fixture();
    for family in ["sd1", "sd2", "sdxl"] {
        let model = load_model(family);
        let image = fixture.tensor(&format!("{family}_image"));
        let pixels = ((image * 2.0).unwrap() - 1.0).unwrap();
        let distribution = model.encode_pixels(&pixels).unwrap();
        for (what, ours) in [("mean", &distribution.mean), ("std", &distribution.std)] {
            let error = relative_error(ours, fixture.tensor(&format!("{family}_encode_{what}")));
            check(
                error <= 1e-4,
                &format!("{family} encoder {what}: {error:e}"),
            );
        }
    }
}

#[test]
fn image_to_image_matches_diffusers() {
    let fixture = fixture();
    let mut models = HashMap::new();
    assert_eq!(fixture.runs.len(), 12);
    for run in &fixture.runs {
        let family = run["family"].as_str().unwrap();
        let key = run["key"].as_str().unwrap();
        let model = models
            .entry(family.to_string())
            .or_insert_with(|| load_model(family));
        let request = request_of(run);
        let input = JobInput::Image {
            pixels: fixture.tensor(&format!("{family}_image")),
            strength: run["strength"].as_f64().unwrap(),
            sample_noise: Some(fixture.tensor(&format!("{key}_sample_noise"))),
            noise: Some(fixture.tensor(&format!("{key}_noise"))),
        };
        let mut steps_seen = Vec::new();
        let output = model
            .generate_with(
                &request,
                &input,
                Default::default(),
                &std::sync::atomic::AtomicBool::new(false),
                &mut |step| steps_seen.push((step.step_index, step.total_steps)),
            )
            .unwrap();
        // Progress counts the steps that run: int(steps * strength) of them.
        let runs_steps = (request.steps as f64 * run["strength"].as_f64().unwrap()) as usize;
        assert_eq!(steps_seen.len(), runs_steps, "{key}");
        assert_eq!(
            steps_seen.last(),
            Some(&(runs_steps - 1, runs_steps)),
            "{key}"
        );
        let error = relative_error(&output.latents, fixture.tensor(&format!("{key}_latents")));
        check(
            error <= 1e-3,
            &format!("{key}: latents differ by {error:e}"),
        );
        let difference =
            max_pixel_difference(&output.images[0], fixture.tensor(&format!("{key}_pixels")));
        check(
            difference <= 2.0,
            &format!("{key}: pixels differ by {difference}/255"),
        );
    }
}

#[test]
fn image_to_image_refuses_what_it_cannot_do() {
    let model = load_model("sd1");
    let fixture = fixture();
    let image = fixture.tensor("sd1_image");
    let request = GenerationRequest {
        prompt: "a fox".into(),
        steps: 10,
        width: 64,
        height: 48,
        ..Default::default()
    };
    let run = |strength: f64, pixels: &Tensor| match model.generate_with(
        &request,
        &JobInput::Image {
            pixels,
            strength,
            sample_noise: None,
            noise: None,
        },
        Default::default(),
        &std::sync::atomic::AtomicBool::new(false),
        &mut |_| {},
    ) {
        Ok(_) => String::new(),
        Err(error) => error.to_string(),
    };
    assert!(run(0.0, image).contains("strength must be above 0"));
    assert!(run(1.5, image).contains("at most 1"));
    assert!(run(0.05, image).contains("leaves no step to run"));
    let wrong = Tensor::zeros((1, 3, 32, 32), DType::F32, &Device::Cpu).unwrap();
    assert!(run(0.5, &wrong).contains("the init image has shape"));
    // Seeded: the same seed gives the same image.
    assert_eq!(run(0.5, image), "");
}

#[test]
fn generate_takes_an_init_image_from_the_command_line() {
    use atelier::gallery::metadata::{A1111Parameters, read_png_text, write_png};
    let dir = tempfile::tempdir().unwrap();
    let fixture = fixture();
    // The fixture's photo as an 8-bit PNG (64x48) and as a JPEG.
    let image = fixture.tensor("sd1_image");
    let (height, width) = (image.dim(2).unwrap(), image.dim(3).unwrap());
    let hwc: Vec<u8> = (image.squeeze(0).unwrap().permute((1, 2, 0)).unwrap() * 255.0)
        .unwrap()
        .round()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let rgb = image::RgbImage::from_raw(width as u32, height as u32, hwc).unwrap();
    let png = dir.path().join("photo.png");
    write_png(&png, &rgb, &[]).unwrap();
    let jpeg = dir.path().join("photo.jpg");
    rgb.save(&jpeg).unwrap();
    let generate = |init: &std::path::Path, extra: &[&str], out: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
            .args(["generate", "--model"])
            .arg(model_dir("sd1"))
            .args([
                "--prompt", "a fox", "--steps", "10", "--device", "cpu", "--seed", "3",
            ])
            .arg("--init-image")
            .arg(init)
            .args(extra)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = dir.path().join("reworked.png");
    let output = generate(&png, &["--strength", "0.6"], &out);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let made = image::open(&out).unwrap().to_rgb8();
    // The size comes from the init image; the metadata says the strength.
    assert_eq!(made.dimensions(), (width as u32, height as u32));
    let parameters = A1111Parameters::parse(&read_png_text(&out).unwrap()["parameters"]);
    assert_eq!(parameters.get("Denoising strength"), Some("0.6"));
    // A low strength keeps the picture: closer to the photo than a high one.
    let distance = |a: &image::RgbImage| -> f64 {
        a.as_raw()
            .iter()
            .zip(rgb.as_raw())
            .map(|(x, y)| (*x as f64 - *y as f64).abs())
            .sum::<f64>()
            / a.as_raw().len() as f64
    };
    let low = dir.path().join("low.png");
    assert!(
        generate(&png, &["--strength", "0.2"], &low)
            .status
            .success()
    );
    let high = dir.path().join("high.png");
    assert!(
        generate(&png, &["--strength", "1.0"], &high)
            .status
            .success()
    );
    let low = image::open(&low).unwrap().to_rgb8();
    let high = image::open(&high).unwrap().to_rgb8();
    assert!(
        distance(&low) < distance(&high),
        "{} vs {}",
        distance(&low),
        distance(&high)
    );
    // A JPEG works, resized to another size by a resize mode.
    let square = dir.path().join("square.png");
    let output = generate(
        &jpeg,
        &[
            "--width",
            "32",
            "--height",
            "32",
            "--resize-mode",
            "crop-and-resize",
        ],
        &square,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        image::open(&square).unwrap().to_rgb8().dimensions(),
        (32, 32)
    );
    // Bad input is refused before any work, with a message.
    let output = generate(&png, &["--resize-mode", "stretch"], &square);
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown resize mode"));
    let output = generate(&png, &["--strength", "0.05"], &square);
    assert!(String::from_utf8_lossy(&output.stderr).contains("leaves no step to run"));
    let text = dir.path().join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    let output = generate(&text, &[], &square);
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--init-image"));
}
