//! The dashboard as a person uses it, in headless Chromium driven over
//! WebDriver: submit a job through the page, watch it reach 100%, open a
//! task's timeline, look at the modules page. Assertions are on the DOM;
//! screenshots are saved to `docs/screenshots/` for the README.

use fantoccini::{Client, ClientBuilder, Locator};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A chromedriver process on a free port, killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver not found: install Debian's chromium and chromium-driver (scripts/test.sh does)");
    Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

async fn connect(driver: &Driver, profile: &std::path::Path) -> Client {
    let capabilities = serde_json::json!({
        "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1000", format!("--user-data-dir={}", profile.display())]
        }
    });
    let capabilities = capabilities.as_object().unwrap().clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(connector)
            .capabilities(capabilities.clone())
            .connect(&driver.url)
            .await
        {
            Ok(client) => return client,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot start a browser session: {e}"),
        }
    }
}

fn screenshot_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An element's text. The page re-renders its tables as events arrive, so
/// an element found a moment ago may be replaced before it is read: look
/// it up again (for a few seconds) rather than fail on a stale reference.
async fn text(client: &Client, css: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let read = match client.find(Locator::Css(css)).await {
            Ok(element) => element.text().await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match read {
            Ok(text) => return text,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("{css}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Wait until `check` passes on the page (the page updates itself from events).
async fn wait_for(client: &Client, what: &str, check: impl AsyncFn(&Client) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while !check(client).await {
        if tokio::time::Instant::now() > deadline {
            let html = client.source().await.unwrap_or_default();
            panic!(
                "timed out waiting for {what}; page:\n{}",
                &html[..html.len().min(4000)]
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Click what `css` names, finding it again when the page re-rendered it
/// between the find and the click (a stale element reference).
async fn click(client: &Client, css: &str) {
    wait_for(client, &format!("a clickable {css}"), async |c| {
        match c.find(Locator::Css(css)).await {
            Ok(element) => element.click().await.is_ok(),
            Err(_) => false,
        }
    })
    .await;
}

/// A host with the bundled examples and two workers, on a loopback port;
/// stops when the sender is dropped or sent to.
struct TestHost {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: tempfile::TempDir,
}

async fn start_host(token: Option<&str>, token_reads: bool) -> TestHost {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = kwq::server::ServerConfig {
        store: kwq::server::StoreUrl::Sqlite(dir.path().join("kwq.db")),
        runtime: crate::support::test_config(),
        dispatch: kwq::dispatch::DispatchConfig {
            workers: 2,
            ..Default::default()
        },
        queue: Default::default(),
        token: token.map(str::to_string),
        token_reads,
        examples: true,
        limits: Default::default(),
        host: "browser".into(),
        allowed_hosts: kwq::api::AllowedHosts::for_listener(listener.local_addr().unwrap(), &[]),
        remote: Default::default(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(kwq::server::run(config, listener, async move {
        let _ = stopped.await;
    }));
    TestHost {
        url,
        stop,
        server,
        dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_submits_a_job_shows_progress_and_a_task_timeline() {
    let TestHost {
        url,
        stop,
        server,
        dir,
    } = start_host(None, false).await;
    let driver = start_driver();
    let client = connect(&driver, &dir.path().join("profile")).await;
    client.goto(&format!("{url}/#/")).await.unwrap();
    wait_for(&client, "modules in the job form", async |c| {
        c.find(Locator::Css("#job-module option[value='option-pricer']"))
            .await
            .is_ok()
    })
    .await;

    let spec = r#"{"sweep": {"base": {"strike": 100, "rate": 0.05, "vol": 0.2, "maturity": 1, "kind": "call", "paths": 20000},
        "params": {"spot": {"from": 90, "to": 110, "step": 1}}}, "tags": {"book": "browser"}, "name": "browser-sweep"}"#;
    let area = client.find(Locator::Css("#job-spec")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys(spec).await.unwrap();
    click(&client, "#job-submit").await;
    wait_for(&client, "the submitted job id", async |c| {
        c.find(Locator::Css("#job-submitted[data-job]"))
            .await
            .is_ok()
    })
    .await;
    let job = client
        .find(Locator::Css("#job-submitted"))
        .await
        .unwrap()
        .attr("data-job")
        .await
        .unwrap()
        .unwrap();
    let row = format!("tr[data-job='{job}']");
    wait_for(&client, "the job at 100%", async |c| {
        match c.find(Locator::Css(&format!("{row} .progress"))).await {
            Ok(cell) => cell.text().await.unwrap_or_default() == "100%",
            Err(_) => false,
        }
    })
    .await;
    assert_eq!(
        text(&client, &format!("{row} .job-state")).await,
        "Finished"
    );
    wait_for(&client, "completed counter", async |c| {
        text(c, "#counts [data-state='Completed'] b").await == "21"
    })
    .await;
    let tag_rows = text(&client, "#tags").await;
    assert!(tag_rows.contains("book=browser"), "{tag_rows}");
    client
        .screenshot()
        .await
        .map(|png| std::fs::write(screenshot_dir().join("dashboard.png"), png))
        .unwrap()
        .unwrap();

    click(&client, &format!("{row} a")).await;
    wait_for(&client, "the job's tasks", async |c| {
        c.find(Locator::Css("a.task-link")).await.is_ok()
    })
    .await;
    click(&client, "a.task-link").await;
    wait_for(&client, "the task timeline", async |c| {
        c.find(Locator::Css("#timeline li[data-state='Completed']"))
            .await
            .is_ok()
    })
    .await;
    // Read all states in one script call, so a re-render cannot interleave.
    let states: Vec<String> = serde_json::from_value(
        client
            .execute(
                "return [...document.querySelectorAll('#timeline li')].map(li => li.dataset.state)",
                vec![],
            )
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(states, ["Pending", "Allocated", "Running", "Completed"]);
    assert!(text(&client, "#task-result").await.contains("price"));
    // The attempt's run time and queue wait, at task resolution (µs or ms with decimals).
    let ran = text(&client, "#timeline li[data-state='Completed'] small.run").await;
    let waited = text(&client, "#timeline li[data-state='Allocated'] small.wait").await;
    for shown in [&ran, &waited] {
        assert!(
            shown.ends_with(" µs") || shown.contains('.'),
            "duration not at task resolution: {shown:?}"
        );
    }
    client
        .screenshot()
        .await
        .map(|png| std::fs::write(screenshot_dir().join("task.png"), png))
        .unwrap()
        .unwrap();

    client.goto(&format!("{url}/#/modules")).await.unwrap();
    wait_for(&client, "the modules table", async |c| {
        text(c, "#modules").await.contains("option-pricer")
    })
    .await;
    // Upload a module through the file picker.
    let file = std::fs::canonicalize(kwq::examples::WASI_P1_UPPER).unwrap();
    client
        .find(Locator::Css("#module-file"))
        .await
        .unwrap()
        .send_keys(file.to_str().unwrap())
        .await
        .unwrap();
    client
        .find(Locator::Css("#module-name"))
        .await
        .unwrap()
        .send_keys("upper-from-browser")
        .await
        .unwrap();
    click(&client, "#module-upload").await;
    wait_for(&client, "the uploaded module in the table", async |c| {
        text(c, "#modules").await.contains("upper-from-browser")
    })
    .await;
    assert!(
        text(&client, "#module-uploaded")
            .await
            .starts_with("stored ")
    );
    client
        .screenshot()
        .await
        .map(|png| std::fs::write(screenshot_dir().join("modules.png"), png))
        .unwrap()
        .unwrap();

    // Swagger UI renders the generated document from the vendored files.
    client.goto(&format!("{url}/docs")).await.unwrap();
    wait_for(&client, "Swagger UI", async |c| {
        match c.find(Locator::Css(".swagger-ui .info .title")).await {
            Ok(title) => title.text().await.unwrap_or_default().contains("KWQ"),
            Err(_) => false,
        }
    })
    .await;
    let operations = client.find_all(Locator::Css(".opblock")).await.unwrap();
    assert_eq!(
        operations.len(),
        kwq::api::ROUTES.len(),
        "one operation per route"
    );
    client
        .screenshot()
        .await
        .map(|png| std::fs::write(screenshot_dir().join("docs.png"), png))
        .unwrap()
        .unwrap();

    client.close().await.unwrap();
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

/// Under `--token --token-reads` the dashboard asks for the token, then
/// reads, submits and follows live events with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_asks_for_the_token_and_sends_it() {
    let host = start_host(Some("s3cret"), true).await;
    let driver = start_driver();
    let client = connect(&driver, &host.dir.path().join("profile")).await;
    client.goto(&format!("{}/#/", host.url)).await.unwrap();
    wait_for(&client, "the sign-in form", async |c| {
        match c.find(Locator::Css("#signin")).await {
            Ok(form) => form.is_displayed().await.unwrap_or(false),
            Err(_) => false,
        }
    })
    .await;
    client
        .screenshot()
        .await
        .map(|png| std::fs::write(screenshot_dir().join("signin.png"), png))
        .unwrap()
        .unwrap();
    client
        .find(Locator::Css("#token"))
        .await
        .unwrap()
        .send_keys("s3cret")
        .await
        .unwrap();
    click(&client, "#token-save").await;
    wait_for(&client, "modules read with the token", async |c| {
        c.find(Locator::Css("#job-module option[value='noop']"))
            .await
            .is_ok()
    })
    .await;
    let spec = r#"{"module": "noop", "payloads": [1, 2, 3], "name": "signed-in"}"#;
    let area = client.find(Locator::Css("#job-spec")).await.unwrap();
    area.clear().await.unwrap();
    area.send_keys(spec).await.unwrap();
    client
        .execute(
            "document.querySelector('#job-module').value = 'noop'",
            vec![],
        )
        .await
        .unwrap();
    click(&client, "#job-submit").await;
    wait_for(&client, "the submitted job id", async |c| {
        c.find(Locator::Css("#job-submitted[data-job]"))
            .await
            .is_ok()
    })
    .await;
    let job = client
        .find(Locator::Css("#job-submitted"))
        .await
        .unwrap()
        .attr("data-job")
        .await
        .unwrap()
        .unwrap();
    // Finished on screen: the job list refreshes on events from the stream,
    // which also needs the token.
    wait_for(&client, "the job Finished", async |c| {
        text(c, &format!("tr[data-job='{job}'] .job-state")).await == "Finished"
    })
    .await;
    client.close().await.unwrap();
    let _ = host.stop.send(());
    host.server.await.unwrap().unwrap();
}

/// Worker machines registered over the worker protocol show on the
/// overview: name, address, kind, slots, current task, last heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_worker_machines() {
    let host = start_host(None, false).await;
    let http = reqwest::Client::new();
    let registered: serde_json::Value = http
        .post(format!("{}/v1/workers", host.url))
        .json(&serde_json::json!({"name": "gpu-box-7", "slots": 8, "kind": "external:gpu"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let worker = registered["worker_id"].as_str().unwrap().to_string();
    let created: serde_json::Value = http
        .post(format!("{}/v1/tasks", host.url))
        .json(&serde_json::json!({"module": "external:gpu", "payload": {"n": 1}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let task = created["id"].as_str().unwrap().to_string();
    let leased: serde_json::Value = http
        .post(format!("{}/v1/workers/{worker}/lease", host.url))
        .json(&serde_json::json!({"max": 1, "wait_ms": 5000}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(leased["leases"][0]["task_id"], serde_json::json!(task));

    let driver = start_driver();
    let client = connect(&driver, &host.dir.path().join("profile")).await;
    client.goto(&format!("{}/#/", host.url)).await.unwrap();
    let row = format!("tr[data-remote-worker='{worker}']");
    wait_for(&client, "the worker machine's row", async |c| {
        text(c, &row).await.contains("gpu-box-7")
    })
    .await;
    let shown = text(&client, &row).await;
    for expected in ["127.0.0.1", "external:gpu", "8", &task, "s ago"] {
        assert!(shown.contains(expected), "{expected:?} not in {shown:?}");
    }
    client
        .execute(
            "document.querySelector('#remote-workers-section').scrollIntoView()",
            vec![],
        )
        .await
        .unwrap();
    client
        .screenshot()
        .await
        .map(|png| std::fs::write(screenshot_dir().join("workers.png"), png))
        .unwrap()
        .unwrap();
    client.close().await.unwrap();
    let _ = host.stop.send(());
    host.server.await.unwrap().unwrap();
}
