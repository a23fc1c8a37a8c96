//! The embedded backend: SQLite (WAL, group commit) as the durable record,
//! an in-memory ready index for leasing in microseconds, and lazy sweep
//! expansion. One process owns the store; start-up rebuilds the index from
//! it, so `kill -9` loses nothing that was acknowledged.

mod checkpoint;
mod controls;
mod dependencies;
mod invoke;
mod journal;
mod pressure;
mod reader;
mod recover;
mod schema;
mod short_life;
mod submit;
mod sweeps;
mod view;
mod view_apply;
mod waiting;
mod writer;

use super::invocation::{Invocation, Outcome};
use super::scheduler::ready::{Entry, Policy};
use super::scheduler::{Offer, Scheduler, Tags};
use super::{
    CensusRow, CommitObserver, Completion, Control, Failure, Lease, ModuleRecord, Page, QueueError,
    ReadStore, TaskFilter, TaskResult, WorkQueue, WorkerView,
};
use crate::model::{
    Event, JobId, JobRecord, Millis, ModuleId, NewJob, NewTask, TaskId, TaskRecord, TaskState,
    now_ms, now_us,
};
use async_trait::async_trait;
pub use schema::WRITER_CACHE_BYTES;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use sweeps::SweepCursor;
use tokio::sync::{Notify, broadcast};
pub(crate) use view::ViewChange;
pub(crate) use writer::{Carried, RemoteTask};
pub use writer::{MAX_BACKLOG_BYTES, MAX_BACKLOG_OPS};
use writer::{Op, Transition, Writer};

/// Tuning of the embedded queue.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// A waiting task's effective priority rises by one per this much waiting.
    pub aging: Duration,
    /// How long a task waits for the worker already warm for its affinity key.
    pub affinity_window: Duration,
    /// A lease not renewed within this time is re-offered.
    pub lease_ttl: Duration,
    /// Sweep points created per expansion step (2,048 by default: few
    /// enough that cancelling a sweep writes its waiting points in tens of
    /// milliseconds, enough that refills are rare next to the runs).
    pub sweep_chunk: u64,
    /// Payload bytes waiting tasks may hold in memory; beyond it a stored
    /// task's payload stays on disk until the task is leased.
    pub held_payload_bytes: u64,
    /// What a commit survives (`--durability`).
    pub durability: Durability,
}

/// What a commit of the store survives, once a caller is told "stored".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Durability {
    /// Power loss and OS crashes too: every commit is fsynced (SQLite
    /// `synchronous = FULL`). One fsync per batch of operations; on a disk
    /// with a 0.3 ms fsync, a single task's submit-run-result takes three.
    #[default]
    Power,
    /// A crash or `kill -9` of the process, not of the machine: commits
    /// reach the OS at once and the disk at each WAL checkpoint (SQLite
    /// `synchronous = NORMAL` in WAL mode). For latency-bound synchronous
    /// invocations on disks with slow fsync.
    Process,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            aging: Duration::from_secs(30),
            affinity_window: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(30),
            sweep_chunk: 2048,
            held_payload_bytes: 128 << 20,
            durability: Durability::Power,
        }
    }
}

/// The SQLite-backed queue. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Store>,
}

/// The store's handles and the host's scheduling state.
struct Store {
    writer: Writer,
    reader: reader::Reader,
    state: Mutex<HostState>,
    wake: Notify,
    closed: AtomicBool,
    events: broadcast::Sender<Event>,
    observers: Arc<RwLock<Vec<Arc<dyn CommitObserver>>>>,
    config: EmbeddedConfig,
    health: Arc<writer::StoreHealth>,
    /// The thread that sends deferred operations.
    flusher: Flusher,
    /// Where short synchronous invocations are made durable (none in a
    /// Kafka host's view, which takes no invocations).
    journal: Option<journal::Journal>,
}

impl Drop for Store {
    fn drop(&mut self) {
        // Let the flusher see the store is gone and end.
        self.flusher.thread.unpark();
    }
}

