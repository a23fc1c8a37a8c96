//! The one scheduler every backend uses: **where priority, affinity and
//! leasing are decided**. It holds what a host has to offer its workers in
//! memory; the backend around it makes every decision durable (the
//! embedded store's writer, or events on Kafka).
//!
//! - [`ready`] ranks waiting tasks: strict priority with aging, soft
//!   affinity with its window, delayed starts, held priority 0, paused jobs.
//! - [`Scheduler`] runs the pick loop for a free worker against the warm
//!   (module, affinity key) pairs of every worker, and keeps the lease
//!   table: tokens, expiry and renewal, Allocated/Running, cancellation.

pub(crate) mod ready;

use super::{Lease, QueueError, WorkerView};
use crate::model::{Millis, ModuleId, TaskState, now_us};
use ready::{Entry, Pick, Policy, ReadyIndex};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// Tags shared between a task's in-memory entry and its transitions.
pub(crate) type Tags = Arc<BTreeMap<String, String>>;

/// A task leased to a worker, with what the backend keeps beside it
/// (`X`: nothing on the embedded store, the offsets it was read from on Kafka).
pub(crate) struct Leased<X> {
    /// The task, its attempts counting this one.
    pub(crate) entry: Entry,
    /// The lease's token: a report under another token is stale.
    pub(crate) token: u64,
    /// The worker holding it.
    pub(crate) worker: String,
    /// When the lease lapses unless renewed (`None`: held while the host lives).
    pub(crate) expires: Option<Millis>,
    /// Allocated, then Running.
    pub(crate) state: TaskState,
    /// Fires when the task is cancelled while leased.
    pub(crate) cancelled: Arc<Notify>,
    /// The backend's own facts about this lease.
    pub(crate) extra: X,
}

/// What the scheduler offered a free worker.
// Returned by value from one offer and taken apart at once, never kept: a
// box would cost an allocation per lease for nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Offer<'a, X> {
    /// A lease, recorded in the table.
    Granted {
        /// What the worker runs.
        lease: Lease,
        /// The table's record of it.
        leased: &'a mut Leased<X>,
        /// The state the task waited in (Pending, or Error for a retry).
        from: TaskState,
        /// How long it waited to be leased, µs.
        wait_us: u64,
    },
    /// Nothing now; look again by this time (or when woken).
    Wait(Option<Millis>),
}

/// Ready index, workers' warm pairs and lease table of one host.
pub(crate) struct Scheduler<X> {
    /// The tasks waiting here.
    pub(crate) ready: ReadyIndex,
    leases: HashMap<Arc<str>, Leased<X>>,
    workers: HashMap<String, Vec<(ModuleId, String)>>,
    policy: Policy,
    /// How long a lease lives without a heartbeat (`None`: no expiry).
    lease_ttl: Option<Duration>,
    next_token: u64,
}

impl<X> Scheduler<X> {
    /// A scheduler ranking by `policy`, its leases lapsing after `lease_ttl`.
    pub(crate) fn new(policy: Policy, lease_ttl: Option<Duration>) -> Self {
        Scheduler {
            ready: ReadyIndex::default(),
            leases: HashMap::new(),
            workers: HashMap::new(),
            policy,
            lease_ttl,
            next_token: 0,
        }
    }

    fn expiry(&self, now: Millis) -> Option<Millis> {
        self.lease_ttl.map(|ttl| now + ttl.as_millis() as u64)
    }

