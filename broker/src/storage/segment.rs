//! One segment of a partition log: a `.log` file of batches, memory-mapped,
//! and its sparse `.idx` file.
//!
//! This module owns the bytes of one segment: creating and preallocating the
//! file, the map, copying a batch in, publishing how far readers may read,
//! syncing, sealing, the index, and recovering a segment from disk. It knows
//! nothing of other segments: the chain of segments, roll-over, group commit
//! and retention belong to [`super::log`].
//!
//! # Concurrency
//!
//! An active segment is written by exactly one writer (the log's writer lock
//! ensures it) and read by any number of readers. The writer copies a batch
//! into the file past `written_end` with `pwritev` and then publishes the new
//! end with a `Release` store; readers `Acquire`-load `visible_end` and only
//! ever form slices of the map below it. The page cache is shared between
//! the file and its map, so what `pwritev` wrote is what the map shows.
//! Bytes below `visible_end` are never written again while the segment is
//! shared, so a reader's `&[u8]` never aliases a write. `visible_end` trails
//! `written_end` when the flush policy makes readers wait for durability.
//!
//! # Preallocation in steps
//!
//! An active segment is mapped once, at its full `segment_bytes`, but its
//! file only has real blocks a step ahead of the writer: the writer grows
//! it with `fallocate` as appends reach the end of what is allocated, in
//! steps that double from [`FIRST_PREALLOCATION_STEP`] (64 KiB) to
//! [`PREALLOCATION_STEP`] (1 MiB). An empty partition costs no data blocks
//! at all, one holding a few records 64 KiB. The map is an address
//! space reservation that never moves: growing the file makes more of it
//! backed, so readers' slices stay valid (see [`Segment::readable`]).
//! Allocation happens before the batch is written, so a full disk fails the
//! append with [`StorageError::DiskFull`] before a byte reaches the file,
//! and opening a segment needs no new space.
//!
//! Why `pwritev` and not stores through a writable map: the file is
//! preallocated, so its extents are "unwritten", and every first store to a
//! 4 KiB page of the map took a page fault that zero-filled the page and
//! then a second one to make it writable. Profiling 100 KiB appends put 63%
//! of the time in those faults; `pwritev` copies into the page cache with
//! neither (see docs/BENCHMARKS.md). It also turns a full disk into an
//! error instead of a SIGBUS.

use std::fs::{self, File, OpenOptions};
use std::io::{self, IoSlice};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use memmap2::{Mmap, MmapOptions, MmapRaw};
use parking_lot::RwLock;

use super::batch::{BASE_OFFSET_RANGE, BatchHeader, RecordBatch};
use super::error::{Result, StorageError};
use super::files::{sync_dir, write_atomically};

pub(crate) const LOG_SUFFIX: &str = "log";
pub(crate) const INDEX_SUFFIX: &str = "idx";
pub(crate) const INDEX_ENTRY_LEN: usize = 16;
/// The most an active segment's file is allocated ahead of its writer.
/// Bounded so a partition never holds more than this in unused blocks; big
/// enough that the `fallocate` is rare next to the writes it covers.
pub const PREALLOCATION_STEP: u64 = 1024 * 1024;
/// The first step: steps double from here up to [`PREALLOCATION_STEP`], so
/// a partition holding a few records costs 64 KiB, not a whole step.
pub const FIRST_PREALLOCATION_STEP: u64 = 64 * 1024;

/// One sparse index entry: the batch holding `base + relative_offset` starts
/// at `position`. `max_timestamp` is the largest record timestamp of this
/// batch and every batch before it in the segment, so it never decreases and
/// a timestamp lookup can binary-search it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub relative_offset: u32,
    pub position: u32,
    pub max_timestamp: i64,
}

impl IndexEntry {
    pub(crate) fn to_bytes(self) -> [u8; INDEX_ENTRY_LEN] {
        let mut out = [0u8; INDEX_ENTRY_LEN];
        out[0..4].copy_from_slice(&self.relative_offset.to_le_bytes());
        out[4..8].copy_from_slice(&self.position.to_le_bytes());
        out[8..16].copy_from_slice(&self.max_timestamp.to_le_bytes());
        out
    }

    fn from_bytes(b: &[u8]) -> IndexEntry {
        IndexEntry {
            relative_offset: u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
            position: u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")),
            max_timestamp: i64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        }
    }
}

pub(crate) fn log_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.{LOG_SUFFIX}"))
}

pub(crate) fn index_path(dir: &Path, base_offset: u64) -> PathBuf {
    dir.join(format!("{base_offset:020}.{INDEX_SUFFIX}"))
}

