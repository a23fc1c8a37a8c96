//! Synchronous invocation: `POST /v1/tasks?wait=` answers with the
//! finished task (result included) when it finishes within the wait, else
//! 202 with its id; `kwq submit --wait` prints the result.

use serde_json::{Value, json};
use std::time::{Duration, Instant};

async fn host(dir: &std::path::Path) -> (kwq::server::Host, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = crate::support::server_config(
        kwq::server::StoreUrl::Sqlite(dir.join("kwq.db")),
        2,
        "invoke",
    );
    let host = kwq::server::Host::start(config, listener).await.unwrap();
    let url = format!("http://{}", host.address());
    (host, url)
}

async fn invoke(http: &reqwest::Client, url: &str, query: &str, body: Value) -> (u16, Value) {
    let response = http
        .post(format!("{url}/v1/tasks{query}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_caller_gets_the_finished_task_or_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = host(dir.path()).await;
    let http = reqwest::Client::new();

    let (status, done) = invoke(
        &http,
        &url,
        "?wait=10s",
        json!({"module": "misbehave", "payload": {"action": "echo", "value": {"answer": 42}}}),
    )
    .await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "Completed");
    assert_eq!(done["result"], json!({"answer": 42}));
    // Durable when answered: the store has it.
    let stored: Value = http
        .get(format!("{url}/v1/tasks/{}", done["id"].as_str().unwrap()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stored["state"], "Completed");

    let (status, dead) = invoke(&http, &url, "?wait=10s", json!({"module": "misbehave", "max_attempts": 1, "payload": {"action": "fail", "message": "no"}})).await;
    assert_eq!(status, 200, "{dead}");
    assert_eq!(dead["state"], "Dead");
    assert_eq!(dead["error_message"], "no");

    let started = Instant::now();
    let (status, pending) = invoke(
        &http,
        &url,
        "?wait=200ms",
        json!({"module": "misbehave", "payload": {"action": "sleep", "ms": 2000}}),
    )
    .await;
    assert_eq!(status, 202, "{pending}");
    assert!(
        started.elapsed() < Duration::from_millis(1_500),
        "answered after the wait, not the task"
    );
    let id = pending["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t: Value = http
            .get(format!("{url}/v1/tasks/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if t["state"] == "Completed" {
            break;
        }
        assert!(Instant::now() < deadline, "{t}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for (query, says) in [
        ("?wait=soon", "wait"),
        ("?wait=10m", "at most"),
        ("?wait=1s&then=2", "then"),
    ] {
        let (status, error) = invoke(
            &http,
            &url,
            query,
            json!({"module": "noop", "payload": null}),
        )
        .await;
        assert_eq!(status, 400, "{query}: {error}");
        assert!(error.to_string().contains(says), "{query}: {error}");
    }

    // The CLI prints the result (exit 0), or says why the task died (exit 1).
    let kwq = |payload: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kwq"))
            .args([
                "submit",
                "--server",
                &url,
                "-m",
                "misbehave",
                "--wait",
                "10s",
                "--max-attempts",
                "1",
                "--payload",
                payload,
            ])
            .output()
            .unwrap()
    };
    let echoed = kwq(r#"{"action": "echo", "value": [1, 2]}"#);
    assert!(echoed.status.success(), "{echoed:?}");
    assert_eq!(String::from_utf8_lossy(&echoed.stdout).trim(), "[1,2]");
    let died = kwq(r#"{"action": "fail", "message": "bad"}"#);
    assert_eq!(died.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&died.stderr).contains("Dead: bad"),
        "{died:?}"
    );
    host.stop().await.unwrap();
}

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let response = http.get(url).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

/// Waits (polling the API) until `done` holds for task `id`.
async fn until_task(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, task) = get(http, format!("{url}/v1/tasks/{id}")).await;
        if done(&task) {
            return task;
        }
        assert!(Instant::now() < deadline, "{task}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_is_answered_from_its_attempt_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = host(dir.path()).await;
    let http = reqwest::Client::new();
    let echo = |value: Value| json!({"module": "misbehave", "payload": {"action": "echo", "value": value}});

    // Durable (the default): the answer carries the whole first attempt.
    let (status, done) = invoke(&http, &url, "?wait=10s", echo(json!("durable"))).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["result"], "durable");
    assert_eq!(done["attempts"], 1);
    assert!(done["worker"].is_string(), "{done}");
    for state in ["Pending", "Allocated", "Running", "Completed"] {
        assert!(done["timestamps"][state].is_u64(), "{state}: {done}");
    }
    let id = done["id"].as_str().unwrap();
    let (status, stored) = get(&http, format!("{url}/v1/tasks/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(stored["state"], "Completed");
    assert_eq!(stored["result"], "durable");
    assert_eq!(stored["worker"], done["worker"]);
    for state in ["Pending", "Allocated", "Running", "Completed"] {
        assert_eq!(
            stored["timestamps"][state], done["timestamps"][state],
            "{state}"
        );
    }

    // Not durable: answered with the result, recorded once after.
    let mut body = echo(json!({"fast": true}));
    body["durable"] = json!(false);
    let (status, done) = invoke(&http, &url, "?wait=10s", body).await;
    assert_eq!(status, 200, "{done}");
    assert_eq!(done["state"], "Completed");
    assert_eq!(done["result"], json!({"fast": true}));
    let id = done["id"].as_str().unwrap();
    let stored = until_task(&http, &url, id, |t| t["state"] == "Completed").await;
    assert_eq!(stored["result"], json!({"fast": true}));
    let states: Vec<&str> = stored["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["Pending", "Allocated", "Running", "Completed"]);

    // Not durable, and the wait runs out: the id comes once the task is
    // stored, so it can be looked up at once; it runs to the end.
    let (status, pending) = invoke(
        &http,
        &url,
        "?wait=100ms",
        json!({"module": "misbehave", "durable": false, "payload": {"action": "sleep", "ms": 500}}),
    )
    .await;
    assert_eq!(status, 202, "{pending}");
    let id = pending["id"].as_str().unwrap();
    let (status, task) = get(&http, format!("{url}/v1/tasks/{id}")).await;
    assert_eq!(status, 200, "stored before its id was given: {task}");
    until_task(&http, &url, id, |t| t["state"] == "Completed").await;

    // A retried task's end comes from the store's commits.
    let (status, dead) = invoke(
        &http,
        &url,
        "?wait=30s",
        json!({"module": "misbehave", "durable": false, "max_attempts": 2, "payload": {"action": "fail", "message": "twice"}}),
    )
    .await;
    assert_eq!(status, 200, "{dead}");
    assert_eq!(dead["state"], "Dead");
    assert_eq!(dead["attempts"], 2);

    // `durable` belongs to a synchronous invocation only.
    let (status, error) = invoke(
        &http,
        &url,
        "",
        json!({"module": "noop", "payload": null, "durable": false}),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    assert!(error.to_string().contains("durable"), "{error}");
    let (status, error) = invoke(
        &http,
        &url,
        "?wait=1s",
        json!({"module": "noop", "payload": null, "durable": "no"}),
    )
    .await;
    assert_eq!(status, 400, "{error}");
    host.stop().await.unwrap();
}

/// A caller waits on an invocation that is cancelled before it runs (held
/// at priority 0): it is answered with the cancelled task, from the
/// commits, and the task stays cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_caller_hears_of_a_cancel_before_its_task_ran() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = host(dir.path()).await;
    let http = reqwest::Client::new();
    let caller = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            invoke(
                &http,
                &url,
                "?wait=30s",
                json!({"module": "noop", "payload": null, "priority": 0}),
            )
            .await
        }
    });
    // The held insert is durable within a few milliseconds: then the task
    // can be listed, and cancelled.
    let deadline = Instant::now() + Duration::from_secs(10);
    let id = loop {
        let (_, page) = get(&http, format!("{url}/v1/tasks?status=Pending")).await;
        if let Some(task) = page["items"].as_array().and_then(|t| t.first()) {
            break task["id"].as_str().unwrap().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the invoked task was never stored: {page}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cancelled = http
        .post(format!("{url}/v1/tasks/{id}/cancel"))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
    let (status, answer) = caller.await.unwrap();
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["id"], id.as_str());
    assert_eq!(answer["state"], "Cancelled", "{answer}");
    let (_, stored) = get(&http, format!("{url}/v1/tasks/{id}")).await;
    assert_eq!(stored["state"], "Cancelled", "{stored}");
    host.stop().await.unwrap();
}

/// `kwq serve` SIGKILLed while a durable and a non-durable invocation run:
/// both callers get an error; after the restart the durable task is there
/// and runs to the end, the non-durable one (never acknowledged) is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_fails_the_callers_and_keeps_only_the_durable_invocation() {
    use crate::process::Server;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = reqwest::Client::new();
    let call = |durable: bool| {
        let http = http.clone();
        let url = format!("{}/v1/tasks?wait=60s", server.url);
        let body = json!({"module": "misbehave", "durable": durable, "tags": {"durable": durable.to_string()}, "payload": {"action": "sleep", "ms": 20000}});
        tokio::spawn(async move { http.post(url).json(&body).send().await })
    };
    let durable = call(true);
    let in_memory = call(false);
    // Both run (the dashboard's workers each show a task), and the durable
    // one is stored: its insert is written within a few ms of its start,
    // a kill before then loses a task nobody was told was accepted.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, stats) = get(&http, format!("{}/v1/stats", server.url)).await;
        let running = stats["workers"]
            .as_array()
            .map_or(0, |w| w.iter().filter(|w| w["task"].is_string()).count());
        let (_, stored) = get(&http, format!("{}/v1/tasks?tag=durable=true", server.url)).await;
        let stored = stored["items"].as_array().map_or(0, Vec::len);
        if running == 2 && stored == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    assert!(
        durable.await.unwrap().is_err(),
        "the durable caller saw the crash"
    );
    assert!(
        in_memory.await.unwrap().is_err(),
        "the other caller saw the crash"
    );

    let server = Server::start(dir.path());
    let (_, page) = get(&http, format!("{}/v1/tasks", server.url)).await;
    let tasks = page["items"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{page}");
    assert_eq!(tasks[0]["options"]["tags"]["durable"], "true", "{page}");
    let state = tasks[0]["state"].as_str().unwrap();
    assert!(
        ["Pending", "Allocated", "Running"].contains(&state),
        "to run again: {page}"
    );
}

/// A durable invocation answered from the invocation journal survives a
/// crash that comes before the store's own commit of it. The store is
/// made unable to write (its size capped) after the task is leased, so
/// the commit that follows the answer fails; the files as they are then
/// (what a `kill -9` at that moment leaves) are copied and opened: the
/// task is there, Completed with its result. Opened without the journal's
/// file, the same copy lacks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_invocation_outlives_a_crash_before_the_stores_commit() {
    use kwq::model::{ModuleId, NewTask, TaskOptions, TaskState};
    use kwq::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
    use kwq::queue::{Completion, QueueError, ReadStore, WorkQueue, WorkerView};
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedQueue::open(&dir.path().join("kwq.db"), EmbeddedConfig::default()).unwrap();
    let worker = WorkerView {
        id: "w1".into(),
        warm: Vec::new(),
        pool: None,
    };
    // The store's cap must come after the task's insert is taken by its
    // lease and before the attempt ends. The insert goes to the store by
    // itself 2 ms after the submission at the latest; if it went first
    // (the caller is then not answered at once), try again.
    let result: Vec<u8> = (0..30_000u32).map(|i| (i % 251) as u8).collect();
    let mut answered = None;
    for attempt in 0..20 {
        let id = format!("t-journalled-{attempt}");
        let task = NewTask {
            id: id.clone(),
            job_id: None,
            module: ModuleId::of(b"m"),
            payload: b"{\"x\":1}".to_vec(),
            options: TaskOptions::default(),
        };
        let mut invocation = store.invoke(task, true).await.unwrap();
        let lease = store.lease(&worker).await.unwrap();
        store.started(&lease);
        store.set_max_store_bytes(Some(1));
        store
            .complete(
                &lease,
                Completion {
                    // Big enough to need new pages of the capped store.
                    result: result.clone(),
                    ..Completion::default()
                },
            )
            .unwrap();
        // The journal answers within `complete`; the store only later.
        if let Ok(finished) = invocation.finished.try_recv() {
            answered = Some((id, finished));
            break;
        }
        store.set_max_store_bytes(None);
        invocation.finished.await.unwrap();
    }
    let (id, finished) = answered.expect("no invocation was answered from the journal");
    assert_eq!(finished.outcome.state, TaskState::Completed);
    // The store's commit of it failed: the store says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while WorkQueue::health(&store).is_ok() {
        assert!(Instant::now() < deadline, "the capped store kept writing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let copy = |to: &std::path::Path, journal: bool| {
        std::fs::create_dir_all(to).unwrap();
        for name in ["kwq.db", "kwq.db-wal", "kwq.db-invocations"] {
            let from = dir.path().join(name);
            if from.exists() && (journal || name != "kwq.db-invocations") {
                std::fs::copy(&from, to.join(name)).unwrap();
            }
        }
        to.join("kwq.db")
    };
    let crashed = copy(&dir.path().join("crashed"), true);
    let without = copy(&dir.path().join("without-journal"), false);

    let reopened = EmbeddedQueue::open(&crashed, EmbeddedConfig::default()).unwrap();
    let stored = reopened.task(&id).await.unwrap();
    assert_eq!(stored.state, TaskState::Completed, "{stored:?}");
    assert_eq!(stored.result.as_ref(), Some(&result));
    assert_eq!(stored.payload, b"{\"x\":1}");
    reopened.close();
    reopened.flush().await.unwrap();
    // And once stored it is not applied twice: a second open holds it once.
    drop(reopened);
    let again = EmbeddedQueue::open(&crashed, EmbeddedConfig::default()).unwrap();
    let page = again.tasks(Default::default()).await.unwrap();
    assert_eq!(
        page.items.iter().filter(|t| t.id == id).count(),
        1,
        "{page:?}"
    );

    let lacking = EmbeddedQueue::open(&without, EmbeddedConfig::default()).unwrap();
    assert!(
        matches!(lacking.task(&id).await, Err(QueueError::NotFound(_))),
        "without the journal the task is lost: the test would prove nothing"
    );
    store.set_max_store_bytes(None);
}

/// Many callers at once: some invocations go through the journal, those
/// that find it busy through the store's group commit. Each is answered
/// with its own result, and each caller reads its task back at once,
/// stored once with that result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_durable_invocations_are_each_answered_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (host, url) = host(dir.path()).await;
    let http = reqwest::Client::new();
    let callers = (0..8).map(|caller| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for call in 0..40 {
                let value = format!("{caller}-{call}");
                let body =
                    json!({"module": "misbehave", "payload": {"action": "echo", "value": value}});
                let (status, done) = invoke(&http, &url, "?wait=30s", body).await;
                assert_eq!(status, 200, "{done}");
                assert_eq!(done["result"], value.as_str(), "{done}");
                let id = done["id"].as_str().unwrap().to_string();
                let (status, stored) = get(&http, format!("{url}/v1/tasks/{id}")).await;
                assert_eq!(status, 200, "read back at once: {stored}");
                assert_eq!(stored["state"], "Completed", "{stored}");
                assert_eq!(stored["result"], value.as_str(), "{stored}");
                ids.push(id);
            }
            ids
        })
    });
    let mut ids = Vec::new();
    for caller in callers {
        ids.extend(caller.await.unwrap());
    }
    let (_, page) = get(&http, format!("{url}/v1/tasks?limit=1000")).await;
    let stored: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(stored.len(), ids.len(), "each stored once");
    for id in &ids {
        assert!(stored.contains(&id.as_str()), "{id} missing");
    }
    host.stop().await.unwrap();
}
