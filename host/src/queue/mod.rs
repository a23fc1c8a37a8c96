//! The task store: one small trait the dispatcher and the API use, and its
//! backends. `embedded` (SQLite, the default) keeps a durable log of every
//! task and event and an in-memory ready index for fast leasing; `kafka`
//! shares one grid between hosts through Kafka topics, each host keeping an
//! embedded store as its view of the event topic.
//!
//! The queue knows nothing about Wasm: a task is a module id and bytes.

pub mod embedded;
pub mod invocation;
pub mod kafka;
mod open;
pub mod remote;
pub(crate) mod scheduler;

pub use open::{StoreUrl, open};

use crate::model::{
    ErrorKind, Event, JobId, JobRecord, LogLine, Micros, Millis, ModuleId, ModuleKind, NewJob,
    NewTask, TaskId, TaskRecord, TaskState,
};
use async_trait::async_trait;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

/// Why a queue operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The request cannot be carried out in the current state.
    #[error("{0}")]
    Conflict(String),
    /// The lease is no longer held (it expired and the task was re-offered).
    #[error("lease on task {0} is no longer held")]
    StaleLease(TaskId),
    /// The store failed: what it was doing, and the error underneath
    /// (SQLite's, librdkafka's), kept as the source.
    #[error("store error: {context}{}", source.as_ref().map(|s| format!(": {s}")).unwrap_or_default())]
    Storage {
        /// What the store was doing.
        context: String,
        /// The error underneath, if any.
        #[source]
        source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    },
    /// The queue is shutting down.
    #[error("queue is shutting down")]
    Closed,
    /// The store does not take writes right now (a full disk, an I/O
    /// error); the host retries and recovers by itself once it can.
    #[error("{0}; try again later")]
    Unavailable(String),
}

impl QueueError {
    /// A store failure while doing `context`, caused by `source`.
    pub fn storage(
        context: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        QueueError::Storage {
            context: context.into(),
            source: Some(Arc::new(source)),
        }
    }

    /// A store failure with no error underneath (a broker's refusal code).
    pub fn storage_message(context: impl Into<String>) -> Self {
        QueueError::Storage {
            context: context.into(),
            source: None,
        }
    }
}

/// Errors are equal when they say the same (sources compared by message).
impl PartialEq for QueueError {
    fn eq(&self, other: &Self) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.to_string() == other.to_string()
    }
}

/// A module as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ModuleRecord {
    /// SHA-256 of its bytes.
    pub id: ModuleId,
    /// On upload: the name to give it. On reading: its most recently
    /// given name (what tables and metric legends show).
    pub name: Option<String>,
    /// Every name that points at this module, oldest first. Names are
    /// aliases: giving a module a name never takes one from another module
    /// unless that very name is re-pointed (a name points to its latest upload).
    #[serde(default)]
    pub names: Vec<String>,
    /// Component or WASI command.
    pub kind: ModuleKind,
    /// Size in bytes.
    pub size: u64,
    /// When first uploaded.
    pub created_at: Millis,
}

/// What a free worker tells the queue when it asks for work.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct WorkerView {
    /// Worker id, unique on this host.
    pub id: String,
    /// (module, affinity key) pairs warm on this worker.
    pub warm: Vec<(ModuleId, String)>,
    /// Which tasks it runs: `None` for Wasm tasks (a `kwq` worker),
    /// `external:KIND` for the tasks of that kind only (a worker written
    /// against the HTTP protocol, running no Wasm).
    #[serde(default)]
    pub pool: Option<ModuleId>,
}

