//! Errors of the storage engine.

use std::io;
use std::path::PathBuf;

use super::batch::BatchError;

/// What can go wrong in the storage engine. Each variant names the file or
/// the value at fault so that the message alone tells an operator what to do.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "data directory {path} is locked by another process{holder}; \
         stop that process or point this one at another directory"
    )]
    Locked { path: PathBuf, holder: String },
    #[error("offset {offset} is out of range: the log holds offsets {start}..{end}")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    #[error("a batch of {size} bytes does not fit in a segment of {segment_bytes} bytes")]
    BatchTooLarge { size: usize, segment_bytes: u64 },
    #[error("corrupt file {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: String,
    },
    #[error(
        "offset gap before segment {path}: it starts at offset {found} but the \
         segment before it ends at offset {expected}"
    )]
    SegmentGap {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "offsets {start}..{end} are lost: {path} is damaged at byte {position} ({reason}); \
         the next readable offset is {end}"
    )]
    DataLoss {
        path: PathBuf,
        position: u64,
        /// First lost offset.
        start: u64,
        /// The next readable offset: the end of the lost range.
        end: u64,
        reason: String,
    },
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
    #[error(
        "the log in {path} failed an earlier flush ({reason}) and refuses writes \
         until it is reopened, so that nothing unsynced is acknowledged"
    )]
    Failed { path: PathBuf, reason: String },
    #[error("the log in {0} is closed")]
    Closed(PathBuf),
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        StorageError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;
