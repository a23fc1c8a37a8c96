//! `kwq bench membership`: how long a Kafka grid stops dispatching when its
//! membership changes. `--hosts` hosts in this process run one large no-op
//! sweep flat out; once the rate has settled, a host joins, then that host
//! leaves, then another host restarts under its own name (a static member
//! back within the session timeout), each after the grid has settled
//! again. The tasks the hosts have finished (their own counts, not a
//! view's) are sampled every 50 ms; each change is reported as the longest time in which no task
//! completed, the rate before and after, and its cost in seconds of the
//! whole grid stopped (the tasks the window after lacked against the rate
//! before, over that rate). A restarted host keeps its directory, as a
//! `kwq serve` restarted with the same `--data-dir` does. With `--api-host`
//! the changes are made to worker-only hosts beside an API host that holds
//! the view and runs nothing, so what is measured is dispatch alone, not a
//! newcomer's view reading the event topic on the same cores.

use super::CliError;
use super::bench_kafka::MockBroker;
use super::local_grid::{LocalGrid, failed, post_job};
use crate::queue::kafka::{HostTraffic, KafkaConfig, Role};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What `kwq bench membership` runs.
#[derive(Debug, clap::Args)]
pub struct MembershipBench {
    /// Bootstrap servers of a running cluster (e.g. a tansu broker), or
    /// `mock` for librdkafka's in-process mock cluster.
    #[arg(long, default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Hosts running before the first change (one more joins).
    #[arg(long, default_value_t = 3)]
    hosts: usize,
    /// Seconds the grid runs before each change and after the last, and
    /// the window the rates are taken over.
    #[arg(long, default_value_t = 15)]
    settle: u64,
    /// Workers per host (default: cores).
    #[arg(long)]
    workers: Option<usize>,
    /// The workers' group assignor (`roundrobin`, `cooperative-sticky` or
    /// `range`; default: the store's, as `?assignor=` sets it).
    #[arg(long, value_parser = ["roundrobin", "cooperative-sticky", "range"])]
    assignor: Option<String>,
    /// Join as dynamic members (`?static_membership=false`): a stopping
    /// host then leaves the group at once, and a restarted one joins anew.
    #[arg(long)]
    dynamic: bool,
    /// Run an API-only host (`--role api`, sampled, running nothing)
    /// beside `--hosts` worker-only hosts (`--role worker`), which are the
    /// ones that join, leave and restart.
    #[arg(long)]
    api_host: bool,
    /// Print every host's tasks finished, task partitions and sweeps
    /// being expanded every 250 ms (to standard error), to see where a
    /// gap comes from.
    #[arg(long)]
    timeline: bool,
}

/// The hosts running now, for the sampler and `--timeline`: (host index,
/// its queue).
type LiveHosts = Arc<std::sync::Mutex<Vec<(usize, Arc<dyn crate::queue::Queue>)>>>;

/// Note which hosts are running now.
fn note_live(live: &LiveHosts, grids: &[Option<LocalGrid>]) {
    *live.lock().unwrap_or_else(|p| p.into_inner()) = grids
        .iter()
        .enumerate()
        .filter_map(|(i, g)| g.as_ref().map(|g| (i, g.queue.clone())))
        .collect();
}

/// Tasks each host has finished since it was last read: its own count
/// (its workers', not a view's, which can lag behind and hide a stop),
/// kept per running instance, so a restarted host starts from nothing.
#[derive(Default)]
struct FinishedSince {
    /// Each instance's count when last read, by its queue's address.
    last: std::collections::HashMap<usize, u64>,
}

impl FinishedSince {
    /// The running hosts' index, traffic, and tasks finished since the
    /// last read.
    fn read(&mut self, live: &LiveHosts) -> Vec<(usize, HostTraffic, u64)> {
        let hosts = live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let instance =
            |queue: &Arc<dyn crate::queue::Queue>| Arc::as_ptr(queue) as *const () as usize;
        // A stopped instance's address may be reused by its successor.
        let running: Vec<usize> = hosts.iter().map(|(_, queue)| instance(queue)).collect();
        self.last.retain(|at, _| running.contains(at));
        hosts
            .into_iter()
            .filter_map(|(i, queue)| {
                let traffic = queue.kafka_traffic()?;
                let before = self
                    .last
                    .insert(instance(&queue), traffic.finished)
                    .unwrap_or(0);
                let since = traffic.finished.saturating_sub(before);
                Some((i, traffic, since))
            })
            .collect()
    }
}

