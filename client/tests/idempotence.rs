//! Idempotent producers: retries never duplicate, across lost responses,
//! a SIGKILL of the broker, and fencing.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use sluice_client::{Admin, ClientConfig, Consumer, Producer, ProducerConfig, Record, StartFrom};
use sluice_proto::v1::{self, produce_service_client::ProduceServiceClient};
use sluice_testkit::{Broker, ChaosProxy, broker_binary};
use tokio_stream::StreamExt;

async fn read_all(config: &ClientConfig, topic: &str) -> Vec<sluice_client::ConsumedRecord> {
    let admin = Admin::new(config).unwrap();
    let total: u64 = admin
        .describe_topic(topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.latest_offset)
        .sum();
    let mut consumer = Consumer::new(config).unwrap();
    consumer
        .assign(topic, &[], StartFrom::Earliest)
        .await
        .unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < total {
        let record = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("records keep coming")
            .unwrap()
            .unwrap();
        out.push(record);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_responses_never_write_a_record_twice() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let direct = ClientConfig::new(broker.url());
    Admin::new(&direct)
        .unwrap()
        .create_topic("payments", 4)
        .await
        .unwrap();
    // Cut connections after 60 to 600 B of responses, 40 times. The answer
    // to a batch is a few dozen bytes on the wire (no per-record positions):
    // a small buffer keeps batches small, so there are answers to lose.
    let proxy = ChaosProxy::start(broker.addr, 60, 600, 40);
    let producer = Producer::new(
        &ClientConfig::new(proxy.url()),
        ProducerConfig {
            linger: Duration::from_millis(1),
            batch_bytes: 1024,
            buffer_bytes: 512,
            retry_backoff: Duration::from_millis(10),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let total = 10_000u64;
    let mut deliveries = Vec::new();
    for i in 0..total {
        let record = Record::new(format!("{i}")).with_key(format!("account-{}", i % 40));
        deliveries.push(producer.enqueue("payments", record).await.unwrap());
    }
    for delivery in deliveries {
        delivery.await.expect("delivered despite the cuts");
    }
    producer.close().await.unwrap();
    assert!(
        proxy.cuts() >= 5,
        "the proxy cut only {} connections",
        proxy.cuts()
    );

    let records = read_all(&direct, "payments").await;
    assert_eq!(records.len() as u64, total, "each record exactly once");
    let mut per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for r in &records {
        let i: u64 = std::str::from_utf8(&r.value).unwrap().parse().unwrap();
        per_key
            .entry(String::from_utf8(r.key.clone().unwrap().to_vec()).unwrap())
            .or_default()
            .push(i);
    }
    for (key, values) in per_key {
        assert!(
            values.windows(2).all(|w| w[0] < w[1]),
            "{key} out of order: {values:?}"
        );
        assert_eq!(values.len(), 250, "{key}");
    }
}

fn batch(producer_id: u64, epoch: u32, base_sequence: i32, values: &[&str]) -> v1::ProduceRequest {
    v1::ProduceRequest {
        topic: "t".into(),
        partition: Some(0),
        records: values
            .iter()
            .map(|v| v1::Record {
                value: Bytes::copy_from_slice(v.as_bytes()),
                ..Default::default()
            })
            .collect(),
        request_id: 0,
        producer: Some(v1::ProducerBatch {
            producer_id,
            epoch,
            base_sequence,
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_replayed_after_sigkill_and_restart_is_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::start(&broker_binary(), dir.path(), &[]);
    Admin::new(&ClientConfig::new(broker.url()))
        .unwrap()
        .create_topic("t", 1)
        .await
        .unwrap();
    let mut client = ProduceServiceClient::connect(broker.url()).await.unwrap();
    let id = client
        .init_producer(v1::InitProducerRequest { name: None })
        .await
        .unwrap()
        .into_inner();
    client
        .produce(batch(id.producer_id, id.epoch, 0, &["a", "b"]))
        .await
        .unwrap();
    let original = client
        .produce(batch(id.producer_id, id.epoch, 2, &["c", "d", "e"]))
        .await
        .unwrap()
        .into_inner();
    assert!(!original.duplicate);

    broker.kill();
    let broker = broker.start_again();
    let mut client = ProduceServiceClient::connect(broker.url()).await.unwrap();
    let replay = client
        .produce(batch(id.producer_id, id.epoch, 2, &["c", "d", "e"]))
        .await
        .unwrap()
        .into_inner();
    assert!(replay.duplicate, "caught after the restart");
    assert_eq!(replay.positions, original.positions);
    let described = Admin::new(&ClientConfig::new(broker.url()))
        .unwrap()
        .describe_topic("t")
        .await
        .unwrap();
    assert_eq!(
        described.partitions[0].latest_offset, 5,
        "nothing written twice"
    );
    // The sequence goes on from there; a gap is refused.
    client
        .produce(batch(id.producer_id, id.epoch, 5, &["f"]))
        .await
        .unwrap();
    let gap = client
        .produce(batch(id.producer_id, id.epoch, 9, &["g"]))
        .await
        .unwrap_err();
    assert_eq!(gap.code(), tonic::Code::FailedPrecondition);
    assert!(gap.message().contains("out of order"), "{}", gap.message());
    assert_eq!(gap.metadata().get("sluice-error").unwrap(), "out-of-order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_instance_of_a_named_producer_fences_the_older() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("t", 1)
        .await
        .unwrap();
    let named = |name: &str| ProducerConfig {
        producer_name: Some(name.into()),
        ..ProducerConfig::default()
    };
    let old = Producer::new(&config, named("billing")).unwrap();
    old.send("t", Record::new("from the old instance"))
        .await
        .unwrap();
    let new = Producer::new(&config, named("billing")).unwrap();
    new.send("t", Record::new("from the new instance"))
        .await
        .unwrap();
    let fenced = old.send("t", Record::new("too late")).await.unwrap_err();
    assert_eq!(
        fenced.code(),
        Some(tonic::Code::FailedPrecondition),
        "{fenced}"
    );
    assert!(fenced.to_string().contains("fenced"), "{fenced}");
    assert_eq!(fenced.reason(), Some("fenced"), "{fenced}");
    assert!(!fenced.is_retryable());
    new.send("t", Record::new("still fine")).await.unwrap();
    let values: Vec<Bytes> = read_all(&config, "t")
        .await
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(
        values,
        vec![
            "from the old instance",
            "from the new instance",
            "still fine"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_batch_and_an_expired_producer_do_not_stall_or_reorder() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(
        &broker_binary(),
        dir.path(),
        &[
            "--producer-expiry-ms",
            "300",
            "--maintenance-interval-ms",
            "100",
        ],
    );
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("t", 1).await.unwrap();
    // One record per batch, so batches queue up behind each other.
    let producer = Producer::new(
        &config,
        ProducerConfig {
            linger: Duration::ZERO,
            batch_bytes: 1,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    producer.send("t", Record::new("1")).await.unwrap();
    // Too big for the client's own check: refused at once, nothing sent.
    let too_big = producer
        .send("t", Record::new(vec![b'x'; 2 << 20]))
        .await
        .unwrap_err();
    assert_eq!(
        too_big.code(),
        Some(tonic::Code::InvalidArgument),
        "{too_big}"
    );
    // The limit shrinks behind the producer's back: the broker refuses the
    // next batch, and the one sent right behind it must still go through.
    admin
        .alter_topic(
            "t",
            sluice_client::TopicSettings {
                max_record_bytes: Some(100),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let refused = producer
        .enqueue("t", Record::new(vec![b'y'; 500]))
        .await
        .unwrap();
    let behind = producer.enqueue("t", Record::new("3")).await.unwrap();
    assert_eq!(
        refused.await.unwrap_err().code(),
        Some(tonic::Code::InvalidArgument)
    );
    behind.await.expect("renumbered and resent");
    // Idle past the broker's producer expiry: it forgets this producer, and
    // the next batch moves the producer to a new epoch.
    tokio::time::sleep(Duration::from_millis(800)).await;
    producer.send("t", Record::new("4")).await.unwrap();
    producer.send("t", Record::new("5")).await.unwrap();
    producer.close().await.unwrap();
    let values: Vec<Bytes> = read_all(&config, "t")
        .await
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values, vec!["1", "3", "4", "5"]);
}

/// Issues 12 (item 4) and 13 (item 5): the newer instance fences the older
/// one on a partition the newer one has never written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_instance_fences_the_older_on_partitions_it_has_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("t", 2)
        .await
        .unwrap();
    let named = || ProducerConfig {
        producer_name: Some("billing".into()),
        ..ProducerConfig::default()
    };
    let old = Producer::new(&config, named()).unwrap();
    old.send("t", Record::new("old").with_partition(0))
        .await
        .unwrap();
    let new = Producer::new(&config, named()).unwrap();
    new.send("t", Record::new("new").with_partition(1))
        .await
        .unwrap();
    let fenced = old
        .send("t", Record::new("zombie").with_partition(0))
        .await
        .unwrap_err();
    assert_eq!(
        fenced.code(),
        Some(tonic::Code::FailedPrecondition),
        "{fenced}"
    );
    assert!(fenced.to_string().contains("fenced"), "{fenced}");
    let values: Vec<Bytes> = read_all(&config, "t")
        .await
        .into_iter()
        .map(|r| r.value)
        .collect();
    assert_eq!(values.len(), 2, "{values:?}");
    assert!(!values.contains(&Bytes::from("zombie")));
}
