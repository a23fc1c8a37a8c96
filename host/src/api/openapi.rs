//! The OpenAPI 3.1 document, generated from the handlers' annotations
//! (utoipa), served at `/openapi.json`, and Swagger UI at `/docs` from the
//! `swagger-ui-dist` files vendored in `host/assets/swagger-ui`.

// The request and error types here only describe wire shapes for the
// document; the handlers build and read those shapes as JSON.
#![allow(dead_code)]

use axum::http::header;
use axum::response::{Html, IntoResponse};
use serde::Deserialize;
use std::collections::BTreeMap;
use utoipa::{OpenApi, ToSchema};

/// The error shape of every 4xx and 5xx response.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct ErrorBody {
    /// `{"code": "invalid_field", "message": "priority: must be 0..=9 ..."}`.
    pub(super) error: ErrorDetail,
}

/// Inside [`ErrorBody`].
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct ErrorDetail {
    /// Stable machine-readable code.
    pub(super) code: String,
    /// What is wrong, for people.
    pub(super) message: String,
}

/// `{"id": "..."}`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct Created {
    /// The new task's id.
    pub(super) id: String,
}

/// Options every submission may carry; all optional.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct TaskOptionsDoc {
    /// 0..=9, 9 highest; 0 holds the task until raised. Default 5.
    priority: Option<u8>,
    /// Key/value labels.
    tags: Option<BTreeMap<String, String>>,
    /// Warm-instance key, e.g. `curve=USD`.
    affinity: Option<String>,
    /// Per attempt, 1 ms to 24 h. Default 60000.
    timeout_ms: Option<u64>,
    /// Linear-memory cap, 1 MiB to 4 GiB. Default 256 MiB.
    memory_bytes: Option<u64>,
    /// 1 to 100. Default 3.
    max_attempts: Option<u32>,
    /// Delayed start, ms from now.
    delay_ms: Option<u64>,
    /// Delayed start, ms since the epoch.
    not_before: Option<u64>,
}

/// Body of `POST /v1/tasks`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct TaskSubmission {
    /// Module id (SHA-256) or name.
    module: String,
    /// The payload as JSON.
    payload: Option<serde_json::Value>,
    /// Or the payload as base64 bytes.
    payload_base64: Option<String>,
    /// Options.
    #[serde(flatten)]
    options: TaskOptionsDoc,
}

/// Body of `POST /v1/jobs`: exactly one of `payloads`, `payloads_base64`, `sweep`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct JobSubmission {
    /// Module id (SHA-256) or name.
    module: String,
    /// A name for people.
    name: Option<String>,
    /// One task per payload (at most 1,000,000).
    payloads: Option<Vec<serde_json::Value>>,
    /// One task per base64 payload.
    payloads_base64: Option<Vec<String>>,
    /// `{"base": {...}, "params": {"spot": {"from": 80, "to": 120, "step": 0.5}, "kind": ["call", "put"]}}`:
    /// the cartesian product, expanded as workers lease tasks.
    sweep: Option<serde_json::Value>,
    /// Options of every task.
    #[serde(flatten)]
    options: TaskOptionsDoc,
}

/// Body of `POST /v1/tasks/{id}/priority`.
#[derive(Debug, Deserialize, ToSchema)]
pub(super) struct PriorityChange {
    /// 0..=9.
    priority: u8,
}

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "KWQ", description = "A WebAssembly compute grid: modules, tasks, jobs, results, events, statistics."),
    paths(
        super::modules::upload, super::modules::list, super::modules::get,
        super::tasks::submit, super::tasks::list, super::tasks::get, super::tasks::cancel, super::tasks::set_priority,
        super::jobs::submit, super::jobs::list, super::jobs::get, super::jobs::results,
        super::jobs::pause, super::jobs::resume, super::jobs::cancel,
        super::events::stream,
        super::system::stats, super::system::healthz, super::system::healthz_root,
        super::system::metrics, super::system::metrics_root,
        openapi_json, docs, swagger_bundle, swagger_css, dashboard,
    ),
    components(schemas(ErrorBody, ErrorDetail, Created, TaskSubmission, JobSubmission, PriorityChange, crate::queue::ModuleRecord)),
    tags(
        (name = "modules", description = "Wasm task modules, content-addressed by SHA-256"),
        (name = "tasks", description = "Single tasks"),
        (name = "jobs", description = "Jobs: explicit payloads or lazily expanded sweeps"),
        (name = "events", description = "The tracker topic as server-sent events"),
        (name = "system", description = "Statistics, health, metrics, documentation"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "system", responses((status = 200, description = "this document", body = Object)))]
pub(super) async fn openapi_json() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}

const DASHBOARD: &str = include_str!("../../assets/dashboard/index.html");

/// `GET /`: the operators' dashboard (one static page; live data from
/// `/v1/stats` and `/v1/events`).
#[utoipa::path(get, path = "/", tag = "system", responses((status = 200, description = "dashboard", content_type = "text/html", body = String)))]
pub(super) async fn dashboard() -> Html<&'static str> {
    Html(DASHBOARD)
}

const SWAGGER_BUNDLE: &str = include_str!("../../assets/swagger-ui/swagger-ui-bundle.js");
const SWAGGER_CSS: &str = include_str!("../../assets/swagger-ui/swagger-ui.css");

/// `GET /docs`: Swagger UI over `/openapi.json`.
#[utoipa::path(get, path = "/docs", tag = "system", responses((status = 200, description = "Swagger UI", content_type = "text/html", body = String)))]
pub(super) async fn docs() -> Html<&'static str> {
    Html(
        r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>KWQ API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script>window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});</script>
</body></html>"##,
    )
}

/// `GET /docs/swagger-ui-bundle.js`.
#[utoipa::path(get, path = "/docs/swagger-ui-bundle.js", tag = "system", responses((status = 200, description = "vendored swagger-ui-dist", content_type = "application/javascript", body = String)))]
pub(super) async fn swagger_bundle() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "application/javascript"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        SWAGGER_BUNDLE,
    )
}

/// `GET /docs/swagger-ui.css`.
#[utoipa::path(get, path = "/docs/swagger-ui.css", tag = "system", responses((status = 200, description = "vendored swagger-ui-dist", content_type = "text/css", body = String)))]
pub(super) async fn swagger_css() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        SWAGGER_CSS,
    )
}
