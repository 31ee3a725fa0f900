//! The Studio panel's controls for the modes: the picture to work on and how (image to image,
//! inpainting, outpainting), or the hires fix for text to image.

use egui::{RichText, Ui};

use super::settings::Settings;
use super::{InitImageView, UiCommand};
use crate::engine::init_image::{HiresUpscaler, MaskedContent, ResizeMode};
use crate::engine::pipeline::{ImageOptions, MAX_MASK_BLUR};

/// The most pixels outpainting adds on one side.
pub const MAX_OUTPAINT_PX: u32 = 1024;

/// Image to image: the picture to start from (open, drop or "Send to img2img") and how it is
/// worked on: the whole of it (image to image), a painted mask (inpainting) or a larger canvas
/// (outpainting). Without a picture, the hires fix.
pub fn init_image_ui(
    ui: &mut Ui,
    settings: &mut Settings,
    init_image: Option<&InitImageView>,
    commands: &mut Vec<UiCommand>,
) {
    let Some(init) = init_image else {
        ui.horizontal(|ui| {
            ui.label("Start from a picture:");
            if ui
                .button("Open image…")
                .on_hover_text("Image to image; or drop a PNG or JPEG on this tab")
                .clicked()
            {
                commands.push(UiCommand::OpenInitImage);
            }
        });
        hires_ui(ui, settings);
        return;
    };
    let options = &mut settings.image_options;
    let has_mask = init.mask.is_some();
    let outpainting = options.outpaint.is_some();
    let mode = if outpainting {
        "Outpainting"
    } else if has_mask {
        "Inpainting"
    } else {
        "Image to image"
    };
    ui.label(RichText::new(mode).strong());
    ui.horizontal(|ui| {
        let size = init.texture.size_vec2();
        let scale = (96.0 / size.x.max(size.y)).min(1.0);
        ui.image((init.texture.id(), size * scale));
        ui.vertical(|ui| {
            ui.label(&init.name);
            ui.weak(format!("{}x{}", init.image.width(), init.image.height()));
            ui.horizontal(|ui| {
                if ui
                    .button("Clear")
                    .on_hover_text("Back to text to image")
                    .clicked()
                {
                    commands.push(UiCommand::ClearInitImage);
                }
                if ui
                    .button("Use its size")
                    .on_hover_text("Set width and height to the picture's")
                    .clicked()
                {
                    commands.push(UiCommand::UsePictureSize);
                }
            });
        });
    });
    let label = ui.label("Denoising strength");
    ui.add(egui::Slider::new(&mut options.strength, 0.05..=1.0).step_by(0.01))
        .on_hover_text("How much of the picture is repainted: low keeps it, 1 starts from noise")
        .labelled_by(label.id);
    let label = ui.label("Resize mode");
    egui::ComboBox::from_id_salt("resize-mode")
        .selected_text(options.resize_mode.display_name())
        .show_ui(ui, |ui| {
            for mode in ResizeMode::ALL {
                ui.selectable_value(&mut options.resize_mode, mode, mode.display_name());
            }
        })
        .response
        .on_hover_text("How a picture of another size is fitted to the job's")
        .labelled_by(label.id);
    if !outpainting {
        ui.horizontal(|ui| {
            let paint = if has_mask { "Edit mask…" } else { "Paint mask…" };
            if ui
                .button(paint)
                .on_hover_text("Inpainting: paint where to repaint")
                .clicked()
            {
                commands.push(UiCommand::OpenMaskEditor);
            }
            if ui
                .button("Mask from file…")
                .on_hover_text("A black-and-white image (white: repaint) or a picture whose transparent part is repainted")
                .clicked()
            {
                commands.push(UiCommand::OpenMaskFile);
            }
            if has_mask && ui.button("Remove mask").clicked() {
                commands.push(UiCommand::RemoveMask);
            }
        });
    }
    if let Some(mask) = &init.mask {
        ui.weak(format!(
            "mask: {} · {:.0}% of the picture",
            mask.source,
            mask.coverage() * 100.0
        ));
    }
    if has_mask || outpainting {
        let label = ui.label("Mask blur");
        ui.add(egui::Slider::new(&mut options.mask_blur, 0.0..=MAX_MASK_BLUR).suffix(" px"))
            .on_hover_text("Softens the mask's edge so the repainted region blends in")
            .labelled_by(label.id);
        let label = ui.label("Masked content");
        egui::ComboBox::from_id_salt("masked-content")
            .selected_text(options.masked_content.display_name())
            .show_ui(ui, |ui| {
                for content in MaskedContent::ALL {
                    ui.selectable_value(
                        &mut options.masked_content,
                        content,
                        content.display_name(),
                    );
                }
            })
            .response
            .on_hover_text("What the masked region starts from")
            .labelled_by(label.id);
        ui.horizontal(|ui| {
            let mut only_masked = options.only_masked_padding.is_some();
            ui.radio_value(&mut only_masked, false, "Whole picture");
            ui.radio_value(&mut only_masked, true, "Only masked")
                .on_hover_text("Work on a crop around the mask at the job's size, pasted back");
            options.only_masked_padding = match (only_masked, options.only_masked_padding) {
                (true, Some(padding)) => Some(padding),
                (true, None) => Some(32),
                (false, _) => None,
            };
        });
        match &mut options.only_masked_padding {
            Some(padding) => {
                let label = ui.label("Masked area padding");
                ui.add(egui::Slider::new(padding, 0..=256).suffix(" px"))
                    .labelled_by(label.id);
            }
            None => {
                ui.checkbox(&mut options.keep_unmasked, "Keep the rest of the picture")
                    .on_hover_text("Paste the original pixels back outside the mask, so only the masked region changes");
            }
        }
    }
    if !has_mask {
        outpaint_ui(ui, options);
    }
}

