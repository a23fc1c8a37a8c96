//! `kwq worker`: a worker machine. It runs the dispatcher and Wasm runtime
//! of `kwq serve` against a scheduler host's worker protocol, so compute
//! grows by adding machines while one host keeps the store.

use super::{CliError, parse};
use crate::server::{RemoteConfig, WorkerConfig, WorkerHost};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `kwq worker`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The scheduler host's URL (a `kwq serve`, e.g. one run with --workers 0).
    #[arg(long, env = "KWQ_SERVER")]
    server: String,
    /// Workers (slots), memory and metering of the tasks run here.
    #[command(flatten)]
    compute: super::compute::ComputeFlags,
    /// This machine's name on the host's dashboard (default: the hostname).
    #[arg(long, env = "KWQ_WORKER_NAME")]
    name: Option<String>,
    /// The host's worker token (its --worker-token; or its --token if it has
    /// no worker token).
    #[arg(long, env = "KWQ_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// Where fetched modules and compiled code are cached.
    #[arg(long, env = "KWQ_DATA_DIR", default_value = "kwq-worker-data")]
    data_dir: PathBuf,
}

/// Run `kwq worker` until Ctrl-C or SIGTERM.
pub(super) fn run(args: WorkerArgs, perf_map: bool) -> Result<(), CliError> {
    let server = args.server.trim_end_matches('/').to_string();
    if !(server.starts_with("http://") || server.starts_with("https://")) {
        return Err(CliError::usage(format!(
            "--server {server:?}: must be an http:// or https:// URL"
        )));
    }
    let data_dir = parse::absolute(&args.data_dir)?;
    if args.compute.workers == Some(0) {
        return Err(CliError::usage(
            "--workers: a worker machine needs at least 1",
        ));
    }
    let dispatch = args.compute.dispatch();
    let name = args.name.unwrap_or_else(super::serve::hostname);
    let config = WorkerConfig {
        remote: RemoteConfig {
            server: server.clone(),
            token: args.worker_token,
            name,
            slots: dispatch.workers,
            module_dir: Some(data_dir.join("modules")),
        },
        runtime: args.compute.runtime(&data_dir, perf_map),
        dispatch,
    };
    let rt = super::tokio_runtime()?;
    rt.block_on(async move {
        let shutdown = tokio::spawn(super::serve::shutdown_signal());
        let slots = config.dispatch.workers;
        let worker = WorkerHost::start(config)
            .await
            .map_err(|e| CliError::failed(format!("{e:#}")))?;
        let id = worker.worker_id().unwrap_or_else(|| "(registering)".into());
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "kwq worker {id} running {slots} workers for {server}");
        let _ = out.flush();
        drop(out);
        let _ = shutdown.await;
        worker
            .stop()
            .await
            .map_err(|e| CliError::failed(format!("{e:#}")))
    })
}
