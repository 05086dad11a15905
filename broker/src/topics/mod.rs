//! Topics: the registry, their settings, their partitions, routing, and the
//! data directory's layout.
//!
//! This module owns:
//!
//! ```text
//! <data-dir>/LOCK                                     (storage::DataDirLock)
//! <data-dir>/meta/topics.json                         topic settings, written atomically
//! <data-dir>/meta/topics.json.prev                    the same, written just before: read when
//!                                                     topics.json is missing or damaged
//! <data-dir>/topics/<topic>/<partition>/              each partition's log (storage)
//! <data-dir>/internal/producers/<topic>/<partition>/  its producer state (producers)
//! ```
//!
//! A topic exists once its settings are in `topics.json`: creation writes
//! the partitions first and the settings last, deletion removes the
//! settings first and the files after. Directories a crash left without
//! settings (an unacknowledged create, an interrupted delete) are removed
//! when the registry opens.
//!
//! Each topic has a [`TopicId`]: its incarnation, random, given at creation
//! and kept in `topics.json` (a topic from a file written before ids existed
//! has one derived from its name, the same at every open, and written with
//! the file's next change). A topic deleted
//! and created again under the same name has a new id, so state kept
//! elsewhere by name (group offsets, retry sets) can tell the old topic's
//! from the new one's, even when a crash kept it from being deleted.
//!
//! It knows nothing of gRPC; names and settings are validated here, so
//! every caller gets the same rules.

mod config;
mod incarnation;

pub use incarnation::{
    LiveTopics, Reconcile, TopicBindings, TopicId, put_deleted_incarnation,
    read_deleted_incarnation, reconcile, reconcile_records,
};

pub use config::{
    DeadLetterConfig, DeadLetterPatch, TopicConfig, TopicConfigPatch, TopicDefaults,
    name_rule_violation, validate_topic_name,
};

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::producers::{IdempotentLog, ProducerIds, ProducerStateError};
use crate::storage::{
    DataDirLock, IntervalFlusher, PartitionLog, SpaceReserve, StorageError, write_atomically,
};

#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("topic {0:?} does not exist")]
    NotFound(String),
    #[error("topic {0:?} already exists")]
    AlreadyExists(String),
    #[error("invalid topic name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid topic setting: {0}")]
    InvalidConfig(String),
    #[error("topic {topic:?} has {partitions} partition(s); there is no partition {partition}")]
    NoSuchPartition {
        topic: String,
        partition: u32,
        partitions: u32,
    },
    #[error("topic metadata {path}: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    ProducerState(#[from] ProducerStateError),
}

/// A reader's position against a partition's offsets
/// ([`TopicRegistry::partition_lag`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionLag {
    pub end_offset: u64,
    pub log_start_offset: u64,
    /// Records from the reader's next offset to the end; `None` without a
    /// committed offset.
    pub lag: Option<u64>,
    /// Now less the timestamp of the first record not read, 0 when caught up.
    pub time_lag_ms: Option<i64>,
}

/// One partition: its log, behind the producer-sequence check.
pub struct Partition {
    pub index: u32,
    appender: IdempotentLog,
}

impl Partition {
    pub fn log(&self) -> &Arc<PartitionLog> {
        self.appender.log()
    }

    /// The log behind idempotent-producer checks: appends go through here.
    pub fn appender(&self) -> &IdempotentLog {
        &self.appender
    }
}

pub struct Topic {
    name: String,
    id: TopicId,
    config: RwLock<TopicConfig>,
    partitions: Vec<Arc<Partition>>,
    round_robin: AtomicU32,
    /// Turns true when the topic is deleted, so that readers waiting on its
    /// partitions stop waiting.
    deleted: watch::Sender<bool>,
}

impl Topic {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This incarnation of the topic.
    pub fn id(&self) -> TopicId {
        self.id
    }

    pub fn config(&self) -> TopicConfig {
        self.config.read().clone()
    }

    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    pub fn partition(&self, index: u32) -> Result<&Arc<Partition>, TopicError> {
        self.partitions
            .get(index as usize)
            .ok_or_else(|| TopicError::NoSuchPartition {
                topic: self.name.clone(),
                partition: index,
                partitions: self.partition_count(),
            })
    }

