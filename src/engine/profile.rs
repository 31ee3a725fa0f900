//! Where a UNet step's time goes, for `atelier bench --profile`.
//!
//! When switched on (for the current thread), [`scope`] synchronises the device before and after
//! each named operation and adds the wall time to that name, so the totals are GPU time plus one
//! launch each; off, it only runs the operation.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Device;

use super::error::Result;

thread_local! {
    static TOTALS: RefCell<Option<BTreeMap<&'static str, (f64, usize)>>> = const { RefCell::new(None) };
}

/// Starts (or restarts) collecting on this thread.
pub fn start() {
    TOTALS.with(|totals| *totals.borrow_mut() = Some(BTreeMap::new()));
}

/// Stops collecting and returns `(name, total milliseconds, calls)` per name.
pub fn finish() -> Vec<(&'static str, f64, usize)> {
    TOTALS.with(|totals| {
        totals
            .borrow_mut()
            .take()
            .map(|map| map.into_iter().map(|(k, (ms, n))| (k, ms, n)).collect())
            .unwrap_or_default()
    })
}

/// Whether profiling is on for this thread (it synchronises, so CUDA graphs stay off).
pub fn active() -> bool {
    TOTALS.with(|totals| totals.borrow().is_some())
}

/// Runs `f`, timing it under `name` when profiling is on.
pub fn scope<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    scope_with(name, || device.synchronize(), f)
}

/// [`scope`] with its own way of waiting for the device (inside candle's custom operations).
pub fn scope_with<T, E: From<candle_core::Error>>(
    name: &'static str,
    synchronize: impl Fn() -> candle_core::Result<()>,
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    if !active() {
        return f();
    }
    synchronize()?;
    let started = Instant::now();
    let value = f()?;
    synchronize()?;
    let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
    TOTALS.with(|totals| {
        if let Some(map) = totals.borrow_mut().as_mut() {
            let entry = map.entry(name).or_insert((0.0, 0));
            entry.0 += elapsed_ms;
            entry.1 += 1;
        }
    });
    Ok(value)
}

/// Peak bytes allocated from the GPU's default memory pool (which candle allocates from) and
/// by CUDA graphs since the last [`reset_peak_memory`]: weights and activations, like
/// PyTorch's `max_memory_allocated`. `None` off CUDA.
pub fn peak_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return pool_attribute(cuda, false, false);
    }
    let _ = device;
    None
}

/// Peak bytes the GPU's default memory pool held from the device since the last
/// [`reset_peak_memory`] (allocated plus what it kept for reuse: what a smaller GPU must have,
/// besides the CUDA context itself). `None` off CUDA.
pub fn peak_reserved_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return pool_attribute(cuda, false, true);
    }
    let _ = device;
    None
}

/// Memory a CUDA GPU can still give this process: the driver's free figure (other processes
/// counted) plus what the default memory pool holds unused for reuse. `None` elsewhere.
pub fn free_gpu_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        return super::cuda::free_memory_bytes(cuda);
    }
    let _ = device;
    None
}

/// Starts a new peak-memory measurement at the current usage.
pub fn reset_peak_memory(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        pool_attribute(cuda, true, false);
        pool_attribute(cuda, true, true);
    }
    let _ = device;
}

#[cfg(feature = "cuda")]
/// The high water of allocated (or, with `reserved`, held) bytes of the default pool plus that
/// of the memory CUDA graphs keep for their activations (each pool's own peak: an upper bound
/// of the two together); with `reset`, starts both again at the current figure.
fn pool_attribute(device: &candle_core::CudaDevice, reset: bool, reserved: bool) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = super::cuda::default_memory_pool(device)?;
    let context = device.cuda_stream().context().clone();
    let (attribute, graph_attribute) = if reserved {
        (
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
        )
    } else {
        (
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            sys::CUgraphMem_attribute::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
        )
    };
    let mut value: u64 = 0;
    let mut graph_value: u64 = 0;
    // SAFETY: plain driver queries on the device's default pool and graph memory with valid
    // out-pointers (resets write the zero they point to).
    unsafe {
        let (status, graph_status) = if reset {
            (
                sys::cuMemPoolSetAttribute(pool, attribute, (&mut value as *mut u64).cast()),
                sys::cuDeviceSetGraphMemAttribute(
                    context.cu_device(),
                    graph_attribute,
                    (&mut graph_value as *mut u64).cast(),
                ),
            )
        } else {
            (
                sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast()),
                sys::cuDeviceGetGraphMemAttribute(
                    context.cu_device(),
                    graph_attribute,
                    (&mut graph_value as *mut u64).cast(),
                ),
            )
        };
        if graph_status != sys::CUresult::CUDA_SUCCESS {
            graph_value = 0;
        }
        (status == sys::CUresult::CUDA_SUCCESS).then_some(value + graph_value)
    }
}
