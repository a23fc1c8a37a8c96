//! The README's commands, run as written. Every shell block of `README.md`
//! carries a marker on the line before it: `<!-- run: serve -->` (the first
//! set-up command), `<!-- run: ci -->` (lines `.ci/run` runs itself),
//! `<!-- run: walk-through -->` (run in order in one shell against the
//! served host), or `<!-- not run: WHY -->`. A new block without a marker,
//! or a README edit that breaks a command, fails CI.
//!
//! The walk-through runs from a fresh copy of the work tree (what `git
//! ls-files` lists, tracked and untracked but not ignored) as working
//! directory, with default flags and relative paths, exactly as a newcomer
//! types them. The one change: the host listens on a free port, so
//! `--listen 127.0.0.1:0` is added to the serve command and the README's
//! `127.0.0.1:7700` becomes that address (the client gets it as
//! `KWQ_SERVER`). The copy's `target` is a link to this build's target
//! directory, so the script's release build reuses what `scripts/test.sh`
//! (a release build) made and rebuilds only what changed since.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The README's address; replaced by the test host's.
const README_ADDRESS: &str = "127.0.0.1:7700";

/// A fenced shell block of the README and what its marker says.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence, for messages.
    line: usize,
    /// `run: NAME` -> Some(NAME); `not run: WHY` -> None.
    run: Option<String>,
    /// The commands.
    text: String,
}

/// Shell blocks (```sh, ```bash, ```shell, ```console) with their markers;
/// a block without a marker is an error naming its line.
fn shell_blocks(readme: &str) -> Result<Vec<Block>, String> {
    let lines: Vec<&str> = readme.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```") else {
            i += 1;
            continue;
        };
        let info = info.trim().to_string();
        let start = i;
        i += 1;
        let mut text = String::new();
        while i < lines.len() && !lines[i].trim_start().starts_with("```") {
            text.push_str(lines[i]);
            text.push('\n');
            i += 1;
        }
        i += 1;
        if !matches!(info.as_str(), "sh" | "bash" | "shell" | "console") {
            continue;
        }
        let marker = lines[..start]
            .iter()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.trim())
            .unwrap_or_default();
        let line = start + 1;
        let body = marker
            .strip_prefix("<!--")
            .and_then(|m| m.strip_suffix("-->"))
            .map(str::trim)
            .ok_or_else(|| {
                format!("README.md:{line}: shell block without a `<!-- run: NAME -->` or `<!-- not run: WHY -->` marker before it")
            })?;
        let run = if let Some(name) = body.strip_prefix("run:") {
            Some(name.trim().to_string())
        } else if let Some(why) = body.strip_prefix("not run:") {
            if why.trim().len() < 10 {
                return Err(format!("README.md:{line}: say why the block is not run"));
            }
            None
        } else {
            return Err(format!("README.md:{line}: unknown marker {marker:?}"));
        };
        blocks.push(Block { line, run, text });
    }
    Ok(blocks)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn readme() -> String {
    std::fs::read_to_string(workspace_root().join("README.md")).unwrap()
}

/// The blocks of one name, in README order.
fn named<'a>(blocks: &'a [Block], name: &str) -> Vec<&'a Block> {
    blocks
        .iter()
        .filter(|b| b.run.as_deref() == Some(name))
        .collect()
}

#[test]
fn every_readme_shell_block_is_run_or_says_why_not() {
    let blocks = shell_blocks(&readme()).unwrap_or_else(|e| panic!("{e}"));
    for block in &blocks {
        if let Some(name) = &block.run {
            assert!(
                ["serve", "ci", "walk-through"].contains(&name.as_str()),
                "README.md:{}: no test runs blocks named {name:?}",
                block.line
            );
        }
    }
    // The two set-up commands: the first block serves, the second is what CI runs.
    assert_eq!(
        blocks
            .iter()
            .take(2)
            .map(|b| b.run.clone())
            .collect::<Vec<_>>(),
        [Some("serve".to_string()), Some("ci".to_string())],
        "the README starts with its two set-up commands"
    );
    let ci = std::fs::read_to_string(workspace_root().join(".ci/run")).unwrap();
    for block in named(&blocks, "ci") {
        for command in block.text.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                ci.lines().any(|l| l.trim() == command.trim()),
                "README.md:{}: {command:?} is not a line of .ci/run",
                block.line
            );
        }
    }
    assert_eq!(named(&blocks, "serve").len(), 1);
    assert!(!named(&blocks, "walk-through").is_empty());
}

