//! Topic administration and offset lookups.

use crate::connection::Channel;
use sluice_proto::v1::{
    self, admin_service_client::AdminServiceClient, consume_service_client::ConsumeServiceClient,
    dead_letter_service_client::DeadLetterServiceClient, group_service_client::GroupServiceClient,
};

use crate::connection::{ClientConfig, with_timeout};
use crate::error::Result;
use crate::record::StartFrom;

/// Settings of a topic. `None` leaves the broker's default (on create) or
/// the current value (on alter). A retention of 0 means "none".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicSettings {
    /// Number of partitions (fixed once created).
    pub partitions: Option<u32>,
    /// Delete segments whose newest record is older than this (ms).
    pub retention_ms: Option<u64>,
    /// Delete the oldest segments while a partition stays this big without them.
    pub retention_bytes: Option<u64>,
    /// `every-batch`, `interval(Nms)` or `os`.
    pub flush: Option<String>,
    /// Largest record (key + value + headers) accepted.
    pub max_record_bytes: Option<u32>,
    /// Size of a segment file.
    pub segment_bytes: Option<u64>,
    /// Deliveries a nacked record gets in all before it is dead-lettered.
    pub max_deliveries: Option<u32>,
    /// Wait before the first redelivery (ms).
    pub retry_backoff_ms: Option<u64>,
    /// Growth of the wait with each redelivery.
    pub retry_backoff_multiplier: Option<f64>,
    /// Longest wait between redeliveries (ms).
    pub retry_backoff_max_ms: Option<u64>,
    /// DLQ topic name template (`{topic}`, `{group}`).
    pub dlq_topic: Option<String>,
    /// `producer` (keep each batch's codec) or `none`, `lz4`, `zstd` to
    /// force one.
    pub compression: Option<String>,
}

impl TopicSettings {
    fn into_proto(self) -> v1::TopicConfig {
        v1::TopicConfig {
            partitions: self.partitions,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            flush: self.flush,
            max_record_bytes: self.max_record_bytes,
            segment_bytes: self.segment_bytes,
            max_deliveries: self.max_deliveries,
            retry_backoff_ms: self.retry_backoff_ms,
            retry_backoff_multiplier: self.retry_backoff_multiplier,
            retry_backoff_max_ms: self.retry_backoff_max_ms,
            dlq_topic: self.dlq_topic,
            compression: self.compression,
        }
    }

    fn from_proto(c: v1::TopicConfig) -> Self {
        TopicSettings {
            partitions: c.partitions,
            retention_ms: c.retention_ms,
            retention_bytes: c.retention_bytes,
            flush: c.flush,
            max_record_bytes: c.max_record_bytes,
            segment_bytes: c.segment_bytes,
            max_deliveries: c.max_deliveries,
            retry_backoff_ms: c.retry_backoff_ms,
            retry_backoff_multiplier: c.retry_backoff_multiplier,
            retry_backoff_max_ms: c.retry_backoff_max_ms,
            dlq_topic: c.dlq_topic,
            compression: c.compression,
        }
    }
}

/// One partition of a described topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition's index.
    pub partition: u32,
    /// The first offset still kept.
    pub earliest_offset: u64,
    /// The offset the next record will get.
    pub latest_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// Offsets lost to damaged or missing files (empty when whole).
    pub lost_ranges: Vec<LostRange>,
}

/// Offsets of a partition lost to a damaged or missing segment file; reads
/// inside get [`crate::Error::DataLoss`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostRange {
    /// The damaged file; for a missing segment, the segment before the gap.
    pub file: String,
    /// Byte position in `file` where the valid data ends.
    pub position: u64,
    /// First lost offset.
    pub start_offset: u64,
    /// The next readable offset.
    pub next_offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// A topic, its settings and (when described) its partitions.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Its settings, defaults filled in.
    pub settings: TopicSettings,
    /// Its partitions (from `describe_topic`; empty from `list_topics`).
    pub partitions: Vec<PartitionInfo>,
    /// The largest batch, in the broker's batch encoding, one partition
    /// takes from an idempotent produce request (from `describe_topic` of
    /// a broker that reports it; `None` otherwise).
    pub max_batch_bytes: Option<u64>,
}

