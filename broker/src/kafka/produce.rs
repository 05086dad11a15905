//! Produce and InitProducerId.
//!
//! A produce request is translated and checked whole, partition by
//! partition, before anything is written ([`records::batch_from_kafka`]);
//! each partition's batch then goes through the same steps as a gRPC
//! produce: the producer's epoch fence, the partition's idempotent
//! appender (a retried batch is answered with its original offsets, not
//! written again), and the wait for the sync the topic's flush policy
//! asks for. acks 1 and -1 both wait for it: one node is every replica.
//! Partitions succeed or fail alone, as in Kafka; a batch is never half
//! written.

use std::sync::Arc;

use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{
    InitProducerIdRequest, InitProducerIdResponse, ProduceRequest, ProduceResponse,
};
use sluice_format::EncodedBatch;

use super::errors::{Failure, KafkaCode};
use super::{Context, partition_of, records};
use crate::auth::Operation;
use crate::producers::ProducerAppend;
use crate::state::{AppendError, append_batch};
use crate::topics::Topic;

/// One partition of a request on its way through.
enum Step {
    Failed(Failure),
    Checked(Arc<Topic>, u32, EncodedBatch),
    Written(Arc<Topic>, u32, ProducerAppend),
}

pub(super) async fn produce(context: &Arc<Context>, request: ProduceRequest) -> ProduceResponse {
    let context = Arc::clone(context);
    // Translating copies and checksums a request's worth of bytes, and
    // writes and syncs block: all of it on the blocking pool.
    let outcome = tokio::task::spawn_blocking(move || write(&context, request)).await;
    match outcome {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "a Kafka produce task failed");
            ProduceResponse::default()
        }
    }
}

fn write(context: &Context, request: ProduceRequest) -> ProduceResponse {
    let topics = &context.state.topics;
    let now = crate::state::now_ms();
    // Every partition translated and checked before any is written.
    let mut steps: Vec<(String, Vec<(i32, Step)>)> = Vec::new();
    let transactional = request.transactional_id.is_some();
    for topic_data in request.topic_data {
        let name = topic_data.name.0.to_string();
        let topic = if transactional {
            Err(Failure::new(
                KafkaCode::TransactionalIdAuthorizationFailed,
                "transactions are not supported",
            ))
        } else {
            context.topic(Operation::Write, &name)
        };
        let partitions = topic_data
            .partition_data
            .into_iter()
            .map(|data| {
                let step = check(topic.clone(), data.index, data.records, now);
                (data.index, step.unwrap_or_else(Step::Failed))
            })
            .collect();
        steps.push((name, partitions));
    }
    if let Err(e) = topics.check_free_space() {
        let failure = Failure::from(e);
        for (_, partitions) in &mut steps {
            for (_, step) in partitions.iter_mut() {
                *step = Step::Failed(failure.clone());
            }
        }
    }
    for (_, partitions) in &mut steps {
        for (_, step) in partitions.iter_mut() {
            if let Step::Checked(topic, partition, batch) = step {
                *step = match append(context, topic, *partition, batch, now) {
                    Ok(appended) => Step::Written(Arc::clone(topic), *partition, appended),
                    Err(failure) => Step::Failed(failure),
                };
            }
        }
    }
    let mut response = ProduceResponse::default();
    for (name, partitions) in steps {
        let mut topic_response = TopicProduceResponse::default();
        topic_response.name = kafka_protocol::messages::TopicName(name.clone().into());
        for (index, step) in partitions {
            let mut partition = PartitionProduceResponse::default();
            partition.index = index;
            partition.log_append_time_ms = -1;
            let result = match step {
                Step::Written(topic, p, appended) => wait(&topic, p, &appended),
                Step::Failed(failure) => Err(failure),
                Step::Checked(..) => unreachable!("every checked batch was written or failed"),
            };
            match result {
                Ok((base_offset, log_start_offset)) => {
                    partition.base_offset = base_offset;
                    partition.log_start_offset = log_start_offset;
                }
                Err(failure) => {
                    tracing::debug!(topic = %name, partition = index, code = ?failure.code, message = %failure.message, "Kafka produce refused");
                    partition.error_code = failure.code.code();
                    partition.error_message = Some(failure.message.into());
                    partition.base_offset = -1;
                    partition.log_start_offset = -1;
                }
            }
            topic_response.partition_responses.push(partition);
        }
        response.responses.push(topic_response);
    }
    response
}

