//! The Kafka backend: several hosts share one grid through topics.
//!
//! - Tasks live on one topic per priority band (`<prefix>tasks.p0..p9`). All
//!   hosts read them in one consumer group into a local ready index (the
//!   embedded backend's), so each host picks by priority, aging and affinity
//!   among what it holds; each band is read ahead at most `band_buffer`
//!   tasks (its partitions are paused beyond that), so a flood of low
//!   priority work never keeps a high band from being read.
//! - Offsets are committed only up to the lowest unfinished task of each
//!   partition ([`offsets`]): a host killed mid-task loses nothing, and the
//!   next owner of the partition replays at most its unfinished tasks.
//! - Every transition is an event on `<prefix>events`; every host reads that
//!   topic into an embedded store, its view, which serves the HTTP API.
//!   A view applies an event only if it moves the task forward, so
//!   replays and duplicates collapse into one result per task.
//! - Modules are chunked onto the compacted `<prefix>modules` topic and
//!   reassembled (and checked against their SHA-256) by every host.
//! - Retries are re-published to their band with the attempt count and a
//!   not-before time; exhausted tasks go to `<prefix>dead`.

mod arrivals;
mod consumer;
pub(crate) mod offsets;
mod publish;
mod topics;
mod view;
pub mod wire;

pub use topics::Topics;

use super::embedded::ready::{Entry, Pick, Policy, ReadyIndex};
use super::embedded::{Carried, EmbeddedQueue, RemoteTask};
use super::{
    CensusRow, CommitObserver, Completion, Failure, Lease, ModuleRecord, Page, Queue, QueueError,
    TaskFilter, TaskResult, WorkerView,
};
use crate::model::{
    ErrorKind, Event, JobId, JobRecord, ModuleId, NewJob, NewTask, TaskId, TaskOptions, TaskRecord,
    TaskState, now_ms, now_us,
};
use async_trait::async_trait;
use offsets::{Partition, Progress};
use publish::{Outgoing, Publisher};
use rdkafka::ClientConfig;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, broadcast};
use wire::{EventMessage, TaskEvent, TaskMessage};

/// Largest result a Completed event may carry (base64 makes it a third
/// bigger; Kafka's default message limit is 1 MB). Bigger results fail the
/// task with `output_too_large`.
pub const MAX_RESULT_BYTES: usize = 640 * 1024;

/// How a host joins a Kafka grid: `kafka://host:port[,host:port...][?prefix=kwq.&partitions=8&replication=3]`.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// Topic prefix, so several grids can share a cluster.
    pub prefix: String,
    /// Partitions of each priority topic (at least the number of hosts, or
    /// some hosts get none of a band's work).
    pub task_partitions: i32,
    /// Partitions of the event topic.
    pub event_partitions: i32,
    /// Replication factor of created topics.
    pub replication: i32,
    /// This host's view of the grid (an embedded store file).
    pub view_path: PathBuf,
    /// This host's name in worker ids and the consumer group.
    pub host: String,
    /// Tasks read ahead per priority band before its partitions are paused.
    pub band_buffer: usize,
    /// Largest sweep a job may have (the submitting host writes every point).
    pub max_sweep: u64,
    /// Extra librdkafka settings (`?kafka.<name>=<value>` in the URL).
    pub extra: Vec<(String, String)>,
    /// Create absent topics at start (`?create_topics=false` where an
    /// operator manages topics, or a broker lacks the admin API).
    pub create_topics: bool,
}

