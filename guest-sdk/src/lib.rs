//! The guest SDK for KWQ task modules.
//!
//! A task author writes one function from a deserialised input to a
//! serialisable output and names it in [`task!`]; the SDK owns the WIT
//! bindings (`wit/kwq-task.wit`), the JSON codec and the instance state.
//!
//! ```ignore
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize)]
//! struct Input { a: f64, b: f64 }
//! #[derive(Serialize)]
//! struct Output { sum: f64 }
//!
//! fn add(input: Input) -> Result<Output, String> {
//!     Ok(Output { sum: input.a + input.b })
//! }
//!
//! kwq_guest::task!(add);
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and upload
//! the `.wasm` file. Stateful tasks (warm affinity) use
//! `task!(init = build_state, run = run_with_state)`; raw bytes in and out use
//! [`raw_task!`].

/// Bindings generated from `wit/kwq-task.wit`; public only so the macros can
/// reach them from the author's crate.
#[doc(hidden)]
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "kwq-task",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_kwq_task",
        default_bindings_module: "kwq_guest::bindings",
    });
}

use std::any::Any;
use std::cell::RefCell;
use std::fmt::Display;

pub use bindings::kwq::task::context::Level;

/// Write a log line; the host attaches it to the task and to its own logs.
pub fn log(level: Level, message: impl AsRef<str>) {
    bindings::kwq::task::context::log(level, message.as_ref());
}

/// Log at info level.
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message);
}

/// Log at warn level.
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message);
}

/// Report how far the current task has got, 0.0 ..= 1.0.
pub fn progress(fraction: f32) {
    bindings::kwq::task::context::progress(fraction.clamp(0.0, 1.0));
}

/// The id of the task being run.
pub fn task_id() -> String {
    bindings::kwq::task::context::task_id()
}

/// Which attempt of the task this is, starting at 1.
pub fn attempt() -> u32 {
    bindings::kwq::task::context::attempt()
}

/// One completed task of the job a fan-in task reads: its id and its
/// result bytes (`output`).
pub use bindings::kwq::task::inputs::JobResult;

/// Results asked for per page by [`results`].
const RESULTS_PAGE: u32 = 512;

/// Up to `max` more results of the job this task reads (it was submitted
/// with `"input": {"results_of": JOB}`), in task order; empty once all
/// are read, and at once for a task without an input.
pub fn next_results(max: u32) -> Vec<JobResult> {
    bindings::kwq::task::inputs::next_results(max)
}

/// Every result of the job this fan-in task reads, in task order, fetched
/// from the host a page at a time as the iterator is advanced: a reduce
/// over a million results holds one page, never all of them.
pub fn results() -> impl Iterator<Item = JobResult> {
    let mut page = Vec::new().into_iter();
    let mut done = false;
    std::iter::from_fn(move || {
        loop {
            if let Some(next) = page.next() {
                return Some(next);
            }
            if done {
                return None;
            }
            let fetched = next_results(RESULTS_PAGE);
            done = fetched.is_empty();
            page = fetched.into_iter();
        }
    })
}

/// [`results`], each parsed as JSON into `T`; an unreadable one is an
/// `Err` naming its task.
pub fn json_results<T: serde::de::DeserializeOwned>() -> impl Iterator<Item = Result<T, String>> {
    results().map(|entry| {
        serde_json::from_slice(&entry.output)
            .map_err(|e| format!("result of {} is not what was expected: {e}", entry.task_id))
    })
}

