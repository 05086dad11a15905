//! The consumer: partitions read as one stream of records.
//!
//! Each assigned partition has a task holding a `Subscribe` stream for it:
//! the broker pushes records as they are appended. The tasks feed one
//! bounded queue, so a slow application slows the streams down (flow control
//! reaches the broker) instead of buffering without bound. When a stream
//! breaks, its task resubscribes from the next offset it has not handed
//! over, so a broker restart neither skips nor repeats a record.
//!
//! Group membership and committed offsets come with consumer groups; until
//! then the application chooses where each partition starts.
//!
//! A read inside offsets the broker lost to a damaged file hands over
//! [`Error::DataLoss`] and stops that partition; seek to its `next_offset`
//! to go on, or set [`Consumer::set_skip_data_loss`] to skip such ranges
//! with a warning.

use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::connection::Channel;
use sluice_proto::v1::{self, consume_service_client::ConsumeServiceClient};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};

use crate::admin::Admin;
use crate::connection::ClientConfig;
use crate::error::{Error, Result};
use crate::record::{ConsumedRecord, StartFrom};

/// Records handed from partition tasks to the application.
const QUEUE: usize = 1024;

struct Delivery {
    key: (String, u32),
    generation: u64,
    record: Result<ConsumedRecord>,
}

struct Assignment {
    task: JoinHandle<()>,
    generation: u64,
    /// The next offset to hand to the application.
    position: u64,
}

/// Reads assigned partitions as a [`Stream`] of records.
pub struct Consumer {
    client: ConsumeServiceClient<Channel>,
    admin: Admin,
    assignments: HashMap<(String, u32), Assignment>,
    generations: u64,
    sender: mpsc::Sender<Delivery>,
    receiver: mpsc::Receiver<Delivery>,
    skip_data_loss: bool,
}

impl Consumer {
    /// A consumer of the broker of `config`, with nothing assigned yet.
    pub fn new(config: &ClientConfig) -> Result<Consumer> {
        let client = ConsumeServiceClient::new(config.channel()?)
            .max_decoding_message_size(config.max_message_bytes);
        let (sender, receiver) = mpsc::channel(QUEUE);
        Ok(Consumer {
            client,
            admin: Admin::new(config)?,
            assignments: HashMap::new(),
            generations: 0,
            sender,
            receiver,
            skip_data_loss: false,
        })
    }

    /// Whether a partition reader skips past offsets the broker lost to
    /// damage ([`Error::DataLoss`]) with a warning, instead of handing the
    /// error over and stopping that partition (the default). Applies to
    /// partitions assigned from now on.
    pub fn set_skip_data_loss(&mut self, skip: bool) {
        self.skip_data_loss = skip;
    }

    /// Starts reading `partitions` of `topic` (all of them if empty) from
    /// `start`.
    pub async fn assign(
        &mut self,
        topic: &str,
        partitions: &[u32],
        start: StartFrom,
    ) -> Result<()> {
        for (partition, offset) in self.admin.offsets(topic, partitions, start).await? {
            self.start(topic, partition, offset);
        }
        Ok(())
    }

    /// Moves one partition to `start`; records not yet handed over from the
    /// old position are dropped.
    pub async fn seek(&mut self, topic: &str, partition: u32, start: StartFrom) -> Result<()> {
        let offsets = self.admin.offsets(topic, &[partition], start).await?;
        let offset = offsets.first().map(|(_, o)| *o).ok_or_else(|| {
            Error::Rejected(tonic::Status::not_found(format!("{topic}/{partition}")))
        })?;
        self.start(topic, partition, offset);
        Ok(())
    }

    /// Stops reading a partition.
    pub fn unassign(&mut self, topic: &str, partition: u32) {
        if let Some(old) = self.assignments.remove(&(topic.to_owned(), partition)) {
            old.task.abort();
        }
    }

    /// The next offset this consumer will hand over for a partition.
    pub fn position(&self, topic: &str, partition: u32) -> Option<u64> {
        self.assignments
            .get(&(topic.to_owned(), partition))
            .map(|a| a.position)
    }

    /// Partitions being read.
    pub fn assignment(&self) -> Vec<(String, u32)> {
        let mut all: Vec<_> = self.assignments.keys().cloned().collect();
        all.sort();
        all
    }

