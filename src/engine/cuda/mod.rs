//! Atelier's own CUDA kernels (`kernels.cu`, compiled to PTX by build.rs) as candle custom ops:
//! fused GroupNorm (+SiLU), GEGLU, convolutions as one GEMM per batch item straight into NCHW with
//! the bias and residual folded in, and a flash-style tensor-core attention.
//!
//! Inputs must be contiguous f16 or f32 (attention: f16); [`super::fused`] checks and falls back
//! to candle's own operations otherwise.

mod graph;

pub use graph::{GraphCache, GraphReport, graphs_wanted, trim_graph_memory};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig, sys};
use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::f16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/atelier_kernels.ptx"));
const THREADS: u32 = 256;
/// Largest im2col buffer (elements): 128 MiB in f16. Bigger convolutions go in bands.
const MAX_COLUMN_ELEMENTS: usize = 1 << 26;

type FunctionCache = HashMap<(DeviceId, String), CudaFunction>;

fn modules() -> &'static Mutex<HashMap<DeviceId, Arc<CudaModule>>> {
    static MODULES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaModule>>>> = OnceLock::new();
    MODULES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// One cuBLASLt handle (with its workspace) per device.
fn blas_lt(device: &CudaDevice) -> Result<Arc<CudaBlasLT>> {
    static HANDLES: OnceLock<Mutex<HashMap<DeviceId, Arc<CudaBlasLT>>>> = OnceLock::new();
    let mut handles = HANDLES
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuBLASLt cache poisoned".into()))?;
    if let Some(handle) = handles.get(&device.id()) {
        return Ok(handle.clone());
    }
    let handle = Arc::new(CudaBlasLT::new(device.cuda_stream()).map_err(lt_error)?);
    handles.insert(device.id(), handle.clone());
    Ok(handle)
}

fn lt_error(error: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("cuBLASLt: {error:?}"))
}

/// Times `f` under `name` when profiling (see [`super::profile`]), synchronising the stream.
fn timed<R>(name: &'static str, device: &CudaDevice, f: impl FnOnce() -> Result<R>) -> Result<R> {
    super::profile::scope_with(name, || device.cuda_stream().synchronize().w(), f)
}

fn functions() -> &'static Mutex<FunctionCache> {
    static FUNCTIONS: OnceLock<Mutex<FunctionCache>> = OnceLock::new();
    FUNCTIONS.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The kernel `name`, loaded once per device; `shared_bytes` above 48 KiB is opted into.
fn function(device: &CudaDevice, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
    let key = (device.id(), name.to_string());
    let mut cache = functions()
        .lock()
        .map_err(|_| candle_core::Error::Msg("CUDA kernel cache poisoned".into()))?;
    if let Some(function) = cache.get(&key) {
        return Ok(function.clone());
    }
    let module = {
        let mut modules = modules()
            .lock()
            .map_err(|_| candle_core::Error::Msg("CUDA module cache poisoned".into()))?;
        match modules.get(&device.id()) {
            Some(module) => module.clone(),
            None => {
                let module = device
                    .cuda_stream()
                    .context()
                    .load_module(Ptx::from_src(PTX))
                    .w()?;
                modules.insert(device.id(), module.clone());
                module
            }
        }
    };
    let function = module.load_function(name).w()?;
    if shared_bytes > 48 * 1024 {
        function
            .set_attribute(
                CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                shared_bytes as i32,
            )
            .w()?;
    }
    cache.insert(key, function.clone());
    Ok(function)
}

/// Blocks over (columns, rows): threads walk the columns of a row, grid rows walk the rows.
fn grid_2d(columns: usize, rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            columns.div_ceil(THREADS as usize).clamp(1, 1024) as u32,
            rows.clamp(1, 65_535) as u32,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn suffix(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F16 => Ok("f16"),
        DType::F32 => Ok("f32"),
        other => candle_core::bail!("no Atelier CUDA kernel for {other:?}"),
    }
}

fn cuda_only(op: &str) -> Result<(candle_core::CpuStorage, Shape)> {
    candle_core::bail!("{op} runs on CUDA only")
}

fn contiguous_slice<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    if !layout.is_contiguous() {
        candle_core::bail!("{what} must be contiguous");
    }
    Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..))
}

