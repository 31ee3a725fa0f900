//! LoRA and LyCORIS against diffusers (`tests/fixtures/lora/`, written by
//! `scripts/make_lora_fixture.py`): kohya (with conv LoRA and text encoder parts), PEFT, LoHa,
//! LoKr on the SD 1.x fixture, kohya's SGM-named SDXL LoRA on the SDXL fixture; two at once, one
//! negative; exact restore; the prompt's `<lora:name:w>`; refusals.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use atelier::engine::lora::{LoraCache, LoraFile, LoraWeight};
use atelier::engine::pipeline::{GenerationRequest, PreviewOptions, StableDiffusion};
use atelier::schedulers::SchedulerKind;
use candle_core::{Device, Tensor};
use common::*;

fn folder() -> PathBuf {
    common::fixture_dir("lora")
}

fn fixture() -> (HashMap<String, Tensor>, serde_json::Value) {
    let tensors =
        candle_core::safetensors::load(folder().join("expected.safetensors"), &Device::Cpu)
            .unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(folder().join("expected.json")).unwrap())
            .unwrap();
    (tensors, meta)
}

fn request(meta: &serde_json::Value, prompt: &str) -> GenerationRequest {
    GenerationRequest {
        prompt: prompt.into(),
        negative_prompt: meta["negative_prompt"].as_str().unwrap().into(),
        steps: meta["steps"].as_u64().unwrap() as usize,
        guidance_scale: meta["guidance"].as_f64().unwrap(),
        width: meta["width"].as_u64().unwrap() as usize,
        height: meta["height"].as_u64().unwrap() as usize,
        scheduler: SchedulerKind::parse(meta["sampler"].as_str().unwrap()).unwrap(),
        ..Default::default()
    }
}

