//! Metadata, CreateTopics, DeleteTopics, DescribeConfigs, DescribeCluster
//! and FindCoordinator: what clients and admin tools ask about the cluster
//! and its topics.
//!
//! One node (id [`NODE_ID`]) at the advertised address leads every
//! partition and is every replica and every coordinator. Topics are not
//! created by a Metadata request (as in Redpanda's default): create them
//! with CreateTopics, the gRPC API or `sluice topic create`.
//!
//! Topic settings have Kafka names where Kafka has the setting
//! ([`TOPIC_CONFIGS`]); a name Sluice does not know is refused with
//! INVALID_CONFIG, never silently dropped.

use std::sync::Arc;

use kafka_protocol::messages::create_topics_response::{
    CreatableTopicConfigs, CreatableTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::find_coordinator_response::Coordinator;
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::{
    BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
    DescribeClusterRequest, DescribeClusterResponse, DescribeConfigsRequest,
    DescribeConfigsResponse, FindCoordinatorRequest, FindCoordinatorResponse, MetadataRequest,
    MetadataResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;

use super::errors::{Failure, KafkaCode};
use super::{Context, NODE_ID};
use crate::auth::{Operation, Resource};
use crate::topics::{Topic, TopicConfig, TopicConfigPatch};

/// Kafka's ConfigResource types.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Kafka's config sources: set on the topic, or the broker's default.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
/// Kafka's "authorized operations were not asked for".
const OPERATIONS_NOT_ASKED: i32 = i32::MIN;

/// The topic settings served under Kafka's names (and one of Sluice's own).
pub(crate) const TOPIC_CONFIGS: &[&str] = &[
    "retention.ms",
    "retention.bytes",
    "segment.bytes",
    "max.message.bytes",
    "compression.type",
    "cleanup.policy",
    "message.timestamp.type",
    "sluice.flush",
];

/// Kafka's ACL operation codes (the bits of an "authorized operations"
/// field, KIP-430), each with the Sluice operation that grants it.
const TOPIC_OPERATIONS: &[(u8, Operation)] = &[
    (3, Operation::Read),
    (4, Operation::Write),
    (5, Operation::Create),
    (6, Operation::Delete),
    (7, Operation::Alter),
    (8, Operation::Describe),
    (10, Operation::Describe), // DescribeConfigs
    (11, Operation::Alter),    // AlterConfigs
];
const CLUSTER_OPERATIONS: &[(u8, Operation)] = &[
    (5, Operation::Create),
    (7, Operation::Alter),
    (8, Operation::Describe),
    (9, Operation::All), // ClusterAction: the broker's own
    (10, Operation::Describe),
    (11, Operation::Alter),
    (12, Operation::Write), // IdempotentWrite
];
pub(super) const GROUP_OPERATIONS: &[(u8, Operation)] = &[
    (3, Operation::Read),
    (6, Operation::Delete),
    (8, Operation::Describe),
];

/// The bit field of the Kafka operations the caller may do on `resource`.
pub(super) fn authorized_operations(
    context: &Context,
    operations: &[(u8, Operation)],
    resource: Resource,
) -> i32 {
    operations
        .iter()
        .filter(|(_, operation)| context.allowed(*operation, resource))
        .fold(0, |bits, (code, _)| bits | (1 << code))
}

fn str_bytes(s: impl Into<String>) -> StrBytes {
    StrBytes::from_string(s.into())
}

pub(super) fn metadata(
    context: &Context,
    request: MetadataRequest,
    version: i16,
) -> MetadataResponse {
    let topics = &context.state.topics;
    let mut response = MetadataResponse::default();
    response.brokers = vec![broker(context)];
    response.cluster_id = Some(str_bytes(context.settings.cluster_id.clone()));
    response.controller_id = BrokerId(NODE_ID);
    response.cluster_authorized_operations =
        if request.include_cluster_authorized_operations && (8..=10).contains(&version) {
            authorized_operations(context, CLUSTER_OPERATIONS, Resource::cluster())
        } else {
            OPERATIONS_NOT_ASKED
        };
    let topic_operations = request.include_topic_authorized_operations && version >= 8;
    // v0: an empty list means every topic; v1 and later say so with null.
    let asked: Option<Vec<String>> = match request.topics {
        None => None,
        Some(list) if list.is_empty() && version == 0 => None,
        Some(list) => Some(
            list.into_iter()
                .filter_map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        ),
    };
    match asked {
        None => {
            for topic in topics.list() {
                if context.allowed(Operation::Describe, Resource::topic(topic.name())) {
                    let mut metadata = topic_metadata(topic.name(), Ok(&topic));
                    if topic_operations {
                        metadata.topic_authorized_operations = authorized_operations(
                            context,
                            TOPIC_OPERATIONS,
                            Resource::topic(topic.name()),
                        );
                    }
                    response.topics.push(metadata);
                }
            }
        }
        Some(names) => {
            for name in names {
                let found = context.topic(Operation::Describe, &name);
                let mut metadata = topic_metadata(&name, found.as_ref().map(Arc::as_ref));
                if topic_operations && found.is_ok() {
                    metadata.topic_authorized_operations =
                        authorized_operations(context, TOPIC_OPERATIONS, Resource::topic(&name));
                }
                response.topics.push(metadata);
            }
        }
    }
    response
}

fn broker(context: &Context) -> MetadataResponseBroker {
    let (host, port) = &context.settings.advertised;
    let mut broker = MetadataResponseBroker::default();
    broker.node_id = BrokerId(NODE_ID);
    broker.host = str_bytes(host.clone());
    broker.port = i32::from(*port);
    broker
}

fn topic_metadata(name: &str, topic: Result<&Topic, &Failure>) -> MetadataResponseTopic {
    let mut response = MetadataResponseTopic::default();
    response.name = Some(TopicName(str_bytes(name)));
    response.topic_authorized_operations = OPERATIONS_NOT_ASKED;
    match topic {
        Ok(topic) => {
            for index in 0..topic.partition_count() {
                let mut partition = MetadataResponsePartition::default();
                partition.partition_index = index as i32;
                partition.leader_id = BrokerId(NODE_ID);
                partition.leader_epoch = 0;
                partition.replica_nodes = vec![BrokerId(NODE_ID)];
                partition.isr_nodes = vec![BrokerId(NODE_ID)];
                response.partitions.push(partition);
            }
        }
        Err(failure) => response.error_code = failure.code.code(),
    }
    response
}

/// Kafka topic settings as a Sluice patch; an unknown name or a value
/// Sluice cannot honour is INVALID_CONFIG.
fn patch_from_configs<'a>(
    configs: impl Iterator<Item = (&'a str, Option<&'a str>)>,
) -> Result<TopicConfigPatch, Failure> {
    let invalid = |why: String| Failure::new(KafkaCode::InvalidConfig, why);
    let mut patch = TopicConfigPatch::default();
    for (name, value) in configs {
        let Some(value) = value else { continue };
        let number = |value: &str| -> Result<i64, Failure> {
            value
                .parse::<i64>()
                .map_err(|_| invalid(format!("{name} = {value:?} is not a number")))
        };
        // Kafka's -1 ("no limit") is Sluice's 0.
        let limit = |n: i64| -> Result<u64, Failure> {
            if n == -1 {
                Ok(0)
            } else {
                u64::try_from(n).map_err(|_| invalid(format!("{name} = {n} is negative")))
            }
        };
        match name {
            "retention.ms" => patch.retention_ms = Some(limit(number(value)?)?),
            "retention.bytes" => patch.retention_bytes = Some(limit(number(value)?)?),
            "segment.bytes" => {
                patch.segment_bytes = Some(
                    u64::try_from(number(value)?)
                        .map_err(|_| invalid(format!("{name} = {value} is negative")))?,
                )
            }
            "max.message.bytes" => {
                patch.max_record_bytes = Some(
                    u32::try_from(number(value)?)
                        .map_err(|_| invalid(format!("{name} = {value} is out of range")))?,
                )
            }
            "compression.type" => {
                patch.compression = Some(match value {
                    "producer" | "lz4" | "zstd" => value.to_owned(),
                    "uncompressed" | "none" => "none".to_owned(),
                    other => {
                        return Err(invalid(format!(
                            "compression.type {other:?} is not one Sluice stores \
                             (producer, uncompressed, lz4, zstd)"
                        )));
                    }
                })
            }
            "cleanup.policy" if value == "delete" => {}
            "cleanup.policy" => {
                return Err(invalid(format!(
                    "cleanup.policy {value:?}: Sluice has no log compaction, only delete"
                )));
            }
            "message.timestamp.type" if value == "CreateTime" => {}
            "sluice.flush" => patch.flush = Some(value.to_owned()),
            other => {
                return Err(invalid(format!(
                    "topic setting {other:?} is not supported; supported: {}",
                    TOPIC_CONFIGS.join(", ")
                )));
            }
        }
    }
    Ok(patch)
}

/// A topic's settings under their Kafka names, each with whether it is
/// the broker's default.
fn topic_configs(
    config: &TopicConfig,
    defaults: &TopicConfig,
) -> Vec<(&'static str, String, bool)> {
    let limit = |n: Option<u64>| n.map_or_else(|| "-1".to_owned(), |n| n.to_string());
    let compression = |c: &str| match c {
        "none" => "uncompressed".to_owned(),
        other => other.to_owned(),
    };
    vec![
        (
            "retention.ms",
            limit(config.retention_ms),
            config.retention_ms == defaults.retention_ms,
        ),
        (
            "retention.bytes",
            limit(config.retention_bytes),
            config.retention_bytes == defaults.retention_bytes,
        ),
        (
            "segment.bytes",
            config.segment_bytes.to_string(),
            config.segment_bytes == defaults.segment_bytes,
        ),
        (
            "max.message.bytes",
            config.max_record_bytes.to_string(),
            config.max_record_bytes == defaults.max_record_bytes,
        ),
        (
            "compression.type",
            compression(&config.compression),
            config.compression == defaults.compression,
        ),
        ("cleanup.policy", "delete".to_owned(), true),
        ("message.timestamp.type", "CreateTime".to_owned(), true),
        (
            "sluice.flush",
            config.flush.clone(),
            config.flush == defaults.flush,
        ),
    ]
}

pub(super) async fn create_topics(
    context: &Arc<Context>,
    request: CreateTopicsRequest,
    version: i16,
) -> CreateTopicsResponse {
    let context = Arc::clone(context);
    let task = tokio::task::spawn_blocking(move || {
        let topics = &context.state.topics;
        let mut response = CreateTopicsResponse::default();
        for creatable in request.topics {
            let name = creatable.name.0.to_string();
            let mut result = CreatableTopicResult::default();
            result.name = creatable.name.clone();
            let created = create_one(&context, &name, &creatable, request.validate_only);
            match created {
                Ok(config) => {
                    result.num_partitions = config.partitions as i32;
                    result.replication_factor = 1;
                    if version >= 5 {
                        let defaults = topics.defaults().config(&TopicConfigPatch::default());
                        let defaults = defaults.as_ref().unwrap_or(&config);
                        result.configs = Some(
                            topic_configs(&config, defaults)
                                .into_iter()
                                .map(|(name, value, is_default)| {
                                    let mut c = CreatableTopicConfigs::default();
                                    c.name = str_bytes(name);
                                    c.value = Some(str_bytes(value));
                                    c.config_source = if is_default {
                                        SOURCE_DEFAULT
                                    } else {
                                        SOURCE_TOPIC
                                    };
                                    c
                                })
                                .collect(),
                        );
                    }
                    if !request.validate_only {
                        tracing::info!(topic = %name, partitions = config.partitions, "topic created over Kafka");
                    }
                }
                Err(failure) => {
                    result.error_code = failure.code.code();
                    result.error_message = Some(str_bytes(failure.message));
                    result.num_partitions = -1;
                    result.replication_factor = -1;
                }
            }
            response.topics.push(result);
        }
        response
    });
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a Kafka CreateTopics task failed");
        CreateTopicsResponse::default()
    })
}