enum Mapping {
    /// Active (or sealed since this process opened it): a read-only map of
    /// the whole `capacity`, reserved once over a file that is allocated in
    /// steps and may be shorter; never dereferenced past `visible_end`.
    Live(MmapRaw),
    /// Sealed before this process opened it: exactly the file's length.
    Sealed(Mmap),
}

/// What recovery found at the end of an active segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    /// Where the valid log ends and the discarded bytes begin.
    pub position: u64,
    /// How many non-zero bytes were zeroed.
    pub discarded_bytes: u64,
    /// Why the first discarded batch was rejected.
    pub reason: String,
}

pub(crate) struct Segment {
    base_offset: u64,
    log_path: PathBuf,
    index_path: PathBuf,
    map: Mapping,
    file: File,
    /// Bytes the map covers: the segment size it was created with. Batches
    /// go in until the next one would not fit in it.
    capacity: u64,
    /// Bytes of the file with real blocks (its length): at least
    /// `written_end`; only the writer moves it.
    allocated: AtomicU64,
    /// No more batches go here; set when the log rolls past it.
    sealed: AtomicBool,
    written_end: AtomicU64,
    visible_end: AtomicU64,
    synced_end: AtomicU64,
    /// The offset after the last batch written.
    next_offset: AtomicU64,
    /// Largest record timestamp written; `i64::MIN` when empty.
    max_timestamp: AtomicI64,
    index: RwLock<Vec<IndexEntry>>,
    created_at: Instant,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.log_path)
            .field("base_offset", &self.base_offset)
            .field("next_offset", &self.next_offset())
            .field("written_end", &self.written_end())
            .field("visible_end", &self.visible_end())
            .finish()
    }
}

