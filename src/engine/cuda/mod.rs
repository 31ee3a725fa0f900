//! Atelier's own CUDA kernels (`kernels.cu` and `elementwise.cuh`, compiled to PTX by build.rs)
//! as candle custom ops: fused GroupNorm (+SiLU), GEGLU, convolutions (cuDNN's when installed,
//! else one GEMM per batch item) straight into NCHW with the bias, a per-channel bias and a
//! residual folded in, linear layers (also accumulating onto a residual in place), LayerNorm,
//! the attention blocks' image <-> tokens transposes, 2x upsampling, a flash-style tensor-core
//! attention, and three-pass TF32 products for f32 attention.
//!
//! Inputs must be contiguous f16 or f32 (attention: f16); [`super::fused`] checks and falls back
//! to candle's own operations otherwise.

mod cudnn;
mod graph;
mod memory;

pub use cudnn::{available as cudnn_available, version as cudnn_version};
pub use graph::{GraphCache, GraphReport, graphs_wanted, trim_graph_memory};
pub use memory::{
    HostCopy, PinnedBytes, default_memory_pool, free_memory_bytes, keep_freed_memory,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::{StridedBatchedConfig, sys};
use candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT;
use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use half::f16;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/atelier_kernels.ptx"));
/// The Hopper attention kernel (`attention_sm90.cu`, PTX for `compute_90a`); empty when the
/// nvcc that built Atelier could not target it.
const PTX_SM90: &str = include_str!(concat!(env!("OUT_DIR"), "/atelier_attention_sm90.ptx"));
const THREADS: u32 = 256;
/// Largest im2col buffer (elements): 128 MiB in f16. Bigger convolutions go in bands.
const MAX_COLUMN_ELEMENTS: usize = 1 << 26;

type FunctionCache = HashMap<(DeviceId, String), CudaFunction>;

/// A PTX module of Atelier's kernels.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Module {
    /// kernels.cu: every kernel but the Hopper attention.
    Kernels,
    /// attention_sm90.cu: loads on compute capability 9.0 only.
    HopperAttention,
}

impl Module {
    fn ptx(self) -> &'static str {
        match self {
            Module::Kernels => PTX,
            Module::HopperAttention => PTX_SM90,
        }
    }
}

/// Whether this build holds the Hopper attention kernel (its nvcc could target `compute_90a`).
pub fn hopper_attention_built() -> bool {
    !PTX_SM90.is_empty()
}

/// The Hopper attention kernel `name` (see [`module_function`]) where attention may use it: its
/// PTX was built, the device is compute capability 9.0 (the only one that runs `compute_90a`
/// code), `ATELIER_HOPPER_ATTENTION` is not `0`, and the driver compiled the module (a driver
/// older than the nvcc that built Atelier refuses it: the portable kernel takes over). Decided
/// once per process.
fn hopper_attention_kernel(
    device: &CudaDevice,
    name: &str,
    shared_bytes: u32,
) -> Option<CudaFunction> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    let available = *AVAILABLE.get_or_init(|| {
        let context = device.cuda_stream().context().clone();
        let capability = (
            context.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
            context.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
        );
        hopper_attention_built()
            && matches!(capability, (Ok(9), Ok(0)))
            && !std::env::var("ATELIER_HOPPER_ATTENTION").is_ok_and(|value| value == "0")
            && module_function(device, Module::HopperAttention, name, shared_bytes).is_ok()
    });
    if !available {
        return None;
    }
    module_function(device, Module::HopperAttention, name, shared_bytes).ok()
}

type ModuleCache = HashMap<(DeviceId, Module), Arc<CudaModule>>;

fn modules() -> &'static Mutex<ModuleCache> {
    static MODULES: OnceLock<Mutex<ModuleCache>> = OnceLock::new();
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

/// The kernel `name` of kernels.cu, loaded once per device; `shared_bytes` above 48 KiB is
/// opted into.
fn function(device: &CudaDevice, name: &str, shared_bytes: u32) -> Result<CudaFunction> {
    module_function(device, Module::Kernels, name, shared_bytes)
}

/// [`function`] for a kernel of `module`.
fn module_function(
    device: &CudaDevice,
    module: Module,
    name: &str,
    shared_bytes: u32,
) -> Result<CudaFunction> {
    let key = (device.id(), name.to_string());
    let mut cache = functions()
        .lock()
        .map_err(|_| candle_core::Error::Msg("CUDA kernel cache poisoned".into()))?;
    if let Some(function) = cache.get(&key) {
        return Ok(function.clone());
    }
    let loaded_module = {
        let mut modules = modules()
            .lock()
            .map_err(|_| candle_core::Error::Msg("CUDA module cache poisoned".into()))?;
        match modules.get(&(device.id(), module)) {
            Some(loaded) => loaded.clone(),
            None => {
                let loaded = device
                    .cuda_stream()
                    .context()
                    .load_module(Ptx::from_src(module.ptx()))
                    .w()?;
                modules.insert((device.id(), module), loaded.clone());
                loaded
            }
        }
    };
    let function = loaded_module.load_function(name).w()?;
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

/// `CustomOp1` for an op with a generic `run(x, layout)` over f16 and f32: CUDA only.
macro_rules! one_input_op {
    ($op:ty, $label:literal) => {
        impl CustomOp1 for $op {
            fn name(&self) -> &'static str {
                $label
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
                    other => candle_core::bail!("{}: unsupported {other:?}", $label),
                }
            }
        }
    };
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

mod attention;
mod conv;
mod elementwise;
mod linear;

pub use attention::{ATTENTION_HEAD_DIMS, AttentionScoresOp, FlashAttentionOp, Tf32x3MatmulOp};
pub use conv::{Conv2dOp, ConvRoute, force_convolution_route};
pub use elementwise::{LayerNormOp, TransposeOp, Upsample2xOp};
pub use linear::{LinearAddOp, LinearOp};

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

/// [`with_tensor_view`] for an optional tensor: `f` gets `None` when there is none.
fn with_optional_view<T: CudaDType, R>(
    tensor: Option<&Tensor>,
    elements: usize,
    what: &str,
    f: impl FnOnce(Option<CudaView<'_, T>>) -> Result<R>,
) -> Result<R> {
    match tensor {
        Some(tensor) => with_tensor_view(tensor, elements, what, |view| f(Some(view))),
        None => f(None),
    }
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

one_input_op!(GegluOp, "atelier-geglu");

/// The strided batched GEMM of `config` on f32 data with TF32 tensor-core products, alpha 1,
/// accumulating onto `c` times `beta` (`config`'s own alpha and beta are not read).
fn tf32_gemm<T>(
    blas: &candle_core::cuda_backend::cudarc::cublas::CudaBlas,
    stream: &Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>,
    config: &StridedBatchedConfig<T>,
    a: &CudaView<'_, T>,
    b: &CudaView<'_, T>,
    c: &mut candle_core::cuda_backend::cudarc::driver::CudaViewMut<'_, T>,
    beta: f32,
) -> Result<()> {
    use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use std::ffi::c_void;
    let (a_ptr, _a_use) = a.device_ptr(stream);
    let (b_ptr, _b_use) = b.device_ptr(stream);
    let (c_ptr, _c_use) = c.device_ptr_mut(stream);
    let alpha = 1.0f32;
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

/// Element types of the GEMM-based operations (f16, f32), with their 0 and 1 (and candle's
/// name for the type, [`cudnn::ConvScalar::DTYPE`]).
trait GemmScalar: CudaDType + DeviceRepr + cudnn::ConvScalar + Copy {
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
