//! The worker thread that owns the engine. The UI talks to it only through bounded channels
//! (commands in, events out) and a per-job cancel flag, and never waits on it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use image::RgbImage;

use crate::engine::EngineError;
use crate::engine::pipeline::{
    DeviceChoice, GenerationRequest, HiresFix, ImageJob, JobParts, LoadOptions, ModelFamily,
    ModelOverrides, PreviewOptions, StableDiffusion, Timings,
};
use crate::engine::source::{LoadProgress, LoadProgressFn};

/// Identifies a job across the UI and the worker.
pub type JobId = u64;

/// Previews are downsampled to at most this many pixels per side before they reach the UI.
pub const MAX_PREVIEW_SIDE: u32 = 512;

/// Counts a prompt's tokens (without start/end tokens) with the loaded model's tokenizer.
pub type TokenCounter = Arc<dyn Fn(&str) -> usize + Send + Sync>;

/// One image job.
#[derive(Clone)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// What to generate.
    pub request: GenerationRequest,
    /// Which previews to make.
    pub preview: PreviewOptions,
    /// Set by the UI to stop the job within one step.
    pub cancel: Arc<AtomicBool>,
    /// The picture to work on (image to image, inpainting, outpainting; shared, not copied,
    /// between the window and the engine), or `None` for text to image.
    pub image: Option<ImageJob>,
    /// The hires fix's second pass (text to image only).
    pub hires: Option<HiresFix>,
    /// Where the prompt's `<lora:name:w>` tags find their files.
    pub lora_folders: Vec<std::path::PathBuf>,
    /// Where textual inversion embeddings are (their words in a prompt trigger them).
    pub embedding_folders: Vec<std::path::PathBuf>,
    /// Whether the VAE decodes (and encodes) in tiles.
    pub vae_tiling: crate::engine::vae_tiling::VaeTiling,
}

/// What the UI asks for.
pub enum Command {
    /// Load a model (folder or repo id) on a device, replacing the current one.
    LoadModel {
        /// Folder or repo id.
        model: String,
        /// Where to run it.
        device: DeviceChoice,
        /// What the artist overrides of the model's own files (VAE, prediction).
        overrides: ModelOverrides,
    },
    /// Run a job.
    Generate(Box<Job>),
}

/// Facts about the loaded model that the UI shows.
#[derive(Clone)]
pub struct ModelInfo {
    /// Folder or repo id it was loaded from.
    pub model: String,
    /// Its display name.
    pub name: String,
    /// Its family.
    pub family: ModelFamily,
    /// Its native image size, if known.
    pub native_size: Option<usize>,
    /// Width and height must be multiples of this.
    pub size_multiple: usize,
    /// The device, in words.
    pub device: String,
    /// Prompt tokens the text encoder takes (75 for CLIP).
    pub max_prompt_tokens: usize,
    /// Counts prompt tokens.
    pub token_counter: TokenCounter,
    /// The UNet weights file, hashed for the gallery's metadata (none for fake engines).
    pub weights_path: Option<std::path::PathBuf>,
    /// The VAE chosen in place of the model's (its file name), if any.
    pub vae: Option<String>,
}

/// An error for the window: what happened and what to do next.
#[derive(Debug, Clone, PartialEq)]
pub struct UserError {
    /// What happened.
    pub message: String,
    /// What the artist can do about it.
    pub hint: String,
}

impl UserError {
    /// Explains an engine error.
    pub fn from_engine(error: &EngineError) -> Self {
        let hint = match error {
            EngineError::Download { .. } => {
                "Offline? Choose a local model with \"Folder…\" or \"File…\", or check the repo id."
            }
            EngineError::MissingFile { .. } | EngineError::BadFile { .. } => {
                "Choose a folder in the diffusers layout (model_index.json, unet/, vae/, text_encoder/, tokenizer/)."
            }
            EngineError::Unsupported(_) => "Choose another model; this one is not supported yet.",
            EngineError::InvalidParameter(_) => "Adjust the setting and generate again.",
            EngineError::Device(_) => "Choose the CPU (or \"auto\") as the device in Settings.",
            EngineError::Tensor(_) => {
                "The computation failed; with a large size, try a smaller one or the CPU."
            }
            EngineError::Tokenizer(_) => "Check the model's tokenizer files.",
            EngineError::NotFinite(_) => {
                "Lower the guidance scale, or try another sampler or more steps."
            }
            EngineError::Cancelled => "",
        };
        Self {
            message: error.to_string(),
            hint: hint.to_string(),
        }
    }
}

