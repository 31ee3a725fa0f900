//! End to end: the `atelier` binary on a fixture model, checked against diffusers.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::common;

use std::process::Command;

use atelier::gallery::metadata::{A1111Parameters, read_png_text};
use candle_core::Tensor;
use common::*;

fn atelier() -> Command {
    Command::new(env!("CARGO_BIN_EXE_atelier"))
}

/// Fails the test with the command's stderr unless it succeeded.
fn assert_success(output: &std::process::Output) {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// `atelier generate` on the SD 1.x fixture, on the CPU, prompt "a fox", 3 steps, plus `extra`;
/// it must succeed.
fn generate_sd1(out: &std::path::Path, extra: &[&str]) {
    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd1"))
        .args(["--prompt", "a fox", "--steps", "3", "--device", "cpu"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert_success(&output);
}

#[test]
fn generate_reproduces_diffusers_from_the_same_noise() {
    let dir = tempfile::tempdir().unwrap();
    let expected = Expected::load("sd2");
    let run = &expected.meta["run"];
    let noise_path = dir.path().join("noise.npy");
    expected.tensor("noise").write_npy(&noise_path).unwrap();
    let latents_path = dir.path().join("latents.npy");
    let out = dir.path().join("fox.png");
    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd2"))
        .args(["--prompt", expected.meta["prompt"].as_str().unwrap()])
        .args([
            "--negative-prompt",
            expected.meta["negative_prompt"].as_str().unwrap(),
        ])
        .args(["--steps", &run["steps"].to_string()])
        .args(["--guidance", &run["guidance"].to_string()])
        .args(["--width", &run["width"].to_string()])
        .args(["--height", &run["height"].to_string()])
        .args(["--scheduler", "euler", "--device", "cpu"])
        .arg("--init-noise")
        .arg(&noise_path)
        .arg("--save-latents")
        .arg(&latents_path)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "atelier failed: {stderr}");
    assert!(stderr.contains("ms/step"), "no timing summary in: {stderr}");

    let latents = Tensor::read_npy(&latents_path).unwrap();
    assert_close(
        "CLI latents",
        &latents,
        expected.tensor("run_euler_neg_latents"),
        1e-3,
    );

    let image = image::open(&out).unwrap().to_rgb8();
    assert_eq!(
        (image.width() as u64, image.height() as u64),
        (
            run["width"].as_u64().unwrap(),
            run["height"].as_u64().unwrap()
        )
    );
    let reference = expected.tensor("run_euler_neg_image");
    let reference: Vec<f32> = reference.flatten_all().unwrap().to_vec1().unwrap();
    let worst = image
        .as_raw()
        .iter()
        .zip(&reference)
        .map(|(&ours, &theirs)| (ours as f32 - theirs * 255.0).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 2.0, "pixels differ by {worst}/255");

    let chunks = read_png_text(&out).unwrap();
    let parameters = A1111Parameters::parse(&chunks["parameters"]);
    assert_eq!(parameters.prompt, expected.meta["prompt"].as_str().unwrap());
    assert_eq!(
        parameters.negative_prompt,
        expected.meta["negative_prompt"].as_str().unwrap()
    );
    assert_eq!(parameters.get("Sampler"), Some("Euler"));
    assert_eq!(
        parameters.get("Steps"),
        Some(run["steps"].to_string().as_str())
    );
    assert_eq!(parameters.get("Size"), Some("48x64"));
    assert_eq!(parameters.get("Initial noise"), Some("noise.npy"));
}

/// The bar for the full pipeline: `atelier generate` from diffusers' noise ends at
/// diffusers' latents with every scheduler of the fixture runs (11 of them for SD 2.x).
#[test]
fn generate_reproduces_diffusers_with_every_fixture_scheduler() {
    let dir = tempfile::tempdir().unwrap();
    let expected = Expected::load("sd2");
    let run = &expected.meta["run"];
    let noise_path = dir.path().join("noise.npy");
    expected.tensor("noise").write_npy(&noise_path).unwrap();
    let mut checked = Vec::new();
    for entry in expected.meta["runs"].as_array().unwrap() {
        if !entry["negative_prompt"].as_bool().unwrap() {
            continue;
        }
        let scheduler = entry["scheduler"].as_str().unwrap();
        let key = entry["key"].as_str().unwrap();
        let latents_path = dir.path().join(format!("{key}.npy"));
        let output = atelier()
            .args(["generate", "--model"])
            .arg(model_dir("sd2"))
            .args(["--prompt", expected.meta["prompt"].as_str().unwrap()])
            .args([
                "--negative-prompt",
                expected.meta["negative_prompt"].as_str().unwrap(),
            ])
            .args(["--steps", &run["steps"].to_string()])
            .args(["--guidance", &run["guidance"].to_string()])
            .args(["--width", &run["width"].to_string()])
            .args(["--height", &run["height"].to_string()])
            .args(["--scheduler", scheduler, "--device", "cpu"])
            .arg("--init-noise")
            .arg(&noise_path)
            .arg("--save-latents")
            .arg(&latents_path)
            .arg("--out")
            .arg(dir.path().join(format!("{key}.png")))
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{scheduler}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_close(
            &format!("CLI latents with {scheduler}"),
            &Tensor::read_npy(&latents_path).unwrap(),
            expected.tensor(&format!("run_{key}_latents")),
            1e-3,
        );
        checked.push(scheduler.to_string());
    }
    assert!(checked.len() >= 8, "only {checked:?}");
}

#[test]
fn schedulers_command_prints_the_quality_map_and_plots_it() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("quality.png");
    let output = atelier()
        .args(["schedulers", "--samples", "500", "--plot"])
        .arg(&plot)
        .output()
        .unwrap();
    assert_success(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    for id in atelier::schedulers::Sampler::all_ids() {
        if !id.ends_with("-exponential") {
            assert!(
                table.lines().any(|l| l.starts_with(&format!("{id} "))),
                "{id} missing:\n{table}"
            );
        }
    }
    assert!(table.contains("50 evals"));
    let image = image::open(&plot).unwrap();
    assert!(image.width() > 600 && image.height() > 400);
    let refused = atelier()
        .args(["schedulers", "--samples", "5"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

/// The quality map's second view, on a real model: each sampler's distance to its own picture at
/// the reference steps, falling as the steps grow.
#[test]
fn schedulers_on_a_model_measure_the_distance_to_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let plot = dir.path().join("steps.png");
    let output = atelier()
        .args([
            "schedulers",
            "--on-model",
            "--model",
            "tests/fixtures/sd1/model",
            "--samplers",
            "dpmpp-2m-karras",
            "--seeds",
            "3",
            "--reference-steps",
            "60",
            "--device",
            "cpu",
            "--plot",
        ])
        .arg(&plot)
        .output()
        .unwrap();
    assert_success(&output);
    let table = String::from_utf8_lossy(&output.stdout);
    let line = table
        .lines()
        .find(|l| l.starts_with("dpmpp-2m-karras "))
        .unwrap_or_else(|| panic!("dpmpp-2m-karras missing:\n{table}"));
    let distances: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse().unwrap())
        .collect();
    assert_eq!(distances.len(), 6, "{line}");
    assert!(
        distances[5] < distances[0],
        "50 steps should be nearer the 60-step picture than 5: {line}"
    );
    let image = image::open(&plot).unwrap();
    assert!(image.width() > 600 && image.height() > 400);
    let refused = atelier()
        .args(["schedulers", "--on-model", "--reference-steps", "10"])
        .output()
        .unwrap();
    assert!(!refused.status.success());
}

#[test]
fn same_seed_same_image_and_batch_seeds_follow() {
    let dir = tempfile::tempdir().unwrap();
    let generate = |name: &str, seed: &str, batch: &str| {
        let out = dir.path().join(name);
        generate_sd1(&out, &["--seed", seed, "--batch-size", batch]);
        out
    };
    let first = generate("a.png", "7", "1");
    let again = generate("b.png", "7", "1");
    let other = generate("c.png", "8", "1");
    generate("batch.png", "7", "2");
    let pixels = |path: &std::path::Path| image::open(path).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&first), pixels(&again), "same seed, same image");
    assert_ne!(
        pixels(&first),
        pixels(&other),
        "another seed, another image"
    );
    // Image k of a batch is the image of seed + k on its own (up to float summation order
    // in batched matrix products: at most one level of 255).
    let max_diff =
        |a: Vec<u8>, b: Vec<u8>| a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    assert!(max_diff(pixels(&dir.path().join("batch-0.png")), pixels(&first)) <= 1);
    assert!(max_diff(pixels(&dir.path().join("batch-1.png")), pixels(&other)) <= 1);
    let chunks = read_png_text(&dir.path().join("batch-1.png")).unwrap();
    assert_eq!(
        A1111Parameters::parse(&chunks["parameters"]).get("Seed"),
        Some("8")
    );
}

#[test]
fn bad_arguments_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let model = model_dir("sd1");
    let model = model.to_str().unwrap();
    let out = out.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", "/no/such/folder", "--prompt", "x", "--out", out],
            "model folder not found",
        ),
        (
            vec![
                "--model",
                model,
                "--prompt",
                "x",
                "--scheduler",
                "dpm9",
                "--out",
                out,
            ],
            "dpmpp-2m-karras",
        ),
        (
            vec![
                "--model", model, "--prompt", "x", "--width", "63", "--out", out,
            ],
            "multiple of 2",
        ),
        (
            vec![
                "--model", model, "--prompt", "x", "--steps", "0", "--out", out,
            ],
            "steps must be between",
        ),
        (
            vec![
                "--model", model, "--prompt", "x", "--device", "tpu", "--out", out,
            ],
            "unknown device",
        ),
        (
            vec!["--model", model, "--prompt", "x", "--out", "/tmp/x.jpg"],
            "must name a .png",
        ),
        (
            vec![
                "--model",
                model,
                "--prompt",
                "x",
                "--init-noise",
                "/no/noise.npy",
                "--out",
                out,
            ],
            "cannot read",
        ),
    ];
    for (args, message) in cases {
        let output = atelier().arg("generate").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} should fail");
        assert!(
            stderr.contains(message),
            "{args:?}: expected {message:?} in {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
    assert!(!std::path::Path::new(out).exists());
}

