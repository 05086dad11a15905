//! Per-log settings: segment size, index density, flush policy, retention.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use super::error::StorageError;

/// When appended bytes are forced to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlushPolicy {
    /// An append returns only once its batch is on disk (msync). Concurrent
    /// appenders share one sync (group commit). Readers see a batch only once
    /// it is durable, so nobody acts on data a crash could take back.
    #[default]
    EveryBatch,
    /// A background flusher syncs at this interval; appends return at once.
    Interval(Duration),
    /// Left to the operating system; synced only when a segment is sealed or
    /// the log is closed.
    Os,
}

impl fmt::Display for FlushPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlushPolicy::EveryBatch => f.write_str("every-batch"),
            FlushPolicy::Interval(d) => write!(f, "interval({}ms)", d.as_millis()),
            FlushPolicy::Os => f.write_str("os"),
        }
    }
}

impl FromStr for FlushPolicy {
    type Err = StorageError;

    /// Accepts `every-batch`, `os`, and `interval(N)`, `interval(Nms)` or
    /// `interval(Ns)`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            StorageError::InvalidConfig(format!(
                "flush policy {s:?}: expected every-batch, os or interval(<n>ms)"
            ))
        };
        match s.trim() {
            "every-batch" => Ok(FlushPolicy::EveryBatch),
            "os" => Ok(FlushPolicy::Os),
            other => {
                let inner = other
                    .strip_prefix("interval(")
                    .and_then(|rest| rest.strip_suffix(')'))
                    .ok_or_else(bad)?
                    .trim();
                let (digits, scale) = if let Some(ms) = inner.strip_suffix("ms") {
                    (ms, 1)
                } else if let Some(secs) = inner.strip_suffix('s') {
                    (secs, 1000)
                } else {
                    (inner, 1)
                };
                let n: u64 = digits.trim().parse().map_err(|_| bad())?;
                let ms = n.checked_mul(scale).filter(|ms| *ms > 0).ok_or_else(bad)?;
                Ok(FlushPolicy::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

/// Settings of one partition log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// Most bytes of batches a segment takes (its file is allocated in steps
    /// as it fills); a batch that does not fit in what is left rolls the log
    /// to a new segment. At most 4 GiB, since
    /// index positions are 32-bit.
    pub segment_bytes: u64,
    /// Roll a non-empty active segment once it is this old, so that time
    /// retention can reach quiet partitions.
    pub segment_age: Option<Duration>,
    /// An index entry is written for the first batch after this many bytes.
    pub index_interval_bytes: u32,
    pub flush: FlushPolicy,
    /// Delete sealed segments whose newest record is older than this.
    pub retention_age: Option<Duration>,
    /// Delete the oldest sealed segments while the log stays at least this big
    /// without them.
    pub retention_bytes: Option<u64>,
}

pub const DEFAULT_SEGMENT_BYTES: u64 = 128 * 1024 * 1024;
pub const MIN_SEGMENT_BYTES: u64 = 4096;
pub const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            segment_age: Some(Duration::from_secs(7 * 24 * 3600)),
            index_interval_bytes: 4096,
            flush: FlushPolicy::EveryBatch,
            retention_age: Some(Duration::from_secs(7 * 24 * 3600)),
            retention_bytes: None,
        }
    }
}

impl LogConfig {
    pub fn validate(&self) -> Result<(), StorageError> {
        if !(MIN_SEGMENT_BYTES..=MAX_SEGMENT_BYTES).contains(&self.segment_bytes) {
            return Err(StorageError::InvalidConfig(format!(
                "segment size {} is outside {MIN_SEGMENT_BYTES}..={MAX_SEGMENT_BYTES} bytes",
                self.segment_bytes
            )));
        }
        if self.index_interval_bytes == 0 {
            return Err(StorageError::InvalidConfig(
                "index interval must be at least one byte".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flush_policy_parses_and_prints() {
        for (text, policy) in [
            ("every-batch", FlushPolicy::EveryBatch),
            ("os", FlushPolicy::Os),
            (
                "interval(250ms)",
                FlushPolicy::Interval(Duration::from_millis(250)),
            ),
            (
                "interval(2s)",
                FlushPolicy::Interval(Duration::from_secs(2)),
            ),
            (
                "interval(40)",
                FlushPolicy::Interval(Duration::from_millis(40)),
            ),
        ] {
            assert_eq!(text.parse::<FlushPolicy>().unwrap(), policy);
            assert_eq!(policy.to_string().parse::<FlushPolicy>().unwrap(), policy);
        }
        for bad in [
            "",
            "always",
            "interval()",
            "interval(0ms)",
            "interval(-1)",
            "interval(5m)",
        ] {
            assert!(bad.parse::<FlushPolicy>().is_err(), "{bad:?} parsed");
        }
    }
}
