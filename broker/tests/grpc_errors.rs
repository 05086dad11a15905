//! Bad input over gRPC, one test per kind: the right status code, a message
//! that names the problem, and nothing changed. Each runs the real broker
//! binary on a free port with a temp data dir.

mod grpc_common;

use std::time::{Duration, Instant};

use grpc_common::*;
use sluice_proto::v1;
use tokio_stream::StreamExt;
use tonic::Code;

/// Names of every topic, in order.
async fn topic_names(broker: &sluice_testkit::Broker) -> Vec<String> {
    broker
        .admin()
        .await
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics
        .into_iter()
        .map(|t| t.name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_topic_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let mut admin = broker.admin().await;
    let mut producer = broker.producer().await;
    let mut consumer = broker.consumer().await;
    let s = status_of(
        producer
            .produce(produce_request("nope", None, vec![record(None, "x")]))
            .await,
    );
    expect_status(&s, Code::NotFound, "\"nope\" does not exist");
    let s = status_of(
        consumer
            .fetch(v1::FetchRequest {
                topic: "nope".into(),
                ..Default::default()
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "nope");
    let s = status_of(
        consumer
            .subscribe(v1::SubscribeRequest {
                topic: "nope".into(),
                partitions: vec![],
                start: Some(v1::subscribe_request::Start::Offset(0)),
                max_batch_records: 0,
                ..Default::default()
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "nope");
    let s = status_of(
        consumer
            .list_offsets(v1::ListOffsetsRequest {
                topic: "nope".into(),
                partitions: vec![],
                spec: Some(v1::list_offsets_request::Spec::TimestampMs(0)),
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "nope");
    let s = status_of(
        admin
            .describe_topic(v1::DescribeTopicRequest {
                name: "nope".into(),
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "nope");
    let s = status_of(
        admin
            .delete_topic(v1::DeleteTopicRequest {
                name: "nope".into(),
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "nope");
    let s = status_of(
        admin
            .alter_topic_config(v1::AlterTopicConfigRequest {
                name: "nope".into(),
                config: None,
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "nope");
    assert!(topic_names(&broker).await.is_empty(), "nothing was created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_partition_is_not_found_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 2).await;
    let s = status_of(
        broker
            .producer()
            .await
            .produce(produce_request("t", Some(7), vec![record(None, "x")]))
            .await,
    );
    expect_status(&s, Code::NotFound, "no partition 7");
    let mut consumer = broker.consumer().await;
    let s = status_of(
        consumer
            .fetch(v1::FetchRequest {
                topic: "t".into(),
                partition: 9,
                ..Default::default()
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "no partition 9");
    let s = status_of(
        consumer
            .subscribe(v1::SubscribeRequest {
                topic: "t".into(),
                partitions: vec![0, 2],
                start: Some(v1::subscribe_request::Start::Offset(0)),
                max_batch_records: 0,
                ..Default::default()
            })
            .await,
    );
    expect_status(&s, Code::NotFound, "no partition 2");
    for partition in 0..2 {
        assert!(fetch_all(&broker, "t", partition).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_topic_name_is_invalid_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let mut admin = broker.admin().await;
    let long = "x".repeat(250);
    for (name, needle) in [
        ("has space", "only ASCII letters, digits"),
        ("slash/no", "only ASCII letters, digits"),
        ("ünï", "only ASCII letters, digits"),
        ("", "it is empty"),
        (".", "reserved"),
        ("..", "reserved"),
        (long.as_str(), "longer than 249"),
    ] {
        let s = status_of(
            admin
                .create_topic(v1::CreateTopicRequest {
                    name: name.into(),
                    config: None,
                })
                .await,
        );
        expect_status(&s, Code::InvalidArgument, "invalid topic name");
        expect_status(&s, Code::InvalidArgument, needle);
    }
    assert!(topic_names(&broker).await.is_empty());
    let topics_dir = dir.path().join("topics");
    assert_eq!(
        std::fs::read_dir(&topics_dir).unwrap().count(),
        0,
        "no directory was made under {}",
        topics_dir.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_partition_count_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &["--max-partitions", "16"]);
    let mut admin = broker.admin().await;
    for partitions in [0, 17, 100_000] {
        let s = status_of(
            admin
                .create_topic(v1::CreateTopicRequest {
                    name: "p".into(),
                    config: Some(v1::TopicConfig {
                        partitions: Some(partitions),
                        ..Default::default()
                    }),
                })
                .await,
        );
        expect_status(&s, Code::InvalidArgument, "partition count");
        expect_status(&s, Code::InvalidArgument, "1..=16");
    }
    assert!(topic_names(&broker).await.is_empty());
    // The count is fixed once the topic exists.
    create_topic(&broker, "p", 3).await;
    let s = status_of(
        admin
            .alter_topic_config(v1::AlterTopicConfigRequest {
                name: "p".into(),
                config: Some(v1::TopicConfig {
                    partitions: Some(4),
                    retention_ms: Some(1),
                    ..Default::default()
                }),
            })
            .await,
    );
    expect_status(&s, Code::InvalidArgument, "cannot be changed");
    let described = admin
        .describe_topic(v1::DescribeTopicRequest { name: "p".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.partitions.len(), 3);
    let config = described.config.unwrap();
    assert_eq!(config.partitions, Some(3));
    assert_ne!(
        config.retention_ms,
        Some(1),
        "a refused change changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_setting_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(
        dir.path(),
        &[
            "--max-message-bytes",
            "1048576",
            "--max-record-bytes",
            "1000",
        ],
    );
    let mut admin = broker.admin().await;
    for (config, needle) in [
        (
            v1::TopicConfig {
                flush: Some("sometimes".into()),
                ..Default::default()
            },
            "flush policy",
        ),
        (
            v1::TopicConfig {
                segment_bytes: Some(100),
                ..Default::default()
            },
            "do not fit",
        ),
        (
            v1::TopicConfig {
                max_record_bytes: Some(2 * 1024 * 1024),
                ..Default::default()
            },
            "above the broker's limit",
        ),
    ] {
        let s = status_of(
            admin
                .create_topic(v1::CreateTopicRequest {
                    name: "s".into(),
                    config: Some(config),
                })
                .await,
        );
        expect_status(&s, Code::InvalidArgument, needle);
    }
    assert!(topic_names(&broker).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_topic_already_exists_and_keeps_its_settings() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 2).await;
    let mut admin = broker.admin().await;
    let s = status_of(
        admin
            .create_topic(v1::CreateTopicRequest {
                name: "t".into(),
                config: Some(v1::TopicConfig {
                    partitions: Some(5),
                    ..Default::default()
                }),
            })
            .await,
    );
    expect_status(&s, Code::AlreadyExists, "\"t\" already exists");
    let described = admin
        .describe_topic(v1::DescribeTopicRequest { name: "t".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.partitions.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_batch_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    let mut producer = broker.producer().await;
    let s = status_of(producer.produce(produce_request("t", None, vec![])).await);
    expect_status(&s, Code::InvalidArgument, "at least one record");
    // On a stream the request is answered with the error; the stream goes on.
    let mut responses = producer
        .produce_stream(tokio_stream::iter([
            produce_request("t", Some(0), vec![]),
            produce_request("t", Some(0), vec![record(None, "after")]),
        ]))
        .await
        .unwrap()
        .into_inner();
    let refused = responses.next().await.unwrap().unwrap();
    assert_eq!(refused.error_code, Code::InvalidArgument as i32);
    assert!(refused.error_message.contains("at least one record"));
    let accepted = responses.next().await.unwrap().unwrap();
    assert_eq!(accepted.response.unwrap().positions[0].offset, 0);
    assert_eq!(fetch_all(&broker, "t", 0).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_size_limit_rejects_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &["--max-record-bytes", "1000"]);
    create_topic(&broker, "t", 3).await;
    let mut producer = broker.producer().await;
    let big = "x".repeat(1001);
    // Keyed records spread over the partitions; the bad one is last.
    let mut records: Vec<v1::Record> = (0..20)
        .map(|i| record(Some(&format!("k{i}")), "fine"))
        .collect();
    records.push(record(Some("k0"), &big));
    let s = status_of(producer.produce(produce_request("t", None, records)).await);
    expect_status(&s, Code::InvalidArgument, "record 20 is");
    expect_status(&s, Code::InvalidArgument, "at most 1000 bytes");
    for partition in 0..3 {
        assert!(
            fetch_all(&broker, "t", partition).await.is_empty(),
            "partition {partition} was written"
        );
    }
    // Headers count too.
    let mut with_headers = record(None, "small");
    with_headers.headers.push(v1::Header {
        key: "h".into(),
        value: big.clone().into(),
    });
    let s = status_of(
        producer
            .produce(produce_request("t", Some(0), vec![with_headers]))
            .await,
    );
    expect_status(&s, Code::InvalidArgument, "record 0 is");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offset_out_of_range_is_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, a size limit and frequent maintenance, so retention
    // deletes the oldest records while the test watches.
    let broker = start_broker(
        dir.path(),
        &[
            "--max-record-bytes",
            "1000",
            "--maintenance-interval-ms",
            "50",
        ],
    );
    create_topic_with(
        &broker,
        "t",
        v1::TopicConfig {
            partitions: Some(1),
            segment_bytes: Some(8192),
            retention_bytes: Some(16384),
            ..Default::default()
        },
    )
    .await;
    let mut consumer = broker.consumer().await;
    let fetch = |offset| v1::FetchRequest {
        topic: "t".into(),
        partition: 0,
        offset,
        ..Default::default()
    };
    let s = status_of(consumer.fetch(fetch(1)).await);
    expect_status(&s, Code::OutOfRange, "offset 1 is out of range");
    let at_end = consumer.fetch(fetch(0)).await.unwrap().into_inner();
    assert!(at_end.records.is_empty(), "the end itself is in range");

    let mut producer = broker.producer().await;
    for i in 0..100 {
        producer
            .produce(produce_request(
                "t",
                Some(0),
                vec![record(None, &format!("{i:0>500}"))],
            ))
            .await
            .unwrap();
    }
    let s = status_of(consumer.fetch(fetch(101)).await);
    expect_status(&s, Code::OutOfRange, "offset 101 is out of range");

    // The periodic retention task deletes old segments.
    let deadline = Instant::now() + Duration::from_secs(10);
    let start = loop {
        let start = consumer
            .list_offsets(v1::ListOffsetsRequest {
                topic: "t".into(),
                partitions: vec![0],
                spec: Some(v1::list_offsets_request::Spec::Position(
                    v1::OffsetSpec::Earliest as i32,
                )),
            })
            .await
            .unwrap()
            .into_inner()
            .offsets[0]
            .offset;
        if start > 0 {
            break start;
        }
        assert!(Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let s = status_of(consumer.fetch(fetch(0)).await);
    expect_status(&s, Code::OutOfRange, "offset 0 is out of range");
    let first = consumer.fetch(fetch(start)).await.unwrap().into_inner();
    assert_eq!(first.records[0].offset, start);
    assert_eq!(first.log_start_offset, start);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_message_limit_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(
        dir.path(),
        &[
            "--max-record-bytes",
            "1000",
            "--max-message-bytes",
            "200000",
        ],
    );
    create_topic(&broker, "t", 1).await;
    let mut producer = broker.producer().await;
    let huge: Vec<v1::Record> = (0..400).map(|_| record(None, &"y".repeat(900))).collect();
    let s = status_of(
        producer
            .produce(produce_request("t", Some(0), huge.clone()))
            .await,
    );
    expect_status(&s, Code::ResourceExhausted, "too large");
    expect_status(&s, Code::ResourceExhausted, "200000");
    let mut stream = producer
        .produce_stream(tokio_stream::iter([produce_request("t", Some(0), huge)]))
        .await
        .unwrap()
        .into_inner();
    let refused = stream.next().await.unwrap().unwrap();
    assert_eq!(
        refused.error_code,
        Code::ResourceExhausted as i32,
        "{refused:?}"
    );
    assert!(fetch_all(&broker, "t", 0).await.is_empty());
    // Just under the limit is fine.
    let fits: Vec<v1::Record> = (0..150).map(|_| record(None, &"y".repeat(900))).collect();
    producer
        .produce(produce_request("t", Some(0), fits))
        .await
        .unwrap();
    assert_eq!(fetch_all(&broker, "t", 0).await.len(), 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_unknown_start_or_spec_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    let mut consumer = broker.consumer().await;
    let subscribe = |start| v1::SubscribeRequest {
        topic: "t".into(),
        partitions: vec![],
        start,
        max_batch_records: 0,
        ..Default::default()
    };
    let s = status_of(consumer.subscribe(subscribe(None)).await);
    expect_status(&s, Code::InvalidArgument, "where to start");
    let s = status_of(
        consumer
            .subscribe(subscribe(Some(v1::subscribe_request::Start::Position(0))))
            .await,
    );
    expect_status(&s, Code::InvalidArgument, "start position 0");
    let list = |spec| v1::ListOffsetsRequest {
        topic: "t".into(),
        partitions: vec![],
        spec,
    };
    let s = status_of(consumer.list_offsets(list(None)).await);
    expect_status(&s, Code::InvalidArgument, "say which offset");
    let s = status_of(
        consumer
            .list_offsets(list(Some(v1::list_offsets_request::Spec::Position(9))))
            .await,
    );
    expect_status(&s, Code::InvalidArgument, "offset spec 9");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_a_lowered_message_limit_is_resource_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    broker
        .producer()
        .await
        .produce(produce_request(
            "t",
            Some(0),
            vec![record(None, &"b".repeat(50_000)), record(None, "small")],
        ))
        .await
        .unwrap();
    // Restarted with a message limit below that record's size, the broker
    // cannot send it: it says so instead of failing inside the transport.
    let mut broker = broker;
    assert!(broker.stop(Duration::from_secs(15)).success());
    let broker = start_broker(
        dir.path(),
        &["--max-message-bytes", "20000", "--max-record-bytes", "1000"],
    );
    let mut consumer = broker.consumer().await;
    let s = status_of(
        consumer
            .fetch(v1::FetchRequest {
                topic: "t".into(),
                ..Default::default()
            })
            .await,
    );
    expect_status(&s, Code::ResourceExhausted, "record at offset 0");
    expect_status(&s, Code::ResourceExhausted, "--max-message-bytes");
    let next = consumer
        .fetch(v1::FetchRequest {
            topic: "t".into(),
            offset: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.records[0].value, "small");
}
