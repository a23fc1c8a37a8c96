//! Dependencies on the embedded store, the writer's half. A task or job
//! that names `after` is stored Waiting, with one `dependencies` row per
//! (dependency, waiter). Whenever a batch ends a task, or finishes a job,
//! that some waiter names, the same transaction settles it: each waiter
//! whose dependencies have all ended becomes Pending (its tasks, for a
//! job), and one whose dependency failed becomes Cancelled with
//! `dependency_failed: <id>` (unless it said `on_failure: run`). Release
//! and the end that caused it are one commit, so a crash cannot fall
//! between them; start-up settles every dependency once more anyway.
//!
//! The writer keeps the ids that have waiters in memory ([`Watched`]), so
//! the many tasks nobody waits for cost one hash lookup each.

use crate::model::{Event, Millis, ModuleId, OnFailure, TaskOptions, TaskState};
use crate::queue::{Committed, SettledJob};
use rusqlite::{OptionalExtension, Transaction, params};
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::sync::Arc;

/// Ids of the tasks and jobs some waiter still waits for: the writer's
/// memory of the `dependencies` table's first column. It grows with
/// dependencies not yet ended, never with finished tasks.
#[derive(Debug, Default)]
pub(super) struct Watched {
    ids: HashSet<String>,
    /// A Kafka host's view: waiters are released by whichever host holds
    /// them, so settling only reports the dependencies that ended
    /// ([`settle`]); the waiters leave Waiting when their events arrive.
    reports_only: bool,
}

impl Watched {
    /// Every dependency the store holds, read when the writer starts.
    pub(super) fn load(conn: &rusqlite::Connection, reports_only: bool) -> rusqlite::Result<Self> {
        let mut stmt = conn.prepare("SELECT DISTINCT dependency FROM dependencies")?;
        let ids = stmt.query_map([], |row| row.get(0))?;
        Ok(Watched {
            ids: ids.collect::<Result<_, _>>()?,
            reports_only,
        })
    }

    /// Nothing watched (the store's table could not be read).
    pub(super) fn empty(reports_only: bool) -> Self {
        Watched {
            ids: HashSet::new(),
            reports_only,
        }
    }

    /// Whether some waiter may wait for `id`.
    pub(super) fn contains(&self, id: &str) -> bool {
        self.ids.contains(id)
    }

    /// Every watched id (to settle them all at start-up).
    pub(super) fn all(&self) -> Vec<String> {
        self.ids.iter().cloned().collect()
    }

    /// Whether this store only reports ended dependencies (a Kafka view).
    pub(super) fn reports_only(&self) -> bool {
        self.reports_only
    }
}

/// What a batch may have ended, gathered while it is applied and settled
/// once at its end (a thousand completions of one job cost one check).
#[derive(Debug, Default)]
pub(super) struct Settling {
    ids: BTreeSet<String>,
}

impl Settling {
    /// `id` (a task or job) may have ended: settle it if someone waits for it.
    pub(super) fn may_have_ended(&mut self, watched: &Watched, id: &str) {
        if watched.contains(id) {
            self.ids.insert(id.to_string());
        }
    }

    /// Settle `id` at the end of the batch even if nobody watched it when
    /// the batch began.
    pub(super) fn settle_anyway(&mut self, id: String) {
        self.ids.insert(id);
    }

    /// Whether there is nothing to settle.
    pub(super) fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// `waiter` waits for each of `after`: its rows, and the ids watched.
/// Ids that have already ended are settled at the end of the batch.
pub(super) fn wait(
    tx: &Transaction<'_>,
    watched: &mut Watched,
    settling: &mut Settling,
    waiter: &str,
    after: &[String],
) -> rusqlite::Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT OR IGNORE INTO dependencies (dependency, waiter) VALUES (?1, ?2)",
    )?;
    for dependency in after {
        insert.execute(params![dependency, waiter])?;
        watched.ids.insert(dependency.clone());
        settling.settle_anyway(dependency.clone());
    }
    Ok(())
}

/// A task left Waiting some other way (a user cancelled it): it no longer
/// waits for anything.
pub(super) fn forget_waiter(tx: &Transaction<'_>, waiter: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM dependencies WHERE waiter = ?1")?
        .execute(params![waiter])?;
    Ok(())
}

