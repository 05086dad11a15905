//! `GroupService` against the real broker binary: fencing, lag, resets,
//! offset expiry and every bad input.

mod grpc_common;

use std::time::Duration;

use grpc_common::{create_topic, produce_request, record, start_broker};
use sluice_proto::v1::{self, group_service_client::GroupServiceClient};
use sluice_testkit::Broker;
use tonic::Code;
use tonic::transport::Channel;

async fn groups(broker: &Broker) -> GroupServiceClient<Channel> {
    GroupServiceClient::new(broker.channel().await)
}

async fn produce(broker: &Broker, topic: &str, partition: u32, count: usize) {
    let records = (0..count).map(|i| record(None, &format!("v{i}"))).collect();
    broker
        .producer()
        .await
        .produce(produce_request(topic, Some(partition), records))
        .await
        .unwrap();
}

fn commit(
    group: &str,
    member: (&str, u64),
    offsets: &[(&str, u32, u64)],
) -> v1::CommitOffsetsRequest {
    v1::CommitOffsetsRequest {
        group_id: group.into(),
        member_id: member.0.into(),
        member_epoch: member.1,
        offsets: offsets
            .iter()
            .map(|&(topic, partition, offset)| v1::OffsetCommit {
                topic: topic.into(),
                partition,
                offset,
                metadata: String::new(),
            })
            .collect(),
    }
}

fn join(group: &str, topic: &str, session_ms: u32) -> v1::JoinGroupRequest {
    v1::JoinGroupRequest {
        group_id: group.into(),
        instance_id: None,
        topics: vec![topic.into()],
        session_timeout_ms: session_ms,
    }
}

fn heartbeat(group: &str, member: &str, owned: &[v1::TopicPartitions]) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        group_id: group.into(),
        member_id: member.into(),
        owned: owned.to_vec(),
    }
}

