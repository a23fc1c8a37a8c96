//! Dependencies on the embedded store (`after`, the Waiting state): a
//! waiter runs only once what it names has completed; a failed dependency
//! cancels it (and its own waiters) with the reason, unless it said
//! `on_failure: run`; a job waits for, and is waited for, as a whole; bad
//! requests are 400s; and a chain survives its host SIGKILLed mid-run.

use crate::process::{Server, get, post};
use crate::support::TestGrid;
use kwq::api::ApiLimits;
use kwq::examples;
use serde_json::{Value, json};

async fn submit(grid: &TestGrid, body: Value) -> String {
    let (status, created) = grid.call("POST", "/v1/tasks", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

async fn submit_job(grid: &TestGrid, body: Value) -> String {
    let (status, created) = grid.call("POST", "/v1/jobs", Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

async fn task(grid: &TestGrid, id: &str) -> Value {
    let (status, body) = grid.call("GET", &format!("/v1/tasks/{id}"), None).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn at(task: &Value, state: &str) -> u64 {
    task["timestamps"][state]
        .as_u64()
        .unwrap_or_else(|| panic!("no {state} time in {task}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_not_pending_until_its_dependency_completes() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    let first = submit(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "sleep", "ms": 50}}),
    )
    .await;
    let second = submit(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "echo", "value": 2}, "after": [first]}),
    )
    .await;
    // No workers yet: the waiter is Waiting, counted apart from Pending,
    // and not in the ready index (depth counts the first task only).
    assert_eq!(task(&grid, &second).await["state"], "Waiting");
    let (_, stats) = grid.call("GET", "/v1/stats", None).await;
    assert_eq!(
        (
            stats["counts"]["Waiting"].clone(),
            stats["counts"]["Pending"].clone()
        ),
        (json!(1), json!(1)),
        "{stats}"
    );
    let depth: u64 = stats["depth"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap())
        .sum();
    assert_eq!(depth, 1, "{stats}");
    let (_, metrics) = grid.call("GET", "/metrics", None).await;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("kwq_tasks{state=\"Waiting\"} 1"),
        "{metrics}"
    );

    grid.start_workers(2);
    let done = grid.wait_task(&second).await;
    assert_eq!(
        (done["state"].clone(), done["result"].clone()),
        (json!("Completed"), json!(2)),
        "{done}"
    );
    let before = task(&grid, &first).await;
    assert!(
        at(&done, "Running") >= at(&before, "Completed"),
        "{before} {done}"
    );
    let (_, timeline) = grid.call("GET", &format!("/v1/tasks/{second}"), None).await;
    let states: Vec<&str> = timeline["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states[..2], ["Waiting", "Pending"], "{timeline}");

    // Two dependencies: released only once the second has completed too.
    let slow = submit(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "sleep", "ms": 300}}),
    )
    .await;
    let both = submit(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "echo"}, "after": [first, slow]}),
    )
    .await;
    let both = grid.wait_task(&both).await;
    assert_eq!(both["state"], "Completed", "{both}");
    assert!(
        at(&both, "Pending") >= at(&task(&grid, &slow).await, "Completed"),
        "{both}"
    );

    // A dependency that has already completed holds nothing up.
    let late = submit(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "echo"}, "after": [first]}),
    )
    .await;
    assert_eq!(grid.wait_task(&late).await["state"], "Completed");
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dependency_cancels_its_waiters_down_the_chain_unless_they_run_anyway() {
    failed_dependencies_cancel_down_the_chain(TestGrid::new(None, ApiLimits::default()).await)
        .await;
}

