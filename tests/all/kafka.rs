//! The Kafka backend on librdkafka's in-process mock cluster: faults
//! (request errors, a broker down, leader changes), priority with read-ahead,
//! two hosts sharing partitions, and messages from a plain producer.

use crate::conformance::{Backend, MockKafka, lease, task, wait_state, worker};
use kwq::model::{NewJob, TaskOptions, TaskState};
use kwq::queue::{Completion, Queue, WorkQueue};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Run `n` leases on one worker, completing each; the task ids in order.
pub(crate) async fn drain(queue: &Arc<dyn Queue>, worker_id: &str, n: usize) -> Vec<String> {
    let w = worker(worker_id, &[]);
    let mut order = Vec::with_capacity(n);
    for _ in 0..n {
        let l = lease(queue, &w).await;
        order.push(l.task_id.clone());
        queue
            .complete(
                &l,
                Completion {
                    result: l.task_id.as_bytes().to_vec(),
                    ..Completion::default()
                },
            )
            .unwrap();
    }
    order
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_errors_a_broker_outage_and_a_leader_change_lose_nothing() {
    let kafka = MockKafka::new();
    let q = kafka.host("h1").await;
    // Produce requests fail (the idempotent producer retries them in order).
    kafka.with_cluster(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 4],
        )
    });
    let first: Vec<_> = (0..100).map(|i| task(&format!("t-a{i}"), 5)).collect();
    q.submit_tasks(first).await.unwrap();
    let mut ran = drain(&q, "w1", 50).await;

    // Leaders move, and one broker goes down for a while.
    kafka.with_cluster(|c| {
        for partition in 0..4 {
            c.partition_leader("kwq.tasks.p5", partition, Some(2))
                .unwrap();
            c.partition_leader("kwq.events", partition, Some(3))
                .unwrap();
        }
        c.broker_down(1).unwrap();
    });
    let second: Vec<_> = (0..100).map(|i| task(&format!("t-b{i}"), 5)).collect();
    let submitted = tokio::spawn({
        let q = q.clone();
        async move { q.submit_tasks(second).await }
    });
    ran.extend(drain(&q, "w1", 50).await);
    kafka.with_cluster(|c| c.broker_up(1).unwrap());
    submitted.await.unwrap().unwrap();
    ran.extend(drain(&q, "w1", 100).await);

    let mut seen: HashMap<String, usize> = HashMap::new();
    for id in &ran {
        *seen.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(seen.len(), 200, "every task ran");
    assert!(seen.values().all(|n| *n == 1), "no task ran twice");
    for id in ["t-a0", "t-a99", "t-b0", "t-b99"] {
        wait_state(&q, id, TaskState::Completed).await;
    }
}

/// A batch of task events whose delivery finally fails (the broker refuses
/// produce requests for longer than `message.timeout.ms`) is sent again,
/// not dropped: dropped, its tasks would never reach Completed in any view
/// and their offsets would never be committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_delivery_finally_fails_are_sent_again() {
    let kafka = MockKafka::new();
    let mut config = kafka.config("h1");
    config
        .extra
        .push(("message.timeout.ms".into(), "1000".into()));
    let host = MockKafka::start_host(config).await;
    let q: Arc<dyn Queue> = Arc::new(host.clone());
    let tasks: Vec<_> = (0..20).map(|i| task(&format!("t-r{i}"), 5)).collect();
    q.submit_tasks(tasks).await.unwrap();
    // Every produce request fails for several seconds: librdkafka retries
    // each record until its 1 s timeout, then reports it failed.
    kafka.with_cluster(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_ENOUGH_REPLICAS; 30],
        )
    });
    let ran = drain(&q, "w1", 20).await;
    assert_eq!(ran.len(), 20);
    for i in 0..20 {
        wait_state(&q, &format!("t-r{i}"), TaskState::Completed).await;
    }
    let resent = host.kafka_traffic().unwrap().resent_records;
    assert!(resent > 0, "no delivery failed: the fault did not happen");
    q.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_low_band_does_not_hold_back_high_priority_work() {
    const BUFFER: usize = 20;
    let kafka = MockKafka::with_buffer(BUFFER);
    let q = kafka.host("h1").await;
    let low: Vec<_> = (0..400).map(|i| task(&format!("t-low{i}"), 1)).collect();
    q.submit_tasks(low).await.unwrap();
    crate::conformance::wait_depth(&q, BUFFER as u64).await;
    let high: Vec<_> = (0..10).map(|i| task(&format!("t-high{i}"), 9)).collect();
    q.submit_tasks(high).await.unwrap();
    // The p1 band is full (its consumer paused), yet the p9 band is still
    // read: if a full band held the others back, this would time out.
    wait_band_depth(&q, 9, 10).await;

    // Held p9 work is leased before any held p1 work.
    let order = drain(&q, "w1", 410).await;
    let last_high = order
        .iter()
        .rposition(|id| id.starts_with("t-high"))
        .unwrap();
    assert_eq!(
        last_high,
        9,
        "the p9 tasks ran first: {:?}",
        &order[..last_high + 1]
    );
    assert_eq!(
        order.iter().filter(|id| id.starts_with("t-low")).count(),
        400
    );
}

