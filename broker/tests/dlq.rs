//! Retry sets and dead letters: bounded deliveries with backoff, durable
//! across reopen, isolated per group, redrivable.

use std::collections::BTreeSet;
use std::time::Duration;

use sluice_broker::dlq::{
    FinishedDeadLetter, NackOutcome, RecordLocation, RetryKey, RetryPolicy, RetrySets,
    dead_letter_headers, dead_letter_source, dlq_topic_name, is_dead_letter_of,
};
use sluice_broker::storage::Header;

fn key(offset: u64) -> RetryKey {
    RetryKey {
        topic: "orders".into(),
        partition: 2,
        offset,
    }
}

fn at(offset: u64) -> RecordLocation {
    RecordLocation {
        topic: "orders".into(),
        partition: 2,
        offset,
    }
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_deliveries: 3,
        initial_backoff: Duration::from_millis(100),
        multiplier: 2.0,
        max_backoff: Duration::from_secs(10),
    }
}

fn owned() -> BTreeSet<(String, u32)> {
    [("orders".to_string(), 2u32)].into()
}

#[test]
fn a_record_is_retried_with_backoff_then_dead_lettered_once() {
    let dir = tempfile::tempdir().unwrap();
    let sets = RetrySets::open(dir.path()).unwrap();
    let t = 1_000_000;
    let first = sets
        .nack(
            "g",
            key(7),
            at(7),
            "bad schema",
            "SchemaError",
            &policy(),
            t,
        )
        .unwrap();
    assert_eq!(
        first,
        NackOutcome::Retry {
            deliveries: 1,
            next_delivery_ms: t + 100
        }
    );
    // Not due before its time, nor for a member that does not own the partition.
    assert!(sets.due("g", &owned(), t + 99, 10).is_empty());
    assert!(sets.due("g", &BTreeSet::new(), t + 100, 10).is_empty());
    let due = sets.due("g", &owned(), t + 100, 10);
    assert_eq!(due.len(), 1);
    sets.delivered("g", &key(7), t + 100, Duration::from_secs(30))
        .unwrap();
    assert!(
        sets.due("g", &owned(), t + 200, 10).is_empty(),
        "handed out: hidden until the timeout"
    );

    let second = sets
        .nack(
            "g",
            key(7),
            at(7),
            "still bad",
            "SchemaError",
            &policy(),
            t + 200,
        )
        .unwrap();
    assert_eq!(
        second,
        NackOutcome::Retry {
            deliveries: 2,
            next_delivery_ms: t + 400
        }
    );
    let NackOutcome::DeadLetter(dead) = sets
        .nack(
            "g",
            key(7),
            at(7),
            "gave up",
            "SchemaError",
            &policy(),
            t + 400,
        )
        .unwrap()
    else {
        panic!("the third failure dead-letters");
    };
    assert_eq!(dead.entry.deliveries, 3);
    assert_eq!(dead.entry.first_failure_ms, t);
    assert_eq!(dead.entry.last_reason, "gave up");
    assert!(
        sets.due("g", &owned(), i64::MAX, 10).is_empty(),
        "a pending dead letter is not redelivered"
    );
    // A nack racing the dead-lettering does not count a fourth delivery,
    // nor is it told to append the dead letter a second time.
    assert_eq!(
        sets.nack("g", key(7), at(7), "again", "X", &policy(), t + 500)
            .unwrap(),
        NackOutcome::DeadLetterInProgress {
            deliveries: 3,
            undeliverable: None
        }
    );

    let headers = dead_letter_headers("g", &dead.entry);
    let value = |name: &str| {
        headers
            .iter()
            .find(|h| h.key == name)
            .map(|h| String::from_utf8(h.value.to_vec()).unwrap())
    };
    assert_eq!(value("sluice.dlq.source-topic").as_deref(), Some("orders"));
    assert_eq!(value("sluice.dlq.source-offset").as_deref(), Some("7"));
    assert_eq!(value("sluice.dlq.attempts").as_deref(), Some("3"));
    assert_eq!(value("sluice.dlq.reason").as_deref(), Some("gave up"));
    assert_eq!(
        value("sluice.dlq.error-class").as_deref(),
        Some("SchemaError")
    );
    assert!(is_dead_letter_of(&headers, "g", &key(7)));
    assert!(!is_dead_letter_of(&headers, "other", &key(7)));
    assert!(!is_dead_letter_of(&headers, "g", &key(8)));
    assert_eq!(dead_letter_source(&headers), Some(key(7)));

    sets.dead_lettered("g", &key(7), "orders.g.dlq", 12)
        .unwrap();
    assert!(sets.is_empty("g"));
    // A late nack of it (a client retrying a timed-out Nack) is told where
    // it went, and starts nothing over.
    assert_eq!(
        sets.nack("g", key(7), at(7), "late", "X", &policy(), t + 600)
            .unwrap(),
        NackOutcome::AlreadyDeadLettered(FinishedDeadLetter {
            dlq_topic: "orders.g.dlq".into(),
            dlq_offset: 12,
            deliveries: 3
        })
    );
    assert!(sets.is_empty("g"));
    assert_eq!(dlq_topic_name("orders", "g"), "orders.g.dlq");
}

