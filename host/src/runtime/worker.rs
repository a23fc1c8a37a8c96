//! A worker runs one task at a time and keeps warm instances: components
//! whose `init` already ran for a (module, affinity key) pair, reused by the
//! next task with the same pair, evicted least-recently-used.

use super::Runtime;
use super::command;
use super::component::{self, ComponentState, TaskBindings};
use super::error::TaskError;
use super::guest::{GuestContext, HasGuest, arm_store, within_deadline};
use super::inputs::{ResultPages, ndjson_stdin};
use super::modules::{CompiledModule, Ready};
use crate::model::{LogLine, ModuleId, TaskLimits};
use lru::LruCache;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmtime::Store;

/// Called with a task's progress (0.0 ..= 1.0) each time the guest reports it.
pub type ProgressSink = Arc<dyn Fn(f32) + Send + Sync>;

/// One task to run.
#[derive(Clone)]
pub struct TaskSpec {
    /// The task's id, visible to the guest.
    pub task_id: String,
    /// Attempt number, from 1, visible to the guest.
    pub attempt: u32,
    /// Module to run.
    pub module: ModuleId,
    /// Input bytes.
    pub payload: Vec<u8>,
    /// Warm-instance key; `None` runs on a fresh instance.
    pub affinity: Option<String>,
    /// Resource limits.
    pub limits: TaskLimits,
    /// Where live progress goes, if anywhere.
    pub on_progress: Option<ProgressSink>,
    /// A fan-in task's input: the results of the job it reads, paged
    /// (`next-results` for a component, NDJSON stdin for a command).
    pub input: Option<Arc<dyn ResultPages>>,
}

/// Everything a run produced, success or not.
#[derive(Debug, Clone)]
pub struct TaskReport {
    /// The result bytes, or why there are none.
    pub outcome: Result<Vec<u8>, TaskError>,
    /// Captured stdout (for commands, the result itself is stdout).
    pub stdout: Vec<u8>,
    /// Captured stderr.
    pub stderr: Vec<u8>,
    /// Lines logged through `kwq:task/context.log`.
    pub logs: Vec<LogLine>,
    /// Last progress the guest reported.
    pub progress: f32,
    /// Whether a warm instance was reused (no instantiation, no `init`).
    pub warm: bool,
    /// Wall time of instantiate + init + run.
    pub elapsed: Duration,
}

/// Counters of one worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct WorkerStats {
    /// Tasks run.
    pub tasks: u64,
    /// Tasks that reused a warm instance.
    pub warm_hits: u64,
    /// Instances created.
    pub instantiations: u64,
    /// `init` calls made.
    pub inits: u64,
    /// Warm instances dropped to stay under the bound.
    pub warm_evictions: u64,
}

/// A component instance kept alive after `init` for its affinity key.
struct WarmInstance {
    store: Store<ComponentState>,
    bindings: TaskBindings,
}

/// Runs tasks one at a time. Not shared: give each concurrent worker its own.
pub struct Worker {
    runtime: Runtime,
    warm: LruCache<(ModuleId, String), WarmInstance>,
    max_warm: usize,
    stats: WorkerStats,
}

impl Worker {
    pub(super) fn new(runtime: Runtime, max_warm: usize) -> Self {
        Worker {
            runtime,
            warm: LruCache::unbounded(),
            max_warm,
            stats: WorkerStats::default(),
        }
    }

    /// This worker's counters.
    pub fn stats(&self) -> WorkerStats {
        self.stats
    }

    /// The (module, affinity key) pairs warm on this worker, most recent first.
    pub fn warm_keys(&self) -> Vec<(ModuleId, String)> {
        self.warm.iter().map(|(key, _)| key.clone()).collect()
    }

    /// Whether this worker holds a warm instance for the pair.
    pub fn is_warm(&self, module: &ModuleId, affinity: &str) -> bool {
        self.warm.contains(&(module.clone(), affinity.to_string()))
    }

    /// Run one task to completion, failure or timeout. Never panics on guest
    /// behaviour; a failed instance is discarded, never reused.
    pub async fn run(&mut self, spec: TaskSpec) -> TaskReport {
        let started = Instant::now();
        self.stats.tasks += 1;
        let module = match self.runtime.module_for_task(&spec.module).await {
            Ok(module) => module,
            Err(error) => return failed_before_start(error, started),
        };
        let mut report = match &module.ready {
            Ready::Component(_) => self.run_component(&module, &spec).await,
            Ready::Command(_) => self.run_command(&module, &spec).await,
        };
        report.elapsed = started.elapsed();
        report
    }

