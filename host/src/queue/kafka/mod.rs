//! The Kafka backend: several hosts share one grid through topics.
//!
//! - Tasks live on one topic per priority band (`<prefix>tasks.p0..p9`). All
//!   hosts read them in one consumer group into a local ready index (the
//!   embedded backend's), so each host picks by priority, aging and affinity
//!   among what it holds; each band is read ahead at most `band_buffer`
//!   tasks (its partition queues are left unread beyond that), so a flood of low
//!   priority work never keeps a high band from being read.
//! - Offsets are committed only up to the lowest unfinished task of each
//!   partition ([`offsets`]): a host killed mid-task loses nothing, and the
//!   next owner of the partition replays at most its unfinished tasks.
//! - Every transition is an event on `<prefix>events`; every host with a
//!   view (roles `all` and `api`, see [`Role`]) reads that topic into an
//!   embedded store, its view, which serves the HTTP API. A view applies an
//!   event only if it moves the task forward, so replays and duplicates
//!   collapse into one result per task. Worker-only hosts do not read it.
//! - Pauses, resumes, cancels and priority changes go on the compacted
//!   `<prefix>control` topic ([`controls`]), which every host reads whole
//!   before it reads a task.
//! - Sweeps and payload streams of any size are written to their band as
//!   the job drains, by the host that owns the job's cursor on
//!   `<prefix>expand` ([`expand`], [`streams`]).
//! - Modules are chunked onto the compacted `<prefix>modules` topic and
//!   reassembled (and checked against their SHA-256) by every host.
//! - Retries are re-published to their band with the attempt count and a
//!   not-before time; exhausted tasks go to `<prefix>dead`.

mod arrivals;
mod band_queues;
mod batch;
mod config;
mod consumer;
mod controls;
mod expand;
mod intake;
pub(crate) mod offsets;
mod publish;
mod reads;
mod rejoin;
mod streams;
mod topics;
mod view;
mod waiting;
pub mod wire;

pub use config::{KafkaConfig, Role};
pub use publish::written;
pub use reads::{Fetched, HostTraffic, ReadTotals, TopicKind};
pub use topics::Topics;

use super::embedded::EmbeddedQueue;
use super::scheduler::ready::{Entry, Policy};
use super::scheduler::{Leased, Offer, Scheduler};
use super::{
    CensusRow, CommitObserver, Completion, Control, Failure, Lease, ModuleRecord, Page, QueueError,
    ReadStore, TaskFilter, TaskResult, WorkQueue, WorkerView,
};
use crate::model::{
    ErrorKind, Event, JobId, JobRecord, ModuleId, NewJob, NewTask, TaskId, TaskOptions, TaskRecord,
    TaskState, now_ms,
};
use async_trait::async_trait;
use batch::EventBatcher;
use offsets::{Partition, Progress};
use publish::{Outgoing, Publisher};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use wire::{EventMessage, TaskEvent, TaskMessage};

/// Largest result a Completed event may carry (base64 makes it a third
/// bigger; Kafka's default message limit is 1 MB). Bigger results fail the
/// task with `output_too_large`.
pub const MAX_RESULT_BYTES: usize = 640 * 1024;

/// Where a task was read from; finishing it lets that offset be committed.
#[derive(Debug, Clone)]
struct Origin {
    partition: Partition,
    offset: i64,
}

/// What this host holds: tasks read (waiting in the scheduler with the
/// offsets they were read from, or leased with them), controls, offsets.
struct GridState {
    /// Leases carry the offsets their task was read from.
    scheduler: Scheduler<Vec<Origin>>,
    /// The offsets each waiting task was read from.
    origins: HashMap<Arc<str>, Vec<Origin>>,
    cancelled_jobs: HashSet<Arc<str>>,
    /// Why the grid cancelled a job (a failed dependency), from its
    /// control: folded into the job's record when its announcement is read
    /// after the control (see `Member::with_controls`). One entry per job
    /// the grid itself cancelled.
    cancel_reasons: HashMap<Arc<str>, String>,
    /// Each known job's priority, which its tasks take when read (a
    /// priority change may arrive before some of its tasks are read).
    job_priorities: HashMap<Arc<str>, u8>,
    cancelled_tasks: HashSet<String>,
    /// Tasks whose priority a user changed (`task/<id>` controls), which
    /// they take when read from their band or released from waiting: the
    /// change may come before this host holds the task. One entry per
    /// change a user made, as `cancelled_tasks` has per cancel.
    task_priorities: HashMap<String, u8>,
    /// When each leased task not yet started was allocated, and how long
    /// it had waited (µs): its Running event carries both, as Kafka hosts
    /// write no Allocated event of their own.
    allocations: HashMap<Arc<str>, (u64, u64)>,
    progress: Progress,
    /// The `done/` records read from the control topic: dependencies that
    /// ended, and whether each Completed (see [`waiting`]). One entry per
    /// task or job some waiter named, not per task run.
    ended: HashMap<String, bool>,
}