/// The deferred flusher: a thread asleep while nothing is deferred, else
/// waking every [`DEFER_MS`]. Woken by whoever defers an operation, only
/// when it sleeps: a wake per lease cost every invocation a thread switch
/// and a turn of the state's lock on a busy two-core host. It keeps
/// looking for [`FLUSHER_LINGER`] after it last saw anything deferred, so
/// a steady stream of short attempts (synchronous invocations one after
/// another, each done before the next look) never pays a wake-up system
/// call on its way to the guest.
struct Flusher {
    thread: std::thread::Thread,
    /// Whether it is looking every [`DEFER_MS`] anyway.
    deferring: AtomicBool,
    /// Something was deferred since its last look (set instead of a wake
    /// while it is looking anyway): keeps it lingering.
    touched: AtomicBool,
}

/// How long the flusher keeps looking every [`DEFER_MS`] after it last saw
/// something deferred, before it sleeps until woken: 50 looks, a few
/// microseconds each, against a futex wake on every deferral.
const FLUSHER_LINGER: Duration = Duration::from_millis(100);

impl Flusher {
    /// Something was deferred (under the state's lock): make sure it is
    /// looked at within [`DEFER_MS`].
    fn wake(&self) {
        if self.deferring.load(Ordering::SeqCst) {
            self.touched.store(true, Ordering::Relaxed);
        } else {
            self.thread.unpark();
        }
    }
}

/// The deferred flusher's loop; ends with the store.
fn run_flusher(store: std::sync::mpsc::Receiver<std::sync::Weak<Store>>) {
    let Ok(store) = store.recv() else { return };
    let mut deferring = false;
    let mut last_seen = std::time::Instant::now();
    loop {
        if deferring {
            std::thread::park_timeout(Duration::from_millis(DEFER_MS));
        } else {
            std::thread::park();
        }
        let Some(inner) = store.upgrade() else { return };
        let queue = EmbeddedQueue { inner };
        let flusher = &queue.inner.flusher;
        let touched = flusher.touched.swap(false, Ordering::Relaxed);
        let waiting = queue.flush_deferred(now_ms());
        if waiting || touched {
            last_seen = std::time::Instant::now();
        }
        deferring = waiting || last_seen.elapsed() < FLUSHER_LINGER;
        if !deferring {
            // About to sleep: from here on deferrers wake it. Look once
            // more, for what was deferred while they thought it awake.
            flusher.deferring.store(false, Ordering::SeqCst);
            deferring = queue.flush_deferred(now_ms());
        }
        flusher.deferring.store(deferring, Ordering::SeqCst);
    }
}

/// Everything about scheduling that lives in memory: the scheduler, the
/// sweeps still creating points, and each job's flags.
struct HostState {
    scheduler: Scheduler<Deferred>,
    sweeps: Vec<SweepCursor>,
    jobs: HashMap<Arc<str>, JobFlags>,
    /// Synchronous invocations whose callers wait, by task.
    invoked: HashMap<Arc<str>, invoke::Invoked>,
    /// Tasks waiting for their dependencies, out of the ready index.
    waiting: waiting::WaitingTasks,
}

/// A lease's Allocated and Running, held back from the writer for a
/// moment: a task that ends within [`DEFER_MS`] has its whole attempt
/// (Allocated, Running and the outcome) stored in one commit, one fsync
/// where three were, and a longer one has them flushed by the deferred
/// flusher. Lost in a crash exactly as unstored leases are: recovery finds
/// such a task Pending and runs it again. A synchronous invocation's held
/// insert comes first (see [`invoke`]).
#[derive(Default)]
struct Deferred {
    ops: Vec<Op>,
    /// When the oldest of `ops` was deferred.
    since: Millis,
    /// Held until the attempt ends, however long (a non-durable invocation).
    until_outcome: bool,
}

/// How long a lease's Allocated and Running may wait for its outcome.
const DEFER_MS: u64 = 2;

