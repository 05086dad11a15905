//! The batching producer.
//!
//! Records go to one task per (topic, partition). A task queues records
//! and cuts them into batches of at most what the broker accepts for the
//! topic (its `max_batch_bytes`, learnt with the topic's settings), sending
//! one when `batch_bytes` are queued or after `linger`, over its own
//! `ProduceStream`, keeping up to `max_in_flight` batches unacknowledged:
//! the broker writes a stream's requests in order and acknowledges them in
//! order, so pipelining never reorders a partition. When the stream breaks
//! (the broker restarted, say), the task reconnects with backoff and resends
//! every unacknowledged batch, oldest first. When a stream must be replaced
//! while the broker still holds requests of it (a refusal with batches
//! behind it), the task stops writing to it and reads it to its end before
//! it resends anything, so old and new requests never overlap.
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
//! twice, and a batch retried after a transient refusal lands after the
//! batches that were behind it.
//!
//! Every record has a deadline, `delivery_timeout` after `enqueue`
//! accepted it, enforced by a timer whatever the task is doing (connected
//! to a silent broker, reconnecting, or waiting for room). A record that
//! was never sent fails with [`Error::Timeout`] (not written; safe to send
//! again); one that was sent but not acknowledged fails with
//! [`Error::UnknownOutcome`] (it may have been written).
//!
//! Memory is bounded: every record holds permits of a `buffer_bytes`
//! semaphore from `enqueue` until it is acknowledged or fails, so a producer
//! faster than the broker waits in `enqueue` instead of growing.
//!
//! Every accepted record holds a ticket of the flush generation it was
//! accepted in; `flush` starts a new generation and waits only for the
//! tickets of the earlier ones. A record settles exactly once: dropping an
//! unsettled one (a task that ended) fails it with [`Error::Closed`] and
//! returns its ticket, so `flush` and `close` never wait for a record
//! nobody holds. `enqueue` does nothing after its last await but hand the
//! record to its task under the sender registry's lock, so a cancelled
//! `enqueue` leaves nothing behind, and `close` (which closes the registry
//! under that lock) either sees the record in a task it waits for or makes
//! the `enqueue` fail with [`Error::Closed`].
//!
//! Topic settings (partition count, record and batch limits) are cached
//! for `metadata_max_age` and dropped at once when the broker refuses a
//! batch for a reason they govern (`INVALID_ARGUMENT`, `NOT_FOUND`), so the
//! next `enqueue` works with fresh ones; a batch refused for a record the
//! fresh settings say is too large loses only that record.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::connection::Channel;
use sluice_proto::v1::{self, produce_service_client::ProduceServiceClient};
use tokio::sync::{Mutex, Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};

use crate::admin::Admin;
use crate::connection::{ClientConfig, with_timeout};
use crate::error::{Error, Result};
use crate::record::{Position, Record};
use sluice_format::{BatchBuilder, Compression, ProducerInfo};

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
    /// A record not acknowledged this long after it was accepted fails:
    /// with [`Error::Timeout`] if it was never sent, with
    /// [`Error::UnknownOutcome`] if it was sent (it may have been written).
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
    /// How long a topic's settings (partition count, record and batch
    /// limits) are trusted before they are looked up again (Kafka's
    /// `metadata.max.age.ms`). A refusal they govern drops them at once.
    pub metadata_max_age: Duration,
    /// The codec of the batches this producer sends (Kafka's
    /// `compression.type`): none, lz4 or zstd. A batch that would not get
    /// smaller goes uncompressed. A topic may force its own codec; the
    /// broker then recompresses.
    pub compression: Compression,
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
            metadata_max_age: Duration::from_secs(300),
            compression: Compression::None,
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

/// The broker's batch limit when it does not report one: its fixed cap
/// (half a segment, if smaller, applies too).
const DEFAULT_MAX_BATCH_BYTES: u64 = 16 * 1024 * 1024;
/// The broker's batch header.
const BATCH_HEADER_BYTES: usize = 56;
/// What a record may take in the broker's batch encoding beyond its
/// encoded `Record` message: offset and timestamp deltas (up to 5 and 10
/// bytes), its length prefix (up to 5), the length of an empty value, the
/// marker of a missing key and the header count.
const RECORD_OVERHEAD_BYTES: usize = 32;
/// How long opening a produce stream (or getting a producer id) may take
/// before it is given up and retried.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A record waiting for its acknowledgement. Settled exactly once: by
/// [`Pending::settle`], or with [`Error::Closed`] when dropped unsettled.
struct Pending {
    /// In the batch format, its timestamp stamped at `enqueue`.
    record: sluice_format::Record,
    /// Bytes it holds in the buffer.
    size: usize,
    /// Bytes it may add to a batch in the broker's encoding.
    batch_cost: usize,
    /// The topic's batch limit when it was accepted.
    max_batch: usize,
    deadline: Instant,
    reply: Option<oneshot::Sender<Result<Position>>>,
    _ticket: Ticket,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn settle(mut self, result: Result<Position>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        // Before the ticket: whoever `flush` wakes finds the reply sent.
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(Err(Error::Closed));
        }
    }
}

