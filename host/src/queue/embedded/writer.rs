//! The store's single writer: a thread that owns the write connection,
//! applies queued operations in large transactions (group commit), then
//! tells observers and subscribers what became durable, in order.
//!
//! Because every change goes through this one ordered channel, an
//! operation queued after another is never durable before it: a task's
//! insert always commits before any of its transitions.

use super::super::{CommitObserver, Committed, ModuleRecord, QueueError, SettledJob};
use crate::model::{
    ErrorKind, Event, JobRecord, LogLine, Micros, Millis, ModuleId, NewTask, TaskState,
};
use rusqlite::{Connection, OptionalExtension, params};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::{broadcast, mpsc, oneshot};

/// Operations per transaction at most; more wait for the next commit.
const MAX_BATCH_OPS: usize = 50_000;

use super::checkpoint::{self, Checkpointer};
use super::dependencies::{self, Settling, Watched};
use super::pressure::Weight;
pub(crate) use super::pressure::{Backlog, StoreHealth};
pub use super::pressure::{MAX_BACKLOG_BYTES, MAX_BACKLOG_OPS};
use super::short_life::ShortLife;
pub(crate) use super::view_apply::RemoteTask;
use super::view_apply::{PutOff, Successors};
pub(crate) use crate::queue::scheduler::Tags;

/// One change to the store.
pub(super) enum Op {
    /// Cap the store file at this many bytes (`None`: no cap). Applied as
    /// soon as the writer reads it, ahead of any retry: it is how an
    /// operator bounds the store, and how tests fill and free a "disk".
    Quota(Option<u64>),
    Module(ModuleRecord, Vec<u8>),
    Job(JobRecord),
    NewTasks(Vec<(NewTask, Tags)>, Millis),
    JobExpanded(String, u64),
    JobFlags {
        job: String,
        paused: bool,
        cancelled: bool,
        /// Why the grid cancelled it (kept if `None`: a later pause of a
        /// job does not forget why it was cancelled).
        reason: Option<String>,
    },
    Transition(Box<Transition>),
    Priority(String, u8),
    /// Remove a job whose acceptance a crash cut short (its submitter was
    /// never told it was accepted): its record, tasks and their events.
    DropJob(String),
    /// Delete up to this many of a job's tasks with their events (a big
    /// job is deleted a chunk per transaction, so other writes interleave).
    DropJobTasks(String, usize),
    /// A job's priority changed: its record and its unfinished tasks.
    JobPriority(String, u8),
    /// An event another host (or this one) published, applied if it moves
    /// the task forward (see `view_apply::supersedes`).
    Remote(Box<RemoteTask>),
    /// A job announced on the event topic: its record and one Pending row per
    /// explicit task or sweep point, unless already known.
    RemoteJob(JobRecord),
    /// Points `from..to` of a lazily expanded sweep job were written on
    /// Kafka: their Pending rows, unless already known.
    RemoteExpanded {
        job: String,
        from: u64,
        to: u64,
    },
    /// How far a view has read a topic partition (stored with what it read).
    ViewOffset {
        topic: String,
        partition: i32,
        next: i64,
    },
    /// A task or job (inserted Waiting, earlier in the same command) waits
    /// for each of these tasks or jobs (see [`super::dependencies`]).
    Wait {
        waiter: String,
        after: Vec<String>,
    },
    /// Settle every dependency some waiter names (start-up: a store
    /// written by another release, or by hand, is set right).
    SettleAll,
    /// Writes nothing: runs once every operation queued before it is
    /// durable (on the thread that committed it, after the commit's
    /// observers).
    /// Unlike a [`Writer::write`], it travels with operations already
    /// applied in memory (a synchronous invocation's held insert and
    /// outcome), so a failing batch keeps it and retries with them.
    Notify(Notice),
}

/// What an [`Op::Notify`] does once it is durable: hand a waiting caller
/// its answer (a short, non-blocking send).
pub(super) type Notice = Box<dyn FnOnce() + Send>;

/// A task entering a state (serialisable for the invocation journal).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Transition {
    pub(super) task_id: Arc<str>,
    pub(super) job_id: Option<Arc<str>>,
    pub(super) module: ModuleId,
    pub(super) tags: Tags,
    pub(super) from: Option<TaskState>,
    pub(super) to: TaskState,
    pub(super) attempt: u32,
    pub(super) at: Millis,
    pub(super) carried: Carried,
}

/// What a transition carries besides the state it enters: set by whoever
/// makes it (a local lease or completion, or an event read from Kafka).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Carried {
    pub(crate) worker: Option<String>,
    pub(crate) error: Option<(ErrorKind, String)>,
    pub(crate) message: Option<String>,
    #[serde(with = "crate::model::base64_bytes::option")]
    pub(crate) result: Option<Vec<u8>>,
    pub(crate) logs: Option<Vec<LogLine>>,
    pub(crate) progress: Option<f32>,
    pub(crate) not_before: Option<Millis>,
    pub(crate) run_us: Option<Micros>,
    pub(crate) wait_us: Option<Micros>,
}

impl Transition {
    /// A bare transition; callers fill in what the state carries.
    pub(super) fn new(
        task_id: Arc<str>,
        job_id: Option<Arc<str>>,
        module: ModuleId,
        tags: Tags,
        from: Option<TaskState>,
        to: TaskState,
        attempt: u32,
    ) -> Self {
        Transition {
            task_id,
            job_id,
            module,
            tags,
            from,
            to,
            attempt,
            at: crate::model::now_ms(),
            carried: Carried::default(),
        }
    }
}