impl Deferred {
    fn push(&mut self, op: Op, now: Millis) {
        if self.ops.is_empty() {
            self.since = now;
        }
        self.ops.push(op);
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct JobFlags {
    paused: bool,
    cancelled: bool,
    /// Waiting for its dependencies: its sweep creates no points.
    waiting: bool,
}

/// What one look at the ready index gave a free worker.
// A value on the stack of one lease call, never kept in a collection: a
// box would cost an allocation per lease for nothing.
#[allow(clippy::large_enum_variant)]
enum Step {
    /// A lease; `true` if its payload is still to be read from the store.
    Leased(Lease, bool),
    /// Nothing yet; look again by then (or when woken).
    Wait(Option<Millis>),
}

impl EmbeddedQueue {
    /// Open (or create) the store at `path` and rebuild the ready index:
    /// tasks that were Allocated or Running when the last process died are
    /// Pending again.
    pub fn open(path: &Path, config: EmbeddedConfig) -> Result<Self, QueueError> {
        Self::open_inner(path, config, true)
    }

    /// Payload bytes the waiting tasks hold in memory now (at most about
    /// [`EmbeddedConfig::held_payload_bytes`] plus sweep points created ahead).
    pub fn held_payload_bytes(&self) -> u64 {
        self.state().scheduler.ready.payload_bytes()
    }

    /// Cap the store file at `bytes` (`None`: no cap). Beyond it writes
    /// fail as on a full disk: the store fails closed (no leases, submits
    /// refused with 503, `/healthz` unhealthy) and recovers by itself once
    /// the cap is raised. Applied by the writer before its next batch.
    pub fn set_max_store_bytes(&self, bytes: Option<u64>) {
        self.inner.writer.send(vec![Op::Quota(bytes)]);
    }

    fn open_inner(path: &Path, config: EmbeddedConfig, recover: bool) -> Result<Self, QueueError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| QueueError::storage(format!("cannot create {}", dir.display()), e))?;
        }
        let conn = schema::open(path, true)
            .map_err(|e| QueueError::storage(format!("cannot open {}", path.display()), e))?;
        if config.durability == Durability::Process {
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(|e| QueueError::storage("setting --durability process", e))?;
        }
        checkpoint::preallocate_log(&conn, path)?;
        // The journal is read before the writer takes the connection: a
        // record whose task the store already holds is not applied again.
        let journal = if recover {
            let stored = |id: &str| {
                conn.prepare_cached("SELECT 1 FROM tasks WHERE id = ?1")
                    .and_then(|mut s| s.exists(rusqlite::params![id]))
                    .map_err(|e| QueueError::storage("reading the store for the journal", e))
            };
            let sync = config.durability == Durability::Power;
            Some(journal::Journal::open(path, sync, stored)?)
        } else {
            None
        };
        let (events, _) = broadcast::channel(65_536);
        let observers: Arc<RwLock<Vec<Arc<dyn CommitObserver>>>> = Arc::default();
        let health = Arc::new(writer::StoreHealth::default());
        let checkpointer = checkpoint::Checkpointer::start(path)?;
        let writer = Writer::start(
            conn,
            checkpointer,
            events.clone(),
            observers.clone(),
            health.clone(),
            // A Kafka host's view (opened without recovery) only reports
            // the dependencies that ended: the grid's expanders release.
            !recover,
        );
        let journal = match journal {
            Some((journal, replay)) => {
                if !replay.is_empty() {
                    tracing::info!(
                        operations = replay.len(),
                        "storing the invocations the journal held"
                    );
                    futures::executor::block_on(writer.write(replay))?;
                }
                journal.start_over()?;
                Some(journal)
            }
            None => None,
        };
        let reader = reader::Reader::new(PathBuf::from(path));
        let (handover, handed) = std::sync::mpsc::channel();
        let flusher = std::thread::Builder::new()
            .name("kwq-deferred".into())
            .spawn(move || run_flusher(handed))
            .map_err(|e| QueueError::storage("starting the deferred flusher", e))?;
        let policy = Policy {
            aging_ms: config.aging.as_millis() as u64,
            affinity_window_ms: config.affinity_window.as_millis() as u64,
        };
        let queue = EmbeddedQueue {
            inner: Arc::new(Store {
                writer,
                reader,
                state: Mutex::new(HostState {
                    scheduler: Scheduler::new(policy, Some(config.lease_ttl)),
                    sweeps: Vec::new(),
                    jobs: HashMap::new(),
                    invoked: HashMap::new(),
                    waiting: Default::default(),
                }),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
                events,
                observers,
                config,
                health,
                flusher: Flusher {
                    thread: flusher.thread().clone(),
                    deferring: AtomicBool::new(false),
                    touched: AtomicBool::new(false),
                },
                journal,
            }),
        };
        let _ = handover.send(Arc::downgrade(&queue.inner));
        queue.observe(Arc::new(waiting::Releaser {
            store: Arc::downgrade(&queue.inner),
        }));
        if recover {
            queue.recover()?;
        }
        Ok(queue)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HostState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A lease whose payload was left on disk, with the payload read back;
    /// `None` (the task given back) if the store cannot be read.
    async fn with_stored_payload(&self, mut lease: Lease) -> Option<Lease> {
        let id = lease.task_id.clone();
        match self
            .inner
            .reader
            .read(move |c| reader::payload(c, &id))
            .await
        {
            Ok(payload) => {
                lease.payload = Arc::from(payload);
                Some(lease)
            }
            Err(e) => {
                tracing::warn!(task = %lease.task_id, error = %e, "cannot read a task's payload; giving it back");
                self.release(&lease, false);
                None
            }
        }
    }

