//! Synchronous invocation (`POST /v1/tasks?wait=2s`): callers waiting for
//! a task they just submitted to finish. The store tells this observer of
//! every committed batch; a finished task with a caller waiting wakes it,
//! so the answer carries the result as soon as it is durable, with no
//! polling. Nothing is kept per task once its caller is answered or gone.

use crate::model::{TaskId, TaskState};
use crate::queue::{CommitObserver, Committed};
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::oneshot;

/// Callers waiting for their task to finish, by task.
#[derive(Default)]
pub struct Waiters {
    waiting: Mutex<HashMap<TaskId, oneshot::Sender<TaskState>>>,
    /// How many wait (read without the lock on every commit).
    count: AtomicUsize,
}

/// A caller's place in [`Waiters`]; leaving (answered or not) frees it.
pub struct Waiting<'a> {
    waiters: &'a Waiters,
    task: TaskId,
    /// Fires with the state the task finished in.
    pub finished: oneshot::Receiver<TaskState>,
}

impl Waiters {
    /// Wait for `task` to finish (register before submitting it, so its
    /// end cannot slip by).
    pub fn wait_for(&self, task: &str) -> Waiting<'_> {
        let (tx, rx) = oneshot::channel();
        let mut waiting = self.lock();
        waiting.insert(task.to_string(), tx);
        self.count.store(waiting.len(), Ordering::Release);
        Waiting {
            waiters: self,
            task: task.to_string(),
            finished: rx,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TaskId, oneshot::Sender<TaskState>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Callers waiting now.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.waiters.lock();
        waiting.remove(&self.task);
        self.waiters.count.store(waiting.len(), Ordering::Release);
    }
}

impl CommitObserver for Waiters {
    fn committed(&self, batch: &[Committed]) {
        if self.is_empty() {
            return;
        }
        let mut waiting = self.lock();
        for committed in batch {
            let state = committed.event.state;
            if matches!(
                state,
                TaskState::Completed | TaskState::Dead | TaskState::Cancelled
            ) && let Some(tx) = waiting.remove(&committed.event.task_id)
            {
                let _ = tx.send(state);
            }
        }
        self.count.store(waiting.len(), Ordering::Release);
    }
}
