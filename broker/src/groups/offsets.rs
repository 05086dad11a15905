//! Committed offsets, durable: an internal log of commits plus snapshots.
//!
//! Every commit call is one batch appended to an internal
//! [`PartitionLog`] with `every-batch` flush, so a commit that returned
//! survives a SIGKILL or a power cut, and concurrent commits share syncs.
//! The current offsets live in memory, rebuilt on open from the newest
//! snapshot and the commits after it. Once the log has grown by a few
//! segments a snapshot of all offsets is written (atomically) and the
//! segments it covers are deleted, so the log stays small.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::PathBuf;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};

use super::assignor::TopicPartition;
use crate::storage::{
    BatchBuilder, ByteReader, FlushPolicy, LogConfig, PartitionLog, ProducerInfo, Record,
    StorageError, write_atomically,
};

const SNAPSHOT_FILE: &str = "offsets.snapshot";
const SNAPSHOT_MAGIC: &[u8; 4] = b"SLOS";
const KIND_COMMIT: u8 = 1;
const KIND_DELETE_GROUP: u8 = 2;
/// Compact once the commit log has this many segments.
const COMPACT_AT_SEGMENTS: usize = 4;

/// A committed offset: the next offset the group will read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: u64,
    pub metadata: String,
    pub commit_time_ms: i64,
}

type GroupOffsets = BTreeMap<TopicPartition, CommittedOffset>;

/// All groups' committed offsets.
pub struct OffsetStore {
    log: PartitionLog,
    dir: PathBuf,
    offsets: RwLock<HashMap<String, GroupOffsets>>,
    /// Serialises commits so memory applies them in log order.
    commit_lock: Mutex<()>,
}

impl OffsetStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<OffsetStore, StorageError> {
        let dir = dir.into();
        let log = PartitionLog::open(
            dir.join("log"),
            LogConfig {
                segment_bytes: 16 * 1024 * 1024,
                segment_age: None,
                flush: FlushPolicy::EveryBatch,
                retention_age: None,
                retention_bytes: None,
                ..LogConfig::default()
            },
        )?;
        let mut offsets = HashMap::new();
        let mut from = log.log_start_offset();
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        match fs::read(&snapshot_path) {
            Ok(bytes) => {
                let (at, snapshot) =
                    decode_snapshot(&bytes).map_err(|reason| StorageError::Corrupt {
                        path: snapshot_path.clone(),
                        position: 0,
                        reason: reason.into(),
                    })?;
                offsets = snapshot;
                from = from.max(at);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StorageError::io("read offsets snapshot", &snapshot_path, e)),
        }
        while from < log.high_watermark() {
            let records = log.read_records(from, 4 * 1024 * 1024)?;
            for stored in &records {
                apply(&mut offsets, &stored.record.key, &stored.record.value);
            }
            from = records.last().map_or(from, |r| r.offset + 1);
        }
        Ok(OffsetStore {
            log,
            dir,
            offsets: RwLock::new(offsets),
            commit_lock: Mutex::new(()),
        })
    }

    /// Commits offsets for `group`; durable when it returns.
    pub fn commit(
        &self,
        group: &str,
        entries: &[(TopicPartition, CommittedOffset)],
    ) -> Result<(), StorageError> {
        if entries.is_empty() {
            return Ok(());
        }
        let records: Vec<Record> = entries
            .iter()
            .map(|(tp, committed)| Record {
                key: Some(Bytes::copy_from_slice(group.as_bytes())),
                value: encode_commit(tp, committed),
                headers: vec![],
                timestamp: committed.commit_time_ms,
            })
            .collect();
        self.append_and_apply(group, &records)
    }

    /// Forgets every offset of `group`.
    pub fn delete_group(&self, group: &str, now_ms: i64) -> Result<(), StorageError> {
        let record = Record {
            key: Some(Bytes::copy_from_slice(group.as_bytes())),
            value: Bytes::from_static(&[KIND_DELETE_GROUP]),
            headers: vec![],
            timestamp: now_ms,
        };
        self.append_and_apply(group, &[record])
    }

    fn append_and_apply(&self, group: &str, records: &[Record]) -> Result<(), StorageError> {
        let _order = self.commit_lock.lock();
        self.log
            .append(&BatchBuilder::encode(records, ProducerInfo::NONE))?;
        {
            let mut offsets = self.offsets.write();
            for record in records {
                apply_to(&mut offsets, group.as_bytes(), &record.value);
            }
        }
        if self.log.segment_count() >= COMPACT_AT_SEGMENTS
            && let Err(e) = self.compact_locked()
        {
            // The commit itself is durable; compaction retries next time.
            tracing::warn!(error = %e, "offset log compaction failed");
        }
        Ok(())
    }

    /// The committed offsets of `group`.
    pub fn fetch(&self, group: &str) -> GroupOffsets {
        self.offsets.read().get(group).cloned().unwrap_or_default()
    }

    /// Groups that have committed offsets.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.offsets.read().keys().cloned().collect();
        groups.sort();
        groups
    }

    /// Writes a snapshot of every offset and deletes the log segments it
    /// covers.
    pub fn compact(&self) -> Result<(), StorageError> {
        let _order = self.commit_lock.lock();
        self.compact_locked()
    }

    fn compact_locked(&self) -> Result<(), StorageError> {
        let at = self.log.end_offset();
        let bytes = encode_snapshot(at, &self.offsets.read());
        write_atomically(&self.dir.join(SNAPSHOT_FILE), &bytes)?;
        self.log.roll()?;
        self.log.delete_segments_before(at)?;
        Ok(())
    }

    pub fn close(&self) -> Result<(), StorageError> {
        self.log.close()
    }
}

