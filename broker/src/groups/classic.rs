//! Kafka's classic consumer-group protocol: JoinGroup, SyncGroup, Heartbeat
//! and LeaveGroup, as Kafka's GroupCoordinator runs them.
//!
//! It owns the membership of classic groups: members and their sessions,
//! generations, the rebalance state machine, the rebalance deadline, static
//! membership (`group.instance.id`, with fencing of the replaced member id)
//! and the check a classic member's offset commit must pass. The assignment
//! is the clients' business: the group *leader* computes it from every
//! member's metadata and the broker only carries it, in SyncGroup, from the
//! leader to each member.
//!
//! It does not know Kafka's wire format: requests come in as plain values,
//! answers go out as plain values, and every refusal is a [`ClassicError`]
//! variant that the listener maps to a Kafka error code. The caller decodes
//! a join's subscription and each assignment only far enough to give their
//! topics and partitions, which serve `describe` and nothing else. It stores
//! no offsets: a classic commit passes [`ClassicGroups::check_commit`] and
//! lands in the same [`OffsetStore`](super::OffsetStore) as Sluice's own
//! groups, through [`GroupCoordinator`](super::GroupCoordinator). Nor does it
//! decide which protocol a group name speaks: the coordinator's
//! [`join_classic`](super::GroupCoordinator::join_classic) refuses a classic
//! join while the group has live Sluice members (and Sluice's join refuses
//! while it has classic ones).
//!
//! States of a group:
//!
//! ```text
//!          join                  every member joined,
//!  Empty ───────▶ PreparingRebalance ───or the deadline passed───▶ CompletingRebalance
//!    ▲               ▲   ▲   │                                        │   │
//!    │               │   │   └─ nobody left ─▶ Empty                  │   │ the leader's
//!    │               │   └──── join, leave, session expiry ───────────┘   │ SyncGroup
//!    │               └──────── join (changed), leave, session expiry ──┐  ▼
//!    └──────────────── the last member leaves or expires ──────────── Stable
//! ```
//!
//! - `Empty`: no members. Offsets may be committed from outside the group.
//! - `PreparingRebalance`: every member must join (again). A join is
//!   answered, through a oneshot channel, once every member has joined, or
//!   at the rebalance deadline (when the rebalance started plus the largest
//!   rebalance timeout of the members); whoever has not joined by then is
//!   removed. A group leaving `Empty` waits at least
//!   [`GroupSettings::initial_rebalance_delay`] for more members first.
//!   Heartbeats are answered `RebalanceInProgress`.
//! - `CompletingRebalance`: a new generation; every join was answered, the
//!   leader's with every member's metadata for the chosen protocol. The
//!   followers' SyncGroups wait for the leader's.
//! - `Stable`: the leader's SyncGroup gave every member its assignment
//!   (a member it left out gets an empty one).
//!
//! A member is alive while it waits in a join or a sync, and otherwise for
//! its session timeout after its last join, sync, heartbeat or commit; one
//! that is not is removed, and the others rebalance. Time is passed in
//! (`now`): what is due happens on the next call that touches the group, or
//! on [`ClassicGroups::tick`], which the listener calls every ~100 ms.
//! Membership lives in memory only, like that of Sluice's groups.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use super::assignor::TopicPartition;
use super::coordinator::{GroupError, GroupSettings, MemberDescription};

/// Why a classic group refused a request; one variant per Kafka error code.
#[derive(Debug, thiserror::Error)]
pub enum ClassicError {
    #[error(
        "member {member:?} is not in group {group:?}: it left, missed its session timeout \
         or did not join the last rebalance in time; join again with an empty member id"
    )]
    UnknownMemberId { group: String, member: String },
    #[error(
        "member {member:?} of group {group:?} sent generation {got}, but the group is at \
         generation {current}; join again"
    )]
    IllegalGeneration {
        group: String,
        member: String,
        got: i32,
        current: i32,
    },
    #[error(
        "group {group:?} is rebalancing ({state}): member {member:?} must join again, then \
         sync, before this"
    )]
    RebalanceInProgress {
        group: String,
        member: String,
        state: ClassicState,
    },
    #[error("client {client:?} (member {member:?}) cannot join group {group:?}: {reason}")]
    InconsistentGroupProtocol {
        group: String,
        member: String,
        client: String,
        reason: String,
    },
    #[error("session timeout {got:?} is outside {min:?}..={max:?}")]
    InvalidSessionTimeout {
        got: Duration,
        min: Duration,
        max: Duration,
    },
    #[error(
        "member {member:?} of group {group:?} is fenced: group instance {instance:?} \
         joined again under another member id"
    )]
    FencedInstanceId {
        group: String,
        member: String,
        instance: String,
    },
    #[error(
        "group {group:?} is in use by {members} live Sluice-protocol member(s), and a group \
         speaks one protocol at a time; use another group id, or stop them first"
    )]
    OtherProtocol { group: String, members: usize },
    /// A commit that the coordinator or the offset store refused (an
    /// outside commit to a group with members; a storage failure).
    #[error(transparent)]
    Group(#[from] GroupError),
}

/// The state of a classic group (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassicState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl ClassicState {
    /// Kafka's name for the state, as DescribeGroups and ListGroups give it.
    pub fn as_str(self) -> &'static str {
        match self {
            ClassicState::Empty => "Empty",
            ClassicState::PreparingRebalance => "PreparingRebalance",
            ClassicState::CompletingRebalance => "CompletingRebalance",
            ClassicState::Stable => "Stable",
        }
    }
}

impl std::fmt::Display for ClassicState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A JoinGroup, decoded.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group_id: String,
    /// Empty for a new member: the group gives it an id.
    pub member_id: String,
    /// Static membership: a join with an instance id already in the group
    /// (and an empty member id) takes that member's place; the old member
    /// id is fenced.
    pub group_instance_id: Option<String>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
    /// `"consumer"` for consumers; every member of a group must agree.
    pub protocol_type: String,
    /// The assignors the member supports, most preferred first, each with
    /// its metadata (the subscription).
    pub protocols: Vec<(String, Bytes)>,
    pub client_id: String,
    pub client_host: String,
    /// The subscribed topics, decoded from the metadata by the caller; only
    /// shown by describe.
    pub topics: BTreeSet<String>,
}

/// A member as the leader's join answer lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinedMember {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    /// Its metadata for the chosen protocol.
    pub metadata: Bytes,
}

/// The answer to a join: the generation the member is now part of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    pub generation_id: i32,
    pub protocol_type: String,
    pub protocol_name: String,
    pub leader_id: String,
    pub member_id: String,
    /// Every member, in the leader's answer only (it computes the
    /// assignment); empty in the others'.
    pub members: Vec<JoinedMember>,
}

/// The answer to a sync: the member's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    pub protocol_type: String,
    pub protocol_name: String,
    pub assignment: Bytes,
}

/// An answer that may have to wait for other members. It is always
/// answered: with the outcome, or with an error when the member is removed,
/// fenced or the rebalance starts over. The sender is dropped (the receiver
/// sees `RecvError`) only if the coordinator itself is dropped.
pub type Pending<T> = oneshot::Receiver<Result<T, ClassicError>>;

type Reply<T> = oneshot::Sender<Result<T, ClassicError>>;

/// A group as DescribeGroups shows it. As in Kafka, the protocol name and
/// the members' metadata and assignments are given only while `Stable`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicDescription {
    /// A [`ClassicState`] name, or `"Dead"` for a group it does not know.
    pub state: &'static str,
    pub protocol_type: String,
    pub protocol_name: String,
    pub members: Vec<ClassicMemberDescription>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicMemberDescription {
    pub member_id: String,
    pub group_instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// Its metadata for the chosen protocol.
    pub metadata: Bytes,
    pub assignment: Bytes,
}

/// A group as ListGroups shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassicListing {
    pub group_id: String,
    pub protocol_type: String,
    pub state: ClassicState,
}

