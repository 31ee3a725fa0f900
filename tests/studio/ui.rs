//! The window, headless: egui_kittest drives the real app against a fake engine.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use crate::window;

use atelier::engine::pipeline::GenerationRequest;
use atelier::ui::settings::Settings;
use atelier::ui::{AtelierApp, ModelState};
use egui::Role;
use egui_kittest::kittest::Queryable;
use image::{Rgb, RgbImage};
use window::{settings, start, start_real, start_with_library};

#[test]
fn generate_sends_exactly_the_panel_parameters() {
    let mut f = start(settings(), false, false, None);
    assert_eq!(f.seen.lock().unwrap().loads, vec!["fake/model".to_string()]);
    f.type_prompt("a red fox in the snow");
    f.set_slider("Steps", 12.0);
    f.set_slider("Guidance", 5.5);
    f.harness.get_by_label("Seed").set_value_accesskit(777.0);
    f.harness.step();
    f.harness.step();
    f.click("Generate");
    f.wait_for("the job to finish", |app| app.shown.is_some());
    let jobs = f.jobs();
    assert_eq!(jobs.len(), 1);
    let job = &jobs[0];
    assert_eq!(job.prompt, "a red fox in the snow");
    assert_eq!(job.steps, 12);
    assert_eq!(job.guidance_scale, 5.5);
    assert_eq!(job.seed, 777);
    assert_eq!((job.width, job.height), (512, 512));
    // The token count follows the prompt (the fake counts words).
    assert!(f.harness.query_by_label("6 / 75 tokens").is_some());
}

#[test]
fn progress_moves_the_bar_and_the_preview() {
    let mut f = start(settings(), true, false, None);
    f.type_prompt("a fox");
    f.click("Generate");
    f.wait_for("the job to start", |app| app.running.is_some());
    assert!(f.app().preview.is_none());
    f.allow_steps(1);
    f.wait_for("step 1", |app| {
        app.running.as_ref().is_some_and(|r| r.steps_done == 1)
    });
    assert!(
        f.app().preview.is_some(),
        "the preview shows after the first step"
    );
    assert!(
        f.harness.query_by_label_contains("step 1/4").is_some(),
        "the progress bar says step 1/4"
    );
    f.allow_steps(2);
    f.wait_for("step 3", |app| {
        app.running.as_ref().is_some_and(|r| r.steps_done == 3)
    });
    assert!(f.harness.query_by_label_contains("step 3/4").is_some());
    f.allow_steps(1);
    f.wait_for("the result", |app| {
        app.shown.is_some() && app.running.is_none()
    });
    assert!(f.app().preview.is_none());
    assert!(f.app().frame_stats.first_preview_secs.is_some());
}

#[test]
fn cancel_stops_the_job_and_keeps_the_queue() {
    let mut f = start(settings(), true, false, None);
    f.type_prompt("first");
    f.click("Generate");
    f.wait_for("the job to start", |app| app.running.is_some());
    f.click("Generate");
    assert_eq!(f.app().queue.len(), 1);
    f.allow_steps(1);
    f.wait_for("step 1", |app| {
        app.running.as_ref().is_some_and(|r| r.steps_done == 1)
    });
    f.click("Cancel");
    // The next queued job starts once the cancelled one has stopped.
    f.wait_for("the cancelled job to stop", |app| {
        app.running.as_ref().is_none_or(|r| r.job.id != 1)
    });
    assert!(f.app().shown.is_none(), "a cancelled job shows no result");
    f.wait_for("the queued job to start", |app| app.running.is_some());
    assert_eq!(f.app().queue.len(), 0);
    f.wait_for_jobs(2);
    // Esc cancels too.
    f.harness.key_press(egui::Key::Escape);
    f.wait_for("the second job to stop", |app| app.running.is_none());
}

#[test]
fn ctrl_enter_generates() {
    let mut f = start(settings(), false, false, None);
    f.type_prompt("keyboard");
    f.harness
        .key_press_modifiers(egui::Modifiers::COMMAND, egui::Key::Enter);
    f.wait_for("the job to finish", |app| app.shown.is_some());
    assert_eq!(f.jobs()[0].prompt, "keyboard");
    assert_eq!(f.app().settings.prompt, "keyboard", "no newline was typed");
}

