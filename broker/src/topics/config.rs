//! Topic settings: what is stored, the broker's defaults, and validation.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::TopicError;
use crate::storage::{Compression, FlushPolicy, LogConfig};

/// A batch is cut at this size (or half a segment, if smaller).
const MAX_BATCH_BYTES: u64 = 16 * 1024 * 1024;

/// A topic's settings as stored in `meta/topics.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub partitions: u32,
    /// `None`: kept forever.
    pub retention_ms: Option<u64>,
    /// `None`: no size limit.
    pub retention_bytes: Option<u64>,
    /// `every-batch`, `interval(Nms)` or `os`.
    pub flush: String,
    pub max_record_bytes: u32,
    pub segment_bytes: u64,
    /// How a consumer group's nacked records of this topic are retried and
    /// dead-lettered (settings written before DLQs existed read as the
    /// defaults).
    #[serde(default)]
    pub dead_letters: DeadLetterConfig,
    /// `producer` (batches kept as their producers compressed them), or
    /// `none`, `lz4` or `zstd` to force that codec on every stored batch.
    /// Settings written before compression existed read as `producer`.
    #[serde(default = "producer_compression")]
    pub compression: String,
}

/// The `compression` setting that keeps each producer's choice.
pub const PRODUCER_COMPRESSION: &str = "producer";

fn producer_compression() -> String {
    PRODUCER_COMPRESSION.to_owned()
}

/// Retry and dead-letter settings of a topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeadLetterConfig {
    /// Deliveries a record gets in all (the first included) before it is
    /// dead-lettered.
    pub max_deliveries: u32,
    pub retry_backoff_ms: u64,
    pub retry_backoff_multiplier: f64,
    pub retry_backoff_max_ms: u64,
    /// The DLQ topic's name; `{topic}` and `{group}` are replaced. One DLQ
    /// per (topic, group) unless the template leaves `{group}` out.
    pub dlq_topic: String,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        let policy = crate::dlq::RetryPolicy::default();
        DeadLetterConfig {
            max_deliveries: policy.max_deliveries,
            retry_backoff_ms: policy.initial_backoff.as_millis() as u64,
            retry_backoff_multiplier: policy.multiplier,
            retry_backoff_max_ms: policy.max_backoff.as_millis() as u64,
            dlq_topic: "{topic}.{group}.dlq".into(),
        }
    }
}

/// A group's changes to a topic's retry and dead-letter settings; `None`
/// keeps the topic's value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterPatch {
    pub max_deliveries: Option<u32>,
    pub retry_backoff_ms: Option<u64>,
    pub retry_backoff_multiplier: Option<f64>,
    pub retry_backoff_max_ms: Option<u64>,
    pub dlq_topic: Option<String>,
}

impl DeadLetterPatch {
    pub fn is_empty(&self) -> bool {
        *self == DeadLetterPatch::default()
    }
}

impl DeadLetterConfig {
    /// These settings changed by `patch`, validated.
    pub fn patched(&self, patch: &DeadLetterPatch) -> Result<DeadLetterConfig, TopicError> {
        let config = self.merged(patch);
        config.validate()?;
        Ok(config)
    }

    fn merged(&self, patch: &DeadLetterPatch) -> DeadLetterConfig {
        DeadLetterConfig {
            max_deliveries: patch.max_deliveries.unwrap_or(self.max_deliveries),
            retry_backoff_ms: patch.retry_backoff_ms.unwrap_or(self.retry_backoff_ms),
            retry_backoff_multiplier: patch
                .retry_backoff_multiplier
                .unwrap_or(self.retry_backoff_multiplier),
            retry_backoff_max_ms: patch
                .retry_backoff_max_ms
                .unwrap_or(self.retry_backoff_max_ms),
            dlq_topic: patch
                .dlq_topic
                .clone()
                .unwrap_or_else(|| self.dlq_topic.clone()),
        }
    }

    pub fn policy(&self) -> crate::dlq::RetryPolicy {
        crate::dlq::RetryPolicy {
            max_deliveries: self.max_deliveries,
            initial_backoff: Duration::from_millis(self.retry_backoff_ms),
            multiplier: self.retry_backoff_multiplier,
            max_backoff: Duration::from_millis(self.retry_backoff_max_ms),
        }
    }

    /// The DLQ topic of `topic` for `group`.
    pub fn dlq_topic(&self, topic: &str, group: &str) -> String {
        self.dlq_topic
            .replace("{topic}", topic)
            .replace("{group}", group)
    }

    fn validate(&self) -> Result<(), TopicError> {
        if self.max_deliveries == 0 {
            return Err(TopicError::InvalidConfig(
                "max_deliveries must be at least 1".into(),
            ));
        }
        if !(self.retry_backoff_multiplier.is_finite()
            && (1.0..=100.0).contains(&self.retry_backoff_multiplier))
        {
            return Err(TopicError::InvalidConfig(format!(
                "retry backoff multiplier {} is outside 1..=100",
                self.retry_backoff_multiplier
            )));
        }
        if self.retry_backoff_max_ms < self.retry_backoff_ms {
            return Err(TopicError::InvalidConfig(format!(
                "the largest retry backoff ({} ms) is below the first ({} ms)",
                self.retry_backoff_max_ms, self.retry_backoff_ms
            )));
        }
        // What the template makes must be a topic name for any group id.
        if let Some(reason) = name_rule_violation(&self.dlq_topic("t", "g")) {
            return Err(TopicError::InvalidConfig(format!(
                "DLQ topic template {:?}: {reason}",
                self.dlq_topic
            )));
        }
        Ok(())
    }
}

