//! The worker machine's side of the protocol: [`RemoteQueue`] is the work
//! trait over HTTP, so `kwq worker` runs the very dispatcher and runtime
//! of `kwq serve` against a scheduler host elsewhere.
//!
//! Three loops keep the round trips few: a fetcher long-polls for batches
//! of leases (as many as the workers here can run soon: the slots, plus
//! about 20 ms of work each at the recent mean run time, so a no-op job
//! leases hundreds per request and a 10-second job one per slot); a
//! reporter sends every outcome that accumulated while the previous
//! report was in flight in one request; a heartbeater renews every held
//! lease in one request and stops tasks the host says were cancelled or
//! lost. Workers never run ahead of the host: what is held is bounded, and
//! a worker cut off from the host for longer than the lease time stops its
//! tasks (their leases have lapsed and gone to other workers).

use super::wire::{
    Heartbeat, HeartbeatReply, LeaseBatch, LeaseRef, LeaseRequest, Register, Registration,
    Released, Report, ResultPage, WarmPair, WireLease,
};
use crate::model::{JobId, JobRecord, ModuleId, NewJob, NewTask, TaskId};
use crate::queue::{
    Completion, Control, Failure, Lease, ModuleRecord, QueueError, TaskResult, WorkQueue,
    WorkerView,
};
use async_trait::async_trait;
use base64::Engine as _;
use reqwest::StatusCode;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Where the scheduler host is and who this worker is.
#[derive(Debug, Clone)]
pub struct RemoteConfig {
    /// The host's base URL, e.g. `http://10.0.0.5:8080`.
    pub server: String,
    /// The host's worker token (`--worker-token`), if it wants one.
    pub token: Option<String>,
    /// This machine's name, shown on the host's dashboard.
    pub name: String,
    /// Tasks run here at once (the dispatcher's workers).
    pub slots: usize,
    /// Where fetched module bytes are kept (content-addressed), if anywhere.
    pub module_dir: Option<PathBuf>,
}

/// The work trait over the worker protocol (see the module comment).
#[derive(Clone)]
pub struct RemoteQueue {
    inner: Arc<Inner>,
}

struct Inner {
    config: RemoteConfig,
    http: reqwest::Client,
    handle: tokio::runtime::Handle,
    state: Mutex<ClientState>,
    /// Wakes the fetcher: a worker here waits, or room opened.
    fetch: Notify,
    /// Wakes waiting workers: leases arrived (or the queue closed).
    arrived: Notify,
    /// Wakes the reporter: outcomes to send.
    report: Notify,
    /// Wakes `flush`: a report was sent.
    sent: Notify,
    /// Wakes loops that wait for a registration.
    registered: Notify,
    closed: AtomicBool,
    /// Fires once on close: a long poll in flight is dropped, not waited out.
    closing: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct ClientState {
    registration: Option<Registration>,
    /// Leases fetched and not yet handed to a worker, best first.
    buffer: VecDeque<Lease>,
    /// Every lease held (buffered or running), by task.
    held: HashMap<TaskId, Lease>,
    /// Held leases already told to stop.
    stopped: HashSet<TaskId>,
    /// Workers here waiting for a lease.
    waiting: usize,
    /// What each worker here has warm.
    warm: HashMap<String, Vec<(ModuleId, String)>>,
    /// Outcomes not yet sent.
    pending: Report,
    /// A report is in flight.
    sending: bool,
    /// Since when the host has not answered, if it has not.
    unreachable_since: Option<Instant>,
    last_error: Option<String>,
    /// Recent mean run time, µs (0: none seen yet).
    mean_run_us: f64,
}

/// Most leases held beyond the slots.
const MAX_AHEAD: usize = 1024;
/// Work, in µs of mean run time, fetched ahead per slot.
const AHEAD_US: f64 = 20_000.0;
/// How long a lease request waits for the first task.
const LONG_POLL_MS: u64 = 20_000;

impl ClientState {
    /// Leases worth holding beyond the slots, from the recent run time.
    fn ahead(&self, slots: usize) -> usize {
        if self.mean_run_us <= 0.0 {
            return slots;
        }
        ((slots as f64 * AHEAD_US / self.mean_run_us.max(1.0)) as usize).min(MAX_AHEAD)
    }

    fn seen_run(&mut self, run_us: u64) {
        let run = run_us.max(1) as f64;
        self.mean_run_us = if self.mean_run_us <= 0.0 {
            run
        } else {
            0.9 * self.mean_run_us + 0.1 * run
        };
    }

