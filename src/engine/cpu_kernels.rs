//! Operations for the CPU where candle's general ones make several passes over memory.
//!
//! GroupNorm (with the SiLU that usually follows it) was candle's slowest CPU operation per
//! element: mean, centring, variance, scaling and the activation each read and wrote the whole
//! tensor. Here each (image, group) is one task: one pass for the statistics, one for the
//! normalised, scaled and activated output. Convolutions build their im2col columns from
//! contiguous input rows and run one GEMM per band straight into NCHW ([`CpuConv2dOp`]).

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// `GroupNorm(x) * weight + bias`, then SiLU when `silu`, on contiguous f32 tensors
/// `(batch, channels, ...)` with `weight` and `bias` of `channels` values.
#[derive(Debug, Clone, Copy)]
pub struct CpuGroupNormOp {
    /// Groups of channels normalised together.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// Apply x * sigmoid(x) after the affine step.
    pub silu: bool,
}

fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(values) = storage else {
        candle_core::bail!("Atelier's CPU kernels: {what} must be f32");
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&values[start..end]),
        None => candle_core::bail!("Atelier's CPU kernels: {what} must be contiguous"),
    }
}

impl CustomOp3 for CpuGroupNormOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs_values = contiguous(xs, xs_layout, "the input")?;
        let weight = contiguous(weight, weight_layout, "the weight")?;
        let bias = contiguous(bias, bias_layout, "the bias")?;
        let dims = xs_layout.shape().dims();
        if dims.len() < 2 || self.groups == 0 || !dims[1].is_multiple_of(self.groups) {
            candle_core::bail!(
                "CPU GroupNorm: {} groups cannot split the shape {dims:?}",
                self.groups
            );
        }
        let channels = dims[1];
        if weight.len() != channels || bias.len() != channels {
            candle_core::bail!("CPU GroupNorm: weight and bias need {channels} values");
        }
        let spatial: usize = dims[2..].iter().product();
        let group_channels = channels / self.groups;
        let group_len = group_channels * spatial;
        let mut out = vec![0f32; xs_values.len()];
        if group_len == 0 {
            return Ok((CpuStorage::F32(out), xs_layout.shape().clone()));
        }
        let (groups, eps, silu) = (self.groups, self.eps, self.silu);
        out.par_chunks_mut(group_len)
            .zip(xs_values.par_chunks(group_len))
            .enumerate()
            .for_each(|(index, (out, xs))| {
                let (mut sum, mut sum_sq) = (0f64, 0f64);
                for &v in xs {
                    let v = v as f64;
                    sum += v;
                    sum_sq += v * v;
                }
                let count = xs.len() as f64;
                let mean = sum / count;
                let variance = (sum_sq / count - mean * mean).max(0.0);
                let inverse = 1.0 / (variance + eps).sqrt();
                let first_channel = (index % groups) * group_channels;
                for c in 0..group_channels {
                    let channel = first_channel + c;
                    let scale = weight[channel] as f64 * inverse;
                    let shift = bias[channel] as f64 - mean * scale;
                    let (scale, shift) = (scale as f32, shift as f32);
                    let range = c * spatial..(c + 1) * spatial;
                    for (o, &v) in out[range.clone()].iter_mut().zip(&xs[range]) {
                        let y = v * scale + shift;
                        *o = if silu { y / (1.0 + (-y).exp()) } else { y };
                    }
                }
            });
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn fast_exp_is_exact_to_float_precision() {
        let mut worst = 0f64;
        for step in 0..200_000 {
            let x = -(step as f32) * 0.0004;
            let exact = (x as f64).exp();
            let relative = ((exp_approx(x) as f64) - exact).abs() / exact;
            worst = worst.max(relative);
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-200.0) < 1e-37);
    }

    #[test]
    fn attention_matches_the_plain_formula() {
        let device = Device::Cpu;
        let pattern = |shape: (usize, usize, usize), phase: f64| {
            let count = shape.0 * shape.1 * shape.2;
            (Tensor::arange(0f32, count as f32, &device)
                .unwrap()
                .reshape(shape)
                .unwrap()
                .affine(0.731, phase)
                .unwrap()
                .sin()
                .unwrap()
                * 3.0)
                .unwrap()
        };
        // Query counts that do and do not fill whole blocks; self- and cross-attention.
        for (rows, query_len, key_len, dim) in [(3, 64, 64, 8), (2, 100, 77, 40), (1, 130, 5, 16)] {
            let q = pattern((rows, query_len, dim), 0.1);
            let k = pattern((rows, key_len, dim), 0.7);
            let v = pattern((rows, key_len, dim), 1.3);
            let scale = 1.0 / (dim as f64).sqrt();
            let ours = q
                .apply_op3_no_bwd(
                    &k,
                    &v,
                    &CpuAttentionOp {
                        scale: scale as f32,
                    },
                )
                .unwrap();
            let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
            let reference = candle_nn::ops::softmax_last_dim(&scores)
                .unwrap()
                .matmul(&v)
                .unwrap();
            let difference = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                difference < 1e-5,
                "{rows}x{query_len}x{key_len}x{dim}: {difference}"
            );
        }
    }

    #[test]
    fn convolution_matches_candles() {
        let device = Device::Cpu;
        let pattern = |shape: (usize, usize, usize, usize), scale: f64| {
            let count = shape.0 * shape.1 * shape.2 * shape.3;
            (Tensor::arange(0f32, count as f32, &device)
                .unwrap()
                .reshape(shape)
                .unwrap()
                .affine(0.37, 0.1)
                .unwrap()
                .sin()
                .unwrap()
                * scale)
                .unwrap()
        };
        // (input, kernel, stride, padding): SD's 3x3 convolutions, the UNet's strided
        // downsamplers, the VAE encoder's unpadded ones, 1x1 shortcuts, odd sizes.
        let cases = [
            ((2, 5, 9, 11), 3, 1, 1),
            ((1, 4, 10, 7), 3, 2, 1),
            ((1, 3, 9, 9), 3, 2, 0),
            ((2, 6, 5, 8), 1, 1, 0),
            ((1, 3, 6, 6), 3, 1, 0),
            ((1, 2, 4, 5), 1, 2, 0),
        ];
        for (shape, kernel, stride, padding) in cases {
            let xs = pattern(shape, 2.0);
            let weight = pattern((7, shape.1, kernel, kernel), 0.5);
            let bias = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5], &device).unwrap();
            let op = CpuConv2dOp { stride, padding };
            let ours = xs.apply_op3_no_bwd(&weight, &bias, &op).unwrap();
            let reference = xs
                .conv2d(&weight, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, 7, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(
                ours.dims(),
                reference.dims(),
                "{shape:?} k{kernel} s{stride}"
            );
            let difference = (ours - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                difference < 1e-4,
                "{shape:?} k{kernel} s{stride} p{padding}: {difference}"
            );
        }
    }

    #[test]
    fn fused_group_norm_matches_candles() {
        let device = Device::Cpu;
        let xs = (Tensor::arange(0f32, 2.0 * 8.0 * 5.0 * 3.0, &device)
            .unwrap()
            .reshape((2, 8, 5, 3))
            .unwrap()
            .sin()
            .unwrap()
            * 3.0)
            .unwrap();
        let weight = Tensor::new(&[0.5f32, 1.0, 1.5, -1.0, 2.0, 0.1, 0.9, 1.1], &device).unwrap();
        let bias = Tensor::new(&[0.0f32, 0.1, -0.2, 0.3, 0.0, 1.0, -1.0, 0.5], &device).unwrap();
        let reference =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), 8, 4, 1e-5).unwrap();
        let expected = candle_core::Module::forward(&reference, &xs).unwrap();
        for silu in [false, true] {
            let op = CpuGroupNormOp {
                groups: 4,
                eps: 1e-5,
                silu,
            };
            let ours = xs.apply_op3_no_bwd(&weight, &bias, &op).unwrap();
            let expected = if silu {
                candle_nn::ops::silu(&expected).unwrap()
            } else {
                expected.clone()
            };
            let difference = (ours - expected)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(difference < 1e-5, "silu {silu}: {difference}");
        }
    }
}

