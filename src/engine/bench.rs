//! Timing of the engine's parts: text encoding, UNet steps, VAE decode.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::clip::ClipTextEncoder;
use super::error::Result;
use super::profile;
use super::unet::{AddedConditions, UNet};
use super::vae::VaeDecoder;

/// What to time.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Timed UNet evaluations.
    pub steps: usize,
    /// Untimed evaluations first (kernel compilation, caches).
    pub warmup: usize,
    /// Images per step; with guidance, the UNet batch is twice this.
    pub batch_size: usize,
    /// Classifier-free guidance doubles the UNet batch.
    pub guidance: bool,
    /// Also time each kind of operation in one more UNet step (synchronising after each).
    pub profile: bool,
}

/// The parts of a model that the benchmark runs.
pub struct BenchTarget<'a> {
    /// Text encoders, in order.
    pub text_encoders: Vec<&'a ClipTextEncoder>,
    /// The UNet.
    pub unet: &'a UNet,
    /// The VAE decoder.
    pub vae: &'a VaeDecoder,
    /// Precision of the UNet and text encoders.
    pub dtype: DType,
    /// Precision of the VAE.
    pub vae_dtype: DType,
    /// Where they run.
    pub device: &'a Device,
}

/// Measured times (milliseconds unless named otherwise).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    /// One prompt through every text encoder.
    pub text_encoding_ms: f64,
    /// Mean time of one UNet evaluation (with guidance: one batch of 2).
    pub unet_step_ms: f64,
    /// Steps per second.
    pub unet_steps_per_sec: f64,
    /// One VAE decode of the batch.
    pub vae_decode_ms: f64,
    /// Text encoding + 30 steps + decode, from the figures above.
    pub end_to_end_30_steps_ms: f64,
    /// CPU time to enqueue one UNet evaluation (the rest of a step is the GPU catching up).
    pub unet_submit_ms: f64,
    /// How the UNet steps ran on CUDA: replayed from a CUDA graph (and its size) or eagerly
    /// (and why). `None` off CUDA.
    pub cuda_graphs: Option<String>,
    /// What ran the convolutions on CUDA: cuDNN (and its version) or Atelier's im2col + cuBLAS.
    /// `None` off CUDA.
    pub convolutions: Option<String>,
    /// Peak GPU memory over the benchmark (weights included), where the device reports it.
    pub peak_gpu_memory_bytes: Option<u64>,
    /// With `profile`: (operation, milliseconds in one step, calls).
    pub profile: Vec<(&'static str, f64, usize)>,
    /// With `profile`: the same for one VAE decode.
    pub vae_profile: Vec<(&'static str, f64, usize)>,
}

fn timed<T>(device: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    device.synchronize()?;
    let started = Instant::now();
    let value = f()?;
    device.synchronize()?;
    Ok((value, started.elapsed().as_secs_f64() * 1e3))
}

/// Runs the benchmark.
pub fn run(target: &BenchTarget<'_>, options: BenchOptions) -> Result<BenchReport> {
    let device = target.device;
    profile::reset_peak_memory(device);
    let factor = target.vae.config().scale_factor();
    let (lh, lw) = (options.height / factor, options.width / factor);
    let model_batch = options.batch_size * if options.guidance { 2 } else { 1 };
    // <|startoftext|> a few words <|endoftext|> then padding, as a tokenizer would give.
    let mut ids = vec![49406u32, 320, 1929, 539, 320, 2368, 49407];
    ids.resize(77, 49407);

    let encode = || -> Result<(Tensor, Option<Tensor>)> {
        let mut contexts = Vec::new();
        let mut pooled = None;
        for encoder in &target.text_encoders {
            let encoding = encoder.encode(std::slice::from_ref(&ids), device)?;
            if target.text_encoders.len() > 1 {
                contexts.push(encoding.penultimate_hidden_state);
                pooled = Some(encoding.pooled);
            } else {
                contexts.push(encoding.last_hidden_state);
            }
        }
        Ok((Tensor::cat(&contexts, 2)?, pooled))
    };
    let ((context, pooled), text_encoding_ms) = if target.text_encoders.is_empty() {
        // No text encoders: random embeddings of the widths the UNet takes.
        let config = target.unet.config();
        let width = config.cross_attention_dim.at(0).unwrap_or(768);
        let context = Tensor::randn(0f32, 1.0, (1, 77, width), device)?;
        let pooled = match config.projection_class_embeddings_input_dim {
            Some(total) => {
                let time_ids = 6 * config.addition_time_embed_dim.unwrap_or(256);
                let width = total.saturating_sub(time_ids).max(1);
                Some(Tensor::randn(0f32, 1.0, (1, width), device)?)
            }
            None => None,
        };
        ((context, pooled), 0.0)
    } else {
        encode()?;
        timed(device, encode)?
    };
    let context = context
        .repeat((model_batch, 1, 1))?
        .to_dtype(target.dtype)?;
    let added = match pooled {
        Some(pooled) if target.unet.needs_added_conditions() => {
            let (h, w) = (options.height as f32, options.width as f32);
            Some(AddedConditions {
                text_embeds: pooled.repeat((model_batch, 1))?,
                time_ids: Tensor::new(&[h, w, 0.0, 0.0, h, w], device)?
                    .unsqueeze(0)?
                    .repeat((model_batch, 1))?,
            })
        }
        _ => None,
    };
    let channels = target.unet.config().in_channels;
    let sample = Tensor::randn(0f32, 1.0, (model_batch, channels, lh, lw), device)?
        .to_dtype(target.dtype)?;
    for _ in 0..options.warmup {
        target
            .unet
            .forward(&sample, 999.0, &context, added.as_ref())?;
    }
    let steps = options.steps.max(1);
    let (_, unet_total_ms) = timed(device, || {
        for step in 0..steps {
            let timestep = 999.0 - step as f64 * (999.0 / steps as f64);
            target
                .unet
                .forward(&sample, timestep, &context, added.as_ref())?;
        }
        Ok(())
    })?;
    let unet_step_ms = unet_total_ms / steps as f64;
    device.synchronize()?;
    let submit_started = Instant::now();
    let submitted = target
        .unet
        .forward(&sample, 500.0, &context, added.as_ref())?;
    let unet_submit_ms = submit_started.elapsed().as_secs_f64() * 1e3;
    device.synchronize()?;
    drop(submitted);
    let profile = if options.profile {
        profile::start();
        let step = target
            .unet
            .forward(&sample, 500.0, &context, added.as_ref());
        let totals = profile::finish();
        step?;
        totals
    } else {
        Vec::new()
    };

    let latents = Tensor::randn(0f32, 1.0, (options.batch_size, channels, lh, lw), device)?
        .to_dtype(target.vae_dtype)?;
    target.vae.decode(&latents)?;
    let (_, vae_decode_ms) = timed(device, || target.vae.decode(&latents))?;
    let vae_profile = if options.profile {
        profile::start();
        let decoded = target.vae.decode(&latents);
        let totals = profile::finish();
        decoded?;
        totals
    } else {
        Vec::new()
    };
    Ok(BenchReport {
        text_encoding_ms,
        unet_step_ms,
        unet_steps_per_sec: 1e3 / unet_step_ms,
        vae_decode_ms,
        end_to_end_30_steps_ms: text_encoding_ms + 30.0 * unet_step_ms + vae_decode_ms,
        unet_submit_ms,
        cuda_graphs: graph_summary(target.unet, device),
        convolutions: convolution_summary(device),
        peak_gpu_memory_bytes: profile::peak_memory_bytes(device),
        profile,
        vae_profile,
    })
}

/// What runs convolutions on CUDA, `None` elsewhere.
fn convolution_summary(device: &Device) -> Option<String> {
    if !device.is_cuda() {
        return None;
    }
    #[cfg(feature = "cuda")]
    return Some(match super::cuda::cudnn_version() {
        Some(version) => format!(
            "cuDNN {}.{}.{}",
            version / 10_000,
            version / 100 % 100,
            version % 100
        ),
        None => "im2col + cuBLAS (no cuDNN 9 found, or ATELIER_CUDNN=0)".to_string(),
    });
    #[cfg(not(feature = "cuda"))]
    None
}

/// One line on how the UNet's steps ran on CUDA, `None` elsewhere.
fn graph_summary(unet: &UNet, device: &Device) -> Option<String> {
    if !device.is_cuda() {
        return None;
    }
    #[cfg(feature = "cuda")]
    if let Some(report) = unet.cuda_graph_report() {
        return Some(match (report.replays, report.refusal) {
            (0, Some(reason)) => format!("eager (capture refused: {reason})"),
            (0, None) => "eager (CUDA graphs off: ATELIER_CUDA_GRAPHS=0)".to_string(),
            (replays, refusal) => format!(
                "CUDA graph of {} kernels, {replays} replays{}",
                report.kernels,
                refusal.map_or(String::new(), |r| format!(" (one capture refused: {r})"))
            ),
        });
    }
    let _ = unet;
    None
}

/// One decode of a large image, untiled and in tiles.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TiledDecodeReport {
    /// The image's side in pixels.
    pub side_px: usize,
    /// The tile side in pixels.
    pub tile_px: usize,
    /// Untiled: milliseconds, or why it failed (out of memory, say).
    pub untiled_ms: std::result::Result<f64, String>,
    /// Peak GPU memory of the untiled decode (weights included).
    pub untiled_peak_bytes: Option<u64>,
    /// In tiles: milliseconds.
    pub tiled_ms: f64,
    /// Peak GPU memory of the tiled decode (weights included).
    pub tiled_peak_bytes: Option<u64>,
    /// The largest difference between the untiled picture and the tiled one (statistics
    /// shared across tiles, as Atelier decodes) in 8-bit steps, when both ran.
    pub max_difference_8bit: Option<f32>,
    /// The mean difference in 8-bit steps.
    pub mean_difference_8bit: Option<f32>,
    /// The same for diffusers' tiling (each tile its own statistics).
    pub per_tile_max_difference_8bit: Option<f32>,
    /// The mean for diffusers' tiling.
    pub per_tile_mean_difference_8bit: Option<f32>,
}

