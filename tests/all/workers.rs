//! Worker machines: the `/v1/workers` protocol spoken directly (leases,
//! heartbeats, reports, stale tokens, garbage, tokens, cancellation,
//! external kinds), and `kwq worker` and the Python example worker as real
//! processes against a real `kwq serve`, with workers and the scheduler
//! host SIGKILLed mid-job.

use crate::process::{Server, echo_job_completed_once, get, post, submit_echo_job, wait_for};
use kwq::server::{Host, RemoteWorkers, ServerConfig, StoreUrl};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An in-process host with `workers` local workers and remote leases that
/// lapse after `lease`.
async fn scheduler(
    dir: &Path,
    workers: usize,
    lease: Duration,
    token: Option<&str>,
    worker_token: Option<&str>,
) -> (Host, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = ServerConfig {
        token: token.map(str::to_string),
        remote: RemoteWorkers {
            token: worker_token.map(str::to_string),
            lease_ttl: lease,
        },
        ..crate::support::server_config(StoreUrl::Sqlite(dir.join("kwq.db")), workers, "sched")
    };
    let host = Host::start(config, listener).await.unwrap();
    let url = format!("http://{}", host.address());
    (host, url)
}

/// A raw protocol client: (status, body) of each call.
struct Raw {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Raw {
    fn new(url: &str, token: Option<&str>) -> Raw {
        Raw {
            http: reqwest::Client::new(),
            url: url.to_string(),
            token: token.map(str::to_string),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.url));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn register(&self, name: &str, kind: Option<&str>) -> String {
        let (status, body) = self
            .post(
                "/v1/workers",
                json!({"name": name, "slots": 4, "kind": kind}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["worker_id"].as_str().unwrap().to_string()
    }

    async fn lease(&self, worker: &str, max: u32, wait_ms: u64) -> Vec<Value> {
        let (status, body) = self
            .post(
                &format!("/v1/workers/{worker}/lease"),
                json!({"max": max, "wait_ms": wait_ms}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["leases"].as_array().unwrap().clone()
    }

    async fn complete(&self, worker: &str, lease: &Value, result: &str) -> (u16, Value) {
        self.post(
            &format!("/v1/workers/{worker}/report"),
            json!({"completed": [{"task_id": lease["task_id"], "token": lease["token"], "result": json!(result).to_string()}]}),
        )
        .await
    }
}

async fn submit(http: &reqwest::Client, url: &str, module: &str, payload: Value) -> String {
    let response = http
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"module": module, "payload": payload}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let body: Value = response.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

async fn task(http: &reqwest::Client, url: &str, id: &str) -> Value {
    http.get(format!("{url}/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The task once it is in `state` (what the API shows trails a report by
/// the store writer's commit, a millisecond or so).
async fn task_in(http: &reqwest::Client, url: &str, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = task(http, url, id).await;
        if t["state"] == state {
            return t;
        }
        assert!(Instant::now() < deadline, "never {state}: {t}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_lapse_without_heartbeats_and_a_late_report_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = scheduler(dir.path(), 0, Duration::from_millis(600), None, None).await;
    let http = reqwest::Client::new();
    let raw = Raw::new(&url, None);
    let ids = [
        submit(&http, &url, "external:test", json!(1)).await,
        submit(&http, &url, "external:test", json!(2)).await,
    ];
    let slow = raw.register("slow", Some("external:test")).await;
    let leases = raw.lease(&slow, 10, 1_000).await;
    assert_eq!(leases.len(), 2, "both tasks in one batch: {leases:?}");
    let (first, second) = (&leases[0], &leases[1]);
    task_in(&http, &url, first["task_id"].as_str().unwrap(), "Allocated").await;

    // A wrong token is refused; the right one is recorded.
    let forged =
        json!({"task_id": first["task_id"], "token": first["token"].as_u64().unwrap() + 99});
    let (status, body) = raw.complete(&slow, &forged, "forged").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "stale_lease");
    assert_eq!(body["refused"][0]["task_id"], first["task_id"]);
    let (status, body) = raw.complete(&slow, first, "done-by-slow").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["recorded"], 1);

    // The second lease is renewed by heartbeats for a while, so it is kept...
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, beat) = raw
            .post(
                &format!("/v1/workers/{slow}/heartbeat"),
                json!({"leases": [{"task_id": second["task_id"], "token": second["token"]}]}),
            )
            .await;
        assert_eq!(status, 200, "{beat}");
        assert_eq!(beat["renewed"], 1, "{beat}");
    }
    // ...then the heartbeats stop: another worker gets the task.
    let fast = raw.register("fast", Some("external:test")).await;
    let again = raw.lease(&fast, 10, 5_000).await;
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0]["task_id"], second["task_id"]);
    assert_eq!(
        again[0]["attempt"], 1,
        "a lapsed lease does not count as an attempt"
    );
    // The cut-off worker's late result is refused and not counted.
    let (status, body) = raw.complete(&slow, second, "late").await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = raw.complete(&fast, &again[0], "done-by-fast").await;
    assert_eq!(status, 200);
    let done = task_in(&http, &url, &ids[1], "Completed").await;
    assert_eq!(done["worker"], json!(fast));
    assert_eq!(done["result"], "done-by-fast", "{done}");
    let first_done = task_in(&http, &url, &ids[0], "Completed").await;
    assert_eq!(first_done["result"], "done-by-slow");
    let (_, workers) = raw.call(reqwest::Method::GET, "/v1/workers", None).await;
    let fast_view = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == json!(fast))
        .unwrap()
        .clone();
    assert_eq!(fast_view["completed"], 1, "{workers}");
    assert_eq!(fast_view["address"], "127.0.0.1");
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_tasks_go_only_to_their_kind_and_wasm_tasks_only_to_wasm_workers() {
    let dir = tempfile::tempdir().unwrap();
    // One local Wasm worker in the host, and external workers over HTTP.
    let (host, url) = scheduler(dir.path(), 1, Duration::from_secs(30), None, None).await;
    let http = reqwest::Client::new();
    let raw = Raw::new(&url, None);
    let gpu_task = submit(&http, &url, "external:gpu", json!({"n": 1})).await;
    let other_kind = submit(&http, &url, "external:fpga", json!({"n": 2})).await;
    let wasm_task = submit(&http, &url, "noop", json!(null)).await;
    let gpu = raw.register("gpu-box", Some("external:gpu")).await;
    let leases = raw.lease(&gpu, 10, 2_000).await;
    assert_eq!(leases.len(), 1, "{leases:?}");
    assert_eq!(leases[0]["task_id"], json!(gpu_task));
    assert_eq!(leases[0]["module"], "external:gpu");
    assert_eq!(leases[0]["payload_base64"], "eyJuIjoxfQ==");
    // The local Wasm worker ran the Wasm task and left the external ones alone.
    task_in(&http, &url, &wasm_task, "Completed").await;
    assert_eq!(task(&http, &url, &other_kind).await["state"], "Pending");
    // A Wasm worker over HTTP is offered nothing external either.
    let wasm_remote = raw.register("wasm-box", None).await;
    assert!(raw.lease(&wasm_remote, 10, 300).await.is_empty());
    // A bad kind is refused at submission and at registration.
    let bad = http
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"module": "external:", "payload": null}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let (status, body) = raw
        .post(
            "/v1/workers",
            json!({"name": "x", "slots": 1, "kind": "gpu"}),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    // A failure reported without a retry time is retried by the host's backoff.
    let (status, body) = raw
        .post(
            &format!("/v1/workers/{gpu}/report"),
            json!({"started": [{"task_id": gpu_task, "token": leases[0]["token"]}],
                   "failed": [{"task_id": gpu_task, "token": leases[0]["token"],
                               "kind": "guest_error", "message": "GPU fell off the bus"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["recorded"], 2);
    let failed = task_in(&http, &url, &gpu_task, "Error").await;
    assert_eq!(failed["error_message"], "GPU fell off the bus");
    let retry = raw.lease(&gpu, 10, 10_000).await;
    assert_eq!(retry.len(), 1);
    assert_eq!(retry[0]["attempt"], 2);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_reaches_a_remote_worker_through_its_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = scheduler(dir.path(), 0, Duration::from_secs(30), None, None).await;
    let http = reqwest::Client::new();
    let raw = Raw::new(&url, None);
    let id = submit(&http, &url, "external:slow", json!(null)).await;
    let worker = raw.register("w", Some("external:slow")).await;
    let leases = raw.lease(&worker, 1, 2_000).await;
    let lease = json!({"task_id": id, "token": leases[0]["token"]});
    let (status, _) = raw
        .post(
            &format!("/v1/workers/{worker}/report"),
            json!({"started": [lease]}),
        )
        .await;
    assert_eq!(status, 200);
    let cancelled = http
        .post(format!("{url}/v1/tasks/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert!(cancelled.status().is_success());
    let (_, beat) = raw
        .post(
            &format!("/v1/workers/{worker}/heartbeat"),
            json!({"leases": [lease]}),
        )
        .await;
    assert_eq!(beat["cancelled"], json!([id]), "{beat}");
    let (status, body) = raw
        .post(
            &format!("/v1/workers/{worker}/report"),
            json!({"released": [{"task_id": id, "token": leases[0]["token"], "cancelled": true}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    task_in(&http, &url, &id, "Cancelled").await;
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_from_a_worker_gets_4xx_and_the_host_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = scheduler(dir.path(), 0, Duration::from_secs(30), None, None).await;
    let raw = Raw::new(&url, None);
    let worker = raw.register("w", None).await;
    let lease = format!("/v1/workers/{worker}/lease");
    let report = format!("/v1/workers/{worker}/report");
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (lease.as_str(), json!({"max": 0}), 400, "max"),
        (lease.as_str(), json!({"max": 5000}), 400, "max"),
        (
            lease.as_str(),
            json!({"max": 1, "wait_ms": 3_600_000}),
            400,
            "wait_ms",
        ),
        (
            lease.as_str(),
            json!({"max": 1, "warm": [{"module": "nope", "key": "k"}]}),
            400,
            "warm",
        ),
        (
            lease.as_str(),
            json!({"max": 1, "colour": "red"}),
            400,
            "colour",
        ),
        (lease.as_str(), json!("not an object"), 400, ""),
        (
            "/v1/workers/nobody/lease",
            json!({"max": 1}),
            404,
            "register again",
        ),
        (
            "/v1/workers/nobody/heartbeat",
            json!({"leases": []}),
            404,
            "register again",
        ),
        (
            report.as_str(),
            json!({"completed": [{"task_id": "t-x"}]}),
            400,
            "token",
        ),
        (
            report.as_str(),
            json!({"completed": [{"task_id": "t-x", "token": 1}]}),
            409,
            "no longer held",
        ),
        (
            report.as_str(),
            json!({"completed": [{"task_id": "t-x", "token": 1, "result": "a", "result_base64": "YQ=="}]}),
            409,
            "not both",
        ),
        (
            report.as_str(),
            json!({"failed": [{"task_id": "t-x", "token": 1, "kind": "meltdown", "message": ""}]}),
            400,
            "kind",
        ),
        ("/v1/workers", json!({"name": "", "slots": 1}), 400, "name"),
        (
            "/v1/workers",
            json!({"name": "w", "slots": 0}),
            400,
            "slots",
        ),
    ];
    for (path, body, want, says) in cases {
        let (status, answer) = raw.post(path, body.clone()).await;
        assert_eq!(status, want, "{path} {body} -> {answer}");
        assert!(answer["error"]["message"].as_str().is_some(), "{answer}");
        assert!(
            answer.to_string().contains(says),
            "{path} {body} -> {answer} should mention {says:?}"
        );
    }
    let not_json = raw
        .http
        .post(format!("{url}{lease}"))
        .header("content-type", "application/json")
        .body("{{{")
        .send()
        .await
        .unwrap();
    assert_eq!(not_json.status(), 400);
    let (status, _) = raw
        .call(reqwest::Method::GET, "/v1/workers/modules/zz", None)
        .await;
    assert_eq!(status, 400);
    let (status, _) = raw
        .call(
            reqwest::Method::GET,
            &format!("/v1/workers/modules/{}", "0".repeat(64)),
            None,
        )
        .await;
    assert_eq!(status, 404);
    // Still serving, and a real module's bytes are served by id.
    let (_, modules) = raw.call(reqwest::Method::GET, "/v1/modules", None).await;
    let noop = modules
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "noop")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let bytes = raw
        .http
        .get(format!("{url}/v1/workers/modules/{noop}"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(kwq::model::ModuleId::of(&bytes).to_string(), noop);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_and_submitters_have_separate_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = scheduler(
        dir.path(),
        0,
        Duration::from_secs(30),
        Some("submit-secret"),
        Some("worker-secret"),
    )
    .await;
    let register = json!({"name": "w", "slots": 1});
    let (status, _) = Raw::new(&url, None)
        .post("/v1/workers", register.clone())
        .await;
    assert_eq!(status, 401);
    let (status, _) = Raw::new(&url, Some("submit-secret"))
        .post("/v1/workers", register.clone())
        .await;
    assert_eq!(status, 401, "the submitters' token is not a worker's");
    let (status, _) = Raw::new(&url, Some("worker-secret"))
        .post("/v1/workers", register)
        .await;
    assert_eq!(status, 200);
    let (status, _) = Raw::new(&url, Some("worker-secret"))
        .post("/v1/tasks", json!({"module": "noop", "payload": null}))
        .await;
    assert_eq!(status, 401, "a worker's token does not submit");
    host.stop().await.unwrap();
}

/// A `kwq worker` child process.
struct WorkerProcess {
    child: Child,
}

impl WorkerProcess {
    fn start(server: &str, name: &str, data_dir: &Path, slots: u32) -> WorkerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kwq"))
            .args([
                "worker",
                "--server",
                server,
                "--name",
                name,
                "--workers",
                &slots.to_string(),
                "--data-dir",
            ])
            .arg(data_dir)
            .env("KWQ_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start kwq worker");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        assert!(first.contains("running"), "{first:?}");
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        WorkerProcess { child }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback address no one listens on now (for a host restarted on it).
pub(crate) fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_worker_machine_loses_nothing_and_its_tasks_run_elsewhere() {
    const TASKS: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = Server::start_serving(
        &dir.path().join("host"),
        &[],
        &["--worker-lease", "1s"],
        Stdio::inherit(),
        0,
        "warn",
    );
    let doomed = WorkerProcess::start(&server.url, "doomed", &dir.path().join("w1"), 2);
    let survivor = WorkerProcess::start(&server.url, "survivor", &dir.path().join("w2"), 2);
    let job = submit_echo_job(&client, &server, TASKS, "remote").await;
    wait_for(&client, &server, &job, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 2_000
    })
    .await;
    doomed.kill();
    echo_job_completed_once(&client, &server, &job, TASKS).await;
    let workers = get(&client, format!("{}/v1/workers", server.url)).await;
    let survivor_done = workers
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "survivor")
        .map(|w| w["completed"].as_u64().unwrap())
        .unwrap();
    assert!(survivor_done > 0, "{workers}");
    drop(survivor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_carry_on_across_a_sigkilled_and_restarted_scheduler_host() {
    const TASKS: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let address = free_address();
    let host_dir = dir.path().join("host");
    let serve = |dir: &Path| {
        Server::start_listening(
            dir,
            &address,
            &[],
            &["--worker-lease", "2s"],
            Stdio::inherit(),
            0,
            "warn",
        )
    };
    let first = serve(&host_dir);
    let workers: Vec<WorkerProcess> = (0..2)
        .map(|i| {
            WorkerProcess::start(
                &first.url,
                &format!("w{i}"),
                &dir.path().join(format!("w{i}")),
                2,
            )
        })
        .collect();
    let job = submit_echo_job(&client, &first, TASKS, "restart").await;
    wait_for(&client, &first, &job, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 2_000
    })
    .await;
    first.kill();
    let second = serve(&host_dir);
    echo_job_completed_once(&client, &second, &job, TASKS).await;
    let registered = get(&client, format!("{}/v1/workers", second.url)).await;
    assert_eq!(
        registered.as_array().unwrap().len(),
        2,
        "both workers came back: {registered}"
    );
    drop(workers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_worker_prices_external_tasks() {
    const TASKS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = Server::start_serving(dir.path(), &[], &[], Stdio::inherit(), 0, "warn");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/python-worker/worker.py"
    );
    let mut python = Command::new("python3")
        .args([
            script,
            "--server",
            &server.url,
            "--tasks",
            &TASKS.to_string(),
            "--batch",
            "16",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test.sh installs it)");
    let mut ids = Vec::new();
    for i in 0..TASKS {
        let spot = 30.0 + i as f64;
        let payload = json!({"spot": spot, "strike": 40, "rate": 0.1, "vol": 0.2, "maturity": 0.5, "kind": if i % 2 == 0 { "call" } else { "put" }});
        ids.push((
            submit(&client, &server.url, "external:pricer-gpu", payload.clone()).await,
            payload,
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (id, payload) in &ids {
        let done = loop {
            let t = task(&client, &server.url, id).await;
            if t["state"] == "Completed" {
                break t;
            }
            assert!(Instant::now() < deadline, "not priced: {t}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let result = &done["result"];
        let mut contract = payload.clone();
        contract["paths"] = json!(1);
        contract["seed"] = json!(1);
        let contract: mc_math::Contract = serde_json::from_value(contract).unwrap();
        let expected = mc_math::black_scholes(&contract);
        let price = result["price"].as_f64().unwrap();
        // Python's exact erf against mc-math's normal CDF approximation
        // (Abramowitz-Stegun, absolute error 7.5e-8, times the spot).
        assert!(
            (price - expected).abs() < 1e-5,
            "{payload}: {price} vs {expected}"
        );
        assert!(done["worker"].as_str().unwrap().contains("-py-"), "{done}");
    }
    let status = python.wait().unwrap();
    assert!(status.success(), "the worker stops after --tasks {TASKS}");
}

/// The worker protocol over a host of a Kafka grid (librdkafka's mock
/// cluster): `kwq worker`'s assembly, in process, runs a job from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_machine_runs_a_job_from_a_kafka_grid_host() {
    const TASKS: u64 = 300;
    let kafka = crate::conformance::MockKafka::new();
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config =
        crate::support::server_config(StoreUrl::Kafka(Box::new(kafka.config("sched"))), 0, "sched");
    let host = Host::start(config, listener).await.unwrap();
    let url = format!("http://{}", host.address());
    let worker = kwq::server::WorkerHost::start(kwq::server::WorkerConfig {
        remote: kwq::server::RemoteConfig {
            server: url.clone(),
            token: None,
            name: "kafka-worker".into(),
            slots: 2,
            module_dir: Some(dir.path().join("modules")),
        },
        runtime: crate::support::test_config(),
        dispatch: kwq::dispatch::DispatchConfig {
            workers: 2,
            ..Default::default()
        },
    })
    .await
    .unwrap();
    assert!(worker.worker_id().unwrap().starts_with("kafka-worker-"));
    let http = reqwest::Client::new();
    let payloads: Vec<Value> = (0..TASKS)
        .map(|i| json!({"action": "echo", "value": i}))
        .collect();
    let created: Value = http
        .post(format!("{url}/v1/jobs"))
        .json(&json!({"module": "misbehave", "payloads": payloads}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let job = created["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let view: Value = http
            .get(format!("{url}/v1/jobs/{job}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if view["counts"]["Completed"] == json!(TASKS) {
            break;
        }
        assert!(Instant::now() < deadline, "{view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = crate::process::get_text(&http, format!("{url}/v1/jobs/{job}/results")).await;
    let values: std::collections::BTreeSet<u64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["result"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(values, (0..TASKS).collect());
    assert!(
        dir.path().join("modules").read_dir().unwrap().count() >= 1,
        "module bytes cached on disk"
    );
    worker.stop().await.unwrap();
    host.stop().await.unwrap();
}

/// A TCP proxy on 127.0.0.1 that can be cut (every connection dropped,
/// new ones refused) and mended: a network between a worker and its host.
struct Proxy {
    url: String,
    cut: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn to(target: std::net::SocketAddr) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (cut, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if *watch.borrow() {
                    continue; // dropped at once: the network is down
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Proxy { url, cut }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

fn worker_config(server: &str, name: &str, dir: &Path) -> kwq::server::WorkerConfig {
    kwq::server::WorkerConfig {
        remote: kwq::server::RemoteConfig {
            server: server.to_string(),
            token: None,
            name: name.into(),
            slots: 1,
            module_dir: Some(dir.join(name)),
        },
        runtime: crate::support::test_config(),
        dispatch: kwq::dispatch::DispatchConfig {
            workers: 1,
            ..Default::default()
        },
    }
}

/// A worker cut off from its host stops the task it runs once its lease
/// has lapsed; the task runs on another worker and its result is recorded
/// once, from that worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_its_host_stops_and_the_task_runs_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = scheduler(dir.path(), 0, Duration::from_secs(1), None, None).await;
    let proxy = Proxy::to(host.address()).await;
    let cut_off = kwq::server::WorkerHost::start(worker_config(&proxy.url, "cut-off", dir.path()))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let id = submit(
        &http,
        &url,
        "misbehave",
        json!({"action": "sleep", "ms": 6000}),
    )
    .await;
    // The cut-off worker is running it (an attempt may fail first, e.g. a
    // module fetch on a loaded machine; its retry is what must be running).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = task(&http, &url, &id).await;
        let on_board = cut_off.board().snapshot()[0].task.as_deref() == Some(id.as_str());
        if t["state"] == "Running" && on_board {
            assert_eq!(t["worker"], json!(cut_off.worker_id().unwrap()));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never running on the cut-off worker: {t}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cut_at = Instant::now();
    proxy.set_cut(true);
    // Its lease lapses after a second without heartbeats: the cut-off
    // worker stops the task well before its six seconds are up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cut_off.board().snapshot()[0].task.is_some() {
        assert!(
            Instant::now() < deadline,
            "the cut-off worker never stopped its task"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        cut_at.elapsed() < Duration::from_secs(5),
        "stopped after {:?}",
        cut_at.elapsed()
    );
    // Another worker runs it to the end; the network comes back meanwhile.
    let other = kwq::server::WorkerHost::start(worker_config(&url, "other", dir.path()))
        .await
        .unwrap();
    proxy.set_cut(false);
    let done = task_in(&http, &url, &id, "Completed").await;
    assert_eq!(done["worker"], json!(other.worker_id().unwrap()), "{done}");
    let timeline = done["timeline"].as_array().unwrap();
    let count = |state: &str| timeline.iter().filter(|e| e["state"] == state).count();
    assert_eq!(count("Completed"), 1, "{done}");
    assert_eq!(
        done["attempts"].as_u64().unwrap() as usize,
        count("Error") + 1,
        "a lapsed lease is not an attempt: {done}"
    );
    other.stop().await.unwrap();
    let _ = cut_off.stop().await;
    host.stop().await.unwrap();
}

/// Soft affinity across machines: a task whose (module, key) is warm on
/// one worker machine waits for it (within the affinity window) rather
/// than going to another that asks first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_goes_to_the_worker_machine_warm_for_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = scheduler(dir.path(), 0, Duration::from_secs(30), None, None).await;
    let http = reqwest::Client::new();
    let raw = Raw::new(&url, None);
    let (_, modules) = raw
        .call(reqwest::Method::GET, "/v1/modules/noop", None)
        .await;
    let noop = modules["id"].as_str().unwrap().to_string();
    let warm = raw.register("warm", None).await;
    let cold = raw.register("cold", None).await;
    // The warm machine says what it has warm (nothing to lease yet).
    let (status, body) = raw
        .post(
            &format!("/v1/workers/{warm}/lease"),
            json!({"max": 1, "wait_ms": 0, "warm": [{"module": noop, "key": "curve=USD"}]}),
        )
        .await;
    assert_eq!(
        (status, body["leases"].as_array().unwrap().len()),
        (200, 0),
        "{body}"
    );
    // FIFO within a priority: the plain task first, then the keyed one.
    let plain = submit(&http, &url, "noop", json!(2)).await;
    let keyed = http
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"module": "noop", "payload": 1, "affinity": "curve=USD"}))
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let got = raw.lease(&cold, 10, 100).await;
    let ids: Vec<&str> = got.iter().map(|l| l["task_id"].as_str().unwrap()).collect();
    assert_eq!(
        ids,
        vec![plain.as_str()],
        "the cold machine leaves the keyed task alone"
    );
    let (_, body) = raw
        .post(
            &format!("/v1/workers/{warm}/lease"),
            json!({"max": 10, "wait_ms": 1000, "warm": [{"module": noop, "key": "curve=USD"}]}),
        )
        .await;
    assert_eq!(body["leases"][0]["task_id"], json!(keyed), "{body}");
    assert_eq!(body["leases"][0]["warm_hit"], true);
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_machine_streams_a_fan_in_tasks_input_from_its_host() {
    const RUNS: usize = 1500;
    let dir = tempfile::tempdir().unwrap();
    let http = reqwest::Client::new();
    let server = Server::start_serving(
        &dir.path().join("host"),
        &[],
        &[],
        Stdio::inherit(),
        0,
        "warn",
    );
    let _worker = WorkerProcess::start(&server.url, "reducer", &dir.path().join("w"), 2);
    let estimates: Vec<Value> = (0..RUNS)
        .map(|i| json!({"price": 10.0 + (i % 13) as f64 / 100.0, "std_error": 0.01, "paths": 1000}))
        .collect();
    let payloads: Vec<Value> = estimates
        .iter()
        .map(|e| json!({"action": "echo", "value": e}))
        .collect();
    let job = post(
        &http,
        format!("{}/v1/jobs", server.url),
        json!({"module": "misbehave", "payloads": payloads}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let streamed = post(
        &http,
        format!("{}/v1/tasks", server.url),
        json!({"module": "mc-reduce", "input": {"results_of": job}}),
    )
    .await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let whole = submit(&http, &server.url, "mc-reduce", json!(estimates)).await;
    let streamed = task_in(&http, &server.url, &streamed, "Completed").await;
    let whole = task_in(&http, &server.url, &whole, "Completed").await;
    // Read page by page over `GET /v1/workers/results/{job}`, in task order:
    // the same figures as the whole array in one payload.
    assert_eq!(streamed["result"]["runs"], RUNS, "{streamed}");
    // (The host runs no Wasm itself: `--workers 0`.)
    assert_eq!(streamed["result"], whole["result"]);
}
