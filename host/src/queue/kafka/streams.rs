//! Payload streams on Kafka (`POST /v1/jobs/stream`): a job of any number of
//! explicit payloads, with a host's memory flat however long the stream.
//!
//! The payloads are written to `<prefix>payloads` as they are read from the
//! request, in [`PayloadChunk`]s keyed by the job's id (so all of a job's
//! chunks are on one partition, in order: the producer is idempotent). Once
//! the stream has ended and every chunk is durable, the job is announced
//! and its first expand cursor written, naming the first chunk; from then
//! on the job is expanded as a sweep is (see [`expand`](super::expand)),
//! except that each point's payload is read from the chunks in turn. A
//! stream cut off before its end (a bad line, the client gone, this host
//! dead) is never announced: its chunks are read by no one and age out
//! with the topic's retention.

use super::KafkaQueue;
use super::publish::Outgoing;
use super::wire::{self, PAYLOAD_CHUNK_BYTES, PAYLOAD_CHUNK_COUNT, PayloadChunk, PayloadsAt};
use crate::model::{JobRecord, NewJob, now_ms};
use crate::queue::{PayloadStream, QueueError, StreamItem};

/// Chunks written together, then awaited: bounds what an upload holds in
/// memory (about this many × [`PAYLOAD_CHUNK_BYTES`]).
const CHUNKS_IN_FLIGHT: usize = 16;

/// A chunk being filled, and the written ones waiting to be sent.
struct ChunkWriter {
    job: String,
    next: u64,
    open: PayloadChunk,
    open_bytes: usize,
    ready: Vec<Outgoing>,
    /// Where the job's first chunk landed.
    first: Option<PayloadsAt>,
}

impl ChunkWriter {
    fn new(job: &str) -> Self {
        ChunkWriter {
            job: job.to_string(),
            next: 0,
            open: Self::empty(job, 0),
            open_bytes: 0,
            ready: Vec::new(),
            first: None,
        }
    }

    fn empty(job: &str, first: u64) -> PayloadChunk {
        PayloadChunk {
            v: wire::WIRE_VERSION,
            job: job.to_string(),
            first,
            payloads: Vec::new(),
        }
    }

    /// Add one payload (JSON text); closes the open chunk when it is full.
    fn push(&mut self, topic: &str, payload: String) {
        if !self.open.payloads.is_empty()
            && (self.open.payloads.len() >= PAYLOAD_CHUNK_COUNT
                || self.open_bytes + payload.len() > PAYLOAD_CHUNK_BYTES)
        {
            self.close(topic);
        }
        self.open_bytes += payload.len();
        self.open.payloads.push(payload);
        self.next += 1;
    }

    /// Move the open chunk, if it holds anything, to the ones to send.
    fn close(&mut self, topic: &str) {
        if self.open.payloads.is_empty() {
            return;
        }
        let chunk = std::mem::replace(&mut self.open, Self::empty(&self.job, self.next));
        self.open_bytes = 0;
        self.ready.push(Outgoing {
            topic: topic.to_string(),
            partition: None,
            key: self.job.clone(),
            value: chunk.encode(),
        });
    }
}

impl KafkaQueue {
    /// Write a stream's payloads as chunks, then announce the job and
    /// write its first cursor (see the module's comment).
    pub(super) async fn submit_stream(
        &self,
        job: NewJob,
        mut payloads: PayloadStream,
    ) -> Result<JobRecord, QueueError> {
        let topic = self.shared.topics.payloads();
        let mut writer = ChunkWriter::new(&job.id);
        let mut ended = false;
        while let Some(item) = payloads.recv().await {
            match item {
                StreamItem::Payloads(batch) => {
                    for payload in batch {
                        let text = String::from_utf8(payload).map_err(|_| {
                            QueueError::Conflict("a streamed payload is not UTF-8 JSON".into())
                        })?;
                        writer.push(&topic, text);
                    }
                    if writer.ready.len() >= CHUNKS_IN_FLIGHT {
                        self.send_chunks(&mut writer).await?;
                    }
                }
                StreamItem::End => {
                    ended = true;
                    break;
                }
            }
        }
        if !ended {
            return Err(QueueError::Conflict(
                "the payload stream was cut off".into(),
            ));
        }
        writer.close(&topic);
        self.send_chunks(&mut writer).await?;
        let (total, Some(first)) = (writer.next, writer.first) else {
            return Err(QueueError::Conflict(
                "a job needs at least one payload".into(),
            ));
        };
        let record = job.record(total, 0, now_ms());
        tracing::info!(job = %record.id, tasks = total, "payload stream written");
        self.announce_expansion(record, Some(first)).await
    }

    /// Send the closed chunks and wait until they are durable.
    async fn send_chunks(&self, writer: &mut ChunkWriter) -> Result<(), QueueError> {
        if writer.ready.is_empty() {
            return Ok(());
        }
        let chunks = std::mem::take(&mut writer.ready);
        let placed = self.shared.publisher.send_all_placed(&chunks).await?;
        if writer.first.is_none()
            && let Some((partition, offset)) = placed.first()
        {
            writer.first = Some(PayloadsAt {
                partition: *partition,
                offset: *offset,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_close_by_count_and_by_bytes_and_number_points_in_order() {
        let mut writer = ChunkWriter::new("j-1");
        for i in 0..PAYLOAD_CHUNK_COUNT + 5 {
            writer.push("t", i.to_string());
        }
        // One big payload closes the small open chunk and starts its own.
        writer.push("t", "x".repeat(PAYLOAD_CHUNK_BYTES));
        writer.push("t", "1".into());
        writer.close("t");
        let chunks: Vec<PayloadChunk> = writer
            .ready
            .iter()
            .map(|r| PayloadChunk::decode(&r.value).unwrap())
            .collect();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.payloads.len()).collect();
        assert_eq!(sizes, [PAYLOAD_CHUNK_COUNT, 5, 1, 1]);
        let firsts: Vec<u64> = chunks.iter().map(|c| c.first).collect();
        let n = PAYLOAD_CHUNK_COUNT as u64;
        assert_eq!(firsts, [0, n, n + 5, n + 6]);
        assert_eq!(chunks[1].payloads[0], PAYLOAD_CHUNK_COUNT.to_string());
        assert!(writer.ready.iter().all(|r| r.key == "j-1"));
        assert_eq!(writer.next, n + 7);
    }
}
