//! The partition log: an ordered chain of segments with one writer.
//!
//! This module owns the chain (sealed segments plus one active segment),
//! offset assignment, roll-over, group commit, the high watermark readers
//! wait on, reads by offset and timestamp, retention, and opening a log
//! from its directory (with the segment-level recovery of
//! [`super::segment`]).
//!
//! # Durability and visibility
//!
//! With [`FlushPolicy::EveryBatch`] an append returns only after its bytes
//! are synced, and readers see a batch only once it is synced: a consumer
//! never acts on a record that a crash could take back. Appenders that wait
//! at the same time share one sync: the first becomes the leader, syncs
//! everything written so far, and wakes every waiter whose batch that
//! covered (group commit). With the other policies a batch is visible as
//! soon as it is written.
//!
//! A failed sync leaves the log refusing writes until it is reopened: after
//! a failed `msync` the kernel may have dropped the dirty pages, so retrying
//! could acknowledge data that is not on disk.
//!
//! # Damage
//!
//! Opening never fails over a damaged segment: a damaged sealed segment
//! serves its valid prefix, a missing segment leaves a gap, and each loss
//! becomes a [`LostRange`] that reads inside get as
//! [`StorageError::DataLoss`]. Offsets never move. Files that are not
//! segments are named and left alone. See docs/STORAGE.md, *Damage*.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::{Condvar, Mutex, RwLock};
use tokio::sync::watch;

use super::batch::{EncodedBatch, StoredRecord, decode_records};
use super::config::{FlushPolicy, LogConfig};
use super::error::{Result, StorageError};
use super::files::sync_dir;
use super::segment::{self, IndexEntry, Segment, SegmentDamage, TornTail};
use super::stats::{LogTraffic, observer};

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    pub base_offset: u64,
    pub last_offset: u64,
}

/// A run of whole batches read from one segment, starting with the batch
/// that holds the requested offset (which may begin before it).
#[derive(Debug, Clone)]
pub struct ReadChunk {
    /// Zero-copy view of the segment's bytes; decode with
    /// [`super::batch::BatchIter`] or [`super::batch::decode_records`].
    pub data: Bytes,
    pub high_watermark: u64,
    pub log_start_offset: u64,
}

/// Offsets a partition log lost to damage found when it was opened: a
/// damaged sealed segment (the offsets after its last valid batch) or a
/// missing segment. Reads inside the range fail with
/// [`StorageError::DataLoss`]; everything around it is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRange {
    /// The damaged file; for a missing segment, the segment before the gap.
    pub path: PathBuf,
    /// Byte position in `path` where the valid data ends.
    pub position: u64,
    /// First lost offset.
    pub start_offset: u64,
    /// The next readable offset (exclusive end of the range).
    pub end_offset: u64,
    pub reason: String,
}

impl LostRange {
    pub fn contains(&self, offset: u64) -> bool {
        (self.start_offset..self.end_offset).contains(&offset)
    }

    pub fn to_error(&self) -> StorageError {
        StorageError::DataLoss {
            path: self.path.clone(),
            position: self.position,
            start: self.start_offset,
            end: self.end_offset,
            reason: self.reason.clone(),
        }
    }
}

/// What a retention pass deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_segments: Vec<PathBuf>,
    pub deleted_bytes: u64,
    pub log_start_offset: u64,
}

struct Writer {
    /// The segment appends go to. After a failed segment creation it is the
    /// sealed previous segment, and the next append retries the creation.
    active: Arc<Segment>,
    bytes_since_index: u64,
    next_offset: u64,
    /// Batches appended since the last sync began: what the next sync
    /// makes durable at once (group commit).
    batches_since_sync: u64,
}

struct FlushState {
    durable_offset: u64,
    flushing: bool,
    last_flush: Instant,
}