fn check(
    topic: Result<Arc<Topic>, Failure>,
    index: i32,
    records: Option<bytes::Bytes>,
    now: i64,
) -> Result<Step, Failure> {
    let topic = topic?;
    let partition = partition_of(&topic, index)?.index;
    let bytes = records.ok_or_else(|| {
        Failure::new(KafkaCode::InvalidRecord, "the partition's records are null")
    })?;
    let batch = records::batch_from_kafka(bytes, &topic.config(), now)?;
    Ok(Step::Checked(topic, partition, batch))
}

/// Writes one partition's batch as a gRPC produce does (no wait for the
/// sync).
fn append(
    context: &Context,
    topic: &Topic,
    partition: u32,
    batch: &EncodedBatch,
    now: i64,
) -> Result<ProducerAppend, Failure> {
    let metrics = context.metrics.as_ref().map(|m| &m.produce);
    append_batch(&context.state.topics, topic, partition, batch, now, metrics).map_err(
        |e| match e {
            AppendError::Topic(e) => Failure::from(e),
            AppendError::Append(e) => Failure::from(e),
        },
    )
}

/// Waits for a written batch's sync; its base offset and the partition's
/// start offset.
fn wait(topic: &Topic, partition: u32, appended: &ProducerAppend) -> Result<(i64, i64), Failure> {
    let partition = topic.partition(partition)?;
    partition.appender().wait(appended)?;
    Ok((
        appended.info.base_offset as i64,
        partition.log().log_start_offset() as i64,
    ))
}

/// A producer id and epoch for an idempotent producer: Sluice's own, so a
/// Kafka producer and a gRPC producer are fenced and deduplicated alike.
/// A transactional id is refused: there are no transactions.
pub(super) async fn init_producer_id(
    context: &Arc<Context>,
    request: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let mut response = InitProducerIdResponse::default();
    response.producer_id = kafka_protocol::messages::ProducerId(-1);
    response.producer_epoch = -1;
    if request.transactional_id.is_some() {
        response.error_code = KafkaCode::TransactionalIdAuthorizationFailed.code();
        tracing::info!("refused a transactional producer: Sluice has no transactions");
        return response;
    }
    let topics = Arc::clone(&context.state.topics);
    let may_write = context
        .auth
        .may_init_producer(&context.principal, topics.list().iter().map(|t| t.name()));
    if !may_write {
        response.error_code = KafkaCode::ClusterAuthorizationFailed.code();
        return response;
    }
    match tokio::task::spawn_blocking(move || topics.producer_ids().init(None)).await {
        Ok(Ok(identity)) => {
            tracing::info!(
                producer_id = identity.producer_id,
                epoch = identity.epoch,
                "Kafka producer initialised"
            );
            match (
                i64::try_from(identity.producer_id),
                i16::try_from(identity.epoch),
            ) {
                (Ok(id), Ok(epoch)) => {
                    response.producer_id = kafka_protocol::messages::ProducerId(id);
                    response.producer_epoch = epoch;
                }
                _ => response.error_code = KafkaCode::UnknownServerError.code(),
            }
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "initialising a Kafka producer failed");
            response.error_code = KafkaCode::KafkaStorageError.code();
        }
        Err(e) => {
            tracing::error!(error = %e, "an InitProducerId task failed");
            response.error_code = KafkaCode::UnknownServerError.code();
        }
    }
    response
}
