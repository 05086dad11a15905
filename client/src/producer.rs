//! The batching producer.
//!
//! Records go to one task per (topic, partition). A task gathers records
//! into a batch until `batch_bytes` or `linger`, then writes it over its own
//! `ProduceStream`, keeping up to `max_in_flight` batches unacknowledged:
//! the broker writes a stream's requests in order and acknowledges them in
//! order, so pipelining never reorders a partition. When the stream breaks
//! (the broker restarted, say), the task reconnects with backoff and resends
//! every unacknowledged batch, oldest first. Until idempotent producers
//! land, a batch that was written but whose acknowledgement was lost is
//! written twice; nothing accepted is lost before `delivery_timeout`.
//!
//! Memory is bounded: every record holds permits of a `buffer_bytes`
//! semaphore from `enqueue` until it is acknowledged or fails, so a producer
//! faster than the broker waits in `enqueue` instead of growing.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use sluice_proto::v1::{self, produce_service_client::ProduceServiceClient};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::admin::Admin;
use crate::connection::ClientConfig;
use crate::error::{Error, Result};
use crate::record::{Position, Record};

/// How the producer batches, buffers and retries.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a partition's batch waits for more records before it is sent.
    pub linger: Duration,
    /// A batch is sent once it holds this many bytes.
    pub batch_bytes: usize,
    /// Records accepted but not yet acknowledged, in bytes, at most;
    /// `enqueue` waits for room beyond that.
    pub buffer_bytes: usize,
    /// Unacknowledged batches per partition.
    pub max_in_flight: usize,
    /// A record not acknowledged this long after it was accepted fails with
    /// [`Error::Timeout`].
    pub delivery_timeout: Duration,
    /// First wait before reconnecting; doubles up to `max_retry_backoff`.
    pub retry_backoff: Duration,
    /// Longest wait between reconnection attempts.
    pub max_retry_backoff: Duration,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger: Duration::from_millis(5),
            batch_bytes: 1024 * 1024,
            buffer_bytes: 64 * 1024 * 1024,
            max_in_flight: 5,
            delivery_timeout: Duration::from_secs(120),
            retry_backoff: Duration::from_millis(100),
            max_retry_backoff: Duration::from_secs(2),
        }
    }
}

/// Resolves to where the record landed once the broker acknowledged it.
/// Dropping it does not cancel the send (fire and forget).
pub struct DeliveryFuture {
    receiver: oneshot::Receiver<Result<Position>>,
}

impl Future for DeliveryFuture {
    type Output = Result<Position>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.receiver)
            .poll(cx)
            .map(|result| result.unwrap_or(Err(Error::Closed)))
    }
}

/// A record waiting for its acknowledgement.
struct Pending {
    record: v1::Record,
    size: usize,
    reply: oneshot::Sender<Result<Position>>,
    accepted: Instant,
    _permit: OwnedSemaphorePermit,
}

enum Command {
    Record(Pending),
    /// Send what is batched now, without waiting for `linger`.
    Flush,
}

/// Records accepted and not yet settled, for `flush`.
#[derive(Default)]
struct Outstanding {
    count: AtomicUsize,
    settled: Notify,
}

impl Outstanding {
    fn settle(&self, pending: Pending, result: Result<Position>) {
        let _ = pending.reply.send(result);
        if self.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.settled.notify_waiters();
        }
    }
}

struct Sticky {
    partition: u32,
    bytes: usize,
}

/// A batching, pipelining producer. Cheap to clone; all clones share
/// buffers and connections.
#[derive(Clone)]
pub struct Producer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProducerConfig,
    client: ProduceServiceClient<Channel>,
    admin: Admin,
    partition_counts: Mutex<HashMap<String, u32>>,
    sticky: Mutex<HashMap<String, Sticky>>,
    senders: Mutex<HashMap<(String, u32), mpsc::UnboundedSender<Command>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    buffer: Arc<Semaphore>,
    outstanding: Arc<Outstanding>,
    closed: AtomicBool,
}

