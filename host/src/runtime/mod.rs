//! The one place that knows wasmtime: engine settings, compiled-module
//! cache, sandbox, per-task limits and warm instances.
//!
//! Why async wasmtime rather than `spawn_blocking`: a task may sleep or wait
//! inside a WASI call, and only an async call can be abandoned there when its
//! timeout passes (a blocked thread cannot be interrupted). CPU-bound guest
//! code yields to the executor at every epoch tick (5 ms), so a worker never
//! holds a tokio thread for longer than one tick, and the same epoch check
//! enforces the wall-clock deadline inside tight loops. The measured cost of
//! the async path is in the README's performance table.

mod capture;
mod command;
mod component;
mod engine;
mod error;
mod guest;
mod http_refused;
mod inputs;
mod modules;
mod validate;
mod worker;

pub use engine::RuntimeConfig;
pub use error::{RuntimeError, TaskError};
pub use inputs::{InputResult, ResultPages};
pub use modules::{CompiledModule, ModuleSource, ModuleStats};
pub use worker::{ProgressSink, TaskReport, TaskSpec, Worker, WorkerStats};

use crate::model::ModuleId;
use std::sync::{Arc, RwLock};

/// A host's Wasm runtime: one engine, one module cache, many workers.
/// Cheap to clone; every clone shares the same engine and caches.
#[derive(Clone)]
pub struct Runtime {
    shared: Arc<EngineAndCaches>,
}

/// What every worker of a runtime shares.
struct EngineAndCaches {
    engine: engine::EngineHandle,
    modules: modules::ModuleCache,
    source: RwLock<Option<Arc<dyn ModuleSource>>>,
}

impl Runtime {
    /// Build the engine (pooling allocator, epoch ticker, optional fuel and
    /// on-disk compilation cache) and empty caches.
    pub fn new(config: RuntimeConfig) -> Result<Self, RuntimeError> {
        let engine = engine::EngineHandle::new(&config)?;
        let modules = modules::ModuleCache::new(
            &engine,
            config.compiled_cache_bytes,
            config.compile_concurrency,
        )?;
        Ok(Runtime {
            shared: Arc::new(EngineAndCaches {
                engine,
                modules,
                source: RwLock::new(None),
            }),
        })
    }

    /// Where to fetch module bytes that are not compiled on this host yet
    /// (or were evicted from the compiled cache).
    pub fn set_module_source(&self, source: Arc<dyn ModuleSource>) {
        *self.shared.source.write().expect("module source lock") = Some(source);
    }

    /// Validate and compile module bytes (or find them already compiled).
    /// CPU-heavy on a miss: call it from a blocking context.
    pub fn compile(&self, bytes: &[u8]) -> Result<Arc<CompiledModule>, TaskError> {
        self.shared.modules.compile(&self.shared.engine, bytes)
    }

    /// Check that `bytes` are a task module without compiling them
    /// (milliseconds): its kind, or the reason it is not one. The compile
    /// checks again; this lets an upload be answered before it.
    pub fn validate(&self, bytes: &[u8]) -> Result<crate::model::ModuleKind, TaskError> {
        validate::validate(bytes)
    }

    /// Compile `bytes` on the blocking pool, logging the outcome. From the
    /// moment this returns, a task that needs the module waits for this
    /// compile (see [`Self::module`]) rather than looking for the bytes.
    /// Call from within a tokio runtime.
    pub fn compile_in_background(&self, bytes: Arc<Vec<u8>>) {
        let id = ModuleId::of(&bytes);
        if self.shared.modules.contains(&id) {
            return;
        }
        let (flight, leader) = self.shared.modules.join_or_lead(&id);
        if !leader {
            return;
        }
        let runtime = self.clone();
        tokio::task::spawn_blocking(move || {
            let shared = &runtime.shared;
            match shared
                .modules
                .lead(&shared.engine, id.clone(), &bytes, &flight)
            {
                Ok(compiled) => tracing::info!(
                    module = %id,
                    compile_ms = compiled.compile_time.as_millis() as u64,
                    "module compiled"
                ),
                Err(error) => tracing::warn!(module = %id, %error, "module does not compile"),
            }
        });
    }

    /// A compiled module by id, for async callers: a cached one at once; on
    /// a miss the fetch (which may wait for bytes still on their way, on a
    /// Kafka grid) and the compile run on a blocking thread, so one slow
    /// module never stalls the other tasks of an async thread.
    pub async fn module_for_task(&self, id: &ModuleId) -> Result<Arc<CompiledModule>, TaskError> {
        if let Some(found) = self.shared.modules.get(id) {
            return Ok(found);
        }
        let (runtime, id) = (self.clone(), id.clone());
        tokio::task::spawn_blocking(move || runtime.module(&id))
            .await
            .unwrap_or_else(|e| Err(TaskError::Internal(format!("module fetch failed: {e}"))))
    }

    /// A compiled module by id, compiling it from the module source on a
    /// miss. Blocking: from async code use [`Self::module_for_task`].
    pub fn module(&self, id: &ModuleId) -> Result<Arc<CompiledModule>, TaskError> {
        if let Some(found) = self.shared.modules.get(id) {
            return Ok(found);
        }
        if let Some(outcome) = self.shared.modules.wait_in_flight(id) {
            return outcome;
        }
        let source = self
            .shared
            .source
            .read()
            .expect("module source lock")
            .clone();
        let bytes = source
            .and_then(|s| s.module_bytes(id))
            .ok_or_else(|| TaskError::UnknownModule(id.clone()))?;
        if ModuleId::of(&bytes) != *id {
            return Err(TaskError::InvalidModule(format!(
                "stored bytes of module {id} do not match its hash"
            )));
        }
        self.compile(&bytes)
    }

    /// A new worker with room for `max_warm` warm instances.
    pub fn worker(&self, max_warm: usize) -> Worker {
        Worker::new(self.clone(), max_warm)
    }

    /// Compiled-module cache statistics.
    pub fn module_stats(&self) -> ModuleStats {
        self.shared.modules.stats(&self.shared.engine)
    }

    /// Whether the engine meters fuel (needed for `TaskLimits::fuel`).
    pub fn fuel_enabled(&self) -> bool {
        self.shared.engine.fuel_enabled
    }
}