#[test]
fn engine_errors_are_shown_with_what_to_do() {
    let mut f = start(
        settings(),
        false,
        false,
        Some("width 500 must be a multiple of 64"),
    );
    f.type_prompt("a fox");
    f.click("Generate");
    f.wait_for("the error", |app| app.error.is_some());
    assert!(
        f.harness
            .query_by_label_contains("width 500 must be a multiple of 64")
            .is_some()
    );
    assert!(
        f.harness
            .query_by_label_contains("Adjust the setting")
            .is_some()
    );
    f.click("Dismiss");
    assert!(f.app().error.is_none());
}

#[test]
fn a_model_that_cannot_load_explains_itself() {
    let mut f = start(settings(), false, true, None);
    assert!(matches!(f.app().model, ModelState::Failed { .. }));
    assert!(
        f.harness
            .query_by_label_contains("network unreachable")
            .is_some()
    );
    assert!(
        f.harness
            .query_by_label_contains("choose a local model folder")
            .is_some()
            || f.harness
                .query_by_label_contains("Choose a local model with")
                .is_some()
    );
    // Generate without a model says what to do instead of doing nothing.
    f.click("Generate");
    assert!(
        f.harness
            .query_by_label_contains("No model is loaded")
            .is_some()
    );
}

#[test]
fn the_queue_keeps_its_order_and_can_be_edited() {
    let mut f = start(settings(), true, false, None);
    for prompt in ["one", "two", "three", "four"] {
        let field = f.harness.get_by_label("Prompt");
        field.focus();
        field.set_text_value_accesskit(prompt);
        f.harness.step();
        f.harness.step();
        f.click("Generate");
    }
    f.wait_for("the first job to run", |app| app.running.is_some());
    let prompts = |app: &AtelierApp| -> Vec<String> {
        app.queue.iter().map(|j| j.request.prompt.clone()).collect()
    };
    assert_eq!(prompts(f.app()), vec!["two", "three", "four"]);
    // Move "four" sooner, then remove "three".
    f.harness.get_all_by_label("Sooner").last().unwrap().click();
    f.harness.step();
    f.harness.step();
    assert_eq!(prompts(f.app()), vec!["two", "four", "three"]);
    f.harness.get_all_by_label("Remove").last().unwrap().click();
    f.harness.step();
    f.harness.step();
    assert_eq!(prompts(f.app()), vec!["two", "four"]);
    f.allow_steps(3 * 4);
    f.wait_for("every job to finish", |app| {
        app.running.is_none() && app.queue.is_empty()
    });
    let order: Vec<String> = f.jobs().iter().map(|j| j.prompt.clone()).collect();
    assert_eq!(order, vec!["one", "two", "four"]);
}

#[test]
fn unlocked_seeds_change_and_batch_counts_follow() {
    let mut s = settings();
    s.seed_locked = false;
    s.batch_count = 3;
    let mut f = start(s, false, false, None);
    f.type_prompt("a fox");
    f.click("Generate");
    f.wait_for("three jobs", |app| {
        app.running.is_none() && app.queue.is_empty() && app.shown.is_some()
    });
    f.wait_for("three jobs", |_| true);
    let jobs = f.jobs();
    assert_eq!(jobs.len(), 3);
    assert_ne!(jobs[0].seed, 1234, "an unlocked seed is drawn anew");
    assert_eq!(jobs[1].seed, jobs[0].seed + 1);
    assert_eq!(jobs[2].seed, jobs[0].seed + 2);
}

