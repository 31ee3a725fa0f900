//! `atelier generate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::modes::{HiresArgs, ImageInputArgs};
use crate::engine::npy::read_f32_npy;
use crate::engine::pipeline::{
    GenerationRequest, JobParts, LoadOptions, ModelOverrides, PreviewOptions, StableDiffusion,
};
use crate::engine::source::LoadProgress;
use crate::engine::vae_tiling::VaeTiling;
use crate::gallery::metadata::{A1111Parameters, PARAMETERS_KEYWORD};
use crate::schedulers::{Prediction, Sampler};

/// Arguments of `atelier generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A diffusers model folder, a single-file checkpoint (.safetensors, the original layout
    /// that A1111 and ComfyUI read), or a Hugging Face repo id such as stabilityai/sd-turbo.
    /// Without it: Atelier Shapes, the small model that comes with Atelier.
    #[arg(long)]
    pub model: Option<String>,
    /// VAE and prediction overrides.
    #[command(flatten)]
    pub overrides: OverrideArgs,
    /// VAE tiling and where the text encoders live.
    #[command(flatten)]
    pub memory: MemoryArgs,
    /// A LoRA/LyCORIS file and its weight (FILE or FILE:WEIGHT, weight 1 when left out);
    /// repeat for several. `<lora:name:w>` in the prompt works too (see --lora-dir).
    #[arg(long = "lora", value_parser = parse_lora_arg)]
    pub loras: Vec<(PathBuf, f64)>,
    /// Where the prompt's `<lora:name:w>` tags find `name.safetensors`: a folder of LoRAs, or
    /// an A1111 or ComfyUI installation (its models/Lora or models/loras); repeatable.
    #[arg(long = "lora-dir")]
    pub lora_dirs: Vec<PathBuf>,
    /// A folder of textual inversion embeddings (.safetensors; their file names in a prompt
    /// trigger them), or an A1111/ComfyUI installation (its embeddings folder); repeatable.
    #[arg(long = "embeddings")]
    pub embedding_dirs: Vec<PathBuf>,
    /// What to draw.
    #[arg(long)]
    pub prompt: String,
    /// What to avoid (empty: unconditional).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (<= 1 disables guidance, as Turbo models want).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of the first image (default: a random one, printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    /// Images to generate together; image k uses seed + k.
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Sampler id: euler, euler-a, dpmpp-2m-karras, unipc, ddim, ... (`atelier schedulers` lists them)
    #[arg(long, default_value = "euler")]
    pub scheduler: String,
    /// DDIM's eta: 0 is deterministic, 1 as noisy as DDPM (other samplers ignore it).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// A1111's clip skip: read the text encoder's hidden state this many layers from the end
    /// (1: the last; SD 1.x models; SD 2.x and SDXL read their penultimate layer regardless).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// A float32 .npy of standard-normal noise, shape (batch, 4, H/f, W/f), used instead of the
    /// seed: the starting noise, or with --init-image the noise added to the init latents.
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Image to image, inpainting, outpainting.
    #[command(flatten)]
    pub image: ImageInputArgs,
    /// The hires fix.
    #[command(flatten)]
    pub hires: HiresArgs,
    /// Write the final latents (before the VAE) as a float32 .npy.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Run the whole job this many times and print each run's time (benchmarking a real job:
    /// the first run warms up); the last run's images are written.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Where to write the PNG; with a batch, image k goes to NAME-k.png.
    #[arg(long)]
    pub out: PathBuf,
}

/// What the model's own files say, overridden.
#[derive(Debug, Clone, Default, Args)]
pub struct OverrideArgs {
    /// A VAE in place of the model's: a single .safetensors (vae-ft-mse, sdxl-vae-fp16-fix, ...)
    /// or a diffusers VAE folder.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// What the model predicts, when its files do not say it right: epsilon or v.
    #[arg(long, value_parser = parse_prediction)]
    pub prediction: Option<Prediction>,
    /// For a single file without text encoders: where they come from (a diffusers folder or a
    /// checkpoint of the same family).
    #[arg(long)]
    pub text_encoders: Option<PathBuf>,
}

