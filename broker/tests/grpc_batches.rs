//! Issue 16 against the real broker binary: a batch a producer encodes in
//! the storage format is checked without building its records, written as
//! it is, and served back byte for byte; tampered batches are refused with
//! nothing written; compressed batches survive a SIGKILL.

mod grpc_common;

use std::collections::BTreeMap;

use bytes::Bytes;
use grpc_common::{create_topic, create_topic_with, expect_status, start_broker, status_of};
use sluice_format::batch::CRC_FROM;
use sluice_format::{
    BatchBuilder, BatchHeader, Compression, EncodedBatch, Header, ProducerInfo, Record,
    RecordBatch, StoredRecord,
};
use sluice_proto::v1;
use sluice_testkit::Broker;
use tonic::Code;

/// Offsets of fields a test tampers with (see docs/FORMAT.md).
const OFF_LENGTH: usize = 4;
const OFF_CRC: usize = 16;
const OFF_RECORD_COUNT: usize = 24;

/// Records with keys, headers, and JSON-like values that compress well.
fn records(tag: &str, n: usize, timestamp: i64) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            key: (i % 3 != 0).then(|| Bytes::from(format!("user-{}", i % 7))),
            value: Bytes::from(format!(
                r#"{{"event":"order.created","tag":"{tag}","seq":{i},"items":[{{"sku":"A-1","qty":2}}],"note":"{}"}}"#,
                "x".repeat(i % 50)
            )),
            headers: if i % 2 == 0 {
                vec![Header {
                    key: "trace".into(),
                    value: Bytes::from(format!("t-{i}")),
                }]
            } else {
                vec![]
            },
            timestamp: timestamp + i as i64,
        })
        .collect()
}

fn batch_request(topic: &str, partition: u32, batch: &EncodedBatch) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.into(),
        partition: Some(partition),
        batch: Bytes::copy_from_slice(batch.as_bytes()),
        ..Default::default()
    }
}

/// Every stored batch of a partition, as the BATCHES fetch serves them,
/// from offset 0 until caught up.
async fn fetch_batches(broker: &Broker, topic: &str, partition: u32) -> Vec<Bytes> {
    let mut consumer = broker.consumer().await;
    let mut offset = 0;
    let mut batches = Vec::new();
    loop {
        let page = consumer
            .fetch(v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                format: v1::RecordFormat::Batches as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.records.is_empty(), "BATCHES answers carry no records");
        if page.batches.is_empty() {
            assert_eq!(page.next_offset, page.high_watermark, "caught up");
            return batches;
        }
        let mut rest = page.batches.clone();
        while !rest.is_empty() {
            let (batch, tail) = RecordBatch::decode_front(&rest).expect("a whole, valid batch");
            batches.push(batch.as_bytes().clone());
            rest = tail;
        }
        offset = page.next_offset;
    }
}

/// Every record of a partition through the protobuf-records fetch.
async fn fetch_records(broker: &Broker, topic: &str, partition: u32) -> Vec<v1::ConsumedRecord> {
    grpc_common::fetch_all(broker, topic, partition).await
}

fn as_proto(
    offset: u64,
    record: &Record,
) -> (u64, Option<Bytes>, Bytes, Vec<(String, Bytes)>, i64) {
    (
        offset,
        record.key.clone(),
        record.value.clone(),
        record
            .headers
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect(),
        record.timestamp,
    )
}

fn from_proto(r: &v1::ConsumedRecord) -> (u64, Option<Bytes>, Bytes, Vec<(String, Bytes)>, i64) {
    (
        r.offset,
        r.key.clone(),
        r.value.clone(),
        r.headers
            .iter()
            .map(|h| (h.key.clone(), h.value.clone()))
            .collect(),
        r.timestamp_ms,
    )
}

async fn latest_offset(broker: &Broker, topic: &str, partition: u32) -> u64 {
    broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest { name: topic.into() })
        .await
        .unwrap()
        .into_inner()
        .partitions[partition as usize]
        .latest_offset
}

