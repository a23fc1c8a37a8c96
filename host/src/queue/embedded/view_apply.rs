//! How the store's writer applies what a Kafka host's view reads from the
//! event topic: task events, applied only if they move the task forward,
//! and job announcements, which create the job's Pending rows.

use super::writer::{
    Carried, INSERT_TASK_ROW, Op, Passed, Tags, Transition, apply_transition_via, insert_row_as,
    insert_task_row, log_pending, log_transition, update_task_row,
};
use crate::model::{JobRecord, Millis, ModuleId, NewTask, TaskState};
use crate::queue::Committed;
use rusqlite::{OptionalExtension, params};
use std::collections::HashMap;
use std::sync::Arc;

/// A task event as a view receives it from the event topic: the transition,
/// what the state carries, and (on the first events of a task) its definition
/// so a view that never saw the task submitted can create its row.
#[derive(Debug, Clone)]
pub(crate) struct RemoteTask {
    pub(crate) task_id: String,
    pub(crate) job_id: Option<String>,
    pub(crate) state: TaskState,
    pub(crate) attempt: u32,
    pub(crate) at: Millis,
    pub(crate) carried: Carried,
    /// Module and options of the task (payload not needed by a view).
    pub(crate) spec: Option<(ModuleId, crate::model::TaskOptions)>,
    /// When the task was Allocated, if this event carries its Allocated
    /// too (Kafka hosts write none of their own: wire v2 puts it on
    /// Running, or on the outcome of a task that ended without starting).
    /// Applied with the event in one update of the row, logged as its own
    /// event before it.
    pub(crate) allocated_at: Option<Millis>,
}

/// Whether an event (`state`, `attempt`) moves a task that is in
/// (`current`, `attempts`) forward. Events of one task can arrive twice (a
/// host applies its own events at once and again when it reads them back)
/// and out of order (a replayed attempt after a crash), so a view applies
/// only those that move the task on: nothing leaves a final state; a final
/// state always wins over an unfinished one; a later attempt wins; within
/// one attempt the later state in a task's life wins.
pub(crate) fn supersedes(
    current: TaskState,
    attempts: u32,
    state: TaskState,
    attempt: u32,
) -> bool {
    fn rank(state: TaskState) -> u8 {
        match state {
            TaskState::Waiting => 0,
            TaskState::Pending => 1,
            TaskState::Allocated => 2,
            TaskState::Running => 3,
            TaskState::Error => 4,
            TaskState::Completed | TaskState::Dead | TaskState::Cancelled => 5,
        }
    }
    if current.is_terminal() {
        return false;
    }
    if state.is_terminal() || attempt > attempts {
        return true;
    }
    attempt == attempts && rank(state) > rank(current)
}

/// A view learns of a job: one Pending row per task written so far
/// (`<job>.<index>` below `expanded`: every task of an explicit job; a
/// lazily expanded sweep's rows come with its `expanded` events), so
/// counts and listings are right before any host runs one.
pub(super) fn apply_remote_job(
    tx: &rusqlite::Transaction<'_>,
    job: &JobRecord,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    let points = 0..job.expanded.min(job.total);
    insert_points(
        tx,
        &job.id,
        &job.module,
        &job.options,
        job.created_at,
        points,
        committed,
    )
}

/// The Pending rows, and events, of a job's points `indices`, but those an
/// event that overtook the job made already. The points share the job's
/// options: serialized once, and the statement prepared once (per point
/// they cost a clone, a serialization and a statement lookup before).
fn insert_points(
    tx: &rusqlite::Transaction<'_>,
    job: &str,
    module: &ModuleId,
    options: &crate::model::TaskOptions,
    at: Millis,
    indices: std::ops::Range<u64>,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    let tags: Tags = Arc::new(options.tags.clone());
    let stored = serde_json::to_string(options).unwrap_or_default();
    let mut point = NewTask {
        id: String::new(),
        job_id: Some(job.to_string()),
        module: module.clone(),
        payload: Vec::new(),
        options: options.clone(),
    };
    let mut insert = tx.prepare_cached(INSERT_TASK_ROW)?;
    for index in indices {
        point.id = format!("{job}.{index}");
        if insert_row_as(&mut insert, &point, &stored, at)? > 0 {
            log_pending(tx, &point, &tags, at, committed)?;
        }
    }
    Ok(())
}