fn reason(status: &tonic::Status) -> &str {
    status
        .metadata()
        .get("sluice-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

#[tokio::test]
async fn an_evicted_member_cannot_commit_and_a_non_owner_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "orders", 2).await;
    produce(&broker, "orders", 0, 10).await;
    let mut client = groups(&broker).await;

    // A member with a short session takes both partitions, then goes quiet.
    let old = client
        .join_group(join("g", "orders", 500))
        .await
        .unwrap()
        .into_inner();
    let assigned = client
        .heartbeat(heartbeat("g", &old.member_id, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(assigned.assigned[0].partitions, vec![0, 1]);
    client
        .commit_offsets(commit(
            "g",
            (&old.member_id, assigned.member_epoch),
            &[("orders", 0, 3)],
        ))
        .await
        .expect("an owner commits");
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // Its session timed out: a new member owns the partitions now.
    let new = client
        .join_group(join("g", "orders", 10_000))
        .await
        .unwrap()
        .into_inner();
    let new_assignment = client
        .heartbeat(heartbeat("g", &new.member_id, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(new_assignment.assigned[0].partitions, vec![0, 1]);
    client
        .commit_offsets(commit(
            "g",
            (&new.member_id, new_assignment.member_epoch),
            &[("orders", 0, 7)],
        ))
        .await
        .unwrap();

    let refused = client
        .commit_offsets(commit(
            "g",
            (&old.member_id, assigned.member_epoch),
            &[("orders", 0, 5)],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "unknown-member");
    assert!(
        refused.message().contains("missed its session timeout"),
        "{}",
        refused.message()
    );
    let heartbeat_refused = client
        .heartbeat(heartbeat("g", &old.member_id, &[]))
        .await
        .unwrap_err();
    assert_eq!(reason(&heartbeat_refused), "unknown-member");

    // The newer owner's offset stands.
    let offsets = client
        .fetch_offsets(v1::FetchOffsetsRequest {
            group_id: "g".into(),
            topics: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert_eq!(offsets.len(), 1);
    assert_eq!((offsets[0].partition, offsets[0].offset), (0, 7));

    // A second member gets half; committing the other half is not its to do.
    let other = client
        .join_group(join("g", "orders", 10_000))
        .await
        .unwrap()
        .into_inner();
    // Heartbeats in which the first member holds nothing: it released
    // what it was told to, so the second one gets its share.
    for member in [&new.member_id, &other.member_id, &new.member_id] {
        client.heartbeat(heartbeat("g", member, &[])).await.unwrap();
    }
    let other_assignment = client
        .heartbeat(heartbeat("g", &other.member_id, &[]))
        .await
        .unwrap()
        .into_inner();
    let others: Vec<u32> = other_assignment
        .assigned
        .iter()
        .flat_map(|s| s.partitions.clone())
        .collect();
    assert_eq!(others.len(), 1);
    let not_its = 1 - others[0];
    let refused = client
        .commit_offsets(commit(
            "g",
            (&other.member_id, other_assignment.member_epoch),
            &[("orders", not_its, 1)],
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "not-owner");

    // Nobody outside the group writes offsets while it has members.
    let refused = client
        .commit_offsets(commit("g", ("", 0), &[("orders", 0, 1)]))
        .await
        .unwrap_err();
    assert_eq!(reason(&refused), "group-not-empty");
}

#[tokio::test]
async fn lag_is_end_minus_committed_and_its_age_grows_while_the_group_is_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "clicks", 2).await;
    produce(&broker, "clicks", 0, 50).await;
    produce(&broker, "clicks", 1, 20).await;
    let mut client = groups(&broker).await;
    // A group with no members: offsets committed from outside.
    client
        .commit_offsets(commit(
            "stats",
            ("", 0),
            &[("clicks", 0, 30), ("clicks", 1, 20)],
        ))
        .await
        .unwrap();

    let describe = |mut client: GroupServiceClient<Channel>| async move {
        client
            .describe_group(v1::DescribeGroupRequest {
                group_id: "stats".into(),
            })
            .await
            .unwrap()
            .into_inner()
    };
    let first = describe(client.clone()).await;
    assert!(first.members.is_empty());
    let p0 = &first.partitions[0];
    assert_eq!(
        (p0.committed_offset, p0.end_offset, p0.lag),
        (Some(30), 50, Some(20))
    );
    let p1 = &first.partitions[1];
    assert_eq!(
        (p1.committed_offset, p1.end_offset, p1.lag, p1.time_lag_ms),
        (Some(20), 20, Some(0), Some(0))
    );
    assert_eq!(first.lag, 20);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = describe(client.clone()).await;
    let grew = second.partitions[0].time_lag_ms.unwrap() - p0.time_lag_ms.unwrap();
    assert!(grew >= 350, "time lag grew by {grew} ms over 400 ms");
    assert_eq!(
        second.max_time_lag_ms,
        second.partitions[0].time_lag_ms.unwrap()
    );

    let listed = client
        .list_groups(v1::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (
            listed[0].group_id.as_str(),
            listed[0].members,
            listed[0].lag
        ),
        ("stats", 0, 20)
    );

    // Consuming catches up: lag drops to 0.
    client
        .commit_offsets(commit("stats", ("", 0), &[("clicks", 0, 50)]))
        .await
        .unwrap();
    let caught_up = describe(client).await;
    assert_eq!(caught_up.lag, 0);
    assert_eq!(caught_up.max_time_lag_ms, 0);
}

#[tokio::test]
async fn a_reset_dry_run_changes_nothing_and_the_real_one_moves_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "audit", 2).await;
    produce(&broker, "audit", 0, 10).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    produce(&broker, "audit", 0, 10).await;
    produce(&broker, "audit", 1, 5).await;
    let mut client = groups(&broker).await;
    client
        .commit_offsets(commit("replayers", ("", 0), &[("audit", 0, 18)]))
        .await
        .unwrap();

    let reset =
        |to: v1::reset_target::To, partition: Option<u32>, dry_run: bool| v1::ResetOffsetsRequest {
            group_id: "replayers".into(),
            targets: vec![v1::ResetTarget {
                topic: "audit".into(),
                partition,
                to: Some(to),
            }],
            dry_run,
        };
    let fetch = |mut client: GroupServiceClient<Channel>| async move {
        let offsets = client
            .fetch_offsets(v1::FetchOffsetsRequest {
                group_id: "replayers".into(),
                topics: vec![],
            })
            .await
            .unwrap()
            .into_inner()
            .offsets;
        offsets
            .into_iter()
            .map(|o| (o.partition, o.offset))
            .collect::<Vec<_>>()
    };

    let dry = client
        .reset_offsets(reset(v1::reset_target::To::Earliest(true), None, true))
        .await
        .unwrap()
        .into_inner();
    assert!(dry.dry_run);
    let planned: Vec<_> = dry
        .changes
        .iter()
        .map(|c| (c.partition, c.previous, c.offset))
        .collect();
    assert_eq!(planned, vec![(0, Some(18), 0), (1, None, 0)]);
    assert_eq!(
        fetch(client.clone()).await,
        vec![(0, 18)],
        "a dry run writes nothing"
    );

    client
        .reset_offsets(reset(v1::reset_target::To::Earliest(true), None, false))
        .await
        .unwrap();
    assert_eq!(fetch(client.clone()).await, vec![(0, 0), (1, 0)]);
    client
        .reset_offsets(reset(
            v1::reset_target::To::TimestampMs(middle_ms),
            Some(0),
            false,
        ))
        .await
        .unwrap();
    assert_eq!(fetch(client.clone()).await, vec![(0, 10), (1, 0)]);
    client
        .reset_offsets(reset(v1::reset_target::To::Latest(true), Some(1), false))
        .await
        .unwrap();
    client
        .reset_offsets(reset(v1::reset_target::To::Offset(4), Some(0), false))
        .await
        .unwrap();
    assert_eq!(fetch(client.clone()).await, vec![(0, 4), (1, 5)]);

    let out_of_range = client
        .reset_offsets(reset(v1::reset_target::To::Offset(21), Some(0), false))
        .await
        .unwrap_err();
    assert_eq!(out_of_range.code(), Code::OutOfRange);

    // Not while the group has live members.
    let member = client
        .join_group(join("replayers", "audit", 10_000))
        .await
        .unwrap()
        .into_inner();
    let refused = client
        .reset_offsets(reset(v1::reset_target::To::Earliest(true), None, false))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason(&refused), "group-not-empty");
    assert_eq!(fetch(client.clone()).await, vec![(0, 4), (1, 5)]);
    client
        .leave_group(v1::LeaveGroupRequest {
            group_id: "replayers".into(),
            member_id: member.member_id,
        })
        .await
        .unwrap();
    client
        .reset_offsets(reset(v1::reset_target::To::Earliest(true), None, false))
        .await
        .expect("allowed once the member left");
}

#[tokio::test]
async fn offsets_of_an_empty_group_expire_and_of_a_deleted_topic_go() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(
        dir.path(),
        &[
            "--group-offset-retention-ms",
            "300",
            "--maintenance-interval-ms",
            "100",
        ],
    );
    create_topic(&broker, "t", 1).await;
    create_topic(&broker, "u", 1).await;
    produce(&broker, "t", 0, 3).await;
    produce(&broker, "u", 0, 3).await;
    let mut client = groups(&broker).await;
    client
        .commit_offsets(commit("idle", ("", 0), &[("t", 0, 2)]))
        .await
        .unwrap();
    // A group with a live member keeps its offsets however old.
    client
        .commit_offsets(commit("busy", ("", 0), &[("t", 0, 1), ("u", 0, 1)]))
        .await
        .unwrap();
    let member = client
        .join_group(join("busy", "t", 60_000))
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    client
        .heartbeat(heartbeat("busy", &member.member_id, &[]))
        .await
        .unwrap();
    let listed: Vec<String> = client
        .list_groups(v1::ListGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .groups
        .into_iter()
        .map(|g| g.group_id)
        .collect();
    assert_eq!(listed, vec!["busy".to_string()]);
    let missing = client
        .describe_group(v1::DescribeGroupRequest {
            group_id: "idle".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    broker
        .admin()
        .await
        .delete_topic(v1::DeleteTopicRequest { name: "u".into() })
        .await
        .unwrap();
    let topics: Vec<String> = client
        .fetch_offsets(v1::FetchOffsetsRequest {
            group_id: "busy".into(),
            topics: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets
        .into_iter()
        .map(|o| o.topic)
        .collect();
    assert_eq!(topics, vec!["t".to_string()]);
}

#[tokio::test]
async fn bad_group_requests_get_clear_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 2).await;
    produce(&broker, "t", 0, 5).await;
    let mut client = groups(&broker).await;

    let cases: Vec<(&str, tonic::Status, Code, &str)> = vec![
        (
            "bad group id",
            client
                .join_group(join("no/slash", "t", 0))
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "invalid group id",
        ),
        (
            "unknown topic",
            client.join_group(join("g", "nope", 0)).await.unwrap_err(),
            Code::NotFound,
            "\"nope\"",
        ),
        (
            "no topics",
            client
                .join_group(v1::JoinGroupRequest {
                    group_id: "g".into(),
                    instance_id: None,
                    topics: vec![],
                    session_timeout_ms: 0,
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "at least one topic",
        ),
        (
            "session timeout too short",
            client.join_group(join("g", "t", 10)).await.unwrap_err(),
            Code::InvalidArgument,
            "session timeout",
        ),
        (
            "heartbeat without a member id",
            client.heartbeat(heartbeat("g", "", &[])).await.unwrap_err(),
            Code::InvalidArgument,
            "member id is empty",
        ),
        (
            "empty commit",
            client
                .commit_offsets(commit("g", ("", 0), &[]))
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "at least one offset",
        ),
        (
            "commit past the end",
            client
                .commit_offsets(commit("g", ("", 0), &[("t", 0, 6)]))
                .await
                .unwrap_err(),
            Code::OutOfRange,
            "past its latest offset 5",
        ),
        (
            "commit of a missing partition",
            client
                .commit_offsets(commit("g", ("", 0), &[("t", 7, 0)]))
                .await
                .unwrap_err(),
            Code::NotFound,
            "no partition 7",
        ),
        (
            "partition twice in a commit",
            client
                .commit_offsets(commit("g", ("", 0), &[("t", 0, 1), ("t", 0, 2)]))
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "more than once",
        ),
        (
            "describe an unknown group",
            client
                .describe_group(v1::DescribeGroupRequest {
                    group_id: "ghosts".into(),
                })
                .await
                .unwrap_err(),
            Code::NotFound,
            "does not exist",
        ),
        (
            "reset without a target position",
            client
                .reset_offsets(v1::ResetOffsetsRequest {
                    group_id: "g".into(),
                    targets: vec![v1::ResetTarget {
                        topic: "t".into(),
                        partition: None,
                        to: None,
                    }],
                    dry_run: true,
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "says nowhere to move",
        ),
    ];
    for (what, status, code, needle) in cases {
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            status.message()
        );
    }
    // Nothing was committed by any of them.
    let offsets = client
        .fetch_offsets(v1::FetchOffsetsRequest {
            group_id: "g".into(),
            topics: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets;
    assert!(offsets.is_empty());
}

#[tokio::test]
async fn bad_dead_letter_requests_get_clear_statuses() {
    use sluice_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    produce(&broker, "t", 0, 5).await;
    let mut client = groups(&broker).await;
    let member = client
        .join_group(join("g", "t", 10_000))
        .await
        .unwrap()
        .into_inner();
    client
        .heartbeat(heartbeat("g", &member.member_id, &[]))
        .await
        .unwrap();
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    let nack = |member: &str, offset: u64, reason: String| v1::NackRequest {
        group_id: "g".into(),
        member_id: member.into(),
        record: Some(v1::RecordRef {
            topic: "t".into(),
            partition: 0,
            offset,
        }),
        reason,
        error_class: String::new(),
    };
    let cases: Vec<(&str, tonic::Status, Code, &str)> = vec![
        (
            "nack from a stranger",
            dlq.nack(nack("nobody", 1, "x".into())).await.unwrap_err(),
            Code::FailedPrecondition,
            "is not in group",
        ),
        (
            "nack past the end",
            dlq.nack(nack(&member.member_id, 5, "x".into()))
                .await
                .unwrap_err(),
            Code::OutOfRange,
            "has no offset 5",
        ),
        (
            "nack with a huge reason",
            dlq.nack(nack(&member.member_id, 1, "x".repeat(5000)))
                .await
                .unwrap_err(),
            Code::InvalidArgument,
            "reason is 5000 bytes",
        ),
        (
            "nack without a record",
            dlq.nack(v1::NackRequest {
                record: None,
                ..nack(&member.member_id, 1, String::new())
            })
            .await
            .unwrap_err(),
            Code::InvalidArgument,
            "say which record",
        ),
        (
            "redrive of a missing DLQ",
            dlq.redrive(v1::RedriveRequest {
                dlq_topic: "t.g.dlq".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            Code::NotFound,
            "t.g.dlq",
        ),
        (
            "redrive to a missing topic",
            dlq.redrive(v1::RedriveRequest {
                dlq_topic: "t".into(),
                target: v1::RedriveTarget::Topic as i32,
                target_topic: "elsewhere".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            Code::NotFound,
            "elsewhere",
        ),
        (
            "reversed redrive range",
            dlq.redrive(v1::RedriveRequest {
                dlq_topic: "t".into(),
                from_offset: Some(4),
                to_offset: Some(2),
                ..Default::default()
            })
            .await
            .unwrap_err(),
            Code::OutOfRange,
            "empty or reversed",
        ),
    ];
    for (what, status, code, needle) in cases {
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            status.message()
        );
    }
    // A valid nack is accepted and counted.
    let answer = dlq
        .nack(nack(&member.member_id, 1, "flaky".into()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((answer.deliveries, answer.dead_lettered), (1, false));
}

#[tokio::test]
async fn a_group_can_change_a_topics_retry_settings_for_itself_durably() {
    use sluice_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start_broker(dir.path(), &[]);
    create_topic(&broker, "t", 1).await;
    produce(&broker, "t", 0, 5).await;
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    let effective = dlq
        .set_group_settings(v1::SetGroupSettingsRequest {
            group_id: "strict".into(),
            topic: "t".into(),
            settings: Some(v1::DeadLetterSettings {
                max_deliveries: Some(1),
                dlq_topic: Some("quarantine.{group}".into()),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner()
        .effective
        .unwrap();
    assert_eq!(effective.max_deliveries, Some(1));
    assert_eq!(
        effective.retry_backoff_ms,
        Some(1000),
        "the topic's, unchanged"
    );
    let invalid = dlq
        .set_group_settings(v1::SetGroupSettingsRequest {
            group_id: "strict".into(),
            topic: "t".into(),
            settings: Some(v1::DeadLetterSettings {
                retry_backoff_multiplier: Some(0.5),
                ..Default::default()
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);

    // The override survives SIGKILL.
    let addr = broker.addr;
    broker.kill();
    let broker = start_broker(dir.path(), &["--listen", &addr.to_string()]);
    let mut client = groups(&broker).await;
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    let mut nack_as = async |group: &str| {
        let member = client
            .join_group(join(group, "t", 10_000))
            .await
            .unwrap()
            .into_inner();
        client
            .heartbeat(heartbeat(group, &member.member_id, &[]))
            .await
            .unwrap();
        dlq.nack(v1::NackRequest {
            group_id: group.into(),
            member_id: member.member_id,
            record: Some(v1::RecordRef {
                topic: "t".into(),
                partition: 0,
                offset: 2,
            }),
            reason: "no".into(),
            error_class: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
    };
    // One failure is the last for "strict", into its own DLQ name.
    let strict = nack_as("strict").await;
    assert!(strict.dead_lettered);
    assert_eq!(strict.dlq_topic, "quarantine.strict");
    // Another group keeps the topic's 5 deliveries.
    let lenient = nack_as("lenient").await;
    assert_eq!((lenient.deliveries, lenient.dead_lettered), (1, false));
}

#[tokio::test]
async fn a_redriven_record_whose_dlq_was_deleted_is_dead_lettered_again_not_lost() {
    use sluice_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    grpc_common::create_topic_with(
        &broker,
        "t",
        v1::TopicConfig {
            partitions: Some(1),
            max_deliveries: Some(1),
            ..Default::default()
        },
    )
    .await;
    produce(&broker, "t", 0, 3).await;
    let mut client = groups(&broker).await;
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    let member = client
        .join_group(join("g", "t", 10_000))
        .await
        .unwrap()
        .into_inner();
    let assigned = client
        .heartbeat(heartbeat("g", &member.member_id, &[]))
        .await
        .unwrap()
        .into_inner()
        .assigned;
    // Retries go to partitions the member says it reads.
    client
        .heartbeat(heartbeat("g", &member.member_id, &assigned))
        .await
        .unwrap();
    let nacked = dlq
        .nack(v1::NackRequest {
            group_id: "g".into(),
            member_id: member.member_id.clone(),
            record: Some(v1::RecordRef {
                topic: "t".into(),
                partition: 0,
                offset: 1,
            }),
            reason: "bad".into(),
            error_class: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(nacked.dead_lettered);
    dlq.redrive(v1::RedriveRequest {
        dlq_topic: "t.g.dlq".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // The redriven retry reads its bytes from the DLQ, which goes away.
    broker
        .admin()
        .await
        .delete_topic(v1::DeleteTopicRequest {
            name: "t.g.dlq".into(),
        })
        .await
        .unwrap();
    let retries = dlq
        .fetch_retries(v1::FetchRetriesRequest {
            group_id: "g".into(),
            member_id: member.member_id,
            max_records: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retries.records.is_empty());
    let letters = grpc_common::fetch_all(&broker, "t.g.dlq", 0).await;
    assert_eq!(letters.len(), 1, "dead-lettered again, with what is known");
    let reason = letters[0]
        .headers
        .iter()
        .find(|h| h.key == "sluice.dlq.reason")
        .unwrap();
    assert!(
        std::str::from_utf8(&reason.value)
            .unwrap()
            .contains("deleted before it was dead-lettered")
    );
    let described = client
        .describe_group(v1::DescribeGroupRequest {
            group_id: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(described.dead_letters[0].retry_set_size, 0);
}

/// Joins `group` on `topic` and heartbeats twice, so the member reads
/// (holds and is assigned) every partition. Its member id and epoch.
async fn join_and_hold(
    client: &mut GroupServiceClient<Channel>,
    group: &str,
    topic: &str,
) -> (String, u64) {
    let member = client
        .join_group(join(group, topic, 60_000))
        .await
        .unwrap()
        .into_inner();
    let assigned = client
        .heartbeat(heartbeat(group, &member.member_id, &[]))
        .await
        .unwrap()
        .into_inner()
        .assigned;
    let epoch = client
        .heartbeat(heartbeat(group, &member.member_id, &assigned))
        .await
        .unwrap()
        .into_inner()
        .member_epoch;
    (member.member_id, epoch)
}

async fn committed(client: &mut GroupServiceClient<Channel>, group: &str) -> Vec<(String, u64)> {
    client
        .fetch_offsets(v1::FetchOffsetsRequest {
            group_id: group.into(),
            topics: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .offsets
        .into_iter()
        .map(|o| (o.topic, o.offset))
        .collect()
}

/// Issue 13, item 3: deleting a topic takes the groups' retries of it
/// along; a topic created later under the same name gets none of them.
#[tokio::test]
async fn a_deleted_topics_retries_go_with_it() {
    use sluice_proto::v1::dead_letter_service_client::DeadLetterServiceClient;
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let config = v1::TopicConfig {
        partitions: Some(1),
        retry_backoff_ms: Some(10),
        retry_backoff_max_ms: Some(10),
        ..Default::default()
    };
    grpc_common::create_topic_with(&broker, "t", config.clone()).await;
    produce(&broker, "t", 0, 3).await;
    let mut client = groups(&broker).await;
    let (member, _) = join_and_hold(&mut client, "g", "t").await;
    let mut dlq = DeadLetterServiceClient::new(broker.channel().await);
    for offset in [1, 2] {
        dlq.nack(v1::NackRequest {
            group_id: "g".into(),
            member_id: member.clone(),
            record: Some(v1::RecordRef {
                topic: "t".into(),
                partition: 0,
                offset,
            }),
            reason: "old failure".into(),
            error_class: String::new(),
        })
        .await
        .unwrap();
    }
    broker
        .admin()
        .await
        .delete_topic(v1::DeleteTopicRequest { name: "t".into() })
        .await
        .unwrap();
    grpc_common::create_topic_with(&broker, "t", config).await;
    let new = (0..2).map(|i| record(None, &format!("NEW-{i}"))).collect();
    broker
        .producer()
        .await
        .produce(produce_request("t", Some(0), new))
        .await
        .unwrap();
    // The member still subscribes to `t`: it reads the new topic.
    let assigned = client
        .heartbeat(heartbeat("g", &member, &[]))
        .await
        .unwrap()
        .into_inner()
        .assigned;
    client
        .heartbeat(heartbeat("g", &member, &assigned))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let served: Vec<(u64, u32, String)> = dlq
        .fetch_retries(v1::FetchRetriesRequest {
            group_id: "g".into(),
            member_id: member,
            max_records: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .records
        .into_iter()
        .map(|r| {
            let record = r.record.unwrap();
            (
                record.offset,
                r.attempt,
                String::from_utf8_lossy(&record.value).into_owned(),
            )
        })
        .collect();
    assert!(
        served.is_empty(),
        "new records served as the old topic's retries: {served:?}"
    );
    let dlq_topic = broker
        .admin()
        .await
        .describe_topic(v1::DescribeTopicRequest {
            name: "t.g.dlq".into(),
        })
        .await;
    assert_eq!(
        dlq_topic.map(|_| ()).unwrap_err().code(),
        Code::NotFound,
        "an old retry past the new log's end was dead-lettered"
    );
    let described = client
        .describe_group(v1::DescribeGroupRequest {
            group_id: "g".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        described.dead_letters.iter().all(|d| d.retry_set_size == 0),
        "{:?}",
        described.dead_letters
    );
}

const RETENTION_MS: u64 = 4000;

/// Waits until `group` has no committed offsets (the broker expired them);
/// how long that took.
async fn wait_for_expiry(
    client: &mut GroupServiceClient<Channel>,
    group: &str,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !committed(client, group).await.is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the offsets of the empty group never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    started.elapsed()
}

/// Issue 13, item 8 (KIP-211): the retention of an empty group's offsets
/// counts from when it became empty, not from its last commit.
#[tokio::test]
async fn offsets_expire_a_retention_after_the_group_became_empty_not_after_its_last_commit() {
    let dir = tempfile::tempdir().unwrap();
    let retention = RETENTION_MS.to_string();
    let broker = start_broker(
        dir.path(),
        &[
            "--group-offset-retention-ms",
            &retention,
            "--maintenance-interval-ms",
            "100",
        ],
    );
    create_topic(&broker, "t", 1).await;
    produce(&broker, "t", 0, 3).await;
    let mut client = groups(&broker).await;
    let (member, epoch) = join_and_hold(&mut client, "g", "t").await;
    client
        .commit_offsets(commit("g", (&member, epoch), &[("t", 0, 2)]))
        .await
        .unwrap();
    // Alive, with nothing new to commit, for longer than the retention.
    let quiet = std::time::Instant::now();
    while quiet.elapsed() < Duration::from_millis(RETENTION_MS + 1000) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client
            .heartbeat(heartbeat("g", &member, &[]))
            .await
            .unwrap();
    }
    // Taken before the broker starts the clock: a lower bound is sound.
    let left = std::time::Instant::now();
    client
        .leave_group(v1::LeaveGroupRequest {
            group_id: "g".into(),
            member_id: member,
        })
        .await
        .unwrap();
    // Many maintenance ticks later the offsets are still there.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        committed(&mut client, "g").await,
        [("t".to_string(), 2)],
        "expired the moment the group became empty"
    );
    wait_for_expiry(&mut client, "g").await;
    assert!(
        left.elapsed() >= Duration::from_millis(RETENTION_MS),
        "expired {:?} after the group became empty",
        left.elapsed()
    );
}

/// Issue 13, item 8: after a restart an empty group's offsets are kept for
/// at least the retention, however old its last commit.
#[tokio::test]
async fn after_a_restart_offsets_are_kept_for_at_least_the_retention() {
    let dir = tempfile::tempdir().unwrap();
    let retention = RETENTION_MS.to_string();
    let args = [
        "--group-offset-retention-ms",
        retention.as_str(),
        "--maintenance-interval-ms",
        "100",
    ];
    let mut broker = start_broker(dir.path(), &args);
    create_topic(&broker, "t", 1).await;
    produce(&broker, "t", 0, 3).await;
    groups(&broker)
        .await
        .commit_offsets(commit("g", ("", 0), &[("t", 0, 1)]))
        .await
        .unwrap();
    broker.stop(Duration::from_secs(15));
    // Down for longer than the retention.
    tokio::time::sleep(Duration::from_millis(RETENTION_MS + 500)).await;
    let restarted = std::time::Instant::now();
    let broker = broker.start_again();
    let mut client = groups(&broker).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        committed(&mut client, "g").await,
        [("t".to_string(), 1)],
        "expired at the first maintenance tick after the restart"
    );
    wait_for_expiry(&mut client, "g").await;
    assert!(
        restarted.elapsed() >= Duration::from_millis(RETENTION_MS),
        "expired {:?} after the restart",
        restarted.elapsed()
    );
}
