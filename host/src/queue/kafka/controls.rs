//! The user's controls on a Kafka grid ([`Control`](crate::queue::Control))
//! and the compacted `<prefix>control` topic that carries them.
//!
//! A control is written to the control topic, keyed by what it controls,
//! so compaction keeps the latest of each: `job/<id>` for a job's flags
//! (paused, cancelled), `job/<id>/priority` for its priority (which carries
//! the flags as they were too), `task/<id>` for a task's cancel or priority.
//! The topic has one partition, so a host reading it from the start applies
//! what compaction kept in the order it was written, and ends in the state
//! the last controls left. Every host, whatever its role, reads the
//! whole topic from the start before it reads a task (a worker host then
//! knows which jobs are paused or cancelled without reading the event
//! topic), and then follows it: whichever host holds the job's or the
//! task's work acts on it. Hosts with a view record the change there too.

use super::reads::TopicKind;
use super::topics;
use super::wire::{self, EventMessage};
use super::{KafkaQueue, Member};
use crate::model::{JobId, TaskId};
use crate::queue::embedded::ViewChange;
use crate::queue::{Control, JobRecord, QueueError, ReadStore, WorkQueue};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// How long a starting host waits to have read the control topic to its end
/// before it reads tasks anyway (logging that it did).
const CATCH_UP_LIMIT: Duration = Duration::from_secs(30);

impl KafkaQueue {
    /// Publish one control for every host of the grid and apply it here.
    pub(super) async fn publish_control(&self, control: Control) -> Result<(), QueueError> {
        match control {
            Control::PauseJob { job } => self.set_job_flags(&job, Some(true), false, None).await,
            Control::ResumeJob { job } => self.set_job_flags(&job, Some(false), false, None).await,
            Control::CancelJob { job } => self.set_job_flags(&job, Some(false), true, None).await,
            Control::JobPriority { job, priority } => {
                self.set_job_flags(&job, None, false, Some(priority)).await
            }
            Control::CancelTask { task } => self.task_control(&task, true, None).await,
            Control::DeleteJob { job } => Err(QueueError::Conflict(format!(
                "job {job} cannot be deleted on a Kafka grid: its topics keep what they keep for their retention time"
            ))),
            Control::TaskPriority { task, priority } => {
                self.task_control(&task, false, Some(priority)).await
            }
        }
    }

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
                v: wire::EVENT_VERSION,
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
    ) -> Result<(), QueueError> {
        let record = self.shared.view.job(job).await?;
        if record.cancelled {
            return Err(QueueError::Conflict(format!("job {job} is cancelled")));
        }
        self.shared
            .control(EventMessage::JobControl {
                v: wire::EVENT_VERSION,
                job: job.clone(),
                paused: paused.unwrap_or(record.paused),
                cancelled,
                priority,
                reason: None,
            })
            .await?;
        self.shared.view.flush().await
    }
}

impl Member {
    /// Publish a control on the control topic and apply it here at once.
    pub(super) async fn control(self: &Arc<Self>, event: EventMessage) -> Result<(), QueueError> {
        let key = match &event {
            EventMessage::JobControl {
                job,
                priority: Some(_),
                ..
            } => format!("job/{job}/priority"),
            EventMessage::JobControl { job, .. } => format!("job/{job}"),
            other => format!("task/{}", other.key()),
        };
        let record = super::publish::Outgoing {
            topic: self.topics.control(),
            partition: None,
            key,
            value: event.encode(),
        };
        self.publisher.send_all(&[record]).await?;
        apply_control(self, &event);
        Ok(())
    }

    /// Fold the controls this host has read into a job's announcement: the
    /// control topic and the event topic are read apart, so a pause may be
    /// read before the job it pauses.
    pub(super) fn with_controls(&self, mut job: JobRecord) -> JobRecord {
        let state = self.state();
        if state.cancelled_jobs.contains(job.id.as_str()) {
            job.cancelled = true;
            if job.cancel_reason.is_none() {
                job.cancel_reason = state.cancel_reasons.get(job.id.as_str()).cloned();
            }
        }
        if state.scheduler.ready.is_paused(&job.id) {
            job.paused = true;
        }
        if let Some(priority) = state.job_priorities.get(job.id.as_str()) {
            job.options.priority = *priority;
        }
        job
    }
}

