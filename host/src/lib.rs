//! KWQ: a WebAssembly task executor and compute grid.
//!
//! Table of contents (dependencies point down the list):
//! - [`cli`]: the `kwq` subcommands (`serve`, `run`, client commands, `bench`).
//! - [`server`]: `kwq serve` as a library call: store + runtime + workers + API.
//! - [`api`]: the HTTP API (axum) under `/v1`.
//! - [`queue`]: the task store trait and its backends (embedded SQLite).
//! - [`dispatch`]: the worker pool: lease, run, report, retry, dead-letter.
//! - [`tracker`]: statistics kept current from committed events.
//! - [`runtime`]: wasmtime wrapper: engine, module cache, sandbox, limits, warm instances.
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
