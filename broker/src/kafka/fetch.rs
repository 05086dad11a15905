//! Fetch (with long poll) and ListOffsets.
//!
//! A fetch reads each partition asked for through its topic, translates
//! the stored batches to Kafka batches ([`records::kafka_batches`]), and
//! answers once it has `min_bytes` or `max_wait_ms` has passed. Waiting
//! never polls: it sleeps on the partitions' high-watermark `watch`es, as
//! gRPC's long-polling fetch does. Fetch sessions (KIP-227) are not kept:
//! every answer carries session id 0, which tells the client to send full
//! requests, and every answer is a full one.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::{
    BrokerId, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
};
use tokio::sync::watch;

use super::errors::{Failure, KafkaCode};
use super::{Context, partition_of, records};
use crate::auth::Operation;
use crate::storage::PartitionLog;

/// The longest a fetch waits, whatever it asks.
const MAX_FETCH_WAIT: Duration = Duration::from_secs(30);
/// Kafka's `fetch.max.bytes` default, for requests that give none.
const DEFAULT_MAX_BYTES: usize = 50 * 1024 * 1024;
/// ListOffsets' special timestamps.
const LATEST: i64 = -1;
const EARLIEST: i64 = -2;

/// One partition of a fetch: where it reads, and what it found.
struct PartitionRead {
    index: i32,
    offset: i64,
    max_bytes: usize,
    log: Result<Arc<PartitionLog>, Failure>,
    result: Option<Result<Read, Failure>>,
}

struct Read {
    records: Bytes,
    high_watermark: u64,
    log_start_offset: u64,
}

