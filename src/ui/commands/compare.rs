//! The Compare tab's commands: running, cancelling, saving and reopening comparisons.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use egui::TextureOptions;
use image::RgbImage;

use crate::engine::pipeline::PreviewOptions;
use crate::gallery::worker::GalleryCommand;
use crate::ui::compare::{self, CellState};
use crate::ui::{AtelierApp, ModelState, Tab, UiCommand, load_fitted_texture};
use crate::worker::{Job, JobId};

impl AtelierApp {
    /// Fills a comparison cell with its finished image; returns where it sits, for the gallery.
    pub(in crate::ui) fn compare_cell_finished(
        &mut self,
        ctx: &egui::Context,
        id: JobId,
        output: &crate::worker::JobOutput,
    ) -> Option<crate::gallery::record::ComparisonRef> {
        let index = self.compare.job_cells.remove(&id)?;
        let plan = self.compare.plan.as_ref()?;
        let result = crate::compare::CellResult {
            total_secs: output.timings.total_secs,
            model_evaluations: plan.cells()[index].model_evaluations(),
        };
        let reference = crate::gallery::record::ComparisonRef {
            id: plan.id.clone(),
            row: index / plan.columns(),
            column: index % plan.columns(),
            plan_json: serde_json::to_string(plan).unwrap_or_default(),
        };
        let cell = self.compare.cells.get_mut(index)?;
        if let Some(image) = output.images.first() {
            let texture = load_fitted_texture(
                ctx,
                format!("compare-cell-{index}"),
                image,
                TextureOptions::LINEAR,
            );
            cell.image = Some((image.clone(), texture));
        }
        cell.result = Some(result);
        cell.state = CellState::Done;
        Some(reference)
    }

    pub(in crate::ui) fn compare_cell_failed(&mut self, id: JobId, why: &str) {
        if let Some(index) = self.compare.job_cells.remove(&id)
            && let Some(cell) = self.compare.cells.get_mut(index)
        {
            cell.state = CellState::Failed(why.into());
        }
    }

    pub(in crate::ui) fn run_comparison(&mut self) {
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
        // With a picture on the Studio tab, every cell works on it.
        let image = match self.image_job() {
            Ok(image) => image,
            Err(e) => {
                self.compare.error = Some(e);
                return;
            }
        };
        let plan = match crate::compare::ComparisonPlan::with_picture(
            crate::compare::new_comparison_id(),
            base,
            self.compare.samplers.clone(),
            axis,
            image.as_ref().map(|image| image.options),
        ) {
            Ok(plan) => plan,
            Err(e) => {
                self.compare.error = Some(e);
                return;
            }
        };
        let cells = plan.cells();
        let cell_images = cells
            .iter()
            .map(|cell| match (&image, cell.strength) {
                (Some(image), Some(strength)) => image.with_strength(strength).map(Some),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>();
        let cell_images = match cell_images {
            Ok(images) => images,
            Err(e) => {
                self.compare.error = Some(e.to_string());
                return;
            }
        };
        self.compare.error = None;
        self.compare.start(plan);
        let lora_folders = self.settings.lora_folders();
        let embedding_folders = self.settings.embedding_folders();
        for (index, (cell, image)) in cells.into_iter().zip(cell_images).enumerate() {
            let id = self.next_job_id;
            self.next_job_id += 1;
            self.queue.push(Job {
                id,
                request: cell.request,
                preview: PreviewOptions {
                    vae_decode_every: self.settings.vae_preview_every,
                    latent_previews: true,
                },
                cancel: Arc::new(AtomicBool::new(false)),
                image,
                hires: None,
                lora_folders: lora_folders.clone(),
                embedding_folders: embedding_folders.clone(),
                vae_tiling: self.settings.vae_tiling,
            });
            self.compare.job_cells.insert(id, index);
        }
    }

    pub(in crate::ui) fn cancel_comparison(&mut self) {
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

    /// Shows a comparison rebuilt from its cells in the gallery.
    pub(in crate::ui) fn reopen_comparison(
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
        // A comparison of a picture brings its picture (and mask) back to the Studio tab.
        let kept = |name: &Option<String>| {
            let root = self.gallery.root.as_ref()?;
            let path = crate::gallery::library::input_path(root, name.as_ref()?);
            path.is_file().then_some(path)
        };
        match (plan.image_options, entries.first()) {
            (Some(options), Some(cell)) => {
                self.settings.image_options = options;
                match kept(&cell.metadata.init_image) {
                    Some(image) => {
                        let mask = kept(&cell.metadata.mask_image);
                        self.apply_studio(ctx, UiCommand::RestoreInput { image, mask });
                    }
                    None => {
                        self.warnings = vec![
                            "The comparison's picture is no longer in the library: open it again to repeat the comparison."
                                .into(),
                        ]
                    }
                }
            }
            _ => self.init_image = None,
        }
        self.compare.start(plan);
        for (index, (file, result)) in files.into_iter().zip(results).enumerate() {
            let cell = &mut self.compare.cells[index];
            match file.and_then(|f| by_file.remove(&f)) {
                Some(image) => {
                    let texture = load_fitted_texture(
                        ctx,
                        format!("compare-cell-{index}"),
                        &image,
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

    /// Applies a Compare command (others pass through untouched).
    pub(in crate::ui) fn apply_compare(&mut self, ctx: &egui::Context, command: UiCommand) {
        match command {
            UiCommand::RunComparison => self.run_comparison(),
            UiCommand::CancelComparison => self.cancel_comparison(),
            UiCommand::SaveGrid => self.save_grid(ctx),
            UiCommand::EnlargeCell(index) => {
                self.compare.enlarged = index;
                self.compare.flipping = false;
            }
            UiCommand::OpenComparison(id) => self.gallery_send(GalleryCommand::LoadComparison(id)),
            UiCommand::CompareFromImage(id) => {
                self.use_settings(ctx, id);
                self.tab = Tab::Compare;
            }
            // Another tab's command (see `UiCommand::tab`).
            _ => {}
        }
    }
}
