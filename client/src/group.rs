//! The group consumer: a [`Consumer`] whose partitions the broker assigns.
//!
//! A background task joins the group and heartbeats, reporting which
//! partitions this consumer holds; the broker answers with the partitions it
//! may hold. The consumer applies a new answer inside [`GroupConsumer::next`]:
//! it commits and releases the partitions taken away (so the next owner
//! starts where this one stopped), then starts the new ones from the group's
//! committed offsets (or `auto_offset_reset` where there is none).
//!
//! Offsets: a record handed over by `next` counts as processed once `next`
//! is called again (or when marked, with manual commits). Processed offsets
//! are committed on an interval (auto commit), when the application asks,
//! before a partition is released, and on [`GroupConsumer::close`]. So
//! every record is processed at least once, and none is skipped.
//!
//! [`GroupConsumer::handle_next`] nacks a record its handler failed on,
//! retrying the nack with backoff while the broker is unreachable. If it
//! still fails, the record is not counted as processed: commits of its
//! partition stop just before it (so after a restart or a move of the
//! partition it is read again), and later calls to `next` send the nack
//! again until it goes through.
//!
//! If the broker drops this member (a missed session timeout, a broker
//! restart), its partitions are already someone else's: it stops reading
//! them without committing ([`GroupEvent::Lost`]) and joins again.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::connection::Channel;
use sluice_proto::v1::{
    self, dead_letter_service_client::DeadLetterServiceClient,
    group_service_client::GroupServiceClient,
};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::admin::Admin;
use crate::connection::{ClientConfig, with_timeout};
use crate::consumer::Consumer;
use crate::error::{Error, Result};
use crate::record::ConsumedRecord;
use crate::record::StartFrom;

/// A topic and partition.
pub type TopicPartition = (String, u32);

/// Where a partition starts when the group has no committed offset for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    /// The earliest record kept: a new group sees everything.
    Earliest,
    /// Only records appended from now on.
    Latest,
    /// Fail: [`GroupConsumer::next`] returns an error naming the partition.
    Error,
}

/// When processed offsets are committed (besides before a partition is
/// released and on close, which always happen).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Every interval, offsets of every record handed over before the
    /// latest call to `next`.
    Auto(Duration),
    /// Only when the application calls [`GroupConsumer::commit`] or
    /// [`GroupConsumer::commit_record`]; [`GroupConsumer::mark_processed`]
    /// sets what a release or close commits.
    Manual,
}

/// Settings of a group consumer.
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The group to join.
    pub group_id: String,
    /// The topics to read.
    pub topics: Vec<String>,
    /// A stable name of this instance (static membership): a restarted
    /// instance with the same name gets its partitions back at once instead
    /// of the group moving them around. Unique within the group.
    pub instance_id: Option<String>,
    /// The broker removes this member when it hears nothing for this long;
    /// its partitions then go to the others. 10 s by default.
    pub session_timeout: Duration,
    /// When offsets are committed. Every 5 s by default.
    pub commit: CommitMode,
    /// Where a partition without a committed offset starts. Earliest by
    /// default.
    pub auto_offset_reset: OffsetReset,
    /// How often to ask the broker for nacked records due for redelivery.
    /// 500 ms by default.
    pub retry_poll_interval: Duration,
    /// Skip, with a warning, offsets the broker lost to a damaged file
    /// instead of stopping: by default [`GroupConsumer::next`] returns
    /// [`Error::DataLoss`] and that partition stops. False by default.
    pub skip_data_loss: bool,
}

impl GroupConfig {
    /// Settings to read `topics` in `group_id`, defaults otherwise.
    pub fn new<T: Into<String>>(
        group_id: impl Into<String>,
        topics: impl IntoIterator<Item = T>,
    ) -> Self {
        GroupConfig {
            group_id: group_id.into(),
            topics: topics.into_iter().map(Into::into).collect(),
            instance_id: None,
            session_timeout: Duration::from_secs(10),
            commit: CommitMode::Auto(Duration::from_secs(5)),
            auto_offset_reset: OffsetReset::Earliest,
            retry_poll_interval: Duration::from_millis(500),
            skip_data_loss: false,
        }
    }
}