    async fn run_component(&mut self, module: &Arc<CompiledModule>, spec: &TaskSpec) -> TaskReport {
        let key = spec
            .affinity
            .as_ref()
            .map(|affinity| (module.id.clone(), affinity.clone()));
        let warm = key.as_ref().and_then(|key| self.warm.pop(key));
        let reused = warm.is_some();
        let mut instance = match warm {
            Some(instance) => instance,
            None => match self.instantiate(module, spec).await {
                Ok(instance) => instance,
                Err(report) => return report,
            },
        };
        if reused {
            self.stats.warm_hits += 1;
            self.begin(&mut instance.store, spec);
        }
        let tick = self.runtime.shared.engine.epoch_tick;
        let call = instance
            .bindings
            .call_run(&mut instance.store, &spec.payload);
        let outcome = match within_deadline(&spec.limits, tick, call).await {
            Ok(Ok(Ok(result))) if result.len() > spec.limits.max_result_bytes => {
                Err(TaskError::OutputTooLarge {
                    stream: "result",
                    limit: spec.limits.max_result_bytes,
                })
            }
            Ok(Ok(Ok(result))) => Ok(result),
            Ok(Ok(Err(message))) => Err(TaskError::Guest(message)),
            Ok(Err(trap)) => Err(instance.store.data().guest().classify(trap, &spec.limits)),
            Err(timeout) => Err(timeout),
        };
        let report = collect(instance.store.data_mut().guest_mut(), outcome, reused);
        // Only an instance that returned normally is fit for the next task,
        // and only a small one is worth its memory while it waits.
        let healthy = !matches!(report.outcome, Err(ref e) if !matches!(e, TaskError::Guest(_)));
        let held = instance.store.data().guest().limiter.held as u64;
        let small = held <= self.runtime.shared.engine.max_warm_memory_bytes;
        if let (Some(key), true, true) = (key, healthy, small) {
            self.keep_warm(key, instance);
        }
        report
    }

    /// A new instance with `init` run for the task's affinity key.
    async fn instantiate(
        &mut self,
        module: &Arc<CompiledModule>,
        spec: &TaskSpec,
    ) -> Result<WarmInstance, TaskReport> {
        let Ready::Component(pre) = &module.ready else {
            unreachable!("checked by caller")
        };
        let shared = &self.runtime.shared;
        let mut store = component::store(
            &shared.engine.engine,
            GuestContext::new(module.id.to_string()),
        );
        self.begin(&mut store, spec);
        arm_store(&mut store, &spec.limits, shared.engine.fuel_enabled)
            .map_err(|e| failed_in(&mut store, e))?;
        self.stats.instantiations += 1;
        let tick = shared.engine.epoch_tick;
        let bindings =
            match within_deadline(&spec.limits, tick, pre.instantiate_async(&mut store)).await {
                Ok(Ok(bindings)) => bindings,
                Ok(Err(e)) => {
                    let error = store.data().guest().classify(e, &spec.limits);
                    return Err(failed_in(&mut store, error));
                }
                Err(timeout) => return Err(failed_in(&mut store, timeout)),
            };
        self.stats.inits += 1;
        let config = spec.affinity.clone().unwrap_or_default().into_bytes();
        let init = bindings.call_init(&mut store, &config);
        let error = match within_deadline(&spec.limits, tick, init).await {
            Ok(Ok(Ok(()))) => return Ok(WarmInstance { store, bindings }),
            Ok(Ok(Err(message))) => TaskError::InitFailed(message),
            Ok(Err(trap)) => store.data().guest().classify(trap, &spec.limits),
            Err(timeout) => timeout,
        };
        Err(failed_in(&mut store, error))
    }

