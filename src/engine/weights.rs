//! Where a component's weights come from: a diffusers safetensors file read as it is, or a part
//! of a single-file checkpoint read through a table of renamed keys. Both are memory-mapped; a
//! renamed tensor is converted (sliced, transposed, squeezed) as it is loaded, so there is never
//! a second copy of the weights.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::error::{EngineError, Result};

/// How a stored tensor becomes the tensor a module asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conversion {
    /// As stored.
    Same,
    /// A 1x1 convolution's weight read as a linear layer's (trailing unit dimensions dropped).
    ConvToLinear,
    /// Part `index` of `parts` equal row blocks (OpenCLIP's stacked q, k, v projections).
    Rows {
        /// Which block, from 0.
        index: usize,
        /// How many blocks the rows hold.
        parts: usize,
    },
    /// The transpose of a matrix (OpenCLIP's `text_projection` is stored as `x @ P`).
    Transpose,
}

/// A tensor of the file, under the name a module asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTensor {
    /// The key in the file.
    pub key: String,
    /// The conversion applied when it is loaded.
    pub conversion: Conversion,
}

impl StoredTensor {
    /// The key as it is, unconverted.
    pub fn same(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            conversion: Conversion::Same,
        }
    }
}

/// Module names (diffusers' layout) to tensors of a file.
pub type KeyMap = HashMap<String, StoredTensor>;

/// A memory-mapped safetensors file, shared by the components that read from it.
#[derive(Clone)]
pub struct MappedFile {
    path: PathBuf,
    tensors: Arc<MmapedSafetensors>,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl MappedFile {
    /// Maps `path` (reads only its header now).
    pub fn open(path: &Path) -> Result<Self> {
        // SAFETY: the file is mapped read-only; Atelier never writes model files, and a file
        // changed underneath us by another program is outside what we can guard against.
        let tensors =
            unsafe { MmapedSafetensors::new(path) }.map_err(|e| EngineError::bad_file(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            tensors: Arc::new(tensors),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every key with its shape.
    pub fn shapes(&self) -> HashMap<String, Vec<usize>> {
        self.tensors
            .tensors()
            .into_iter()
            .map(|(name, view)| (name, view.shape().to_vec()))
            .collect()
    }

    /// Every key with its shape, and the keys sorted.
    pub fn shapes_and_keys(&self) -> (HashMap<String, Vec<usize>>, Vec<String>) {
        let shapes = self.shapes();
        let mut keys: Vec<String> = shapes.keys().cloned().collect();
        keys.sort();
        (shapes, keys)
    }

    /// Loads one tensor as stored (on the CPU, in its own type).
    pub fn load(&self, key: &str) -> Result<Tensor> {
        self.tensors
            .load(key, &Device::Cpu)
            .map_err(|e| EngineError::bad_file(&self.path, e))
    }
}

/// The weights of one component (UNet, VAE, a text encoder).
#[derive(Debug, Clone)]
pub enum ComponentWeights {
    /// A diffusers file whose keys are the modules' names.
    File(PathBuf),
    /// Part of a single-file checkpoint, through renamed keys.
    Renamed {
        /// The checkpoint.
        file: MappedFile,
        /// Module name to stored tensor.
        keys: Arc<KeyMap>,
    },
}

impl ComponentWeights {
    /// The file the weights live in (hashed for the images' metadata).
    pub fn path(&self) -> &Path {
        match self {
            ComponentWeights::File(path) => path,
            ComponentWeights::Renamed { file, .. } => file.path(),
        }
    }

    /// A builder that reads these weights as `dtype` onto `device`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            ComponentWeights::File(path) => {
                // SAFETY: as in `MappedFile::open`.
                unsafe { VarBuilder::from_mmaped_safetensors(&[path], dtype, device) }
                    .map_err(|e| EngineError::bad_file(path, e))
            }
            ComponentWeights::Renamed { file, keys } => Ok(VarBuilder::from_backend(
                Box::new(RenamedTensors {
                    file: file.clone(),
                    keys: keys.clone(),
                }),
                dtype,
                device.clone(),
            )),
        }
    }
}

/// A candle backend that serves a single file's tensors under diffusers' names.
struct RenamedTensors {
    file: MappedFile,
    keys: Arc<KeyMap>,
}

impl RenamedTensors {
    fn load(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let stored = self.keys.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no tensor for {name} (the checkpoint lacks part of this model)",
                self.file.path.display()
            ))
        })?;
        let tensor = self.file.tensors.load(&stored.key, device)?;
        let tensor = match stored.conversion {
            Conversion::Same => tensor,
            Conversion::ConvToLinear => {
                let dims = tensor.dims();
                if dims.len() > 2 && dims[2..].iter().all(|&d| d == 1) {
                    tensor.reshape((dims[0], dims[1]))?
                } else {
                    tensor
                }
            }
            Conversion::Rows { index, parts } => {
                let rows = tensor.dim(0)?;
                if parts == 0 || rows % parts != 0 {
                    return Err(candle_core::Error::Msg(format!(
                        "{}: {} has {rows} rows, not {parts} equal parts",
                        self.file.path.display(),
                        stored.key
                    )));
                }
                let part = rows / parts;
                tensor.narrow(0, index * part, part)?.contiguous()?
            }
            Conversion::Transpose => tensor.t()?.contiguous()?,
        };
        tensor.to_dtype(dtype)
    }
}

