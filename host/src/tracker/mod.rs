//! The tracker: statistics kept current from the stream of committed
//! events (per job, per tag, per module), never by rescanning tasks.
//! Rebuilt once from the store at start-up.

pub mod metrics;
mod stats;

pub use stats::{JobStats, Overview, RunTimes, TagCounts};

use crate::model::{JobCounts, JobId, ModuleId, TaskState, now_ms};
use crate::queue::{CensusRow, CommitObserver, Committed, ModuleRecord, QueueError, ReadStore};
use stats::Throughput;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Live statistics of a host's view of the grid.
pub struct Tracker {
    inner: Mutex<Figures>,
}

/// Every figure the tracker keeps, behind one lock.
#[derive(Default)]
struct Figures {
    totals: JobCounts,
    jobs: HashMap<JobId, JobEntry>,
    /// Tag key -> value -> counts (two levels, so an event's tags are found
    /// by reference, without copying them).
    tags: HashMap<String, HashMap<String, JobCounts>>,
    modules: HashMap<ModuleId, ModuleEntry>,
    throughput: Throughput,
    retries: u64,
    dead_letters: u64,
    /// Module id -> its latest name, for metric labels (bounded by the
    /// number of modules, not of tasks).
    names: HashMap<ModuleId, Arc<str>>,
}

#[derive(Default)]
struct ModuleEntry {
    counts: JobCounts,
    run: RunTimes,
    /// Its metric handles, made on first use (and again once its name is learnt).
    histograms: Option<metrics::ModuleHistograms>,
}

#[derive(Default)]
struct JobEntry {
    counts: JobCounts,
    run: RunTimes,
    first_finish: Option<u64>,
    last_finish: Option<u64>,
}

