//! The invocation journal: a small append-only file beside the store that
//! makes a synchronous invocation's outcome durable with one write and
//! one `fdatasync` instead of a SQLite commit.
//!
//! Why: a durable invocation's answer waits for its task, attempt and
//! result to be durable. Stored by SQLite, that is one commit writing
//! about nine log frames (the task's row, its id index, its events and
//! their index, the header page: eighteen `pwrite`s) and an `fdatasync`
//! of all of them: measured on this project's 2-core VM, 0.23–0.26 ms for
//! the writes and sync alone, against 0.11–0.13 ms for one record written
//! in place and synced. So a short invocation's operations (its insert
//! and its attempt's transitions, all still held back from the writer)
//! are appended here as one record and synced; then the caller is
//! answered and the same operations go to the writer as usual (committed
//! on the completing thread when the writer is idle). Their commit
//! confirms the record ([`Journal::confirmation`]). A caller that reads
//! its task back at once waits for that commit ([`Journal::settled`]).
//!
//! The file never grows past [`CAPACITY`]: a record is written at the
//! start again (under a new epoch) whenever every earlier one is
//! confirmed, which for one caller after another is every time. When the
//! journal is busy (another invocation appending: many concurrent callers
//! are better served by the writer's group commit), full, or a record is
//! big (payload and result over [`MAX_RECORD`]), the invocation takes the
//! writer's path instead, as before the journal.
//!
//! Recovery ([`Journal::open`]): the records of the epoch at the file's
//! start are read while each is whole (its checksum holds) and follows
//! the last; a stale record of an earlier epoch, zeros, or a torn write
//! ends them. Each record whose task the store does not hold is applied
//! again, then the file is zeroed. A record is synced before its caller
//! is answered, so a crash can lose only invocations nobody was told
//! about. Confirmed records stay in the file until overwritten; they are
//! recognised by their task being in the store, which holds because an
//! invoked task belongs to no job and only jobs' tasks are ever deleted
//! (whoever adds deletion of lone tasks must zero confirmed records).

use super::writer::{Notice, Op, Transition};
use crate::model::{Millis, NewTask};
use crate::queue::QueueError;
use crate::queue::scheduler::Tags;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Bytes the journal file holds at most (and is zeroed to at open).
pub(super) const CAPACITY: u64 = 1 << 20;

/// Largest record written (bigger invocations take the writer's path).
pub(super) const MAX_RECORD: usize = 64 * 1024;

/// Marks a record's start.
const MAGIC: u32 = 0x4b57_514a; // "KWQJ"

/// Bytes of a record's header: magic, body length, epoch, sequence, crc32.
const HEADER: usize = 4 + 4 + 8 + 8 + 4;

/// One operation of a journalled invocation, as written in the file.
#[derive(Serialize, Deserialize)]
enum Entry {
    /// [`Op::NewTasks`].
    Insert(Vec<(NewTask, Tags)>, Millis),
    /// [`Op::Transition`].
    Transition(Box<Transition>),
}

/// The journal's file and where the next record goes.
struct Tail {
    file: File,
    /// Where the next record is written, within the current epoch.
    position: u64,
    /// Epoch of the records written since the file was last started over.
    epoch: u64,
}

/// The invocation journal of one store (see the module's comment).
pub(super) struct Journal {
    tail: Mutex<Tail>,
    /// Whether each record is synced (`--durability power`) or only
    /// written (`process`: it outlives the process, as the store does).
    sync: bool,
    /// Sequence number of the last record written.
    appended: AtomicU64,
    /// Records not yet confirmed (shared with the writer's notices that
    /// confirm them).
    unconfirmed: Arc<Unconfirmed>,
}

/// The records the store has not yet made durable, by sequence number,
/// and who waits for them. A set, not a high-water mark: two workers'
/// invocations can reach the store in the other order than their records
/// (one commits on its own thread while the other's is still on its way
/// to the writer), and a record may be overwritten, or a read answered
/// "not found", only once it is itself confirmed.
#[derive(Default)]
struct Unconfirmed {
    records: Mutex<BTreeSet<u64>>,
    confirmed: tokio::sync::Notify,
}