/// What settling found and did, for whom the commit tells.
#[derive(Debug, Default)]
pub(super) struct Settled {
    /// Waiting jobs released or cancelled.
    pub(super) jobs: Vec<SettledJob>,
    /// A Kafka view's report: dependencies some waiter names that have
    /// ended, and whether each Completed.
    pub(super) ended: Vec<(String, bool)>,
}

/// Settle what the batch may have ended (see the module's comment): the
/// events of released and cancelled tasks go to `committed`, the jobs to
/// `settled`. Cancelling a waiter ends it, so its own waiters are settled
/// too. A Kafka view ([`Watched::reports_only`]) changes no waiter: it
/// reports each watched dependency that has ended, as often as it is
/// asked, until no waiter names it.
pub(super) fn settle(
    tx: &Transaction<'_>,
    watched: &mut Watched,
    settling: Settling,
    at: Millis,
    committed: &mut Vec<Committed>,
    settled: &mut Settled,
) -> rusqlite::Result<()> {
    let mut work: VecDeque<String> = settling.ids.into_iter().collect();
    let mut decoded = Decoded::default();
    let jobs = &mut settled.jobs;
    while let Some(dependency) = work.pop_front() {
        if !watched.contains(&dependency) {
            continue;
        }
        let Some(completed) = ended(tx, &dependency, watched.reports_only)? else {
            continue;
        };
        if watched.reports_only {
            if is_named(tx, &dependency)? {
                settled.ended.push((dependency, completed));
            } else {
                watched.ids.remove(&dependency);
            }
            continue;
        }
        watched.ids.remove(&dependency);
        // Each waiter with its row if it is a task still Waiting, in one
        // query (a release of 100,000 lone tasks looked each up apart).
        let waiters: Vec<(String, Option<TaskRow>)> = tx
            .prepare_cached(
                "SELECT d.waiter, t.seq, t.module, t.options FROM dependencies d
                 LEFT JOIN tasks t ON t.id = d.waiter AND t.state = 'Waiting'
                 WHERE d.dependency = ?1",
            )?
            .query_map(params![dependency], |row| {
                let seq: Option<i64> = row.get(1)?;
                let task = match seq {
                    Some(seq) => Some((seq, row.get(2)?, row.get(3)?)),
                    None => None,
                };
                Ok((row.get(0)?, task))
            })?
            .collect::<Result<_, _>>()?;
        tx.prepare_cached("DELETE FROM dependencies WHERE dependency = ?1")?
            .execute(params![dependency])?;
        let mut released_tasks = Vec::new();
        for (waiter, task) in waiters {
            let found = match task {
                Some((seq, module, options)) => {
                    Some(decoded.waiter(&waiter, Some(seq), module, options))
                }
                None => Waiter::find_job(tx, &waiter, &mut decoded)?,
            };
            let Some(waiting) = found else {
                continue; // no longer waiting (cancelled by a user)
            };
            if !completed && waiting.options.on_failure == OnFailure::Cancel {
                let reason = format!("dependency_failed: {dependency}");
                forget_waiter(tx, &waiter)?;
                waiting.end(tx, TaskState::Cancelled, Some(&reason), at, committed)?;
                if waiting.is_job() {
                    jobs.push(SettledJob {
                        job: waiter.clone(),
                        released: false,
                    });
                }
                work.push_back(waiter);
            } else if !waiting.waits_for_more_than(&dependency) || !still_waits(tx, &waiter)? {
                if !waiting.is_job() {
                    released_tasks.push(waiting);
                    continue;
                }
                waiting.end(tx, TaskState::Pending, None, at, committed)?;
                jobs.push(SettledJob {
                    job: waiter.clone(),
                    released: true,
                });
                // A released job may already be done (no tasks left).
                work.push_back(waiter);
            }
        }
        release_tasks(tx, released_tasks, at, committed)?;
    }
    Ok(())
}

