//! The OpenAPI 3.1 document, generated from the handlers' annotations
//! (utoipa), served at `/openapi.json`, and Swagger UI at `/docs` from the
//! `swagger-ui-dist` files vendored in `host/assets/swagger-ui`.

use super::wire::{
    Created, Deleted, ErrorBody, ErrorDetail, JobSubmission, JobView, PriorityChange,
    SubmitOptions, TaskPage, TaskSubmission, TaskView,
};
use axum::http::header;
use axum::response::{Html, IntoResponse};
use utoipa::OpenApi;

/// What the derives cannot say: which fields exclude each other, that
/// unknown fields are rejected. Added to the generated document by name.
fn with_constraints(mut doc: serde_json::Value) -> serde_json::Value {
    use serde_json::json;
    let not_both = |a: &str, b: &str| json!({"not": {"required": [a, b]}});
    let rules = [
        (
            "TaskSubmission",
            vec![
                not_both("payload", "payload_base64"),
                not_both("delay_ms", "not_before"),
            ],
        ),
        (
            "JobSubmission",
            vec![
                json!({"oneOf": [
                    {"required": ["payloads"]},
                    {"required": ["payloads_base64"]},
                    {"required": ["sweep"]}
                ]}),
                not_both("delay_ms", "not_before"),
            ],
        ),
        ("PriorityChange", vec![]),
        ("Completed", vec![not_both("result", "result_base64")]),
    ];
    // Bounds utoipa's derive has no attribute for, by JSON pointer.
    let bounds = [
        (
            "/components/schemas/SubmitOptions/properties/tags",
            "maxProperties",
            json!(64),
        ),
        (
            "/components/schemas/Sweep/properties/params",
            "minProperties",
            json!(1),
        ),
        (
            "/components/schemas/SweepAxis/oneOf/1",
            "minItems",
            json!(1),
        ),
    ];
    for (pointer, key, value) in bounds {
        if let Some(serde_json::Value::Object(schema)) = doc.pointer_mut(pointer) {
            schema.insert(key.to_string(), value);
        }
    }
    for (name, mut rules) in rules {
        let Some(schema) = doc.pointer_mut(&format!("/components/schemas/{name}")) else {
            continue;
        };
        let original = schema.take();
        rules.insert(0, original);
        *schema = json!({"allOf": rules, "unevaluatedProperties": false});
    }
    doc
}

/// The document served at `/openapi.json`: generated from the handlers,
/// with [`with_constraints`].
pub fn document() -> serde_json::Value {
    with_constraints(serde_json::to_value(ApiDoc::openapi()).unwrap_or_default())
}

/// The whole API.
#[derive(OpenApi)]
#[openapi(
    info(title = "KWQ", description = "A WebAssembly compute grid: modules, tasks, jobs, results, events, statistics."),
    paths(
        super::modules::upload, super::modules::list, super::modules::get,
        super::tasks::submit, super::tasks::list, super::tasks::get, super::tasks::cancel, super::tasks::set_priority,
        super::jobs::submit, super::streams::submit, super::jobs::list, super::jobs::get, super::jobs::results,
        super::jobs::pause, super::jobs::resume, super::jobs::cancel, super::jobs::set_priority, super::jobs::delete,
        super::events::stream,
        super::system::stats, super::system::healthz, super::system::healthz_root,
        super::system::metrics, super::system::metrics_root,
        openapi_json, docs, docs_slash, swagger_bundle, swagger_css, dashboard,
        super::workers::register, super::workers::list, super::workers::deregister,
        super::workers::lease, super::workers::heartbeat, super::workers::report,
        super::workers::module_bytes, super::workers::result_page,
    ),
    components(schemas(ErrorBody, ErrorDetail, Created, TaskSubmission, super::wire::TaskInput, JobSubmission, JobView, TaskView, TaskPage, Deleted, PriorityChange, SubmitOptions, crate::queue::ModuleRecord)),
    tags(
        (name = "modules", description = "Wasm task modules, content-addressed by SHA-256"),
        (name = "tasks", description = "Single tasks"),
        (name = "jobs", description = "Jobs: explicit payloads or lazily expanded sweeps"),
        (name = "events", description = "The tracker topic as server-sent events"),
        (name = "system", description = "Statistics, health, metrics, documentation"),
        (name = "workers", description = "The worker protocol: register, lease batches by long poll, heartbeat, report outcomes (docs/worker-protocol.md)"),
    )
)]
pub struct ApiDoc;

/// `GET /openapi.json`.
#[utoipa::path(get, path = "/openapi.json", tag = "system", responses((status = 200, description = "this document", body = Object)))]
pub(super) async fn openapi_json() -> impl IntoResponse {
    axum::Json(document())
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

/// `GET /docs/`: where people and link checkers often go; the page lives at `/docs`.
#[utoipa::path(get, path = "/docs/", tag = "system", responses((status = 308, description = "to /docs")))]
pub(super) async fn docs_slash() -> axum::response::Redirect {
    axum::response::Redirect::permanent("/docs")
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
