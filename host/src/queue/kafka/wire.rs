//! The messages KWQ writes to and reads from Kafka. Their JSON schemas are
//! in `docs/wire-format.md`; a producer in any language that writes a
//! [`TaskMessage`] to a priority topic gets its task run.
//!
//! Every message is JSON with a version `"v"`: task messages and module
//! chunks are version 1 (unchanged since the first grid); event messages are
//! version 2, which added the `tasks` batch (many transitions in one
//! message) and Allocated carried on Running. Readers take events of either
//! version and ignore fields they do not know, so adding an optional field
//! is not a new version.

use crate::model::{
    ErrorKind, JobRecord, LogLine, Millis, ModuleKind, OnFailure, TaskOptions, TaskState,
};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The version of task messages and module chunks this build writes and reads.
pub const WIRE_VERSION: u32 = 1;

/// The version of event messages this build writes; it reads this one and
/// [`WIRE_VERSION`] (a v1 host's events).
pub const EVENT_VERSION: u32 = 2;

/// The version of the event messages of lazily expanded sweeps: a `job`
/// announcement whose `expanded` is below its `total` (its tasks are
/// written as the job drains) and the `expanded` messages that follow it.
/// A v2 reader would make every point's row at once, so these are v3,
/// which it refuses; every other event message stays v2.
pub const EXPANSION_VERSION: u32 = 3;

/// Largest batch of task events in one message (their JSON): under Kafka's
/// default 1 MB message limit with room for the envelope. An event bigger
/// than this (a result near [`super::MAX_RESULT_BYTES`]) goes alone.
pub const MAX_BATCH_BYTES: usize = 900 * 1024;

/// Raw module bytes per chunk on the modules topic: base64 makes a chunk
/// about 700 KB, under Kafka's default 1 MB message limit.
pub const MODULE_CHUNK_BYTES: usize = 512 * 1024;

fn version() -> u32 {
    WIRE_VERSION
}

fn event_version() -> u32 {
    EVENT_VERSION
}

fn expansion_version() -> u32 {
    EXPANSION_VERSION
}

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Not JSON, or not the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// A version this build does not read.
    #[error(
        "unsupported wire version {0} (this build reads {WIRE_VERSION}, and up to {EXPANSION_VERSION} for events)"
    )]
    Version(u32),
    /// A field's value is not allowed.
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// A task to run, on `<prefix>tasks.p<priority>`, keyed by its affinity key
/// (so same-key tasks share a partition and meet the same warm host) or, with
/// none, by its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskMessage {
    /// Wire version.
    #[serde(default = "version")]
    pub v: u32,
    /// Task id. A foreign producer may leave it out: the consuming host then
    /// names the task after its position (`k-<topic>-<partition>-<offset>`), so
    /// a replay of the same message is the same task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The job it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Module id (64 hex digits) or name.
    pub module: String,
    /// Input as JSON (serialised as the task's payload bytes)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
    /// ...or as raw bytes, base64; wins over `payload`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload_base64: Option<String>,
    /// Priority; defaults to the topic's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Warm-instance key (also the message key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// Wall-clock limit per attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Linear-memory cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Attempts allowed in all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Attempts already made (a retry carries the count so far).
    #[serde(default)]
    pub attempts: u32,
    /// Not to start before this time (retries carry their back-off here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Millis>,
    /// When first submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<Millis>,
    /// On the dead-letter topic only: why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// On the dead-letter topic only: the failure's message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TaskMessage {
    /// Read one from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let message: TaskMessage = serde_json::from_slice(bytes)?;
        if message.v != WIRE_VERSION {
            return Err(WireError::Version(message.v));
        }
        if message.priority.is_some_and(|p| p > 9) {
            return Err(WireError::Invalid("priority must be 0..=9".into()));
        }
        if message.module.is_empty() {
            return Err(WireError::Invalid("module is empty".into()));
        }
        Ok(message)
    }

    /// The task's input bytes.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, WireError> {
        if let Some(b64) = &self.payload_base64 {
            return BASE64
                .decode(b64)
                .map_err(|e| WireError::Invalid(format!("payload_base64: {e}")));
        }
        Ok(match &self.payload {
            Some(value) => serde_json::to_vec(value)?,
            None => Vec::new(),
        })
    }

    /// The task's options, with KWQ's defaults for what the message leaves out.
    pub fn options(&self, topic_priority: u8) -> TaskOptions {
        let defaults = TaskOptions::default();
        TaskOptions {
            priority: self.priority.unwrap_or(topic_priority),
            tags: self.tags.clone(),
            affinity: self.affinity.clone(),
            timeout_ms: self.timeout_ms.unwrap_or(defaults.timeout_ms),
            memory_bytes: self.memory_bytes.unwrap_or(defaults.memory_bytes),
            max_attempts: self.max_attempts.unwrap_or(defaults.max_attempts).max(1),
            not_before: self.not_before,
            // A grid on Kafka refuses dependencies (see `KafkaQueue`).
            ..defaults
        }
    }

    /// The message for a task KWQ submits itself.
    pub fn new(
        id: &str,
        job_id: Option<&str>,
        module: &str,
        payload: &[u8],
        options: &TaskOptions,
    ) -> Self {
        TaskMessage {
            v: WIRE_VERSION,
            id: Some(id.to_string()),
            job_id: job_id.map(str::to_string),
            module: module.to_string(),
            payload: None,
            payload_base64: Some(BASE64.encode(payload)),
            priority: Some(options.priority),
            tags: options.tags.clone(),
            affinity: options.affinity.clone(),
            timeout_ms: Some(options.timeout_ms),
            memory_bytes: Some(options.memory_bytes),
            max_attempts: Some(options.max_attempts),
            attempts: 0,
            not_before: options.not_before,
            submitted_at: Some(crate::model::now_ms()),
            error_kind: None,
            error: None,
        }
    }

    /// The message key: the affinity key, else the task id.
    pub fn key(&self) -> Option<&str> {
        self.affinity.as_deref().or(self.id.as_deref())
    }
}

