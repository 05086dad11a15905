//! Records lost to a damaged segment, as the client sees them: a typed
//! error carrying the next readable offset; consumers stop on it by
//! default and skip past it when asked; the CLI shows the loss.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_client::{
    Admin, ClientConfig, Consumer, Error, GroupConfig, GroupConsumer, Producer, ProducerConfig,
    Record, StartFrom, TopicSettings,
};
use sluice_testkit::{Broker, broker_binary};

const RECORDS: u64 = 120;

/// A broker whose topic `t` lost the second half of its second segment.
/// Returns it with the lost range.
async fn damaged_broker(dir: &Path) -> (Broker, u64, u64) {
    let mut broker = Broker::start(&broker_binary(), dir, &[]);
    let config = ClientConfig::new(broker.url());
    let settings = TopicSettings {
        partitions: Some(1),
        segment_bytes: Some(8192),
        max_record_bytes: Some(1024),
        ..Default::default()
    };
    Admin::new(&config)
        .unwrap()
        .create_topic_with("t", settings)
        .await
        .unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    for i in 0..RECORDS {
        producer
            .send("t", Record::new(format!("{i}:{}", "v".repeat(200))))
            .await
            .unwrap();
    }
    producer.close().await.unwrap();
    assert!(broker.stop(Duration::from_secs(15)).success());
    let mut logs: Vec<PathBuf> = std::fs::read_dir(dir.join("topics/t/0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    assert!(logs.len() >= 3, "{logs:?}");
    let mut bytes = std::fs::read(&logs[1]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 64].fill(0x77);
    std::fs::write(&logs[1], &bytes).unwrap();
    let broker = broker.start_again();
    let admin = Admin::new(&ClientConfig::new(broker.url())).unwrap();
    let info = admin.describe_topic("t").await.unwrap();
    let lost = &info.partitions[0].lost_ranges;
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].file, logs[1].to_str().unwrap());
    (broker, lost[0].start_offset, lost[0].next_offset)
}

async fn next(consumer: &mut Consumer) -> sluice_client::Result<sluice_client::ConsumedRecord> {
    tokio::time::timeout(Duration::from_secs(30), consumer.next_record())
        .await
        .expect("the consumer answers")
        .expect("assigned")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_stop_at_lost_records_unless_told_to_skip() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, lost_from, next_offset) = damaged_broker(dir.path()).await;
    let config = ClientConfig::new(broker.url());

    // By default: every record before the loss, then the typed error.
    let mut consumer = Consumer::new(&config).unwrap();
    consumer
        .assign("t", &[0], StartFrom::Earliest)
        .await
        .unwrap();
    for offset in 0..lost_from {
        assert_eq!(next(&mut consumer).await.unwrap().offset, offset);
    }
    match next(&mut consumer).await {
        Err(Error::DataLoss {
            next_offset: to,
            message,
        }) => {
            assert_eq!(to, next_offset);
            assert!(
                message.contains(&format!("offsets {lost_from}..{next_offset}")),
                "{message}"
            );
        }
        other => panic!("expected DataLoss, got {other:?}"),
    }
    // Seeking to the next readable offset goes on.
    consumer
        .seek("t", 0, StartFrom::Offset(next_offset))
        .await
        .unwrap();
    assert_eq!(next(&mut consumer).await.unwrap().offset, next_offset);

    // Asked to skip: everything readable, in order.
    let mut consumer = Consumer::new(&config).unwrap();
    consumer.set_skip_data_loss(true);
    consumer
        .assign("t", &[0], StartFrom::Earliest)
        .await
        .unwrap();
    let expected: Vec<u64> = (0..lost_from).chain(next_offset..RECORDS).collect();
    let mut offsets = Vec::new();
    while offsets.len() < expected.len() {
        offsets.push(next(&mut consumer).await.unwrap().offset);
    }
    assert_eq!(offsets, expected);

    // The group consumer: stops by default, skips when asked.
    let mut group = GroupConsumer::new(&config, GroupConfig::new("g1", ["t"])).unwrap();
    let error = loop {
        match tokio::time::timeout(Duration::from_secs(30), group.next())
            .await
            .expect("the group consumer answers")
        {
            Ok(record) => assert!(record.offset < lost_from),
            Err(error) => break error,
        }
    };
    assert!(
        matches!(error, Error::DataLoss { next_offset: to, .. } if to == next_offset),
        "{error:?}"
    );
    group.close().await.unwrap();
    let mut settings = GroupConfig::new("g2", ["t"]);
    settings.skip_data_loss = true;
    let mut group = GroupConsumer::new(&config, settings).unwrap();
    let mut offsets = Vec::new();
    while offsets.len() < expected.len() {
        let record = tokio::time::timeout(Duration::from_secs(30), group.next())
            .await
            .expect("the group consumer answers")
            .unwrap();
        offsets.push(record.offset);
    }
    assert_eq!(offsets, expected);
    group.close().await.unwrap();

    // The CLI: describe shows the loss; consume stops on it or skips it.
    let sluice = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg("--broker")
            .arg(broker.url())
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = sluice(&["topic", "describe", "t"]);
    assert!(ok, "{err}");
    assert!(out.contains("DAMAGED"), "{out}");
    assert!(
        out.contains(&format!("lost offsets {lost_from}..{next_offset}")),
        "{out}"
    );
    let (ok, out, err) = sluice(&["consume", "t"]);
    assert!(!ok, "consume must stop on lost records: {out}");
    assert!(err.contains("data loss"), "{err}");
    assert_eq!(out.lines().count() as u64, lost_from);
    let (ok, out, err) = sluice(&["consume", "t", "--skip-data-loss"]);
    assert!(ok, "{err}");
    assert!(err.contains("skipping records lost to damage"), "{err}");
    assert_eq!(out.lines().count(), expected.len());
}
