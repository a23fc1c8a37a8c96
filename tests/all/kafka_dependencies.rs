//! Dependencies on a Kafka grid (librdkafka's mock cluster, hosts in this
//! process): a waiter submitted on one host is released by a completion on
//! another; a failed dependency cancels its waiters down the chain unless
//! they run anyway; jobs wait, and are waited for, as a whole; a waiting
//! task runs at the priority it was given while it waited; fan-in is
//! refused with `unsupported`. The SIGKILL of the host holding a waiter is
//! tested with real processes on tansu (`kafka_grid`).

use crate::conformance::MockKafka;
use crate::support::TestGrid;
use kwq::examples;
use kwq::queue::kafka::Role;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn submit(grid: &TestGrid, path: &str, body: Value) -> String {
    let (status, created) = grid.call("POST", path, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

async fn get(grid: &TestGrid, path: &str) -> Value {
    let (status, body) = grid.call("GET", path, None).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Wait until `grid`'s view knows `path` (a task or job made on another host).
async fn known(grid: &TestGrid, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = grid.call("GET", path, None).await;
        if status == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "{path} never reached: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn at(task: &Value, state: &str) -> u64 {
    task["timestamps"][state]
        .as_u64()
        .unwrap_or_else(|| panic!("no {state} time in {task}"))
}

/// Two hosts of one grid, each with a view and the API.
async fn two_hosts(kafka: &MockKafka) -> (TestGrid, TestGrid) {
    let a = kafka.host_in_role("a", Role::All).await;
    let b = kafka.host_in_role("b", Role::All).await;
    (
        TestGrid::on_queue(Arc::new(a)).await,
        TestGrid::on_queue(Arc::new(b)).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_one_host_is_released_by_a_completion_on_another() {
    let kafka = MockKafka::with_buffer(100);
    let (mut a, mut b) = two_hosts(&kafka).await;
    a.upload(examples::MISBEHAVE, "misbehave").await;
    let first = submit(
        &a,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "sleep", "ms": 50}}),
    )
    .await;
    known(&b, &format!("/v1/tasks/{first}")).await;
    known(&b, "/v1/modules/misbehave").await;
    let second = submit(
        &b,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "echo", "value": 2}, "after": [first]}),
    )
    .await;
    // No workers yet: Waiting, on the host it was submitted to and on the other.
    assert_eq!(
        get(&b, &format!("/v1/tasks/{second}")).await["state"],
        "Waiting"
    );
    known(&a, &format!("/v1/tasks/{second}")).await;
    let stats = get(&a, "/v1/stats").await;
    assert_eq!(
        (
            stats["counts"]["Waiting"].clone(),
            stats["counts"]["Pending"].clone()
        ),
        (json!(1), json!(1)),
        "{stats}"
    );

    a.start_workers(2);
    b.start_workers(2);
    let done = a.wait_task(&second).await;
    assert_eq!(
        (done["state"].clone(), done["result"].clone()),
        (json!("Completed"), json!(2)),
        "{done}"
    );
    let before = get(&a, &format!("/v1/tasks/{first}")).await;
    assert!(
        at(&done, "Running") >= at(&before, "Completed"),
        "{before} {done}"
    );
    let states: Vec<&str> = done["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states[..2], ["Waiting", "Pending"], "{done}");

    // Two dependencies, one of them already complete: released once the
    // slow one completes.
    let slow = submit(
        &b,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "sleep", "ms": 300}}),
    )
    .await;
    let both = submit(
        &b,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "echo", "value": 3}, "after": [first, slow]}),
    )
    .await;
    let both = b.wait_task(&both).await;
    assert_eq!(
        (both["state"].clone(), both["result"].clone()),
        (json!("Completed"), json!(3)),
        "{both}"
    );
    let slow = b.wait_task(&slow).await;
    assert!(at(&both, "Pending") >= at(&slow, "Completed"), "{both}");

    // Fan-in is not offered on Kafka: a clear 400, not a task that never runs.
    let (status, answer) = a
        .call(
            "POST",
            "/v1/tasks",
            Some(json!({"module": "misbehave", "input": {"results_of": "j-any"}})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (400, Some("unsupported")),
        "{answer}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dependency_cancels_its_waiters_down_the_chain_on_kafka() {
    let kafka = MockKafka::with_buffer(100);
    let host = kafka.host_in_role("a", Role::All).await;
    let (sweep, reason) = crate::dependencies::failed_dependencies_cancel_down_the_chain(
        TestGrid::on_queue(Arc::new(host)).await,
    )
    .await;
    // A host that joins later builds its view from the topics (it reads
    // the controls before the job's announcement, or after): the job is
    // cancelled there too, and says why.
    let late = kafka.host_in_role("late", Role::All).await;
    let late = TestGrid::on_queue(Arc::new(late)).await;
    known(&late, &format!("/v1/jobs/{sweep}")).await;
    let job = crate::dependencies::until_job_cancelled(&late, &sweep).await;
    assert_eq!(job["cancel_reason"], json!(reason), "{job}");
    late.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_wait_and_are_waited_for_as_a_whole_on_kafka() {
    let kafka = MockKafka::with_buffer(100);
    let (mut a, mut b) = two_hosts(&kafka).await;
    a.upload(examples::MISBEHAVE, "misbehave").await;
    let sleeps: Vec<Value> = (0..4)
        .map(|_| json!({"action": "sleep", "ms": 30}))
        .collect();
    let first = submit(
        &a,
        "/v1/jobs",
        json!({"module": "misbehave", "payloads": sleeps}),
    )
    .await;
    let reduce = submit(
        &a,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "echo"}, "after": [first]}),
    )
    .await;
    let explicit = submit(
        &a,
        "/v1/jobs",
        json!({"module": "misbehave", "payloads": [{"action": "echo"}, {"action": "echo"}], "after": [reduce]}),
    )
    .await;
    let sweep = submit(
        &a,
        "/v1/jobs",
        json!({"module": "misbehave", "after": [reduce],
               "sweep": {"base": {"action": "echo"}, "params": {"value": {"from": 1, "to": 5}}}}),
    )
    .await;
    for job in [&explicit, &sweep] {
        let view = get(&a, &format!("/v1/jobs/{job}")).await;
        assert_eq!(view["state"], "Waiting", "{view}");
        assert_eq!(view["counts"]["Pending"], 0, "{view}");
    }

    a.start_workers(2);
    b.start_workers(2);
    for (job, tasks) in [(&explicit, 2), (&sweep, 5)] {
        let done = a.wait_job(job).await;
        assert_eq!(
            (done["state"].clone(), done["counts"]["Completed"].clone()),
            (json!("Finished"), json!(tasks)),
            "{done}"
        );
    }
    let reduced = get(&a, &format!("/v1/tasks/{reduce}")).await;
    for index in 0..4 {
        let part = get(&a, &format!("/v1/tasks/{first}.{index}")).await;
        assert!(
            at(&reduced, "Running") >= at(&part, "Completed"),
            "{part} {reduced}"
        );
    }
    for id in [format!("{explicit}.0"), format!("{sweep}.4")] {
        let task = get(&a, &format!("/v1/tasks/{id}")).await;
        assert!(at(&task, "Running") >= at(&reduced, "Completed"), "{task}");
    }
    // A job whose dependency failed is cancelled whole, never run.
    let failing = submit(
        &a,
        "/v1/tasks",
        json!({"module": "misbehave", "max_attempts": 1, "payload": {"action": "fail", "message": "no"}}),
    )
    .await;
    let never = submit(
        &a,
        "/v1/jobs",
        json!({"module": "misbehave", "after": [failing],
               "sweep": {"base": {"action": "echo"}, "params": {"value": {"from": 1, "to": 3}}}}),
    )
    .await;
    let cancelled = crate::dependencies::until_job_cancelled(&a, &never).await;
    assert_eq!(cancelled["cancelled"], true, "{cancelled}");
    assert_eq!(
        cancelled["cancel_reason"],
        json!(format!("dependency_failed: {failing}")),
        "{cancelled}"
    );
    assert_eq!(cancelled["counts"]["Completed"], 0, "{cancelled}");
    a.stop().await;
    b.stop().await;
}

