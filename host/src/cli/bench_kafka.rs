//! `kwq bench kafka`: no-op tasks through a Kafka grid of 1..N hosts in this
//! process (each with its own view, workers and HTTP API on 127.0.0.1),
//! submitted over HTTP to the first host; and the broker's own rate for
//! messages of the size KWQ writes, to tell how much of the limit is the
//! broker's. Each run uses fresh topics (a new prefix).

use super::CliError;
use super::local_grid::{LocalGrid, failed, submit_noop_jobs};
use crate::model::TaskState;
use crate::queue::kafka::{Fetched, HostTraffic, KafkaConfig, Role, TopicKind, Topics, written};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

/// What `kwq bench kafka` runs.
pub(super) struct Shape {
    /// No-op tasks per run.
    pub(super) tasks: u64,
    /// Tasks per submitted job.
    pub(super) batch: u64,
    /// Host counts to run.
    pub(super) hosts: Vec<usize>,
    /// Workers per host (default: cores).
    pub(super) workers: Option<usize>,
    /// One API-only host beside worker-only hosts.
    pub(super) api_host: bool,
    /// The hosts' `fetch_wait_ms`.
    pub(super) fetch_wait_ms: u32,
}

pub(super) fn run(brokers: String, shape: Shape) -> Result<(), CliError> {
    super::tokio_runtime()?.block_on(bench(brokers, shape))
}

async fn bench(brokers: String, shape: Shape) -> Result<(), CliError> {
    let tasks = shape.tasks;
    let mock = (brokers == "mock").then(MockBroker::start).transpose()?;
    let brokers = mock.as_ref().map_or(brokers, |m| m.brokers.clone());
    println!(
        "Kafka backend, no-op tasks, brokers {brokers}{}",
        if mock.is_some() {
            " (librdkafka's in-process mock cluster)"
        } else {
            ""
        }
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>10} {:>10} {:>12} {:>12} {:>12}",
        "run",
        "tasks",
        "seconds",
        "tasks/s",
        "msgs/task",
        "bytes/task",
        "runner rd/t",
        "view rd/t",
        "fetched/t"
    );
    for &count in shape.hosts.iter().filter(|h| **h > 0) {
        let run = grid_run(&brokers, mock.as_ref(), count, &shape).await?;
        let name = if shape.api_host {
            format!("1 api + {count} worker host(s)")
        } else {
            format!("{count} host(s)")
        };
        println!(
            "{:<28} {:>10} {:>10.2} {:>12.0} {:>10.3} {:>10.0} {:>12.0} {:>12.0} {:>12.2}",
            name,
            tasks,
            run.seconds,
            tasks as f64 / run.seconds,
            run.messages as f64 / tasks as f64,
            run.bytes as f64 / tasks as f64,
            run.runner_read_per_task,
            run.view_read as f64 / tasks as f64,
            run.fetched_per_task,
        );
    }
    println!(
        "(msgs/task and bytes/task: everything the hosts wrote to the broker during the timed run, \
         tasks and events, keys and values before lz4; runner rd/t: bytes a host that runs tasks \
         read per task run there, every topic, mean over those hosts; view rd/t: bytes the host \
         submitted to read from the event topic per task; fetched/t: task messages the broker \
         sent the hosts' task consumers per task, refetches included, from librdkafka's \
         statistics)"
    );
    if mock.is_some() {
        // The mock cluster shares this process's cores; its own rate says
        // nothing about a real broker.
        return Ok(());
    }
    // The broker's own rate for as many 300-byte messages as four per task
    // (what a task cost before events were batched), for comparison.
    let messages = tasks * 4;
    let (produce, consumed, consume) = broker_rate(&brokers, mock.as_ref(), messages).await?;
    println!(
        "{:<28} {:>10} {:>10.2} {:>12.0}",
        "broker: produce 300 B msgs",
        messages,
        produce,
        messages as f64 / produce
    );
    println!(
        "{:<28} {:>10} {:>10.2} {:>12.0}",
        "broker: consume them",
        consumed,
        consume,
        consumed as f64 / consume
    );
    if consumed < messages {
        println!(
            "(the broker stopped answering fetches after {consumed} of {messages} messages; \
             the consume rate is over those)"
        );
    }
    println!(
        "(at 4 messages a task, written and read once each, the broker alone would cap one host near {:.0} tasks/s)",
        1.0 / (4.0 / (messages as f64 / produce) + 4.0 / (consumed as f64 / consume))
    );
    Ok(())
}

/// What one timed run measured.
struct GridRun {
    /// From the first submit until the first host's view had every task Completed.
    seconds: f64,
    /// Messages the hosts wrote meanwhile.
    messages: u64,
    /// Their bytes (keys and values, before compression).
    bytes: u64,
    /// Over hosts that run tasks, the mean of bytes read per task run there.
    runner_read_per_task: f64,
    /// Bytes the first host (the one submitted to) read from the event topic.
    view_read: u64,
    /// Task messages fetched from the broker per task (1.0: each once).
    fetched_per_task: f64,
}

