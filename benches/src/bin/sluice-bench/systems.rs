//! The systems under load, behind one interface: create and delete a
//! topic of N partitions with a durability setting, send a batch of values
//! to a partition and wait for the acknowledgement, and read partitions
//! from the start as one stream of values. Sluice goes through
//! `sluice-client`; the peers (NATS JetStream, Redis Streams, with the
//! `peers` feature) through their usual Rust clients, in `peers.rs`.

use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use sluice_client::Compression;
use sluice_client::{
    Admin, ClientConfig, Consumer, Producer, ProducerConfig, Record, StartFrom, TopicSettings,
};
use tokio_stream::StreamExt as _;

#[cfg(feature = "peers")]
use crate::peers;

/// How Sluice records are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Api {
    /// `Producer::send_batch`: one call per pre-built batch.
    Batch,
    /// `Producer::enqueue` per record (the batching producer's own path).
    Record,
}

/// A connection to a system, from which producers and readers are made.
#[derive(Clone)]
pub enum System {
    Sluice {
        config: ClientConfig,
        api: Api,
        linger: Duration,
        /// The producers' batch codec.
        compression: Compression,
    },
    #[cfg(feature = "peers")]
    Nats(peers::Nats),
    #[cfg(feature = "peers")]
    Redis(peers::Redis),
}

/// Sluice's TLS and token, when the broker asks for them.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub token: Option<String>,
    pub tls_ca: Option<std::path::PathBuf>,
}

impl Credentials {
    fn apply(self, mut config: ClientConfig) -> Result<ClientConfig> {
        if let Some(ca) = self.tls_ca {
            config = config.with_tls(sluice_client::TlsConfig::default().with_ca_file(ca)?);
        }
        if let Some(token) = self.token {
            config = config.with_token(token);
        }
        Ok(config)
    }
}

impl System {
    /// Connects to `system` at `url`; Sluice's producers compress their
    /// batches with `compression`.
    pub async fn connect(
        system: &str,
        url: &str,
        api: Api,
        linger: Duration,
        compression: Compression,
        credentials: Credentials,
    ) -> Result<System> {
        match system {
            "sluice" => Ok(System::Sluice {
                config: credentials.apply(ClientConfig::new(url))?,
                api,
                linger,
                compression,
            }),
            #[cfg(feature = "peers")]
            "nats" => Ok(System::Nats(peers::Nats::connect(url).await?)),
            #[cfg(feature = "peers")]
            "redis" => Ok(System::Redis(peers::Redis::connect(url).await?)),
            #[cfg(not(feature = "peers"))]
            "nats" | "redis" => {
                bail!("{system}: this sluice-bench was built without the `peers` feature")
            }
            other => bail!("unknown system {other:?}"),
        }
    }

    /// A fresh topic of `partitions` partitions; `flush` is the system's
    /// own durability setting (Sluice: the topic's flush policy; Redis:
    /// `appendfsync`; NATS: file storage, nothing to set).
    pub async fn create_topic(&self, topic: &str, partitions: u32, flush: &str) -> Result<()> {
        match self {
            System::Sluice { config, .. } => {
                Admin::new(config)?
                    .create_topic_with(
                        topic,
                        TopicSettings {
                            partitions: Some(partitions),
                            flush: Some(flush.to_owned()),
                            ..TopicSettings::default()
                        },
                    )
                    .await
                    .with_context(|| format!("create topic {topic}"))?;
                Ok(())
            }
            #[cfg(feature = "peers")]
            System::Nats(nats) => nats.create_topic(topic, partitions, flush).await,
            #[cfg(feature = "peers")]
            System::Redis(redis) => redis.create_topic(topic, partitions, flush).await,
        }
    }