/// This host's membership of the grid, shared by the queue handle and its
/// consumer threads.
struct Member {
    config: KafkaConfig,
    topics: Topics,
    view: EmbeddedQueue,
    /// Wakes fetches of modules uploaded on another host.
    arrivals: Arc<arrivals::ModuleArrivals>,
    publisher: Publisher,
    /// Gathers task events into few messages.
    batcher: EventBatcher,
    state: Mutex<GridState>,
    wake: Notify,
    closed: AtomicBool,
    /// What this host has read, per kind of topic.
    reads: reads::ReadCounters,
    /// What the brokers sent the task consumer (librdkafka's statistics).
    task_fetched: reads::FetchCounters,
    /// Tasks whose run ended here (completed or failed).
    finished_here: AtomicU64,
    /// Sweep jobs this host's expander is expanding now.
    expanding: AtomicU64,
    /// Waiters (jobs and tasks) whose held cursors this host owns now.
    held: AtomicU64,
    /// Sweep points this host's expander has written.
    expanded_here: AtomicU64,
    /// Band partitions the workers' group has assigned this host now.
    task_partitions: AtomicU64,
    /// Records whose delivery failed and that were sent again.
    resent_records: AtomicU64,
    /// Controls applied so far: the expander decides waiting tasks again
    /// only when this moves (a `done/` record or a cancel may free them).
    controls_applied: AtomicU64,
}

/// A host's handle on a Kafka grid. Cheap to clone.
#[derive(Clone)]
pub struct KafkaQueue {
    shared: Arc<Member>,
    threads: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
    started: Arc<AtomicBool>,
}

impl KafkaQueue {
    /// Connect: create the grid's topics if absent and open this host's
    /// view. Nothing is read until [`Queue::start`].
    pub async fn connect(
        config: KafkaConfig,
        aging: Duration,
        affinity_window: Duration,
    ) -> Result<Self, QueueError> {
        let topics = Topics::new(&config.prefix);
        if config.create_topics {
            topics::ensure(&config, &topics).await?;
        }
        let view = EmbeddedQueue::open_view(&config.view_path)?;
        let publisher = Publisher::new(&config)?;
        let policy = Policy {
            aging_ms: aging.as_millis() as u64,
            affinity_window_ms: affinity_window.as_millis() as u64,
        };
        // A lease lasts while this host owns the task's partition; the
        // consumer group notices a dead host, not a missed heartbeat.
        let mut state = GridState {
            scheduler: Scheduler::new(policy, None),
            origins: HashMap::new(),
            cancelled_jobs: HashSet::new(),
            cancel_reasons: HashMap::new(),
            job_priorities: HashMap::new(),
            cancelled_tasks: HashSet::new(),
            task_priorities: HashMap::new(),
            allocations: HashMap::new(),
            progress: Progress::default(),
            ended: HashMap::new(),
        };
        for job in view.jobs(usize::MAX >> 1).await? {
            let id: Arc<str> = Arc::from(job.id.as_str());
            if job.paused {
                state.scheduler.ready.pause(id.clone());
            }
            if job.cancelled {
                state.cancelled_jobs.insert(id);
            } else {
                state.job_priorities.insert(id, job.options.priority);
            }
        }
        let arrivals = Arc::new(arrivals::ModuleArrivals::default());
        view.observe(arrivals.clone());
        let source = format!("{}/{}", config.host, uuid::Uuid::new_v4().simple());
        let shared = Arc::new(Member {
            config,
            topics,
            view,
            arrivals,
            publisher,
            batcher: EventBatcher::new(source),
            state: Mutex::new(state),
            wake: Notify::new(),
            closed: AtomicBool::new(false),
            reads: reads::ReadCounters::default(),
            task_fetched: reads::FetchCounters::default(),
            finished_here: AtomicU64::new(0),
            expanding: AtomicU64::new(0),
            held: AtomicU64::new(0),
            expanded_here: AtomicU64::new(0),
            task_partitions: AtomicU64::new(0),
            resent_records: AtomicU64::new(0),
            controls_applied: AtomicU64::new(0),
        });
        if shared.config.role.keeps_view() {
            shared
                .view
                .observe(Arc::new(waiting::EndedReporter::new(&shared)));
        }
        Ok(KafkaQueue {
            shared,
            threads: Arc::default(),
            started: Arc::default(),
        })
    }