impl KafkaConfig {
    /// Parse a `kafka://` URL; the view path and host come from the caller.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| format!("{url:?} is not a kafka:// URL"))?;
        let (brokers, query) = rest.split_once('?').unwrap_or((rest, ""));
        if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
            return Err(format!(
                "store URL {url:?} needs brokers as host:port[,host:port...]"
            ));
        }
        let mut config = KafkaConfig {
            brokers: brokers.to_string(),
            ..KafkaConfig::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("store URL option {pair:?} needs a value"))?;
            let number = |v: &str| {
                v.parse::<i32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("store URL option {name} must be a positive number"))
            };
            match name {
                "prefix" => config.prefix = value.to_string(),
                "partitions" => config.task_partitions = number(value)?,
                "event_partitions" => config.event_partitions = number(value)?,
                "replication" => config.replication = number(value)?,
                "band_buffer" => config.band_buffer = number(value)? as usize,
                "create_topics" => {
                    config.create_topics = value.parse().map_err(|_| {
                        "store URL option create_topics must be true or false".to_string()
                    })?
                }
                _ => match name.strip_prefix("kafka.") {
                    Some(setting) => config.extra.push((setting.into(), value.into())),
                    None => return Err(format!("unknown store URL option {name:?}")),
                },
            }
        }
        Ok(config)
    }

    /// librdkafka settings every client of this grid shares.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("kwq-{}", self.host))
            .set("broker.address.family", "v4");
        for (name, value) in &self.extra {
            config.set(name, value);
        }
        config
    }

    /// The consumer group every host of the grid joins.
    pub fn group(&self) -> String {
        format!("{}workers", self.prefix)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            prefix: "kwq.".into(),
            task_partitions: 4,
            event_partitions: 4,
            replication: 1,
            view_path: PathBuf::from("kwq-view.db"),
            host: "host".into(),
            band_buffer: 1000,
            max_sweep: 1_000_000,
            extra: Vec::new(),
            create_topics: true,
        }
    }
}

/// Where a task was read from; finishing it lets that offset be committed.
#[derive(Debug, Clone)]
struct Origin {
    partition: Partition,
    offset: i64,
}

/// A task leased to one of this host's workers.
struct Leased {
    entry: Entry,
    token: u64,
    state: TaskState,
    cancelled: Arc<Notify>,
    origins: Vec<Origin>,
}

/// What this host holds: tasks read but not leased, tasks leased, offsets.
#[derive(Default)]
struct Sched {
    ready: ReadyIndex,
    origins: HashMap<Arc<str>, Vec<Origin>>,
    leased: HashMap<Arc<str>, Leased>,
    workers: HashMap<String, Vec<(ModuleId, String)>>,
    cancelled_jobs: HashSet<Arc<str>>,
    /// Each known job's priority, which its tasks take when read (a
    /// priority change may arrive before some of its tasks are read).
    job_priorities: HashMap<Arc<str>, u8>,
    cancelled_tasks: HashSet<String>,
    progress: Progress,
    next_token: u64,
}

/// State shared by the queue handle and its consumer threads.
struct Shared {
    config: KafkaConfig,
    topics: Topics,
    view: EmbeddedQueue,
    /// Wakes fetches of modules uploaded on another host.
    arrivals: Arc<arrivals::ModuleArrivals>,
    publisher: Publisher,
    sched: Mutex<Sched>,
    wake: Notify,
    closed: AtomicBool,
    policy: Policy,
}

