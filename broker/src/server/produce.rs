//! `ProduceService`: validation, routing, batching and writes.
//!
//! A request is checked whole before anything is written. Records sent as
//! messages are encoded into one batch per partition; a batch a producer
//! sent already encoded (`ProduceRequest.batch`, the Rust client's path) is
//! checked without building its records ([`check_client_batch`]) and
//! written byte for byte, so the hot path copies it only into the log.
//! Writes run on the blocking pool; the wait
//! for its sync (under `every-batch`) is a separate step, so a stream's
//! next request is written while the previous one syncs and many producers
//! share one sync.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use sluice_proto::v1::{self, produce_service_server::ProduceService};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::auth::Access;
use super::convert::{batch_record_size, now_ms, record_from_proto, record_size};
use super::status;
use crate::auth::{Operation, Resource};
use crate::metrics::ProduceMetrics;
use crate::producers::ProducerAppend;
use crate::state::{AppendError, append_batch};
use crate::storage::batch::{NO_PRODUCER_EPOCH, NO_PRODUCER_ID};
use crate::storage::{BatchBuilder, BatchError, Compression, EncodedBatch, ProducerInfo};
use crate::topics::{Topic, TopicConfig, TopicRegistry};

/// Requests of one stream written but not yet acknowledged, at most.
const STREAM_IN_FLIGHT: usize = 64;

pub(crate) struct Produce {
    pub(crate) access: Access,
    pub(crate) topics: Arc<TopicRegistry>,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) metrics: Option<ProduceMetrics>,
}

/// A request that passed validation: batches per partition, each with the
/// request positions of its records.
struct Prepared {
    topic: Arc<Topic>,
    batches: Vec<(u32, EncodedBatch, Vec<usize>)>,
    records: usize,
    /// The request sent one encoded batch: answered with its range, not
    /// with a position per record.
    sent_as_batch: bool,
}

/// Batches written, waiting for their sync.
struct Written {
    topic: Arc<Topic>,
    batches: Vec<(u32, ProducerAppend, Vec<usize>)>,
    records: usize,
    sent_as_batch: bool,
}

/// Why a producer's batch is refused; every case is INVALID_ARGUMENT.
enum Refusal {
    Batch(BatchError),
    Rule(String),
}

impl From<BatchError> for Refusal {
    fn from(e: BatchError) -> Self {
        Refusal::Batch(e)
    }
}

impl Refusal {
    fn into_status(self) -> Status {
        let why = match self {
            Refusal::Batch(e) => e.to_string(),
            Refusal::Rule(why) => why,
        };
        Status::invalid_argument(format!("the batch is refused: {why}; nothing was written"))
    }
}

/// Checks a batch a producer encoded itself, without building its records:
/// size under the topic's batch limit, checksum, framing, record count
/// (the records present must be exactly the count), codec, no control bit,
/// producer fields equal to the request's, each record's size against the
/// topic's limit (the same rule as for records sent as messages), no
/// negative timestamp, and the header's first and largest timestamps
/// true to the records. Returns the batch to write as it is.
fn check_client_batch(
    bytes: bytes::Bytes,
    producer: ProducerInfo,
    config: &TopicConfig,
) -> Result<EncodedBatch, Status> {
    let limit = config.batch_limit();
    if bytes.len() as u64 > limit {
        return Err(Refusal::Rule(format!(
            "it is {} bytes, and the topic takes batches of at most {limit} bytes",
            bytes.len()
        ))
        .into_status());
    }
    let batch = EncodedBatch::from_bytes(bytes).map_err(|e| Refusal::from(e).into_status())?;
    let header = *batch.header();
    let rule = |why: String| Err(Refusal::Rule(why).into_status());
    if header.is_control() {
        return rule("the control attribute is the broker's, not a producer's".into());
    }
    if header.producer != producer {
        let p = header.producer;
        return rule(format!(
            "its producer fields (id {}, epoch {}, base sequence {}) are not the request's \
             (id {}, epoch {}, base sequence {})",
            p.producer_id,
            p.epoch,
            p.base_sequence,
            producer.producer_id,
            producer.epoch,
            producer.base_sequence
        ));
    }
    let max = config.max_record_bytes as usize;
    let mut max_timestamp = i64::MIN;
    batch
        .as_record_batch()
        .walk(|record| {
            let index = record.offset_delta;
            let timestamp = record.timestamp(&header);
            if index == 0 && record.timestamp_delta != 0 {
                return Err(Refusal::Rule(format!(
                    "its first timestamp {} is not its first record's ({timestamp})",
                    header.first_timestamp
                )));
            }
            if timestamp < 0 {
                return Err(Refusal::Rule(format!(
                    "record {index} has the negative timestamp {timestamp}"
                )));
            }
            let size = batch_record_size(record, &header);
            if size > max {
                return Err(Refusal::Rule(format!(
                    "record {index} is {size} bytes; the topic accepts records of at most {max} \
                     bytes (their encoded key, value and headers)"
                )));
            }
            max_timestamp = max_timestamp.max(timestamp);
            Ok(())
        })
        .map_err(Refusal::into_status)?;
    if max_timestamp != header.max_timestamp {
        return rule(format!(
            "its largest timestamp {} is not its records' ({max_timestamp})",
            header.max_timestamp
        ));
    }
    Ok(batch)
}

