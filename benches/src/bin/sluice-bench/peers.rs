//! The peers through their usual Rust clients: NATS JetStream
//! (`async-nats`: a file-storage stream per topic, a subject per
//! partition, asynchronous publish with acknowledgements, pull consumers
//! without acks) and Redis Streams (`redis` with tokio: a stream key per
//! partition, pipelined XADD per batch, XREAD for reading).

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use tokio_stream::{Stream, StreamExt as _, StreamMap};

/// A NATS server with JetStream.
#[derive(Clone)]
pub struct Nats {
    url: String,
    js: jetstream::Context,
}

fn subject(topic: &str, partition: u32) -> String {
    format!("{topic}.{partition}")
}

impl Nats {
    pub async fn connect(url: &str) -> Result<Nats> {
        let client = async_nats::connect(url)
            .await
            .with_context(|| format!("connect to NATS at {url}"))?;
        Ok(Nats {
            url: url.to_owned(),
            js: jetstream::new(client),
        })
    }

    /// A file-storage stream taking `<topic>.<partition>` subjects. NATS
    /// 2.9 has no per-stream sync setting: writes reach the OS at once and
    /// the disk on the server's periodic sync.
    pub async fn create_topic(&self, topic: &str, _partitions: u32, flush: &str) -> Result<()> {
        if !matches!(flush, "" | "file" | "default") {
            bail!("NATS: unsupported durability {flush:?} (only the server's file storage)");
        }
        self.js
            .create_stream(stream::Config {
                name: topic.to_owned(),
                subjects: vec![format!("{topic}.>")],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("create stream {topic}: {e}"))?;
        Ok(())
    }

    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.js
            .delete_stream(topic)
            .await
            .map_err(|e| anyhow!("delete stream {topic}: {e}"))?;
        Ok(())
    }

    /// A sender on a connection of its own.
    pub async fn sender(&self) -> Result<NatsSender> {
        let Nats { js, .. } = Nats::connect(&self.url).await?;
        Ok(NatsSender { js })
    }

    /// One pull consumer (no acks, from the first message) per partition,
    /// merged.
    pub async fn reader(&self, topic: &str, partitions: &[u32]) -> Result<NatsReader> {
        let Nats { js, .. } = Nats::connect(&self.url).await?;
        let stream = js
            .get_stream(topic)
            .await
            .map_err(|e| anyhow!("get stream {topic}: {e}"))?;
        let mut merged = StreamMap::new();
        for &partition in partitions {
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: subject(topic, partition),
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await
                .map_err(|e| anyhow!("create consumer: {e}"))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(1000)
                .messages()
                .await
                .map_err(|e| anyhow!("pull: {e}"))?;
            let values: NatsValues = Box::pin(messages.map(|m| {
                m.map(|m| m.message.payload)
                    .map_err(|e| anyhow!("NATS message: {e}"))
            }));
            merged.insert(partition, values);
        }
        Ok(NatsReader { merged })
    }
}

#[derive(Clone)]
pub struct NatsSender {
    js: jetstream::Context,
}

impl NatsSender {
    /// Publishes every value, then waits for every acknowledgement.
    pub async fn send(&self, topic: &str, partition: u32, values: Vec<Bytes>) -> Result<()> {
        let subject = subject(topic, partition);
        let mut acks = Vec::with_capacity(values.len());
        for value in values {
            acks.push(
                self.js
                    .publish(subject.clone(), value)
                    .await
                    .map_err(|e| anyhow!("publish: {e}"))?,
            );
        }
        for ack in acks {
            ack.await.map_err(|e| anyhow!("publish ack: {e}"))?;
        }
        Ok(())
    }
}

type NatsValues = Pin<Box<dyn Stream<Item = Result<Bytes>> + Send>>;

pub struct NatsReader {
    merged: StreamMap<u32, NatsValues>,
}

impl NatsReader {
    pub async fn next(&mut self) -> Result<Bytes> {
        match self.merged.next().await {
            Some((_, value)) => value,
            None => bail!("NATS: every consumer ended"),
        }
    }
}

/// A Redis server, streams `<topic>:<partition>`.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
}

fn key(topic: &str, partition: u32) -> String {
    format!("{topic}:{partition}")
}

impl Redis {
    pub async fn connect(url: &str) -> Result<Redis> {
        let client = redis::Client::open(url).with_context(|| format!("Redis URL {url}"))?;
        let redis = Redis { client };
        let mut conn = redis.connection().await?;
        redis::cmd("PING")
            .query_async::<()>(&mut conn)
            .await
            .with_context(|| format!("connect to Redis at {url}"))?;
        Ok(redis)
    }

    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        Ok(self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// Streams are created by the first XADD; `flush` is the server's
    /// `appendfsync` (`always`, `everysec` or `no`), set here for the run.
    pub async fn create_topic(&self, topic: &str, partitions: u32, flush: &str) -> Result<()> {
        let mut conn = self.connection().await?;
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(flush)
            .query_async::<()>(&mut conn)
            .await
            .with_context(|| format!("CONFIG SET appendfsync {flush}"))?;
        self.delete_topic(topic, partitions).await
    }

    pub async fn delete_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        let mut conn = self.connection().await?;
        let mut del = redis::cmd("DEL");
        for p in 0..partitions {
            del.arg(key(topic, p));
        }
        del.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub async fn sender(&self) -> Result<RedisSender> {
        Ok(RedisSender {
            conn: self.connection().await?,
        })
    }

    pub async fn reader(&self, topic: &str, partitions: &[u32]) -> Result<RedisReader> {
        Ok(RedisReader {
            conn: self.connection().await?,
            keys: partitions.iter().map(|p| key(topic, *p)).collect(),
            last: vec!["0-0".to_owned(); partitions.len()],
            buffered: VecDeque::new(),
        })
    }
}

#[derive(Clone)]
pub struct RedisSender {
    conn: redis::aio::MultiplexedConnection,
}

impl RedisSender {
    /// One pipeline of XADDs: one round trip per batch.
    pub async fn send(&self, topic: &str, partition: u32, values: Vec<Bytes>) -> Result<()> {
        let key = key(topic, partition);
        let mut pipe = redis::pipe();
        for value in &values {
            pipe.cmd("XADD")
                .arg(&key)
                .arg("*")
                .arg("v")
                .arg(value.as_ref())
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn.clone()).await?;
        Ok(())
    }
}

pub struct RedisReader {
    conn: redis::aio::MultiplexedConnection,
    keys: Vec<String>,
    last: Vec<String>,
    buffered: VecDeque<Bytes>,
}

impl RedisReader {
    pub async fn next(&mut self) -> Result<Bytes> {
        loop {
            if let Some(value) = self.buffered.pop_front() {
                return Ok(value);
            }
            let mut xread = redis::cmd("XREAD");
            xread.arg("COUNT").arg(1000).arg("BLOCK").arg(100);
            xread.arg("STREAMS").arg(&self.keys).arg(&self.last);
            let reply: Option<redis::streams::StreamReadReply> =
                xread.query_async(&mut self.conn).await?;
            let Some(reply) = reply else {
                tokio::time::sleep(Duration::ZERO).await;
                continue;
            };
            for stream in reply.keys {
                let Some(i) = self.keys.iter().position(|k| *k == stream.key) else {
                    continue;
                };
                for entry in stream.ids {
                    match entry.map.get("v") {
                        Some(redis::Value::BulkString(bytes)) => {
                            self.buffered.push_back(Bytes::copy_from_slice(bytes));
                        }
                        other => bail!("Redis entry {} has no value: {other:?}", entry.id),
                    }
                    self.last[i] = entry.id;
                }
            }
        }
    }
}