/// A failing task, a chain after it, one waiter that runs anyway and one
/// cancelled by hand while waiting: every store that holds dependencies
/// must end them alike (the Kafka grid's test runs this too). Returns the
/// waiting sweep the grid cancelled, with the reason it gave.
pub(crate) async fn failed_dependencies_cancel_down_the_chain(
    mut grid: TestGrid,
) -> (String, String) {
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    let failing = submit(
        &grid,
        json!({"module": "misbehave", "max_attempts": 1, "payload": {"action": "fail", "message": "no quotes"}}),
    )
    .await;
    let echo = |after: &str| json!({"module": "misbehave", "payload": {"action": "echo", "value": "ran"}, "after": [after]});
    let child = submit(&grid, echo(&failing)).await;
    let grandchild = submit(&grid, echo(&child)).await;
    let mut anyway = echo(&failing);
    anyway["on_failure"] = json!("run");
    let anyway = submit(&grid, anyway).await;
    // Cancelled by hand while waiting: its own waiter is cancelled too.
    let cancelled_by_hand = submit(&grid, echo(&anyway)).await;
    let behind_it = submit(&grid, echo(&cancelled_by_hand)).await;
    // A whole job behind a task that will be cancelled: cancelled with it.
    let sweep_behind = submit_job(
        &grid,
        json!({"module": "misbehave", "after": [child],
               "sweep": {"base": {"action": "echo"}, "params": {"value": {"from": 1, "to": 3}}}}),
    )
    .await;
    let (status, body) = grid
        .call(
            "POST",
            &format!("/v1/tasks/{cancelled_by_hand}/cancel"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        grid.wait_task(&cancelled_by_hand).await["state"],
        "Cancelled"
    );

    grid.start_workers(2);
    assert_eq!(grid.wait_task(&failing).await["state"], "Dead");
    for (waiter, reason) in [
        (&child, format!("dependency_failed: {failing}")),
        (&grandchild, format!("dependency_failed: {child}")),
        (
            &behind_it,
            format!("dependency_failed: {cancelled_by_hand}"),
        ),
    ] {
        let ended = grid.wait_task(waiter).await;
        assert_eq!(
            (ended["state"].clone(), ended["error_message"].clone()),
            (json!("Cancelled"), json!(reason)),
            "{ended}"
        );
        assert_eq!(ended["attempts"], 0, "never ran: {ended}");
    }
    let ran = grid.wait_task(&anyway).await;
    assert_eq!(
        (ran["state"].clone(), ran["result"].clone()),
        (json!("Completed"), json!("ran"))
    );
    let job = until_job_cancelled(&grid, &sweep_behind).await;
    let reason = format!("dependency_failed: {child}");
    assert_eq!(job["cancel_reason"], json!(reason), "{job}");
    assert_eq!(job["counts"]["Cancelled"], 3, "{job}");
    assert_eq!(job["counts"]["Completed"], 0, "{job}");
    grid.stop().await;
    (sweep_behind, reason)
}

/// The job's view once it is Cancelled. Polled: a job cancelled before any
/// task of it was written has no task event to wait on.
pub(crate) async fn until_job_cancelled(grid: &TestGrid, job: &str) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, view) = grid.call("GET", &format!("/v1/jobs/{job}"), None).await;
        assert_eq!(status, 200, "{view}");
        if view["state"] == "Cancelled" {
            return view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not cancelled: {view}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_and_are_waited_for_as_a_whole() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    let sleeps: Vec<Value> = (0..4)
        .map(|_| json!({"action": "sleep", "ms": 30}))
        .collect();
    let first = submit_job(&grid, json!({"module": "misbehave", "payloads": sleeps})).await;
    let reduce = submit(
        &grid,
        json!({"module": "misbehave", "payload": {"action": "echo"}, "after": [first]}),
    )
    .await;
    let explicit = submit_job(
        &grid,
        json!({"module": "misbehave", "payloads": [{"action": "echo"}, {"action": "echo"}], "after": [reduce]}),
    )
    .await;
    let sweep = submit_job(
        &grid,
        json!({"module": "misbehave", "after": [reduce],
               "sweep": {"base": {"action": "echo"}, "params": {"value": {"from": 1, "to": 5}}}}),
    )
    .await;
    for (job, tasks) in [(&explicit, 2), (&sweep, 5)] {
        let (_, view) = grid.call("GET", &format!("/v1/jobs/{job}"), None).await;
        assert_eq!(
            (
                view["state"].clone(),
                view["counts"]["Waiting"].clone(),
                view["counts"]["Pending"].clone()
            ),
            (json!("Waiting"), json!(tasks), json!(0)),
            "{view}"
        );
    }

    grid.start_workers(2);
    for job in [&explicit, &sweep] {
        let done = grid.wait_job(job).await;
        assert_eq!(
            (done["state"].clone(), done["counts"]["Completed"].clone()),
            (json!("Finished"), json!(if job == &sweep { 5 } else { 2 })),
            "{done}"
        );
    }
    let reduced = task(&grid, &reduce).await;
    for index in 0..4 {
        let part = task(&grid, &format!("{first}.{index}")).await;
        assert!(
            at(&reduced, "Running") >= at(&part, "Completed"),
            "{part} {reduced}"
        );
    }
    for id in [format!("{explicit}.0"), format!("{sweep}.4")] {
        assert!(at(&task(&grid, &id).await, "Running") >= at(&reduced, "Completed"));
    }
    grid.stop().await;
}

#[tokio::test]
async fn bad_dependencies_are_refused_with_a_clear_error() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::NOOP, "noop").await;
    let cases = [
        (
            "/v1/tasks",
            json!({"module": "noop", "after": ["t-nosuchtask"]}),
            "unknown_dependency",
            "t-nosuchtask",
        ),
        (
            "/v1/jobs",
            json!({"module": "noop", "payloads": [1], "after": ["j-000000000000"]}),
            "unknown_dependency",
            "j-000000000000",
        ),
        (
            "/v1/tasks",
            json!({"module": "noop", "on_failure": "run"}),
            "invalid_field",
            "only with after",
        ),
        (
            "/v1/tasks",
            json!({"module": "noop", "after": ["a b"]}),
            "invalid_field",
            "not a task or job id",
        ),
        (
            "/v1/tasks?wait=1s",
            json!({"module": "noop", "after": ["t-x"]}),
            "invalid_field",
            "not with ?wait",
        ),
    ];
    for (path, body, code, mention) in cases {
        let (status, answer) = grid.call("POST", path, Some(body.clone())).await;
        assert_eq!(
            (status, answer["error"]["code"].as_str()),
            (400, Some(code)),
            "{body} -> {answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(mention),
            "{message:?} should mention {mention:?}"
        );
    }
    let id = submit(&grid, json!({"module": "noop"})).await;
    let (status, answer) = grid
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "noop", "after": [id], "on_failure": "maybe"})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("invalid_field")),
        "{answer}"
    );
}

