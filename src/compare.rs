//! Comparisons: the same prompt and seed under several samplers (X), optionally against steps,
//! guidance, seeds or prompt variants (Y). A plan expands into one job per cell; the results
//! render into one labelled grid image. No egui and no model code here.

use std::collections::BTreeMap;

use ab_glyph::{FontRef, PxScale};
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_rect_mut, draw_text_mut, text_size};
use imageproc::rect::Rect;
use serde::{Deserialize, Serialize};

use crate::engine::pipeline::{GenerationRequest, ImageOptions};
use crate::gallery::metadata::{A1111Parameters, write_png};
use crate::schedulers::Sampler;

/// The PNG text keyword of a comparison grid's plan and results.
pub const COMPARISON_KEYWORD: &str = "atelier-comparison";

/// What varies down the rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub enum YAxis {
    /// A single row.
    #[default]
    None,
    /// Denoising steps.
    Steps(Vec<usize>),
    /// Guidance scales.
    Guidance(Vec<f64>),
    /// Seeds.
    Seeds(Vec<u64>),
    /// AUTOMATIC1111's "Prompt S/R": the first word or phrase is searched for in the prompt and
    /// each value (the first included) replaces it.
    PromptReplace(Vec<String>),
    /// Denoising strengths of an image-to-image or inpainting comparison.
    Strength(Vec<f64>),
}

impl YAxis {
    /// The axis' name.
    pub fn name(&self) -> &'static str {
        match self {
            YAxis::None => "none",
            YAxis::Steps(_) => "steps",
            YAxis::Guidance(_) => "guidance",
            YAxis::Seeds(_) => "seed",
            YAxis::PromptReplace(_) => "prompt S/R",
            YAxis::Strength(_) => "denoising strength",
        }
    }

    /// Rows.
    pub fn len(&self) -> usize {
        match self {
            YAxis::None => 1,
            YAxis::Steps(v) => v.len(),
            YAxis::Guidance(v) => v.len(),
            YAxis::Seeds(v) => v.len(),
            YAxis::PromptReplace(v) => v.len(),
            YAxis::Strength(v) => v.len(),
        }
    }

    /// Whether there are no rows (never for a valid axis).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses comma-separated values for axis `name` (`steps`, `guidance`, `seed`, `prompt`,
    /// `strength`).
    pub fn parse(name: &str, values: &str) -> Result<Self, String> {
        let items: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if name != "none" && items.is_empty() {
            return Err(format!("give the {name} values separated by commas"));
        }
        let numbers = |what: &str| -> Result<Vec<f64>, String> {
            items
                .iter()
                .map(|v| {
                    v.parse::<f64>()
                        .map_err(|_| format!("{what}: {v:?} is not a number"))
                })
                .collect()
        };
        Ok(match name {
            "none" => YAxis::None,
            "steps" => YAxis::Steps(
                numbers("steps")?
                    .into_iter()
                    .map(|v| {
                        if v >= 1.0 && v.fract() == 0.0 && v <= 1000.0 {
                            Ok(v as usize)
                        } else {
                            Err(format!("steps: {v} is not a whole number from 1 to 1000"))
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            "guidance" => YAxis::Guidance(numbers("guidance")?),
            "seed" | "seeds" => YAxis::Seeds(
                items
                    .iter()
                    .map(|v| v.parse().map_err(|_| format!("seeds: {v:?} is not a seed")))
                    .collect::<Result<_, _>>()?,
            ),
            "prompt" | "prompt-sr" => {
                YAxis::PromptReplace(items.iter().map(|s| s.to_string()).collect())
            }
            "strength" => YAxis::Strength(
                numbers("strength")?
                    .into_iter()
                    .map(|v| {
                        if v > 0.0 && v <= 1.0 {
                            Ok(v)
                        } else {
                            Err(format!("strength: {v} is not above 0 and at most 1"))
                        }
                    })
                    .collect::<Result<_, _>>()?,
            ),
            other => {
                return Err(format!(
                    "unknown axis {other:?} (steps, guidance, seed, prompt or strength)"
                ));
            }
        })
    }

    /// The label of row `row`.
    pub fn label(&self, row: usize) -> String {
        match self {
            YAxis::None => String::new(),
            YAxis::Steps(v) => format!("{} steps", v[row]),
            YAxis::Guidance(v) => format!("guidance {}", v[row]),
            YAxis::Seeds(v) => format!("seed {}", v[row]),
            YAxis::PromptReplace(v) => v[row].clone(),
            YAxis::Strength(v) => format!("strength {}", v[row]),
        }
    }

    /// The denoising strength of row `row`, when the rows vary it.
    pub fn strength(&self, row: usize) -> Option<f64> {
        match self {
            YAxis::Strength(v) => Some(v[row]),
            _ => None,
        }
    }

    /// Applies row `row` to a request.
    fn apply(&self, row: usize, request: &mut GenerationRequest) {
        match self {
            YAxis::None => {}
            YAxis::Steps(v) => request.steps = v[row],
            YAxis::Guidance(v) => request.guidance_scale = v[row],
            YAxis::Seeds(v) => request.seed = v[row],
            YAxis::PromptReplace(v) => {
                request.prompt = request.prompt.replace(&v[0], &v[row]);
            }
            // The strength belongs to the cell's picture (see `Cell::strength`).
            YAxis::Strength(_) => {}
        }
    }
}

/// A comparison to run: the base parameters, the samplers across, the axis down.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparisonPlan {
    /// Identifies the comparison (its cells in the gallery carry it).
    pub id: String,
    /// The shared parameters.
    pub base: GenerationRequest,
    /// The columns.
    pub samplers: Vec<Sampler>,
    /// The rows.
    pub y: YAxis,
    /// For a comparison of image to image or inpainting: how the picture is worked on (the
    /// picture itself is the job's; each cell of the gallery keeps it).
    #[serde(default)]
    pub image_options: Option<ImageOptions>,
}

/// One cell: where it sits and what it generates.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Row (Y value).
    pub row: usize,
    /// Column (sampler).
    pub column: usize,
    /// The job's parameters.
    pub request: GenerationRequest,
    /// Its picture's denoising strength, when the plan works on a picture.
    pub strength: Option<f64>,
}

impl Cell {
    /// The model evaluations the cell makes: its sampler's for the steps it runs (all of them,
    /// or for a picture the share its strength repaints, as diffusers' `get_timesteps` counts).
    pub fn model_evaluations(&self) -> usize {
        let steps = match self.strength {
            Some(strength) => {
                crate::schedulers::steps_for_strength(self.request.steps, strength).max(1)
            }
            None => self.request.steps,
        };
        self.request.scheduler.model_evaluations(steps)
    }
}

/// What a finished cell reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CellResult {
    /// Seconds the job took.
    pub total_secs: f64,
    /// Model evaluations it made.
    pub model_evaluations: usize,
}

