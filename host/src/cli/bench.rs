//! `kwq bench ...`: measurements printed as tables, never asserted in tests.

use super::CliError;
use crate::examples;
use crate::model::{ModuleId, TaskLimits};
use crate::runtime::{Runtime, RuntimeConfig, TaskSpec, Worker};
use std::time::{Duration, Instant};

/// Which benchmark to run.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Per-task overhead of a no-op task (cold and warm) and Monte Carlo
    /// pricer speed in Wasm against the same Rust code compiled natively.
    Runtime {
        /// No-op tasks per measurement.
        #[arg(long, default_value_t = 20_000)]
        tasks: u32,
        /// Monte Carlo paths for the pricer comparison.
        #[arg(long, default_value_t = 4_000_000)]
        paths: u64,
    },
    /// No-op tasks end to end through the durable embedded store and the
    /// HTTP API (tasks/s), and submit-to-start latency on an idle server.
    Grid {
        /// No-op tasks for the throughput run.
        #[arg(long, default_value_t = 200_000)]
        tasks: u64,
        /// Tasks per submitted job.
        #[arg(long, default_value_t = 10_000)]
        batch: u64,
        /// Single-task submissions for the latency run.
        #[arg(long, default_value_t = 1_000)]
        samples: u32,
        /// Workers (default: cores).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// No-op tasks end to end on the Kafka backend with one host and with
    /// several (in this process, sharing the cluster), plus the broker's own
    /// produce-and-consume rate for messages of the same size.
    Kafka {
        /// Bootstrap servers of a running cluster (e.g. a tansu broker), or
        /// `mock` for librdkafka's in-process mock cluster.
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        /// No-op tasks per run.
        #[arg(long, default_value_t = 50_000)]
        tasks: u64,
        /// Tasks per submitted job.
        #[arg(long, default_value_t = 10_000)]
        batch: u64,
        /// Host counts to run, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        hosts: Vec<usize>,
        /// Workers per host (default: cores).
        #[arg(long)]
        workers: Option<usize>,
        /// Run one API-only host (`--role api`, submitted to and counted
        /// on) beside each count of --hosts, which are then worker-only
        /// hosts (`--role worker`).
        #[arg(long)]
        api_host: bool,
        /// The hosts' fetch wait in ms (the store URL's `fetch_wait_ms`).
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=5000))]
        fetch_wait_ms: u32,
    },
    /// Kafka membership changes (a host joins, leaves, restarts under its
    /// name) while a grid runs flat out: the longest gap in which no task
    /// completed, and the grid-seconds of dispatch each change cost.
    Membership(super::bench_membership::MembershipBench),
    /// One very large no-op sweep: tasks/s, RSS over time, work not yet
    /// durable, read latency, cancel latency, counts after the cancel and
    /// bytes per task on disk.
    Sweep(super::bench_sweep::SweepBench),
    /// Synchronous invocation: sequential `POST /v1/tasks?wait=` of a
    /// no-op task from one client on an idle host; latency percentiles.
    Invoke {
        /// Invocations timed.
        #[arg(long, default_value_t = 5_000)]
        samples: u32,
        /// Workers (default: cores).
        #[arg(long)]
        workers: Option<usize>,
        /// What the store's commits survive (as `kwq serve --durability`).
        #[arg(long, value_enum, default_value = "power")]
        durability: crate::queue::embedded::Durability,
    },
    /// Worker machines: no-op and 1 ms tasks through 1, 2 and 4 `kwq
    /// worker` processes against one `kwq serve --workers 0`, beside
    /// in-process workers; tasks/s and host CPU per task.
    Workers(super::bench_workers::WorkersBench),
    /// What task modules cost, in any language: size, first compile, and
    /// time per task cold (fresh instance) and warm (reused after init).
    Modules(super::bench_modules::ModulesBench),
    /// Dependencies: how long one job's waiters (100,000 by default) take
    /// to be released once it completes, and the scheduler's latency per
    /// hop of a chain of tasks each waiting on the one before.
    Workflow(super::bench_workflow::WorkflowBench),
    /// One reduce task reading a finished job's 1,000,000 results through
    /// `next-results` (fan-in): how long it takes and the host's peak RSS.
    FanIn(super::bench_fanin::FanInBench),
}

/// Run a benchmark.
pub(super) fn run(command: BenchCommand, perf_map: bool) -> Result<(), CliError> {
    match command {
        BenchCommand::Runtime { tasks, paths } => runtime_bench(tasks, paths, perf_map),
        BenchCommand::Grid {
            tasks,
            batch,
            samples,
            workers,
        } => super::bench_grid::run(tasks, batch, samples, workers),
        BenchCommand::Kafka {
            brokers,
            tasks,
            batch,
            hosts,
            workers,
            api_host,
            fetch_wait_ms,
        } => super::bench_kafka::run(
            brokers,
            super::bench_kafka::Shape {
                tasks,
                batch,
                hosts,
                workers,
                api_host,
                fetch_wait_ms,
            },
        ),
        BenchCommand::Sweep(bench) => super::bench_sweep::run(bench),
        BenchCommand::Membership(bench) => super::bench_membership::run(bench),
        BenchCommand::Invoke {
            samples,
            workers,
            durability,
        } => super::bench_invoke::run(samples, workers, durability),
        BenchCommand::Workers(bench) => super::bench_workers::run(bench),
        BenchCommand::Modules(bench) => super::bench_modules::run(bench),
        BenchCommand::Workflow(bench) => super::bench_workflow::run(bench),
        BenchCommand::FanIn(bench) => super::bench_fanin::run(bench),
    }
}

