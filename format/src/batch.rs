//! The record batch: Sluice's unit of append, checksum and indexing.
//!
//! This module owns the byte layout of a batch and nothing else: it encodes
//! records into a batch, validates a batch it is handed, and decodes records
//! out of it without copying their keys and values (they are `Bytes` slices
//! of whatever buffer held the batch, the segment's memory map included).
//!
//! # Layout (little-endian)
//!
//! ```text
//! off len field
//!   0   4 magic            "SLB1"; zero or anything else ends a log
//!   4   4 length           bytes after this field; at least 48 (the rest of
//!                          the header)
//!   8   8 base_offset      offset of the first record, stamped by the log
//!  16   4 crc              crc32 (crc32fast) over bytes 20..8+length
//!  20   2 attributes       bits 0-2 compression (0 = none), bit 4 control
//!  22   2 producer_epoch
//!  24   4 record_count     > 0
//!  28   8 first_timestamp  ms since the epoch, of the first record
//!  36   8 max_timestamp    the largest record timestamp in the batch
//!  44   8 producer_id      NO_PRODUCER_ID when not idempotent
//!  52   4 base_sequence    NO_SEQUENCE when not idempotent
//!  56     records
//!
//! record: length uvarint (of what follows)
//!         offset_delta uvarint | timestamp_delta varint (from first_timestamp)
//!         key_len varint (-1 = null) | key | value_len uvarint | value
//!         header_count uvarint | { key_len uvarint | key (UTF-8) | value_len uvarint | value }*
//! ```
//!
//! `base_offset` sits in front of the checksummed range, as in Kafka's
//! `DefaultRecordBatch`: a batch is encoded (and checksummed) before the log
//! knows where it goes, and the log stamps the offset under its write lock
//! without recomputing a CRC over the whole batch. Recovery still catches a
//! damaged base offset, because each batch's offset must continue the chain.
//!
//! # Compression
//!
//! Attribute bits 0-2 name the codec of the records section (see
//! [`crate::compression`]). A compressed batch stores one lz4 or zstd frame
//! where the records would be; `length` and `crc` cover what is stored,
//! and every header field keeps its meaning. Readers ([`RecordBatch::records`],
//! [`RecordBatch::walk`]) decompress transparently; nothing that only needs
//! the header (recovery, the index, idempotence) ever does.

use bytes::{Bytes, BytesMut};

use crate::compression::{
    ATTR_COMPRESSION_MASK, Compression, CompressionError, MAX_RECORDS_SECTION,
};
use crate::varint::{get_uvarint, get_varint, put_uvarint, put_varint, uvarint_len, varint_len};

/// "SLB1" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"SLB1");
/// Bytes of fixed header in front of the records.
pub const HEADER_LEN: usize = 56;
/// `magic` and `length`: the part of the header not counted by `length`.
pub const LENGTH_PREFIX_LEN: usize = 8;
/// Producer id of a batch written without idempotence.
pub const NO_PRODUCER_ID: u64 = u64::MAX;
/// Producer epoch of a batch written without idempotence.
pub const NO_PRODUCER_EPOCH: u16 = u16::MAX;
/// Base sequence of a batch written without idempotence.
pub const NO_SEQUENCE: i32 = -1;
/// Attribute bit: the batch carries control records, not user data.
pub const ATTR_CONTROL: u16 = 1 << 4;

const OFF_MAGIC: usize = 0;
const OFF_LENGTH: usize = 4;
const OFF_BASE_OFFSET: usize = 8;
const OFF_CRC: usize = 16;
/// Where the base offset sits: outside the checksummed range, so the log can
/// stamp it without touching the checksum.
pub const BASE_OFFSET_RANGE: std::ops::Range<usize> = OFF_BASE_OFFSET..OFF_CRC;
/// The checksum covers everything from here to the end of the batch.
pub const CRC_FROM: usize = 20;
const OFF_ATTRIBUTES: usize = 20;
const OFF_PRODUCER_EPOCH: usize = 22;
const OFF_RECORD_COUNT: usize = 24;
const OFF_FIRST_TIMESTAMP: usize = 28;
const OFF_MAX_TIMESTAMP: usize = 36;
const OFF_PRODUCER_ID: usize = 44;
const OFF_BASE_SEQUENCE: usize = 52;

/// Why a byte range is not a valid batch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch truncated: need {needed} bytes, have {available}")]
    Truncated { needed: usize, available: usize },
    #[error("bad batch magic {0:#010x}")]
    BadMagic(u32),
    #[error("bad batch length {0}")]
    BadLength(u32),
    #[error("batch checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    CrcMismatch { stored: u32, computed: u32 },
    #[error("batch holds no records")]
    Empty,
    #[error("record {index} of the batch is malformed: {reason}")]
    MalformedRecord { index: u32, reason: &'static str },
    #[error("batch has {0} bytes after its last record")]
    TrailingBytes(usize),
    #[error(transparent)]
    Compression(#[from] CompressionError),
}

/// A header (key/value pair) attached to a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Bytes,
}

