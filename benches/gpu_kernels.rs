//! Times Atelier's CUDA kernels (flash attention, convolutions by each route, GroupNorm + SiLU)
//! at the shapes where SD 1.5, SD 2.1 768-v, SDXL and the VAE spend their time, and prints each
//! one's time and throughput; `scripts/bench_kernels_torch.py` times PyTorch's operations (SDPA, cuDNN) at the
//! same shapes, so that one device call compares the two:
//!     cargo bench --features cuda,slim --bench gpu_kernels
//! Needs a CUDA GPU; f16 throughout.
#![allow(clippy::unwrap_used, clippy::print_stdout)] // a measuring tool: failing loudly is the point

use std::time::Instant;

use atelier::engine::cuda::{ConvRoute, force_convolution_route};
use atelier::engine::fused::{Conv2d, GroupNorm};
use atelier::engine::nn::{Activation, attention};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

const DTYPE: DType = DType::F16;

/// Median wall time of `runs` synchronised calls of `f`, in milliseconds, after two warm-ups.
fn time_ms(device: &Device, runs: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    for _ in 0..2 {
        f();
    }
    device.synchronize().unwrap();
    let mut times: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let out = f();
            device.synchronize().unwrap();
            drop(out);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[runs / 2]
}

/// Mean time of one call of `f` over `runs` calls enqueued back to back (one synchronisation at
/// the end), in milliseconds, after two warm-ups: for operations short enough that a
/// synchronisation per call would dominate.
fn time_back_to_back_ms(device: &Device, runs: usize, mut f: impl FnMut() -> Tensor) -> f64 {
    for _ in 0..2 {
        f();
    }
    device.synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..runs {
        f();
    }
    device.synchronize().unwrap();
    start.elapsed().as_secs_f64() * 1e3 / runs as f64
}

fn randn(shape: &[usize], device: &Device) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, device)
        .unwrap()
        .to_dtype(DTYPE)
        .unwrap()
}