/// Waits (up to a minute) until `queue` holds at least `n` tasks of `band`.
async fn wait_band_depth(queue: &Arc<dyn Queue>, band: usize, n: u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while queue.depth()[band] < n {
        assert!(
            std::time::Instant::now() < deadline,
            "band {band} depth {:?} never reached {n}",
            queue.depth()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The distinct tasks finished so far, across hosts.
type Finished = Arc<std::sync::Mutex<std::collections::HashSet<String>>>;

/// One worker of a host: leases and completes (each task "works" for
/// `work`) until `done` tasks are finished across all hosts; the ids it ran
/// and the most tasks its host held ahead in band 5.
async fn work_until(
    queue: Arc<dyn Queue>,
    worker_id: &'static str,
    work: Duration,
    finished: Finished,
    done: usize,
) -> (Vec<String>, u64) {
    let w = worker(worker_id, &[]);
    let (mut ran, mut max_depth) = (Vec::new(), 0);
    // Distinct tasks: a replay (its partition moved before its offset was
    // committed) runs again but is not one more task done.
    while finished.lock().unwrap().len() < done {
        max_depth = max_depth.max(queue.depth()[5]);
        let Ok(Some(l)) = tokio::time::timeout(Duration::from_millis(200), queue.lease(&w)).await
        else {
            continue;
        };
        tokio::time::sleep(work).await;
        queue.complete(&l, Completion::default()).unwrap();
        finished.lock().unwrap().insert(l.task_id.clone());
        ran.push(l.task_id.clone());
    }
    (ran, max_depth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_the_partitions_and_each_task_runs_once() {
    const BUFFER: usize = 25;
    const TASKS: usize = 600;
    let kafka = MockKafka::with_buffer(BUFFER);
    let a = kafka.host("a").await;
    let job = NewJob {
        id: "j-shared".into(),
        name: None,
        module: crate::conformance::module(),
        options: TaskOptions::default(),
        payloads: vec![Vec::new(); TASKS],
        sweep: None,
    };
    a.submit_job(job).await.unwrap();
    crate::conformance::wait_depth(&a, BUFFER as u64).await;
    let finished: Finished = Arc::default();
    let work = Duration::from_millis(10);
    let on_a = tokio::spawn(work_until(a.clone(), "a/w1", work, finished.clone(), TASKS));
    // A second host joins while a works: the group rebalances (which
    // resumes paused partitions); a must keep its read-ahead bound after it.
    let b = kafka.host("b").await;
    let on_b = tokio::spawn(work_until(b.clone(), "b/w1", work, finished.clone(), TASKS));
    let ((ran_a, depth_a), (ran_b, _)) = (on_a.await.unwrap(), on_b.await.unwrap());
    assert!(
        !ran_b.is_empty(),
        "the second host got partitions and ran tasks"
    );
    let mut all: Vec<String> = ran_a.iter().chain(&ran_b).cloned().collect();
    all.sort();
    all.dedup();
    // At-least-once: a task whose partition moved before its offset was
    // committed may run again; its result is still recorded once.
    eprintln!(
        "host a ran {}, host b ran {}, {} runs were replays",
        ran_a.len(),
        ran_b.len(),
        ran_a.len() + ran_b.len() - all.len()
    );
    for queue in [&a, &b] {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let results = queue
                .results(&"j-shared".into(), 0, 10 * TASKS)
                .await
                .unwrap();
            let mut ids: Vec<&String> = results.iter().map(|r| &r.task_id).collect();
            let n = ids.len();
            ids.dedup();
            assert_eq!(ids.len(), n, "a task twice in the results");
            if n == TASKS {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{n} results of {TASKS}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(
        depth_a as usize <= 4 * BUFFER,
        "host a read {depth_a} ahead (buffer {BUFFER})"
    );
    // Either host answers for any task.
    wait_state(&b, &ran_a[0], TaskState::Completed).await;
    wait_state(&a, &ran_b[0], TaskState::Completed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_producer_message_becomes_a_task() {
    let kafka = MockKafka::new();
    let q = kafka.host("h1").await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.config("x").brokers)
        .create()
        .unwrap();
    let message =
        br#"{"v":1,"id":"t-foreign","module":"noop","payload":{"n":3},"tags":{"desk":"fx"}}"#;
    producer
        .send(
            FutureRecord::to("kwq.tasks.p7")
                .key("t-foreign")
                .payload(&message[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    // Not JSON: parked on the dead-letter topic, not a crash or a stall.
    producer
        .send(
            FutureRecord::to("kwq.tasks.p7")
                .key("junk")
                .payload(&b"not json"[..]),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let l = lease(&q, &worker("w1", &[])).await;
    assert_eq!(l.task_id, "t-foreign");
    assert_eq!(&*l.payload, br#"{"n":3}"#);
    q.complete(&l, Completion::default()).unwrap();
    wait_state(&q, "t-foreign", TaskState::Completed).await;
    let record = q.task(&"t-foreign".into()).await.unwrap();
    assert_eq!(record.options.priority, 7);
    assert_eq!(
        record.options.tags.get("desk").map(String::as_str),
        Some("fx")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_submitted_on_one_host_is_paused_and_cancelled_from_another() {
    use kwq::model::{Sweep, SweepAxis};
    let kafka = MockKafka::new();
    let (a, b) = (kafka.host("a").await, kafka.host("b").await);
    let sweep = Sweep {
        base: serde_json::json!({"kind": "call"}),
        params: [(
            "strike".to_string(),
            SweepAxis::Values((0..6).map(|i| serde_json::json!(i)).collect()),
        )]
        .into(),
    };
    let job = a
        .submit_job(NewJob {
            id: "j-sweep".into(),
            name: None,
            module: crate::conformance::module(),
            options: TaskOptions::default(),
            payloads: Vec::new(),
            sweep: Some(sweep),
        })
        .await
        .unwrap();
    // Accepted at once; the points are written by the job's expander.
    assert_eq!((job.total, job.expanded), (6, 0));
    // Host b learns of the job from the event topic, then pauses it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.job(&job.id).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "host b never saw the job"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(b.pause_job(&job.id).await.unwrap().paused);
    // The pause reaches host a: once a shows the job paused, none of its tasks is offered.
    while !a.job(&job.id).await.unwrap().paused {
        assert!(
            std::time::Instant::now() < deadline,
            "host a never saw the pause"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for q in [&a, &b] {
        let offered =
            tokio::time::timeout(Duration::from_millis(300), q.lease(&worker("w", &[]))).await;
        assert!(offered.is_err(), "a paused job's task was offered");
    }
    // Cancelled from b: every point written ends Cancelled on both hosts
    // (those never written count as Cancelled without a row), none ran.
    assert!(b.cancel_job(&job.id).await.unwrap().cancelled);
    for q in [&a, &b] {
        while !q.job(&job.id).await.unwrap().cancelled {
            assert!(
                std::time::Instant::now() < deadline,
                "the cancel never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let rows = q
            .tasks(kwq::queue::TaskFilter {
                job: Some(job.id.clone()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        for row in rows.items {
            wait_state(q, row.id.as_str(), TaskState::Cancelled).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_is_raised_from_another_host() {
    let kafka = MockKafka::new();
    let (a, b) = (kafka.host("a").await, kafka.host("b").await);
    let job = a
        .submit_job(NewJob {
            id: "j-held".into(),
            name: None,
            module: crate::conformance::module(),
            options: TaskOptions {
                priority: 0,
                ..TaskOptions::default()
            },
            payloads: (0..4).map(|i| format!("{i}").into_bytes()).collect(),
            sweep: None,
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while b.job(&job.id).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "host b never saw the job"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for q in [&a, &b] {
        let offered =
            tokio::time::timeout(Duration::from_millis(300), q.lease(&worker("w", &[]))).await;
        assert!(offered.is_err(), "a held job's task was offered");
    }
    // Raised on b: both views show the new priority, and the four tasks run.
    assert_eq!(
        b.set_job_priority(&job.id, 6)
            .await
            .unwrap()
            .options
            .priority,
        6
    );
    while a.job(&job.id).await.unwrap().options.priority != 6 {
        assert!(
            std::time::Instant::now() < deadline,
            "host a never saw the raise"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let finished: Finished = Arc::default();
    let (ran_a, ran_b) = tokio::time::timeout(Duration::from_secs(60), async {
        tokio::join!(
            work_until(a.clone(), "wa", Duration::ZERO, finished.clone(), 4),
            work_until(b.clone(), "wb", Duration::ZERO, finished.clone(), 4),
        )
    })
    .await
    .expect("the raised job's tasks were never leased");
    assert_eq!(ran_a.0.len() + ran_b.0.len(), 4, "{ran_a:?} {ran_b:?}");
    for q in [&a, &b] {
        for i in 0..4 {
            let id = format!("j-held.{i}");
            wait_state(q, &id, TaskState::Completed).await;
            assert_eq!(q.task(&id).await.unwrap().options.priority, 6, "{id}");
        }
    }
}
