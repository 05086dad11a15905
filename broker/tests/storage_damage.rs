//! Damaged and missing segment files, through the real broker binary: the
//! broker starts, every other topic serves, the damaged partition serves
//! everything around the loss, a read inside it gets DATA_LOSS with the
//! next readable offset in a trailer, and DescribeTopic shows the loss.

mod grpc_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use grpc_common::*;
use sluice_proto::v1;
use sluice_testkit::Broker;
use tokio_stream::StreamExt;
use tonic::Code;

const RECORDS: u64 = 120;

/// Starts a broker with a 4 KiB-segment topic `hurt` and a two-partition
/// topic `fine`, writes `RECORDS` records to each partition (one request per
/// record, so many batches and segments), and stops it cleanly.
async fn broker_with_data(dir: &Path) -> Broker {
    let mut broker = start_broker(dir, &[]);
    create_topic_with(
        &broker,
        "hurt",
        v1::TopicConfig {
            partitions: Some(1),
            segment_bytes: Some(8192),
            max_record_bytes: Some(1024),
            ..Default::default()
        },
    )
    .await;
    create_topic(&broker, "fine", 2).await;
    let mut producer = broker.producer().await;
    for i in 0..RECORDS {
        for (topic, partition) in [("hurt", 0), ("fine", 0), ("fine", 1)] {
            let value = format!("{topic}-{partition}-{i}-{}", "x".repeat(200));
            producer
                .produce(produce_request(
                    topic,
                    Some(partition),
                    vec![record(None, &value)],
                ))
                .await
                .unwrap();
        }
    }
    assert!(broker.stop(Duration::from_secs(15)).success());
    broker
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir.join("topics/hurt/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs
}

fn base_of(path: &Path) -> u64 {
    path.file_stem().unwrap().to_str().unwrap().parse().unwrap()
}

async fn fetch(
    broker: &Broker,
    topic: &str,
    offset: u64,
) -> Result<v1::FetchResponse, tonic::Status> {
    broker
        .consumer()
        .await
        .fetch(v1::FetchRequest {
            topic: topic.into(),
            partition: 0,
            offset,
            max_records: 1000,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner())
}

/// Reads `hurt` from 0 by fetch, following DATA_LOSS trailers; returns the
/// offsets read and the losses met as (first lost offset, status).
async fn read_across_losses(broker: &Broker) -> (Vec<u64>, Vec<(u64, tonic::Status)>) {
    let mut offsets = Vec::new();
    let mut losses = Vec::new();
    let mut next = 0;
    while next < RECORDS {
        match fetch(broker, "hurt", next).await {
            Ok(response) => {
                assert!(!response.records.is_empty(), "nothing at {next}");
                for r in &response.records {
                    assert_eq!(
                        value_of(r),
                        format!("hurt-0-{}-{}", r.offset, "x".repeat(200))
                    );
                }
                offsets.extend(response.records.iter().map(|r| r.offset));
                next = response.next_offset;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::DataLoss, "{status:?}");
                let to: u64 = status
                    .metadata()
                    .get("sluice-next-offset")
                    .expect("next offset trailer")
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(to > next);
                losses.push((next, status));
                next = to;
            }
        }
    }
    (offsets, losses)
}

async fn describe_hurt(broker: &Broker) -> v1::PartitionDescription {
    broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest {
            name: "hurt".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .partitions
        .remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_sealed_segment_loses_one_range_and_everything_else_serves() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_data(dir.path()).await;
    let logs = segments(dir.path());
    assert!(logs.len() >= 4, "{logs:?}");
    // 64 bytes of garbage in the middle of the second sealed segment.
    let damaged = &logs[1];
    let mut bytes = std::fs::read(damaged).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 64].fill(0xa5);
    std::fs::write(damaged, &bytes).unwrap();

    let broker = broker.start_again();
    // Every other topic serves in full.
    for partition in 0..2 {
        let records = fetch_all(&broker, "fine", partition).await;
        assert_eq!(records.len() as u64, RECORDS);
    }
    // The damaged partition: one loss, from inside the segment to the next.
    let (offsets, losses) = read_across_losses(&broker).await;
    assert_eq!(losses.len(), 1, "{losses:?}");
    let (lost_from, status) = &losses[0];
    let next = base_of(&logs[2]);
    assert!(*lost_from > base_of(damaged) && *lost_from < next);
    let message = status.message();
    for needle in [
        damaged.to_str().unwrap().to_owned(),
        format!("offsets {lost_from}..{next}"),
        format!("next readable offset is {next}"),
        "at byte".to_owned(),
    ] {
        assert!(message.contains(&needle), "{message:?} lacks {needle:?}");
    }
    assert_eq!(
        status
            .metadata()
            .get("sluice-error")
            .unwrap()
            .to_str()
            .unwrap(),
        "data-loss"
    );
    let expected: Vec<u64> = (0..*lost_from).chain(next..RECORDS).collect();
    assert_eq!(offsets, expected);
    // A read in the middle of the range is refused the same way.
    let status = fetch(&broker, "hurt", lost_from + 1).await.unwrap_err();
    assert_eq!(status.code(), Code::DataLoss);
    // A subscription from the start delivers up to the loss, then ends
    // with DATA_LOSS.
    let mut stream = broker
        .consumer()
        .await
        .subscribe(v1::SubscribeRequest {
            topic: "hurt".into(),
            partitions: vec![0],
            start: Some(v1::subscribe_request::Start::Offset(0)),
            max_batch_records: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut delivered = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("subscription answers")
        {
            Some(Ok(message)) => delivered += message.records.len() as u64,
            Some(Err(status)) => break status,
            None => panic!("stream ended without DATA_LOSS"),
        }
    };
    assert_eq!(delivered, *lost_from);
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("sluice-next-offset")
            .unwrap()
            .to_str()
            .unwrap(),
        next.to_string()
    );
    // Describe shows the damage.
    let description = describe_hurt(&broker).await;
    assert_eq!(description.lost_ranges.len(), 1);
    let range = &description.lost_ranges[0];
    assert_eq!(range.file, damaged.to_str().unwrap());
    assert_eq!((range.start_offset, range.next_offset), (*lost_from, next));
    assert!(range.position > 0 && range.position <= middle as u64);
    assert_eq!(
        description.latest_offset, RECORDS,
        "offsets stay what they were"
    );
    // The partition still takes writes, at the old end.
    let response = broker
        .producer()
        .await
        .produce(produce_request(
            "hurt",
            Some(0),
            vec![record(None, "after")],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.positions[0].offset, RECORDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_middle_segment_is_a_lost_range() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_data(dir.path()).await;
    let logs = segments(dir.path());
    assert!(logs.len() >= 4, "{logs:?}");
    std::fs::remove_file(&logs[2]).unwrap();
    let broker = broker.start_again();
    let (offsets, losses) = read_across_losses(&broker).await;
    let (lost_from, next) = (base_of(&logs[2]), base_of(&logs[3]));
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert_eq!(losses[0].0, lost_from);
    let message = losses[0].1.message();
    assert!(message.contains(logs[2].to_str().unwrap()), "{message}");
    assert!(
        message.contains(&format!("next readable offset is {next}")),
        "{message}"
    );
    let expected: Vec<u64> = (0..lost_from).chain(next..RECORDS).collect();
    assert_eq!(offsets, expected);
    let description = describe_hurt(&broker).await;
    assert_eq!(description.lost_ranges.len(), 1);
    assert_eq!(description.lost_ranges[0].file, logs[1].to_str().unwrap());
    assert_eq!(
        (
            description.lost_ranges[0].start_offset,
            description.lost_ranges[0].next_offset
        ),
        (lost_from, next)
    );
    assert_eq!(fetch_all(&broker, "fine", 1).await.len() as u64, RECORDS);
}

fn check(dir: &Path, repair: bool) -> (i32, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-broker"));
    command.args(["check", "--data-dir", dir.to_str().unwrap()]);
    if repair {
        command.arg("--repair");
    }
    let output = command.output().unwrap();
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_damage_and_repair_moves_only_damaged_bytes_aside() {
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_with_data(dir.path()).await;
    let (code, text) = check(dir.path(), false);
    assert_eq!(code, 0, "a clean directory: {text}");
    let logs = segments(dir.path());
    let damaged = &logs[1];
    let original = std::fs::read(damaged).unwrap();
    let middle = original.len() / 2;
    let mut bytes = original.clone();
    bytes[middle..middle + 64].fill(0xa5);
    std::fs::write(damaged, &bytes).unwrap();
    let stray = dir.path().join("topics/fine/1/notes.txt");
    std::fs::write(&stray, b"not ours").unwrap();
    std::fs::write(dir.path().join("meta/topics.json"), b"{ not json").unwrap();

    let (code, text) = check(dir.path(), false);
    assert_eq!(code, 1, "{text}");
    for needle in [
        damaged.to_str().unwrap(),
        stray.to_str().unwrap(),
        "topics.json",
        "damaged at byte",
    ] {
        assert!(text.contains(needle), "{needle:?} not in {text}");
    }
    assert_eq!(
        std::fs::read(damaged).unwrap(),
        bytes,
        "a check changes nothing"
    );

    let (code, text) = check(dir.path(), true);
    assert_eq!(code, 1, "the lost range is still reported: {text}");
    let aside = std::fs::read(format!("{}.damaged", damaged.display())).unwrap();
    let kept = std::fs::read(damaged).unwrap();
    assert!(kept.len() <= middle, "cut before the damage");
    assert_eq!(
        &original[..kept.len()],
        &kept[..],
        "valid batches untouched"
    );
    assert_eq!(&bytes[kept.len()..], &aside[..], "the rest moved aside");
    assert!(stray.exists(), "a stray file is never touched");

    // The broker starts from topics.json.prev and serves what it did before.
    let broker = broker.start_again();
    let (offsets, losses) = read_across_losses(&broker).await;
    assert_eq!(losses.len(), 1);
    assert_eq!(
        offsets.len() as u64 + (base_of(&logs[2]) - losses[0].0),
        RECORDS
    );
    assert_eq!(fetch_all(&broker, "fine", 1).await.len() as u64, RECORDS);
}