#[test]
fn a_block_without_a_marker_is_refused() {
    let error = shell_blocks("text\n\n```sh\nkwq serve\n```\n").unwrap_err();
    assert!(error.contains("README.md:3"), "{error}");
    let blocks = shell_blocks(
        "<!-- not run: needs a Kafka cluster -->\n```sh\nkwq serve --store kafka://b:9092\n```\n\n```rust\nfn main() {}\n```\n",
    )
    .unwrap();
    assert_eq!(blocks.len(), 1);
    assert!(blocks[0].run.is_none());
}

/// The work tree copied to `<target>/readme-tree` (wiped first; file times
/// kept so cargo rebuilds only what changed), with `target` linked to
/// `<target>` itself.
fn fresh_copy() -> PathBuf {
    let root = workspace_root();
    let target = target_dir();
    let copy = target.join("readme-tree");
    if copy.exists() {
        std::fs::remove_dir_all(&copy).unwrap();
    }
    std::fs::create_dir_all(&copy).unwrap();
    let listed = Command::new("git")
        .args([
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ])
        .current_dir(&root)
        .output()
        .expect("git is needed to list the work tree");
    assert!(listed.status.success(), "git ls-files failed");
    for file in listed.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let relative = Path::new(std::str::from_utf8(file).unwrap());
        let from = root.join(relative);
        if !from.is_file() {
            continue; // listed but deleted in the work tree
        }
        let to = copy.join(relative);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap();
        let modified = std::fs::metadata(&from).unwrap().modified().unwrap();
        std::fs::File::options()
            .write(true)
            .open(&to)
            .unwrap()
            .set_modified(modified)
            .unwrap();
    }
    // The copy builds in this build's own target directory, as a clone
    // whose `target` survived would: cargo names a workspace's artefacts
    // by paths relative to its root, and the copy's sources are this tree's
    // with their file times, so the serve script's `cargo build --release
    // -p kwq` finds what `scripts/test.sh` (`cargo test --release`) built
    // fresh instead of rebuilding the release tree (half an hour on 2
    // cores). The fresh-clone build itself is what CI's own build does.
    std::os::unix::fs::symlink(&target, copy.join("target")).unwrap();
    assert!(!copy.join("kwq-data").exists());
    copy
}

/// This build's target directory: the test binary is `<target>/debug/deps/all-…`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

/// `bash -c SCRIPT` in `dir`, in a process group of its own (so a watchdog
/// can stop everything it starts), stdout piped, stderr to `log`.
fn bash_in(dir: &Path, script: &str, log: &Path) -> Command {
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .process_group(0);
    command
}

/// A host started by the README's serve command in `dir`.
struct Served {
    child: Child,
    address: String,
    log: PathBuf,
}

impl Served {
    /// Run the README's serve command (plus `--listen 127.0.0.1:0`) and wait
    /// for its "serving on" line: the first run builds the release binary,
    /// so the wait is long on a fresh machine.
    fn start(dir: &Path, command: &str, log_name: &str) -> Served {
        let log = dir.join(log_name);
        let mut child = bash_in(
            dir,
            &format!("exec {} --listen 127.0.0.1:0", command.trim()),
            &log,
        )
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("KWQ_DATA_DIR")
        .env_remove("KWQ_STORE")
        .env_remove("KWQ_LISTEN")
        .spawn()
        .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines, read) = mpsc::channel();
        // Drain stdout for the life of the process, so kwq never writes
        // into a closed pipe once the test has its address.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines.send(line);
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(45 * 60);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match read.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix("kwq serving on http://") {
                        let address = rest.split_whitespace().next().unwrap().to_string();
                        return Served {
                            child,
                            address,
                            log,
                        };
                    }
                }
                Err(_) => {
                    kill_group(&child);
                    let _ = child.wait();
                    panic!(
                        "`{command}` stopped or never said it was serving; its log:\n{}",
                        tail(&log)
                    );
                }
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// SIGTERM to kwq itself (the script `exec`s it); it must exit cleanly
    /// (a watchdog kills the group after 2 minutes).
    fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let (done, thread) = watchdog(self.child.id(), Duration::from_secs(120));
        let status = self.child.wait().unwrap();
        let _ = done.send(());
        thread.join().unwrap();
        assert!(
            status.success(),
            "kwq serve exited with {status} on SIGTERM; its log:\n{}",
            tail(&self.log)
        );
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            kill_group(&self.child);
            let _ = self.child.wait();
        }
    }
}

