//! Reads of the embedded store: a small pool of read-only connections (WAL
//! lets them read committed data beside the writer), used from blocking
//! threads so the async executor never waits on SQLite.

use super::super::{ModuleRecord, Page, QueueError, TaskFilter, TaskResult};
use super::schema;
use crate::model::{
    ErrorKind, Event, JobRecord, LogLine, ModuleId, TaskOptions, TaskRecord, TaskState,
};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub(super) struct Reader {
    path: PathBuf,
    pool: Arc<Mutex<Vec<Connection>>>,
}

fn storage(e: rusqlite::Error) -> QueueError {
    QueueError::storage("reading the store", e)
}

impl Reader {
    pub(super) fn new(path: PathBuf) -> Self {
        Reader {
            path,
            pool: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// Run `read` on a pooled connection, on the current thread.
    pub(super) fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, QueueError>,
    ) -> Result<T, QueueError> {
        let pooled = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => schema::open(&self.path, false).map_err(storage)?,
        };
        let result = read(&conn);
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        result
    }

    /// Run `read` on a blocking thread.
    pub(super) async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> Result<T, QueueError> + Send + 'static,
    ) -> Result<T, QueueError> {
        let reader = self.clone();
        tokio::task::spawn_blocking(move || reader.with(read))
            .await
            .map_err(|e| QueueError::storage("running a store read", e))?
    }
}

const TASK_COLUMNS: &str =
    "seq, id, job_id, module, payload, priority, options, state, attempts, worker, not_before,
    pending_at, allocated_at, running_at, completed_at, error_at, dead_at, cancelled_at,
    error_kind, error_message, result, logs, progress, waiting_at";

/// A task row, with its cursor.
pub(super) fn task_from_row(row: &Row<'_>) -> rusqlite::Result<(u64, TaskRecord)> {
    let seq: i64 = row.get(0)?;
    let mut options: TaskOptions =
        serde_json::from_str(&row.get::<_, String>(6)?).unwrap_or_default();
    options.priority = row.get(5)?;
    options.not_before = row.get::<_, Option<i64>>(10)?.map(|t| t as u64);
    let state = TaskState::parse(&row.get::<_, String>(7)?).unwrap_or(TaskState::Pending);
    let mut timestamps = BTreeMap::new();
    // Columns 11..=17 hold Pending to Cancelled; Waiting's came later (23).
    let columns = std::iter::once(23).chain(11..=17);
    for (column, s) in columns.zip(TaskState::ALL) {
        if let Some(at) = row.get::<_, Option<i64>>(column)? {
            timestamps.insert(s, at as u64);
        }
    }
    let error_kind: Option<String> = row.get(18)?;
    let logs: Option<String> = row.get(21)?;
    Ok((
        seq as u64,
        TaskRecord {
            id: row.get(1)?,
            job_id: row.get(2)?,
            module: ModuleId::read(&row.get::<_, String>(3)?).unwrap_or_else(|| ModuleId::of(b"")),
            payload: row.get(4)?,
            options,
            state,
            attempts: row.get(8)?,
            worker: row.get(9)?,
            timestamps,
            error_kind: error_kind
                .and_then(|k| serde_json::from_value(serde_json::Value::String(k)).ok()),
            error_message: row.get(19)?,
            result: row.get(20)?,
            logs: logs
                .and_then(|l| serde_json::from_str::<Vec<LogLine>>(&l).ok())
                .unwrap_or_default(),
            progress: row.get::<_, f64>(22)? as f32,
        },
    ))
}

pub(super) fn task(conn: &Connection, id: &str) -> Result<TaskRecord, QueueError> {
    let mut task = conn
        .prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))
        .map_err(storage)?
        .query_row(params![id], task_from_row)
        .optional()
        .map_err(storage)?
        .map(|(_, task)| task)
        .ok_or_else(|| QueueError::NotFound(format!("task {id}")))?;
    if task.payload.is_empty()
        && let Some(job) = &task.job_id
        && let Some(payload) = sweep_point(conn, job, id)?
    {
        task.payload = payload;
    }
    Ok(task)
}

