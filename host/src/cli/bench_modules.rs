//! `kwq bench modules FILE...`: what a task module costs, whatever language
//! it was written in: its size, its first compile (no cache), and the time
//! per task on a fresh instance (cold: instantiate, `init`, run) and on a
//! warm one (reused after `init`), on one core.

use super::CliError;
use super::bench::time_tasks;
use crate::runtime::{Runtime, RuntimeConfig};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Arguments of `kwq bench modules`.
#[derive(Debug, clap::Args)]
pub struct ModulesBench {
    /// The modules to measure (e.g. the dist/NAME.wasm of `kwq build`).
    #[arg(required = true)]
    modules: Vec<PathBuf>,
    /// The payload every task gets: JSON text, @FILE, or - for stdin.
    #[arg(long, short, default_value = "null")]
    payload: String,
    /// Tasks timed per measurement (after a warm-up of as many, at most 200).
    #[arg(long, default_value_t = 50)]
    tasks: u32,
}

/// One module's figures.
struct Figures {
    size: usize,
    compile: Duration,
    cold: Duration,
    warm: Duration,
}

/// Run `kwq bench modules`.
pub(super) fn run(bench: ModulesBench) -> Result<(), CliError> {
    let payload = super::run::read_payload(&bench.payload)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(e.to_string()))?;
    println!("KWQ module benchmark ({})", super::bench::machine());
    println!(
        "{:<36} {:>10} {:>14} {:>14} {:>14}",
        "module", "size", "first compile", "cold task", "warm task"
    );
    for path in &bench.modules {
        let bytes = std::fs::read(path)
            .map_err(|e| CliError::usage(format!("cannot read {}: {e}", path.display())))?;
        let figures = rt.block_on(measure(&bytes, &payload, bench.tasks))?;
        println!(
            "{:<36} {:>7.2} MB {:>11.0} ms {:>11.2} ms {:>11.3} ms",
            path.display().to_string(),
            figures.size as f64 / 1e6,
            figures.compile.as_secs_f64() * 1e3,
            figures.cold.as_secs_f64() * 1e3,
            figures.warm.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}

async fn measure(bytes: &[u8], payload: &[u8], tasks: u32) -> Result<Figures, CliError> {
    // A runtime of its own, without the on-disk cache: a real first compile.
    let runtime =
        Runtime::new(RuntimeConfig::default()).map_err(|e| CliError::failed(e.to_string()))?;
    let started = Instant::now();
    let module = runtime
        .compile(bytes)
        .map_err(|e| CliError::usage(e.to_string()))?;
    let compile = started.elapsed();
    let mut worker = runtime.worker(2);
    let cold = time_tasks(&mut worker, &module.id, payload, None, tasks).await?;
    let warm = time_tasks(&mut worker, &module.id, payload, Some("bench"), tasks).await?;
    Ok(Figures {
        size: bytes.len(),
        compile,
        cold,
        warm,
    })
}
