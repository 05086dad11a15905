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
use sluice_format::compression::MAX_RECORDS_SECTION;
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

/// Kafka's snappy framing (snappy-java's): this magic, a version and a
/// compatible version, then blocks, each a 4-byte big-endian length and
/// a raw snappy block. Without the magic the section is one raw block.
const XERIAL_MAGIC: &[u8; 8] = b"\x82SNAPPY\x00";
const XERIAL_HEADER_LEN: usize = 16;

/// A compressed records section, decompressed to at most `limit` bytes
/// (Sluice's bound on a records section): a section that would expand
/// past it is refused before it is expanded, so a small request cannot
/// make the broker allocate without bound.
fn decompress(section: &mut Bytes, codec: KafkaCompression, limit: usize) -> anyhow::Result<Bytes> {
    use std::io::Read;
    let too_big = || anyhow::anyhow!("the records expand past {limit} bytes");
    let read_bounded = |reader: &mut dyn Read| -> anyhow::Result<Bytes> {
        let mut out = Vec::new();
        reader.take(limit as u64 + 1).read_to_end(&mut out)?;
        if out.len() > limit {
            return Err(too_big());
        }
        Ok(out.into())
    };
    let input = std::mem::take(section);
    match codec {
        KafkaCompression::None => Ok(input),
        KafkaCompression::Gzip => read_bounded(&mut flate2::read::GzDecoder::new(&input[..])),
        KafkaCompression::Lz4 => read_bounded(&mut lz4_flex::frame::FrameDecoder::new(&input[..])),
        KafkaCompression::Zstd => read_bounded(&mut zstd::stream::read::Decoder::new(&input[..])?),
        KafkaCompression::Snappy => {
            let mut decoder = snap::raw::Decoder::new();
            let mut block = |raw: &[u8], out: &mut Vec<u8>| -> anyhow::Result<()> {
                let len = snap::raw::decompress_len(raw)?;
                if out.len() + len > limit {
                    return Err(too_big());
                }
                let start = out.len();
                out.resize(start + len, 0);
                decoder.decompress(raw, &mut out[start..])?;
                Ok(())
            };
            let mut out = Vec::new();
            if !input.starts_with(XERIAL_MAGIC) {
                block(&input, &mut out)?;
                return Ok(out.into());
            }
            let mut rest = input
                .get(XERIAL_HEADER_LEN..)
                .ok_or_else(|| anyhow::anyhow!("the snappy header is cut short"))?;
            while !rest.is_empty() {
                let (len, tail) = rest
                    .split_first_chunk::<4>()
                    .ok_or_else(|| anyhow::anyhow!("a snappy block length is cut short"))?;
                let len = u32::from_be_bytes(*len) as usize;
                let raw = tail
                    .get(..len)
                    .ok_or_else(|| anyhow::anyhow!("a snappy block is cut short"))?;
                block(raw, &mut out)?;
                rest = &tail[len..];
            }
            Ok(out.into())
        }
    }
}

