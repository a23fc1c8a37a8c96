//! Limits and safety: what a hostile or careless operator can do to a host,
//! each case reproduced and its guard asserted (the README's "Limits and
//! safety" lists the bounds).

use crate::support::TestGrid;
use kwq::api::ApiLimits;
use kwq::examples;
use kwq::model::{ModuleId, ModuleKind, now_ms};
use kwq::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
use kwq::queue::{ModuleRecord, Queue, ReadStore, WorkQueue};
use serde_json::json;

/// Re-uploading a module's bytes under another name adds an alias; it never
/// takes a name away. A name points at the latest module uploaded under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_names_are_aliases_and_never_dropped_by_a_reupload() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    let noop = grid.upload(examples::NOOP, "noop").await;
    let pi = grid
        .upload(examples::MONTE_CARLO_PI, "monte-carlo-pi")
        .await;
    let curve = grid.upload(examples::CURVE, "curve").await;
    // The no-op's bytes again, as "x": 200, and both names work.
    let (status, record) = grid
        .call_raw(
            "POST",
            "/v1/modules?name=x",
            std::fs::read(examples::NOOP).unwrap(),
            None,
        )
        .await;
    assert_eq!(status, 200, "{record}");
    assert_eq!(record["names"], json!(["noop", "x"]), "{record}");
    for name in ["noop", "x"] {
        let (status, found) = grid.call("GET", &format!("/v1/modules/{name}"), None).await;
        assert_eq!(
            (status, found["id"].as_str()),
            (200, Some(noop.as_str())),
            "{name}"
        );
        let (status, body) = grid
            .call(
                "POST",
                "/v1/tasks",
                Some(json!({"module": name, "priority": 0})),
            )
            .await;
        assert_eq!(status, 201, "{name}: {body}");
    }
    // monte-carlo-pi's bytes as "curve": "curve" now means them, and
    // "monte-carlo-pi" still does too; the old curve module keeps its id.
    grid.call_raw(
        "POST",
        "/v1/modules?name=curve",
        std::fs::read(examples::MONTE_CARLO_PI).unwrap(),
        None,
    )
    .await;
    for (name, id) in [("curve", &pi), ("monte-carlo-pi", &pi)] {
        let (_, found) = grid.call("GET", &format!("/v1/modules/{name}"), None).await;
        assert_eq!(found["id"].as_str(), Some(id.as_str()), "{name}: {found}");
    }
    let (status, old) = grid
        .call("GET", &format!("/v1/modules/{curve}"), None)
        .await;
    assert_eq!((status, old["names"].clone()), (200, json!([])), "{old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_names_are_bounded_printable_and_never_look_like_ids() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    let bytes = std::fs::read(examples::NOOP).unwrap();
    let long = "n".repeat(129);
    let hex = "a".repeat(64);
    for name in ["", "%0A%1Bbad", long.as_str(), hex.as_str()] {
        let (status, body) = grid
            .call_raw(
                "POST",
                &format!("/v1/modules?name={name}"),
                bytes.clone(),
                None,
            )
            .await;
        assert_eq!(status, 400, "{name:?}: {body}");
        assert_eq!(body["error"]["code"], json!("invalid_name"), "{body}");
    }
}

