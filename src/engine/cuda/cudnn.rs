//! Convolutions through cuDNN's implicit-GEMM kernels when the library is installed: no im2col
//! copy of the input, which is most of a convolution's time at the VAE's large sizes (cuDNN's
//! kernels are 2-3x our im2col + cuBLAS there). `libcudnn.so.9` is opened at run time, so the
//! CUDA build neither needs cuDNN to build nor to start; without cuDNN 9, or with
//! `ATELIER_CUDNN=0`, [`super::Conv2dOp`] keeps its own im2col + cuBLAS path.
//!
//! Only the dozen functions of cuDNN's legacy convolution API that a forward convolution needs
//! are bound here (cudarc's own cuDNN bindings, with candle's dynamic linking, would link the
//! library into the binary). A plan (descriptors, an algorithm from cuDNN's heuristics, with the
//! precomputed-index implicit GEMM preferred, and its workspace size) is made once per shape on
//! each thread: cuDNN handles are per thread. Whether cuDNN or im2col is faster for a shape is
//! decided by timing both ([`super::conv`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{DType, Result};

/// The oldest cuDNN whose legacy convolution API these bindings follow (9.0).
const MIN_VERSION: usize = 90_000;

type Status = c_int;
type Handle = *mut c_void;
type Descriptor = *mut c_void;

const STATUS_SUCCESS: Status = 0;
const DATA_FLOAT: c_int = 0;
const DATA_HALF: c_int = 2;
const TENSOR_NCHW: c_int = 0;
const CROSS_CORRELATION: c_int = 1;
const DEFAULT_MATH: c_int = 0;
const TENSOR_OP_MATH: c_int = 1;
const FMA_MATH: c_int = 3;
/// The workspace any algorithm may have, however little memory is free (32 MiB).
const WORKSPACE_FLOOR_BYTES: usize = 32 << 20;
/// `CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM`.
const IMPLICIT_PRECOMP_GEMM: c_int = 1;

/// `cudnnConvolutionFwdAlgoPerf_t`.
#[repr(C)]
#[derive(Clone, Copy)]
struct AlgorithmPerf {
    algorithm: c_int,
    status: Status,
    time: f32,
    memory: usize,
    determinism: c_int,
    math_type: c_int,
    reserved: [c_int; 3],
}

const ZERO_PERF: AlgorithmPerf = AlgorithmPerf {
    algorithm: 0,
    status: -1,
    time: 0.0,
    memory: 0,
    determinism: 0,
    math_type: 0,
    reserved: [0; 3],
};

