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

/// `Bt d B` of one 6x6 input tile `d` (row-major).
#[inline(always)]
fn input_transform(d: &[f32; POSITIONS]) -> [f32; POSITIONS] {
    let mut t = [0f32; POSITIONS]; // Bt d
    for col in 0..SPAN {
        let column = std::array::from_fn(|row| d[row * SPAN + col]);
        for (row, value) in input_column(column).into_iter().enumerate() {
            t[row * SPAN + col] = value;
        }
    }
    let mut v = [0f32; POSITIONS];
    for row in 0..SPAN {
        let line = std::array::from_fn(|col| t[row * SPAN + col]);
        v[row * SPAN..][..SPAN].copy_from_slice(&input_column(line));
    }
    v
}

/// `At m A` of one tile's 36 products: its 4x4 output pixels, row-major.
#[inline(always)]
fn output_transform(m: &[f32; POSITIONS]) -> [f32; TILE * TILE] {
    let mut t = [0f32; TILE * SPAN]; // At m: 4x6
    for col in 0..SPAN {
        let column = std::array::from_fn(|row| m[row * SPAN + col]);
        for (row, value) in output_column(column).into_iter().enumerate() {
            t[row * SPAN + col] = value;
        }
    }
    let mut y = [0f32; TILE * TILE];
    for row in 0..TILE {
        let line = std::array::from_fn(|col| t[row * SPAN + col]);
        y[row * TILE..][..TILE].copy_from_slice(&output_column(line));
    }
    y
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
        v[..channels * POSITIONS * band_tiles]
            .par_chunks_mut(POSITIONS * band_tiles)
            .enumerate()
            .for_each(|(channel, values)| {
                let source = &image[channel * plane..][..plane];
                transform_band(
                    values,
                    band_tiles,
                    source,
                    (height, width),
                    first_tile_row,
                    rows,
                );
            });
        // The 36 GEMMs M[p] (out x tiles) = U[p] (out x channels) V[p] (channels x tiles).
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
            });
        output[..out_channels * plane]
            .par_chunks_mut(plane)
            .enumerate()
            .for_each(|(out_channel, out)| {
                let mut tile = [0f32; POSITIONS];
                for local in 0..tiles {
                    for (position, value) in tile.iter_mut().enumerate() {
                        *value = m[(position * out_channels + out_channel) * band_tiles + local];
                    }
                    let pixels = output_transform(&tile);
                    let (ty, tx) = (first_tile_row + local / tiles_w, local % tiles_w);
                    for (index, pixel) in pixels.iter().enumerate() {
                        let (y, x) = (TILE * ty + index / TILE, TILE * tx + index % TILE);
                        if y < height && x < width {
                            out[y * width + x] += pixel;
                        }
                    }
                }
            });
    }
}

/// One channel's transformed tiles for tile rows `first_tile_row..first_tile_row + rows`:
/// `values[position * stride + tile]`, zero outside the image (the padding).
fn transform_band(
    values: &mut [f32],
    stride: usize,
    source: &[f32],
    (height, width): (usize, usize),
    first_tile_row: usize,
    rows: usize,
) {
    let tiles_w = width.div_ceil(TILE);
    let pixel = |y: isize, x: isize| -> f32 {
        if y < 0 || x < 0 || y >= height as isize || x >= width as isize {
            0.0
        } else {
            source[y as usize * width + x as usize]
        }
    };
    let mut d = [0f32; POSITIONS];
    let span = SPAN as isize;
    for row in 0..rows {
        let y0 = (TILE * (first_tile_row + row)) as isize - 1;
        for tx in 0..tiles_w {
            let x0 = (TILE * tx) as isize - 1;
            let inside =
                y0 >= 0 && x0 >= 0 && y0 + span <= height as isize && x0 + span <= width as isize;
            if inside {
                for dy in 0..SPAN {
                    let line = &source[(y0 as usize + dy) * width + x0 as usize..][..SPAN];
                    d[dy * SPAN..][..SPAN].copy_from_slice(line);
                }
            } else {
                for dy in 0..SPAN {
                    for dx in 0..SPAN {
                        d[dy * SPAN + dx] = pixel(y0 + dy as isize, x0 + dx as isize);
                    }
                }
            }
            let transformed = input_transform(&d);
            let tile = row * tiles_w + tx;
            for (position, value) in transformed.iter().enumerate() {
                values[position * stride + tile] = *value;
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
