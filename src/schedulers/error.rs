//! The schedulers' own error type: they know nothing of the engine, which converts these into
//! its errors with the same messages.

/// What can go wrong configuring or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Tensor(candle_core::Error),
    /// The config asks for something not supported.
    #[error("unsupported model: {0}")]
    Unsupported(String),
    /// A parameter (steps, eta, a sigma schedule, replayed noise) is out of range.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
}

// Not `#[from]`: that would also make candle's error the source, and a chain printed with `{:#}`
// would say it twice.
impl From<candle_core::Error> for SchedulerError {
    fn from(error: candle_core::Error) -> Self {
        SchedulerError::Tensor(error)
    }
}

/// Shorthand for scheduler results.
pub type Result<T> = std::result::Result<T, SchedulerError>;
