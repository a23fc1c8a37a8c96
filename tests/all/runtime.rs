//! The runtime against real guest modules: every limit and error kind, the
//! sandbox, warm reuse, both guest kinds, caches, and recovery after faults.

use crate::support::{load, run_failing, run_json, shared_runtime, spec, test_config};
use kwq::examples;
use kwq::model::{ErrorKind, LogLevel, ModuleKind};
use kwq::runtime::{ModuleSource, Runtime, RuntimeConfig, TaskError};
use serde_json::json;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn misbehave() -> kwq::model::ModuleId {
    load(shared_runtime(), examples::MISBEHAVE)
}

#[tokio::test]
async fn timeout_stops_a_busy_loop_and_a_sleeping_guest() {
    let module = misbehave();
    let mut worker = shared_runtime().worker(2);
    for payload in [
        json!({"action": "loop"}),
        json!({"action": "sleep", "ms": 60_000}),
    ] {
        let mut task = spec(&module, payload.clone());
        task.limits.timeout = Duration::from_millis(300);
        let started = Instant::now();
        let report = run_failing(&mut worker, task).await;
        assert_eq!(
            report.outcome.unwrap_err().kind(),
            ErrorKind::Timeout,
            "{payload}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{payload} took {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn memory_cap_fails_unbounded_allocation_as_memory_limit() {
    let module = misbehave();
    let mut worker = shared_runtime().worker(2);
    let report = run_failing(&mut worker, spec(&module, json!({"action": "alloc"}))).await;
    assert_eq!(
        report.outcome.unwrap_err(),
        TaskError::MemoryLimit { limit: 64 << 20 }
    );
}

#[tokio::test]
async fn fuel_budget_stops_a_loop_as_fuel_exhausted() {
    let runtime = Runtime::new(RuntimeConfig {
        fuel: true,
        ..test_config()
    })
    .unwrap();
    let module = load(&runtime, examples::MISBEHAVE);
    let mut worker = runtime.worker(2);
    let mut task = spec(&module, json!({"action": "loop"}));
    task.limits.fuel = Some(50_000_000);
    let report = run_failing(&mut worker, task).await;
    assert_eq!(
        report.outcome.unwrap_err(),
        TaskError::FuelExhausted(50_000_000)
    );
    // A generous budget lets a real task finish.
    let mut task = spec(&module, json!({"action": "echo", "value": 1}));
    task.limits.fuel = Some(5_000_000_000);
    assert_eq!(run_json(&mut worker, task).await, json!(1));
}

#[tokio::test]
async fn fuel_on_a_host_without_metering_is_refused() {
    let module = misbehave();
    let mut task = spec(&module, json!({"action": "echo"}));
    task.limits.fuel = Some(1000);
    let report = run_failing(&mut shared_runtime().worker(0), task).await;
    assert_eq!(report.outcome.unwrap_err().kind(), ErrorKind::Internal);
}

#[tokio::test]
async fn a_panic_is_a_trap_with_the_panic_message_and_a_backtrace() {
    let module = misbehave();
    let report = run_failing(
        &mut shared_runtime().worker(0),
        spec(&module, json!({"action": "trap"})),
    )
    .await;
    match report.outcome.unwrap_err() {
        TaskError::Trap { message, backtrace } => {
            assert!(message.contains("unreachable"), "{message}");
            assert!(message.contains("guest panicked on purpose"), "{message}");
            let backtrace = backtrace.expect("backtrace");
            assert!(backtrace.contains("misbehave"), "{backtrace}");
        }
        other => panic!("expected a trap, got {other:?}"),
    }
    assert!(String::from_utf8_lossy(&report.stderr).contains("panicked"));
}

#[tokio::test]
async fn unbounded_recursion_is_a_stack_overflow_trap() {
    let module = misbehave();
    let report = run_failing(
        &mut shared_runtime().worker(0),
        spec(&module, json!({"action": "recurse"})),
    )
    .await;
    match report.outcome.unwrap_err() {
        TaskError::Trap { message, .. } => {
            assert!(message.contains("call stack exhausted"), "{message}")
        }
        other => panic!("expected a trap, got {other:?}"),
    }
}

#[tokio::test]
async fn huge_stdout_and_huge_results_are_output_too_large() {
    let module = misbehave();
    let mut worker = shared_runtime().worker(0);
    let report = run_failing(
        &mut worker,
        spec(&module, json!({"action": "stdout", "bytes": 10_000_000})),
    )
    .await;
    assert_eq!(
        report.outcome.unwrap_err(),
        TaskError::OutputTooLarge {
            stream: "stdout",
            limit: 64 << 10
        }
    );
    assert_eq!(
        report.stdout.len(),
        64 << 10,
        "captured output stops at the bound"
    );
    let report = run_failing(
        &mut worker,
        spec(&module, json!({"action": "big_result", "bytes": 5_000_000})),
    )
    .await;
    assert_eq!(
        report.outcome.unwrap_err(),
        TaskError::OutputTooLarge {
            stream: "result",
            limit: 4 << 20
        }
    );
}

#[tokio::test]
async fn guest_errors_and_init_failures_have_their_own_kinds() {
    let runtime = shared_runtime();
    let module = misbehave();
    let report = run_failing(
        &mut runtime.worker(0),
        spec(
            &module,
            json!({"action": "fail", "message": "no quote for tradeid 7"}),
        ),
    )
    .await;
    assert_eq!(
        report.outcome.unwrap_err(),
        TaskError::Guest("no quote for tradeid 7".into())
    );
    let report = run_failing(
        &mut runtime.worker(0),
        spec(&module, json!({"unknown": true})),
    )
    .await;
    assert!(
        matches!(report.outcome.unwrap_err(), TaskError::Guest(m) if m.contains("invalid payload"))
    );

    let curve = load(runtime, examples::CURVE);
    let mut task = spec(&curve, json!({"maturity": 1.0}));
    task.affinity = Some("not-a-curve".into());
    let report = run_failing(&mut runtime.worker(2), task).await;
    assert!(
        matches!(report.outcome.unwrap_err(), TaskError::InitFailed(m) if m.contains("curve=USD"))
    );
}

#[tokio::test]
async fn invalid_modules_are_rejected_with_a_reason() {
    let runtime = shared_runtime();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"definitely not wasm".to_vec(),
            "not a WebAssembly",
        ),
        (
            "truncated",
            std::fs::read(examples::NOOP).unwrap()[..1000].to_vec(),
            "not a valid component",
        ),
        (
            "no _start",
            wat::parse_str(r#"(module (func (export "f")))"#).unwrap(),
            "_start",
        ),
        (
            "foreign import",
            wat::parse_str(
                r#"(module (import "env" "launch_missiles" (func)) (func (export "_start")))"#,
            )
            .unwrap(),
            "imports",
        ),
        (
            "empty component",
            wat::parse_str("(component)").unwrap(),
            "kwq:task/task",
        ),
    ];
    for (name, bytes, expected) in cases {
        match runtime.compile(&bytes) {
            Err(TaskError::InvalidModule(reason)) => {
                assert!(reason.contains(expected), "{name}: {reason}")
            }
            Err(other) => panic!("{name}: wrong error {other:?}"),
            Ok(_) => panic!("{name}: accepted"),
        }
    }
}

#[tokio::test]
async fn an_unknown_module_fails_its_task() {
    let id = kwq::model::ModuleId::of(b"never uploaded");
    let report = run_failing(&mut shared_runtime().worker(0), spec(&id, json!({}))).await;
    assert_eq!(report.outcome.unwrap_err(), TaskError::UnknownModule(id));
}

#[tokio::test]
async fn sandbox_escapes_fail_inside_the_guest() {
    let module = misbehave();
    let mut worker = shared_runtime().worker(0);
    for payload in [
        json!({"action": "open_file", "path": "/etc/passwd"}),
        json!({"action": "open_file", "path": "Cargo.toml"}),
        json!({"action": "read_env", "name": "PATH"}),
        json!({"action": "connect", "addr": "127.0.0.1:9"}),
    ] {
        let result = run_json(&mut worker, spec(&module, payload.clone())).await;
        assert_eq!(result["escaped"], json!(false), "{payload}: {result}");
        assert!(
            result["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{payload}: {result}"
        );
    }
    // The host's own environment and files are untouched.
    assert!(std::env::var("PATH").is_ok());
    assert!(std::path::Path::new("/etc/passwd").exists());
}

#[tokio::test]
async fn a_guest_fault_leaves_the_worker_and_engine_able_to_run_the_next_task() {
    let module = misbehave();
    let mut worker = shared_runtime().worker(4);
    for bad in [
        json!({"action": "trap"}),
        json!({"action": "alloc"}),
        json!({"action": "recurse"}),
        json!({"action": "loop"}),
    ] {
        let mut task = spec(&module, bad.clone());
        task.limits.timeout = Duration::from_millis(300);
        task.affinity = Some("same-key".into());
        run_failing(&mut worker, task).await;
        let mut next = spec(&module, json!({"action": "echo", "value": bad}));
        next.affinity = Some("same-key".into());
        assert_eq!(run_json(&mut worker, next).await, bad);
    }
}

#[tokio::test]
async fn logs_progress_stdout_task_id_and_attempt_reach_the_host() {
    let module = misbehave();
    let mut worker = shared_runtime().worker(0);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let mut task = spec(&module, json!({"action": "chatty", "lines": 4}));
    task.on_progress = Some(Arc::new(move |p| sink.lock().unwrap().push(p)));
    let report = worker.run(task).await;
    assert!(report.outcome.is_ok());
    assert_eq!(report.logs.len(), 4);
    assert_eq!(report.logs[3].level, LogLevel::Info);
    assert_eq!(report.logs[3].message, "line 3");
    assert_eq!(report.progress, 1.0);
    assert_eq!(*seen.lock().unwrap(), vec![0.25, 0.5, 0.75, 1.0]);
    assert_eq!(report.stdout, b"to stdout\n");
    assert_eq!(report.stderr, b"to stderr\n");

    let mut task = spec(&module, json!({"action": "whoami"}));
    task.task_id = "task-42".into();
    task.attempt = 3;
    assert_eq!(
        run_json(&mut worker, task).await,
        json!({"task_id": "task-42", "attempt": 3})
    );
}

#[tokio::test]
async fn warm_instances_run_init_once_per_module_and_key() {
    let runtime = shared_runtime();
    let curve = load(runtime, examples::CURVE);
    let mut worker = runtime.worker(4);
    let before = worker.stats();
    for i in 1..=20u64 {
        let mut task = spec(&curve, json!({"maturity": 1.0 + i as f64 / 10.0}));
        task.affinity = Some("curve=USD".into());
        let result = run_json(&mut worker, task).await;
        assert_eq!(result["builds"], json!(1));
        assert_eq!(
            result["served"],
            json!(i),
            "the same instance served every task"
        );
        assert_eq!(result["currency"], json!("USD"));
    }
    let stats = worker.stats();
    assert_eq!(stats.inits - before.inits, 1);
    assert_eq!(stats.warm_hits - before.warm_hits, 19);
    assert!(worker.is_warm(&curve, "curve=USD"));

    // Another key gets its own instance and its own init.
    let mut task = spec(&curve, json!({"maturity": 1.0}));
    task.affinity = Some("curve=EUR".into());
    let eur = run_json(&mut worker, task).await;
    assert_eq!(
        (eur["currency"].clone(), eur["served"].clone()),
        (json!("EUR"), json!(1))
    );
    assert_eq!(worker.stats().inits - before.inits, 2);
}

#[tokio::test]
async fn warm_instances_are_bounded_per_worker_and_evicted_lru() {
    let runtime = shared_runtime();
    let curve = load(runtime, examples::CURVE);
    let mut worker = runtime.worker(2);
    for key in [
        "curve=USD",
        "curve=EUR",
        "curve=USD",
        "curve=GBP",
        "curve=EUR",
    ] {
        let mut task = spec(&curve, json!({"maturity": 2.0}));
        task.affinity = Some(key.into());
        run_json(&mut worker, task).await;
    }
    let stats = worker.stats();
    // USD, EUR cold; USD warm; GBP cold (evicts EUR); EUR cold again (evicts USD).
    assert_eq!(
        (stats.inits, stats.warm_hits, stats.warm_evictions),
        (4, 1, 2)
    );
    let keys: Vec<String> = worker.warm_keys().into_iter().map(|(_, k)| k).collect();
    assert_eq!(keys, vec!["curve=EUR".to_string(), "curve=GBP".to_string()]);
}

#[tokio::test]
async fn a_plain_wasi_preview1_command_runs_with_stdin_stdout_and_exit_code() {
    let runtime = shared_runtime();
    let bytes = std::fs::read(examples::WASI_P1_UPPER).unwrap();
    let module = runtime.compile(&bytes).unwrap();
    assert_eq!(module.kind, ModuleKind::WasiCommand);
    let mut worker = runtime.worker(0);
    let mut task = spec(&module.id, json!(null));
    task.payload = b"price the book".to_vec();
    assert_eq!(
        worker.run(task.clone()).await.outcome.unwrap(),
        b"PRICE THE BOOK"
    );
    task.payload = b"fail".to_vec();
    let report = run_failing(&mut worker, task).await;
    assert_eq!(
        report.outcome.unwrap_err(),
        TaskError::Guest("exited with code 3: asked to fail".into())
    );
}

#[tokio::test]
async fn the_wasm_pricer_agrees_with_black_scholes_within_three_standard_errors() {
    let runtime = shared_runtime();
    let pricer = load(runtime, examples::OPTION_PRICER);
    let mut worker = runtime.worker(0);
    let contracts = [
        (42.0, 40.0, 0.1, 0.2, 0.5, mc_math::OptionKind::Call),
        (42.0, 40.0, 0.1, 0.2, 0.5, mc_math::OptionKind::Put),
        (100.0, 110.0, 0.05, 0.3, 1.0, mc_math::OptionKind::Call),
        (100.0, 90.0, 0.02, 0.45, 2.0, mc_math::OptionKind::Put),
    ];
    for (i, (spot, strike, rate, vol, maturity, kind)) in contracts.into_iter().enumerate() {
        let contract = mc_math::Contract {
            spot,
            strike,
            rate,
            vol,
            maturity,
            kind,
        };
        let payload = json!({"spot": spot, "strike": strike, "rate": rate, "vol": vol, "maturity": maturity,
                             "kind": kind, "paths": 200_000, "seed": i});
        let result = run_json(&mut worker, spec(&pricer, payload)).await;
        let (price, std_error) = (
            result["price"].as_f64().unwrap(),
            result["std_error"].as_f64().unwrap(),
        );
        let exact = mc_math::black_scholes(&contract);
        assert!(
            std_error > 0.0 && (price - exact).abs() < 3.0 * std_error,
            "{contract:?}: {price} +- {std_error} vs {exact}"
        );
        assert_eq!(result["paths"], json!(200_000));
    }
    let bad = json!({"spot": -1, "strike": 40, "rate": 0.1, "vol": 0.2, "maturity": 0.5, "kind": "call", "paths": 10});
    let report = run_failing(&mut worker, spec(&pricer, bad)).await;
    assert!(matches!(report.outcome.unwrap_err(), TaskError::Guest(m) if m.contains("spot")));
}

#[tokio::test]
async fn monte_carlo_pi_estimates_pi() {
    let runtime = shared_runtime();
    let module = load(runtime, examples::MONTE_CARLO_PI);
    let result = run_json(
        &mut runtime.worker(0),
        spec(&module, json!({"samples": 200_000, "seed": 5})),
    )
    .await;
    let estimate = result["estimate"].as_f64().unwrap();
    assert!((estimate - std::f64::consts::PI).abs() < 0.02, "{result}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_task_does_not_hold_up_other_workers() {
    let runtime = shared_runtime();
    let module = misbehave();
    let mut looping = spec(&module, json!({"action": "loop"}));
    looping.limits.timeout = Duration::from_secs(3);
    let mut looper = runtime.worker(0);
    let stuck = tokio::spawn(async move { looper.run(looping).await });
    // While it spins, another worker completes many tasks.
    let mut worker = runtime.worker(0);
    for i in 0..20 {
        assert_eq!(
            run_json(
                &mut worker,
                spec(&module, json!({"action": "echo", "value": i}))
            )
            .await,
            json!(i)
        );
    }
    assert!(
        !stuck.is_finished(),
        "the loop was still running while the others completed"
    );
    assert_eq!(
        stuck.await.unwrap().outcome.unwrap_err().kind(),
        ErrorKind::Timeout
    );
}

#[test]
fn compiled_modules_survive_a_restart_through_the_disk_cache() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(examples::MONTE_CARLO_PI).unwrap();
    let config = RuntimeConfig {
        cache_dir: Some(dir.path().to_path_buf()),
        ..test_config()
    };
    let first = Runtime::new(config.clone()).unwrap();
    let compiled = first.compile(&bytes).unwrap();
    assert_eq!(first.module_stats().disk_misses, 1);
    drop((compiled, first));
    let second = Runtime::new(config).unwrap();
    second.compile(&bytes).unwrap();
    let stats = second.module_stats();
    assert_eq!(
        (stats.disk_hits, stats.disk_misses),
        (1, 0),
        "loaded from disk, not recompiled"
    );
}

#[tokio::test]
async fn the_compiled_cache_is_bounded_by_bytes_and_refills_from_the_module_source() {
    struct Files(Vec<Vec<u8>>, AtomicU32);
    impl ModuleSource for Files {
        fn module_bytes(&self, id: &kwq::model::ModuleId) -> Option<Vec<u8>> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0
                .iter()
                .find(|b| kwq::model::ModuleId::of(b) == *id)
                .cloned()
        }
    }
    let runtime = Runtime::new(RuntimeConfig {
        compiled_cache_bytes: 1,
        ..test_config()
    })
    .unwrap();
    let files = Arc::new(Files(
        vec![
            std::fs::read(examples::NOOP).unwrap(),
            std::fs::read(examples::MISBEHAVE).unwrap(),
        ],
        AtomicU32::new(0),
    ));
    runtime.set_module_source(files.clone());
    let noop = runtime.compile(&files.0[0]).unwrap().id.clone();
    runtime.compile(&files.0[1]).unwrap();
    let stats = runtime.module_stats();
    assert_eq!(
        (stats.modules, stats.evictions),
        (1, 1),
        "only the newest fits"
    );
    let mut worker = runtime.worker(0);
    let report = worker.run(spec(&noop, json!(null))).await;
    assert_eq!(report.outcome.unwrap(), b"");
    assert_eq!(
        files.1.load(Ordering::SeqCst),
        1,
        "the evicted module was fetched again"
    );
    assert!(runtime.module_stats().misses >= 1);
}