fn latents(model: &StableDiffusion, request: &GenerationRequest, noise: &Tensor) -> Tensor {
    model
        .generate(
            request,
            Some(noise),
            PreviewOptions::default(),
            &AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap()
        .latents
}

fn lora(file: &str, weight: f64) -> LoraWeight {
    LoraWeight::new(
        Arc::new(LoraFile::open(&folder().join(file)).unwrap()),
        weight,
    )
}

#[test]
fn loras_match_diffusers_and_come_off_exactly() {
    let (tensors, meta) = fixture();
    let prompt = meta["prompt"].as_str().unwrap();
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut plain: HashMap<String, Tensor> = HashMap::new();
    for run in meta["runs"].as_array().unwrap() {
        let family = run["model"].as_str().unwrap();
        let key = run["key"].as_str().unwrap();
        let noise = &tensors[&format!("{family}_noise")];
        let model = models
            .entry(family.to_string())
            .or_insert_with(|| load_model(family));
        plain
            .entry(family.to_string())
            .or_insert_with(|| latents(model, &request(&meta, prompt), noise));
        let loras: Vec<LoraWeight> = run["loras"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| lora(l["file"].as_str().unwrap(), l["weight"].as_f64().unwrap()))
            .collect();
        let report = model.set_loras(&loras).unwrap();
        assert!(report.warnings.is_empty(), "{key}: {:?}", report.warnings);
        assert!(report.applied.iter().all(|(_, n)| *n > 0));
        let ours = latents(model, &request(&meta, prompt), noise);
        let expected = &tensors[&format!("{key}_latents")];
        assert_close(&format!("{key} latents"), &ours, expected, 1e-3);
        // The LoRA changed the picture (the comparison above means something).
        let change = relative_error(expected, &plain[family]);
        assert!(
            change > 1e-2,
            "{key}: the LoRA barely changes the latents ({change:.1e})"
        );
    }
    // Taking them off restores the model bit for bit.
    for (family, model) in &mut models {
        model.set_loras(&[]).unwrap();
        assert!(model.active_loras().is_empty());
        let again = latents(
            model,
            &request(&meta, prompt),
            &tensors[&format!("{family}_noise")],
        );
        assert_eq!(relative_error(&again, &plain[family]), 0.0, "{family}");
    }
    assert_close(
        "sd1 without LoRA",
        &plain["sd1"],
        &tensors["sd1_plain"],
        1e-3,
    );
}

#[test]
fn prompt_tags_name_loras_in_the_lora_folders() {
    let (tensors, meta) = fixture();
    let prompt = meta["prompt"].as_str().unwrap();
    let mut model = load_model("sd1");
    let mut cache = LoraCache::default();
    let tagged = format!("{prompt} <lora:sd1-kohya:0.8>");
    let (loras, warnings) = cache.resolve(&tagged, &[folder()], &[]).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    model.set_loras(&loras).unwrap();
    // The tag is not text: the prompt encodes as without it.
    let ours = latents(&model, &request(&meta, &tagged), &tensors["sd1_noise"]);
    assert_close(
        "<lora:sd1-kohya:0.8>",
        &ours,
        &tensors["sd1_kohya_latents"],
        1e-3,
    );
    let (loras, warnings) = cache
        .resolve("a fox <lora:missing:1>", &[folder()], &[])
        .unwrap();
    assert!(loras.is_empty());
    assert!(
        warnings[0].contains("no missing.safetensors"),
        "{warnings:?}"
    );
    assert!(
        cache
            .resolve("<lora:sd1-kohya:lots>", &[folder()], &[])
            .is_err()
    );
}

#[test]
fn a_lora_of_another_family_is_refused_and_changes_nothing() {
    let (tensors, meta) = fixture();
    let prompt = meta["prompt"].as_str().unwrap();
    let mut model = load_model("sd1");
    let before = latents(&model, &request(&meta, prompt), &tensors["sd1_noise"]);
    let error = model
        .set_loras(&[
            lora("sd1-kohya.safetensors", 0.5),
            lora("sdxl-kohya.safetensors", 1.0),
        ])
        .unwrap_err()
        .to_string();
    assert!(error.contains("sdxl-kohya"), "{error}");
    assert!(error.contains("SDXL"), "{error}");
    assert!(error.contains("nothing was applied"), "{error}");
    assert!(model.active_loras().is_empty());
    let after = latents(&model, &request(&meta, prompt), &tensors["sd1_noise"]);
    assert_eq!(relative_error(&after, &before), 0.0);
}

#[test]
fn keys_that_match_nothing_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(folder().join("sd1-peft.safetensors"), &Device::Cpu)
            .unwrap();
    let extra = Tensor::zeros((4, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
    tensors.insert("unet.nowhere.to_q.lora_A.weight".into(), extra.clone());
    tensors.insert("unet.nowhere.to_q.lora_B.weight".into(), extra.t().unwrap());
    tensors.insert("something_else".into(), extra);
    let path = dir.path().join("odd.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let file = LoraFile::open(&path).unwrap();
    assert_eq!(file.unknown_keys, vec!["something_else".to_string()]);
    let mut model = load_model("sd1");
    let report = model
        .set_loras(&[LoraWeight::new(Arc::new(file), 1.0)])
        .unwrap();
    assert_eq!(report.warnings.len(), 2, "{:?}", report.warnings);
    assert!(
        report.warnings[0].contains("1 of its"),
        "{:?}",
        report.warnings
    );
    assert!(report.warnings[0].contains("unet.nowhere.to_q"));
    // Not a LoRA at all.
    let not_lora = dir.path().join("vae.safetensors");
    std::fs::copy(
        fixture_dir("single-file").join("vae.safetensors"),
        &not_lora,
    )
    .unwrap();
    let error = LoraFile::open(&not_lora).unwrap_err().to_string();
    assert!(error.contains("not a LoRA"), "{error}");
}

#[test]
fn the_cli_applies_loras_from_flags_and_tags_and_records_their_hashes() {
    let dir = tempfile::tempdir().unwrap();
    // An A1111 layout: the tag finds models/Lora/<name>.safetensors in a subfolder.
    let webui = dir.path().join("webui");
    std::fs::create_dir_all(webui.join("models/Lora/styles")).unwrap();
    std::fs::copy(
        folder().join("sd1-loha.safetensors"),
        webui.join("models/Lora/styles/ink.safetensors"),
    )
    .unwrap();
    let out = dir.path().join("fox.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["generate", "--prompt", "a fox <lora:ink:0.5> <lora:gone:1>"])
        .args([
            "--steps", "2", "--width", "32", "--height", "32", "--device", "cpu",
        ])
        .arg("--model")
        .arg(model_dir("sd1"))
        .arg("--lora")
        .arg(format!(
            "{}:-0.3",
            folder().join("sd1-kohya.safetensors").display()
        ))
        .arg("--lora-dir")
        .arg(&webui)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("LoRA sd1-kohya:"), "{stderr}");
    assert!(stderr.contains("LoRA ink:"), "{stderr}");
    assert!(
        stderr.contains("<lora:gone>: no gone.safetensors"),
        "{stderr}"
    );
    let text = atelier::gallery::png_read::read_text_bounded(&out).unwrap();
    let parameters = text.chunks["parameters"].clone();
    let kohya_hash =
        atelier::engine::lora::addnet_hash(&folder().join("sd1-kohya.safetensors")).unwrap();
    assert!(
        parameters.contains(&format!("Lora hashes: \"sd1-kohya: {kohya_hash}, ink: ")),
        "{parameters}"
    );
    assert!(
        parameters.starts_with("a fox <lora:ink:0.5> <lora:gone:1>"),
        "{parameters}"
    );
}

#[test]
fn diffusers_first_lora_format_names_attention_processors() {
    // The PEFT fixture's UNet part, renamed to `….processor.to_q_lora.down.weight`.
    let dir = tempfile::tempdir().unwrap();
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(folder().join("sd1-peft.safetensors"), &Device::Cpu)
            .unwrap();
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(key, tensor)| {
            let key = key
                .replace(".lora_A.weight", "_lora.down.weight")
                .replace(".lora_B.weight", "_lora.up.weight")
                .replace(".to_out.0_lora", ".to_out_lora");
            let key = ["to_q", "to_k", "to_v", "to_out"]
                .iter()
                .fold(key, |key, p| {
                    key.replace(&format!(".{p}_lora"), &format!(".processor.{p}_lora"))
                });
            (key, tensor)
        })
        .collect();
    assert!(
        renamed
            .keys()
            .any(|k| k.ends_with("attn1.processor.to_out_lora.up.weight"))
    );
    let path = dir.path().join("old.safetensors");
    candle_core::safetensors::save(&renamed, &path).unwrap();
    let old = LoraFile::open(&path).unwrap();
    let new = LoraFile::open(&folder().join("sd1-peft.safetensors")).unwrap();
    let mut model = load_model("sd1");
    let old_report = model
        .set_loras(&[LoraWeight::new(Arc::new(old), -0.5)])
        .unwrap();
    assert!(old_report.warnings.is_empty(), "{:?}", old_report.warnings);
    let new_report = model
        .set_loras(&[LoraWeight::new(Arc::new(new), -0.5)])
        .unwrap();
    assert_eq!(old_report.applied[0].1, new_report.applied[0].1);
}