/// A change of what this consumer reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// These partitions were assigned; reading starts at the committed
    /// offsets.
    Assigned(Vec<TopicPartition>),
    /// These were taken away, after their offsets were committed.
    Revoked(Vec<TopicPartition>),
    /// This member was dropped from the group (missed session timeout,
    /// broker restart): these partitions may already be read elsewhere and
    /// were released without a commit. The consumer joins again by itself.
    Lost(Vec<TopicPartition>),
}

/// This member's identity, as the membership task last heard it.
#[derive(Debug, Clone, Default)]
struct Membership {
    member_id: String,
    member_epoch: u64,
}

/// State shared by the consumer and its membership task.
#[derive(Default)]
struct Shared {
    membership: Mutex<Membership>,
    /// What the consumer holds; reported in every heartbeat.
    owned: Mutex<BTreeSet<TopicPartition>>,
    /// Asks for a heartbeat now (after a release, so the next owner need
    /// not wait a whole interval).
    heartbeat_now: Notify,
}

/// What the membership task tells the consumer.
#[derive(Debug, Clone, Default)]
struct Update {
    /// Increases with every join: a new generation means the partitions of
    /// the previous one were lost.
    generation: u64,
    assigned: BTreeSet<TopicPartition>,
    /// Joining failed for good (a topic was deleted, a bad setting).
    failure: Option<(tonic::Code, String)>,
}

/// Reads the partitions the group assigns to it, as records; commits its
/// progress for the group. See the module docs for the guarantees.
///
/// Dropping it without [`close`](GroupConsumer::close) is like a crash: the
/// broker keeps its partitions until its session times out.
pub struct GroupConsumer {
    consumer: Consumer,
    admin: Admin,
    client: GroupServiceClient<Channel>,
    dead_letters: DeadLetterServiceClient<Channel>,
    config: GroupConfig,
    request_timeout: Duration,
    shared: Arc<Shared>,
    updates: watch::Receiver<Update>,
    membership_task: JoinHandle<()>,
    generation: u64,
    owned: BTreeSet<TopicPartition>,
    /// Offsets to commit: one past the last processed record.
    processed: HashMap<TopicPartition, u64>,
    /// Offsets last committed (or read as committed).
    committed: HashMap<TopicPartition, u64>,
    next_auto_commit: Instant,
    events: Option<mpsc::UnboundedSender<GroupEvent>>,
    /// Redeliveries fetched by the retry task, not yet handed over. A task
    /// of its own so that a `next` cancelled mid-fetch cannot drop records
    /// the broker already counts as handed out.
    retries: mpsc::Receiver<ConsumedRecord>,
    retry_task: JoinHandle<()>,
    /// A rebalance started but did not finish (`next` was cancelled in the
    /// middle of it, or it failed): the next call applies it again.
    rebalance_pending: bool,
    /// Nacks of `handle_next` that failed even after retries; sent again
    /// by `next`. Commits stop before the first of them in each partition.
    unsent_nacks: Vec<UnsentNack>,
    /// When `next` may try the unsent nacks again.
    next_nack_resend: Instant,
}

/// A nack the broker has not received yet.
#[derive(Debug, Clone)]
struct UnsentNack {
    record: v1::RecordRef,
    /// A redelivery is below the committed offset already; the broker
    /// still holds it in the retry set, so it holds back no commit.
    redelivery: bool,
    reason: String,
    error_class: String,
}

/// Tries of one nack in `handle_next` before it is left for `next` to send
/// again, and the first wait between them (doubling).
const NACK_ATTEMPTS: u32 = 5;
const NACK_FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// How often `next` sends unsent nacks again.
const NACK_RESEND_INTERVAL: Duration = Duration::from_secs(1);