/// A sweep point's payload, made again from its job's sweep: points are
/// stored without one (it would copy the sweep's base into every row).
/// `None` if the task is not a sweep point.
fn sweep_point(conn: &Connection, job: &str, task: &str) -> Result<Option<Vec<u8>>, QueueError> {
    let sweep: Option<String> = conn
        .prepare_cached("SELECT sweep FROM jobs WHERE id = ?1")
        .map_err(storage)?
        .query_row(params![job], |row| row.get(0))
        .optional()
        .map_err(storage)?
        .flatten();
    let Some(sweep) = sweep.and_then(|s| serde_json::from_str::<crate::model::Sweep>(&s).ok())
    else {
        return Ok(None);
    };
    Ok(point_of(&sweep, task))
}

/// The payload of the sweep point named by task id `<job>.<index>`.
fn point_of(sweep: &crate::model::Sweep, task: &str) -> Option<Vec<u8>> {
    let index = task.rsplit_once('.')?.1.parse::<u64>().ok()?;
    serde_json::to_vec(&sweep.point(index)).ok()
}

/// The SQL and arguments of one page of [`tasks`].
fn tasks_query(filter: &TaskFilter) -> (String, Vec<Box<dyn rusqlite::ToSql>>) {
    let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE seq > ?1");
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = vec![Box::new(filter.after.unwrap_or(0) as i64)];
    if let Some(job) = &filter.job {
        args.push(Box::new(job.clone()));
        sql.push_str(&format!(" AND job_id = ?{}", args.len()));
    }
    if let Some(state) = filter.state {
        args.push(Box::new(state.as_str()));
        sql.push_str(&format!(" AND state = ?{}", args.len()));
        if state != TaskState::Completed {
            // The condition of the state index (see `schema`), so that a
            // rare state (the dead letters) is found through it.
            sql.push_str(" AND state <> 'Completed'");
        }
    }
    if let Some((key, value)) = &filter.tag {
        // Through the tag index (kept by a trigger): a rare or absent tag
        // costs an index probe, not a scan of every task.
        args.push(Box::new(format!("{key}={value}")));
        sql.push_str(&format!(
            " AND seq IN (SELECT seq FROM task_tags WHERE tag = ?{} AND seq > ?1)",
            args.len()
        ));
    }
    let limit = filter.limit.clamp(1, 1000);
    sql.push_str(&format!(" ORDER BY seq LIMIT {}", limit + 1));
    (sql, args)
}

pub(super) fn tasks(
    conn: &Connection,
    filter: &TaskFilter,
) -> Result<Page<TaskRecord>, QueueError> {
    let limit = filter.limit.clamp(1, 1000);
    let (sql, args) = tasks_query(filter);
    let mut stmt = conn.prepare(&sql).map_err(storage)?;
    let rows = stmt
        .query_map(
            rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
            task_from_row,
        )
        .map_err(storage)?;
    let mut items = Vec::with_capacity(limit);
    let mut next = None;
    for row in rows {
        let (seq, task) = row.map_err(storage)?;
        if items.len() == limit {
            break;
        }
        next = Some(seq);
        items.push(task);
    }
    let more = items.len() == limit;
    Ok(Page {
        items,
        next: if more { next } else { None },
    })
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
    let error_kind: Option<String> = row.get(7)?;
    Ok(Event {
        offset: row.get::<_, i64>(0)? as u64,
        task_id: row.get(1)?,
        job_id: row.get(2)?,
        state: TaskState::parse(&row.get::<_, String>(3)?).unwrap_or(TaskState::Pending),
        attempt: row.get(4)?,
        worker: row.get(5)?,
        at: row.get::<_, i64>(6)? as u64,
        error_kind: error_kind
            .and_then(|k| serde_json::from_value::<ErrorKind>(serde_json::Value::String(k)).ok()),
        message: row.get(8)?,
        run_us: row.get::<_, Option<i64>>(9)?.map(|us| us.max(0) as u64),
        wait_us: row.get::<_, Option<i64>>(10)?.map(|us| us.max(0) as u64),
    })
}

