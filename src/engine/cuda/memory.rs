//! GPU memory as the engine manages it: the device's default memory pool (free memory, keeping
//! what is freed) and copies to page-locked host memory that nothing waits for until they are
//! read (the live previews).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::WrapErr;
use candle_core::{Result, Storage, Tensor};

/// The device's default memory pool (which candle allocates from), with the device's context
/// bound to this thread; `None` when the driver refuses.
pub fn default_memory_pool(
    device: &CudaDevice,
) -> Option<candle_core::cuda_backend::cudarc::driver::sys::CUmemoryPool> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let context = device.cuda_stream().context().clone();
    context.bind_to_thread().ok()?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: a driver query on this context's device writing one pool handle.
    unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, context.cu_device()) }
        .result()
        .ok()?;
    Some(pool)
}

/// Memory the GPU can still give this process: the driver's free figure (other processes
/// counted) plus what the default memory pool holds unused for reuse. `None` when the driver
/// does not say.
pub fn free_memory_bytes(device: &CudaDevice) -> Option<u64> {
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUmemPool_attribute};
    let pool = default_memory_pool(device)?;
    let (free, _total) = candle_core::cuda_backend::cudarc::driver::result::mem_get_info().ok()?;
    let pool_value = |attribute: CUmemPool_attribute| -> Option<u64> {
        let mut value = 0u64;
        // SAFETY: a driver query of the default pool writing one u64.
        unsafe { sys::cuMemPoolGetAttribute(pool, attribute, (&mut value as *mut u64).cast()) }
            .result()
            .ok()?;
        Some(value)
    };
    let pool_spare = pool_value(CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
        .zip(pool_value(
            CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT,
        ))
        .map_or(0, |(reserved, used)| reserved.saturating_sub(used));
    Some(free as u64 + pool_spare)
}

/// Hands back to the driver what the device's default memory pool (which candle allocates from)
/// and the CUDA graphs' memory keep unused, once the stream's queued work is done: for when
/// memory is short. The pools map memory again as they need it.
pub fn release_unused_memory(device: &CudaDevice) {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Some(pool) = default_memory_pool(device) else {
        return;
    };
    let stream = device.cuda_stream();
    if stream.synchronize().is_ok() {
        // SAFETY: plain driver calls on this context's device and its default pool (bound to
        // this thread by `default_memory_pool`); nothing of ours is in flight.
        unsafe {
            let _ = sys::cuMemPoolTrimTo(pool, 0);
            let _ = sys::cuDeviceGraphMemTrim(stream.context().cu_device());
        }
    }
}

/// Lets the device's default memory pool (which candle allocates from) keep what is freed for
/// reuse, as PyTorch's caching allocator does, instead of handing everything back to the driver
/// at each synchronisation (its default): a VAE decode after a synchronised step otherwise maps
/// every one of its large activations and workspaces afresh.
pub fn keep_freed_memory(device: &CudaDevice) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let pool = default_memory_pool(device)
        .ok_or_else(|| candle_core::Error::Msg("no default GPU memory pool".into()))?;
    let mut threshold = u64::MAX;
    // SAFETY: a driver call on the default pool with a u64 value, as the release-threshold
    // attribute expects.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .w()
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