    /// Starts reading a partition at `offset` (the broker clamps it to what
    /// the partition keeps).
    pub(crate) fn start(&mut self, topic: &str, partition: u32, offset: u64) {
        self.unassign(topic, partition);
        self.generations += 1;
        let key = (topic.to_owned(), partition);
        let reader = PartitionReader {
            client: self.client.clone(),
            key: key.clone(),
            generation: self.generations,
            next: offset,
            sender: self.sender.clone(),
            skip_data_loss: self.skip_data_loss,
        };
        self.assignments.insert(
            key,
            Assignment {
                task: tokio::spawn(reader.run()),
                generation: self.generations,
                position: offset,
            },
        );
    }

    /// The next record of any assigned partition, waiting for one to be
    /// appended if need be. `None` only when nothing is assigned.
    pub async fn next_record(&mut self) -> Option<Result<ConsumedRecord>> {
        std::future::poll_fn(|cx| self.poll_record(cx)).await
    }

    fn poll_record(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<ConsumedRecord>>> {
        loop {
            if self.assignments.is_empty() {
                return Poll::Ready(None);
            }
            let Some(delivery) = std::task::ready!(self.receiver.poll_recv(cx)) else {
                return Poll::Ready(None);
            };
            let Some(assignment) = self.assignments.get_mut(&delivery.key) else {
                continue; // unassigned since
            };
            if assignment.generation != delivery.generation {
                continue; // from before a seek
            }
            if let Ok(record) = &delivery.record {
                assignment.position = record.offset + 1;
            }
            return Poll::Ready(Some(delivery.record));
        }
    }
}

impl Stream for Consumer {
    type Item = Result<ConsumedRecord>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_record(cx)
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        for assignment in self.assignments.values() {
            assignment.task.abort();
        }
    }
}

struct PartitionReader {
    client: ConsumeServiceClient<Channel>,
    key: (String, u32),
    generation: u64,
    next: u64,
    sender: mpsc::Sender<Delivery>,
    skip_data_loss: bool,
}

impl PartitionReader {
    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.read().await {
                Ok(()) => return, // the consumer went away
                Err(Error::DataLoss {
                    message,
                    next_offset,
                }) if self.skip_data_loss && next_offset > self.next => {
                    tracing::warn!(topic = %self.key.0, partition = self.key.1, from = self.next,
                        to = next_offset, %message, "skipping records lost to damage");
                    self.next = next_offset;
                }
                Err(error) if error.is_retryable() => {
                    tracing::debug!(topic = %self.key.0, partition = self.key.1, %error, "subscription broke; resubscribing");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    let _ = self.deliver(Err(error)).await;
                    return;
                }
            }
        }
    }

    /// Reads until the stream breaks (an error) or the consumer is gone.
    async fn read(&mut self) -> Result<()> {
        let request = v1::SubscribeRequest {
            topic: self.key.0.clone(),
            partitions: vec![self.key.1],
            start: Some(v1::subscribe_request::Start::Offset(self.next)),
            max_batch_records: 0,
            // Stored batches as they are: the broker copies them out of the
            // map and we slice records out of them without copying.
            format: v1::RecordFormat::Batches as i32,
        };
        let mut stream = self.client.clone().subscribe(request).await?.into_inner();
        loop {
            let message = match stream.next().await {
                Some(Ok(message)) => message,
                Some(Err(status)) => return Err(status.into()),
                None => return Err(Error::Unavailable("subscription ended".into())),
            };
            // A broker that predates batch reads answers with records.
            for record in message.records {
                if record.offset < self.next {
                    continue;
                }
                self.next = record.offset + 1;
                if !self.deliver(Ok(record.into())).await {
                    return Ok(());
                }
            }
            for record in crate::record::consumed_from_batches(
                &self.key.0,
                self.key.1,
                message.batches,
                self.next,
            )? {
                self.next = record.offset + 1;
                if !self.deliver(Ok(record)).await {
                    return Ok(());
                }
            }
        }
    }

    async fn deliver(&self, record: Result<ConsumedRecord>) -> bool {
        self.sender
            .send(Delivery {
                key: self.key.clone(),
                generation: self.generation,
                record,
            })
            .await
            .is_ok()
    }
}
