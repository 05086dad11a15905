//! `ConsumeService`: fetch, push subscriptions, offset lookups.
//!
//! Reads go through the blocking pool (a read can fault pages in from
//! disk). Waiting for new records never polls: a long-polling fetch and a
//! caught-up subscription sleep on the partition's high-watermark `watch`
//! and wake when it moves. Every answer stays under the broker's message
//! limit, so a consumer can always make progress.
//!
//! Two answers: decoded `ConsumedRecord`s (the default, for any language),
//! or, with `RECORD_FORMAT_BATCHES`, the stored batches verbatim: a
//! zero-copy slice of the segment's map, whole batches, with the offset to
//! start from inside the first ([`read_batches`]). Compressed batches go
//! out compressed; only the records answer decompresses.

use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1::{self, consume_service_server::ConsumeService};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::auth::Access;
use super::convert::consumed;
use super::{EndsWith, status};
use crate::auth::{Operation, Resource, ResourceType};
use crate::storage::{BatchHeader, PartitionLog, StorageError, StoredRecord};
use crate::topics::{Topic, TopicRegistry};

const DEFAULT_MAX_RECORDS: usize = 500;
const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);
/// Messages a subscription may have queued for a slow reader: past this,
/// its partition readers wait (flow control; HTTP/2 windows do the rest).
const SUBSCRIBE_QUEUE: usize = 8;
/// Room left in a message for everything but the records.
const RESPONSE_OVERHEAD: usize = 1024;

pub(crate) struct Consume {
    pub(crate) access: Access,
    pub(crate) topics: Arc<TopicRegistry>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The largest message the server sends.
    pub(crate) max_message_bytes: usize,
}

impl Consume {
    /// A long-polling fetch's wait for the high watermark to pass `from`:
    /// true if it is worth reading again (it moved, or the wait ran out),
    /// false if there is nothing to wait for (`wait` is zero or the broker
    /// is shutting down). A deleted topic ends the fetch with NOT_FOUND.
    async fn wait_past(
        &self,
        topic: &Topic,
        log: &PartitionLog,
        from: u64,
        wait: Duration,
    ) -> Result<bool, Status> {
        if wait.is_zero() {
            return Ok(false);
        }
        let mut watcher = log.subscribe();
        let interrupted = interruption(topic, self.shutdown.clone());
        tokio::select! {
            _ = tokio::time::timeout(wait, watcher.wait_for(|hw| *hw > from)) => Ok(true),
            status = interrupted => {
                if topic.is_deleted() {
                    return Err(status);
                }
                // Shutting down: answer with what there is (nothing).
                Ok(false)
            }
        }
    }

    /// Bytes of records one answer may carry.
    fn records_budget(&self) -> usize {
        self.max_message_bytes
            .saturating_sub(RESPONSE_OVERHEAD)
            .max(1)
    }
}

/// Reads and decodes up to `max_records` records from `from` on the
/// blocking pool. The outer error is a failed task, the inner one the log's.
async fn read(
    log: Arc<PartitionLog>,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Result<Vec<StoredRecord>, StorageError>, Status> {
    tokio::task::spawn_blocking(move || {
        let mut records = log.read_records(from, max_bytes)?;
        records.truncate(max_records);
        Ok(records)
    })
    .await
    .map_err(status::join)
}

/// Turns records into their wire form, keeping as many as fit in `budget`
/// encoded bytes. The first record always fits unless it was written under
/// a larger message limit than the broker has now (topics cap record sizes
/// below the limit): that is RESOURCE_EXHAUSTED, naming the way out.
/// The records kept are counted as read out of `log` (its traffic).
fn to_wire(
    log: &PartitionLog,
    topic: &str,
    partition: u32,
    records: Vec<StoredRecord>,
    budget: usize,
) -> Result<Vec<v1::ConsumedRecord>, Status> {
    let mut used = 0;
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        let record = consumed(topic, partition, record);
        let len = prost::Message::encoded_len(&record);
        // Tag byte, length prefix, message.
        used += 1 + prost::length_delimiter_len(len) + len;
        if used > budget {
            if out.is_empty() {
                return Err(Status::resource_exhausted(format!(
                    "the record at offset {} of {topic:?} partition {partition} takes {len} bytes, \
                     more than the broker's message limit allows; restart the broker with a \
                     larger --max-message-bytes to read it",
                    record.offset
                )));
            }
            used -= 1 + prost::length_delimiter_len(len) + len;
            break;
        }
        out.push(record);
    }
    log.traffic().read_out(out.len() as u64, used as u64);
    Ok(out)
}

