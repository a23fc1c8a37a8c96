//! Compiled modules: content-addressed by SHA-256, validated and compiled
//! once, kept in an LRU bounded by compiled bytes. With a cache directory,
//! wasmtime's own compilation cache stores the artefacts on disk, so a
//! module compiled before a restart is loaded, not recompiled.

use super::command::{self, CommandState};
use super::component::{self, ComponentState, TaskPre};
use super::engine::EngineHandle;
use super::error::TaskError;
use crate::model::{ModuleId, ModuleKind};
use lru::LruCache;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Where a runtime gets module bytes it has not compiled (the host's module store).
pub trait ModuleSource: Send + Sync {
    /// The module's bytes, if this source has them.
    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>>;
}

/// A module ready to instantiate in microseconds.
pub struct CompiledModule {
    /// SHA-256 of the module bytes.
    pub id: ModuleId,
    /// Component or WASI command.
    pub kind: ModuleKind,
    /// Size of the compiled code, what the LRU bound counts.
    pub compiled_bytes: usize,
    /// How long validation + compilation (or loading from disk) took.
    pub compile_time: Duration,
    pub(super) ready: Ready,
}

/// The pre-linked form of each guest kind.
pub(super) enum Ready {
    Component(TaskPre),
    Command(wasmtime::InstancePre<CommandState>),
}

/// Counters of the compiled-module cache.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ModuleStats {
    /// Lookups answered from memory.
    pub hits: u64,
    /// Lookups that had to compile (or load from disk).
    pub misses: u64,
    /// Modules dropped to stay under the byte bound.
    pub evictions: u64,
    /// Compiled bytes held now.
    pub bytes: usize,
    /// Modules held now.
    pub modules: usize,
    /// Compilations answered by the on-disk cache.
    pub disk_hits: u64,
    /// Compilations the on-disk cache did not have.
    pub disk_misses: u64,
}

pub(super) struct ModuleCache {
    component_linker: wasmtime::component::Linker<ComponentState>,
    command_linker: wasmtime::Linker<CommandState>,
    cap_bytes: usize,
    lru: Mutex<Lru>,
    /// Compiles under way, by module: a second caller for the same module
    /// (a task arriving while its upload compiles) waits for the first.
    in_flight: Mutex<HashMap<ModuleId, Arc<Flight>>>,
    /// Compiles allowed at once: a compile takes every core (Cranelift
    /// compiles functions in parallel) and, for a 20 MB component, hundreds
    /// of MB, so more at once would only share the cores and add the memory.
    permits: Permits,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

struct Lru {
    entries: LruCache<ModuleId, Arc<CompiledModule>>,
    bytes: usize,
}

impl ModuleCache {
    pub(super) fn new(
        engine: &EngineHandle,
        cap_bytes: usize,
        compile_concurrency: usize,
    ) -> Result<Self, super::RuntimeError> {
        let err =
            |e: wasmtime::Error| super::RuntimeError::Engine(format!("cannot link WASI: {e:#}"));
        Ok(ModuleCache {
            component_linker: component::linker(&engine.engine).map_err(err)?,
            command_linker: command::linker(&engine.engine).map_err(err)?,
            cap_bytes,
            lru: Mutex::new(Lru {
                entries: LruCache::unbounded(),
                bytes: 0,
            }),
            in_flight: Mutex::new(HashMap::new()),
            permits: Permits::new(compile_concurrency.max(1)),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        })
    }

    pub(super) fn get(&self, id: &ModuleId) -> Option<Arc<CompiledModule>> {
        let found = self.lock().entries.get(id).cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    pub(super) fn compile(
        &self,
        engine: &EngineHandle,
        bytes: &[u8],
    ) -> Result<Arc<CompiledModule>, TaskError> {
        let id = ModuleId::of(bytes);
        if let Some(found) = self.lock().entries.get(&id).cloned() {
            return Ok(found);
        }
        let (flight, leader) = self.join_or_lead(&id);
        if !leader {
            return flight.wait();
        }
        self.lead(engine, id, bytes, &flight)
    }

    /// The compile of `id` under way, or a new one this caller must run
    /// (`true`: call [`Self::lead`] with it).
    pub(super) fn join_or_lead(&self, id: &ModuleId) -> (Arc<Flight>, bool) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        match in_flight.get(id) {
            Some(flight) => (flight.clone(), false),
            None => {
                let flight = Arc::new(Flight::default());
                in_flight.insert(id.clone(), flight.clone());
                (flight, true)
            }
        }
    }

    /// Run the compile this caller leads (waiting for a permit first), and
    /// hand its outcome to everyone waiting on `flight`.
    pub(super) fn lead(
        &self,
        engine: &EngineHandle,
        id: ModuleId,
        bytes: &[u8],
        flight: &Flight,
    ) -> Result<Arc<CompiledModule>, TaskError> {
        let outcome = {
            let _permit = self.permits.acquire();
            // It may have been compiled while this caller waited for a
            // permit. (The lookup is its own statement: a guard in a
            // `match` scrutinee would be held into `compile_now`.)
            let compiled = self.lock().entries.get(&id).cloned();
            match compiled {
                Some(found) => Ok(found),
                None => self.compile_now(engine, id.clone(), bytes),
            }
        };
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        flight.finish(outcome.clone());
        outcome
    }

