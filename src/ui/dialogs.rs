//! File dialogs, each on a thread of its own so that the window never waits for one; results come back through a channel.

use super::{AtelierApp, ModelState};

/// What a dialog thread sends back.
pub(super) enum DialogResult {
    /// A model: a diffusers folder or a single-file checkpoint.
    Folder(std::path::PathBuf),
    /// A VAE for the current model.
    Vae(std::path::PathBuf),
    /// Where the current model's text encoders come from.
    TextEncoders(std::path::PathBuf),
    /// A models folder to add to the settings.
    ModelsFolder(std::path::PathBuf),
    /// What the models folders hold.
    ModelsScan(crate::models_folders::ModelsScan),
    Saved(std::path::PathBuf),
    SaveFailed(String),
    Import(Vec<std::path::PathBuf>),
    /// A picture for image to image (and maybe its mask), read, or why not.
    InitImage(Result<LoadedInput, String>),
    /// A mask file read (at the picture's size), with its name, or why not.
    Mask(Result<(image::GrayImage, String), String>),
}

/// A picture read for image to image, with its name, and the mask it was kept with.
pub(super) struct LoadedInput {
    pub(super) image: image::RgbImage,
    pub(super) name: String,
    pub(super) mask: Option<image::GrayImage>,
}

impl AtelierApp {
    pub(in crate::ui) fn spawn_dialog(
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

    pub(in crate::ui) fn save_grid(&mut self, ctx: &egui::Context) {
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

    pub(in crate::ui) fn save_as(&mut self, ctx: &egui::Context) {
        let Some(shown) = &self.shown else {
            return;
        };
        let image = shown.image.clone();
        let parameters = crate::gallery::metadata::A1111Parameters::for_request(
            &shown.request,
            &shown.model_name,
        )
        .to_text();
        let file_name = format!("atelier-{}.png", shown.request.seed);
        self.spawn_dialog(ctx, "save-as", move || {
            let path = rfd::FileDialog::new()
                .set_file_name(file_name)
                .add_filter("PNG image", &["png"])
                .save_file()?;
            let result = crate::gallery::metadata::write_png(
                &path,
                &image,
                &[(crate::gallery::metadata::PARAMETERS_KEYWORD, &parameters)],
            );
            Some(match result {
                Ok(()) => DialogResult::Saved(path),
                Err(e) => DialogResult::SaveFailed(e.to_string()),
            })
        });
    }
}
