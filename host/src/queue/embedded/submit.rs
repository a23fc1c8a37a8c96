//! Accepting jobs on the embedded store. A job of up to one chunk (and
//! every sweep, which is one row and a cursor) is one transaction. Bigger
//! explicit jobs are written a chunk per transaction, so a million-task
//! job does not hold the writer; one cut short by a crash is removed at the
//! next start (its submitter never heard it was accepted). Waiting tasks
//! hold at most `held_payload_bytes` of payload; the rest stay on disk
//! until leased.

use super::sweeps::SweepCursor;
use super::writer::Op;
use super::{EmbeddedQueue, JobFlags, Tags, entry_from_new};
use crate::model::{JobRecord, NewJob, NewTask, now_ms, now_us};
use crate::queue::QueueError;
use crate::queue::scheduler::ready::Entry;
use std::sync::Arc;

/// Tasks of an explicit-payload job written per transaction: a big job is
/// accepted in many short transactions, so other writes interleave.
const JOB_CHUNK_TASKS: usize = 4096;

impl EmbeddedQueue {
    /// An entry for a durably stored task, its payload left on disk (read
    /// at lease) once waiting tasks hold `held_payload_bytes`.
    pub(super) fn admit(&self, held: &mut u64, mut entry: Entry) -> Entry {
        let size = entry.payload.as_ref().map_or(0, |p| p.len() as u64);
        if *held + size > self.inner.config.held_payload_bytes {
            entry.payload = None;
        } else {
            *held += size;
        }
        entry
    }

    /// Durably accept a job (see the module's comment).
    pub(super) async fn accept_job(&self, mut job: NewJob) -> Result<JobRecord, QueueError> {
        let now = now_ms();
        let total = match &job.sweep {
            Some(sweep) => sweep
                .validate()
                .map_err(|e| QueueError::Conflict(e.to_string()))?,
            None => job.payloads.len() as u64,
        };
        let expanded = if job.sweep.is_some() { 0 } else { total };
        let record = job.record(total, expanded, now);
        let tags: Tags = Arc::new(job.options.tags.clone());
        // A job of up to one chunk (and every sweep) is one transaction.
        // Bigger explicit jobs are written a chunk per transaction, so a
        // million-task job does not hold the writer: the record first with
        // `expanded` 0, and `expanded` = `total` once the last chunk is
        // stored. One cut short by a crash is removed at the next start
        // (its submitter never heard it was accepted).
        let chunked = job.payloads.len() > JOB_CHUNK_TASKS;
        let mut first = Vec::with_capacity(2);
        if chunked {
            let mut accepting = record.clone();
            accepting.expanded = 0;
            self.inner.writer.write(vec![Op::Job(accepting)]).await?;
        } else {
            first.push(Op::Job(record.clone()));
        }
        let mut entries = Vec::with_capacity(job.payloads.len());
        let job_id: Arc<str> = Arc::from(job.id.as_str());
        let mut held = self.state().scheduler.ready.payload_bytes();
        let mut payloads = std::mem::take(&mut job.payloads)
            .into_iter()
            .enumerate()
            .peekable();
        loop {
            let chunk: Vec<(NewTask, Tags)> = payloads
                .by_ref()
                .take(JOB_CHUNK_TASKS)
                .map(|(index, payload)| {
                    let task = NewTask {
                        id: format!("{}.{index}", job.id),
                        job_id: Some(job.id.clone()),
                        module: job.module.clone(),
                        payload,
                        options: job.options.clone(),
                    };
                    (task, tags.clone())
                })
                .collect();
            entries.extend(chunk.iter().map(|(t, tags)| {
                let entry = entry_from_new(t, tags.clone(), now);
                // One shared copy of the job id, not one per task.
                let entry = Entry {
                    job: Some(job_id.clone()),
                    ..entry
                };
                self.admit(&mut held, entry)
            }));
            let mut ops = std::mem::take(&mut first);
            if !chunk.is_empty() {
                ops.push(Op::NewTasks(chunk, now));
            }
            let last = payloads.peek().is_none();
            if last && chunked {
                ops.push(Op::JobExpanded(job.id.clone(), total));
            }
            if last && record.waiting {
                // Last, once every task is stored Waiting: the commit may
                // release the job at once.
                ops.push(Op::Wait {
                    waiter: job.id.clone(),
                    after: job.options.after.clone(),
                });
                return self.accept_waiting_job(job, entries, ops, record).await;
            }
            self.inner.writer.write(ops).await?;
            if last {
                break;
            }
        }
        {
            let mut state = self.state();
            let id: Arc<str> = Arc::from(job.id.as_str());
            state.jobs.insert(id.clone(), JobFlags::default());
            let ready_us = now_us();
            for entry in entries {
                state
                    .scheduler
                    .ready
                    .insert(Entry { ready_us, ..entry }, now);
            }
            if let Some(sweep) = job.sweep {
                state.sweeps.push(SweepCursor::new(
                    id,
                    job.module,
                    job.options,
                    sweep,
                    0,
                    total,
                ));
            }
        }
        self.inner.wake.notify_waiters();
        Ok(record)
    }

    /// The last write of a job that waits for dependencies: its flags,
    /// sweep cursor and tasks are held first (see
    /// [`EmbeddedQueue::write_holding`]), and let go if the write fails.
    async fn accept_waiting_job(
        &self,
        job: NewJob,
        entries: Vec<Entry>,
        ops: Vec<Op>,
        record: JobRecord,
    ) -> Result<JobRecord, QueueError> {
        let id: Arc<str> = Arc::from(job.id.as_str());
        {
            let mut state = self.state();
            state.jobs.insert(
                id.clone(),
                JobFlags {
                    waiting: true,
                    ..JobFlags::default()
                },
            );
            if let Some(sweep) = job.sweep {
                let total = record.total;
                state.sweeps.push(SweepCursor::new(
                    id.clone(),
                    job.module,
                    job.options,
                    sweep,
                    0,
                    total,
                ));
            }
        }
        if let Err(e) = self.write_holding(entries, ops).await {
            let mut state = self.state();
            state.jobs.remove(&id);
            state.sweeps.retain(|c| c.job != id);
            return Err(e);
        }
        Ok(record)
    }
}