/// A host's handle on a Kafka grid. Cheap to clone.
#[derive(Clone)]
pub struct KafkaQueue {
    shared: Arc<Shared>,
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
        let mut sched = Sched::default();
        for job in view.jobs(usize::MAX >> 1).await? {
            let id: Arc<str> = Arc::from(job.id.as_str());
            if job.paused {
                sched.ready.pause(id.clone());
            }
            if job.cancelled {
                sched.cancelled_jobs.insert(id);
            } else {
                sched.job_priorities.insert(id, job.options.priority);
            }
        }
        let arrivals = Arc::new(arrivals::ModuleArrivals::default());
        view.observe(arrivals.clone());
        Ok(KafkaQueue {
            shared: Arc::new(Shared {
                config,
                topics,
                view,
                arrivals,
                publisher,
                sched: Mutex::new(sched),
                wake: Notify::new(),
                closed: AtomicBool::new(false),
                policy: Policy {
                    aging_ms: aging.as_millis() as u64,
                    affinity_window_ms: affinity_window.as_millis() as u64,
                },
            }),
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
        self.shared.sched().progress.in_flight()
    }
}

impl Shared {
    fn sched(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Publish task events (and any other records), apply the events to this
    /// host's view at once, and when all are delivered let the offsets the
    /// task was read from be committed.
    fn publish(self: &Arc<Self>, events: Vec<TaskEvent>, extra: Vec<Outgoing>, done: Vec<Origin>) {
        let mut records = extra;
        let mut local = Vec::with_capacity(events.len());
        for event in events {
            local.push(view::change_of(&event));
            records.push(self.event_record(EventMessage::Task(event)));
        }
        self.view.apply_view(local);
        let shared = self.clone();
        self.publisher.send_then(records, move |delivered| {
            if delivered {
                let mut sched = shared.sched();
                for origin in &done {
                    sched.progress.finished(&origin.partition, origin.offset);
                }
            }
        });
    }

    fn event_record(&self, event: EventMessage) -> Outgoing {
        Outgoing {
            topic: self.topics.events(),
            key: event.key().to_string(),
            value: event.encode(),
        }
    }

    fn task_record(&self, message: &TaskMessage, topic: String) -> Outgoing {
        Outgoing {
            topic,
            key: message.key().unwrap_or_default().to_string(),
            value: serde_json::to_vec(message).unwrap_or_default(),
        }
    }

    /// Take a task read from a band topic into the ready index.
    fn accept(self: &Arc<Self>, topic: &str, partition: i32, offset: i64, value: &[u8]) -> u8 {
        let band = self.topics.priority_of(topic).unwrap_or(5);
        let origin = Origin {
            partition: (topic.to_string(), partition),
            offset,
        };
        self.sched().progress.read(&origin.partition, offset);
        let message = match TaskMessage::decode(value) {
            Ok(message) => message,
            Err(e) => {
                // Unreadable: park the raw bytes on the dead-letter topic.
                tracing::warn!(topic, partition, offset, error = %e, "unreadable task message sent to the dead-letter topic");
                let record = Outgoing {
                    topic: self.topics.dead(),
                    key: format!("{topic}/{partition}/{offset}"),
                    value: value.to_vec(),
                };
                self.publish(Vec::new(), vec![record], vec![origin]);
                return band;
            }
        };
        let id = message
            .id
            .clone()
            .unwrap_or_else(|| format!("k-{topic}-{partition}-{offset}"));
        let module = ModuleId::parse(&message.module)
            .or_else(|| self.view.module_named_now(&message.module))
            .unwrap_or_else(|| ModuleId::of(message.module.as_bytes()));
        let options = message.options(band);
        let payload = message.payload_bytes().unwrap_or_default();
        let now = now_ms();
        let mut sched = self.sched();
        let job_cancelled = message
            .job_id
            .as_deref()
            .is_some_and(|j| sched.cancelled_jobs.contains(j));
        if job_cancelled || sched.cancelled_tasks.contains(&id) {
            drop(sched);
            let event = TaskEvent::new(
                &id,
                message.job_id.as_deref(),
                TaskState::Cancelled,
                message.attempts,
            );
            self.publish(vec![event], Vec::new(), vec![origin]);
            return band;
        }
        // Replayed after another host finished it (it died or lost the
        // partition before committing): nothing to run.
        if self.view.is_finished(&id) {
            drop(sched);
            self.sched().progress.finished(&origin.partition, offset);
            return band;
        }
        // The same task read again (a replay after a rebalance) while this host
        // still holds it: one run, both offsets finish with it.
        if let Some(leased) = sched.leased.get_mut(id.as_str()) {
            leased.origins.push(origin);
            return band;
        }
        if let Some(origins) = sched.origins.get_mut(id.as_str()) {
            origins.push(origin);
            return band;
        }
        let entry = Entry {
            id: Arc::from(id.as_str()),
            job: message.job_id.as_deref().map(Arc::from),
            module,
            payload: Some(Arc::from(payload)),
            affinity: options.affinity.as_deref().map(Arc::from),
            priority: message
                .job_id
                .as_deref()
                .and_then(|j| sched.job_priorities.get(j).copied())
                .unwrap_or(options.priority),
            tags: Arc::new(options.tags.clone()),
            timeout_ms: options.timeout_ms,
            memory_bytes: options.memory_bytes,
            max_attempts: options.max_attempts,
            attempts: message.attempts,
            queued_at: message.submitted_at.unwrap_or(now).min(now),
            ready_us: message.submitted_at.unwrap_or(now).min(now) * 1000,
            not_before: options.not_before,
            state: if message.attempts > 0 {
                TaskState::Error
            } else {
                TaskState::Pending
            },
        };
        sched.origins.insert(entry.id.clone(), vec![origin]);
        sched.ready.insert(entry, now);
        drop(sched);
        self.wake.notify_waiters();
        band
    }

    /// Tasks waiting per band on this host.
    fn depth(&self) -> [u64; 10] {
        self.sched().ready.depth()
    }

    /// Partitions were taken away: drop what was read from them and not
    /// leased (the new owner reads it again from the committed offset).
    fn revoke(&self, partitions: &[Partition]) {
        let mut sched = self.sched();
        let revoked: HashSet<&Partition> = partitions.iter().collect();
        let dropped: Vec<Arc<str>> = sched
            .origins
            .iter()
            .filter(|(_, origins)| origins.iter().all(|o| revoked.contains(&o.partition)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in dropped {
            sched.origins.remove(&id);
            sched.ready.remove(&id);
        }
        for partition in partitions {
            sched.progress.revoke(partition);
        }
    }

    /// A job was paused, resumed or cancelled (here or on another host).
    fn job_flags(self: &Arc<Self>, job: &str, paused: bool, cancelled: bool) {
        let id: Arc<str> = Arc::from(job);
        let mut sched = self.sched();
        if cancelled {
            sched.cancelled_jobs.insert(id.clone());
            for leased in sched
                .leased
                .values()
                .filter(|l| l.entry.job.as_deref() == Some(job))
            {
                leased.cancelled.notify_one();
            }
            let removed = sched.ready.remove_job(job);
            let mut events = Vec::new();
            let mut done = Vec::new();
            for entry in removed {
                done.extend(sched.origins.remove(&entry.id).unwrap_or_default());
                events.push(TaskEvent::new(
                    &entry.id,
                    Some(job),
                    TaskState::Cancelled,
                    entry.attempts,
                ));
            }
            drop(sched);
            if !events.is_empty() {
                self.publish(events, Vec::new(), done);
            }
        } else if paused {
            sched.ready.pause(id);
        } else {
            sched.ready.resume(job, now_ms());
            drop(sched);
            self.wake.notify_waiters();
        }
    }

    /// A job's priority changed: re-rank the tasks of it this host holds.
    fn job_priority(self: &Arc<Self>, job: &str, priority: u8) {
        let mut sched = self.sched();
        sched.job_priorities.insert(Arc::from(job), priority);
        sched.ready.set_job_priority(job, priority, now_ms());
        drop(sched);
        self.wake.notify_waiters();
    }

    /// A user cancelled a task or changed its priority: act if this host holds it.
    fn task_control(self: &Arc<Self>, task: &str, cancel: bool, priority: Option<u8>) {
        let mut sched = self.sched();
        if cancel {
            sched.cancelled_tasks.insert(task.to_string());
            if let Some(leased) = sched.leased.get(task) {
                leased.cancelled.notify_one();
            } else if let Some(entry) = sched.ready.remove(task) {
                let done = sched.origins.remove(task).unwrap_or_default();
                drop(sched);
                let event = TaskEvent::new(
                    task,
                    entry.job.as_deref(),
                    TaskState::Cancelled,
                    entry.attempts,
                );
                self.publish(vec![event], Vec::new(), done);
            }
        } else if let Some(priority) = priority {
            sched.ready.set_priority(task, priority, now_ms());
            drop(sched);
            self.wake.notify_waiters();
        }
    }

    fn take_lease(&self, id: &str, token: u64) -> Result<Leased, QueueError> {
        let mut sched = self.sched();
        match sched.leased.get(id) {
            Some(l) if l.token == token => Ok(sched.leased.remove(id).expect("present")),
            _ => Err(QueueError::StaleLease(id.to_string())),
        }
    }

    /// Publish a control event and apply it here at once.
    async fn control(self: &Arc<Self>, event: EventMessage) -> Result<(), QueueError> {
        let record = self.event_record(event.clone());
        self.publisher.send_all(&[record]).await?;
        view::apply_control(self, &event);
        Ok(())
    }
}

/// The event that announces a task's definition (on Pending and Allocated).
fn with_spec(mut event: TaskEvent, module: &ModuleId, options: &TaskOptions) -> TaskEvent {
    event.module = Some(module.to_string());
    event.options = Some(options.clone());
    event
}

fn options_of(entry: &Entry) -> TaskOptions {
    TaskOptions {
        priority: entry.priority,
        tags: (*entry.tags).clone(),
        affinity: entry.affinity.as_deref().map(str::to_string),
        timeout_ms: entry.timeout_ms,
        memory_bytes: entry.memory_bytes,
        max_attempts: entry.max_attempts,
        not_before: entry.not_before,
    }
}

#[async_trait]
impl Queue for KafkaQueue {
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
                key: chunk.key(),
                value: serde_json::to_vec(chunk).unwrap_or_default(),
            })
            .collect();
        self.shared.publisher.send_all(&records).await?;
        self.shared.view.put_module(record, bytes).await
    }