impl Unconfirmed {
    fn records(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Journal {
    /// Open the journal beside the store at `db`, and hand back the
    /// operations of every record it holds whose task `stored` says the
    /// store lacks, in the order they were written; the caller applies
    /// them and then calls [`Journal::start_over`].
    pub(super) fn open(
        db: &Path,
        sync: bool,
        stored: impl Fn(&str) -> Result<bool, QueueError>,
    ) -> Result<(Self, Vec<Op>), QueueError> {
        let path = path_of(db);
        let failed = |e: std::io::Error| QueueError::storage(format!("{}", path.display()), e);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(failed)?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(failed)?;
        let mut replay = Vec::new();
        for entries in records(&bytes) {
            let Ok(entries) = serde_json::from_slice::<Vec<Entry>>(entries) else {
                tracing::warn!(journal = %path.display(), "an unreadable invocation record was skipped");
                continue;
            };
            let mut held = false;
            for entry in &entries {
                if let Entry::Insert(tasks, _) = entry {
                    for (task, _) in tasks {
                        held |= !stored(&task.id)?;
                    }
                }
            }
            if held {
                replay.extend(entries.into_iter().map(Entry::into_op));
            }
        }
        let journal = Journal {
            tail: Mutex::new(Tail {
                file,
                position: 0,
                epoch: 0,
            }),
            sync,
            appended: AtomicU64::new(0),
            unconfirmed: Arc::default(),
        };
        Ok((journal, replay))
    }

    /// Zero the file (once what it held is durable in the store), so that
    /// no record of a past run is read again. Zeros are written, not a
    /// hole left: a record then overwrites blocks the file already has,
    /// and its `fdatasync` need not commit the file's block map too (as
    /// with the store's log, see `checkpoint::preallocate_log`).
    pub(super) fn start_over(&self) -> Result<(), QueueError> {
        let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let zero = || -> std::io::Result<()> {
            tail.file.set_len(CAPACITY)?;
            tail.file.write_all_at(&vec![0; CAPACITY as usize], 0)?;
            tail.file.sync_all()
        };
        zero().map_err(|e| QueueError::storage("zeroing the invocation journal", e))
    }

    /// Append `ops` (an invocation's insert and its attempt's
    /// transitions) as one record and make it durable; its sequence
    /// number, or `None` if the invocation is to take the writer's path
    /// (busy, full, too big, other operations, or the write failed).
    pub(super) fn append(&self, ops: &[Op]) -> Option<u64> {
        let entries = entries_of(ops)?;
        let body = serde_json::to_vec(&entries).ok()?;
        if body.len() > MAX_RECORD {
            return None;
        }
        let mut tail = self.tail.try_lock().ok()?;
        let appended = self.appended.load(Ordering::Acquire);
        if self.unconfirmed.records().is_empty() {
            tail.position = 0;
            tail.epoch += 1;
        }
        let record = record(tail.epoch, appended + 1, &body);
        if tail.position + record.len() as u64 > CAPACITY {
            return None;
        }
        let written = tail
            .file
            .write_all_at(&record, tail.position)
            .and_then(|()| {
                if self.sync {
                    tail.file.sync_data()
                } else {
                    Ok(())
                }
            });
        if let Err(e) = written {
            tracing::warn!(error = %e, "writing the invocation journal failed; the store takes the invocation");
            return None;
        }
        tail.position += record.len() as u64;
        self.unconfirmed.records().insert(appended + 1);
        self.appended.store(appended + 1, Ordering::Release);
        Some(appended + 1)
    }

    /// The notice to send with record `seq`'s operations: once they are
    /// durable in the store, the record is confirmed and need not be kept.
    pub(super) fn confirmation(&self, seq: u64) -> Notice {
        let unconfirmed = Arc::clone(&self.unconfirmed);
        Box::new(move || {
            unconfirmed.records().remove(&seq);
            unconfirmed.confirmed.notify_waiters();
        })
    }

    /// Whether some answered invocation is not yet in the store.
    pub(super) fn unconfirmed(&self) -> bool {
        !self.unconfirmed.records().is_empty()
    }

    /// Wait until every invocation answered so far is in the store: a
    /// caller answered from the journal may read its task back at once,
    /// a moment before the store's commit of it.
    pub(super) async fn settled(&self) {
        let target = self.appended.load(Ordering::Acquire);
        loop {
            let confirmed = self.unconfirmed.confirmed.notified();
            tokio::pin!(confirmed);
            confirmed.as_mut().enable();
            if self
                .unconfirmed
                .records()
                .first()
                .is_none_or(|&oldest| oldest > target)
            {
                return;
            }
            confirmed.await;
        }
    }
}

impl Entry {
    fn into_op(self) -> Op {
        match self {
            Entry::Insert(tasks, at) => Op::NewTasks(tasks, at),
            Entry::Transition(t) => Op::Transition(t),
        }
    }
}

/// Where the journal of the store at `db` lives.
fn path_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-invocations");
    PathBuf::from(name)
}

/// The entries of an invocation's operations, or `None` if they hold
/// anything but its insert, its transitions and notices (the notices are
/// not written: they are for the callers of this process).
fn entries_of(ops: &[Op]) -> Option<Vec<Entry>> {
    let mut entries = Vec::with_capacity(ops.len());
    let mut inserts = false;
    for op in ops {
        match op {
            Op::NewTasks(tasks, at) => {
                inserts = true;
                entries.push(Entry::Insert(tasks.clone(), *at));
            }
            Op::Transition(t) => entries.push(Entry::Transition(t.clone())),
            Op::Notify(_) => {}
            _ => return None,
        }
    }
    // Without its insert the record would need earlier writes to be
    // durable: only whole invocations are journalled.
    inserts.then_some(entries)
}

/// One record: header, then the body.
fn record(epoch: u64, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEADER + body.len());
    record.extend_from_slice(&MAGIC.to_le_bytes());
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&epoch.to_le_bytes());
    record.extend_from_slice(&seq.to_le_bytes());
    record.extend_from_slice(&checksum(epoch, seq, body).to_le_bytes());
    record.extend_from_slice(body);
    record
}