fn bundled(name: &str) -> &'static [u8] {
    examples::BUNDLED
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, b)| *b)
        .expect("bundled module")
}

fn runtime_bench(tasks: u32, paths: u64, perf_map: bool) -> Result<(), CliError> {
    let runtime = Runtime::new(RuntimeConfig {
        perf_map,
        ..RuntimeConfig::default()
    })
    .map_err(|e| CliError::failed(e.to_string()))?;
    let compile = |name: &str| {
        runtime
            .compile(bundled(name))
            .map(|m| m.id.clone())
            .map_err(|e| CliError::failed(format!("{name}: {e}")))
    };
    let noop = compile("noop")?;
    let pricer = compile("option-pricer")?;
    // One core: a single-threaded executor drives one worker.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(e.to_string()))?;

    let mut worker = runtime.worker(8);
    let cold = rt.block_on(time_tasks(&mut worker, &noop, &[], None, tasks))?;
    let warm = rt.block_on(time_tasks(&mut worker, &noop, &[], Some("bench"), tasks))?;

    let contract = mc_math::Contract {
        spot: 42.0,
        strike: 40.0,
        rate: 0.1,
        vol: 0.2,
        maturity: 0.5,
        kind: mc_math::OptionKind::Call,
    };
    let payload = serde_json::json!({
        "spot": contract.spot, "strike": contract.strike, "rate": contract.rate, "vol": contract.vol,
        "maturity": contract.maturity, "kind": "call", "paths": paths, "seed": 7
    });
    // Native and Wasm runs alternate, and each side reports its median, so
    // a burst of noise on a shared machine skews neither side alone.
    let pricer_task = spec(&pricer, payload.to_string().into_bytes(), None);
    let (mut wasm_times, mut native_times) = (Vec::new(), Vec::new());
    let (mut wasm_estimate, mut native_estimate) = (None, None);
    for _ in 0..PRICER_RUNS {
        let started = Instant::now();
        let report = rt.block_on(worker.run(pricer_task.clone()));
        wasm_times.push(started.elapsed());
        let result = report
            .outcome
            .map_err(|e| CliError::failed(format!("pricer failed: {e}")))?;
        let estimate: mc_math::Estimate = serde_json::from_slice(&result)
            .map_err(|e| CliError::failed(format!("pricer result: {e}")))?;
        wasm_estimate = Some(estimate);

        let started = Instant::now();
        native_estimate = Some(mc_math::price_european(&contract, paths, 7, |_| {}));
        native_times.push(started.elapsed());
    }
    let (wasm_time, native_time) = (median(wasm_times), median(native_times));
    let (wasm_estimate, native_estimate) = (
        wasm_estimate.expect("PRICER_RUNS > 0"),
        native_estimate.expect("PRICER_RUNS > 0"),
    );

    println!("KWQ runtime benchmark ({})", machine());
    println!("{:<44} {:>14} {:>14}", "measurement", "per task", "tasks/s");
    for (name, per_task) in [
        ("no-op task, cold (instantiate + init + run)", cold),
        ("no-op task, warm (reused instance)", warm),
    ] {
        println!(
            "{:<44} {:>11.1} us {:>14.0}",
            name,
            per_task.as_secs_f64() * 1e6,
            1.0 / per_task.as_secs_f64()
        );
    }
    println!();
    println!(
        "{:<44} {:>14} {:>14}",
        "option pricer, paths", "time", "price"
    );
    println!(
        "{:<44} {:>11.1} ms {:>14.6}",
        format!("native Rust, {paths} (median of {PRICER_RUNS})"),
        native_time.as_secs_f64() * 1e3,
        native_estimate.price
    );
    println!(
        "{:<44} {:>11.1} ms {:>14.6}",
        format!("Wasm, epoch timeouts on, {paths}"),
        wasm_time.as_secs_f64() * 1e3,
        wasm_estimate.price
    );
    println!(
        "{:<44} {:>14.2}x",
        "Wasm speed as a fraction of native",
        native_time.as_secs_f64() / wasm_time.as_secs_f64()
    );
    Ok(())
}

/// Runs of the pricer on each side; the table shows the medians.
const PRICER_RUNS: usize = 7;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// A task for a benchmark run: long timeout, default limits otherwise.
fn spec(module: &ModuleId, payload: Vec<u8>, affinity: Option<&str>) -> TaskSpec {
    TaskSpec {
        task_id: "bench".into(),
        attempt: 1,
        module: module.clone(),
        payload,
        affinity: affinity.map(str::to_string),
        limits: TaskLimits {
            timeout: Duration::from_secs(600),
            ..TaskLimits::default()
        },
        on_progress: None,
        input: None,
    }
}

/// Mean wall time per task over `tasks` sequential runs of `payload`
/// (after a warm-up of as many, at most 200). With an affinity key every
/// run after the first reuses the warm instance; without one each run
/// instantiates afresh.
pub(super) async fn time_tasks(
    worker: &mut Worker,
    module: &ModuleId,
    payload: &[u8],
    affinity: Option<&str>,
    tasks: u32,
) -> Result<Duration, CliError> {
    let one = spec(module, payload.to_vec(), affinity);
    for _ in 0..tasks.min(200) {
        worker
            .run(one.clone())
            .await
            .outcome
            .map_err(|e| CliError::failed(format!("task failed: {e}")))?;
    }
    let started = Instant::now();
    for _ in 0..tasks {
        worker
            .run(one.clone())
            .await
            .outcome
            .map_err(|e| CliError::failed(format!("task failed: {e}")))?;
    }
    Ok(started.elapsed() / tasks.max(1))
}

/// "N cores, CPU model" for the table header.
pub(crate) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {model}")
}