#[test]
fn wrong_noise_shape_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let noise = dir.path().join("noise.npy");
    Tensor::zeros(
        (1, 4, 5, 5),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .write_npy(&noise)
    .unwrap();
    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd1"))
        .args(["--prompt", "x", "--out"])
        .arg(dir.path().join("x.png"))
        .arg("--init-noise")
        .arg(&noise)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("initial noise has shape [1, 4, 5, 5]"),
        "{stderr}"
    );
}

#[test]
fn bench_runs_on_a_fixture_model() {
    let output = atelier()
        .args([
            "bench", "--device", "cpu", "--steps", "2", "--warmup", "1", "--json", "--model",
        ])
        .arg(model_dir("sdxl"))
        .output()
        .unwrap();
    assert_success(&output);
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["unet_batch"], 2);
    assert!(report["report"]["unet_step_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn karras_sigmas_are_recorded_in_the_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("k.png");
    generate_sd1(&out, &["--seed", "1", "--scheduler", "euler-karras"]);
    let chunks = read_png_text(&out).unwrap();
    let parameters = A1111Parameters::parse(&chunks["parameters"]);
    assert_eq!(parameters.get("Sampler"), Some("Euler"));
    assert_eq!(parameters.get("Schedule type"), Some("Karras"));
    assert_eq!(parameters.get("Seed"), Some("1"));
}

#[test]
fn gallery_list_search_and_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    atelier::gallery::library::write_sample_library(dir.path(), 40).unwrap();
    let run = |args: &[&str]| {
        let output = atelier()
            .arg("gallery")
            .args(args)
            .arg("--library")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_success(&output);
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (listed, summary) = run(&["list", "--limit", "5"]);
    assert_eq!(listed.lines().filter(|l| l.contains(".png")).count(), 5);
    assert!(summary.contains("5 of 40 images"), "{summary}");
    let (found, summary) = run(&["search", "dragon", "--limit", "0"]);
    assert!(summary.contains("5 matches"), "{summary}");
    assert!(found.contains("a dragon in the style of"));
    std::fs::remove_file(dir.path().join(".atelier/index.sqlite3")).unwrap();
    let (_, summary) = run(&["rebuild"]);
    assert!(summary.contains("40 images indexed"), "{summary}");
}

/// End to end on a fixture model: the grid's cells are exactly the images the engine makes for
/// each cell's parameters, and the cells land in the gallery as one comparison.
#[test]
fn compare_makes_a_grid_of_the_engines_images_and_keeps_the_cells() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grid.png");
    let library = dir.path().join("library");
    let output = atelier()
        .args(["compare", "--model"])
        .arg(model_dir("sd1"))
        .args([
            "--prompt",
            "a red fox",
            "--scheduler",
            "euler,dpmpp-2m-karras",
        ])
        .args(["--steps", "2,3", "--seed", "11", "--device", "cpu"])
        .arg("--library")
        .arg(&library)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_success(&output);
    let chunks = read_png_text(&out).unwrap();
    let record: atelier::compare::GridRecord =
        serde_json::from_str(&chunks[atelier::compare::COMPARISON_KEYWORD]).unwrap();
    let plan = &record.plan;
    assert_eq!((plan.rows(), plan.columns()), (2, 2));
    let grid = image::open(&out).unwrap().to_rgb8();

    let model = atelier::engine::pipeline::StableDiffusion::load(
        atelier::engine::source::ModelSource::Folder(model_dir("sd1")),
        atelier::engine::pipeline::LoadOptions::new(candle_core::Device::Cpu),
    )
    .unwrap();
    let (w, h) = (plan.base.width as u32, plan.base.height as u32);
    let layout = atelier::compare::GridLayout::for_plan(plan, w.max(170), h.max(64));
    assert_eq!(grid.dimensions(), layout.size(2, 2));
    let mut images = Vec::new();
    for cell in plan.cells() {
        let direct = model
            .generate(
                &cell.request,
                None,
                Default::default(),
                &std::sync::atomic::AtomicBool::new(false),
                &mut |_| {},
            )
            .unwrap()
            .images
            .remove(0);
        let (x, y) = layout.cell_origin(cell.row, cell.column);
        let dx = (layout.cell_width - w) / 2;
        let dy = (layout.cell_height - h) / 2;
        let crop = image::imageops::crop_imm(&grid, x + dx, y + dy, w, h).to_image();
        assert_eq!(crop, direct, "cell {},{}", cell.row, cell.column);
        images.push(direct);
    }
    assert_ne!(images[0], images[1], "the samplers differ");
    assert_ne!(images[0], images[2], "the steps differ");

    let (library, _) = atelier::gallery::library::Library::open(&library).unwrap();
    let cells = library
        .search(&atelier::gallery::search::GalleryQuery {
            comparison: Some(plan.id.clone()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(cells.len(), 4);
    let reopened = atelier::compare::from_cells(&cells).unwrap();
    assert_eq!(&reopened.plan, plan);
    assert!(reopened.files.iter().all(Option::is_some));

    // Two axes at once are refused with a clear message.
    let refused = atelier()
        .args(["compare", "--model"])
        .arg(model_dir("sd1"))
        .args([
            "--prompt",
            "a fox",
            "--scheduler",
            "euler",
            "--steps",
            "2,3",
        ])
        .args(["--seed", "1,2", "--device", "cpu", "--out"])
        .arg(dir.path().join("x.png"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("only one option can list several values"),
        "{stderr}"
    );
}

#[test]
fn clip_skip_changes_the_image_and_is_recorded_as_a1111_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (plain, skipped) = (dir.path().join("plain.png"), dir.path().join("skip.png"));
    generate_sd1(&plain, &["--seed", "3"]);
    generate_sd1(&skipped, &["--seed", "3", "--clip-skip", "2"]);
    let parameters = |path: &std::path::Path| {
        A1111Parameters::parse(&read_png_text(path).unwrap()["parameters"])
    };
    assert_eq!(parameters(&plain).get("Clip skip"), None);
    assert_eq!(parameters(&skipped).get("Clip skip"), Some("2"));
    let (a, b) = (
        image::open(&plain).unwrap().to_rgb8(),
        image::open(&skipped).unwrap().to_rgb8(),
    );
    assert_ne!(a, b, "clip skip 2 reads another layer");
    // The fixture's text encoder has 3 layers: 4 is refused before anything runs.
    let output = atelier()
        .args(["generate", "--model"])
        .arg(model_dir("sd1"))
        .args(["--prompt", "a fox", "--steps", "3", "--device", "cpu"])
        .args(["--clip-skip", "4", "--out"])
        .arg(dir.path().join("no.png"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("clip skip must be from 1 to 3"));
}
