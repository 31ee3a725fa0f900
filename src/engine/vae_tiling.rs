//! Tiled VAE decoding and encoding: the input is cut into overlapping square tiles as diffusers'
//! `AutoencoderKL.enable_tiling()` cuts it, each tile goes through the network alone (so the
//! memory a decode needs no longer grows with the image), and neighbouring outputs are blended
//! linearly across the overlap. diffusers normalises each tile with its own GroupNorm
//! statistics ([`TileStatistics::PerTile`], kept and tested equal to it), which shows as seams
//! on flat colours; Atelier decodes with statistics shared by all tiles
//! ([`TileStatistics::Shared`]). `atelier bench --tiled-decode` reports how far either lands
//! from an untiled decode.

use candle_core::{DType, Tensor};

use super::error::{EngineError, Result};
use super::shared_norm::CountedPart;
use super::vae::{VaeDecoder, VaeEncoder};

/// Whether decodes and encodes go tile by tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum VaeTiling {
    /// Tiles when an untiled pass would not fit: on a CUDA GPU, its activations (as
    /// [`estimated_untiled_bytes`] puts them) above the free memory less a margin; elsewhere
    /// above [`AUTO_TILING_ABOVE_BYTES`] (a 4096x4096 decode).
    #[default]
    Auto,
    /// Always in tiles (when the image is larger than one tile).
    Always,
    /// Never: the whole image at once, exactly as the untiled VAE.
    Never,
}

impl VaeTiling {
    /// Every choice, for menus.
    pub const ALL: [VaeTiling; 3] = [VaeTiling::Auto, VaeTiling::Always, VaeTiling::Never];

    /// Parses `auto`, `on` (or `always`) and `off` (or `never`).
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(VaeTiling::Auto),
            "on" | "always" | "tiled" => Ok(VaeTiling::Always),
            "off" | "never" | "untiled" => Ok(VaeTiling::Never),
            other => Err(EngineError::InvalidParameter(format!(
                "unknown VAE tiling {other:?}; choose auto, on or off"
            ))),
        }
    }

    /// The name [`Self::parse`] reads.
    pub fn name(self) -> &'static str {
        match self {
            VaeTiling::Auto => "auto",
            VaeTiling::Always => "on",
            VaeTiling::Never => "off",
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            VaeTiling::Auto => 0,
            VaeTiling::Always => 1,
            VaeTiling::Never => 2,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => VaeTiling::Always,
            2 => VaeTiling::Never,
            _ => VaeTiling::Auto,
        }
    }
}

/// [`VaeTiling`] in a cell that a shared model can change (the window's setting).
#[derive(Debug, Default)]
pub struct VaeTilingCell(std::sync::atomic::AtomicU8);

