//! The group coordinator: membership, assignment, handover, offsets.
//!
//! In the style of Kafka's KIP-848 the broker computes the assignment;
//! members only join, heartbeat (reporting what they hold) and leave.
//!
//! - Each member has a *target* (from the assignor) and an *assignment*:
//!   the target minus partitions another member was given or still reports
//!   holding. So a moved partition reaches its new owner only after the old
//!   owner was told to let it go and then released it (dropped it from its
//!   heartbeat), or was removed: two members never hold one partition at
//!   once.
//! - A member that misses its session timeout is removed; its partitions go
//!   to the others. A member joining with an instance id that is already in
//!   the group takes over that member's place and partitions (static
//!   membership), so a quick restart moves nothing.
//! - A commit is accepted from a current member for partitions it is
//!   assigned or still holds; from outside the group (no member id) only
//!   while the group has no members. An evicted member's commit is refused.
//!
//! A group name speaks one protocol at a time: Sluice's, above, or Kafka's
//! classic one ([`ClassicGroups`], which the coordinator owns). A join of
//! either is refused while the group has live members of the other; both
//! checks run under the coordinator's lock, which is always taken before the
//! classic groups' lock, so two racing joins cannot both get in. Committed
//! offsets are shared: a classic member commits to the same [`OffsetStore`],
//! and a group with live members of either protocol has its offsets neither
//! reset nor expired.
//!
//! Membership lives in memory: after a broker restart members get "unknown
//! member" on their next heartbeat and join again. Offsets are durable
//! ([`OffsetStore`]), bound to the incarnation of their topic: offsets of a
//! deleted topic, or of an earlier topic of the same name, are never
//! answered.
//!
//! Offset expiry follows Kafka's KIP-211: the offsets of a group expire once
//! it has been empty (no live member) for the retention and its newest
//! commit is as old. When it became empty is known in memory only: after a
//! restart, a group without members counts as empty since the start, so no
//! offsets expire within one retention of a restart.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::assignor::{MemberSubscription, TopicPartition, assign};
use super::classic::{ClassicError, ClassicGroups, JoinOutcome, JoinRequest, Pending};
use super::offsets::{CommittedOffset, OffsetStore};
use crate::storage::StorageError;
use crate::topics::TopicId;

/// Where the coordinator learns how many partitions a topic has, and which
/// incarnation of it is live.
pub trait TopicCatalog: Send + Sync {
    /// `None` when the topic does not exist.
    fn partition_count(&self, topic: &str) -> Option<u32>;
    /// The live incarnation of `topic`; `None` when it does not exist.
    fn topic_id(&self, topic: &str) -> Option<TopicId>;
}

impl<T: TopicCatalog + ?Sized> TopicCatalog for std::sync::Arc<T> {
    fn partition_count(&self, topic: &str) -> Option<u32> {
        (**self).partition_count(topic)
    }

    fn topic_id(&self, topic: &str) -> Option<TopicId> {
        (**self).topic_id(topic)
    }
}

/// Limits on what members may ask for.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub min_session_timeout: Duration,
    pub max_session_timeout: Duration,
    /// How often members are told to heartbeat, at most a third of their
    /// session timeout.
    pub heartbeat_interval: Duration,
    /// How long a classic (Kafka) group's first rebalance out of `Empty`
    /// waits for more members before it completes, as Kafka's
    /// `group.initial.rebalance.delay.ms`.
    pub initial_rebalance_delay: Duration,
}

impl Default for GroupSettings {
    fn default() -> Self {
        GroupSettings {
            min_session_timeout: Duration::from_millis(500),
            max_session_timeout: Duration::from_secs(300),
            heartbeat_interval: Duration::from_secs(3),
            initial_rebalance_delay: Duration::ZERO,
        }
    }
}

/// The membership protocol a group's members speak; one at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupProtocol {
    /// Sluice's own: the broker assigns ([`GroupCoordinator::join`]).
    Sluice,
    /// Kafka's classic one: the group leader assigns ([`ClassicGroups`]).
    KafkaClassic,
}

