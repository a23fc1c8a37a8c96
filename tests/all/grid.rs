//! The grid with workers: retries, dead letters, priority order, affinity,
//! pause/resume/cancel, held tasks, results, and restart recovery.

use crate::support::TestGrid;
use kwq::api::ApiLimits;
use kwq::examples;
use serde_json::{Value, json};
use std::collections::BTreeSet;

async fn grid_with(modules: &[(&str, &str)]) -> TestGrid {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    for (path, name) in modules {
        grid.upload(path, name).await;
    }
    grid
}

async fn submit_task(grid: &TestGrid, body: Value) -> String {
    let (status, created) = grid.call("POST", "/v1/tasks", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

fn states(task: &Value) -> Vec<String> {
    task["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_fails_twice_then_succeeds_completes_on_attempt_three() {
    let mut grid = grid_with(&[(examples::MISBEHAVE, "misbehave")]).await;
    grid.start_workers(2);
    let id = submit_task(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "fail_until_attempt", "succeed_on": 3}, "max_attempts": 5}),
    )
    .await;
    let task = grid.wait_task(&id).await;
    assert_eq!(task["state"], json!("Completed"), "{task}");
    assert_eq!(task["attempts"], json!(3));
    assert_eq!(task["result"], json!({"attempt": 3}));
    assert_eq!(
        states(&task),
        [
            "Pending",
            "Allocated",
            "Running",
            "Error",
            "Allocated",
            "Running",
            "Error",
            "Allocated",
            "Running",
            "Completed"
        ]
    );
    let errors: Vec<&Value> = task["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["state"] == json!("Error"))
        .collect();
    assert!(
        errors
            .iter()
            .all(|e| e["error_kind"] == json!("guest_error"))
    );
    let (_, stats) = grid.call("GET", "/v1/stats", None).await;
    assert_eq!(stats["retries"], json!(2));
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_that_always_fails_is_parked_dead_with_its_error() {
    let mut grid = grid_with(&[(examples::MISBEHAVE, "misbehave")]).await;
    grid.start_workers(1);
    let id = submit_task(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "trap"}, "max_attempts": 2}),
    )
    .await;
    let task = grid.wait_task(&id).await;
    assert_eq!(
        (task["state"].clone(), task["attempts"].clone()),
        (json!("Dead"), json!(2)),
        "{task}"
    );
    assert_eq!(task["error_kind"], json!("trap"));
    assert!(
        task["error_message"]
            .as_str()
            .unwrap()
            .contains("guest panicked on purpose")
    );
    assert_eq!(states(&task).last().map(String::as_str), Some("Dead"));
    let (_, stats) = grid.call("GET", "/v1/stats", None).await;
    assert_eq!(
        (
            stats["dead_letters"].clone(),
            stats["counts"]["Dead"].clone()
        ),
        (json!(1), json!(1))
    );
    let (_, dead) = grid.call("GET", "/v1/tasks?status=Dead", None).await;
    assert_eq!(dead["items"][0]["id"], json!(id));
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_run_in_priority_order_and_held_tasks_wait_until_raised() {
    let mut grid = grid_with(&[(examples::MISBEHAVE, "misbehave")]).await;
    let mut ids = Vec::new();
    for (i, priority) in [1, 5, 9, 3, 9, 7, 2, 5].into_iter().enumerate() {
        let body = json!({"module": "misbehave", "payload": {"action": "echo", "value": i}, "priority": priority});
        ids.push((priority, submit_task(&grid, body).await));
    }
    let held = submit_task(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "echo"}, "priority": 0}),
    )
    .await;
    grid.start_workers(1);
    for (_, id) in &ids {
        grid.wait_task(id).await;
    }
    let (_, held_task) = grid.call("GET", &format!("/v1/tasks/{held}"), None).await;
    assert_eq!(held_task["state"], json!("Pending"), "priority 0 is held");
    let mut by_start: Vec<(u64, u8)> = Vec::new();
    for (priority, id) in &ids {
        let (_, task) = grid.call("GET", &format!("/v1/tasks/{id}"), None).await;
        by_start.push((task["timestamps"]["Running"].as_u64().unwrap(), *priority));
        let running = task["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["state"] == json!("Running"))
            .unwrap();
        by_start.last_mut().unwrap().0 = running["offset"].as_u64().unwrap();
    }
    by_start.sort();
    let order: Vec<u8> = by_start.iter().map(|(_, p)| *p).collect();
    assert_eq!(order, vec![9, 9, 7, 5, 5, 3, 2, 1]);
    let (status, _) = grid
        .call(
            "POST",
            &format!("/v1/tasks/{held}/priority"),
            Some(json!({"priority": 4})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(grid.wait_task(&held).await["state"], json!("Completed"));
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_key_tasks_meet_warm_instances() {
    let mut grid = grid_with(&[(examples::CURVE, "curve")]).await;
    let mut ids = Vec::new();
    for i in 0..40 {
        let key = if i % 2 == 0 { "curve=USD" } else { "curve=EUR" };
        ids.push(
            submit_task(
                &grid,
                json!({"module": "curve", "payload": {"maturity": 1 + i % 10}, "affinity": key}),
            )
            .await,
        );
    }
    grid.start_workers(2);
    let mut builds = BTreeSet::new();
    for id in &ids {
        let task = grid.wait_task(id).await;
        assert_eq!(task["state"], json!("Completed"), "{task}");
        builds.insert(task["result"]["builds"].as_u64().unwrap());
    }
    assert_eq!(
        builds,
        BTreeSet::from([1]),
        "every instance built its curve once"
    );
    let (_, stats) = grid.call("GET", "/v1/stats", None).await;
    let workers = stats["workers"].as_array().unwrap();
    let inits: u64 = workers
        .iter()
        .map(|w| w["stats"]["inits"].as_u64().unwrap())
        .sum();
    let warm_hits: u64 = workers
        .iter()
        .map(|w| w["stats"]["warm_hits"].as_u64().unwrap())
        .sum();
    assert!(
        inits <= 4,
        "at most one init per key per worker, got {inits}"
    );
    assert_eq!(inits + warm_hits, 40);
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_cancel_a_job() {
    let mut grid = grid_with(&[(examples::MISBEHAVE, "misbehave")]).await;
    let payloads: Vec<Value> = (0..30)
        .map(|i| json!({"action": "echo", "value": i}))
        .collect();
    let (_, paused_job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "misbehave", "payloads": payloads})),
        )
        .await;
    let paused = paused_job["id"].as_str().unwrap().to_string();
    let (status, body) = grid
        .call("POST", &format!("/v1/jobs/{paused}/pause"), None)
        .await;
    assert_eq!((status, body["state"].clone()), (200, json!("Paused")));
    let (_, doomed_job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "misbehave", "payloads": payloads})),
        )
        .await;
    let doomed = doomed_job["id"].as_str().unwrap().to_string();
    grid.call("POST", &format!("/v1/jobs/{doomed}/pause"), None)
        .await;

    grid.start_workers(2);
    // Another job runs to the end while the paused one waits: the workers
    // were free to take the paused tasks the whole time and did not.
    let (_, other) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "misbehave", "payloads": payloads})),
        )
        .await;
    grid.wait_job(other["id"].as_str().unwrap()).await;
    let (_, still) = grid.call("GET", &format!("/v1/jobs/{paused}"), None).await;
    assert_eq!(
        (still["state"].clone(), still["counts"]["Pending"].clone()),
        (json!("Paused"), json!(30))
    );

    let (status, body) = grid
        .call("POST", &format!("/v1/jobs/{doomed}/cancel"), None)
        .await;
    assert_eq!(
        (
            status,
            body["state"].clone(),
            body["counts"]["Cancelled"].clone()
        ),
        (200, json!("Cancelled"), json!(30))
    );
    let (status, body) = grid
        .call("POST", &format!("/v1/jobs/{doomed}/resume"), None)
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("conflict"))
    );

    grid.call("POST", &format!("/v1/jobs/{paused}/resume"), None)
        .await;
    let finished = grid.wait_job(&paused).await;
    assert_eq!(
        (
            finished["state"].clone(),
            finished["counts"]["Completed"].clone()
        ),
        (json!("Finished"), json!(30))
    );
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_expands_lazily_and_streams_every_result_once() {
    let mut grid = grid_with(&[(examples::MISBEHAVE, "misbehave")]).await;
    let sweep = json!({"base": {"action": "echo"}, "params": {"value": {"from": 0, "to": 9999}}});
    let (status, job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "misbehave", "sweep": sweep})),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(
        (job["total"].clone(), job["expanded"].clone()),
        (json!(10_000), json!(0))
    );
    let id = job["id"].as_str().unwrap().to_string();
    grid.start_workers(2);
    let done = grid.wait_job(&id).await;
    assert_eq!(done["counts"]["Completed"], json!(10_000), "{done}");
    // Run times at task resolution, in µs.
    // Not a whole number of milliseconds (a mean of 10,000 µs-resolution
    // run times practically never is), whatever the machine's load.
    let mean = done["mean_run_us"].as_f64().unwrap();
    assert!(
        mean > 0.0 && mean % 1000.0 != 0.0,
        "mean run {mean} µs: {done}"
    );

    use tower::ServiceExt;
    let request = axum::http::Request::get(format!("/v1/jobs/{id}/results"))
        .body(axum::body::Body::empty())
        .unwrap();
    let response = kwq::api::app(grid.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let mut values = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let line: Value = serde_json::from_slice(line).unwrap();
        assert!(
            ids.insert(line["task_id"].as_str().unwrap().to_string()),
            "duplicate {line}"
        );
        values.insert(line["result"].as_u64().unwrap());
    }
    assert_eq!(values, (0..10_000).collect::<BTreeSet<u64>>());
    grid.stop().await;
}