fn answered<T>(result: Result<T, ClassicError>) -> Pending<T> {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(result);
    rx
}

fn unknown_member(group: &str, member: &str) -> ClassicError {
    ClassicError::UnknownMemberId {
        group: group.to_owned(),
        member: member.to_owned(),
    }
}

struct Member {
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    protocol_type: String,
    protocols: Vec<(String, Bytes)>,
    topics: BTreeSet<String>,
    /// Its last join, sync, heartbeat or commit, or the end of the last
    /// rebalance or sync it waited in.
    last_seen: Instant,
    /// Orders joins: the first to join a rebalance leads when the leader
    /// is gone.
    joined_seq: u64,
    assignment: Bytes,
    /// `assignment`, decoded by the caller.
    assigned: BTreeSet<TopicPartition>,
    pending_join: Option<Reply<JoinOutcome>>,
    pending_sync: Option<Reply<SyncOutcome>>,
}

impl Member {
    /// Waiting in a join or a sync counts as alive: the rebalance deadline,
    /// not the session, bounds the wait.
    fn alive(&self, now: Instant) -> bool {
        self.pending_join.is_some()
            || self.pending_sync.is_some()
            || now.saturating_duration_since(self.last_seen) <= self.session_timeout
    }

    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(name, _)| name == protocol)
            .map(|(_, metadata)| metadata.clone())
            .unwrap_or_default()
    }

    fn supports(&self, protocol: &str) -> bool {
        self.protocols.iter().any(|(name, _)| name == protocol)
    }

    /// Answers the join or sync it waits in, if any, with an error.
    fn abort(&mut self, error: impl Fn() -> ClassicError) {
        if let Some(tx) = self.pending_join.take() {
            let _ = tx.send(Err(error()));
        }
        if let Some(tx) = self.pending_sync.take() {
            let _ = tx.send(Err(error()));
        }
    }

    fn update(&mut self, request: &JoinRequest, joined_seq: u64, now: Instant) {
        self.client_id.clone_from(&request.client_id);
        self.client_host.clone_from(&request.client_host);
        self.session_timeout = request.session_timeout;
        self.rebalance_timeout = request.rebalance_timeout;
        self.protocol_type.clone_from(&request.protocol_type);
        self.protocols.clone_from(&request.protocols);
        self.topics.clone_from(&request.topics);
        self.last_seen = now;
        self.joined_seq = joined_seq;
    }
}

/// Who a join is from.
enum Joiner {
    New,
    Existing(String),
    /// A static member's new incarnation, replacing this member id.
    Replaces(String),
}

struct Group {
    id: String,
    state: ClassicState,
    generation: i32,
    /// Of its members; kept while empty, as Kafka does.
    protocol_type: String,
    /// Chosen when the last rebalance completed.
    protocol_name: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// When the current rebalance started (meaningful while preparing).
    rebalance_started: Instant,
    /// A rebalance out of `Empty` completes no earlier than this.
    delay_until: Option<Instant>,
    /// When the last member left or was removed: the offset retention clock
    /// of an empty group starts here (KIP-211).
    emptied_at: Option<Instant>,
    /// Member ids replaced by a static member's new incarnation, with the
    /// instance id: their calls get `FencedInstanceId`. One per instance.
    fenced: HashMap<String, String>,
    join_seq: u64,
}

impl Group {
    fn new(id: &str, now: Instant) -> Self {
        Group {
            id: id.to_owned(),
            state: ClassicState::Empty,
            generation: 0,
            protocol_type: String::new(),
            protocol_name: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_started: now,
            delay_until: None,
            emptied_at: None,
            fenced: HashMap::new(),
            join_seq: 0,
        }
    }

    /// Nothing worth remembering: never had a member, or forgotten them.
    fn is_blank(&self) -> bool {
        self.members.is_empty() && self.emptied_at.is_none() && self.fenced.is_empty()
    }

    fn unknown(&self, member: &str) -> ClassicError {
        match self.fenced.get(member) {
            Some(instance) => ClassicError::FencedInstanceId {
                group: self.id.clone(),
                member: member.to_owned(),
                instance: instance.clone(),
            },
            None => unknown_member(&self.id, member),
        }
    }

    fn rebalancing(&self, member: &str) -> ClassicError {
        ClassicError::RebalanceInProgress {
            group: self.id.clone(),
            member: member.to_owned(),
            state: self.state,
        }
    }

    /// The member, at the group's generation.
    fn member_at(&mut self, member_id: &str, generation: i32) -> Result<&mut Member, ClassicError> {
        if !self.members.contains_key(member_id) {
            return Err(self.unknown(member_id));
        }
        if generation != self.generation {
            return Err(ClassicError::IllegalGeneration {
                group: self.id.clone(),
                member: member_id.to_owned(),
                got: generation,
                current: self.generation,
            });
        }
        Ok(self.members.get_mut(member_id).expect("present"))
    }

    fn member_of_instance(&self, instance: &str) -> Option<String> {
        self.members
            .iter()
            .find(|(_, m)| m.instance_id.as_deref() == Some(instance))
            .map(|(id, _)| id.clone())
    }

    /// Removes a member; a join or sync it waits in is answered
    /// `UnknownMemberId`. The caller then calls `shrank`.
    fn remove(&mut self, member_id: &str) {
        if let Some(mut member) = self.members.remove(member_id) {
            member.abort(|| unknown_member(&self.id, member_id));
        }
        if self.leader.as_deref() == Some(member_id) {
            self.leader = None;
        }
    }

    /// After members were removed: the rest rebalance, or the group is
    /// empty.
    fn shrank(&mut self, now: Instant) {
        if self.members.is_empty() {
            self.become_empty(now);
        } else if matches!(
            self.state,
            ClassicState::Stable | ClassicState::CompletingRebalance
        ) {
            self.start_rebalance(now, Duration::ZERO);
        } else {
            // Preparing: the removed member may have been the one the
            // others waited for.
            self.maybe_complete(now);
        }
    }

    fn become_empty(&mut self, now: Instant) {
        if self.state != ClassicState::Empty {
            // As Kafka does: the empty group is a generation of its own, so
            // nothing of the last one is accepted any more.
            self.generation += 1;
            tracing::info!(group = %self.id, "Kafka group is empty");
        }
        self.state = ClassicState::Empty;
        self.leader = None;
        self.protocol_name = None;
        self.delay_until = None;
        self.emptied_at = Some(now);
    }

    fn start_rebalance(&mut self, now: Instant, initial_delay: Duration) {
        match self.state {
            ClassicState::Empty if !initial_delay.is_zero() => {
                self.delay_until = Some(now + initial_delay);
            }
            ClassicState::CompletingRebalance => {
                let group = &self.id;
                for (id, member) in &mut self.members {
                    if let Some(tx) = member.pending_sync.take() {
                        // Its wait counted as alive; its session restarts.
                        member.last_seen = now;
                        let _ = tx.send(Err(ClassicError::RebalanceInProgress {
                            group: group.clone(),
                            member: id.clone(),
                            state: ClassicState::PreparingRebalance,
                        }));
                    }
                }
            }
            _ => {}
        }
        self.state = ClassicState::PreparingRebalance;
        self.rebalance_started = now;
        tracing::info!(group = %self.id, generation = self.generation, "Kafka group is rebalancing");
    }

    fn deadline(&self) -> Instant {
        let longest = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or_default();
        self.rebalance_started + longest
    }

    /// Removes the members that are no longer alive, and completes a
    /// rebalance that is due. Returns how many members were removed.
    fn tick(&mut self, now: Instant) -> usize {
        let expired: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| !m.alive(now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            tracing::info!(group = %self.id, member = %id, "Kafka group member missed its session timeout");
            self.remove(id);
        }
        if !expired.is_empty() {
            self.shrank(now);
        }
        self.maybe_complete(now);
        expired.len()
    }