/// Rewrites a batch's checksum after the test changed what it covers.
fn rechecksum(bytes: &mut [u8]) {
    let crc = crc32fast::hash(&bytes[CRC_FROM..]);
    bytes[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_batches_are_stored_and_served_byte_for_byte_in_every_codec() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "orders", 1).await;
    let mut producer = broker.producer().await;
    let mut sent = Vec::new();
    let mut expected = Vec::new();
    let mut next = 0u64;
    for (round, codec) in Compression::ALL.into_iter().enumerate() {
        let records = records(codec.name(), 40, 1_700_000_000_000 + round as i64 * 1000);
        let batch = BatchBuilder::encode_compressed(&records, ProducerInfo::NONE, codec);
        assert_eq!(batch.header().compression(), Ok(codec));
        let response = producer
            .produce(batch_request("orders", 0, &batch))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (
                response.partition,
                response.base_offset,
                response.record_count
            ),
            (0, next, 40),
            "{codec:?}"
        );
        assert!(response.positions.is_empty() && !response.duplicate);
        for (i, record) in records.iter().enumerate() {
            expected.push(as_proto(next + i as u64, record));
        }
        next += 40;
        sent.push(batch);
    }

    // The log holds the producer's bytes: only the base offset, which sits
    // outside the checksum, is the broker's.
    let stored = fetch_batches(&broker, "orders", 0).await;
    assert_eq!(stored.len(), sent.len());
    let mut base = 0;
    for (stored, sent) in stored.iter().zip(&sent) {
        assert_eq!(stored.len(), sent.len());
        assert_eq!(&stored[CRC_FROM..], &sent.as_bytes()[CRC_FROM..]);
        let header = BatchHeader::parse_checked(stored).unwrap();
        assert_eq!(header.base_offset, base);
        base = header.next_offset();
    }

    // The protobuf-records path decompresses and reads the same records.
    let read: Vec<_> = fetch_records(&broker, "orders", 0)
        .await
        .iter()
        .map(from_proto)
        .collect();
    assert_eq!(read, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batches_fetch_from_inside_a_batch_names_the_first_offset_wanted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    let mut producer = broker.producer().await;
    let batch = BatchBuilder::encode_compressed(
        &records("a", 10, 1_000),
        ProducerInfo::NONE,
        Compression::Lz4,
    );
    producer
        .produce(batch_request("t", 0, &batch))
        .await
        .unwrap();
    let page = broker
        .consumer()
        .await
        .fetch(v1::FetchRequest {
            topic: "t".into(),
            partition: 0,
            offset: 7,
            format: v1::RecordFormat::Batches as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The whole batch comes back (offsets 0..10), and the reader is told to
    // skip to 7.
    let header = BatchHeader::parse_checked(&page.batches).unwrap();
    assert_eq!((header.base_offset, header.record_count), (0, 10));
    assert_eq!(page.first_offset, 7);
    assert_eq!(page.next_offset, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_batches_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic_with(
        &broker,
        "strict",
        v1::TopicConfig {
            partitions: Some(1),
            max_record_bytes: Some(512),
            ..Default::default()
        },
    )
    .await;
    let mut producer = broker.producer().await;
    let good = || BatchBuilder::encode(&records("ok", 5, 1_000), ProducerInfo::NONE);

    let mut bad_crc = good().as_bytes().to_vec();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x5a;

    let mut lying_count = good().as_bytes().to_vec();
    lying_count[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4].copy_from_slice(&6u32.to_le_bytes());
    rechecksum(&mut lying_count);

    let mut fewer = good().as_bytes().to_vec();
    fewer[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4].copy_from_slice(&4u32.to_le_bytes());
    rechecksum(&mut fewer);

    let mut big = records("big", 3, 1_000);
    big[1].value = Bytes::from(vec![b'x'; 2000]);
    let oversized = BatchBuilder::encode(&big, ProducerInfo::NONE);
    // Compression does not hide a record's size from the check.
    let oversized_zstd =
        BatchBuilder::encode_compressed(&big, ProducerInfo::NONE, Compression::Zstd);
    assert!(oversized_zstd.len() < 512);

    // A whole lz4 frame with bytes after it, under a valid length and
    // checksum: one reader might stop at the frame's end, another read on.
    let mut after_the_frame = BatchBuilder::encode_compressed(
        &records("f", 5, 1_000),
        ProducerInfo::NONE,
        Compression::Lz4,
    )
    .as_bytes()
    .to_vec();
    after_the_frame.extend_from_slice(b"junk");
    let length = (after_the_frame.len() - 8) as u32;
    after_the_frame[OFF_LENGTH..OFF_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
    rechecksum(&mut after_the_frame);

    let claims_a_producer = BatchBuilder::encode(
        &records("p", 5, 1_000),
        ProducerInfo {
            producer_id: 7,
            epoch: 0,
            base_sequence: 0,
        },
    );

    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad CRC", bad_crc, "checksum"),
        ("a count above its records", lying_count, "record"),
        ("a count below its records", fewer, "after its last record"),
        (
            "an oversized record",
            oversized.as_bytes().to_vec(),
            "at most 512",
        ),
        (
            "an oversized record, compressed",
            oversized_zstd.as_bytes().to_vec(),
            "at most 512",
        ),
        (
            "producer fields the request does not have",
            claims_a_producer.as_bytes().to_vec(),
            "producer fields",
        ),
        ("not a batch", b"hello, world".to_vec(), "batch"),
        (
            "bytes after the compressed frame",
            after_the_frame,
            "after the end of the frame",
        ),
    ];
    for (what, bytes, needle) in cases {
        let status = status_of(
            producer
                .produce(v1::ProduceRequest {
                    topic: "strict".into(),
                    partition: Some(0),
                    batch: Bytes::from(bytes),
                    ..Default::default()
                })
                .await,
        );
        expect_status(&status, Code::InvalidArgument, needle);
        assert!(
            status.message().contains("nothing was written"),
            "{what}: {status:?}"
        );
        assert_eq!(latest_offset(&broker, "strict", 0).await, 0, "{what}");
    }

    // An idempotent request whose batch carries other producer fields.
    let init = producer
        .init_producer(v1::InitProducerRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mine = ProducerInfo {
        producer_id: init.producer_id,
        epoch: init.epoch as u16,
        base_sequence: 0,
    };
    let other_sequence = BatchBuilder::encode(
        &records("q", 5, 1_000),
        ProducerInfo {
            base_sequence: 5,
            ..mine
        },
    );
    let mut request = batch_request("strict", 0, &other_sequence);
    request.producer = Some(v1::ProducerBatch {
        producer_id: init.producer_id,
        epoch: init.epoch,
        base_sequence: 0,
    });
    expect_status(
        &status_of(producer.produce(request).await),
        Code::InvalidArgument,
        "base sequence 5",
    );
    // A batch without its partition, and a request with both forms.
    let mut no_partition = batch_request("strict", 0, &good());
    no_partition.partition = None;
    expect_status(
        &status_of(producer.produce(no_partition).await),
        Code::InvalidArgument,
        "partition",
    );
    let mut both = batch_request("strict", 0, &good());
    both.records = vec![grpc_common::record(None, "x")];
    expect_status(
        &status_of(producer.produce(both).await),
        Code::InvalidArgument,
        "not both",
    );
    assert_eq!(latest_offset(&broker, "strict", 0).await, 0);

    // The partition is untouched: a good batch lands at offset 0.
    let response = producer
        .produce(batch_request("strict", 0, &good()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((response.base_offset, response.record_count), (0, 5));
    assert_eq!(fetch_records(&broker, "strict", 0).await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_batch_sent_twice_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 2).await;
    let mut producer = broker.producer().await;
    let init = producer
        .init_producer(v1::InitProducerRequest::default())
        .await
        .unwrap()
        .into_inner();
    let info = |base_sequence| ProducerInfo {
        producer_id: init.producer_id,
        epoch: init.epoch as u16,
        base_sequence,
    };
    let request = |batch: &EncodedBatch, base_sequence| {
        let mut request = batch_request("t", 1, batch);
        request.producer = Some(v1::ProducerBatch {
            producer_id: init.producer_id,
            epoch: init.epoch,
            base_sequence,
        });
        request
    };
    let first =
        BatchBuilder::encode_compressed(&records("a", 8, 5_000), info(0), Compression::Zstd);
    let written = producer
        .produce(request(&first, 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((written.base_offset, written.duplicate), (0, false));
    let again = producer
        .produce(request(&first, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(again.duplicate, "the retry was written again");
    assert_eq!((again.base_offset, again.record_count), (0, 8));
    let second =
        BatchBuilder::encode_compressed(&records("b", 3, 6_000), info(8), Compression::Lz4);
    let next = producer
        .produce(request(&second, 8))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((next.base_offset, next.duplicate), (8, false));
    // A gap in the sequence is refused as it is for records.
    let gap = BatchBuilder::encode(&records("c", 1, 7_000), info(20));
    let status = status_of(producer.produce(request(&gap, 20)).await);
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(latest_offset(&broker, "t", 1).await, 11);
    assert_eq!(latest_offset(&broker, "t", 0).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_that_forces_a_codec_stores_every_batch_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic_with(
        &broker,
        "zstd-only",
        v1::TopicConfig {
            partitions: Some(1),
            compression: Some("zstd".into()),
            ..Default::default()
        },
    )
    .await;
    let mut producer = broker.producer().await;
    let plain = records("plain", 20, 1_000);
    producer
        .produce(batch_request(
            "zstd-only",
            0,
            &BatchBuilder::encode(&plain, ProducerInfo::NONE),
        ))
        .await
        .unwrap();
    let lz4 = records("lz4", 20, 2_000);
    producer
        .produce(batch_request(
            "zstd-only",
            0,
            &BatchBuilder::encode_compressed(&lz4, ProducerInfo::NONE, Compression::Lz4),
        ))
        .await
        .unwrap();
    // Records sent as messages are compressed by the broker.
    producer
        .produce(grpc_common::produce_request(
            "zstd-only",
            Some(0),
            vec![grpc_common::record(Some("k"), "as a message")],
        ))
        .await
        .unwrap();
    let stored = fetch_batches(&broker, "zstd-only", 0).await;
    assert_eq!(stored.len(), 3);
    for batch in &stored {
        let header = BatchHeader::parse_checked(batch).unwrap();
        assert_eq!(header.compression(), Ok(Compression::Zstd));
    }
    let values: Vec<Bytes> = fetch_records(&broker, "zstd-only", 0)
        .await
        .iter()
        .map(|r| r.value.clone())
        .collect();
    let mut expected: Vec<Bytes> = plain.iter().chain(&lz4).map(|r| r.value.clone()).collect();
    expected.push(Bytes::from_static(b"as a message"));
    assert_eq!(values, expected);

    // An unknown codec name is a clear error.
    let status = status_of(
        broker
            .admin()
            .await
            .create_topic(v1::CreateTopicRequest {
                name: "bad".into(),
                config: Some(v1::TopicConfig {
                    compression: Some("brotli".into()),
                    ..Default::default()
                }),
            })
            .await,
    );
    expect_status(&status, Code::InvalidArgument, "brotli");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batches_subscription_streams_stored_batches() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "s", 1).await;
    let mut producer = broker.producer().await;
    let mut expected = Vec::new();
    for (i, codec) in Compression::ALL.into_iter().enumerate() {
        let records = records("s", 5, 10_000 * (i as i64 + 1));
        expected.extend(records.iter().map(|r| r.value.clone()));
        producer
            .produce(batch_request(
                "s",
                0,
                &BatchBuilder::encode_compressed(&records, ProducerInfo::NONE, codec),
            ))
            .await
            .unwrap();
    }
    let mut stream = broker
        .consumer()
        .await
        .subscribe(v1::SubscribeRequest {
            topic: "s".into(),
            start: Some(v1::subscribe_request::Start::Offset(2)),
            format: v1::RecordFormat::Batches as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut values = Vec::new();
    while values.len() < expected.len() - 2 {
        let message = stream.message().await.unwrap().expect("a message");
        assert!(message.records.is_empty());
        let from = message.first_offset;
        let mut rest = message.batches.clone();
        while !rest.is_empty() {
            let (batch, tail) = RecordBatch::decode_front(&rest).unwrap();
            for record in batch.to_records().unwrap() {
                let StoredRecord { offset, record } = record;
                if offset >= from {
                    values.push(record.value);
                }
            }
            rest = tail;
        }
    }
    assert_eq!(values, expected[2..]);
}

/// Compressed batches, acknowledged under the default durability, are all
/// there after the broker is SIGKILLed mid-stream and restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_batches_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "crash", 2).await;
    let mut producer = broker.producer().await;
    let mut acknowledged: BTreeMap<(u32, u64), Bytes> = BTreeMap::new();
    let codecs = [Compression::Lz4, Compression::Zstd, Compression::None];
    for round in 0..60u32 {
        let partition = round % 2;
        let codec = codecs[round as usize % codecs.len()];
        let records = records(&format!("r{round}"), 25, 1_000 * i64::from(round));
        let batch = BatchBuilder::encode_compressed(&records, ProducerInfo::NONE, codec);
        let response = producer
            .produce(batch_request("crash", partition, &batch))
            .await
            .unwrap()
            .into_inner();
        for (i, record) in records.iter().enumerate() {
            acknowledged.insert(
                (partition, response.base_offset + i as u64),
                record.value.clone(),
            );
        }
    }
    // Produce more without waiting, so the kill lands with requests in flight.
    let pid_before = broker.pid();
    let in_flight = tokio::spawn({
        let mut producer = producer.clone();
        async move {
            let mut acknowledged = Vec::new();
            for round in 0.. {
                let records = records("late", 25, round);
                let batch = BatchBuilder::encode_compressed(
                    &records,
                    ProducerInfo::NONE,
                    Compression::Zstd,
                );
                match producer.produce(batch_request("crash", 0, &batch)).await {
                    Ok(response) => acknowledged.push((response.into_inner().base_offset, records)),
                    Err(_) => return acknowledged,
                }
            }
            acknowledged
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    broker.kill();
    let late = in_flight.await.unwrap();
    assert!(
        !late.is_empty(),
        "some batches were acknowledged while the kill came"
    );
    for (base_offset, records) in late {
        for (i, record) in records.iter().enumerate() {
            acknowledged.insert((0, base_offset + i as u64), record.value.clone());
        }
    }
    let broker = broker.start_again();
    assert_ne!(broker.pid(), pid_before);
    for partition in 0..2 {
        let read = fetch_records(&broker, "crash", partition).await;
        let by_offset: BTreeMap<u64, Bytes> =
            read.iter().map(|r| (r.offset, r.value.clone())).collect();
        for ((p, offset), value) in acknowledged.range((partition, 0)..(partition + 1, 0)) {
            assert_eq!(*p, partition);
            assert_eq!(
                by_offset.get(offset),
                Some(value),
                "acknowledged record {partition}/{offset} after SIGKILL"
            );
        }
        // Every stored batch is whole and checks.
        for batch in fetch_batches(&broker, "crash", partition).await {
            BatchHeader::parse_checked(&batch).unwrap();
        }
    }
}