/// What a job produced.
pub struct JobOutput {
    /// One image per batch item.
    pub images: Vec<RgbImage>,
    /// Where the time went.
    pub timings: Timings,
    /// Things the artist should know.
    pub warnings: Vec<String>,
    /// The last pass's parameters (a hires fix's size and steps).
    pub final_request: GenerationRequest,
    /// The LoRAs merged for this job: name and A1111 short hash (`Lora hashes`).
    pub loras: Vec<(String, String)>,
    /// The embeddings the prompts used: name and short hash (`TI hashes`).
    pub embeddings: Vec<(String, String)>,
}

/// One step's news, as the engine reports it.
pub struct StepUpdate {
    /// Steps done.
    pub steps_done: usize,
    /// Steps in the job.
    pub total_steps: usize,
    /// Seconds since the job started.
    pub elapsed_secs: f64,
    /// A preview of the image as it will be, if one was made.
    pub preview: Option<RgbImage>,
}

/// What the worker tells the UI.
pub enum Event {
    /// Model loading progress.
    Loading(LoadProgress),
    /// The model is ready.
    ModelLoaded(ModelInfo),
    /// The model could not be loaded.
    LoadFailed {
        /// What was being loaded.
        model: String,
        /// Why it failed.
        error: UserError,
    },
    /// A job began.
    JobStarted(JobId),
    /// A job advanced by a step.
    JobProgress {
        /// The job.
        id: JobId,
        /// The step's news.
        update: StepUpdate,
    },
    /// A job finished.
    JobFinished {
        /// The job.
        id: JobId,
        /// What it produced.
        output: JobOutput,
    },
    /// A job stopped because its cancel flag was set.
    JobCancelled(JobId),
    /// A job failed.
    JobFailed {
        /// The job.
        id: JobId,
        /// Why.
        error: UserError,
    },
}

/// The engine as the worker sees it; tests substitute a fake.
pub trait Engine: Send + 'static {
    /// Loads a model, reporting progress.
    fn load(
        &mut self,
        model: &str,
        device: DeviceChoice,
        overrides: &ModelOverrides,
        progress: LoadProgressFn,
    ) -> Result<ModelInfo, EngineError>;
    /// Runs a job, calling `on_step` after every step, and stopping when `job.cancel` is set.
    fn generate(
        &mut self,
        job: &Job,
        on_step: &mut dyn FnMut(StepUpdate),
    ) -> Result<JobOutput, EngineError>;
}

/// The real engine: a [`StableDiffusion`] model.
#[derive(Default)]
pub struct DiffusionEngine {
    model: Option<StableDiffusion>,
    loras: crate::engine::lora::LoraCache,
    embeddings: crate::engine::embeddings::EmbeddingCache,
}

impl Engine for DiffusionEngine {
    fn load(
        &mut self,
        model: &str,
        device: DeviceChoice,
        overrides: &ModelOverrides,
        progress: LoadProgressFn,
    ) -> Result<ModelInfo, EngineError> {
        // Free the old model first: two SDXL models may not fit together.
        self.model = None;
        let source = crate::demo_model::model_source(model)?;
        let mut options = LoadOptions::new(device.open()?);
        options.progress = Some(progress);
        options.overrides = overrides.clone();
        let loaded = StableDiffusion::load(source, options)?;
        let info = ModelInfo {
            model: model.to_string(),
            name: loaded.name().to_string(),
            family: loaded.family(),
            native_size: loaded.native_size(),
            size_multiple: loaded.vae_scale_factor(),
            device: format!("{:?}", loaded.device().location()),
            max_prompt_tokens: loaded.max_prompt_tokens(),
            token_counter: loaded.token_counter(),
            weights_path: Some(loaded.unet_weights().to_path_buf()),
            vae: overrides.vae_name(),
        };
        self.model = Some(loaded);
        Ok(info)
    }

