//! CUDA graphs: a function of fixed-shape tensors captured once per set of input shapes and
//! replayed, so that a UNet step costs the CPU a handful of launches instead of ~1,500 (SD 1.5's
//! step was bound by the time the CPU took to enqueue it, not by the GPU).
//!
//! The first call with new input shapes runs eagerly (loading kernels and filling candle's cache
//! of kernel parameters), the second is captured and replayed, and later ones copy their inputs
//! into the graph's fixed buffers, launch it and copy the output out. A call that cannot be
//! captured (a host copy, an operation that waits for the device) makes the capture fail; those
//! shapes then run eagerly, and [`GraphCache::report`] says why.
//!
//! Memory: a graph keeps its own memory for one call's activations. A capture first hands back
//! what the default pool keeps unused (the eager call's activations), so the two are not held at
//! once; running out of memory in a call gives every graph up and runs that call again eagerly.

use std::sync::Arc;

use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaGraph, sys};
use candle_core::{DType, Device, Shape, Tensor};

use super::memory::release_unused_memory;
use crate::engine::error::{EngineError, Result};

/// Graphs kept at once (one per set of input shapes: a size, a batch, a context length). Each
/// holds its own memory for the activations of one call.
const CAPACITY: usize = 3;

/// The input shapes and precisions that a graph was captured for.
type Key = Vec<(Vec<usize>, DType)>;

enum Entry {
    /// Ran once eagerly, giving an output of this shape and precision.
    Seen(Shape, DType),
    /// Captured: replayed from now on.
    Captured(Captured),
    /// Could not be captured, or failed to run: runs eagerly.
    Refused,
}

/// A captured graph owned by one thread at a time.
struct SendGraph(CudaGraph);

// SAFETY: a CUDA graph must not be used from two threads at once; `GraphCache` is only reached
// through `&mut` (the UNet keeps it in a mutex), so uses are serialised.
unsafe impl Send for SendGraph {}

struct Captured {
    graph: SendGraph,
    /// The fixed input buffers the graph reads.
    inputs: Vec<Tensor>,
    /// The fixed output buffer the graph writes.
    output: Tensor,
}

impl Captured {
    /// Copies `inputs` into the graph's buffers, launches it and returns a copy of the output
    /// (the next launch overwrites the buffer). All of it is queued on the stream: nothing waits.
    fn replay(&self, inputs: &[Tensor]) -> Result<Tensor> {
        for (buffer, input) in self.inputs.iter().zip(inputs) {
            buffer.slice_set(&input.contiguous()?, 0, 0)?;
        }
        self.graph.0.launch().map_err(driver_error)?;
        Ok(self.output.copy()?)
    }
}

/// What [`GraphCache`] did, for the benchmark to report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GraphReport {
    /// Graphs captured so far.
    pub captured: usize,
    /// Kernel launches in the last graph captured.
    pub kernels: usize,
    /// Calls replayed from a graph.
    pub replays: usize,
    /// Why the last refused capture failed.
    pub refusal: Option<String>,
}

/// Captured graphs of one function (the UNet's body), by input shapes.
pub struct GraphCache {
    enabled: bool,
    /// Most recently used last.
    entries: Vec<(Key, Entry)>,
    report: GraphReport,
}

impl std::fmt::Debug for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphCache")
            .field("enabled", &self.enabled)
            .field("entries", &self.entries.len())
            .field("report", &self.report)
            .finish()
    }
}

impl Default for GraphCache {
    fn default() -> Self {
        Self::new(graphs_wanted())
    }
}

/// Whether CUDA graphs are wanted: yes unless `ATELIER_CUDA_GRAPHS` is `0` or `off`.
pub fn graphs_wanted() -> bool {
    !matches!(
        std::env::var("ATELIER_CUDA_GRAPHS").as_deref(),
        Ok("0") | Ok("off") | Ok("false")
    )
}

