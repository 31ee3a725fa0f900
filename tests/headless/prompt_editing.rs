//! A1111's prompt editing in the denoising loop (`[from:to:when]`, `[a|b]`): which text each
//! step is conditioned on, counted from 0 within a pass as A1111's sampler counts, and the
//! hires pass reading `when` after the first pass's steps. The parsing itself is checked
//! against A1111's own examples in `engine::prompt_schedule`.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::sync::atomic::AtomicBool;

use atelier::engine::init_image::HiresUpscaler;
use atelier::engine::pipeline::{
    GenerationRequest, HiresFix, JobInput, JobParts, PreviewOptions, StableDiffusion,
};
use atelier::schedulers::SchedulerKind;
use candle_core::{Device, Tensor};
use common::*;

fn request(prompt: &str, steps: usize) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        steps,
        width: 32,
        height: 32,
        seed: 11,
        scheduler: SchedulerKind::Ddim,
        ..Default::default()
    }
}

/// Each step's predicted clean latents, and the final latents.
fn trajectory(
    model: &StableDiffusion,
    request: &GenerationRequest,
    input: &JobInput<'_>,
) -> (Vec<Tensor>, Tensor) {
    let mut steps = Vec::new();
    let output = model
        .generate_with(
            request,
            input,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |step| steps.push(step.predicted_latents.clone()),
        )
        .unwrap();
    (steps, output.latents)
}

fn same(a: &Tensor, b: &Tensor) -> bool {
    relative_error(a, b) == 0.0
}

const TEXT: JobInput<'static> = JobInput::Text { init_noise: None };

#[test]
fn prompt_editing_switches_after_its_step() {
    let model = load_model("sd1");
    let (cat, cat_final) = trajectory(&model, &request("a cat", 5), &TEXT);
    let (_, dog_final) = trajectory(&model, &request("a dog", 5), &TEXT);
    for when in 0..=5 {
        let (edited, edited_final) =
            trajectory(&model, &request(&format!("[a cat:a dog:{when}]"), 5), &TEXT);
        // Steps 0..=when are conditioned on "a cat" (A1111: `step <= when`), the rest on "a
        // dog"; `when` 0 means "a dog" throughout.
        for step in 0..5 {
            let on_cat = when > 0 && step <= when;
            assert_eq!(
                same(&edited[step], &cat[step]),
                on_cat,
                "when {when}, step {step}: conditioned on the cat: {on_cat}"
            );
            if !on_cat {
                break; // later steps start from a different state anyway
            }
        }
        // Steps are 0..=4: `when` 4 covers them all, as in A1111.
        let expected_final = match when {
            0 => Some(&dog_final),
            4 | 5 => Some(&cat_final),
            _ => None,
        };
        match expected_final {
            Some(expected) => assert!(same(&edited_final, expected), "when {when}"),
            None => {
                assert!(!same(&edited_final, &cat_final), "when {when}");
                assert!(!same(&edited_final, &dog_final), "when {when}");
            }
        }
    }
    // A fraction of the steps: 0.5 of 5 steps is step 2.
    let (_, half) = trajectory(&model, &request("[a cat:a dog:0.5]", 5), &TEXT);
    let (_, two) = trajectory(&model, &request("[a cat:a dog:2]", 5), &TEXT);
    assert!(same(&half, &two));
    // Added text ([to:when]) and the negative prompt's editing.
    let (_, added) = trajectory(&model, &request("a cat[ in the snow:10]", 5), &TEXT);
    assert!(
        same(&added, &cat_final),
        "`when` past the last step: never added"
    );
    let mut negative = request("a cat", 5);
    negative.negative_prompt = "[blurry:dark:9]".into();
    let (_, negative) = trajectory(&model, &negative, &TEXT);
    assert!(same(&negative, &cat_final));
}

#[test]
fn alternation_changes_the_prompt_every_step() {
    let model = load_model("sd1");
    let (cat, _) = trajectory(&model, &request("a cat", 4), &TEXT);
    let (alternating, _) = trajectory(&model, &request("a [cat|dog]", 4), &TEXT);
    // A1111: steps 0 and 1 read the first option ("a cat"), step 2 the second.
    assert!(same(&alternating[0], &cat[0]));
    assert!(same(&alternating[1], &cat[1]));
    assert!(!same(&alternating[2], &cat[2]));
    // A prompt without editing is untouched by all of this.
    let (plain, _) = trajectory(&model, &request("a [cat]", 4), &TEXT);
    let (plain_again, _) = trajectory(&model, &request("a [cat]", 4), &TEXT);
    assert!(same(&plain[3], &plain_again[3]));
    assert!(
        !same(&plain[0], &cat[0]),
        "[cat] is de-emphasis, not editing"
    );
}

