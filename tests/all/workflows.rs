//! `kwq workflow run` against a real `kwq serve`: the README's Monte Carlo
//! workflow (1,000 pricing runs, then a reduce), a failed step stopping the
//! steps after it, a bad workflow file refused before anything runs, and a
//! workflow carrying on across a host killed and started again.

use crate::process::Server;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `kwq workflow run FILE` against `server`, from the repository root (as
/// the README runs it, with a relative path).
pub(crate) fn workflow_run(server: &Server, file: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["workflow", "run", file])
        .current_dir(repo_root())
        .env("KWQ_SERVER", &server.url)
        .output()
        .expect("run kwq workflow")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn the_monte_carlo_workflow_prices_within_three_standard_errors_of_black_scholes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let run = workflow_run(&server, "examples/mc-price.json");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert_priced_within_three_errors(&run.stdout);
    // The reduce was handed to the host at once, waiting for the sweep
    // (Waiting), and read the sweep's results from the host as its input.
    let submitted = |step: &str| -> String {
        let line = format!("step {step}: submitted ");
        let at = stderr.find(&line).expect("submitted") + line.len();
        stderr[at..].split_whitespace().next().unwrap().to_string()
    };
    let (paths, price) = (submitted("paths"), submitted("price"));
    let reduce = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(crate::process::get(
            &reqwest::Client::new(),
            format!("{}/v1/tasks/{price}", server.url),
        ));
    assert_eq!(reduce["options"]["results_of"], paths.as_str(), "{reduce}");
    assert!(reduce["timestamps"]["Waiting"].is_u64(), "{reduce}");
}

#[test]
fn a_failed_step_stops_the_steps_after_it_and_the_command_fails() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let file = dir.path().join("fails.json");
    std::fs::write(
        &file,
        r#"{"steps": [
            {"name": "calibrate", "task": {"module": "misbehave", "max_attempts": 1,
                                           "payload": {"action": "fail", "message": "no quotes"}}},
            {"name": "price", "after": ["calibrate"], "task": {"module": "noop"}},
            {"name": "report", "after": ["calibrate"], "on_failure": "run",
             "task": {"module": "misbehave", "payload": {"action": "echo", "value": "sent"}}},
            {"name": "independent", "task": {"module": "noop"}}
        ]}"#,
    )
    .unwrap();
    // The order held by the host, then kept by the command itself.
    for client_order in [false, true] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kwq"));
        command.args(["workflow", "run"]).arg(&file);
        if client_order {
            command.arg("--client-order");
        }
        let run = command
            .env("KWQ_SERVER", &server.url)
            .output()
            .expect("run kwq workflow");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("no quotes"), "{stderr}");
        if client_order {
            assert!(
                stderr.contains("step price: not run: step \"calibrate\" did not complete"),
                "{stderr}"
            );
            assert!(!stderr.contains("step price: submitted"), "{stderr}");
        } else {
            // The host held it (submitted at once, after calibrate's id)
            // and cancelled it when calibrate died: it never ran.
            let calibrate = stderr
                .lines()
                .find_map(|l| l.strip_prefix("step calibrate: submitted "))
                .expect("calibrate submitted");
            assert!(
                stderr.lines().any(|l| l.starts_with("step price: task ")
                    && l.ends_with(&format!("ended Cancelled: dependency_failed: {calibrate}"))),
                "{stderr}"
            );
        }
        // A step that waits for nothing failed still runs, and so does one
        // that says `on_failure: run`, once the step it waits for has ended.
        assert!(stderr.contains("step independent: completed"), "{stderr}");
        let printed: Value = serde_json::from_slice(&run.stdout).unwrap();
        assert!(printed["price"]["failed"].is_string(), "{printed}");
        assert_eq!(printed["report"], "sent", "{printed}");
    }
}

#[tokio::test]
async fn a_cycle_is_refused_with_exit_code_2_before_anything_is_submitted() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let file = dir.path().join("cycle.json");
    std::fs::write(
        &file,
        r#"{"steps": [
            {"name": "a", "after": ["b"], "task": {"module": "noop"}},
            {"name": "b", "after": ["a"], "task": {"module": "noop"}}
        ]}"#,
    )
    .unwrap();
    let run = workflow_run(&server, file.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("a, b wait for each other"), "{stderr}");
    let tasks =
        crate::process::get(&reqwest::Client::new(), format!("{}/v1/tasks", server.url)).await;
    assert_eq!(tasks["items"].as_array().map(Vec::len), Some(0), "{tasks}");
}