/// Send `signal` to the process group led by `child` (everything the
/// script started: bash, cargo, kwq).
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{}", child.id())])
        .status();
}

fn kill_group(child: &Child) {
    signal_group(child, "KILL");
}

/// A watchdog: kills the process group `pid` unless told to stand down
/// within `limit`. Returns the stand-down handle and the thread.
fn watchdog(pid: u32, limit: Duration) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (done, finished) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if finished.recv_timeout(limit).is_err() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    });
    (done, thread)
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs one HTTP request (async reqwest) to completion on a small runtime.
fn http<T>(request: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(request)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn get(url: &str) -> Value {
    http(async {
        let response = client().get(url).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.json().await.unwrap()
    })
}

fn post(url: &str, body: Value) -> Value {
    http(async {
        let response = client().post(url).json(&body).send().await.unwrap();
        assert!(
            response.status().is_success(),
            "POST {url}: {}",
            response.status()
        );
        response.json().await.unwrap()
    })
}

/// Follow a task until it is final, on the host's own event stream (SSE
/// from the first event), not on a clock.
fn wait_task(host: &Served, id: &str) -> Value {
    let task = get(&host.url(&format!("/v1/tasks/{id}")));
    if is_final(&task) {
        return task;
    }
    http(async {
        let mut events = reqwest::Client::new()
            .get(host.url("/v1/events?from=0"))
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .unwrap();
        let mut buffer = Vec::new();
        let needle = format!("\"task_id\":\"{id}\"");
        loop {
            let chunk = events
                .chunk()
                .await
                .expect("event stream failed")
                .unwrap_or_else(|| panic!("event stream ended before {id} finished"));
            buffer.extend_from_slice(&chunk);
            let text = String::from_utf8_lossy(&buffer).into_owned();
            if text.contains(&needle) {
                let response = client()
                    .get(host.url(&format!("/v1/tasks/{id}")))
                    .send()
                    .await
                    .unwrap();
                let task: Value = response.json().await.unwrap();
                if is_final(&task) {
                    return task;
                }
            }
            // Keep only the unfinished tail so the buffer stays small.
            if let Some(end) = text.rfind("\n\n") {
                buffer.drain(..end + 2);
            }
        }
    })
}

fn is_final(task: &Value) -> bool {
    matches!(
        task["state"].as_str(),
        Some("Completed" | "Dead" | "Cancelled")
    )
}

/// Hull's example call: S=42, K=40, r=10%, σ=20%, T=0.5.
fn hull_call(paths: u64, seed: u64) -> Value {
    json!({"spot": 42, "strike": 40, "rate": 0.1, "vol": 0.2, "maturity": 0.5,
           "kind": "call", "paths": paths, "seed": seed})
}

fn hull_black_scholes() -> f64 {
    let contract: mc_math::Contract = serde_json::from_value(hull_call(1, 1)).unwrap();
    mc_math::black_scholes(&contract)
}

fn assert_within_3_std_errors(result: &Value) {
    let (price, error) = (
        result["price"].as_f64().unwrap(),
        result["std_error"].as_f64().unwrap(),
    );
    let exact = hull_black_scholes();
    assert!(
        (price - exact).abs() < 3.0 * error,
        "price {price} ± {error} is not within 3 standard errors of Black-Scholes {exact}"
    );
}

/// Run the walk-through blocks in one shell, from the copy, against `host`.
fn run_walk_through(dir: &Path, host: &Served, blocks: &[&Block]) -> String {
    let mut script = String::from("set -e\n");
    for block in blocks {
        script.push_str(&format!("# README.md:{}\n", block.line));
        script.push_str(&block.text.replace(README_ADDRESS, &host.address));
    }
    let log = dir.join("walk-through.log");
    let mut child = bash_in(dir, &script, &log)
        .env("KWQ_SERVER", host.url(""))
        .spawn()
        .unwrap();
    let (done, thread) = watchdog(child.id(), Duration::from_secs(20 * 60));
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let status = child.wait().unwrap();
    let _ = done.send(());
    thread.join().unwrap();
    assert!(
        status.success(),
        "the walk-through failed ({status}); stdout:\n{stdout}\nstderr:\n{}",
        tail(&log)
    );
    stdout
}

/// Jobs whose tags include `key=value`.
fn jobs_tagged(host: &Served, key: &str, value: &str) -> Vec<Value> {
    get(&host.url("/v1/jobs?limit=1000"))
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["options"]["tags"][key] == json!(value))
        .cloned()
        .collect()
}

