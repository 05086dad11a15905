//! `AdminService`: topic administration, and the broker's own status.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_proto::v1::{self, admin_service_server::AdminService};
use tonic::{Request, Response, Status};

use super::auth::Access;
use super::{blocking, status};
use crate::auth::{Operation, Resource};
use crate::dlq::RetrySets;
use crate::groups::GroupCoordinator;
use crate::state::DeleteTopicError;
use crate::topics::{Topic, TopicConfig, TopicConfigPatch, TopicRegistry};

pub(crate) struct Admin {
    pub(crate) access: Access,
    pub(crate) topics: Arc<TopicRegistry>,
    pub(crate) groups: Arc<GroupCoordinator>,
    pub(crate) retries: Arc<RetrySets>,
    pub(crate) info: BrokerInfo,
}

/// What `BrokerStatus` reports besides live figures: fixed at start-up.
#[derive(Debug, Clone)]
pub struct BrokerInfo {
    /// When the process started.
    started: SystemTime,
    data_dir: PathBuf,
    config_file: Option<PathBuf>,
    settings: Vec<crate::config::SettingInEffect>,
}

impl BrokerInfo {
    /// Reads the process's start time from /proc (now, if it cannot).
    pub fn new(config: &crate::config::Config) -> BrokerInfo {
        let started = crate::metrics::process_start_time()
            .and_then(|s| UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(s).ok()?))
            .unwrap_or_else(SystemTime::now);
        BrokerInfo {
            started,
            data_dir: config.data_dir.clone(),
            config_file: config.config_file.clone(),
            settings: config.settings_in_effect().to_vec(),
        }
    }
}

