//! Payload streams (`POST /v1/jobs/stream`): on Kafka a stream of any
//! length is accepted with flat memory (its payloads are chunked onto
//! `kwq.payloads` and its tasks written as the job drains, as a sweep's
//! are), a new expander carries on a dead one's stream; on the embedded
//! store a stream is capped as a JSON job is; a bad line fails the whole
//! request and leaves no job.

use crate::conformance::{MockKafka, lease, worker};
use crate::kafka_expand::{count, job_until, points_on_bands};
use crate::support::TestGrid;
use kwq::api::ApiLimits;
use kwq::examples;
use kwq::model::{JobRecord, ModuleId, TaskOptions};
use kwq::queue::kafka::wire::{
    EventMessage, ExpandCursor, PayloadChunk, PayloadsAt, ScanFrom, TaskMessage,
};
use kwq::queue::kafka::{KafkaQueue, Role, Topics};
use kwq::queue::{Completion, Queue, WorkQueue};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

const NDJSON: Option<&str> = Some("application/x-ndjson");

/// The NDJSON body of a job of module `module` with payloads `{"i": n}`.
fn stream_body(module: &str, payloads: std::ops::Range<u64>) -> Vec<u8> {
    let mut body = format!("{{\"module\": \"{module}\", \"name\": \"streamed\"}}\n").into_bytes();
    for i in payloads {
        body.extend_from_slice(format!("{{\"i\":{i}}}\n").as_bytes());
    }
    body
}