impl Segment {
    /// Creates an empty active segment at `base_offset` that takes up to
    /// `capacity` bytes, and makes its directory entry durable. No blocks
    /// are allocated yet: appends allocate them in steps.
    ///
    /// A creation that fails removes what it created, so a full disk never
    /// leaves a stray file at the log's next offset (the next open would
    /// take it for the log's last segment).
    pub(crate) fn create(dir: &Path, base_offset: u64, capacity: u64) -> Result<Segment> {
        let log_path = log_path(dir, base_offset);
        let index_path = index_path(dir, base_offset);
        let created = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                // Only a creation that failed half-way can have left a file
                // at the log's next offset: nothing in it is part of the log.
                .truncate(true)
                .open(&log_path)
                .map_err(|e| StorageError::io("create segment", &log_path, e))?;
            File::create(&index_path)
                .map_err(|e| StorageError::io("create index", &index_path, e))?;
            sync_dir(dir)?;
            let map = map_live(&file, &log_path, capacity)?;
            Ok((file, map))
        })();
        let (file, map) = match created {
            Ok(created) => created,
            Err(e) => {
                for path in [&log_path, &index_path] {
                    match fs::remove_file(path) {
                        Ok(()) => {}
                        Err(r) if r.kind() == io::ErrorKind::NotFound => {}
                        Err(r) => tracing::warn!(path = %path.display(), error = %r,
                            "removing a segment file whose creation failed"),
                    }
                }
                // Best effort: an entry that stays is an empty segment,
                // which open removes.
                let _ = sync_dir(dir);
                return Err(e);
            }
        };
        Ok(Segment::new_active(
            base_offset,
            log_path,
            index_path,
            file,
            map,
            capacity,
            0,
            0,
            base_offset,
            i64::MIN,
            Vec::new(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_active(
        base_offset: u64,
        log_path: PathBuf,
        index_path: PathBuf,
        file: File,
        map: MmapRaw,
        capacity: u64,
        allocated: u64,
        end: u64,
        next_offset: u64,
        max_timestamp: i64,
        index: Vec<IndexEntry>,
    ) -> Segment {
        Segment {
            base_offset,
            log_path,
            index_path,
            map: Mapping::Live(map),
            file,
            capacity,
            allocated: AtomicU64::new(allocated),
            sealed: AtomicBool::new(false),
            written_end: AtomicU64::new(end),
            visible_end: AtomicU64::new(end),
            synced_end: AtomicU64::new(end),
            next_offset: AtomicU64::new(next_offset),
            max_timestamp: AtomicI64::new(max_timestamp),
            index: RwLock::new(index),
            created_at: Instant::now(),
        }
    }

    pub(crate) fn base_offset(&self) -> u64 {
        self.base_offset
    }

    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub(crate) fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    pub(crate) fn written_end(&self) -> u64 {
        self.written_end.load(Ordering::Acquire)
    }

    pub(crate) fn visible_end(&self) -> u64 {
        self.visible_end.load(Ordering::Acquire)
    }

    pub(crate) fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.written_end() == 0
    }

    pub(crate) fn is_sealed(&self) -> bool {
        self.sealed.load(Ordering::Acquire)
    }

    pub(crate) fn age(&self) -> std::time::Duration {
        self.created_at.elapsed()
    }

    /// Bytes still free for batches in an active segment.
    pub(crate) fn remaining(&self) -> u64 {
        self.capacity - self.written_end()
    }

    /// The bytes readers may read: everything below `visible_end`.
    pub(crate) fn readable(&self) -> &[u8] {
        let end = self.visible_end() as usize;
        match &self.map {
            // SAFETY: the map reserves `capacity` bytes of address space
            // once, when the segment is created or opened, and is never
            // moved, remapped or unmapped while `self` lives, so a slice
            // handed out earlier stays valid however the file grows. The
            // file behind it may be shorter than the map (it is allocated in
            // steps), and touching a page wholly past its end would SIGBUS;
            // but `visible_end <= written_end <= allocated`, where
            // `allocated` is the file's length after a `fallocate` that
            // returned before any byte up to it was written, and the file is
            // only ever shrunk (by `seal`) to `written_end`. So every byte of
            // the slice is backed by the file. Bytes below `visible_end` were
            // fully written (pwritev returned) before it was published
            // (Release/Acquire), and the single writer only writes at or
            // past `written_end`, so nothing mutates this range while the
            // returned slice lives.
            Mapping::Live(raw) => unsafe { std::slice::from_raw_parts(raw.as_ptr(), end) },
            Mapping::Sealed(map) => &map[..end],
        }
    }

    /// A zero-copy `Bytes` over `start..end` of the readable range, keeping
    /// this segment (and so its map) alive for as long as the bytes live,
    /// even if retention deletes the files meanwhile.
    pub(crate) fn slice(self: &Arc<Self>, start: u64, end: u64) -> Bytes {
        debug_assert!(start <= end && end <= self.visible_end());
        Bytes::from_owner(SegmentBytes {
            segment: Arc::clone(self),
            start: start as usize,
            end: end as usize,
        })
    }

    /// Writes `batch` to the end of the active segment with `base_offset`
    /// stamped in, and moves the writer's end past it (readers do not see
    /// it until [`Segment::publish_visible`]).
    ///
    /// Only the log's writer calls this, holding the writer lock; the caller
    /// has checked that the batch fits. On error nothing is published: the
    /// next batch overwrites whatever part of this one reached the file.
    pub(crate) fn write_batch(
        &self,
        header: &BatchHeader,
        batch: &[u8],
        base_offset: u64,
    ) -> Result<u64> {
        debug_assert!(
            !self.is_sealed(),
            "the writer only writes to the active segment"
        );
        let position = self.written_end.load(Ordering::Relaxed);
        let len = batch.len() as u64;
        assert!(
            position + len <= self.capacity,
            "batch overruns the segment"
        );
        self.allocate_to(position + len)?;
        let offset_bytes = base_offset.to_le_bytes();
        let mut parts = [
            IoSlice::new(&batch[..BASE_OFFSET_RANGE.start]),
            IoSlice::new(&offset_bytes),
            IoSlice::new(&batch[BASE_OFFSET_RANGE.end..]),
        ];
        let mut parts: &mut [IoSlice<'_>] = &mut parts;
        let mut at = position;
        while !parts.is_empty() {
            let written = rustix::io::pwritev(&self.file, parts, at)
                .map_err(|e| StorageError::io("write segment", &self.log_path, e.into()))?;
            if written == 0 {
                return Err(StorageError::io(
                    "write segment",
                    &self.log_path,
                    io::ErrorKind::WriteZero.into(),
                ));
            }
            at += written as u64;
            IoSlice::advance_slices(&mut parts, written);
        }
        self.max_timestamp
            .fetch_max(header.max_timestamp, Ordering::AcqRel);
        self.next_offset.store(
            base_offset + u64::from(header.record_count),
            Ordering::Release,
        );
        self.written_end.store(position + len, Ordering::Release);
        Ok(position)
    }

    /// Makes sure the file has real blocks up to at least `end`, growing it
    /// by a step (as big as what is allocated already, from 64 KiB to 1 MiB)
    /// or to `end` if that is further, never past `capacity`. Only the
    /// writer calls this. A full disk is [`StorageError::DiskFull`] and changes
    /// nothing readers can see: the map is untouched and `written_end` does
    /// not move.
    fn allocate_to(&self, end: u64) -> Result<()> {
        let allocated = self.allocated.load(Ordering::Acquire);
        if end <= allocated {
            return Ok(());
        }
        let step = allocated.clamp(FIRST_PREALLOCATION_STEP, PREALLOCATION_STEP);
        let target = end
            .max(allocated + step)
            .div_ceil(FIRST_PREALLOCATION_STEP)
            .saturating_mul(FIRST_PREALLOCATION_STEP)
            .min(self.capacity)
            .max(end);
        preallocate(&self.file, &self.log_path, allocated, target - allocated)?;
        self.allocated.store(target, Ordering::Release);
        Ok(())
    }

    /// Lets readers see everything below `end` (never moves backwards).
    pub(crate) fn publish_visible(&self, end: u64) {
        debug_assert!(end <= self.written_end());
        self.visible_end.fetch_max(end, Ordering::AcqRel);
    }

    /// Forces the bytes below `end` to disk.
    pub(crate) fn sync_to(&self, end: u64) -> Result<()> {
        if end <= self.synced_end.load(Ordering::Acquire) {
            return Ok(());
        }
        // fdatasync, not msync: the bytes came in through pwritev. It also
        // makes a size the last step's fallocate changed durable.
        self.file
            .sync_data()
            .map_err(|e| StorageError::io("sync segment", &self.log_path, e))?;
        self.synced_end.fetch_max(end, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn push_index_entry(&self, entry: IndexEntry) {
        self.index.write().push(entry);
    }

    pub(crate) fn index_snapshot(&self) -> Vec<IndexEntry> {
        self.index.read().clone()
    }

    /// Marks the segment as taking no more batches. Called by the writer
    /// when it rolls past the segment, before [`Segment::seal`].
    pub(crate) fn close_for_writes(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    /// Seals a segment the writer has left: syncs the bytes written,
    /// truncates the file to them, syncs the new length, and writes its
    /// whole index. Readers keep reading through the same map: they never
    /// read past `written_end`, which is where the file now ends. A segment
    /// whose files retention already deleted is left alone.
    ///
    /// The data is synced *before* the truncation so that a file cut to its
    /// data end always holds durable data: on open such a file is trusted
    /// as sealed without a sync, and a kill between the truncation and a
    /// later sync must not let unsynced batches be served as if durable. A
    /// kill before the truncation leaves the zero tail that open recognises
    /// as an interrupted seal (and syncs).
    pub(crate) fn seal(&self) -> Result<()> {
        debug_assert!(self.is_sealed());
        let end = self.written_end();
        let sync_and_truncate = || -> io::Result<()> {
            self.file.sync_data()?;
            self.file.set_len(end)?;
            failpoint("seal-after-truncate");
            self.file.sync_all()
        };
        match sync_and_truncate() {
            Ok(()) => {}
            Err(e) if !self.log_path.exists() => {
                tracing::debug!(path = %self.log_path.display(), error = %e,
                    "segment deleted before it was sealed");
                return Ok(());
            }
            Err(e) => return Err(StorageError::io("seal segment", &self.log_path, e)),
        }
        self.allocated.store(end, Ordering::Release);
        self.synced_end.fetch_max(end, Ordering::AcqRel);
        self.publish_visible(end);
        // The index is rebuilt from the log when it is missing or short, so
        // failing to write it (a full disk, say) costs start-up time, not
        // data, and must not fail the log.
        if let Err(e) = write_index_file(&self.index_path, &self.index_snapshot())
            && self.log_path.exists()
        {
            tracing::warn!(path = %self.index_path.display(), error = %e,
                "writing a sealed segment's index failed; it is rebuilt on the next open");
        }
        Ok(())
    }

    /// Deletes both files. Maps held by readers stay valid: an unlinked file
    /// lives on until its last map is gone.
    pub(crate) fn remove_files(&self) -> Result<()> {
        for path in [&self.log_path, &self.index_path] {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(StorageError::io("delete segment file", path, e)),
            }
        }
        Ok(())
    }

    /// Byte position of the batch holding `offset`, or `None` if it is not
    /// among the readable batches of this segment.
    pub(crate) fn position_of_offset(&self, offset: u64) -> Option<u64> {
        if offset < self.base_offset {
            return None;
        }
        let relative = offset - self.base_offset;
        let start = {
            let index = self.index.read();
            let i = index.partition_point(|e| u64::from(e.relative_offset) <= relative);
            if i == 0 {
                0
            } else {
                u64::from(index[i - 1].position)
            }
        };
        self.scan_batches(start, |header| header.last_offset() >= offset)
            .map(|(pos, _)| pos)
    }

    /// Walks batch headers from `start` (a batch boundary) through the
    /// readable range and returns the first batch for which `found` holds.
    fn scan_batches(
        &self,
        start: u64,
        mut found: impl FnMut(&BatchHeader) -> bool,
    ) -> Option<(u64, BatchHeader)> {
        let data = self.readable();
        let mut pos = start as usize;
        while pos < data.len() {
            // Bytes below visible_end were validated or written by us: a
            // header that does not parse there is a bug, not bad input.
            let header = BatchHeader::parse(&data[pos..]).ok()?;
            if found(&header) {
                return Some((pos as u64, header));
            }
            pos += header.total_len();
        }
        None
    }

    /// Position just past the last whole batch that starts before
    /// `start + max_bytes` and ends at or before offset `end_offset`, always
    /// including at least the first batch, so a batch bigger than
    /// `max_bytes` is still delivered.
    pub(crate) fn batch_aligned_end(&self, start: u64, max_bytes: usize, end_offset: u64) -> u64 {
        let data = self.readable();
        let mut pos = start as usize;
        let limit = (start as usize).saturating_add(max_bytes);
        while pos < data.len() {
            let Ok(header) = BatchHeader::parse(&data[pos..]) else {
                break;
            };
            if header.next_offset() > end_offset {
                break;
            }
            let end = pos + header.total_len();
            if end > limit && pos > start as usize {
                break;
            }
            pos = end;
        }
        pos as u64
    }

    /// The offset of the first readable record whose timestamp is at or after
    /// `timestamp`, if any.
    pub(crate) fn offset_for_timestamp(self: &Arc<Self>, timestamp: i64) -> Option<u64> {
        if self.max_timestamp() < timestamp {
            return None;
        }
        let start = {
            let index = self.index.read();
            let i = index.partition_point(|e| e.max_timestamp < timestamp);
            if i == 0 {
                0
            } else {
                u64::from(index[i - 1].position)
            }
        };
        let (pos, header) = self.scan_batches(start, |h| h.max_timestamp >= timestamp)?;
        let bytes = self.slice(pos, pos + header.total_len() as u64);
        let (batch, _) = RecordBatch::decode_front(&bytes).ok()?;
        batch
            .records()
            .filter_map(|r| r.ok())
            .find(|r| r.record.timestamp >= timestamp)
            .map(|r| r.offset)
    }

    /// Opens a sealed segment. Every batch is verified from the start
    /// (magic, length, checksum, offset chain) and the index is rebuilt from
    /// that walk: a stored index is never trusted, because an entry that
    /// points past damage would let the damaged batches through unchecked.
    ///
    /// A segment whose seal a crash interrupted (the log had moved on to the
    /// next segment, but this file still has its preallocated zero tail) is
    /// sealed now. Any other damage (a bad batch, zeroes with data after
    /// them, an empty file) is returned as [`SegmentDamage`]: the segment
    /// serves the whole batches before it, and the file is left as it is, so
    /// nothing after the damage is destroyed (`sluice-broker check --repair`
    /// moves it aside).
    pub(crate) fn open_sealed(
        dir: &Path,
        base_offset: u64,
        index_interval: u32,
    ) -> Result<(Segment, Option<SegmentDamage>)> {
        let log_path = log_path(dir, base_offset);
        let index_path = index_path(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|e| StorageError::io("open segment", &log_path, e))?;
        let mut len = file_len(&file, &log_path)?;
        let mut map = map_read_only(&file, &log_path, len)?;
        let scan = scan_sealed(&map, base_offset, index_interval);
        let mut damage = scan.damage;
        let end = scan.walk.end as u64;
        if damage.is_none() && end < len {
            tracing::info!(segment = %log_path.display(), end, "finishing an interrupted seal");
            drop(map);
            file.set_len(end)
                .and_then(|()| file.sync_all())
                .map_err(|e| StorageError::io("seal segment", &log_path, e))?;
            len = end;
            map = map_read_only(&file, &log_path, len)?;
        }
        if let Some(damage) = damage.as_mut() {
            tracing::warn!(
                segment = %log_path.display(),
                position = damage.position,
                file_bytes = len,
                reason = %damage.reason,
                "damaged sealed segment: serving the batches before the damage"
            );
            // Only the valid prefix is mapped: readers never see the rest.
            drop(map);
            map = map_read_only(&file, &log_path, end)?;
            len = end;
        }
        if read_index_file(&index_path)? != scan.index
            && let Err(e) = write_index_file(&index_path, &scan.index)
        {
            // Rebuilt again next time; opening must work on a full disk.
            tracing::warn!(path = %index_path.display(), error = %e, "writing a rebuilt index failed");
        }
        Ok((
            Segment {
                base_offset,
                log_path,
                index_path,
                map: Mapping::Sealed(map),
                file,
                capacity: len,
                allocated: AtomicU64::new(len),
                sealed: AtomicBool::new(true),
                written_end: AtomicU64::new(len),
                visible_end: AtomicU64::new(len),
                synced_end: AtomicU64::new(len),
                next_offset: AtomicU64::new(scan.walk.next_offset),
                max_timestamp: AtomicI64::new(scan.walk.max_timestamp),
                index: RwLock::new(scan.index),
                created_at: Instant::now(),
            },
            damage,
        ))
    }

    /// Opens the last segment of a log for writing and recovers it: walks
    /// every batch from the start, keeps those that check out (magic,
    /// length, checksum, offset chain), zeroes everything after the first one
    /// that does not, and rebuilds the index from the walk. Returns what was
    /// cut off, if anything.
    pub(crate) fn recover_active(
        dir: &Path,
        base_offset: u64,
        capacity: u64,
        index_interval: u32,
    ) -> Result<(Segment, Option<TornTail>)> {
        let log_path = log_path(dir, base_offset);
        let index_path = index_path(dir, base_offset);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&log_path)
            .map_err(|e| StorageError::io("open segment", &log_path, e))?;
        let len = file_len(&file, &log_path)?;
        // Nothing is allocated here: opening must work on a full disk. The
        // file keeps its length (the steps allocated before the crash, or
        // the data end of a segment sealed just before it), and appends
        // allocate further steps.
        let capacity = capacity.max(len);
        let raw = map_live(&file, &log_path, capacity)?;
        // The whole active segment is verified, not just what follows the
        // last index entry: index entries can reach the disk before the log
        // bytes they point at, and this is the segment a crash hits.
        let mut index = Vec::new();
        let (walk, last_nonzero) = {
            // SAFETY: the segment is not shared yet and nothing writes the
            // file while this view lives, so it aliases no write; the view
            // stops at the file's length, so no page of it can fault.
            let data = unsafe { std::slice::from_raw_parts(raw.as_ptr(), len as usize) };
            let walk = walk_batches(data, base_offset, &mut index, index_interval);
            // Only a walk that stopped at bytes it rejected (not at clean
            // zeroes) pays for a scan of the rest of the file.
            let last_nonzero = match &walk.stop_reason {
                Some(_) => data[walk.end..].iter().rposition(|&b| b != 0),
                None => None,
            };
            (walk, last_nonzero)
        };
        let end = walk.end as u64;
        let torn = match last_nonzero {
            None => None,
            Some(last_nonzero) => {
                let discarded = last_nonzero as u64 + 1;
                zero_range(&file, &log_path, end, discarded)?;
                let torn = TornTail {
                    path: log_path.clone(),
                    position: end,
                    discarded_bytes: discarded,
                    reason: walk
                        .stop_reason
                        .unwrap_or_else(|| "unreadable bytes after the last batch".into()),
                };
                tracing::warn!(
                    segment = %torn.path.display(),
                    position = torn.position,
                    discarded_bytes = torn.discarded_bytes,
                    reason = %torn.reason,
                    "truncated torn tail of segment"
                );
                Some(torn)
            }
        };
        // What survived a kill is in the page cache; make it (and the
        // zeroing) durable before anything is appended after it.
        file.sync_data()
            .map_err(|e| StorageError::io("sync segment", &log_path, e))?;
        // The active segment's index is rebuilt from the log on every open
        // and written whole by its seal or the log's close, so it is only
        // rewritten here when a torn tail was cut off (its entries may point
        // past the cut): two fsyncs per partition fewer at start-up. On a
        // full disk it is left for the seal or close to write.
        if torn.is_some()
            && let Err(e) = write_index_file(&index_path, &index)
        {
            tracing::warn!(path = %index_path.display(), error = %e,
                "writing the active segment's index failed; it is rebuilt on the next open");
        }
        Ok((
            Segment::new_active(
                base_offset,
                log_path,
                index_path,
                file,
                raw,
                capacity,
                len,
                end,
                walk.next_offset,
                walk.max_timestamp,
                index,
            ),
            torn,
        ))
    }
}

/// A readable range of a segment, owned: what a `Bytes` from
/// [`Segment::slice`] points into.
struct SegmentBytes {
    segment: Arc<Segment>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for SegmentBytes {
    fn as_ref(&self) -> &[u8] {
        &self.segment.readable()[self.start..self.end]
    }
}

pub(crate) struct Walk {
    /// Byte position after the last good batch.
    pub end: usize,
    pub next_offset: u64,
    pub max_timestamp: i64,
    /// Why the walk stopped before the end of the data, if it found bytes it
    /// could not accept (as opposed to clean zeroes or the end).
    pub stop_reason: Option<String>,
}

/// For the last segment of a log, before it is recovered: when the walk
/// from its start stops at bytes it rejects and valid batches that go on
/// with later offsets follow further into the file, the stop is damage, not
/// a torn write (a crash only tears the end). Returns the offset after the
/// last such batch, so the log can go on past every offset the file holds
/// instead of zeroing those batches and giving their offsets out again.
pub(crate) fn offsets_past_damage(dir: &Path, base_offset: u64) -> Result<Option<u64>> {
    let path = log_path(dir, base_offset);
    let file = File::open(&path).map_err(|e| StorageError::io("open segment", &path, e))?;
    let len = file_len(&file, &path)?;
    let map = map_read_only(&file, &path, len)?;
    let data: &[u8] = &map;
    let walk = walk_batches(data, base_offset, &mut Vec::new(), u32::MAX);
    if walk.stop_reason.is_none() {
        return Ok(None);
    }
    let magic = super::batch::MAGIC.to_le_bytes();
    let mut expected = walk.next_offset;
    let mut resume = None;
    let mut pos = walk.end + 1;
    while let Some(found) = data
        .get(pos..)
        .and_then(|rest| rest.windows(magic.len()).position(|w| w == magic))
    {
        let at = pos + found;
        pos = at + 1;
        let Ok(header) = BatchHeader::parse_checked(&data[at..]) else {
            continue;
        };
        // Offsets inside one segment stay within u32 of its base (the
        // index stores them relative).
        let fits = header.base_offset >= expected
            && header.base_offset - base_offset
                < u64::from(u32::MAX) - u64::from(header.record_count);
        if !fits {
            continue;
        }
        let run = walk_batches(&data[at..], header.base_offset, &mut Vec::new(), u32::MAX);
        expected = run.next_offset;
        resume = Some(expected);
        pos = at + run.end.max(1);
    }
    Ok(resume)
}

/// Where a sealed segment stops holding whole, valid batches before its
/// end, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SegmentDamage {
    /// Byte position of the first byte that is not part of a valid batch.
    pub position: u64,
    /// Bytes of the file from `position` on.
    pub damaged_bytes: u64,
    pub reason: String,
}

/// A verified walk over the bytes of a sealed segment.
pub(crate) struct SealedScan {
    pub walk: Walk,
    /// The index rebuilt from the walk.
    pub index: Vec<IndexEntry>,
    /// `None` when the data is whole batches followed only by zeroes (an
    /// interrupted seal) or nothing.
    pub damage: Option<SegmentDamage>,
}

/// Verifies every batch of a sealed segment's bytes and says where they
/// stop being valid. Used by the open path and by the offline check, so
/// both judge a file the same way.
pub(crate) fn scan_sealed(data: &[u8], base_offset: u64, index_interval: u32) -> SealedScan {
    let mut index = Vec::new();
    let walk = walk_batches(data, base_offset, &mut index, index_interval);
    let len = data.len() as u64;
    let end = walk.end as u64;
    let damage = if data.is_empty() {
        Some("the segment is empty".to_owned())
    } else if let Some(reason) = &walk.stop_reason {
        Some(reason.clone())
    } else if end < len && data[walk.end..].iter().any(|&b| b != 0) {
        // Zeroes end an interrupted seal's data; zeroes with data after
        // them are damage.
        Some("zeroed bytes in the middle of a sealed segment".to_owned())
    } else if end == 0 {
        Some("the segment holds no batch".to_owned())
    } else {
        None
    }
    .map(|reason| SegmentDamage {
        position: end,
        damaged_bytes: len - end,
        reason,
    });
    SealedScan {
        walk,
        index,
        damage,
    }
}

/// Walks batches from the last trusted index entry (or the start), verifying
/// each one, and appends index entries for the batches it passes.
fn walk_batches(
    data: &[u8],
    base_offset: u64,
    index: &mut Vec<IndexEntry>,
    index_interval: u32,
) -> Walk {
    let (mut pos, mut expected, mut max_ts) = match index.last() {
        Some(e) => (
            e.position as usize,
            base_offset + u64::from(e.relative_offset),
            e.max_timestamp,
        ),
        None => (0, base_offset, i64::MIN),
    };
    // The batch under the last trusted entry is walked again, so drop the
    // entry and let the walk re-add it.
    index.pop();
    let mut since_index = u64::from(index_interval);
    let mut stop_reason = None;
    while pos < data.len() {
        // Clean zeroes (preallocated space) end the log without complaint;
        // a torn write always has its magic, written first, in place.
        if data[pos..].iter().take(64).all(|&b| b == 0) {
            break;
        }
        let header = match BatchHeader::parse_checked(&data[pos..]) {
            Ok(h) => h,
            Err(e) => {
                stop_reason = Some(e.to_string());
                break;
            }
        };
        if header.base_offset != expected {
            stop_reason = Some(format!(
                "batch has base offset {} where offset {expected} was expected",
                header.base_offset
            ));
            break;
        }
        max_ts = max_ts.max(header.max_timestamp);
        if since_index >= u64::from(index_interval) {
            index.push(IndexEntry {
                relative_offset: (header.base_offset - base_offset) as u32,
                position: pos as u32,
                max_timestamp: max_ts,
            });
            since_index = 0;
        }
        since_index += header.total_len() as u64;
        pos += header.total_len();
        expected = header.next_offset();
    }
    Walk {
        end: pos,
        next_offset: expected,
        max_timestamp: max_ts,
        stop_reason,
    }
}

pub(crate) fn read_index_file(path: &Path) -> Result<Vec<IndexEntry>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(StorageError::io("read index", path, e)),
    };
    // A partial trailing entry is a torn write: ignore it.
    Ok(bytes
        .chunks_exact(INDEX_ENTRY_LEN)
        .map(IndexEntry::from_bytes)
        .collect())
}

/// Replaces an index file atomically.
pub(crate) fn write_index_file(path: &Path, entries: &[IndexEntry]) -> Result<()> {
    let mut bytes = Vec::with_capacity(entries.len() * INDEX_ENTRY_LEN);
    for entry in entries {
        bytes.extend_from_slice(&entry.to_bytes());
    }
    write_atomically(path, &bytes)
}

/// Allocates real blocks for `offset..offset + len`, growing the file: a
/// sparse file written through a map turns a full disk into SIGBUS instead
/// of an error, and a write into allocated blocks cannot run out of space.
fn preallocate(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use rustix::fs::{FallocateFlags, fallocate};
    match fallocate(file, FallocateFlags::empty(), offset, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) => {
            // No fallocate on this filesystem: write real zeroes instead.
            tracing::debug!(path = %path.display(), "fallocate unsupported, writing zeroes");
            zero_range(file, path, offset, len)
        }
        Err(e) => Err(StorageError::io("preallocate segment", path, e.into())),
    }
}