    /// Forget every lease (the host restarted or they lapsed); the ones
    /// running are told to stop.
    fn lose_leases(&mut self) {
        for (id, lease) in self.held.drain() {
            if self.stopped.insert(id) {
                lease.cancelled.notify_one();
            }
        }
        self.buffer.clear();
        self.stopped.clear();
        self.pending = Report::default();
    }
}

fn lease_ref(lease: &Lease) -> LeaseRef {
    LeaseRef {
        task_id: lease.task_id.clone(),
        token: lease.token,
    }
}

/// What a request to the host came back with.
enum Answer {
    Ok(bytes::Bytes),
    /// The host no longer knows this worker: register again.
    Unknown,
    /// Another 4xx/5xx: status and body.
    Refused(StatusCode, String),
}

impl RemoteQueue {
    /// A queue over the host at `config.server`, with its loops started on
    /// the current runtime. Registers at once and returns the error if the
    /// host refuses (a wrong token, a bad name); a host that does not
    /// answer yet is retried with backoff in the background.
    pub async fn connect(config: RemoteConfig) -> Result<Self, QueueError> {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(8)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| QueueError::storage("building the HTTP client", e))?;
        let inner = Arc::new(Inner {
            config,
            http,
            handle: tokio::runtime::Handle::current(),
            state: Mutex::new(ClientState::default()),
            fetch: Notify::new(),
            arrived: Notify::new(),
            report: Notify::new(),
            sent: Notify::new(),
            registered: Notify::new(),
            closed: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
        });
        match inner.register().await {
            Ok(()) => {}
            Err(RegisterFailure::Refused(message)) => return Err(QueueError::Conflict(message)),
            Err(RegisterFailure::Unreachable(e)) => {
                tracing::warn!(error = %e, "scheduler host not reachable yet; retrying");
            }
        }
        tokio::spawn(inner.clone().fetcher());
        tokio::spawn(inner.clone().reporter());
        tokio::spawn(inner.clone().heartbeater());
        Ok(RemoteQueue { inner })
    }

    /// This worker's id on the host, once registered.
    pub fn worker_id(&self) -> Option<String> {
        self.inner
            .lock()
            .registration
            .as_ref()
            .map(|r| r.worker_id.clone())
    }

    /// Tell the host this worker is gone (its leases go back at once).
    pub async fn deregister(&self) {
        let Some(id) = self.worker_id() else { return };
        let path = format!("/v1/workers/{id}");
        let _ = self
            .inner
            .send(reqwest::Method::DELETE, &path, None, Duration::from_secs(5))
            .await;
    }
}

/// What the reporter does next.
enum Next {
    Idle,
    Unregistered,
    Send(Report, Registration),
}

enum RegisterFailure {
    Refused(String),
    Unreachable(String),
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, ClientState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Answer, reqwest::Error> {
        let url = format!("{}{path}", self.config.server.trim_end_matches('/'));
        let mut request = self.http.request(method, url).timeout(timeout);
        if let Some(token) = &self.config.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let response = request.send().await?;
        let status = response.status();
        let bytes = response.bytes().await?;
        Ok(if status.is_success() {
            Answer::Ok(bytes)
        } else if status == StatusCode::NOT_FOUND
            && String::from_utf8_lossy(&bytes).contains("unknown_worker")
        {
            Answer::Unknown
        } else {
            Answer::Refused(status, String::from_utf8_lossy(&bytes).into_owned())
        })
    }

    /// Note that the host answered (or did not).
    fn reached(&self, ok: Result<(), String>) {
        let mut st = self.lock();
        match ok {
            Ok(()) => {
                st.unreachable_since = None;
                st.last_error = None;
            }
            Err(e) => {
                let since = *st.unreachable_since.get_or_insert_with(Instant::now);
                st.last_error = Some(format!("scheduler host unreachable: {e}"));
                let lease_ms = st.registration.as_ref().map_or(30_000, |r| r.lease_ms);
                if since.elapsed() > Duration::from_millis(lease_ms) && !st.held.is_empty() {
                    tracing::warn!(
                        leases = st.held.len(),
                        "cut off from the scheduler host for longer than the lease time: stopping the leased tasks (they run elsewhere)"
                    );
                    st.lose_leases();
                }
            }
        }
    }

