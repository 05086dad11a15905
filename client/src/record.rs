//! Records as the client hands them in and gets them back, and the
//! positions in a partition that the producer reports ([`Position`]) and
//! that the consumer and the admin client read from ([`StartFrom`]). It is
//! below both: `admin` and `consumer` take their shared types from here.

use bytes::Bytes;
use sluice_proto::trace::{TRACEPARENT, TraceParent};
use sluice_proto::v1;

/// A header: a UTF-8 key and a binary value. The batch format's own type,
/// so a record's headers go into a batch and come out of one as they are.
pub use sluice_format::Header;

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

    /// Stamps a W3C trace context into the record's `traceparent` header
    /// (replacing one already there), so that whoever consumes the record
    /// can continue the trace ([`ConsumedRecord::trace_parent`]).
    pub fn with_trace_parent(mut self, parent: TraceParent) -> Self {
        self.headers.retain(|h| h.key != TRACEPARENT);
        self.with_header(TRACEPARENT, parent.to_string())
    }

    /// Stamps the current OpenTelemetry context's span as the record's
    /// `traceparent` (feature `otel`); a record made outside a valid span
    /// is left as it is.
    #[cfg(feature = "otel")]
    pub fn with_current_trace_context(self) -> Self {
        use opentelemetry::trace::TraceContextExt;
        let context = opentelemetry::Context::current();
        let span = context.span();
        let span = span.span_context();
        if !span.is_valid() {
            return self;
        }
        self.with_trace_parent(TraceParent {
            trace_id: span.trace_id().to_bytes(),
            parent_id: span.span_id().to_bytes(),
            flags: span.trace_flags().to_u8(),
        })
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

    /// The record in the batch format, a timestamp of 0 replaced by
    /// `now_ms`: the producer stamps the time it accepted the record,
    /// because the broker writes a producer's batch as it is.
    pub(crate) fn into_format_stamped(self, now_ms: i64) -> sluice_format::Record {
        sluice_format::Record {
            key: self.key,
            value: self.value,
            headers: self.headers,
            timestamp: if self.timestamp_ms == 0 {
                now_ms
            } else {
                self.timestamp_ms
            },
        }
    }
}

/// Bytes `record` counts against a topic's `max_record_bytes`: the broker's
/// rule ([`sluice_proto::record_message_len`]).
pub(crate) fn limit_size(record: &sluice_format::Record) -> usize {
    sluice_proto::record_message_len(
        record.key.as_ref().map(Bytes::len),
        record.value.len(),
        record.headers.iter().map(|h| (h.key.len(), h.value.len())),
        record.timestamp,
    )
}

/// Where to start (or restart) reading a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFrom {
    /// The earliest record still kept.
    Earliest,
    /// Only records appended from now on.
    Latest,
    /// This offset (clamped to what the partition keeps).
    Offset(u64),
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
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

impl ConsumedRecord {
    /// The trace context its producer stamped (the last valid
    /// `traceparent` header), to continue the trace from.
    pub fn trace_parent(&self) -> Option<TraceParent> {
        self.headers
            .iter()
            .rev()
            .filter(|h| h.key == TRACEPARENT)
            .find_map(|h| TraceParent::parse(std::str::from_utf8(&h.value).ok()?))
    }
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

/// The records of `batches` (whole stored batches, as a batch-format read
/// returns them) at or after `from`, their keys, values and header values
/// slices of `batches`. A batch that fails its check is data loss up to its
/// end: the consumer stops there or, told to, skips it.
pub(crate) fn consumed_from_batches(
    topic: &str,
    partition: u32,
    batches: Bytes,
    from: u64,
) -> Result<Vec<ConsumedRecord>, crate::Error> {
    let mut out = Vec::new();
    let mut rest = batches;
    while !rest.is_empty() {
        let damaged = |error: sluice_format::BatchError, rest: &Bytes| {
            let next_offset = sluice_format::BatchHeader::parse(rest)
                .map(|header| header.next_offset())
                .unwrap_or(from);
            crate::Error::DataLoss {
                message: format!("a batch of {topic}/{partition} failed its check: {error}"),
                next_offset,
            }
        };
        let (batch, after) =
            sluice_format::RecordBatch::decode_front(&rest).map_err(|e| damaged(e, &rest))?;
        if batch.header().next_offset() > from {
            for stored in batch.records() {
                let stored = stored.map_err(|e| damaged(e, &rest))?;
                if stored.offset < from {
                    continue;
                }
                out.push(ConsumedRecord {
                    topic: topic.to_owned(),
                    partition,
                    offset: stored.offset,
                    key: stored.record.key,
                    value: stored.record.value,
                    headers: stored.record.headers,
                    timestamp_ms: stored.record.timestamp,
                    attempt: 1,
                    redelivery: false,
                });
            }
        }
        rest = after;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn consumed(record: Record) -> ConsumedRecord {
        ConsumedRecord::from(v1::ConsumedRecord {
            topic: "t".into(),
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
            timestamp_ms: record.timestamp_ms,
            ..Default::default()
        })
    }

    #[test]
    fn a_stamped_trace_parent_reaches_the_consumer() {
        let parent = TraceParent::parse(PARENT).unwrap();
        let record = Record::new("v")
            .with_header(
                TRACEPARENT,
                "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-00",
            )
            .with_trace_parent(parent);
        let headers: Vec<_> = record
            .headers
            .iter()
            .filter(|h| h.key == TRACEPARENT)
            .collect();
        assert_eq!(headers.len(), 1, "the stamp replaces an older one");
        assert_eq!(headers[0].value, PARENT.as_bytes());
        assert_eq!(consumed(record).trace_parent(), Some(parent));
        assert_eq!(consumed(Record::new("v")).trace_parent(), None);
        let bad = Record::new("v").with_header(TRACEPARENT, "not a trace");
        assert_eq!(consumed(bad).trace_parent(), None);
    }

    #[cfg(feature = "otel")]
    #[test]
    fn the_current_opentelemetry_span_is_stamped() {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        let parent = TraceParent::parse(PARENT).unwrap();
        assert_eq!(
            Record::new("v").with_current_trace_context().headers,
            vec![]
        );
        let span = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.parent_id),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _guard = opentelemetry::Context::current()
            .with_remote_span_context(span)
            .attach();
        let record = Record::new("v").with_current_trace_context();
        assert_eq!(consumed(record).trace_parent(), Some(parent));
    }
}
