//! Operations for the CPU where candle's general ones make several passes over memory.
//!
//! GroupNorm (with the SiLU that usually follows it) was candle's slowest CPU operation per
//! element: mean, centring, variance, scaling and the activation each read and wrote the whole
//! tensor. Here each (image, group) is one task: one pass for the statistics, one for the
//! normalised, scaled and activated output. Convolutions build their im2col columns from
//! contiguous input rows and run one GEMM per band straight into NCHW ([`CpuConv2dOp`]);
//! attention runs per head and block of queries with its softmax in place ([`CpuAttentionOp`]);
//! GEGLU is one pass with a vectorisable erf ([`CpuGegluOp`]); linear layers are one GEMM over
//! every input row on top of the bias ([`CpuLinearOp`]).

pub use attention::CpuAttentionOp;
pub use conv::CpuConv2dOp;
pub use geglu::CpuGegluOp;
pub use linear::CpuLinearOp;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

/// Defines `$name`, which runs the `#[inline(always)]` function `$portable` compiled for
/// AVX-512 or AVX2 + FMA when the CPU has them (checked at run time; std caches the answer), so
/// that its loops vectorise 16 or 8 lanes wide instead of the baseline's 4.
macro_rules! vectorised {
    ($(#[$doc:meta])* fn $name:ident = $portable:ident ($($arg:ident: $ty:ty),*)) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    $portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            $portable($($arg),*)
        }
    };
}
pub(crate) use vectorised;

mod attention;
mod conv;
mod geglu;
mod linear;
mod winograd;

/// Makes the C allocator keep freed memory for reuse instead of handing it back to the kernel.
///
/// glibc serves blocks above its mmap threshold (128 KiB, rising to at most 32 MiB) with fresh
/// mappings and unmaps them on free, so every large activation and im2col buffer of a CPU step
/// came back as new pages, faulted in and zeroed by the kernel: a quarter of a UNet step's time
/// on this project's 2-core test machine (SD 1.5 512x512 f32, one run each: UNet step 8.5 s ->
/// 6.4 s, VAE decode 12.6 s -> 9.4 s with this). The heap is trimmed when more than 1 GiB is free
/// at its top. Call once, early; a no-op where the C library is not glibc.
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

/// How the `gemm` crate may split one GEMM: over candle's CPU threads when there are several.
pub(super) fn gemm_parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        threads if threads > 1 => gemm::Parallelism::Rayon(threads),
        _ => gemm::Parallelism::None,
    }
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
                let channels =
                    (index % groups) * group_channels..(index % groups + 1) * group_channels;
                let affine = (&weight[channels.clone()], &bias[channels]);
                normalise_group(out, xs, affine, spatial, eps, silu);
            });
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }
}

vectorised! {
    /// One (image, group) of GroupNorm: `xs` (the group's channels of `spatial` values each)
    /// normalised by its mean and variance, scaled and shifted by `affine` (the channels' weight
    /// and bias), then SiLU when `silu`, into `out`.
    fn normalise_group = normalise_group_portable(
        out: &mut [f32],
        xs: &[f32],
        affine: (&[f32], &[f32]),
        spatial: usize,
        eps: f64,
        silu: bool
    )
}

#[inline(always)]
fn normalise_group_portable(
    out: &mut [f32],
    xs: &[f32],
    (weight, bias): (&[f32], &[f32]),
    spatial: usize,
    eps: f64,
    silu: bool,
) {
    // f64 partial sums in lanes: vectorised, and accurate over a whole group.
    const LANES: usize = 8;
    let (mut sums, mut squares) = ([0f64; LANES], [0f64; LANES]);
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for ((sum, square), &v) in sums.iter_mut().zip(&mut squares).zip(chunk) {
            let v = v as f64;
            *sum += v;
            *square += v * v;
        }
    }
    let (mut sum, mut sum_sq) = (sums.iter().sum::<f64>(), squares.iter().sum::<f64>());
    for &v in chunks.remainder() {
        sum += v as f64;
        sum_sq += v as f64 * v as f64;
    }
    let count = xs.len() as f64;
    let mean = sum / count;
    let variance = (sum_sq / count - mean * mean).max(0.0);
    let inverse = 1.0 / (variance + eps).sqrt();
    for (c, (&weight, &bias)) in weight.iter().zip(bias).enumerate() {
        let scale = weight as f64 * inverse;
        let shift = bias as f64 - mean * scale;
        let (scale, shift) = (scale as f32, shift as f32);
        let range = c * spatial..(c + 1) * spatial;
        let (out, xs) = (&mut out[range.clone()], &xs[range]);
        if silu {
            for (o, &v) in out.iter_mut().zip(xs) {
                let y = v * scale + shift;
                *o = y / (1.0 + attention::exp_approx(-y));
            }
        } else {
            for (o, &v) in out.iter_mut().zip(xs) {
                *o = v * scale + shift;
            }
        }
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
