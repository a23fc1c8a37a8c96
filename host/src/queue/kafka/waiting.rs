//! Dependencies on a Kafka grid (`after`): tasks and jobs that wait for
//! other tasks or jobs, whichever host they were submitted to or run on.
//!
//! - **Submit.** A waiter is not written to a band. A waiting job is
//!   announced as any lazily expanded job, but its first expand cursor is
//!   *held* (it names `after`); a waiting task becomes a held one-task
//!   cursor on the same compacted `<prefix>expand` topic, keyed by its id,
//!   carrying its task message. Its Waiting event goes to the event topic,
//!   so every view counts and lists it.
//! - **A dependency ends.** Hosts with a view see every final event. Their
//!   view watches the ids that Waiting rows name and, when one ends,
//!   reports it ([`EndedReporter`]); this host then writes `done/<id>`
//!   ([`EventMessage::Ended`]) to the compacted control topic, which every
//!   host reads whole. Several views write the same record; a view that
//!   starts again reports once more what its waiters still wait for.
//! - **Release.** The expander that owns a held cursor ([`expand`](super::expand))
//!   decides with [`verdict`] once the control topic says enough: it
//!   expands the job (or writes the task to its band, see
//!   [`expand`](super::expand)'s task cursors), or cancels it with
//!   `dependency_failed: <id>`. A host that dies holding waiters loses
//!   nothing: the cursors are in Kafka and its partitions pass to another
//!   host.
//!
//! Fan-in (`input: results_of`) is not offered on Kafka: a worker-only
//! host keeps no results to stream to a task.

use super::publish::Outgoing;
use super::wire::{self, EventMessage, ExpandCursor, TaskEvent, TaskMessage};
use super::{KafkaQueue, Member, set_spec};
use crate::model::{NewTask, OnFailure, TaskState};
use crate::queue::{CommitObserver, Committed, QueueError, WorkQueue};
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// What the owner of a held cursor does now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Some dependency has not ended yet (as far as this host has read).
    Wait,
    /// Every dependency Completed (or the waiter runs anyway).
    Release,
    /// A dependency did not complete: cancel with this reason.
    Cancel(String),
}

/// Decide a waiter on `after` from the `done/` records read so far: the
/// first failed dependency cancels it at once (unless `on_failure: run`),
/// as on the embedded store; otherwise it is released once all have ended.
pub(super) fn verdict(
    after: &[String],
    on_failure: OnFailure,
    ended: &HashMap<String, bool>,
) -> Verdict {
    let mut all = true;
    for id in after {
        match ended.get(id) {
            Some(false) if on_failure == OnFailure::Cancel => {
                return Verdict::Cancel(format!("dependency_failed: {id}"));
            }
            Some(_) => {}
            None => all = false,
        }
    }
    if all { Verdict::Release } else { Verdict::Wait }
}

impl KafkaQueue {
    /// Accept tasks that wait: a held cursor and a Waiting event each.
    pub(super) async fn submit_waiting(&self, tasks: &[NewTask]) -> Result<(), QueueError> {
        let shared = &self.shared;
        let mut records = Vec::with_capacity(tasks.len() + 1);
        let mut events = Vec::with_capacity(tasks.len());
        for task in tasks {
            let message = TaskMessage::new(
                &task.id,
                task.job_id.as_deref(),
                task.module.as_str(),
                &task.payload,
                &task.options,
            );
            let cursor = ExpandCursor::task(
                message,
                true,
                Vec::new(),
                false,
                task.options.after.clone(),
                task.options.on_failure,
            );
            records.push(Outgoing {
                topic: shared.topics.expand(),
                partition: None,
                key: task.id.clone(),
                value: cursor.encode(),
            });
            let mut event = TaskEvent::new(&task.id, task.job_id.as_deref(), TaskState::Waiting, 0);
            set_spec(&mut event, &task.module, &task.options);
            events.push(event);
        }
        records.extend(shared.batch_records(&events));
        shared.publisher.send_all(&records).await?;
        shared.apply_own(&events);
        shared.view.flush().await
    }
}

impl Member {
    /// The task message of a held task as it is released: at the priority
    /// it has now, its Pending event (with its definition) beside it.
    pub(super) fn released_task(&self, message: &TaskMessage) -> (Outgoing, TaskEvent) {
        let priority = message.priority.unwrap_or(0);
        let record = self.task_record(message, self.topics.band(priority));
        let id = message.id.as_deref().unwrap_or_default();
        let mut event = TaskEvent::new(id, message.job_id.as_deref(), TaskState::Pending, 0);
        event.module = Some(message.module.clone());
        event.options = Some(message.options(priority));
        event.message = Some("released: its dependencies ended".into());
        (record, event)
    }

    /// A held task's Cancelled event (a failed dependency, or a user's cancel).
    pub(super) fn cancelled_waiter(message: &TaskMessage, reason: Option<String>) -> TaskEvent {
        let id = message.id.as_deref().unwrap_or_default();
        let mut event = TaskEvent::new(id, message.job_id.as_deref(), TaskState::Cancelled, 0);
        event.message = reason;
        event
    }
}

/// Writes `done/<id>` to the control topic for each dependency this host's
/// view reports ended. Holds the member weakly: the view it observes
/// belongs to the member.
pub(super) struct EndedReporter {
    member: Weak<Member>,
}

impl EndedReporter {
    /// A reporter for `member`'s view.
    pub(super) fn new(member: &Arc<Member>) -> Self {
        EndedReporter {
            member: Arc::downgrade(member),
        }
    }
}

/// Longest pause between attempts to write `done/` records.
const RETRY_MAX: Duration = Duration::from_secs(5);

impl CommitObserver for EndedReporter {
    fn committed(&self, _batch: &[Committed]) {}

    fn dependencies_ended(&self, ended: &[(String, bool)]) {
        let Some(member) = self.member.upgrade() else {
            return;
        };
        let records: Vec<Outgoing> = ended
            .iter()
            .map(|(id, completed)| Outgoing {
                topic: member.topics.control(),
                partition: None,
                key: format!("done/{id}"),
                value: EventMessage::Ended {
                    v: wire::EVENT_VERSION,
                    id: id.clone(),
                    completed: *completed,
                }
                .encode(),
            })
            .collect();
        let runtime = member.publisher.runtime().clone();
        runtime.spawn(async move {
            // Until written or closing: waiters on another host depend on it.
            let mut pause = Duration::from_millis(100);
            while !member.closed() {
                match member.publisher.send_all(&records).await {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "writing ended dependencies; trying again");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(RETRY_MAX);
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waiter_is_released_when_all_complete_and_cancelled_at_the_first_failure() {
        let after = vec!["a".to_string(), "b".to_string()];
        let mut ended = HashMap::new();
        assert_eq!(verdict(&after, OnFailure::Cancel, &ended), Verdict::Wait);
        ended.insert("a".to_string(), true);
        assert_eq!(verdict(&after, OnFailure::Cancel, &ended), Verdict::Wait);
        ended.insert("b".to_string(), true);
        assert_eq!(verdict(&after, OnFailure::Cancel, &ended), Verdict::Release);
        let mut failed = HashMap::new();
        failed.insert("b".to_string(), false);
        assert_eq!(
            verdict(&after, OnFailure::Cancel, &failed),
            Verdict::Cancel("dependency_failed: b".into())
        );
        assert_eq!(verdict(&after, OnFailure::Run, &failed), Verdict::Wait);
        failed.insert("a".to_string(), true);
        assert_eq!(verdict(&after, OnFailure::Run, &failed), Verdict::Release);
    }
}