    async fn module(&self, id: &ModuleId) -> Result<ModuleRecord, QueueError> {
        self.shared.view.module(id).await
    }

    async fn modules(&self) -> Result<Vec<ModuleRecord>, QueueError> {
        self.shared.view.modules().await
    }

    fn health(&self) -> Result<(), String> {
        self.shared.view.health()
    }

    async fn module_named(&self, name: &str) -> Result<Option<ModuleId>, QueueError> {
        Queue::module_named(&self.shared.view, name).await
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
        let mut records = Vec::with_capacity(tasks.len() * 2);
        let mut local = Vec::with_capacity(tasks.len());
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
            let event = with_spec(
                TaskEvent::new(&task.id, task.job_id.as_deref(), TaskState::Pending, 0),
                &task.module,
                &task.options,
            );
            local.push(view::change_of(&event));
            records.push(self.shared.event_record(EventMessage::Task(event)));
        }
        self.shared.publisher.send_all(&records).await?;
        self.shared.view.apply_view(local);
        self.shared.view.flush().await
    }

    async fn submit_job(&self, job: NewJob) -> Result<JobRecord, QueueError> {
        let now = now_ms();
        let payloads: Vec<Vec<u8>> = match &job.sweep {
            Some(sweep) => {
                let total = sweep
                    .validate()
                    .map_err(|e| QueueError::Conflict(e.to_string()))?;
                if total > self.shared.config.max_sweep {
                    return Err(QueueError::Conflict(format!(
                        "a sweep of {total} points is more than the Kafka backend writes per job ({}); split it into several jobs",
                        self.shared.config.max_sweep
                    )));
                }
                (0..total)
                    .map(|i| serde_json::to_vec(&sweep.point(i)).unwrap_or_default())
                    .collect()
            }
            None => job.payloads,
        };
        let total = payloads.len() as u64;
        let record = JobRecord {
            id: job.id.clone(),
            name: job.name.clone(),
            module: job.module.clone(),
            options: job.options.clone(),
            total,
            expanded: total,
            paused: false,
            cancelled: false,
            created_at: now,
            sweep: job.sweep.clone(),
        };
        let band = self.shared.topics.band(job.options.priority);
        let mut records = Vec::with_capacity(payloads.len() + 1);
        // The announcement first: a view creates the job's Pending rows from it.
        records.push(self.shared.event_record(EventMessage::Job {
            v: wire::WIRE_VERSION,
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
        self.shared
            .view
            .apply_view(vec![super::embedded::ViewChange::Job(record.clone())]);
        self.shared.view.flush().await?;
        Ok(record)
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
                let mut sched = shared.sched();
                sched.workers.insert(worker.id.clone(), worker.warm.clone());
                sched.ready.promote_due(now);
                let Sched { ready, workers, .. } = &mut *sched;
                let check = |module: &ModuleId, key: &str| {
                    workers
                        .iter()
                        .filter(|(id, _)| **id != worker.id)
                        .any(|(_, warm)| warm.iter().any(|(m, k)| m == module && k == key))
                };
                match ready.pick(&worker.warm, &check, now, shared.policy) {
                    Pick::Task(entry, warm_hit) => {
                        sched.next_token += 1;
                        let token = sched.next_token;
                        let attempt = entry.attempts + 1;
                        let cancelled = Arc::new(Notify::new());
                        let origins = sched.origins.remove(&entry.id).unwrap_or_default();
                        let lease = entry.lease(&worker.id, token, warm_hit, cancelled.clone());
                        let mut event = with_spec(
                            TaskEvent::new(
                                &entry.id,
                                entry.job.as_deref(),
                                TaskState::Allocated,
                                attempt,
                            ),
                            &entry.module,
                            &options_of(&entry),
                        );
                        event.worker = Some(worker.id.clone());
                        event.wait_us = Some(now_us().saturating_sub(entry.ready_us));
                        sched.leased.insert(
                            entry.id.clone(),
                            Leased {
                                entry: Entry {
                                    attempts: attempt,
                                    ..entry
                                },
                                token,
                                state: TaskState::Allocated,
                                cancelled,
                                origins: origins.clone(),
                            },
                        );
                        drop(sched);
                        shared.publish(vec![event], Vec::new(), Vec::new());
                        return Some(lease);
                    }
                    Pick::Wait(at) => at,
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
        let mut sched = self.shared.sched();
        let Some(leased) = sched
            .leased
            .get_mut(lease.task_id.as_str())
            .filter(|l| l.token == lease.token)
        else {
            return;
        };
        leased.state = TaskState::Running;
        drop(sched);
        let mut event = TaskEvent::new(
            &lease.task_id,
            lease.job_id.as_deref(),
            TaskState::Running,
            lease.attempt,
        );
        event.worker = Some(lease.worker.clone());
        self.shared.publish(vec![event], Vec::new(), Vec::new());
    }

    fn heartbeat(&self, lease: &Lease) -> Result<(), QueueError> {
        // A lease lasts while this host owns the task's partition; the
        // consumer group notices a dead host, not a missed heartbeat.
        let sched = self.shared.sched();
        match sched.leased.get(lease.task_id.as_str()) {
            Some(l) if l.token == lease.token => Ok(()),
            _ => Err(QueueError::StaleLease(lease.task_id.clone())),
        }
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
        let leased = self.shared.take_lease(&lease.task_id, lease.token)?;
        let mut event = TaskEvent::new(
            &lease.task_id,
            lease.job_id.as_deref(),
            TaskState::Completed,
            lease.attempt,
        )
        .with_result(&completion.result);
        event.worker = Some(lease.worker.clone());
        event.logs = Some(completion.logs);
        event.progress = Some(completion.progress);
        event.run_us = Some(completion.run_us);
        self.shared.publish(vec![event], Vec::new(), leased.origins);
        Ok(())
    }

    fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), QueueError> {
        let leased = self.shared.take_lease(&lease.task_id, lease.token)?;
        let to = if failure.retry_at.is_some() {
            TaskState::Error
        } else {
            TaskState::Dead
        };
        let mut event = TaskEvent::new(&lease.task_id, lease.job_id.as_deref(), to, lease.attempt);
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
            &options_of(entry),
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
        self.shared
            .publish(vec![event], vec![record], leased.origins);
        Ok(())
    }

    fn release(&self, lease: &Lease, cancelled: bool) {
        let Ok(leased) = self.shared.take_lease(&lease.task_id, lease.token) else {
            return;
        };
        if cancelled {
            let mut event = TaskEvent::new(
                &lease.task_id,
                lease.job_id.as_deref(),
                TaskState::Cancelled,
                lease.attempt,
            );
            event.message = Some("cancelled while running".into());
            self.shared.publish(vec![event], Vec::new(), leased.origins);
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
            let mut sched = self.shared.sched();
            let entry = Entry {
                attempts,
                state: TaskState::Pending,
                ..leased.entry
            };
            sched.origins.insert(entry.id.clone(), leased.origins);
            sched.ready.insert(entry, now);
        }
        self.shared.publish(vec![event], Vec::new(), Vec::new());
        self.shared.wake.notify_waiters();
    }

    async fn pause_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.set_job_flags(job, Some(true), false, None).await
    }

    async fn resume_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.set_job_flags(job, Some(false), false, None).await
    }

    async fn cancel_job(&self, job: &JobId) -> Result<JobRecord, QueueError> {
        self.set_job_flags(job, Some(false), true, None).await
    }

    async fn cancel_task(&self, task: &TaskId) -> Result<(), QueueError> {
        self.task_control(task, true, None).await
    }

    async fn set_priority(&self, task: &TaskId, priority: u8) -> Result<(), QueueError> {
        self.task_control(task, false, Some(priority)).await
    }

    async fn set_job_priority(&self, job: &JobId, priority: u8) -> Result<JobRecord, QueueError> {
        self.set_job_flags(job, None, false, Some(priority)).await
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
            .map_err(|e| QueueError::Storage(e.to_string()))?;
        }
        self.shared.view.flush().await
    }

