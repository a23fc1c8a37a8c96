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
//!
//! A record whose delivery finally fails (librdkafka gave up after
//! `message.timeout.ms`) is sent again, with a growing pause, until it is
//! delivered or the host closes; the batch counts as delivered only then,
//! and everything published meanwhile keeps waiting behind it, so a broker
//! outage holds the host's finished work back instead of dropping its
//! outcome (whose offsets would then never finish and whose tasks would
//! stay Running in every view). A record sent again may land twice if its
//! first try was written but not acknowledged; views take a repeated
//! transition as a no-op.

use super::publish::Outgoing;
use super::wire::{self, TaskEvent};
use super::{Member, Origin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
        Self::deliver(shared, records, batch.events, batch.done, 0);
    }

    /// Deliver `records` (the `tries`-th time), then finish the batch; what
    /// fails is sent again after a pause (see the module's doc).
    fn deliver(
        shared: &Arc<Member>,
        records: Vec<Outgoing>,
        events: Vec<TaskEvent>,
        done: Vec<Origin>,
        tries: u32,
    ) {
        let then = shared.clone();
        shared.publisher.send_then(records, move |undelivered| {
            if !undelivered.is_empty() {
                if then.closed() {
                    // Not finished: the offsets stay uncommitted, so the
                    // tasks are read and run again after a restart.
                    return;
                }
                then.resent_records
                    .fetch_add(undelivered.len() as u64, Ordering::Relaxed);
                let pause = resend_pause(tries);
                let runtime = then.publisher.runtime().clone();
                runtime.spawn(async move {
                    tokio::time::sleep(pause).await;
                    Self::deliver(&then, undelivered, events, done, tries + 1);
                });
                return;
            }
            then.apply_own(&events);
            {
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

/// The pause before sending failed records again the `tries`-th time:
/// 100 ms, doubling, at most 5 s.
fn resend_pause(tries: u32) -> Duration {
    Duration::from_millis(100u64 << tries.min(6)).min(Duration::from_secs(5))
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
                partition: None,
                key: source.clone(),
                value,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::resend_pause;
    use std::time::Duration;

    #[test]
    fn resend_pauses_grow_and_stop_growing() {
        assert_eq!(resend_pause(0), Duration::from_millis(100));
        assert_eq!(resend_pause(1), Duration::from_millis(200));
        assert_eq!(resend_pause(5), Duration::from_millis(3_200));
        assert_eq!(resend_pause(6), Duration::from_secs(5));
        assert_eq!(resend_pause(40), Duration::from_secs(5));
    }
}
