//! Errors of the runtime: setting it up, and a task's failure kinds.

use crate::model::{ErrorKind, ModuleId};
use std::path::PathBuf;
use std::time::Duration;

/// The runtime could not be built.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// wasmtime rejected the engine configuration.
    #[error("cannot configure the Wasm engine: {0}")]
    Engine(String),
    /// The compiled-module cache directory is unusable.
    #[error("cannot use compile cache directory {0}: {1}")]
    CacheDir(PathBuf, String),
}

/// Why one task failed. Each variant maps to one [`ErrorKind`].
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TaskError {
    /// Ran past its wall-clock timeout.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// Tried to grow a linear memory past its cap.
    #[error("memory limit of {limit} bytes exceeded")]
    MemoryLimit {
        /// The cap in bytes.
        limit: u64,
    },
    /// Used up its fuel.
    #[error("fuel budget of {0} exhausted")]
    FuelExhausted(u64),
    /// Trapped.
    #[error("trap: {message}")]
    Trap {
        /// What trapped, with the guest's panic message when it printed one.
        message: String,
        /// The Wasm backtrace, when available.
        backtrace: Option<String>,
    },
    /// Wrote or returned more than allowed.
    #[error("{stream} exceeded its limit of {limit} bytes")]
    OutputTooLarge {
        /// `stdout`, `stderr`, `logs` or `result`.
        stream: &'static str,
        /// The limit in bytes.
        limit: usize,
    },
    /// Not a usable task module.
    #[error("invalid module: {0}")]
    InvalidModule(String),
    /// Not known to this host.
    #[error("unknown module {0}")]
    UnknownModule(ModuleId),
    /// The guest returned an error, or a command exited non-zero.
    #[error("{0}")]
    Guest(String),
    /// The guest's `init` failed.
    #[error("init failed: {0}")]
    InitFailed(String),
    /// A host-side failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl TaskError {
    /// The stable name of this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            TaskError::Timeout(_) => ErrorKind::Timeout,
            TaskError::MemoryLimit { .. } => ErrorKind::MemoryLimit,
            TaskError::FuelExhausted(_) => ErrorKind::FuelExhausted,
            TaskError::Trap { .. } => ErrorKind::Trap,
            TaskError::OutputTooLarge { .. } => ErrorKind::OutputTooLarge,
            TaskError::InvalidModule(_) => ErrorKind::InvalidModule,
            TaskError::UnknownModule(_) => ErrorKind::UnknownModule,
            TaskError::Guest(_) => ErrorKind::GuestError,
            TaskError::InitFailed(_) => ErrorKind::InitFailed,
            TaskError::Internal(_) => ErrorKind::Internal,
        }
    }
}
