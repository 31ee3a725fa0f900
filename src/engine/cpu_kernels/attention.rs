//! Attention on the CPU: per head and block of queries, the softmax in place.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous;

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
        softmax_rows(&mut scores, key_len, &mut sums);
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

super::vectorised! {
    /// Each row of `scores` (rows of `width`) replaced by e^(score - the row's maximum), and
    /// its sum into `sums` (the softmax, unnormalised).
    fn softmax_rows = softmax_rows_portable(scores: &mut [f32], width: usize, sums: &mut [f32])
}

#[inline(always)]
fn softmax_rows_portable(scores: &mut [f32], width: usize, sums: &mut [f32]) {
    for (row, sum) in scores.chunks_mut(width).zip(sums) {
        let max = lanes_max(row);
        *sum = exp_and_sum(row, max);
    }
}

/// Lanes of the partial maxima and sums: as wide as AVX-512's registers.
const LANES: usize = 16;

/// The largest value, [`LANES`] at a time (so that the compiler vectorises it).
#[inline(always)]
fn lanes_max(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            // A comparison rather than `f32::max`, whose NaN rule costs a compare and a blend
            // per vector (a NaN score makes a NaN row either way).
            if *value > *lane {
                *lane = *value;
            }
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.into_iter().fold(tail, f32::max)
}

/// Each value replaced by e^(value - max), and their sum, [`LANES`] at a time in one pass.
#[inline(always)]
fn exp_and_sum(values: &mut [f32], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (lane, value) in lanes.iter_mut().zip(chunk) {
            *value = exp_approx(*value - max);
            *lane += *value;
        }
    }
    let mut tail = 0.0;
    for value in chunks.into_remainder() {
        *value = exp_approx(*value - max);
        tail += *value;
    }
    tail + lanes.iter().sum::<f32>()
}

/// e^x for x in [-87, 88] (clamped there), within about 3e-7 relative: x split into a whole
/// multiple of ln 2 (rounded with the 1.5 x 2^23 trick, no `floor` call, so that loops vectorise
/// on plain SSE2) and a remainder within ln 2 / 2 whose e^f is a degree-7 Taylor polynomial.
/// The whole multiple's bits come from the rounded sum's rather than a cast: `as i32` saturates,
/// which the compiler did one lane at a time (the softmax ran at half its speed).
#[inline(always)]
pub(super) fn exp_approx(x: f32) -> f32 {
    const ROUNDER: f32 = 12_582_912.0;
    // ln 2 in two parts (Cephes' C1 and C2): whole x C1 is exact, so the remainder keeps
    // x's precision however far from zero x is.
    const LN_2_HIGH: f32 = 0.693_359_4;
    const LN_2_LOW: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let rounded = x * std::f32::consts::LOG2_E + ROUNDER;
    let whole = rounded - ROUNDER;
    // From 2^23 to 2^24 the floats are the integers, one bit pattern apart: the difference of
    // the bits is the whole multiple (-126 to 127 here), in two's complement.
    let whole_bits = rounded.to_bits().wrapping_sub(ROUNDER.to_bits());
    let f = (x - whole * LN_2_HIGH) - whole * LN_2_LOW;
    let p = 1.0
        + f * (1.0
            + f * (0.5
                + f * (1.0 / 6.0
                    + f * (1.0 / 24.0
                        + f * (1.0 / 120.0 + f * (1.0 / 720.0 + f * (1.0 / 5040.0)))))));
    p * f32::from_bits(whole_bits.wrapping_add(127) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn fast_exp_is_exact_to_float_precision() {
        let mut worst = 0f64;
        for step in 0..200_000 {
            let x = (step as f32 - 100_000.0) * 0.0008;
            let exact = (x as f64).exp();
            let relative = ((exp_approx(x) as f64) - exact).abs() / exact;
            worst = worst.max(relative);
        }
        assert!(worst < 5e-7, "{worst}");
        assert_eq!(exp_approx(0.0), 1.0);
        assert!(exp_approx(-200.0) < 1e-37);
        assert!(exp_approx(200.0).is_finite() && exp_approx(200.0) > 1e38);
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
            let difference = crate::engine::test_support::max_abs_difference(&ours, &reference);
            assert!(
                difference < 1e-5,
                "{rows}x{query_len}x{key_len}x{dim}: {difference}"
            );
        }
    }
}
