//! `kwq bench invoke`: synchronous invocation on an idle embedded host,
//! as a FaaS caller sees it: one client sends `POST /v1/tasks?wait=10s`
//! for a no-op task, one after the other, and times each answer (the
//! finished task with its result, after the task and its result are
//! durable). Printed, never asserted.

use super::CliError;
use super::local_grid::{LocalGrid, failed};
use crate::queue::embedded::{Durability, EmbeddedConfig};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

pub(super) fn run(
    samples: u32,
    workers: Option<usize>,
    durability: Durability,
) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(bench(samples, workers, durability))
}

async fn bench(
    samples: u32,
    workers: Option<usize>,
    durability: Durability,
) -> Result<(), CliError> {
    let queue = EmbeddedConfig {
        durability,
        ..EmbeddedConfig::default()
    };
    let grid = LocalGrid::start_tuned(workers, None, queue).await?;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .map_err(failed)?;
    let url = format!("{}/v1/tasks?wait=10s", grid.url);
    let body = json!({"module": "noop", "payload": null});
    let invoke = || async {
        let started = Instant::now();
        let response = client.post(&url).json(&body).send().await.map_err(failed)?;
        let status = response.status();
        let answer: Value = response.json().await.map_err(failed)?;
        if status != 200 || answer["state"] != "Completed" {
            return Err(failed(format!(
                "invocation not completed ({status}): {answer}"
            )));
        }
        Ok::<Duration, CliError>(started.elapsed())
    };
    // Warm the connection, the module and the store's pages first.
    for _ in 0..200.min(samples) {
        invoke().await?;
    }
    let mut latencies = Vec::with_capacity(samples as usize);
    let started = Instant::now();
    for _ in 0..samples {
        latencies.push(invoke().await?);
    }
    let total = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "kwq bench invoke: {samples} sequential POST /v1/tasks?wait=10s of a no-op task, one client, {} workers, embedded store",
        grid.workers
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!("| p50 | {:.3} ms |", ms(at(0.50)));
    println!("| p90 | {:.3} ms |", ms(at(0.90)));
    println!("| p99 | {:.3} ms |", ms(at(0.99)));
    println!(
        "| max | {:.3} ms |",
        ms(*latencies.last().unwrap_or(&Duration::ZERO))
    );
    println!(
        "| invocations/s (one caller) | {:.0} |",
        samples as f64 / total.as_secs_f64()
    );
    grid.stop().await;
    Ok(())
}
