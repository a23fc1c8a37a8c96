//! `kwq serve`: run a grid host.

use super::{CliError, parse};
use crate::queue::embedded::EmbeddedConfig;
use crate::server::{HostRole, ServerConfig, StoreUrl};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `kwq serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KWQ_LISTEN", default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Where tasks live: sqlite://PATH (default: DATA_DIR/kwq.db), or
    /// kafka://HOST:PORT[,HOST:PORT...][?prefix=kwq.&partitions=4&replication=1]
    /// to join a grid shared through Kafka (this host's view is DATA_DIR/view.db).
    #[arg(long, env = "KWQ_STORE")]
    store: Option<String>,
    /// What this host of a Kafka grid does: `all` (run tasks and serve the
    /// API), `api` (serve the API and dashboard from its view, run no
    /// tasks) or `worker` (run tasks only: it reads no event topic, keeps no
    /// view and serves only health, metrics and /v1/workers). Hosts on the
    /// embedded store are always `all`.
    #[arg(long, env = "KWQ_ROLE", default_value = "all")]
    role: HostRole,
    /// Directory for the store and the compiled-module cache.
    #[arg(long, env = "KWQ_DATA_DIR", default_value = "kwq-data")]
    data_dir: PathBuf,
    /// Workers, memory and metering of the tasks run here.
    #[command(flatten)]
    compute: super::compute::ComputeFlags,
    /// Bearer token required on every write endpoint.
    #[arg(long, env = "KWQ_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Require the token on reads of the grid's data too (tasks, payloads,
    /// results, jobs, modules, events, statistics, metrics); health, the
    /// dashboard page and the API documentation stay open.
    #[arg(long, env = "KWQ_TOKEN_READS", requires = "token")]
    token_reads: bool,
    /// Upload the bundled example modules at start.
    #[arg(long)]
    examples: bool,
    /// How long a task waits for the worker that is warm for its affinity key.
    #[arg(long, value_parser = parse::duration, default_value = "500ms")]
    affinity_window: Duration,
    /// Waiting this long raises a task's effective priority by one.
    #[arg(long, value_parser = parse::duration, default_value = "30s")]
    aging: Duration,
    /// This host's name in worker ids (default: the machine's hostname); each
    /// host of a Kafka grid needs its own.
    #[arg(long, env = "KWQ_HOST")]
    host: Option<String>,
    /// A name clients reach this host by (repeatable). On a loopback
    /// --listen address only localhost names and the address itself are
    /// answered (a guard against DNS rebinding); on any other address every
    /// name is, unless some are given here.
    #[arg(
        long = "allowed-host",
        env = "KWQ_ALLOWED_HOSTS",
        value_delimiter = ','
    )]
    allowed_hosts: Vec<String>,
    /// What a commit of the embedded store survives: `power` (fsync every
    /// commit: power loss and OS crashes) or `process` (a crash or kill -9
    /// of kwq, not of the machine; much lower latency on slow-fsync disks).
    #[arg(long, value_enum, default_value = "power", env = "KWQ_DURABILITY")]
    durability: crate::queue::embedded::Durability,
    /// Bearer token of the worker protocol (/v1/workers): what `kwq worker
    /// --worker-token` sends. Without it, workers send --token (if set).
    #[arg(long, env = "KWQ_WORKER_TOKEN", hide_env_values = true)]
    worker_token: Option<String>,
    /// A remote worker's lease not renewed by a heartbeat for this long goes
    /// to another worker (its late results are refused).
    #[arg(long, value_parser = parse::duration, default_value = "30s")]
    worker_lease: Duration,
}

/// Run `kwq serve`.
pub(super) fn run(args: ServeArgs, perf_map: bool) -> Result<(), CliError> {
    let host = args.host.clone().unwrap_or_else(hostname);
    // Every path is made absolute once, here, against the working directory:
    // wasmtime's compile cache refuses relative paths, and a later change of
    // directory must not move the store.
    let data_dir = parse::absolute(&args.data_dir)?;
    let mut store = match &args.store {
        Some(url) => StoreUrl::parse(url).map_err(|e| CliError::usage(e.to_string()))?,
        None => StoreUrl::Sqlite(data_dir.join("kwq.db")),
    };
    match &mut store {
        StoreUrl::Sqlite(_) if args.role != HostRole::All => {
            return Err(CliError::usage(format!(
                "--role {} needs a kafka:// store; a host on the embedded store does everything",
                args.role.as_str()
            )));
        }
        StoreUrl::Sqlite(path) => *path = parse::absolute(path)?,
        StoreUrl::Kafka(kafka) => {
            kafka.view_path = data_dir.join("view.db");
            kafka.host = host.clone();
            kafka.role = args.role;
        }
    }
    let config = ServerConfig {
        store,
        runtime: args.compute.runtime(&data_dir, perf_map),
        dispatch: args.compute.dispatch(),
        queue: EmbeddedConfig {
            affinity_window: args.affinity_window,
            aging: args.aging,
            durability: args.durability,
            ..EmbeddedConfig::default()
        },
        token: args.token,
        token_reads: args.token_reads,
        examples: args.examples,
        limits: Default::default(),
        host,
        allowed_hosts: crate::api::AllowedHosts::for_listener(args.listen, &args.allowed_hosts),
        remote: crate::server::RemoteWorkers {
            token: args.worker_token,
            lease_ttl: args.worker_lease,
        },
    };
    let rt = super::tokio_runtime()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| CliError::usage(format!("cannot listen on {}: {e}", args.listen)))?;
        let store = config.store.describe();
        let role = config.role();
        let workers = if role.runs_tasks() {
            config.dispatch.workers
        } else {
            0
        };
        // Signals are watched from before the start, so a SIGTERM during a
        // slow start (compiling the examples) still stops the host cleanly.
        let shutdown = tokio::spawn(shutdown_signal());
        let host = crate::server::Host::start(config, listener)
            .await
            .map_err(|e| CliError::failed(format!("{e:#}")))?;
        // Only now is every part up: store, runtime, workers, listener.
        let address = host.address();
        // Written, not printed: a host must keep serving when whoever
        // started it has closed its stdout (println! would panic).
        let mut out = std::io::stdout().lock();
        if role.keeps_view() {
            let _ = writeln!(out, "kwq serving on http://{address} | dashboard http://{address}/ | API http://{address}/v1 | docs http://{address}/docs");
        } else {
            let _ = writeln!(out, "kwq worker host on http://{address} | health http://{address}/healthz | metrics http://{address}/metrics (no API here: ask an API host)");
        }
        let _ = writeln!(out, "store: {store}, workers: {workers}");
        let _ = out.flush();
        drop(out);
        let _ = shutdown.await;
        host.stop()
            .await
            .map_err(|e| CliError::failed(format!("{e:#}")))
    })
}

/// Ctrl-C or SIGTERM.
pub(super) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    let _ = writeln!(std::io::stderr(), "shutting down: finishing running tasks");
}

pub(super) fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into())
}
