//! Behaviour of candle that the engine works around; if one of these starts failing, candle
#![allow(clippy::unwrap_used)] // tests fail loudly by design
//! changed and the workaround can go.

use candle_core::{Device, Module, Tensor};

/// candle-nn 0.11's `Linear` gives wrong results for a batched input with transposed strides;
/// `atelier::engine::nn::Linear` makes such inputs contiguous first.
#[test]
fn candle_linear_mishandles_transposed_batches() {
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 1., (2, 8, 5), &device).unwrap();
    let transposed = x.transpose(1, 2).unwrap();
    let weight = Tensor::randn(0f32, 1., (3, 8), &device).unwrap();
    let candle_linear = candle_nn::Linear::new(weight, None);
    let on_strided = candle_linear.forward(&transposed).unwrap();
    let on_contiguous = candle_linear
        .forward(&transposed.contiguous().unwrap())
        .unwrap();
    let diff: f32 = (on_strided - on_contiguous)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(
        diff > 1e-3,
        "candle's Linear now handles strided batches (diff {diff})"
    );
}
