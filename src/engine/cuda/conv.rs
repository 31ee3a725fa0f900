//! 2-D convolutions with the bias and residual folded in: cuDNN's where it is installed and
//! faster for the shape (timed once per shape), else im2col + cuBLAS GEMMs straight into NCHW.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig, sys};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{CustomOp3, DType, Layout, Result, Shape, Tensor};
use half::f16;

use super::{
    GemmScalar, MAX_COLUMN_ELEMENTS, contiguous_slice, cuda_only, cudnn, function, grid_2d, suffix,
    tf32_gemm, timed, with_optional_view,
};

/// Which way the CUDA convolutions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvRoute {
    /// The faster of cuDNN and im2col, timed once per shape (the default).
    Fastest = 0,
    /// Always im2col + cuBLAS.
    Im2col = 1,
    /// cuDNN wherever it is installed (else im2col).
    Cudnn = 2,
}

static FORCED_ROUTE: AtomicU8 = AtomicU8::new(ConvRoute::Fastest as u8);

/// Sends every convolution of the process one way from now on: for tests that check each route
/// and for comparisons; the engine itself leaves it at [`ConvRoute::Fastest`].
pub fn force_convolution_route(route: ConvRoute) {
    FORCED_ROUTE.store(route as u8, Ordering::Relaxed);
}

fn forced_route() -> ConvRoute {
    match FORCED_ROUTE.load(Ordering::Relaxed) {
        1 => ConvRoute::Im2col,
        2 => ConvRoute::Cudnn,
        _ => ConvRoute::Fastest,
    }
}

/// A 2-D convolution with bias (and optionally a residual added to its output): the output is
/// first set to bias + residual, then cuDNN's convolution accumulates onto it when cuDNN is
/// installed ([`super::cudnn_available`]) and faster for the shape; otherwise im2col (skipped
/// for 1x1 convolutions) and one GEMM per batch item do.
pub struct Conv2dOp {
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Added to the output, same shape as it.
    pub residual: Option<Tensor>,
    /// Added to each output plane: one value per batch item and output channel (a ResNet
    /// block's projected time embedding), `batch * out_channels` contiguous values.
    pub plane_bias: Option<Tensor>,
    /// f32 GEMMs on TF32 tensor cores (see [`crate::engine::fused::with_tf32_convolutions`]).
    pub tf32: bool,
}