/// `--timeline`: every 250 ms, one line of each running host's
/// `finished +since last line / task partitions / sweeps expanding`.
fn print_timeline(live: LiveHosts, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        let mut finished = FinishedSince::default();
        while !stop.load(Ordering::Relaxed) {
            let mut line = format!("{:>7.2}s", started.elapsed().as_secs_f64());
            for (i, t, since) in finished.read(&live) {
                line.push_str(&format!(
                    "  bench{i}: +{since}/{}p/{}x",
                    t.task_partitions, t.expanding
                ));
            }
            eprintln!("{line}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// How often the completed count is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

/// `kwq bench membership`.
pub(super) fn run(bench: MembershipBench) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(measure(bench))
}

async fn measure(bench: MembershipBench) -> Result<(), CliError> {
    if bench.hosts < 2 {
        return Err(CliError::usage("--hosts must be at least 2"));
    }
    let mock = (bench.brokers == "mock")
        .then(MockBroker::start)
        .transpose()?;
    let brokers = mock
        .as_ref()
        .map_or(bench.brokers.clone(), |m| m.brokers.clone());
    let prefix = format!("bench-{}.", uuid::Uuid::new_v4().simple());
    // Room for every host, the one that joins included.
    let partitions = 2 * (bench.hosts as i32 + 1);
    if let Some(mock) = &mock {
        mock.create_grid_topics(&prefix, partitions)?;
    }
    // With an API host it is host 0, and the workers are 1..=hosts (+1).
    let first_worker = usize::from(bench.api_host);
    let role = |i: usize| match (bench.api_host, i) {
        (false, _) => Role::All,
        (true, 0) => Role::Api,
        (true, _) => Role::Worker,
    };
    let config = |i: usize| KafkaConfig {
        brokers: brokers.clone(),
        prefix: prefix.clone(),
        host: format!("bench{i}"),
        task_partitions: partitions,
        create_topics: mock.is_none() && i == 0,
        // A real broker here is most likely tansu (see KafkaConfig).
        rejoin_stale: mock.is_none(),
        role: role(i),
        assignor: bench
            .assignor
            .clone()
            .unwrap_or_else(|| KafkaConfig::default().assignor),
        static_membership: !bench.dynamic,
        ..KafkaConfig::default()
    };
    let mut grids = Vec::new();
    for i in 0..first_worker + bench.hosts {
        grids.push(Some(
            LocalGrid::start_on(bench.workers, Some(config(i))).await?,
        ));
    }
    println!(
        "Kafka membership changes, {} {} ({} members, {} assignor), brokers {brokers}",
        bench.hosts,
        if bench.api_host {
            "worker-only hosts beside an API host"
        } else {
            "hosts"
        },
        if bench.dynamic { "dynamic" } else { "static" },
        config(0).assignor
    );
    let first = grids[0].as_ref().expect("first host");
    let url = first.url.clone();
    // A sweep far larger than the run: the grid never runs out of work.
    post_job(
        &reqwest::Client::new(),
        &url,
        &serde_json::json!({"module": "noop", "sweep": {"params": {"i": {"from": 0, "to": 999_999_999}}}}),
    )
    .await?;
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, u64)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let live = LiveHosts::default();
    note_live(&live, &grids);
    let sampler = {
        let (samples, stop, live) = (samples.clone(), stop.clone(), live.clone());
        tokio::spawn(async move {
            let mut finished = FinishedSince::default();
            let mut done = 0;
            while !stop.load(Ordering::Relaxed) {
                done += finished
                    .read(&live)
                    .iter()
                    .map(|(_, _, since)| since)
                    .sum::<u64>();
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), done));
                tokio::time::sleep(SAMPLE_EVERY).await;
            }
        })
    };
    let timeline = bench
        .timeline
        .then(|| print_timeline(live.clone(), stop.clone()));
    let settle = Duration::from_secs(bench.settle);
    // The first settle also covers joining and compiling the module.
    tokio::time::sleep(settle * 2).await;
    let mut changes = Vec::new();

    let joiner = first_worker + bench.hosts;
    changes.push(("a host joins", Instant::now()));
    if bench.timeline {
        eprintln!("-- a host joins");
    }
    grids.push(Some(
        LocalGrid::start_on(bench.workers, Some(config(joiner))).await?,
    ));
    note_live(&live, &grids);
    tokio::time::sleep(settle).await;

    changes.push(("that host leaves (stopped)", Instant::now()));
    if bench.timeline {
        eprintln!("-- that host leaves (stopped)");
    }
    if let Some(grid) = grids[joiner].take() {
        note_live(&live, &grids);
        grid.stop().await;
    }
    tokio::time::sleep(settle).await;

    let restarted = joiner - 1;
    changes.push(("a host restarts (same name)", Instant::now()));
    if bench.timeline {
        eprintln!("-- a host restarts (same name)");
    }
    if let Some(grid) = grids[restarted].take() {
        note_live(&live, &grids);
        grids[restarted] = Some(grid.restart(bench.workers, Some(config(restarted))).await?);
        note_live(&live, &grids);
    }
    tokio::time::sleep(settle).await;

    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    if let Some(timeline) = timeline {
        let _ = timeline.await;
    }
    for grid in grids.into_iter().flatten() {
        grid.stop().await;
    }
    let samples = samples.lock().map_err(failed)?.clone();
    println!(
        "{:<30} {:>16} {:>12} {:>14} {:>14} {:>10}",
        "change",
        "longest gap (ms)",
        "gap from (s)",
        "tasks/s before",
        "tasks/s after",
        "stall (s)"
    );
    for (name, at) in changes {
        let effect = effect_of(&samples, at, settle);
        println!(
            "{:<30} {:>16.0} {:>12.2} {:>14.0} {:>14.0} {:>10.2}",
            name,
            effect.longest_gap.as_secs_f64() * 1000.0,
            effect.gap_starts.as_secs_f64(),
            effect.before,
            effect.after,
            effect.stall_seconds
        );
    }
    println!(
        "(longest gap: the longest time, in the {} s after the change, in which no task completed, \
         to the {} ms sampling; gap from: when it began, after the change; stall: the tasks the {} s after lacked against the rate before, \
         in seconds of that rate)",
        bench.settle,
        SAMPLE_EVERY.as_millis(),
        bench.settle
    );
    Ok(())
}