    /// Re-offer tasks whose lease was not renewed in time.
    fn expire_leases(&self, state: &mut HostState, now: Millis) {
        let expired = state.scheduler.expire(now);
        if expired.is_empty() {
            return;
        }
        let mut ops = Vec::with_capacity(expired.len());
        for mut lease in expired {
            ops.append(&mut lease.extra.ops);
            let mut t = transition(
                &lease.entry,
                Some(lease.state),
                TaskState::Pending,
                lease.entry.attempts,
            );
            t.carried.message = Some(format!("requeued: lease held by {} expired", lease.worker));
            ops.push(Op::Transition(Box::new(t)));
            state.scheduler.ready.insert(
                Entry {
                    queued_at: now,
                    ready_us: now_us(),
                    state: TaskState::Pending,
                    ..lease.entry
                },
                now,
            );
        }
        self.inner.writer.send(ops);
    }

    /// End a lease: its record, its deferred operations, which go to the
    /// writer before whatever ends it, and the invocation waiting for it.
    fn take_lease(&self, lease: &Lease) -> Result<EndedLease, QueueError> {
        let mut state = self.state();
        let mut leased = state.scheduler.take(&lease.task_id, lease.token)?;
        let ops = std::mem::take(&mut leased.extra.ops);
        // Most leases have no invocation: no hashing of their id then.
        let invoked = if state.invoked.is_empty() {
            None
        } else {
            state.invoked.remove(lease.task_id.as_str())
        };
        Ok((leased, ops, invoked))
    }

    /// Send an ended attempt's operations to the writer. Those a caller
    /// waits for are committed on this thread if the writer is idle. A
    /// caller whose invocation the journal made durable is answered first,
    /// and the commit then follows on this thread too, off its path.
    fn send_outcome(&self, ops: Vec<Op>, answer: invoke::Answer) {
        match answer {
            invoke::Answer::Nobody => self.inner.writer.send(ops),
            answer => {
                answer.give();
                self.inner.writer.send_now(ops);
            }
        }
    }

