//! The worker pool: each worker leases the best task for what it has warm,
//! runs it in the Wasm runtime, and reports the outcome: complete, retry
//! with backoff, or dead-letter. Leases are kept alive while a task runs,
//! and a cancelled task is stopped where it is.

mod board;
mod input;
mod registry;
mod retry;

pub use board::{WorkerBoard, WorkerStatus};
pub use registry::{ModuleRegistry, ModuleStats, RegisterError, Registered};
pub use retry::RetryPolicy;

use crate::model::{ErrorKind, TaskLimits, now_ms};
use crate::queue::{Completion, Failure, Lease, WorkQueue, WorkerView};
use crate::runtime::{Runtime, TaskSpec, Worker};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

/// How the pool runs.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// Concurrent workers (default: cores).
    pub workers: usize,
    /// Warm instances kept per worker.
    pub max_warm: usize,
    /// Backoff between attempts.
    pub retry: RetryPolicy,
    /// Output and result bounds applied to every task.
    pub limits: TaskLimits,
    /// How often a running task's lease is renewed.
    pub heartbeat: Duration,
    /// How long a stopping worker lets its task finish before returning it.
    pub shutdown_grace: Duration,
    /// Guest memory, in bytes, that the tasks running at once on this host
    /// may ask for together (the sum of their `memory_bytes`). A task waits
    /// for its share before it starts; one asking for more than the whole
    /// budget fails with `memory_limit`. Default: 3/4 of the machine's memory.
    pub memory_budget: u64,
}

/// 3/4 of the machine's memory (`MemTotal`), or 8 GiB where it cannot be read.
pub fn default_memory_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(8 << 30, |kib| kib * 1024 / 4 * 3)
}

/// MiB of a byte count, rounded up: the unit of the memory budget.
fn mib(bytes: u64) -> u32 {
    bytes.div_ceil(1 << 20).min(u32::MAX as u64) as u32
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            max_warm: 16,
            retry: RetryPolicy::default(),
            limits: TaskLimits::default(),
            heartbeat: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            memory_budget: default_memory_budget(),
        }
    }
}

/// A running pool; dropping it does not stop it, [`Dispatcher::stop`] does.
pub struct Dispatcher {
    stop: watch::Sender<bool>,
    workers: Vec<JoinHandle<()>>,
    board: Arc<WorkerBoard>,
}

impl Dispatcher {
    /// Start `config.workers` workers on the current tokio runtime.
    pub fn start(
        runtime: Runtime,
        queue: Arc<dyn WorkQueue>,
        config: DispatchConfig,
        host: &str,
    ) -> Self {
        let (stop, stopping) = watch::channel(false);
        let board = Arc::new(WorkerBoard::new(config.workers, host));
        let budget = Arc::new(Semaphore::new(mib(config.memory_budget) as usize));
        let workers = (0..config.workers)
            .map(|index| {
                let worker = runtime.worker(config.max_warm);
                let context = WorkerContext {
                    index,
                    id: board.id(index),
                    queue: queue.clone(),
                    board: board.clone(),
                    config: config.clone(),
                    stopping: stopping.clone(),
                    budget: budget.clone(),
                };
                tokio::spawn(context.run(worker))
            })
            .collect();
        Dispatcher {
            stop,
            workers,
            board,
        }
    }

    /// What each worker is doing.
    pub fn board(&self) -> Arc<WorkerBoard> {
        self.board.clone()
    }

    /// Stop leasing, let running tasks finish within the grace period (or
    /// return them to the queue), and wait for every worker to exit.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for worker in self.workers {
            let _ = worker.await;
        }
    }
}

struct WorkerContext {
    index: usize,
    id: String,
    queue: Arc<dyn WorkQueue>,
    board: Arc<WorkerBoard>,
    config: DispatchConfig,
    stopping: watch::Receiver<bool>,
    /// MiB of guest memory not promised to a running task.
    budget: Arc<Semaphore>,
}

enum Ending {
    Finished(crate::runtime::TaskReport),
    Cancelled,
    Abandoned,
}

impl WorkerContext {
    async fn run(mut self, mut worker: Worker) {
        loop {
            if *self.stopping.borrow() {
                break;
            }
            let view = WorkerView {
                id: self.id.clone(),
                warm: worker.warm_keys(),
                pool: None,
            };
            let lease = tokio::select! {
                lease = self.queue.lease(&view) => lease,
                _ = self.stopping.changed() => None,
            };
            let Some(lease) = lease else { break };
            let need = mib(lease.memory_bytes);
            if need > mib(self.config.memory_budget) {
                self.refuse_over_budget(&lease);
                continue;
            }
            let Some(_share) = self.reserve_memory(&lease, need).await else {
                self.queue.release(&lease, false);
                break;
            };
            // Cancelled between its lease and now (its job was cancelled):
            // it never starts.
            if futures::FutureExt::now_or_never(lease.cancelled.notified()).is_some() {
                self.queue.release(&lease, true);
                continue;
            }
            self.queue.started(&lease);
            self.board.begin(self.index, &lease);
            // Every line logged about the task (guest logs included) carries its fields.
            let span = tracing::info_span!("task", task_id = %lease.task_id,
                job_id = lease.job_id.as_deref().unwrap_or(""), attempt = lease.attempt, module = %lease.module);
            let ending =
                tracing::Instrument::instrument(self.run_one(&mut worker, &lease), span.clone())
                    .await;
            span.in_scope(|| self.finish(&lease, ending));
            self.board
                .end(self.index, worker.warm_keys(), worker.stats());
        }
    }

