//! The Rust client of the Sluice log broker.
//!
//! - [`Producer`]: batches records per partition (by `linger` and
//!   `batch_bytes`), routes them by explicit partition, by key (the broker's
//!   own hash, so both agree) or round-robin, keeps memory bounded
//!   (`buffer_bytes`, with backpressure), pipelines batches per partition
//!   over one ordered stream, and retries through broker restarts.
//! - [`Consumer`]: reads partitions as a `Stream` of records pushed by the
//!   broker, from an offset, a time, the earliest or the latest record, and
//!   resumes where it was after a reconnect.
//! - [`GroupConsumer`]: a consumer in a group coordinated by the broker:
//!   partitions assigned and moved by the broker, committed offsets,
//!   assignment events.
//! - [`Admin`]: topics, offsets, and groups (lag, offset resets).
//!
//! Every handle shares one lazily connected gRPC channel that reconnects on
//! its own when the broker comes back.
//!
//! ```no_run
//! # async fn demo() -> sluice_client::Result<()> {
//! use sluice_client::{Admin, ClientConfig, Producer, ProducerConfig, Record};
//!
//! let config = ClientConfig::new("http://127.0.0.1:7070");
//! Admin::new(&config)?.create_topic("orders", 3).await?;
//! let producer = Producer::new(&config, ProducerConfig::default())?;
//! let position = producer.send("orders", Record::new("created").with_key("customer-1")).await?;
//! println!("partition {} offset {}", position.partition, position.offset);
//! producer.close().await?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod admin;
mod connection;
mod consumer;
mod error;
mod group;
mod producer;
mod record;
pub mod security;

pub use admin::{
    Admin, BrokerSetting, BrokerStatus, DeadLetterStatus, GroupInfo, GroupMember, GroupPartition,
    GroupSummary, LostRange, OffsetChange, PartitionInfo, RedriveOptions, RedriveReport,
    RedriveTarget, ResetTo, TopicInfo, TopicSettings,
};
pub use connection::{ClientConfig, TlsConfig};
pub use consumer::Consumer;
pub use error::{Error, Result};
pub use group::{CommitMode, GroupConfig, GroupConsumer, GroupEvent, OffsetReset, TopicPartition};
pub use producer::{DeliveryFuture, Producer, ProducerConfig};
pub use record::{ConsumedRecord, Header, Position, Record, StartFrom};
pub use sluice_format::Compression;
pub use sluice_proto::partition_for_key;
pub use sluice_proto::trace::{TRACEPARENT, TraceParent};
