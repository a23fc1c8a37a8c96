//! `kwq dev [DIR]`: the inner loop. Build the project, run its task locally
//! on its payload and print the result; then watch the sources and do it
//! again whenever one changes. No server, no upload.
//!
//! Watching is by polling file times and sizes (every 300 ms) rather than
//! inotify: it behaves the same on every file system, including network
//! mounts and containers' bind mounts, and a project is a handful of files.

use super::CliError;
use super::project::build_project;
use crate::model::TaskLimits;
use crate::runtime::{Runtime, RuntimeConfig, TaskSpec};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Arguments of `kwq dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The project directory (the one with kwq.toml).
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The payload: JSON text or @FILE (default: the project's payload.json;
    /// `-` reads stdin once per run, so it suits only `--builds 1`).
    #[arg(long, short)]
    payload: Option<String>,
    /// Stop after this many builds (default: until interrupted).
    #[arg(long)]
    builds: Option<u32>,
}

/// How often the sources are looked at.
const POLL: Duration = Duration::from_millis(300);
/// Directories that are outputs or tool caches, not sources.
const NOT_SOURCES: &[&str] = &["dist", "target", "node_modules", "__pycache__", ".git"];

/// Run `kwq dev`.
pub(super) fn run(args: DevArgs) -> Result<(), CliError> {
    let runtime =
        Runtime::new(RuntimeConfig::default()).map_err(|e| CliError::failed(e.to_string()))?;
    let rt = super::tokio_runtime()?;
    let mut builds = 0;
    loop {
        let seen = sources(&args.dir);
        match build_and_run(&runtime, &rt, &args) {
            Ok(result) => println!("{result}"),
            Err(error) => eprintln!("error: {}", error.message.replace('\n', " ")),
        }
        builds += 1;
        if args.builds.is_some_and(|max| builds >= max) {
            return Ok(());
        }
        eprintln!(
            "watching {} for changes (Ctrl-C to stop)",
            args.dir.display()
        );
        while sources(&args.dir) == seen {
            std::thread::sleep(POLL);
        }
    }
}

/// One turn: build, compile, run on a fresh instance; the result as text.
fn build_and_run(
    runtime: &Runtime,
    rt: &tokio::runtime::Runtime,
    args: &DevArgs,
) -> Result<String, CliError> {
    let module_path = build_project(&args.dir)?;
    let bytes = std::fs::read(&module_path)
        .map_err(|e| CliError::failed(format!("cannot read {}: {e}", module_path.display())))?;
    let default_payload = format!("@{}", args.dir.join("payload.json").display());
    let payload = super::run::read_payload(args.payload.as_deref().unwrap_or(&default_payload))?;
    let module = runtime
        .compile(&bytes)
        .map_err(|e| CliError::usage(format!("{}: {e}", module_path.display())))?;
    let mut worker = runtime.worker(1);
    let report = rt.block_on(worker.run(TaskSpec {
        task_id: "dev".into(),
        attempt: 1,
        module: module.id.clone(),
        payload,
        affinity: None,
        limits: TaskLimits::default(),
        on_progress: None,
        input: None,
    }));
    for line in &report.logs {
        eprintln!("[{:?}] {}", line.level, line.message);
    }
    let result = report
        .outcome
        .map_err(|e| CliError::failed(format!("task failed ({}): {e}", e.kind().as_str())))?;
    Ok(String::from_utf8_lossy(&result).into_owned())
}

/// Every source file under `dir` with its modification time and size.
fn sources(dir: &Path) -> Vec<(PathBuf, SystemTime, u64)> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                let name = entry.file_name();
                if !NOT_SOURCES.iter().any(|n| name == *n) {
                    pending.push(path);
                }
            } else if let Ok(modified) = meta.modified() {
                found.push((path, modified, meta.len()));
            }
        }
    }
    found.sort();
    found
}