/// A group in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group's id.
    pub group_id: String,
    /// Live members.
    pub members: u32,
    /// Records not yet consumed, over the partitions with a committed offset.
    pub lag: u64,
    /// Age of the oldest unconsumed record over its partitions, in ms.
    pub max_time_lag_ms: i64,
}

/// A live member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    /// Its member id.
    pub member_id: String,
    /// Its static instance id.
    pub instance_id: Option<String>,
    /// Its epoch (increases with each assignment change).
    pub member_epoch: u64,
    /// The partitions it may read.
    pub assigned: Vec<(String, u32)>,
    /// Time since its last heartbeat, in ms.
    pub since_heartbeat_ms: u64,
}

/// A partition as a group sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The next offset the group reads; `None` if it never committed here.
    pub committed_offset: Option<u64>,
    /// One past the partition's last record.
    pub end_offset: u64,
    /// Records not yet consumed (`None` without a committed offset).
    pub lag: Option<u64>,
    /// Age of the oldest unconsumed record in ms (`None` without a
    /// committed offset).
    pub time_lag_ms: Option<i64>,
    /// The member reading it, if any.
    pub owner: Option<String>,
}

/// A described group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group's id.
    pub group_id: String,
    /// Live members.
    pub members: Vec<GroupMember>,
    /// Partitions its members read or it has offsets for.
    pub partitions: Vec<GroupPartition>,
    /// Sum of the partitions' lag.
    pub lag: u64,
    /// Largest time lag, in ms.
    pub max_time_lag_ms: i64,
    /// Retries pending and dead letters kept, per topic.
    pub dead_letters: Vec<DeadLetterStatus>,
}

/// Where an offset reset moves a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The earliest kept record.
    Earliest,
    /// The end: skip everything there is now.
    Latest,
    /// The first record at or after this time (ms since the epoch).
    Timestamp(i64),
    /// This offset.
    Offset(u64),
}

/// An offset a reset sets (or would set).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetChange {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The committed offset before, if any.
    pub previous: Option<u64>,
    /// The committed offset after.
    pub offset: u64,
}

/// Where redriven dead letters go.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RedriveTarget {
    /// Back to the group that dead-lettered them, with a fresh delivery
    /// count: only that group sees them again.
    #[default]
    Group,
    /// Appended to their source topic: every group reading it sees them
    /// again.
    SourceTopic,
    /// Appended to this topic.
    Topic(String),
}

/// What to redrive from a dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedriveOptions {
    /// First DLQ offset; `None`: where the last redrive stopped.
    pub from_offset: Option<u64>,
    /// One past the last DLQ offset; `None`: the end.
    pub to_offset: Option<u64>,
    /// Where they go.
    pub target: RedriveTarget,
    /// At most this many records per second (0: the broker's 1000).
    pub max_records_per_second: u32,
    /// Only list what would be redriven.
    pub dry_run: bool,
    /// Allow offsets an earlier redrive already covered.
    pub allow_repeat: bool,
}

/// Dead letters a redrive sent back (or would).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedriveReport {
    /// Their source records: topic, partition, offset.
    pub records: Vec<(String, u32, u64)>,
    /// The DLQ offsets covered, `from..to`.
    pub from_offset: u64,
    /// One past the last.
    pub to_offset: u64,
}

/// A group's retries and dead letters of one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterStatus {
    /// The source topic.
    pub topic: String,
    /// Records waiting for redelivery.
    pub retry_set_size: u64,
    /// The group's DLQ topic of it.
    pub dlq_topic: String,
    /// Records in that DLQ.
    pub dlq_depth: u64,
    /// Of `retry_set_size`: records whose dead letter could not be written
    /// (not redelivered; the broker tries again every maintenance interval
    /// and at startup).
    pub undeliverable: u64,
    /// Why the most recent of those could not be written.
    pub undeliverable_reason: Option<String>,
}

/// What the broker reports about itself ([`Admin::broker_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerStatus {
    /// The broker's version.
    pub version: String,
    /// The git commit it was built from; "unknown" outside a checkout.
    pub git_commit: String,
    /// Time since the broker started.
    pub uptime: std::time::Duration,
    /// The data directory, as configured.
    pub data_dir: String,
    /// Disk space taken by the data directory's files.
    pub data_dir_bytes: u64,
    /// Free and total bytes of the data directory's file system.
    pub disk_free_bytes: u64,
    /// Size of the data directory's file system.
    pub disk_total_bytes: u64,
    /// The TOML file the broker read, if any.
    pub config_file: Option<String>,
    /// Every setting in effect, by name.
    pub settings: Vec<BrokerSetting>,
}

