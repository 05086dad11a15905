//! The group coordinator and the offset store, driven with explicit time.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use sluice_broker::groups::{
    GroupCoordinator, GroupError, GroupSettings, OffsetStore, TopicCatalog, TopicPartition,
};
use sluice_broker::topics::TopicId;

struct Catalog(BTreeMap<String, u32>);

impl TopicCatalog for Catalog {
    fn partition_count(&self, topic: &str) -> Option<u32> {
        self.0.get(topic).copied()
    }

    fn topic_id(&self, topic: &str) -> Option<TopicId> {
        self.0.contains_key(topic).then_some(TopicId(7))
    }
}

const SESSION: Duration = Duration::from_secs(10);

fn coordinator(dir: &std::path::Path) -> GroupCoordinator {
    GroupCoordinator::new(
        OffsetStore::open(dir).unwrap(),
        Box::new(Catalog([("orders".to_string(), 6u32)].into())),
        GroupSettings::default(),
    )
}

fn orders() -> BTreeSet<String> {
    ["orders".to_string()].into()
}

/// Members, each with what it holds; heartbeats them in rounds, each member
/// taking exactly what it is assigned, and checks after every heartbeat that
/// no partition is held by two members.
struct Simulation<'a> {
    coordinator: &'a GroupCoordinator,
    members: BTreeMap<String, BTreeSet<TopicPartition>>,
}

impl Simulation<'_> {
    fn heartbeat_all(&mut self, now: Instant) {
        let ids: Vec<String> = self.members.keys().cloned().collect();
        for id in ids {
            let owned = self.members[&id].clone();
            let assignment = self.coordinator.heartbeat("g", &id, owned, now).unwrap();
            self.members.insert(id, assignment.partitions);
            let mut seen = BTreeSet::new();
            for tp in self.members.values().flatten() {
                assert!(seen.insert(tp.clone()), "{tp} held by two members");
            }
        }
    }

    fn sizes(&self) -> Vec<usize> {
        self.members.values().map(|p| p.len()).collect()
    }
}

#[test]
fn partitions_spread_move_on_eviction_and_are_never_held_twice() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path());
    let t0 = Instant::now();
    let mut sim = Simulation {
        coordinator: &c,
        members: BTreeMap::new(),
    };
    for _ in 0..3 {
        let joined = c.join("g", None, orders(), SESSION, t0).unwrap();
        sim.members.insert(joined.member_id, BTreeSet::new());
    }
    for _ in 0..3 {
        sim.heartbeat_all(t0);
    }
    assert_eq!(sim.sizes(), vec![2, 2, 2]);

    // One member stops heartbeating; after its session timeout the others
    // take its partitions.
    let dead = sim.members.keys().next().unwrap().clone();
    let dead_partitions = sim.members.remove(&dead).unwrap();
    sim.heartbeat_all(t0 + SESSION / 2);
    let later = t0 + SESSION + Duration::from_secs(1);
    for _ in 0..3 {
        sim.heartbeat_all(later);
    }
    assert_eq!(sim.sizes(), vec![3, 3]);
    let held: BTreeSet<_> = sim.members.values().flatten().cloned().collect();
    assert!(dead_partitions.is_subset(&held));
    // The evicted member is told so, and its commits are refused.
    let err = c
        .heartbeat("g", &dead, dead_partitions.clone(), later)
        .unwrap_err();
    assert!(matches!(err, GroupError::UnknownMember { .. }), "{err}");
    let tp = dead_partitions.iter().next().unwrap().clone();
    let err = c
        .commit(
            "g",
            Some((&dead, 1)),
            vec![(tp, 10, String::new())],
            later,
            0,
        )
        .unwrap_err();
    assert!(matches!(err, GroupError::UnknownMember { .. }), "{err}");
    assert!(c.offsets().fetch("g").is_empty());
}