pub(super) async fn fetch(
    context: &Arc<Context>,
    request: FetchRequest,
    version: i16,
) -> FetchResponse {
    let mut response = FetchResponse::default();
    if version >= 7 && request.session_id != 0 {
        // No session was ever handed out (every answer says 0).
        response.error_code = KafkaCode::FetchSessionIdNotFound.code();
        return response;
    }
    let mut reads: Vec<(String, Vec<PartitionRead>)> = Vec::new();
    for topic in request.topics {
        let name = topic.topic.0.to_string();
        let found = context.topic(Operation::Read, &name);
        let partitions = topic
            .partitions
            .into_iter()
            .map(|p| {
                let log = found
                    .clone()
                    .and_then(|topic| Ok(Arc::clone(partition_of(&topic, p.partition)?.log())));
                PartitionRead {
                    index: p.partition,
                    offset: p.fetch_offset,
                    max_bytes: usize::try_from(p.partition_max_bytes).unwrap_or(0),
                    log,
                    result: None,
                }
            })
            .collect();
        reads.push((name, partitions));
    }
    let max_bytes = match usize::try_from(request.max_bytes) {
        Ok(n) if n > 0 => n,
        _ => DEFAULT_MAX_BYTES,
    };
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    let wait =
        Duration::from_millis(u64::try_from(request.max_wait_ms).unwrap_or(0)).min(MAX_FETCH_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before the first read, so a write between the read and
    // the wait still wakes it.
    let mut watchers: Vec<watch::Receiver<u64>> = reads
        .iter()
        .flat_map(|(_, ps)| ps.iter())
        .filter_map(|p| p.log.as_ref().ok().map(|log| log.subscribe()))
        .collect();
    let mut stopping = context.shutdown.clone();
    loop {
        let (done, found) = read_all(reads, max_bytes).await;
        reads = done;
        let failed = reads
            .iter()
            .flat_map(|(_, ps)| ps.iter())
            .any(|p| matches!(p.result, Some(Err(_))));
        // min_bytes 0 answers at once, empty or not, as in Kafka.
        let enough = found >= min_bytes && (found > 0 || min_bytes == 0);
        if enough || failed || tokio::time::Instant::now() >= deadline {
            break;
        }
        if watchers.is_empty() {
            break;
        }
        let changed = any_moved(&mut watchers);
        tokio::select! {
            _ = changed => {}
            _ = tokio::time::sleep_until(deadline) => {}
            _ = stopping.wait_for(|stop| *stop) => break,
        }
    }
    for (name, partitions) in reads {
        let mut topic = FetchableTopicResponse::default();
        topic.topic = kafka_protocol::messages::TopicName(name.into());
        for p in partitions {
            let mut data = PartitionData::default();
            data.partition_index = p.index;
            data.preferred_read_replica = BrokerId(-1);
            data.aborted_transactions = Some(Vec::new());
            match p.result {
                Some(Ok(read)) => {
                    data.high_watermark = read.high_watermark as i64;
                    data.last_stable_offset = read.high_watermark as i64;
                    data.log_start_offset = read.log_start_offset as i64;
                    data.records = Some(read.records);
                }
                Some(Err(failure)) => {
                    tracing::debug!(code = ?failure.code, message = %failure.message, partition = p.index, "Kafka fetch refused");
                    data.error_code = failure.code.code();
                    data.high_watermark = -1;
                    data.last_stable_offset = -1;
                    data.log_start_offset = -1;
                    data.records = Some(Bytes::new());
                }
                None => data.records = Some(Bytes::new()),
            }
            topic.partitions.push(data);
        }
        response.responses.push(topic);
    }
    response
}

/// Completes when any of `watchers` sees its high watermark move (or its
/// partition close: the next read says why).
async fn any_moved(watchers: &mut [watch::Receiver<u64>]) {
    let mut changes: Vec<_> = watchers.iter_mut().map(|w| Box::pin(w.changed())).collect();
    std::future::poll_fn(move |cx| {
        if changes.iter_mut().any(|c| c.as_mut().poll(cx).is_ready()) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await
}

/// Reads every partition (on the blocking pool: reads fault pages in and
/// translation copies), within `max_bytes` for the whole answer but at
/// least one batch of the first partition with data (KIP-74). Returns the
/// reads and the Kafka bytes found.
async fn read_all(
    mut reads: Vec<(String, Vec<PartitionRead>)>,
    max_bytes: usize,
) -> (Vec<(String, Vec<PartitionRead>)>, usize) {
    let task = tokio::task::spawn_blocking(move || {
        let mut left = max_bytes;
        let mut found = 0;
        for (_, partitions) in reads.iter_mut() {
            for p in partitions.iter_mut() {
                let result = match &p.log {
                    Err(failure) => Err(failure.clone()),
                    Ok(log) => read_one(log, p.offset, p.max_bytes.min(left).max(1)),
                };
                if let Ok(read) = &result {
                    found += read.records.len();
                    left = left.saturating_sub(read.records.len());
                }
                p.result = Some(result);
            }
        }
        (reads, found)
    });
    match task.await {
        Ok(done) => done,
        Err(e) => {
            tracing::error!(error = %e, "a Kafka fetch task failed");
            (Vec::new(), 0)
        }
    }
}

fn read_one(log: &PartitionLog, offset: i64, max_bytes: usize) -> Result<Read, Failure> {
    let from = u64::try_from(offset).map_err(|_| {
        Failure::new(
            KafkaCode::OffsetOutOfRange,
            format!("fetch offset {offset} is negative"),
        )
    })?;
    let chunk = log.read(from, max_bytes)?;
    let records = records::kafka_batches(chunk.data)?;
    log.traffic().read_out(0, records.len() as u64);
    Ok(Read {
        records,
        high_watermark: chunk.high_watermark,
        log_start_offset: chunk.log_start_offset,
    })
}

/// Earliest, latest, or the first offset at or after a timestamp, per
/// partition.
pub(super) async fn list_offsets(
    context: &Arc<Context>,
    request: ListOffsetsRequest,
    version: i16,
) -> ListOffsetsResponse {
    let context = Arc::clone(context);
    let task = tokio::task::spawn_blocking(move || {
        let mut response = ListOffsetsResponse::default();
        for topic in request.topics {
            let name = topic.name.0.to_string();
            let found = context.topic(Operation::Describe, &name);
            let mut topic_response = ListOffsetsTopicResponse::default();
            topic_response.name = topic.name.clone();
            for p in topic.partitions {
                let mut partition = ListOffsetsPartitionResponse::default();
                partition.partition_index = p.partition_index;
                let result = found.clone().and_then(|t| {
                    offset_at(partition_of(&t, p.partition_index)?.log(), p.timestamp)
                });
                match result {
                    Ok((offset, timestamp)) => {
                        partition.offset = offset;
                        partition.timestamp = timestamp;
                        // Leader epochs exist from version 4 on.
                        if version >= 4 {
                            partition.leader_epoch = 0;
                        }
                    }
                    Err(failure) => {
                        partition.error_code = failure.code.code();
                        partition.offset = -1;
                        partition.timestamp = -1;
                    }
                }
                topic_response.partitions.push(partition);
            }
            response.topics.push(topic_response);
        }
        response
    });
    match task.await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "a Kafka ListOffsets task failed");
            ListOffsetsResponse::default()
        }
    }
}

/// `(offset, timestamp)` for a ListOffsets timestamp: -2 earliest, -1
/// latest (both with timestamp -1), or the first record at or after a
/// time, with its own timestamp; `(-1, -1)` when every record is older.
fn offset_at(log: &PartitionLog, timestamp: i64) -> Result<(i64, i64), Failure> {
    match timestamp {
        EARLIEST => Ok((log.log_start_offset() as i64, -1)),
        LATEST => Ok((log.high_watermark() as i64, -1)),
        t if t < 0 => Err(Failure::new(
            KafkaCode::InvalidRequest,
            format!("timestamp {t} is not supported (only -1, -2 and times)"),
        )),
        t => {
            let Some(offset) = log.offset_for_timestamp(t) else {
                return Ok((-1, -1));
            };
            if offset >= log.high_watermark() {
                return Ok((-1, -1));
            }
            let found = log
                .read_records(offset, 1)?
                .into_iter()
                .find(|r| r.offset == offset)
                .map_or(t, |r| r.record.timestamp);
            Ok((offset as i64, found))
        }
    }
}