#[test]
fn settings_survive_a_restart() {
    struct MemoryStorage(std::collections::HashMap<String, String>);
    impl eframe::Storage for MemoryStorage {
        fn get_string(&self, key: &str) -> Option<String> {
            self.0.get(key).cloned()
        }
        fn set_string(&mut self, key: &str, value: String) {
            self.0.insert(key.into(), value);
        }
        fn remove_string(&mut self, key: &str) {
            self.0.remove(key);
        }
        fn flush(&mut self) {}
    }
    let mut f = start(settings(), false, false, None);
    f.type_prompt("remember me");
    let mut storage = MemoryStorage(Default::default());
    eframe::App::save(f.harness.state_mut(), &mut storage);
    let restored: Settings = eframe::get_value(&storage, Settings::STORAGE_KEY).unwrap();
    assert_eq!(restored.prompt, "remember me");
    assert_eq!(restored.model, "fake/model");
    assert_eq!(restored.recent_models, vec!["fake/model".to_string()]);
    // Old saves without newer fields still load.
    let old: Settings = serde_json::from_str(r#"{"prompt": "old"}"#).unwrap();
    assert_eq!(old.prompt, "old");
    assert_eq!(old.steps, Settings::default().steps);
}

#[test]
fn studio_snapshot() {
    let mut f = start(settings(), true, false, None);
    f.type_prompt("a lighthouse at dusk, oil painting");
    f.click("Generate");
    f.wait_for("the job to start", |app| app.running.is_some());
    f.allow_steps(2);
    f.wait_for("step 2", |app| {
        app.running.as_ref().is_some_and(|r| r.steps_done == 2)
    });
    // Mask what varies from run to run: frame times in the status bar.
    for varying in ["UI frame", "first preview"] {
        let rect = f
            .harness
            .query_by_label_contains(varying)
            .map(|node| node.rect());
        if let Some(rect) = rect {
            f.harness.mask(rect);
        }
    }
    f.harness.snapshot("studio_generating");
    f.allow_steps(2);
    f.wait_for("the result", |app| app.shown.is_some());
}

/// The real engine on a fixture model: Generate in the window, and the final image shows, the
/// same image the engine gives directly for the same parameters.
#[test]
fn real_engine_generates_into_the_window() {
    let model_dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1/model");
    let mut f = start_real(tempfile::tempdir().unwrap(), 3);
    assert!(
        f.harness.query_by_label("3 / 75 tokens").is_some(),
        "real token count"
    );
    f.click("Generate");
    f.wait_for("the image", |app| app.shown.is_some());
    let shown = &f.app().shown.as_ref().unwrap().image.clone();
    assert_eq!(shown.dimensions(), (64, 48));

    let model = atelier::engine::pipeline::StableDiffusion::load(
        atelier::engine::source::ModelSource::Folder(model_dir),
        atelier::engine::pipeline::LoadOptions::new(candle_core::Device::Cpu),
    )
    .unwrap();
    let request = f.app().current_request(5);
    let direct = model
        .generate(
            &request,
            None,
            Default::default(),
            &std::sync::atomic::AtomicBool::new(false),
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(
        shown, &direct.images[0],
        "the window shows the engine's image"
    );
    // And it was saved into the gallery, with the hash of the fixture's UNet weights.
    f.click("Gallery");
    f.wait_for("the image in the gallery", |app| {
        app.gallery.entries.len() == 1
    });
    let entry = f.app().gallery.entries[0].clone();
    let saved = image::open(f.library.path().join(&entry.file))
        .unwrap()
        .to_rgb8();
    assert_eq!(&saved, shown);
    let hash = entry.metadata.model_hash.clone().unwrap();
    assert_eq!(hash.len(), 10);
    assert_eq!(entry.metadata.scheduler, request.scheduler.id());
    assert!(entry.metadata.timings.is_some());
}

fn save_sample(library: &std::path::Path, prompt: &str, seed: u64, scheduler: &str) {
    let (mut lib, _) = atelier::gallery::library::Library::open(library).unwrap();
    let metadata = atelier::gallery::record::ImageMetadata {
        prompt: prompt.into(),
        negative_prompt: "blurry".into(),
        model: "sd-turbo".into(),
        scheduler: scheduler.into(),
        seed: Some(seed),
        steps: Some(17),
        guidance: Some(4.5),
        created_unix: atelier::gallery::library::now_unix() - seed as i64,
        ..Default::default()
    };
    lib.save(
        &RgbImage::from_pixel(40, 24, Rgb([seed as u8 * 40, 30, 90])),
        &metadata,
    )
    .unwrap();
}

/// Generated images land in the gallery; "Use these settings" brings them back to the panel.
#[test]
fn generated_images_are_kept_and_use_these_settings_fills_the_panel() {
    let mut f = start(settings(), false, false, None);
    f.type_prompt("a castle on a hill");
    f.click("Generate");
    f.wait_for("the result", |app| app.shown.is_some());
    f.click("Gallery");
    f.wait_for("the image in the gallery", |app| {
        app.gallery.entries.len() == 1
    });
    let entry = f.app().gallery.entries[0].clone();
    assert_eq!(entry.metadata.prompt, "a castle on a hill");
    assert_eq!(entry.metadata.seed, Some(1234));
    let chunks =
        atelier::gallery::metadata::read_png_text(&f.library.path().join(&entry.file)).unwrap();
    assert!(chunks["parameters"].contains("Seed: 1234"));

    // Change the panel, then take the image's settings back.
    f.click("Studio");
    f.type_prompt(" with dragons");
    f.harness.state_mut().settings.steps = 40;
    f.harness.state_mut().settings.seed = 99;
    f.click("Gallery");
    f.wait_for("the thumbnail", |app| !app.gallery.thumbnails.is_empty());
    f.click("a castle on a hill");
    f.wait_for("the detail panel", |app| app.gallery.full_image.is_some());
    f.click("Use these settings");
    let s = &f.app().settings;
    assert_eq!(s.prompt, "a castle on a hill");
    assert_eq!((s.seed, s.steps, s.seed_locked), (1234, 4, true));
    assert_eq!(f.app().tab, atelier::ui::Tab::Studio);
    f.click("Generate");
    f.wait_jobs_then_check(2, |job| {
        assert_eq!(job.prompt, "a castle on a hill");
        assert_eq!(job.seed, 1234);
    });
}

/// A large library arrives in pages: the first screenful at once, the rest streamed, and a new
/// search replaces a stream that has not finished.
#[test]
fn a_large_gallery_streams_its_results_in_pages() {
    let library = tempfile::tempdir().unwrap();
    atelier::gallery::library::write_sample_library(library.path(), 5000).unwrap();
    let mut f = start_with_library(settings(), false, false, None, library);
    f.click("Gallery");
    f.wait_for("the first page", |app| !app.gallery.entries.is_empty());
    assert!(f.app().gallery.entries.len() >= atelier::gallery::worker::FIRST_PAGE_ROWS.min(5000));
    f.wait_for("every image", |app| {
        app.gallery.complete && app.gallery.entries.len() == 5000
    });
    let ids: std::collections::HashSet<i64> =
        f.app().gallery.entries.iter().map(|e| e.id).collect();
    assert_eq!(ids.len(), 5000, "no image twice");
    assert!(f.harness.query_by_label_contains("5000 images").is_some());
    let search = f.harness.get_by_label("Search");
    search.focus();
    search.type_text("dragon");
    f.harness.step();
    f.harness.step();
    f.wait_for("the search's results", |app| {
        app.gallery.complete
            && !app.gallery.entries.is_empty()
            && app
                .gallery
                .entries
                .iter()
                .all(|e| e.metadata.prompt.contains("dragon"))
    });
    let dragons = (0..5000).filter(|i| i % 8 == 7 || (i / 8) % 8 == 7).count();
    assert_eq!(f.app().gallery.entries.len(), dragons);
}

#[test]
fn gallery_search_filters_favourites_and_delete_with_undo() {
    let library = tempfile::tempdir().unwrap();
    save_sample(library.path(), "a castle at dawn", 1, "euler");
    save_sample(
        library.path(),
        "a red fox in the snow",
        2,
        "dpmpp-2m-karras",
    );
    save_sample(library.path(), "a castle in the clouds", 3, "unipc");
    let mut f = start_with_library(settings(), false, false, None, library);
    f.click("Gallery");
    f.wait_for("three images", |app| app.gallery.entries.len() == 3);
    // Newest first.
    assert_eq!(
        f.app().gallery.entries[0].metadata.prompt,
        "a castle at dawn"
    );

    let search = f.harness.get_by_label("Search");
    search.focus();
    search.type_text("castle");
    f.wait_for("the search", |app| app.gallery.entries.len() == 2);
    f.harness.state_mut().gallery.scheduler_filter = Some("unipc".into());
    f.wait_for("the sampler filter", |app| app.gallery.entries.len() == 1);
    f.harness.state_mut().gallery.scheduler_filter = None;
    f.wait_for("no sampler filter", |app| app.gallery.entries.len() == 2);

    f.click("a castle in the clouds");
    f.wait_for("the full image", |app| app.gallery.full_image.is_some());
    assert!(f.harness.query_by_label("Use these settings").is_some());
    assert!(
        f.harness.query_all_by_label("17").count() > 0,
        "the steps show"
    );
    f.click("Favourite");
    f.wait_for("the favourite", |app| {
        app.gallery.entries.iter().any(|e| e.favourite)
    });
    f.click("Favourites");
    f.wait_for("favourites only", |app| app.gallery.entries.len() == 1);
    f.click("Favourites");
    f.wait_for("all castles", |app| app.gallery.entries.len() == 2);

    f.click("Delete");
    f.wait_for("the deletion", |app| {
        app.gallery.entries.len() == 1 && app.gallery.last_deleted.is_some()
    });
    f.click("Undo");
    f.wait_for("the undo", |app| app.gallery.entries.len() == 2);
    assert!(
        f.app().gallery.entries.iter().any(|e| e.favourite),
        "undo keeps the favourite"
    );
}

#[test]
fn importing_a_png_without_parameters_explains_and_changes_nothing() {
    let mut f = start(settings(), false, false, None);
    f.click("Gallery");
    f.wait_for("the empty gallery", |app| app.gallery.root.is_some());
    let outside = tempfile::tempdir().unwrap();
    let plain = outside.path().join("holiday.png");
    RgbImage::from_pixel(8, 8, Rgb([1, 2, 3]))
        .save(&plain)
        .unwrap();
    let a1111 = outside.path().join("a1111.png");
    atelier::gallery::metadata::write_png(
        &a1111,
        &RgbImage::from_pixel(8, 8, Rgb([4, 5, 6])),
        &[(
            "parameters",
            "a lighthouse\nSteps: 20, Sampler: Euler a, Seed: 9, Size: 8x8",
        )],
    )
    .unwrap();
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::ImportFiles(vec![plain, a1111]));
    f.wait_for("the import", |app| app.gallery.entries.len() == 1);
    let error = f.app().error.clone().unwrap();
    assert!(error.message.contains("holiday.png"), "{error:?}");
    assert!(
        error.message.contains("no generation parameters"),
        "{error:?}"
    );
}

/// The Compare tab queues exactly one job per cell with that cell's parameters, fills the
/// cells, keeps them in the gallery as one comparison, and reopens it from there.
#[test]
fn a_comparison_runs_one_job_per_cell_and_reopens_from_the_gallery() {
    let mut f = start(settings(), false, false, None);
    f.type_prompt("a fox in the snow");
    f.click("Compare");
    f.click("Euler");
    f.click("DPM++ 2M Karras");
    f.click("UniPC");
    {
        let view = &mut f.harness.state_mut().compare;
        view.row_kind = atelier::ui::compare::RowKind::Steps;
        view.row_values = "3, 5".into();
    }
    f.harness.step();
    f.click("Run comparison (6 cells)");
    f.wait_for_jobs(6);
    f.wait_for("every cell", |app| {
        app.compare.cells.iter().all(|c| c.image.is_some())
    });
    let plan = f.app().compare.plan.clone().unwrap();
    let mut expected: Vec<GenerationRequest> =
        plan.cells().into_iter().map(|c| c.request).collect();
    let mut jobs = f.jobs();
    let key = |r: &GenerationRequest| format!("{:?}{:?}{}", r.scheduler, r.sigmas, r.steps);
    expected.sort_by_key(key);
    jobs.sort_by_key(key);
    assert_eq!(
        jobs, expected,
        "one job per cell, with that cell's parameters"
    );
    assert!(
        jobs.iter()
            .all(|j| j.prompt == "a fox in the snow" && j.seed == 1234)
    );
    assert_eq!(f.harness.query_all_by_label_contains("4 evals").count(), 0);
    assert_eq!(
        f.harness.query_all_by_label_contains("3 evals").count(),
        3,
        "each cell's caption shows its model evaluations"
    );

    // Enlarge a cell and flip it with another.
    f.click("UniPC · 5 steps");
    assert_eq!(f.app().compare.enlarged, Some(5));
    f.harness.state_mut().compare.flip_with = Some(0);
    f.click("Flip");
    assert!(f.app().compare.flipping);
    f.click("Back to the grid");

    // The cells are in the gallery as one comparison; reopen it from there.
    f.click("Gallery");
    f.wait_for("the cells in the gallery", |app| {
        app.gallery.entries.len() == 6
    });
    let cell = f.app().gallery.entries[0].clone();
    assert_eq!(cell.metadata.comparison.as_ref().unwrap().id, plan.id);
    f.harness.state_mut().compare = Default::default();
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::SelectImage(Some(cell.id)));
    f.wait_for("the detail panel", |app| app.gallery.full_image.is_some());
    f.click("Open comparison");
    f.wait_for("the reopened grid", |app| {
        app.compare.plan.is_some() && app.compare.cells.iter().all(|c| c.image.is_some())
    });
    assert_eq!(f.app().compare.plan.as_ref().unwrap(), &plan);
    assert_eq!(f.app().tab, atelier::ui::Tab::Compare);
    // The pickers show the reopened comparison, so Run repeats it.
    assert_eq!(f.app().compare.row_values, "3, 5");
    assert_eq!(f.app().compare.samplers, plan.samplers);
    assert_eq!(f.app().settings.prompt, "a fox in the snow");
}

