//! Counters the storage engine keeps for whoever reports on it (the
//! broker's metrics): plain atomics, so the append path pays one relaxed
//! add per batch and storage knows nothing of how they are exported.
//!
//! - [`LogTraffic`]: per-log records and bytes in (counted by appends) and
//!   out (counted by the reader that hands records on).
//! - [`StorageObserver`]: a process-wide hook told of each sync (how long
//!   it took and how many batches it made durable) and of each retention
//!   deletion; [`set_observer`] installs it once, and without one the hook
//!   costs an atomic load.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Records and bytes written to and read from one log since it was opened.
#[derive(Debug, Default)]
pub struct LogTraffic {
    records_in: AtomicU64,
    bytes_in: AtomicU64,
    records_out: AtomicU64,
    bytes_out: AtomicU64,
}

/// A snapshot of [`LogTraffic`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrafficCounts {
    pub records_in: u64,
    pub bytes_in: u64,
    pub records_out: u64,
    pub bytes_out: u64,
}

impl LogTraffic {
    pub(crate) fn appended(&self, records: u64, bytes: u64) {
        self.records_in.fetch_add(records, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts records handed to a reader (a consumer), with their size as
    /// the reader measures it.
    pub fn read_out(&self, records: u64, bytes: u64) {
        self.records_out.fetch_add(records, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn counts(&self) -> TrafficCounts {
        TrafficCounts {
            records_in: self.records_in.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
        }
    }
}

/// Told of storage events that are worth a distribution, not just a count.
/// Called on the thread doing the work: keep it cheap and never block.
pub trait StorageObserver: Send + Sync + 'static {
    /// A sync (`fsync` of a segment's written range) finished; it made
    /// `batches` appended batches durable at once (group commit).
    fn synced(&self, elapsed: Duration, batches: u64);
    /// Retention deleted `segments` whole segments of `bytes` from a log.
    fn retention_deleted(&self, segments: u64, bytes: u64);
}

static OBSERVER: OnceLock<Box<dyn StorageObserver>> = OnceLock::new();

/// Installs the process's storage observer. Only the first call wins;
/// returns whether this one did.
pub fn set_observer(observer: Box<dyn StorageObserver>) -> bool {
    OBSERVER.set(observer).is_ok()
}

pub(crate) fn observer() -> Option<&'static dyn StorageObserver> {
    OBSERVER.get().map(|o| o.as_ref())
}