impl SimpleBackend for RenamedTensors {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.load(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.load(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.keys.contains_key(name)
    }
}

/// Where a model's weight lives once built: the tensor a module holds, or a block of rows of
/// a tensor that stacks several weights (q, k and v in one GEMM).
#[derive(Debug, Clone)]
pub struct WeightSlot {
    /// The tensor the module holds (shared storage: writing into it changes the model).
    pub tensor: Tensor,
    /// `(first row, rows)` of this weight inside `tensor`, when stacked.
    pub rows: Option<(usize, usize)>,
}

impl WeightSlot {
    /// The weight's current values, in storage of their own (never a view of the model's
    /// tensor, which later writes change).
    pub fn read(&self) -> Result<Tensor> {
        Ok(match self.rows {
            // A block of rows of a contiguous tensor is itself contiguous: `contiguous()` would
            // share the storage. `affine(1, 0)` makes a compact copy, exactly.
            Some((first, rows)) => self.tensor.narrow(0, first, rows)?.affine(1.0, 0.0)?,
            None => self.tensor.copy()?,
        })
    }

    /// Overwrites the weight in place with `values` (its shape, any type: converted).
    pub fn write(&self, values: &Tensor) -> Result<()> {
        let values = values
            .to_device(self.tensor.device())?
            .to_dtype(self.tensor.dtype())?
            .contiguous()?;
        let offset = self.rows.map_or(0, |(first, _)| first);
        self.tensor.slice_set(&values, 0, offset)?;
        Ok(())
    }

    /// The weight's shape.
    pub fn shape(&self) -> Vec<usize> {
        let mut dims = self.tensor.dims().to_vec();
        if let Some((_, rows)) = self.rows {
            dims[0] = rows;
        }
        dims
    }
}

/// Every weight a model's modules hold, by its diffusers name (`unet.down_blocks.0...weight`),
/// recorded while the model is built: what a LoRA changes in place.
#[derive(Debug, Clone, Default)]
pub struct WeightTable {
    slots: HashMap<String, WeightSlot>,
}

impl WeightTable {
    /// The weight named `name`.
    pub fn get(&self, name: &str) -> Option<&WeightSlot> {
        self.slots.get(name)
    }

    /// Every name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(String::as_str)
    }

