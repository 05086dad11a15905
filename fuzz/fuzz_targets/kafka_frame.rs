//! The Kafka listener's parse of what a client sends, on arbitrary bytes:
//! a request frame (header, API, version, body) and a produced record
//! batch. Both must answer with an error, never panic; a batch that is
//! accepted must be a valid Sluice batch whose records come back out as a
//! Kafka batch that is accepted again, unchanged.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sluice_broker::kafka::{ParsedFrame, batch_from_kafka, kafka_batches, parse_frame};
use sluice_broker::topics::{TopicConfigPatch, TopicDefaults};

fuzz_target!(|data: &[u8]| {
    let config = TopicDefaults::default()
        .config(&TopicConfigPatch::default())
        .unwrap();
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let bytes = Bytes::copy_from_slice(rest);
    let mut batches = Vec::new();
    if selector % 2 == 0 {
        if let ParsedFrame::Request(_, _, request) = parse_frame(bytes) {
            if let kafka_protocol::messages::RequestKind::Produce(produce) = *request {
                for topic in produce.topic_data {
                    for partition in topic.partition_data {
                        batches.extend(partition.records);
                    }
                }
            }
        }
    } else {
        batches.push(bytes);
    }
    for batch in batches {
        let Ok(stored) = batch_from_kafka(batch, &config, 0) else {
            continue;
        };
        let records = stored.as_record_batch().to_records().expect("a stored batch decodes");
        let served = kafka_batches(Bytes::copy_from_slice(stored.as_bytes()))
            .expect("a stored batch is served");
        let again = batch_from_kafka(served, &config, 0).expect("what is served is accepted");
        let round = again.as_record_batch().to_records().expect("decodes");
        assert_eq!(records, round);
    }
});
