//! The Studio tab's commands: the model, the queue, the shown image.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use image::{GrayImage, RgbImage};

use crate::engine::pipeline::{DeviceChoice, ImageJob, PreviewOptions};
use crate::ui::dialogs::{DialogResult, LoadedInput};
use crate::ui::mask_editor::MaskLayer;
use crate::ui::{AtelierApp, ModelState, RunningJob, UiCommand, random_seed};
use crate::ui::{InitImageView, load_fitted_texture};
use crate::worker::{Command, Job, SendError};

impl AtelierApp {
    pub(in crate::ui) fn load_model(&mut self, model: String) {
        let device = DeviceChoice::parse(&self.settings.device).unwrap_or(DeviceChoice::Auto);
        let overrides = self.settings.overrides_for(&model);
        match self.worker.send(Command::LoadModel {
            model: model.clone(),
            device,
            overrides,
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

    /// Lists the LoRAs and checkpoints of the models folders on a thread of its own (folders may be slow
    /// network drives); the picker shows them when the list arrives.
    pub(in crate::ui) fn scan_models_folders(&mut self, ctx: &egui::Context) {
        let roots = self.settings.models_roots();
        self.spawn_dialog(ctx, "scan-models", move || {
            Some(DialogResult::ModelsScan(crate::models_folders::scan(
                &roots,
            )))
        });
    }

    /// Remembers what the artist overrides of the current model and reloads it with that.
    pub(in crate::ui) fn set_model_overrides(
        &mut self,
        overrides: crate::engine::pipeline::ModelOverrides,
    ) {
        let model = self.settings.model.clone();
        if model.is_empty() {
            return;
        }
        if overrides.is_empty() {
            self.settings.model_overrides.remove(&model);
        } else {
            self.settings
                .model_overrides
                .insert(model.clone(), overrides);
        }
        self.load_model(model);
    }

    pub(in crate::ui) fn generate(&mut self) {
        if !matches!(
            self.model,
            ModelState::Ready(_) | ModelState::Loading { .. }
        ) {
            self.show_error(
                "No model is loaded.",
                "Choose a model in the picker on the left (a preset, a recent one, \"Folder…\" or \"File…\").",
            );
            return;
        }
        let image = match self.image_job() {
            Ok(image) => image,
            Err(message) => {
                self.show_error(
                    message,
                    "Paint the mask (or remove it), or adjust the image settings.",
                );
                return;
            }
        };
        let hires = (self.settings.hires_enabled && image.is_none()).then_some(self.settings.hires);
        if !self.settings.seed_locked {
            self.settings.seed = random_seed();
        }
        let lora_folders = self.settings.lora_folders();
        let embedding_folders = self.settings.embedding_folders();
        for k in 0..self.settings.batch_count.max(1) {
            let id = self.next_job_id;
            self.next_job_id += 1;
            let job = Job {
                id,
                request: self.current_request(self.settings.seed.wrapping_add(k as u64)),
                preview: PreviewOptions {
                    vae_decode_every: self.settings.vae_preview_every,
                    latent_previews: true,
                },
                cancel: Arc::new(AtomicBool::new(false)),
                image: image.clone(),
                hires,
                lora_folders: lora_folders.clone(),
                embedding_folders: embedding_folders.clone(),
                vae_tiling: self.settings.vae_tiling,
            };
            if k == 0 && self.running.is_none() && self.queue.is_empty() {
                self.generate_pressed_at = Some((id, Instant::now()));
            }
            self.queue.push(job);
        }
        self.error = None;
    }

    /// The picture the panels describe, checked (an empty mask is refused here, before any
    /// job is queued); `None` for text to image.
    pub(in crate::ui) fn image_job(&self) -> Result<Option<ImageJob>, String> {
        let Some(init) = &self.init_image else {
            return Ok(None);
        };
        let mut options = self.settings.image_options;
        let mask = init
            .mask
            .as_ref()
            .map(|layer| Arc::new(layer.mask().clone()));
        if mask.is_some() {
            // Outpainting makes its own mask; the controls offer one or the other.
            options.outpaint = None;
        } else if options.outpaint.is_none() {
            // Image to image: the inpainting settings wait for a mask.
            options.only_masked_padding = None;
            options.masked_content = Default::default();
        }
        ImageJob::new(init.image.clone(), mask, options)
            .map(Some)
            .map_err(|e| e.to_string())
    }

    pub(in crate::ui) fn cancel(&mut self) {
        if let Some(running) = &mut self.running {
            running.job.cancel.store(true, Ordering::Relaxed);
            running.cancelling = true;
        }
    }

    pub(in crate::ui) fn start_next_job(&mut self) {
        if self.running.is_some() || !matches!(self.model, ModelState::Ready(_)) {
            return;
        }
        let Some(job) = self.queue.pop() else {
            return;
        };
        let total_steps = job.request.scheduler.model_evaluations(job.request.steps);
        match self.worker.send(Command::Generate(Box::new(job.clone()))) {
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

    /// Applies a Studio command (others pass through untouched).
    pub(in crate::ui) fn apply_studio(&mut self, ctx: &egui::Context, command: UiCommand) {
        match command {
            UiCommand::Generate => self.generate(),
            UiCommand::Cancel => self.cancel(),
            UiCommand::RemoveQueued(id) => {
                self.queue.remove(id);
                self.compare_cell_failed(id, "removed from the queue");
            }
            UiCommand::MoveQueued(id, offset) => self.queue.shift(id, offset),
            UiCommand::LoadModel(model) => self.load_model(model),
            UiCommand::OpenFolder => self.spawn_dialog(ctx, "open-folder", || {
                rfd::FileDialog::new()
                    .set_title("Choose a diffusers model folder")
                    .pick_folder()
                    .map(DialogResult::Folder)
            }),
            UiCommand::OpenModelFile => self.spawn_dialog(ctx, "open-model-file", || {
                rfd::FileDialog::new()
                    .set_title("Choose a checkpoint (.safetensors)")
                    .add_filter("Checkpoint", &["safetensors", "ckpt"])
                    .pick_file()
                    .map(DialogResult::Folder)
            }),
            UiCommand::ChooseVae => self.spawn_dialog(ctx, "choose-vae", || {
                rfd::FileDialog::new()
                    .set_title("Choose a VAE (.safetensors)")
                    .add_filter("VAE", &["safetensors"])
                    .pick_file()
                    .map(DialogResult::Vae)
            }),
            UiCommand::ChooseTextEncoders => self.spawn_dialog(ctx, "choose-text-encoders", || {
                rfd::FileDialog::new()
                    .set_title("A checkpoint (.safetensors) to take the text encoders from")
                    .add_filter("Checkpoint", &["safetensors"])
                    .pick_file()
                    .or_else(|| {
                        rfd::FileDialog::new()
                            .set_title("… or a diffusers model folder")
                            .pick_folder()
                    })
                    .map(DialogResult::TextEncoders)
            }),
            UiCommand::SetModelOverrides(overrides) => self.set_model_overrides(overrides),
            UiCommand::AddModelsFolder => self.spawn_dialog(ctx, "add-models-folder", || {
                rfd::FileDialog::new()
                    .set_title("Choose an A1111 or ComfyUI folder, or a folder of models")
                    .pick_folder()
                    .map(DialogResult::ModelsFolder)
            }),
            UiCommand::ScanModelsFolders => self.scan_models_folders(ctx),
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
            UiCommand::OpenInitImage => self.spawn_dialog(ctx, "open-image", || {
                let path = rfd::FileDialog::new()
                    .set_title("Choose a picture to start from")
                    .add_filter("Image", &["png", "jpg", "jpeg"])
                    .pick_file()?;
                Some(DialogResult::InitImage(load_input(&path, None)))
            }),
            UiCommand::SetInitImage(path) => self.spawn_dialog(ctx, "load-image", move || {
                Some(DialogResult::InitImage(load_input(&path, None)))
            }),
            UiCommand::UseResultAsInit => {
                if let Some(shown) = &self.shown {
                    let name = format!("result (seed {})", shown.request.seed);
                    let image = shown.image.clone();
                    self.set_init_image(ctx, image, name, None);
                }
            }
            UiCommand::ClearInitImage => {
                self.init_image = None;
                self.mask_editor.open = false;
            }
            UiCommand::RestoreInput { image, mask } => {
                self.spawn_dialog(ctx, "load-image", move || {
                    Some(DialogResult::InitImage(load_input(&image, mask.as_deref())))
                })
            }
            UiCommand::OpenMaskEditor => {
                if let Some(init) = &mut self.init_image {
                    let (width, height) = init.image.dimensions();
                    init.mask
                        .get_or_insert_with(|| MaskLayer::blank(width, height));
                    self.settings.image_options.outpaint = None;
                    self.mask_editor.open = true;
                }
            }
            UiCommand::CloseMaskEditor => self.mask_editor.open = false,
            UiCommand::OpenMaskFile => {
                let Some(size) = self.init_image.as_ref().map(|i| i.image.dimensions()) else {
                    return;
                };
                self.spawn_dialog(ctx, "open-mask", move || {
                    let path = rfd::FileDialog::new()
                        .set_title("Choose a mask (white or transparent: repaint)")
                        .add_filter("Image", &["png", "jpg", "jpeg"])
                        .pick_file()?;
                    Some(DialogResult::Mask(load_mask(&path, size)))
                })
            }
            UiCommand::SetMaskFile(path) => {
                let Some(size) = self.init_image.as_ref().map(|i| i.image.dimensions()) else {
                    return;
                };
                self.spawn_dialog(ctx, "load-mask", move || {
                    Some(DialogResult::Mask(load_mask(&path, size)))
                })
            }
            UiCommand::RemoveMask => {
                if let Some(init) = &mut self.init_image {
                    init.mask = None;
                }
                self.mask_editor.open = false;
            }
            UiCommand::UsePictureSize => {
                if let Some(image) = self.image_job().ok().flatten() {
                    let multiple = match &self.model {
                        ModelState::Ready(info) => info.size_multiple.max(1),
                        _ => 8,
                    };
                    let (width, height) = image.canvas().dimensions();
                    let fit = |v: u32| ((v as usize / multiple) * multiple).max(multiple);
                    self.settings.width = fit(width);
                    self.settings.height = fit(height);
                }
            }
            // Another tab's command (see `UiCommand::tab`).
            _ => {}
        }
    }

    /// Starts image to image from `image` (its name is shown beside it), inpainting when a
    /// `mask` comes with it.
    pub(in crate::ui) fn set_init_image(
        &mut self,
        ctx: &egui::Context,
        image: RgbImage,
        name: String,
        mask: Option<GrayImage>,
    ) {
        let texture = load_fitted_texture(ctx, "init-image", &image, egui::TextureOptions::LINEAR);
        let (width, height) = image.dimensions();
        let mask = mask.map(|mask| {
            MaskLayer::from_mask(
                fit_mask(mask, width, height),
                "kept with the picture".into(),
            )
        });
        self.mask_editor.open = false;
        self.mask_editor.zoom = None;
        self.mask_editor.pan = egui::Vec2::ZERO;
        self.init_image = Some(InitImageView {
            image: Arc::new(image),
            texture,
            name,
            mask,
        });
    }

    /// Uses a mask read from a file (already at the picture's size).
    pub(in crate::ui) fn set_mask(&mut self, mask: GrayImage, name: String) {
        if let Some(init) = &mut self.init_image {
            let (width, height) = init.image.dimensions();
            init.mask = Some(MaskLayer::from_mask(fit_mask(mask, width, height), name));
            self.settings.image_options.outpaint = None;
        }
    }
}

/// A mask at the picture's size (resized if it is not).
fn fit_mask(mask: GrayImage, width: u32, height: u32) -> GrayImage {
    if mask.dimensions() == (width, height) {
        return mask;
    }
    image::imageops::resize(&mask, width, height, image::imageops::FilterType::Triangle)
}

/// Reads a mask file: white (or transparent) is repainted; resized to `size`.
fn load_mask(path: &std::path::Path, size: (u32, u32)) -> Result<(GrayImage, String), String> {
    let decoded = crate::gallery::png_read::decode_bounded(path).map_err(|e| e.to_string())?;
    let mask = crate::engine::init_image::mask_from_image(&decoded);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((fit_mask(mask, size.0, size.1), name))
}

/// Reads a picture for image to image (bounded, as every file from outside) with a name to
/// show, and the mask kept with it.
fn load_input(
    path: &std::path::Path,
    mask: Option<&std::path::Path>,
) -> Result<LoadedInput, String> {
    let (image, name) = load_init_image(path)?;
    let mask = match mask {
        Some(mask_path) => Some(load_mask(mask_path, image.dimensions())?.0),
        None => None,
    };
    Ok(LoadedInput { image, name, mask })
}

/// Reads a picture for image to image (bounded, as every file from outside), with a name to show.
fn load_init_image(path: &std::path::Path) -> Result<(RgbImage, String), String> {
    let image = crate::gallery::png_read::decode_rgb_bounded(path).map_err(|e| e.to_string())?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((image, name))
}
