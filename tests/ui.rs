//! The window, headless: egui_kittest drives the real app against a fake engine.
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier::engine::EngineError;
use atelier::engine::pipeline::{DeviceChoice, GenerationRequest, ModelFamily, Timings};
use atelier::engine::source::{LoadProgress, LoadProgressFn};
use atelier::ui::settings::Settings;
use atelier::ui::{AtelierApp, ModelState};
use atelier::worker::{Engine, Job, JobOutput, ModelInfo, StepUpdate};
use egui::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use image::{Rgb, RgbImage};

/// What the fake engine saw.
#[derive(Default)]
struct Seen {
    loads: Vec<String>,
    jobs: Vec<GenerationRequest>,
}

/// An engine that records its jobs and advances one step per token the test sends.
struct FakeEngine {
    seen: Arc<Mutex<Seen>>,
    steps: Option<Receiver<()>>,
    fail_load: bool,
    fail_generate: Option<String>,
}

impl Engine for FakeEngine {
    fn load(
        &mut self,
        model: &str,
        _device: DeviceChoice,
        progress: LoadProgressFn,
    ) -> Result<ModelInfo, EngineError> {
        self.seen.lock().unwrap().loads.push(model.to_string());
        progress(LoadProgress::Loading {
            component: "unet".into(),
        });
        if self.fail_load {
            return Err(EngineError::Download {
                repo: model.into(),
                file: "model_index.json".into(),
                message: "network unreachable".into(),
            });
        }
        Ok(ModelInfo {
            model: model.into(),
            name: "fake".into(),
            family: ModelFamily::Sd1,
            native_size: Some(512),
            size_multiple: 8,
            device: "Cpu".into(),
            max_prompt_tokens: 75,
            token_counter: Arc::new(|prompt: &str| prompt.split_whitespace().count()),
        })
    }

    fn generate(
        &mut self,
        job: &Job,
        on_step: &mut dyn FnMut(StepUpdate),
    ) -> Result<JobOutput, EngineError> {
        self.seen.lock().unwrap().jobs.push(job.request.clone());
        if let Some(message) = &self.fail_generate {
            return Err(EngineError::InvalidParameter(message.clone()));
        }
        let total = job.request.steps;
        for step in 0..total {
            if let Some(tokens) = &self.steps {
                // Wait for the test's go-ahead, checking the cancel flag meanwhile.
                loop {
                    if job.cancel.load(Ordering::Relaxed) {
                        return Err(EngineError::Cancelled);
                    }
                    if tokens.recv_timeout(Duration::from_millis(5)).is_ok() {
                        break;
                    }
                }
            } else if job.cancel.load(Ordering::Relaxed) {
                return Err(EngineError::Cancelled);
            }
            let shade = (255 * (step + 1) / total) as u8;
            on_step(StepUpdate {
                steps_done: step + 1,
                total_steps: total,
                elapsed_secs: 0.1 * (step + 1) as f64,
                preview: Some(RgbImage::from_pixel(64, 64, Rgb([shade, 90, 160]))),
            });
        }
        let (w, h) = (job.request.width as u32, job.request.height as u32);
        Ok(JobOutput {
            images: vec![RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 140])
            })],
            timings: Timings {
                denoising_secs: 1.5,
                total_secs: 2.0,
                ..Default::default()
            },
            warnings: Vec::new(),
        })
    }
}

struct Fixture {
    harness: Harness<'static, AtelierApp>,
    seen: Arc<Mutex<Seen>>,
    steps: SyncSender<()>,
}

fn settings() -> Settings {
    Settings {
        model: "fake/model".into(),
        prompt: String::new(),
        seed: 1234,
        seed_locked: true,
        steps: 4,
        width: 512,
        height: 512,
        ..Default::default()
    }
}

fn start(settings: Settings, gated: bool, fail_load: bool, fail_generate: Option<&str>) -> Fixture {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let (steps, tokens) = sync_channel(64);
    let engine = FakeEngine {
        seen: seen.clone(),
        steps: gated.then_some(tokens),
        fail_load,
        fail_generate: fail_generate.map(str::to_string),
    };
    let harness = Harness::builder()
        .with_size(egui::vec2(1300.0, 820.0))
        .build_eframe(move |cc| {
            AtelierApp::with_settings(&cc.egui_ctx, Box::new(engine), settings).unwrap()
        });
    let mut fixture = Fixture {
        harness,
        seen,
        steps,
    };
    fixture.wait_for("the model to load", |app| {
        !matches!(app.model, ModelState::Loading { .. })
    });
    fixture
}

impl Fixture {
    fn app(&self) -> &AtelierApp {
        self.harness.state()
    }

    /// Steps the UI until `done` holds (the worker runs on its own thread).
    fn wait_for(&mut self, what: &str, done: impl Fn(&AtelierApp) -> bool) {
        let started = Instant::now();
        loop {
            self.harness.step();
            if done(self.harness.state()) {
                self.harness.step();
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Clicks, then draws twice: commands apply at the end of the first frame.
    fn click(&mut self, label: &str) {
        self.harness.get_by_label(label).click();
        self.harness.step();
        self.harness.step();
    }

    fn wait_for_jobs(&mut self, count: usize) {
        let seen = self.seen.clone();
        self.wait_for(&format!("{count} jobs"), move |_| {
            seen.lock().unwrap().jobs.len() >= count
        });
    }

    fn type_prompt(&mut self, text: &str) {
        let prompt = self.harness.get_by_label("Prompt");
        prompt.focus();
        prompt.type_text(text);
        self.harness.step();
        self.harness.step();
    }

    fn allow_steps(&self, count: usize) {
        for _ in 0..count {
            self.steps.send(()).unwrap();
        }
    }

    fn jobs(&self) -> Vec<GenerationRequest> {
        self.seen.lock().unwrap().jobs.clone()
    }
}

#[test]
fn generate_sends_exactly_the_panel_parameters() {
    let mut f = start(settings(), false, false, None);
    assert_eq!(f.seen.lock().unwrap().loads, vec!["fake/model".to_string()]);
    f.type_prompt("a red fox in the snow");
    f.harness
        .get_by_role_and_label(Role::Slider, "Steps")
        .set_value_accesskit(12.0);
    f.harness
        .get_by_role_and_label(Role::Slider, "Guidance")
        .set_value_accesskit(5.5);
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
                .query_by_label_contains("Choose a local model folder")
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
    let settings = Settings {
        model: model_dir.display().to_string(),
        device: "cpu".into(),
        prompt: "a red fox".into(),
        seed: 5,
        seed_locked: true,
        steps: 3,
        width: 64,
        height: 48,
        vae_preview_every: 2,
        ..Default::default()
    };
    let harness = Harness::builder()
        .with_size(egui::vec2(1300.0, 820.0))
        .build_eframe(move |cc| {
            AtelierApp::with_settings(
                &cc.egui_ctx,
                Box::new(atelier::worker::DiffusionEngine::default()),
                settings,
            )
            .unwrap()
        });
    let mut f = Fixture {
        harness,
        seen: Arc::new(Mutex::new(Seen::default())),
        steps: sync_channel(1).0,
    };
    f.wait_for("the fixture model to load", |app| {
        matches!(app.model, ModelState::Ready(_))
    });
    assert!(
        f.harness.query_by_label("3 / 75 tokens").is_some(),
        "real token count"
    );
    f.click("Generate");
    f.wait_for("the image", |app| app.shown.is_some());
    let shown = &f.app().shown.as_ref().unwrap().image;
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
}