#[test]
fn image_to_image_from_a_file_or_from_the_result() {
    let mut f = start(settings(), false, false, None);
    // A picture dropped (or opened) on the Studio tab is the start of image to image. It lives
    // outside the library folder, which the gallery indexes as it changes.
    let outside = tempfile::tempdir().unwrap();
    let picture = outside.path().join("start.png");
    RgbImage::from_pixel(40, 30, Rgb([200, 30, 30]))
        .save(&picture)
        .unwrap();
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::SetInitImage(picture));
    f.wait_for("the picture", |app| app.init_image.is_some());
    assert_eq!(f.app().init_image.as_ref().unwrap().name, "start.png");
    assert!(
        f.harness
            .query_by_role_and_label(Role::Slider, "Denoising strength")
            .is_some()
    );
    f.set_slider("Denoising strength", 0.4);
    f.harness.step();
    f.harness.step();
    f.click("Generate");
    f.wait_for("the job to finish", |app| app.shown.is_some());
    assert_eq!(f.seen.lock().unwrap().inits[0], Some(((40, 30), 0.4)));
    // Its image in the gallery says its strength, and the library keeps the picture it came from.
    f.wait_for("the saved image", |app| app.gallery.entries.len() == 1);
    let entry = f.app().gallery.entries[0].clone();
    assert_eq!(entry.metadata.denoising_strength, Some(0.4));
    let kept = atelier::gallery::library::input_path(
        f.library.path(),
        entry.metadata.init_image.as_ref().unwrap(),
    );
    assert_eq!(image::open(&kept).unwrap().to_rgb8().dimensions(), (40, 30));
    // "Send to img2img": the result becomes the next job's picture.
    f.click("Send to img2img");
    assert!(
        f.app()
            .init_image
            .as_ref()
            .unwrap()
            .name
            .contains("seed 1234")
    );
    f.click("Generate");
    f.wait_for_jobs(2);
    assert_eq!(f.seen.lock().unwrap().inits[1], Some(((512, 512), 0.4)));
    // Clear: back to text to image.
    f.click("Clear");
    assert!(f.app().init_image.is_none());
    f.click("Generate");
    f.wait_for_jobs(3);
    assert_eq!(f.seen.lock().unwrap().inits[2], None);
    // "Use these settings" on the first image brings its picture and strength back.
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::UseSettings(entry.id));
    f.wait_for("the picture again", |app| app.init_image.is_some());
    assert_eq!(
        f.app().init_image.as_ref().unwrap().image.dimensions(),
        (40, 30)
    );
    assert_eq!(f.app().settings.image_options.strength, 0.4);
    // A file that is not a picture says so.
    let bad = outside.path().join("notes.png");
    std::fs::write(&bad, "not a picture").unwrap();
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::SetInitImage(bad));
    f.wait_for("the error", |app| app.error.is_some());
    assert!(
        f.app()
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("notes.png")
    );
}