/// Decodes one seeded `side_px` x `side_px` latent with `vae` untiled and in `tiles`, timing
/// each and measuring the peak memory and how far apart the two pictures are.
pub fn tiled_decode(
    vae: &VaeDecoder,
    vae_dtype: DType,
    device: &Device,
    side_px: usize,
    tiles: super::vae_tiling::TileSizes,
) -> Result<TiledDecodeReport> {
    let factor = vae.config().scale_factor();
    let cells = side_px / factor;
    let channels = vae.config().latent_channels;
    let latents =
        Tensor::randn(0f32, 1.0, (1, channels, cells, cells), device)?.to_dtype(vae_dtype)?;
    let to_bytes = |decoded: &Tensor| -> Result<Tensor> {
        Ok(((decoded.to_dtype(DType::F32)? + 1.0)? * 127.5)?
            .clamp(0.0, 255.0)?
            .round()?)
    };
    use super::vae_tiling::{TileStatistics, decode_in_tiles};
    // Once untimed (kernels and GEMM plans for this size), then timed.
    let warmed = vae.decode(&latents).map(drop);
    profile::reset_peak_memory(device);
    let untiled = warmed.and_then(|()| timed(device, || to_bytes(&vae.decode(&latents)?)));
    let untiled_peak_bytes = profile::peak_memory_bytes(device);
    // Once untimed (kernels for the tile shapes), then timed.
    decode_in_tiles(vae, &latents, tiles, TileStatistics::Shared)?;
    profile::reset_peak_memory(device);
    let (tiled, tiled_ms) = timed(device, || {
        to_bytes(&decode_in_tiles(
            vae,
            &latents,
            tiles,
            TileStatistics::Shared,
        )?)
    })?;
    let tiled_peak_bytes = profile::peak_memory_bytes(device);
    let per_tile = to_bytes(&decode_in_tiles(
        vae,
        &latents,
        tiles,
        TileStatistics::PerTile,
    )?)?;
    let difference = |a: &Tensor, b: &Tensor| -> Result<(f32, f32)> {
        let difference = (a - b)?.abs()?;
        Ok((
            difference.max_all()?.to_scalar::<f32>()?,
            difference.mean_all()?.to_scalar::<f32>()?,
        ))
    };
    let (untiled_ms, shared, per_tile) = match untiled {
        Ok((pixels, ms)) => (
            Ok(ms),
            Some(difference(&pixels, &tiled)?),
            Some(difference(&pixels, &per_tile)?),
        ),
        Err(error) => (Err(error.to_string()), None, None),
    };
    Ok(TiledDecodeReport {
        side_px,
        tile_px: tiles.sample_px,
        untiled_ms,
        untiled_peak_bytes,
        tiled_ms,
        tiled_peak_bytes,
        max_difference_8bit: shared.map(|d| d.0),
        mean_difference_8bit: shared.map(|d| d.1),
        per_tile_max_difference_8bit: per_tile.map(|d| d.0),
        per_tile_mean_difference_8bit: per_tile.map(|d| d.1),
    })
}
