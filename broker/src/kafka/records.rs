//! Kafka's record batch v2 ⇄ Sluice batches: the one place the two
//! formats meet.
//!
//! Produce: a partition's records arrive as exactly one Kafka batch
//! (Kafka's own rule for produce v3 and later). `kafka-protocol` reads its
//! header and checks its CRC-32C ([`RecordBatchDecoder::decode_batch_info`]);
//! the records section is decompressed here, bounded (gzip, snappy, lz4,
//! zstd), and each record becomes a Sluice [`Record`] with the same key,
//! value, headers and timestamp. The batch's producer id, epoch and base
//! sequence become the Sluice batch's, so the broker's idempotence applies
//! unchanged. The batch is stored in the topic's codec, or, for a topic
//! that keeps the producer's, the nearest Sluice codec: lz4 and snappy as
//! lz4, zstd and gzip as zstd.
//!
//! Fetch: each stored batch becomes one uncompressed Kafka batch with the
//! same base offset, records and producer fields, written straight from
//! the stored records without building any. Uncompressed, because
//! compressing on every fetch would cost more CPU than the bytes saved on
//! the networks Sluice serves (docs/KAFKA.md has the figures).
//!
//! The records inside a Kafka batch are read and written here rather than
//! through `kafka-protocol`'s `Record`, which keeps a record's headers in a
//! map: two headers with one key (Kafka allows them, and Sluice keeps them)
//! would lose all but the last. The unit tests check this code against
//! `kafka-protocol`'s decoder and encoder.
//!
//! What does not carry across: a Kafka null value reads as an empty value
//! over gRPC (Sluice values are never null), and a null header value as an
//! empty one.

use bytes::Bytes;
use kafka_protocol::records::{
    Compression as KafkaCompression, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
    RecordBatchDecoder,
};
use sluice_format::compression::MAX_RECORDS_SECTION;
use sluice_format::varint;
use sluice_format::{
    BatchBuilder, BatchError, BatchIter, Compression, EncodedBatch, Header, ProducerInfo, Record,
    RecordBatch,
};

use super::errors::{Failure, KafkaCode};
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
    bytes: Bytes,
    config: &TopicConfig,
    now_ms: i64,
) -> Result<EncodedBatch, Failure> {
    let corrupt = |why: String| Failure::new(KafkaCode::CorruptMessage, why);
    let invalid = |why: String| Failure::new(KafkaCode::InvalidRecord, why);
    if bytes.len() < BATCH_HEADER_LEN || bytes[MAGIC_AT] != 2 {
        return Err(corrupt(format!(
            "the records are not one record batch v2 ({} bytes, magic {:?})",
            bytes.len(),
            bytes.get(MAGIC_AT)
        )));
    }
    let length = i32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    let total = usize::try_from(length).map_or(0, |n| n + LENGTH_END);
    if total > bytes.len() || total < BATCH_HEADER_LEN {
        return Err(corrupt(format!(
            "the record batch says {total} bytes and {} arrived",
            bytes.len()
        )));
    }
    if total < bytes.len() {
        return Err(invalid(format!(
            "a produce request carries exactly one record batch per partition: the batch \
             says {total} bytes, the partition's records are {}",
            bytes.len()
        )));
    }
    // The header's fields, and its CRC-32C checked.
    let info = RecordBatchDecoder::decode_batch_info(&mut bytes.clone())
        .map_err(|e| corrupt(format!("the record batch is unreadable: {e}")))?;
    let [info] = info.as_slice() else {
        return Err(corrupt("the record batch is unreadable".into()));
    };
    if info.transactional || info.control {
        return Err(invalid(
            "transactional and control batches are not supported (Sluice has no transactions)"
                .into(),
        ));
    }
    if info.record_count < 1 {
        return Err(invalid("the record batch has no records".into()));
    }
    let producer = producer_info(info.producer_id, info.producer_epoch, info.base_sequence)?;
    let mut section = bytes.slice(BATCH_HEADER_LEN..);
    let section = decompress(&mut section, info.compression, MAX_RECORDS_SECTION)
        .map_err(|e| corrupt(format!("the records section is unreadable: {e}")))?;
    let max = config.max_record_bytes as usize;
    let mut builder = BatchBuilder::default();
    let mut rest = &section[..];
    for index in 0..info.record_count {
        let (record, len) = read_record(rest, index, info.min_timestamp, now_ms)
            .map_err(|why| corrupt(format!("record {index} is malformed: {why}")))?;
        rest = &rest[len..];
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
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} bytes follow the batch's {} records",
            rest.len(),
            info.record_count
        )));
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