/// `CustomOp3` for an op with a generic `run((x, layout), (a, layout), (b, layout))` over f16
/// and f32: CUDA only.
macro_rules! three_input_op {
    ($op:ty, $label:literal) => {
        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $label
            }

            fn cpu_fwd(
                &self,
                _: &candle_core::CpuStorage,
                _: &Layout,
                _: &candle_core::CpuStorage,
                _: &Layout,
                _: &candle_core::CpuStorage,
                _: &Layout,
            ) -> Result<(candle_core::CpuStorage, Shape)> {
                cuda_only(self.name())
            }

            fn cuda_fwd(
                &self,
                x: &CudaStorage,
                xl: &Layout,
                a: &CudaStorage,
                al: &Layout,
                b: &CudaStorage,
                bl: &Layout,
            ) -> Result<(CudaStorage, Shape)> {
                match x.dtype() {
                    DType::F16 => self.run::<f16>((x, xl), (a, al), (b, bl)),
                    DType::F32 => self.run::<f32>((x, xl), (a, al), (b, bl)),
                    other => candle_core::bail!("{}: unsupported {other:?}", $label),
                }
            }
        }
    };
}

/// Runs `f` on the GPU data of `tensor` (an extra input an op holds, such as a bias), checking
/// that it is on the GPU, of type `T`, contiguous and `elements` long.
fn with_tensor_view<T: CudaDType, R>(
    tensor: &Tensor,
    elements: usize,
    what: &str,
    f: impl FnOnce(CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = tensor.storage_and_layout();
    let Storage::Cuda(storage) = &*storage else {
        candle_core::bail!("{what} is not on the GPU");
    };
    if layout.shape().elem_count() != elements {
        candle_core::bail!("{what} does not match the output");
    }
    f(contiguous_slice::<T>(storage, layout, what)?)
}

/// GroupNorm over `(batch, channels, ...)` with affine weights, optionally followed by SiLU.
pub struct GroupNormOp {
    /// Number of groups.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f32,
    /// Apply SiLU to the result.
    pub silu: bool,
}

impl GroupNormOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
        bias: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.0.device().clone();
        let shape = x.1.shape().clone();
        let dims = shape.dims();
        let (batch, channels) = (dims[0], dims[1]);
        let pixels: usize = dims[2..].iter().product();
        let total = shape.elem_count();
        let group_elements = channels / self.groups * pixels;
        if group_elements >= i32::MAX as usize {
            candle_core::bail!(
                "GroupNorm kernel: a group of {group_elements} elements is too large"
            );
        }
        let groups_total = batch * self.groups;
        let splits = 1024usize
            .div_ceil(groups_total)
            .clamp(1, (group_elements / 2048).max(1));
        let xs = contiguous_slice::<T>(x.0, x.1, "GroupNorm input")?;
        let ws = contiguous_slice::<T>(weight.0, weight.1, "GroupNorm weight")?;
        let bs = contiguous_slice::<T>(bias.0, bias.1, "GroupNorm bias")?;
        let mut partials = device.alloc_zeros::<f32>(groups_total * splits * 3)?;
        // SAFETY: every element is written by group_norm_apply below.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(total)? };
        // 16-byte vectors where 8 consecutive values share a channel and the data is aligned.
        let vectorised = x.0.dtype() == DType::F16
            && pixels.is_multiple_of(8)
            && x.1.start_offset().is_multiple_of(8);
        let name = if vectorised {
            "f16x8"
        } else {
            suffix(x.0.dtype())?
        };
        let config = LaunchConfig {
            grid_dim: (groups_total as u32, splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let n = group_elements as i64;
        let splits_i = splits as i32;
        let stats = function(&device, &format!("group_norm_stats_{name}"), 0)?;
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&stats);
        builder.arg(&xs).arg(&mut partials).arg(&n).arg(&splits_i);
        // SAFETY: arguments match the kernel's signature; sizes are checked above.
        unsafe { builder.launch(config) }.w()?;
        let apply = function(&device, &format!("group_norm_apply_{name}"), 0)?;
        let pixels_i = pixels as i64;
        let per_group = (channels / self.groups) as i32;
        let groups_i = self.groups as i32;
        let silu = i32::from(self.silu);
        let mut builder = stream.launch_builder(&apply);
        builder
            .arg(&xs)
            .arg(&ws)
            .arg(&bs)
            .arg(&mut out)
            .arg(&partials)
            .arg(&n)
            .arg(&splits_i)
            .arg(&pixels_i)
            .arg(&per_group)
            .arg(&groups_i)
            .arg(&self.eps)
            .arg(&silu);
        // SAFETY: as above.
        unsafe { builder.launch(config) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

three_input_op!(GroupNormOp, "atelier-group-norm");

/// `hidden * gelu(gate)` over rows of `[hidden | gate]`.
pub struct GegluOp;

impl GegluOp {
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        x: &CudaStorage,
        layout: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = x.device().clone();
        let dims = layout.shape().dims();
        let width = dims[dims.len() - 1];
        let half = width / 2;
        let rows = layout.shape().elem_count() / width;
        let mut out_dims = dims.to_vec();
        out_dims[dims.len() - 1] = half;
        let xs = contiguous_slice::<T>(x, layout, "GEGLU input")?;
        // SAFETY: every element is written by the kernel.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(rows * half)? };
        // 16-byte vectors when every row's halves start 16-byte aligned.
        let vectorised = x.dtype() == DType::F16
            && half.is_multiple_of(8)
            && layout.start_offset().is_multiple_of(8);
        let name = if vectorised {
            "f16x8"
        } else {
            suffix(x.dtype())?
        };
        let columns = if vectorised { half / 8 } else { half };
        let func = function(&device, &format!("geglu_{name}"), 0)?;
        let (rows_i, half_i) = (rows as i64, half as i64);
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&xs).arg(&mut out).arg(&rows_i).arg(&half_i);
        // SAFETY: arguments match the kernel's signature.
        unsafe { builder.launch(grid_2d(columns, rows)) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(out_dims),
        ))
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "atelier-geglu"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(&self, x: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F16 => self.run::<f16>(x, layout),
            DType::F32 => self.run::<f32>(x, layout),
            other => candle_core::bail!("GEGLU kernel: unsupported {other:?}"),
        }
    }
}

