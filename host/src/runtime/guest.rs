//! Per-store guest bookkeeping shared by both guest kinds: the sandboxed
//! WASI context, limits, captured output, logs, progress, and the mapping
//! from a wasmtime failure to a task's error kind.

use super::capture::OutputCapture;
use super::error::TaskError;
use super::inputs::{InputCursor, ResultPages};
use super::worker::ProgressSink;
use crate::model::{LogLevel, LogLine, TaskLimits};
use std::time::{Duration, Instant};
use wasmtime::{ResourceLimiter, Store, Trap, UpdateDeadline, WasmBacktrace};
use wasmtime_wasi::WasiCtxBuilder;

/// Longest guest log line kept; longer ones are cut.
const MAX_LOG_LINE: usize = 4096;

/// What the host keeps about the task currently running in a store.
pub(super) struct GuestContext {
    pub(super) limiter: MemoryLimiter,
    pub(super) stdout: OutputCapture,
    pub(super) stderr: OutputCapture,
    pub(super) logs: Vec<LogLine>,
    log_bytes: usize,
    log_limit: usize,
    logs_overflowed: bool,
    pub(super) progress: f32,
    pub(super) task_id: String,
    pub(super) attempt: u32,
    pub(super) module: String,
    deadline: Instant,
    on_progress: Option<ProgressSink>,
    /// The fan-in task's read position in its job's results, if it has one.
    pub(super) input: Option<InputCursor>,
}

/// Data of a store: lets generic code reach the guest context of either kind.
pub(super) trait HasGuest: Send + 'static {
    fn guest(&self) -> &GuestContext;
    fn guest_mut(&mut self) -> &mut GuestContext;
}

impl GuestContext {
    pub(super) fn new(module: String) -> Self {
        GuestContext {
            limiter: MemoryLimiter {
                cap: 0,
                hit: false,
                held: 0,
            },
            stdout: OutputCapture::new(0),
            stderr: OutputCapture::new(0),
            logs: Vec::new(),
            log_bytes: 0,
            log_limit: 0,
            logs_overflowed: false,
            progress: 0.0,
            task_id: String::new(),
            attempt: 1,
            module,
            deadline: Instant::now(),
            on_progress: None,
            input: None,
        }
    }

    /// A WASI context with nothing to escape through: no preopened
    /// directories, no environment, no arguments but the module name, no
    /// sockets or name lookup, no host stdio. Clocks and randomness stay.
    pub(super) fn sandbox(&self) -> WasiCtxBuilder {
        let mut wasi = WasiCtxBuilder::new();
        wasi.arg(&self.module)
            .stdout(self.stdout.clone())
            .stderr(self.stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        wasi
    }

    /// Make the context ready for a new task.
    pub(super) fn begin(
        &mut self,
        task_id: &str,
        attempt: u32,
        limits: &TaskLimits,
        on_progress: Option<ProgressSink>,
        input: Option<std::sync::Arc<dyn ResultPages>>,
    ) {
        self.limiter = MemoryLimiter {
            cap: limits.memory_bytes as usize,
            hit: false,
            held: self.limiter.held,
        };
        self.stdout.reset(limits.max_output_bytes);
        self.stderr.reset(limits.max_output_bytes);
        self.logs.clear();
        self.log_bytes = 0;
        self.log_limit = limits.max_output_bytes;
        self.logs_overflowed = false;
        self.progress = 0.0;
        self.task_id = task_id.to_string();
        self.attempt = attempt;
        self.deadline = Instant::now() + limits.timeout;
        self.on_progress = on_progress;
        self.input = input.map(InputCursor::new);
    }

    pub(super) fn log(&mut self, level: LogLevel, mut message: String) {
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        let (task, attempt, module) = (&self.task_id, self.attempt, &self.module);
        match level {
            LogLevel::Trace => {
                tracing::trace!(task_id = %task, attempt, module = %module, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(task_id = %task, attempt, module = %module, "{message}")
            }
            LogLevel::Info => {
                tracing::info!(task_id = %task, attempt, module = %module, "{message}")
            }
            LogLevel::Warn => {
                tracing::warn!(task_id = %task, attempt, module = %module, "{message}")
            }
            LogLevel::Error => {
                tracing::error!(task_id = %task, attempt, module = %module, "{message}")
            }
        }
        if self.log_bytes + message.len() > self.log_limit {
            self.logs_overflowed = true;
            return;
        }
        self.log_bytes += message.len();
        self.logs.push(LogLine { level, message });
    }

    pub(super) fn set_progress(&mut self, fraction: f32) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        self.progress = fraction;
        if let Some(sink) = &self.on_progress {
            sink(fraction);
        }
    }

    /// Whether the guest logged more than its bound (lines past it were dropped).
    pub(super) fn logs_overflowed(&self) -> bool {
        self.logs_overflowed
    }

    /// Map a failed call to the task's error kind. Limits the host enforced
    /// itself are checked first: their traps would otherwise look generic.
    pub(super) fn classify(&self, err: wasmtime::Error, limits: &TaskLimits) -> TaskError {
        if self.stdout.overflowed() {
            return TaskError::OutputTooLarge {
                stream: "stdout",
                limit: limits.max_output_bytes,
            };
        }
        if self.stderr.overflowed() {
            return TaskError::OutputTooLarge {
                stream: "stderr",
                limit: limits.max_output_bytes,
            };
        }
        if self.limiter.hit {
            return TaskError::MemoryLimit {
                limit: limits.memory_bytes,
            };
        }
        match err.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => TaskError::Timeout(limits.timeout),
            Some(Trap::OutOfFuel) => TaskError::FuelExhausted(limits.fuel.unwrap_or_default()),
            Some(trap) => {
                let mut message = trap.to_string();
                if let Some(panic) = panic_message(&self.stderr.snapshot()) {
                    message = format!("{message}; guest {panic}");
                }
                let backtrace = err.downcast_ref::<WasmBacktrace>().map(|bt| bt.to_string());
                TaskError::Trap { message, backtrace }
            }
            None => TaskError::Trap {
                message: format!("{err:#}"),
                backtrace: None,
            },
        }
    }
}

