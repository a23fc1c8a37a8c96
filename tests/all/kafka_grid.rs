//! Kafka grids of real `kwq serve` processes on a real Kafka-protocol
//! broker (tansu 0.6.0 on its SQLite engine, installed by
//! `scripts/install-tansu.sh`), all on 127.0.0.1 and stopped by the test.

use crate::process::{
    Server, echo_job_completed_once, get, get_text, post, submit_paced_echo_job, wait_for,
};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tansu broker process with its own SQLite file.
struct Tansu {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Tansu {
    /// The broker binary: `KWQ_TANSU`, else where the install script puts it.
    fn binary() -> PathBuf {
        if let Some(path) = std::env::var_os("KWQ_TANSU") {
            return PathBuf::from(path);
        }
        let home = std::env::var_os("HOME").expect("HOME");
        let path = Path::new(&home).join(".cache/kwq-tools/tansu-0.6.0/bin/tansu");
        assert!(
            path.exists(),
            "no tansu broker at {}: run scripts/install-tansu.sh (scripts/test.sh does)",
            path.display()
        );
        path
    }

    fn start() -> Tansu {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(Self::binary())
            .current_dir(dir.path())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tansu");
        // Ready once it accepts connections.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tansu {
            child,
            port,
            _dir: dir,
        }
    }

    /// The grid's store URL, with dynamic group membership as the README
    /// tells tansu users to run: tansu 0.6.0 checks missed heartbeats only
    /// for members without a `group.instance.id`, so a SIGKILLed static
    /// host stays in the group, holding its partitions unread, until some
    /// other member happens to leave (CI of 2026-12-04: a 20,000-task job
    /// stuck for 180 s after its host was killed); and with the rejoin that
    /// tansu's stale assignments after a member's death need
    /// (`rejoin_stale`, see the README).
    fn store(&self) -> String {
        format!(
            "kafka://{}?static_membership=false&rejoin_stale=true",
            self.brokers()
        )
    }