#[tokio::test]
async fn fifty_million_tasks_are_one_request_and_one_row() {
    let grid = grid_with(&[(examples::NOOP, "noop")]).await;
    let sweep = json!({"params": {"seed": {"from": 0, "to": 49_999_999}}});
    let (status, job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "sweep": sweep, "priority": 3})),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(
        (job["total"].clone(), job["counts"]["Pending"].clone()),
        (json!(50_000_000), json!(50_000_000))
    );
    let (_, stats) = grid.call("GET", "/v1/stats", None).await;
    assert_eq!(stats["depth"][3], json!(50_000_000));
    let (_, tasks) = grid.call("GET", "/v1/tasks?limit=5", None).await;
    assert_eq!(
        tasks["items"],
        json!([]),
        "no task rows until workers lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_in_prometheus_text_format() {
    kwq::tracker::metrics::install();
    let mut grid = grid_with(&[(examples::CURVE, "curve")]).await;
    grid.start_workers(2);
    let payloads: Vec<Value> = (1..=6).map(|i| json!({"maturity": i})).collect();
    let (_, job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "curve", "payloads": payloads, "affinity": "curve=CHF"})),
        )
        .await;
    grid.wait_job(job["id"].as_str().unwrap()).await;
    let (held_status, _) = grid
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "curve", "priority": 0})),
        )
        .await;
    assert_eq!(held_status, 201);

    use tower::ServiceExt;
    let request = axum::http::Request::get("/metrics")
        .body(axum::body::Body::empty())
        .unwrap();
    let response = kwq::api::app(grid.state.clone())
        .oneshot(request)
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "kwq_tasks{state=\"Completed\"} 6",
        "kwq_tasks{state=\"Pending\"} 1",
        "kwq_queue_depth{priority=\"0\"} 1",
        "kwq_retries_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    for name in [
        "kwq_task_run_seconds_bucket",
        "kwq_task_queue_wait_seconds_bucket",
        "kwq_module_cache_hits_total",
        "kwq_module_compile_seconds",
        "kwq_affinity_warm_hits_total",
        "kwq_worker_busy_ratio",
        "kwq_outstanding_estimated_seconds",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    // Histograms start at 10 µs and name the module as well as its hash.
    let curve_runs: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.starts_with("kwq_task_run_seconds_bucket") && l.contains("module_name=\"curve\"")
        })
        .collect();
    assert!(
        curve_runs.iter().any(|l| l.contains("le=\"0.00001\"")),
        "no 10 µs bucket for curve in\n{text}"
    );
    grid.stop().await;
}
