//! The studio window: egui panels that draw state and send commands; no model code here.

mod canvas;
mod controls;
pub mod queue;
pub mod settings;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use egui::{ColorImage, TextureHandle, TextureOptions};
use image::RgbImage;

use crate::engine::pipeline::{DeviceChoice, GenerationRequest, PreviewOptions, Timings};
use crate::engine::source::LoadProgress;
use crate::schedulers::{SchedulerKind, SigmaSchedule};
use crate::worker::{
    Command, Engine, Event, Job, JobId, ModelInfo, SendError, UserError, WorkerHandle,
};
use queue::JobQueue;
use settings::Settings;

/// What the panels ask for; applied once at the end of the frame.
#[derive(Debug, Clone, PartialEq)]
pub enum UiCommand {
    /// Queue jobs with the current parameters.
    Generate,
    /// Stop the running job.
    Cancel,
    /// Remove a queued job.
    RemoveQueued(JobId),
    /// Move a queued job by an offset.
    MoveQueued(JobId, isize),
    /// Load a model (folder or repo id).
    LoadModel(String),
    /// Ask for a model folder.
    OpenFolder,
    /// Save the shown image.
    SaveAs,
    /// Copy the shown image's seed.
    CopySeed,
    /// Copy the shown image's prompt.
    CopyPrompt,
    /// Draw a random seed.
    RandomSeed,
    /// Hide the error banner.
    DismissError,
}

/// Where the model stands.
pub enum ModelState {
    /// None chosen yet.
    Empty,
    /// Loading (or downloading).
    Loading {
        /// Folder or repo id.
        model: String,
        /// The latest progress report.
        progress: Option<LoadProgress>,
    },
    /// Ready to generate.
    Ready(ModelInfo),
    /// Loading failed.
    Failed {
        /// Folder or repo id.
        model: String,
    },
}

/// The job on the engine right now.
pub struct RunningJob {
    /// The job.
    pub job: Job,
    /// Steps done.
    pub steps_done: usize,
    /// Steps in all.
    pub total_steps: usize,
    /// Seconds since it started, as the engine measures.
    pub elapsed_secs: f64,
    /// Whether Cancel was pressed.
    pub cancelling: bool,
}

/// The image in the centre.
pub struct ShownImage {
    /// The pixels (for saving).
    pub image: RgbImage,
    /// On the GPU.
    pub texture: TextureHandle,
    /// How it was made.
    pub request: GenerationRequest,
    /// The model's name.
    pub model_name: String,
    /// Where the time went.
    pub timings: Timings,
}

/// UI-thread CPU time per frame (eframe's `cpu_usage`: ui, tessellation and rendering), for the
/// status bar and the README's figures.
#[derive(Debug, Default, Clone, Copy)]
pub struct FrameStats {
    /// The last frame's UI time in milliseconds.
    pub last_ms: f64,
    /// The slowest frame while a job ran.
    pub max_while_busy_ms: f64,
    /// Frames drawn while a job ran.
    pub frames_while_busy: u64,
    /// Total UI time of those frames.
    pub total_while_busy_ms: f64,
    /// Seconds from the last Generate to its first preview.
    pub first_preview_secs: Option<f64>,
}

enum DialogResult {
    Folder(std::path::PathBuf),
    Saved(std::path::PathBuf),
    SaveFailed(String),
}

/// The application.
pub struct AtelierApp {
    /// Persisted settings and last parameters.
    pub settings: Settings,
    worker: WorkerHandle,
    /// The model's state.
    pub model: ModelState,
    /// Waiting jobs.
    pub queue: JobQueue,
    /// The job the engine runs.
    pub running: Option<RunningJob>,
    /// The last finished image.
    pub shown: Option<ShownImage>,
    /// The live preview of the running job.
    pub preview: Option<TextureHandle>,
    /// The error to show, if any.
    pub error: Option<UserError>,
    /// Warnings of the last job.
    pub warnings: Vec<String>,
    /// UI timing.
    pub frame_stats: FrameStats,
    /// The model path or repo id being typed.
    pub model_input: String,
    next_job_id: JobId,
    generate_pressed_at: Option<(JobId, Instant)>,
    dialog_sender: SyncSender<DialogResult>,
    dialog_receiver: Receiver<DialogResult>,
}