/// Disk space taken by the files under `dir` (allocated blocks, so
/// preallocated segments count at what they hold on disk).
fn disk_used(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

fn patch(config: Option<v1::TopicConfig>) -> TopicConfigPatch {
    let c = config.unwrap_or_default();
    TopicConfigPatch {
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

fn to_proto(config: &TopicConfig) -> v1::TopicConfig {
    v1::TopicConfig {
        partitions: Some(config.partitions),
        retention_ms: Some(config.retention_ms.unwrap_or(0)),
        retention_bytes: Some(config.retention_bytes.unwrap_or(0)),
        flush: Some(config.flush.clone()),
        max_record_bytes: Some(config.max_record_bytes),
        segment_bytes: Some(config.segment_bytes),
        max_deliveries: Some(config.dead_letters.max_deliveries),
        retry_backoff_ms: Some(config.dead_letters.retry_backoff_ms),
        retry_backoff_multiplier: Some(config.dead_letters.retry_backoff_multiplier),
        retry_backoff_max_ms: Some(config.dead_letters.retry_backoff_max_ms),
        dlq_topic: Some(config.dead_letters.dlq_topic.clone()),
        compression: Some(config.compression.clone()),
    }
}

fn describe(topic: &Topic) -> v1::DescribeTopicResponse {
    let config = topic.config();
    v1::DescribeTopicResponse {
        name: topic.name().to_owned(),
        config: Some(to_proto(&config)),
        max_batch_bytes: config.batch_limit(),
        partitions: topic
            .partitions()
            .iter()
            .map(|p| {
                let log = p.log();
                v1::PartitionDescription {
                    partition: p.index,
                    earliest_offset: log.log_start_offset(),
                    latest_offset: log.high_watermark(),
                    size_bytes: log.size_bytes(),
                    segments: log.segment_count() as u32,
                    lost_ranges: log
                        .lost_ranges()
                        .into_iter()
                        .map(|r| v1::LostRange {
                            file: r.path.display().to_string(),
                            position: r.position,
                            start_offset: r.start_offset,
                            next_offset: r.end_offset,
                            reason: r.reason,
                        })
                        .collect(),
                }
            })
            .collect(),
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().name))]
    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        // Kafka's rule: create on the topic, or on the cluster.
        let caller = self.access.caller(&request)?;
        let name = &request.get_ref().name;
        if !self.access.authorizer().may_create_topic(&caller, name) {
            // The denial names the narrower right that would have done.
            self.access
                .check_principal(&caller, Operation::Create, Resource::topic(name))?;
        }
        let request = request.into_inner();
        let topics = Arc::clone(&self.topics);
        let config = blocking(move || {
            topics
                .create(&request.name, &patch(request.config))
                .map_err(status::topic)
        })
        .await?;
        Ok(Response::new(v1::CreateTopicResponse {
            config: Some(to_proto(&config)),
        }))
    }

    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().name))]
    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        self.access.check(
            &request,
            Operation::Delete,
            Resource::topic(&request.get_ref().name),
        )?;
        let name = request.into_inner().name;
        let topics = Arc::clone(&self.topics);
        let groups = Arc::clone(&self.groups);
        let retries = Arc::clone(&self.retries);
        blocking(move || {
            crate::state::delete_topic(&topics, &groups, &retries, &name, super::convert::now_ms())
                .map(drop)
                .map_err(|e| match e {
                    DeleteTopicError::Topic(e) => status::topic(e),
                    DeleteTopicError::GroupState(e) => status::storage(e),
                })
        })
        .await?;
        Ok(Response::new(v1::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        request: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        // Only what the caller may describe: no other topic's name.
        let caller = self.access.caller(&request)?;
        let topics = self
            .topics
            .list()
            .iter()
            .filter(|t| {
                self.access
                    .allowed(&caller, Operation::Describe, Resource::topic(t.name()))
            })
            .map(|t| v1::TopicSummary {
                name: t.name().to_owned(),
                config: Some(to_proto(&t.config())),
            })
            .collect();
        Ok(Response::new(v1::ListTopicsResponse { topics }))
    }

    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().name))]
    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        self.access.check(
            &request,
            Operation::Describe,
            Resource::topic(&request.get_ref().name),
        )?;
        let topic = self
            .topics
            .get(&request.into_inner().name)
            .map_err(status::topic)?;
        Ok(Response::new(describe(&topic)))
    }

    async fn broker_status(
        &self,
        request: Request<v1::BrokerStatusRequest>,
    ) -> Result<Response<v1::BrokerStatusResponse>, Status> {
        // Settings and paths are the operator's business.
        self.access
            .check(&request, Operation::Describe, Resource::cluster())?;
        let info = self.info.clone();
        let dir = self.topics.data_dir().to_path_buf();
        blocking(move || {
            let (free, total) = crate::storage::free_space(&dir).map_err(status::storage)?;
            Ok(Response::new(v1::BrokerStatusResponse {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                git_commit: crate::GIT_COMMIT.to_owned(),
                uptime_ms: u64::try_from(
                    SystemTime::now()
                        .duration_since(info.started)
                        .unwrap_or_default()
                        .as_millis(),
                )
                .unwrap_or(u64::MAX),
                data_dir: info.data_dir.display().to_string(),
                data_dir_bytes: disk_used(&dir),
                disk_free_bytes: free,
                disk_total_bytes: total,
                settings: info
                    .settings
                    .into_iter()
                    .map(|s| v1::BrokerSetting {
                        name: s.name,
                        value: s.value,
                        source: s.source.as_str().to_owned(),
                    })
                    .collect(),
                config_file: info
                    .config_file
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
            }))
        })
        .await
    }

    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().name))]
    async fn alter_topic_config(
        &self,
        request: Request<v1::AlterTopicConfigRequest>,
    ) -> Result<Response<v1::AlterTopicConfigResponse>, Status> {
        self.access.check(
            &request,
            Operation::Alter,
            Resource::topic(&request.get_ref().name),
        )?;
        let request = request.into_inner();
        let topics = Arc::clone(&self.topics);
        let config = blocking(move || {
            topics
                .alter(&request.name, &patch(request.config))
                .map_err(status::topic)
        })
        .await?;
        Ok(Response::new(v1::AlterTopicConfigResponse {
            config: Some(to_proto(&config)),
        }))
    }
}
