//! Sweep jobs of any size on Kafka: points are written to their band as the
//! job drains, not when it is submitted.
//!
//! Submitting a sweep writes two messages: the job's announcement (event
//! topic) and its first [`ExpandCursor`] (the compacted `<prefix>expand`
//! topic, keyed by job id). Every host is in the expanders' consumer group
//! on that topic; the host that owns a job's partition is its expander. It
//! reads its partitions from the start (only the latest cursor of each job
//! is kept), then for each unfinished job:
//!
//! 1. confirms where the job stands: it reads the band messages from the
//!    cursor's scan positions to the bands' ends and writes the points
//!    past the cursor that a dead expander had not written ([`repair`]);
//! 2. writes the next chunk of points while the band's lag (written, not
//!    yet committed by the workers' group) is under twice `band_buffer`
//!    per host, or `write_ahead_ms` of work at the rate the band is being
//!    finished if that is more ([`flow`]), each point to the band's
//!    least-lagged partition, and not while the job is paused or held at
//!    priority 0;
//! 3. after each chunk is durable, writes an `expanded` event (views make
//!    the points' Pending rows) and a new cursor;
//! 4. ends with a `done` cursor once every point is written or the job is
//!    cancelled.
//!
//! A host that dies loses its partitions to another host after the
//! session timeout; that host starts at step 1. Points are never lost and
//! never written twice, as long as a host that lost its partitions has
//! stopped writing (a SIGKILLed or crashed host has; one cut off from the
//! brokers stops when it next polls, and writes nothing meanwhile since
//! its writes fail).

mod flow;
mod held;
mod repair;
mod source;

pub(super) use flow::positions;

use super::Member;
use super::publish::Outgoing;
use super::reads::TopicKind;
use super::rejoin::{EmptyHanded, RejoinGate};
use super::wire::{self, EventMessage, ExpandCursor, PayloadsAt, ScanFrom, TaskMessage};
use crate::model::JobRecord;
use crate::queue::QueueError;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Points written per chunk at most (each chunk is then one `expanded`
/// event and one cursor). A chunk waits for its points to be durable,
/// then for its cursor, so the chunk size sets how fast one expander can
/// write. On tansu 0.6.0 with three worker hosts (`kwq bench membership
/// --api-host`, fresh broker store) 2,048 a chunk ran 12,672 tasks/s in
/// the first window and 6,287-8,006 later; 8,192 ran 12,969-14,023, then
/// 8,403-12,142. Either way the expander, not the hosts, set the pace.
const CHUNK: u64 = 8192;

/// A chunk smaller than this waits for more room, unless it is the job's last.
const MIN_CHUNK: u64 = 128;

/// What the expanders' group did to this host's partitions since it last looked.
#[derive(Default)]
struct Ownership {
    assigned: Vec<i32>,
    revoked: Vec<i32>,
    /// The partitions the rebalance in progress revoked.
    in_progress: Vec<i32>,
    /// A rebalance gave back exactly what it took (see [`Expander::run`]).
    unchanged: bool,
}

/// Notes rebalances of the expanders' group for the expander's loop.
struct OwnerContext {
    changes: Mutex<Ownership>,
}

impl ClientContext for OwnerContext {}

impl ConsumerContext for OwnerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            let revoked: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            changes.revoked.extend(&revoked);
            changes.in_progress = revoked;
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let mut changes = self.changes.lock().unwrap_or_else(|p| p.into_inner());
            let mut assigned: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            let mut revoked = std::mem::take(&mut changes.in_progress);
            assigned.sort_unstable();
            revoked.sort_unstable();
            if !assigned.is_empty() && assigned == revoked {
                changes.unchanged = true;
            }
            changes.assigned.extend(assigned);
        }
    }
}

/// One sweep job this host expands.
struct Expansion {
    job: JobRecord,
    /// Its partition of the expand topic.
    partition: i32,
    /// Every point below this is durable (as far as this host knows).
    next: u64,
    /// Band positions from which any point at or past `next` was written.
    scan: Vec<ScanFrom>,
    /// What the last durable cursor said: where a check starts after a failure.
    durable: (u64, Vec<ScanFrom>),
    /// Checked against the bands since this host took it on.
    confirmed: bool,
    /// When points were last written (jobs take turns).
    last_written: Instant,
    /// A streamed job's payloads (a sweep makes its own).
    stream: Option<Stream>,
    /// What it waits for while its cursor is held (see [`held`]).
    waits: Option<held::Waits>,
}

