//! Topic administration and offset lookups.

use sluice_proto::v1::{
    self, admin_service_client::AdminServiceClient, consume_service_client::ConsumeServiceClient,
};
use tonic::transport::Channel;

use crate::connection::ClientConfig;
use crate::consumer::StartFrom;
use crate::error::Result;

/// Settings of a topic. `None` leaves the broker's default (on create) or
/// the current value (on alter). A retention of 0 means "none".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
}

/// A topic, its settings and (when described) its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The topic's name.
    pub name: String,
    /// Its settings, defaults filled in.
    pub settings: TopicSettings,
    /// Its partitions (from `describe_topic`; empty from `list_topics`).
    pub partitions: Vec<PartitionInfo>,
}

/// Creates, inspects, changes and deletes topics; looks up offsets.
#[derive(Debug, Clone)]
pub struct Admin {
    admin: AdminServiceClient<Channel>,
    consume: ConsumeServiceClient<Channel>,
    config: ClientConfig,
}

impl Admin {
    /// An admin handle for the broker of `config` (connects on first use).
    pub fn new(config: &ClientConfig) -> Result<Admin> {
        let channel = config.channel()?;
        Ok(Admin {
            admin: AdminServiceClient::new(channel.clone()),
            consume: ConsumeServiceClient::new(channel)
                .max_decoding_message_size(config.max_message_bytes),
            config: config.clone(),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(self.config.request_timeout);
        request
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
            })
            .collect())
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
                })
                .collect(),
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
}
