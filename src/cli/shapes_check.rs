//! `atelier shapes-check`: does a prompt steer the picture? Generates the validation prompts
//! of Atelier Shapes (or reads pictures that another tool made of them, e.g. diffusers) and
//! reports how often the colour, background, shape and position are the ones asked for.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use anyhow::Context;
use candle_core::Device;
use clap::Args;

use crate::demo_model::analyser::analyse;
use crate::demo_model::validation::{Accuracy, check, validation_prompts};
use crate::engine::npy::read_f32_npy;
use crate::engine::pipeline::GenerationRequest;
use crate::schedulers::Sampler;

/// Arguments of `atelier shapes-check`.
#[derive(Debug, Args)]
pub struct ShapesCheckArgs {
    /// The model (default: Atelier Shapes).
    #[arg(long)]
    pub model: Option<String>,
    /// Score the pictures in this folder (000.png, 001.png, ... in the validation set's order)
    /// instead of generating them.
    #[arg(long, conflicts_with_all = ["model", "noise", "save"])]
    pub images: Option<PathBuf>,
    /// Start each picture from NNN.npy in this folder (the initial latents another tool used)
    /// instead of the seed's noise.
    #[arg(long)]
    pub noise: Option<PathBuf>,
    /// Save the generated pictures here as 000.png, 001.png, ...
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Also compare each picture with the one of the same name in this folder (mean absolute
    /// difference of the pixels, 0-255).
    #[arg(long)]
    pub compare_with: Option<PathBuf>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Sampler (`atelier schedulers` lists them).
    #[arg(long, default_value = "dpmpp-2m")]
    pub scheduler: String,
    /// Generate with an empty prompt instead (a control: the accuracy should fall to chance).
    #[arg(long)]
    pub empty_prompt: bool,
    /// Only the first N prompts.
    #[arg(long)]
    pub limit: Option<usize>,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Runs `atelier shapes-check`.
pub fn run(args: ShapesCheckArgs) -> anyhow::Result<()> {
    let mut prompts = validation_prompts();
    if prompts.is_empty() {
        anyhow::bail!("the validation set bundled in this build is empty or unreadable");
    }
    if let Some(limit) = args.limit {
        prompts.truncate(limit.max(1));
    }
    if let Some(folder) = &args.save {
        std::fs::create_dir_all(folder)
            .with_context(|| format!("cannot create {}", folder.display()))?;
    }
    let sampler = Sampler::parse(&args.scheduler)?;
    let model = match &args.images {
        Some(_) => None,
        None => Some(super::generate::load_model(
            args.model.as_deref(),
            &args.device,
            &Default::default(),
            &Default::default(),
        )?),
    };
    let mut accuracy = Accuracy::default();
    let mut differences = Vec::new();
    let cancel = AtomicBool::new(false);
    for (index, prompt) in prompts.iter().enumerate() {
        let name = format!("{index:03}.png");
        let picture = match (&model, &args.images) {
            (_, Some(folder)) => {
                let path = folder.join(&name);
                image::open(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?
                    .to_rgb8()
            }
            (Some(model), None) => {
                let (width, height) = model.default_size_for(None);
                let request = GenerationRequest {
                    prompt: if args.empty_prompt {
                        String::new()
                    } else {
                        prompt.prompt.clone()
                    },
                    seed: prompt.seed,
                    steps: args.steps,
                    guidance_scale: args.guidance,
                    width,
                    height,
                    scheduler: sampler.kind,
                    sigmas: sampler.sigmas,
                    ..Default::default()
                };
                let noise = match &args.noise {
                    Some(folder) => {
                        let path = folder.join(format!("{index:03}.npy"));
                        Some(
                            read_f32_npy(&path, &Device::Cpu)
                                .with_context(|| format!("cannot read {}", path.display()))?,
                        )
                    }
                    None => None,
                };
                super::generate::generate_picture(model, &request, noise.as_ref(), &cancel)?
            }
            (None, None) => anyhow::bail!("neither a model nor --images to score"),
        };
        if let Some(folder) = &args.save {
            let path = folder.join(&name);
            picture
                .save(&path)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        let reading = analyse(&picture);
        let checks = check(prompt, &reading);
        accuracy.add(checks);
        let mut line = format!(
            "{name} {:<66} -> {} {} {} on {}{}",
            prompt.prompt,
            reading.shape.as_ref().map_or("-", |s| s.colour),
            reading.shape.as_ref().map_or("-", |s| s.kind),
            reading.shape.as_ref().map_or("-", |s| s.position),
            reading.background,
            mark(checks),
        );
        if let Some(folder) = &args.compare_with {
            let path = folder.join(&name);
            let other = image::open(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .to_rgb8();
            if other.dimensions() != picture.dimensions() {
                anyhow::bail!("{} is not the size of our picture", path.display());
            }
            let difference = picture
                .as_raw()
                .iter()
                .zip(other.as_raw())
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .sum::<f64>()
                / picture.as_raw().len() as f64;
            line.push_str(&format!(" (differs by {difference:.2})"));
            differences.push(difference);
        }
        println!("{line}");
    }
    println!("accuracy: {}", accuracy.summary());
    if !differences.is_empty() {
        let mean = differences.iter().sum::<f64>() / differences.len() as f64;
        let max = differences.iter().cloned().fold(0.0, f64::max);
        println!(
            "pixels differ from {} by {mean:.2} on average (largest {max:.2}; 0-255)",
            args.compare_with
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// "  [colour background shape position]" with a dash for each miss.
fn mark(checks: crate::demo_model::validation::Checks) -> String {
    let flag = |ok: bool, letter: &str| if ok { letter.to_string() } else { "-".into() };
    format!(
        "  [{}{}{}{}]",
        flag(checks.colour, "C"),
        flag(checks.background, "B"),
        flag(checks.shape, "S"),
        flag(checks.position, "P")
    )
}