pub(super) struct Command {
    ops: Vec<Op>,
    done: Option<oneshot::Sender<Result<(), QueueError>>>,
    /// What this command adds to the [`Backlog`] until it leaves the queue.
    weight: Weight,
}

/// Handle to the writer thread.
pub(super) struct Writer {
    tx: mpsc::UnboundedSender<Command>,
    /// Shared with the writer thread.
    pub(super) backlog: Arc<Backlog>,
    /// What commits; the writer thread's, lent to [`Writer::send_now`].
    core: Arc<Mutex<Core>>,
}

/// The write connection and whom a commit tells. The writer thread holds
/// it while it writes a batch; a thread that finds the writer idle may
/// commit its own operations with it ([`Writer::send_now`]).
struct Core {
    conn: Connection,
    events: broadcast::Sender<Event>,
    observers: Arc<RwLock<Vec<Arc<dyn CommitObserver>>>>,
    health: Arc<StoreHealth>,
    backlog: Arc<Backlog>,
    /// Copies the log back into the database file, off the commit path.
    checkpointer: Checkpointer,
    /// Ids some waiting task or job waits for.
    watched: Watched,
}

impl Writer {
    /// Start the writer thread on `conn`, the store's write connection;
    /// `checkpointer` takes over SQLite's automatic checkpoints.
    pub(super) fn start(
        conn: Connection,
        checkpointer: Checkpointer,
        events: broadcast::Sender<Event>,
        observers: Arc<RwLock<Vec<Arc<dyn CommitObserver>>>>,
        health: Arc<StoreHealth>,
        reports_only: bool,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let backlog = Arc::new(Backlog::default());
        checkpoint::install(&conn);
        let watched = Watched::load(&conn, reports_only).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the dependencies; settling them at the next start");
            Watched::empty(reports_only)
        });
        let core = Arc::new(Mutex::new(Core {
            conn,
            events,
            observers,
            health,
            backlog: backlog.clone(),
            checkpointer,
            watched,
        }));
        let writing = core.clone();
        std::thread::Builder::new()
            .name("kwq-store-writer".into())
            .spawn(move || run(writing, rx))
            .expect("cannot start the store writer thread");
        Writer { tx, backlog, core }
    }

    fn queue(&self, command: Command) -> Result<(), QueueError> {
        let weight = command.weight;
        self.backlog.add(weight);
        self.tx.send(command).map_err(|_| {
            self.backlog.remove(weight);
            QueueError::Closed
        })
    }

    /// Queue operations without waiting for them to be durable.
    pub(super) fn send(&self, ops: Vec<Op>) {
        let weight = Weight::of(&ops);
        let _ = self.queue(Command {
            ops,
            done: None,
            weight,
        });
    }

    /// As [`Writer::send`], but if the writer is idle (nothing queued,
    /// nothing being written) commit them here, on the calling thread: for
    /// a caller waiting on exactly this commit (a synchronous invocation's
    /// outcome), that saves handing the work to the writer thread and
    /// waking it. Order is kept: with the commit lock held and nothing in
    /// the queue, everything queued before is already durable, and what is
    /// queued meanwhile waits for the lock. A failed commit is queued for
    /// the writer, which retries it as any other.
    pub(super) fn send_now(&self, ops: Vec<Op>) {
        if self.backlog.commands() == 0
            && let Ok(mut core) = self.core.try_lock()
            && self.backlog.commands() == 0
        {
            let weight = Weight::of(&ops);
            self.backlog.add(weight);
            let command = Command {
                ops,
                done: None,
                weight,
            };
            if let Err((mut failed, e)) = core.commit(vec![command]) {
                tracing::warn!(error = %e, "store write failed; the writer retries it");
                if let Some(command) = failed.pop() {
                    // Queued before it stops counting: nothing queued
                    // after it may be committed ahead of it.
                    let weight = command.weight;
                    let _ = self.queue(command);
                    self.backlog.remove(weight);
                }
            }
            return;
        }
        self.send(ops)
    }

    /// Queue operations now (in order with every other send) and return a
    /// future that resolves once they are durable.
    pub(super) fn write(
        &self,
        ops: Vec<Op>,
    ) -> impl std::future::Future<Output = Result<(), QueueError>> + use<> {
        let (done, wait) = oneshot::channel();
        let weight = Weight::of(&ops);
        let sent = self.queue(Command {
            ops,
            done: Some(done),
            weight,
        });
        async move {
            sent?;
            wait.await.map_err(|_| QueueError::Closed)?
        }
    }
}

/// First wait between retries of a failed batch; it doubles up to [`RETRY_MAX`].
const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
/// Longest wait between retries of a failed batch.
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(1);

