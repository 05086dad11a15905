//! Records as the client hands them in and gets them back.

use bytes::Bytes;
use sluice_proto::v1;

/// A header: a UTF-8 key and a binary value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub key: String,
    pub value: Bytes,
}

/// A record to produce.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    /// Milliseconds since the epoch; 0 lets the broker stamp it.
    pub timestamp_ms: i64,
    /// Send to this partition instead of routing by key.
    pub partition: Option<u32>,
}

impl Record {
    pub fn new(value: impl Into<Bytes>) -> Self {
        Record {
            value: value.into(),
            ..Record::default()
        }
    }

    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<Bytes>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = timestamp_ms;
        self
    }

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
    pub partition: u32,
    pub offset: u64,
}

/// A record read from a topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub key: Option<Bytes>,
    pub value: Bytes,
    pub headers: Vec<Header>,
    pub timestamp_ms: i64,
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
        }
    }
}