/// What trades speed for GPU memory.
#[derive(Debug, Clone, Default, Args)]
pub struct MemoryArgs {
    /// VAE decode and encode in tiles: auto (only images too large for one pass), on or off.
    #[arg(long, default_value = "auto", value_parser = parse_vae_tiling)]
    pub vae_tiling: VaeTiling,
    /// Keep the text encoders on the CPU (saves their GPU memory, 1.6 GB for SDXL; each prompt
    /// is encoded on the CPU).
    #[arg(long)]
    pub text_encoders_on_cpu: bool,
}

/// `auto`, `on` or `off`.
pub fn parse_vae_tiling(text: &str) -> Result<VaeTiling, String> {
    VaeTiling::parse(text).map_err(|e| e.to_string())
}

/// `FILE` or `FILE:WEIGHT` (the weight after the last colon, when it is a number).
pub fn parse_lora_arg(text: &str) -> Result<(PathBuf, f64), String> {
    if let Some((file, weight)) = text.rsplit_once(':')
        && let Ok(weight) = weight.trim().parse::<f64>()
    {
        if !weight.is_finite() {
            return Err(format!("{text}: the weight must be a number"));
        }
        return Ok((PathBuf::from(file), weight));
    }
    Ok((PathBuf::from(text), 1.0))
}

/// `epsilon` (or `eps`) or `v` (or `v_prediction`).
pub fn parse_prediction(text: &str) -> Result<Prediction, String> {
    match text.to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Ok(Prediction::Epsilon),
        "v" | "v_prediction" | "v-prediction" => Ok(Prediction::VPrediction),
        other => Err(format!("unknown prediction {other:?}: epsilon or v")),
    }
}

fn random_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64 ^ (nanos >> 64) as u64) % 4_294_967_296
}

/// Loads a model with a progress display on stderr.
/// Generates `request`'s first picture (from `noise` when given), without progress.
pub(super) fn generate_picture(
    model: &StableDiffusion,
    request: &GenerationRequest,
    noise: Option<&candle_core::Tensor>,
    cancel: &AtomicBool,
) -> anyhow::Result<image::RgbImage> {
    let output = model.generate(
        request,
        noise,
        PreviewOptions::default(),
        cancel,
        &mut |_| {},
    )?;
    output
        .images
        .into_iter()
        .next()
        .context("the engine returned no picture")
}

pub fn load_model(
    spec: Option<&str>,
    device: &str,
    overrides: &OverrideArgs,
    memory: &MemoryArgs,
) -> anyhow::Result<StableDiffusion> {
    let source = crate::demo_model::model_source(spec.unwrap_or(crate::demo_model::MODEL_ID))?;
    let device = super::open_device(device)?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let reporter = bar.clone();
    let progress = Arc::new(move |event: LoadProgress| match event {
        LoadProgress::Downloading {
            file,
            bytes_done,
            bytes_total,
        } => reporter.set_message(format!(
            "downloading {file}: {:.1} / {:.1} MB",
            bytes_done as f64 / 1e6,
            bytes_total as f64 / 1e6
        )),
        LoadProgress::Loading { component } => reporter.set_message(format!("loading {component}")),
    });
    let mut options = LoadOptions::new(device);
    options.progress = Some(progress);
    options.overrides = ModelOverrides {
        vae: overrides.vae.clone(),
        prediction: overrides.prediction,
        text_encoders: overrides.text_encoders.clone(),
        text_encoders_on_cpu: memory.text_encoders_on_cpu,
    };
    let model = StableDiffusion::load(source, options).with_context(|| {
        format!(
            "cannot load model {}",
            spec.unwrap_or(crate::demo_model::NAME)
        )
    });
    bar.finish_and_clear();
    let model = model?;
    model.set_vae_tiling(memory.vae_tiling);
    Ok(model)
}

