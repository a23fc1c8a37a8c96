//! From an empty directory to results on the grid in four commands, in
//! Rust, Python and JavaScript: `kwq new`, `kwq build`, `kwq module push`,
//! `kwq job submit --results`, run as a user types them (relative paths,
//! from the directory the project is made in) against a real `kwq serve`.
//! The prices must agree with Black-Scholes. Then each SDK's promises,
//! through a module built from a fixture: `init` state that survives
//! between tasks of one instance, logs, progress, task id, attempt, a typed
//! error and an unexpected exception both ending as `guest_error` with
//! their message.
//!
//! The build tools come from `scripts/test.sh` (componentize-py from PyPI,
//! componentize-js from npm, cached like tansu); `KWQ_COMPONENTIZE_PY` and
//! `KWQ_COMPONENTIZE_JS` point at them, or they are on PATH.
//!
//! The Rust projects' cargo keeps its intermediate files in one build
//! directory under this build's target directory (`CARGO_BUILD_BUILD_DIR`,
//! as a user's cargo config may set it), so the guest SDK's dependencies are
//! compiled once per profile for all of them and across runs; each project's
//! own `target` still gets its artefacts, as the commands expect.

use crate::process::{Server, get, post};
use serde_json::{Value, json};
use std::path::Path;
use std::process::{Command, Output};

/// `kwq ARGS` in `cwd`; its output, which must be a success.
fn kwq(cwd: &Path, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .env("CARGO_BUILD_BUILD_DIR", shared_build_dir())
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("run kwq");
    assert!(
        output.status.success(),
        "kwq {args:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// Where the Rust projects' cargo builds (see the module's doc): beside
/// this test binary's profile directory, `<target>/language-projects`.
fn shared_build_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().join("language-projects")
}

/// The project's own test, with the language's own test runner.
fn run_own_test(project: &Path, lang: &str) {
    let (program, args): (&str, &[&str]) = match lang {
        "rust" => ("cargo", &["test", "--quiet"]),
        "python" => ("python3", &["-m", "unittest", "-q"]),
        _ => ("node", &["--test"]),
    };
    let output = Command::new(program)
        .env("CARGO_BUILD_BUILD_DIR", shared_build_dir())
        .args(args)
        .current_dir(project)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{lang} project's own test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The four commands; the NDJSON lines the last one printed.
fn four_commands(lang: &str) -> Vec<Value> {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    kwq(cwd, &["new", "pricer", "--lang", lang]);
    run_own_test(&cwd.join("pricer"), lang);
    kwq(cwd, &["build", "pricer"]);
    let server = Server::start(&cwd.join("data"));
    let url = server.url.as_str();
    kwq(
        cwd,
        &[
            "module",
            "push",
            "pricer/dist/pricer.wasm",
            "--name",
            "pricer",
            "--server",
            url,
        ],
    );
    let results = kwq(
        cwd,
        &[
            "job",
            "submit",
            "--module",
            "pricer",
            "--payloads",
            "pricer/payloads.json",
            "--results",
            "--server",
            url,
        ],
    );
    let payloads: Vec<Value> =
        serde_json::from_slice(&std::fs::read(cwd.join("pricer/payloads.json")).unwrap()).unwrap();
    let lines: Vec<Value> = String::from_utf8(results.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines.len(),
        payloads.len(),
        "one result per payload: {lines:?}"
    );
    for (line, payload) in lines.iter().zip(&payloads) {
        let contract: mc_math::Contract = serde_json::from_value(payload.clone()).unwrap();
        let exact = mc_math::black_scholes(&contract);
        let (price, std_error) = (
            line["result"]["price"].as_f64().unwrap(),
            line["result"]["std_error"].as_f64().unwrap(),
        );
        assert!(
            std_error > 0.0 && (price - exact).abs() < 4.0 * std_error,
            "{lang}: {price} ± {std_error} vs Black-Scholes {exact} for {payload}"
        );
    }
    lines
}

#[test]
fn four_commands_from_an_empty_directory_in_rust() {
    four_commands("rust");
}

#[test]
fn four_commands_from_an_empty_directory_in_python() {
    four_commands("python");
}

#[test]
fn four_commands_from_an_empty_directory_in_javascript() {
    four_commands("js");
}

#[test]
fn new_refuses_a_bad_name_and_a_used_directory_and_build_names_a_missing_tool() {
    let root = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kwq"));
        command.args(args).current_dir(root.path());
        for (k, v) in env {
            command.env(k, v);
        }
        command.output().unwrap()
    };
    let bad = run(&["new", "My_Task", "--lang", "python"], &[]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid name \"My_Task\""));
    assert!(run(&["new", "t", "--lang", "python"], &[]).status.success());
    let again = run(&["new", "t", "--lang", "js"], &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists and is not empty"));
    // No componentize-py anywhere: one line naming the install command.
    let missing = run(
        &["build", "t"],
        &[("PATH", "/nonexistent"), ("KWQ_COMPONENTIZE_PY", "")],
    );
    assert_eq!(missing.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("pip install componentize-py=="), "{stderr}");
    let not_a_project = run(&["build", "."], &[]);
    assert_eq!(not_a_project.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&not_a_project.stderr).contains("kwq new"));
}