/// A task leased to a worker: plain data named by task id and token, so a
/// worker elsewhere can hold one (it learns of a cancellation from the
/// answer to its heartbeat; `cancelled` is the in-process shortcut).
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Lease {
    /// The task.
    pub task_id: TaskId,
    /// Its job.
    pub job_id: Option<JobId>,
    /// Module to run.
    pub module: ModuleId,
    /// Input bytes.
    pub payload: Arc<[u8]>,
    /// Warm-instance key.
    pub affinity: Option<String>,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Wall-clock limit of this attempt.
    pub timeout: Duration,
    /// Memory cap of this attempt.
    pub memory_bytes: u64,
    /// Worker holding it.
    pub worker: String,
    /// Distinguishes this lease from earlier ones of the same task.
    pub token: u64,
    /// When the task was queued (for queue-wait time).
    pub queued_at: Millis,
    /// Whether the task's (module, key) was warm on the worker.
    pub warm_hit: bool,
    /// Fires when the task is cancelled while leased (in this process only).
    #[serde(skip)]
    pub cancelled: Arc<tokio::sync::Notify>,
    /// A fan-in task's job: its results, read with
    /// [`WorkQueue::input_results`], are the task's input.
    #[serde(default)]
    pub results_of: Option<JobId>,
}

/// What a successful attempt produced.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Completion {
    /// Result bytes.
    pub result: Vec<u8>,
    /// Guest log lines.
    pub logs: Vec<LogLine>,
    /// Last progress.
    pub progress: f32,
    /// Run time of the attempt, µs.
    pub run_us: Micros,
}

/// What a failed attempt left behind.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Failure {
    /// Why it failed.
    pub kind: ErrorKind,
    /// The message.
    pub message: String,
    /// Guest log lines.
    pub logs: Vec<LogLine>,
    /// Run time of the attempt, µs.
    pub run_us: Micros,
    /// When to retry; `None` parks the task as Dead.
    pub retry_at: Option<Millis>,
}

/// Filters of a task listing; all optional.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Only this job's tasks.
    pub job: Option<JobId>,
    /// Only tasks in this state.
    pub state: Option<TaskState>,
    /// Only tasks with this tag key and value.
    pub tag: Option<(String, String)>,
    /// Tasks after this cursor (from the previous page).
    pub after: Option<u64>,
    /// Page size.
    pub limit: usize,
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// The items.
    pub items: Vec<T>,
    /// Cursor for the next page, if there may be one.
    pub next: Option<u64>,
}

/// One completed task's result, as `GET /jobs/{id}/results` streams it.
#[derive(Debug, Clone)]
pub struct TaskResult {
    /// Cursor position.
    pub seq: u64,
    /// The task.
    pub task_id: TaskId,
    /// Result bytes.
    pub result: Vec<u8>,
}

/// Extra facts about a committed event, for statistics.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The event as stored.
    pub event: Event,
    /// State the task left (None for a new task).
    pub from: Option<TaskState>,
    /// Module of the task.
    pub module: ModuleId,
    /// Tags of the task.
    pub tags: Arc<BTreeMap<String, String>>,
}

/// Tasks that share their facts, for rebuilding statistics after a
/// restart: the census is grouped in the store, so rebuilding the
/// statistics of a 50-million-task job holds a few thousand rows, not one
/// per task.
#[derive(Debug, Clone)]
pub struct CensusRow {
    /// Its job.
    pub job_id: Option<JobId>,
    /// Its module.
    pub module: ModuleId,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// Its state.
    pub state: TaskState,
    /// Run time, µs, if Completed (to three significant digits).
    pub run_us: Option<Micros>,
    /// How many tasks share these facts.
    pub count: u64,
}

/// Told of every batch of events right after it is durably stored, in order.
pub trait CommitObserver: Send + Sync {
    /// Called from the store's writer; must be quick.
    fn committed(&self, batch: &[Committed]);

    /// Called from the store's writer when module records became durable
    /// (uploaded here, or read from another host), before any event of a
    /// task of theirs: how the tracker learns the names it labels metrics
    /// with. Must be quick.
    fn modules_stored(&self, _modules: &[ModuleRecord]) {}

    /// Called from the store's writer when waiting jobs were released or
    /// cancelled because of their dependencies (after the commit's
    /// events): a sweep that waited has no task whose event would say so.
    /// Must be quick.
    fn jobs_settled(&self, _jobs: &[SettledJob]) {}