#[test]
fn a_partition_moves_only_after_its_owner_releases_it() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path());
    let now = Instant::now();
    let a = c.join("g", None, orders(), SESSION, now).unwrap().member_id;
    let all = c
        .heartbeat("g", &a, BTreeSet::new(), now)
        .unwrap()
        .partitions;
    assert_eq!(all.len(), 6);
    // A holds everything. B joins: its target is half, but it gets nothing
    // while A still reports holding them.
    let b = c.join("g", None, orders(), SESSION, now).unwrap().member_id;
    assert!(
        c.heartbeat("g", &b, BTreeSet::new(), now)
            .unwrap()
            .partitions
            .is_empty()
    );
    // A learns it must give three up; it commits, then releases them.
    let kept = c.heartbeat("g", &a, all.clone(), now).unwrap();
    assert_eq!(kept.partitions.len(), 3);
    let revoked: Vec<TopicPartition> = all.difference(&kept.partitions).cloned().collect();
    // Committing a partition it still holds but is giving up is allowed.
    c.commit(
        "g",
        Some((&a, kept.member_epoch)),
        vec![(revoked[0].clone(), 42, "done".into())],
        now,
        1,
    )
    .unwrap();
    assert!(
        c.heartbeat("g", &b, BTreeSet::new(), now)
            .unwrap()
            .partitions
            .is_empty(),
        "A has not released yet"
    );
    c.heartbeat("g", &a, kept.partitions.clone(), now).unwrap();
    let got = c.heartbeat("g", &b, BTreeSet::new(), now).unwrap();
    assert_eq!(got.partitions.iter().cloned().collect::<Vec<_>>(), revoked);
    // Now A may no longer commit what it gave away.
    let err = c
        .commit(
            "g",
            Some((&a, kept.member_epoch)),
            vec![(revoked[0].clone(), 50, String::new())],
            now,
            2,
        )
        .unwrap_err();
    assert!(matches!(err, GroupError::NotOwner { .. }), "{err}");
    assert_eq!(c.offsets().fetch("g")[&revoked[0]].offset, 42);
}

#[test]
fn a_static_member_that_restarts_keeps_its_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path());
    let now = Instant::now();
    let a = c
        .join("g", Some("worker-a"), orders(), SESSION, now)
        .unwrap()
        .member_id;
    let b = c
        .join("g", Some("worker-b"), orders(), SESSION, now)
        .unwrap()
        .member_id;
    let a_parts = c
        .heartbeat("g", &a, BTreeSet::new(), now)
        .unwrap()
        .partitions;
    let b_parts = c
        .heartbeat("g", &b, BTreeSet::new(), now)
        .unwrap()
        .partitions;
    c.heartbeat("g", &a, a_parts.clone(), now).unwrap();
    let epoch = c.describe("g", now).unwrap().group_epoch;
    // worker-a crashes and comes back before its session times out.
    let a2 = c
        .join(
            "g",
            Some("worker-a"),
            orders(),
            SESSION,
            now + Duration::from_secs(2),
        )
        .unwrap()
        .member_id;
    assert_ne!(a, a2);
    let again = c
        .heartbeat("g", &a2, BTreeSet::new(), now + Duration::from_secs(2))
        .unwrap();
    assert_eq!(again.partitions, a_parts);
    assert_eq!(
        c.heartbeat("g", &b, b_parts.clone(), now)
            .unwrap()
            .partitions,
        b_parts
    );
    assert_eq!(
        c.describe("g", now).unwrap().group_epoch,
        epoch,
        "no rebalance"
    );
    // The old incarnation is fenced.
    assert!(matches!(
        c.heartbeat("g", &a, a_parts, now),
        Err(GroupError::UnknownMember { .. })
    ));
}

#[test]
fn offsets_survive_a_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let tp = |p| TopicPartition::new("orders", p);
    {
        let store = OffsetStore::open(dir.path()).unwrap();
        // Enough commits to roll and compact the commit log several times.
        let metadata = "m".repeat(20_000);
        for i in 0..4_000u64 {
            store
                .commit(
                    &format!("g{}", i % 3),
                    &[(
                        tp((i % 6) as u32),
                        sluice_broker::groups::CommittedOffset {
                            offset: i,
                            metadata: metadata.clone(),
                            commit_time_ms: i as i64,
                        },
                    )],
                    &|_| Some(TopicId(7)),
                )
                .unwrap();
        }
        store.delete_group("g2", 0).unwrap();
    }
    let log_files = std::fs::read_dir(dir.path().join("log")).unwrap().count();
    assert!(
        log_files <= 10,
        "compaction keeps the commit log small ({log_files} files)"
    );
    let store = OffsetStore::open(dir.path()).unwrap();
    assert_eq!(store.groups(), vec!["g0".to_string(), "g1".to_string()]);
    let g0 = store.fetch("g0");
    // The last commit for each partition wins.
    let expected_last = |group: u64, partition: u64| {
        (0..4_000u64)
            .filter(|i| i % 3 == group && i % 6 == partition)
            .max()
            .unwrap()
    };
    assert_eq!(g0[&tp(0)].offset, expected_last(0, 0));
    assert_eq!(g0[&tp(3)].offset, expected_last(0, 3));
    assert_eq!(store.fetch("g1")[&tp(1)].offset, expected_last(1, 1));
    assert!(store.fetch("g2").is_empty());
}

