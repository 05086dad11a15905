//! Prometheus metrics: the registry, the hot-path handles the other areas
//! record into, the collectors that read the broker's state at scrape time,
//! and the `/metrics` HTTP listener.
//!
//! It owns every metric name, label and bucket layout, and the exposition
//! (prometheus-client's text encoder; nothing here writes the format by
//! hand). It records nothing itself on the request path: [`crate::server`]
//! records RPCs (through [`RpcLayer`]), [`crate::kafka`] its requests
//! and connections ([`KafkaMetrics`]), produce batches, producer
//! duplicates and fencing, dead letters and redrives into the handles held
//! by [`Metrics`]; storage's sync hook ([`crate::storage::StorageObserver`])
//! feeds the fsync and group-commit histograms. Everything that describes
//! state (offsets, sizes, segments, traffic counters, lag, members, retry
//! sets, producers, the process) is read only when Prometheus scrapes, by
//! the collectors in `state`, so the hot path pays nothing for it.
//! Storage, topics, groups, DLQ and producers know nothing of this module.
//!
//! - [`Metrics`]: the registry and the recording handles ([`ProduceMetrics`],
//!   [`DlqMetrics`]).
//! - [`RpcLayer`]: the tower layer on the gRPC server: requests, errors by
//!   status code, and latency per method.
//! - `state`: the scrape-time collectors (per topic, or per partition
//!   unless [`MetricsSettings::per_partition`] is off).
//! - [`serve_metrics`]: the HTTP listener answering `GET /metrics`.

mod http;
mod rpc;
mod state;

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::dlq::RetrySets;
use crate::groups::GroupCoordinator;
use crate::topics::TopicRegistry;

pub use http::serve_metrics;
pub use rpc::RpcLayer;
pub use state::process_start_time;

/// The default metrics address; 9644 is not taken by a well-known exporter.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9644";

/// What the metrics report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsSettings {
    /// Series per partition (labels `topic`, `partition`) as well as per
    /// topic; off, topic series are sums over the topic's partitions and
    /// group lag is per group and topic. Off for brokers with very many
    /// partitions, whose scrape would otherwise carry a series per partition
    /// and metric.
    pub per_partition: bool,
}

impl Default for MetricsSettings {
    fn default() -> Self {
        MetricsSettings {
            per_partition: true,
        }
    }
}

/// Produce-path handles: recorded once per batch, never per record.
#[derive(Debug, Clone)]
pub struct ProduceMetrics {
    /// Records per batch written.
    pub batch_records: Histogram,
    /// Encoded bytes per batch written.
    pub batch_bytes: Histogram,
    /// Batches an idempotent producer resent that were already written,
    /// answered with their original offsets.
    pub duplicates: Counter,
    /// Requests refused because their producer epoch was fenced.
    pub fenced: Counter,
}

/// The Kafka listener's handles (labels are the API's name, from the
/// served list, so a client cannot create series).
#[derive(Debug, Clone)]
pub struct KafkaMetrics {
    /// Requests answered (or, for acks 0, handled), by API.
    pub requests: Family<Vec<(&'static str, &'static str)>, Counter>,
    /// Time from a request's frame read to its answer written, by API.
    pub latency: Family<Vec<(&'static str, &'static str)>, Histogram>,
    /// Connections open now.
    pub connections: Gauge,
    /// Connections the listener closed for a bad frame (over the limit,
    /// cut short, unreadable).
    pub refused_connections: Counter,
}

impl KafkaMetrics {
    /// Counts one request of `api` that took `elapsed`.
    pub fn observe(&self, api: &'static str, elapsed: Duration) {
        let labels = vec![("api", api)];
        self.requests.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
}

/// Dead-letter handles.
#[derive(Debug, Clone, Default)]
pub struct DlqMetrics {
    /// Records appended to a dead-letter topic.
    pub dead_letters: Counter,
    /// Records redriven out of a dead-letter topic.
    pub redriven: Counter,
    /// Nacks received.
    pub nacks: Counter,
}

/// Storage's sync hook, recording into histograms.
#[derive(Debug, Clone)]
struct StorageMetrics {
    fsync_seconds: Histogram,
    group_commit_batches: Histogram,
    retention_segments: Counter,
    retention_bytes: Counter,
}

impl crate::storage::StorageObserver for StorageMetrics {
    fn synced(&self, elapsed: Duration, batches: u64) {
        self.fsync_seconds.observe(elapsed.as_secs_f64());
        self.group_commit_batches.observe(batches as f64);
    }

    fn retention_deleted(&self, segments: u64, bytes: u64) {
        self.retention_segments.inc_by(segments);
        self.retention_bytes.inc_by(bytes);
    }
}

/// The registry and the handles areas record into. One per broker; cheap
/// to share (`Arc`).
#[derive(Debug)]
pub struct Metrics {
    registry: RwLock<Registry>,
    settings: MetricsSettings,
    pub produce: ProduceMetrics,
    pub dlq: DlqMetrics,
    pub kafka: KafkaMetrics,
    storage: StorageMetrics,
    rpc: Arc<rpc::RpcMetrics>,
}

/// Latency buckets from 100 µs to about 13 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 18)
}