impl Conv2dOp {
    fn run<T: GemmScalar>(
        &self,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
    {
        let device = x.0.device().clone();
        let (batch, channels, height, width) = x.1.shape().dims4()?;
        let (out_channels, in_channels, kh, kw) = weight.1.shape().dims4()?;
        if in_channels != channels {
            candle_core::bail!("conv2d: input has {channels} channels, weight {in_channels}");
        }
        let (stride, pad) = (self.stride, self.padding);
        if height + 2 * pad < kh || width + 2 * pad < kw {
            candle_core::bail!("conv2d: input smaller than the kernel");
        }
        let out_h = (height + 2 * pad - kh) / stride + 1;
        let out_w = (width + 2 * pad - kw) / stride + 1;
        let pixels = out_h * out_w;
        let k = channels * kh * kw;
        if height * width >= i32::MAX as usize || pixels >= i32::MAX as usize {
            candle_core::bail!("conv2d kernel: {height}x{width} is too large");
        }
        let total = batch * out_channels * pixels;
        let name = suffix(x.0.dtype())?;
        let stream = device.cuda_stream();

        let xs = contiguous_slice::<T>(x.0, x.1, "conv2d input")?;
        let ws = contiguous_slice::<T>(weight.0, weight.1, "conv2d weight")?;
        let bs = contiguous_slice::<T>(bias.0, bias.1, "conv2d bias")?;

        // SAFETY: `set_bias` (conv_init) writes every element before the result is used; only
        // the routes' timing adds onto the uninitialised values first, and it is overwritten.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(total)? };
        let planes = batch * out_channels;
        let (planes_i, channels_i, pixels_i) = (planes as i64, out_channels as i64, pixels as i64);
        // 16-byte vectors where every plane starts 16-byte aligned (the residual's too).
        let aligned = |tensor: &Option<Tensor>| {
            tensor
                .as_ref()
                .is_none_or(|t| t.layout().start_offset().is_multiple_of(8))
        };
        let init_name =
            if x.0.dtype() == DType::F16 && pixels.is_multiple_of(8) && aligned(&self.residual) {
                "f16x8"
            } else {
                name
            };
        let init = function(&device, &format!("conv_init_{init_name}"), 0)?;
        let init_columns = if init_name == "f16x8" {
            pixels / 8
        } else {
            pixels
        };
        // out = bias (+ plane bias) (+ residual), what the convolution then accumulates onto.
        let set_bias = |out: &mut CudaSlice<T>| -> Result<()> {
            with_optional_view::<T, _>(self.plane_bias.as_ref(), planes, "plane bias", |pb| {
                with_optional_view::<T, _>(self.residual.as_ref(), total, "residual", |rs| {
                    let null: u64 = 0;
                    let mut builder = stream.launch_builder(&init);
                    builder.arg(out).arg(&bs);
                    match &pb {
                        Some(view) => builder.arg(view),
                        None => builder.arg(&null),
                    };
                    match &rs {
                        Some(view) => builder.arg(view),
                        None => builder.arg(&null),
                    };
                    builder.arg(&planes_i).arg(&channels_i).arg(&pixels_i);
                    // SAFETY: arguments match the kernel's signature; null pointers are
                    // checked by the kernel, the views' lengths by with_optional_view.
                    unsafe { builder.launch(grid_2d(init_columns, planes)) }.w()?;
                    Ok(())
                })
            })
        };

        let tf32 = self.tf32 && x.0.dtype() == DType::F32;
        let blas = device.cublas_handle();
        // out[b][:, p0..p0 + len] += W (out_channels x k) * columns (k x len), for `items`
        // batch items from `first` whose columns are `k * len` apart.
        let gemm = |columns: &CudaView<'_, T>,
                    out: &mut CudaSlice<T>,
                    first: usize,
                    items: usize,
                    p0: usize,
                    len: usize|
         -> Result<()> {
            let config = StridedBatchedConfig {
                gemm: GemmConfig {
                    transa: sys::cublasOperation_t::CUBLAS_OP_N,
                    transb: sys::cublasOperation_t::CUBLAS_OP_N,
                    m: len as i32,
                    n: out_channels as i32,
                    k: k as i32,
                    alpha: T::ONE,
                    lda: len as i32,
                    ldb: k as i32,
                    beta: T::ONE,
                    ldc: pixels as i32,
                },
                batch_size: items as i32,
                stride_a: (k * len) as i64,
                stride_b: 0,
                stride_c: (out_channels * pixels) as i64,
            };
            let mut target = out.slice_mut(first * out_channels * pixels + p0..);
            if tf32 {
                return timed("conv2d.gemm", &device, || {
                    tf32_gemm(&blas, &stream, &config, columns, &ws, &mut target, 1.0)
                });
            }
            timed("conv2d.gemm", &device, || {
                // SAFETY: columns hold items * k * len elements, the weight out_channels * k,
                // and the output rows p0..p0 + len of `items` planes of out_channels * pixels.
                unsafe { blas.gemm_strided_batched(config, columns, &ws, &mut target) }.w()
            })
        };
        // out += conv(x) by im2col (none for 1x1 convolutions) and GEMMs.
        let im2col_route = |out: &mut CudaSlice<T>| -> Result<()> {
            if kh == 1 && kw == 1 && stride == 1 && pad == 0 {
                return gemm(&xs, out, 0, batch, 0, pixels);
            }
            // Columns for all of the batch at once when they are small; else one batch item
            // and a band of output pixels at a time, so that memory stays bounded.
            let (items_per_call, band) = if batch * k * pixels <= MAX_COLUMN_ELEMENTS {
                (batch, pixels)
            } else {
                // Bands of whole multiples of 128 pixels keep every GEMM operand aligned.
                let band = (MAX_COLUMN_ELEMENTS / k) / 128 * 128;
                (1, band.clamp(128.min(pixels), pixels))
            };
            // SAFETY: im2col writes every element it is asked for before the GEMM reads them.
            let mut columns: CudaSlice<T> =
                unsafe { device.alloc::<T>(items_per_call * k * band)? };
            // f16 3x3 at stride 1 with rows of whole 8-pixel groups: 16-byte column stores
            // (bands are multiples of 128 pixels, so every band starts on a group).
            let vectorized =
                name == "f16" && kh == 3 && kw == 3 && stride == 1 && out_w.is_multiple_of(8);
            let (func, pixels_per_thread) = if vectorized {
                (function(&device, "im2col_f16x8_k3", 0)?, 8)
            } else {
                (function(&device, &format!("im2col_{name}"), 0)?, 1)
            };
            for first in (0..batch).step_by(items_per_call) {
                let input = xs.slice(first * channels * height * width..);
                for p0 in (0..pixels).step_by(band) {
                    let len = band.min(pixels - p0);
                    let ints = [
                        items_per_call as i32,
                        channels as i32,
                        height as i32,
                        width as i32,
                        kh as i32,
                        kw as i32,
                        stride as i32,
                        pad as i32,
                        out_w as i32,
                        p0 as i32,
                        len as i32,
                    ];
                    let mut builder = stream.launch_builder(&func);
                    builder.arg(&input).arg(&mut columns);
                    for value in &ints {
                        builder.arg(value);
                    }
                    timed("conv2d.im2col", &device, || {
                        // SAFETY: arguments match the kernel's signature.
                        unsafe {
                            builder.launch(grid_2d(
                                len.div_ceil(pixels_per_thread),
                                items_per_call * channels,
                            ))
                        }
                        .w()
                    })?;
                    gemm(&columns.slice(..), out, first, items_per_call, p0, len)?;
                }
            }
            Ok(())
        };
        let shape = cudnn::ConvShape {
            input: [batch, channels, height, width],
            weight: [out_channels, in_channels, kh, kw],
            stride,
            padding: pad,
            output: [out_h, out_w],
        };
        let cudnn_route = |out: &mut CudaSlice<T>| -> Result<()> {
            timed("conv2d.cudnn", &device, || {
                cudnn::convolve_accumulate(&device, &shape, tf32, &xs, &ws, out)
            })
        };
        let key = RouteKey {
            device: device.id(),
            shape,
            dtype: x.0.dtype(),
            tf32,
        };
        let use_cudnn = cudnn::available()
            && match forced_route() {
                ConvRoute::Fastest => {
                    faster_route(&device, key, &mut out, &im2col_route, &cudnn_route)?
                }
                ConvRoute::Im2col => false,
                ConvRoute::Cudnn => true,
            };
        set_bias(&mut out)?;
        if use_cudnn {
            cudnn_route(&mut out)?;
        } else {
            im2col_route(&mut out)?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, out_channels, out_h, out_w)),
        ))
    }
}