/// One broker setting in effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSetting {
    /// Its TOML key.
    pub name: String,
    /// Its value in effect, as text.
    pub value: String,
    /// "flag", "environment", "file" or "default".
    pub source: String,
}

/// Creates, inspects, changes and deletes topics; looks up offsets;
/// inspects groups and resets their offsets.
#[derive(Debug, Clone)]
pub struct Admin {
    admin: AdminServiceClient<Channel>,
    consume: ConsumeServiceClient<Channel>,
    groups: GroupServiceClient<Channel>,
    dead_letters: DeadLetterServiceClient<Channel>,
    config: ClientConfig,
}

impl Admin {
    /// An admin handle for the broker of `config` (connects on first use).
    pub fn new(config: &ClientConfig) -> Result<Admin> {
        let channel = config.channel()?;
        Ok(Admin {
            admin: AdminServiceClient::new(channel.clone()),
            groups: GroupServiceClient::new(channel.clone()),
            dead_letters: DeadLetterServiceClient::new(channel.clone()),
            consume: ConsumeServiceClient::new(channel)
                .max_decoding_message_size(config.max_message_bytes),
            config: config.clone(),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_timeout(message, self.config.request_timeout)
    }

    /// Creates a topic with `partitions` partitions and default settings.
    pub async fn create_topic(&self, name: &str, partitions: u32) -> Result<TopicSettings> {
        self.create_topic_with(
            name,
            TopicSettings {
                partitions: Some(partitions),
                ..TopicSettings::default()
            },
        )
        .await
    }

    /// Creates a topic; returns the settings it got, defaults filled in.
    pub async fn create_topic_with(
        &self,
        name: &str,
        settings: TopicSettings,
    ) -> Result<TopicSettings> {
        let response = self
            .admin
            .clone()
            .create_topic(self.request(v1::CreateTopicRequest {
                name: name.to_owned(),
                config: Some(settings.into_proto()),
            }))
            .await?
            .into_inner();
        Ok(TopicSettings::from_proto(
            response.config.unwrap_or_default(),
        ))
    }

    /// Deletes a topic and all its records.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.admin
            .clone()
            .delete_topic(self.request(v1::DeleteTopicRequest {
                name: name.to_owned(),
            }))
            .await?;
        Ok(())
    }

    /// Every topic with its settings (no partition details).
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let response = self
            .admin
            .clone()
            .list_topics(self.request(v1::ListTopicsRequest {}))
            .await?
            .into_inner();
        Ok(response
            .topics
            .into_iter()
            .map(|t| TopicInfo {
                name: t.name,
                settings: TopicSettings::from_proto(t.config.unwrap_or_default()),
                partitions: Vec::new(),
                max_batch_bytes: None,
            })
            .collect())
    }

    /// The broker's version, commit, uptime, disk and settings in effect.
    pub async fn broker_status(&self) -> Result<BrokerStatus> {
        let r = self
            .admin
            .clone()
            .broker_status(self.request(v1::BrokerStatusRequest {}))
            .await?
            .into_inner();
        Ok(BrokerStatus {
            version: r.version,
            git_commit: r.git_commit,
            uptime: std::time::Duration::from_millis(r.uptime_ms),
            data_dir: r.data_dir,
            data_dir_bytes: r.data_dir_bytes,
            disk_free_bytes: r.disk_free_bytes,
            disk_total_bytes: r.disk_total_bytes,
            config_file: (!r.config_file.is_empty()).then_some(r.config_file),
            settings: r
                .settings
                .into_iter()
                .map(|s| BrokerSetting {
                    name: s.name,
                    value: s.value,
                    source: s.source,
                })
                .collect(),
        })
    }

    /// A topic's settings and each partition's offsets and size.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicInfo> {
        let response = self
            .admin
            .clone()
            .describe_topic(self.request(v1::DescribeTopicRequest {
                name: name.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(TopicInfo {
            name: response.name,
            settings: TopicSettings::from_proto(response.config.unwrap_or_default()),
            partitions: response
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    earliest_offset: p.earliest_offset,
                    latest_offset: p.latest_offset,
                    size_bytes: p.size_bytes,
                    segments: p.segments,
                    lost_ranges: p
                        .lost_ranges
                        .into_iter()
                        .map(|r| LostRange {
                            file: r.file,
                            position: r.position,
                            start_offset: r.start_offset,
                            next_offset: r.next_offset,
                            reason: r.reason,
                        })
                        .collect(),
                })
                .collect(),
            max_batch_bytes: (response.max_batch_bytes > 0).then_some(response.max_batch_bytes),
        })
    }