impl GroupConsumer {
    /// Joins the group (in the background; partitions arrive with the first
    /// heartbeat answers, inside [`next`](GroupConsumer::next)).
    pub fn new(client_config: &ClientConfig, config: GroupConfig) -> Result<GroupConsumer> {
        let channel = client_config.channel()?;
        let client = GroupServiceClient::new(channel.clone());
        let dead_letters = DeadLetterServiceClient::new(channel)
            .max_decoding_message_size(client_config.max_message_bytes);
        let shared = Arc::new(Shared::default());
        let (sender, updates) = watch::channel(Update::default());
        let task = MembershipTask {
            client: client.clone(),
            config: config.clone(),
            request_timeout: client_config.request_timeout,
            shared: Arc::clone(&shared),
            updates: sender,
        };
        let (retry_sender, retries) = mpsc::channel(RETRY_QUEUE);
        let retry_task = RetryTask {
            client: dead_letters.clone(),
            group_id: config.group_id.clone(),
            interval: config.retry_poll_interval,
            request_timeout: client_config.request_timeout,
            shared: Arc::clone(&shared),
            sender: retry_sender,
        };
        let next_auto_commit = Instant::now()
            + match config.commit {
                CommitMode::Auto(every) => every,
                CommitMode::Manual => Duration::ZERO,
            };
        let mut consumer = Consumer::new(client_config)?;
        consumer.set_skip_data_loss(config.skip_data_loss);
        Ok(GroupConsumer {
            consumer,
            admin: Admin::new(client_config)?,
            client,
            dead_letters,
            config,
            request_timeout: client_config.request_timeout,
            shared,
            updates,
            membership_task: tokio::spawn(task.run()),
            generation: 0,
            owned: BTreeSet::new(),
            processed: HashMap::new(),
            committed: HashMap::new(),
            next_auto_commit,
            events: None,
            rebalance_pending: false,
            retries,
            retry_task: tokio::spawn(retry_task.run()),
            unsent_nacks: Vec::new(),
            next_nack_resend: Instant::now(),
        })
    }