impl Tracker {
    /// A tracker rebuilt from the store and registered for its commits.
    pub async fn attach(queue: &Arc<dyn ReadStore>) -> Result<Arc<Self>, QueueError> {
        let tracker = Arc::new(Tracker {
            inner: Mutex::new(Figures::default()),
        });
        // Register first so no commit is missed; the census may then count a
        // few tasks twice for a moment at start-up, which is harmless for stats.
        queue.observe(tracker.clone());
        tracker.modules_stored(&queue.modules().await?);
        let census = queue.census().await?;
        tracker.rebuild(&census);
        Ok(tracker)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Figures> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild(&self, census: &[CensusRow]) {
        let mut inner = self.lock();
        for row in census {
            let n = row.count;
            inner.totals.add(row.state, n);
            if let Some(job) = &row.job_id {
                let entry = inner.jobs.entry(job.clone()).or_default();
                entry.counts.add(row.state, n);
                if let Some(us) = row.run_us {
                    entry.run.record_n(us, n);
                }
            }
            for (key, value) in &row.tags {
                tag_counts(&mut inner.tags, key, value).add(row.state, n);
            }
            let module = inner.modules.entry(row.module.clone()).or_default();
            module.counts.add(row.state, n);
            if let Some(us) = row.run_us {
                module.run.record_n(us, n);
            }
        }
    }

    /// Forget a deleted job: its entry goes and its tasks leave the totals.
    /// (Tag and module counts keep them until the next start, which counts
    /// only what the store holds.)
    pub fn forget_job(&self, job: &str) {
        let mut inner = self.lock();
        if let Some(entry) = inner.jobs.remove(job) {
            for state in TaskState::ALL {
                let n = entry.counts.get(state);
                let total = &mut inner.totals.0[state.index()];
                *total = total.saturating_sub(n);
            }
        }
    }

    /// Counts and timings of one job, if it has any tasks yet.
    pub fn job(&self, job: &str) -> JobStats {
        let inner = self.lock();
        let Some(entry) = inner.jobs.get(job) else {
            return JobStats::default();
        };
        let rate = match (entry.first_finish, entry.last_finish) {
            (Some(first), Some(last)) if last > first => {
                entry.counts.finished() as f64 * 1000.0 / (last - first) as f64
            }
            _ => 0.0,
        };
        JobStats {
            counts: entry.counts,
            throughput_per_s: rate,
            mean_run_us: entry.run.mean(),
            p95_run_us: entry.run.quantile(0.95),
        }
    }

    /// Expected work left, in seconds: over every module, tasks waiting
    /// (Pending or awaiting a retry) times the module's mean run time. The
    /// metric an autoscaler (a Kubernetes HPA) can scale hosts on. Sweep
    /// points not created yet and modules with no completed run count zero.
    pub fn outstanding_seconds(&self) -> f64 {
        let inner = self.lock();
        inner
            .modules
            .values()
            .map(|m| {
                (m.counts.get(TaskState::Pending) + m.counts.get(TaskState::Error)) as f64
                    * m.run.mean()
                    / 1e6
            })
            .sum()
    }

    /// Everything at once, for `/v1/stats` and the dashboard.
    pub fn overview(&self, depth: [u64; 10]) -> Overview {
        let inner = self.lock();
        let now = now_ms();
        Overview {
            counts: inner.totals,
            depth,
            completed_per_s: inner.throughput.rate(now, 10, true),
            failed_per_s: inner.throughput.rate(now, 10, false),
            history: inner.throughput.history(now, 120),
            retries: inner.retries,
            dead_letters: inner.dead_letters,
            tags: inner
                .tags
                .iter()
                .flat_map(|(k, values)| {
                    values.iter().map(move |(v, counts)| TagCounts {
                        tag: format!("{k}={v}"),
                        counts: *counts,
                    })
                })
                .collect(),
            modules: inner
                .modules
                .iter()
                .map(|(m, e)| (m.to_string(), e.run.summary()))
                .collect(),
        }
    }
}

impl CommitObserver for Tracker {
    fn committed(&self, batch: &[Committed]) {
        let mut inner = self.lock();
        let now = now_ms();
        for c in batch {
            let (from, to) = (c.from, c.event.state);
            inner.totals.transition(from, to);
            for (key, value) in c.tags.iter() {
                tag_counts(&mut inner.tags, key, value).transition(from, to);
            }
            match to {
                TaskState::Completed => inner.throughput.add(now, true),
                TaskState::Error => {
                    inner.retries += 1;
                    inner.throughput.add(now, false);
                }
                TaskState::Dead => {
                    inner.dead_letters += 1;
                    inner.throughput.add(now, false);
                }
                _ => {}
            }
            let (run_us, wait_us) = (c.event.run_us, c.event.wait_us);
            let Figures { modules, names, .. } = &mut *inner;
            let module = modules.entry(c.module.clone()).or_default();
            if run_us.is_some() || wait_us.is_some() {
                let histograms = module.histograms.get_or_insert_with(|| {
                    let name = names.get(&c.module).map_or("", |n| &**n);
                    metrics::ModuleHistograms::new(c.module.as_str(), name)
                });
                if let Some(us) = run_us {
                    histograms.record_run(us);
                }
                if let Some(us) = wait_us {
                    histograms.record_wait(us);
                }
            }
            module.counts.transition(from, to);
            if to == TaskState::Completed
                && let Some(us) = run_us
            {
                module.run.record(us);
            }
            if let Some(job) = &c.event.job_id {
                if !inner.jobs.contains_key(job.as_str()) {
                    inner.jobs.insert(job.clone(), JobEntry::default());
                }
                let entry = inner.jobs.get_mut(job.as_str()).expect("just inserted");
                entry.counts.transition(from, to);
                if to.is_terminal() {
                    entry.first_finish.get_or_insert(c.event.at);
                    entry.last_finish = Some(c.event.at);
                }
                if to == TaskState::Completed
                    && let Some(us) = run_us
                {
                    entry.run.record(us);
                }
            }
        }
    }

    fn modules_stored(&self, modules: &[ModuleRecord]) {
        let mut inner = self.lock();
        for module in modules {
            if let Some(name) = &module.name {
                inner
                    .names
                    .insert(module.id.clone(), Arc::from(name.as_str()));
                // Its histograms are labelled anew with the name.
                if let Some(entry) = inner.modules.get_mut(&module.id) {
                    entry.histograms = None;
                }
            }
        }
    }
}

/// The counts of one tag, created on first sight (only then are its key
/// and value copied).
fn tag_counts<'a>(
    tags: &'a mut HashMap<String, HashMap<String, JobCounts>>,
    key: &str,
    value: &str,
) -> &'a mut JobCounts {
    if !tags.contains_key(key) {
        tags.insert(key.to_string(), HashMap::new());
    }
    let values = tags.get_mut(key).expect("just inserted");
    if !values.contains_key(value) {
        values.insert(value.to_string(), JobCounts::default());
    }
    values.get_mut(value).expect("just inserted")
}
