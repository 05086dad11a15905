//! `DeadLetterService`: nack, ack, redelivery and redrive, plus the
//! dead-letter appends they lead to.
//!
//! The retry bookkeeping is [`RetrySets`]; this module reads the records
//! to redeliver from the topics, appends dead letters to DLQ topics
//! (creating them on demand) and finishes, at startup, the dead letters a
//! crash interrupted.
//!
//! A dead letter is appended by exactly one call: the one whose
//! [`RetrySets`] change made it pending (a nack, or a timed-out hand-out in
//! `FetchRetries`); startup checks the DLQ's tail first, as a crash may
//! have come after the append. A dead letter that cannot be written (its
//! DLQ name is not a valid topic name, its source topic is gone, a storage
//! error) never stops the broker: it stays in the retry set marked
//! undeliverable with the reason, is logged and shown by `DescribeGroup`,
//! and is tried again at startup and every maintenance interval.
//!
//! A redrive to topics records, before each chunk's appends, that it is in
//! flight and where its targets end ([`RetrySets::begin_redrive_appends`]);
//! the next redrive after a crash skips what the cut chunk appended, found
//! by the `redriven-from` header.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_proto::v1::{self, dead_letter_service_server::DeadLetterService};
use tonic::{Request, Response, Status};

use super::auth::Access;
use super::convert::{consumed, now_ms};
use super::shared::{
    check_dlq_name, check_group_id, check_member_id, dlq_topic_for, effective_settings,
};
use super::{blocking, status};
use crate::auth::{Operation, Resource};
use crate::dlq::{
    self, DeadLetter, NackOutcome, RecordLocation, RetryKey, RetryPolicy, RetrySets,
    is_dead_letter_of,
};
use crate::groups::{GroupCoordinator, TopicPartition};
use crate::storage::{BatchBuilder, Header, ProducerInfo, Record, StoredRecord};
use crate::topics::{DeadLetterPatch, TopicConfigPatch, TopicError, TopicRegistry};

/// How long a redelivered record stays with the member it was handed to
/// before the delivery counts as failed and it is handed out again (or
/// dead-lettered); `--redelivery-timeout-ms` changes it.
pub const REDELIVERY_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_REASON_BYTES: usize = 4096;
const MAX_ERROR_CLASS_BYTES: usize = 256;
const DEFAULT_MAX_RETRIES: usize = 100;
const DEFAULT_REDRIVE_RATE: u32 = 1000;
/// How far back from a DLQ's end startup looks for a dead letter a crash
/// may have appended before recording it.
const RECOVERY_SCAN_RECORDS: u64 = 10_000;

pub(crate) struct DeadLetters {
    pub(crate) access: Access,
    pub(crate) topics: Arc<TopicRegistry>,
    pub(crate) groups: Arc<GroupCoordinator>,
    pub(crate) retries: Arc<RetrySets>,
    pub(crate) redelivery_timeout: Duration,
    pub(crate) metrics: Option<crate::metrics::DlqMetrics>,
}

