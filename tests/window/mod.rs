//! The window's test fixture: the real app against a fake engine that records its jobs.
#![allow(dead_code)] // each test binary uses its part
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier::engine::EngineError;
use atelier::engine::pipeline::{
    DeviceChoice, GenerationRequest, HiresFix, ImageJob, ModelFamily, ModelOverrides, Timings,
};
use atelier::engine::source::{LoadProgress, LoadProgressFn};
use atelier::ui::settings::Settings;
use atelier::ui::{AtelierApp, ModelState};
use atelier::worker::{Engine, Job, JobOutput, ModelInfo, StepUpdate};
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use image::{Rgb, RgbImage};

/// What the fake engine saw.
#[derive(Default)]
pub struct Seen {
    pub loads: Vec<String>,
    /// Where each job's `<lora:…>` tags were to be looked up.
    pub lora_folders: Vec<Vec<std::path::PathBuf>>,
    /// What each load overrode of the model's files.
    pub load_overrides: Vec<ModelOverrides>,
    pub jobs: Vec<GenerationRequest>,
    /// Each job's init image size and strength (image to image), `None` for text to image.
    pub inits: Vec<Option<((u32, u32), f64)>>,
    /// Each job's picture, mask and settings.
    pub images: Vec<Option<ImageJob>>,
    /// Each job's hires fix.
    pub hires: Vec<Option<HiresFix>>,
    /// Each job's VAE tiling.
    pub vae_tilings: Vec<atelier::engine::vae_tiling::VaeTiling>,
}

/// An engine that records its jobs and advances one step per token the test sends.
pub struct FakeEngine {
    pub seen: Arc<Mutex<Seen>>,
    pub steps: Option<Receiver<()>>,
    pub fail_load: bool,
    pub fail_generate: Option<String>,
}

impl Engine for FakeEngine {
    fn load(
        &mut self,
        model: &str,
        _device: DeviceChoice,
        overrides: &ModelOverrides,
        progress: LoadProgressFn,
    ) -> Result<ModelInfo, EngineError> {
        let mut seen = self.seen.lock().unwrap();
        seen.loads.push(model.to_string());
        seen.load_overrides.push(overrides.clone());
        drop(seen);
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
            weights_path: None,
            vae: overrides.vae_name(),
        })
    }

    fn generate(
        &mut self,
        job: &Job,
        on_step: &mut dyn FnMut(StepUpdate),
    ) -> Result<JobOutput, EngineError> {
        {
            let mut seen = self.seen.lock().unwrap();
            seen.jobs.push(job.request.clone());
            seen.lora_folders.push(job.lora_folders.clone());
            seen.inits.push(
                job.image
                    .as_ref()
                    .map(|image| (image.image.dimensions(), image.options.strength)),
            );
            seen.images.push(job.image.clone());
            seen.hires.push(job.hires);
            seen.vae_tilings.push(job.vae_tiling);
        }
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
        let final_request = match &job.hires {
            Some(hires) => hires.second_request(&job.request, 8),
            None => job.request.clone(),
        };
        let (w, h) = (final_request.width as u32, final_request.height as u32);
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
            final_request,
            loras: atelier::engine::extra_networks::lora_tags(&job.request.prompt)
                .unwrap_or_default()
                .into_iter()
                .map(|tag| (tag.name, "0123456789ab".to_string()))
                .collect(),
            embeddings: Vec::new(),
        })
    }
}

pub struct Fixture {
    pub harness: Harness<'static, AtelierApp>,
    pub seen: Arc<Mutex<Seen>>,
    pub steps: SyncSender<()>,
    /// The gallery's folder for this test (never the artist's own library).
    pub library: tempfile::TempDir,
}

pub fn settings() -> Settings {
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

pub fn start(
    settings: Settings,
    gated: bool,
    fail_load: bool,
    fail_generate: Option<&str>,
) -> Fixture {
    let library = tempfile::tempdir().unwrap();
    start_with_library(settings, gated, fail_load, fail_generate, library)
}

pub fn start_with_library(
    mut settings: Settings,
    gated: bool,
    fail_load: bool,
    fail_generate: Option<&str>,
    library: tempfile::TempDir,
) -> Fixture {
    settings.library_dir = library.path().display().to_string();
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
        library,
    };
    fixture.wait_for("the model to load", |app| {
        !matches!(app.model, ModelState::Loading { .. })
    });
    fixture
}

impl Fixture {
    pub fn app(&self) -> &AtelierApp {
        self.harness.state()
    }

    /// Steps the UI until `done` holds (the worker runs on its own thread).
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&AtelierApp) -> bool) {
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
    pub fn click(&mut self, label: &str) {
        self.harness.get_by_label(label).click();
        self.harness.step();
        self.harness.step();
    }

    pub fn wait_for_jobs(&mut self, count: usize) {
        let seen = self.seen.clone();
        self.wait_for(&format!("{count} jobs"), move |_| {
            seen.lock().unwrap().jobs.len() >= count
        });
    }

    pub fn type_prompt(&mut self, text: &str) {
        let prompt = self.harness.get_by_label("Prompt");
        prompt.focus();
        prompt.type_text(text);
        self.harness.step();
        self.harness.step();
    }

    pub fn allow_steps(&self, count: usize) {
        for _ in 0..count {
            self.steps.send(()).unwrap();
        }
    }

    /// Sets the slider labelled `label` as a screen reader would, and draws a frame.
    pub fn set_slider(&mut self, label: &str, value: f64) {
        self.harness
            .get_by_role_and_label(egui::Role::Slider, label)
            .set_value_accesskit(value);
        self.harness.step();
    }

    pub fn jobs(&self) -> Vec<GenerationRequest> {
        self.seen.lock().unwrap().jobs.clone()
    }

    /// Waits for `count` jobs and checks the last one.
    pub fn wait_jobs_then_check(&mut self, count: usize, check: impl Fn(&GenerationRequest)) {
        self.wait_for_jobs(count);
        check(self.jobs().last().unwrap());
    }
}

/// The real engine behind the window, on the fixture model.
pub fn start_real(library: tempfile::TempDir, steps: usize) -> Fixture {
    let model_dir =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd1/model");
    let settings = Settings {
        library_dir: library.path().display().to_string(),
        model: model_dir.display().to_string(),
        device: "cpu".into(),
        prompt: "a red fox".into(),
        seed: 5,
        seed_locked: true,
        steps,
        width: 64,
        height: 48,
        vae_preview_every: 2,
        ..Default::default()
    };
    start_real_with(settings, library)
}

/// The real engine behind the window with `settings` (their library is `library`), once the
/// model has loaded.
pub fn start_real_with(settings: Settings, library: tempfile::TempDir) -> Fixture {
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
        seen: Default::default(),
        steps: sync_channel(1).0,
        library,
    };
    f.wait_for("the model to load", |app| {
        matches!(app.model, ModelState::Ready(_))
    });
    f
}