impl Producer {
    /// A producer for the broker of `client` (connects on first use).
    pub fn new(client: &ClientConfig, config: ProducerConfig) -> Result<Producer> {
        let grpc = ProduceServiceClient::new(client.channel()?)
            .max_decoding_message_size(client.max_message_bytes)
            .max_encoding_message_size(client.max_message_bytes);
        let permits = config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Producer {
            inner: Arc::new(Inner {
                admin: Admin::new(client)?,
                client: grpc,
                buffer: Arc::new(Semaphore::new(permits)),
                config,
                partition_counts: Mutex::new(HashMap::new()),
                sticky: Mutex::new(HashMap::new()),
                senders: Mutex::new(HashMap::new()),
                tasks: Mutex::new(Vec::new()),
                outstanding: Arc::default(),
                closed: AtomicBool::new(false),
            }),
        })
    }

    /// Sends a record and waits for its acknowledgement.
    pub async fn send(&self, topic: &str, record: Record) -> Result<Position> {
        self.enqueue(topic, record).await?.await
    }

    /// Accepts a record for sending and returns at once (after waiting for
    /// buffer room); the returned future resolves on acknowledgement.
    pub async fn enqueue(&self, topic: &str, record: Record) -> Result<DeliveryFuture> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let partitions = self.partition_count(topic).await?;
        let size = record.size();
        let partition = match (record.partition, &record.key) {
            (Some(p), _) if p < partitions => p,
            (Some(p), _) => {
                return Err(Error::Rejected(Status::not_found(format!(
                    "topic {topic:?} has {partitions} partition(s); there is no partition {p}"
                ))));
            }
            (None, Some(key)) => sluice_proto::partition_for_key(key, partitions),
            (None, None) => self.sticky_partition(topic, partitions, size).await,
        };
        let permits = size.clamp(1, inner.config.buffer_bytes.min(Semaphore::MAX_PERMITS)) as u32;
        let permit = Arc::clone(&inner.buffer)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::Closed)?;
        let (reply, receiver) = oneshot::channel();
        let pending = Pending {
            record: record.into_proto(),
            size,
            reply,
            accepted: Instant::now(),
            _permit: permit,
        };
        inner.outstanding.count.fetch_add(1, Ordering::AcqRel);
        let sender = self.sender(topic, partition).await;
        if let Err(mpsc::error::SendError(Command::Record(pending))) =
            sender.send(Command::Record(pending))
        {
            inner.outstanding.settle(pending, Err(Error::Closed));
        }
        Ok(DeliveryFuture { receiver })
    }

    /// Sends everything batched now and waits until every record accepted so
    /// far is acknowledged or failed.
    pub async fn flush(&self) -> Result<()> {
        for sender in self.inner.senders.lock().await.values() {
            let _ = sender.send(Command::Flush);
        }
        loop {
            let settled = self.inner.outstanding.settled.notified();
            if self.inner.outstanding.count.load(Ordering::Acquire) == 0 {
                return Ok(());
            }
            settled.await;
        }
    }

    /// Delivers what was accepted, then stops. Further sends fail with
    /// [`Error::Closed`].
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.flush().await?;
        self.inner.senders.lock().await.clear();
        for task in self.inner.tasks.lock().await.drain(..) {
            let _ = task.await;
        }
        Ok(())
    }

    /// The topic's partition count, looked up once.
    async fn partition_count(&self, topic: &str) -> Result<u32> {
        if let Some(&n) = self.inner.partition_counts.lock().await.get(topic) {
            return Ok(n);
        }
        let info = self.inner.admin.describe_topic(topic).await?;
        let n = info.partitions.len() as u32;
        self.inner
            .partition_counts
            .lock()
            .await
            .insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Keyless records stick to one partition for a batch's worth of bytes,
    /// then move to the next (fewer, fuller batches than strict round-robin).
    async fn sticky_partition(&self, topic: &str, partitions: u32, size: usize) -> u32 {
        let mut sticky = self.inner.sticky.lock().await;
        let state = sticky.entry(topic.to_owned()).or_insert(Sticky {
            partition: 0,
            bytes: 0,
        });
        if state.bytes >= self.inner.config.batch_bytes {
            state.partition = (state.partition + 1) % partitions;
            state.bytes = 0;
        }
        state.bytes += size;
        state.partition
    }

    async fn sender(&self, topic: &str, partition: u32) -> mpsc::UnboundedSender<Command> {
        let mut senders = self.inner.senders.lock().await;
        if let Some(sender) = senders.get(&(topic.to_owned(), partition)) {
            return sender.clone();
        }
        let (sender, commands) = mpsc::unbounded_channel();
        let task = PartitionSender {
            topic: topic.to_owned(),
            partition,
            client: self.inner.client.clone(),
            config: self.inner.config.clone(),
            outstanding: Arc::clone(&self.inner.outstanding),
            batch: Vec::new(),
            batch_bytes: 0,
            linger_until: None,
            in_flight: VecDeque::new(),
            next_id: 0,
        };
        self.inner
            .tasks
            .lock()
            .await
            .push(tokio::spawn(task.run(commands)));
        senders.insert((topic.to_owned(), partition), sender.clone());
        sender
    }
}