/// The functions used, resolved once from the library (which stays loaded for the process).
struct Api {
    version: usize,
    get_error_string: unsafe extern "C" fn(Status) -> *const c_char,
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    create_tensor: unsafe extern "C" fn(*mut Descriptor) -> Status,
    set_tensor_4d:
        unsafe extern "C" fn(Descriptor, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    destroy_tensor: unsafe extern "C" fn(Descriptor) -> Status,
    create_filter: unsafe extern "C" fn(*mut Descriptor) -> Status,
    set_filter_4d:
        unsafe extern "C" fn(Descriptor, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    destroy_filter: unsafe extern "C" fn(Descriptor) -> Status,
    create_convolution: unsafe extern "C" fn(*mut Descriptor) -> Status,
    set_convolution_2d: unsafe extern "C" fn(
        Descriptor,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
    set_math_type: unsafe extern "C" fn(Descriptor, c_int) -> Status,
    destroy_convolution: unsafe extern "C" fn(Descriptor) -> Status,
    find_algorithms: unsafe extern "C" fn(
        Handle,
        Descriptor,
        Descriptor,
        Descriptor,
        Descriptor,
        c_int,
        *mut c_int,
        *mut AlgorithmPerf,
    ) -> Status,
    workspace_size: unsafe extern "C" fn(
        Handle,
        Descriptor,
        Descriptor,
        Descriptor,
        Descriptor,
        c_int,
        *mut usize,
    ) -> Status,
    convolution_forward: unsafe extern "C" fn(
        Handle,
        *const c_void,
        Descriptor,
        *const c_void,
        Descriptor,
        *const c_void,
        Descriptor,
        c_int,
        *mut c_void,
        usize,
        *const c_void,
        Descriptor,
        *mut c_void,
    ) -> Status,
}

impl Api {
    /// Opens cuDNN 9 by its usual names; `None` when it is not installed or older.
    fn load() -> Option<Self> {
        let names = ["libcudnn.so.9", "libcudnn.so", "cudnn64_9.dll"];
        // SAFETY: loading cuDNN runs its (side-effect free) initialisers only.
        let library = names
            .iter()
            .find_map(|name| unsafe { libloading::Library::new(name) }.ok())?;
        // The library is never unloaded: the function pointers below stay valid.
        let library: &'static libloading::Library = Box::leak(Box::new(library));
        macro_rules! symbol {
            ($name:literal) => {
                // SAFETY: the function types above are cuDNN 9's declarations of these names.
                *unsafe { library.get(concat!($name, "\0").as_bytes()) }.ok()?
            };
        }
        let get_version: unsafe extern "C" fn() -> usize = symbol!("cudnnGetVersion");
        // SAFETY: takes no arguments and only reports the version.
        let version = unsafe { get_version() };
        if version < MIN_VERSION {
            return None;
        }
        Some(Self {
            version,
            get_error_string: symbol!("cudnnGetErrorString"),
            create: symbol!("cudnnCreate"),
            destroy: symbol!("cudnnDestroy"),
            set_stream: symbol!("cudnnSetStream"),
            create_tensor: symbol!("cudnnCreateTensorDescriptor"),
            set_tensor_4d: symbol!("cudnnSetTensor4dDescriptor"),
            destroy_tensor: symbol!("cudnnDestroyTensorDescriptor"),
            create_filter: symbol!("cudnnCreateFilterDescriptor"),
            set_filter_4d: symbol!("cudnnSetFilter4dDescriptor"),
            destroy_filter: symbol!("cudnnDestroyFilterDescriptor"),
            create_convolution: symbol!("cudnnCreateConvolutionDescriptor"),
            set_convolution_2d: symbol!("cudnnSetConvolution2dDescriptor"),
            set_math_type: symbol!("cudnnSetConvolutionMathType"),
            destroy_convolution: symbol!("cudnnDestroyConvolutionDescriptor"),
            find_algorithms: symbol!("cudnnGetConvolutionForwardAlgorithm_v7"),
            workspace_size: symbol!("cudnnGetConvolutionForwardWorkspaceSize"),
            convolution_forward: symbol!("cudnnConvolutionForward"),
        })
    }

    /// `Ok` for success, else an error naming the call and cuDNN's message.
    fn check(&self, what: &str, status: Status) -> Result<()> {
        if status == STATUS_SUCCESS {
            return Ok(());
        }
        // SAFETY: cuDNN returns a static NUL-terminated string for any status.
        let message = unsafe { std::ffi::CStr::from_ptr((self.get_error_string)(status)) };
        candle_core::bail!("cuDNN {what}: {} ({status})", message.to_string_lossy())
    }
}

fn api() -> Option<&'static Api> {
    static API: OnceLock<Option<Api>> = OnceLock::new();
    API.get_or_init(|| {
        if std::env::var("ATELIER_CUDNN").is_ok_and(|value| value == "0") {
            return None;
        }
        Api::load()
    })
    .as_ref()
}

/// Whether convolutions go through cuDNN: version 9 or later found, and not switched off with
/// `ATELIER_CUDNN=0`. Decided once per process.
pub fn available() -> bool {
    api().is_some()
}

/// The version of the cuDNN in use (e.g. 91002 for 9.10.2), `None` when it is not.
pub fn version() -> Option<usize> {
    api().map(|api| api.version)
}

/// The shape of one convolution, as a plan's key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Input (batch, channels, height, width).
    pub input: [usize; 4],
    /// Weight (out channels, in channels, kernel height, kernel width).
    pub weight: [usize; 4],
    /// Stride in both directions.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Output (height, width).
    pub output: [usize; 2],
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PlanKey {
    device: DeviceId,
    shape: ConvShape,
    dtype: DType,
    tf32: bool,
}

/// One cuDNN handle, bound to a device's stream.
struct CudnnHandle {
    api: &'static Api,
    raw: Handle,
}

impl Drop for CudnnHandle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once.
        unsafe { (self.api.destroy)(self.raw) };
    }
}

/// Descriptors and algorithm for one shape.
struct Plan {
    api: &'static Api,
    x: Descriptor,
    w: Descriptor,
    y: Descriptor,
    conv: Descriptor,
    algorithm: c_int,
    workspace_bytes: usize,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: each descriptor was created by its cudnnCreate* and is destroyed once; a null
        // one (creation failed part-way) is skipped.
        unsafe {
            if !self.x.is_null() {
                (self.api.destroy_tensor)(self.x);
            }
            if !self.y.is_null() {
                (self.api.destroy_tensor)(self.y);
            }
            if !self.w.is_null() {
                (self.api.destroy_filter)(self.w);
            }
            if !self.conv.is_null() {
                (self.api.destroy_convolution)(self.conv);
            }
        }
    }
}