fn output_path(out: &Path, index: usize, batch: usize) -> PathBuf {
    if batch == 1 {
        return out.to_path_buf();
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    out.with_file_name(format!("{stem}-{index}.png"))
}

/// Runs `atelier generate`.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let sampler = Sampler::parse(&args.scheduler)?;
    let scheduler = sampler.kind;
    // Every output is checked before the model loads: a job must not fail after its work.
    super::check_output_file(&args.out, "--out", "png")?;
    if let Some(path) = &args.save_latents {
        super::check_output_file(path, "--save-latents", "npy")?;
    }
    let init_noise = match &args.init_noise {
        Some(path) => Some(
            read_f32_npy(path, &Device::Cpu)
                .with_context(|| format!("--init-noise {}", path.display()))?,
        ),
        None => None,
    };
    let image_input = args.image.load()?;
    let hires = args.hires.load(image_input.is_some())?;
    let mut model = load_model(
        args.model.as_deref(),
        &args.device,
        &args.overrides,
        &args.memory,
    )?;
    let lora_folders =
        crate::models_folders::folders(&args.lora_dirs, crate::models_folders::ModelKind::Lora);
    let (loras, lora_warnings) = crate::engine::lora::LoraCache::default().resolve(
        &args.prompt,
        &lora_folders,
        &args.loras,
    )?;
    let report = model.set_loras(&loras)?;
    for warning in lora_warnings.iter().chain(&report.warnings) {
        eprintln!("warning: {warning}");
    }
    for (name, modules) in &report.applied {
        eprintln!("LoRA {name}: {modules} weights changed");
    }
    let lora_hashes: Vec<(String, String)> = loras
        .iter()
        .map(|l| (l.file.name.clone(), l.file.hash.clone()))
        .collect();
    let embedding_folders = crate::models_folders::folders(
        &args.embedding_dirs,
        crate::models_folders::ModelKind::Embedding,
    );
    let (embeddings, embedding_warnings) =
        crate::engine::embeddings::EmbeddingCache::default().load_folders(&embedding_folders);
    let left_out = model.set_embeddings(embeddings);
    let prompts = [args.prompt.as_str(), args.negative_prompt.as_str()];
    for warning in
        embedding_warnings
            .iter()
            .chain(&crate::engine::embeddings::warnings_for_prompts(
                &left_out, &prompts,
            ))
    {
        eprintln!("warning: {warning}");
    }
    let mut ti_hashes = model.embeddings_in(&args.prompt);
    for entry in model.embeddings_in(&args.negative_prompt) {
        if !ti_hashes.contains(&entry) {
            ti_hashes.push(entry);
        }
    }
    let model = model;
    // With an init image and no size, its own size (rounded down to what the model takes).
    let (default_width, default_height) = model.default_size_for(image_input.as_ref());
    let seed = args.seed.unwrap_or_else(random_seed);
    let request = GenerationRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        seed,
        steps: args.steps,
        guidance_scale: args.guidance,
        width: args.width.unwrap_or(default_width),
        height: args.height.unwrap_or(default_height),
        batch_size: init_noise
            .as_ref()
            .and_then(|n| n.dims().first().copied())
            .unwrap_or(args.batch_size),
        scheduler,
        sigmas: sampler.sigmas,
        eta: args.eta,
        clip_skip: args.clip_skip,
    };
    model.validate(&request)?;
    if init_noise.is_none() {
        eprintln!("seed {seed}");
    }
    eprintln!(
        "{} ({}) on {:?}, {}x{}, {} steps of {}",
        model.name(),
        model.family().display_name(),
        model.device().location(),
        request.width,
        request.height,
        request.steps,
        scheduler.display_name()
    );

    let bar = ProgressBar::new(request.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps {msg} [{elapsed_precise}, ETA {eta}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let cancel = AtomicBool::new(false);
    let parts = JobParts {
        image: image_input.as_ref(),
        hires: hires.as_ref(),
        noise: init_noise.as_ref(),
    };
    // A cheap preview with every step, as the window shows them.
    let previews = PreviewOptions {
        latent_previews: true,
        ..Default::default()
    };
    for run in 1..args.repeat {
        let started = std::time::Instant::now();
        model.run_job(&request, parts, previews, &cancel, &mut |_| {})?;
        eprintln!(
            "run {run} of {}: {:.3} s",
            args.repeat,
            started.elapsed().as_secs_f64()
        );
    }
    crate::engine::profile::reset_peak_memory(model.device());
    let job_started = std::time::Instant::now();
    let mut first_preview_secs = None;
    let mut preview_count = 0;
    let result = model.run_job(&request, parts, previews, &cancel, &mut |step| {
        if step.latent_preview.is_some() {
            preview_count += 1;
            if first_preview_secs.is_none() {
                first_preview_secs = Some(job_started.elapsed().as_secs_f64());
            }
        }
        bar.set_length(step.total_steps as u64);
        bar.set_position(step.step_index as u64 + 1);
        let per_sec = (step.step_index + 1) as f64 / step.elapsed_secs.max(1e-9);
        bar.set_message(format!("{per_sec:.2} it/s"));
    });
    bar.finish_and_clear();
    let result = result?;
    if args.repeat > 1 {
        eprintln!(
            "run {} of {}: {:.3} s (job {:.3} s)",
            args.repeat,
            args.repeat,
            job_started.elapsed().as_secs_f64(),
            result.output.timings.total_secs
        );
    }
    let output = result.output;
    let first_request = request;
    let request = result.final_request;
    if let Some(first_pass) = result.first_pass {
        eprintln!(
            "hires fix: {}x{} in {:.2} s, then {}x{} in {:.2} s",
            first_request.width,
            first_request.height,
            first_pass.total_secs,
            request.width,
            request.height,
            output.timings.total_secs - first_pass.total_secs
        );
    }
    for warning in &output.warnings {
        eprintln!("warning: {warning}");
    }

    for (index, image) in output.images.iter().enumerate() {
        let path = output_path(&args.out, index, output.images.len());
        let item_request = GenerationRequest {
            seed: seed.wrapping_add(index as u64),
            ..request.clone()
        };
        let mut parameters = A1111Parameters::for_request(&item_request, model.name());
        if let Some(vae) = (ModelOverrides {
            vae: args.overrides.vae.clone(),
            ..Default::default()
        })
        .vae_name()
        {
            parameters.pairs.push(("VAE".into(), vae));
        }
        if !lora_hashes.is_empty() {
            parameters.pairs.push((
                "Lora hashes".into(),
                crate::gallery::record::format_name_hashes(&lora_hashes),
            ));
        }
        if !ti_hashes.is_empty() {
            parameters.pairs.push((
                "TI hashes".into(),
                crate::gallery::record::format_name_hashes(&ti_hashes),
            ));
        }
        if let Some(noise) = &args.init_noise {
            // The noise came from a file, not from the seed: say so instead.
            let name = noise
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            parameters.pairs.retain(|(key, _)| key != "Seed");
            parameters.pairs.push(("Initial noise".into(), name));
        }
        if let Some(input) = &image_input {
            parameters.push_image_options(&input.options, input.is_inpainting());
        }
        if let Some(hires) = &hires {
            parameters.push_hires(hires, args.steps);
        }
        let written = super::write_png_or_rescue(
            &path,
            image,
            &[(PARAMETERS_KEYWORD, &parameters.to_text())],
        )?;
        println!("{}", written.display());
    }
    if let Some(path) = &args.save_latents {
        output
            .latents
            .write_npy(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let timings = output.timings;
    eprintln!(
        "{} steps in {:.3} s ({:.2} ms/step), total {:.3} s (text encoding {:.3} s, decode {:.3} s)",
        request.steps,
        timings.denoising_secs,
        timings.denoising_secs * 1e3 / request.steps as f64,
        timings.total_secs,
        timings.text_encoding_secs,
        timings.decode_secs
    );
    if let Some(secs) = first_preview_secs {
        eprintln!("first preview after {secs:.3} s ({preview_count} previews)");
    }
    if let (Some(used), Some(reserved)) = (
        crate::engine::profile::peak_memory_bytes(model.device()),
        crate::engine::profile::peak_reserved_memory_bytes(model.device()),
    ) {
        let gib = |bytes: u64| bytes as f64 / (1u64 << 30) as f64;
        eprintln!(
            "peak GPU memory {:.2} GiB allocated, {:.2} GiB held by the pool (the last job; \
             the CUDA context comes on top)",
            gib(used),
            gib(reserved)
        );
    }
    Ok(())
}