    /// Assignment changes from now on, as they are applied. Call once; a
    /// second call replaces the first receiver.
    pub fn events(&mut self) -> mpsc::UnboundedReceiver<GroupEvent> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.events = Some(sender);
        receiver
    }

    /// The partitions being read, in order.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.iter().cloned().collect()
    }

    /// This member's id in the group (empty until it joined).
    pub fn member_id(&self) -> String {
        lock(&self.shared.membership).member_id.clone()
    }

    /// The next record of any assigned partition. Waits for records and
    /// for partitions; applies assignment changes and auto commits on the
    /// way. Records handed over before this call count as processed.
    ///
    /// Cancel safe: dropped mid-way (a `select!`, a timeout), no record is
    /// lost and an assignment change half applied is finished by the next
    /// call.
    pub async fn next(&mut self) -> Result<ConsumedRecord> {
        if !self.unsent_nacks.is_empty() && Instant::now() >= self.next_nack_resend {
            self.resend_nacks().await;
        }
        if matches!(self.config.commit, CommitMode::Auto(_)) {
            self.mark_handed_over();
            if Instant::now() >= self.next_auto_commit {
                self.auto_commit().await;
            }
        }
        loop {
            if self.rebalance_pending || self.updates.has_changed().unwrap_or(false) {
                self.rebalance().await?;
                continue;
            }
            let auto_commit_due =
                matches!(self.config.commit, CommitMode::Auto(_)) && self.has_uncommitted();
            let deadline = self.next_auto_commit;
            let resend_due = !self.unsent_nacks.is_empty();
            let resend_at = self.next_nack_resend;
            tokio::select! {
                biased;
                changed = self.updates.changed() => {
                    // `changed` marks the update seen: apply it now.
                    if changed.is_err() {
                        return Err(Error::Closed);
                    }
                    self.rebalance().await?;
                }
                Some(retry) = self.retries.recv() => {
                    // Not if the partition moved meanwhile: its new owner
                    // gets it once the redelivery timeout passes.
                    if self.owned.contains(&(retry.topic.clone(), retry.partition)) {
                        return Ok(retry);
                    }
                }
                () = tokio::time::sleep_until(deadline), if auto_commit_due => {
                    self.auto_commit().await;
                }
                () = tokio::time::sleep_until(resend_at), if resend_due => {
                    self.resend_nacks().await;
                }
                record = self.consumer.next_record(), if !self.owned.is_empty() => {
                    match record {
                        Some(Ok(record)) => return Ok(record),
                        Some(Err(error)) => return Err(error),
                        None => {}
                    }
                }
            }
        }
    }

    /// Reports that `record` could not be processed. The group still moves
    /// past it; the broker redelivers it (through `next`, with a higher
    /// [`attempt`](ConsumedRecord::attempt)) after a backoff, and after the
    /// topic's `max_deliveries` failed deliveries moves it to the group's
    /// dead-letter topic. True when this nack dead-lettered it.
    pub async fn nack(
        &mut self,
        record: &ConsumedRecord,
        reason: &str,
        error_class: &str,
    ) -> Result<bool> {
        self.send_nack(record_ref(record), reason, error_class)
            .await
    }

    async fn send_nack(
        &mut self,
        record: v1::RecordRef,
        reason: &str,
        error_class: &str,
    ) -> Result<bool> {
        let member_id = lock(&self.shared.membership).member_id.clone();
        let answer = self
            .dead_letters
            .nack(self.request(v1::NackRequest {
                group_id: self.config.group_id.clone(),
                member_id,
                record: Some(record),
                reason: reason.to_owned(),
                error_class: error_class.to_owned(),
            }))
            .await?
            .into_inner();
        if !answer.undeliverable.is_empty() {
            tracing::warn!(group = %self.config.group_id, reason = %answer.undeliverable, "the broker could not write the dead letter; it keeps the record in the retry set as undeliverable");
        }
        Ok(answer.dead_lettered)
    }

    /// Sends a nack, trying again with backoff while the broker is
    /// unreachable; if it still fails, keeps it for `next` to send again
    /// and holds back commits of its partition (see the module docs).
    async fn nack_or_keep(&mut self, nack: UnsentNack) -> Result<()> {
        // Kept from the start, so that a `handle_next` cancelled mid-way
        // leaves the nack to be sent again rather than lost.
        self.unsent_nacks.push(nack.clone());
        let mut backoff = NACK_FIRST_BACKOFF;
        let mut attempt = 1;
        loop {
            match self
                .send_nack(nack.record.clone(), &nack.reason, &nack.error_class)
                .await
            {
                Ok(_) => {
                    if let Some(i) = self
                        .unsent_nacks
                        .iter()
                        .position(|n| n.record == nack.record)
                    {
                        self.unsent_nacks.remove(i);
                    }
                    return Ok(());
                }
                Err(error) if error.is_retryable() && attempt < NACK_ATTEMPTS => {
                    tracing::debug!(%error, attempt, "nack failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(error) => {
                    tracing::warn!(%error, group = %self.config.group_id, topic = %nack.record.topic, partition = nack.record.partition, offset = nack.record.offset, "nack failed; the record is not counted as processed and the nack is sent again later");
                    self.next_nack_resend = Instant::now() + NACK_RESEND_INTERVAL;
                    return Err(error);
                }
            }
        }
    }

    /// One more try of each unsent nack of a partition still held.
    async fn resend_nacks(&mut self) {
        self.next_nack_resend = Instant::now() + NACK_RESEND_INTERVAL;
        let nacks = std::mem::take(&mut self.unsent_nacks);
        for nack in nacks {
            if !self
                .owned
                .contains(&(nack.record.topic.clone(), nack.record.partition))
            {
                continue;
            }
            match self
                .send_nack(nack.record.clone(), &nack.reason, &nack.error_class)
                .await
            {
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "sending a nack again failed; later");
                    self.unsent_nacks.push(nack);
                }
            }
        }
    }

    /// What a commit of `tp` may write, given `processed`: not past a
    /// record whose nack has not reached the broker.
    fn commit_offset(&self, tp: &TopicPartition, processed: u64) -> u64 {
        self.unsent_nacks
            .iter()
            .filter(|n| !n.redelivery && n.record.topic == tp.0 && n.record.partition == tp.1)
            .map(|n| n.record.offset)
            .fold(processed, u64::min)
    }

    /// Reports that a redelivered record was processed, so it leaves the
    /// group's retry set. A record read from its partition needs no ack:
    /// this does nothing for it.
    pub async fn ack(&mut self, record: &ConsumedRecord) -> Result<()> {
        if !record.redelivery {
            return Ok(());
        }
        let member_id = lock(&self.shared.membership).member_id.clone();
        self.dead_letters
            .ack(self.request(v1::AckRequest {
                group_id: self.config.group_id.clone(),
                member_id,
                record: Some(record_ref(record)),
            }))
            .await?;
        Ok(())
    }

    /// Takes the next record and runs `handler` on it: acks it when the
    /// handler succeeds, nacks it with the error as the reason when it
    /// fails. So a poison record never blocks its partition.
    ///
    /// A nack that fails is tried again with backoff; if it still fails,
    /// the error is returned, the record is not counted as processed
    /// (commits of its partition stop before it) and `next` sends the nack
    /// again later (see the module docs).
    pub async fn handle_next<F, Fut, E>(&mut self, handler: F) -> Result<()>
    where
        F: FnOnce(ConsumedRecord) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<(), E>>,
        E: std::fmt::Display,
    {
        let record = self.next().await?;
        let reference = record.clone();
        match handler(record).await {
            Ok(()) => self.ack(&reference).await,
            Err(error) => {
                self.nack_or_keep(UnsentNack {
                    record: record_ref(&reference),
                    redelivery: reference.redelivery,
                    reason: error.to_string(),
                    error_class: "handler".to_owned(),
                })
                .await
            }
        }
    }

    /// Marks `record` processed: its offset + 1 is what the next commit of
    /// its partition writes (with [`CommitMode::Manual`]; auto commit marks
    /// everything handed over by itself).
    pub fn mark_processed(&mut self, record: &ConsumedRecord) {
        let tp = (record.topic.clone(), record.partition);
        if self.owned.contains(&tp) {
            let next = record.offset + 1;
            let entry = self.processed.entry(tp).or_insert(next);
            *entry = (*entry).max(next);
        }
    }

    /// Commits every record handed over so far, and waits until the
    /// broker has it on disk.
    pub async fn commit(&mut self) -> Result<()> {
        self.mark_handed_over();
        self.commit_processed(None).await
    }

    /// Commits up to and including `record` in its partition.
    pub async fn commit_record(&mut self, record: &ConsumedRecord) -> Result<()> {
        self.mark_processed(record);
        let tp = (record.topic.clone(), record.partition);
        self.commit_processed(Some(&[tp])).await
    }

    /// Commits what was processed, leaves the group (its partitions go to
    /// the others at once) and stops reading.
    pub async fn close(mut self) -> Result<()> {
        if matches!(self.config.commit, CommitMode::Auto(_)) {
            self.mark_handed_over();
        }
        let committed = self.commit_processed(None).await;
        self.membership_task.abort();
        self.retry_task.abort();
        let membership = lock(&self.shared.membership).clone();
        if !membership.member_id.is_empty() {
            let left = self
                .client
                .leave_group(self.request(v1::LeaveGroupRequest {
                    group_id: self.config.group_id.clone(),
                    member_id: membership.member_id,
                }))
                .await;
            if let Err(status) = left {
                tracing::debug!(%status, "leaving the group failed; the session timeout will remove this member");
            }
        }
        committed
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_timeout(message, self.request_timeout)
    }

    fn emit(&self, event: GroupEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }

    /// Everything handed over is processed (auto commit's rule).
    fn mark_handed_over(&mut self) {
        for tp in &self.owned {
            if let Some(position) = self.consumer.position(&tp.0, tp.1) {
                self.processed.insert(tp.clone(), position);
            }
        }
    }

    fn has_uncommitted(&self) -> bool {
        self.processed
            .iter()
            .any(|(tp, offset)| self.committed.get(tp) != Some(&self.commit_offset(tp, *offset)))
    }

    async fn auto_commit(&mut self) {
        if let CommitMode::Auto(every) = self.config.commit {
            self.next_auto_commit = Instant::now() + every;
        }
        if let Err(error) = self.commit_processed(None).await {
            tracing::warn!(%error, group = %self.config.group_id, "auto commit failed; the next one will try again");
        }
    }

    /// Commits processed offsets that differ from the committed ones, of
    /// `only` these partitions or of all.
    async fn commit_processed(&mut self, only: Option<&[TopicPartition]>) -> Result<()> {
        let offsets: Vec<v1::OffsetCommit> = self
            .processed
            .iter()
            .filter(|(tp, _)| only.is_none_or(|only| only.contains(tp)))
            .map(|(tp, offset)| (tp, self.commit_offset(tp, *offset)))
            .filter(|(tp, offset)| self.committed.get(*tp) != Some(offset))
            .map(|((topic, partition), offset)| v1::OffsetCommit {
                topic: topic.clone(),
                partition: *partition,
                offset,
                metadata: String::new(),
            })
            .collect();
        if offsets.is_empty() {
            return Ok(());
        }
        let membership = lock(&self.shared.membership).clone();
        self.client
            .commit_offsets(self.request(v1::CommitOffsetsRequest {
                group_id: self.config.group_id.clone(),
                member_id: membership.member_id,
                member_epoch: membership.member_epoch,
                offsets: offsets.clone(),
            }))
            .await?;
        for commit in offsets {
            self.committed
                .insert((commit.topic, commit.partition), commit.offset);
        }
        Ok(())
    }

    /// Applies the membership task's latest answer: releases what was
    /// taken away (after committing it), starts what was given.
    ///
    /// Each step changes `owned` only once done, so running it again after
    /// an interruption picks up where it stopped.
    async fn rebalance(&mut self) -> Result<()> {
        self.rebalance_pending = true;
        let update = self.updates.borrow_and_update().clone();
        if let Some((code, message)) = update.failure {
            return Err(Error::Rejected(tonic::Status::new(code, message)));
        }
        if update.generation != self.generation {
            self.generation = update.generation;
            let lost: Vec<TopicPartition> = std::mem::take(&mut self.owned).into_iter().collect();
            for (topic, partition) in &lost {
                self.consumer.unassign(topic, *partition);
            }
            self.processed.clear();
            self.committed.clear();
            // Read again by the partitions' next owners.
            self.unsent_nacks.clear();
            lock(&self.shared.owned).clear();
            if !lost.is_empty() {
                tracing::warn!(group = %self.config.group_id, partitions = lost.len(), "dropped from the group; released partitions without committing and joined again");
                self.emit(GroupEvent::Lost(lost));
            }
        }
        let revoked: Vec<TopicPartition> =
            self.owned.difference(&update.assigned).cloned().collect();
        if !revoked.is_empty() {
            // Inside `next`, so everything handed over is processed, even
            // with manual commits for what was marked.
            if matches!(self.config.commit, CommitMode::Auto(_)) {
                self.mark_handed_over();
            }
            if let Err(error) = self.commit_processed(Some(&revoked)).await {
                tracing::warn!(%error, group = %self.config.group_id, "commit before releasing partitions failed; the next owner may see some records again");
            }
            for tp in &revoked {
                self.consumer.unassign(&tp.0, tp.1);
                self.owned.remove(tp);
                self.processed.remove(tp);
                self.committed.remove(tp);
            }
            // Committed only up to them: the next owner reads them again.
            self.unsent_nacks
                .retain(|n| !revoked.contains(&(n.record.topic.clone(), n.record.partition)));
            *lock(&self.shared.owned) = self.owned.clone();
            self.shared.heartbeat_now.notify_one();
            self.emit(GroupEvent::Revoked(revoked));
        }
        let added: Vec<TopicPartition> = update.assigned.difference(&self.owned).cloned().collect();
        if !added.is_empty() {
            let starts = self.start_offsets(&added).await?;
            for (tp, offset) in added.iter().zip(starts) {
                self.consumer.start(&tp.0, tp.1, offset);
                self.owned.insert(tp.clone());
                self.processed.insert(tp.clone(), offset);
            }
            *lock(&self.shared.owned) = self.owned.clone();
            self.shared.heartbeat_now.notify_one();
            self.emit(GroupEvent::Assigned(added));
        }
        self.rebalance_pending = false;
        Ok(())
    }

    /// Where each partition starts: the committed offset, or
    /// `auto_offset_reset`. Retries while the broker is unreachable.
    async fn start_offsets(&mut self, partitions: &[TopicPartition]) -> Result<Vec<u64>> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.try_start_offsets(partitions).await {
                Err(error) if error.is_retryable() => {
                    tracing::debug!(%error, "reading committed offsets failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                other => return other,
            }
        }
    }

    async fn try_start_offsets(&mut self, partitions: &[TopicPartition]) -> Result<Vec<u64>> {
        let topics: BTreeSet<&String> = partitions.iter().map(|(t, _)| t).collect();
        let committed: HashMap<TopicPartition, u64> = self
            .client
            .fetch_offsets(self.request(v1::FetchOffsetsRequest {
                group_id: self.config.group_id.clone(),
                topics: topics.into_iter().cloned().collect(),
            }))
            .await?
            .into_inner()
            .offsets
            .into_iter()
            .map(|c| ((c.topic, c.partition), c.offset))
            .collect();
        let mut starts = Vec::with_capacity(partitions.len());
        for tp in partitions {
            let offset = match committed.get(tp) {
                Some(&offset) => {
                    self.committed.insert(tp.clone(), offset);
                    offset
                }
                None => {
                    let at = match self.config.auto_offset_reset {
                        OffsetReset::Earliest => StartFrom::Earliest,
                        OffsetReset::Latest => StartFrom::Latest,
                        OffsetReset::Error => {
                            return Err(Error::Rejected(tonic::Status::failed_precondition(
                                format!(
                                    "group {:?} has no committed offset for {}/{} and \
                                     auto_offset_reset is Error",
                                    self.config.group_id, tp.0, tp.1
                                ),
                            )));
                        }
                    };
                    let offsets = self.admin.offsets(&tp.0, &[tp.1], at).await?;
                    offsets.first().map_or(0, |(_, o)| *o)
                }
            };
            starts.push(offset);
        }
        Ok(starts)
    }
}

