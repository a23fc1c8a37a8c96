//! `kwq serve` as real processes: SIGKILL in the middle of a job loses no
//! accepted task and no completed result; events stream over HTTP.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `kwq serve` child process on an ephemeral port.
pub(crate) struct Server {
    child: Child,
    pub(crate) url: String,
}

impl Server {
    /// `kwq serve --examples` with 2 workers on `data_dir`.
    pub(crate) fn start(data_dir: &Path) -> Server {
        Server::start_with(data_dir, &[], Stdio::inherit(), 2, "warn")
    }

    /// `kwq [global...] serve --examples --listen 127.0.0.1:0 --workers N --data-dir DIR`.
    fn start_with(
        data_dir: &Path,
        global: &[&str],
        stderr: Stdio,
        workers: u32,
        log: &str,
    ) -> Server {
        Server::start_serving(data_dir, global, &[], stderr, workers, log)
    }

    /// As `start_with`, with more `serve` arguments (`--store`, `--host`...).
    pub(crate) fn start_serving(
        data_dir: &Path,
        global: &[&str],
        serve: &[&str],
        stderr: Stdio,
        workers: u32,
        log: &str,
    ) -> Server {
        Server::start_listening(data_dir, "127.0.0.1:0", global, serve, stderr, workers, log)
    }