    /// Wait for `need` MiB of the host's memory budget, renewing the lease
    /// meanwhile; `None` if the host stops first.
    async fn reserve_memory(
        &mut self,
        lease: &Lease,
        need: u32,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let period = self.config.heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let share = self.budget.clone().acquire_many_owned(need);
        tokio::pin!(share);
        loop {
            tokio::select! {
                share = &mut share => return share.ok(),
                _ = heartbeat.tick() => {
                    let _ = self.queue.heartbeat(lease);
                }
                _ = self.stopping.changed() => return None,
            }
        }
    }

    /// When a failed attempt of `kind` may run again: after the backoff,
    /// unless attempts are used up or no retry could help (an invalid module).
    fn retry_at(&self, lease: &Lease, kind: ErrorKind) -> Option<crate::model::Millis> {
        let retryable = kind != ErrorKind::InvalidModule && lease.attempt < lease.max_attempts;
        retryable.then(|| now_ms() + self.config.retry.delay(lease.attempt).as_millis() as u64)
    }

    /// A task asking for more memory than the whole budget can never start here.
    fn refuse_over_budget(&self, lease: &Lease) {
        let failure = Failure {
            kind: ErrorKind::MemoryLimit,
            message: format!(
                "asks for {} MiB of memory; this host's memory budget is {} MiB (--memory-budget)",
                mib(lease.memory_bytes),
                mib(self.config.memory_budget)
            ),
            logs: Vec::new(),
            run_us: 0,
            retry_at: self.retry_at(lease, ErrorKind::MemoryLimit),
        };
        if let Err(e) = self.queue.fail(lease, failure) {
            tracing::warn!(error = %e, "outcome not recorded");
        }
    }

    async fn run_one(&mut self, worker: &mut Worker, lease: &Lease) -> Ending {
        let board = self.board.clone();
        let index = self.index;
        let spec = TaskSpec {
            task_id: lease.task_id.clone(),
            attempt: lease.attempt,
            module: lease.module.clone(),
            payload: lease.payload.to_vec(),
            affinity: lease.affinity.clone(),
            limits: TaskLimits {
                timeout: lease.timeout,
                memory_bytes: lease.memory_bytes,
                ..self.config.limits.clone()
            },
            on_progress: Some(Arc::new(move |p| board.progress(index, p))),
            input: lease.results_of.clone().map(|job| {
                Arc::new(input::QueueInput {
                    queue: self.queue.clone(),
                    job,
                }) as Arc<dyn crate::runtime::ResultPages>
            }),
        };
        let run = worker.run(spec);
        tokio::pin!(run);
        // First renewal one period from now (an `interval`'s immediate first
        // tick would cost a timer-wheel turn, about 1 ms, on every task).
        let period = self.config.heartbeat;
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            let never = tokio::time::Instant::now() + Duration::from_secs(365 * 86_400);
            tokio::select! {
                report = &mut run => return Ending::Finished(report),
                _ = heartbeat.tick() => {
                    if self.queue.heartbeat(lease).is_err() {
                        tracing::warn!("lease lost while running; the result will be discarded");
                    }
                }
                _ = lease.cancelled.notified() => return Ending::Cancelled,
                _ = self.stopping.changed(), if deadline.is_none() => {
                    deadline = Some(tokio::time::Instant::now() + self.config.shutdown_grace);
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or(never)), if deadline.is_some() => return Ending::Abandoned,
            }
        }
    }

    fn finish(&self, lease: &Lease, ending: Ending) {
        let report = match ending {
            Ending::Finished(report) => report,
            Ending::Cancelled => return self.queue.release(lease, true),
            Ending::Abandoned => return self.queue.release(lease, false),
        };
        let run_us = report.elapsed.as_micros() as u64;
        let outcome = match report.outcome {
            Ok(result) => self.queue.complete(
                lease,
                Completion {
                    result,
                    logs: report.logs,
                    progress: report.progress,
                    run_us,
                },
            ),
            Err(error) => {
                let kind = error.kind();
                let retry_at = self.retry_at(lease, kind);
                tracing::info!(error = %error, kind = %kind, retry = retry_at.is_some(), "task attempt failed");
                let mut message = error.to_string();
                if let crate::runtime::TaskError::Trap {
                    backtrace: Some(bt),
                    ..
                } = &error
                {
                    message = format!("{message}\n{bt}");
                }
                self.queue.fail(
                    lease,
                    Failure {
                        kind,
                        message,
                        logs: report.logs,
                        run_us,
                        retry_at,
                    },
                )
            }
        };
        if let Err(e) = outcome {
            tracing::warn!(error = %e, "outcome not recorded");
        }
    }
}
