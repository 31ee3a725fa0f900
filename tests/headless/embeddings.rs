//! Textual inversion against diffusers' `load_textual_inversion` (`tests/fixtures/embeddings/`,
//! written by `scripts/make_embedding_fixture.py`): kohya `emb_params` (2 vectors) and a
//! diffusers single-token file on SD 1.x, SDXL `clip_l`/`clip_g` (3 vectors), in the prompt and
//! the negative prompt.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use atelier::engine::embeddings::{EmbeddingCache, TextualInversion};
use atelier::engine::pipeline::{GenerationRequest, PreviewOptions, StableDiffusion};
use atelier::schedulers::SchedulerKind;
use candle_core::{Device, Tensor};
use common::*;

fn folder() -> PathBuf {
    common::fixture_dir("embeddings")
}

fn generate(model: &StableDiffusion, prompt: &str, negative: &str, noise: &Tensor) -> Tensor {
    let request = GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: negative.into(),
        steps: 6,
        guidance_scale: 6.0,
        width: 32,
        height: 32,
        scheduler: SchedulerKind::parse("euler").unwrap(),
        ..Default::default()
    };
    model
        .generate(
            &request,
            Some(noise),
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap()
        .latents
}

#[test]
fn embeddings_match_diffusers() {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(folder().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("expected.json")).unwrap())
            .unwrap();
    let (embeddings, warnings) = EmbeddingCache::default().load_folders(&[folder()]);
    assert_eq!(embeddings.len(), 3, "{warnings:?}");
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    for run in meta["runs"].as_array().unwrap() {
        let family = run["model"].as_str().unwrap();
        let model = models.entry(family.to_string()).or_insert_with(|| {
            let mut model = load_model(family);
            let warnings = model.set_embeddings(embeddings.clone());
            let asked = atelier::engine::embeddings::warnings_for_prompts(&warnings, &["xlGlow"]);
            assert_eq!(asked.len(), usize::from(family == "sd1"), "{asked:?}");
            // The SD 1.x files do not fit SDXL and the SDXL one does not fit SD 1.x.
            assert_eq!(
                warnings.len(),
                if family == "sdxl" { 2 } else { 1 },
                "{warnings:?}"
            );
            model
        });
        let key = run["key"].as_str().unwrap();
        let ours = generate(
            model,
            run["prompt"].as_str().unwrap(),
            run["negative_prompt"].as_str().unwrap(),
            &tensors[&format!("{family}_noise")],
        );
        assert_close(
            &format!("{key} latents"),
            &ours,
            &tensors[&format!("{key}_latents")],
            1e-3,
        );
    }
    let sd1 = &models["sd1"];
    let used = sd1.embeddings_in("softFocus portrait, (InkStyle:1.2), inkstyles");
    let names: Vec<&str> = used.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["softFocus", "inkStyle"]);
    assert_eq!(used[0].1.len(), 12);
}

#[test]
fn an_embedding_takes_one_position_per_vector() {
    let mut model = load_model("sd1");
    let ink = TextualInversion::open(&folder().join("inkStyle.safetensors")).unwrap();
    assert_eq!(ink.positions(), 2);
    let plain = model.encode_prompt("a fox").unwrap().context;
    model.set_embeddings(vec![std::sync::Arc::new(ink)]);
    let with = model.encode_prompt("a fox inkStyle").unwrap().context;
    assert_eq!(plain.dims(), with.dims(), "one chunk either way");
    assert!(relative_error(&with, &plain) > 1e-3);
    // Its first vector alone under the same name encodes differently: both vectors were used.
    let dir = tempfile::tempdir().unwrap();
    let ink = TextualInversion::open(&folder().join("inkStyle.safetensors")).unwrap();
    let first = ink.vectors[0].narrow(0, 0, 1).unwrap();
    let single = dir.path().join("inkStyle.safetensors");
    candle_core::safetensors::save(&HashMap::from([("emb_params".to_string(), first)]), &single)
        .unwrap();
    model.set_embeddings(vec![std::sync::Arc::new(
        TextualInversion::open(&single).unwrap(),
    )]);
    let one_vector = model.encode_prompt("a fox inkStyle").unwrap().context;
    assert!(relative_error(&one_vector, &with) > 1e-3);
}

#[test]
fn pickled_and_foreign_files_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("old.pt"), b"PK").unwrap();
    let mut other = HashMap::new();
    other.insert(
        "a".to_string(),
        Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    other.insert(
        "b".to_string(),
        Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&other, dir.path().join("two.safetensors")).unwrap();
    let (found, warnings) = EmbeddingCache::default().load_folders(&[dir.path().to_path_buf()]);
    assert!(found.is_empty());
    assert_eq!(warnings.len(), 2, "{warnings:?}");
    assert!(warnings.iter().any(|w| w.contains("pickle")));
    assert!(warnings.iter().any(|w| w.contains("not an embedding")));
}

#[test]
fn the_cli_reads_an_embeddings_folder_and_records_ti_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fox.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args([
            "generate",
            "--prompt",
            "a fox, inkStyle",
            "--negative-prompt",
            "xlGlow",
        ])
        .args([
            "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu",
        ])
        .arg("--model")
        .arg(model_dir("sd1"))
        .arg("--embeddings")
        .arg(folder())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    // The SDXL embedding does not fit SD 1.x: said because the negative prompt names it.
    assert!(stderr.contains("embedding xlGlow"), "{stderr}");
    let text = atelier::gallery::png_read::read_text_bounded(&out).unwrap();
    let hash = atelier::engine::embeddings::file_short_hash(&folder().join("inkStyle.safetensors"))
        .unwrap();
    let parameters = &text.chunks["parameters"];
    assert!(
        parameters.contains(&format!("TI hashes: \"inkStyle: {hash}\"")),
        "{parameters}"
    );
}
