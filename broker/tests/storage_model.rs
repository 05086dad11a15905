//! Property test: random sequences of append, read, roll, reopen, retention
//! and timestamp lookups against `PartitionLog` and a plain in-memory model
//! of it must agree after every step.

mod common;

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use sluice_broker::storage::{
    BatchBuilder, FlushPolicy, LogConfig, PartitionLog, ProducerInfo, Record, StorageError,
};

const SEGMENT_BYTES: u64 = 4096;
const BASE_TS: i64 = 1_700_000_000_000;

#[derive(Debug, Clone)]
enum Op {
    Append {
        count: usize,
        value_len: usize,
        ts_jitter: i64,
    },
    Read {
        from_permille: u16,
        max_bytes: usize,
    },
    Roll,
    Reopen,
    RetainBytes(u64),
    /// Expire everything older than the timestamp of the record this far
    /// (per mille) into the log.
    RetainAge {
        cutoff_permille: u16,
    },
    OffsetForTimestamp {
        ts_permille: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1usize..6, 0usize..1000, -50i64..50).prop_map(|(count, value_len, ts_jitter)| Op::Append { count, value_len, ts_jitter }),
        3 => (0u16..=1100, 1usize..6000).prop_map(|(from_permille, max_bytes)| Op::Read { from_permille, max_bytes }),
        1 => Just(Op::Roll),
        1 => Just(Op::Reopen),
        1 => (0u64..20_000).prop_map(Op::RetainBytes),
        1 => (0u16..=1000).prop_map(|cutoff_permille| Op::RetainAge { cutoff_permille }),
        2 => (0u16..=1100).prop_map(|ts_permille| Op::OffsetForTimestamp { ts_permille }),
    ]
}

struct ModelSegment {
    base: u64,
    bytes: u64,
    max_ts: i64,
    records: Vec<Record>,
}

/// What the log should hold: segments with the same roll and retention
/// rules, expressed as simply as possible.
struct Model {
    segments: Vec<ModelSegment>,
}

impl Model {
    fn next_offset(&self) -> u64 {
        let last = self.segments.last().unwrap();
        last.base + last.records.len() as u64
    }
    fn start(&self) -> u64 {
        self.segments[0].base
    }
    fn roll(&mut self) {
        if !self.segments.last().unwrap().records.is_empty() {
            let base = self.next_offset();
            self.segments.push(ModelSegment {
                base,
                bytes: 0,
                max_ts: i64::MIN,
                records: vec![],
            });
        }
    }
    fn records(&self) -> Vec<(u64, &Record)> {
        self.segments
            .iter()
            .flat_map(|s| {
                s.records
                    .iter()
                    .enumerate()
                    .map(move |(i, r)| (s.base + i as u64, r))
            })
            .collect()
    }
    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }
}

fn log_config() -> LogConfig {
    common::config(SEGMENT_BYTES, FlushPolicy::Os)
}

fn record(offset: u64, value_len: usize, ts_jitter: i64) -> Record {
    Record {
        key: (offset % 3 != 0).then(|| Bytes::from(format!("k{}", offset % 5))),
        value: Bytes::from(vec![(offset % 256) as u8; value_len]),
        headers: vec![],
        timestamp: BASE_TS + offset as i64 * 10 + ts_jitter,
    }
}

fn check(log: &PartitionLog, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(log.log_start_offset(), model.start());
    prop_assert_eq!(log.high_watermark(), model.next_offset());
    prop_assert_eq!(log.segment_count(), model.segments.len());
    prop_assert_eq!(log.size_bytes(), model.total_bytes());
    let got = common::read_all(log, log.log_start_offset());
    let expected = model.records();
    prop_assert_eq!(got.len(), expected.len());
    for (g, (offset, r)) in got.iter().zip(expected) {
        prop_assert_eq!(g.offset, offset);
        prop_assert_eq!(&g.record, r);
    }
    Ok(())
}

fn at_permille(model: &Model, permille: u16) -> u64 {
    let span = model.next_offset() - model.start();
    model.start() + span * u64::from(permille) / 1000
}