    /// Send the deferred Allocated and Running of leases older than
    /// [`DEFER_MS`] (under the lock, so they reach the writer before the
    /// outcome of their lease); whether any lease still defers some.
    fn flush_deferred(&self, now: Millis) -> bool {
        let mut state = self.state();
        let mut ops = Vec::new();
        let mut waiting = false;
        let HostState {
            scheduler, invoked, ..
        } = &mut *state;
        for invoked in invoked.values_mut() {
            waiting |= invoked.due_insert(now, &mut ops);
        }
        for leased in scheduler.leases_mut() {
            if leased.extra.ops.is_empty() || leased.extra.until_outcome {
                continue;
            }
            if now.saturating_sub(leased.extra.since) >= DEFER_MS {
                ops.append(&mut leased.extra.ops);
            } else {
                waiting = true;
            }
        }
        if !ops.is_empty() {
            self.inner.writer.send(ops);
        }
        waiting
    }
}

/// A lease as ended by [`EmbeddedQueue::take_lease`].
type EndedLease = (
    super::scheduler::Leased<Deferred>,
    Vec<Op>,
    Option<invoke::Invoked>,
);

/// A waiting entry for a task as submitted: no attempt made yet.
fn entry_from_new(task: &NewTask, tags: Tags, now: Millis) -> Entry {
    Entry::new(
        &task.id,
        task.job_id.as_deref().map(Arc::from),
        &task.module,
        &task.payload,
        &task.options,
        tags,
        now,
    )
}

/// A waiting entry rebuilt from the store at start-up, keeping its attempts
/// and whether it waits for a retry (Error) or a first run (Pending).
fn entry_from_record(task: &TaskRecord, now: Millis) -> Entry {
    let queued_at = task
        .timestamps
        .get(&TaskState::Pending)
        .copied()
        .unwrap_or(now);
    Entry::new(
        &task.id,
        task.job_id.as_deref().map(Arc::from),
        &task.module,
        &task.payload,
        &task.options,
        Arc::new(task.options.tags.clone()),
        queued_at,
    )
    .after_attempts(task.attempts, task.state == TaskState::Error)
}

fn transition(entry: &Entry, from: Option<TaskState>, to: TaskState, attempt: u32) -> Transition {
    Transition::new(
        entry.id.clone(),
        entry.job.clone(),
        entry.module.clone(),
        entry.tags.clone(),
        from,
        to,
        attempt,
    )
}