    fn generate(
        &mut self,
        job: &Job,
        on_step: &mut dyn FnMut(StepUpdate),
    ) -> Result<JobOutput, EngineError> {
        let model = self.model.as_mut().ok_or_else(|| {
            EngineError::InvalidParameter("no model is loaded; choose one first".into())
        })?;
        // The prompt's LoRAs, merged (or the last job's taken off) before the job runs.
        let (loras, mut lora_warnings) =
            self.loras
                .resolve(&job.request.prompt, &job.lora_folders, &[])?;
        let report = model.set_loras(&loras)?;
        lora_warnings.extend(report.warnings);
        let applied: Vec<(String, String)> = loras
            .iter()
            .map(|l| (l.file.name.clone(), l.file.hash.clone()))
            .collect();
        let (embeddings, embedding_warnings) = self.embeddings.load_folders(&job.embedding_folders);
        lora_warnings.extend(embedding_warnings);
        let left_out = model.set_embeddings(embeddings);
        let prompts = [
            job.request.prompt.as_str(),
            job.request.negative_prompt.as_str(),
        ];
        lora_warnings.extend(crate::engine::embeddings::warnings_for_prompts(
            &left_out, &prompts,
        ));
        let mut used_embeddings = model.embeddings_in(&job.request.prompt);
        for entry in model.embeddings_in(&job.request.negative_prompt) {
            if !used_embeddings.contains(&entry) {
                used_embeddings.push(entry);
            }
        }
        model.set_vae_tiling(job.vae_tiling);
        let model = &*model;
        let parts = JobParts {
            image: job.image.as_ref(),
            hires: job.hires.as_ref(),
            noise: None,
        };
        let result = model.run_job(&job.request, parts, job.preview, &job.cancel, &mut |step| {
            let preview = step.vae_preview.or(step.latent_preview);
            on_step(StepUpdate {
                steps_done: step.step_index + 1,
                total_steps: step.total_steps,
                elapsed_secs: step.elapsed_secs,
                preview: preview.map(downsample),
            });
        })?;
        lora_warnings.extend(result.output.warnings);
        Ok(JobOutput {
            images: result.output.images,
            timings: result.output.timings,
            warnings: lora_warnings,
            final_request: result.final_request,
            loras: applied,
            embeddings: used_embeddings,
        })
    }
}

/// Shrinks an image so that neither side exceeds [`MAX_PREVIEW_SIDE`].
pub fn downsample(image: RgbImage) -> RgbImage {
    let (width, height) = image.dimensions();
    let longest = width.max(height);
    if longest <= MAX_PREVIEW_SIDE {
        return image;
    }
    let scale = MAX_PREVIEW_SIDE as f64 / longest as f64;
    let new_width = ((width as f64 * scale).round() as u32).max(1);
    let new_height = ((height as f64 * scale).round() as u32).max(1);
    image::imageops::resize(
        &image,
        new_width,
        new_height,
        image::imageops::FilterType::Triangle,
    )
}

/// The UI's end of the worker.
pub struct WorkerHandle {
    commands: Option<SyncSender<Command>>,
    events: Receiver<Event>,
    thread: Option<JoinHandle<()>>,
}

/// Why a command could not be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The worker has too much to do; try again shortly.
    #[error("the engine is busy; try again in a moment")]
    Busy,
    /// The worker thread is gone (it panicked or was shut down).
    #[error("the engine thread has stopped; restart Atelier")]
    Stopped,
}

