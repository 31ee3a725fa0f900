//! GEGLU on the CPU: `hidden * gelu(gate)` in one pass, with a vectorisable exact-erf GELU.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::attention::exp_approx;
use super::contiguous;

/// diffusers' GEGLU on a contiguous f32 tensor whose last dimension holds `[hidden | gate]`:
/// `hidden * gelu(gate)` with the exact (erf) GELU, one parallel task per row. candle's path
/// took the two halves as strided views, ran a scalar `erf` per element and multiplied in
/// another pass (0.42 s of an SD 1.5 UNet step on two cores).
#[derive(Debug, Clone, Copy)]
pub struct CpuGegluOp;

impl CustomOp1 for CpuGegluOp {
    fn name(&self) -> &'static str {
        "atelier-cpu-geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let values = contiguous(storage, layout, "the GEGLU input")?;
        let dims = layout.shape().dims();
        let width = dims.last().copied().unwrap_or(0);
        if width == 0 || !width.is_multiple_of(2) {
            candle_core::bail!("CPU GEGLU: the last dimension of {dims:?} must be even");
        }
        let half = width / 2;
        let mut out = vec![0f32; values.len() / 2];
        out.par_chunks_mut(half)
            .zip(values.par_chunks(width))
            .for_each(|(out, row)| geglu_row(out, row));
        let mut out_dims = dims.to_vec();
        if let Some(last) = out_dims.last_mut() {
            *last = half;
        }
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

super::vectorised! {
    /// `out = hidden * gelu(gate)` for one row `[hidden | gate]`.
    fn geglu_row = geglu_row_portable(out: &mut [f32], row: &[f32])
}

#[inline(always)]
fn geglu_row_portable(out: &mut [f32], row: &[f32]) {
    let (hidden, gate) = row.split_at(out.len());
    for ((out, &hidden), &gate) in out.iter_mut().zip(hidden).zip(gate) {
        *out = hidden * gelu(gate);
    }
}

/// `x * Phi(x)`, the exact GELU, through [`erf`].
#[inline(always)]
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// erf(x) within 5e-7 in f32 (Abramowitz and Stegun 7.1.26: 1.5e-7, plus rounding), branch-free
/// so that loops vectorise:
/// `1 - t (a1 + t (a2 + ...)) e^(-x^2)` with `t = 1 / (1 + p |x|)`, given x's sign.
#[inline(always)]
fn erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let magnitude = x.abs();
    let t = 1.0 / (1.0 + P * magnitude);
    let polynomial = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    (1.0 - polynomial * exp_approx(-magnitude * magnitude)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::test_support::max_abs_difference;
    use candle_core::{D, Device, Tensor};

    /// erf by its Taylor series in f64 (exact to ~1e-11 for |x| <= 4; beyond, its terms cancel
    /// too much, and erf is 1 within 2e-8 anyway).
    fn erf_series(x: f64) -> f64 {
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    #[test]
    fn erf_is_within_its_bound() {
        let mut worst = 0f64;
        for step in -6000..=6000 {
            let x = step as f32 * 0.001;
            let exact = match x.abs() <= 4.0 {
                true => erf_series(x as f64),
                false => (x as f64).signum(),
            };
            worst = worst.max((erf(x) as f64 - exact).abs());
        }
        assert!(worst < 6e-7, "worst error {worst}");
        assert_eq!(erf(20.0), 1.0);
        assert_eq!(erf(-20.0), -1.0);
    }

    #[test]
    fn geglu_matches_candles_operations() {
        let projected =
            (Tensor::randn(0f32, 2.0, (2, 3, 64), &Device::Cpu).unwrap() - 0.5).unwrap();
        let ours = projected.apply_op1_no_bwd(&CpuGegluOp).unwrap();
        let hidden = projected.narrow(D::Minus1, 0, 32).unwrap();
        let gate = projected.narrow(D::Minus1, 32, 32).unwrap();
        let reference = (hidden * gate.gelu_erf().unwrap()).unwrap();
        assert_eq!(ours.dims(), &[2, 3, 32]);
        let difference = max_abs_difference(&ours, &reference);
        assert!(difference < 2e-6, "max difference {difference}");
    }

    #[test]
    fn an_odd_width_is_refused() {
        let odd = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(odd.apply_op1_no_bwd(&CpuGegluOp).is_err());
    }
}
