//! WAL checkpoints off the commit path.
//!
//! SQLite's automatic checkpoint runs inside whichever commit takes the
//! write-ahead log past 1,000 pages: that commit copies the pages into the
//! database file and waits for its fdatasync (1.3–2.0 ms on this project's
//! disk), which was the ~4 ms p99 of a synchronous invocation. Here the
//! write connection's commits only count the log's pages ([`install`]); a
//! thread of its own ([`Checkpointer`]) copies them back, on its own
//! connection, every [`CHECKPOINT_PAGES`] new pages.
//!
//! A checkpoint beside a busy writer seldom finishes the log: pages
//! committed while it runs stay behind, and SQLite restarts the log from
//! its beginning only when a write finds every page copied back. So the
//! log would grow for as long as commits keep coming. Past
//! [`RESTART_PAGES`] the writer checkpoints itself, between two commits,
//! with nothing else writing: that one finishes, and the next commit
//! starts the log over. On a steady stream of invocations (6 pages each)
//! one commit in about 1,600 pays for it instead of one in 160.

use crate::queue::QueueError;
use rusqlite::Connection;
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// New log pages that wake the checkpointer (SQLite's own default for its
/// automatic checkpoint).
pub(super) const CHECKPOINT_PAGES: u64 = 1_000;

/// Log pages (of 4 KiB) past which the writer checkpoints itself so the
/// log starts over: bounds the `-wal` file near 40 MB plus one batch.
pub(super) const RESTART_PAGES: u64 = 10_000;

thread_local! {
    /// Pages in the log after the last commit this thread made on a
    /// connection with the hook (SQLite calls the hook on the committing
    /// thread, inside the `COMMIT`).
    static LOG_PAGES: Cell<Option<u64>> = const { Cell::new(None) };
}

/// SQLite's WAL hook: note the log's size for [`taken_log_pages`]. Replaces
/// (and so turns off) SQLite's automatic checkpoint on that connection.
fn note_log_pages(_wal: &rusqlite::hooks::Wal, pages: std::os::raw::c_int) -> rusqlite::Result<()> {
    LOG_PAGES.with(|cell| cell.set(Some(pages.max(0) as u64)));
    Ok(())
}

/// Make `conn`'s commits record the log's size instead of checkpointing.
pub(super) fn install(conn: &Connection) {
    conn.wal_hook(Some(note_log_pages));
}

/// Pages in the log after this thread's last commit, if it committed since
/// the last call (a commit that wrote nothing does not call the hook).
pub(super) fn taken_log_pages() -> Option<u64> {
    LOG_PAGES.with(Cell::take)
}

/// What the writer and the checkpointer thread share.
#[derive(Default)]
struct Shared {
    /// Log pages already copied back by the last checkpoint (0 once the log
    /// started over).
    copied: AtomicU64,
    /// The checkpointer has work: set by the writer, cleared by the thread.
    wanted: AtomicBool,
    /// The writer is waiting to checkpoint itself: the thread stands aside
    /// (a checkpoint running on its connection would make the writer's
    /// return busy).
    writer_restarting: AtomicBool,
    /// The store is closing: the thread ends.
    stop: AtomicBool,
}

/// The checkpointer thread's handle, kept by the writer; dropping it stops
/// the thread.
pub(super) struct Checkpointer {
    shared: Arc<Shared>,
    thread: Option<std::thread::Thread>,
}

impl Checkpointer {
    /// Start the thread with a connection of its own to the store at `path`.
    pub(super) fn start(path: &Path) -> Result<Self, QueueError> {
        let conn = super::schema::open(path, false).map_err(|e| {
            QueueError::storage(
                format!("cannot open {} to checkpoint it", path.display()),
                e,
            )
        })?;
        let shared = Arc::new(Shared::default());
        let running = shared.clone();
        let thread = std::thread::Builder::new()
            .name("kwq-checkpoint".into())
            .spawn(move || run(conn, running))
            .map_err(|e| QueueError::storage("starting the checkpoint thread", e))?;
        Ok(Checkpointer {
            shared,
            thread: Some(thread.thread().clone()),
        })
    }

    /// A checkpointer without a thread: the writer still bounds the log
    /// itself (for tests of that bound).
    #[cfg(test)]
    pub(super) fn detached() -> Self {
        Checkpointer {
            shared: Arc::default(),
            thread: None,
        }
    }

