//! What one host has read from the grid's topics, per kind of topic:
//! `kwq bench kafka` and `/metrics` show it, because what each host reads
//! is what limits how many hosts a grid can have (a host that reads every
//! event reads more the more hosts there are; a worker-only host does not).

use std::sync::atomic::{AtomicU64, Ordering};

/// The kinds of topic a host reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// The priority bands (`tasks.p0..p9`).
    Tasks,
    /// The tracker topic (`events`).
    Events,
    /// The compacted modules topic.
    Modules,
    /// The compacted control topic.
    Control,
    /// The compacted topic of sweep expansions (and band messages read
    /// back to check what a dead expander wrote).
    Expand,
}

impl TopicKind {
    /// Every kind, in the order [`ReadTotals`] lists them.
    pub const ALL: [TopicKind; 5] = [
        TopicKind::Tasks,
        TopicKind::Events,
        TopicKind::Modules,
        TopicKind::Control,
        TopicKind::Expand,
    ];

    /// The kind's label (`topic="..."` in metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Tasks => "tasks",
            TopicKind::Events => "events",
            TopicKind::Modules => "modules",
            TopicKind::Control => "control",
            TopicKind::Expand => "expand",
        }
    }
}

/// Messages and bytes (key and value as the consumer hands them over, so
/// after decompression) one host has read, per [`TopicKind`].
#[derive(Debug, Default)]
pub(super) struct ReadCounters {
    messages: [AtomicU64; 5],
    bytes: [AtomicU64; 5],
}

impl ReadCounters {
    /// Count one message read.
    pub(super) fn add(&self, kind: TopicKind, key: usize, value: usize) {
        let i = kind as usize;
        self.messages[i].fetch_add(1, Ordering::Relaxed);
        self.bytes[i].fetch_add((key + value) as u64, Ordering::Relaxed);
    }

    /// What has been read so far.
    pub(super) fn totals(&self) -> ReadTotals {
        let read = |a: &[AtomicU64; 5]| std::array::from_fn(|i| a[i].load(Ordering::Relaxed));
        ReadTotals {
            messages: read(&self.messages),
            bytes: read(&self.bytes),
        }
    }
}

/// A snapshot of a host's [`ReadCounters`], indexed by [`TopicKind`] as
/// listed in [`TopicKind::ALL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadTotals {
    /// Messages read, per kind.
    pub messages: [u64; 5],
    /// Bytes read, per kind.
    pub bytes: [u64; 5],
}

impl ReadTotals {
    /// Messages read of one kind.
    pub fn messages_of(&self, kind: TopicKind) -> u64 {
        self.messages[kind as usize]
    }

    /// Bytes read of one kind.
    pub fn bytes_of(&self, kind: TopicKind) -> u64 {
        self.bytes[kind as usize]
    }

    /// Bytes read of every kind.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// What was read between `earlier` and this snapshot.
    pub fn since(&self, earlier: &ReadTotals) -> ReadTotals {
        ReadTotals {
            messages: std::array::from_fn(|i| self.messages[i] - earlier.messages[i]),
            bytes: std::array::from_fn(|i| self.bytes[i] - earlier.bytes[i]),
        }
    }
}

/// What the brokers sent one host's task consumer, from librdkafka's
/// statistics (`statistics.interval.ms`). Unlike [`ReadCounters`], which
/// count what the consumer handed over once, these count every message a
/// fetch brought, so messages fetched again are counted again (as a paused
/// partition's read-ahead was, dropped by librdkafka and fetched anew on
/// resume, before each task partition was read from a queue of its own).
#[derive(Debug, Default)]
pub(super) struct FetchCounters {
    messages: AtomicU64,
    bytes: AtomicU64,
    reports: AtomicU64,
}

impl FetchCounters {
    /// Take one statistics report (its figures are totals since the
    /// consumer was created).
    pub(super) fn record(&self, stats: &rdkafka::Statistics) {
        let partitions = stats.topics.values().flat_map(|t| t.partitions.values());
        let (messages, bytes) = partitions.fold((0, 0), |(m, b), p| (m + p.rxmsgs, b + p.rxbytes));
        self.messages.store(messages, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.reports.fetch_add(1, Ordering::Release);
    }

    /// The latest report's totals.
    pub(super) fn totals(&self) -> Fetched {
        Fetched {
            reports: self.reports.load(Ordering::Acquire),
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of a host's [`FetchCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fetched {
    /// Statistics reports taken so far (one a second): a report taken after
    /// a moment covers every fetch before it.
    pub reports: u64,
    /// Task messages the brokers sent, each time they were sent.
    pub messages: u64,
    /// Their bytes, as fetched (compressed).
    pub bytes: u64,
}

/// What one host of a Kafka grid has read, and how many task runs ended on
/// it: bytes read per task run is the figure that says whether a host's
/// reading grows with the grid.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostTraffic {
    /// Read per kind of topic.
    pub reads: ReadTotals,
    /// Task runs that ended here (completed or failed).
    pub finished: u64,
    /// Sweep jobs this host is expanding now (held waiting jobs included).
    pub expanding: u64,
    /// Waiting jobs and tasks whose held cursors this host owns now (see
    /// `waiting`): the host whose death moves them.
    pub held: u64,
    /// Sweep points this host has written.
    pub expanded: u64,
    /// Band partitions the workers' group assigns this host now (0: it
    /// gets no tasks, e.g. still joining, or more hosts than partitions).
    pub task_partitions: u64,
    /// Records whose delivery finally failed and were sent again (a
    /// broker unreachable for longer than `message.timeout.ms`).
    pub resent_records: u64,
    /// What the brokers sent the task consumer, refetches included.
    pub task_fetched: Fetched,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_kind_apart() {
        let counters = ReadCounters::default();
        counters.add(TopicKind::Tasks, 3, 100);
        let before = counters.totals();
        counters.add(TopicKind::Tasks, 3, 100);
        counters.add(TopicKind::Control, 10, 50);
        let now = counters.totals();
        assert_eq!(now.messages_of(TopicKind::Tasks), 2);
        assert_eq!(now.bytes_of(TopicKind::Control), 60);
        assert_eq!(now.messages_of(TopicKind::Events), 0);
        let delta = now.since(&before);
        assert_eq!(delta.total_bytes(), 163);
    }

    #[test]
    fn fetch_totals_sum_every_partition_of_the_latest_report() {
        let partition = |rxmsgs, rxbytes| rdkafka::statistics::Partition {
            rxmsgs,
            rxbytes,
            ..Default::default()
        };
        let topic =
            |parts: Vec<(i32, rdkafka::statistics::Partition)>| rdkafka::statistics::Topic {
                partitions: parts.into_iter().collect(),
                ..Default::default()
            };
        let report = |a, b| rdkafka::Statistics {
            topics: [
                (
                    "kwq.tasks.p0".to_string(),
                    topic(vec![(0, partition(a, 10 * a)), (1, partition(b, 10 * b))]),
                ),
                (
                    "kwq.tasks.p9".to_string(),
                    topic(vec![(0, partition(1, 5))]),
                ),
            ]
            .into_iter()
            .collect(),
            ..Default::default()
        };
        let counters = FetchCounters::default();
        assert_eq!(counters.totals(), Fetched::default());
        counters.record(&report(3, 4));
        assert_eq!(
            counters.totals(),
            Fetched {
                reports: 1,
                messages: 8,
                bytes: 75
            }
        );
        // Totals since the consumer started: a later report replaces them.
        counters.record(&report(30, 4));
        assert_eq!(
            counters.totals(),
            Fetched {
                reports: 2,
                messages: 35,
                bytes: 345
            }
        );
    }
}
