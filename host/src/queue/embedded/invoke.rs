//! Synchronous invocations on the embedded store (see
//! [`crate::queue::invocation`]). An invoked task goes into the ready
//! index at once, its insert held back from the writer: leased, the insert
//! joins the lease's deferred Allocated and Running, so an attempt that
//! ends within [`DEFER_MS`] is stored, insert and outcome, in one commit
//! (one fsync where there were two). A durable invocation's insert is sent
//! after [`DEFER_MS`] at the latest, as deferred operations are; a
//! non-durable one's waits for the outcome of the first attempt. The
//! attempt's end is handed to the caller as it ends, so nobody reads the
//! task back from the store.
//!
//! Nothing can name a held task before it is stored: its id is known only
//! to its caller, who is told it in a 202 only once the task is durable.
//! A crash loses held tasks exactly as it loses requests in flight: their
//! callers' connections drop, nobody was told they were accepted.

use super::journal::Journal;
use super::writer::{Notice, Op};
use super::{DEFER_MS, EmbeddedQueue, Store, entry_from_new};
use crate::model::{Millis, NewTask, TaskState, now_ms, now_us};
use crate::queue::QueueError;
use crate::queue::invocation::{Finished, Held, Invocation, Outcome};
use crate::queue::scheduler::ready::Entry;
use futures::future::BoxFuture;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use tokio::sync::oneshot;

/// Who waits for an ended attempt's operations, as
/// [`Invoked::hand_over`] left it.
pub(super) enum Answer {
    /// Nobody (no caller waits, or it has its answer already).
    Nobody,
    /// The caller, answered by the store's commit of the operations.
    AfterCommit,
    /// The caller, to be answered as soon as the operations are sent to
    /// the store (they are durable in the journal).
    Now(Notice),
}

impl Answer {
    /// Answer the caller now if it is to be (one answered by the commit
    /// is answered by its notice among the operations).
    pub(super) fn give(self) {
        if let Answer::Now(answer) = self {
            answer();
        }
    }
}

/// An invoked task whose caller waits, from its submission until its
/// first attempt ends (or its caller stops waiting).
pub(super) struct Invoked {
    /// The task's insert and the [`Op::Notify`] of its durability, while
    /// held back from the writer; empty once sent (or moved to its lease).
    insert: Vec<Op>,
    /// Answer only once the outcome is durable.
    durable: bool,
    /// Where the ended attempt goes.
    finished: Option<oneshot::Sender<Finished>>,
    /// When it entered each state so far (Pending: its submission).
    timestamps: BTreeMap<TaskState, Millis>,
}

impl Invoked {
    /// The attempt ended as `outcome`: hand it to the caller, at once if
    /// the invocation is not durable; if it is, once `ops` (its insert
    /// and transitions, with the outcome's last) are durable: in the
    /// `journal` if it takes them (the answer is then to be given once
    /// `ops` are sent on), else by an [`Op::Notify`] added to `ops` that
    /// fires once the store has committed them.
    pub(super) fn hand_over(
        mut self,
        mut outcome: Outcome,
        at: Millis,
        ops: &mut Vec<Op>,
        journal: Option<&Journal>,
    ) -> Answer {
        let Some(finished) = self.finished.take() else {
            return Answer::Nobody;
        };
        self.timestamps.insert(outcome.state, at);
        outcome.timestamps = std::mem::take(&mut self.timestamps);
        let finished = move || {
            let _ = finished.send(Finished { outcome });
        };
        if !self.durable {
            finished();
            return Answer::Nobody;
        }
        if let Some(journal) = journal
            && let Some(seq) = journal.append(ops)
        {
            ops.push(Op::Notify(journal.confirmation(seq)));
            return Answer::Now(Box::new(finished));
        }
        ops.push(Op::Notify(Box::new(finished)));
        Answer::AfterCommit
    }

    /// Its caller is no longer to be handed an attempt (the task ends
    /// another way): its held insert, if any, to send before that end.
    pub(super) fn into_insert(mut self) -> Vec<Op> {
        std::mem::take(&mut self.insert)
    }

    /// When it was submitted.
    fn submitted(&self) -> Millis {
        self.timestamps
            .get(&TaskState::Pending)
            .copied()
            .unwrap_or_default()
    }