/// "Send to img2img" in the gallery: the saved picture starts the next job, on the Studio tab.
#[test]
fn a_gallery_picture_is_sent_to_image_to_image() {
    let mut f = start(settings(), false, false, None);
    f.click("Generate");
    f.wait_for("the job to finish", |app| app.shown.is_some());
    f.wait_for("the saved image", |app| app.gallery.entries.len() == 1);
    let entry = f.app().gallery.entries[0].clone();
    f.click("Gallery");
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::SelectImage(Some(entry.id)));
    f.harness.step();
    f.harness.step();
    f.click("Send to img2img");
    f.wait_for("the picture", |app| app.init_image.is_some());
    assert_eq!(f.app().tab, atelier::ui::Tab::Studio);
    let init = f.app().init_image.as_ref().unwrap();
    assert_eq!(init.name, entry.file);
    assert_eq!(init.image.dimensions(), (512, 512));
    f.click("Generate");
    f.wait_for_jobs(2);
    let (size, strength) = f.seen.lock().unwrap().inits[1].unwrap();
    assert_eq!(size, (512, 512));
    assert!((strength - f.app().settings.image_options.strength).abs() < 1e-9);
}

#[test]
fn model_options_override_the_prediction_and_remember_it_per_model() {
    let mut f = start(settings(), false, false, None);
    f.click("Model options");
    f.harness
        .get_by_role_and_label(egui::accesskit::Role::ComboBox, "Predicts")
        .click();
    f.harness.step();
    f.harness.step();
    f.harness.get_by_label("v").click();
    for _ in 0..4 {
        f.harness.step();
    }
    f.wait_for("the model to reload", |app| {
        !matches!(app.model, ModelState::Loading { .. })
    });
    let seen = f.seen.lock().unwrap();
    assert_eq!(seen.loads, vec!["fake/model".to_string(); 2]);
    assert_eq!(seen.load_overrides[0], Default::default());
    assert_eq!(
        seen.load_overrides[1].prediction,
        Some(atelier::schedulers::Prediction::VPrediction)
    );
    drop(seen);
    let remembered = &f.app().settings.model_overrides["fake/model"];
    assert_eq!(
        remembered.prediction,
        Some(atelier::schedulers::Prediction::VPrediction)
    );
    assert!(
        f.harness
            .query_by_label("Model options (overridden)")
            .is_some()
    );
}