/// Wait for a job to finish, following `kwq watch` (the CLI's own follower).
fn watch_job(dir: &Path, host: &Served, id: &str) -> Value {
    let status = Command::new(dir.join("target/release/kwq"))
        .args(["watch", id])
        .env("KWQ_SERVER", host.url(""))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    let job = get(&host.url(&format!("/v1/jobs/{id}")));
    assert!(
        matches!(job["state"].as_str(), Some("Finished" | "Cancelled")),
        "kwq watch {id} returned {status} on an unfinished job: {job}"
    );
    job
}

#[test]
fn the_readme_runs_as_written_from_a_fresh_copy() {
    let blocks = shell_blocks(&readme()).unwrap_or_else(|e| panic!("{e}"));
    let serve = named(&blocks, "serve")[0].text.trim().to_string();
    let dir = fresh_copy();

    // 1. The first set-up command serves, with no --data-dir.
    let host = Served::start(&dir, &serve, "serve.log");
    let health = get(&host.url("/healthz"));
    assert_eq!(health["status"], json!("ok"), "{health}");
    assert!(
        dir.join("kwq-data/kwq.db").is_file(),
        "the store is in ./kwq-data of the working directory"
    );

    // 2. Hull's call over HTTP, within 3 standard errors of Black-Scholes.
    let created = post(
        &host.url("/v1/tasks"),
        json!({"module": "option-pricer", "payload": hull_call(400_000, 11), "priority": 9}),
    );
    let hull = created["id"].as_str().expect("task id").to_string();
    let priced = wait_task(&host, &hull);
    assert_eq!(priced["state"], json!("Completed"), "{priced}");
    assert_within_3_std_errors(&priced["result"]);

    // 3. The walk-through and the curl lines, as written.
    let walk = named(&blocks, "walk-through");
    let output = run_walk_through(&dir, &host, &walk);
    assert!(
        !output.contains("{\"error\""),
        "a command was refused:\n{output}"
    );
    assert!(output.contains("option-pricer"), "module list:\n{output}");
    assert!(
        output.matches("\"price\":4.7").count() >= 2,
        "the prices printed by `kwq submit --wait` and `kwq run`:\n{output}"
    );
    // The single task of the walk-through is Hull's call with a million paths.
    let single = get(&host.url("/v1/tasks?tag=currency=USD"));
    let single_id = single["items"][0]["id"].as_str().unwrap().to_string();
    let single = wait_task(&host, &single_id);
    assert_within_3_std_errors(&single["result"]);
    // The 100,250-point sweep: finished, every result streamed once.
    let sweeps = jobs_tagged(&host, "book", "fx");
    assert_eq!(sweeps.len(), 1, "{sweeps:?}");
    let sweep = &sweeps[0];
    assert_eq!(
        (sweep["state"].clone(), sweep["counts"]["Completed"].clone()),
        (json!("Finished"), json!(100_250)),
        "{sweep}"
    );
    let prices = std::fs::read_to_string(dir.join("prices.ndjson")).unwrap();
    let mut seen = std::collections::HashSet::new();
    for line in prices.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        assert!(row["result"]["price"].as_f64().unwrap() >= 0.0, "{row}");
        assert!(seen.insert(row["task_id"].as_str().unwrap().to_string()));
    }
    assert_eq!(seen.len(), 100_250);
    // Run times are kept in microseconds, not whole milliseconds: the mean
    // of 100,250 runs of about a millisecond is then not a multiple of
    // 1,000 µs. (Not a speed check: under load a run takes longer.)
    let mean = sweep["mean_run_us"].as_f64().unwrap();
    assert!(
        mean > 0.0 && mean % 1000.0 != 0.0,
        "mean run {mean} µs: {sweep}"
    );
    // The long job was paused, resumed and cancelled.
    let long = jobs_tagged(&host, "demo", "cancel");
    assert_eq!(long.len(), 1, "{long:?}");
    let long = watch_job(&dir, &host, long[0]["id"].as_str().unwrap());
    assert_eq!(long["state"], json!("Cancelled"), "{long}");
    assert!(long["counts"]["Cancelled"].as_u64().unwrap() > 0, "{long}");
    // What the curl lines submitted.
    let curl_job = jobs_tagged(&host, "book", "fx-curl");
    assert_eq!(curl_job.len(), 1, "{curl_job:?}");
    let curl_job = watch_job(&dir, &host, curl_job[0]["id"].as_str().unwrap());
    assert_eq!(curl_job["counts"]["Completed"], json!(410), "{curl_job}");
    let demo = get(&host.url("/v1/tasks?tag=desk=demo"));
    let demo = wait_task(&host, demo["items"][0]["id"].as_str().unwrap());
    let pi = demo["result"]["estimate"].as_f64().unwrap();
    assert!((pi - std::f64::consts::PI).abs() < 0.01, "{demo}");
    // The task submitted `--after` the pi run waited for it, then ran.
    let after = get(&host.url("/v1/tasks?tag=demo=after"));
    let after = wait_task(&host, after["items"][0]["id"].as_str().unwrap());
    assert_eq!(after["state"], json!("Completed"), "{after}");
    let waited = after["options"]["after"][0].as_str().unwrap();
    let dependency = wait_task(&host, waited);
    assert!(
        after["timestamps"]["Running"].as_u64() >= dependency["timestamps"]["Completed"].as_u64()
            && after["timestamps"]["Waiting"].is_u64(),
        "{after} {dependency}"
    );
    // The reduce submitted `--results-of` the 200-seed sweep read every
    // run from the host and priced within 3 standard errors.
    let pooled = get(&host.url("/v1/tasks?tag=demo=fan-in"));
    let pooled = wait_task(&host, pooled["items"][0]["id"].as_str().unwrap());
    assert_eq!(pooled["state"], json!("Completed"), "{pooled}");
    assert_eq!(pooled["result"]["runs"], json!(200), "{pooled}");
    let (price, error) = (
        pooled["result"]["price"].as_f64().unwrap(),
        pooled["result"]["std_error"].as_f64().unwrap(),
    );
    assert!((price - 10.4506).abs() < 3.0 * error, "{pooled}");
    // /docs/ leads to the API documentation.
    let (status, path) = http(async {
        let docs = client().get(host.url("/docs/")).send().await.unwrap();
        (docs.status().as_u16(), docs.url().path().to_string())
    });
    assert_eq!((status, path.as_str()), (200, "/docs"));

    // 4. SIGTERM: a clean exit, and the data stays.
    host.terminate();
    let host = Served::start(&dir, &serve, "serve-again.log");
    let again = get(&host.url(&format!("/v1/tasks/{hull}")));
    assert_eq!(again["state"], json!("Completed"), "{again}");
    assert_eq!(again["result"], priced["result"]);
    host.terminate();
}
