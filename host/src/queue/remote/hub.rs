//! The scheduler host's side of the worker protocol: the workers that
//! registered, and the leases they hold over the wire. It stands between
//! the HTTP handlers and the store's work trait, and is what makes a
//! remote lease safe to lose: a lease not renewed within the lease time
//! is given back to the store (the task goes to another worker), and any
//! report under it is refused. Every backend works under it (leases on a
//! Kafka host never lapse by themselves; here they do).

use super::wire::{
    Completed, Failed, Heartbeat, HeartbeatReply, LeaseRef, LeaseRequest, Refused, Register,
    Registration, Released, RemoteWorkerView, Report, ReportReply, WireLease,
};
use crate::model::{Millis, ModuleId, TaskId, now_ms};
use crate::queue::{Completion, Failure, Lease, WorkQueue, WorkerView};
use base64::Engine as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a worker's request was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// The worker id is not registered (never was, or the host restarted,
    /// or it went silent for too long): register again.
    #[error("worker {0} is not registered here: register again (POST /v1/workers)")]
    UnknownWorker(String),
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// The host is shutting down.
    #[error("the host is shutting down")]
    Closed,
}

/// How the hub times leases and retries.
#[derive(Clone)]
pub struct HubConfig {
    /// A lease not renewed for this long is given back to the store.
    pub lease_ttl: Duration,
    /// Delay before the next attempt after failed attempt N, when the
    /// worker leaves it to the host (the dispatcher's backoff).
    pub retry_delay: Arc<dyn Fn(u32) -> Duration + Send + Sync>,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

struct Held {
    lease: Lease,
    worker: String,
    expires: Millis,
    cancelled: bool,
}

struct Remote {
    name: String,
    address: String,
    slots: u32,
    kind: Option<ModuleId>,
    warm: Vec<(ModuleId, String)>,
    registered_at: Millis,
    last_seen: Millis,
    /// Lease requests of this worker being answered now.
    polling: usize,
    leased: usize,
    completed: u64,
    failed: u64,
}

#[derive(Default)]
struct HubState {
    workers: HashMap<String, Remote>,
    leases: HashMap<TaskId, Held>,
}

/// Registered remote workers and their leases (see the module comment).
pub struct Hub {
    queue: Arc<dyn WorkQueue>,
    config: HubConfig,
    state: Mutex<HubState>,
    /// Set when the host stops: long polls end at once, empty.
    closing: tokio::sync::watch::Sender<bool>,
}

/// Most tasks in one lease answer.
pub const MAX_LEASE_BATCH: u32 = 1024;
/// Longest long poll, ms.
pub const MAX_WAIT_MS: u64 = 60_000;

impl Hub {
    /// A hub leasing from `queue`; [`Hub::start_reaper`] makes leases lapse.
    pub fn new(queue: Arc<dyn WorkQueue>, config: HubConfig) -> Arc<Self> {
        Arc::new(Hub {
            queue,
            config,
            state: Mutex::new(HubState::default()),
            closing: tokio::sync::watch::Sender::new(false),
        })
    }

    /// The host is stopping: answer every long poll now (empty) and lease
    /// nothing more, so the HTTP server's graceful stop is not held up by
    /// polls that would wait their full time.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ttl_ms(&self) -> u64 {
        self.config.lease_ttl.as_millis() as u64
    }