    /// The broker's address, as `bootstrap.servers` takes it.
    fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn host(tansu: &Tansu, dir: &Path, name: &str) -> Server {
    Server::start_serving(
        dir,
        &[],
        &["--store", &tansu.store(), "--host", name],
        Stdio::inherit(),
        2,
        "warn",
    )
}

/// Hosts that ran a job's completed tasks, as seen by one host. Every page
/// is read: the first pages alone may all be one host's tasks.
async fn workers_of(client: &reqwest::Client, server: &Server, job: &str) -> BTreeSet<String> {
    let mut workers = BTreeSet::new();
    let mut after = String::new();
    loop {
        let page = get(
            client,
            format!(
                "{}/v1/tasks?job={job}&status=Completed&limit=1000{after}",
                server.url
            ),
        )
        .await;
        workers.extend(
            page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["worker"].as_str())
                .filter_map(|w| w.split('/').next())
                .map(str::to_string),
        );
        match page["next"].as_u64() {
            Some(next) => after = format!("&after={next}"),
            None => return workers,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_share_a_job_and_a_killed_host_loses_nothing() {
    const TASKS: u64 = 20_000;
    let tansu = Tansu::start();
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let client = reqwest::Client::new();
    let first = host(&tansu, d1.path(), "h1");
    // Each task sleeps 1 ms: about 2,000 tasks/s a host, so the job is still
    // running when the second host has joined and when the first is killed.
    let id = submit_paced_echo_job(&client, &first, TASKS, "kafka", Some(1)).await;

    // h1 takes the job and leads the consumer group; h2 joins once h1 works.
    wait_for(&client, &first, &id, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 500
    })
    .await;
    let second = host(&tansu, d2.path(), "h2");
    let before = wait_for(&client, &second, &id, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 2_000
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let workers = workers_of(&client, &first, &id).await;
        if workers.contains("h1") && workers.contains("h2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "one host ran everything: {workers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The host that took the job and leads the consumer group dies.
    first.kill();
    assert!(
        before["finished"].as_u64().unwrap() < TASKS,
        "killed before the end: {before}"
    );

    echo_job_completed_once(&client, &second, &id, TASKS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_written_by_a_plain_kafka_producer_runs() {
    let tansu = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let server = host(&tansu, dir.path(), "h1");
    // Once the host has uploaded its modules it has created the topics:
    // write a task message as any Kafka client could.
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&client, format!("{}/v1/modules", server.url))
        .await
        .as_array()
        .is_none_or(Vec::is_empty)
    {
        assert!(
            Instant::now() < deadline,
            "the host never listed its modules"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{}", tansu.port))
        .create()
        .unwrap();
    let message = json!({
        "v": 1,
        "id": "t-from-python",
        "module": "misbehave",
        "payload": {"action": "echo", "value": 7},
        "tags": {"desk": "rates"}
    });
    producer
        .send(
            FutureRecord::to("kwq.tasks.p7")
                .key("t-from-python")
                .payload(&serde_json::to_vec(&message).unwrap()),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let task = loop {
        let response = client
            .get(format!("{}/v1/tasks/t-from-python", server.url))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            let task: Value = response.json().await.unwrap();
            if task["state"] == json!("Completed") {
                break task;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the foreign task never completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(task["result"], json!(7), "{task}");
    assert_eq!(task["options"]["priority"], json!(7), "{task}");
    let states: Vec<&str> = task["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["state"].as_str())
        .collect();
    assert_eq!(states, ["Allocated", "Running", "Completed"], "{task}");
}

/// A host of the grid in `role` (`all`, `api` or `worker`).
fn host_in_role(tansu: &Tansu, dir: &Path, name: &str, role: &str) -> Server {
    Server::start_serving(
        dir,
        &[],
        &["--store", &tansu.store(), "--host", name, "--role", role],
        Stdio::inherit(),
        2,
        "warn",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_host_and_two_worker_hosts_lose_nothing_when_killed() {
    const TASKS: u64 = 20_000;
    let tansu = Tansu::start();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let client = reqwest::Client::new();
    let api = host_in_role(&tansu, dirs[0].path(), "api", "api");
    let w1 = host_in_role(&tansu, dirs[1].path(), "w1", "worker");
    let w2 = host_in_role(&tansu, dirs[2].path(), "w2", "worker");

    // A worker host keeps no view: it serves health, not the API.
    let refused = client
        .get(format!("{}/v1/tasks", w1.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], json!("worker_host"), "{body}");
    let health = client
        .get(format!("{}/healthz", w2.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);

    // Both worker hosts hold band partitions before the job goes in (on a
    // loaded machine the first could otherwise run it all alone).
    for worker in [&w1, &w2] {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let metrics = get_text(&client, format!("{}/metrics", worker.url)).await;
            let partitions = metrics
                .lines()
                .find_map(|l| l.strip_prefix("kwq_kafka_task_partitions "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            if partitions > 0.0 {
                break;
            }
            assert!(Instant::now() < deadline, "no partitions: {metrics}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Paced (1 ms a task) so the job is still running when hosts are killed.
    let id = submit_paced_echo_job(&client, &api, TASKS, "roles", Some(1)).await;
    // Both worker hosts run the job's tasks (the API host runs none).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let workers = workers_of(&client, &api, &id).await;
        assert!(!workers.contains("api"), "the API host ran tasks");
        if workers.contains("w1") && workers.contains("w2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "both worker hosts never ran tasks: {workers:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What a worker host read, on its /metrics: its tasks, and no event.
    let metrics = get_text(&client, format!("{}/metrics", w2.url)).await;
    let read = |topic: &str| {
        let prefix = format!("kwq_kafka_read_bytes_total{{topic=\"{topic}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    assert_eq!(read("events"), Some(0.0), "{metrics}");
    assert!(read("tasks").unwrap_or(0.0) > 0.0, "{metrics}");
    // A worker host dies, then the API host.
    w1.kill();
    let before = get(&client, format!("{}/v1/jobs/{id}", api.url)).await;
    api.kill();
    assert!(
        before["finished"].as_u64().unwrap() < TASKS,
        "killed before the end: {before}"
    );

    // The API host comes back on its view and catches up: every task
    // completed, each result once (replays of w1's unfinished tasks collapse).
    let api = host_in_role(&tansu, dirs[0].path(), "api", "api");
    echo_job_completed_once(&client, &api, &id, TASKS).await;
    let workers = workers_of(&client, &api, &id).await;
    assert!(
        workers.is_subset(&["w1", "w2"].map(String::from).into()),
        "{workers:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_runs_once_across_a_sigkill_and_restart_of_its_expanding_host() {
    const POINTS: u64 = 200_000;
    let tansu = Tansu::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let client = reqwest::Client::new();
    let mut hosts: Vec<Option<Server>> = vec![
        Some(host(&tansu, dirs[0].path(), "h1")),
        Some(host(&tansu, dirs[1].path(), "h2")),
    ];
    let sweep =
        json!({"base": {"action": "echo"}, "params": {"value": {"from": 0, "to": POINTS - 1}}});
    let response = client
        .post(format!("{}/v1/jobs", hosts[1].as_ref().unwrap().url))
        .json(&json!({"module": "misbehave", "sweep": sweep}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let job: Value = response.json().await.unwrap();
    assert_eq!(job["expanded"], json!(0), "{job}");
    let id = job["id"].as_str().unwrap().to_string();

    // The host expanding the sweep says so on its /metrics.
    let expanding = |metrics: &str| {
        metrics
            .lines()
            .any(|l| l.trim() == "kwq_kafka_expanding_jobs 1")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let mut found = None;
        for (i, server) in hosts.iter().enumerate() {
            let url = &server.as_ref().unwrap().url;
            if expanding(&get_text(&client, format!("{url}/metrics")).await) {
                found = Some(i);
            }
        }
        if let Some(i) = found {
            break i;
        }
        assert!(Instant::now() < deadline, "no host expands the sweep");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let survivor = 1 - victim;
    // Killed mid-expansion, once the grid is well into the job.
    let before = wait_for(&client, hosts[survivor].as_ref().unwrap(), &id, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 20_000
    })
    .await;
    hosts[victim].take().unwrap().kill();
    assert!(
        before["expanded"].as_u64().unwrap() < POINTS,
        "killed after the expansion: {before}"
    );
    // The survivor takes the sweep and every task partition over once the
    // dead host's session has timed out. The victim restarts under its
    // name only then: a host joining while a dead member was still in the
    // group left tansu 0.6.0's groups with every partition on the dead
    // member (see the waiters' test below). Every point ran and is in both
    // views' results once, and no point was written to a band twice.
    // (Before a host applied its own events to its view only once they
    // were durable, the restarted host skipped the tasks its view had
    // recorded Completed from a batch the kill cut off.)
    let deadline = Instant::now() + Duration::from_secs(180);
    let survivor_url = hosts[survivor].as_ref().unwrap().url.clone();
    loop {
        let metrics = get_text(&client, format!("{survivor_url}/metrics")).await;
        if expanding(&metrics)
            && gauge(&metrics, "kwq_kafka_task_partitions") >= ALL_TASK_PARTITIONS
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sweep and the task partitions were not taken over: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hosts[victim] = Some(host(&tansu, dirs[victim].path(), ["h1", "h2"][victim]));
    echo_job_completed_once(&client, hosts[survivor].as_ref().unwrap(), &id, POINTS).await;
    echo_job_completed_once(&client, hosts[victim].as_ref().unwrap(), &id, POINTS).await;
    let brokers = tansu.brokers();
    let on_bands =
        tokio::task::spawn_blocking(move || crate::kafka_expand::points_on_bands(&brokers, &id))
            .await
            .unwrap();
    assert_eq!(on_bands.len() as u64, POINTS);
    assert!(
        on_bands.values().all(|n| *n == 1),
        "a point written twice: {:?}",
        on_bands.iter().find(|(_, n)| **n != 1)
    );
}

/// Task partitions of a grid these tests start: 10 bands of the default 4.
const ALL_TASK_PARTITIONS: u64 = 40;

/// A gauge's value on a host's /metrics text (0 if it is not there).
fn gauge(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// Waiters on a Kafka grid survive a SIGKILL of the host holding them: a
/// job and a task wait (submitted on h2) for a sweep held at priority 0
/// (submitted on h1); the host whose expander holds the waiters' cursors
/// (the one holding more, if they are split) is SIGKILLed; the other
/// takes them over, and the sweep is then raised. Both waiters run once,
/// after the sweep, with every result once, and the killed host's view
/// catches up when it is started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_survive_a_sigkill_of_the_host_holding_them() {
    const POINTS: u64 = 100;
    let tansu = Tansu::start();
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let names = ["h1", "h2"];
    let client = reqwest::Client::new();
    let mut hosts: Vec<Server> = (0..2)
        .map(|i| host(&tansu, dirs[i].path(), names[i]))
        .collect();
    let echo_sweep = |to: u64| json!({"base": {"action": "echo"}, "params": {"value": {"from": 0, "to": to - 1}}});
    let created = |body: Value| {
        body["id"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| panic!("{body}"))
    };
    // Held at priority 0: no point of it is written until it is raised.
    let dependency = created(
        post(
            &client,
            format!("{}/v1/jobs", hosts[0].url),
            json!({"module": "misbehave", "priority": 0, "sweep": echo_sweep(10)}),
        )
        .await,
    );
    wait_for(&client, &hosts[1], &dependency, |j| {
        j["id"] == json!(dependency)
    })
    .await;
    let job = created(
        post(
            &client,
            format!("{}/v1/jobs", hosts[1].url),
            json!({"module": "misbehave", "sweep": echo_sweep(POINTS), "after": [dependency]}),
        )
        .await,
    );
    let task = created(
        post(
            &client,
            format!("{}/v1/tasks", hosts[1].url),
            json!({"module": "misbehave", "payload": {"action": "echo", "value": 7}, "after": [dependency]}),
        )
        .await,
    );
    let waiting = wait_for(&client, &hosts[0], &job, |j| j["state"] == json!("Waiting")).await;
    assert_eq!(waiting["counts"]["Waiting"], json!(POINTS), "{waiting}");

    // Which host holds the waiters: its /metrics says how many. Killed
    // only once both hosts have their share of the task partitions: a
    // host killed while its group was still rebalancing left tansu 0.6.0's
    // groups stuck with every partition on dead members (CI, 2026-12-04).
    let deadline = Instant::now() + Duration::from_secs(120);
    let victim = loop {
        let (mut held, mut partitions) = (Vec::new(), Vec::new());
        for server in &hosts {
            let metrics = get_text(&client, format!("{}/metrics", server.url)).await;
            held.push(gauge(&metrics, "kwq_kafka_held_waiters"));
            partitions.push(gauge(&metrics, "kwq_kafka_task_partitions"));
        }
        if held.iter().sum::<u64>() == 2 && partitions.iter().all(|p| *p > 0) {
            break if held[0] >= held[1] { 0 } else { 1 };
        }
        assert!(
            Instant::now() < deadline,
            "not settled: held {held:?}, task partitions {partitions:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let survivor = hosts.remove(1 - victim);
    hosts.remove(0).kill();
    // Killed, not released: the survivor's view still says Waiting, and
    // its expander takes the held cursors over once the dead host's
    // session has timed out. The victim restarts only at the end: a host
    // joining while a dead member was still in the group left tansu
    // 0.6.0's groups with every partition on the dead member (1 run of 6).
    let seen = get(&client, format!("{}/v1/tasks/{task}", survivor.url)).await;
    assert_eq!(seen["state"], json!("Waiting"), "{seen}");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = get_text(&client, format!("{}/metrics", survivor.url)).await;
        if gauge(&metrics, "kwq_kafka_held_waiters") == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the waiters were not taken over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = get(&client, format!("{}/v1/tasks/{task}", survivor.url)).await;
    assert_eq!(seen["state"], json!("Waiting"), "{seen}");
    let raised = post(
        &client,
        format!("{}/v1/jobs/{dependency}/priority", survivor.url),
        json!({"priority": 5}),
    )
    .await;
    assert_eq!(raised["options"]["priority"], json!(5), "{raised}");

    echo_job_completed_once(&client, &survivor, &dependency, 10).await;
    echo_job_completed_once(&client, &survivor, &job, POINTS).await;
    // The victim's view, restarted, catches up with both.
    let restarted = host(&tansu, dirs[victim].path(), names[victim]);
    echo_job_completed_once(&client, &restarted, &job, POINTS).await;
    let hosts = [survivor, restarted];
    let deadline = Instant::now() + Duration::from_secs(180);
    let ran = loop {
        let seen = get(&client, format!("{}/v1/tasks/{task}", hosts[1].url)).await;
        if seen["state"] == json!("Completed") {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "the waiting task never ran: {seen}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ran["result"], json!(7), "{ran}");
    // Released only after every task of the sweep had completed.
    let mut last_completed = 0;
    for index in 0..10 {
        let part = get(
            &client,
            format!("{}/v1/tasks/{dependency}.{index}", hosts[1].url),
        )
        .await;
        last_completed = last_completed.max(part["timestamps"]["Completed"].as_u64().unwrap());
    }
    assert!(
        ran["timestamps"]["Pending"].as_u64().unwrap() >= last_completed,
        "{ran}"
    );
    let first = get(&client, format!("{}/v1/tasks/{job}.0", hosts[1].url)).await;
    assert!(
        first["timestamps"]["Running"].as_u64().unwrap() >= last_completed,
        "{first}"
    );
}

/// The README's Monte Carlo workflow, `kwq workflow run
/// examples/mc-price.json`, against a host of a Kafka grid: the host holds
/// the steps' order where it can, and answers the reduce's `input:
/// results_of` with 400 `unsupported` (no fan-in on Kafka), so the command
/// hands it the sweep's results itself; the price is as on one host.
#[test]
fn the_monte_carlo_workflow_runs_on_a_kafka_grid() {
    let tansu = Tansu::start();
    let dir = tempfile::tempdir().unwrap();
    let server = host(&tansu, dir.path(), "h1");
    let run = crate::workflows::workflow_run(&server, "examples/mc-price.json");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(
        stderr.contains("the host holds no dependencies: this command orders the steps"),
        "{stderr}"
    );
    crate::workflows::assert_priced_within_three_errors(&run.stdout);
}
