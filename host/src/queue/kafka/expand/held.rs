//! Held cursors: jobs and lone tasks that wait for their dependencies
//! (`after`), owned by the expander like any cursor (see
//! [`waiting`](super::super::waiting) for the whole picture).
//!
//! A held job is released by writing its cursor unheld, with the bands'
//! ends as they are then as its scan positions (none of its points is
//! written yet), after which it expands as any job. A lone task is
//! released in three writes, so a host that dies in between neither loses
//! nor repeats it: its cursor unheld, naming where its band ended; then
//! its task message (and Pending event); then a tombstone for the cursor.
//! A successor that finds an unheld task cursor scans the band from that
//! position for the task and writes it only if it is not there. Waiters
//! are decided in batches, and only when a control (a `done/` record, a
//! cancel) or a new cursor has been read since the last pass.

use super::super::publish::Outgoing;
use super::super::waiting::{Verdict, verdict};
use super::super::wire::{ExpandCursor, ScanFrom, TaskEvent, TaskMessage};
use super::{Expander, positions, repair};
use crate::model::OnFailure;
use crate::queue::QueueError;
use rdkafka::consumer::Consumer;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// Waiters decided in one pass at most (each pass is three writes).
const BATCH: usize = 2048;

/// What a held job or task waits for.
#[derive(Debug, Clone)]
pub(super) struct Waits {
    pub(super) after: Vec<String>,
    pub(super) on_failure: OnFailure,
}

/// A lone task that waits, or whose release a previous owner began.
pub(super) struct HeldTask {
    /// Its partition of the expand topic.
    pub(super) partition: i32,
    /// The message written to its band when released.
    pub(super) message: TaskMessage,
    /// Still waiting; else a release began, and `scan` says where to look.
    pub(super) held: bool,
    /// Band positions at or after which a release wrote it, if it did.
    pub(super) scan: Vec<ScanFrom>,
    pub(super) waits: Waits,
}

/// What one pass decided for the lone tasks.
#[derive(Default)]
struct Decided {
    release: Vec<String>,
    /// With the reason (none: a user's cancel).
    cancel: Vec<(String, Option<String>)>,
    /// Released by a previous owner that may have died before writing them.
    confirm: Vec<String>,
}

impl Decided {
    fn len(&self) -> usize {
        self.release.len() + self.cancel.len() + self.confirm.len()
    }
}

impl Expander {
    /// Decide the lone tasks that wait, if anything they depend on may have
    /// changed; whether anything was written.
    pub(super) fn step_tasks(&mut self) -> Result<bool, QueueError> {
        let seen = self.shared.controls_applied.load(Ordering::Acquire);
        if self.tasks.is_empty() || (!self.tasks_dirty && seen == self.tasks_seen) {
            return Ok(false);
        }
        self.tasks_seen = seen;
        let mut decided = Decided::default();
        let mut complete = true;
        {
            let state = self.shared.state();
            for (id, task) in &self.tasks {
                if decided.len() >= BATCH || self.owned.get(&task.partition) != Some(&None) {
                    complete = false;
                    continue;
                }
                if state.cancelled_tasks.contains(id) {
                    decided.cancel.push((id.clone(), None));
                } else if !task.held {
                    decided.confirm.push(id.clone());
                } else {
                    match verdict(&task.waits.after, task.waits.on_failure, &state.ended) {
                        Verdict::Wait => {}
                        Verdict::Release => decided.release.push(id.clone()),
                        Verdict::Cancel(reason) => decided.cancel.push((id.clone(), Some(reason))),
                    }
                }
            }
        }
        // Until a pass has seen every task, the next one looks again.
        self.tasks_dirty = !complete;
        if decided.len() == 0 {
            return Ok(false);
        }
        let result = self
            .cancel_tasks(&decided.cancel)
            .and_then(|()| self.confirm_tasks(&decided.confirm))
            .and_then(|()| self.release_tasks(&decided.release));
        if result.is_err() {
            self.tasks_dirty = true;
        }
        result.map(|()| true)
    }

    /// A held job: release or cancel it if its dependencies say so;
    /// whether anything was written.
    pub(super) fn settle_job(&mut self, id: &str) -> Result<bool, QueueError> {
        let Some(waits) = self.jobs[id].waits.clone() else {
            return Ok(false);
        };
        let decision = verdict(&waits.after, waits.on_failure, &self.shared.state().ended);
        match decision {
            Verdict::Wait => Ok(false),
            Verdict::Cancel(reason) => {
                tracing::info!(job = id, reason, "cancelling a waiting job");
                // As a user's cancel: every host and view learns it.
                let control = super::super::wire::EventMessage::JobControl {
                    v: super::super::wire::EVENT_VERSION,
                    job: id.to_string(),
                    paused: false,
                    cancelled: true,
                    priority: None,
                    reason: Some(reason),
                };
                let publisher = &self.shared.publisher;
                publisher.runtime().block_on(self.shared.control(control))?;
                self.finish(id)?;
                Ok(true)
            }
            Verdict::Release => {
                let (_, _, priority) = self.flags(id);
                let band = self.shared.topics.band(priority);
                let fresh = positions(self.consumer.client(), &band)?;
                let job = self.jobs.get_mut(id).expect("a held job");
                job.waits = None;
                job.scan = fresh;
                job.confirmed = true;
                job.last_written = Instant::now();
                let next = job.next;
                if let Err(e) = self.record_progress(id, next, next) {
                    // Still held as far as the grid knows: decide again.
                    if let Some(job) = self.jobs.get_mut(id) {
                        job.waits = Some(waits);
                        job.confirmed = false;
                    }
                    return Err(e);
                }
                tracing::info!(job = id, "released a waiting job");
                Ok(true)
            }
        }
    }