/// A 2-D convolution with bias (and optionally a residual added to its output): im2col (skipped
/// for 1x1 convolutions) and one GEMM per batch item that accumulates onto bias + residual.
pub struct Conv2dOp {
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Added to the output, same shape as it.
    pub residual: Option<Tensor>,
    /// f32 GEMMs on TF32 tensor cores (see [`super::fused::with_tf32_convolutions`]).
    pub tf32: bool,
}

trait GemmScalar: CudaDType + DeviceRepr + Copy {
    const ONE: Self;
    const ZERO: Self;
}
impl GemmScalar for f16 {
    const ONE: Self = f16::ONE;
    const ZERO: Self = f16::ZERO;
}
impl GemmScalar for f32 {
    const ONE: Self = 1.0;
    const ZERO: Self = 0.0;
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

        // SAFETY: conv_init writes every element.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(total)? };
        let init = function(&device, &format!("conv_init_{name}"), 0)?;
        let planes = batch * out_channels;
        let (planes_i, channels_i, pixels_i) = (planes as i64, out_channels as i64, pixels as i64);
        match &self.residual {
            Some(residual) => {
                with_tensor_view::<T, _>(residual, total, "conv2d residual", |rs| {
                    let mut builder = stream.launch_builder(&init);
                    builder
                        .arg(&mut out)
                        .arg(&bs)
                        .arg(&rs)
                        .arg(&planes_i)
                        .arg(&channels_i)
                        .arg(&pixels_i);
                    // SAFETY: arguments match the kernel's signature.
                    unsafe { builder.launch(grid_2d(pixels, planes)) }.w()
                })?;
            }
            None => {
                let null: u64 = 0;
                let mut builder = stream.launch_builder(&init);
                builder
                    .arg(&mut out)
                    .arg(&bs)
                    .arg(&null)
                    .arg(&planes_i)
                    .arg(&channels_i)
                    .arg(&pixels_i);
                // SAFETY: a null residual is checked by the kernel.
                unsafe { builder.launch(grid_2d(pixels, planes)) }.w()?;
            }
        }