/// The "panicked at ..." message a Rust guest prints to stderr before it traps.
fn panic_message(stderr: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stderr);
    let start = text.find("panicked at")?;
    let message: Vec<&str> = text[start..].lines().take(2).collect();
    Some(message.join(" ").trim().to_string())
}

/// Caps linear memory growth and remembers whether the cap was hit, so the
/// resulting trap (or allocation-failure abort) is reported as `memory_limit`.
pub(super) struct MemoryLimiter {
    cap: usize,
    pub(super) hit: bool,
    /// The largest linear memory the instance has grown to (it never
    /// shrinks): whether it is worth keeping warm.
    pub(super) held: usize,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.hit = true;
            return Ok(false);
        }
        self.held = self.held.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// Apply a task's limits to a store before calling into it: memory cap,
/// deadline checked at every epoch tick (yielding to the executor in
/// between), and fuel when the engine meters it.
pub(super) fn arm_store<T: HasGuest>(
    store: &mut Store<T>,
    limits: &TaskLimits,
    fuel_enabled: bool,
) -> Result<(), TaskError> {
    store.limiter(|data| &mut data.guest_mut().limiter);
    store.epoch_deadline_callback(|ctx| {
        Ok(if Instant::now() >= ctx.data().guest().deadline {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        })
    });
    store.set_epoch_deadline(1);
    if fuel_enabled {
        let fuel = limits.fuel.unwrap_or(u64::MAX);
        store
            .set_fuel(fuel)
            .map_err(|e| TaskError::Internal(format!("cannot set fuel: {e}")))?;
        store
            .fuel_async_yield_interval(Some(10_000_000))
            .map_err(|e| TaskError::Internal(format!("cannot set fuel yield: {e}")))?;
    } else if limits.fuel.is_some() {
        return Err(TaskError::Internal(
            "this host does not meter fuel; start it with fuel enabled".into(),
        ));
    }
    Ok(())
}

/// Run a guest call under the task's wall-clock limit. The epoch check
/// stops guest code; this outer timeout stops a guest blocked in a host
/// call (a WASI sleep, say), which the epoch cannot interrupt.
pub(super) async fn within_deadline<F, R>(
    limits: &TaskLimits,
    tick: Duration,
    call: F,
) -> Result<R, TaskError>
where
    F: std::future::Future<Output = R>,
{
    tokio::time::timeout(limits.timeout + tick, call)
        .await
        .map_err(|_| TaskError::Timeout(limits.timeout))
}