#[test]
fn the_retry_set_survives_a_reopen_without_loss_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sets = RetrySets::open(dir.path()).unwrap();
        for offset in 0..50 {
            sets.nack("g", key(offset), at(offset), "boom", "E", &policy(), 0)
                .unwrap();
        }
        // Offset 0 fails for good but the process dies before the DLQ append.
        sets.nack("g", key(0), at(0), "boom", "E", &policy(), 1)
            .unwrap();
        sets.nack("g", key(0), at(0), "boom", "E", &policy(), 2)
            .unwrap();
        // Offset 1 was processed on redelivery.
        assert!(sets.ack("g", &key(1)).unwrap());
        assert!(!sets.ack("g", &key(999)).unwrap());
        sets.nack("other", key(5), at(5), "x", "E", &policy(), 0)
            .unwrap();
    }
    let sets = RetrySets::open(dir.path()).unwrap();
    assert_eq!(sets.len("g"), 49);
    assert_eq!(sets.get("g", &key(10)).unwrap().deliveries, 1);
    assert_eq!(sets.get("g", &key(10)).unwrap().next_delivery_ms, 100);
    assert!(sets.get("g", &key(1)).is_none());
    let pending = sets.pending_dead_letters();
    assert_eq!(pending.len(), 1, "exactly one dead letter to finish");
    assert_eq!(
        (pending[0].group.as_str(), pending[0].entry.key.offset),
        ("g", 0)
    );
    // Groups are separate.
    assert_eq!(sets.len("other"), 1);
    assert!(sets.get("other", &key(10)).is_none());
}

#[test]
fn redrive_gives_a_fresh_count_reads_the_dlq_copy_and_remembers_progress() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sets = RetrySets::open(dir.path()).unwrap();
        let copy = RecordLocation {
            topic: "orders.g.dlq".into(),
            partition: 0,
            offset: 3,
        };
        sets.redrive("g", vec![(key(7), copy.clone())], 5_000)
            .unwrap();
        let due = sets.due("g", &owned(), 5_000, 10);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].deliveries, 0);
        assert_eq!(due[0].data, copy);
        sets.set_redrive_progress("orders.g.dlq", 0, 4).unwrap();
    }
    let sets = RetrySets::open(dir.path()).unwrap();
    assert_eq!(sets.redrive_progress("orders.g.dlq", 0), Some(4));
    assert_eq!(sets.redrive_progress("orders.g.dlq", 1), None);
    assert_eq!(sets.len("g"), 1);
}

#[test]
fn the_state_log_compacts_as_it_grows_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let long_reason = "r".repeat(30_000);
    {
        let sets = RetrySets::open(dir.path()).unwrap();
        for round in 0..3000u64 {
            let offset = round % 40;
            match sets
                .nack(
                    "g",
                    key(offset),
                    at(offset),
                    &long_reason,
                    "E",
                    &RetryPolicy {
                        max_deliveries: 1000,
                        ..policy()
                    },
                    round as i64,
                )
                .unwrap()
            {
                NackOutcome::Retry { .. } => {}
                other => panic!("limit is 1000: {other:?}"),
            }
        }
    }
    let files = std::fs::read_dir(dir.path().join("log")).unwrap().count();
    assert!(files <= 10, "{files} files");
    let sets = RetrySets::open(dir.path()).unwrap();
    assert_eq!(sets.len("g"), 40);
    assert_eq!(sets.get("g", &key(3)).unwrap().deliveries, 75);
    let headers: Vec<Header> = vec![];
    assert_eq!(dead_letter_source(&headers), None);
}