    /// After a commit of the writer's left `pages` in the log: wake the
    /// thread once [`CHECKPOINT_PAGES`] are new since its last checkpoint,
    /// and past [`RESTART_PAGES`] checkpoint on the writer's connection
    /// `conn` (nothing else is writing meanwhile) so the log starts over.
    pub(super) fn committed(&self, conn: &Connection, pages: u64) {
        let mut copied = self.shared.copied.load(Ordering::Acquire);
        if pages < copied {
            // The log started over since that checkpoint.
            self.shared.copied.store(0, Ordering::Release);
            copied = 0;
        }
        if pages >= RESTART_PAGES {
            self.shared.writer_restarting.store(true, Ordering::Release);
            match checkpoint(conn) {
                Ok(Some((log, done))) if log == done => {
                    self.shared
                        .writer_restarting
                        .store(false, Ordering::Release);
                    self.shared.copied.store(0, Ordering::Release);
                }
                // The thread's checkpoint or a reader holds it back: the
                // next commit tries again.
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "checkpoint of the store's log failed"),
            }
            return;
        }
        if pages >= copied + CHECKPOINT_PAGES
            && !self.shared.wanted.swap(true, Ordering::AcqRel)
            && let Some(thread) = &self.thread
        {
            thread.unpark();
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = &self.thread {
            thread.unpark();
        }
    }
}

/// Bytes of one log frame: a 24-byte header and a 4 KiB page.
const FRAME_BYTES: u64 = 24 + 4_096;

/// Give the store's write-ahead log its working size up front, as zeros,
/// so that commits overwrite the file in place instead of growing it. On
/// ext4 an fdatasync after a write that grows a file also commits the
/// inode: measured on this project's disk, 4 KiB then fdatasync took
/// 0.11 ms in place and 0.20 ms appended, and a fresh store grows its log
/// for its first [`RESTART_PAGES`] pages, i.e. for every commit of a
/// synchronous invocation's first few thousand.
///
/// Done once, at open, before anyone else connects: the log is first
/// copied into the database and emptied (a `TRUNCATE` checkpoint); only a
/// log left empty is filled. Zeros after the log's frames are where SQLite
/// sees the log end (a frame whose salt does not match the header's), as
/// with the stale frames it leaves behind itself when the log starts
/// over, so recovery after a crash at any point reads exactly the
/// committed frames.
pub(super) fn preallocate_log(conn: &Connection, db: &Path) -> Result<(), QueueError> {
    // Nobody is waited for: a log someone else reads is left as it is.
    let emptied = conn
        .busy_timeout(std::time::Duration::ZERO)
        .and_then(|()| {
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
                row.get::<_, i64>(0)
            })
        })
        .map(|busy| busy == 0);
    conn.busy_timeout(super::schema::BUSY_TIMEOUT)
        .map_err(|e| QueueError::storage("emptying the store's log", e))?;
    let busy = !emptied.map_err(|e| QueueError::storage("emptying the store's log", e))?;
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    let log = Path::new(&name);
    let fill = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().write(true).open(log)?;
        if busy || file.metadata()?.len() != 0 {
            return Ok(());
        }
        let zeros = vec![0u8; 1 << 20];
        let mut left = 32 + RESTART_PAGES * FRAME_BYTES;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()
    };
    fill().map_err(|e| QueueError::storage(format!("preparing {}", log.display()), e))
}

/// A passive checkpoint (copies what it can, waits for nobody): pages in
/// the log and pages copied back, or `None` when another checkpoint held
/// the lock.
fn checkpoint(conn: &Connection) -> rusqlite::Result<Option<(u64, u64)>> {
    let (busy, log, done): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })?;
    Ok((busy == 0 && log >= 0 && done >= 0).then_some((log as u64, done as u64)))
}