impl AtelierApp {
    /// Creates the app with `engine` on its worker thread and `settings` (the remembered ones,
    /// see [`Settings::STORAGE_KEY`]); fails only if the engine thread cannot start.
    pub fn with_settings(
        ctx: &egui::Context,
        engine: Box<dyn Engine>,
        settings: Settings,
    ) -> std::io::Result<Self> {
        let repaint = ctx.clone();
        let worker = WorkerHandle::spawn(engine, Arc::new(move || repaint.request_repaint()))?;
        let (dialog_sender, dialog_receiver) = sync_channel(4);
        let mut app = Self {
            settings,
            worker,
            model: ModelState::Empty,
            queue: JobQueue::default(),
            running: None,
            shown: None,
            preview: None,
            error: None,
            warnings: Vec::new(),
            frame_stats: FrameStats::default(),
            model_input: String::new(),
            next_job_id: 1,
            generate_pressed_at: None,
            dialog_sender,
            dialog_receiver,
        };
        if !app.settings.model.is_empty() {
            let model = app.settings.model.clone();
            app.load_model(model);
        }
        Ok(app)
    }

    /// Whether the engine is running a job.
    pub fn busy(&self) -> bool {
        self.running.is_some()
    }

    fn load_model(&mut self, model: String) {
        let device = DeviceChoice::parse(&self.settings.device).unwrap_or(DeviceChoice::Auto);
        match self.worker.send(Command::LoadModel {
            model: model.clone(),
            device,
        }) {
            Ok(()) => {
                self.settings.model = model.clone();
                self.model = ModelState::Loading {
                    model,
                    progress: None,
                };
            }
            Err(e) => self.show_error(e.to_string(), "Wait for the current job, then try again."),
        }
    }

    fn show_error(&mut self, message: impl Into<String>, hint: impl Into<String>) {
        self.error = Some(UserError {
            message: message.into(),
            hint: hint.into(),
        });
    }

    /// The request the panels describe, for seed `seed`.
    pub fn current_request(&self, seed: u64) -> GenerationRequest {
        let s = &self.settings;
        let scheduler = SchedulerKind::parse(&s.scheduler).unwrap_or(SchedulerKind::Euler);
        GenerationRequest {
            prompt: s.prompt.clone(),
            negative_prompt: s.negative_prompt.clone(),
            seed,
            steps: s.steps,
            guidance_scale: s.guidance,
            width: s.width,
            height: s.height,
            batch_size: 1,
            scheduler,
            sigmas: if scheduler.supports(s.sigma_schedule) {
                s.sigma_schedule
            } else {
                SigmaSchedule::Default
            },
            eta: if scheduler == SchedulerKind::Ddim {
                s.eta.clamp(0.0, 1.0)
            } else {
                0.0
            },
        }
    }

    fn generate(&mut self) {
        if !matches!(
            self.model,
            ModelState::Ready(_) | ModelState::Loading { .. }
        ) {
            self.show_error(
                "No model is loaded.",
                "Choose a model in the picker on the left (a preset, a recent one, or \"Open folder…\").",
            );
            return;
        }
        if !self.settings.seed_locked {
            self.settings.seed = random_seed();
        }
        for k in 0..self.settings.batch_count.max(1) {
            let id = self.next_job_id;
            self.next_job_id += 1;
            let job = Job {
                id,
                request: self.current_request(self.settings.seed.wrapping_add(k as u64)),
                preview: PreviewOptions {
                    vae_decode_every: self.settings.vae_preview_every,
                },
                cancel: Arc::new(AtomicBool::new(false)),
            };
            if k == 0 && self.running.is_none() && self.queue.is_empty() {
                self.generate_pressed_at = Some((id, Instant::now()));
            }
            self.queue.push(job);
        }
        self.error = None;
    }

    fn cancel(&mut self) {
        if let Some(running) = &mut self.running {
            running.job.cancel.store(true, Ordering::Relaxed);
            running.cancelling = true;
        }
    }

    fn start_next_job(&mut self) {
        if self.running.is_some() || !matches!(self.model, ModelState::Ready(_)) {
            return;
        }
        let Some(job) = self.queue.pop() else {
            return;
        };
        let total_steps = job.request.scheduler.model_evaluations(job.request.steps);
        match self.worker.send(Command::Generate(job.clone())) {
            Ok(()) => {
                self.running = Some(RunningJob {
                    job,
                    steps_done: 0,
                    total_steps,
                    elapsed_secs: 0.0,
                    cancelling: false,
                });
                self.frame_stats.max_while_busy_ms = 0.0;
                self.frame_stats.frames_while_busy = 0;
                self.frame_stats.total_while_busy_ms = 0.0;
            }
            Err(SendError::Busy) => {
                // The job goes back to the front and is sent again next frame.
                self.queue.push_front(job);
            }
            Err(e) => {
                self.queue.push_front(job);
                self.show_error(
                    e.to_string(),
                    "Restart Atelier; the queue is kept until then.",
                );
            }
        }
    }