#[test]
fn image_to_image_counts_steps_from_its_first_step() {
    let model = load_model("sd1");
    let pixels = Tensor::rand(-1f32, 1f32, (1, 3, 32, 32), &Device::Cpu).unwrap();
    let input = JobInput::Image {
        pixels: &pixels,
        strength: 0.5,
        sample_noise: None,
        noise: None,
    };
    // 6 steps at strength 0.5 run 3: steps 0, 1, 2 of this pass, all up to `when` 2.
    let (_, cat) = trajectory(&model, &request("a cat", 6), &input);
    let (_, edited) = trajectory(&model, &request("[a cat:a dog:2]", 6), &input);
    assert!(same(&edited, &cat));
    let (_, edited) = trajectory(&model, &request("[a cat:a dog:1]", 6), &input);
    assert!(!same(&edited, &cat));
}

#[test]
fn the_hires_pass_reads_when_after_the_first_pass() {
    let model = load_model("sd1");
    let hires = HiresFix {
        scale: 2.0,
        strength: 0.5,
        steps: Some(4),
        upscaler: HiresUpscaler::Latent,
    };
    let run = |prompt: &str| {
        model
            .run_job(
                &request(prompt, 4),
                JobParts {
                    image: None,
                    hires: Some(&hires),
                    noise: None,
                },
                PreviewOptions::default(),
                &AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap()
            .output
            .latents
    };
    // `when` 4 (all of the first pass's 4 steps) and 1.0 (all of it, as a fraction): the first
    // pass on "a cat", the hires pass on "a dog" (A1111: 4 - 4 and (1.0 - 1) x 4 steps).
    let integer = run("[a cat:a dog:4]");
    let fraction = run("[a cat:a dog:1.0]");
    assert!(same(&integer, &fraction));
    assert!(!same(&integer, &run("a cat")));
    assert!(!same(&integer, &run("a dog")));
    // 1.5: half-way through the hires pass.
    assert!(!same(&run("[a cat:a dog:1.5]"), &integer));
}

/// A1111's composable prompts: `uncond + sum(weight x scale x (cond_i - uncond))`.
#[test]
fn and_weighs_each_parts_guidance() {
    let model = load_model("sd1");
    let with_guidance = |prompt: &str, guidance_scale: f64| GenerationRequest {
        guidance_scale,
        ..request(prompt, 4)
    };
    let (_, cat) = trajectory(&model, &with_guidance("a cat", 7.5), &TEXT);
    // A weight multiplies the scale: `a cat:2` at 3.75 is `a cat` at 7.5, to the bit.
    let (_, doubled) = trajectory(&model, &with_guidance("a cat:2", 3.75), &TEXT);
    assert!(same(&doubled, &cat));
    // Two halves of the same prompt, and a part of weight 0, give the prompt alone (up to
    // rounding: the sums run in another order).
    let (_, halves) = trajectory(
        &model,
        &with_guidance("a cat :0.5 AND a cat:0.5", 7.5),
        &TEXT,
    );
    assert_close("two halves", &halves, &cat, 1e-5);
    let (_, zero) = trajectory(&model, &with_guidance("a cat AND a dog :0", 7.5), &TEXT);
    assert_close("a part of weight 0", &zero, &cat, 1e-5);
    let (_, both) = trajectory(&model, &with_guidance("a cat AND a dog", 7.5), &TEXT);
    assert!(relative_error(&both, &cat) > 1e-3);
    // Each part has its own editing; the negative prompt is not split.
    let (_, edited) = trajectory(
        &model,
        &with_guidance("[a cat:a dog:9] AND a dog :0", 7.5),
        &TEXT,
    );
    assert_close("edited part", &edited, &cat, 1e-5);
    // At guidance 1 a composable prompt still reads the negative prompt (A1111's formula):
    // `a cat:0.5` is half-way between the negative prompt's prediction and the prompt's.
    let (_, plain) = trajectory(&model, &with_guidance("a cat", 1.0), &TEXT);
    let (_, half) = trajectory(&model, &with_guidance("a cat:0.5", 1.0), &TEXT);
    assert!(relative_error(&half, &plain) > 1e-3);
    // A prompt of another chunk count than the others runs on its own.
    let long = format!("a cat AND {}", "fox ".repeat(80));
    let (_, long) = trajectory(&model, &with_guidance(&long, 7.5), &TEXT);
    assert!(relative_error(&long, &cat) > 1e-3);
}

#[test]
fn and_on_a_model_without_guidance_says_why() {
    let model = load_model("lcm");
    let error = model
        .generate(
            &request("a cat AND a dog", 2),
            None,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .err()
        .expect("refused")
        .to_string();
    assert!(error.contains("classifier-free guidance"), "{error}");
    // Without `AND` it runs.
    model
        .generate(
            &request("a cat", 2),
            None,
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
}

/// The prompt box's count: with prompt editing or `AND`, the longest text any part takes (the
/// syntax itself is not counted), as A1111's `get_prompt_lengths`.
#[test]
fn the_token_count_is_the_longest_texts() {
    let model = load_model("sd1");
    let count = model.token_counter();
    let plain = count("a red fox");
    assert_eq!(count("a [red fox:cat:5]"), plain);
    assert_eq!(count("a [red fox|cat]"), plain);
    assert_eq!(count("a red fox AND a cat:0.5"), plain);
    assert_eq!(count("a [red fox]"), plain, "emphasis is not counted");
    assert!(count(&format!("a cat AND {}", "fox ".repeat(80))) > 75);
}
