//! `kwq bench fan-in`: one reduce task reading the results of a finished
//! job as its input, streamed by the host a page at a time
//! (`kwq:task/inputs.next-results`), on a host assembled like `kwq serve`
//! (temporary embedded store, HTTP on 127.0.0.1): how long the reduce
//! takes, and what it costs the host's memory (peak RSS over the reduce
//! against before it).

use super::CliError;
use super::local_grid::{LocalGrid, count_events, failed, get_json, post_job, status_bytes};
use crate::model::TaskState;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// What `kwq bench fan-in` is asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct FanInBench {
    /// Results the reduce reads: an `option-pricer` sweep of this many
    /// seeds (64 paths each) runs first.
    #[arg(long, default_value_t = 1_000_000)]
    results: u64,
}

pub(super) fn run(bench: FanInBench) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(measure(bench))
}

/// Reset this process's peak RSS (`VmHWM`) to its current RSS (Linux:
/// `clear_refs` 5), so the next peak read is the peak of what follows.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

async fn measure(bench: FanInBench) -> Result<(), CliError> {
    let n = bench.results.max(1);
    let grid = LocalGrid::start(None).await?;
    let client = reqwest::Client::new();
    let url = grid.url.clone();
    let mut events = grid.queue.subscribe();
    let started = Instant::now();
    let job = post_job(
        &client,
        &url,
        &json!({"module": "option-pricer", "sweep": {
            "base": {"spot": 100, "strike": 100, "rate": 0.05, "vol": 0.2, "maturity": 1,
                     "kind": "call", "paths": 64},
            "params": {"seed": {"from": 1, "to": n}}}}),
    )
    .await?;
    let completed = |job: &str| grid.tracker.job(job).counts.get(TaskState::Completed);
    count_events(
        &mut events,
        n,
        Duration::from_secs(60),
        |e| e.state == TaskState::Completed && e.job_id.as_deref() == Some(job.as_str()),
        || completed(&job),
    )
    .await?;
    let sweep = started.elapsed();

    let before = status_bytes("VmRSS:");
    let peak_reset = reset_peak();
    let response = client
        .post(format!("{url}/v1/tasks"))
        .json(&json!({"module": "mc-reduce", "input": {"results_of": job}}))
        .send()
        .await
        .map_err(failed)?;
    let created: Value = response.json().await.map_err(failed)?;
    let reduce = created["id"]
        .as_str()
        .ok_or_else(|| failed(format!("reduce not accepted: {created}")))?
        .to_string();
    count_events(
        &mut events,
        1,
        Duration::from_secs(600),
        |e| {
            e.task_id == reduce
                && matches!(
                    e.state,
                    TaskState::Completed | TaskState::Dead | TaskState::Cancelled
                )
        },
        || 0,
    )
    .await?;
    let peak = status_bytes("VmHWM:");
    let task = get_json(&client, format!("{url}/v1/tasks/{reduce}")).await?;
    grid.stop().await;
    if task["state"] != "Completed" {
        return Err(failed(format!("the reduce did not complete: {task}")));
    }
    let at = |state: &str| task["timestamps"][state].as_u64().unwrap_or(0);
    let reading = Duration::from_millis(at("Completed").saturating_sub(at("Running")));
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    println!(
        "kwq bench fan-in: one mc-reduce task reading a finished sweep's results through next-results"
    );
    println!("| measurement | figure |");
    println!("|---|---|");
    println!(
        "| sweep of {n} option-pricer runs (64 paths), submit to last result | {:.1} s |",
        sweep.as_secs_f64()
    );
    println!(
        "| reduce: Running to Completed, {n} results | {:.2} s ({:.0} results/s) |",
        reading.as_secs_f64(),
        n as f64 / reading.as_secs_f64().max(1e-3)
    );
    println!("| host RSS before the reduce | {:.1} MiB |", mib(before));
    if peak_reset {
        println!(
            "| host peak RSS during the reduce | {:.1} MiB ({:+.1} MiB) |",
            mib(peak),
            mib(peak) - mib(before)
        );
    }
    println!(
        "| pooled | {} ± {} over {} paths |",
        task["result"]["price"], task["result"]["std_error"], task["result"]["paths"]
    );
    Ok(())
}
