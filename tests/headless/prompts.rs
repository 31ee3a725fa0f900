//! Prompts as AUTOMATIC1111 reads them, against its algorithm run on transformers' CLIP by
//! `scripts/make_prompt_fixture.py` (emphasis, nesting, escapes, BREAK, 200 tokens, the comma
//! backtrack, an empty prompt), on the SD 1.x, 2.x and XL fixture text encoders.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::*;

fn fixture() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let tensors =
        candle_core::safetensors::load(dir.join("prompts.safetensors"), &Device::Cpu).unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join("prompts.json")).unwrap()).unwrap();
    (tensors, meta)
}

#[test]
fn prompt_embeddings_match_a1111s_algorithm() {
    let (tensors, meta) = fixture();
    let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
    for family in ["sd1", "sd2", "sdxl"] {
        let model = load_model(family);
        let counts: Vec<usize> =
            serde_json::from_value(meta["families"][family]["chunks"].clone()).unwrap();
        for (i, prompt) in prompts.iter().enumerate() {
            let chunks = model.prompt_chunks(prompt).unwrap();
            assert_eq!(chunks[0].len(), counts[i], "{family} chunks of {prompt:?}");
            let ours = model.encode_prompt(prompt).unwrap();
            let want = &tensors[&format!("{family}/{i}/context")];
            assert_eq!(ours.context.dims(), want.dims(), "{family} {prompt:?}");
            let error = relative_error(&ours.context, want);
            check(
                error < 1e-5,
                &format!("{family} {prompt:?}: relative error {error:.2e}"),
            );
            if family == "sdxl" {
                let pooled = &tensors[&format!("{family}/{i}/pooled")];
                let error = relative_error(ours.pooled.as_ref().unwrap(), pooled);
                check(
                    error < 1e-5,
                    &format!("{family} pooled {prompt:?}: relative error {error:.2e}"),
                );
            }
        }
    }
}

#[test]
fn clip_skip_reads_an_earlier_layer_through_the_final_norm() {
    let (tensors, meta) = fixture();
    let prompts: Vec<String> = serde_json::from_value(meta["prompts"].clone()).unwrap();
    let which: Vec<usize> = serde_json::from_value(meta["clip_skip_prompts"].clone()).unwrap();
    let model = load_model("sd1");
    for i in which {
        for skip in [2, 3] {
            let ours = model.encode_prompt_with(&prompts[i], skip).unwrap();
            let want = &tensors[&format!("sd1/{i}/clip_skip_{skip}")];
            let error = relative_error(&ours.context, want);
            check(
                error < 1e-5,
                &format!(
                    "clip skip {skip} on {:?}: relative error {error:.2e}",
                    prompts[i]
                ),
            );
        }
    }
    // Beyond the encoder's layers (the fixture has 3) is refused, not clamped.
    assert!(model.encode_prompt_with("a fox", 4).is_err());
    // SD 2.x and SDXL read their penultimate layer whatever clip skip says (A1111's default).
    for family in ["sd2", "sdxl"] {
        let model = load_model(family);
        let plain = model.encode_prompt("a fox").unwrap();
        let skipped = model.encode_prompt_with("a fox", 2).unwrap();
        assert_eq!(relative_error(&plain.context, &skipped.context), 0.0);
    }
}
