//! The Gallery tab: a virtualised thumbnail grid with search and filters, and a detail panel with
//! what can be done with an image. The library itself lives on the gallery threads.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use egui::{RichText, TextureHandle, Ui};

use super::UiCommand;
use crate::gallery::library::GalleryEntry;
use crate::gallery::search::GalleryQuery;

/// The thumbnail cell size in points.
const CELL: f32 = 150.0;
/// Textures kept for thumbnails before the ones out of view are dropped.
const MAX_THUMBNAIL_TEXTURES: usize = 600;

/// How far back the date filter looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DateFilter {
    /// Every date.
    #[default]
    Any,
    /// The last 24 hours.
    Today,
    /// The last 7 days.
    Week,
    /// The last 30 days.
    Month,
}

impl DateFilter {
    const ALL: [DateFilter; 4] = [
        DateFilter::Any,
        DateFilter::Today,
        DateFilter::Week,
        DateFilter::Month,
    ];

    fn label(self) -> &'static str {
        match self {
            DateFilter::Any => "Any date",
            DateFilter::Today => "Last 24 hours",
            DateFilter::Week => "Last 7 days",
            DateFilter::Month => "Last 30 days",
        }
    }

    /// The earliest creation time it lets through.
    pub fn since_unix(self, now_unix: i64) -> Option<i64> {
        let days = match self {
            DateFilter::Any => return None,
            DateFilter::Today => 1,
            DateFilter::Week => 7,
            DateFilter::Month => 30,
        };
        Some(now_unix - days * 86_400)
    }
}

/// What the Gallery tab shows.
#[derive(Default)]
pub struct GalleryView {
    /// The open library's folder, once open.
    pub root: Option<PathBuf>,
    /// Words to search for.
    pub search_text: String,
    /// Only this model.
    pub model_filter: Option<String>,
    /// Only this sampler.
    pub scheduler_filter: Option<String>,
    /// Date filter.
    pub date_filter: DateFilter,
    /// Favourites only.
    pub favourites_only: bool,
    /// The current results, newest first.
    pub entries: Vec<GalleryEntry>,
    /// Models in the library.
    pub models: Vec<String>,
    /// Samplers in the library.
    pub schedulers: Vec<String>,
    /// How long the last search took to its first page.
    pub search_ms: f64,
    /// Whether every match of the last search has arrived (the rest come in pages).
    pub complete: bool,
    /// The image whose details are open.
    pub selected: Option<i64>,
    /// The selected image at full size.
    pub full_image: Option<(i64, TextureHandle)>,
    /// Thumbnails on the GPU, by file.
    pub thumbnails: HashMap<String, TextureHandle>,
    /// Thumbnails asked for and not yet back.
    pub thumbnails_requested: HashSet<String>,
    /// The last deleted image (for Undo).
    pub last_deleted: Option<GalleryEntry>,
    /// A line about the library (opened, rebuilt, imported).
    pub status: String,
    /// Whether the library changed since the last search.
    pub stale: bool,
}

impl GalleryView {
    /// The query the filters describe.
    pub fn query(&self, now_unix: i64) -> GalleryQuery {
        GalleryQuery {
            text: self.search_text.trim().to_string(),
            model: self.model_filter.clone(),
            scheduler: self.scheduler_filter.clone(),
            since_unix: self.date_filter.since_unix(now_unix),
            favourites_only: self.favourites_only,
            comparison: None,
            limit: 0,
        }
    }

    /// The selected entry, if it is among the results.
    pub fn selected_entry(&self) -> Option<&GalleryEntry> {
        let id = self.selected?;
        self.entries.iter().find(|e| e.id == id)
    }

    /// Drops thumbnail textures when there are too many, keeping those in `visible`.
    fn trim_textures(&mut self, visible: &HashSet<String>) {
        if self.thumbnails.len() > MAX_THUMBNAIL_TEXTURES {
            self.thumbnails.retain(|file, _| visible.contains(file));
        }
    }
}

fn combo_filter(
    ui: &mut Ui,
    id: &str,
    label: &str,
    value: &mut Option<String>,
    options: &[String],
) {
    let label_response = ui.label(label);
    egui::ComboBox::from_id_salt(id)
        .selected_text(value.as_deref().unwrap_or("All"))
        .width(160.0)
        .show_ui(ui, |ui| {
            ui.selectable_value(value, None, "All");
            for option in options {
                ui.selectable_value(value, Some(option.clone()), option);
            }
        })
        .response
        .labelled_by(label_response.id);
}

