//! `/v1/tasks`: submit one task, look one up with its timeline, list with
//! filters, cancel, change priority.

use super::error::{ApiJson, ApiQuery, AppError};
use super::{AppState, modules, views};
use crate::model::{NewTask, TaskOptions, TaskState, now_ms};
use crate::queue::TaskFilter;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Options a submitter may set; anything left out gets its default. It is
/// flattened into request bodies, so it also catches their unknown fields.
#[derive(Debug, Default, Deserialize)]
pub(super) struct OptionsRequest {
    priority: Option<u8>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    affinity: Option<String>,
    timeout_ms: Option<u64>,
    memory_bytes: Option<u64>,
    max_attempts: Option<u32>,
    /// Start no earlier than this many ms from now.
    delay_ms: Option<u64>,
    /// Start no earlier than this time (ms since the epoch).
    not_before: Option<u64>,
    /// Fields nobody asked for: rejected, so a typo is not silently ignored.
    #[serde(flatten)]
    unknown: BTreeMap<String, Value>,
}

impl OptionsRequest {
    /// Check every field and fill in defaults.
    pub(super) fn into_options(self) -> Result<TaskOptions, AppError> {
        if let Some(field) = self.unknown.keys().next() {
            return Err(AppError::bad_request("invalid_field", format!("unknown field {field:?}")));
        }
        let defaults = TaskOptions::default();
        let bad = |field: &str, why: &str| AppError::bad_request("invalid_field", format!("{field}: {why}"));
        let priority = self.priority.unwrap_or(defaults.priority);
        if priority > 9 {
            return Err(bad("priority", &format!("must be 0..=9 (9 highest, 0 holds the task), got {priority}")));
        }
        let timeout_ms = self.timeout_ms.unwrap_or(defaults.timeout_ms);
        if timeout_ms == 0 || timeout_ms > 86_400_000 {
            return Err(bad("timeout_ms", "must be 1 ms to 24 h"));
        }
        let memory_bytes = self.memory_bytes.unwrap_or(defaults.memory_bytes);
        if !(1 << 20..=4 << 30).contains(&memory_bytes) {
            return Err(bad("memory_bytes", "must be 1 MiB to 4 GiB"));
        }
        let max_attempts = self.max_attempts.unwrap_or(defaults.max_attempts);
        if !(1..=100).contains(&max_attempts) {
            return Err(bad("max_attempts", "must be 1 to 100"));
        }
        if let Some(key) = &self.affinity
            && (key.is_empty() || key.len() > 256)
        {
            return Err(bad("affinity", "must be 1 to 256 characters"));
        }
        if self.tags.len() > 64 || self.tags.iter().any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 256) {
            return Err(bad("tags", "at most 64 tags, keys 1-128 characters, values up to 256"));
        }
        let not_before = match (self.delay_ms, self.not_before) {
            (Some(_), Some(_)) => return Err(bad("delay_ms", "give delay_ms or not_before, not both")),
            (Some(delay), None) => Some(now_ms() + delay),
            (None, at) => at,
        };
        Ok(TaskOptions { priority, tags: self.tags, affinity: self.affinity, timeout_ms, memory_bytes, max_attempts, not_before })
    }
}

/// A payload given as JSON (`payload`) or as raw bytes (`payload_base64`).
pub(super) fn payload_bytes(payload: Option<Value>, base64: Option<String>) -> Result<Vec<u8>, AppError> {
    match (payload, base64) {
        (Some(_), Some(_)) => Err(AppError::bad_request("invalid_field", "give payload or payload_base64, not both")),
        (Some(value), None) => Ok(serde_json::to_vec(&value).unwrap_or_default()),
        (None, Some(text)) => base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| AppError::bad_request("invalid_field", format!("payload_base64: {e}"))),
        (None, None) => Ok(b"null".to_vec()),
    }
}

/// Body of `POST /v1/tasks`.
#[derive(Debug, Deserialize)]
pub(super) struct SubmitRequest {
    module: String,
    payload: Option<Value>,
    payload_base64: Option<String>,
    #[serde(flatten)]
    options: OptionsRequest,
}

/// `POST /v1/tasks`: 201 `{"id": ...}` once the task is durable.
pub(super) async fn submit(
    State(state): State<AppState>,
    ApiJson(request): ApiJson<SubmitRequest>,
) -> Result<(StatusCode, Json<Value>), AppError> {
    let options = request.options.into_options()?;
    let module = modules::resolve(&state, &request.module).await?;
    let payload = payload_bytes(request.payload, request.payload_base64)?;
    let id = format!("t-{}", uuid::Uuid::new_v4().simple());
    state.queue.submit_tasks(vec![NewTask { id: id.clone(), job_id: None, module, payload, options }]).await?;
    Ok((StatusCode::CREATED, Json(json!({"id": id}))))
}

/// `GET /v1/tasks/{id}`: the record, payload, result, logs and timeline.
pub(super) async fn get(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    let record = state.queue.task(&id).await?;
    let timeline = state.queue.timeline(&id).await?;
    let mut value = views::task(&record, true);
    if record.state == TaskState::Running
        && let Some(progress) = state.board.as_ref().and_then(|b| b.progress_of(&id))
    {
        value["progress"] = json!(progress);
    }
    value["timeline"] = Value::Array(timeline.iter().map(views::event).collect());
    Ok(Json(value))
}

/// Query of `GET /v1/tasks`.
#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    job: Option<String>,
    status: Option<String>,
    tag: Option<String>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// `GET /v1/tasks?job=&status=&tag=key=value&after=&limit=`: one page; `next` is the cursor.
pub(super) async fn list(State(state): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Json<Value>, AppError> {
    let state_filter = match &q.status {
        Some(s) => Some(TaskState::parse(s).ok_or_else(|| {
            AppError::bad_request("invalid_query", format!("status {s:?} is not one of {:?}", TaskState::ALL.map(|s| s.as_str())))
        })?),
        None => None,
    };
    let tag = match &q.tag {
        Some(t) => Some(
            t.split_once('=')
                .or_else(|| t.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| AppError::bad_request("invalid_query", "tag must look like key=value"))?,
        ),
        None => None,
    };
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 1000 {
        return Err(AppError::bad_request("invalid_query", "limit must be 1 to 1000"));
    }
    let page = state.queue.tasks(TaskFilter { job: q.job, state: state_filter, tag, after: q.after, limit }).await?;
    Ok(Json(json!({
        "items": page.items.iter().map(|t| views::task(t, false)).collect::<Vec<_>>(),
        "next": page.next,
    })))
}

/// `POST /v1/tasks/{id}/cancel`.
pub(super) async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<Json<Value>, AppError> {
    state.queue.cancel_task(&id).await?;
    Ok(Json(json!({"id": id, "cancelled": true})))
}

/// Body of `POST /v1/tasks/{id}/priority`.
#[derive(Debug, Deserialize)]
pub(super) struct PriorityRequest {
    priority: u8,
}

/// `POST /v1/tasks/{id}/priority`: raise a held task, or reorder a waiting one.
pub(super) async fn set_priority(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<PriorityRequest>,
) -> Result<Json<Value>, AppError> {
    if request.priority > 9 {
        return Err(AppError::bad_request("invalid_field", "priority must be 0..=9"));
    }
    state.queue.set_priority(&id, request.priority).await?;
    Ok(Json(json!({"id": id, "priority": request.priority})))
}
