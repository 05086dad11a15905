//! Defect 7 of issue 12 against the real broker binary: subscriptions under
//! `every-batch` died with OUT_OF_RANGE at segment boundaries (a seal made
//! the old segment readable before the roll moved the high watermark, and a
//! read returned batches past the watermark it had checked). Here two
//! subscribers follow four producers across many 8 KiB segments: no stream
//! may end, and each sees every record, in order.

mod grpc_common;

use std::time::Duration;

use grpc_common::*;
use sluice_proto::v1;
use tokio_stream::StreamExt;

const PRODUCERS: usize = 4;
const REQUESTS: usize = 300;
const PER_REQUEST: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_cross_segment_boundaries_without_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    // Overridable to run this test against another build (an older one,
    // to see the defect).
    let binary = sluice_testkit::broker_binary_or(env!("CARGO_BIN_EXE_sluice-broker"));
    let broker = sluice_testkit::Broker::start(
        &binary,
        dir.path(),
        &["--segment-bytes", "8192", "--max-record-bytes", "1024"],
    );
    create_topic(&broker, "small", 1).await;
    let total = PRODUCERS * REQUESTS * PER_REQUEST;
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        let mut stream = broker
            .consumer()
            .await
            .subscribe(v1::SubscribeRequest {
                topic: "small".into(),
                partitions: vec![0],
                start: Some(v1::subscribe_request::Start::Offset(0)),
                max_batch_records: 0,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        subscribers.push(tokio::spawn(async move {
            let mut seen: Vec<String> = Vec::with_capacity(total);
            while seen.len() < total {
                let response = tokio::time::timeout(Duration::from_secs(60), stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("stuck after {} records", seen.len()))
                    .unwrap_or_else(|| panic!("stream ended after {} records", seen.len()))
                    .unwrap_or_else(|s| panic!("stream failed after {}: {s:?}", seen.len()));
                for r in response.records {
                    assert_eq!(r.offset, seen.len() as u64, "in order, none skipped");
                    seen.push(value_of(&r));
                }
            }
            seen
        }));
    }
    let mut producers = Vec::new();
    for p in 0..PRODUCERS {
        let mut producer = broker.producer().await;
        producers.push(tokio::spawn(async move {
            for i in 0..REQUESTS {
                let records = (0..PER_REQUEST)
                    .map(|j| {
                        record(
                            None,
                            &format!("{p}:{:05}:{}", i * PER_REQUEST + j, "r".repeat(80)),
                        )
                    })
                    .collect();
                producer
                    .produce(produce_request("small", Some(0), records))
                    .await
                    .unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    for s in subscribers {
        let seen = s.await.unwrap();
        assert_eq!(seen.len(), total);
        // Each producer's records in the order it sent them.
        for p in 0..PRODUCERS {
            let mine: Vec<&String> = seen
                .iter()
                .filter(|v| v.starts_with(&format!("{p}:")))
                .collect();
            assert_eq!(mine.len(), REQUESTS * PER_REQUEST);
            assert!(
                mine.windows(2).all(|w| w[0] < w[1]),
                "producer {p} in order"
            );
        }
    }
    let segments = std::fs::read_dir(dir.path().join("topics/small/0"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count();
    assert!(
        segments > 20,
        "only {segments} segments: the test must cross many"
    );
}