fn not_empty_message(group: &str, members: usize, protocol: GroupProtocol) -> String {
    match protocol {
        GroupProtocol::Sluice => format!(
            "group {group:?} has {members} live member(s); stop them (or wait for their \
             session timeout) first"
        ),
        GroupProtocol::KafkaClassic => format!(
            "group {group:?} is in use by {members} live Kafka consumer(s) (the classic \
             group protocol), and a group speaks one protocol at a time; stop them (or \
             wait for their session timeout) first, or use another group id"
        ),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    #[error("group {0:?} does not exist")]
    UnknownGroup(String),
    #[error(
        "member {member:?} is not in group {group:?}: it left or missed its session \
         timeout; join the group again"
    )]
    UnknownMember { group: String, member: String },
    #[error("member {member:?} of group {group:?} sent epoch {got}, ahead of its epoch {current}")]
    InvalidMemberEpoch {
        group: String,
        member: String,
        got: u64,
        current: u64,
    },
    #[error(
        "member {member:?} of group {group:?} does not own {partition} and may not \
         commit its offset"
    )]
    NotOwner {
        group: String,
        member: String,
        partition: TopicPartition,
    },
    /// The group has live members, of `protocol`: an offset reset or a
    /// commit from outside the group is refused, and so is a Sluice join
    /// while they speak Kafka's classic protocol.
    #[error("{}", not_empty_message(.group, *.members, *.protocol))]
    GroupNotEmpty {
        group: String,
        members: usize,
        protocol: GroupProtocol,
    },
    #[error("session timeout {got:?} is outside {min:?}..={max:?}")]
    InvalidSessionTimeout {
        got: Duration,
        min: Duration,
        max: Duration,
    },
    #[error("a group member must subscribe to at least one topic")]
    NoTopics,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The answer to a join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    pub member_id: String,
    pub member_epoch: u64,
    pub heartbeat_interval: Duration,
}

/// The answer to a heartbeat: what the member may hold now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub member_epoch: u64,
    pub partitions: BTreeSet<TopicPartition>,
    pub heartbeat_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberDescription {
    pub member_id: String,
    pub instance_id: Option<String>,
    pub topics: BTreeSet<String>,
    pub member_epoch: u64,
    pub assigned: BTreeSet<TopicPartition>,
    /// What it reported holding at its last heartbeat.
    pub owned: BTreeSet<TopicPartition>,
    pub since_heartbeat: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group_id: String,
    pub group_epoch: u64,
    pub members: Vec<MemberDescription>,
    pub offsets: BTreeMap<TopicPartition, CommittedOffset>,
}

/// One offset a reset would set, with what it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetChange {
    pub partition: TopicPartition,
    pub previous: Option<u64>,
    pub offset: u64,
}

struct Member {
    instance_id: Option<String>,
    topics: BTreeSet<String>,
    session_timeout: Duration,
    last_heartbeat: Instant,
    member_epoch: u64,
    target: BTreeSet<TopicPartition>,
    assigned: BTreeSet<TopicPartition>,
    owned: BTreeSet<TopicPartition>,
}

#[derive(Default)]
struct Group {
    members: BTreeMap<String, Member>,
    group_epoch: u64,
    /// Partition counts the current targets were computed for.
    partition_counts: BTreeMap<String, u32>,
    /// Membership or subscriptions changed since the targets were computed.
    stale: bool,
    /// When the last member left or was removed: the offset retention
    /// clock of an empty group starts here (KIP-211).
    emptied_at: Option<Instant>,
}

impl Group {
    /// Recomputes targets if membership or the topics' partition counts
    /// changed.
    fn refresh_targets(&mut self, catalog: &dyn TopicCatalog) {
        let topics: BTreeSet<&String> = self.members.values().flat_map(|m| &m.topics).collect();
        let counts: BTreeMap<String, u32> = topics
            .into_iter()
            .filter_map(|t| catalog.partition_count(t).map(|n| (t.clone(), n)))
            .collect();
        if !self.stale && counts == self.partition_counts {
            return;
        }
        let subscriptions: Vec<MemberSubscription<'_>> = self
            .members
            .iter()
            .map(|(id, m)| MemberSubscription {
                member_id: id,
                topics: &m.topics,
                current: &m.target,
            })
            .collect();
        let targets = assign(&subscriptions, &counts);
        for (id, target) in targets {
            if let Some(member) = self.members.get_mut(&id) {
                member.target = target;
            }
        }
        self.partition_counts = counts;
        self.group_epoch += 1;
        self.stale = false;
    }

    /// The member's target minus what other members still hold: what they
    /// were last given, or still report holding.
    fn assignable(&self, member_id: &str) -> BTreeSet<TopicPartition> {
        let held_elsewhere: BTreeSet<&TopicPartition> = self
            .members
            .iter()
            .filter(|(id, _)| id.as_str() != member_id)
            .flat_map(|(_, m)| m.assigned.iter().chain(&m.owned))
            .collect();
        self.members[member_id]
            .target
            .iter()
            .filter(|tp| !held_elsewhere.contains(tp))
            .cloned()
            .collect()
    }
}

/// Coordinates every consumer group of the broker.
pub struct GroupCoordinator {
    /// Lock order: `groups` before any lock inside `classic`.
    groups: Mutex<HashMap<String, Group>>,
    classic: ClassicGroups,
    offsets: OffsetStore,
    catalog: Box<dyn TopicCatalog>,
    settings: GroupSettings,
    next_member: AtomicU64,
    /// A group without members that this process never saw with members
    /// counts as empty since here.
    started_at: Instant,
}

