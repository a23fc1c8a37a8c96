//! Every wasmtime `Config` setting lives here and nowhere else.

use super::error::RuntimeError;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;
use wasmtime::{
    Cache, CacheConfig, Config, Enabled, Engine, InstanceAllocationStrategy,
    PoolingAllocationConfig, ProfilingStrategy,
};

/// Bytes of each linear memory reset in place (memset of its dirty pages)
/// when an instance ends, rather than returned to the kernel.
const KEEP_RESIDENT_BYTES: usize = 2 << 20;
/// The same for each table.
const KEEP_RESIDENT_TABLE_BYTES: usize = 1 << 20;

/// Host-wide runtime settings, fixed for the life of the engine.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Directory for compiled artefacts, so a restart loads instead of
    /// recompiling; `None` keeps compiled code in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Bound on compiled code kept in memory, in bytes (LRU beyond it).
    pub compiled_cache_bytes: usize,
    /// Module compiles allowed at once (each uses every core and, for a
    /// 20 MB component, hundreds of MB); more wait their turn.
    pub compile_concurrency: usize,
    /// The largest linear memory any task may have; per-task caps are below it.
    pub max_memory_bytes: u64,
    /// Meter fuel, so tasks may carry a fuel budget (costs some speed).
    pub fuel: bool,
    /// How often the epoch ticks: the timeout resolution and yield interval.
    pub epoch_tick: Duration,
    /// Instance slots in the pooling allocator (running + warm instances).
    pub max_instances: u32,
    /// Wasm stack size per instance, in bytes.
    pub max_wasm_stack: usize,
    /// Write `/tmp/perf-PID.map` so `perf record` / `perf report` name the
    /// guest's functions: for finding where a task module spends its time.
    pub perf_map: bool,
    /// An instance whose linear memory grew beyond this is not kept warm
    /// after its task: the memory a big task touched is given back when it
    /// ends instead of staying with an idle instance.
    pub max_warm_memory_bytes: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: None,
            compiled_cache_bytes: 512 << 20,
            compile_concurrency: 1,
            max_memory_bytes: 4 << 30,
            fuel: false,
            epoch_tick: Duration::from_millis(5),
            max_instances: 1000,
            max_wasm_stack: 1 << 20,
            perf_map: false,
            max_warm_memory_bytes: 64 << 20,
        }
    }
}

/// The engine plus the thread that advances its epoch.
pub(super) struct EngineHandle {
    pub(super) engine: Engine,
    pub(super) fuel_enabled: bool,
    pub(super) epoch_tick: Duration,
    pub(super) disk_cache: Option<Cache>,
    pub(super) max_warm_memory_bytes: u64,
    _ticker: EpochTicker,
}

impl EngineHandle {
    pub(super) fn new(config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        let mut pool = PoolingAllocationConfig::default();
        // A Rust component is a handful of core instances (program, WASI
        // adapter, shims), each with a memory or two and a few tables.
        let instances = config.max_instances.max(16);
        pool.total_component_instances(instances)
            .total_core_instances(instances * 4)
            .total_memories(instances * 2)
            .total_tables(instances * 4)
            .total_stacks(instances)
            .max_core_instances_per_component(16)
            .max_memories_per_component(4)
            .max_tables_per_component(16)
            .max_memory_size(config.max_memory_bytes as usize)
            // What an ended instance leaves behind is reset before its slot
            // is reused. Small instances (most tasks) are reset in place:
            // the kernel's PAGEMAP_SCAN (Linux 6.7+) finds their dirty pages
            // within the first few MiB of each memory and wasmtime zeroes
            // just those, with no madvise and no TLB-shootdown IPI. Memory
            // beyond that is returned to the kernel at once (batch size 1):
            // decommits batched 64 at a time once kept gigabytes resident
            // after a few memory-hungry guests died. Measured on 2 cores
            // (`kwq bench runtime` / `grid`): cold no-op 10.2 -> 7.3 µs,
            // no-op tasks end to end 24.4k -> 32k/s.
            .linear_memory_keep_resident(KEEP_RESIDENT_BYTES)
            .table_keep_resident(KEEP_RESIDENT_TABLE_BYTES)
            .pagemap_scan(Enabled::Auto)
            .decommit_batch_size(1);

        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .consume_fuel(config.fuel)
            .max_wasm_stack(config.max_wasm_stack)
            .memory_init_cow(true)
            .profiler(if config.perf_map {
                ProfilingStrategy::PerfMap
            } else {
                ProfilingStrategy::None
            });

        let disk_cache = match &config.cache_dir {
            Some(dir) => {
                // wasmtime's cache accepts only absolute paths; the CLI
                // passes absolute ones, library callers may not.
                let dir = &std::path::absolute(dir)
                    .map_err(|e| RuntimeError::CacheDir(dir.clone(), e.to_string()))?;
                std::fs::create_dir_all(dir)
                    .map_err(|e| RuntimeError::CacheDir(dir.clone(), e.to_string()))?;
                let mut cache_config = CacheConfig::new();
                cache_config.with_directory(dir);
                let cache = Cache::new(cache_config)
                    .map_err(|e| RuntimeError::CacheDir(dir.clone(), e.to_string()))?;
                wasm.cache(Some(cache.clone()));
                Some(cache)
            }
            None => None,
        };

        let engine = Engine::new(&wasm).map_err(|e| RuntimeError::Engine(format!("{e:#}")))?;
        let ticker = EpochTicker::start(engine.clone(), config.epoch_tick);
        Ok(EngineHandle {
            engine,
            fuel_enabled: config.fuel,
            epoch_tick: config.epoch_tick,
            disk_cache,
            max_warm_memory_bytes: config.max_warm_memory_bytes,
            _ticker: ticker,
        })
    }
}

/// Advances the engine's epoch every tick until dropped. The epoch is what
/// interrupts (and yields) running guest code.
struct EpochTicker {
    _stop: mpsc::Sender<()>,
}

impl EpochTicker {
    fn start(engine: Engine, tick: Duration) -> Self {
        let (stop, stopped) = mpsc::channel::<()>();
        std::thread::Builder::new()
            .name("kwq-epoch".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    engine.increment_epoch();
                }
            })
            .expect("cannot start the epoch ticker thread");
        EpochTicker { _stop: stop }
    }
}