fn main() {
    let device = Device::new_cuda(0).expect("a CUDA GPU and a cuda build");
    // As the engine opens it: freed memory stays in the pool, as PyTorch's allocator keeps it.
    if let Device::Cuda(cuda) = &device {
        atelier::engine::cuda::keep_freed_memory(cuda).unwrap();
    }
    println!(
        "cuDNN convolutions: {}",
        atelier::engine::cuda::cudnn_available()
    );
    println!("kind,shape,ms,tflops");
    // (label, batch, query tokens, key tokens, heads, head width)
    let attention_cases = [
        ("sd15 self 64x64", 2, 4096, 4096, 8, 40),
        ("sd15 cross 64x64", 2, 4096, 77, 8, 40),
        ("sd15 self 32x32", 2, 1024, 1024, 8, 80),
        ("sd21 self 96x96", 2, 9216, 9216, 5, 64),
        ("sd21 self 48x48", 2, 2304, 2304, 10, 64),
        ("sdxl self 64x64", 2, 4096, 4096, 10, 64),
        ("sdxl self 32x32", 2, 1024, 1024, 20, 64),
        ("sdxl cross 32x32", 2, 1024, 77, 20, 64),
        ("vae mid 64x64", 1, 4096, 4096, 1, 512),
    ];
    for (label, batch, nq, nk, heads, head_dim) in attention_cases {
        let width = heads * head_dim;
        let q = randn(&[batch, nq, width], &device);
        let k = randn(&[batch, nk, width], &device);
        let v = randn(&[batch, nk, width], &device);
        let ms = time_ms(&device, 20, || {
            attention(&q, &k, &v, heads, false, None).unwrap()
        });
        let flops = 4.0 * (batch * heads * nq * nk * head_dim) as f64;
        println!("attention,{label},{ms:.3},{:.1}", flops / ms / 1e9);
    }
    // (label, rows, in, out, bias): SDXL's and SD 2.1's projections with guidance (batch 2).
    let linear_cases = [
        ("sdxl 32x32 qkv", 2048, 1280, 3840, false),
        ("sdxl 32x32 out", 2048, 1280, 1280, true),
        ("sdxl 32x32 ff in", 2048, 1280, 10240, true),
        ("sdxl 32x32 ff out", 2048, 5120, 1280, true),
        ("sdxl 64x64 qkv", 8192, 640, 1920, false),
        ("sdxl 64x64 out", 8192, 640, 640, true),
        ("sdxl 64x64 ff in", 8192, 640, 5120, true),
        ("sdxl 64x64 ff out", 8192, 2560, 640, true),
        ("sd21 96x96 qkv", 18432, 320, 960, false),
        ("sd21 96x96 out", 18432, 320, 320, true),
        ("sd21 96x96 ff in", 18432, 320, 2560, true),
        ("sd21 96x96 ff out", 18432, 1280, 320, true),
    ];
    for (label, rows, in_dim, out_dim, bias) in linear_cases {
        let mut tensors = vec![(
            "weight".to_string(),
            (randn(&[out_dim, in_dim], &device) * 0.02).unwrap(),
        )];
        if bias {
            tensors.push(("bias".to_string(), randn(&[out_dim], &device)));
        }
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DTYPE, &device);
        let layer = atelier::engine::nn::linear(in_dim, out_dim, bias, vb).unwrap();
        let x = randn(&[rows, in_dim], &device);
        let ms = time_back_to_back_ms(&device, 50, || layer.forward(&x).unwrap());
        let flops = 2.0 * (rows * in_dim * out_dim) as f64;
        println!("linear,{label},{ms:.4},{:.1}", flops / ms / 1e9);
    }
    // (label, batch, in, out, side, kernel)
    let conv_cases = [
        ("vae 512ch 64px", 1, 512, 512, 64, 3),
        ("vae 512ch 128px", 1, 512, 512, 128, 3),
        ("vae 512ch 256px", 1, 512, 512, 256, 3),
        ("vae 512->256 256px", 1, 512, 256, 256, 3),
        ("vae 256ch 256px", 1, 256, 256, 256, 3),
        ("vae 256ch 512px", 1, 256, 256, 512, 3),
        ("vae 256->128 512px", 1, 256, 128, 512, 3),
        ("vae 128ch 512px", 1, 128, 128, 512, 3),
        ("unet 320ch 64px", 2, 320, 320, 64, 3),
        ("unet 640ch 64px", 2, 640, 640, 64, 3),
        ("unet 1280ch 32px", 2, 1280, 1280, 32, 3),
    ];
    for (label, batch, cin, cout, side, kernel) in conv_cases {
        let vb = VarBuilder::from_tensors(
            [
                (
                    "weight".to_string(),
                    (randn(&[cout, cin, kernel, kernel], &device) * 0.02).unwrap(),
                ),
                ("bias".to_string(), randn(&[cout], &device)),
            ]
            .into_iter()
            .collect(),
            DTYPE,
            &device,
        );
        let conv = Conv2d::new(cin, cout, kernel, 1, vb).unwrap();
        let x = randn(&[batch, cin, side, side], &device);
        let flops = 2.0 * (batch * cin * cout * kernel * kernel * side * side) as f64;
        // The engine's choice, then each route forced.
        for route in [ConvRoute::Fastest, ConvRoute::Im2col, ConvRoute::Cudnn] {
            force_convolution_route(route);
            let ms = time_ms(&device, 10, || conv.forward(&x).unwrap());
            println!("conv {route:?},{label},{ms:.3},{:.1}", flops / ms / 1e9);
        }
        force_convolution_route(ConvRoute::Fastest);
    }
    // (label, batch, channels, side)
    for (label, batch, channels, side) in [
        ("vae 128ch 512px", 1, 128, 512),
        ("vae 256ch 256px", 1, 256, 256),
        ("unet 320ch 64px", 2, 320, 64),
    ] {
        let vb = VarBuilder::from_tensors(
            [
                ("weight".to_string(), randn(&[channels], &device)),
                ("bias".to_string(), randn(&[channels], &device)),
            ]
            .into_iter()
            .collect(),
            DTYPE,
            &device,
        );
        let norm = GroupNorm::new(32, channels, 1e-6, vb).unwrap();
        let x = randn(&[batch, channels, side, side], &device);
        let ms = time_ms(&device, 20, || {
            norm.forward_then(&x, Activation::Silu).unwrap()
        });
        let bytes = 2.0 * 2.0 * (batch * channels * side * side) as f64;
        println!(
            "group_norm_silu,{label},{ms:.3},{:.0} GB/s",
            bytes / ms / 1e6
        );
    }
}