/// Where a streamed job's payloads are read from.
struct Stream {
    /// The position the last durable cursor names.
    durable: PayloadsAt,
    /// Reading on from there; dropped after a failure (a new one starts at
    /// `durable` again).
    reader: Option<source::PayloadReader>,
}

impl Stream {
    /// Where a cursor for the points from the current one on says to read.
    fn position(&self) -> PayloadsAt {
        self.reader
            .as_ref()
            .map_or(self.durable, source::PayloadReader::position)
    }
}

/// The expander of one host.
struct Expander {
    shared: Arc<Member>,
    consumer: BaseConsumer<OwnerContext>,
    flow: flow::Flow,
    /// Partitions of the expand topic this host owns, and the end each had
    /// when assigned while it is still being read up to.
    owned: HashMap<i32, Option<i64>>,
    jobs: HashMap<String, Expansion>,
    /// Lone tasks that wait (see [`held`]), by id.
    tasks: HashMap<String, held::HeldTask>,
    /// Some lone task was read, or caught up with, since the last pass.
    tasks_dirty: bool,
    /// The count of controls applied that the last pass over tasks saw.
    tasks_seen: u64,
    /// Jobs this host finished, until its own `done` cursor is read back
    /// (so the cursors before it, read back later, do not revive the job).
    finished: HashSet<String>,
    /// The job the current step acts on, if it acts on one: a failure then
    /// backs off that job alone.
    acting_on: Option<String>,
    /// Jobs whose last step failed, left alone until their retry is due, so
    /// one job that keeps failing (a payload chunk not readable yet) does
    /// not hold every other job back.
    backoffs: HashMap<String, Backoff>,
}

/// When a job whose step failed is tried again: 200 ms after the first
/// failure, doubling up to 5 s while it keeps failing.
struct Backoff {
    delay: Duration,
    until: Instant,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(5);

    fn new() -> Self {
        Backoff {
            delay: Duration::ZERO,
            until: Instant::now(),
        }
    }

    /// Another failure: wait longer before the next try.
    fn failed(&mut self) -> Duration {
        self.delay = (self.delay * 2).clamp(Self::FIRST, Self::MAX);
        self.until = Instant::now() + self.delay;
        self.delay
    }

    fn due(&self, now: Instant) -> bool {
        now >= self.until
    }
}

/// Start the expander thread. It joins the expanders' group once
/// `controls_read` says the control topic has been read (a cancelled job
/// must not be expanded meanwhile).
pub(super) fn start(
    shared: Arc<Member>,
    controls_read: Receiver<()>,
) -> Result<std::thread::JoinHandle<()>, QueueError> {
    let mut settings = shared.config.client_config();
    if shared.config.static_membership {
        settings.set("group.instance.id", &shared.config.host);
    }
    let consumer: BaseConsumer<OwnerContext> = settings
        .set("group.id", format!("{}expanders", shared.config.prefix))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Nothing is committed: each new owner reads its partitions whole.
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "roundrobin")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("fetch.wait.max.ms", shared.config.fetch_wait())
        .create_with_context(OwnerContext {
            changes: Mutex::default(),
        })
        .map_err(|e| QueueError::storage("kafka expander consumer", e))?;
    let flow = flow::Flow::new(&shared.config)?;
    std::thread::Builder::new()
        .name("kwq-kafka-expand".into())
        .spawn(move || {
            let _ = controls_read.recv();
            let topic = shared.topics.expand();
            if let Err(e) = consumer.subscribe(&[topic.as_str()]) {
                tracing::error!(error = %e, "cannot join the expanders' group");
                return;
            }
            Expander {
                shared,
                consumer,
                flow,
                owned: HashMap::new(),
                jobs: HashMap::new(),
                tasks: HashMap::new(),
                tasks_dirty: false,
                tasks_seen: 0,
                finished: HashSet::new(),
                acting_on: None,
                backoffs: HashMap::new(),
            }
            .run();
        })
        .map_err(|e| QueueError::storage("starting the expander thread", e))
}

