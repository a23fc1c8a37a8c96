//! Reading the priority topics: one thread per host owns a consumer in the
//! grid's group, hands tasks to the ready index, leaves a band's partition
//! queues unread while that band has `band_buffer` tasks waiting here (see
//! [`band_queues`](super::band_queues)), and commits each partition up to
//! its lowest unfinished task.

use super::Member;
use super::band_queues::{BandQueues, Doorbell};
use super::offsets::Partition;
use super::reads::TopicKind;
use super::rejoin::RejoinGate;
use crate::queue::QueueError;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often progress is committed.
const COMMIT_EVERY: Duration = Duration::from_millis(50);

/// librdkafka's read-ahead of one task partition (KiB; its default is 64
/// MiB): what a partition's queue holds, unread, while its band is full
/// here. It bounds the memory the read-ahead can take (40 partitions × 64
/// MiB before). tansu 0.6.0 answers with everything up to the request's
/// `fetch.max.bytes` whatever the per-partition limits, so there a queue
/// can hold one such answer more. 1 MiB (with librdkafka's 1 MiB fetches)
/// against 256 KiB (with 64 KiB fetches) measured 24,949-28,543 against 22,479-25,236 no-op tasks/s on
/// the mock broker: fewer, larger fetches.
const READ_AHEAD_KIB: &str = "1024";

/// How long librdkafka waits before fetching again for a partition whose
/// read-ahead is full (its default of 1 s would idle a small read-ahead).
const READ_AHEAD_BACKOFF_MS: &str = "10";

/// Longest sleep of the reading thread with nothing to read: how soon it
/// notices a drained band, a due commit or the host closing.
const IDLE_WAIT: Duration = Duration::from_millis(20);

/// Rebalance hooks: commit and drop what is revoked, note new assignments.
pub(super) struct GroupContext {
    shared: Arc<Member>,
    /// Partitions were revoked or assigned: the partition queues must be
    /// made again.
    rebalanced: AtomicBool,
    /// The partitions revoked by the rebalance in progress.
    revoked: Mutex<Vec<Partition>>,
    /// The rebalance gave back exactly what it took (see [`run`]).
    unchanged: AtomicBool,
}

impl ClientContext for GroupContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.shared.task_fetched.record(&statistics);
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<Partition> = list
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            commit(consumer, &self.shared, CommitMode::Sync, Some(&partitions));
            let _ = self.shared.task_partitions.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |n| Some(n.saturating_sub(partitions.len() as u64)),
            );
            self.shared.revoke(&partitions);
            *self.revoked.lock().unwrap_or_else(|p| p.into_inner()) = partitions.clone();
            self.rebalanced.store(true, Ordering::Release);
            tracing::info!(partitions = partitions.len(), "task partitions revoked");
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "a commit of task offsets failed; retrying with the next");
            let mut state = self.shared.state();
            for e in offsets.elements() {
                state
                    .progress
                    .commit_failed(&(e.topic().to_string(), e.partition()));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            tracing::info!(partitions = list.count(), "task partitions assigned");
            self.shared
                .task_partitions
                .fetch_add(list.count() as u64, std::sync::atomic::Ordering::Relaxed);
            let mut assigned: Vec<Partition> = list
                .elements()
                .iter()
                .map(|e| (e.topic().to_string(), e.partition()))
                .collect();
            let mut revoked =
                std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()));
            assigned.sort();
            revoked.sort();
            if !assigned.is_empty() && assigned == revoked {
                self.unchanged.store(true, Ordering::Release);
            }
            self.rebalanced.store(true, Ordering::Release);
        }
    }
}

/// Start the task consumer thread: it joins the group once `controls_read`
/// says the control topic has been read to its end (or its reader is gone).
pub(super) fn start(
    shared: Arc<Member>,
    controls_read: Receiver<()>,
) -> Result<std::thread::JoinHandle<()>, QueueError> {
    let context = GroupContext {
        shared: shared.clone(),
        rebalanced: AtomicBool::new(false),
        revoked: Mutex::default(),
        unchanged: AtomicBool::new(false),
    };
    let mut settings = shared.config.client_config();
    if shared.config.static_membership {
        settings.set("group.instance.id", &shared.config.host);
    }
    let consumer: BaseConsumer<GroupContext> = settings
        .set("group.id", shared.config.group())
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", &shared.config.assignor)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "300000")
        .set("fetch.wait.max.ms", shared.config.fetch_wait())
        .set("topic.metadata.refresh.interval.ms", "10000")
        // What the brokers sent, refetches included (`kwq bench kafka`).
        .set("statistics.interval.ms", "1000")
        .set("queued.max.messages.kbytes", READ_AHEAD_KIB)
        .set("fetch.queue.backoff.ms", READ_AHEAD_BACKOFF_MS)
        .create_with_context(context)
        .map_err(|e| QueueError::storage("kafka consumer", e))?;
    std::thread::Builder::new()
        .name("kwq-kafka-tasks".into())
        .spawn(move || {
            let _ = controls_read.recv();
            match subscribe(&consumer, &shared) {
                Ok(()) => run(consumer, shared),
                Err(e) => tracing::error!(error = %e, "cannot read the task topics"),
            }
        })
        .map_err(|e| QueueError::storage("starting the task consumer thread", e))
}