/// One partition's log. Share it behind an `Arc`: appends, reads, flushes
/// and retention may run concurrently from any threads.
pub struct PartitionLog {
    dir: PathBuf,
    config: RwLock<LogConfig>,
    segments: RwLock<Vec<Arc<Segment>>>,
    writer: Mutex<Writer>,
    flush_state: Mutex<FlushState>,
    flush_done: Condvar,
    /// Mirror of the writer's next offset, readable without its lock.
    end_offset: AtomicU64,
    log_start_offset: AtomicU64,
    high_watermark: watch::Sender<u64>,
    failure: Arc<Failure>,
    pending_seals: Mutex<Vec<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
    torn_tail: Option<TornTail>,
    /// Offsets lost to damage, in offset order; retention drops the ones
    /// it passes.
    lost: RwLock<Vec<LostRange>>,
    traffic: LogTraffic,
}

impl std::fmt::Debug for PartitionLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionLog")
            .field("dir", &self.dir)
            .field("log_start_offset", &self.log_start_offset())
            .field("high_watermark", &self.high_watermark())
            .field("end_offset", &self.end_offset())
            .finish()
    }
}

impl PartitionLog {
    /// Opens (or creates) the log in `dir`, recovering it from its files.
    ///
    /// The caller must hold the data directory's lock
    /// ([`super::DataDirLock`]): two processes writing one log corrupt it.
    pub fn open(dir: impl Into<PathBuf>, config: LogConfig) -> Result<PartitionLog> {
        let dir = dir.into();
        config.validate()?;
        fs::create_dir_all(&dir).map_err(|e| StorageError::io("create log directory", &dir, e))?;
        let mut bases = list_segments(&dir)?;
        remove_empty_last_segment(&dir, &mut bases)?;
        let mut segments: Vec<Arc<Segment>> = Vec::with_capacity(bases.len().max(1));
        let mut torn_tail = None;
        let mut lost = Vec::new();
        if bases.is_empty() {
            segments.push(Arc::new(Segment::create(&dir, 0, config.segment_bytes)?));
        }
        // The damage of the segment just opened: it explains a gap before
        // the next one.
        let mut damage: Option<SegmentDamage> = None;
        for (i, &base) in bases.iter().enumerate() {
            if let Some(previous) = segments.last() {
                let expected = previous.next_offset();
                if expected > base {
                    return Err(StorageError::SegmentGap {
                        path: segment::log_path(&dir, base),
                        expected,
                        found: base,
                    });
                }
                let range = match damage.take() {
                    Some(damage) => Some(LostRange {
                        path: previous.log_path().to_owned(),
                        position: damage.position,
                        start_offset: expected,
                        end_offset: base,
                        reason: damage.reason,
                    }),
                    None if expected < base => Some(LostRange {
                        path: previous.log_path().to_owned(),
                        position: previous.written_end(),
                        start_offset: expected,
                        end_offset: base,
                        reason: format!(
                            "no segment holds these offsets: the segment file after it, \
                             {}, is missing",
                            segment::log_path(&dir, expected).display()
                        ),
                    }),
                    None => None,
                };
                if let Some(range) = range {
                    tracing::warn!(
                        file = %range.path.display(),
                        position = range.position,
                        lost_from = range.start_offset,
                        next_readable = range.end_offset,
                        reason = %range.reason,
                        "partition lost offsets {}..{}",
                        range.start_offset,
                        range.end_offset
                    );
                    lost.push(range);
                }
            }
            let segment = if i + 1 < bases.len() {
                let (segment, found) =
                    Segment::open_sealed(&dir, base, config.index_interval_bytes)?;
                damage = found;
                segment
            } else if let Some(resume) = segment::offsets_past_damage(&dir, base)? {
                // Damage inside the last segment, with batches after it:
                // keep the file as it is, serve what is before the damage,
                // and append from past every offset it holds.
                let (segment, found) =
                    Segment::open_sealed(&dir, base, config.index_interval_bytes)?;
                let (position, reason) = found.map_or_else(
                    || (segment.written_end(), "unreadable batch".to_owned()),
                    |d| (d.position, d.reason),
                );
                let range = LostRange {
                    path: segment.log_path().to_owned(),
                    position,
                    start_offset: segment.next_offset(),
                    end_offset: resume,
                    reason: format!(
                        "{reason} (inside the last segment; the batches after the damage \
                         stay in the file but are not served)"
                    ),
                };
                tracing::warn!(
                    file = %range.path.display(),
                    position,
                    lost_from = range.start_offset,
                    next_readable = resume,
                    reason = %range.reason,
                    "partition lost offsets {}..{resume}",
                    range.start_offset
                );
                lost.push(range);
                segments.push(Arc::new(segment));
                Segment::create(&dir, resume, config.segment_bytes)?
            } else {
                let (segment, torn) = Segment::recover_active(
                    &dir,
                    base,
                    config.segment_bytes,
                    config.index_interval_bytes,
                )?;
                torn_tail = torn;
                segment
            };
            segments.push(Arc::new(segment));
        }
        let active = Arc::clone(segments.last().expect("a log has a segment"));
        let next_offset = active.next_offset();
        let log_start = segments[0].base_offset();
        tracing::info!(
            dir = %dir.display(),
            segments = segments.len(),
            log_start,
            next_offset,
            torn_tail = torn_tail.is_some(),
            "opened partition log"
        );
        Ok(PartitionLog {
            writer: Mutex::new(Writer {
                active,
                // The next batch starts a fresh run of index entries.
                bytes_since_index: u64::from(config.index_interval_bytes),
                next_offset,
                batches_since_sync: 0,
            }),
            dir,
            config: RwLock::new(config),
            segments: RwLock::new(segments),
            flush_state: Mutex::new(FlushState {
                durable_offset: next_offset,
                flushing: false,
                last_flush: Instant::now(),
            }),
            flush_done: Condvar::new(),
            end_offset: AtomicU64::new(next_offset),
            log_start_offset: AtomicU64::new(log_start),
            high_watermark: watch::Sender::new(next_offset),
            failure: Arc::default(),
            pending_seals: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            torn_tail,
            lost: RwLock::new(lost),
            traffic: LogTraffic::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> LogConfig {
        self.config.read().clone()
    }

    /// Changes the settings of an open log. A new segment size applies from
    /// the next segment on.
    pub fn set_config(&self, config: LogConfig) -> Result<()> {
        config.validate()?;
        *self.config.write() = config;
        Ok(())
    }

    /// What recovery cut off the end of the log when it was opened, if
    /// anything.
    pub fn torn_tail(&self) -> Option<&TornTail> {
        self.torn_tail.as_ref()
    }

    /// Offsets lost to damage found when the log was opened, still above
    /// the log's start.
    pub fn lost_ranges(&self) -> Vec<LostRange> {
        self.lost.read().clone()
    }

    /// The first offset still in the log.
    pub fn log_start_offset(&self) -> u64 {
        self.log_start_offset.load(Ordering::Acquire)
    }

    /// The offset after the last record readers may see.
    pub fn high_watermark(&self) -> u64 {
        *self.high_watermark.borrow()
    }

    /// The offset the next append gets (may be ahead of the high watermark
    /// while a sync is pending).
    pub fn end_offset(&self) -> u64 {
        self.end_offset.load(Ordering::Acquire)
    }

    /// A receiver that changes whenever the high watermark moves, for
    /// consumers that wait for new data instead of polling.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.high_watermark.subscribe()
    }

    /// Bytes of all segments.
    pub fn size_bytes(&self) -> u64 {
        self.segments.read().iter().map(|s| s.written_end()).sum()
    }

    /// Records and bytes appended to and read from this log.
    pub fn traffic(&self) -> &LogTraffic {
        &self.traffic
    }

    pub fn segment_count(&self) -> usize {
        self.segments.read().len()
    }

    /// Appends one batch, assigning it the next offsets. With
    /// `FlushPolicy::EveryBatch` it returns once the batch is on disk.
    pub fn append(&self, batch: &EncodedBatch) -> Result<AppendInfo> {
        let info = self.append_deferred(batch)?;
        self.wait_appended(&info)?;
        Ok(info)
    }

    /// Writes one batch like [`PartitionLog::append`] but returns before the
    /// flush policy's sync: under `EveryBatch` the batch is neither durable
    /// nor visible yet. Call [`PartitionLog::wait_appended`] before telling
    /// anyone it was written. This lets a caller keep its own per-partition
    /// lock over "check, then write" without holding it through the sync,
    /// which would defeat group commit.
    pub fn append_deferred(&self, batch: &EncodedBatch) -> Result<AppendInfo> {
        let (segment_bytes, index_interval, flush, segment_age) = {
            let c = self.config.read();
            (
                c.segment_bytes,
                u64::from(c.index_interval_bytes),
                c.flush,
                c.segment_age,
            )
        };
        let len = batch.len() as u64;
        if len > segment_bytes {
            return Err(StorageError::BatchTooLarge {
                size: batch.len(),
                segment_bytes,
            });
        }
        let mut writer = self.writer.lock();
        self.check_writable()?;
        let active = &writer.active;
        let age_due = !active.is_empty() && segment_age.is_some_and(|age| active.age() >= age);
        if active.remaining() < len || age_due {
            self.roll_locked(&mut writer, segment_bytes, flush)?;
        }
        let base_offset = writer.next_offset;
        let header = batch.header();
        let position = writer
            .active
            .write_batch(header, batch.as_bytes(), base_offset)?;
        let next_offset = base_offset + u64::from(header.record_count);
        writer.next_offset = next_offset;
        writer.batches_since_sync += 1;
        self.traffic.appended(u64::from(header.record_count), len);
        self.end_offset.store(next_offset, Ordering::Release);
        if writer.bytes_since_index >= index_interval {
            let active = Arc::clone(&writer.active);
            let entry = IndexEntry {
                relative_offset: (base_offset - active.base_offset()) as u32,
                position: position as u32,
                max_timestamp: active.max_timestamp(),
            };
            // Kept in memory only: the seal (or close) writes the whole
            // index, and opening rebuilds an active segment's index from its
            // batches anyway, so an index file open for appending would only
            // cost a descriptor per partition.
            active.push_index_entry(entry);
            writer.bytes_since_index = 0;
        }
        writer.bytes_since_index += len;
        if flush != FlushPolicy::EveryBatch {
            writer.active.publish_visible(position + len);
            self.advance_high_watermark(next_offset);
        }
        Ok(AppendInfo {
            base_offset,
            last_offset: next_offset - 1,
        })
    }

    /// Returns once an appended batch is as durable as the flush policy
    /// promises, and visible: at once under `Interval` and `Os`, after the
    /// (shared) sync under `EveryBatch`.
    pub fn wait_appended(&self, info: &AppendInfo) -> Result<()> {
        if self.high_watermark() > info.last_offset {
            return Ok(());
        }
        self.wait_durable(info.last_offset + 1)
    }

    /// Syncs everything appended so far and makes it visible. Concurrent
    /// callers (and appenders under `EveryBatch`) share one sync.
    pub fn flush(&self) -> Result<()> {
        self.wait_durable(self.end_offset())
    }

    /// Whether an `Interval` flush is due: the interval has passed and there
    /// is something to sync.
    pub fn flush_due(&self, now: Instant) -> Option<bool> {
        let FlushPolicy::Interval(interval) = self.config.read().flush else {
            return None;
        };
        let state = self.flush_state.lock();
        Some(
            state.durable_offset < self.end_offset()
                && now.saturating_duration_since(state.last_flush) >= interval,
        )
    }

    fn wait_durable(&self, target: u64) -> Result<()> {
        let mut state = self.flush_state.lock();
        loop {
            if state.durable_offset >= target {
                return Ok(());
            }
            self.failure.check(&self.dir)?;
            if state.flushing {
                self.flush_done.wait(&mut state);
                continue;
            }
            state.flushing = true;
            drop(state);
            let result = self.sync_written();
            state = self.flush_state.lock();
            state.flushing = false;
            state.last_flush = Instant::now();
            match result {
                Ok(durable) => state.durable_offset = state.durable_offset.max(durable),
                Err(e) => {
                    self.failure.set(&self.dir, &e);
                    self.flush_done.notify_all();
                    return Err(e);
                }
            }
            self.flush_done.notify_all();
        }
    }

    /// Syncs the active segment up to what has been written, then publishes
    /// it to readers. Returns the offset now durable.
    fn sync_written(&self) -> Result<u64> {
        // Segments rolled past under a lazier policy may still be sealing.
        self.finish_pending_seals();
        self.failure.check(&self.dir)?;
        let (active, end, next_offset, batches) = {
            let mut writer = self.writer.lock();
            (
                Arc::clone(&writer.active),
                writer.active.written_end(),
                writer.next_offset,
                std::mem::take(&mut writer.batches_since_sync),
            )
        };
        let started = Instant::now();
        active.sync_to(end)?;
        if let Some(observer) = observer() {
            observer.synced(started.elapsed(), batches);
        }
        active.publish_visible(end);
        self.advance_high_watermark(next_offset);
        Ok(next_offset)
    }

    /// Seals the active segment (if it holds anything) and starts a new one.
    pub fn roll(&self) -> Result<()> {
        let (segment_bytes, flush) = {
            let c = self.config.read();
            (c.segment_bytes, c.flush)
        };
        let mut writer = self.writer.lock();
        self.check_writable()?;
        if writer.active.is_empty() {
            return Ok(());
        }
        self.roll_locked(&mut writer, segment_bytes, flush)
    }

    /// Starts a new active segment at the next offset, then seals the old
    /// one. Creating first means a failure (a full disk, say) leaves the log
    /// as it was, still appending to the old segment.
    ///
    /// Under `EveryBatch` the seal is synchronous: waiters on the old
    /// segment's last batches are released by it. Otherwise it runs on a
    /// short-lived thread, as Kafka flushes a rolled segment in the
    /// background: syncing up to a whole segment would stall every appender.
    /// A crash before it finishes leaves a zero tail that the next open
    /// seals (see `Segment::open_sealed`).
    fn roll_locked(
        &self,
        writer: &mut Writer,
        segment_bytes: u64,
        flush: FlushPolicy,
    ) -> Result<()> {
        let old = Arc::clone(&writer.active);
        let base = writer.next_offset;
        // An empty segment is replaced, not sealed: only a segment created
        // under a smaller segment size can be empty and too small.
        // A creation that fails removes what it made: the log stays as it
        // was, appending to the old segment.
        let segment = Arc::new(Segment::create(&self.dir, base, segment_bytes)?);
        {
            let mut segments = self.segments.write();
            if old.is_empty() {
                *segments.last_mut().expect("a log has a segment") = Arc::clone(&segment);
            } else {
                segments.push(Arc::clone(&segment));
            }
        }
        writer.active = segment;
        writer.bytes_since_index = u64::from(self.config.read().index_interval_bytes);
        tracing::debug!(dir = %self.dir.display(), base_offset = base, "rolled to a new segment");
        if old.is_empty() {
            return Ok(());
        }
        old.close_for_writes();
        if flush != FlushPolicy::EveryBatch && self.seal_in_background(&old) {
            return Ok(());
        }
        if let Err(e) = old.seal() {
            self.failure.set(&self.dir, &e);
            return Err(e);
        }
        let sealed_end = old.next_offset();
        {
            let mut state = self.flush_state.lock();
            state.durable_offset = state.durable_offset.max(sealed_end);
        }
        self.flush_done.notify_all();
        self.advance_high_watermark(sealed_end);
        Ok(())
    }

    /// Seals `segment` on its own thread; false if no thread could be had.
    fn seal_in_background(&self, segment: &Arc<Segment>) -> bool {
        let segment = Arc::clone(segment);
        let failure = Arc::clone(&self.failure);
        let dir = self.dir.clone();
        let spawned = std::thread::Builder::new()
            .name("sluice-seal".into())
            .spawn(move || {
                if let Err(e) = segment.seal() {
                    failure.set(&dir, &e);
                }
            });
        match spawned {
            Ok(handle) => {
                let mut pending = self.pending_seals.lock();
                pending.retain(|h| !h.is_finished());
                pending.push(handle);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "no thread for a background seal; sealing inline");
                false
            }
        }
    }

    /// Waits for background seals started so far.
    fn finish_pending_seals(&self) {
        let pending = std::mem::take(&mut *self.pending_seals.lock());
        for handle in pending {
            let _ = handle.join();
        }
    }

    /// Reads whole batches starting with the one holding `from`, up to about
    /// `max_bytes` (at least one batch, however big), and never past the high
    /// watermark it reports. Reading at or past the high watermark, up to the
    /// end of what was written (offsets about to become visible), returns
    /// an empty chunk to wait on; outside the log is an error.
    ///
    /// Everything is judged against one snapshot of the high watermark,
    /// taken first: a segment's bytes can become visible before the high
    /// watermark moves (a seal publishes its segment, then the roll moves
    /// the watermark), and a chunk that ran ahead of the watermark it
    /// reported would send the reader to an offset the next read rejects.
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<ReadChunk> {
        let high_watermark = self.high_watermark();
        let segments: Vec<Arc<Segment>> = {
            let segments = self.segments.read();
            // The segment that holds `from`, and the next one in case
            // `from` is exactly where the first ends.
            let i = segments.partition_point(|s| s.base_offset() <= from);
            segments[i.saturating_sub(1)..]
                .iter()
                .take(2)
                .cloned()
                .collect()
        };
        let log_start_offset = self.log_start_offset();
        let chunk = |data| ReadChunk {
            data,
            high_watermark,
            log_start_offset,
        };
        if from < log_start_offset || from > high_watermark.max(self.end_offset()) {
            return Err(StorageError::OffsetOutOfRange {
                offset: from,
                start: log_start_offset,
                end: high_watermark,
            });
        }
        if let Some(range) = self.lost.read().iter().find(|r| r.contains(from)) {
            return Err(range.to_error());
        }
        if from >= high_watermark {
            return Ok(chunk(Bytes::new()));
        }
        for segment in &segments {
            if let Some(start) = segment.position_of_offset(from) {
                let end = segment.batch_aligned_end(start, max_bytes, high_watermark);
                return Ok(chunk(segment.slice(start, end)));
            }
        }
        Ok(chunk(Bytes::new()))
    }

    /// Reads and decodes records from `from` on (dropping the earlier
    /// records of the first batch), up to about `max_bytes`.
    pub fn read_records(&self, from: u64, max_bytes: usize) -> Result<Vec<StoredRecord>> {
        let chunk = self.read(from, max_bytes)?;
        Ok(decode_records(chunk.data, from)?)
    }

    /// The offset of the first record with a timestamp at or after
    /// `timestamp`, or `None` if every record is older.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Option<u64> {
        let segments: Vec<Arc<Segment>> = self.segments.read().clone();
        let start = self.log_start_offset();
        segments
            .iter()
            .find_map(|s| s.offset_for_timestamp(timestamp))
            .map(|offset| offset.max(start))
    }