/// What the event topic `<prefix>events` carries: task transitions (keyed by
/// task id, so one task's events stay in order), job announcements and
/// controls (keyed by job id), task controls.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum EventMessage {
    /// A task entered a state (one transition per message, as v1 hosts write).
    Task(TaskEvent),
    /// Several transitions in one message (v2): what a host's publisher
    /// gathered while its previous batch was being delivered. Cuts the
    /// broker's messages per task from three events to a fraction of one.
    Tasks {
        /// Wire version.
        #[serde(default = "event_version")]
        v: u32,
        /// `<host>/<process instance>`: a host skips the batches it wrote
        /// itself in this process, which it applied when it wrote them.
        source: String,
        /// The transitions, in the order they happened on that host.
        events: Vec<TaskEvent>,
    },
    /// A job was submitted: its tasks are `<job>.<index>` for index < total.
    Job {
        /// Wire version.
        #[serde(default = "version")]
        v: u32,
        /// The job.
        job: JobRecord,
    },
    /// A job was paused, resumed, cancelled or given a new priority.
    JobControl {
        /// Wire version.
        #[serde(default = "version")]
        v: u32,
        /// The job.
        job: String,
        /// Now paused.
        paused: bool,
        /// Now cancelled.
        cancelled: bool,
        /// The job's new priority, for its unfinished tasks (absent: unchanged).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<u8>,
        /// Why the grid cancelled it (`dependency_failed: <id>`); absent
        /// for a user's cancel and for every other control.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Points `from..to` of a sweep job were written to its band (v3): a
    /// view makes their Pending rows. Written by the job's expander after
    /// the points are durable; written again (same range) by a successor
    /// that confirmed them after the expander's host died.
    Expanded {
        /// Wire version.
        #[serde(default = "expansion_version")]
        v: u32,
        /// The job.
        job: String,
        /// First point written.
        from: u64,
        /// One past the last point written.
        to: u64,
    },
    /// A user cancelled a task or changed its priority: the host holding it acts.
    TaskControl {
        /// Wire version.
        #[serde(default = "version")]
        v: u32,
        /// The task.
        task: String,
        /// Cancel it.
        #[serde(default)]
        cancel: bool,
        /// New priority.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        priority: Option<u8>,
    },
    /// A task or job that some waiter names in its `after` has ended, on the
    /// control topic keyed `done/<id>`: written by the hosts with a view
    /// (which see every final event), read by every host, so whichever owns
    /// a waiter's held [`ExpandCursor`] can release or cancel it. Written
    /// again harmlessly by several hosts and after restarts.
    Ended {
        /// Wire version.
        #[serde(default = "event_version")]
        v: u32,
        /// The task or job.
        id: String,
        /// It Completed (a job: every task of it); else it ended Dead or Cancelled.
        completed: bool,
    },
}

