//! The `kwq` command line. Exit codes: 0 success, 1 the task (or service)
//! failed, 2 bad input (unreadable file, invalid module, bad flag value).

mod bench;
mod bench_fanin;
mod bench_grid;
mod bench_invoke;
mod bench_kafka;
mod bench_membership;
mod bench_modules;
mod bench_sweep;
mod bench_workers;
mod bench_workflow;
mod client;
mod compute;
mod dev;
mod local_grid;
mod parse;
mod project;
mod run;
mod serve;
mod simulate;
mod worker;
mod workflow;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// KWQ: a WebAssembly compute grid.
#[derive(Debug, Parser)]
#[command(name = "kwq", version, about)]
pub struct Cli {
    /// Log lines as text for people or JSON for log pipelines (filter: KWQ_LOG).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "KWQ_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Make Wasm guest code visible to `perf` (`perfmap`: function names in
    /// `perf report`), for `run`, `serve` and `bench runtime`.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "none",
        env = "KWQ_WASM_PROFILER"
    )]
    pub wasm_profiler: WasmProfiler,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, with the task's fields.
    Json,
}

/// Which profiling agent the Wasm engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WasmProfiler {
    /// None: guest code shows in `perf` as unnamed addresses.
    None,
    /// Write `/tmp/perf-PID.map` with the compiled guest functions.
    Perfmap,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a grid host: store, workers and the HTTP API.
    Serve(serve::ServeArgs),
    /// Run a worker machine: lease tasks from a scheduler host over HTTP
    /// and run them here.
    Worker(worker::WorkerArgs),
    /// Run one task module locally, without a server, and print its result.
    Run(run::RunArgs),
    /// Start a task project in Rust, Python or JavaScript (an option pricer
    /// with its test, the SDK and the WIT contract).
    New(project::NewArgs),
    /// Build the task project in DIR (default .) into dist/NAME.wasm, with
    /// the language's own tool.
    Build(project::BuildArgs),
    /// Build the task project in DIR and run it on its payload.json; again
    /// whenever a source file changes (the inner loop, no server).
    Dev(dev::DevArgs),
    /// Upload or list modules on a server.
    Module {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// What to do.
        #[command(subcommand)]
        command: client::ModuleCommand,
    },
    /// Submit one task to a server; prints its id.
    Submit {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// Task options.
        #[command(flatten)]
        task: client::TaskFlags,
        /// The payload: JSON text, @FILE, or - for stdin.
        #[arg(long, short, default_value = "null")]
        payload: String,
        /// Wait up to this long (e.g. 2s) for the task to finish and print
        /// its result instead of its id (exit 1 if it died); if it is still
        /// running then, print its id as without --wait.
        #[arg(long, value_parser = parse::duration)]
        wait: Option<std::time::Duration>,
        /// With --wait: do not queue the task on disk while waiting (it
        /// and its result are written once; the answer does not wait for
        /// that write). Faster; on a host crash the call fails instead.
        #[arg(long, requires = "wait")]
        not_durable: bool,
        /// A fan-in task: wait for JOB, then read its results as the input
        /// (in place of a payload), a page at a time while it runs. The
        /// embedded store only.
        #[arg(long, value_name = "JOB", conflicts_with_all = ["payload", "wait"])]
        results_of: Option<String>,
    },
    /// Submit, pause, resume, cancel or list jobs.
    Job {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// What to do.
        #[command(subcommand)]
        command: client::JobCommand,
    },
    /// Show a task (with its timeline) or a job.
    Status {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// Task id or job id.
        id: String,
    },
    /// Follow a job with a progress bar until it finishes.
    Watch {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// Job id.
        id: String,
    },
    /// Stream a job's results as NDJSON.
    Results {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// Job id.
        id: String,
    },
    /// Run a workflow: tasks and jobs that wait for each other, from a file.
    Workflow {
        /// Server connection.
        #[command(flatten)]
        connection: client::Connection,
        /// What to do.
        #[command(subcommand)]
        command: workflow::WorkflowCommand,
    },
    /// Size a grid: run a synthetic job of sleep tasks on a local grid
    /// and print throughput, efficiency and latency.
    Simulate {
        /// Tasks in the job.
        #[arg(long, default_value_t = 1000)]
        tasks: u64,
        /// How long each task sleeps, in ms.
        #[arg(long, default_value_t = 50)]
        duration: u64,
        /// Workers.
        #[arg(long, default_value_t = 8)]
        workers: usize,
    },
    /// Measure KWQ on this machine and print a table.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// A CLI failure: what to print and which exit code to use.
#[derive(Debug)]
pub struct CliError {
    /// 1: the task or service failed; 2: the user's input is wrong.
    pub code: u8,
    /// One readable line.
    pub message: String,
}

impl CliError {
    /// The user's input is wrong (exit code 2).
    pub fn usage(message: impl Into<String>) -> Self {
        CliError {
            code: 2,
            message: message.into(),
        }
    }

    /// The task or the service failed (exit code 1).
    pub fn failed(message: impl Into<String>) -> Self {
        CliError {
            code: 1,
            message: message.into(),
        }
    }
}

/// Run a parsed command line and turn its outcome into an exit code.
pub fn main(cli: Cli) -> ExitCode {
    // A server logs what it does; one-shot commands only what went wrong.
    init_logging(
        if matches!(cli.command, Command::Serve(_) | Command::Worker(_)) {
            "info"
        } else {
            "warn"
        },
        cli.log_format,
    );
    let perf_map = cli.wasm_profiler == WasmProfiler::Perfmap;
    let outcome = match cli.command {
        Command::Serve(args) => serve::run(args, perf_map),
        Command::Worker(args) => worker::run(args, perf_map),
        Command::Run(args) => run::run(args, perf_map),
        Command::New(args) => project::new(args),
        Command::Build(args) => project::build(args),
        Command::Dev(args) => dev::run(args),
        Command::Module {
            connection,
            command,
        } => client::module(connection, command),
        Command::Submit {
            connection,
            task,
            payload,
            wait,
            not_durable,
            results_of,
        } => client::submit(connection, task, payload, wait, !not_durable, results_of),
        Command::Job {
            connection,
            command,
        } => client::job(connection, command),
        Command::Status { connection, id } => client::status(connection, id),
        Command::Watch { connection, id } => client::watch(connection, id),
        Command::Results { connection, id } => client::results(connection, id),
        Command::Workflow {
            connection,
            command,
        } => workflow::workflow(connection, command),
        Command::Simulate {
            tasks,
            duration,
            workers,
        } => simulate::run(tasks, duration, workers),
        Command::Bench(command) => bench::run(command, perf_map),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error.message.replace('\n', " "));
            ExitCode::from(error.code)
        }
    }
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KWQ_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// A tokio runtime for a CLI command.
fn tokio_runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::failed(format!("cannot start the async runtime: {e}")))
}