    /// Deletes whole sealed segments that retention no longer keeps: those
    /// whose newest record is older than `retention_age` (measured against
    /// `now_ms`), and the oldest ones while the log stays at least
    /// `retention_bytes` without them. The active segment is rolled first
    /// when it is entirely expired, so time retention reaches quiet logs.
    /// Readers holding a deleted segment keep reading it until they drop it.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<RetentionReport> {
        let (retention_age, retention_bytes) = {
            let c = self.config.read();
            (c.retention_age, c.retention_bytes)
        };
        let cutoff = retention_age.map(|age| now_ms.saturating_sub(duration_ms(age)));
        if let Some(cutoff) = cutoff {
            let writer = self.writer.lock();
            let expired = !writer.active.is_empty() && writer.active.max_timestamp() < cutoff;
            drop(writer);
            if expired {
                self.roll()?;
            }
        }
        let report = self.remove_oldest_segments(|oldest, total| {
            let by_age = cutoff.is_some_and(|c| oldest.max_timestamp() < c);
            let by_size =
                retention_bytes.is_some_and(|limit| total - oldest.written_end() >= limit);
            by_age || by_size
        })?;
        if let Some(observer) = observer()
            && !report.deleted_segments.is_empty()
        {
            observer.retention_deleted(report.deleted_segments.len() as u64, report.deleted_bytes);
        }
        Ok(report)
    }

    /// Deletes the whole sealed segments that hold only offsets below
    /// `offset`, for logs whose owner keeps their content elsewhere (state
    /// logs that snapshot themselves). The segment holding `offset` stays.
    pub fn delete_segments_before(&self, offset: u64) -> Result<RetentionReport> {
        self.remove_oldest_segments(|oldest, _| oldest.next_offset() <= offset)
    }

    /// Removes segments from the front while `remove(oldest, total bytes)`
    /// says so, never the active one, and deletes their files.
    fn remove_oldest_segments(
        &self,
        mut remove: impl FnMut(&Segment, u64) -> bool,
    ) -> Result<RetentionReport> {
        let removed: Vec<Arc<Segment>> = {
            let mut segments = self.segments.write();
            let mut total: u64 = segments.iter().map(|s| s.written_end()).sum();
            let mut count = 0;
            // Never the last segment: it is the active one.
            while count + 1 < segments.len() && remove(&segments[count], total) {
                total -= segments[count].written_end();
                count += 1;
            }
            let removed: Vec<_> = segments.drain(..count).collect();
            let start = segments[0].base_offset();
            self.log_start_offset.store(start, Ordering::Release);
            self.lost.write().retain(|r| r.end_offset > start);
            removed
        };
        let mut report = RetentionReport {
            log_start_offset: self.log_start_offset(),
            ..RetentionReport::default()
        };
        for segment in &removed {
            segment.remove_files()?;
            report.deleted_bytes += segment.written_end();
            report.deleted_segments.push(segment.log_path().to_owned());
        }
        if !removed.is_empty() {
            sync_dir(&self.dir)?;
            tracing::info!(
                dir = %self.dir.display(),
                segments = removed.len(),
                bytes = report.deleted_bytes,
                log_start = report.log_start_offset,
                "deleted old segments"
            );
        }
        Ok(report)
    }

    /// Syncs everything and refuses further appends.
    pub fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !self.failure.has_failed() {
            self.flush()?;
        }
        self.finish_pending_seals();
        // The active segment's index is not written: opening rebuilds it
        // from the segment's batches anyway, and writing it atomically cost
        // three fsyncs per partition (14 s to stop 1,000 partitions).
        Ok(())
    }

    fn advance_high_watermark(&self, offset: u64) {
        self.high_watermark.send_if_modified(|hw| {
            if offset > *hw {
                *hw = offset;
                true
            } else {
                false
            }
        });
    }

    fn check_writable(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed(self.dir.clone()));
        }
        self.failure.check(&self.dir)
    }
}