const EVENT_COLUMNS: &str =
    "offset, task_id, job_id, state, attempt, worker, at, error_kind, message, run_us, wait_us";

pub(super) fn timeline(conn: &Connection, id: &str) -> Result<Vec<Event>, QueueError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE task_id = ?1 ORDER BY offset"
        ))
        .map_err(storage)?;
    let events = stmt
        .query_map(params![id], event_from_row)
        .map_err(storage)?;
    events.collect::<Result<Vec<_>, _>>().map_err(storage)
}

pub(super) fn events_since(
    conn: &Connection,
    offset: u64,
    limit: usize,
) -> Result<Vec<Event>, QueueError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE offset > ?1 ORDER BY offset LIMIT ?2"
        ))
        .map_err(storage)?;
    let events = stmt
        .query_map(params![offset as i64, limit as i64], event_from_row)
        .map_err(storage)?;
    events.collect::<Result<Vec<_>, _>>().map_err(storage)
}

fn job_from_row(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: row.get(0)?,
        name: row.get(1)?,
        module: ModuleId::read(&row.get::<_, String>(2)?).unwrap_or_else(|| ModuleId::of(b"")),
        options: serde_json::from_str(&row.get::<_, String>(3)?).unwrap_or_default(),
        total: row.get::<_, i64>(4)? as u64,
        expanded: row.get::<_, i64>(5)? as u64,
        paused: row.get(6)?,
        cancelled: row.get(7)?,
        waiting: row.get(10)?,
        cancel_reason: row.get(11)?,
        sweep: row
            .get::<_, Option<String>>(8)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        created_at: row.get::<_, i64>(9)? as u64,
    })
}

const JOB_COLUMNS: &str = "id, name, module, options, total, expanded, paused, cancelled, sweep, created_at, waiting, cancel_reason";

pub(super) fn job(conn: &Connection, id: &str) -> Result<JobRecord, QueueError> {
    conn.prepare_cached(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
        .map_err(storage)?
        .query_row(params![id], job_from_row)
        .optional()
        .map_err(storage)?
        .ok_or_else(|| QueueError::NotFound(format!("job {id}")))
}

/// How many tasks of a job the store holds.
pub(super) fn job_task_count(conn: &Connection, job: &str) -> Result<u64, QueueError> {
    conn.prepare_cached("SELECT COUNT(*) FROM tasks WHERE job_id = ?1")
        .map_err(storage)?
        .query_row(params![job], |row| row.get::<_, i64>(0))
        .map(|n| n.max(0) as u64)
        .map_err(storage)
}

pub(super) fn jobs(conn: &Connection, limit: usize) -> Result<Vec<JobRecord>, QueueError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs ORDER BY created_at DESC, id LIMIT ?1"
        ))
        .map_err(storage)?;
    let jobs = stmt
        .query_map(params![limit as i64], job_from_row)
        .map_err(storage)?;
    jobs.collect::<Result<Vec<_>, _>>().map_err(storage)
}

/// Result bytes one page of [`results`] holds at most (it always holds at
/// least one result): a page of 1,000 results of 4 MiB each must not be
/// 4 GB in memory, neither for `GET /v1/jobs/{id}/results` nor for a
/// fan-in task's input.
const RESULT_PAGE_BYTES: usize = 16 << 20;

pub(super) fn results(
    conn: &Connection,
    job: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<TaskResult>, QueueError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT seq, id, result FROM tasks WHERE job_id = ?1 AND state = 'Completed' AND seq > ?2 ORDER BY seq LIMIT ?3",
        )
        .map_err(storage)?;
    let mut rows = stmt
        .query(params![job, after as i64, limit as i64])
        .map_err(storage)?;
    let (mut page, mut bytes) = (Vec::new(), 0usize);
    while let Some(row) = rows.next().map_err(storage)? {
        let result = TaskResult {
            seq: row.get::<_, i64>(0).map_err(storage)? as u64,
            task_id: row.get(1).map_err(storage)?,
            result: row
                .get::<_, Option<Vec<u8>>>(2)
                .map_err(storage)?
                .unwrap_or_default(),
        };
        bytes += result.result.len();
        page.push(result);
        // A short page is not the end: readers go on after its last seq.
        if bytes >= RESULT_PAGE_BYTES {
            break;
        }
    }
    Ok(page)
}

