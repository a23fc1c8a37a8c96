//! A new task whose first attempt (or attempts) ends in the very commit
//! that inserts it: a synchronous invocation's held insert, stored with
//! its outcome. Its row goes in once, as the transitions leave it, rather
//! than inserted Pending and then updated: on the commit a waiting caller
//! waits for, two statements and a few index pages fewer.

use super::super::Committed;
use super::writer::{Op, Tags, Transition, log_pending, log_transition};
use crate::model::{ErrorKind, LogLine, Micros, Millis, NewTask, TaskState};
use rusqlite::params;

/// A new task's transitions that follow its insert in the same commit.
/// Its row is inserted once, as they leave it (the same row the insert and
/// the updates one by one would leave), and every event is logged.
pub(super) struct ShortLife<'a> {
    transitions: Vec<&'a Transition>,
    /// Operations after the insert that this covers (its transitions and
    /// the notifications among them, which write nothing).
    pub(super) consumed: usize,
}

impl<'a> ShortLife<'a> {
    /// The transitions of `task` that follow its insert at once (only
    /// notifications between them), if any.
    pub(super) fn ahead(task: &NewTask, ops: impl Iterator<Item = &'a Op>) -> Option<Self> {
        let mut life = ShortLife {
            transitions: Vec::new(),
            consumed: 0,
        };
        let mut seen = 0;
        for op in ops {
            match op {
                Op::Notify(_) => seen += 1,
                Op::Transition(t) if *t.task_id == *task.id => {
                    seen += 1;
                    life.transitions.push(t);
                    life.consumed = seen;
                }
                _ => break,
            }
        }
        (!life.transitions.is_empty()).then_some(life)
    }

    /// Insert the row as the transitions leave it and log every event
    /// (Pending first).
    pub(super) fn insert(
        &self,
        tx: &rusqlite::Transaction<'_>,
        task: &NewTask,
        tags: &Tags,
        at: Millis,
        committed: &mut Vec<Committed>,
    ) -> rusqlite::Result<()> {
        let row = FinalRow::after(task, at, &self.transitions);
        tx.prepare_cached(
            "INSERT INTO tasks (id, job_id, module, payload, priority, options, state, attempts,
             worker, not_before, pending_at, allocated_at, running_at, completed_at, error_at,
             dead_at, cancelled_at, error_kind, error_message, result, logs, progress, run_us)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
             ?18, ?19, ?20, ?21, ?22, ?23)",
        )?
        .execute(params![
            task.id,
            task.job_id,
            task.module.as_str(),
            task.payload,
            task.options.priority,
            serde_json::to_string(&task.options).unwrap_or_default(),
            row.state.as_str(),
            row.attempts,
            row.worker,
            row.not_before.map(|t| t as i64),
            row.at(TaskState::Pending),
            row.at(TaskState::Allocated),
            row.at(TaskState::Running),
            row.at(TaskState::Completed),
            row.at(TaskState::Error),
            row.at(TaskState::Dead),
            row.at(TaskState::Cancelled),
            row.error.map(|(kind, _)| kind.as_str()),
            row.error.map(|(_, message)| message),
            row.result,
            row.logs
                .map(|l| serde_json::to_string(l).unwrap_or_default()),
            f64::from(row.progress),
            row.run_us.map(|us| us as i64)
        ])?;
        log_pending(tx, task, tags, at, committed)?;
        for t in &self.transitions {
            log_transition(tx, t, committed)?;
        }
        Ok(())
    }
}

/// A task row as an insert and then [`transition_sql`]'s updates, one by
/// one, would leave it (the same `COALESCE` rules, column by column).
struct FinalRow<'a> {
    state: TaskState,
    attempts: u32,
    worker: Option<&'a str>,
    not_before: Option<Millis>,
    entered: [Option<Millis>; TaskState::ALL.len()],
    error: Option<(ErrorKind, &'a str)>,
    result: Option<&'a [u8]>,
    logs: Option<&'a Vec<LogLine>>,
    progress: f32,
    run_us: Option<Micros>,
}