    fn maybe_complete(&mut self, now: Instant) {
        if self.state != ClassicState::PreparingRebalance
            || self.delay_until.is_some_and(|t| now < t)
        {
            return;
        }
        let all_joined = self.members.values().all(|m| m.pending_join.is_some());
        if all_joined || now >= self.deadline() {
            self.complete(now);
        }
    }

    /// Ends the rebalance: who did not join goes, the rest get a new
    /// generation.
    fn complete(&mut self, now: Instant) {
        let late: Vec<String> = self
            .members
            .iter()
            .filter(|(_, m)| m.pending_join.is_none())
            .map(|(id, _)| id.clone())
            .collect();
        for id in &late {
            tracing::info!(group = %self.id, member = %id, "Kafka group member did not join the rebalance in time");
            self.remove(id);
        }
        if self.members.is_empty() {
            self.become_empty(now);
            return;
        }
        self.generation += 1;
        let leader = match &self.leader {
            Some(leader) if self.members.contains_key(leader) => leader.clone(),
            _ => self
                .members
                .iter()
                .min_by_key(|(_, m)| m.joined_seq)
                .map(|(id, _)| id.clone())
                .expect("members"),
        };
        // The leader's most preferred protocol that every member supports;
        // joins are refused that would leave none.
        let leader_protocols = &self.members[&leader].protocols;
        let protocol = leader_protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| self.members.values().all(|m| m.supports(name)))
            .unwrap_or(&leader_protocols[0].0)
            .clone();
        let everyone: Vec<JoinedMember> = self
            .members
            .iter()
            .map(|(id, m)| JoinedMember {
                member_id: id.clone(),
                group_instance_id: m.instance_id.clone(),
                metadata: m.metadata(&protocol),
            })
            .collect();
        self.state = ClassicState::CompletingRebalance;
        self.delay_until = None;
        for (id, member) in &mut self.members {
            member.last_seen = now;
            if let Some(tx) = member.pending_join.take() {
                let _ = tx.send(Ok(JoinOutcome {
                    generation_id: self.generation,
                    protocol_type: self.protocol_type.clone(),
                    protocol_name: protocol.clone(),
                    leader_id: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        everyone.clone()
                    } else {
                        Vec::new()
                    },
                }));
            }
        }
        tracing::info!(
            group = %self.id,
            generation = self.generation,
            leader = %leader,
            protocol = %protocol,
            members = self.members.len(),
            "Kafka group has a new generation"
        );
        self.leader = Some(leader);
        self.protocol_name = Some(protocol);
    }

    fn current_outcome(&self, member_id: &str) -> JoinOutcome {
        JoinOutcome {
            generation_id: self.generation,
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone().unwrap_or_default(),
            leader_id: self.leader.clone().unwrap_or_default(),
            member_id: member_id.to_owned(),
            members: Vec::new(),
        }
    }

    fn sync_outcome(&self, member: &Member) -> SyncOutcome {
        SyncOutcome {
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone().unwrap_or_default(),
            assignment: member.assignment.clone(),
        }
    }

    fn joiner(&self, request: &JoinRequest) -> Result<Joiner, ClassicError> {
        let current = request
            .group_instance_id
            .as_deref()
            .and_then(|instance| self.member_of_instance(instance));
        Ok(match current {
            Some(current) if request.member_id.is_empty() => Joiner::Replaces(current),
            Some(current) if request.member_id == current => Joiner::Existing(current),
            Some(_) => {
                return Err(ClassicError::FencedInstanceId {
                    group: self.id.clone(),
                    member: request.member_id.clone(),
                    instance: request.group_instance_id.clone().unwrap_or_default(),
                });
            }
            None if request.member_id.is_empty() => Joiner::New,
            None if self.members.contains_key(&request.member_id) => {
                Joiner::Existing(request.member_id.clone())
            }
            None => return Err(self.unknown(&request.member_id)),
        })
    }

    /// Refuses a join whose protocol type, or every protocol, the other
    /// members do not share.
    fn check_protocols(&self, request: &JoinRequest, joiner: &Joiner) -> Result<(), ClassicError> {
        let inconsistent = |reason: String| ClassicError::InconsistentGroupProtocol {
            group: self.id.clone(),
            member: request.member_id.clone(),
            client: request.client_id.clone(),
            reason,
        };
        if request.protocol_type.is_empty() || request.protocols.is_empty() {
            return Err(inconsistent(
                "it gave no protocol type or no protocols".to_owned(),
            ));
        }
        let myself = match joiner {
            Joiner::Existing(id) | Joiner::Replaces(id) => Some(id.as_str()),
            Joiner::New => None,
        };
        let others: Vec<&Member> = self
            .members
            .iter()
            .filter(|(id, _)| Some(id.as_str()) != myself)
            .map(|(_, m)| m)
            .collect();
        if others.is_empty() {
            return Ok(());
        }
        if request.protocol_type != self.protocol_type {
            return Err(inconsistent(format!(
                "it speaks protocol type {:?}, the group's members {:?}",
                request.protocol_type, self.protocol_type
            )));
        }
        let shared = request
            .protocols
            .iter()
            .any(|(name, _)| others.iter().all(|m| m.supports(name)));
        if !shared {
            let names: Vec<&str> = request.protocols.iter().map(|(n, _)| n.as_str()).collect();
            return Err(inconsistent(format!(
                "none of its protocols {names:?} is supported by every member of the group"
            )));
        }
        Ok(())
    }

    fn join(
        &mut self,
        request: JoinRequest,
        new_member_id: impl FnOnce(&str) -> String,
        initial_delay: Duration,
        now: Instant,
    ) -> Result<Pending<JoinOutcome>, ClassicError> {
        self.tick(now);
        let joiner = self.joiner(&request)?;
        self.check_protocols(&request, &joiner)?;
        // The same as the other members' (checked), or the only one's.
        self.protocol_type.clone_from(&request.protocol_type);
        self.emptied_at = None;
        self.join_seq += 1;
        let seq = self.join_seq;
        let (member_id, unchanged) = match joiner {
            Joiner::New => {
                let id = new_member_id(&request.client_id);
                tracing::info!(group = %self.id, member = %id, client = %request.client_id, "Kafka group member joined");
                let member = Member {
                    instance_id: request.group_instance_id.clone(),
                    client_id: request.client_id.clone(),
                    client_host: request.client_host.clone(),
                    session_timeout: request.session_timeout,
                    rebalance_timeout: request.rebalance_timeout,
                    protocol_type: request.protocol_type.clone(),
                    protocols: request.protocols.clone(),
                    topics: request.topics.clone(),
                    last_seen: now,
                    joined_seq: seq,
                    assignment: Bytes::new(),
                    assigned: BTreeSet::new(),
                    pending_join: None,
                    pending_sync: None,
                };
                self.members.insert(id.clone(), member);
                (id, false)
            }
            Joiner::Existing(id) => {
                let member = self.members.get_mut(&id).expect("present");
                let unchanged = member.protocol_type == request.protocol_type
                    && member.protocols == request.protocols;
                member.update(&request, seq, now);
                (id, unchanged)
            }
            Joiner::Replaces(old_id) => {
                let instance = request.group_instance_id.clone().unwrap_or_default();
                let mut member = self.members.remove(&old_id).expect("present");
                member.abort(|| ClassicError::FencedInstanceId {
                    group: self.id.clone(),
                    member: old_id.clone(),
                    instance: instance.clone(),
                });
                let id = new_member_id(&request.client_id);
                tracing::info!(group = %self.id, member = %id, replaced = %old_id, instance = %instance, "Kafka static group member joined again");
                if self.leader.as_deref() == Some(old_id.as_str()) {
                    self.leader = Some(id.clone());
                }
                self.fenced.retain(|_, fenced| *fenced != instance);
                self.fenced.insert(old_id, instance);
                let unchanged = member.protocol_type == request.protocol_type
                    && member.protocols == request.protocols;
                // It keeps its predecessor's assignment.
                member.update(&request, seq, now);
                self.members.insert(id.clone(), member);
                (id, unchanged)
            }
        };
        if self.state == ClassicState::Stable
            && unchanged
            && self.leader.as_deref() != Some(member_id.as_str())
        {
            // A follower with nothing new to say (a lost answer, a static
            // member's restart): the current generation stands.
            return Ok(answered(Ok(self.current_outcome(&member_id))));
        }
        if self.state != ClassicState::PreparingRebalance {
            self.start_rebalance(now, initial_delay);
        }
        let (tx, rx) = oneshot::channel();
        let member = self.members.get_mut(&member_id).expect("present");
        if let Some(earlier) = member.pending_join.replace(tx) {
            let _ = earlier.send(Err(ClassicError::RebalanceInProgress {
                group: self.id.clone(),
                member: member_id.clone(),
                state: self.state,
            }));
        }
        self.maybe_complete(now);
        Ok(rx)
    }

    fn sync(
        &mut self,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes, BTreeSet<TopicPartition>)>,
        now: Instant,
    ) -> Result<Pending<SyncOutcome>, ClassicError> {
        self.tick(now);
        self.member_at(member_id, generation)?.last_seen = now;
        match self.state {
            ClassicState::Empty | ClassicState::PreparingRebalance => {
                Err(self.rebalancing(member_id))
            }
            ClassicState::Stable => Ok(answered(Ok(self.sync_outcome(&self.members[member_id])))),
            ClassicState::CompletingRebalance => {
                let (tx, rx) = oneshot::channel();
                let member = self.members.get_mut(member_id).expect("present");
                if let Some(earlier) = member.pending_sync.replace(tx) {
                    let _ = earlier.send(Err(self.rebalancing(member_id)));
                }
                if self.leader.as_deref() == Some(member_id) {
                    self.assign(assignments, now);
                }
                Ok(rx)
            }
        }
    }

    /// The leader's sync: every member gets its assignment, the group is
    /// stable.
    fn assign(
        &mut self,
        assignments: Vec<(String, Bytes, BTreeSet<TopicPartition>)>,
        now: Instant,
    ) {
        let mut given: HashMap<String, (Bytes, BTreeSet<TopicPartition>)> = assignments
            .into_iter()
            .map(|(id, bytes, partitions)| (id, (bytes, partitions)))
            .collect();
        self.state = ClassicState::Stable;
        let outcome = SyncOutcome {
            protocol_type: self.protocol_type.clone(),
            protocol_name: self.protocol_name.clone().unwrap_or_default(),
            assignment: Bytes::new(),
        };
        for (id, member) in &mut self.members {
            (member.assignment, member.assigned) = given.remove(id).unwrap_or_default();
            if let Some(tx) = member.pending_sync.take() {
                member.last_seen = now;
                let _ = tx.send(Ok(SyncOutcome {
                    assignment: member.assignment.clone(),
                    ..outcome.clone()
                }));
            }
        }
        tracing::info!(group = %self.id, generation = self.generation, "Kafka group is stable");
    }

    fn heartbeat(
        &mut self,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), ClassicError> {
        self.tick(now);
        self.member_at(member_id, generation)?.last_seen = now;
        match self.state {
            ClassicState::Empty | ClassicState::PreparingRebalance => {
                Err(self.rebalancing(member_id))
            }
            ClassicState::CompletingRebalance | ClassicState::Stable => Ok(()),
        }
    }

    fn check_commit(
        &mut self,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), ClassicError> {
        self.tick(now);
        self.member_at(member_id, generation)?.last_seen = now;
        match self.state {
            ClassicState::CompletingRebalance => Err(self.rebalancing(member_id)),
            _ => Ok(()),
        }
    }

    fn leave(
        &mut self,
        leaving: Vec<(Option<String>, Option<String>)>,
        now: Instant,
    ) -> Vec<Result<String, ClassicError>> {
        self.tick(now);
        let mut results = Vec::with_capacity(leaving.len());
        for (member_id, instance) in leaving {
            let member_id = member_id.filter(|id| !id.is_empty());
            let found = match (member_id, instance) {
                (member_id, Some(instance)) => match self.member_of_instance(&instance) {
                    Some(current) if member_id.as_ref().is_none_or(|id| *id == current) => {
                        Ok(current)
                    }
                    Some(_) => Err(ClassicError::FencedInstanceId {
                        group: self.id.clone(),
                        member: member_id.unwrap_or_default(),
                        instance,
                    }),
                    None => Err(unknown_member(&self.id, &member_id.unwrap_or_default())),
                },
                (Some(id), None) if self.members.contains_key(&id) => Ok(id),
                (Some(id), None) => Err(self.unknown(&id)),
                (None, None) => Err(unknown_member(&self.id, "")),
            };
            if let Ok(id) = &found {
                tracing::info!(group = %self.id, member = %id, "Kafka group member left");
                self.remove(id);
            }
            results.push(found);
        }
        if results.iter().any(Result::is_ok) {
            self.shrank(now);
        }
        results
    }
}

