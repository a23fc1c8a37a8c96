//! How the store's writer applies what a Kafka host's view reads from the
//! event topic: task events, applied only if they move the task forward,
//! and job announcements, which create the job's Pending rows.

use super::writer::{
    Carried, Tags, Transition, apply_transition_via, insert_task_row, log_pending, log_transition,
};
use crate::model::{JobRecord, Millis, ModuleId, NewTask, TaskState};
use crate::queue::Committed;
use rusqlite::{OptionalExtension, params};
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
    let tags: Tags = Arc::new(job.options.tags.clone());
    for index in 0..job.expanded.min(job.total) {
        let task = NewTask {
            id: format!("{}.{index}", job.id),
            job_id: Some(job.id.clone()),
            module: job.module.clone(),
            payload: Vec::new(),
            options: job.options.clone(),
        };
        if insert_task_row(tx, &task, job.created_at)? {
            log_pending(tx, &task, &tags, job.created_at, committed)?;
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
    let tags: Tags = Arc::new(options.tags.clone());
    let to = to.min(total as u64);
    for index in from..to {
        let task = NewTask {
            id: format!("{job}.{index}"),
            job_id: Some(job.to_string()),
            module: module.clone(),
            payload: Vec::new(),
            options: options.clone(),
        };
        if insert_task_row(tx, &task, created_at as Millis)? {
            log_pending(tx, &task, &tags, created_at as Millis, committed)?;
        }
    }
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

/// Apply an event from the event topic if it moves its task forward.
/// Returns what the task waits for if the event made it Waiting (its
/// dependencies are then watched); a task leaving Waiting waits no more.
pub(super) fn apply_remote(
    tx: &rusqlite::Transaction<'_>,
    remote: &RemoteTask,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<Option<Vec<String>>> {
    let current: Option<(String, u32, String, String)> = tx
        .prepare_cached("SELECT state, attempts, module, options FROM tasks WHERE id = ?1")?
        .query_row(params![remote.task_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let (from, module, options) = match current {
        Some((state, attempts, module, options)) => {
            let state = TaskState::parse(&state).unwrap_or(TaskState::Pending);
            let options: crate::model::TaskOptions =
                serde_json::from_str(&options).unwrap_or_default();
            (
                Some((state, attempts)),
                ModuleId::read(&module).unwrap_or_else(|| ModuleId::of(b"")),
                options,
            )
        }
        None => {
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
            (None, module.clone(), options.clone())
        }
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
    if !moves_on(before, remote.state) {
        return Ok(None);
    }
    let after = options.after.clone();
    let mut t = Transition::new(
        Arc::from(remote.task_id.as_str()),
        remote.job_id.as_deref().map(Arc::from),
        module,
        Arc::new(options.tags),
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
    }
    apply_transition_via(tx, &t, allocated_at, committed)?;
    let from = from.map(|(state, _)| state);
    if from == Some(TaskState::Waiting) {
        super::dependencies::forget_waiter(tx, &remote.task_id)?;
    }
    let waits = remote.state == TaskState::Waiting && from.is_none() && !after.is_empty();
    Ok(waits.then_some(after))
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
}
