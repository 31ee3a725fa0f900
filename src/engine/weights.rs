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