#[test]
fn memory_options_reach_the_engine() {
    // "Text encoders on the CPU" reloads the model with them kept there, remembered per model;
    // the VAE tiling setting goes with every job.
    let mut f = start(settings(), false, false, None);
    f.click("Model options");
    f.click("Text encoders on the CPU");
    let seen = f.seen.clone();
    f.wait_for("the model to reload", move |app| {
        seen.lock().unwrap().loads.len() == 2 && !matches!(app.model, ModelState::Loading { .. })
    });
    {
        let seen = f.seen.lock().unwrap();
        assert_eq!(seen.loads.len(), 2);
        assert!(!seen.load_overrides[0].text_encoders_on_cpu);
        assert!(seen.load_overrides[1].text_encoders_on_cpu);
    }
    assert!(f.app().settings.model_overrides["fake/model"].text_encoders_on_cpu);
    f.harness.state_mut().settings.vae_tiling = atelier::engine::vae_tiling::VaeTiling::Always;
    f.click("Generate");
    f.wait_for_jobs(1);
    assert_eq!(
        f.seen.lock().unwrap().vae_tilings,
        vec![atelier::engine::vae_tiling::VaeTiling::Always]
    );
}

#[test]
fn the_lora_picker_lists_the_models_folders_and_inserts_a_tag() {
    let dir = tempfile::tempdir().unwrap();
    let webui = dir.path().join("stable-diffusion-webui");
    std::fs::create_dir_all(webui.join("models/Lora/styles")).unwrap();
    let lora = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/lora/sd1-peft.safetensors");
    std::fs::copy(&lora, webui.join("models/Lora/styles/inkStyle.safetensors")).unwrap();
    let mut settings = settings();
    settings.prompt = "a fox".into();
    settings.models_folders = vec![webui.display().to_string()];
    let mut f = start(settings, false, false, None);
    f.wait_for("the LoRA scan", |app| !app.models_scan.loras.is_empty());
    assert_eq!(f.app().models_scan.loras, vec!["inkStyle".to_string()]);
    f.harness
        .get_by_role_and_label(egui::accesskit::Role::ComboBox, "LoRA")
        .click();
    f.harness.step();
    f.harness.step();
    f.click("inkStyle");
    assert_eq!(f.app().settings.prompt, "a fox <lora:inkStyle:1>");
    f.click("Generate");
    f.wait_for_jobs(1);
    let seen = f.seen.lock().unwrap();
    assert_eq!(seen.lora_folders[0], vec![webui.join("models/Lora")]);
}