/// Whole stored batches from the one holding `from`, as the log holds them.
#[derive(Debug, Default)]
struct Batches {
    bytes: bytes::Bytes,
    /// The offset after the last batch: where the next read starts.
    next_offset: u64,
}

/// Reads whole batches from the one holding `from`, up to about
/// `max_bytes`, on the blocking pool (a read can fault pages in), keeping
/// to `budget` bytes: the first batch always, unless it alone is over the
/// budget (written under a larger message limit than the broker has now),
/// which is RESOURCE_EXHAUSTED. The records sent from `from` on are
/// counted as read out of `log`.
async fn read_batches(
    log: Arc<PartitionLog>,
    topic: String,
    partition: u32,
    from: u64,
    max_bytes: usize,
    budget: usize,
) -> Result<Result<Batches, StorageError>, Status> {
    tokio::task::spawn_blocking(move || {
        let chunk = match log.read(from, max_bytes) {
            Ok(chunk) => chunk.data,
            Err(e) => return Ok(Err(e)),
        };
        let mut end = 0;
        let mut next_offset = from;
        let mut records = 0u64;
        while end < chunk.len() {
            // The log's own bytes, checked when they were written and when
            // the log was opened; the consumer verifies each checksum.
            let header = BatchHeader::parse(&chunk[end..])
                .map_err(|e| Status::data_loss(format!("partition {partition}: {e}")))?;
            if end + header.total_len() > budget {
                if end == 0 {
                    return Err(Status::resource_exhausted(format!(
                        "the batch at offset {} of {topic:?} partition {partition} takes {} \
                         bytes, more than the broker's message limit allows; restart the broker \
                         with a larger --max-message-bytes to read it",
                        header.base_offset,
                        header.total_len()
                    )));
                }
                break;
            }
            end += header.total_len();
            records += header.next_offset() - header.base_offset.max(from);
            next_offset = header.next_offset();
        }
        log.traffic().read_out(records, end as u64);
        Ok(Ok(Batches {
            bytes: chunk.slice(..end),
            next_offset,
        }))
    })
    .await
    .map_err(status::join)?
}

/// Whether a request asked for stored batches rather than records.
fn wants_batches(format: i32) -> Result<bool, Status> {
    match v1::RecordFormat::try_from(format) {
        Ok(v1::RecordFormat::Unspecified | v1::RecordFormat::Records) => Ok(false),
        Ok(v1::RecordFormat::Batches) => Ok(true),
        Err(_) => Err(Status::invalid_argument(format!(
            "record format {format} is not RECORDS (1) or BATCHES (2)"
        ))),
    }
}

fn partitions_of(topic: &Topic, requested: &[u32]) -> Result<Vec<u32>, Status> {
    if requested.is_empty() {
        return Ok((0..topic.partition_count()).collect());
    }
    for &p in requested {
        topic.partition(p).map_err(status::topic)?;
    }
    let mut partitions = requested.to_vec();
    partitions.sort_unstable();
    partitions.dedup();
    Ok(partitions)
}

fn deleted_status(topic: &str) -> Status {
    Status::not_found(format!("topic {topic:?} was deleted"))
}

/// Completes when the broker shuts down or the topic is deleted, with the
/// status that ends a stream or a wait for that reason.
fn interruption(
    topic: &Topic,
    mut shutdown: watch::Receiver<bool>,
) -> impl Future<Output = Status> + Send + 'static {
    let mut deleted = topic.deleted();
    let name = topic.name().to_owned();
    async move {
        // A closed channel means the same as `true`: the sender went with
        // the topic or the server.
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => Status::unavailable("the broker is shutting down"),
            _ = deleted.wait_for(|deleted| *deleted) => deleted_status(&name),
        }
    }
}