    /// The grid's topic names.
    pub fn topics(&self) -> &Topics {
        &self.shared.topics
    }

    /// Tasks read from Kafka and not yet finished on this host.
    pub fn in_flight(&self) -> usize {
        self.shared.state().progress.in_flight()
    }

    /// What this host has read from the grid's topics so far.
    pub fn reads(&self) -> ReadTotals {
        self.shared.reads.totals()
    }

    /// Tasks whose run ended on this host (completed, or failed) so far.
    pub fn finished_here(&self) -> u64 {
        self.shared.finished_here.load(Ordering::Relaxed)
    }

    /// This host's role in the grid.
    pub fn role(&self) -> Role {
        self.shared.config.role
    }

    /// A sweep job: its announcement and its first expand cursor, two
    /// messages whatever its size; the expander that owns the cursor's
    /// partition writes the points as the job drains (see [`expand`]).
    async fn submit_sweep(&self, job: NewJob) -> Result<JobRecord, QueueError> {
        let total = job
            .sweep
            .as_ref()
            .map(|sweep| sweep.validate())
            .transpose()
            .map_err(|e| QueueError::Conflict(e.to_string()))?
            .unwrap_or(0);
        let record = job.record(total, 0, now_ms());
        self.announce_expansion(record, None).await
    }

    /// Announce a job whose tasks the expanders write as it drains (a
    /// sweep, or a stream whose payloads start at `payloads`), and write
    /// its first expand cursor: two messages whatever its size.
    async fn announce_expansion(
        &self,
        record: JobRecord,
        payloads: Option<wire::PayloadsAt>,
    ) -> Result<JobRecord, QueueError> {
        let shared = self.shared.clone();
        let band = shared.topics.band(record.options.priority);
        // Where the band ends now: every task will be written past it.
        let scan = tokio::task::spawn_blocking(move || {
            expand::positions(shared.publisher.client(), &band)
        })
        .await
        .map_err(|e| QueueError::storage("looking up the band's end", e))??;
        let mut cursor = wire::ExpandCursor::new(record.clone(), 0, scan, false, payloads);
        if record.waiting {
            // Held until its dependencies end (see `waiting`).
            cursor = cursor.waiting(
                true,
                record.options.after.clone(),
                record.options.on_failure,
            );
        }
        let records = [
            self.shared.event_record(EventMessage::Job {
                v: wire::EXPANSION_VERSION,
                job: record.clone(),
            }),
            Outgoing {
                topic: self.shared.topics.expand(),
                partition: None,
                key: record.id.clone(),
                value: cursor.encode(),
            },
        ];
        self.shared.publisher.send_all(&records).await?;
        self.shared.view_job(record).await
    }
}

impl Member {
    fn state(&self) -> std::sync::MutexGuard<'_, GridState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Publish task events (and any other records) in the next batch; when
    /// all are delivered, apply the events to this host's view and let the
    /// offsets the task was read from be committed.
    fn publish(self: &Arc<Self>, events: Vec<TaskEvent>, extra: Vec<Outgoing>, done: Vec<Origin>) {
        EventBatcher::push(self, events, extra, done);
    }

    /// Apply this host's own task events to its view, if it keeps one.
    fn apply_own(&self, events: &[TaskEvent]) {
        if !self.config.role.keeps_view() {
            return;
        }
        let mut local = Vec::with_capacity(events.len());
        for event in events {
            view::changes_of(event, &mut local);
        }
        self.view.apply_view(local);
    }

