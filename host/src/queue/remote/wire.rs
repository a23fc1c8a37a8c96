//! The worker protocol's bodies, one struct each: the scheduler host's
//! handlers read them, utoipa documents them from the same structs, and
//! `kwq worker` (and any program that speaks the protocol) sends them.
//! Payloads and results travel as base64 inside JSON; a text result may be
//! sent as `result` instead.

use crate::model::{ErrorKind, LogLine};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/workers`: a worker machine (or program) introduces itself.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Register {
    /// Who it is, for people: a host name. 1-128 characters.
    pub name: String,
    /// Tasks it runs at once (1-4096): shown on the dashboard.
    pub slots: u32,
    /// `None` (or absent) for a `kwq worker` running Wasm tasks;
    /// `external:KIND` for a program running the tasks submitted with
    /// `"module": "external:KIND"` and nothing else.
    #[serde(default)]
    pub kind: Option<String>,
    /// (module, affinity key) pairs already warm on it (a restarted worker
    /// with a disk cache); each lease request updates them. At most 4096.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warm: Vec<WarmPair>,
}

/// What `POST /v1/workers` answers: the worker's id and its timings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Registration {
    /// The id to use in every later request (unique per registration).
    pub worker_id: String,
    /// A lease not renewed by a heartbeat for this long is given to
    /// another worker, and reports under it are refused (409).
    pub lease_ms: u64,
    /// How often to send a heartbeat for the leases held.
    pub heartbeat_ms: u64,
}

/// One (module, affinity key) pair warm on a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmPair {
    /// Module id.
    pub module: String,
    /// Affinity key.
    pub key: String,
}

/// `POST /v1/workers/{id}/lease`: up to `max` tasks, waiting up to
/// `wait_ms` for the first (a long poll).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// Most tasks to lease in this call: 1-1024.
    #[schema(minimum = 1, maximum = 1024)]
    pub max: u32,
    /// How long to wait for the first task, ms: 0-60000. Default 0.
    #[schema(minimum = 0, maximum = 60_000)]
    #[serde(default)]
    pub wait_ms: u64,
    /// Pairs warm on the worker, so tasks with a warm affinity key come
    /// here first (soft affinity across machines). At most 4096.
    #[serde(default)]
    pub warm: Vec<WarmPair>,
}

/// A leased task, as a worker receives it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WireLease {
    /// The task.
    pub task_id: String,
    /// The lease: quote it in heartbeats and reports.
    pub token: u64,
    /// Its job.
    pub job_id: Option<String>,
    /// Module id, or `external:KIND`.
    pub module: String,
    /// Input bytes, base64.
    pub payload_base64: String,
    /// Warm-instance key.
    pub affinity: Option<String>,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Attempts allowed in all.
    pub max_attempts: u32,
    /// Wall-clock limit of this attempt, ms.
    pub timeout_ms: u64,
    /// Memory cap of this attempt, bytes.
    pub memory_bytes: u64,
    /// When the task was queued, ms since the epoch.
    pub queued_at: u64,
    /// Whether its (module, key) was warm on this worker.
    pub warm_hit: bool,
    /// A fan-in task: the job whose completed results are its input, read
    /// while it runs with `GET /v1/workers/results/{job}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_of: Option<String>,
}

/// One page of a job's completed results, for a worker running a fan-in
/// task: what `GET /v1/workers/results/{job}` answers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ResultPage {
    /// In task order; empty once there are no more.
    pub results: Vec<PagedResult>,
}

/// One completed task's result in a [`ResultPage`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PagedResult {
    /// Cursor: ask for the next page `after` the last one's.
    pub seq: u64,
    /// The task.
    pub task_id: String,
    /// Its result bytes, base64.
    pub result_base64: String,
}

/// What `POST /v1/workers/{id}/lease` answers (an empty list when the
/// wait ran out).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LeaseBatch {
    /// The leased tasks, best first.
    pub leases: Vec<WireLease>,
}

/// A lease named by its task and token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRef {
    /// The task.
    pub task_id: String,
    /// The lease's token.
    pub token: u64,
}

/// `POST /v1/workers/{id}/heartbeat`: the leases still held.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// Every lease the worker holds (running or waiting to run).
    pub leases: Vec<LeaseRef>,
}

