//! Dependencies on the embedded store, the host's half: tasks stored
//! Waiting are held here, out of the ready index, until the writer's
//! commit says they were released (their Pending event, moved from
//! Waiting) or cancelled. The writer decides (see [`super::dependencies`]);
//! this side only follows its commits, so memory never runs ahead of the
//! store. Waiting tasks hold no payload in memory: it is read from the
//! store when the task is leased, so a million waiting tasks cost their
//! entries only.

use super::{EmbeddedQueue, HostState, Store};
use crate::model::{TaskState, now_ms, now_us};
use crate::queue::scheduler::ready::Entry;
use crate::queue::{CommitObserver, Committed, SettledJob};
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Waiting tasks by id, each with its entry ready to be queued.
#[derive(Default)]
pub(super) struct WaitingTasks(HashMap<Arc<str>, Entry>);

impl WaitingTasks {
    /// Hold `entry` until its task is released (its payload stays on disk).
    pub(super) fn hold(&mut self, mut entry: Entry) {
        entry.payload = None;
        entry.state = TaskState::Waiting;
        self.0.insert(entry.id.clone(), entry);
    }

    /// Stop holding a task (released, cancelled, or its submit failed).
    pub(super) fn take(&mut self, id: &str) -> Option<Entry> {
        self.0.remove(id)
    }

    /// Stop holding every task of `job`.
    pub(super) fn take_job(&mut self, job: &str) -> Vec<Entry> {
        let ids: Vec<Arc<str>> = self
            .0
            .values()
            .filter(|e| e.job.as_deref() == Some(job))
            .map(|e| e.id.clone())
            .collect();
        ids.iter().filter_map(|id| self.0.remove(id)).collect()
    }

    /// Whether `job` has a task held here.
    pub(super) fn has_job(&self, job: &str) -> bool {
        self.0.values().any(|e| e.job.as_deref() == Some(job))
    }

    /// A held task, to change its priority.
    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.0.get_mut(id)
    }

    /// Give every held task of `job` a new priority.
    pub(super) fn set_job_priority(&mut self, job: &str, priority: u8) {
        for entry in self.0.values_mut() {
            if entry.job.as_deref() == Some(job) {
                entry.priority = priority;
            }
        }
    }
}

/// Follows the store's commits for the host's waiting tasks: the commit
/// observer [`EmbeddedQueue::open`] registers on its own store.
pub(super) struct Releaser {
    pub(super) store: Weak<Store>,
}

impl Releaser {
    fn queue(&self) -> Option<EmbeddedQueue> {
        self.store.upgrade().map(|inner| EmbeddedQueue { inner })
    }
}

impl CommitObserver for Releaser {
    fn committed(&self, batch: &[Committed]) {
        let mut moved = batch
            .iter()
            .filter(|c| c.from == Some(TaskState::Waiting))
            .peekable();
        if moved.peek().is_none() {
            return;
        }
        let Some(queue) = self.queue() else { return };
        let now = now_ms();
        let ready_us = now_us();
        let mut released = false;
        {
            let mut state = queue.state();
            let HostState {
                waiting, scheduler, ..
            } = &mut *state;
            for c in moved {
                let Some(entry) = waiting.take(&c.event.task_id) else {
                    continue;
                };
                if c.event.state == TaskState::Pending {
                    let entry = Entry {
                        queued_at: now,
                        ready_us,
                        state: TaskState::Pending,
                        ..entry
                    };
                    scheduler.ready.insert(entry, now);
                    released = true;
                }
            }
        }
        if released {
            queue.inner.wake.notify_waiters();
        }
    }

    fn jobs_settled(&self, jobs: &[SettledJob]) {
        let Some(queue) = self.queue() else { return };
        {
            let mut state = queue.state();
            for settled in jobs {
                let Some(flags) = state.jobs.get_mut(settled.job.as_str()) else {
                    continue;
                };
                flags.waiting = false;
                if !settled.released {
                    flags.cancelled = true;
                    state.sweeps.retain(|c| *c.job != *settled.job);
                }
            }
        }
        queue.inner.wake.notify_waiters();
    }
}

impl EmbeddedQueue {
    /// Write `ops`, which store the tasks of `waiters` Waiting, holding
    /// them first: the commit that stores them may release them at once
    /// (their dependencies already ended), and the release must find them.
    /// On failure they are let go again, as the caller changed nothing else.
    pub(super) async fn write_holding(
        &self,
        waiters: Vec<Entry>,
        ops: Vec<super::writer::Op>,
    ) -> Result<(), crate::queue::QueueError> {
        let ids: Vec<Arc<str>> = waiters.iter().map(|e| e.id.clone()).collect();
        if !waiters.is_empty() {
            let mut state = self.state();
            for entry in waiters {
                state.waiting.hold(entry);
            }
        }
        let written = self.inner.writer.write(ops).await;
        if written.is_err() && !ids.is_empty() {
            let mut state = self.state();
            for id in &ids {
                state.waiting.take(id);
            }
        }
        written
    }
}
