//! Topic names of one grid, and creating them when absent.

use super::KafkaConfig;
use crate::queue::QueueError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use std::time::Duration;

/// The topics of one grid, all under one prefix so grids can share a cluster.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    /// Topics under `prefix` (e.g. `kwq.`).
    pub fn new(prefix: &str) -> Self {
        Topics {
            prefix: prefix.to_string(),
        }
    }

    /// The task topic of a priority band.
    pub fn band(&self, priority: u8) -> String {
        format!("{}tasks.p{}", self.prefix, priority.min(9))
    }

    /// Every band's topic, 0..=9.
    pub fn bands(&self) -> Vec<String> {
        (0..=9).map(|p| self.band(p)).collect()
    }

    /// The priority of a band topic.
    pub fn priority_of(&self, topic: &str) -> Option<u8> {
        topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("tasks.p")?
            .parse()
            .ok()
            .filter(|p| *p <= 9)
    }

    /// The tracker topic.
    pub fn events(&self) -> String {
        format!("{}events", self.prefix)
    }

    /// The compacted modules topic.
    pub fn modules(&self) -> String {
        format!("{}modules", self.prefix)
    }

    /// The compacted control topic: each job's flags and priority, and each
    /// task's cancel or priority change, keyed so compaction keeps the
    /// latest of each. Every host reads all of it, from the start, before
    /// it reads any task.
    pub fn control(&self) -> String {
        format!("{}control", self.prefix)
    }

    /// The compacted topic of sweep expansions: each unfinished sweep job's
    /// [`ExpandCursor`](super::wire::ExpandCursor), keyed by job id. Its
    /// partitions are shared out in the expanders' group, so each job is
    /// expanded by one host at a time and taken over when that host dies.
    pub fn expand(&self) -> String {
        format!("{}expand", self.prefix)
    }

    /// The topic of streamed jobs' payloads ([`PayloadChunk`](super::wire::PayloadChunk)s
    /// keyed by job id), read by the expander as each job drains. Not
    /// compacted (a job's chunks share its key): its retention must outlast
    /// the longest job.
    pub fn payloads(&self) -> String {
        format!("{}payloads", self.prefix)
    }

    /// The dead-letter topic.
    pub fn dead(&self) -> String {
        format!("{}dead", self.prefix)
    }
}

/// A consumer that assigns itself whole topics, outside any consumer
/// group (the view and control readers: every host reads all of them).
/// `purpose` names its group id, under which nothing is ever committed.
pub(super) fn reader(config: &KafkaConfig, purpose: &str) -> Result<BaseConsumer, QueueError> {
    config
        .client_config()
        .set(
            "group.id",
            format!("{}{purpose}-{}", config.prefix, config.host),
        )
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", config.fetch_wait())
        .create()
        .map_err(|e| QueueError::storage(format!("kafka {purpose} consumer"), e))
}

/// How many partitions `topic` has (0 if the broker does not know it).
pub(super) fn partitions_of(consumer: &BaseConsumer, topic: &str) -> Result<i32, QueueError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .map_err(|e| QueueError::storage(format!("metadata of {topic}"), e))?;
    Ok(metadata
        .topics()
        .first()
        .map(|t| t.partitions().len() as i32)
        .unwrap_or(0))
}

/// Create every topic of the grid that does not exist yet.
pub(super) async fn ensure(config: &KafkaConfig, topics: &Topics) -> Result<(), QueueError> {
    let admin: AdminClient<DefaultClientContext> = config
        .client_config()
        .create()
        .map_err(|e| QueueError::storage("kafka admin client", e))?;
    let replication = || TopicReplication::Fixed(config.replication);
    let bands = topics.bands();
    let (events, modules, dead, control, expand, payloads) = (
        topics.events(),
        topics.modules(),
        topics.dead(),
        topics.control(),
        topics.expand(),
        topics.payloads(),
    );
    let mut wanted: Vec<NewTopic<'_>> = bands
        .iter()
        .map(|t| NewTopic::new(t, config.task_partitions, replication()))
        .collect();
    wanted.push(NewTopic::new(
        &events,
        config.event_partitions,
        replication(),
    ));
    wanted.push(NewTopic::new(&dead, 1, replication()));
    wanted.push(NewTopic::new(&modules, 1, replication()).set("cleanup.policy", "compact"));
    wanted.push(NewTopic::new(&control, 1, replication()).set("cleanup.policy", "compact"));
    wanted.push(
        NewTopic::new(&expand, config.task_partitions, replication())
            .set("cleanup.policy", "compact"),
    );
    wanted.push(NewTopic::new(
        &payloads,
        config.task_partitions,
        replication(),
    ));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&wanted, &options)
        .await
        .map_err(|e| QueueError::storage("creating topics", e))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(QueueError::storage_message(format!(
                    "creating topic {topic}: {code}"
                )));
            }
        }
    }
    Ok(())
}

/// The offset a partition list gives `partition` (of any topic in it), if
/// it is a real offset: where a consumer will fetch next, or a committed
/// position.
pub(super) fn offset_in(list: &rdkafka::TopicPartitionList, partition: i32) -> Option<i64> {
    list.elements()
        .iter()
        .find(|e| e.partition() == partition)
        .and_then(|e| match e.offset() {
            rdkafka::Offset::Offset(at) => Some(at),
            _ => None,
        })
}