/// The record at `offset` of a partition, if the log still keeps it (and
/// the topic still exists: a redriven record's DLQ may have been deleted).
fn read_one(
    topics: &TopicRegistry,
    topic: &str,
    partition: u32,
    offset: u64,
) -> Result<Option<StoredRecord>, Status> {
    let topic = match topics.get(topic) {
        Ok(topic) => topic,
        Err(TopicError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(status::topic(e)),
    };
    let log = match topic.partition(partition) {
        Ok(p) => p.log().clone(),
        Err(TopicError::NoSuchPartition { .. }) => return Ok(None),
        Err(e) => return Err(status::topic(e)),
    };
    if offset < log.log_start_offset() || offset >= log.high_watermark() {
        return Ok(None);
    }
    let records = log.read_records(offset, 1).map_err(status::storage)?;
    Ok(records.into_iter().find(|r| r.offset == offset))
}

/// Appends `record` to partition `partition` of `topic`, durably; its
/// offset.
fn append(
    topics: &TopicRegistry,
    topic: &str,
    partition: u32,
    record: Record,
) -> Result<u64, Status> {
    let topic = topics.get(topic).map_err(status::topic)?;
    let batch = BatchBuilder::encode(&[record], ProducerInfo::NONE);
    let appended = topic
        .partition(partition)
        .map_err(status::topic)?
        .appender()
        .append(&batch, now_ms())
        .map_err(status::producer_append)?;
    Ok(appended.info.base_offset)
}

/// Creates the DLQ topic of `source` if it does not exist: one partition,
/// synced appends, retention at least the source's.
fn ensure_dlq_topic(topics: &TopicRegistry, source: &str, dlq_topic: &str) -> Result<(), Status> {
    if topics.get(dlq_topic).is_ok() {
        return Ok(());
    }
    let source = topics.get(source).map_err(status::topic)?.config();
    let patch = TopicConfigPatch {
        partitions: Some(1),
        retention_ms: Some(source.retention_ms.unwrap_or(0)),
        retention_bytes: Some(source.retention_bytes.unwrap_or(0)),
        flush: Some("every-batch".into()),
        max_record_bytes: Some(source.max_record_bytes.saturating_add(4096)),
        segment_bytes: Some(
            source
                .segment_bytes
                .max(u64::from(source.max_record_bytes) + 16384),
        ),
        ..TopicConfigPatch::default()
    };
    match topics.create(dlq_topic, &patch) {
        Ok(_) => {
            tracing::info!(topic = dlq_topic, "created a dead-letter topic");
            Ok(())
        }
        Err(TopicError::AlreadyExists(_)) => Ok(()),
        Err(e) => Err(status::topic(e)),
    }
}

/// Appends a dead letter to its DLQ (unless `check_tail` finds it there
/// already, after a crash) and takes it out of the retry set. Its DLQ topic
/// and offset, and whether this call appended it.
fn dead_letter(
    topics: &TopicRegistry,
    retries: &RetrySets,
    letter: &DeadLetter,
    check_tail: bool,
) -> Result<(String, u64, bool), Status> {
    let key = &letter.entry.key;
    let dlq_topic = dlq_topic_for(topics, retries, &key.topic, &letter.group)?;
    ensure_dlq_topic(topics, &key.topic, &dlq_topic)?;
    if check_tail && let Some(offset) = already_in_dlq(topics, &dlq_topic, letter)? {
        retries
            .dead_lettered(&letter.group, key, &dlq_topic, offset)
            .map_err(status::storage)?;
        return Ok((dlq_topic, offset, false));
    }
    let data = &letter.entry.data;
    let mut entry = letter.entry.clone();
    let record = match read_one(topics, &data.topic, data.partition, data.offset)? {
        Some(stored) => stored.record,
        None => {
            // Retention (or deleting the DLQ it was redriven from) removed
            // it while it waited: the dead letter still says what failed
            // and why, without the bytes.
            entry.last_reason = format!(
                "{} (the record was deleted before it was dead-lettered)",
                entry.last_reason
            );
            Record {
                key: None,
                value: bytes::Bytes::new(),
                headers: vec![],
                timestamp: now_ms(),
            }
        }
    };
    let mut headers = dlq::own_headers(record.headers);
    headers.extend(dlq::dead_letter_headers(&letter.group, &entry));
    let offset = append(
        topics,
        &dlq_topic,
        0,
        Record {
            key: record.key,
            value: record.value,
            headers,
            timestamp: record.timestamp,
        },
    )?;
    retries
        .dead_lettered(&letter.group, key, &dlq_topic, offset)
        .map_err(status::storage)?;
    tracing::info!(group = %letter.group, source = %format!("{}/{}/{}", key.topic, key.partition, key.offset), dlq = %dlq_topic, offset, "dead-lettered a record");
    Ok((dlq_topic, offset, true))
}

/// What became of a dead letter.
enum DeadLetterResult {
    /// In the DLQ at this topic and offset.
    Written { dlq_topic: String, offset: u64 },
    /// It could not be written (why): it stays in the retry set, marked
    /// undeliverable.
    Undeliverable(String),
}

/// [`dead_letter`], and if that fails, the entry is marked undeliverable
/// with the reason and logged: one dead letter never fails more than
/// itself. Errs only when even the mark cannot be written.
fn dead_letter_or_park(
    topics: &TopicRegistry,
    retries: &RetrySets,
    letter: &DeadLetter,
    check_tail: bool,
) -> Result<DeadLetterResult, Status> {
    match dead_letter(topics, retries, letter, check_tail) {
        Ok((dlq_topic, offset, _)) => Ok(DeadLetterResult::Written { dlq_topic, offset }),
        Err(failure) => {
            let key = &letter.entry.key;
            let reason = failure.message().to_owned();
            let changed = retries
                .mark_undeliverable(&letter.group, key, &reason)
                .map_err(status::storage)?;
            if changed {
                tracing::warn!(group = %letter.group, source = %format!("{}/{}/{}", key.topic, key.partition, key.offset), %reason, "a dead letter could not be written; it stays in the retry set as undeliverable and is tried again every maintenance interval and at startup");
            }
            Ok(DeadLetterResult::Undeliverable(reason))
        }
    }
}

/// The offset of `letter` in the DLQ's tail, if a crash came after its
/// append.
fn already_in_dlq(
    topics: &TopicRegistry,
    dlq_topic: &str,
    letter: &DeadLetter,
) -> Result<Option<u64>, Status> {
    let log = topics
        .get(dlq_topic)
        .map_err(status::topic)?
        .partition(0)
        .map_err(status::topic)?
        .log()
        .clone();
    let end = log.high_watermark();
    let mut next = end
        .saturating_sub(RECOVERY_SCAN_RECORDS)
        .max(log.log_start_offset());
    while next < end {
        let records = log.read_records(next, 1 << 20).map_err(status::storage)?;
        let Some(last) = records.last() else { break };
        next = last.offset + 1;
        if let Some(found) = records
            .iter()
            .find(|r| is_dead_letter_of(&r.record.headers, &letter.group, &letter.entry.key))
        {
            return Ok(Some(found.offset));
        }
    }
    Ok(None)
}

/// The DLQ offsets of `dlq_topic`/`partition` that a redrive in flight
/// appended to its targets (found by their `redriven-from` header past
/// where each target ended before).
fn appended_by_redrive(
    topics: &TopicRegistry,
    dlq_topic: &str,
    partition: u32,
    in_flight: &dlq::RedriveInFlight,
) -> Result<BTreeSet<u64>, Status> {
    let mut found = BTreeSet::new();
    for ((topic, target_partition), start) in &in_flight.targets {
        // A target deleted since holds nothing to repeat.
        let Ok(target) = topics.get(topic) else {
            continue;
        };
        let Ok(target_partition) = target.partition(*target_partition) else {
            continue;
        };
        let log = target_partition.log().clone();
        let end = log.high_watermark();
        let mut next = (*start).max(log.log_start_offset());
        while next < end {
            let records = log.read_records(next, 1 << 20).map_err(status::storage)?;
            let Some(last) = records.last() else { break };
            next = last.offset + 1;
            found.extend(
                records
                    .iter()
                    .filter_map(|r| dlq::redriven_offset(&r.record.headers, dlq_topic, partition)),
            );
        }
    }
    Ok(found)
}

/// Finishes the dead letters a crash left between "failed for the last
/// time" and "appended to the DLQ", and tries the undeliverable ones
/// again: each is appended once (or found already appended). One that
/// fails is logged and stays undeliverable; startup goes on. Run before
/// serving. How many were finished.
pub fn finish_pending_dead_letters(topics: &TopicRegistry, retries: &RetrySets) -> usize {
    let mut letters = retries.pending_dead_letters();
    letters.extend(retries.undeliverable_dead_letters());
    finish(
        topics,
        retries,
        &letters,
        "finished a dead letter interrupted by a restart",
    )
}

/// Tries the undeliverable dead letters again (every maintenance
/// interval): the cause may have been fixed (group settings with a shorter
/// DLQ name, space freed). How many were finished.
pub(crate) fn retry_undeliverable_dead_letters(
    topics: &TopicRegistry,
    retries: &RetrySets,
) -> usize {
    let letters = retries.undeliverable_dead_letters();
    finish(
        topics,
        retries,
        &letters,
        "wrote a dead letter that was undeliverable before",
    )
}

fn finish(
    topics: &TopicRegistry,
    retries: &RetrySets,
    letters: &[DeadLetter],
    done: &str,
) -> usize {
    let mut finished = 0;
    for letter in letters {
        match dead_letter_or_park(topics, retries, letter, true) {
            Ok(DeadLetterResult::Written { dlq_topic, offset }) => {
                finished += 1;
                tracing::info!(group = %letter.group, dlq = %dlq_topic, offset, "{done}");
            }
            Ok(DeadLetterResult::Undeliverable(_)) => {}
            Err(e) => {
                tracing::error!(group = %letter.group, error = %e.message(), "could not record a dead letter as undeliverable; it is tried again at the next start");
            }
        }
    }
    finished
}

fn record_ref(r: Option<v1::RecordRef>) -> Result<RetryKey, Status> {
    let r =
        r.ok_or_else(|| Status::invalid_argument("say which record: topic, partition, offset"))?;
    Ok(RetryKey {
        topic: r.topic,
        partition: r.partition,
        offset: r.offset,
    })
}

fn check_ids(group_id: &str, member_id: &str) -> Result<(), Status> {
    check_group_id(group_id)?;
    check_member_id(member_id)
}

impl DeadLetters {
    /// Checks that `key` names a consumed record of a partition the member
    /// holds.
    fn check_held(&self, group_id: &str, member_id: &str, key: &RetryKey) -> Result<(), Status> {
        let topic = self.topics.get(&key.topic).map_err(status::topic)?;
        let latest = topic
            .partition(key.partition)
            .map_err(status::topic)?
            .log()
            .high_watermark();
        if key.offset >= latest {
            return Err(Status::out_of_range(format!(
                "{}/{} has no offset {} (its latest is {latest})",
                key.topic, key.partition, key.offset
            )));
        }
        let held = self
            .groups
            .member_partitions(group_id, member_id, Instant::now())
            .map_err(status::group)?;
        let tp = TopicPartition::new(&key.topic, key.partition);
        if !held.contains(&tp) {
            return Err(status::group(crate::groups::GroupError::NotOwner {
                group: group_id.to_owned(),
                member: member_id.to_owned(),
                partition: tp,
            }));
        }
        Ok(())
    }
}

impl DeadLetters {
    /// A nack or an ack: read on the group and on the record's topic.
    fn check_group_and_record<T>(
        &self,
        request: &Request<T>,
        group_id: &str,
        record: &Option<v1::RecordRef>,
    ) -> Result<(), Status> {
        let caller = self
            .access
            .check(request, Operation::Read, Resource::group(group_id))?;
        if let Some(record) = record {
            self.access.check_principal(
                &caller,
                Operation::Read,
                Resource::topic(&record.topic),
            )?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl DeadLetterService for DeadLetters {
    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn nack(
        &self,
        request: Request<v1::NackRequest>,
    ) -> Result<Response<v1::NackResponse>, Status> {
        self.check_group_and_record(
            &request,
            &request.get_ref().group_id,
            &request.get_ref().record,
        )?;
        let request = request.into_inner();
        check_ids(&request.group_id, &request.member_id)?;
        if request.reason.len() > MAX_REASON_BYTES {
            return Err(Status::invalid_argument(format!(
                "reason is {} bytes; at most {MAX_REASON_BYTES}",
                request.reason.len()
            )));
        }
        if request.error_class.len() > MAX_ERROR_CLASS_BYTES {
            return Err(Status::invalid_argument(format!(
                "error class is {} bytes; at most {MAX_ERROR_CLASS_BYTES}",
                request.error_class.len()
            )));
        }
        let key = record_ref(request.record)?;
        self.check_held(&request.group_id, &request.member_id, &key)?;
        let settings =
            effective_settings(&self.topics, &self.retries, &key.topic, &request.group_id)?;
        // Refused before anything is counted, rather than a dead letter
        // that cannot be written later.
        let dlq_topic = check_dlq_name(&settings, &key.topic, &request.group_id)?;
        let policy = settings.policy();
        let topic_id = self.topics.get(&key.topic).map_err(status::topic)?.id();
        let topics = Arc::clone(&self.topics);
        let retries = Arc::clone(&self.retries);
        let metrics = self.metrics.clone();
        blocking(move || {
            // Entries left by an earlier topic of this name go first.
            retries
                .bind_topic(&key.topic, topic_id)
                .map_err(status::storage)?;
            let data = RecordLocation {
                topic: key.topic.clone(),
                partition: key.partition,
                offset: key.offset,
            };
            let outcome = retries
                .nack(
                    &request.group_id,
                    key,
                    data,
                    &request.reason,
                    &request.error_class,
                    &policy,
                    now_ms(),
                )
                .map_err(status::storage)?;
            if let Some(m) = &metrics {
                m.nacks.inc();
            }
            let dead = |deliveries, dlq_topic, dlq_offset| v1::NackResponse {
                deliveries,
                next_delivery_ms: 0,
                dead_lettered: true,
                dlq_topic,
                dlq_offset,
                undeliverable: String::new(),
            };
            Ok(match outcome {
                NackOutcome::Retry {
                    deliveries,
                    next_delivery_ms,
                } => v1::NackResponse {
                    deliveries,
                    next_delivery_ms,
                    dead_lettered: false,
                    dlq_topic: String::new(),
                    dlq_offset: 0,
                    undeliverable: String::new(),
                },
                NackOutcome::DeadLetter(letter) => {
                    let deliveries = letter.entry.deliveries;
                    match dead_letter_or_park(&topics, &retries, &letter, false)? {
                        DeadLetterResult::Written { dlq_topic, offset } => {
                            if let Some(m) = &metrics {
                                m.dead_letters.inc();
                            }
                            dead(deliveries, dlq_topic, offset)
                        }
                        DeadLetterResult::Undeliverable(reason) => v1::NackResponse {
                            undeliverable: reason,
                            ..dead(deliveries, String::new(), 0)
                        },
                    }
                }
                NackOutcome::AlreadyDeadLettered(done) => {
                    dead(done.deliveries, done.dlq_topic, done.dlq_offset)
                }
                // Another call is writing it: its DLQ offset is not known
                // yet.
                NackOutcome::DeadLetterInProgress {
                    deliveries,
                    undeliverable: None,
                } => dead(deliveries, dlq_topic, 0),
                NackOutcome::DeadLetterInProgress {
                    deliveries,
                    undeliverable: Some(reason),
                } => v1::NackResponse {
                    undeliverable: reason,
                    ..dead(deliveries, String::new(), 0)
                },
            })
        })
        .await
        .map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn ack(
        &self,
        request: Request<v1::AckRequest>,
    ) -> Result<Response<v1::AckResponse>, Status> {
        self.check_group_and_record(
            &request,
            &request.get_ref().group_id,
            &request.get_ref().record,
        )?;
        let request = request.into_inner();
        check_ids(&request.group_id, &request.member_id)?;
        let key = record_ref(request.record)?;
        self.check_held(&request.group_id, &request.member_id, &key)?;
        let retries = Arc::clone(&self.retries);
        let removed = blocking(move || {
            retries
                .ack(&request.group_id, &key)
                .map_err(status::storage)
        })
        .await?;
        Ok(Response::new(v1::AckResponse { removed }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn fetch_retries(
        &self,
        request: Request<v1::FetchRetriesRequest>,
    ) -> Result<Response<v1::FetchRetriesResponse>, Status> {
        let caller = self.access.check(
            &request,
            Operation::Read,
            Resource::group(&request.get_ref().group_id),
        )?;
        let request = request.into_inner();
        check_ids(&request.group_id, &request.member_id)?;
        let held: BTreeSet<(String, u32)> = self
            .groups
            .member_reading(&request.group_id, &request.member_id, Instant::now())
            .map_err(status::group)?
            .into_iter()
            // Not the records of a topic the caller may no longer read.
            .filter(|tp| {
                self.access
                    .allowed(&caller, Operation::Read, Resource::topic(&tp.topic))
            })
            .map(|tp| (tp.topic, tp.partition))
            .collect();
        let limit = match request.max_records {
            0 => DEFAULT_MAX_RETRIES,
            n => n as usize,
        };
        let topics = Arc::clone(&self.topics);
        let retries = Arc::clone(&self.retries);
        let group = request.group_id;
        let redelivery_timeout = self.redelivery_timeout;
        let records = blocking(move || {
            // Never serve entries left by an earlier topic of the same name.
            let held_topics: BTreeSet<&String> = held.iter().map(|(topic, _)| topic).collect();
            for topic in held_topics {
                if let Ok(live) = topics.get(topic) {
                    retries
                        .bind_topic(topic, live.id())
                        .map_err(status::storage)?;
                }
            }
            let now = now_ms();
            // Deliveries that timed out count as failed first, so a record
            // that crashes its consumer reaches its last delivery.
            let policy_for = |topic: &str| -> Option<RetryPolicy> {
                effective_settings(&topics, &retries, topic, &group)
                    .ok()
                    .map(|s| s.policy())
            };
            for letter in retries
                .expire_handed_out(&group, &held, now, policy_for)
                .map_err(status::storage)?
            {
                dead_letter_or_park(&topics, &retries, &letter, false)?;
            }
            let mut out = Vec::new();
            for entry in retries.due(&group, &held, now, limit) {
                let data = &entry.data;
                let Some(stored) = read_one(&topics, &data.topic, data.partition, data.offset)?
                else {
                    // Gone before it could be retried: dead-letter what is
                    // known about it rather than retry nothing forever.
                    // (The tail check keeps a concurrent fetch from
                    // writing it twice.)
                    let letter = DeadLetter {
                        group: group.clone(),
                        entry: entry.clone(),
                    };
                    dead_letter_or_park(&topics, &retries, &letter, true)?;
                    continue;
                };
                retries
                    .delivered(&group, &entry.key, now, redelivery_timeout)
                    .map_err(status::storage)?;
                let mut record = stored.record;
                let redriven = data.topic != entry.key.topic
                    || data.partition != entry.key.partition
                    || data.offset != entry.key.offset;
                record.headers = dlq::own_headers(record.headers);
                if redriven {
                    record.headers.push(Header {
                        key: dlq::HEADER_REDRIVEN_FROM.to_owned(),
                        value: format!("{}/{}/{}", data.topic, data.partition, data.offset).into(),
                    });
                }
                out.push(v1::RetryRecord {
                    record: Some(consumed(
                        &entry.key.topic,
                        entry.key.partition,
                        StoredRecord {
                            offset: entry.key.offset,
                            record,
                        },
                    )),
                    attempt: entry.deliveries + 1,
                });
            }
            Ok(out)
        })
        .await?;
        Ok(Response::new(v1::FetchRetriesResponse {
            records,
            redelivery_timeout_ms: u32::try_from(self.redelivery_timeout.as_millis())
                .unwrap_or(u32::MAX),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn set_group_settings(
        &self,
        request: Request<v1::SetGroupSettingsRequest>,
    ) -> Result<Response<v1::SetGroupSettingsResponse>, Status> {
        self.access.check(
            &request,
            Operation::Alter,
            Resource::group(&request.get_ref().group_id),
        )?;
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        let base = self
            .topics
            .get(&request.topic)
            .map_err(status::topic)?
            .config()
            .dead_letters;
        let s = request.settings.unwrap_or_default();
        let patch = DeadLetterPatch {
            max_deliveries: s.max_deliveries,
            retry_backoff_ms: s.retry_backoff_ms,
            retry_backoff_multiplier: s.retry_backoff_multiplier,
            retry_backoff_max_ms: s.retry_backoff_max_ms,
            dlq_topic: s.dlq_topic,
        };
        let effective = base.patched(&patch).map_err(status::topic)?;
        check_dlq_name(&effective, &request.topic, &request.group_id)?;
        let retries = Arc::clone(&self.retries);
        blocking(move || {
            retries
                .set_group_override(&request.group_id, &request.topic, patch)
                .map_err(status::storage)
        })
        .await?;
        Ok(Response::new(v1::SetGroupSettingsResponse {
            effective: Some(v1::DeadLetterSettings {
                max_deliveries: Some(effective.max_deliveries),
                retry_backoff_ms: Some(effective.retry_backoff_ms),
                retry_backoff_multiplier: Some(effective.retry_backoff_multiplier),
                retry_backoff_max_ms: Some(effective.retry_backoff_max_ms),
                dlq_topic: Some(effective.dlq_topic),
            }),
        }))
    }

    #[tracing::instrument(skip_all, fields(dlq = %request.get_ref().dlq_topic))]
    async fn redrive(
        &self,
        request: Request<v1::RedriveRequest>,
    ) -> Result<Response<v1::RedriveResponse>, Status> {
        // Read on the DLQ here; write on each target below, per chunk,
        // before any of the chunk is written.
        let caller = self.access.check(
            &request,
            Operation::Read,
            Resource::topic(&request.get_ref().dlq_topic),
        )?;
        let request = request.into_inner();
        let dlq_topic = self.topics.get(&request.dlq_topic).map_err(status::topic)?;
        let log = dlq_topic
            .partition(request.partition)
            .map_err(status::topic)?
            .log()
            .clone();
        let target = v1::RedriveTarget::try_from(request.target).map_err(|_| {
            Status::invalid_argument(format!("unknown redrive target {}", request.target))
        })?;
        if target == v1::RedriveTarget::Topic {
            self.topics
                .get(&request.target_topic)
                .map_err(status::topic)?;
        }
        let progress = self
            .retries
            .redrive_progress(&request.dlq_topic, request.partition);
        let (start, end) = (log.log_start_offset(), log.high_watermark());
        let from = request
            .from_offset
            .unwrap_or_else(|| progress.unwrap_or(start))
            .max(start);
        let to = request.to_offset.unwrap_or(end).min(end);
        if from > to {
            return Err(Status::out_of_range(format!(
                "redrive range {from}..{to} is empty or reversed (the DLQ keeps {start}..{end})"
            )));
        }
        if let Some(done) = progress
            && from < done
            && !request.allow_repeat
        {
            return Err(Status::failed_precondition(format!(
                "{}/{} was already redriven up to offset {done}; start there, or set \
                 allow_repeat to redrive {from}..{done} again",
                request.dlq_topic, request.partition
            )));
        }
        let rate = match request.max_records_per_second {
            0 => DEFAULT_REDRIVE_RATE,
            n => n,
        };
        // Work in chunks of a tenth of a second's worth, pausing between
        // them, so a large redrive does not flood the group.
        let chunk = (rate / 10).max(1) as usize;
        let progress_floor = progress.unwrap_or(0);
        let appends_to_topics = !request.dry_run
            && matches!(
                target,
                v1::RedriveTarget::SourceTopic | v1::RedriveTarget::Topic
            );
        // What an earlier redrive to topics appended before a crash cut it
        // short (after its last saved progress): not appended again.
        let already_appended = match self
            .retries
            .redrive_in_flight(&request.dlq_topic, request.partition)
        {
            Some(in_flight) if appends_to_topics => {
                let topics = Arc::clone(&self.topics);
                let (dlq_topic, partition) = (request.dlq_topic.clone(), request.partition);
                let found = blocking(move || {
                    appended_by_redrive(&topics, &dlq_topic, partition, &in_flight)
                })
                .await?;
                if !found.is_empty() {
                    tracing::info!(dlq = %request.dlq_topic, records = found.len(), "an interrupted redrive appended these already; skipping them");
                }
                Arc::new(found)
            }
            _ => Arc::new(BTreeSet::new()),
        };
        let mut redriven = Vec::new();
        let mut next = from;
        while next < to {
            let started = Instant::now();
            let topics = Arc::clone(&self.topics);
            let retries = Arc::clone(&self.retries);
            let request = request.clone();
            let log = log.clone();
            let already_appended = Arc::clone(&already_appended);
            let (access, caller) = (self.access.clone(), Arc::clone(&caller));
            let (refs, after) = blocking(move || {
                let mut records = log.read_records(next, 1 << 20).map_err(status::storage)?;
                records.retain(|r| r.offset >= next && r.offset < to);
                records.truncate(chunk);
                let after = records.last().map_or(to, |r| r.offset + 1);
                let mut refs = Vec::new();
                // One durable retry-set append per group and chunk, not one
                // per record.
                let mut by_group: BTreeMap<String, Vec<(RetryKey, RecordLocation)>> =
                    BTreeMap::new();
                // (DLQ offset, target topic, partition, record).
                let mut to_append: Vec<(u64, String, u32, Record)> = Vec::new();
                for stored in records {
                    let Some(source) = dlq::dead_letter_source(&stored.record.headers) else {
                        tracing::warn!(
                            offset = stored.offset,
                            "skipping a DLQ record without dead-letter headers"
                        );
                        continue;
                    };
                    refs.push(v1::RecordRef {
                        topic: source.topic.clone(),
                        partition: source.partition,
                        offset: source.offset,
                    });
                    if request.dry_run {
                        continue;
                    }
                    let redriven_from =
                        dlq::redriven_from(&request.dlq_topic, request.partition, stored.offset);
                    match target {
                        v1::RedriveTarget::Unspecified | v1::RedriveTarget::Group => {
                            let group = dlq::dead_letter_group(&stored.record.headers)
                                .unwrap_or_default()
                                .to_owned();
                            by_group.entry(group).or_default().push((
                                source,
                                RecordLocation {
                                    topic: request.dlq_topic.clone(),
                                    partition: request.partition,
                                    offset: stored.offset,
                                },
                            ));
                        }
                        v1::RedriveTarget::SourceTopic | v1::RedriveTarget::Topic => {
                            let mut record = stored.record;
                            record.headers = dlq::own_headers(record.headers);
                            record.headers.push(Header {
                                key: dlq::HEADER_REDRIVEN_FROM.to_owned(),
                                value: redriven_from.into(),
                            });
                            let (topic, partition) = if target == v1::RedriveTarget::Topic {
                                let t = topics.get(&request.target_topic).map_err(status::topic)?;
                                let p = match &record.key {
                                    Some(k) => t.partition_for_key(k),
                                    None => t.next_partition(),
                                };
                                (request.target_topic.clone(), p)
                            } else {
                                (source.topic.clone(), source.partition)
                            };
                            to_append.push((stored.offset, topic, partition, record));
                        }
                    }
                }
                // A redrive to a group puts records in its retry set, as a
                // nack does: read on the group. To a topic: write on it.
                for group in by_group.keys() {
                    access.check_principal(&caller, Operation::Read, Resource::group(group))?;
                }
                for topic in to_append
                    .iter()
                    .map(|(_, topic, _, _)| topic)
                    .collect::<BTreeSet<_>>()
                {
                    access.check_principal(&caller, Operation::Write, Resource::topic(topic))?;
                }
                for (group, records) in by_group {
                    retries
                        .redrive(&group, records, now_ms())
                        .map_err(status::storage)?;
                }
                if appends_to_topics {
                    // Recorded first, with where the targets end now, so
                    // that a crash mid-chunk is found and not repeated.
                    let mut targets = BTreeMap::new();
                    for (_, topic, partition, _) in &to_append {
                        if let std::collections::btree_map::Entry::Vacant(slot) =
                            targets.entry((topic.clone(), *partition))
                        {
                            let end = topics
                                .get(topic)
                                .map_err(status::topic)?
                                .partition(*partition)
                                .map_err(status::topic)?
                                .log()
                                .high_watermark();
                            slot.insert(end);
                        }
                    }
                    retries
                        .begin_redrive_appends(&request.dlq_topic, request.partition, next, targets)
                        .map_err(status::storage)?;
                    for (offset, topic, partition, record) in to_append {
                        if !already_appended.contains(&offset) {
                            append(&topics, &topic, partition, record)?;
                        }
                    }
                    retries
                        .finish_redrive_appends(
                            &request.dlq_topic,
                            request.partition,
                            after.max(progress_floor),
                            already_appended.range(after..).next().is_none(),
                        )
                        .map_err(status::storage)?;
                } else if !request.dry_run {
                    retries
                        .set_redrive_progress(
                            &request.dlq_topic,
                            request.partition,
                            after.max(progress_floor),
                        )
                        .map_err(status::storage)?;
                }
                Ok((refs, after))
            })
            .await?;
            redriven.extend(refs);
            next = after;
            if !request.dry_run && next < to {
                let pace = Duration::from_millis(100).saturating_sub(started.elapsed());
                tokio::time::sleep(pace).await;
            }
        }
        if !request.dry_run {
            tracing::info!(dlq = %request.dlq_topic, records = redriven.len(), from, to, "redrove dead letters");
        }
        if let Some(m) = self.metrics.as_ref().filter(|_| !request.dry_run) {
            m.redriven.inc_by(redriven.len() as u64);
        }
        Ok(Response::new(v1::RedriveResponse {
            records: redriven,
            from_offset: from,
            to_offset: to,
            dry_run: request.dry_run,
        }))
    }
}