/// The SDK fixture of a language: where it goes in a `kwq new` project.
fn fixture(lang: &str) -> (&'static str, &'static str) {
    match lang {
        "python" => ("app.py", include_str!("../guests/sdk_check.py")),
        _ => ("src/task.js", include_str!("../guests/sdk_check.js")),
    }
}

/// Build the fixture of `lang` as a project, upload it, and check what
/// each SDK promises through tasks on a real host.
async fn sdk_promises(lang: &str) {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    kwq(cwd, &["new", "check", "--lang", lang]);
    let (path, text) = fixture(lang);
    std::fs::write(cwd.join("check").join(path), text).unwrap();
    kwq(cwd, &["build", "check"]);
    let server = Server::start(&cwd.join("data"));
    let client = reqwest::Client::new();
    let pushed = kwq(
        cwd,
        &[
            "module",
            "push",
            "check/dist/check.wasm",
            "--name",
            "check",
            "--server",
            &server.url,
        ],
    );
    let module: Value = serde_json::from_slice(&pushed.stdout).unwrap();
    assert!(module["id"].is_string(), "{module}");
    let invoke = |payload: Value| {
        let client = client.clone();
        let url = format!("{}/v1/tasks?wait=120s", server.url);
        async move {
            let body = json!({"module": "check", "payload": payload, "affinity": "curve=USD",
                              "max_attempts": 1});
            post(&client, url, body).await
        }
    };
    // Three tasks on one warm instance (one worker is warm for the key
    // after the first): init ran once, the counter it built carries on.
    let mut counts = Vec::new();
    for _ in 0..3 {
        let task = invoke(json!({"op": "count"})).await;
        assert_eq!(task["state"], "Completed", "{task}");
        let result = &task["result"];
        assert_eq!(
            result["key"], "curve=USD",
            "{lang}: init saw the affinity key: {task}"
        );
        assert_eq!(
            result["task_id"], task["id"],
            "{lang}: task id from the host"
        );
        assert_eq!(result["attempt"], 1);
        counts.push((
            result["inits"].as_u64().unwrap(),
            result["count"].as_u64().unwrap(),
        ));
    }
    // Two workers: the instance may be a second one, but each instance's
    // init ran once and its count grows by one per task.
    let inits: Vec<u64> = counts.iter().map(|c| c.0).collect();
    assert!(
        inits.iter().all(|&i| i == 1),
        "{lang}: init once per instance: {counts:?}"
    );
    assert!(
        counts.iter().map(|c| c.1).max() >= Some(2),
        "{lang}: state survived between tasks: {counts:?}"
    );
    // Logs and progress are recorded with the task.
    let task = invoke(json!({"op": "log"})).await;
    assert_eq!(task["state"], "Completed", "{task}");
    let id = task["id"].as_str().unwrap().to_string();
    let record = get(&client, format!("{}/v1/tasks/{id}", server.url)).await;
    let logs = record.to_string();
    assert!(
        logs.contains("hello from the guest"),
        "{lang}: logs kept: {record}"
    );
    assert!(
        record["progress"]
            .as_f64()
            .is_some_and(|p| (p - 0.75).abs() < 1e-6),
        "{lang}: progress 0.75: {record}"
    );
    // A typed error and an unexpected exception: guest_error with the message.
    for (op, message) in [("fail", "asked to fail"), ("crash", "division")] {
        let task = invoke(json!({"op": op})).await;
        assert_eq!(task["state"], "Dead", "{lang} {op}: {task}");
        assert_eq!(task["error_kind"], "guest_error", "{lang} {op}: {task}");
        assert!(
            task["error_message"].as_str().unwrap().contains(message),
            "{lang} {op}: {task}"
        );
    }
    // A default componentize-js build imports wasi:http (it loaded, so the
    // host links it); a request from the guest is refused, not sent.
    if lang == "js" {
        let task = invoke(json!({"op": "fetch"})).await;
        assert_eq!(task["state"], "Completed", "{task}");
        assert!(
            task["result"]["refused"].is_string(),
            "fetch was refused: {task}"
        );
    }
    // A fan-in task reads a job's 1,500 results (three pages of the SDK's
    // 512) through `results()`, in order and each once.
    let payloads: Vec<Value> = (1..=1500)
        .map(|i| json!({"action": "echo", "value": i}))
        .collect();
    let job = post(
        &client,
        format!("{}/v1/jobs", server.url),
        json!({"module": "misbehave", "payloads": payloads}),
    )
    .await;
    let reduce = post(
        &client,
        format!("{}/v1/tasks", server.url),
        json!({"module": "check", "input": {"results_of": job["id"]}}),
    )
    .await;
    let reduce = finished(&client, &server.url, reduce["id"].as_str().unwrap()).await;
    assert_eq!(
        reduce["result"],
        json!({"count": 1500, "sum": 1500 * 1501 / 2}),
        "{lang}: {reduce}"
    );
    // The host carries on.
    let task = invoke(json!({"op": "count"})).await;
    assert_eq!(task["state"], "Completed", "{task}");
}

