//! End-to-end produce through `sluice-client` against the real broker
//! (release build), idempotence off and on, in one run: what sequence
//! checks cost per record. Topics use `flush = os` so that disk syncs do
//! not drown the difference. The variants alternate (plain, idempotent,
//! plain, idempotent) and each topic is deleted after its run: whatever ran
//! second otherwise paid for the write-back of the first one's dirty pages.
//!
//! The second group, `produce_metrics`, is the same idempotent produce
//! against two brokers started alike but for `--metrics false` on one,
//! alternating (on, off, on, off): what recording metrics costs.
//!
//! `cargo bench -p sluice-benches --bench produce`

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::{RECORD_BYTES, records};
use sluice_client::{Admin, ClientConfig, Producer, ProducerConfig, Record, TopicSettings};
use sluice_testkit::{Broker, broker_binary};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn payload() -> Vec<Record> {
    records(1)
        .into_iter()
        .map(|r| Record::new(r.value).with_key(r.key.unwrap()))
        .collect()
}

/// One measured round: `topic` created on `config`'s broker, records
/// enqueued one by one and flushed, the topic deleted afterwards.
fn round(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    config: &ClientConfig,
    id: BenchmarkId,
    topic: &str,
    idempotence: bool,
) {
    let payload = payload();
    let producer = runtime.block_on(async {
        Admin::new(config)
            .unwrap()
            .create_topic_with(
                topic,
                TopicSettings {
                    partitions: Some(4),
                    retention_bytes: Some(256 * 1024 * 1024),
                    ..TopicSettings::default()
                },
            )
            .await
            .unwrap();
        Producer::new(
            config,
            ProducerConfig {
                idempotence,
                ..ProducerConfig::default()
            },
        )
        .unwrap()
    });
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for i in 0..iters {
                    let mut record = payload[0].clone();
                    record.key = Some(format!("key-{}", i % 64).into());
                    // Fire and forget: the flush below waits for all.
                    drop(producer.enqueue(topic, record).await.unwrap());
                }
                producer.flush().await.unwrap();
                start.elapsed()
            })
        })
    });
    runtime.block_on(async {
        producer.close().await.unwrap();
        Admin::new(config)
            .unwrap()
            .delete_topic(topic)
            .await
            .unwrap();
    });
}

fn produce(c: &mut Criterion) {
    let runtime = runtime();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &["--flush", "os"]);
    let config = ClientConfig::new(broker.url());
    let mut group = c.benchmark_group("produce");
    group.throughput(Throughput::Bytes(RECORD_BYTES as u64));
    for (n, idempotence) in [(1, false), (1, true), (2, false), (2, true)] {
        let label = if idempotence { "idempotent" } else { "plain" };
        let id = BenchmarkId::new(label, format!("round{n}"));
        let topic = format!("bench-{n}-{idempotence}");
        round(&mut group, &runtime, &config, id, &topic, idempotence);
    }
    group.finish();
}

fn produce_metrics(c: &mut Criterion) {
    let runtime = runtime();
    let on_dir = tempfile::tempdir().unwrap();
    let off_dir = tempfile::tempdir().unwrap();
    let on = Broker::start(&broker_binary(), on_dir.path(), &["--flush", "os"]);
    let off = Broker::start(
        &broker_binary(),
        off_dir.path(),
        &["--flush", "os", "--metrics", "false"],
    );
    assert!(on.metrics_addr.is_some() && off.metrics_addr.is_none());
    let mut group = c.benchmark_group("produce_metrics");
    group.throughput(Throughput::Bytes(RECORD_BYTES as u64));
    for (n, metrics) in [(1, true), (1, false), (2, true), (2, false)] {
        let broker = if metrics { &on } else { &off };
        let config = ClientConfig::new(broker.url());
        let label = if metrics { "metrics_on" } else { "metrics_off" };
        let id = BenchmarkId::new(label, format!("round{n}"));
        round(
            &mut group,
            &runtime,
            &config,
            id,
            &format!("bench-{n}"),
            true,
        );
        if metrics {
            // What a scrape sees, so the recording is known to happen.
            assert!(
                on.scrape_metrics()
                    .contains("sluice_topic_records_in_total")
            );
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);
    targets = produce, produce_metrics
}
criterion_main!(benches);