    /// How many weights.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Adds every weight of `other`.
    pub fn extend(&mut self, other: WeightTable) {
        self.slots.extend(other.slots);
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// The table being recorded on this thread (a model is built on one thread).
struct Recording {
    prefix: String,
    table: WeightTable,
    names_by_id: HashMap<candle_core::TensorId, String>,
}

thread_local! {
    static RECORDING: std::cell::RefCell<Option<Recording>> = const { std::cell::RefCell::new(None) };
}

/// Records, while `build` runs on this thread, every weight read through a builder made by
/// [`recording`] under `prefix` (`unet.`); returns what `build` returned and the table.
pub fn record<T>(prefix: &str, build: impl FnOnce() -> Result<T>) -> Result<(T, WeightTable)> {
    RECORDING.with(|r| {
        *r.borrow_mut() = Some(Recording {
            prefix: prefix.to_string(),
            table: WeightTable::default(),
            names_by_id: HashMap::new(),
        })
    });
    let built = build();
    let recorded = RECORDING.with(|r| r.borrow_mut().take());
    let table = recorded.map(|r| r.table).unwrap_or_default();
    Ok((built?, table))
}

fn note_loaded(name: &str, tensor: &Tensor) {
    RECORDING.with(|r| {
        if let Some(recording) = r.borrow_mut().as_mut() {
            let full = format!("{}{name}", recording.prefix);
            recording.names_by_id.insert(tensor.id(), full.clone());
            recording.table.slots.insert(
                full,
                WeightSlot {
                    tensor: tensor.clone(),
                    rows: None,
                },
            );
        }
    });
}

/// Tells the recording that `parts` now live stacked by rows in `stacked` (called where a
/// module concatenates weights, so that a LoRA still finds each of them).
pub fn note_stacked(parts: &[&Tensor], stacked: &Tensor) {
    RECORDING.with(|r| {
        if let Some(recording) = r.borrow_mut().as_mut() {
            let mut first = 0;
            for part in parts {
                let rows = part.dims().first().copied().unwrap_or(0);
                if let Some(name) = recording.names_by_id.get(&part.id()).cloned() {
                    recording.names_by_id.insert(stacked.id(), name.clone());
                    recording.table.slots.insert(
                        name,
                        WeightSlot {
                            tensor: stacked.clone(),
                            rows: Some((first, rows)),
                        },
                    );
                }
                first += rows;
            }
        }
    });
}

/// A builder over `builder`'s weights that notes every tensor it hands out in the recording
/// of this thread (if one is running).
pub fn recording(builder: VarBuilder<'static>) -> VarBuilder<'static> {
    let dtype = builder.dtype();
    let device = builder.device().clone();
    VarBuilder::from_backend(Box::new(Recorder { inner: builder }), dtype, device)
}

struct Recorder {
    inner: VarBuilder<'static>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .inner
            .get(shape, name)?
            .to_dtype(dtype)?
            .to_device(device)?;
        note_loaded(name, &tensor);
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .inner
            .get_unchecked(name)?
            .to_dtype(dtype)?
            .to_device(device)?;
        note_loaded(name, &tensor);
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stacked_weight_is_read_as_a_copy_and_written_in_place() {
        let device = Device::Cpu;
        let q = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &device).expect("q");
        let k = Tensor::new(&[[5f32, 6.0], [7.0, 8.0]], &device).expect("k");
        let (stacked, table) = record("unet.", || {
            note_loaded("q.weight", &q);
            note_loaded("k.weight", &k);
            let stacked = Tensor::cat(&[&q, &k], 0)?;
            note_stacked(&[&q, &k], &stacked);
            Ok(stacked)
        })
        .expect("recorded");
        let slot = table.get("unet.k.weight").expect("k is recorded");
        assert_eq!(slot.rows, Some((2, 2)));
        let original = slot.read().expect("read");
        slot.write(&Tensor::new(&[[0f32, 0.0], [0.0, 1.0]], &device).expect("values"))
            .expect("write");
        assert_eq!(
            stacked.to_vec2::<f32>().expect("stacked"),
            vec![
                vec![1.0, 2.0],
                vec![3.0, 4.0],
                vec![0.0, 0.0],
                vec![0.0, 1.0]
            ]
        );
        // The copy read before is not a view of the stacked tensor.
        assert_eq!(
            original.to_vec2::<f32>().expect("original"),
            vec![vec![5.0, 6.0], vec![7.0, 8.0]]
        );
        slot.write(&original).expect("restore");
        assert_eq!(
            stacked
                .narrow(0, 2, 2)
                .expect("rows")
                .to_vec2::<f32>()
                .expect("k"),
            k.to_vec2::<f32>().expect("k")
        );
    }
}