/// A batch sent and not yet acknowledged.
struct InFlight {
    request: v1::ProduceRequest,
    records: Vec<Pending>,
}

struct Stream {
    requests: mpsc::Sender<v1::ProduceRequest>,
    responses: tonic::Streaming<v1::ProduceStreamResponse>,
}

/// The task that batches and sends one partition's records.
struct PartitionSender {
    topic: String,
    partition: u32,
    client: ProduceServiceClient<Channel>,
    config: ProducerConfig,
    outstanding: Arc<Outstanding>,
    batch: Vec<Pending>,
    batch_bytes: usize,
    linger_until: Option<Instant>,
    in_flight: VecDeque<InFlight>,
    next_id: u64,
}

/// Codes after which the same batch may go through on another try.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
            | Code::DeadlineExceeded
            | Code::Internal
    )
}

impl PartitionSender {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut stream: Option<Stream> = None;
        let mut backoff = self.config.retry_backoff;
        let mut open = true;
        loop {
            if !open && self.batch.is_empty() && self.in_flight.is_empty() {
                return;
            }
            if stream.is_none() && !(self.in_flight.is_empty() && self.batch.is_empty()) {
                match self.connect().await {
                    Ok(s) => {
                        backoff = self.config.retry_backoff;
                        stream = Some(s);
                    }
                    Err(error) => {
                        tracing::debug!(topic = %self.topic, partition = self.partition, %error, "produce stream unavailable; retrying");
                        self.expire(&error);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(self.config.max_retry_backoff);
                        continue;
                    }
                }
            }
            let room = self.in_flight.len() < self.config.max_in_flight;
            let linger = self.linger_until;
            tokio::select! {
                command = commands.recv(), if open => match command {
                    Some(Command::Record(pending)) => {
                        self.batch_bytes += pending.size;
                        self.batch.push(pending);
                        self.linger_until.get_or_insert(Instant::now() + self.config.linger);
                        if self.batch_bytes >= self.config.batch_bytes && room {
                            self.send_batch(&mut stream).await;
                        }
                    }
                    Some(Command::Flush) => {
                        if room {
                            self.send_batch(&mut stream).await;
                        } else {
                            self.linger_until = Some(Instant::now());
                        }
                    }
                    None => {
                        open = false;
                        self.linger_until = Some(Instant::now());
                    }
                },
                () = sleep_until(linger), if linger.is_some() && room && stream.is_some() => {
                    self.send_batch(&mut stream).await;
                }
                response = next_response(&mut stream) => match response {
                    Some(Ok(response)) => {
                        if !self.acknowledge(response) {
                            stream = None;
                        }
                    }
                    Some(Err(status)) => {
                        tracing::debug!(topic = %self.topic, partition = self.partition, %status, "produce stream broke; resending");
                        stream = None;
                    }
                    None => stream = None,
                },
            }
        }
    }

    /// Opens a stream and resends every unacknowledged batch on it, in order.
    async fn connect(&mut self) -> Result<Stream> {
        let (requests, outbound) = mpsc::channel(self.config.max_in_flight.max(1) * 2);
        let responses = self
            .client
            .clone()
            .produce_stream(ReceiverStream::new(outbound))
            .await
            .map_err(Error::from)?
            .into_inner();
        for batch in &self.in_flight {
            requests
                .send(batch.request.clone())
                .await
                .map_err(|_| Error::Unavailable("produce stream closed".into()))?;
        }
        Ok(Stream {
            requests,
            responses,
        })
    }

    async fn send_batch(&mut self, stream: &mut Option<Stream>) {
        self.linger_until = None;
        if self.batch.is_empty() {
            return;
        }
        let records = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let request = v1::ProduceRequest {
            topic: self.topic.clone(),
            partition: Some(self.partition),
            records: records.iter().map(|p| p.record.clone()).collect(),
            request_id: self.next_id,
        };
        self.next_id += 1;
        self.in_flight.push_back(InFlight {
            request: request.clone(),
            records,
        });
        if let Some(s) = stream
            && s.requests.send(request).await.is_err()
        {
            *stream = None;
        }
    }

    /// Settles the oldest in-flight batch with `response`. Returns false if
    /// the stream must be reopened (a retryable failure: resend).
    fn acknowledge(&mut self, response: v1::ProduceStreamResponse) -> bool {
        let Some(front) = self.in_flight.front() else {
            return true;
        };
        if response.error_code != 0 && response.request_id != front.request.request_id {
            // A stream-level refusal (request_id 0): it concerns the batch
            // at the front.
            tracing::debug!(code = response.error_code, message = %response.error_message, "stream-level produce error");
        }
        if response.error_code == 0 {
            let batch = self.in_flight.pop_front().expect("front exists");
            let positions = response.response.map(|r| r.positions).unwrap_or_default();
            for (pending, position) in batch.records.into_iter().zip(positions) {
                self.outstanding.settle(
                    pending,
                    Ok(Position {
                        partition: position.partition,
                        offset: position.offset,
                    }),
                );
            }
            return true;
        }
        let code = Code::from(response.error_code);
        if retryable(code) {
            return false;
        }
        let batch = self.in_flight.pop_front().expect("front exists");
        for pending in batch.records {
            self.outstanding.settle(
                pending,
                Err(Error::Rejected(Status::new(
                    code,
                    response.error_message.clone(),
                ))),
            );
        }
        true
    }

    /// Fails records that have waited longer than the delivery timeout.
    fn expire(&mut self, cause: &Error) {
        let timeout = self.config.delivery_timeout;
        let expired = |p: &Pending| p.accepted.elapsed() >= timeout;
        while self
            .in_flight
            .front()
            .is_some_and(|b| b.records.first().is_some_and(expired))
        {
            let batch = self.in_flight.pop_front().expect("front exists");
            for pending in batch.records {
                self.outstanding
                    .settle(pending, Err(Error::Timeout(timeout, cause.to_string())));
            }
        }
        if self.in_flight.is_empty() && self.batch.first().is_some_and(expired) {
            for pending in std::mem::take(&mut self.batch) {
                self.outstanding
                    .settle(pending, Err(Error::Timeout(timeout, cause.to_string())));
            }
            self.batch_bytes = 0;
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn next_response(
    stream: &mut Option<Stream>,
) -> Option<Result<v1::ProduceStreamResponse, Status>> {
    match stream {
        Some(s) => s.responses.next().await,
        None => std::future::pending().await,
    }
}
