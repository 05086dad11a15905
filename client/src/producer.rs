//! The batching producer.
//!
//! Records go to one task per (topic, partition). A task gathers records
//! into a batch until `batch_bytes` or `linger`, then writes it over its own
//! `ProduceStream`, keeping up to `max_in_flight` batches unacknowledged:
//! the broker writes a stream's requests in order and acknowledges them in
//! order, so pipelining never reorders a partition. When the stream breaks
//! (the broker restarted, say), the task reconnects with backoff and resends
//! every unacknowledged batch, oldest first.
//!
//! Idempotence (on by default) makes those resends harmless: the producer
//! gets an id and epoch from the broker (`InitProducer`), and each batch
//! carries its partition's next sequence number, so the broker writes a
//! resent batch once and answers with the original positions. When the
//! broker refuses a batch for good (say a record is too large), the batches
//! behind it are renumbered and resent, so no sequence gap stalls the
//! partition; when it has forgotten the producer (expiry) or a newer epoch
//! of it exists, the producer moves to a new epoch and renumbers from 0.
//! Without idempotence, a batch whose acknowledgement was lost is written
//! twice. Either way nothing accepted is lost before `delivery_timeout`.
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
    /// Retries never write a batch twice (see the module docs). With it,
    /// `max_in_flight` is at most 5, what the broker remembers per producer.
    pub idempotence: bool,
    /// A stable name for this producer across restarts: a new instance
    /// fences the old one. `None`: a fresh id each time.
    pub producer_name: Option<String>,
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
            idempotence: true,
            producer_name: None,
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

#[derive(Clone, Copy)]
struct TopicLimits {
    partitions: u32,
    max_record_bytes: usize,
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
    identity: Arc<SharedIdentity>,
    client: ProduceServiceClient<Channel>,
    admin: Admin,
    /// Partition count and largest record of each topic used.
    topics: Mutex<HashMap<String, TopicLimits>>,
    sticky: Mutex<HashMap<String, Sticky>>,
    senders: Mutex<HashMap<(String, u32), mpsc::UnboundedSender<Command>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    buffer: Arc<Semaphore>,
    outstanding: Arc<Outstanding>,
    closed: AtomicBool,
}

