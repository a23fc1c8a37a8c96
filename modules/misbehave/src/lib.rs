//! A test task that does whatever bad (or good) thing its payload asks for,
//! so the host's limits, error kinds and sandbox can be tested against a
//! real guest: `{"action": "trap"}`, `{"action": "sleep", "ms": 5000}`, ...

use serde::Deserialize;
use serde_json::{Value, json};
use std::io::Write;

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Action {
    /// Return the payload's `value` (or null), after sleeping `ms` if given
    /// (so a test can pace a job: a no-op runs faster than some tests can
    /// act while it runs).
    Echo {
        value: Option<Value>,
        ms: Option<u64>,
    },
    /// Sleep through WASI clocks (a host call, not a busy loop).
    Sleep { ms: u64 },
    /// Return an error message (a graceful failure).
    Fail { message: Option<String> },
    /// Fail on every attempt before `succeed_on`, then succeed.
    FailUntilAttempt { succeed_on: u32 },
    /// Panic, which traps.
    Trap,
    /// Spin forever.
    Loop,
    /// Allocate without bound.
    Alloc,
    /// Touch `bytes` bytes of fresh memory, free them and succeed (the
    /// instance's linear memory stays grown).
    Touch { bytes: usize },
    /// Recurse without bound.
    Recurse,
    /// Write `bytes` bytes to stdout.
    Stdout { bytes: usize },
    /// Return a result of `bytes` bytes.
    BigResult { bytes: usize },
    /// Try to open a file.
    OpenFile { path: String },
    /// Try to read an environment variable and list them all.
    ReadEnv { name: String },
    /// Try to open a TCP connection.
    Connect { addr: String },
    /// Log a line and report progress, then succeed.
    Chatty { lines: u32 },
    /// Report the task id and attempt the host passed in.
    Whoami,
    /// Report the wall-clock time the task started, in microseconds since
    /// the epoch (for measuring submit-to-start latency).
    Clock,
}

fn run(action: Action) -> Result<Value, String> {
    match action {
        Action::Echo { value, ms } => {
            if let Some(ms) = ms {
                std::thread::sleep(std::time::Duration::from_millis(ms));
            }
            Ok(value.unwrap_or(Value::Null))
        }
        Action::Sleep { ms } => {
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(json!({ "slept_ms": ms }))
        }
        Action::Fail { message } => Err(message.unwrap_or_else(|| "asked to fail".into())),
        Action::FailUntilAttempt { succeed_on } => {
            let attempt = kwq_guest::attempt();
            if attempt < succeed_on {
                Err(format!("attempt {attempt} fails on purpose"))
            } else {
                Ok(json!({ "attempt": attempt }))
            }
        }
        Action::Trap => panic!("guest panicked on purpose"),
        Action::Loop => {
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        Action::Alloc => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        Action::Touch { bytes } => {
            let block = std::hint::black_box(vec![1u8; bytes]);
            Ok(json!({ "touched": block.iter().map(|b| *b as usize).sum::<usize>() }))
        }
        Action::Recurse => Ok(json!({ "depth": recurse(std::hint::black_box(1)) })),
        Action::Stdout { bytes } => {
            let chunk = vec![b'x'; 64 * 1024];
            let mut out = std::io::stdout();
            let mut left = bytes;
            while left > 0 {
                let n = left.min(chunk.len());
                out.write_all(&chunk[..n])
                    .map_err(|e| format!("stdout write failed: {e}"))?;
                left -= n;
            }
            Ok(json!({ "wrote": bytes }))
        }
        Action::BigResult { bytes } => Ok(Value::String("y".repeat(bytes))),
        Action::OpenFile { path } => Ok(match std::fs::read(&path) {
            Ok(contents) => json!({ "escaped": true, "bytes": contents.len() }),
            Err(e) => json!({ "escaped": false, "error": e.to_string() }),
        }),
        Action::ReadEnv { name } => {
            let all: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
            Ok(match std::env::var(&name) {
                Ok(value) => json!({ "escaped": true, "value": value, "all": all }),
                Err(e) => json!({ "escaped": !all.is_empty(), "error": e.to_string(), "all": all }),
            })
        }
        Action::Connect { addr } => Ok(match std::net::TcpStream::connect(&addr) {
            Ok(_) => json!({ "escaped": true }),
            Err(e) => json!({ "escaped": false, "error": e.to_string() }),
        }),
        Action::Chatty { lines } => {
            for i in 0..lines {
                kwq_guest::info(format!("line {i}"));
                kwq_guest::progress((i + 1) as f32 / lines as f32);
            }
            eprintln!("to stderr");
            println!("to stdout");
            Ok(json!({ "lines": lines }))
        }
        Action::Whoami => {
            Ok(json!({ "task_id": kwq_guest::task_id(), "attempt": kwq_guest::attempt() }))
        }
        Action::Clock => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_err(|e| e.to_string())?;
            Ok(json!({ "started_us": now.as_micros() as u64 }))
        }
    }
}

/// Recurses until the Wasm call stack is exhausted: the locals live on the
/// Wasm stack (not Rust's shadow stack in linear memory), so the engine's
/// stack limit is what stops it.
fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    recurse(std::hint::black_box(depth + 1)).wrapping_add(depth)
}

kwq_guest::task!(run);
