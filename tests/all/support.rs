//! Helpers shared by the integration tests.

use kwq::model::{ModuleId, TaskLimits};
use kwq::runtime::{Runtime, RuntimeConfig, TaskReport, TaskSpec, Worker};
use std::sync::OnceLock;
use std::time::Duration;

/// A runtime sized for tests: a small pool so parallel tests do not reserve
/// terabytes of address space each.
pub(crate) fn test_config() -> RuntimeConfig {
    RuntimeConfig {
        max_instances: 64,
        max_memory_bytes: 512 << 20,
        ..RuntimeConfig::default()
    }
}

/// One runtime shared by the tests that need no special settings, so each
/// module is compiled once per test run.
pub(crate) fn shared_runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| Runtime::new(test_config()).expect("runtime"))
}

/// Compile a module file from `kwq::examples` on a runtime.
pub(crate) fn load(runtime: &Runtime, path: &str) -> ModuleId {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    runtime
        .compile(&bytes)
        .unwrap_or_else(|e| panic!("compile {path}: {e}"))
        .id
        .clone()
}

/// Limits for tests: short timeout, small memory.
pub(crate) fn limits() -> TaskLimits {
    TaskLimits {
        timeout: Duration::from_secs(10),
        memory_bytes: 64 << 20,
        ..TaskLimits::default()
    }
}

/// A task spec with a JSON payload.
pub(crate) fn spec(module: &ModuleId, payload: serde_json::Value) -> TaskSpec {
    TaskSpec {
        task_id: "t-1".into(),
        attempt: 1,
        module: module.clone(),
        payload: payload.to_string().into_bytes(),
        affinity: None,
        limits: limits(),
        on_progress: None,
    }
}

/// Run one task and parse its JSON result, panicking with the error if it failed.
pub(crate) async fn run_json(worker: &mut Worker, spec: TaskSpec) -> serde_json::Value {
    let report = worker.run(spec).await;
    let bytes = report
        .outcome
        .unwrap_or_else(|e| panic!("task failed: {e} ({})", e.kind()));
    serde_json::from_slice(&bytes).expect("JSON result")
}

/// Run one task that must fail and return its report.
pub(crate) async fn run_failing(worker: &mut Worker, spec: TaskSpec) -> TaskReport {
    let report = worker.run(spec).await;
    assert!(
        report.outcome.is_err(),
        "expected failure, got {:?}",
        report
            .outcome
            .as_ref()
            .map(|r| String::from_utf8_lossy(r).into_owned())
    );
    report
}
