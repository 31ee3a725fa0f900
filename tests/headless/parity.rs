//! Atelier against diffusers on the tiny fixture pipelines (f32; on the CPU, or on the GPU with
//! `ATELIER_TEST_DEVICE=cuda` in a `cuda` build).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::sync::atomic::AtomicBool;

use atelier::engine::pipeline::{GenerationRequest, PreviewOptions};
use atelier::engine::unet::AddedConditions;
use atelier::schedulers::Sampler;
use candle_core::DType;
use common::*;

/// Final latents of whole runs: the bar.
const LATENT_TOLERANCE: f64 = 1e-3;
/// Single forward passes have no error accumulation and must be tighter.
const FORWARD_TOLERANCE: f64 = 1e-4;

#[test]
fn token_ids_match_transformers() {
    for family in FAMILIES {
        let model = load_model(family);
        let expected = Expected::load(family);
        for entry in expected.meta["tokens"].as_array().expect("tokens") {
            let prompt = entry["prompt"].as_str().expect("prompt");
            let tokenizer = entry["tokenizer"].as_u64().expect("tokenizer") as usize;
            let want: Vec<u32> = entry["ids"]
                .as_array()
                .expect("ids")
                .iter()
                .map(|v| v.as_u64().expect("id") as u32)
                .collect();
            let ours = model.tokenize(prompt).expect("tokenize");
            assert_eq!(
                ours[tokenizer], want,
                "{family} tokenizer {tokenizer} on {prompt:?}"
            );
        }
    }
}