fn module_from_row(row: &Row<'_>) -> rusqlite::Result<ModuleRecord> {
    let names: Vec<String> = row
        .get::<_, Option<String>>(1)?
        .and_then(|names| serde_json::from_str(&names).ok())
        .unwrap_or_default();
    Ok(ModuleRecord {
        id: ModuleId::read(&row.get::<_, String>(0)?).unwrap_or_else(|| ModuleId::of(b"")),
        name: names.last().cloned(),
        names,
        kind: serde_json::from_str(&row.get::<_, String>(2)?)
            .unwrap_or(crate::model::ModuleKind::Component),
        size: row.get::<_, i64>(3)? as u64,
        created_at: row.get::<_, i64>(4)? as u64,
    })
}

/// A module's columns, its names as a JSON array oldest first.
const MODULE_COLUMNS: &str = "m.id,
    (SELECT json_group_array(name) FROM
        (SELECT name FROM module_names WHERE module = m.id ORDER BY named_at, name)),
    m.kind, m.size, m.created_at";

pub(super) fn module(conn: &Connection, id: &str) -> Result<ModuleRecord, QueueError> {
    conn.prepare_cached(&format!(
        "SELECT {MODULE_COLUMNS} FROM modules m WHERE m.id = ?1"
    ))
    .map_err(storage)?
    .query_row(params![id], module_from_row)
    .optional()
    .map_err(storage)?
    .ok_or_else(|| QueueError::NotFound(format!("module {id}")))
}

/// The module a name points at, if any.
pub(super) fn module_named(conn: &Connection, name: &str) -> Result<Option<ModuleId>, QueueError> {
    conn.prepare_cached("SELECT module FROM module_names WHERE name = ?1")
        .map_err(storage)?
        .query_row(params![name], |row| row.get::<_, String>(0))
        .optional()
        .map_err(storage)
        .map(|id| id.and_then(|id| ModuleId::read(&id)))
}

pub(super) fn modules(conn: &Connection) -> Result<Vec<ModuleRecord>, QueueError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {MODULE_COLUMNS} FROM modules m ORDER BY m.created_at, m.id"
        ))
        .map_err(storage)?;
    let rows = stmt.query_map([], module_from_row).map_err(storage)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(storage)
}

pub(super) fn module_bytes(conn: &Connection, id: &str) -> Result<Option<Vec<u8>>, QueueError> {
    conn.prepare_cached("SELECT bytes FROM modules WHERE id = ?1")
        .map_err(storage)?
        .query_row(params![id], |row| row.get(0))
        .optional()
        .map_err(storage)
}

