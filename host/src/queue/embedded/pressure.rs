//! What the store's writer tells the rest of the host about itself:
//! whether writes commit ([`StoreHealth`]), and how far what it was given
//! is ahead of what is durable ([`Backlog`], the back-pressure on leasing).

use super::writer::Op;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether the store takes writes. Set by the writer when a transaction
/// fails (a full disk, an I/O error) and cleared when a retry commits; read
/// by leasing (which stops while the store fails), `/healthz` and submits.
#[derive(Default)]
pub(crate) struct StoreHealth {
    failing: std::sync::Mutex<Option<String>>,
    /// Told of every change between failing and healthy.
    pub(crate) changed: tokio::sync::Notify,
}

impl StoreHealth {
    /// Why writes fail, if they do.
    pub(crate) fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn set(&self, failing: Option<String>) {
        let mut current = self.failing.lock().unwrap_or_else(|p| p.into_inner());
        if current.is_some() != failing.is_some() {
            match &failing {
                Some(reason) => {
                    tracing::error!(reason = %reason, "store writes fail; leasing stopped, submits refused until a retry commits")
                }
                None => tracing::warn!("store writes commit again; leasing resumed"),
            }
            *current = failing;
            drop(current);
            self.changed.notify_waiters();
        } else {
            *current = failing;
        }
    }
}

/// Operations and bytes one command holds in the writer's queue.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Weight {
    ops: usize,
    bytes: usize,
}

impl Weight {
    pub(super) fn of(ops: &[Op]) -> Self {
        let bytes = ops
            .iter()
            .map(|op| match op {
                Op::Transition(t) => t.carried.result.as_ref().map_or(0, Vec::len),
                Op::NewTasks(tasks, _) => tasks.iter().map(|(t, _)| t.payload.len()).sum(),
                Op::Module(_, bytes) => bytes.len(),
                _ => 0,
            })
            .sum();
        Weight {
            ops: ops.len(),
            bytes,
        }
    }
}

/// What the writer has been given and not yet made durable (or refused):
/// how far the host's memory is ahead of its store. Leasing waits while it
/// is over [`Backlog::is_over`]'s bound, so workers run only as fast as
/// their outcomes become durable and a crash re-runs at most that window.
#[derive(Default)]
pub(crate) struct Backlog {
    ops: AtomicUsize,
    bytes: AtomicUsize,
    /// Commands queued or being written (an empty one, a flush, counts).
    commands: AtomicUsize,
    /// Told whenever a batch leaves the queue.
    pub(crate) drained: tokio::sync::Notify,
}

/// Operations (about three per task run: Allocated, Running, the outcome)
/// the writer may hold before leasing waits: about 2,048 tasks' worth (halving it from 12,288 cost no throughput).
pub const MAX_BACKLOG_OPS: usize = 6_144;
/// Result and payload bytes the writer may hold before leasing waits.
pub const MAX_BACKLOG_BYTES: usize = 16 << 20;

impl Backlog {
    pub(super) fn add(&self, weight: Weight) {
        self.commands.fetch_add(1, Ordering::SeqCst);
        self.ops.fetch_add(weight.ops, Ordering::AcqRel);
        self.bytes.fetch_add(weight.bytes, Ordering::AcqRel);
    }

    pub(super) fn remove(&self, weight: Weight) {
        self.ops.fetch_sub(weight.ops, Ordering::AcqRel);
        self.bytes.fetch_sub(weight.bytes, Ordering::AcqRel);
        self.commands.fetch_sub(1, Ordering::SeqCst);
    }

    /// Commands given to the writer and not yet durable (or refused).
    pub(super) fn commands(&self) -> usize {
        self.commands.load(Ordering::SeqCst)
    }

    /// Operations not yet durable.
    pub(crate) fn ops(&self) -> usize {
        self.ops.load(Ordering::Acquire)
    }

    /// Whether the store is too far behind for more work to be leased.
    pub(crate) fn is_over(&self) -> bool {
        self.ops() >= MAX_BACKLOG_OPS || self.bytes.load(Ordering::Acquire) >= MAX_BACKLOG_BYTES
    }
}
