//! The Studio tab's commands: the model, the queue, the shown image.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use crate::engine::pipeline::{DeviceChoice, PreviewOptions};
use crate::ui::dialogs::DialogResult;
use image::RgbImage;

use crate::ui::{AtelierApp, ModelState, RunningJob, UiCommand, random_seed};
use crate::ui::{InitImageView, color_image};
use crate::worker::{Command, InitImage, Job, SendError};

impl AtelierApp {
    pub(in crate::ui) fn load_model(&mut self, model: String) {
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

    pub(in crate::ui) fn generate(&mut self) {
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
                init: self.init_image.as_ref().map(|init| InitImage {
                    image: init.image.clone(),
                    strength: self.settings.strength,
                }),
            };
            if k == 0 && self.running.is_none() && self.queue.is_empty() {
                self.generate_pressed_at = Some((id, Instant::now()));
            }
            self.queue.push(job);
        }
        self.error = None;
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
                Some(DialogResult::InitImage(load_init_image(&path)))
            }),
            UiCommand::SetInitImage(path) => self.spawn_dialog(ctx, "load-image", move || {
                Some(DialogResult::InitImage(load_init_image(&path)))
            }),
            UiCommand::UseResultAsInit => {
                if let Some(shown) = &self.shown {
                    let name = format!("result (seed {})", shown.request.seed);
                    let image = shown.image.clone();
                    self.set_init_image(ctx, image, name);
                }
            }
            UiCommand::ClearInitImage => self.init_image = None,
            // Another tab's command (see `UiCommand::tab`).
            _ => {}
        }
    }

    /// Starts image to image from `image` (its name is shown beside it).
    pub(in crate::ui) fn set_init_image(
        &mut self,
        ctx: &egui::Context,
        image: RgbImage,
        name: String,
    ) {
        let texture = ctx.load_texture(
            "init-image",
            color_image(&image),
            egui::TextureOptions::LINEAR,
        );
        self.init_image = Some(InitImageView {
            image: Arc::new(image),
            texture,
            name,
        });
    }
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
