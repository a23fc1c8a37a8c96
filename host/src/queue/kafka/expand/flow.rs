//! Flow control for sweep expansion: how far a band is ahead of the hosts
//! that run it. The lag of a band is what has been written to it and not
//! yet committed by the workers' group (the sum over its partitions of the
//! high watermark minus the group's committed offset): tasks waiting in the
//! topic, in hosts' read-ahead buffers, or running. An expander writes
//! more points only while that lag is under its target, so a 50M-point job
//! occupies the brokers and the hosts' memory no more than a small job does.
//!
//! Lags are kept partition by partition, and points go to the band's
//! least-lagged partitions ([`Flow::place`]). Placed by key hash instead,
//! a partition no host reads (its host stopped, the group not yet
//! rebalanced) kept its share of every chunk until the whole band's lag sat
//! there and the other hosts ran dry; a slow host's partitions now get
//! fewer points, too.

use super::super::KafkaConfig;
use super::super::wire::ScanFrom;
use crate::queue::QueueError;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
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
    lags: HashMap<String, (BandLag, Instant)>,
    /// How fast each band's points are being finished.
    rates: HashMap<String, DrainRate>,
    /// Seconds of work to keep written ahead, at that rate.
    write_ahead: Duration,
    /// Partitions of each band, and when they were counted.
    partitions: HashMap<String, (i32, Instant)>,
}

/// How often a band's partitions are counted again (an operator may add
/// some).
const PARTITIONS_EVERY: Duration = Duration::from_secs(10);

/// The window a band's finishing rate is measured over.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// How fast a band's committed offsets (the workers' group's) advance:
/// points finished per second, over the last whole [`RATE_WINDOW`].
#[derive(Debug, Default)]
struct DrainRate {
    since: Option<(Instant, u64)>,
    per_second: f64,
}

impl DrainRate {
    /// The band's committed offsets added up to `done` at `at`.
    fn observe(&mut self, at: Instant, done: u64) {
        match self.since {
            Some((start, before)) if at.duration_since(start) >= RATE_WINDOW => {
                let seconds = at.duration_since(start).as_secs_f64();
                self.per_second = done.saturating_sub(before) as f64 / seconds;
                self.since = Some((at, done));
            }
            Some(_) => {}
            None => self.since = Some((at, done)),
        }
    }

    /// The points finished in `span` at this rate.
    fn over(&self, span: Duration) -> u64 {
        (self.per_second * span.as_secs_f64()) as u64
    }
}

/// A band's lag, partition by partition: (partition, written and not
/// committed).
#[derive(Debug, Clone, Default, PartialEq)]
struct BandLag(Vec<(i32, u64)>);

impl BandLag {
    fn total(&self) -> u64 {
        self.0.iter().map(|(_, lag)| lag).sum()
    }

    /// Partitions for `n` points: each to the partition with the least lag
    /// counting the points placed before it (ties to the lower partition).
    fn place(&self, n: u64) -> Vec<i32> {
        let mut least: BinaryHeap<Reverse<(u64, i32)>> = self
            .0
            .iter()
            .map(|&(partition, lag)| Reverse((lag, partition)))
            .collect();
        let mut placed = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let Some(Reverse((lag, partition))) = least.pop() else {
                break;
            };
            placed.push(partition);
            least.push(Reverse((lag + 1, partition)));
        }
        placed
    }

    /// One more point was written to `partition`.
    fn wrote(&mut self, partition: i32) {
        match self.0.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, lag)) => *lag += 1,
            None => self.0.push((partition, 1)),
        }
    }
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
            rates: HashMap::new(),
            write_ahead: Duration::from_millis(config.write_ahead_ms.into()),
            partitions: HashMap::new(),
        })
    }

    /// How many more points may go to `band` now: twice `band_buffer` per
    /// host reading the bands (each host reads ahead `band_buffer` per
    /// band, and the second helping covers the time to write the next
    /// chunk), or `write_ahead_ms` of work at the rate the band is being
    /// finished if that is more (see [`KafkaConfig::write_ahead_ms`]),
    /// less the band's lag.
    pub(super) fn room(&mut self, band: &str) -> Result<u64, QueueError> {
        let lag = self.band_lag(band)?.total();
        let ahead = self
            .rates
            .get(band)
            .map_or(0, |rate| rate.over(self.write_ahead));
        let target = (2 * self.band_buffer * self.hosts()).max(ahead);
        if lag >= target {
            tracing::debug!(band, lag, target, "no room on the band");
        }
        Ok(target.saturating_sub(lag))
    }

    /// The partitions of `band` for `n` points, the least-lagged first
    /// (see the module's doc).
    pub(super) fn place(&mut self, band: &str, n: u64) -> Result<Vec<i32>, QueueError> {
        Ok(self.band_lag(band)?.place(n))
    }

    /// Points were just written to `band`, to these partitions.
    pub(super) fn wrote(&mut self, band: &str, partitions: impl IntoIterator<Item = i32>) {
        if let Some((lag, _)) = self.lags.get_mut(band) {
            for partition in partitions {
                lag.wrote(partition);
            }
        }
    }

    /// `band`'s lag, measured again once [`LAG_FRESH_FOR`] has passed.
    fn band_lag(&mut self, band: &str) -> Result<&BandLag, QueueError> {
        let stale = self
            .lags
            .get(band)
            .is_none_or(|(_, at)| at.elapsed() >= LAG_FRESH_FOR);
        if stale {
            let (lag, done) = self.lag(band)?;
            let now = Instant::now();
            self.rates
                .entry(band.to_string())
                .or_default()
                .observe(now, done);
            self.lags.insert(band.to_string(), (lag, now));
        }
        Ok(&self.lags[band].0)
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

    /// The end of every partition of `band`, asked of the brokers in one
    /// request per broker (a watermark query per partition, one after
    /// another, made the lag a dozen round trips, which the expander paid
    /// before every chunk).
    fn ends(&mut self, band: &str) -> Result<Vec<ScanFrom>, QueueError> {
        let partitions = match self.partitions.get(band) {
            Some((n, at)) if at.elapsed() < PARTITIONS_EVERY => *n,
            _ => {
                let n = partition_count(self.probe.client(), band)?;
                self.partitions
                    .insert(band.to_string(), (n, Instant::now()));
                n
            }
        };
        let mut latest = TopicPartitionList::new();
        for partition in 0..partitions {
            latest
                .add_partition_offset(band, partition, Offset::End)
                .map_err(|e| QueueError::storage(format!("the end of {band}"), e))?;
        }
        let ends = self
            .probe
            .offsets_for_times(latest, TIMEOUT)
            .map_err(|e| QueueError::storage(format!("the end of {band}"), e))?;
        (0..partitions)
            .map(|partition| {
                match ends
                    .find_partition(band, partition)
                    .map(|e| (e.offset(), e.error()))
                {
                    Some((Offset::Offset(offset), Ok(()))) => Ok(ScanFrom {
                        topic: band.to_string(),
                        partition,
                        offset,
                    }),
                    other => Err(QueueError::storage_message(format!(
                        "the end of {band} partition {partition}: {other:?}"
                    ))),
                }
            })
            .collect()
    }

    /// Written and not committed, partition by partition, and the
    /// committed offsets added up (what the band's rate is measured by).
    fn lag(&mut self, band: &str) -> Result<(BandLag, u64), QueueError> {
        let ends = self.ends(band)?;
        let mut list = TopicPartitionList::new();
        for end in &ends {
            list.add_partition(band, end.partition);
        }
        let committed = self
            .probe
            .committed_offsets(list, TIMEOUT)
            .map_err(|e| QueueError::storage(format!("the workers' offsets on {band}"), e))?;
        let mut lag = BandLag::default();
        let mut done_total = 0;
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
            lag.0
                .push((end.partition, (end.offset - done).max(0) as u64));
            done_total += done.max(0) as u64;
        }
        Ok((lag, done_total))
    }
}