enum Command {
    Record(Pending),
    /// Send what is queued now, without waiting for `linger`.
    Flush,
}

/// Records accepted and not yet settled, by flush generation.
#[derive(Default)]
struct Outstanding {
    state: StdMutex<Generations>,
    settled: Notify,
}

#[derive(Default)]
struct Generations {
    current: u64,
    /// Unsettled records of each generation that has any.
    unsettled: BTreeMap<u64, usize>,
}

impl Outstanding {
    fn lock(&self) -> MutexGuard<'_, Generations> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ticket for a record accepted now.
    fn register(self: &Arc<Self>) -> Ticket {
        let mut state = self.lock();
        let generation = state.current;
        *state.unsettled.entry(generation).or_default() += 1;
        Ticket {
            outstanding: Arc::clone(self),
            generation,
        }
    }

    /// Closes the current generation and returns it.
    fn barrier(&self) -> u64 {
        let mut state = self.lock();
        state.current += 1;
        state.current - 1
    }

    /// Waits until every record of generations up to `generation` settled.
    async fn settled_through(&self, generation: u64) {
        loop {
            let settled = self.settled.notified();
            let oldest = self.lock().unsettled.keys().next().copied();
            if oldest.is_none_or(|oldest| oldest > generation) {
                return;
            }
            settled.await;
        }
    }
}

/// An accepted record's place in [`Outstanding`], returned when dropped.
struct Ticket {
    outstanding: Arc<Outstanding>,
    generation: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.outstanding.lock();
        let Some(count) = state.unsettled.get_mut(&self.generation) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            state.unsettled.remove(&self.generation);
            drop(state);
            self.outstanding.settled.notify_waiters();
        }
    }
}

#[derive(Clone, Copy)]
struct TopicLimits {
    partitions: u32,
    max_record_bytes: usize,
    /// The largest batch the broker takes in one request, in its encoding.
    max_batch_bytes: usize,
    fetched: Instant,
}

/// Topic settings, looked up on first use and again when stale.
struct Metadata {
    admin: Admin,
    max_age: Duration,
    topics: StdMutex<HashMap<String, TopicLimits>>,
}

impl Metadata {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, TopicLimits>> {
        self.topics.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn limits(&self, topic: &str) -> Result<TopicLimits> {
        if let Some(limits) = self.lock().get(topic)
            && limits.fetched.elapsed() < self.max_age
        {
            return Ok(*limits);
        }
        let info = self.admin.describe_topic(topic).await?;
        let max_batch_bytes = info.max_batch_bytes.unwrap_or_else(|| {
            // A broker from before `max_batch_bytes`: its fixed rule.
            let half_segment = info.settings.segment_bytes.map_or(u64::MAX, |s| s / 2);
            DEFAULT_MAX_BATCH_BYTES.min(half_segment)
        });
        let limits = TopicLimits {
            partitions: info.partitions.len() as u32,
            max_record_bytes: info
                .settings
                .max_record_bytes
                .map_or(usize::MAX, |m| m as usize),
            max_batch_bytes: usize::try_from(max_batch_bytes).unwrap_or(usize::MAX),
            fetched: Instant::now(),
        };
        self.lock().insert(topic.to_owned(), limits);
        Ok(limits)
    }