#[test]
fn the_workflow_rides_out_a_sigkilled_and_restarted_host() {
    let dir = tempfile::tempdir().unwrap();
    let address = crate::workers::free_address();
    let host_dir = dir.path().join("host");
    let serve = || {
        Server::start_listening(
            &host_dir,
            &address,
            &[],
            &[],
            std::process::Stdio::inherit(),
            2,
            "warn",
        )
    };
    let first = serve();
    let file = dir.path().join("slow.json");
    let sleeps: Vec<Value> = (0..20)
        .map(|_| serde_json::json!({"action": "sleep", "ms": 300}))
        .collect();
    let workflow = serde_json::json!({"steps": [
        {"name": "slow", "job": {"module": "misbehave", "payloads": sleeps}},
        {"name": "after", "after": ["slow"], "task": {"module": "noop"}}
    ]});
    std::fs::write(&file, workflow.to_string()).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["workflow", "run"])
        .arg(&file)
        .env("KWQ_SERVER", &first.url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run kwq workflow");
    let (lines, heard) = std::sync::mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |text: &str| {
        while !seen.iter().any(|l: &String| l.contains(text)) {
            let line = heard
                .recv_timeout(std::time::Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("no {text:?} in {seen:?}"));
            seen.push(line);
        }
    };
    // Kill the host while the job runs (20 sleeps of 300 ms on 2 workers),
    // both steps submitted (the second held by the host until the job
    // completes), and start it again only once the command has found it gone.
    wait_for("step after: submitted");
    first.kill();
    wait_for("the host does not answer");
    let second = serve();
    wait_for("step after: completed");
    let output = child.wait_with_output().unwrap();
    while let Ok(line) = heard.recv_timeout(std::time::Duration::from_secs(5)) {
        seen.push(line);
    }
    assert!(output.status.success(), "{seen:?}");
    assert!(
        seen.iter().any(|l| l == "the host answers again"),
        "{seen:?}"
    );
    // Every task of the job ran to a result, the ones the kill cut short
    // included, each once.
    let job = seen
        .iter()
        .find_map(|l| l.strip_prefix("step slow: submitted "))
        .unwrap()
        .to_string();
    let results = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["results", &job])
        .env("KWQ_SERVER", &second.url)
        .output()
        .unwrap();
    let tasks: std::collections::BTreeSet<String> = String::from_utf8_lossy(&results.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["task_id"].to_string())
        .collect();
    assert_eq!(
        tasks.len(),
        20,
        "{:?}",
        String::from_utf8_lossy(&results.stdout)
    );
    assert_eq!(String::from_utf8_lossy(&results.stdout).lines().count(), 20);
}

/// The Monte Carlo workflow's printed result: 1,000 runs of 100,000 paths
/// pooled, within 3 standard errors of Black-Scholes, with the error of
/// 10^8 paths.
pub(crate) fn assert_priced_within_three_errors(stdout: &[u8]) {
    let pooled: Value = serde_json::from_slice(stdout).expect("the result as JSON");
    assert_eq!(pooled["runs"], 1000, "{pooled}");
    assert_eq!(pooled["paths"], 100_000_000u64, "{pooled}");
    let (price, error) = (
        pooled["price"].as_f64().unwrap(),
        pooled["std_error"].as_f64().unwrap(),
    );
    let exact = mc_math::black_scholes(&mc_math::Contract {
        spot: 100.0,
        strike: 100.0,
        rate: 0.05,
        vol: 0.2,
        maturity: 1.0,
        kind: mc_math::OptionKind::Call,
    });
    assert!(
        (price - exact).abs() < 3.0 * error,
        "{price} ± {error} against {exact}"
    );
    // One run of 100,000 paths has an error of about 0.033 here; 10^8
    // paths pooled must bring it down by sqrt(1000).
    assert!(error > 0.0005 && error < 0.002, "{error}");
}