thread_local! {
    static HANDLES: RefCell<HashMap<DeviceId, CudnnHandle>> = RefCell::new(HashMap::new());
    static PLANS: RefCell<HashMap<PlanKey, Plan>> = RefCell::new(HashMap::new());
}

fn dims<const N: usize>(values: [usize; N]) -> Result<[c_int; N]> {
    let mut out = [0; N];
    for (slot, value) in out.iter_mut().zip(values) {
        *slot = c_int::try_from(value)
            .map_err(|_| candle_core::Error::Msg(format!("cuDNN: dimension {value} too large")))?;
    }
    Ok(out)
}

impl Plan {
    /// The plan for `key`, with an algorithm whose workspace is at most `workspace_limit` bytes.
    fn new(
        api: &'static Api,
        handle: Handle,
        key: &PlanKey,
        workspace_limit: usize,
    ) -> Result<Self> {
        let shape = &key.shape;
        let data_type = match key.dtype {
            DType::F16 => DATA_HALF,
            DType::F32 => DATA_FLOAT,
            other => candle_core::bail!("cuDNN convolution: no {other:?}"),
        };
        let mut plan = Plan {
            api,
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            algorithm: 0,
            workspace_bytes: 0,
        };
        let [n, c, h, w] = dims(shape.input)?;
        let [k, kc, kh, kw] = dims(shape.weight)?;
        let [out_h, out_w] = dims(shape.output)?;
        let [pad, stride] = dims([shape.padding, shape.stride])?;
        // f32 sums for f16 data, as PyTorch does; f32 exactly unless TF32 is allowed.
        let exact = key.dtype == DType::F32 && !key.tf32;
        let math = if exact { FMA_MATH } else { TENSOR_OP_MATH };
        // SAFETY: each call gets descriptors it created (owned by `plan`, destroyed on drop) and
        // plain integers; the heuristics write at most the requested number of results.
        unsafe {
            api.check("tensor", (api.create_tensor)(&mut plan.x))?;
            api.check(
                "tensor",
                (api.set_tensor_4d)(plan.x, TENSOR_NCHW, data_type, n, c, h, w),
            )?;
            api.check("tensor", (api.create_tensor)(&mut plan.y))?;
            let set_y = (api.set_tensor_4d)(plan.y, TENSOR_NCHW, data_type, n, k, out_h, out_w);
            api.check("tensor", set_y)?;
            api.check("filter", (api.create_filter)(&mut plan.w))?;
            let set_w = (api.set_filter_4d)(plan.w, data_type, TENSOR_NCHW, k, kc, kh, kw);
            api.check("filter", set_w)?;
            api.check("convolution", (api.create_convolution)(&mut plan.conv))?;
            let set_conv = (api.set_convolution_2d)(
                plan.conv,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                CROSS_CORRELATION,
                DATA_FLOAT,
            );
            api.check("convolution", set_conv)?;
            api.check("math type", (api.set_math_type)(plan.conv, math))?;
            let mut results = [ZERO_PERF; 8];
            let mut returned: c_int = 0;
            let find = (api.find_algorithms)(
                handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                results.len() as c_int,
                &mut returned,
                results.as_mut_ptr(),
            );
            api.check("algorithm heuristics", find)?;
            let usable: Vec<&AlgorithmPerf> = results
                .iter()
                .take(returned.clamp(0, results.len() as c_int) as usize)
                .filter(|perf| {
                    perf.status == STATUS_SUCCESS
                        && (!exact || matches!(perf.math_type, DEFAULT_MATH | FMA_MATH))
                        && perf.memory <= workspace_limit
                })
                .collect();
            // The precomputed-index implicit GEMM (on tensor cores unless exact) where it is
            // offered: timed by cuDNN's own search (cudnnFind) on an H200, it was the fastest at
            // each of the eleven UNet and VAE shapes of benches/gpu_kernels.rs; the heuristics'
            // first choice is not always it.
            let usable = usable
                .iter()
                .find(|perf| {
                    perf.algorithm == IMPLICIT_PRECOMP_GEMM && (exact || perf.math_type != FMA_MATH)
                })
                .or_else(|| usable.first())
                .ok_or_else(|| {
                    candle_core::Error::Msg("cuDNN: no algorithm for this convolution".into())
                })?;
            plan.algorithm = usable.algorithm;
            // The algorithm's own math type, as PyTorch sets it (tensor cores where allowed);
            // exact f32 stays on FMA math (DEFAULT would allow TF32 on Ampere and newer).
            let math = if exact { FMA_MATH } else { usable.math_type };
            api.check("math type", (api.set_math_type)(plan.conv, math))?;
            let size = (api.workspace_size)(
                handle,
                plan.x,
                plan.w,
                plan.conv,
                plan.y,
                plan.algorithm,
                &mut plan.workspace_bytes,
            );
            api.check("workspace size", size)?;
        }
        Ok(plan)
    }
}

