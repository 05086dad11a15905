//! Translation between `sluice.v1` messages and storage records.

use sluice_proto::v1;

use crate::storage::{BatchHeader, Header, Record, RecordView, StoredRecord};

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
    sluice_proto::record_message_len(
        record.key.as_ref().map(|k| k.len()),
        record.value.len(),
        record.headers.iter().map(|h| (h.key.len(), h.value.len())),
        record.timestamp_ms,
    )
}

/// [`record_size`] of a record inside a batch a producer sent: the same
/// rule, whichever way the record arrived.
pub(crate) fn batch_record_size(record: &RecordView<'_>, batch: &BatchHeader) -> usize {
    sluice_proto::record_message_len(
        record.key.map(<[u8]>::len),
        record.value.len(),
        record.headers().map(|(k, v)| (k.len(), v.len())),
        record.timestamp(batch),
    )
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

pub(crate) use crate::state::now_ms;

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;
    use crate::storage::{BatchBuilder, ProducerInfo};

    proptest! {
        /// The size rule gives the same figure for a record sent as a
        /// message and for the same record inside a batch, and both are
        /// prost's own length of the message.
        #[test]
        fn one_size_rule_for_messages_and_batches(
            key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300)),
            value in proptest::collection::vec(any::<u8>(), 0..3000),
            headers in proptest::collection::vec(("[a-z]{0,20}", proptest::collection::vec(any::<u8>(), 0..200)), 0..5),
            timestamp in prop_oneof![Just(0i64), 1i64..i64::MAX],
        ) {
            let message = v1::Record {
                key: key.clone().map(Bytes::from),
                value: Bytes::from(value.clone()),
                headers: headers.iter().map(|(k, v)| v1::Header { key: k.clone(), value: Bytes::from(v.clone()) }).collect(),
                timestamp_ms: timestamp,
            };
            prop_assert_eq!(record_size(&message), prost::Message::encoded_len(&message));
            let batch = BatchBuilder::encode(&[record_from_proto(message.clone(), timestamp)], ProducerInfo::NONE);
            let view = batch.as_record_batch();
            let mut sizes = Vec::new();
            view.walk(|r| { sizes.push(batch_record_size(r, view.header())); Ok::<(), crate::storage::BatchError>(()) }).unwrap();
            prop_assert_eq!(sizes, vec![record_size(&message)]);
        }
    }
}
