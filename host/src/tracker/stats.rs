//! Statistic building blocks: run-time histograms and a throughput ring.

use crate::model::JobCounts;
use hdrhistogram::Histogram;
use serde::Serialize;

/// Run times in microseconds (1 µs .. 1 day, 3 significant digits): tasks
/// of this grid often take microseconds, so milliseconds would round most
/// of them to 0 or 1.
pub struct RunTimes(Histogram<u64>);

impl Default for RunTimes {
    fn default() -> Self {
        RunTimes(Histogram::new_with_bounds(1, 86_400_000_000, 3).expect("valid histogram bounds"))
    }
}

/// Mean and quantiles of a [`RunTimes`].
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RunSummary {
    /// Samples.
    pub count: u64,
    /// Mean run time, µs.
    pub mean_us: f64,
    /// 95th percentile, µs.
    pub p95_us: u64,
}

impl RunTimes {
    /// Add one run time, µs.
    pub fn record(&mut self, us: u64) {
        self.0.saturating_record(us.max(1));
    }

    /// Add `count` run times of `us` each.
    pub fn record_n(&mut self, us: u64, count: u64) {
        self.0.saturating_record_n(us.max(1), count);
    }

    /// Mean, µs (0 when empty).
    pub fn mean(&self) -> f64 {
        if self.0.is_empty() {
            0.0
        } else {
            self.0.mean()
        }
    }

    /// Quantile, µs (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            0
        } else {
            self.0.value_at_quantile(q)
        }
    }

    /// Count, mean, p95.
    pub fn summary(&self) -> RunSummary {
        RunSummary {
            count: self.0.len(),
            mean_us: self.mean(),
            p95_us: self.quantile(0.95),
        }
    }
}

/// Counts and timings of one job.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct JobStats {
    /// Tasks per state.
    pub counts: JobCounts,
    /// Finished tasks per second between the first and the latest finish.
    pub throughput_per_s: f64,
    /// Mean run time of completed tasks, µs.
    pub mean_run_us: f64,
    /// 95th percentile run time, µs.
    pub p95_run_us: u64,
}

/// One tag's counts per state.
#[derive(Debug, Clone, Serialize)]
pub struct TagCounts {
    /// `key=value`.
    pub tag: String,
    /// Tasks per state.
    pub counts: JobCounts,
}

/// The whole grid at a glance.
#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    /// Tasks per state.
    pub counts: JobCounts,
    /// Waiting tasks per priority 0..=9.
    pub depth: [u64; 10],
    /// Completions per second over the last 10 s.
    pub completed_per_s: f64,
    /// Failures (errors and dead letters) per second over the last 10 s.
    pub failed_per_s: f64,
    /// (completed, failed) per second for the last 120 s, oldest first.
    pub history: Vec<(u64, u64)>,
    /// Attempts that failed and were retried.
    pub retries: u64,
    /// Tasks parked as Dead.
    pub dead_letters: u64,
    /// Counts per tag.
    pub tags: Vec<TagCounts>,
    /// Run times per module id.
    pub modules: Vec<(String, RunSummary)>,
}

const RING: usize = 300;

/// Completions and failures per second for the last five minutes.
pub(super) struct Throughput {
    seconds: [u64; RING],
    completed: [u64; RING],
    failed: [u64; RING],
}

impl Default for Throughput {
    fn default() -> Self {
        Throughput {
            seconds: [0; RING],
            completed: [0; RING],
            failed: [0; RING],
        }
    }
}

impl Throughput {
    fn slot(&mut self, second: u64) -> usize {
        let i = (second % RING as u64) as usize;
        if self.seconds[i] != second {
            self.seconds[i] = second;
            self.completed[i] = 0;
            self.failed[i] = 0;
        }
        i
    }

    pub(super) fn add(&mut self, now_ms: u64, completed: bool) {
        let i = self.slot(now_ms / 1000);
        if completed {
            self.completed[i] += 1
        } else {
            self.failed[i] += 1
        }
    }

    fn at(&self, second: u64) -> (u64, u64) {
        let i = (second % RING as u64) as usize;
        if self.seconds[i] == second {
            (self.completed[i], self.failed[i])
        } else {
            (0, 0)
        }
    }

    /// Mean per second over the last `window` whole seconds.
    pub(super) fn rate(&self, now_ms: u64, window: u64, completed: bool) -> f64 {
        let now = now_ms / 1000;
        let sum: u64 = (1..=window)
            .map(|back| self.at(now - back))
            .map(|(c, f)| if completed { c } else { f })
            .sum();
        sum as f64 / window as f64
    }

    /// Per-second (completed, failed) for the last `seconds`, oldest first.
    pub(super) fn history(&self, now_ms: u64, seconds: u64) -> Vec<(u64, u64)> {
        let now = now_ms / 1000;
        (0..seconds).rev().map(|back| self.at(now - back)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_counts_per_second_and_forgets_old_seconds() {
        let mut t = Throughput::default();
        for ms in [10_000, 10_500, 11_000] {
            t.add(ms, true);
        }
        t.add(11_200, false);
        assert_eq!(t.history(12_000, 3), vec![(2, 0), (1, 1), (0, 0)]);
        assert_eq!(t.rate(12_000, 2, true), 1.5);
        t.add(10_000 + RING as u64 * 1000, true);
        assert_eq!(t.at(10), (0, 0));
    }

    #[test]
    fn run_times_give_mean_and_p95() {
        let mut r = RunTimes::default();
        for us in 1..=100 {
            r.record(us);
        }
        assert_eq!(r.quantile(0.95), 95);
        assert!((r.mean() - 50.5).abs() < 0.1);
    }

    #[test]
    fn sub_millisecond_run_times_keep_their_resolution() {
        let mut r = RunTimes::default();
        for us in [120, 150, 180] {
            r.record(us);
        }
        // Three significant digits at every scale: 150 µs reads as 150, not 0 or 1 ms.
        assert!((r.mean() - 150.0).abs() < 1.0, "mean {}", r.mean());
        assert_eq!(r.quantile(0.95), 180);
        // A day is still in range.
        r.record(86_400_000_000);
        assert!(r.quantile(1.0) >= 86_300_000_000);
    }
}
