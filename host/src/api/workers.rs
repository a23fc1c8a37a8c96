//! `/v1/workers`: the worker protocol, by which worker machines (`kwq
//! worker`) and any other program lease tasks and report how they went.
//! The handlers only translate HTTP; the protocol's rules (leases that
//! lapse, stale tokens refused) live in [`crate::queue::remote::Hub`].

use super::AppState;
use super::error::{ApiJson, ApiQuery, AppError};
use super::wire::ErrorBody;
use crate::model::{MAX_RESULTS_PER_PAGE, ModuleId};
use crate::queue::remote::HubError;
use crate::queue::remote::wire::{
    Heartbeat, HeartbeatReply, LeaseBatch, LeaseRequest, PagedResult, Register, Registration,
    RemoteWorkerView, Report, ReportReply, ResultPage,
};
use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

impl From<HubError> for AppError {
    fn from(e: HubError) -> Self {
        let (status, code) = match &e {
            HubError::UnknownWorker(_) => (StatusCode::NOT_FOUND, "unknown_worker"),
            HubError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_field"),
            HubError::Closed => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        };
        AppError {
            status,
            code,
            message: e.to_string(),
        }
    }
}

/// Where a request came from, if the server was started with peer addresses.
fn peer(extensions: &axum::http::Extensions) -> String {
    extensions
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(
            || "unknown".into(),
            |ConnectInfo(addr)| addr.ip().to_string(),
        )
}

/// `POST /v1/workers`: register a worker.
#[utoipa::path(post, path = "/v1/workers", tag = "workers", request_body = Register, responses((status = 200, body = Registration), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub(super) async fn register(
    State(state): State<AppState>,
    extensions: axum::http::Extensions,
    ApiJson(request): ApiJson<Register>,
) -> Result<Json<Registration>, AppError> {
    Ok(Json(state.hub.register(request, peer(&extensions))?))
}

/// `GET /v1/workers`: the remote workers registered here.
#[utoipa::path(get, path = "/v1/workers", tag = "workers", responses((status = 200, body = Vec<RemoteWorkerView>)))]
pub(super) async fn list(State(state): State<AppState>) -> Json<Vec<RemoteWorkerView>> {
    Json(state.hub.workers())
}

