//! `/v1/stats`, health, and the JSON 404.

use super::AppState;
use super::error::AppError;
#[allow(unused_imports)]
use super::wire::ErrorBody;
use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// `GET /v1/stats`: counts per state and tag, queue depth per priority,
/// throughput, retries, dead letters, workers, module cache.
#[utoipa::path(get, path = "/v1/stats", tag = "system", responses((status = 200, description = "counts, tags, depth, throughput, workers, module cache", body = Object)))]
pub(super) async fn stats(State(state): State<AppState>) -> Json<Value> {
    let overview = state.tracker.overview(state.reads.depth());
    let mut value = serde_json::to_value(&overview).unwrap_or(Value::Null);
    value["counts"] = json!(overview.counts.by_name());
    value["tags"] = Value::Array(
        overview
            .tags
            .iter()
            .map(|t| json!({"tag": t.tag, "counts": t.counts.by_name()}))
            .collect(),
    );
    value["remote_workers"] = json!(state.hub.workers());
    if let Some(board) = &state.board {
        value["workers"] = json!(board.snapshot());
        value["busy_ratio"] = json!(board.busy_ratio());
    }
    value["module_cache"] = json!(state.modules.stats());
    Json(value)
}

/// `GET /healthz`.
#[utoipa::path(get, path = "/v1/healthz", tag = "system", responses((status = 200, description = "{\"status\": \"ok\"}", body = Object), (status = 503, description = "{\"status\": \"unhealthy\", \"reason\": ...}: the store does not take writes", body = Object)))]
pub(super) async fn healthz(State(state): State<AppState>) -> Response {
    match state.work.health() {
        Ok(()) => Json(json!({"status": "ok"})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            Json(json!({"status": "unhealthy", "reason": reason})),
        )
            .into_response(),
    }
}

/// Any unknown path.
pub(super) async fn not_found(uri: Uri) -> AppError {
    AppError::not_found(format!("no endpoint at {}", uri.path()))
}

/// Anything but health, metrics and the worker protocol, asked of a
/// worker-only host (`--role worker`): it keeps no view to answer from.
pub(super) async fn not_on_a_worker_host(uri: Uri) -> AppError {
    AppError {
        status: axum::http::StatusCode::NOT_FOUND,
        code: "worker_host",
        message: format!(
            "this host runs tasks only (--role worker) and serves no {}; ask an API host of the grid (--role api or all)",
            uri.path()
        ),
    }
}

/// A known path with a method it does not take: 405 in the one error shape.
pub(super) async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> AppError {
    AppError {
        status: axum::http::StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: format!("{} does not take {method}", uri.path()),
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/v1/metrics", tag = "system", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub(super) async fn metrics(State(state): State<AppState>) -> impl axum::response::IntoResponse {
    let overview = state.tracker.overview(state.reads.depth());
    let (busy_ratio, affinity_hits) = match &state.board {
        Some(board) => (
            Some(board.busy_ratio()),
            board.snapshot().iter().map(|w| w.affinity_hits).sum(),
        ),
        None => (None, 0),
    };
    let text = crate::tracker::metrics::render(crate::tracker::metrics::ScrapeInputs {
        overview: &overview,
        busy_ratio,
        affinity_hits,
        cache: state.modules.stats(),
        outstanding_seconds: state.tracker.outstanding_seconds(),
        kafka: state.work.kafka_traffic(),
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}

/// `GET /healthz` (for load balancers and Kubernetes probes).
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Object), (status = 503, description = "the store does not take writes", body = Object)))]
pub(super) async fn healthz_root(state: State<AppState>) -> Response {
    healthz(state).await
}

/// `GET /metrics` (where Prometheus looks by default).
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub(super) async fn metrics_root(state: State<AppState>) -> impl axum::response::IntoResponse {
    metrics(state).await
}
