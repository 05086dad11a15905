//! TLS on the gRPC listener, with certificates that can be replaced while
//! the broker serves.
//!
//! tonic's own `ServerTlsConfig` fixes the certificate at start, so the
//! listener accepts TLS itself with tokio-rustls (the rustls tonic's
//! `tls-ring` feature uses) and hands tonic the finished `TlsStream`s;
//! tonic still records the peer's verified certificate chain, which
//! [`super::auth`] turns into a principal. Every new connection takes the
//! configuration current at its accept; [`ReloadingTls::reload`] swaps it
//! (on SIGHUP, or when a file changes) and open connections keep the one
//! they were made with.
//!
//! A client that speaks HTTP/2 in the clear to this port (a plaintext
//! client, a missing `https://`) is answered in the clear, with an
//! `UNAVAILABLE` status that says the port needs TLS, instead of a reset
//! connection it cannot explain.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::server::TlsStream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

/// Where the listener's certificate, key and (for mutual TLS) client CA
/// are, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Verify client certificates against these CAs.
    pub client_ca: Option<PathBuf>,
    /// With a client CA: also accept clients with no certificate (they
    /// must then present a token).
    pub client_auth_optional: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The modification time and length of each file, to notice a change.
type Stamps = Vec<Option<(SystemTime, u64)>>;

/// The listener's TLS configuration, replaceable while serving.
#[derive(Debug)]
pub struct ReloadingTls {
    settings: TlsSettings,
    current: RwLock<Arc<rustls::ServerConfig>>,
    stamps: Mutex<Stamps>,
}

impl ReloadingTls {
    /// Loads the files; an error names the file and what is wrong with it.
    pub fn load(settings: TlsSettings) -> Result<ReloadingTls, TlsError> {
        let stamps = stamps(&settings);
        let config = build_config(&settings)?;
        Ok(ReloadingTls {
            settings,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
        })
    }

    fn current(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.current.read())
    }

    /// Loads the files again and, if they make a valid configuration, uses
    /// it for new connections. On an error the previous one stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        *self.stamps.lock() = stamps(&self.settings);
        let config = build_config(&self.settings)?;
        *self.current.write() = Arc::new(config);
        Ok(())
    }

    /// Whether a file changed since the last load.
    fn files_changed(&self) -> bool {
        *self.stamps.lock() != stamps(&self.settings)
    }
}

fn stamps(settings: &TlsSettings) -> Stamps {
    [
        Some(&settings.cert),
        Some(&settings.key),
        settings.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    })
    .collect()
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn build_config(settings: &TlsSettings) -> Result<rustls::ServerConfig, TlsError> {
    let certs = read_certs(&settings.cert)?;
    let key = PrivateKeyDer::from_pem_file(&settings.key)
        .map_err(|e| file_error(&settings.key, format!("no usable PEM private key: {e}")))?;
    let provider = Arc::new(broker_crypto());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs(ca)? {
                roots.add(cert).map_err(|e| file_error(ca, e))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if settings.client_auth_optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| file_error(ca, format!("not a usable client CA: {e}")))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        file_error(
            &settings.cert,
            format!("certificate and key do not fit: {e}"),
        )
    })?;
    // gRPC runs over HTTP/2 only; grpc-core clients insist on ALPN.
    config.alpn_protocols = vec![b"h2".to_vec()];
    // Our order, not the client's: most clients put AES-256 first.
    config.ignore_client_order = true;
    Ok(config)
}

/// ring's suites, AES-128-GCM first. Bulk encryption is nearly all of
/// TLS's cost at a broker's rates, AES-128 does 10 rounds to AES-256's 14,
/// and 128-bit keys are what TLS 1.3's mandatory suite uses.
fn broker_crypto() -> rustls::crypto::CryptoProvider {
    use rustls::CipherSuite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        !matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256
        )
    });
    provider
}

/// How long a connection may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The first byte of a TLS record carrying a handshake (a ClientHello).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Accepts connections on `listener` and completes their TLS handshakes
/// (concurrently, each bounded by a timeout), yielding the ready
/// streams; connections that open in the clear go to `plaintext`.
pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    plaintext: mpsc::Sender<TcpStream>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (ready, stream) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (socket, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = ready.closed() => return,
            };
            // See the note on TCP_NODELAY in `serve`.
            let _ = socket.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            let ready = ready.clone();
            let plaintext = plaintext.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(socket, acceptor)).await {
                    Ok(Ok(Handshake::Tls(stream))) => {
                        let _ = ready.send(Ok(*stream)).await;
                    }
                    Ok(Ok(Handshake::Plaintext(socket))) => {
                        tracing::warn!(%peer, "a client connected in plaintext to the TLS listener; telling it to use TLS");
                        let _ = plaintext.send(socket).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(stream)
}

enum Handshake {
    Tls(Box<TlsStream<TcpStream>>),
    Plaintext(TcpStream),
}

async fn handshake(
    socket: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
) -> io::Result<Handshake> {
    let mut first = [0u8; 1];
    if socket.peek(&mut first).await? == 1 && first[0] != TLS_HANDSHAKE_RECORD {
        return Ok(Handshake::Plaintext(socket));
    }
    Ok(Handshake::Tls(Box::new(acceptor.accept(socket).await?)))
}

/// Reloads the TLS files on SIGHUP, and when one of them changes (checked
/// every `poll`), until `stopping`.
pub(crate) async fn watch_files(
    tls: Arc<ReloadingTls>,
    poll: Duration,
    mut stopping: watch::Receiver<bool>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; TLS files reload only when they change");
            None
        }
    };
    let mut ticks = tokio::time::interval(poll);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let why = tokio::select! {
            _ = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
            _ = ticks.tick() => {
                if !tls.files_changed() {
                    continue;
                }
                "a file changed"
            }
            _ = stopping.wait_for(|stop| *stop) => return,
        };
        match tls.reload() {
            Ok(()) => {
                tracing::info!(reason = why, cert = %tls.settings.cert.display(), "TLS certificate reloaded; new connections use it")
            }
            Err(e) => {
                tracing::error!(reason = why, error = %e, "TLS reload failed; keeping the previous certificate")
            }
        }
    }
}

/// Answers every call on a plaintext connection to the TLS port.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RefusePlaintext;

/// What a plaintext client is told.
pub(crate) const PLAINTEXT_REFUSED: &str = "this broker port requires TLS and the client \
    connected in plaintext: connect with https:// and the broker's CA (Rust: \
    ClientConfig::tls; CLI: --tls-ca; Python: grpc.secure_channel)";

impl<B> tower::Service<http::Request<B>> for RefusePlaintext {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _request: http::Request<B>) -> Self::Future {
        std::future::ready(Ok(tonic::Status::unavailable(PLAINTEXT_REFUSED).into_http()))
    }
}

/// Serves [`RefusePlaintext`] on the connections `incoming` yields, until
/// `stopping`.
pub(crate) async fn refuse_plaintext(
    incoming: mpsc::Receiver<TcpStream>,
    mut stopping: watch::Receiver<bool>,
) {
    let served = tonic::transport::Server::builder()
        .layer(tower::layer::layer_fn(|_| RefusePlaintext))
        .add_routes(tonic::service::Routes::default())
        .serve_with_incoming_shutdown(
            ReceiverStream::new(incoming).map(Ok::<_, io::Error>),
            async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            },
        )
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "the plaintext refusal listener stopped");
    }
}
