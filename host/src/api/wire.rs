//! The API's wire types: each request and response body is one struct,
//! read by the handlers, described in the OpenAPI document by utoipa's
//! derive on that same struct, and sent by the CLI client. So the three
//! cannot drift apart. Tags have one syntax everywhere: [`parse_tag`].

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// The error shape of every 4xx and 5xx response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// `{"code": "invalid_field", "message": "priority: must be 0..=9 ..."}`.
    pub error: ErrorDetail,
}

/// Inside [`ErrorBody`].
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: String,
    /// What is wrong, for people.
    pub message: String,
}

/// `{"id": "..."}`: what `POST /v1/tasks` answers.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Created {
    /// The new task's id.
    pub id: String,
}

/// Options every submission may carry; all optional. The bounds stated
/// here are the ones the handlers enforce (400 `invalid_field` outside
/// them), so generated clients and fuzzers send only what the server takes.
/// Numbers are read as any JSON number so that a negative, fractional or
/// huge value is refused with its field's name.
#[derive(Debug, Default, Clone, Serialize, Deserialize, ToSchema)]
pub struct SubmitOptions {
    /// 0..=9, 9 highest; 0 holds the task until raised. Default 5.
    #[schema(value_type = Option<u8>, minimum = 0, maximum = 9, default = 5)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Number>,
    /// Key/value labels: at most 64, keys 1-128 characters, values up to 256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Warm-instance key, e.g. `curve=USD`: 1-256 characters.
    #[schema(min_length = 1, max_length = 256)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Per attempt, 1 ms to 24 h. Default 60000.
    #[schema(value_type = Option<u64>, minimum = 1, maximum = 86_400_000, default = 60_000)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<Number>,
    /// Linear-memory cap, 1 MiB to 4 GiB. Default 256 MiB.
    #[schema(
        value_type = Option<u64>,
        minimum = 1_048_576,
        maximum = 4_294_967_296_u64,
        default = 268_435_456
    )]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<Number>,
    /// 1 to 100. Default 3.
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 100, default = 3)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<Number>,
    /// Delayed start, ms from now: 0 to 365 days. Not with `not_before`.
    #[schema(value_type = Option<u64>, minimum = 0, maximum = 31_536_000_000_u64)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<Number>,
    /// Delayed start, ms since the epoch, at most 365 days ahead. Not with `delay_ms`.
    #[schema(value_type = Option<u64>, minimum = 0)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Number>,
    /// Ids of tasks or jobs (at most 1,000) to wait for: until each has
    /// ended this task (or every task of this job) is `Waiting`, neither
    /// leased nor counted as Pending. A job ends when all its tasks have.
    #[schema(max_items = 1000)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// With `after`: `cancel` (default) cancels this with the reason
    /// `dependency_failed: <id>` once a dependency ends Dead or Cancelled
    /// (a job: with any such task); `run` runs it anyway.
    #[schema(value_type = Option<String>, pattern = "^(cancel|run)$")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    /// Fields nobody asked for: refused, so a typo is not silently ignored
    /// (this struct is flattened into bodies, which therefore cannot use
    /// serde's `deny_unknown_fields`).
    #[schema(ignore)]
    #[serde(flatten, skip_serializing)]
    pub unknown: BTreeMap<String, Value>,
}

/// Body of `POST /v1/tasks`: `payload` or `payload_base64`, not both
/// (neither: the payload is JSON `null`). Unknown fields are rejected.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskSubmission {
    /// Module id (SHA-256) or name.
    #[schema(min_length = 1)]
    pub module: String,
    /// The payload as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// Or the payload as base64 bytes.
    #[schema(content_encoding = "base64")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// With `?wait=` only. `false`: the task is not queued on disk while
    /// its caller waits; it and its result are written once, and the
    /// answer does not wait for that write (on a host crash the caller
    /// gets an error, never a lost task). Default `true`: answered once
    /// task and result are durable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durable: Option<bool>,
    /// A fan-in task's input, in place of a payload: `{"results_of":
    /// JOB}`. Not with `payload`, `payload_base64` or `?wait=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input: Option<TaskInput>,
    /// Options.
    #[serde(flatten)]
    pub options: SubmitOptions,
}

/// Where a fan-in task's input comes from.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskInput {
    /// A job id. The task waits for the job (it joins `after`), then reads
    /// the job's completed results in task order, a page at a time while
    /// it runs, so no result set is too large: a component through
    /// `kwq:task/inputs.next-results` (WIT 0.2.0), a WASI command as NDJSON
    /// on stdin, one `{"task_id", "result"}` per line as `GET
    /// /v1/jobs/{id}/results` serves them.
    #[schema(min_length = 1, max_length = 128)]
    pub results_of: String,
}

