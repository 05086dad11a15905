//! The broker over gRPC, as a client in any language sees it: the real
//! binary, a temp data dir, a free port.

mod grpc_common;

use std::collections::BTreeMap;
use std::time::Duration;

use grpc_common::*;
use sluice_proto::v1;
use tokio_stream::StreamExt;
use tonic::Code;

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
                ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
                ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
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
            ..Default::default()
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the append")
        .unwrap();
    assert_eq!(got.records.len(), 3);

    use v1::list_offsets_request::Spec;
    let cases = [
        (Spec::TimestampMs(1_500), 1),
        (Spec::TimestampMs(9_999), 3),
        (Spec::Position(v1::OffsetSpec::Earliest as i32), 0),
        (Spec::Position(v1::OffsetSpec::Latest as i32), 3),
    ];
    for (spec, expected) in cases {
        let request = v1::ListOffsetsRequest {
            topic: "t".into(),
            partitions: vec![],
            spec: Some(spec),
        };
        let response = consumer.list_offsets(request).await.unwrap().into_inner();
        assert_eq!(response.offsets[0].offset, expected, "{spec:?}");
    }
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
            ..Default::default()
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyless_records_of_a_request_share_a_partition_and_requests_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "rr", 3).await;
    let mut producer = broker.producer().await;
    let mut used = Vec::new();
    for request in 0..6 {
        let records = (0..5)
            .map(|i| record(None, &format!("{request}-{i}")))
            .collect();
        let positions = producer
            .produce(produce_request("rr", None, records))
            .await
            .unwrap()
            .into_inner()
            .positions;
        let partition = positions[0].partition;
        assert!(
            positions.iter().all(|p| p.partition == partition),
            "one request, one partition: {positions:?}"
        );
        let offsets: Vec<u64> = positions.iter().map(|p| p.offset).collect();
        let first = offsets[0];
        assert_eq!(offsets, (first..first + 5).collect::<Vec<_>>());
        used.push(partition);
    }
    // Round-robin: every partition twice, each three requests apart.
    for window in used.windows(3) {
        let mut sorted = window.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![0, 1, 2], "{used:?}");
    }
    for partition in 0..3 {
        assert_eq!(fetch_all(&broker, "rr", partition).await.len(), 10);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_stay_under_the_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    // A 20 kB message limit: a default fetch (1 MiB of records) would
    // exceed it, so the broker must send fewer records per answer.
    let broker = start_broker(
        dir.path(),
        &["--max-record-bytes", "1000", "--max-message-bytes", "20000"],
    );
    create_topic(&broker, "big", 1).await;
    let mut producer = broker.producer().await;
    for batch in 0..10 {
        let records = (0..10)
            .map(|i| record(None, &format!("{batch}-{i}-{}", "x".repeat(900))))
            .collect();
        producer
            .produce(produce_request("big", Some(0), records))
            .await
            .unwrap();
    }
    let mut consumer = broker.consumer().await;
    let mut offset = 0;
    let mut pages = 0;
    while offset < 100 {
        let page = consumer
            .fetch(v1::FetchRequest {
                topic: "big".into(),
                partition: 0,
                offset,
                ..Default::default()
            })
            .await
            .expect("a fetch fits in the message limit")
            .into_inner();
        assert!(!page.records.is_empty());
        assert!(prost::Message::encoded_len(&page) <= 20_000);
        assert_eq!(page.records[0].offset, offset);
        offset = page.next_offset;
        pages += 1;
    }
    assert!(pages >= 5, "100 records of ~1 kB in {pages} answers");

    let mut stream = consumer
        .subscribe(v1::SubscribeRequest {
            topic: "big".into(),
            partitions: vec![],
            start: Some(v1::subscribe_request::Start::Position(
                v1::StartPosition::Earliest as i32,
            )),
            max_batch_records: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = 0;
    while next < 100 {
        let message = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("pushed")
            .expect("open")
            .expect("a push fits in the message limit");
        assert!(prost::Message::encoded_len(&message) <= 20_000);
        for r in message.records {
            assert_eq!(r.offset, next);
            next += 1;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_ends_its_subscriptions_and_long_polls() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "gone", 2).await;
    broker
        .producer()
        .await
        .produce(produce_request("gone", Some(0), vec![record(None, "old")]))
        .await
        .unwrap();
    let mut consumer = broker.consumer().await;
    let mut stream = consumer
        .subscribe(v1::SubscribeRequest {
            topic: "gone".into(),
            partitions: vec![],
            start: Some(v1::subscribe_request::Start::Offset(0)),
            max_batch_records: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.records[0].value, "old");
    let long_poll = tokio::spawn({
        let mut consumer = consumer.clone();
        async move {
            consumer
                .fetch(v1::FetchRequest {
                    topic: "gone".into(),
                    partition: 1,
                    offset: 0,
                    max_wait_ms: 20_000,
                    ..Default::default()
                })
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    broker
        .admin()
        .await
        .delete_topic(v1::DeleteTopicRequest {
            name: "gone".into(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the subscription ended")
        .expect("with a status");
    expect_status(&end.unwrap_err(), Code::NotFound, "\"gone\" was deleted");
    let polled = tokio::time::timeout(Duration::from_secs(5), long_poll)
        .await
        .expect("the long poll ended")
        .unwrap();
    expect_status(&status_of(polled), Code::NotFound, "\"gone\" was deleted");
    assert!(!dir.path().join("topics/gone").exists(), "files removed");

    // A topic created again under the name starts empty.
    create_topic(&broker, "gone", 1).await;
    assert!(fetch_all(&broker, "gone", 0).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_settings_can_be_altered_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let mut admin = broker.admin().await;
    let created = admin
        .create_topic(v1::CreateTopicRequest {
            name: "cfg".into(),
            config: Some(v1::TopicConfig {
                partitions: Some(2),
                flush: Some("interval(20ms)".into()),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(created.flush.as_deref(), Some("interval(20ms)"));
    assert_eq!(created.retention_ms, Some(7 * 24 * 3600 * 1000), "default");
    let altered = admin
        .alter_topic_config(v1::AlterTopicConfigRequest {
            name: "cfg".into(),
            config: Some(v1::TopicConfig {
                retention_ms: Some(0),
                retention_bytes: Some(1 << 30),
                flush: Some("os".into()),
                max_record_bytes: Some(4096),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    let expected = v1::TopicConfig {
        partitions: Some(2),
        retention_ms: Some(0),
        retention_bytes: Some(1 << 30),
        flush: Some("os".into()),
        max_record_bytes: Some(4096),
        segment_bytes: created.segment_bytes,
        max_deliveries: Some(5),
        retry_backoff_ms: Some(1000),
        retry_backoff_multiplier: Some(2.0),
        retry_backoff_max_ms: Some(300_000),
        dlq_topic: Some("{topic}.{group}.dlq".into()),
        compression: Some("producer".into()),
    };
    assert_eq!(altered, expected);
    // The new record limit applies at once.
    let s = status_of(
        broker
            .producer()
            .await
            .produce(produce_request(
                "cfg",
                Some(0),
                vec![record(None, &"z".repeat(5000))],
            ))
            .await,
    );
    expect_status(&s, Code::InvalidArgument, "at most 4096 bytes");
    broker
        .producer()
        .await
        .produce(produce_request(
            "cfg",
            Some(1),
            vec![record(None, "a"), record(None, "b")],
        ))
        .await
        .unwrap();

    let broker = broker.restart();
    let mut admin = broker.admin().await;
    let described = admin
        .describe_topic(v1::DescribeTopicRequest { name: "cfg".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.config, Some(expected.clone()));
    let p1 = &described.partitions[1];
    assert_eq!(
        (p1.partition, p1.earliest_offset, p1.latest_offset),
        (1, 0, 2)
    );
    assert!(p1.size_bytes > 0 && p1.segments >= 1, "{p1:?}");
    assert_eq!(described.partitions[0].latest_offset, 0);
    let listed = admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].config, Some(expected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_come_from_flags_the_environment_and_a_toml_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        "default_partitions = 5\nflush = \"os\"\nretention_ms = 0\nmax_record_bytes = 3000\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let config_arg = config.to_str().unwrap();
    let broker = start_broker_with_env(
        &data,
        // The flag beats the environment and the file.
        &["--config", config_arg, "--max-record-bytes", "2000"],
        // The environment beats the file.
        &[
            ("SLUICE_DEFAULT_PARTITIONS", "4"),
            ("SLUICE_MAX_RECORD_BYTES", "2500"),
        ],
    );
    let got = broker
        .admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            name: "defaults".into(),
            config: None,
        })
        .await
        .unwrap()
        .into_inner()
        .config
        .unwrap();
    assert_eq!(got.partitions, Some(4), "from SLUICE_DEFAULT_PARTITIONS");
    assert_eq!(got.flush.as_deref(), Some("os"), "from the file");
    assert_eq!(got.retention_ms, Some(0), "from the file");
    assert_eq!(got.max_record_bytes, Some(2000), "from the flag");
    assert!(data.join("meta/topics.json").exists());
    assert!(data.join("topics/defaults/3").is_dir());

    // A bad setting stops the broker with a message that names it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-broker"))
        .args(["--data-dir", data.to_str().unwrap(), "--flush", "sometimes"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("flush policy \"sometimes\""), "{stderr}");
    // So does a second broker on a locked data directory.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sluice-broker"))
        .args([
            "--data-dir",
            data.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("locked by another process (pid {})", broker.pid())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_subscriber_does_not_hold_up_shutdown_or_lose_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(
        dir.path(),
        &["--shutdown-timeout-ms", "1000", "--flush", "os"],
    );
    create_topic(&broker, "backlog", 1).await;
    let mut producer = broker.producer().await;
    let value = "v".repeat(10_000);
    for _ in 0..40 {
        let records = (0..100).map(|_| record(None, &value)).collect();
        producer
            .produce(produce_request("backlog", Some(0), records))
            .await
            .unwrap();
    }
    let before = anonymous_memory_kib(broker.pid());
    // 40 MB behind and never reading: flow control holds the broker back
    // instead of it reading (and buffering) the whole backlog.
    let stalled = broker
        .consumer()
        .await
        .subscribe(v1::SubscribeRequest {
            topic: "backlog".into(),
            partitions: vec![],
            start: Some(v1::subscribe_request::Start::Offset(0)),
            max_batch_records: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let growth = anonymous_memory_kib(broker.pid()).saturating_sub(before);
    assert!(
        growth < 24 * 1024,
        "the broker's memory grew by {growth} KiB for a stalled subscriber"
    );
    let started = std::time::Instant::now();
    let (status, broker) = tokio::task::spawn_blocking(move || {
        let status = broker.stop(Duration::from_secs(8));
        (status, broker)
    })
    .await
    .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exit took {:?} with a 1 s shutdown timeout",
        started.elapsed()
    );
    drop(stalled);
    // Everything was flushed and closed: a new broker reads it all back.
    let broker = broker.start_again();
    let records = fetch_all(&broker, "backlog", 0).await;
    assert_eq!(records.len(), 4000);
    assert!(
        records
            .iter()
            .enumerate()
            .all(|(i, r)| r.offset == i as u64)
    );
}

/// The broker's anonymous resident memory (heap, not mapped files).
fn anonymous_memory_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("RssAnon:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("RssAnon in /proc/<pid>/status")
}