    /// Called from a Kafka host view's writer with the tasks and jobs some
    /// waiter names that have ended (id, and whether it Completed), after
    /// the commit that ended them, and again at start-up for those whose
    /// waiters still wait: how the grid learns to release them. Must be
    /// quick.
    fn dependencies_ended(&self, _ended: &[(String, bool)]) {}
}

/// A job that waited for its dependencies and no longer does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettledJob {
    /// The job.
    pub job: JobId,
    /// Released (its tasks may run); else cancelled, a dependency having
    /// failed.
    pub released: bool,
}

/// A user's control over unfinished work, as the API sends it to the store
/// (and a remote client could send it over the wire).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "control", rename_all = "snake_case")]
pub enum Control {
    /// Stop leasing a job's tasks.
    PauseJob {
        /// The job.
        job: JobId,
    },
    /// Lease a paused job's tasks again.
    ResumeJob {
        /// The job.
        job: JobId,
    },
    /// Cancel a job's unfinished tasks (running ones are stopped).
    CancelJob {
        /// The job.
        job: JobId,
    },
    /// Change the priority of a job's unfinished tasks and of the sweep
    /// points not created yet (0 holds the job: a held sweep creates no
    /// points until raised).
    JobPriority {
        /// The job.
        job: JobId,
        /// 0..=9.
        priority: u8,
    },
    /// Cancel one unfinished task.
    CancelTask {
        /// The task.
        task: TaskId,
    },
    /// Delete a finished (or cancelled) job with its tasks, results and
    /// events, freeing their space in the store for new work; a job with
    /// unfinished tasks is refused.
    DeleteJob {
        /// The job.
        job: JobId,
    },
    /// Change an unfinished task's priority (0 holds it; raising releases it).
    TaskPriority {
        /// The task.
        task: TaskId,
        /// 0..=9.
        priority: u8,
    },
}

/// What a streamed job submission hands its store, in order: batches of
/// payloads as they are read, then `End` once the request is read whole
/// and every line was good.
#[derive(Debug)]
pub enum StreamItem {
    /// The next payloads, in order.
    Payloads(Vec<Vec<u8>>),
    /// The stream is complete: accept the job.
    End,
}

/// The receiving end of a streamed job's payloads (see [`StreamItem`]).
pub type PayloadStream = tokio::sync::mpsc::Receiver<StreamItem>;

