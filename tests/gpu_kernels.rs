//! Atelier's CUDA kernels (flash attention, GroupNorm+SiLU, convolution with bias, residual and
//! per-channel bias, GEGLU, linear layers onto a residual, LayerNorm, token transposes, 2x
//! upsampling) against the same operations computed by candle on the CPU in f32, at the shapes of
//! SD 1.5 and SDXL. GPU-only, so ignored by default: run them with `ATELIER_TEST_DEVICE=cuda` in a
//! `cuda` build and `--include-ignored` (scripts/gpu-checks.sh does).
#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use atelier::engine::fused::{Conv2d, GroupNorm, geglu};
use atelier::engine::nn::{Activation, attention};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::*;

/// f16 inputs and outputs against an f32 reference: a few f16 roundings.
const F16_TOLERANCE: f64 = 4e-3;
/// f32 kernels against candle's f32: summation order only (TF32 is off).
const F32_TOLERANCE: f64 = 1e-5;

fn random(shape: &[usize], seed: u64) -> Tensor {
    // A cheap deterministic generator: the values only need to be varied, not Gaussian.
    let count: usize = shape.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The test device in `dtype`, and the CPU f32 reference of the same (rounded) values.
fn on_both(t: &Tensor, dtype: DType) -> (Tensor, Tensor) {
    let device = test_device();
    let ours = t.to_dtype(dtype).unwrap().to_device(&device).unwrap();
    let reference = ours
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    (ours, reference)
}

fn dtypes() -> Vec<(DType, f64)> {
    assert!(
        test_device().is_cuda(),
        "these tests compare the CUDA kernels: set ATELIER_TEST_DEVICE=cuda"
    );
    vec![(DType::F32, F32_TOLERANCE), (DType::F16, F16_TOLERANCE)]
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn flash_attention_matches_reference() {
    // (batch, query tokens, key tokens, heads, head width): SD 1.5's levels (head widths 40, 80,
    // 160, self- and cross-attention), SDXL's 64, lengths that are not multiples of 64, and the
    // VAE's. On a compute capability 9.0 GPU the 64-wide heads take the Hopper kernel;
    // scripts/gpu-checks.sh runs this again with ATELIER_HOPPER_ATTENTION=0 for the portable one.
    let cases = [
        (2, 4096, 4096, 8, 40),
        (2, 4096, 77, 8, 40),
        (2, 1024, 1024, 8, 80),
        (2, 256, 77, 8, 160),
        (2, 1024, 1024, 10, 64),
        (1, 1000, 333, 2, 64),
        (2, 2100, 1090, 3, 64),
        (1, 4100, 77, 5, 64),
        (3, 70, 5, 1, 8),
        // The VAE's single 512-wide head: too wide for the kernel, f32 scores from one GEMM.
        (1, 1024, 1024, 1, 512),
    ];
    // The 64-wide cases test the Hopper kernel wherever it should run, not the portable one.
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = test_device() {
        use atelier::engine::cuda::{FlashAttentionOp, hopper_attention_built};
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let context = cuda.cuda_stream().context().clone();
        let capability = (
            context.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            context.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        let wanted = hopper_attention_built()
            && matches!(capability, (Ok(9), Ok(0)))
            && std::env::var("ATELIER_HOPPER_ATTENTION").map_or(true, |value| value != "0");
        assert_eq!(
            FlashAttentionOp::uses_hopper_kernel(&cuda),
            wanted,
            "Hopper attention kernel in use on compute capability {capability:?}"
        );
    }
    for (seed, &(batch, nq, nk, heads, head_dim)) in cases.iter().enumerate() {
        let width = heads * head_dim;
        let q = random(&[batch, nq, width], seed as u64 * 3);
        let k = random(&[batch, nk, width], seed as u64 * 3 + 1);
        let v = random(&[batch, nk, width], seed as u64 * 3 + 2);
        for (dtype, tolerance) in dtypes() {
            let (q, q_ref) = on_both(&q, dtype);
            let (k, k_ref) = on_both(&k, dtype);
            let (v, v_ref) = on_both(&v, dtype);
            let ours = attention(&q, &k, &v, heads, false, None).unwrap();
            let reference = attention(&q_ref, &k_ref, &v_ref, heads, true, None).unwrap();
            assert_close(
                &format!("attention {batch}x{nq}x{nk} heads {heads}x{head_dim} {dtype:?}"),
                &ours,
                &reference,
                tolerance,
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn flash_attention_reads_strided_projections() {
    // q, k and v as column ranges of one (batch, tokens, 3 * width) projection.
    let (batch, tokens, heads, head_dim) = (2, 300, 4, 64);
    let width = heads * head_dim;
    let qkv = random(&[batch, tokens, 3 * width], 99);
    for (dtype, tolerance) in dtypes() {
        let (qkv, qkv_ref) = on_both(&qkv, dtype);
        let split = |t: &Tensor, i: usize| t.narrow(2, i * width, width).unwrap();
        let ours = attention(
            &split(&qkv, 0),
            &split(&qkv, 1),
            &split(&qkv, 2),
            heads,
            false,
            None,
        )
        .unwrap();
        let reference = attention(
            &split(&qkv_ref, 0).contiguous().unwrap(),
            &split(&qkv_ref, 1).contiguous().unwrap(),
            &split(&qkv_ref, 2).contiguous().unwrap(),
            heads,
            true,
            None,
        )
        .unwrap();
        assert_close(
            &format!("strided attention {dtype:?}"),
            &ours,
            &reference,
            tolerance,
        );
    }
}

fn var_builder(tensors: Vec<(&str, Tensor)>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    let map: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| (name.to_string(), t))
        .collect();
    VarBuilder::from_tensors(map, dtype, device)
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn group_norm_and_silu_match_reference() {
    // (batch, channels, height, width, groups): SD 1.5's first level, its 8x8 level, a VAE level.
    let cases = [
        (2, 320, 64, 64, 32),
        (2, 1280, 8, 8, 32),
        (1, 128, 96, 80, 32),
        (2, 6, 5, 3, 3),
    ];
    for (seed, &(batch, channels, height, width, groups)) in cases.iter().enumerate() {
        let x = random(&[batch, channels, height, width], seed as u64)
            .affine(3.0, 0.5)
            .unwrap();
        let weight = random(&[channels], 100 + seed as u64);
        let bias = random(&[channels], 200 + seed as u64);
        for (dtype, tolerance) in dtypes() {
            let (x, x_ref) = on_both(&x, dtype);
            let (w, w_ref) = on_both(&weight, dtype);
            let (b, b_ref) = on_both(&bias, dtype);
            let ours = GroupNorm::new(
                groups,
                channels,
                1e-5,
                var_builder(vec![("weight", w), ("bias", b)], dtype, &test_device()),
            )
            .unwrap();
            let reference = GroupNorm::new(
                groups,
                channels,
                1e-5,
                var_builder(
                    vec![("weight", w_ref), ("bias", b_ref)],
                    DType::F32,
                    &Device::Cpu,
                ),
            )
            .unwrap();
            for activation in [None, Some(Activation::Silu)] {
                let (out, want) = match activation {
                    None => (
                        ours.forward(&x).unwrap(),
                        reference.forward(&x_ref).unwrap(),
                    ),
                    Some(act) => (
                        ours.forward_then(&x, act).unwrap(),
                        reference.forward_then(&x_ref, act).unwrap(),
                    ),
                };
                assert_close(
                    &format!(
                        "group norm {batch}x{channels}x{height}x{width} {activation:?} {dtype:?}"
                    ),
                    &out,
                    &want,
                    tolerance,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn convolutions_match_reference() {
    // (batch, in, out, size, kernel, stride, residual): 3x3 and 1x1 at SD 1.5's levels, a strided
    // downsampler, odd sizes, rows of whole 8-pixel groups (the f16 im2col's 16-byte stores) and
    // not, and the residual folded into the output.
    let cases = [
        (2, 320, 320, 64, 3, 1, true),
        (2, 4, 320, 64, 3, 1, false),
        (2, 640, 1280, 16, 1, 1, true),
        (2, 320, 320, 64, 3, 2, false),
        (1, 3, 5, 7, 3, 1, true),
        (1, 3, 4, 40, 3, 1, false),
        (1, 8, 4, 9, 3, 2, false),
        // Larger than one im2col buffer: done in bands of output pixels, batch item by item.
        (2, 64, 8, 512, 3, 1, true),
    ];
    // Each route on its own: im2col + cuBLAS, and cuDNN where it is installed.
    #[cfg(feature = "cuda")]
    {
        use atelier::engine::cuda::{ConvRoute, cudnn_available, force_convolution_route};
        let mut routes = vec![ConvRoute::Im2col];
        if cudnn_available() {
            routes.push(ConvRoute::Cudnn);
        }
        for route in routes {
            force_convolution_route(route);
            check_convolutions(&cases, &format!("{route:?}"));
        }
        force_convolution_route(ConvRoute::Fastest);
    }
    #[cfg(not(feature = "cuda"))]
    check_convolutions(&cases, "no CUDA build");
}

type ConvCase = (usize, usize, usize, usize, usize, usize, bool);

fn check_convolutions(cases: &[ConvCase], route: &str) {
    for (seed, &(batch, cin, cout, size, kernel, stride, with_residual)) in cases.iter().enumerate()
    {
        let seed = seed as u64 * 10;
        let x = random(&[batch, cin, size, size], seed);
        let scale = 1.0 / ((cin * kernel * kernel) as f64).sqrt();
        let weight = (random(&[cout, cin, kernel, kernel], seed + 1) * scale).unwrap();
        let bias = random(&[cout], seed + 2);
        let out_size = (size + 2 * (kernel / 2) - kernel) / stride + 1;
        let residual = random(&[batch, cout, out_size, out_size], seed + 3);
        for (dtype, tolerance) in dtypes() {
            let (x, x_ref) = on_both(&x, dtype);
            let (w, w_ref) = on_both(&weight, dtype);
            let (b, b_ref) = on_both(&bias, dtype);
            let (r, r_ref) = on_both(&residual, dtype);
            let ours = Conv2d::new(
                cin,
                cout,
                kernel,
                stride,
                var_builder(vec![("weight", w), ("bias", b)], dtype, &test_device()),
            )
            .unwrap();
            let reference = Conv2d::new(
                cin,
                cout,
                kernel,
                stride,
                var_builder(
                    vec![("weight", w_ref), ("bias", b_ref)],
                    DType::F32,
                    &Device::Cpu,
                ),
            )
            .unwrap();
            let (out, want) = if with_residual {
                (
                    ours.forward_add(&x, &r).unwrap(),
                    reference.forward_add(&x_ref, &r_ref).unwrap(),
                )
            } else {
                (
                    ours.forward(&x).unwrap(),
                    reference.forward(&x_ref).unwrap(),
                )
            };
            assert_close(
                &format!(
                    "conv {batch}x{cin}->{cout} {size}px k{kernel} s{stride} {dtype:?} {route}"
                ),
                &out,
                &want,
                tolerance,
            );
            // A per-image, per-channel bias (a ResNet block's time embedding) added in the
            // convolution's first pass.
            if !with_residual {
                let plane_bias = random(&[batch, cout], seed + 4);
                let (p, p_ref) = on_both(&plane_bias, dtype);
                assert_close(
                    &format!(
                        "conv + channel bias {batch}x{cin}->{cout} {size}px k{kernel} s{stride} \
                         {dtype:?} {route}"
                    ),
                    &ours.forward_add_per_channel(&x, &p).unwrap(),
                    &reference.forward_add_per_channel(&x_ref, &p_ref).unwrap(),
                    tolerance,
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn tf32_convolutions_stay_close() {
    // The upcast SDXL VAE's f32 convolutions on TF32 tensor cores: 10-bit mantissa products,
    // f32 sums, so about 1e-3 relative (PyTorch's cuDNN default does the same).
    assert!(test_device().is_cuda(), "set ATELIER_TEST_DEVICE=cuda");
    let (cin, cout, size) = (256, 128, 96);
    let x = random(&[1, cin, size, size], 1);
    let weight = (random(&[cout, cin, 3, 3], 2) * (1.0 / ((cin * 9) as f64).sqrt())).unwrap();
    let bias = random(&[cout], 3);
    let (x, x_ref) = on_both(&x, DType::F32);
    let (w, w_ref) = on_both(&weight, DType::F32);
    let (b, b_ref) = on_both(&bias, DType::F32);
    let ours = Conv2d::new(
        cin,
        cout,
        3,
        1,
        var_builder(vec![("weight", w), ("bias", b)], DType::F32, &test_device()),
    )
    .unwrap();
    let reference = Conv2d::new(
        cin,
        cout,
        3,
        1,
        var_builder(
            vec![("weight", w_ref), ("bias", b_ref)],
            DType::F32,
            &Device::Cpu,
        ),
    )
    .unwrap();
    let want = reference.forward(&x_ref).unwrap();
    let plain_error = relative_error(&ours.forward(&x).unwrap(), &want);
    let out = atelier::engine::fused::with_tf32_convolutions(|| ours.forward(&x)).unwrap();
    let error = relative_error(&out, &want);
    assert!(
        error <= 3e-3,
        "TF32 convolution: relative error {error:.3e}"
    );
    assert!(
        error > 10.0 * plain_error,
        "TF32 ({error:.3e}) no less exact than f32 ({plain_error:.3e}): TF32 was not used"
    );
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn geglu_matches_reference() {
    // SD 1.5's widest feed-forward (16-byte vectors in f16) and an odd width (element by element).
    for (seed, shape) in [[2, 4096, 2 * 1280], [3, 5, 2 * 12]].iter().enumerate() {
        let x = (random(shape, 7 + seed as u64) * 3.0).unwrap();
        for (dtype, tolerance) in dtypes() {
            let (x, x_ref) = on_both(&x, dtype);
            assert_close(
                &format!("geglu {shape:?} {dtype:?}"),
                &geglu(&x).unwrap(),
                &geglu(&x_ref).unwrap(),
                tolerance,
            );
        }
    }
}

/// A linear layer from `weight` and, when `bias` is set, `bias_values`, in `dtype` on `device`.
fn linear_layer(
    (in_dim, out_dim, bias): (usize, usize, bool),
    weight: Tensor,
    bias_values: Tensor,
    dtype: DType,
    device: &Device,
) -> atelier::engine::nn::Linear {
    let mut tensors = vec![("weight", weight)];
    if bias {
        tensors.push(("bias", bias_values));
    }
    atelier::engine::nn::linear(in_dim, out_dim, bias, var_builder(tensors, dtype, device)).unwrap()
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn linear_layers_match_reference() {
    use candle_core::Module;
    // (leading dims, in, out, bias): SDXL's feed-forward in, a projection without bias, odd sizes.
    let cases: [(&[usize], usize, usize, bool); 4] = [
        (&[2, 1024], 1280, 10240, true),
        (&[2, 4096], 640, 1920, false),
        (&[154], 2048, 2560, false),
        (&[3, 7], 13, 5, true),
    ];
    for (seed, &(leading, in_dim, out_dim, bias)) in cases.iter().enumerate() {
        let seed = seed as u64 * 10;
        let mut shape = leading.to_vec();
        shape.push(in_dim);
        let x = random(&shape, seed);
        let weight =
            (random(&[out_dim, in_dim], seed + 1) * (1.0 / (in_dim as f64).sqrt())).unwrap();
        let bias_values = random(&[out_dim], seed + 2);
        for (dtype, tolerance) in dtypes() {
            let (x, x_ref) = on_both(&x, dtype);
            let (w, w_ref) = on_both(&weight, dtype);
            let (b, b_ref) = on_both(&bias_values, dtype);
            let dims = (in_dim, out_dim, bias);
            let ours = linear_layer(dims, w, b, dtype, &test_device());
            let reference = linear_layer(dims, w_ref, b_ref, DType::F32, &Device::Cpu);
            assert_close(
                &format!("linear {leading:?}x{in_dim}->{out_dim} bias {bias} {dtype:?}"),
                &ours.forward(&x).unwrap(),
                &reference.forward(&x_ref).unwrap(),
                tolerance,
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn linear_layers_onto_a_residual_match_reference() {
    // (leading dims, in, out, bias): SDXL's attention output and feed-forward out, no bias, odd.
    let cases: [(&[usize], usize, usize, bool); 4] = [
        (&[2, 1024], 1280, 1280, true),
        (&[2, 1024], 5120, 1280, true),
        (&[2, 64], 64, 96, false),
        (&[3, 7], 13, 5, true),
    ];
    for (seed, &(leading, in_dim, out_dim, bias)) in cases.iter().enumerate() {
        let seed = seed as u64 * 10 + 100;
        let mut shape = leading.to_vec();
        shape.push(in_dim);
        let x = random(&shape, seed);
        let weight =
            (random(&[out_dim, in_dim], seed + 1) * (1.0 / (in_dim as f64).sqrt())).unwrap();
        let bias_values = random(&[out_dim], seed + 2);
        let mut out_shape = leading.to_vec();
        out_shape.push(out_dim);
        let residual = random(&out_shape, seed + 3);
        for (dtype, tolerance) in dtypes() {
            let (x, x_ref) = on_both(&x, dtype);
            let (w, w_ref) = on_both(&weight, dtype);
            let (b, b_ref) = on_both(&bias_values, dtype);
            let (r, r_ref) = on_both(&residual, dtype);
            let dims = (in_dim, out_dim, bias);
            let ours = linear_layer(dims, w, b, dtype, &test_device());
            let reference = linear_layer(dims, w_ref, b_ref, DType::F32, &Device::Cpu);
            assert_close(
                &format!("linear onto residual {leading:?}x{in_dim}->{out_dim} {dtype:?}"),
                &ours.forward_onto(&x, r).unwrap(),
                &reference.forward_onto(&x_ref, r_ref).unwrap(),
                tolerance,
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn layer_norm_matches_reference() {
    use candle_core::Module;
    // Widths kept in registers (320, 640, 1280, 2048), wider (2560), odd (13); odd row counts.
    for (seed, (rows, width)) in [
        (4607, 320),
        (8192, 640),
        (2048, 1280),
        (9, 2048),
        (5, 2560),
        (3, 13),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = seed as u64 * 10 + 200;
        let x = ((random(&[rows, width], seed) * 4.0).unwrap() + 1.5).unwrap();
        let weight = random(&[width], seed + 1);
        let bias = random(&[width], seed + 2);
        for (dtype, tolerance) in dtypes() {
            let (x, x_ref) = on_both(&x, dtype);
            let (w, w_ref) = on_both(&weight, dtype);
            let (b, b_ref) = on_both(&bias, dtype);
            let norm = |w, b, dtype, device: &Device| {
                atelier::engine::nn::LayerNorm::new(
                    width,
                    1e-5,
                    var_builder(vec![("weight", w), ("bias", b)], dtype, device),
                )
                .unwrap()
            };
            assert_close(
                &format!("layer norm {rows}x{width} {dtype:?}"),
                &norm(w, b, dtype, &test_device()).forward(&x).unwrap(),
                &norm(w_ref, b_ref, DType::F32, &Device::Cpu)
                    .forward(&x_ref)
                    .unwrap(),
                tolerance,
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn token_transposes_and_upsampling_match_reference() {
    use atelier::engine::fused::{image_to_tokens, tokens_to_image, upsample_nearest};
    // SD 2.1's first level (96x96, 320 channels), sizes that are not multiples of the tiles.
    for (seed, shape) in [[2, 320, 96, 96], [1, 5, 3, 7], [2, 40, 33, 17]]
        .into_iter()
        .enumerate()
    {
        let seed = seed as u64 * 10 + 300;
        let [batch, channels, height, width] = shape;
        let image = random(&shape, seed);
        let tokens = random(&[batch, height * width, channels], seed + 1);
        for (dtype, _) in dtypes() {
            let (image, image_ref) = on_both(&image, dtype);
            let (tokens, tokens_ref) = on_both(&tokens, dtype);
            // Moves and (one f16 rounding of) an addition only.
            let tolerance = if dtype == DType::F16 { 1e-3 } else { 1e-7 };
            assert_close(
                &format!("image to tokens {shape:?} {dtype:?}"),
                &image_to_tokens(&image).unwrap(),
                &image_to_tokens(&image_ref).unwrap(),
                tolerance,
            );
            assert_close(
                &format!("tokens to image {shape:?} {dtype:?}"),
                &tokens_to_image(&tokens, (height, width), None).unwrap(),
                &tokens_to_image(&tokens_ref, (height, width), None).unwrap(),
                tolerance,
            );
            assert_close(
                &format!("tokens to image + residual {shape:?} {dtype:?}"),
                &tokens_to_image(&tokens, (height, width), Some(&image)).unwrap(),
                &tokens_to_image(&tokens_ref, (height, width), Some(&image_ref)).unwrap(),
                tolerance,
            );
            assert_close(
                &format!("upsample 2x {shape:?} {dtype:?}"),
                &upsample_nearest(&image, 2 * height, 2 * width).unwrap(),
                &upsample_nearest(&image_ref, 2 * height, 2 * width).unwrap(),
                tolerance,
            );
        }
    }
}

#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn three_pass_tf32_products_are_as_exact_as_f32() {
    use atelier::engine::fused::{tf32x3_matmul, with_tf32_convolutions};
    assert!(test_device().is_cuda(), "set ATELIER_TEST_DEVICE=cuda");
    // The VAE attention's two products (scores q k^T, then probabilities times values) at odd
    // sizes; a single TF32 pass would be ~1e-3 off.
    let a = random(&[2, 300, 512], 400);
    let b_t = random(&[2, 700, 512], 401);
    let c = random(&[2, 300, 700], 402);
    let v = random(&[2, 700, 96], 403);
    let (a, a_ref) = on_both(&a, DType::F32);
    let (b_t, b_t_ref) = on_both(&b_t, DType::F32);
    let (c, c_ref) = on_both(&c, DType::F32);
    let (v, v_ref) = on_both(&v, DType::F32);
    assert!(
        tf32x3_matmul(&a, &b_t, true).unwrap().is_none(),
        "TF32 only inside with_tf32_convolutions"
    );
    let (scores, out) = with_tf32_convolutions(|| {
        (
            tf32x3_matmul(&a, &b_t, true).unwrap().unwrap(),
            tf32x3_matmul(&c, &v, false).unwrap().unwrap(),
        )
    });
    assert_close(
        "a b^T in three TF32 passes",
        &scores,
        &a_ref.matmul(&b_t_ref.t().unwrap()).unwrap(),
        2e-6,
    );
    assert_close(
        "c v in three TF32 passes",
        &out,
        &c_ref.matmul(&v_ref).unwrap(),
        2e-6,
    );
}

/// A UNet step replayed from a CUDA graph equals the same step run eagerly: for new inputs and
/// timesteps at every replay, for a second input size (its own graph) and back, on SD 1.5's and
/// SDXL's full-size architectures with random weights (f16, as Atelier runs them).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn cuda_graph_steps_equal_eager_steps() {
    use atelier::engine::random::RandomModel;
    use atelier::engine::unet::AddedConditions;
    let device = test_device();
    assert!(device.is_cuda(), "set ATELIER_TEST_DEVICE=cuda");
    for (architecture, context_width) in [("sd15", 768), ("sdxl", 2048)] {
        let model =
            RandomModel::with_options(architecture, &device, DType::F16, None, false).unwrap();
        let unet = &model.unet;
        let on_device = |t: Tensor| t.to_dtype(DType::F16).unwrap().to_device(&device).unwrap();
        let context = on_device(random(&[2, 77, context_width], 1));
        let added = (architecture == "sdxl").then(|| AddedConditions {
            text_embeds: on_device(random(&[2, 1280], 2)),
            time_ids: Tensor::new(&[[1024f32, 1024., 0., 0., 1024., 1024.]; 2], &device).unwrap(),
        });
        // (latent side, timestep): the first size three times (eager, captured, replayed), a
        // second size twice, then the first again.
        let calls = [
            (64, 999.0),
            (64, 500.0),
            (64, 21.0),
            (48, 700.0),
            (48, 300.0),
            (64, 1.0),
        ];
        let run = |graphs: bool| -> Vec<Tensor> {
            unet.set_cuda_graphs(false);
            unet.set_cuda_graphs(graphs);
            calls
                .iter()
                .enumerate()
                .map(|(seed, &(side, timestep))| {
                    let sample = on_device(random(&[2, 4, side, side], 10 + seed as u64));
                    unet.forward(&sample, timestep, &context, added.as_ref())
                        .unwrap()
                        .to_device(&Device::Cpu)
                        .unwrap()
                })
                .collect()
        };
        let eager = run(false);
        let before = unet.cuda_graph_report().unwrap();
        let replayed = run(true);
        let report = unet.cuda_graph_report().unwrap();
        assert_eq!(report.refusal, None, "{architecture}: capture refused");
        assert_eq!(
            report.captured - before.captured,
            2,
            "{architecture}: one graph per size"
        );
        assert_eq!(
            report.replays - before.replays,
            4,
            "{architecture}: {report:?}"
        );
        assert!(report.kernels > 100, "{architecture}: {report:?}");
        for ((eager, replayed), (side, timestep)) in eager.iter().zip(&replayed).zip(calls) {
            assert_close(
                &format!("{architecture} {side}x{side} at t={timestep}: graph vs eager"),
                replayed,
                eager,
                1e-3,
            );
        }
        unet.set_cuda_graphs(false);
    }
}

/// Running out of GPU memory inside a graph's call (the first, eager call of new shapes; a
/// capture and the eager call after it) gives every graph and the pools' unused memory back and
/// makes the call again, eagerly: the caller gets the right result, and those shapes stay eager.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a GPU: ATELIER_TEST_DEVICE=cuda"]
fn cuda_graphs_run_eagerly_when_memory_runs_out() {
    use atelier::engine::cuda::GraphCache;
    use atelier::engine::error::EngineError;
    use std::cell::Cell;
    let device = test_device();
    assert!(device.is_cuda(), "set ATELIER_TEST_DEVICE=cuda");
    let input = random(&[2, 4, 8, 8], 7).to_device(&device).unwrap();
    let expected = ((&input * 2.0).unwrap() + 1.0).unwrap();
    // Body calls (counted from 1) that fail as the driver does when memory runs out.
    for failing in [vec![1], vec![2, 3]] {
        let calls = Cell::new(0usize);
        let body = |inputs: &[Tensor]| -> atelier::engine::error::Result<Tensor> {
            calls.set(calls.get() + 1);
            if failing.contains(&calls.get()) {
                return Err(EngineError::from(candle_core::Error::Msg(
                    "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
                )));
            }
            Ok(((&inputs[0] * 2.0)? + 1.0)?)
        };
        let mut graphs = GraphCache::new(true);
        // A graph of another size, captured and replayed: given back when memory runs out.
        let other = random(&[2, 4, 16, 16], 8).to_device(&device).unwrap();
        let other_calls = |inputs: &[Tensor]| -> atelier::engine::error::Result<Tensor> {
            Ok((&inputs[0] + 3.0)?)
        };
        for _ in 0..3 {
            graphs
                .run(std::slice::from_ref(&other), other_calls)
                .unwrap();
        }
        assert_eq!(graphs.report().captured, 1);
        for round in 0..4 {
            let output = graphs
                .run(std::slice::from_ref(&input), body)
                .unwrap_or_else(|e| panic!("failing calls {failing:?}, round {round}: {e}"));
            assert_close(
                &format!("failing calls {failing:?}, round {round}"),
                &output.to_device(&Device::Cpu).unwrap(),
                &expected.to_device(&Device::Cpu).unwrap(),
                0.0,
            );
        }
        let report = graphs.report();
        assert!(
            report
                .refusal
                .as_deref()
                .is_some_and(|r| r.contains("out of memory")),
            "{report:?}"
        );
        // No capture of these shapes; every later round one eager call.
        assert_eq!(report.captured, 1, "{report:?}");
        assert_eq!(calls.get(), 4 + failing.len(), "failing calls {failing:?}");
        // The other size's graph was given up: its shapes start again from an eager call.
        let replays = report.replays;
        graphs
            .run(std::slice::from_ref(&other), other_calls)
            .unwrap();
        assert_eq!(graphs.report().replays, replays);
    }
}
