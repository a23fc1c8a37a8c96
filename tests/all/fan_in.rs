//! Fan-in (`"input": {"results_of": JOB}`) on the embedded store: a task
//! waits for a job, then reads the job's results a page at a time while it
//! runs, in task order: a component through `kwq:task/inputs` (WIT 0.2.0),
//! a WASI command as NDJSON on stdin. Modules built against 0.1.0 still
//! run, and bad requests are 400s.

use crate::support::TestGrid;
use kwq::api::ApiLimits;
use kwq::examples;
use serde_json::{Value, json};

async fn post(grid: &TestGrid, path: &str, body: Value) -> String {
    let (status, created) = grid.call("POST", path, Some(body)).await;
    assert_eq!(status, 201, "{created}");
    created["id"].as_str().unwrap().to_string()
}

/// A job of `n` misbehave tasks each echoing the estimate of one pricing
/// run (`price` i, so order shows), and the same estimates in task order.
async fn estimates_job(grid: &TestGrid, n: usize) -> (String, Vec<Value>) {
    let estimates: Vec<Value> = (0..n)
        .map(|i| json!({"price": i as f64 / 10.0, "std_error": 0.5 + (i % 7) as f64 / 10.0, "paths": 1000 + i}))
        .collect();
    let payloads: Vec<Value> = estimates
        .iter()
        .map(|e| json!({"action": "echo", "value": e}))
        .collect();
    let job = post(
        grid,
        "/v1/jobs",
        json!({"module": "misbehave", "payloads": payloads}),
    )
    .await;
    (job, estimates)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_reduces_a_jobs_results_read_page_by_page_in_task_order() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    grid.upload(examples::MC_REDUCE, "mc-reduce").await;
    // More results than one page of the SDK (512) and of one call (4096 max).
    let (job, estimates) = estimates_job(&grid, 5000).await;
    let streamed = post(
        &grid,
        "/v1/tasks",
        json!({"module": "mc-reduce", "input": {"results_of": job}}),
    )
    .await;
    let (_, waiting) = grid
        .call("GET", &format!("/v1/tasks/{streamed}"), None)
        .await;
    assert_eq!(waiting["options"]["after"], json!([job]), "{waiting}");
    assert_eq!(waiting["options"]["results_of"], json!(job), "{waiting}");
    grid.start_workers(2);
    let streamed = grid.wait_task(&streamed).await;
    assert_eq!(streamed["state"], "Completed", "{streamed}");
    // The same estimates handed over as one payload, in task order: the
    // pooled figures agree to the bit only if every result came, once, in
    // that order (the pooling is a running sum).
    let whole = post(
        &grid,
        "/v1/tasks",
        json!({"module": "mc-reduce", "payload": estimates}),
    )
    .await;
    let whole = grid.wait_task(&whole).await;
    assert_eq!(whole["state"], "Completed", "{whole}");
    assert_eq!(streamed["result"]["runs"], 5000, "{streamed}");
    assert_eq!(streamed["result"], whole["result"]);
    let reversed: Vec<Value> = estimates.iter().rev().cloned().collect();
    let other_order = post(
        &grid,
        "/v1/tasks",
        json!({"module": "mc-reduce", "payload": reversed}),
    )
    .await;
    let other_order = grid.wait_task(&other_order).await;
    assert_ne!(
        other_order["result"]["price"], streamed["result"]["price"],
        "the check above would not see a wrong order"
    );
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasi_command_reads_the_results_as_ndjson_on_stdin() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    grid.upload(examples::WASI_P1_UPPER, "upper").await;
    let payloads: Vec<Value> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|word| json!({"action": "echo", "value": word}))
        .collect();
    let job = post(
        &grid,
        "/v1/jobs",
        json!({"module": "misbehave", "payloads": payloads}),
    )
    .await;
    let upper = post(
        &grid,
        "/v1/tasks",
        json!({"module": "upper", "input": {"results_of": job}}),
    )
    .await;
    grid.start_workers(2);
    let upper = grid.wait_task(&upper).await;
    assert_eq!(upper["state"], "Completed", "{upper}");
    // Stdin held the lines `GET /v1/jobs/{id}/results` serves, in task order.
    let (_, served) = grid
        .call("GET", &format!("/v1/jobs/{job}/results"), None)
        .await;
    let served = served.as_str().unwrap().to_string();
    assert_eq!(served.lines().count(), 3, "{served}");
    let expected = served.to_uppercase();
    let order: Vec<usize> = ["ALPHA", "BETA", "GAMMA"]
        .iter()
        .map(|w| expected.find(&format!("\"RESULT\":\"{w}\"")).unwrap())
        .collect();
    assert!(order.is_sorted(), "{expected}");
    // The command's stdout is its result (not JSON: several lines).
    let result = upper["result_base64"]
        .as_str()
        .map(|b| {
            use base64::Engine;
            String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b).unwrap()).unwrap()
        })
        .unwrap_or_else(|| panic!("no result bytes in {upper}"));
    assert_eq!(result, expected);
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_built_against_the_first_contract_still_runs() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::LEGACY_V01, "legacy").await;
    grid.start_workers(1);
    let task = post(
        &grid,
        "/v1/tasks",
        json!({"module": "legacy", "payload": {"x": [1, 2]}}),
    )
    .await;
    let done = grid.wait_task(&task).await;
    assert_eq!(
        (done["state"].clone(), done["result"].clone()),
        (json!("Completed"), json!({"x": [1, 2]})),
        "{done}"
    );
    let logged = done["logs"][0]["message"].as_str().unwrap_or("");
    assert_eq!(logged, format!("0.1.0 module running {task}"), "{done}");
    grid.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_fan_in_requests_are_400s_naming_the_problem() {
    let grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    grid.upload(examples::MC_REDUCE, "mc-reduce").await;
    let job = post(
        &grid,
        "/v1/jobs",
        json!({"module": "misbehave", "payloads": [{"action": "echo"}]}),
    )
    .await;
    let task = post(
        &grid,
        "/v1/tasks",
        json!({"module": "misbehave", "payload": {"action": "echo"}}),
    )
    .await;
    let cases = [
        (
            "/v1/tasks",
            json!({"module": "mc-reduce", "input": {"results_of": "j-nosuch"}}),
            "unknown_dependency",
            "j-nosuch",
        ),
        (
            "/v1/tasks",
            json!({"module": "mc-reduce", "input": {"results_of": task}}),
            "unknown_dependency",
            "results_of names a job",
        ),
        (
            "/v1/tasks",
            json!({"module": "mc-reduce", "input": {"results_of": job}, "payload": [1]}),
            "invalid_field",
            "give no payload",
        ),
        (
            "/v1/tasks?wait=1s",
            json!({"module": "mc-reduce", "input": {"results_of": job}}),
            "invalid_field",
            "not with ?wait",
        ),
        (
            "/v1/tasks",
            json!({"module": "mc-reduce", "input": {"results_of": "has space"}}),
            "invalid_field",
            "is not a job id",
        ),
        (
            "/v1/tasks",
            json!({"module": "mc-reduce", "input": {"results_of": job, "extra": 1}}),
            "invalid_field",
            "input.extra: unknown field",
        ),
        (
            "/v1/jobs",
            json!({"module": "mc-reduce", "payloads": [1], "input": {"results_of": job}}),
            "invalid_field",
            "input",
        ),
    ];
    for (path, body, code, words) in cases {
        let (status, answer) = grid.call("POST", path, Some(body.clone())).await;
        assert_eq!(status, 400, "{body} -> {answer}");
        assert_eq!(answer["error"]["code"], code, "{body} -> {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or("");
        assert!(message.contains(words), "{body} -> {answer}");
    }
    grid.stop().await;
}
