//! A full disk against the real broker binary, on a 48 MiB tmpfs (needs
//! root to mount; without it the test prints a note and passes): produce
//! is refused with RESOURCE_EXHAUSTED below the free-space reserve and on a
//! completely full disk; after a SIGKILL the broker starts on the still-full
//! disk and serves every acknowledged record; a topic can be deleted; and
//! writes resume without a restart once space is freed.

mod common;
mod grpc_common;

use std::time::{Duration, Instant};

use grpc_common::*;
use sluice_proto::v1::{self, group_service_client::GroupServiceClient};
use tonic::Code;

const RECORD_BYTES: usize = 4000;

fn payload(tag: &str, n: usize) -> String {
    let mut v = format!("{tag}-{n}-");
    v.push_str(&"x".repeat(RECORD_BYTES - v.len()));
    v
}

/// Produces 16 records `tag-n..` to `topic`; the response or the status.
async fn produce16(
    broker: &sluice_testkit::Broker,
    topic: &str,
    tag: &str,
    first: usize,
) -> Result<(), tonic::Status> {
    let records = (first..first + 16)
        .map(|n| record(None, &payload(tag, n)))
        .collect();
    broker
        .producer()
        .await
        .produce(produce_request(topic, Some(0), records))
        .await
        .map(|_| ())
}

/// Commits offset `offset` of full/0 for group "g" (no members, so a
/// committer outside the group may).
async fn commit(broker: &sluice_testkit::Broker, offset: u64) -> Result<(), tonic::Status> {
    GroupServiceClient::new(broker.channel().await)
        .commit_offsets(v1::CommitOffsetsRequest {
            group_id: "g".into(),
            member_id: String::new(),
            member_epoch: 0,
            offsets: vec![v1::OffsetCommit {
                topic: "full".into(),
                partition: 0,
                offset,
                metadata: String::new(),
            }],
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_survives_a_kill_and_resumes() {
    let Some(disk) = common::SmallDisk::mount("48m") else {
        return;
    };
    let data = disk.path().join("data");
    let args = [
        "--segment-bytes",
        "1048576",
        "--max-record-bytes",
        "65536",
        "--min-free-bytes",
        "8388608",
    ];
    let mut broker = start_broker(&data, &args);
    create_topic(&broker, "spare", 1).await;
    create_topic(&broker, "full", 1).await;
    // 12 MiB in a topic that is deleted later to make room.
    for i in 0..192 {
        produce16(&broker, "spare", "spare", i * 16).await.unwrap();
    }
    // Fill up to the reserve: refused with a message naming it.
    let mut acknowledged = 0;
    let refused = loop {
        match produce16(&broker, "full", "full", acknowledged).await {
            Ok(()) => acknowledged += 16,
            Err(status) => break status,
        }
        assert!(acknowledged < 20_000, "the disk never filled up");
    };
    expect_status(&refused, Code::ResourceExhausted, "below the reserve");
    assert!(acknowledged > 1000, "only {acknowledged} records fit");
    // Then fill the disk completely, as another process might.
    let filler = disk.fill();
    let s = status_of(produce16(&broker, "full", "full", acknowledged).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");

    // SIGKILL, and start again on the still-full disk.
    broker.kill();
    let broker = broker.start_again();
    let records = fetch_all(&broker, "full", 0).await;
    assert_eq!(
        records.len(),
        acknowledged,
        "every acknowledged record is back"
    );
    for (n, r) in records.iter().enumerate() {
        assert_eq!(value_of(r), payload("full", n));
    }
    let described = broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest {
            name: "full".into(),
        })
        .await
        .expect("describe works on a full disk")
        .into_inner();
    assert_eq!(described.partitions.len(), 1);
    let s = status_of(produce16(&broker, "full", "full", acknowledged).await);
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    // A commit needs space too (the offsets log has none allocated yet).
    let s = status_of(commit(&broker, 16).await);
    expect_status(&s, Code::ResourceExhausted, "no space left");

    // Deleting a topic works on the full disk and frees its space...
    broker
        .admin()
        .await
        .delete_topic(v1::DeleteTopicRequest {
            name: "spare".into(),
        })
        .await
        .expect("delete works on a full disk");
    // ...and writes resume by themselves, without a restart.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match produce16(&broker, "full", "full", acknowledged).await {
            Ok(()) => break,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                assert!(Instant::now() < deadline, "writes never resumed: {s:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    acknowledged += 16;
    commit(&broker, 16).await.expect("commits resume too");
    let records = fetch_all(&broker, "full", 0).await;
    assert_eq!(records.len(), acknowledged);
    drop(filler);
}