impl EventMessage {
    /// Read one from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let message: EventMessage = serde_json::from_slice(bytes)?;
        // v3 is only the lazily expanded sweep's messages.
        let (v, reads) = match &message {
            EventMessage::Task(t) => (t.v, reads_event(t.v)),
            EventMessage::Tasks { v, events, .. } => {
                if let Some(bad) = events.iter().find(|e| !reads_event(e.v)) {
                    return Err(WireError::Version(bad.v));
                }
                (*v, reads_event(*v))
            }
            EventMessage::Job { v, .. } => (*v, reads_event(*v) || *v == EXPANSION_VERSION),
            EventMessage::Expanded { v, .. } => (*v, *v == EXPANSION_VERSION),
            EventMessage::JobControl { v, .. }
            | EventMessage::TaskControl { v, .. }
            | EventMessage::Ended { v, .. } => (*v, reads_event(*v)),
        };
        if !reads {
            return Err(WireError::Version(v));
        }
        Ok(message)
    }

    /// As JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The message key.
    pub fn key(&self) -> &str {
        match self {
            EventMessage::Task(t) => &t.task_id,
            EventMessage::Tasks { source, .. } => source,
            EventMessage::Job { job, .. } => &job.id,
            EventMessage::JobControl { job, .. } => job,
            EventMessage::Expanded { job, .. } => job,
            EventMessage::TaskControl { task, .. } => task,
            EventMessage::Ended { id, .. } => id,
        }
    }
}

/// Whether this build reads an event message of version `v` (v3 only
/// for the sweep messages, see [`EventMessage::decode`]).
fn reads_event(v: u32) -> bool {
    v == WIRE_VERSION || v == EVENT_VERSION
}

/// The `tasks` batch messages carrying `events`, as JSON: each at most
/// [`MAX_BATCH_BYTES`] of events (an event bigger than that alone). Built
/// from each event's own encoding, so nothing is serialised twice.
pub fn encode_batches(source: &str, events: &[TaskEvent]) -> Vec<Vec<u8>> {
    let head = format!(
        r#"{{"type":"tasks","v":{EVENT_VERSION},"source":{},"events":["#,
        serde_json::Value::String(source.to_string())
    );
    let mut messages = Vec::new();
    let mut current = head.clone().into_bytes();
    let mut count = 0;
    for event in events {
        let encoded = serde_json::to_vec(event).unwrap_or_default();
        if count > 0 && current.len() + encoded.len() > MAX_BATCH_BYTES {
            current.extend_from_slice(b"]}");
            messages.push(std::mem::replace(&mut current, head.clone().into_bytes()));
            count = 0;
        }
        if count > 0 {
            current.push(b',');
        }
        current.extend_from_slice(&encoded);
        count += 1;
    }
    if count > 0 {
        current.extend_from_slice(b"]}");
        messages.push(current);
    }
    messages
}

/// One task transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Wire version (1 when left out, as the first hosts wrote it).
    #[serde(default = "version")]
    pub v: u32,
    /// The task.
    pub task_id: String,
    /// Its job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The state entered.
    pub state: TaskState,
    /// Attempt number (0 before the first lease).
    pub attempt: u32,
    /// Worker (`host/worker`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When it happened.
    pub at: Millis,
    /// For Error and Dead: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<ErrorKind>,
    /// For Error and Dead: the message; otherwise a note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// For Completed: the result, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result_base64: Option<String>,
    /// Guest log lines of the attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Vec<LogLine>>,
    /// Last progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<f32>,
    /// For Error: when the retry may start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<Millis>,
    /// Run time of the attempt, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_us: Option<u64>,
    /// Time queued before this lease, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_us: Option<u64>,
    /// On Running (v2): when the task was Allocated to its worker. Kafka
    /// hosts write no Allocated event; a view records the Allocated
    /// transition from this field, so a task's timeline is as on any host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated_at: Option<Millis>,
    /// Run time in ms, as hosts before the µs fields wrote it: read, never written.
    #[serde(default, skip_serializing)]
    pub run_ms: Option<u64>,
    /// Queue wait in ms, as hosts before the µs fields wrote it: read, never written.
    #[serde(default, skip_serializing)]
    pub wait_ms: Option<u64>,
    /// On Pending, Allocated and (v2) an event carrying `allocated_at`: the
    /// task's module and options, so a host that never saw it submitted (a
    /// foreign producer's task, or a job's whose job message it has not read
    /// yet) can show it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// See `module`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<TaskOptions>,
}