        let blas = device.cublas_handle();
        let tf32 = self.tf32 && x.0.dtype() == DType::F32;
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
                    tf32_gemm(&blas, &stream, &config, columns, &ws, &mut target)
                });
            }
            timed("conv2d.gemm", &device, || {
                // SAFETY: columns hold items * k * len elements, the weight out_channels * k,
                // and the output rows p0..p0 + len of `items` planes of out_channels * pixels.
                unsafe { blas.gemm_strided_batched(config, columns, &ws, &mut target) }.w()
            })
        };
        if kh == 1 && kw == 1 && stride == 1 && pad == 0 {
            gemm(&xs, &mut out, 0, batch, 0, pixels)?;
        } else {
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
            let func = function(&device, &format!("im2col_{name}"), 0)?;
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
                        unsafe { builder.launch(grid_2d(len, items_per_call * channels)) }.w()
                    })?;
                    gemm(&columns.slice(..), &mut out, first, items_per_call, p0, len)?;
                }
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, out_channels, out_h, out_w)),
        ))
    }
}

/// The strided batched GEMM of `config` on f32 data with TF32 tensor-core products.
fn tf32_gemm<T>(
    blas: &candle_core::cuda_backend::cudarc::cublas::CudaBlas,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    config: &StridedBatchedConfig<T>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    c: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, T>,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use std::ffi::c_void;
    let (a_ptr, _a_use) = a.device_ptr(stream);
    let (b_ptr, _b_use) = b.device_ptr(stream);
    let (c_ptr, _c_use) = c.device_ptr_mut(stream);
    let (alpha, beta) = (1.0f32, 1.0f32);
    let g = &config.gemm;
    let f32_type = sys::cudaDataType_t::CUDA_R_32F;
    // SAFETY: the caller's f32 buffers match `config` (as for the plain GEMM); alpha and beta
    // are f32 scalars as the 32F compute types expect.
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            g.transa,
            g.transb,
            g.m,
            g.n,
            g.k,
            (&alpha as *const f32).cast::<c_void>(),
            a_ptr as *const c_void,
            f32_type,
            g.lda,
            config.stride_a,
            b_ptr as *const c_void,
            f32_type,
            g.ldb,
            config.stride_b,
            (&beta as *const f32).cast::<c_void>(),
            c_ptr as *mut c_void,
            f32_type,
            g.ldc,
            config.stride_c,
            config.batch_size,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| candle_core::Error::Msg(format!("cuBLAS: {e:?}")))
}

three_input_op!(Conv2dOp, "atelier-conv2d");

/// `x W^T + bias` for a contiguous `(..., in)` input and `(out, in)` weight: one cuBLAS GEMM
/// and one bias pass.
pub struct LinearOp {
    /// `(out,)`, added to every row.
    pub bias: Option<Tensor>,
}