#[test]
fn the_model_picker_lists_the_models_folders_checkpoints_searchably() {
    let dir = tempfile::tempdir().unwrap();
    let comfy = dir.path().join("ComfyUI");
    std::fs::create_dir_all(comfy.join("models/checkpoints/sd1")).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (from, to) in [
        ("single-file/sd1.safetensors", "sd1/tinyOne.safetensors"),
        ("single-file/sdxl.safetensors", "tinyXL.safetensors"),
        ("single-file/vae.safetensors", "notAModel.safetensors"),
    ] {
        std::fs::copy(
            fixtures.join(from),
            comfy.join("models/checkpoints").join(to),
        )
        .unwrap();
    }
    let mut settings = settings();
    settings.models_folders = vec![comfy.display().to_string()];
    let mut f = start(settings, false, false, None);
    f.wait_for("the models scan", |app| {
        app.models_scan.checkpoints.len() == 3
    });
    let scan = f.app().models_scan.checkpoints.clone();
    assert_eq!(scan[1].name, "sd1/tinyOne.safetensors");
    assert!(
        scan[1].summary.starts_with("SD 1.x, f16"),
        "{}",
        scan[1].summary
    );
    assert!(
        !scan[0].runs,
        "the VAE is listed, not loadable: {}",
        scan[0].summary
    );
    f.harness
        .get_by_role_and_label(egui::accesskit::Role::ComboBox, "Model")
        .click();
    f.harness.step();
    f.harness.step();
    assert!(f.harness.query_by_label("tinyXL.safetensors").is_some());
    let search = f.harness.get_by_label("Search models");
    search.focus();
    search.type_text("sdxl");
    f.harness.step();
    f.harness.step();
    assert!(
        f.harness
            .query_by_label("sd1/tinyOne.safetensors")
            .is_none()
    );
    assert!(f.harness.query_by_label("tinyXL.safetensors").is_some());
    // Picking one loads it.
    f.click("tinyXL.safetensors");
    f.wait_for("the model to load", |app| {
        !matches!(app.model, ModelState::Loading { .. })
    });
    let path = comfy.join("models/checkpoints/tinyXL.safetensors");
    assert_eq!(
        f.seen.lock().unwrap().loads.last().unwrap(),
        &path.display().to_string()
    );
}