fn subscribe(consumer: &BaseConsumer<GroupContext>, shared: &Member) -> Result<(), QueueError> {
    let bands = shared.topics.bands();
    let names: Vec<&str> = bands.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| QueueError::storage("subscribing to the task topics", e))
}

fn run(mut consumer: BaseConsumer<GroupContext>, shared: Arc<Member>) {
    let buffer = shared.config.band_buffer.max(1) as u64;
    let bell = Doorbell::default();
    {
        let bell = bell.clone();
        consumer.set_nonempty_callback(move || bell.ring());
    }
    let consumer = Arc::new(consumer);
    let mut queues = BandQueues::default();
    let mut last_commit = Instant::now();
    let mut rejoins = RejoinGate::new(shared.config.rejoin_stale);
    while !shared.closed() {
        // See `rejoin`: a broker that kept a dead member's assignment.
        if rejoins.due(|| consumer.context().unchanged.swap(false, Ordering::AcqRel)) {
            tracing::warn!(
                "the group rebalanced without changing this host's partitions; rejoining"
            );
            consumer.unsubscribe();
            if let Err(e) = subscribe(&consumer, &shared) {
                tracing::error!(error = %e, "rejoining the group");
            }
        }
        bell.clear();
        // The consumer's own queue: rebalances, statistics, commit results,
        // and messages fetched before their partition had a queue.
        let mut took = false;
        while let Some(result) = consumer.poll(Duration::ZERO) {
            take(&shared, result);
            took = true;
        }
        if consumer.context().rebalanced.swap(false, Ordering::AcqRel) {
            queues.rebuild(&consumer, |topic| shared.topics.priority_of(topic), &bell);
        }
        took |= queues.drain(shared.depth(), buffer, |result| take(&shared, result));
        if last_commit.elapsed() >= COMMIT_EVERY {
            commit(&consumer, &shared, CommitMode::Async, None);
            last_commit = Instant::now();
        }
        if !took {
            bell.wait(IDLE_WAIT);
        }
    }
    drop(queues);
    // Stopping: wait for the outcomes of finished tasks to be delivered, so
    // the last commit covers them, then leave the group.
    shared.publisher.flush(Duration::from_secs(10));
    let runtime = shared.publisher.runtime().clone();
    runtime.block_on(shared.publisher.drain(Duration::from_secs(10)));
    commit(&consumer, &shared, CommitMode::Sync, None);
    consumer.unsubscribe();
}

/// Hand one message of a task topic to the ready index.
fn take(shared: &Arc<Member>, result: KafkaResult<BorrowedMessage<'_>>) {
    match result {
        Ok(message) => {
            shared.reads.add(
                TopicKind::Tasks,
                message.key().map_or(0, <[u8]>::len),
                message.payload().map_or(0, <[u8]>::len),
            );
            shared.accept(
                message.topic(),
                message.partition(),
                message.offset(),
                message.payload().unwrap_or_default(),
            );
        }
        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::FencedInstanceId) => {
            // Static membership: another process joined as this
            // host's name, and the group keeps only one of them.
            tracing::error!(
                host = %shared.config.host,
                "another host joined the grid under this host's name (--host); this one reads no more tasks"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        Err(e) => tracing::warn!(error = %e, "reading the task topics"),
    }
}

/// Commit every partition's progress (or only `only`'s).
fn commit(
    consumer: &BaseConsumer<GroupContext>,
    shared: &Member,
    mode: CommitMode,
    only: Option<&[Partition]>,
) {
    let points = {
        let mut state = shared.state();
        match (mode, only) {
            (CommitMode::Async, None) => state.progress.take_commit_points(),
            _ => state.progress.all(),
        }
    };
    let mut list = TopicPartitionList::new();
    for ((topic, partition), offset) in points {
        if only.is_some_and(|o| !o.contains(&(topic.clone(), partition))) {
            continue;
        }
        let _ = list.add_partition_offset(&topic, partition, Offset::Offset(offset));
    }
    if list.count() == 0 {
        return;
    }
    if let Err(e) = consumer.commit(&list, mode) {
        tracing::warn!(error = %e, "committing task offsets");
    }
}