#[async_trait]
impl WorkQueue for EmbeddedQueue {
    async fn put_module(
        &self,
        record: ModuleRecord,
        bytes: Vec<u8>,
    ) -> Result<ModuleRecord, QueueError> {
        let id = record.id.clone();
        self.inner
            .writer
            .write(vec![Op::Module(record, bytes)])
            .await?;
        self.module(&id).await
    }

    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        self.inner
            .reader
            .with(|c| reader::module_bytes(c, id.as_str()))
            .ok()
            .flatten()
    }

    async fn submit_tasks(&self, tasks: Vec<NewTask>) -> Result<(), QueueError> {
        let now = now_ms();
        let mut ops = Vec::with_capacity(1);
        let mut waiters = Vec::new();
        let mut entries = Vec::with_capacity(tasks.len());
        let tagged: Vec<(NewTask, Tags)> = tasks
            .into_iter()
            .map(|t| {
                let tags = Arc::new(t.options.tags.clone());
                let entry = entry_from_new(&t, tags.clone(), now);
                if t.options.after.is_empty() {
                    entries.push(entry);
                } else {
                    ops.push(Op::Wait {
                        waiter: t.id.clone(),
                        after: t.options.after.clone(),
                    });
                    waiters.push(entry);
                }
                (t, tags)
            })
            .collect();
        ops.insert(0, Op::NewTasks(tagged, now));
        self.write_holding(waiters, ops).await?;
        {
            let ready_us = now_us();
            let mut state = self.state();
            let ready = &mut state.scheduler.ready;
            let mut held = ready.payload_bytes();
            for entry in entries {
                let entry = self.admit(&mut held, Entry { ready_us, ..entry });
                ready.insert(entry, now);
            }
        }
        self.inner.wake.notify_waiters();
        Ok(())
    }

    async fn submit_job(&self, job: NewJob) -> Result<JobRecord, QueueError> {
        self.accept_job(job).await
    }

    fn runs_dependencies(&self) -> bool {
        true
    }

    fn feeds_results(&self) -> bool {
        true
    }

    async fn input_results(
        &self,
        job: &JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError> {
        ReadStore::results(self, job, after, limit).await
    }

    async fn invoke(&self, task: NewTask, durable: bool) -> Result<Invocation, QueueError> {
        self.invoke_task(task, durable)
    }

    async fn lease(&self, worker: &WorkerView) -> Option<Lease> {
        loop {
            let notified = self.inner.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.closed.load(Ordering::Acquire) {
                return None;
            }
            // A failing store takes no new work: what a lease would record
            // could not be stored. Wait for it to recover (or for close).
            let recovered = self.inner.health.changed.notified();
            tokio::pin!(recovered);
            recovered.as_mut().enable();
            if self.inner.health.failing().is_some() {
                tokio::select! {
                    _ = &mut recovered => {}
                    _ = &mut notified => {}
                }
                continue;
            }
            // Back-pressure: while the store is a window behind, no new
            // work is leased; a crash then re-runs at most that window.
            let backlog = &self.inner.writer.backlog;
            let drained = backlog.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if backlog.is_over() {
                tokio::select! {
                    _ = &mut drained => {}
                    _ = &mut notified => {}
                }
                continue;
            }
            let now = now_ms();
            let step = {
                let mut state = self.state();
                self.expire_leases(&mut state, now);
                self.refill_sweeps(&mut state, now);
                let HostState {
                    scheduler, invoked, ..
                } = &mut *state;
                match scheduler.offer(worker, now, |_| Deferred::default()) {
                    Offer::Granted {
                        lease,
                        leased,
                        from,
                        wait_us,
                    } => {
                        if !invoked.is_empty()
                            && let Some(invoked) = invoked.get_mut(&leased.entry.id)
                        {
                            let extra = &mut leased.extra;
                            (extra.ops, extra.until_outcome) =
                                invoked.take_insert(&mut extra.since);
                            invoked.entered(TaskState::Allocated, now);
                        }
                        let mut t = transition(
                            &leased.entry,
                            Some(from),
                            TaskState::Allocated,
                            lease.attempt,
                        );
                        t.carried.worker = Some(worker.id.clone());
                        t.carried.wait_us = Some(wait_us);
                        // The time an invocation's answer gives too.
                        t.at = now;
                        leased.extra.push(Op::Transition(Box::new(t)), now);
                        self.inner.flusher.wake();
                        let on_disk = leased.entry.payload.is_none();
                        Step::Leased(lease, on_disk)
                    }
                    Offer::Wait(at) => Step::Wait(at),
                }
            };
            let wake_at = match step {
                Step::Leased(lease, false) => return Some(lease),
                Step::Leased(lease, true) => match self.with_stored_payload(lease).await {
                    Some(lease) => return Some(lease),
                    None => continue,
                },
                Step::Wait(at) => at,
            };
            let lease_check = now + self.inner.config.lease_ttl.as_millis() as u64;
            let until = wake_at.unwrap_or(lease_check).min(lease_check).max(now + 1);
            let sleep = tokio::time::sleep(Duration::from_millis(until - now));
            tokio::select! {
                _ = notified => {}
                _ = sleep => {}
            }
        }
    }

    fn started(&self, lease: &Lease) {
        let mut state = self.state();
        let Some(leased) = state.scheduler.start(&lease.task_id, lease.token) else {
            return;
        };
        let mut t = transition(
            &leased.entry,
            Some(TaskState::Allocated),
            TaskState::Running,
            lease.attempt,
        );
        t.carried.worker = Some(lease.worker.clone());
        let now = t.at;
        leased.extra.push(Op::Transition(Box::new(t)), now);
        if !state.invoked.is_empty()
            && let Some(invoked) = state.invoked.get_mut(lease.task_id.as_str())
        {
            invoked.entered(TaskState::Running, now);
        }
        self.inner.flusher.wake();
    }

    fn forget_worker(&self, worker: &str) {
        self.state().scheduler.forget_worker(worker);
    }

    fn heartbeat(&self, lease: &Lease) -> Result<(), QueueError> {
        self.state()
            .scheduler
            .renew(&lease.task_id, lease.token, now_ms())
    }

    fn complete(&self, lease: &Lease, completion: Completion) -> Result<(), QueueError> {
        let (leased, mut ops, invoked) = self.take_lease(lease)?;
        let mut t = transition(
            &leased.entry,
            Some(leased.state),
            TaskState::Completed,
            lease.attempt,
        );
        let handed = invoked.map(|invoked| {
            let outcome = Outcome {
                state: TaskState::Completed,
                attempts: lease.attempt,
                worker: lease.worker.clone(),
                timestamps: Default::default(),
                error: None,
                result: Some(completion.result.clone()),
                logs: completion.logs.clone(),
                progress: completion.progress,
            };
            (invoked, outcome, t.at)
        });
        t.carried.worker = Some(lease.worker.clone());
        t.carried.result = Some(completion.result);
        t.carried.logs = Some(completion.logs);
        t.carried.progress = Some(completion.progress);
        t.carried.run_us = Some(completion.run_us);
        ops.push(Op::Transition(Box::new(t)));
        let answer = handed.map_or(invoke::Answer::Nobody, |(invoked, outcome, at)| {
            invoked.hand_over(outcome, at, &mut ops, self.inner.journal.as_ref())
        });
        self.send_outcome(ops, answer);
        Ok(())
    }

    fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), QueueError> {
        let (leased, mut ops, invoked) = self.take_lease(lease)?;
        let to = if failure.retry_at.is_some() {
            TaskState::Error
        } else {
            TaskState::Dead
        };
        let mut t = transition(&leased.entry, Some(leased.state), to, lease.attempt);
        // A retry ends nothing: its caller hears the end from the commits.
        let handed = invoked.filter(|_| to == TaskState::Dead).map(|invoked| {
            let outcome = Outcome {
                state: TaskState::Dead,
                attempts: lease.attempt,
                worker: lease.worker.clone(),
                timestamps: Default::default(),
                error: Some((failure.kind, failure.message.clone())),
                result: None,
                logs: failure.logs.clone(),
                progress: 0.0,
            };
            (invoked, outcome, t.at)
        });
        t.carried.worker = Some(lease.worker.clone());
        t.carried.error = Some((failure.kind, failure.message));
        t.carried.logs = Some(failure.logs);
        t.carried.run_us = Some(failure.run_us);
        t.carried.not_before = failure.retry_at;
        ops.push(Op::Transition(Box::new(t)));
        let answer = handed.map_or(invoke::Answer::Nobody, |(invoked, outcome, at)| {
            invoked.hand_over(outcome, at, &mut ops, self.inner.journal.as_ref())
        });
        self.send_outcome(ops, answer);
        if let Some(retry_at) = failure.retry_at {
            let now = now_ms();
            self.state().scheduler.ready.insert(
                Entry {
                    not_before: Some(retry_at),
                    queued_at: now,
                    ready_us: now_us(),
                    state: TaskState::Error,
                    ..leased.entry
                },
                now,
            );
            self.inner.wake.notify_waiters();
        }
        Ok(())
    }

    fn release(&self, lease: &Lease, cancelled: bool) {
        let Ok((leased, mut ops, _)) = self.take_lease(lease) else {
            return;
        };
        let to = if cancelled {
            TaskState::Cancelled
        } else {
            TaskState::Pending
        };
        // A released attempt does not count: the task was stopped, not failed.
        let attempts = if cancelled {
            lease.attempt
        } else {
            lease.attempt - 1
        };
        let mut t = transition(&leased.entry, Some(leased.state), to, attempts);
        t.carried.message = Some(if cancelled {
            "cancelled while running".into()
        } else {
            "given back: its worker stopped, or its lease lapsed".into()
        });
        ops.push(Op::Transition(Box::new(t)));
        self.inner.writer.send(ops);
        if !cancelled {
            let now = now_ms();
            self.state()
                .scheduler
                .ready
                .insert(leased.entry.after_attempts(attempts, false), now);
            self.inner.wake.notify_waiters();
        }
    }

    fn health(&self) -> Result<(), String> {
        match self.inner.health.failing() {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.wake.notify_waiters();
    }

    async fn flush(&self) -> Result<(), QueueError> {
        self.inner.writer.write(Vec::new()).await
    }

    /// Operations handed to the writer and not yet durable (leasing waits
    /// above [`MAX_BACKLOG_OPS`] of them).
    fn undurable(&self) -> usize {
        self.inner.writer.backlog.ops()
    }

    async fn control(&self, control: Control) -> Result<(), QueueError> {
        self.apply_control(control).await
    }
}

