//! Dead-letter queues end to end: nack, redelivery with backoff, dead
//! letters with their headers, restarts, and redrive.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sluice_client::{
    Admin, ClientConfig, CommitMode, ConsumedRecord, Consumer, Error, GroupConfig, GroupConsumer,
    Producer, ProducerConfig, Record, RedriveOptions, StartFrom, TopicSettings,
};
use sluice_testkit::{Broker, broker_binary};

async fn create(admin: &Admin, topic: &str, partitions: u32, max_deliveries: u32, backoff_ms: u64) {
    admin
        .create_topic_with(
            topic,
            TopicSettings {
                partitions: Some(partitions),
                max_deliveries: Some(max_deliveries),
                retry_backoff_ms: Some(backoff_ms),
                retry_backoff_multiplier: Some(2.0),
                retry_backoff_max_ms: Some(backoff_ms * 4),
                ..TopicSettings::default()
            },
        )
        .await
        .unwrap();
}

async fn produce(config: &ClientConfig, topic: &str, count: u32) {
    let producer = Producer::new(config, ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for n in 0..count {
        let record = Record::new(n.to_string())
            .with_key(format!("key-{}", n % 50))
            .with_header("origin", "test");
        deliveries.push(producer.enqueue(topic, record).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
    producer.close().await.unwrap();
}

fn group(group: &str, topic: &str) -> GroupConfig {
    let mut config = GroupConfig::new(group, [topic]);
    config.session_timeout = Duration::from_secs(5);
    config.commit = CommitMode::Auto(Duration::from_millis(100));
    config.retry_poll_interval = Duration::from_millis(50);
    config
}

fn number(record: &ConsumedRecord) -> u32 {
    std::str::from_utf8(&record.value).unwrap().parse().unwrap()
}

fn header<'a>(record: &'a ConsumedRecord, name: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .rev()
        .find(|h| h.key == name)
        .map(|h| std::str::from_utf8(&h.value).unwrap())
}

/// Every record of a topic, from the start.
async fn read_all(config: &ClientConfig, topic: &str) -> Vec<ConsumedRecord> {
    let admin = Admin::new(config).unwrap();
    let end: u64 = admin
        .offsets(topic, &[], StartFrom::Latest)
        .await
        .unwrap()
        .iter()
        .map(|(_, o)| o)
        .sum();
    let mut consumer = Consumer::new(config).unwrap();
    consumer
        .assign(topic, &[], StartFrom::Earliest)
        .await
        .unwrap();
    let mut out = Vec::new();
    while (out.len() as u64) < end {
        out.push(consumer.next_record().await.unwrap().unwrap());
    }
    out
}

/// Runs `handler` over records until `done` says so; nacks on error,
/// acks redeliveries on success. Returns every delivery (number, attempt).
async fn run_until(
    consumer: &mut GroupConsumer,
    within: Duration,
    mut handler: impl FnMut(&ConsumedRecord) -> Result<(), String>,
    mut done: impl FnMut(&[(u32, u32)]) -> bool,
) -> Vec<(u32, u32)> {
    let deadline = Instant::now() + within;
    let mut deliveries = Vec::new();
    while !done(&deliveries) {
        assert!(
            Instant::now() < deadline,
            "not done in time: {} deliveries",
            deliveries.len()
        );
        let Ok(record) = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        else {
            continue;
        };
        let record = record.unwrap();
        deliveries.push((number(&record), record.attempt));
        match handler(&record) {
            Ok(()) => consumer.ack(&record).await.unwrap(),
            Err(reason) => {
                consumer.nack(&record, &reason, "poison").await.unwrap();
            }
        }
    }
    deliveries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_are_retried_then_dead_lettered_once_without_stalling() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    create(&admin, "payments", 3, 3, 50).await;
    produce(&config, "payments", 3000).await;

    let mut consumer = GroupConsumer::new(&config, group("ledger", "payments")).unwrap();
    let poison = |n: u32| n % 100 == 7;
    let deliveries = run_until(
        &mut consumer,
        Duration::from_secs(60),
        |r| {
            if poison(number(r)) {
                Err(format!("cannot parse payment {}", number(r)))
            } else {
                Ok(())
            }
        },
        |d| {
            // Every good record once, every poison record 3 times.
            d.len() == 2970 + 30 * 3
        },
    )
    .await;
    let mut counts: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (n, attempt) in &deliveries {
        counts.entry(*n).or_default().push(*attempt);
    }
    assert_eq!(counts.len(), 3000, "every record delivered");
    for (n, attempts) in &counts {
        if poison(*n) {
            assert_eq!(
                attempts,
                &vec![1, 2, 3],
                "poison {n} delivered max_deliveries times"
            );
        } else {
            assert_eq!(attempts, &vec![1], "good record {n} delivered once");
        }
    }
    // The partitions never waited for a poison record: every good record
    // was handed over before the first poison record's last delivery.
    let first_final_poison = deliveries
        .iter()
        .position(|(n, attempt)| poison(*n) && *attempt == 3)
        .unwrap();
    let good_before = deliveries[..first_final_poison]
        .iter()
        .filter(|(n, _)| !poison(*n))
        .count();
    assert!(
        good_before > 2900,
        "only {good_before} good records before the first dead letter: partitions stalled"
    );

    // Each poison record is in the group's DLQ once, unchanged, with the
    // dead-letter headers.
    let dlq = read_all(&config, "payments.ledger.dlq").await;
    assert_eq!(dlq.len(), 30);
    let mut dead: BTreeSet<u32> = BTreeSet::new();
    for letter in &dlq {
        let n = number(letter);
        assert!(poison(n) && dead.insert(n), "{n} dead-lettered once");
        assert_eq!(
            letter.key.as_deref(),
            Some(format!("key-{}", n % 50).as_bytes())
        );
        assert_eq!(header(letter, "origin"), Some("test"), "own headers kept");
        assert_eq!(header(letter, "sluice.dlq.source-topic"), Some("payments"));
        assert_eq!(header(letter, "sluice.dlq.group"), Some("ledger"));
        assert_eq!(header(letter, "sluice.dlq.attempts"), Some("3"));
        assert_eq!(header(letter, "sluice.dlq.error-class"), Some("poison"));
        assert_eq!(
            header(letter, "sluice.dlq.reason"),
            Some(format!("cannot parse payment {n}").as_str())
        );
        let first: i64 = header(letter, "sluice.dlq.first-failure-ms")
            .unwrap()
            .parse()
            .unwrap();
        let last: i64 = header(letter, "sluice.dlq.last-failure-ms")
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            first <= last && last - first >= 50,
            "backoff between failures: {first}..{last}"
        );
        // Its source position holds the same record.
        let partition: u32 = header(letter, "sluice.dlq.source-partition")
            .unwrap()
            .parse()
            .unwrap();
        let offset: u64 = header(letter, "sluice.dlq.source-offset")
            .unwrap()
            .parse()
            .unwrap();
        let source = read_all(&config, "payments")
            .await
            .into_iter()
            .find(|r| r.partition == partition && r.offset == offset)
            .unwrap();
        assert_eq!(number(&source), n);
    }
    consumer.close().await.unwrap();
    let info = admin.describe_group("ledger").await.unwrap();
    assert_eq!(info.lag, 0, "the group moved past the poison records");
    assert_eq!(info.dead_letters.len(), 1);
    assert_eq!(info.dead_letters[0].retry_set_size, 0);
    assert_eq!(info.dead_letters[0].dlq_depth, 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_retries_survive_a_broker_kill_without_loss_or_duplicate_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let addr = broker.addr;
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    // A long first backoff keeps the nacked records waiting in the retry set.
    create(&admin, "orders", 2, 3, 1500).await;
    produce(&config, "orders", 40).await;

    let poison = |n: u32| n == 5 || n == 25;
    let mut consumer = GroupConsumer::new(&config, group("shipping", "orders")).unwrap();
    run_until(
        &mut consumer,
        Duration::from_secs(30),
        |r| {
            if poison(number(r)) {
                Err("bad address".into())
            } else {
                Ok(())
            }
        },
        |d| d.len() == 40,
    )
    .await;
    // The group is past every record (the nacked ones included).
    consumer.commit().await.unwrap();
    let info = admin.describe_group("shipping").await.unwrap();
    assert_eq!(info.dead_letters[0].retry_set_size, 2);
    assert_eq!(info.lag, 0);

    let mut broker = broker;
    broker.kill();
    let _broker = Broker::start(
        &broker_binary(),
        dir.path(),
        &["--listen", &addr.to_string()],
    );
    let info = admin.describe_group("shipping").await.unwrap();
    assert_eq!(
        info.dead_letters[0].retry_set_size, 2,
        "the retry set survived SIGKILL"
    );

    // The same consumer rejoins after the restart and gets both again, twice,
    // then they are dead-lettered.
    let deliveries = run_until(
        &mut consumer,
        Duration::from_secs(60),
        |r| {
            if poison(number(r)) {
                Err("bad address".into())
            } else {
                Ok(())
            }
        },
        |d| d.iter().filter(|(n, a)| poison(*n) && *a == 3).count() == 2,
    )
    .await;
    let retried: Vec<(u32, u32)> = deliveries.into_iter().filter(|(n, _)| poison(*n)).collect();
    let mut retried_sorted = retried.clone();
    retried_sorted.sort();
    assert_eq!(retried_sorted, vec![(5, 2), (5, 3), (25, 2), (25, 3)]);
    let dlq = read_all(&config, "orders.shipping.dlq").await;
    let mut dead: Vec<u32> = dlq.iter().map(number).collect();
    dead.sort();
    assert_eq!(dead, vec![5, 25], "each once in the DLQ");
    consumer.close().await.unwrap();
    let info = admin.describe_group("shipping").await.unwrap();
    assert_eq!(info.dead_letters[0].retry_set_size, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redrive_goes_back_to_the_failing_group_only_and_is_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    create(&admin, "events", 2, 2, 30).await;
    produce(&config, "events", 100).await;

    // Group "etl" fails every 10th record until its handler is fixed.
    let broken = |n: u32| n % 10 == 3;
    let mut etl = GroupConsumer::new(&config, group("etl", "events")).unwrap();
    run_until(
        &mut etl,
        Duration::from_secs(30),
        |r| {
            if broken(number(r)) {
                Err("schema v2 unknown".into())
            } else {
                Ok(())
            }
        },
        |d| d.len() == 90 + 10 * 2,
    )
    .await;
    // Group "audit" reads the same topic and has no trouble.
    let mut audit = GroupConsumer::new(&config, group("audit", "events")).unwrap();
    run_until(
        &mut audit,
        Duration::from_secs(30),
        |_| Ok(()),
        |d| d.len() == 100,
    )
    .await;
    assert_eq!(read_all(&config, "events.etl.dlq").await.len(), 10);

    // A dry run lists them and changes nothing.
    let dry = admin
        .redrive(
            "events.etl.dlq",
            0,
            RedriveOptions {
                dry_run: true,
                ..RedriveOptions::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(dry.records.len(), 10);
    assert_eq!(
        admin.describe_group("etl").await.unwrap().dead_letters[0].retry_set_size,
        0
    );

    // Fixed; redrive everything back to "etl".
    let report = admin
        .redrive("events.etl.dlq", 0, RedriveOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (report.from_offset, report.to_offset, report.records.len()),
        (0, 10, 10)
    );
    let redelivered = run_until(
        &mut etl,
        Duration::from_secs(30),
        |r| {
            assert!(
                header(r, "sluice.dlq.redriven-from")
                    .is_some_and(|h| h.starts_with("events.etl.dlq/0/")),
                "a redriven record says where it came from"
            );
            Ok(())
        },
        |d| d.len() == 10,
    )
    .await;
    let numbers: BTreeSet<u32> = redelivered.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        numbers,
        (0..100).filter(|n| broken(*n)).collect::<BTreeSet<_>>()
    );
    // Processed once: nothing more comes.
    let more = tokio::time::timeout(Duration::from_millis(700), etl.next()).await;
    assert!(more.is_err(), "redriven records processed once: {more:?}");
    assert_eq!(
        admin.describe_group("etl").await.unwrap().dead_letters[0].retry_set_size,
        0
    );
    // The group that never failed sees nothing new.
    let more = tokio::time::timeout(Duration::from_millis(700), audit.next()).await;
    assert!(more.is_err(), "audit saw {more:?}");

    // The broker remembers the redrive: the default range is now empty, and
    // going back over it needs allow_repeat.
    let again = admin
        .redrive("events.etl.dlq", 0, RedriveOptions::default())
        .await
        .unwrap();
    assert!(again.records.is_empty());
    let refused = admin
        .redrive(
            "events.etl.dlq",
            0,
            RedriveOptions {
                from_offset: Some(0),
                ..RedriveOptions::default()
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, Error::Rejected(s) if s.code() == tonic::Code::FailedPrecondition),
        "{refused:?}"
    );
    etl.close().await.unwrap();
    audit.close().await.unwrap();
}

/// A gRPC proxy in front of the broker that forwards every call, except
/// that it answers Nacks itself with UNAVAILABLE while `failing_nacks` is
/// above 0 (counting it down): a Nack lost on the way.
struct NackFailingProxy {
    url: String,
    failing_nacks: std::sync::Arc<std::sync::atomic::AtomicU32>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

mod proxy {
    use std::convert::Infallible;
    use std::future::Future;
    use std::marker::PhantomData;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::task::{Context, Poll};

    use tonic::body::Body;
    use tonic::server::NamedService;
    use tonic::transport::Channel;

    pub trait Named: Send + Sync + 'static {
        const NAME: &'static str;
    }

    macro_rules! named {
        ($($ty:ident = $name:literal),*) => {$(
            pub struct $ty;
            impl Named for $ty {
                const NAME: &'static str = $name;
            }
        )*};
    }
    named!(
        Admin = "sluice.v1.AdminService",
        Produce = "sluice.v1.ProduceService",
        Consume = "sluice.v1.ConsumeService",
        Groups = "sluice.v1.GroupService",
        DeadLetters = "sluice.v1.DeadLetterService"
    );

    /// Forwards one service's calls to the broker.
    pub struct Forward<N> {
        pub channel: Channel,
        pub failing_nacks: Arc<AtomicU32>,
        pub failed: Arc<AtomicU32>,
        pub name: PhantomData<fn() -> N>,
    }

    impl<N> Clone for Forward<N> {
        fn clone(&self) -> Self {
            Forward {
                channel: self.channel.clone(),
                failing_nacks: Arc::clone(&self.failing_nacks),
                failed: Arc::clone(&self.failed),
                name: PhantomData,
            }
        }
    }

    impl<N: Named> NamedService for Forward<N> {
        const NAME: &'static str = N::NAME;
    }

    impl<N> tower::Service<http::Request<Body>> for Forward<N> {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            let lose = request.uri().path() == "/sluice.v1.DeadLetterService/Nack"
                && self
                    .failing_nacks
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if lose {
                self.failed.fetch_add(1, Ordering::SeqCst);
                return Box::pin(async {
                    Ok(tonic::Status::unavailable("injected: the nack was lost").into_http())
                });
            }
            let channel = self.channel.clone();
            Box::pin(async move {
                Ok(tower::ServiceExt::oneshot(channel, request)
                    .await
                    .unwrap_or_else(|e| tonic::Status::unavailable(e.to_string()).into_http()))
            })
        }
    }
}

impl NackFailingProxy {
    async fn start(broker_url: &str) -> NackFailingProxy {
        use std::marker::PhantomData;
        let channel = tonic::transport::Channel::from_shared(broker_url.to_owned())
            .unwrap()
            .connect_lazy();
        let failing_nacks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        macro_rules! forward {
            ($ty:ty) => {
                proxy::Forward::<$ty> {
                    channel: channel.clone(),
                    failing_nacks: std::sync::Arc::clone(&failing_nacks),
                    failed: std::sync::Arc::clone(&failed),
                    name: PhantomData,
                }
            };
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tonic::transport::Server::builder()
            .add_service(forward!(proxy::Admin))
            .add_service(forward!(proxy::Produce))
            .add_service(forward!(proxy::Consume))
            .add_service(forward!(proxy::Groups))
            .add_service(forward!(proxy::DeadLetters))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            server.await.unwrap();
        });
        NackFailingProxy {
            url,
            failing_nacks,
            failed,
            task,
        }
    }

    fn fail_nacks(&self, count: u32) {
        self.failing_nacks
            .store(count, std::sync::atomic::Ordering::SeqCst);
    }

    fn failed(&self) -> u32 {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for NackFailingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Issue 13, defect 9: `handle_next` must not lose a record whose nack
/// fails. A nack lost once is retried and goes through; one that keeps
/// failing returns the error, holds commits back before the record, and is
/// sent again once the broker answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_next_neither_loses_nor_commits_past_a_record_whose_nack_failed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let direct = ClientConfig::new(broker.url());
    let admin = Admin::new(&direct).unwrap();
    create(&admin, "jobs", 1, 3, 50).await;
    produce(&direct, "jobs", 5).await;
    let proxy = NackFailingProxy::start(&broker.url()).await;
    let mut consumer =
        GroupConsumer::new(&ClientConfig::new(&proxy.url), group("workers", "jobs")).unwrap();

    // Runs the handler once; (number, attempt, handle_next's result).
    async fn step(consumer: &mut GroupConsumer, failing: u32) -> (u32, u32, Result<(), Error>) {
        let mut seen = (0, 0);
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            consumer.handle_next(|r| {
                seen = (number(&r), r.attempt);
                let fail = number(&r) == failing && r.attempt == 1;
                async move {
                    if fail {
                        Err("cannot process".to_string())
                    } else {
                        Ok(())
                    }
                }
            }),
        )
        .await
        .expect("a record within 30 s: none was lost");
        (seen.0, seen.1, result)
    }

    // The nack of record 2 is lost once: retried, it goes through, and 2
    // comes back.
    proxy.fail_nacks(1);
    let mut handled = Vec::new();
    while !handled.contains(&(2, 2)) {
        let (n, attempt, result) = step(&mut consumer, 2).await;
        assert!(result.is_ok(), "record {n}: {result:?}");
        handled.push((n, attempt));
    }
    assert_eq!(proxy.failed(), 1);
    assert_eq!(
        handled,
        vec![(0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (2, 2)]
    );

    // Now every nack fails for a while: the nack of record 7 of the next
    // ten (offsets 5..14, so 7 is at offset 12) does not get through.
    produce(&direct, "jobs", 10).await;
    proxy.fail_nacks(u32::MAX);
    let mut failed_at = None;
    while failed_at.is_none() {
        let (n, _, result) = step(&mut consumer, 7).await;
        if result.is_err() {
            assert_eq!(n, 7);
            failed_at = Some(n);
        }
    }
    // Later records are processed, but commits stop before 7.
    let (n, _, result) = step(&mut consumer, 7).await;
    assert_eq!((n, result.is_ok()), (8, true));
    consumer.commit().await.unwrap();
    let committed = |info: sluice_client::GroupInfo| info.partitions[0].committed_offset;
    assert_eq!(
        committed(admin.describe_group("workers").await.unwrap()),
        Some(12),
        "not committed past the record whose nack failed"
    );
    // The broker answers again: the nack is sent again by `next`, and 7
    // comes back.
    proxy.fail_nacks(0);
    let mut handled = Vec::new();
    while !handled.contains(&(7, 2)) {
        let (n, attempt, result) = step(&mut consumer, 7).await;
        assert!(result.is_ok(), "record {n}: {result:?}");
        handled.push((n, attempt));
    }
    consumer.commit().await.unwrap();
    let after = committed(admin.describe_group("workers").await.unwrap()).unwrap();
    assert!(
        after > 13,
        "commits move on once the nack went through: {after}"
    );
    consumer.close().await.unwrap();
}
