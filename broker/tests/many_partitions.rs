//! Many partitions against the real broker binary: created, written,
//! restarted and read back, with what they cost measured and bounded. 1,000
//! partitions (10 topics x 100) run in the default suite; 10,000 (100 x 100)
//! are behind `#[ignore]`:
//!
//! ```text
//! cargo test --release -p sluice-broker --test many_partitions -- --ignored --nocapture
//! ```

mod grpc_common;

use std::path::Path;
use std::time::{Duration, Instant};

use grpc_common::*;
use sluice_proto::v1;
use sluice_testkit::Broker;
use tokio::task::JoinSet;

/// Bytes of real blocks under `dir`, and how many files.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0;
    let mut files = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        if meta.is_dir() {
            let (b, f) = disk_usage(&entry.path());
            bytes += b;
            files += f;
        } else {
            bytes += meta.blocks() * 512;
            files += 1;
        }
    }
    (bytes, files)
}

/// Open descriptors and resident memory (KiB) of a process.
fn process_cost(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// Runs `op(topic, partition)` for every partition, a few dozen at a time.
async fn for_each_partition<F, Fut>(topics: usize, partitions: u32, op: F)
where
    F: Fn(String, u32) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut running = JoinSet::new();
    for t in 0..topics {
        for p in 0..partitions {
            if running.len() >= 32 {
                running.join_next().await.unwrap().unwrap();
            }
            running.spawn(op(format!("many-{t}"), p));
        }
    }
    while let Some(done) = running.join_next().await {
        done.unwrap();
    }
}

fn value(topic: &str, partition: u32) -> String {
    format!("{topic}/{partition}: {}", "v".repeat(100))
}

async fn many_partitions(topics: usize, partitions: u32) {
    let total = topics as u64 * u64::from(partitions);
    let dir = tempfile::tempdir().unwrap();
    // The binary can be overridden for long runs on a shared target
    // directory, where another build may replace it mid-run.
    let binary = sluice_testkit::broker_binary_or(env!("CARGO_BIN_EXE_sluice-broker"));
    let mut broker = Broker::start(&binary, dir.path(), &[]);
    let started = Instant::now();
    for t in 0..topics {
        create_topic(&broker, &format!("many-{t}"), partitions).await;
    }
    let created_in = started.elapsed();
    let producer = broker.producer().await;
    let started = Instant::now();
    for_each_partition(topics, partitions, |topic, p| {
        let mut producer = producer.clone();
        async move {
            producer
                .produce(produce_request(
                    &topic,
                    Some(p),
                    vec![record(None, &value(&topic, p))],
                ))
                .await
                .unwrap();
        }
    })
    .await;
    let written_in = started.elapsed();
    let (fds, rss_kib) = process_cost(broker.pid());
    let (disk, files) = disk_usage(dir.path());

    let started = Instant::now();
    broker.stop(Duration::from_secs(120));
    let stopped_in = started.elapsed();
    let started = Instant::now();
    let broker: Broker = broker.start_again();
    let restarted_in = started.elapsed();
    let (fds_after, rss_after_kib) = process_cost(broker.pid());

    let consumer = broker.consumer().await;
    let started = Instant::now();
    for_each_partition(topics, partitions, |topic, p| {
        let mut consumer = consumer.clone();
        async move {
            let records = consumer
                .fetch(v1::FetchRequest {
                    topic: topic.clone(),
                    partition: p,
                    offset: 0,
                    max_records: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .records;
            assert_eq!(records.len(), 1, "{topic}/{p}");
            assert_eq!(value_of(&records[0]), value(&topic, p));
        }
    })
    .await;
    let read_in = started.elapsed();

    println!(
        "{total} partitions: created in {created_in:.1?}, one record each written in \
         {written_in:.1?}; {fds} descriptors, {} MiB resident; {} MiB of disk in {files} files \
         ({} KiB per partition); clean stop {stopped_in:.1?}, restart to listening \
         {restarted_in:.1?}, then {fds_after} descriptors, {} MiB resident; read back in \
         {read_in:.1?}",
        rss_kib / 1024,
        disk >> 20,
        disk / total / 1024,
        rss_after_kib / 1024,
    );
    // An idle partition costs one first preallocation step (64 KiB) plus
    // small files; the broker's own state a few MiB.
    assert!(
        disk <= total * 80 * 1024 + (64 << 20),
        "{total} partitions with one record each take {disk} bytes of disk"
    );
    // One descriptor per partition (its active segment), plus the broker's.
    assert!(
        (fds_after as u64) <= total + 200,
        "{fds_after} descriptors for {total} partitions"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_partitions_are_created_written_and_restarted() {
    many_partitions(10, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 10,000 partitions"]
async fn ten_thousand_partitions_are_created_written_and_restarted() {
    many_partitions(100, 100).await;
}
