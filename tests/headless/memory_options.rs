//! What saves memory: tiled VAE decoding and encoding against diffusers' `enable_tiling()`
//! (`tests/fixtures/tiled_vae.*`, written by `scripts/make_tiled_vae_fixture.py`: on the SD 1.x
//! fixture's VAE, 64-pixel tiles over a 112x160 image whose last tiles are partial), and text
//! encoders kept on the CPU while the rest of the model runs elsewhere (here: in f16).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;

use atelier::engine::pipeline::{LoadOptions, StableDiffusion};
use atelier::engine::source::ModelSource;
use atelier::engine::vae::VaeEncoder;
use atelier::engine::vae_tiling::{TileStatistics, VaeTiling, decode_in_tiles, moments_in_tiles};
use candle_core::{DType, Device, Tensor};
use common::*;

fn fixture() -> HashMap<String, Tensor> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    candle_core::safetensors::load(dir.join("tiled_vae.safetensors"), &Device::Cpu).unwrap()
}

/// Our decode of the fixture's latents (given in the VAE's own space), in [0, 1].
fn decode(model: &atelier::engine::pipeline::StableDiffusion, latents: &Tensor) -> Tensor {
    let scaled = (latents * model.vae().config().scaling_factor).unwrap();
    model.decode_to_tensor(&scaled).unwrap()
}

/// diffusers' decoded values mapped as our decode maps them.
fn to_unit(decoded: &Tensor) -> Tensor {
    ((decoded / 2.0).unwrap() + 0.5)
        .unwrap()
        .clamp(0.0, 1.0)
        .unwrap()
}

#[test]
fn per_tile_statistics_equal_diffusers_tiling() {
    // diffusers' enable_tiling(): each tile normalised alone, blended over the overlaps.
    let fixture = fixture();
    let model = load_model("sd1");
    let tiles = model.vae_tile_sizes();
    assert_eq!((tiles.sample_px, tiles.latent_cells), (64, 32));
    let latents = fixture["latents"].clone();
    let decoded = decode_in_tiles(model.vae(), &latents, tiles, TileStatistics::PerTile).unwrap();
    assert_eq!(decoded.dims(), &[1, 3, 112, 160]);
    assert_close("tiled decode", &decoded, &fixture["decoded_tiled"], 2e-4);

    let encoder = VaeEncoder::new(
        model.vae().config(),
        candle_nn::VarBuilder::from_tensors(
            candle_core::safetensors::load(
                model_dir("sd1").join("vae/diffusion_pytorch_model.safetensors"),
                &Device::Cpu,
            )
            .unwrap(),
            DType::F32,
            &Device::Cpu,
        ),
    )
    .unwrap();
    let moments = moments_in_tiles(
        &encoder,
        &fixture["image"],
        tiles,
        2,
        TileStatistics::PerTile,
    )
    .unwrap();
    let distribution = encoder.distribution(&moments).unwrap();
    assert_eq!(distribution.mean.dims(), &[1, 4, 56, 80]);
    assert_close(
        "tiled encode mean",
        &distribution.mean,
        &fixture["encoded_tiled_mean"],
        2e-4,
    );
    assert_close(
        "tiled encode std",
        &distribution.std,
        &fixture["encoded_tiled_std"],
        2e-4,
    );
}

/// A 384x384 picture like Atelier Shapes draws (flat blue, a red disc, a yellow square), in
/// [-1, 1] `(1, 3, 384, 384)`.
fn flat_picture() -> Tensor {
    let side = 384usize;
    let mut pixels = vec![0f32; 3 * side * side];
    for y in 0..side {
        for x in 0..side {
            let (fx, fy) = (x as f32, y as f32);
            let colour = if (fx - 120.0).powi(2) + (fy - 250.0).powi(2) < 60.0f32.powi(2) {
                [0.9, 0.1, 0.1]
            } else if (230.0..320.0).contains(&fx) && (60.0..150.0).contains(&fy) {
                [0.95, 0.85, 0.1]
            } else {
                [0.1, 0.2, 0.75]
            };
            for c in 0..3 {
                pixels[c * side * side + y * side + x] = colour[c] * 2.0 - 1.0;
            }
        }
    }
    Tensor::from_vec(pixels, (1, 3, side, side), &Device::Cpu).unwrap()
}