/// The work side of a store, as the dispatcher (and whoever submits or
/// controls work) uses it: accept work, lease it by priority and affinity,
/// hear how each attempt went. Leases are plain data named by task id and
/// token, so a remote worker can hold one over the wire.
#[async_trait]
pub trait WorkQueue: Send + Sync + 'static {
    /// Store a module's bytes (idempotent by id).
    async fn put_module(
        &self,
        record: ModuleRecord,
        bytes: Vec<u8>,
    ) -> Result<ModuleRecord, QueueError>;
    /// A module's bytes (blocking-safe: used by the runtime on a cache miss).
    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>>;

    /// Durably accept tasks; they are Pending when this returns.
    async fn submit_tasks(&self, tasks: Vec<NewTask>) -> Result<(), QueueError>;
    /// Accept one task whose caller waits in the request for it to end
    /// (synchronous invocation). `durable`: answer only once the task and
    /// its result are durable, as every task; else the task is not queued
    /// on disk while the caller waits, and is written once with its result
    /// (on a host crash the caller gets an error, never a lost task). A
    /// backend without a faster path stores the task as
    /// [`submit_tasks`](Self::submit_tasks) does and reports its end
    /// through its commits.
    async fn invoke(
        &self,
        task: NewTask,
        durable: bool,
    ) -> Result<invocation::Invocation, QueueError> {
        let _ = durable;
        self.submit_tasks(vec![task]).await?;
        Ok(invocation::Invocation::stored())
    }
    /// Durably accept a job (explicit payloads or a sweep).
    async fn submit_job(&self, job: NewJob) -> Result<JobRecord, QueueError>;
    /// Whether [`submit_job_stream`](Self::submit_job_stream) keeps a
    /// stream's payloads out of memory, so a stream needs no cap on its
    /// length (Kafka); else a stream is capped as a JSON job's payloads are.
    fn streams_lazily(&self) -> bool {
        false
    }
    /// Whether tasks and jobs may name `after` here (the embedded store);
    /// a backend that cannot hold them Waiting says no, and the API refuses
    /// such submits instead of running them early.
    fn runs_dependencies(&self) -> bool {
        false
    }
    /// Whether a task may take a job's results as its input (`input:
    /// results_of`, streamed to it when it runs): the embedded store. A
    /// Kafka grid says no (a worker-only host keeps no results).
    fn feeds_results(&self) -> bool {
        false
    }
    /// A page of a job's completed results after a cursor, in task order:
    /// the input of a fan-in task leased from here (`Lease::results_of`).
    /// Stores that run no dependencies have no fan-in tasks.
    async fn input_results(
        &self,
        job: &JobId,
        _after: u64,
        _limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError> {
        Err(QueueError::Conflict(format!(
            "this store cannot read the results of job {job} as an input"
        )))
    }
    /// Durably accept a job whose payloads arrive in batches as they are
    /// read from a request (`POST /v1/jobs/stream`); `job.payloads` holds
    /// none of them. A stream that ends without [`StreamItem::End`] was cut
    /// off: nothing of it is accepted. The default collects the payloads
    /// and submits the job whole.
    async fn submit_job_stream(
        &self,
        mut job: NewJob,
        mut payloads: PayloadStream,
    ) -> Result<JobRecord, QueueError> {
        while let Some(item) = payloads.recv().await {
            match item {
                StreamItem::Payloads(batch) => job.payloads.extend(batch),
                StreamItem::End => return self.submit_job(job).await,
            }
        }
        Err(QueueError::Conflict(
            "the payload stream was cut off".into(),
        ))
    }
    /// Durably apply a user's control (pause, resume, cancel, priority).
    async fn control(&self, control: Control) -> Result<(), QueueError>;
    /// On a Kafka grid, what this host has read from each kind of topic and
    /// how many task runs ended here (for `/metrics` and `kwq bench kafka`);
    /// `None` on other backends.
    fn kafka_traffic(&self) -> Option<kafka::HostTraffic> {
        None
    }

    /// Wait for the best task for this worker; `None` once the queue is closed.
    async fn lease(&self, worker: &WorkerView) -> Option<Lease>;
    /// Up to `max` tasks for a worker that runs many (a remote worker's
    /// long poll): waits up to `wait` for the first, then takes what is
    /// ready now. Empty when the wait runs out or the queue closes.
    async fn lease_batch(&self, worker: &WorkerView, max: usize, wait: Duration) -> Vec<Lease> {
        let mut leases = Vec::new();
        match tokio::time::timeout(wait, self.lease(worker)).await {
            Ok(Some(lease)) => leases.push(lease),
            _ => return leases,
        }
        while leases.len() < max {
            match futures::FutureExt::now_or_never(self.lease(worker)) {
                Some(Some(lease)) => leases.push(lease),
                _ => break,
            }
        }
        leases
    }
    /// A worker is gone for good (a remote worker deregistered or went
    /// silent): forget what it had warm.
    fn forget_worker(&self, _worker: &str) {}
    /// The leased task started running.
    fn started(&self, lease: &Lease);
    /// Keep a long-running lease alive.
    fn heartbeat(&self, lease: &Lease) -> Result<(), QueueError>;
    /// The attempt succeeded.
    fn complete(&self, lease: &Lease, completion: Completion) -> Result<(), QueueError>;
    /// The attempt failed; retried at `failure.retry_at` or parked as Dead.
    fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), QueueError>;
    /// The attempt was abandoned (shutdown, cancellation): give the task back.
    fn release(&self, lease: &Lease, cancelled: bool);

    /// Whether the store takes writes: `Err(reason)` while it fails (a
    /// full disk); leasing stops and `/healthz` reports it meanwhile.
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// Changes handed to the store and not yet durable: how far memory is
    /// ahead of the store (leasing waits while it is over the bound).
    fn undurable(&self) -> usize {
        0
    }
    /// Stop handing out leases; wake every waiting worker.
    fn close(&self);
    /// Wait until everything accepted so far is durable.
    async fn flush(&self) -> Result<(), QueueError>;
    /// Begin taking work and events from outside (the Kafka backend's
    /// consumers); called once statistics are attached, so none is missed.
    fn start(&self) {}
}