/// A waiting task whose priority a user changes takes it when released:
/// it is read into the scheduler at the new priority and runs before a
/// task of the priority it had. (Both wait on a task cancelled with
/// `"on_failure": "run"`, so no worker runs until they are both ready.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_task_released_on_kafka_runs_at_the_priority_it_was_given_meanwhile() {
    let kafka = MockKafka::with_buffer(100);
    let mut host = TestGrid::on_queue(Arc::new(kafka.host_in_role("a", Role::All).await)).await;
    host.upload(examples::MISBEHAVE, "misbehave").await;
    let blocker = submit(
        &host,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "echo", "value": 0}}),
    )
    .await;
    let waiter = |value: u64, priority: u8| {
        json!({"module": "misbehave", "payload": {"action": "echo", "value": value},
               "priority": priority, "after": [blocker], "on_failure": "run"})
    };
    let kept = submit(&host, "/v1/tasks", waiter(5, 5)).await;
    let raised = submit(&host, "/v1/tasks", waiter(3, 3)).await;
    let (status, answer) = host
        .call(
            "POST",
            &format!("/v1/tasks/{raised}/priority"),
            Some(json!({"priority": 9})),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = host
        .call("POST", &format!("/v1/tasks/{blocker}/cancel"), None)
        .await;
    assert_eq!(status, 200, "{answer}");
    // Released and read back: one ready at 9, one at 5, none at 3.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = get(&host, "/v1/stats").await;
        let depth = &stats["depth"];
        if depth[9] == json!(1) && depth[5] == json!(1) {
            assert_eq!(depth[3], json!(0), "{stats}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the released tasks never stood at 9 and 5: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.start_workers(1);
    let raised = host.wait_task(&raised).await;
    let kept = host.wait_task(&kept).await;
    assert_eq!(
        (
            raised["result"].clone(),
            raised["options"]["priority"].clone()
        ),
        (json!(3), json!(9)),
        "{raised}"
    );
    assert!(
        at(&raised, "Running") <= at(&kept, "Running"),
        "{raised} {kept}"
    );
    host.stop().await;
}
