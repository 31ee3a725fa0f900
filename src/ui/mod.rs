//! The studio window: egui panels that draw state and send commands; no model code here.

mod canvas;
pub mod compare;
mod controls;
pub mod gallery;
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
use crate::gallery::library::{Library, now_unix};
use crate::gallery::record::ImageMetadata;
use crate::gallery::worker::{GalleryCommand, GalleryEvent, GalleryHandle};
use crate::schedulers::{SchedulerKind, SigmaSchedule};
use crate::worker::{
    Command, Engine, Event, Job, JobId, ModelInfo, SendError, UserError, WorkerHandle,
};
use compare::{CellState, CompareView};
use gallery::GalleryView;
use queue::JobQueue;
use settings::Settings;

/// The window's tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Tab {
    /// Prompt, preview, result.
    #[default]
    Studio,
    /// Every past image.
    Gallery,
    /// Samplers side by side.
    Compare,
}

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
    /// Show another tab.
    SwitchTab(Tab),
    /// Open (or close) an image's details in the gallery.
    SelectImage(Option<i64>),
    /// Ask for a gallery thumbnail.
    RequestThumbnail(String),
    /// Fill the prompt panel with a gallery image's parameters.
    UseSettings(i64),
    /// Take a gallery image's seed (locked).
    UseSeed(i64),
    /// Mark or unmark a favourite.
    SetFavourite(i64, bool),
    /// Move a gallery image to the trash.
    DeleteImage(i64),
    /// Bring the last deleted image back.
    UndoDelete,
    /// Show the library folder in the file manager.
    OpenGalleryFolder,
    /// Save a copy of a gallery image elsewhere.
    ExportImage(i64),
    /// Ask for PNGs to import.
    ImportDialog,
    /// Import these PNGs.
    ImportFiles(Vec<std::path::PathBuf>),
    /// Re-read every PNG of the library.
    RebuildGallery,
    /// Open the library folder the settings name.
    OpenLibrary,
    /// Queue the comparison the Compare tab describes.
    RunComparison,
    /// Stop the comparison's remaining cells.
    CancelComparison,
    /// Save the comparison grid as one PNG.
    SaveGrid,
    /// Show a comparison cell large (or go back to the grid).
    EnlargeCell(Option<usize>),
    /// Reopen a saved comparison from the gallery.
    OpenComparison(String),
    /// Take a gallery image's settings to the Compare tab.
    CompareFromImage(i64),
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
    /// Frames drawn on the Gallery tab.
    pub gallery_frames: u64,
    /// Their total time.
    pub gallery_total_ms: f64,
    /// The slowest of them.
    pub gallery_max_ms: f64,
}

/// What the Studio panels read besides the settings: the engine as the window knows it.
pub struct StudioState<'a> {
    /// Where the model stands.
    pub model: &'a ModelState,
    /// Waiting jobs.
    pub queue: &'a JobQueue,
    /// The job the engine runs.
    pub running: &'a Option<RunningJob>,
    /// The last finished image.
    pub shown: &'a Option<ShownImage>,
    /// The live preview of the running job.
    pub preview: &'a Option<TextureHandle>,
    /// The error to show.
    pub error: &'a Option<UserError>,
    /// Warnings of the last job.
    pub warnings: &'a [String],
    /// UI timing.
    pub frame_stats: &'a FrameStats,
}

/// The [`StudioState`] of an app, borrowing only those fields (a macro, so that the settings can
/// be borrowed mutably beside it).
macro_rules! studio_state {
    ($app:expr) => {
        StudioState {
            model: &$app.model,
            queue: &$app.queue,
            running: &$app.running,
            shown: &$app.shown,
            preview: &$app.preview,
            error: &$app.error,
            warnings: &$app.warnings,
            frame_stats: &$app.frame_stats,
        }
    };
}

