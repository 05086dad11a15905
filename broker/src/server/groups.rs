//! `GroupService`: consumer group membership, commits, lag and resets.
//!
//! Requests are checked here (names, topics and partitions that exist,
//! offsets within the log) before they reach the [`GroupCoordinator`],
//! which trusts them. Lag is computed here from the coordinator's offsets
//! and the partitions' logs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_proto::v1::{self, group_service_server::GroupService};
use tonic::{Request, Response, Status};

use super::auth::Access;
use super::convert::now_ms;
use super::shared::{check_group_id, check_member_id};
use super::{blocking, status};
use crate::auth::{Operation, Principal, Resource};
use crate::dlq::RetrySets;
use crate::groups::{GroupCoordinator, GroupDescription, GroupError, TopicPartition};
use crate::topics::TopicRegistry;

const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_METADATA_BYTES: usize = 4096;
const MAX_INSTANCE_ID_BYTES: usize = 249;

pub(crate) struct Groups {
    pub(crate) access: Access,
    pub(crate) topics: Arc<TopicRegistry>,
    pub(crate) groups: Arc<GroupCoordinator>,
    pub(crate) retries: Arc<RetrySets>,
}

fn partition_sets(partitions: &BTreeSet<TopicPartition>) -> Vec<v1::TopicPartitions> {
    v1::TopicPartitions::group(
        partitions
            .iter()
            .map(|tp| (tp.topic.as_str(), tp.partition)),
    )
}

