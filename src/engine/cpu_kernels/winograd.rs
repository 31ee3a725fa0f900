//! 3x3 convolutions (stride 1, padding 1: nearly all of SD's) on the CPU by Winograd's minimal
//! filtering F(4x4, 3x3): each 4x4 block of output pixels costs 36 multiplications per input
//! channel instead of 144, so the GEMMs do a quarter of im2col's work, and the transformed
//! input is 2.25x the input where im2col's columns are 9x. The input is cut into 6x6 tiles
//! (overlapping by 2) and transformed (`V = Bt d B`), the weights likewise (`U = G g Gt`), then
//! 36 independent GEMMs multiply them (`M = U V`, one per position in the 6x6 tile), and the
//! output transform (`Y = At M A`) gives each tile's 4x4 pixels (Lavin and Gray's matrices).
//! The transforms' constants (up to 8, and 1/24) cost a little precision: about 1e-6 of the
//! values' scale in f32, against 1e-7 for a direct convolution.

use rayon::prelude::*;

/// The most f32 values of transformed input (36 per channel and tile) held at once (64 MiB);
/// the transformed output of a band is the same size times out/in channels.
const MAX_TRANSFORMED_VALUES: usize = 1 << 24;

/// Output pixels per tile side.
const TILE: usize = 4;
/// Input pixels per tile side (TILE + 2).
const SPAN: usize = 6;
/// Values per transformed tile.
const POSITIONS: usize = SPAN * SPAN;

/// `G g`: one column of a 3x3 filter to 6 values.
#[inline(always)]
fn filter_column(g0: f32, g1: f32, g2: f32) -> [f32; SPAN] {
    [
        g0 / 4.0,
        -(g0 + g1 + g2) / 6.0,
        -(g0 - g1 + g2) / 6.0,
        g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
        g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
        g2,
    ]
}

/// `Bt d`: 6 input values to 6.
#[inline(always)]
fn input_column(d: [f32; SPAN]) -> [f32; SPAN] {
    [
        4.0 * d[0] - 5.0 * d[2] + d[4],
        -4.0 * (d[1] + d[2]) + d[3] + d[4],
        4.0 * (d[1] - d[2]) - d[3] + d[4],
        2.0 * (d[3] - d[1]) - d[2] + d[4],
        2.0 * (d[1] - d[3]) - d[2] + d[4],
        4.0 * d[1] - 5.0 * d[3] + d[5],
    ]
}

/// `At m`: 6 products to 4 output values.
#[inline(always)]
fn output_column(m: [f32; SPAN]) -> [f32; TILE] {
    let (sum, difference) = (m[1] + m[2], m[1] - m[2]);
    let (sum_far, difference_far) = (m[3] + m[4], m[3] - m[4]);
    [
        m[0] + sum + sum_far,
        difference + 2.0 * difference_far,
        sum + 4.0 * sum_far,
        difference + 8.0 * difference_far + m[5],
    ]
}

/// The 36 values `G g Gt` of one 3x3 filter, row-major 6x6.
fn filter_transform(g: &[f32]) -> [f32; POSITIONS] {
    let mut gg = [[0f32; 3]; SPAN]; // G g: 6x3
    for col in 0..3 {
        for (row, value) in filter_column(g[col], g[3 + col], g[6 + col])
            .into_iter()
            .enumerate()
        {
            gg[row][col] = value;
        }
    }
    let mut u = [0f32; POSITIONS];
    for (row, values) in gg.iter().enumerate() {
        u[row * SPAN..][..SPAN].copy_from_slice(&filter_column(values[0], values[1], values[2]));
    }
    u
}