#[test]
fn reset_needs_an_empty_group_and_a_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path());
    let now = Instant::now();
    let tp = TopicPartition::new("orders", 0);
    c.commit("g", None, vec![(tp.clone(), 5, String::new())], now, 0)
        .unwrap();
    let m = c.join("g", None, orders(), SESSION, now).unwrap().member_id;
    let err = c
        .reset_offsets("g", vec![(tp.clone(), 0)], false, now, 0)
        .unwrap_err();
    assert!(
        matches!(err, GroupError::GroupNotEmpty { members: 1, .. }),
        "{err}"
    );
    let err = c
        .commit("g", None, vec![(tp.clone(), 9, String::new())], now, 0)
        .unwrap_err();
    assert!(matches!(err, GroupError::GroupNotEmpty { .. }), "{err}");
    c.leave("g", &m, now).unwrap();
    let plan = c
        .reset_offsets("g", vec![(tp.clone(), 1)], true, now, 0)
        .unwrap();
    assert_eq!((plan[0].previous, plan[0].offset), (Some(5), 1));
    assert_eq!(c.offsets().fetch("g")[&tp].offset, 5, "dry run");
    c.reset_offsets("g", vec![(tp.clone(), 1)], false, now, 0)
        .unwrap();
    assert_eq!(c.offsets().fetch("g")[&tp].offset, 1);
}

#[test]
fn empty_groups_offsets_expire_but_never_while_members_live() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path());
    let now = Instant::now();
    let tp = TopicPartition::new("orders", 0);
    c.commit(
        "idle",
        None,
        vec![(tp.clone(), 5, String::new())],
        now,
        1_000,
    )
    .unwrap();
    c.commit(
        "busy",
        None,
        vec![(tp.clone(), 5, String::new())],
        now,
        1_000,
    )
    .unwrap();
    let session = Duration::from_secs(300);
    let m = c
        .join("busy", None, orders(), session, now)
        .unwrap()
        .member_id;
    let week = Duration::from_secs(7 * 24 * 3600);
    let later_ms = 1_000 + week.as_millis() as i64;
    // "idle" has been empty since the coordinator started: a week after
    // that, "busy" still alive.
    let later = now + week;
    keep_alive(&c, "busy", &m, now, later, session);
    assert!(
        c.expire_offsets(later, later_ms - 1, week)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        c.expire_offsets(later, later_ms, week).unwrap(),
        vec!["idle".to_string()]
    );
    assert!(c.offsets().fetch("idle").is_empty());
    assert!(!c.offsets().fetch("busy").is_empty());
}

/// Heartbeats `member` from `from` to `to` often enough for `session`.
fn keep_alive(
    c: &GroupCoordinator,
    group: &str,
    member: &str,
    from: Instant,
    to: Instant,
    session: Duration,
) {
    let mut at = from;
    while at < to {
        at = (at + session / 2).min(to);
        c.heartbeat(group, member, BTreeSet::new(), at).unwrap();
    }
}

/// KIP-211: an empty group's offsets are kept for the retention counted
/// from when it became empty, however old its last commit.
#[test]
fn the_retention_clock_starts_when_the_group_becomes_empty() {
    let dir = tempfile::tempdir().unwrap();
    let c = coordinator(dir.path());
    let start = Instant::now();
    let retention = Duration::from_secs(60);
    let m = c
        .join("g", None, orders(), SESSION, start)
        .unwrap()
        .member_id;
    let epoch = c
        .heartbeat("g", &m, BTreeSet::new(), start)
        .unwrap()
        .member_epoch;
    let tp = TopicPartition::new("orders", 0);
    c.commit(
        "g",
        Some((&m, epoch)),
        vec![(tp, 4, String::new())],
        start,
        0,
    )
    .unwrap();
    // Alive, committing nothing, for ten retentions; then it leaves.
    let left = start + retention * 10;
    keep_alive(&c, "g", &m, start, left, SESSION);
    c.leave("g", &m, left).unwrap();
    let ms = |at: Instant| at.duration_since(start).as_millis() as i64;
    let soon = left + retention / 2;
    assert!(
        c.expire_offsets(soon, ms(soon), retention)
            .unwrap()
            .is_empty()
    );
    assert!(!c.fetch_offsets("g").is_empty());
    let later = left + retention;
    assert_eq!(
        c.expire_offsets(later, ms(later), retention).unwrap(),
        ["g"]
    );
    assert!(c.fetch_offsets("g").is_empty());
}
