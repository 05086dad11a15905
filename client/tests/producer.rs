//! The producer's promises under load, cancellation and faults (issue 18):
//! batches the broker accepts, delivery timeouts that fire on time and say
//! whether a record may have been written, cancel-safe `enqueue`, `flush`
//! and `close` that neither starve nor race, and topic settings that do not
//! go stale.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_client::{
    Admin, ClientConfig, DeliveryFuture, Error, Producer, ProducerConfig, Record, TopicSettings,
};
use sluice_testkit::{Broker, Fault, FaultProxy, broker_binary};

fn start(dir: &std::path::Path) -> Broker {
    Broker::start(&broker_binary(), dir, &[])
}

/// Records in `topic`, over all its partitions.
async fn stored(config: &ClientConfig, topic: &str) -> u64 {
    Admin::new(config)
        .unwrap()
        .describe_topic(topic)
        .await
        .unwrap()
        .partitions
        .iter()
        .map(|p| p.latest_offset)
        .sum()
}

/// Whether `delivery` has resolved already, and how.
async fn resolved(
    delivery: DeliveryFuture,
) -> Option<sluice_client::Result<sluice_client::Position>> {
    tokio::time::timeout(Duration::ZERO, delivery).await.ok()
}

/// A tiny deterministic generator (xorshift), for reproducible stress.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_producer_cuts_batches_to_what_the_topic_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    // 1 MiB segments: the broker takes at most 512 KiB per idempotent batch.
    Admin::new(&config)
        .unwrap()
        .create_topic_with(
            "small-segments",
            TopicSettings {
                partitions: Some(1),
                segment_bytes: Some(1024 * 1024),
                max_record_bytes: Some(64 * 1024),
                ..TopicSettings::default()
            },
        )
        .await
        .unwrap();
    let info = Admin::new(&config)
        .unwrap()
        .describe_topic("small-segments")
        .await
        .unwrap();
    assert_eq!(
        info.max_batch_bytes,
        Some(512 * 1024),
        "the broker says its limit"
    );
    let producer = Producer::new(
        &config,
        ProducerConfig {
            max_in_flight: 1,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..300u32 {
        let record = Record::new(vec![b'x'; 10 * 1024]).with_key(i.to_string());
        deliveries.push(producer.enqueue("small-segments", record).await.unwrap());
    }
    let mut failed = Vec::new();
    for delivery in deliveries {
        if let Err(error) = delivery.await {
            failed.push(error.to_string());
        }
    }
    producer.close().await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of 300 records failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    assert_eq!(stored(&config, "small-segments").await, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_broker_times_records_out_with_an_unknown_outcome() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let direct = ClientConfig::new(broker.url());
    Admin::new(&direct)
        .unwrap()
        .create_topic("silent", 1)
        .await
        .unwrap();
    let proxy = FaultProxy::start(broker.addr);
    let timeout = Duration::from_secs(2);
    let producer = Producer::new(
        &ClientConfig::new(proxy.url()),
        ProducerConfig {
            delivery_timeout: timeout,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    producer
        .send("silent", Record::new("warm-up"))
        .await
        .unwrap();
    // The broker still writes what it gets; its answers are lost.
    proxy.set(Fault::SwallowReplies);
    let started = Instant::now();
    let mut deliveries = Vec::new();
    for i in 0..5 {
        deliveries.push(
            producer
                .enqueue("silent", Record::new(format!("r{i}")))
                .await
                .unwrap(),
        );
    }
    for delivery in deliveries {
        let error = tokio::time::timeout(Duration::from_secs(20), delivery)
            .await
            .expect("the delivery timeout fires although the broker is silent")
            .unwrap_err();
        assert!(
            matches!(error, Error::UnknownOutcome(..)),
            "a sent record's outcome is unknown: {error}"
        );
        assert!(!error.is_retryable(), "{error}");
    }
    assert!(started.elapsed() >= timeout);
    // They were written: a caller that retried would have written them twice.
    assert_eq!(stored(&direct, "silent").await, 6);
    let _ = tokio::time::timeout(Duration::from_secs(30), producer.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_queued_while_disconnected_time_out_together() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let direct = ClientConfig::new(broker.url());
    Admin::new(&direct)
        .unwrap()
        .create_topic("cut-off", 2)
        .await
        .unwrap();
    let proxy = FaultProxy::start(broker.addr);
    let producer = Producer::new(
        &ClientConfig::new(proxy.url()),
        ProducerConfig {
            delivery_timeout: Duration::from_secs(2),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    // Learns the topic's settings while the broker is reachable.
    producer
        .send("cut-off", Record::new("warm-up").with_partition(0))
        .await
        .unwrap();
    proxy.set(Fault::Refuse);
    let started = Instant::now();
    let mut deliveries = Vec::new();
    for i in 0..15 {
        // Partition 1 has no stream yet: nothing of it can have been sent.
        let record = Record::new(format!("r{i}")).with_partition(1);
        deliveries.push(producer.enqueue("cut-off", record).await.unwrap());
    }
    for (i, delivery) in deliveries.into_iter().enumerate() {
        // Generous against a 2 s timeout; one expiry per backoff step
        // (2 s at most) took 30 s for 15 records.
        let result = tokio::time::timeout_at((started + Duration::from_secs(15)).into(), delivery)
            .await
            .unwrap_or_else(|_| panic!("record {i} still pending after 15 s"));
        let error = result.unwrap_err();
        assert!(
            matches!(error, Error::Timeout(..)),
            "a record never sent times out plainly: {error}"
        );
        assert!(error.is_retryable(), "never written: safe to retry");
    }
    assert_eq!(stored(&direct, "cut-off").await, 1);
    let _ = tokio::time::timeout(Duration::from_secs(30), producer.close()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_enqueues_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("cancel", 4)
        .await
        .unwrap();
    // A small buffer: enqueues often wait for room, and are cancelled there.
    let producer = Producer::new(
        &config,
        ProducerConfig {
            buffer_bytes: 16 * 1024,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let cancelled = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for seed in 1..=4u64 {
        let producer = producer.clone();
        let cancelled = Arc::clone(&cancelled);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut accepted = Vec::new();
            for i in 0..1_500u64 {
                let record = Record::new(vec![b'c'; 1024]).with_key(format!("{seed}-{i}"));
                let patience = Duration::from_micros(rng.next() % 400);
                tokio::select! {
                    result = producer.enqueue("cancel", record) => accepted.push(result.unwrap()),
                    () = tokio::time::sleep(patience) => {
                        cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            accepted
        }));
    }
    let mut accepted = Vec::new();
    for task in tasks {
        accepted.extend(task.await.unwrap());
    }
    let cancelled = cancelled.load(Ordering::Relaxed);
    assert!(cancelled > 100, "only {cancelled} enqueues were cancelled");
    tokio::time::timeout(Duration::from_secs(60), producer.flush())
        .await
        .expect("flush returns after cancelled enqueues")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(60), producer.close())
        .await
        .expect("close returns after cancelled enqueues")
        .unwrap();
    let delivered = accepted.len() as u64;
    for delivery in accepted {
        delivery.await.expect("an accepted record is delivered");
    }
    // A cancelled enqueue wrote nothing.
    assert_eq!(stored(&config, "cancel").await, delivered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_waits_only_for_records_accepted_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("busy", 2)
        .await
        .unwrap();
    // A long linger and a steady trickle well below what the broker takes:
    // some record accepted after the flush is always lingering in a batch,
    // so the producer as a whole is never idle.
    let producer = Producer::new(
        &config,
        ProducerConfig {
            linger: Duration::from_millis(200),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let background = {
        let (producer, stop) = (producer.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let record = Record::new(vec![b'b'; 512]).with_key(format!("bg-{}", i % 16));
                drop(producer.enqueue("busy", record).await.unwrap());
                i += 1;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    for round in 0..5 {
        let mut mine = Vec::new();
        for i in 0..50 {
            let record = Record::new(format!("{round}-{i}")).with_key(format!("fg-{i}"));
            mine.push(producer.enqueue("busy", record).await.unwrap());
        }
        tokio::time::timeout(Duration::from_secs(20), producer.flush())
            .await
            .unwrap_or_else(|_| panic!("flush {round} starved by the background producer"))
            .unwrap();
        for delivery in mine {
            let result = resolved(delivery)
                .await
                .expect("flush returned before a record accepted before it settled");
            result.unwrap();
        }
    }
    stop.store(true, Ordering::Relaxed);
    background.await.unwrap();
    producer.close().await.unwrap();
}

/// Takes the deliveries in `accepted` and counts those not yet resolved;
/// the others must have succeeded or failed with `Closed`.
async fn unsettled(accepted: &Mutex<Vec<DeliveryFuture>>) -> usize {
    let deliveries = std::mem::take(&mut *accepted.lock().unwrap());
    let mut pending = 0;
    for delivery in deliveries {
        match resolved(delivery).await {
            None => pending += 1,
            Some(Ok(_)) | Some(Err(Error::Closed)) => {}
            Some(Err(error)) => panic!("failed with {error}, not Closed"),
        }
    }
    pending
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_leaves_nothing_in_flight_with_enqueues_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    Admin::new(&config)
        .unwrap()
        .create_topic("closing", 4)
        .await
        .unwrap();
    for (round, delay_ms) in [0u64, 0, 1, 2, 5, 10, 20, 50].into_iter().enumerate() {
        // A small buffer: enqueues wait for room while close drains; at
        // first they wait for the topic's settings.
        let producer = Producer::new(
            &config,
            ProducerConfig {
                buffer_bytes: 8 * 1024,
                ..ProducerConfig::default()
            },
        )
        .unwrap();
        let accepted: Arc<Mutex<Vec<DeliveryFuture>>> = Arc::default();
        let mut tasks = Vec::new();
        for t in 0..16u64 {
            let (producer, accepted) = (producer.clone(), Arc::clone(&accepted));
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let record = Record::new(vec![b'z'; 1024]).with_key(format!("{t}-{i}"));
                    match producer.enqueue("closing", record).await {
                        Ok(delivery) => accepted.lock().unwrap().push(delivery),
                        Err(Error::Closed) => return,
                        Err(error) => panic!("enqueue failed with {error}, not Closed"),
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        tokio::time::timeout(Duration::from_secs(60), producer.close())
            .await
            .expect("close returns")
            .unwrap();
        // Everything accepted is settled by now, including what enqueues
        // still in progress when close started got accepted.
        let mut pending = unsettled(&accepted).await;
        for task in tasks {
            task.await.unwrap();
        }
        pending += unsettled(&accepted).await;
        assert_eq!(pending, 0, "round {round}: records in flight after close");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_recreated_with_fewer_partitions_is_looked_up_again() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("shrinks", 4).await.unwrap();
    let producer = Producer::new(&config, ProducerConfig::default()).unwrap();
    for i in 0..8 {
        let record = Record::new("before").with_key(format!("key-{i}"));
        producer.send("shrinks", record).await.unwrap();
    }
    admin.delete_topic("shrinks").await.unwrap();
    admin.create_topic("shrinks", 1).await.unwrap();
    let mut failed = 0;
    for i in 0..40 {
        let record = Record::new("after").with_key(format!("key-{i}"));
        if producer.send("shrinks", record).await.is_err() {
            failed += 1;
        }
    }
    producer.close().await.unwrap();
    // The first refusal for a partition the topic no longer has drops the
    // cached settings; the next record is routed by the new ones.
    assert!(failed <= 1, "{failed} of 40 records failed");
    assert_eq!(stored(&config, "shrinks").await, 40 - failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_record_limit_is_learnt_from_the_refusal() {
    lowered_record_limit(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lowered_record_limit_is_learnt_without_idempotence_too() {
    lowered_record_limit(false).await;
}

async fn lowered_record_limit(idempotence: bool) {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("limits", 1).await.unwrap();
    let producer = Producer::new(
        &config,
        ProducerConfig {
            idempotence,
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    producer
        .send("limits", Record::new("warm-up"))
        .await
        .unwrap();
    admin
        .alter_topic(
            "limits",
            TopicSettings {
                max_record_bytes: Some(4096),
                ..TopicSettings::default()
            },
        )
        .await
        .unwrap();
    let batch = || {
        (0..10).map(|i| {
            let size = if i == 5 { 5000 } else { 100 };
            Record::new(vec![b'l'; size])
        })
    };
    // The first batch meets the new limit at the broker: the producer looks
    // it up and sends the records within it again.
    let mut first = Vec::new();
    for record in batch() {
        first.push(producer.enqueue("limits", record).await.unwrap());
    }
    let mut sunk = 0;
    for (i, delivery) in first.into_iter().enumerate() {
        match delivery.await {
            Ok(_) => assert_ne!(i, 5, "the large record was written"),
            Err(error) => {
                assert_eq!(i, 5, "record {i} sank with the large one: {error}");
                assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
                sunk += 1;
            }
        }
    }
    assert_eq!(sunk, 1);
    // From then on the producer knows it: only the large record fails, at once.
    let mut second = Vec::new();
    let mut refused = 0;
    for record in batch() {
        match producer.enqueue("limits", record).await {
            Ok(delivery) => second.push(delivery),
            Err(error) => {
                assert_eq!(error.code(), Some(tonic::Code::InvalidArgument), "{error}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 1, "the large record is refused by the producer");
    for delivery in second {
        delivery.await.expect("small records are not sunk with it");
    }
    producer.close().await.unwrap();
    assert_eq!(stored(&config, "limits").await, 1 + 9 + 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_settings_expire_after_metadata_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("aging", 4).await.unwrap();
    let producer = Producer::new(
        &config,
        ProducerConfig {
            metadata_max_age: Duration::from_millis(200),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    producer
        .send("aging", Record::new("before").with_partition(3))
        .await
        .unwrap();
    admin.delete_topic("aging").await.unwrap();
    admin.create_topic("aging", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Looked up again: the producer itself says partition 3 is gone.
    let error = producer
        .enqueue("aging", Record::new("after").with_partition(3))
        .await
        .err()
        .expect("refused before it is sent");
    assert_eq!(error.code(), Some(tonic::Code::NotFound), "{error}");
    for i in 0..20 {
        let record = Record::new("after").with_key(format!("key-{i}"));
        producer.send("aging", record).await.unwrap();
    }
    producer.close().await.unwrap();
}

/// Reads every record of partition 0 of `topic`.
async fn read_partition(config: &ClientConfig, topic: &str) -> Vec<sluice_client::ConsumedRecord> {
    let total = stored(config, topic).await as usize;
    let mut consumer = sluice_client::Consumer::new(config).unwrap();
    consumer
        .assign(topic, &[0], sluice_client::StartFrom::Earliest)
        .await
        .unwrap();
    let mut out = Vec::with_capacity(total);
    while out.len() < total {
        let record = tokio::time::timeout(
            Duration::from_secs(30),
            tokio_stream::StreamExt::next(&mut consumer),
        )
        .await
        .expect("records keep coming")
        .unwrap()
        .unwrap();
        out.push(record);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_with_batches_behind_them_never_duplicate_lose_or_reorder() {
    let dir = tempfile::tempdir().unwrap();
    let broker = start(dir.path());
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("flapping", 1).await.unwrap();
    // The record limit flaps under a producer whose view of it lags: the
    // broker refuses batches with more pipelined behind them, which are
    // renumbered and resent while the refused stream still holds them.
    let stop = Arc::new(AtomicBool::new(false));
    let flapper = {
        let (admin, stop) = (admin.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut low = true;
            while !stop.load(Ordering::Relaxed) {
                let limit = if low { 200 } else { 4096 };
                admin
                    .alter_topic(
                        "flapping",
                        TopicSettings {
                            max_record_bytes: Some(limit),
                            ..TopicSettings::default()
                        },
                    )
                    .await
                    .unwrap();
                low = !low;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    let producer = Producer::new(
        &config,
        ProducerConfig {
            linger: Duration::ZERO,
            batch_bytes: 1,
            metadata_max_age: Duration::from_millis(10),
            ..ProducerConfig::default()
        },
    )
    .unwrap();
    let mut deliveries = Vec::new();
    for i in 0..2_000u32 {
        // Every third record is over the low limit.
        let padding = if i % 3 == 0 { 300 } else { 10 };
        let value = format!("{i:06}:{}", "p".repeat(padding));
        match producer.enqueue("flapping", Record::new(value)).await {
            Ok(delivery) => deliveries.push((i, delivery)),
            Err(error) => assert_eq!(error.code(), Some(tonic::Code::InvalidArgument)),
        }
        if i % 20 == 0 {
            // Spread over some flaps of the limit.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let mut delivered = std::collections::BTreeMap::new();
    let mut refused = 0;
    for (i, delivery) in deliveries {
        match delivery.await {
            Ok(position) => {
                delivered.insert(position.offset, i);
            }
            Err(_) => refused += 1,
        }
    }
    let large = delivered.values().filter(|i| *i % 3 == 0).count();
    eprintln!(
        "{} delivered ({large} large), {refused} refused",
        delivered.len()
    );
    stop.store(true, Ordering::Relaxed);
    flapper.await.unwrap();
    producer.close().await.unwrap();

    let log = read_partition(&config, "flapping").await;
    let ids: Vec<u32> = log
        .iter()
        .map(|r| std::str::from_utf8(&r.value[..6]).unwrap().parse().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "duplicated or reordered in the log"
    );
    assert_eq!(
        log.len(),
        delivered.len(),
        "written but reported failed, or lost"
    );
    for record in &log {
        let id: u32 = std::str::from_utf8(&record.value[..6])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            delivered.get(&record.offset),
            Some(&id),
            "offset {} holds record {id}, not the one acknowledged there",
            record.offset
        );
    }
}