fn create_one(
    context: &Context,
    name: &str,
    creatable: &kafka_protocol::messages::create_topics_request::CreatableTopic,
    validate_only: bool,
) -> Result<TopicConfig, Failure> {
    if !context.auth.may_create_topic(&context.principal, name) {
        return Err(Failure::new(
            KafkaCode::TopicAuthorizationFailed,
            format!("creating topic {name:?} is not allowed"),
        ));
    }
    if !matches!(creatable.replication_factor, -1 | 1) {
        return Err(Failure::new(
            KafkaCode::InvalidReplicationFactor,
            format!(
                "replication factor {} is not possible: Sluice is one node (use 1 or -1)",
                creatable.replication_factor
            ),
        ));
    }
    if !creatable.assignments.is_empty() {
        return Err(Failure::new(
            KafkaCode::InvalidReplicaAssignment,
            "manual replica assignments are not supported: node 0 leads every partition",
        ));
    }
    let mut patch = patch_from_configs(
        creatable
            .configs
            .iter()
            .map(|c| (c.name.as_str(), c.value.as_ref().map(|v| v.as_str()))),
    )?;
    patch.partitions = match creatable.num_partitions {
        -1 => None,
        n => Some(u32::try_from(n).map_err(|_| {
            Failure::new(
                KafkaCode::InvalidPartitions,
                format!("partition count {n} is not valid"),
            )
        })?),
    };
    let topics = &context.state.topics;
    if validate_only {
        if topics.get(name).is_ok() {
            return Err(Failure::from(crate::topics::TopicError::AlreadyExists(
                name.to_owned(),
            )));
        }
        if let Some(reason) = crate::topics::name_rule_violation(name) {
            return Err(Failure::new(
                KafkaCode::InvalidTopicException,
                format!("invalid topic name {name:?}: {reason}"),
            ));
        }
        return Ok(topics.defaults().config(&patch)?);
    }
    topics.create(name, &patch).map_err(|e| {
        let failure = Failure::from(e);
        if failure.code == KafkaCode::InvalidConfig && patch.partitions.is_some() {
            // The partition count is the setting Kafka names separately.
            let partitions_wrong = topics
                .defaults()
                .config(&TopicConfigPatch {
                    partitions: None,
                    ..patch.clone()
                })
                .is_ok();
            if partitions_wrong {
                return Failure::new(KafkaCode::InvalidPartitions, failure.message);
            }
        }
        failure
    })
}

