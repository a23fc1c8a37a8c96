//! `kwq bench workflow`: what dependencies cost the scheduler, on a
//! temporary embedded store with no Wasm in the way (a worker loop leases
//! and completes at once): how long the waiters of one job take to be
//! released once it completes (one job of N tasks, and N lone tasks, each
//! waiting on it), and the latency per hop of a chain of tasks each
//! waiting on the one before.

use super::CliError;
use super::local_grid::failed;
use crate::model::{ModuleId, NewJob, NewTask, TaskOptions, TaskState};
use crate::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
use crate::queue::{CommitObserver, Committed, Completion, ReadStore, WorkQueue, WorkerView};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Arguments of `kwq bench workflow`.
#[derive(Debug, clap::Args)]
pub struct WorkflowBench {
    /// Tasks waiting on one job, released when it completes.
    #[arg(long, default_value_t = 100_000)]
    waiters: u64,
    /// Tasks in the chain (each waits on the one before).
    #[arg(long, default_value_t = 1_000)]
    chain: u64,
}

/// Run `kwq bench workflow`.
pub(super) fn run(bench: WorkflowBench) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(async {
        println!("kwq bench workflow: embedded store (durable commits), no Wasm");
        println!("{:<44} {:>12} {:>14}", "measurement", "tasks", "time");
        for lone in [false, true] {
            let (released, took) = release(bench.waiters, lone).await?;
            let what = if lone {
                "release: lone tasks each after the job"
            } else {
                "release: one job's tasks after the job"
            };
            println!("{what:<44} {released:>12} {:>11.1} ms", ms(took));
        }
        let (hops, took) = chain(bench.chain).await?;
        println!(
            "{:<44} {hops:>12} {:>11.1} ms",
            "chain: whole run",
            ms(took)
        );
        println!(
            "{:<44} {:>12} {:>11.3} ms",
            "chain: per hop (commit, release, lease)",
            "",
            ms(took) / hops as f64
        );
        Ok(())
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A store directory under the system's temporary directory, removed
/// when the measurement ends.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn open() -> Result<(Scratch, EmbeddedQueue), CliError> {
    let dir = Scratch(std::env::temp_dir().join(format!(
        "kwq-bench-workflow-{}",
        uuid::Uuid::new_v4().simple()
    )));
    std::fs::create_dir_all(&dir.0).map_err(failed)?;
    let queue =
        EmbeddedQueue::open(&dir.0.join("kwq.db"), EmbeddedConfig::default()).map_err(failed)?;
    Ok((dir, queue))
}

fn task(id: String, after: Vec<String>) -> NewTask {
    NewTask {
        id,
        job_id: None,
        module: ModuleId::of(b"bench"),
        payload: b"null".to_vec(),
        options: TaskOptions {
            after,
            ..TaskOptions::default()
        },
    }
}

fn worker() -> WorkerView {
    WorkerView {
        id: "bench".into(),
        warm: Vec::new(),
        pool: None,
    }
}

/// Counts tasks released from Waiting, and wakes whoever waits for a count.
#[derive(Default)]
struct Released {
    count: AtomicU64,
    changed: Notify,
}

impl CommitObserver for Released {
    fn committed(&self, batch: &[Committed]) {
        let n = batch
            .iter()
            .filter(|c| c.from == Some(TaskState::Waiting) && c.event.state == TaskState::Pending)
            .count() as u64;
        if n > 0 {
            self.count.fetch_add(n, Ordering::SeqCst);
            self.changed.notify_waiters();
        }
    }
}

impl Released {
    async fn reach(&self, n: u64) -> Result<(), CliError> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.count.load(Ordering::SeqCst) >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(Duration::from_secs(300), wait)
            .await
            .map_err(|_| failed(format!("fewer than {n} tasks released")))
    }
}

/// `waiters` tasks waiting on a one-task job (`lone`: each a task of its
/// own; else the tasks of one job), then the job completes: the time from
/// its completion being reported to the last waiter being Pending (its
/// release durable and in the ready index).
async fn release(waiters: u64, lone: bool) -> Result<(u64, Duration), CliError> {
    let (_dir, queue) = open()?;
    let released = Arc::new(Released::default());
    queue.observe(released.clone());
    queue
        .submit_job(NewJob {
            id: "j-dependency".into(),
            name: None,
            module: ModuleId::of(b"bench"),
            options: TaskOptions::default(),
            payloads: vec![b"null".to_vec()],
            sweep: None,
        })
        .await
        .map_err(failed)?;
    let after = vec!["j-dependency".to_string()];
    if lone {
        for chunk in (0..waiters).collect::<Vec<_>>().chunks(10_000) {
            let tasks = chunk
                .iter()
                .map(|i| task(format!("t-waiter-{i}"), after.clone()))
                .collect();
            queue.submit_tasks(tasks).await.map_err(failed)?;
        }
    } else {
        queue
            .submit_job(NewJob {
                id: "j-waiters".into(),
                name: None,
                module: ModuleId::of(b"bench"),
                options: TaskOptions {
                    after,
                    ..TaskOptions::default()
                },
                payloads: (0..waiters).map(|_| b"null".to_vec()).collect(),
                sweep: None,
            })
            .await
            .map_err(failed)?;
    }
    let lease = queue
        .lease(&worker())
        .await
        .ok_or_else(|| failed("no lease"))?;
    queue.started(&lease);
    let started = Instant::now();
    queue
        .complete(&lease, Completion::default())
        .map_err(failed)?;
    released.reach(waiters).await?;
    let took = started.elapsed();
    queue.close();
    Ok((released.count.load(Ordering::SeqCst), took))
}

/// A chain of `length` tasks, each after the one before, run by one worker
/// loop that completes each task as soon as it is leased.
async fn chain(length: u64) -> Result<(u64, Duration), CliError> {
    let (_dir, queue) = open()?;
    let tasks: Vec<NewTask> = (0..length)
        .map(|i| {
            let after = if i == 0 {
                Vec::new()
            } else {
                vec![format!("t-link-{}", i - 1)]
            };
            task(format!("t-link-{i}"), after)
        })
        .collect();
    // Submitted one by one, before any runs: each names one stored already.
    for task in tasks {
        queue.submit_tasks(vec![task]).await.map_err(failed)?;
    }
    let started = Instant::now();
    for _ in 0..length {
        let lease = tokio::time::timeout(Duration::from_secs(60), queue.lease(&worker()))
            .await
            .map_err(|_| failed("the chain stalled"))?
            .ok_or_else(|| failed("no lease"))?;
        queue.started(&lease);
        queue
            .complete(&lease, Completion::default())
            .map_err(failed)?;
    }
    queue.flush().await.map_err(failed)?;
    let took = started.elapsed();
    let last = queue
        .task(&format!("t-link-{}", length - 1))
        .await
        .map_err(failed)?;
    if last.state != TaskState::Completed {
        return Err(failed(format!("the last link is {}", last.state)));
    }
    queue.close();
    Ok((length, took))
}
