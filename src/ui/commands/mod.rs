//! What the panels ask for, applied after the frame's layout: each tab's commands are handled in
//! that tab's file.

mod compare;
mod gallery;
mod studio;

use super::{AtelierApp, Tab, UiCommand};
use crate::gallery::worker::GalleryCommand;

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
            | SetFavourite(..) | DeleteImage(_) | UndoDelete | OpenGalleryFolder
            | ExportImage(_) | ImportDialog | ImportFiles(_) | RebuildGallery | OpenLibrary => {
                Some(Tab::Gallery)
            }
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
