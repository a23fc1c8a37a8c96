//! How a host joins a Kafka grid: the `kafka://` store URL and the
//! librdkafka settings every client of the grid shares.

use rdkafka::ClientConfig;
use std::path::PathBuf;

/// The longest fetch wait a store URL may ask for: a host's readers must
/// still notice that it is closing.
const MAX_FETCH_WAIT_MS: u32 = 5_000;

/// The most work a store URL may ask expanders to keep written ahead: an
/// hour's.
const MAX_WRITE_AHEAD_MS: u32 = 3_600_000;

/// How a host joins a Kafka grid: `kafka://host:port[,host:port...][?prefix=kwq.&partitions=8&replication=3]`.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,...`.
    pub brokers: String,
    /// Topic prefix, so several grids can share a cluster.
    pub prefix: String,
    /// Partitions of each priority topic (at least the number of hosts, or
    /// some hosts get none of a band's work).
    pub task_partitions: i32,
    /// Partitions of the event topic.
    pub event_partitions: i32,
    /// Replication factor of created topics.
    pub replication: i32,
    /// This host's view of the grid (an embedded store file).
    pub view_path: PathBuf,
    /// This host's name in worker ids and the consumer group.
    pub host: String,
    /// Tasks read ahead per priority band before its partitions are left unread.
    pub band_buffer: usize,
    /// Extra librdkafka settings (`?kafka.<name>=<value>` in the URL).
    pub extra: Vec<(String, String)>,
    /// How the group shares the band partitions (`?assignor=`):
    /// `roundrobin` (default) deals every band's partitions out over the
    /// hosts, so each host gets some of each band. `cooperative-sticky`
    /// moves only the partitions that must move on a join or death, but it
    /// balances the count of partitions over all topics, not per topic: with
    /// two hosts one got bands 0-4 and the other 5-9, so a job in one band
    /// ran on one host (measured on librdkafka's mock cluster). Kept as an
    /// option for grids that put all work in one band.
    pub assignor: String,
    /// Join the group as a static member (`group.instance.id` = host name),
    /// so a host restarted within the session timeout gets its partitions
    /// back without a rebalance (`?static_membership=false` to turn off).
    pub static_membership: bool,
    /// Leave and rejoin a consumer group whose rebalance handed this host
    /// back exactly the partitions it took (`?rejoin_stale=true`; off by
    /// default). For brokers that keep a dead member's assignment, as
    /// tansu 0.6.0 does (see [`rejoin`](super::rejoin)). On a broker that
    /// handles membership right it only does harm: any rebalance that
    /// leaves the members as they were (a member slow to sync, a rejoin)
    /// hands every host its old partitions, each rejoin then causes another
    /// such rebalance, and the hosts take turns rejoining for good, each
    /// turn a stop of the whole group (seen on librdkafka's mock cluster:
    /// a waiting job left unreleased for two minutes).
    pub rejoin_stale: bool,
    /// Create absent topics at start (`?create_topics=false` where an
    /// operator manages topics, or a broker lacks the admin API).
    pub create_topics: bool,
    /// What this host does in the grid (`kwq serve --role`).
    pub role: Role,
    /// How long a broker may hold a fetch that finds nothing new
    /// (`?fetch_wait_ms=`, librdkafka's `fetch.wait.max.ms`; default 10).
    /// Every reader of a host (task consumer, view, controls, expander)
    /// sends one fetch per broker per wait while idle, so a grid's idle
    /// fetch rate is hosts × readers × 1000 / this. Apache Kafka answers a
    /// waiting fetch as soon as data arrives, so there a longer wait (100 to
    /// 500) costs no latency and cuts that rate; librdkafka's mock cluster
    /// and tansu 0.6.0 hold a fetch for its whole wait (tansu even when it
    /// has data), so there the wait is added to every hop, hence the short
    /// default.
    pub fetch_wait_ms: u32,
    /// How many seconds of work (in ms, `?write_ahead_ms=`; default 5000)
    /// a sweep's expander keeps written ahead of the hosts, at the rate
    /// they have been finishing its band, when that is more than twice
    /// `band_buffer` per host. A membership change stops the expanders'
    /// group for a rebalance (2-4 s on tansu 0.6.0), and the hosts can run
    /// on only what was written ahead meanwhile: 2 × `band_buffer` × hosts
    /// is a fixed count, a few seconds' work at most at 6,000 tasks/s and
    /// less the faster the grid. On a broker that takes writes faster than
    /// the hosts run them (Apache Kafka) this keeps the lead in time; on
    /// tansu 0.6.0 the expander never gets that far ahead (see the README).
    /// More ahead costs broker storage, not host memory, and a job
    /// submitted later at the same priority queues behind it (up to this
    /// long). 0 keeps only the `band_buffer` part.
    pub write_ahead_ms: u32,
}