impl TaskEvent {
    /// A bare transition; callers fill in what the state carries.
    pub fn new(task_id: &str, job_id: Option<&str>, state: TaskState, attempt: u32) -> Self {
        TaskEvent {
            v: EVENT_VERSION,
            task_id: task_id.to_string(),
            job_id: job_id.map(str::to_string),
            state,
            attempt,
            worker: None,
            at: crate::model::now_ms(),
            error_kind: None,
            message: None,
            result_base64: None,
            logs: None,
            progress: None,
            not_before: None,
            run_us: None,
            wait_us: None,
            allocated_at: None,
            run_ms: None,
            wait_ms: None,
            module: None,
            options: None,
        }
    }

    /// Run time in µs, from this event or (older hosts) its ms field.
    pub fn run_us(&self) -> Option<u64> {
        self.run_us.or(self.run_ms.map(|ms| ms * 1000))
    }

    /// Queue wait in µs, from this event or (older hosts) its ms field.
    pub fn wait_us(&self) -> Option<u64> {
        self.wait_us.or(self.wait_ms.map(|ms| ms * 1000))
    }

    /// The result bytes of a Completed event.
    pub fn result(&self) -> Option<Vec<u8>> {
        self.result_base64
            .as_ref()
            .and_then(|b| BASE64.decode(b).ok())
    }

    /// Attach a result.
    pub fn with_result(mut self, result: &[u8]) -> Self {
        self.result_base64 = Some(BASE64.encode(result));
        self
    }
}

/// One chunk of a module on the compacted `<prefix>modules` topic, keyed
/// `<sha256>/<index>` so compaction keeps every chunk of every module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleChunk {
    /// Wire version.
    #[serde(default = "version")]
    pub v: u32,
    /// SHA-256 of the whole module (hex).
    pub id: String,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Component or WASI command.
    pub kind: ModuleKind,
    /// Size of the whole module.
    pub size: u64,
    /// When uploaded.
    pub created_at: Millis,
    /// This chunk's position, from 0.
    pub index: u32,
    /// Chunks in all.
    pub count: u32,
    /// This chunk's bytes, base64.
    pub data_base64: String,
}

impl ModuleChunk {
    /// Split a module into chunks.
    pub fn split(
        id: &str,
        name: Option<&str>,
        kind: ModuleKind,
        created_at: Millis,
        bytes: &[u8],
    ) -> Vec<ModuleChunk> {
        let chunks: Vec<&[u8]> = if bytes.is_empty() {
            vec![&[]]
        } else {
            bytes.chunks(MODULE_CHUNK_BYTES).collect()
        };
        let count = chunks.len() as u32;
        chunks
            .into_iter()
            .enumerate()
            .map(|(index, data)| ModuleChunk {
                v: WIRE_VERSION,
                id: id.to_string(),
                name: name.map(str::to_string),
                kind,
                size: bytes.len() as u64,
                created_at,
                index: index as u32,
                count,
                data_base64: BASE64.encode(data),
            })
            .collect()
    }

    /// Read one from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let chunk: ModuleChunk = serde_json::from_slice(bytes)?;
        if chunk.v != WIRE_VERSION {
            return Err(WireError::Version(chunk.v));
        }
        if chunk.count == 0 || chunk.index >= chunk.count {
            return Err(WireError::Invalid(format!(
                "chunk {} of {}",
                chunk.index, chunk.count
            )));
        }
        Ok(chunk)
    }

    /// The message key.
    pub fn key(&self) -> String {
        format!("{}/{}", self.id, self.index)
    }

    /// This chunk's bytes.
    pub fn data(&self) -> Result<Vec<u8>, WireError> {
        BASE64
            .decode(&self.data_base64)
            .map_err(|e| WireError::Invalid(format!("data_base64: {e}")))
    }
}