/// A 2-D convolution with bias on contiguous f32 NCHW tensors (groups 1, dilation 1), written
/// straight into NCHW: the bias fills the output, then one GEMM per band of output rows adds
/// weights x columns, where a band's columns (im2col) are built row by row from contiguous
/// slices of the input in parallel. candle's CPU convolution transposes the whole input to NHWC
/// and scatters every patch, which cost more than the GEMMs themselves.
#[derive(Debug, Clone, Copy)]
pub struct CpuConv2dOp {
    /// Step between output pixels.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

/// The most f32 values of im2col columns built at once (64 MiB).
const MAX_COLUMN_VALUES: usize = 1 << 24;

impl CustomOp3 for CpuConv2dOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(xs, xs_layout, "the input")?;
        let weight = contiguous(weight, weight_layout, "the weight")?;
        let bias = contiguous(bias, bias_layout, "the bias")?;
        let (
            Ok(&[batch, channels, height, width]),
            Ok(&[out_channels, in_channels, kernel_h, kernel_w]),
        ) = (
            <&[usize; 4]>::try_from(xs_layout.shape().dims()),
            <&[usize; 4]>::try_from(weight_layout.shape().dims()),
        )
        else {
            candle_core::bail!("CPU conv2d: input and weight must be 4-D");
        };
        if in_channels != channels || bias.len() != out_channels || self.stride == 0 {
            candle_core::bail!(
                "CPU conv2d: weight {:?} and bias of {} do not fit input {:?}",
                weight_layout.shape().dims(),
                bias.len(),
                xs_layout.shape().dims()
            );
        }
        let padded_h = height + 2 * self.padding;
        let padded_w = width + 2 * self.padding;
        if padded_h < kernel_h || padded_w < kernel_w {
            candle_core::bail!("CPU conv2d: the kernel is larger than the padded input");
        }
        let out_h = (padded_h - kernel_h) / self.stride + 1;
        let out_w = (padded_w - kernel_w) / self.stride + 1;
        let plane = out_h * out_w;
        let depth = channels * kernel_h * kernel_w;
        let mut output = vec![0f32; batch * out_channels * plane];
        output
            .par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(index, values)| values.fill(bias[index % out_channels]));
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let pointwise = kernel_h == 1 && kernel_w == 1 && self.stride == 1 && self.padding == 0;
        let band_rows = (MAX_COLUMN_VALUES / (depth * out_w).max(1)).clamp(1, out_h);
        let mut columns = if pointwise {
            Vec::new()
        } else {
            vec![0f32; depth * band_rows * out_w]
        };
        for item in 0..batch {
            let image = &input[item * channels * height * width..][..channels * height * width];
            let out = &mut output[item * out_channels * plane..][..out_channels * plane];
            if pointwise {
                // SAFETY: out is (out_channels x plane), weight (out_channels x channels) and the
                // image (channels x plane), all row-major and in bounds.
                unsafe {
                    gemm::gemm(
                        out_channels,
                        plane,
                        channels,
                        out.as_mut_ptr(),
                        1,
                        plane as isize,
                        true,
                        weight.as_ptr(),
                        1,
                        channels as isize,
                        image.as_ptr(),
                        1,
                        plane as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
                continue;
            }
            for first_row in (0..out_h).step_by(band_rows) {
                let rows = band_rows.min(out_h - first_row);
                let span = rows * out_w;
                let band = &mut columns[..depth * span];
                band.par_chunks_mut(span)
                    .enumerate()
                    .for_each(|(row, values)| {
                        let channel = row / (kernel_h * kernel_w);
                        let ky = (row / kernel_w) % kernel_h;
                        let kx = row % kernel_w;
                        let source = &image[channel * height * width..][..height * width];
                        self.fill_column_row(
                            values,
                            source,
                            (height, width),
                            (ky, kx),
                            first_row,
                            out_w,
                        );
                    });
                // SAFETY: the band's outputs are rows first_row.. of each output channel's plane
                // (row stride `plane`), the weight is (out_channels x depth) and the columns
                // (depth x span), all row-major and in bounds.
                unsafe {
                    gemm::gemm(
                        out_channels,
                        span,
                        depth,
                        out.as_mut_ptr().add(first_row * out_w),
                        1,
                        plane as isize,
                        true,
                        weight.as_ptr(),
                        1,
                        depth as isize,
                        band.as_ptr(),
                        1,
                        span as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        parallelism,
                    );
                }
            }
        }
        Ok((
            CpuStorage::F32(output),
            Shape::from((batch, out_channels, out_h, out_w)),
        ))
    }
}