impl Expander {
    fn run(mut self) {
        let mut rejoins = RejoinGate::new(self.shared.config.rejoin_stale);
        let mut empty_handed = EmptyHanded::default();
        while !self.shared.closed() {
            // As the task consumer does (see `rejoin`): with a stale
            // assignment the dead host's sweeps would stay unexpanded.
            let stale = rejoins.due(|| self.take_unchanged());
            let holds_none = self.owned.is_empty();
            let left_out = empty_handed.due(
                Instant::now(),
                holds_none,
                holds_none && self.should_own_partitions(),
            );
            if stale || left_out {
                tracing::warn!(
                    stale,
                    left_out,
                    "the expanders' group left this host a stale assignment, or none; rejoining"
                );
                self.consumer.unsubscribe();
                let topic = self.shared.topics.expand();
                if let Err(e) = self.consumer.subscribe(&[topic.as_str()]) {
                    tracing::error!(error = %e, "rejoining the expanders' group");
                }
            }
            let wait = if self.jobs.is_empty() && self.tasks.is_empty() {
                50
            } else {
                5
            };
            if let Some(result) = self.consumer.poll(Duration::from_millis(wait)) {
                match result {
                    Ok(message) => {
                        let value = message.payload().unwrap_or_default().to_vec();
                        self.shared.reads.add(
                            TopicKind::Expand,
                            message.key().map_or(0, <[u8]>::len),
                            value.len(),
                        );
                        let partition = message.partition();
                        let key =
                            String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned();
                        drop(message);
                        self.read(partition, &key, &value);
                    }
                    Err(e) => tracing::warn!(error = %e, "reading the expand topic"),
                }
            }
            self.follow_rebalances();
            self.note_caught_up();
            self.acting_on = None;
            let result = self.step();
            self.after_step(result);
            self.shared
                .expanding
                .store(self.jobs.len() as u64, Ordering::Relaxed);
            let held_jobs = self.jobs.values().filter(|j| j.waits.is_some()).count();
            self.shared
                .held
                .store((held_jobs + self.tasks.len()) as u64, Ordering::Relaxed);
        }
        self.shared.expanding.store(0, Ordering::Relaxed);
        self.shared.held.store(0, Ordering::Relaxed);
    }

    /// A job whose step succeeded is no longer backed off; one whose step
    /// failed waits longer each time; a failure of no one job's (the held
    /// tasks' pass) pauses the loop briefly.
    fn after_step(&mut self, result: Result<(), QueueError>) {
        match (result, self.acting_on.take()) {
            (Ok(()), Some(id)) => {
                self.backoffs.remove(&id);
            }
            (Ok(()), None) => {}
            (Err(e), Some(id)) => {
                let retry_in = self
                    .backoffs
                    .entry(id.clone())
                    .or_insert_with(Backoff::new)
                    .failed();
                tracing::warn!(job = id, error = %e, ?retry_in, "expanding a job; trying it again later");
            }
            (Err(e), None) => {
                tracing::warn!(error = %e, "deciding waiting tasks; trying again");
                std::thread::sleep(Backoff::FIRST);
            }
        }
    }

    /// Whether this host should own some expand partition: it holds more
    /// task partitions than there are bands. The groups have the same
    /// members and the expand topic as many partitions as a band, so with
    /// partitions dealt evenly a host that holds more than one partition
    /// per band shares the grid with fewer hosts than a band has
    /// partitions, and every host then owns an expand partition.
    fn should_own_partitions(&self) -> bool {
        self.shared.task_partitions.load(Ordering::Relaxed)
            > self.shared.topics.bands().len() as u64
    }

    /// Whether a rebalance gave back what it took since this was last asked.
    fn take_unchanged(&self) -> bool {
        std::mem::take(&mut self.ownership().unchanged)
    }