    /// The task entered `state` at `at`.
    pub(super) fn entered(&mut self, state: TaskState, at: Millis) {
        self.timestamps.insert(state, at);
    }

    /// Give the held insert to the lease taking the task: its deferred
    /// operations start with it, deferred since the submission; `true` if
    /// they are to wait for the outcome (not durable).
    pub(super) fn take_insert(&mut self, since: &mut Millis) -> (Vec<Op>, bool) {
        if self.insert.is_empty() {
            return (Vec::new(), false);
        }
        *since = self.submitted();
        (std::mem::take(&mut self.insert), !self.durable)
    }

    /// The held insert of a durable invocation submitted at least
    /// [`DEFER_MS`] ago, to send now; whether one is still to wait.
    pub(super) fn due_insert(&mut self, now: Millis, due: &mut Vec<Op>) -> bool {
        if !self.durable || self.insert.is_empty() {
            return false;
        }
        if now.saturating_sub(self.submitted()) >= DEFER_MS {
            due.append(&mut self.insert);
            false
        } else {
            true
        }
    }
}

impl EmbeddedQueue {
    /// Accept an invoked task (see the module's comment).
    pub(super) fn invoke_task(
        &self,
        task: NewTask,
        durable: bool,
    ) -> Result<Invocation, QueueError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        if let Some(reason) = self.inner.health.failing() {
            return Err(QueueError::Unavailable(reason));
        }
        let now = now_ms();
        let tags = Arc::new(task.options.tags.clone());
        // The payload stays in memory: the store has no copy to read back.
        let entry = Entry {
            ready_us: now_us(),
            ..entry_from_new(&task, tags.clone(), now)
        };
        let id = entry.id.clone();
        let (stored_tx, stored) = oneshot::channel();
        let (finished_tx, finished) = oneshot::channel();
        let invoked = Invoked {
            insert: vec![
                Op::NewTasks(vec![(task, tags)], now),
                Op::Notify(Box::new(move || {
                    let _ = stored_tx.send(());
                })),
            ],
            durable,
            finished: Some(finished_tx),
            timestamps: BTreeMap::from([(TaskState::Pending, now)]),
        };
        {
            let mut state = self.state();
            state.invoked.insert(id.clone(), invoked);
            state.scheduler.ready.insert(entry, now);
        }
        // Workers first: the flusher is only a backstop for a long wait.
        self.inner.wake.notify_waiters();
        if durable {
            self.inner.flusher.wake();
        }
        Ok(Invocation {
            finished,
            held: Box::new(Hold {
                store: Arc::downgrade(&self.inner),
                id,
                stored: Some(stored),
            }),
        })
    }

    /// The caller stops waiting for `id`: store the task now if its insert
    /// is still held (in the index, or with a non-durable lease's deferred
    /// operations), and forget the invocation.
    fn stop_waiting(&self, id: &str) {
        let mut state = self.state();
        let Some(mut invoked) = state.invoked.remove(id) else {
            return;
        };
        let mut ops = std::mem::take(&mut invoked.insert);
        if let Some(leased) = state.scheduler.leased_mut(id)
            && leased.extra.until_outcome
        {
            leased.extra.until_outcome = false;
            ops.append(&mut leased.extra.ops);
        }
        if !ops.is_empty() {
            self.inner.writer.send(ops);
        }
    }
}

/// The embedded store's hold on an invocation.
struct Hold {
    store: Weak<Store>,
    id: Arc<str>,
    /// Fires once the task's insert is durable.
    stored: Option<oneshot::Receiver<()>>,
}

impl Hold {
    fn stop_waiting(&self) {
        if let Some(inner) = self.store.upgrade() {
            EmbeddedQueue { inner }.stop_waiting(&self.id);
        }
    }
}

impl Held for Hold {
    fn persist(mut self: Box<Self>) -> BoxFuture<'static, Result<(), QueueError>> {
        self.stop_waiting();
        let stored = self.stored.take();
        Box::pin(async move {
            match stored {
                Some(stored) => stored.await.map_err(|_| QueueError::Closed),
                None => Ok(()),
            }
        })
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.stop_waiting();
    }
}
