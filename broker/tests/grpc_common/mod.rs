//! Helpers shared by the tests that talk gRPC to the real broker binary.
#![allow(dead_code)]

use std::path::Path;

use bytes::Bytes;
use sluice_proto::v1;
use sluice_testkit::Broker;

/// Starts the `sluice-broker` binary of this build on a free port.
pub fn start_broker(dir: &Path, args: &[&str]) -> Broker {
    Broker::start(Path::new(env!("CARGO_BIN_EXE_sluice-broker")), dir, args)
}

/// Starts the broker with extra environment variables.
pub fn start_broker_with_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Broker {
    Broker::start_with_env(
        Path::new(env!("CARGO_BIN_EXE_sluice-broker")),
        dir,
        args,
        env,
    )
}

/// A record with a `source: test` header and the broker's timestamp.
pub fn record(key: Option<&str>, value: &str) -> v1::Record {
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

pub fn produce_request(
    topic: &str,
    partition: Option<u32>,
    records: Vec<v1::Record>,
) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: topic.into(),
        partition,
        records,
        request_id: 0,
        producer: None,
        ..Default::default()
    }
}

pub async fn create_topic(broker: &Broker, name: &str, partitions: u32) {
    create_topic_with(
        broker,
        name,
        v1::TopicConfig {
            partitions: Some(partitions),
            ..Default::default()
        },
    )
    .await;
}

pub async fn create_topic_with(broker: &Broker, name: &str, config: v1::TopicConfig) {
    broker
        .admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            name: name.into(),
            config: Some(config),
        })
        .await
        .expect("create topic");
}

/// Every record of a partition, fetched from offset 0 in pages.
pub async fn fetch_all(broker: &Broker, topic: &str, partition: u32) -> Vec<v1::ConsumedRecord> {
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

/// The error of a call that must fail.
pub fn status_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> tonic::Status {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(status) => status,
    }
}

/// Asserts a status's code and that its message names the problem.
pub fn expect_status(status: &tonic::Status, code: tonic::Code, needle: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} lacks {needle:?}",
        status.message()
    );
}

pub fn value_of(record: &v1::ConsumedRecord) -> String {
    String::from_utf8(record.value.to_vec()).unwrap()
}

/// Joins `group` on `topic` and reports holding what it was given, so
/// that commits, nacks and retry fetches are accepted; the member id and
/// epoch.
pub async fn join_and_hold(broker: &Broker, group: &str, topic: &str) -> (String, u64) {
    let mut client = v1::group_service_client::GroupServiceClient::new(broker.channel().await);
    let member = client
        .join_group(v1::JoinGroupRequest {
            group_id: group.into(),
            instance_id: None,
            topics: vec![topic.into()],
            session_timeout_ms: 30_000,
        })
        .await
        .unwrap()
        .into_inner()
        .member_id;
    let heartbeat = |owned: Vec<v1::TopicPartitions>| v1::HeartbeatRequest {
        group_id: group.into(),
        member_id: member.clone(),
        owned,
    };
    let assigned = client
        .heartbeat(heartbeat(vec![]))
        .await
        .unwrap()
        .into_inner()
        .assigned;
    let epoch = client
        .heartbeat(heartbeat(assigned))
        .await
        .unwrap()
        .into_inner()
        .member_epoch;
    (member, epoch)
}
