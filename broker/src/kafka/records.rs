//! Kafka's record batch v2 ⇄ Sluice batches: the one place the two
//! formats meet.
//!
//! Produce: a partition's records arrive as exactly one Kafka batch
//! (Kafka's own rule for produce v3 and later). `kafka-protocol` checks its
//! CRC-32C and decompresses it (gzip, snappy, lz4, zstd); each record
//! becomes a Sluice [`Record`] with the same key, value, headers and
//! timestamp, and the batch's producer id, epoch and base sequence become
//! the Sluice batch's, so the broker's idempotence applies unchanged. The
//! batch is stored in the topic's codec, or, for a topic that keeps the
//! producer's, the nearest Sluice codec: lz4 and snappy as lz4, zstd and
//! gzip as zstd.
//!
//! Fetch: each stored batch becomes one uncompressed Kafka batch with the
//! same base offset, records and producer fields. Uncompressed, because
//! compressing on every fetch would cost more CPU than the bytes saved on
//! the networks Sluice serves (docs/KAFKA.md has the figures).
//!
//! What does not carry across: a Kafka null value reads as an empty value
//! over gRPC (Sluice values are never null), a null header value as an
//! empty one, and of two headers with one key in a Sluice record Kafka
//! clients see the last (the codec keeps headers in a map).

use bytes::{Bytes, BytesMut};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::records::{
    Compression as KafkaCompression, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
    Record as KafkaRecord, RecordBatchDecoder, RecordBatchEncoder, RecordEncodeOptions,
    TimestampType,
};
use sluice_format::{
    BatchBuilder, BatchError, BatchIter, Compression, EncodedBatch, Header, ProducerInfo, Record,
};

use super::errors::{Failure, KafkaCode};
use crate::producers::sequence_add;
use crate::topics::TopicConfig;

/// The Sluice codec a Kafka codec is stored as, for topics that keep the
/// producer's choice.
fn nearest_codec(kafka: KafkaCompression) -> Compression {
    match kafka {
        KafkaCompression::None => Compression::None,
        KafkaCompression::Lz4 | KafkaCompression::Snappy => Compression::Lz4,
        KafkaCompression::Zstd | KafkaCompression::Gzip => Compression::Zstd,
    }
}

/// One partition's produced records, translated and checked: the batch to
/// append, as the topic stores it.
pub(crate) fn batch_from_kafka(
    mut bytes: Bytes,
    config: &TopicConfig,
    now_ms: i64,
) -> Result<EncodedBatch, Failure> {
    let corrupt = |why: String| Failure::new(KafkaCode::CorruptMessage, why);
    let invalid = |why: String| Failure::new(KafkaCode::InvalidRecord, why);
    // The codec and the producer fields are in the header, which the
    // decoder checks (CRC-32C) but does not hand back in full.
    let info = RecordBatchDecoder::decode_batch_info(&mut bytes.clone())
        .map_err(|e| corrupt(format!("the record batch is unreadable: {e}")))?;
    let [info] = info.as_slice() else {
        return Err(invalid(format!(
            "a produce request carries exactly one record batch per partition, not {}",
            info.len()
        )));
    };
    if info.transactional || info.control {
        return Err(Failure::new(
            KafkaCode::InvalidRecord,
            "transactional and control batches are not supported (Sluice has no transactions)",
        ));
    }
    if info.compression != KafkaCompression::None
        && !matches!(
            info.compression,
            KafkaCompression::Gzip
                | KafkaCompression::Snappy
                | KafkaCompression::Lz4
                | KafkaCompression::Zstd
        )
    {
        return Err(Failure::new(
            KafkaCode::UnsupportedCompressionType,
            format!("compression {:?} is not supported", info.compression),
        ));
    }
    let set = RecordBatchDecoder::decode(&mut bytes)
        .map_err(|e| corrupt(format!("the record batch is unreadable: {e}")))?;
    if !bytes.is_empty() {
        return Err(invalid(format!(
            "{} bytes follow the record batch",
            bytes.len()
        )));
    }
    if set.records.is_empty() {
        return Err(invalid("the record batch has no records".into()));
    }
    let producer = producer_info(info.producer_id, info.producer_epoch, info.base_sequence)?;
    let max = config.max_record_bytes as usize;
    let mut builder = BatchBuilder::default();
    for (index, kafka) in set.records.into_iter().enumerate() {
        if kafka.offset != info.min_offset + index as i64 {
            return Err(invalid(format!(
                "record {index} has offset delta {}, not {index}",
                kafka.offset - info.min_offset
            )));
        }
        let record = record_from_kafka(kafka, now_ms);
        let size = sluice_proto::record_message_len(
            record.key.as_ref().map(|k| k.len()),
            record.value.len(),
            record.headers.iter().map(|h| (h.key.len(), h.value.len())),
            record.timestamp,
        );
        if size > max {
            return Err(Failure::new(
                KafkaCode::MessageTooLarge,
                format!(
                    "record {index} is {size} bytes; the topic accepts records of at most {max} \
                     bytes (their key, value and headers)"
                ),
            ));
        }
        builder.push(&record);
    }
    let codec = match config.forced_compression()? {
        Some(codec) => codec,
        None => nearest_codec(info.compression),
    };
    let batch = builder.finish_if_smaller(producer, codec);
    let limit = config.batch_limit();
    if batch.len() as u64 > limit {
        return Err(Failure::new(
            KafkaCode::RecordListTooLarge,
            format!(
                "the batch is {} bytes as stored; the topic takes batches of at most {limit} bytes",
                batch.len()
            ),
        ));
    }
    Ok(batch)
}