    /// Give back lapsed leases and forget silent workers, every quarter of
    /// the lease time, on the current runtime, for as long as the hub lives.
    pub fn start_reaper(self: &Arc<Self>) {
        let hub = Arc::downgrade(self);
        let period = (self.config.lease_ttl / 4).max(Duration::from_millis(50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(hub) = hub.upgrade() else { return };
                hub.reap(now_ms());
            }
        });
    }

    /// Leases not renewed by `now` go back to the store; workers silent
    /// for twice the lease time (and not polling) are forgotten.
    pub fn reap(&self, now: Millis) {
        let (lapsed, gone) = {
            let mut state = self.lock();
            let lapsed: Vec<TaskId> = state
                .leases
                .iter()
                .filter(|(_, h)| h.expires <= now)
                .map(|(id, _)| id.clone())
                .collect();
            let lapsed: Vec<Held> = lapsed
                .iter()
                .filter_map(|id| state.leases.remove(id))
                .collect();
            for held in &lapsed {
                if let Some(w) = state.workers.get_mut(&held.worker) {
                    w.leased = w.leased.saturating_sub(1);
                }
            }
            let silent = 2 * self.ttl_ms();
            let gone: Vec<String> = state
                .workers
                .iter()
                .filter(|(_, w)| {
                    w.polling == 0 && w.leased == 0 && now.saturating_sub(w.last_seen) > silent
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &gone {
                state.workers.remove(id);
            }
            (lapsed, gone)
        };
        for held in lapsed {
            tracing::info!(task = %held.lease.task_id, worker = %held.worker, "remote lease lapsed; the task goes to another worker");
            self.queue.release(&held.lease, false);
        }
        for id in gone {
            self.queue.forget_worker(&id);
        }
    }

    /// Register a worker; `address` is where its request came from.
    pub fn register(&self, request: Register, address: String) -> Result<Registration, HubError> {
        let name = request.name.trim();
        if name.is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
            return Err(HubError::Invalid(
                "name: must be 1 to 128 characters, no control characters".into(),
            ));
        }
        if !(1..=4096).contains(&request.slots) {
            return Err(HubError::Invalid("slots: must be 1..=4096".into()));
        }
        let kind = match &request.kind {
            None => None,
            Some(kind) => Some(ModuleId::external(kind).ok_or_else(|| {
                HubError::Invalid(format!(
                    "kind: {kind:?} is not `external:NAME` (NAME: 1-64 letters, digits, '-', '_' or '.')"
                ))
            })?),
        };
        let warm = warm_pairs(request.warm)?;
        let suffix: u32 = rand::random();
        let worker_id = format!("{name}-{suffix:08x}");
        let now = now_ms();
        self.lock().workers.insert(
            worker_id.clone(),
            Remote {
                name: name.to_string(),
                address,
                slots: request.slots,
                kind,
                warm,
                registered_at: now,
                last_seen: now,
                polling: 0,
                leased: 0,
                completed: 0,
                failed: 0,
            },
        );
        tracing::info!(worker = %worker_id, slots = request.slots, "remote worker registered");
        Ok(Registration {
            worker_id,
            lease_ms: self.ttl_ms(),
            heartbeat_ms: (self.ttl_ms() / 3).clamp(50, 2_000),
        })
    }

    /// Forget a worker and give its leases back (a worker stopping cleanly).
    pub fn deregister(&self, worker: &str) -> Result<(), HubError> {
        let leases: Vec<Held> = {
            let mut state = self.lock();
            state
                .workers
                .remove(worker)
                .ok_or_else(|| HubError::UnknownWorker(worker.to_string()))?;
            let ids: Vec<TaskId> = state
                .leases
                .iter()
                .filter(|(_, h)| h.worker == worker)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter()
                .filter_map(|id| state.leases.remove(id))
                .collect()
        };
        for held in leases {
            self.queue.release(&held.lease, false);
        }
        self.queue.forget_worker(worker);
        Ok(())
    }

    /// Lease up to `request.max` tasks for `worker`, waiting up to
    /// `request.wait_ms` for the first. Ends early, empty, when the host
    /// stops; when the caller hangs up, what it leased goes straight back.
    pub async fn lease(
        self: &Arc<Self>,
        worker: &str,
        request: LeaseRequest,
    ) -> Result<Vec<WireLease>, HubError> {
        if !(1..=MAX_LEASE_BATCH).contains(&request.max) {
            return Err(HubError::Invalid(format!(
                "max: must be 1..={MAX_LEASE_BATCH}"
            )));
        }
        if request.wait_ms > MAX_WAIT_MS {
            return Err(HubError::Invalid(format!(
                "wait_ms: must be 0..={MAX_WAIT_MS}"
            )));
        }
        let warm = warm_pairs(request.warm)?;
        let view = {
            let mut state = self.lock();
            let remote = state
                .workers
                .get_mut(worker)
                .ok_or_else(|| HubError::UnknownWorker(worker.to_string()))?;
            remote.polling += 1;
            remote.last_seen = now_ms();
            remote.warm = warm.clone();
            WorkerView {
                id: worker.to_string(),
                warm,
                pool: remote.kind.clone(),
            }
        };
        let hub = self.clone();
        let max = request.max as usize;
        let wait = Duration::from_millis(request.wait_ms);
        // Spawned, so a caller that hangs up mid-poll cannot drop a lease
        // between the store granting it and the table recording it; the
        // poll ends when the caller is gone, and what it got meanwhile
        // goes straight back to the store.
        let (caller, mut gone) = tokio::sync::oneshot::channel::<()>();
        let mut closing = self.closing.subscribe();
        if *closing.borrow() {
            return Err(HubError::Closed);
        }
        let leased = tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = closing.wait_for(|closed| *closed) => {
                    hub.abandoned(&view.id, &[]);
                    Ok(Vec::new())
                }
                leases = hub.queue.lease_batch(&view, max, wait) => {
                    if matches!(gone.try_recv(), Err(tokio::sync::oneshot::error::TryRecvError::Closed)) {
                        hub.abandoned(&view.id, &leases);
                        return Err(HubError::Closed);
                    }
                    hub.record(&view.id, leases)
                }
                _ = &mut gone => {
                    hub.abandoned(&view.id, &[]);
                    Err(HubError::Closed)
                }
            }
        });
        let answer = leased.await.unwrap_or(Err(HubError::Closed));
        drop(caller);
        answer
    }

    /// A poll whose caller hung up: its leases go back at once.
    fn abandoned(&self, worker: &str, leases: &[Lease]) {
        if let Some(remote) = self.lock().workers.get_mut(worker) {
            remote.polling = remote.polling.saturating_sub(1);
        }
        for lease in leases {
            self.queue.release(lease, false);
        }
    }

    fn record(&self, worker: &str, leases: Vec<Lease>) -> Result<Vec<WireLease>, HubError> {
        let now = now_ms();
        let mut state = self.lock();
        let Some(remote) = state.workers.get_mut(worker) else {
            // Deregistered while it polled: the tasks go straight back.
            drop(state);
            for lease in &leases {
                self.queue.release(lease, false);
            }
            return Err(HubError::UnknownWorker(worker.to_string()));
        };
        remote.polling = remote.polling.saturating_sub(1);
        remote.last_seen = now;
        remote.leased += leases.len();
        let expires = now + self.ttl_ms();
        let engine = base64::engine::general_purpose::STANDARD;
        let mut wire = Vec::with_capacity(leases.len());
        for lease in leases {
            wire.push(WireLease {
                task_id: lease.task_id.clone(),
                token: lease.token,
                job_id: lease.job_id.clone(),
                module: lease.module.to_string(),
                payload_base64: engine.encode(&lease.payload),
                affinity: lease.affinity.clone(),
                attempt: lease.attempt,
                max_attempts: lease.max_attempts,
                timeout_ms: lease.timeout.as_millis() as u64,
                memory_bytes: lease.memory_bytes,
                queued_at: lease.queued_at,
                warm_hit: lease.warm_hit,
                results_of: lease.results_of.clone(),
            });
            state.leases.insert(
                lease.task_id.clone(),
                Held {
                    lease,
                    worker: worker.to_string(),
                    expires,
                    cancelled: false,
                },
            );
        }
        Ok(wire)
    }

    /// Renew the leases a worker still holds; say which were cancelled
    /// and which are no longer its own.
    pub fn heartbeat(&self, worker: &str, beat: Heartbeat) -> Result<HeartbeatReply, HubError> {
        let now = now_ms();
        let mut reply = HeartbeatReply::default();
        let mut renew = Vec::new();
        {
            let mut state = self.lock();
            let remote = state
                .workers
                .get_mut(worker)
                .ok_or_else(|| HubError::UnknownWorker(worker.to_string()))?;
            remote.last_seen = now;
            for LeaseRef { task_id, token } in beat.leases {
                match state.leases.get_mut(&task_id) {
                    Some(held) if held.token_is(worker, token) => {
                        held.expires = now + self.ttl_ms();
                        if !held.cancelled
                            && futures::FutureExt::now_or_never(held.lease.cancelled.notified())
                                .is_some()
                        {
                            held.cancelled = true;
                        }
                        if held.cancelled {
                            reply.cancelled.push(task_id);
                        }
                        renew.push(held.lease.clone());
                        reply.renewed += 1;
                    }
                    _ => reply.stale.push(task_id),
                }
            }
        }
        for lease in renew {
            let _ = self.queue.heartbeat(&lease);
        }
        Ok(reply)
    }

    /// Record a batch of outcomes; items under a lease no longer held are
    /// refused, the rest recorded.
    pub fn report(&self, worker: &str, report: Report) -> ReportReply {
        let mut reply = ReportReply::default();
        for started in report.started {
            match self.held(worker, &started.task_id, started.token) {
                Some(lease) => {
                    self.queue.started(&lease);
                    reply.recorded += 1;
                }
                None => reply.refused.push(stale(&started.task_id)),
            }
        }
        for done in report.completed {
            let outcome = self.complete(worker, done);
            reply.tally(outcome);
        }
        for failed in report.failed {
            let outcome = self.fail(worker, failed);
            reply.tally(outcome);
        }
        for Released {
            task_id,
            token,
            cancelled,
        } in report.released
        {
            match self.take(worker, &task_id, token) {
                Some(lease) => {
                    self.queue.release(&lease, cancelled);
                    reply.recorded += 1;
                }
                None => reply.refused.push(stale(&task_id)),
            }
        }
        reply
    }

    fn complete(&self, worker: &str, done: Completed) -> Result<(), Refused> {
        let result = match (&done.result_base64, done.result) {
            (Some(_), Some(_)) => {
                return Err(refused(
                    &done.task_id,
                    "invalid_result",
                    "send result or result_base64, not both",
                ));
            }
            (Some(b64), None) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| {
                    refused(
                        &done.task_id,
                        "invalid_result",
                        &format!("result_base64: {e}"),
                    )
                })?,
            (None, Some(text)) => text.into_bytes(),
            (None, None) => Vec::new(),
        };
        let lease = self
            .take(worker, &done.task_id, done.token)
            .ok_or_else(|| stale(&done.task_id))?;
        let completion = Completion {
            result,
            logs: done.logs,
            progress: done.progress.clamp(0.0, 1.0),
            run_us: done.run_us,
        };
        self.queue
            .complete(&lease, completion)
            .map_err(|e| refused(&done.task_id, "stale_lease", &e.to_string()))?;
        self.count(worker, true);
        Ok(())
    }

    fn fail(&self, worker: &str, failed: Failed) -> Result<(), Refused> {
        let lease = self
            .take(worker, &failed.task_id, failed.token)
            .ok_or_else(|| stale(&failed.task_id))?;
        let retryable = !failed.is_final
            && failed.kind != crate::model::ErrorKind::InvalidModule
            && lease.attempt < lease.max_attempts;
        let delay = failed
            .retry_after_ms
            .map(Duration::from_millis)
            .unwrap_or_else(|| (self.config.retry_delay)(lease.attempt));
        let failure = Failure {
            kind: failed.kind,
            message: failed.message,
            logs: failed.logs,
            run_us: failed.run_us,
            retry_at: retryable.then(|| now_ms() + delay.as_millis() as u64),
        };
        self.queue
            .fail(&lease, failure)
            .map_err(|e| refused(&failed.task_id, "stale_lease", &e.to_string()))?;
        self.count(worker, false);
        Ok(())
    }

    fn count(&self, worker: &str, completed: bool) {
        if let Some(w) = self.lock().workers.get_mut(worker) {
            if completed {
                w.completed += 1;
            } else {
                w.failed += 1;
            }
        }
    }

    /// The lease of `task` if `worker` holds it under `token`.
    fn held(&self, worker: &str, task: &str, token: u64) -> Option<Lease> {
        let state = self.lock();
        let held = state.leases.get(task)?;
        held.token_is(worker, token).then(|| held.lease.clone())
    }

    /// End `worker`'s lease of `task` under `token`, if it holds it.
    fn take(&self, worker: &str, task: &str, token: u64) -> Option<Lease> {
        let mut state = self.lock();
        if !state.leases.get(task)?.token_is(worker, token) {
            return None;
        }
        let held = state.leases.remove(task)?;
        if let Some(w) = state.workers.get_mut(worker) {
            w.leased = w.leased.saturating_sub(1);
        }
        Some(held.lease)
    }

    /// Every registered worker, for `GET /v1/workers` and the dashboard.
    pub fn workers(&self) -> Vec<RemoteWorkerView> {
        let state = self.lock();
        // One pass over the leases: each worker's least recently renewed one.
        let mut current: HashMap<&str, &Held> = HashMap::new();
        for held in state.leases.values() {
            let slot = current.entry(held.worker.as_str()).or_insert(held);
            if held.expires < slot.expires {
                *slot = held;
            }
        }
        let mut views: Vec<RemoteWorkerView> = state
            .workers
            .iter()
            .map(|(id, w)| RemoteWorkerView {
                worker_id: id.clone(),
                name: w.name.clone(),
                address: w.address.clone(),
                slots: w.slots,
                kind: w.kind.as_ref().map(ToString::to_string),
                leased: w.leased,
                current_task: current.get(id.as_str()).map(|h| h.lease.task_id.clone()),
                completed: w.completed,
                failed: w.failed,
                registered_at: w.registered_at,
                last_seen: w.last_seen,
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name).then(a.worker_id.cmp(&b.worker_id)));
        views
    }

    /// A module's bytes for a worker (content-addressed: it checks the hash).
    pub fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        self.queue.module_bytes(id)
    }
}