impl LinearOp {
    fn run<T: GemmScalar>(
        &self,
        x: (&CudaStorage, &Layout),
        weight: (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)>
    where
        candle_core::cuda_backend::cudarc::cublas::CudaBlas: Gemm<T>,
        CudaBlasLT: Matmul<T>,
    {
        let device = x.0.device().clone();
        let dims = x.1.shape().dims();
        let in_dim = dims[dims.len() - 1];
        let rows = x.1.shape().elem_count() / in_dim.max(1);
        let (out_dim, weight_in) = weight.1.shape().dims2()?;
        if weight_in != in_dim {
            candle_core::bail!("linear: input width {in_dim}, weight {weight_in}");
        }
        let xs = contiguous_slice::<T>(x.0, x.1, "linear input")?;
        let ws = contiguous_slice::<T>(weight.0, weight.1, "linear weight")?;
        // SAFETY: the GEMM (beta = 0) writes every element.
        let mut out: CudaSlice<T> = unsafe { device.alloc::<T>(rows * out_dim)? };
        let mut out_dims = dims.to_vec();
        let last = out_dims.len() - 1;
        out_dims[last] = out_dim;
        // f16 with a bias: cuBLASLt adds the bias in the GEMM's epilogue.
        if let (DType::F16, Some(bias)) = (x.0.dtype(), &self.bias) {
            let config = MatmulConfig {
                transa: true,
                transb: false,
                transc: false,
                m: out_dim as u64,
                n: rows as u64,
                k: in_dim as u64,
                alpha: 1.0,
                lda: in_dim as i64,
                ldb: in_dim as i64,
                beta: 0.0,
                ldc: out_dim as i64,
                stride_a: None,
                stride_b: None,
                stride_c: None,
                stride_bias: None,
                batch_size: None,
            };
            let handle = blas_lt(&device)?;
            with_tensor_view::<T, _>(bias, out_dim, "linear bias", |bs| {
                timed("linear.gemm+bias", &device, || {
                    // SAFETY: f16 buffers of out * in, rows * in, rows * out and out elements.
                    unsafe { handle.matmul(config, &ws, &xs, &mut out, Some(&bs), None) }
                        .map_err(lt_error)
                })
            })?;
            return Ok((
                CudaStorage::wrap_cuda_slice(out, device),
                Shape::from(out_dims),
            ));
        }
        let config = GemmConfig {
            transa: sys::cublasOperation_t::CUBLAS_OP_T,
            transb: sys::cublasOperation_t::CUBLAS_OP_N,
            m: out_dim as i32,
            n: rows as i32,
            k: in_dim as i32,
            alpha: T::ONE,
            lda: in_dim as i32,
            ldb: in_dim as i32,
            beta: T::ZERO,
            ldc: out_dim as i32,
        };
        let blas = device.cublas_handle();
        timed("linear.gemm", &device, || {
            // SAFETY: buffers of rows * in, out * in and rows * out elements.
            unsafe { blas.gemm(config, &ws, &xs, &mut out) }.w()
        })?;
        if let Some(bias) = &self.bias {
            with_tensor_view::<T, _>(bias, out_dim, "linear bias", |bs| {
                let func = function(
                    &device,
                    &format!("add_bias_rows_{}", suffix(x.0.dtype())?),
                    0,
                )?;
                let (rows_i, columns_i) = (rows as i64, out_dim as i32);
                let stream = device.cuda_stream();
                let mut builder = stream.launch_builder(&func);
                builder.arg(&mut out).arg(&bs).arg(&rows_i).arg(&columns_i);
                timed("linear.bias", &device, || {
                    // SAFETY: arguments match the kernel's signature.
                    unsafe { builder.launch(grid_2d(out_dim, rows)) }.w()
                })
            })?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from(out_dims),
        ))
    }
}

impl candle_core::CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "atelier-linear"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        match x.dtype() {
            DType::F16 => self.run::<f16>((x, xl), (w, wl)),
            DType::F32 => self.run::<f32>((x, xl), (w, wl)),
            other => candle_core::bail!("linear kernel: unsupported {other:?}"),
        }
    }
}

/// Head widths the attention kernel is built for (a head is zero-padded up to one of them).
pub const ATTENTION_HEAD_DIMS: [usize; 8] = [16, 32, 48, 64, 80, 96, 128, 160];

/// Scaled dot-product attention without a mask over f16 `(batch, tokens, heads * head_dim)`
/// tensors whose rows may be strided (q, k and v can be column ranges of one projection).
pub struct FlashAttentionOp {
    /// Number of heads.
    pub heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Multiplies the scores before the softmax.
    pub scale: f32,
}

impl FlashAttentionOp {
    /// The padded head width the kernel uses, if any.
    pub fn padded_head_dim(head_dim: usize) -> Option<usize> {
        ATTENTION_HEAD_DIMS.iter().copied().find(|&p| p >= head_dim)
    }

    /// Queries per block (8 warps of 16) and keys per tile, as in kernels.cu.
    const BLOCK_QUERIES: usize = 128;
    const BLOCK_KEYS: usize = 64;

    fn shared_bytes(padded: usize) -> usize {
        // Two stages of one key tile and one value tile, rows padded by 8 halves.
        2 * 2 * Self::BLOCK_KEYS * (padded + 8) * 2
    }
}

fn rows_layout(layout: &Layout, what: &str) -> Result<(usize, usize, usize)> {
    let (batch, _, _) = layout.shape().dims3()?;
    let stride = layout.stride();
    if stride[2] != 1 {
        candle_core::bail!("attention {what}: columns must be contiguous");
    }
    let batch_stride = if batch == 1 { 0 } else { stride[0] };
    Ok((layout.start_offset(), stride[1], batch_stride))
}

