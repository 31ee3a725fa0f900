//! The engine's one error type.

use std::path::PathBuf;

/// Everything that can go wrong inside the engine, each with a message an artist can act on.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A tensor operation failed (shape mismatch, out of memory, device error); running out of
    /// GPU memory says what to try.
    #[error("tensor error: {0}{hint}", hint = out_of_memory_hint(.0))]
    Tensor(candle_core::Error),
    /// A model folder or file is not where it should be.
    #[error("{what} not found: {path}")]
    MissingFile {
        /// What the file is, e.g. "UNet weights".
        what: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// A file exists but cannot be read or parsed.
    #[error("cannot read {path}: {message}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// Downloading from the Hugging Face Hub failed.
    #[error("cannot download {file} from {repo}: {message}")]
    Download {
        /// The repo id.
        repo: String,
        /// The file inside the repo.
        file: String,
        /// Why.
        message: String,
    },
    /// The model's configuration is something Atelier does not support.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A generation parameter is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The requested device is not available in this build or on this machine.
    #[error("device unavailable: {0}")]
    Device(String),
    /// The computation produced NaN or infinite values; nothing was saved.
    #[error("{0}")]
    NotFinite(String),
    /// The job was cancelled through its cancel flag.
    #[error("cancelled")]
    Cancelled,
}

/// Shorthand for engine results.
pub type Result<T> = std::result::Result<T, EngineError>;

// Not `#[from]`: that would also make candle's error the source, and a chain printed with
// `{:#}` would say it twice.
impl From<candle_core::Error> for EngineError {
    fn from(error: candle_core::Error) -> Self {
        EngineError::Tensor(error)
    }
}

/// The schedulers' errors, with their messages unchanged.
impl From<crate::schedulers::error::SchedulerError> for EngineError {
    fn from(error: crate::schedulers::error::SchedulerError) -> Self {
        use crate::schedulers::error::SchedulerError;
        match error {
            SchedulerError::Tensor(e) => EngineError::Tensor(e),
            SchedulerError::Unsupported(m) => EngineError::Unsupported(m),
            SchedulerError::InvalidParameter(m) => EngineError::InvalidParameter(m),
        }
    }
}

/// Whether an error's text says that the GPU ran out of memory (as the CUDA driver says it).
fn says_out_of_memory(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("out of memory") || text.contains("out_of_memory")
}

/// Whether a tensor error is the GPU running out of memory.
fn is_out_of_memory_error(error: &candle_core::Error) -> bool {
    says_out_of_memory(&error.to_string())
}

/// What to try when the GPU ran out of memory (empty for other errors).
fn out_of_memory_hint(error: &candle_core::Error) -> &'static str {
    if is_out_of_memory_error(error) {
        "\nThe GPU ran out of memory. Try: Model options -> Text encoders on the CPU \
         (--text-encoders-on-cpu), Settings -> VAE tiling: always (--vae-tiling on), a smaller \
         image or batch, or closing other programs that use the GPU."
    } else {
        ""
    }
}

impl EngineError {
    /// Whether this is the GPU running out of memory (a tensor operation's, or a driver call's
    /// reported as a device error).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            EngineError::Tensor(error) => is_out_of_memory_error(error),
            EngineError::Device(message) => says_out_of_memory(message),
            _ => false,
        }
    }

    /// A [`EngineError::BadFile`] for `path`.
    pub fn bad_file(path: impl Into<PathBuf>, message: impl ToString) -> Self {
        EngineError::BadFile {
            path: path.into(),
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_says_what_to_try() {
        let error = EngineError::from(candle_core::Error::Msg(
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")".into(),
        ));
        let text = error.to_string();
        assert!(text.contains("Text encoders on the CPU"), "{text}");
        assert!(text.contains("VAE tiling"), "{text}");
        assert!(error.is_out_of_memory());
        let other = EngineError::from(candle_core::Error::Msg("shape mismatch".into()));
        assert_eq!(other.to_string(), "tensor error: shape mismatch");
        assert!(!other.is_out_of_memory());
        let graph = EngineError::Device("CUDA graph: DriverError(CUDA_ERROR_OUT_OF_MEMORY)".into());
        assert!(graph.is_out_of_memory());
    }
}