    fn start(&self) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        match view::start(self.shared.clone()) {
            Ok(thread) => threads.push(thread),
            Err(e) => tracing::error!(error = %e, "cannot start reading the event topic"),
        }
        match consumer::start(self.shared.clone()) {
            Ok(thread) => threads.push(thread),
            Err(e) => tracing::error!(error = %e, "cannot start reading the task topics"),
        }
    }
}

impl KafkaQueue {
    /// Cancel an unfinished task or change its priority, on whichever host holds it.
    async fn task_control(
        &self,
        task: &TaskId,
        cancel: bool,
        priority: Option<u8>,
    ) -> Result<(), QueueError> {
        let record = self.task(task).await?;
        if record.state.is_terminal() {
            return Err(QueueError::Conflict(format!(
                "task {task} is already {}",
                record.state
            )));
        }
        self.shared
            .control(EventMessage::TaskControl {
                v: wire::WIRE_VERSION,
                task: task.clone(),
                cancel,
                priority,
            })
            .await
    }

    async fn set_job_flags(
        &self,
        job: &JobId,
        paused: Option<bool>,
        cancelled: bool,
        priority: Option<u8>,
    ) -> Result<JobRecord, QueueError> {
        let record = self.shared.view.job(job).await?;
        if record.cancelled {
            return Err(QueueError::Conflict(format!("job {job} is cancelled")));
        }
        self.shared
            .control(EventMessage::JobControl {
                v: wire::WIRE_VERSION,
                job: job.clone(),
                paused: paused.unwrap_or(record.paused),
                cancelled,
                priority,
            })
            .await?;
        self.shared.view.flush().await?;
        self.shared.view.job(job).await
    }
}