impl CpuConv2dOp {
    /// One im2col row: the input pixels that kernel tap (`ky`, `kx`) of one channel meets for
    /// output rows `first_row..` (zero where the tap falls in the padding).
    fn fill_column_row(
        &self,
        values: &mut [f32],
        source: &[f32],
        (height, width): (usize, usize),
        (ky, kx): (usize, usize),
        first_row: usize,
        out_w: usize,
    ) {
        for (offset, row_values) in values.chunks_mut(out_w).enumerate() {
            let in_y = ((first_row + offset) * self.stride + ky) as isize - self.padding as isize;
            if in_y < 0 || in_y >= height as isize {
                row_values.fill(0.0);
                continue;
            }
            let line = &source[in_y as usize * width..][..width];
            if self.stride == 1 {
                // Output x reads input x + kx - padding: one contiguous copy between zeros.
                let shift = kx as isize - self.padding as isize;
                let first = (-shift).clamp(0, out_w as isize) as usize;
                let last = (width as isize - shift).clamp(first as isize, out_w as isize) as usize;
                row_values[..first].fill(0.0);
                row_values[first..last].copy_from_slice(
                    &line[(first as isize + shift) as usize..(last as isize + shift) as usize],
                );
                row_values[last..].fill(0.0);
            } else {
                for (x, value) in row_values.iter_mut().enumerate() {
                    let in_x = (x * self.stride + kx) as isize - self.padding as isize;
                    *value = if in_x < 0 || in_x >= width as isize {
                        0.0
                    } else {
                        line[in_x as usize]
                    };
                }
            }
        }
    }
}

