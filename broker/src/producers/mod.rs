//! Idempotent producers: retries never write a batch twice.
//!
//! This module owns producer identity and sequence bookkeeping, in the
//! manner of Kafka's KIP-98 and KIP-360:
//!
//! - [`ProducerIds`] hands out producer ids and epochs, broker-wide. A named
//!   producer that initialises again gets the same id with the next epoch,
//!   which fences the older instance on every partition at once: each
//!   idempotent append is checked against the newest epoch of its producer
//!   id ([`ProducerIds::fence`]), not only against the epochs that wrote the
//!   partition. Persisted in one small file before `InitProducer` answers.
//! - [`PartitionProducers`] is one partition's memory of the last
//!   [`MAX_CACHED_BATCHES`] batches of each producer. It decides whether an
//!   incoming batch is new, a retry of a batch already written (answered with
//!   the original offsets), out of order, or from a fenced epoch.
//! - [`IdempotentLog`] puts the two sides together around a
//!   [`PartitionLog`](crate::storage::PartitionLog): check, write and record
//!   under one per-partition lock, then wait for the sync outside it, so group
//!   commit still works. It snapshots the state atomically and rebuilds it on
//!   open from the newest snapshot plus the log's tail (every batch header
//!   carries its producer id, epoch and base sequence), so a duplicate that
//!   arrives after a crash and restart is still caught.
//!
//! Producer liveness is broker time: a producer idle for the expiry is
//! forgotten, idle counted from the broker's clock at its last written batch,
//! never from record timestamps (client-set event times). Every producer
//! recovered at open counts as seen then: a restart restarts the idle
//! clocks, so the retry of a batch whose acknowledgement a crash swallowed
//! is still recognised (and a broker restarted more often than the expiry
//! keeps idle producers longer, never shorter).
//!
//! Crash limits: an epoch is durable before `InitProducer` answers, so a
//! crash before that leaves the old epoch current (the caller retries and
//! gets the next one); a crash after it fences as the running broker did.
//!
//! It knows nothing of gRPC or topics: callers name the directories.

mod ids;
mod log;
mod state;

pub use ids::{FenceGuard, ProducerIdentity, ProducerIds};
pub use log::{IdempotentLog, ProducerAppend, ProducerAppendError};
pub use state::{
    CachedBatch, MAX_CACHED_BATCHES, PartitionProducers, SequenceCheck, SequenceError,
};

use std::path::PathBuf;

/// Errors of the producer state files.
#[derive(Debug, thiserror::Error)]
pub enum ProducerStateError {
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
    #[error("producer state file {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("producer name {0:?} is too long (at most 1024 bytes)")]
    NameTooLong(String),
}