pub(super) async fn delete_topics(
    context: &Arc<Context>,
    request: DeleteTopicsRequest,
) -> DeleteTopicsResponse {
    let context = Arc::clone(context);
    let task = tokio::task::spawn_blocking(move || {
        let mut response = DeleteTopicsResponse::default();
        // Versions up to 5 name topics in `topic_names`; 6 in `topics`.
        let names: Vec<TopicName> = request
            .topic_names
            .into_iter()
            .chain(request.topics.into_iter().filter_map(|t| t.name))
            .collect();
        for name in names {
            let topic = name.0.to_string();
            let mut result = DeletableTopicResult::default();
            result.name = Some(name);
            let deleted = if context.allowed(Operation::Delete, Resource::topic(&topic)) {
                context
                    .state
                    .delete_topic(&topic, crate::state::now_ms())
                    .map_err(Failure::from)
            } else {
                Err(Failure::new(
                    KafkaCode::TopicAuthorizationFailed,
                    format!("deleting topic {topic:?} is not allowed"),
                ))
            };
            match deleted {
                Ok(_) => tracing::info!(%topic, "topic deleted over Kafka"),
                Err(failure) => {
                    result.error_code = failure.code.code();
                    result.error_message = Some(str_bytes(failure.message));
                }
            }
            response.responses.push(result);
        }
        response
    });
    task.await.unwrap_or_else(|e| {
        tracing::error!(error = %e, "a Kafka DeleteTopics task failed");
        DeleteTopicsResponse::default()
    })
}

