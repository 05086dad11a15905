//! The storage engine: partitioned logs as segmented, memory-mapped,
//! append-only files.
//!
//! It owns everything about bytes on disk and nothing else: it knows no
//! gRPC, topics, groups or producers. Callers hand it encoded batches and get
//! offsets back; they read whole batches back as zero-copy `Bytes`.
//!
//! - [`batch`]: the record batch codec, which lives in the `sluice-format`
//!   crate (shared with the client) and is re-exported here.
//! - `segment`: one `.log` + `.idx` pair: preallocation, the map, the sparse
//!   index, sealing, and recovery of a single segment.
//! - [`PartitionLog`]: the chain of segments of one partition: appends,
//!   group commit, reads, timestamps, retention, opening and recovery.
//! - [`check_log_dir`]: the offline check (and repair) of a partition
//!   directory behind `sluice-broker check`.
//! - [`IntervalFlusher`]: syncs logs with an `interval(ms)` flush policy.
//! - [`DataDirLock`]: keeps a second process out of a data directory.
//! - [`write_atomically`], [`sync_dir`]: crash-safe replacement of small state files.
//! - [`StateLog`]: a durable state machine (change log plus snapshots) for
//!   broker state such as committed offsets.
//! - [`LogTraffic`], [`StorageObserver`]: plain counters and a sync hook
//!   that the broker's metrics read; storage knows no metrics format.
//!
//! On-disk layout of one partition directory:
//!
//! ```text
//! 00000000000000000000.log   batches from offset 0, allocated in steps while active
//! 00000000000000000000.idx   16-byte entries: relative offset, position, max timestamp
//! 00000000000000081920.log   the next segment, named by its base offset
//! ```

pub use sluice_format::batch;
mod check;
mod config;
mod error;
mod files;
mod flusher;
mod lock;
mod log;
mod segment;
mod state_log;
mod stats;

pub use check::{Finding, aside_path, check_log_dir};
pub use config::{DEFAULT_SEGMENT_BYTES, FlushPolicy, LogConfig};
pub use error::{Result, StorageError, raise_open_file_limit};
pub use files::{
    ByteReader, DEFAULT_MIN_FREE_BYTES, SpaceReserve, free_space, sync_dir, write_atomically,
};
pub use flusher::IntervalFlusher;
pub use lock::{DataDirLock, LOCK_FILE};
pub use log::{AppendInfo, DAMAGED_SUFFIX, LostRange, PartitionLog, ReadChunk, RetentionReport};
pub use segment::TornTail;
pub use sluice_format::{
    BatchBuilder, BatchError, BatchHeader, BatchIter, Compression, EncodedBatch, Header,
    ProducerInfo, Record, RecordBatch, RecordView, StoredRecord, decode_records,
};
pub use state_log::{StateLog, StateMachine, check_state_snapshot};
pub use stats::{LogTraffic, StorageObserver, TrafficCounts, set_observer};
