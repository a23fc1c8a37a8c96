//! Big jobs on one host: a large sweep runs in flat memory with the store
//! never far behind, a cancel leaves every point counted once, a SIGKILL
//! mid-sweep loses no point and runs none twice into the results, and
//! finished jobs can be deleted.

use crate::process::{Server, echo_job_completed_once, get, post, wait_for};
use crate::support::TestGrid;
use kwq::api::ApiLimits;
use serde_json::{Value, json};
use std::process::Command;

/// `kwq bench sweep` on a 2,000,000-point no-op sweep for 32 s, then a
/// cancel (the README's figure is the same benchmark at 50,000,000 points).
#[test]
fn a_large_sweep_runs_in_flat_memory_and_its_counts_add_up_after_a_cancel() {
    const POINTS: u64 = 2_000_000;
    let output = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["bench", "sweep", "--points", &POINTS.to_string()])
        .args([
            "--seconds",
            "32",
            "--every",
            "4",
            "--workers",
            "2",
            "--json",
        ])
        .env("KWQ_LOG", "warn")
        .output()
        .expect("run kwq bench sweep");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary: Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no JSON summary in {stdout}"));
    let count = |name: &str| summary[name].as_u64().unwrap();
    // Every point exactly once: completed, or cancelled (most of them never
    // created: counted, not written), none left running or waiting.
    assert_eq!(summary["finished_once"], json!(true), "{stdout}");
    assert_eq!(
        count("completed") + count("cancelled") + count("dead"),
        POINTS
    );
    assert!(count("completed") > 10_000, "{stdout}");
    assert!(count("cancelled") > POINTS / 2, "{stdout}");
    // Flat memory. The writer's page cache fills to its fixed bound as
    // pages are touched, and every page of this run's store went through
    // it, so once the store is bigger than that bound the cache is full:
    // from the first sample past it, RSS grows by less than 32 MiB however
    // many tasks finish (about 80,000 finish after it here). Before it,
    // RSS grows by at most the cache and 64 MiB of warm-up.
    let samples = |name: &str| -> Vec<u64> {
        summary[name]
            .as_array()
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    let (rss, store) = (samples("rss_samples"), samples("store_bytes_samples"));
    let cache = kwq::queue::embedded::WRITER_CACHE_BYTES;
    let full = store
        .iter()
        .position(|&bytes| bytes >= cache)
        .unwrap_or_else(|| panic!("the store never passed the writer's cache: {stdout}"));
    assert!(
        rss.len() >= full + 3,
        "too few samples after the cache filled: {stdout}"
    );
    let growth = rss[full..].iter().max().unwrap() - rss[full];
    assert!(growth < 32 << 20, "RSS grew {} MiB: {stdout}", growth >> 20);
    let warm_up = rss.iter().max().unwrap() - rss[0];
    assert!(
        warm_up < cache + (64 << 20),
        "RSS grew {} MiB: {stdout}",
        warm_up >> 20
    );
    // Back-pressure: the store is never more than the bounded window behind
    // (a few operations over it: what the leased workers report meanwhile).
    for ops in summary["undurable_ops"].as_array().unwrap() {
        assert!(
            ops.as_u64().unwrap() as usize <= kwq::queue::embedded::MAX_BACKLOG_OPS + 64,
            "{stdout}"
        );
    }
}

/// A SIGKILL in the middle of a sweep: after a restart every point is
/// completed, each exactly once in the results, with its own value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_mid_sweep_loses_no_point_and_repeats_none_in_the_results() {
    const POINTS: u64 = 60_000;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let first = Server::start_serving(
        dir.path(),
        &[],
        &[],
        std::process::Stdio::inherit(),
        2,
        "warn",
    );
    let job = post(
        &client,
        format!("{}/v1/jobs", first.url),
        json!({"module": "misbehave", "sweep": {
            "base": {"action": "echo"},
            "params": {"value": {"from": 0, "to": POINTS - 1, "step": 1}}
        }}),
    )
    .await;
    let id = job["id"]
        .as_str()
        .unwrap_or_else(|| panic!("{job}"))
        .to_string();
    let before = wait_for(&client, &first, &id, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 5_000
    })
    .await;
    first.kill();
    assert!(before["finished"].as_u64().unwrap() < POINTS, "{before}");
    let second = Server::start_serving(
        dir.path(),
        &[],
        &[],
        std::process::Stdio::inherit(),
        2,
        "warn",
    );
    echo_job_completed_once(&client, &second, &id, POINTS).await;
    // A point's payload is made again from the sweep, not stored with it.
    let task = get(&client, format!("{}/v1/tasks/{id}.12345", second.url)).await;
    assert_eq!(task["payload"], json!({"action": "echo", "value": 12345}));
}

/// Finished and cancelled jobs can be deleted with their tasks, results
/// and events; a job whose tasks may still run cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_deleted_with_their_tasks_and_running_ones_are_refused() {
    let mut grid = TestGrid::new(None, ApiLimits::default()).await;
    grid.upload(kwq::examples::NOOP, "noop").await;
    grid.start_workers(2);
    let (status, done) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "payloads": [1, 2, 3], "tags": {"desk": "gone"}})),
        )
        .await;
    assert_eq!(status, 201, "{done}");
    let done_id = done["id"].as_str().unwrap().to_string();
    grid.wait_job(&done_id).await;
    let (status, held) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "sweep": {"params": {"x": [1, 2]}}, "priority": 0})),
        )
        .await;
    assert_eq!(status, 201, "{held}");
    let held_id = held["id"].as_str().unwrap().to_string();

    // A held job may still run: refused, and kept.
    let (status, body) = grid
        .call("DELETE", &format!("/v1/jobs/{held_id}"), None)
        .await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        grid.call("GET", &format!("/v1/jobs/{held_id}"), None)
            .await
            .0,
        200
    );

    // A finished job goes with its tasks (and their tag index) and results.
    let (status, body) = grid
        .call("DELETE", &format!("/v1/jobs/{done_id}"), None)
        .await;
    assert_eq!((status, &body["deleted"]), (200, &json!(true)), "{body}");
    assert_eq!(
        grid.call("GET", &format!("/v1/jobs/{done_id}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        grid.call("GET", &format!("/v1/tasks/{done_id}.0"), None)
            .await
            .0,
        404
    );
    let (_, listed) = grid.call("GET", "/v1/tasks?tag=desk=gone", None).await;
    assert_eq!(listed["items"], json!([]), "{listed}");
    let (status, _) = grid
        .call("DELETE", &format!("/v1/jobs/{done_id}"), None)
        .await;
    assert_eq!(status, 404);

    // Once cancelled, the held job can go too.
    let (status, _) = grid
        .call("POST", &format!("/v1/jobs/{held_id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    let (status, body) = grid
        .call("DELETE", &format!("/v1/jobs/{held_id}"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    grid.stop().await;
}