/// Where a sweep job's expansion stands, on the compacted `<prefix>expand`
/// topic keyed by the job's id (v1). The host that owns the job's
/// partition of that topic (in the expanders' consumer group) writes the
/// job's points as the job drains and, after each chunk is durable, a new
/// cursor. A host that takes the partition over after a death reads the
/// cursor, then every band message from `scan` on, to learn which points
/// past `next` the dead host had written, and writes only the missing ones:
/// no point is lost or written twice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpandCursor {
    /// Wire version.
    #[serde(default = "version")]
    pub v: u32,
    /// The job (its module, options and sweep); absent once `done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobRecord>,
    /// Every point below this is durable on a band topic.
    pub next: u64,
    /// Band positions at or after which any point from `next` on was
    /// written (no earlier: each was read when nothing past `next` had been
    /// sent yet).
    #[serde(default)]
    pub scan: Vec<ScanFrom>,
    /// Every point is written, or the job was cancelled: nothing to do.
    #[serde(default)]
    pub done: bool,
    /// A payload stream's job (v2): where to read its payloads from, the
    /// payload chunk holding point `next` or one before it. Absent for a sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payloads: Option<PayloadsAt>,
    /// Held (v3): the job or task waits for the ids of its `after`, and its
    /// owner writes nothing of it until each has an
    /// [`EventMessage::Ended`] on the control topic.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held: bool,
    /// What the waiter waits for (v3; kept after release, for the record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// What a dependency that did not complete does to it (v3).
    #[serde(default, skip_serializing_if = "OnFailure::is_cancel")]
    pub on_failure: OnFailure,
    /// A lone task that waits (v3), keyed by its id: its message, written
    /// to its band when released. Absent for a job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskMessage>,
}

/// The version of an [`ExpandCursor`] that holds a waiter (a job or lone
/// task with `after`): a host that reads only v1 and v2 cursors skips it
/// rather than expand a job before its dependencies have ended.
pub const HELD_CURSOR_VERSION: u32 = 3;

/// The version of an [`ExpandCursor`] of a payload stream: a host that
/// reads only v1 cursors skips it rather than expand it as a sweep.
pub const STREAM_CURSOR_VERSION: u32 = 2;

/// A position on the `<prefix>payloads` topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadsAt {
    /// Partition (every chunk of a job is on one, keyed by its id).
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Up to [`PAYLOAD_CHUNK_COUNT`] consecutive payloads of one streamed job
/// (`POST /v1/jobs/stream`) on the `<prefix>payloads` topic, keyed by the
/// job's id, written in order before the job is announced. The expander
/// reads them as the job drains and writes each payload's task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayloadChunk {
    /// Wire version.
    #[serde(default = "version")]
    pub v: u32,
    /// The job.
    pub job: String,
    /// Index (task `<job>.<index>`) of the first payload here.
    pub first: u64,
    /// The payloads, each a JSON text (an NDJSON line as sent).
    pub payloads: Vec<String>,
}

/// Payloads in one [`PayloadChunk`] at most (an expander's chunk of tasks).
pub const PAYLOAD_CHUNK_COUNT: usize = 2048;

/// Payload bytes in one [`PayloadChunk`] at most (it may hold one larger
/// payload alone), well under Kafka's 1 MB message limit.
pub const PAYLOAD_CHUNK_BYTES: usize = 512 * 1024;

impl PayloadChunk {
    /// Read one from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let chunk: PayloadChunk = serde_json::from_slice(bytes)?;
        if chunk.v != WIRE_VERSION {
            return Err(WireError::Version(chunk.v));
        }
        Ok(chunk)
    }

    /// As JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Whether point `index` is in this chunk.
    pub fn holds(&self, index: u64) -> bool {
        index >= self.first && index < self.first + self.payloads.len() as u64
    }
}

/// One band partition's position in an [`ExpandCursor`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanFrom {
    /// Band topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

impl ExpandCursor {
    /// A cursor of `job` at point `next`, its version chosen by what it
    /// carries: v2 ([`STREAM_CURSOR_VERSION`]) when it names a stream's
    /// payloads, so a host that reads only v1 cursors skips it rather than
    /// expand it as a sweep without payloads; v1 otherwise.
    pub fn new(
        job: JobRecord,
        next: u64,
        scan: Vec<ScanFrom>,
        done: bool,
        payloads: Option<PayloadsAt>,
    ) -> Self {
        let v = if payloads.is_some() {
            STREAM_CURSOR_VERSION
        } else {
            WIRE_VERSION
        };
        ExpandCursor {
            v,
            job: Some(job),
            next,
            scan,
            done,
            payloads,
            held: false,
            after: Vec::new(),
            on_failure: OnFailure::Cancel,
            task: None,
        }
    }