/// Attention on the CPU for contiguous f32 `(rows, tokens, head_dim)` queries, keys and values
/// (rows = batch x heads; no mask): for each row and block of queries, one GEMM for the scores,
/// softmax in place (a vectorisable `exp`), one GEMM for the output, each block a parallel task
/// whose scores fit in cache. candle's path made the scores in many small chunks, scaled and
/// normalised them in separate passes, with a scalar `exp`.
#[derive(Debug, Clone, Copy)]
pub struct CpuAttentionOp {
    /// Applied to the scores before the softmax (1 / sqrt(head_dim)).
    pub scale: f32,
}

/// Queries per task.
const ATTENTION_BLOCK: usize = 64;

impl CustomOp3 for CpuAttentionOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-attention"
    }

    fn cpu_fwd(
        &self,
        query: &CpuStorage,
        query_layout: &Layout,
        key: &CpuStorage,
        key_layout: &Layout,
        value: &CpuStorage,
        value_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous(query, query_layout, "the query")?;
        let k = contiguous(key, key_layout, "the key")?;
        let v = contiguous(value, value_layout, "the value")?;
        let (
            Ok(&[rows, query_len, dim]),
            Ok(&[key_rows, key_len, key_dim]),
            Ok(&[value_rows, value_len, value_dim]),
        ) = (
            <&[usize; 3]>::try_from(query_layout.shape().dims()),
            <&[usize; 3]>::try_from(key_layout.shape().dims()),
            <&[usize; 3]>::try_from(value_layout.shape().dims()),
        )
        else {
            candle_core::bail!("CPU attention: query, key and value must be 3-D");
        };
        if key_rows != rows || value_rows != rows || key_dim != dim || value_len != key_len {
            candle_core::bail!("CPU attention: shapes do not fit");
        }
        let mut output = vec![0f32; rows * query_len * value_dim];
        output
            .par_chunks_mut((query_len * value_dim).max(1))
            .enumerate()
            .for_each(|(row, row_out)| {
                let keys = &k[row * key_len * dim..][..key_len * dim];
                let values = &v[row * key_len * value_dim..][..key_len * value_dim];
                row_out
                    .par_chunks_mut(ATTENTION_BLOCK * value_dim)
                    .enumerate()
                    .for_each(|(block, out)| {
                        let first = row * query_len + block * ATTENTION_BLOCK;
                        let count = out.len() / value_dim;
                        let queries = &q[first * dim..][..count * dim];
                        self.block(queries, keys, values, out, (key_len, dim, value_dim));
                    });
            });
        Ok((
            CpuStorage::F32(output),
            Shape::from((rows, query_len, value_dim)),
        ))
    }
}