impl GraphCache {
    /// An empty cache; `enabled: false` always runs eagerly.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            entries: Vec::new(),
            report: GraphReport::default(),
        }
    }

    /// Switches capturing on or off (off drops the graphs and their memory).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if !enabled {
            self.entries.clear();
        }
    }

    /// What has been captured and replayed so far.
    pub fn report(&self) -> GraphReport {
        self.report.clone()
    }

    /// `body(inputs)`: eagerly the first time these input shapes are seen (and whenever
    /// graphs cannot be used: off CUDA, switched off, while profiling), captured the second
    /// time and replayed after. `body` must depend on nothing but its inputs and tensors that
    /// stay where they are (weights; LoRAs are merged into them in place).
    pub fn run(
        &mut self,
        inputs: &[Tensor],
        body: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let device = match inputs.first().map(Tensor::device) {
            Some(Device::Cuda(device))
                if self.enabled
                    && !crate::engine::profile::active()
                    && inputs
                        .iter()
                        .all(|t| t.device().same_device(inputs[0].device())) =>
            {
                device.clone()
            }
            _ => return body(inputs),
        };
        // Kernel parameters (shapes and strides) are uploaded once and kept, as capture needs.
        let _parameters = device.enable_cuda_graph_htod_cache();
        let key: Key = inputs
            .iter()
            .map(|t| (t.dims().to_vec(), t.dtype()))
            .collect();
        match self.run_cached(&device, key.clone(), inputs, &body) {
            Err(error) if error.is_out_of_memory() => {
                // Memory is short (a graph of another size keeps its activations' memory, or a
                // capture needs memory of its own): every graph and what the pools keep unused
                // go back to the driver, these shapes run eagerly from now on, and the call is
                // made again.
                self.report.refusal = Some(format!("out of memory, ran eagerly: {error}"));
                self.entries.clear();
                release_unused_memory(&device);
                let output = body(inputs)?;
                self.remember(key, Entry::Refused);
                Ok(output)
            }
            result => result,
        }
    }

    /// [`GraphCache::run`] for inputs of shapes `key`, whatever memory it takes.
    fn run_cached(
        &mut self,
        device: &CudaDevice,
        key: Key,
        inputs: &[Tensor],
        body: &impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let Some(position) = self.entries.iter().position(|(k, _)| *k == key) else {
            let output = body(inputs)?;
            self.remember(key, Entry::Seen(output.shape().clone(), output.dtype()));
            return Ok(output);
        };
        let (key, entry) = self.entries.remove(position);
        let (entry, output) = match entry {
            Entry::Refused => (Entry::Refused, body(inputs)?),
            Entry::Seen(shape, dtype) => match capture(device, inputs, body, &shape, dtype) {
                Ok((captured, kernels)) => {
                    self.report.captured += 1;
                    self.report.kernels = kernels;
                    self.replay(device, captured, inputs, body)?
                }
                Err(error) => {
                    self.report.refusal = Some(error.to_string());
                    (Entry::Refused, body(inputs)?)
                }
            },
            Entry::Captured(captured) => self.replay(device, captured, inputs, body)?,
        };
        self.remember(key, entry);
        Ok(output)
    }

    /// Replays `captured`; if the launch fails (out of memory, say), gives the graph up and
    /// runs eagerly.
    fn replay(
        &mut self,
        device: &CudaDevice,
        captured: Captured,
        inputs: &[Tensor],
        body: &impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<(Entry, Tensor)> {
        match captured.replay(inputs) {
            Ok(output) => {
                self.report.replays += 1;
                Ok((Entry::Captured(captured), output))
            }
            Err(error) => {
                self.report.refusal = Some(format!("replay failed: {error}"));
                drop(captured);
                release_unused_memory(device);
                Ok((Entry::Refused, body(inputs)?))
            }
        }
    }

    fn remember(&mut self, key: Key, entry: Entry) {
        if self.entries.len() >= CAPACITY {
            self.entries.remove(0);
        }
        self.entries.push((key, entry));
    }
}

fn driver_error(error: impl std::fmt::Debug) -> EngineError {
    EngineError::Device(format!("CUDA graph: {error:?}"))
}

/// Captures `body` on fixed copies of `inputs` writing a fixed output, and checks the graph.
/// Returns it with its number of kernel launches.
fn capture(
    device: &CudaDevice,
    inputs: &[Tensor],
    body: &impl Fn(&[Tensor]) -> Result<Tensor>,
    output_shape: &Shape,
    output_dtype: DType,
) -> Result<(Captured, usize)> {
    let buffers = inputs
        .iter()
        .map(|t| Ok(t.contiguous()?.copy()?))
        .collect::<Result<Vec<_>>>()?;
    let output = Tensor::zeros(output_shape, output_dtype, &Device::Cuda(device.clone()))?;
    // The eager call before left its activations' memory in the default pool, unused now; the
    // graph takes memory of its own for them, so that memory goes back to the driver first
    // (else both are held: twice the activations, which a small GPU does not have).
    release_unused_memory(device);
    let stream = device.cuda_stream();
    let context: Arc<_> = stream.context().clone();
    // An error left over from earlier work is that work's, not the capture's.
    context.check_err().map_err(driver_error)?;
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver_error)?;
    // Every tensor `body` makes is dropped before the capture ends, so the graph frees all it
    // allocates and can be launched again and again.
    let recorded = body(&buffers).and_then(|result| {
        if result.shape() != output_shape || result.dtype() != output_dtype {
            return Err(EngineError::Unsupported(
                "the captured call changed its output's shape".into(),
            ));
        }
        Ok(output.slice_set(&result.contiguous()?, 0, 0)?)
    });
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    // Frees of tensors made during a failed capture record errors of their own: not ours.
    let leftover = context.check_err();
    let graph = match (recorded, ended) {
        (Ok(()), Ok(Some(graph))) => {
            leftover.map_err(driver_error)?;
            graph
        }
        (Err(error), _) => return Err(error),
        (Ok(()), Err(error)) => return Err(driver_error(error)),
        (Ok(()), Ok(None)) => {
            return Err(EngineError::Unsupported(
                "the capture recorded nothing".into(),
            ));
        }
    };
    let kernels = check_nodes(&graph)?;
    graph.upload().map_err(driver_error)?;
    Ok((
        Captured {
            graph: SendGraph(graph),
            inputs: buffers,
            output,
        },
        kernels,
    ))
}

