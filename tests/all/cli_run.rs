//! `kwq run` as a user runs it: a real process, its stdout, stderr and exit code.

use kwq::examples;
use std::process::{Command, Output};

fn kwq_run(args: &[&str]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    Command::new(env!("CARGO_BIN_EXE_kwq"))
        .arg("run")
        .args(args)
        .env("KWQ_CACHE_DIR", cache.path())
        .output()
        .expect("start kwq")
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn run_prints_the_pricers_json_result_and_exits_zero() {
    let payload = r#"{"spot":42,"strike":40,"rate":0.1,"vol":0.2,"maturity":0.5,"kind":"call","paths":100000,"seed":7}"#;
    let output = kwq_run(&[examples::OPTION_PRICER, "--payload", payload]);
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let price = result["price"].as_f64().unwrap();
    assert!((price - 4.76).abs() < 0.05, "{result}");
    assert_eq!(result["paths"], 100_000);
}

#[test]
fn a_failing_task_prints_one_line_and_exits_one() {
    let output = kwq_run(&[
        examples::MISBEHAVE,
        "--payload",
        r#"{"action":"loop"}"#,
        "--timeout",
        "200ms",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let lines = stderr_lines(&output);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with("error: task failed (timeout)"),
        "{lines:?}"
    );
}

#[test]
fn bad_input_exits_two_with_a_readable_line() {
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"not wasm").unwrap();
    let cases = [
        (
            vec![garbage.path().to_str().unwrap(), "--payload", "{}"],
            "invalid module",
        ),
        (vec!["/nonexistent/module.wasm"], "cannot read module"),
        (vec![examples::NOOP, "--memory", "lots"], "not a size"),
        (
            vec![examples::NOOP, "--payload", "@/nonexistent/payload.json"],
            "cannot read payload",
        ),
    ];
    for (args, expected) in cases {
        let output = kwq_run(&args);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {:?}",
            stderr_lines(&output)
        );
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(text.contains(expected), "{args:?}: {text}");
    }
}

#[test]
fn repeat_with_affinity_reuses_the_warm_instance_and_reports_timing() {
    let output = kwq_run(&[
        examples::CURVE,
        "--payload",
        r#"{"maturity":5}"#,
        "--affinity",
        "curve=JPY",
        "--repeat",
        "5",
    ]);
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        (result["builds"].as_u64(), result["served"].as_u64()),
        (Some(1), Some(5))
    );
    let timing = String::from_utf8_lossy(&output.stderr);
    assert!(timing.contains("5 runs (4 warm)"), "{timing}");
}

#[test]
fn a_wasi_command_runs_from_the_cli() {
    let output = kwq_run(&[examples::WASI_P1_UPPER, "--payload", "usd curve"]);
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "USD CURVE");
}

#[test]
fn bench_runtime_prints_one_price_for_wasm_and_native() {
    let output = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["bench", "runtime", "--tasks", "20", "--paths", "20001"])
        .output()
        .expect("start kwq");
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    // The last column of the pricer rows: the same code and seed on both
    // sides must give the same price, whatever the speeds.
    let price_of = |row: &str| {
        table
            .lines()
            .find(|l| l.starts_with(row))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("no {row:?} row in:\n{table}"))
            .to_string()
    };
    let native = price_of("native Rust, 20001");
    assert_eq!(native, price_of("Wasm, epoch timeouts on, 20001"));
    assert!(
        (native.parse::<f64>().unwrap() - 4.76).abs() < 0.3,
        "{table}"
    );
    assert!(
        table.contains("Wasm speed as a fraction of native"),
        "{table}"
    );
}

#[test]
fn the_perf_map_names_the_guests_functions() {
    let cache = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["run", "--wasm-profiler", "perfmap", examples::OPTION_PRICER])
        .args(["--payload", r#"{"spot":42,"strike":40,"rate":0.1,"vol":0.2,"maturity":0.5,"kind":"call","paths":1000}"#])
        .env("KWQ_CACHE_DIR", cache.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start kwq");
    let map = std::path::PathBuf::from(format!("/tmp/perf-{}.map", child.id()));
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let names = std::fs::read_to_string(&map).unwrap_or_default();
    let _ = std::fs::remove_file(&map);
    assert!(names.contains("price_european"), "{map:?}: {names}");
}

/// `kwq bench grid` runs on a host assembled by `server::Host::start`, as
/// `kwq serve` is: every task it submits completes, and it cleans up after
/// itself.
#[test]
fn bench_grid_runs_on_a_host_assembled_like_serve() {
    let output = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["bench", "grid", "--tasks", "2000"])
        .output()
        .expect("start kwq");
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    let rate = table
        .lines()
        .find(|l| l.starts_with("no-op tasks end to end, 2000 tasks"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no throughput row in:\n{table}"));
    assert!(rate > 0.0, "{table}");
    assert!(table.contains("submit-to-start latency p99"), "{table}");
}

/// `kwq bench fan-in` runs a small sweep and its reduce to the end: the
/// reduce read every result (its pooled paths are the sweep's).
#[test]
fn bench_fan_in_reduces_every_result_of_its_sweep() {
    let output = Command::new(env!("CARGO_BIN_EXE_kwq"))
        .args(["bench", "fan-in", "--results", "3000"])
        .env("KWQ_LOG", "error")
        .output()
        .expect("start kwq");
    assert!(output.status.success(), "{:?}", stderr_lines(&output));
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(
        table.contains("| reduce: Running to Completed, 3000 results |"),
        "{table}"
    );
    assert!(table.contains("over 192000 paths |"), "{table}");
}