    /// As `start_serving`, on a given `--listen` address (a host restarted
    /// where its workers look for it).
    pub(crate) fn start_listening(
        data_dir: &Path,
        listen: &str,
        global: &[&str],
        serve: &[&str],
        stderr: Stdio,
        workers: u32,
        log: &str,
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_kwq"))
            .args(global)
            .args(["serve", "--examples", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(["--workers", &workers.to_string()])
            .args(serve)
            .env("KWQ_LOG", log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start kwq serve");
        let mut first = String::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        stdout.read_line(&mut first).expect("read the address line");
        // Keep draining, so the server never writes into a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        Server { child, url }
    }

    /// The process id (for reading its memory from /proc).
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn kill(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    client
        .post(url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub(crate) async fn get(client: &reqwest::Client, url: String) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// A GET's body as text (NDJSON results, Prometheus metrics).
pub(crate) async fn get_text(client: &reqwest::Client, url: String) -> String {
    client.get(url).send().await.unwrap().text().await.unwrap()
}

/// Poll a job until `done` holds for it (bounded by a deadline).
pub(crate) async fn wait_for(
    client: &reqwest::Client,
    server: &Server,
    job: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    wait_within(client, server, job, Duration::from_secs(180), done).await
}

/// [`wait_for`] with a time limit of its own.
pub(crate) async fn wait_within(
    client: &reqwest::Client,
    server: &Server,
    job: &str,
    limit: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let body = get(client, format!("{}/v1/jobs/{job}", server.url)).await;
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "job {job} stuck: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Submit a job of `tasks` echo tasks (task i returns i) tagged `book=<book>`; its id.
pub(crate) async fn submit_echo_job(
    client: &reqwest::Client,
    server: &Server,
    tasks: u64,
    book: &str,
) -> String {
    submit_paced_echo_job(client, server, tasks, book, None).await
}

/// [`submit_echo_job`] whose tasks each sleep `ms` first: a test that must
/// act while the job runs (start a host, kill one) then does not race a
/// grid that runs no-op tasks faster than it can act.
pub(crate) async fn submit_paced_echo_job(
    client: &reqwest::Client,
    server: &Server,
    tasks: u64,
    book: &str,
    ms: Option<u64>,
) -> String {
    let payloads: Vec<Value> = (0..tasks)
        .map(|i| match ms {
            Some(ms) => json!({"action": "echo", "value": i, "ms": ms}),
            None => json!({"action": "echo", "value": i}),
        })
        .collect();
    let response = client
        .post(format!("{}/v1/jobs", server.url))
        .json(&json!({"module": "misbehave", "payloads": payloads, "tags": {"book": book}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let job: Value = response.json().await.unwrap();
    job["id"].as_str().unwrap().to_string()
}

/// Wait until a job of `tasks` echo tasks (task i returns i) is finished on
/// `server`, and check each task is in its results exactly once, with its value.
pub(crate) async fn echo_job_completed_once(
    client: &reqwest::Client,
    server: &Server,
    job: &str,
    tasks: u64,
) {
    // Debug builds on a 2-core machine run 500-1,500 tasks/s on tansu.
    let limit = Duration::from_secs(180 + tasks / 400);
    let done = wait_within(client, server, job, limit, |j| {
        j["state"] == json!("Finished")
    })
    .await;
    assert_eq!(done["counts"]["Completed"], json!(tasks), "{done}");
    assert_eq!(done["counts"]["Dead"], json!(0));
    let text = get_text(client, format!("{}/v1/jobs/{job}/results", server.url)).await;
    let mut task_ids = BTreeSet::new();
    let mut values = BTreeSet::new();
    for line in text.lines() {
        let line: Value = serde_json::from_str(line).unwrap();
        assert!(
            task_ids.insert(line["task_id"].as_str().unwrap().to_string()),
            "task twice in results: {line}"
        );
        values.insert(line["result"].as_u64().unwrap());
    }
    assert_eq!(task_ids.len() as u64, tasks);
    assert_eq!(values, (0..tasks).collect::<BTreeSet<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_job_loses_nothing_and_duplicates_nothing() {
    const TASKS: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let first = Server::start(dir.path());
    let id = submit_echo_job(&client, &first, TASKS, "crash").await;

    let before = wait_for(&client, &first, &id, |j| {
        j["counts"]["Completed"].as_u64().unwrap_or(0) >= 2_000
    })
    .await;
    first.kill();
    assert!(
        before["finished"].as_u64().unwrap() < TASKS,
        "killed before the end: {before}"
    );

    let second = Server::start(dir.path());
    echo_job_completed_once(&client, &second, &id, TASKS).await;

    let stats = get(&client, format!("{}/v1/stats", second.url)).await;
    let crash = stats["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["tag"] == json!("book=crash"))
        .unwrap()
        .clone();
    assert_eq!(
        crash["counts"]["Completed"],
        json!(TASKS),
        "statistics rebuilt without double counting: {crash}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_as_server_sent_events_and_resume_from_an_offset() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    let body = json!({"module": "misbehave", "payload": {"action": "echo", "value": "sse"}});
    let submitted = post(&client, format!("{}/v1/tasks", server.url), body).await;
    let task = submitted["id"].as_str().unwrap().to_string();

    let frames = read_events(
        &client,
        &format!("{}/v1/events?from=0", server.url),
        &task,
        "Completed",
    )
    .await;
    let states: Vec<&str> = frames
        .iter()
        .filter(|e| e["task_id"] == json!(task))
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Pending", "Allocated", "Running", "Completed"]);
    let offsets: Vec<u64> = frames
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets increase: {offsets:?}"
    );

    // Resuming after the Allocated event replays only what came after it.
    let allocated = frames
        .iter()
        .find(|e| e["task_id"] == json!(task) && e["state"] == json!("Allocated"))
        .unwrap();
    let url = format!("{}/v1/events?from={}", server.url, allocated["offset"]);
    let resumed = read_events(&client, &url, &task, "Completed").await;
    let states: Vec<&str> = resumed
        .iter()
        .filter(|e| e["task_id"] == json!(task))
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Running", "Completed"]);
}

/// With `?batch=true` a burst of events comes as one `tasks` message (a
/// JSON array, `id` its last offset): the same events, in the same order,
/// in far fewer messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_events_carry_the_same_events_in_fewer_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let client = reqwest::Client::new();
    let job = submit_echo_job(&client, &server, 300, "sse").await;
    wait_for(&client, &server, &job, |j| j["state"] == json!("Finished")).await;
    let last = format!("{job}.299");
    let single = read_events(
        &client,
        &format!("{}/v1/events?from=0", server.url),
        &last,
        "Completed",
    )
    .await;
    let (batched, messages) = read_messages(
        &client,
        &format!("{}/v1/events?from=0&batch=true", server.url),
        &last,
        "Completed",
    )
    .await;
    // A batch may run past the target event (another task finishing after
    // it); compare up to it.
    let target = batched
        .iter()
        .position(|e| e["task_id"] == json!(last) && e["state"] == json!("Completed"))
        .unwrap();
    let batched = &batched[..=target];
    let first_difference = batched.iter().zip(&single).position(|(b, s)| b != s);
    assert!(
        batched.len() == single.len() && first_difference.is_none(),
        "the same events in the same order: {} batched, {} single, first difference at {first_difference:?}: {:?} / {:?}",
        batched.len(),
        single.len(),
        first_difference.map(|i| &batched[i]),
        first_difference.map(|i| &single[i]),
    );
    assert!(
        messages.len() * 10 < batched.len(),
        "{} messages for {} events",
        messages.len(),
        batched.len()
    );
    for (kind, id, events) in &messages {
        assert_eq!(kind, "tasks");
        assert_eq!(
            Some(id.as_str()),
            events.last().map(|e| e["offset"].to_string()).as_deref()
        );
    }
}

/// Read batched SSE messages until `task` reaches `state`: every event,
/// and each message as (event type, id, its events).
async fn read_messages(
    client: &reqwest::Client,
    url: &str,
    task: &str,
    state: &str,
) -> (Vec<Value>, Vec<(String, String, Vec<Value>)>) {
    let mut response = client.get(url).send().await.unwrap();
    let mut buffer = String::new();
    let (mut events, mut messages) = (Vec::new(), Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("events in time")
            .unwrap()
            .expect("stream open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
            };
            let Some(data) = field("data:") else { continue };
            let batch: Vec<Value> = serde_json::from_str(&data).unwrap();
            let done = batch
                .iter()
                .any(|e| e["task_id"] == json!(task) && e["state"] == json!(state));
            events.extend(batch.iter().cloned());
            messages.push((
                field("event:").unwrap_or_default(),
                field("id:").unwrap_or_default(),
                batch,
            ));
            if done {
                return (events, messages);
            }
        }
    }
}

/// Read SSE frames until `task` reaches `state`.
async fn read_events(client: &reqwest::Client, url: &str, task: &str, state: &str) -> Vec<Value> {
    let mut response = client.get(url).send().await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut buffer = String::new();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let chunk = tokio::time::timeout_at(deadline, response.chunk())
            .await
            .expect("events in time")
            .unwrap()
            .expect("stream open");
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let frame: String = buffer.drain(..end + 2).collect();
            if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data:")) {
                let event: Value = serde_json::from_str(data.trim()).unwrap();
                let done = event["task_id"] == json!(task) && event["state"] == json!(state);
                events.push(event);
                if done {
                    return events;
                }
            }
        }
    }
}

/// The client commands against a real server, as a user types them.
#[test]
fn the_cli_client_pushes_submits_watches_and_streams_results() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let kwq = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kwq"))
            .args(args)
            .env("KWQ_SERVER", &server.url)
            .output()
            .expect("run kwq")
    };
    let pushed = kwq(&[
        "module",
        "push",
        kwq::examples::MONTE_CARLO_PI,
        "--name",
        "pi",
    ]);
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    let record: Value = serde_json::from_slice(&pushed.stdout).unwrap();
    assert_eq!(record["name"], json!("pi"));

    let submitted = kwq(&[
        "submit",
        "-m",
        "pi",
        "--priority",
        "8",
        "--tag",
        "desk=demo",
        "--payload",
        r#"{"samples":1000,"seed":1}"#,
    ]);
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let task = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    assert!(task.starts_with("t-"), "{task}");

    let job = kwq(&[
        "job",
        "submit",
        "-m",
        "pi",
        "--base",
        r#"{"samples":1000}"#,
        "--sweep",
        "seed=1..40",
        "--watch",
    ]);
    assert!(
        job.status.success(),
        "{}",
        String::from_utf8_lossy(&job.stderr)
    );
    let job_id = String::from_utf8_lossy(&job.stdout).trim().to_string();
    assert!(
        String::from_utf8_lossy(&job.stderr).contains("40 completed"),
        "{}",
        String::from_utf8_lossy(&job.stderr)
    );

    let results = kwq(&["results", &job_id]);
    assert!(results.status.success());
    let lines: Vec<Value> = String::from_utf8_lossy(&results.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 40);
    assert!(lines.iter().all(|l| l["result"]["samples"] == json!(1000)));

    let status = kwq(&["status", &task]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["options"]["tags"]["desk"], json!("demo"));

    let bad = kwq(&["submit", "-m", "pi", "--priority", "12"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("priority"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let missing = kwq(&["status", "t-nope"]);
    assert_eq!(missing.status.code(), Some(2));
}

/// SIGTERM lets the running task finish (or returns it) and exits cleanly;
/// the task completes, after a restart if need be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_without_losing_the_running_task() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut server = Server::start(dir.path());
    let submitted: Value = post(
        &client,
        format!("{}/v1/tasks", server.url),
        json!({"module": "misbehave", "payload": {"action": "sleep", "ms": 300}}),
    )
    .await;
    let id = submitted["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = get(&client, format!("{}/v1/tasks/{id}", server.url)).await;
        if task["state"] == json!("Running") {
            break;
        }
        assert!(Instant::now() < deadline, "never ran: {task}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = server.child.wait().unwrap();
    assert!(exit.success(), "kwq serve exited with {exit:?}");

    let server = Server::start(dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let task = get(&client, format!("{}/v1/tasks/{id}", server.url)).await;
        if task["state"] == json!("Completed") {
            assert_eq!(task["result"], json!({"slept_ms": 300}));
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not completed after restart: {task}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `--log-format json`: one JSON object per line, and a guest's own log
/// line carries the task's id, job, attempt and module.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_task_fields_on_guest_lines() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("kwq.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = Server::start_with(
        &dir.path().join("data"),
        &["--log-format", "json"],
        Stdio::from(log),
        1,
        "info",
    );
    let client = reqwest::Client::new();
    let submitted: Value = post(
        &client,
        format!("{}/v1/jobs", server.url),
        json!({"module": "misbehave", "payloads": [{"action": "chatty", "lines": 1}]}),
    )
    .await;
    let job = submitted["id"].as_str().unwrap().to_string();
    wait_for(&client, &server, &job, |j| j["state"] == json!("Finished")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let guest_line = loop {
        let text = std::fs::read_to_string(&log_path).unwrap();
        // Only whole lines: the server may be halfway through writing the last one.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        let lines: Vec<Value> = complete
            .lines()
            .map(|l| serde_json::from_str(l).expect("every line is JSON"))
            .collect();
        if let Some(line) = lines
            .into_iter()
            .find(|l| l["fields"]["message"] == json!("line 0"))
        {
            break line;
        }
        assert!(Instant::now() < deadline, "no guest log line in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(guest_line["level"], json!("INFO"));
    assert_eq!(guest_line["fields"]["task_id"], json!(format!("{job}.0")));
    assert_eq!(guest_line["span"]["job_id"], json!(job));
    assert_eq!(guest_line["span"]["attempt"], json!(1));
    assert!(
        guest_line["span"]["module"]
            .as_str()
            .is_some_and(|m| m.len() == 64)
    );
}