/// Element types cuDNN convolves here: f16 (with f32 sums) and f32.
pub trait ConvScalar: DeviceRepr + Copy {
    /// candle's name for the type.
    const DTYPE: DType;
}

impl ConvScalar for half::f16 {
    const DTYPE: DType = DType::F16;
}

impl ConvScalar for f32 {
    const DTYPE: DType = DType::F32;
}

/// `out += conv(x, weight)` for contiguous NCHW `x` and `(out, in, kh, kw)` weight, with `out`
/// already holding the bias (and residual). f16 runs on tensor cores with f32 sums; f32 runs
/// exactly unless `tf32` allows TF32 tensor-core products. Errors when cuDNN is not
/// [`available`].
pub fn convolve_accumulate<T: ConvScalar>(
    device: &CudaDevice,
    shape: &ConvShape,
    tf32: bool,
    x: &CudaView<'_, T>,
    weight: &CudaView<'_, T>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    let Some(api) = api() else {
        candle_core::bail!("cuDNN is not available");
    };
    let stream = device.cuda_stream();
    let handle = HANDLES.with(|handles| -> Result<Handle> {
        let mut handles = handles.borrow_mut();
        if let Some(handle) = handles.get(&device.id()) {
            return Ok(handle.raw);
        }
        let mut raw: Handle = std::ptr::null_mut();
        // SAFETY: cudnnCreate writes a new handle; the stream belongs to this device and lives
        // as long as the device (the handle is only used with it).
        unsafe {
            api.check("handle", (api.create)(&mut raw))?;
            let handle = CudnnHandle { api, raw };
            api.check("stream", (api.set_stream)(raw, stream.cu_stream().cast()))?;
            handles.insert(device.id(), handle);
        }
        Ok(raw)
    })?;
    let key = PlanKey {
        device: device.id(),
        shape: *shape,
        dtype: T::DTYPE,
        tf32,
    };
    PLANS.with(|plans| -> Result<()> {
        let mut plans = plans.borrow_mut();
        let plan = match plans.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                // A workspace of at most an eighth of the memory left (PyTorch takes what it
                // can get): on a small GPU a slower algorithm beats running out of memory.
                let free = super::free_memory_bytes(device).unwrap_or(0) as usize;
                let limit = (free / 8).max(WORKSPACE_FLOOR_BYTES);
                entry.insert(Plan::new(api, handle, &key, limit)?)
            }
        };
        let mut workspace = if plan.workspace_bytes > 0 {
            // SAFETY: scratch memory that cuDNN writes before it reads.
            Some(unsafe { device.alloc::<u8>(plan.workspace_bytes)? })
        } else {
            None
        };
        let (x_ptr, _x_use) = x.device_ptr(&stream);
        let (w_ptr, _w_use) = weight.device_ptr(&stream);
        let (y_ptr, _y_use) = out.device_ptr_mut(&stream);
        let workspace_ptr = workspace
            .as_mut()
            .map(|w| w.device_ptr_mut(&stream).0 as *mut c_void)
            .unwrap_or(std::ptr::null_mut());
        // Scaling factors are f32 for both f16 and f32 data.
        let (alpha, beta) = (1.0f32, 1.0f32);
        // SAFETY: the buffers have the plan's shapes and element type (the caller's checks),
        // live on this handle's stream, and beta = 1 accumulates onto what `out` holds.
        let status = unsafe {
            (api.convolution_forward)(
                handle,
                (&alpha as *const f32).cast(),
                plan.x,
                x_ptr as *const c_void,
                plan.w,
                w_ptr as *const c_void,
                plan.conv,
                plan.algorithm,
                workspace_ptr,
                plan.workspace_bytes,
                (&beta as *const f32).cast(),
                plan.y,
                y_ptr as *mut c_void,
            )
        };
        api.check("convolution", status)
    })
}