/// A module whose stored bytes were corrupted on disk is repaired by
/// uploading the good bytes again.
#[tokio::test]
async fn a_good_reupload_repairs_corrupted_module_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kwq.db");
    let good = std::fs::read(examples::NOOP).unwrap();
    let record = ModuleRecord {
        id: ModuleId::of(&good),
        name: Some("noop".into()),
        names: Vec::new(),
        kind: ModuleKind::Component,
        size: good.len() as u64,
        created_at: now_ms(),
    };
    let queue = EmbeddedQueue::open(&path, EmbeddedConfig::default()).unwrap();
    queue
        .put_module(record.clone(), good.clone())
        .await
        .unwrap();
    queue.close();
    queue.flush().await.unwrap();
    drop(queue);
    // Flip bytes behind the store's back.
    let conn = rusqlite::Connection::open(&path).unwrap();
    let mut corrupted = good.clone();
    corrupted[100] ^= 0xff;
    conn.execute("UPDATE modules SET bytes = ?1", [corrupted])
        .unwrap();
    drop(conn);
    let queue = EmbeddedQueue::open(&path, EmbeddedConfig::default()).unwrap();
    let stored = queue.module_bytes(&record.id).unwrap();
    assert_ne!(ModuleId::of(&stored), record.id, "the corruption took");
    queue
        .put_module(record.clone(), good.clone())
        .await
        .unwrap();
    assert_eq!(queue.module_bytes(&record.id).unwrap(), good);
}

/// A typo anywhere (inside a sweep, in a priority body, in a query string)
/// is refused with 400 naming it, never silently ignored; one mistake gets
/// one status whichever layer notices it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typos_and_out_of_range_values_are_refused_alike_everywhere() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let (_, task) = grid
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "noop", "priority": 0})),
        )
        .await;
    let task = task["id"].as_str().unwrap().to_string();
    let cases = [
        (
            "POST",
            "/v1/jobs".to_string(),
            Some(
                json!({"module": "noop", "sweep": {"params": {"x": {"from": 0, "to": 4, "stp": 0.5}}}}),
            ),
            "stp",
        ),
        (
            "POST",
            "/v1/jobs".to_string(),
            Some(json!({"module": "noop", "sweep": {"params": {"x": [1]}, "parms": {}}})),
            "parms",
        ),
        (
            "POST",
            format!("/v1/tasks/{task}/priority"),
            Some(json!({"priority": 5, "urgent": true})),
            "urgent",
        ),
        ("GET", "/v1/tasks?limt=5".to_string(), None, "limt"),
        ("GET", "/v1/jobs?limt=5".to_string(), None, "limt"),
        (
            "POST",
            "/v1/tasks".to_string(),
            Some(json!({"module": "noop", "delay_ms": 1e30})),
            "delay_ms",
        ),
        (
            "POST",
            "/v1/tasks".to_string(),
            Some(json!({"module": "noop", "delay_ms": -1})),
            "delay_ms",
        ),
        (
            "POST",
            "/v1/tasks".to_string(),
            Some(json!({"module": "noop", "not_before": now_ms() + 400 * 86_400_000})),
            "not_before",
        ),
        (
            "POST",
            "/v1/jobs".to_string(),
            Some(json!({"module": "noop", "payloads": [1], "name": "n".repeat(10 << 20)})),
            "name",
        ),
    ];
    for (method, path, body, named) in cases {
        let (status, response) = grid.call(method, &path, body).await;
        assert_eq!(status, 400, "{method} {path}: {response}");
        let message = response["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(named), "{method} {path}: {response}");
    }
}

