//! How records look on the wire: payloads and results inline as JSON when
//! they are JSON, base64 otherwise.

use super::wire::{JobView, TaskView};
use crate::model::{Event, JobRecord, TaskRecord, TaskState};
use crate::tracker::JobStats;

pub(super) use crate::model::json_or_base64;

/// A task as a listing shows it: its record without logs.
pub(super) fn task_summary(task: TaskRecord) -> TaskView {
    TaskView {
        record: TaskRecord {
            logs: Vec::new(),
            ..task
        },
        payload: None,
        payload_base64: None,
        result: None,
        result_base64: None,
        timeline: None,
    }
}

/// A finished task as a synchronous invocation answers it: the detail
/// without the timeline (one store read fewer on the fast path).
pub(super) fn task_outcome(task: TaskRecord) -> TaskView {
    TaskView {
        timeline: None,
        ..task_detail(task, Vec::new())
    }
}

/// A task with its payload, result, logs and timeline.
pub(super) fn task_detail(task: TaskRecord, timeline: Vec<Event>) -> TaskView {
    let (payload, payload_base64) = json_or_base64(&task.payload);
    let (result, result_base64) = match &task.result {
        Some(bytes) => json_or_base64(bytes),
        None => (None, None),
    };
    TaskView {
        record: task,
        payload,
        payload_base64,
        result,
        result_base64,
        timeline: Some(timeline),
    }
}

/// A job with its counts, progress and timings.
pub(super) fn job(job: &JobRecord, stats: &JobStats) -> JobView {
    let mut counts = stats.counts;
    // Sweep points not created yet wait as Pending, or, once the job is
    // cancelled, will never run: Cancelled (without a row each).
    let unexpanded = if job.cancelled {
        TaskState::Cancelled
    } else if job.waiting {
        TaskState::Waiting
    } else {
        TaskState::Pending
    };
    // On Kafka a point's row can come (with an event of its run) before
    // the `expanded` message that covers it: rows count as expanded too.
    let rows: u64 = counts.0.iter().sum();
    counts.add(unexpanded, job.total.saturating_sub(job.expanded.max(rows)));
    let finished = counts.finished();
    let state = if job.cancelled {
        "Cancelled"
    } else if finished >= job.total {
        "Finished"
    } else if job.paused {
        "Paused"
    } else if job.waiting {
        "Waiting"
    } else {
        "Active"
    };
    JobView {
        id: job.id.clone(),
        name: job.name.clone(),
        module: job.module.clone(),
        state: state.to_string(),
        total: job.total,
        expanded: job.expanded,
        paused: job.paused,
        cancelled: job.cancelled,
        cancel_reason: job.cancel_reason.clone(),
        created_at: job.created_at,
        options: job.options.clone(),
        sweep: job.sweep.clone(),
        counts: counts
            .by_name()
            .into_iter()
            .map(|(name, n)| (name.to_string(), n))
            .collect(),
        finished,
        progress: if job.total == 0 {
            1.0
        } else {
            finished as f64 / job.total as f64
        },
        throughput_per_s: stats.throughput_per_s,
        mean_run_us: stats.mean_run_us,
        p95_run_us: stats.p95_run_us,
    }
}

/// An event as one line of JSON (what the event stream sends).
pub(super) fn event_json(event: &Event) -> String {
    serde_json::to_string(event).unwrap_or_else(|_| "null".into())
}