    /// The partition for a keyed record: the key's hash, with the same
    /// function every client uses.
    pub fn partition_for_key(&self, key: &[u8]) -> u32 {
        sluice_proto::partition_for_key(key, self.partition_count())
    }

    /// The next partition in round-robin order, for records without a key.
    /// Callers take one per request, not per record, so that a request's
    /// keyless records make one batch (Kafka's sticky partitioning).
    pub fn next_partition(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partition_count()
    }

    /// Whether the topic was deleted. A reader that holds the topic learns
    /// of it here rather than by waiting forever on a log nobody appends to.
    pub fn is_deleted(&self) -> bool {
        *self.deleted.borrow()
    }

    /// A receiver that turns true when the topic is deleted.
    pub fn deleted(&self) -> watch::Receiver<bool> {
        self.deleted.subscribe()
    }
}

/// Where topic settings live, under the data directory.
pub const TOPICS_FILE: &str = "meta/topics.json";

/// The copy of `topics.json` kept for when it is damaged.
pub fn previous_copy(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".prev");
    PathBuf::from(name)
}

/// Reads `topics.json`, falling back to its previous copy when it is
/// missing or damaged (and restoring it from that copy). With neither
/// readable the broker must not start: guessing would either lose topics
/// or, worse, delete their data as leftovers.
fn read_topics_file(path: &Path) -> Result<TopicsFile, TopicError> {
    let prev = previous_copy(path);
    let main = parse_topics_file(path);
    let damage = match main {
        Ok(Some(file)) => return Ok(file),
        Ok(None) if !prev.exists() => return Ok(TopicsFile::default()),
        Ok(None) => "the file is missing".to_owned(),
        Err(reason) => reason,
    };
    match parse_topics_file(&prev) {
        Ok(Some(file)) => {
            tracing::error!(file = %path.display(), reason = %damage, copy = %prev.display(),
                "topic metadata is damaged; starting from its previous copy");
            if path.exists() {
                let aside = PathBuf::from(format!("{}.damaged", path.display()));
                fs::rename(path, &aside)
                    .map_err(|e| StorageError::io("move damaged topic metadata aside", path, e))?;
            }
            let bytes =
                fs::read(&prev).map_err(|e| StorageError::io("read topic metadata", &prev, e))?;
            write_atomically(path, &bytes)?;
            Ok(file)
        }
        Ok(None) => Err(TopicError::Metadata {
            path: path.to_owned(),
            reason: format!(
                "{damage}, and there is no previous copy {}; restore the file from a backup \
                 (run `sluice-broker check --data-dir <dir>` to see every damaged file)",
                prev.display()
            ),
        }),
        Err(prev_damage) => Err(TopicError::Metadata {
            path: path.to_owned(),
            reason: format!(
                "{damage}, and its previous copy {} is damaged too ({prev_damage}); restore \
                 one of them from a backup (run `sluice-broker check --data-dir <dir>` to see \
                 every damaged file)",
                prev.display()
            ),
        }),
    }
}

/// `Ok(None)` when the file does not exist; `Err` says what is wrong.
fn parse_topics_file(path: &Path) -> Result<Option<TopicsFile>, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("unreadable JSON: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot be read: {e}")),
    }
}

/// Checks `topics.json` (and its previous copy) without changing anything:
/// the damage found, one line per file.
pub fn check_topics_file(data_dir: &Path) -> Vec<String> {
    let path = data_dir.join(TOPICS_FILE);
    let mut damage = Vec::new();
    for file in [path.clone(), previous_copy(&path)] {
        if let Err(reason) = parse_topics_file(&file) {
            damage.push(format!("{}: {reason}", file.display()));
        }
    }
    damage
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TopicsFile {
    version: u32,
    topics: BTreeMap<String, StoredTopic>,
}

/// A topic in `topics.json`: its settings, and its id beside them (absent
/// in files written before ids existed).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredTopic {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<TopicId>,
    #[serde(flatten)]
    config: TopicConfig,
}