impl WorkerHandle {
    /// Starts the worker thread with `engine`; `wake` is called after every event (it should
    /// ask the UI to repaint).
    pub fn spawn(
        engine: Box<dyn Engine>,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let (command_sender, command_receiver) = sync_channel::<Command>(16);
        let (event_sender, event_receiver) = sync_channel::<Event>(64);
        let thread = std::thread::Builder::new()
            .name("atelier-engine".into())
            .spawn(move || worker_loop(engine, command_receiver, event_sender, wake))?;
        Ok(Self {
            commands: Some(command_sender),
            events: event_receiver,
            thread: Some(thread),
        })
    }

    /// Sends a command without blocking.
    pub fn send(&self, command: Command) -> Result<(), SendError> {
        let sender = self.commands.as_ref().ok_or(SendError::Stopped)?;
        sender.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => SendError::Busy,
            TrySendError::Disconnected(_) => SendError::Stopped,
        })
    }

    /// The next event, if one is waiting.
    pub fn try_recv(&self) -> Option<Event> {
        self.events.try_recv().ok()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        // Closing the command channel ends the loop once the current command is done; the
        // app sets the running job's cancel flag first, so that is within one step.
        self.commands = None;
        // Drain events so that a worker blocked on a full channel can finish.
        while self.events.try_recv().is_ok() {}
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() {
                while self.events.try_recv().is_ok() {}
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let _ = thread.join();
        }
    }
}

fn worker_loop(
    mut engine: Box<dyn Engine>,
    commands: Receiver<Command>,
    events: SyncSender<Event>,
    wake: Arc<dyn Fn() + Send + Sync>,
) {
    // Important events wait for room (backpressure); previews are dropped when the UI lags.
    let send = |event: Event| {
        let delivered = events.send(event).is_ok();
        wake();
        delivered
    };
    while let Ok(command) = commands.recv() {
        match command {
            Command::LoadModel {
                model,
                device,
                overrides,
            } => {
                let progress_events = events.clone();
                let progress_wake = wake.clone();
                let progress: LoadProgressFn = Arc::new(move |event: LoadProgress| {
                    let _ = progress_events.try_send(Event::Loading(event));
                    progress_wake();
                });
                let event = match engine.load(&model, device, &overrides, progress) {
                    Ok(info) => Event::ModelLoaded(info),
                    Err(error) => Event::LoadFailed {
                        model,
                        error: UserError::from_engine(&error),
                    },
                };
                if !send(event) {
                    return;
                }
            }
            Command::Generate(job) => {
                if job.cancel.load(Ordering::Relaxed) {
                    if !send(Event::JobCancelled(job.id)) {
                        return;
                    }
                    continue;
                }
                if !send(Event::JobStarted(job.id)) {
                    return;
                }
                let id = job.id;
                let result = engine.generate(&job, &mut |update| {
                    let event = Event::JobProgress { id, update };
                    match events.try_send(event) {
                        Ok(()) => wake(),
                        Err(TrySendError::Full(_)) => {}
                        Err(TrySendError::Disconnected(_)) => {
                            job.cancel.store(true, Ordering::Relaxed)
                        }
                    }
                });
                let event = match result {
                    Ok(output) => Event::JobFinished { id, output },
                    Err(EngineError::Cancelled) => Event::JobCancelled(id),
                    Err(error) => Event::JobFailed {
                        id,
                        error: UserError::from_engine(&error),
                    },
                };
                if !send(event) {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_previews_are_downsampled_small_ones_kept() {
        let large = downsample(RgbImage::new(1024, 768));
        assert_eq!(large.dimensions(), (512, 384));
        let tall = downsample(RgbImage::new(600, 1800));
        assert_eq!(tall.dimensions(), (171, 512));
        let small = downsample(RgbImage::new(128, 96));
        assert_eq!(small.dimensions(), (128, 96));
    }

    #[test]
    fn engine_errors_come_with_a_hint() {
        let offline = UserError::from_engine(&EngineError::Download {
            repo: "a/b".into(),
            file: "model_index.json".into(),
            message: "offline".into(),
        });
        assert!(offline.message.contains("model_index.json"));
        assert!(offline.hint.contains("Choose a local model"));
    }
}
