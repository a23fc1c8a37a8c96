//! Registering a module: check that its bytes are a usable task module by
//! compiling them (off the async threads), then store them under a name.
//! The one path for uploads over HTTP and for the bundled examples a host
//! loads at start, so both validate and name modules the same way. The API
//! holds this handle, never the Wasm runtime itself.

use crate::model::now_ms;
use crate::queue::{ModuleRecord, Queue, QueueError};
use crate::runtime::{Runtime, TaskError};
use std::sync::Arc;

pub use crate::runtime::ModuleStats;

/// Why a module was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The bytes are not a usable task module (with the reason).
    #[error("invalid module: {0}")]
    Invalid(String),
    /// The store refused or failed.
    #[error(transparent)]
    Store(#[from] QueueError),
    /// The compile could not run (the blocking pool is gone).
    #[error("compiling the module failed: {0}")]
    Internal(String),
}

/// A module after registration, and whether its bytes were already known.
#[derive(Debug, Clone)]
pub struct Registered {
    /// The stored record (every name it has).
    pub record: ModuleRecord,
    /// The same bytes were registered before (same id).
    pub existed: bool,
}

/// Validates and stores modules for one host. Cheap to clone.
#[derive(Clone)]
pub struct ModuleRegistry {
    runtime: Runtime,
    queue: Arc<dyn Queue>,
}

impl ModuleRegistry {
    /// A registry compiling with `runtime` and storing in `queue`.
    pub fn new(runtime: Runtime, queue: Arc<dyn Queue>) -> Self {
        ModuleRegistry { runtime, queue }
    }

    /// Compile `bytes` (which proves they are a task module and warms the
    /// compiled cache) and store them, adding `name` to the module's names.
    pub async fn register(
        &self,
        name: Option<String>,
        bytes: Vec<u8>,
    ) -> Result<Registered, RegisterError> {
        let runtime = self.runtime.clone();
        let (compiled, bytes) =
            tokio::task::spawn_blocking(move || runtime.compile(&bytes).map(|c| (c, bytes)))
                .await
                .map_err(|e| RegisterError::Internal(e.to_string()))?
                .map_err(|e| match e {
                    TaskError::InvalidModule(reason) => RegisterError::Invalid(reason),
                    other => RegisterError::Invalid(other.to_string()),
                })?;
        let existed = self.queue.module(&compiled.id).await.is_ok();
        let record = ModuleRecord {
            id: compiled.id.clone(),
            name,
            names: Vec::new(),
            kind: compiled.kind,
            size: bytes.len() as u64,
            created_at: now_ms(),
        };
        let record = self.queue.put_module(record, bytes).await?;
        Ok(Registered { record, existed })
    }

    /// Compiled-module cache figures, for statistics and metrics.
    pub fn stats(&self) -> ModuleStats {
        self.runtime.module_stats()
    }
}
