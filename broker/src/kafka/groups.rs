//! The classic group APIs: FindCoordinator's groups (in `admin.rs`),
//! JoinGroup, SyncGroup, Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch,
//! ListGroups and DescribeGroups.
//!
//! Membership and generations are [`crate::groups::ClassicGroups`]'s; this
//! file only decodes and encodes. For the "consumer" protocol it also reads
//! the subscription and assignment bytes (Kafka's ConsumerProtocol
//! messages), so that `sluice group describe` shows a Kafka member's topics
//! and partitions; the bytes themselves pass through untouched, as the
//! leader wrote them.
//!
//! Offsets go into the same store as Sluice's own groups, bound to the
//! topic's incarnation: a Kafka group's lag shows in `sluice group
//! describe`, and `sluice group reset-offsets` applies to it while it has
//! no live members.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponsePartition, OffsetFetchResponseTopic,
};
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, DescribeGroupsRequest,
    DescribeGroupsResponse, GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest,
    JoinGroupResponse, LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, RequestHeader, SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::{Decodable, StrBytes};

use super::errors::{Failure, KafkaCode};
use super::{Context, partition_of};
use crate::auth::{Operation, Resource};
use crate::groups::{ClassicError, GroupCoordinator, JoinRequest, Pending, TopicPartition};

/// The protocol type of Kafka's consumers, whose metadata this file reads.
const CONSUMER_PROTOCOL: &str = "consumer";
/// The newest ConsumerProtocol version the codec reads; a newer one is
/// read as this (its new fields are ignored, as Kafka does).
const CONSUMER_PROTOCOL_MAX: i16 = 3;

impl From<ClassicError> for Failure {
    fn from(error: ClassicError) -> Self {
        let code = match &error {
            ClassicError::UnknownMemberId { .. } => KafkaCode::UnknownMemberId,
            ClassicError::IllegalGeneration { .. } => KafkaCode::IllegalGeneration,
            ClassicError::RebalanceInProgress { .. } => KafkaCode::RebalanceInProgress,
            ClassicError::InconsistentGroupProtocol { .. } | ClassicError::OtherProtocol { .. } => {
                KafkaCode::InconsistentGroupProtocol
            }
            ClassicError::InvalidSessionTimeout { .. } => KafkaCode::InvalidSessionTimeout,
            ClassicError::FencedInstanceId { .. } => KafkaCode::FencedInstanceId,
            ClassicError::Group(_) => {
                let ClassicError::Group(e) = error else {
                    unreachable!()
                };
                return Failure::from(e);
            }
        };
        Failure::new(code, error.to_string())
    }
}

/// Whether `group` has live members of Sluice's own protocol.
fn has_sluice_members(groups: &GroupCoordinator, group: &str, now: Instant) -> bool {
    groups.has_live_members(group, now) && groups.classic().live_members(group, now) == 0
}

fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

/// The checks every group request starts with: a valid group id (the
/// rule gRPC's groups follow) and `operation` allowed on it.
fn check_group(context: &Context, group: &str, operation: Operation) -> Result<(), Failure> {
    if let Some(reason) = crate::topics::name_rule_violation(group) {
        return Err(Failure::new(
            KafkaCode::InvalidGroupId,
            format!("invalid group id {group:?}: {reason}"),
        ));
    }
    if !context.allowed(operation, Resource::group(group)) {
        return Err(Failure::new(
            KafkaCode::GroupAuthorizationFailed,
            format!("group {group:?}: not allowed"),
        ));
    }
    Ok(())
}

/// Logs a refusal the answer cannot carry a message for.
fn refused(api: &str, group: &str, failure: &Failure) -> i16 {
    tracing::info!(api, group, code = ?failure.code, message = %failure.message, "Kafka group request refused");
    failure.code.code()
}

