//! Crash tests of delivery guarantees against the real broker binary:
//! producer fencing and idempotence across a SIGKILL.

mod grpc_common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use grpc_common::{create_topic, start_broker};
use sluice_proto::v1;
use sluice_testkit::Broker;
use tonic::Code;

fn idempotent(
    topic: &str,
    partition: u32,
    (producer_id, epoch): (u64, u32),
    base_sequence: i32,
    values: &[&str],
    timestamp_ms: i64,
) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.into(),
        partition: Some(partition),
        records: values
            .iter()
            .map(|v| v1::Record {
                value: Bytes::copy_from_slice(v.as_bytes()),
                timestamp_ms,
                ..Default::default()
            })
            .collect(),
        request_id: 0,
        producer: Some(v1::ProducerBatch {
            producer_id,
            epoch,
            base_sequence,
        }),
    }
}

async fn init(broker: &Broker, name: Option<&str>) -> (u64, u32) {
    let id = broker
        .producer()
        .await
        .init_producer(v1::InitProducerRequest {
            name: name.map(str::to_owned),
        })
        .await
        .unwrap()
        .into_inner();
    (id.producer_id, id.epoch)
}

fn reason(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("sluice-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
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

fn expect_fenced(result: Result<tonic::Response<v1::ProduceResponse>, tonic::Status>, what: &str) {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "{what}: {status:?}"
    );
    assert_eq!(reason(&status), "fenced", "{what}: {status:?}");
    assert!(status.message().contains("fenced"), "{what}: {status:?}");
}

/// Issues 12 (item 4) and 13 (item 5): once a name has a new epoch, the old
/// epoch is refused on every partition, including ones the new epoch has
/// not written, at once and after a SIGKILL and restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zombie_epoch_is_fenced_on_every_partition_at_once_and_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 3).await;
    let old = init(&broker, Some("billing")).await;
    let mut producer = broker.producer().await;
    producer
        .produce(idempotent("t", 0, old, 0, &["old-0"], 0))
        .await
        .unwrap();
    let new = init(&broker, Some("billing")).await;
    assert_eq!((new.0, new.1), (old.0, old.1 + 1));
    // Neither epoch has written partitions 1 and 2; the new one has written
    // nothing at all.
    expect_fenced(
        producer
            .produce(idempotent("t", 1, old, 0, &["zombie-1"], 0))
            .await,
        "old epoch on a partition nobody wrote",
    );
    expect_fenced(
        producer
            .produce(idempotent("t", 0, old, 1, &["zombie-0"], 0))
            .await,
        "old epoch on the partition it wrote",
    );
    // An anonymous producer is not affected.
    let anonymous = init(&broker, None).await;
    producer
        .produce(idempotent("t", 2, anonymous, 0, &["anon"], 0))
        .await
        .unwrap();

    broker.kill();
    let broker = broker.start_again();
    let mut producer = broker.producer().await;
    expect_fenced(
        producer
            .produce(idempotent("t", 2, old, 0, &["zombie-2"], 0))
            .await,
        "old epoch after a SIGKILL and restart",
    );
    producer
        .produce(idempotent("t", 2, new, 0, &["new-2"], 0))
        .await
        .expect("the new epoch writes");
    let values: Vec<String> = grpc_common::fetch_all(&broker, "t", 2)
        .await
        .iter()
        .map(grpc_common::value_of)
        .collect();
    assert_eq!(values, ["anon", "new-2"]);
    assert_eq!(latest_offset(&broker, "t", 0).await, 1);
    assert_eq!(latest_offset(&broker, "t", 1).await, 0);
}

/// Issue 13, item 4: a producer rebuilt from the log tail after a SIGKILL
/// must not be expired because its records carry old event times; the
/// retry of its last batch is caught as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_sigkill_is_a_duplicate_even_with_old_record_timestamps() {
    let dir = tempfile::tempdir().unwrap();
    // No maintenance tick before the kill: no producer snapshot, so the
    // restart rebuilds the producer from the log's tail.
    let mut broker = start_broker(dir.path(), &["--maintenance-interval-ms", "3600000"]);
    create_topic(&broker, "t", 1).await;
    let id = init(&broker, None).await;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let day_ago = now_ms - 24 * 3600 * 1000;
    let mut producer = broker.producer().await;
    let first = idempotent("t", 0, id, 0, &["a", "b", "c"], day_ago);
    let original = producer.produce(first.clone()).await.unwrap().into_inner();
    assert_eq!(original.positions[0].offset, 0);

    broker.kill();
    // Producers expire after a minute idle, checked every 100 ms: the event
    // times are a day old, broker time is seconds.
    let broker = start_broker(
        dir.path(),
        &[
            "--producer-expiry-ms",
            "60000",
            "--maintenance-interval-ms",
            "100",
        ],
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut producer = broker.producer().await;
    let retry = producer.produce(first).await.unwrap().into_inner();
    assert!(retry.duplicate, "the retry was written again");
    assert_eq!(retry.positions, original.positions);
    assert_eq!(
        latest_offset(&broker, "t", 0).await,
        3,
        "nothing written twice"
    );
    producer
        .produce(idempotent("t", 0, id, 3, &["d"], day_ago))
        .await
        .expect("the sequence goes on");
}
