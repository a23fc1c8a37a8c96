//! `kwq bench sweep`: one very large no-op sweep on a host assembled like
//! `kwq serve` (temporary embedded store, HTTP on 127.0.0.1): how fast it
//! drains, whether memory stays flat, how far the workers run ahead of the
//! store, how fast reads answer meanwhile, how long a cancel takes, whether
//! the counts add up after it, and what each finished task costs on disk.

use super::CliError;
use super::local_grid::{LocalGrid, failed, get_json, post_job, status_bytes};
use crate::model::TaskState;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// What `kwq bench sweep` is asked to do.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepBench {
    /// Points of the sweep (each a no-op task).
    #[arg(long, default_value_t = 50_000_000)]
    points: u64,
    /// How long to let it run before cancelling it.
    #[arg(long, default_value_t = 120)]
    seconds: u64,
    /// Seconds between samples of RSS and progress.
    #[arg(long, default_value_t = 10)]
    every: u64,
    /// Workers (default: cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Also print the summary as one line of JSON (for tests).
    #[arg(long)]
    json: bool,
}

/// One sample taken while the sweep runs.
struct Sample {
    at: Duration,
    rss: u64,
    /// The store's size in pages (main file and log): once it passes the
    /// writer's page cache bound, that cache is full (every page of a store
    /// this run created went through it) and RSS must stay flat.
    store_pages_bytes: u64,
    completed: u64,
    undurable_ops: usize,
}

pub(super) fn run(bench: SweepBench) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(measure(bench))
}

/// Resident memory of this process, bytes.
fn rss_bytes() -> u64 {
    status_bytes("VmRSS:")
}

/// The store's logical size, as a reader sees it: pages times page size
/// (0 if it cannot be read).
fn store_pages_bytes(store: &rusqlite::Connection) -> u64 {
    let pragma = |name: &str| -> u64 {
        store
            .pragma_query_value(None, name, |row| row.get::<_, i64>(0))
            .map_or(0, |v| u64::try_from(v).unwrap_or(0))
    };
    pragma("page_count") * pragma("page_size")
}

/// Bytes of every file under `dir` (the store, its WAL, its shared memory).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    })
}

