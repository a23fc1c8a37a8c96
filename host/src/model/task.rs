//! Tasks, jobs and the events of their life.

use super::{ErrorKind, LogLine, ModuleId, Sweep};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Milliseconds since the Unix epoch: every timestamp on the wire and in the store.
pub type Millis = u64;

/// The current time in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as Millis)
}

/// Microseconds: every duration (run time, queue wait) on the wire, in the
/// store and in statistics. Tasks of this grid take microseconds, so a
/// duration in whole milliseconds would read 0 or 1 for most of them.
pub type Micros = u64;

/// Microseconds since the Unix epoch: when a task became ready, so its queue
/// wait can be measured at task resolution.
pub fn now_us() -> Micros {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as Micros)
}

/// A task's id: `t-<uuid>` for a lone task, `<job id>.<index>` for a job's task.
pub type TaskId = String;

/// A job's id: `j-<12 hex digits>`.
pub type JobId = String;

/// Where a task is in its life. `Error` is transient: the attempt failed and
/// the task waits for its retry (or becomes `Dead` when attempts run out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for the tasks or jobs it names in `after` to end: never
    /// leased, not counted as Pending. Becomes Pending when they have all
    /// Completed, or Cancelled (`dependency_failed: <id>`) when one did not.
    Waiting,
    /// Waiting to be leased (priority 0: held until raised).
    Pending,
    /// Leased by a worker, not started yet.
    Allocated,
    /// Running on a worker.
    Running,
    /// Finished with a result.
    Completed,
    /// The last attempt failed; a retry is scheduled.
    Error,
    /// Failed on every attempt: parked in the dead-letter state.
    Dead,
    /// Cancelled by a user before it finished.
    Cancelled,
}

impl TaskState {
    /// Every state, in life order.
    pub const ALL: [TaskState; 8] = [
        TaskState::Waiting,
        TaskState::Pending,
        TaskState::Allocated,
        TaskState::Running,
        TaskState::Completed,
        TaskState::Error,
        TaskState::Dead,
        TaskState::Cancelled,
    ];

    /// The name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Waiting => "Waiting",
            TaskState::Pending => "Pending",
            TaskState::Allocated => "Allocated",
            TaskState::Running => "Running",
            TaskState::Completed => "Completed",
            TaskState::Error => "Error",
            TaskState::Dead => "Dead",
            TaskState::Cancelled => "Cancelled",
        }
    }

    /// Parse a state name, ignoring case.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }

    /// Whether the task will not change again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Dead | TaskState::Cancelled
        )
    }

    /// Position in [`TaskState::ALL`], for counters.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a submitter may set on a task (or a job's tasks), with defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    /// 0..=9, 9 highest; 0 holds the task until its priority is raised.
    pub priority: u8,
    /// Key/value labels, e.g. `currency=USD`, `tradeid=123`.
    pub tags: BTreeMap<String, String>,
    /// Warm-instance key: tasks with the same module and key prefer the
    /// worker that already ran `init` for it.
    pub affinity: Option<String>,
    /// Wall-clock limit per attempt, in milliseconds.
    pub timeout_ms: u64,
    /// Linear-memory cap, in bytes.
    pub memory_bytes: u64,
    /// Attempts before the task is parked as `Dead`.
    pub max_attempts: u32,
    /// Not to start before this time (delayed start).
    pub not_before: Option<Millis>,
    /// Tasks or jobs (by id) that must end before this one starts: until
    /// then it is [`TaskState::Waiting`]. On a job, the whole job waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// What a dependency that did not complete does to a waiting task.
    #[serde(default, skip_serializing_if = "OnFailure::is_cancel")]
    pub on_failure: OnFailure,
    /// A fan-in task: the job whose completed results are its input, read
    /// a page at a time while it runs, in place of a payload. The job is
    /// also one of `after`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results_of: Option<JobId>,
}

/// What a dependency that ended Dead or Cancelled (or a job with such a
/// task) does to the tasks waiting for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// The waiter is cancelled with `dependency_failed: <id>` (the default:
    /// a reduce over a failed sweep is rarely what anyone wants).
    #[default]
    Cancel,
    /// The waiter runs once its dependencies have ended, however they ended.
    Run,
}

impl OnFailure {
    /// Whether this is the default, [`OnFailure::Cancel`] (left off the wire).
    pub fn is_cancel(&self) -> bool {
        *self == OnFailure::Cancel
    }

    /// The name used on the wire and in the store.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Cancel => "cancel",
            OnFailure::Run => "run",
        }
    }
}

impl Default for TaskOptions {
    fn default() -> Self {
        TaskOptions {
            priority: 5,
            tags: BTreeMap::new(),
            affinity: None,
            timeout_ms: 60_000,
            memory_bytes: 256 << 20,
            max_attempts: 3,
            not_before: None,
            after: Vec::new(),
            on_failure: OnFailure::Cancel,
            results_of: None,
        }
    }
}

/// A task as submitted, before the store has it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewTask {
    /// Its id.
    pub id: TaskId,
    /// The job it belongs to, if any.
    pub job_id: Option<JobId>,
    /// Module to run.
    pub module: ModuleId,
    /// Input bytes.
    #[serde(with = "crate::model::base64_bytes")]
    pub payload: Vec<u8>,
    /// Priority, tags, limits...
    pub options: TaskOptions,
}