/// Outpainting: pixels added on each side of the picture.
fn outpaint_ui(ui: &mut Ui, options: &mut ImageOptions) {
    let mut outpaint = options.outpaint.unwrap_or_default();
    ui.label("Outpaint: pixels added on each side")
        .on_hover_text("Extend the canvas and paint the new area");
    egui::Grid::new("outpaint").num_columns(4).show(ui, |ui| {
        for (row, pair) in [
            [("Left", &mut outpaint.left), ("Right", &mut outpaint.right)],
            [("Top", &mut outpaint.top), ("Bottom", &mut outpaint.bottom)],
        ]
        .into_iter()
        .enumerate()
        {
            for (name, value) in pair {
                let label = ui.label(name);
                ui.add(
                    egui::DragValue::new(value)
                        .range(0..=MAX_OUTPAINT_PX)
                        .speed(8.0)
                        .suffix(" px"),
                )
                .labelled_by(label.id);
            }
            if row == 0 {
                ui.end_row();
            }
        }
    });
    let any = outpaint.left + outpaint.top + outpaint.right + outpaint.bottom > 0;
    let was = options.outpaint.is_some();
    options.outpaint = any.then_some(outpaint);
    if any && !was {
        // The new area starts from noise: outpainting repaints it whole.
        options.strength = 1.0;
    }
}

/// The hires fix: a second, larger pass of text to image.
fn hires_ui(ui: &mut Ui, settings: &mut Settings) {
    ui.checkbox(&mut settings.hires_enabled, "Hires fix")
        .on_hover_text(
            "Generate at the size above, enlarge, then denoise again at the larger size",
        );
    if !settings.hires_enabled {
        return;
    }
    let hires = &mut settings.hires;
    egui::Grid::new("hires").num_columns(2).show(ui, |ui| {
        let label = ui.label("Upscale by");
        ui.add(egui::Slider::new(&mut hires.scale, 1.05..=4.0).step_by(0.05))
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Hires strength");
        ui.add(egui::Slider::new(&mut hires.strength, 0.05..=1.0).step_by(0.01))
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Hires steps");
        let mut steps = hires.steps.unwrap_or(0);
        ui.add(egui::Slider::new(&mut steps, 0..=150))
            .on_hover_text("0: as many as the first pass")
            .labelled_by(label.id);
        hires.steps = (steps > 0).then_some(steps);
        ui.end_row();
        let label = ui.label("Upscaler");
        egui::ComboBox::from_id_salt("hires-upscaler")
            .selected_text(hires.upscaler.display_name())
            .show_ui(ui, |ui| {
                for upscaler in HiresUpscaler::ALL {
                    ui.selectable_value(&mut hires.upscaler, upscaler, upscaler.display_name());
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
    });
    let (width, height) = hires.size(settings.width, settings.height, 8);
    ui.weak(format!(
        "{}x{}, then {width}x{height}",
        settings.width, settings.height
    ));
}