/// A new comparison id, unique across processes and machines sharing a library: the time and
/// 64 random bits (`cmp-1764350000-9f3a...`).
pub fn new_comparison_id() -> String {
    format!(
        "cmp-{}-{:016x}",
        crate::gallery::library::now_unix(),
        rand::random::<u64>()
    )
}

impl ComparisonPlan {
    /// Checks and builds a plan of text to image; `id` must be unique ([`new_comparison_id`]).
    pub fn new(
        id: String,
        base: GenerationRequest,
        samplers: Vec<Sampler>,
        y: YAxis,
    ) -> Result<Self, String> {
        Self::with_picture(id, base, samplers, y, None)
    }

    /// Checks and builds a plan whose cells work on a picture (image to image, inpainting)
    /// worked on as `image_options` say, or of text to image without them.
    pub fn with_picture(
        id: String,
        base: GenerationRequest,
        samplers: Vec<Sampler>,
        y: YAxis,
        image_options: Option<ImageOptions>,
    ) -> Result<Self, String> {
        if matches!(y, YAxis::Strength(_)) && image_options.is_none() {
            return Err(
                "denoising strength rows need a picture: open one on the Studio tab first".into(),
            );
        }
        if samplers.is_empty() {
            return Err("choose at least one sampler".into());
        }
        if y.is_empty() {
            return Err(format!("the {} axis has no values", y.name()));
        }
        if let YAxis::PromptReplace(values) = &y
            && !base.prompt.contains(&values[0])
        {
            return Err(format!(
                "prompt S/R: {:?} does not appear in the prompt",
                values[0]
            ));
        }
        for sampler in &samplers {
            if !sampler.kind.supports(sampler.sigmas) {
                return Err(format!("{} has no such sigma schedule", sampler.id()));
            }
        }
        Ok(Self {
            id,
            base,
            samplers,
            y,
            image_options,
        })
    }

    /// Columns.
    pub fn columns(&self) -> usize {
        self.samplers.len()
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.y.len()
    }