/// A task once it has ended (Completed, Dead or Cancelled), polled.
async fn finished(client: &reqwest::Client, url: &str, id: &str) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let task = get(client, format!("{url}/v1/tasks/{id}")).await;
        if matches!(
            task["state"].as_str(),
            Some("Completed" | "Dead" | "Cancelled")
        ) {
            return task;
        }
        assert!(std::time::Instant::now() < deadline, "never ended: {task}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_keeps_init_state_logs_progress_and_typed_errors() {
    sdk_promises("python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_javascript_sdk_keeps_init_state_logs_progress_and_typed_errors() {
    sdk_promises("js").await;
}

/// `kwq new --example pi`, built and run locally (`kwq run`) in each
/// language: the estimate is within 4 standard errors of pi.
#[test]
fn the_pi_example_estimates_pi_in_every_language() {
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    for lang in ["python", "js", "rust"] {
        let name = format!("pi-{lang}");
        kwq(cwd, &["new", &name, "--lang", lang, "--example", "pi"]);
        run_own_test(&cwd.join(&name), lang);
        kwq(cwd, &["build", &name]);
        let module = format!("{name}/dist/{name}.wasm");
        let payload = format!("@{name}/payload.json");
        let out = kwq(cwd, &["run", &module, "--payload", &payload]);
        let result: Value = serde_json::from_slice(&out.stdout).unwrap();
        let (estimate, std_error) = (
            result["estimate"].as_f64().unwrap(),
            result["std_error"].as_f64().unwrap(),
        );
        assert!(
            std_error > 0.0 && (estimate - std::f64::consts::PI).abs() < 4.0 * std_error,
            "{lang}: {result}"
        );
    }
}

/// `kwq dev`: the task is built and run on its payload, and built and run
/// again when its source changes; the second result shows the change.
#[test]
fn dev_reruns_the_task_when_its_source_changes() {
    use std::io::{BufRead, BufReader};
    let root = tempfile::tempdir().unwrap();
    let cwd = root.path();
    kwq(cwd, &["new", "loop", "--lang", "python", "--example", "pi"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["dev", "loop", "--builds", "2"])
        .current_dir(cwd)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, results) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines.send(line);
        }
    });
    let next = || {
        let line = results
            .recv_timeout(std::time::Duration::from_secs(300))
            .expect("kwq dev printed a result");
        serde_json::from_str::<Value>(&line).unwrap()
    };
    let first = next();
    assert!(
        first["estimate"].is_f64() && first.get("edited").is_none(),
        "{first}"
    );
    let app = cwd.join("loop/app.py");
    let source = std::fs::read_to_string(&app).unwrap();
    let edited = source.replace(
        "\"samples\": samples,",
        "\"samples\": samples, \"edited\": True,",
    );
    assert_ne!(source, edited, "the edit applies");
    std::fs::write(&app, edited).unwrap();
    let second = next();
    assert_eq!(second["edited"], true, "{second}");
    assert!(
        child.wait().unwrap().success(),
        "kwq dev stops after --builds 2"
    );
}