/// A record as a producer hands it in: no offset yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
}

/// A record read back from the log, with the offset it was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    pub offset: u64,
    pub record: Record,
}

/// Who wrote a batch, for idempotent producers. `ProducerInfo::NONE` otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProducerInfo {
    pub producer_id: u64,
    pub epoch: u16,
    pub base_sequence: i32,
}

impl ProducerInfo {
    pub const NONE: ProducerInfo = ProducerInfo {
        producer_id: NO_PRODUCER_ID,
        epoch: NO_PRODUCER_EPOCH,
        base_sequence: NO_SEQUENCE,
    };
}

impl Default for ProducerInfo {
    fn default() -> Self {
        Self::NONE
    }
}

/// The fixed part of a batch, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    /// The `length` field: bytes after the magic and length fields.
    pub length: u32,
    pub crc: u32,
    pub attributes: u16,
    pub record_count: u32,
    pub first_timestamp: i64,
    pub max_timestamp: i64,
    pub producer: ProducerInfo,
}

impl BatchHeader {
    /// Bytes the whole batch occupies, header included.
    #[inline]
    pub fn total_len(&self) -> usize {
        LENGTH_PREFIX_LEN + self.length as usize
    }

    /// Offset of the last record in the batch.
    #[inline]
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count) - 1
    }

    /// The offset after this batch.
    #[inline]
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    /// The codec of the records section, from the attributes.
    pub fn compression(&self) -> Result<Compression, BatchError> {
        Ok(Compression::from_attributes(self.attributes)?)
    }

    /// Whether the batch holds control records rather than user data.
    pub fn is_control(&self) -> bool {
        self.attributes & ATTR_CONTROL != 0
    }

    /// Parses and sanity-checks the fixed header at the front of `buf`,
    /// without looking at the checksum. Rejects a zero or foreign magic, a
    /// length too small to hold the header, a length running past `buf`, and
    /// an empty batch: a zeroed region is never taken for a batch.
    pub fn parse(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        if buf.len() < HEADER_LEN {
            return Err(BatchError::Truncated {
                needed: HEADER_LEN,
                available: buf.len(),
            });
        }
        let magic = read_u32(buf, OFF_MAGIC);
        if magic != MAGIC {
            return Err(BatchError::BadMagic(magic));
        }
        let length = read_u32(buf, OFF_LENGTH);
        if (length as usize) < HEADER_LEN - LENGTH_PREFIX_LEN {
            return Err(BatchError::BadLength(length));
        }
        let total = LENGTH_PREFIX_LEN + length as usize;
        if total > buf.len() {
            return Err(BatchError::Truncated {
                needed: total,
                available: buf.len(),
            });
        }
        let record_count = read_u32(buf, OFF_RECORD_COUNT);
        if record_count == 0 {
            return Err(BatchError::Empty);
        }
        Ok(BatchHeader {
            base_offset: read_u64(buf, OFF_BASE_OFFSET),
            length,
            crc: read_u32(buf, OFF_CRC),
            attributes: read_u16(buf, OFF_ATTRIBUTES),
            record_count,
            first_timestamp: read_u64(buf, OFF_FIRST_TIMESTAMP) as i64,
            max_timestamp: read_u64(buf, OFF_MAX_TIMESTAMP) as i64,
            producer: ProducerInfo {
                producer_id: read_u64(buf, OFF_PRODUCER_ID),
                epoch: read_u16(buf, OFF_PRODUCER_EPOCH),
                base_sequence: read_u32(buf, OFF_BASE_SEQUENCE) as i32,
            },
        })
    }

    /// Parses the header and verifies the checksum of the whole batch.
    pub fn parse_checked(buf: &[u8]) -> Result<BatchHeader, BatchError> {
        let header = Self::parse(buf)?;
        let computed = crc32fast::hash(&buf[CRC_FROM..header.total_len()]);
        if computed != header.crc {
            return Err(BatchError::CrcMismatch {
                stored: header.crc,
                computed,
            });
        }
        Ok(header)
    }
}

