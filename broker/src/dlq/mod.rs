//! Dead-letter queues: a poison record neither blocks a partition nor is
//! lost.
//!
//! This module owns the retry bookkeeping of each consumer group and the
//! shape of dead letters:
//!
//! - [`RetryPolicy`]: how many deliveries a record gets and the backoff
//!   between them.
//! - [`RetrySets`]: per group, the records that were nacked, with their
//!   delivery count, reasons, times and next delivery; durable (a
//!   [`StateLog`](crate::storage::StateLog)), so a restart neither loses nor
//!   repeats a pending retry. A record nacked for the last time becomes a
//!   *pending dead letter* until the caller has appended it to the DLQ topic,
//!   so a crash in between is finished on restart instead of lost, and the
//!   headers let the caller see whether the append already happened. Only
//!   the call that makes an entry pending is told to append it, and every
//!   read-modify-write of an entry holds one lock, so concurrent nacks of
//!   one record neither lose counts nor dead-letter it twice. A dead letter
//!   that cannot be written stays in the set, *undeliverable*, with the
//!   reason. The last [`REMEMBERED_DEAD_LETTERS`] finished dead letters are
//!   remembered, so a repeated nack is answered with where it went.
//!   A retry handed out and neither acked nor nacked within the redelivery
//!   timeout counts as a failed delivery ([`RetrySets::expire_handed_out`]).
//!   Redrive progress per DLQ partition, and a redrive to topics in flight
//!   ([`RedriveInFlight`]), so a crash mid-chunk is not appended twice.
//! - [`dead_letter_headers`] and friends: the headers a dead letter carries
//!   and how a redrive marks a record.
//!
//! It does not read or write topics: the caller (the server, through
//! `topics`) fetches records for redelivery and appends dead letters.

mod retry;

pub use retry::{
    DeadLetter, FinishedDeadLetter, NackOutcome, REDELIVERY_TIMEOUT_CLASS, REMEMBERED_DEAD_LETTERS,
    RecordLocation, RedriveInFlight, RetryEntry, RetryKey, RetryPolicy, RetrySets,
};

use crate::storage::Header;

/// The default DLQ topic of a (topic, group) pair: one per pair, so one
/// group never sees another group's failures.
pub fn dlq_topic_name(topic: &str, group: &str) -> String {
    format!("{topic}.{group}.dlq")
}

pub const HEADER_SOURCE_TOPIC: &str = "sluice.dlq.source-topic";
pub const HEADER_SOURCE_PARTITION: &str = "sluice.dlq.source-partition";
pub const HEADER_SOURCE_OFFSET: &str = "sluice.dlq.source-offset";
pub const HEADER_GROUP: &str = "sluice.dlq.group";
pub const HEADER_REASON: &str = "sluice.dlq.reason";
pub const HEADER_ERROR_CLASS: &str = "sluice.dlq.error-class";
pub const HEADER_ATTEMPTS: &str = "sluice.dlq.attempts";
pub const HEADER_FIRST_FAILURE_MS: &str = "sluice.dlq.first-failure-ms";
pub const HEADER_LAST_FAILURE_MS: &str = "sluice.dlq.last-failure-ms";
/// On a redriven record: `<dlq topic>/<partition>/<offset>` it came from.
pub const HEADER_REDRIVEN_FROM: &str = "sluice.dlq.redriven-from";

/// The headers added to a record when it is dead-lettered (its own headers
/// come first, unchanged).
pub fn dead_letter_headers(group: &str, entry: &RetryEntry) -> Vec<Header> {
    let h = |key: &str, value: String| Header {
        key: key.to_owned(),
        value: value.into(),
    };
    vec![
        h(HEADER_SOURCE_TOPIC, entry.key.topic.clone()),
        h(HEADER_SOURCE_PARTITION, entry.key.partition.to_string()),
        h(HEADER_SOURCE_OFFSET, entry.key.offset.to_string()),
        h(HEADER_GROUP, group.to_owned()),
        h(HEADER_REASON, entry.last_reason.clone()),
        h(HEADER_ERROR_CLASS, entry.error_class.clone()),
        h(HEADER_ATTEMPTS, entry.deliveries.to_string()),
        h(HEADER_FIRST_FAILURE_MS, entry.first_failure_ms.to_string()),
        h(HEADER_LAST_FAILURE_MS, entry.last_failure_ms.to_string()),
    ]
}

/// The last value of header `name`: a header added later wins.
fn header<'a>(headers: &'a [Header], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .map(|h| h.value.as_ref())
}

fn header_text<'a>(headers: &'a [Header], name: &str) -> Option<&'a str> {
    header(headers, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Whether `headers` (of a record in a DLQ) mark it as the dead letter of
/// `key` for `group`: how a restart tells whether a pending dead letter was
/// already appended.
pub fn is_dead_letter_of(headers: &[Header], group: &str, key: &RetryKey) -> bool {
    let get = |name| header(headers, name);
    get(HEADER_GROUP) == Some(group.as_bytes())
        && get(HEADER_SOURCE_TOPIC) == Some(key.topic.as_bytes())
        && get(HEADER_SOURCE_PARTITION) == Some(key.partition.to_string().as_bytes())
        && get(HEADER_SOURCE_OFFSET) == Some(key.offset.to_string().as_bytes())
}

/// Where a dead letter says it came from, if it carries the headers.
pub fn dead_letter_source(headers: &[Header]) -> Option<RetryKey> {
    let get = |name| header_text(headers, name);
    Some(RetryKey {
        topic: get(HEADER_SOURCE_TOPIC)?.to_owned(),
        partition: get(HEADER_SOURCE_PARTITION)?.parse().ok()?,
        offset: get(HEADER_SOURCE_OFFSET)?.parse().ok()?,
    })
}

/// The header value marking a record redriven from `offset` of
/// `dlq_topic`/`partition`.
pub fn redriven_from(dlq_topic: &str, partition: u32, offset: u64) -> String {
    format!("{dlq_topic}/{partition}/{offset}")
}

/// The DLQ offset a record was redriven from, if it says it came from
/// `dlq_topic`/`partition`.
pub fn redriven_offset(headers: &[Header], dlq_topic: &str, partition: u32) -> Option<u64> {
    header_text(headers, HEADER_REDRIVEN_FROM)?
        .strip_prefix(&format!("{dlq_topic}/{partition}/"))?
        .parse()
        .ok()
}

/// The group that dead-lettered a record, if it says.
pub fn dead_letter_group(headers: &[Header]) -> Option<&str> {
    header_text(headers, HEADER_GROUP)
}

/// The record's own headers: `headers` without the ones a dead-lettering
/// or a redrive added (all named `sluice.dlq.*`).
pub fn own_headers(headers: Vec<Header>) -> Vec<Header> {
    headers
        .into_iter()
        .filter(|h| !h.key.starts_with("sluice.dlq."))
        .collect()
}
