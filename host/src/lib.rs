//! KWQ: a WebAssembly task executor and compute grid.
//!
//! Table of contents, in dependency order (each module uses only those
//! below it; `../shared/architecture.json` holds the same picture and
//! `farm-studio draw` checks the code against it):
//! - [`cli`]: the `kwq` subcommands (`serve`, `run`, client commands,
//!   `bench`, `simulate`). Configures and reads hosts through [`server`].
//! - [`server`]: the one place a host is assembled: [`server::Host::start`]
//!   opens the store, starts the runtime, tracker, workers and HTTP API,
//!   for `kwq serve`, the local grids of `bench`/`simulate` and the tests.
//! - [`api`]: the HTTP API (axum) under `/v1`, the dashboard and OpenAPI.
//!   Talks to the store, the tracker and a module registry, never wasmtime.
//! - [`dispatch`]: the worker pool (lease, run, report, retry with backoff,
//!   dead-letter, guest-memory budget) and the module registry (validate
//!   by compiling, then store).
//! - [`tracker`]: statistics kept current from committed events.
//! - [`queue`]: the task store trait and its backends: the embedded SQLite
//!   store (`queue::embedded`) and the Kafka grid (`queue::kafka`, whose
//!   hosts each keep an embedded view). **Where scheduling is decided**:
//!   `queue::embedded::ready` ranks waiting tasks (strict priority with
//!   aging, soft affinity with its window, delayed starts, held priority 0,
//!   paused jobs); each backend's `lease` runs the pick loop and keeps the
//!   lease table (expiry, heartbeat, stale tokens). Both backends share the
//!   ready index; issue 13 moves the lease table and pick loop into one
//!   scheduler module.
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
