//! What the Kafka listener's translation at the edge costs, beside the
//! gRPC batch path's own work on the same records (docs/KAFKA.md quotes
//! the figures).
//!
//! - `kafka-produce/<codec>`: a Kafka record batch v2 of 1000 JSON events
//!   of 1 KiB, as a client compressed it, checked (CRC-32C), decompressed,
//!   and rebuilt as the Sluice batch the topic stores (its nearest codec).
//!   `grpc-produce/<codec>` is the gRPC batch path's work for the same
//!   records: the check of a Sluice batch the client encoded.
//! - `kafka-fetch/<codec>`: one stored batch served to a Kafka consumer:
//!   decoded (decompressed) and re-encoded as an uncompressed Kafka batch.
//!   A gRPC batch fetch sends the stored bytes as they are (no work), and
//!   `grpc-fetch-records/<codec>` is gRPC's records answer: decoding them.
//!
//! `cargo bench -p sluice-benches --bench kafka`.

use bytes::{Bytes, BytesMut};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kafka_protocol::indexmap::IndexMap;
use kafka_protocol::records::{
    Compression as KafkaCompression, NO_PRODUCER_EPOCH, NO_PRODUCER_ID, NO_SEQUENCE,
    Record as KafkaRecord, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use sluice_benches::RECORD_BYTES;
use sluice_benches::load::payload::Payload;
use sluice_broker::kafka::{batch_from_kafka, kafka_batches};
use sluice_broker::storage::{
    BatchBuilder, Compression, EncodedBatch, ProducerInfo, Record, decode_records,
};
use sluice_broker::topics::{TopicConfigPatch, TopicDefaults};

const RECORDS: usize = 1000;

fn json_records() -> Vec<Record> {
    Payload::Json
        .values(RECORDS as u64, RECORD_BYTES as u64, 1)
        .into_iter()
        .enumerate()
        .map(|(i, value)| Record {
            key: Some(Bytes::from(format!("customer-{}", i % 64))),
            value,
            headers: vec![],
            timestamp: 1_700_000_000_000 + i as i64,
        })
        .collect()
}

fn kafka_batch(records: &[Record], compression: KafkaCompression) -> Bytes {
    let kafka: Vec<KafkaRecord> = records
        .iter()
        .enumerate()
        .map(|(i, r)| KafkaRecord {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: NO_PRODUCER_EPOCH,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            sequence: NO_SEQUENCE.wrapping_add(i as i32),
            timestamp: r.timestamp,
            key: r.key.clone(),
            value: Some(r.value.clone()),
            headers: IndexMap::new(),
        })
        .collect();
    let mut buf = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        kafka.iter(),
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    buf.freeze()
}

fn translation(c: &mut Criterion) {
    let records = json_records();
    let config = TopicDefaults::default()
        .config(&TopicConfigPatch::default())
        .unwrap();
    let bytes: u64 = records.iter().map(|r| r.value.len() as u64).sum();
    let mut group = c.benchmark_group("translate");
    group.throughput(Throughput::Bytes(bytes));
    for (kafka_codec, codec) in [
        (KafkaCompression::None, Compression::None),
        (KafkaCompression::Lz4, Compression::Lz4),
        (KafkaCompression::Zstd, Compression::Zstd),
        (KafkaCompression::Gzip, Compression::Zstd),
        (KafkaCompression::Snappy, Compression::Lz4),
    ] {
        let name = format!("{kafka_codec:?}").to_lowercase();
        let kafka = kafka_batch(&records, kafka_codec);
        group.bench_with_input(BenchmarkId::new("kafka-produce", &name), &kafka, |b, k| {
            b.iter(|| batch_from_kafka(k.clone(), &config, 0).unwrap())
        });
        let stored = Bytes::copy_from_slice(
            BatchBuilder::encode_compressed(&records, ProducerInfo::NONE, codec).as_bytes(),
        );
        if matches!(
            kafka_codec,
            KafkaCompression::None | KafkaCompression::Lz4 | KafkaCompression::Zstd
        ) {
            group.bench_with_input(BenchmarkId::new("grpc-produce", &name), &stored, |b, s| {
                b.iter(|| {
                    let batch = EncodedBatch::from_bytes(s.clone()).unwrap();
                    batch
                        .as_record_batch()
                        .walk(|_| Ok::<_, sluice_broker::storage::BatchError>(()))
                        .unwrap();
                    batch
                })
            });
            group.bench_with_input(BenchmarkId::new("kafka-fetch", &name), &stored, |b, s| {
                b.iter(|| kafka_batches(s.clone()).unwrap())
            });
            group.bench_with_input(
                BenchmarkId::new("grpc-fetch-records", &name),
                &stored,
                |b, s| b.iter(|| decode_records(s.clone(), 0).unwrap()),
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = translation
}
criterion_main!(benches);