fn checksum(epoch: u64, seq: u64, body: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&epoch.to_le_bytes());
    hasher.update(&seq.to_le_bytes());
    hasher.update(&(body.len() as u32).to_le_bytes());
    hasher.update(body);
    hasher.finalize()
}

/// The bodies of the whole records at the start of `bytes`: the first
/// record's epoch, consecutive sequence numbers, checksums that hold.
fn records(bytes: &[u8]) -> Vec<&[u8]> {
    let mut bodies = Vec::new();
    let mut at = 0usize;
    let mut expected: Option<(u64, u64)> = None;
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
    while at + HEADER <= bytes.len() && u32_at(at) == MAGIC {
        let len = u32_at(at + 4) as usize;
        let (epoch, seq) = (u64_at(at + 8), u64_at(at + 16));
        let Some(body) = bytes.get(at + HEADER..at + HEADER + len) else {
            break;
        };
        if expected.is_some_and(|e| e != (epoch, seq))
            || u32_at(at + 24) != checksum(epoch, seq, body)
        {
            break;
        }
        bodies.push(body);
        expected = Some((epoch, seq + 1));
        at += HEADER + len;
    }
    bodies
}

#[cfg(test)]
mod tests {
    use super::{CAPACITY, HEADER, Journal, path_of, record, records};
    use crate::model::{NewTask, TaskOptions, TaskState};
    use crate::queue::embedded::writer::{Op, Transition};
    use std::sync::Arc;

    fn invocation(id: &str) -> Vec<Op> {
        let task = NewTask {
            id: id.into(),
            job_id: None,
            module: crate::model::ModuleId::of(b"m"),
            payload: b"null".to_vec(),
            options: TaskOptions {
                priority: 7,
                tags: [("desk".to_string(), "fx".to_string())].into(),
                ..TaskOptions::default()
            },
        };
        let tags = Arc::new(Default::default());
        let mut done = Transition::new(
            Arc::from(id),
            None,
            task.module.clone(),
            Arc::clone(&tags),
            Some(TaskState::Running),
            TaskState::Completed,
            1,
        );
        done.carried.result = Some(b"42".to_vec());
        vec![
            Op::NewTasks(vec![(task, tags)], 7),
            Op::Notify(Box::new(|| {})),
            Op::Transition(Box::new(done)),
        ]
    }