/// Move waiting tasks (not jobs) whose dependencies have all ended to
/// Pending, with their events: what [`Waiter::end`] does for one, in two
/// statements for all of them, as a job's release does (before, each
/// task cost two statement-cache lookups, an update and an insert).
fn release_tasks(
    tx: &Transaction<'_>,
    tasks: Vec<Waiter>,
    at: Millis,
    committed: &mut Vec<Committed>,
) -> rusqlite::Result<()> {
    if tasks.is_empty() {
        return Ok(());
    }
    let seqs: Vec<i64> = tasks.iter().filter_map(|task| task.task_seq).collect();
    tx.prepare_cached(
        "UPDATE tasks SET state = 'Pending', pending_at = ?2, error_message = NULL
         WHERE seq IN (SELECT value FROM json_each(?1))",
    )?
    .execute(params![json_list(&seqs), at as i64])?;
    let ids: Vec<&str> = tasks.iter().map(|task| task.id.as_str()).collect();
    let logged = log_events(tx, &ids, None, TaskState::Pending, RELEASED, at)?;
    // Logged in the order given, as the offsets show; by id otherwise.
    let in_order = logged.iter().zip(&ids).all(|((_, id), given)| id == given);
    let by_id: std::collections::HashMap<&str, &Waiter> = if in_order {
        Default::default()
    } else {
        tasks.iter().map(|task| (task.id.as_str(), task)).collect()
    };
    for (i, (offset, task_id)) in logged.into_iter().enumerate() {
        let task = if in_order {
            &tasks[i]
        } else {
            by_id[task_id.as_str()]
        };
        task.committed(offset, task_id, TaskState::Pending, None, at, committed);
    }
    Ok(())
}

/// `values` as a JSON array, for `json_each(?)`: how one statement takes
/// a list (SQLite binds no arrays).
fn json_list<T: serde::Serialize>(values: &[T]) -> String {
    serde_json::to_string(values).unwrap_or_else(|_| "[]".into())
}

/// Log one event per task of `task_ids`, alike but for the task, in one
/// statement: the offsets and task ids logged, in offset order.
fn log_events(
    tx: &Transaction<'_>,
    task_ids: &[&str],
    job_id: Option<&str>,
    to: TaskState,
    message: &str,
    at: Millis,
) -> rusqlite::Result<Vec<(u64, String)>> {
    let mut logged: Vec<(u64, String)> = tx
        .prepare_cached(
            "INSERT INTO events (task_id, job_id, state, attempt, worker, at, error_kind, message, run_us, wait_us)
             SELECT value, ?2, ?3, 0, NULL, ?4, NULL, ?5, NULL, NULL FROM json_each(?1)
             RETURNING offset, task_id",
        )?
        .query_map(
            params![json_list(task_ids), job_id, to.as_str(), at as i64, message],
            |row| Ok((row.get::<_, i64>(0)? as u64, row.get(1)?)),
        )?
        .collect::<Result<_, _>>()?;
    // SQLite does not promise RETURNING's order.
    logged.sort_unstable_by_key(|(offset, _)| *offset);
    Ok(logged)
}

/// The message of a released task's Pending event.
const RELEASED: &str = "released: its dependencies ended";

