//! The batch codec on arbitrary bytes: parsing, checksum validation and
//! record decoding must return errors, never panic, and whatever decodes
//! must re-encode to a batch that decodes to the same records.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_broker::storage::{
    BatchBuilder, BatchHeader, BatchIter, EncodedBatch, ProducerInfo, Record, decode_records,
};

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    let _ = BatchHeader::parse(data);
    let checked = BatchHeader::parse_checked(data);
    let _ = EncodedBatch::from_bytes(bytes.clone());
    for batch in BatchIter::new(bytes.clone()) {
        let Ok(batch) = batch else { break };
        // Only batches whose checksum holds come out of the iterator.
        assert!(BatchHeader::parse_checked(batch.as_bytes()).is_ok());
        if let Ok(records) = batch.to_records() {
            assert_eq!(records.len() as u32, batch.header().record_count);
            let plain: Vec<Record> = records.into_iter().map(|r| r.record).collect();
            let again = BatchBuilder::encode(&plain, ProducerInfo::NONE);
            let decoded = decode_records(Bytes::copy_from_slice(again.as_bytes()), 0)
                .expect("a batch we encoded decodes");
            let round: Vec<Record> = decoded.into_iter().map(|r| r.record).collect();
            assert_eq!(round, plain);
        }
    }
    if checked.is_ok() {
        let _ = decode_records(bytes, 0);
    }
});