/// Accumulates records into one encoded batch.
///
/// The header is written by [`BatchBuilder::finish`], which also computes the
/// checksum; the base offset is left at zero for the log to stamp.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    record_count: u32,
    first_timestamp: i64,
    max_timestamp: i64,
    attributes: u16,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl BatchBuilder {
    /// A builder whose buffer has room for `bytes` of records up front.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(HEADER_LEN + bytes);
        buf.resize(HEADER_LEN, 0);
        BatchBuilder {
            buf,
            record_count: 0,
            first_timestamp: 0,
            max_timestamp: i64::MIN,
            attributes: 0,
        }
    }

    /// Marks the batch as holding control records.
    pub fn control(mut self) -> Self {
        self.attributes |= ATTR_CONTROL;
        self
    }

    pub fn record_count(&self) -> u32 {
        self.record_count
    }

    pub fn is_empty(&self) -> bool {
        self.record_count == 0
    }

    /// Bytes the batch would take if finished now.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Bytes one more record would add to the batch.
    pub fn record_encoded_len(&self, record: &Record) -> usize {
        let first = if self.record_count == 0 {
            record.timestamp
        } else {
            self.first_timestamp
        };
        let body = record_body_len(
            self.record_count,
            record.timestamp.wrapping_sub(first),
            record,
        );
        uvarint_len(body as u64) + body
    }

    /// Appends a record.
    pub fn push(&mut self, record: &Record) {
        if self.record_count == 0 {
            self.first_timestamp = record.timestamp;
        }
        let offset_delta = self.record_count;
        let timestamp_delta = record.timestamp.wrapping_sub(self.first_timestamp);
        let body = record_body_len(offset_delta, timestamp_delta, record);
        let buf = &mut self.buf;
        buf.reserve(uvarint_len(body as u64) + body);
        put_uvarint(buf, body as u64);
        put_uvarint(buf, u64::from(offset_delta));
        put_varint(buf, timestamp_delta);
        match &record.key {
            Some(key) => {
                put_varint(buf, key.len() as i64);
                buf.extend_from_slice(key);
            }
            None => put_varint(buf, -1),
        }
        put_uvarint(buf, record.value.len() as u64);
        buf.extend_from_slice(&record.value);
        put_uvarint(buf, record.headers.len() as u64);
        for header in &record.headers {
            put_uvarint(buf, header.key.len() as u64);
            buf.extend_from_slice(header.key.as_bytes());
            put_uvarint(buf, header.value.len() as u64);
            buf.extend_from_slice(&header.value);
        }
        self.record_count += 1;
        self.max_timestamp = self.max_timestamp.max(record.timestamp);
    }

    /// Writes the header and checksum. Panics on an empty builder: an empty
    /// batch cannot be told from a zeroed region, so it must never be built.
    pub fn finish(self, producer: ProducerInfo) -> EncodedBatch {
        self.finish_compressed(producer, Compression::None)
    }

    /// Like [`BatchBuilder::finish`], with the records section compressed
    /// by `codec` (none keeps the records as they are).
    pub fn finish_compressed(self, producer: ProducerInfo, codec: Compression) -> EncodedBatch {
        let packed = (codec != Compression::None).then(|| codec.compress(&self.buf[HEADER_LEN..]));
        self.finish_with(producer, codec, packed)
    }

    /// Like [`BatchBuilder::finish_compressed`], but keeps the records
    /// section as it is (codec none) when `codec` would not make it
    /// smaller: what a producer sends, so that incompressible records cost
    /// neither the broker nor a reader a decompression.
    pub fn finish_if_smaller(self, producer: ProducerInfo, codec: Compression) -> EncodedBatch {
        if codec == Compression::None {
            return self.finish_with(producer, codec, None);
        }
        let packed = codec.compress(&self.buf[HEADER_LEN..]);
        if packed.len() < self.buf.len() - HEADER_LEN {
            self.finish_with(producer, codec, Some(packed))
        } else {
            self.finish_with(producer, Compression::None, None)
        }
    }

    /// Writes the header in front of the records, or in front of `packed`
    /// (the records section compressed by `codec`) in their place.
    fn finish_with(
        self,
        producer: ProducerInfo,
        codec: Compression,
        packed: Option<Vec<u8>>,
    ) -> EncodedBatch {
        assert!(self.record_count > 0, "a batch needs at least one record");
        let mut buf = self.buf;
        if let Some(packed) = packed {
            buf.truncate(HEADER_LEN);
            buf.extend_from_slice(&packed);
        }
        let attributes = (self.attributes & !ATTR_COMPRESSION_MASK) | codec.attribute_bits();
        let length =
            u32::try_from(buf.len() - LENGTH_PREFIX_LEN).expect("a batch is smaller than 4 GiB");
        write_u32(&mut buf, OFF_MAGIC, MAGIC);
        write_u32(&mut buf, OFF_LENGTH, length);
        write_u64(&mut buf, OFF_BASE_OFFSET, 0);
        write_u16(&mut buf, OFF_ATTRIBUTES, attributes);
        write_u16(&mut buf, OFF_PRODUCER_EPOCH, producer.epoch);
        write_u32(&mut buf, OFF_RECORD_COUNT, self.record_count);
        write_u64(&mut buf, OFF_FIRST_TIMESTAMP, self.first_timestamp as u64);
        write_u64(&mut buf, OFF_MAX_TIMESTAMP, self.max_timestamp as u64);
        write_u64(&mut buf, OFF_PRODUCER_ID, producer.producer_id);
        write_u32(&mut buf, OFF_BASE_SEQUENCE, producer.base_sequence as u32);
        let crc = crc32fast::hash(&buf[CRC_FROM..]);
        write_u32(&mut buf, OFF_CRC, crc);
        let header = BatchHeader::parse(&buf).expect("a freshly built batch parses");
        EncodedBatch {
            bytes: Bytes::from(buf),
            header,
        }
    }

    /// Encodes `records` into one batch.
    pub fn encode(records: &[Record], producer: ProducerInfo) -> EncodedBatch {
        Self::encode_compressed(records, producer, Compression::None)
    }

    /// Encodes `records` into one batch compressed by `codec`.
    pub fn encode_compressed(
        records: &[Record],
        producer: ProducerInfo,
        codec: Compression,
    ) -> EncodedBatch {
        let mut builder =
            BatchBuilder::with_capacity(records.iter().map(|r| r.value.len() + 16).sum::<usize>());
        for record in records {
            builder.push(record);
        }
        builder.finish_compressed(producer, codec)
    }
}