impl CustomOp3 for FlashAttentionOp {
    fn name(&self) -> &'static str {
        "atelier-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, Shape)> {
        cuda_only(self.name())
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let device = q.device().clone();
        let (batch, nq, _) = ql.shape().dims3()?;
        let nk = kl.shape().dims3()?.1;
        let (q_offset, q_stride, q_batch) = rows_layout(ql, "query")?;
        let (k_offset, kv_stride, kv_batch) = rows_layout(kl, "key")?;
        let (v_offset, v_stride, v_batch) = rows_layout(vl, "value")?;
        if v_stride != kv_stride || v_batch != kv_batch {
            candle_core::bail!("attention: keys and values must share their layout");
        }
        let Some(padded) = Self::padded_head_dim(self.head_dim) else {
            candle_core::bail!("attention kernel: head width {} too large", self.head_dim);
        };
        let width = self.heads * self.head_dim;
        let qs = q.as_cuda_slice::<f16>()?.slice(q_offset..);
        let ks = k.as_cuda_slice::<f16>()?.slice(k_offset..);
        let vs = v.as_cuda_slice::<f16>()?.slice(v_offset..);
        // SAFETY: the kernel writes every element of every query row and head.
        let mut out: CudaSlice<f16> = unsafe { device.alloc::<f16>(batch * nq * width)? };
        let shared = Self::shared_bytes(padded) as u32;
        let func = function(&device, &format!("flash_attention_d{padded}"), shared)?;
        let config = LaunchConfig {
            grid_dim: (
                nq.div_ceil(Self::BLOCK_QUERIES) as u32,
                self.heads as u32,
                batch as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: shared,
        };
        let (nq_i, nk_i, d_i) = (nq as i32, nk as i32, self.head_dim as i32);
        let strides = [
            q_stride as i64,
            kv_stride as i64,
            width as i64,
            q_batch as i64,
            kv_batch as i64,
            (nq * width) as i64,
        ];
        let scale_log2 = self.scale * std::f32::consts::LOG2_E;
        let stream = device.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder
            .arg(&qs)
            .arg(&ks)
            .arg(&vs)
            .arg(&mut out)
            .arg(&nq_i)
            .arg(&nk_i)
            .arg(&d_i);
        for stride in &strides {
            builder.arg(stride);
        }
        builder.arg(&scale_log2);
        // SAFETY: arguments match the kernel's signature; alignment is checked by the caller.
        unsafe { builder.launch(config) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, device),
            Shape::from((batch, nq, width)),
        ))
    }
}

/// Page-locked host bytes (reused: allocating them costs far more than a copy).
pub struct PinnedBytes(candle_core::cuda_backend::cudarc::driver::PinnedHostSlice<u8>);

/// A copy of a byte tensor to the host, queued on its device's stream: nothing waits for it
/// until [`HostCopy::finish`].
pub struct HostCopy {
    buffer: PinnedBytes,
    len: usize,
    /// Kept alive until the copy is done.
    _source: Tensor,
}

impl HostCopy {
    /// Queues the copy of `bytes` (contiguous u8 on a CUDA device) into `buffer`, or a new one
    /// when it is missing or too small.
    pub fn start(bytes: &Tensor, buffer: Option<PinnedBytes>) -> Result<Self> {
        let bytes = bytes.contiguous()?;
        let len = bytes.elem_count();
        let (guard, layout) = bytes.storage_and_layout();
        let Storage::Cuda(storage) = &*guard else {
            candle_core::bail!("HostCopy takes a CUDA tensor");
        };
        let device = storage.device().clone();
        let source = storage
            .as_cuda_slice::<u8>()?
            .slice(layout.start_offset()..layout.start_offset() + len);
        let mut buffer = match buffer {
            Some(buffer) if buffer.0.len() >= len => buffer,
            _ => {
                let context = device.cuda_stream().context().clone();
                // SAFETY: the bytes are written by the copy below before anyone reads them;
                // flags 0: ordinary (cached) page-locked memory, which the CPU reads fast.
                PinnedBytes(unsafe { context.alloc_pinned_with_flags::<u8>(len, 0) }.w()?)
            }
        };
        device
            .cuda_stream()
            .memcpy_dtoh(&source, &mut buffer.0)
            .w()?;
        drop(guard);
        Ok(Self {
            buffer,
            len,
            _source: bytes,
        })
    }

    /// Waits for the copy (not for work queued after it) and returns the bytes and the buffer.
    pub fn finish(self) -> Result<(Vec<u8>, PinnedBytes)> {
        let bytes = self.buffer.0.as_slice().w()?[..self.len].to_vec();
        Ok((bytes, self.buffer))
    }
}
