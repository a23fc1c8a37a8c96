//! Relative paths work everywhere a user may give one (`--data-dir`,
//! `--store sqlite://…`, `KWQ_CACHE_DIR`, `XDG_CACHE_HOME`), and `kwq serve`
//! says it is serving only once it is: a failure to start is one line and a
//! non-zero exit, with nothing on stdout. Real processes, run from a
//! temporary working directory.

use kwq::examples;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const HULL: &str = r#"{"spot":42,"strike":40,"rate":0.1,"vol":0.2,"maturity":0.5,"kind":"call","paths":20000,"seed":7}"#;

/// `kwq serve ARGS --listen 127.0.0.1:0` from `cwd`: waits for the serving
/// line, checks `/healthz`, stops the host with SIGTERM and returns its exit
/// code. Its stdout is closed after the first line, as a supervisor that
/// only wanted the address would: the host must not mind.
fn serve_in(cwd: &Path, args: &[&str]) -> Option<i32> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .arg("serve")
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--workers", "1"])
        .current_dir(cwd)
        .env_remove("KWQ_DATA_DIR")
        .env_remove("KWQ_STORE")
        .env("KWQ_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let Some(address) = first
        .strip_prefix("kwq serving on http://")
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_string)
    else {
        let output = child.wait_with_output().unwrap();
        panic!("no serving line: {first:?}; exit {}", output.status)
    };
    let health = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            reqwest::get(format!("http://{address}/healthz"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        });
    assert!(health.contains("ok"), "{health}");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap().code()
}

#[test]
fn serve_with_a_relative_data_dir_keeps_its_store_and_compile_cache_there() {
    let cwd = tempfile::tempdir().unwrap();
    // The default data dir is the relative `kwq-data`.
    assert_eq!(serve_in(cwd.path(), &["--examples"]), Some(0));
    assert!(cwd.path().join("kwq-data/kwq.db").is_file());
    let compiled = std::fs::read_dir(cwd.path().join("kwq-data/compiled"))
        .expect("the compile cache is under the data dir")
        .count();
    assert!(compiled > 0, "nothing cached");
    // An explicit relative one, and a relative sqlite:// store.
    assert_eq!(serve_in(cwd.path(), &["--data-dir", "d"]), Some(0));
    assert!(cwd.path().join("d/kwq.db").is_file());
    assert_eq!(
        serve_in(cwd.path(), &["--store", "sqlite://stores/a.db"]),
        Some(0)
    );
    assert!(cwd.path().join("stores/a.db").is_file());
}

#[test]
fn a_host_that_cannot_start_says_so_in_one_line_and_never_claims_to_serve() {
    let cwd = tempfile::tempdir().unwrap();
    std::fs::write(cwd.path().join("not-a-dir"), b"a file").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args([
            "serve",
            "--data-dir",
            "not-a-dir",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(cwd.path())
        .env_remove("KWQ_LOG")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "",
        "claimed to serve"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains("not-a-dir"),
        "{stderr}"
    );
}

/// `kwq run` from `cwd` with one environment variable set.
fn run_with(cwd: &Path, variable: &str, value: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["run", examples::OPTION_PRICER, "--payload", HULL])
        .current_dir(cwd)
        .env_remove("KWQ_CACHE_DIR")
        .env_remove("XDG_CACHE_HOME")
        .env(variable, value)
        .output()
        .unwrap()
}

#[test]
fn run_takes_relative_cache_directories_from_the_environment() {
    let cwd = tempfile::tempdir().unwrap();
    let output = run_with(cwd.path(), "KWQ_CACHE_DIR", "cache");
    assert!(output.status.success(), "{output:?}");
    assert!(std::fs::read_dir(cwd.path().join("cache")).unwrap().count() > 0);
    let output = run_with(cwd.path(), "XDG_CACHE_HOME", "xdg");
    assert!(output.status.success(), "{output:?}");
    assert!(
        std::fs::read_dir(cwd.path().join("xdg/kwq/compiled"))
            .unwrap()
            .count()
            > 0
    );
}