/// One run: `hosts` hosts on fresh topics (worker-only, after an API-only
/// first host, if `shape.api_host`).
async fn grid_run(
    brokers: &str,
    mock: Option<&MockBroker>,
    hosts: usize,
    shape: &Shape,
) -> Result<GridRun, CliError> {
    let (tasks, batch) = (shape.tasks, shape.batch);
    let prefix = format!("bench-{}.", uuid::Uuid::new_v4().simple());
    let partitions = (2 * hosts as i32).max(4);
    if let Some(mock) = mock {
        mock.create_grid_topics(&prefix, partitions)?;
    }
    let mut roles = Vec::with_capacity(hosts + 1);
    if shape.api_host {
        roles.push(Role::Api);
    }
    roles.extend(std::iter::repeat_n(
        if shape.api_host {
            Role::Worker
        } else {
            Role::All
        },
        hosts,
    ));
    let runs_tasks: Vec<bool> = roles.iter().map(|role| role.runs_tasks()).collect();
    let mut grids = Vec::with_capacity(roles.len());
    for (i, role) in roles.into_iter().enumerate() {
        let config = KafkaConfig {
            brokers: brokers.to_string(),
            prefix: prefix.clone(),
            host: format!("bench{i}"),
            task_partitions: partitions,
            create_topics: mock.is_none() && i == 0,
            // A real broker here is most likely tansu (see KafkaConfig).
            rejoin_stale: mock.is_none(),
            role,
            fetch_wait_ms: shape.fetch_wait_ms,
            ..KafkaConfig::default()
        };
        grids.push(LocalGrid::start_on(shape.workers, Some(config)).await?);
    }
    let client = reqwest::Client::new();
    let first = &grids[0];
    let completed = || {
        first
            .tracker
            .overview([0; 10])
            .counts
            .get(TaskState::Completed)
    };
    // Warm up: every host joined the group and compiled the module.
    let warmup = 100 * hosts as u64;
    submit_noop_jobs(&client, &first.url, warmup, warmup).await?;
    wait_completed(&completed, warmup).await?;

    let traffic = || -> Vec<HostTraffic> {
        grids
            .iter()
            .map(|g| g.queue.kafka_traffic().unwrap_or_default())
            .collect()
    };
    let (messages_before, bytes_before) = written();
    let traffic_before = traffic();
    let started = Instant::now();
    submit_noop_jobs(&client, &first.url, tasks, batch).await?;
    wait_completed(&completed, warmup + tasks).await?;
    let seconds = started.elapsed().as_secs_f64();
    let (messages, bytes) = written();
    let fetched_after = fresh_fetch_reports(&grids, &runs_tasks, &traffic()).await;
    let during: Vec<HostTraffic> = traffic()
        .iter()
        .zip(&traffic_before)
        .map(|(now, before)| HostTraffic {
            reads: now.reads.since(&before.reads),
            finished: now.finished - before.finished,
            expanding: now.expanding,
            held: now.held,
            expanded: now.expanded - before.expanded,
            task_partitions: now.task_partitions,
            resent_records: now.resent_records - before.resent_records,
            task_fetched: now.task_fetched,
        })
        .collect();
    for grid in grids {
        grid.stop().await;
    }
    let fetched: u64 = fetched_after
        .iter()
        .zip(&traffic_before)
        .map(|(after, before)| after.messages - before.task_fetched.messages)
        .sum();
    let runners: Vec<f64> = during
        .iter()
        .filter(|t| t.finished > 0)
        .map(|t| t.reads.total_bytes() as f64 / t.finished as f64)
        .collect();
    Ok(GridRun {
        seconds,
        messages: messages - messages_before,
        bytes: bytes - bytes_before,
        runner_read_per_task: runners.iter().sum::<f64>() / runners.len().max(1) as f64,
        view_read: during[0].reads.bytes_of(TopicKind::Events),
        fetched_per_task: fetched as f64 / tasks as f64,
    })
}

