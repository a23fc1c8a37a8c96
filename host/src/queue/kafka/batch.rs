//! Gathering a host's task events into few messages. While one batch is
//! being delivered, every transition published meanwhile (Running,
//! Completed, Error, Cancelled of any task, with any retry or dead-letter
//! records they bring) waits here; when the delivery report comes back they
//! all go out together as one `tasks` message (or a few, each under the
//! message limit). An idle host sends at once, so a lone task waits for no
//! timer; a busy one sends one message per delivery round trip instead of
//! one per transition, which is what a broker's message rate limits.
//!
//! Offsets of finished tasks are committed only after the batch holding
//! their outcome is delivered, as before batching, and only then are the
//! batch's events applied to this host's own view: a view must hold only
//! what is durable. (A host killed with a batch in flight, whose view had
//! already recorded its tasks Completed, skipped those tasks as finished
//! when it restarted and read them again; no other host ever heard of
//! their outcome, so they stayed unfinished.)

use super::publish::Outgoing;
use super::wire::{self, TaskEvent};
use super::{Member, Origin};
use std::sync::{Arc, Mutex};

/// What waits for the batch in flight to be delivered.
#[derive(Default)]
struct Waiting {
    events: Vec<TaskEvent>,
    records: Vec<Outgoing>,
    done: Vec<Origin>,
    /// A batch is being delivered: new work waits for its report.
    in_flight: bool,
}

/// One host's event batcher.
pub(super) struct EventBatcher {
    /// `<host>/<process instance>`, the batches' `source`.
    source: String,
    waiting: Mutex<Waiting>,
}

impl EventBatcher {
    /// A batcher writing as `source`.
    pub(super) fn new(source: String) -> Self {
        EventBatcher {
            source,
            waiting: Mutex::default(),
        }
    }

    /// Whether a batch read back from the event topic was written by this
    /// process (and so already applied to its view).
    pub(super) fn is_own(&self, source: &str) -> bool {
        source == self.source
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue events and records; `done` offsets finish once they are
    /// delivered. Sends at once unless a batch is in flight.
    pub(super) fn push(
        shared: &Arc<Member>,
        events: Vec<TaskEvent>,
        records: Vec<Outgoing>,
        done: Vec<Origin>,
    ) {
        let batcher = &shared.batcher;
        let taken = {
            let mut waiting = batcher.waiting();
            waiting.events.extend(events);
            waiting.records.extend(records);
            waiting.done.extend(done);
            if waiting.in_flight {
                return;
            }
            let taken = std::mem::take(&mut *waiting);
            waiting.in_flight = true;
            taken
        };
        Self::send(shared, taken);
    }

    /// Send one gathered batch; when delivered, finish its offsets and send
    /// whatever gathered meanwhile.
    fn send(shared: &Arc<Member>, batch: Waiting) {
        let mut records = batch.records;
        records.extend(shared.batch_records(&batch.events));
        let (done, events) = (batch.done, batch.events);
        let then = shared.clone();
        shared.publisher.send_then(records, move |delivered| {
            if delivered {
                then.apply_own(&events);
                let mut state = then.state();
                for origin in &done {
                    state.progress.finished(&origin.partition, origin.offset);
                }
            }
            let next = {
                let mut waiting = then.batcher.waiting();
                if waiting.events.is_empty()
                    && waiting.records.is_empty()
                    && waiting.done.is_empty()
                {
                    waiting.in_flight = false;
                    return;
                }
                let taken = std::mem::take(&mut *waiting);
                waiting.in_flight = true;
                taken
            };
            Self::send(&then, next);
        });
    }
}

impl Member {
    /// The `tasks` messages carrying `events`, keyed by this process's
    /// source: all of them land on one partition of the event topic, so
    /// views read one host's transitions in the order it made them (a
    /// Completed never overtakes the Running that created a task's row in
    /// a view). Hosts spread over the partitions.
    pub(super) fn batch_records(&self, events: &[TaskEvent]) -> Vec<Outgoing> {
        let source = &self.batcher.source;
        wire::encode_batches(source, events)
            .into_iter()
            .map(|value| Outgoing {
                topic: self.topics.events(),
                key: source.clone(),
                value,
            })
            .collect()
    }
}
