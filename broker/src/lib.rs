//! Sluice broker: a persistent log broker.
//!
//! Data flows one way: the front doors, [`server`] (gRPC) and [`kafka`]
//! (Kafka's wire protocol), → [`state`] (operations that span layers) →
//! ([`auth`], [`producers`], [`groups`], [`dlq`]) → [`topics`] → [`storage`].
//! Each module's doc says what it owns.
//! [`metrics`] stands beside [`server`]: the server records into it, and
//! its collectors read the layers below at scrape time.

pub mod auth;
pub mod check;
pub mod config;
pub mod dlq;
pub mod groups;
pub mod kafka;
pub mod metrics;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod producers;
pub mod server;
pub mod state;
pub mod storage;
pub mod topics;

/// The git commit the broker was built from ("unknown" outside a checkout).
pub const GIT_COMMIT: &str = env!("SLUICE_GIT_COMMIT");