    /// This cursor as a waiter's: it names `after` (v3), and is `held`
    /// until they have ended.
    pub fn waiting(mut self, held: bool, after: Vec<String>, on_failure: OnFailure) -> Self {
        self.v = HELD_CURSOR_VERSION;
        self.held = held;
        self.after = after;
        self.on_failure = on_failure;
        self
    }

    /// The cursor of a lone task that waits for `after`: written when it is
    /// submitted (held), when it is being released (not held, `scan` the
    /// band's end before its message is written) and `done`.
    pub fn task(
        message: TaskMessage,
        held: bool,
        scan: Vec<ScanFrom>,
        done: bool,
        after: Vec<String>,
        on_failure: OnFailure,
    ) -> Self {
        ExpandCursor {
            v: HELD_CURSOR_VERSION,
            job: None,
            next: 0,
            scan,
            done,
            payloads: None,
            held,
            after,
            on_failure,
            task: Some(message),
        }
    }

    /// Read one from JSON bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let cursor: ExpandCursor = serde_json::from_slice(bytes)?;
        if ![WIRE_VERSION, STREAM_CURSOR_VERSION, HELD_CURSOR_VERSION].contains(&cursor.v) {
            return Err(WireError::Version(cursor.v));
        }
        if cursor.v == STREAM_CURSOR_VERSION && cursor.payloads.is_none() {
            return Err(WireError::Invalid(
                "a stream's cursor (v2) names its payloads".into(),
            ));
        }
        if cursor.v == WIRE_VERSION && cursor.payloads.is_some() {
            return Err(WireError::Invalid(
                "only a stream's cursor (v2, or v3 held) names payloads".into(),
            ));
        }
        if cursor.v != HELD_CURSOR_VERSION && (cursor.held || cursor.task.is_some()) {
            return Err(WireError::Invalid("only a v3 cursor holds a waiter".into()));
        }
        if cursor.task.is_some() && (cursor.job.is_some() || cursor.payloads.is_some()) {
            return Err(WireError::Invalid(
                "a cursor holds a task or a job, not both".into(),
            ));
        }
        if !cursor.done && cursor.job.is_none() && cursor.task.is_none() {
            return Err(WireError::Invalid(
                "a cursor not done needs its job or task".into(),
            ));
        }
        Ok(cursor)
    }

    /// As JSON bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_foreign_task_message_reads_with_defaults() {
        let m = TaskMessage::decode(br#"{"v":1,"module":"noop","payload":{"x":1}}"#).unwrap();
        assert_eq!(m.payload_bytes().unwrap(), br#"{"x":1}"#);
        let options = m.options(7);
        assert_eq!(options.priority, 7);
        assert_eq!(options.max_attempts, TaskOptions::default().max_attempts);
        assert!(TaskMessage::decode(br#"{"v":2,"module":"noop"}"#).is_err());
        assert!(TaskMessage::decode(br#"{"v":1,"module":"noop","priority":12}"#).is_err());
        assert!(TaskMessage::decode(b"not json").is_err());
    }

    #[test]
    fn events_round_trip() {
        let event = EventMessage::Task(
            TaskEvent::new("t-1", Some("j-1"), TaskState::Completed, 2).with_result(b"\x00\xff"),
        );
        let back = EventMessage::decode(&event.encode()).unwrap();
        assert_eq!(back, event);
        let EventMessage::Task(t) = back else {
            panic!("not a task event")
        };
        assert_eq!(t.result().unwrap(), b"\x00\xff");
    }

    #[test]
    fn batches_read_back_and_stay_under_the_message_limit() {
        let small: Vec<TaskEvent> = (0..1000)
            .map(|i| TaskEvent::new(&format!("t-{i}"), None, TaskState::Running, 1))
            .collect();
        let messages = encode_batches("h/1", &small);
        assert_eq!(messages.len(), 1, "a thousand small events fit one message");
        let EventMessage::Tasks { source, events, v } = EventMessage::decode(&messages[0]).unwrap()
        else {
            panic!("not a batch")
        };
        assert_eq!((source.as_str(), v), ("h/1", EVENT_VERSION));
        assert_eq!(events, small);
        // Results near the limit: each batch stays under 1 MB, none is lost.
        let big: Vec<TaskEvent> = (0..5)
            .map(|i| {
                TaskEvent::new(&format!("b-{i}"), None, TaskState::Completed, 1)
                    .with_result(&vec![7u8; super::super::MAX_RESULT_BYTES])
            })
            .collect();
        let messages = encode_batches("h/1", &big);
        assert_eq!(messages.len(), 5);
        let mut back = Vec::new();
        for message in &messages {
            assert!(message.len() < 1_000_000, "{} bytes", message.len());
            let EventMessage::Tasks { events, .. } = EventMessage::decode(message).unwrap() else {
                panic!("not a batch")
            };
            back.extend(events);
        }
        assert_eq!(back, big);
        assert!(encode_batches("h/1", &[]).is_empty());
        // Version 1 events still read; an unknown version does not.
        assert!(
            EventMessage::decode(
                br#"{"type":"task","v":1,"task_id":"t","state":"Running","attempt":1,"at":1}"#
            )
            .is_ok()
        );
        assert!(
            EventMessage::decode(br#"{"type":"tasks","v":3,"source":"h","events":[]}"#).is_err()
        );
        assert!(EventMessage::decode(br#"{"type":"tasks","v":2,"source":"h","events":[{"v":9,"task_id":"t","state":"Running","attempt":1,"at":1}]}"#).is_err());
    }

    #[test]
    fn the_documented_examples_read() {
        let doc = include_str!("../../../../docs/wire-format.md");
        let mut read = 0;
        for block in doc.split("```json").skip(1) {
            let block = block.split("```").next().unwrap_or_default();
            for value in serde_json::Deserializer::from_str(block).into_iter::<serde_json::Value>()
            {
                let value = value.expect("an example is not JSON");
                if value.get("$schema").is_some() {
                    continue;
                }
                let bytes = serde_json::to_vec(&value).unwrap();
                if value.get("type").is_some() {
                    EventMessage::decode(&bytes).expect("event example");
                } else if value.get("data_base64").is_some() {
                    ModuleChunk::decode(&bytes).expect("module chunk example");
                } else if value.get("first").is_some() {
                    PayloadChunk::decode(&bytes).expect("payload chunk example");
                } else if value.get("next").is_some() {
                    ExpandCursor::decode(&bytes).expect("expand cursor example");
                } else {
                    TaskMessage::decode(&bytes).expect("task example");
                }
                read += 1;
            }
        }
        assert_eq!(read, 17, "examples in docs/wire-format.md");
    }

    #[test]
    fn a_job_control_carries_its_reason_and_older_ones_read_without() {
        let with = br#"{"type":"job-control","v":2,"job":"j-1","paused":false,"cancelled":true,"reason":"dependency_failed: t-9"}"#;
        let Ok(EventMessage::JobControl { reason, .. }) = EventMessage::decode(with) else {
            panic!("not a job control");
        };
        assert_eq!(reason.as_deref(), Some("dependency_failed: t-9"));
        let without =
            br#"{"type":"job-control","v":1,"job":"j-1","paused":true,"cancelled":false}"#;
        let Ok(EventMessage::JobControl { reason, .. }) = EventMessage::decode(without) else {
            panic!("not a job control");
        };
        assert_eq!(reason, None);
    }

    #[test]
    fn modules_split_into_chunks_under_the_message_limit() {
        let bytes: Vec<u8> = (0..1_300_000u32).map(|i| i as u8).collect();
        let chunks = ModuleChunk::split("abc", Some("m"), ModuleKind::Component, 1, &bytes);
        assert_eq!(chunks.len(), 3);
        let mut joined = Vec::new();
        for chunk in &chunks {
            let encoded = serde_json::to_vec(chunk).unwrap();
            assert!(
                encoded.len() < 1_000_000,
                "chunk of {} bytes",
                encoded.len()
            );
            joined.extend(ModuleChunk::decode(&encoded).unwrap().data().unwrap());
        }
        assert_eq!(joined, bytes);
    }
}
