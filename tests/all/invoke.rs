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
