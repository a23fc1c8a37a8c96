//! What each worker is doing right now: for status pages and statistics.

use crate::model::{ModuleId, TaskId, now_ms};
use crate::queue::Lease;
use crate::runtime::WorkerStats;
use serde::Serialize;
use std::sync::Mutex;

/// One worker's current state.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// Worker id.
    pub id: String,
    /// Task it is running, if any.
    pub task: Option<TaskId>,
    /// That task's module.
    pub module: Option<ModuleId>,
    /// When it started the task.
    pub since: Option<u64>,
    /// The task's latest progress.
    pub progress: f32,
    /// (module, affinity key) pairs warm on it.
    pub warm: Vec<(ModuleId, String)>,
    /// Runtime counters (tasks, warm hits, inits...).
    pub stats: WorkerStats,
    /// Milliseconds spent running tasks.
    pub busy_ms: u64,
    /// Tasks leased whose affinity key was warm here.
    pub affinity_hits: u64,
}

/// Every worker's status.
pub struct WorkerBoard {
    started: u64,
    workers: Mutex<Vec<WorkerStatus>>,
}

impl WorkerBoard {
    pub(super) fn new(count: usize, host: &str) -> Self {
        let workers = (0..count)
            .map(|i| WorkerStatus {
                id: format!("{host}/w{i}"),
                task: None,
                module: None,
                since: None,
                progress: 0.0,
                warm: Vec::new(),
                stats: WorkerStats::default(),
                busy_ms: 0,
                affinity_hits: 0,
            })
            .collect();
        WorkerBoard {
            started: now_ms(),
            workers: Mutex::new(workers),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<WorkerStatus>> {
        self.workers.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn id(&self, index: usize) -> String {
        self.lock()[index].id.clone()
    }

    pub(super) fn begin(&self, index: usize, lease: &Lease) {
        let mut workers = self.lock();
        let w = &mut workers[index];
        w.task = Some(lease.task_id.clone());
        w.module = Some(lease.module.clone());
        w.since = Some(now_ms());
        w.progress = 0.0;
        if lease.warm_hit {
            w.affinity_hits += 1;
        }
    }

    pub(super) fn progress(&self, index: usize, fraction: f32) {
        self.lock()[index].progress = fraction;
    }

    pub(super) fn end(&self, index: usize, warm: Vec<(ModuleId, String)>, stats: WorkerStats) {
        let mut workers = self.lock();
        let w = &mut workers[index];
        if let Some(since) = w.since.take() {
            w.busy_ms += now_ms().saturating_sub(since);
        }
        w.task = None;
        w.module = None;
        w.warm = warm;
        w.stats = stats;
    }

    /// Every worker, in order.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        self.lock().clone()
    }

    /// Live progress of a running task, if a worker here runs it.
    pub fn progress_of(&self, task: &str) -> Option<f32> {
        self.lock()
            .iter()
            .find(|w| w.task.as_deref() == Some(task))
            .map(|w| w.progress)
    }

    /// Fraction of worker time spent running tasks since start.
    pub fn busy_ratio(&self) -> f64 {
        let workers = self.lock();
        let now = now_ms();
        let elapsed = now.saturating_sub(self.started).max(1) * workers.len().max(1) as u64;
        let busy: u64 = workers
            .iter()
            .map(|w| w.busy_ms + w.since.map_or(0, |s| now.saturating_sub(s)))
            .sum();
        busy as f64 / elapsed as f64
    }
}