fn from_partition_sets(sets: Vec<v1::TopicPartitions>) -> BTreeSet<TopicPartition> {
    v1::TopicPartitions::flatten(sets)
        .map(|(topic, partition)| TopicPartition { topic, partition })
        .collect()
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A group as `DescribeGroup` answers: members, and every partition its
/// members read or it has an offset for, with lag. Blocking (reads logs).
fn describe_with_lag(
    topics: &TopicRegistry,
    retries: &RetrySets,
    description: GroupDescription,
) -> v1::DescribeGroupResponse {
    let now = now_ms();
    let mut partitions: BTreeSet<TopicPartition> = description.offsets.keys().cloned().collect();
    let mut owners: BTreeMap<&TopicPartition, &str> = BTreeMap::new();
    for member in &description.members {
        for topic in &member.topics {
            if let Ok(t) = topics.get(topic) {
                partitions.extend((0..t.partition_count()).map(|p| TopicPartition::new(topic, p)));
            }
        }
        for tp in member.owned.iter().chain(&member.assigned) {
            owners.insert(tp, &member.member_id);
        }
    }
    let mut total_lag = 0;
    let mut max_time_lag_ms = 0;
    let mut rows = Vec::with_capacity(partitions.len());
    for tp in &partitions {
        let committed = description.offsets.get(tp);
        // Offsets of a topic deleted since are not shown.
        let Some(lag) = topics.partition_lag(tp, committed.map(|c| c.offset), now) else {
            continue;
        };
        total_lag += lag.lag.unwrap_or(0);
        max_time_lag_ms = max_time_lag_ms.max(lag.time_lag_ms.unwrap_or(0));
        rows.push(v1::GroupPartition {
            topic: tp.topic.clone(),
            partition: tp.partition,
            committed_offset: committed.map(|c| c.offset),
            metadata: committed.map(|c| c.metadata.clone()).unwrap_or_default(),
            commit_time_ms: committed.map_or(0, |c| c.commit_time_ms),
            end_offset: lag.end_offset,
            log_start_offset: lag.log_start_offset,
            lag: lag.lag,
            time_lag_ms: lag.time_lag_ms,
            owner: owners.get(tp).map(|m| (*m).to_owned()).unwrap_or_default(),
        });
    }
    let mut source_topics: BTreeSet<String> =
        partitions.iter().map(|tp| tp.topic.clone()).collect();
    source_topics.extend(retries.topics(&description.group_id));
    let dead_letters = source_topics
        .into_iter()
        .filter_map(|topic| {
            let retry_set_size = retries.len_for_topic(&description.group_id, &topic) as u64;
            // A deleted topic's entries are still shown (undeliverable
            // ones among them), with no DLQ.
            let dlq_topic = match super::shared::effective_settings(
                topics,
                retries,
                &topic,
                &description.group_id,
            ) {
                Ok(settings) => settings.dlq_topic(&topic, &description.group_id),
                Err(_) if retry_set_size > 0 => String::new(),
                Err(_) => return None,
            };
            let dlq_depth = topics.get(&dlq_topic).map_or(0, |t| {
                t.partitions()
                    .iter()
                    .map(|p| p.log().high_watermark() - p.log().log_start_offset())
                    .sum()
            });
            // Entries of an earlier topic of this name are not its.
            let current = topics
                .get(&topic)
                .is_ok_and(|t| retries.is_bound(&topic, t.id()));
            let retry_set_size = if current {
                retries.len_for_topic(&description.group_id, &topic) as u64
            } else {
                0
            };
            let (undeliverable, undeliverable_reason) = if current {
                retries.undeliverable_for_topic(&description.group_id, &topic)
            } else {
                (0, None)
            };
            Some(v1::DeadLetterStatus {
                undeliverable,
                undeliverable_reason: undeliverable_reason.unwrap_or_default(),
                retry_set_size,
                dlq_topic,
                dlq_depth,
                topic,
            })
        })
        .collect();
    v1::DescribeGroupResponse {
        dead_letters,
        group_id: description.group_id,
        group_epoch: description.group_epoch,
        members: description
            .members
            .into_iter()
            .map(|m| v1::MemberDescription {
                member_id: m.member_id,
                instance_id: m.instance_id,
                topics: m.topics.into_iter().collect(),
                member_epoch: m.member_epoch,
                assigned: partition_sets(&m.assigned),
                owned: partition_sets(&m.owned),
                since_heartbeat_ms: u64::try_from(m.since_heartbeat.as_millis())
                    .unwrap_or(u64::MAX),
            })
            .collect(),
        partitions: rows,
        lag: total_lag,
        max_time_lag_ms,
    }
}

/// The offset a reset target resolves to in one partition.
fn reset_offset(
    topics: &TopicRegistry,
    tp: &TopicPartition,
    to: &v1::reset_target::To,
) -> Result<u64, Status> {
    let topic = topics.get(&tp.topic).map_err(status::topic)?;
    let log = topic
        .partition(tp.partition)
        .map_err(status::topic)?
        .log()
        .clone();
    let (earliest, latest) = (log.log_start_offset(), log.high_watermark());
    Ok(match *to {
        v1::reset_target::To::Earliest(_) => earliest,
        v1::reset_target::To::Latest(_) => latest,
        v1::reset_target::To::TimestampMs(ts) => log
            .offset_for_timestamp(ts)
            .unwrap_or(latest)
            .clamp(earliest, latest),
        v1::reset_target::To::Offset(offset) => {
            if !(earliest..=latest).contains(&offset) {
                return Err(Status::out_of_range(format!(
                    "offset {offset} of {tp} is outside the kept range {earliest}..={latest}"
                )));
            }
            offset
        }
    })
}

/// Leaves out of a group's description every topic `principal` may not
/// describe (its partitions, dead letters, and the members' subscriptions
/// and assignments), and counts the lag of what is left.
fn visible_to(
    access: &Access,
    principal: &Principal,
    mut described: v1::DescribeGroupResponse,
) -> v1::DescribeGroupResponse {
    let visible =
        |topic: &str| access.allowed(principal, Operation::Describe, Resource::topic(topic));
    let before = described.partitions.len();
    described.partitions.retain(|p| visible(&p.topic));
    described.dead_letters.retain(|d| visible(&d.topic));
    for member in &mut described.members {
        member.topics.retain(|t| visible(t));
        member.assigned.retain(|t| visible(&t.topic));
        member.owned.retain(|t| visible(&t.topic));
    }
    if described.partitions.len() != before {
        described.lag = described.partitions.iter().filter_map(|p| p.lag).sum();
        described.max_time_lag_ms = described
            .partitions
            .iter()
            .filter_map(|p| p.time_lag_ms)
            .max()
            .unwrap_or(0);
    }
    described
}

#[tonic::async_trait]
impl GroupService for Groups {
    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn join_group(
        &self,
        request: Request<v1::JoinGroupRequest>,
    ) -> Result<Response<v1::JoinGroupResponse>, Status> {
        let caller = self.access.check(
            &request,
            Operation::Read,
            Resource::group(&request.get_ref().group_id),
        )?;
        for topic in &request.get_ref().topics {
            self.access
                .check_principal(&caller, Operation::Read, Resource::topic(topic))?;
        }
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        if let Some(instance) = &request.instance_id {
            if instance.is_empty() || instance.len() > MAX_INSTANCE_ID_BYTES {
                return Err(Status::invalid_argument(format!(
                    "instance id must be 1 to {MAX_INSTANCE_ID_BYTES} bytes, got {}",
                    instance.len()
                )));
            }
        }
        if request.topics.is_empty() {
            return Err(status::group(GroupError::NoTopics));
        }
        for topic in &request.topics {
            self.topics.get(topic).map_err(status::topic)?;
            // A nack of this member may dead-letter: the name must work.
            super::shared::dlq_topic_for(&self.topics, &self.retries, topic, &request.group_id)?;
        }
        let session_timeout = match request.session_timeout_ms {
            0 => DEFAULT_SESSION_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let joined = self
            .groups
            .join(
                &request.group_id,
                request.instance_id.as_deref(),
                request.topics.into_iter().collect(),
                session_timeout,
                Instant::now(),
            )
            .map_err(status::group)?;
        Ok(Response::new(v1::JoinGroupResponse {
            member_id: joined.member_id,
            member_epoch: joined.member_epoch,
            heartbeat_interval_ms: duration_ms(joined.heartbeat_interval),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id, member = %request.get_ref().member_id))]
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        self.access.check(
            &request,
            Operation::Read,
            Resource::group(&request.get_ref().group_id),
        )?;
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        check_member_id(&request.member_id)?;
        let assignment = self
            .groups
            .heartbeat(
                &request.group_id,
                &request.member_id,
                from_partition_sets(request.owned),
                Instant::now(),
            )
            .map_err(status::group)?;
        Ok(Response::new(v1::HeartbeatResponse {
            member_epoch: assignment.member_epoch,
            assigned: partition_sets(&assignment.partitions),
            heartbeat_interval_ms: duration_ms(assignment.heartbeat_interval),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id, member = %request.get_ref().member_id))]
    async fn leave_group(
        &self,
        request: Request<v1::LeaveGroupRequest>,
    ) -> Result<Response<v1::LeaveGroupResponse>, Status> {
        self.access.check(
            &request,
            Operation::Read,
            Resource::group(&request.get_ref().group_id),
        )?;
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        check_member_id(&request.member_id)?;
        self.groups
            .leave(&request.group_id, &request.member_id, Instant::now())
            .map_err(status::group)?;
        Ok(Response::new(v1::LeaveGroupResponse {}))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id, member = %request.get_ref().member_id))]
    async fn commit_offsets(
        &self,
        request: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        // Kafka's rule: read on the group and on every topic committed.
        let caller = self.access.check(
            &request,
            Operation::Read,
            Resource::group(&request.get_ref().group_id),
        )?;
        for commit in &request.get_ref().offsets {
            self.access.check_principal(
                &caller,
                Operation::Read,
                Resource::topic(&commit.topic),
            )?;
        }
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        if request.offsets.is_empty() {
            return Err(Status::invalid_argument(
                "a commit needs at least one offset",
            ));
        }
        let mut seen = BTreeSet::new();
        let mut offsets = Vec::with_capacity(request.offsets.len());
        for commit in request.offsets {
            let tp = TopicPartition::new(commit.topic, commit.partition);
            if !seen.insert(tp.clone()) {
                return Err(Status::invalid_argument(format!(
                    "{tp} appears more than once in the commit"
                )));
            }
            if commit.metadata.len() > MAX_METADATA_BYTES {
                return Err(Status::invalid_argument(format!(
                    "metadata of {tp} is {} bytes; at most {MAX_METADATA_BYTES} are kept",
                    commit.metadata.len()
                )));
            }
            let topic = self.topics.get(&tp.topic).map_err(status::topic)?;
            let latest = topic
                .partition(tp.partition)
                .map_err(status::topic)?
                .log()
                .high_watermark();
            if commit.offset > latest {
                return Err(Status::out_of_range(format!(
                    "offset {} of {tp} is past its latest offset {latest}",
                    commit.offset
                )));
            }
            offsets.push((tp, commit.offset, commit.metadata));
        }
        let member = (!request.member_id.is_empty()).then_some(request.member_id);
        let epoch = request.member_epoch;
        let group_id = request.group_id;
        let groups = Arc::clone(&self.groups);
        // The commit syncs the offset log.
        blocking(move || {
            groups
                .commit(
                    &group_id,
                    member.as_deref().map(|m| (m, epoch)),
                    offsets,
                    Instant::now(),
                    now_ms(),
                )
                .map_err(status::group)
        })
        .await?;
        Ok(Response::new(v1::CommitOffsetsResponse {}))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn fetch_offsets(
        &self,
        request: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        let caller = self.access.check(
            &request,
            Operation::Describe,
            Resource::group(&request.get_ref().group_id),
        )?;
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        let only: BTreeSet<String> = request.topics.into_iter().collect();
        let offsets = self
            .groups
            .fetch_offsets(&request.group_id)
            .into_iter()
            .filter(|(tp, _)| only.is_empty() || only.contains(&tp.topic))
            .filter(|(tp, _)| {
                self.access
                    .allowed(&caller, Operation::Describe, Resource::topic(&tp.topic))
            })
            .map(|(tp, c)| v1::CommittedOffset {
                topic: tp.topic,
                partition: tp.partition,
                offset: c.offset,
                metadata: c.metadata,
                commit_time_ms: c.commit_time_ms,
            })
            .collect();
        Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
    }

    async fn list_groups(
        &self,
        request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        // Only the groups the caller may describe, with the lag of the
        // topics it may describe.
        let caller = self.access.caller(&request)?;
        let access = self.access.clone();
        let topics = Arc::clone(&self.topics);
        let groups = Arc::clone(&self.groups);
        let retries = Arc::clone(&self.retries);
        let summaries = blocking(move || {
            let now = Instant::now();
            Ok(groups
                .list()
                .into_iter()
                .filter(|id| access.allowed(&caller, Operation::Describe, Resource::group(id)))
                .filter_map(|id| groups.describe(&id, now).ok())
                .map(|description| {
                    let members = description.members.len() as u32;
                    let described = visible_to(
                        &access,
                        &caller,
                        describe_with_lag(&topics, &retries, description),
                    );
                    v1::GroupSummary {
                        group_id: described.group_id,
                        members,
                        lag: described.lag,
                        max_time_lag_ms: described.max_time_lag_ms,
                    }
                })
                .collect())
        })
        .await?;
        Ok(Response::new(v1::ListGroupsResponse { groups: summaries }))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::DescribeGroupResponse>, Status> {
        let caller = self.access.check(
            &request,
            Operation::Describe,
            Resource::group(&request.get_ref().group_id),
        )?;
        let group_id = request.into_inner().group_id;
        check_group_id(&group_id)?;
        let description = match self.groups.describe(&group_id, Instant::now()) {
            Ok(description) => description,
            // A group known only by its pending retries exists too.
            Err(GroupError::UnknownGroup(_)) if !self.retries.is_empty(&group_id) => {
                GroupDescription {
                    group_id: group_id.clone(),
                    group_epoch: 0,
                    members: Vec::new(),
                    offsets: Default::default(),
                }
            }
            Err(e) => return Err(status::group(e)),
        };
        let topics = Arc::clone(&self.topics);
        let retries = Arc::clone(&self.retries);
        let described =
            blocking(move || Ok(describe_with_lag(&topics, &retries, description))).await?;
        Ok(Response::new(visible_to(&self.access, &caller, described)))
    }

    #[tracing::instrument(skip_all, fields(group = %request.get_ref().group_id))]
    async fn reset_offsets(
        &self,
        request: Request<v1::ResetOffsetsRequest>,
    ) -> Result<Response<v1::ResetOffsetsResponse>, Status> {
        // A reset is a commit made by an operator: read on the group and
        // on every topic it moves (as Kafka's offset commits).
        let caller = self.access.check(
            &request,
            Operation::Read,
            Resource::group(&request.get_ref().group_id),
        )?;
        for target in &request.get_ref().targets {
            self.access.check_principal(
                &caller,
                Operation::Read,
                Resource::topic(&target.topic),
            )?;
        }
        let request = request.into_inner();
        check_group_id(&request.group_id)?;
        if request.targets.is_empty() {
            return Err(Status::invalid_argument(
                "a reset needs at least one target",
            ));
        }
        let topics = Arc::clone(&self.topics);
        let groups = Arc::clone(&self.groups);
        let dry_run = request.dry_run;
        let changes = blocking(move || {
            let mut targets: BTreeMap<TopicPartition, u64> = BTreeMap::new();
            for target in &request.targets {
                let to = target.to.as_ref().ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "reset target of topic {:?} says nowhere to move: set earliest, \
                         latest, timestamp_ms or offset",
                        target.topic
                    ))
                })?;
                let topic = topics.get(&target.topic).map_err(status::topic)?;
                let partitions = match target.partition {
                    Some(p) => vec![p],
                    None => (0..topic.partition_count()).collect(),
                };
                for partition in partitions {
                    let tp = TopicPartition::new(&target.topic, partition);
                    let offset = reset_offset(&topics, &tp, to)?;
                    if targets.insert(tp.clone(), offset).is_some() {
                        return Err(Status::invalid_argument(format!(
                            "{tp} is named by more than one reset target"
                        )));
                    }
                }
            }
            groups
                .reset_offsets(
                    &request.group_id,
                    targets.into_iter().collect(),
                    dry_run,
                    Instant::now(),
                    now_ms(),
                )
                .map_err(status::group)
        })
        .await?;
        Ok(Response::new(v1::ResetOffsetsResponse {
            changes: changes
                .into_iter()
                .map(|c| v1::OffsetChange {
                    topic: c.partition.topic,
                    partition: c.partition.partition,
                    previous: c.previous,
                    offset: c.offset,
                })
                .collect(),
            dry_run,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_sets_round_trip_grouped_by_topic() {
        let set: BTreeSet<TopicPartition> = [
            TopicPartition::new("b", 1),
            TopicPartition::new("a", 2),
            TopicPartition::new("a", 0),
        ]
        .into();
        let wire = partition_sets(&set);
        assert_eq!(wire.len(), 2);
        assert_eq!(wire[0].topic, "a");
        assert_eq!(wire[0].partitions, vec![0, 2]);
        assert_eq!(from_partition_sets(wire), set);
    }
}
