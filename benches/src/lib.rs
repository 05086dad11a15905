//! Fixtures shared by Sluice's benches (the records every bench writes, so
//! figures from different benches describe the same bytes) and the logic of
//! the `sluice-bench` load generator ([`load`]).

pub mod load;

use bytes::Bytes;
use sluice_broker::storage::Record;

/// Size of a bench record's value: 1 KiB.
pub const RECORD_BYTES: usize = 1024;

/// `n` keyed records with 1 KiB values and increasing timestamps.
pub fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            key: Some(Bytes::from(format!("key-{}", i % 64))),
            value: Bytes::from(vec![(i % 251) as u8; RECORD_BYTES]),
            headers: vec![],
            timestamp: 1_700_000_000_000 + i as i64,
        })
        .collect()
}