/// A convolution's shape, element type and precision: what the route choice depends on.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct RouteKey {
    device: DeviceId,
    shape: cudnn::ConvShape,
    dtype: DType,
    tf32: bool,
}

/// Timed runs of each route per shape: one to warm up, then this many.
const ROUTE_TIMING_RUNS: usize = 3;

/// Whether cuDNN convolves this shape faster than im2col + cuBLAS. Decided once per shape (per
/// process), the first time it is seen outside a CUDA-graph capture, by timing both on the GPU
/// (CUDA events), each adding onto `out` (which the caller sets afterwards): cuDNN's kernels are
/// 2-3x ours at the VAE's large convolutions, but slower at some of the UNet's small ones, and
/// which is which depends on the GPU. During a capture, a shape not yet timed takes im2col
/// (nothing may synchronise there).
fn faster_route<T: DeviceRepr>(
    device: &CudaDevice,
    key: RouteKey,
    out: &mut CudaSlice<T>,
    im2col: &dyn Fn(&mut CudaSlice<T>) -> Result<()>,
    cudnn: &dyn Fn(&mut CudaSlice<T>) -> Result<()>,
) -> Result<bool> {
    use candle_core::cuda_backend::cudarc::driver::sys::{CUevent_flags, CUstreamCaptureStatus};
    static ROUTES: OnceLock<Mutex<HashMap<RouteKey, bool>>> = OnceLock::new();
    let routes = ROUTES.get_or_init(|| Mutex::new(HashMap::new()));
    let lock_error = || candle_core::Error::Msg("convolution route cache poisoned".into());
    if let Some(&cudnn_faster) = routes.lock().map_err(|_| lock_error())?.get(&key) {
        return Ok(cudnn_faster);
    }
    let stream = device.cuda_stream();
    if stream.capture_status().w()? != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(false);
    }
    let mut time_ms = |route: &dyn Fn(&mut CudaSlice<T>) -> Result<()>| -> Result<f32> {
        route(out)?;
        let start = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        for _ in 0..ROUTE_TIMING_RUNS {
            route(out)?;
        }
        let end = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .w()?;
        end.synchronize().w()?;
        start.elapsed_ms(&end).w()
    };
    let im2col_ms = time_ms(im2col)?;
    // A shape cuDNN refuses (or whose workspace does not fit) stays with im2col.
    let cudnn_ms = time_ms(cudnn).unwrap_or(f32::INFINITY);
    let cudnn_faster = cudnn_ms < im2col_ms;
    routes
        .lock()
        .map_err(|_| lock_error())?
        .insert(key, cudnn_faster);
    Ok(cudnn_faster)
}

three_input_op!(Conv2dOp, "atelier-conv2d");