/// Lease and complete `n` tasks, checking each one's payload is the line
/// of its index; the indices run.
async fn run_checked(queue: &Arc<dyn Queue>, job: &str, n: usize) -> BTreeSet<u64> {
    let w = worker("w", &[]);
    let mut ran = BTreeSet::new();
    for _ in 0..n {
        let l = lease(queue, &w).await;
        let index: u64 = l
            .task_id
            .strip_prefix(&format!("{job}."))
            .unwrap_or_else(|| panic!("{} is not of {job}", l.task_id))
            .parse()
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&l.payload).unwrap(),
            format!("{{\"i\":{index}}}"),
            "task {index}'s payload"
        );
        assert!(ran.insert(index), "task {index} offered twice");
        queue.complete(&l, Completion::default()).unwrap();
    }
    ran
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_past_the_json_cap_is_accepted_on_kafka_and_each_task_gets_its_line() {
    const TOTAL: u64 = 1_200_000;
    const RAN: usize = 5_000;
    let mut kafka = MockKafka::with_buffer(100);
    // What is written ahead is bounded by the band buffer alone here, not
    // by the rate the test happens to drain at.
    kafka.write_ahead_ms = 0;
    let host = kafka.host_in_role("a", Role::All).await;
    let queue: Arc<dyn Queue> = Arc::new(host.clone());
    let grid = TestGrid::on_queue(queue.clone()).await;
    grid.upload(examples::NOOP, "noop").await;

    let body = stream_body("noop", 0..TOTAL);
    let started = Instant::now();
    let (status, job) = grid.call_raw("POST", "/v1/jobs/stream", body, NDJSON).await;
    assert_eq!(status, 201, "{job}");
    println!(
        "a {TOTAL}-payload stream accepted in {:?}",
        started.elapsed()
    );
    assert_eq!(job["total"], json!(TOTAL), "{job}");
    assert_eq!(job["name"], json!("streamed"));
    assert_eq!(count(&job, "Pending"), TOTAL, "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    // Tasks come as the job drains, each with its own line, over several
    // payload chunks (2,048 payloads each).
    let ran = run_checked(&queue, &id, RAN).await;
    assert_eq!(ran.len(), RAN);
    let (status, _) = grid
        .call("POST", &format!("/v1/jobs/{id}/pause"), None)
        .await;
    assert_eq!(status, 200);
    let paused = job_until(&grid, &id, |j| {
        j["state"] == json!("Paused") && count(j, "Completed") == RAN as u64
    })
    .await;
    assert_eq!(count(&paused, "Pending"), TOTAL - RAN as u64, "{paused}");
    let expanded = paused["expanded"].as_u64().unwrap();
    assert!(
        (RAN as u64..=RAN as u64 + 2 * 100 * 4 + 2048).contains(&expanded),
        "written far ahead: {paused}"
    );
    let (status, _) = grid
        .call("POST", &format!("/v1/jobs/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
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
    queue.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_expander_carries_on_a_dead_ones_stream_exactly() {
    const TOTAL: u64 = 3_000;
    let kafka = MockKafka::new();
    let job = JobRecord {
        id: "j-stream-taken".into(),
        name: None,
        module: ModuleId::of(b"conformance"),
        options: TaskOptions::default(),
        total: TOTAL,
        expanded: 0,
        paused: false,
        cancelled: false,
        cancel_reason: None,
        waiting: false,
        created_at: 1,
        sweep: None,
    };
    let band = Topics::new("kwq.").band(job.options.priority);
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &kafka.brokers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let send = |topic: &str, key: &str, value: Vec<u8>| {
        producer
            .send_result(FutureRecord::to(topic).key(key).payload(&value))
            .unwrap()
    };
    // The stream's chunks (500 payloads each), after another job's chunk
    // on the same partition.
    let other = PayloadChunk {
        v: 1,
        job: "j-other".into(),
        first: 0,
        payloads: vec!["{\"i\":-1}".into(); 10],
    };
    let first_at = send("kwq.payloads", &job.id, other.encode())
        .await
        .unwrap()
        .unwrap();
    for first in (0..TOTAL).step_by(500) {
        let chunk = PayloadChunk {
            v: 1,
            job: job.id.clone(),
            first,
            payloads: (first..first + 500)
                .map(|i| format!("{{\"i\":{i}}}"))
                .collect(),
        };
        send("kwq.payloads", &job.id, chunk.encode())
            .await
            .unwrap()
            .unwrap();
    }
    // What the dead expander left: a cursor at 1,000 naming the partition
    // from the other job's chunk on, the tasks below it, and past it part
    // of a chunk: 1,000..1,500 and 1,700..1,800.
    let mut deliveries = vec![send(
        "kwq.events",
        &job.id,
        EventMessage::Job {
            v: kwq::queue::kafka::wire::EXPANSION_VERSION,
            job: job.clone(),
        }
        .encode(),
    )];
    for index in (0..1_500).chain(1_700..1_800) {
        let id = format!("{}.{index}", job.id);
        let payload = format!("{{\"i\":{index}}}");
        let message = TaskMessage::new(
            &id,
            Some(&job.id),
            job.module.as_str(),
            payload.as_bytes(),
            &job.options,
        );
        deliveries.push(send(&band, &id, serde_json::to_vec(&message).unwrap()));
    }
    let scan = (0..4)
        .map(|partition| ScanFrom {
            topic: band.clone(),
            partition,
            offset: 0,
        })
        .collect();
    let cursor = ExpandCursor::new(
        job.clone(),
        1_000,
        scan,
        false,
        Some(PayloadsAt {
            partition: first_at.partition,
            offset: first_at.offset,
        }),
    );
    deliveries.push(send("kwq.expand", &job.id, cursor.encode()));
    for delivery in deliveries {
        delivery.await.unwrap().unwrap();
    }

    // A host takes it over under injected produce errors.
    kafka.with_cluster(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 6],
        )
    });
    let host: KafkaQueue = kafka.host_in_role("b", Role::All).await;
    let queue: Arc<dyn Queue> = Arc::new(host.clone());
    let ran = run_checked(&queue, &job.id, TOTAL as usize).await;
    assert_eq!(ran, (0..TOTAL).collect::<BTreeSet<u64>>());
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.kafka_traffic().unwrap().expanding > 0 {
        assert!(Instant::now() < deadline, "the expansion never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        host.kafka_traffic().unwrap().expanded,
        TOTAL - 1_500 - 100,
        "tasks written by the new expander"
    );
    let on_bands = points_on_bands(&kafka.brokers, &job.id);
    assert_eq!(on_bands.len() as u64, TOTAL);
    assert!(
        on_bands.values().all(|n| *n == 1),
        "a task written twice: {:?}",
        on_bands.iter().find(|(_, n)| **n != 1)
    );
    queue.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_embedded_store_a_stream_runs_and_bad_streams_leave_no_job() {
    let limits = ApiLimits {
        job_tasks: 50,
        ..ApiLimits::default()
    };
    let mut grid = TestGrid::new(None, limits).await;
    grid.upload(examples::MISBEHAVE, "misbehave").await;
    let mut body = b"{\"module\": \"misbehave\", \"priority\": 7}\n".to_vec();
    for i in 0..40 {
        body.extend_from_slice(format!("{{\"action\":\"echo\",\"value\":{i}}}\r\n\n").as_bytes());
    }
    let (status, job) = grid.call_raw("POST", "/v1/jobs/stream", body, NDJSON).await;
    assert_eq!(status, 201, "{job}");
    assert_eq!(job["total"], json!(40));
    assert_eq!(job["options"]["priority"], json!(7));
    let id = job["id"].as_str().unwrap().to_string();
    grid.start_workers(2);
    let done = grid.wait_job(&id).await;
    assert_eq!(count(&done, "Completed"), 40, "{done}");
    let task = grid.wait_task(&format!("{id}.39")).await;
    assert_eq!(task["result"], json!(39), "{task}");

    let refused = [
        (
            stream_body("misbehave", 0..51),
            NDJSON,
            400,
            "at most 50 payloads",
        ),
        (
            b"{\"module\": \"misbehave\"}\n{\"i\":1}\n{\"i\":\n".to_vec(),
            NDJSON,
            400,
            "line 3",
        ),
        (
            b"{\"module\": \"misbehave\"}\n".to_vec(),
            NDJSON,
            400,
            "at least one payload",
        ),
        (b"".to_vec(), NDJSON, 400, "empty"),
        (
            b"{\"module\": \"misbehave\", \"payloads\": [1]}\n2\n".to_vec(),
            NDJSON,
            400,
            "line 1 is the job",
        ),
        (
            b"{\"module\": \"nope\"}\n2\n".to_vec(),
            NDJSON,
            400,
            "no module named",
        ),
        (
            stream_body("misbehave", 0..3),
            Some("text/plain"),
            415,
            "application/x-ndjson",
        ),
    ];
    for (body, content_type, want, says) in refused {
        let (status, error) = grid
            .call_raw("POST", "/v1/jobs/stream", body, content_type)
            .await;
        assert_eq!(status, want, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
    }
    let (_, jobs) = grid.call("GET", "/v1/jobs", None).await;
    assert_eq!(jobs.as_array().unwrap().len(), 1, "{jobs}");
    grid.stop().await;
}