impl Drop for GroupConsumer {
    fn drop(&mut self) {
        self.membership_task.abort();
        self.retry_task.abort();
    }
}

/// Redeliveries fetched and not yet handed over, at most: the retry task
/// asks for no more than there is room for, so a slow application is not
/// handed records the broker would redeliver past their timeout.
const RETRY_QUEUE: usize = 100;

/// Asks the broker for due retries of this member every interval.
struct RetryTask {
    client: DeadLetterServiceClient<Channel>,
    group_id: String,
    interval: Duration,
    request_timeout: Duration,
    shared: Arc<Shared>,
    sender: mpsc::Sender<ConsumedRecord>,
}

impl RetryTask {
    async fn run(mut self) {
        loop {
            tokio::time::sleep(self.interval).await;
            if self.sender.is_closed() {
                return;
            }
            let room = self.sender.capacity();
            let member_id = lock(&self.shared.membership).member_id.clone();
            if room == 0 || member_id.is_empty() {
                continue;
            }
            let request = with_timeout(
                v1::FetchRetriesRequest {
                    group_id: self.group_id.clone(),
                    member_id,
                    max_records: room as u32,
                },
                self.request_timeout,
            );
            let records = match self.client.fetch_retries(request).await {
                Ok(answer) => answer.into_inner().records,
                Err(status) => {
                    tracing::debug!(%status, "fetching retries failed; the next poll tries again");
                    continue;
                }
            };
            for retry in records {
                let Some(record) = retry.record else { continue };
                let mut record = ConsumedRecord::from(record);
                record.attempt = retry.attempt;
                record.redelivery = true;
                if self.sender.send(record).await.is_err() {
                    return;
                }
            }
        }
    }
}