    /// Put a job just submitted here into this host's view, if it keeps one.
    async fn view_job(&self, record: JobRecord) -> Result<JobRecord, QueueError> {
        if self.config.role.keeps_view() {
            self.view
                .apply_view(vec![super::embedded::ViewChange::Job(record.clone())]);
            self.view.flush().await?;
        }
        Ok(record)
    }

    fn event_record(&self, event: EventMessage) -> Outgoing {
        Outgoing {
            topic: self.topics.events(),
            partition: None,
            key: event.key().to_string(),
            value: event.encode(),
        }
    }

    fn task_record(&self, message: &TaskMessage, topic: String) -> Outgoing {
        Outgoing {
            topic,
            partition: None,
            key: message.key().unwrap_or_default().to_string(),
            value: serde_json::to_vec(message).unwrap_or_default(),
        }
    }

    /// End a lease; `event` (its outcome) carries the Allocated that was
    /// never written if the task ended without starting.
    fn take_lease(
        &self,
        lease: &Lease,
        event: Option<&mut TaskEvent>,
    ) -> Result<Leased<Vec<Origin>>, QueueError> {
        let mut state = self.state();
        let leased = state.scheduler.take(&lease.task_id, lease.token)?;
        let allocated = state.allocations.remove(lease.task_id.as_str());
        drop(state);
        if let (Some(event), Some(allocated)) = (event, allocated) {
            carry_allocation(event, &leased.entry, allocated);
        }
        Ok(leased)
    }
}

/// Put a task's Allocated (when, and how long it had waited) on its next
/// event, with its definition, as the Allocated event carried it: a view
/// may read this event before the job message that made the task's row
/// (they are on different partitions), and creates the row from it.
fn carry_allocation(event: &mut TaskEvent, entry: &Entry, (at, wait_us): (u64, u64)) {
    event.allocated_at = Some(at);
    event.wait_us = Some(wait_us);
    set_spec(event, &entry.module, &entry.options());
}

/// Let an event announce its task's definition (on Pending, and on the
/// event that carries the Allocated).
fn set_spec(event: &mut TaskEvent, module: &ModuleId, options: &TaskOptions) {
    event.module = Some(module.to_string());
    event.options = Some(options.clone());
}