pub(super) fn describe_configs(
    context: &Context,
    request: DescribeConfigsRequest,
) -> DescribeConfigsResponse {
    let topics = &context.state.topics;
    let defaults = topics.defaults().config(&TopicConfigPatch::default()).ok();
    let mut response = DescribeConfigsResponse::default();
    for resource in request.resources {
        let mut result = DescribeConfigsResult::default();
        result.resource_type = resource.resource_type;
        result.resource_name = resource.resource_name.clone();
        let name = resource.resource_name.as_str();
        let wanted = |key: &str| {
            resource
                .configuration_keys
                .as_ref()
                .is_none_or(|keys| keys.iter().any(|k| k.as_str() == key))
        };
        let configs: Result<Vec<(&str, String, bool)>, Failure> = match resource.resource_type {
            RESOURCE_TOPIC => context.topic(Operation::Describe, name).map(|topic| {
                let config = topic.config();
                topic_configs(&config, defaults.as_ref().unwrap_or(&config))
            }),
            RESOURCE_BROKER => Ok(defaults
                .as_ref()
                .map(|d| {
                    topic_configs(d, d)
                        .into_iter()
                        .map(|(k, v, _)| (k, v, true))
                        .collect()
                })
                .unwrap_or_default()),
            other => Err(Failure::new(
                KafkaCode::InvalidRequest,
                format!("config resource type {other} is not supported (topic 2, broker 4)"),
            )),
        };
        match configs {
            Ok(configs) => {
                for (key, value, is_default) in configs.into_iter().filter(|(k, _, _)| wanted(k)) {
                    let mut entry = DescribeConfigsResourceResult::default();
                    entry.name = str_bytes(key);
                    entry.value = Some(str_bytes(value));
                    entry.read_only = resource.resource_type == RESOURCE_BROKER;
                    entry.config_source = if is_default {
                        SOURCE_DEFAULT
                    } else {
                        SOURCE_TOPIC
                    };
                    result.configs.push(entry);
                }
            }
            Err(failure) => {
                result.error_code = failure.code.code();
                result.error_message = Some(str_bytes(failure.message));
            }
        }
        response.results.push(result);
    }
    response
}