/// The batch in the topic's forced codec, rebuilt only if the producer used
/// another one.
fn in_codec(batch: EncodedBatch, codec: Option<Compression>) -> Result<EncodedBatch, Status> {
    let Some(codec) = codec else {
        return Ok(batch);
    };
    let header = *batch.header();
    if header.compression().ok() == Some(codec) {
        return Ok(batch);
    }
    let records = batch
        .as_record_batch()
        .to_records()
        .map_err(|e| Refusal::from(e).into_status())?;
    let mut builder = BatchBuilder::with_capacity(batch.len());
    for stored in &records {
        builder.push(&stored.record);
    }
    Ok(builder.finish_compressed(header.producer, codec))
}

/// Checks everything about a request before anything is written: a bad
/// record anywhere rejects the whole request.
fn prepare(topics: &TopicRegistry, request: v1::ProduceRequest) -> Result<Prepared, Status> {
    let topic = topics.get(&request.topic).map_err(status::topic)?;
    topics.check_free_space().map_err(status::topic)?;
    let sent_as_batch = !request.batch.is_empty();
    if sent_as_batch && !request.records.is_empty() {
        return Err(Status::invalid_argument(
            "a produce request carries records or one encoded batch, not both",
        ));
    }
    if request.records.is_empty() && !sent_as_batch {
        return Err(Status::invalid_argument(
            "a produce request needs at least one record",
        ));
    }
    if sent_as_batch && request.partition.is_none() {
        return Err(Status::invalid_argument(
            "a produce request with an encoded batch names its partition",
        ));
    }
    if let Some(partition) = request.partition {
        topic.partition(partition).map_err(status::topic)?;
    }
    let producer = match &request.producer {
        None => ProducerInfo::NONE,
        Some(p) => {
            if request.partition.is_none() {
                return Err(Status::invalid_argument(
                    "an idempotent produce request names its partition: sequences are per partition",
                ));
            }
            if p.producer_id == NO_PRODUCER_ID {
                return Err(Status::invalid_argument(format!(
                    "producer id {} is reserved",
                    p.producer_id
                )));
            }
            let epoch = u16::try_from(p.epoch)
                .ok()
                .filter(|e| *e != NO_PRODUCER_EPOCH)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("producer epoch {} is out of range", p.epoch))
                })?;
            if p.base_sequence < 0 {
                return Err(Status::invalid_argument(format!(
                    "base sequence {} is negative",
                    p.base_sequence
                )));
            }
            ProducerInfo {
                producer_id: p.producer_id,
                epoch,
                base_sequence: p.base_sequence,
            }
        }
    };
    let config = topic.config();
    let forced = config.forced_compression().map_err(status::topic)?;
    if sent_as_batch {
        let partition = request.partition.expect("checked above");
        let batch = check_client_batch(request.batch, producer, &config)?;
        let batch = in_codec(batch, forced)?;
        return Ok(Prepared {
            topic,
            records: batch.record_count() as usize,
            batches: vec![(partition, batch, Vec::new())],
            sent_as_batch,
        });
    }
    let codec = forced.unwrap_or(Compression::None);
    let max = config.max_record_bytes as usize;
    if let Some((index, size)) = request
        .records
        .iter()
        .map(record_size)
        .enumerate()
        .find(|(_, size)| *size > max)
    {
        return Err(Status::invalid_argument(format!(
            "record {index} is {size} bytes; topic {:?} accepts records of at most {max} bytes \
             (its encoded key, value and headers)",
            topic.name()
        )));
    }
    let now = now_ms();
    let records = request.records.len();
    let mut by_partition: BTreeMap<u32, Vec<(usize, crate::storage::Record)>> = BTreeMap::new();
    // The keyless records of one request share one round-robin partition.
    let mut keyless = None;
    for (index, record) in request.records.into_iter().enumerate() {
        let partition = match (request.partition, record.key.as_deref()) {
            (Some(partition), _) => partition,
            (None, Some(key)) => topic.partition_for_key(key),
            (None, None) => *keyless.get_or_insert_with(|| topic.next_partition()),
        };
        by_partition
            .entry(partition)
            .or_default()
            .push((index, record_from_proto(record, now)));
    }
    let batch_limit = config.batch_limit() as usize;
    let mut batches = Vec::new();
    for (partition, records) in by_partition {
        let mut builder = BatchBuilder::default();
        let mut indexes = Vec::new();
        for (index, record) in records {
            if !builder.is_empty()
                && builder.encoded_len() + builder.record_encoded_len(&record) > batch_limit
            {
                if producer != ProducerInfo::NONE {
                    // Its sequence range names one batch: it cannot be split.
                    return Err(Status::invalid_argument(format!(
                        "an idempotent produce request must fit in one batch of {batch_limit} bytes"
                    )));
                }
                let full = std::mem::take(&mut builder);
                batches.push((
                    partition,
                    full.finish_compressed(ProducerInfo::NONE, codec),
                    std::mem::take(&mut indexes),
                ));
            }
            builder.push(&record);
            indexes.push(index);
        }
        batches.push((
            partition,
            builder.finish_compressed(producer, codec),
            indexes,
        ));
    }
    Ok(Prepared {
        topic,
        batches,
        records,
        sent_as_batch,
    })
}