#[async_trait]
impl WorkQueue for KafkaQueue {
    async fn put_module(
        &self,
        record: ModuleRecord,
        bytes: Vec<u8>,
    ) -> Result<ModuleRecord, QueueError> {
        let chunks = wire::ModuleChunk::split(
            record.id.as_str(),
            record.name.as_deref(),
            record.kind,
            record.created_at,
            &bytes,
        );
        let records: Vec<Outgoing> = chunks
            .iter()
            .map(|chunk| Outgoing {
                topic: self.shared.topics.modules(),
                partition: None,
                key: chunk.key(),
                value: serde_json::to_vec(chunk).unwrap_or_default(),
            })
            .collect();
        self.shared.publisher.send_all(&records).await?;
        self.shared.view.put_module(record, bytes).await
    }

    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        // Uploaded on another host and perhaps still on its way here: wait
        // (on a blocking thread) for the view to store it, up to 10 s.
        self.shared.arrivals.wait_for(
            Duration::from_secs(10),
            || self.shared.view.module_bytes(id),
            || self.shared.closed(),
        )
    }

    async fn submit_tasks(&self, tasks: Vec<NewTask>) -> Result<(), QueueError> {
        let (waiters, tasks): (Vec<NewTask>, Vec<NewTask>) =
            tasks.into_iter().partition(|t| !t.options.after.is_empty());
        if !waiters.is_empty() {
            self.submit_waiting(&waiters).await?;
        }
        if tasks.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(tasks.len() + 1);
        let mut events = Vec::with_capacity(tasks.len());
        for task in &tasks {
            let message = TaskMessage::new(
                &task.id,
                task.job_id.as_deref(),
                task.module.as_str(),
                &task.payload,
                &task.options,
            );
            records.push(
                self.shared
                    .task_record(&message, self.shared.topics.band(task.options.priority)),
            );
            let mut event = TaskEvent::new(&task.id, task.job_id.as_deref(), TaskState::Pending, 0);
            set_spec(&mut event, &task.module, &task.options);
            events.push(event);
        }
        // The Pending events in batches; a view finds a task's Pending
        // whether it reads the task message first or its event.
        records.extend(self.shared.batch_records(&events));
        self.shared.publisher.send_all(&records).await?;
        self.shared.apply_own(&events);
        self.shared.view.flush().await
    }

    async fn submit_job(&self, mut job: NewJob) -> Result<JobRecord, QueueError> {
        if job.sweep.is_some() {
            return self.submit_sweep(job).await;
        }
        if !job.options.after.is_empty() {
            // A job that waits is held by an expander, as a stream is:
            // its payloads go to the payloads topic now, its tasks later.
            let payloads = std::mem::take(&mut job.payloads);
            let (sender, stream) = tokio::sync::mpsc::channel(2);
            sender
                .send(super::StreamItem::Payloads(payloads))
                .await
                .map_err(|_| QueueError::Closed)?;
            sender
                .send(super::StreamItem::End)
                .await
                .map_err(|_| QueueError::Closed)?;
            return self.submit_stream(job, stream).await;
        }
        let now = now_ms();
        let payloads = std::mem::take(&mut job.payloads);
        let total = payloads.len() as u64;
        let record = job.record(total, total, now);
        let band = self.shared.topics.band(job.options.priority);
        let mut records = Vec::with_capacity(payloads.len() + 1);
        // The announcement first: a view creates the job's Pending rows from it.
        records.push(self.shared.event_record(EventMessage::Job {
            v: wire::EVENT_VERSION,
            job: record.clone(),
        }));
        for (index, payload) in payloads.iter().enumerate() {
            let id = format!("{}.{index}", job.id);
            let message = TaskMessage::new(
                &id,
                Some(&job.id),
                job.module.as_str(),
                payload,
                &job.options,
            );
            records.push(self.shared.task_record(&message, band.clone()));
        }
        self.shared.publisher.send_all(&records).await?;
        self.shared.view_job(record).await
    }

    fn streams_lazily(&self) -> bool {
        true
    }

    fn runs_dependencies(&self) -> bool {
        true
    }

    async fn submit_job_stream(
        &self,
        job: NewJob,
        payloads: super::PayloadStream,
    ) -> Result<JobRecord, QueueError> {
        self.submit_stream(job, payloads).await
    }

    async fn lease(&self, worker: &WorkerView) -> Option<Lease> {
        let shared = &self.shared;
        loop {
            let notified = shared.wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if shared.closed() {
                return None;
            }
            let now = now_ms();
            let wake_at = {
                let mut state = shared.state();
                let GridState {
                    scheduler, origins, ..
                } = &mut *state;
                match scheduler.offer(worker, now, |entry| {
                    origins.remove(&entry.id).unwrap_or_default()
                }) {
                    Offer::Granted {
                        lease,
                        leased,
                        wait_us,
                        ..
                    } => {
                        // Written with its Running (one event fewer per task).
                        let id = leased.entry.id.clone();
                        state.allocations.insert(id, (now, wait_us));
                        return Some(lease);
                    }
                    Offer::Wait(at) => at,
                }
            };
            let until = wake_at.unwrap_or(now + 1000).min(now + 1000).max(now + 1);
            let sleep = tokio::time::sleep(Duration::from_millis(until - now));
            tokio::select! {
                _ = notified => {}
                _ = sleep => {}
            }
        }
    }

    fn started(&self, lease: &Lease) {
        let mut event = TaskEvent::new(
            &lease.task_id,
            lease.job_id.as_deref(),
            TaskState::Running,
            lease.attempt,
        );
        {
            let mut state = self.shared.state();
            let allocated = state.allocations.remove(lease.task_id.as_str());
            let Some(leased) = state.scheduler.start(&lease.task_id, lease.token) else {
                return;
            };
            if let Some(allocated) = allocated {
                carry_allocation(&mut event, &leased.entry, allocated);
            }
        }
        event.worker = Some(lease.worker.clone());
        self.shared.publish(vec![event], Vec::new(), Vec::new());
    }

    fn forget_worker(&self, worker: &str) {
        self.shared.state().scheduler.forget_worker(worker);
    }

    fn heartbeat(&self, lease: &Lease) -> Result<(), QueueError> {
        self.shared
            .state()
            .scheduler
            .renew(&lease.task_id, lease.token, now_ms())
    }

    fn complete(&self, lease: &Lease, completion: Completion) -> Result<(), QueueError> {
        if completion.result.len() > MAX_RESULT_BYTES {
            return self.fail(
                lease,
                Failure {
                    kind: ErrorKind::OutputTooLarge,
                    message: format!(
                        "result of {} bytes is more than the Kafka backend carries ({MAX_RESULT_BYTES})",
                        completion.result.len()
                    ),
                    logs: completion.logs,
                    run_us: completion.run_us,
                    retry_at: None,
                },
            );
        }
        let mut event = TaskEvent::new(
            &lease.task_id,
            lease.job_id.as_deref(),
            TaskState::Completed,
            lease.attempt,
        )
        .with_result(&completion.result);
        let leased = self.shared.take_lease(lease, Some(&mut event))?;
        event.worker = Some(lease.worker.clone());
        event.logs = Some(completion.logs);
        event.progress = Some(completion.progress);
        event.run_us = Some(completion.run_us);
        self.shared.finished_here.fetch_add(1, Ordering::Relaxed);
        self.shared.publish(vec![event], Vec::new(), leased.extra);
        Ok(())
    }

    fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), QueueError> {
        let to = if failure.retry_at.is_some() {
            TaskState::Error
        } else {
            TaskState::Dead
        };
        let mut event = TaskEvent::new(&lease.task_id, lease.job_id.as_deref(), to, lease.attempt);
        let leased = self.shared.take_lease(lease, Some(&mut event))?;
        event.worker = Some(lease.worker.clone());
        event.error_kind = Some(failure.kind);
        event.message = Some(failure.message.clone());
        event.logs = Some(failure.logs);
        event.run_us = Some(failure.run_us);
        event.not_before = failure.retry_at;
        let entry = &leased.entry;
        let mut message = TaskMessage::new(
            &entry.id,
            entry.job.as_deref(),
            entry.module.as_str(),
            entry.payload.as_deref().unwrap_or_default(),
            &entry.options(),
        );
        message.attempts = lease.attempt;
        message.submitted_at = Some(entry.queued_at);
        let record = match failure.retry_at {
            Some(at) => {
                message.not_before = Some(at);
                self.shared
                    .task_record(&message, self.shared.topics.band(entry.priority))
            }
            None => {
                message.error_kind = Some(failure.kind);
                message.error = Some(failure.message);
                self.shared.task_record(&message, self.shared.topics.dead())
            }
        };
        self.shared.finished_here.fetch_add(1, Ordering::Relaxed);
        self.shared.publish(vec![event], vec![record], leased.extra);
        Ok(())
    }

    fn release(&self, lease: &Lease, cancelled: bool) {
        let mut event = TaskEvent::new(
            &lease.task_id,
            lease.job_id.as_deref(),
            TaskState::Cancelled,
            lease.attempt,
        );
        let Ok(leased) = self
            .shared
            .take_lease(lease, cancelled.then_some(&mut event))
        else {
            return;
        };
        if cancelled {
            event.message = Some("cancelled while running".into());
            self.shared.publish(vec![event], Vec::new(), leased.extra);
            return;
        }
        // Given back by its worker: waiting here again, the attempt not
        // counted, its offsets still uncommitted (so if this host stops
        // first, whoever owns the partition next runs it).
        if self.shared.closed() {
            return;
        }
        let attempts = lease.attempt.saturating_sub(1);
        let mut event = TaskEvent::new(
            &lease.task_id,
            lease.job_id.as_deref(),
            TaskState::Pending,
            attempts,
        );
        event.message = Some("released by a stopping worker".into());
        {
            let now = now_ms();
            let mut state = self.shared.state();
            let entry = leased.entry.after_attempts(attempts, false);
            state.origins.insert(entry.id.clone(), leased.extra);
            state.scheduler.ready.insert(entry, now);
        }
        self.shared.publish(vec![event], Vec::new(), Vec::new());
        self.shared.wake.notify_waiters();
    }

    fn health(&self) -> Result<(), String> {
        self.shared.view.health()
    }

    fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.wake.notify_waiters();
        self.shared.arrivals.wake_all();
    }

    async fn flush(&self) -> Result<(), QueueError> {
        self.shared.publisher.drain(Duration::from_secs(30)).await;
        if self.shared.closed() {
            // Let the consumers make their last commit and leave the group.
            let threads: Vec<_> =
                std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
            tokio::task::spawn_blocking(move || {
                for thread in threads {
                    let _ = thread.join();
                }
            })
            .await
            .map_err(|e| QueueError::storage("joining the consumer threads", e))?;
        }
        self.shared.view.flush().await
    }

    fn start(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let role = self.shared.config.role;
        if role.keeps_view() {
            // What a crash may have kept from the control topic.
            self.shared.view.report_ended_dependencies();
        }
        match view::start(self.shared.clone()) {
            Ok(thread) => threads.push(thread),
            Err(e) => {
                tracing::error!(error = %e, "cannot start reading the event and modules topics")
            }
        }
        // Tasks are read, and sweeps expanded, only once every control
        // written before this host started is known (a paused job's tasks
        // must not run meanwhile, nor a cancelled job's points be written).
        let (caught_up, controls_read) = std::sync::mpsc::channel();
        let (expand_caught_up, expand_controls_read) = std::sync::mpsc::channel();
        match controls::start(self.shared.clone(), vec![caught_up, expand_caught_up]) {
            Ok(thread) => threads.push(thread),
            Err(e) => tracing::error!(error = %e, "cannot start reading the control topic"),
        }
        match expand::start(self.shared.clone(), expand_controls_read) {
            Ok(thread) => threads.push(thread),
            Err(e) => tracing::error!(error = %e, "cannot start expanding sweeps"),
        }
        if role.runs_tasks() {
            match consumer::start(self.shared.clone(), controls_read) {
                Ok(thread) => threads.push(thread),
                Err(e) => tracing::error!(error = %e, "cannot start reading the task topics"),
            }
        }
    }

    async fn control(&self, control: Control) -> Result<(), QueueError> {
        self.publish_control(control).await
    }

    fn kafka_traffic(&self) -> Option<HostTraffic> {
        Some(HostTraffic {
            reads: self.reads(),
            finished: self.finished_here(),
            expanding: self.shared.expanding.load(Ordering::Relaxed),
            held: self.shared.held.load(Ordering::Relaxed),
            expanded: self.shared.expanded_here.load(Ordering::Relaxed),
            task_partitions: self.shared.task_partitions.load(Ordering::Relaxed),
            resent_records: self.shared.resent_records.load(Ordering::Relaxed),
            task_fetched: self.shared.task_fetched.totals(),
        })
    }
}

