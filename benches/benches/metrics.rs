//! What a `/metrics` scrape costs with 10,000 partitions (100 topics x 100
//! partitions, one record each, and a group with a committed offset one
//! record behind on every partition, so lag reads a record per partition):
//! with per-partition series off and on. In process: the broker's own
//! registry and collectors over a real data directory, without HTTP.
//!
//! `cargo bench -p sluice-benches --bench metrics`

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use sluice_broker::dlq::RetrySets;
use sluice_broker::groups::{GroupCoordinator, GroupSettings, OffsetStore, TopicPartition};
use sluice_broker::metrics::{Metrics, MetricsSettings};
use sluice_broker::storage::{BatchBuilder, ProducerInfo, Record};
use sluice_broker::topics::{TopicConfigPatch, TopicDefaults, TopicRegistry};

const TOPICS: u32 = 100;
const PARTITIONS: u32 = 100;

fn scrape(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let topics = Arc::new(TopicRegistry::open(dir.path(), TopicDefaults::default()).unwrap());
    let mut record = BatchBuilder::default();
    record.push(&Record {
        key: None,
        value: Bytes::from_static(b"a record of some thirty-two bytes"),
        headers: vec![],
        timestamp: 1,
    });
    let batch = record.finish(ProducerInfo::NONE);
    let mut committed = Vec::new();
    for t in 0..TOPICS {
        let name = format!("topic-{t:03}");
        topics
            .create(
                &name,
                &TopicConfigPatch {
                    partitions: Some(PARTITIONS),
                    flush: Some("os".into()),
                    ..TopicConfigPatch::default()
                },
            )
            .unwrap();
        let topic = topics.get(&name).unwrap();
        for partition in topic.partitions() {
            partition.appender().append(&batch, 1).unwrap();
            partition.appender().append(&batch, 1).unwrap();
            committed.push((
                TopicPartition::new(&name, partition.index),
                1,
                String::new(),
            ));
        }
    }
    let offsets = OffsetStore::open(dir.path().join("internal/offsets")).unwrap();
    let groups = Arc::new(GroupCoordinator::new(
        offsets,
        Box::new(Arc::clone(&topics)),
        GroupSettings::default(),
    ));
    groups
        .commit("billing", None, committed, Instant::now(), 1)
        .unwrap();
    let retries = Arc::new(RetrySets::open(dir.path().join("internal/retries")).unwrap());
    eprintln!(
        "{} partitions set up in {:.1} s",
        TOPICS * PARTITIONS,
        started.elapsed().as_secs_f64()
    );
    let mut group = c.benchmark_group("metrics_scrape_10k_partitions");
    group.sample_size(10);
    for per_partition in [false, true] {
        let metrics = Metrics::new(MetricsSettings { per_partition });
        metrics.watch_state(
            Arc::clone(&topics),
            Arc::clone(&groups),
            Arc::clone(&retries),
        );
        let text = metrics.encode().unwrap();
        eprintln!(
            "per_partition={per_partition}: {} lines, {} KiB per scrape",
            text.lines().count(),
            text.len() / 1024
        );
        group.bench_function(format!("per_partition={per_partition}"), |b| {
            b.iter(|| metrics.encode().unwrap().len())
        });
    }
    group.finish();
    topics.close().unwrap();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