/// A chain of three tasks on a real `kwq serve`, SIGKILLed while the first
/// runs and started again: every link runs once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_survives_its_host_killed_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let address = crate::workers::free_address();
    let serve = || {
        Server::start_listening(
            dir.path(),
            &address,
            &[],
            &[],
            std::process::Stdio::inherit(),
            2,
            "warn",
        )
    };
    let first_host = serve();
    let http = reqwest::Client::new();
    let url = first_host.url.clone();
    let mut ids: Vec<String> = Vec::new();
    for link in 0..3 {
        let mut body = json!({"module": "misbehave", "payload": {"action": "sleep", "ms": if link == 0 { 1500 } else { 10 }}});
        if let Some(previous) = ids.last() {
            body["after"] = json!([previous]);
        }
        let created = post(&http, format!("{url}/v1/tasks"), body).await;
        ids.push(created["id"].as_str().unwrap().to_string());
    }
    // Kill it once the first link runs (its Running event is durable).
    until_state(&http, &url, &ids[0], "Running").await;
    assert_eq!(
        get(&http, format!("{url}/v1/tasks/{}", ids[2])).await["state"],
        "Waiting"
    );
    first_host.kill();

    let second_host = serve();
    let url = second_host.url.clone();
    until_state(&http, &url, &ids[2], "Completed").await;
    let mut previous_end = 0;
    for id in &ids {
        let record = get(&http, format!("{url}/v1/tasks/{id}")).await;
        let completions = record["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["state"] == "Completed")
            .count();
        assert_eq!(
            (record["state"].as_str(), completions),
            (Some("Completed"), 1),
            "{record}"
        );
        assert!(at(&record, "Running") >= previous_end, "{record}");
        previous_end = at(&record, "Completed");
    }
}

/// Wait until `task` on the host at `url` is in `state`, looking again at
/// each event the host streams (not on a clock).
async fn until_state(http: &reqwest::Client, url: &str, task: &str, state: &str) {
    let mut events = http.get(format!("{url}/v1/events")).send().await.unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let record = get(http, format!("{url}/v1/tasks/{task}")).await;
        if record["state"] == state {
            return;
        }
        match tokio::time::timeout_at(deadline, events.chunk()).await {
            Ok(Ok(Some(_))) => {}
            other => panic!("{task} never {state} ({other:?}): {record}"),
        }
    }
}

/// A store whose waiter missed its release (its dependency Completed in a
/// write that did not settle it: a store edited by hand, or written by an
/// older `kwq`) has it released when the host starts.
#[tokio::test]
async fn start_up_releases_a_waiter_whose_dependency_already_completed() {
    use kwq::model::{ModuleId, NewTask, TaskOptions};
    use kwq::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
    use kwq::queue::{ReadStore, WorkQueue, WorkerView};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kwq.db");
    let task = |id: &str, after: Vec<String>| NewTask {
        id: id.into(),
        job_id: None,
        module: ModuleId::of(b"m"),
        payload: b"{}".to_vec(),
        options: TaskOptions {
            after,
            ..TaskOptions::default()
        },
    };
    {
        let queue = EmbeddedQueue::open(&path, EmbeddedConfig::default()).unwrap();
        queue
            .submit_tasks(vec![task("t-first", Vec::new())])
            .await
            .unwrap();
        queue
            .submit_tasks(vec![task("t-waiter", vec!["t-first".into()])])
            .await
            .unwrap();
        queue.flush().await.unwrap();
        queue.close();
    }
    let store = rusqlite::Connection::open(&path).unwrap();
    store
        .execute(
            "UPDATE tasks SET state = 'Completed' WHERE id = 't-first'",
            [],
        )
        .unwrap();
    drop(store);

    let queue = EmbeddedQueue::open(&path, EmbeddedConfig::default()).unwrap();
    let worker = WorkerView {
        id: "w".into(),
        warm: Vec::new(),
        pool: None,
    };
    let lease = tokio::time::timeout(std::time::Duration::from_secs(10), queue.lease(&worker))
        .await
        .expect("the released waiter is offered")
        .unwrap();
    assert_eq!(lease.task_id, "t-waiter");
    assert_eq!(
        &*lease.payload, b"{}",
        "its payload read back from the store"
    );
    queue.flush().await.unwrap();
    let waiter = queue.task(&"t-waiter".to_string()).await.unwrap();
    assert_ne!(waiter.state, kwq::model::TaskState::Waiting, "{waiter:?}");
    assert!(
        waiter
            .timestamps
            .contains_key(&kwq::model::TaskState::Pending),
        "{waiter:?}"
    );
}