/// The read side of a store, as the API and the tracker use it: records,
/// timelines, listings, results and the live event stream.
#[async_trait]
pub trait ReadStore: Send + Sync + 'static {
    /// A module's record.
    async fn module(&self, id: &ModuleId) -> Result<ModuleRecord, QueueError>;
    /// Every module.
    async fn modules(&self) -> Result<Vec<ModuleRecord>, QueueError>;
    /// The module a name points at (names are aliases; each points at the
    /// latest module uploaded under it), if any.
    async fn module_named(&self, name: &str) -> Result<Option<ModuleId>, QueueError>;

    /// One task with its full record.
    async fn task(&self, id: &TaskId) -> Result<TaskRecord, QueueError>;
    /// A task's events, oldest first.
    async fn timeline(&self, id: &TaskId) -> Result<Vec<Event>, QueueError>;
    /// Tasks matching a filter, one page.
    async fn tasks(&self, filter: TaskFilter) -> Result<Page<TaskRecord>, QueueError>;
    /// One job.
    async fn job(&self, id: &JobId) -> Result<JobRecord, QueueError>;
    /// Jobs, newest first.
    async fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError>;
    /// Completed results of a job after a cursor, in task order.
    async fn results(
        &self,
        job: &JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError>;
    /// Stored events after an offset.
    async fn events_since(&self, offset: u64, limit: usize) -> Result<Vec<Event>, QueueError>;
    /// Stored tasks grouped by their facts, for rebuilding statistics at start.
    async fn census(&self) -> Result<Vec<CensusRow>, QueueError>;
    /// Live events, as they are stored.
    fn subscribe(&self) -> broadcast::Receiver<Event>;
    /// Register the statistics observer.
    fn observe(&self, observer: Arc<dyn CommitObserver>);
    /// Tasks waiting to be leased, per priority 0..=9 (including unexpanded sweep points).
    fn depth(&self) -> [u64; 10];
}

/// A whole store, both sides: what a backend is and what a host assembles.
/// Its provided methods pair a control with the job record it leaves.
#[async_trait]
pub trait Queue: WorkQueue + ReadStore {
    /// Pause a job; its record after.
    async fn pause_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.control(Control::PauseJob { job: job.clone() }).await?;
        self.job(job).await
    }
    /// Resume a paused job; its record after.
    async fn resume_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.control(Control::ResumeJob { job: job.clone() })
            .await?;
        self.job(job).await
    }
    /// Cancel a job; its record after.
    async fn cancel_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.control(Control::CancelJob { job: job.clone() })
            .await?;
        self.job(job).await
    }
    /// Change a job's priority; its record after.
    async fn set_job_priority(&self, job: &JobId, priority: u8) -> Result<JobRecord, QueueError> {
        self.control(Control::JobPriority {
            job: job.clone(),
            priority,
        })
        .await?;
        self.job(job).await
    }
    /// Cancel one unfinished task.
    async fn cancel_task(&self, task: &TaskId) -> Result<(), QueueError> {
        self.control(Control::CancelTask { task: task.clone() })
            .await
    }
    /// Change an unfinished task's priority.
    async fn set_priority(&self, task: &TaskId, priority: u8) -> Result<(), QueueError> {
        self.control(Control::TaskPriority {
            task: task.clone(),
            priority,
        })
        .await
    }
}

impl<T: WorkQueue + ReadStore + ?Sized> Queue for T {}