fn encode_commit(tp: &TopicPartition, committed: &CommittedOffset) -> Bytes {
    let mut out = Vec::with_capacity(32 + tp.topic.len() + committed.metadata.len());
    out.push(KIND_COMMIT);
    put_entry(&mut out, tp, committed);
    Bytes::from(out)
}

fn put_entry(out: &mut Vec<u8>, tp: &TopicPartition, committed: &CommittedOffset) {
    out.extend_from_slice(&(tp.topic.len() as u16).to_le_bytes());
    out.extend_from_slice(tp.topic.as_bytes());
    out.extend_from_slice(&tp.partition.to_le_bytes());
    out.extend_from_slice(&committed.offset.to_le_bytes());
    out.extend_from_slice(&committed.commit_time_ms.to_le_bytes());
    out.extend_from_slice(&(committed.metadata.len() as u32).to_le_bytes());
    out.extend_from_slice(committed.metadata.as_bytes());
}

fn get_entry(r: &mut ByteReader<'_>) -> Option<(TopicPartition, CommittedOffset)> {
    let topic_len = r.u16()?;
    let topic = String::from_utf8(r.take(usize::from(topic_len))?.to_vec()).ok()?;
    let partition = r.u32()?;
    let offset = r.u64()?;
    let commit_time_ms = r.u64()? as i64;
    let metadata_len = r.u32()?;
    let metadata = String::from_utf8(r.take(metadata_len as usize)?.to_vec()).ok()?;
    Some((
        TopicPartition { topic, partition },
        CommittedOffset {
            offset,
            metadata,
            commit_time_ms,
        },
    ))
}

/// Applies one record of the commit log to the in-memory offsets. Records
/// this version does not understand are skipped with a warning.
fn apply(offsets: &mut HashMap<String, GroupOffsets>, key: &Option<Bytes>, value: &[u8]) {
    let Some(group) = key.as_ref().and_then(|k| std::str::from_utf8(k).ok()) else {
        tracing::warn!("offset record without a group key skipped");
        return;
    };
    apply_to(offsets, group.as_bytes(), value)
}

fn apply_to(offsets: &mut HashMap<String, GroupOffsets>, group: &[u8], value: &[u8]) {
    let group = String::from_utf8_lossy(group).into_owned();
    match value.first() {
        Some(&KIND_COMMIT) => {
            let mut r = ByteReader::new(&value[1..]);
            match get_entry(&mut r) {
                Some((tp, committed)) => {
                    offsets.entry(group).or_default().insert(tp, committed);
                }
                None => tracing::warn!(group, "malformed offset commit record skipped"),
            }
        }
        Some(&KIND_DELETE_GROUP) => {
            offsets.remove(&group);
        }
        _ => tracing::warn!(group, "unknown offset record kind skipped"),
    }
}

fn encode_snapshot(at: u64, offsets: &HashMap<String, GroupOffsets>) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&at.to_le_bytes());
    let mut groups: Vec<_> = offsets.iter().collect();
    groups.sort_by(|a, b| a.0.cmp(b.0));
    out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
    for (group, entries) in groups {
        out.extend_from_slice(&(group.len() as u16).to_le_bytes());
        out.extend_from_slice(group.as_bytes());
        out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
        for (tp, committed) in entries {
            put_entry(&mut out, tp, committed);
        }
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn decode_snapshot(bytes: &[u8]) -> Result<(u64, HashMap<String, GroupOffsets>), &'static str> {
    if bytes.len() < 4 + 8 + 4 + 4 {
        return Err("too short");
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body).to_le_bytes() != crc {
        return Err("checksum mismatch");
    }
    let mut r = ByteReader::new(body);
    if r.take(4) != Some(SNAPSHOT_MAGIC.as_slice()) {
        return Err("bad magic");
    }
    let truncated = "truncated";
    let at = r.u64().ok_or(truncated)?;
    let groups = r.u32().ok_or(truncated)?;
    let mut offsets = HashMap::new();
    for _ in 0..groups {
        let len = r.u16().ok_or(truncated)?;
        let group = String::from_utf8(r.take(usize::from(len)).ok_or(truncated)?.to_vec())
            .map_err(|_| "group name is not UTF-8")?;
        let count = r.u32().ok_or(truncated)?;
        let mut entries = GroupOffsets::new();
        for _ in 0..count {
            let (tp, committed) = get_entry(&mut r).ok_or(truncated)?;
            entries.insert(tp, committed);
        }
        offsets.insert(group, entries);
    }
    Ok((at, offsets))
}