/// Kafka's producer fields as Sluice's: no producer id is
/// [`ProducerInfo::NONE`]; otherwise the epoch and sequence must be valid.
fn producer_info(
    producer_id: i64,
    epoch: i16,
    base_sequence: i32,
) -> Result<ProducerInfo, Failure> {
    if producer_id == NO_PRODUCER_ID {
        return Ok(ProducerInfo::NONE);
    }
    let invalid = |why: String| Failure::new(KafkaCode::InvalidRecord, why);
    let producer_id = u64::try_from(producer_id)
        .map_err(|_| invalid(format!("producer id {producer_id} is negative")))?;
    let epoch = u16::try_from(epoch)
        .ok()
        .filter(|e| *e != sluice_format::batch::NO_PRODUCER_EPOCH)
        .ok_or_else(|| invalid(format!("producer epoch {epoch} is out of range")))?;
    if base_sequence < 0 {
        return Err(Failure::new(
            KafkaCode::OutOfOrderSequenceNumber,
            format!("base sequence {base_sequence} of producer {producer_id} is negative"),
        ));
    }
    Ok(ProducerInfo {
        producer_id,
        epoch,
        base_sequence,
    })
}

fn record_from_kafka(kafka: KafkaRecord, now_ms: i64) -> Record {
    Record {
        key: kafka.key,
        value: kafka.value.unwrap_or_default(),
        headers: kafka
            .headers
            .into_iter()
            .map(|(key, value)| Header {
                key: key.to_string(),
                value: value.unwrap_or_default(),
            })
            .collect(),
        // Batch v2 always carries a timestamp; -1 is Kafka's "none".
        timestamp: if kafka.timestamp < 0 {
            now_ms
        } else {
            kafka.timestamp
        },
    }
}

/// Stored batches (whole, back to back, as a log read returns them) as
/// uncompressed Kafka record batches, one per stored batch, offsets kept.
pub(crate) fn kafka_batches(chunk: Bytes) -> Result<Bytes, Failure> {
    let mut out = BytesMut::with_capacity(chunk.len() + chunk.len() / 8);
    let options = RecordEncodeOptions {
        version: 2,
        compression: KafkaCompression::None,
    };
    // The log's own bytes, checked when written and when the log opened:
    // a failure here is damage found since, the storage's condition.
    let damaged = |e: BatchError| Failure::new(KafkaCode::KafkaStorageError, e.to_string());
    for batch in BatchIter::new(chunk) {
        let batch = batch.map_err(damaged)?;
        let header = *batch.header();
        let records = batch.to_records().map_err(damaged)?;
        let idempotent = header.producer != ProducerInfo::NONE;
        let kafka: Vec<KafkaRecord> = records
            .into_iter()
            .enumerate()
            .map(|(index, stored)| {
                let record = stored.record;
                // The encoder starts a new batch where `offset - sequence`
                // changes; a producer-less batch keeps it constant with
                // sequences -1, 0, 1, ..., and writes base sequence -1.
                let sequence = if idempotent {
                    sequence_add(header.producer.base_sequence, index as u32)
                } else {
                    NO_SEQUENCE.wrapping_add(index as i32)
                };
                KafkaRecord {
                    transactional: false,
                    control: false,
                    delete_horizon: false,
                    partition_leader_epoch: 0,
                    producer_id: if idempotent {
                        header.producer.producer_id as i64
                    } else {
                        NO_PRODUCER_ID
                    },
                    producer_epoch: if idempotent {
                        header.producer.epoch as i16
                    } else {
                        NO_PRODUCER_EPOCH
                    },
                    timestamp_type: TimestampType::Creation,
                    offset: stored.offset as i64,
                    sequence,
                    timestamp: record.timestamp,
                    key: record.key,
                    value: Some(record.value),
                    headers: record
                        .headers
                        .into_iter()
                        .map(|h| (StrBytes::from_string(h.key), Some(h.value)))
                        .collect::<IndexMap<_, _>>(),
                }
            })
            .collect();
        RecordBatchEncoder::encode(&mut out, kafka.iter(), &options).map_err(|e| {
            tracing::error!(error = %e, "encoding a Kafka batch failed");
            Failure::new(
                KafkaCode::UnknownServerError,
                format!("encoding a Kafka batch failed: {e}"),
            )
        })?;
    }
    Ok(out.freeze())
}