enum DialogResult {
    Folder(std::path::PathBuf),
    Saved(std::path::PathBuf),
    SaveFailed(String),
    Import(Vec<std::path::PathBuf>),
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
    /// The tab shown.
    pub tab: Tab,
    /// The Gallery tab's state.
    pub gallery: GalleryView,
    /// The Compare tab's state.
    pub compare: CompareView,
    gallery_handle: Option<GalleryHandle>,
    last_gallery_query: Option<crate::gallery::library::GalleryQuery>,
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
        let repaint = ctx.clone();
        let gallery_handle = GalleryHandle::spawn(Arc::new(move || repaint.request_repaint()))?;
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
            tab: Tab::Studio,
            gallery: GalleryView::default(),
            compare: CompareView::default(),
            gallery_handle: Some(gallery_handle),
            last_gallery_query: None,
            next_job_id: 1,
            generate_pressed_at: None,
            dialog_sender,
            dialog_receiver,
        };
        if !app.settings.model.is_empty() {
            let model = app.settings.model.clone();
            app.load_model(model);
        }
        app.open_library();
        Ok(app)
    }

    /// Opens the library the settings name (or the platform's default one).
    pub fn open_library(&mut self) {
        let root = if self.settings.library_dir.trim().is_empty() {
            Library::default_root()
        } else {
            Some(std::path::PathBuf::from(self.settings.library_dir.trim()))
        };
        let Some(root) = root else {
            self.gallery.status =
                "No data folder on this system: choose a library folder in Settings.".into();
            return;
        };
        self.gallery.root = None;
        self.last_gallery_query = None;
        if let Some(handle) = &mut self.gallery_handle {
            handle.send(GalleryCommand::Open(root));
        }
    }

    fn gallery_send(&mut self, command: GalleryCommand) {
        let sent = self
            .gallery_handle
            .as_mut()
            .is_some_and(|handle| handle.send(command));
        if !sent {
            self.show_error(
                "The gallery has stopped.",
                "Restart Atelier; your images are safe in the library folder.",
            );
        }
    }

    fn gallery_entry(&self, id: i64) -> Option<crate::gallery::library::GalleryEntry> {
        self.gallery.entries.iter().find(|e| e.id == id).cloned()
    }

    fn handle_gallery_event(&mut self, ctx: &egui::Context, event: GalleryEvent) {
        match event {
            GalleryEvent::Opened { root, report } => {
                let mut messages = report.messages(3);
                if report.added > 0 && !report.rebuilt_corrupt_index {
                    messages.push(format!("{} new image(s) found in the folder", report.added));
                }
                self.gallery.status = messages.join("\n");
                self.gallery.root = Some(root);
                self.gallery.stale = true;
            }
            GalleryEvent::Saved(_) | GalleryEvent::Changed => self.gallery.stale = true,
            GalleryEvent::Results {
                query,
                entries,
                models,
                schedulers,
                search_ms,
            } => {
                if self.last_gallery_query.as_ref() == Some(&query) {
                    self.gallery.entries = entries;
                    self.gallery.models = models;
                    self.gallery.schedulers = schedulers;
                    self.gallery.search_ms = search_ms;
                }
            }
            GalleryEvent::Deleted(entry) => {
                if self.gallery.selected == Some(entry.id) {
                    self.gallery.selected = None;
                }
                self.gallery.last_deleted = Some(entry);
                self.gallery.stale = true;
            }
            GalleryEvent::Restored(entry) => {
                self.gallery.last_deleted = None;
                self.gallery.selected = Some(entry.id);
                self.gallery_send(GalleryCommand::LoadImage(entry.id));
                self.gallery.stale = true;
            }
            GalleryEvent::Imported { added, failed } => {
                self.gallery.status = format!("Imported {} image(s)", added.len());
                if !failed.is_empty() {
                    self.show_error(
                        format!(
                            "{} file(s) could not be imported: {}",
                            failed.len(),
                            failed.join("; ")
                        ),
                        "Only PNGs with generation parameters (AUTOMATIC1111, ComfyUI, InvokeAI, Atelier) can be imported; nothing else was changed.",
                    );
                }
                self.gallery.stale = true;
            }
            GalleryEvent::Image { id, image } => {
                let options = if image.width() < 256 {
                    TextureOptions::NEAREST
                } else {
                    TextureOptions::LINEAR
                };
                let texture = ctx.load_texture("gallery-full", color_image(&image), options);
                self.gallery.full_image = Some((id, texture));
            }
            GalleryEvent::Comparison { entries, images } => {
                self.reopen_comparison(ctx, &entries, images)
            }
            GalleryEvent::Failed(message) => self.show_error(
                message,
                "Check that the library folder (Settings) exists and is writable.",
            ),
        }
    }

    fn use_settings(&mut self, id: i64) {
        let Some(entry) = self.gallery_entry(id) else {
            return;
        };
        let mut request = self.current_request(self.settings.seed);
        let skipped = entry.metadata.apply_to(&mut request);
        let s = &mut self.settings;
        s.prompt = request.prompt;
        s.negative_prompt = request.negative_prompt;
        s.seed = request.seed;
        s.seed_locked = entry.metadata.seed.is_some() || s.seed_locked;
        s.steps = request.steps;
        s.guidance = request.guidance_scale;
        s.width = request.width;
        s.height = request.height;
        s.scheduler = request.scheduler.id().to_string();
        s.sigma_schedule = request.sigmas;
        s.eta = request.eta;
        self.warnings = skipped
            .into_iter()
            .map(|s| format!("Not used from the gallery image: {s}"))
            .collect();
        self.tab = Tab::Studio;
    }

    fn spawn_dialog(
        &mut self,
        ctx: &egui::Context,
        name: &str,
        dialog: impl FnOnce() -> Option<DialogResult> + Send + 'static,
    ) {
        let sender = self.dialog_sender.clone();
        let repaint = ctx.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("atelier-{name}"))
            .spawn(move || {
                if let Some(result) = dialog() {
                    let _ = sender.send(result);
                    repaint.request_repaint();
                }
            });
        if let Err(e) = spawned {
            self.show_error(format!("cannot open the {name} dialog: {e}"), "Try again.");
        }
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
                if let Some(&index) = self.compare.job_cells.get(&id)
                    && let Some(cell) = self.compare.cells.get_mut(index)
                {
                    cell.state = CellState::Running(update.steps_done, update.total_steps);
                    if let Some(preview) = &update.preview {
                        cell.preview = Some(ctx.load_texture(
                            format!("compare-preview-{index}"),
                            color_image(preview),
                            TextureOptions::LINEAR,
                        ));
                    }
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
                let comparison = self.compare_cell_finished(ctx, id, &output);
                self.warnings = output.warnings;
                if let Some(running) = &running {
                    self.save_to_gallery(running, &output.images, output.timings, comparison);
                }
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
                self.compare_cell_failed(id, "cancelled");
                if self.running.as_ref().is_some_and(|r| r.job.id == id) {
                    self.running = None;
                    self.preview = None;
                }
            }
            Event::JobFailed { id, error } => {
                self.compare_cell_failed(id, "failed");
                if self.running.as_ref().is_some_and(|r| r.job.id == id) {
                    self.running = None;
                    self.preview = None;
                }
                self.error = Some(error);
            }
        }
    }

    /// Every finished image goes into the gallery (image k of a batch has seed + k).
    fn save_to_gallery(
        &mut self,
        running: &RunningJob,
        images: &[RgbImage],
        timings: Timings,
        comparison: Option<crate::gallery::record::ComparisonRef>,
    ) {
        let (model, weights) = match &self.model {
            ModelState::Ready(info) => (info.name.clone(), info.weights_path.clone()),
            _ => (String::new(), None),
        };
        for (k, image) in images.iter().enumerate() {
            let mut request = running.job.request.clone();
            request.seed = request.seed.wrapping_add(k as u64);
            let mut metadata =
                ImageMetadata::for_generation(&request, &model, None, timings, now_unix());
            metadata.comparison = comparison.clone();
            self.gallery_send(GalleryCommand::Save {
                image: image.clone(),
                metadata: Box::new(metadata),
                weights: weights.clone(),
            });
        }
    }

    /// Fills a comparison cell with its finished image; returns where it sits, for the gallery.
    fn compare_cell_finished(
        &mut self,
        ctx: &egui::Context,
        id: JobId,
        output: &crate::worker::JobOutput,
    ) -> Option<crate::gallery::record::ComparisonRef> {
        let index = self.compare.job_cells.remove(&id)?;
        let plan = self.compare.plan.as_ref()?;
        let cell_request = &plan.cells()[index].request;
        let result = crate::compare::CellResult {
            total_secs: output.timings.total_secs,
            model_evaluations: cell_request.scheduler.model_evaluations(cell_request.steps),
        };
        let reference = crate::gallery::record::ComparisonRef {
            id: plan.id.clone(),
            row: index / plan.columns(),
            column: index % plan.columns(),
            plan_json: serde_json::to_string(plan).unwrap_or_default(),
        };
        let cell = self.compare.cells.get_mut(index)?;
        if let Some(image) = output.images.first() {
            let texture = ctx.load_texture(
                format!("compare-cell-{index}"),
                color_image(image),
                TextureOptions::LINEAR,
            );
            cell.image = Some((image.clone(), texture));
        }
        cell.result = Some(result);
        cell.state = CellState::Done;
        Some(reference)
    }

    fn compare_cell_failed(&mut self, id: JobId, why: &str) {
        if let Some(index) = self.compare.job_cells.remove(&id)
            && let Some(cell) = self.compare.cells.get_mut(index)
        {
            cell.state = CellState::Failed(why.into());
        }
    }

    fn run_comparison(&mut self) {
        if !matches!(self.model, ModelState::Ready(_)) {
            self.compare.error = Some("Load a model first (Studio tab).".into());
            return;
        }
        let axis = match self.compare.axis() {
            Ok(axis) => axis,
            Err(e) => {
                self.compare.error = Some(e);
                return;
            }
        };
        let base = self.current_request(self.settings.seed);
        let plan = match crate::compare::ComparisonPlan::new(
            crate::compare::new_comparison_id(),
            base,
            self.compare.samplers.clone(),
            axis,
        ) {
            Ok(plan) => plan,
            Err(e) => {
                self.compare.error = Some(e);
                return;
            }
        };
        self.compare.error = None;
        let cells = plan.cells();
        self.compare.start(plan);
        for (index, cell) in cells.into_iter().enumerate() {
            let id = self.next_job_id;
            self.next_job_id += 1;
            self.queue.push(Job {
                id,
                request: cell.request,
                preview: PreviewOptions {
                    vae_decode_every: self.settings.vae_preview_every,
                },
                cancel: Arc::new(AtomicBool::new(false)),
            });
            self.compare.job_cells.insert(id, index);
        }
    }

    fn cancel_comparison(&mut self) {
        let ids: Vec<JobId> = self.compare.job_cells.keys().copied().collect();
        for id in ids {
            if self.queue.remove(id) {
                self.compare_cell_failed(id, "cancelled");
            } else if let Some(running) = self.running.as_mut().filter(|r| r.job.id == id) {
                running.job.cancel.store(true, Ordering::Relaxed);
                running.cancelling = true;
            }
        }
    }

    fn save_grid(&mut self, ctx: &egui::Context) {
        let Some(plan) = self.compare.plan.clone() else {
            return;
        };
        let (images, results) = self.compare.finished();
        let model_name = match &self.model {
            ModelState::Ready(info) => info.name.clone(),
            _ => String::new(),
        };
        let file_name = format!("{}.png", plan.id);
        self.spawn_dialog(ctx, "save-grid", move || {
            let path = rfd::FileDialog::new()
                .set_file_name(file_name)
                .add_filter("PNG image", &["png"])
                .save_file()?;
            let grid = crate::compare::render_grid(&plan, &images, &results);
            let record = crate::compare::GridRecord { plan, results };
            Some(
                match crate::compare::save_grid(&path, &grid, &record, &model_name) {
                    Ok(()) => DialogResult::Saved(path),
                    Err(e) => DialogResult::SaveFailed(e.to_string()),
                },
            )
        });
    }

    /// Shows a comparison rebuilt from its cells in the gallery.
    fn reopen_comparison(
        &mut self,
        ctx: &egui::Context,
        entries: &[crate::gallery::library::GalleryEntry],
        images: Vec<(String, RgbImage)>,
    ) {
        let Some(crate::compare::ReopenedComparison {
            plan,
            files,
            results,
        }) = crate::compare::from_cells(entries)
        else {
            self.show_error(
                "This comparison cannot be reopened: its cells carry no readable plan.",
                "The images themselves are still in the gallery.",
            );
            return;
        };
        let mut by_file: std::collections::HashMap<String, RgbImage> = images.into_iter().collect();
        self.compare.samplers = plan.samplers.clone();
        let (row_kind, row_values) = compare::row_picker(&plan.y);
        self.compare.row_kind = row_kind;
        self.compare.row_values = row_values;
        // The Studio panel takes the comparison's base, so that Run repeats it.
        let base = &plan.base;
        let s = &mut self.settings;
        s.prompt = base.prompt.clone();
        s.negative_prompt = base.negative_prompt.clone();
        s.seed = base.seed;
        s.seed_locked = true;
        s.steps = base.steps;
        s.guidance = base.guidance_scale;
        s.width = base.width;
        s.height = base.height;
        s.eta = base.eta;
        self.compare.start(plan);
        for (index, (file, result)) in files.into_iter().zip(results).enumerate() {
            let cell = &mut self.compare.cells[index];
            match file.and_then(|f| by_file.remove(&f)) {
                Some(image) => {
                    let texture = ctx.load_texture(
                        format!("compare-cell-{index}"),
                        color_image(&image),
                        TextureOptions::LINEAR,
                    );
                    cell.image = Some((image, texture));
                    cell.result = result;
                    cell.state = CellState::Done;
                }
                None => cell.state = CellState::Failed("not in the gallery".into()),
            }
        }
        self.tab = Tab::Compare;
    }

    fn apply(&mut self, ctx: &egui::Context, command: UiCommand) {
        match command {
            UiCommand::Generate => self.generate(),
            UiCommand::Cancel => self.cancel(),
            UiCommand::RemoveQueued(id) => {
                self.queue.remove(id);
                self.compare_cell_failed(id, "removed from the queue");
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
            UiCommand::SwitchTab(tab) => {
                if tab == Tab::Gallery && self.tab != Tab::Gallery && self.gallery.root.is_some() {
                    // Other tools may have dropped PNGs into the folder meanwhile.
                    self.gallery_send(GalleryCommand::Sync);
                }
                self.tab = tab;
            }
            UiCommand::SelectImage(id) => {
                self.gallery.selected = id;
                if let Some(id) = id
                    && self.gallery.full_image.as_ref().map(|(shown, _)| *shown) != Some(id)
                {
                    self.gallery_send(GalleryCommand::LoadImage(id));
                }
            }
            UiCommand::RequestThumbnail(file) => {
                if let (Some(handle), Some(root)) = (&self.gallery_handle, &self.gallery.root)
                    && handle.request_thumbnail(root, &file)
                {
                    self.gallery.thumbnails_requested.insert(file);
                }
            }
            UiCommand::UseSettings(id) => self.use_settings(id),
            UiCommand::UseSeed(id) => {
                if let Some(seed) = self.gallery_entry(id).and_then(|e| e.metadata.seed) {
                    self.settings.seed = seed;
                    self.settings.seed_locked = true;
                    self.tab = Tab::Studio;
                }
            }
            UiCommand::SetFavourite(id, favourite) => {
                self.gallery_send(GalleryCommand::SetFavourite(id, favourite))
            }
            UiCommand::DeleteImage(id) => self.gallery_send(GalleryCommand::Delete(id)),
            UiCommand::UndoDelete => self.gallery_send(GalleryCommand::UndoDelete),
            UiCommand::OpenGalleryFolder => {
                if let Some(root) = self.gallery.root.clone() {
                    // Spawns the file manager; never waits for it.
                    if let Err(e) = open::that_detached(&root) {
                        self.show_error(
                            format!("cannot open {}: {e}", root.display()),
                            "Open the folder from your file manager.",
                        );
                    }
                }
            }
            UiCommand::ExportImage(id) => {
                if let (Some(entry), Some(root)) =
                    (self.gallery_entry(id), self.gallery.root.clone())
                {
                    let source = root.join(&entry.file);
                    let file_name = entry.file.clone();
                    self.spawn_dialog(ctx, "export", move || {
                        let target = rfd::FileDialog::new()
                            .set_file_name(file_name)
                            .add_filter("PNG image", &["png"])
                            .save_file()?;
                        Some(match std::fs::copy(&source, &target) {
                            Ok(_) => DialogResult::Saved(target),
                            Err(e) => {
                                DialogResult::SaveFailed(format!("{}: {e}", target.display()))
                            }
                        })
                    });
                }
            }
            UiCommand::ImportDialog => self.spawn_dialog(ctx, "import", || {
                rfd::FileDialog::new()
                    .set_title("Import PNGs from other tools")
                    .add_filter("PNG image", &["png"])
                    .pick_files()
                    .map(DialogResult::Import)
            }),
            UiCommand::ImportFiles(paths) => self.gallery_send(GalleryCommand::Import(paths)),
            UiCommand::OpenLibrary => self.open_library(),
            UiCommand::RunComparison => self.run_comparison(),
            UiCommand::CancelComparison => self.cancel_comparison(),
            UiCommand::SaveGrid => self.save_grid(ctx),
            UiCommand::EnlargeCell(index) => {
                self.compare.enlarged = index;
                self.compare.flipping = false;
            }
            UiCommand::OpenComparison(id) => self.gallery_send(GalleryCommand::LoadComparison(id)),
            UiCommand::CompareFromImage(id) => {
                self.use_settings(id);
                self.tab = Tab::Compare;
            }
            UiCommand::RebuildGallery => {
                self.gallery.status = "Rebuilding the index…".into();
                self.gallery_send(GalleryCommand::Rebuild);
            }
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

    /// Applies a command as a click would (for tests that cannot drag and drop files).
    pub fn apply_for_test(&mut self, command: UiCommand) {
        let ctx = egui::Context::default();
        self.apply(&ctx, command);
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
                DialogResult::Import(paths) => self.gallery_send(GalleryCommand::Import(paths)),
            }
        }
        let mut gallery_events = Vec::new();
        let mut thumbnails = Vec::new();
        if let Some(handle) = &mut self.gallery_handle {
            while let Some(event) = handle.try_recv() {
                gallery_events.push(event);
            }
            while let Some(ready) = handle.try_thumbnail() {
                thumbnails.push(ready);
            }
        }
        for event in gallery_events {
            self.handle_gallery_event(ctx, event);
        }
        for ready in thumbnails {
            self.gallery.thumbnails_requested.remove(&ready.file);
            if let Ok(image) = ready.image {
                let texture = ctx.load_texture(
                    format!("thumb-{}", ready.file),
                    color_image(&image),
                    TextureOptions::LINEAR,
                );
                self.gallery.thumbnails.insert(ready.file, texture);
            }
        }
        if self.gallery.root.is_some() {
            // The date filter moves with the clock by the hour, not every frame.
            let now = now_unix();
            let query = self.gallery.query(now - now % 3600);
            if self.gallery.stale || self.last_gallery_query.as_ref() != Some(&query) {
                self.gallery.stale = false;
                self.last_gallery_query = Some(query.clone());
                self.gallery_send(GalleryCommand::Search(query));
            }
        }
        self.start_next_job();
    }
    /// The Studio tab: controls, canvas, queue.
    fn studio_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<UiCommand>) {
        let busy = self.busy();
        let studio = studio_state!(self);
        let settings = &mut self.settings;
        let model_input = &mut self.model_input;
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(340.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| {
                    controls::controls_ui(ui, settings, model_input, studio.model, busy, commands)
                });
            });
        egui::Panel::right("queue")
            .resizable(true)
            .default_size(220.0)
            .show(ui, |ui| queue::queue_ui(ui, studio.queue, commands));
        egui::CentralPanel::default_margins()
            .show(ui, |ui| canvas::canvas_ui(ui, settings, &studio, commands));
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
        let dropped: Vec<std::path::PathBuf> = ctx.input(|input| {
            input
                .raw
                .dropped_files
                .iter()
                .map(|file| file.path().to_path_buf())
                .filter(|path| !path.as_os_str().is_empty())
                .collect()
        });
        if !dropped.is_empty() {
            self.tab = Tab::Gallery;
            self.apply(ctx, UiCommand::ImportFiles(dropped));
        }
        self.process_events(ctx);
    }

    fn ui(&mut self, ui: &mut egui::Ui, frame: &mut eframe::Frame) {
        let started = Instant::now();
        // eframe measures the whole previous frame (ui, tessellation, rendering); without it
        // (the first frame, test harnesses) count this ui() alone.
        let previous_frame_ms = frame.info().cpu_usage.map(|secs| secs as f64 * 1e3);
        let mut commands = Vec::new();
        egui::Panel::top("tabs").show(ui, |ui| {
            ui.horizontal(|ui| {
                for (tab, label) in [
                    (Tab::Studio, "Studio"),
                    (Tab::Gallery, "Gallery"),
                    (Tab::Compare, "Compare"),
                ] {
                    if ui.selectable_label(self.tab == tab, label).clicked() {
                        commands.push(UiCommand::SwitchTab(tab));
                    }
                }
            });
        });
        egui::Panel::bottom("status")
            .show(ui, |ui| canvas::status_bar_ui(ui, &studio_state!(self)));
        match self.tab {
            Tab::Gallery => {
                egui::CentralPanel::default_margins()
                    .show(ui, |ui| gallery::gallery_ui(ui, &mut self.gallery, &mut commands));
            }
            Tab::Compare => {
                egui::CentralPanel::default_margins().show(ui, |ui| {
                    compare::compare_ui(
                        ui,
                        &mut self.compare,
                        &self.settings,
                        &self.model,
                        &mut commands,
                    )
                });
            }
            Tab::Studio => self.studio_ui(ui, &mut commands),
        }
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
        if self.tab == Tab::Gallery {
            let stats = &mut self.frame_stats;
            stats.gallery_frames += 1;
            stats.gallery_total_ms += frame_ms;
            stats.gallery_max_ms = stats.gallery_max_ms.max(frame_ms);
            if stats.gallery_frames.is_multiple_of(50)
                && std::env::var_os("ATELIER_STATS").is_some()
            {
                // For measuring the gallery (scripts/screenshots.sh).
                eprintln!(
                    "gallery: {} images, {} UI frames, mean {:.2} ms, max {:.2} ms",
                    self.gallery.entries.len(),
                    stats.gallery_frames,
                    stats.gallery_total_ms / stats.gallery_frames as f64,
                    stats.gallery_max_ms
                );
            }
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