impl VaeTilingCell {
    /// The current choice.
    pub fn get(&self) -> VaeTiling {
        VaeTiling::from_u8(self.0.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Changes it.
    pub fn set(&self, tiling: VaeTiling) {
        self.0
            .store(tiling.to_u8(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// With [`VaeTiling::Auto`] off CUDA (main memory), a pass tiles once its activations would
/// pass this many bytes.
pub const AUTO_TILING_ABOVE_BYTES: usize = 12 << 30;

/// With [`VaeTiling::Auto`] on CUDA, what is kept free besides the untiled pass's estimate.
pub const GPU_MARGIN_BYTES: usize = 1 << 30;

/// The untiled pass's activation memory: six full-resolution tensors of the first level's
/// channels (measured on an H200: SD's VAE at 2048x2048 in f16 took 6.4 GB besides the weights;
/// the estimate says 6 GiB).
pub fn estimated_untiled_bytes(
    batch: usize,
    height_px: usize,
    width_px: usize,
    first_level_channels: usize,
    dtype: DType,
) -> usize {
    6 * batch * height_px * width_px * first_level_channels * dtype.size_in_bytes()
}

/// The tile sizes of a VAE: `sample_px` pixels a side (the config's `sample_size`, as diffusers
/// takes it, but at most [`MAX_TILE_PX`]), `sample_px / scale_factor` latent cells, a quarter
/// of each overlapping its neighbour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileSizes {
    /// A tile's side in pixels.
    pub sample_px: usize,
    /// A tile's side in latent cells.
    pub latent_cells: usize,
}

/// The largest tile (and the tile when a VAE config has no `sample_size`, as single-file
/// checkpoints): 512 pixels. diffusers tiles SDXL's VAE by 1024 pixels, which leaves a
/// 1024x1024 picture in one piece, and tiling is what a GPU short of memory needs there
/// (measured on an H200: SDXL's f32 decode of 1024x1024 takes 2.8 GB besides the weights).
pub const MAX_TILE_PX: usize = 512;

impl TileSizes {
    /// The tiles of a VAE with `sample_size` (pixels, at most [`MAX_TILE_PX`]) and
    /// `scale_factor` pixels per cell.
    pub fn new(sample_size: Option<usize>, scale_factor: usize) -> Self {
        let sample_px = sample_size
            .unwrap_or(MAX_TILE_PX)
            .min(MAX_TILE_PX)
            .max(scale_factor);
        Self {
            sample_px,
            latent_cells: (sample_px / scale_factor.max(1)).max(1),
        }
    }
}

/// How tiles are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TileStatistics {
    /// Each tile with its own GroupNorm statistics, blended over the overlaps: diffusers'
    /// `enable_tiling()`, exactly. Tiles of flat colour come out lighter or darker than their
    /// neighbours, which shows as seams.
    PerTile,
    /// Every tile with the statistics of the whole image (no seams), in three passes: the input
    /// shrunk to one tile gives first statistics, a pass over the tiles with those collects
    /// better ones (each tile counting its middle part), and the last pass uses them.
    Shared,
}

/// Decodes `latents` (already divided by the scaling factor) in `tiles`: f32 in [-1, 1].
pub fn decode_in_tiles(
    vae: &VaeDecoder,
    latents: &Tensor,
    tiles: TileSizes,
    statistics: TileStatistics,
) -> Result<Tensor> {
    let (_, _, height, width) = latents.dims4()?;
    let factor = vae.config().scale_factor();
    let decode = |tile: &Tensor| vae.decode(tile);
    let stitched = match statistics {
        TileStatistics::PerTile => run_tiled(latents, tiles.latent_cells, tiles.sample_px, decode)?,
        TileStatistics::Shared => {
            run_tiled_shared(latents, tiles.latent_cells, tiles.sample_px, decode)?
        }
    };
    check_size(&stitched, height * factor, width * factor)?;
    Ok(stitched)
}

/// The encoder's moments of `pixels` in `tiles` (f32), blended as diffusers blends them.
pub fn moments_in_tiles(
    encoder: &VaeEncoder,
    pixels: &Tensor,
    tiles: TileSizes,
    scale_factor: usize,
    statistics: TileStatistics,
) -> Result<Tensor> {
    let (_, _, height, width) = pixels.dims4()?;
    let encode = |tile: &Tensor| encoder.moments(tile);
    let stitched = match statistics {
        TileStatistics::PerTile => run_tiled(pixels, tiles.sample_px, tiles.latent_cells, encode)?,
        TileStatistics::Shared => {
            run_tiled_shared(pixels, tiles.sample_px, tiles.latent_cells, encode)?
        }
    };
    check_size(&stitched, height / scale_factor, width / scale_factor)?;
    Ok(stitched)
}

/// [`run_tiled`] with GroupNorm statistics of the whole input (see [`super::shared_norm`] and
/// [`TileStatistics::Shared`]).
pub fn run_tiled_shared(
    input: &Tensor,
    input_tile: usize,
    output_tile: usize,
    pass: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let session = super::shared_norm::SharedStatistics::open();
    let (_, _, height, width) = input.dims4()?;
    // First statistics: the whole input at most one tile large (nearest cells).
    let shrink = height.max(width).div_ceil(input_tile).max(1);
    let small = input.upsample_nearest2d(height.div_ceil(shrink), width.div_ceil(shrink))?;
    session.start_tile(CountedPart::WHOLE);
    drop(pass(&small)?);
    session.next_pass(true);
    // Better ones: every tile, normalised with the first, counting its middle part.
    let origins = tile_origins(height, width, input_tile);
    for &(top, left) in &origins {
        let tile = input
            .narrow(2, top, input_tile.min(height - top))?
            .narrow(3, left, input_tile.min(width - left))?
            .contiguous()?;
        session.start_tile(counted_part(top, left, height, width, input_tile));
        drop(pass(&tile)?);
    }
    session.next_pass(false);
    let mut next = origins.iter();
    run_tiled(input, input_tile, output_tile, |tile| {
        if let Some(&(top, left)) = next.next() {
            session.start_tile(counted_part(top, left, height, width, input_tile));
        }
        pass(tile)
    })
}

/// The top-left corners of the tiles, row by row, as diffusers steps them.
fn tile_origins(height: usize, width: usize, input_tile: usize) -> Vec<(usize, usize)> {
    let stride = tile_stride(input_tile);
    (0..height)
        .step_by(stride)
        .flat_map(|top| (0..width).step_by(stride).map(move |left| (top, left)))
        .collect()
}

/// Tiles start this many input cells apart (diffusers truncates with `int()`).
fn tile_stride(input_tile: usize) -> usize {
    ((input_tile as f64 * (1.0 - OVERLAP_FACTOR)) as usize).max(1)
}

/// The middle part of the tile at (`top`, `left`) that no other tile's counted part covers.
fn counted_part(top: usize, left: usize, height: usize, width: usize, tile: usize) -> CountedPart {
    let stride = tile_stride(tile);
    let margin = (tile - stride) / 2;
    // Along one side: from the middle of the overlap with the previous tile (or the image's
    // edge) to the middle of the overlap with the next (or the tile's end).
    let span = |origin: usize, size: usize| {
        let extent = tile.min(size - origin);
        let start = if origin == 0 { 0 } else { margin };
        let end = if origin + stride < size {
            (stride + margin).min(extent)
        } else {
            extent
        };
        (
            start as f64 / extent as f64,
            end.max(start + 1) as f64 / extent as f64,
        )
    };
    let (top, bottom) = span(top, height);
    let (left, right) = span(left, width);
    CountedPart {
        top,
        bottom,
        left,
        right,
    }
}

/// diffusers' `tile_overlap_factor`.
const OVERLAP_FACTOR: f64 = 0.25;

/// Runs `pass` over overlapping `input_tile`-sized tiles of `input` `(batch, c, h, w)` and
/// stitches its outputs (`output_tile` a side for a whole tile) back together, blending each
/// tile into the one above and the one to its left over a quarter of a tile. Outputs are f32.
pub fn run_tiled(
    input: &Tensor,
    input_tile: usize,
    output_tile: usize,
    mut pass: impl FnMut(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, height, width) = input.dims4()?;
    let stride = tile_stride(input_tile);
    let blend_extent = (output_tile as f64 * OVERLAP_FACTOR) as usize;
    let row_limit = output_tile - blend_extent;
    let mut above: Vec<Tensor> = Vec::new();
    let mut stitched_rows = Vec::new();
    for top in (0..height).step_by(stride) {
        let mut row: Vec<Tensor> = Vec::new();
        let mut cropped = Vec::new();
        for (column, left) in (0..width).step_by(stride).enumerate() {
            let tile = input
                .narrow(2, top, input_tile.min(height - top))?
                .narrow(3, left, input_tile.min(width - left))?
                .contiguous()?;
            let mut output = pass(&tile)?.to_dtype(DType::F32)?;
            if let Some(over) = above.get(column) {
                output = blend(over, &output, blend_extent, 2)?;
            }
            if let Some(before) = row.last() {
                output = blend(before, &output, blend_extent, 3)?;
            }
            let (_, _, out_h, out_w) = output.dims4()?;
            cropped.push(output.narrow(2, 0, row_limit.min(out_h))?.narrow(
                3,
                0,
                row_limit.min(out_w),
            )?);
            row.push(output);
        }
        stitched_rows.push(Tensor::cat(&cropped, 3)?);
        above = row;
    }
    Ok(Tensor::cat(&stitched_rows, 2)?)
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (columns)
/// of `next` fade in from the last ones of `previous`.
fn blend(previous: &Tensor, next: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let extent = extent.min(previous.dim(dim)?).min(next.dim(dim)?);
    if extent == 0 {
        return Ok(next.clone());
    }
    let weights: Vec<f32> = (0..extent).map(|k| k as f32 / extent as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = extent;
    let fade_in = Tensor::from_vec(weights, &shape[..], next.device())?;
    let fade_out = (1.0 - &fade_in)?;
    let previous_edge = previous.narrow(dim, previous.dim(dim)? - extent, extent)?;
    let next_edge = next.narrow(dim, 0, extent)?;
    let mixed = (previous_edge.broadcast_mul(&fade_out)? + next_edge.broadcast_mul(&fade_in)?)?;
    let rest = next.narrow(dim, extent, next.dim(dim)? - extent)?;
    Ok(Tensor::cat(&[&mixed, &rest], dim)?)
}

/// Checks that a stitched result has the size the untiled pass would give.
pub fn check_size(stitched: &Tensor, height: usize, width: usize) -> Result<()> {
    let (_, _, h, w) = stitched.dims4()?;
    if (h, w) != (height, width) {
        return Err(EngineError::Unsupported(format!(
            "tiled VAE gave {w}x{h} instead of {width}x{height}: the VAE's sample_size does not \
             tile evenly; turn VAE tiling off"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn identity_tiles_stitch_back_to_the_input() {
        // With a pass that changes nothing, blending equal overlaps gives the input back.
        let input = Tensor::arange(0f32, 2.0 * 3.0 * 37.0 * 53.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 37, 53))
            .unwrap();
        let stitched = run_tiled(&input, 16, 16, |tile| Ok(tile.clone())).unwrap();
        check_size(&stitched, 37, 53).unwrap();
        let difference = crate::engine::test_support::max_abs_difference(&stitched, &input);
        assert!(difference < 1e-3, "{difference}");
    }

    #[test]
    fn upscaling_tiles_give_the_upscaled_size() {
        let input = Tensor::ones((1, 4, 50, 30), DType::F32, &Device::Cpu).unwrap();
        let stitched = run_tiled(&input, 16, 32, |tile| {
            let (_, _, h, w) = tile.dims4()?;
            Ok(tile.upsample_nearest2d(2 * h, 2 * w)?)
        })
        .unwrap();
        check_size(&stitched, 100, 60).unwrap();
    }

    #[test]
    fn tiling_choices_parse_and_round_trip() {
        for tiling in VaeTiling::ALL {
            assert_eq!(VaeTiling::parse(tiling.name()).unwrap(), tiling);
            let cell = VaeTilingCell::default();
            cell.set(tiling);
            assert_eq!(cell.get(), tiling);
        }
        assert!(VaeTiling::parse("sometimes").is_err());
    }
}