impl GroupCoordinator {
    pub fn new(
        offsets: OffsetStore,
        catalog: Box<dyn TopicCatalog>,
        settings: GroupSettings,
    ) -> Self {
        GroupCoordinator {
            groups: Mutex::new(HashMap::new()),
            classic: ClassicGroups::new(settings.clone()),
            offsets,
            catalog,
            settings,
            next_member: AtomicU64::new(0),
            started_at: Instant::now(),
        }
    }

    pub fn offsets(&self) -> &OffsetStore {
        &self.offsets
    }

    /// The Kafka classic groups: sync, heartbeat, leave, describe, list,
    /// tick. Joins go through [`GroupCoordinator::join_classic`], commits
    /// through [`GroupCoordinator::commit_classic`].
    pub fn classic(&self) -> &ClassicGroups {
        &self.classic
    }

    /// A Kafka JoinGroup (see [`ClassicGroups`]); refused with
    /// [`ClassicError::OtherProtocol`] while the group has live Sluice
    /// members.
    pub fn join_classic(&self, request: JoinRequest, now: Instant) -> Pending<JoinOutcome> {
        let mut groups = self.groups.lock();
        expire_members(&mut groups, now);
        let sluice_members = groups.get(&request.group_id).map_or(0, |g| g.members.len());
        // Under `groups`: a Sluice join waits, then sees this member.
        self.classic.join(request, sluice_members, now)
    }

    /// A Kafka OffsetCommit. A member's commit must pass
    /// [`ClassicGroups::check_commit`] (no check of which partitions it was
    /// assigned: Kafka makes none); one from outside the group (empty member
    /// id, negative generation) is [`GroupCoordinator::commit`]'s, allowed
    /// only while the group has no live members of either protocol.
    pub fn commit_classic(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        offsets: Vec<(TopicPartition, u64, String)>,
        now: Instant,
        now_ms: i64,
    ) -> Result<(), ClassicError> {
        if member_id.is_empty() && generation < 0 {
            self.commit(group_id, None, offsets, now, now_ms)?;
        } else {
            self.classic
                .check_commit(group_id, member_id, generation, now)?;
            self.write_offsets(group_id, offsets, now_ms)?;
        }
        Ok(())
    }

    /// Whether the group has live members, of either protocol.
    pub fn has_live_members(&self, group_id: &str, now: Instant) -> bool {
        let mut groups = self.groups.lock();
        expire_members(&mut groups, now);
        self.check_no_members(&groups, group_id, now).is_err()
    }

    /// Refuses with `GroupNotEmpty` while the group has live members of
    /// either protocol. Call under the `groups` lock.
    fn check_no_members(
        &self,
        groups: &HashMap<String, Group>,
        group_id: &str,
        now: Instant,
    ) -> Result<(), GroupError> {
        let sluice = groups.get(group_id).map_or(0, |g| g.members.len());
        let (members, protocol) = match sluice {
            0 => (
                self.classic.live_members(group_id, now),
                GroupProtocol::KafkaClassic,
            ),
            n => (n, GroupProtocol::Sluice),
        };
        if members > 0 {
            return Err(GroupError::GroupNotEmpty {
                group: group_id.to_owned(),
                members,
                protocol,
            });
        }
        Ok(())
    }

    /// The committed offsets of `group_id` that belong to the live
    /// incarnation of their topic.
    pub fn fetch_offsets(&self, group_id: &str) -> BTreeMap<TopicPartition, CommittedOffset> {
        self.offsets
            .fetch_live(group_id, &|topic| self.catalog.topic_id(topic))
    }

    /// Drops, durably, offsets of deleted topics and of earlier topics of
    /// the same name (a crash may have come between deleting a topic and its
    /// offsets). Run at startup before serving; maintenance runs it too.
    pub fn discard_stale_offsets(&self, now_ms: i64) -> Result<Vec<String>, GroupError> {
        Ok(self
            .offsets
            .reconcile(&|topic| self.catalog.topic_id(topic), now_ms)?)
    }

    fn heartbeat_interval(&self, session_timeout: Duration) -> Duration {
        self.settings.heartbeat_interval.min(session_timeout / 3)
    }

