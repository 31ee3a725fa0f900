//! Single-file checkpoints: what a file is, from its header (family, inpainting, v-prediction,
//! what is baked in), pickles refused with a reason, `atelier models scan`, and `--model FILE`
//! saying what the file is.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;
use std::process::Command;

use atelier::engine::checkpoint::{CheckpointFamily, inspect};

/// Writes a safetensors file of zero-filled f16 tensors with these names and shapes.
fn write_checkpoint(path: &Path, tensors: &[(&str, &[usize])]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut json = serde_json::to_vec(&header).unwrap();
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&json);
    file.resize(file.len() + offset, 0);
    std::fs::write(path, file).unwrap();
}

const UNET: &str = "model.diffusion_model.";

fn unet(conv_in_channels: usize, context: usize, sdxl: bool) -> Vec<(String, Vec<usize>)> {
    let mut tensors = vec![
        (
            format!("{UNET}input_blocks.0.0.weight"),
            vec![320, conv_in_channels, 3, 3],
        ),
        (
            format!(
                "{UNET}input_blocks.{}.1.transformer_blocks.0.attn2.to_k.weight",
                if sdxl { 4 } else { 1 }
            ),
            vec![if sdxl { 640 } else { 320 }, context],
        ),
    ];
    if sdxl {
        tensors.push((format!("{UNET}label_emb.0.0.weight"), vec![1280, 8]));
    }
    tensors
}

fn write(path: &Path, mut tensors: Vec<(String, Vec<usize>)>, extra: &[(&str, &[usize])]) {
    tensors.extend(extra.iter().map(|(n, s)| (n.to_string(), s.to_vec())));
    let borrowed: Vec<(&str, &[usize])> = tensors
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    write_checkpoint(path, &borrowed);
}

#[test]
fn families_and_variants_from_keys_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let sd1 = dir.path().join("dreamy_v1.safetensors");
    write(
        &sd1,
        unet(4, 768, false),
        &[
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            ("first_stage_model.decoder.conv_in.weight", &[512, 4, 3, 3]),
            ("model_ema.decay", &[1]),
        ],
    );
    let info = inspect(&sd1).unwrap();
    assert_eq!(info.family, CheckpointFamily::Sd1);
    assert!(!info.inpainting && info.has_vae && info.has_text_encoders && info.has_ema);
    assert_eq!(info.dtype.as_deref(), Some("F16"));

    let sd2_inpaint = dir.path().join("sd2-inpainting.safetensors");
    write(
        &sd2_inpaint,
        unet(9, 1024, false),
        &[(
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
            &[3072, 8],
        )],
    );
    let info = inspect(&sd2_inpaint).unwrap();
    assert_eq!(
        (info.family, info.inpainting),
        (CheckpointFamily::Sd2, true)
    );

    let sdxl = dir.path().join("someModelXL_v9.safetensors");
    write(
        &sdxl,
        unet(4, 2048, true),
        &[
            (
                "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                &[768],
            ),
            (
                "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
                &[3840, 8],
            ),
            ("v_pred", &[1]),
        ],
    );
    let info = inspect(&sdxl).unwrap();
    assert_eq!(info.family, CheckpointFamily::Sdxl);
    assert_eq!(info.v_prediction, Some(true));
    assert!(!info.has_vae && info.has_text_encoders);
    assert!(
        info.summary()
            .starts_with("SDXL, v-prediction, f16, text encoders baked in")
    );

    // The SDXL UNet alone (no text encoders): its shapes still tell.
    let unet_only = dir.path().join("xl-unet.safetensors");
    write(&unet_only, unet(4, 2048, true), &[]);
    assert_eq!(inspect(&unet_only).unwrap().family, CheckpointFamily::Sdxl);
    let refiner = dir.path().join("refiner.safetensors");
    write(
        &refiner,
        unet(4, 1280, true),
        &[(
            "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight",
            &[3840, 8],
        )],
    );
    assert_eq!(
        inspect(&refiner).unwrap().family,
        CheckpointFamily::SdxlRefiner
    );

    let flux = dir.path().join("flux1-dev.safetensors");
    write(
        &flux,
        vec![],
        &[("double_blocks.0.img_attn.norm.key_norm.scale", &[128])],
    );
    assert_eq!(inspect(&flux).unwrap().family, CheckpointFamily::Flux);
    let lora = dir.path().join("inkStyle.safetensors");
    write(
        &lora,
        vec![],
        &[("lora_unet_down_blocks_0_attentions_0_proj_in.alpha", &[1])],
    );
    assert_eq!(inspect(&lora).unwrap().family, CheckpointFamily::Unknown);

    // Not safetensors at all, or a header that lies about its length: refused, not read.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
    assert!(
        inspect(&junk)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors file")
    );
    let pickle = dir.path().join("old.ckpt");
    std::fs::write(&pickle, b"PK\x03\x04").unwrap();
    assert!(
        inspect(&pickle)
            .unwrap_err()
            .to_string()
            .contains("arbitrary code")
    );
}

