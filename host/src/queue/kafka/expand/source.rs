//! The payloads of a streamed job, read in order from its chunks on
//! `<prefix>payloads` as the expander writes its tasks. One reader per
//! streamed job this host expands, outside any group; it holds one chunk
//! at a time (and librdkafka's read-ahead, bounded below), so a host's
//! memory does not grow with the stream's length.

use super::super::Member;
use super::super::reads::TopicKind;
use super::super::wire::{PayloadChunk, PayloadsAt};
use crate::queue::QueueError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// Longest wait for the chunk holding a payload before the expander gives
/// up and tries again (the chunk was durable before the job was announced).
const CHUNK_WAIT: Duration = Duration::from_secs(30);

/// Reads one streamed job's payloads forward from a position.
pub(super) struct PayloadReader {
    job: String,
    consumer: BaseConsumer,
    /// Where reading started: a retry after a failure starts here again.
    start: PayloadsAt,
    /// The chunk read last and its offset.
    chunk: Option<(i64, PayloadChunk)>,
}

impl PayloadReader {
    /// A reader of `job`'s payloads from `at` (a chunk holding the first
    /// payload wanted, or one before it).
    pub(super) fn new(shared: &Member, job: &str, at: PayloadsAt) -> Result<Self, QueueError> {
        let mut config = shared.config.client_config();
        // A chunk at a time is all it needs: keep librdkafka's read-ahead small.
        config.set("queued.max.messages.kbytes", "2048");
        let consumer: BaseConsumer = config
            .set(
                "group.id",
                format!("{}payloads-{}", shared.config.prefix, shared.config.host),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            // A position the broker calls out of range must not skip to the
            // end, past every chunk not read yet: read from the start, where
            // the chunks before the one wanted are skipped.
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", shared.config.fetch_wait())
            .create()
            .map_err(|e| QueueError::storage("kafka payload reader", e))?;
        let mut reader = PayloadReader {
            job: job.to_string(),
            consumer,
            start: at,
            chunk: None,
        };
        reader.seek(shared, at)?;
        Ok(reader)
    }

    /// Read from `at` again (after a failure, or to restart at a cursor).
    pub(super) fn seek(&mut self, shared: &Member, at: PayloadsAt) -> Result<(), QueueError> {
        let mut list = TopicPartitionList::new();
        list.add_partition_offset(
            &shared.topics.payloads(),
            at.partition,
            Offset::Offset(at.offset),
        )
        .map_err(|e| QueueError::storage("choosing where to read payloads from", e))?;
        self.consumer
            .assign(&list)
            .map_err(|e| QueueError::storage("reading the payloads topic", e))?;
        self.start = at;
        self.chunk = None;
        Ok(())
    }

    /// Where a reader for the points from the current one on may start:
    /// the chunk read last (or where reading started).
    pub(super) fn position(&self) -> PayloadsAt {
        match &self.chunk {
            Some((offset, _)) => PayloadsAt {
                partition: self.start.partition,
                offset: *offset,
            },
            None => self.start,
        }
    }

    /// The payloads of points `indices` (ascending, none before the
    /// position read from).
    pub(super) fn payloads(
        &mut self,
        shared: &Member,
        indices: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<Vec<u8>>, QueueError> {
        let mut out = Vec::new();
        for index in indices {
            out.push(self.payload(shared, index)?);
        }
        Ok(out)
    }

    fn payload(&mut self, shared: &Member, index: u64) -> Result<Vec<u8>, QueueError> {
        let started = Instant::now();
        loop {
            if let Some((_, chunk)) = &self.chunk {
                if chunk.holds(index) {
                    let text = &chunk.payloads[(index - chunk.first) as usize];
                    return Ok(text.as_bytes().to_vec());
                }
                if chunk.first > index {
                    return Err(QueueError::storage_message(format!(
                        "job {}'s payload {index} is before the chunk read (from {})",
                        self.job, chunk.first
                    )));
                }
            }
            if started.elapsed() > CHUNK_WAIT || shared.closed() {
                return Err(QueueError::storage_message(format!(
                    "job {}'s payload {index} not found on the payloads topic in {CHUNK_WAIT:?}",
                    self.job
                )));
            }
            let Some(result) = self.consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let message = result.map_err(|e| QueueError::storage("reading payloads", e))?;
            let value = message.payload().unwrap_or_default();
            shared.reads.add(
                TopicKind::Expand,
                message.key().map_or(0, <[u8]>::len),
                value.len(),
            );
            match PayloadChunk::decode(value) {
                // Other jobs' chunks share the partition: skip them.
                Ok(chunk) if chunk.job == self.job => {
                    self.chunk = Some((message.offset(), chunk));
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(offset = message.offset(), error = %e, "skipping an unreadable payload chunk");
                }
            }
        }
    }
}

impl std::fmt::Debug for PayloadReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadReader")
            .field("job", &self.job)
            .field("position", &self.position())
            .finish()
    }
}
