//! The user's controls on the embedded store ([`Control`](crate::queue::Control)):
//! pause, resume and cancel a job, change a job's or a task's priority,
//! cancel a task. Each is made durable before memory changes (or, for a
//! job's priority, under the same lock as the writer's queue).

use super::writer::Op;
use super::{EmbeddedQueue, JobFlags, reader, transition};
use crate::model::{JobId, TaskId, TaskState, now_ms};
use crate::queue::{Control, QueueError, ReadStore};
use std::sync::Arc;

/// Tasks deleted per transaction when a job is deleted.
const DELETE_CHUNK: usize = 10_000;

impl EmbeddedQueue {
    /// Apply one control, durably.
    pub(super) async fn apply_control(&self, control: Control) -> Result<(), QueueError> {
        match control {
            Control::PauseJob { job } => self.pause(&job).await,
            Control::ResumeJob { job } => self.resume(&job).await,
            Control::CancelJob { job } => self.cancel(&job).await,
            Control::JobPriority { job, priority } => self.reprioritise_job(&job, priority).await,
            Control::CancelTask { task } => self.cancel_one(&task).await,
            Control::TaskPriority { task, priority } => self.reprioritise(&task, priority).await,
            Control::DeleteJob { job } => self.delete(&job).await,
        }
    }

    /// Delete a job none of whose tasks will run again: its tasks (a chunk
    /// per transaction), their events and results, then its record.
    async fn delete(&self, job: &JobId) -> Result<(), QueueError> {
        {
            let mut state = self.state();
            if !state.jobs.contains_key(job.as_str()) {
                return Err(QueueError::NotFound(format!("job {job}")));
            }
            let unfinished = state.sweeps.iter().any(|c| *c.job == **job)
                || state.scheduler.ready.job_waiting(job) > 0
                || state.waiting.has_job(job)
                || state.scheduler.has_leases_of(job);
            if unfinished {
                return Err(QueueError::Conflict(format!(
                    "job {job} has unfinished tasks; cancel it first"
                )));
            }
            state.jobs.remove(job.as_str());
        }
        let id = job.clone();
        let tasks = self
            .inner
            .reader
            .read(move |c| reader::job_task_count(c, &id))
            .await?;
        for _ in 0..tasks.div_ceil(DELETE_CHUNK as u64) {
            self.inner
                .writer
                .write(vec![Op::DropJobTasks(job.clone(), DELETE_CHUNK)])
                .await?;
        }
        self.inner
            .writer
            .write(vec![Op::DropJob(job.clone())])
            .await
    }

    async fn pause(&self, job: &JobId) -> Result<(), QueueError> {
        self.set_paused(job, true).await?;
        self.state().scheduler.ready.pause(Arc::from(job.as_str()));
        Ok(())
    }

    async fn resume(&self, job: &JobId) -> Result<(), QueueError> {
        self.set_paused(job, false).await?;
        self.state().scheduler.ready.resume(job, now_ms());
        self.inner.wake.notify_waiters();
        Ok(())
    }

    /// Cancel a job at once, whatever its size: memory and the writer's
    /// queue change together under the lock, so no task of the job is
    /// leased after this starts; waiting tasks (at most the points created
    /// ahead) become Cancelled, running ones are told to stop, and sweep
    /// points never created stay uncreated (the job's view counts them as
    /// Cancelled). Answers once all of it is durable.
    async fn cancel(&self, job: &JobId) -> Result<(), QueueError> {
        let durable = {
            let mut state = self.state();
            if !state.jobs.contains_key(job.as_str()) {
                return Err(QueueError::NotFound(format!("job {job}")));
            }
            state.jobs.insert(
                Arc::from(job.as_str()),
                JobFlags {
                    cancelled: true,
                    paused: false,
                    waiting: false,
                },
            );
            state.sweeps.retain(|c| &*c.job != job.as_str());
            state.scheduler.cancel_leased_job(job);
            let mut ops = vec![Op::JobFlags {
                job: job.clone(),
                paused: false,
                cancelled: true,
                reason: None,
            }];
            let mut unfinished = state.scheduler.ready.remove_job(job);
            unfinished.extend(state.waiting.take_job(job));
            ops.extend(unfinished.into_iter().map(|entry| {
                Op::Transition(Box::new(transition(
                    &entry,
                    Some(entry.state),
                    TaskState::Cancelled,
                    entry.attempts,
                )))
            }));
            self.inner.writer.write(ops)
        };
        durable.await
    }