/// `DELETE /v1/workers/{id}`: a worker stopping cleanly; its leases go back at once.
#[utoipa::path(delete, path = "/v1/workers/{id}", tag = "workers", params(("id" = String, Path, description = "worker id from the registration")), responses((status = 204), (status = 404, body = ErrorBody)))]
pub(super) async fn deregister(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<StatusCode, AppError> {
    state.hub.deregister(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/workers/{id}/lease`: up to `max` tasks, long-polling up to
/// `wait_ms` for the first.
#[utoipa::path(post, path = "/v1/workers/{id}/lease", tag = "workers", params(("id" = String, Path, description = "worker id")), request_body = LeaseRequest, responses((status = 200, body = LeaseBatch), (status = 400, body = ErrorBody), (status = 404, description = "unknown worker: register again", body = ErrorBody)))]
pub(super) async fn lease(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(request): ApiJson<LeaseRequest>,
) -> Result<Json<LeaseBatch>, AppError> {
    let leases = state.hub.lease(&id, request).await?;
    Ok(Json(LeaseBatch { leases }))
}

/// `POST /v1/workers/{id}/heartbeat`: renew held leases; hear of cancelled and lost ones.
#[utoipa::path(post, path = "/v1/workers/{id}/heartbeat", tag = "workers", params(("id" = String, Path, description = "worker id")), request_body = Heartbeat, responses((status = 200, body = HeartbeatReply), (status = 404, description = "unknown worker: register again", body = ErrorBody)))]
pub(super) async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(beat): ApiJson<Heartbeat>,
) -> Result<Json<HeartbeatReply>, AppError> {
    Ok(Json(state.hub.heartbeat(&id, beat)?))
}

/// `POST /v1/workers/{id}/report`: started, completed, failed and released
/// tasks in one batch. 409 `stale_lease` if any item's lease is no longer
/// held (the others are recorded; the body lists which were refused).
#[utoipa::path(post, path = "/v1/workers/{id}/report", tag = "workers", params(("id" = String, Path, description = "worker id")), request_body = Report, responses((status = 200, body = ReportReply), (status = 409, description = "some items refused: `error` plus this reply's fields", body = ReportReply), (status = 400, body = ErrorBody)))]
pub(super) async fn report(
    State(state): State<AppState>,
    Path(id): Path<String>,
    ApiJson(report): ApiJson<Report>,
) -> Response {
    let reply = state.hub.report(&id, report);
    if reply.refused.is_empty() {
        return Json(reply).into_response();
    }
    let message = format!(
        "{} of {} reports name leases no longer held or bad results (first: {}: {})",
        reply.refused.len(),
        reply.refused.len() + reply.recorded as usize,
        reply.refused[0].task_id,
        reply.refused[0].message
    );
    let body = json!({
        "error": {"code": "stale_lease", "message": message},
        "recorded": reply.recorded,
        "refused": reply.refused,
    });
    (StatusCode::CONFLICT, Json(body)).into_response()
}

/// `GET /v1/workers/modules/{id}`: a module's bytes, by id (workers keep
/// them on disk; the id is their SHA-256, so a worker checks what it got).
#[utoipa::path(get, path = "/v1/workers/modules/{id}", tag = "workers", params(("id" = String, Path, description = "module id (SHA-256)")), responses((status = 200, description = "the module's bytes", content_type = "application/wasm"), (status = 404, body = ErrorBody)))]
pub(super) async fn module_bytes(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let module = ModuleId::parse(&id).ok_or_else(|| {
        AppError::bad_request(
            "invalid_module",
            format!("{id:?} is not a module id (64 hex digits)"),
        )
    })?;
    let hub = state.hub.clone();
    let bytes = tokio::task::spawn_blocking(move || hub.module_bytes(&module))
        .await
        .map_err(|e| AppError::internal(e.to_string()))?
        .ok_or_else(|| AppError::not_found(format!("module {id} not found")))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/wasm")],
        bytes,
    )
        .into_response())
}

/// Query of `GET /v1/workers/results/{job}`.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct ResultPageQuery {
    /// Cursor: the `seq` of the last result already read (0: from the first).
    #[serde(default)]
    after: u64,
    /// Results in the page, 1 to 4096. Default 256.
    limit: Option<usize>,
}

/// `GET /v1/workers/results/{job}`: a page of a job's completed results,
/// in task order, for a worker running a fan-in task (one submitted with
/// `"input": {"results_of": JOB}`). With the worker token, like the rest
/// of the protocol, so a worker needs no submitter's credentials.
#[utoipa::path(get, path = "/v1/workers/results/{job}", tag = "workers", params(("job" = String, Path, description = "job id"), ResultPageQuery), responses((status = 200, body = ResultPage), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub(super) async fn result_page(
    State(state): State<AppState>,
    Path(job): Path<String>,
    ApiQuery(query): ApiQuery<ResultPageQuery>,
) -> Result<Json<ResultPage>, AppError> {
    let limit = query.limit.unwrap_or(256);
    if !(1..=MAX_RESULTS_PER_PAGE).contains(&limit) {
        return Err(AppError::bad_request(
            "invalid_field",
            format!("limit: must be 1 to {MAX_RESULTS_PER_PAGE}, got {limit}"),
        ));
    }
    state.reads.job(&job).await?;
    let page = state.work.input_results(&job, query.after, limit).await?;
    let engine = base64::engine::general_purpose::STANDARD;
    Ok(Json(ResultPage {
        results: page
            .into_iter()
            .map(|r| PagedResult {
                seq: r.seq,
                task_id: r.task_id,
                result_base64: base64::Engine::encode(&engine, &r.result),
            })
            .collect(),
    }))
}
