//! A fan-in task's input, read through the work queue the task was leased
//! from: the embedded store reads its own tables, a worker machine asks its
//! scheduler host. The runtime sees only [`ResultPages`].

use crate::model::JobId;
use crate::queue::WorkQueue;
use crate::runtime::{InputResult, ResultPages};
use async_trait::async_trait;
use std::sync::Arc;

/// The results of `job`, paged from `queue`.
pub(super) struct QueueInput {
    pub(super) queue: Arc<dyn WorkQueue>,
    pub(super) job: JobId,
}

#[async_trait]
impl ResultPages for QueueInput {
    async fn page(&self, after: u64, limit: usize) -> Result<Vec<InputResult>, String> {
        let page = self
            .queue
            .input_results(&self.job, after, limit)
            .await
            .map_err(|e| e.to_string())?;
        Ok(page
            .into_iter()
            .map(|r| InputResult {
                cursor: r.seq,
                task_id: r.task_id,
                result: r.result,
            })
            .collect())
    }
}
