//! The HTTP API under `/v1` (axum): modules, tasks, jobs, results, events,
//! statistics. `app(state)` builds the router without a socket so tests
//! drive it with `oneshot`; `serve` runs it on a listener until shutdown.

mod error;
mod events;
mod guard;
mod jobs;
mod module_names;
mod modules;
pub mod openapi;
mod streams;
mod system;
mod tasks;
mod views;
mod waiters;
pub mod wire;
mod workers;

pub use error::AppError;
pub use events::EventFeed;
pub use guard::AllowedHosts;

use crate::dispatch::{RetryPolicy, WorkerBoard};
use crate::queue::remote::{Hub, HubConfig};
use crate::queue::{Queue, ReadStore, WorkQueue};
use crate::tracker::Tracker;
use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post};
use std::future::Future;
use std::sync::Arc;

/// Limits on what one request may carry.
#[derive(Debug, Clone)]
pub struct ApiLimits {
    /// Largest module upload, bytes.
    pub module_bytes: usize,
    /// Largest job submission body, bytes.
    pub job_bytes: usize,
    /// Largest body of every other request, bytes.
    pub other_bytes: usize,
    /// Most explicit payloads in one job.
    pub job_tasks: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            module_bytes: 64 << 20,
            job_bytes: 256 << 20,
            other_bytes: 4 << 20,
            job_tasks: 1_000_000,
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// The store's work side: submits and controls.
    pub work: Arc<dyn WorkQueue>,
    /// The store's read side: records, listings, results, events.
    pub reads: Arc<dyn ReadStore>,
    /// Validates (by compiling) and stores uploaded modules.
    pub modules: crate::dispatch::ModuleRegistry,
    /// Live statistics.
    pub tracker: Arc<Tracker>,
    /// Worker status, when this host runs workers.
    pub board: Option<Arc<WorkerBoard>>,
    /// Bearer token required on write endpoints, if set.
    pub token: Option<String>,
    /// Whether reads of the grid's data (tasks, payloads, results, jobs,
    /// modules, events, statistics, metrics) need the token too. Health,
    /// the dashboard page and the API documentation stay open.
    pub token_reads: bool,
    /// Request limits.
    pub limits: ApiLimits,
    /// The `Host` names this host answers to (DNS-rebinding guard).
    pub allowed_hosts: AllowedHosts,
    /// Stored events, serialised once for every `/v1/events` client.
    pub events: EventFeed,
    /// Remote workers and their leases (the worker protocol).
    pub hub: Arc<Hub>,
    /// Bearer token the worker protocol needs, if set (else `token`, if set).
    pub worker_token: Option<String>,
    /// Callers of `POST /v1/tasks?wait=` waiting for their task.
    pub waiters: Arc<waiters::Waiters>,
    /// Module names and ids known to be stored (no store read per submission).
    pub module_names: Arc<module_names::ModuleNames>,
    /// A worker-only host of a Kafka grid (`--role worker`): it keeps no
    /// view, so it serves health, metrics and the worker protocol only, and
    /// answers everything else with a 404 that says where to go.
    pub worker_only: bool,
}

impl AppState {
    /// The API of a host over `queue` (both its sides), answering to
    /// `allowed_hosts`, with no token, no workers and default limits;
    /// callers set what differs.
    pub fn new(
        queue: Arc<dyn Queue>,
        modules: crate::dispatch::ModuleRegistry,
        tracker: Arc<Tracker>,
        allowed_hosts: AllowedHosts,
    ) -> Self {
        let remote = HubConfig {
            lease_ttl: std::time::Duration::from_secs(30),
            retry_delay: Arc::new(|attempt| RetryPolicy::default().delay(attempt)),
        };
        Self::with_remote_workers(queue, modules, tracker, allowed_hosts, remote)
    }

    /// As [`AppState::new`], with remote workers' leases timed and retried
    /// by `remote` (a host's `--worker-lease` and its retry policy).
    pub fn with_remote_workers(
        queue: Arc<dyn Queue>,
        modules: crate::dispatch::ModuleRegistry,
        tracker: Arc<Tracker>,
        allowed_hosts: AllowedHosts,
        remote: HubConfig,
    ) -> Self {
        let hub = Hub::new(queue.clone(), remote);
        if tokio::runtime::Handle::try_current().is_ok() {
            hub.start_reaper();
        }
        let waiters = Arc::new(waiters::Waiters::default());
        queue.observe(waiters.clone());
        let module_names = Arc::new(module_names::ModuleNames::default());
        queue.observe(module_names.clone());
        AppState {
            module_names,
            hub,
            worker_token: None,
            waiters,
            work: queue.clone(),
            reads: queue,
            modules,
            tracker,
            board: None,
            token: None,
            token_reads: false,
            limits: ApiLimits::default(),
            allowed_hosts,
            events: EventFeed::default(),
            worker_only: false,
        }
    }
}