/// The thread: asleep until the writer wants a checkpoint, then one
/// passive checkpoint, and asleep again.
fn run(conn: Connection, shared: Arc<Shared>) {
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        // A wake without work (or a spurious one) parks again.
        if !shared.wanted.swap(false, Ordering::AcqRel) {
            std::thread::park();
            continue;
        }
        if shared.writer_restarting.load(Ordering::Acquire) {
            continue;
        }
        match checkpoint(&conn) {
            Ok(Some((_, done))) => shared.copied.store(done, Ordering::Release),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "checkpoint of the store's log failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store file in WAL mode with the hook on its write connection and
    /// a table to fill.
    fn store(dir: &Path) -> Connection {
        let conn = crate::queue::embedded::schema::open(&dir.join("s.db"), true).unwrap();
        install(&conn);
        conn.execute_batch("CREATE TABLE filler (b BLOB)").unwrap();
        conn
    }

    /// Commit at least `pages` new log pages, about 100 per transaction,
    /// telling `checkpointer` of each commit as the store's writer does.
    fn fill(conn: &Connection, checkpointer: &Checkpointer, pages: u64) {
        let (mut written, mut last) = (0, 0);
        while written < pages {
            conn.execute("INSERT INTO filler VALUES (zeroblob(400000))", [])
                .unwrap();
            let log = taken_log_pages().expect("a commit in WAL mode calls the hook");
            // A log that started over holds only what came since.
            written += if log < last { log } else { log - last };
            last = log;
            checkpointer.committed(conn, log);
        }
    }

    fn file_len(path: &Path) -> u64 {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn commits_below_the_restart_bound_leave_the_database_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store(dir.path());
        let before = file_len(&dir.path().join("s.db"));
        fill(&conn, &Checkpointer::detached(), 3 * CHECKPOINT_PAGES);
        // SQLite's automatic checkpoint would have copied pages into the
        // database file by now; nothing on the commit path did.
        assert_eq!(file_len(&dir.path().join("s.db")), before);
    }

    #[test]
    fn the_writer_starts_the_log_over_past_the_restart_bound() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store(dir.path());
        fill(&conn, &Checkpointer::detached(), 3 * RESTART_PAGES);
        let wal = file_len(&dir.path().join("s.db-wal"));
        assert!(
            wal <= (RESTART_PAGES + 100) * FRAME_BYTES,
            "the log grew to {wal} bytes"
        );
        assert!(file_len(&dir.path().join("s.db")) > 2 * RESTART_PAGES * 4_096);
    }

    #[test]
    fn the_thread_copies_the_log_back() {
        let dir = tempfile::tempdir().unwrap();
        let conn = store(dir.path());
        let checkpointer = Checkpointer::start(&dir.path().join("s.db")).unwrap();
        let before = file_len(&dir.path().join("s.db"));
        fill(&conn, &checkpointer, CHECKPOINT_PAGES + 10);
        // Wait for the thread's checkpoint through the state it shares
        // (the deadline only turns a broken thread into a failure, not a hang).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while checkpointer.shared.copied.load(Ordering::Acquire) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint in 60 s"
            );
            std::thread::yield_now();
        }
        assert!(file_len(&dir.path().join("s.db")) > before + CHECKPOINT_PAGES * 4_096 / 2);
    }

    #[test]
    fn a_preallocated_log_is_written_in_place_and_recovers_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("s.db");
        let conn = store(dir.path());
        preallocate_log(&conn, &db).unwrap();
        let size = 32 + RESTART_PAGES * FRAME_BYTES;
        assert_eq!(file_len(&dir.path().join("s.db-wal")), size);
        for i in 0..50 {
            conn.execute("INSERT INTO filler VALUES (zeroblob(?1))", [i * 100])
                .unwrap();
        }
        // The commits went into the zeros, not past them.
        assert_eq!(file_len(&dir.path().join("s.db-wal")), size);
        // A crash now: copy the files as they are, with the connection
        // open (closing it would checkpoint), and count what the copy holds.
        let rows_after_a_crash = || -> (i64, i64) {
            let crashed = tempfile::tempdir().unwrap();
            for name in ["s.db", "s.db-wal"] {
                std::fs::copy(dir.path().join(name), crashed.path().join(name)).unwrap();
            }
            Connection::open(crashed.path().join("s.db"))
                .unwrap()
                .query_row("SELECT count(*), sum(length(b)) FROM filler", [], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .unwrap()
        };
        let written: i64 = (0..50).map(|i| i * 100).sum();
        assert_eq!(rows_after_a_crash(), (50, written));
        // With a reader holding the log, it is not emptied: the commits in
        // it are not overwritten with zeros.
        let reader = Connection::open(&db).unwrap();
        reader
            .execute_batch("BEGIN; SELECT count(*) FROM filler;")
            .unwrap();
        conn.execute("INSERT INTO filler VALUES (zeroblob(10))", [])
            .unwrap();
        preallocate_log(&conn, &db).unwrap();
        assert_eq!(rows_after_a_crash(), (51, written + 10));
    }
}
