//! Writing to Kafka: one idempotent, batching producer per host. Sends are
//! queued without waiting; callers that must know a record is durable await
//! the delivery reports of a whole batch together, never one send at a time.

use super::KafkaConfig;
use crate::queue::QueueError;
use futures::future::{BoxFuture, FutureExt, join_all};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Messages and bytes (key and value, before compression) written by
/// every producer of this process: `kwq bench kafka` divides them by the
/// tasks it ran to print messages and bytes per task.
static WRITTEN: [AtomicU64; 2] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Messages and bytes this process has queued for Kafka so far (see [`WRITTEN`]).
pub fn written() -> (u64, u64) {
    (
        WRITTEN[0].load(Ordering::Relaxed),
        WRITTEN[1].load(Ordering::Relaxed),
    )
}

/// One record to write.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    /// Topic.
    pub(crate) topic: String,
    /// Message key (decides the partition: murmur2, as Java clients do,
    /// unless `partition` is given).
    pub(crate) key: String,
    /// The partition to write to, where the writer chose it: a sweep's
    /// points go to the band's least-loaded partitions
    /// ([`Flow::place`](super::expand)), so none pile up in a partition no
    /// host is reading.
    pub(crate) partition: Option<i32>,
    /// Message value; empty is written as no value at all: a tombstone,
    /// which makes compaction drop the key's earlier messages.
    pub(crate) value: Vec<u8>,
}

/// The host's producer and a count of batches still being delivered.
pub(crate) struct Publisher {
    producer: FutureProducer,
    pending: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    runtime: tokio::runtime::Handle,
}

impl Publisher {
    /// A producer for the cluster in `config`, run from the current tokio runtime.
    pub(crate) fn new(config: &KafkaConfig) -> Result<Self, QueueError> {
        let mut settings = config.client_config();
        // lz4 by default (JSON events compress several times over); a
        // `?kafka.compression.type=` in the store URL wins.
        if settings.get("compression.type").is_none() {
            settings.set("compression.type", "lz4");
        }
        // How long librdkafka retries a record before reporting it failed
        // (the caller then sends it again); a `?kafka.message.timeout.ms=`
        // wins (the fault tests shorten it).
        if settings.get("message.timeout.ms").is_none() {
            settings.set("message.timeout.ms", "120000");
        }
        let producer: FutureProducer = settings
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            // Java's default partitioner for keyed messages, so foreign producers agree.
            .set("partitioner", "murmur2_random")
            .create()
            .map_err(|e| QueueError::storage("kafka producer", e))?;
        Ok(Publisher {
            producer,
            pending: Arc::default(),
            idle: Arc::default(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Queue one record; the future reports its delivery.
    fn send(&self, record: &Outgoing) -> BoxFuture<'static, Result<(), String>> {
        let placed = self.send_placed(record);
        async move { placed.await.map(|_| ()) }.boxed()
    }

    /// Queue one record; the future reports the partition and offset it
    /// was written at.
    fn send_placed(&self, record: &Outgoing) -> BoxFuture<'static, Result<(i32, i64), String>> {
        let mut future_record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(&record.topic).key(record.key.as_str());
        if let Some(partition) = record.partition {
            future_record = future_record.partition(partition);
        }
        if !record.value.is_empty() {
            future_record = future_record.payload(record.value.as_slice());
        }
        WRITTEN[0].fetch_add(1, Ordering::Relaxed);
        WRITTEN[1].fetch_add(
            (record.key.len() + record.value.len()) as u64,
            Ordering::Relaxed,
        );
        loop {
            match self.producer.send_result(future_record) {
                Ok(delivery) => {
                    return async move {
                        match delivery.await {
                            Ok(Ok(placed)) => Ok((placed.partition, placed.offset)),
                            Ok(Err((e, _))) => Err(e.to_string()),
                            Err(_) => Err("delivery cancelled".to_string()),
                        }
                    }
                    .boxed();
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: wait for the network to drain it.
                    future_record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    let message = e.to_string();
                    return async move { Err(message) }.boxed();
                }
            }
        }
    }

    /// Write records and wait until all are durable in the cluster.
    pub(crate) async fn send_all(&self, records: &[Outgoing]) -> Result<(), QueueError> {
        let deliveries: Vec<_> = records.iter().map(|r| self.send(r)).collect();
        for result in join_all(deliveries).await {
            result.map_err(|e| QueueError::storage_message(format!("kafka produce: {e}")))?;
        }
        Ok(())
    }

    /// Write records, wait until all are durable, and say where each landed
    /// (partition, offset), in the order given.
    pub(crate) async fn send_all_placed(
        &self,
        records: &[Outgoing],
    ) -> Result<Vec<(i32, i64)>, QueueError> {
        let deliveries: Vec<_> = records.iter().map(|r| self.send_placed(r)).collect();
        join_all(deliveries)
            .await
            .into_iter()
            .map(|r| r.map_err(|e| QueueError::storage_message(format!("kafka produce: {e}"))))
            .collect()
    }

    /// Write records without waiting; `then(undelivered)` runs once every
    /// delivery report is in, with the records that failed (none: all are
    /// durable), so the caller can send those again.
    pub(crate) fn send_then(
        &self,
        records: Vec<Outgoing>,
        then: impl FnOnce(Vec<Outgoing>) + Send + 'static,
    ) {
        let deliveries: Vec<_> = records.iter().map(|r| self.send(r)).collect();
        self.pending.fetch_add(1, Ordering::AcqRel);
        let (pending, idle) = (self.pending.clone(), self.idle.clone());
        self.runtime.spawn(async move {
            let mut undelivered = Vec::new();
            for (record, result) in records.into_iter().zip(join_all(deliveries).await) {
                if let Err(e) = result {
                    tracing::error!(error = %e, topic = %record.topic, "kafka delivery failed; sending it again");
                    undelivered.push(record);
                }
            }
            then(undelivered);
            if pending.fetch_sub(1, Ordering::AcqRel) == 1 {
                idle.notify_waiters();
            }
        });
    }

    /// Wait (up to `limit`) until every batch sent so far is delivered.
    pub(crate) async fn drain(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let idle = self.idle.notified();
            if self.pending.load(Ordering::Acquire) == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return;
            }
        }
    }

    /// The tokio runtime delivery reports are awaited on.
    /// The producer's client, for metadata and watermark lookups.
    pub(crate) fn client(&self) -> &rdkafka::client::Client<impl rdkafka::client::ClientContext> {
        self.producer.client()
    }

    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Push out everything queued (blocking, bounded).
    pub(crate) fn flush(&self, limit: Duration) {
        let _ = self.producer.flush(limit);
    }
}