    async fn run_command(&mut self, module: &Arc<CompiledModule>, spec: &TaskSpec) -> TaskReport {
        let Ready::Command(pre) = &module.ready else {
            unreachable!("checked by caller")
        };
        let shared = &self.runtime.shared;
        let mut guest = GuestContext::new(module.id.to_string());
        guest.begin(
            &spec.task_id,
            spec.attempt,
            &spec.limits,
            spec.on_progress.clone(),
            None,
        );
        // A command's result is its stdout, so stdout gets the result's bound.
        let limits = TaskLimits {
            max_output_bytes: spec.limits.max_result_bytes,
            ..spec.limits.clone()
        };
        guest.stdout.reset(limits.max_output_bytes);
        let (stdin, feed) = match &spec.input {
            Some(pages) => {
                let (pipe, feed) = ndjson_stdin(pages.clone());
                (command::Stdin::Pipe(pipe), Some(feed))
            }
            None => (command::Stdin::Payload(spec.payload.clone()), None),
        };
        let mut store = command::store(&shared.engine.engine, guest, stdin);
        if let Err(e) = arm_store(&mut store, &spec.limits, shared.engine.fuel_enabled) {
            return failed_in(&mut store, e);
        }
        self.stats.instantiations += 1;
        let tick = shared.engine.epoch_tick;
        let run = async {
            let instance = pre.instantiate_async(&mut store).await?;
            let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
            start.call_async(&mut store, ()).await
        };
        let outcome = match within_deadline(&limits, tick, run).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => match e.downcast_ref::<wasmtime_wasi::I32Exit>() {
                Some(exit) if exit.0 == 0 => Ok(()),
                Some(exit) => Err(TaskError::Guest(exit_message(
                    exit.0,
                    &store.data().guest().stderr.snapshot(),
                ))),
                None => Err(store.data().guest().classify(e, &limits)),
            },
            Err(timeout) => Err(timeout),
        };
        // A command that read a cut-short input must not pass off a result
        // computed from part of it.
        let outcome = match feed.and_then(|feed| feed.take()) {
            Some(why) => Err(TaskError::Internal(format!("input cut short: {why}"))),
            None => outcome,
        };
        let guest = store.data_mut().guest_mut();
        let mut report = collect(guest, outcome.map(|()| Vec::new()), false);
        if report.outcome.is_ok() {
            report.outcome = Ok(std::mem::take(&mut report.stdout));
        }
        report
    }

    fn begin<T: HasGuest>(&self, store: &mut Store<T>, spec: &TaskSpec) {
        store.data_mut().guest_mut().begin(
            &spec.task_id,
            spec.attempt,
            &spec.limits,
            spec.on_progress.clone(),
            spec.input.clone(),
        );
        // The deadline is re-read from the context at each tick; re-arm the tick.
        store.set_epoch_deadline(1);
        if self.runtime.shared.engine.fuel_enabled {
            let _ = store.set_fuel(spec.limits.fuel.unwrap_or(u64::MAX));
        }
    }

    fn keep_warm(&mut self, key: (ModuleId, String), instance: WarmInstance) {
        if self.max_warm == 0 {
            return;
        }
        self.warm.put(key, instance);
        while self.warm.len() > self.max_warm {
            self.warm.pop_lru();
            self.stats.warm_evictions += 1;
        }
    }
}

/// Gather what the guest produced into a report.
fn collect(
    guest: &mut GuestContext,
    mut outcome: Result<Vec<u8>, TaskError>,
    warm: bool,
) -> TaskReport {
    if outcome.is_ok() && guest.logs_overflowed() {
        outcome = Err(TaskError::OutputTooLarge {
            stream: "logs",
            limit: 0,
        });
    }
    TaskReport {
        outcome,
        stdout: guest.stdout.take(),
        stderr: guest.stderr.take(),
        logs: std::mem::take(&mut guest.logs),
        progress: guest.progress,
        warm,
        elapsed: Duration::ZERO,
    }
}

fn failed_in<T: HasGuest>(store: &mut Store<T>, error: TaskError) -> TaskReport {
    collect(store.data_mut().guest_mut(), Err(error), false)
}

fn failed_before_start(error: TaskError, started: Instant) -> TaskReport {
    TaskReport {
        outcome: Err(error),
        stdout: Vec::new(),
        stderr: Vec::new(),
        logs: Vec::new(),
        progress: 0.0,
        warm: false,
        elapsed: started.elapsed(),
    }
}

fn exit_message(code: i32, stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let last = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim();
    if last.is_empty() {
        format!("exited with code {code}")
    } else {
        format!("exited with code {code}: {last}")
    }
}
