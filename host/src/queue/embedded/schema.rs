//! The SQLite schema of the embedded store, and how connections are set up.

use rusqlite::Connection;

/// Tables: modules (bytes by SHA-256; the blob is the last column, so reading
/// a record never walks the blob's overflow pages), module_names (aliases:
/// each name points at one module, its latest upload under that name), jobs (one row per job, sweeps with a
/// cursor), tasks (one row per created task: the durable record), events
/// (the tracker log; its rowid is the event offset), dependencies (which
/// waiting task or job waits for which task or job: a row goes once its
/// dependency has ended), view_offsets (how far a Kafka host's view has
/// read each topic partition).
///
/// Tasks are found by job through `tasks_of_jobs_by_state`, which holds
/// only tasks of a job: every query of it names a job (`job_id = ?`), and
/// a lone task (an invocation, a dependency's waiter) then costs one index
/// entry fewer on insert and on every change of state. It replaced
/// `tasks_by_job_state`, which held every task. Likewise tasks are found
/// by state alone through `tasks_not_completed_by_state`, which leaves out
/// the Completed ones (nearly all of a store's rows, and never looked up by
/// state alone: a listing of them walks the table in order): a task that
/// completes then has its entry deleted instead of moved, and one inserted
/// already completed (a synchronous invocation) has none. A query that
/// wants this index says `state <> 'Completed'`, as SQLite uses a partial
/// index only for queries whose terms imply its condition. A store written
/// before is given the new indexes when it opens (a scan of its tasks,
/// once) and loses the old ones (`tasks_by_job_state`, `tasks_by_state`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS modules (
    id TEXT PRIMARY KEY,
    name TEXT,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    bytes BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS module_names (
    name TEXT PRIMARY KEY,
    module TEXT NOT NULL,
    named_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS module_names_by_module ON module_names(module);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    name TEXT,
    module TEXT NOT NULL,
    options TEXT NOT NULL,
    total INTEGER NOT NULL,
    expanded INTEGER NOT NULL,
    paused INTEGER NOT NULL DEFAULT 0,
    cancelled INTEGER NOT NULL DEFAULT 0,
    sweep TEXT,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS tasks (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job_id TEXT,
    module TEXT NOT NULL,
    payload BLOB NOT NULL,
    priority INTEGER NOT NULL,
    options TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    not_before INTEGER,
    pending_at INTEGER, allocated_at INTEGER, running_at INTEGER, completed_at INTEGER,
    error_at INTEGER, dead_at INTEGER, cancelled_at INTEGER,
    error_kind TEXT,
    error_message TEXT,
    result BLOB,
    logs TEXT,
    progress REAL NOT NULL DEFAULT 0,
    run_us INTEGER
);
DROP INDEX IF EXISTS tasks_by_job_state;
CREATE INDEX IF NOT EXISTS tasks_of_jobs_by_state ON tasks(job_id, state) WHERE job_id IS NOT NULL;
DROP INDEX IF EXISTS tasks_by_state;
CREATE INDEX IF NOT EXISTS tasks_not_completed_by_state ON tasks(state) WHERE state <> 'Completed';
CREATE TABLE IF NOT EXISTS events (
    offset INTEGER PRIMARY KEY,
    task_id TEXT NOT NULL,
    job_id TEXT,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    worker TEXT,
    at INTEGER NOT NULL,
    error_kind TEXT,
    message TEXT,
    run_us INTEGER,
    wait_us INTEGER
);
CREATE INDEX IF NOT EXISTS events_by_task ON events(task_id);
CREATE TABLE IF NOT EXISTS task_tags (
    tag TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (tag, seq)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS task_tags_on_insert AFTER INSERT ON tasks
WHEN json_extract(NEW.options, '$.tags') <> '{}'
BEGIN
    INSERT OR IGNORE INTO task_tags (tag, seq)
    SELECT key || '=' || value, NEW.seq FROM json_each(json_extract(NEW.options, '$.tags'));
END;
CREATE TRIGGER IF NOT EXISTS task_tags_on_delete AFTER DELETE ON tasks
BEGIN
    DELETE FROM task_tags WHERE seq = OLD.seq;
END;
CREATE TABLE IF NOT EXISTS dependencies (
    dependency TEXT NOT NULL,
    waiter TEXT NOT NULL,
    PRIMARY KEY (dependency, waiter)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dependencies_by_waiter ON dependencies(waiter);
CREATE TABLE IF NOT EXISTS view_offsets (
    topic TEXT NOT NULL,
    partition INTEGER NOT NULL,
    next INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
";

/// How long a connection waits for another's lock before it gives up.
pub(super) const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Prepared statements kept per connection (see [`open`]).
const STATEMENT_CACHE: usize = 128;

/// The write connection's page cache, as SQLite's `cache_size` takes it
/// (negative: KiB): 64 MiB. With SQLite's default of 2 MiB a batch that
/// touches more pages than that (the release of 100,000 waiters writes
/// their rows, two indexes and 100,000 events) spilled pages into the log
/// in the middle of its transaction and wrote some of them again before
/// the commit. A bound, not an allocation: the cache grows to it with the
/// pages in use and stays there, whatever the number of tasks.
const WRITER_CACHE_KIB: i64 = -(WRITER_CACHE_BYTES as i64 / 1024);

/// The write connection's page cache bound in bytes (see
/// [`WRITER_CACHE_KIB`]): public so that a memory measurement can tell this
/// fixed cost, reached once the writer has touched that many bytes of
/// pages, from growth.
pub const WRITER_CACHE_BYTES: u64 = 64 << 20;

/// Open a connection with the settings every connection needs. WAL lets
/// readers run beside the one writer; `synchronous = FULL` makes every
/// commit durable even against power loss (the writer groups many
/// operations per commit, so the fsync is paid once per batch).
pub(super) fn open(path: &std::path::Path, writer: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // The writer has more distinct cached statements (54 call sites) than
    // rusqlite's default cache of 16 holds. A precaution: a batch that
    // uses more than 16 would evict and recompile them on every use; how
    // often that happened was not measured, nor this change apart from
    // the log preallocation it came with.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    if writer {
        conn.pragma_update(None, "cache_size", WRITER_CACHE_KIB)?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
    }
    Ok(conn)
}

/// Columns added since the first release, as (table, column, type): a store
/// written by an older `kwq` gets them on open (older rows keep NULL, which
/// readers take as "not measured").
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("tasks", "run_us", "INTEGER"),
    ("events", "run_us", "INTEGER"),
    ("events", "wait_us", "INTEGER"),
    ("tasks", "waiting_at", "INTEGER"),
    ("jobs", "waiting", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "cancel_reason", "TEXT"),
];

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    // Stores before the tag index: index the tasks they already hold.
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version < 1 {
        conn.execute_batch(
            "INSERT OR IGNORE INTO task_tags (tag, seq)
             SELECT key || '=' || value, tasks.seq
             FROM tasks, json_each(json_extract(tasks.options, '$.tags'));
             PRAGMA user_version = 1;",
        )?;
    }
    // Before names were aliases, a module kept its last name in its own row.
    conn.execute_batch(
        "INSERT OR IGNORE INTO module_names (name, module, named_at)
         SELECT name, id, created_at FROM modules WHERE name IS NOT NULL",
    )?;
    for (table, column, kind) in ADDED_COLUMNS {
        let present: bool = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_of_an_older_release_gains_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        // The schema as it was before the µs columns.
        let before = SCHEMA
            .replace(",\n    run_us INTEGER,\n    wait_us INTEGER", "")
            .replace(",\n    run_us INTEGER", "");
        assert!(!before.contains("run_us"));
        old.execute_batch(&before).unwrap();
        drop(old);
        let conn = open(&path, true).unwrap();
        for (table, column, _) in ADDED_COLUMNS {
            let present: bool = conn
                .prepare(&format!(
                    "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
                ))
                .unwrap()
                .exists([column])
                .unwrap();
            assert!(present, "{table}.{column} missing");
        }
        // Opening again is a no-op.
        drop(conn);
        open(&path, true).unwrap();
    }

    /// A store with the indexes of an older release (every task in both)
    /// has them replaced by the partial ones when it opens.
    #[test]
    fn a_store_of_an_older_release_gets_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let old = Connection::open(&path).unwrap();
        old.execute_batch(&SCHEMA.replace("DROP INDEX", "SELECT 1; --"))
            .unwrap();
        old.execute_batch(
            "DROP INDEX tasks_of_jobs_by_state; DROP INDEX tasks_not_completed_by_state;
             CREATE INDEX tasks_by_job_state ON tasks(job_id, state);
             CREATE INDEX tasks_by_state ON tasks(state);
             INSERT INTO tasks (id, job_id, module, payload, priority, options, state)
             VALUES ('a', NULL, 'm', x'', 5, '{}', 'Completed'), ('j.0', 'j', 'm', x'', 5, '{}', 'Pending');",
        )
        .unwrap();
        drop(old);
        let conn = open(&path, true).unwrap();
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tasks' AND sql IS NOT NULL ORDER BY name")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        assert_eq!(
            indexes,
            ["tasks_not_completed_by_state", "tasks_of_jobs_by_state"]
        );
        // Each holds only its tasks: the job's Pending one.
        let in_job_index: i64 = conn
            .query_row("SELECT COUNT(*) FROM tasks INDEXED BY tasks_of_jobs_by_state WHERE job_id IS NOT NULL", [], |row| row.get(0))
            .unwrap();
        let in_state_index: i64 = conn
            .query_row("SELECT COUNT(*) FROM tasks INDEXED BY tasks_not_completed_by_state WHERE state <> 'Completed'", [], |row| row.get(0))
            .unwrap();
        assert_eq!((in_job_index, in_state_index), (1, 1));
    }
}
