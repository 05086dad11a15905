//! The broker over gRPC, as a client in any language sees it: the real
//! binary, a temp data dir, a free port.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use sluice_proto::v1;
use sluice_testkit::Broker;
use tokio_stream::StreamExt;
use tonic::Code;

fn record(key: Option<&str>, value: &str) -> v1::Record {
    v1::Record {
        key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
        value: Bytes::copy_from_slice(value.as_bytes()),
        headers: vec![v1::Header {
            key: "source".into(),
            value: Bytes::from_static(b"test"),
        }],
        timestamp_ms: 0,
    }
}

async fn create_topic(broker: &Broker, name: &str, partitions: u32) {
    broker
        .admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            config: Some(v1::TopicConfig {
                partitions: Some(partitions),
                ..Default::default()
            }),
        })
        .await
        .expect("create topic");
}

async fn fetch_all(broker: &Broker, topic: &str, partition: u32) -> Vec<v1::ConsumedRecord> {
    let mut consumer = broker.consumer().await;
    let mut out = Vec::new();
    let mut offset = 0;
    loop {
        let response = consumer
            .fetch(v1::FetchRequest {
                topic: topic.into(),
                partition,
                offset,
                max_records: 100,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        if response.records.is_empty() {
            return out;
        }
        offset = response.next_offset;
        out.extend(response.records);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_come_back_in_order_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "orders", 4).await;
    let mut producer = broker.producer().await;
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round in 0..20 {
        let records: Vec<v1::Record> = (0..25)
            .map(|i| {
                let key = format!("customer-{}", i % 7);
                let value = format!("{key}:{round}:{i}");
                sent.entry(key.clone()).or_default().push(value.clone());
                record(Some(&key), &value)
            })
            .collect();
        let response = producer
            .produce(v1::ProduceRequest {
                topic: "orders".into(),
                partition: None,
                records,
                request_id: round,
                producer: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.positions.len(), 25);
        for (i, position) in response.positions.iter().enumerate() {
            let key = format!("customer-{}", i % 7);
            assert_eq!(
                position.partition,
                sluice_proto::partition_for_key(key.as_bytes(), 4)
            );
        }
    }

    let check = |partitions: Vec<Vec<v1::ConsumedRecord>>| {
        let mut got: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (partition, records) in partitions.iter().enumerate() {
            for (i, r) in records.iter().enumerate() {
                assert_eq!(r.offset, i as u64, "dense offsets");
                assert_eq!(r.partition, partition as u32);
                assert_eq!(r.headers[0].key, "source");
                assert!(
                    r.timestamp_ms > 1_600_000_000_000,
                    "the broker stamped the time"
                );
                let key = String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap();
                got.entry(key)
                    .or_default()
                    .push(String::from_utf8(r.value.to_vec()).unwrap());
            }
        }
        assert_eq!(got, sent, "every record, each key in order");
    };
    let mut partitions = Vec::new();
    for p in 0..4 {
        partitions.push(fetch_all(&broker, "orders", p).await);
    }
    check(partitions);

    let broker = broker.restart();
    let mut partitions = Vec::new();
    for p in 0..4 {
        partitions.push(fetch_all(&broker, "orders", p).await);
    }
    check(partitions);
    let described = broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest {
            name: "orders".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let total: u64 = described.partitions.iter().map(|p| p.latest_offset).sum();
    assert_eq!(total, 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_receives_records_appended_after_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "events", 2).await;
    let mut producer = broker.producer().await;
    producer
        .produce(v1::ProduceRequest {
            topic: "events".into(),
            partition: Some(0),
            records: vec![record(None, "before")],
            request_id: 0,
            producer: None,
        })
        .await
        .unwrap();
    let mut stream = broker
        .consumer()
        .await
        .subscribe(v1::SubscribeRequest {
            topic: "events".into(),
            partitions: vec![],
            start: Some(v1::subscribe_request::Start::Position(
                v1::StartPosition::Latest as i32,
            )),
            max_batch_records: 0,
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 0..10 {
        producer
            .produce(v1::ProduceRequest {
                topic: "events".into(),
                partition: Some(i % 2),
                records: vec![record(None, &format!("after-{i}"))],
                request_id: 0,
                producer: None,
            })
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("pushed within 10 s")
            .expect("stream open")
            .unwrap();
        got.extend(
            message
                .records
                .into_iter()
                .map(|r| String::from_utf8(r.value.to_vec()).unwrap()),
        );
    }
    got.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("after-{i}")).collect();
    expected.sort();
    assert_eq!(got, expected, "nothing from before the subscription");

    // Starting from a timestamp or the earliest offset replays history.
    let replay = broker
        .consumer()
        .await
        .subscribe(v1::SubscribeRequest {
            topic: "events".into(),
            partitions: vec![0],
            start: Some(v1::subscribe_request::Start::Position(
                v1::StartPosition::Earliest as i32,
            )),
            max_batch_records: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(replay.records[0].value, "before");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_stream_produce_acknowledges_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "pipe", 1).await;
    let requests: Vec<v1::ProduceRequest> = (0..50)
        .map(|id| v1::ProduceRequest {
            topic: if id == 20 {
                "missing".into()
            } else {
                "pipe".into()
            },
            partition: Some(0),
            records: vec![
                record(None, &format!("r{id}a")),
                record(None, &format!("r{id}b")),
            ],
            request_id: id,
            producer: None,
        })
        .collect();
    let mut responses = broker
        .producer()
        .await
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let mut expected_offset = 0;
    for id in 0..50u64 {
        let response = responses.next().await.unwrap().unwrap();
        assert_eq!(response.request_id, id, "in order");
        if id == 20 {
            assert_eq!(response.error_code, Code::NotFound as i32);
            assert!(
                response.error_message.contains("missing"),
                "{}",
                response.error_message
            );
            continue;
        }
        let positions = response.response.unwrap().positions;
        assert_eq!(positions[0].offset, expected_offset);
        assert_eq!(positions[1].offset, expected_offset + 1);
        expected_offset += 2;
    }
    let records = fetch_all(&broker, "pipe", 0).await;
    assert_eq!(records.len(), 98);
    assert_eq!(records[40].value, "r21a", "the failed request left no gap");
}

fn status_of<T>(result: Result<T, tonic::Status>) -> tonic::Status {
    match result {
        Ok(_) => panic!("expected an error"),
        Err(status) => status,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
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
    create_topic(&broker, "t", 2).await;
    let mut admin = broker.admin().await;
    let mut producer = broker.producer().await;
    let mut consumer = broker.consumer().await;
    let expect = |status: tonic::Status, code: Code, needle: &str| {
        assert_eq!(status.code(), code, "{status:?}");
        assert!(
            status.message().contains(needle),
            "{:?} lacks {needle:?}",
            status.message()
        );
    };

    // Topics.
    for (name, needle) in [
        ("has space", "invalid topic name"),
        ("", "empty"),
        ("..", "reserved"),
    ] {
        let s = status_of(
            admin
                .create_topic(v1::CreateTopicRequest {
                    name: name.into(),
                    config: None,
                })
                .await,
        );
        expect(s, Code::InvalidArgument, needle);
    }
    for partitions in [0, 100_000] {
        let s = status_of(
            admin
                .create_topic(v1::CreateTopicRequest {
                    name: format!("p{partitions}"),
                    config: Some(v1::TopicConfig {
                        partitions: Some(partitions),
                        ..Default::default()
                    }),
                })
                .await,
        );
        expect(s, Code::InvalidArgument, "partition count");
    }
    let s = status_of(
        admin
            .create_topic(v1::CreateTopicRequest {
                name: "t".into(),
                config: None,
            })
            .await,
    );
    expect(s, Code::AlreadyExists, "already exists");
    let s = status_of(
        admin
            .delete_topic(v1::DeleteTopicRequest {
                name: "nope".into(),
            })
            .await,
    );
    expect(s, Code::NotFound, "nope");
    let s = status_of(
        admin
            .describe_topic(v1::DescribeTopicRequest {
                name: "nope".into(),
            })
            .await,
    );
    expect(s, Code::NotFound, "nope");
    let listed = admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed
            .topics
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        vec!["t"]
    );

    // Produce.
    let produce =
        |topic: &str, partition: Option<u32>, records: Vec<v1::Record>| v1::ProduceRequest {
            topic: topic.into(),
            partition,
            records,
            request_id: 0,
            producer: None,
        };
    let s = status_of(
        producer
            .produce(produce("nope", None, vec![record(None, "x")]))
            .await,
    );
    expect(s, Code::NotFound, "nope");
    let s = status_of(producer.produce(produce("t", None, vec![])).await);
    expect(s, Code::InvalidArgument, "at least one record");
    let s = status_of(
        producer
            .produce(produce("t", Some(7), vec![record(None, "x")]))
            .await,
    );
    expect(s, Code::NotFound, "partition 7");
    let big = "x".repeat(1001);
    let s = status_of(
        producer
            .produce(produce(
                "t",
                Some(0),
                vec![record(None, "fine"), record(None, &big)],
            ))
            .await,
    );
    expect(s, Code::InvalidArgument, "record 1 is");
    let huge: Vec<v1::Record> = (0..400).map(|_| record(None, &"y".repeat(900))).collect();
    let s = status_of(producer.produce(produce("t", Some(0), huge.clone())).await);
    expect(s, Code::ResourceExhausted, "too large");
    let mut stream = producer
        .produce_stream(tokio_stream::iter([produce("t", Some(0), huge)]))
        .await
        .unwrap()
        .into_inner();
    let refused = stream.next().await.unwrap().unwrap();
    assert_eq!(
        refused.error_code,
        Code::ResourceExhausted as i32,
        "{refused:?}"
    );

    // Nothing of the refused requests was written.
    for partition in 0..2 {
        assert!(fetch_all(&broker, "t", partition).await.is_empty());
    }

    // Consume.
    producer
        .produce(produce(
            "t",
            Some(0),
            vec![record(None, "a"), record(None, "b")],
        ))
        .await
        .unwrap();
    let fetch = |offset| v1::FetchRequest {
        topic: "t".into(),
        partition: 0,
        offset,
        ..Default::default()
    };
    let s = status_of(consumer.fetch(fetch(3)).await);
    expect(s, Code::OutOfRange, "offset 3 is out of range");
    let at_end = consumer.fetch(fetch(2)).await.unwrap().into_inner();
    assert!(at_end.records.is_empty());
    assert_eq!(at_end.high_watermark, 2);
    let s = status_of(
        consumer
            .fetch(v1::FetchRequest {
                topic: "nope".into(),
                ..fetch(0)
            })
            .await,
    );
    expect(s, Code::NotFound, "nope");
    let s = status_of(
        consumer
            .fetch(v1::FetchRequest {
                partition: 9,
                ..fetch(0)
            })
            .await,
    );
    expect(s, Code::NotFound, "partition 9");
    let s = status_of(
        consumer
            .subscribe(v1::SubscribeRequest {
                topic: "t".into(),
                partitions: vec![],
                start: None,
                max_batch_records: 0,
            })
            .await,
    );
    expect(s, Code::InvalidArgument, "where to start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_long_polls_and_list_offsets_answers_by_time() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    let mut consumer = broker.consumer().await;
    let waiting = tokio::spawn({
        let mut consumer = consumer.clone();
        async move {
            consumer
                .fetch(v1::FetchRequest {
                    topic: "t".into(),
                    partition: 0,
                    offset: 0,
                    max_wait_ms: 10_000,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut producer = broker.producer().await;
    let records = (0..3)
        .map(|i| v1::Record {
            timestamp_ms: 1_000 * (i + 1),
            ..record(None, &format!("{i}"))
        })
        .collect();
    producer
        .produce(v1::ProduceRequest {
            topic: "t".into(),
            partition: Some(0),
            records,
            request_id: 0,
            producer: None,
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the append")
        .unwrap();
    assert_eq!(got.records.len(), 3);

    let list = |spec| v1::ListOffsetsRequest {
        topic: "t".into(),
        partitions: vec![],
        spec: Some(spec),
    };
    use v1::list_offsets_request::Spec;
    let offset = |r: v1::ListOffsetsResponse| r.offsets[0].offset;
    assert_eq!(
        offset(
            consumer
                .list_offsets(list(Spec::TimestampMs(1_500)))
                .await
                .unwrap()
                .into_inner()
        ),
        1
    );
    assert_eq!(
        offset(
            consumer
                .list_offsets(list(Spec::TimestampMs(9_999)))
                .await
                .unwrap()
                .into_inner()
        ),
        3
    );
    assert_eq!(
        offset(
            consumer
                .list_offsets(list(Spec::Position(v1::OffsetSpec::Earliest as i32)))
                .await
                .unwrap()
                .into_inner()
        ),
        0
    );
    assert_eq!(
        offset(
            consumer
                .list_offsets(list(Spec::Position(v1::OffsetSpec::Latest as i32)))
                .await
                .unwrap()
                .into_inner()
        ),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let mut health = tonic_health::pb::health_client::HealthClient::new(broker.channel().await);
    let serving = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "sluice.v1.ProduceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        serving.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(broker.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "sluice.v1.AdminService",
        "sluice.v1.ProduceService",
        "sluice.v1.ConsumeService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not in {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_open_subscriptions_and_exits_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    let mut stream = broker
        .consumer()
        .await
        .subscribe(v1::SubscribeRequest {
            topic: "t".into(),
            partitions: vec![],
            start: Some(v1::subscribe_request::Start::Offset(0)),
            max_batch_records: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || broker.stop(Duration::from_secs(8)))
        .await
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(8));
    // The subscription was ended, not left hanging.
    let end = tokio::time::timeout(Duration::from_secs(2), stream.next())
        .await
        .expect("stream ended");
    match end {
        None => {}
        Some(Err(status)) => assert!(
            matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "{status:?}"
        ),
        Some(Ok(message)) => panic!("unexpected message {message:?}"),
    }
}

fn start_broker(dir: &std::path::Path, args: &[&str]) -> sluice_testkit::Broker {
    sluice_testkit::Broker::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_sluice-broker")),
        dir,
        args,
    )
}