/// Every route of [`app`], as (method, path): the OpenAPI document must
/// describe exactly these (tested), so a new route without documentation fails CI.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/modules"),
    ("get", "/v1/modules"),
    ("get", "/v1/modules/{id}"),
    ("post", "/v1/tasks"),
    ("get", "/v1/tasks"),
    ("get", "/v1/tasks/{id}"),
    ("post", "/v1/tasks/{id}/cancel"),
    ("post", "/v1/tasks/{id}/priority"),
    ("post", "/v1/jobs"),
    ("post", "/v1/jobs/stream"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("get", "/v1/jobs/{id}/results"),
    ("post", "/v1/jobs/{id}/pause"),
    ("post", "/v1/jobs/{id}/resume"),
    ("post", "/v1/jobs/{id}/cancel"),
    ("delete", "/v1/jobs/{id}"),
    ("post", "/v1/jobs/{id}/priority"),
    ("get", "/v1/events"),
    ("get", "/v1/stats"),
    ("get", "/v1/healthz"),
    ("get", "/healthz"),
    ("get", "/v1/metrics"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
    ("get", "/docs/"),
    ("get", "/docs/swagger-ui-bundle.js"),
    ("get", "/docs/swagger-ui.css"),
    ("get", "/"),
    ("post", "/v1/workers"),
    ("get", "/v1/workers"),
    ("delete", "/v1/workers/{id}"),
    ("post", "/v1/workers/{id}/lease"),
    ("post", "/v1/workers/{id}/heartbeat"),
    ("post", "/v1/workers/{id}/report"),
    ("get", "/v1/workers/modules/{id}"),
    ("get", "/v1/workers/results/{job}"),
];

/// The router with every endpoint.
pub fn app(state: AppState) -> Router {
    let limits = state.limits.clone();
    let writes = Router::new()
        .route(
            "/v1/modules",
            post(modules::upload).layer(DefaultBodyLimit::max(limits.module_bytes)),
        )
        .route(
            "/v1/jobs",
            post(jobs::submit).layer(DefaultBodyLimit::max(limits.job_bytes)),
        )
        // Read as it arrives, line by line: no limit on the whole body.
        .route("/v1/jobs/stream", post(streams::submit))
        .route("/v1/tasks", post(tasks::submit))
        .route("/v1/tasks/{id}/cancel", post(tasks::cancel))
        .route("/v1/tasks/{id}/priority", post(tasks::set_priority))
        .route("/v1/jobs/{id}/pause", post(jobs::pause))
        .route("/v1/jobs/{id}/resume", post(jobs::resume))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .route("/v1/jobs/{id}/priority", post(jobs::set_priority))
        .route("/v1/jobs/{id}", delete(jobs::delete))
        .layer(DefaultBodyLimit::max(limits.other_bytes))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let workers = Router::new()
        .route("/v1/workers", post(workers::register))
        .route("/v1/workers/{id}", delete(workers::deregister))
        .route("/v1/workers/{id}/lease", post(workers::lease))
        .route("/v1/workers/{id}/heartbeat", post(workers::heartbeat))
        .route(
            "/v1/workers/{id}/report",
            post(workers::report).layer(DefaultBodyLimit::max(limits.job_bytes)),
        )
        .route("/v1/workers/modules/{id}", get(workers::module_bytes))
        .route("/v1/workers/results/{job}", get(workers::result_page))
        .layer(DefaultBodyLimit::max(limits.other_bytes))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_worker_token,
        ));
    let metrics = Router::new()
        .route("/metrics", get(system::metrics_root))
        .route("/v1/metrics", get(system::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_read_token,
        ));
    let health = Router::new()
        .route("/v1/healthz", get(system::healthz))
        .route("/healthz", get(system::healthz_root));
    if state.worker_only {
        return workers
            .merge(metrics)
            .merge(health)
            .fallback(system::not_on_a_worker_host)
            .layer(middleware::from_fn_with_state(state.clone(), guard::check))
            .with_state(state);
    }
    let reads = Router::new()
        .route("/v1/workers", get(workers::list))
        .route("/v1/modules", get(modules::list))
        .route("/v1/modules/{id}", get(modules::get))
        .route("/v1/tasks", get(tasks::list))
        .route("/v1/tasks/{id}", get(tasks::get))
        .route("/v1/jobs", get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/results", get(jobs::results))
        .route("/v1/events", get(events::stream))
        .route("/v1/stats", get(system::stats))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_read_token,
        ));
    let open = Router::new()
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/", get(openapi::dashboard))
        .route("/docs", get(openapi::docs))
        .route("/docs/", get(openapi::docs_slash))
        .route("/docs/swagger-ui-bundle.js", get(openapi::swagger_bundle))
        .route("/docs/swagger-ui.css", get(openapi::swagger_css));
    writes
        .merge(workers)
        .merge(reads)
        .merge(metrics)
        .merge(health)
        .merge(open)
        .fallback(system::not_found)
        .method_not_allowed_fallback(system::method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard::check))
        .with_state(state)
}

/// Reject reads without the configured bearer token, under `--token-reads`.
async fn require_read_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    if state.token_reads {
        check_token(&state, &request)?;
    }
    Ok(next.run(request).await)
}

/// Reject worker-protocol requests without the worker token (or, when no
/// worker token is set, the submitters' token, if that is set).
async fn require_worker_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    let wanted = state.worker_token.as_ref().or(state.token.as_ref());
    check_bearer(wanted.map(String::as_str), &request)?;
    Ok(next.run(request).await)
}

/// Reject writes without the configured bearer token.
async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    check_token(&state, &request)?;
    Ok(next.run(request).await)
}

/// Whether the request carries the configured token (if one is set).
fn check_token(state: &AppState, request: &Request) -> Result<(), AppError> {
    check_bearer(state.token.as_deref(), request)
}

/// Whether the request carries `token` as its bearer token (if one is wanted).
fn check_bearer(token: Option<&str>, request: &Request) -> Result<(), AppError> {
    if let Some(token) = token {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Constant time, so response timing does not reveal how much of a
        // guess was right (the length of the token is not secret).
        use subtle::ConstantTimeEq;
        let matches = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token.as_bytes())));
        if !matches {
            return Err(AppError::unauthorized());
        }
    }
    Ok(())
}

/// Serve the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Peer addresses are kept for the workers table (where each worker is).
    let service = app(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown)
        .await
}