/// Reads the Kafka record at the front of `buf` (record `index` of its
/// batch): the record, and the bytes it took. Its offset delta must be its
/// index (Sluice offsets have no gaps).
fn read_record(
    buf: &[u8],
    index: i32,
    base_timestamp: i64,
    now_ms: i64,
) -> Result<(Record, usize), String> {
    let mut cursor = KafkaCursor { buf, pos: 0 };
    let length = cursor.varint("length")?;
    let length = usize::try_from(length).map_err(|_| format!("length {length} is negative"))?;
    let start = cursor.pos;
    let end = start
        .checked_add(length)
        .filter(|end| *end <= buf.len())
        .ok_or_else(|| format!("its length {length} runs past the records"))?;
    let mut cursor = KafkaCursor {
        buf: &buf[..end],
        pos: start,
    };
    cursor.bytes(1, "attributes")?;
    let timestamp_delta = cursor.varint("timestamp delta")?;
    let offset_delta = cursor.varint("offset delta")?;
    if offset_delta != i64::from(index) {
        return Err(format!("its offset delta is {offset_delta}, not {index}"));
    }
    let key = cursor.nullable("key")?.map(Bytes::copy_from_slice);
    let value = cursor
        .nullable("value")?
        .map_or_else(Bytes::new, Bytes::copy_from_slice);
    let header_count = cursor.varint("header count")?;
    let header_count = usize::try_from(header_count)
        .map_err(|_| format!("header count {header_count} is negative"))?;
    let mut headers = Vec::with_capacity(header_count.min(64));
    for _ in 0..header_count {
        let key = cursor
            .nullable("header key")?
            .ok_or_else(|| "a header key is null".to_owned())?;
        let key = std::str::from_utf8(key)
            .map_err(|_| "a header key is not UTF-8".to_owned())?
            .to_owned();
        let value = cursor
            .nullable("header value")?
            .map_or_else(Bytes::new, Bytes::copy_from_slice);
        headers.push(Header { key, value });
    }
    if cursor.pos != end {
        return Err(format!("{} bytes follow its last field", end - cursor.pos));
    }
    let timestamp = base_timestamp.wrapping_add(timestamp_delta);
    let record = Record {
        key,
        value,
        headers,
        // Batch v2 always carries a time; a negative one is Kafka's "none".
        timestamp: if timestamp < 0 { now_ms } else { timestamp },
    };
    Ok((record, end))
}

/// A bounds-checked reader of Kafka's record fields.
struct KafkaCursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> KafkaCursor<'a> {
    fn varint(&mut self, what: &str) -> Result<i64, String> {
        let (value, len) = varint::get_varint(&self.buf[self.pos..])
            .ok_or_else(|| format!("its {what} is not a varint"))?;
        self.pos += len;
        Ok(value)
    }

    fn bytes(&mut self, len: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.buf.len())
            .ok_or_else(|| format!("its {what} runs past the record"))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    /// A length (-1: null) and that many bytes.
    fn nullable(&mut self, what: &str) -> Result<Option<&'a [u8]>, String> {
        match self.varint(what)? {
            -1 => Ok(None),
            len => {
                let len = usize::try_from(len)
                    .map_err(|_| format!("its {what} length {len} is negative"))?;
                self.bytes(len, what).map(Some)
            }
        }
    }
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