/// Every classic group of the broker.
pub struct ClassicGroups {
    groups: Mutex<HashMap<String, Group>>,
    settings: GroupSettings,
    /// Random per process, so member ids are not reused across restarts.
    nonce: u64,
    next_member: AtomicU64,
}

impl ClassicGroups {
    pub(super) fn new(settings: GroupSettings) -> Self {
        let nonce = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
        ClassicGroups {
            groups: Mutex::new(HashMap::new()),
            settings,
            nonce,
            next_member: AtomicU64::new(0),
        }
    }

    /// `<client id>-<uuid-like>`, as Kafka names members.
    fn new_member_id(&self, client_id: &str) -> String {
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        let prefix = if client_id.is_empty() {
            "member"
        } else {
            client_id
        };
        let a = self.nonce;
        format!(
            "{prefix}-{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xffff,
            (n >> 48) & 0xffff,
            n & 0xffff_ffff_ffff
        )
    }

    /// Joins (or rejoins) a member. `sluice_members` is how many live
    /// members of Sluice's own protocol the group has: the coordinator's
    /// [`join_classic`](super::GroupCoordinator::join_classic) passes it
    /// under its lock, which is why this is not public.
    pub(super) fn join(
        &self,
        request: JoinRequest,
        sluice_members: usize,
        now: Instant,
    ) -> Pending<JoinOutcome> {
        let s = &self.settings;
        if !(s.min_session_timeout..=s.max_session_timeout).contains(&request.session_timeout) {
            return answered(Err(ClassicError::InvalidSessionTimeout {
                got: request.session_timeout,
                min: s.min_session_timeout,
                max: s.max_session_timeout,
            }));
        }
        if sluice_members > 0 {
            return answered(Err(ClassicError::OtherProtocol {
                group: request.group_id,
                members: sluice_members,
            }));
        }
        let group_id = request.group_id.clone();
        let mut groups = self.groups.lock();
        let group = groups
            .entry(group_id.clone())
            .or_insert_with(|| Group::new(&group_id, now));
        let result = group.join(
            request,
            |client| self.new_member_id(client),
            s.initial_rebalance_delay,
            now,
        );
        if group.is_blank() {
            groups.remove(&group_id);
        }
        result.unwrap_or_else(|e| answered(Err(e)))
    }

    fn with_group<T>(
        &self,
        group_id: &str,
        member_id: &str,
        f: impl FnOnce(&mut Group) -> Result<T, ClassicError>,
    ) -> Result<T, ClassicError> {
        let mut groups = self.groups.lock();
        let group = groups
            .get_mut(group_id)
            .ok_or_else(|| unknown_member(group_id, member_id))?;
        f(group)
    }