/// What one membership change did to the completion rate.
#[derive(Debug, PartialEq)]
struct Effect {
    longest_gap: Duration,
    /// How long after the change the longest gap began: a gap at once is
    /// the change's own; a late one may be a later effect (a rebalance
    /// the change set off, a slow start).
    gap_starts: Duration,
    /// Tasks/s over the window before the change.
    before: f64,
    /// Tasks/s over the window after it.
    after: f64,
    /// (before × window − completed after) / before, at least 0.
    stall_seconds: f64,
}

/// The [`Effect`] of a change at `at`, over `window` either side, from
/// samples of (when, completed so far).
fn effect_of(samples: &[(Instant, u64)], at: Instant, window: Duration) -> Effect {
    let count_at = |t: Instant| {
        samples
            .iter()
            .take_while(|(when, _)| *when <= t)
            .last()
            .map_or(0, |(_, n)| *n)
    };
    let seconds = window.as_secs_f64();
    let before = (count_at(at) - count_at(at - window)) as f64 / seconds;
    let done_after = (count_at(at + window) - count_at(at)) as f64;
    let after = done_after / seconds;
    let mut longest_gap = Duration::ZERO;
    let mut gap_starts = Duration::ZERO;
    let mut since: Option<(Instant, u64)> = None;
    for &(when, n) in samples
        .iter()
        .filter(|(when, _)| *when >= at && *when <= at + window)
    {
        match since {
            Some((start, count)) if n == count => {
                if when - start > longest_gap {
                    longest_gap = when - start;
                    gap_starts = start - at;
                }
            }
            _ => since = Some((when, n)),
        }
    }
    let stall_seconds = if before > 0.0 {
        ((before * seconds - done_after) / before).max(0.0)
    } else {
        0.0
    };
    Effect {
        longest_gap,
        gap_starts,
        before,
        after,
        stall_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_measured_by_its_gap_and_lost_tasks() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        // 100 tasks/s for 10 s, then nothing for 2 s, then 100 tasks/s.
        let mut samples = Vec::new();
        let mut done = 0;
        for step in 0..=200u64 {
            let at = step * 100;
            if step > 0 && !(10_001..=12_000).contains(&at) {
                done += 10;
            }
            samples.push((ms(at), done));
        }
        let effect = effect_of(&samples, ms(10_000), Duration::from_secs(10));
        assert_eq!(effect.before, 100.0);
        assert_eq!(effect.after, 80.0);
        assert!((effect.stall_seconds - 2.0).abs() < 1e-9, "{effect:?}");
        assert_eq!(effect.longest_gap, Duration::from_millis(2_000));
        assert_eq!(effect.gap_starts, Duration::ZERO);
    }
}