    /// Adds a member (or, with a known `instance_id`, takes over the member
    /// that had it). Its partitions come with its heartbeats.
    pub fn join(
        &self,
        group_id: &str,
        instance_id: Option<&str>,
        topics: BTreeSet<String>,
        session_timeout: Duration,
        now: Instant,
    ) -> Result<Joined, GroupError> {
        let s = &self.settings;
        if !(s.min_session_timeout..=s.max_session_timeout).contains(&session_timeout) {
            return Err(GroupError::InvalidSessionTimeout {
                got: session_timeout,
                min: s.min_session_timeout,
                max: s.max_session_timeout,
            });
        }
        if topics.is_empty() {
            return Err(GroupError::NoTopics);
        }
        let member_id = format!(
            "{}-{}",
            instance_id.unwrap_or("member"),
            self.next_member.fetch_add(1, Ordering::Relaxed)
        );
        let mut groups = self.groups.lock();
        // Under `groups`: a classic join waits, then sees this member.
        let kafka_members = self.classic.live_members(group_id, now);
        if kafka_members > 0 {
            return Err(GroupError::GroupNotEmpty {
                group: group_id.to_owned(),
                members: kafka_members,
                protocol: GroupProtocol::KafkaClassic,
            });
        }
        let group = groups.entry(group_id.to_owned()).or_default();
        group.emptied_at = None;
        let previous = instance_id.and_then(|instance| {
            let id = group
                .members
                .iter()
                .find(|(_, m)| m.instance_id.as_deref() == Some(instance))
                .map(|(id, _)| id.clone())?;
            group.members.remove(&id)
        });
        let member = match previous {
            Some(mut old) => {
                // The same instance, restarted: it keeps its partitions. What
                // the old incarnation held, the new one holds until it says
                // otherwise.
                old.member_epoch += 1;
                old.last_heartbeat = now;
                old.session_timeout = session_timeout;
                if old.topics != topics {
                    old.topics = topics;
                    group.stale = true;
                }
                tracing::info!(group = group_id, member = %member_id, "static member rejoined");
                old
            }
            None => {
                group.stale = true;
                tracing::info!(group = group_id, member = %member_id, "member joined");
                Member {
                    instance_id: instance_id.map(str::to_owned),
                    topics,
                    session_timeout,
                    last_heartbeat: now,
                    member_epoch: 1,
                    target: BTreeSet::new(),
                    assigned: BTreeSet::new(),
                    owned: BTreeSet::new(),
                }
            }
        };
        let member_epoch = member.member_epoch;
        group.members.insert(member_id.clone(), member);
        Ok(Joined {
            member_id,
            member_epoch,
            heartbeat_interval: self.heartbeat_interval(session_timeout),
        })
    }

