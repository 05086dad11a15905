//! Retry sets: the nacked records of each group, durable.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use crate::storage::{ByteReader, Record, StateLog, StateMachine, StorageError, write_atomically};
use crate::topics::{
    DeadLetterPatch, LiveTopics, TopicBindings, TopicId, put_deleted_incarnation,
    read_deleted_incarnation,
};

const KIND_UPSERT: u8 = 1;
const KIND_REMOVE: u8 = 2;
const KIND_REDRIVE_PROGRESS: u8 = 3;
/// Keyed by a source topic: every group's entries of it go (the topic was
/// deleted). Numbered apart from the kinds above, which other changes add
/// to.
const KIND_DELETE_TOPIC: u8 = 20;
/// Keyed by a source topic: its entries belong to this incarnation; those
/// of any other go.
const KIND_BIND_TOPIC: u8 = 21;
const KIND_DEAD_LETTERED: u8 = 4;
const KIND_REDRIVE_IN_FLIGHT: u8 = 5;

/// How many finished dead letters the retry sets remember (per broker), so
/// that a late or repeated nack of a record already dead-lettered is
/// answered with that dead letter instead of starting it over.
pub const REMEMBERED_DEAD_LETTERS: usize = 10_000;

/// Bits of an entry's state byte. Entries written before `HANDED_OUT` and
/// `UNDELIVERABLE` existed read as neither.
const STATE_DEAD_LETTER_PENDING: u8 = 1;
const STATE_HANDED_OUT: u8 = 2;
const STATE_UNDELIVERABLE: u8 = 4;

/// Deliveries and backoff for records a group nacks.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Deliveries a record gets in all, the first (normal) one included;
    /// after that many failures it is dead-lettered.
    pub max_deliveries: u32,
    pub initial_backoff: Duration,
    pub multiplier: f64,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_deliveries: 5,
            initial_backoff: Duration::from_secs(1),
            multiplier: 2.0,
            max_backoff: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait before the next delivery after `failures` failed ones.
    pub fn backoff(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(64) as i32;
        let factor = self.multiplier.max(1.0).powi(exponent);
        let secs = self.initial_backoff.as_secs_f64() * factor;
        Duration::from_secs_f64(secs.min(self.max_backoff.as_secs_f64()))
    }
}

/// The record a retry is about: where it was consumed from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RetryKey {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

/// Where the bytes of a record to redeliver are: the source record, or
/// after a redrive its copy in the DLQ (the source may be gone by then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordLocation {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryEntry {
    pub key: RetryKey,
    pub data: RecordLocation,
    /// Failed deliveries so far.
    pub deliveries: u32,
    pub first_failure_ms: i64,
    pub last_failure_ms: i64,
    pub next_delivery_ms: i64,
    pub last_reason: String,
    pub error_class: String,
    /// Failed for the last time: waiting to be appended to the DLQ.
    pub dead_letter_pending: bool,
    /// Handed to a member by `FetchRetries` and neither acked nor nacked
    /// since: `next_delivery_ms` is when that delivery times out (and
    /// counts as failed).
    pub handed_out: bool,
    /// Failed for the last time, but its dead letter could not be written
    /// (why): it stays here, never redelivered, until a retry of the
    /// dead-lettering succeeds or an ack removes it.
    pub undeliverable: Option<String>,
}

impl RetryEntry {
    /// An entry with no failed delivery yet, due at `now_ms`.
    fn fresh(key: RetryKey, data: RecordLocation, now_ms: i64) -> RetryEntry {
        RetryEntry {
            key,
            data,
            deliveries: 0,
            first_failure_ms: now_ms,
            last_failure_ms: now_ms,
            next_delivery_ms: now_ms,
            last_reason: String::new(),
            error_class: String::new(),
            dead_letter_pending: false,
            handed_out: false,
            undeliverable: None,
        }
    }
}

/// What a nack led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NackOutcome {
    /// It will be delivered again at `next_delivery_ms`.
    Retry {
        deliveries: u32,
        next_delivery_ms: i64,
    },
    /// It failed its last delivery: append it to the DLQ, then call
    /// [`RetrySets::dead_lettered`]. Exactly one call gets this for a
    /// dead letter: the one that made it pending.
    DeadLetter(DeadLetter),
    /// It was dead-lettered already (a repeated or late nack): nothing
    /// changed.
    AlreadyDeadLettered(FinishedDeadLetter),
    /// Its dead letter is being written by another call, or could not be
    /// written (`undeliverable` says why): nothing changed.
    DeadLetterInProgress {
        deliveries: u32,
        undeliverable: Option<String>,
    },
}

/// A redrive that appends to topics (`--to-source`, `--to-topic`) and
/// has not saved its progress yet: where a crash may have left records
/// appended that the progress does not cover.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveInFlight {
    /// The first DLQ offset it may have appended.
    pub from: u64,
    /// (target topic, partition) → the target's end offset before the
    /// redrive appended to it: the records it appended are past that.
    pub targets: BTreeMap<(String, u32), u64>,
}

/// Where a finished dead letter went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedDeadLetter {
    pub dlq_topic: String,
    pub dlq_offset: u64,
    pub deliveries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub group: String,
    pub entry: RetryEntry,
}