/// A path that exists with a method it does not take: 405 in the one JSON
/// error shape.
#[tokio::test]
async fn a_wrong_method_is_a_json_405() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    for (method, path) in [
        ("DELETE", "/v1/tasks"),
        ("PUT", "/v1/stats"),
        ("GET", "/v1/jobs/j-1/pause"),
    ] {
        let (status, body) = grid.call(method, path, None).await;
        assert_eq!(status, 405, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], json!("method_not_allowed"), "{body}");
    }
}

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Guests that allocate until they hit their memory limit fail, and the
/// memory they touched is given back when their task ends: six 512 MiB
/// hoarders leave an idle host far below the 3 GiB they held together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_guests_that_hit_their_limit_is_given_back() {
    use crate::process::{Server, get, post};
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_serving(dir.path(), &[], &[], std::process::Stdio::null(), 2, "warn");
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..6 {
        let created = post(
            &client,
            format!("{}/v1/tasks", server.url),
            json!({"module": "misbehave", "payload": {"action": "alloc"},
                   "memory_bytes": 512u64 << 20, "max_attempts": 1}),
        )
        .await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let task = get(&client, format!("{}/v1/tasks/{id}", server.url)).await;
            if task["state"] == json!("Dead") {
                assert_eq!(task["error_kind"], json!("memory_limit"), "{task}");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{task}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let rss = rss_bytes(server.pid());
    assert!(
        rss < 512 << 20,
        "idle host holds {} MiB after its hoarders died",
        rss >> 20
    );
}

/// A sweep's base is what every point copies: it is capped at 64 KiB, and
/// the points created ahead of the workers are bounded in bytes, so a large
/// base does not turn into gigabytes of waiting payloads.
#[tokio::test]
async fn sweep_bases_are_capped_and_expansion_ahead_is_bounded_in_bytes() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let too_big = json!({"curve": "x".repeat(kwq::model::MAX_SWEEP_BASE_BYTES)});
    let (status, body) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "sweep": {"base": too_big, "params": {"i": {"from": 1, "to": 10}}}})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], json!("invalid_sweep"), "{body}");

    let dir = tempfile::tempdir().unwrap();
    let queue = EmbeddedQueue::open(&dir.path().join("q.db"), EmbeddedConfig::default()).unwrap();
    let base = json!({"curve": "x".repeat(60 << 10)});
    let job = queue
        .submit_job(kwq::model::NewJob {
            id: "j-big".into(),
            name: None,
            module: ModuleId::of(b"m"),
            options: kwq::model::TaskOptions {
                priority: 0,
                ..Default::default()
            },
            payloads: Vec::new(),
            sweep: Some(
                serde_json::from_value(
                    json!({"base": base, "params": {"i": {"from": 1, "to": 1_000_000}}}),
                )
                .unwrap(),
            ),
        })
        .await
        .unwrap();
    assert_eq!(job.total, 1_000_000);
    // A lease call refills sweeps before it waits; the job is held, so it
    // creates no points and waits.
    let view = kwq::queue::WorkerView {
        id: "w".into(),
        warm: Vec::new(),
        pool: None,
    };
    for _ in 0..3 {
        let leased =
            tokio::time::timeout(std::time::Duration::from_millis(50), queue.lease(&view)).await;
        assert!(leased.is_err(), "a held task was leased");
    }
    let id = "j-big".to_string();
    assert_eq!(
        queue.job(&id).await.unwrap().expanded,
        0,
        "a held sweep expanded"
    );
    // Raised, it expands, bounded in bytes, at its new priority.
    let job = queue.set_job_priority(&id, 7).await.unwrap();
    assert_eq!(job.options.priority, 7);
    let ahead_bytes = job.expanded * (60 << 10);
    assert!(
        job.expanded > 0 && ahead_bytes <= 8 << 20,
        "{} points ({} MiB) created ahead",
        job.expanded,
        ahead_bytes >> 20
    );
    let lease = queue.lease(&view).await.unwrap();
    queue.flush().await.unwrap();
    let task = queue.task(&lease.task_id).await.unwrap();
    assert_eq!(task.options.priority, 7, "{task:?}");
    // Held again, nothing more is created however many points are taken.
    let expanded = job.expanded;
    queue.set_job_priority(&id, 0).await.unwrap();
    let waiting = queue.depth()[0];
    assert_eq!(
        waiting,
        1_000_000 - 1,
        "held points are counted at priority 0"
    );
    assert_eq!(queue.job(&id).await.unwrap().expanded, expanded);
}

