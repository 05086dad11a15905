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
    /// The device is out of space (or the quota is used up). Nothing was
    /// half-written; the same call succeeds once space is freed.
    #[error(
        "{op} {path}: no space left on the device; nothing was written, and writes \
         resume once space is freed (delete topics, lower retention or grow the disk)"
    )]
    DiskFull { op: &'static str, path: PathBuf },
    /// Free space on the data directory's file system is below the reserve
    /// kept for the broker's own state and recovery.
    #[error(
        "free space on {path} is {available} bytes, below the reserve of {reserve} \
         bytes (--min-free-bytes) kept for the broker's own state; writes resume once \
         space is freed"
    )]
    BelowFreeSpaceReserve {
        path: PathBuf,
        available: u64,
        reserve: u64,
    },
    /// The process ran out of file descriptors.
    #[error(
        "{op} {path}: too many open files: the open-file limit (RLIMIT_NOFILE) is {limit}; \
         raise it (ulimit -n, LimitNOFILE=) or use fewer partitions"
    )]
    OutOfDescriptors {
        op: &'static str,
        path: PathBuf,
        limit: u64,
    },
    #[error(transparent)]
    Batch(#[from] BatchError),
}

impl StorageError {
    /// An I/O error of `op` on `path`. A full device and running out of
    /// descriptors get variants of their own, so that callers can tell a
    /// condition that passes from a fault.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(code)
                if code == rustix::io::Errno::NOSPC.raw_os_error()
                    || code == rustix::io::Errno::DQUOT.raw_os_error() =>
            {
                StorageError::DiskFull { op, path }
            }
            Some(code) if code == rustix::io::Errno::MFILE.raw_os_error() => {
                StorageError::OutOfDescriptors {
                    op,
                    path,
                    limit: open_file_limit(),
                }
            }
            _ => StorageError::Io { op, path, source },
        }
    }

    /// Whether this error is the device being full (or below the reserve):
    /// a condition that passes once space is freed, not a fault.
    pub fn is_out_of_space(&self) -> bool {
        matches!(
            self,
            StorageError::DiskFull { .. } | StorageError::BelowFreeSpaceReserve { .. }
        )
    }
}

/// The soft limit on open files, for error messages (`u64::MAX` if none).
fn open_file_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(u64::MAX)
}

/// Raises the soft limit on open files to the hard limit: every partition
/// keeps a descriptor open. Returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        let raised = rustix::process::Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-file limit to the hard limit");
        }
    }
    open_file_limit()
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_that_pass_get_variants_that_say_so() {
        let full = StorageError::io(
            "write",
            "/d/x",
            io::Error::from_raw_os_error(rustix::io::Errno::NOSPC.raw_os_error()),
        );
        assert!(full.is_out_of_space(), "{full}");
        assert!(full.to_string().contains("no space left"), "{full}");
        let limit = raise_open_file_limit();
        let out = StorageError::io(
            "open segment",
            "/d/y",
            io::Error::from_raw_os_error(rustix::io::Errno::MFILE.raw_os_error()),
        );
        let message = out.to_string();
        assert!(
            matches!(out, StorageError::OutOfDescriptors { .. }),
            "{message}"
        );
        assert!(message.contains("RLIMIT_NOFILE"), "{message}");
        assert!(message.contains(&limit.to_string()), "{message}");
        let other = StorageError::io("read", "/d/z", io::ErrorKind::NotFound.into());
        assert!(matches!(other, StorageError::Io { .. }));
    }
}
