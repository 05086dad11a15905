//! Sluice broker: a persistent log broker.
//!
//! Data flows one way: [`server`] → ([`auth`], [`producers`], [`groups`], [`dlq`]) →
//! [`topics`] → [`storage`]. Each module's doc says what it owns.

pub mod auth;
pub mod check;
pub mod config;
pub mod dlq;
pub mod groups;
pub mod producers;
pub mod server;
pub mod storage;
pub mod topics;