fn run(dir: &Path, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut log = PartitionLog::open(dir, log_config()).unwrap();
    let mut model = Model {
        segments: vec![ModelSegment {
            base: 0,
            bytes: 0,
            max_ts: i64::MIN,
            records: vec![],
        }],
    };
    for op in ops {
        match op {
            Op::Append {
                count,
                value_len,
                ts_jitter,
            } => {
                let first = model.next_offset();
                let records: Vec<Record> = (0..count as u64)
                    .map(|i| record(first + i, value_len, ts_jitter))
                    .collect();
                let batch = BatchBuilder::encode(&records, ProducerInfo::NONE);
                let len = batch.len() as u64;
                match log.append(&batch) {
                    Ok(info) => {
                        prop_assert!(len <= SEGMENT_BYTES);
                        prop_assert_eq!(info.base_offset, first);
                        let active = model.segments.last().unwrap();
                        if !active.records.is_empty() && active.bytes + len > SEGMENT_BYTES {
                            model.roll();
                        }
                        let active = model.segments.last_mut().unwrap();
                        active.bytes += len;
                        active.max_ts = records
                            .iter()
                            .map(|r| r.timestamp)
                            .fold(active.max_ts, i64::max);
                        active.records.extend(records);
                    }
                    Err(StorageError::BatchTooLarge { .. }) => prop_assert!(len > SEGMENT_BYTES),
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Read {
                from_permille,
                max_bytes,
            } => {
                let from = at_permille(&model, from_permille.min(1000));
                let from = if from_permille > 1000 {
                    model.next_offset() + 1
                } else {
                    from
                };
                match log.read_records(from, max_bytes) {
                    Ok(got) => {
                        prop_assert!(from <= model.next_offset());
                        prop_assert_eq!(got.is_empty(), from == model.next_offset());
                        let expected = model.records();
                        let skip = (from - model.start()) as usize;
                        for (g, (offset, r)) in got.iter().zip(expected.into_iter().skip(skip)) {
                            prop_assert_eq!(g.offset, offset);
                            prop_assert_eq!(&g.record, r);
                        }
                    }
                    Err(StorageError::OffsetOutOfRange { .. }) => {
                        prop_assert!(from > model.next_offset())
                    }
                    Err(e) => return Err(TestCaseError::fail(e.to_string())),
                }
            }
            Op::Roll => {
                log.roll().unwrap();
                model.roll();
            }
            Op::Reopen => {
                // Opening drops an empty last segment (a roll nothing was
                // appended after): the one before it is active again.
                if model.segments.len() > 1 && model.segments.last().unwrap().records.is_empty() {
                    model.segments.pop();
                }
                drop(log);
                log = PartitionLog::open(dir, log_config()).unwrap();
                prop_assert!(log.torn_tail().is_none());
            }
            Op::RetainBytes(limit) => {
                log.set_config(LogConfig {
                    retention_bytes: Some(limit),
                    ..log_config()
                })
                .unwrap();
                log.enforce_retention(i64::MAX).unwrap();
                log.set_config(log_config()).unwrap();
                let mut total = model.total_bytes();
                while model.segments.len() > 1 && total - model.segments[0].bytes >= limit {
                    total -= model.segments.remove(0).bytes;
                }
            }
            Op::RetainAge { cutoff_permille } => {
                let offset = at_permille(&model, cutoff_permille);
                let cutoff = BASE_TS + offset as i64 * 10;
                let age = Duration::from_secs(3600);
                log.set_config(LogConfig {
                    retention_age: Some(age),
                    ..log_config()
                })
                .unwrap();
                log.enforce_retention(cutoff + 3_600_000).unwrap();
                log.set_config(log_config()).unwrap();
                let active = model.segments.last().unwrap();
                if !active.records.is_empty() && active.max_ts < cutoff {
                    model.roll();
                }
                while model.segments.len() > 1 && model.segments[0].max_ts < cutoff {
                    model.segments.remove(0);
                }
            }
            Op::OffsetForTimestamp { ts_permille } => {
                let target = BASE_TS
                    + at_permille(&model, ts_permille.min(1000)) as i64 * 10
                    + i64::from(ts_permille > 1000) * 100_000;
                let expected = model
                    .records()
                    .into_iter()
                    .find(|(_, r)| r.timestamp >= target)
                    .map(|(o, _)| o);
                prop_assert_eq!(
                    log.offset_for_timestamp(target),
                    expected,
                    "target {}",
                    target
                );
            }
        }
        check(&log, &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        run(dir.path(), ops)?;
    }
}
