//! The client library against the real broker binary.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use sluice_client::{
    Admin, ClientConfig, Consumer, Error, Producer, ProducerConfig, Record, StartFrom,
};
use sluice_testkit::{Broker, broker_binary};

mod common;
use common::take;

fn start(dir: &std::path::Path) -> Broker {
    Broker::start(&broker_binary(), dir, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_keyed_records_arrive_in_key_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("orders", 6)
        .await
        .unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    let total = 100_000u64;
    let mut deliveries = Vec::with_capacity(total as usize);
    for i in 0..total {
        let record = Record::new(format!("{}:{i}", i % 500)).with_key(format!("key-{}", i % 500));
        deliveries.push(producer.enqueue("orders", record).await.unwrap());
    }
    producer.flush().await.unwrap();
    let mut positions = HashSet::new();
    for delivery in deliveries {
        assert!(
            positions.insert(delivery.await.unwrap()),
            "two records at one position"
        );
    }
    producer.close().await.unwrap();

    let mut consumer = Consumer::new(&config).unwrap();
    consumer
        .assign("orders", &[], StartFrom::Earliest)
        .await
        .unwrap();
    let records = take(&mut consumer, total as usize).await;
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &records {
        let value = String::from_utf8(r.value.to_vec()).unwrap();
        let (key, seq) = value.split_once(':').unwrap();
        assert_eq!(r.key.as_deref(), Some(format!("key-{key}").as_bytes()));
        assert_eq!(
            r.partition,
            sluice_client::partition_for_key(format!("key-{key}").as_bytes(), 6)
        );
        per_key
            .entry(key.to_owned())
            .or_default()
            .push(seq.parse().unwrap());
    }
    assert_eq!(per_key.len(), 500);
    for (key, seqs) in per_key {
        assert_eq!(seqs.len(), 200, "key {key}");
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_producer_survives_a_broker_crash_without_losing_an_accepted_record() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("events", 3)
        .await
        .unwrap();
    let producer = Producer::new(
        &config,
        ProducerConfig {
            linger: Duration::from_millis(2),
            batch_bytes: 16 * 1024,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let total = 20_000u64;
    let sender = {
        let producer = producer.clone();
        tokio::spawn(async move {
            let mut deliveries = Vec::new();
            for i in 0..total {
                let record = Record::new(format!("event-{i}")).with_key(format!("k{}", i % 37));
                deliveries.push(producer.enqueue("events", record).await.unwrap());
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            let mut acknowledged = 0;
            for delivery in deliveries {
                delivery.await.expect("every accepted record is delivered");
                acknowledged += 1;
            }
            acknowledged
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // SIGKILL in the middle of the run; the broker comes back on the same
    // address, where the producer's channel reconnects.
    let addr = broker.addr;
    broker.kill();
    let mut broker = Broker::start(
        &broker_binary(),
        dir.path(),
        &["--listen", &addr.to_string()],
    );
    assert_eq!(sender.await.unwrap(), total);
    producer.close().await.unwrap();

    let mut consumer = Consumer::new(&config).unwrap();
    consumer
        .assign("events", &[], StartFrom::Earliest)
        .await
        .unwrap();
    let end: u64 = Admin::new(&config)
        .unwrap()
        .describe_topic("events")
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.latest_offset)
        .sum();
    // Idempotence (the default) makes the retries after the crash exact.
    assert_eq!(end, total, "each accepted record exactly once");
    let records = take(&mut consumer, end as usize).await;
    let values: HashSet<String> = records
        .iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect();
    for i in 0..total {
        assert!(values.contains(&format!("event-{i}")), "event-{i} lost");
    }
    // And each key's records come back in the order they were sent.
    let mut last: BTreeMap<u64, u64> = BTreeMap::new();
    for r in &records {
        let i: u64 = String::from_utf8(r.value.to_vec()).unwrap()["event-".len()..]
            .parse()
            .unwrap();
        if let Some(previous) = last.insert(i % 37, i) {
            assert!(
                previous < i,
                "key k{} out of order: {previous} before {i}",
                i % 37
            );
        }
    }
    let _ = broker.stop(Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_start_anywhere_and_resume_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("t", 1).await.unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    for i in 0..10 {
        producer
            .send(
                "t",
                Record::new(format!("{i}")).with_timestamp(1_000 * (i + 1)),
            )
            .await
            .unwrap();
    }
    let mut consumer = Consumer::new(&config).unwrap();
    consumer
        .assign("t", &[0], StartFrom::Timestamp(5_000))
        .await
        .unwrap();
    assert_eq!(take(&mut consumer, 1).await[0].offset, 4);
    consumer.seek("t", 0, StartFrom::Offset(8)).await.unwrap();
    assert_eq!(take(&mut consumer, 1).await[0].offset, 8);
    assert_eq!(consumer.position("t", 0), Some(9));
    consumer.seek("t", 0, StartFrom::Latest).await.unwrap();
    producer.send("t", Record::new("live")).await.unwrap();
    assert_eq!(take(&mut consumer, 1).await[0].value, "live");

    // The broker restarts; the consumer picks up after the last record it
    // handed over, no gap and no repeat.
    let addr = broker.addr;
    let broker = broker.restart_on(addr);
    producer
        .send("t", Record::new("after restart"))
        .await
        .unwrap();
    let next = take(&mut consumer, 1).await;
    assert_eq!(next[0].value, "after restart");
    assert_eq!(next[0].offset, 11);
    drop(broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed_and_say_whether_to_retry() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    let missing = admin.describe_topic("missing").await.unwrap_err();
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));
    assert!(!missing.is_retryable());
    admin.create_topic("t", 2).await.unwrap();
    let again = admin.create_topic("t", 2).await.unwrap_err();
    assert_eq!(again.code(), Some(tonic::Code::AlreadyExists));
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    let bad = producer
        .send("t", Record::new("x").with_partition(5))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(tonic::Code::NotFound));
    let too_big = producer
        .send("t", Record::new(vec![0u8; 2 * 1024 * 1024]))
        .await
        .unwrap_err();
    assert_eq!(
        too_big.code(),
        Some(tonic::Code::InvalidArgument),
        "{too_big}"
    );
    producer.close().await.unwrap();
    assert!(matches!(
        producer.send("t", Record::new("late")).await,
        Err(Error::Closed)
    ));

    let nowhere = ClientConfig::new("http://127.0.0.1:1");
    let unreachable = Admin::new(&nowhere)
        .unwrap()
        .list_topics()
        .await
        .unwrap_err();
    assert!(unreachable.is_retryable(), "{unreachable}");
    assert!(Admin::new(&ClientConfig::new("not a url")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_sent_in_one_call_lands_in_order_on_its_partition() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("bulk", 3)
        .await
        .unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    let batch = |from: u32| {
        (from..from + 100)
            .map(|i| Record::new(i.to_string()))
            .collect()
    };
    let first = producer.send_batch("bulk", 2, batch(0)).await.unwrap();
    let second = producer.send_batch("bulk", 2, batch(100)).await.unwrap();
    let offsets: Vec<u64> = first.iter().chain(&second).map(|p| p.offset).collect();
    assert_eq!(offsets, (0..200).collect::<Vec<u64>>());
    assert!(first.iter().chain(&second).all(|p| p.partition == 2));
    let unknown = producer.send_batch("bulk", 7, batch(0)).await.unwrap_err();
    assert!(!unknown.is_retryable(), "{unknown}");
    producer.close().await.unwrap();
    assert!(matches!(
        producer.send_batch("bulk", 0, batch(0)).await,
        Err(Error::Closed)
    ));

    let mut consumer = Consumer::new(&config).unwrap();
    consumer
        .assign("bulk", &[2], StartFrom::Earliest)
        .await
        .unwrap();
    let values: Vec<String> = take(&mut consumer, 200)
        .await
        .into_iter()
        .map(|r| String::from_utf8(r.value.to_vec()).unwrap())
        .collect();
    assert_eq!(values, (0..200).map(|i| i.to_string()).collect::<Vec<_>>());
}