#[derive(Default)]
struct RetryState {
    groups: HashMap<String, BTreeMap<RetryKey, RetryEntry>>,
    /// (dlq topic, partition) → offset up to which a redrive has gone.
    redrive_progress: BTreeMap<(String, u32), u64>,
    /// The incarnation each source topic's entries belong to (none for
    /// entries from before incarnations: bound at startup).
    bindings: TopicBindings,
    /// The last [`REMEMBERED_DEAD_LETTERS`] dead letters finished, oldest
    /// first, and where each went.
    finished: VecDeque<(String, RetryKey)>,
    finished_at: HashMap<(String, RetryKey), FinishedDeadLetter>,
    /// (dlq topic, partition) → a redrive to topics that has not saved its
    /// progress yet.
    redrive_in_flight: BTreeMap<(String, u32), RedriveInFlight>,
}

impl RetryState {
    fn remember_finished(&mut self, group: String, key: RetryKey, at: FinishedDeadLetter) {
        let id = (group, key);
        if self.finished_at.insert(id.clone(), at).is_none() {
            self.finished.push_back(id);
        }
        while self.finished.len() > REMEMBERED_DEAD_LETTERS {
            if let Some(old) = self.finished.pop_front() {
                self.finished_at.remove(&old);
            }
        }
    }

    fn remove_entry(&mut self, group: &str, key: &RetryKey) {
        if let Some(entries) = self.groups.get_mut(group) {
            entries.remove(key);
            if entries.is_empty() {
                self.groups.remove(group);
            }
        }
    }

    /// Forgets every group's entries of source topic `topic`.
    fn remove_topic(&mut self, topic: &str) {
        for entries in self.groups.values_mut() {
            entries.retain(|key, _| key.topic != topic);
        }
        self.groups.retain(|_, entries| !entries.is_empty());
        // A record of a new topic of this name at a remembered offset is
        // not the one dead-lettered.
        self.finished.retain(|(_, key)| key.topic != topic);
        self.finished_at.retain(|(_, key), _| key.topic != topic);
        self.bindings.remove(topic);
    }

    /// Source topics with entries.
    fn topics(&self) -> BTreeSet<String> {
        self.groups
            .values()
            .flat_map(|entries| entries.keys().map(|k| k.topic.clone()))
            .collect()
    }
}

/// Every group's retry set, and each group's changes to its topics' retry
/// settings.
pub struct RetrySets {
    state: StateLog<RetryState>,
    /// `group-overrides.json` beside the state log: (group, topic) →
    /// settings the group changed. Small and rarely written: one file,
    /// replaced atomically.
    overrides_path: PathBuf,
    overrides: parking_lot::Mutex<GroupOverrides>,
    /// Held across each read-modify-write of an entry (read the entry,
    /// change it, append the change), so two concurrent calls about one
    /// record cannot both start from the same old entry. The state log
    /// serialises its appends anyway, so one lock costs no parallelism.
    changing: parking_lot::Mutex<()>,
}

/// group → topic → changed settings.
type GroupOverrides = BTreeMap<String, BTreeMap<String, DeadLetterPatch>>;