fn record_body_len(offset_delta: u32, timestamp_delta: i64, record: &Record) -> usize {
    let key = match &record.key {
        Some(key) => varint_len(key.len() as i64) + key.len(),
        None => varint_len(-1),
    };
    let headers: usize = record
        .headers
        .iter()
        .map(|h| {
            uvarint_len(h.key.len() as u64)
                + h.key.len()
                + uvarint_len(h.value.len() as u64)
                + h.value.len()
        })
        .sum();
    uvarint_len(u64::from(offset_delta))
        + varint_len(timestamp_delta)
        + key
        + uvarint_len(record.value.len() as u64)
        + record.value.len()
        + uvarint_len(record.headers.len() as u64)
        + headers
}

/// A complete, checksummed batch ready to append. Its base offset is
/// whatever it was encoded with; the log stamps the real one.
#[derive(Debug, Clone)]
pub struct EncodedBatch {
    bytes: Bytes,
    header: BatchHeader,
}

impl EncodedBatch {
    /// Takes a batch someone else encoded, verifying its structure and
    /// checksum, and that `bytes` holds exactly one batch.
    pub fn from_bytes(bytes: Bytes) -> Result<EncodedBatch, BatchError> {
        let header = BatchHeader::parse_checked(&bytes)?;
        if header.total_len() != bytes.len() {
            return Err(BatchError::TrailingBytes(bytes.len() - header.total_len()));
        }
        Ok(EncodedBatch { bytes, header })
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub fn record_count(&self) -> u32 {
        self.header.record_count
    }

    /// The batch as a reader sees it (a cheap handle on the same bytes).
    pub fn as_record_batch(&self) -> RecordBatch {
        RecordBatch {
            header: self.header,
            bytes: self.bytes.clone(),
        }
    }

    /// The batch's bytes, handed over without a copy.
    pub fn into_bytes(self) -> Bytes {
        self.bytes
    }
}

/// Writes `base_offset` into an encoded batch in place (the field is outside
/// the checksum).
#[inline]
fn stamp_base_offset(batch: &mut [u8], base_offset: u64) {
    write_u64(batch, OFF_BASE_OFFSET, base_offset);
}

/// A validated batch: header checked, checksum verified. Records decode
/// lazily from it as zero-copy slices.
#[derive(Debug, Clone)]
pub struct RecordBatch {
    header: BatchHeader,
    bytes: Bytes,
}

impl RecordBatch {
    /// Validates the batch at the front of `bytes` (checksum included) and
    /// returns it with the bytes that follow it.
    pub fn decode_front(bytes: &Bytes) -> Result<(RecordBatch, Bytes), BatchError> {
        let header = BatchHeader::parse_checked(bytes)?;
        let total = header.total_len();
        Ok((
            RecordBatch {
                header,
                bytes: bytes.slice(..total),
            },
            bytes.slice(total..),
        ))
    }

    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The records section, decompressed if the batch is compressed (a
    /// zero-copy slice if it is not).
    pub fn records_section(&self) -> Result<Bytes, BatchError> {
        let stored = self.bytes.slice(HEADER_LEN..);
        match self.header.compression()? {
            Compression::None => Ok(stored),
            codec => Ok(Bytes::from(codec.decompress(&stored, MAX_RECORDS_SECTION)?)),
        }
    }

    /// The records, in offset order. A compressed batch is decompressed
    /// first; a batch that does not decompress yields that error.
    pub fn records(&self) -> RecordIter {
        match self.records_section() {
            Ok(rest) => RecordIter {
                header: self.header,
                rest,
                index: 0,
                failed: None,
            },
            Err(e) => RecordIter {
                header: self.header,
                rest: Bytes::new(),
                index: self.header.record_count,
                failed: Some(e),
            },
        }
    }

    /// Decodes every record, or reports the first malformed one.
    pub fn to_records(&self) -> Result<Vec<StoredRecord>, BatchError> {
        self.records().collect()
    }

    /// Checks every record of the batch without building any, handing each
    /// one, borrowed, to `visit`: the record count must match the records
    /// present, each record must be well formed (offset deltas in order,
    /// lengths inside the batch, header keys UTF-8) and nothing may follow
    /// the last one. The first error, the batch's or `visit`'s, ends it.
    pub fn walk<E: From<BatchError>>(
        &self,
        mut visit: impl FnMut(&RecordView<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let section = self.records_section()?;
        let mut rest: &[u8] = &section;
        for index in 0..self.header.record_count {
            let (view, after) = parse_record(rest, index)?;
            visit(&view)?;
            rest = after;
        }
        if !rest.is_empty() {
            return Err(BatchError::TrailingBytes(rest.len()).into());
        }
        Ok(())
    }
}

/// Iterates the records of a [`RecordBatch`]. After the last record it
/// checks that nothing is left over.
#[derive(Debug)]
pub struct RecordIter {
    header: BatchHeader,
    rest: Bytes,
    index: u32,
    /// The records section could not be had (it does not decompress).
    failed: Option<BatchError>,
}

impl Iterator for RecordIter {
    type Item = Result<StoredRecord, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.failed.take() {
            return Some(Err(e));
        }
        if self.index >= self.header.record_count {
            if !self.rest.is_empty() {
                let left = self.rest.len();
                self.rest.clear();
                return Some(Err(BatchError::TrailingBytes(left)));
            }
            return None;
        }
        let index = self.index;
        self.index += 1;
        let result = parse_record(&self.rest, index).map(|(view, after)| {
            let record = view.into_stored(&self.header, &self.rest);
            let consumed = self.rest.len() - after.len();
            (record, consumed)
        });
        match result {
            Ok((record, consumed)) => {
                self.rest = self.rest.slice(consumed..);
                Some(Ok(record))
            }
            Err(e) => {
                // Stop after the first error; the rest is not trustworthy.
                self.index = self.header.record_count;
                self.rest.clear();
                Some(Err(e))
            }
        }
    }
}

/// One record of a batch, borrowed from the records section and already
/// checked: what [`RecordBatch::walk`] hands out.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// Position in the batch: 0 for the first record.
    pub offset_delta: u32,
    /// Milliseconds from the batch's `first_timestamp`.
    pub timestamp_delta: i64,
    pub key: Option<&'a [u8]>,
    pub value: &'a [u8],
    header_count: usize,
    /// The encoded headers, checked when the view was made.
    headers: &'a [u8],
}

impl<'a> RecordView<'a> {
    /// The record's timestamp, given its batch's header.
    pub fn timestamp(&self, header: &BatchHeader) -> i64 {
        header.first_timestamp.wrapping_add(self.timestamp_delta)
    }