impl Core {
    /// Apply `batch` in one transaction and, once it is durable, tell
    /// observers, callers, notices and subscribers, in that order; on
    /// failure nothing is told and the batch comes back with the error.
    fn commit(&mut self, batch: Vec<Command>) -> Result<(), (Vec<Command>, rusqlite::Error)> {
        let applied = apply(&mut self.conn, &mut self.watched, &batch);
        let log_pages = checkpoint::taken_log_pages();
        let Applied {
            committed,
            modules,
            jobs,
            ended,
        } = match applied {
            Ok(done) => done,
            Err(e) => {
                // What the failed batch watched is read again from the store.
                if let Ok(watched) = Watched::load(&self.conn, self.watched.reports_only()) {
                    self.watched = watched;
                }
                return Err((batch, e));
            }
        };
        self.health.set(None);
        // Statistics first, so a caller that was told "stored" sees them.
        if !modules.is_empty() || !committed.is_empty() || !jobs.is_empty() || !ended.is_empty() {
            for observer in self.observers.read().expect("observers lock").iter() {
                if !modules.is_empty() {
                    observer.modules_stored(&modules);
                }
                if !committed.is_empty() {
                    observer.committed(&committed);
                }
                if !jobs.is_empty() {
                    observer.jobs_settled(&jobs);
                }
                if !ended.is_empty() {
                    observer.dependencies_ended(&ended);
                }
            }
        }
        for command in batch {
            self.backlog.remove(command.weight);
            if let Some(done) = command.done {
                let _ = done.send(Ok(()));
            }
            for op in command.ops {
                if let Op::Notify(notice) = op {
                    notice();
                }
            }
        }
        self.backlog.drained.notify_waiters();
        for c in committed {
            let _ = self.events.send(c.event);
        }
        // Last: whoever waited for this commit has been told.
        if let Some(pages) = log_pages {
            self.checkpointer.committed(&self.conn, pages);
        }
        Ok(())
    }
}

