//! Translation between `sluice.v1` messages and storage records.

use sluice_proto::v1;

use crate::storage::{Header, Record, StoredRecord};

pub(crate) fn record_from_proto(record: v1::Record, now_ms: i64) -> Record {
    Record {
        key: record.key,
        value: record.value,
        headers: record
            .headers
            .into_iter()
            .map(|h| Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        timestamp: if record.timestamp_ms == 0 {
            now_ms
        } else {
            record.timestamp_ms
        },
    }
}

/// Bytes a record counts against `max_record_bytes`: its encoded `Record`
/// message (key, value, headers and their framing), so that the limit also
/// bounds what a consumer receives for it.
pub(crate) fn record_size(record: &v1::Record) -> usize {
    prost::Message::encoded_len(record)
}

pub(crate) fn consumed(topic: &str, partition: u32, stored: StoredRecord) -> v1::ConsumedRecord {
    let record = stored.record;
    v1::ConsumedRecord {
        topic: topic.to_owned(),
        partition,
        offset: stored.offset,
        key: record.key,
        value: record.value,
        headers: record
            .headers
            .into_iter()
            .map(|h| v1::Header {
                key: h.key,
                value: h.value,
            })
            .collect(),
        timestamp_ms: record.timestamp,
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
