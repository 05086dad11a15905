//! A partition log with idempotent appends and durable producer state.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::ProducerStateError;
use super::state::{PartitionProducers, SequenceCheck, SequenceError};
use crate::storage::batch::BatchIter;
use crate::storage::{AppendInfo, EncodedBatch, PartitionLog, StorageError, write_atomically};

const SNAPSHOT_SUFFIX: &str = "snapshot";
/// Snapshots kept per partition: the newest, and one before it in case the
/// newest is ahead of a log that lost its tail.
const SNAPSHOTS_KEPT: usize = 2;
/// Read size while replaying the log's tail into the producer state.
const REPLAY_CHUNK: usize = 4 * 1024 * 1024;

/// The result of an idempotent append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerAppend {
    pub info: AppendInfo,
    /// The batch was a retry of one already written: nothing new was written
    /// and `info` holds the original offsets.
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProducerAppendError {
    #[error(transparent)]
    Sequence(#[from] SequenceError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A [`PartitionLog`] whose appends are checked against the producer state
/// of the partition, with that state snapshotted into `state_dir` and
/// rebuilt on open.
pub struct IdempotentLog {
    log: Arc<PartitionLog>,
    state: Mutex<PartitionProducers>,
    state_dir: PathBuf,
    /// The log offset of the last snapshot written, and whether expiry has
    /// changed the state since: a snapshot that would repeat the last one
    /// is skipped (the broker asks for one per partition every tick).
    last_snapshot: Mutex<Option<u64>>,
    expired_since_snapshot: AtomicBool,
}

impl IdempotentLog {
    /// Wraps `log`, rebuilding its producer state from the newest usable
    /// snapshot in `state_dir` and the batches the log holds after it.
    pub fn open(
        log: Arc<PartitionLog>,
        state_dir: impl Into<PathBuf>,
    ) -> Result<IdempotentLog, ProducerStateError> {
        let state_dir = state_dir.into();
        fs::create_dir_all(&state_dir)
            .map_err(|e| StorageError::io("create producer state directory", &state_dir, e))?;
        let state = recover(&log, &state_dir)?;
        Ok(IdempotentLog {
            log,
            state: Mutex::new(state),
            state_dir,
            last_snapshot: Mutex::new(None),
            expired_since_snapshot: AtomicBool::new(false),
        })
    }

    pub fn log(&self) -> &Arc<PartitionLog> {
        &self.log
    }

    /// Appends `batch` unless it repeats one of the producer's recent
    /// batches, in which case the original offsets come back and nothing is
    /// written. Either way it returns once the batch is as durable as the
    /// log's flush policy promises.
    pub fn append(
        &self,
        batch: &EncodedBatch,
        now_ms: i64,
    ) -> Result<ProducerAppend, ProducerAppendError> {
        let appended = self.write(batch, now_ms)?;
        self.wait(&appended)?;
        Ok(appended)
    }

    /// The first half of [`IdempotentLog::append`]: checks and writes (or
    /// finds the duplicate) but does not wait for the sync. Call
    /// [`IdempotentLog::wait`] before acknowledging. Writes made in order
    /// keep their order, so a pipelining caller writes request after request
    /// and waits for their syncs together.
    pub fn write(
        &self,
        batch: &EncodedBatch,
        now_ms: i64,
    ) -> Result<ProducerAppend, ProducerAppendError> {
        let header = *batch.header();
        let result = {
            // Check, write and record under one lock so that two copies of a
            // batch racing each other cannot both be written; the sync waits
            // outside it so that concurrent producers share syncs.
            let mut state = self.state.lock();
            match state.check(&header.producer, header.record_count)? {
                SequenceCheck::Duplicate(original) => ProducerAppend {
                    info: AppendInfo {
                        base_offset: original.base_offset,
                        last_offset: original.last_offset,
                    },
                    duplicate: true,
                },
                SequenceCheck::Append | SequenceCheck::NotIdempotent => {
                    let info = self.log.append_deferred(batch)?;
                    state.record(
                        &header.producer,
                        header.record_count,
                        info.base_offset,
                        now_ms,
                    );
                    ProducerAppend {
                        info,
                        duplicate: false,
                    }
                }
            }
        };
        Ok(result)
    }

    /// Waits until a written batch is as durable as the flush policy
    /// promises. A duplicate waits too: its first copy may still be syncing.
    pub fn wait(&self, appended: &ProducerAppend) -> Result<(), StorageError> {
        self.log.wait_appended(&appended.info)
    }

    /// Forgets producers idle for longer than `max_idle`.
    pub fn expire_producers(&self, now_ms: i64, max_idle: std::time::Duration) -> usize {
        let expired = self.state.lock().expire(now_ms, max_idle);
        if expired > 0 {
            self.expired_since_snapshot.store(true, Ordering::Release);
        }
        expired
    }

    /// Writes a snapshot of the producer state as of the log's current end,
    /// and removes all but the newest two. Nothing is written when neither
    /// the log nor the state changed since the last one.
    pub fn snapshot(&self) -> Result<(), ProducerStateError> {
        let (offset, bytes) = {
            let state = self.state.lock();
            let offset = self.log.end_offset();
            if *self.last_snapshot.lock() == Some(offset)
                && !self.expired_since_snapshot.load(Ordering::Acquire)
            {
                return Ok(());
            }
            self.expired_since_snapshot.store(false, Ordering::Release);
            (offset, state.encode_snapshot(offset))
        };
        if let Err(e) = write_atomically(&snapshot_path(&self.state_dir, offset), &bytes) {
            self.expired_since_snapshot.store(true, Ordering::Release);
            return Err(e.into());
        }
        *self.last_snapshot.lock() = Some(offset);
        let snapshots = list_snapshots(&self.state_dir)?;
        for old in snapshots.iter().rev().skip(SNAPSHOTS_KEPT) {
            let path = snapshot_path(&self.state_dir, *old);
            fs::remove_file(&path)
                .map_err(|e| StorageError::io("remove old producer snapshot", &path, e))?;
        }
        Ok(())
    }

    /// How many producers the partition remembers.
    pub fn producer_count(&self) -> usize {
        self.state.lock().len()
    }
}

fn snapshot_path(dir: &Path, offset: u64) -> PathBuf {
    dir.join(format!("{offset:020}.{SNAPSHOT_SUFFIX}"))
}

/// Offsets of the snapshots in `dir`, oldest first.
fn list_snapshots(dir: &Path) -> Result<Vec<u64>, ProducerStateError> {
    let entries =
        fs::read_dir(dir).map_err(|e| StorageError::io("list producer snapshots", dir, e))?;
    let mut offsets = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list producer snapshots", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(&format!(".{SNAPSHOT_SUFFIX}"))
            && let Ok(offset) = stem.parse::<u64>()
        {
            offsets.push(offset);
        }
    }
    offsets.sort_unstable();
    Ok(offsets)
}

/// The newest snapshot at or below the log's end that reads back whole,
/// then every idempotent batch from there to the end of the log.
///
/// Every producer recovered counts as seen now (broker time): its idle
/// clock restarts with the broker. A batch's timestamps are the client's
/// (event times, possibly days old) and say nothing about when the broker
/// last heard from the producer; and a producer whose acknowledgement the
/// crash swallowed is about to retry, so it must outlive the restart by a
/// whole expiry period.
fn recover(log: &PartitionLog, dir: &Path) -> Result<PartitionProducers, ProducerStateError> {
    let recovered_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let end = log.end_offset();
    let mut state = PartitionProducers::default();
    let mut from = log.log_start_offset();
    for offset in list_snapshots(dir)?.into_iter().rev() {
        let path = snapshot_path(dir, offset);
        if offset > end {
            // Taken before a crash cut the log's tail: it remembers batches
            // the log no longer has.
            tracing::info!(snapshot = %path.display(), end, "skipping producer snapshot past the log's end");
            continue;
        }
        let bytes =
            fs::read(&path).map_err(|e| StorageError::io("read producer snapshot", &path, e))?;
        match PartitionProducers::decode_snapshot(&bytes) {
            Ok((_, snapshot)) => {
                state = snapshot;
                from = from.max(offset);
                break;
            }
            Err(reason) => {
                tracing::warn!(snapshot = %path.display(), reason, "ignoring unreadable producer snapshot");
            }
        }
    }
    let mut replayed = 0u64;
    while from < log.high_watermark() {
        let chunk = match log.read(from, REPLAY_CHUNK) {
            Ok(chunk) => chunk,
            // Batches lost to damage cannot be replayed; their producers'
            // sequences resume from the next batch the log still has.
            Err(StorageError::DataLoss { end, .. }) => {
                tracing::warn!(dir = %dir.display(), from, next = end,
                    "producer state skips offsets lost to damage");
                from = end;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if chunk.data.is_empty() {
            break;
        }
        for batch in BatchIter::new(chunk.data) {
            let batch = batch.map_err(StorageError::from)?;
            let header = batch.header();
            if header.base_offset >= from {
                state.record(
                    &header.producer,
                    header.record_count,
                    header.base_offset,
                    recovered_at_ms,
                );
                replayed += 1;
            }
            from = header.next_offset();
        }
    }
    state.seen_at_least(recovered_at_ms);
    tracing::debug!(dir = %dir.display(), producers = state.len(), replayed, "recovered producer state");
    Ok(state)
}
