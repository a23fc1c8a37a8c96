//! A throwaway grid host inside the CLI process, for `kwq bench grid` and
//! `kwq simulate`: a temporary embedded store (or a view of a Kafka grid), the bundled modules, workers,
//! and the HTTP API on an ephemeral 127.0.0.1 port.

use super::CliError;
use crate::api::AllowedHosts;
use crate::queue::Queue;
use crate::queue::kafka::KafkaConfig;
use crate::runtime::RuntimeConfig;
use crate::server::{DispatchConfig, Host, ServerConfig, StoreUrl, Tracker};
use std::path::PathBuf;
use std::sync::Arc;

pub(super) fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::failed(e.to_string())
}

/// A host assembled by [`Host::start`], as `kwq serve` is, in a temporary
/// directory that is deleted when it stops.
pub(super) struct LocalGrid {
    pub(super) url: String,
    pub(super) queue: Arc<dyn Queue>,
    pub(super) tracker: Arc<Tracker>,
    pub(super) workers: usize,
    host: Host,
    dir: PathBuf,
}

impl LocalGrid {
    /// Start with `workers` workers (default: cores) and every bundled module.
    pub(super) async fn start(workers: Option<usize>) -> Result<Self, CliError> {
        Self::start_on(workers, None).await
    }

    /// As `start`, on a Kafka grid when `kafka` is given (its view goes in
    /// the temporary directory).
    pub(super) async fn start_on(
        workers: Option<usize>,
        kafka: Option<KafkaConfig>,
    ) -> Result<Self, CliError> {
        Self::start_tuned(workers, kafka, Default::default()).await
    }

    /// As `start_on`, with the embedded store tuned by `queue`.
    pub(super) async fn start_tuned(
        workers: Option<usize>,
        kafka: Option<KafkaConfig>,
        queue: crate::queue::embedded::EmbeddedConfig,
    ) -> Result<Self, CliError> {
        let dir = std::env::temp_dir().join(format!("kwq-local-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).map_err(failed)?;
        Self::start_in(dir, workers, kafka, queue).await
    }

    /// Stop this host and start it again on the same directory, as a
    /// restarted `kwq serve` with the same `--data-dir` would: a Kafka
    /// host's view then goes on from where it was, rather than reading
    /// the event topic again from its start.
    pub(super) async fn restart(
        self,
        workers: Option<usize>,
        kafka: Option<KafkaConfig>,
    ) -> Result<Self, CliError> {
        let dir = self.dir.clone();
        let _ = self.host.stop().await;
        Self::start_in(dir, workers, kafka, Default::default()).await
    }

    async fn start_in(
        dir: PathBuf,
        workers: Option<usize>,
        kafka: Option<KafkaConfig>,
        queue: crate::queue::embedded::EmbeddedConfig,
    ) -> Result<Self, CliError> {
        let host = kafka
            .as_ref()
            .map_or("local".to_string(), |k| k.host.clone());
        let store = match kafka {
            None => StoreUrl::Sqlite(dir.join("kwq.db")),
            Some(config) => StoreUrl::Kafka(Box::new(KafkaConfig {
                view_path: dir.join("view.db"),
                ..config
            })),
        };
        let mut dispatch = DispatchConfig::default();
        if let Some(w) = workers {
            dispatch.workers = w.max(1);
        }
        let workers = dispatch.workers;
        let config = ServerConfig {
            store,
            runtime: RuntimeConfig::default(),
            dispatch,
            queue,
            token: None,
            token_reads: false,
            examples: true,
            limits: Default::default(),
            host,
            allowed_hosts: AllowedHosts::any(),
            remote: Default::default(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(failed)?;
        let host = Host::start(config, listener)
            .await
            .map_err(|e| failed(format!("{e:#}")))?;
        Ok(LocalGrid {
            url: format!("http://{}", host.address()),
            queue: host.queue().clone(),
            tracker: host.tracker().clone(),
            workers,
            host,
            dir,
        })
    }

    /// The temporary directory holding the store.
    pub(super) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Stop everything and delete the temporary store.
    pub(super) async fn stop(self) {
        let _ = self.host.stop().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Submit `tasks` no-op tasks over HTTP as jobs of `batch` payloads.
pub(super) async fn submit_noop_jobs(
    client: &reqwest::Client,
    url: &str,
    tasks: u64,
    batch: u64,
) -> Result<(), CliError> {
    let mut submitted = 0;
    while submitted < tasks {
        let n = batch.max(1).min(tasks - submitted);
        let payloads = vec![serde_json::Value::Null; n as usize];
        post_job(
            client,
            url,
            &serde_json::json!({"module": "noop", "payloads": payloads}),
        )
        .await?;
        submitted += n;
    }
    Ok(())
}

/// `GET url`, its body as JSON.
pub(super) async fn get_json(
    client: &reqwest::Client,
    url: String,
) -> Result<serde_json::Value, CliError> {
    client
        .get(url)
        .send()
        .await
        .map_err(failed)?
        .json()
        .await
        .map_err(failed)
}

/// A `kB` line of this process's `/proc/self/status` (`VmRSS:`,
/// `VmHWM:`), in bytes; 0 where it cannot be read.
pub(super) fn status_bytes(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Submit one job (`POST /v1/jobs` with `body`) and return its id; a
/// refusal fails with the server's answer.
pub(super) async fn post_job(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> Result<String, CliError> {
    let response = client
        .post(format!("{url}/v1/jobs"))
        .json(body)
        .send()
        .await
        .map_err(failed)?;
    let status = response.status();
    let answer = response.text().await.map_err(failed)?;
    let id = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|job| job["id"].as_str().map(str::to_string));
    match id {
        Some(id) if status.is_success() => Ok(id),
        _ => Err(failed(format!("submit failed: {answer}"))),
    }
}

/// Count stored events that match until `target` is reached. When the
/// subscription falls behind, the count is taken from `recount` (the
/// tracker) instead. Fails if nothing arrives for `idle`.
pub(super) async fn count_events(
    events: &mut tokio::sync::broadcast::Receiver<crate::model::Event>,
    target: u64,
    idle: std::time::Duration,
    matches: impl Fn(&crate::model::Event) -> bool,
    recount: impl Fn() -> u64,
) -> Result<(), CliError> {
    let mut seen = 0;
    while seen < target {
        match tokio::time::timeout(idle, events.recv()).await {
            Ok(Ok(event)) if matches(&event) => seen += 1,
            Ok(Ok(_)) => {}
            Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => seen = recount(),
            Ok(Err(_)) | Err(_) => {
                return Err(failed(format!("progress stopped at {seen} of {target}")));
            }
        }
    }
    Ok(())
}
