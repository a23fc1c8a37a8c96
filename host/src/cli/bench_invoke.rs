//! `kwq bench invoke`: synchronous invocation on an idle embedded host,
//! as a FaaS caller sees it: one client sends `POST /v1/tasks?wait=10s`
//! for a no-op task, one after the other, and times each answer (the
//! finished task with its result, after the task and its result are
//! durable), then the same with `"durable": false` (answered before
//! the write is durable). The caller runs on a thread of its own, as a
//! client process would. Printed, never asserted.

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
    let url = format!("{}/v1/tasks?wait=10s", grid.url);
    let durable = caller(&url, json!({"module": "noop", "payload": null}), samples).await?;
    let in_memory = caller(
        &url,
        json!({"module": "noop", "payload": null, "durable": false}),
        samples,
    )
    .await?;
    let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
    println!(
        "kwq bench invoke: {samples} sequential POST /v1/tasks?wait=10s of a no-op task, one client, {} workers, embedded store (--durability {})",
        grid.workers,
        match durability {
            Durability::Power => "power",
            Durability::Process => "process",
        }
    );
    println!("| figure | durable (default) | \"durable\": false |");
    println!("|---|---|---|");
    for (figure, q) in [("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("max", 1.0)] {
        println!(
            "| {figure} | {} | {} |",
            ms(durable.at(q)),
            ms(in_memory.at(q))
        );
    }
    println!(
        "| invocations/s (one caller) | {:.0} | {:.0} |",
        durable.rate(),
        in_memory.rate()
    );
    grid.stop().await;
    Ok(())
}

/// Latencies of one series of invocations, sorted.
struct Series {
    latencies: Vec<Duration>,
    total: Duration,
}

impl Series {
    fn at(&self, q: f64) -> Duration {
        let last = self.latencies.len().saturating_sub(1);
        self.latencies
            .get(((self.latencies.len() as f64 * q) as usize).min(last))
            .copied()
            .unwrap_or_default()
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.total.as_secs_f64().max(1e-9)
    }
}

/// `samples` invocations of `body` from a caller of its own: one thread
/// with its own event loop and connection, as a separate client process
/// would be, so that the caller's socket work does not run on (and wake)
/// the host's worker threads, as it did when it shared their runtime.
async fn caller(url: &str, body: Value, samples: u32) -> Result<Series, CliError> {
    let url = url.to_string();
    let calls = std::thread::Builder::new()
        .name("kwq-bench-caller".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(failed)?;
            runtime.block_on(async {
                let client = reqwest::Client::builder()
                    .tcp_nodelay(true)
                    .build()
                    .map_err(failed)?;
                sample(&client, &url, body, samples).await
            })
        })
        .map_err(failed)?;
    tokio::task::spawn_blocking(move || calls.join())
        .await
        .map_err(failed)?
        .map_err(|_| failed("the calling thread panicked"))?
}

/// `samples` invocations of `body`, one after the other, after a warm-up
/// (the connection, the module and the store's pages).
async fn sample(
    client: &reqwest::Client,
    url: &str,
    body: Value,
    samples: u32,
) -> Result<Series, CliError> {
    let invoke = || async {
        let started = Instant::now();
        let response = client.post(url).json(&body).send().await.map_err(failed)?;
        let status = response.status();
        let answer: Value = response.json().await.map_err(failed)?;
        if status != 200 || answer["state"] != "Completed" {
            return Err(failed(format!(
                "invocation not completed ({status}): {answer}"
            )));
        }
        Ok::<Duration, CliError>(started.elapsed())
    };
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
    Ok(Series { latencies, total })
}