/// A log's sticky failure: set by a failed sync or seal, from any thread.
#[derive(Default)]
struct Failure {
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Failure {
    fn set(&self, dir: &Path, error: &StorageError) {
        tracing::error!(dir = %dir.display(), %error,
            "partition log failed; refusing writes until reopened");
        self.reason.lock().get_or_insert_with(|| error.to_string());
        self.failed.store(true, Ordering::Release);
    }

    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    fn check(&self, dir: &Path) -> Result<()> {
        if self.has_failed() {
            return Err(StorageError::Failed {
                path: dir.to_owned(),
                reason: self.reason.lock().clone().unwrap_or_default(),
            });
        }
        Ok(())
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        // A seal still running would race whoever opens the log next.
        self.finish_pending_seals();
    }
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Removes the last segment when it holds no batch and others precede it:
/// a roll that a crash or a full disk cut short (older versions left such a
/// file behind when its preallocation failed, and went on appending to the
/// segment before it). It holds nothing, and the segment before it becomes
/// the active one again.
fn remove_empty_last_segment(dir: &Path, bases: &mut Vec<u64>) -> Result<()> {
    let [.., _, last] = bases.as_slice() else {
        return Ok(());
    };
    let path = segment::log_path(dir, *last);
    let mut head = [0u8; 64];
    let read = fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|e| StorageError::io("read segment", &path, e))?;
    if head[..read].iter().any(|&b| b != 0) {
        return Ok(());
    }
    tracing::warn!(segment = %path.display(), "removing an empty segment left by an interrupted roll");
    for path in [path, segment::index_path(dir, *last)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("remove empty segment", &path, e)),
        }
    }
    sync_dir(dir)?;
    bases.pop();
    Ok(())
}

