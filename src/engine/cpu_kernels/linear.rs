//! Linear layers on the CPU: one GEMM over every row of the input, on top of the bias.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous;

/// `x W^T (+ bias)` for a contiguous f32 input `(..., in)` and weight `(out, in)`: the input's
/// leading dimensions are one GEMM's rows, read with the weight's strides as it is stored, and
/// the output starts as the bias. candle's `Linear` broadcasts the weight over the batch, runs a
/// GEMM per batch item and adds the bias in another pass. Timed once (code not kept) on this
/// project's 2-core machine: SD 1.5's 320 -> 2560 projection at 64x64 latents (batch 2) took
/// 84 ms there and 35 ms here (~380 GFLOP/s; the `gemm` crate's speed on plain matrices is
/// 430-450); inside a UNet step the layers' sum went from 1.35 to 1.30 s (medians of three
/// alternating runs: less than the machine's noise).
/// As a [`CustomOp2`] without bias, as a [`CustomOp3`] with one of `out` values.
#[derive(Debug, Clone, Copy)]
pub struct CpuLinearOp;

/// Output rows whose bias one task writes.
const BIAS_ROWS_PER_TASK: usize = 64;

impl CpuLinearOp {
    fn run(
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let input = contiguous(xs, xs_layout, "the input")?;
        let weight = contiguous(weight, weight_layout, "the weight")?;
        let Ok(&[out_dim, in_dim]) = <&[usize; 2]>::try_from(weight_layout.shape().dims()) else {
            candle_core::bail!("CPU linear: the weight must be 2-D");
        };
        let dims = xs_layout.shape().dims();
        let Some((&last, leading)) = dims.split_last() else {
            candle_core::bail!("CPU linear: the input needs at least one dimension");
        };
        if last != in_dim || bias.is_some_and(|bias| bias.len() != out_dim) {
            candle_core::bail!(
                "CPU linear: weight {:?} and bias of {:?} do not fit input {dims:?}",
                weight_layout.shape().dims(),
                bias.map(<[f32]>::len)
            );
        }
        let rows: usize = leading.iter().product();
        let mut output = vec![0f32; rows * out_dim];
        let mut out_dims = leading.to_vec();
        out_dims.push(out_dim);
        if let Some(bias) = bias {
            output
                .par_chunks_mut((BIAS_ROWS_PER_TASK * out_dim).max(1))
                .for_each(|rows| {
                    rows.chunks_mut(out_dim.max(1))
                        .for_each(|row| row.copy_from_slice(bias))
                });
        }
        if rows == 0 || out_dim == 0 || in_dim == 0 {
            return Ok((CpuStorage::F32(output), Shape::from(out_dims)));
        }
        let parallelism = super::gemm_parallelism();
        // SAFETY: output is (rows x out_dim), input (rows x in_dim) and weight (out_dim x
        // in_dim), read transposed as (in_dim x out_dim), all row-major and in bounds.
        unsafe {
            gemm::gemm(
                rows,
                out_dim,
                in_dim,
                output.as_mut_ptr(),
                1,
                out_dim as isize,
                bias.is_some(),
                input.as_ptr(),
                1,
                in_dim as isize,
                weight.as_ptr(),
                in_dim as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok((CpuStorage::F32(output), Shape::from(out_dims)))
    }
}

impl CustomOp2 for CpuLinearOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Self::run(xs, xs_layout, weight, weight_layout, None)
    }
}

impl CustomOp3 for CpuLinearOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-linear-bias"
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
        let bias = contiguous(bias, bias_layout, "the bias")?;
        Self::run(xs, xs_layout, weight, weight_layout, Some(bias))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn linear_matches_candles() {
        let device = Device::Cpu;
        let pattern = |dims: &[usize], phase: f64| {
            let count: usize = dims.iter().product();
            (Tensor::arange(0f32, count as f32, &device)
                .unwrap()
                .reshape(dims)
                .unwrap()
                .affine(0.377, phase)
                .unwrap()
                .sin()
                .unwrap()
                * 2.0)
                .unwrap()
        };
        // 2-, 3- and 4-D inputs, sizes that fill no vector evenly, one row, no rows.
        for (input, out_dim) in [
            (vec![5, 7], 3),
            (vec![2, 33, 20], 17),
            (vec![2, 3, 4, 9], 65),
            (vec![1, 1, 64], 1),
            (vec![2, 0, 8], 4),
        ] {
            let xs = pattern(&input, 0.3);
            let in_dim = *input.last().unwrap();
            let weight = pattern(&[out_dim, in_dim], 1.1);
            let bias = pattern(&[out_dim], 2.0);
            for with_bias in [false, true] {
                let ours = if with_bias {
                    xs.apply_op3_no_bwd(&weight, &bias, &CpuLinearOp).unwrap()
                } else {
                    xs.apply_op2_no_bwd(&weight, &CpuLinearOp).unwrap()
                };
                let mut out_dims = input.clone();
                *out_dims.last_mut().unwrap() = out_dim;
                assert_eq!(ours.dims(), out_dims);
                if xs.elem_count() == 0 {
                    continue; // candle's Linear refuses what has no rows
                }
                let reference =
                    candle_nn::Linear::new(weight.clone(), with_bias.then(|| bias.clone()));
                let expected = reference.forward(&xs).unwrap();
                let difference = crate::engine::test_support::max_abs_difference(&ours, &expected);
                assert!(difference < 1e-5, "{input:?} -> {out_dim}: {difference}");
            }
        }
    }

    #[test]
    fn a_weight_that_does_not_fit_is_an_error() {
        let device = Device::Cpu;
        let xs = Tensor::zeros((2, 5), candle_core::DType::F32, &device).unwrap();
        let weight = Tensor::zeros((3, 4), candle_core::DType::F32, &device).unwrap();
        let bias = Tensor::zeros(2, candle_core::DType::F32, &device).unwrap();
        assert!(xs.apply_op2_no_bwd(&weight, &CpuLinearOp).is_err());
        let weight = Tensor::zeros((3, 5), candle_core::DType::F32, &device).unwrap();
        assert!(xs.apply_op3_no_bwd(&weight, &bias, &CpuLinearOp).is_err());
    }
}