    /// Deletes the topic and its data.
    pub async fn delete_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        match self {
            System::Sluice { config, .. } => {
                let _ = partitions; // Sluice deletes by name
                Admin::new(config)?.delete_topic(topic).await?;
                Ok(())
            }
            #[cfg(feature = "peers")]
            System::Nats(nats) => nats.delete_topic(topic).await,
            #[cfg(feature = "peers")]
            System::Redis(redis) => redis.delete_topic(topic, partitions).await,
        }
    }

    /// A sender with its own connection.
    pub async fn sender(&self) -> Result<Sender> {
        match self {
            System::Sluice {
                config,
                api,
                linger,
                compression,
            } => {
                let producer = Producer::new(
                    config,
                    ProducerConfig {
                        linger: *linger,
                        compression: *compression,
                        ..ProducerConfig::default()
                    },
                )?;
                Ok(Sender::Sluice(producer, *api))
            }
            #[cfg(feature = "peers")]
            System::Nats(nats) => Ok(Sender::Nats(nats.sender().await?)),
            #[cfg(feature = "peers")]
            System::Redis(redis) => Ok(Sender::Redis(redis.sender().await?)),
        }
    }

    /// Reads `partitions` of `topic` from their first record.
    pub async fn reader(&self, topic: &str, partitions: &[u32]) -> Result<Reader> {
        match self {
            System::Sluice { config, .. } => {
                let mut consumer = Consumer::new(config)?;
                consumer
                    .assign(topic, partitions, StartFrom::Earliest)
                    .await?;
                Ok(Reader::Sluice(Box::new(consumer)))
            }
            #[cfg(feature = "peers")]
            System::Nats(nats) => Ok(Reader::Nats(nats.reader(topic, partitions).await?)),
            #[cfg(feature = "peers")]
            System::Redis(redis) => Ok(Reader::Redis(redis.reader(topic, partitions).await?)),
        }
    }
}

/// Sends batches to one system over its own connection.
#[derive(Clone)]
pub enum Sender {
    Sluice(Producer, Api),
    #[cfg(feature = "peers")]
    Nats(peers::NatsSender),
    #[cfg(feature = "peers")]
    Redis(peers::RedisSender),
}

impl Sender {
    /// Sends `values` to `partition` and waits until all are acknowledged.
    pub async fn send(&self, topic: &str, partition: u32, values: Vec<Bytes>) -> Result<()> {
        match self {
            Sender::Sluice(producer, Api::Batch) => {
                let records = values.into_iter().map(Record::new).collect();
                producer.send_batch(topic, partition, records).await?;
            }
            Sender::Sluice(producer, Api::Record) => {
                let mut deliveries = Vec::with_capacity(values.len());
                for value in values {
                    let record = Record::new(value).with_partition(partition);
                    deliveries.push(producer.enqueue(topic, record).await?);
                }
                for delivery in deliveries {
                    delivery.await?;
                }
            }
            #[cfg(feature = "peers")]
            Sender::Nats(nats) => nats.send(topic, partition, values).await?,
            #[cfg(feature = "peers")]
            Sender::Redis(redis) => redis.send(topic, partition, values).await?,
        }
        Ok(())
    }

    /// Lets go of the connection cleanly.
    pub async fn close(self) -> Result<()> {
        match self {
            Sender::Sluice(producer, _) => producer.close().await?,
            #[cfg(feature = "peers")]
            Sender::Nats(_) | Sender::Redis(_) => {}
        }
        Ok(())
    }
}

/// Values of some partitions, in each partition's order.
pub enum Reader {
    Sluice(Box<Consumer>),
    #[cfg(feature = "peers")]
    Nats(peers::NatsReader),
    #[cfg(feature = "peers")]
    Redis(peers::RedisReader),
}

impl Reader {
    /// The next value, waiting for one if need be.
    pub async fn next(&mut self) -> Result<Bytes> {
        match self {
            Reader::Sluice(consumer) => match consumer.next().await {
                Some(record) => Ok(record?.value),
                None => bail!("the consumer has no partitions"),
            },
            #[cfg(feature = "peers")]
            Reader::Nats(nats) => nats.next().await,
            #[cfg(feature = "peers")]
            Reader::Redis(redis) => redis.next().await,
        }
    }
}
