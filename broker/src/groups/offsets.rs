//! Committed offsets, durable: a [`StateLog`] of commits.
//!
//! Every commit call is one batch appended with `every-batch` flush, so a
//! commit that returned survives a SIGKILL or a power cut, and concurrent
//! commits share syncs. The state log snapshots and compacts itself.
//!
//! Offsets are bound to a topic's incarnation ([`TopicId`]): the store
//! records which incarnation of each topic its offsets belong to, and
//! binding a topic to another incarnation drops every group's offsets of
//! it. Offsets of an incarnation other than the live topic's are never
//! answered, so a topic deleted and created again never obeys the old one's
//! offsets, even when a crash came between deleting the topic and deleting
//! its offsets.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use bytes::Bytes;

use super::assignor::TopicPartition;
use crate::storage::{ByteReader, Record, StateLog, StateMachine, StorageError};
use crate::topics::{
    LiveTopics, TopicBindings, TopicId, put_deleted_incarnation, read_deleted_incarnation,
};

const KIND_COMMIT: u8 = 1;
const KIND_DELETE_GROUP: u8 = 2;
/// Keyed by the topic rather than a group: every group's offsets of it go.
const KIND_DELETE_TOPIC: u8 = 3;
/// Keyed by the topic: its offsets belong to this incarnation; those of
/// any other go.
const KIND_BIND_TOPIC: u8 = 4;

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
struct Offsets {
    groups: HashMap<String, GroupOffsets>,
    /// The incarnation each topic's offsets belong to. A topic with offsets
    /// but no binding was committed before incarnations existed (it is
    /// bound to the live topic when the store is reconciled at startup).
    bindings: TopicBindings,
}

impl Offsets {
    fn remove_topic(&mut self, topic: &str) {
        for offsets in self.groups.values_mut() {
            offsets.retain(|tp, _| tp.topic != topic);
        }
        self.groups.retain(|_, offsets| !offsets.is_empty());
        self.bindings.remove(topic);
    }

    /// Topics with offsets.
    fn topics(&self) -> BTreeSet<String> {
        self.groups
            .values()
            .flat_map(|offsets| offsets.keys().map(|tp| tp.topic.clone()))
            .collect()
    }
}

fn bind_record(topic: &str, id: TopicId) -> Record {
    let mut value = vec![KIND_BIND_TOPIC];
    value.extend_from_slice(&id.to_le_bytes());
    Record {
        key: Some(Bytes::copy_from_slice(topic.as_bytes())),
        value: value.into(),
        headers: vec![],
        timestamp: 0,
    }
}