    pub fn header_count(&self) -> usize {
        self.header_count
    }

    /// The headers, in order.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let mut cursor = Cursor {
            buf: self.headers,
            pos: 0,
        };
        (0..self.header_count).map(move |_| {
            let (key, value) = cursor
                .header()
                .expect("headers were checked when the view was made");
            let key = std::str::from_utf8(key).expect("header keys were checked as UTF-8");
            (key, value)
        })
    }

    /// Key, value and header bytes: what a record carries, without framing.
    pub fn payload_len(&self) -> usize {
        self.key.map_or(0, <[u8]>::len)
            + self.value.len()
            + self
                .headers()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// The owned record, its bytes zero-copy slices of `owner` (the
    /// records section this view borrows from).
    fn into_stored(self, header: &BatchHeader, owner: &Bytes) -> StoredRecord {
        StoredRecord {
            offset: header.base_offset + u64::from(self.offset_delta),
            record: Record {
                key: self.key.map(|k| owner.slice_ref(k)),
                value: owner.slice_ref(self.value),
                headers: self
                    .headers()
                    .map(|(key, value)| Header {
                        key: key.to_owned(),
                        value: owner.slice_ref(value),
                    })
                    .collect(),
                timestamp: self.timestamp(header),
            },
        }
    }
}

/// Parses and checks the record at the front of `rest`, the `index`th of
/// its batch; returns it and what follows it.
fn parse_record(rest: &[u8], index: u32) -> Result<(RecordView<'_>, &[u8]), BatchError> {
    let malformed = |reason| BatchError::MalformedRecord { index, reason };
    let (body_len, n) = get_uvarint(rest).ok_or_else(|| malformed("bad length"))?;
    let body_len = usize::try_from(body_len).map_err(|_| malformed("bad length"))?;
    if body_len > rest.len() - n {
        return Err(malformed("length past the end of the batch"));
    }
    let body = &rest[n..n + body_len];
    let after = &rest[n + body_len..];

    let mut cursor = Cursor { buf: body, pos: 0 };
    let offset_delta = cursor
        .uvarint()
        .ok_or_else(|| malformed("bad offset delta"))?;
    if offset_delta != u64::from(index) {
        return Err(malformed("offset delta out of order"));
    }
    let timestamp_delta = cursor.varint().ok_or_else(|| malformed("bad timestamp"))?;
    let key_len = cursor.varint().ok_or_else(|| malformed("bad key length"))?;
    let key = match key_len {
        -1 => None,
        len if len >= 0 => Some(
            cursor
                .take(len as u64)
                .ok_or_else(|| malformed("key past the end"))?,
        ),
        _ => return Err(malformed("negative key length")),
    };
    let value_len = cursor
        .uvarint()
        .ok_or_else(|| malformed("bad value length"))?;
    let value = cursor
        .take(value_len)
        .ok_or_else(|| malformed("value past the end"))?;
    let header_count = cursor
        .uvarint()
        .ok_or_else(|| malformed("bad header count"))?;
    // Each header takes at least two bytes: a count beyond that is corrupt.
    if header_count > (body.len() - cursor.pos) as u64 / 2 {
        return Err(malformed("header count past the end"));
    }
    let headers_from = cursor.pos;
    for _ in 0..header_count {
        let (key, _) = cursor
            .header()
            .ok_or_else(|| malformed("header past the end"))?;
        if std::str::from_utf8(key).is_err() {
            return Err(malformed("header key is not UTF-8"));
        }
    }
    if cursor.pos != body.len() {
        return Err(malformed("bytes left after the record's fields"));
    }
    Ok((
        RecordView {
            offset_delta: index,
            timestamp_delta,
            key,
            value,
            header_count: header_count as usize,
            headers: &body[headers_from..],
        },
        after,
    ))
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn uvarint(&mut self) -> Option<u64> {
        let (value, n) = get_uvarint(&self.buf[self.pos..])?;
        self.pos += n;
        Some(value)
    }

    fn varint(&mut self) -> Option<i64> {
        let (value, n) = get_varint(&self.buf[self.pos..])?;
        self.pos += n;
        Some(value)
    }

    /// The next `len` bytes.
    fn take(&mut self, len: u64) -> Option<&'a [u8]> {
        let len = usize::try_from(len).ok()?;
        if len > self.buf.len() - self.pos {
            return None;
        }
        let slice = &self.buf[self.pos..self.pos + len];
        self.pos += len;
        Some(slice)
    }

    /// One header: key and value.
    fn header(&mut self) -> Option<(&'a [u8], &'a [u8])> {
        let key_len = self.uvarint()?;
        let key = self.take(key_len)?;
        let value_len = self.uvarint()?;
        let value = self.take(value_len)?;
        Some((key, value))
    }
}