    async fn cancel_one(&self, task: &TaskId) -> Result<(), QueueError> {
        let op = {
            let mut state = self.state();
            if state.scheduler.cancel_leased(task) {
                return Ok(());
            }
            let super::HostState {
                scheduler,
                invoked,
                waiting,
                ..
            } = &mut *state;
            // A task waiting for its dependencies is cancelled as any other.
            let entry = scheduler.ready.remove(task).or_else(|| waiting.take(task));
            entry.map(|entry| {
                // A synchronous caller waiting for it hears the end from
                // the commits; its insert, if still held, goes first.
                let mut ops = invoked
                    .remove(task.as_str())
                    .map(super::invoke::Invoked::into_insert)
                    .unwrap_or_default();
                ops.push(Op::Transition(Box::new(transition(
                    &entry,
                    Some(entry.state),
                    TaskState::Cancelled,
                    entry.attempts,
                ))));
                ops
            })
        };
        match op {
            Some(ops) => self.inner.writer.write(ops).await,
            None => {
                let record = self.task(task).await?;
                Err(QueueError::Conflict(format!(
                    "task {task} is already {}",
                    record.state
                )))
            }
        }
    }

    async fn reprioritise(&self, task: &TaskId, priority: u8) -> Result<(), QueueError> {
        let known = {
            let mut state = self.state();
            let held = match state.waiting.get_mut(task) {
                Some(entry) => {
                    entry.priority = priority;
                    true
                }
                None => false,
            };
            let scheduler = &mut state.scheduler;
            let waiting = held || scheduler.ready.set_priority(task, priority, now_ms());
            if let Some(leased) = scheduler.leased_mut(task) {
                leased.entry.priority = priority;
            }
            waiting || scheduler.is_leased(task)
        };
        if !known {
            let record = self.task(task).await?;
            return Err(QueueError::Conflict(format!(
                "task {task} is already {}",
                record.state
            )));
        }
        self.inner
            .writer
            .write(vec![Op::Priority(task.clone(), priority)])
            .await?;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    async fn reprioritise_job(&self, job: &JobId, priority: u8) -> Result<(), QueueError> {
        let durable = {
            let mut state = self.state();
            let flags = state
                .jobs
                .get(job.as_str())
                .copied()
                .ok_or_else(|| QueueError::NotFound(format!("job {job}")))?;
            if flags.cancelled {
                return Err(QueueError::Conflict(format!("job {job} is cancelled")));
            }
            // Memory and the writer's queue change together, under the
            // lock: points expanded after this carry the new priority, and
            // their rows are written after the job's update.
            let now = now_ms();
            state.scheduler.ready.set_job_priority(job, priority, now);
            state.waiting.set_job_priority(job, priority);
            state.scheduler.set_leased_job_priority(job, priority);
            if let Some(cursor) = state.sweeps.iter_mut().find(|c| *c.job == **job) {
                cursor.options.priority = priority;
            }
            let durable = self
                .inner
                .writer
                .write(vec![Op::JobPriority(job.clone(), priority)]);
            self.refill_sweeps(&mut state, now);
            durable
        };
        durable.await?;
        self.inner.wake.notify_waiters();
        Ok(())
    }

    fn job_flags(&self, job: &JobId) -> Result<JobFlags, QueueError> {
        self.state()
            .jobs
            .get(job.as_str())
            .copied()
            .ok_or_else(|| QueueError::NotFound(format!("job {job}")))
    }

    /// Durably pause or resume a job that is not cancelled.
    async fn set_paused(&self, job: &JobId, paused: bool) -> Result<(), QueueError> {
        let flags = self.job_flags(job)?;
        if flags.cancelled {
            return Err(QueueError::Conflict(format!("job {job} is cancelled")));
        }
        self.set_job_flags(job, JobFlags { paused, ..flags }).await
    }

    async fn set_job_flags(&self, job: &JobId, flags: JobFlags) -> Result<(), QueueError> {
        self.inner
            .writer
            .write(vec![Op::JobFlags {
                job: job.clone(),
                paused: flags.paused,
                cancelled: flags.cancelled,
                reason: None,
            }])
            .await?;
        self.state().jobs.insert(Arc::from(job.as_str()), flags);
        Ok(())
    }
}
