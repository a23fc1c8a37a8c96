//! `/v1/tasks`: submit one task, look one up with its timeline, list with
//! filters, cancel, change priority.

use super::error::{ApiJson, ApiQuery, AppError};
use super::wire::{
    Created, ErrorBody, PriorityChange, SubmitOptions, TaskInput, TaskPage, TaskSubmission,
    TaskView, parse_tag,
};
use super::{AppState, modules, views};
use crate::model::{NewTask, OnFailure, TaskOptions, TaskRecord, TaskState, now_ms};
use crate::queue::invocation::{Invocation, Outcome};
use crate::queue::{Control, QueueError, TaskFilter};
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

/// The furthest ahead a task may be scheduled (`delay_ms`, `not_before`).
const MAX_DELAY_MS: i64 = 365 * 86_400_000;

impl SubmitOptions {
    /// Check every field and fill in defaults.
    pub(super) fn into_options(self) -> Result<TaskOptions, AppError> {
        if let Some(field) = self.unknown.keys().next() {
            return Err(AppError::bad_request(
                "invalid_field",
                format!("unknown field {field:?}"),
            ));
        }
        let defaults = TaskOptions::default();
        let bad = |field: &str, why: &str| {
            AppError::bad_request("invalid_field", format!("{field}: {why}"))
        };
        let within = |field: &str,
                      value: &Option<serde_json::Number>,
                      default: u64,
                      range: std::ops::RangeInclusive<i64>,
                      why: &str| {
            match value {
                None => Ok(default),
                Some(v) => match v.as_i64() {
                    Some(i) if range.contains(&i) => Ok(i as u64),
                    _ => Err(bad(field, &format!("{why}, got {v}"))),
                },
            }
        };
        let priority = within(
            "priority",
            &self.priority,
            defaults.priority.into(),
            0..=9,
            "must be 0..=9 (9 highest, 0 holds the task)",
        )? as u8;
        let timeout_ms = within(
            "timeout_ms",
            &self.timeout_ms,
            defaults.timeout_ms,
            1..=86_400_000,
            "must be 1 ms to 24 h",
        )?;
        let memory_bytes = within(
            "memory_bytes",
            &self.memory_bytes,
            defaults.memory_bytes,
            1 << 20..=4 << 30,
            "must be 1 MiB to 4 GiB",
        )?;
        let max_attempts = within(
            "max_attempts",
            &self.max_attempts,
            defaults.max_attempts.into(),
            1..=100,
            "must be 1 to 100",
        )? as u32;
        let delay_ms = within(
            "delay_ms",
            &self.delay_ms,
            0,
            0..=MAX_DELAY_MS,
            "must be 0 to 365 days",
        )?;
        let latest = now_ms() as i64 + MAX_DELAY_MS;
        let at = within(
            "not_before",
            &self.not_before,
            0,
            0..=latest,
            "must be a time in ms since the epoch, at most 365 days ahead",
        )?;
        if let Some(key) = &self.affinity
            && (key.is_empty() || key.len() > 256)
        {
            return Err(bad("affinity", "must be 1 to 256 characters"));
        }
        if self.tags.len() > 64
            || self
                .tags
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 256)
        {
            return Err(bad(
                "tags",
                "at most 64 tags, keys 1-128 characters, values up to 256",
            ));
        }
        let not_before = match (self.delay_ms, self.not_before) {
            (Some(_), Some(_)) => {
                return Err(bad("delay_ms", "give delay_ms or not_before, not both"));
            }
            (Some(_), None) => Some(now_ms() + delay_ms),
            (None, Some(_)) => Some(at),
            (None, None) => None,
        };
        let (after, on_failure) = dependencies(self.after, self.on_failure.as_deref())?;
        Ok(TaskOptions {
            priority,
            tags: self.tags,
            affinity: self.affinity,
            timeout_ms,
            memory_bytes,
            max_attempts,
            not_before,
            after,
            on_failure,
            results_of: None,
        })
    }
}

/// Most dependencies one task or job may name.
const MAX_DEPENDENCIES: usize = 1000;

/// `after` and `on_failure` checked: ids well formed, each once, in order.
fn dependencies(
    after: Vec<String>,
    on_failure: Option<&str>,
) -> Result<(Vec<String>, OnFailure), AppError> {
    let bad = |field: &str, why: String| {
        AppError::bad_request("invalid_field", format!("{field}: {why}"))
    };
    if after.len() > MAX_DEPENDENCIES {
        return Err(bad(
            "after",
            format!("at most {MAX_DEPENDENCIES} ids, got {}", after.len()),
        ));
    }
    let mut ids: Vec<String> = Vec::with_capacity(after.len());
    for id in after {
        if id.is_empty()
            || id.len() > 128
            || id.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(bad("after", format!("{id:?} is not a task or job id")));
        }
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let on_failure = match on_failure {
        None => OnFailure::Cancel,
        Some(_) if ids.is_empty() => {
            return Err(bad("on_failure", "only with after".into()));
        }
        Some("cancel") => OnFailure::Cancel,
        Some("run") => OnFailure::Run,
        Some(other) => {
            return Err(bad(
                "on_failure",
                format!("must be cancel or run, got {other:?}"),
            ));
        }
    };
    Ok((ids, on_failure))
}

