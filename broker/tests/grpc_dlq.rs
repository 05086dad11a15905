//! Dead letters at the edges, against the real broker binary: names too
//! long for a real topic and group, dead letters that cannot be written
//! (and a restart with them pending), concurrent nacks of one record, and
//! retries handed out and never answered.

mod grpc_common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use grpc_common::{
    create_topic_with, expect_status, fetch_all, join_and_hold, produce_request, record,
};
use sluice_proto::v1::{
    self, dead_letter_service_client::DeadLetterServiceClient,
    group_service_client::GroupServiceClient,
};
use sluice_testkit::Broker;
use tonic::Code;

fn start_broker(dir: &std::path::Path, args: &[&str]) -> Broker {
    grpc_common::start_broker(dir, args)
}

async fn produce(broker: &Broker, topic: &str, count: usize) {
    let records = (0..count).map(|i| record(None, &format!("v{i}"))).collect();
    broker
        .producer()
        .await
        .produce(produce_request(topic, Some(0), records))
        .await
        .unwrap();
}

/// The records of a DLQ; none while it does not exist.
async fn dlq_records(broker: &Broker, dlq: &str) -> Vec<v1::ConsumedRecord> {
    let exists = broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest { name: dlq.into() })
        .await
        .is_ok();
    if exists {
        fetch_all(broker, dlq, 0).await
    } else {
        Vec::new()
    }
}

fn header<'a>(record: &'a v1::ConsumedRecord, name: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .map(|h| std::str::from_utf8(&h.value).unwrap())
}

fn nack(group: &str, member: &str, topic: &str, offset: u64) -> v1::NackRequest {
    v1::NackRequest {
        group_id: group.into(),
        member_id: member.into(),
        record: Some(v1::RecordRef {
            topic: topic.into(),
            partition: 0,
            offset,
        }),
        reason: "cannot parse".into(),
        error_class: "poison".into(),
    }
}