#[test]
fn use_these_settings_brings_back_the_vae_and_names_missing_loras() {
    let dir = tempfile::tempdir().unwrap();
    let webui = dir.path().join("webui");
    std::fs::create_dir_all(webui.join("models/Lora")).unwrap();
    std::fs::create_dir_all(webui.join("models/VAE")).unwrap();
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    std::fs::copy(
        fixtures.join("lora/sd1-peft.safetensors"),
        webui.join("models/Lora/inkStyle.safetensors"),
    )
    .unwrap();
    let vae = webui.join("models/VAE/vae-ft-mse.safetensors");
    std::fs::copy(fixtures.join("single-file/vae.safetensors"), &vae).unwrap();
    let mut settings = settings();
    settings.models_folders = vec![webui.display().to_string()];
    let mut f = start(settings, false, false, None);
    f.wait_for("the models scan", |app| !app.models_scan.vaes.is_empty());
    f.click("Gallery");
    f.wait_for("the empty gallery", |app| app.gallery.root.is_some());
    let png = dir.path().join("a1111.png");
    atelier::gallery::metadata::write_png(
        &png,
        &RgbImage::from_pixel(8, 8, Rgb([4, 5, 6])),
        &[(
            "parameters",
            "a fox <lora:inkStyle:0.6> <lora:gone:1>\nSteps: 20, Sampler: Euler, Seed: 9, \
             Size: 8x8, Clip skip: 2, VAE: vae-ft-mse.safetensors, \
             Lora hashes: \"inkStyle: 0123456789ab, gone: ba9876543210\"",
        )],
    )
    .unwrap();
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::ImportFiles(vec![png]));
    f.wait_for("the import", |app| app.gallery.entries.len() == 1);
    let entry = f.app().gallery.entries[0].clone();
    assert_eq!(entry.metadata.lora_hashes.len(), 2);
    f.harness
        .state_mut()
        .apply_for_test(atelier::ui::UiCommand::UseSettings(entry.id));
    f.wait_for("the model to reload", |app| {
        !matches!(app.model, ModelState::Loading { .. })
    });
    let app = f.app();
    assert_eq!(
        app.settings.prompt,
        "a fox <lora:inkStyle:0.6> <lora:gone:1>"
    );
    assert_eq!(app.settings.clip_skip, 2);
    assert_eq!(
        app.settings.model_overrides["fake/model"].vae.as_deref(),
        Some(vae.as_path())
    );
    let warnings = app.warnings.join("\n");
    assert!(
        warnings.contains("LoRA gone (not in the models folders)"),
        "{warnings}"
    );
    assert!(!warnings.contains("inkStyle"), "{warnings}");
    f.wait_for("the reload", |_| true);
    let seen = f.seen.lock().unwrap();
    assert_eq!(
        seen.load_overrides.last().unwrap().vae.as_deref(),
        Some(vae.as_path())
    );
}