#[test]
fn shared_statistics_leave_no_seams_on_a_trained_vae() {
    // Atelier Shapes' VAE (trained, 128-pixel tiles): a flat picture through the encoder in one
    // pass, then decoded in one pass, in diffusers' tiles, and in tiles that share statistics.
    let options = LoadOptions::new(Device::Cpu);
    let model = StableDiffusion::load(
        ModelSource::Folder(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/atelier-shapes"),
        ),
        options,
    )
    .unwrap();
    let tiles = model.vae_tile_sizes();
    assert_eq!(tiles.sample_px, 128);
    model.set_vae_tiling(VaeTiling::Never);
    let latents = model.encode_pixels(&flat_picture()).unwrap().mean;
    let scale = model.vae().config().scaling_factor;
    let untiled = model
        .decode_to_tensor(&(&latents * scale).unwrap())
        .unwrap();
    let per_tile =
        to_unit(&decode_in_tiles(model.vae(), &latents, tiles, TileStatistics::PerTile).unwrap());
    model.set_vae_tiling(VaeTiling::Always);
    assert!(model.tiles_vae(1, 384, 384), "nine 128-pixel tiles");
    let shared = model
        .decode_to_tensor(&(&latents * scale).unwrap())
        .unwrap();
    let shared_error = mean_difference(&shared, &untiled) * 255.0;
    let per_tile_error = mean_difference(&per_tile, &untiled) * 255.0;
    let shared_max = max_difference(&shared, &untiled) * 255.0;
    eprintln!(
        "mean difference to one pass (of 255): shared {shared_error:.2} (max {shared_max:.0}), \
         per tile {per_tile_error:.2} (max {:.0})",
        max_difference(&per_tile, &untiled) * 255.0
    );
    assert!(shared_error > 0.01, "went in tiles (not one pass)");
    assert!(shared_error < per_tile_error / 2.0);
    assert!(shared_error < 2.0, "{shared_error} of 255 on average");

    // Encoding in tiles that share statistics lands near the one-pass latents too.
    let tiled_latents = model.encode_pixels(&flat_picture()).unwrap().mean;
    let encoder_error = mean_difference(&tiled_latents, &latents);
    let latent_scale = mean_difference(&latents, &latents.zeros_like().unwrap());
    eprintln!("encode: mean difference {encoder_error:.4} (latents' mean size {latent_scale:.3})");
    assert!(encoder_error > 0.0, "went in tiles (not one pass)");
    assert!(encoder_error < latent_scale / 20.0);
}

#[test]
fn one_pass_and_auto_decode_as_before() {
    let fixture = fixture();
    let model = load_model("sd1");
    let untiled = to_unit(&fixture["decoded_untiled"]);
    model.set_vae_tiling(VaeTiling::Never);
    assert_close(
        "untiled decode",
        &decode(&model, &fixture["latents"]),
        &untiled,
        2e-4,
    );
    // Auto tiles only what would not fit: this small image goes in one pass.
    model.set_vae_tiling(VaeTiling::Auto);
    assert!(!model.tiles_vae(1, 112, 160));
    assert_close(
        "auto decode",
        &decode(&model, &fixture["latents"]),
        &untiled,
        2e-4,
    );
    assert!(
        model.tiles_vae(4, 4096, 4096),
        "four 4096x4096 pictures go in tiles"
    );
    model.set_vae_tiling(VaeTiling::Always);
    assert_eq!(
        decode(&model, &fixture["latents"]).dims(),
        &[1, 3, 112, 160]
    );
}

fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn mean_difference(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn a_tile_sized_image_is_never_tiled() {
    let model = load_model("sd1");
    model.set_vae_tiling(VaeTiling::Always);
    assert!(!model.tiles_vae(1, 64, 64));
    assert!(model.tiles_vae(1, 64, 72));
}

fn load_f16(family: &str, text_encoders_on_cpu: bool) -> StableDiffusion {
    let mut options = LoadOptions::new(Device::Cpu);
    options.dtype = Some(DType::F16);
    options.overrides.text_encoders_on_cpu = text_encoders_on_cpu;
    StableDiffusion::load(ModelSource::Folder(model_dir(family)), options).unwrap()
}

#[test]
fn text_encoders_kept_on_the_cpu_give_the_unet_what_it_reads() {
    // SD 1.x (one encoder) and SDXL (two, pooled text): the embeddings come back in the
    // model's precision and equal the f32 encoders' within f16 rounding.
    for family in ["sd1", "sdxl"] {
        let kept = load_f16(family, true);
        let plain = load_f16(family, false);
        assert_eq!(kept.text_encoders_placement().1, DType::F32, "{family}");
        assert!(kept.text_encoders_placement().0.is_cpu());
        assert_eq!(plain.text_encoders_placement().1, DType::F16, "{family}");
        let reference = load_model(family);
        for prompt in [
            "a red fox in the snow",
            "(a castle:1.3) at dusk, oil painting",
        ] {
            let ours = kept.encode_prompt(prompt).unwrap();
            assert_eq!(ours.context.dtype(), DType::F16, "{family}");
            let exact = reference.encode_prompt(prompt).unwrap();
            assert_close(
                &format!("{family} context, encoders on the CPU"),
                &ours.context,
                &exact.context,
                2e-3,
            );
            let f16 = plain.encode_prompt(prompt).unwrap();
            assert_eq!(ours.context.dims(), f16.context.dims());
            if let (Some(pooled), Some(exact_pooled)) = (&ours.pooled, &exact.pooled) {
                assert_eq!(pooled.dtype(), DType::F16);
                assert_close(&format!("{family} pooled"), pooled, exact_pooled, 2e-3);
            }
        }
    }
}
