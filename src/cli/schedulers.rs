//! `atelier schedulers`: every sampler's error against the ideal denoiser, at 5, 10, 20 and 50
//! model evaluations, as a table and optionally as a plot.

use std::path::PathBuf;

use crate::schedulers::config::SchedulerConfig;
use ab_glyph::{FontRef, PxScale};
use anyhow::Context;
use clap::Args;
use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_circle_mut, draw_line_segment_mut, draw_text_mut, text_size};

use crate::schedulers::quality::{DataDistribution, QualityRow, quality_map};

/// Arguments of `atelier schedulers`.
#[derive(Debug, Args)]
pub struct SchedulersArgs {
    /// Independent samples per run (more: smaller statistical error, which is about
    /// 1.2 / sqrt(samples) of the error printed).
    #[arg(long, default_value_t = 65_536)]
    pub samples: usize,
    /// Seed of the initial and step noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A scheduler_config.json for the noise schedule (default: DDPM's linear betas with
    /// trailing spacing, which leave no signal at the start; see `quality::reference_config`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Also draw the errors as a PNG plot here.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// The budgets of model evaluations of the quality map.
pub const BUDGETS: [usize; 4] = [5, 10, 20, 50];

/// Runs `atelier schedulers`.
pub fn run(args: SchedulersArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let config: SchedulerConfig = crate::schedulers::config::from_python_json(&text)
                .with_context(|| format!("{} is not a scheduler config", path.display()))?;
            config
                .check()
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            config
        }
        None => crate::schedulers::quality::reference_config(),
    };
    if args.samples < 100 {
        anyhow::bail!("--samples must be at least 100, got {}", args.samples);
    }
    eprintln!(
        "{} samples per run; data: {}",
        args.samples,
        DataDistribution::standard_pair()
            .iter()
            .map(|(name, d)| format!("{name} (mean {:.3}, std {:.3})", d.mean(), d.std()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rows = quality_map(&config, &BUDGETS, args.samples, args.seed)?;
    print!("{}", table(&rows));
    if let Some(path) = &args.plot {
        plot(&rows, 0, args.samples)
            .save(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

/// The quality map as text: one line per sampler, Gaussian and mixture errors per budget.
pub fn table(rows: &[QualityRow]) -> String {
    let mut out = String::from(
        "Error of the samples against the data (2-Wasserstein distance of the moments, relative \
         to the data's std),\nwith the ideal denoiser; model evaluations used in brackets \
         where a budget cannot be met exactly.\n\n",
    );
    out.push_str(&format!("{:<22}", "sampler"));
    for budget in BUDGETS {
        out.push_str(&format!("{:>20}", format!("{budget} evals G / mix")));
    }
    out.push('\n');
    for row in rows {
        out.push_str(&format!("{:<22}", row.sampler.id()));
        for (&budget, (used, errors)) in BUDGETS.iter().zip(&row.cells) {
            let used = if *used == budget {
                String::new()
            } else {
                format!("[{used}]")
            };
            out.push_str(&format!(
                "{:>20}",
                format!("{used}{:.4} / {:.4}", errors[0], errors[1])
            ));
        }
        out.push('\n');
    }
    out
}

/// Sixteen distinguishable colours (Tableau 20, dark and light pairs).
const PALETTE: [[u8; 3]; 16] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
    [174, 199, 232],
    [255, 187, 120],
    [152, 223, 138],
    [255, 152, 150],
    [197, 176, 213],
    [0, 0, 0],
];

/// Draws error (log scale) against model evaluations (log scale) for the default-sigma
/// samplers, for distribution `which` of [`DataDistribution::standard_pair`].
pub fn plot(rows: &[QualityRow], which: usize, samples: usize) -> RgbImage {
    let (width, height) = (1200u32, 760u32);
    let (left, right, top, bottom) = (90.0f32, 900.0f32, 50.0f32, 690.0f32);
    let mut image = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let font = FontRef::try_from_slice(epaint_default_fonts::UBUNTU_LIGHT);
    let Ok(font) = font else {
        return image;
    };
    let black = Rgb([30, 30, 30]);
    let grey = Rgb([215, 215, 215]);
    let scale = PxScale::from(17.0);
    let errors: Vec<f64> = rows
        .iter()
        .flat_map(|r| r.cells.iter().map(move |c| c.1[which]))
        .filter(|e| *e > 0.0)
        .collect();
    let low = errors
        .iter()
        .fold(f64::INFINITY, |m, &e| m.min(e))
        .log10()
        .floor()
        .max(-6.0);
    let high = errors
        .iter()
        .fold(f64::NEG_INFINITY, |m, &e| m.max(e))
        .log10()
        .ceil()
        .max(low + 1.0);
    let (x_low, x_high) = ((4.0f64).log10(), (60.0f64).log10());
    let to_x =
        |evals: f64| left + ((evals.log10() - x_low) / (x_high - x_low)) as f32 * (right - left);
    let to_y = |error: f64| {
        bottom - ((error.max(1e-12).log10() - low) / (high - low)) as f32 * (bottom - top)
    };
    // Grid and labels.
    let mut decade = low;
    while decade <= high {
        let y = to_y(10f64.powf(decade));
        draw_line_segment_mut(&mut image, (left, y), (right, y), grey);
        let label = format!("1e{decade}");
        let (w, h) = text_size(scale, &font, &label);
        draw_text_mut(
            &mut image,
            black,
            (left as i32) - w as i32 - 8,
            y as i32 - h as i32 / 2,
            scale,
            &font,
            &label,
        );
        decade += 1.0;
    }
    for budget in BUDGETS {
        let x = to_x(budget as f64);
        draw_line_segment_mut(&mut image, (x, top), (x, bottom), grey);
        let label = budget.to_string();
        let (w, _) = text_size(scale, &font, &label);
        draw_text_mut(
            &mut image,
            black,
            x as i32 - w as i32 / 2,
            bottom as i32 + 8,
            scale,
            &font,
            &label,
        );
    }
    // What sampling noise alone gives: standard errors of the mean (s / sqrt(N)) and of the std
    // (s / sqrt(2N)), relative to s.
    let floor = (1.5 / samples.max(1) as f64).sqrt();
    let floor_y = to_y(floor);
    let mut x = left;
    while x < right {
        draw_line_segment_mut(
            &mut image,
            (x, floor_y),
            ((x + 8.0).min(right), floor_y),
            black,
        );
        x += 16.0;
    }
    draw_text_mut(
        &mut image,
        black,
        left as i32 + 6,
        floor_y as i32 + 4,
        scale,
        &font,
        &format!("sampling noise of {samples} samples"),
    );
    draw_line_segment_mut(&mut image, (left, bottom), (right, bottom), black);
    draw_line_segment_mut(&mut image, (left, top), (left, bottom), black);
    let name = DataDistribution::standard_pair()[which].0;
    let title = format!(
        "Sampler error vs model evaluations (ideal denoiser, {name} data; lower is better)"
    );
    draw_text_mut(
        &mut image,
        black,
        left as i32,
        14,
        PxScale::from(21.0),
        &font,
        &title,
    );
    draw_text_mut(
        &mut image,
        black,
        (left + right) as i32 / 2 - 70,
        bottom as i32 + 34,
        scale,
        &font,
        "model evaluations",
    );
    // One line per default-sigma sampler; colour and marker size tell them apart.
    let mut legend_y = top as i32;
    for (i, row) in rows
        .iter()
        .filter(|r| r.sampler.sigmas == crate::schedulers::SigmaSchedule::Default)
        .enumerate()
    {
        let colour = Rgb(PALETTE[i % PALETTE.len()]);
        let radius = 4;
        let points: Vec<(f32, f32)> = row
            .cells
            .iter()
            .map(|(used, errors)| (to_x(*used as f64), to_y(errors[which])))
            .collect();
        for pair in points.windows(2) {
            draw_line_segment_mut(&mut image, pair[0], pair[1], colour);
            draw_line_segment_mut(
                &mut image,
                (pair[0].0, pair[0].1 + 1.0),
                (pair[1].0, pair[1].1 + 1.0),
                colour,
            );
        }
        for &(x, y) in &points {
            draw_filled_circle_mut(&mut image, (x as i32, y as i32), radius, colour);
        }
        draw_filled_circle_mut(
            &mut image,
            (right as i32 + 30, legend_y + 9),
            radius,
            colour,
        );
        draw_text_mut(
            &mut image,
            black,
            right as i32 + 44,
            legend_y,
            scale,
            &font,
            row.sampler.kind.display_name(),
        );
        legend_y += 26;
    }
    image
}