impl Producer {
    /// A producer for the broker of `client` (connects on first use).
    pub fn new(client: &ClientConfig, mut config: ProducerConfig) -> Result<Producer> {
        if config.idempotence {
            config.max_in_flight = config.max_in_flight.clamp(1, MAX_IDEMPOTENT_IN_FLIGHT);
        }
        let grpc = ProduceServiceClient::new(client.channel()?)
            .max_decoding_message_size(client.max_message_bytes)
            .max_encoding_message_size(client.max_message_bytes);
        let permits = config.buffer_bytes.clamp(1, Semaphore::MAX_PERMITS);
        Ok(Producer {
            inner: Arc::new(Inner {
                identity: Arc::new(SharedIdentity {
                    name: config.producer_name.clone(),
                    client: grpc.clone(),
                    current: Mutex::new(None),
                }),
                admin: Admin::new(client)?,
                client: grpc,
                buffer: Arc::new(Semaphore::new(permits)),
                config,
                topics: Mutex::new(HashMap::new()),
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
        let limits = self.topic_limits(topic).await?;
        let partitions = limits.partitions;
        let size = record.size();
        let explicit = record.partition;
        let key = record.key.clone();
        let proto = record.into_proto();
        // The broker counts the encoded record against the topic's limit.
        let record_bytes = prost::Message::encoded_len(&proto);
        if record_bytes > limits.max_record_bytes {
            // Refused here rather than by the broker, where it would take
            // down the whole batch it was sent in.
            return Err(Error::Rejected(Status::invalid_argument(format!(
                "record is {record_bytes} bytes encoded; topic {topic:?} accepts records of at \
                 most {} bytes",
                limits.max_record_bytes
            ))));
        }
        let partition = match (explicit, &key) {
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
            record: proto,
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

    /// Sends `records` to `partition` of `topic` as one request and waits
    /// for the broker's acknowledgement: for callers that build their own
    /// batches (a bulk loader, a load generator), at the cost of one call
    /// per batch instead of a channel send per record. It bypasses the
    /// producer's buffers, linger and retries, and is not idempotent: an
    /// error is returned as is (a batch whose acknowledgement was lost may
    /// have been written), and batches sent concurrently to one partition
    /// may land in either order. Returns where each record landed.
    pub async fn send_batch(
        &self,
        topic: &str,
        partition: u32,
        records: Vec<Record>,
    ) -> Result<Vec<Position>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let request = v1::ProduceRequest {
            topic: topic.to_owned(),
            partition: Some(partition),
            records: records.into_iter().map(Record::into_proto).collect(),
            request_id: 0,
            producer: None,
        };
        let response = self.inner.client.clone().produce(request).await?;
        Ok(response
            .into_inner()
            .positions
            .into_iter()
            .map(Position::from)
            .collect())
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

    /// The topic's partition count and record size limit, looked up once.
    async fn topic_limits(&self, topic: &str) -> Result<TopicLimits> {
        if let Some(limits) = self.inner.topics.lock().await.get(topic) {
            return Ok(*limits);
        }
        let info = self.inner.admin.describe_topic(topic).await?;
        let limits = TopicLimits {
            partitions: info.partitions.len() as u32,
            max_record_bytes: info
                .settings
                .max_record_bytes
                .map_or(usize::MAX, |m| m as usize),
        };
        self.inner
            .topics
            .lock()
            .await
            .insert(topic.to_owned(), limits);
        Ok(limits)
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
            shared_identity: self
                .inner
                .config
                .idempotence
                .then(|| Arc::clone(&self.inner.identity)),
            identity: None,
            next_sequence: 0,
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

/// Batches the broker remembers per producer and partition.
const MAX_IDEMPOTENT_IN_FLIGHT: usize = 5;

/// A producer id and epoch.
type Identity = (u64, u32);

/// The producer's identity, shared by its partition senders. Whoever finds
/// it stale (the broker forgot it, or fenced it with a newer epoch of the
/// same name) renews it once; the others adopt the renewed one.
struct SharedIdentity {
    name: Option<String>,
    client: ProduceServiceClient<Channel>,
    current: Mutex<Option<Identity>>,
}

impl SharedIdentity {
    async fn init(&self) -> Result<Identity> {
        let response = self
            .client
            .clone()
            .init_producer(v1::InitProducerRequest {
                name: self.name.clone(),
            })
            .await?
            .into_inner();
        Ok((response.producer_id, response.epoch))
    }

    async fn get(&self) -> Result<Identity> {
        let mut current = self.current.lock().await;
        if let Some(identity) = *current {
            return Ok(identity);
        }
        let identity = self.init().await?;
        *current = Some(identity);
        Ok(identity)
    }

    /// A new identity if `stale` is still the current one; the current one
    /// if someone renewed it already.
    async fn renew(&self, stale: Identity) -> Result<Identity> {
        let mut current = self.current.lock().await;
        if let Some(identity) = *current
            && identity != stale
        {
            return Ok(identity);
        }
        let identity = self.init().await?;
        *current = Some(identity);
        Ok(identity)
    }

    async fn current(&self) -> Option<Identity> {
        *self.current.lock().await
    }
}

/// Sequences wrap after `i32::MAX`, as the broker's do.
fn sequence_add(sequence: i32, n: usize) -> i32 {
    ((i64::from(sequence) + n as i64) % (i64::from(i32::MAX) + 1)) as i32
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
    /// Set when idempotent.
    shared_identity: Option<Arc<SharedIdentity>>,
    identity: Option<Identity>,
    next_sequence: i32,
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
                        if !self.acknowledge(response).await {
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
        if let Some(shared) = &self.shared_identity
            && self.identity.is_none()
        {
            self.identity = Some(shared.get().await?);
        }
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
        if self.shared_identity.is_some() && self.identity.is_none() {
            // Not connected yet (`connect` fetches the identity): send as
            // soon as it is.
            self.linger_until = Some(Instant::now());
            return;
        }
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
            producer: self.identity.map(|(producer_id, epoch)| v1::ProducerBatch {
                producer_id,
                epoch,
                base_sequence: self.next_sequence,
            }),
        };
        self.next_sequence = sequence_add(self.next_sequence, records.len());
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
    /// the stream must be reopened and the unacknowledged batches resent.
    async fn acknowledge(&mut self, response: v1::ProduceStreamResponse) -> bool {
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
                self.outstanding
                    .settle(pending, Ok(Position::from(position)));
            }
            return true;
        }
        let code = Code::from(response.error_code);
        if retryable(code) {
            return false;
        }
        match response.error_reason.as_str() {
            "unknown-producer" | "out-of-order" => return self.new_epoch(None).await,
            "fenced" => {
                let ours = self.identity;
                let shared = match &self.shared_identity {
                    Some(shared) => shared.current().await,
                    None => None,
                };
                if shared.is_some() && shared != ours {
                    // A sibling sender renewed the identity: adopt it.
                    return self.new_epoch(shared).await;
                }
                // Another instance of this named producer took over.
                tracing::warn!(topic = %self.topic, partition = self.partition, message = %response.error_message, "producer fenced");
                self.fail_all(&Status::new(code, response.error_message));
                return true;
            }
            _ => {}
        }
        let batch = self.in_flight.pop_front().expect("front exists");
        let status = Status::new(code, response.error_message);
        for pending in batch.records {
            self.outstanding
                .settle(pending, Err(Error::Rejected(status.clone())));
        }
        if self.shared_identity.is_some() && !self.in_flight.is_empty() {
            // The broker will refuse the batches behind this one as out of
            // order: give them this one's sequences and send them again.
            let base = batch.request.producer.map_or(0, |p| p.base_sequence);
            self.renumber(base);
            return false;
        }
        if let Some(p) = batch.request.producer {
            // The next batch takes over the refused one's sequences.
            self.renumber(p.base_sequence);
        }
        true
    }

    /// Moves to `adopt` (or a renewed identity) and renumbers every
    /// unacknowledged batch from sequence 0. Returns false: resend.
    async fn new_epoch(&mut self, adopt: Option<Identity>) -> bool {
        let Some(shared) = self.shared_identity.clone() else {
            return false;
        };
        let identity = match (adopt, self.identity) {
            (Some(identity), _) => Ok(identity),
            (None, Some(stale)) => shared.renew(stale).await,
            (None, None) => shared.get().await,
        };
        match identity {
            Ok(identity) => {
                tracing::info!(topic = %self.topic, partition = self.partition, producer_id = identity.0, epoch = identity.1, "new producer epoch");
                self.identity = Some(identity);
                self.renumber(0);
            }
            Err(error) => {
                tracing::debug!(%error, "could not renew the producer; retrying");
                self.identity = None;
            }
        }
        false
    }

    /// Gives the unacknowledged batches consecutive sequences from `base`,
    /// under the current identity.
    fn renumber(&mut self, base: i32) {
        let mut sequence = base;
        for batch in &mut self.in_flight {
            batch.request.producer = self.identity.map(|(producer_id, epoch)| v1::ProducerBatch {
                producer_id,
                epoch,
                base_sequence: sequence,
            });
            sequence = sequence_add(sequence, batch.records.len());
        }
        self.next_sequence = sequence;
    }

    /// Fails every record this sender holds.
    fn fail_all(&mut self, status: &Status) {
        for batch in std::mem::take(&mut self.in_flight) {
            for pending in batch.records {
                self.outstanding
                    .settle(pending, Err(Error::Rejected(status.clone())));
            }
        }
        for pending in std::mem::take(&mut self.batch) {
            self.outstanding
                .settle(pending, Err(Error::Rejected(status.clone())));
        }
        self.batch_bytes = 0;
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