#[test]
fn long_prompts_are_encoded_in_chunks_not_truncated() {
    let model = load_model("sd1");
    let expected = Expected::load("sd1");
    let long = expected.meta["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|e| e["untruncated_len"].as_u64().expect("len") > 77)
        .expect("a long prompt in the fixture");
    let prompt = long["prompt"].as_str().expect("prompt");
    let untruncated = long["untruncated_len"].as_u64().expect("len") as usize;
    let chunks = model.prompt_chunks(prompt).expect("chunks");
    let tokens: usize = chunks[0]
        .iter()
        .map(|chunk| {
            chunk.tokens[1..]
                .iter()
                .take_while(|&&t| t != chunk.tokens[76])
                .count()
        })
        .sum();
    assert_eq!(tokens, untruncated - 2, "every token is kept");
    let embeddings = model.encode_prompt(prompt).expect("encode");
    assert_eq!(embeddings.context.dims3().unwrap().1, 77 * chunks[0].len());
    // The first chunk alone is what diffusers encodes (it truncates to it).
    let first = embeddings.context.narrow(1, 0, 77).unwrap();
    let alone = model
        .encode_prompt(
            &prompt
                .split_whitespace()
                .take(75)
                .collect::<Vec<_>>()
                .join(" "),
        )
        .expect("encode");
    assert!(relative_error(&first, &alone.context) < 1e-6);
}

#[test]
fn text_embeddings_match_diffusers() {
    for family in FAMILIES {
        let model = load_model(family);
        let expected = Expected::load(family);
        let prompt = expected.meta["prompt"].as_str().expect("prompt");
        let negative = expected.meta["negative_prompt"].as_str().expect("negative");
        let positive = model.encode_prompt(prompt).expect("encode");
        assert_close(
            &format!("{family} prompt embeddings"),
            &positive.context,
            expected.tensor("prompt_embeds"),
            FORWARD_TOLERANCE,
        );
        let neg = model
            .encode_negative_prompt(negative, &positive)
            .expect("negative");
        assert_close(
            &format!("{family} negative embeddings"),
            &neg.context,
            expected.tensor("negative_prompt_embeds"),
            FORWARD_TOLERANCE,
        );
        let empty = model.encode_negative_prompt("", &positive).expect("empty");
        assert_close(
            &format!("{family} empty negative embeddings"),
            &empty.context,
            expected.tensor("empty_negative_prompt_embeds"),
            FORWARD_TOLERANCE,
        );
        if family == "sdxl" {
            let pairs = [
                (&positive, "pooled_prompt_embeds"),
                (&neg, "negative_pooled_prompt_embeds"),
                (&empty, "empty_negative_pooled_prompt_embeds"),
            ];
            for (embeddings, name) in pairs {
                let pooled = embeddings.pooled.as_ref().expect("pooled");
                let reference = expected.tensor(name);
                if reference
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0
                {
                    let total: f32 = pooled
                        .abs()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar()
                        .unwrap();
                    check(total == 0.0, &format!("{name} must be zeros"));
                } else {
                    assert_close(name, pooled, reference, FORWARD_TOLERANCE);
                }
            }
        }
    }
}

#[test]
fn unet_forward_matches_diffusers() {
    for family in FAMILIES {
        let model = load_model(family);
        let expected = Expected::load(family);
        let timestep = expected.meta["unet_timestep"].as_f64().expect("timestep");
        for tag in ["", "_odd"] {
            let added = (family == "sdxl").then(|| AddedConditions {
                text_embeds: expected.tensor(&format!("unet_text_embeds{tag}")).clone(),
                time_ids: expected.tensor(&format!("unet_time_ids{tag}")).clone(),
            });
            let input = |name: String| expected.tensor(&name).to_dtype(test_dtype()).unwrap();
            let out = model
                .unet()
                .forward(
                    &input(format!("unet_sample{tag}")),
                    timestep,
                    &input(format!("unet_context{tag}")),
                    added.as_ref(),
                )
                .expect("unet forward");
            assert_close(
                &format!("{family} unet{tag}"),
                &out,
                expected.tensor(&format!("unet_out{tag}")),
                FORWARD_TOLERANCE,
            );
        }
    }
}

#[test]
fn vae_decode_matches_diffusers() {
    if test_dtype() != DType::F32 {
        eprintln!("VAE check skipped: ATELIER_TEST_DTYPE is not f32");
        return;
    }
    for family in FAMILIES {
        let model = load_model(family);
        let expected = Expected::load(family);
        let latents = expected.tensor("vae_latents");
        let scaled = (latents / model.vae().config().scaling_factor).unwrap();
        let image = model.vae().decode(&scaled).expect("decode");
        assert_close(
            &format!("{family} vae"),
            &image,
            expected.tensor("vae_image"),
            FORWARD_TOLERANCE,
        );
    }
}

#[test]
fn full_runs_match_diffusers() {
    for family in FAMILIES {
        let model = load_model(family);
        let expected = Expected::load(family);
        let run = &expected.meta["run"];
        for entry in expected.meta["runs"].as_array().expect("runs") {
            let key = entry["key"].as_str().expect("key");
            let sampler = Sampler::parse(entry["scheduler"].as_str().expect("id")).unwrap();
            let request = GenerationRequest {
                prompt: expected.meta["prompt"].as_str().unwrap().into(),
                negative_prompt: if entry["negative_prompt"].as_bool().unwrap() {
                    expected.meta["negative_prompt"].as_str().unwrap().into()
                } else {
                    String::new()
                },
                seed: 0,
                steps: run["steps"].as_u64().unwrap() as usize,
                guidance_scale: run["guidance"].as_f64().unwrap(),
                width: run["width"].as_u64().unwrap() as usize,
                height: run["height"].as_u64().unwrap() as usize,
                batch_size: 1,
                scheduler: sampler.kind,
                sigmas: sampler.sigmas,
                eta: 0.0,
                clip_skip: 1,
            };
            let output = model
                .generate(
                    &request,
                    Some(expected.tensor("noise")),
                    PreviewOptions::default(),
                    &AtomicBool::new(false),
                    &mut |_| {},
                )
                .expect("generate");
            assert_close(
                &format!("{family} {key} latents"),
                &output.latents,
                expected.tensor(&format!("run_{key}_latents")),
                LATENT_TOLERANCE,
            );
            let max_diff = max_pixel_difference(
                &output.images[0],
                expected.tensor(&format!("run_{key}_image")),
            );
            check(
                max_diff <= 2.0,
                &format!("{family} {key}: pixels differ by {max_diff}/255"),
            );
        }
    }
}

/// An LCM-distilled UNet (`time_cond_proj_dim`): the guidance-scale embedding, one forward with
/// it, and a one-step LCM run without classifier-free guidance, as LatentConsistencyModelPipeline.
#[test]
fn lcm_distilled_unet_matches_diffusers() {
    let expected = Expected::load("lcm");
    let model = load_model("lcm");
    let unet = model.unet();
    assert_eq!(unet.guidance_embedding_dim(), Some(8));
    let embedding =
        atelier::engine::unet::guidance_scale_embedding(7.0, 8, 1, &test_device()).unwrap();
    assert_close(
        "guidance embedding",
        &embedding,
        expected.tensor("guidance_embedding"),
        1e-5,
    );
    let out = unet
        .forward_with_guidance(
            expected.tensor("unet_sample"),
            expected.meta["unet_timestep"].as_f64().unwrap(),
            expected.tensor("unet_context"),
            None,
            Some(&embedding),
        )
        .unwrap();
    assert_close("LCM UNet forward", &out, expected.tensor("unet_out"), 1e-4);

    let run = &expected.meta["run"];
    let request = GenerationRequest {
        prompt: expected.meta["prompt"].as_str().unwrap().into(),
        steps: run["steps"].as_u64().unwrap() as usize,
        guidance_scale: run["guidance"].as_f64().unwrap(),
        width: run["width"].as_u64().unwrap() as usize,
        height: run["height"].as_u64().unwrap() as usize,
        scheduler: atelier::schedulers::SchedulerKind::Lcm,
        ..Default::default()
    };
    let output = model
        .generate(
            &request,
            Some(expected.tensor("noise")),
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
    assert_close(
        "LCM run latents",
        &output.latents,
        expected.tensor("run_latents"),
        LATENT_TOLERANCE,
    );
    let reference: Vec<f32> = (expected.tensor("run_image") * 255.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let worst = output.images[0]
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&ours, &theirs)| (ours as f32 - theirs).abs())
        .fold(0.0f32, f32::max);
    check(worst <= 2.0, &format!("LCM pixels differ by {worst}/255"));
}
