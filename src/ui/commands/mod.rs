//! What the panels ask for, applied after the frame's layout: each tab's commands are handled in
//! that tab's file.

mod compare;
mod gallery;
mod studio;

use super::{AtelierApp, Tab};
use crate::gallery::worker::GalleryCommand;
use crate::worker::JobId;

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
    /// Ask for a single-file checkpoint.
    OpenModelFile,
    /// Ask for a models folder to add.
    AddModelsFolder,
    /// List the LoRAs in the models folders again.
    ScanModelsFolders,
    /// Ask for a VAE file for the current model.
    ChooseVae,
    /// Ask where the current (UNet-only) model's text encoders come from.
    ChooseTextEncoders,
    /// Override the current model's VAE or prediction (remembered per model), and reload it.
    SetModelOverrides(crate::engine::pipeline::ModelOverrides),
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
    /// Start an image-to-image job from a gallery image (the picture itself, on the Studio tab).
    SendToImg2img(i64),
    /// Ask for a picture to start from (image to image).
    OpenInitImage,
    /// Start from this picture file (image to image).
    SetInitImage(std::path::PathBuf),
    /// Start from the shown result ("Send to img2img").
    UseResultAsInit,
    /// Back to text to image.
    ClearInitImage,
    /// Start from a picture and mask kept in the library (a gallery image's inputs).
    RestoreInput {
        /// The picture.
        image: std::path::PathBuf,
        /// The mask, if it had one.
        mask: Option<std::path::PathBuf>,
    },
    /// Show the mask painter over the picture (a blank mask if there is none).
    OpenMaskEditor,
    /// Back from the mask painter to the image.
    CloseMaskEditor,
    /// Ask for a mask file (black and white, or a picture with transparency).
    OpenMaskFile,
    /// Use this file as the mask.
    SetMaskFile(std::path::PathBuf),
    /// Drop the mask: image to image again.
    RemoveMask,
    /// Set the job's size to the picture's (rounded to what the model takes).
    UsePictureSize,
}

impl UiCommand {
    /// The tab whose file handles this command (`None`: the app itself).
    pub fn tab(&self) -> Option<Tab> {
        use UiCommand::*;
        match self {
            Generate
            | Cancel
            | RemoveQueued(_)
            | MoveQueued(..)
            | LoadModel(_)
            | OpenFolder
            | OpenModelFile
            | AddModelsFolder
            | ScanModelsFolders
            | ChooseVae
            | ChooseTextEncoders
            | SetModelOverrides(_)
            | SaveAs
            | CopySeed
            | CopyPrompt
            | RandomSeed
            | DismissError
            | OpenInitImage
            | SetInitImage(_)
            | UseResultAsInit
            | ClearInitImage
            | RestoreInput { .. }
            | OpenMaskEditor
            | CloseMaskEditor
            | OpenMaskFile
            | SetMaskFile(_)
            | RemoveMask
            | UsePictureSize => Some(Tab::Studio),
            SelectImage(_) | RequestThumbnail(_) | UseSettings(_) | UseSeed(_)
            | SendToImg2img(_) | SetFavourite(..) | DeleteImage(_) | UndoDelete
            | OpenGalleryFolder | ExportImage(_) | ImportDialog | ImportFiles(_)
            | RebuildGallery | OpenLibrary => Some(Tab::Gallery),
            RunComparison | CancelComparison | SaveGrid | EnlargeCell(_) | OpenComparison(_)
            | CompareFromImage(_) => Some(Tab::Compare),
            SwitchTab(_) => None,
        }
    }
}

impl AtelierApp {
    /// Applies one command, in the file of the tab it belongs to.
    pub(super) fn apply(&mut self, ctx: &egui::Context, command: UiCommand) {
        match command.tab() {
            Some(Tab::Studio) => self.apply_studio(ctx, command),
            Some(Tab::Gallery) => self.apply_gallery(ctx, command),
            Some(Tab::Compare) => self.apply_compare(ctx, command),
            None => {
                if let UiCommand::SwitchTab(tab) = command {
                    self.switch_tab(tab);
                }
            }
        }
    }

    fn switch_tab(&mut self, tab: Tab) {
        if tab == Tab::Gallery && self.tab != Tab::Gallery && self.gallery.root.is_some() {
            // Other tools may have dropped PNGs into the folder meanwhile.
            self.gallery_send(GalleryCommand::Sync);
        }
        self.tab = tab;
    }
}
