//! `atelier compare`: a sampler comparison grid, headless.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::compare::{CellResult, ComparisonPlan, GridRecord, YAxis, render_grid, save_grid};
use crate::engine::pipeline::{GenerationRequest, ImageJob, JobParts, PreviewOptions};
use crate::gallery::library::{Library, now_unix};
use crate::gallery::record::{ComparisonRef, ImageMetadata};
use crate::schedulers::Sampler;

/// Arguments of `atelier compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// A diffusers model folder, a single-file checkpoint, or a Hugging Face repo id.
    /// Without it: Atelier Shapes, the small model that comes with Atelier.
    #[arg(long)]
    pub model: Option<String>,
    /// VAE and prediction overrides.
    #[command(flatten)]
    pub overrides: super::generate::OverrideArgs,
    /// VAE tiling and where the text encoders live.
    #[command(flatten)]
    pub memory: super::generate::MemoryArgs,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to avoid.
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// The samplers across, comma-separated (e.g. euler,dpmpp-2m-karras,unipc).
    #[arg(long, required = true)]
    pub scheduler: String,
    /// Steps; several (comma-separated) make the rows.
    #[arg(long, default_value = "20")]
    pub steps: String,
    /// Guidance scale; several make the rows.
    #[arg(long, default_value = "7.5")]
    pub guidance: String,
    /// Seed; several make the rows.
    #[arg(long, default_value = "0")]
    pub seed: String,
    /// Prompt S/R rows: the first value is searched for in the prompt, each value replaces it.
    #[arg(long)]
    pub prompt_sr: Option<String>,
    /// Width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Image to image or inpainting: the picture (and mask) every cell works on.
    #[command(flatten)]
    pub image: super::modes::ImageInputArgs,
    /// With --init-image: denoising strengths down the rows (comma-separated).
    #[arg(long)]
    pub strengths: Option<String>,
    /// Also save every cell into the gallery at this library folder, as one comparison.
    #[arg(long)]
    pub library: Option<PathBuf>,
    /// Where to write the grid PNG.
    #[arg(long)]
    pub out: PathBuf,
}

fn comma_list(text: &str) -> Vec<&str> {
    text.split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

/// The base request and the Y axis from the arguments: at most one option may list several
/// values.
fn plan_from_args(
    args: &CompareArgs,
    (width, height): (usize, usize),
    image: Option<&ImageJob>,
) -> anyhow::Result<ComparisonPlan> {
    let samplers = comma_list(&args.scheduler)
        .into_iter()
        .map(Sampler::parse)
        .collect::<Result<Vec<_>, _>>()?;
    let mut axes = Vec::new();
    for (name, text) in [
        ("steps", args.steps.as_str()),
        ("guidance", args.guidance.as_str()),
        ("seed", args.seed.as_str()),
    ] {
        let axis = YAxis::parse(name, text).map_err(anyhow::Error::msg)?;
        axes.push((name, axis));
    }
    let mut base = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width.unwrap_or(width),
        height: args.height.unwrap_or(height),
        ..Default::default()
    };
    let mut y = YAxis::None;
    let mut set_y = |axis: YAxis| -> anyhow::Result<()> {
        if y != YAxis::None {
            bail!(
                "only one option can list several values (the rows): {} and {}",
                y.name(),
                axis.name()
            );
        }
        y = axis;
        Ok(())
    };
    for (_, axis) in axes {
        match &axis {
            YAxis::Steps(v) if v.len() == 1 => base.steps = v[0],
            YAxis::Guidance(v) if v.len() == 1 => base.guidance_scale = v[0],
            YAxis::Seeds(v) if v.len() == 1 => base.seed = v[0],
            _ => set_y(axis)?,
        }
    }
    if let Some(replacements) = &args.prompt_sr {
        set_y(YAxis::parse("prompt", replacements).map_err(anyhow::Error::msg)?)?;
    }
    if let Some(strengths) = &args.strengths {
        set_y(YAxis::parse("strength", strengths).map_err(anyhow::Error::msg)?)?;
    }
    ComparisonPlan::with_picture(
        crate::compare::new_comparison_id(),
        base,
        samplers,
        y,
        image.map(|image| image.options),
    )
    .map_err(anyhow::Error::msg)
}