/// Draws the Gallery tab.
pub fn gallery_ui(ui: &mut Ui, view: &mut GalleryView, commands: &mut Vec<UiCommand>) {
    egui::Panel::top("gallery-filters").show(ui, |ui| {
        ui.add_space(4.0);
        ui.horizontal_wrapped(|ui| {
            let search_label = ui.label("Search");
            ui.add(
                egui::TextEdit::singleline(&mut view.search_text)
                    .hint_text("words in the prompt")
                    .desired_width(220.0),
            )
            .labelled_by(search_label.id);
            combo_filter(
                ui,
                "gallery-model",
                "Model",
                &mut view.model_filter,
                &view.models,
            );
            combo_filter(
                ui,
                "gallery-scheduler",
                "Sampler",
                &mut view.scheduler_filter,
                &view.schedulers,
            );
            let date_label = ui.label("Date");
            egui::ComboBox::from_id_salt("gallery-date")
                .selected_text(view.date_filter.label())
                .show_ui(ui, |ui| {
                    for filter in DateFilter::ALL {
                        ui.selectable_value(&mut view.date_filter, filter, filter.label());
                    }
                })
                .response
                .labelled_by(date_label.id);
            ui.checkbox(&mut view.favourites_only, "Favourites");
            if ui
                .button("Import…")
                .on_hover_text(
                    "Add PNGs from AUTOMATIC1111, ComfyUI or InvokeAI (or drop them on the window)",
                )
                .clicked()
            {
                commands.push(UiCommand::ImportDialog);
            }
            if ui
                .button("Rebuild index")
                .on_hover_text("Read every PNG in the library folder again")
                .clicked()
            {
                commands.push(UiCommand::RebuildGallery);
            }
        });
        ui.horizontal(|ui| {
            let count = view.entries.len();
            ui.label(format!(
                "{count}{} image{} · first page in {:.1} ms",
                if view.complete { "" } else { "+" },
                if count == 1 { "" } else { "s" },
                view.search_ms
            ));
            if let Some(root) = &view.root {
                ui.weak(root.display().to_string());
            }
            if !view.status.is_empty() {
                ui.label(&view.status);
            }
            if let Some(deleted) = &view.last_deleted {
                ui.label(format!("Deleted {}", deleted.file));
                if ui.button("Undo").clicked() {
                    commands.push(UiCommand::UndoDelete);
                }
            }
        });
        ui.add_space(2.0);
    });

    if view.selected_entry().is_some() {
        egui::Panel::right("gallery-detail")
            .resizable(true)
            .default_size(420.0)
            .show(ui, |ui| detail_ui(ui, view, commands));
    }
    egui::CentralPanel::default_margins().show(ui, |ui| {
        if view.root.is_none() {
            ui.label("Opening the gallery…");
            return;
        }
        if view.entries.is_empty() {
            ui.add_space(40.0);
            ui.vertical_centered(|ui| {
                ui.label(RichText::new("No images here yet").heading());
                ui.label("Every image you generate is saved here. Drop PNGs from other tools on the window to import them.");
            });
            return;
        }
        grid_ui(ui, view, commands);
    });
}

