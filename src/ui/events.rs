//! What arrives from the engine and gallery threads and from dialogs, handled without blocking.

use egui::TextureOptions;

use super::compare::CellState;
use super::dialogs::DialogResult;
use super::{AtelierApp, ModelState, RunningJob, ShownImage, UiCommand, load_fitted_texture};
use crate::gallery::library::now_unix;
use crate::gallery::record::ImageMetadata;
use crate::gallery::worker::{GalleryCommand, GalleryEvent};
use crate::worker::Event;

impl AtelierApp {
    pub(in crate::ui) fn handle_gallery_event(&mut self, ctx: &egui::Context, event: GalleryEvent) {
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
                complete,
                search_ms,
            } => {
                if self.last_gallery_query.as_ref() == Some(&query) {
                    self.gallery.entries = entries;
                    self.gallery.complete = complete;
                    self.gallery.search_ms = search_ms;
                }
            }
            GalleryEvent::MoreResults {
                query,
                entries,
                complete,
            } => {
                if self.last_gallery_query.as_ref() == Some(&query) {
                    self.gallery.entries.extend(entries);
                    self.gallery.complete = complete;
                }
            }
            GalleryEvent::Filters { models, schedulers } => {
                self.gallery.models = models;
                self.gallery.schedulers = schedulers;
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
                let texture = load_fitted_texture(ctx, "gallery-full", &image, options);
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

    pub(in crate::ui) fn handle_event(&mut self, ctx: &egui::Context, event: Event) {
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
                if std::mem::take(&mut self.generate_when_loaded) {
                    self.apply(ctx, UiCommand::Generate);
                }
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
                        cell.preview = Some(load_fitted_texture(
                            ctx,
                            format!("compare-preview-{index}"),
                            preview,
                            TextureOptions::LINEAR,
                        ));
                    }
                }
                if let Some(preview) = update.preview {
                    let texture =
                        load_fitted_texture(ctx, "preview", &preview, TextureOptions::LINEAR);
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
                self.warnings = output.warnings.clone();
                if let Some(running) = &running {
                    self.save_to_gallery(running, &output, comparison);
                }
                if let (Some(running), Some(image)) = (running, output.images.into_iter().next()) {
                    let texture =
                        load_fitted_texture(ctx, "result", &image, TextureOptions::LINEAR);
                    self.shown = Some(ShownImage {
                        image,
                        texture,
                        request: output.final_request,
                        model_name: match &self.model {
                            ModelState::Ready(info) => info.name.clone(),
                            _ => String::new(),
                        },
                        timings: output.timings,
                        steps_run: running.total_steps,
                        hires: running.job.hires.is_some(),
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
    pub(in crate::ui) fn save_to_gallery(
        &mut self,
        running: &RunningJob,
        output: &crate::worker::JobOutput,
        comparison: Option<crate::gallery::record::ComparisonRef>,
    ) {
        let (images, timings, final_request) =
            (&output.images, output.timings, &output.final_request);
        let (model, weights, vae) = match &self.model {
            ModelState::Ready(info) => (
                info.name.clone(),
                info.weights_path.clone(),
                info.vae.clone(),
            ),
            _ => (String::new(), None, None),
        };
        for (k, image) in images.iter().enumerate() {
            let mut request = final_request.clone();
            request.seed = request.seed.wrapping_add(k as u64);
            let mut metadata =
                ImageMetadata::for_generation(&request, &model, None, timings, now_unix());
            metadata.comparison = comparison.clone();
            metadata.vae = vae.clone();
            metadata.lora_hashes = output.loras.clone();
            metadata.ti_hashes = output.embeddings.clone();
            metadata.set_modes(running.job.image.as_ref(), running.job.hires.as_ref());
            if running.job.hires.is_some() {
                // Redoing it starts from the first pass's size and steps.
                metadata.width = running.job.request.width as u32;
                metadata.height = running.job.request.height as u32;
                metadata.steps = Some(running.job.request.steps);
            }
            self.gallery_send(GalleryCommand::Save {
                image: image.clone(),
                metadata: Box::new(metadata),
                weights: weights.clone(),
                input: running.job.image.clone(),
            });
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
                DialogResult::ModelsFolder(folder) => {
                    let folder = folder.display().to_string();
                    if !self.settings.models_folders.contains(&folder) {
                        self.settings.models_folders.push(folder);
                    }
                    self.scan_models_folders(ctx);
                }
                DialogResult::ModelsScan(scan) => self.models_scan = scan,
                DialogResult::TextEncoders(source) => {
                    let mut overrides = self.settings.overrides_for(&self.settings.model);
                    overrides.text_encoders = Some(source);
                    self.set_model_overrides(overrides);
                }
                DialogResult::Vae(vae) => {
                    let mut overrides = self.settings.overrides_for(&self.settings.model);
                    overrides.vae = Some(vae);
                    self.set_model_overrides(overrides);
                }
                DialogResult::Saved(path) => {
                    self.warnings = vec![format!("saved {}", path.display())]
                }
                DialogResult::SaveFailed(message) => {
                    self.show_error(message, "Choose another folder.")
                }
                DialogResult::Import(paths) => self.gallery_send(GalleryCommand::Import(paths)),
                DialogResult::InitImage(Ok(input)) => {
                    self.set_init_image(ctx, input.image, input.name, input.mask)
                }
                DialogResult::Mask(Ok((mask, name))) => self.set_mask(mask, name),
                DialogResult::Mask(Err(message)) => self.show_error(
                    message,
                    "Choose a black-and-white mask, or a picture with transparency.",
                ),
                DialogResult::InitImage(Err(message)) => {
                    self.show_error(message, "Choose a PNG or JPEG picture for image to image.")
                }
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
                let texture = load_fitted_texture(
                    ctx,
                    format!("thumb-{}", ready.file),
                    &image,
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
}