    fn ids(ops: &[Op]) -> Vec<String> {
        ops.iter()
            .filter_map(|op| match op {
                Op::NewTasks(tasks, _) => Some(tasks[0].0.id.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn records_survive_a_reopen_until_the_store_holds_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kwq.db");
        let (journal, replay) = Journal::open(&db, true, |_| Ok(false)).unwrap();
        assert!(replay.is_empty());
        journal.start_over().unwrap();
        assert_eq!(journal.append(&invocation("t-1")), Some(1));
        assert!(journal.unconfirmed());
        // Unconfirmed: the next record follows the first.
        assert_eq!(journal.append(&invocation("t-2")), Some(2));
        drop(journal);
        let (_, replay) = Journal::open(&db, true, |id| Ok(id == "t-1")).unwrap();
        assert_eq!(ids(&replay), ["t-2"], "only what the store lacks");
        let (Op::NewTasks(replayed, at), Op::NewTasks(written, _)) =
            (&replay[0], &invocation("t-2")[0])
        else {
            panic!("the insert comes first")
        };
        assert_eq!(
            (&replayed[0].0, *at),
            (&written[0].0, 7),
            "read back as written"
        );
        let Some(Op::Transition(done)) = replay.last() else {
            panic!("the outcome is replayed after the insert")
        };
        assert_eq!(done.to, TaskState::Completed);
        assert_eq!(done.carried.result.as_deref(), Some(&b"42"[..]));
    }

    #[test]
    fn a_confirmed_journal_starts_over_and_stale_records_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("kwq.db");
        let (journal, _) = Journal::open(&db, false, |_| Ok(false)).unwrap();
        journal.start_over().unwrap();
        assert_eq!(journal.append(&invocation("t-long-name-1")), Some(1));
        assert_eq!(journal.append(&invocation("t-long-name-2")), Some(2));
        // Confirmed out of order: the first record is still needed.
        (journal.confirmation(2))();
        assert!(journal.unconfirmed());
        assert_eq!(
            futures::FutureExt::now_or_never(journal.settled()),
            None,
            "record 1 is not in the store yet"
        );
        (journal.confirmation(1))();
        assert!(!journal.unconfirmed());
        assert_eq!(
            futures::FutureExt::now_or_never(journal.settled()),
            Some(())
        );
        // Written at the start under a new epoch: t-long-name-2's record,
        // still in the file after it, is of the old epoch.
        assert_eq!(journal.append(&invocation("t-3")), Some(3));
        drop(journal);
        let (journal, replay) = Journal::open(&db, false, |_| Ok(false)).unwrap();
        assert_eq!(ids(&replay), ["t-3"]);
        journal.start_over().unwrap();
        let (_, replay) = Journal::open(&db, false, |_| Ok(false)).unwrap();
        assert!(replay.is_empty(), "zeroed once applied");
        assert_eq!(std::fs::metadata(path_of(&db)).unwrap().len(), CAPACITY);
    }

    #[test]
    fn a_torn_record_ends_the_journal() {
        let mut bytes = record(1, 1, b"[]");
        let second = record(1, 2, b"[1]");
        bytes.extend_from_slice(&second[..second.len() - 1]);
        assert_eq!(records(&bytes), [&b"[]"[..]], "cut short");
        let mut corrupt = record(1, 1, b"[]");
        corrupt.extend_from_slice(&record(1, 2, b"[2]"));
        let last = corrupt.len() - 2;
        corrupt[last] ^= 1;
        assert_eq!(records(&corrupt).len(), 1, "checksum");
        let mut gap = record(1, 1, b"[]");
        gap.extend_from_slice(&record(1, 3, b"[]"));
        assert_eq!(records(&gap).len(), 1, "a sequence gap");
        assert!(records(&[0u8; HEADER]).is_empty());
    }

    #[test]
    fn other_operations_and_big_records_take_the_writers_path() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, _) = Journal::open(&dir.path().join("kwq.db"), false, |_| Ok(false)).unwrap();
        journal.start_over().unwrap();
        let mut ops = invocation("t-1");
        ops.remove(0);
        assert_eq!(journal.append(&ops), None, "no insert");
        let mut ops = invocation("t-1");
        ops.push(Op::Priority("t-1".into(), 3));
        assert_eq!(journal.append(&ops), None, "another operation");
        let mut ops = invocation("t-1");
        if let Op::NewTasks(tasks, _) = &mut ops[0] {
            tasks[0].0.payload = vec![7; super::MAX_RECORD];
        }
        assert_eq!(journal.append(&ops), None, "too big");
        assert_eq!(journal.append(&invocation("t-1")), Some(1));
    }
}