/// The end (high watermark) of every partition of `topic`: where the next
/// message written to each will be.
pub(in crate::queue::kafka) fn positions<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<Vec<ScanFrom>, QueueError> {
    (0..partition_count(client, topic)?)
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

/// How many partitions `topic` has (one metadata request).
fn partition_count<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<i32, QueueError> {
    let metadata = client
        .fetch_metadata(Some(topic), TIMEOUT)
        .map_err(|e| QueueError::storage(format!("metadata of {topic}"), e))?;
    Ok(metadata
        .topics()
        .first()
        .map_or(0, |t| t.partitions().len() as i32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(placed: &[i32], partition: i32) -> usize {
        placed.iter().filter(|p| **p == partition).count()
    }

    #[test]
    fn points_spread_evenly_over_equal_partitions() {
        let lag = BandLag(vec![(0, 10), (1, 10), (2, 10), (3, 10)]);
        let placed = lag.place(400);
        assert_eq!(placed.len(), 400);
        for partition in 0..4 {
            assert_eq!(count(&placed, partition), 100);
        }
    }

    #[test]
    fn a_partition_nobody_reads_gets_no_more_points() {
        // Partition 2's host stopped: its lag stays while the others drain.
        let lag = BandLag(vec![(0, 5), (1, 0), (2, 4_000), (3, 20)]);
        let placed = lag.place(3_000);
        assert_eq!(count(&placed, 2), 0);
        // The others are filled to the same level: 5 + 20 + 0 + 3000 over 3.
        let level = |p: i32, before: u64| before + count(&placed, p) as u64;
        let levels = [level(0, 5), level(1, 0), level(3, 20)];
        assert!(
            levels.iter().max().unwrap() - levels.iter().min().unwrap() <= 1,
            "{levels:?}"
        );
    }

    #[test]
    fn the_rate_is_measured_over_whole_windows() {
        let t0 = Instant::now();
        let mut rate = DrainRate::default();
        rate.observe(t0, 1_000);
        rate.observe(t0 + Duration::from_millis(500), 3_000);
        // Not a whole window yet.
        assert_eq!(rate.over(Duration::from_secs(5)), 0);
        rate.observe(t0 + Duration::from_secs(2), 9_000);
        // 8,000 in 2 s: 4,000/s, so 5 s of work is 20,000 points.
        assert_eq!(rate.over(Duration::from_secs(5)), 20_000);
        // Offsets that went back (a topic made again) read as no progress.
        rate.observe(t0 + Duration::from_secs(3), 10);
        assert_eq!(rate.over(Duration::from_secs(5)), 0);
    }

    #[test]
    fn writes_count_towards_their_partition() {
        let mut lag = BandLag(vec![(0, 1), (1, 2)]);
        lag.wrote(1);
        lag.wrote(7);
        assert_eq!(lag, BandLag(vec![(0, 1), (1, 3), (7, 1)]));
        assert_eq!(lag.total(), 5);
    }
}