/// Whether `id` has ended and how: `Some(true)` if it Completed (a job:
/// every task of it), `Some(false)` if it ended otherwise, `None` if it
/// has not ended yet. One that does not exist was deleted (`Some(false)`),
/// except in a Kafka view (`view`): there the waiter's announcement can be
/// read before its dependency's, which another event partition carries,
/// and the dependency is then not read yet (`None`). Taking it for deleted
/// wrote `done/<id>` as failed and cancelled the waiters of a task still
/// waiting itself (a CI failure of the Kafka waiting-jobs test).
fn ended(tx: &Transaction<'_>, id: &str, view: bool) -> rusqlite::Result<Option<bool>> {
    let state: Option<String> = tx
        .prepare_cached("SELECT state FROM tasks WHERE id = ?1")?
        .query_row(params![id], |row| row.get(0))
        .optional()?;
    if let Some(state) = state {
        return Ok(match TaskState::parse(&state) {
            Some(TaskState::Completed) => Some(true),
            Some(TaskState::Dead | TaskState::Cancelled) => Some(false),
            _ => None,
        });
    }
    let job: Option<(i64, i64, bool, bool)> = tx
        .prepare_cached("SELECT total, expanded, cancelled, waiting FROM jobs WHERE id = ?1")?
        .query_row(params![id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .optional()?;
    let Some((total, expanded, cancelled, waiting)) = job else {
        return Ok((!view).then_some(false)); // deleted, or not read yet
    };
    // A cancelled job's points never created never will be; anyone else's will.
    if !cancelled && (waiting || expanded < total) {
        return Ok(None);
    }
    let any_in = |states: &str| -> rusqlite::Result<bool> {
        tx.prepare_cached(&format!(
            "SELECT EXISTS(SELECT 1 FROM tasks WHERE job_id = ?1 AND state IN ({states}))"
        ))?
        .query_row(params![id], |row| row.get(0))
    };
    if any_in("'Waiting', 'Pending', 'Allocated', 'Running', 'Error'")? {
        return Ok(None);
    }
    Ok(Some(!cancelled && !any_in("'Dead', 'Cancelled'")?))
}

/// Whether some waiter still names `dependency`.
fn is_named(tx: &Transaction<'_>, dependency: &str) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM dependencies WHERE dependency = ?1)")?
        .query_row(params![dependency], |row| row.get(0))
}

/// Whether `waiter` still has a dependency that has not ended.
fn still_waits(tx: &Transaction<'_>, waiter: &str) -> rusqlite::Result<bool> {
    tx.prepare_cached("SELECT EXISTS(SELECT 1 FROM dependencies WHERE waiter = ?1)")?
        .query_row(params![waiter], |row| row.get(0))
}

/// A waiter's tags, shared by its events.
type Tags = BTreeMap<String, String>;

/// The last waiter's stored module and options, decoded. Waiters submitted
/// together share them: a release of 100,000 lone tasks decoded the same
/// options JSON 100,000 times before.
#[derive(Default)]
struct Decoded {
    last: Option<DecodedRow>,
}

/// One row's module and options, as stored and decoded.
struct DecodedRow {
    module: String,
    options: String,
    module_id: ModuleId,
    parsed: Arc<TaskOptions>,
    tags: Arc<Tags>,
}

impl Decoded {
    /// The waiter `id` whose row holds `module` and `options`.
    fn waiter(
        &mut self,
        id: &str,
        task_seq: Option<i64>,
        module: String,
        options: String,
    ) -> Waiter {
        let same = self
            .last
            .as_ref()
            .is_some_and(|row| row.module == module && row.options == options);
        if !same {
            let parsed: TaskOptions = serde_json::from_str(&options).unwrap_or_default();
            self.last = Some(DecodedRow {
                module_id: ModuleId::read(&module).unwrap_or_else(|| ModuleId::of(b"")),
                tags: Arc::new(parsed.tags.clone()),
                parsed: Arc::new(parsed),
                module,
                options,
            });
        }
        let row = self.last.as_ref().expect("decoded above");
        Waiter {
            id: id.to_string(),
            task_seq,
            module: row.module_id.clone(),
            options: row.parsed.clone(),
            tags: row.tags.clone(),
        }
    }
}

/// A task or job still waiting, as the store holds it.
struct Waiter {
    id: String,
    /// A task's row (`seq`), read once and updated by it; `None`: a job.
    task_seq: Option<i64>,
    module: ModuleId,
    options: Arc<TaskOptions>,
    tags: Arc<Tags>,
}

/// A waiting task's `seq`, module and options, as stored.
type TaskRow = (i64, String, String);

impl Waiter {
    /// `id` if it is a job that still waits (a task's row is read with
    /// its dependency, in [`settle`]).
    fn find_job(
        tx: &Transaction<'_>,
        id: &str,
        decoded: &mut Decoded,
    ) -> rusqlite::Result<Option<Waiter>> {
        let job: Option<(String, String)> = tx
            .prepare_cached(
                "SELECT module, options FROM jobs WHERE id = ?1 AND waiting = 1 AND cancelled = 0",
            )?
            .query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
            .optional()?;
        Ok(job.map(|(module, options)| decoded.waiter(id, None, module, options)))
    }

    /// Whether the waiter is a job (else a task).
    fn is_job(&self) -> bool {
        self.task_seq.is_none()
    }

    /// Whether the waiter may have a dependency besides `dependency`. One
    /// that named only `dependency` has no rows left once `dependency`'s
    /// are deleted, so the store need not be asked (a release of many
    /// lone waiters asked once for each); one whose options name nothing
    /// (unreadable) is asked anyway.
    fn waits_for_more_than(&self, dependency: &str) -> bool {
        self.options.after.is_empty() || self.options.after.iter().any(|other| other != dependency)
    }

    /// Move the waiter (a job: its record and its Waiting tasks) to
    /// Pending or Cancelled, with the events.
    fn end(
        &self,
        tx: &Transaction<'_>,
        to: TaskState,
        reason: Option<&str>,
        at: Millis,
        committed: &mut Vec<Committed>,
    ) -> rusqlite::Result<()> {
        let column = match to {
            TaskState::Pending => "pending_at",
            _ => "cancelled_at",
        };
        let tasks: Vec<String> = if let Some(seq) = self.task_seq {
            tx.prepare_cached(&format!(
                "UPDATE tasks SET state = ?2, {column} = ?3, error_message = ?4 WHERE seq = ?1"
            ))?
            .execute(params![seq, to.as_str(), at as i64, reason])?;
            vec![self.id.clone()]
        } else {
            tx.prepare_cached(
                "UPDATE jobs SET waiting = 0, cancelled = ?2, cancel_reason = ?3 WHERE id = ?1",
            )?
            .execute(params![self.id, to == TaskState::Cancelled, reason])?;
            tx.prepare_cached(&format!(
                "UPDATE tasks SET state = ?2, {column} = ?3, error_message = ?4
                     WHERE job_id = ?1 AND state = 'Waiting' RETURNING id"
            ))?
            .query_map(params![self.id, to.as_str(), at as i64, reason], |row| {
                row.get(0)
            })?
            .collect::<Result<_, _>>()?
        };
        self.events(tx, tasks, to, reason, at, committed)
    }

    /// The events of the waiter's `tasks` leaving Waiting for `to`.
    fn events(
        &self,
        tx: &Transaction<'_>,
        tasks: Vec<String>,
        to: TaskState,
        reason: Option<&str>,
        at: Millis,
        committed: &mut Vec<Committed>,
    ) -> rusqlite::Result<()> {
        let ids: Vec<&str> = tasks.iter().map(String::as_str).collect();
        let job_id = self.is_job().then_some(self.id.as_str());
        let message = reason.unwrap_or(RELEASED);
        for (offset, task_id) in log_events(tx, &ids, job_id, to, message, at)? {
            self.committed(offset, task_id, to, reason, at, committed);
        }
        Ok(())
    }

    /// What the commit tells of one of the waiter's tasks leaving Waiting
    /// for `to`, logged at `offset`.
    fn committed(
        &self,
        offset: u64,
        task_id: String,
        to: TaskState,
        reason: Option<&str>,
        at: Millis,
        committed: &mut Vec<Committed>,
    ) {
        committed.push(Committed {
            event: Event {
                offset,
                task_id,
                job_id: self.is_job().then(|| self.id.clone()),
                state: to,
                attempt: 0,
                worker: None,
                at,
                error_kind: None,
                message: Some(reason.unwrap_or(RELEASED).to_string()),
                run_us: None,
                wait_us: None,
            },
            from: Some(TaskState::Waiting),
            module: self.module.clone(),
            tags: self.tags.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::ended;

    /// A waiter's dependency that the store has no row of: on the embedded
    /// store it was deleted (failed); in a Kafka view it is not read yet.
    #[test]
    fn a_dependency_a_view_has_not_read_has_not_ended() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = super::super::schema::open(&dir.path().join("q.db"), true).unwrap();
        let tx = conn.transaction().unwrap();
        assert_eq!(ended(&tx, "t-unread", true).unwrap(), None);
        assert_eq!(ended(&tx, "j-unread", true).unwrap(), None);
        assert_eq!(ended(&tx, "t-deleted", false).unwrap(), Some(false));
    }
}