/// Warm pairs as a worker sends them, checked: at most 4096, module ids
/// (or external kinds).
fn warm_pairs(pairs: Vec<super::wire::WarmPair>) -> Result<Vec<(ModuleId, String)>, HubError> {
    if pairs.len() > 4096 {
        return Err(HubError::Invalid("warm: at most 4096 pairs".into()));
    }
    pairs
        .into_iter()
        .map(|pair| {
            ModuleId::read(&pair.module)
                .map(|module| (module, pair.key))
                .ok_or_else(|| {
                    HubError::Invalid(format!("warm: {:?} is not a module id", pair.module))
                })
        })
        .collect()
}

impl Held {
    fn token_is(&self, worker: &str, token: u64) -> bool {
        self.lease.token == token && self.worker == worker
    }
}

impl ReportReply {
    fn tally(&mut self, outcome: Result<(), Refused>) {
        match outcome {
            Ok(()) => self.recorded += 1,
            Err(refused) => self.refused.push(refused),
        }
    }
}

fn stale(task: &str) -> Refused {
    refused(
        task,
        "stale_lease",
        "the lease is no longer held (it lapsed, or the task went to another worker)",
    )
}

fn refused(task: &str, code: &str, message: &str) -> Refused {
    Refused {
        task_id: task.to_string(),
        code: code.to_string(),
        message: message.to_string(),
    }
}
