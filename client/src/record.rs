//! Records as the client hands them in and gets them back.

use bytes::Bytes;
use sluice_proto::v1;

/// A header: a UTF-8 key and a binary value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The header's name.
    pub key: String,
    /// Its value.
    pub value: Bytes,
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// Routes the record: the same key goes to the same partition, in order.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<Header>,
    /// Milliseconds since the epoch; 0 lets the broker stamp it.
    pub timestamp_ms: i64,
    /// Send to this partition instead of routing by key.
    pub partition: Option<u32>,
}

impl Record {
    /// A record with this value, no key, no headers, stamped by the broker.
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    /// Sets the key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Sets the timestamp (ms since the epoch).
    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

    /// Sends the record to this partition instead of routing it by key.
    pub fn with_partition(mut self, partition: u32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Bytes this record holds in the producer's buffer.
    pub(crate) fn size(&self) -> usize {
        64 + self.key.as_ref().map_or(0, Bytes::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.len())
                .sum::<usize>()
    }

    pub(crate) fn into_proto(self) -> v1::Record {
        v1::Record {
            key: self.key,
            value: self.value,
            headers: self
                .headers
                .into_iter()
                .map(|h| v1::Header {
                    key: h.key,
                    value: h.value,
                })
                .collect(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// Where a produced record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Position {
    /// The partition it went to.
    pub partition: u32,
    /// Its offset there.
    pub offset: u64,
}

impl From<v1::RecordPosition> for Position {
    fn from(p: v1::RecordPosition) -> Self {
        Position {
            partition: p.partition,
            offset: p.offset,
        }
    }
}

/// A record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// The topic it was read from.
    pub topic: String,
    /// Its partition.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// Its key, if it has one.
    pub key: Option<Bytes>,
    /// The payload.
    pub value: Bytes,
    /// Headers, in order.
    pub headers: Vec<Header>,
    /// Milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// Which delivery this is to the group: 1 the first time, more when
    /// the broker redelivers a nacked record (a redriven dead letter
    /// starts again at 1).
    pub attempt: u32,
    /// Handed over from the group's retry set (a nacked or redriven record)
    /// rather than read from the partition: [`ack`] it once processed.
    ///
    /// [`ack`]: crate::GroupConsumer::ack
    pub redelivery: bool,
}

impl From<v1::ConsumedRecord> for ConsumedRecord {
    fn from(r: v1::ConsumedRecord) -> Self {
        ConsumedRecord {
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            key: r.key,
            value: r.value,
            headers: r
                .headers
                .into_iter()
                .map(|h| Header {
                    key: h.key,
                    value: h.value,
                })
                .collect(),
            timestamp_ms: r.timestamp_ms,
            attempt: 1,
            redelivery: false,
        }
    }
}