/// Every unfinished task, for rebuilding the ready index at start.
/// A task's payload (a waiting task may leave it on disk until leased).
pub(super) fn payload(conn: &Connection, id: &str) -> Result<Vec<u8>, QueueError> {
    let (payload, job): (Vec<u8>, Option<String>) = conn
        .prepare_cached("SELECT payload, job_id FROM tasks WHERE id = ?1")
        .map_err(storage)?
        .query_row(params![id], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()
        .map_err(storage)?
        .ok_or_else(|| QueueError::NotFound(format!("task {id}")))?;
    match job {
        Some(job) if payload.is_empty() => Ok(sweep_point(conn, &job, id)?.unwrap_or(payload)),
        _ => Ok(payload),
    }
}

/// Every unfinished task, oldest first, for rebuilding the ready index.
/// Payloads are kept until they add up to `held_payload_bytes`; later ones
/// are dropped (left on disk) and the task is marked `true`.
pub(super) fn unfinished(
    conn: &Connection,
    held_payload_bytes: u64,
) -> Result<Vec<(TaskRecord, bool)>, QueueError> {
    let mut stmt = conn
        .prepare(&format!(
            // `state <> 'Completed'`: the condition of the state index (see `schema`).
            "SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('Waiting', 'Pending', 'Allocated', 'Running', 'Error') AND state <> 'Completed' ORDER BY seq"
        ))
        .map_err(storage)?;
    let mut held = 0u64;
    // Sweep points are stored without a payload: made again from their
    // job's sweep, read once per job.
    let mut sweeps: HashMap<String, Option<crate::model::Sweep>> = HashMap::new();
    let rows = stmt.query_map([], task_from_row).map_err(storage)?;
    rows.map(|r| {
        r.map(|(_, mut task)| {
            if task.payload.is_empty()
                && let Some(job) = &task.job_id
            {
                let sweep = sweeps.entry(job.clone()).or_insert_with(|| {
                    conn.query_row(
                        "SELECT sweep FROM jobs WHERE id = ?1",
                        params![job],
                        |row| row.get::<_, Option<String>>(0),
                    )
                    .ok()
                    .flatten()
                    .and_then(|s| serde_json::from_str(&s).ok())
                });
                if let Some(payload) = sweep.as_ref().and_then(|s| point_of(s, &task.id)) {
                    task.payload = payload;
                }
            }
            let size = task.payload.len() as u64;
            let on_disk = held + size > held_payload_bytes;
            if on_disk {
                task.payload = Vec::new();
            } else {
                held += size;
            }
            (task, on_disk)
        })
    })
    .collect::<Result<Vec<_>, _>>()
    .map_err(storage)
}

/// One row per task for rebuilding statistics: job, module, tags, state, run time.
pub(super) fn census(conn: &Connection) -> Result<Vec<super::super::CensusRow>, QueueError> {
    let mut stmt = conn
        .prepare(
            // Run times to three significant digits, so the groups stay
            // few however many tasks there are.
            "WITH facts AS (
                 SELECT job_id, module, json_extract(options, '$.tags') AS tags, state,
                        CASE WHEN state = 'Completed'
                             THEN MAX(COALESCE(run_us, (completed_at - running_at) * 1000), 0) END AS r
                 FROM tasks)
             SELECT job_id, module, tags, state,
                    CASE WHEN r IS NULL THEN NULL
                         WHEN r < 1000 THEN r
                         WHEN r < 10000 THEN r / 10 * 10
                         WHEN r < 100000 THEN r / 100 * 100
                         WHEN r < 1000000 THEN r / 1000 * 1000
                         WHEN r < 10000000 THEN r / 10000 * 10000
                         WHEN r < 100000000 THEN r / 100000 * 100000
                         ELSE r / 1000000 * 1000000 END AS run,
                    COUNT(*)
             FROM facts GROUP BY 1, 2, 3, 4, 5",
        )
        .map_err(storage)?;
    let rows = stmt
        .query_map([], |row| {
            Ok(super::super::CensusRow {
                job_id: row.get(0)?,
                module: ModuleId::read(&row.get::<_, String>(1)?)
                    .unwrap_or_else(|| ModuleId::of(b"")),
                tags: row
                    .get::<_, Option<String>>(2)?
                    .and_then(|t| serde_json::from_str(&t).ok())
                    .unwrap_or_default(),
                state: TaskState::parse(&row.get::<_, String>(3)?).unwrap_or(TaskState::Pending),
                run_us: row.get::<_, Option<i64>>(4)?.map(|v| v.max(0) as u64),
                count: row.get::<_, i64>(5)?.max(0) as u64,
            })
        })
        .map_err(storage)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps of SQLite's virtual machine one page of `filter` takes.
    fn steps(conn: &Connection, filter: &TaskFilter) -> (usize, i32) {
        let (sql, args) = tasks_query(filter);
        let mut stmt = conn.prepare(&sql).unwrap();
        let found = stmt
            .query_map(
                rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())),
                |_| Ok(()),
            )
            .unwrap()
            .count();
        (found, stmt.get_status(rusqlite::StatementStatus::VmStep))
    }

    /// A page of large results stops at its byte budget, and the next page
    /// goes on from there: every result once, in order.
    #[test]
    fn a_results_page_is_bounded_in_bytes_and_the_next_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open(&dir.path().join("t.db"), true).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 40)
             INSERT INTO tasks (id, job_id, module, payload, priority, options, state, result)
             SELECT 'j.' || i, 'j', 'm', x'', 5, '{}', 'Completed', zeroblob(1048576) FROM n",
        )
        .unwrap();
        let per_page = RESULT_PAGE_BYTES / (1 << 20);
        let (mut after, mut seen) = (0, Vec::new());
        loop {
            let page = results(&conn, "j", after, 1000).unwrap();
            let Some(last) = page.last() else { break };
            assert!(page.len() <= per_page, "{} results in a page", page.len());
            after = last.seq;
            seen.extend(page.into_iter().map(|r| r.task_id));
        }
        let expected: Vec<String> = (1..=40).map(|i| format!("j.{i}")).collect();
        assert_eq!(seen, expected);
    }

    /// A tag filter goes through the tag index: a tag no task has costs a
    /// probe, not a scan of the 20,000 tasks, and a rare one finds its
    /// tasks directly; the index is kept by the store itself.
    #[test]
    fn a_tag_filter_probes_the_index_instead_of_scanning() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open(&dir.path().join("t.db"), true).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
             INSERT INTO tasks (id, module, payload, priority, options, state, pending_at)
             SELECT 't-' || i, 'm', x'', 5,
                    CASE WHEN i % 5000 = 0 THEN '{\"tags\":{\"desk\":\"fx\"}}'
                         ELSE '{\"tags\":{\"desk\":\"rates\"}}' END,
                    'Pending', 0 FROM n",
        )
        .unwrap();
        let filter = |tag: &str| TaskFilter {
            tag: Some(("desk".into(), tag.into())),
            limit: 100,
            ..TaskFilter::default()
        };
        let (found, absent) = steps(&conn, &filter("none"));
        assert_eq!(found, 0);
        assert!(absent < 200, "{absent} VM steps for an absent tag");
        let (found, rare) = steps(&conn, &filter("fx"));
        assert_eq!(found, 4);
        assert!(rare < 500, "{rare} VM steps for a rare tag");
        let (found, _) = steps(&conn, &filter("rates"));
        assert_eq!(found, 101, "a page and one more");
        // Deleting a task drops it from the index.
        conn.execute("DELETE FROM tasks WHERE id = 't-5000'", [])
            .unwrap();
        assert_eq!(steps(&conn, &filter("fx")).0, 3);
    }

    /// The dead letters among 20,000 completed tasks are listed through
    /// the state index (which leaves the Completed out), not by a scan;
    /// a listing of Completed tasks walks the table and finds a page at
    /// once; the tasks to recover at start-up come through the index too.
    #[test]
    fn a_rare_state_is_listed_through_the_index_and_completed_by_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let conn = super::super::schema::open(&dir.path().join("t.db"), true).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 20000)
             INSERT INTO tasks (id, module, payload, priority, options, state)
             SELECT 't-' || i, 'm', x'', 5, '{}',
                    CASE WHEN i % 5000 = 0 THEN 'Dead' WHEN i = 7 THEN 'Pending'
                         ELSE 'Completed' END FROM n",
        )
        .unwrap();
        let filter = |state| TaskFilter {
            state: Some(state),
            limit: 100,
            ..TaskFilter::default()
        };
        let (found, dead) = steps(&conn, &filter(TaskState::Dead));
        assert_eq!(found, 4);
        assert!(dead < 500, "{dead} VM steps for the dead letters");
        let (found, completed) = steps(&conn, &filter(TaskState::Completed));
        assert_eq!(found, 101, "a page and one more");
        assert!(completed < 5_000, "{completed} VM steps for a page");
        let recovered = unfinished(&conn, u64::MAX).unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(recovered[0].0.id.as_str(), "t-7");
        let plan: String = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT {TASK_COLUMNS} FROM tasks WHERE state IN ('Waiting', 'Pending', 'Allocated', 'Running', 'Error') AND state <> 'Completed' ORDER BY seq"
            ))
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert!(plan.contains("tasks_not_completed_by_state"), "{plan}");
    }
}