/// A dead letter whose DLQ append a crash interrupted is appended on the
/// next start, once, and leaves the retry set.
#[test]
fn startup_finishes_an_interrupted_dead_letter_exactly_once() {
    use bytes::Bytes;
    use sluice_broker::storage::{BatchBuilder, ProducerInfo, Record};
    use sluice_broker::topics::{TopicConfigPatch, TopicDefaults, TopicRegistry};

    let dir = tempfile::tempdir().unwrap();
    let topics = TopicRegistry::open(dir.path(), TopicDefaults::default()).unwrap();
    topics
        .create(
            "orders",
            &TopicConfigPatch {
                partitions: Some(3),
                ..TopicConfigPatch::default()
            },
        )
        .unwrap();
    let record = Record {
        key: Some(Bytes::from_static(b"customer-7")),
        value: Bytes::from_static(b"refund"),
        headers: vec![Header {
            key: "origin".into(),
            value: Bytes::from_static(b"web"),
        }],
        timestamp: 1_700_000_000_000,
    };
    let orders = topics.get("orders").unwrap();
    let partition = &orders.partitions()[2];
    for _ in 0..3 {
        let batch = BatchBuilder::encode(std::slice::from_ref(&record), ProducerInfo::NONE);
        partition.appender().append(&batch, 0).unwrap();
    }
    let retries = RetrySets::open(dir.path().join("internal/retries")).unwrap();
    let last_chance = RetryPolicy {
        max_deliveries: 1,
        ..policy()
    };
    // The final nack is recorded, then the "crash": no DLQ append.
    let outcome = retries
        .nack("billing", key(1), at(1), "bad", "schema", &last_chance, 5)
        .unwrap();
    assert!(matches!(outcome, NackOutcome::DeadLetter(_)));
    assert_eq!(retries.pending_dead_letters().len(), 1);

    let finished = sluice_broker::server::finish_pending_dead_letters(&topics, &retries);
    assert_eq!(finished, 1);
    assert!(retries.pending_dead_letters().is_empty());
    assert!(retries.is_empty("billing"));
    // And again (a second restart): nothing more.
    assert_eq!(
        sluice_broker::server::finish_pending_dead_letters(&topics, &retries),
        0
    );
    let dlq = topics.get("orders.billing.dlq").unwrap();
    let log = dlq.partitions()[0].log();
    let letters = log.read_records(0, 1 << 20).unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0].record;
    assert_eq!(letter.key, record.key);
    assert_eq!(letter.value, record.value);
    assert_eq!(letter.timestamp, record.timestamp);
    assert_eq!(letter.headers[0].key, "origin");
    assert!(is_dead_letter_of(&letter.headers, "billing", &key(1)));
    // The DLQ keeps records at least as long as its source.
    assert_eq!(
        dlq.config().retention_ms,
        topics.get("orders").unwrap().config().retention_ms
    );
}

/// Issue 13, items 3 and 10: a deleted topic's retries go with it, and
/// retries of an earlier topic of the same name are dropped before the new
/// one's are added or served, also when found only at startup.
#[test]
fn retries_are_bound_to_their_topics_incarnation() {
    use sluice_broker::topics::TopicId;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (TopicId(1), TopicId(2));
    {
        let sets = RetrySets::open(dir.path()).unwrap();
        sets.bind_topic("orders", old).unwrap();
        for offset in [1, 2] {
            sets.nack("g", key(offset), at(offset), "x", "E", &policy(), 0)
                .unwrap();
        }
        sets.nack("h", key(3), at(3), "x", "E", &policy(), 0)
            .unwrap();
        assert!(sets.is_bound("orders", old));
        // The topic is deleted: every group's entries go.
        sets.delete_topic("orders", old).unwrap();
        assert!(sets.is_empty("g") && sets.is_empty("h"));
        assert!(!sets.is_bound("orders", old));
        // A new topic of that name; a crash keeps the next delete from
        // removing its retries.
        sets.bind_topic("orders", new).unwrap();
        sets.nack("g", key(1), at(1), "x", "E", &policy(), 0)
            .unwrap();
        // A late delete of the old incarnation leaves the new one's alone.
        sets.delete_topic("orders", old).unwrap();
        assert_eq!(sets.len("g"), 1);
    }
    let sets = RetrySets::open(dir.path()).unwrap();
    assert!(sets.is_bound("orders", new), "the binding is durable");
    // Created once more: binding the newest drops the entries before they
    // can be served.
    sets.bind_topic("orders", TopicId(3)).unwrap();
    assert!(sets.is_empty("g"));
    assert!(sets.due("g", &owned(), i64::MAX, 10).is_empty());
    sets.nack("g", key(2), at(2), "x", "E", &policy(), 0)
        .unwrap();
    // At startup: a topic that no longer exists loses its entries.
    assert!(sets.reconcile(&|_| Some(TopicId(3))).unwrap().is_empty());
    assert_eq!(sets.len("g"), 1);
    assert_eq!(sets.reconcile(&|_| None).unwrap(), ["orders"]);
    assert!(sets.is_empty("g"));
}