/// Base offsets of the segments in `dir`, in order. Leftover temporary files
/// and index files without a log are removed; any other file is left alone
/// and named in a warning (see [`classify_entry`]).
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let entries = fs::read_dir(dir).map_err(|e| StorageError::io("list log directory", dir, e))?;
    let mut logs = Vec::new();
    let mut indexes = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StorageError::io("list log directory", dir, e))?;
        let path = entry.path();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        match classify_entry(&entry.file_name().to_string_lossy(), is_file) {
            DirEntryKind::Log(base) => logs.push(base),
            DirEntryKind::Index(base) => indexes.push(base),
            DirEntryKind::Temporary => fs::remove_file(&path)
                .map_err(|e| StorageError::io("remove temporary file", &path, e))?,
            DirEntryKind::MovedAside => {
                tracing::info!(file = %path.display(), "ignoring a damaged range moved aside by `sluice-broker check --repair`");
            }
            DirEntryKind::Stray => {
                tracing::warn!(file = %path.display(), "ignoring a stray file in a partition directory: it is not a segment or an index");
            }
        }
    }
    logs.sort_unstable();
    for base in indexes {
        if logs.binary_search(&base).is_err() {
            let path = segment::index_path(dir, base);
            fs::remove_file(&path)
                .map_err(|e| StorageError::io("remove orphan index", &path, e))?;
        }
    }
    Ok(logs)
}

/// What a name in a partition directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirEntryKind {
    Log(u64),
    Index(u64),
    /// A `*.tmp` left by an interrupted atomic write.
    Temporary,
    /// A `*.damaged` file written by `sluice-broker check --repair`.
    MovedAside,
    /// Anything else: not ours, never read, never deleted.
    Stray,
}

pub(crate) fn classify_entry(name: &str, is_file: bool) -> DirEntryKind {
    if !is_file {
        return DirEntryKind::Stray;
    }
    if name.ends_with(".tmp") {
        return DirEntryKind::Temporary;
    }
    if name.ends_with(DAMAGED_SUFFIX) {
        return DirEntryKind::MovedAside;
    }
    let Some((stem, ext)) = name.split_once('.') else {
        return DirEntryKind::Stray;
    };
    let base = match stem.parse::<u64>() {
        Ok(base) if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => return DirEntryKind::Stray,
    };
    match ext {
        segment::LOG_SUFFIX => DirEntryKind::Log(base),
        segment::INDEX_SUFFIX => DirEntryKind::Index(base),
        _ => DirEntryKind::Stray,
    }
}

/// Suffix of the files `sluice-broker check --repair` moves damaged bytes to.
pub const DAMAGED_SUFFIX: &str = ".damaged";
