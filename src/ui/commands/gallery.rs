//! The Gallery tab's commands: browsing, favourites, deletes, import and export.

use crate::gallery::worker::GalleryCommand;
use crate::ui::dialogs::DialogResult;
use crate::ui::{AtelierApp, Tab, UiCommand};

impl AtelierApp {
    pub(in crate::ui) fn use_settings(&mut self, ctx: &egui::Context, id: i64) {
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
        s.clip_skip = request.clip_skip;
        let metadata = &entry.metadata;
        // The modes: the picture's settings, or the hires fix (the size and steps above are its
        // first pass's).
        if let Some(options) = metadata.image_options {
            s.image_options = options;
        } else if let (Some(strength), None) = (metadata.denoising_strength, &metadata.hires) {
            s.image_options.strength = strength;
        }
        s.image_options.strength = s.image_options.strength.clamp(0.05, 1.0);
        s.hires_enabled = metadata.hires.is_some();
        if let Some(hires) = metadata.hires {
            s.hires = hires;
        }
        // The picture (and mask) it started from, when the library kept them; otherwise text
        // to image.
        let mut skipped = skipped;
        let kept = |name: &Option<String>, what: &str, skipped: &mut Vec<String>| {
            let (Some(name), Some(root)) = (name, &self.gallery.root) else {
                return None;
            };
            let path = crate::gallery::library::input_path(root, name);
            if path.is_file() {
                Some(path)
            } else {
                skipped.push(format!("its {what} {name} (no longer in the library)"));
                None
            }
        };
        // LoRAs come back with the prompt's tags; say which the models folders lack. The VAE
        // comes back when the models folders have a file of that name.
        for tag in
            crate::engine::extra_networks::lora_tags(&self.settings.prompt).unwrap_or_default()
        {
            if !self.models_scan.loras.contains(&tag.name) {
                skipped.push(format!("LoRA {} (not in the models folders)", tag.name));
            }
        }
        let vae_override = match &metadata.vae {
            Some(name) => {
                let found = self
                    .models_scan
                    .vaes
                    .iter()
                    .find(|path| {
                        path.file_name()
                            .is_some_and(|f| f.to_string_lossy() == *name)
                    })
                    .cloned();
                if found.is_none() {
                    skipped.push(format!("VAE {name} (not in the models folders)"));
                }
                found
            }
            None => None,
        };
        let init = kept(&metadata.init_image, "init image", &mut skipped);
        let mask = kept(&metadata.mask_image, "mask", &mut skipped);
        if metadata.image_options.is_some() && metadata.init_image.is_none() {
            skipped.push("its init image (not kept with it: open the picture)".into());
        }
        self.warnings = skipped
            .into_iter()
            .map(|s| format!("Not used from the gallery image: {s}"))
            .collect();
        match init {
            Some(image) => self.apply_studio(ctx, UiCommand::RestoreInput { image, mask }),
            None => self.init_image = None,
        }
        if let Some(vae) = vae_override {
            let mut overrides = self.settings.overrides_for(&self.settings.model);
            if overrides.vae.as_ref() != Some(&vae) {
                overrides.vae = Some(vae);
                self.set_model_overrides(overrides);
            }
        }
        self.tab = Tab::Studio;
    }

    /// Applies a Gallery command (others pass through untouched).
    pub(in crate::ui) fn apply_gallery(&mut self, ctx: &egui::Context, command: UiCommand) {
        match command {
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
            UiCommand::UseSettings(id) => self.use_settings(ctx, id),
            UiCommand::SendToImg2img(id) => {
                if let (Some(entry), Some(root)) = (self.gallery_entry(id), &self.gallery.root) {
                    let path = root.join(&entry.file);
                    self.tab = Tab::Studio;
                    self.apply_studio(ctx, UiCommand::SetInitImage(path));
                }
            }
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
            UiCommand::RebuildGallery => {
                self.gallery.status = "Rebuilding the index…".into();
                self.gallery_send(GalleryCommand::Rebuild);
            }
            UiCommand::OpenLibrary => self.open_library(),
            // Another tab's command (see `UiCommand::tab`).
            _ => {}
        }
    }
}
