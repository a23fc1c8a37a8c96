//! The embedded backend: SQLite (WAL, group commit) as the durable record,
//! an in-memory ready index for leasing in microseconds, and lazy sweep
//! expansion. One process owns the store; start-up rebuilds the index from
//! it, so `kill -9` loses nothing that was acknowledged.

mod reader;
pub(crate) mod ready;
mod schema;
mod writer;

use super::{
    CensusRow, CommitObserver, Completion, Failure, Lease, ModuleRecord, Page, Queue, QueueError,
    TaskFilter, TaskResult, WorkerView,
};
use crate::model::{
    Event, JobId, JobRecord, Millis, ModuleId, NewJob, NewTask, Sweep, TaskId, TaskRecord,
    TaskState, now_ms, now_us,
};
use async_trait::async_trait;
use ready::{Entry, Pick, Policy, ReadyIndex};
use rusqlite::OptionalExtension;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
pub(crate) use writer::{Carried, RemoteTask};
use writer::{Op, Tags, Transition, Writer};

/// A change a Kafka host's view reads from the event topics.
pub(crate) enum ViewChange {
    /// A task event.
    Task(Box<RemoteTask>),
    /// A job was submitted.
    Job(JobRecord),
    /// A job was paused, resumed or cancelled.
    JobFlags {
        job: String,
        paused: bool,
        cancelled: bool,
    },
    /// A task's priority changed.
    Priority(String, u8),
    /// A job's priority changed (its record and unfinished tasks).
    JobPriority(String, u8),
    /// A module, reassembled and verified.
    Module(ModuleRecord, Vec<u8>),
    /// Read position of a topic partition, stored with the changes before it.
    Offset {
        topic: String,
        partition: i32,
        next: i64,
    },
}

/// Tuning of the embedded queue.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// A waiting task's effective priority rises by one per this much waiting.
    pub aging: Duration,
    /// How long a task waits for the worker already warm for its affinity key.
    pub affinity_window: Duration,
    /// A lease not renewed within this time is re-offered.
    pub lease_ttl: Duration,
    /// Sweep points created per expansion step.
    pub sweep_chunk: u64,
    /// Payload bytes waiting tasks may hold in memory; beyond it a stored
    /// task's payload stays on disk until the task is leased.
    pub held_payload_bytes: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        EmbeddedConfig {
            aging: Duration::from_secs(30),
            affinity_window: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(30),
            sweep_chunk: 4096,
            held_payload_bytes: 128 << 20,
        }
    }
}

/// The SQLite-backed queue. Cheap to clone.
#[derive(Clone)]
pub struct EmbeddedQueue {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Writer,
    reader: reader::Reader,
    sched: Mutex<Sched>,
    wake: Notify,
    closed: AtomicBool,
    events: broadcast::Sender<Event>,
    observers: Arc<RwLock<Vec<Arc<dyn CommitObserver>>>>,
    config: EmbeddedConfig,
    health: Arc<writer::StoreHealth>,
}

/// Everything about scheduling that lives in memory.
#[derive(Default)]
struct Sched {
    ready: ReadyIndex,
    leased: HashMap<Arc<str>, Leased>,
    workers: HashMap<String, Vec<(ModuleId, String)>>,
    sweeps: Vec<SweepCursor>,
    jobs: HashMap<Arc<str>, JobFlags>,
    next_token: u64,
}

struct Leased {
    entry: Entry,
    token: u64,
    worker: String,
    expires: Millis,
    state: TaskState,
    cancelled: Arc<Notify>,
}

#[derive(Debug, Clone, Copy, Default)]
struct JobFlags {
    paused: bool,
    cancelled: bool,
}

struct SweepCursor {
    job: Arc<str>,
    module: ModuleId,
    options: crate::model::TaskOptions,
    tags: Tags,
    sweep: Sweep,
    next: u64,
    total: u64,
    /// Bytes of one point's payload (the base dominates), for the byte bound.
    point_bytes: u64,
}