/// One partition's produced records, translated and checked: the batch to
/// append, as the topic stores it.
pub fn batch_from_kafka(
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
    let set = RecordBatchDecoder::decode_with_custom_compression(
        &mut bytes,
        Some(|section: &mut Bytes, codec| decompress(section, codec, MAX_RECORDS_SECTION)),
    )
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
pub fn kafka_batches(chunk: Bytes) -> Result<Bytes, Failure> {
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

#[cfg(test)]
mod tests {
    use bytes::BytesMut;

    use super::*;
    use crate::topics::{TopicConfigPatch, TopicDefaults};

    fn config(patch: TopicConfigPatch) -> TopicConfig {
        TopicDefaults::default().config(&patch).unwrap()
    }

    fn kafka_record(offset: i64, key: Option<&[u8]>, value: Option<&[u8]>) -> KafkaRecord {
        KafkaRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            timestamp_type: TimestampType::Creation,
            offset,
            // As kafka_batches does: one batch, base sequence -1.
            sequence: NO_SEQUENCE.wrapping_add(offset as i32),
            timestamp: 1_700_000_000_000 + offset * 7,
            key: key.map(Bytes::copy_from_slice),
            value: value.map(Bytes::copy_from_slice),
            headers: IndexMap::new(),
        }
    }

    /// Keys null, empty and present; a null value; binary headers;
    /// timestamps out of order.
    fn sample() -> Vec<KafkaRecord> {
        let mut records = vec![
            kafka_record(0, None, Some(b"first")),
            kafka_record(1, Some(b""), Some(&[0, 255, 1, 254])),
            kafka_record(2, Some(b"key"), None),
            kafka_record(3, Some(b"k"), Some(&[b'x'; 3000])),
        ];
        records[1].headers.insert(
            StrBytes::from_static_str("bin"),
            Some(Bytes::from_static(&[0, 1, 2])),
        );
        records[1]
            .headers
            .insert(StrBytes::from_static_str("empty"), Some(Bytes::new()));
        records[3].timestamp = 1_600_000_000_000;
        records
    }

    fn encode(records: &[KafkaRecord], compression: KafkaCompression) -> Bytes {
        let mut buf = BytesMut::new();
        RecordBatchEncoder::encode(
            &mut buf,
            records.iter(),
            &RecordEncodeOptions {
                version: 2,
                compression,
            },
        )
        .unwrap();
        buf.freeze()
    }

    /// Every codec a Kafka client sends is read, stored in the nearest
    /// Sluice codec, and served back as the same records at the same
    /// offsets (null values as empty ones).
    #[test]
    fn every_codec_round_trips_through_a_sluice_batch() {
        let sample = sample();
        for (codec, stored) in [
            (KafkaCompression::None, Compression::None),
            (KafkaCompression::Gzip, Compression::Zstd),
            (KafkaCompression::Snappy, Compression::Lz4),
            (KafkaCompression::Lz4, Compression::Lz4),
            (KafkaCompression::Zstd, Compression::Zstd),
        ] {
            let batch = batch_from_kafka(
                encode(&sample, codec),
                &config(TopicConfigPatch::default()),
                0,
            )
            .unwrap();
            assert_eq!(
                batch.header().compression().unwrap(),
                stored,
                "{codec:?} is stored as {stored:?}"
            );
            assert_eq!(batch.header().producer, ProducerInfo::NONE);
            let served = kafka_batches(batch.as_bytes().to_vec().into()).unwrap();
            let sets = RecordBatchDecoder::decode_all(&mut served.clone()).unwrap();
            assert_eq!(sets.len(), 1, "one Kafka batch per stored batch");
            let back = &sets[0].records;
            assert_eq!(back.len(), sample.len());
            for (a, b) in sample.iter().zip(back) {
                assert_eq!(a.offset, b.offset);
                assert_eq!(a.key, b.key);
                assert_eq!(
                    a.value.clone().unwrap_or_default(),
                    b.value.clone().unwrap()
                );
                assert_eq!(a.headers, b.headers);
                assert_eq!(a.timestamp, b.timestamp);
                assert_eq!(b.producer_id, NO_PRODUCER_ID);
            }
        }
    }

    /// A topic that forces a codec stores every Kafka codec in it.
    #[test]
    fn a_forced_codec_wins() {
        let forced = config(TopicConfigPatch {
            compression: Some("zstd".into()),
            ..Default::default()
        });
        let batch =
            batch_from_kafka(encode(&sample(), KafkaCompression::Snappy), &forced, 0).unwrap();
        assert_eq!(batch.header().compression().unwrap(), Compression::Zstd);
    }

    /// An idempotent producer's id, epoch and base sequence become the
    /// stored batch's, and come back to Kafka readers with each record's
    /// sequence.
    #[test]
    fn producer_fields_pass_through() {
        let records: Vec<KafkaRecord> = (0..3)
            .map(|i| KafkaRecord {
                producer_id: 42,
                producer_epoch: 3,
                sequence: 10 + i as i32,
                ..kafka_record(i, Some(b"k"), Some(b"v"))
            })
            .collect();
        let batch = batch_from_kafka(
            encode(&records, KafkaCompression::None),
            &config(TopicConfigPatch::default()),
            0,
        )
        .unwrap();
        assert_eq!(
            batch.header().producer,
            ProducerInfo {
                producer_id: 42,
                epoch: 3,
                base_sequence: 10
            }
        );
        let served = kafka_batches(batch.as_bytes().to_vec().into()).unwrap();
        let info = RecordBatchDecoder::decode_batch_info(&mut served.clone()).unwrap();
        assert_eq!(
            (
                info[0].producer_id,
                info[0].producer_epoch,
                info[0].base_sequence
            ),
            (42, 3, 10)
        );
    }

    #[test]
    fn damaged_or_malformed_batches_are_refused() {
        let config = config(TopicConfigPatch::default());
        let good = encode(&sample(), KafkaCompression::None);
        // One flipped bit in the records: the CRC-32C catches it.
        let mut flipped = good.to_vec();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        let e = batch_from_kafka(flipped.into(), &config, 0).unwrap_err();
        assert_eq!(e.code, KafkaCode::CorruptMessage, "{}", e.message);
        // Two batches for one partition.
        let mut two = good.to_vec();
        two.extend_from_slice(&good);
        let e = batch_from_kafka(two.into(), &config, 0).unwrap_err();
        assert_eq!(e.code, KafkaCode::InvalidRecord, "{}", e.message);
        // Cut short.
        let e = batch_from_kafka(good.slice(..good.len() - 3), &config, 0).unwrap_err();
        assert_eq!(e.code, KafkaCode::CorruptMessage, "{}", e.message);
        // A transactional batch.
        let mut txn = sample();
        for r in &mut txn {
            r.transactional = true;
            r.producer_id = 1;
            r.producer_epoch = 0;
            r.sequence = r.offset as i32;
        }
        let e = batch_from_kafka(encode(&txn, KafkaCompression::None), &config, 0).unwrap_err();
        assert_eq!(e.code, KafkaCode::InvalidRecord, "{}", e.message);
    }

    /// A small section that would expand past the bound is refused, in
    /// every codec, before it is expanded.
    #[test]
    fn decompression_is_bounded() {
        let big = vec![kafka_record(0, None, Some(&vec![b'z'; 200_000]))];
        for codec in [
            KafkaCompression::Gzip,
            KafkaCompression::Snappy,
            KafkaCompression::Lz4,
            KafkaCompression::Zstd,
        ] {
            let batch = encode(&big, codec);
            let info = RecordBatchDecoder::decode_batch_info(&mut batch.clone()).unwrap();
            assert_eq!(info[0].compression, codec);
            // The records section starts after the 61-byte batch header.
            let mut section = batch.slice(61..);
            let whole = decompress(&mut section.clone(), codec, 1 << 20).unwrap();
            assert!(whole.len() > 200_000, "{codec:?}");
            let e = decompress(&mut section, codec, 100_000).unwrap_err();
            assert!(e.to_string().contains("expand past"), "{codec:?}: {e}");
        }
    }

    /// The topic's record limit applies as it does to gRPC records.
    #[test]
    fn an_oversized_record_is_refused() {
        let small = config(TopicConfigPatch {
            max_record_bytes: Some(1024),
            ..Default::default()
        });
        let e = batch_from_kafka(encode(&sample(), KafkaCompression::Lz4), &small, 0).unwrap_err();
        assert_eq!(e.code, KafkaCode::MessageTooLarge, "{}", e.message);
        assert!(e.message.contains("record 3"), "{}", e.message);
    }
}
