//! KWQ: a WebAssembly task executor and compute grid.
//!
//! Table of contents, in dependency order (each module uses only those
//! below it; `../shared/architecture.json` holds the same picture and
//! `farm-studio draw` checks the code against it):
//! - [`cli`]: the `kwq` subcommands (`serve`, `worker`, `run`, client
//!   commands, `bench`, `simulate`). Configures and reads hosts through [`server`].
//! - [`server`]: the one place a host is assembled: [`server::Host::start`]
//!   opens the store, starts the runtime, tracker, workers and HTTP API,
//!   for `kwq serve`, the local grids of `bench`/`simulate` and the tests;
//!   [`server::WorkerHost::start`] assembles a worker machine (`kwq worker`):
//!   the same runtime and workers against a scheduler host over HTTP.
//! - [`api`]: the HTTP API (axum) under `/v1`, the dashboard and OpenAPI;
//!   `api::wire` holds the request and response bodies the handlers, the
//!   OpenAPI document and the CLI client share. Reads through the store's
//!   read trait, submits and controls through its work trait, uploads
//!   through a module registry; never wasmtime.
//! - [`dispatch`]: the worker pool (lease, run, report, retry with backoff,
//!   dead-letter, guest-memory budget) on the store's work trait, and the
//!   module registry (validate by compiling, then store).
//! - [`tracker`]: statistics kept current from committed events.
//! - [`queue`]: the store: `WorkQueue` (submit, lease, started, heartbeat,
//!   complete, fail, release, control) for the dispatcher, `ReadStore`
//!   (tasks, jobs, timelines, results, events) for the API and tracker,
//!   `queue::open` choosing a backend by store URL, and the backends: the
//!   embedded SQLite store (`queue::embedded`) and the Kafka grid
//!   (`queue::kafka`, whose hosts each keep an embedded store as their
//!   view); `queue::remote` is the worker protocol (`/v1/workers`): the
//!   host's `Hub` of remote workers and leases that lapse, and the worker's
//!   `RemoteQueue`, the work trait over HTTP. **Where scheduling is decided**: `queue::scheduler`, the one
//!   scheduler both backends use. Its ready index ranks waiting tasks
//!   (strict priority with aging, soft affinity with its window, delayed
//!   starts, held priority 0, paused jobs); its pick loop offers a free
//!   worker the best task given every worker's warm (module, key) pairs;
//!   its lease table keeps tokens, expiry and heartbeats. The backends make
//!   its decisions durable.
//! - [`runtime`]: the wasmtime wrapper: engine, compiled-module cache,
//!   sandbox, limits, warm instances.
//! - [`model`]: plain data types shared by every layer.
//! - [`examples`]: the task modules built from `modules/`, bundled into the binary.

pub mod api;
pub mod cli;
pub mod dispatch;
pub mod model;
pub mod queue;
pub mod runtime;
pub mod server;
pub mod tracker;

/// The task modules of `modules/`, built by `build.rs` for their Wasm
/// targets: their paths (for tests) and their bytes (bundled examples).
pub mod examples {
    include!(concat!(env!("OUT_DIR"), "/modules.rs"));
}
