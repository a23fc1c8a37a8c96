//! The embedded store as a Kafka host's view of its grid: no recovery and
//! no leasing; the changes the Kafka backend reads from the event topics
//! are applied through the same writer (and so reach observers and event
//! subscribers as local changes do), with the read positions they carry.

use super::writer::{Op, RemoteTask};
use super::{EmbeddedConfig, EmbeddedQueue, reader};
use crate::model::{JobRecord, ModuleId, TaskState};
use crate::queue::{ModuleRecord, QueueError};
use rusqlite::OptionalExtension;
use std::collections::HashMap;
use std::path::Path;

/// A change a Kafka host's view reads from the event topics.
pub(crate) enum ViewChange {
    /// A task event.
    Task(Box<RemoteTask>),
    /// A job was submitted.
    Job(JobRecord),
    /// Points `from..to` of a lazily expanded sweep job were written.
    Expanded { job: String, from: u64, to: u64 },
    /// A job was paused, resumed or cancelled.
    JobFlags {
        job: String,
        paused: bool,
        cancelled: bool,
        /// Why the grid cancelled it (`dependency_failed: <id>`).
        reason: Option<String>,
    },
    /// A task's priority changed.
    Priority(String, u8),
    /// A job's priority changed (its record and unfinished tasks).
    JobPriority(String, u8),
    /// A module, reassembled and verified.
    Module(ModuleRecord, Vec<u8>),
    /// Read position of a topic partition, stored with the changes before it.
    Offset {
        topic: String,
        partition: i32,
        next: i64,
    },
}

impl EmbeddedQueue {
    /// Open (or create) a store used only as a host's view of a Kafka grid:
    /// no recovery and no leasing; changes arrive through [`Self::apply_view`].
    pub(crate) fn open_view(path: &Path) -> Result<Self, QueueError> {
        Self::open_inner(path, EmbeddedConfig::default(), false)
    }

    /// Queue changes read from the event topics (applied in order, durably,
    /// with the read positions they carry); observers and subscribers are
    /// told as for local changes.
    pub(crate) fn apply_view(&self, changes: Vec<ViewChange>) {
        let ops = changes
            .into_iter()
            .map(|change| match change {
                ViewChange::Task(task) => Op::Remote(task),
                ViewChange::Job(job) => Op::RemoteJob(job),
                ViewChange::Expanded { job, from, to } => Op::RemoteExpanded { job, from, to },
                ViewChange::JobFlags {
                    job,
                    paused,
                    cancelled,
                    reason,
                } => Op::JobFlags {
                    job,
                    paused,
                    cancelled,
                    reason,
                },
                ViewChange::Priority(task, priority) => Op::Priority(task, priority),
                ViewChange::JobPriority(job, priority) => Op::JobPriority(job, priority),
                ViewChange::Module(record, bytes) => Op::Module(record, bytes),
                ViewChange::Offset {
                    topic,
                    partition,
                    next,
                } => Op::ViewOffset {
                    topic,
                    partition,
                    next,
                },
            })
            .collect();
        self.inner.writer.send(ops);
    }

    /// Report, to the observers' `dependencies_ended`, every dependency a
    /// waiter of this view names that has already ended: at start-up, the
    /// report of a commit just before a crash may not have reached the grid.
    pub(crate) fn report_ended_dependencies(&self) {
        self.inner.writer.send(vec![Op::SettleAll]);
    }

    /// Where the view stopped reading each (topic, partition), to resume there.
    pub(crate) fn view_offsets(&self) -> Result<HashMap<(String, i32), i64>, QueueError> {
        self.inner.reader.with(|conn| {
            let mut stmt = conn
                .prepare("SELECT topic, partition, next FROM view_offsets")
                .map_err(|e| QueueError::storage("reading the view's read positions", e))?;
            let rows = stmt
                .query_map([], |row| Ok(((row.get(0)?, row.get(1)?), row.get(2)?)))
                .map_err(|e| QueueError::storage("reading the view's read positions", e))?;
            rows.collect::<Result<HashMap<_, _>, _>>()
                .map_err(|e| QueueError::storage("reading the view's read positions", e))
        })
    }

    /// Whether the view already has the task in a final state (a replayed
    /// task message that another host finished need not run again).
    pub(crate) fn is_finished(&self, id: &str) -> bool {
        self.inner
            .reader
            .with(|conn| {
                conn.prepare_cached("SELECT state FROM tasks WHERE id = ?1")
                    .and_then(|mut stmt| {
                        stmt.query_row([id], |row| row.get::<_, String>(0))
                            .optional()
                    })
                    .map_err(|e| QueueError::storage("reading a task's state", e))
            })
            .ok()
            .flatten()
            .and_then(|state| TaskState::parse(&state))
            .is_some_and(TaskState::is_terminal)
    }

    /// A module's id from one of its names, read on this thread (the Kafka
    /// consumer resolves task messages that name their module).
    pub(crate) fn module_named_now(&self, name: &str) -> Option<ModuleId> {
        self.inner
            .reader
            .with(|c| reader::module_named(c, name))
            .ok()
            .flatten()
    }
}