impl SweepCursor {
    /// A cursor over `job`'s sweep from point `next`.
    fn new(
        job: Arc<str>,
        module: ModuleId,
        options: crate::model::TaskOptions,
        sweep: Sweep,
        next: u64,
        total: u64,
    ) -> Self {
        let point_bytes = serde_json::to_vec(&sweep.point(next.min(total.saturating_sub(1))))
            .map_or(1, |p| p.len().max(1)) as u64;
        SweepCursor {
            job,
            module,
            tags: Arc::new(options.tags.clone()),
            options,
            sweep,
            next,
            total,
            point_bytes,
        }
    }
}

/// What one look at the ready index gave a free worker.
enum Step {
    /// A lease; `true` if its payload is still to be read from the store.
    Leased(Lease, bool),
    /// Nothing yet; look again by then (or when woken).
    Wait(Option<Millis>),
}

/// Tasks of an explicit-payload job written per transaction: a big job is
/// accepted in many short transactions, so other writes interleave.
const JOB_CHUNK_TASKS: usize = 4096;

/// Payload bytes one sweep may have created ahead of its workers (about
/// twice this are held at most: a refill starts when half are left).
const SWEEP_AHEAD_BYTES: u64 = 4 << 20;

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
        self.sched().ready.payload_bytes()
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
            std::fs::create_dir_all(dir).map_err(|e| {
                QueueError::Storage(format!("cannot create {}: {e}", dir.display()))
            })?;
        }
        let conn = schema::open(path, true)
            .map_err(|e| QueueError::Storage(format!("cannot open {}: {e}", path.display())))?;
        let (events, _) = broadcast::channel(65_536);
        let observers: Arc<RwLock<Vec<Arc<dyn CommitObserver>>>> = Arc::default();
        let health = Arc::new(writer::StoreHealth::default());
        let writer = Writer::start(conn, events.clone(), observers.clone(), health.clone());
        let reader = reader::Reader::new(PathBuf::from(path));
        let queue = EmbeddedQueue {
            inner: Arc::new(Inner {
                writer,
                reader,
                sched: Mutex::new(Sched::default()),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
                events,
                observers,
                config,
                health,
            }),
        };
        if recover {
            queue.recover()?;
        }
        Ok(queue)
    }

    /// Open (or create) a store used only as a host's view of a Kafka grid:
    /// no recovery and no leasing; changes arrive through [`Self::apply_view`].
    pub(crate) fn open_view(path: &Path) -> Result<Self, QueueError> {
        Self::open_inner(path, EmbeddedConfig::default(), false)
    }

    /// Queue changes read from the event topics (applied in order, durably,
    /// with the read positions they carry); observers and subscribers are
    /// told as for local changes.
    pub(crate) fn apply_view(&self, changes: Vec<ViewChange>) {
        let ops = changes
            .into_iter()
            .map(|change| match change {
                ViewChange::Task(task) => Op::Remote(task),
                ViewChange::Job(job) => Op::RemoteJob(job),
                ViewChange::JobFlags {
                    job,
                    paused,
                    cancelled,
                } => Op::JobFlags {
                    job,
                    paused,
                    cancelled,
                },
                ViewChange::Priority(task, priority) => Op::Priority(task, priority),
                ViewChange::JobPriority(job, priority) => Op::JobPriority(job, priority),
                ViewChange::Module(record, bytes) => Op::Module(record, bytes),
                ViewChange::Offset {
                    topic,
                    partition,
                    next,
                } => Op::ViewOffset {
                    topic,
                    partition,
                    next,
                },
            })
            .collect();
        self.inner.writer.send(ops);
    }

    /// Where the view stopped reading each (topic, partition), to resume there.
    pub(crate) fn view_offsets(&self) -> Result<HashMap<(String, i32), i64>, QueueError> {
        self.inner.reader.with(|conn| {
            let mut stmt = conn
                .prepare("SELECT topic, partition, next FROM view_offsets")
                .map_err(|e| QueueError::Storage(e.to_string()))?;
            let rows = stmt
                .query_map([], |row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?)))
                .map_err(|e| QueueError::Storage(e.to_string()))?;
            rows.collect::<Result<HashMap<_, _>, _>>()
                .map_err(|e| QueueError::Storage(e.to_string()))
        })
    }

    /// Whether the view already has the task in a final state (a replayed
    /// task message that another host finished need not run again).
    pub(crate) fn is_finished(&self, id: &str) -> bool {
        self.inner
            .reader
            .with(|conn| {
                conn.prepare_cached("SELECT state FROM tasks WHERE id = ?1")
                    .and_then(|mut stmt| {
                        stmt.query_row([id], |row| row.get::<_, String>(0))
                            .optional()
                    })
                    .map_err(|e| QueueError::Storage(e.to_string()))
            })
            .ok()
            .flatten()
            .and_then(|state| TaskState::parse(&state))
            .is_some_and(TaskState::is_terminal)
    }

    /// A module's id from one of its names, read on this thread (the Kafka
    /// consumer resolves task messages that name their module).
    pub(crate) fn module_named_now(&self, name: &str) -> Option<ModuleId> {
        self.inner
            .reader
            .with(|c| reader::module_named(c, name))
            .ok()
            .flatten()
    }

    fn recover(&self) -> Result<(), QueueError> {
        let (jobs, tasks) = self.inner.reader.with(|conn| {
            Ok((
                reader::jobs(conn, usize::MAX >> 1)?,
                reader::unfinished(conn, self.inner.config.held_payload_bytes)?,
            ))
        })?;
        let now = now_ms();
        // Jobs whose acceptance a crash cut short go: never acknowledged.
        let (cut_short, jobs): (Vec<JobRecord>, Vec<JobRecord>) = jobs
            .into_iter()
            .partition(|j| j.sweep.is_none() && j.expanded < j.total);
        if !cut_short.is_empty() {
            tracing::info!(
                jobs = cut_short.len(),
                "removing jobs whose submission was cut short by the last stop"
            );
            let ops = cut_short
                .iter()
                .map(|j| Op::DropJob(j.id.clone()))
                .collect();
            futures::executor::block_on(self.inner.writer.write(ops))?;
        }
        let dropped: std::collections::HashSet<&str> =
            cut_short.iter().map(|j| j.id.as_str()).collect();
        let mut sched = self.sched();
        for job in jobs {
            let id: Arc<str> = Arc::from(job.id.as_str());
            sched.jobs.insert(
                id.clone(),
                JobFlags {
                    paused: job.paused,
                    cancelled: job.cancelled,
                },
            );
            if job.paused {
                sched.ready.pause(id.clone());
            }
            if let Some(sweep) = job
                .sweep
                .filter(|_| !job.cancelled && job.expanded < job.total)
            {
                sched.sweeps.push(SweepCursor::new(
                    id,
                    job.module,
                    job.options,
                    sweep,
                    job.expanded,
                    job.total,
                ));
            }
        }
        let mut requeued = Vec::new();
        // Tasks of one job share one copy of its id.
        let mut job_ids: HashMap<String, Arc<str>> = HashMap::new();
        for (task, on_disk) in tasks {
            if task.job_id.as_deref().is_some_and(|j| dropped.contains(j)) {
                continue;
            }
            let mut entry = entry_from_record(&task, now);
            if on_disk {
                entry.payload = None;
            }
            if let Some(job) = &task.job_id {
                let shared = job_ids
                    .entry(job.clone())
                    .or_insert_with(|| Arc::from(job.as_str()));
                entry.job = Some(shared.clone());
            }
            if matches!(task.state, TaskState::Allocated | TaskState::Running) {
                entry.state = TaskState::Pending;
                let mut t = transition(&entry, Some(task.state), TaskState::Pending, task.attempts);
                t.carried.message =
                    Some("requeued: the host stopped while the task was leased".into());
                requeued.push(Op::Transition(Box::new(t)));
            }
            sched.ready.insert(entry, now);
        }
        if !requeued.is_empty() {
            tracing::info!(
                tasks = requeued.len(),
                "requeued tasks leased before the restart"
            );
            self.inner.writer.send(requeued);
        }
        Ok(())
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.inner.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn policy(&self) -> Policy {
        Policy {
            aging_ms: self.inner.config.aging.as_millis() as u64,
            affinity_window_ms: self.inner.config.affinity_window.as_millis() as u64,
        }
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

    /// An entry for a durably stored task, its payload left on disk (read
    /// at lease) once waiting tasks hold `held_payload_bytes`.
    fn admit(&self, held: &mut u64, mut entry: Entry) -> Entry {
        let size = entry.payload.as_ref().map_or(0, |p| p.len() as u64);
        if *held + size > self.inner.config.held_payload_bytes {
            entry.payload = None;
        } else {
            *held += size;
        }
        entry
    }

    /// Create the next points of sweeps that are running low on waiting tasks.
    fn refill_sweeps(&self, sched: &mut Sched, now: Millis) {
        let chunk = self.inner.config.sweep_chunk.max(1);
        let mut ops = Vec::new();
        let Sched {
            sweeps,
            ready,
            jobs,
            ..
        } = sched;
        for cursor in sweeps.iter_mut() {
            let flags = jobs.get(&cursor.job).copied().unwrap_or_default();
            // Paused and held (priority 0) sweeps create nothing: their
            // points would only wait, costing memory and disk.
            let held = cursor.options.priority == 0;
            if held || flags.paused || flags.cancelled || cursor.next >= cursor.total {
                continue;
            }
            // Bounded in bytes as well as in points: a sweep with a large
            // base (up to 64 KiB) creates fewer tasks ahead.
            let chunk = chunk.min((SWEEP_AHEAD_BYTES / cursor.point_bytes).max(16));
            if ready.job_waiting(&cursor.job) >= chunk / 2 {
                continue;
            }
            let end = (cursor.next + chunk).min(cursor.total);
            let mut tasks = Vec::with_capacity((end - cursor.next) as usize);
            for index in cursor.next..end {
                let task = NewTask {
                    id: format!("{}.{index}", cursor.job),
                    job_id: Some(cursor.job.to_string()),
                    module: cursor.module.clone(),
                    payload: serde_json::to_vec(&cursor.sweep.point(index)).unwrap_or_default(),
                    options: cursor.options.clone(),
                };
                ready.insert(entry_from_new(&task, cursor.tags.clone(), now), now);
                tasks.push((task, cursor.tags.clone()));
            }
            cursor.next = end;
            ops.push(Op::NewTasks(tasks, now));
            ops.push(Op::JobExpanded(cursor.job.to_string(), end));
        }
        sweeps.retain(|c| c.next < c.total && !jobs.get(&c.job).is_some_and(|f| f.cancelled));
        if !ops.is_empty() {
            self.inner.writer.send(ops);
        }
    }

    /// Re-offer tasks whose lease was not renewed in time.
    fn expire_leases(&self, sched: &mut Sched, now: Millis) {
        let expired: Vec<Arc<str>> = sched
            .leased
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut ops = Vec::new();
        for id in expired {
            if let Some(lease) = sched.leased.remove(&id) {
                let mut t = transition(
                    &lease.entry,
                    Some(lease.state),
                    TaskState::Pending,
                    lease.entry.attempts,
                );
                t.carried.message =
                    Some(format!("requeued: lease held by {} expired", lease.worker));
                ops.push(Op::Transition(Box::new(t)));
                sched.ready.insert(
                    Entry {
                        queued_at: now,
                        ready_us: now_us(),
                        state: TaskState::Pending,
                        ..lease.entry
                    },
                    now,
                );
            }
        }
        if !ops.is_empty() {
            self.inner.writer.send(ops);
        }
    }

    fn take_lease(&self, id: &str, token: u64) -> Result<Leased, QueueError> {
        let mut sched = self.sched();
        match sched.leased.get(id) {
            Some(l) if l.token == token => Ok(sched.leased.remove(id).expect("present")),
            _ => Err(QueueError::StaleLease(id.to_string())),
        }
    }

    fn job_flags(&self, job: &JobId) -> Result<JobFlags, QueueError> {
        self.sched()
            .jobs
            .get(job.as_str())
            .copied()
            .ok_or_else(|| QueueError::NotFound(format!("job {job}")))
    }

    /// Durably pause or resume a job that is not cancelled.
    async fn set_paused(&self, job: &JobId, paused: bool) -> Result<(), QueueError> {
        let flags = self.job_flags(job)?;
        if flags.cancelled {
            return Err(QueueError::Conflict(format!("job {job} is cancelled")));
        }
        self.set_job_flags(job, JobFlags { paused, ..flags }).await
    }

    async fn set_job_flags(&self, job: &JobId, flags: JobFlags) -> Result<(), QueueError> {
        self.inner
            .writer
            .write(vec![Op::JobFlags {
                job: job.clone(),
                paused: flags.paused,
                cancelled: flags.cancelled,
            }])
            .await?;
        self.sched().jobs.insert(Arc::from(job.as_str()), flags);
        Ok(())
    }
}

/// A waiting entry for a task as submitted: no attempt made yet.
fn entry_from_new(task: &NewTask, tags: Tags, now: Millis) -> Entry {
    entry(
        &task.id,
        task.job_id.as_deref(),
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
    let tags = Arc::new(task.options.tags.clone());
    Entry {
        attempts: task.attempts,
        state: if task.state == TaskState::Error {
            TaskState::Error
        } else {
            TaskState::Pending
        },
        ..entry(
            &task.id,
            task.job_id.as_deref(),
            &task.module,
            &task.payload,
            &task.options,
            tags,
            queued_at,
        )
    }
}

fn entry(
    id: &str,
    job_id: Option<&str>,
    module: &ModuleId,
    payload: &[u8],
    options: &crate::model::TaskOptions,
    tags: Tags,
    queued_at: Millis,
) -> Entry {
    Entry {
        id: Arc::from(id),
        job: job_id.map(Arc::from),
        module: module.clone(),
        payload: Some(Arc::from(payload)),
        affinity: options.affinity.as_deref().map(Arc::from),
        priority: options.priority,
        tags,
        timeout_ms: options.timeout_ms,
        memory_bytes: options.memory_bytes,
        max_attempts: options.max_attempts,
        attempts: 0,
        queued_at,
        ready_us: queued_at * 1000,
        not_before: options.not_before,
        state: TaskState::Pending,
    }
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
impl Queue for EmbeddedQueue {
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

    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        self.inner
            .reader
            .with(|c| reader::module_bytes(c, id.as_str()))
            .ok()
            .flatten()
    }

    async fn submit_tasks(&self, tasks: Vec<NewTask>) -> Result<(), QueueError> {
        let now = now_ms();
        let tagged: Vec<(NewTask, Tags)> = tasks
            .into_iter()
            .map(|t| {
                let tags = Arc::new(t.options.tags.clone());
                (t, tags)
            })
            .collect();
        let entries: Vec<Entry> = tagged
            .iter()
            .map(|(t, tags)| entry_from_new(t, tags.clone(), now))
            .collect();
        self.inner
            .writer
            .write(vec![Op::NewTasks(tagged, now)])
            .await?;
        {
            let ready_us = now_us();
            let mut sched = self.sched();
            let mut held = sched.ready.payload_bytes();
            for entry in entries {
                let entry = self.admit(&mut held, Entry { ready_us, ..entry });
                sched.ready.insert(entry, now);
            }
        }
        self.inner.wake.notify_waiters();
        Ok(())
    }

    async fn submit_job(&self, job: NewJob) -> Result<JobRecord, QueueError> {
        let now = now_ms();
        let total = match &job.sweep {
            Some(sweep) => sweep
                .validate()
                .map_err(|e| QueueError::Conflict(e.to_string()))?,
            None => job.payloads.len() as u64,
        };
        let record = JobRecord {
            id: job.id.clone(),
            name: job.name.clone(),
            module: job.module.clone(),
            options: job.options.clone(),
            total,
            expanded: if job.sweep.is_some() { 0 } else { total },
            paused: false,
            cancelled: false,
            created_at: now,
            sweep: job.sweep.clone(),
        };
        let tags: Tags = Arc::new(job.options.tags.clone());
        // A job of up to one chunk (and every sweep) is one transaction.
        // Bigger explicit jobs are written a chunk per transaction, so a
        // million-task job does not hold the writer: the record first with
        // `expanded` 0, and `expanded` = `total` once the last chunk is
        // stored. One cut short by a crash is removed at the next start
        // (its submitter never heard it was accepted).
        let chunked = job.payloads.len() > JOB_CHUNK_TASKS;
        let mut first = Vec::with_capacity(2);
        if chunked {
            let mut accepting = record.clone();
            accepting.expanded = 0;
            self.inner.writer.write(vec![Op::Job(accepting)]).await?;
        } else {
            first.push(Op::Job(record.clone()));
        }
        let mut entries = Vec::with_capacity(job.payloads.len());
        let job_id: Arc<str> = Arc::from(job.id.as_str());
        let mut held = self.sched().ready.payload_bytes();
        let mut payloads = job.payloads.into_iter().enumerate().peekable();
        loop {
            let chunk: Vec<(NewTask, Tags)> = payloads
                .by_ref()
                .take(JOB_CHUNK_TASKS)
                .map(|(index, payload)| {
                    let task = NewTask {
                        id: format!("{}.{index}", job.id),
                        job_id: Some(job.id.clone()),
                        module: job.module.clone(),
                        payload,
                        options: job.options.clone(),
                    };
                    (task, tags.clone())
                })
                .collect();
            entries.extend(chunk.iter().map(|(t, tags)| {
                let entry = entry_from_new(t, tags.clone(), now);
                // One shared copy of the job id, not one per task.
                let entry = Entry {
                    job: Some(job_id.clone()),
                    ..entry
                };
                self.admit(&mut held, entry)
            }));
            let mut ops = std::mem::take(&mut first);
            if !chunk.is_empty() {
                ops.push(Op::NewTasks(chunk, now));
            }
            if payloads.peek().is_none() && chunked {
                ops.push(Op::JobExpanded(job.id.clone(), total));
            }
            self.inner.writer.write(ops).await?;
            if payloads.peek().is_none() {
                break;
            }
        }
        {
            let mut sched = self.sched();
            let id: Arc<str> = Arc::from(job.id.as_str());
            sched.jobs.insert(id.clone(), JobFlags::default());
            let ready_us = now_us();
            for entry in entries {
                sched.ready.insert(Entry { ready_us, ..entry }, now);
            }
            if let Some(sweep) = job.sweep {
                sched.sweeps.push(SweepCursor::new(
                    id,
                    job.module,
                    job.options,
                    sweep,
                    0,
                    total,
                ));
            }
        }
        self.inner.wake.notify_waiters();
        Ok(record)
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
            let now = now_ms();
            let step = {
                let mut sched = self.sched();
                sched.workers.insert(worker.id.clone(), worker.warm.clone());
                self.expire_leases(&mut sched, now);
                self.refill_sweeps(&mut sched, now);
                sched.ready.promote_due(now);
                // Disjoint fields: the check reads `workers` while `ready` is picked from,
                // so no copy of every worker's warm set is made on this hot path.
                let Sched { ready, workers, .. } = &mut *sched;
                let check = |module: &ModuleId, key: &str| {
                    workers
                        .iter()
                        .filter(|(id, _)| **id != worker.id)
                        .any(|(_, warm)| warm.iter().any(|(m, k)| m == module && k == key))
                };
                let pick = ready.pick(&worker.warm, &check, now, self.policy());
                match pick {
                    Pick::Task(entry, warm_hit) => {
                        sched.next_token += 1;
                        let token = sched.next_token;
                        let attempt = entry.attempts + 1;
                        let cancelled = Arc::new(Notify::new());
                        let lease = entry.lease(&worker.id, token, warm_hit, cancelled.clone());
                        let on_disk = entry.payload.is_none();
                        let mut t =
                            transition(&entry, Some(entry.state), TaskState::Allocated, attempt);
                        t.carried.worker = Some(worker.id.clone());
                        t.carried.wait_us = Some(now_us().saturating_sub(entry.ready_us));
                        self.inner.writer.send(vec![Op::Transition(Box::new(t))]);
                        let expires = now + self.inner.config.lease_ttl.as_millis() as u64;
                        let leased = Leased {
                            entry: Entry {
                                attempts: attempt,
                                ..entry
                            },
                            token,
                            worker: worker.id.clone(),
                            expires,
                            state: TaskState::Allocated,
                            cancelled,
                        };
                        sched.leased.insert(leased.entry.id.clone(), leased);
                        Step::Leased(lease, on_disk)
                    }
                    Pick::Wait(at) => Step::Wait(at),
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
        let mut sched = self.sched();
        let Some(leased) = sched
            .leased
            .get_mut(lease.task_id.as_str())
            .filter(|l| l.token == lease.token)
        else {
            return;
        };
        leased.state = TaskState::Running;
        let mut t = transition(
            &leased.entry,
            Some(TaskState::Allocated),
            TaskState::Running,
            lease.attempt,
        );
        t.carried.worker = Some(lease.worker.clone());
        self.inner.writer.send(vec![Op::Transition(Box::new(t))]);
    }

    fn heartbeat(&self, lease: &Lease) -> Result<(), QueueError> {
        let mut sched = self.sched();
        let leased = sched
            .leased
            .get_mut(lease.task_id.as_str())
            .filter(|l| l.token == lease.token)
            .ok_or_else(|| QueueError::StaleLease(lease.task_id.clone()))?;
        leased.expires = now_ms() + self.inner.config.lease_ttl.as_millis() as u64;
        Ok(())
    }

    fn complete(&self, lease: &Lease, completion: Completion) -> Result<(), QueueError> {
        let leased = self.take_lease(&lease.task_id, lease.token)?;
        let mut t = transition(
            &leased.entry,
            Some(leased.state),
            TaskState::Completed,
            lease.attempt,
        );
        t.carried.worker = Some(lease.worker.clone());
        t.carried.result = Some(completion.result);
        t.carried.logs = Some(completion.logs);
        t.carried.progress = Some(completion.progress);
        t.carried.run_us = Some(completion.run_us);
        self.inner.writer.send(vec![Op::Transition(Box::new(t))]);
        Ok(())
    }

    fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), QueueError> {
        let leased = self.take_lease(&lease.task_id, lease.token)?;
        let to = if failure.retry_at.is_some() {
            TaskState::Error
        } else {
            TaskState::Dead
        };
        let mut t = transition(&leased.entry, Some(leased.state), to, lease.attempt);
        t.carried.worker = Some(lease.worker.clone());
        t.carried.error = Some((failure.kind, failure.message));
        t.carried.logs = Some(failure.logs);
        t.carried.run_us = Some(failure.run_us);
        t.carried.not_before = failure.retry_at;
        self.inner.writer.send(vec![Op::Transition(Box::new(t))]);
        if let Some(retry_at) = failure.retry_at {
            let now = now_ms();
            self.sched().ready.insert(
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
        let Ok(leased) = self.take_lease(&lease.task_id, lease.token) else {
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
            "released by a stopping worker".into()
        });
        self.inner.writer.send(vec![Op::Transition(Box::new(t))]);
        if !cancelled {
            let now = now_ms();
            self.sched().ready.insert(
                Entry {
                    attempts,
                    state: TaskState::Pending,
                    ..leased.entry
                },
                now,
            );
            self.inner.wake.notify_waiters();
        }
    }

    async fn pause_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.set_paused(job, true).await?;
        self.sched().ready.pause(Arc::from(job.as_str()));
        self.job(job).await
    }

    async fn resume_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.set_paused(job, false).await?;
        self.sched().ready.resume(job, now_ms());
        self.inner.wake.notify_waiters();
        self.job(job).await
    }

    async fn cancel_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.job_flags(job)?;
        self.set_job_flags(
            job,
            JobFlags {
                cancelled: true,
                paused: false,
            },
        )
        .await?;
        let ops = {
            let mut sched = self.sched();
            sched.sweeps.retain(|c| &*c.job != job.as_str());
            for leased in sched
                .leased
                .values()
                .filter(|l| l.entry.job.as_deref() == Some(job.as_str()))
            {
                leased.cancelled.notify_one();
            }
            sched
                .ready
                .remove_job(job)
                .into_iter()
                .map(|entry| {
                    Op::Transition(Box::new(transition(
                        &entry,
                        Some(entry.state),
                        TaskState::Cancelled,
                        entry.attempts,
                    )))
                })
                .collect::<Vec<_>>()
        };
        self.inner.writer.write(ops).await?;
        self.job(job).await
    }

    async fn cancel_task(&self, task: &TaskId) -> Result<(), QueueError> {
        let op = {
            let mut sched = self.sched();
            if let Some(leased) = sched.leased.get(task.as_str()) {
                leased.cancelled.notify_one();
                return Ok(());
            }
            sched.ready.remove(task).map(|entry| {
                Op::Transition(Box::new(transition(
                    &entry,
                    Some(entry.state),
                    TaskState::Cancelled,
                    entry.attempts,
                )))
            })
        };
        match op {
            Some(op) => self.inner.writer.write(vec![op]).await,
            None => {
                let record = self.task(task).await?;
                Err(QueueError::Conflict(format!(
                    "task {task} is already {}",
                    record.state
                )))
            }
        }
    }

    async fn set_priority(&self, task: &TaskId, priority: u8) -> Result<(), QueueError> {
        let known = {
            let mut sched = self.sched();
            let waiting = sched.ready.set_priority(task, priority, now_ms());
            if let Some(leased) = sched.leased.get_mut(task.as_str()) {
                leased.entry.priority = priority;
            }
            waiting || sched.leased.contains_key(task.as_str())
        };
        if !known {
            let record = self.task(task).await?;
            return Err(QueueError::Conflict(format!(
                "task {task} is already {}",
                record.state
            )));
        }
        self.inner
            .writer
            .write(vec![Op::Priority(task.clone(), priority)])
            .await?;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    async fn set_job_priority(&self, job: &JobId, priority: u8) -> Result<JobRecord, QueueError> {
        let durable = {
            let mut sched = self.sched();
            let flags = sched
                .jobs
                .get(job.as_str())
                .copied()
                .ok_or_else(|| QueueError::NotFound(format!("job {job}")))?;
            if flags.cancelled {
                return Err(QueueError::Conflict(format!("job {job} is cancelled")));
            }
            // Memory and the writer's queue change together, under the
            // lock: points expanded after this carry the new priority, and
            // their rows are written after the job's update.
            let now = now_ms();
            sched.ready.set_job_priority(job, priority, now);
            for leased in sched.leased.values_mut() {
                if leased.entry.job.as_deref() == Some(job.as_str()) {
                    leased.entry.priority = priority;
                }
            }
            if let Some(cursor) = sched.sweeps.iter_mut().find(|c| *c.job == **job) {
                cursor.options.priority = priority;
            }
            let durable = self
                .inner
                .writer
                .write(vec![Op::JobPriority(job.clone(), priority)]);
            self.refill_sweeps(&mut sched, now);
            durable
        };
        durable.await?;
        self.inner.wake.notify_waiters();
        self.job(job).await
    }

    async fn task(&self, id: &TaskId) -> Result<TaskRecord, QueueError> {
        let id = id.clone();
        self.inner.reader.read(move |c| reader::task(c, &id)).await
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
        if let Some(cursor) = self.sched().sweeps.iter().find(|c| *c.job == *job.id) {
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
        let sched = self.sched();
        let mut depth = sched.ready.depth();
        for cursor in &sched.sweeps {
            depth[cursor.options.priority as usize] += cursor.total - cursor.next;
        }
        depth
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
}