/// A view learns that points `from..to` of a lazily expanded sweep job
/// were written: their Pending rows (those not already made by an event
/// that overtook this one), and the job's `expanded` mark. Nothing if the
/// job's announcement has not been read yet: it is on the same partition,
/// earlier, so this change is read again after it.
pub(super) fn apply_remote_expanded(
    tx: &rusqlite::Transaction<'_>,
    job: &str,
    from: u64,
    to: u64,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    let known: Option<(String, String, i64, i64)> = tx
        .prepare_cached("SELECT module, options, total, created_at FROM jobs WHERE id = ?1")?
        .query_row(params![job], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((module, options, total, created_at)) = known else {
        return Ok(());
    };
    let Some(module) = ModuleId::read(&module) else {
        return Ok(());
    };
    let options: crate::model::TaskOptions = serde_json::from_str(&options).unwrap_or_default();
    let to = to.min(total as u64);
    let at = created_at as Millis;
    insert_points(tx, job, &module, &options, at, from..to, committed)?;
    tx.prepare_cached("UPDATE jobs SET expanded = MAX(expanded, ?2) WHERE id = ?1")?
        .execute(params![job, to as i64])?;
    job_released(tx, job)
}

/// A job's points are written only once it is released from waiting: a
/// view that learns of one (its `expanded` event, or an event of one of its
/// tasks, which can overtake that event on another partition) marks the
/// job released and stops watching its dependencies.
fn job_released(tx: &rusqlite::Transaction<'_>, job: &str) -> rusqlite::Result<()> {
    let released = tx
        .prepare_cached("UPDATE jobs SET waiting = 0 WHERE id = ?1 AND waiting = 1")?
        .execute(params![job])?;
    if released > 0 {
        super::dependencies::forget_waiter(tx, job)?;
    }
    Ok(())
}

/// Events of one batch whose task's next event is in the same batch:
/// each one's successor (state and attempt), so that the row update of a
/// Running (or Allocated) the next event moves on from can be put off and
/// made once, with the next one ([`PutOff`]). On a Kafka view most tasks'
/// Running and outcome arrive in one batch: their row was updated twice,
/// moving both state indexes twice, for one state the row ends in.
#[derive(Default)]
pub(super) struct Successors {
    /// Keyed by the event's address in the batch, which outlives this.
    next: HashMap<*const RemoteTask, (TaskState, u32)>,
}

impl Successors {
    /// The successors in `ops` (a batch, in order). Only events with no
    /// other operation between them count: anything else may touch the task.
    pub(super) fn of<'a>(ops: impl DoubleEndedIterator<Item = &'a Op>) -> Self {
        let mut next = HashMap::new();
        let mut later: HashMap<&str, (TaskState, u32)> = HashMap::new();
        for op in ops.rev() {
            match op {
                Op::Remote(remote) => {
                    let this = (remote.state, remote.attempt);
                    if let Some(after) = later.insert(remote.task_id.as_str(), this)
                        && matches!(remote.state, TaskState::Allocated | TaskState::Running)
                    {
                        next.insert(std::ptr::from_ref(&**remote), after);
                    }
                }
                Op::ViewOffset { .. } => {}
                _ => later.clear(),
            }
        }
        Successors { next }
    }

    fn of_event(&self, remote: &RemoteTask) -> Option<(TaskState, u32)> {
        self.next.get(&std::ptr::from_ref(remote)).copied()
    }
}

/// Row updates put off within a batch (see [`Successors`]): by task, the
/// transition whose update waits (its event is logged) and what it passed.
#[derive(Default)]
pub(super) struct PutOff {
    rows: HashMap<String, (Transition, Passed)>,
}

impl PutOff {
    /// Make every update still put off (before anything else touches the
    /// tasks, and before the commit). Normally none is left: each one's
    /// next event makes it.
    pub(super) fn flush(&mut self, tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
        for (_, (t, passed)) in self.rows.drain() {
            update_task_row(tx, &t, &passed)?;
        }
        Ok(())
    }
}