/// A browser page on another site can neither write (its `Origin` gives it
/// away) nor, through DNS rebinding, read from a host on loopback (its
/// `Host` does); a module upload must say it is Wasm or bytes.
#[tokio::test]
async fn pages_of_other_sites_cannot_write_or_rebind() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let send = |method: &'static str,
                path: &'static str,
                headers: Vec<(&'static str, &'static str)>,
                body: Vec<u8>| {
        let headers: Vec<(String, String)> = headers
            .into_iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let grid = &grid;
        async move {
            grid.request_with_headers(method, path, &headers, body)
                .await
        }
    };
    let local = ("host", "127.0.0.1:7700");
    // A bodyless cancel from another site's page.
    let (status, body) = send(
        "POST",
        "/v1/jobs/j-x/cancel",
        vec![
            local,
            ("origin", "https://evil.example"),
            ("content-type", "text/plain"),
        ],
        Vec::new(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("cross_origin")),
        "{body}"
    );
    // The same from the dashboard itself reaches the handler (404: no such job).
    let (status, _) = send(
        "POST",
        "/v1/jobs/j-x/cancel",
        vec![local, ("origin", "http://127.0.0.1:7700")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 404);
    // A module smuggled in as a form's text/plain.
    let bytes = std::fs::read(examples::NOOP).unwrap();
    let (status, body) = send(
        "POST",
        "/v1/modules?name=x",
        vec![local, ("content-type", "text/plain")],
        bytes.clone(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (415, json!("unsupported_media_type")),
        "{body}"
    );
    let (status, _) = send(
        "POST",
        "/v1/modules?name=x",
        vec![local, ("content-type", "application/wasm")],
        bytes,
    )
    .await;
    assert_eq!(status, 200);
    // DNS rebinding: a loopback host does not answer to another name, even for reads.
    let (status, body) = send(
        "GET",
        "/v1/stats",
        vec![("host", "evil.example")],
        Vec::new(),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (403, json!("host_not_allowed")),
        "{body}"
    );
    let (status, _) = send(
        "GET",
        "/v1/stats",
        vec![("host", "localhost:7700")],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200);
}

/// A full store fails closed and recovers by itself: the completion it could
/// not write is kept and retried (not lost, as it was), leasing stops,
/// submits get 503 with Retry-After, `/healthz` says why; once there is room
/// again the kept writes commit and leasing resumes, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_fails_closed_and_recovers_without_a_restart() {
    use kwq::model::{NewTask, TaskOptions, TaskState};
    use kwq::queue::{Completion, QueueError, WorkerView};
    use std::sync::Arc;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let embedded = Arc::new(
        EmbeddedQueue::open(&dir.path().join("kwq.db"), EmbeddedConfig::default()).unwrap(),
    );
    let queue: Arc<dyn Queue> = embedded.clone();
    let task = |i: usize, bytes: usize| NewTask {
        id: format!("t-{i}"),
        job_id: None,
        module: ModuleId::of(b"m"),
        payload: vec![b'p'; bytes],
        options: TaskOptions::default(),
    };
    queue
        .submit_tasks((0..5).map(|i| task(i, 10)).collect())
        .await
        .unwrap();
    let view = |id: &str| WorkerView {
        id: id.into(),
        warm: Vec::new(),
        pool: None,
    };
    let first = queue.lease(&view("w1")).await.unwrap();
    queue.started(&first);
    queue.flush().await.unwrap();

    // The disk fills up: a completion with a large result cannot be written.
    embedded.set_max_store_bytes(Some(1));
    queue
        .complete(
            &first,
            Completion {
                result: vec![b'r'; 200_000],
                ..Completion::default()
            },
        )
        .unwrap();
    let refused = queue.submit_tasks(vec![task(99, 200_000)]).await;
    assert!(
        matches!(&refused, Err(QueueError::Unavailable(reason)) if reason.contains("full")),
        "{refused:?}"
    );
    let reason = queue.health().unwrap_err();
    // Leasing stops although four tasks wait.
    let leased = tokio::time::timeout(Duration::from_millis(300), queue.lease(&view("w2"))).await;
    assert!(leased.is_err(), "leased from a failing store");
    // The API says so: health 503 with the reason, submits 503 with Retry-After.
    let reads: std::sync::Arc<dyn kwq::queue::ReadStore> = queue.clone();
    let state = kwq::api::AppState::new(
        queue.clone(),
        kwq::dispatch::ModuleRegistry::new(crate::support::shared_runtime().clone(), queue.clone()),
        kwq::tracker::Tracker::attach(&reads).await.unwrap(),
        kwq::api::AllowedHosts::any(),
    );
    use tower::ServiceExt;
    let health = kwq::api::app(state.clone())
        .oneshot(
            axum::http::Request::get("/healthz")
                .body(axum::body::Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(health.status(), 503);
    let body = axum::body::to_bytes(health.into_body(), usize::MAX)
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (body["status"].clone(), body["reason"].clone()),
        (json!("unhealthy"), json!(reason))
    );

    // Room again: the kept completion commits, leasing resumes.
    let mut events = queue.subscribe();
    embedded.set_max_store_bytes(None);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("the kept completion never committed")
            .unwrap();
        if event.task_id == first.task_id && event.state == TaskState::Completed {
            break;
        }
    }
    assert_eq!(queue.health(), Ok(()));
    let record = queue.task(&first.task_id).await.unwrap();
    assert_eq!(record.state, TaskState::Completed);
    assert_eq!(record.result.map(|r| r.len()), Some(200_000));
    let next = tokio::time::timeout(Duration::from_secs(10), queue.lease(&view("w2")))
        .await
        .expect("leasing did not resume")
        .unwrap();
    assert_ne!(next.task_id, first.task_id);
    queue.submit_tasks(vec![task(100, 200_000)]).await.unwrap();
}

