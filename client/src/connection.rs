//! Where the broker is and how to talk to it.

use std::path::Path;
use std::task::{Context, Poll};
use std::time::Duration;

use sluice_proto::transport;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::error::{Error, Result};

/// TLS to the broker: whom to trust and, for mutual TLS, who we are.
#[derive(Clone, Default)]
pub struct TlsConfig {
    /// PEM CA certificates the broker's certificate must chain to.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate chain and private key, for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name the broker's certificate must carry, when it is not the
    /// URL's host.
    pub domain: Option<String>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca", &self.ca_pem.is_some())
            .field("client_identity", &self.identity_pem.is_some())
            .field("domain", &self.domain)
            .finish()
    }
}

impl TlsConfig {
    /// Trust the CA certificates in the PEM file at `path`.
    pub fn with_ca_file(mut self, path: impl AsRef<Path>) -> Result<Self> {
        self.ca_pem = Some(read_pem(path.as_ref())?);
        Ok(self)
    }

    /// Present the certificate and key in these PEM files (mutual TLS).
    pub fn with_identity_files(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        self.identity_pem = Some((read_pem(cert.as_ref())?, read_pem(key.as_ref())?));
        Ok(self)
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::InvalidConfig(format!("{}: {e}", path.display())))
}

/// How to reach the broker. Shared by producers, consumers and admins.
#[derive(Clone)]
pub struct ClientConfig {
    /// `http://host:port` of the broker (`https://` with TLS).
    pub url: String,
    /// Largest gRPC message sent or received; match the broker's
    /// `max_message_bytes` (64 MiB by default).
    pub max_message_bytes: usize,
    /// How long to wait for a connection to the broker.
    pub connect_timeout: Duration,
    /// Deadline of unary calls (admin, fetch).
    pub request_timeout: Duration,
    /// TLS to the broker; `None` speaks plaintext.
    pub tls: Option<TlsConfig>,
    /// Bearer token sent with every call (`authorization: Bearer ...`).
    pub token: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    /// Never prints the token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl ClientConfig {
    /// Settings for the broker at `url` (`http://host:port`), defaults otherwise.
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            max_message_bytes: 64 * 1024 * 1024,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            tls: None,
            token: None,
        }
    }

    /// With TLS (the URL's `http://` becomes `https://`).
    pub fn with_tls(mut self, tls: TlsConfig) -> Self {
        if let Some(rest) = self.url.strip_prefix("http://") {
            self.url = format!("https://{rest}");
        }
        self.tls = Some(tls);
        self
    }

    /// With a bearer token on every call.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A channel that connects on first use and reconnects by itself after
    /// the broker restarts.
    pub(crate) fn channel(&self) -> Result<Channel> {
        let endpoint = Endpoint::from_shared(self.url.clone()).map_err(|e| Error::InvalidUrl {
            url: self.url.clone(),
            reason: e.to_string(),
        })?;
        let endpoint = match &self.tls {
            None => endpoint,
            Some(tls) => {
                let mut config = ClientTlsConfig::new();
                if let Some(ca) = &tls.ca_pem {
                    config = config.ca_certificate(Certificate::from_pem(ca));
                }
                if let Some((cert, key)) = &tls.identity_pem {
                    config = config.identity(Identity::from_pem(cert, key));
                }
                if let Some(domain) = &tls.domain {
                    config = config.domain_name(domain.clone());
                }
                endpoint.tls_config(config).map_err(|e| Error::InvalidUrl {
                    url: self.url.clone(),
                    reason: format!("TLS settings: {e}"),
                })?
            }
        };
        let authorization = match &self.token {
            None => None,
            Some(token) => Some(
                http::HeaderValue::try_from(format!("Bearer {token}"))
                    .map_err(|_| Error::InvalidConfig("the token is not valid metadata".into()))
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })?,
            ),
        };
        Ok(Channel {
            inner: endpoint
                .connect_timeout(self.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(20))
                .initial_stream_window_size(transport::STREAM_WINDOW_BYTES)
                .initial_connection_window_size(transport::CONNECTION_WINDOW_BYTES)
                .max_frame_size(transport::MAX_FRAME_BYTES)
                .connect_lazy(),
            authorization,
        })
    }
}

/// A connection to the broker that sends the configured token with every
/// call.
#[derive(Debug, Clone)]
pub(crate) struct Channel {
    inner: tonic::transport::Channel,
    authorization: Option<http::HeaderValue>,
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<tonic::body::Body>) -> Self::Future {
        if let Some(value) = &self.authorization {
            request
                .headers_mut()
                .insert(http::header::AUTHORIZATION, value.clone());
        }
        self.inner.call(request)
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
