//! `atelier schedulers`: every sampler's error against the ideal denoiser, at 5, 10, 20 and 50
//! model evaluations, as a table and optionally as a plot.

use std::path::PathBuf;

use crate::schedulers::config::SchedulerConfig;
use anyhow::Context;
use clap::Args;
use image::RgbImage;

use super::plot::{LogLogPlot, Series, log_log_plot};

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
    /// The second view: on a real model (Atelier Shapes unless --model says otherwise), the
    /// distance of each sampler's picture at 5-50 steps to its own picture at
    /// --reference-steps.
    #[arg(long)]
    pub on_model: bool,
    /// With --on-model: the model.
    #[arg(long, requires = "on_model")]
    pub model: Option<String>,
    /// With --on-model: the prompt.
    #[arg(
        long,
        requires = "on_model",
        default_value = "a large yellow star and a small red circle on a textured blue background"
    )]
    pub prompt: String,
    /// With --on-model: the seeds (comma-separated; distances are averaged).
    #[arg(long, requires = "on_model", value_delimiter = ',', default_values_t = [1u64, 2, 3])]
    pub seeds: Vec<u64>,
    /// With --on-model: the guidance scale.
    #[arg(long, requires = "on_model", default_value_t = 5.0)]
    pub guidance: f64,
    /// With --on-model: the steps of the reference picture.
    #[arg(long, requires = "on_model", default_value_t = 200)]
    pub reference_steps: usize,
    /// With --on-model: only these samplers (comma-separated ids; default: all but LCM).
    #[arg(long, requires = "on_model", value_delimiter = ',')]
    pub samplers: Vec<String>,
    /// With --on-model: cpu, cuda, metal or auto.
    #[arg(long, requires = "on_model", default_value = "auto")]
    pub device: String,
}

/// The budgets of model evaluations of the quality map.
pub const BUDGETS: [usize; 4] = [5, 10, 20, 50];

/// Runs `atelier schedulers`.
pub fn run(args: SchedulersArgs) -> anyhow::Result<()> {
    if args.on_model {
        return run_on_model(&args);
    }
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

/// `atelier schedulers --on-model`: the table (a line per sampler as it finishes) and the plot.
fn run_on_model(args: &SchedulersArgs) -> anyhow::Result<()> {
    use super::sampler_steps::{
        StepsMapOptions, steps_map, steps_plot, steps_table_header, steps_table_line,
    };
    if args.seeds.is_empty() {
        anyhow::bail!("--seeds needs at least one seed");
    }
    if args.reference_steps < 60 {
        anyhow::bail!(
            "--reference-steps must be at least 60 (more than the 50 steps compared), got {}",
            args.reference_steps
        );
    }
    let samplers = args
        .samplers
        .iter()
        .map(|id| crate::schedulers::Sampler::parse(id))
        .collect::<Result<Vec<_>, _>>()?;
    let model = super::generate::load_model(
        args.model.as_deref(),
        &args.device,
        &Default::default(),
        &Default::default(),
    )?;
    eprintln!(
        "{} on {:?}: \"{}\", seeds {:?}, guidance {}",
        model.name(),
        model.device().location(),
        args.prompt,
        args.seeds,
        args.guidance
    );
    println!("{}", steps_table_header(args.reference_steps));
    let options = StepsMapOptions {
        prompt: &args.prompt,
        seeds: &args.seeds,
        guidance: args.guidance,
        reference_steps: args.reference_steps,
        samplers: &samplers,
    };
    let rows = steps_map(&model, &options, |row| {
        println!("{}", steps_table_line(row))
    })?;
    if let Some(path) = &args.plot {
        steps_plot(&rows, model.name(), args.reference_steps)
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

/// Draws error (log scale) against model evaluations (log scale) for the default-sigma
/// samplers, for distribution `which` of [`DataDistribution::standard_pair`].
pub fn plot(rows: &[QualityRow], which: usize, samples: usize) -> RgbImage {
    let series = rows
        .iter()
        .filter(|r| r.sampler.sigmas == crate::schedulers::SigmaSchedule::Default)
        .map(|row| Series {
            label: row.sampler.kind.display_name().to_string(),
            points: row
                .cells
                .iter()
                .map(|(used, errors)| (*used as f64, errors[which]))
                .collect(),
        })
        .collect();
    let name = DataDistribution::standard_pair()[which].0;
    // What sampling noise alone gives: standard errors of the mean (s / sqrt(N)) and of the std
    // (s / sqrt(2N)), relative to s.
    let floor = (1.5 / samples.max(1) as f64).sqrt();
    log_log_plot(&LogLogPlot {
        title: format!(
            "Sampler error vs model evaluations (ideal denoiser, {name} data; lower is better)"
        ),
        x_label: "model evaluations".into(),
        x_ticks: BUDGETS.iter().map(|b| *b as f64).collect(),
        x_range: (4.0, 60.0),
        series,
        reference: Some((floor, format!("sampling noise of {samples} samples"))),
    })
}