/// Guest memory is budgeted across a host's workers: two tasks that each
/// ask for 200 MiB do not run at once under a 300 MiB budget, and a task
/// asking for more than the whole budget fails with `memory_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_guest_memory_stays_within_the_hosts_budget() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    grid.start_workers_with_budget(2, 300 << 20);
    let (status, job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "misbehave", "memory_bytes": 200u64 << 20,
                        "payloads": [{"action": "sleep", "ms": 200}, {"action": "sleep", "ms": 200}]})),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    let done = grid.wait_job(&id).await;
    assert_eq!(done["counts"]["Completed"], json!(2), "{done}");
    let mut spans = Vec::new();
    for index in 0..2 {
        let (_, task) = grid
            .call("GET", &format!("/v1/tasks/{id}.{index}"), None)
            .await;
        let at = |state: &str| task["timestamps"][state].as_u64().unwrap();
        spans.push((at("Running"), at("Completed")));
    }
    spans.sort();
    assert!(
        spans[1].0 >= spans[0].1,
        "the two 200 MiB tasks overlapped under a 300 MiB budget: {spans:?}"
    );
    let (_, big) = grid
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "misbehave", "payload": {"action": "echo"},
                        "memory_bytes": 512u64 << 20, "max_attempts": 1})),
        )
        .await;
    let big = grid.wait_task(big["id"].as_str().unwrap()).await;
    assert_eq!(
        (big["state"].clone(), big["error_kind"].clone()),
        (json!("Dead"), json!("memory_limit")),
        "{big}"
    );
    assert!(
        big["error_message"].as_str().unwrap().contains("budget"),
        "{big}"
    );
    grid.stop().await;
}