fn grid_ui(ui: &mut Ui, view: &mut GalleryView, commands: &mut Vec<UiCommand>) {
    let columns = ((ui.available_width() / CELL).floor() as usize).max(1);
    let rows = view.entries.len().div_ceil(columns);
    let mut visible = HashSet::new();
    let mut wanted = Vec::new();
    egui::ScrollArea::vertical()
        .auto_shrink([false, false])
        .show_rows(ui, CELL, rows, |ui, row_range| {
            for row in row_range {
                ui.horizontal(|ui| {
                    for column in 0..columns {
                        let Some(entry) = view.entries.get(row * columns + column) else {
                            break;
                        };
                        visible.insert(entry.file.clone());
                        let (rect, response) = ui.allocate_exact_size(
                            egui::vec2(CELL - 6.0, CELL - 6.0),
                            egui::Sense::click(),
                        );
                        let selected = view.selected == Some(entry.id);
                        let painter = ui.painter_at(rect);
                        painter.rect_filled(rect, 4.0, ui.visuals().extreme_bg_color);
                        match view.thumbnails.get(&entry.file) {
                            Some(texture) => {
                                let size = texture.size_vec2();
                                let scale = (rect.width() / size.x).min(rect.height() / size.y);
                                let image_rect =
                                    egui::Rect::from_center_size(rect.center(), size * scale);
                                painter.image(
                                    texture.id(),
                                    image_rect,
                                    egui::Rect::from_min_max(
                                        egui::pos2(0.0, 0.0),
                                        egui::pos2(1.0, 1.0),
                                    ),
                                    egui::Color32::WHITE,
                                );
                            }
                            None => {
                                if !view.thumbnails_requested.contains(&entry.file) {
                                    wanted.push(entry.file.clone());
                                }
                            }
                        }
                        if entry.favourite {
                            // A gold badge (the default fonts have no star glyph).
                            let centre = rect.right_top() + egui::vec2(-12.0, 12.0);
                            painter.circle(
                                centre,
                                7.0,
                                egui::Color32::GOLD,
                                egui::Stroke::new(1.5, egui::Color32::from_black_alpha(160)),
                            );
                        }
                        let stroke = if selected {
                            egui::Stroke::new(3.0, ui.visuals().selection.stroke.color)
                        } else if response.hovered() {
                            ui.visuals().widgets.hovered.bg_stroke
                        } else {
                            egui::Stroke::NONE
                        };
                        painter.rect_stroke(rect, 4.0, stroke, egui::StrokeKind::Inside);
                        let prompt = if entry.metadata.prompt.is_empty() {
                            entry.file.clone()
                        } else {
                            entry.metadata.prompt.clone()
                        };
                        let response = response.on_hover_text(format!(
                            "{prompt}\n{} · seed {} · {}",
                            entry.metadata.scheduler,
                            entry.metadata.seed.map_or("?".into(), |s| s.to_string()),
                            entry.metadata.model
                        ));
                        response.widget_info(|| {
                            egui::WidgetInfo::labeled(egui::Role::Button, true, &prompt)
                        });
                        if response.clicked() {
                            commands.push(UiCommand::SelectImage(Some(entry.id)));
                        }
                    }
                });
            }
        });
    view.trim_textures(&visible);
    for file in wanted {
        commands.push(UiCommand::RequestThumbnail(file));
    }
}

