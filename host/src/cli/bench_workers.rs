//! `kwq bench workers`: worker machines as real processes on this machine.
//! One `kwq serve --workers 0` scheduler host, then 1, 2 and 4 `kwq worker`
//! processes leasing over HTTP; a sweep job of no-op tasks and one of 1 ms
//! tasks each time, timed from submit to Finished, with the scheduler's
//! CPU time per task read from /proc. Beside them, the same jobs on a
//! `kwq serve` with in-process workers. Printed, never asserted.

use super::CliError;
use super::local_grid::{failed, get_json};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Arguments of `kwq bench workers`.
#[derive(Debug, clap::Args)]
pub struct WorkersBench {
    /// No-op tasks per run.
    #[arg(long, default_value_t = 200_000)]
    tasks: u64,
    /// 1 ms tasks per run.
    #[arg(long, default_value_t = 20_000)]
    sleep_tasks: u64,
    /// Worker process counts, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// Slots (tasks at once) of each worker process.
    #[arg(long, default_value_t = 2)]
    slots: usize,
}

/// A child `kwq` process, killed when dropped.
struct Process {
    child: Child,
    url: Option<String>,
}

impl Process {
    fn spawn(args: &[String], dir: &Path) -> Result<Process, CliError> {
        let exe = std::env::current_exe().map_err(failed)?;
        let mut child = Command::new(exe)
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .env("KWQ_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(failed)?;
        let mut stdout = BufReader::new(child.stdout.take().ok_or_else(|| failed("no stdout"))?);
        let mut first = String::new();
        stdout.read_line(&mut first).map_err(failed)?;
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(str::to_string);
        Ok(Process { child, url })
    }

    /// User + system CPU time of the process so far.
    fn cpu(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ')'.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or("", |(_, rest)| rest)
            .split_whitespace()
            .collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // utime and stime are fields 14 and 15 (1-based), 11 and 12 here.
        Duration::from_millis((ticks(11) + ticks(12)) * 10)
    }

    /// SIGTERM and wait (a worker deregisters; a host flushes).
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tasks of a run's job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// The no-op module: what the protocol itself costs.
    Noop,
    /// A 1 ms WASI sleep.
    Sleep1ms,
}

impl Work {
    fn label(self) -> &'static str {
        match self {
            Work::Noop => "no-op",
            Work::Sleep1ms => "1 ms",
        }
    }
}

/// One measured run.
struct Run {
    work: Work,
    /// Through `kwq worker` processes (else in-process workers).
    remote: bool,
    /// Who ran it, for the table.
    label: String,
    tasks: u64,
    seconds: f64,
    scheduler_cpu: Duration,
}

pub(super) fn run(bench: WorkersBench) -> Result<(), CliError> {
    let dir = std::env::temp_dir().join(format!(
        "kwq-bench-workers-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let outcome = super::tokio_runtime()?.block_on(measure(&bench, &dir));
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn host_args(workers: usize) -> Vec<String> {
    [
        "serve",
        "--examples",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        &workers.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

async fn measure(bench: &WorkersBench, dir: &Path) -> Result<(), CliError> {
    let client = reqwest::Client::new();
    let mut runs = Vec::new();
    // In-process workers: the figure to compare with.
    {
        let host = Process::spawn(&host_args(bench.slots), &dir.join("inproc"))?;
        let url = host.url.clone().ok_or_else(|| failed("no host address"))?;
        for (work, tasks) in [
            (Work::Noop, bench.tasks),
            (Work::Sleep1ms, bench.sleep_tasks),
        ] {
            let mut run = job_run(&client, &url, &host, work, tasks).await?;
            run.label = format!("in-process, {} workers", bench.slots);
            runs.push(run);
        }
        host.stop();
    }
    let host = Process::spawn(&host_args(0), &dir.join("scheduler"))?;
    let url = host.url.clone().ok_or_else(|| failed("no host address"))?;
    for &count in &bench.workers {
        let workers: Vec<Process> = (0..count)
            .map(|i| {
                let args: Vec<String> = [
                    "worker",
                    "--server",
                    &url,
                    "--workers",
                    &bench.slots.to_string(),
                    "--name",
                    &format!("bench-{i}"),
                ]
                .map(String::from)
                .to_vec();
                Process::spawn(&args, &dir.join(format!("worker-{count}-{i}")))
            })
            .collect::<Result<_, _>>()?;
        for (work, tasks) in [
            (Work::Noop, bench.tasks),
            (Work::Sleep1ms, bench.sleep_tasks),
        ] {
            let mut run = job_run(&client, &url, &host, work, tasks).await?;
            run.remote = true;
            run.label = format!("{count} kwq worker x {} slots", bench.slots);
            runs.push(run);
        }
        for worker in workers {
            worker.stop();
        }
    }
    host.stop();
    print_table(&runs);
    Ok(())
}

async fn job_run(
    client: &reqwest::Client,
    url: &str,
    host: &Process,
    work: Work,
    tasks: u64,
) -> Result<Run, CliError> {
    let body = match work {
        Work::Noop => {
            json!({"module": "noop", "sweep": {"params": {"i": {"from": 1, "to": tasks, "step": 1}}}})
        }
        Work::Sleep1ms => {
            json!({"module": "misbehave", "sweep": {"base": {"action": "sleep", "ms": 1}, "params": {"i": {"from": 1, "to": tasks, "step": 1}}}})
        }
    };
    let cpu_before = host.cpu();
    let started = Instant::now();
    let response = client
        .post(format!("{url}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .map_err(failed)?;
    let job: Value = response.json().await.map_err(failed)?;
    let id = job["id"]
        .as_str()
        .ok_or_else(|| failed(format!("job refused: {job}")))?
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let view = get_json(client, format!("{url}/v1/jobs/{id}")).await?;
        if view["state"] == "Finished" {
            if view["counts"]["Completed"].as_u64() != Some(tasks) {
                return Err(failed(format!("job {id} finished short: {view}")));
            }
            break;
        }
        if Instant::now() > deadline {
            return Err(failed(format!("job {id} did not finish: {view}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Run {
        work,
        remote: false,
        label: String::new(),
        tasks,
        seconds,
        scheduler_cpu: host.cpu().saturating_sub(cpu_before),
    })
}

fn print_table(runs: &[Run]) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "kwq bench workers: sweep jobs through one host, {cores} cores on this machine (host and workers share them)"
    );
    println!("| run | tasks | tasks/s | host CPU per task |");
    println!("|---|---|---|---|");
    for run in runs {
        let per_task_us = run.scheduler_cpu.as_secs_f64() * 1e6 / run.tasks.max(1) as f64;
        println!(
            "| {}, {} | {} | {:.0} | {:.1} µs |",
            run.work.label(),
            run.label,
            run.tasks,
            run.tasks as f64 / run.seconds,
            per_task_us
        );
    }
    // What one scheduler core could feed: tasks/s per core of its time,
    // times 10 ms per task, is the worker slots kept busy.
    if let Some(best) = runs
        .iter()
        .filter(|r| r.work == Work::Noop && r.remote)
        .map(|r| r.scheduler_cpu.as_secs_f64() / r.tasks.max(1) as f64)
        .filter(|cpu| *cpu > 0.0)
        .reduce(f64::min)
    {
        let per_core = 1.0 / best;
        println!(
            "one scheduler core leases and records {per_core:.0} tasks/s: at 10 ms per task it could feed about {:.0} worker slots per core",
            per_core * 0.010
        );
    }
}