/// Under `--token-reads` the grid's data (payloads, results, events,
/// statistics, metrics) is as guarded as its writes; health, the dashboard
/// page and the API documentation stay open so a person can sign in and a
/// load balancer can probe. Without it, reads are open.
#[tokio::test]
async fn token_reads_guards_every_read_of_the_grids_data() {
    let mut grid = TestGrid::new(Some("s3cret"), ApiLimits::default()).await;
    let bytes = std::fs::read(examples::NOOP).unwrap();
    let (status, body) = grid
        .request("POST", "/v1/modules?name=noop", bytes, None, Some("s3cret"))
        .await;
    assert_eq!(status, 201, "{body}");
    let guarded = [
        "/v1/modules",
        "/v1/modules/noop",
        "/v1/tasks",
        "/v1/tasks/t-x",
        "/v1/jobs",
        "/v1/jobs/j-x",
        "/v1/jobs/j-x/results",
        "/v1/events",
        "/v1/stats",
        "/v1/metrics",
        "/metrics",
    ];
    let open = ["/healthz", "/v1/healthz", "/", "/docs", "/openapi.json"];
    // (The event stream answers 200 and never ends: its status is checked
    // only where it is refused.)
    for path in guarded.iter().filter(|p| **p != "/v1/events") {
        let (status, body) = grid.call("GET", path, None).await;
        assert_ne!(
            status, 401,
            "{path} needed a token without --token-reads: {body}"
        );
    }
    grid.state.token_reads = true;
    for path in guarded {
        let (status, body) = grid.call("GET", path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        assert_eq!(
            body["error"]["code"],
            json!("unauthorized"),
            "{path}: {body}"
        );
        let (status, _) = grid
            .request("GET", path, Vec::new(), None, Some("wrong"))
            .await;
        assert_eq!(status, 401, "{path} with a wrong token");
        if path != "/v1/events" {
            let (status, body) = grid
                .request("GET", path, Vec::new(), None, Some("s3cret"))
                .await;
            assert!(status == 200 || status == 404, "{path}: {status} {body}");
        }
    }
    for path in open {
        let (status, body) = grid.call("GET", path, None).await;
        assert!(status == 200 || status == 308, "{path}: {status} {body}");
    }
}

/// A million-payload job is written in chunks: a single task submitted
/// while it is being accepted is accepted before it, not after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_job_does_not_hold_other_writes_back() {
    use crate::process::Server;
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_serving(dir.path(), &[], &[], std::process::Stdio::null(), 0, "warn");
    let client = reqwest::Client::new();
    let body = json!({"module": "noop", "name": "big", "priority": 0,
                      "payloads": (0..1_000_000).collect::<Vec<u32>>()});
    let big = tokio::spawn({
        let (client, url) = (client.clone(), format!("{}/v1/jobs", server.url));
        async move { client.post(url).json(&body).send().await.unwrap().status() }
    });
    // Acceptance has begun once the job is listed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let jobs = crate::process::get(&client, format!("{}/v1/jobs", server.url)).await;
        if jobs.as_array().is_some_and(|j| !j.is_empty()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the big job never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let one = client
        .post(format!("{}/v1/tasks", server.url))
        .json(&json!({"module": "noop", "priority": 0}))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(one, 201);
    assert!(
        !big.is_finished(),
        "the single task waited for the whole big job"
    );
    assert_eq!(big.await.unwrap(), 201);
}

/// Killed while a big job is being accepted, a host restarts with either
/// the whole job (it had answered 201) or none of it: never a part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cut_short_by_a_crash_is_all_or_nothing() {
    use crate::process::{Server, get};
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_serving(dir.path(), &[], &[], std::process::Stdio::null(), 0, "warn");
    let client = reqwest::Client::new();
    let body = json!({"module": "noop", "name": "big", "priority": 0,
                      "payloads": (0..500_000).collect::<Vec<u32>>()});
    let big = tokio::spawn({
        let (client, url) = (client.clone(), format!("{}/v1/jobs", server.url));
        async move {
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .map(|r| r.status())
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let job = loop {
        let jobs = get(&client, format!("{}/v1/jobs", server.url)).await;
        if let Some(id) = jobs[0]["id"].as_str() {
            break id.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the big job never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    server.kill();
    let answered = big.await.unwrap().is_ok_and(|s| s == 201);
    eprintln!(
        "killed {} the job was answered",
        if answered { "after" } else { "before" }
    );
    let server =
        Server::start_serving(dir.path(), &[], &[], std::process::Stdio::null(), 0, "warn");
    let record = client
        .get(format!("{}/v1/jobs/{job}", server.url))
        .send()
        .await
        .unwrap();
    let stats = get(&client, format!("{}/v1/stats", server.url)).await;
    if answered {
        assert_eq!(record.status(), 200);
        assert_eq!(stats["counts"]["Pending"], json!(500_000), "{stats}");
    } else {
        assert_eq!(record.status(), 404, "a part of an unanswered job survived");
        assert_eq!(stats["counts"]["Pending"], json!(0), "{stats}");
        let tasks = get(&client, format!("{}/v1/tasks?job={job}", server.url)).await;
        assert_eq!(tasks["items"], json!([]), "{tasks}");
    }
}

/// Waiting tasks hold at most `held_payload_bytes` of payload in memory;
/// the rest stay on disk and are read back, intact, when leased, also
/// after a restart.
#[tokio::test]
async fn waiting_payloads_beyond_the_cap_stay_on_disk_and_come_back_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let config = EmbeddedConfig {
        held_payload_bytes: 64 << 10,
        ..EmbeddedConfig::default()
    };
    let payload = |i: usize| format!("{i:04}-{}", "p".repeat(4000)).into_bytes();
    let queue = EmbeddedQueue::open(&path, config.clone()).unwrap();
    queue
        .submit_job(kwq::model::NewJob {
            id: "j-spill".into(),
            name: None,
            module: ModuleId::of(b"m"),
            options: Default::default(),
            payloads: (0..100).map(payload).collect(),
            sweep: None,
        })
        .await
        .unwrap();
    assert!(
        queue.held_payload_bytes() <= 64 << 10,
        "{} bytes held",
        queue.held_payload_bytes()
    );
    let view = kwq::queue::WorkerView {
        id: "w".into(),
        warm: Vec::new(),
        pool: None,
    };
    // Half now; the rest after a restart.
    for _ in 0..50 {
        let lease = queue.lease(&view).await.unwrap();
        let index: usize = lease.task_id.rsplit('.').next().unwrap().parse().unwrap();
        assert_eq!(
            &*lease.payload,
            payload(index).as_slice(),
            "{}",
            lease.task_id
        );
        queue
            .complete(&lease, kwq::queue::Completion::default())
            .unwrap();
    }
    queue.close();
    queue.flush().await.unwrap();
    drop(queue);
    let queue = EmbeddedQueue::open(&path, config).unwrap();
    assert!(queue.held_payload_bytes() <= 64 << 10);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..50 {
        let lease = queue.lease(&view).await.unwrap();
        let index: usize = lease.task_id.rsplit('.').next().unwrap().parse().unwrap();
        assert_eq!(
            &*lease.payload,
            payload(index).as_slice(),
            "{}",
            lease.task_id
        );
        seen.insert(index);
    }
    assert_eq!(seen.len(), 50);
}

/// A task that grows its instance's memory and succeeds does not leave
/// that memory with a warm instance: beyond `--max-warm-memory` the
/// instance is dropped when its task ends, so six 300 MiB tasks with their
/// own affinity keys leave an idle host far below the 1.8 GiB they touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_of_big_tasks_that_succeed_is_given_back() {
    use crate::process::{Server, get, post};
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_serving(dir.path(), &[], &[], std::process::Stdio::null(), 2, "warn");
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for key in 0..6 {
        let created = post(
            &client,
            format!("{}/v1/tasks", server.url),
            json!({"module": "misbehave", "payload": {"action": "touch", "bytes": 300u64 << 20},
                   "memory_bytes": 512u64 << 20, "affinity": format!("key-{key}")}),
        )
        .await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let task = get(&client, format!("{}/v1/tasks/{id}", server.url)).await;
            if task["state"] == json!("Completed") {
                assert_eq!(task["result"]["touched"], json!(300u64 << 20), "{task}");
                break;
            }
            assert!(
                task["state"] != json!("Dead") && std::time::Instant::now() < deadline,
                "{task}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let rss = rss_bytes(server.pid());
    assert!(
        rss < 512 << 20,
        "idle host holds {} MiB after its big tasks finished",
        rss >> 20
    );
}
