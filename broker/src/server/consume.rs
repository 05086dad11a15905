//! `ConsumeService`: fetch, push subscriptions, offset lookups.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use sluice_proto::v1::{self, consume_service_server::ConsumeService};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::convert::consumed;
use super::status;
use crate::storage::{PartitionLog, StorageError, StoredRecord};
use crate::topics::{Topic, TopicRegistry};

const DEFAULT_MAX_RECORDS: usize = 500;
const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);
/// Messages a subscription may have queued for a slow reader: past this,
/// its partition readers wait (flow control).
const SUBSCRIBE_QUEUE: usize = 8;

pub(crate) struct Consume {
    pub(crate) topics: Arc<TopicRegistry>,
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Reads and decodes up to `max_records` records from `from`, on the
/// blocking pool (a read may fault pages in from disk).
async fn read(
    log: Arc<PartitionLog>,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<Vec<StoredRecord>, StorageError> {
    tokio::task::spawn_blocking(move || {
        let mut records = log.read_records(from, max_bytes)?;
        records.truncate(max_records);
        Ok(records)
    })
    .await
    .unwrap_or_else(|e| {
        Err(StorageError::Io {
            op: "read",
            path: Default::default(),
            source: std::io::Error::other(e.to_string()),
        })
    })
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

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<v1::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ConsumeService for Consume {
    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().topic, partition = request.get_ref().partition, offset = request.get_ref().offset))]
    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        let request = request.into_inner();
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
        let max_bytes = match request.max_bytes {
            0 => DEFAULT_MAX_BYTES,
            n => n as usize,
        };
        let wait = Duration::from_millis(u64::from(request.max_wait_ms)).min(MAX_FETCH_WAIT);
        let from = request.offset;
        // Validates the offset (OUT_OF_RANGE) even when we go on to wait.
        let mut records = read(Arc::clone(&log), from, max_records, max_bytes)
            .await
            .map_err(status::storage)?;
        if records.is_empty() && !wait.is_zero() {
            let mut watcher = log.subscribe();
            let mut shutdown = self.shutdown.clone();
            tokio::select! {
                _ = tokio::time::timeout(wait, watcher.wait_for(|hw| *hw > from)) => {}
                _ = shutdown.wait_for(|stop| *stop) => {}
            }
            records = read(Arc::clone(&log), from, max_records, max_bytes)
                .await
                .map_err(status::storage)?;
        }
        let next_offset = records.last().map_or(from, |r| r.offset + 1);
        Ok(Response::new(v1::FetchResponse {
            records: records
                .into_iter()
                .map(|r| consumed(topic.name(), request.partition, r))
                .collect(),
            next_offset,
            high_watermark: log.high_watermark(),
            log_start_offset: log.log_start_offset(),
        }))
    }

    type SubscribeStream = SubscribeStream;

    #[tracing::instrument(skip_all, fields(topic = %request.get_ref().topic))]
    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let topic = self.topics.get(&request.topic).map_err(status::topic)?;
        let partitions = partitions_of(&topic, &request.partitions)?;
        let max_records = match request.max_batch_records {
            0 => DEFAULT_MAX_RECORDS,
            n => n as usize,
        };
        let (sender, receiver) = mpsc::channel(SUBSCRIBE_QUEUE);
        for partition in partitions {
            let log = Arc::clone(topic.partition(partition).map_err(status::topic)?.log());
            let start = start_offset(&log, request.start.as_ref())?;
            let reader = PartitionReader {
                topic: topic.name().to_owned(),
                partition,
                log,
                next: start,
                max_records,
                sender: sender.clone(),
                shutdown: self.shutdown.clone(),
            };
            tokio::spawn(reader.run());
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        let request = request.into_inner();
        let topic = self.topics.get(&request.topic).map_err(status::topic)?;
        let partitions = partitions_of(&topic, &request.partitions)?;
        let mut offsets = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let log = topic.partition(partition).map_err(status::topic)?.log();
            let offset = match request.spec {
                Some(v1::list_offsets_request::Spec::TimestampMs(ts)) => log
                    .offset_for_timestamp(ts)
                    .unwrap_or_else(|| log.high_watermark()),
                Some(v1::list_offsets_request::Spec::Position(p)) => {
                    match v1::OffsetSpec::try_from(p) {
                        Ok(v1::OffsetSpec::Earliest) => log.log_start_offset(),
                        Ok(v1::OffsetSpec::Latest) => log.high_watermark(),
                        _ => {
                            return Err(Status::invalid_argument(
                                "offset spec must be EARLIEST, LATEST or a timestamp",
                            ));
                        }
                    }
                }
                None => {
                    return Err(Status::invalid_argument(
                        "say which offset: a position (EARLIEST, LATEST) or a timestamp",
                    ));
                }
            };
            offsets.push(v1::PartitionOffset { partition, offset });
        }
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
                return Err(Status::invalid_argument(
                    "start position must be EARLIEST or LATEST",
                ));
            }
        },
        None => {
            return Err(Status::invalid_argument(
                "say where to start: an offset, a timestamp or a position",
            ));
        }
    })
}

/// Pushes one partition's records into a subscription as they arrive.
struct PartitionReader {
    topic: String,
    partition: u32,
    log: Arc<PartitionLog>,
    next: u64,
    max_records: usize,
    sender: mpsc::Sender<Result<v1::SubscribeResponse, Status>>,
    shutdown: watch::Receiver<bool>,
}

impl PartitionReader {
    async fn run(mut self) {
        let mut watcher = self.log.subscribe();
        loop {
            if *self.shutdown.borrow() {
                let _ = self
                    .sender
                    .send(Err(Status::unavailable("the broker is shutting down")))
                    .await;
                return;
            }
            match read(
                Arc::clone(&self.log),
                self.next,
                self.max_records,
                DEFAULT_MAX_BYTES,
            )
            .await
            {
                Ok(records) if !records.is_empty() => {
                    self.next = records.last().map_or(self.next, |r| r.offset + 1);
                    let message = v1::SubscribeResponse {
                        records: records
                            .into_iter()
                            .map(|r| consumed(&self.topic, self.partition, r))
                            .collect(),
                    };
                    // Waits while the reader is behind: flow control.
                    tokio::select! {
                        sent = self.sender.send(Ok(message)) => if sent.is_err() { return },
                        _ = self.shutdown.wait_for(|stop| *stop) => continue,
                    }
                }
                Ok(_) => {
                    // Caught up: sleep until the high watermark moves.
                    let next = self.next;
                    tokio::select! {
                        changed = watcher.wait_for(|hw| *hw > next) => if changed.is_err() { return },
                        _ = self.shutdown.wait_for(|stop| *stop) => continue,
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