/// Checks and encodes a request, then writes its batches in order (no sync
/// wait), all on the blocking pool: encoding copies and checksums up to a
/// message's worth of bytes.
async fn write(
    topics: Arc<TopicRegistry>,
    metrics: Option<ProduceMetrics>,
    request: v1::ProduceRequest,
) -> Result<Written, Status> {
    tokio::task::spawn_blocking(move || {
        let prepared = prepare(&topics, request)?;
        let now = now_ms();
        let mut written = Vec::with_capacity(prepared.batches.len());
        for (partition, batch, indexes) in prepared.batches {
            let appended = append_batch(
                &topics,
                &prepared.topic,
                partition,
                &batch,
                now,
                metrics.as_ref(),
            )
            .map_err(|e| match e {
                AppendError::Topic(e) => status::topic(e),
                AppendError::Append(e) => status::producer_append(e),
            })?;
            written.push((partition, appended, indexes));
        }
        Ok(Written {
            topic: prepared.topic,
            batches: written,
            records: prepared.records,
            sent_as_batch: prepared.sent_as_batch,
        })
    })
    .await
    .map_err(status::join)?
}

/// Waits for the writes' syncs and says where each record landed. Writes
/// that are visible already (flush `os` or `interval`, or a sync that
/// finished meanwhile) are answered at once, without a trip through the
/// blocking pool.
async fn acknowledge(written: Written) -> Result<v1::ProduceResponse, Status> {
    let visible = written.batches.iter().all(|(partition, appended, _)| {
        written
            .topic
            .partition(*partition)
            .is_ok_and(|p| p.log().high_watermark() > appended.info.last_offset)
    });
    if visible {
        return respond(&written);
    }
    tokio::task::spawn_blocking(move || respond(&written))
        .await
        .map_err(status::join)?
}

/// The answer to a written request, once each of its batches is synced
/// (a wait only for those that are not yet).
fn respond(written: &Written) -> Result<v1::ProduceResponse, Status> {
    for (partition, appended, _) in &written.batches {
        written
            .topic
            .partition(*partition)
            .map_err(status::topic)?
            .appender()
            .wait(appended)
            .map_err(status::storage)?;
    }
    let duplicate = written
        .batches
        .iter()
        .any(|(_, appended, _)| appended.duplicate);
    if written.sent_as_batch {
        let (partition, appended, _) = &written.batches[0];
        return Ok(v1::ProduceResponse {
            positions: Vec::new(),
            duplicate,
            partition: *partition,
            base_offset: appended.info.base_offset,
            record_count: (appended.info.last_offset - appended.info.base_offset + 1) as u32,
        });
    }
    let mut positions = vec![v1::RecordPosition::default(); written.records];
    for (partition, appended, indexes) in &written.batches {
        for (i, index) in indexes.iter().enumerate() {
            positions[*index] = v1::RecordPosition {
                partition: *partition,
                offset: appended.info.base_offset + i as u64,
            };
        }
    }
    Ok(v1::ProduceResponse {
        positions,
        duplicate,
        ..Default::default()
    })
}

