//! Start-up of the embedded store: jobs whose acceptance a crash cut short
//! are removed (their submitter never heard they were accepted), and the
//! scheduler is rebuilt from the store: unfinished tasks wait again, those
//! leased when the last process died back in Pending, sweeps resume at the
//! point they had reached.

use super::writer::Op;
use super::{EmbeddedQueue, JobFlags, SweepCursor, entry_from_record, reader, transition};
use crate::model::{JobRecord, TaskState, now_ms};
use crate::queue::QueueError;
use std::collections::HashMap;
use std::sync::Arc;

impl EmbeddedQueue {
    /// Rebuild the scheduler from the store (see the module's comment).
    pub(super) fn recover(&self) -> Result<(), QueueError> {
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
        let mut state = self.state();
        for job in jobs {
            let id: Arc<str> = Arc::from(job.id.as_str());
            state.jobs.insert(
                id.clone(),
                JobFlags {
                    paused: job.paused,
                    cancelled: job.cancelled,
                    waiting: job.waiting && !job.cancelled,
                },
            );
            if job.paused {
                state.scheduler.ready.pause(id.clone());
            }
            if let Some(sweep) = job
                .sweep
                .filter(|_| !job.cancelled && job.expanded < job.total)
            {
                state.sweeps.push(SweepCursor::new(
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
            if task.state == TaskState::Waiting {
                state.waiting.hold(entry);
                continue;
            }
            if matches!(task.state, TaskState::Allocated | TaskState::Running) {
                entry.state = TaskState::Pending;
                let mut t = transition(&entry, Some(task.state), TaskState::Pending, task.attempts);
                t.carried.message =
                    Some("requeued: the host stopped while the task was leased".into());
                requeued.push(Op::Transition(Box::new(t)));
            }
            state.scheduler.ready.insert(entry, now);
        }
        if !requeued.is_empty() {
            tracing::info!(
                tasks = requeued.len(),
                "requeued tasks leased before the restart"
            );
        }
        // Releases commit with the end that causes them, so none should be
        // owed; settling every dependency once costs a lookup each and sets
        // right a store that disagrees (written by hand, or by an older kwq).
        // Sent, not awaited: a store that cannot be written at start (a
        // full disk) still opens, fails closed, and the writer retries these.
        requeued.push(Op::SettleAll);
        self.inner.writer.send(requeued);
        Ok(())
    }
}