#[async_trait]
impl ReadStore for KafkaQueue {
    async fn module(&self, id: &ModuleId) -> Result<ModuleRecord, QueueError> {
        self.shared.view.module(id).await
    }

    async fn modules(&self) -> Result<Vec<ModuleRecord>, QueueError> {
        self.shared.view.modules().await
    }

    async fn module_named(&self, name: &str) -> Result<Option<ModuleId>, QueueError> {
        ReadStore::module_named(&self.shared.view, name).await
    }

    async fn task(&self, id: &TaskId) -> Result<TaskRecord, QueueError> {
        self.shared.view.task(id).await
    }

    async fn timeline(&self, id: &TaskId) -> Result<Vec<Event>, QueueError> {
        self.shared.view.timeline(id).await
    }

    async fn tasks(&self, filter: TaskFilter) -> Result<Page<TaskRecord>, QueueError> {
        self.shared.view.tasks(filter).await
    }

    async fn job(&self, id: &JobId) -> Result<JobRecord, QueueError> {
        self.shared.view.job(id).await
    }

    async fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
        self.shared.view.jobs(limit).await
    }

    async fn results(
        &self,
        job: &JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError> {
        self.shared.view.results(job, after, limit).await
    }

    async fn events_since(&self, offset: u64, limit: usize) -> Result<Vec<Event>, QueueError> {
        self.shared.view.events_since(offset, limit).await
    }

    async fn census(&self) -> Result<Vec<CensusRow>, QueueError> {
        self.shared.view.census().await
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.view.subscribe()
    }

    fn observe(&self, observer: Arc<dyn CommitObserver>) {
        self.shared.view.observe(observer);
    }

    fn depth(&self) -> [u64; 10] {
        self.shared.depth()
    }
}