/// The transformed filters `G g Gt` of a `(out_channels, channels, 3, 3)` weight, laid out
/// `[out][position][in]` (36 positions): what [`convolve_3x3_add`] multiplies.
pub fn transform_filters(weight: &[f32], out_channels: usize, channels: usize) -> Vec<f32> {
    let mut filters = vec![0f32; out_channels * POSITIONS * channels];
    if channels == 0 {
        return filters;
    }
    filters
        .par_chunks_mut(POSITIONS * channels)
        .zip(weight.par_chunks(9 * channels))
        .for_each(|(out, weights)| {
            for (channel, g) in weights.chunks(9).enumerate() {
                for (position, value) in filter_transform(g).iter().enumerate() {
                    out[position * channels + channel] = *value;
                }
            }
        });
    filters
}

/// `output += conv3x3(image, weight)` with stride 1 and zero padding 1, for one image
/// (`channels x height x width`), the weight's [`transform_filters`] and an output of
/// `out_channels x height x width` (which already holds the bias).
pub fn convolve_3x3_add(
    output: &mut [f32],
    image: &[f32],
    filters: &[f32],
    dims: (usize, usize, usize, usize),
) {
    convolve_in_bands(output, image, filters, dims, MAX_TRANSFORMED_VALUES);
}

/// [`convolve_3x3_add`] with bands of tile rows whose transforms hold at most `max_values`.
fn convolve_in_bands(
    output: &mut [f32],
    image: &[f32],
    filters: &[f32],
    (out_channels, channels, height, width): (usize, usize, usize, usize),
    max_values: usize,
) {
    let plane = height * width;
    assert!(image.len() >= channels * plane && output.len() >= out_channels * plane);
    assert!(filters.len() >= out_channels * POSITIONS * channels);
    if plane == 0 || channels == 0 || out_channels == 0 {
        return;
    }
    let (tiles_h, tiles_w) = (height.div_ceil(TILE), width.div_ceil(TILE));
    let per_tile_row = POSITIONS * tiles_w * channels.max(out_channels);
    let band_rows = (max_values / per_tile_row.max(1)).clamp(1, tiles_h);
    let band_tiles = band_rows * tiles_w;
    // V: [channel][position][tile]; M: [position][out][tile].
    let mut v = vec![0f32; channels * POSITIONS * band_tiles];
    let mut m = vec![0f32; POSITIONS * out_channels * band_tiles];
    for first_tile_row in (0..tiles_h).step_by(band_rows) {
        let rows = band_rows.min(tiles_h - first_tile_row);
        let tiles = rows * tiles_w;
        timed("conv2d.winograd_input", || {
            v[..channels * POSITIONS * band_tiles]
                .par_chunks_mut(POSITIONS * band_tiles)
                .enumerate()
                .for_each(|(channel, values)| {
                    let source = &image[channel * plane..][..plane];
                    transform_band(
                        values,
                        band_tiles,
                        source,
                        height,
                        width,
                        first_tile_row,
                        rows,
                    );
                })
        });
        // The 36 GEMMs M[p] (out x tiles) = U[p] (out x channels) V[p] (channels x tiles).
        timed("conv2d.winograd_gemm", || {
            m.par_chunks_mut(out_channels * band_tiles)
                .enumerate()
                .for_each(|(position, products)| {
                    let u_p = &filters[position * channels..];
                    let v_p = &v[position * band_tiles..];
                    // SAFETY: u_p's rows (out channel k at k * 36 * channels) each span `channels`
                    // values inside `filters`; v_p's rows lie 36 * band_tiles apart and each spans
                    // `tiles` values inside v (channel c's row p starts at (36c + p) * band_tiles);
                    // products holds out rows of band_tiles values.
                    unsafe {
                        gemm::gemm(
                            out_channels,
                            tiles,
                            channels,
                            products.as_mut_ptr(),
                            1,
                            band_tiles as isize,
                            false,
                            u_p.as_ptr(),
                            1,
                            (POSITIONS * channels) as isize,
                            v_p.as_ptr(),
                            1,
                            (POSITIONS * band_tiles) as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                })
        });
        timed("conv2d.winograd_output", || {
            output[..out_channels * plane]
                .par_chunks_mut(plane)
                .enumerate()
                .for_each(|(out_channel, out)| {
                    let mut across = vec![0f32; SPAN * TILE * tiles_w];
                    let mut pixels = vec![0f32; TILE * TILE * tiles_w];
                    for row in 0..rows {
                        let first = (out_channel * band_tiles) + row * tiles_w;
                        let products: [&[f32]; POSITIONS] = std::array::from_fn(|position| {
                            &m[position * out_channels * band_tiles + first..][..tiles_w]
                        });
                        add_tile_row(
                            &products,
                            &mut across,
                            &mut pixels,
                            out,
                            height,
                            width,
                            first_tile_row + row,
                        );
                    }
                })
        });
    }
}

/// `out += At M A` for one tile row (`width / 4` tiles, rounded up), from its 36 product rows
/// (`products[r * 6 + c]`, one value per tile), through the work rows `across` (`At` along
/// each product row: [row of 6][column of 4][tile]) and `pixels` ([pixel row][pixel
/// column][tile]): every loop runs over the tiles, which the compiler vectorises.
#[allow(clippy::needless_range_loop)] // `tx` walks several rows at once
fn add_tile_row(
    products: &[&[f32]; POSITIONS],
    across: &mut [f32],
    pixels: &mut [f32],
    out: &mut [f32],
    height: usize,
    width: usize,
    tile_row: usize,
) {
    let tiles_w = width.div_ceil(TILE);
    for r in 0..SPAN {
        let dst = &mut across[r * TILE * tiles_w..][..TILE * tiles_w];
        let (d0, rest) = dst.split_at_mut(tiles_w);
        let (d1, rest) = rest.split_at_mut(tiles_w);
        let (d2, d3) = rest.split_at_mut(tiles_w);
        let m = &products[r * SPAN..][..SPAN];
        for tx in 0..tiles_w {
            let o = output_column(std::array::from_fn(|c| m[c][tx]));
            d0[tx] = o[0];
            d1[tx] = o[1];
            d2[tx] = o[2];
            d3[tx] = o[3];
        }
    }
    for j in 0..TILE {
        let column: [&[f32]; SPAN] =
            std::array::from_fn(|r| &across[(r * TILE + j) * tiles_w..][..tiles_w]);
        for tx in 0..tiles_w {
            let o = output_column(std::array::from_fn(|r| column[r][tx]));
            for (i, value) in o.into_iter().enumerate() {
                pixels[(i * TILE + j) * tiles_w + tx] = value;
            }
        }
    }
    for i in 0..TILE {
        let y = TILE * tile_row + i;
        if y >= height {
            break;
        }
        let line = &mut out[y * width..][..width];
        let phases: [&[f32]; TILE] =
            std::array::from_fn(|j| &pixels[(i * TILE + j) * tiles_w..][..tiles_w]);
        let full = width / TILE;
        for (tx, group) in line.chunks_exact_mut(TILE).enumerate().take(full) {
            for (j, pixel) in group.iter_mut().enumerate() {
                *pixel += phases[j][tx];
            }
        }
        for x in full * TILE..width {
            line[x] += phases[x % TILE][x / TILE];
        }
    }
}

/// Runs `f` under `name` when profiling (`bench --profile`).
fn timed(name: &'static str, f: impl FnOnce()) {
    let _ = crate::engine::profile::scope_with(
        name,
        || Ok(()),
        || {
            f();
            Ok::<(), candle_core::Error>(())
        },
    );
}

/// One channel's transformed tiles for tile rows `first_tile_row..first_tile_row + rows`:
/// `values[position * stride + tile]`, zero outside the image (the padding). Every loop runs
/// across a tile row's tiles (vectorisable): its six input rows are split into four phases
/// (`x = 4j + p - 1`), so that every value a tile needs sits at the same index `j` (or `j + 1`)
/// of some phase.
#[allow(clippy::needless_range_loop)] // `tx` walks several rows at once
fn transform_band(
    values: &mut [f32],
    stride: usize,
    source: &[f32],
    height: usize,
    width: usize,
    first_tile_row: usize,
    rows: usize,
) {
    let tiles_w = width.div_ceil(TILE);
    let phase_len = tiles_w + 1;
    // The six input rows by phase: [dy][phase][j]; then Bt applied down them: [r][phase][j].
    let mut phases = vec![0f32; SPAN * TILE * phase_len];
    let mut down = vec![0f32; SPAN * TILE * phase_len];
    // One input row with a zero on the left and zeros past its end: x = 4j + p - 1 is at 4j + p.
    let mut padded = vec![0f32; TILE * phase_len];
    let mut planes: Vec<&mut [f32]> = values.chunks_mut(stride).take(POSITIONS).collect();
    for row in 0..rows {
        let y0 = (TILE * (first_tile_row + row)) as isize - 1;
        for dy in 0..SPAN {
            let y = y0 + dy as isize;
            // padded[x + 1] = pixel x of the row, zero in the padding and beyond.
            padded.fill(0.0);
            if y >= 0 && y < height as isize {
                padded[1..=width].copy_from_slice(&source[y as usize * width..][..width]);
            }
            let (p0, rest) = phases[dy * TILE * phase_len..].split_at_mut(phase_len);
            let (p1, rest) = rest.split_at_mut(phase_len);
            let (p2, rest) = rest.split_at_mut(phase_len);
            let p3 = &mut rest[..phase_len];
            for (j, quad) in padded.chunks_exact(TILE).enumerate() {
                p0[j] = quad[0];
                p1[j] = quad[1];
                p2[j] = quad[2];
                p3[j] = quad[3];
            }
        }
        let span = TILE * phase_len;
        for k in 0..span {
            let column = input_column(std::array::from_fn(|dy| phases[dy * span + k]));
            for (r, value) in column.into_iter().enumerate() {
                down[r * span + k] = value;
            }
        }
        let first = row * tiles_w;
        for r in 0..SPAN {
            let phase = |p: usize| &down[(r * TILE + p) * phase_len..][..phase_len];
            let (p0, p1, p2, p3) = (phase(0), phase(1), phase(2), phase(3));
            let targets = &mut planes[r * SPAN..(r + 1) * SPAN];
            for tx in 0..tiles_w {
                let across = input_column([p0[tx], p1[tx], p2[tx], p3[tx], p0[tx + 1], p1[tx + 1]]);
                for (c, value) in across.into_iter().enumerate() {
                    targets[c][first + tx] = value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn bands_of_tile_rows_give_the_direct_convolution() {
        let (out_channels, channels, height, width) = (5, 3, 9, 7);
        let values = |count: usize, scale: f32| -> Vec<f32> {
            (0..count)
                .map(|i| (i as f32 * 0.37 + 0.1).sin() * scale)
                .collect()
        };
        let image = values(channels * height * width, 2.0);
        let weight = values(out_channels * channels * 9, 0.5);
        let filters = transform_filters(&weight, out_channels, channels);
        let reference = Tensor::from_vec(image.clone(), (1, channels, height, width), &Device::Cpu)
            .unwrap()
            .conv2d(
                &Tensor::from_vec(weight.clone(), (out_channels, channels, 3, 3), &Device::Cpu)
                    .unwrap(),
                1,
                1,
                1,
                1,
            )
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // One tile row per band (the smallest), two, and all at once.
        for max_values in [1, POSITIONS * 2 * 5 * 2, usize::MAX] {
            let mut output = vec![0f32; out_channels * height * width];
            convolve_in_bands(
                &mut output,
                &image,
                &filters,
                (out_channels, channels, height, width),
                max_values,
            );
            let difference = output
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(difference < 1e-4, "bands of {max_values}: {difference}");
        }
    }
}