/// Walks the batches of a chunk read from the log, validating each one.
#[derive(Debug, Clone)]
pub struct BatchIter {
    rest: Bytes,
}

impl BatchIter {
    pub fn new(chunk: Bytes) -> Self {
        BatchIter { rest: chunk }
    }
}

impl Iterator for BatchIter {
    type Item = Result<RecordBatch, BatchError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match RecordBatch::decode_front(&self.rest) {
            Ok((batch, rest)) => {
                self.rest = rest;
                Some(Ok(batch))
            }
            Err(e) => {
                self.rest.clear();
                Some(Err(e))
            }
        }
    }
}

/// Decodes every record of every batch in `chunk` with an offset at or after
/// `from` (a read starts at the batch holding `from`, which may begin earlier).
pub fn decode_records(chunk: Bytes, from: u64) -> Result<Vec<StoredRecord>, BatchError> {
    let mut out = Vec::new();
    for batch in BatchIter::new(chunk) {
        let batch = batch?;
        if batch.header().last_offset() < from {
            continue;
        }
        for record in batch.records() {
            let record = record?;
            if record.offset >= from {
                out.push(record);
            }
        }
    }
    Ok(out)
}

#[inline]
fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([buf[at], buf[at + 1]])
}

#[inline]
fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

#[inline]
fn read_u64(buf: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"))
}

#[inline]
fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_le_bytes());
}

#[inline]
fn write_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_le_bytes());
}

#[inline]
fn write_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