async fn measure(bench: SweepBench) -> Result<(), CliError> {
    let grid = LocalGrid::start(bench.workers).await?;
    let client = reqwest::Client::new();
    let url = grid.url.clone();
    let idle_rss = rss_bytes();
    let store = rusqlite::Connection::open_with_flags(
        grid.dir().join("kwq.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .map_err(failed)?;
    let accept = Instant::now();
    let id = post_job(
        &client,
        &url,
        &json!({"module": "noop", "sweep": {"params": {"i": {"from": 0, "to": bench.points - 1, "step": 1}}}}),
    )
    .await?;
    let accepted = accept.elapsed();
    let completed = || grid.tracker.job(&id).counts.get(TaskState::Completed);

    // Run for `seconds`, sampling, and timing reads as a dashboard would make them.
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut job_reads = Vec::new();
    let mut stats_reads = Vec::new();
    let mut next_sample = Duration::from_secs(bench.every.max(1));
    while started.elapsed() < Duration::from_secs(bench.seconds) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for (path, times) in [
            (format!("/v1/jobs/{id}"), &mut job_reads),
            ("/v1/stats".to_string(), &mut stats_reads),
        ] {
            let t = Instant::now();
            let response = client
                .get(format!("{url}{path}"))
                .send()
                .await
                .map_err(failed)?;
            response.bytes().await.map_err(failed)?;
            times.push(t.elapsed());
        }
        if started.elapsed() >= next_sample {
            samples.push(Sample {
                at: started.elapsed(),
                rss: rss_bytes(),
                store_pages_bytes: store_pages_bytes(&store),
                completed: completed(),
                undurable_ops: grid.queue.undurable(),
            });
            next_sample += Duration::from_secs(bench.every.max(1));
        }
    }
    let ran = started.elapsed();
    let completed_at_cancel = completed();

    let t = Instant::now();
    let response = client
        .post(format!("{url}/v1/jobs/{id}/cancel"))
        .send()
        .await
        .map_err(failed)?;
    let cancel_status = response.status();
    response.bytes().await.map_err(failed)?;
    let cancel_latency = t.elapsed();
    if !cancel_status.is_success() {
        return Err(failed(format!("cancel answered {cancel_status}")));
    }
    let after_cancel = completed();
    // Tasks already running when the cancel answered finish or stop; then
    // the counts must cover every point exactly once.
    let mut job: Value = Value::Null;
    for _ in 0..100 {
        job = get_json(&client, format!("{url}/v1/jobs/{id}")).await?;
        if job["finished"].as_u64() == Some(bench.points) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counts = job["counts"].clone();
    let count = |state: &str| counts[state].as_u64().unwrap_or(0);
    let (done, cancelled, dead) = (count("Completed"), count("Cancelled"), count("Dead"));
    let finished_once = done + cancelled + dead == bench.points
        && TaskState::ALL
            .iter()
            .filter(|s| !s.is_terminal())
            .all(|s| count(s.as_str()) == 0);
    // Sampling-only settle: let the writer catch up before measuring disk.
    grid.queue.flush().await.map_err(failed)?;
    let disk = dir_bytes(grid.dir());
    let final_rss = rss_bytes();
    let workers = grid.workers;
    grid.stop().await;

    let percentile = |times: &mut Vec<Duration>, q: f64| {
        times.sort();
        times
            .get(((times.len().max(1) - 1) as f64 * q).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "KWQ sweep benchmark: one {}-point no-op sweep, embedded store, {workers} workers ({})",
        bench.points,
        super::bench::machine()
    );
    println!("accepted in {:.1} ms", accepted.as_secs_f64() * 1e3);
    println!(
        "{:>8} {:>12} {:>10} {:>10} {:>10} {:>14}",
        "time s", "completed", "tasks/s", "RSS MiB", "store MiB", "undurable ops"
    );
    let mut previous = (Duration::ZERO, 0);
    for s in &samples {
        let rate = (s.completed - previous.1) as f64 / (s.at - previous.0).as_secs_f64();
        println!(
            "{:>8.0} {:>12} {:>10.0} {:>10.0} {:>10.0} {:>14}",
            s.at.as_secs_f64(),
            s.completed,
            rate,
            mib(s.rss),
            mib(s.store_pages_bytes),
            s.undurable_ops
        );
        previous = (s.at, s.completed);
    }
    let peak = samples.iter().map(|s| s.rss).max().unwrap_or(0);
    let warm = samples.first().map_or(0, |s| s.rss);
    println!(
        "tasks/s over the run: {:.0}",
        completed_at_cancel as f64 / ran.as_secs_f64()
    );
    println!(
        "RSS: idle {:.0} MiB, first sample {:.0} MiB, peak {:.0} MiB, after the cancel {:.0} MiB",
        mib(idle_rss),
        mib(warm),
        mib(peak),
        mib(final_rss)
    );
    let cache = crate::queue::embedded::WRITER_CACHE_BYTES;
    match samples.iter().position(|s| s.store_pages_bytes >= cache) {
        Some(full) => println!(
            "RSS once the store passed the writer's {:.0} MiB page cache (at {:.0} s, the cache full): {:.0} MiB, peak after it {:.0} MiB",
            mib(cache),
            samples[full].at.as_secs_f64(),
            mib(samples[full].rss),
            mib(samples[full..].iter().map(|s| s.rss).max().unwrap_or(0))
        ),
        None => println!(
            "the store stayed under the writer's {:.0} MiB page cache: that cache may still be filling",
            mib(cache)
        ),
    }
    println!(
        "reads while running: GET /v1/jobs/ID p50 {:.2} ms p99 {:.2} ms; GET /v1/stats p50 {:.2} ms p99 {:.2} ms",
        percentile(&mut job_reads, 0.5),
        percentile(&mut job_reads, 0.99),
        percentile(&mut stats_reads, 0.5),
        percentile(&mut stats_reads, 0.99)
    );
    println!(
        "cancel answered in {:.1} ms; completed after it: {}",
        cancel_latency.as_secs_f64() * 1e3,
        after_cancel.saturating_sub(completed_at_cancel)
    );
    println!(
        "counts after the cancel: Completed {done}, Cancelled {cancelled}, Dead {dead} (every point once: {finished_once})"
    );
    println!(
        "store on disk: {:.1} MiB, {:.0} bytes per completed task",
        mib(disk),
        disk as f64 / done.max(1) as f64
    );
    if bench.json {
        println!(
            "{}",
            json!({
                "points": bench.points,
                "completed": done,
                "cancelled": cancelled,
                "dead": dead,
                "finished_once": finished_once,
                "rss_samples": samples.iter().map(|s| s.rss).collect::<Vec<_>>(),
                "store_bytes_samples": samples.iter().map(|s| s.store_pages_bytes).collect::<Vec<_>>(),
                "writer_cache_bytes": crate::queue::embedded::WRITER_CACHE_BYTES,
                "undurable_ops": samples.iter().map(|s| s.undurable_ops).collect::<Vec<_>>(),
                "cancel_ms": cancel_latency.as_secs_f64() * 1e3,
                "disk_bytes": disk,
            })
        );
    }
    Ok(())
}