type SubscribeStream = EndsWith<ReceiverStream<Result<v1::SubscribeResponse, Status>>>;

#[tonic::async_trait]
impl ConsumeService for Consume {
    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().topic, partition = request.get_ref().partition, offset = request.get_ref().offset))]
    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        self.access.check(
            &request,
            Operation::Read,
            Resource::topic(&request.get_ref().topic),
        )?;
        let request = request.into_inner();
        super::request_span::record_topic(&request.topic);
        let topic = self.topics.get(&request.topic).map_err(status::topic)?;
        let log = Arc::clone(
            topic
                .partition(request.partition)
                .map_err(status::topic)?
                .log(),
        );
        let max_records = match request.max_records {
            0 => DEFAULT_MAX_RECORDS,
            n => n as usize,
        };
        let budget = self.records_budget();
        let max_bytes = match request.max_bytes {
            0 => DEFAULT_MAX_BYTES,
            n => n as usize,
        }
        .min(budget);
        let wait = Duration::from_millis(u64::from(request.max_wait_ms)).min(MAX_FETCH_WAIT);
        let from = request.offset;
        if wants_batches(request.format)? {
            let read = || {
                read_batches(
                    Arc::clone(&log),
                    topic.name().to_owned(),
                    request.partition,
                    from,
                    max_bytes,
                    budget,
                )
            };
            // Validates the offset (OUT_OF_RANGE) even when we go on to wait.
            let mut batches = read().await?.map_err(status::storage)?;
            if batches.bytes.is_empty() && self.wait_past(&topic, &log, from, wait).await? {
                batches = read().await?.map_err(status::storage)?;
            }
            return Ok(Response::new(v1::FetchResponse {
                records: Vec::new(),
                next_offset: batches.next_offset,
                high_watermark: log.high_watermark(),
                log_start_offset: log.log_start_offset(),
                batches: batches.bytes,
                first_offset: from,
            }));
        }
        // Validates the offset (OUT_OF_RANGE) even when we go on to wait.
        let mut records = read(Arc::clone(&log), from, max_records, max_bytes)
            .await?
            .map_err(status::storage)?;
        if records.is_empty() && self.wait_past(&topic, &log, from, wait).await? {
            records = read(Arc::clone(&log), from, max_records, max_bytes)
                .await?
                .map_err(status::storage)?;
        }
        let records = to_wire(&log, topic.name(), request.partition, records, budget)?;
        let next_offset = records.last().map_or(from, |r| r.offset + 1);
        Ok(Response::new(v1::FetchResponse {
            records,
            next_offset,
            high_watermark: log.high_watermark(),
            log_start_offset: log.log_start_offset(),
            ..Default::default()
        }))
    }

    type SubscribeStream = SubscribeStream;

    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().topic))]
    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = self.access.check(
            &request,
            Operation::Read,
            Resource::topic(&request.get_ref().topic),
        )?;
        let request = request.into_inner();
        let topic = self.topics.get(&request.topic).map_err(status::topic)?;
        let partitions = partitions_of(&topic, &request.partitions)?;
        let batches = wants_batches(request.format)?;
        let max_records = match request.max_batch_records {
            0 => DEFAULT_MAX_RECORDS,
            n => n as usize,
        };
        let logs: Vec<(u32, Arc<PartitionLog>)> = partitions
            .iter()
            .map(|&p| {
                Ok((
                    p,
                    Arc::clone(topic.partition(p).map_err(status::topic)?.log()),
                ))
            })
            .collect::<Result<_, Status>>()?;
        // Finding a timestamp reads the index and maybe the log.
        let start = request.start;
        let starts = tokio::task::spawn_blocking({
            let logs = logs.clone();
            move || {
                logs.iter()
                    .map(|(_, log)| start_offset(log, start.as_ref()))
                    .collect::<Result<Vec<u64>, Status>>()
            }
        })
        .await
        .map_err(status::join)??;
        let (sender, receiver) = mpsc::channel(SUBSCRIBE_QUEUE);
        let budget = self.records_budget();
        for ((partition, log), next) in logs.into_iter().zip(starts) {
            let reader = PartitionReader {
                topic: topic.name().to_owned(),
                partition,
                log,
                next,
                max_records,
                budget,
                batches,
                sender: sender.clone(),
            };
            tokio::spawn(reader.run());
        }
        // The stream ends at once on shutdown or deletion, whatever is still
        // queued for a slow reader; the readers then see the stream gone.
        // ... and when the caller may no longer read it (a revoked token
        // or rule), within about a second.
        let interrupted = interruption(&topic, self.shutdown.clone());
        let revoked = self.access.revoked(
            caller,
            Operation::Read,
            ResourceType::Topic,
            topic.name().to_owned(),
        );
        Ok(Response::new(EndsWith::new(
            ReceiverStream::new(receiver),
            async move {
                tokio::select! {
                    status = interrupted => status,
                    status = revoked => status,
                }
            },
        )))
    }

    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().topic))]
    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        self.access.check(
            &request,
            Operation::Describe,
            Resource::topic(&request.get_ref().topic),
        )?;
        let request = request.into_inner();
        let topic = self.topics.get(&request.topic).map_err(status::topic)?;
        let partitions = partitions_of(&topic, &request.partitions)?;
        enum Spec {
            Earliest,
            Latest,
            Time(i64),
        }
        let spec = match request.spec {
            Some(v1::list_offsets_request::Spec::TimestampMs(ts)) => Spec::Time(ts),
            Some(v1::list_offsets_request::Spec::Position(p)) => {
                match v1::OffsetSpec::try_from(p) {
                    Ok(v1::OffsetSpec::Earliest) => Spec::Earliest,
                    Ok(v1::OffsetSpec::Latest) => Spec::Latest,
                    _ => {
                        return Err(Status::invalid_argument(format!(
                            "offset spec {p} is not EARLIEST (1), LATEST (2) or a timestamp"
                        )));
                    }
                }
            }
            None => {
                return Err(Status::invalid_argument(
                    "say which offset: a position (EARLIEST, LATEST) or a timestamp",
                ));
            }
        };
        // A lookup by time reads the index and maybe the log.
        let offsets = tokio::task::spawn_blocking(move || {
            partitions
                .into_iter()
                .map(|partition| {
                    let log = topic.partition(partition).map_err(status::topic)?.log();
                    let offset = match spec {
                        Spec::Earliest => log.log_start_offset(),
                        Spec::Latest => log.high_watermark(),
                        Spec::Time(ts) => log
                            .offset_for_timestamp(ts)
                            .unwrap_or_else(|| log.high_watermark()),
                    };
                    Ok(v1::PartitionOffset { partition, offset })
                })
                .collect::<Result<Vec<_>, Status>>()
        })
        .await
        .map_err(status::join)??;
        Ok(Response::new(v1::ListOffsetsResponse { offsets }))
    }
}