/// Refuses a graph with a copy from or to host memory (it would read memory that is gone by
/// the next launch); returns the number of kernel nodes.
fn check_nodes(graph: &CudaGraph) -> Result<usize> {
    let mut count = 0usize;
    // SAFETY: the graph is alive; the first call asks for the count, the second fills exactly
    // that many node handles; node queries get valid out-pointers.
    unsafe {
        check(sys::cuGraphGetNodes(
            graph.cu_graph(),
            std::ptr::null_mut(),
            &mut count,
        ))?;
        let mut nodes: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
        check(sys::cuGraphGetNodes(
            graph.cu_graph(),
            nodes.as_mut_ptr(),
            &mut count,
        ))?;
        let mut kernels = 0;
        for &node in &nodes[..count] {
            // As the driver's integer: a node type newer than these bindings stays harmless.
            let mut kind: u32 = 0;
            check(sys::cuGraphNodeGetType(
                node,
                (&mut kind as *mut u32).cast(),
            ))?;
            const KERNEL: u32 = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL as u32;
            const MEMCPY: u32 = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEMCPY as u32;
            match kind {
                KERNEL => kernels += 1,
                MEMCPY => {
                    // Zeroed, not `mem::zeroed()`: the struct's memory-type enums have no zero.
                    let mut params = std::mem::MaybeUninit::<sys::CUDA_MEMCPY3D_st>::zeroed();
                    check(sys::cuGraphMemcpyNodeGetParams(node, params.as_mut_ptr()))?;
                    // Read the fields as the driver's integers, whatever it wrote.
                    let base = params.as_ptr().cast::<u8>();
                    let field = |offset: usize| base.add(offset).cast::<u32>().read_unaligned();
                    let pointer = |offset: usize| {
                        base.add(offset).cast::<sys::CUdeviceptr>().read_unaligned()
                    };
                    use std::mem::offset_of;
                    type Params = sys::CUDA_MEMCPY3D_st;
                    let source = (
                        field(offset_of!(Params, srcMemoryType)),
                        pointer(offset_of!(Params, srcDevice)),
                    );
                    let destination = (
                        field(offset_of!(Params, dstMemoryType)),
                        pointer(offset_of!(Params, dstDevice)),
                    );
                    if !is_device_memory(source) || !is_device_memory(destination) {
                        return Err(EngineError::Unsupported(
                            "the captured call copies host memory".into(),
                        ));
                    }
                }
                _ => {}
            }
        }
        Ok(kernels)
    }
}

/// Whether a copy's end, `(memory type, device pointer)` as the driver's integers, is device
/// memory (a unified address is asked about).
fn is_device_memory((memory_type, pointer): (u32, sys::CUdeviceptr)) -> bool {
    const DEVICE: u32 = sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32;
    const ARRAY: u32 = sys::CUmemorytype::CU_MEMORYTYPE_ARRAY as u32;
    const UNIFIED: u32 = sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32;
    match memory_type {
        DEVICE | ARRAY => true,
        UNIFIED => {
            let mut kind: u32 = 0;
            // SAFETY: a driver query about an address, writing one u32 to a valid pointer.
            let status = unsafe {
                sys::cuPointerGetAttribute(
                    (&mut kind as *mut u32).cast(),
                    sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                    pointer,
                )
            };
            status == sys::CUresult::CUDA_SUCCESS && kind == DEVICE
        }
        _ => false,
    }
}

fn check(status: sys::CUresult) -> Result<()> {
    match status {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(driver_error(other)),
    }
}

/// Gives the memory that graphs keep for their activations back to the driver, where no graph
/// is running: between jobs, so that the VAE decode (and other programs) can have it. The next
/// launch maps it again.
pub fn trim_graph_memory(device: &CudaDevice) {
    let stream = device.cuda_stream();
    let context = stream.context();
    if context.bind_to_thread().is_ok() && stream.synchronize().is_ok() {
        // SAFETY: a plain driver call on this context's device; nothing of ours is in flight.
        let _ = unsafe { sys::cuDeviceGraphMemTrim(context.cu_device()) };
    }
}