/// Concurrent nacks of one record: every delivery counted once, and only
/// one of them is told to append the dead letter.
#[test]
fn concurrent_nacks_count_every_delivery_and_dead_letter_once() {
    let dir = tempfile::tempdir().unwrap();
    let sets = std::sync::Arc::new(RetrySets::open(dir.path()).unwrap());
    let many = RetryPolicy {
        max_deliveries: 1000,
        ..policy()
    };
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let sets = std::sync::Arc::clone(&sets);
            let many = many.clone();
            std::thread::spawn(move || {
                for _ in 0..25 {
                    sets.nack("g", key(1), at(1), "x", "E", &many, 0).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(sets.get("g", &key(1)).unwrap().deliveries, 100);

    let once = RetryPolicy {
        max_deliveries: 1,
        ..policy()
    };
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let sets = std::sync::Arc::clone(&sets);
            let once = once.clone();
            std::thread::spawn(move || {
                matches!(
                    sets.nack("g", key(2), at(2), "x", "E", &once, 0).unwrap(),
                    NackOutcome::DeadLetter(_)
                )
            })
        })
        .collect();
    let told: usize = threads
        .into_iter()
        .map(|t| usize::from(t.join().unwrap()))
        .sum();
    assert_eq!(told, 1, "exactly one nack appends the dead letter");
}

/// A handed-out retry that is neither acked nor nacked counts as a failed
/// delivery when its hold expires, and its last one is dead-lettered.
#[test]
fn a_timed_out_hand_out_counts_as_a_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let sets = RetrySets::open(dir.path()).unwrap();
    let p = policy(); // 3 deliveries
    let policy_for = |_: &str| Some(policy());
    sets.nack("g", key(4), at(4), "boom", "E", &p, 0).unwrap();
    sets.delivered("g", &key(4), 100, Duration::from_millis(500))
        .unwrap();
    assert!(
        sets.expire_handed_out("g", &owned(), 599, policy_for)
            .unwrap()
            .is_empty()
    );
    assert!(sets.due("g", &owned(), 599, 10).is_empty());
    // The hold expired: attempt 2 counts, due again at once.
    assert!(
        sets.expire_handed_out("g", &owned(), 600, policy_for)
            .unwrap()
            .is_empty()
    );
    let entry = sets.get("g", &key(4)).unwrap();
    assert_eq!(entry.deliveries, 2);
    assert_eq!(
        entry.error_class,
        sluice_broker::dlq::REDELIVERY_TIMEOUT_CLASS
    );
    assert_eq!(sets.due("g", &owned(), 600, 10).len(), 1);
    // Not for a member that does not read the partition.
    sets.delivered("g", &key(4), 600, Duration::from_millis(500))
        .unwrap();
    assert!(
        sets.expire_handed_out("g", &BTreeSet::new(), 5_000, policy_for)
            .unwrap()
            .is_empty()
    );
    assert_eq!(sets.get("g", &key(4)).unwrap().deliveries, 2);
    // Survives a reopen, handed out.
    drop(sets);
    let sets = RetrySets::open(dir.path()).unwrap();
    assert!(sets.get("g", &key(4)).unwrap().handed_out);
    let letters = sets
        .expire_handed_out("g", &owned(), 5_000, policy_for)
        .unwrap();
    assert_eq!(letters.len(), 1, "the third delivery was the last");
    assert_eq!(letters[0].entry.deliveries, 3);
    assert_eq!(sets.pending_dead_letters().len(), 1);
}

/// A dead letter that cannot be written is kept, undeliverable, with the
/// reason; finishing it later works; the memory of it survives a reopen.
#[test]
fn an_undeliverable_dead_letter_is_kept_with_its_reason_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let sets = RetrySets::open(dir.path()).unwrap();
        let once = RetryPolicy {
            max_deliveries: 1,
            ..policy()
        };
        sets.nack("g", key(9), at(9), "bad", "E", &once, 0).unwrap();
        assert!(
            sets.mark_undeliverable("g", &key(9), "name too long")
                .unwrap()
        );
        assert!(
            !sets
                .mark_undeliverable("g", &key(9), "name too long")
                .unwrap()
        );
        sets.nack("g", key(3), at(3), "bad", "E", &once, 0).unwrap();
        sets.dead_lettered("g", &key(3), "orders.g.dlq", 0).unwrap();
    }
    let sets = RetrySets::open(dir.path()).unwrap();
    assert!(sets.pending_dead_letters().is_empty());
    assert_eq!(sets.undeliverable_dead_letters().len(), 1);
    assert_eq!(
        sets.undeliverable_for_topic("g", "orders"),
        (1, Some("name too long".to_string()))
    );
    assert!(sets.due("g", &owned(), i64::MAX, 10).is_empty());
    assert!(matches!(
        sets.nack("g", key(9), at(9), "again", "E", &policy(), 1)
            .unwrap(),
        NackOutcome::DeadLetterInProgress {
            undeliverable: Some(_),
            ..
        }
    ));
    assert!(matches!(
        sets.nack("g", key(3), at(3), "again", "E", &policy(), 1)
            .unwrap(),
        NackOutcome::AlreadyDeadLettered(_)
    ));
}
