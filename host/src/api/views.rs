//! How records look on the wire: payloads and results inline as JSON when
//! they are JSON, base64 otherwise.

use crate::model::{Event, JobRecord, TaskRecord, TaskState};
use crate::tracker::JobStats;
use base64::Engine;
use serde_json::{Map, Value, json};

/// Bytes as `{"<name>": json}` or `{"<name>_base64": "..."}`.
pub(super) fn bytes_field(map: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(value) => {
            map.insert(name.into(), value);
        }
        Err(_) => {
            map.insert(
                format!("{name}_base64"),
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            );
        }
    }
}

/// A task as the API shows it; with `full`, payload, result and logs too.
pub(super) fn task(task: &TaskRecord, full: bool) -> Value {
    let mut value = serde_json::to_value(task).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        let timestamps: Map<String, Value> = task
            .timestamps
            .iter()
            .map(|(state, at)| (state.as_str().to_string(), json!(at)))
            .collect();
        map.insert("timestamps".into(), Value::Object(timestamps));
        if full {
            bytes_field(map, "payload", &task.payload);
            if let Some(result) = &task.result {
                bytes_field(map, "result", result);
            }
        } else {
            map.remove("logs");
        }
    }
    value
}

/// A job with its counts, progress and timings.
pub(super) fn job(job: &JobRecord, stats: &JobStats) -> Value {
    let mut counts = stats.counts;
    // Sweep points not created yet are Pending too.
    counts.0[TaskState::Pending.index()] += job.total.saturating_sub(job.expanded);
    let finished = counts.finished();
    let state = if job.cancelled {
        "Cancelled"
    } else if finished >= job.total {
        "Finished"
    } else if job.paused {
        "Paused"
    } else {
        "Active"
    };
    json!({
        "id": job.id,
        "name": job.name,
        "module": job.module,
        "state": state,
        "total": job.total,
        "expanded": job.expanded,
        "paused": job.paused,
        "cancelled": job.cancelled,
        "created_at": job.created_at,
        "options": job.options,
        "sweep": job.sweep,
        "counts": counts.by_name(),
        "finished": finished,
        "progress": if job.total == 0 { 1.0 } else { finished as f64 / job.total as f64 },
        "throughput_per_s": stats.throughput_per_s,
        "mean_run_us": stats.mean_run_us,
        "p95_run_us": stats.p95_run_us,
    })
}

/// An event as JSON.
pub(super) fn event(event: &Event) -> Value {
    serde_json::to_value(event).unwrap_or(Value::Null)
}

/// An event as one line of JSON (what the event stream sends).
pub(super) fn event_json(event: &Event) -> String {
    serde_json::to_string(event).unwrap_or_else(|_| "null".into())
}