    /// Whether `id` is compiled and in memory (no hit or miss counted).
    pub(super) fn contains(&self, id: &ModuleId) -> bool {
        self.lock().entries.contains(id)
    }

    /// The outcome of a compile of `id` under way, once it ends; `None`
    /// when none is (a task waits for its module's upload compile here
    /// instead of fetching and compiling the bytes itself).
    pub(super) fn wait_in_flight(
        &self,
        id: &ModuleId,
    ) -> Option<Result<Arc<CompiledModule>, TaskError>> {
        let flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()?;
        Some(flight.wait())
    }

    fn compile_now(
        &self,
        engine: &EngineHandle,
        id: ModuleId,
        bytes: &[u8],
    ) -> Result<Arc<CompiledModule>, TaskError> {
        let started = Instant::now();
        let invalid =
            |what: &str, e: wasmtime::Error| TaskError::InvalidModule(format!("{what}: {e:#}"));
        let (kind, ready, compiled_bytes) = if wasmparser::Parser::is_component(bytes) {
            let component = wasmtime::component::Component::new(&engine.engine, bytes)
                .map_err(|e| invalid("not a valid component", e))?;
            let pre = self
                .component_linker
                .instantiate_pre(&component)
                .map_err(|e| invalid("component imports something a task may not have", e))?;
            let pre = TaskPre::new(pre)
                .map_err(|e| invalid("component does not export kwq:task/task", e))?;
            let size = image_len(component.image_range());
            (ModuleKind::Component, Ready::Component(pre), size)
        } else if wasmparser::Parser::is_core_wasm(bytes) {
            let module = wasmtime::Module::new(&engine.engine, bytes)
                .map_err(|e| invalid("not a valid module", e))?;
            if !module
                .exports()
                .any(|e| e.name() == "_start" && e.ty().func().is_some())
            {
                return Err(TaskError::InvalidModule(super::validate::NO_START.into()));
            }
            let pre = self
                .command_linker
                .instantiate_pre(&module)
                .map_err(|e| invalid("module imports something other than WASI preview 1", e))?;
            let size = image_len(module.image_range());
            (ModuleKind::WasiCommand, Ready::Command(pre), size)
        } else {
            return Err(TaskError::InvalidModule(super::validate::NOT_WASM.into()));
        };
        metrics::histogram!("kwq_module_compile_seconds").record(started.elapsed().as_secs_f64());
        let compiled = Arc::new(CompiledModule {
            id: id.clone(),
            kind,
            compiled_bytes,
            compile_time: started.elapsed(),
            ready,
        });
        self.insert(compiled.clone());
        Ok(compiled)
    }

    fn insert(&self, module: Arc<CompiledModule>) {
        let mut lru = self.lock();
        lru.bytes += module.compiled_bytes;
        if let Some(old) = lru.entries.put(module.id.clone(), module) {
            lru.bytes -= old.compiled_bytes;
        }
        // Keep at least the newest module, however large.
        while lru.bytes > self.cap_bytes && lru.entries.len() > 1 {
            if let Some((_, evicted)) = lru.entries.pop_lru() {
                lru.bytes -= evicted.compiled_bytes;
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(super) fn stats(&self, engine: &EngineHandle) -> ModuleStats {
        let lru = self.lock();
        ModuleStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            bytes: lru.bytes,
            modules: lru.entries.len(),
            disk_hits: engine
                .disk_cache
                .as_ref()
                .map_or(0, |c| c.cache_hits() as u64),
            disk_misses: engine
                .disk_cache
                .as_ref()
                .map_or(0, |c| c.cache_misses() as u64),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One compile under way, which later callers for the same module wait on.
#[derive(Default)]
pub(super) struct Flight {
    outcome: Mutex<Option<Result<Arc<CompiledModule>, TaskError>>>,
    done: Condvar,
}

impl Flight {
    fn wait(&self) -> Result<Arc<CompiledModule>, TaskError> {
        let mut outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = outcome.as_ref() {
                return outcome.clone();
            }
            outcome = self.done.wait(outcome).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn finish(&self, result: Result<Arc<CompiledModule>, TaskError>) {
        *self.outcome.lock().unwrap_or_else(|p| p.into_inner()) = Some(result);
        self.done.notify_all();
    }
}

/// A counting semaphore for blocking threads (compiles run on tokio's
/// blocking pool, where an async semaphore cannot be awaited).
struct Permits {
    free: Mutex<usize>,
    released: Condvar,
}

/// A held compile permit, given back when dropped.
struct Permit<'a>(&'a Permits);

impl Permits {
    fn new(count: usize) -> Self {
        Permits {
            free: Mutex::new(count),
            released: Condvar::new(),
        }
    }

    fn acquire(&self) -> Permit<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.released.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Permit(self)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.released.notify_one();
    }
}

/// Bytes of a compiled image, what the LRU bound counts.
fn image_len(range: std::ops::Range<*const u8>) -> usize {
    range.end.addr() - range.start.addr()
}
