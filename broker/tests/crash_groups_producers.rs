//! Crash tests of delivery guarantees against the real broker binary:
//! producer fencing and idempotence across a SIGKILL, and group state of a
//! deleted topic left behind by a crash in the middle of the delete.

mod grpc_common;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use grpc_common::{create_topic, produce_request, record, start_broker};
use sluice_proto::v1::{self, group_service_client::GroupServiceClient};
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
        ..Default::default()
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

async fn fetch_offsets(broker: &Broker, group: &str) -> Vec<v1::CommittedOffset> {
    GroupServiceClient::new(broker.channel().await)
        .fetch_offsets(v1::FetchOffsetsRequest {
            group_id: group.into(),
            topics: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Issue 13, items 10 and 3: a crash after a topic's removal is durable but
/// before its group state (offsets, retries) is removed must not let a
/// topic created later under the same name obey that state. The crash is
/// built on disk: the group state as it was before the delete, beside the
/// topic metadata as it is after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_state_left_by_a_crash_mid_delete_is_not_obeyed_by_a_new_topic() {
    use sluice_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path(), &[]);
    grpc_common::create_topic_with(
        &broker,
        "t",
        v1::TopicConfig {
            partitions: Some(1),
            retry_backoff_ms: Some(10),
            retry_backoff_max_ms: Some(10),
            ..Default::default()
        },
    )
    .await;
    let old: Vec<v1::Record> = (0..6).map(|i| record(None, &format!("OLD-{i}"))).collect();
    broker
        .producer()
        .await
        .produce(produce_request("t", Some(0), old))
        .await
        .unwrap();
    let mut groups = GroupServiceClient::new(broker.channel().await);
    groups
        .commit_offsets(v1::CommitOffsetsRequest {
            group_id: "g".into(),
            member_id: String::new(),
            member_epoch: 0,
            offsets: vec![v1::OffsetCommit {
                topic: "t".into(),
                partition: 0,
                offset: 5,
                metadata: String::new(),
            }],
        })
        .await
        .unwrap();
    let member = groups
        .join_group(v1::JoinGroupRequest {
            group_id: "g".into(),
            instance_id: None,
            topics: vec!["t".into()],
            session_timeout_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    groups
        .heartbeat(v1::HeartbeatRequest {
            group_id: "g".into(),
            member_id: member.member_id.clone(),
            owned: vec![],
        })
        .await
        .unwrap();
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    dlq.nack(v1::NackRequest {
        group_id: "g".into(),
        member_id: member.member_id.clone(),
        record: Some(v1::RecordRef {
            topic: "t".into(),
            partition: 0,
            offset: 1,
        }),
        reason: "old failure".into(),
        error_class: String::new(),
    })
    .await
    .unwrap();
    broker.stop(Duration::from_secs(15));
    let saved = tempfile::tempdir().unwrap();
    for state in ["offsets", "retries"] {
        copy_dir(
            &dir.path().join("internal").join(state),
            &saved.path().join(state),
        );
    }

    let broker = broker.start_again();
    broker
        .admin()
        .await
        .delete_topic(v1::DeleteTopicRequest { name: "t".into() })
        .await
        .unwrap();
    let mut broker = broker;
    broker.stop(Duration::from_secs(15));
    // The crash: topics.json says `t` is gone, the group state still has it.
    for state in ["offsets", "retries"] {
        let live = dir.path().join("internal").join(state);
        std::fs::remove_dir_all(&live).unwrap();
        copy_dir(&saved.path().join(state), &live);
    }

    let broker = broker.start_again();
    create_topic(&broker, "t", 1).await;
    let new: Vec<v1::Record> = (0..3).map(|i| record(None, &format!("NEW-{i}"))).collect();
    broker
        .producer()
        .await
        .produce(produce_request("t", Some(0), new))
        .await
        .unwrap();
    assert!(
        fetch_offsets(&broker, "g").await.is_empty(),
        "the new topic obeys the old topic's offsets"
    );
    let mut groups = GroupServiceClient::new(broker.channel().await);
    let member = groups
        .join_group(v1::JoinGroupRequest {
            group_id: "g".into(),
            instance_id: None,
            topics: vec!["t".into()],
            session_timeout_ms: 60_000,
        })
        .await
        .unwrap()
        .into_inner();
    let assigned = groups
        .heartbeat(v1::HeartbeatRequest {
            group_id: "g".into(),
            member_id: member.member_id.clone(),
            owned: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .assigned;
    groups
        .heartbeat(v1::HeartbeatRequest {
            group_id: "g".into(),
            member_id: member.member_id.clone(),
            owned: assigned,
        })
        .await
        .unwrap();
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    let retries = dlq
        .fetch_retries(v1::FetchRetriesRequest {
            group_id: "g".into(),
            member_id: member.member_id,
            max_records: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .records;
    let served: Vec<String> = retries
        .iter()
        .map(|r| String::from_utf8_lossy(&r.record.as_ref().unwrap().value).into_owned())
        .collect();
    assert!(
        served.is_empty(),
        "the old topic's retries are served: {served:?}"
    );
    let described = groups
        .describe_group(v1::DescribeGroupRequest {
            group_id: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let offsets: Vec<Option<u64>> = described
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .collect();
    assert_eq!(offsets, [None]);
    assert!(
        described.dead_letters.iter().all(|d| d.retry_set_size == 0),
        "{:?}",
        described.dead_letters
    );
}