    /// Changes settings of a topic (not its partition count).
    pub async fn alter_topic(&self, name: &str, settings: TopicSettings) -> Result<TopicSettings> {
        let response = self
            .admin
            .clone()
            .alter_topic_config(self.request(v1::AlterTopicConfigRequest {
                name: name.to_owned(),
                config: Some(settings.into_proto()),
            }))
            .await?
            .into_inner();
        Ok(TopicSettings::from_proto(
            response.config.unwrap_or_default(),
        ))
    }

    /// Offsets of `partitions` (all if empty) at `at`: the earliest kept,
    /// the latest (next to be written), the first at or after a time, or an
    /// explicit offset (returned as is).
    pub async fn offsets(
        &self,
        topic: &str,
        partitions: &[u32],
        at: StartFrom,
    ) -> Result<Vec<(u32, u64)>> {
        use v1::list_offsets_request::Spec;
        let spec = match at {
            StartFrom::Earliest => Spec::Position(v1::OffsetSpec::Earliest as i32),
            StartFrom::Latest => Spec::Position(v1::OffsetSpec::Latest as i32),
            StartFrom::Timestamp(ms) => Spec::TimestampMs(ms),
            StartFrom::Offset(offset) => {
                let info = self.describe_topic(topic).await?;
                return Ok(info
                    .partitions
                    .iter()
                    .filter(|p| partitions.is_empty() || partitions.contains(&p.partition))
                    .map(|p| (p.partition, offset))
                    .collect());
            }
        };
        let response = self
            .consume
            .clone()
            .list_offsets(self.request(v1::ListOffsetsRequest {
                topic: topic.to_owned(),
                partitions: partitions.to_vec(),
                spec: Some(spec),
            }))
            .await?
            .into_inner();
        Ok(response
            .offsets
            .into_iter()
            .map(|o| (o.partition, o.offset))
            .collect())
    }

