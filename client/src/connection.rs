//! Where the broker is and how to talk to it.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::{Error, Result};

/// How to reach the broker. Shared by producers, consumers and admins.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `http://host:port` of the broker.
    pub url: String,
    /// Largest gRPC message sent or received; match the broker's
    /// `max_message_bytes` (64 MiB by default).
    pub max_message_bytes: usize,
    /// How long to wait for a connection to the broker.
    pub connect_timeout: Duration,
    /// Deadline of unary calls (admin, fetch).
    pub request_timeout: Duration,
}

impl ClientConfig {
    /// Settings for the broker at `url` (`http://host:port`), defaults otherwise.
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            max_message_bytes: 64 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        }
    }

    /// A channel that connects on first use and reconnects by itself after
    /// the broker restarts.
    pub(crate) fn channel(&self) -> Result<Channel> {
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| Error::InvalidUrl {
            url: self.url.clone(),
            reason: e.to_string(),
        })?;
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .connect_lazy())
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig::new("http://127.0.0.1:7070")
    }
}

/// A request that gives up after `timeout`.
pub(crate) fn with_timeout<T>(message: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(timeout);
    request
}
