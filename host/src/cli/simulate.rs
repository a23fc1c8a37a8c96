//! `kwq simulate`: size a grid. Submits a synthetic job of sleep tasks to a
//! local grid with W workers and reports throughput, efficiency and latency
//! (the original KWQ's simulate endpoint, as a command).

use super::CliError;
use super::local_grid::{LocalGrid, count_events, failed, post_job};
use crate::model::TaskState;
use crate::queue::TaskFilter;
use serde_json::json;
use std::time::{Duration, Instant};

/// Run `kwq simulate`.
pub(super) fn run(tasks: u64, duration_ms: u64, workers: usize) -> Result<(), CliError> {
    if tasks == 0 || workers == 0 {
        return Err(CliError::usage("--tasks and --workers must be at least 1"));
    }
    super::tokio_runtime()?.block_on(simulate(tasks, duration_ms, workers))
}

async fn simulate(tasks: u64, duration_ms: u64, workers: usize) -> Result<(), CliError> {
    let grid = LocalGrid::start(Some(workers)).await?;
    let client = reqwest::Client::new();
    let mut events = grid.queue.subscribe();
    let started = Instant::now();
    let sweep = json!({"base": {"action": "sleep", "ms": duration_ms}, "params": {"n": {"from": 1, "to": tasks}}});
    let id = post_job(
        &client,
        &grid.url,
        &json!({"module": "misbehave", "sweep": sweep, "name": "simulation"}),
    )
    .await?;
    let in_job =
        |e: &crate::model::Event| e.job_id.as_deref() == Some(id.as_str()) && e.state.is_terminal();
    count_events(&mut events, tasks, Duration::from_secs(600), in_job, || {
        grid.tracker.job(&id).counts.finished()
    })
    .await?;
    let wall = started.elapsed();

    let (mut waits, mut runs) = (Vec::new(), Vec::new());
    let mut after = None;
    loop {
        let filter = TaskFilter {
            job: Some(id.clone()),
            after,
            limit: 1000,
            ..TaskFilter::default()
        };
        let page = grid.queue.tasks(filter).await.map_err(failed)?;
        for task in &page.items {
            let at = |s: TaskState| task.timestamps.get(&s).copied();
            if let (Some(p), Some(a), Some(r), Some(c)) = (
                at(TaskState::Pending),
                at(TaskState::Allocated),
                at(TaskState::Running),
                at(TaskState::Completed),
            ) {
                waits.push(a.saturating_sub(p));
                runs.push(c.saturating_sub(r));
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    grid.stop().await;

    let ideal = tasks as f64 * duration_ms as f64 / workers as f64 / 1000.0;
    println!(
        "KWQ simulation: {tasks} sleep tasks of {duration_ms} ms on {workers} workers ({})",
        super::bench::machine()
    );
    println!("{:<36} {:>12.2} s", "wall time", wall.as_secs_f64());
    println!(
        "{:<36} {:>12.2} s",
        "ideal (tasks x duration / workers)", ideal
    );
    println!(
        "{:<36} {:>11.1} %",
        "efficiency",
        100.0 * ideal / wall.as_secs_f64().max(1e-9)
    );
    println!(
        "{:<36} {:>12.0}",
        "throughput (tasks/s)",
        tasks as f64 / wall.as_secs_f64()
    );
    for (name, values) in [("queue wait", &mut waits), ("run time", &mut runs)] {
        values.sort_unstable();
        if values.is_empty() {
            continue;
        }
        let pick = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        println!(
            "{:<36} {:>9} ms p50 {:>6} ms p99",
            name,
            pick(0.5),
            pick(0.99)
        );
    }
    Ok(())
}