/// Partitions opened or closed at the same time.
const PARTITION_WORKERS: usize = 8;

/// `f(0..count)` on up to [`PARTITION_WORKERS`] threads, results in index
/// order: opening and closing a partition wait mostly on fsyncs, which
/// overlap.
fn in_parallel<T: Send>(count: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let workers = count.clamp(1, PARTITION_WORKERS);
    if workers == 1 {
        return (0..count).map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<(usize, T)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        if index >= count {
                            return mine;
                        }
                        mine.push((index, f(index)));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("a partition worker panicked"))
            .collect()
    });
    done.sort_by_key(|(index, _)| *index);
    done.into_iter().map(|(_, t)| t).collect()
}

/// Every topic of a data directory. Holds the directory's lock for as long
/// as it lives.
pub struct TopicRegistry {
    data_dir: PathBuf,
    _lock: DataDirLock,
    defaults: TopicDefaults,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// Serialises changes to the set of topics and to `topics.json`.
    changes: Mutex<()>,
    flusher: IntervalFlusher,
    producer_ids: ProducerIds,
    /// Free space client writes leave to the broker's own state.
    space_reserve: RwLock<SpaceReserve>,
}

impl TopicRegistry {
    /// Locks `data_dir` and opens every topic in it (recovering each
    /// partition's log).
    pub fn open(
        data_dir: impl Into<PathBuf>,
        defaults: TopicDefaults,
    ) -> Result<TopicRegistry, TopicError> {
        let data_dir = data_dir.into();
        let lock = DataDirLock::acquire(&data_dir)?;
        for dir in ["meta", "topics", "internal/producers"] {
            let path = data_dir.join(dir);
            fs::create_dir_all(&path)
                .map_err(|e| StorageError::io("create directory", &path, e))?;
        }
        let meta_path = data_dir.join(TOPICS_FILE);
        let file = read_topics_file(&meta_path)?;
        let producer_ids = ProducerIds::open(data_dir.join("internal/producer-ids"))?;
        let space_reserve = RwLock::new(SpaceReserve::new(&data_dir, None)?);
        let registry = TopicRegistry {
            space_reserve,
            producer_ids,
            data_dir,
            _lock: lock,
            defaults,
            topics: RwLock::new(BTreeMap::new()),
            changes: Mutex::new(()),
            flusher: IntervalFlusher::start(),
        };
        remove_orphans(&registry.data_dir, &file.topics)?;
        let mut topics = BTreeMap::new();
        for (name, stored) in file.topics {
            // A hand-edited file must not point outside the data directory.
            validate_topic_name(&name).map_err(|e| TopicError::Metadata {
                path: meta_path.clone(),
                reason: e.to_string(),
            })?;
            let id = stored.id.unwrap_or_else(|| TopicId::from_before_ids(&name));
            // A setting the file holds but no topic may have (a damaged
            // or hand-edited file) names the file.
            let topic = registry
                .open_topic(&name, stored.config, id)
                .map_err(|e| match e {
                    TopicError::InvalidConfig(reason) => TopicError::Metadata {
                        path: meta_path.clone(),
                        reason: format!("topic {name:?}: {reason}"),
                    },
                    other => other,
                })?;
            topics.insert(name, topic);
        }
        tracing::info!(data_dir = %registry.data_dir.display(), topics = topics.len(), "opened topics");
        *registry.topics.write() = topics;
        Ok(registry)
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Sets the free space kept back from client writes (`None`: the
    /// default, 64 MiB or 5% of a smaller file system; `Some(0)`: none).
    pub fn set_min_free_bytes(&self, bytes: Option<u64>) -> Result<u64, TopicError> {
        let reserve = SpaceReserve::new(&self.data_dir, bytes)?;
        let bytes = reserve.bytes();
        *self.space_reserve.write() = reserve;
        Ok(bytes)
    }

    /// Refuses a client write when the data directory's free space is below
    /// the reserve, so that the broker's own state always has room.
    pub fn check_free_space(&self) -> Result<(), TopicError> {
        Ok(self.space_reserve.read().check()?)
    }

    pub fn defaults(&self) -> &TopicDefaults {
        &self.defaults
    }

    /// Producer ids and epochs of idempotent producers.
    pub fn producer_ids(&self) -> &ProducerIds {
        &self.producer_ids
    }

    fn topic_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("topics").join(name)
    }

    fn producer_dir(&self, name: &str) -> PathBuf {
        self.data_dir.join("internal/producers").join(name)
    }

    fn open_topic(
        &self,
        name: &str,
        config: TopicConfig,
        id: TopicId,
    ) -> Result<Arc<Topic>, TopicError> {
        let log_config = config.log_config()?;
        let open_partition = |index: u32| -> Result<Arc<Partition>, TopicError> {
            let log = Arc::new(PartitionLog::open(
                self.topic_dir(name).join(index.to_string()),
                log_config.clone(),
            )?);
            self.flusher.register(&log);
            let appender =
                IdempotentLog::open(log, self.producer_dir(name).join(index.to_string()))?;
            Ok(Arc::new(Partition { index, appender }))
        };
        // Opening a partition waits mostly on its fsyncs (recovery syncs
        // the active segment): a few at a time overlap them. Restarting
        // 10,000 partitions took 13.9 s one at a time, 3.7 s like this.
        let partitions = in_parallel(config.partitions as usize, |index| {
            open_partition(index as u32)
        })
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Topic {
            name: name.to_owned(),
            id,
            config: RwLock::new(config),
            partitions,
            round_robin: AtomicU32::new(0),
            deleted: watch::Sender::new(false),
        }))
    }

    /// Writes the settings of every topic to `topics.json`, and the same
    /// bytes first to `topics.json.prev`: a second copy to start from if
    /// the first is ever damaged. Both writes are atomic, so a crash
    /// between them leaves the old `topics.json` (the change was not
    /// acknowledged) and a `.prev` that is at most one change ahead.
    fn write_metadata(&self, topics: &BTreeMap<String, StoredTopic>) -> Result<(), TopicError> {
        let path = self.data_dir.join(TOPICS_FILE);
        let file = TopicsFile {
            version: 1,
            topics: topics.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&file).map_err(|e| TopicError::Metadata {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        write_atomically(&previous_copy(&path), &bytes)?;
        write_atomically(&path, &bytes)?;
        Ok(())
    }

    /// Every topic as `topics.json` stores it.
    fn stored(&self) -> BTreeMap<String, StoredTopic> {
        self.topics
            .read()
            .iter()
            .map(|(name, t)| {
                let stored = StoredTopic {
                    id: Some(t.id),
                    config: t.config(),
                };
                (name.clone(), stored)
            })
            .collect()
    }

    /// Creates a topic; unset settings take the broker's defaults.
    pub fn create(&self, name: &str, patch: &TopicConfigPatch) -> Result<TopicConfig, TopicError> {
        validate_topic_name(name)?;
        let config = self.defaults.config(patch)?;
        let _changes = self.changes.lock();
        if self.topics.read().contains_key(name) {
            return Err(TopicError::AlreadyExists(name.to_owned()));
        }
        // Leftovers of an unacknowledged create must not leak into this one.
        remove_dir_if_present(&self.topic_dir(name))?;
        remove_dir_if_present(&self.producer_dir(name))?;
        let id = TopicId::random();
        let created = self.open_topic(name, config.clone(), id).and_then(|topic| {
            let mut stored = self.stored();
            let new = StoredTopic {
                id: Some(id),
                config: config.clone(),
            };
            stored.insert(name.to_owned(), new);
            self.write_metadata(&stored)?;
            Ok(topic)
        });
        let topic = match created {
            Ok(topic) => topic,
            Err(e) => {
                // Nothing of a failed create stays behind (a full disk, say,
                // part of the way through the partitions).
                for dir in [self.topic_dir(name), self.producer_dir(name)] {
                    if let Err(cleanup) = remove_dir_if_present(&dir) {
                        tracing::warn!(path = %dir.display(), error = %cleanup, "removing a failed topic's files failed; they go at the next start");
                    }
                }
                return Err(e);
            }
        };
        self.topics.write().insert(name.to_owned(), topic);
        tracing::info!(
            topic = name,
            partitions = config.partitions,
            "created topic"
        );
        Ok(config)
    }

    /// Deletes a topic and its data; the id of the incarnation deleted.
    /// Readers still holding its records keep them until they let go.
    pub fn delete(&self, name: &str) -> Result<TopicId, TopicError> {
        let _changes = self.changes.lock();
        let topic = self
            .topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| TopicError::NotFound(name.to_owned()))?;
        let mut stored = self.stored();
        stored.remove(name);
        match self.write_metadata(&stored) {
            Ok(()) => {}
            // On a full disk the new settings file has no room: delete the
            // topic's files first to make some. A crash in between leaves
            // the topic listed with empty partitions (the delete was not
            // acknowledged, and can be repeated).
            Err(TopicError::Storage(e)) if e.is_out_of_space() => {
                tracing::warn!(topic = name, error = %e,
                    "no room for the topic settings: deleting the topic's files first");
                self.remove_topic_files(name, &topic)?;
                self.write_metadata(&stored)?;
            }
            Err(e) => return Err(e),
        }
        self.topics.write().remove(name);
        self.remove_topic_files(name, &topic)?;
        tracing::info!(topic = name, "deleted topic");
        Ok(topic.id)
    }

    /// Closes a deleted (or being deleted) topic's logs and removes its
    /// files; readers still holding its records keep them.
    fn remove_topic_files(&self, name: &str, topic: &Topic) -> Result<(), TopicError> {
        topic.deleted.send_replace(true);
        for partition in topic.partitions() {
            if let Err(e) = partition.log().close() {
                tracing::warn!(topic = name, partition = partition.index, error = %e, "closing a deleted partition failed");
            }
        }
        remove_dir_if_present(&self.topic_dir(name))?;
        remove_dir_if_present(&self.producer_dir(name))?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Arc<Topic>, TopicError> {
        self.topics
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| TopicError::NotFound(name.to_owned()))
    }

    pub fn list(&self) -> Vec<Arc<Topic>> {
        self.topics.read().values().cloned().collect()
    }

    /// Changes settings of a topic (not its partition count).
    pub fn alter(&self, name: &str, patch: &TopicConfigPatch) -> Result<TopicConfig, TopicError> {
        let _changes = self.changes.lock();
        let topic = self.get(name)?;
        let config = topic.config().patched(patch)?;
        self.defaults.check_limits(&config)?;
        let log_config = config.log_config()?;
        let mut stored = self.stored();
        let altered = StoredTopic {
            id: Some(topic.id),
            config: config.clone(),
        };
        stored.insert(name.to_owned(), altered);
        self.write_metadata(&stored)?;
        for partition in topic.partitions() {
            partition.log().set_config(log_config.clone())?;
        }
        *topic.config.write() = config.clone();
        tracing::info!(topic = name, "altered topic settings");
        Ok(config)
    }

    /// Applies retention to every partition, forgets producers idle for
    /// longer than the producer expiry, and snapshots producer state so that
    /// a restart replays little of each log.
    pub fn maintain(&self, now_ms: i64) {
        for topic in self.list() {
            for partition in topic.partitions() {
                partition
                    .appender()
                    .expire_producers(now_ms, self.defaults.producer_expiry);
                if let Err(e) = partition.log().enforce_retention(now_ms) {
                    tracing::warn!(topic = topic.name(), partition = partition.index, error = %e, "retention failed");
                }
                if let Err(e) = partition.appender().snapshot() {
                    tracing::warn!(topic = topic.name(), partition = partition.index, error = %e, "producer snapshot failed");
                }
            }
        }
    }

    /// Where a reader that next reads `committed` stands in a partition:
    /// the partition's offsets, and (when `committed` is given) how many
    /// records and how many milliseconds (by the timestamp of the first
    /// record not yet read) it is behind. `None` for a topic or partition
    /// that no longer exists. Blocking: one small read when behind.
    pub fn partition_lag(
        &self,
        tp: &crate::groups::TopicPartition,
        committed: Option<u64>,
        now_ms: i64,
    ) -> Option<PartitionLag> {
        let topic = self.get(&tp.topic).ok()?;
        let log = topic.partition(tp.partition).ok()?.log().clone();
        let end_offset = log.high_watermark();
        let log_start_offset = log.log_start_offset();
        let Some(committed) = committed else {
            return Some(PartitionLag {
                end_offset,
                log_start_offset,
                lag: None,
                time_lag_ms: None,
            });
        };
        // Records deleted by retention are not waiting for the reader.
        let next = committed.max(log_start_offset);
        let lag = end_offset.saturating_sub(next);
        let time_lag_ms = if lag == 0 {
            0
        } else {
            match log.read_records(next, 1) {
                Ok(records) => records
                    .iter()
                    .find(|r| r.offset >= next)
                    .map_or(0, |r| now_ms.saturating_sub(r.record.timestamp).max(0)),
                Err(e) => {
                    tracing::warn!(partition = %tp, error = %e, "reading the oldest unconsumed record for lag failed");
                    0
                }
            }
        };
        Some(PartitionLag {
            end_offset,
            log_start_offset,
            lag: Some(lag),
            time_lag_ms: Some(time_lag_ms),
        })
    }

    /// Syncs and closes every partition. Appends fail afterwards.
    pub fn close(&self) -> Result<(), TopicError> {
        let partitions: Vec<(Arc<Topic>, Arc<Partition>)> = self
            .list()
            .into_iter()
            .flat_map(|topic| {
                let partitions = topic.partitions().to_vec();
                partitions.into_iter().map(move |p| (Arc::clone(&topic), p))
            })
            .collect();
        // Each close syncs the producer snapshot: a few at a time overlap.
        let closed = in_parallel(partitions.len(), |i| {
            let (topic, partition) = &partitions[i];
            let closed = partition
                .appender()
                .snapshot()
                .map_err(TopicError::from)
                .and(partition.log().close().map_err(TopicError::from));
            if let Err(e) = &closed {
                tracing::error!(topic = topic.name(), partition = partition.index, error = %e, "closing a partition failed");
            }
            closed
        });
        closed.into_iter().collect()
    }
}