    /// Offer `worker` the best waiting task: one warm on it first, none
    /// reserved for a worker warm elsewhere within the affinity window, an
    /// overdue higher priority before a warm one. The lease is recorded
    /// with `extra(&entry)` beside it.
    pub(crate) fn offer(
        &mut self,
        worker: &WorkerView,
        now: Millis,
        extra: impl FnOnce(&Entry) -> X,
    ) -> Offer<'_, X> {
        self.workers.insert(worker.id.clone(), worker.warm.clone());
        self.ready.promote_due(now);
        // Disjoint fields: the check reads `workers` while `ready` is picked
        // from, so no copy of every worker's warm set is made on this hot path.
        let workers = &self.workers;
        let check = |module: &ModuleId, key: &str| {
            workers
                .iter()
                .filter(|(id, _)| **id != worker.id)
                .any(|(_, warm)| warm.iter().any(|(m, k)| m == module && k == key))
        };
        let (entry, warm_hit) =
            match self
                .ready
                .pick(worker.pool.as_ref(), &worker.warm, &check, now, self.policy)
            {
                Pick::Task(entry, warm_hit) => (entry, warm_hit),
                Pick::Wait(at) => return Offer::Wait(at),
            };
        self.next_token += 1;
        let token = self.next_token;
        let cancelled = Arc::new(Notify::new());
        let lease = entry.lease(&worker.id, token, warm_hit, cancelled.clone());
        let from = entry.state;
        let wait_us = now_us().saturating_sub(entry.ready_us);
        let extra = extra(&entry);
        let attempts = entry.attempts + 1;
        let leased = Leased {
            entry: Entry { attempts, ..entry },
            token,
            worker: worker.id.clone(),
            expires: self.expiry(now),
            state: TaskState::Allocated,
            cancelled,
            extra,
        };
        let id = leased.entry.id.clone();
        let leased = self.leases.entry(id).insert_entry(leased).into_mut();
        Offer::Granted {
            lease,
            leased,
            from,
            wait_us,
        }
    }

    /// Forget a worker that is gone (its warm pairs reserve nothing any more).
    pub(crate) fn forget_worker(&mut self, worker: &str) {
        self.workers.remove(worker);
    }

    /// The lease of `id` if `token` still holds it.
    pub(crate) fn held(&mut self, id: &str, token: u64) -> Option<&mut Leased<X>> {
        self.leases.get_mut(id).filter(|l| l.token == token)
    }

    /// The leased task started running; `None` if the lease is stale.
    pub(crate) fn start(&mut self, id: &str, token: u64) -> Option<&mut Leased<X>> {
        let leased = self.held(id, token)?;
        leased.state = TaskState::Running;
        Some(leased)
    }

    /// Keep a lease alive for another `lease_ttl`.
    pub(crate) fn renew(&mut self, id: &str, token: u64, now: Millis) -> Result<(), QueueError> {
        let expires = self.expiry(now);
        let leased = self
            .held(id, token)
            .ok_or_else(|| QueueError::StaleLease(id.to_string()))?;
        leased.expires = expires;
        Ok(())
    }

    /// End a lease (its task completed, failed or was given back); a stale
    /// token is refused.
    pub(crate) fn take(&mut self, id: &str, token: u64) -> Result<Leased<X>, QueueError> {
        match self.leases.get(id) {
            Some(l) if l.token == token => Ok(self.leases.remove(id).expect("present")),
            _ => Err(QueueError::StaleLease(id.to_string())),
        }
    }

    /// Leases not renewed in time, removed from the table (their tasks are
    /// to be offered again).
    pub(crate) fn expire(&mut self, now: Millis) -> Vec<Leased<X>> {
        let expired: Vec<Arc<str>> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires.is_some_and(|at| at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        expired
            .iter()
            .filter_map(|id| self.leases.remove(id))
            .collect()
    }

    /// Every lease, to update what the backend keeps beside each.
    pub(crate) fn leases_mut(&mut self) -> impl Iterator<Item = &mut Leased<X>> {
        self.leases.values_mut()
    }

    /// Whether a task is leased here.
    pub(crate) fn is_leased(&self, id: &str) -> bool {
        self.leases.contains_key(id)
    }

    /// The lease of a task, whatever its token.
    pub(crate) fn leased_mut(&mut self, id: &str) -> Option<&mut Leased<X>> {
        self.leases.get_mut(id)
    }

    /// Tell the worker running `id` to stop; false if it is not leased here.
    pub(crate) fn cancel_leased(&self, id: &str) -> bool {
        self.leases
            .get(id)
            .map(|l| l.cancelled.notify_one())
            .is_some()
    }

    /// Tell the workers running a job's tasks to stop.
    pub(crate) fn cancel_leased_job(&self, job: &str) {
        for leased in self.leases_of(job) {
            leased.cancelled.notify_one();
        }
    }

    /// Record a new priority on the leases of a job's tasks (what a retry
    /// of theirs waits with).
    pub(crate) fn set_leased_job_priority(&mut self, job: &str, priority: u8) {
        for leased in self.leases.values_mut() {
            if leased.entry.job.as_deref() == Some(job) {
                leased.entry.priority = priority;
            }
        }
    }

    /// Whether any task of a job is leased here.
    pub(crate) fn has_leases_of(&self, job: &str) -> bool {
        self.leases_of(job).next().is_some()
    }

    fn leases_of<'a>(&'a self, job: &'a str) -> impl Iterator<Item = &'a Leased<X>> + 'a {
        self.leases
            .values()
            .filter(move |l| l.entry.job.as_deref() == Some(job))
    }
}
