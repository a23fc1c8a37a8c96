//! The flags of the machines that run tasks, shared by `kwq serve` and
//! `kwq worker` so both size and limit their workers the same way.

use super::parse;
use crate::runtime::RuntimeConfig;
use crate::server::DispatchConfig;
use std::path::Path;

/// How many tasks run at once here, and with what memory and metering.
#[derive(Debug, clap::Args)]
pub(super) struct ComputeFlags {
    /// Tasks run at once (default: number of cores; `kwq serve --workers 0`
    /// runs none, as a scheduler/API host for worker machines).
    #[arg(long, env = "KWQ_WORKERS")]
    pub(super) workers: Option<usize>,
    /// Warm instances kept per worker.
    #[arg(long, default_value_t = 16)]
    max_warm: usize,
    /// An instance whose linear memory grew beyond this (e.g. 256MiB) is not
    /// kept warm: its memory is given back when its task ends.
    #[arg(long, value_parser = parse::bytes, default_value = "64MiB")]
    max_warm_memory: u64,
    /// Meter fuel so tasks may carry a fuel budget.
    #[arg(long)]
    fuel: bool,
    /// Guest memory the tasks running at once may ask for together (their
    /// memory_bytes summed), e.g. 12GiB (default: 3/4 of the machine's memory).
    #[arg(long, env = "KWQ_MEMORY_BUDGET", value_parser = parse::bytes)]
    memory_budget: Option<u64>,
    /// Modules compiled at once; more wait their turn. Each compile already
    /// uses every core, and a large component (a 19 MB Python one) takes
    /// hundreds of MB while it compiles.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    compile_concurrency: u32,
}

impl ComputeFlags {
    /// The worker pool these flags ask for.
    pub(super) fn dispatch(&self) -> DispatchConfig {
        let mut dispatch = DispatchConfig {
            max_warm: self.max_warm,
            ..DispatchConfig::default()
        };
        if let Some(workers) = self.workers {
            dispatch.workers = workers;
        }
        if let Some(budget) = self.memory_budget {
            dispatch.memory_budget = budget;
        }
        dispatch
    }

    /// The runtime these flags ask for, compiling into `data_dir/compiled`.
    pub(super) fn runtime(&self, data_dir: &Path, perf_map: bool) -> RuntimeConfig {
        RuntimeConfig {
            cache_dir: Some(data_dir.join("compiled")),
            fuel: self.fuel,
            perf_map,
            max_warm_memory_bytes: self.max_warm_memory,
            compile_concurrency: self.compile_concurrency as usize,
            ..RuntimeConfig::default()
        }
    }
}