impl crate::groups::TopicCatalog for TopicRegistry {
    fn partition_count(&self, topic: &str) -> Option<u32> {
        self.get(topic).ok().map(|t| t.partition_count())
    }

    fn topic_id(&self, topic: &str) -> Option<TopicId> {
        self.get(topic).ok().map(|t| t.id())
    }
}

fn remove_dir_if_present(path: &Path) -> Result<(), StorageError> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StorageError::io("remove directory", path, e)),
    }
}

/// Removes topic directories that have no settings: what a crash left of a
/// create that was never acknowledged or a delete that was.
fn remove_orphans(
    data_dir: &Path,
    topics: &BTreeMap<String, StoredTopic>,
) -> Result<(), StorageError> {
    for parent in [data_dir.join("topics"), data_dir.join("internal/producers")] {
        let entries =
            fs::read_dir(&parent).map_err(|e| StorageError::io("list directory", &parent, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StorageError::io("list directory", &parent, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !topics.contains_key(&name) {
                tracing::warn!(path = %entry.path().display(), "removing the files of a topic that does not exist");
                remove_dir_if_present(&entry.path())?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> TopicDefaults {
        TopicDefaults {
            segment_bytes: 1 << 20,
            max_record_bytes: 64 * 1024,
            ..TopicDefaults::default()
        }
    }

    fn partitions(n: u32) -> TopicConfigPatch {
        TopicConfigPatch {
            partitions: Some(n),
            ..Default::default()
        }
    }

    #[test]
    fn a_damaged_or_missing_topics_file_is_restored_from_its_previous_copy() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join(TOPICS_FILE);
        {
            let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
            registry.create("a", &partitions(2)).unwrap();
            registry.create("b", &partitions(1)).unwrap();
        }
        let good = fs::read(&meta).unwrap();
        assert_eq!(fs::read(previous_copy(&meta)).unwrap(), good);
        for damage in [
            Some(&b"{\"version\": 1, \"topi"[..]),
            Some(&b"\0\0\0"[..]),
            None,
        ] {
            match damage {
                Some(bytes) => fs::write(&meta, bytes).unwrap(),
                None => fs::remove_file(&meta).unwrap(),
            }
            let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
            let names: Vec<String> = registry
                .list()
                .iter()
                .map(|t| t.name().to_owned())
                .collect();
            assert_eq!(names, ["a", "b"], "after {damage:?}");
            assert!(dir.path().join("topics/a/1").is_dir(), "no data removed");
            assert_eq!(fs::read(&meta).unwrap(), good, "restored");
        }
    }

    #[test]
    fn with_both_topics_files_damaged_the_broker_refuses_and_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join(TOPICS_FILE);
        {
            let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
            registry.create("a", &partitions(1)).unwrap();
        }
        fs::write(&meta, b"garbage").unwrap();
        fs::write(previous_copy(&meta), b"more garbage").unwrap();
        let Err(error) = TopicRegistry::open(dir.path(), defaults()) else {
            panic!("opened with both topic files damaged");
        };
        let message = error.to_string();
        for needle in [
            meta.to_str().unwrap(),
            previous_copy(&meta).to_str().unwrap(),
            "sluice-broker check",
        ] {
            assert!(message.contains(needle), "{message} lacks {needle}");
        }
        assert!(dir.path().join("topics/a/0").is_dir(), "no data removed");
    }

    #[test]
    fn topics_and_their_settings_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
            registry.create("a", &partitions(3)).unwrap();
            registry.create("b", &partitions(1)).unwrap();
            let altered = registry
                .alter(
                    "b",
                    &TopicConfigPatch {
                        flush: Some("os".into()),
                        retention_ms: Some(0),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(altered.flush, "os");
            assert_eq!(altered.retention_ms, None);
            registry.create("c", &partitions(2)).unwrap();
            registry.delete("c").unwrap();
            registry.close().unwrap();
        }
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        let names: Vec<String> = registry
            .list()
            .iter()
            .map(|t| t.name().to_owned())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(registry.get("a").unwrap().partition_count(), 3);
        let b = registry.get("b").unwrap().config();
        assert_eq!((b.flush.as_str(), b.retention_ms), ("os", None));
        assert!(matches!(registry.get("c"), Err(TopicError::NotFound(_))));
        assert!(!dir.path().join("topics/c").exists());
        assert!(dir.path().join("topics/a/2").is_dir());
    }

    #[test]
    fn the_data_directory_is_locked_while_the_registry_lives() {
        let dir = tempfile::tempdir().unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        let Err(TopicError::Storage(StorageError::Locked { .. })) =
            TopicRegistry::open(dir.path(), defaults())
        else {
            panic!("a second registry opened a locked data directory");
        };
        drop(registry);
        TopicRegistry::open(dir.path(), defaults()).expect("free again");
    }

    #[test]
    fn routing_hashes_keys_and_rotates_keyless_requests() {
        let dir = tempfile::tempdir().unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        registry.create("t", &partitions(4)).unwrap();
        let topic = registry.get("t").unwrap();
        for key in [&b"a"[..], b"user-42", b""] {
            assert_eq!(
                topic.partition_for_key(key),
                sluice_proto::partition_for_key(key, 4)
            );
        }
        let rotation: Vec<u32> = (0..8).map(|_| topic.next_partition()).collect();
        assert_eq!(rotation, [0, 1, 2, 3, 0, 1, 2, 3]);
    }

    #[test]
    fn deleting_a_topic_tells_its_readers() {
        let dir = tempfile::tempdir().unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        registry.create("t", &partitions(1)).unwrap();
        let topic = registry.get("t").unwrap();
        let deleted = topic.deleted();
        assert!(!*deleted.borrow() && !topic.is_deleted());
        registry.delete("t").unwrap();
        assert!(*deleted.borrow() && topic.is_deleted());
    }

    #[test]
    fn a_failed_create_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        // The settings file cannot be replaced: the create fails at its
        // last step, after the partitions were made.
        fs::create_dir_all(dir.path().join("meta/topics.json/x")).unwrap();
        registry.create("t", &partitions(2)).unwrap_err();
        assert!(matches!(registry.get("t"), Err(TopicError::NotFound(_))));
        assert!(!dir.path().join("topics/t").exists());
        assert!(registry.list().is_empty());
    }

    #[test]
    fn a_settings_file_naming_a_bad_topic_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(TopicRegistry::open(dir.path(), defaults()).unwrap());
        let config = defaults().config(&TopicConfigPatch::default()).unwrap();
        let file = TopicsFile {
            version: 1,
            topics: BTreeMap::from([("../escape".to_owned(), StoredTopic { id: None, config })]),
        };
        fs::write(
            dir.path().join("meta/topics.json"),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        let Err(error) = TopicRegistry::open(dir.path(), defaults()) else {
            panic!("opened a registry with a topic named ../escape");
        };
        assert!(error.to_string().contains("invalid topic name"), "{error}");
    }

    /// Found by `storage_damage_prop`: one byte of `topics.json` overwritten
    /// made a setting no topic may have, refused without naming the file.
    #[test]
    fn a_settings_file_with_a_setting_no_topic_may_have_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        registry
            .create("orders", &TopicConfigPatch::default())
            .unwrap();
        registry.close().unwrap();
        drop(registry);
        let path = dir.path().join(TOPICS_FILE);
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains("{topic}.{group}.dlq"), "{text}");
        fs::write(
            &path,
            text.replace("{topic}.{group}.dlq", " topic}.{group}.dlq"),
        )
        .unwrap();
        fs::remove_file(previous_copy(&path)).unwrap();
        let Err(error) = TopicRegistry::open(dir.path(), defaults()) else {
            panic!("opened a registry with a bad DLQ template");
        };
        let message = error.to_string();
        assert!(message.contains(path.to_str().unwrap()), "{message}");
        assert!(
            message.contains("\"orders\"") && message.contains("DLQ topic template"),
            "{message}"
        );
    }

    #[test]
    fn a_topic_keeps_its_id_and_a_new_topic_of_the_same_name_gets_another() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
            registry.create("t", &partitions(1)).unwrap();
            let id = registry.get("t").unwrap().id();
            registry
                .alter(
                    "t",
                    &TopicConfigPatch {
                        flush: Some("os".into()),
                        ..Default::default()
                    },
                )
                .unwrap();
            assert_eq!(registry.get("t").unwrap().id(), id, "kept by alter");
            id
        };
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        assert_eq!(registry.get("t").unwrap().id(), first, "kept across opens");
        registry.delete("t").unwrap();
        registry.create("t", &partitions(1)).unwrap();
        assert_ne!(registry.get("t").unwrap().id(), first, "a new incarnation");
    }

    #[test]
    fn a_settings_file_from_before_ids_gets_ids_that_stay() {
        let dir = tempfile::tempdir().unwrap();
        drop(TopicRegistry::open(dir.path(), defaults()).unwrap());
        let config = defaults().config(&TopicConfigPatch::default()).unwrap();
        let old = serde_json::json!({
            "version": 1,
            "topics": { "t": serde_json::to_value(&config).unwrap() },
        });
        fs::write(
            dir.path().join("meta/topics.json"),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
        let id = {
            let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
            assert_eq!(registry.get("t").unwrap().config(), config);
            registry.get("t").unwrap().id()
        };
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        assert_eq!(
            registry.get("t").unwrap().id(),
            id,
            "the same at every open"
        );
        registry.create("u", &partitions(1)).unwrap();
        drop(registry);
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        assert_eq!(registry.get("t").unwrap().id(), id, "and once written");
        registry.delete("t").unwrap();
        registry.create("t", &partitions(1)).unwrap();
        assert_ne!(registry.get("t").unwrap().id(), id, "a new incarnation");
    }

    #[test]
    fn directories_without_settings_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(TopicRegistry::open(dir.path(), defaults()).unwrap());
        fs::create_dir_all(dir.path().join("topics/leftover/0")).unwrap();
        let registry = TopicRegistry::open(dir.path(), defaults()).unwrap();
        assert!(registry.list().is_empty());
        assert!(!dir.path().join("topics/leftover").exists());
    }
}
