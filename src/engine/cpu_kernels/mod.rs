//! Operations for the CPU where candle's general ones make several passes over memory.
//!
//! GroupNorm (with the SiLU that usually follows it) was candle's slowest CPU operation per
//! element: mean, centring, variance, scaling and the activation each read and wrote the whole
//! tensor. Here each (image, group) is one task: one pass for the statistics, one for the
//! normalised, scaled and activated output. Convolutions build their im2col columns from
//! contiguous input rows and run one GEMM per band straight into NCHW ([`CpuConv2dOp`]);
//! attention runs per head and block of queries with its softmax in place ([`CpuAttentionOp`]).

mod attention;
mod conv;

pub use attention::CpuAttentionOp;
pub use conv::CpuConv2dOp;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Makes the C allocator keep freed memory for reuse instead of handing it back to the kernel.
///
/// glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings and unmaps
/// them on free, so every large activation and im2col buffer of a CPU step came back as new
/// pages, faulted in and zeroed by the kernel: a quarter of a UNet step's time on this project's
/// 2-core test machine (SD 1.5 512x512 f32: 8.5 s -> 6.4 s, VAE decode 12.6 s -> 9.4 s without
/// it). The heap is trimmed when more than 1 GiB is free at its top. Call once, early; a no-op
/// where the C library is not glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tuning; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

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

pub(super) fn contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
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
            let difference = crate::engine::test_support::max_abs_difference(&ours, &expected);
            assert!(difference < 1e-5, "silu {silu}: {difference}");
        }
    }
}