    /// Every group with live members or committed offsets.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let response = self
            .groups
            .clone()
            .list_groups(self.request(v1::ListGroupsRequest {}))
            .await?
            .into_inner();
        Ok(response
            .groups
            .into_iter()
            .map(|g| GroupSummary {
                group_id: g.group_id,
                members: g.members,
                lag: g.lag,
                max_time_lag_ms: g.max_time_lag_ms,
            })
            .collect())
    }

    /// A group's members and, per partition, committed offset and lag.
    pub async fn describe_group(&self, group_id: &str) -> Result<GroupInfo> {
        let g = self
            .groups
            .clone()
            .describe_group(self.request(v1::DescribeGroupRequest {
                group_id: group_id.to_owned(),
            }))
            .await?
            .into_inner();
        Ok(GroupInfo {
            group_id: g.group_id,
            members: g
                .members
                .into_iter()
                .map(|m| GroupMember {
                    member_id: m.member_id,
                    instance_id: m.instance_id,
                    member_epoch: m.member_epoch,
                    assigned: v1::TopicPartitions::flatten(m.assigned).collect(),
                    since_heartbeat_ms: m.since_heartbeat_ms,
                })
                .collect(),
            partitions: g
                .partitions
                .into_iter()
                .map(|p| GroupPartition {
                    topic: p.topic,
                    partition: p.partition,
                    committed_offset: p.committed_offset,
                    end_offset: p.end_offset,
                    lag: p.lag,
                    time_lag_ms: p.time_lag_ms,
                    owner: (!p.owner.is_empty()).then_some(p.owner),
                })
                .collect(),
            lag: g.lag,
            max_time_lag_ms: g.max_time_lag_ms,
            dead_letters: g
                .dead_letters
                .into_iter()
                .map(|d| DeadLetterStatus {
                    topic: d.topic,
                    retry_set_size: d.retry_set_size,
                    dlq_topic: d.dlq_topic,
                    dlq_depth: d.dlq_depth,
                    undeliverable: d.undeliverable,
                    undeliverable_reason: (!d.undeliverable_reason.is_empty())
                        .then_some(d.undeliverable_reason),
                })
                .collect(),
        })
    }

    /// Sends dead letters of partition `partition` of `dlq_topic` back.
    pub async fn redrive(
        &self,
        dlq_topic: &str,
        partition: u32,
        options: RedriveOptions,
    ) -> Result<RedriveReport> {
        let (target, target_topic) = match options.target {
            RedriveTarget::Group => (v1::RedriveTarget::Group, String::new()),
            RedriveTarget::SourceTopic => (v1::RedriveTarget::SourceTopic, String::new()),
            RedriveTarget::Topic(topic) => (v1::RedriveTarget::Topic, topic),
        };
        // A large, rate-limited redrive takes its time.
        let mut request = tonic::Request::new(v1::RedriveRequest {
            dlq_topic: dlq_topic.to_owned(),
            partition,
            from_offset: options.from_offset,
            to_offset: options.to_offset,
            target: target as i32,
            target_topic,
            max_records_per_second: options.max_records_per_second,
            dry_run: options.dry_run,
            allow_repeat: options.allow_repeat,
        });
        request.set_timeout(
            self.config
                .request_timeout
                .max(std::time::Duration::from_secs(600)),
        );
        let r = self
            .dead_letters
            .clone()
            .redrive(request)
            .await?
            .into_inner();
        Ok(RedriveReport {
            records: r
                .records
                .into_iter()
                .map(|r| (r.topic, r.partition, r.offset))
                .collect(),
            from_offset: r.from_offset,
            to_offset: r.to_offset,
        })
    }

    /// Moves the committed offsets of a group that has no live members:
    /// `partition` of `topic`, or all its partitions when `None`. With
    /// `dry_run`, changes nothing and says what would change.
    pub async fn reset_offsets(
        &self,
        group_id: &str,
        topic: &str,
        partition: Option<u32>,
        to: ResetTo,
        dry_run: bool,
    ) -> Result<Vec<OffsetChange>> {
        use v1::reset_target::To;
        let to = match to {
            ResetTo::Earliest => To::Earliest(true),
            ResetTo::Latest => To::Latest(true),
            ResetTo::Timestamp(ms) => To::TimestampMs(ms),
            ResetTo::Offset(offset) => To::Offset(offset),
        };
        let response = self
            .groups
            .clone()
            .reset_offsets(self.request(v1::ResetOffsetsRequest {
                group_id: group_id.to_owned(),
                targets: vec![v1::ResetTarget {
                    topic: topic.to_owned(),
                    partition,
                    to: Some(to),
                }],
                dry_run,
            }))
            .await?
            .into_inner();
        Ok(response
            .changes
            .into_iter()
            .map(|c| OffsetChange {
                topic: c.topic,
                partition: c.partition,
                previous: c.previous,
                offset: c.offset,
            })
            .collect())
    }

    /// Changes `topic`'s retry and dead-letter settings for `group` only
    /// (the `max_deliveries`, `retry_backoff_*` and `dlq_topic` fields of
    /// `settings`; the others are ignored). All unset clears the group's
    /// changes. Returns the settings the group now has.
    pub async fn set_group_dead_letter_settings(
        &self,
        group_id: &str,
        topic: &str,
        settings: TopicSettings,
    ) -> Result<TopicSettings> {
        let effective = self
            .dead_letters
            .clone()
            .set_group_settings(self.request(v1::SetGroupSettingsRequest {
                group_id: group_id.to_owned(),
                topic: topic.to_owned(),
                settings: Some(v1::DeadLetterSettings {
                    max_deliveries: settings.max_deliveries,
                    retry_backoff_ms: settings.retry_backoff_ms,
                    retry_backoff_multiplier: settings.retry_backoff_multiplier,
                    retry_backoff_max_ms: settings.retry_backoff_max_ms,
                    dlq_topic: settings.dlq_topic,
                }),
            }))
            .await?
            .into_inner()
            .effective
            .unwrap_or_default();
        Ok(TopicSettings {
            max_deliveries: effective.max_deliveries,
            retry_backoff_ms: effective.retry_backoff_ms,
            retry_backoff_multiplier: effective.retry_backoff_multiplier,
            retry_backoff_max_ms: effective.retry_backoff_max_ms,
            dlq_topic: effective.dlq_topic,
            ..TopicSettings::default()
        })
    }
}