fn start_offset(
    log: &PartitionLog,
    start: Option<&v1::subscribe_request::Start>,
) -> Result<u64, Status> {
    use v1::subscribe_request::Start;
    Ok(match start {
        Some(Start::Offset(offset)) => {
            (*offset).clamp(log.log_start_offset(), log.high_watermark())
        }
        Some(Start::TimestampMs(ts)) => log
            .offset_for_timestamp(*ts)
            .unwrap_or_else(|| log.high_watermark()),
        Some(Start::Position(p)) => match v1::StartPosition::try_from(*p) {
            Ok(v1::StartPosition::Earliest) => log.log_start_offset(),
            Ok(v1::StartPosition::Latest) => log.high_watermark(),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "start position {p} is not EARLIEST (1) or LATEST (2)"
                )));
            }
        },
        None => {
            return Err(Status::invalid_argument(
                "say where to start: an offset, a timestamp or a position",
            ));
        }
    })
}

/// Pushes one partition's records into a subscription as they arrive, until
/// the subscription's stream is gone.
struct PartitionReader {
    topic: String,
    partition: u32,
    log: Arc<PartitionLog>,
    next: u64,
    max_records: usize,
    budget: usize,
    /// Send stored batches verbatim rather than records.
    batches: bool,
    sender: mpsc::Sender<Result<v1::SubscribeResponse, Status>>,
}

