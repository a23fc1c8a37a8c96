//! `kwq serve` as a library call: open the store, start the runtime, the
//! tracker, the worker pool and the HTTP API, and run until `shutdown`.
//! Tests start it in-process on port 0; the binary starts it on its flag values.

use crate::api::{self, ApiLimits, AppState};
use crate::dispatch::{Dispatcher, ModuleRegistry};
use crate::examples;
use crate::model::ModuleId;
use crate::queue::embedded::EmbeddedConfig;
use crate::queue::remote::{Hub, HubConfig, RemoteQueue};
use crate::queue::{Queue, ReadStore, WorkQueue};
use crate::runtime::{ModuleSource, Runtime, RuntimeConfig};
use anyhow::Context;
use std::future::Future;
use std::sync::Arc;

// What a caller configures a host with and reads from it, so callers
// (the CLI) depend on the composition root, not on the parts it assembles.
pub use crate::dispatch::DispatchConfig;
pub use crate::queue::StoreUrl;
pub use crate::queue::kafka::Role as HostRole;
pub use crate::queue::remote::RemoteConfig;
pub use crate::tracker::Tracker;

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
    /// The worker protocol: its token and lease time.
    pub remote: RemoteWorkers,
}

impl ServerConfig {
    /// What this host does: a Kafka host's `--role`; a host on the
    /// embedded store does everything.
    pub fn role(&self) -> HostRole {
        match &self.store {
            StoreUrl::Kafka(kafka) => kafka.role,
            StoreUrl::Sqlite(_) => HostRole::All,
        }
    }
}

/// How this host serves worker machines (`/v1/workers`).
#[derive(Debug, Clone)]
pub struct RemoteWorkers {
    /// Bearer token workers must send (`--worker-token`); without one,
    /// workers send the submitters' `--token`, if that is set.
    pub token: Option<String>,
    /// A remote lease not renewed for this long goes to another worker.
    pub lease_ttl: std::time::Duration,
}

impl Default for RemoteWorkers {
    fn default() -> Self {
        RemoteWorkers {
            token: None,
            lease_ttl: std::time::Duration::from_secs(30),
        }
    }
}

/// The runtime fetches module bytes it has not compiled from the store.
struct StoreModules(Arc<dyn WorkQueue>);

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
    hub: Arc<Hub>,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    stop_http: tokio::sync::oneshot::Sender<()>,
    /// Kept to the end of the host's life.
    _api_runtime: ApiRuntime,
}

/// The threads the HTTP API runs on, apart from the workers': guests keep
/// the host's own runtime threads busy (they yield only every few ms), and
/// reads answered behind them waited tens of milliseconds. Shut down
/// without blocking when the host goes (a runtime may not be dropped from
/// inside another).
struct ApiRuntime(Option<tokio::runtime::Runtime>);

impl Drop for ApiRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
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
        let queue = crate::queue::open(&config.store, &config.queue)
            .await
            .with_context(|| match &config.store {
                StoreUrl::Sqlite(path) => format!("opening store {}", path.display()),
                StoreUrl::Kafka(kafka) => format!("joining the Kafka grid at {}", kafka.brokers),
            })?;
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
        let tracker = Tracker::attach(&(queue.clone() as Arc<dyn ReadStore>))
            .await
            .context("rebuilding statistics")?;
        queue.start();
        let role = config.role();
        let modules = ModuleRegistry::new(runtime.clone(), queue.clone());
        if config.examples && role.keeps_view() {
            upload_examples(&modules).await?;
        } else if config.examples {
            // Uploads belong to API hosts; this one receives modules from the grid.
            tracing::info!("--examples is left to the grid's API hosts on a worker host");
        }
        let runs_tasks = config.dispatch.workers > 0 && role.runs_tasks();
        let dispatcher = runs_tasks.then(|| {
            Dispatcher::start(
                runtime.clone(),
                queue.clone(),
                config.dispatch.clone(),
                &config.host,
            )
        });
        let retry = config.dispatch.retry;
        let remote = HubConfig {
            lease_ttl: config.remote.lease_ttl,
            retry_delay: Arc::new(move |attempt| retry.delay(attempt)),
        };
        let state = AppState {
            worker_token: config.remote.token.clone(),
            board: dispatcher.as_ref().map(Dispatcher::board),
            token: config.token.clone(),
            token_reads: config.token_reads,
            limits: config.limits.clone(),
            worker_only: !role.keeps_view(),
            ..AppState::with_remote_workers(
                queue.clone(),
                modules,
                tracker.clone(),
                config.allowed_hosts.clone(),
                remote,
            )
        };
        let hub = state.hub.clone();
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let api_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kwq-api")
            .enable_all()
            .build()
            .context("starting the API's threads")?;
        // The listener moves to the API's runtime (its own reactor).
        let listener = listener.into_std().context("handing the listener over")?;
        let http = api_runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            api::serve(listener, state, async move {
                let _ = stopped.await;
            })
            .await
        });
        Ok(Host {
            address,
            queue,
            tracker,
            dispatcher,
            hub,
            http,
            stop_http,
            _api_runtime: ApiRuntime(Some(api_runtime)),
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
        self.hub.close();
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

/// Everything `kwq worker` can be told.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The scheduler host and this worker's name and slots.
    pub remote: RemoteConfig,
    /// Runtime settings (compile cache, memory, fuel).
    pub runtime: RuntimeConfig,
    /// Worker pool settings (`workers` is the slots).
    pub dispatch: DispatchConfig,
}

/// A worker machine: the dispatcher and Wasm runtime of a host, leasing
/// from a scheduler host over the worker protocol instead of a store here.
pub struct WorkerHost {
    queue: RemoteQueue,
    dispatcher: Dispatcher,
}

impl WorkerHost {
    /// Register with the scheduler host and start the workers. A host that
    /// refuses (a wrong token) is an error; one not up yet is retried.
    pub async fn start(config: WorkerConfig) -> anyhow::Result<WorkerHost> {
        let queue = RemoteQueue::connect(config.remote.clone())
            .await
            .with_context(|| format!("registering with {}", config.remote.server))?;
        let runtime = Runtime::new(config.runtime).context("starting the Wasm runtime")?;
        let work: Arc<dyn WorkQueue> = Arc::new(queue.clone());
        runtime.set_module_source(Arc::new(StoreModules(work.clone())));
        let dispatcher = Dispatcher::start(runtime, work, config.dispatch, &config.remote.name);
        Ok(WorkerHost { queue, dispatcher })
    }

    /// This worker's id on the scheduler host, once registered.
    pub fn worker_id(&self) -> Option<String> {
        self.queue.worker_id()
    }

    /// What each of its workers is doing.
    pub fn board(&self) -> Arc<crate::dispatch::WorkerBoard> {
        self.dispatcher.board()
    }

    /// Stop: let running tasks finish within the grace period (or give
    /// them back), deliver every outcome, and deregister.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.dispatcher.stop().await;
        self.queue.close();
        let flushed = self.queue.flush().await;
        self.queue.deregister().await;
        flushed.context("delivering the last outcomes")
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
