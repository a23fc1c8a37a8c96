//! KWQ: a WebAssembly task executor and compute grid.
//!
//! Table of contents (dependencies point down the list):
//! - [`cli`]: the `kwq` subcommands (`run`, `bench`).
//! - [`runtime`]: wasmtime wrapper: engine, module cache, sandbox, limits, warm instances.
//! - [`model`]: plain data types shared by every layer.
//! - [`examples`]: the task modules built from `modules/`, bundled into the binary.

pub mod cli;
pub mod model;
pub mod runtime;

/// The task modules of `modules/`, built by `build.rs` for their Wasm
/// targets: their paths (for tests) and their bytes (bundled examples).
pub mod examples {
    include!(concat!(env!("OUT_DIR"), "/modules.rs"));
}