fn stream_error(request_id: u64, status: Status) -> v1::ProduceStreamResponse {
    v1::ProduceStreamResponse {
        request_id,
        response: None,
        error_code: status.code() as i32,
        error_reason: status::reason(&status),
        error_message: status.message().to_owned(),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<v1::ProduceStreamResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ProduceService for Produce {
    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().topic, records = request.get_ref().records.len()))]
    async fn produce(
        &self,
        request: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        self.access.check(
            &request,
            Operation::Write,
            Resource::topic(&request.get_ref().topic),
        )?;
        let written = write(
            Arc::clone(&self.topics),
            self.metrics.clone(),
            request.into_inner(),
        )
        .await?;
        Ok(Response::new(acknowledge(written).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn init_producer(
        &self,
        request: Request<v1::InitProducerRequest>,
    ) -> Result<Response<v1::InitProducerResponse>, Status> {
        let caller = self.access.caller(&request)?;
        // A named producer fences every older instance of its name, so the
        // name is guarded like Kafka's transactional id: write on the
        // cluster. An unnamed id writes nothing by itself; as in Kafka
        // (KIP-679), write on any topic (or the cluster) is enough.
        if request.get_ref().name.is_some() {
            self.access
                .check_principal(&caller, Operation::Write, Resource::cluster())?;
        } else if !self
            .access
            .authorizer()
            .may_init_producer(&caller, self.topics.list().iter().map(|t| t.name()))
        {
            return Err(Status::permission_denied(format!(
                "principal {:?} may not write any topic, so it needs no producer id",
                caller.name
            )));
        }
        let name = request.into_inner().name;
        let topics = Arc::clone(&self.topics);
        let identity = tokio::task::spawn_blocking(move || {
            topics
                .producer_ids()
                .init(name.as_deref())
                .map_err(status::producer_state)
        })
        .await
        .map_err(status::join)??;
        tracing::info!(
            producer_id = identity.producer_id,
            epoch = identity.epoch,
            "producer initialised"
        );
        Ok(Response::new(v1::InitProducerResponse {
            producer_id: identity.producer_id,
            epoch: u32::from(identity.epoch),
        }))
    }

    type ProduceStreamStream = ResponseStream;

    async fn produce_stream(
        &self,
        request: Request<Streaming<v1::ProduceRequest>>,
    ) -> Result<Response<Self::ProduceStreamStream>, Status> {
        let caller = self.access.caller(&request)?;
        let access = self.access.clone();
        let mut inbound = request.into_inner();
        let (responses, out) = mpsc::channel(STREAM_IN_FLIGHT);
        // Acknowledgements in request order: one task per request, awaited
        // in turn, so syncs of consecutive requests overlap.
        let (pending, mut pending_rx) =
            mpsc::channel::<tokio::task::JoinHandle<v1::ProduceStreamResponse>>(STREAM_IN_FLIGHT);
        let topics = Arc::clone(&self.topics);
        let metrics = self.metrics.clone();
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = inbound.message() => message,
                    _ = shutdown.wait_for(|stop| *stop) => break,
                };
                let request = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => break,
                    Err(status) => {
                        // Tell the client why its stream stops (an
                        // over-limit message, say), then stop reading.
                        let status = status::inbound(status);
                        tracing::debug!(%status, "produce stream ended");
                        let report = tokio::spawn(async move { stream_error(0, status) });
                        let _ = pending.send(report).await;
                        break;
                    }
                };
                let id = request.request_id;
                // Every request of the stream is checked: a revoked token
                // or rule stops the next write.
                if let Err(status) =
                    access.recheck(&caller, Operation::Write, Resource::topic(&request.topic))
                {
                    let report = tokio::spawn(async move { stream_error(id, status) });
                    if pending.send(report).await.is_err() {
                        break;
                    }
                    continue;
                }
                // Writes happen here, one request after the other, so
                // the stream's order is the log's order.
                let written = write(Arc::clone(&topics), metrics.clone(), request).await;
                let handle = tokio::spawn(async move {
                    match written {
                        Ok(written) => match acknowledge(written).await {
                            Ok(response) => v1::ProduceStreamResponse {
                                request_id: id,
                                response: Some(response),
                                ..Default::default()
                            },
                            Err(status) => stream_error(id, status),
                        },
                        Err(status) => stream_error(id, status),
                    }
                });
                if pending.send(handle).await.is_err() {
                    break;
                }
            }
        });
        tokio::spawn(async move {
            while let Some(handle) = pending_rx.recv().await {
                let response = match handle.await {
                    Ok(response) => response,
                    Err(e) => stream_error(0, status::join(e)),
                };
                if responses.send(Ok(response)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}