impl Metrics {
    pub fn new(settings: MetricsSettings) -> Metrics {
        let mut registry = Registry::default();
        let produce = ProduceMetrics {
            batch_records: Histogram::new(exponential_buckets(1.0, 4.0, 10)),
            batch_bytes: Histogram::new(exponential_buckets(64.0, 4.0, 11)),
            duplicates: Counter::default(),
            fenced: Counter::default(),
        };
        registry.register(
            "sluice_produce_batch_records",
            "Records per batch written by produce requests",
            produce.batch_records.clone(),
        );
        registry.register(
            "sluice_produce_batch_bytes",
            "Encoded bytes per batch written by produce requests",
            produce.batch_bytes.clone(),
        );
        registry.register(
            "sluice_producer_duplicates",
            "Idempotent batches that were retries of written ones, answered with their original offsets",
            produce.duplicates.clone(),
        );
        registry.register(
            "sluice_producer_fenced",
            "Produce requests refused because a newer epoch of their producer exists",
            produce.fenced.clone(),
        );
        let dlq = DlqMetrics::default();
        registry.register(
            "sluice_dlq_dead_letters",
            "Records appended to dead-letter topics",
            dlq.dead_letters.clone(),
        );
        registry.register(
            "sluice_dlq_redriven_records",
            "Records redriven out of dead-letter topics",
            dlq.redriven.clone(),
        );
        registry.register(
            "sluice_dlq_nacks",
            "Records nacked by group members",
            dlq.nacks.clone(),
        );
        let storage = StorageMetrics {
            fsync_seconds: Histogram::new(latency_buckets()),
            group_commit_batches: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            retention_segments: Counter::default(),
            retention_bytes: Counter::default(),
        };
        registry.register(
            "sluice_storage_fsync_duration_seconds",
            "Time of one sync of a log's written range (topics and the broker's state logs)",
            storage.fsync_seconds.clone(),
        );
        registry.register(
            "sluice_storage_group_commit_batches",
            "Batches made durable by one sync (group commit)",
            storage.group_commit_batches.clone(),
        );
        registry.register(
            "sluice_storage_retention_deleted_segments",
            "Segments deleted by retention",
            storage.retention_segments.clone(),
        );
        registry.register(
            "sluice_storage_retention_deleted_bytes",
            "Bytes of segments deleted by retention",
            storage.retention_bytes.clone(),
        );
        let kafka = KafkaMetrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            connections: Gauge::default(),
            refused_connections: Counter::default(),
        };
        registry.register(
            "sluice_kafka_requests",
            "Kafka requests handled, by API",
            kafka.requests.clone(),
        );
        registry.register(
            "sluice_kafka_request_duration_seconds",
            "Kafka request latency, from the frame read to the answer written, by API",
            kafka.latency.clone(),
        );
        registry.register(
            "sluice_kafka_connections",
            "Kafka connections open",
            kafka.connections.clone(),
        );
        registry.register(
            "sluice_kafka_refused_connections",
            "Kafka connections closed by the broker for a bad frame (over the limit, cut short, unreadable)",
            kafka.refused_connections.clone(),
        );
        let rpc = Arc::new(rpc::RpcMetrics::new(&mut registry));
        registry.register_collector(Box::new(state::ProcessCollector::new()));
        Metrics {
            registry: RwLock::new(registry),
            settings,
            produce,
            dlq,
            kafka,
            storage,
            rpc,
        }
    }

    pub fn settings(&self) -> MetricsSettings {
        self.settings
    }

    /// Adds the collectors that read topics, groups and retry sets at
    /// scrape time.
    pub fn watch_state(
        &self,
        topics: Arc<TopicRegistry>,
        groups: Arc<GroupCoordinator>,
        retries: Arc<RetrySets>,
    ) {
        self.registry
            .write()
            .register_collector(Box::new(state::StateCollector {
                topics,
                groups,
                retries,
                per_partition: self.settings.per_partition,
            }));
    }

    /// Makes this the process's storage observer (fsync, group commit and
    /// retention). Only the first call in a process takes effect.
    pub fn observe_storage(&self) -> bool {
        crate::storage::set_observer(Box::new(self.storage.clone()))
    }

    /// The gRPC layer that records requests into these metrics.
    pub fn rpc_layer(&self) -> RpcLayer {
        RpcLayer::new(Some(Arc::clone(&self.rpc)))
    }

    /// The exposition in the Prometheus text format (version 0.0.4).
    /// Fails only if a collector does (a label that cannot be written).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::with_capacity(64 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry.read())?;
        Ok(text)
    }
}

/// The `Content-Type` of [`Metrics::encode`].
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