    /// The host no longer knows this worker (it restarted, or we were
    /// silent too long): every lease is gone; register again.
    fn forgotten(&self) {
        let mut st = self.lock();
        if st.registration.take().is_some() {
            tracing::warn!("the scheduler host no longer knows this worker; registering again");
        }
        st.lose_leases();
    }

    async fn register(&self) -> Result<(), RegisterFailure> {
        let body = Register {
            name: self.config.name.clone(),
            slots: self.config.slots.clamp(1, 4096) as u32,
            kind: None,
            warm: Vec::new(),
        };
        let body = serde_json::to_vec(&body).expect("serialisable");
        let answer = self
            .send(
                reqwest::Method::POST,
                "/v1/workers",
                Some(body),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| RegisterFailure::Unreachable(e.to_string()))?;
        match answer {
            Answer::Ok(bytes) => {
                let registration: Registration = serde_json::from_slice(&bytes).map_err(|e| {
                    RegisterFailure::Refused(format!("unreadable registration: {e}"))
                })?;
                tracing::info!(worker = %registration.worker_id, "registered with the scheduler host");
                let mut st = self.lock();
                st.registration = Some(registration);
                st.unreachable_since = None;
                st.last_error = None;
                drop(st);
                self.registered.notify_waiters();
                self.fetch.notify_one();
                Ok(())
            }
            Answer::Unknown => Err(RegisterFailure::Refused("registration refused".into())),
            Answer::Refused(status, body) if status.is_client_error() => {
                Err(RegisterFailure::Refused(format!(
                    "the scheduler host refused to register this worker ({status}): {body}"
                )))
            }
            Answer::Refused(status, body) => {
                Err(RegisterFailure::Unreachable(format!("{status}: {body}")))
            }
        }
    }