impl<'a> FinalRow<'a> {
    fn after(task: &NewTask, at: Millis, transitions: &[&'a Transition]) -> Self {
        let mut row = FinalRow {
            state: TaskState::Pending,
            attempts: 0,
            worker: None,
            not_before: task.options.not_before,
            entered: Default::default(),
            error: None,
            result: None,
            logs: None,
            progress: 0.0,
            run_us: None,
        };
        row.entered[TaskState::Pending.index()] = Some(at);
        for t in transitions {
            let carried = &t.carried;
            row.state = t.to;
            row.attempts = t.attempt;
            row.worker = carried.worker.as_deref().or(row.worker);
            row.entered[t.to.index()] = Some(t.at);
            if let Some((kind, message)) = &carried.error {
                row.error = Some((*kind, message.as_str()));
            }
            row.result = carried.result.as_deref().or(row.result);
            row.logs = carried.logs.as_ref().or(row.logs);
            row.progress = carried.progress.unwrap_or(row.progress);
            row.not_before = carried.not_before;
            row.run_us = carried.run_us.or(row.run_us);
        }
        row
    }

    fn at(&self, state: TaskState) -> Option<i64> {
        self.entered[state.index()].map(|at| at as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::writer::tests::{command, life, task};
    use super::super::writer::{Op, Tags, apply};
    use crate::model::TaskState;
    use rusqlite::Connection;
    use std::sync::Arc;

    /// Every column of the task's row, its events and its tags, as text.
    fn stored(conn: &Connection, id: &str) -> Vec<String> {
        let mut rows = Vec::new();
        for sql in [
            "SELECT * FROM tasks WHERE id = ?1",
            "SELECT task_id, job_id, state, attempt, worker, at, error_kind, message, run_us, wait_us FROM events WHERE task_id = ?1 ORDER BY offset",
            "SELECT tag FROM task_tags WHERE seq = (SELECT seq FROM tasks WHERE id = ?1)",
        ] {
            let mut statement = conn.prepare(sql).unwrap();
            let columns = statement.column_count();
            let found = statement
                .query_map([id], |row| {
                    Ok((0..columns)
                        .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
                        .collect::<Vec<_>>()
                        .join("|"))
                })
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            rows.extend(found);
        }
        rows
    }

    #[test]
    fn a_task_inserted_with_its_attempts_in_one_commit_is_stored_as_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let task = task("t-life");
        let tags: Tags = Arc::new(task.options.tags.clone());

        // One by one: the insert, then each transition in its own commit.
        let mut apart = super::super::schema::open(&dir.path().join("apart.db"), true).unwrap();
        apply(
            &mut apart,
            &mut Default::default(),
            &[command(vec![Op::NewTasks(
                vec![(task.clone(), tags.clone())],
                1_000,
            )])],
        )
        .unwrap();
        for op in life(&task, &tags) {
            apply(&mut apart, &mut Default::default(), &[command(vec![op])]).unwrap();
        }

        // Together (a notice between, as an invocation's held insert has).
        let mut together =
            super::super::schema::open(&dir.path().join("together.db"), true).unwrap();
        let mut ops = vec![
            Op::NewTasks(vec![(task.clone(), tags.clone())], 1_000),
            Op::Notify(Box::new(|| {})),
        ];
        ops.extend(life(&task, &tags));
        let committed = apply(&mut together, &mut Default::default(), &[command(ops)])
            .unwrap()
            .committed;
        let states: Vec<TaskState> = committed.iter().map(|c| c.event.state).collect();
        assert_eq!(
            states,
            [
                TaskState::Pending,
                TaskState::Allocated,
                TaskState::Running,
                TaskState::Error,
                TaskState::Allocated,
                TaskState::Running,
                TaskState::Completed
            ]
        );

        let (apart, together) = (stored(&apart, "t-life"), stored(&together, "t-life"));
        assert_eq!(apart.len(), 1 + 7 + 1, "{apart:#?}");
        assert_eq!(apart, together);
    }

    #[test]
    fn only_the_new_tasks_own_transitions_are_folded_into_its_insert() {
        let dir = tempfile::tempdir().unwrap();
        let (first, other) = (task("t-first"), task("t-other"));
        let tags: Tags = Arc::new(first.options.tags.clone());
        let mut conn = super::super::schema::open(&dir.path().join("s.db"), true).unwrap();
        apply(
            &mut conn,
            &mut Default::default(),
            &[command(vec![Op::NewTasks(
                vec![(other.clone(), tags.clone())],
                900,
            )])],
        )
        .unwrap();
        // The other task's transition follows the insert: nothing to fold,
        // and it still applies to its own row.
        let mut ops = vec![Op::NewTasks(vec![(first.clone(), tags.clone())], 1_000)];
        ops.extend(life(&other, &tags).into_iter().take(1));
        apply(&mut conn, &mut Default::default(), &[command(ops)]).unwrap();
        let state = |id: &str| -> String {
            conn.query_row("SELECT state FROM tasks WHERE id = ?1", [id], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(state("t-first"), "Pending");
        assert_eq!(state("t-other"), "Allocated");
    }
}
