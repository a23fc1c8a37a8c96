//! `kwq serve` as a library call: open the store, start the runtime, the
//! tracker, the worker pool and the HTTP API, and run until `shutdown`.
//! Tests start it in-process on port 0; the binary starts it on its flag values.

use crate::api::{self, ApiLimits, AppState};
use crate::dispatch::{Dispatcher, ModuleRegistry};
use crate::examples;
use crate::model::ModuleId;
use crate::queue::Queue;
use crate::queue::embedded::{EmbeddedConfig, EmbeddedQueue};
use crate::queue::kafka::{KafkaConfig, KafkaQueue};
use crate::runtime::{ModuleSource, Runtime, RuntimeConfig};
use anyhow::{Context, bail};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

// What a caller configures a host with and reads from it, so callers
// (the CLI) depend on the composition root, not on the parts it assembles.
pub use crate::dispatch::DispatchConfig;
pub use crate::tracker::Tracker;

/// Where tasks are stored, from `--store`.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreUrl {
    /// `sqlite://PATH`: the embedded durable store.
    Sqlite(PathBuf),
    /// `kafka://host:port,...`: a grid shared with other hosts through Kafka.
    Kafka(Box<KafkaConfig>),
}

impl StoreUrl {
    /// One line for the start-up banner (no secrets: Kafka settings beyond
    /// the brokers are left out).
    pub fn describe(&self) -> String {
        match self {
            StoreUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            StoreUrl::Kafka(kafka) => format!(
                "kafka://{} (view {})",
                kafka.brokers,
                kafka.view_path.display()
            ),
        }
    }

    /// Parse `sqlite://PATH` (or a bare path) or `kafka://HOST:PORT,...[?options]`
    /// (see [`KafkaConfig::parse`]; the view path and host name are set by the caller).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        if let Some(path) = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                bail!("store URL {text:?} has no path; use sqlite://PATH");
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("kafka://") {
            return KafkaConfig::parse(text)
                .map(|c| StoreUrl::Kafka(Box::new(c)))
                .map_err(anyhow::Error::msg);
        }
        if text.contains("://") {
            bail!("unknown store URL {text:?}; use sqlite://PATH or kafka://HOST:PORT");
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(text)))
    }
}

/// Everything `kwq serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The store.
    pub store: StoreUrl,
    /// Runtime settings (compile cache, memory, fuel).
    pub runtime: RuntimeConfig,
    /// Worker pool settings; `workers = 0` runs an API-only host.
    pub dispatch: DispatchConfig,
    /// Queue tuning.
    pub queue: EmbeddedConfig,
    /// Bearer token for write endpoints.
    pub token: Option<String>,
    /// Whether reads of the grid's data need the token too.
    pub token_reads: bool,
    /// Upload the bundled example modules at start.
    pub examples: bool,
    /// Request limits.
    pub limits: ApiLimits,
    /// Name of this host in worker ids.
    pub host: String,
    /// The `Host` names the API answers to.
    pub allowed_hosts: api::AllowedHosts,
}

/// The runtime fetches module bytes it has not compiled from the store.
struct StoreModules(Arc<dyn Queue>);

impl ModuleSource for StoreModules {
    fn module_bytes(&self, id: &ModuleId) -> Option<Vec<u8>> {
        self.0.module_bytes(id)
    }
}

/// A running host: store, runtime, tracker, workers and the HTTP API, all
/// up. [`Host::start`] returns only once every part has started, so
/// whoever prints "serving" after it tells the truth; [`Host::stop`] shuts
/// them down in the reverse order.
pub struct Host {
    address: std::net::SocketAddr,
    queue: Arc<dyn Queue>,
    tracker: Arc<Tracker>,
    dispatcher: Option<Dispatcher>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_http: tokio::sync::oneshot::Sender<()>,
}