    fn handle_event(&mut self, ctx: &egui::Context, event: Event) {
        match event {
            Event::Loading(progress) => {
                if let ModelState::Loading { progress: slot, .. } = &mut self.model {
                    *slot = Some(progress);
                }
            }
            Event::ModelLoaded(info) => {
                self.settings.remember_model(&info.model);
                let multiple = info.size_multiple.max(1);
                self.settings.width = (self.settings.width / multiple).max(1) * multiple;
                self.settings.height = (self.settings.height / multiple).max(1) * multiple;
                self.model = ModelState::Ready(info);
            }
            Event::LoadFailed { model, error } => {
                self.model = ModelState::Failed { model };
                self.error = Some(error);
            }
            Event::JobStarted(_) => {}
            Event::JobProgress { id, update } => {
                if let Some(running) = self.running.as_mut().filter(|r| r.job.id == id) {
                    running.steps_done = update.steps_done;
                    running.total_steps = update.total_steps;
                    running.elapsed_secs = update.elapsed_secs;
                }
                if let Some(preview) = update.preview {
                    let texture =
                        ctx.load_texture("preview", color_image(&preview), TextureOptions::LINEAR);
                    self.preview = Some(texture);
                    if let Some((pressed_id, pressed_at)) = self.generate_pressed_at
                        && pressed_id == id
                    {
                        self.frame_stats.first_preview_secs =
                            Some(pressed_at.elapsed().as_secs_f64());
                        self.generate_pressed_at = None;
                    }
                }
            }
            Event::JobFinished { id, output } => {
                if std::env::var_os("ATELIER_STATS").is_some() {
                    // For measuring the window (scripts/screenshots.sh): one line per job.
                    let stats = &self.frame_stats;
                    eprintln!(
                        "job {id}: {} UI frames while generating, mean {:.2} ms, max {:.2} ms; first preview after Generate: {}",
                        stats.frames_while_busy,
                        stats.total_while_busy_ms / stats.frames_while_busy.max(1) as f64,
                        stats.max_while_busy_ms,
                        stats
                            .first_preview_secs
                            .map_or("n/a".to_string(), |s| format!("{s:.3} s"))
                    );
                }
                let running = self.running.take().filter(|r| r.job.id == id);
                self.preview = None;
                self.warnings = output.warnings;
                if let (Some(running), Some(image)) = (running, output.images.into_iter().next()) {
                    let texture =
                        ctx.load_texture("result", color_image(&image), TextureOptions::LINEAR);
                    self.shown = Some(ShownImage {
                        image,
                        texture,
                        request: running.job.request,
                        model_name: match &self.model {
                            ModelState::Ready(info) => info.name.clone(),
                            _ => String::new(),
                        },
                        timings: output.timings,
                    });
                }
            }
            Event::JobCancelled(id) => {
                if self.running.as_ref().is_some_and(|r| r.job.id == id) {
                    self.running = None;
                    self.preview = None;
                }
            }
            Event::JobFailed { id, error } => {
                if self.running.as_ref().is_some_and(|r| r.job.id == id) {
                    self.running = None;
                    self.preview = None;
                }
                self.error = Some(error);
            }
        }
    }

    fn apply(&mut self, ctx: &egui::Context, command: UiCommand) {
        match command {
            UiCommand::Generate => self.generate(),
            UiCommand::Cancel => self.cancel(),
            UiCommand::RemoveQueued(id) => {
                self.queue.remove(id);
            }
            UiCommand::MoveQueued(id, offset) => self.queue.shift(id, offset),
            UiCommand::LoadModel(model) => self.load_model(model),
            UiCommand::OpenFolder => {
                let sender = self.dialog_sender.clone();
                let repaint = ctx.clone();
                let spawned = std::thread::Builder::new()
                    .name("atelier-open-folder".into())
                    .spawn(move || {
                        if let Some(folder) = rfd::FileDialog::new()
                            .set_title("Choose a diffusers model folder")
                            .pick_folder()
                        {
                            let _ = sender.send(DialogResult::Folder(folder));
                            repaint.request_repaint();
                        }
                    });
                if let Err(e) = spawned {
                    self.show_error(
                        format!("cannot open the folder dialog: {e}"),
                        "Type the folder path instead.",
                    );
                }
            }
            UiCommand::SaveAs => self.save_as(ctx),
            UiCommand::CopySeed => {
                if let Some(shown) = &self.shown {
                    ctx.copy_text(shown.request.seed.to_string());
                }
            }
            UiCommand::CopyPrompt => {
                if let Some(shown) = &self.shown {
                    ctx.copy_text(shown.request.prompt.clone());
                }
            }
            UiCommand::RandomSeed => self.settings.seed = random_seed(),
            UiCommand::DismissError => self.error = None,
        }
    }

