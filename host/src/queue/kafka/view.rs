//! Reading the event and modules topics into this host's view: a thread
//! that assigns itself every partition of both (no consumer group: every
//! host reads everything), resumes where the view stopped (positions are
//! stored in the view with what was read), and applies what it reads in
//! batches. A worker-only host reads the modules topic alone (its view
//! holds modules and read positions, no tasks). Controls read from the
//! event topic (where hosts before the control topic wrote them) still act.

use super::Member;
use super::controls::apply_control;
use super::reads::TopicKind;
use super::topics;
use super::wire::{EventMessage, ModuleChunk, TaskEvent};
use crate::model::{ModuleId, TaskState};
use crate::queue::embedded::{Carried, RemoteTask, ViewChange};
use crate::queue::{ModuleRecord, QueueError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Messages applied per batch at most.
const BATCH: usize = 5_000;

/// What the view stores for a task event: one change, which for an event
/// that carries its Allocated (`allocated_at`, wire v2: on Running, or on
/// the outcome of a task that ended without starting) logs both events
/// with one update of the task's row.
pub(super) fn changes_of(event: &TaskEvent, into: &mut Vec<ViewChange>) {
    into.push(ViewChange::Task(Box::new(remote_task(event))));
}

/// Start the view thread.
pub(super) fn start(shared: Arc<Member>) -> Result<std::thread::JoinHandle<()>, QueueError> {
    let consumer = topics::reader(&shared.config, "view")?;
    let stored = shared.view.view_offsets()?;
    let mut list = TopicPartitionList::new();
    let mut read = vec![shared.topics.modules()];
    if shared.config.role.keeps_view() {
        read.push(shared.topics.events());
    }
    for topic in read {
        for partition in 0..topics::partitions_of(&consumer, &topic)? {
            let offset = stored
                .get(&(topic.clone(), partition))
                .map_or(Offset::Beginning, |next| Offset::Offset(*next));
            list.add_partition_offset(&topic, partition, offset)
                .map_err(|e| QueueError::storage("choosing where to read from", e))?;
        }
    }
    consumer
        .assign(&list)
        .map_err(|e| QueueError::storage("reading the event topic", e))?;
    std::thread::Builder::new()
        .name("kwq-kafka-view".into())
        .spawn(move || run(consumer, shared))
        .map_err(|e| QueueError::storage("starting the view thread", e))
}

fn run(consumer: BaseConsumer, shared: Arc<Member>) {
    let mut modules = Assembler::default();
    let modules_topic = shared.topics.modules();
    while !shared.closed() {
        let mut changes = Vec::new();
        let mut positions: HashMap<(String, i32), i64> = HashMap::new();
        let mut wait = Duration::from_millis(50);
        while changes.len() < BATCH {
            let Some(result) = consumer.poll(wait) else {
                break;
            };
            wait = Duration::ZERO;
            let message = match result {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the event topic");
                    break;
                }
            };
            let value = message.payload().unwrap_or_default();
            positions.insert(
                (message.topic().to_string(), message.partition()),
                message.offset() + 1,
            );
            let kind = if message.topic() == modules_topic {
                TopicKind::Modules
            } else {
                TopicKind::Events
            };
            shared
                .reads
                .add(kind, message.key().map_or(0, <[u8]>::len), value.len());
            if kind == TopicKind::Modules {
                if let Some(change) = modules.add(value) {
                    changes.push(change);
                }
                continue;
            }
            match EventMessage::decode(value) {
                Ok(EventMessage::Task(event)) => changes_of(&event, &mut changes),
                // This process applied its own batches when it wrote them.
                Ok(EventMessage::Tasks { source, .. }) if shared.batcher.is_own(&source) => {}
                Ok(EventMessage::Tasks { events, .. }) => {
                    for event in &events {
                        changes_of(event, &mut changes);
                    }
                }
                Ok(EventMessage::Job { job, .. }) => {
                    let job = shared.with_controls(job);
                    shared.job_flags(&job.id, job.paused, job.cancelled);
                    changes.push(ViewChange::Job(job));
                }
                Ok(EventMessage::Expanded { job, from, to, .. }) => {
                    changes.push(ViewChange::Expanded { job, from, to });
                }
                Ok(control) => apply_control(&shared, &control),
                Err(e) => tracing::warn!(
                    offset = message.offset(),
                    error = %e,
                    "skipping an unreadable event"
                ),
            }
        }
        if changes.is_empty() && positions.is_empty() {
            continue;
        }
        changes.extend(positions.into_iter().map(|((topic, partition), next)| {
            ViewChange::Offset {
                topic,
                partition,
                next,
            }
        }));
        shared.view.apply_view(changes);
    }
}

/// Collects module chunks until a module is whole, then checks its SHA-256.
#[derive(Default)]
struct Assembler {
    partial: HashMap<String, Vec<Option<Vec<u8>>>>,
}

impl Assembler {
    fn add(&mut self, value: &[u8]) -> Option<ViewChange> {
        let chunk = match ModuleChunk::decode(value) {
            Ok(chunk) => chunk,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable module chunk");
                return None;
            }
        };
        let data = chunk.data().ok()?;
        let parts = self
            .partial
            .entry(chunk.id.clone())
            .or_insert_with(|| vec![None; chunk.count as usize]);
        if parts.len() != chunk.count as usize {
            *parts = vec![None; chunk.count as usize];
        }
        parts[chunk.index as usize] = Some(data);
        if parts.iter().any(Option::is_none) {
            return None;
        }
        let bytes: Vec<u8> = self
            .partial
            .remove(&chunk.id)?
            .into_iter()
            .flatten()
            .flatten()
            .collect();
        let id = ModuleId::of(&bytes);
        if id.as_str() != chunk.id {
            tracing::warn!(module = %chunk.id, "module chunks do not add up to their SHA-256; ignored");
            return None;
        }
        Some(ViewChange::Module(
            ModuleRecord {
                id,
                name: chunk.name,
                names: Vec::new(),
                kind: chunk.kind,
                size: bytes.len() as u64,
                created_at: chunk.created_at,
            },
            bytes,
        ))
    }
}

/// What a view stores for a task event.
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
            (Some(module), Some(options)) => ModuleId::read(module).map(|m| (m, options.clone())),
            _ => None,
        },
        allocated_at: event
            .allocated_at
            .filter(|_| event.state != TaskState::Allocated),
    }
}