/// Copies an encoded batch into a fresh buffer with `base_offset` stamped,
/// for callers that need an owned, offset-bearing copy (tests, benches).
pub fn stamped_copy(batch: &EncodedBatch, base_offset: u64) -> Bytes {
    let mut buf = BytesMut::from(batch.as_bytes());
    stamp_base_offset(&mut buf, base_offset);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_records() -> Vec<Record> {
        vec![
            Record {
                key: Some(Bytes::from_static(b"user-1")),
                value: Bytes::from_static(b"created"),
                headers: vec![Header {
                    key: "trace".into(),
                    value: Bytes::from_static(b"abc"),
                }],
                timestamp: 1_700_000_000_000,
            },
            Record {
                key: None,
                value: Bytes::new(),
                headers: vec![],
                // Out of order on purpose: deltas are signed.
                timestamp: 1_699_999_999_000,
            },
            Record {
                key: Some(Bytes::new()),
                value: Bytes::from(vec![7u8; 3000]),
                headers: vec![
                    Header {
                        key: String::new(),
                        value: Bytes::new(),
                    },
                    Header {
                        key: "ünïcödé".into(),
                        value: Bytes::from_static(b"\x00\xff"),
                    },
                ],
                timestamp: 1_700_000_000_500,
            },
        ]
    }

    fn producer() -> ProducerInfo {
        ProducerInfo {
            producer_id: 42,
            epoch: 3,
            base_sequence: 17,
        }
    }

    #[test]
    fn round_trip_preserves_records_and_header() {
        let records = sample_records();
        let batch = BatchBuilder::encode(&records, producer());
        let stamped = stamped_copy(&batch, 1000);
        let (decoded, rest) = RecordBatch::decode_front(&stamped).unwrap();
        assert!(rest.is_empty());
        let h = decoded.header();
        assert_eq!(h.base_offset, 1000);
        assert_eq!(h.record_count, 3);
        assert_eq!(h.first_timestamp, 1_700_000_000_000);
        assert_eq!(h.max_timestamp, 1_700_000_000_500);
        assert_eq!(h.producer, producer());
        assert_eq!(h.last_offset(), 1002);
        let got = decoded.to_records().unwrap();
        let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, vec![1000, 1001, 1002]);
        let got: Vec<Record> = got.into_iter().map(|r| r.record).collect();
        assert_eq!(got, records);
    }

    #[test]
    fn encoded_len_predictions_match() {
        let mut builder = BatchBuilder::default();
        for record in sample_records() {
            let before = builder.encoded_len();
            let predicted = builder.record_encoded_len(&record);
            builder.push(&record);
            assert_eq!(builder.encoded_len() - before, predicted);
        }
        let expected = builder.encoded_len();
        assert_eq!(builder.finish(ProducerInfo::NONE).len(), expected);
    }

    #[test]
    fn stamping_the_offset_keeps_the_checksum_valid() {
        let batch = BatchBuilder::encode(&sample_records(), ProducerInfo::NONE);
        for base in [0, 1, u64::MAX - 10] {
            let stamped = stamped_copy(&batch, base);
            assert_eq!(
                BatchHeader::parse_checked(&stamped).unwrap().base_offset,
                base
            );
        }
    }

    /// Flipping any single bit of the checksummed range, or of the magic or
    /// length, must be detected.
    #[test]
    fn every_corrupt_byte_position_is_detected() {
        let batch = BatchBuilder::encode(&sample_records(), producer());
        let good = stamped_copy(&batch, 5);
        for pos in 0..good.len() {
            if (OFF_BASE_OFFSET..OFF_CRC).contains(&pos) {
                // Outside the checksum by design; the log's offset chain
                // guards it (see storage::segment recovery tests).
                continue;
            }
            for bit in [0x01u8, 0x80] {
                let mut bad = good.to_vec();
                bad[pos] ^= bit;
                let bad = Bytes::from(bad);
                let result = RecordBatch::decode_front(&bad);
                assert!(
                    result.is_err(),
                    "flip of bit {bit:#x} at byte {pos} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn truncation_at_every_length_is_detected() {
        let good = stamped_copy(&BatchBuilder::encode(&sample_records(), producer()), 0);
        for len in 0..good.len() {
            assert!(
                BatchHeader::parse_checked(&good[..len]).is_err(),
                "a batch cut to {len} bytes parsed"
            );
        }
    }

    #[test]
    fn zeroed_header_is_never_a_batch() {
        let zeros = vec![0u8; 4096];
        assert_eq!(BatchHeader::parse(&zeros), Err(BatchError::BadMagic(0)));
        // Even with the magic in place, a zero length or count is refused.
        let mut fake = zeros.clone();
        fake[..4].copy_from_slice(&MAGIC.to_le_bytes());
        assert_eq!(BatchHeader::parse(&fake), Err(BatchError::BadLength(0)));
        fake[4..8].copy_from_slice(&((HEADER_LEN - 8) as u32).to_le_bytes());
        assert_eq!(BatchHeader::parse(&fake), Err(BatchError::Empty));
    }

    #[test]
    fn malformed_records_under_a_valid_checksum_are_errors_not_panics() {
        // Build a batch, then lie about the record count and re-checksum: the
        // record walk must report it rather than read out of bounds.
        let batch = BatchBuilder::encode(&sample_records(), ProducerInfo::NONE);
        for count in [1u32, 2, 4, 1000] {
            let mut bytes = batch.as_bytes().to_vec();
            write_u32(&mut bytes, OFF_RECORD_COUNT, count);
            let crc = crc32fast::hash(&bytes[CRC_FROM..]);
            write_u32(&mut bytes, OFF_CRC, crc);
            let bytes = Bytes::from(bytes);
            let (decoded, _) = RecordBatch::decode_front(&bytes).unwrap();
            assert!(decoded.to_records().is_err(), "count {count} accepted");
        }
    }

    #[test]
    fn compressed_batches_round_trip_and_keep_their_header() {
        let records = sample_records();
        let plain = BatchBuilder::encode(&records, producer());
        for codec in Compression::ALL {
            let batch = BatchBuilder::encode_compressed(&records, producer(), codec);
            let h = *batch.header();
            assert_eq!(h.compression().unwrap(), codec);
            assert_eq!(h.record_count, 3);
            assert_eq!(h.producer, producer());
            assert_eq!(h.max_timestamp, plain.header().max_timestamp);
            let stamped = stamped_copy(&batch, 7);
            let (decoded, _) = RecordBatch::decode_front(&stamped).unwrap();
            let got: Vec<Record> = decoded
                .to_records()
                .unwrap()
                .into_iter()
                .map(|r| r.record)
                .collect();
            assert_eq!(got, records, "{codec}");
            assert_eq!(
                decoded.records_section().unwrap(),
                plain.as_bytes()[HEADER_LEN..],
                "{codec}: the records section decompresses to the plain one"
            );
        }
    }

    #[test]
    fn a_codec_is_kept_only_where_it_makes_the_batch_smaller() {
        let compressible: Vec<Record> = (0..50)
            .map(|i| Record {
                value: Bytes::from(format!("{{\"order\":{i},\"state\":\"paid\"}}")),
                timestamp: 1_000 + i,
                ..Record::default()
            })
            .collect();
        // An xorshift stream: bytes no codec can shrink.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        let incompressible = vec![Record {
            value: Bytes::from(noise),
            timestamp: 1_000,
            ..Record::default()
        }];
        for codec in [Compression::Lz4, Compression::Zstd] {
            let build = |records: &[Record]| {
                let mut builder = BatchBuilder::default();
                for record in records {
                    builder.push(record);
                }
                builder.finish_if_smaller(producer(), codec)
            };
            let packed = build(&compressible);
            assert_eq!(packed.header().compression(), Ok(codec));
            assert!(
                packed.as_bytes().len()
                    < BatchBuilder::encode(&compressible, producer())
                        .as_bytes()
                        .len()
            );
            let plain = build(&incompressible);
            assert_eq!(
                plain.header().compression(),
                Ok(Compression::None),
                "{codec}"
            );
            assert_eq!(
                plain.as_bytes(),
                BatchBuilder::encode(&incompressible, producer()).as_bytes()
            );
        }
    }

    #[test]
    fn walk_sees_every_record_and_refuses_what_decoding_refuses() {
        let records = sample_records();
        for codec in Compression::ALL {
            let batch = BatchBuilder::encode_compressed(&records, producer(), codec);
            let view = batch.as_record_batch();
            let mut seen = Vec::new();
            view.walk(|r| {
                seen.push((
                    r.offset_delta,
                    r.timestamp(view.header()),
                    r.key.map(<[u8]>::to_vec),
                    r.value.len(),
                    r.headers()
                        .map(|(k, v)| (k.to_owned(), v.to_vec()))
                        .collect::<Vec<_>>(),
                    r.payload_len(),
                ));
                Ok::<(), BatchError>(())
            })
            .unwrap();
            let expected: Vec<_> = records
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        i as u32,
                        r.timestamp,
                        r.key.as_ref().map(|k| k.to_vec()),
                        r.value.len(),
                        r.headers
                            .iter()
                            .map(|h| (h.key.clone(), h.value.to_vec()))
                            .collect::<Vec<_>>(),
                        r.key.as_ref().map_or(0, |k| k.len())
                            + r.value.len()
                            + r.headers
                                .iter()
                                .map(|h| h.key.len() + h.value.len())
                                .sum::<usize>(),
                    )
                })
                .collect();
            assert_eq!(seen, expected, "{codec}");
        }
        // A count that lies, re-checksummed: the walk refuses it too.
        let batch = BatchBuilder::encode(&records, ProducerInfo::NONE);
        for count in [1u32, 2, 4] {
            let mut bytes = batch.as_bytes().to_vec();
            write_u32(&mut bytes, OFF_RECORD_COUNT, count);
            let crc = crc32fast::hash(&bytes[CRC_FROM..]);
            write_u32(&mut bytes, OFF_CRC, crc);
            let batch = EncodedBatch::from_bytes(Bytes::from(bytes)).unwrap();
            assert!(
                batch
                    .as_record_batch()
                    .walk(|_| Ok::<(), BatchError>(()))
                    .is_err(),
                "count {count} accepted"
            );
        }
    }

    #[test]
    fn an_unknown_codec_or_a_broken_frame_is_an_error() {
        let batch =
            BatchBuilder::encode_compressed(&sample_records(), producer(), Compression::Lz4);
        for (attributes, damage) in [(1u16, false), (2, false), (7, false), (3, true)] {
            let mut bytes = batch.as_bytes().to_vec();
            write_u16(&mut bytes, OFF_ATTRIBUTES, attributes);
            if damage {
                let n = bytes.len();
                bytes[n - 6] ^= 0x55;
            }
            let crc = crc32fast::hash(&bytes[CRC_FROM..]);
            write_u32(&mut bytes, OFF_CRC, crc);
            let batch = EncodedBatch::from_bytes(Bytes::from(bytes)).unwrap();
            assert!(matches!(
                batch.as_record_batch().to_records(),
                Err(BatchError::Compression(_))
            ));
        }
    }

    #[test]
    fn from_bytes_rejects_trailing_data() {
        let batch = BatchBuilder::encode(&sample_records(), ProducerInfo::NONE);
        let mut bytes = batch.as_bytes().to_vec();
        bytes.push(0);
        assert_eq!(
            EncodedBatch::from_bytes(Bytes::from(bytes)).unwrap_err(),
            BatchError::TrailingBytes(1)
        );
        assert!(EncodedBatch::from_bytes(Bytes::copy_from_slice(batch.as_bytes())).is_ok());
    }
}