/// Runs `atelier compare`.
pub fn run(args: CompareArgs) -> anyhow::Result<()> {
    // Outputs are checked before the model loads: the grid must not fail after its cells.
    super::check_output_file(&args.out, "--out", "png")?;
    let mut library = match &args.library {
        Some(root) => {
            let (library, report) = Library::open(root)
                .with_context(|| format!("cannot open the library {}", root.display()))?;
            for line in report.messages(5) {
                eprintln!("library: {line}");
            }
            if library.is_read_only() {
                bail!(
                    "the library {} is read-only: the cells could not be saved there",
                    root.display()
                );
            }
            Some(library)
        }
        None => None,
    };
    let image = args.image.load()?;
    if args.strengths.is_some() && image.is_none() {
        bail!("--strengths needs --init-image (the picture every cell works on)");
    }
    let model = super::generate::load_model(
        args.model.as_deref(),
        &args.device,
        &args.overrides,
        &args.memory,
    )?;
    let plan = plan_from_args(
        &args,
        model.default_size_for(image.as_ref()),
        image.as_ref(),
    )?;
    // The picture of each row's strength, checked before any cell runs.
    let cell_images = plan
        .cells()
        .iter()
        .map(|cell| match (&image, cell.strength) {
            (Some(image), Some(strength)) => image.with_strength(strength).map(Some),
            _ => Ok(None),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let stored_inputs = match (&library, &image) {
        (Some(library), Some(image)) => {
            let picture = library.store_input(&image::DynamicImage::ImageRgb8(
                image.image.as_ref().clone(),
            ))?;
            let mask = match &image.mask {
                Some(mask) => Some(
                    library.store_input(&image::DynamicImage::ImageLuma8(mask.as_ref().clone()))?,
                ),
                None => None,
            };
            Some((picture, mask))
        }
        _ => None,
    };
    let cells = plan.cells();
    for cell in &cells {
        model.validate(&cell.request)?;
    }
    let plan_json = serde_json::to_string(&plan)?;
    let model_hash = match &library {
        Some(_) => crate::gallery::worker::file_hash(model.unet_weights()).ok(),
        None => None,
    };
    let total_evals: usize = cells.iter().map(|c| c.model_evaluations()).sum();
    eprintln!(
        "{} cells ({} x {}), {total_evals} model evaluations, on {}",
        cells.len(),
        plan.columns(),
        plan.rows(),
        model.name()
    );
    let bar = ProgressBar::new(total_evals as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} evaluations {msg} [{elapsed_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let cancel = AtomicBool::new(false);
    let mut images = Vec::new();
    let mut results = Vec::new();
    for (cell, cell_image) in cells.iter().zip(&cell_images) {
        let done_before = bar.position();
        bar.set_message(format!(
            "{} · {}",
            plan.column_label(cell.column),
            plan.y.label(cell.row)
        ));
        let parts = JobParts {
            image: cell_image.as_ref(),
            ..Default::default()
        };
        let output = model
            .run_job(
                &cell.request,
                parts,
                PreviewOptions::default(),
                &cancel,
                &mut |step| bar.set_position(done_before + step.step_index as u64 + 1),
            )?
            .output;
        let image = output
            .images
            .into_iter()
            .next()
            .context("the engine returned no image")?;
        let result = CellResult {
            total_secs: output.timings.total_secs,
            model_evaluations: cell.model_evaluations(),
        };
        if let Some(library) = &mut library {
            let mut metadata = ImageMetadata::for_generation(
                &cell.request,
                model.name(),
                model_hash.clone(),
                output.timings,
                now_unix(),
            );
            metadata.set_modes(cell_image.as_ref(), None);
            if let Some((picture, mask)) = &stored_inputs {
                metadata.init_image = Some(picture.clone());
                metadata.mask_image = mask.clone();
            }
            metadata.comparison = Some(ComparisonRef {
                id: plan.id.clone(),
                row: cell.row,
                column: cell.column,
                plan_json: plan_json.clone(),
            });
            library.save(&image, &metadata)?;
        }
        images.push(Some(image));
        results.push(Some(result));
    }
    bar.finish_and_clear();
    let grid = render_grid(&plan, &images, &results);
    let record = GridRecord { plan, results };
    save_grid(&args.out, &grid, &record, model.name())?;
    println!("{}", args.out.display());
    for (cell, result) in cells.iter().zip(&record.results) {
        if let Some(result) = result {
            eprintln!(
                "{:<22} {:<16} {:>6.2} s  {:>3} evals",
                record.plan.column_label(cell.column),
                record.plan.y.label(cell.row),
                result.total_secs,
                result.model_evaluations
            );
        }
    }
    Ok(())
}
