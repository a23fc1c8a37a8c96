//! Sweeps of any size on Kafka, on the mock cluster: a sweep is accepted as
//! two messages, its points are written by the expander that owns the
//! job's cursor as the job drains, and a new expander writes exactly the
//! points a dead one left out.

use crate::conformance::{MockKafka, worker};
use crate::kafka::drain;
use crate::support::TestGrid;
use kwq::examples;
use kwq::model::{JobRecord, ModuleId, Sweep, SweepAxis, TaskOptions};
use kwq::queue::kafka::wire::{EventMessage, ExpandCursor, ScanFrom, TaskMessage};
use kwq::queue::kafka::{KafkaQueue, Role, Topics};
use kwq::queue::{Queue, WorkQueue};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Poll the job on `grid` until `done` holds (at most 120 s); the last view.
pub(crate) async fn job_until(grid: &TestGrid, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, job) = grid.call("GET", &format!("/v1/jobs/{id}"), None).await;
        assert_eq!(status, 200, "{job}");
        if done(&job) {
            return job;
        }
        assert!(Instant::now() < deadline, "job never got there: {job}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A job view's count of tasks in `state`.
pub(crate) fn count(job: &Value, state: &str) -> u64 {
    job["counts"][state].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifty_million_point_sweep_is_accepted_at_once_and_counted_paused_and_cancelled() {
    const TOTAL: u64 = 50_000_000;
    const RAN: usize = 300;
    let mut kafka = MockKafka::with_buffer(100);
    // What is written ahead is bounded by the band buffer alone here, not
    // by the rate the test happens to drain at.
    kafka.write_ahead_ms = 0;
    let host = kafka.host_in_role("a", Role::All).await;
    let queue: Arc<dyn Queue> = Arc::new(host.clone());
    let grid = TestGrid::on_queue(queue.clone()).await;
    grid.upload(examples::NOOP, "noop").await;

    let started = Instant::now();
    let sweep = json!({"base": {"kind": "call"}, "params": {
        "spot": {"from": 0, "to": 9_999}, "seed": {"from": 0, "to": 4_999}}});
    let (status, job) = grid
        .call(
            "POST",
            "/v1/jobs",
            Some(json!({"module": "noop", "sweep": sweep})),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    println!("a {TOTAL}-point sweep accepted in {:?}", started.elapsed());
    assert_eq!(job["total"], json!(TOTAL));
    assert_eq!(job["expanded"], json!(0), "{job}");
    assert_eq!(count(&job, "Pending"), TOTAL, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    // Points arrive as the job drains: run a few hundred.
    let ran = drain(&queue, "w", RAN).await;
    assert!(ran.iter().all(|t| t.starts_with(&format!("{id}."))));
    let (status, _) = grid
        .call("POST", &format!("/v1/jobs/{id}/pause"), None)
        .await;
    assert_eq!(status, 200);
    let paused = job_until(&grid, &id, |j| {
        j["state"] == json!("Paused") && count(j, "Completed") == RAN as u64
    })
    .await;
    // Paused: every point not completed is Pending, written or not.
    assert_eq!(count(&paused, "Pending"), TOTAL - RAN as u64, "{paused}");
    // Written: what ran plus what the flow control keeps ahead (twice the
    // band buffer per host, up to a band's 4 partitions) and a chunk; far
    // from all of it.
    let expanded = paused["expanded"].as_u64().unwrap();
    assert!(
        (RAN as u64..=RAN as u64 + 2 * 100 * 4 + 2048).contains(&expanded),
        "{paused}"
    );

    let (status, _) = grid
        .call("POST", &format!("/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    // Cancelled: what ran stays Completed, everything else is Cancelled
    // (the points never written without a row each).
    let cancelled = job_until(&grid, &id, |j| {
        count(j, "Pending") == 0 && j["state"] == json!("Cancelled")
    })
    .await;
    assert_eq!(count(&cancelled, "Completed"), RAN as u64, "{cancelled}");
    assert_eq!(
        count(&cancelled, "Cancelled"),
        TOTAL - RAN as u64,
        "{cancelled}"
    );
    // The expander stops: its job ends and nothing more is written.
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.kafka_traffic().unwrap().expanding > 0 {
        assert!(Instant::now() < deadline, "the expander never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let written = host.kafka_traffic().unwrap().expanded;
    assert!(written <= expanded + 2048, "{written} written");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), queue.lease(&worker("w", &[])))
            .await
            .is_err(),
        "a cancelled sweep's point was offered"
    );
    queue.close();
}

/// A sweep job of `total` points over one axis, as a host records it.
fn sweep_job(id: &str, total: u64) -> JobRecord {
    JobRecord {
        id: id.into(),
        name: None,
        module: ModuleId::of(b"conformance"),
        options: TaskOptions::default(),
        total,
        expanded: 0,
        paused: false,
        cancelled: false,
        cancel_reason: None,
        waiting: false,
        created_at: 1,
        sweep: Some(Sweep {
            base: json!({}),
            params: [(
                "i".to_string(),
                SweepAxis::Range {
                    from: 0.0,
                    to: (total - 1) as f64,
                    step: 1.0,
                },
            )]
            .into(),
        }),
    }
}

/// How many times each point of `job` is on the band topics (prefix
/// `kwq.`) of the cluster at `brokers`, read whole.
pub(crate) fn points_on_bands(brokers: &str, job: &str) -> BTreeMap<u64, u32> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "points-counter")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    let mut ends = Vec::new();
    for band in Topics::new("kwq.").bands() {
        let metadata = consumer
            .fetch_metadata(Some(&band), Duration::from_secs(10))
            .unwrap();
        let partitions = metadata.topics()[0].partitions().len() as i32;
        for partition in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(&band, partition, Duration::from_secs(10))
                .unwrap();
            if high > low {
                list.add_partition_offset(&band, partition, Offset::Offset(low))
                    .unwrap();
                ends.push((band.clone(), partition, high));
            }
        }
    }
    consumer.assign(&list).unwrap();
    let mut seen = BTreeMap::new();
    let prefix = format!("{job}.");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "bands not read to their ends");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.unwrap();
        let task = TaskMessage::decode(message.payload().unwrap()).unwrap();
        if let Some(index) = task.id.as_deref().and_then(|i| i.strip_prefix(&prefix)) {
            *seen.entry(index.parse().unwrap()).or_insert(0) += 1;
        }
        let (topic, partition, offset) = (message.topic(), message.partition(), message.offset());
        ends.retain(|(t, p, end)| !(t == topic && *p == partition && offset + 1 >= *end));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_expander_writes_exactly_the_points_a_dead_one_left_out() {
    const TOTAL: u64 = 3_000;
    let kafka = MockKafka::new();
    let job = sweep_job("j-taken-over", TOTAL);
    let band = Topics::new("kwq.").band(job.options.priority);
    // What a dead expander left: its cursor at 1,000 (scanning the band
    // from its start), the points below it, and past it the points of a
    // chunk that partly landed: 1,000..1,500 and 1,700..1,800.
    // Keyed as KWQ keys them (murmur2, as Java clients), so the cursor is
    // on the partition the job's later cursors go to.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("partitioner", "murmur2_random")
        .create()
        .unwrap();
    let mut records: Vec<(String, String, Vec<u8>)> = vec![(
        "kwq.events".into(),
        job.id.clone(),
        EventMessage::Job {
            v: kwq::queue::kafka::wire::EXPANSION_VERSION,
            job: job.clone(),
        }
        .encode(),
    )];
    let sweep = job.sweep.clone().unwrap();
    for index in (0..1_500).chain(1_700..1_800) {
        let payload = serde_json::to_vec(&sweep.point(index)).unwrap();
        let id = format!("{}.{index}", job.id);
        let message = TaskMessage::new(
            &id,
            Some(&job.id),
            job.module.as_str(),
            &payload,
            &job.options,
        );
        records.push((band.clone(), id, serde_json::to_vec(&message).unwrap()));
    }
    let scan = (0..4)
        .map(|partition| ScanFrom {
            topic: band.clone(),
            partition,
            offset: 0,
        })
        .collect();
    let cursor = ExpandCursor::new(job.clone(), 1_000, scan, false, None);
    records.push(("kwq.expand".into(), job.id.clone(), cursor.encode()));
    let deliveries: Vec<_> = records
        .iter()
        .map(|(topic, key, value)| {
            producer
                .send_result(FutureRecord::to(topic).key(key).payload(value))
                .unwrap()
        })
        .collect();
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }

    // A host takes the job over while produce requests fail now and then
    // (the idempotent producer retries them in order, writing each once).
    kafka.with_cluster(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 6],
        )
    });
    let host: KafkaQueue = kafka.host_in_role("b", Role::All).await;
    let queue: Arc<dyn Queue> = Arc::new(host.clone());
    let ran = drain(&queue, "w", TOTAL as usize).await;
    let mut ids = ran.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), TOTAL as usize, "a point ran twice");
    // It wrote the gap and the rest, nothing else.
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.kafka_traffic().unwrap().expanding > 0 {
        assert!(Instant::now() < deadline, "the expansion never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        host.kafka_traffic().unwrap().expanded,
        TOTAL - 1_500 - 100,
        "points written by the new expander"
    );
    let on_bands = points_on_bands(&kafka.brokers, &job.id);
    assert_eq!(on_bands.len() as u64, TOTAL);
    assert!(
        on_bands.iter().all(|(i, n)| *i < TOTAL && *n == 1),
        "a point written twice: {:?}",
        on_bands.iter().find(|(_, n)| **n != 1)
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), queue.lease(&worker("w", &[])))
            .await
            .is_err(),
        "more than the sweep's points were offered"
    );
    // The view applies the `expanded` events as it reads them.
    while queue.job(&job.id).await.unwrap().expanded < TOTAL {
        assert!(
            Instant::now() < deadline,
            "the view never counted every point"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The job's last messages on the expand topic: a done cursor, then a
    // tombstone, so compaction forgets the job.
    let last = cursors_of(&kafka.brokers, &job.id);
    let (done, tombstone) = (&last[last.len() - 2], &last[last.len() - 1]);
    let done = ExpandCursor::decode(done.as_deref().expect("a done cursor")).unwrap();
    assert!(done.done && done.next == TOTAL, "{done:?}");
    assert!(tombstone.is_none(), "no tombstone after the done cursor");
    queue.close();
}

/// The values of `job`'s messages on `kwq.expand`, in order (None: a tombstone).
fn cursors_of(brokers: &str, job: &str) -> Vec<Option<Vec<u8>>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "cursor-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    let mut ends = Vec::new();
    for partition in 0..4 {
        let (low, high) = consumer
            .fetch_watermarks("kwq.expand", partition, Duration::from_secs(10))
            .unwrap();
        if high > low {
            list.add_partition_offset("kwq.expand", partition, Offset::Offset(low))
                .unwrap();
            ends.push((partition, high));
        }
    }
    consumer.assign(&list).unwrap();
    let mut values = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ends.is_empty() {
        assert!(Instant::now() < deadline, "kwq.expand not read to its end");
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message.unwrap();
        if message.key() == Some(job.as_bytes()) {
            values.push(message.payload().map(<[u8]>::to_vec));
        }
        let (partition, offset) = (message.partition(), message.offset());
        ends.retain(|(p, end)| !(*p == partition && offset + 1 >= *end));
    }
    values
}
