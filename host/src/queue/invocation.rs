//! Synchronous invocation, the queue's side: a task whose caller waits in
//! the request for it to finish (`POST /v1/tasks?wait=`). A backend that
//! can, hands the finished attempt straight to the caller instead of
//! making it read the task back from the store, and stores the task's
//! whole first attempt (insert, Allocated, Running and outcome) in one
//! commit instead of two: on a disk with a 0.3 ms fsync that is most of a
//! no-op invocation's latency.

use super::QueueError;
use crate::model::{ErrorKind, LogLine, Millis, TaskState};
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use tokio::sync::oneshot;

/// The attempt that ended a task, as the backend knew it when it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Completed or Dead.
    pub state: TaskState,
    /// Attempts started, this one counted.
    pub attempts: u32,
    /// The worker that ran it.
    pub worker: String,
    /// When it entered each state.
    pub timestamps: BTreeMap<TaskState, Millis>,
    /// For Dead: why.
    pub error: Option<(ErrorKind, String)>,
    /// For Completed: the result bytes.
    pub result: Option<Vec<u8>>,
    /// The attempt's guest log lines.
    pub logs: Vec<LogLine>,
    /// Latest progress the guest reported.
    pub progress: f32,
}

/// An ended attempt handed to the waiting caller, once it may be
/// answered: for a durable invocation only after its outcome is durable
/// (handed over by the commit itself, so the caller wakes once, not once
/// for the outcome and again for its durability).
pub struct Finished {
    /// How it ended.
    pub outcome: Outcome,
}

/// The backend's hold on an invocation while its caller waits.
pub trait Held: Send {
    /// Make sure the task is stored (it runs as any other task after) and
    /// wait until it is durable: what a caller is owed before it is given
    /// the task's id to look up later.
    fn persist(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>>;
}

/// A task submitted by a caller who waits for it. Dropping it (the caller
/// hung up) stores the task if it is not yet stored: it still runs.
pub struct Invocation {
    /// Fires with the first attempt that ends the task, as it ends. A
    /// backend without the fast path, or a task that took another path (a
    /// retry, a cancel, a lease that lapsed), drops the sender: the caller
    /// then learns the end from the store's commits.
    pub finished: oneshot::Receiver<Finished>,
    /// The backend's hold.
    pub held: Box<dyn Held>,
}

/// The hold of a backend that stores an invocation as any other task
/// before it returns: nothing left to persist.
pub struct AlreadyStored;

impl Held for AlreadyStored {
    fn persist(self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        Box::pin(async { Ok(()) })
    }
}

impl Invocation {
    /// An invocation already stored, whose end comes from the store's commits.
    pub fn stored() -> Self {
        let (_, finished) = oneshot::channel();
        Invocation {
            finished,
            held: Box::new(AlreadyStored),
        }
    }
}
