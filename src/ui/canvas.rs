//! The centre: the image or its live preview, progress, and what to do with the result.

use egui::{RichText, Ui};

use super::settings::Settings;
use super::{ModelState, StudioState, UiCommand};

/// Formats seconds as `1:05` or `12.3 s`.
pub fn format_secs(secs: f64) -> String {
    if secs >= 60.0 {
        let whole = secs.round() as u64;
        format!("{}:{:02}", whole / 60, whole % 60)
    } else {
        format!("{secs:.1} s")
    }
}

/// Draws the error banner, progress, the image and its toolbar.
/// `settings` holds the zoom choice; `studio` is the engine as the window knows it.
pub fn canvas_ui(
    ui: &mut Ui,
    settings: &mut Settings,
    studio: &StudioState<'_>,
    commands: &mut Vec<UiCommand>,
) {
    if let Some(error) = &studio.error {
        egui::Frame::new()
            .fill(ui.visuals().extreme_bg_color)
            .stroke(egui::Stroke::new(1.0, ui.visuals().error_fg_color))
            .inner_margin(8.0)
            .corner_radius(4.0)
            .show(ui, |ui| {
                ui.horizontal(|ui| {
                    ui.vertical(|ui| {
                        ui.colored_label(
                            ui.visuals().error_fg_color,
                            RichText::new(&error.message).strong(),
                        );
                        if !error.hint.is_empty() {
                            ui.label(&error.hint);
                        }
                    });
                    ui.with_layout(egui::Layout::right_to_left(egui::Align::Min), |ui| {
                        if ui.button("Dismiss").clicked() {
                            commands.push(UiCommand::DismissError);
                        }
                    });
                });
            });
        ui.add_space(4.0);
    }
    for warning in studio.warnings {
        ui.colored_label(ui.visuals().warn_fg_color, warning);
    }

    if let Some(running) = &studio.running {
        ui.horizontal(|ui| {
            let fraction = running.steps_done as f32 / running.total_steps.max(1) as f32;
            let per_sec = if running.elapsed_secs > 0.0 {
                running.steps_done as f64 / running.elapsed_secs
            } else {
                0.0
            };
            let remaining = running.total_steps.saturating_sub(running.steps_done);
            let eta = if per_sec > 0.0 {
                format_secs(remaining as f64 / per_sec)
            } else {
                "…".into()
            };
            let text = if running.cancelling {
                "Cancelling…".to_string()
            } else {
                format!(
                    "step {}/{} · {per_sec:.2} it/s · {} elapsed · ETA {eta}",
                    running.steps_done,
                    running.total_steps,
                    format_secs(running.elapsed_secs)
                )
            };
            let cancel_width = 90.0;
            ui.add(
                egui::ProgressBar::new(fraction)
                    .text(text)
                    .desired_width(ui.available_width() - cancel_width),
            );
            if ui
                .add_enabled(!running.cancelling, egui::Button::new("Cancel"))
                .on_hover_text("Esc")
                .clicked()
            {
                commands.push(UiCommand::Cancel);
            }
        });
    } else if matches!(studio.model, ModelState::Loading { .. }) && !studio.queue.is_empty() {
        ui.label("Waiting for the model to load…");
    }

    ui.horizontal(|ui| {
        ui.selectable_value(&mut settings.zoom_to_fit, true, "Fit");
        ui.selectable_value(&mut settings.zoom_to_fit, false, "1:1");
        ui.separator();
        let has_image = studio.shown.is_some();
        if ui
            .add_enabled(has_image, egui::Button::new("Save as…"))
            .clicked()
        {
            commands.push(UiCommand::SaveAs);
        }
        if ui
            .add_enabled(has_image, egui::Button::new("Send to img2img"))
            .on_hover_text("Start image to image from this result")
            .clicked()
        {
            commands.push(UiCommand::UseResultAsInit);
        }
        if ui
            .add_enabled(has_image, egui::Button::new("Copy seed"))
            .clicked()
        {
            commands.push(UiCommand::CopySeed);
        }
        if ui
            .add_enabled(has_image, egui::Button::new("Copy prompt"))
            .clicked()
        {
            commands.push(UiCommand::CopyPrompt);
        }
    });

    let texture = if studio.running.is_some() {
        studio
            .preview
            .as_ref()
            .or(studio.shown.as_ref().map(|s| &s.texture))
    } else {
        studio.shown.as_ref().map(|s| &s.texture)
    };
    if let Some(shown) = studio.shown.as_ref().filter(|_| studio.running.is_none()) {
        let r = &shown.request;
        let t = &shown.timings;
        let steps = shown.steps_run.max(1);
        let timing = if shown.hires {
            // The second pass's denoising time alone would say little: the whole job's.
            format!(
                "hires fix, {steps} steps over both passes, total {}",
                format_secs(t.total_secs)
            )
        } else {
            format!(
                "{steps} steps in {} ({:.2} s/step), total {}",
                format_secs(t.denoising_secs),
                t.denoising_secs / steps as f64,
                format_secs(t.total_secs)
            )
        };
        ui.weak(format!(
            "seed {} · {} steps · {} · guidance {} · {}x{} · {timing}",
            r.seed,
            r.steps,
            r.scheduler.display_name(),
            r.guidance_scale,
            r.width,
            r.height,
        ));
    }
    match texture {
        Some(texture) => {
            let size = texture.size_vec2();
            let target = studio
                .running
                .as_ref()
                .map(|r| egui::vec2(r.job.request.width as f32, r.job.request.height as f32))
                .or_else(|| {
                    studio
                        .shown
                        .as_ref()
                        .map(|s| egui::vec2(s.request.width as f32, s.request.height as f32))
                })
                .unwrap_or(size);
            if settings.zoom_to_fit {
                let available = ui.available_size();
                let scale = (available.x / target.x)
                    .min(available.y / target.y)
                    .max(0.05);
                ui.centered_and_justified(|ui| {
                    ui.add(egui::Image::new(texture).fit_to_exact_size(target * scale));
                });
            } else {
                egui::ScrollArea::both().show(ui, |ui| {
                    ui.add(egui::Image::new(texture).fit_to_exact_size(target));
                });
            }
        }
        None => {
            ui.centered_and_justified(|ui| {
                ui.label(
                    RichText::new(
                        "Your image appears here.\nType a prompt and press Generate (Ctrl+Enter).",
                    )
                    .weak()
                    .size(18.0),
                );
            });
        }
    }
}

/// The status bar: model, UI frame time, time to first preview.
pub fn status_bar_ui(ui: &mut Ui, studio: &StudioState<'_>) {
    ui.horizontal(|ui| {
        match &studio.model {
            ModelState::Ready(info) => ui.label(format!("Ready: {} on {}", info.name, info.device)),
            ModelState::Loading { model, .. } => ui.label(format!("Loading {model}…")),
            ModelState::Failed { model } => ui.label(format!("Failed to load {model}")),
            ModelState::Empty => ui.label("No model"),
        };
        ui.separator();
        let stats = &studio.frame_stats;
        let mut text = format!("UI frame {:.1} ms", stats.last_ms);
        if stats.frames_while_busy > 0 {
            text.push_str(&format!(
                " (while generating: mean {:.1} ms, max {:.1} ms)",
                stats.total_while_busy_ms / stats.frames_while_busy as f64,
                stats.max_while_busy_ms
            ));
        }
        ui.weak(text);
        if let Some(secs) = stats.first_preview_secs {
            ui.separator();
            ui.weak(format!("first preview {:.2} s after Generate", secs));
        }
    });
}
