//! What a host does with what it reads: tasks from the band topics enter
//! its scheduler (unless cancelled or already finished elsewhere; a replay
//! of a task it holds joins that task), revoked partitions' waiting tasks
//! leave it, and controls read from the event topic act on the tasks it holds.

use super::offsets::Partition;
use super::publish::Outgoing;
use super::wire::{TaskEvent, TaskMessage};
use super::{Member, Origin};
use crate::model::{ModuleId, TaskState, now_ms};
use crate::queue::scheduler::ready::Entry;
use std::collections::HashSet;
use std::sync::Arc;

impl Member {
    /// Take a task read from a band topic into the ready index.
    pub(super) fn accept(self: &Arc<Self>, topic: &str, partition: i32, offset: i64, value: &[u8]) {
        let band = self.topics.priority_of(topic).unwrap_or(5);
        let origin = Origin {
            partition: (topic.to_string(), partition),
            offset,
        };
        self.state().progress.read(&origin.partition, offset);
        let message = match TaskMessage::decode(value) {
            Ok(message) => message,
            Err(e) => {
                // Unreadable: park the raw bytes on the dead-letter topic.
                tracing::warn!(topic, partition, offset, error = %e, "unreadable task message sent to the dead-letter topic");
                let record = Outgoing {
                    topic: self.topics.dead(),
                    partition: None,
                    key: format!("{topic}/{partition}/{offset}"),
                    value: value.to_vec(),
                };
                self.publish(Vec::new(), vec![record], vec![origin]);
                return;
            }
        };
        let id = message
            .id
            .clone()
            .unwrap_or_else(|| format!("k-{topic}-{partition}-{offset}"));
        let module = ModuleId::read(&message.module)
            .or_else(|| self.view.module_named_now(&message.module))
            .unwrap_or_else(|| ModuleId::of(message.module.as_bytes()));
        let options = message.options(band);
        let payload = message.payload_bytes().unwrap_or_default();
        let now = now_ms();
        let mut state = self.state();
        let job_cancelled = message
            .job_id
            .as_deref()
            .is_some_and(|j| state.cancelled_jobs.contains(j));
        if job_cancelled || state.cancelled_tasks.contains(&id) {
            drop(state);
            let event = TaskEvent::new(
                &id,
                message.job_id.as_deref(),
                TaskState::Cancelled,
                message.attempts,
            );
            self.publish(vec![event], Vec::new(), vec![origin]);
            return;
        }
        // Replayed after another host finished it (it died or lost the
        // partition before committing): nothing to run.
        if self.view.is_finished(&id) {
            drop(state);
            self.state().progress.finished(&origin.partition, offset);
            return;
        }
        // The same task read again (a replay after a rebalance) while this host
        // still holds it: one run, both offsets finish with it.
        if let Some(leased) = state.scheduler.leased_mut(&id) {
            leased.extra.push(origin);
            return;
        }
        if let Some(origins) = state.origins.get_mut(id.as_str()) {
            origins.push(origin);
            return;
        }
        let submitted_at = message.submitted_at.unwrap_or(now).min(now);
        let mut entry = Entry::new(
            &id,
            message.job_id.as_deref().map(Arc::from),
            &module,
            &payload,
            &options,
            Arc::new(options.tags.clone()),
            submitted_at,
        )
        .after_attempts(message.attempts, message.attempts > 0);
        // A job's priority may have changed before some of its tasks were read.
        if let Some(priority) = message
            .job_id
            .as_deref()
            .and_then(|j| state.job_priorities.get(j).copied())
        {
            entry.priority = priority;
        }
        // And so may its own, which wins over its job's here (the embedded
        // store applies the two in the order they were made).
        if let Some(priority) = state.task_priorities.get(&id).copied() {
            entry.priority = priority;
        }
        state.origins.insert(entry.id.clone(), vec![origin]);
        state.scheduler.ready.insert(entry, now);
        drop(state);
        self.wake.notify_waiters();
    }

    /// Tasks waiting per band on this host.
    pub(super) fn depth(&self) -> [u64; 10] {
        self.state().scheduler.ready.depth()
    }

    /// Partitions were taken away: drop what was read from them and not
    /// leased (the new owner reads it again from the committed offset).
    pub(super) fn revoke(&self, partitions: &[Partition]) {
        let mut state = self.state();
        let revoked: HashSet<&Partition> = partitions.iter().collect();
        let dropped: Vec<Arc<str>> = state
            .origins
            .iter()
            .filter(|(_, origins)| origins.iter().all(|o| revoked.contains(&o.partition)))
            .map(|(id, _)| id.clone())
            .collect();
        for id in dropped {
            state.origins.remove(&id);
            state.scheduler.ready.remove(&id);
        }
        for partition in partitions {
            state.progress.revoke(partition);
        }
    }

    /// A job was paused, resumed or cancelled (here or on another host).
    pub(super) fn job_flags(self: &Arc<Self>, job: &str, paused: bool, cancelled: bool) {
        let id: Arc<str> = Arc::from(job);
        let mut state = self.state();
        if cancelled {
            state.cancelled_jobs.insert(id.clone());
            state.scheduler.cancel_leased_job(job);
            let removed = state.scheduler.ready.remove_job(job);
            let mut events = Vec::new();
            let mut done = Vec::new();
            for entry in removed {
                done.extend(state.origins.remove(&entry.id).unwrap_or_default());
                events.push(TaskEvent::new(
                    &entry.id,
                    Some(job),
                    TaskState::Cancelled,
                    entry.attempts,
                ));
            }
            drop(state);
            if !events.is_empty() {
                self.publish(events, Vec::new(), done);
            }
        } else if paused {
            state.scheduler.ready.pause(id);
        } else {
            state.scheduler.ready.resume(job, now_ms());
            drop(state);
            self.wake.notify_waiters();
        }
    }

    /// A job's priority changed: re-rank the tasks of it this host holds.
    pub(super) fn job_priority(self: &Arc<Self>, job: &str, priority: u8) {
        let mut state = self.state();
        state.job_priorities.insert(Arc::from(job), priority);
        state
            .scheduler
            .ready
            .set_job_priority(job, priority, now_ms());
        state.scheduler.set_leased_job_priority(job, priority);
        drop(state);
        self.wake.notify_waiters();
    }

    /// A user cancelled a task or changed its priority: act if this host holds it.
    pub(super) fn task_control(self: &Arc<Self>, task: &str, cancel: bool, priority: Option<u8>) {
        let mut state = self.state();
        if cancel {
            state.cancelled_tasks.insert(task.to_string());
            if state.scheduler.cancel_leased(task) {
                return;
            }
            if let Some(entry) = state.scheduler.ready.remove(task) {
                let done = state.origins.remove(task).unwrap_or_default();
                drop(state);
                let event = TaskEvent::new(
                    task,
                    entry.job.as_deref(),
                    TaskState::Cancelled,
                    entry.attempts,
                );
                self.publish(vec![event], Vec::new(), done);
            }
        } else if let Some(priority) = priority {
            state.task_priorities.insert(task.to_string(), priority);
            state.scheduler.ready.set_priority(task, priority, now_ms());
            if let Some(leased) = state.scheduler.leased_mut(task) {
                leased.entry.priority = priority;
            }
            drop(state);
            self.wake.notify_waiters();
        }
    }
}
