//! The Compare tab: samplers across, an optional axis down, each cell filled live with its
//! preview and then its image; click to enlarge, flip between two cells, save the grid.

use std::collections::HashMap;

use egui::{RichText, TextureHandle, Ui};
use image::RgbImage;

use super::settings::Settings;
use super::{ModelState, UiCommand};
use crate::compare::{CellResult, ComparisonPlan, YAxis, sampler_label};
use crate::schedulers::{Sampler, SchedulerKind, SigmaSchedule};
use crate::worker::JobId;

/// What varies down the rows, as the picker offers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RowKind {
    /// One row.
    #[default]
    None,
    /// Steps.
    Steps,
    /// Guidance.
    Guidance,
    /// Seeds.
    Seeds,
    /// Prompt search and replace.
    PromptReplace,
    /// Denoising strength (with a picture on the Studio tab).
    Strength,
}

impl RowKind {
    const ALL: [RowKind; 6] = [
        RowKind::None,
        RowKind::Steps,
        RowKind::Guidance,
        RowKind::Seeds,
        RowKind::PromptReplace,
        RowKind::Strength,
    ];

    fn label(self) -> &'static str {
        match self {
            RowKind::None => "Nothing (one row)",
            RowKind::Steps => "Steps",
            RowKind::Guidance => "Guidance",
            RowKind::Seeds => "Seeds",
            RowKind::PromptReplace => "Prompt S/R",
            RowKind::Strength => "Denoising strength",
        }
    }

    fn axis_name(self) -> &'static str {
        match self {
            RowKind::None => "none",
            RowKind::Steps => "steps",
            RowKind::Guidance => "guidance",
            RowKind::Seeds => "seed",
            RowKind::PromptReplace => "prompt",
            RowKind::Strength => "strength",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            RowKind::None => "",
            RowKind::Steps => "10, 20, 30",
            RowKind::Guidance => "4, 7, 10",
            RowKind::Seeds => "1, 2, 3",
            RowKind::PromptReplace => "fox, cat, owl (the first is in the prompt)",
            RowKind::Strength => "0.3, 0.5, 0.7",
        }
    }
}

/// Where a cell stands.
#[derive(Debug, Clone, PartialEq)]
pub enum CellState {
    /// Waiting in the queue.
    Queued,
    /// Denoising: model evaluations done and in all.
    Running(usize, usize),
    /// Finished.
    Done,
    /// Failed or cancelled, with why.
    Failed(String),
}

/// One cell of the grid on screen.
pub struct CellView {
    /// Its state.
    pub state: CellState,
    /// The live preview.
    pub preview: Option<TextureHandle>,
    /// The final image.
    pub image: Option<(RgbImage, TextureHandle)>,
    /// Time and model evaluations.
    pub result: Option<CellResult>,
}

/// The Compare tab's state.
#[derive(Default)]
pub struct CompareView {
    /// The samplers across (in the order picked).
    pub samplers: Vec<Sampler>,
    /// What varies down.
    pub row_kind: RowKind,
    /// The row values, comma-separated.
    pub row_values: String,
    /// The comparison shown (running or done).
    pub plan: Option<ComparisonPlan>,
    /// Its cells, row by row.
    pub cells: Vec<CellView>,
    /// Which queued job fills which cell.
    pub job_cells: HashMap<JobId, usize>,
    /// The cell shown large.
    pub enlarged: Option<usize>,
    /// The other cell of the flip.
    pub flip_with: Option<usize>,
    /// Alternate the enlarged cell with `flip_with`.
    pub flipping: bool,
    /// Why the last Run was refused.
    pub error: Option<String>,
}

impl CompareView {
    /// The Y axis the picker describes.
    pub fn axis(&self) -> Result<YAxis, String> {
        if self.row_kind == RowKind::None {
            return Ok(YAxis::None);
        }
        YAxis::parse(self.row_kind.axis_name(), &self.row_values)
    }

