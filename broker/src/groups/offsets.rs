//! Committed offsets, durable: a [`StateLog`] of commits.
//!
//! Every commit call is one batch appended with `every-batch` flush, so a
//! commit that returned survives a SIGKILL or a power cut, and concurrent
//! commits share syncs. The state log snapshots and compacts itself.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use bytes::Bytes;

use super::assignor::TopicPartition;
use crate::storage::{ByteReader, Record, StateLog, StateMachine, StorageError};

const KIND_COMMIT: u8 = 1;
const KIND_DELETE_GROUP: u8 = 2;
/// Keyed by the topic rather than a group: every group's offsets of it go.
const KIND_DELETE_TOPIC: u8 = 3;

/// A committed offset: the next offset the group will read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub offset: u64,
    pub metadata: String,
    pub commit_time_ms: i64,
}

type GroupOffsets = BTreeMap<TopicPartition, CommittedOffset>;

/// Every group's offsets, as rebuilt from the commit records.
#[derive(Default)]
struct Offsets(HashMap<String, GroupOffsets>);

/// All groups' committed offsets.
pub struct OffsetStore {
    state: StateLog<Offsets>,
}

impl OffsetStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<OffsetStore, StorageError> {
        Ok(OffsetStore {
            state: StateLog::open(dir)?,
        })
    }

    /// Commits offsets for `group`; durable when it returns.
    pub fn commit(
        &self,
        group: &str,
        entries: &[(TopicPartition, CommittedOffset)],
    ) -> Result<(), StorageError> {
        let records: Vec<Record> = entries
            .iter()
            .map(|(tp, committed)| Record {
                key: Some(Bytes::copy_from_slice(group.as_bytes())),
                value: encode_commit(tp, committed),
                headers: vec![],
                timestamp: committed.commit_time_ms,
            })
            .collect();
        self.state.append(&records)
    }

    /// Forgets every offset of `group`.
    pub fn delete_group(&self, group: &str, now_ms: i64) -> Result<(), StorageError> {
        self.state.append(&[Record {
            key: Some(Bytes::copy_from_slice(group.as_bytes())),
            value: Bytes::from_static(&[KIND_DELETE_GROUP]),
            headers: vec![],
            timestamp: now_ms,
        }])
    }

    /// Forgets every group's offsets of `topic` (it was deleted; a new topic
    /// of the same name starts with no offsets).
    pub fn delete_topic(&self, topic: &str, now_ms: i64) -> Result<(), StorageError> {
        let any = self
            .state
            .state()
            .0
            .values()
            .any(|offsets| offsets.keys().any(|tp| tp.topic == topic));
        if !any {
            return Ok(());
        }
        self.state.append(&[Record {
            key: Some(Bytes::copy_from_slice(topic.as_bytes())),
            value: Bytes::from_static(&[KIND_DELETE_TOPIC]),
            headers: vec![],
            timestamp: now_ms,
        }])
    }

    /// The committed offsets of `group`.
    pub fn fetch(&self, group: &str) -> GroupOffsets {
        self.state.state().0.get(group).cloned().unwrap_or_default()
    }

    /// Groups that have committed offsets.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.state.state().0.keys().cloned().collect();
        groups.sort();
        groups
    }

    /// Files of the commit log (it compacts itself as it grows).
    pub fn log_segment_count(&self) -> usize {
        self.state.log_segment_count()
    }

    pub fn close(&self) -> Result<(), StorageError> {
        self.state.close()
    }
}

impl StateMachine for Offsets {
    fn apply(&mut self, record: &Record) {
        let Some(group) = record
            .key
            .as_ref()
            .and_then(|k| std::str::from_utf8(k).ok())
        else {
            tracing::warn!("offset record without a group or topic key skipped");
            return;
        };
        match record.value.first() {
            Some(&KIND_DELETE_TOPIC) => {
                let topic = group;
                for offsets in self.0.values_mut() {
                    offsets.retain(|tp, _| tp.topic != topic);
                }
                self.0.retain(|_, offsets| !offsets.is_empty());
            }
            Some(&KIND_COMMIT) => match get_entry(&mut ByteReader::new(&record.value[1..])) {
                Some((tp, committed)) => {
                    self.0
                        .entry(group.to_owned())
                        .or_default()
                        .insert(tp, committed);
                }
                None => tracing::warn!(group, "malformed offset commit record skipped"),
            },
            Some(&KIND_DELETE_GROUP) => {
                self.0.remove(group);
            }
            _ => tracing::warn!(group, "unknown offset record kind skipped"),
        }
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut groups: Vec<_> = self.0.iter().collect();
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
        out
    }

    fn decode_snapshot(bytes: &[u8]) -> Result<Self, &'static str> {
        let mut r = ByteReader::new(bytes);
        let truncated = "truncated";
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
        if !r.is_empty() {
            return Err("bytes after the last group");
        }
        Ok(Offsets(offsets))
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