    /// Records that the member is alive and holds `owned`, and returns what
    /// it may hold now. Partitions missing from the answer must be released
    /// (commit, then stop reading them).
    pub fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        owned: BTreeSet<TopicPartition>,
        now: Instant,
    ) -> Result<Assignment, GroupError> {
        let mut groups = self.groups.lock();
        expire_members(&mut groups, now);
        let group = groups
            .get_mut(group_id)
            .ok_or_else(|| unknown_member(group_id, member_id))?;
        let member = group
            .members
            .get_mut(member_id)
            .ok_or_else(|| unknown_member(group_id, member_id))?;
        member.last_heartbeat = now;
        // A member can only hold what it was given (or already held).
        let allowed: BTreeSet<TopicPartition> =
            member.assigned.union(&member.owned).cloned().collect();
        member.owned = owned.intersection(&allowed).cloned().collect();
        group.refresh_targets(self.catalog.as_ref());
        let assigned = group.assignable(member_id);
        let member = group.members.get_mut(member_id).expect("present");
        if assigned != member.assigned {
            member.assigned = assigned;
            member.member_epoch += 1;
        }
        Ok(Assignment {
            member_epoch: member.member_epoch,
            partitions: member.assigned.clone(),
            heartbeat_interval: self.heartbeat_interval(member.session_timeout),
        })
    }

    /// What a live member holds or was given: the partitions whose records
    /// it may nack and ack.
    pub fn member_partitions(
        &self,
        group_id: &str,
        member_id: &str,
        now: Instant,
    ) -> Result<BTreeSet<TopicPartition>, GroupError> {
        self.with_member(group_id, member_id, now, |m| {
            m.assigned.union(&m.owned).cloned().collect()
        })
    }

    /// What a live member reads and keeps: partitions it reported holding
    /// that are still assigned to it. Retries go only there: a member drops
    /// a retry of a partition it is releasing or has not started yet, and
    /// the retry then waits out its redelivery timeout.
    pub fn member_reading(
        &self,
        group_id: &str,
        member_id: &str,
        now: Instant,
    ) -> Result<BTreeSet<TopicPartition>, GroupError> {
        self.with_member(group_id, member_id, now, |m| {
            m.assigned.intersection(&m.owned).cloned().collect()
        })
    }

    fn with_member<T>(
        &self,
        group_id: &str,
        member_id: &str,
        now: Instant,
        f: impl FnOnce(&Member) -> T,
    ) -> Result<T, GroupError> {
        let mut groups = self.groups.lock();
        expire_members(&mut groups, now);
        let member = groups
            .get(group_id)
            .and_then(|g| g.members.get(member_id))
            .ok_or_else(|| unknown_member(group_id, member_id))?;
        Ok(f(member))
    }

    /// Removes a member at once; its partitions go to the others.
    pub fn leave(&self, group_id: &str, member_id: &str, now: Instant) -> Result<(), GroupError> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or_else(|| unknown_member(group_id, member_id))?;
        group
            .members
            .remove(member_id)
            .ok_or_else(|| unknown_member(group_id, member_id))?;
        group.stale = true;
        if group.members.is_empty() {
            group.emptied_at = Some(now);
        }
        tracing::info!(group = group_id, member = member_id, "member left");
        Ok(())
    }

    /// Removes members whose session timed out, of both protocols, and
    /// completes classic rebalances that are due. Heartbeats do it too; call
    /// this periodically so a group whose members all died is noticed.
    pub fn expire_sessions(&self, now: Instant) -> usize {
        let sluice = expire_members(&mut self.groups.lock(), now);
        sluice + self.classic.tick(now)
    }

    /// Commits offsets. `member` is `(member_id, member_epoch)` for a group
    /// member; `None` for a committer outside the group, allowed only while
    /// the group has no members.
    pub fn commit(
        &self,
        group_id: &str,
        member: Option<(&str, u64)>,
        offsets: Vec<(TopicPartition, u64, String)>,
        now: Instant,
        now_ms: i64,
    ) -> Result<(), GroupError> {
        {
            let mut groups = self.groups.lock();
            expire_members(&mut groups, now);
            let group = groups.get(group_id);
            match member {
                Some((member_id, epoch)) => {
                    let m = group
                        .and_then(|g| g.members.get(member_id))
                        .ok_or_else(|| unknown_member(group_id, member_id))?;
                    if epoch > m.member_epoch {
                        return Err(GroupError::InvalidMemberEpoch {
                            group: group_id.to_owned(),
                            member: member_id.to_owned(),
                            got: epoch,
                            current: m.member_epoch,
                        });
                    }
                    if let Some((tp, _, _)) = offsets
                        .iter()
                        .find(|(tp, _, _)| !m.assigned.contains(tp) && !m.owned.contains(tp))
                    {
                        return Err(GroupError::NotOwner {
                            group: group_id.to_owned(),
                            member: member_id.to_owned(),
                            partition: tp.clone(),
                        });
                    }
                }
                None => self.check_no_members(&groups, group_id, now)?,
            }
        }
        // The ownership check and the write are not under one lock: a
        // partition handed over in between came back from this member, which
        // released it after committing, so the offset is still its to write.
        self.write_offsets(group_id, offsets, now_ms)
    }

    fn write_offsets(
        &self,
        group_id: &str,
        offsets: Vec<(TopicPartition, u64, String)>,
        now_ms: i64,
    ) -> Result<(), GroupError> {
        let entries: Vec<(TopicPartition, CommittedOffset)> = offsets
            .into_iter()
            .map(|(tp, offset, metadata)| {
                (
                    tp,
                    CommittedOffset {
                        offset,
                        metadata,
                        commit_time_ms: now_ms,
                    },
                )
            })
            .collect();
        self.offsets
            .commit(group_id, &entries, &|topic| self.catalog.topic_id(topic))?;
        Ok(())
    }

    /// Sets offsets of a group with no members; with `dry_run` only says what
    /// would change.
    pub fn reset_offsets(
        &self,
        group_id: &str,
        targets: Vec<(TopicPartition, u64)>,
        dry_run: bool,
        now: Instant,
        now_ms: i64,
    ) -> Result<Vec<OffsetChange>, GroupError> {
        {
            let mut groups = self.groups.lock();
            expire_members(&mut groups, now);
            self.check_no_members(&groups, group_id, now)?;
        }
        let current = self.fetch_offsets(group_id);
        let changes: Vec<OffsetChange> = targets
            .into_iter()
            .map(|(partition, offset)| OffsetChange {
                previous: current.get(&partition).map(|c| c.offset),
                partition,
                offset,
            })
            .collect();
        if !dry_run {
            self.commit(
                group_id,
                None,
                changes
                    .iter()
                    .map(|c| (c.partition.clone(), c.offset, String::from("reset")))
                    .collect(),
                now,
                now_ms,
            )?;
        }
        Ok(changes)
    }

    /// Deletes the offsets of groups that have been empty (no live member of
    /// either protocol) for `retention` and have had no commit for as long
    /// (KIP-211); a group with live members is never touched. Offsets of deleted topics go too
    /// ([`GroupCoordinator::discard_stale_offsets`]).
    pub fn expire_offsets(
        &self,
        now: Instant,
        now_ms: i64,
        retention: Duration,
    ) -> Result<Vec<String>, GroupError> {
        self.discard_stale_offsets(now_ms)?;
        let with_offsets = self.offsets.groups();
        // When each group without members became empty.
        let empty_since: BTreeMap<String, Instant> = {
            let mut groups = self.groups.lock();
            expire_members(&mut groups, now);
            // Keep an empty group's record while it has offsets: it holds
            // when the group became empty.
            let has_offsets = |id: &str| {
                with_offsets
                    .binary_search_by(|g| g.as_str().cmp(id))
                    .is_ok()
            };
            groups.retain(|id, g| !g.members.is_empty() || has_offsets(id));
            self.classic.forget_empty(has_offsets);
            with_offsets
                .iter()
                .filter(|id| {
                    groups.get(*id).is_none_or(|g| g.members.is_empty())
                        && self.classic.live_members(id, now) == 0
                })
                .map(|id| {
                    // The later of the two protocols' emptying.
                    let emptied_at = groups
                        .get(id)
                        .and_then(|g| g.emptied_at)
                        .max(self.classic.emptied_at(id))
                        .unwrap_or(self.started_at);
                    (id.clone(), emptied_at)
                })
                .collect()
        };
        let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
        let mut expired = Vec::new();
        for (group, emptied_at) in empty_since {
            if now.saturating_duration_since(emptied_at) < retention {
                continue;
            }
            let newest = self
                .offsets
                .fetch(&group)
                .values()
                .map(|c| c.commit_time_ms)
                .max();
            if newest.is_some_and(|t| now_ms.saturating_sub(t) >= retention_ms) {
                // Under the lock, so a member joining meanwhile is either
                // seen here or joins after the offsets are gone.
                let mut groups = self.groups.lock();
                if groups.get(&group).is_some_and(|g| !g.members.is_empty())
                    || self.classic.live_members(&group, now) > 0
                {
                    continue;
                }
                self.offsets.delete_group(&group, now_ms)?;
                groups.remove(&group);
                self.classic.forget_if_empty(&group);
                tracing::info!(group, "expired the offsets of an empty group");
                expired.push(group);
            }
        }
        Ok(expired)
    }

    /// Every group with members (of either protocol) or committed offsets.
    pub fn list(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.offsets.groups().into_iter().collect();
        all.extend(self.classic.groups_with_members());
        all.extend(
            self.groups
                .lock()
                .iter()
                .filter(|(_, g)| !g.members.is_empty())
                .map(|(id, _)| id.clone()),
        );
        all.into_iter().collect()
    }

    /// The group's members, of either protocol, and its offsets. A Kafka
    /// member shows its generation as its epoch, and the partitions of its
    /// last assignment as both assigned and owned.
    pub fn describe(&self, group_id: &str, now: Instant) -> Result<GroupDescription, GroupError> {
        let offsets = self.fetch_offsets(group_id);
        let mut groups = self.groups.lock();
        expire_members(&mut groups, now);
        let group = groups.get(group_id);
        let classic = self.classic.member_descriptions(group_id, now);
        if group.is_none_or(|g| g.members.is_empty()) && classic.is_none() && offsets.is_empty() {
            return Err(GroupError::UnknownGroup(group_id.to_owned()));
        }
        if let Some((generation, members)) = classic {
            return Ok(GroupDescription {
                group_id: group_id.to_owned(),
                group_epoch: generation,
                members,
                offsets,
            });
        }
        let members = group
            .map(|g| {
                g.members
                    .iter()
                    .map(|(id, m)| MemberDescription {
                        member_id: id.clone(),
                        instance_id: m.instance_id.clone(),
                        topics: m.topics.clone(),
                        member_epoch: m.member_epoch,
                        assigned: m.assigned.clone(),
                        owned: m.owned.clone(),
                        since_heartbeat: now.saturating_duration_since(m.last_heartbeat),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(GroupDescription {
            group_id: group_id.to_owned(),
            group_epoch: group.map_or(0, |g| g.group_epoch),
            members,
            offsets,
        })
    }
}

fn unknown_member(group: &str, member: &str) -> GroupError {
    GroupError::UnknownMember {
        group: group.to_owned(),
        member: member.to_owned(),
    }
}

fn expire_members(groups: &mut HashMap<String, Group>, now: Instant) -> usize {
    let mut expired = 0;
    for (group_id, group) in groups.iter_mut() {
        let before = group.members.len();
        group.members.retain(|member_id, m| {
            let alive = now.saturating_duration_since(m.last_heartbeat) <= m.session_timeout;
            if !alive {
                tracing::info!(group = %group_id, member = %member_id, "member missed its session timeout");
            }
            alive
        });
        if group.members.len() != before {
            group.stale = true;
            expired += before - group.members.len();
            if group.members.is_empty() {
                group.emptied_at = Some(now);
            }
        }
    }
    expired
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::groups::ClassicError;

    struct Catalog;

    impl TopicCatalog for Catalog {
        fn partition_count(&self, topic: &str) -> Option<u32> {
            (topic == "orders").then_some(6)
        }

        fn topic_id(&self, topic: &str) -> Option<TopicId> {
            (topic == "orders").then_some(TopicId(7))
        }
    }

    const SESSION: Duration = Duration::from_secs(10);

    fn coordinator(dir: &std::path::Path) -> GroupCoordinator {
        GroupCoordinator::new(
            OffsetStore::open(dir).unwrap(),
            Box::new(Catalog),
            GroupSettings::default(),
        )
    }

    fn kafka_join(member_id: &str, client: &str) -> JoinRequest {
        JoinRequest {
            group_id: "g".to_owned(),
            member_id: member_id.to_owned(),
            group_instance_id: None,
            session_timeout: SESSION,
            rebalance_timeout: Duration::from_secs(30),
            protocol_type: "consumer".to_owned(),
            protocols: vec![("range".to_owned(), Bytes::from_static(b"subscription"))],
            client_id: client.to_owned(),
            client_host: "/10.0.0.1".to_owned(),
            topics: ["orders".to_owned()].into(),
        }
    }

    fn orders(partitions: &[u32]) -> BTreeSet<TopicPartition> {
        partitions
            .iter()
            .map(|&p| TopicPartition::new("orders", p))
            .collect()
    }

    /// A Kafka member, joined and synced alone with `partitions`: its id
    /// (generation 1).
    fn kafka_member(groups: &GroupCoordinator, partitions: &[u32], now: Instant) -> String {
        let joined = groups
            .join_classic(kafka_join("", "kafka"), now)
            .try_recv()
            .unwrap()
            .unwrap();
        let id = joined.member_id;
        groups
            .classic()
            .sync(
                "g",
                &id,
                1,
                vec![(
                    id.clone(),
                    Bytes::from_static(b"assignment"),
                    orders(partitions),
                )],
                now,
            )
            .try_recv()
            .unwrap()
            .unwrap();
        id
    }

    fn offset(tp: u32, offset: u64) -> (TopicPartition, u64, String) {
        (TopicPartition::new("orders", tp), offset, String::new())
    }

    #[test]
    fn a_group_speaks_one_protocol_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let groups = coordinator(dir.path());
        let t0 = Instant::now();
        let sluice = groups
            .join("g", None, ["orders".to_owned()].into(), SESSION, t0)
            .unwrap();
        assert!(groups.has_live_members("g", t0));
        let err = groups
            .join_classic(kafka_join("", "kafka"), t0)
            .try_recv()
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, ClassicError::OtherProtocol { members: 1, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("1 live Sluice-protocol member(s)"),
            "{err}"
        );
        // Other group names are free.
        let other = JoinRequest {
            group_id: "h".to_owned(),
            ..kafka_join("", "kafka")
        };
        groups.join_classic(other, t0).try_recv().unwrap().unwrap();
        groups.leave("g", &sluice.member_id, t0).unwrap();
        assert!(!groups.has_live_members("g", t0));
        let kafka = kafka_member(&groups, &[0], t0);
        assert!(groups.has_live_members("g", t0));
        let err = groups
            .join("g", None, ["orders".to_owned()].into(), SESSION, t0)
            .unwrap_err();
        assert!(
            matches!(
                err,
                GroupError::GroupNotEmpty {
                    members: 1,
                    protocol: GroupProtocol::KafkaClassic,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("Kafka consumer"), "{err}");
        // Once the Kafka member is gone (its session), Sluice may join.
        groups.classic().heartbeat("g", &kafka, 1, t0).unwrap();
        let later = t0 + SESSION * 2;
        assert_eq!(groups.expire_sessions(later), 2);
        assert!(!groups.has_live_members("g", later));
        groups
            .join("g", None, ["orders".to_owned()].into(), SESSION, later)
            .unwrap();
    }

    #[test]
    fn offsets_of_a_group_with_live_kafka_members_are_neither_reset_nor_expired() {
        let dir = tempfile::tempdir().unwrap();
        let groups = coordinator(dir.path());
        let t0 = Instant::now();
        let kafka = kafka_member(&groups, &[0, 1], t0);
        groups
            .commit_classic("g", &kafka, 1, vec![offset(0, 5)], t0, 1_000)
            .unwrap();
        let err = groups
            .reset_offsets(
                "g",
                vec![(TopicPartition::new("orders", 0), 0)],
                false,
                t0,
                1_000,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                GroupError::GroupNotEmpty {
                    members: 1,
                    protocol: GroupProtocol::KafkaClassic,
                    ..
                }
            ),
            "{err}"
        );
        let err = groups
            .commit("g", None, vec![offset(0, 0)], t0, 1_000)
            .unwrap_err();
        assert!(matches!(err, GroupError::GroupNotEmpty { .. }), "{err}");
        // Nor from outside through Kafka (empty member id, generation -1).
        let err = groups
            .commit_classic("g", "", -1, vec![offset(0, 0)], t0, 1_000)
            .unwrap_err();
        assert!(
            matches!(err, ClassicError::Group(GroupError::GroupNotEmpty { .. })),
            "{err}"
        );
        // However old its commits (an hour), a group with a live member
        // keeps them.
        let much_later = t0 + SESSION / 2;
        let now_ms = 3_600_000;
        groups
            .classic()
            .heartbeat("g", &kafka, 1, much_later)
            .unwrap();
        assert!(
            groups
                .expire_offsets(much_later, now_ms, Duration::from_secs(1))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            groups.fetch_offsets("g")[&TopicPartition::new("orders", 0)].offset,
            5
        );
        // It leaves: the empty clock starts there, not at the old commit.
        let left = groups
            .classic()
            .leave("g", vec![(Some(kafka.clone()), None)], much_later);
        assert_eq!(left[0].as_ref().unwrap(), &kafka);
        let a_bit_later = much_later + Duration::from_secs(30);
        assert!(
            groups
                .expire_offsets(a_bit_later, now_ms + 30_000, Duration::from_secs(60))
                .unwrap()
                .is_empty()
        );
        // Now resets and outside commits are fine ...
        groups
            .commit_classic("g", "", -1, vec![offset(1, 3)], a_bit_later, 1_000)
            .unwrap();
        let changes = groups
            .reset_offsets(
                "g",
                vec![(TopicPartition::new("orders", 0), 2)],
                false,
                a_bit_later,
                1_000,
            )
            .unwrap();
        assert_eq!(changes[0].previous, Some(5));
        // ... and a retention after it left, the offsets expire.
        let expired = groups
            .expire_offsets(
                much_later + Duration::from_secs(61),
                now_ms + 61_000,
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(expired, ["g"]);
        assert!(groups.fetch_offsets("g").is_empty());
    }

    #[test]
    fn commit_classic_checks_the_member_and_writes_the_shared_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let groups = coordinator(dir.path());
        let t0 = Instant::now();
        let kafka = kafka_member(&groups, &[0], t0);
        // No ownership check, as in Kafka: any partition.
        groups
            .commit_classic("g", &kafka, 1, vec![offset(0, 7), offset(3, 9)], t0, 1_000)
            .unwrap();
        let committed = groups.fetch_offsets("g");
        assert_eq!(committed[&TopicPartition::new("orders", 0)].offset, 7);
        assert_eq!(committed[&TopicPartition::new("orders", 3)].offset, 9);
        let err = groups
            .commit_classic("g", &kafka, 0, vec![offset(0, 8)], t0, 1_000)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ClassicError::IllegalGeneration {
                    got: 0,
                    current: 1,
                    ..
                }
            ),
            "{err}"
        );
        let err = groups
            .commit_classic("g", "stranger", 1, vec![offset(0, 8)], t0, 1_000)
            .unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
        // A second member: generation 2, waiting for the leader's sync.
        let mut second = groups.join_classic(kafka_join("", "second"), t0);
        groups
            .join_classic(kafka_join(&kafka, "kafka"), t0)
            .try_recv()
            .unwrap()
            .unwrap();
        second.try_recv().unwrap().unwrap();
        let err = groups
            .commit_classic("g", &kafka, 2, vec![offset(0, 8)], t0, 1_000)
            .unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
        assert_eq!(
            groups.fetch_offsets("g")[&TopicPartition::new("orders", 0)].offset,
            7
        );
    }

    #[test]
    fn describe_and_list_show_kafka_members_with_their_assignment() {
        let dir = tempfile::tempdir().unwrap();
        let groups = coordinator(dir.path());
        let t0 = Instant::now();
        assert!(matches!(
            groups.describe("g", t0),
            Err(GroupError::UnknownGroup(_))
        ));
        let kafka = kafka_member(&groups, &[0, 2], t0);
        assert_eq!(groups.list(), ["g"]);
        let description = groups.describe("g", t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(description.group_epoch, 1);
        assert_eq!(
            description.members,
            [MemberDescription {
                member_id: kafka.clone(),
                instance_id: None,
                topics: ["orders".to_owned()].into(),
                member_epoch: 1,
                assigned: orders(&[0, 2]),
                owned: orders(&[0, 2]),
                since_heartbeat: Duration::from_secs(2),
            }]
        );
        let kafka_view = groups.classic().describe("g", t0);
        assert_eq!(kafka_view.state, "Stable");
        assert_eq!(kafka_view.members[0].client_host, "/10.0.0.1");
        assert_eq!(
            kafka_view.members[0].assignment,
            Bytes::from_static(b"assignment")
        );
        // Gone with its session; no offsets, so no group.
        let later = t0 + SESSION * 2;
        groups.expire_sessions(later);
        assert!(groups.list().is_empty());
        assert!(matches!(
            groups.describe("g", later),
            Err(GroupError::UnknownGroup(_))
        ));
    }
}