    /// Shows `plan` with no results yet.
    pub fn start(&mut self, plan: ComparisonPlan) {
        self.cells = (0..plan.rows() * plan.columns())
            .map(|_| CellView {
                state: CellState::Queued,
                preview: None,
                image: None,
                result: None,
            })
            .collect();
        self.plan = Some(plan);
        self.job_cells.clear();
        self.enlarged = None;
        self.flip_with = None;
        self.flipping = false;
    }

    /// Whether any cell still waits or runs.
    pub fn running(&self) -> bool {
        self.cells
            .iter()
            .any(|c| matches!(c.state, CellState::Queued | CellState::Running(..)))
    }

    /// The finished images and results, row by row, for the grid PNG.
    pub fn finished(&self) -> (Vec<Option<RgbImage>>, Vec<Option<CellResult>>) {
        (
            self.cells
                .iter()
                .map(|c| c.image.as_ref().map(|(image, _)| image.clone()))
                .collect(),
            self.cells.iter().map(|c| c.result.clone()).collect(),
        )
    }

    fn cell_label(&self, index: usize) -> String {
        let Some(plan) = &self.plan else {
            return String::new();
        };
        let (row, column) = (index / plan.columns(), index % plan.columns());
        let y = plan.y.label(row);
        if y.is_empty() {
            plan.column_label(column)
        } else {
            format!("{} · {y}", plan.column_label(column))
        }
    }
}

/// The row picker's setting for an axis.
pub fn row_picker(axis: &YAxis) -> (RowKind, String) {
    let join = |values: Vec<String>| values.join(", ");
    match axis {
        YAxis::None => (RowKind::None, String::new()),
        YAxis::Steps(v) => (
            RowKind::Steps,
            join(v.iter().map(|x| x.to_string()).collect()),
        ),
        YAxis::Guidance(v) => (
            RowKind::Guidance,
            join(v.iter().map(|x| x.to_string()).collect()),
        ),
        YAxis::Seeds(v) => (
            RowKind::Seeds,
            join(v.iter().map(|x| x.to_string()).collect()),
        ),
        YAxis::PromptReplace(v) => (RowKind::PromptReplace, join(v.clone())),
        YAxis::Strength(v) => (
            RowKind::Strength,
            join(v.iter().map(|x| x.to_string()).collect()),
        ),
    }
}

/// Every sampler with default and Karras sigmas, as the picker lists them.
fn pickable_samplers() -> Vec<Sampler> {
    let mut samplers = Vec::new();
    for &kind in SchedulerKind::ALL {
        for sigmas in [SigmaSchedule::Default, SigmaSchedule::Karras] {
            if kind.supports(sigmas) {
                samplers.push(Sampler { kind, sigmas });
            }
        }
    }
    samplers
}

/// Draws the Compare tab.
/// `settings` gives the Studio tab's prompt, seed and size; `picture` describes the Studio tab's
/// picture, which every cell then works on; `model` says whether Run can start.
pub fn compare_ui(
    ui: &mut Ui,
    view: &mut CompareView,
    settings: &Settings,
    picture: Option<&str>,
    model: &ModelState,
    commands: &mut Vec<UiCommand>,
) {
    egui::Panel::left("compare-controls")
        .resizable(true)
        .default_size(300.0)
        .show(ui, |ui| {
            egui::ScrollArea::vertical().show(ui, |ui| {
                controls_ui(ui, view, settings, picture, model, commands)
            });
        });
    egui::CentralPanel::default_margins().show(ui, |ui| {
        if view.plan.is_none() {
            ui.add_space(40.0);
            ui.vertical_centered(|ui| {
                ui.label(RichText::new("Compare samplers side by side").heading());
                ui.label("Pick samplers on the left (and optionally what varies down the rows), then Run: the prompt, seed and size come from the Studio tab.");
            });
            return;
        }
        match view.enlarged {
            Some(index) => enlarged_ui(ui, view, index, commands),
            None => grid_ui(ui, view, commands),
        }
    });
}

