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
        input: None,
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

/// Log lines of the grid under test, captured with each test's output, so
/// that a test that fails (in CI above all) shows what its hosts did:
/// warnings from everything, and the Kafka hosts' info lines (rebalances,
/// releases of waiting work), which are few; not librdkafka's own lines,
/// which flood the end of every test that drops its mock cluster before
/// its hosts. `KWQ_TEST_LOG` (an `EnvFilter`) overrides. Threads a test
/// starts inherit its capture; a passing test's lines are dropped.
pub(crate) fn test_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter =
            tracing_subscriber::EnvFilter::try_from_env("KWQ_TEST_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "warn,kwq::queue::kafka=info,librdkafka=off,rdkafka=off",
                )
            });
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .with_ansi(false)
            .try_init();
    });
}

/// An in-process grid on a temporary embedded store: the API router driven
/// with `oneshot`, and workers started when a test wants them.
pub(crate) struct TestGrid {
    pub(crate) state: kwq::api::AppState,
    pub(crate) queue: std::sync::Arc<dyn kwq::queue::Queue>,
    dispatcher: Option<kwq::dispatch::Dispatcher>,
    _dir: tempfile::TempDir,
}

impl TestGrid {
    /// A grid with no workers yet.
    pub(crate) async fn new(token: Option<&str>, limits: kwq::api::ApiLimits) -> Self {
        Self::with_config(
            token,
            limits,
            kwq::queue::embedded::EmbeddedConfig::default(),
        )
        .await
    }

    pub(crate) async fn with_config(
        token: Option<&str>,
        limits: kwq::api::ApiLimits,
        config: kwq::queue::embedded::EmbeddedConfig,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store =
            kwq::queue::embedded::EmbeddedQueue::open(&dir.path().join("kwq.db"), config).unwrap();
        let mut grid = Self::on_queue(std::sync::Arc::new(store)).await;
        grid.state.token = token.map(str::to_string);
        grid.state.limits = limits;
        grid._dir = dir;
        grid
    }

    /// A grid (API, tracker, no workers yet) on a queue the test opened,
    /// e.g. a Kafka host on the mock cluster.
    pub(crate) async fn on_queue(queue: std::sync::Arc<dyn kwq::queue::Queue>) -> Self {
        test_logs();
        let (token, limits, dir) = (
            None::<&str>,
            kwq::api::ApiLimits::default(),
            tempfile::tempdir().unwrap(),
        );
        let tracker = kwq::tracker::Tracker::attach(
            &(queue.clone() as std::sync::Arc<dyn kwq::queue::ReadStore>),
        )
        .await
        .unwrap();
        let state = kwq::api::AppState {
            token: token.map(str::to_string),
            limits,
            ..kwq::api::AppState::new(
                queue.clone(),
                kwq::dispatch::ModuleRegistry::new(shared_runtime().clone(), queue.clone()),
                tracker,
                kwq::api::AllowedHosts::for_listener("127.0.0.1:7700".parse().unwrap(), &[]),
            )
        };
        TestGrid {
            state,
            queue,
            dispatcher: None,
            _dir: dir,
        }
    }

    /// Start `workers` workers (fast retries for tests).
    pub(crate) fn start_workers(&mut self, workers: usize) {
        self.start_workers_with_budget(workers, kwq::dispatch::default_memory_budget());
    }

    /// Start `workers` workers sharing `memory_budget` bytes of guest memory.
    pub(crate) fn start_workers_with_budget(&mut self, workers: usize, memory_budget: u64) {
        let config = kwq::dispatch::DispatchConfig {
            workers,
            retry: kwq::dispatch::RetryPolicy {
                base: Duration::from_millis(5),
                max: Duration::from_millis(50),
                jitter: 0.5,
            },
            memory_budget,
            ..kwq::dispatch::DispatchConfig::default()
        };
        let dispatcher = kwq::dispatch::Dispatcher::start(
            shared_runtime().clone(),
            self.queue.clone(),
            config,
            "test",
        );
        self.state.board = Some(dispatcher.board());
        self.dispatcher = Some(dispatcher);
    }

    /// Stop the workers cleanly.
    pub(crate) async fn stop(mut self) {
        if let Some(d) = self.dispatcher.take() {
            d.stop().await;
        }
        self.queue.close();
    }

    /// Upload a module file under a name; returns its id.
    pub(crate) async fn upload(&self, path: &str, name: &str) -> String {
        let bytes = std::fs::read(path).unwrap();
        let (status, body) = self
            .call_raw("POST", &format!("/v1/modules?name={name}"), bytes, None)
            .await;
        assert!(status == 201 || status == 200, "{status}: {body}");
        body["id"].as_str().unwrap().to_string()
    }

    /// One request with a JSON body (or none); returns status and JSON body.
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.call_raw(method, path, bytes, Some("application/json"))
            .await
    }

    /// One request with raw bytes.
    pub(crate) async fn call_raw(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
    ) -> (u16, serde_json::Value) {
        self.request(method, path, body, content_type, None).await
    }

    /// One request with an optional bearer token.
    pub(crate) async fn request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
        content_type: Option<&str>,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut headers = Vec::new();
        if let Some(ct) = content_type {
            headers.push(("content-type".to_string(), ct.to_string()));
        }
        if let Some(token) = token {
            headers.push(("authorization".to_string(), format!("Bearer {token}")));
        }
        self.request_with_headers(method, path, &headers, body)
            .await
    }

    /// One request with these headers; returns status and JSON body (or the
    /// body as a JSON string when it is not JSON).
    pub(crate) async fn request_with_headers(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> (u16, serde_json::Value) {
        use tower::ServiceExt;
        let mut builder = axum::http::Request::builder().method(method).uri(path);
        for (name, value) in headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let request = builder.body(axum::body::Body::from(body)).unwrap();
        let response = kwq::api::app(self.state.clone())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
        });
        (status, value)
    }

    /// Wait (on committed events, not on a clock) until a job has finished.
    pub(crate) async fn wait_job(&self, job: &str) -> serde_json::Value {
        let mut events = self.queue.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (status, body) = self.call("GET", &format!("/v1/jobs/{job}"), None).await;
            assert_eq!(status, 200, "{body}");
            if matches!(body["state"].as_str(), Some("Finished" | "Cancelled")) {
                return body;
            }
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(_) => {}
                Err(_) => panic!("job {job} did not finish: {body}"),
            }
        }
    }

    /// Wait until a task reaches a terminal state.
    pub(crate) async fn wait_task(&self, task: &str) -> serde_json::Value {
        let mut events = self.queue.subscribe();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
        loop {
            let (status, body) = self.call("GET", &format!("/v1/tasks/{task}"), None).await;
            assert_eq!(status, 200, "{body}");
            if matches!(
                body["state"].as_str(),
                Some("Completed" | "Dead" | "Cancelled")
            ) {
                return body;
            }
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(_) => {}
                Err(_) => panic!("task {task} did not finish: {body}"),
            }
        }
    }
}

/// A host's configuration for in-process tests: `workers` local workers,
/// the bundled examples, no tokens, answering to any `Host` name.
pub(crate) fn server_config(
    store: kwq::server::StoreUrl,
    workers: usize,
    host: &str,
) -> kwq::server::ServerConfig {
    kwq::server::ServerConfig {
        store,
        runtime: test_config(),
        dispatch: kwq::dispatch::DispatchConfig {
            workers,
            ..Default::default()
        },
        queue: Default::default(),
        token: None,
        token_reads: false,
        examples: true,
        limits: Default::default(),
        host: host.into(),
        allowed_hosts: kwq::api::AllowedHosts::any(),
        remote: Default::default(),
    }
}