async fn describe(broker: &Broker, group: &str) -> v1::DescribeGroupResponse {
    GroupServiceClient::new(broker.channel().await)
        .describe_group(v1::DescribeGroupRequest {
            group_id: group.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// Issue 13, defect 1: a legal topic and a legal group can make a DLQ name
/// longer than a topic name may be. The name is checked for the real pair
/// where they meet, and refused there.
#[tokio::test]
async fn a_dlq_name_too_long_for_the_real_topic_and_group_is_refused_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let long_topic = "t".repeat(200);
    let long_group = "g".repeat(60);
    create_topic_with(&broker, &long_topic, v1::TopicConfig::default()).await;
    let refused = GroupServiceClient::new(broker.channel().await)
        .join_group(v1::JoinGroupRequest {
            group_id: long_group.clone(),
            instance_id: None,
            topics: vec![long_topic.clone()],
            session_timeout_ms: 10_000,
        })
        .await
        .unwrap_err();
    expect_status(&refused, Code::InvalidArgument, "not a valid topic name");
    assert!(
        refused.message().contains("dead-letter topic"),
        "{refused:?}"
    );
    // A shorter group is fine.
    join_and_hold(&broker, "billing", &long_topic).await;

    // A group's own template, valid for `t` and `g`, too long for itself.
    create_topic_with(&broker, "short", v1::TopicConfig::default()).await;
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    let refused = dlq
        .set_group_settings(v1::SetGroupSettingsRequest {
            group_id: "billing-team".into(),
            topic: "short".into(),
            settings: Some(v1::DeadLetterSettings {
                dlq_topic: Some(format!("{{group}}.{{topic}}.{}", "x".repeat(240))),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    expect_status(&refused, Code::InvalidArgument, "not a valid topic name");
}

/// Issue 13, defect 1: dead letters left pending by a crash that cannot be
/// written (their DLQ name is too long; their source topic was deleted)
/// neither stop the broker from starting nor the others from being
/// finished. They stay visible, undeliverable with the reason, and are
/// written once the cause is fixed.
#[tokio::test]
async fn unwritable_pending_dead_letters_do_not_stop_the_broker_and_are_kept_visible() {
    use sluice_broker::dlq::{NackOutcome, RecordLocation, RetryKey, RetryPolicy, RetrySets};
    use sluice_broker::storage::{BatchBuilder, ProducerInfo, Record};
    use sluice_broker::topics::{DeadLetterPatch, TopicConfigPatch, TopicDefaults, TopicRegistry};

    let dir = tempfile::tempdir().unwrap();
    // The state a crash leaves: three last failures recorded, none of them
    // appended to its DLQ yet.
    {
        let topics = TopicRegistry::open(dir.path(), TopicDefaults::default()).unwrap();
        for name in ["orders", "old"] {
            topics.create(name, &TopicConfigPatch::default()).unwrap();
            let batch = BatchBuilder::encode(
                &[Record {
                    key: None,
                    value: bytes::Bytes::from_static(b"refund"),
                    headers: vec![],
                    timestamp: 1,
                }],
                ProducerInfo::NONE,
            );
            let topic = topics.get(name).unwrap();
            topic.partitions()[0].appender().append(&batch, 0).unwrap();
        }
        let retries = RetrySets::open(dir.path().join("internal/retries")).unwrap();
        // A group template written before names were checked for the real
        // pair: far too long for "orders" and "long".
        retries
            .set_group_override(
                "long",
                "orders",
                DeadLetterPatch {
                    dlq_topic: Some(format!("{{topic}}.{{group}}.{}", "x".repeat(245))),
                    ..DeadLetterPatch::default()
                },
            )
            .unwrap();
        let last = RetryPolicy {
            max_deliveries: 1,
            ..RetryPolicy::default()
        };
        for (group, topic) in [("long", "orders"), ("ok", "orders"), ("gone", "old")] {
            let key = RetryKey {
                topic: topic.into(),
                partition: 0,
                offset: 0,
            };
            let at = RecordLocation {
                topic: topic.into(),
                partition: 0,
                offset: 0,
            };
            let outcome = retries.nack(group, key, at, "bad", "E", &last, 5).unwrap();
            assert!(matches!(outcome, NackOutcome::DeadLetter(_)));
        }
        // The source of one is deleted while its dead letter is pending.
        topics.delete("old").unwrap();
        retries.close().unwrap();
        topics.close().unwrap();
    }

    let broker = start_broker(dir.path(), &["--maintenance-interval-ms", "200"]);
    // The writable one was finished at startup.
    let ok = fetch_all(&broker, "orders.ok.dlq", 0).await;
    assert_eq!(ok.len(), 1);
    assert_eq!(ok[0].value.as_ref(), b"refund");
    // The others are kept, visible with why.
    let long = describe(&broker, "long").await;
    let status = long
        .dead_letters
        .iter()
        .find(|d| d.topic == "orders")
        .unwrap_or_else(|| panic!("{long:?}"));
    assert_eq!((status.retry_set_size, status.undeliverable), (1, 1));
    assert!(
        status
            .undeliverable_reason
            .contains("not a valid topic name"),
        "{status:?}"
    );
    // A pending dead letter whose source topic was deleted goes with the
    // topic (its record is gone with it): startup drops the retries of
    // deleted topics, and logs it, before finishing dead letters. The
    // group, known only by that entry, is gone too.
    let gone = GroupServiceClient::new(broker.channel().await)
        .describe_group(v1::DescribeGroupRequest {
            group_id: "gone".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    // The group's template is fixed: the next maintenance tick writes it.
    DeadLetterServiceClient::new(broker.channel().await)
        .set_group_settings(v1::SetGroupSettingsRequest {
            group_id: "long".into(),
            topic: "orders".into(),
            settings: Some(v1::DeadLetterSettings::default()),
        })
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Its retry set empties, and so the group, known only by it, goes.
    let mut groups = GroupServiceClient::new(broker.channel().await);
    loop {
        let status = groups
            .describe_group(v1::DescribeGroupRequest {
                group_id: "long".into(),
            })
            .await;
        if status.as_ref().is_err_and(|s| s.code() == Code::NotFound) {
            break;
        }
        assert!(Instant::now() < deadline, "not written: {status:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let letters = fetch_all(&broker, "orders.long.dlq", 0).await;
    assert_eq!(letters.len(), 1, "written once");
    assert_eq!(header(&letters[0], "sluice.dlq.group"), Some("long"));
}

/// Issue 13, defect 2: with max_deliveries 1, 20 records each nacked twice
/// at once (a client retrying a timed-out Nack) give 20 dead letters, and a
/// late nack is told where the record went.
#[tokio::test]
async fn concurrent_nacks_of_one_record_dead_letter_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic_with(
        &broker,
        "t",
        v1::TopicConfig {
            partitions: Some(1),
            max_deliveries: Some(1),
            ..Default::default()
        },
    )
    .await;
    produce(&broker, "t", 20).await;
    let (member, _) = join_and_hold(&broker, "g", "t").await;
    let client = DeadLetterServiceClient::new(broker.channel().await);
    let mut calls = Vec::new();
    for offset in 0..20 {
        for _ in 0..2 {
            let mut client = client.clone();
            let request = nack("g", &member, "t", offset);
            calls.push(tokio::spawn(async move {
                client.nack(request).await.map(|r| r.into_inner())
            }));
        }
    }
    for call in calls {
        let answer = call.await.unwrap().unwrap();
        assert!(answer.dead_lettered, "{answer:?}");
        assert_eq!(answer.deliveries, 1, "{answer:?}");
    }
    let letters = fetch_all(&broker, "t.g.dlq", 0).await;
    let sources: BTreeSet<&str> = letters
        .iter()
        .map(|l| header(l, "sluice.dlq.source-offset").unwrap())
        .collect();
    assert_eq!(letters.len(), 20, "each record dead-lettered once");
    assert_eq!(sources.len(), 20);
    // A late nack of one: where it went, nothing new.
    let late = client
        .clone()
        .nack(nack("g", &member, "t", 7))
        .await
        .unwrap()
        .into_inner();
    let at = letters
        .iter()
        .find(|l| header(l, "sluice.dlq.source-offset") == Some("7"))
        .unwrap()
        .offset;
    assert!(late.dead_lettered);
    assert_eq!((late.dlq_topic.as_str(), late.dlq_offset), ("t.g.dlq", at));
    assert_eq!(fetch_all(&broker, "t.g.dlq", 0).await.len(), 20);
    assert_eq!(
        describe(&broker, "g").await.dead_letters[0].retry_set_size,
        0
    );
}

/// Issue 13, defect 6: a retry handed out and neither acked nor nacked
/// (its consumer crashed on it) counts as a delivery when the redelivery
/// timeout passes, and reaches max_deliveries and the DLQ.
#[tokio::test]
async fn a_retry_never_answered_counts_as_a_delivery_and_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &["--redelivery-timeout-ms", "300"]);
    create_topic_with(
        &broker,
        "t",
        v1::TopicConfig {
            partitions: Some(1),
            max_deliveries: Some(3),
            retry_backoff_ms: Some(50),
            retry_backoff_max_ms: Some(50),
            ..Default::default()
        },
    )
    .await;
    produce(&broker, "t", 1).await;
    let (member, _) = join_and_hold(&broker, "g", "t").await;
    let mut client = DeadLetterServiceClient::new(broker.channel().await);
    let first = client
        .nack(nack("g", &member, "t", 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.deliveries, 1);
    // Fetch and never answer: the attempts handed out climb, then the
    // record leaves for the DLQ.
    let mut attempts = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while dlq_records(&broker, "t.g.dlq").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "not dead-lettered; attempts handed out: {attempts:?}"
        );
        let fetched = client
            .fetch_retries(v1::FetchRetriesRequest {
                group_id: "g".into(),
                member_id: member.clone(),
                max_records: 0,
            })
            .await
            .unwrap()
            .into_inner();
        for retry in fetched.records {
            if attempts.last() != Some(&retry.attempt) {
                attempts.push(retry.attempt);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(attempts, vec![2, 3]);
    let letters = fetch_all(&broker, "t.g.dlq", 0).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(header(&letters[0], "sluice.dlq.attempts"), Some("3"));
    assert_eq!(
        header(&letters[0], "sluice.dlq.error-class"),
        Some(sluice_broker::dlq::REDELIVERY_TIMEOUT_CLASS)
    );
    assert_eq!(
        describe(&broker, "g").await.dead_letters[0].retry_set_size,
        0
    );
}

/// Records in all partitions of `topic`.
async fn topic_size(broker: &Broker, topic: &str) -> u64 {
    broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest { name: topic.into() })
        .await
        .unwrap()
        .into_inner()
        .partitions
        .iter()
        .map(|p| p.latest_offset - p.earliest_offset)
        .sum()
}

/// Issue 13, defect 7 (crash test): a redrive to a topic SIGKILLed in the
/// middle of a chunk (its progress not saved), then run again after the
/// restart with the default range, leaves every dead letter in the target
/// exactly once.
#[tokio::test]
async fn a_redrive_to_a_topic_killed_mid_chunk_and_run_again_appends_each_record_once() {
    const LETTERS: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path(), &[]);
    for (name, partitions) in [("src", 1), ("src.g.dlq", 1), ("target", 3)] {
        create_topic_with(
            &broker,
            name,
            v1::TopicConfig {
                partitions: Some(partitions),
                ..Default::default()
            },
        )
        .await;
    }
    // Dead letters written straight into the DLQ (it is an ordinary topic).
    let mut producer = broker.producer().await;
    for first in (0..LETTERS).step_by(500) {
        let letters = (first..first + 500)
            .map(|i| {
                let mut r = record(Some(&format!("k{i}")), &format!("v{i}"));
                for (key, value) in [
                    ("sluice.dlq.source-topic", "src".to_string()),
                    ("sluice.dlq.source-partition", "0".to_string()),
                    ("sluice.dlq.source-offset", i.to_string()),
                    ("sluice.dlq.group", "g".to_string()),
                ] {
                    r.headers.push(v1::Header {
                        key: key.into(),
                        value: value.into_bytes().into(),
                    });
                }
                r
            })
            .collect();
        producer
            .produce(produce_request("src.g.dlq", Some(0), letters))
            .await
            .unwrap();
    }
    let redrive = v1::RedriveRequest {
        dlq_topic: "src.g.dlq".into(),
        partition: 0,
        target: v1::RedriveTarget::Topic as i32,
        target_topic: "target".into(),
        // A chunk is a tenth of a second's worth: all of them in one, so a
        // kill while the target is partly written lands mid-chunk.
        max_records_per_second: 100_000,
        ..Default::default()
    };
    let mut client = DeadLetterServiceClient::new(broker.channel().await);
    let running = {
        let redrive = redrive.clone();
        tokio::spawn(async move { client.redrive(redrive).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let written = loop {
        let written = topic_size(&broker, "target").await;
        if written >= 50 {
            break written;
        }
        assert!(Instant::now() < deadline, "the redrive did not start");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    broker.kill();
    let _ = running.await;
    assert!(
        written < LETTERS,
        "the kill came after the whole chunk ({written} written); make it larger"
    );

    let broker = broker.start_again();
    let before = topic_size(&broker, "target").await;
    assert!(
        before > 0 && before < LETTERS,
        "{before} written before the kill"
    );
    let again = DeadLetterServiceClient::new(broker.channel().await)
        .redrive(redrive)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        again.from_offset, 0,
        "the progress of the cut chunk was not saved"
    );
    let mut seen = BTreeSet::new();
    for partition in 0..3 {
        for record in fetch_all(&broker, "target", partition).await {
            let from = header(&record, "sluice.dlq.redriven-from")
                .unwrap()
                .to_owned();
            assert!(seen.insert(from.clone()), "{from} appended twice");
        }
    }
    assert_eq!(seen.len() as u64, LETTERS, "every dead letter once");
    // And the redrive's progress is saved: nothing left to do.
    let done = DeadLetterServiceClient::new(broker.channel().await)
        .redrive(v1::RedriveRequest {
            dlq_topic: "src.g.dlq".into(),
            target: v1::RedriveTarget::Topic as i32,
            target_topic: "target".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.records.is_empty());
    assert_eq!(topic_size(&broker, "target").await, LETTERS);
}