/// Act on a job or task control (here or read from another host).
pub(super) fn apply_control(shared: &Arc<Member>, event: &EventMessage) {
    shared
        .controls_applied
        .fetch_add(1, std::sync::atomic::Ordering::Release);
    match event {
        EventMessage::JobControl {
            job,
            paused,
            cancelled,
            priority,
            reason,
            ..
        } => {
            if shared.config.role.keeps_view() {
                let mut changes = vec![ViewChange::JobFlags {
                    job: job.clone(),
                    paused: *paused,
                    cancelled: *cancelled,
                    reason: reason.clone(),
                }];
                changes.extend(priority.map(|p| ViewChange::JobPriority(job.clone(), p)));
                shared.view.apply_view(changes);
            }
            if let Some(reason) = reason.as_ref().filter(|_| *cancelled) {
                shared
                    .state()
                    .cancel_reasons
                    .insert(Arc::from(job.as_str()), reason.clone());
            }
            shared.job_flags(job, *paused, *cancelled);
            if let Some(priority) = priority {
                shared.job_priority(job, *priority);
            }
        }
        EventMessage::TaskControl {
            task,
            cancel,
            priority,
            ..
        } => {
            if let Some(priority) = priority.filter(|_| shared.config.role.keeps_view()) {
                shared
                    .view
                    .apply_view(vec![ViewChange::Priority(task.clone(), priority)]);
            }
            shared.task_control(task, *cancel, *priority);
        }
        EventMessage::Ended { id, completed, .. } => {
            shared.state().ended.insert(id.clone(), *completed);
        }
        EventMessage::Task(_)
        | EventMessage::Tasks { .. }
        | EventMessage::Job { .. }
        | EventMessage::Expanded { .. } => {}
    }
}

/// Start the thread that reads the control topic: from its beginning (it
/// is compacted: the latest control of each job and task), telling each
/// of `caught_up` once it has read to the end it found at start, then
/// following it.
pub(super) fn start(
    shared: Arc<Member>,
    caught_up: Vec<Sender<()>>,
) -> Result<std::thread::JoinHandle<()>, QueueError> {
    let topic = shared.topics.control();
    let consumer = topics::reader(&shared.config, "control")?;
    let partitions = topics::partitions_of(&consumer, &topic)?;
    let mut list = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in 0..partitions {
        list.add_partition_offset(&topic, partition, Offset::Beginning)
            .map_err(|e| QueueError::storage("choosing where to read controls from", e))?;
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(30))
            .map_err(|e| QueueError::storage(format!("the end of {topic}"), e))?;
        if high > low {
            ends.push((partition, high));
        }
    }
    consumer
        .assign(&list)
        .map_err(|e| QueueError::storage("reading the control topic", e))?;
    std::thread::Builder::new()
        .name("kwq-kafka-control".into())
        .spawn(move || run(consumer, shared, ends, caught_up))
        .map_err(|e| QueueError::storage("starting the control thread", e))
}

fn run(
    consumer: BaseConsumer,
    shared: Arc<Member>,
    mut ends: Vec<(i32, i64)>,
    caught_up: Vec<Sender<()>>,
) {
    let started = Instant::now();
    let mut waiting = Some(caught_up);
    while !shared.closed() {
        if waiting.is_some() && !ends.is_empty() {
            // Where the consumer will fetch next: compaction leaves gaps,
            // so the last offset before the end may never be read itself.
            if let Ok(positions) = consumer.position() {
                ends.retain(|(partition, end)| {
                    topics::offset_in(&positions, *partition).is_none_or(|at| at < *end)
                });
            }
        }
        if waiting.is_some() && (ends.is_empty() || started.elapsed() > CATCH_UP_LIMIT) {
            if !ends.is_empty() {
                tracing::warn!(
                    "the control topic was not read to its end within {CATCH_UP_LIMIT:?}; reading tasks anyway"
                );
            }
            for waiter in waiting.take().unwrap_or_default() {
                let _ = waiter.send(());
            }
        }
        let Some(result) = consumer.poll(Duration::from_millis(50)) else {
            continue;
        };
        let message = match result {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(error = %e, "reading the control topic");
                continue;
            }
        };
        let value = message.payload().unwrap_or_default();
        shared.reads.add(
            TopicKind::Control,
            message.key().map_or(0, <[u8]>::len),
            value.len(),
        );
        match EventMessage::decode(value) {
            Ok(control) => apply_control(&shared, &control),
            Err(e) => tracing::warn!(
                offset = message.offset(),
                error = %e,
                "skipping an unreadable control"
            ),
        }
    }
}