    /// A SyncGroup. `assignments` is the leader's (each member's assignment
    /// bytes, and the partitions the caller decoded from them); a
    /// follower's is ignored. Followers wait for the leader's sync.
    pub fn sync(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes, BTreeSet<TopicPartition>)>,
        now: Instant,
    ) -> Pending<SyncOutcome> {
        self.with_group(group_id, member_id, |g| {
            g.sync(member_id, generation, assignments, now)
        })
        .unwrap_or_else(|e| answered(Err(e)))
    }

    /// A Heartbeat: keeps the member's session; `RebalanceInProgress` tells
    /// it to join again.
    pub fn heartbeat(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), ClassicError> {
        self.with_group(group_id, member_id, |g| {
            g.heartbeat(member_id, generation, now)
        })
    }

    /// A LeaveGroup: `(member id, group instance id)` of each member that
    /// leaves (a static member may be named by its instance id alone).
    /// Returns, in order, the member id removed or why not. The remaining
    /// members rebalance.
    pub fn leave(
        &self,
        group_id: &str,
        members: Vec<(Option<String>, Option<String>)>,
        now: Instant,
    ) -> Vec<Result<String, ClassicError>> {
        let mut groups = self.groups.lock();
        match groups.get_mut(group_id) {
            Some(group) => group.leave(members, now),
            None => members
                .into_iter()
                .map(|(member, _)| Err(unknown_member(group_id, &member.unwrap_or_default())))
                .collect(),
        }
    }

    /// May this member commit offsets now? It must be in the group at its
    /// generation, and the group not waiting for the leader's assignment.
    /// A commit from outside the group (no member id, generation -1) does
    /// not come here: see
    /// [`commit_classic`](super::GroupCoordinator::commit_classic).
    pub fn check_commit(
        &self,
        group_id: &str,
        member_id: &str,
        generation: i32,
        now: Instant,
    ) -> Result<(), ClassicError> {
        self.with_group(group_id, member_id, |g| {
            g.check_commit(member_id, generation, now)
        })
    }

    /// Removes members whose session expired and completes rebalances that
    /// are due (deadline or initial delay passed). Returns how many members
    /// were removed.
    pub fn tick(&self, now: Instant) -> usize {
        let mut groups = self.groups.lock();
        groups.values_mut().map(|g| g.tick(now)).sum()
    }

    /// Live members of the group (after removing the expired).
    pub fn live_members(&self, group_id: &str, now: Instant) -> usize {
        let mut groups = self.groups.lock();
        groups.get_mut(group_id).map_or(0, |g| {
            g.tick(now);
            g.members.len()
        })
    }

    /// A DescribeGroups of one group.
    pub fn describe(&self, group_id: &str, now: Instant) -> ClassicDescription {
        let mut groups = self.groups.lock();
        let Some(group) = groups.get_mut(group_id) else {
            return ClassicDescription {
                state: "Dead",
                protocol_type: String::new(),
                protocol_name: String::new(),
                members: Vec::new(),
            };
        };
        group.tick(now);
        let stable = group.state == ClassicState::Stable;
        let protocol = group.protocol_name.clone().filter(|_| stable);
        ClassicDescription {
            state: group.state.as_str(),
            protocol_type: group.protocol_type.clone(),
            protocol_name: protocol.clone().unwrap_or_default(),
            members: group
                .members
                .iter()
                .map(|(id, m)| ClassicMemberDescription {
                    member_id: id.clone(),
                    group_instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: protocol
                        .as_deref()
                        .map(|p| m.metadata(p))
                        .unwrap_or_default(),
                    assignment: if stable {
                        m.assignment.clone()
                    } else {
                        Bytes::new()
                    },
                })
                .collect(),
        }
    }

    /// A ListGroups: every group with members.
    pub fn list(&self, now: Instant) -> Vec<ClassicListing> {
        let mut groups = self.groups.lock();
        let mut listed: Vec<ClassicListing> = groups
            .iter_mut()
            .filter_map(|(id, g)| {
                g.tick(now);
                (!g.members.is_empty()).then(|| ClassicListing {
                    group_id: id.clone(),
                    protocol_type: g.protocol_type.clone(),
                    state: g.state,
                })
            })
            .collect();
        listed.sort_by(|a, b| a.group_id.cmp(&b.group_id));
        listed
    }

    /// Groups with members, as last seen (no expiry).
    pub(super) fn groups_with_members(&self) -> Vec<String> {
        let groups = self.groups.lock();
        groups
            .iter()
            .filter(|(_, g)| !g.members.is_empty())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The members as Sluice's describe shows them, with the group's
    /// generation; `None` when it has none.
    pub(super) fn member_descriptions(
        &self,
        group_id: &str,
        now: Instant,
    ) -> Option<(u64, Vec<MemberDescription>)> {
        let mut groups = self.groups.lock();
        let group = groups.get_mut(group_id)?;
        group.tick(now);
        if group.members.is_empty() {
            return None;
        }
        let generation = u64::try_from(group.generation).unwrap_or(0);
        let members = group
            .members
            .iter()
            .map(|(id, m)| MemberDescription {
                member_id: id.clone(),
                instance_id: m.instance_id.clone(),
                topics: m.topics.clone(),
                member_epoch: generation,
                assigned: m.assigned.clone(),
                owned: m.assigned.clone(),
                since_heartbeat: now.saturating_duration_since(m.last_seen),
            })
            .collect();
        Some((generation, members))
    }

    /// When the group's last classic member left, if it did.
    pub(super) fn emptied_at(&self, group_id: &str) -> Option<Instant> {
        self.groups
            .lock()
            .get(group_id)
            .filter(|g| g.members.is_empty())
            .and_then(|g| g.emptied_at)
    }

    /// Forgets empty groups for which `keep` is false.
    pub(super) fn forget_empty(&self, keep: impl Fn(&str) -> bool) {
        self.groups
            .lock()
            .retain(|id, g| !g.members.is_empty() || keep(id));
    }

    /// Forgets the group if it has no members (its offsets were deleted).
    pub(super) fn forget_if_empty(&self, group_id: &str) {
        let mut groups = self.groups.lock();
        if groups.get(group_id).is_some_and(|g| g.members.is_empty()) {
            groups.remove(group_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SESSION: Duration = Duration::from_secs(10);
    const REBALANCE: Duration = Duration::from_secs(30);

    fn groups() -> ClassicGroups {
        ClassicGroups::new(GroupSettings::default())
    }

    fn request(member_id: &str, client: &str) -> JoinRequest {
        JoinRequest {
            group_id: "g".to_owned(),
            member_id: member_id.to_owned(),
            group_instance_id: None,
            session_timeout: SESSION,
            rebalance_timeout: REBALANCE,
            protocol_type: "consumer".to_owned(),
            protocols: vec![
                ("range".to_owned(), Bytes::from(format!("range:{client}"))),
                ("roundrobin".to_owned(), Bytes::from(format!("rr:{client}"))),
            ],
            client_id: client.to_owned(),
            client_host: "/127.0.0.1".to_owned(),
            topics: ["orders".to_owned()].into(),
        }
    }

    fn static_request(member_id: &str, client: &str, instance: &str) -> JoinRequest {
        JoinRequest {
            group_instance_id: Some(instance.to_owned()),
            ..request(member_id, client)
        }
    }

    /// The answer, which must be there already.
    fn ready<T: std::fmt::Debug>(rx: &mut Pending<T>) -> Result<T, ClassicError> {
        rx.try_recv().expect("answered")
    }

    fn waiting<T: std::fmt::Debug>(rx: &mut Pending<T>) {
        assert!(
            matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)),
            "expected no answer yet"
        );
    }

    fn assignment(member: &str, partitions: &[u32]) -> (String, Bytes, BTreeSet<TopicPartition>) {
        (
            member.to_owned(),
            Bytes::from(format!("assignment of {member}")),
            partitions
                .iter()
                .map(|&p| TopicPartition::new("orders", p))
                .collect(),
        )
    }

    /// One member, joined and synced: (member id, generation).
    fn stable_one(groups: &ClassicGroups, t0: Instant) -> String {
        let a = ready(&mut groups.join(request("", "a"), 0, t0)).unwrap();
        ready(&mut groups.sync(
            "g",
            &a.member_id,
            a.generation_id,
            vec![assignment(&a.member_id, &[0, 1])],
            t0,
        ))
        .unwrap();
        a.member_id
    }

    /// Two members, stable at generation 2: (leader, follower).
    fn stable_two(groups: &ClassicGroups, t0: Instant) -> (String, String) {
        let a = stable_one(groups, t0);
        let mut b = groups.join(request("", "b"), 0, t0);
        waiting(&mut b);
        let mut a_join = groups.join(request(&a, "a"), 0, t0);
        let b = ready(&mut b).unwrap();
        let a_joined = ready(&mut a_join).unwrap();
        assert_eq!(a_joined.leader_id, a);
        let mut b_sync = groups.sync("g", &b.member_id, 2, vec![], t0);
        waiting(&mut b_sync);
        ready(&mut groups.sync(
            "g",
            &a,
            2,
            vec![assignment(&a, &[0]), assignment(&b.member_id, &[1])],
            t0,
        ))
        .unwrap();
        ready(&mut b_sync).unwrap();
        (a, b.member_id)
    }

    #[test]
    fn one_member_joins_syncs_and_is_stable() {
        let groups = groups();
        let t0 = Instant::now();
        let mut join = groups.join(request("", "a"), 0, t0);
        let joined = ready(&mut join).unwrap();
        assert!(joined.member_id.starts_with("a-"), "{}", joined.member_id);
        assert_eq!(joined.generation_id, 1);
        assert_eq!(joined.leader_id, joined.member_id);
        assert_eq!(joined.protocol_type, "consumer");
        assert_eq!(joined.protocol_name, "range");
        assert_eq!(
            joined.members,
            [JoinedMember {
                member_id: joined.member_id.clone(),
                group_instance_id: None,
                metadata: Bytes::from("range:a"),
            }]
        );
        assert_eq!(groups.describe("g", t0).state, "CompletingRebalance");
        // In CompletingRebalance a heartbeat is fine, a commit is not.
        groups.heartbeat("g", &joined.member_id, 1, t0).unwrap();
        let synced = ready(&mut groups.sync(
            "g",
            &joined.member_id,
            1,
            vec![assignment(&joined.member_id, &[0, 1])],
            t0,
        ))
        .unwrap();
        assert_eq!(
            synced.assignment,
            Bytes::from(format!("assignment of {}", joined.member_id))
        );
        assert_eq!(synced.protocol_name, "range");
        let description = groups.describe("g", t0);
        assert_eq!(description.state, "Stable");
        assert_eq!(description.protocol_name, "range");
        assert_eq!(description.members[0].metadata, Bytes::from("range:a"));
        assert_eq!(description.members[0].assignment, synced.assignment);
        groups
            .heartbeat("g", &joined.member_id, 1, t0 + SESSION)
            .unwrap();
        // Its heartbeat kept it: still there a session later.
        assert_eq!(groups.live_members("g", t0 + SESSION * 2), 1);
        assert_eq!(
            groups.list(t0),
            [ClassicListing {
                group_id: "g".to_owned(),
                protocol_type: "consumer".to_owned(),
                state: ClassicState::Stable,
            }]
        );
    }

    #[test]
    fn a_second_member_makes_both_rejoin_into_generation_two() {
        let groups = groups();
        let t0 = Instant::now();
        let a = stable_one(&groups, t0);
        let mut b_join = groups.join(request("", "b"), 0, t0);
        waiting(&mut b_join);
        assert_eq!(groups.describe("g", t0).state, "PreparingRebalance");
        let err = groups.heartbeat("g", &a, 1, t0).unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
        let err = ready(&mut groups.sync("g", &a, 1, vec![], t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
        let mut a_join = groups.join(request(&a, "a"), 0, t0);
        let b = ready(&mut b_join).unwrap();
        let a_joined = ready(&mut a_join).unwrap();
        assert_eq!((a_joined.generation_id, b.generation_id), (2, 2));
        // The previous leader leads again and alone gets the members.
        assert_eq!(a_joined.leader_id, a);
        assert_eq!(b.leader_id, a);
        assert!(b.members.is_empty());
        let metadata: BTreeMap<String, Bytes> = a_joined
            .members
            .iter()
            .map(|m| (m.member_id.clone(), m.metadata.clone()))
            .collect();
        assert_eq!(
            metadata,
            BTreeMap::from([
                (a.clone(), Bytes::from("range:a")),
                (b.member_id.clone(), Bytes::from("range:b")),
            ])
        );
        // The old generation is gone.
        let err = groups.heartbeat("g", &a, 1, t0).unwrap_err();
        assert!(
            matches!(
                err,
                ClassicError::IllegalGeneration {
                    got: 1,
                    current: 2,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn the_leaders_assignment_reaches_the_follower() {
        let groups = groups();
        let t0 = Instant::now();
        let a = stable_one(&groups, t0);
        let mut b_join = groups.join(request("", "b"), 0, t0);
        ready(&mut groups.join(request(&a, "a"), 0, t0)).unwrap();
        let b = ready(&mut b_join).unwrap().member_id;
        // The follower's sync waits for the leader's; its own list counts
        // for nothing.
        let mut b_sync = groups.sync("g", &b, 2, vec![assignment(&b, &[0, 1, 2])], t0);
        waiting(&mut b_sync);
        assert_eq!(groups.describe("g", t0).state, "CompletingRebalance");
        let a_synced = ready(&mut groups.sync(
            "g",
            &a,
            2,
            vec![assignment(&a, &[0]), assignment(&b, &[1])],
            t0,
        ))
        .unwrap();
        assert_eq!(
            a_synced.assignment,
            Bytes::from(format!("assignment of {a}"))
        );
        let b_synced = ready(&mut b_sync).unwrap();
        assert_eq!(
            b_synced.assignment,
            Bytes::from(format!("assignment of {b}"))
        );
        // And a later sync in Stable is answered with it at once.
        let again = ready(&mut groups.sync("g", &b, 2, vec![], t0)).unwrap();
        assert_eq!(again.assignment, b_synced.assignment);
        let (_, members) = groups.member_descriptions("g", t0).unwrap();
        let b_described = members.iter().find(|m| m.member_id == b).unwrap();
        assert_eq!(
            b_described.assigned,
            [TopicPartition::new("orders", 1)].into()
        );
    }

    #[test]
    fn a_member_left_out_of_the_assignment_gets_an_empty_one() {
        let groups = groups();
        let t0 = Instant::now();
        let a = stable_one(&groups, t0);
        let mut b_join = groups.join(request("", "b"), 0, t0);
        ready(&mut groups.join(request(&a, "a"), 0, t0)).unwrap();
        let b = ready(&mut b_join).unwrap().member_id;
        let mut b_sync = groups.sync("g", &b, 2, vec![], t0);
        ready(&mut groups.sync("g", &a, 2, vec![assignment(&a, &[0, 1])], t0)).unwrap();
        assert!(ready(&mut b_sync).unwrap().assignment.is_empty());
    }

    #[test]
    fn a_member_that_misses_its_session_is_removed_and_the_survivor_rejoins_alone() {
        let groups = groups();
        let t0 = Instant::now();
        let (a, b) = stable_two(&groups, t0);
        let half = SESSION / 2;
        groups.heartbeat("g", &a, 2, t0 + half).unwrap();
        groups.heartbeat("g", &a, 2, t0 + half * 2).unwrap();
        // b never heartbeats: gone once its session passed.
        assert_eq!(groups.tick(t0 + SESSION + half), 1);
        assert_eq!(
            groups.describe("g", t0 + SESSION + half).state,
            "PreparingRebalance"
        );
        let err = groups
            .heartbeat("g", &b, 2, t0 + SESSION + half)
            .unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
        let err = groups
            .heartbeat("g", &a, 2, t0 + SESSION + half)
            .unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
        let joined = ready(&mut groups.join(request(&a, "a"), 0, t0 + SESSION + half)).unwrap();
        assert_eq!(joined.generation_id, 3);
        assert_eq!(joined.leader_id, a);
        assert_eq!(joined.members.len(), 1);
        assert_eq!(joined.members[0].member_id, a);
    }

    #[test]
    fn a_member_waiting_in_a_join_outlives_its_session() {
        let groups = groups();
        let t0 = Instant::now();
        let (a, b) = stable_two(&groups, t0);
        // a rejoins (waits for b); b heartbeats on, then rejoins just before
        // the deadline: a's wait is longer than its session and it stays.
        let mut a_join = groups.join(request(&a, "a"), 0, t0);
        for s in [5, 10, 15, 20, 25] {
            let now = t0 + Duration::from_secs(s);
            assert!(matches!(
                groups.heartbeat("g", &b, 2, now),
                Err(ClassicError::RebalanceInProgress { .. })
            ));
            assert_eq!(groups.tick(now), 0);
            waiting(&mut a_join);
        }
        ready(&mut groups.join(request(&b, "b"), 0, t0 + Duration::from_secs(28))).unwrap();
        let joined = ready(&mut a_join).unwrap();
        assert_eq!((joined.generation_id, joined.members.len()), (3, 2));
    }

    #[test]
    fn the_rebalance_deadline_removes_a_member_that_never_rejoined() {
        let groups = groups();
        let t0 = Instant::now();
        let (a, b) = stable_two(&groups, t0);
        let mut c_join = groups.join(request("", "c"), 0, t0);
        let mut a_join = groups.join(request(&a, "a"), 0, t0);
        // b keeps its session alive but never rejoins.
        for s in [5, 10, 15, 20, 25] {
            let now = t0 + Duration::from_secs(s);
            let err = groups.heartbeat("g", &b, 2, now).unwrap_err();
            assert!(
                matches!(err, ClassicError::RebalanceInProgress { .. }),
                "{err}"
            );
            groups.tick(now);
            waiting(&mut c_join);
            waiting(&mut a_join);
        }
        assert_eq!(groups.live_members("g", t0 + Duration::from_secs(29)), 3);
        groups.tick(t0 + REBALANCE);
        let c = ready(&mut c_join).unwrap();
        let a_joined = ready(&mut a_join).unwrap();
        assert_eq!(c.generation_id, 3);
        assert_eq!(a_joined.leader_id, a);
        let ids: BTreeSet<&str> = a_joined
            .members
            .iter()
            .map(|m| m.member_id.as_str())
            .collect();
        assert_eq!(ids, [a.as_str(), c.member_id.as_str()].into());
        let err = groups.heartbeat("g", &b, 2, t0 + REBALANCE).unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
    }

    #[test]
    fn a_new_leader_is_the_first_to_join_when_the_old_one_is_gone() {
        let groups = groups();
        let t0 = Instant::now();
        let (a, b) = stable_two(&groups, t0);
        let mut c_join = groups.join(request("", "c"), 0, t0);
        assert_eq!(
            groups.leave("g", vec![(Some(a.clone()), None)], t0)[0]
                .as_ref()
                .unwrap(),
            &a
        );
        let mut b_join = groups.join(request(&b, "b"), 0, t0);
        let c = ready(&mut c_join).unwrap();
        let b_joined = ready(&mut b_join).unwrap();
        assert_eq!(c.leader_id, c.member_id);
        assert_eq!(b_joined.leader_id, c.member_id);
        assert_eq!(c.members.len(), 2);
    }

    #[test]
    fn leave_removes_members_and_the_rest_rebalance() {
        let groups = groups();
        let t0 = Instant::now();
        let (a, b) = stable_two(&groups, t0);
        let results = groups.leave(
            "g",
            vec![(Some(b.clone()), None), (Some("nobody".to_owned()), None)],
            t0,
        );
        assert_eq!(results[0].as_ref().unwrap(), &b);
        assert!(matches!(
            results[1],
            Err(ClassicError::UnknownMemberId { .. })
        ));
        let err = groups.heartbeat("g", &a, 2, t0).unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
        let joined = ready(&mut groups.join(request(&a, "a"), 0, t0)).unwrap();
        assert_eq!((joined.generation_id, joined.members.len()), (3, 1));
        // A member waiting in a join that leaves gets UnknownMemberId there.
        let mut c_join = groups.join(request("", "c"), 0, t0);
        waiting(&mut c_join);
        let c = groups
            .describe("g", t0)
            .members
            .into_iter()
            .find(|m| m.client_id == "c")
            .unwrap()
            .member_id;
        groups.leave("g", vec![(Some(c), None)], t0)[0]
            .as_ref()
            .unwrap();
        let err = ready(&mut c_join).unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
        // The last one out leaves the group empty.
        groups.leave("g", vec![(Some(a.clone()), None)], t0)[0]
            .as_ref()
            .unwrap();
        assert_eq!(groups.describe("g", t0).state, "Empty");
        assert_eq!(groups.live_members("g", t0), 0);
        assert!(groups.list(t0).is_empty());
        assert_eq!(groups.emptied_at("g"), Some(t0));
        assert_eq!(groups.describe("nothing", t0).state, "Dead");
    }

    #[test]
    fn a_static_member_rejoining_replaces_and_fences_the_old_id() {
        let groups = groups();
        let t0 = Instant::now();
        let a = ready(&mut groups.join(static_request("", "a", "i-a"), 0, t0)).unwrap();
        let mut b_join = groups.join(static_request("", "b", "i-b"), 0, t0);
        ready(&mut groups.join(static_request(&a.member_id, "a", "i-a"), 0, t0)).unwrap();
        let b = ready(&mut b_join).unwrap();
        let a = a.member_id;
        let mut b_sync = groups.sync("g", &b.member_id, 2, vec![], t0);
        ready(&mut groups.sync(
            "g",
            &a,
            2,
            vec![assignment(&a, &[0]), assignment(&b.member_id, &[1])],
            t0,
        ))
        .unwrap();
        ready(&mut b_sync).unwrap();
        // b restarts: a new member id, the same instance, the same
        // metadata; it takes the old one's place without a rebalance.
        let b2 = ready(&mut groups.join(static_request("", "b", "i-b"), 0, t0)).unwrap();
        assert_ne!(b2.member_id, b.member_id);
        assert_eq!((b2.generation_id, b2.leader_id.as_str()), (2, a.as_str()));
        assert_eq!(groups.describe("g", t0).state, "Stable");
        let synced = ready(&mut groups.sync("g", &b2.member_id, 2, vec![], t0)).unwrap();
        assert_eq!(
            synced.assignment,
            Bytes::from(format!("assignment of {}", b.member_id))
        );
        groups.heartbeat("g", &b2.member_id, 2, t0).unwrap();
        // The old id is fenced, wherever it shows up.
        let err = groups.heartbeat("g", &b.member_id, 2, t0).unwrap_err();
        assert!(
            matches!(err, ClassicError::FencedInstanceId { .. }),
            "{err}"
        );
        let err = groups.check_commit("g", &b.member_id, 2, t0).unwrap_err();
        assert!(
            matches!(err, ClassicError::FencedInstanceId { .. }),
            "{err}"
        );
        let err =
            ready(&mut groups.join(static_request(&b.member_id, "b", "i-b"), 0, t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::FencedInstanceId { .. }),
            "{err}"
        );
        let left = groups.leave(
            "g",
            vec![(Some(b.member_id.clone()), Some("i-b".to_owned()))],
            t0,
        );
        assert!(matches!(
            left[0],
            Err(ClassicError::FencedInstanceId { .. })
        ));
        assert_eq!(groups.live_members("g", t0), 2);
        // The leader's restart rebalances, and it leads on under its new id.
        let mut a2_join = groups.join(static_request("", "a", "i-a"), 0, t0);
        waiting(&mut a2_join);
        ready(&mut groups.join(static_request(&b2.member_id, "b", "i-b"), 0, t0)).unwrap();
        let a2 = ready(&mut a2_join).unwrap();
        assert_eq!(
            (a2.generation_id, a2.leader_id.clone()),
            (3, a2.member_id.clone())
        );
        let err = groups.heartbeat("g", &a, 3, t0).unwrap_err();
        assert!(
            matches!(err, ClassicError::FencedInstanceId { .. }),
            "{err}"
        );
        // Leaving by instance id alone.
        let left = groups.leave("g", vec![(None, Some("i-b".to_owned()))], t0);
        assert_eq!(left[0].as_ref().unwrap(), &b2.member_id);
    }

    #[test]
    fn a_follower_rejoining_unchanged_while_stable_keeps_the_generation() {
        let groups = groups();
        let t0 = Instant::now();
        let (a, b) = stable_two(&groups, t0);
        let again = ready(&mut groups.join(request(&b, "b"), 0, t0)).unwrap();
        assert_eq!(
            (again.generation_id, again.leader_id.as_str()),
            (2, a.as_str())
        );
        assert_eq!(groups.describe("g", t0).state, "Stable");
        // With new metadata it rebalances.
        let mut changed = request(&b, "b");
        changed.protocols.pop();
        let mut b_join = groups.join(changed, 0, t0);
        waiting(&mut b_join);
        assert_eq!(groups.describe("g", t0).state, "PreparingRebalance");
    }

    #[test]
    fn commits_need_the_current_generation_outside_completing_rebalance() {
        let groups = groups();
        let t0 = Instant::now();
        let a = ready(&mut groups.join(request("", "a"), 0, t0))
            .unwrap()
            .member_id;
        let err = groups.check_commit("g", &a, 1, t0).unwrap_err();
        assert!(
            matches!(
                err,
                ClassicError::RebalanceInProgress {
                    state: ClassicState::CompletingRebalance,
                    ..
                }
            ),
            "{err}"
        );
        ready(&mut groups.sync("g", &a, 1, vec![], t0)).unwrap();
        groups.check_commit("g", &a, 1, t0).unwrap();
        let err = groups.check_commit("g", &a, 0, t0).unwrap_err();
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
        let err = groups.check_commit("g", "nobody", 1, t0).unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
        let err = groups.check_commit("other", &a, 1, t0).unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
        // While preparing, the members of the current generation still
        // commit (what they release before rejoining).
        let mut b_join = groups.join(request("", "b"), 0, t0);
        waiting(&mut b_join);
        groups.check_commit("g", &a, 1, t0).unwrap();
        // A commit counts as a sign of life.
        groups.check_commit("g", &a, 1, t0 + SESSION).unwrap();
        let err = groups.heartbeat("g", &a, 1, t0 + SESSION * 2).unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
    }

    #[test]
    fn joins_are_refused_with_the_kafka_condition() {
        let groups = groups();
        let t0 = Instant::now();
        let too_short = JoinRequest {
            session_timeout: Duration::from_millis(1),
            ..request("", "a")
        };
        let err = ready(&mut groups.join(too_short, 0, t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::InvalidSessionTimeout { .. }),
            "{err}"
        );
        let err = ready(&mut groups.join(request("", "a"), 2, t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::OtherProtocol { members: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("2 live Sluice-protocol member(s)"),
            "{err}"
        );
        let err = ready(&mut groups.join(request("made-up", "a"), 0, t0)).unwrap_err();
        assert!(matches!(err, ClassicError::UnknownMemberId { .. }), "{err}");
        // A refused join leaves nothing behind.
        assert_eq!(groups.describe("g", t0).state, "Dead");
        stable_one(&groups, t0);
        let connect = JoinRequest {
            protocol_type: "connect".to_owned(),
            ..request("", "b")
        };
        let err = ready(&mut groups.join(connect, 0, t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::InconsistentGroupProtocol { .. }),
            "{err}"
        );
        let sticky = JoinRequest {
            protocols: vec![("sticky".to_owned(), Bytes::new())],
            ..request("", "b")
        };
        let err = ready(&mut groups.join(sticky, 0, t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::InconsistentGroupProtocol { .. }),
            "{err}"
        );
        let none = JoinRequest {
            protocols: vec![],
            ..request("", "b")
        };
        let err = ready(&mut groups.join(none, 0, t0)).unwrap_err();
        assert!(
            matches!(err, ClassicError::InconsistentGroupProtocol { .. }),
            "{err}"
        );
        assert_eq!(groups.live_members("g", t0), 1);
        assert_eq!(groups.describe("g", t0).state, "Stable");
    }

    #[test]
    fn the_protocol_is_the_leaders_first_that_every_member_supports() {
        let groups = groups();
        let t0 = Instant::now();
        let a = stable_one(&groups, t0);
        let b_request = JoinRequest {
            protocols: vec![
                ("sticky".to_owned(), Bytes::new()),
                ("roundrobin".to_owned(), Bytes::from("rr:b")),
            ],
            ..request("", "b")
        };
        let mut b_join = groups.join(b_request, 0, t0);
        let a_joined = ready(&mut groups.join(request(&a, "a"), 0, t0)).unwrap();
        assert_eq!(a_joined.protocol_name, "roundrobin");
        assert_eq!(ready(&mut b_join).unwrap().protocol_name, "roundrobin");
        let metadata: BTreeSet<Bytes> = a_joined
            .members
            .iter()
            .map(|m| m.metadata.clone())
            .collect();
        assert_eq!(metadata, [Bytes::from("rr:a"), Bytes::from("rr:b")].into());
    }

    #[test]
    fn the_initial_delay_holds_the_first_rebalance() {
        let groups = ClassicGroups::new(GroupSettings {
            initial_rebalance_delay: Duration::from_secs(3),
            ..GroupSettings::default()
        });
        let t0 = Instant::now();
        let mut a_join = groups.join(request("", "a"), 0, t0);
        let mut b_join = groups.join(request("", "b"), 0, t0 + Duration::from_secs(1));
        groups.tick(t0 + Duration::from_secs(2));
        waiting(&mut a_join);
        waiting(&mut b_join);
        groups.tick(t0 + Duration::from_secs(3));
        let a = ready(&mut a_join).unwrap();
        let b = ready(&mut b_join).unwrap();
        assert_eq!((a.generation_id, b.generation_id), (1, 1));
        assert_eq!(a.leader_id, a.member_id);
        assert_eq!(a.members.len(), 2);
        // Only out of Empty: a later rebalance completes as soon as all
        // joined.
        let mut c_join = groups.join(request("", "c"), 0, t0 + Duration::from_secs(4));
        groups.join(request(&a.member_id, "a"), 0, t0 + Duration::from_secs(4));
        ready(&mut groups.join(request(&b.member_id, "b"), 0, t0 + Duration::from_secs(4)))
            .unwrap();
        assert_eq!(ready(&mut c_join).unwrap().generation_id, 2);
    }

    #[test]
    fn a_rebalance_answers_syncs_still_waiting() {
        let groups = groups();
        let t0 = Instant::now();
        let a = stable_one(&groups, t0);
        let mut b_join = groups.join(request("", "b"), 0, t0);
        ready(&mut groups.join(request(&a, "a"), 0, t0)).unwrap();
        let b = ready(&mut b_join).unwrap().member_id;
        let mut b_sync = groups.sync("g", &b, 2, vec![], t0);
        waiting(&mut b_sync);
        // The leader never syncs and misses its session (b, waiting, does
        // not): b's sync is told to rejoin.
        groups.tick(t0 + SESSION + Duration::from_secs(1));
        let err = ready(&mut b_sync).unwrap_err();
        assert!(
            matches!(err, ClassicError::RebalanceInProgress { .. }),
            "{err}"
        );
        let joined =
            ready(&mut groups.join(request(&b, "b"), 0, t0 + SESSION + Duration::from_secs(1)))
                .unwrap();
        assert_eq!((joined.generation_id, joined.leader_id), (3, b));
    }
}