/// Each host's task-consumer fetch totals from a statistics report taken
/// after `now` was read (librdkafka reports once a second), so they cover
/// the whole run. Hosts that run no tasks (`runs_tasks` false: an API-only
/// host has no task consumer) are not waited for, and a host that reports
/// no more within 5 s keeps what it had.
async fn fresh_fetch_reports(
    grids: &[LocalGrid],
    runs_tasks: &[bool],
    now: &[HostTraffic],
) -> Vec<Fetched> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let latest: Vec<Fetched> = grids
            .iter()
            .map(|g| g.queue.kafka_traffic().unwrap_or_default().task_fetched)
            .collect();
        let fresh = latest
            .iter()
            .zip(now)
            .zip(runs_tasks)
            .all(|((l, n), runs)| !runs || l.reports > n.task_fetched.reports);
        if fresh || Instant::now() >= deadline {
            return latest;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `completed()` reaches `target`; fails if it stops moving.
async fn wait_completed(completed: &impl Fn() -> u64, target: u64) -> Result<(), CliError> {
    let (mut last, mut moved) = (0, Instant::now());
    loop {
        let now = completed();
        if now >= target {
            return Ok(());
        }
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > Duration::from_secs(60) {
            return Err(failed(format!("progress stopped at {now} of {target}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Produce `n` messages of 300 bytes to a fresh topic (batched) and read
/// them back: seconds to produce, messages read and seconds to read them.
/// A broker that stops answering fetches for 30 s ends the read early
/// (tansu 0.6.0 does, on one partition of 200,000 messages); the messages
/// read until then still give its rate.
async fn broker_rate(
    brokers: &str,
    mock: Option<&MockBroker>,
    n: u64,
) -> Result<(f64, u64, f64), CliError> {
    let topic = format!("bench-{}.raw", uuid::Uuid::new_v4().simple());
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    match mock {
        Some(mock) => mock.create_topics(vec![(topic.clone(), 1)])?,
        None => {
            let admin: AdminClient<DefaultClientContext> = config.create().map_err(failed)?;
            admin
                .create_topics(
                    &[NewTopic::new(&topic, 1, TopicReplication::Fixed(1))],
                    &AdminOptions::new(),
                )
                .await
                .map_err(failed)?;
        }
    }
    let producer: FutureProducer = config
        .clone()
        .set("linger.ms", "2")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .map_err(failed)?;
    let value = vec![b'x'; 300];
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(n as usize);
    for i in 0..n {
        let key = i.to_string();
        let record = FutureRecord::to(&topic).key(&key).payload(&value);
        deliveries.push(producer.send_result(record).map_err(|(e, _)| failed(e))?);
    }
    for result in join_all(deliveries).await {
        result.map_err(failed)?.map_err(|(e, _)| failed(e))?;
    }
    let produce = started.elapsed().as_secs_f64();

    let consumer: BaseConsumer = config
        .set("group.id", format!("{topic}.reader"))
        .create()
        .map_err(failed)?;
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(&topic, 0, Offset::Beginning)
        .map_err(failed)?;
    consumer.assign(&list).map_err(failed)?;
    let started = Instant::now();
    let (consumed, consume) = tokio::task::spawn_blocking(move || {
        let (mut read, mut last_read) = (0, started.elapsed());
        while read < n {
            match consumer.poll(Duration::from_secs(30)) {
                Some(Ok(_)) => (read, last_read) = (read + 1, started.elapsed()),
                Some(Err(e)) => return Err(failed(e)),
                None if read > 0 => break,
                None => return Err(failed(format!("read no message of {n}"))),
            }
        }
        Ok((read, last_read.as_secs_f64()))
    })
    .await
    .map_err(failed)??;
    Ok((produce, consumed, consume))
}

/// Topics to create (name, partitions), and who waits for them.
type TopicsToCreate = (Vec<(String, i32)>, std::sync::mpsc::Sender<()>);

/// librdkafka's in-process mock cluster (`--brokers mock`): shows what the
/// grid does when the broker costs next to nothing. Its handle cannot leave
/// the thread that made it, so it lives on one and takes commands.
pub(super) struct MockBroker {
    pub(super) brokers: String,
    commands: std::sync::Mutex<std::sync::mpsc::Sender<TopicsToCreate>>,
}

impl MockBroker {
    /// A mock cluster of 3 brokers on its own thread.
    pub(super) fn start() -> Result<Self, CliError> {
        let (commands, inbox) = std::sync::mpsc::channel::<TopicsToCreate>();
        let (ready, address) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(3) {
                Ok(cluster) => cluster,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready.send(Ok(cluster.bootstrap_servers()));
            for (topics, done) in inbox {
                for (topic, partitions) in topics {
                    if let Err(e) = cluster.create_topic(&topic, partitions, 1) {
                        tracing::error!(topic, error = %e, "creating a mock topic");
                    }
                }
                let _ = done.send(());
            }
        });
        let brokers = address.recv().map_err(failed)?.map_err(failed)?;
        Ok(MockBroker {
            brokers,
            commands: std::sync::Mutex::new(commands),
        })
    }

    /// Every topic of a grid under `prefix`, bands and expand topic with
    /// `partitions` partitions (the mock cluster does not take the admin
    /// API's topic configs, so hosts do not create them there).
    pub(super) fn create_grid_topics(&self, prefix: &str, partitions: i32) -> Result<(), CliError> {
        let topics = Topics::new(prefix);
        let mut all: Vec<(String, i32)> = topics
            .bands()
            .into_iter()
            .map(|t| (t, partitions))
            .collect();
        all.extend([
            (topics.events(), 4),
            (topics.modules(), 1),
            (topics.control(), 1),
            (topics.expand(), partitions),
            (topics.payloads(), partitions),
            (topics.dead(), 1),
        ]);
        self.create_topics(all)
    }

    fn create_topics(&self, topics: Vec<(String, i32)>) -> Result<(), CliError> {
        let (done, wait) = std::sync::mpsc::channel();
        self.commands
            .lock()
            .map_err(failed)?
            .send((topics, done))
            .map_err(failed)?;
        wait.recv().map_err(failed)
    }
}