/// Body of `POST /v1/jobs`: exactly one of `payloads`, `payloads_base64`,
/// `sweep`. Unknown fields are rejected.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobSubmission {
    /// Module id (SHA-256) or name.
    #[schema(min_length = 1)]
    pub module: String,
    /// A name for people: 1-256 characters, no control characters.
    #[schema(min_length = 1, max_length = 256)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// One task per payload: 1 to 1,000,000.
    #[schema(min_items = 1, max_items = 1_000_000)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payloads: Option<Vec<Value>>,
    /// One task per base64 payload: 1 to 1,000,000.
    #[schema(min_items = 1, max_items = 1_000_000)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payloads_base64: Option<Vec<String>>,
    /// The cartesian product of `params` over `base`, expanded as workers
    /// lease tasks: at most 10^10 points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<crate::model::Sweep>,
    /// Options of every task.
    #[serde(flatten)]
    pub options: SubmitOptions,
}

/// Body of `POST /v1/tasks/{id}/priority` and `POST /v1/jobs/{id}/priority`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PriorityChange {
    /// 0..=9.
    #[schema(minimum = 0, maximum = 9)]
    pub priority: u8,
}

/// A job as the API shows it: its record, its counts per state (sweep
/// points not created yet count as Pending), progress and timings.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    /// `j-...`.
    pub id: String,
    /// A name for people.
    pub name: Option<String>,
    /// Module id every task runs.
    #[schema(value_type = String)]
    pub module: crate::model::ModuleId,
    /// `Active`, `Paused`, `Finished` or `Cancelled`.
    pub state: String,
    /// Tasks in all (explicit payloads or sweep points).
    pub total: u64,
    /// Tasks created so far (a sweep creates its points as workers drain them).
    pub expanded: u64,
    /// Its tasks are not leased.
    pub paused: bool,
    /// Its unfinished tasks were cancelled.
    pub cancelled: bool,
    /// Why the grid cancelled it (`dependency_failed: <id>`); absent for a
    /// user's cancel and for jobs not cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// Submitted, ms since the epoch.
    pub created_at: u64,
    /// Options every task got.
    #[schema(value_type = Object)]
    pub options: crate::model::TaskOptions,
    /// The sweep, if it is one.
    pub sweep: Option<crate::model::Sweep>,
    /// Tasks per state, by state name.
    pub counts: BTreeMap<String, u64>,
    /// Tasks Completed, Dead or Cancelled.
    pub finished: u64,
    /// `finished / total`, 0..=1.
    pub progress: f64,
    /// Tasks finished per second between its first and last finish.
    pub throughput_per_s: f64,
    /// Mean run time of its completed tasks, µs.
    pub mean_run_us: f64,
    /// 95th percentile run time, µs.
    pub p95_run_us: u64,
}

/// A task as the API shows it: its record; with its detail (one task's
/// page), the payload and result inline as JSON when they are JSON
/// (`payload`, `result`), as base64 otherwise (`payload_base64`,
/// `result_base64`), its logs, live progress and timeline.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskView {
    /// The stored record (id, job, module, options, state, attempts,
    /// worker, timestamps per state, error, progress).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub record: crate::model::TaskRecord,
    /// The payload, when it is JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Value>,
    /// The payload, when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// The result, when it is JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The result, when it is not JSON.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result_base64: Option<String>,
    /// The task's events, oldest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub timeline: Option<Vec<crate::model::Event>>,
}

/// One page of `GET /v1/tasks`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TaskPage {
    /// The tasks, without payloads, results or logs.
    pub items: Vec<TaskView>,
    /// Cursor of the next page (`after=`), if there may be one.
    pub next: Option<u64>,
}

/// What `DELETE /v1/jobs/{id}` answers.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    /// The job.
    pub id: String,
    /// Always true: the job, its tasks, results and events are gone.
    pub deleted: bool,
}

/// A tag as people type it, `key=value` (or `key:value`, as KWQ's origin
/// wrote `currency:USD`): the one parser for `--tag` and `?tag=`. The
/// first `=` splits; without one, the first `:`.
pub fn parse_tag(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .or_else(|| text.split_once(':'))
        .filter(|(key, _)| !key.is_empty())
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .ok_or_else(|| format!("tag {text:?} must look like key=value"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_at_the_first_separator() {
        assert_eq!(parse_tag("desk=rates"), Ok(("desk".into(), "rates".into())));
        assert_eq!(
            parse_tag("currency:USD"),
            Ok(("currency".into(), "USD".into()))
        );
        assert_eq!(
            parse_tag("curve=USD:3m"),
            Ok(("curve".into(), "USD:3m".into()))
        );
        assert_eq!(parse_tag("a:b=c"), Ok(("a:b".into(), "c".into())));
        assert_eq!(parse_tag("k="), Ok(("k".into(), String::new())));
        assert!(parse_tag("plain").is_err());
        assert!(parse_tag("=v").is_err());
    }
}