impl PartitionReader {
    /// Reads the next message's worth: `Ok(None)` when caught up.
    async fn next_message(
        &self,
    ) -> Result<Result<Option<v1::SubscribeResponse>, StorageError>, Status> {
        let max_bytes = DEFAULT_MAX_BYTES.min(self.budget);
        if self.batches {
            let read = read_batches(
                Arc::clone(&self.log),
                self.topic.clone(),
                self.partition,
                self.next,
                max_bytes,
                self.budget,
            )
            .await?;
            return Ok(read.map(|b| {
                (!b.bytes.is_empty()).then(|| v1::SubscribeResponse {
                    records: Vec::new(),
                    partition: self.partition,
                    batches: b.bytes,
                    first_offset: self.next,
                    next_offset: b.next_offset,
                })
            }));
        }
        let read = read(
            Arc::clone(&self.log),
            self.next,
            self.max_records,
            max_bytes,
        )
        .await?;
        match read {
            Ok(records) if records.is_empty() => Ok(Ok(None)),
            Ok(records) => {
                let records =
                    to_wire(&self.log, &self.topic, self.partition, records, self.budget)?;
                let next_offset = records.last().map_or(self.next, |r| r.offset + 1);
                Ok(Ok(Some(v1::SubscribeResponse {
                    records,
                    next_offset,
                    ..Default::default()
                })))
            }
            Err(e) => Ok(Err(e)),
        }
    }

    async fn run(mut self) {
        let mut watcher = self.log.subscribe();
        loop {
            let read = match self.next_message().await {
                Ok(read) => read,
                Err(status) => {
                    let _ = self.sender.send(Err(status)).await;
                    return;
                }
            };
            match read {
                Ok(Some(message)) => {
                    self.next = message.next_offset;
                    // Waits while the reader is behind: flow control. Fails
                    // once the stream is gone.
                    if self.sender.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    // Caught up: sleep until the high watermark moves.
                    let next = self.next;
                    tokio::select! {
                        changed = watcher.wait_for(|hw| *hw > next) => if changed.is_err() { return },
                        _ = self.sender.closed() => return,
                    }
                }
                Err(StorageError::OffsetOutOfRange { start, .. }) if self.next < start => {
                    // Retention deleted what we were about to read.
                    tracing::warn!(topic = %self.topic, partition = self.partition, from = self.next, to = start,
                        "subscription skipped records deleted by retention");
                    self.next = start;
                }
                Err(e) => {
                    let _ = self.sender.send(Err(status::storage(e))).await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::Record;

    fn stored(offset: u64, value_len: usize) -> StoredRecord {
        StoredRecord {
            offset,
            record: Record {
                key: None,
                value: Bytes::from(vec![7u8; value_len]),
                headers: vec![],
                timestamp: 1,
            },
        }
    }

    #[test]
    fn answers_keep_to_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let log = PartitionLog::open(dir.path(), crate::storage::LogConfig::default()).unwrap();
        let records: Vec<_> = (0..10).map(|o| stored(o, 1000)).collect();
        let wire = to_wire(&log, "t", 0, records.clone(), 3500).unwrap();
        assert_eq!(wire.len(), 3, "three records of ~1 KiB fit in 3500 bytes");
        let response = v1::FetchResponse {
            records: wire,
            ..Default::default()
        };
        let encoded = prost::Message::encoded_len(&response);
        assert!(encoded <= 3500);
        // What was kept is counted as read out, in its wire size.
        let counts = log.traffic().counts();
        assert_eq!(counts.records_out, 3);
        assert_eq!(counts.bytes_out, encoded as u64);
        assert_eq!(
            to_wire(&log, "t", 0, records.clone(), usize::MAX)
                .unwrap()
                .len(),
            10
        );
        assert_eq!(log.traffic().counts().records_out, 13);
        // A record larger than the whole budget cannot be sent at all.
        let status = to_wire(&log, "t", 3, records[4..].to_vec(), 900).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("offset 4 of \"t\" partition 3"),
            "{status:?}"
        );
    }
}