/// The writer's loop. A batch that fails is not lost: operations nobody
/// waits for (transitions, completions, sweep expansions, already applied
/// in memory) stay at the head of the queue and are retried, with backoff,
/// until they commit, so memory and store never disagree for longer than
/// the outage; operations somebody waits for (submits, uploads, controls)
/// are answered with the error at once and dropped, their callers having
/// changed nothing in memory. While batches fail the store is marked
/// failing: leasing stops and `/healthz` says why.
fn run(core: Arc<Mutex<Core>>, mut rx: mpsc::UnboundedReceiver<Command>) {
    let mut pending: std::collections::VecDeque<Command> = std::collections::VecDeque::new();
    let mut backoff = RETRY_FIRST;
    loop {
        if pending.is_empty() {
            match rx.blocking_recv() {
                Some(command) => pending.push_back(command),
                None => return,
            }
        }
        while let Ok(command) = rx.try_recv() {
            pending.push_back(command);
        }
        let mut core = core.lock().unwrap_or_else(|p| p.into_inner());
        // Quotas first: raising one is how a full store recovers.
        for command in pending.iter_mut() {
            for op in &command.ops {
                if let Op::Quota(bytes) = op {
                    apply_quota(&core.conn, *bytes);
                }
            }
            command.ops.retain(|op| !matches!(op, Op::Quota(_)));
        }
        let mut batch = Vec::new();
        let mut ops = 0;
        while let Some(command) = pending.pop_front() {
            ops += command.ops.len();
            batch.push(command);
            if ops >= MAX_BATCH_OPS {
                break;
            }
        }
        match core.commit(batch) {
            Ok(()) => backoff = RETRY_FIRST,
            Err((batch, e)) => {
                let reason = format!("store write failed: {e}");
                core.health.set(Some(reason.clone()));
                let mut kept = 0;
                for command in batch.into_iter().rev() {
                    match command.done {
                        Some(done) => {
                            core.backlog.remove(command.weight);
                            let _ = done.send(Err(QueueError::Unavailable(reason.clone())));
                        }
                        None => {
                            kept += command.ops.len();
                            pending.push_front(command);
                        }
                    }
                }
                drop(core);
                tracing::warn!(error = %e, kept, retry_in_ms = backoff.as_millis() as u64, "store write failed; retrying the operations already applied in memory");
                // Backoff between retries of a failing store (not a wait for
                // another thread: nothing else can make the disk writable).
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// `PRAGMA max_page_count` for a cap in bytes (none: SQLite's maximum).
fn apply_quota(conn: &Connection, bytes: Option<u64>) {
    let page_size: i64 = conn
        .pragma_query_value(None, "page_size", |row| row.get(0))
        .unwrap_or(4096);
    let pages = bytes.map_or(4_294_967_294, |b| (b as i64 / page_size).max(1));
    if let Err(e) = conn.pragma_update(None, "max_page_count", pages) {
        tracing::warn!(error = %e, "cannot set the store's size cap");
    }
}

/// The update of a task entering `state`: one statement per state, made
/// at compile time (the writer runs it tens of thousands of times a
/// second; formatting it each time cost an allocation and a hash of 400 bytes).
fn transition_sql(state: TaskState, passed: bool) -> &'static str {
    macro_rules! update {
        ($column:literal, $also:literal) => {
            concat!(
                "UPDATE tasks SET state = ?2, attempts = ?3, worker = COALESCE(?4, worker), ",
                $column,
                " = ?5,",
                $also,
                "
         error_kind = CASE WHEN ?6 IS NULL THEN error_kind ELSE ?6 END,
         error_message = CASE WHEN ?7 IS NULL THEN error_message ELSE ?7 END,
         result = COALESCE(?8, result), logs = COALESCE(?9, logs),
         progress = COALESCE(?10, progress), not_before = ?11,
         run_us = COALESCE(?12, run_us)
         WHERE id = ?1"
            )
        };
    }
    // Through states passed on the way (see [`Passed`]): the state's own
    // time, `allocated_at` (?13) and, past Running, `running_at` (?14), in
    // one update of the row (a Kafka Running event carries its Allocated).
    macro_rules! states {
        ($also:literal) => {
            match state {
                TaskState::Waiting => update!("waiting_at", $also),
                TaskState::Pending => update!("pending_at", $also),
                TaskState::Allocated => update!("allocated_at", ""),
                TaskState::Running => update!("running_at", $also),
                TaskState::Completed => update!("completed_at", $also),
                TaskState::Error => update!("error_at", $also),
                TaskState::Dead => update!("dead_at", $also),
                TaskState::Cancelled => update!("cancelled_at", $also),
            }
        };
    }
    match (passed, state) {
        (false, _) | (true, TaskState::Allocated) => states!(""),
        (true, TaskState::Running) => states!(" allocated_at = COALESCE(?13, allocated_at),"),
        (true, _) => states!(
            " allocated_at = COALESCE(?13, allocated_at), running_at = COALESCE(?14, running_at),"
        ),
    }
}

/// What a batch did, for whom the commit tells.
#[derive(Default)]
pub(super) struct Applied {
    /// The events it logged.
    pub(super) committed: Vec<Committed>,
    /// The module records it stored.
    pub(super) modules: Vec<ModuleRecord>,
    /// The waiting jobs it released or cancelled.
    pub(super) jobs: Vec<SettledJob>,
    /// A Kafka view's report of dependencies that ended (see
    /// [`dependencies::settle`]).
    pub(super) ended: Vec<(String, bool)>,
}

/// Apply a batch in one transaction (`watched`: the dependencies some
/// waiter names, kept up to date).
pub(super) fn apply(
    conn: &mut Connection,
    watched: &mut Watched,
    batch: &[Command],
) -> rusqlite::Result<Applied> {
    let tx = conn.transaction()?;
    let mut committed = Vec::new();
    let mut modules = Vec::new();
    let mut settling = Settling::default();
    // Whether the job of the tasks being inserted waits (asked once per job).
    let mut job_waits: Option<(String, bool)> = None;
    let mut passed = PassedStates::default();
    let successors = Successors::of(batch.iter().flat_map(|c| c.ops.iter()));
    let mut put_off = PutOff::default();
    let mut ops = batch.iter().flat_map(|c| c.ops.iter()).peekable();
    while let Some(op) = ops.next() {
        if !matches!(op, Op::Remote(_) | Op::ViewOffset { .. }) {
            put_off.flush(&tx)?;
        }
        match op {
            Op::Quota(_) => {}  // applied before the transaction
            Op::Notify(_) => {} // fired after the commit
            Op::Module(record, bytes) => {
                // A re-upload rewrites the bytes: that repairs a stored copy
                // that was corrupted on disk (the id is the hash of good bytes).
                tx.prepare_cached(
                    "INSERT INTO modules (id, name, kind, size, bytes, created_at) VALUES (?1, NULL, ?2, ?3, ?4, ?5)
                     ON CONFLICT(id) DO UPDATE SET bytes = excluded.bytes, size = excluded.size",
                )?
                .execute(params![
                    record.id.as_str(),
                    serde_json::to_string(&record.kind).unwrap_or_default(),
                    record.size as i64,
                    bytes,
                    record.created_at as i64
                ])?;
                if let Some(name) = &record.name {
                    tx.prepare_cached(
                        "INSERT INTO module_names (name, module, named_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(name) DO UPDATE SET module = excluded.module, named_at = excluded.named_at",
                    )?
                    .execute(params![name, record.id.as_str(), crate::model::now_ms() as i64])?;
                }
                modules.push(record.clone());
            }
            Op::Job(job) => {
                insert_job(&tx, job)?;
            }
            Op::RemoteJob(job) => {
                if insert_job(&tx, job)? {
                    super::view_apply::apply_remote_job(&tx, job, &mut committed)?;
                    if job.waiting {
                        dependencies::wait(
                            &tx,
                            watched,
                            &mut settling,
                            &job.id,
                            &job.options.after,
                        )?;
                    }
                }
            }
            Op::RemoteExpanded { job, from, to } => {
                super::view_apply::apply_remote_expanded(&tx, job, *from, *to, &mut committed)?
            }
            Op::Remote(remote) => {
                let waits = super::view_apply::apply_remote(
                    &tx,
                    remote,
                    &successors,
                    &mut put_off,
                    &mut committed,
                )?;
                if let Some(after) = waits {
                    dependencies::wait(&tx, watched, &mut settling, &remote.task_id, &after)?;
                }
                if remote.state.is_terminal() {
                    settling.may_have_ended(watched, &remote.task_id);
                    if let Some(job) = &remote.job_id {
                        settling.may_have_ended(watched, job);
                    }
                }
            }
            Op::ViewOffset {
                topic,
                partition,
                next,
            } => {
                tx.prepare_cached(
                    "INSERT INTO view_offsets (topic, partition, next) VALUES (?1, ?2, ?3)
                     ON CONFLICT(topic, partition) DO UPDATE SET next = excluded.next",
                )?
                .execute(params![topic, partition, next])?;
            }
            Op::NewTasks(tasks, at) => {
                if let [(task, tags)] = tasks.as_slice()
                    && let Some(life) = ShortLife::ahead(task, ops.clone())
                {
                    // A task whose attempt ends in this very commit (a
                    // synchronous invocation): its row goes in as the
                    // attempt leaves it, its events as they happened.
                    life.insert(&tx, task, tags, *at, &mut committed)?;
                    for _ in 0..life.consumed {
                        ops.next();
                    }
                    continue;
                }
                let mut insert = tx.prepare_cached(
                    "INSERT INTO tasks (id, job_id, module, payload, priority, options, state, not_before, pending_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'Pending', ?7, ?8)",
                )?;
                for (task, tags) in tasks {
                    if waits(&tx, task, &mut job_waits)? {
                        insert_waiting(&tx, task, *at)?;
                        log_new(&tx, task, tags, TaskState::Waiting, *at, &mut committed)?;
                        continue;
                    }
                    insert_row(&mut insert, task, *at)?;
                    log_pending(&tx, task, tags, *at, &mut committed)?;
                }
            }
            Op::JobExpanded(job, expanded) => {
                tx.prepare_cached("UPDATE jobs SET expanded = ?2 WHERE id = ?1")?
                    .execute(params![job, *expanded as i64])?;
                settling.may_have_ended(watched, job);
            }
            Op::JobFlags {
                job,
                paused,
                cancelled,
                reason,
            } => {
                tx.prepare_cached(
                    "UPDATE jobs SET paused = ?2, cancelled = ?3,
                     cancel_reason = COALESCE(?4, cancel_reason) WHERE id = ?1",
                )?
                .execute(params![job, paused, cancelled, reason])?;
                if *cancelled {
                    dependencies::forget_waiter(&tx, job)?;
                    settling.may_have_ended(watched, job);
                }
            }
            Op::Wait { waiter, after } => {
                dependencies::wait(&tx, watched, &mut settling, waiter, after)?;
            }
            Op::SettleAll => {
                for id in watched.all() {
                    settling.settle_anyway(id);
                }
            }
            Op::DropJobTasks(job, limit) => {
                let rows: Vec<(i64, String)> = tx
                    .prepare_cached("SELECT seq, id FROM tasks WHERE job_id = ?1 LIMIT ?2")?
                    .query_map(params![job, *limit as i64], |row| {
                        Ok((row.get(0)?, row.get(1)?))
                    })?
                    .collect::<Result<_, _>>()?;
                let mut events = tx.prepare_cached("DELETE FROM events WHERE task_id = ?1")?;
                let mut tasks = tx.prepare_cached("DELETE FROM tasks WHERE seq = ?1")?;
                for (seq, id) in rows {
                    events.execute(params![id])?;
                    tasks.execute(params![seq])?;
                }
            }
            Op::DropJob(job) => {
                tx.prepare_cached(
                    "DELETE FROM events WHERE task_id IN (SELECT id FROM tasks WHERE job_id = ?1)",
                )?
                .execute(params![job])?;
                tx.prepare_cached("DELETE FROM tasks WHERE job_id = ?1")?
                    .execute(params![job])?;
                tx.prepare_cached("DELETE FROM jobs WHERE id = ?1")?
                    .execute(params![job])?;
            }
            Op::JobPriority(job, priority) => {
                tx.prepare_cached(
                    "UPDATE jobs SET options = json_set(options, '$.priority', ?2) WHERE id = ?1",
                )?
                .execute(params![job, priority])?;
                tx.prepare_cached(
                    "UPDATE tasks SET priority = ?2 WHERE job_id = ?1
                     AND state IN ('Waiting', 'Pending', 'Allocated', 'Running', 'Error')",
                )?
                .execute(params![job, priority])?;
            }
            Op::Priority(task, priority) => {
                tx.prepare_cached("UPDATE tasks SET priority = ?2 WHERE id = ?1")?
                    .execute(params![task, priority])?;
            }
            Op::Transition(t) => {
                let next = match ops.peek() {
                    Some(Op::Transition(next)) => Some(&**next),
                    _ => None,
                };
                if passed.passes_through(t, next) {
                    log_transition(&tx, t, &mut committed)?;
                } else {
                    apply_transition(&tx, t, &mut committed)?;
                    passed.stamp(&tx, t)?;
                }
                if t.from == Some(TaskState::Waiting) {
                    dependencies::forget_waiter(&tx, &t.task_id)?;
                }
                if t.to.is_terminal() {
                    settling.may_have_ended(watched, &t.task_id);
                    if let Some(job) = &t.job_id {
                        settling.may_have_ended(watched, job);
                    }
                }
            }
        }
    }
    put_off.flush(&tx)?;
    let mut settled = dependencies::Settled::default();
    if !settling.is_empty() {
        let at = crate::model::now_ms();
        dependencies::settle(&tx, watched, settling, at, &mut committed, &mut settled)?;
    }
    tx.commit()?;
    Ok(Applied {
        committed,
        modules,
        jobs: settled.jobs,
        ended: settled.ended,
    })
}

/// Whether `task` is to be stored Waiting: it names dependencies, and (a
/// job's task) its job still waits. `job_waits` remembers the last job asked.
fn waits(
    tx: &rusqlite::Transaction<'_>,
    task: &NewTask,
    job_waits: &mut Option<(String, bool)>,
) -> rusqlite::Result<bool> {
    if task.options.after.is_empty() {
        return Ok(false);
    }
    let Some(job) = &task.job_id else {
        return Ok(true);
    };
    if let Some((known, waits)) = job_waits
        && known == job
    {
        return Ok(*waits);
    }
    let waits: bool = tx
        .prepare_cached("SELECT waiting FROM jobs WHERE id = ?1")?
        .query_row(params![job], |row| row.get(0))
        .optional()?
        .unwrap_or(false);
    *job_waits = Some((job.clone(), waits));
    Ok(waits)
}

/// Insert a task's row in Waiting.
fn insert_waiting(
    tx: &rusqlite::Transaction<'_>,
    task: &NewTask,
    at: Millis,
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO tasks (id, job_id, module, payload, priority, options, state, not_before, waiting_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'Waiting', ?7, ?8)",
    )?;
    insert_row(&mut insert, task, at)?;
    Ok(())
}

/// Run an insert of a task's row whose parameters are, in order: id, job,
/// module, payload, priority, options, not_before, and the time it entered
/// its first state. Rows inserted: 0 if it conflicted and was ignored.
fn insert_row(
    insert: &mut rusqlite::CachedStatement<'_>,
    task: &NewTask,
    at: Millis,
) -> rusqlite::Result<usize> {
    let options = serde_json::to_string(&task.options).unwrap_or_default();
    insert_row_as(insert, task, &options, at)
}

/// [`insert_row`] with the task's options already stored as JSON: the
/// points of a job share them, serialized once.
pub(super) fn insert_row_as(
    insert: &mut rusqlite::CachedStatement<'_>,
    task: &NewTask,
    options: &str,
    at: Millis,
) -> rusqlite::Result<usize> {
    insert.execute(params![
        task.id,
        task.job_id,
        task.module.as_str(),
        task.payload,
        task.options.priority,
        options,
        task.options.not_before.map(|t| t as i64),
        at as i64
    ])
}

/// Allocated and Running of a task whose next transition follows at once
/// in the same commit (a short attempt, its deferred operations stored
/// with its outcome): their events are logged, but their own updates of
/// the task's row are skipped. The last transition updates the row, and
/// one more update (no indexed column) writes the passed states' times and
/// worker. The row ends as the updates one by one would leave it, and the
/// state index moves once instead of three times: fewer pages per commit.
#[derive(Default)]
struct PassedStates {
    task: Option<Arc<str>>,
    allocated_at: Option<Millis>,
    running_at: Option<Millis>,
    worker: Option<String>,
}

impl PassedStates {
    /// Whether `t` is only passed through (`next` moves the same task on
    /// in this commit); if so it is remembered for the row's one update.
    fn passes_through(&mut self, t: &Transition, next: Option<&Transition>) -> bool {
        let passing = matches!(t.to, TaskState::Allocated | TaskState::Running)
            && next.is_some_and(|next| next.task_id == t.task_id);
        if !passing {
            return false;
        }
        if self.task.as_ref() != Some(&t.task_id) {
            *self = PassedStates {
                task: Some(t.task_id.clone()),
                ..PassedStates::default()
            };
        }
        match t.to {
            TaskState::Allocated => self.allocated_at = Some(t.at),
            _ => self.running_at = Some(t.at),
        }
        if t.carried.worker.is_some() {
            self.worker = t.carried.worker.clone();
        }
        true
    }

    /// After `t` updated its task's row: the timestamps and worker of the
    /// states it passed through on the way, if any.
    fn stamp(&mut self, tx: &rusqlite::Transaction<'_>, t: &Transition) -> rusqlite::Result<()> {
        if self.task.as_ref() != Some(&t.task_id) {
            return Ok(());
        }
        let passed = std::mem::take(self);
        tx.prepare_cached(
            "UPDATE tasks SET allocated_at = COALESCE(?2, allocated_at),
             running_at = COALESCE(?3, running_at), worker = COALESCE(?4, worker) WHERE id = ?1",
        )?
        .execute(params![
            &*t.task_id,
            passed.allocated_at.map(|at| at as i64),
            passed.running_at.map(|at| at as i64),
            // The last transition's own worker, if it names one, stands.
            passed.worker.filter(|_| t.carried.worker.is_none())
        ])?;
        Ok(())
    }
}

/// Move a task to a new state and log the event.
pub(super) fn apply_transition(
    tx: &rusqlite::Transaction<'_>,
    t: &Transition,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    apply_transition_via(tx, t, &Passed::default(), committed)
}

/// Times (and the worker) of states a task went through on the way to
/// the transition that updates its row, their own updates skipped: an
/// Allocated a Kafka event carries, or a Running whose outcome follows in
/// the same batch (see `view_apply::apply_remote`). The update writes them
/// with the state reached, so the state indexes move once.
#[derive(Debug, Clone, Default)]
pub(super) struct Passed {
    /// When the task was Allocated.
    pub(super) allocated_at: Option<Millis>,
    /// When it started Running.
    pub(super) running_at: Option<Millis>,
    /// The worker those states named, kept if the state reached names none.
    pub(super) worker: Option<String>,
}

impl Passed {
    /// Whether nothing was passed.
    fn is_empty(&self) -> bool {
        self.allocated_at.is_none() && self.running_at.is_none()
    }
}

/// Apply a transition that went through the states of `passed` on the way.
pub(super) fn apply_transition_via(
    tx: &rusqlite::Transaction<'_>,
    t: &Transition,
    passed: &Passed,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    update_task_row(tx, t, passed)?;
    log_transition(tx, t, committed)
}

/// The update of a task's row for a transition (its event is logged by
/// the caller) that went through the states of `passed` on the way.
pub(super) fn update_task_row(
    tx: &rusqlite::Transaction<'_>,
    t: &Transition,
    passed: &Passed,
) -> rusqlite::Result<()> {
    let (kind, message) = match &t.carried.error {
        Some((kind, message)) => (Some(kind.as_str()), Some(message.as_str())),
        // A cancel's reason (`dependency_failed: <id>`) is the task's
        // error message, as the embedded store's own cancels write it.
        None if t.to == TaskState::Cancelled => (None, t.carried.message.as_deref()),
        None => (None, None),
    };
    let logs = t
        .carried
        .logs
        .as_ref()
        .map(|l| serde_json::to_string(l).unwrap_or_default());
    let mut update = tx.prepare_cached(transition_sql(t.to, !passed.is_empty()))?;
    let (id, state, at) = (&*t.task_id, t.to.as_str(), t.at as i64);
    // The transition's own worker, if it names one, stands.
    let worker = t.carried.worker.as_ref().or(passed.worker.as_ref());
    let progress = t.carried.progress.map(f64::from);
    let not_before = t.carried.not_before.map(|n| n as i64);
    let run_us = t.carried.run_us.map(|us| us as i64);
    let allocated_at = passed.allocated_at.map(|at| at as i64);
    let running_at = passed.running_at.map(|at| at as i64);
    let all: [&dyn rusqlite::ToSql; 14] = [
        &id,
        &state,
        &t.attempt,
        &worker,
        &at,
        &kind,
        &message,
        &t.carried.result,
        &logs,
        &progress,
        &not_before,
        &run_us,
        &allocated_at,
        &running_at,
    ];
    // Each statement names the parameters it uses, in order.
    let used = update.parameter_count().min(all.len());
    update.execute(&all[..used])?;
    Ok(())
}

/// Log a transition's event (the row is updated by the caller).
pub(super) fn log_transition(
    tx: &rusqlite::Transaction<'_>,
    t: &Transition,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    let message = t
        .carried
        .error
        .as_ref()
        .map(|(_, message)| message.as_str());
    let event = insert_event(
        tx,
        Event {
            offset: 0,
            task_id: t.task_id.to_string(),
            job_id: t.job_id.as_deref().map(str::to_string),
            state: t.to,
            attempt: t.attempt,
            worker: t.carried.worker.clone(),
            at: t.at,
            error_kind: t.carried.error.as_ref().map(|e| e.0),
            message: message.or(t.carried.message.as_deref()).map(str::to_string),
            run_us: t.carried.run_us,
            wait_us: t.carried.wait_us,
        },
    )?;
    committed.push(Committed {
        event,
        from: t.from,
        module: t.module.clone(),
        tags: t.tags.clone(),
    });
    Ok(())
}

/// Insert a job's record; false if it was already there.
pub(super) fn insert_job(
    tx: &rusqlite::Transaction<'_>,
    job: &JobRecord,
) -> rusqlite::Result<bool> {
    let inserted = tx
        .prepare_cached(
            "INSERT INTO jobs (id, name, module, options, total, expanded, paused, cancelled, sweep, created_at, waiting, cancel_reason)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT(id) DO NOTHING",
        )?
        .execute(params![
            job.id,
            job.name,
            job.module.as_str(),
            serde_json::to_string(&job.options).unwrap_or_default(),
            job.total as i64,
            job.expanded as i64,
            job.paused,
            job.cancelled,
            job.sweep.as_ref().map(|s| serde_json::to_string(s).unwrap_or_default()),
            job.created_at as i64,
            job.waiting,
            job.cancel_reason
        ])?;
    Ok(inserted > 0)
}

/// Log a new task's Pending event (its row is inserted) and count it as new.
pub(super) fn log_pending(
    tx: &rusqlite::Transaction<'_>,
    task: &NewTask,
    tags: &Tags,
    at: Millis,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    log_new(tx, task, tags, TaskState::Pending, at, committed)
}

/// Log a new task's first event, in `state` (Pending, or Waiting for its
/// dependencies), and count it as new.
fn log_new(
    tx: &rusqlite::Transaction<'_>,
    task: &NewTask,
    tags: &Tags,
    state: TaskState,
    at: Millis,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    let event = insert_event(
        tx,
        Event {
            offset: 0,
            task_id: task.id.clone(),
            job_id: task.job_id.clone(),
            state,
            attempt: 0,
            worker: None,
            at,
            error_kind: None,
            message: None,
            run_us: None,
            wait_us: None,
        },
    )?;
    committed.push(Committed {
        event,
        from: None,
        module: task.module.clone(),
        tags: tags.clone(),
    });
    Ok(())
}

/// Insert a task's row in Pending without an event; false if it exists.
pub(super) fn insert_task_row(
    tx: &rusqlite::Transaction<'_>,
    task: &NewTask,
    at: Millis,
) -> rusqlite::Result<bool> {
    let mut insert = tx.prepare_cached(INSERT_TASK_ROW)?;
    Ok(insert_row(&mut insert, task, at)? > 0)
}

/// The statement of [`insert_task_row`], for [`insert_row_as`].
pub(super) const INSERT_TASK_ROW: &str = "INSERT INTO tasks (id, job_id, module, payload, priority, options, state, not_before, pending_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'Pending', ?7, ?8) ON CONFLICT(id) DO NOTHING";

pub(super) fn insert_event(
    tx: &rusqlite::Transaction<'_>,
    mut event: Event,
) -> rusqlite::Result<Event> {
    tx.prepare_cached(
        "INSERT INTO events (task_id, job_id, state, attempt, worker, at, error_kind, message, run_us, wait_us)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        event.task_id,
        event.job_id,
        event.state.as_str(),
        event.attempt,
        event.worker,
        event.at as i64,
        event.error_kind.map(|k| k.as_str()),
        event.message,
        event.run_us.map(|us| us as i64),
        event.wait_us.map(|us| us as i64)
    ])?;
    event.offset = tx.last_insert_rowid() as u64;
    Ok(event)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::model::{ModuleId, TaskOptions};
    use std::collections::BTreeMap;

    pub(in crate::queue::embedded) fn task(id: &str) -> NewTask {
        NewTask {
            id: id.into(),
            job_id: None,
            module: ModuleId::of(b"module"),
            payload: b"{\"x\":1}".to_vec(),
            options: TaskOptions {
                tags: BTreeMap::from([("desk".to_string(), "fx".to_string())]),
                ..TaskOptions::default()
            },
        }
    }

    /// An attempt's transitions of `task`: Allocated and Running by w1,
    /// then Error (a retry), Allocated and Running by w2, then Completed.
    pub(in crate::queue::embedded) fn life(task: &NewTask, tags: &Tags) -> Vec<Op> {
        let step = |to, attempt, at, worker: &str| {
            let mut t = Transition::new(
                task.id.as_str().into(),
                None,
                task.module.clone(),
                tags.clone(),
                None,
                to,
                attempt,
            );
            t.at = at;
            t.carried.worker = Some(worker.to_string());
            t
        };
        let mut failed = step(TaskState::Error, 1, 1_003, "w1");
        failed.carried.error = Some((ErrorKind::GuestError, "first try".into()));
        failed.carried.not_before = Some(1_500);
        failed.carried.run_us = Some(7);
        let mut done = step(TaskState::Completed, 2, 1_600, "w2");
        done.carried.result = Some(b"42".to_vec());
        done.carried.logs = Some(Vec::new());
        done.carried.progress = Some(1.0);
        done.carried.run_us = Some(9);
        [
            step(TaskState::Allocated, 1, 1_001, "w1"),
            step(TaskState::Running, 1, 1_002, "w1"),
            failed,
            step(TaskState::Allocated, 2, 1_501, "w2"),
            step(TaskState::Running, 2, 1_502, "w2"),
            done,
        ]
        .into_iter()
        .map(|t| Op::Transition(Box::new(t)))
        .collect()
    }

    pub(in crate::queue::embedded) fn command(ops: Vec<Op>) -> Command {
        let weight = Weight::of(&ops);
        Command {
            ops,
            done: None,
            weight,
        }
    }

    fn writer(dir: &std::path::Path) -> Writer {
        let conn = super::super::schema::open(&dir.join("w.db"), true).unwrap();
        Writer::start(
            conn,
            Checkpointer::start(&dir.join("w.db")).unwrap(),
            broadcast::channel(16).0,
            Arc::new(RwLock::new(Vec::new())),
            Arc::new(StoreHealth::default()),
            false,
        )
    }

    /// Ops whose notice reports the thread it ran on.
    fn noticed(mut ops: Vec<Op>) -> (Vec<Op>, std::sync::mpsc::Receiver<Option<String>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        ops.push(Op::Notify(Box::new(move || {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        })));
        (ops, rx)
    }

    #[test]
    fn an_idle_writer_lets_the_caller_commit_and_a_busy_one_keeps_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let writer = writer(dir.path());
        let first = task("t-idle");
        let tags: Tags = Arc::new(first.options.tags.clone());

        // Idle: committed (and its notice run) on this thread, before
        // `send_now` returns.
        let (ops, ran) = noticed(vec![Op::NewTasks(
            vec![(first.clone(), tags.clone())],
            1_000,
        )]);
        writer.send_now(ops);
        let here = std::thread::current().name().map(str::to_string);
        assert_eq!(ran.try_recv().unwrap(), here);
        assert_eq!(writer.backlog.commands(), 0);

        // Busy (the writer holds a queued insert it cannot write yet): an
        // outcome sent meanwhile waits its turn behind it, on the writer.
        let second = task("t-busy");
        let held = writer.core.lock().unwrap();
        writer.send(vec![Op::NewTasks(
            vec![(second.clone(), tags.clone())],
            2_000,
        )]);
        let (ops, ran) = noticed(life(&second, &tags));
        writer.send_now(ops);
        assert!(
            ran.try_recv().is_err(),
            "committed ahead of the queued insert"
        );
        drop(held);
        let thread = ran
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        assert_eq!(thread.as_deref(), Some("kwq-store-writer"));
        let core = writer.core.lock().unwrap();
        let state: String = core
            .conn
            .query_row("SELECT state FROM tasks WHERE id = 't-busy'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(state, "Completed");
    }
}