/// Everything the store knows about a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its id.
    pub id: TaskId,
    /// The job it belongs to, if any.
    pub job_id: Option<JobId>,
    /// Module to run.
    pub module: ModuleId,
    /// Input bytes.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Priority, tags, limits as submitted (priority as raised since).
    pub options: TaskOptions,
    /// Current state.
    pub state: TaskState,
    /// Attempts started so far.
    pub attempts: u32,
    /// Worker of the latest attempt.
    pub worker: Option<String>,
    /// When each state was last entered.
    pub timestamps: BTreeMap<TaskState, Millis>,
    /// Why the latest attempt failed.
    pub error_kind: Option<ErrorKind>,
    /// The failure's message.
    pub error_message: Option<String>,
    /// Result bytes once Completed.
    #[serde(skip)]
    pub result: Option<Vec<u8>>,
    /// Guest log lines of the latest attempt.
    pub logs: Vec<LogLine>,
    /// Latest progress the guest reported.
    pub progress: f32,
}

/// A transition of one task: what the tracker topic carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the event log, assigned when the event is stored.
    pub offset: u64,
    /// The task.
    pub task_id: TaskId,
    /// Its job, if any.
    pub job_id: Option<JobId>,
    /// The state entered.
    pub state: TaskState,
    /// Attempt number (0 before the first lease).
    pub attempt: u32,
    /// Worker involved, if any.
    pub worker: Option<String>,
    /// When it happened.
    pub at: Millis,
    /// For Error and Dead: why.
    pub error_kind: Option<ErrorKind>,
    /// For Error and Dead: the message; for Pending after a restart: why requeued.
    pub message: Option<String>,
    /// For Completed, Error and Dead: how long the attempt ran, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_us: Option<Micros>,
    /// For Allocated: how long the task waited ready before this lease, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_us: Option<Micros>,
}

/// A job as submitted: one module, shared options, and either explicit
/// payloads or a parameter sweep expanded lazily.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// Its id.
    pub id: JobId,
    /// A name for people.
    pub name: Option<String>,
    /// Module every task runs.
    pub module: ModuleId,
    /// Options every task gets.
    pub options: TaskOptions,
    /// Explicit payloads (each becomes task `<job>.<index>`), or empty for a sweep.
    pub payloads: Vec<Vec<u8>>,
    /// A sweep, expanded as tasks are leased.
    pub sweep: Option<Sweep>,
}

impl NewJob {
    /// The record of this job accepted at `now` with `total` tasks, of
    /// which `expanded` exist as tasks already; neither paused nor cancelled.
    pub fn record(&self, total: u64, expanded: u64, now: Millis) -> JobRecord {
        JobRecord {
            id: self.id.clone(),
            name: self.name.clone(),
            module: self.module.clone(),
            options: self.options.clone(),
            total,
            expanded,
            paused: false,
            cancelled: false,
            cancel_reason: None,
            waiting: !self.options.after.is_empty(),
            created_at: now,
            sweep: self.sweep.clone(),
        }
    }
}

/// Counts of a job's tasks per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts(pub [u64; TaskState::ALL.len()]);

impl JobCounts {
    /// Tasks in a state.
    pub fn get(&self, state: TaskState) -> u64 {
        self.0[state.index()]
    }

    /// Move one task from `from` (if any) to `to`.
    pub fn transition(&mut self, from: Option<TaskState>, to: TaskState) {
        if let Some(from) = from {
            self.0[from.index()] = self.0[from.index()].saturating_sub(1);
        }
        self.0[to.index()] += 1;
    }

    /// `n` more tasks in `state` (rebuilding counts from a grouped census).
    pub fn add(&mut self, state: TaskState, n: u64) {
        self.0[state.index()] += n;
    }

    /// Tasks that will not change again.
    pub fn finished(&self) -> u64 {
        self.get(TaskState::Completed) + self.get(TaskState::Dead) + self.get(TaskState::Cancelled)
    }

    /// As a map from state name to count, for JSON.
    pub fn by_name(&self) -> BTreeMap<&'static str, u64> {
        TaskState::ALL
            .iter()
            .map(|s| (s.as_str(), self.get(*s)))
            .collect()
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// A name for people.
    pub name: Option<String>,
    /// Module every task runs.
    pub module: ModuleId,
    /// Options every task gets.
    pub options: TaskOptions,
    /// Total tasks (explicit payloads or sweep points).
    pub total: u64,
    /// Tasks created in the store so far (sweeps grow this lazily).
    pub expanded: u64,
    /// Paused: its tasks are not leased.
    pub paused: bool,
    /// Cancelled: its unfinished tasks were cancelled.
    pub cancelled: bool,
    /// Why it was cancelled when the grid did it, not a user:
    /// `dependency_failed: <id>` for a job whose `after` named one that
    /// ended Dead or Cancelled. `None` for a user's cancel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancel_reason: Option<String>,
    /// Waiting for the jobs or tasks in `options.after`: none of its tasks
    /// is leased (nor any sweep point created) until they have ended.
    #[serde(default)]
    pub waiting: bool,
    /// When it was submitted.
    pub created_at: Millis,
    /// The sweep, if it is one.
    pub sweep: Option<Sweep>,
}