impl CpuAttentionOp {
    /// softmax(queries x keys^T x scale) x values for one block of queries, into `out`.
    fn block(
        &self,
        queries: &[f32],
        keys: &[f32],
        values: &[f32],
        out: &mut [f32],
        (key_len, dim, value_dim): (usize, usize, usize),
    ) {
        let count = queries.len() / dim;
        let mut scores = vec![0f32; count * key_len];
        // SAFETY: scores is (count x key_len), queries (count x dim) and keys (key_len x dim)
        // read transposed, all row-major and in bounds.
        unsafe {
            gemm::gemm(
                count,
                key_len,
                dim,
                scores.as_mut_ptr(),
                1,
                key_len as isize,
                false,
                queries.as_ptr(),
                1,
                dim as isize,
                keys.as_ptr(),
                dim as isize,
                1,
                0.0,
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        let mut sums = vec![0f32; count];
        for (row, sum) in scores.chunks_mut(key_len).zip(&mut sums) {
            let max = lanes_max(row);
            for score in row.iter_mut() {
                *score = exp_approx(*score - max);
            }
            *sum = lanes_sum(row);
        }
        // SAFETY: out is (count x value_dim), scores (count x key_len), values
        // (key_len x value_dim), all row-major and in bounds.
        unsafe {
            gemm::gemm(
                count,
                value_dim,
                key_len,
                out.as_mut_ptr(),
                1,
                value_dim as isize,
                false,
                scores.as_ptr(),
                1,
                key_len as isize,
                values.as_ptr(),
                1,
                value_dim as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (row, sum) in out.chunks_mut(value_dim).zip(&sums) {
            let inverse = 1.0 / sum;
            row.iter_mut().for_each(|value| *value *= inverse);
        }
    }
}

/// The largest value, eight lanes at a time (so that the compiler vectorises it).
fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(*value);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.into_iter().fold(tail, f32::max)
}

/// The sum, eight lanes at a time.
fn lanes_sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *lane += *value;
        }
    }
    chunks.remainder().iter().sum::<f32>() + lanes.iter().sum::<f32>()
}

/// e^x for x <= 0 (softmax after subtracting the maximum), within about 3e-7 relative: x split
/// into a whole multiple of ln 2 (rounded with the 1.5 x 2^23 trick, no `floor` call, so that
/// loops vectorise on plain SSE2) and a remainder within ln 2 / 2 whose e^f is a degree-7 Taylor
/// polynomial.
#[inline(always)]
fn exp_approx(x: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    // ln 2 in two parts (Cephes' C1 and C2): whole x C1 is exact, so the remainder keeps
    // x's precision however far from zero x is.
    const LN_2_HIGH: f32 = 0.693_359_4;
    const LN_2_LOW: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let whole = (x * std::f32::consts::LOG2_E + ROUNDER) - ROUNDER;
    let f = (x - whole * LN_2_HIGH) - whole * LN_2_LOW;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits(((whole as i32 + 127) << 23) as u32)
}
