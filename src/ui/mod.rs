//! The studio window: egui panels that draw state and send commands; no model code here.

mod canvas;
mod commands;
pub mod compare;
mod controls;
mod dialogs;
mod events;
pub mod gallery;
pub mod mask_editor;
mod mode_controls;
mod model_options;
mod prompt_highlight;
pub mod queue;
pub mod settings;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use egui::{ColorImage, TextureHandle};
use image::RgbImage;

use crate::engine::pipeline::{GenerationRequest, Timings};
use crate::engine::source::LoadProgress;
use crate::gallery::library::Library;
use crate::gallery::worker::{GalleryCommand, GalleryHandle};
use crate::schedulers::{SchedulerKind, SigmaSchedule};
use crate::worker::{Engine, Job, JobId, ModelInfo, UserError, WorkerHandle};
use compare::CompareView;
use dialogs::DialogResult;
use gallery::GalleryView;
use queue::JobQueue;
use settings::Settings;

pub use commands::UiCommand;

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
    /// Steps the job ran (fewer than the request's from a picture; both passes of a hires fix).
    pub steps_run: usize,
    /// Whether a hires fix's second pass made it.
    pub hires: bool,
}

/// The picture image to image starts from.
pub struct InitImageView {
    /// The pixels (shared with the jobs that use them).
    pub image: Arc<RgbImage>,
    /// On the GPU, for the controls' thumbnail.
    pub texture: TextureHandle,
    /// Its file name, or what it was.
    pub name: String,
    /// The mask painted (or read) over it: inpainting.
    pub mask: Option<mask_editor::MaskLayer>,
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
    /// Image to image: the picture to start from.
    pub init_image: Option<InitImageView>,
    /// The mask painter's tools and view.
    pub mask_editor: mask_editor::MaskEditorView,
    /// The LoRAs and checkpoints found in the models folders (for the pickers), scanned off
    /// the UI thread.
    pub models_scan: crate::models_folders::ModelsScan,
    /// Press Generate once the model has loaded (`atelier --generate`: scripts, screenshots).
    pub generate_when_loaded: bool,
    gallery_handle: Option<GalleryHandle>,
    last_gallery_query: Option<crate::gallery::search::GalleryQuery>,
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
            init_image: None,
            mask_editor: Default::default(),
            models_scan: Default::default(),
            generate_when_loaded: false,
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
        app.scan_models_folders(ctx);
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

    /// Whether the engine is running a job.
    pub fn busy(&self) -> bool {
        self.running.is_some()
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
            clip_skip: s.clip_skip.max(1),
        }
    }

    /// What the Studio tab's picture is for: "Inpainting of photo.png, strength 0.6".
    pub fn picture_summary(&self) -> Option<String> {
        let init = self.init_image.as_ref()?;
        let options = &self.settings.image_options;
        let mode = if init.mask.is_some() {
            "Inpainting"
        } else if options.outpaint.is_some() {
            "Outpainting"
        } else {
            "Image to image"
        };
        Some(format!(
            "{mode} of {}, strength {}",
            init.name, options.strength
        ))
    }

    /// Starts from a picture file (and a mask file: inpainting), read on a thread of its own.
    pub fn start_from_picture(
        &mut self,
        ctx: &egui::Context,
        image: std::path::PathBuf,
        mask: Option<std::path::PathBuf>,
    ) {
        self.apply(ctx, UiCommand::RestoreInput { image, mask });
    }

    /// Applies a command as a click would (for tests that cannot drag and drop files).
    pub fn apply_for_test(&mut self, command: UiCommand) {
        let ctx = egui::Context::default();
        self.apply(&ctx, command);
    }

    /// The Studio tab: controls, canvas, queue.
    fn studio_ui(&mut self, ui: &mut egui::Ui, commands: &mut Vec<UiCommand>) {
        let busy = self.busy();
        let studio = studio_state!(self);
        let settings = &mut self.settings;
        let model_input = &mut self.model_input;
        let init_image = self.init_image.as_ref();
        let models_scan = &self.models_scan;
        egui::Panel::left("controls")
            .resizable(true)
            .default_size(340.0)
            .show(ui, |ui| {
                egui::Panel::bottom("generate-bar")
                    .show(ui, |ui| controls::generate_button_ui(ui, busy, commands));
                egui::ScrollArea::vertical().show(ui, |ui| {
                    controls::controls_ui(
                        ui,
                        settings,
                        model_input,
                        studio.model,
                        init_image,
                        models_scan,
                        commands,
                    )
                });
            });
        egui::Panel::right("queue")
            .resizable(true)
            .default_size(220.0)
            .show(ui, |ui| queue::queue_ui(ui, studio.queue, commands));
        let init_image = &mut self.init_image;
        let mask_editor = &mut self.mask_editor;
        egui::CentralPanel::default_margins().show(ui, |ui| match init_image {
            Some(init) if mask_editor.open => {
                if mask_editor::mask_editor_ui(ui, init, mask_editor) {
                    commands.push(UiCommand::CloseMaskEditor);
                }
            }
            _ => canvas::canvas_ui(ui, settings, &studio, commands),
        });
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

/// Uploads `image` as a texture, scaled down (aspect kept) when a side exceeds what the GPU
/// takes: a 10,000-pixel photo must not stop the window. Widgets size images by their own
/// numbers, so only sharpness is lost, never layout.
fn load_fitted_texture(
    ctx: &egui::Context,
    name: impl Into<String>,
    image: &RgbImage,
    options: egui::TextureOptions,
) -> TextureHandle {
    let max_side = ctx.input(|input| input.max_texture_side);
    let (width, height) = mask_editor::display_size(image.dimensions(), max_side);
    if (width, height) == image.dimensions() {
        return ctx.load_texture(name, color_image(image), options);
    }
    let smaller =
        image::imageops::resize(image, width, height, image::imageops::FilterType::Triangle);
    ctx.load_texture(name, color_image(&smaller), options)
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
        let is_picture = |path: &std::path::PathBuf| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| ["png", "jpg", "jpeg"].contains(&e.to_ascii_lowercase().as_str()))
        };
        if self.tab == Tab::Studio && dropped.len() == 1 && is_picture(&dropped[0]) {
            // A picture dropped on the Studio tab is the start of image to image.
            self.apply(ctx, UiCommand::SetInitImage(dropped[0].clone()));
        } else if !dropped.is_empty() {
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
                egui::CentralPanel::default_margins().show(ui, |ui| {
                    gallery::gallery_ui(ui, &mut self.gallery, &mut commands)
                });
            }
            Tab::Compare => {
                let picture = self.picture_summary();
                egui::CentralPanel::default_margins().show(ui, |ui| {
                    compare::compare_ui(
                        ui,
                        &mut self.compare,
                        &self.settings,
                        picture.as_deref(),
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
