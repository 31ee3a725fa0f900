//! `atelier bench`.

use anyhow::bail;
use clap::Args;

use crate::engine::bench::{BenchOptions, BenchTarget, run as run_bench};
use crate::engine::pipeline::default_dtype;
use crate::engine::random::RandomModel;

/// Arguments of `atelier bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A model folder or repo id to time.
    #[arg(long, conflicts_with = "random_weights")]
    pub model: Option<String>,
    /// Time a full-size architecture with random weights instead: sd15, sd21 or sdxl.
    #[arg(long)]
    pub random_weights: Option<String>,
    /// cpu, cuda, metal or auto.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Width in pixels (default: 512 for sd15, 768 for sd21, 1024 for sdxl, else the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Height in pixels (same default as width).
    #[arg(long)]
    pub height: Option<usize>,
    /// Timed UNet evaluations.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed UNet evaluations first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Images per step (the UNet batch is twice this with guidance).
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Time without classifier-free guidance (UNet batch = batch size).
    #[arg(long)]
    pub no_guidance: bool,
    /// Print the figures as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also print where one UNet step's time goes, by kind of operation.
    #[arg(long)]
    pub profile: bool,
    /// Precision of the random-weight VAE (f16 or f32; default: f32 where the config upcasts).
    #[arg(long, requires = "random_weights")]
    pub vae_dtype: Option<String>,
    /// LoRAs to merge into the --model before timing (FILE or FILE:WEIGHT, repeatable): the
    /// time to apply them is printed, and the step timing is with them on.
    #[arg(long = "lora", value_parser = super::generate::parse_lora_arg, requires = "model")]
    pub loras: Vec<(std::path::PathBuf, f64)>,
    /// Leave out the random-weight text encoders (random embeddings instead), as diffusers'
    /// SDXL benchmark does: their weights then do not count in the peak memory.
    #[arg(long, requires = "random_weights")]
    pub skip_text_encoders: bool,
    /// Also decode one image of each of these sides (pixels, comma-separated) untiled and in
    /// tiles: time, peak memory, and the largest difference between the two.
    #[arg(long, value_delimiter = ',')]
    pub tiled_decode: Vec<usize>,
    /// The tile side for --tiled-decode (default: the VAE config's sample_size, as diffusers).
    #[arg(long)]
    pub tile_px: Option<usize>,
}