/// Glue the macros expand to. Not part of the public API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    use serde::Serialize;
    use serde::de::DeserializeOwned;

    pub use bindings::exports::kwq::task::task::Guest;

    thread_local! {
        /// State built by the author's `init`, kept for the instance's life.
        static STATE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    fn decode<I: DeserializeOwned>(payload: &[u8]) -> Result<I, String> {
        serde_json::from_slice(payload).map_err(|e| format!("invalid payload: {e}"))
    }

    fn encode<O: Serialize>(output: &O) -> Result<Vec<u8>, String> {
        serde_json::to_vec(output).map_err(|e| format!("cannot encode result: {e}"))
    }

    fn config_str(config: &[u8]) -> Result<&str, String> {
        std::str::from_utf8(config).map_err(|e| format!("init config is not UTF-8: {e}"))
    }

    /// `run` of a stateless JSON task.
    pub fn run_json<I, O, E>(
        f: impl FnOnce(I) -> Result<O, E>,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String>
    where
        I: DeserializeOwned,
        O: Serialize,
        E: Display,
    {
        let input = decode(&payload)?;
        encode(&f(input).map_err(|e| e.to_string())?)
    }

    /// `run` of a raw-bytes task.
    pub fn run_raw<E: Display>(
        f: impl FnOnce(Vec<u8>) -> Result<Vec<u8>, E>,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        f(payload).map_err(|e| e.to_string())
    }

    /// `init` of a stateful task: build the state and keep it.
    pub fn init_state<S: 'static, E: Display>(
        f: impl FnOnce(&str) -> Result<S, E>,
        config: Vec<u8>,
    ) -> Result<(), String> {
        let state = f(config_str(&config)?).map_err(|e| e.to_string())?;
        STATE.with(|cell| *cell.borrow_mut() = Some(Box::new(state)));
        Ok(())
    }

    /// `run` of a stateful JSON task: hand the kept state to the author.
    pub fn run_stateful<S: 'static, I, O, E>(
        f: impl FnOnce(&mut S, I) -> Result<O, E>,
        payload: Vec<u8>,
    ) -> Result<Vec<u8>, String>
    where
        I: DeserializeOwned,
        O: Serialize,
        E: Display,
    {
        let input = decode(&payload)?;
        STATE.with(|cell| {
            let mut slot = cell.borrow_mut();
            let state = slot
                .as_mut()
                .and_then(|s| s.downcast_mut::<S>())
                .ok_or_else(|| "task state missing: init did not run".to_string())?;
            encode(&f(state, input).map_err(|e| e.to_string())?)
        })
    }
}

/// Export a task whose input and output are JSON.
///
/// * `task!(run)` where `run: fn(Input) -> Result<Output, E>`;
/// * `task!(init = build, run = run)` where `build: fn(&str) -> Result<S, E>`
///   receives the affinity key the instance is warmed for and
///   `run: fn(&mut S, Input) -> Result<Output, E>` reuses the state.
///
/// `Input: Deserialize`, `Output: Serialize`, `E: Display`.
#[macro_export]
macro_rules! task {
    (init = $init:path, run = $run:path $(,)?) => {
        #[doc(hidden)]
        struct __KwqTask;
        impl $crate::__private::Guest for __KwqTask {
            fn init(config: ::std::vec::Vec<u8>) -> ::std::result::Result<(), ::std::string::String> {
                $crate::__private::init_state($init, config)
            }
            fn run(payload: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                $crate::__private::run_stateful($run, payload)
            }
        }
        $crate::bindings::__export_kwq_task!(__KwqTask with_types_in $crate::bindings);
    };
    ($run:path $(,)?) => {
        #[doc(hidden)]
        struct __KwqTask;
        impl $crate::__private::Guest for __KwqTask {
            fn init(_config: ::std::vec::Vec<u8>) -> ::std::result::Result<(), ::std::string::String> {
                Ok(())
            }
            fn run(payload: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                $crate::__private::run_json($run, payload)
            }
        }
        $crate::bindings::__export_kwq_task!(__KwqTask with_types_in $crate::bindings);
    };
}

/// Export a task that takes and returns raw bytes:
/// `raw_task!(run)` where `run: fn(Vec<u8>) -> Result<Vec<u8>, E>`.
#[macro_export]
macro_rules! raw_task {
    ($run:path $(,)?) => {
        #[doc(hidden)]
        struct __KwqTask;
        impl $crate::__private::Guest for __KwqTask {
            fn init(_config: ::std::vec::Vec<u8>) -> ::std::result::Result<(), ::std::string::String> {
                Ok(())
            }
            fn run(payload: ::std::vec::Vec<u8>) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                $crate::__private::run_raw($run, payload)
            }
        }
        $crate::bindings::__export_kwq_task!(__KwqTask with_types_in $crate::bindings);
    };
}