/// Stored batches (whole, back to back, as a log read returns them) as
/// uncompressed Kafka record batches, one per stored batch, offsets kept.
pub fn kafka_batches(chunk: Bytes) -> Result<Bytes, Failure> {
    // The log's own bytes, checked when written and when the log opened:
    // a failure here is damage found since, the storage's condition.
    let damaged = |e: BatchError| Failure::new(KafkaCode::KafkaStorageError, e.to_string());
    let mut out = Vec::with_capacity(chunk.len() + chunk.len() / 8);
    for batch in BatchIter::new(chunk) {
        let batch = batch.map_err(damaged)?;
        write_kafka_batch(&mut out, &batch).map_err(damaged)?;
    }
    Ok(out.into())
}

/// Kafka's record batch v2: where the fields are, as far as this file
/// writes or checks them. The CRC-32C covers the attributes to the end.
const LENGTH_END: usize = 12;
const MAGIC_AT: usize = 16;
const CRC_AT: usize = 17;
const ATTRIBUTES_AT: usize = 21;
const BATCH_HEADER_LEN: usize = 61;

/// Appends `batch` to `out` as one uncompressed Kafka batch.
fn write_kafka_batch(out: &mut Vec<u8>, batch: &RecordBatch) -> Result<(), BatchError> {
    let header = *batch.header();
    let idempotent = header.producer != ProducerInfo::NONE;
    let start = out.len();
    out.extend_from_slice(&(header.base_offset as i64).to_be_bytes());
    out.extend_from_slice(&0i32.to_be_bytes()); // length, filled in below
    out.extend_from_slice(&0i32.to_be_bytes()); // partition leader epoch
    out.push(2); // magic
    out.extend_from_slice(&0u32.to_be_bytes()); // CRC-32C, filled in below
    out.extend_from_slice(&0i16.to_be_bytes()); // attributes: none, CreateTime
    out.extend_from_slice(&(header.record_count as i32 - 1).to_be_bytes()); // last offset delta
    out.extend_from_slice(&header.first_timestamp.to_be_bytes());
    out.extend_from_slice(&header.max_timestamp.to_be_bytes());
    let (producer_id, epoch, sequence) = if idempotent {
        let p = header.producer;
        (p.producer_id as i64, p.epoch as i16, p.base_sequence)
    } else {
        (NO_PRODUCER_ID, NO_PRODUCER_EPOCH, NO_SEQUENCE)
    };
    out.extend_from_slice(&producer_id.to_be_bytes());
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&sequence.to_be_bytes());
    out.extend_from_slice(&(header.record_count as i32).to_be_bytes());
    debug_assert_eq!(out.len() - start, BATCH_HEADER_LEN);
    let mut record = Vec::with_capacity(256);
    batch.walk(|view| {
        record.clear();
        record.push(0); // attributes
        varint::put_varint(&mut record, view.timestamp_delta);
        varint::put_varint(&mut record, i64::from(view.offset_delta));
        match view.key {
            Some(key) => {
                varint::put_varint(&mut record, key.len() as i64);
                record.extend_from_slice(key);
            }
            None => varint::put_varint(&mut record, -1),
        }
        varint::put_varint(&mut record, view.value.len() as i64);
        record.extend_from_slice(view.value);
        varint::put_varint(&mut record, view.header_count() as i64);
        for (key, value) in view.headers() {
            varint::put_varint(&mut record, key.len() as i64);
            record.extend_from_slice(key.as_bytes());
            varint::put_varint(&mut record, value.len() as i64);
            record.extend_from_slice(value);
        }
        varint::put_varint(out, record.len() as i64);
        out.extend_from_slice(&record);
        Ok::<(), BatchError>(())
    })?;
    let length = (out.len() - start - LENGTH_END) as i32;
    out[start + 8..start + LENGTH_END].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&out[start + ATTRIBUTES_AT..]);
    out[start + CRC_AT..start + ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use bytes::BytesMut;
    use kafka_protocol::indexmap::IndexMap;
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Record as KafkaRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    use super::*;
    use crate::topics::{TopicConfigPatch, TopicDefaults};

    fn config(patch: TopicConfigPatch) -> TopicConfig {
        TopicDefaults::default().config(&patch).unwrap()
    }

    pub(crate) fn kafka_record(
        offset: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> KafkaRecord {
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

    pub(crate) fn encode(records: &[KafkaRecord], compression: KafkaCompression) -> Bytes {
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

    /// Two headers with one key, in order, and empty keys and values,
    /// survive Sluice → Kafka → Sluice; `kafka-protocol`'s decoder reads
    /// what this file writes (checksum, layout, every field).
    #[test]
    fn repeated_header_keys_survive_both_ways() {
        let header = |k: &str, v: &[u8]| Header {
            key: k.to_owned(),
            value: Bytes::copy_from_slice(v),
        };
        let records = vec![
            Record {
                key: Some(Bytes::from_static(b"k")),
                value: Bytes::from_static(b"v1"),
                headers: vec![
                    header("source", b"kafka"),
                    header("bin", &[0, 255]),
                    header("", b""),
                    header("source", b"again"),
                ],
                timestamp: 1_700_000_000_500,
            },
            Record {
                key: None,
                value: Bytes::new(),
                headers: vec![],
                // Before the first record: a negative delta.
                timestamp: 1_700_000_000_000,
            },
        ];
        for codec in [Compression::None, Compression::Lz4, Compression::Zstd] {
            let stored = BatchBuilder::encode_compressed(
                &records,
                ProducerInfo {
                    producer_id: 7,
                    epoch: 1,
                    base_sequence: 40,
                },
                codec,
            );
            let stamped = sluice_format::batch::stamped_copy(&stored, 1000);
            let kafka = kafka_batches(stamped).unwrap();
            // The reference decoder agrees on everything it can represent.
            let sets = RecordBatchDecoder::decode_all(&mut kafka.clone()).unwrap();
            assert_eq!(sets.len(), 1);
            let decoded = &sets[0].records;
            assert_eq!(decoded.len(), 2);
            assert_eq!(decoded[0].offset, 1000);
            assert_eq!(decoded[1].offset, 1001);
            assert_eq!(decoded[0].timestamp, 1_700_000_000_500);
            assert_eq!(decoded[1].timestamp, 1_700_000_000_000);
            assert_eq!(decoded[1].key, None);
            assert_eq!(
                (
                    decoded[0].producer_id,
                    decoded[0].producer_epoch,
                    decoded[0].sequence
                ),
                (7, 1, 40)
            );
            // And this file reads back all four headers, in order.
            let again = batch_from_kafka(kafka, &config(TopicConfigPatch::default()), 0).unwrap();
            let back: Vec<Record> = again
                .as_record_batch()
                .to_records()
                .unwrap()
                .into_iter()
                .map(|r| r.record)
                .collect();
            assert_eq!(back, records, "{codec:?}");
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
        // A record whose length runs past the section, under a valid CRC.
        let mut lying = sample();
        lying.truncate(1);
        let mut bytes = encode(&lying, KafkaCompression::None).to_vec();
        bytes[BATCH_HEADER_LEN] = 0x7e; // zigzag 63: longer than the record
        let crc = crc32c::crc32c(&bytes[ATTRIBUTES_AT..]);
        bytes[CRC_AT..ATTRIBUTES_AT].copy_from_slice(&crc.to_be_bytes());
        let e = batch_from_kafka(bytes.into(), &config, 0).unwrap_err();
        assert_eq!(e.code, KafkaCode::CorruptMessage, "{}", e.message);
        assert!(e.message.contains("record 0"), "{}", e.message);
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