/// What a host of a Kafka grid does. Reading every event into a view is
/// what limits how many hosts a grid can have (each host reads every
/// host's events), so hosts that only run tasks can leave it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Runs tasks and serves the API from its view (the default).
    #[default]
    All,
    /// Serves the API and the dashboard from its view; runs no tasks and
    /// reads no task topic (it is not in the workers' consumer group).
    Api,
    /// Runs tasks only: reads the priority topics, the control topic and the
    /// modules topic, never the event topic, and keeps no view of tasks (its
    /// store file holds modules and read positions only). What it reads per
    /// task does not grow with the number of hosts or the event rate.
    Worker,
}

impl Role {
    /// Whether this host keeps a view of tasks and jobs (reads the event topic).
    pub fn keeps_view(self) -> bool {
        self != Role::Worker
    }

    /// Whether this host reads the task topics and runs tasks.
    pub fn runs_tasks(self) -> bool {
        self != Role::Api
    }

    /// The role's name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Api => "api",
            Role::Worker => "worker",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(Role::All),
            "api" => Ok(Role::Api),
            "worker" => Ok(Role::Worker),
            _ => Err(format!("role must be all, api or worker, not {s:?}")),
        }
    }
}

impl KafkaConfig {
    /// Parse a `kafka://` URL; the view path and host come from the caller.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("kafka://")
            .ok_or_else(|| format!("{url:?} is not a kafka:// URL"))?;
        let (brokers, query) = rest.split_once('?').unwrap_or((rest, ""));
        if brokers.is_empty() || brokers.split(',').any(|b| !b.contains(':')) {
            return Err(format!(
                "store URL {url:?} needs brokers as host:port[,host:port...]"
            ));
        }
        let mut config = KafkaConfig {
            brokers: brokers.to_string(),
            ..KafkaConfig::default()
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("store URL option {pair:?} needs a value"))?;
            let number = |v: &str| {
                v.parse::<i32>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("store URL option {name} must be a positive number"))
            };
            match name {
                "prefix" => config.prefix = value.to_string(),
                "partitions" => config.task_partitions = number(value)?,
                "event_partitions" => config.event_partitions = number(value)?,
                "replication" => config.replication = number(value)?,
                "band_buffer" => config.band_buffer = number(value)? as usize,
                "assignor" => match value {
                    "cooperative-sticky" | "roundrobin" | "range" => {
                        config.assignor = value.to_string()
                    }
                    _ => {
                        return Err(format!(
                            "store URL option assignor must be cooperative-sticky, roundrobin or range, not {value:?}"
                        ));
                    }
                },
                "static_membership" => {
                    config.static_membership = value.parse().map_err(|_| {
                        "store URL option static_membership must be true or false".to_string()
                    })?
                }
                "rejoin_stale" => {
                    config.rejoin_stale = value.parse().map_err(|_| {
                        "store URL option rejoin_stale must be true or false".to_string()
                    })?
                }
                "fetch_wait_ms" => {
                    config.fetch_wait_ms = number(value)?
                        .try_into()
                        .ok()
                        .filter(|ms| *ms <= MAX_FETCH_WAIT_MS)
                        .ok_or_else(|| {
                            format!(
                                "store URL option fetch_wait_ms must be at most {MAX_FETCH_WAIT_MS}"
                            )
                        })?
                }
                "write_ahead_ms" => {
                    config.write_ahead_ms = value
                        .parse::<u32>()
                        .ok()
                        .filter(|ms| *ms <= MAX_WRITE_AHEAD_MS)
                        .ok_or_else(|| {
                            format!(
                                "store URL option write_ahead_ms must be a number of ms up to {MAX_WRITE_AHEAD_MS}"
                            )
                        })?
                }
                "create_topics" => {
                    config.create_topics = value.parse().map_err(|_| {
                        "store URL option create_topics must be true or false".to_string()
                    })?
                }
                _ => match name.strip_prefix("kafka.") {
                    Some(setting) => config.extra.push((setting.into(), value.into())),
                    None => return Err(format!("unknown store URL option {name:?}")),
                },
            }
        }
        Ok(config)
    }

    /// librdkafka settings every client of this grid shares.
    pub(crate) fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("client.id", format!("kwq-{}", self.host))
            .set("broker.address.family", "v4");
        for (name, value) in &self.extra {
            config.set(name, value);
        }
        config
    }

    /// `fetch.wait.max.ms` for every consumer of this host.
    pub(crate) fn fetch_wait(&self) -> String {
        self.fetch_wait_ms.to_string()
    }

    /// The consumer group every host of the grid joins.
    pub fn group(&self) -> String {
        format!("{}workers", self.prefix)
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            prefix: "kwq.".into(),
            task_partitions: 4,
            event_partitions: 4,
            replication: 1,
            view_path: PathBuf::from("kwq-view.db"),
            host: "host".into(),
            band_buffer: 1000,
            extra: Vec::new(),
            assignor: "roundrobin".into(),
            static_membership: true,
            rejoin_stale: false,
            create_topics: true,
            role: Role::All,
            fetch_wait_ms: 10,
            write_ahead_ms: 5_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::kafka::Topics;

    #[test]
    fn kafka_urls() {
        let c = KafkaConfig::parse(
            "kafka://a:9092,b:9093?prefix=risk.&partitions=12&kafka.security.protocol=plaintext",
        )
        .unwrap();
        assert_eq!(c.brokers, "a:9092,b:9093");
        assert_eq!(c.prefix, "risk.");
        assert_eq!(c.task_partitions, 12);
        assert_eq!(
            c.extra,
            vec![("security.protocol".to_string(), "plaintext".to_string())]
        );
        assert!(KafkaConfig::parse("kafka://").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?partitions=0").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?colour=red").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?assignor=sticky").is_err());
        let eager =
            KafkaConfig::parse("kafka://a:1?assignor=cooperative-sticky&static_membership=false")
                .unwrap();
        assert_eq!(
            (eager.assignor.as_str(), eager.static_membership),
            ("cooperative-sticky", false)
        );
        assert_eq!(c.assignor, "roundrobin");
        assert!(c.static_membership);
        assert!(!c.rejoin_stale);
        assert!(
            KafkaConfig::parse("kafka://a:1?rejoin_stale=true")
                .unwrap()
                .rejoin_stale
        );
        assert!(KafkaConfig::parse("kafka://a:1?rejoin_stale=yes").is_err());
        assert_eq!(c.fetch_wait_ms, 10);
        assert_eq!(
            KafkaConfig::parse("kafka://a:1?fetch_wait_ms=500")
                .unwrap()
                .fetch_wait_ms,
            500
        );
        assert!(KafkaConfig::parse("kafka://a:1?fetch_wait_ms=0").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?fetch_wait_ms=60000").is_err());
        assert_eq!(c.write_ahead_ms, 5_000);
        assert_eq!(
            KafkaConfig::parse("kafka://a:1?write_ahead_ms=0")
                .unwrap()
                .write_ahead_ms,
            0
        );
        assert!(KafkaConfig::parse("kafka://a:1?write_ahead_ms=-1").is_err());
        assert!(KafkaConfig::parse("kafka://a:1?write_ahead_ms=99999999").is_err());
        assert_eq!(Topics::new("kwq.").priority_of("kwq.tasks.p7"), Some(7));
        assert_eq!(Topics::new("kwq.").priority_of("kwq.events"), None);
    }
}
