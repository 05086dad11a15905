//! The Kafka front door: Kafka's wire protocol over TCP, translated at the
//! edge onto the same layers the gRPC server calls.
//!
//! This module owns the Kafka listener: framing, request and response
//! headers, which APIs and versions are served ([`SUPPORTED_APIS`]), and the
//! translation of each request into calls on [`crate::topics`],
//! [`crate::state::append_batch`] (the write step every produce takes) and
//! [`crate::groups`] (the classic group protocol and the shared offset
//! store). Kafka's messages are coded by the `kafka-protocol` crate
//! (patched, vendor/README.md); only the records inside a record batch are
//! read and written here ([`batch_from_kafka`], [`kafka_batches`]), because
//! the crate's record type keeps one header per key.
//!
//! It does *not* own storage or a second copy of any rule: records land
//! through the same fence, appender, record-size rule and metrics as a gRPC
//! produce, and it never reaches into [`crate::storage`] by a path of its
//! own. Sluice is one node: node 0 leads every partition, at the advertised
//! address.
//!
//! A connection is served one request at a time, in order, as Kafka's
//! brokers do (a client that pipelines gets its answers in order). A frame
//! larger than the limit, a truncated frame or a header that cannot be
//! read closes that connection only; a body that cannot be decoded is
//! answered with INVALID_REQUEST where the API has an error code to carry
//! it, and otherwise closes the connection. Nothing is written to a log
//! until a whole produce request decoded and passed its checks.
//!
//! Callers have no credentials on this listener (no SASL yet): every
//! request is checked as the anonymous principal against the broker's
//! access rules, which with authentication off allow everything.
//!
//! Files:
//! - `mod.rs`: [`KafkaSettings`], [`serve`] (accept loop, group ticks);
//! - `connection.rs`: framing, headers, dispatch, error answers;
//! - `versions.rs`: the APIs and versions served, ApiVersions;
//! - `records.rs`: Kafka record batch v2 ⇄ Sluice batches;
//! - `produce.rs`: Produce and InitProducerId;
//! - `fetch.rs`: Fetch (long poll) and ListOffsets;
//! - `admin.rs`: Metadata, CreateTopics, DeleteTopics, DescribeConfigs,
//!   DescribeCluster, FindCoordinator;
//! - `groups.rs`: the classic group APIs and offsets;
//! - `errors.rs`: Sluice errors as Kafka error codes.

mod admin;
mod connection;
mod errors;
mod fetch;
mod groups;
mod produce;
mod records;
mod versions;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{Authorizer, Operation, Principal, Resource};
use crate::metrics::Metrics;
use crate::state::BrokerState;
use crate::topics::{Partition, Topic};

pub use connection::{MIN_FRAME_BYTES, ParsedFrame, parse_frame};
pub use errors::{Failure, KafkaCode};
/// The translation at the edge, public for the benchmarks that measure it.
pub use records::{batch_from_kafka, kafka_batches};
pub use versions::SUPPORTED_APIS;

/// The node id of this broker in every Kafka answer.
pub const NODE_ID: i32 = 0;

/// How often pending rebalances and group sessions are checked.
const GROUP_TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct KafkaSettings {
    /// The `host:port` clients are told to connect to.
    pub advertised: (String, u16),
    /// The largest request frame accepted; a larger one closes the
    /// connection (Kafka's `socket.request.max.bytes`).
    pub max_frame_bytes: usize,
    /// The cluster id answered in Metadata and DescribeCluster.
    pub cluster_id: String,
}

impl KafkaSettings {
    /// Settings for a listener bound at `bound`, advertising `advertised`
    /// (or the bound address).
    pub fn new(bound: SocketAddr, advertised: Option<(String, u16)>) -> KafkaSettings {
        KafkaSettings {
            advertised: advertised.unwrap_or_else(|| (bound.ip().to_string(), bound.port())),
            max_frame_bytes: 100 * 1024 * 1024,
            cluster_id: "sluice".to_owned(),
        }
    }
}

/// What every connection's handlers share.
pub(crate) struct Context {
    pub(crate) state: BrokerState,
    /// `None` when metrics are off.
    pub(crate) metrics: Option<Arc<Metrics>>,
    pub(crate) auth: Arc<Authorizer>,
    /// Every caller of this listener (it authenticates no one).
    pub(crate) principal: Principal,
    pub(crate) settings: KafkaSettings,
    pub(crate) shutdown: watch::Receiver<bool>,
}

impl Context {
    /// May this listener's caller do `operation` on `resource`?
    pub(crate) fn allowed(&self, operation: Operation, resource: Resource) -> bool {
        self.auth.allowed(&self.principal, operation, resource)
    }

    /// Topic `name`, if the caller may do `operation` on it:
    /// TOPIC_AUTHORIZATION_FAILED, or UNKNOWN_TOPIC_OR_PARTITION.
    pub(crate) fn topic(&self, operation: Operation, name: &str) -> Result<Arc<Topic>, Failure> {
        if !self.allowed(operation, Resource::topic(name)) {
            return Err(Failure::new(
                KafkaCode::TopicAuthorizationFailed,
                format!(
                    "principal {:?} may not {} topic {name:?}",
                    self.principal.name,
                    operation.as_str()
                ),
            ));
        }
        Ok(self.state.topics.get(name)?)
    }
}

/// Partition `index` (Kafka's i32) of `topic`, or UNKNOWN_TOPIC_OR_PARTITION.
pub(crate) fn partition_of(topic: &Topic, index: i32) -> Result<&Arc<Partition>, Failure> {
    let partition = u32::try_from(index).map_err(|_| {
        Failure::new(
            KafkaCode::UnknownTopicOrPartition,
            format!("topic {:?} has no partition {index}", topic.name()),
        )
    })?;
    Ok(topic.partition(partition)?)
}

/// Serves Kafka's protocol on `listener` until `shutdown` turns true.
/// Connections open then are closed after their current request.
pub async fn serve(
    state: BrokerState,
    auth: Arc<Authorizer>,
    metrics: Option<Arc<Metrics>>,
    listener: TcpListener,
    settings: KafkaSettings,
    shutdown: watch::Receiver<bool>,
) {
    let context = Arc::new(Context {
        state,
        metrics,
        principal: auth.unauthenticated_principal(),
        auth,
        settings,
        shutdown: shutdown.clone(),
    });
    tokio::spawn(tick_groups(Arc::clone(&context)));
    let mut stopping = shutdown;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                // Small answers (a produce acknowledgement) must not wait
                // for the client's delayed ACK.
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection::serve_connection(
                    stream,
                    peer,
                    Arc::clone(&context),
                ));
            }
            Err(e) => {
                // Out of descriptors, say: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a Kafka connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Completes rebalances whose wait is over and removes members whose
/// session ran out, so a waiting JoinGroup is answered on time.
async fn tick_groups(context: Arc<Context>) {
    let mut ticks = tokio::time::interval(GROUP_TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = context.shutdown.clone();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        context
            .state
            .groups
            .expire_sessions(std::time::Instant::now());
    }
}
