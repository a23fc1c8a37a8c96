//! One scenario suite, run against every queue backend: what the dispatcher
//! and the API rely on must hold on the embedded store and on Kafka alike
//! (the Kafka runs use librdkafka's in-process mock cluster).

use async_trait::async_trait;
use kwq::model::{ErrorKind, ModuleId, NewJob, NewTask, TaskOptions, TaskState, now_ms};
use kwq::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
use kwq::queue::kafka::{KafkaConfig, KafkaQueue, Role, Topics};
use kwq::queue::{Completion, Failure, Lease, Queue, TaskFilter, WorkQueue, WorkerView};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Long enough that a task waits for its warm worker however slowly a
/// Kafka host joins its group (the window itself is tested elsewhere).
const AFFINITY_WINDOW: Duration = Duration::from_secs(60);

/// A backend under test: hosts opened from one `Backend` share its store.
#[async_trait]
pub(crate) trait Backend: Send + Sync {
    /// Open a host (its own process, as far as the store can tell).
    async fn host(&self, name: &str) -> Arc<dyn Queue>;
}

/// The embedded store in a temporary directory.
pub(crate) struct Embedded {
    dir: tempfile::TempDir,
}

impl Embedded {
    pub(crate) fn new() -> Self {
        Embedded {
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

#[async_trait]
impl Backend for Embedded {
    async fn host(&self, _name: &str) -> Arc<dyn Queue> {
        let config = EmbeddedConfig {
            affinity_window: AFFINITY_WINDOW,
            ..EmbeddedConfig::default()
        };
        Arc::new(EmbeddedQueue::open(&self.dir.path().join("q.db"), config).unwrap())
    }
}

/// A command run against the mock cluster on its thread.
type MockCommand = Box<dyn FnOnce(&MockCluster<'static, DefaultProducerContext>) + Send>;

/// A Kafka grid on librdkafka's mock cluster (3 brokers). The cluster
/// handle cannot leave the thread that made it, so it lives on its own
/// thread and faults are injected by sending it commands.
pub(crate) struct MockKafka {
    commands: std::sync::Mutex<std::sync::mpsc::Sender<MockCommand>>,
    pub(crate) brokers: String,
    pub(crate) prefix: String,
    pub(crate) band_buffer: usize,
    /// The hosts' `write_ahead_ms` (the default unless a test bounds what
    /// a sweep's expander writes ahead by `band_buffer` alone).
    pub(crate) write_ahead_ms: u32,
    dir: tempfile::TempDir,
}

impl MockKafka {
    pub(crate) fn new() -> Self {
        Self::with_buffer(1000)
    }

    pub(crate) fn with_buffer(band_buffer: usize) -> Self {
        let prefix = "kwq.".to_string();
        let topics = Topics::new(&prefix);
        let (commands, inbox) = std::sync::mpsc::channel::<MockCommand>();
        let (ready, brokers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cluster = MockCluster::new(3).unwrap();
            // The mock cluster has no admin API: create the topics as an operator would.
            for band in topics.bands() {
                cluster.create_topic(&band, 4, 1).unwrap();
            }
            for (topic, partitions) in [
                (topics.events(), 4),
                (topics.modules(), 1),
                (topics.control(), 1),
                (topics.expand(), 4),
                (topics.dead(), 1),
            ] {
                cluster.create_topic(&topic, partitions, 1).unwrap();
            }
            ready.send(cluster.bootstrap_servers()).unwrap();
            // Runs until the MockKafka (the sender) is dropped.
            for command in inbox {
                command(&cluster);
            }
        });
        MockKafka {
            commands: std::sync::Mutex::new(commands),
            brokers: brokers.recv().unwrap(),
            prefix,
            band_buffer,
            write_ahead_ms: KafkaConfig::default().write_ahead_ms,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn config(&self, name: &str) -> KafkaConfig {
        KafkaConfig {
            brokers: self.brokers.clone(),
            prefix: self.prefix.clone(),
            view_path: self.dir.path().join(format!("{name}.db")),
            host: name.to_string(),
            band_buffer: self.band_buffer,
            write_ahead_ms: self.write_ahead_ms,
            create_topics: false,
            ..KafkaConfig::default()
        }
    }
}

impl MockKafka {
    /// Run `command` on the cluster (fault injection) and wait for it.
    pub(crate) fn with_cluster(
        &self,
        command: impl FnOnce(&MockCluster<'static, DefaultProducerContext>) + Send + 'static,
    ) {
        let (done, wait) = std::sync::mpsc::channel();
        self.commands
            .lock()
            .unwrap()
            .send(Box::new(move |cluster| {
                command(cluster);
                let _ = done.send(());
            }))
            .unwrap();
        wait.recv().unwrap();
    }
}

impl MockKafka {
    /// A started host of the grid in `role`.
    pub(crate) async fn host_in_role(&self, name: &str, role: Role) -> KafkaQueue {
        let config = KafkaConfig {
            role,
            ..self.config(name)
        };
        Self::start_host(config).await
    }

    /// A started host with `config` (from [`MockKafka::config`], changed).
    pub(crate) async fn start_host(config: KafkaConfig) -> KafkaQueue {
        crate::support::test_logs();
        let queue = KafkaQueue::connect(config, Duration::from_secs(30), AFFINITY_WINDOW)
            .await
            .unwrap();
        queue.start();
        queue
    }
}

#[async_trait]
impl Backend for MockKafka {
    async fn host(&self, name: &str) -> Arc<dyn Queue> {
        Arc::new(self.host_in_role(name, Role::All).await)
    }
}

pub(crate) fn module() -> ModuleId {
    ModuleId::of(b"conformance")
}

pub(crate) fn task(id: &str, priority: u8) -> NewTask {
    NewTask {
        id: id.into(),
        job_id: None,
        module: module(),
        payload: format!("{{\"id\":\"{id}\"}}").into_bytes(),
        options: TaskOptions {
            priority,
            ..TaskOptions::default()
        },
    }
}

pub(crate) fn worker(id: &str, warm: &[&str]) -> WorkerView {
    WorkerView {
        id: id.into(),
        warm: warm.iter().map(|k| (module(), k.to_string())).collect(),
        pool: None,
    }
}

/// The next lease, failing the test after a generous bound (a Kafka host
/// first has to join its group).
pub(crate) async fn lease(queue: &Arc<dyn Queue>, worker: &WorkerView) -> Lease {
    tokio::time::timeout(Duration::from_secs(60), queue.lease(worker))
        .await
        .expect("no task offered within 60 s")
        .expect("queue closed")
}

/// Wait until this host's view has the task in `state`.
pub(crate) async fn wait_state(queue: &Arc<dyn Queue>, id: &str, state: TaskState) {
    let mut events = queue.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(record) = queue.task(&id.to_string()).await
            && record.state == state
        {
            return;
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(_) => {}
            Err(_) => panic!(
                "task {id} did not reach {state}: {:?}",
                queue.task(&id.to_string()).await
            ),
        }
    }
}

/// Wait until the host holds `n` tasks ready to lease (Kafka reads them in
/// the background; there is no event for it, so this checks every 10 ms).
pub(crate) async fn wait_depth(queue: &Arc<dyn Queue>, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while queue.depth().iter().sum::<u64>() < n {
        assert!(
            Instant::now() < deadline,
            "depth {:?} never reached {n}",
            queue.depth()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn done(result: &str) -> Completion {
    Completion {
        result: result.as_bytes().to_vec(),
        ..Completion::default()
    }
}

fn failure(retry_at: Option<u64>) -> Failure {
    Failure {
        kind: ErrorKind::GuestError,
        message: "no".into(),
        logs: Vec::new(),
        run_us: 1,
        retry_at,
    }
}

/// The scenarios, each taking a fresh backend.
pub(crate) mod scenarios {
    use super::*;

    pub(crate) async fn enqueue_lease_complete(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-1", 5)]).await.unwrap();
        assert_eq!(
            q.task(&"t-1".into()).await.unwrap().state,
            TaskState::Pending
        );
        let l = lease(&q, &worker("w1", &[])).await;
        assert_eq!((l.task_id.as_str(), l.attempt), ("t-1", 1));
        assert_eq!(&*l.payload, br#"{"id":"t-1"}"#);
        q.started(&l);
        q.complete(&l, done("42")).unwrap();
        wait_state(&q, "t-1", TaskState::Completed).await;
        let record = q.task(&"t-1".into()).await.unwrap();
        assert_eq!(record.result.as_deref(), Some(&b"42"[..]));
        let states: Vec<TaskState> = q
            .timeline(&"t-1".into())
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.state)
            .collect();
        assert_eq!(
            states,
            [
                TaskState::Pending,
                TaskState::Allocated,
                TaskState::Running,
                TaskState::Completed
            ]
        );
    }

    pub(crate) async fn a_failed_attempt_is_retried(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-r", 5)]).await.unwrap();
        let first = lease(&q, &worker("w1", &[])).await;
        q.fail(&first, failure(Some(now_ms()))).unwrap();
        let second = lease(&q, &worker("w1", &[])).await;
        assert_eq!((second.task_id.as_str(), second.attempt), ("t-r", 2));
        q.complete(&second, done("ok")).unwrap();
        wait_state(&q, "t-r", TaskState::Completed).await;
        assert_eq!(q.task(&"t-r".into()).await.unwrap().attempts, 2);
    }

    pub(crate) async fn an_exhausted_task_is_dead_lettered(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-d", 5)]).await.unwrap();
        let l = lease(&q, &worker("w1", &[])).await;
        q.fail(&l, failure(None)).unwrap();
        wait_state(&q, "t-d", TaskState::Dead).await;
        let record = q.task(&"t-d".into()).await.unwrap();
        assert_eq!(record.error_kind, Some(ErrorKind::GuestError));
    }

    pub(crate) async fn higher_priority_is_leased_first(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-low", 2)]).await.unwrap();
        q.submit_tasks(vec![task("t-high", 8)]).await.unwrap();
        wait_depth(&q, 2).await;
        let w = worker("w1", &[]);
        assert_eq!(lease(&q, &w).await.task_id, "t-high");
        assert_eq!(lease(&q, &w).await.task_id, "t-low");
    }

    pub(crate) async fn a_warm_worker_gets_its_affinity_task(backend: impl Backend) {
        let q = backend.host("h1").await;
        let mut keyed = task("t-keyed", 5);
        keyed.options.affinity = Some("curve-usd".into());
        q.submit_tasks(vec![task("t-plain", 5)]).await.unwrap();
        q.submit_tasks(vec![keyed]).await.unwrap();
        wait_depth(&q, 2).await;
        let l = lease(&q, &worker("w1", &["curve-usd"])).await;
        assert_eq!((l.task_id.as_str(), l.warm_hit), ("t-keyed", true));
    }

    pub(crate) async fn a_paused_job_waits_until_resumed(backend: impl Backend) {
        let q = backend.host("h1").await;
        let job = q.submit_job(job("j-pause", 2)).await.unwrap();
        wait_depth(&q, 2).await;
        assert!(q.pause_job(&job.id).await.unwrap().paused);
        let w = worker("w1", &[]);
        // Nothing can be proven absent without waiting: half a second of no offer.
        let offered = tokio::time::timeout(Duration::from_millis(500), q.lease(&w)).await;
        assert!(offered.is_err(), "a paused job's task was offered");
        assert!(!q.resume_job(&job.id).await.unwrap().paused);
        let l = lease(&q, &w).await;
        assert_eq!(l.job_id.as_deref(), Some("j-pause"));
    }

    pub(crate) async fn a_cancelled_job_ends_every_waiting_task(backend: impl Backend) {
        let q = backend.host("h1").await;
        let job = q.submit_job(job("j-cancel", 3)).await.unwrap();
        wait_depth(&q, 3).await;
        assert!(q.cancel_job(&job.id).await.unwrap().cancelled);
        for i in 0..3 {
            wait_state(&q, &format!("j-cancel.{i}"), TaskState::Cancelled).await;
        }
        let offered =
            tokio::time::timeout(Duration::from_millis(500), q.lease(&worker("w1", &[]))).await;
        assert!(offered.is_err(), "a cancelled job's task was offered");
    }

    pub(crate) async fn a_lease_abandoned_by_a_dead_host_is_offered_again(backend: impl Backend) {
        let first = backend.host("h1").await;
        first.submit_tasks(vec![task("t-orphan", 5)]).await.unwrap();
        let abandoned = lease(&first, &worker("h1/w1", &[])).await;
        first.started(&abandoned);
        // The host goes away without finishing the task.
        first.close();
        first.flush().await.unwrap();
        drop(first);
        let second = backend.host("h2").await;
        let again = lease(&second, &worker("h2/w1", &[])).await;
        assert_eq!(again.task_id, "t-orphan");
        second.complete(&again, done("7")).unwrap();
        wait_state(&second, "t-orphan", TaskState::Completed).await;
        let record = second.task(&"t-orphan".into()).await.unwrap();
        assert_eq!(record.result.as_deref(), Some(&b"7"[..]));
    }

    pub(crate) async fn a_waiting_task_is_cancelled(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-wc", 5)]).await.unwrap();
        wait_depth(&q, 1).await;
        q.cancel_task(&"t-wc".into()).await.unwrap();
        wait_state(&q, "t-wc", TaskState::Cancelled).await;
        let offered =
            tokio::time::timeout(Duration::from_millis(500), q.lease(&worker("w1", &[]))).await;
        assert!(offered.is_err(), "a cancelled task was offered");
        // Cancelling it again is a conflict, not a silent success.
        assert!(q.cancel_task(&"t-wc".into()).await.is_err());
    }

    pub(crate) async fn a_running_task_is_cancelled_where_it_is(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-rc", 5)]).await.unwrap();
        let l = lease(&q, &worker("w1", &[])).await;
        q.started(&l);
        wait_state(&q, "t-rc", TaskState::Running).await;
        q.cancel_task(&"t-rc".into()).await.unwrap();
        // The worker running it is told, and gives it up as cancelled.
        tokio::time::timeout(Duration::from_secs(60), l.cancelled.notified())
            .await
            .expect("the running task's worker was never told");
        q.release(&l, true);
        wait_state(&q, "t-rc", TaskState::Cancelled).await;
    }

    pub(crate) async fn raising_a_held_task_releases_it(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-held", 0)]).await.unwrap();
        wait_depth(&q, 1).await;
        let w = worker("w1", &[]);
        let offered = tokio::time::timeout(Duration::from_millis(500), q.lease(&w)).await;
        assert!(offered.is_err(), "a held task was offered");
        q.set_priority(&"t-held".into(), 7).await.unwrap();
        assert_eq!(lease(&q, &w).await.task_id, "t-held");
    }

    pub(crate) async fn a_released_task_is_offered_again_without_an_attempt(backend: impl Backend) {
        let q = backend.host("h1").await;
        q.submit_tasks(vec![task("t-rel", 5)]).await.unwrap();
        let w = worker("w1", &[]);
        let first = lease(&q, &w).await;
        q.started(&first);
        q.release(&first, false);
        let again = lease(&q, &w).await;
        assert_eq!((again.task_id.as_str(), again.attempt), ("t-rel", 1));
        assert_ne!(again.token, first.token);
        // The old lease is stale now: it can neither beat nor finish.
        assert!(q.heartbeat(&first).is_err());
        assert!(q.complete(&first, done("stale")).is_err());
        q.heartbeat(&again).unwrap();
        q.complete(&again, done("fresh")).unwrap();
        wait_state(&q, "t-rel", TaskState::Completed).await;
        let record = q.task(&"t-rel".into()).await.unwrap();
        assert_eq!(record.result.as_deref(), Some(&b"fresh"[..]));
        assert!(q.heartbeat(&again).is_err(), "a finished lease still beats");
    }

    pub(crate) async fn tasks_are_listed_by_filter_in_pages(backend: impl Backend) {
        let q = backend.host("h1").await;
        let tasks: Vec<NewTask> = (0..5)
            .map(|i| {
                let mut t = task(&format!("t-list-{i}"), 0);
                if i % 2 == 0 {
                    t.options.tags.insert("desk".into(), "fx".into());
                }
                t
            })
            .collect();
        q.submit_tasks(tasks).await.unwrap();
        for i in 0..5 {
            wait_state(&q, &format!("t-list-{i}"), TaskState::Pending).await;
        }
        let filter = |after: Option<u64>| TaskFilter {
            tag: Some(("desk".into(), "fx".into())),
            limit: 2,
            after,
            ..TaskFilter::default()
        };
        let first = q.tasks(filter(None)).await.unwrap();
        let ids: Vec<&str> = first.items.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["t-list-0", "t-list-2"]);
        let second = q.tasks(filter(first.next)).await.unwrap();
        let ids: Vec<&str> = second.items.iter().map(|t| t.id.as_str()).collect();
        assert_eq!((ids, second.next), (vec!["t-list-4"], None));
        let cancelled = TaskFilter {
            state: Some(TaskState::Cancelled),
            limit: 10,
            ..TaskFilter::default()
        };
        q.cancel_task(&"t-list-1".into()).await.unwrap();
        wait_state(&q, "t-list-1", TaskState::Cancelled).await;
        let page = q.tasks(cancelled).await.unwrap();
        assert_eq!(page.items.len(), 1);
        // The census counts every task once, in its state.
        let census = q.census().await.unwrap();
        let listed: u64 = census
            .iter()
            .filter(|r| r.module == module())
            .map(|r| r.count)
            .sum();
        assert_eq!(listed, 5);
        assert_eq!(
            census
                .iter()
                .filter(|r| r.state == TaskState::Cancelled)
                .map(|r| r.count)
                .sum::<u64>(),
            1
        );
    }

    pub(crate) async fn raising_a_held_job_releases_its_tasks(backend: impl Backend) {
        let q = backend.host("h1").await;
        let mut held = job("j-held", 3);
        held.options.priority = 0;
        let job = q.submit_job(held).await.unwrap();
        wait_depth(&q, 3).await;
        let w = worker("w1", &[]);
        let offered = tokio::time::timeout(Duration::from_millis(500), q.lease(&w)).await;
        assert!(offered.is_err(), "a held job's task was offered");
        let raised = q.set_job_priority(&job.id, 6).await.unwrap();
        assert_eq!(raised.options.priority, 6);
        for _ in 0..3 {
            let l = lease(&q, &w).await;
            assert_eq!(l.job_id.as_deref(), Some("j-held"));
            q.complete(&l, done("1")).unwrap();
        }
    }

    fn job(id: &str, n: usize) -> NewJob {
        NewJob {
            id: id.into(),
            name: None,
            module: module(),
            options: TaskOptions::default(),
            payloads: (0..n).map(|i| format!("{i}").into_bytes()).collect(),
            sweep: None,
        }
    }
}

/// Every scenario as a test against one backend.
macro_rules! conformance_suite {
    ($backend:expr) => {
        use super::scenarios;
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn enqueue_lease_complete() {
            scenarios::enqueue_lease_complete($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_failed_attempt_is_retried() {
            scenarios::a_failed_attempt_is_retried($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_exhausted_task_is_dead_lettered() {
            scenarios::an_exhausted_task_is_dead_lettered($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn higher_priority_is_leased_first() {
            scenarios::higher_priority_is_leased_first($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_warm_worker_gets_its_affinity_task() {
            scenarios::a_warm_worker_gets_its_affinity_task($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_paused_job_waits_until_resumed() {
            scenarios::a_paused_job_waits_until_resumed($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_cancelled_job_ends_every_waiting_task() {
            scenarios::a_cancelled_job_ends_every_waiting_task($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_lease_abandoned_by_a_dead_host_is_offered_again() {
            scenarios::a_lease_abandoned_by_a_dead_host_is_offered_again($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_waiting_task_is_cancelled() {
            scenarios::a_waiting_task_is_cancelled($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_running_task_is_cancelled_where_it_is() {
            scenarios::a_running_task_is_cancelled_where_it_is($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn raising_a_held_task_releases_it() {
            scenarios::raising_a_held_task_releases_it($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_released_task_is_offered_again_without_an_attempt() {
            scenarios::a_released_task_is_offered_again_without_an_attempt($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tasks_are_listed_by_filter_in_pages() {
            scenarios::tasks_are_listed_by_filter_in_pages($backend).await
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn raising_a_held_job_releases_its_tasks() {
            scenarios::raising_a_held_job_releases_its_tasks($backend).await
        }
    };
}

mod embedded {
    conformance_suite!(super::Embedded::new());
}

mod kafka {
    conformance_suite!(super::MockKafka::new());
}