#[test]
fn models_scan_lists_a_folder_and_model_files_say_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("models").join("Stable-diffusion");
    std::fs::create_dir_all(&checkpoints).unwrap();
    let sdxl = checkpoints.join("someModelXL_v9.safetensors");
    write(&sdxl, unet(4, 2048, true), &[]);
    std::fs::write(checkpoints.join("old.ckpt"), b"PK").unwrap();
    std::fs::write(checkpoints.join("notes.txt"), b"hello").unwrap();
    let atelier = || Command::new(env!("CARGO_BIN_EXE_atelier"));
    let output = atelier()
        .args(["models", "scan", "--hash"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("models/Stable-diffusion/someModelXL_v9.safetensors: SDXL, f16, UNet only"),
        "{stdout}"
    );
    assert!(stdout.contains("old.ckpt: a Python pickle"), "{stdout}");
    assert!(!stdout.contains("notes.txt"));
    let hash = atelier::gallery::worker::file_hash(&sdxl).unwrap();
    assert!(stdout.contains(&format!("[{hash}]")), "{stdout}");
    // `generate --model FILE` with a file that lacks parts says what is missing.
    let output = atelier()
        .args(["generate", "--prompt", "a fox", "--out"])
        .arg(dir.path().join("out.png"))
        .arg("--model")
        .arg(&sdxl)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no text encoders baked in: choose where SDXL text encoders come from"),
        "{stderr}"
    );
}

#[test]
fn models_list_reads_an_a1111_installation() {
    let dir = tempfile::tempdir().unwrap();
    let webui = dir.path().join("webui");
    for sub in [
        "models/Stable-diffusion",
        "models/Lora",
        "models/VAE",
        "embeddings",
    ] {
        std::fs::create_dir_all(webui.join(sub)).unwrap();
    }
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (from, to) in [
        (
            "single-file/sd2-v.safetensors",
            "models/Stable-diffusion/tiny2.safetensors",
        ),
        (
            "single-file/sd2-v.yaml",
            "models/Stable-diffusion/tiny2.yaml",
        ),
        ("lora/sd1-loha.safetensors", "models/Lora/ink.safetensors"),
        ("single-file/vae.safetensors", "models/VAE/mse.safetensors"),
        (
            "embeddings/inkStyle.safetensors",
            "embeddings/inkStyle.safetensors",
        ),
    ] {
        std::fs::copy(fixtures.join(from), webui.join(to)).unwrap();
    }
    let output = Command::new(env!("CARGO_BIN_EXE_atelier"))
        .args(["models", "list"])
        .arg(&webui)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("tiny2.safetensors: SD 2.x, v-prediction, bf16"),
        "{stdout}"
    );
    assert!(stdout.contains("LoRAs (1): ink"), "{stdout}");
    assert!(stdout.contains("VAEs (1): mse"), "{stdout}");
    assert!(stdout.contains("embeddings (1): inkStyle"), "{stdout}");
}