#[async_trait]
impl ReadStore for EmbeddedQueue {
    async fn module(&self, id: &ModuleId) -> Result<ModuleRecord, QueueError> {
        let id = id.to_string();
        self.inner
            .reader
            .read(move |c| reader::module(c, &id))
            .await
    }

    async fn modules(&self) -> Result<Vec<ModuleRecord>, QueueError> {
        self.inner.reader.read(reader::modules).await
    }

    async fn module_named(&self, name: &str) -> Result<Option<ModuleId>, QueueError> {
        let name = name.to_string();
        self.inner
            .reader
            .read(move |c| reader::module_named(c, &name))
            .await
    }

    async fn task(&self, id: &TaskId) -> Result<TaskRecord, QueueError> {
        let read = |id: TaskId| self.inner.reader.read(move |c| reader::task(c, &id));
        // A caller answered from the journal may ask a moment before the
        // store's commit of its task. Looked at before the read: a commit
        // between the read and the look would hide the task.
        let unconfirmed = self.inner.journal.as_ref().filter(|j| j.unconfirmed());
        match (read(id.clone()).await, unconfirmed) {
            (Err(QueueError::NotFound(_)), Some(journal)) => {
                journal.settled().await;
                read(id.clone()).await
            }
            (read, _) => read,
        }
    }