/// Settings a request asks for; `None` leaves the default (create) or the
/// current value (alter). A retention of 0 means "none".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicConfigPatch {
    pub partitions: Option<u32>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub flush: Option<String>,
    pub max_record_bytes: Option<u32>,
    pub segment_bytes: Option<u64>,
    pub max_deliveries: Option<u32>,
    pub retry_backoff_ms: Option<u64>,
    pub retry_backoff_multiplier: Option<f64>,
    pub retry_backoff_max_ms: Option<u64>,
    pub dlq_topic: Option<String>,
    pub compression: Option<String>,
}

/// The broker-wide defaults and limits for topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDefaults {
    pub partitions: u32,
    pub max_partitions: u32,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub flush: FlushPolicy,
    pub max_record_bytes: u32,
    pub segment_bytes: u64,
    /// The largest `max_record_bytes` any topic may have. The daemon sets it
    /// 1 KiB below the gRPC message limit, so that every record a producer
    /// can send also fits in a message back to a consumer.
    pub max_record_bytes_limit: u32,
    /// Broker-wide: an idempotent producer idle this long is forgotten; its
    /// next batch must start a new epoch.
    pub producer_expiry: Duration,
}

impl Default for TopicDefaults {
    fn default() -> Self {
        TopicDefaults {
            partitions: 1,
            max_partitions: 1024,
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            flush: FlushPolicy::EveryBatch,
            max_record_bytes: 1024 * 1024,
            segment_bytes: crate::storage::DEFAULT_SEGMENT_BYTES,
            max_record_bytes_limit: 64 * 1024 * 1024 - 1024,
            producer_expiry: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl TopicDefaults {
    /// A new topic's settings: `patch` over the defaults, validated.
    pub fn config(&self, patch: &TopicConfigPatch) -> Result<TopicConfig, TopicError> {
        let base = TopicConfig {
            partitions: self.partitions,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            flush: self.flush.to_string(),
            max_record_bytes: self.max_record_bytes,
            segment_bytes: self.segment_bytes,
            dead_letters: DeadLetterConfig::default(),
            compression: producer_compression(),
        };
        let mut config = base.apply(patch);
        config.partitions = patch.partitions.unwrap_or(self.partitions);
        if config.partitions == 0 || config.partitions > self.max_partitions {
            return Err(TopicError::InvalidConfig(format!(
                "partition count {} is outside 1..={}",
                config.partitions, self.max_partitions
            )));
        }
        self.check_limits(&config)?;
        Ok(config)
    }

    /// Checks settings against the broker's limits (beyond what makes a
    /// valid log): for a new topic, and for a topic's settings after a
    /// change.
    pub fn check_limits(&self, config: &TopicConfig) -> Result<(), TopicError> {
        if config.max_record_bytes > self.max_record_bytes_limit {
            return Err(TopicError::InvalidConfig(format!(
                "the largest record size {} is above the broker's limit of {} bytes \
                 (its message size limit less 1 KiB)",
                config.max_record_bytes, self.max_record_bytes_limit
            )));
        }
        config.log_config()?;
        Ok(())
    }
}

impl TopicConfig {
    fn apply(&self, patch: &TopicConfigPatch) -> TopicConfig {
        let zero_is_none = |v: u64| (v > 0).then_some(v);
        TopicConfig {
            partitions: self.partitions,
            retention_ms: patch.retention_ms.map_or(self.retention_ms, zero_is_none),
            retention_bytes: patch
                .retention_bytes
                .map_or(self.retention_bytes, zero_is_none),
            flush: patch.flush.clone().unwrap_or_else(|| self.flush.clone()),
            max_record_bytes: patch.max_record_bytes.unwrap_or(self.max_record_bytes),
            segment_bytes: patch.segment_bytes.unwrap_or(self.segment_bytes),
            // Validated with the rest by `log_config`.
            dead_letters: self.dead_letters.merged(&DeadLetterPatch {
                max_deliveries: patch.max_deliveries,
                retry_backoff_ms: patch.retry_backoff_ms,
                retry_backoff_multiplier: patch.retry_backoff_multiplier,
                retry_backoff_max_ms: patch.retry_backoff_max_ms,
                dlq_topic: patch.dlq_topic.clone(),
            }),
            compression: patch
                .compression
                .clone()
                .unwrap_or_else(|| self.compression.clone()),
        }
    }

    /// These settings changed by `patch`, validated. The partition count
    /// cannot change.
    pub fn patched(&self, patch: &TopicConfigPatch) -> Result<TopicConfig, TopicError> {
        if let Some(partitions) = patch.partitions
            && partitions != self.partitions
        {
            return Err(TopicError::InvalidConfig(format!(
                "the partition count ({}) cannot be changed (asked for {partitions})",
                self.partitions
            )));
        }
        let config = self.apply(patch);
        config.log_config()?;
        Ok(config)
    }

    pub fn flush_policy(&self) -> Result<FlushPolicy, TopicError> {
        self.flush
            .parse()
            .map_err(|e: crate::storage::StorageError| TopicError::InvalidConfig(e.to_string()))
    }

    /// The largest batch one produce request writes to one partition: a
    /// batch is cut at 16 MiB, or half a segment if that is smaller. An
    /// idempotent request beyond it is refused, a plain one split;
    /// `DescribeTopic` reports it so producers cut their batches to fit.
    pub fn batch_limit(&self) -> u64 {
        MAX_BATCH_BYTES.min(self.segment_bytes / 2)
    }

    /// The codec every stored batch must have, if the topic forces one;
    /// `None` keeps each producer's choice.
    pub fn forced_compression(&self) -> Result<Option<Compression>, TopicError> {
        if self.compression == PRODUCER_COMPRESSION {
            return Ok(None);
        }
        Compression::from_name(&self.compression)
            .map(Some)
            .ok_or_else(|| {
                TopicError::InvalidConfig(format!(
                    "compression {:?} is not one of \"producer\", \"none\", \"lz4\" or \"zstd\"",
                    self.compression
                ))
            })
    }

    /// The storage settings of each partition (and a check of the rest).
    pub fn log_config(&self) -> Result<LogConfig, TopicError> {
        self.dead_letters.validate()?;
        self.forced_compression()?;
        if self.max_record_bytes == 0 {
            return Err(TopicError::InvalidConfig(
                "the largest record size must be at least 1 byte".into(),
            ));
        }
        // A batch of one maximal record must fit in a segment.
        if u64::from(self.max_record_bytes) + 4096 > self.segment_bytes {
            return Err(TopicError::InvalidConfig(format!(
                "records of up to {} bytes do not fit in segments of {} bytes",
                self.max_record_bytes, self.segment_bytes
            )));
        }
        let config = LogConfig {
            segment_bytes: self.segment_bytes,
            flush: self.flush_policy()?,
            retention_age: self.retention_ms.map(Duration::from_millis),
            retention_bytes: self.retention_bytes,
            ..LogConfig::default()
        };
        config
            .validate()
            .map_err(|e| TopicError::InvalidConfig(e.to_string()))?;
        Ok(config)
    }
}

/// Kafka's rules: 1 to 249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<(), TopicError> {
    match name_rule_violation(name) {
        Some(reason) => Err(TopicError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// What is wrong with `name` as a topic name or group id (both follow
/// Kafka's rules, and both become file or record keys), if anything.
pub fn name_rule_violation(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("it is empty");
    }
    if name.len() > 249 {
        return Some("it is longer than 249 characters");
    }
    if name == "." || name == ".." {
        return Some("\".\" and \"..\" are reserved");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Some("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kafka_rules() {
        for good in ["orders", "a", "Orders.v2_x-1", &"x".repeat(249)] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "has space",
            "slash/no",
            "ünï",
            &"x".repeat(250),
        ] {
            assert!(validate_topic_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn defaults_fill_in_and_zero_retention_means_forever() {
        let defaults = TopicDefaults::default();
        let config = defaults
            .config(&TopicConfigPatch {
                partitions: Some(3),
                retention_ms: Some(0),
                flush: Some("os".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(config.partitions, 3);
        assert_eq!(config.retention_ms, None);
        assert_eq!(config.flush, "os");
        assert_eq!(config.max_record_bytes, defaults.max_record_bytes);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let defaults = TopicDefaults::default();
        for (patch, needle) in [
            (
                TopicConfigPatch {
                    partitions: Some(0),
                    ..Default::default()
                },
                "partition count",
            ),
            (
                TopicConfigPatch {
                    partitions: Some(5000),
                    ..Default::default()
                },
                "partition count",
            ),
            (
                TopicConfigPatch {
                    flush: Some("sometimes".into()),
                    ..Default::default()
                },
                "flush policy",
            ),
            (
                TopicConfigPatch {
                    segment_bytes: Some(10),
                    ..Default::default()
                },
                "do not fit",
            ),
        ] {
            let err = defaults.config(&patch).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = defaults
            .config(&TopicConfigPatch {
                max_record_bytes: Some(defaults.max_record_bytes_limit + 1),
                segment_bytes: Some(crate::storage::DEFAULT_SEGMENT_BYTES),
                ..Default::default()
            })
            .unwrap_err();
        assert!(
            err.to_string().contains("above the broker's limit"),
            "{err}"
        );
        let config = defaults.config(&TopicConfigPatch::default()).unwrap();
        let err = config
            .patched(&TopicConfigPatch {
                partitions: Some(2),
                ..Default::default()
            })
            .unwrap_err();
        assert!(err.to_string().contains("cannot be changed"), "{err}");
    }
}
