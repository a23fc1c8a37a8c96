//! Choosing a backend: a store URL (`--store`) names it, and [`open`]
//! opens it. The one place URLs are parsed and backends are matched.

use super::embedded::{EmbeddedConfig, EmbeddedQueue};
use super::kafka::{KafkaConfig, KafkaQueue};
use super::{Queue, QueueError};
use std::path::PathBuf;
use std::sync::Arc;

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
                "kafka://{} (role {}, view {})",
                kafka.brokers,
                kafka.role.as_str(),
                kafka.view_path.display()
            ),
        }
    }

    /// Parse `sqlite://PATH` (or a bare path) or `kafka://HOST:PORT,...[?options]`
    /// (see [`KafkaConfig::parse`]; the view path and host name are set by the caller).
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(path) = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
        {
            if path.is_empty() {
                return Err(format!("store URL {text:?} has no path; use sqlite://PATH"));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if text.starts_with("kafka://") {
            return KafkaConfig::parse(text).map(|c| StoreUrl::Kafka(Box::new(c)));
        }
        if text.contains("://") {
            return Err(format!(
                "unknown store URL {text:?}; use sqlite://PATH or kafka://HOST:PORT"
            ));
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(text)))
    }
}

/// Open the store a URL names: the embedded SQLite store (recovering what
/// the last process left), or this host's place in a Kafka grid (its view
/// at the configured path). `config` tunes the scheduler of either.
pub async fn open(store: &StoreUrl, config: &EmbeddedConfig) -> Result<Arc<dyn Queue>, QueueError> {
    Ok(match store {
        StoreUrl::Sqlite(path) => Arc::new(EmbeddedQueue::open(path, config.clone())?),
        StoreUrl::Kafka(kafka) => Arc::new(
            KafkaQueue::connect((**kafka).clone(), config.aging, config.affinity_window).await?,
        ),
    })
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
