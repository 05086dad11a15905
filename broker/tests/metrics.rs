//! `/metrics` against the real broker binary: a produce, a fetch, a group
//! commit, a nack and the syncs they cause move the named series by the
//! right amounts; with per-partition series off the same figures come per
//! topic; and the process and RPC series are there.

mod grpc_common;

use std::collections::BTreeMap;

use grpc_common::{create_topic, join_and_hold, produce_request, record, start_broker};
use sluice_proto::v1::{
    self, dead_letter_service_client::DeadLetterServiceClient,
    group_service_client::GroupServiceClient,
};
use sluice_testkit::Broker;

/// Every sample of an exposition: `name{labels}` to value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            (series.to_owned(), value.parse().expect("a numeric value"))
        })
        .collect()
}

fn value(samples: &BTreeMap<String, f64>, series: &str) -> f64 {
    *samples
        .get(series)
        .unwrap_or_else(|| panic!("no series {series}"))
}

/// How far each of `series` moved from `before` to `after` (absent before
/// counts as 0).
fn moved(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>, series: &str) -> f64 {
    value(after, series) - before.get(series).copied().unwrap_or(0.0)
}

/// Produces 5 records to `orders` partition 0, fetches them, commits
/// offset 3 for group `billing`, and nacks offset 3.
async fn traffic(broker: &Broker) {
    create_topic(broker, "orders", 2).await;
    let records = (0..5)
        .map(|i| record(None, &format!("order-{i}")))
        .collect();
    broker
        .producer()
        .await
        .produce(produce_request("orders", Some(0), records))
        .await
        .unwrap();
    let fetched = broker
        .consumer()
        .await
        .fetch(v1::FetchRequest {
            topic: "orders".into(),
            partition: 0,
            offset: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched.records.len(), 5);
    let (member, epoch) = join_and_hold(broker, "billing", "orders").await;
    GroupServiceClient::new(broker.channel().await)
        .commit_offsets(v1::CommitOffsetsRequest {
            group_id: "billing".into(),
            member_id: member.clone(),
            member_epoch: epoch,
            offsets: vec![v1::OffsetCommit {
                topic: "orders".into(),
                partition: 0,
                offset: 3,
                metadata: String::new(),
            }],
        })
        .await
        .unwrap();
    DeadLetterServiceClient::new(broker.channel().await)
        .nack(v1::NackRequest {
            group_id: "billing".into(),
            member_id: member,
            record: Some(v1::RecordRef {
                topic: "orders".into(),
                partition: 0,
                offset: 3,
            }),
            reason: "cannot parse".into(),
            error_class: "poison".into(),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn produce_consume_commit_and_nack_move_the_named_series() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let before = samples(&broker.scrape_metrics());
    traffic(&broker).await;
    let text = broker.scrape_metrics();
    let after = samples(&text);
    let p0 = r#"{topic="orders",partition="0"}"#;
    let p1 = r#"{topic="orders",partition="1"}"#;
    assert_eq!(
        value(&after, &format!("sluice_topic_records_in_total{p0}")),
        5.0
    );
    assert_eq!(
        value(&after, &format!("sluice_topic_records_in_total{p1}")),
        0.0
    );
    assert_eq!(
        value(&after, &format!("sluice_topic_records_out_total{p0}")),
        5.0
    );
    assert!(value(&after, &format!("sluice_topic_bytes_in_total{p0}")) > 5.0 * 7.0);
    assert!(value(&after, &format!("sluice_topic_bytes_out_total{p0}")) > 5.0 * 7.0);
    assert_eq!(
        value(&after, &format!("sluice_topic_log_end_offset{p0}")),
        5.0
    );
    assert_eq!(
        value(&after, &format!("sluice_topic_log_start_offset{p0}")),
        0.0
    );
    assert_eq!(value(&after, &format!("sluice_topic_segments{p0}")), 1.0);
    assert_eq!(
        value(&after, &format!("sluice_topic_size_bytes{p0}")),
        value(&after, &format!("sluice_topic_bytes_in_total{p0}"))
    );
    assert_eq!(
        value(&after, r#"sluice_topic_partitions{topic="orders"}"#),
        2.0
    );
    // One batch of 5 records.
    assert_eq!(
        moved(&before, &after, "sluice_produce_batch_records_count"),
        1.0
    );
    assert_eq!(
        moved(&before, &after, "sluice_produce_batch_records_sum"),
        5.0
    );
    // The produce's sync, the commit's and the nack's (every-batch).
    assert!(
        moved(
            &before,
            &after,
            "sluice_storage_fsync_duration_seconds_count"
        ) >= 3.0
    );
    assert!(moved(&before, &after, "sluice_storage_group_commit_batches_sum") >= 3.0);
    // The group: one member, 2 records behind its commit at 3 of 5.
    let billing = r#"{group="billing",topic="orders",partition="0"}"#;
    assert_eq!(
        value(&after, r#"sluice_group_members{group="billing"}"#),
        1.0
    );
    assert!(value(&after, r#"sluice_group_rebalances_total{group="billing"}"#) >= 1.0);
    assert_eq!(
        value(&after, &format!("sluice_group_lag_records{billing}")),
        2.0
    );
    assert!(value(&after, &format!("sluice_group_lag_seconds{billing}")) >= 0.0);
    // The nack: counted, and waiting in the retry set.
    assert_eq!(moved(&before, &after, "sluice_dlq_nacks_total"), 1.0);
    assert_eq!(
        value(
            &after,
            r#"sluice_dlq_retries_pending{group="billing",topic="orders"}"#
        ),
        1.0
    );
    assert_eq!(moved(&before, &after, "sluice_dlq_dead_letters_total"), 0.0);
    // Every call counted under its method, each latency observed once.
    let produce = r#"{service="sluice.v1.ProduceService",method="Produce"}"#;
    assert_eq!(
        moved(
            &before,
            &after,
            &format!("sluice_rpc_requests_total{produce}")
        ),
        1.0
    );
    assert_eq!(
        moved(
            &before,
            &after,
            &format!("sluice_rpc_duration_seconds_count{produce}")
        ),
        1.0
    );
    let nack = r#"{service="sluice.v1.DeadLetterService",method="Nack"}"#;
    assert_eq!(
        moved(&before, &after, &format!("sluice_rpc_requests_total{nack}")),
        1.0
    );
    assert!(value(&after, "process_resident_memory_bytes") > 1e6);
    assert!(value(&after, "process_open_fds") > 3.0);
    assert!(value(&after, "sluice_uptime_seconds") > 0.0);
    assert!(text.contains("# TYPE sluice_rpc_duration_seconds histogram"));
}

#[tokio::test]
async fn errors_are_counted_by_method_and_status_code() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &[]);
    let mut admin = broker.admin().await;
    for _ in 0..2 {
        let status = admin
            .describe_topic(v1::DescribeTopicRequest {
                name: "missing".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::NotFound);
    }
    let after = samples(&broker.scrape_metrics());
    assert_eq!(
        value(
            &after,
            r#"sluice_rpc_errors_total{service="sluice.v1.AdminService",method="DescribeTopic",code="NotFound"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn per_partition_series_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(dir.path(), &["--metrics-per-partition", "false"]);
    traffic(&broker).await;
    let text = broker.scrape_metrics();
    assert!(
        !text.contains("partition=\""),
        "no per-partition series:\n{text}"
    );
    let after = samples(&text);
    let orders = r#"{topic="orders"}"#;
    assert_eq!(
        value(&after, &format!("sluice_topic_records_in_total{orders}")),
        5.0
    );
    assert_eq!(
        value(&after, &format!("sluice_topic_log_end_offset{orders}")),
        5.0
    );
    assert_eq!(
        value(&after, &format!("sluice_topic_segments{orders}")),
        2.0
    );
    assert_eq!(
        value(
            &after,
            r#"sluice_group_lag_records{group="billing",topic="orders"}"#
        ),
        2.0
    );
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start_broker(
        dir.path(),
        &["--metrics", "false", "--metrics-listen", "127.0.0.1:1"],
    );
    assert_eq!(broker.metrics_addr, None);
    // Still serves gRPC.
    create_topic(&broker, "orders", 1).await;
}