    async fn timeline(&self, id: &TaskId) -> Result<Vec<Event>, QueueError> {
        let id = id.clone();
        self.inner
            .reader
            .read(move |c| reader::timeline(c, &id))
            .await
    }

    async fn tasks(&self, filter: TaskFilter) -> Result<Page<TaskRecord>, QueueError> {
        self.inner
            .reader
            .read(move |c| reader::tasks(c, &filter))
            .await
    }

    async fn job(&self, id: &JobId) -> Result<JobRecord, QueueError> {
        let id = id.clone();
        let mut job = self.inner.reader.read(move |c| reader::job(c, &id)).await?;
        // Sweep expansion is written lazily; the cursor in memory is ahead of the row.
        if let Some(cursor) = self.state().sweeps.iter().find(|c| *c.job == *job.id) {
            job.expanded = job.expanded.max(cursor.next);
        }
        Ok(job)
    }

    async fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        self.inner
            .reader
            .read(move |c| reader::jobs(c, limit))
            .await
    }

    async fn results(
        &self,
        job: &JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError> {
        let job = job.clone();
        self.inner
            .reader
            .read(move |c| reader::results(c, &job, after, limit))
            .await
    }

    async fn events_since(&self, offset: u64, limit: usize) -> Result<Vec<Event>, QueueError> {
        self.inner
            .reader
            .read(move |c| reader::events_since(c, offset, limit))
            .await
    }

    async fn census(&self) -> Result<Vec<CensusRow>, QueueError> {
        self.inner.reader.read(reader::census).await
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn observe(&self, observer: Arc<dyn CommitObserver>) {
        self.inner
            .observers
            .write()
            .expect("observers lock")
            .push(observer);
    }

    fn depth(&self) -> [u64; 10] {
        let state = self.state();
        let mut depth = state.scheduler.ready.depth();
        for cursor in &state.sweeps {
            depth[cursor.options.priority as usize] += cursor.total - cursor.next;
        }
        depth
    }
}