fn detail_ui(ui: &mut Ui, view: &GalleryView, commands: &mut Vec<UiCommand>) {
    let Some(entry) = view.selected_entry().cloned() else {
        return;
    };
    ui.horizontal(|ui| {
        ui.heading("Image");
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            if ui.button("Close").clicked() {
                commands.push(UiCommand::SelectImage(None));
            }
        });
    });
    egui::ScrollArea::vertical().show(ui, |ui| {
        ui.horizontal_wrapped(|ui| {
            if ui
                .button("Use these settings")
                .on_hover_text("Fill the prompt panel with this image's parameters")
                .clicked()
            {
                commands.push(UiCommand::UseSettings(entry.id));
            }
            if ui
                .add_enabled(entry.metadata.seed.is_some(), egui::Button::new("Use seed"))
                .clicked()
            {
                commands.push(UiCommand::UseSeed(entry.id));
            }
            if ui.button("Copy prompt").clicked() {
                ui.ctx().copy_text(entry.metadata.prompt.clone());
            }
            if ui
                .button("Send to img2img")
                .on_hover_text("Start an image-to-image job from this picture (Studio tab)")
                .clicked()
            {
                commands.push(UiCommand::SendToImg2img(entry.id));
            }
            if ui
                .button("Compare samplers…")
                .on_hover_text("Take this image's settings to the Compare tab")
                .clicked()
            {
                commands.push(UiCommand::CompareFromImage(entry.id));
            }
            if let Some(comparison) = &entry.metadata.comparison
                && ui
                    .button("Open comparison")
                    .on_hover_text("Reopen the grid this image is a cell of")
                    .clicked()
            {
                commands.push(UiCommand::OpenComparison(comparison.id.clone()));
            }
            let star = if entry.favourite {
                "Unfavourite"
            } else {
                "Favourite"
            };
            if ui.button(star).clicked() {
                commands.push(UiCommand::SetFavourite(entry.id, !entry.favourite));
            }
        });
        ui.horizontal_wrapped(|ui| {
            if ui.button("Open folder").clicked() {
                commands.push(UiCommand::OpenGalleryFolder);
            }
            if ui.button("Export…").clicked() {
                commands.push(UiCommand::ExportImage(entry.id));
            }
            if ui
                .button(RichText::new("Delete").color(ui.visuals().error_fg_color))
                .on_hover_text("Move to the library's trash (Undo brings it back)")
                .clicked()
            {
                commands.push(UiCommand::DeleteImage(entry.id));
            }
        });
        match &view.full_image {
            Some((id, texture)) if *id == entry.id => {
                // Fit the panel's width (small images are enlarged, pixels kept sharp).
                let size = texture.size_vec2();
                let scale = (ui.available_width() / size.x).min(2048.0 / size.y.max(1.0));
                ui.image((texture.id(), size * scale));
            }
            _ => {
                ui.label("Loading the image…");
            }
        }
        ui.separator();
        let m = &entry.metadata;
        egui::Grid::new("gallery-parameters")
            .num_columns(2)
            .spacing([10.0, 4.0])
            .show(ui, |ui| {
                let mut row = |key: &str, value: String| {
                    ui.label(RichText::new(key).strong());
                    ui.add(egui::Label::new(value).wrap());
                    ui.end_row();
                };
                row("Prompt", m.prompt.clone());
                if !m.negative_prompt.is_empty() {
                    row("Negative", m.negative_prompt.clone());
                }
                row("Model", m.model.clone());
                if let Some(hash) = &m.model_hash {
                    row("Model hash", hash.clone());
                }
                row("Sampler", m.scheduler.clone());
                if let Some(eta) = m.eta {
                    row("Eta", eta.to_string());
                }
                if let Some(seed) = m.seed {
                    row("Seed", seed.to_string());
                }
                if let Some(steps) = m.steps {
                    row("Steps", steps.to_string());
                }
                if let Some(guidance) = m.guidance {
                    row("Guidance", guidance.to_string());
                }
                row("Size", format!("{} x {}", m.width, m.height));
                if let Some(clip_skip) = m.clip_skip {
                    row("Clip skip", clip_skip.to_string());
                }
                if let Some(options) = &m.image_options {
                    let mode = if options.outpaint.is_some() {
                        "outpainting"
                    } else if m.is_inpainting() {
                        "inpainting"
                    } else {
                        "image to image"
                    };
                    row("Mode", format!("{mode}, strength {}", options.strength));
                    if m.is_inpainting() {
                        row(
                            "Mask",
                            format!(
                                "blur {} px, {}{}",
                                options.mask_blur,
                                options.masked_content.display_name(),
                                options
                                    .only_masked_padding
                                    .map_or(String::new(), |p| format!(", only masked ({p} px)"))
                            ),
                        );
                    }
                }
                if let Some(hires) = &m.hires {
                    row(
                        "Hires fix",
                        format!(
                            "x{} at strength {}, {} steps, {}",
                            hires.scale,
                            hires.strength,
                            hires
                                .steps
                                .map_or("same".to_string(), |steps| steps.to_string()),
                            hires.upscaler.display_name()
                        ),
                    );
                }
                if let Some(t) = &m.timings {
                    row(
                        "Time",
                        format!(
                            "{:.2} s (text {:.2} s, denoise {:.2} s, decode {:.2} s)",
                            t.total_secs, t.text_encoding_secs, t.denoising_secs, t.decode_secs
                        ),
                    );
                }
                let date = jiff::Timestamp::from_second(m.created_unix)
                    .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
                    .unwrap_or_default();
                row("Created", date);
                row(
                    "Made with",
                    format!("{} ({})", m.app_version, m.source.display_name()),
                );
                if let Some(comparison) = &m.comparison {
                    row(
                        "Comparison",
                        format!(
                            "{} (row {}, column {})",
                            comparison.id,
                            comparison.row + 1,
                            comparison.column + 1
                        ),
                    );
                }
                row("File", entry.file.clone());
            });
    });
}