/// What a view stores for a task event (used by [`view`]).
fn remote_task(event: &TaskEvent) -> RemoteTask {
    RemoteTask {
        task_id: event.task_id.clone(),
        job_id: event.job_id.clone(),
        state: event.state,
        attempt: event.attempt,
        at: event.at,
        carried: Carried {
            worker: event.worker.clone(),
            error: event
                .error_kind
                .map(|k| (k, event.message.clone().unwrap_or_default())),
            message: event.message.clone(),
            result: event.result(),
            logs: event.logs.clone(),
            progress: event.progress,
            not_before: event.not_before,
            run_us: event.run_us(),
            wait_us: event.wait_us(),
        },
        spec: match (&event.module, &event.options) {
            (Some(module), Some(options)) => ModuleId::parse(module).map(|m| (m, options.clone())),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kafka_urls() {
        let c = KafkaConfig::parse(
            "kafka://a:9092,b:9093?prefix=risk.&partitions=12&kafka.security.protocol=plaintext",
        )
        .unwrap();
        assert_eq!(c.brokers, "a:9092,b:9093");
        assert_eq!(c.prefix, "risk.");
        assert_eq!(c.task_partitions, 12);
        assert_eq!(
            c.extra,
            vec![("security.protocol".to_string(), "plaintext".to_string())]
        );
        assert!(KafkaConfig::parse("kafka://").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?partitions=0").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?colour=red").is_err());
        assert_eq!(Topics::new("kwq.").priority_of("kwq.tasks.p7"), Some(7));
        assert_eq!(Topics::new("kwq.").priority_of("kwq.events"), None);
    }
}