/// Runs `atelier bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let device = super::open_device(&args.device)?;
    let dtype = default_dtype(&device);
    let random;
    let loaded;
    let mut load_secs = None;
    let mut lora_secs = None;
    let (target, label, native) = match (&args.model, &args.random_weights) {
        (Some(spec), None) => {
            let started = std::time::Instant::now();
            let mut model = super::generate::load_model(
                Some(spec),
                &args.device,
                &Default::default(),
                &Default::default(),
            )?;
            // Every weight is on the device once its copy returns; synchronise to be sure.
            model.device().synchronize()?;
            load_secs = Some(started.elapsed().as_secs_f64());
            if !args.loras.is_empty() {
                let mut cache = crate::engine::lora::LoraCache::default();
                let loras = args
                    .loras
                    .iter()
                    .map(|(path, weight)| {
                        Ok(crate::engine::lora::LoraWeight::new(
                            cache.get(path)?,
                            *weight,
                        ))
                    })
                    .collect::<crate::engine::Result<Vec<_>>>()?;
                let started = std::time::Instant::now();
                let report = model.set_loras(&loras)?;
                model.device().synchronize()?;
                lora_secs = Some(started.elapsed().as_secs_f64());
                for (name, weights) in &report.applied {
                    eprintln!("LoRA {name}: {weights} weights changed");
                }
                for warning in &report.warnings {
                    eprintln!("warning: {warning}");
                }
            }
            loaded = model;
            let native = loaded.native_size().unwrap_or(512);
            (loaded.bench_target(), loaded.name().to_string(), native)
        }
        (None, Some(arch)) => {
            let vae_dtype = match args.vae_dtype.as_deref() {
                None => None,
                Some("f16") => Some(candle_core::DType::F16),
                Some("f32") => Some(candle_core::DType::F32),
                Some(other) => bail!("--vae-dtype {other:?}: choose f16 or f32"),
            };
            random = RandomModel::with_options(
                arch,
                &device,
                dtype,
                vae_dtype,
                !args.skip_text_encoders,
            )?;
            let native = match arch.as_str() {
                "sdxl" => 1024,
                "sd21" => 768,
                _ => 512,
            };
            let target = BenchTarget {
                text_encoders: random.text_encoders.iter().collect(),
                unet: &random.unet,
                vae: &random.vae,
                dtype,
                vae_dtype: random.vae_dtype,
                device: &device,
            };
            (target, format!("{arch} (random weights)"), native)
        }
        _ => bail!("give either --model or --random-weights sd15|sd21|sdxl"),
    };
    let options = BenchOptions {
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        steps: args.steps,
        warmup: args.warmup,
        batch_size: args.batch_size.max(1),
        guidance: !args.no_guidance,
        profile: args.profile,
    };
    let factor = target.vae.config().scale_factor();
    if !options.width.is_multiple_of(factor) || !options.height.is_multiple_of(factor) {
        bail!("width and height must be multiples of {factor}");
    }
    let report = run_bench(&target, options)?;
    let tiles = crate::engine::vae_tiling::TileSizes::new(
        args.tile_px.or(target.vae.config().sample_size),
        factor,
    );
    let mut tiled_reports = Vec::new();
    for &side in &args.tiled_decode {
        if !side.is_multiple_of(factor) {
            bail!("--tiled-decode {side}: sides must be multiples of {factor}");
        }
        tiled_reports.push(crate::engine::bench::tiled_decode(
            target.vae,
            target.vae_dtype,
            target.device,
            side,
            tiles,
        )?);
    }
    if args.json {
        let value = serde_json::json!({
            "model": label,
            "device": format!("{:?}", target.device.location()),
            "dtype": format!("{:?}", target.dtype),
            "width": options.width,
            "height": options.height,
            "unet_batch": options.batch_size * if options.guidance { 2 } else { 1 },
            "vae_dtype": format!("{:?}", target.vae_dtype),
            "load_secs": load_secs,
            "lora_apply_secs": lora_secs,
            "report": report,
            "tiled_decode": tiled_reports,
        });
        println!("{value}");
    } else {
        println!(
            "{label} on {:?} ({:?}), {}x{}, UNet batch {}",
            target.device.location(),
            target.dtype,
            options.width,
            options.height,
            options.batch_size * if options.guidance { 2 } else { 1 }
        );
        if let Some(secs) = load_secs {
            println!(
                "model load      {:>10.2} s   (files to device, every component)",
                secs
            );
        }
        if let Some(secs) = lora_secs {
            println!(
                "LoRAs applied   {:>10.1} ms  ({} merged into the weights)",
                secs * 1e3,
                args.loras.len()
            );
        }
        println!("text encoding   {:>10.1} ms", report.text_encoding_ms);
        println!(
            "UNet step       {:>10.1} ms  ({:.2} it/s)",
            report.unet_step_ms, report.unet_steps_per_sec
        );
        println!(
            "  enqueue       {:>10.1} ms  (CPU time to submit one step)",
            report.unet_submit_ms
        );
        if let Some(graphs) = &report.cuda_graphs {
            println!("  steps ran as  {graphs}");
        }
        if let Some(convolutions) = &report.convolutions {
            println!("  convolutions  {convolutions}");
        }
        println!(
            "VAE decode      {:>10.1} ms  ({:?})",
            report.vae_decode_ms, target.vae_dtype
        );
        println!(
            "30-step job     {:>10.1} ms  (text + 30 steps + decode)",
            report.end_to_end_30_steps_ms
        );
        if let Some(bytes) = report.peak_gpu_memory_bytes {
            println!(
                "peak GPU memory {:>10.2} GiB",
                bytes as f64 / (1u64 << 30) as f64
            );
        }
        for (part, profile) in [
            ("UNet step", &report.profile),
            ("VAE decode", &report.vae_profile),
        ] {
            if !profile.is_empty() {
                println!("{part}, by operation (each synchronised):");
            }
            for (name, ms, calls) in profile {
                println!("  {name:<14}{ms:>10.2} ms in {calls} calls");
            }
        }
        let gib = |bytes: Option<u64>| {
            bytes.map_or("-".to_string(), |b| {
                format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
            })
        };
        for tiled in &tiled_reports {
            let untiled = match &tiled.untiled_ms {
                Ok(ms) => format!("{ms:.0} ms, peak {}", gib(tiled.untiled_peak_bytes)),
                Err(error) => format!("failed: {error}"),
            };
            println!(
                "VAE decode {side}x{side}: untiled {untiled}; {tile}-pixel tiles {ms:.0} ms, peak {peak}; \
                 difference max {max} / mean {mean} of 255 (diffusers' tiling: {plain_max} / {plain_mean})",
                side = tiled.side_px,
                tile = tiled.tile_px,
                ms = tiled.tiled_ms,
                peak = gib(tiled.tiled_peak_bytes),
                max = tiled
                    .max_difference_8bit
                    .map_or("-".into(), |d| format!("{d:.0}")),
                mean = tiled
                    .mean_difference_8bit
                    .map_or("-".into(), |d| format!("{d:.2}")),
                plain_max = tiled
                    .per_tile_max_difference_8bit
                    .map_or("-".into(), |d| format!("{d:.0}")),
                plain_mean = tiled
                    .per_tile_mean_difference_8bit
                    .map_or("-".into(), |d| format!("{d:.2}")),
            );
        }
    }
    Ok(())
}
