//! Consumer groups end to end: `GroupConsumer`s against the real broker.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_client::{
    Admin, ClientConfig, CommitMode, GroupConfig, GroupConsumer, GroupEvent, Producer,
    ProducerConfig, Record,
};
use sluice_testkit::{Broker, broker_binary};
use tokio::sync::watch;

/// What one consumer processed, in order, and the events it saw.
#[derive(Default)]
struct Processed {
    records: Vec<(u32, u64)>,
    events: Vec<(Instant, GroupEvent)>,
}

/// Runs `consumer` in a task that records every record it is handed (its
/// "processing") and every event, until `stop` fires (then hands the
/// consumer back) or the task is aborted (a crash).
fn run(
    mut consumer: GroupConsumer,
    log: Arc<Mutex<Processed>>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<GroupConsumer> {
    let mut events = consumer.events();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                record = consumer.next() => {
                    let record = record.expect("records, not errors");
                    log.lock().unwrap().records.push((record.partition, record.offset));
                }
                Some(event) = events.recv() => {
                    log.lock().unwrap().events.push((Instant::now(), event));
                }
                _ = stop.changed() => return consumer,
            }
        }
    })
}

fn group_config(group: &str, topic: &str) -> GroupConfig {
    let mut config = GroupConfig::new(group, [topic]);
    config.session_timeout = Duration::from_secs(2);
    config.commit = CommitMode::Auto(Duration::from_millis(100));
    config
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn produce(config: &ClientConfig, topic: &str, range: std::ops::Range<u32>) {
    let producer = Producer::new(config, ProducerConfig::default()).unwrap();
    let mut deliveries = Vec::new();
    for i in range {
        let record = Record::new(format!("value-{i}")).with_key(format!("key-{}", i % 600));
        deliveries.push(producer.enqueue(topic, record).await.unwrap());
    }
    for d in deliveries {
        d.await.unwrap();
    }
    producer.close().await.unwrap();
}

/// Offsets each consumer saw per partition never jump forward: a consumer
/// reads a partition in order from where it starts, and starts again only
/// at or before where it (or the previous owner) stopped.
fn assert_no_forward_gaps(name: &str, records: &[(u32, u64)]) {
    let mut last: HashMap<u32, u64> = HashMap::new();
    for &(partition, offset) in records {
        if let Some(&prev) = last.get(&partition) {
            assert!(
                offset <= prev + 1,
                "{name} skipped from {prev} to {offset} in partition {partition}"
            );
        }
        last.insert(partition, offset);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_share_six_partitions_and_survivors_take_over_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("events", 6).await.unwrap();

    let logs: Vec<Arc<Mutex<Processed>>> = (0..3).map(|_| Arc::default()).collect();
    let (stop, stopping) = watch::channel(false);
    let mut tasks = Vec::new();
    for log in &logs {
        let consumer = GroupConsumer::new(&config, group_config("workers", "events")).unwrap();
        tasks.push(run(consumer, Arc::clone(log), stopping.clone()));
    }
    wait_for(
        "3 members with 2 partitions each",
        Duration::from_secs(20),
        || async {
            let info = admin.describe_group("workers").await;
            info.is_ok_and(|info| {
                info.members.len() == 3 && info.members.iter().all(|m| m.assigned.len() == 2)
            })
        },
    )
    .await;

    const TOTAL: u32 = 30_000;
    let producing = {
        let config = config.clone();
        tokio::spawn(async move {
            for chunk in 0..10 {
                produce(&config, "events", chunk * 3000..(chunk + 1) * 3000).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    // Mid-stream, the third member dies: dropped without leaving, as a
    // crashed process would.
    wait_for(
        "the third member to process records",
        Duration::from_secs(30),
        || async { logs[2].lock().unwrap().records.len() >= 1500 },
    )
    .await;
    let victim = tasks.pop().unwrap();
    victim.abort();
    let died = Instant::now();
    let victim_partitions: BTreeSet<u32> = logs[2]
        .lock()
        .unwrap()
        .records
        .iter()
        .map(|r| r.0)
        .collect();
    producing.await.unwrap();

    // Every record is processed by someone, none skipped.
    wait_for(
        "every record processed",
        Duration::from_secs(60),
        || async {
            let seen: BTreeSet<(u32, u64)> = logs
                .iter()
                .flat_map(|l| l.lock().unwrap().records.clone())
                .collect();
            seen.len() == TOTAL as usize
        },
    )
    .await;
    let ends: BTreeMap<u32, u64> = admin
        .offsets("events", &[], sluice_client::StartFrom::Latest)
        .await
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(ends.values().sum::<u64>(), u64::from(TOTAL));
    let mut counts: BTreeMap<(u32, u64), usize> = BTreeMap::new();
    for (i, log) in logs.iter().enumerate() {
        let log = log.lock().unwrap();
        assert_no_forward_gaps(&format!("consumer {i}"), &log.records);
        for r in &log.records {
            *counts.entry(*r).or_default() += 1;
        }
    }
    for (&partition, &end) in &ends {
        for offset in 0..end {
            assert!(
                counts.contains_key(&(partition, offset)),
                "{partition}/{offset} never processed"
            );
        }
    }
    // Only the dead member's partitions may be processed twice (what it
    // handled after its last commit); orderly handovers repeat nothing.
    let repeated: BTreeSet<u32> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|((p, _), _)| *p)
        .collect();
    assert!(
        repeated.is_subset(&victim_partitions),
        "records of {repeated:?} processed twice; only {victim_partitions:?} changed hands by a death"
    );

    // The survivors got the dead member's partitions, after its session
    // timed out (2 s), not before.
    let mut taken_over = BTreeSet::new();
    for log in &logs[..2] {
        for (at, event) in &log.lock().unwrap().events {
            if let GroupEvent::Assigned(partitions) = event {
                if *at > died {
                    assert!(
                        at.duration_since(died) >= Duration::from_millis(1500),
                        "partitions moved {:?} after the death, before the session timeout",
                        at.duration_since(died)
                    );
                    taken_over.extend(partitions.iter().map(|(_, p)| *p));
                }
            }
        }
    }
    assert_eq!(taken_over, victim_partitions);

    // Closing commits what was processed: nothing left to consume.
    stop.send(true).unwrap();
    for task in tasks {
        task.await.unwrap().close().await.unwrap();
    }
    let info = admin.describe_group("workers").await.unwrap();
    assert!(info.members.is_empty());
    assert_eq!(info.lag, 0, "{:?}", info.partitions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_commits_and_a_new_member_resumes_where_the_group_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("orders", 3).await.unwrap();
    produce(&config, "orders", 0..900).await;

    let mut first = GroupConsumer::new(&config, group_config("billing", "orders")).unwrap();
    let mut seen = Vec::new();
    for _ in 0..400 {
        let r = first.next().await.unwrap();
        seen.push((r.partition, r.offset));
    }
    first.close().await.unwrap();
    // The group has no members and its offsets cover exactly what was
    // handed over.
    let info = admin.describe_group("billing").await.unwrap();
    assert!(info.members.is_empty());
    let committed: u64 = info
        .partitions
        .iter()
        .map(|p| p.committed_offset.unwrap_or(0))
        .sum();
    assert_eq!(committed, 400);
    assert_eq!(info.lag, 500);

    let mut second = GroupConsumer::new(&config, group_config("billing", "orders")).unwrap();
    for _ in 0..500 {
        let r = second.next().await.unwrap();
        seen.push((r.partition, r.offset));
    }
    let unique: BTreeSet<_> = seen.iter().copied().collect();
    assert_eq!(unique.len(), 900, "each record once across the two members");
    second.close().await.unwrap();
    assert_eq!(admin.describe_group("billing").await.unwrap().lag, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_resumes_from_committed_offsets_after_the_broker_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let addr = broker.addr;
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("ledger", 3).await.unwrap();
    produce(&config, "ledger", 0..3000).await;

    let mut settings = group_config("auditors", "ledger");
    settings.commit = CommitMode::Manual;
    let mut consumer = GroupConsumer::new(&config, settings).unwrap();
    let mut events = consumer.events();
    let mut processed = Vec::new();
    for _ in 0..1500 {
        let r = consumer.next().await.unwrap();
        processed.push((r.partition, r.offset));
    }
    consumer.commit().await.unwrap();
    let before: BTreeMap<(String, u32), Option<u64>> = admin
        .describe_group("auditors")
        .await
        .unwrap()
        .partitions
        .into_iter()
        .map(|p| ((p.topic, p.partition), p.committed_offset))
        .collect();
    assert_eq!(before.values().map(|o| o.unwrap()).sum::<u64>(), 1500);

    let mut broker = broker;
    broker.kill();
    let _broker = Broker::start(
        &broker_binary(),
        dir.path(),
        &["--listen", &addr.to_string()],
    );
    let after: BTreeMap<(String, u32), Option<u64>> = admin
        .describe_group("auditors")
        .await
        .unwrap()
        .partitions
        .into_iter()
        .map(|p| ((p.topic, p.partition), p.committed_offset))
        .collect();
    assert_eq!(after, before, "committed offsets survive SIGKILL");

    // The same consumer carries on. Its readers reconnect at once; its
    // next heartbeat learns the restarted broker forgot the member, so it
    // drops its partitions uncommitted (Lost), joins again and reads from
    // the committed offsets: exactly the 1500 records after them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut lost = false;
    let mut after_rejoin = 0;
    while after_rejoin < 1500 {
        assert!(
            Instant::now() < deadline,
            "the group did not finish: lost={lost} after_rejoin={after_rejoin} unique={} assignment={:?}",
            processed.iter().collect::<BTreeSet<_>>().len(),
            consumer.assignment()
        );
        let next = tokio::time::timeout(Duration::from_millis(300), consumer.next()).await;
        // Events of this call came before its record.
        while let Ok(event) = events.try_recv() {
            lost |= matches!(event, GroupEvent::Lost(_));
        }
        if let Ok(r) = next {
            let r = r.unwrap();
            processed.push((r.partition, r.offset));
            consumer.mark_processed(&r);
            if lost {
                after_rejoin += 1;
            }
        }
    }
    assert_no_forward_gaps("the consumer", &processed);
    assert_eq!(processed.iter().collect::<BTreeSet<_>>().len(), 3000);
    consumer.commit().await.unwrap();
    consumer.close().await.unwrap();
    assert_eq!(admin.describe_group("auditors").await.unwrap().lag, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_static_member_that_restarts_gets_its_partitions_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::start(&broker_binary(), dir.path(), &[]);
    let config = ClientConfig::new(broker.url());
    let admin = Admin::new(&config).unwrap();
    admin.create_topic("jobs", 4).await.unwrap();

    let static_config = |instance: &str| {
        let mut c = group_config("crew", "jobs");
        c.instance_id = Some(instance.to_owned());
        // Long enough that only static membership explains a quick return.
        c.session_timeout = Duration::from_secs(30);
        c
    };
    let mut a = GroupConsumer::new(&config, static_config("a")).unwrap();
    let mut b = GroupConsumer::new(&config, static_config("b")).unwrap();
    let mut b_events = b.events();
    let b_task = tokio::spawn(async move {
        loop {
            let _ = b.next().await;
        }
    });
    // Drive `a` until the group is balanced, 2 and 2.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "never balanced");
        let _ = tokio::time::timeout(Duration::from_millis(100), a.next()).await;
        let info = admin.describe_group("crew").await.unwrap();
        if a.assignment().len() == 2 && info.members.iter().all(|m| m.assigned.len() == 2) {
            break;
        }
    }
    let a_partitions = a.assignment();
    while b_events.try_recv().is_ok() {}

    // `a` crashes and comes back under the same instance id.
    drop(a);
    let restarted_at = Instant::now();
    let mut a = GroupConsumer::new(&config, static_config("a")).unwrap();
    let mut a_events = a.events();
    let a_task = tokio::spawn(async move {
        loop {
            let _ = a.next().await;
        }
    });
    let got = tokio::time::timeout(Duration::from_secs(10), a_events.recv())
        .await
        .expect("assigned well before the 30 s session timeout")
        .unwrap();
    assert!(restarted_at.elapsed() < Duration::from_secs(10));
    assert_eq!(got, GroupEvent::Assigned(a_partitions));
    // `b` gave nothing up and got nothing new.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b_events.try_recv().is_err(), "b's assignment changed");
    a_task.abort();
    b_task.abort();
}