impl RetrySets {
    pub fn open(dir: impl Into<PathBuf>) -> Result<RetrySets, StorageError> {
        let dir = dir.into();
        let state = StateLog::open(&dir)?;
        let overrides_path = dir.join("group-overrides.json");
        let overrides = match std::fs::read(&overrides_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StorageError::Corrupt {
                path: overrides_path.clone(),
                position: 0,
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => GroupOverrides::new(),
            Err(e) => return Err(StorageError::io("read group overrides", &overrides_path, e)),
        };
        Ok(RetrySets {
            state,
            overrides_path,
            overrides: parking_lot::Mutex::new(overrides),
            changing: parking_lot::Mutex::new(()),
        })
    }

    /// The settings `group` changed for `topic`, if any.
    pub fn group_override(&self, group: &str, topic: &str) -> Option<DeadLetterPatch> {
        self.overrides.lock().get(group)?.get(topic).cloned()
    }

    /// Sets (or, with an empty patch, clears) what `group` changes of
    /// `topic`'s retry settings; durable when it returns.
    pub fn set_group_override(
        &self,
        group: &str,
        topic: &str,
        patch: DeadLetterPatch,
    ) -> Result<(), StorageError> {
        let mut overrides = self.overrides.lock();
        let mut next = overrides.clone();
        if patch.is_empty() {
            if let Some(topics) = next.get_mut(group) {
                topics.remove(topic);
                if topics.is_empty() {
                    next.remove(group);
                }
            }
        } else {
            next.entry(group.to_owned())
                .or_default()
                .insert(topic.to_owned(), patch);
        }
        let bytes = serde_json::to_vec_pretty(&next).expect("overrides serialise");
        write_atomically(&self.overrides_path, &bytes)?;
        *overrides = next;
        Ok(())
    }

    /// Forgets every group's retries of `topic` (its incarnation `deleted`
    /// was deleted), pending dead letters included; durable when it
    /// returns. Retries of a newer topic of that name stay.
    pub fn delete_topic(&self, topic: &str, deleted: TopicId) -> Result<(), StorageError> {
        {
            let state = self.state.state();
            if !state.topics().contains(topic) && !state.bindings.topics().any(|t| t == topic) {
                return Ok(());
            }
        }
        self.state
            .append(&[delete_topic_record(topic, Some(deleted))])
    }

    /// Makes sure the entries of source topic `topic` are those of its live
    /// incarnation `id`: entries of an earlier topic of that name are
    /// dropped (durably) first. Call before adding or serving entries of it.
    pub fn bind_topic(&self, topic: &str, id: TopicId) -> Result<(), StorageError> {
        if self.is_bound(topic, id) {
            return Ok(());
        }
        // Two binds racing: the second finds its incarnation and does
        // nothing when applied.
        self.state.append(&[bind_record(topic, id)])
    }

    /// Whether the entries of `topic` belong to incarnation `id`.
    pub fn is_bound(&self, topic: &str, id: TopicId) -> bool {
        self.state.state().bindings.is_bound(topic, id)
    }

    /// At startup, before serving or finishing dead letters: drops the
    /// entries of source topics that do not exist (a crash came between
    /// deleting the topic and its retries) or whose incarnation is not the
    /// live one, and binds the rest to their live topic. Returns the topics
    /// whose entries were dropped.
    pub fn reconcile(&self, live: LiveTopics<'_>) -> Result<Vec<String>, StorageError> {
        let plan = {
            let state = self.state.state();
            crate::topics::reconcile(&state.topics(), &state.bindings, live)
        };
        let (records, dropped) =
            crate::topics::reconcile_records(plan, bind_record, |topic, bound| {
                delete_topic_record(topic, bound)
            });
        self.state.append(&records)?;
        for topic in &dropped {
            tracing::warn!(
                topic,
                "dropped retries of a deleted topic (or of an earlier topic of that name)"
            );
        }
        Ok(dropped)
    }

    /// Records a failed delivery of `key` (its bytes at `data`). The first
    /// nack of a record counts its normal delivery; later ones count
    /// redeliveries.
    #[allow(clippy::too_many_arguments)]
    pub fn nack(
        &self,
        group: &str,
        key: RetryKey,
        data: RecordLocation,
        reason: &str,
        error_class: &str,
        policy: &RetryPolicy,
        now_ms: i64,
    ) -> Result<NackOutcome, StorageError> {
        let _changing = self.changing.lock();
        let existing = {
            let state = self.state.state();
            let existing = state.groups.get(group).and_then(|g| g.get(&key)).cloned();
            if existing.is_none()
                && let Some(done) = state.finished_at.get(&(group.to_owned(), key.clone()))
            {
                return Ok(NackOutcome::AlreadyDeadLettered(done.clone()));
            }
            existing
        };
        let mut entry = existing.unwrap_or_else(|| RetryEntry::fresh(key, data, now_ms));
        if entry.dead_letter_pending || entry.undeliverable.is_some() {
            return Ok(NackOutcome::DeadLetterInProgress {
                deliveries: entry.deliveries,
                undeliverable: entry.undeliverable,
            });
        }
        entry.handed_out = false;
        entry.deliveries += 1;
        entry.last_failure_ms = now_ms;
        entry.last_reason = reason.to_owned();
        entry.error_class = error_class.to_owned();
        let outcome = if entry.deliveries >= policy.max_deliveries.max(1) {
            entry.dead_letter_pending = true;
            NackOutcome::DeadLetter(DeadLetter {
                group: group.to_owned(),
                entry: entry.clone(),
            })
        } else {
            entry.next_delivery_ms =
                now_ms.saturating_add(duration_ms(policy.backoff(entry.deliveries)));
            NackOutcome::Retry {
                deliveries: entry.deliveries,
                next_delivery_ms: entry.next_delivery_ms,
            }
        };
        self.state.append(&[upsert(group, &entry)])?;
        Ok(outcome)
    }

    /// A redelivered record was processed: forget it. False if it was not
    /// in the retry set.
    pub fn ack(&self, group: &str, key: &RetryKey) -> Result<bool, StorageError> {
        let _changing = self.changing.lock();
        let present = self
            .state
            .state()
            .groups
            .get(group)
            .is_some_and(|g| g.contains_key(key));
        if present {
            self.state.append(&[remove(group, key)])?;
        }
        Ok(present)
    }

    /// Retries of `group` due at `now_ms` on `partitions` (the ones the
    /// asking member owns), oldest first, at most `limit`.
    pub fn due(
        &self,
        group: &str,
        partitions: &BTreeSet<(String, u32)>,
        now_ms: i64,
        limit: usize,
    ) -> Vec<RetryEntry> {
        let state = self.state.state();
        let Some(entries) = state.groups.get(group) else {
            return Vec::new();
        };
        let mut due: Vec<RetryEntry> = entries
            .values()
            .filter(|e| {
                !e.dead_letter_pending
                    && !e.handed_out
                    && e.undeliverable.is_none()
                    && e.next_delivery_ms <= now_ms
                    && partitions.contains(&(e.key.topic.clone(), e.key.partition))
            })
            .cloned()
            .collect();
        due.sort_by_key(|e| (e.next_delivery_ms, e.key.clone()));
        due.truncate(limit);
        due
    }

    /// A due retry was handed to a member: do not hand it out again until
    /// `redelivery_timeout` has passed without an ack or nack (the member
    /// may have died holding it).
    pub fn delivered(
        &self,
        group: &str,
        key: &RetryKey,
        now_ms: i64,
        redelivery_timeout: Duration,
    ) -> Result<(), StorageError> {
        let _changing = self.changing.lock();
        let entry = self
            .state
            .state()
            .groups
            .get(group)
            .and_then(|g| g.get(key))
            .cloned();
        if let Some(mut entry) = entry
            && !entry.dead_letter_pending
            && entry.undeliverable.is_none()
        {
            entry.handed_out = true;
            entry.next_delivery_ms = now_ms.saturating_add(duration_ms(redelivery_timeout));
            self.state.append(&[upsert(group, &entry)])?;
        }
        Ok(())
    }

    /// Counts the deliveries of `group`'s retries on `partitions` that were
    /// handed out and timed out by `now_ms` (neither acked nor nacked: the
    /// member may have crashed on them) as failed, as a nack would, with
    /// `policy_for(topic)` (`None`: leave the entry alone). One that has
    /// had its `max_deliveries` becomes a pending dead letter, returned for
    /// the caller to append; the others are due again at once.
    pub fn expire_handed_out(
        &self,
        group: &str,
        partitions: &BTreeSet<(String, u32)>,
        now_ms: i64,
        policy_for: impl Fn(&str) -> Option<RetryPolicy>,
    ) -> Result<Vec<DeadLetter>, StorageError> {
        let _changing = self.changing.lock();
        let expired: Vec<RetryEntry> = match self.state.state().groups.get(group) {
            None => return Ok(Vec::new()),
            Some(entries) => entries
                .values()
                .filter(|e| {
                    e.handed_out
                        && !e.dead_letter_pending
                        && e.undeliverable.is_none()
                        && e.next_delivery_ms <= now_ms
                        && partitions.contains(&(e.key.topic.clone(), e.key.partition))
                })
                .cloned()
                .collect(),
        };
        let mut changes = Vec::new();
        let mut letters = Vec::new();
        for mut entry in expired {
            let Some(policy) = policy_for(&entry.key.topic) else {
                continue;
            };
            entry.handed_out = false;
            entry.deliveries += 1;
            entry.last_failure_ms = now_ms;
            entry.last_reason =
                "redelivery timeout: handed out and neither acked nor nacked in time".into();
            entry.error_class = REDELIVERY_TIMEOUT_CLASS.into();
            entry.next_delivery_ms = now_ms;
            if entry.deliveries >= policy.max_deliveries.max(1) {
                entry.dead_letter_pending = true;
                letters.push(DeadLetter {
                    group: group.to_owned(),
                    entry: entry.clone(),
                });
            }
            changes.push(upsert(group, &entry));
        }
        if !changes.is_empty() {
            self.state.append(&changes)?;
        }
        Ok(letters)
    }

    /// The dead letter was appended to the DLQ (at `dlq_topic`,
    /// `dlq_offset`): it leaves the retry set, and a later nack of the same
    /// record is answered with where it went.
    pub fn dead_lettered(
        &self,
        group: &str,
        key: &RetryKey,
        dlq_topic: &str,
        dlq_offset: u64,
    ) -> Result<(), StorageError> {
        let _changing = self.changing.lock();
        let deliveries = self.get(group, key).map_or(0, |e| e.deliveries);
        let mut value = vec![KIND_DEAD_LETTERED];
        put_key(&mut value, key);
        put_str(&mut value, dlq_topic);
        value.extend_from_slice(&dlq_offset.to_le_bytes());
        value.extend_from_slice(&deliveries.to_le_bytes());
        self.state.append(&[Record {
            key: Some(Bytes::copy_from_slice(group.as_bytes())),
            value: value.into(),
            headers: vec![],
            timestamp: 0,
        }])
    }

    /// A dead letter could not be written (`reason`): the entry stays in
    /// the retry set, marked undeliverable, not redelivered, until
    /// [`RetrySets::undeliverable_dead_letters`] is tried again and succeeds.
    /// False when the entry is gone, or was already marked for the same
    /// reason (nothing written).
    pub fn mark_undeliverable(
        &self,
        group: &str,
        key: &RetryKey,
        reason: &str,
    ) -> Result<bool, StorageError> {
        let _changing = self.changing.lock();
        let Some(mut entry) = self.get(group, key) else {
            return Ok(false);
        };
        if entry.undeliverable.as_deref() == Some(reason) && !entry.dead_letter_pending {
            return Ok(false);
        }
        entry.dead_letter_pending = false;
        entry.handed_out = false;
        entry.undeliverable = Some(reason.to_owned());
        self.state.append(&[upsert(group, &entry)])?;
        Ok(true)
    }

    /// Undeliverable dead letters: every one whose DLQ append failed.
    pub fn undeliverable_dead_letters(&self) -> Vec<DeadLetter> {
        self.collect_letters(|e| e.undeliverable.is_some())
    }

    /// Undeliverable entries of `group` consumed from `topic`, and the
    /// reason of the most recent failure among them.
    pub fn undeliverable_for_topic(&self, group: &str, topic: &str) -> (u64, Option<String>) {
        let state = self.state.state();
        let Some(entries) = state.groups.get(group) else {
            return (0, None);
        };
        let mut count = 0;
        let mut latest: Option<&RetryEntry> = None;
        for e in entries.values().filter(|e| e.key.topic == topic) {
            if e.undeliverable.is_some() {
                count += 1;
                if latest.is_none_or(|l| l.last_failure_ms <= e.last_failure_ms) {
                    latest = Some(e);
                }
            }
        }
        (count, latest.and_then(|e| e.undeliverable.clone()))
    }

    fn collect_letters(&self, keep: impl Fn(&RetryEntry) -> bool) -> Vec<DeadLetter> {
        let state = self.state.state();
        let mut letters: Vec<DeadLetter> = state
            .groups
            .iter()
            .flat_map(|(group, entries)| {
                entries.values().filter(|e| keep(e)).map(|e| DeadLetter {
                    group: group.clone(),
                    entry: e.clone(),
                })
            })
            .collect();
        letters.sort_by(|a, b| (&a.group, &a.entry.key).cmp(&(&b.group, &b.entry.key)));
        letters
    }

    /// Dead letters whose DLQ append a crash may have interrupted. For each,
    /// look for it in the DLQ's tail ([`super::is_dead_letter_of`]); append it
    /// if it is not there; then call [`RetrySets::dead_lettered`].
    pub fn pending_dead_letters(&self) -> Vec<DeadLetter> {
        self.collect_letters(|e| e.dead_letter_pending)
    }

    /// Puts dead letters back into `group`'s retry set with a fresh delivery
    /// count, due now, their bytes read from the DLQ copy.
    pub fn redrive(
        &self,
        group: &str,
        records: Vec<(RetryKey, RecordLocation)>,
        now_ms: i64,
    ) -> Result<(), StorageError> {
        let _changing = self.changing.lock();
        let changes: Vec<Record> = records
            .into_iter()
            .map(|(key, data)| upsert(group, &RetryEntry::fresh(key, data, now_ms)))
            .collect();
        self.state.append(&changes)
    }

    /// How far redrives of `dlq_topic`/`partition` have gone: the next DLQ
    /// offset not yet redriven.
    pub fn redrive_progress(&self, dlq_topic: &str, partition: u32) -> Option<u64> {
        self.state
            .state()
            .redrive_progress
            .get(&(dlq_topic.to_owned(), partition))
            .copied()
    }

    pub fn set_redrive_progress(
        &self,
        dlq_topic: &str,
        partition: u32,
        next_offset: u64,
    ) -> Result<(), StorageError> {
        self.state
            .append(&[redrive_progress(dlq_topic, partition, next_offset)])
    }

    /// The redrive of `dlq_topic`/`partition` to topics that a crash may
    /// have interrupted, if any.
    pub fn redrive_in_flight(&self, dlq_topic: &str, partition: u32) -> Option<RedriveInFlight> {
        self.state
            .state()
            .redrive_in_flight
            .get(&(dlq_topic.to_owned(), partition))
            .cloned()
    }

    /// Before a redrive appends DLQ records from `from` on to `targets`
    /// ((topic, partition) → its end offset now): records it durably, so
    /// that after a crash [`RetrySets::redrive_in_flight`] says where to
    /// look for what was appended. Merged with one still recorded: the
    /// earlier start and end offsets are kept.
    pub fn begin_redrive_appends(
        &self,
        dlq_topic: &str,
        partition: u32,
        from: u64,
        targets: BTreeMap<(String, u32), u64>,
    ) -> Result<(), StorageError> {
        let _changing = self.changing.lock();
        let mut in_flight =
            self.redrive_in_flight(dlq_topic, partition)
                .unwrap_or(RedriveInFlight {
                    from,
                    targets: BTreeMap::new(),
                });
        in_flight.from = in_flight.from.min(from);
        for (target, end) in targets {
            let kept = in_flight.targets.entry(target).or_insert(end);
            *kept = (*kept).min(end);
        }
        self.state.append(&[redrive_in_flight_record(
            dlq_topic,
            partition,
            Some(&in_flight),
        )])
    }

    /// The appends of a redrive chunk are done: saves its progress and, if
    /// `done_with_in_flight` (nothing appended before a crash lies past
    /// `next_offset`), forgets the in-flight record, in one durable write.
    pub fn finish_redrive_appends(
        &self,
        dlq_topic: &str,
        partition: u32,
        next_offset: u64,
        done_with_in_flight: bool,
    ) -> Result<(), StorageError> {
        let _changing = self.changing.lock();
        let mut records = vec![redrive_progress(dlq_topic, partition, next_offset)];
        if done_with_in_flight {
            records.push(redrive_in_flight_record(dlq_topic, partition, None));
        }
        self.state.append(&records)
    }

    /// Entries in `group`'s retry set (pending dead letters included).
    pub fn len(&self, group: &str) -> usize {
        self.state
            .state()
            .groups
            .get(group)
            .map_or(0, BTreeMap::len)
    }

    /// Topics with entries in `group`'s retry set.
    pub fn topics(&self, group: &str) -> BTreeSet<String> {
        self.state
            .state()
            .groups
            .get(group)
            .map_or_else(BTreeSet::new, |entries| {
                entries.keys().map(|k| k.topic.clone()).collect()
            })
    }

    /// Entries of `group`'s retry set consumed from `topic`.
    pub fn len_for_topic(&self, group: &str, topic: &str) -> usize {
        self.state.state().groups.get(group).map_or(0, |entries| {
            entries.keys().filter(|k| k.topic == topic).count()
        })
    }

    pub fn is_empty(&self, group: &str) -> bool {
        self.len(group) == 0
    }

    /// One entry, if present.
    pub fn get(&self, group: &str, key: &RetryKey) -> Option<RetryEntry> {
        self.state
            .state()
            .groups
            .get(group)
            .and_then(|g| g.get(key))
            .cloned()
    }

    pub fn close(&self) -> Result<(), StorageError> {
        self.state.close()
    }
}

/// The error class of a delivery counted as failed because it timed out.
pub const REDELIVERY_TIMEOUT_CLASS: &str = "sluice.redelivery-timeout";

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn redrive_progress(dlq_topic: &str, partition: u32, next_offset: u64) -> Record {
    let mut value = vec![KIND_REDRIVE_PROGRESS];
    put_str(&mut value, dlq_topic);
    value.extend_from_slice(&partition.to_le_bytes());
    value.extend_from_slice(&next_offset.to_le_bytes());
    Record {
        key: None,
        value: value.into(),
        headers: vec![],
        timestamp: 0,
    }
}

/// Sets (`Some`) or clears (`None`) the redrive in flight of a DLQ
/// partition.
fn redrive_in_flight_record(
    dlq_topic: &str,
    partition: u32,
    in_flight: Option<&RedriveInFlight>,
) -> Record {
    let mut value = vec![KIND_REDRIVE_IN_FLIGHT];
    put_str(&mut value, dlq_topic);
    value.extend_from_slice(&partition.to_le_bytes());
    value.push(u8::from(in_flight.is_some()));
    if let Some(in_flight) = in_flight {
        put_in_flight(&mut value, in_flight);
    }
    Record {
        key: None,
        value: value.into(),
        headers: vec![],
        timestamp: 0,
    }
}

fn put_in_flight(out: &mut Vec<u8>, in_flight: &RedriveInFlight) {
    out.extend_from_slice(&in_flight.from.to_le_bytes());
    out.extend_from_slice(&(in_flight.targets.len() as u32).to_le_bytes());
    for ((topic, partition), end) in &in_flight.targets {
        put_str(out, topic);
        out.extend_from_slice(&partition.to_le_bytes());
        out.extend_from_slice(&end.to_le_bytes());
    }
}

fn get_in_flight(r: &mut ByteReader<'_>) -> Option<RedriveInFlight> {
    let from = r.u64()?;
    let mut targets = BTreeMap::new();
    for _ in 0..r.u32()? {
        let topic = get_str(r)?;
        let partition = r.u32()?;
        targets.insert((topic, partition), r.u64()?);
    }
    Some(RedriveInFlight { from, targets })
}

fn upsert(group: &str, entry: &RetryEntry) -> Record {
    let mut value = vec![KIND_UPSERT];
    put_entry(&mut value, entry);
    Record {
        key: Some(Bytes::copy_from_slice(group.as_bytes())),
        value: value.into(),
        headers: vec![],
        timestamp: entry.last_failure_ms,
    }
}

fn remove(group: &str, key: &RetryKey) -> Record {
    let mut value = vec![KIND_REMOVE];
    put_key(&mut value, key);
    Record {
        key: Some(Bytes::copy_from_slice(group.as_bytes())),
        value: value.into(),
        headers: vec![],
        timestamp: 0,
    }
}

/// Binds source topic `topic` to incarnation `id`.
fn bind_record(topic: &str, id: TopicId) -> Record {
    let mut value = vec![KIND_BIND_TOPIC];
    value.extend_from_slice(&id.to_le_bytes());
    topic_record(topic, value)
}

/// Deletes every group's entries of source topic `topic` if they belong to
/// incarnation `deleted` (`None`: unbound), not those of a newer one.
fn delete_topic_record(topic: &str, deleted: Option<TopicId>) -> Record {
    let mut value = vec![KIND_DELETE_TOPIC];
    put_deleted_incarnation(&mut value, deleted);
    topic_record(topic, value)
}

/// A record about every group's entries of source topic `topic`.
fn topic_record(topic: &str, value: Vec<u8>) -> Record {
    Record {
        key: Some(Bytes::copy_from_slice(topic.as_bytes())),
        value: value.into(),
        headers: vec![],
        timestamp: 0,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn get_str(r: &mut ByteReader<'_>) -> Option<String> {
    let len = r.u32()? as usize;
    String::from_utf8(r.take(len)?.to_vec()).ok()
}

fn put_key(out: &mut Vec<u8>, key: &RetryKey) {
    put_str(out, &key.topic);
    out.extend_from_slice(&key.partition.to_le_bytes());
    out.extend_from_slice(&key.offset.to_le_bytes());
}

fn get_key(r: &mut ByteReader<'_>) -> Option<RetryKey> {
    Some(RetryKey {
        topic: get_str(r)?,
        partition: r.u32()?,
        offset: r.u64()?,
    })
}

fn put_entry(out: &mut Vec<u8>, e: &RetryEntry) {
    put_key(out, &e.key);
    put_str(out, &e.data.topic);
    out.extend_from_slice(&e.data.partition.to_le_bytes());
    out.extend_from_slice(&e.data.offset.to_le_bytes());
    out.extend_from_slice(&e.deliveries.to_le_bytes());
    for t in [e.first_failure_ms, e.last_failure_ms, e.next_delivery_ms] {
        out.extend_from_slice(&t.to_le_bytes());
    }
    put_str(out, &e.last_reason);
    put_str(out, &e.error_class);
    let mut state = 0;
    if e.dead_letter_pending {
        state |= STATE_DEAD_LETTER_PENDING;
    }
    if e.handed_out {
        state |= STATE_HANDED_OUT;
    }
    if e.undeliverable.is_some() {
        state |= STATE_UNDELIVERABLE;
    }
    out.push(state);
    if let Some(reason) = &e.undeliverable {
        put_str(out, reason);
    }
}

fn get_entry(r: &mut ByteReader<'_>) -> Option<RetryEntry> {
    let key = get_key(r)?;
    let data = RecordLocation {
        topic: get_str(r)?,
        partition: r.u32()?,
        offset: r.u64()?,
    };
    let deliveries = r.u32()?;
    let first_failure_ms = r.u64()? as i64;
    let last_failure_ms = r.u64()? as i64;
    let next_delivery_ms = r.u64()? as i64;
    let last_reason = get_str(r)?;
    let error_class = get_str(r)?;
    let state = r.take(1)?[0];
    let undeliverable = if state & STATE_UNDELIVERABLE != 0 {
        Some(get_str(r)?)
    } else {
        None
    };
    Some(RetryEntry {
        key,
        data,
        deliveries,
        first_failure_ms,
        last_failure_ms,
        next_delivery_ms,
        last_reason,
        error_class,
        dead_letter_pending: state & STATE_DEAD_LETTER_PENDING != 0,
        handed_out: state & STATE_HANDED_OUT != 0,
        undeliverable,
    })
}

fn put_finished(out: &mut Vec<u8>, group: &str, key: &RetryKey, at: &FinishedDeadLetter) {
    put_str(out, group);
    put_key(out, key);
    put_str(out, &at.dlq_topic);
    out.extend_from_slice(&at.dlq_offset.to_le_bytes());
    out.extend_from_slice(&at.deliveries.to_le_bytes());
}

fn get_finished_tail(r: &mut ByteReader<'_>) -> Option<FinishedDeadLetter> {
    Some(FinishedDeadLetter {
        dlq_topic: get_str(r)?,
        dlq_offset: r.u64()?,
        deliveries: r.u32()?,
    })
}

impl StateMachine for RetryState {
    fn apply(&mut self, record: &Record) {
        let group = record
            .key
            .as_ref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::to_owned);
        let mut r = ByteReader::new(record.value.get(1..).unwrap_or_default());
        match (record.value.first(), group) {
            (Some(&KIND_UPSERT), Some(group)) => match get_entry(&mut r) {
                Some(entry) => {
                    self.groups
                        .entry(group)
                        .or_default()
                        .insert(entry.key.clone(), entry);
                }
                None => tracing::warn!(group, "malformed retry record skipped"),
            },
            (Some(&KIND_REMOVE), Some(group)) => match get_key(&mut r) {
                Some(key) => self.remove_entry(&group, &key),
                None => tracing::warn!(group, "malformed retry removal skipped"),
            },
            (Some(&KIND_DELETE_TOPIC), Some(topic)) => match read_deleted_incarnation(&mut r) {
                Ok(None) => self.remove_topic(&topic),
                Ok(Some(deleted)) => {
                    if self.bindings.delete_applies(&topic, deleted) {
                        self.remove_topic(&topic);
                    }
                }
                Err(reason) => {
                    tracing::warn!(topic, reason, "malformed retry topic delete skipped")
                }
            },
            (Some(&KIND_BIND_TOPIC), Some(topic)) => match TopicId::read(&mut r) {
                Some(id) => {
                    if self.bindings.bind(&topic, id) {
                        // Entries of an earlier topic of this name.
                        self.remove_topic(&topic);
                        let _ = self.bindings.bind(&topic, id);
                    }
                }
                None => tracing::warn!(topic, "malformed retry topic binding skipped"),
            },
            (Some(&KIND_DEAD_LETTERED), Some(group)) => {
                match (get_key(&mut r), get_finished_tail(&mut r)) {
                    (Some(key), Some(at)) => {
                        self.remove_entry(&group, &key);
                        self.remember_finished(group, key, at);
                    }
                    _ => tracing::warn!(group, "malformed dead-letter record skipped"),
                }
            }
            (Some(&KIND_REDRIVE_PROGRESS), _) => match (get_str(&mut r), r.u32(), r.u64()) {
                (Some(topic), Some(partition), Some(offset)) => {
                    self.redrive_progress.insert((topic, partition), offset);
                }
                _ => tracing::warn!("malformed redrive progress skipped"),
            },
            (Some(&KIND_REDRIVE_IN_FLIGHT), _) => {
                let read = |r: &mut ByteReader<'_>| {
                    let topic = get_str(r)?;
                    let partition = r.u32()?;
                    let in_flight = match r.take(1)?[0] {
                        0 => None,
                        _ => Some(get_in_flight(r)?),
                    };
                    Some(((topic, partition), in_flight))
                };
                match read(&mut r) {
                    Some((at, Some(in_flight))) => {
                        self.redrive_in_flight.insert(at, in_flight);
                    }
                    Some((at, None)) => {
                        self.redrive_in_flight.remove(&at);
                    }
                    None => tracing::warn!("malformed redrive record skipped"),
                }
            }
            _ => tracing::warn!("unknown retry record skipped"),
        }
    }

    fn encode_snapshot(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut groups: Vec<_> = self.groups.iter().collect();
        groups.sort_by(|a, b| a.0.cmp(b.0));
        out.extend_from_slice(&(groups.len() as u32).to_le_bytes());
        for (group, entries) in groups {
            put_str(&mut out, group);
            out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
            for entry in entries.values() {
                put_entry(&mut out, entry);
            }
        }
        out.extend_from_slice(&(self.redrive_progress.len() as u32).to_le_bytes());
        for ((topic, partition), offset) in &self.redrive_progress {
            put_str(&mut out, topic);
            out.extend_from_slice(&partition.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        // Source topic bindings, last (a snapshot written before they
        // existed ends before them).
        self.bindings.encode(&mut out);
        // Added later: a snapshot without it reads as remembering none.
        out.extend_from_slice(&(self.finished.len() as u32).to_le_bytes());
        for id in &self.finished {
            if let Some(at) = self.finished_at.get(id) {
                put_finished(&mut out, &id.0, &id.1, at);
            }
        }
        out.extend_from_slice(&(self.redrive_in_flight.len() as u32).to_le_bytes());
        for ((topic, partition), in_flight) in &self.redrive_in_flight {
            put_str(&mut out, topic);
            out.extend_from_slice(&partition.to_le_bytes());
            put_in_flight(&mut out, in_flight);
        }
        out
    }

    fn decode_snapshot(bytes: &[u8]) -> Result<Self, &'static str> {
        let truncated = "truncated";
        let mut r = ByteReader::new(bytes);
        let mut state = RetryState::default();
        for _ in 0..r.u32().ok_or(truncated)? {
            let group = get_str(&mut r).ok_or(truncated)?;
            let mut entries = BTreeMap::new();
            for _ in 0..r.u32().ok_or(truncated)? {
                let entry = get_entry(&mut r).ok_or(truncated)?;
                entries.insert(entry.key.clone(), entry);
            }
            state.groups.insert(group, entries);
        }
        for _ in 0..r.u32().ok_or(truncated)? {
            let topic = get_str(&mut r).ok_or(truncated)?;
            let partition = r.u32().ok_or(truncated)?;
            let offset = r.u64().ok_or(truncated)?;
            state.redrive_progress.insert((topic, partition), offset);
        }
        state.bindings = TopicBindings::decode(&mut r)?;
        if !r.is_empty() {
            for _ in 0..r.u32().ok_or(truncated)? {
                let group = get_str(&mut r).ok_or(truncated)?;
                let key = get_key(&mut r).ok_or(truncated)?;
                let at = get_finished_tail(&mut r).ok_or(truncated)?;
                state.remember_finished(group, key, at);
            }
        }
        if !r.is_empty() {
            for _ in 0..r.u32().ok_or(truncated)? {
                let topic = get_str(&mut r).ok_or(truncated)?;
                let partition = r.u32().ok_or(truncated)?;
                let in_flight = get_in_flight(&mut r).ok_or(truncated)?;
                state
                    .redrive_in_flight
                    .insert((topic, partition), in_flight);
            }
        }
        if !r.is_empty() {
            return Err("bytes after the retry state");
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            max_deliveries: 10,
            initial_backoff: Duration::from_millis(100),
            multiplier: 2.0,
            max_backoff: Duration::from_millis(700),
        };
        let got: Vec<u128> = (1..=5).map(|n| p.backoff(n).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 700, 700]);
    }

    #[test]
    fn topic_incarnations_survive_a_snapshot_and_one_from_before_them_reads() {
        let mut state = RetryState::default();
        state.apply(&bind_record("orders", TopicId(7)));
        let entry = RetryEntry::fresh(
            RetryKey {
                topic: "orders".into(),
                partition: 0,
                offset: 4,
            },
            RecordLocation {
                topic: "orders".into(),
                partition: 0,
                offset: 4,
            },
            0,
        );
        state.apply(&upsert("g", &entry));
        let bytes = state.encode_snapshot();
        let back = RetryState::decode_snapshot(&bytes).unwrap();
        assert_eq!(back.bindings, state.bindings);
        assert_eq!(back.groups, state.groups);
        // A snapshot written before incarnations ends after the redrive
        // progress: cut the bindings and the two (empty) sections after
        // them, the finished dead letters and the redrives in flight.
        let mut old = state.encode_snapshot();
        old.truncate(old.len() - (4 + 2 + "orders".len() + 16) - (4 + 4));
        let back = RetryState::decode_snapshot(&old).unwrap();
        assert_eq!(back.bindings, TopicBindings::default());
        assert_eq!(back.groups, state.groups);
        // Binding another incarnation drops the entries.
        state.apply(&bind_record("orders", TopicId(8)));
        assert!(state.groups.is_empty());
    }
}