    /// Register, retrying with backoff while the host does not answer.
    async fn ensure_registered(&self) -> Option<Registration> {
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.closed() {
                return None;
            }
            if let Some(r) = self.lock().registration.clone() {
                return Some(r);
            }
            match self.register().await {
                Ok(()) => continue,
                Err(RegisterFailure::Refused(e)) | Err(RegisterFailure::Unreachable(e)) => {
                    self.reached(Err(e.clone()));
                    tracing::debug!(error = %e, "registration failed; retrying");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// How many leases to ask for now, if any.
    fn wanted(&self) -> Option<usize> {
        let st = self.lock();
        let slots = self.config.slots.max(1);
        let capacity = slots + st.ahead(slots);
        let room = capacity.saturating_sub(st.held.len());
        let low = st.buffer.len() < st.ahead(slots).div_ceil(2).max(1);
        let need = st.waiting > st.buffer.len() || low;
        (room > 0 && need).then_some(room.min(super::hub::MAX_LEASE_BATCH as usize))
    }

    fn warm_union(&self) -> Vec<WarmPair> {
        let st = self.lock();
        let mut seen = HashSet::new();
        st.warm
            .values()
            .flatten()
            .filter(|pair| seen.insert((*pair).clone()))
            .take(4096)
            .map(|(module, key)| WarmPair {
                module: module.to_string(),
                key: key.clone(),
            })
            .collect()
    }

    async fn fetcher(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(100);
        while !self.closed() {
            let wake = self.fetch.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let Some(max) = self.wanted() else {
                wake.await;
                continue;
            };
            let Some(registration) = self.ensure_registered().await else {
                return;
            };
            let request = LeaseRequest {
                max: max as u32,
                wait_ms: LONG_POLL_MS,
                warm: self.warm_union(),
            };
            let path = format!("/v1/workers/{}/lease", registration.worker_id);
            let body = serde_json::to_vec(&request).expect("serialisable");
            let timeout = Duration::from_millis(LONG_POLL_MS + 10_000);
            match self
                .send(reqwest::Method::POST, &path, Some(body), timeout)
                .await
            {
                Ok(Answer::Ok(bytes)) => {
                    self.reached(Ok(()));
                    backoff = Duration::from_millis(100);
                    match serde_json::from_slice::<LeaseBatch>(&bytes) {
                        Ok(batch) => self.take_in(&registration, batch.leases),
                        Err(e) => tracing::warn!(error = %e, "unreadable lease batch"),
                    }
                    continue;
                }
                Ok(Answer::Unknown) => {
                    self.forgotten();
                    continue;
                }
                Ok(Answer::Refused(status, body)) => {
                    tracing::warn!(%status, body, "lease request refused");
                    self.reached(Err(format!("{status}")));
                }
                Err(e) => self.reached(Err(e.to_string())),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    fn take_in(&self, registration: &Registration, leases: Vec<WireLease>) {
        if leases.is_empty() {
            return;
        }
        let engine = base64::engine::general_purpose::STANDARD;
        let mut st = self.lock();
        // A registration replaced meanwhile: these leases belong to the old one.
        if st.registration.as_ref().map(|r| &r.worker_id) != Some(&registration.worker_id) {
            return;
        }
        for wire in leases {
            let Some(module) = ModuleId::read(&wire.module) else {
                tracing::warn!(
                    module = wire.module,
                    "lease of an unreadable module id; ignored"
                );
                continue;
            };
            let payload = engine.decode(&wire.payload_base64).unwrap_or_default();
            let lease = Lease {
                task_id: wire.task_id,
                job_id: wire.job_id,
                module,
                payload: Arc::from(payload),
                affinity: wire.affinity,
                attempt: wire.attempt,
                max_attempts: wire.max_attempts,
                timeout: Duration::from_millis(wire.timeout_ms),
                memory_bytes: wire.memory_bytes,
                worker: registration.worker_id.clone(),
                token: wire.token,
                queued_at: wire.queued_at,
                warm_hit: wire.warm_hit,
                cancelled: Arc::new(Notify::new()),
                results_of: wire.results_of,
            };
            st.held.insert(lease.task_id.clone(), lease.clone());
            st.buffer.push_back(lease);
        }
        drop(st);
        self.arrived.notify_waiters();
    }

    async fn reporter(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let wake = self.report.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            let next = {
                let mut st = self.lock();
                if st.pending.is_empty() {
                    st.sending = false;
                    Next::Idle
                } else if let Some(registration) = st.registration.clone() {
                    st.sending = true;
                    Next::Send(std::mem::take(&mut st.pending), registration)
                } else {
                    Next::Unregistered
                }
            };
            let (report, registration) = match next {
                Next::Send(report, registration) => (report, registration),
                Next::Idle => {
                    self.sent.notify_waiters();
                    if self.closed() {
                        // Stay for a late outcome until the queue is dropped.
                        tokio::select! {
                            _ = &mut wake => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    } else {
                        wake.await;
                    }
                    continue;
                }
                Next::Unregistered => {
                    let registered = self.registered.notified();
                    tokio::select! {
                        _ = registered => {}
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    continue;
                }
            };
            let path = format!("/v1/workers/{}/report", registration.worker_id);
            let body = serde_json::to_vec(&report).expect("serialisable");
            match self
                .send(
                    reqwest::Method::POST,
                    &path,
                    Some(body),
                    Duration::from_secs(30),
                )
                .await
            {
                Ok(Answer::Ok(_)) => {
                    self.reached(Ok(()));
                    backoff = Duration::from_millis(50);
                }
                Ok(Answer::Refused(status, body)) if status == StatusCode::CONFLICT => {
                    self.reached(Ok(()));
                    tracing::info!(body, "the host refused outcomes of leases no longer held");
                }
                Ok(Answer::Unknown) => self.forgotten(),
                Ok(Answer::Refused(status, body)) => {
                    tracing::warn!(%status, body, "report refused; its outcomes are dropped");
                }
                Err(e) => {
                    // Keep the outcomes, in order, for the next try.
                    self.reached(Err(e.to_string()));
                    self.put_back(&registration, report);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    /// A report that could not be sent goes back before what came after
    /// it (unless the registration it was for is gone).
    fn put_back(&self, registration: &Registration, report: Report) {
        let mut st = self.lock();
        if st.registration.as_ref().map(|r| &r.worker_id) == Some(&registration.worker_id) {
            let later = std::mem::replace(&mut st.pending, report);
            st.pending.append(later);
        }
    }

    async fn heartbeater(self: Arc<Self>) {
        loop {
            let period = self
                .lock()
                .registration
                .as_ref()
                .map_or(1_000, |r| r.heartbeat_ms.max(50));
            tokio::time::sleep(Duration::from_millis(period)).await;
            if self.closed() && self.lock().held.is_empty() {
                return;
            }
            let (refs, registration) = {
                let st = self.lock();
                let Some(registration) = st.registration.clone() else {
                    continue;
                };
                let refs: Vec<LeaseRef> = st.held.values().map(lease_ref).collect();
                (refs, registration)
            };
            if refs.is_empty() {
                continue;
            }
            let path = format!("/v1/workers/{}/heartbeat", registration.worker_id);
            let body = serde_json::to_vec(&Heartbeat { leases: refs }).expect("serialisable");
            match self
                .send(
                    reqwest::Method::POST,
                    &path,
                    Some(body),
                    Duration::from_secs(10),
                )
                .await
            {
                Ok(Answer::Ok(bytes)) => {
                    self.reached(Ok(()));
                    if let Ok(reply) = serde_json::from_slice::<HeartbeatReply>(&bytes) {
                        self.heard(reply);
                    }
                }
                Ok(Answer::Unknown) => self.forgotten(),
                Ok(Answer::Refused(status, body)) => {
                    tracing::warn!(%status, body, "heartbeat refused");
                }
                Err(e) => self.reached(Err(e.to_string())),
            }
        }
    }

    /// Stop what the host says was cancelled; drop what it says is lost.
    fn heard(&self, reply: HeartbeatReply) {
        let mut st = self.lock();
        for id in reply.cancelled {
            if let Some(lease) = st.held.get(&id).cloned()
                && st.stopped.insert(id)
            {
                lease.cancelled.notify_one();
            }
        }
        for id in reply.stale {
            if let Some(lease) = st.held.remove(&id) {
                st.buffer.retain(|l| l.task_id != id);
                st.stopped.remove(&id);
                lease.cancelled.notify_one();
            }
        }
    }

    /// Queue an outcome of a held lease; `false` if the lease is not held.
    fn finish(&self, lease: &Lease, run_us: Option<u64>, add: impl FnOnce(&mut Report)) -> bool {
        let mut st = self.lock();
        match st.held.get(&lease.task_id) {
            Some(held) if held.token == lease.token => {}
            _ => return false,
        }
        st.held.remove(&lease.task_id);
        st.stopped.remove(&lease.task_id);
        if let Some(run_us) = run_us {
            st.seen_run(run_us);
        }
        add(&mut st.pending);
        drop(st);
        self.report.notify_one();
        self.fetch.notify_one();
        true
    }

    /// The module's bytes from the disk cache, or fetched from the host
    /// (and cached). Blocking: the runtime calls it off the async threads.
    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        if id.is_external() {
            return None;
        }
        let cached = self
            .config
            .module_dir
            .as_ref()
            .map(|dir| dir.join(format!("{id}.wasm")));
        if let Some(path) = &cached
            && let Ok(bytes) = std::fs::read(path)
            && ModuleId::of(&bytes) == *id
        {
            return Some(bytes);
        }
        let bytes = self.fetch_module(id)?;
        if ModuleId::of(&bytes) != *id {
            tracing::warn!(module = %id, "fetched module bytes do not match their id");
            return None;
        }
        if let Some(path) = cached {
            let write = || -> std::io::Result<()> {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                // Unique per writer: two workers here may fetch it at once.
                let temp = path.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
                std::fs::write(&temp, &bytes)?;
                std::fs::rename(&temp, &path)
            };
            if let Err(e) = write() {
                tracing::warn!(module = %id, error = %e, "cannot cache module bytes on disk");
            }
        }
        Some(bytes)
    }
}

impl Inner {
    /// A GET of `url` with this worker's token, as a future to spawn on
    /// the worker's runtime: the answer's status and body.
    fn fetch(
        &self,
        url: &str,
        timeout: Duration,
    ) -> impl std::future::Future<Output = Result<(StatusCode, bytes::Bytes), reqwest::Error>>
    + Send
    + 'static {
        let mut request = self.http.get(url).timeout(timeout);
        if let Some(token) = &self.config.token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await?;
            let status = response.status();
            Ok((status, response.bytes().await?))
        }
    }

    /// A page of a job's results for a fan-in task running here, from the
    /// host (`GET /v1/workers/results/{job}`), retried with backoff (100,
    /// 200, 400 ms) while the host does not answer; an error fails the
    /// attempt, which then runs again like any failed one.
    async fn input_results(
        &self,
        job: &JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError> {
        let url = format!(
            "{}/v1/workers/results/{job}?after={after}&limit={limit}",
            self.config.server.trim_end_matches('/')
        );
        let failed = |why: String| QueueError::Unavailable(format!("results of {job}: {why}"));
        let mut backoff = Duration::from_millis(100);
        let mut last = String::new();
        for _ in 1..=4 {
            let fetch = self.fetch(&url, Duration::from_secs(60));
            match self.handle.spawn(fetch).await {
                Ok(Ok((status, bytes))) if status.is_success() => {
                    let page: ResultPage = serde_json::from_slice(&bytes)
                        .map_err(|e| failed(format!("unreadable page: {e}")))?;
                    let engine = base64::engine::general_purpose::STANDARD;
                    return page
                        .results
                        .into_iter()
                        .map(|r| {
                            Ok(TaskResult {
                                seq: r.seq,
                                task_id: r.task_id,
                                result: engine
                                    .decode(r.result_base64)
                                    .map_err(|e| failed(format!("unreadable result: {e}")))?,
                            })
                        })
                        .collect();
                }
                Ok(Ok((status, bytes))) if status.is_client_error() => {
                    return Err(failed(format!(
                        "{status}: {}",
                        String::from_utf8_lossy(&bytes)
                    )));
                }
                Ok(Ok((status, _))) => last = status.to_string(),
                Ok(Err(e)) => last = e.to_string(),
                Err(e) => return Err(failed(e.to_string())),
            }
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
        Err(failed(last))
    }

    /// A module's bytes from the host, retried with backoff (100, 200,
    /// 400 ms) while the host does not answer or fails; `None` if it says
    /// there is no such module or never answers.
    fn fetch_module(&self, id: &ModuleId) -> Option<Vec<u8>> {
        let url = format!(
            "{}/v1/workers/modules/{id}",
            self.config.server.trim_end_matches('/')
        );
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=4 {
            let fetch = self.fetch(&url, Duration::from_secs(120));
            match futures::executor::block_on(self.handle.spawn(fetch)) {
                Ok(Ok((status, bytes))) if status.is_success() => return Some(bytes.to_vec()),
                Ok(Ok((status, _))) if status.is_client_error() => {
                    tracing::warn!(module = %id, %status, "the host has no such module");
                    return None;
                }
                Ok(Ok((status, _))) => {
                    tracing::warn!(module = %id, %status, attempt, "module fetch failed")
                }
                Ok(Err(e)) => {
                    tracing::warn!(module = %id, error = %e, attempt, "module fetch failed")
                }
                Err(_) => return None,
            }
            // Backoff between tries of a failing network (this runs on a
            // blocking thread of the runtime's, never on an async one).
            std::thread::sleep(backoff);
            backoff *= 2;
        }
        None
    }
}

/// Counts a worker here as waiting for a lease while it lives.
struct Waiting<'a>(&'a Inner);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.lock().waiting += 1;
        Waiting(inner)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.waiting = st.waiting.saturating_sub(1);
    }
}

/// The buffered lease best for a worker with these warm pairs: the first
/// warm one among the next few, else the first.
fn pick(buffer: &VecDeque<Lease>, warm: &[(ModuleId, String)]) -> Option<usize> {
    if buffer.is_empty() {
        return None;
    }
    let warm_at = buffer.iter().take(64).position(|lease| {
        lease
            .affinity
            .as_ref()
            .is_some_and(|key| warm.iter().any(|(m, k)| *m == lease.module && k == key))
    });
    Some(warm_at.unwrap_or(0))
}

fn no_submissions() -> QueueError {
    QueueError::Conflict(
        "a worker machine takes no submissions: send them to the scheduler host".into(),
    )
}

#[async_trait]
impl WorkQueue for RemoteQueue {
    async fn put_module(
        &self,
        _record: ModuleRecord,
        _bytes: Vec<u8>,
    ) -> Result<ModuleRecord, QueueError> {
        Err(no_submissions())
    }

    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        self.inner.module_bytes(id)
    }

    async fn input_results(
        &self,
        job: &JobId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<TaskResult>, QueueError> {
        self.inner.input_results(job, after, limit).await
    }

    async fn submit_tasks(&self, _tasks: Vec<NewTask>) -> Result<(), QueueError> {
        Err(no_submissions())
    }

    async fn submit_job(&self, _job: NewJob) -> Result<JobRecord, QueueError> {
        Err(no_submissions())
    }

    async fn submit_job_stream(
        &self,
        _job: NewJob,
        _payloads: crate::queue::PayloadStream,
    ) -> Result<JobRecord, QueueError> {
        Err(no_submissions())
    }

    async fn control(&self, _control: Control) -> Result<(), QueueError> {
        Err(no_submissions())
    }

    async fn lease(&self, worker: &WorkerView) -> Option<Lease> {
        let inner = &self.inner;
        inner
            .lock()
            .warm
            .insert(worker.id.clone(), worker.warm.clone());
        loop {
            let arrived = inner.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            {
                let mut st = inner.lock();
                if inner.closed() {
                    return None;
                }
                if let Some(at) = pick(&st.buffer, &worker.warm) {
                    let lease = st.buffer.remove(at).expect("picked");
                    drop(st);
                    inner.fetch.notify_one();
                    return Some(lease);
                }
            }
            let _waiting = Waiting::new(inner);
            inner.fetch.notify_one();
            arrived.await;
        }
    }

    fn started(&self, lease: &Lease) {
        let mut st = self.inner.lock();
        if st.held.contains_key(&lease.task_id) {
            st.pending.started.push(lease_ref(lease));
            drop(st);
            self.inner.report.notify_one();
        }
    }

    fn heartbeat(&self, lease: &Lease) -> Result<(), QueueError> {
        // Every held lease is renewed by the heartbeat loop; this says
        // whether this one still is.
        match self.inner.lock().held.get(&lease.task_id) {
            Some(held) if held.token == lease.token => Ok(()),
            _ => Err(QueueError::StaleLease(lease.task_id.clone())),
        }
    }

    fn complete(&self, lease: &Lease, completion: Completion) -> Result<(), QueueError> {
        let engine = base64::engine::general_purpose::STANDARD;
        let done = super::wire::Completed {
            task_id: lease.task_id.clone(),
            token: lease.token,
            result_base64: Some(engine.encode(&completion.result)),
            result: None,
            logs: completion.logs,
            progress: completion.progress,
            run_us: completion.run_us,
        };
        let run_us = completion.run_us;
        self.inner
            .finish(lease, Some(run_us), |r| r.completed.push(done))
            .then_some(())
            .ok_or_else(|| QueueError::StaleLease(lease.task_id.clone()))
    }

    fn fail(&self, lease: &Lease, failure: Failure) -> Result<(), QueueError> {
        let now = crate::model::now_ms();
        let failed = super::wire::Failed {
            task_id: lease.task_id.clone(),
            token: lease.token,
            kind: failure.kind,
            message: failure.message,
            logs: failure.logs,
            run_us: failure.run_us,
            retry_after_ms: failure.retry_at.map(|at| at.saturating_sub(now)),
            is_final: failure.retry_at.is_none(),
        };
        let run_us = failure.run_us;
        self.inner
            .finish(lease, Some(run_us), |r| r.failed.push(failed))
            .then_some(())
            .ok_or_else(|| QueueError::StaleLease(lease.task_id.clone()))
    }

    fn release(&self, lease: &Lease, cancelled: bool) {
        let released = Released {
            task_id: lease.task_id.clone(),
            token: lease.token,
            cancelled,
        };
        self.inner
            .finish(lease, None, |r| r.released.push(released));
    }

    fn health(&self) -> Result<(), String> {
        match &self.inner.lock().last_error {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn undurable(&self) -> usize {
        self.inner.lock().pending.len()
    }

    fn close(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.closing.send_replace(true);
        // Leases fetched and never handed out go back to the host.
        let mut st = self.inner.lock();
        let unstarted: Vec<Lease> = st.buffer.drain(..).collect();
        for lease in unstarted {
            st.held.remove(&lease.task_id);
            st.pending.released.push(Released {
                task_id: lease.task_id.clone(),
                token: lease.token,
                cancelled: false,
            });
        }
        drop(st);
        self.inner.arrived.notify_waiters();
        self.inner.fetch.notify_one();
        self.inner.report.notify_one();
    }

    async fn flush(&self) -> Result<(), QueueError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let sent = self.inner.sent.notified();
            tokio::pin!(sent);
            sent.as_mut().enable();
            {
                let st = self.inner.lock();
                if st.pending.is_empty() && !st.sending {
                    return Ok(());
                }
            }
            self.inner.report.notify_one();
            if tokio::time::timeout_at(deadline, sent).await.is_err() {
                return Err(QueueError::Unavailable(
                    "outcomes not delivered to the scheduler host within 10 s".into(),
                ));
            }
        }
    }
}