fn controls_ui(
    ui: &mut Ui,
    view: &mut CompareView,
    settings: &Settings,
    picture: Option<&str>,
    model: &ModelState,
    commands: &mut Vec<UiCommand>,
) {
    // Run first: the sampler list below is long.
    let s = settings;
    ui.label(RichText::new("From the Studio tab").strong());
    ui.label(format!(
        "\"{}\"\nseed {} · {} steps · guidance {} · {}x{}",
        if s.prompt.chars().count() > 80 {
            format!("{}…", s.prompt.chars().take(79).collect::<String>())
        } else {
            s.prompt.clone()
        },
        s.seed,
        s.steps,
        s.guidance,
        s.width,
        s.height
    ));
    match picture {
        Some(picture) => ui.label(picture),
        None => ui.weak(
            "text to image (open a picture on the Studio tab to compare img2img or inpainting)",
        ),
    };
    let cells = view.samplers.len() * view.axis().map_or(1, |a| a.len());
    let ready = matches!(model, ModelState::Ready(_));
    ui.add_space(4.0);
    let run = ui.add_enabled(
        ready && !view.samplers.is_empty() && !view.running(),
        egui::Button::new(RichText::new(format!("Run comparison ({cells} cells)")).size(16.0)),
    );
    let run = if ready {
        run
    } else {
        run.on_disabled_hover_text("Load a model first (Studio tab)")
    };
    if run.clicked() {
        commands.push(UiCommand::RunComparison);
    }
    ui.horizontal(|ui| {
        if view.running() && ui.button("Cancel comparison").clicked() {
            commands.push(UiCommand::CancelComparison);
        }
        let any_done = view.cells.iter().any(|c| c.image.is_some());
        if ui
            .add_enabled(any_done, egui::Button::new("Save grid…"))
            .on_hover_text("One labelled PNG with the comparison's parameters in its metadata")
            .clicked()
        {
            commands.push(UiCommand::SaveGrid);
        }
    });
    if let Some(error) = &view.error {
        ui.colored_label(ui.visuals().error_fg_color, error);
    }
    ui.separator();
    ui.heading("Down: rows");
    let rows_label = ui.label("Vary");
    egui::ComboBox::from_id_salt("compare-rows")
        .selected_text(view.row_kind.label())
        .show_ui(ui, |ui| {
            for kind in RowKind::ALL {
                ui.selectable_value(&mut view.row_kind, kind, kind.label());
            }
        })
        .response
        .labelled_by(rows_label.id);
    if view.row_kind != RowKind::None {
        let values_label = ui.label("Values");
        ui.add(
            egui::TextEdit::singleline(&mut view.row_values)
                .hint_text(view.row_kind.hint())
                .desired_width(240.0),
        )
        .labelled_by(values_label.id);
    }
    ui.separator();
    ui.heading("Across: samplers");
    ui.label(format!("{} picked", view.samplers.len()));
    for sampler in pickable_samplers() {
        let mut picked = view.samplers.contains(&sampler);
        if ui.checkbox(&mut picked, sampler_label(sampler)).changed() {
            if picked {
                view.samplers.push(sampler);
            } else {
                view.samplers.retain(|s| *s != sampler);
            }
        }
    }
}

fn cell_texture(cell: &CellView) -> Option<&TextureHandle> {
    cell.image
        .as_ref()
        .map(|(_, texture)| texture)
        .or(cell.preview.as_ref())
}

fn caption(cell: &CellView) -> String {
    match (&cell.state, &cell.result) {
        (CellState::Done, Some(result)) => format!(
            "{:.1} s · {} evals",
            result.total_secs, result.model_evaluations
        ),
        (CellState::Running(done, total), _) => format!("step {done}/{total}"),
        (CellState::Queued, _) => "queued".into(),
        (CellState::Failed(why), _) => why.clone(),
        (CellState::Done, None) => String::new(),
    }
}

