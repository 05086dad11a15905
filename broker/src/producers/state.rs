//! One partition's sequence bookkeeping: the last batches of each producer.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::storage::batch::NO_PRODUCER_ID;
use crate::storage::{ByteReader, ProducerInfo};

/// Batches remembered per producer and partition: at least the client's
/// maximum of in-flight batches, so any batch a client may retry is here.
pub const MAX_CACHED_BATCHES: usize = 5;

const SNAPSHOT_MAGIC: &[u8; 4] = b"SLPS";
const SNAPSHOT_VERSION: u16 = 1;

/// A batch a producer wrote: its sequence range and where it landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedBatch {
    pub first_sequence: i32,
    pub last_sequence: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerEntry {
    epoch: u16,
    batches: VecDeque<CachedBatch>,
    last_seen_ms: i64,
}

/// What to do with an incoming batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SequenceCheck {
    /// No producer id: nothing to check.
    NotIdempotent,
    /// The next batch in sequence: write it.
    Append,
    /// A retry of a batch already written: answer with its offsets and
    /// write nothing.
    Duplicate(CachedBatch),
}

/// Why an incoming batch is refused. Nothing is written for any of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error(
        "producer {producer_id} with epoch {epoch} is fenced: epoch {current} of the \
         same producer has taken over"
    )]
    Fenced {
        producer_id: u64,
        epoch: u16,
        current: u16,
    },
    #[error(
        "out of order sequence from producer {producer_id} epoch {epoch}: expected \
         {expected}, got {got}"
    )]
    OutOfOrder {
        producer_id: u64,
        epoch: u16,
        expected: i32,
        got: i32,
    },
    #[error(
        "producer {producer_id} is unknown to this partition (its state expired or it \
         was never seen) and sent sequence {got}; initialise the producer again \
         (new epoch) and resend from sequence 0"
    )]
    UnknownProducer { producer_id: u64, got: i32 },
    #[error("batch sequence {base_sequence} of producer {producer_id} is negative")]
    InvalidSequence {
        producer_id: u64,
        base_sequence: i32,
    },
}

/// Sequences wrap from `i32::MAX` to 0, as in Kafka.
pub(crate) fn sequence_add(sequence: i32, n: u32) -> i32 {
    ((i64::from(sequence) + i64::from(n)) % (i64::from(i32::MAX) + 1)) as i32
}

/// The last batches of every producer that wrote to one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionProducers {
    producers: HashMap<u64, ProducerEntry>,
}