/// Refuse (400 `unknown_dependency`) a submit whose `after` names an id
/// that is neither a task nor a job of this store. Cycles cannot form: an
/// id is made when its task is accepted, so nothing can name a later one.
pub(super) async fn check_dependencies(
    state: &AppState,
    options: &TaskOptions,
) -> Result<(), AppError> {
    if !options.after.is_empty() && !state.work.runs_dependencies() {
        return Err(AppError::bad_request(
            "unsupported",
            "after: this store does not hold tasks for their dependencies (the embedded store and a Kafka grid do); \
             `kwq workflow run` orders the steps from the client",
        ));
    }
    for id in &options.after {
        let known = match state.reads.task(id).await {
            Ok(_) => true,
            Err(QueueError::NotFound(_)) => match state.reads.job(id).await {
                Ok(_) => true,
                Err(QueueError::NotFound(_)) => false,
                Err(e) => return Err(e.into()),
            },
            Err(e) => return Err(e.into()),
        };
        if !known {
            return Err(AppError::bad_request(
                "unknown_dependency",
                format!("after: no task or job {id:?}"),
            ));
        }
    }
    Ok(())
}

/// Check a fan-in task's `input`: one job of this store, in place of a
/// payload, not for a synchronous invocation (it waits for the job).
async fn fan_in(
    state: &AppState,
    input: &TaskInput,
    payload: &Option<Value>,
    payload_base64: &Option<String>,
    waits: bool,
) -> Result<(), AppError> {
    let bad = |why: &str| AppError::bad_request("invalid_field", format!("input: {why}"));
    if payload.is_some() || payload_base64.is_some() {
        return Err(bad(
            "the job's results are the task's input; give no payload",
        ));
    }
    if waits {
        return Err(bad(
            "not with ?wait (the task waits for its job); submit it, then wait with GET /v1/tasks/{id}",
        ));
    }
    let id = &input.results_of;
    if dependencies(vec![id.clone()], None).is_err() {
        return Err(bad(&format!("results_of: {id:?} is not a job id")));
    }
    if !state.work.feeds_results() {
        return Err(AppError::bad_request(
            "unsupported",
            "input: this store does not stream a job's results to a task (the embedded store does); \
             `kwq workflow run` hands them over from the client",
        ));
    }
    match state.reads.job(id).await {
        Ok(_) => Ok(()),
        Err(QueueError::NotFound(_)) => Err(AppError::bad_request(
            "unknown_dependency",
            format!("input.results_of: no job {id:?} (results_of names a job)"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// A payload given as JSON (`payload`) or as raw bytes (`payload_base64`).
pub(super) fn payload_bytes(
    payload: Option<Value>,
    base64: Option<String>,
) -> Result<Vec<u8>, AppError> {
    match (payload, base64) {
        (Some(_), Some(_)) => Err(AppError::bad_request(
            "invalid_field",
            "give payload or payload_base64, not both",
        )),
        (Some(value), None) => Ok(serde_json::to_vec(&value).unwrap_or_default()),
        (None, Some(text)) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| AppError::bad_request("invalid_field", format!("payload_base64: {e}"))),
        (None, None) => Ok(b"null".to_vec()),
    }
}

/// Query of `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SubmitQuery {
    /// Wait up to this long (`2s`, `500ms`; at most 5 min) for the task to
    /// finish and answer with it, result included.
    wait: Option<String>,
}

/// The longest `?wait=` of a synchronous invocation.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

fn parse_wait(text: &str) -> Result<std::time::Duration, AppError> {
    let bad =
        |why: &str| AppError::bad_request("invalid_field", format!("wait: {why}, got {text:?}"));
    let wait =
        humantime::parse_duration(text).map_err(|_| bad("must be a duration like 2s or 500ms"))?;
    if wait > MAX_WAIT {
        return Err(bad("must be at most 5m"));
    }
    Ok(wait)
}

/// `POST /v1/tasks`: 201 `{"id": ...}` once the task is durable. With
/// `?wait=DURATION`: 200 with the finished task (state, result, logs) if
/// it finishes (Completed, Dead or Cancelled) within the wait, else 202
/// `{"id": ...}` once the task is durable. A 200 comes once task and
/// result are durable, unless the body says `"durable": false`: then the
/// task was not queued on disk and the answer did not wait for its write.
#[utoipa::path(post, path = "/v1/tasks", tag = "tasks", request_body = TaskSubmission, params(("wait" = Option<String>, Query, description = "wait up to this long (e.g. 2s, 500ms; at most 5m) for the task to finish and answer with it")), responses((status = 201, description = "durably accepted", body = Created), (status = 200, description = "with ?wait=: finished within the wait, result included", body = TaskView), (status = 202, description = "with ?wait=: accepted, not finished within the wait", body = Created), (status = 400, body = ErrorBody)))]
pub(super) async fn submit(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SubmitQuery>,
    ApiJson(request): ApiJson<TaskSubmission>,
) -> Result<Response, AppError> {
    let wait = query.wait.as_deref().map(parse_wait).transpose()?;
    if request.durable.is_some() && wait.is_none() {
        return Err(AppError::bad_request(
            "invalid_field",
            "durable: only for a synchronous invocation (POST /v1/tasks?wait=...)",
        ));
    }
    let durable = request.durable.unwrap_or(true);
    let mut options = request.options.into_options()?;
    let payload = match request.input {
        Some(input) => {
            fan_in(
                &state,
                &input,
                &request.payload,
                &request.payload_base64,
                wait.is_some(),
            )
            .await?;
            if !options.after.contains(&input.results_of) {
                options.after.push(input.results_of.clone());
            }
            options.results_of = Some(input.results_of);
            // What a component's `run` receives; a command reads stdin instead.
            b"null".to_vec()
        }
        None => payload_bytes(request.payload, request.payload_base64)?,
    };
    if wait.is_some() && !options.after.is_empty() {
        return Err(AppError::bad_request(
            "invalid_field",
            "after: not with ?wait (a synchronous invocation runs at once); submit it, then wait with GET /v1/tasks/{id}",
        ));
    }
    check_dependencies(&state, &options).await?;
    let module = modules::resolve(&state, &request.module).await?;
    let task = NewTask {
        id: format!("t-{}", uuid::Uuid::new_v4().simple()),
        job_id: None,
        module,
        payload,
        options,
    };
    match wait {
        None => {
            let id = task.id.clone();
            state.work.submit_tasks(vec![task]).await?;
            Ok((StatusCode::CREATED, Json(Created { id })).into_response())
        }
        Some(wait) => invoke(&state, task, wait, durable).await,
    }
}

/// The longest a synchronous invocation whose wait ran out waits further
/// for its task to be durable before it is told the id (only a failing
/// store takes that long).
const PERSIST_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A synchronous invocation: 200 with the finished task once it ended
/// (and, if durable, its outcome is durable) within `wait`, else 202 with
/// its id once it is stored. The end comes straight from the store's
/// queue when it can, else from its commits (after a retry, a cancel).
async fn invoke(
    state: &AppState,
    task: NewTask,
    wait: std::time::Duration,
    durable: bool,
) -> Result<Response, AppError> {
    let deadline = tokio::time::Instant::now() + wait;
    let id = task.id.clone();
    let submitted = task.clone();
    // Registered before the submit, so an end however quick is not missed.
    let mut waiting = state.waiters.wait_for(&id);
    let Invocation { mut finished, held } = state.work.invoke(task, durable).await?;
    let ended = tokio::select! {
        biased;
        attempt = &mut finished => match attempt {
            Ok(attempt) => Some(Ended::Handed(attempt.outcome)),
            // The attempt went another way (a retry, a cancel): the
            // commits tell how the task ends.
            Err(_) => tokio::select! {
                Ok(_) = &mut waiting.finished => Some(Ended::Stored),
                _ = tokio::time::sleep_until(deadline) => None,
            },
        },
        // The commit that ended the task hands its attempt over a moment
        // after telling its observers, unless the attempt went another way
        // (the sender is gone then): no need to read the task back. The
        // grace only bounds a hand-over that would never come.
        Ok(_) = &mut waiting.finished => Some(match tokio::time::timeout(HAND_OVER_GRACE, finished).await {
            Ok(Ok(attempt)) => Ended::Handed(attempt.outcome),
            _ => Ended::Stored,
        }),
        _ = tokio::time::sleep_until(deadline) => None,
    };
    let ended = match ended {
        Some(Ended::Handed(outcome)) => {
            Some(views::task_outcome(outcome_record(submitted, outcome)))
        }
        Some(Ended::Stored) => Some(views::task_outcome(state.reads.task(&id).await?)),
        None => None,
    };
    if let Some(view) = ended {
        return Ok((StatusCode::OK, Json(view)).into_response());
    }
    match tokio::time::timeout(PERSIST_LIMIT, held.persist()).await {
        Ok(stored) => stored?,
        Err(_) => {
            return Err(QueueError::Unavailable(format!(
                "task {id} is accepted in memory but not yet durable: the store is not taking writes"
            ))
            .into());
        }
    }
    Ok((StatusCode::ACCEPTED, Json(Created { id })).into_response())
}

/// How long a caller told by the commits that its task ended waits for
/// the store to hand the ended attempt over, before it reads the task back
/// instead (the hand-over follows within microseconds when it comes).
const HAND_OVER_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// How a synchronous invocation's task ended, as its caller learnt it.
enum Ended {
    /// Its attempt was handed over by the store as it ended.
    Handed(Outcome),
    /// Its end was committed another way: read it back.
    Stored,
}

/// The record of an invoked task as its caller submitted it and its
/// attempt ended.
fn outcome_record(task: NewTask, outcome: Outcome) -> TaskRecord {
    let (error_kind, error_message) = outcome.error.unzip();
    TaskRecord {
        id: task.id,
        job_id: None,
        module: task.module,
        payload: task.payload,
        options: task.options,
        state: outcome.state,
        attempts: outcome.attempts,
        worker: Some(outcome.worker),
        timestamps: outcome.timestamps,
        error_kind,
        error_message,
        result: outcome.result,
        logs: outcome.logs,
        progress: outcome.progress,
    }
}

/// `GET /v1/tasks/{id}`: the record, payload, result, logs and timeline.
#[utoipa::path(get, path = "/v1/tasks/{id}", tag = "tasks", params(("id" = String, Path)), responses((status = 200, description = "record, payload, result, logs, timeline", body = TaskView), (status = 404, body = ErrorBody)))]
pub(super) async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, AppError> {
    let mut record = state.reads.task(&id).await?;
    let timeline = state.reads.timeline(&id).await?;
    if record.state == TaskState::Running
        && let Some(progress) = state.board.as_ref().and_then(|b| b.progress_of(&id))
    {
        record.progress = progress;
    }
    Ok(Json(views::task_detail(record, timeline)))
}

/// Query of `GET /v1/tasks`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    job: Option<String>,
    status: Option<String>,
    tag: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/tasks?job=&status=&tag=key=value&after=&limit=`: one page; `next` is the cursor.
#[utoipa::path(get, path = "/v1/tasks", tag = "tasks", params(("job" = Option<String>, Query), ("status" = Option<String>, Query, description = "Pending, Allocated, Running, Completed, Error, Dead or Cancelled"), ("tag" = Option<String>, Query, description = "key=value"), ("after" = Option<u64>, Query, description = "cursor from the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 100")), responses((status = 200, description = "one page and the cursor of the next", body = TaskPage), (status = 400, body = ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<TaskPage>, AppError> {
    let state_filter = match &q.status {
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            AppError::bad_request(
                "invalid_query",
                format!(
                    "status {s:?} is not one of {:?}",
                    TaskState::ALL.map(|s| s.as_str())
                ),
            )
        })?),
        None => None,
    };
    let tag = match &q.tag {
        Some(t) => Some(parse_tag(t).map_err(|e| AppError::bad_request("invalid_query", e))?),
        None => None,
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(AppError::bad_request(
            "invalid_query",
            "limit must be 1 to 1000",
        ));
    }
    let page = state
        .reads
        .tasks(TaskFilter {
            job: q.job,
            state: state_filter,
            tag,
            after: q.after,
            limit,
        })
        .await?;
    Ok(Json(TaskPage {
        items: page.items.into_iter().map(views::task_summary).collect(),
        next: page.next,
    }))
}

/// `POST /v1/tasks/{id}/cancel`.
#[utoipa::path(post, path = "/v1/tasks/{id}/cancel", tag = "tasks", params(("id" = String, Path)), responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn cancel(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    state
        .work
        .control(Control::CancelTask { task: id.clone() })
        .await?;
    Ok(Json(json!({"id": id, "cancelled": true})))
}

impl PriorityChange {
    /// The priority asked for, checked to be 0..=9.
    pub(super) fn checked(&self) -> Result<u8, AppError> {
        if self.priority > 9 {
            return Err(AppError::bad_request(
                "invalid_field",
                "priority must be 0..=9",
            ));
        }
        Ok(self.priority)
    }
}

/// `POST /v1/tasks/{id}/priority`: raise a held task, or reorder a waiting one.
#[utoipa::path(post, path = "/v1/tasks/{id}/priority", tag = "tasks", params(("id" = String, Path)), request_body = PriorityChange, responses((status = 200, body = Object), (status = 400, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub(super) async fn set_priority(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<PriorityChange>,
) -> Result<Json<Value>, AppError> {
    let priority = request.checked()?;
    state
        .work
        .control(Control::TaskPriority {
            task: id.clone(),
            priority,
        })
        .await?;
    Ok(Json(json!({"id": id, "priority": priority})))
}