    fn save_as(&mut self, ctx: &egui::Context) {
        let Some(shown) = &self.shown else {
            return;
        };
        let image = shown.image.clone();
        let parameters = crate::gallery::metadata::A1111Parameters::for_request(
            &shown.request,
            &shown.model_name,
        )
        .to_text();
        let sender = self.dialog_sender.clone();
        let repaint = ctx.clone();
        let file_name = format!("atelier-{}.png", shown.request.seed);
        let spawned = std::thread::Builder::new()
            .name("atelier-save-as".into())
            .spawn(move || {
                let Some(path) = rfd::FileDialog::new()
                    .set_file_name(file_name)
                    .add_filter("PNG image", &["png"])
                    .save_file()
                else {
                    return;
                };
                let result = crate::gallery::metadata::write_png(
                    &path,
                    &image,
                    &[(crate::gallery::metadata::PARAMETERS_KEYWORD, &parameters)],
                );
                let _ = sender.send(match result {
                    Ok(()) => DialogResult::Saved(path),
                    Err(e) => DialogResult::SaveFailed(e.to_string()),
                });
                repaint.request_repaint();
            });
        if let Err(e) = spawned {
            self.show_error(format!("cannot open the save dialog: {e}"), "Try again.");
        }
    }

    /// Drains the worker's events and dialog results and starts queued work; never blocks.
    pub fn process_events(&mut self, ctx: &egui::Context) {
        while let Some(event) = self.worker.try_recv() {
            self.handle_event(ctx, event);
        }
        while let Ok(result) = self.dialog_receiver.try_recv() {
            match result {
                DialogResult::Folder(folder) => self.load_model(folder.display().to_string()),
                DialogResult::Saved(path) => {
                    self.warnings = vec![format!("saved {}", path.display())]
                }
                DialogResult::SaveFailed(message) => {
                    self.show_error(message, "Choose another folder.")
                }
            }
        }
        self.start_next_job();
    }
}

/// A random seed in A1111's range (32 bits).
pub fn random_seed() -> u64 {
    use rand::RngExt;
    rand::rng().random_range(0..4_294_967_296u64)
}

fn color_image(image: &RgbImage) -> ColorImage {
    ColorImage::from_rgb(
        [image.width() as usize, image.height() as usize],
        image.as_raw(),
    )
}

impl eframe::App for AtelierApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        // Shortcuts before any text box can take the keys.
        let (generate, cancel) = ctx.input_mut(|input| {
            (
                input.consume_key(egui::Modifiers::COMMAND, egui::Key::Enter),
                input.consume_key(egui::Modifiers::NONE, egui::Key::Escape),
            )
        });
        if generate {
            self.apply(ctx, UiCommand::Generate);
        }
        if cancel {
            self.apply(ctx, UiCommand::Cancel);
        }
        self.process_events(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let started = Instant::now();
        // eframe measures the whole previous frame (ui, tessellation, rendering); without it
        // (the first frame, test harnesses) count this ui() alone.
        let previous_frame_ms = frame.info().cpu_usage.map(|secs| secs as f64 * 1e3);
        let mut commands = Vec::new();
        egui::Panel::bottom("status").show(ui, |ui| canvas::status_bar_ui(ui, self));
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(340.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical()
                    .show(ui, |ui| controls::controls_ui(ui, self, &mut commands));
            });
        egui::Panel::right("queue")
            .resizable(true)
            .default_size(220.0)
            .show(ui, |ui| queue::queue_ui(ui, &self.queue, &mut commands));
        egui::CentralPanel::default_margins()
            .show(ui, |ui| canvas::canvas_ui(ui, self, &mut commands));
        let ctx = ui.ctx().clone();
        for command in commands {
            self.apply(&ctx, command);
        }
        if self.busy() {
            // Repaint as events arrive (the worker wakes us); keep the clock moving meanwhile.
            ctx.request_repaint_after(std::time::Duration::from_millis(250));
        }
        let frame_ms = previous_frame_ms.unwrap_or_else(|| started.elapsed().as_secs_f64() * 1e3);
        self.frame_stats.last_ms = frame_ms;
        if self.busy() {
            self.frame_stats.frames_while_busy += 1;
            self.frame_stats.total_while_busy_ms += frame_ms;
            self.frame_stats.max_while_busy_ms = self.frame_stats.max_while_busy_ms.max(frame_ms);
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, Settings::STORAGE_KEY, &self.settings);
    }

    fn on_exit(&mut self) {
        // Stop the running job within one step so the engine thread can be joined quickly.
        if let Some(running) = &self.running {
            running.job.cancel.store(true, Ordering::Relaxed);
        }
        for job in self.queue.iter() {
            job.cancel.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for AtelierApp {
    fn drop(&mut self) {
        if let Some(running) = &self.running {
            running.job.cancel.store(true, Ordering::Relaxed);
        }
    }
}
