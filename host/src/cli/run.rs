//! `kwq run MODULE --payload ...`: run a task locally, no server needed.

use super::{CliError, parse, tokio_runtime};
use crate::model::{ModuleId, TaskLimits};
use crate::runtime::{Runtime, RuntimeConfig, TaskReport, TaskSpec};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `kwq run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The module file: a component built with kwq-guest, or a WASI preview-1 command.
    module: PathBuf,
    /// The payload: text, `@FILE` to read a file, or `-` for stdin.
    #[arg(long, short, default_value = "")]
    payload: String,
    /// Wall-clock limit per task, e.g. 30s or 500ms.
    #[arg(long, value_parser = parse::duration, default_value = "60s")]
    timeout: Duration,
    /// Linear memory cap, e.g. 256MiB.
    #[arg(long, value_parser = parse::bytes, default_value = "256MiB")]
    memory: u64,
    /// Fuel budget (about one unit per Wasm instruction); enables metering.
    #[arg(long)]
    fuel: Option<u64>,
    /// Affinity key: the instance's `init` gets it and stays warm across --repeat runs.
    #[arg(long)]
    affinity: Option<String>,
    /// Run the task N times on one worker and report per-task timing.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
    /// Print the guest's log lines, stdout and stderr to stderr.
    #[arg(long)]
    show_logs: bool,
    /// Where compiled modules are cached across runs (default: ~/.cache/kwq/compiled).
    #[arg(long, env = "KWQ_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

/// Run `kwq run`.
pub(super) fn run(args: RunArgs, perf_map: bool) -> Result<(), CliError> {
    let bytes = std::fs::read(&args.module).map_err(|e| {
        CliError::usage(format!("cannot read module {}: {e}", args.module.display()))
    })?;
    let payload = read_payload(&args.payload)?;
    let config = RuntimeConfig {
        cache_dir: match args.cache_dir.clone().or_else(default_cache_dir) {
            Some(dir) => Some(super::parse::absolute(&dir)?),
            None => None,
        },
        fuel: args.fuel.is_some(),
        perf_map,
        ..RuntimeConfig::default()
    };
    let runtime = Runtime::new(config).map_err(|e| CliError::failed(e.to_string()))?;
    let module = runtime
        .compile(&bytes)
        .map_err(|e| CliError::usage(format!("{}: {e}", args.module.display())))?;
    let limits = TaskLimits {
        timeout: args.timeout,
        memory_bytes: args.memory,
        fuel: args.fuel,
        ..TaskLimits::default()
    };
    let reports = tokio_runtime()?.block_on(run_repeated(
        &runtime,
        module.id.clone(),
        payload,
        &args,
        limits,
    ));
    if args.repeat > 1 {
        print_timing(&reports);
    }
    let last = reports.last().expect("at least one run");
    if args.show_logs {
        show_logs(last);
    }
    match &last.outcome {
        Ok(result) => {
            let mut out = std::io::stdout().lock();
            let newline = if result.ends_with(b"\n") {
                &b""[..]
            } else {
                &b"\n"[..]
            };
            out.write_all(result)
                .and_then(|()| out.write_all(newline))
                .map_err(|e| CliError::failed(format!("cannot write the result: {e}")))
        }
        Err(error) => Err(CliError::failed(format!(
            "task failed ({}): {error}",
            error.kind()
        ))),
    }
}

async fn run_repeated(
    runtime: &Runtime,
    module: ModuleId,
    payload: Vec<u8>,
    args: &RunArgs,
    limits: TaskLimits,
) -> Vec<TaskReport> {
    let mut worker = runtime.worker(4);
    let mut reports = Vec::with_capacity(args.repeat as usize);
    for attempt in 0..args.repeat {
        let spec = TaskSpec {
            task_id: format!("local-{}", attempt + 1),
            attempt: 1,
            module: module.clone(),
            payload: payload.clone(),
            affinity: args.affinity.clone(),
            limits: limits.clone(),
            on_progress: None,
            input: None,
        };
        let report = worker.run(spec).await;
        let failed = report.outcome.is_err();
        reports.push(report);
        if failed {
            break;
        }
    }
    reports
}

/// A payload argument: text, `@FILE`, or `-` for stdin (`kwq run`,
/// `kwq dev`, `kwq bench modules`).
pub(super) fn read_payload(arg: &str) -> Result<Vec<u8>, CliError> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?;
        return Ok(buf);
    }
    if let Some(path) = arg.strip_prefix('@') {
        return std::fs::read(path)
            .map_err(|e| CliError::usage(format!("cannot read payload file {path}: {e}")));
    }
    Ok(arg.as_bytes().to_vec())
}

/// `$XDG_CACHE_HOME/kwq/compiled` or `~/.cache/kwq/compiled`, or none
/// without a home directory. A relative `XDG_CACHE_HOME` is taken against
/// the working directory (by the caller), an empty one is ignored.
fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|dir| !dir.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("kwq").join("compiled"))
}

fn show_logs(report: &TaskReport) {
    for line in &report.logs {
        eprintln!("[{:?}] {}", line.level, line.message);
    }
    for (name, bytes) in [("stdout", &report.stdout), ("stderr", &report.stderr)] {
        if !bytes.is_empty() {
            eprintln!(
                "--- guest {name} ---\n{}",
                String::from_utf8_lossy(bytes).trim_end()
            );
        }
    }
}

fn print_timing(reports: &[TaskReport]) {
    let mut micros: Vec<f64> = reports
        .iter()
        .map(|r| r.elapsed.as_secs_f64() * 1e6)
        .collect();
    micros.sort_by(f64::total_cmp);
    let pick = |q: f64| micros[((micros.len() - 1) as f64 * q).round() as usize];
    let mean = micros.iter().sum::<f64>() / micros.len() as f64;
    let warm = reports.iter().filter(|r| r.warm).count();
    eprintln!(
        "{} runs ({} warm): mean {:.1} us, p50 {:.1} us, p99 {:.1} us, min {:.1} us, max {:.1} us",
        reports.len(),
        warm,
        mean,
        pick(0.5),
        pick(0.99),
        micros[0],
        micros[micros.len() - 1]
    );
}
