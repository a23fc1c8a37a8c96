//! The user's controls on a Kafka grid ([`Control`](crate::queue::Control)):
//! each is published as a control event on the event topic, so whichever
//! host holds the job's or the task's work acts on it, and applied here at
//! once.

use super::KafkaQueue;
use super::wire::{self, EventMessage};
use crate::model::{JobId, TaskId};
use crate::queue::{Control, QueueError, ReadStore, WorkQueue};

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
            })
            .await?;
        self.shared.view.flush().await
    }
}