impl PartitionProducers {
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// Decides what to do with a batch of `record_count` records from
    /// `producer`. Changes nothing; call [`PartitionProducers::record`]
    /// once the batch is written.
    pub fn check(
        &self,
        producer: &ProducerInfo,
        record_count: u32,
    ) -> Result<SequenceCheck, SequenceError> {
        if producer.producer_id == NO_PRODUCER_ID {
            return Ok(SequenceCheck::NotIdempotent);
        }
        let (producer_id, epoch, got) =
            (producer.producer_id, producer.epoch, producer.base_sequence);
        if got < 0 {
            return Err(SequenceError::InvalidSequence {
                producer_id,
                base_sequence: got,
            });
        }
        let Some(entry) = self.producers.get(&producer_id) else {
            return if got == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(SequenceError::UnknownProducer { producer_id, got })
            };
        };
        if epoch < entry.epoch {
            return Err(SequenceError::Fenced {
                producer_id,
                epoch,
                current: entry.epoch,
            });
        }
        if epoch > entry.epoch {
            // A new epoch starts its sequences over.
            return if got == 0 {
                Ok(SequenceCheck::Append)
            } else {
                Err(SequenceError::OutOfOrder {
                    producer_id,
                    epoch,
                    expected: 0,
                    got,
                })
            };
        }
        let last_sequence = sequence_add(got, record_count - 1);
        if let Some(batch) = entry
            .batches
            .iter()
            .find(|b| b.first_sequence == got && b.last_sequence == last_sequence)
        {
            return Ok(SequenceCheck::Duplicate(*batch));
        }
        let expected = entry
            .batches
            .back()
            .map_or(0, |b| sequence_add(b.last_sequence, 1));
        if got == expected {
            Ok(SequenceCheck::Append)
        } else {
            Err(SequenceError::OutOfOrder {
                producer_id,
                epoch,
                expected,
                got,
            })
        }
    }

    /// Remembers a batch that was written at `base_offset`.
    pub fn record(
        &mut self,
        producer: &ProducerInfo,
        record_count: u32,
        base_offset: u64,
        now_ms: i64,
    ) {
        if producer.producer_id == NO_PRODUCER_ID || record_count == 0 {
            return;
        }
        let entry = self
            .producers
            .entry(producer.producer_id)
            .or_insert_with(|| ProducerEntry {
                epoch: producer.epoch,
                batches: VecDeque::with_capacity(MAX_CACHED_BATCHES),
                last_seen_ms: now_ms,
            });
        if producer.epoch != entry.epoch {
            entry.epoch = producer.epoch;
            entry.batches.clear();
        }
        if entry.batches.len() == MAX_CACHED_BATCHES {
            entry.batches.pop_front();
        }
        entry.batches.push_back(CachedBatch {
            first_sequence: producer.base_sequence,
            last_sequence: sequence_add(producer.base_sequence, record_count - 1),
            base_offset,
            last_offset: base_offset + u64::from(record_count) - 1,
        });
        entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
    }

    /// Counts every producer as seen at `now_ms` at the latest (after a
    /// restart: their idle clocks restart with the broker).
    pub fn seen_at_least(&mut self, now_ms: i64) {
        for entry in self.producers.values_mut() {
            entry.last_seen_ms = entry.last_seen_ms.max(now_ms);
        }
    }

    /// Forgets producers not seen for `max_idle`; returns how many.
    pub fn expire(&mut self, now_ms: i64, max_idle: Duration) -> usize {
        let idle_ms = i64::try_from(max_idle.as_millis()).unwrap_or(i64::MAX);
        let before = self.producers.len();
        self.producers
            .retain(|_, e| now_ms.saturating_sub(e.last_seen_ms) < idle_ms);
        before - self.producers.len()
    }

    /// Encodes the state as of `log_offset` (the log's end when taken), with
    /// a trailing CRC.
    pub fn encode_snapshot(&self, log_offset: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(SNAPSHOT_MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        out.extend_from_slice(&log_offset.to_le_bytes());
        out.extend_from_slice(&(self.producers.len() as u32).to_le_bytes());
        let mut ids: Vec<_> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let e = &self.producers[&id];
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&e.epoch.to_le_bytes());
            out.extend_from_slice(&e.last_seen_ms.to_le_bytes());
            out.push(e.batches.len() as u8);
            for b in &e.batches {
                out.extend_from_slice(&b.first_sequence.to_le_bytes());
                out.extend_from_slice(&b.last_sequence.to_le_bytes());
                out.extend_from_slice(&b.base_offset.to_le_bytes());
                out.extend_from_slice(&b.last_offset.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a snapshot: the state and the log offset it was taken at.
    pub fn decode_snapshot(bytes: &[u8]) -> Result<(u64, PartitionProducers), &'static str> {
        if bytes.len() < 4 + 2 + 8 + 4 + 4 {
            return Err("too short");
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body).to_le_bytes() != crc {
            return Err("checksum mismatch");
        }
        let mut r = ByteReader::new(body);
        if r.take(4) != Some(SNAPSHOT_MAGIC.as_slice()) || r.u16() != Some(SNAPSHOT_VERSION) {
            return Err("not a producer snapshot of a known version");
        }
        let truncated = "truncated";
        let log_offset = r.u64().ok_or(truncated)?;
        let count = r.u32().ok_or(truncated)?;
        let mut producers = HashMap::with_capacity(count.min(1 << 16) as usize);
        for _ in 0..count {
            let id = r.u64().ok_or(truncated)?;
            let epoch = r.u16().ok_or(truncated)?;
            let last_seen_ms = r.u64().ok_or(truncated)? as i64;
            let n = r.take(1).ok_or(truncated)?[0];
            let mut batches = VecDeque::with_capacity(usize::from(n));
            for _ in 0..n {
                batches.push_back(CachedBatch {
                    first_sequence: r.u32().ok_or(truncated)? as i32,
                    last_sequence: r.u32().ok_or(truncated)? as i32,
                    base_offset: r.u64().ok_or(truncated)?,
                    last_offset: r.u64().ok_or(truncated)?,
                });
            }
            producers.insert(
                id,
                ProducerEntry {
                    epoch,
                    batches,
                    last_seen_ms,
                },
            );
        }
        if !r.is_empty() {
            return Err("bytes after the last producer");
        }
        Ok((log_offset, PartitionProducers { producers }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(producer_id: u64, epoch: u16, base_sequence: i32) -> ProducerInfo {
        ProducerInfo {
            producer_id,
            epoch,
            base_sequence,
        }
    }

    #[test]
    fn in_sequence_batches_append_and_retries_get_their_offsets_back() {
        let mut s = PartitionProducers::default();
        assert_eq!(s.check(&p(1, 0, 0), 3), Ok(SequenceCheck::Append));
        s.record(&p(1, 0, 0), 3, 100, 0);
        assert_eq!(s.check(&p(1, 0, 3), 2), Ok(SequenceCheck::Append));
        s.record(&p(1, 0, 3), 2, 110, 0);
        let first = CachedBatch {
            first_sequence: 0,
            last_sequence: 2,
            base_offset: 100,
            last_offset: 102,
        };
        assert_eq!(s.check(&p(1, 0, 0), 3), Ok(SequenceCheck::Duplicate(first)));
        assert!(matches!(
            s.check(&p(1, 0, 7), 1),
            Err(SequenceError::OutOfOrder {
                expected: 5,
                got: 7,
                ..
            })
        ));
        // Another producer is independent.
        assert_eq!(s.check(&p(2, 0, 0), 1), Ok(SequenceCheck::Append));
        assert_eq!(
            s.check(&ProducerInfo::NONE, 1),
            Ok(SequenceCheck::NotIdempotent)
        );
    }

    #[test]
    fn only_the_last_five_batches_are_remembered() {
        let mut s = PartitionProducers::default();
        for i in 0..7 {
            s.record(&p(1, 0, i), 1, u64::from(i as u32) * 10, 0);
        }
        for i in 2..7 {
            assert!(
                matches!(s.check(&p(1, 0, i), 1), Ok(SequenceCheck::Duplicate(b)) if b.base_offset == u64::from(i as u32) * 10)
            );
        }
        assert!(matches!(
            s.check(&p(1, 0, 0), 1),
            Err(SequenceError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn epochs_fence_and_restart_sequences() {
        let mut s = PartitionProducers::default();
        s.record(&p(1, 3, 0), 1, 0, 0);
        assert!(matches!(
            s.check(&p(1, 2, 1), 1),
            Err(SequenceError::Fenced { current: 3, .. })
        ));
        assert!(matches!(
            s.check(&p(1, 4, 5), 1),
            Err(SequenceError::OutOfOrder { expected: 0, .. })
        ));
        assert_eq!(s.check(&p(1, 4, 0), 1), Ok(SequenceCheck::Append));
        s.record(&p(1, 4, 0), 1, 1, 0);
        assert!(matches!(
            s.check(&p(1, 3, 1), 1),
            Err(SequenceError::Fenced { .. })
        ));
    }

    #[test]
    fn unknown_producers_must_start_at_zero_and_expiry_forgets() {
        let mut s = PartitionProducers::default();
        assert!(matches!(
            s.check(&p(9, 0, 4), 1),
            Err(SequenceError::UnknownProducer { .. })
        ));
        s.record(&p(9, 0, 0), 1, 0, 1_000);
        assert_eq!(s.expire(1_000 + 59_999, Duration::from_secs(60)), 0);
        assert_eq!(s.expire(1_000 + 60_000, Duration::from_secs(60)), 1);
        assert!(matches!(
            s.check(&p(9, 0, 1), 1),
            Err(SequenceError::UnknownProducer { .. })
        ));
        assert!(matches!(
            s.check(&p(9, 0, -1), 1),
            Err(SequenceError::InvalidSequence { .. })
        ));
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        let mut s = PartitionProducers::default();
        s.record(&p(1, 0, 0), 1, 0, 0);
        s.producers
            .get_mut(&1)
            .unwrap()
            .batches
            .back_mut()
            .unwrap()
            .last_sequence = i32::MAX - 1;
        assert_eq!(s.check(&p(1, 0, i32::MAX), 3), Ok(SequenceCheck::Append));
        s.record(&p(1, 0, i32::MAX), 3, 1, 0);
        assert_eq!(s.check(&p(1, 0, 2), 1), Ok(SequenceCheck::Append));
    }

    #[test]
    fn snapshots_round_trip_and_detect_damage() {
        let mut s = PartitionProducers::default();
        for id in 0..3u64 {
            for seq in 0..4 {
                s.record(
                    &p(id, id as u16, seq * 2),
                    2,
                    id * 100 + seq as u64 * 2,
                    5 + id as i64,
                );
            }
        }
        let bytes = s.encode_snapshot(1234);
        assert_eq!(
            PartitionProducers::decode_snapshot(&bytes),
            Ok((1234, s.clone()))
        );
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(
                PartitionProducers::decode_snapshot(&bad).is_err(),
                "flip at {i}"
            );
        }
    }
}