/// A crash point for fault-injection tests, compiled into debug builds
/// only: when `SLUICE_FAILPOINT` names `name`, the process aborts here, as a
/// SIGKILL at that instant would leave it.
fn failpoint(name: &str) {
    #[cfg(debug_assertions)]
    if std::env::var("SLUICE_FAILPOINT").is_ok_and(|v| v == name) {
        eprintln!("failpoint {name}: aborting");
        std::process::abort();
    }
    #[cfg(not(debug_assertions))]
    let _ = name;
}

fn file_len(file: &File, path: &Path) -> Result<u64> {
    file.metadata()
        .map(|m| m.len())
        .map_err(|e| StorageError::io("stat segment", path, e))
}

/// Overwrites `len` bytes at `offset` with zeroes.
fn zero_range(file: &File, path: &Path, offset: u64, len: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; len.min(1 << 20) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], at)
            .map_err(|e| StorageError::io("zero torn tail", path, e))?;
        at += n as u64;
    }
    Ok(())
}

/// Maps `len` bytes of the file read-only, however long the file is now: a
/// reservation the file grows into. A raw map, because the range past
/// `written_end` changes under it (or is past the end of the file) and must
/// never be borrowed as `&[u8]`.
fn map_live(file: &File, path: &Path, len: u64) -> Result<MmapRaw> {
    MmapOptions::new()
        .len(len as usize)
        .map_raw_read_only(file)
        .map_err(|e| StorageError::io("map segment", path, e))
}

fn map_read_only(file: &File, path: &Path, len: u64) -> Result<Mmap> {
    // SAFETY: the file is a sealed segment: it is never written again, and
    // it is only truncated or deleted by this process, which keeps the
    // segment (and so this map) alive for as long as any reader holds it.
    // The data directory lock keeps other Sluice processes out.
    unsafe { MmapOptions::new().len(len as usize).map(file) }
        .map_err(|e| StorageError::io("map segment", path, e))
}
