//! Roles on a Kafka grid (librdkafka's mock cluster): worker-only hosts run
//! tasks without reading the event topic, API hosts serve the view without
//! running tasks, and controls reach worker hosts through the control topic.

use crate::conformance::{MockKafka, module, wait_state, worker};
use crate::kafka::drain;
use kwq::model::{NewJob, TaskOptions, TaskState};
use kwq::queue::kafka::{Role, TopicKind};
use kwq::queue::{Queue, TaskFilter};
use rdkafka::mocking::MockCoordinator;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn job(id: &str, tasks: usize) -> NewJob {
    NewJob {
        id: id.into(),
        name: None,
        module: module(),
        options: TaskOptions::default(),
        payloads: (0..tasks).map(|i| format!("{i}").into_bytes()).collect(),
        sweep: None,
    }
}

/// Wait until `queue`'s view counts `n` of `job`'s tasks in `state`.
async fn wait_count(queue: &Arc<dyn Queue>, job: &str, state: TaskState, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = queue
            .tasks(TaskFilter {
                job: Some(job.to_string()),
                state: Some(state),
                limit: 10_000,
                ..TaskFilter::default()
            })
            .await
            .unwrap();
        let count = page.items.len() as u64;
        if count == n {
            return;
        }
        assert!(
            count < n && Instant::now() < deadline,
            "job {job} had {count} tasks {state}, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_host_runs_an_api_hosts_job_without_reading_events() {
    const TASKS: usize = 300;
    let kafka = MockKafka::new();
    let api_host = kafka.host_in_role("api", Role::Api).await;
    let worker_host = kafka.host_in_role("w1", Role::Worker).await;
    let (api, work): (Arc<dyn Queue>, Arc<dyn Queue>) =
        (Arc::new(api_host.clone()), Arc::new(worker_host.clone()));
    api.submit_job(job("j-roles", TASKS)).await.unwrap();

    let ran = drain(&work, "w1/w", TASKS).await;
    assert_eq!(ran.len(), TASKS);
    wait_count(&api, "j-roles", TaskState::Completed, TASKS as u64).await;
    wait_state(&api, "j-roles.0", TaskState::Completed).await;
    let record = api.task(&"j-roles.7".to_string()).await.unwrap();
    assert_eq!(record.result.as_deref(), Some(&b"j-roles.7"[..]));

    // The worker host read its tasks and no event; the API host no task.
    let (on_worker, on_api) = (worker_host.reads(), api_host.reads());
    assert_eq!(on_worker.messages_of(TopicKind::Events), 0);
    assert!(on_worker.messages_of(TopicKind::Tasks) >= TASKS as u64);
    assert_eq!(on_api.messages_of(TopicKind::Tasks), 0);
    assert!(on_api.messages_of(TopicKind::Events) > 0);
    assert_eq!(worker_host.finished_here(), TASKS as u64);
    assert_eq!(api_host.finished_here(), 0);
    // And keeps no view: the task is unknown there.
    assert!(work.task(&"j-roles.0".to_string()).await.is_err());
    assert!(work.job(&"j-roles".to_string()).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controls_reach_a_worker_host_that_starts_after_them() {
    let kafka = MockKafka::new();
    let api_host = kafka.host_in_role("api", Role::Api).await;
    let api: Arc<dyn Queue> = Arc::new(api_host);
    api.submit_job(job("j-paused", 10)).await.unwrap();
    api.submit_job(job("j-cancelled", 10)).await.unwrap();
    // The controls are written while producing fails now and then (the
    // idempotent producer retries them).
    kafka.with_cluster(|c| {
        c.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 3],
        )
    });
    assert!(api.pause_job(&"j-paused".into()).await.unwrap().paused);
    assert!(
        api.cancel_job(&"j-cancelled".into())
            .await
            .unwrap()
            .cancelled
    );

    // The control topic is slow to read (its leader answers after 1.5 s),
    // the tasks are not: a host that read tasks before controls would run them.
    kafka.with_cluster(|c| {
        c.coordinator(MockCoordinator::Group("kwq.workers".into()), 1)
            .unwrap();
        for band in 0..=9 {
            for partition in 0..4 {
                c.partition_leader(&format!("kwq.tasks.p{band}"), partition, Some(1))
                    .unwrap();
            }
        }
        c.partition_leader("kwq.modules", 0, Some(2)).unwrap();
        c.partition_leader("kwq.control", 0, Some(3)).unwrap();
        c.broker_round_trip_time(3, Duration::from_millis(1500))
            .unwrap();
    });
    // A worker host joins afterwards: it reads the control topic before
    // any task, so the cancelled job's tasks end Cancelled without running
    // and the paused job's wait.
    let work: Arc<dyn Queue> = Arc::new(kafka.host_in_role("w1", Role::Worker).await);
    // Asked for work at once, it offers none (it would within a second of
    // joining, had it read tasks before their controls).
    let offered = tokio::time::timeout(Duration::from_secs(5), work.lease(&worker("w", &[]))).await;
    assert!(
        offered.is_err(),
        "a task of a paused or cancelled job was offered: {offered:?}"
    );
    wait_count(&api, "j-cancelled", TaskState::Cancelled, 10).await;
    crate::conformance::wait_depth(&work, 10).await;

    // Resumed on the API host: the worker host runs all ten.
    assert!(!api.resume_job(&"j-paused".into()).await.unwrap().paused);
    let ran = drain(&work, "w1/w", 10).await;
    assert!(ran.iter().all(|id| id.starts_with("j-paused.")), "{ran:?}");
    wait_count(&api, "j-paused", TaskState::Completed, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_priority_change_and_a_task_cancel_reach_a_running_worker_host() {
    let kafka = MockKafka::with_buffer(1000);
    let api: Arc<dyn Queue> = Arc::new(kafka.host_in_role("api", Role::Api).await);
    let work: Arc<dyn Queue> = Arc::new(kafka.host_in_role("w1", Role::Worker).await);
    let mut low = job("j-low", 20);
    low.options.priority = 2;
    let mut high = job("j-high", 5);
    high.options.priority = 4;
    api.submit_job(low).await.unwrap();
    api.submit_job(high).await.unwrap();
    crate::conformance::wait_depth(&work, 25).await;
    // One task cancelled, the low job raised above the high one.
    api.control(kwq::queue::Control::CancelTask {
        task: "j-low.3".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        api.set_job_priority(&"j-low".into(), 8)
            .await
            .unwrap()
            .options
            .priority,
        8
    );
    wait_state(&api, "j-low.3", TaskState::Cancelled).await;
    // The raise is applied on the worker host once its held tasks say so.
    let deadline = Instant::now() + Duration::from_secs(60);
    while work.depth()[8] < 19 {
        assert!(
            Instant::now() < deadline,
            "the raise never reached the worker host: {:?}",
            work.depth()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ran = drain(&work, "w1/w", 24).await;
    let last_low = ran.iter().rposition(|id| id.starts_with("j-low")).unwrap();
    assert_eq!(last_low, 18, "the raised job ran first: {ran:?}");
    assert!(!ran.contains(&"j-low.3".to_string()));
    wait_count(&api, "j-low", TaskState::Completed, 19).await;
    wait_count(&api, "j-high", TaskState::Completed, 5).await;
}
