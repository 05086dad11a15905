//! End-to-end produce through `sluice-client` against the real broker
//! (release build), idempotence off and on, in one run: what sequence
//! checks cost per record. Topics use `flush = os` so that disk syncs do
//! not drown the difference. The variants alternate (plain, idempotent,
//! plain, idempotent) and each topic is deleted after its run: whatever ran
//! second otherwise paid for the write-back of the first one's dirty pages.
//!
//! `cargo bench -p sluice-benches --bench produce`

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use sluice_benches::{RECORD_BYTES, records};
use sluice_client::{Admin, ClientConfig, Producer, ProducerConfig, Record, TopicSettings};
use sluice_testkit::{Broker, broker_binary};

fn produce(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &["--flush", "os"]);
    let config = ClientConfig::new(broker.url());
    let payload: Vec<Record> = records(1)
        .into_iter()
        .map(|r| Record::new(r.value).with_key(r.key.unwrap()))
        .collect();
    let mut group = c.benchmark_group("produce");
    group.throughput(Throughput::Bytes(RECORD_BYTES as u64));
    for (round, idempotence) in [(1, false), (1, true), (2, false), (2, true)] {
        let topic = format!("bench-{round}-{idempotence}");
        let producer = runtime.block_on(async {
            Admin::new(&config)
                .unwrap()
                .create_topic_with(
                    &topic,
                    TopicSettings {
                        partitions: Some(4),
                        retention_bytes: Some(256 * 1024 * 1024),
                        ..TopicSettings::default()
                    },
                )
                .await
                .unwrap();
            Producer::new(
                &config,
                ProducerConfig {
                    idempotence,
                    ..ProducerConfig::default()
                },
            )
            .unwrap()
        });
        let label = if idempotence { "idempotent" } else { "plain" };
        group.bench_function(BenchmarkId::new(label, format!("round{round}")), |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let start = Instant::now();
                    for i in 0..iters {
                        let mut record = payload[0].clone();
                        record.key = Some(format!("key-{}", i % 64).into());
                        // Fire and forget: the flush below waits for all.
                        drop(producer.enqueue(&topic, record).await.unwrap());
                    }
                    producer.flush().await.unwrap();
                    start.elapsed()
                })
            })
        });
        runtime.block_on(async {
            producer.close().await.unwrap();
            Admin::new(&config)
                .unwrap()
                .delete_topic(&topic)
                .await
                .unwrap();
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(5))
        .sample_size(20);
    targets = produce
}
criterion_main!(benches);