    /// Forgets `topic`'s settings: the next `enqueue` looks them up.
    fn invalidate(&self, topic: &str) {
        self.lock().remove(topic);
    }
}

struct Sticky {
    partition: u32,
    bytes: usize,
}

/// The partition tasks, and whether new ones may start.
#[derive(Default)]
struct Registry {
    closed: bool,
    senders: HashMap<(String, u32), mpsc::UnboundedSender<Command>>,
    tasks: Vec<JoinHandle<()>>,
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
    /// The largest request the channel sends, less room for its framing.
    max_request_bytes: usize,
    metadata: Arc<Metadata>,
    sticky: StdMutex<HashMap<String, Sticky>>,
    registry: StdMutex<Registry>,
    buffer: Arc<Semaphore>,
    outstanding: Arc<Outstanding>,
    closed: AtomicBool,
    /// Held by `close` until every task ended, so a second `close` waits.
    closing: Mutex<()>,
}

impl Inner {
    fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Producer {
    /// A producer for the broker of `client` (connects on first use).
    pub fn new(client: &ClientConfig, mut config: ProducerConfig) -> Result<Producer> {
        if config.idempotence {
            config.max_in_flight = config.max_in_flight.clamp(1, MAX_IDEMPOTENT_IN_FLIGHT);
        }
        config.max_in_flight = config.max_in_flight.max(1);
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
                metadata: Arc::new(Metadata {
                    admin: Admin::new(client)?,
                    max_age: config.metadata_max_age,
                    topics: StdMutex::new(HashMap::new()),
                }),
                client: grpc,
                max_request_bytes: client.max_message_bytes.saturating_sub(1024),
                buffer: Arc::new(Semaphore::new(permits)),
                config,
                sticky: StdMutex::new(HashMap::new()),
                registry: StdMutex::new(Registry::default()),
                outstanding: Arc::default(),
                closed: AtomicBool::new(false),
                closing: Mutex::new(()),
            }),
        })
    }

    /// Sends a record and waits for its acknowledgement.
    pub async fn send(&self, topic: &str, record: Record) -> Result<Position> {
        self.enqueue(topic, record).await?.await
    }

    /// Accepts a record for sending and returns at once (after waiting for
    /// buffer room); the returned future resolves on acknowledgement.
    ///
    /// Cancel-safe: dropped before it returns, it has accepted nothing.
    pub async fn enqueue(&self, topic: &str, record: Record) -> Result<DeliveryFuture> {
        let inner = &self.inner;
        if inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let limits = inner.metadata.limits(topic).await?;
        let partitions = limits.partitions;
        let size = record.size();
        let explicit = record.partition;
        let key = record.key.clone();
        // The producer stamps the time a record without one was accepted:
        // the broker writes a producer's batch as it is.
        let record = record.into_format_stamped(now_ms());
        let record_bytes = crate::record::limit_size(&record);
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
            (None, None) => self.sticky_partition(topic, partitions, size),
        };
        let permits = size.clamp(1, inner.config.buffer_bytes.min(Semaphore::MAX_PERMITS)) as u32;
        let permit = Arc::clone(&inner.buffer)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::Closed)?;
        // No await from here on: the record is either in its task's
        // channel or dropped (releasing its permits) before this returns.
        let (reply, receiver) = oneshot::channel();
        let mut registry = inner.registry();
        if registry.closed {
            return Err(Error::Closed);
        }
        let sender = self.sender(&mut registry, topic, partition);
        let pending = Pending {
            record,
            size,
            batch_cost: record_bytes + RECORD_OVERHEAD_BYTES,
            // A batch's estimate bounds its request's size too.
            max_batch: limits.max_batch_bytes.min(inner.max_request_bytes),
            deadline: Instant::now() + inner.config.delivery_timeout,
            reply: Some(reply),
            _ticket: inner.outstanding.register(),
            _permit: permit,
        };
        // A task that ended drops the record: it resolves to `Closed`.
        let _ = sender.send(Command::Record(pending));
        drop(registry);
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
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut builder = BatchBuilder::default();
        for record in records {
            builder.push(&record.into_format_stamped(now));
        }
        let request = v1::ProduceRequest {
            topic: topic.to_owned(),
            partition: Some(partition),
            batch: builder
                .finish_if_smaller(ProducerInfo::NONE, self.inner.config.compression)
                .into_bytes(),
            ..Default::default()
        };
        let response = self.inner.client.clone().produce(request).await?;
        Ok(positions_of(&response.into_inner())
            .into_iter()
            .map(Position::from)
            .collect())
    }

    /// Sends everything batched now and waits until every record accepted
    /// before the call is acknowledged or failed (records accepted while it
    /// waits do not hold it up).
    pub async fn flush(&self) -> Result<()> {
        let generation = self.inner.outstanding.barrier();
        let senders: Vec<_> = self.inner.registry().senders.values().cloned().collect();
        for sender in senders {
            let _ = sender.send(Command::Flush);
        }
        self.inner.outstanding.settled_through(generation).await;
        Ok(())
    }

    /// Delivers what was accepted, then stops. Further sends fail with
    /// [`Error::Closed`], and so do sends waiting for buffer room. When it
    /// returns, every accepted record is settled and no task is left.
    pub async fn close(&self) -> Result<()> {
        let _closing = self.inner.closing.lock().await;
        self.inner.closed.store(true, Ordering::Release);
        let tasks = {
            let mut registry = self.inner.registry();
            registry.closed = true;
            // Dropping the senders ends each task once it delivered the
            // records in its channel.
            registry.senders.clear();
            std::mem::take(&mut registry.tasks)
        };
        self.inner.buffer.close();
        for task in tasks {
            let _ = task.await;
        }
        Ok(())
    }

    /// Keyless records stick to one partition for a batch's worth of bytes,
    /// then move to the next (fewer, fuller batches than strict round-robin).
    fn sticky_partition(&self, topic: &str, partitions: u32, size: usize) -> u32 {
        let mut sticky = self.inner.sticky.lock().unwrap_or_else(|e| e.into_inner());
        let state = sticky.entry(topic.to_owned()).or_insert(Sticky {
            partition: 0,
            bytes: 0,
        });
        if state.bytes >= self.inner.config.batch_bytes || state.partition >= partitions {
            state.partition = (state.partition + 1) % partitions;
            state.bytes = 0;
        }
        state.bytes += size;
        state.partition
    }

    fn sender(
        &self,
        registry: &mut Registry,
        topic: &str,
        partition: u32,
    ) -> mpsc::UnboundedSender<Command> {
        let key = (topic.to_owned(), partition);
        if let Some(sender) = registry.senders.get(&key) {
            return sender.clone();
        }
        let (sender, commands) = mpsc::unbounded_channel();
        let task = PartitionSender {
            topic: topic.to_owned(),
            partition,
            client: self.inner.client.clone(),
            config: self.inner.config.clone(),
            metadata: Arc::clone(&self.inner.metadata),
            queued: VecDeque::new(),
            queued_bytes: 0,
            linger_until: None,
            in_flight: VecDeque::new(),
            next_id: 1,
            shared_identity: self
                .inner
                .config
                .idempotence
                .then(|| Arc::clone(&self.inner.identity)),
            identity: None,
            next_sequence: 0,
            last_error: String::from("no answer from the broker"),
        };
        registry.tasks.retain(|task| !task.is_finished());
        registry.tasks.push(tokio::spawn(task.run(commands)));
        registry.senders.insert(key, sender.clone());
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
            .init_producer(with_timeout(
                v1::InitProducerRequest {
                    name: self.name.clone(),
                },
                OPEN_TIMEOUT,
            ))
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

/// A batch made and not yet acknowledged.
struct InFlight {
    request: v1::ProduceRequest,
    records: Vec<Pending>,
    /// Written to a stream at least once: the broker may have it.
    sent: bool,
}

struct Stream {
    /// `None` once the stream is draining: nothing more is written, and
    /// the responses still due are read until it ends.
    requests: Option<mpsc::Sender<v1::ProduceRequest>>,
    responses: tonic::Streaming<v1::ProduceStreamResponse>,
    /// Requests written to it and not yet answered.
    unanswered: usize,
}

impl Stream {
    fn draining(&self) -> bool {
        self.requests.is_none()
    }
}

/// Stops writing to `stream`; it is replaced once its answers are in.
fn drain(stream: &mut Option<Stream>) {
    if let Some(stream) = stream {
        stream.requests = None;
    }
}

type Opening = Pin<Box<dyn Future<Output = Result<(Option<Identity>, Stream)>> + Send>>;

/// The task that batches and sends one partition's records.
struct PartitionSender {
    topic: String,
    partition: u32,
    client: ProduceServiceClient<Channel>,
    config: ProducerConfig,
    metadata: Arc<Metadata>,
    /// Records not yet in a batch, oldest first.
    queued: VecDeque<Pending>,
    queued_bytes: usize,
    linger_until: Option<Instant>,
    in_flight: VecDeque<InFlight>,
    /// Request ids start at 1: the broker answers 0 for the stream itself.
    next_id: u64,
    /// Set when idempotent.
    shared_identity: Option<Arc<SharedIdentity>>,
    identity: Option<Identity>,
    next_sequence: i32,
    /// Why the last stream failed, for timeout errors.
    last_error: String,
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

/// A stream refusal as the unary call would have returned it, with the
/// reason in the `sluice-error` metadata ([`Error::reason`]).
fn refusal(response: &v1::ProduceStreamResponse) -> Status {
    let mut status = Status::new(
        Code::from(response.error_code),
        response.error_message.clone(),
    );
    if !response.error_reason.is_empty()
        && let Ok(reason) = response.error_reason.parse()
    {
        status.metadata_mut().insert("sluice-error", reason);
    }
    status
}

impl PartitionSender {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut stream: Option<Stream> = None;
        let mut opening: Option<Opening> = None;
        let mut retry_at = Instant::now();
        let mut backoff = self.config.retry_backoff;
        let mut open = true;
        loop {
            let has_work = !(self.queued.is_empty() && self.in_flight.is_empty());
            if !open && !has_work {
                return;
            }
            if stream
                .as_ref()
                .is_some_and(|s| s.draining() && s.unanswered == 0)
            {
                // Every answer of the old stream is in: resend on a new one.
                stream = None;
            }
            if stream.is_none() && opening.is_none() && has_work && Instant::now() >= retry_at {
                opening = Some(self.open_stream());
            }
            let ready = stream.as_ref().is_some_and(|s| !s.draining());
            let room = self.in_flight.len() < self.config.max_in_flight;
            let linger = self.linger_until;
            let deadline = self.next_deadline();
            let waiting_to_retry = stream.is_none() && opening.is_none() && has_work;
            tokio::select! {
                command = commands.recv(), if open => match command {
                    Some(Command::Record(pending)) => {
                        self.queued_bytes += pending.size;
                        self.queued.push_back(pending);
                        self.linger_until.get_or_insert(Instant::now() + self.config.linger);
                        if self.queued_bytes >= self.config.batch_bytes && room && ready {
                            self.send_batch(&mut stream);
                        }
                    }
                    Some(Command::Flush) => self.linger_until = Some(Instant::now()),
                    None => {
                        open = false;
                        self.linger_until = Some(Instant::now());
                    }
                },
                () = sleep_until(linger), if linger.is_some() && room && ready => {
                    self.send_batch(&mut stream);
                }
                () = sleep_until(deadline), if deadline.is_some() => {
                    if self.expire(Instant::now()) {
                        // Its answers would not match the batches left.
                        stream = None;
                    }
                }
                () = tokio::time::sleep_until(retry_at), if waiting_to_retry => {}
                opened = poll_opening(&mut opening) => {
                    opening = None;
                    match opened {
                        Ok((identity, opened)) => {
                            backoff = self.config.retry_backoff;
                            self.adopt(identity);
                            stream = Some(opened);
                            self.resend(&mut stream);
                        }
                        // Credentials or rights that are missing stay
                        // missing: fail what is held now, not at the
                        // delivery timeout (a fresh enqueue tries again).
                        Err(Error::Rejected(status))
                            if matches!(
                                status.code(),
                                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                            ) =>
                        {
                            tracing::warn!(topic = %self.topic, partition = self.partition, %status, "the broker refused this producer; failing its records");
                            self.last_error = status.to_string();
                            self.fail_all(&status);
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(self.config.max_retry_backoff);
                        }
                        Err(error) => {
                            tracing::debug!(topic = %self.topic, partition = self.partition, %error, "produce stream unavailable; retrying");
                            self.last_error = error.to_string();
                            retry_at = Instant::now() + backoff;
                            backoff = (backoff * 2).min(self.config.max_retry_backoff);
                        }
                    }
                }
                response = next_response(&mut stream) => match response {
                    Some(Ok(response)) => self.on_response(&mut stream, response).await,
                    Some(Err(status)) => {
                        tracing::debug!(topic = %self.topic, partition = self.partition, %status, "produce stream broke; resending");
                        self.last_error = status.to_string();
                        stream = None;
                    }
                    None => stream = None,
                },
            }
        }
    }

    /// Opens a stream (and, when idempotent and without one, gets the
    /// producer's identity), within [`OPEN_TIMEOUT`].
    fn open_stream(&self) -> Opening {
        let client = self.client.clone();
        let shared = self.shared_identity.clone();
        let identity = self.identity;
        let capacity = self.config.max_in_flight * 2;
        Box::pin(async move {
            let open = async move {
                let identity = match (&shared, identity) {
                    (Some(shared), None) => Some(shared.get().await?),
                    _ => identity,
                };
                let (requests, outbound) = mpsc::channel(capacity);
                let responses = client
                    .clone()
                    .produce_stream(ReceiverStream::new(outbound))
                    .await
                    .map_err(Error::from)?
                    .into_inner();
                Ok((
                    identity,
                    Stream {
                        requests: Some(requests),
                        responses,
                        unanswered: 0,
                    },
                ))
            };
            tokio::time::timeout(OPEN_TIMEOUT, open)
                .await
                .unwrap_or_else(|_| {
                    Err(Error::Unavailable(format!(
                        "no produce stream within {OPEN_TIMEOUT:?}"
                    )))
                })
        })
    }

    /// Takes on the identity a new stream was opened with; batches made
    /// under another one are renumbered from 0.
    fn adopt(&mut self, identity: Option<Identity>) {
        if identity.is_none() || identity == self.identity {
            return;
        }
        self.identity = identity;
        let stale = self
            .in_flight
            .front()
            .is_some_and(|b| b.request.producer.map(|p| (p.producer_id, p.epoch)) != identity);
        if stale {
            self.renumber(0);
        }
    }

    /// Writes every unacknowledged batch to a new stream, oldest first.
    fn resend(&mut self, stream: &mut Option<Stream>) {
        for index in 0..self.in_flight.len() {
            if !self.write(stream, index) {
                return;
            }
        }
    }

    /// Writes batch `index` to the stream; false (and no stream) if it is
    /// gone. Never waits: a stream holds at most `max_in_flight` requests,
    /// half its channel.
    fn write(&mut self, stream: &mut Option<Stream>, index: usize) -> bool {
        let Some(s) = stream else {
            return false;
        };
        let Some(requests) = &s.requests else {
            return false;
        };
        let batch = &mut self.in_flight[index];
        if requests.try_send(batch.request.clone()).is_err() {
            *stream = None;
            return false;
        }
        batch.sent = true;
        s.unanswered += 1;
        true
    }

    /// Makes a batch of the oldest queued records, as many as the broker
    /// takes in one request, and writes it.
    fn send_batch(&mut self, stream: &mut Option<Stream>) {
        self.linger_until = None;
        let Some(first) = self.queued.front() else {
            return;
        };
        let limit = first.max_batch;
        let mut bytes = BATCH_HEADER_BYTES;
        let mut count = 0;
        for pending in &self.queued {
            if count > 0 && bytes + pending.batch_cost > limit {
                break;
            }
            bytes += pending.batch_cost;
            count += 1;
        }
        let records: Vec<Pending> = self.queued.drain(..count).collect();
        self.queued_bytes -= records.iter().map(|p| p.size).sum::<usize>();
        if !self.queued.is_empty() {
            // The rest has waited already: it goes as soon as there is room.
            self.linger_until = Some(Instant::now());
        }
        let producer = self.identity.map(|(producer_id, epoch)| v1::ProducerBatch {
            producer_id,
            epoch,
            base_sequence: self.next_sequence,
        });
        let request = v1::ProduceRequest {
            topic: self.topic.clone(),
            partition: Some(self.partition),
            records: Vec::new(),
            request_id: self.next_id,
            batch: encode_batch(&records, producer, self.config.compression),
            producer,
        };
        self.next_sequence = sequence_add(self.next_sequence, records.len());
        self.next_id += 1;
        self.in_flight.push_back(InFlight {
            request,
            records,
            sent: false,
        });
        self.write(stream, self.in_flight.len() - 1);
    }

    /// Settles the batch `response` answers, or decides what its refusal
    /// means for the batches behind it.
    async fn on_response(
        &mut self,
        stream: &mut Option<Stream>,
        response: v1::ProduceStreamResponse,
    ) {
        let Some(s) = stream.as_mut() else {
            return;
        };
        s.unanswered = s.unanswered.saturating_sub(1);
        let draining = s.draining();
        let index = self
            .in_flight
            .iter()
            .position(|b| b.request.request_id == response.request_id);
        if response.error_code == 0 {
            if let Some(index) = index {
                let batch = self.in_flight.remove(index).expect("index exists");
                let positions = response
                    .response
                    .map(|r| positions_of(&r))
                    .unwrap_or_default();
                let (records, got) = (batch.records.len(), positions.len());
                if records != got {
                    tracing::warn!(topic = %self.topic, partition = self.partition, records, positions = got, "broker acknowledged a batch with the wrong number of positions");
                }
                settle_written(batch.records, positions);
            }
            return;
        }
        let status = refusal(&response);
        let Some(index) = index else {
            if response.request_id == 0 {
                // A refusal of the stream itself: it ends here.
                tracing::debug!(topic = %self.topic, partition = self.partition, %status, "produce stream refused");
                self.last_error = status.to_string();
                *stream = None;
            }
            return;
        };
        if draining {
            // Refused behind an earlier refusal: resent on the next stream.
            return;
        }
        let code = status.code();
        if retryable(code) {
            self.last_error = status.to_string();
            drain(stream);
            return;
        }
        match response.error_reason.as_str() {
            "unknown-producer" | "out-of-order" => {
                self.new_epoch(None).await;
                drain(stream);
                return;
            }
            "fenced" => {
                let ours = self.identity;
                let shared = match &self.shared_identity {
                    Some(shared) => shared.current().await,
                    None => None,
                };
                if shared.is_some() && shared != ours {
                    // A sibling sender renewed the identity: adopt it.
                    self.new_epoch(shared).await;
                } else {
                    // Another instance of this named producer took over.
                    tracing::warn!(topic = %self.topic, partition = self.partition, message = %status.message(), "producer fenced");
                    self.fail_all(&status);
                }
                drain(stream);
                return;
            }
            _ => {}
        }
        if matches!(code, Code::InvalidArgument | Code::NotFound) {
            // Too large for the topic's current limits, or a partition it
            // no longer has: look its settings up again.
            self.metadata.invalidate(&self.topic);
        }
        // Resending the rest of a batch puts it behind the batches after
        // it unless they are refused too: only when idempotent (they are,
        // as out of order) or when none is behind it.
        let nothing_behind = index + 1 == self.in_flight.len();
        let base = self.in_flight[index].request.producer;
        if code == Code::InvalidArgument
            && (self.shared_identity.is_some() || nothing_behind)
            && self.drop_oversized(index, &status).await
        {
            // The rest of the batch goes again, with the batches behind it
            // (refused as out of order meanwhile) after it.
            if let Some(p) = base {
                self.renumber(p.base_sequence);
            }
            drain(stream);
            return;
        }
        let batch = self.in_flight.remove(index).expect("index exists");
        let behind = self.in_flight.len() > index;
        for pending in batch.records {
            pending.settle(Err(Error::Rejected(status.clone())));
        }
        if let Some(p) = batch.request.producer {
            // The batches behind it take over its sequences; the broker
            // refuses the ones it already holds as out of order, so they
            // go again once the stream has answered them all.
            self.renumber(p.base_sequence);
            if behind {
                drain(stream);
            }
        }
    }

    /// After a refusal for size, fails the records of batch `index` the
    /// topic's current settings say are too large and keeps the rest there,
    /// to be sent again (Kafka splits a batch refused as too large). Returns
    /// false, changing nothing, if none is too large by those settings.
    async fn drop_oversized(&mut self, index: usize, status: &Status) -> bool {
        let Ok(limits) = self.metadata.limits(&self.topic).await else {
            return false;
        };
        let too_large =
            |p: &Pending| p.batch_cost - RECORD_OVERHEAD_BYTES > limits.max_record_bytes;
        let batch = &mut self.in_flight[index];
        if !batch.records.iter().any(too_large) {
            return false;
        }
        let (refused, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut batch.records)
            .into_iter()
            .partition(too_large);
        for pending in refused {
            pending.settle(Err(Error::Rejected(status.clone())));
        }
        if kept.is_empty() {
            self.in_flight.remove(index);
            return true;
        }
        batch.request.batch = encode_batch(&kept, batch.request.producer, self.config.compression);
        batch.request.request_id = self.next_id;
        batch.records = kept;
        // Refused, so not written: if it times out, it plainly does.
        batch.sent = false;
        self.next_id += 1;
        true
    }

    /// Moves to `adopt` (or a renewed identity) and renumbers every
    /// unacknowledged batch from sequence 0; the caller resends them.
    async fn new_epoch(&mut self, adopt: Option<Identity>) {
        let Some(shared) = self.shared_identity.clone() else {
            return;
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
            // The producer fields are inside the batch too: it is encoded
            // again with them.
            batch.request.batch = encode_batch(
                &batch.records,
                batch.request.producer,
                self.config.compression,
            );
            sequence = sequence_add(sequence, batch.records.len());
        }
        self.next_sequence = sequence;
    }

    /// Fails every record this sender holds.
    fn fail_all(&mut self, status: &Status) {
        for batch in std::mem::take(&mut self.in_flight) {
            for pending in batch.records {
                pending.settle(Err(Error::Rejected(status.clone())));
            }
        }
        for pending in std::mem::take(&mut self.queued) {
            pending.settle(Err(Error::Rejected(status.clone())));
        }
        self.queued_bytes = 0;
        self.linger_until = None;
    }

    /// When the oldest record held runs out of time.
    fn next_deadline(&self) -> Option<Instant> {
        let in_flight = self
            .in_flight
            .front()
            .and_then(|b| b.records.first())
            .map(|p| p.deadline);
        let queued = self.queued.front().map(|p| p.deadline);
        match (in_flight, queued) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Fails the records whose deadline passed by `now`: batches from the
    /// front (a sent one with an unknown outcome), then queued records.
    /// Returns true if a sent batch expired: the stream must be dropped.
    fn expire(&mut self, now: Instant) -> bool {
        let timeout = self.config.delivery_timeout;
        let mut abandon = false;
        while self
            .in_flight
            .front()
            .is_some_and(|b| b.records.first().is_some_and(|p| p.deadline <= now))
        {
            let batch = self.in_flight.pop_front().expect("front exists");
            if batch.sent {
                // It may have been written. Idempotent batches behind it
                // keep their sequences: if it was written they follow it,
                // if not the broker says out-of-order and they move to a
                // new epoch; renumbering could make the broker take one of
                // them for it and drop it as a duplicate.
                abandon = true;
                for pending in batch.records {
                    pending.settle(Err(Error::UnknownOutcome(
                        timeout,
                        format!("sent, no acknowledgement ({})", self.last_error),
                    )));
                }
            } else {
                // Never sent: neither are the ones behind it (batches are
                // written in order), which take over its sequences.
                if let Some(p) = batch.request.producer {
                    self.renumber(p.base_sequence);
                }
                for pending in batch.records {
                    pending.settle(Err(Error::Timeout(
                        timeout,
                        format!("never sent ({})", self.last_error),
                    )));
                }
            }
        }
        while self.queued.front().is_some_and(|p| p.deadline <= now) {
            let pending = self.queued.pop_front().expect("front exists");
            self.queued_bytes -= pending.size;
            pending.settle(Err(Error::Timeout(
                timeout,
                format!("never sent ({})", self.last_error),
            )));
        }
        if self.queued.is_empty() {
            self.linger_until = None;
        }
        abandon
    }
}

/// Encodes records in the batch format, with the producer fields of the
/// request that carries them, compressed by `codec` unless that would not
/// make it smaller.
fn encode_batch(
    records: &[Pending],
    producer: Option<v1::ProducerBatch>,
    codec: Compression,
) -> bytes::Bytes {
    let producer = producer.map_or(ProducerInfo::NONE, |p| ProducerInfo {
        producer_id: p.producer_id,
        // Epochs come from the broker, which hands out 16-bit ones.
        epoch: u16::try_from(p.epoch).unwrap_or(u16::MAX),
        base_sequence: p.base_sequence,
    });
    let mut builder = BatchBuilder::with_capacity(records.iter().map(|p| p.batch_cost).sum());
    for pending in records {
        builder.push(&pending.record);
    }
    builder.finish_if_smaller(producer, codec).into_bytes()
}

/// Where the records of an acknowledged request landed: its positions, or
/// for a request that sent one encoded batch, its range.
fn positions_of(response: &v1::ProduceResponse) -> Vec<v1::RecordPosition> {
    if !response.positions.is_empty() || response.record_count == 0 {
        return response.positions.clone();
    }
    (0..u64::from(response.record_count))
        .map(|i| v1::RecordPosition {
            partition: response.partition,
            offset: response.base_offset + i,
        })
        .collect()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Settles the records of a batch the broker wrote, each with its
/// position; any it gave no position for fail rather than wait for ever.
fn settle_written(records: Vec<Pending>, positions: Vec<v1::RecordPosition>) {
    let (count, got) = (records.len(), positions.len());
    let mut positions = positions.into_iter();
    for pending in records {
        match positions.next() {
            Some(position) => pending.settle(Ok(Position::from(position))),
            None => pending.settle(Err(Error::Rejected(Status::internal(format!(
                "the broker acknowledged a batch of {count} records with {got} positions"
            ))))),
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

async fn poll_opening(opening: &mut Option<Opening>) -> Result<(Option<Identity>, Stream)> {
    match opening {
        Some(opening) => opening.await,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(
        outstanding: &Arc<Outstanding>,
        buffer: &Arc<Semaphore>,
    ) -> (Pending, DeliveryFuture) {
        let (reply, receiver) = oneshot::channel();
        let pending = Pending {
            record: sluice_format::Record::default(),
            size: 1,
            batch_cost: RECORD_OVERHEAD_BYTES,
            max_batch: usize::MAX,
            deadline: Instant::now(),
            reply: Some(reply),
            _ticket: outstanding.register(),
            _permit: Arc::clone(buffer).try_acquire_owned().unwrap(),
        };
        (pending, DeliveryFuture { receiver })
    }

    #[tokio::test]
    async fn every_record_of_an_acknowledged_batch_settles_even_without_a_position() {
        let outstanding = Arc::new(Outstanding::default());
        let buffer = Arc::new(Semaphore::new(3));
        let (records, deliveries): (Vec<_>, Vec<_>) =
            (0..3).map(|_| pending(&outstanding, &buffer)).unzip();
        let generation = outstanding.barrier();
        let position = v1::RecordPosition {
            partition: 2,
            offset: 7,
        };
        settle_written(records, vec![position]);
        let mut deliveries = deliveries.into_iter();
        let first = deliveries.next().unwrap().await.unwrap();
        assert_eq!((first.partition, first.offset), (2, 7));
        for delivery in deliveries {
            let error = delivery.await.unwrap_err();
            assert_eq!(error.code(), Some(Code::Internal), "{error}");
        }
        // Nothing is left for flush to wait for, and the buffer is free.
        tokio::time::timeout(
            Duration::from_secs(5),
            outstanding.settled_through(generation),
        )
        .await
        .expect("every record settled");
        assert_eq!(buffer.available_permits(), 3);
    }

    #[tokio::test]
    async fn a_dropped_record_fails_with_closed_and_frees_flush() {
        let outstanding = Arc::new(Outstanding::default());
        let buffer = Arc::new(Semaphore::new(1));
        let (record, delivery) = pending(&outstanding, &buffer);
        let generation = outstanding.barrier();
        let later = pending(&outstanding, &Arc::new(Semaphore::new(1)));
        drop(record);
        assert!(matches!(delivery.await, Err(Error::Closed)));
        // A record accepted after the barrier does not hold it up.
        tokio::time::timeout(
            Duration::from_secs(5),
            outstanding.settled_through(generation),
        )
        .await
        .expect("the barrier's generation settled");
        drop(later);
    }

    #[test]
    fn a_refusal_keeps_its_reason() {
        let status = refusal(&v1::ProduceStreamResponse {
            request_id: 3,
            response: None,
            error_code: Code::FailedPrecondition as i32,
            error_message: "fenced by epoch 4".into(),
            error_reason: "fenced".into(),
        });
        assert_eq!(Error::Rejected(status).reason(), Some("fenced"));
    }
}