/// Apply an event from the event topic if it moves its task forward.
/// Returns what the task waits for if the event made it Waiting (its
/// dependencies are then watched); a task leaving Waiting waits no more.
/// `successors` tells whether the task's next event is in the batch; if
/// it moves the task on from this one, this one's row update is put off.
pub(super) fn apply_remote(
    tx: &rusqlite::Transaction<'_>,
    remote: &RemoteTask,
    successors: &Successors,
    put_off: &mut PutOff,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<Option<Vec<String>>> {
    // The row as the batch left it, if its last update was put off.
    let waiting = put_off.rows.remove(&remote.task_id);
    let (from, module, tags, after) = match &waiting {
        Some((t, _)) => (
            Some((t.to, t.attempt)),
            t.module.clone(),
            t.tags.clone(),
            Vec::new(),
        ),
        None => match read_task(tx, remote)? {
            Some(found) => found,
            None => return Ok(None),
        },
    };
    let moves_on = |from: Option<(TaskState, u32)>, state: TaskState| {
        from.is_none_or(|(current, attempts)| supersedes(current, attempts, state, remote.attempt))
    };
    // The Allocated this event carries, if it moves the task on; the event
    // itself then moves on from there.
    let allocated_at = remote
        .allocated_at
        .filter(|_| remote.state != TaskState::Allocated && moves_on(from, TaskState::Allocated));
    let before = match allocated_at {
        Some(_) => Some((TaskState::Allocated, remote.attempt)),
        None => from,
    };
    let mut passed = Passed::default();
    if let Some((t, earlier)) = waiting {
        if !moves_on(before, remote.state) {
            // Not expected (its successor was known to move on), but the
            // row must not miss the update that waited.
            update_task_row(tx, &t, &earlier)?;
            return Ok(None);
        }
        passed = earlier;
    }
    if !moves_on(before, remote.state) {
        return Ok(None);
    }
    let mut t = Transition::new(
        Arc::from(remote.task_id.as_str()),
        remote.job_id.as_deref().map(Arc::from),
        module,
        tags,
        before.map(|(state, _)| state),
        remote.state,
        remote.attempt,
    );
    t.at = remote.at;
    t.carried = remote.carried.clone();
    if let Some(at) = allocated_at {
        // Its Allocated event (with the wait) first, then this one.
        let mut allocated = t.clone();
        allocated.from = from.map(|(state, _)| state);
        allocated.to = TaskState::Allocated;
        allocated.at = at;
        log_transition(tx, &allocated, committed)?;
        t.carried.wait_us = None;
        passed.allocated_at = Some(at);
    }
    let from = from.map(|(state, _)| state);
    if from == Some(TaskState::Waiting) {
        super::dependencies::forget_waiter(tx, &remote.task_id)?;
    }
    let next_moves_on = successors
        .of_event(remote)
        .is_some_and(|(state, attempt)| supersedes(remote.state, remote.attempt, state, attempt));
    if next_moves_on && matches!(t.to, TaskState::Allocated | TaskState::Running) {
        log_transition(tx, &t, committed)?;
        match t.to {
            TaskState::Allocated => passed.allocated_at = Some(t.at),
            _ => passed.running_at = Some(t.at),
        }
        if t.carried.worker.is_some() {
            passed.worker = t.carried.worker.clone();
        }
        put_off.rows.insert(remote.task_id.clone(), (t, passed));
        return Ok(None);
    }
    apply_transition_via(tx, &t, &passed, committed)?;
    let waits = remote.state == TaskState::Waiting && from.is_none() && !after.is_empty();
    Ok(waits.then_some(after))
}

/// The task of `remote` as the store holds it (state and attempts, module,
/// tags, what it waits for), created from the event if the store has no
/// row and the event says what the task is; `None` if it can do neither.
#[allow(clippy::type_complexity)]
fn read_task(
    tx: &rusqlite::Transaction<'_>,
    remote: &RemoteTask,
) -> rusqlite::Result<Option<(Option<(TaskState, u32)>, ModuleId, Tags, Vec<String>)>> {
    let current: Option<(String, u32, String, String)> = tx
        .prepare_cached("SELECT state, attempts, module, options FROM tasks WHERE id = ?1")?
        .query_row(params![remote.task_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    if let Some((state, attempts, module, options)) = current {
        let state = TaskState::parse(&state).unwrap_or(TaskState::Pending);
        let options: crate::model::TaskOptions = serde_json::from_str(&options).unwrap_or_default();
        return Ok(Some((
            Some((state, attempts)),
            ModuleId::read(&module).unwrap_or_else(|| ModuleId::of(b"")),
            Arc::new(options.tags),
            options.after,
        )));
    }
    // A task this view has not seen: only an event that says what it is can create it.
    let Some((module, options)) = &remote.spec else {
        return Ok(None);
    };
    let task = NewTask {
        id: remote.task_id.clone(),
        job_id: remote.job_id.clone(),
        module: module.clone(),
        payload: Vec::new(),
        options: options.clone(),
    };
    insert_task_row(tx, &task, remote.at)?;
    if let Some(job) = remote
        .job_id
        .as_deref()
        .filter(|_| remote.state != TaskState::Waiting)
    {
        job_released(tx, job)?;
    }
    Ok(Some((
        None,
        module.clone(),
        Arc::new(options.tags.clone()),
        options.after.clone(),
    )))
}

/// Log an event; it comes back with its offset.
#[cfg(test)]
mod tests {
    use super::supersedes;
    use crate::model::TaskState::*;

    #[test]
    fn only_events_that_move_a_task_forward_apply() {
        // A host reading back its own event, or a late duplicate: no change.
        assert!(!supersedes(Running, 1, Running, 1));
        assert!(!supersedes(Running, 1, Allocated, 1));
        assert!(!supersedes(Error, 1, Pending, 0));
        // Forward within an attempt, and a new attempt.
        assert!(supersedes(Allocated, 1, Running, 1));
        assert!(supersedes(Error, 1, Allocated, 2));
        // A final state wins over anything unfinished, even from an older
        // attempt (a slow host finishing a replayed task)...
        assert!(supersedes(Running, 2, Completed, 1));
        assert!(supersedes(Pending, 0, Cancelled, 0));
        // ...and nothing leaves a final state.
        assert!(!supersedes(Completed, 1, Completed, 2));
        assert!(!supersedes(Cancelled, 0, Allocated, 1));
        assert!(!supersedes(Dead, 3, Running, 4));
    }

    /// Tells which moves (from, to) the store's commits reported.
    #[derive(Default)]
    struct Moves(std::sync::Mutex<Vec<(Option<crate::model::TaskState>, crate::model::TaskState)>>);

    impl crate::queue::CommitObserver for Moves {
        fn committed(&self, batch: &[crate::queue::Committed]) {
            let mut moves = self.0.lock().unwrap();
            moves.extend(batch.iter().map(|c| (c.from, c.event.state)));
        }
    }

    #[tokio::test]
    async fn a_running_and_its_outcome_read_together_update_the_row_once_and_lose_nothing() {
        use super::super::{Carried, EmbeddedQueue, RemoteTask, ViewChange};
        use crate::model::{ModuleId, TaskOptions, TaskState};
        use crate::queue::{ReadStore, WorkQueue};
        let dir = tempfile::tempdir().unwrap();
        let view = EmbeddedQueue::open_view(&dir.path().join("view.db")).unwrap();
        let moves = std::sync::Arc::new(Moves::default());
        view.observe(moves.clone());
        let event = |state: TaskState, attempt, at, worker: Option<&str>, allocated_at| {
            ViewChange::Task(Box::new(RemoteTask {
                task_id: "t-1".into(),
                job_id: None,
                state,
                attempt,
                at,
                carried: Carried {
                    worker: worker.map(String::from),
                    result: (state == Completed).then(|| b"42".to_vec()),
                    ..Carried::default()
                },
                spec: Some((ModuleId::of(b"m"), TaskOptions::default())),
                allocated_at,
            }))
        };
        view.apply_view(vec![event(Pending, 0, 10, None, None)]);
        // One batch: the Running (carrying its Allocated) and the outcome.
        view.apply_view(vec![
            event(Running, 1, 30, Some("w-1"), Some(20)),
            event(Completed, 1, 40, None, None),
        ]);
        view.flush().await.unwrap();
        let task = view.task(&"t-1".to_string()).await.unwrap();
        assert_eq!(task.state, Completed);
        assert_eq!(task.worker.as_deref(), Some("w-1"));
        assert_eq!(task.result.as_deref(), Some(&b"42"[..]));
        for (state, at) in [
            (Pending, 10),
            (Allocated, 20),
            (Running, 30),
            (Completed, 40),
        ] {
            assert_eq!(task.timestamps.get(&state), Some(&at), "{state}");
        }
        assert_eq!(
            *moves.0.lock().unwrap(),
            vec![
                (None, Pending),
                (Some(Pending), Allocated),
                (Some(Allocated), Running),
                (Some(Running), Completed)
            ]
        );
    }
}