    /// What the group's rebalances left for this loop to act on.
    fn ownership(&self) -> std::sync::MutexGuard<'_, Ownership> {
        self.consumer
            .context()
            .changes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A cursor (or a tombstone) read from a partition this host owns;
    /// `key` is its job's id.
    fn read(&mut self, partition: i32, key: &str, value: &[u8]) {
        let Some(catching_up) = self.owned.get(&partition).map(Option::is_some) else {
            return;
        };
        if value.is_empty() {
            // The tombstone after a job's done cursor.
            self.jobs.remove(key);
            self.tasks.remove(key);
            self.finished.remove(key);
            return;
        }
        let cursor = match ExpandCursor::decode(value) {
            Ok(cursor) => cursor,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable expand cursor");
                return;
            }
        };
        if cursor.done {
            self.jobs.remove(key);
            self.tasks.remove(key);
            self.finished.remove(key);
            return;
        }
        let own = |id: &str| {
            self.jobs.contains_key(id) || self.tasks.contains_key(id) || self.finished.contains(id)
        };
        if !catching_up && own(key) {
            // This host's own cursors, read back.
            return;
        }
        if let Some(message) = cursor.task {
            self.tasks_dirty = true;
            self.tasks.insert(
                key.to_string(),
                held::HeldTask {
                    partition,
                    message,
                    held: cursor.held,
                    scan: cursor.scan,
                    waits: held::Waits {
                        after: cursor.after,
                        on_failure: cursor.on_failure,
                    },
                },
            );
            return;
        }
        let Some(job) = cursor.job else {
            return;
        };
        let id = job.id.clone();
        self.jobs.insert(
            id,
            Expansion {
                job,
                partition,
                next: cursor.next,
                scan: cursor.scan.clone(),
                durable: (cursor.next, cursor.scan),
                confirmed: false,
                last_written: Instant::now(),
                stream: cursor.payloads.map(|durable| Stream {
                    durable,
                    reader: None,
                }),
                waits: cursor.held.then_some(held::Waits {
                    after: cursor.after,
                    on_failure: cursor.on_failure,
                }),
            },
        );
    }

    /// Take on assigned partitions (read them from the start) and drop revoked ones.
    fn follow_rebalances(&mut self) {
        let (revoked, assigned) = {
            let mut changes = self.ownership();
            (
                std::mem::take(&mut changes.revoked),
                std::mem::take(&mut changes.assigned),
            )
        };
        for partition in revoked {
            self.owned.remove(&partition);
            self.jobs.retain(|_, job| job.partition != partition);
            self.tasks.retain(|_, task| task.partition != partition);
        }
        let jobs = &self.jobs;
        self.backoffs.retain(|id, _| jobs.contains_key(id));
        let topic = self.shared.topics.expand();
        for partition in assigned {
            let end =
                match self
                    .consumer
                    .fetch_watermarks(&topic, partition, Duration::from_secs(30))
                {
                    Ok((low, high)) if high > low => Some(high),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "the end of the expand topic; reading on");
                        None
                    }
                };
            tracing::info!(partition, "expanding the sweeps of an expand partition");
            self.owned.insert(partition, end);
        }
    }

    /// Partitions read up to the end they had when assigned are caught up.
    fn note_caught_up(&mut self) {
        if self.owned.values().all(Option::is_none) {
            return;
        }
        let Ok(positions) = self.consumer.position() else {
            return;
        };
        for (partition, end) in &mut self.owned {
            let at = super::topics::offset_in(&positions, *partition);
            if end.is_some_and(|end| at.is_some_and(|at| at >= end)) {
                *end = None;
                self.tasks_dirty = true;
            }
        }
    }

    /// Do one thing for one job: finish it, confirm it, or write its next chunk.
    fn step(&mut self) -> Result<(), QueueError> {
        if self.step_tasks()? {
            return Ok(());
        }
        let now = Instant::now();
        let ready: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, job)| self.owned.get(&job.partition) == Some(&None))
            .filter(|(id, _)| self.backoffs.get(*id).is_none_or(|b| b.due(now)))
            .map(|(id, _)| id.clone())
            .collect();
        let mut writable = Vec::new();
        for id in ready {
            self.acting_on = Some(id.clone());
            let (cancelled, paused, priority) = self.flags(&id);
            let job = &self.jobs[&id];
            if cancelled || (job.waits.is_none() && job.next >= job.job.total) {
                return self.finish(&id);
            }
            if job.waits.is_some() {
                if self.settle_job(&id)? {
                    return Ok(());
                }
                continue;
            }
            if !job.confirmed {
                return self.confirm(&id);
            }
            // A paused job, or one held at priority 0, gets no new points
            // until resumed or raised.
            if !paused && priority > 0 {
                writable.push((job.last_written, id, priority));
            }
        }
        self.acting_on = None;
        // The job that has waited longest first, if its band has room.
        writable.sort();
        for (_, id, priority) in writable {
            self.acting_on = Some(id.clone());
            let band = self.shared.topics.band(priority);
            let room = self.flow.room(&band)?;
            let job = &self.jobs[&id];
            let left = job.job.total - job.next;
            let n = room.min(CHUNK).min(left);
            if n >= MIN_CHUNK.min(left) && n > 0 {
                return self.write_chunk(&id, &band, priority, n);
            }
        }
        self.acting_on = None;
        Ok(())
    }

    /// Cancelled, paused, and the priority its points get now.
    fn flags(&self, id: &str) -> (bool, bool, u8) {
        let state = self.shared.state();
        let priority = state
            .job_priorities
            .get(id)
            .copied()
            .unwrap_or(self.jobs[id].job.options.priority);
        (
            state.cancelled_jobs.contains(id),
            state.scheduler.ready.is_paused(id),
            priority,
        )
    }

    /// Every point is written (or the job is cancelled): say so for good.
    fn finish(&mut self, id: &str) -> Result<(), QueueError> {
        let job = &self.jobs[id];
        let cursor = ExpandCursor::new(
            job.job.clone(),
            job.next,
            Vec::new(),
            true,
            job.stream.as_ref().map(Stream::position),
        );
        // The done cursor, then a tombstone: compaction drops the job's
        // cursors, so new owners do not read every sweep ever run.
        let tombstone = Outgoing {
            topic: self.shared.topics.expand(),
            partition: None,
            key: id.to_string(),
            value: Vec::new(),
        };
        self.send(vec![self.cursor_record(id, &cursor), tombstone])?;
        tracing::info!(job = id, points = job.next, "sweep expansion ended");
        self.jobs.remove(id);
        self.finished.insert(id.to_string());
        Ok(())
    }

    /// Find what was written past the last durable cursor, write what is
    /// missing below the highest point found, and record a fresh cursor.
    fn confirm(&mut self, id: &str) -> Result<(), QueueError> {
        let (next, scan) = self.jobs[id].durable.clone();
        let found = repair::written_past(&self.shared, id, next, &scan)?;
        let end = found.last().map_or(next, |last| last + 1);
        let missing: Vec<u64> = (next..end).filter(|i| !found.contains(i)).collect();
        let (_, _, priority) = self.flags(id);
        let band = self.shared.topics.band(priority);
        if !missing.is_empty() {
            tracing::warn!(
                job = id,
                missing = missing.len(),
                found = found.len(),
                "writing the points a previous expander left out"
            );
            let records = self.points(id, &missing, priority)?;
            self.send(records)?;
            self.shared
                .expanded_here
                .fetch_add(missing.len() as u64, Ordering::Relaxed);
        }
        let fresh = positions(self.consumer.client(), &band)?;
        let job = self.jobs.get_mut(id).expect("job being confirmed");
        job.next = end;
        job.scan = fresh;
        job.confirmed = true;
        self.record_progress(id, next, end)
    }

    /// Write points `next..next + n` to `band`, then record them.
    fn write_chunk(
        &mut self,
        id: &str,
        band: &str,
        priority: u8,
        n: u64,
    ) -> Result<(), QueueError> {
        if !self.jobs[id].scan.iter().any(|s| s.topic == band) {
            // The job's priority moved it to a band its cursor does not
            // scan: record where that band ends before writing to it.
            let more = positions(self.consumer.client(), band)?;
            let job = self.jobs.get_mut(id).expect("job being expanded");
            job.scan.extend(more);
            let next = job.next;
            self.record_progress(id, next, next)?;
        }
        let from = self.jobs[id].next;
        let indices: Vec<u64> = (from..from + n).collect();
        let mut records = self.points(id, &indices, priority)?;
        // Points with an affinity key go where their key sends them (one
        // partition, so one host, for the key); the others to the band's
        // least-lagged partitions.
        if self.jobs[id].job.options.affinity.is_none() {
            let partitions = self.flow.place(band, n)?;
            for (record, partition) in records.iter_mut().zip(partitions) {
                record.partition = Some(partition);
            }
        }
        let placed = match self.send_placed(records) {
            Ok(placed) => placed,
            Err(e) => {
                // Some may have landed: check from the last durable cursor.
                self.unconfirm(id);
                return Err(e);
            }
        };
        self.flow
            .wrote(band, placed.iter().map(|(partition, _)| *partition));
        self.shared.expanded_here.fetch_add(n, Ordering::Relaxed);
        let job = self.jobs.get_mut(id).expect("job being expanded");
        // Every point written so far is durable: the scan need only start
        // past them, on the band written to.
        job.scan.retain(|s| s.topic == band);
        for (partition, offset) in placed {
            if let Some(s) = job.scan.iter_mut().find(|s| s.partition == partition) {
                s.offset = s.offset.max(offset + 1);
            }
        }
        job.next = from + n;
        job.last_written = Instant::now();
        self.record_progress(id, from, from + n)
    }

    /// After a failure nothing past the last durable cursor is certain.
    fn unconfirm(&mut self, id: &str) {
        if let Some(job) = self.jobs.get_mut(id) {
            job.confirmed = false;
            job.next = job.durable.0;
            job.scan = job.durable.1.clone();
            if let Some(stream) = &mut job.stream {
                stream.reader = None;
            }
        }
    }

    /// Tell views points `from..to` exist and make the cursor durable.
    fn record_progress(&mut self, id: &str, from: u64, to: u64) -> Result<(), QueueError> {
        let job = &self.jobs[id];
        let cursor = ExpandCursor::new(
            job.job.clone(),
            job.next,
            job.scan.clone(),
            false,
            job.stream.as_ref().map(Stream::position),
        );
        let mut records = Vec::with_capacity(2);
        if to > from {
            let event = EventMessage::Expanded {
                v: wire::EXPANSION_VERSION,
                job: id.to_string(),
                from,
                to,
            };
            records.push(Outgoing {
                topic: self.shared.topics.events(),
                partition: None,
                key: id.to_string(),
                value: event.encode(),
            });
        }
        records.push(self.cursor_record(id, &cursor));
        if let Err(e) = self.send(records) {
            self.unconfirm(id);
            return Err(e);
        }
        if to > from && self.shared.config.role.keeps_view() {
            self.shared
                .view
                .apply_view(vec![crate::queue::embedded::ViewChange::Expanded {
                    job: id.to_string(),
                    from,
                    to,
                }]);
        }
        let job = self.jobs.get_mut(id).expect("job being expanded");
        job.durable = (cursor.next, cursor.scan);
        if let (Some(stream), Some(at)) = (&mut job.stream, cursor.payloads) {
            stream.durable = at;
        }
        Ok(())
    }

    /// The task messages of `id`'s points `indices` (ascending) at
    /// `priority`; after a failure to read their payloads nothing past the
    /// last durable cursor is certain.
    fn points(
        &mut self,
        id: &str,
        indices: &[u64],
        priority: u8,
    ) -> Result<Vec<Outgoing>, QueueError> {
        let payloads = match self.payloads(id, indices) {
            Ok(payloads) => payloads,
            Err(e) => {
                self.unconfirm(id);
                return Err(e);
            }
        };
        Ok(indices
            .iter()
            .zip(payloads)
            .map(|(index, payload)| self.point(id, *index, priority, payload))
            .collect())
    }

    /// The payloads of `id`'s points `indices` (ascending): made from its
    /// sweep, or read from its stream's chunks.
    fn payloads(&mut self, id: &str, indices: &[u64]) -> Result<Vec<Vec<u8>>, QueueError> {
        let job = self.jobs.get_mut(id).expect("job being expanded");
        let Some(stream) = &mut job.stream else {
            let sweep = job.job.sweep.as_ref();
            return Ok(indices
                .iter()
                .map(|i| {
                    sweep
                        .map(|s| serde_json::to_vec(&s.point(*i)).unwrap_or_default())
                        .unwrap_or_default()
                })
                .collect());
        };
        if stream.reader.is_none() {
            stream.reader = Some(source::PayloadReader::new(
                &self.shared,
                id,
                stream.durable,
            )?);
        }
        let reader = stream.reader.as_mut().expect("reader just made");
        reader.payloads(&self.shared, indices.iter().copied())
    }

    /// The task message of one point with its payload, at `priority` (the
    /// job's now, looked up once per chunk), for that priority's band.
    fn point(&self, id: &str, index: u64, priority: u8, payload: Vec<u8>) -> Outgoing {
        let job = &self.jobs[id].job;
        let options = crate::model::TaskOptions {
            priority,
            ..job.options.clone()
        };
        let message = TaskMessage::new(
            &format!("{id}.{index}"),
            Some(id),
            job.module.as_str(),
            &payload,
            &options,
        );
        self.shared
            .task_record(&message, self.shared.topics.band(priority))
    }

    fn cursor_record(&self, id: &str, cursor: &ExpandCursor) -> Outgoing {
        Outgoing {
            topic: self.shared.topics.expand(),
            partition: None,
            key: id.to_string(),
            value: cursor.encode(),
        }
    }

    fn send(&self, records: Vec<Outgoing>) -> Result<(), QueueError> {
        let publisher = &self.shared.publisher;
        publisher.runtime().block_on(publisher.send_all(&records))
    }

    fn send_placed(&self, records: Vec<Outgoing>) -> Result<Vec<(i32, i64)>, QueueError> {
        let publisher = &self.shared.publisher;
        publisher
            .runtime()
            .block_on(publisher.send_all_placed(&records))
    }
}