impl Host {
    /// Open the store, start the runtime, rebuild the statistics, upload the
    /// examples if asked, start the workers and serve the API on `listener`.
    /// Any failure is returned before anything serves.
    pub async fn start(
        config: ServerConfig,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<Host> {
        let address = listener
            .local_addr()
            .context("reading the listen address")?;
        let queue: Arc<dyn Queue> = match &config.store {
            StoreUrl::Sqlite(path) => Arc::new(
                EmbeddedQueue::open(path, config.queue.clone())
                    .with_context(|| format!("opening store {}", path.display()))?,
            ),
            StoreUrl::Kafka(kafka) => Arc::new(
                KafkaQueue::connect(
                    (**kafka).clone(),
                    config.queue.aging,
                    config.queue.affinity_window,
                )
                .await
                .with_context(|| format!("joining the Kafka grid at {}", kafka.brokers))?,
            ),
        };
        let started = Self::start_on(config, queue.clone(), listener, address).await;
        if started.is_err() {
            // Nothing else holds the store yet: let its writer finish cleanly.
            queue.close();
            let _ = queue.flush().await;
        }
        started
    }

    async fn start_on(
        config: ServerConfig,
        queue: Arc<dyn Queue>,
        listener: tokio::net::TcpListener,
        address: std::net::SocketAddr,
    ) -> anyhow::Result<Host> {
        let runtime = Runtime::new(config.runtime.clone()).context("starting the Wasm runtime")?;
        runtime.set_module_source(Arc::new(StoreModules(queue.clone())));
        crate::tracker::metrics::install();
        let tracker = Tracker::attach(&queue)
            .await
            .context("rebuilding statistics")?;
        queue.start();
        let modules = ModuleRegistry::new(runtime.clone(), queue.clone());
        if config.examples {
            upload_examples(&modules).await?;
        }
        let dispatcher = (config.dispatch.workers > 0).then(|| {
            Dispatcher::start(
                runtime.clone(),
                queue.clone(),
                config.dispatch.clone(),
                &config.host,
            )
        });
        let state = AppState {
            queue: queue.clone(),
            modules,
            tracker: tracker.clone(),
            board: dispatcher.as_ref().map(Dispatcher::board),
            token: config.token.clone(),
            token_reads: config.token_reads,
            limits: config.limits.clone(),
            allowed_hosts: config.allowed_hosts.clone(),
            events: Default::default(),
        };
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let http = tokio::spawn(api::serve(listener, state, async move {
            let _ = stopped.await;
        }));
        Ok(Host {
            address,
            queue,
            tracker,
            dispatcher,
            http,
            stop_http,
        })
    }

    /// The address the API is served on (useful with port 0).
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// The host's store (for in-process callers such as `kwq bench`).
    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.queue
    }

    /// The host's statistics.
    pub fn tracker(&self) -> &Arc<Tracker> {
        &self.tracker
    }

    /// Stop cleanly: stop taking requests, let running tasks finish (or
    /// return them to the queue), flush the store.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop_http.send(());
        let served = self.http.await.context("the HTTP server task failed")?;
        if let Some(dispatcher) = self.dispatcher {
            dispatcher.stop().await;
        }
        self.queue.close();
        self.queue.flush().await.context("flushing the store")?;
        served.context("serving HTTP")
    }
}

/// Run a host until `shutdown` resolves, then stop it cleanly (see [`Host`]).
pub async fn run(
    config: ServerConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let host = Host::start(config, listener).await?;
    shutdown.await;
    host.stop().await
}

/// Upload every bundled module under its crate name (idempotent): `kwq
/// serve --examples`, and the local grids of `kwq bench grid` and `kwq simulate`.
pub async fn upload_examples(modules: &ModuleRegistry) -> anyhow::Result<()> {
    for (name, bytes) in examples::BUNDLED {
        modules
            .register(Some(name.to_string()), bytes.to_vec())
            .await
            .with_context(|| format!("registering bundled module {name}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls() {
        assert_eq!(
            StoreUrl::parse("sqlite:///tmp/a.db").unwrap(),
            StoreUrl::Sqlite("/tmp/a.db".into())
        );
        assert_eq!(
            StoreUrl::parse("data/kwq.db").unwrap(),
            StoreUrl::Sqlite("data/kwq.db".into())
        );
        assert!(StoreUrl::parse("redis://x").is_err());
        assert!(matches!(
            StoreUrl::parse("kafka://127.0.0.1:9092").unwrap(),
            StoreUrl::Kafka(_)
        ));
        assert!(StoreUrl::parse("kafka://nohost").is_err());
        assert!(StoreUrl::parse("sqlite://").is_err());
    }
}
