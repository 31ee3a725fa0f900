//! The second view of the sampler quality map: on a real model, how far each sampler's picture
//! at 5-50 steps is from its own picture at 200 steps ("how many steps do I need?").
//! `atelier schedulers --on-model` (Atelier Shapes unless `--model` says otherwise).

use std::sync::atomic::AtomicBool;

use image::RgbImage;

use super::plot::{LogLogPlot, Series, log_log_plot};
use crate::engine::pipeline::{GenerationRequest, StableDiffusion};
use crate::schedulers::{Sampler, SchedulerKind, SigmaSchedule};

/// Steps of the pictures compared with the reference.
pub const STEPS: [usize; 6] = [5, 8, 12, 20, 30, 50];

/// One sampler's distances.
pub struct StepsRow {
    /// The sampler.
    pub sampler: Sampler,
    /// For each of [`STEPS`]: root mean square difference to the reference picture, in 8-bit
    /// levels (0-255), averaged over the seeds.
    pub distances: Vec<f64>,
}

/// What the model view runs.
pub struct StepsMapOptions<'a> {
    /// The prompt of every picture.
    pub prompt: &'a str,
    /// Seeds (the distances are averaged over them).
    pub seeds: &'a [u64],
    /// Guidance scale.
    pub guidance: f64,
    /// Steps of the reference picture.
    pub reference_steps: usize,
    /// The samplers (empty: every default-sigma sampler but LCM, which is for LCM-distilled
    /// models).
    pub samplers: &'a [Sampler],
}

/// The distances of each sampler of `options` on `model`; `on_row` sees each row as it is done.
pub fn steps_map(
    model: &StableDiffusion,
    options: &StepsMapOptions<'_>,
    mut on_row: impl FnMut(&StepsRow),
) -> anyhow::Result<Vec<StepsRow>> {
    let (width, height) = model.default_size_for(None);
    let cancel = AtomicBool::new(false);
    let picture = |sampler: Sampler, steps: usize, seed: u64| -> anyhow::Result<RgbImage> {
        let request = GenerationRequest {
            prompt: options.prompt.to_string(),
            seed,
            steps,
            guidance_scale: options.guidance,
            width,
            height,
            scheduler: sampler.kind,
            sigmas: sampler.sigmas,
            ..Default::default()
        };
        super::generate::generate_picture(model, &request, None, &cancel)
    };
    let every: Vec<Sampler> = SchedulerKind::ALL
        .iter()
        .filter(|kind| **kind != SchedulerKind::Lcm)
        .map(|&kind| Sampler {
            kind,
            sigmas: SigmaSchedule::Default,
        })
        .collect();
    let samplers = if options.samplers.is_empty() {
        &every[..]
    } else {
        options.samplers
    };
    let mut rows = Vec::new();
    for &sampler in samplers {
        let mut distances = vec![0.0; STEPS.len()];
        for &seed in options.seeds {
            let reference = picture(sampler, options.reference_steps, seed)?;
            for (distance, &steps) in distances.iter_mut().zip(&STEPS) {
                *distance += rms_difference(&picture(sampler, steps, seed)?, &reference)
                    / options.seeds.len() as f64;
            }
        }
        let row = StepsRow { sampler, distances };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// Root mean square difference of two pictures of one size, in 8-bit levels.
pub fn rms_difference(a: &RgbImage, b: &RgbImage) -> f64 {
    let count = a.as_raw().len().max(1) as f64;
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    (sum / count).sqrt()
}

/// One line per sampler: its distances at each of [`STEPS`].
pub fn steps_table_line(row: &StepsRow) -> String {
    let mut line = format!("{:<16}", row.sampler.id());
    for distance in &row.distances {
        line.push_str(&format!("{distance:>8.2}"));
    }
    line
}

/// The header of [`steps_table_line`]'s table.
pub fn steps_table_header(reference_steps: usize) -> String {
    let mut header = format!(
        "RMS difference (0-255) to the same sampler's picture at {reference_steps} steps\n{:<16}",
        "sampler"
    );
    for steps in STEPS {
        header.push_str(&format!("{:>8}", format!("{steps} st")));
    }
    header
}

/// The distances as a log-log plot against steps.
pub fn steps_plot(rows: &[StepsRow], model_name: &str, reference_steps: usize) -> RgbImage {
    log_log_plot(&LogLogPlot {
        title: format!(
            "Distance to the {reference_steps}-step picture vs steps ({model_name}; lower is better)"
        ),
        x_label: "steps".into(),
        x_ticks: STEPS.iter().map(|s| *s as f64).collect(),
        x_range: (4.0, 60.0),
        series: rows
            .iter()
            .map(|row| Series {
                label: match row.sampler.sigmas {
                    SigmaSchedule::Default => row.sampler.kind.display_name().to_string(),
                    sigmas => format!(
                        "{} {}",
                        row.sampler.kind.display_name(),
                        sigmas.display_name()
                    ),
                },
                points: STEPS
                    .iter()
                    .zip(&row.distances)
                    .map(|(s, d)| (*s as f64, d.max(0.01)))
                    .collect(),
            })
            .collect(),
        reference: Some((1.0, "one 8-bit level".into())),
    })
}