fn record_ref(record: &ConsumedRecord) -> v1::RecordRef {
    v1::RecordRef {
        topic: record.topic.clone(),
        partition: record.partition,
        offset: record.offset,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves plain data behind; keep going.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Joins, heartbeats, and joins again when the broker forgot the member.
struct MembershipTask {
    client: GroupServiceClient<Channel>,
    config: GroupConfig,
    request_timeout: Duration,
    shared: Arc<Shared>,
    updates: watch::Sender<Update>,
}

impl MembershipTask {
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        // A heartbeat that hangs must not outlive the session.
        with_timeout(
            message,
            self.request_timeout.min(self.config.session_timeout / 2),
        )
    }

    async fn run(mut self) {
        let mut generation = 0;
        loop {
            let Some(mut interval) = self.join().await else {
                return;
            };
            generation += 1;
            self.updates.send_modify(|u| {
                u.generation = generation;
                u.assigned.clear();
            });
            let mut backoff = Duration::from_millis(50);
            loop {
                let owned = lock(&self.shared.owned).clone();
                let member_id = lock(&self.shared.membership).member_id.clone();
                let answer = self
                    .client
                    .heartbeat(self.request(v1::HeartbeatRequest {
                        group_id: self.config.group_id.clone(),
                        member_id,
                        owned: v1::TopicPartitions::group(
                            owned.iter().map(|(t, p)| (t.as_str(), *p)),
                        ),
                    }))
                    .await
                    .map_err(Error::from);
                match answer {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        backoff = Duration::from_millis(50);
                        interval = Duration::from_millis(u64::from(answer.heartbeat_interval_ms));
                        lock(&self.shared.membership).member_epoch = answer.member_epoch;
                        let assigned = v1::TopicPartitions::flatten(answer.assigned).collect();
                        self.updates.send_if_modified(|u| {
                            let changed = u.assigned != assigned;
                            u.assigned = assigned;
                            changed
                        });
                    }
                    Err(error) if error.reason() == Some("unknown-member") => {
                        tracing::info!(group = %self.config.group_id, "the broker no longer knows this member; joining again");
                        break;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "heartbeat failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(interval.max(Duration::from_millis(50)));
                        continue;
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = self.shared.heartbeat_now.notified() => {}
                }
            }
        }
    }

    /// Joins the group; retries while the broker is unreachable. `None`
    /// after a refusal, which is handed to the consumer.
    async fn join(&mut self) -> Option<Duration> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let joined = self
                .client
                .join_group(self.request(v1::JoinGroupRequest {
                    group_id: self.config.group_id.clone(),
                    instance_id: self.config.instance_id.clone(),
                    topics: self.config.topics.clone(),
                    session_timeout_ms:
                        u32::try_from(self.config.session_timeout.as_millis()).unwrap_or(u32::MAX),
                }))
                .await;
            match joined {
                Ok(joined) => {
                    let joined = joined.into_inner();
                    *lock(&self.shared.membership) = Membership {
                        member_id: joined.member_id,
                        member_epoch: joined.member_epoch,
                    };
                    return Some(Duration::from_millis(u64::from(
                        joined.heartbeat_interval_ms,
                    )));
                }
                Err(status) => {
                    let error = Error::from(status.clone());
                    if !error.is_retryable() {
                        tracing::warn!(%error, group = %self.config.group_id, "joining the group was refused");
                        self.updates.send_modify(|u| {
                            u.failure = Some((status.code(), status.message().to_owned()));
                        });
                        return None;
                    }
                    tracing::debug!(%error, "joining the group failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}