    /// Every cell, row by row.
    pub fn cells(&self) -> Vec<Cell> {
        let mut cells = Vec::with_capacity(self.rows() * self.columns());
        for row in 0..self.rows() {
            for (column, sampler) in self.samplers.iter().enumerate() {
                let mut request = self.base.clone();
                request.batch_size = 1;
                request.scheduler = sampler.kind;
                request.sigmas = sampler.sigmas;
                if sampler.kind != crate::schedulers::SchedulerKind::Ddim {
                    request.eta = 0.0;
                }
                self.y.apply(row, &mut request);
                let strength = self
                    .image_options
                    .map(|options| self.y.strength(row).unwrap_or(options.strength));
                cells.push(Cell {
                    row,
                    column,
                    request,
                    strength,
                });
            }
        }
        cells
    }

    /// The label of column `column`: the sampler as artists know it.
    pub fn column_label(&self, column: usize) -> String {
        sampler_label(self.samplers[column])
    }
}

/// "DPM++ 2M Karras".
pub fn sampler_label(sampler: Sampler) -> String {
    match sampler.sigmas {
        crate::schedulers::SigmaSchedule::Default => sampler.kind.display_name().to_string(),
        other => format!("{} {}", sampler.kind.display_name(), other.display_name()),
    }
}

/// What a grid PNG carries besides its pixels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridRecord {
    /// The plan.
    pub plan: ComparisonPlan,
    /// Each cell's result (row-major), where finished.
    pub results: Vec<Option<CellResult>>,
}

const BACKGROUND: Rgb<u8> = Rgb([250, 250, 250]);
const INK: Rgb<u8> = Rgb([20, 20, 20]);
const SOFT_INK: Rgb<u8> = Rgb([90, 90, 90]);

/// The layout of a grid image (pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridLayout {
    /// Width of the row labels.
    pub left: u32,
    /// Height of the title and column labels.
    pub top: u32,
    /// Size of each cell's image.
    pub cell_width: u32,
    /// Height of each cell's image.
    pub cell_height: u32,
    /// Height of the caption under each cell.
    pub caption: u32,
    /// Gap between cells.
    pub gap: u32,
}

impl GridLayout {
    /// The layout for a plan whose cells are `cell_width` x `cell_height`.
    pub fn for_plan(plan: &ComparisonPlan, cell_width: u32, cell_height: u32) -> Self {
        Self {
            left: if plan.y == YAxis::None { 12 } else { 170 },
            top: 76,
            cell_width,
            cell_height,
            caption: 26,
            gap: 12,
        }
    }

    /// The top-left corner of a cell's image.
    pub fn cell_origin(&self, row: usize, column: usize) -> (u32, u32) {
        (
            self.left + column as u32 * (self.cell_width + self.gap),
            self.top + row as u32 * (self.cell_height + self.caption + self.gap),
        )
    }

    /// The whole image's size.
    pub fn size(&self, rows: usize, columns: usize) -> (u32, u32) {
        (
            self.left + columns as u32 * (self.cell_width + self.gap),
            self.top + rows as u32 * (self.cell_height + self.caption + self.gap),
        )
    }
}

fn shorten(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(limit - 1).collect::<String>())
    }
}