/// Waits for a pending join or sync, or the broker's shutdown.
async fn wait<T>(context: &Context, pending: Pending<T>) -> Result<T, Failure> {
    let mut stopping = context.shutdown.clone();
    let stopped = || {
        Failure::new(
            KafkaCode::CoordinatorNotAvailable,
            "the broker is shutting down",
        )
    };
    tokio::select! {
        outcome = pending => match outcome {
            Ok(result) => result.map_err(Failure::from),
            Err(_) => Err(stopped()),
        },
        _ = stopping.wait_for(|stop| *stop) => Err(stopped()),
    }
}

/// A versioned ConsumerProtocol message: its version, then its body.
fn decode_consumer_protocol<T: Decodable>(bytes: &Bytes) -> Option<T> {
    let mut buf = bytes.clone();
    if buf.remaining() < 2 {
        return None;
    }
    let version = buf.get_i16().clamp(0, CONSUMER_PROTOCOL_MAX);
    T::decode(&mut buf, version).ok()
}

fn partitions_of(assignment: &Bytes) -> BTreeSet<TopicPartition> {
    decode_consumer_protocol::<ConsumerProtocolAssignment>(assignment)
        .map(|a| {
            a.assigned_partitions
                .into_iter()
                .flat_map(|tp| {
                    let topic = tp.topic.0.to_string();
                    tp.partitions.into_iter().filter_map(move |p| {
                        u32::try_from(p).ok().map(|partition| TopicPartition {
                            topic: topic.clone(),
                            partition,
                        })
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(super) async fn join_group(
    context: &Arc<Context>,
    request: JoinGroupRequest,
    header: &RequestHeader,
    peer: SocketAddr,
) -> JoinGroupResponse {
    let version = header.request_api_version;
    let group = request.group_id.0.to_string();
    let mut response = JoinGroupResponse::default();
    response.generation_id = -1;
    response.protocol_name = Some(StrBytes::default());
    response.member_id = request.member_id.clone();
    if let Err(failure) = check_group(context, &group, Operation::Read) {
        response.error_code = refused("JoinGroup", &group, &failure);
        return response;
    }
    let protocol_type = request.protocol_type.to_string();
    let topics: BTreeSet<String> = if protocol_type == CONSUMER_PROTOCOL {
        request
            .protocols
            .first()
            .and_then(|p| decode_consumer_protocol::<ConsumerProtocolSubscription>(&p.metadata))
            .map(|s| s.topics.into_iter().map(|t| t.to_string()).collect())
            .unwrap_or_default()
    } else {
        BTreeSet::new()
    };
    let ms = |ms: i32| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    let session_timeout = ms(request.session_timeout_ms);
    let join = JoinRequest {
        group_id: group.clone(),
        member_id: request.member_id.to_string(),
        group_instance_id: request.group_instance_id.map(|i| i.to_string()),
        session_timeout,
        // Version 0 has no rebalance timeout: the session timeout serves.
        rebalance_timeout: if version == 0 {
            session_timeout
        } else {
            ms(request.rebalance_timeout_ms)
        },
        protocol_type: protocol_type.clone(),
        protocols: request
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        client_id: header
            .client_id
            .as_ref()
            .map_or_else(String::new, |c| c.to_string()),
        client_host: format!("/{}", peer.ip()),
        topics,
    };
    let pending = context.state.groups.join_classic(join, Instant::now());
    match wait(context, pending).await {
        Ok(joined) => {
            response.generation_id = joined.generation_id;
            if version >= 7 {
                response.protocol_type = Some(str_bytes(joined.protocol_type));
            }
            response.protocol_name = Some(str_bytes(joined.protocol_name));
            response.leader = str_bytes(joined.leader_id);
            response.member_id = str_bytes(joined.member_id);
            response.members = joined
                .members
                .into_iter()
                .map(|m| {
                    let mut member = JoinGroupResponseMember::default();
                    member.member_id = str_bytes(m.member_id);
                    if version >= 5 {
                        member.group_instance_id = m.group_instance_id.map(str_bytes);
                    }
                    member.metadata = m.metadata;
                    member
                })
                .collect();
        }
        Err(failure) => response.error_code = refused("JoinGroup", &group, &failure),
    }
    response
}

pub(super) async fn sync_group(
    context: &Arc<Context>,
    request: SyncGroupRequest,
    version: i16,
) -> SyncGroupResponse {
    let group = request.group_id.0.to_string();
    let mut response = SyncGroupResponse::default();
    if let Err(failure) = check_group(context, &group, Operation::Read) {
        response.error_code = refused("SyncGroup", &group, &failure);
        return response;
    }
    let consumer = request
        .protocol_type
        .as_ref()
        .is_none_or(|t| t.as_str() == CONSUMER_PROTOCOL);
    let assignments = request
        .assignments
        .into_iter()
        .map(|a| {
            let partitions = if consumer {
                partitions_of(&a.assignment)
            } else {
                BTreeSet::new()
            };
            (a.member_id.to_string(), a.assignment, partitions)
        })
        .collect();
    let pending = context.state.groups.classic().sync(
        &group,
        &request.member_id,
        request.generation_id,
        assignments,
        Instant::now(),
    );
    match wait(context, pending).await {
        Ok(synced) => {
            if version >= 5 {
                response.protocol_type = Some(str_bytes(synced.protocol_type));
                response.protocol_name = Some(str_bytes(synced.protocol_name));
            }
            response.assignment = synced.assignment;
        }
        Err(failure) => response.error_code = refused("SyncGroup", &group, &failure),
    }
    response
}

pub(super) fn heartbeat(context: &Context, request: HeartbeatRequest) -> HeartbeatResponse {
    let group = request.group_id.0.to_string();
    let mut response = HeartbeatResponse::default();
    let result = check_group(context, &group, Operation::Read).and_then(|()| {
        context
            .state
            .groups
            .classic()
            .heartbeat(
                &group,
                &request.member_id,
                request.generation_id,
                Instant::now(),
            )
            .map_err(Failure::from)
    });
    if let Err(failure) = result {
        // Rebalances are routine: the member joins again.
        if failure.code == KafkaCode::RebalanceInProgress {
            response.error_code = failure.code.code();
        } else {
            response.error_code = refused("Heartbeat", &group, &failure);
        }
    }
    response
}

pub(super) fn leave_group(
    context: &Context,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let group = request.group_id.0.to_string();
    let mut response = LeaveGroupResponse::default();
    if let Err(failure) = check_group(context, &group, Operation::Read) {
        response.error_code = refused("LeaveGroup", &group, &failure);
        return response;
    }
    // Up to version 2 one member leaves; from 3 a batch, each answered.
    let leaving: Vec<(Option<String>, Option<String>)> = if version <= 2 {
        vec![(Some(request.member_id.to_string()), None)]
    } else {
        request
            .members
            .iter()
            .map(|m| {
                let id = Some(m.member_id.to_string()).filter(|id| !id.is_empty());
                (id, m.group_instance_id.as_ref().map(|i| i.to_string()))
            })
            .collect()
    };
    let results = context
        .state
        .groups
        .classic()
        .leave(&group, leaving, Instant::now());
    if version <= 2 {
        if let Some(Err(e)) = results.into_iter().next() {
            response.error_code = refused("LeaveGroup", &group, &Failure::from(e));
        }
        return response;
    }
    for (member, result) in request.members.into_iter().zip(results) {
        let mut answer = MemberResponse::default();
        answer.member_id = member.member_id;
        answer.group_instance_id = member.group_instance_id;
        if let Err(e) = result {
            answer.error_code = refused("LeaveGroup", &group, &Failure::from(e));
        }
        response.members.push(answer);
    }
    response
}

pub(super) async fn offset_commit(
    context: &Arc<Context>,
    request: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let context = Arc::clone(context);
    let task = tokio::task::spawn_blocking(move || commit(&context, request));
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a Kafka OffsetCommit task failed");
        OffsetCommitResponse::default()
    })
}

/// Each partition of a topic in an OffsetCommit: its index, and the
/// partition to commit or why not.
type PartitionAnswers = Vec<(i32, Result<TopicPartition, Failure>)>;

fn commit(context: &Context, request: OffsetCommitRequest) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let group_check = check_group(context, &group, Operation::Read);
    // Each partition's own refusal, or its offset to commit.
    let mut answers: Vec<(TopicName, PartitionAnswers)> = Vec::new();
    let mut offsets = Vec::new();
    for topic in request.topics {
        let name = topic.name.0.to_string();
        let topic_check = group_check
            .clone()
            .and_then(|()| context.topic(Operation::Read, &name));
        let mut partitions = Vec::new();
        for p in topic.partitions {
            let result = topic_check.clone().and_then(|t| {
                let partition = partition_of(&t, p.partition_index)?.index;
                let offset = u64::try_from(p.committed_offset).map_err(|_| {
                    Failure::new(
                        KafkaCode::InvalidCommitOffsetSize,
                        format!("offset {} is negative", p.committed_offset),
                    )
                })?;
                let tp = TopicPartition {
                    topic: name.clone(),
                    partition,
                };
                let metadata = p
                    .committed_metadata
                    .as_ref()
                    .map_or_else(String::new, |m| m.to_string());
                offsets.push((tp.clone(), offset, metadata));
                Ok(tp)
            });
            partitions.push((p.partition_index, result));
        }
        answers.push((topic.name, partitions));
    }
    let committed = if offsets.is_empty() {
        Ok(())
    } else {
        context
            .state
            .groups
            .commit_classic(
                &group,
                &request.member_id,
                request.generation_id_or_member_epoch,
                offsets,
                Instant::now(),
                crate::state::now_ms(),
            )
            .map_err(Failure::from)
    };
    if let Err(failure) = &committed {
        refused("OffsetCommit", &group, failure);
    }
    let mut response = OffsetCommitResponse::default();
    for (name, partitions) in answers {
        let mut topic = OffsetCommitResponseTopic::default();
        topic.name = name;
        for (index, result) in partitions {
            let mut partition = OffsetCommitResponsePartition::default();
            partition.partition_index = index;
            partition.error_code = match (&result, &committed) {
                (Err(failure), _) | (Ok(_), Err(failure)) => failure.code.code(),
                (Ok(_), Ok(())) => 0,
            };
            topic.partitions.push(partition);
        }
        response.topics.push(topic);
    }
    response
}

pub(super) fn offset_fetch(
    context: &Context,
    request: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let mut response = OffsetFetchResponse::default();
    if let Err(failure) = check_group(context, &group, Operation::Describe) {
        let code = refused("OffsetFetch", &group, &failure);
        if version >= 2 {
            response.error_code = code;
        }
        return response;
    }
    let committed = context.state.groups.fetch_offsets(&group);
    // Null topics (version 2 and later): every committed offset.
    let asked: Vec<(String, Vec<i32>)> = match request.topics {
        Some(topics) => topics
            .into_iter()
            .map(|t| (t.name.0.to_string(), t.partition_indexes))
            .collect(),
        None => {
            let mut all: Vec<(String, Vec<i32>)> = Vec::new();
            for tp in committed.keys() {
                match all.last_mut() {
                    Some((topic, partitions)) if *topic == tp.topic => {
                        partitions.push(tp.partition as i32)
                    }
                    _ => all.push((tp.topic.clone(), vec![tp.partition as i32])),
                }
            }
            all
        }
    };
    for (name, partitions) in asked {
        let allowed = context.allowed(Operation::Describe, Resource::topic(&name));
        let mut topic = OffsetFetchResponseTopic::default();
        topic.name = TopicName(str_bytes(name.clone()));
        for index in partitions {
            let mut partition = OffsetFetchResponsePartition::default();
            partition.partition_index = index;
            partition.committed_offset = -1;
            partition.metadata = Some(StrBytes::default());
            if !allowed {
                partition.error_code = KafkaCode::TopicAuthorizationFailed.code();
            } else if let Some(c) = u32::try_from(index).ok().and_then(|p| {
                committed.get(&TopicPartition {
                    topic: name.clone(),
                    partition: p,
                })
            }) {
                partition.committed_offset = c.offset as i64;
                partition.metadata = Some(str_bytes(c.metadata.clone()));
            }
            topic.partitions.push(partition);
        }
        response.topics.push(topic);
    }
    response
}

pub(super) fn list_groups(context: &Context, request: ListGroupsRequest) -> ListGroupsResponse {
    let now = Instant::now();
    let groups = &context.state.groups;
    let classic: std::collections::BTreeMap<String, (String, &'static str)> = groups
        .classic()
        .list(now)
        .into_iter()
        .map(|g| (g.group_id, (g.protocol_type, g.state.as_str())))
        .collect();
    let mut response = ListGroupsResponse::default();
    for group in groups.list() {
        if !context.allowed(Operation::Describe, Resource::group(&group)) {
            continue;
        }
        // A group with offsets and no classic members is Empty to Kafka's
        // tools; one with Sluice members says so in its protocol type.
        let (protocol_type, state) = match classic.get(&group) {
            Some((protocol_type, state)) => (protocol_type.clone(), *state),
            None if has_sluice_members(groups, &group, now) => ("sluice".to_owned(), "Stable"),
            None => (String::new(), "Empty"),
        };
        if !request.states_filter.is_empty()
            && !request
                .states_filter
                .iter()
                .any(|s| s.as_str().eq_ignore_ascii_case(state))
        {
            continue;
        }
        let mut listed = ListedGroup::default();
        listed.group_id = GroupId(str_bytes(group));
        listed.protocol_type = str_bytes(protocol_type);
        listed.group_state = str_bytes(state);
        response.groups.push(listed);
    }
    response
}

pub(super) fn describe_groups(
    context: &Context,
    request: DescribeGroupsRequest,
    version: i16,
) -> DescribeGroupsResponse {
    let now = Instant::now();
    let groups = &context.state.groups;
    let known: BTreeSet<String> = groups.list().into_iter().collect();
    let mut response = DescribeGroupsResponse::default();
    for group_id in request.groups {
        let group = group_id.0.to_string();
        let mut described = DescribedGroup::default();
        described.group_id = group_id;
        if let Err(failure) = check_group(context, &group, Operation::Describe) {
            described.error_code = refused("DescribeGroups", &group, &failure);
            response.groups.push(described);
            continue;
        }
        let classic = groups.classic().describe(&group, now);
        // A group Kafka's protocol does not know may be a Sluice group
        // with members, or one with offsets only: as ListGroups says.
        let (state, protocol_type) = match classic.state {
            "Dead" if has_sluice_members(groups, &group, now) => ("Stable", "sluice".to_owned()),
            "Dead" if known.contains(&group) => ("Empty", classic.protocol_type),
            state => (state, classic.protocol_type),
        };
        described.group_state = str_bytes(state);
        described.protocol_type = str_bytes(protocol_type);
        described.protocol_data = str_bytes(classic.protocol_name);
        if request.include_authorized_operations && version >= 3 {
            described.authorized_operations = super::admin::authorized_operations(
                context,
                super::admin::GROUP_OPERATIONS,
                Resource::group(&group),
            );
        }
        described.members = classic
            .members
            .into_iter()
            .map(|m| {
                let mut member = DescribedGroupMember::default();
                member.member_id = str_bytes(m.member_id);
                member.group_instance_id = m.group_instance_id.map(str_bytes);
                member.client_id = str_bytes(m.client_id);
                member.client_host = str_bytes(m.client_host);
                member.member_metadata = m.metadata;
                member.member_assignment = m.assignment;
                member
            })
            .collect();
        response.groups.push(described);
    }
    response
}