    /// Write each task's Cancelled event, then drop its cursor.
    fn cancel_tasks(&mut self, cancel: &[(String, Option<String>)]) -> Result<(), QueueError> {
        if cancel.is_empty() {
            return Ok(());
        }
        let events: Vec<TaskEvent> = cancel
            .iter()
            .map(|(id, reason)| {
                super::super::Member::cancelled_waiter(&self.tasks[id].message, reason.clone())
            })
            .collect();
        self.send(self.shared.batch_records(&events))?;
        self.shared.apply_own(&events);
        let ids: Vec<&String> = cancel.iter().map(|(id, _)| id).collect();
        self.drop_cursors(&ids)
    }

    /// Release held tasks: cursors unheld with where their bands end, the
    /// tasks and their Pending events, then tombstones.
    fn release_tasks(&mut self, release: &[String]) -> Result<(), QueueError> {
        if release.is_empty() {
            return Ok(());
        }
        self.follow_priority_changes(release);
        let mut ends: HashMap<String, Vec<ScanFrom>> = HashMap::new();
        let mut cursors = Vec::with_capacity(release.len());
        for id in release {
            let priority = self.tasks[id].message.priority.unwrap_or(0);
            let band = self.shared.topics.band(priority);
            if !ends.contains_key(&band) {
                let fresh = positions(self.consumer.client(), &band)?;
                ends.insert(band.clone(), fresh);
            }
            let task = &self.tasks[id];
            let cursor = ExpandCursor::task(
                task.message.clone(),
                false,
                ends[&band].clone(),
                false,
                task.waits.after.clone(),
                task.waits.on_failure,
            );
            cursors.push(self.cursor_record(id, &cursor));
        }
        self.send(cursors)?;
        for id in release {
            let task = self.tasks.get_mut(id).expect("a held task");
            task.held = false;
            let band = self.shared.topics.band(task.message.priority.unwrap_or(0));
            task.scan = ends[&band].clone();
        }
        self.write_tasks(release)?;
        tracing::info!(tasks = release.len(), "released waiting tasks");
        let ids: Vec<&String> = release.iter().collect();
        self.drop_cursors(&ids)
    }

    /// Give tasks about to be released the priority a user set while they
    /// waited (their own, else their job's), so that they are written to
    /// that band and their unheld cursors carry it.
    fn follow_priority_changes(&mut self, ids: &[String]) {
        let state = self.shared.state();
        for id in ids {
            let Some(task) = self.tasks.get_mut(id) else {
                continue;
            };
            let job = task.message.job_id.as_deref();
            if let Some(priority) = state
                .task_priorities
                .get(id)
                .copied()
                .or_else(|| job.and_then(|j| state.job_priorities.get(j).copied()))
            {
                task.message.priority = Some(priority);
            }
        }
    }

    /// Tasks whose release a previous owner began: write those it did not.
    fn confirm_tasks(&mut self, confirm: &[String]) -> Result<(), QueueError> {
        if confirm.is_empty() {
            return Ok(());
        }
        let ids: HashSet<String> = confirm.iter().cloned().collect();
        let scan: Vec<ScanFrom> = confirm
            .iter()
            .flat_map(|id| self.tasks[id].scan.clone())
            .collect();
        let found = repair::tasks_written(&self.shared, &ids, &scan)?;
        let missing: Vec<String> = confirm
            .iter()
            .filter(|id| !found.contains(*id))
            .cloned()
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                tasks = missing.len(),
                "writing the released tasks a previous expander left out"
            );
            self.write_tasks(&missing)?;
        }
        let ids: Vec<&String> = confirm.iter().collect();
        self.drop_cursors(&ids)
    }

    /// Write tasks to their bands with their Pending events.
    fn write_tasks(&mut self, ids: &[String]) -> Result<(), QueueError> {
        let mut records = Vec::with_capacity(ids.len() + 1);
        let mut events = Vec::with_capacity(ids.len());
        for id in ids {
            let (record, event) = self.shared.released_task(&self.tasks[id].message);
            records.push(record);
            events.push(event);
        }
        records.extend(self.shared.batch_records(&events));
        self.send(records)?;
        self.shared.apply_own(&events);
        Ok(())
    }

    /// Tombstone the cursors of tasks dealt with, and forget them.
    fn drop_cursors(&mut self, ids: &[&String]) -> Result<(), QueueError> {
        let tombstones: Vec<Outgoing> = ids
            .iter()
            .map(|id| Outgoing {
                topic: self.shared.topics.expand(),
                partition: None,
                key: id.to_string(),
                value: Vec::new(),
            })
            .collect();
        self.send(tombstones)?;
        for id in ids {
            self.tasks.remove(*id);
            self.finished.insert(id.to_string());
        }
        Ok(())
    }
}