/// Renders the grid: a title (prompt, seed, size), sampler names across, Y values down, each
/// cell with its time and model evaluations underneath. Cells without an image stay grey.
pub fn render_grid(
    plan: &ComparisonPlan,
    images: &[Option<RgbImage>],
    results: &[Option<CellResult>],
) -> RgbImage {
    let (cell_width, cell_height) = images
        .iter()
        .flatten()
        .next()
        .map(|i| i.dimensions())
        .unwrap_or((plan.base.width as u32, plan.base.height as u32));
    // Slots at least wide enough for a label and a caption; small images sit centred in them.
    let layout = GridLayout::for_plan(plan, cell_width.max(170), cell_height.max(64));
    let (width, height) = layout.size(plan.rows(), plan.columns());
    let mut grid = RgbImage::from_pixel(width, height, BACKGROUND);
    let Ok(font) = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT) else {
        return grid;
    };
    let title = format!(
        "{}  ·  seed {}  ·  {}x{}  ·  guidance {}",
        shorten(&plan.base.prompt, 90),
        plan.base.seed,
        plan.base.width,
        plan.base.height,
        plan.base.guidance_scale
    );
    draw_text_mut(&mut grid, INK, 12, 10, PxScale::from(20.0), &font, &title);
    let label_scale = PxScale::from(18.0);
    for column in 0..plan.columns() {
        let (x, _) = layout.cell_origin(0, column);
        let label = shorten(&plan.column_label(column), (layout.cell_width / 9) as usize);
        draw_text_mut(&mut grid, INK, x as i32, 46, label_scale, &font, &label);
    }
    let cells = plan.cells();
    for (index, cell) in cells.iter().enumerate() {
        let (x, y) = layout.cell_origin(cell.row, cell.column);
        if cell.column == 0 && plan.y != YAxis::None {
            let label = shorten(&plan.y.label(cell.row), 20);
            let (_, h) = text_size(label_scale, &font, &label);
            let label_y = y + layout.cell_height / 2 - h / 2;
            draw_text_mut(
                &mut grid,
                INK,
                10,
                label_y as i32,
                label_scale,
                &font,
                &label,
            );
        }
        match images.get(index).and_then(Option::as_ref) {
            Some(image) => {
                let dx = (layout.cell_width.saturating_sub(image.width())) / 2;
                let dy = (layout.cell_height.saturating_sub(image.height())) / 2;
                image::imageops::replace(&mut grid, image, (x + dx) as i64, (y + dy) as i64)
            }
            None => draw_filled_rect_mut(
                &mut grid,
                Rect::at(x as i32, y as i32).of_size(layout.cell_width, layout.cell_height),
                Rgb([200, 200, 200]),
            ),
        }
        let caption = match results.get(index).and_then(Option::as_ref) {
            Some(result) => format!(
                "{:.1} s · {} evals",
                result.total_secs, result.model_evaluations
            ),
            None => "not run".into(),
        };
        draw_text_mut(
            &mut grid,
            SOFT_INK,
            x as i32,
            (y + layout.cell_height + 4) as i32,
            PxScale::from(16.0),
            &font,
            &caption,
        );
    }
    grid
}

/// Writes the grid as a PNG with the plan and results (`atelier-comparison`) and the base
/// parameters (A1111's `parameters`, with the samplers and axis added).
pub fn save_grid(
    path: &std::path::Path,
    grid: &RgbImage,
    record: &GridRecord,
    model_name: &str,
) -> Result<(), crate::gallery::metadata::PngError> {
    let mut parameters = A1111Parameters::for_request(&record.plan.base, model_name);
    parameters.pairs.push((
        "X/Y grid".into(),
        format!(
            "X: {}; Y: {}",
            record
                .plan
                .samplers
                .iter()
                .map(|s| sampler_label(*s))
                .collect::<Vec<_>>()
                .join(", "),
            (0..record.plan.rows())
                .map(|row| record.plan.y.label(row))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));
    let json = serde_json::to_string(record).unwrap_or_default();
    write_png(
        path,
        grid,
        &[
            (
                crate::gallery::metadata::PARAMETERS_KEYWORD,
                &parameters.to_text(),
            ),
            (COMPARISON_KEYWORD, &json),
        ],
    )
}

/// A comparison rebuilt from the gallery.
#[derive(Debug, Clone, PartialEq)]
pub struct ReopenedComparison {
    /// The plan.
    pub plan: ComparisonPlan,
    /// Each cell's file in the library (row-major), where it is still there.
    pub files: Vec<Option<String>>,
    /// Each cell's time and model evaluations.
    pub results: Vec<Option<CellResult>>,
}

/// Rebuilds a comparison from its cells' gallery metadata (each carries the comparison id, its
/// row and column, and the plan).
pub fn from_cells(cells: &[crate::gallery::library::GalleryEntry]) -> Option<ReopenedComparison> {
    let reference = cells.iter().find_map(|c| c.metadata.comparison.clone())?;
    let plan: ComparisonPlan = serde_json::from_str(&reference.plan_json).ok()?;
    let count = plan.rows() * plan.columns();
    let mut files = vec![None; count];
    let mut results = vec![None; count];
    let mut seen = BTreeMap::new();
    for cell in cells {
        let Some(r) = &cell.metadata.comparison else {
            continue;
        };
        if r.id != plan.id || r.row >= plan.rows() || r.column >= plan.columns() {
            continue;
        }
        let index = r.row * plan.columns() + r.column;
        if seen.insert(index, ()).is_none() {
            files[index] = Some(cell.file.clone());
            results[index] = Some(CellResult {
                total_secs: cell.metadata.timings.map_or(0.0, |t| t.total_secs),
                model_evaluations: cell
                    .metadata
                    .sampler()
                    .zip(cell.metadata.steps)
                    .map_or(0, |(s, steps)| s.kind.model_evaluations(steps)),
            });
        }
    }
    Some(ReopenedComparison {
        plan,
        files,
        results,
    })
}
