//! Flow control for sweep expansion: how far a band is ahead of the hosts
//! that run it. The lag of a band is what has been written to it and not
//! yet committed by the workers' group (the sum over its partitions of the
//! high watermark minus the group's committed offset): tasks waiting in the
//! topic, in hosts' read-ahead buffers, or running. An expander writes
//! more points only while that lag is under its target, so a 50M-point job
//! occupies the brokers and the hosts' memory no more than a small job does.

use super::super::KafkaConfig;
use super::super::wire::ScanFrom;
use crate::queue::QueueError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a measured lag is trusted before it is measured again.
const LAG_FRESH_FOR: Duration = Duration::from_millis(40);

/// How often the number of hosts in the workers' group is looked up.
const HOSTS_EVERY: Duration = Duration::from_secs(5);

/// Broker requests' time limit.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Time limit of describing the workers' group (a broker that cannot may
/// not answer at all).
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Measures band lags for one expander, and the target it keeps them under.
pub(super) struct Flow {
    /// A client in the workers' group id that never joins it: it only
    /// reads the group's committed offsets and members.
    probe: BaseConsumer,
    group: String,
    band_buffer: u64,
    /// Hosts assumed when the group cannot be described: the partitions
    /// of a band, the most hosts that can be reading it.
    fallback_hosts: u64,
    hosts: u64,
    hosts_at: Option<Instant>,
    /// False once the broker failed to describe the group.
    describes_groups: bool,
    lags: HashMap<String, (u64, Instant)>,
}

impl Flow {
    /// A flow control for the grid in `config`.
    pub(super) fn new(config: &KafkaConfig) -> Result<Self, QueueError> {
        let probe: BaseConsumer = config
            .client_config()
            .set("group.id", config.group())
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| QueueError::storage("kafka client for the workers' offsets", e))?;
        Ok(Flow {
            probe,
            group: config.group(),
            band_buffer: config.band_buffer.max(1) as u64,
            fallback_hosts: config.task_partitions.max(1) as u64,
            hosts: 1,
            hosts_at: None,
            describes_groups: true,
            lags: HashMap::new(),
        })
    }

    /// How many more points may go to `band` now: twice `band_buffer` per
    /// host reading the bands (each host reads ahead `band_buffer` per
    /// band, and the second helping covers the time to write the next
    /// chunk), less the band's lag.
    pub(super) fn room(&mut self, band: &str) -> Result<u64, QueueError> {
        let target = 2 * self.band_buffer * self.hosts();
        let lag = match self.lags.get(band) {
            Some((lag, at)) if at.elapsed() < LAG_FRESH_FOR => *lag,
            _ => {
                let lag = self.lag(band)?;
                self.lags.insert(band.to_string(), (lag, Instant::now()));
                lag
            }
        };
        if lag >= target {
            tracing::debug!(band, lag, target, "no room on the band");
        }
        Ok(target.saturating_sub(lag))
    }

    /// Points were just written to `band`: its lag has grown by `n`.
    pub(super) fn wrote(&mut self, band: &str, n: u64) {
        if let Some((lag, _)) = self.lags.get_mut(band) {
            *lag += n;
        }
    }

    /// Hosts in the workers' group (looked up every few seconds). A broker
    /// that cannot describe groups (tansu 0.6.0 drops the connection) is
    /// taken, from then on, to have as many hosts as a band has
    /// partitions, the most that can be reading it.
    fn hosts(&mut self) -> u64 {
        if self.hosts_at.is_some_and(|at| at.elapsed() < HOSTS_EVERY) || !self.describes_groups {
            return self.hosts;
        }
        self.hosts_at = Some(Instant::now());
        self.hosts = match self
            .probe
            .fetch_group_list(Some(&self.group), DESCRIBE_TIMEOUT)
        {
            Ok(list) => list
                .groups()
                .iter()
                .map(|g| g.members().len() as u64)
                .sum::<u64>()
                .max(1),
            Err(e) => {
                tracing::info!(
                    error = %e,
                    hosts = self.fallback_hosts,
                    "the broker does not describe the workers' group; sweeps are written ahead for a host per band partition"
                );
                self.describes_groups = false;
                self.fallback_hosts
            }
        };
        self.hosts
    }

    /// Written and not committed, over the band's partitions.
    fn lag(&self, band: &str) -> Result<u64, QueueError> {
        let ends = positions(self.probe.client(), band)?;
        let mut list = TopicPartitionList::new();
        for end in &ends {
            list.add_partition(band, end.partition);
        }
        let committed = self
            .probe
            .committed_offsets(list, TIMEOUT)
            .map_err(|e| QueueError::storage(format!("the workers' offsets on {band}"), e))?;
        let mut lag = 0;
        for end in &ends {
            let committed_at = committed
                .find_partition(band, end.partition)
                .and_then(|e| match e.offset() {
                    Offset::Offset(at) => Some(at),
                    _ => None,
                });
            // Nothing committed yet: the workers start at the band's start.
            let done = match committed_at {
                Some(at) => at,
                None => {
                    self.probe
                        .fetch_watermarks(band, end.partition, TIMEOUT)
                        .map_err(|e| QueueError::storage(format!("the start of {band}"), e))?
                        .0
                }
            };
            tracing::trace!(
                band,
                partition = end.partition,
                end = end.offset,
                done,
                "band lag"
            );
            lag += (end.offset - done).max(0) as u64;
        }
        Ok(lag)
    }
}

/// The end (high watermark) of every partition of `topic`: where the next
/// message written to each will be.
pub(in crate::queue::kafka) fn positions<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<Vec<ScanFrom>, QueueError> {
    let metadata = client
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| QueueError::storage(format!("metadata of {topic}"), e))?;
    let partitions = metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32);
    (0..partitions)
        .map(|partition| {
            let (_, high) = client
                .fetch_watermarks(topic, partition, TIMEOUT)
                .map_err(|e| QueueError::storage(format!("the end of {topic}"), e))?;
            Ok(ScanFrom {
                topic: topic.to_string(),
                partition,
                offset: high,
            })
        })
        .collect()
}