pub(super) fn describe_cluster(
    context: &Context,
    request: DescribeClusterRequest,
) -> DescribeClusterResponse {
    let (host, port) = &context.settings.advertised;
    let mut broker = DescribeClusterBroker::default();
    broker.broker_id = BrokerId(NODE_ID);
    broker.host = str_bytes(host.clone());
    broker.port = i32::from(*port);
    let mut response = DescribeClusterResponse::default();
    response.cluster_id = str_bytes(context.settings.cluster_id.clone());
    response.controller_id = BrokerId(NODE_ID);
    response.brokers = vec![broker];
    response.cluster_authorized_operations = if request.include_cluster_authorized_operations {
        authorized_operations(context, CLUSTER_OPERATIONS, Resource::cluster())
    } else {
        OPERATIONS_NOT_ASKED
    };
    response.endpoint_type = 1;
    response
}

/// Group coordinators are this node; transactions have none.
pub(super) fn find_coordinator(
    context: &Context,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let (host, port) = &context.settings.advertised;
    let mut response = FindCoordinatorResponse::default();
    const KEY_GROUP: i8 = 0;
    if request.key_type != KEY_GROUP {
        response.error_code = KafkaCode::CoordinatorNotAvailable.code();
        response.error_message = Some(str_bytes(
            "only group coordinators exist: Sluice has no transactions",
        ));
        response.node_id = BrokerId(-1);
        response.port = -1;
        return response;
    }
    response.node_id = BrokerId(NODE_ID);
    response.host = str_bytes(host.clone());
    response.port = i32::from(*port);
    if version >= 4 {
        response.coordinators = request
            .coordinator_keys
            .into_iter()
            .map(|key| {
                let mut c = Coordinator::default();
                c.key = key;
                c.node_id = BrokerId(NODE_ID);
                c.host = str_bytes(host.clone());
                c.port = i32::from(*port);
                c
            })
            .collect();
    }
    response
}
