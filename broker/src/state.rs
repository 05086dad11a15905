//! The broker's state that every front door stands on, and the operations
//! that span more than one layer.
//!
//! [`BrokerState`] holds the layers the gRPC server ([`crate::server`]) and
//! the Kafka listener ([`crate::kafka`]) both call: topics, groups and
//! their offsets, and the retry sets of DLQs. An operation that must touch
//! several of them in one order lives here once, so the two protocols
//! cannot drift apart: deleting a topic (the topic, then
//! every group's offsets of it, then its retries), and the write step of a
//! produce ([`append_batch`]). It knows no wire format.

use std::sync::Arc;

use sluice_format::{EncodedBatch, ProducerInfo};

use crate::dlq::RetrySets;
use crate::groups::GroupCoordinator;
use crate::metrics::ProduceMetrics;
use crate::producers::{ProducerAppend, ProducerAppendError, SequenceError};
use crate::storage::StorageError;
use crate::topics::{Topic, TopicError, TopicId, TopicRegistry};

/// The layers the front doors call.
#[derive(Clone)]
pub struct BrokerState {
    pub topics: Arc<TopicRegistry>,
    pub groups: Arc<GroupCoordinator>,
    pub retries: Arc<RetrySets>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteTopicError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// The topic is gone, but the groups' offsets or retries of it could
    /// not be dropped; they are bound to the deleted incarnation, never
    /// served, and dropped at the next start.
    #[error("topic deleted, but dropping its group state failed: {0}")]
    GroupState(#[from] StorageError),
}

/// Deletes topic `name` and the groups' state of it: committed offsets and
/// retries. Blocks (it syncs files): call it on the blocking pool.
///
/// Not atomic: after a crash between the steps, the state left behind is
/// bound to the deleted topic's incarnation, so a topic created later under
/// this name never obeys it, and the next start drops it. Only the deleted
/// incarnation's state goes: a topic of the same name created in the
/// meantime keeps what it has.
pub fn delete_topic(
    topics: &TopicRegistry,
    groups: &GroupCoordinator,
    retries: &RetrySets,
    name: &str,
    now_ms: i64,
) -> Result<TopicId, DeleteTopicError> {
    let deleted = topics.delete(name)?;
    groups.offsets().delete_topic(name, deleted, now_ms)?;
    retries.delete_topic(name, deleted)?;
    Ok(deleted)
}

/// Why a produced batch was not appended.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    #[error(transparent)]
    Topic(#[from] TopicError),
    /// Fenced, out of sequence, or the log's own failure.
    #[error(transparent)]
    Append(#[from] ProducerAppendError),
}

/// The write step of every produce, whichever protocol it came over:
/// appends one checked batch to `partition` of `topic` through its
/// idempotent appender (a retried batch is answered with its original
/// offsets and not written), without waiting for the sync. Blocks: call it
/// on the blocking pool. Records the batch, the duplicate or the fencing
/// in `metrics`.
///
/// An older epoch of a producer is refused on every partition once a newer
/// one was handed out, whether or not the newer one has written here; the
/// fence guard, held across the append, keeps a newer epoch from being
/// published while this batch is written.
pub fn append_batch(
    topics: &TopicRegistry,
    topic: &Topic,
    partition: u32,
    batch: &EncodedBatch,
    now_ms: i64,
    metrics: Option<&ProduceMetrics>,
) -> Result<ProducerAppend, AppendError> {
    let fenced = |e: &SequenceError| {
        if let (Some(m), SequenceError::Fenced { .. }) = (metrics, e) {
            m.fenced.inc();
        }
    };
    let producer = batch.header().producer;
    let _fence = if producer == ProducerInfo::NONE {
        None
    } else {
        Some(
            topics
                .producer_ids()
                .fence(producer.producer_id, producer.epoch)
                .inspect_err(fenced)
                .map_err(ProducerAppendError::from)?,
        )
    };
    let appended = topic
        .partition(partition)?
        .appender()
        .write(batch, now_ms)
        .inspect_err(|e| {
            if let ProducerAppendError::Sequence(e) = e {
                fenced(e);
            }
        })?;
    if let Some(m) = metrics {
        if appended.duplicate {
            m.duplicates.inc();
        } else {
            m.batch_records
                .observe(f64::from(batch.header().record_count));
            m.batch_bytes.observe(batch.len() as f64);
        }
    }
    Ok(appended)
}

impl BrokerState {
    /// [`delete_topic`] on this broker's layers.
    pub fn delete_topic(&self, name: &str, now_ms: i64) -> Result<TopicId, DeleteTopicError> {
        delete_topic(&self.topics, &self.groups, &self.retries, name, now_ms)
    }
}

/// The broker's wall clock in milliseconds since the Unix epoch: record
/// timestamps the producer left unset, commit times.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