fn grid_ui(ui: &mut Ui, view: &CompareView, commands: &mut Vec<UiCommand>) {
    let Some(plan) = &view.plan else {
        return;
    };
    let (columns, rows) = (plan.columns(), plan.rows());
    let label_width = if plan.y == YAxis::None { 0.0 } else { 110.0 };
    // One scale for every cell: the columns share the width.
    let aspect = plan.base.height as f32 / plan.base.width.max(1) as f32;
    let cell_width =
        ((ui.available_width() - label_width) / columns as f32 - 8.0).clamp(64.0, 512.0);
    let cell_size = egui::vec2(cell_width, cell_width * aspect);
    let requests: Vec<_> = plan.cells().into_iter().map(|c| c.request).collect();
    egui::ScrollArea::both().show(ui, |ui| {
        egui::Grid::new("compare-grid")
            .spacing([8.0, 6.0])
            .show(ui, |ui| {
                if label_width > 0.0 {
                    ui.label("");
                }
                for column in 0..columns {
                    ui.label(RichText::new(plan.column_label(column)).strong());
                }
                ui.end_row();
                for row in 0..rows {
                    if label_width > 0.0 {
                        ui.label(plan.y.label(row));
                    }
                    for column in 0..columns {
                        let index = row * columns + column;
                        let cell = &view.cells[index];
                        ui.vertical(|ui| {
                            let (rect, response) =
                                ui.allocate_exact_size(cell_size, egui::Sense::click());
                            ui.painter()
                                .rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
                            if let Some(texture) = cell_texture(cell) {
                                ui.painter().image(
                                    texture.id(),
                                    rect,
                                    egui::Rect::from_min_max(
                                        egui::pos2(0.0, 0.0),
                                        egui::pos2(1.0, 1.0),
                                    ),
                                    egui::Color32::WHITE,
                                );
                            }
                            let label = view.cell_label(index);
                            let request = &requests[index];
                            let response = response.on_hover_text(format!(
                                "{label}\n{} steps · guidance {} · seed {}\n{}",
                                request.steps, request.guidance_scale, request.seed, request.prompt
                            ));
                            response.widget_info(|| {
                                egui::WidgetInfo::labeled(egui::Role::Button, true, &label)
                            });
                            if response.clicked() && cell.image.is_some() {
                                commands.push(UiCommand::EnlargeCell(Some(index)));
                            }
                            ui.label(RichText::new(caption(cell)).small());
                        });
                    }
                    ui.end_row();
                }
            });
    });
}

fn enlarged_ui(ui: &mut Ui, view: &mut CompareView, index: usize, commands: &mut Vec<UiCommand>) {
    ui.horizontal(|ui| {
        if ui.button("Back to the grid").clicked() {
            commands.push(UiCommand::EnlargeCell(None));
        }
        let flip_label = ui.label("Flip with");
        let choices: Vec<usize> = (0..view.cells.len())
            .filter(|&i| i != index && view.cells[i].image.is_some())
            .collect();
        let selected_text = view
            .flip_with
            .map_or("—".to_string(), |i| view.cell_label(i));
        let labels: Vec<(usize, String)> =
            choices.iter().map(|&i| (i, view.cell_label(i))).collect();
        egui::ComboBox::from_id_salt("compare-flip-with")
            .selected_text(selected_text)
            .show_ui(ui, |ui| {
                for (i, label) in &labels {
                    ui.selectable_value(&mut view.flip_with, Some(*i), label);
                }
            })
            .response
            .labelled_by(flip_label.id);
        ui.add_enabled(
            view.flip_with.is_some(),
            egui::Checkbox::new(&mut view.flipping, "Flip"),
        )
        .on_hover_text("Alternate the two images at full size, to see small differences");
    });
    // While flipping, show the other cell every other 0.7 s.
    let shown = match (view.flipping, view.flip_with) {
        (true, Some(other)) => {
            let time = ui.input(|i| i.time);
            ui.ctx()
                .request_repaint_after(std::time::Duration::from_millis(100));
            if (time / 0.7) as u64 % 2 == 1 {
                other
            } else {
                index
            }
        }
        _ => index,
    };
    ui.label(RichText::new(view.cell_label(shown)).strong());
    if let Some(cell) = view.cells.get(shown)
        && let Some((_, texture)) = &cell.image
    {
        ui.label(caption(cell));
        let size = texture.size_vec2();
        let scale = (ui.available_width() / size.x)
            .min(ui.available_height() / size.y)
            .max(0.1);
        ui.image((texture.id(), size * scale));
    }
}
