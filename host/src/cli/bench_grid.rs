//! `kwq bench grid`: a host on a temporary embedded store, driven over
//! HTTP on 127.0.0.1 like a real client would.

use super::CliError;
use super::local_grid::{LocalGrid, count_events, failed, submit_noop_jobs};
use crate::model::TaskState;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub(super) fn run(
    tasks: u64,
    batch: u64,
    samples: u32,
    workers: Option<usize>,
) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(bench(tasks, batch.max(1), samples, workers))
}

async fn bench(
    tasks: u64,
    batch: u64,
    samples: u32,
    workers: Option<usize>,
) -> Result<(), CliError> {
    let grid = LocalGrid::start(workers).await?;
    let (queue, tracker, client, url, worker_count) = (
        grid.queue.clone(),
        grid.tracker.clone(),
        reqwest::Client::new(),
        grid.url.clone(),
        grid.workers,
    );

    // Throughput: submit jobs of `batch` no-op tasks, wait for all completions.
    let mut events = queue.subscribe();
    let started = Instant::now();
    submit_noop_jobs(&client, &url, tasks, batch).await?;
    let submit_time = started.elapsed();
    let completed = || tracker.overview([0; 10]).counts.get(TaskState::Completed);
    count_events(
        &mut events,
        tasks,
        Duration::from_secs(60),
        |e| e.state == TaskState::Completed,
        completed,
    )
    .await?;
    let total = started.elapsed();

    // Latency on an idle server: one task at a time, from just before the
    // HTTP submit to the moment the guest's code starts (the task reads the
    // wall clock first thing; same machine, same clock).
    let mut latencies = Vec::with_capacity(samples as usize);
    for _ in 0..samples {
        let mut events = queue.subscribe();
        let sent_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(failed)?
            .as_micros() as u64;
        let created: Value = client
            .post(format!("{url}/v1/tasks"))
            .json(&json!({"module": "misbehave", "payload": {"action": "clock"}}))
            .send()
            .await
            .map_err(failed)?
            .json()
            .await
            .map_err(failed)?;
        let id = created["id"]
            .as_str()
            .ok_or_else(|| failed(format!("submit failed: {created}")))?
            .to_string();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
                .await
                .map_err(|_| failed(format!("task {id} did not finish within 10 s")))?
                .map_err(failed)?;
            if event.task_id == id && event.state.is_terminal() {
                break;
            }
        }
        let task = queue.task(&id).await.map_err(failed)?;
        let result: Value =
            serde_json::from_slice(task.result.as_deref().unwrap_or_default()).map_err(failed)?;
        let started_us = result["started_us"]
            .as_u64()
            .ok_or_else(|| failed(format!("no start time in {result}")))?;
        latencies.push(Duration::from_micros(started_us.saturating_sub(sent_us)));
    }
    latencies.sort();
    let pick = |q: f64| latencies[((latencies.len().max(1) - 1) as f64 * q).round() as usize];

    grid.stop().await;

    println!(
        "KWQ grid benchmark: embedded SQLite store (WAL, synchronous=FULL), HTTP on 127.0.0.1, {worker_count} workers ({})",
        super::bench::machine()
    );
    println!("{:<52} {:>14}", "measurement", "value");
    println!(
        "{:<52} {:>14.0}",
        format!("no-op tasks end to end, {tasks} tasks (tasks/s)"),
        tasks as f64 / total.as_secs_f64()
    );
    println!(
        "{:<52} {:>14.0}",
        "  of which submission alone (tasks/s)",
        tasks as f64 / submit_time.as_secs_f64()
    );
    if !latencies.is_empty() {
        println!(
            "{:<52} {:>11.3} ms",
            format!("submit-to-start latency p50 ({samples} samples, idle)"),
            pick(0.5).as_secs_f64() * 1e3
        );
        println!(
            "{:<52} {:>11.3} ms",
            "submit-to-start latency p99",
            pick(0.99).as_secs_f64() * 1e3
        );
    }
    Ok(())
}