/// Deletes every group's offsets of `topic` if they belong to incarnation
/// `deleted` (`None`: unbound), not those of a newer one.
fn delete_topic_record(topic: &str, deleted: Option<TopicId>, now_ms: i64) -> Record {
    let mut value = vec![KIND_DELETE_TOPIC];
    put_deleted_incarnation(&mut value, deleted);
    Record {
        key: Some(Bytes::copy_from_slice(topic.as_bytes())),
        value: value.into(),
        headers: vec![],
        timestamp: now_ms,
    }
}

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

    /// Commits offsets for `group`, bound to the live incarnations of their
    /// topics; durable when it returns. A topic whose stored offsets belong
    /// to another incarnation loses them first, in the same atomic append.
    pub fn commit(
        &self,
        group: &str,
        entries: &[(TopicPartition, CommittedOffset)],
        live: LiveTopics<'_>,
    ) -> Result<(), StorageError> {
        let topics: BTreeSet<&str> = entries.iter().map(|(tp, _)| tp.topic.as_str()).collect();
        let mut records: Vec<Record> = {
            let state = self.state.state();
            topics
                .into_iter()
                .filter_map(|topic| {
                    let id = live(topic)?;
                    // Checked outside the writer's lock: two commits racing
                    // both bind, and the second bind is a no-op.
                    (!state.bindings.is_bound(topic, id)).then(|| bind_record(topic, id))
                })
                .collect()
        };
        records.extend(entries.iter().map(|(tp, committed)| Record {
            key: Some(Bytes::copy_from_slice(group.as_bytes())),
            value: encode_commit(tp, committed),
            headers: vec![],
            timestamp: committed.commit_time_ms,
        }));
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
    pub fn delete_topic(
        &self,
        topic: &str,
        deleted: TopicId,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let state = self.state.state();
        if !state.topics().contains(topic) && !state.bindings.topics().any(|t| t == topic) {
            return Ok(());
        }
        drop(state);
        self.state
            .append(&[delete_topic_record(topic, Some(deleted), now_ms)])
    }

    /// Drops, durably, the offsets of topics that do not exist and of
    /// incarnations other than the live one, and binds offsets committed
    /// before incarnations existed to the live topic. Run at startup (before
    /// any commit) and from maintenance; returns the topics whose offsets
    /// were dropped.
    pub fn reconcile(
        &self,
        live: LiveTopics<'_>,
        now_ms: i64,
    ) -> Result<Vec<String>, StorageError> {
        let plan = {
            let state = self.state.state();
            crate::topics::reconcile(&state.topics(), &state.bindings, live)
        };
        let (records, dropped) =
            crate::topics::reconcile_records(plan, bind_record, |topic, bound| {
                delete_topic_record(topic, bound, now_ms)
            });
        self.state.append(&records)?;
        for topic in &dropped {
            tracing::warn!(
                topic,
                "dropped group offsets of a deleted topic (or of an earlier topic of that name)"
            );
        }
        Ok(dropped)
    }

    /// Every committed offset of `group`, whichever incarnation of its
    /// topic it belongs to. Use [`OffsetStore::fetch_live`] to answer
    /// clients.
    pub fn fetch(&self, group: &str) -> GroupOffsets {
        self.state
            .state()
            .groups
            .get(group)
            .cloned()
            .unwrap_or_default()
    }

    /// The committed offsets of `group` that belong to the live incarnation
    /// of their topic.
    pub fn fetch_live(&self, group: &str, live: LiveTopics<'_>) -> GroupOffsets {
        let state = self.state.state();
        let Some(offsets) = state.groups.get(group) else {
            return GroupOffsets::new();
        };
        offsets
            .iter()
            .filter(|(tp, _)| {
                live(&tp.topic).is_some_and(|id| state.bindings.is_bound(&tp.topic, id))
            })
            .map(|(tp, committed)| (tp.clone(), committed.clone()))
            .collect()
    }

    /// Groups that have committed offsets.
    pub fn groups(&self) -> Vec<String> {
        let mut groups: Vec<String> = self.state.state().groups.keys().cloned().collect();
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
                match read_deleted_incarnation(&mut ByteReader::new(&record.value[1..])) {
                    Ok(None) => self.remove_topic(topic),
                    Ok(Some(deleted)) => {
                        if self.bindings.delete_applies(topic, deleted) {
                            self.remove_topic(topic);
                        }
                    }
                    Err(reason) => tracing::warn!(topic, reason, "malformed topic delete skipped"),
                }
            }
            Some(&KIND_BIND_TOPIC) => {
                let topic = group;
                let Some(id) = TopicId::read(&mut ByteReader::new(&record.value[1..])) else {
                    tracing::warn!(topic, "malformed topic binding skipped");
                    return;
                };
                if self.bindings.bind(topic, id) {
                    // Offsets of an earlier topic of this name.
                    self.remove_topic(topic);
                    let _ = self.bindings.bind(topic, id);
                }
            }
            Some(&KIND_COMMIT) => match get_entry(&mut ByteReader::new(&record.value[1..])) {
                Some((tp, committed)) => {
                    self.groups
                        .entry(group.to_owned())
                        .or_default()
                        .insert(tp, committed);
                }
                None => tracing::warn!(group, "malformed offset commit record skipped"),
            },
            Some(&KIND_DELETE_GROUP) => {
                self.groups.remove(group);
            }
            _ => tracing::warn!(group, "unknown offset record kind skipped"),
        }
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut groups: Vec<_> = self.groups.iter().collect();
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
        // Bindings follow the groups (a snapshot written before they
        // existed ends after the groups).
        self.bindings.encode(&mut out);
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
        let bindings = TopicBindings::decode(&mut r)?;
        if !r.is_empty() {
            return Err("bytes after the topic bindings");
        }
        Ok(Offsets {
            groups: offsets,
            bindings,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64) -> CommittedOffset {
        CommittedOffset {
            offset,
            metadata: String::new(),
            commit_time_ms: 1,
        }
    }

    #[test]
    fn offsets_of_another_incarnation_are_never_answered_and_go_at_reconcile() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (TopicId(1), TopicId(2));
        let tp = TopicPartition::new("t", 0);
        {
            let store = OffsetStore::open(dir.path()).unwrap();
            store
                .commit("g", &[(tp.clone(), at(5))], &|_| Some(old))
                .unwrap();
            assert_eq!(store.fetch_live("g", &|_| Some(old))[&tp].offset, 5);
            // The topic was deleted and created again, and the offsets were
            // not deleted (a crash in between): not answered.
            assert!(store.fetch_live("g", &|_| Some(new)).is_empty());
            assert!(store.fetch_live("g", &|_| None).is_empty());
            store.state.compact().unwrap();
        }
        // Across a reopen (through the snapshot), then dropped for good.
        let store = OffsetStore::open(dir.path()).unwrap();
        assert_eq!(store.fetch_live("g", &|_| Some(old))[&tp].offset, 5);
        assert_eq!(store.reconcile(&|_| Some(new), 0).unwrap(), ["t"]);
        assert!(store.fetch("g").is_empty());
        store
            .commit("g", &[(tp.clone(), at(1))], &|_| Some(new))
            .unwrap();
        assert_eq!(store.fetch_live("g", &|_| Some(new))[&tp].offset, 1);
        // A commit under another incarnation drops the old one's offsets of
        // every group in the same append.
        store
            .commit("h", &[(TopicPartition::new("t", 1), at(3))], &|_| {
                Some(TopicId(3))
            })
            .unwrap();
        assert!(store.fetch("g").is_empty());
        assert!(
            store
                .reconcile(&|_| Some(TopicId(3)), 0)
                .unwrap()
                .is_empty()
        );
        // Deleting an older incarnation leaves the live one's offsets.
        store.delete_topic("t", new, 0).unwrap();
        assert!(!store.fetch("h").is_empty());
        assert_eq!(store.reconcile(&|_| None, 0).unwrap(), ["t"]);
        assert!(store.fetch("h").is_empty());
    }

    #[test]
    fn offsets_from_before_incarnations_are_adopted_by_the_live_topic() {
        let dir = tempfile::tempdir().unwrap();
        let tp = TopicPartition::new("t", 0);
        {
            let store = OffsetStore::open(dir.path()).unwrap();
            // As an older broker wrote it: a commit record and no binding.
            store
                .state
                .append(&[Record {
                    key: Some(Bytes::from_static(b"g")),
                    value: encode_commit(&tp, &at(7)),
                    headers: vec![],
                    timestamp: 1,
                }])
                .unwrap();
        }
        let store = OffsetStore::open(dir.path()).unwrap();
        assert!(
            store
                .reconcile(&|_| Some(TopicId(9)), 0)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.fetch_live("g", &|_| Some(TopicId(9)))[&tp].offset, 7);
    }
}