/// What a heartbeat answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct HeartbeatReply {
    /// Leases renewed.
    pub renewed: u32,
    /// Tasks cancelled by a user: stop them and report them `released`
    /// with `cancelled: true`.
    pub cancelled: Vec<String>,
    /// Tasks whose lease is no longer held (it lapsed and the task went to
    /// another worker): stop them; a report would be refused.
    pub stale: Vec<String>,
}

/// A successful attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Completed {
    /// The task.
    pub task_id: String,
    /// Its lease's token.
    pub token: u64,
    /// Result bytes, base64 (or `result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_base64: Option<String>,
    /// Result as UTF-8 text (or `result_base64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// Log lines: `{"level": "info", "message": "..."}`.
    #[schema(value_type = Vec<Object>)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
    /// Last progress, 0.0-1.0. Default 1.
    #[serde(default = "one")]
    pub progress: f32,
    /// Run time of the attempt, µs.
    #[serde(default)]
    pub run_us: u64,
}

fn one() -> f32 {
    1.0
}

/// A failed attempt.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Failed {
    /// The task.
    pub task_id: String,
    /// Its lease's token.
    pub token: u64,
    /// Why: `trap`, `timeout`, `memory_limit`, `guest_error`, `internal`, ...
    #[schema(value_type = String, example = "guest_error")]
    pub kind: ErrorKind,
    /// What went wrong, for people.
    pub message: String,
    /// Log lines.
    #[schema(value_type = Vec<Object>)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
    /// Run time of the attempt, µs.
    #[serde(default)]
    pub run_us: u64,
    /// Retry after this many ms; absent: the host's backoff decides
    /// (while attempts remain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// No retry: park the task as Dead now.
    #[serde(default, rename = "final")]
    pub is_final: bool,
}

/// An attempt given back unfinished.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Released {
    /// The task.
    pub task_id: String,
    /// Its lease's token.
    pub token: u64,
    /// `true`: stopped because it was cancelled (it ends Cancelled);
    /// `false`: the worker is stopping (it waits for another worker).
    #[serde(default)]
    pub cancelled: bool,
}

/// `POST /v1/workers/{id}/report`: what happened to leased tasks, in one
/// batch. Each list may be empty.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// Tasks that began running (they show Running).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub started: Vec<LeaseRef>,
    /// Attempts that succeeded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub completed: Vec<Completed>,
    /// Attempts that failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Failed>,
    /// Attempts given back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub released: Vec<Released>,
}

impl Report {
    /// Items in the report.
    pub fn len(&self) -> usize {
        self.started.len() + self.completed.len() + self.failed.len() + self.released.len()
    }

    /// Whether it reports nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Add everything of `other` after this report's items.
    pub fn append(&mut self, mut other: Report) {
        self.started.append(&mut other.started);
        self.completed.append(&mut other.completed);
        self.failed.append(&mut other.failed);
        self.released.append(&mut other.released);
    }
}

/// One report item the host did not take.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Refused {
    /// The task.
    pub task_id: String,
    /// `stale_lease` (the lease is no longer held) or `invalid_result`.
    pub code: String,
    /// Why, for people.
    pub message: String,
}

/// What a report answers: 200 when every item was recorded; 409
/// `stale_lease` (with this body beside `error`) when any was refused.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ReportReply {
    /// Items recorded.
    pub recorded: u32,
    /// Items refused, each with its reason.
    pub refused: Vec<Refused>,
}

/// One worker as `GET /v1/workers` and the dashboard show it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RemoteWorkerView {
    /// Its id.
    pub worker_id: String,
    /// Its name (host).
    pub name: String,
    /// Where its requests come from.
    pub address: String,
    /// Tasks it runs at once.
    pub slots: u32,
    /// `external:KIND`, or absent for a Wasm worker.
    pub kind: Option<String>,
    /// Leases it holds now.
    pub leased: usize,
    /// One task it is running (the oldest lease), if any.
    pub current_task: Option<String>,
    /// Tasks it completed since it registered.
    pub completed: u64,
    /// Attempts of it that failed.
    pub failed: u64,
    /// When it registered, ms since the epoch.
    pub registered_at: u64,
    /// Its last request, ms since the epoch.
    pub last_seen: u64,
}
