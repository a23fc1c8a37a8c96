//! Prometheus metrics (`GET /metrics`) through the `metrics` facade.
//! Histograms are recorded as events are committed; counts, depths and
//! cache figures are set from the live statistics at each scrape, so they
//! are always exact rather than drifting counters.

use super::Overview;
use crate::model::TaskState;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;

/// The process-wide recorder, installed on first use.
fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            // From 10 µs: a no-op task runs in about 10 µs and an option
            // pricing of 20,000 paths in about 150 µs, so buckets that began
            // at 1 ms put every task of this grid into the first one.
            .set_buckets(&[
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program;
        // then our handle renders only what this module sets.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Make sure the recorder exists before the first event is recorded, and
/// keep it bounded: the exporter holds every histogram sample recorded
/// since the last fold into buckets (a scrape folds them too), so a host
/// nobody scrapes grew by two samples per task run until this thread
/// folded them on a timer.
pub fn install() {
    static UPKEEP: OnceLock<()> = OnceLock::new();
    handle();
    UPKEEP.get_or_init(|| {
        let started = std::thread::Builder::new()
            .name("kwq-metrics-upkeep".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(UPKEEP_EVERY);
                    handle().run_upkeep();
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start folding metric samples; they are folded at each scrape only");
        }
    });
}

/// One module's histograms, looked up once (not per event: the label
/// lookup costs more than the recording, and the tracker records under its
/// lock). Labelled with the module's SHA-256 (`module`, stable) and its
/// name (`module_name`, what a dashboard legend shows; empty while this
/// host has not learnt it).
pub(super) struct ModuleHistograms {
    run: metrics::Histogram,
    wait: metrics::Histogram,
}

impl ModuleHistograms {
    /// The histograms of `module` known as `name`.
    pub(super) fn new(module: &str, name: &str) -> Self {
        ModuleHistograms {
            run: metrics::histogram!(
                "kwq_task_run_seconds",
                "module" => module.to_string(),
                "module_name" => name.to_string()
            ),
            wait: metrics::histogram!(
                "kwq_task_queue_wait_seconds",
                "module" => module.to_string(),
                "module_name" => name.to_string()
            ),
        }
    }

    /// A completed (or failed) attempt's run time.
    pub(super) fn record_run(&self, run_us: u64) {
        self.run.record(run_us as f64 / 1e6);
    }

    /// Time a task waited between becoming ready and being leased.
    pub(super) fn record_wait(&self, wait_us: u64) {
        self.wait.record(wait_us as f64 / 1e6);
    }
}

/// Everything known at scrape time, beyond the tracker's own statistics.
pub struct ScrapeInputs<'a> {
    /// Live statistics.
    pub overview: &'a Overview,
    /// Fraction of worker time spent running tasks, if this host has workers.
    pub busy_ratio: Option<f64>,
    /// Leases whose affinity key was warm on the worker.
    pub affinity_hits: u64,
    /// Compiled-module cache counters.
    pub cache: crate::runtime::ModuleStats,
    /// Sum over waiting tasks of their module's mean run time, seconds.
    pub outstanding_seconds: f64,
    /// What this host read from a Kafka grid's topics, if it is on one.
    pub kafka: Option<crate::queue::kafka::HostTraffic>,
}

/// Render the Prometheus text format.
pub fn render(inputs: ScrapeInputs<'_>) -> String {
    let handle = handle();
    let o = inputs.overview;
    for state in TaskState::ALL {
        metrics::gauge!("kwq_tasks", "state" => state.as_str()).set(o.counts.get(state) as f64);
    }
    for (priority, depth) in o.depth.iter().enumerate() {
        metrics::gauge!("kwq_queue_depth", "priority" => priority.to_string()).set(*depth as f64);
    }
    metrics::counter!("kwq_retries_total").absolute(o.retries);
    metrics::counter!("kwq_dead_letters_total").absolute(o.dead_letters);
    metrics::counter!("kwq_affinity_warm_hits_total").absolute(inputs.affinity_hits);
    metrics::counter!("kwq_module_cache_hits_total").absolute(inputs.cache.hits);
    metrics::counter!("kwq_module_cache_misses_total").absolute(inputs.cache.misses);
    metrics::counter!("kwq_module_cache_evictions_total").absolute(inputs.cache.evictions);
    metrics::gauge!("kwq_module_cache_bytes").set(inputs.cache.bytes as f64);
    metrics::gauge!("kwq_completed_per_second").set(o.completed_per_s);
    if let Some(ratio) = inputs.busy_ratio {
        metrics::gauge!("kwq_worker_busy_ratio").set(ratio);
    }
    metrics::gauge!("kwq_outstanding_estimated_seconds").set(inputs.outstanding_seconds);
    if let Some(traffic) = inputs.kafka {
        use crate::queue::kafka::TopicKind;
        for kind in TopicKind::ALL {
            let topic = kind.as_str();
            metrics::counter!("kwq_kafka_read_messages_total", "topic" => topic)
                .absolute(traffic.reads.messages_of(kind));
            metrics::counter!("kwq_kafka_read_bytes_total", "topic" => topic)
                .absolute(traffic.reads.bytes_of(kind));
        }
        metrics::counter!("kwq_kafka_task_runs_ended_total").absolute(traffic.finished);
        metrics::gauge!("kwq_kafka_expanding_jobs").set(traffic.expanding as f64);
        metrics::gauge!("kwq_kafka_held_waiters").set(traffic.held as f64);
        metrics::gauge!("kwq_kafka_task_partitions").set(traffic.task_partitions as f64);
        metrics::counter!("kwq_kafka_resent_records_total").absolute(traffic.resent_records);
        metrics::counter!("kwq_kafka_points_expanded_total").absolute(traffic.expanded);
    }
    handle.render()
}
