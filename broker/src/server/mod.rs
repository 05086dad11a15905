//! The gRPC front of the broker.
//!
//! This module owns the tonic services of `sluice.v1` plus health and
//! reflection: it validates requests at the edge, calls [`crate::topics`]
//! (and through it producers and storage), and maps every error to a
//! `Status` with the right code and a message that names the problem.
//! Storage calls block (syncs, page faults), so they run on tokio's blocking
//! pool, never on a runtime worker.
//!
//! Every call runs in the span `request_span` makes (request id, peer,
//! method, `principal` for authentication to record, topic, trace
//! context), and through [`crate::metrics::RpcLayer`] when metrics are on;
//! [`Observability`] brings the metrics handles and what `BrokerStatus`
//! reports.
//!
//! Shutdown: when the future given to [`serve`] completes, the server stops
//! accepting, subscriptions and produce streams end (a subscription gets
//! `UNAVAILABLE`), and in-flight unary calls finish; [`serve`] then returns,
//! bounded by [`ServerSettings::shutdown_timeout`]. Closing the topics
//! (flush and sync) is the caller's last step.

mod admin;
pub mod auth;
mod consume;
mod convert;
mod dlq;
mod groups;
mod produce;
mod request_span;
mod security;
mod shared;
mod status;
pub mod tls;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use sluice_proto::transport;
use sluice_proto::v1::acl_service_server::AclServiceServer;
use sluice_proto::v1::admin_service_server::AdminServiceServer;
use sluice_proto::v1::consume_service_server::ConsumeServiceServer;
use sluice_proto::v1::dead_letter_service_server::DeadLetterServiceServer;
use sluice_proto::v1::group_service_server::GroupServiceServer;
use sluice_proto::v1::produce_service_server::ProduceServiceServer;
use sluice_proto::v1::user_service_server::UserServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::{Stream, StreamExt};
use tonic::Status;

use crate::auth::Authorizer;
use crate::dlq::RetrySets;
use crate::groups::GroupCoordinator;
use crate::metrics::{Metrics, RpcLayer};
use crate::topics::TopicRegistry;

pub use admin::BrokerInfo;

/// What the server reports about itself: metrics (`None` when they are
/// off) and what `BrokerStatus` answers.
#[derive(Debug, Clone)]
pub struct Observability {
    pub metrics: Option<Arc<Metrics>>,
    pub status: BrokerInfo,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// Largest gRPC message accepted or sent (tonic's default is 4 MiB).
    pub max_message_bytes: usize,
    /// How long shutdown waits for open calls before giving up on them.
    pub shutdown_timeout: Duration,
    /// How often retention runs and producer state is snapshotted.
    pub maintenance_interval: Duration,
    /// How long the offsets of a group with no members are kept after it
    /// became empty (or the broker started) and after its last commit.
    pub group_offset_retention: Duration,
    /// How long a retry handed to a member may go without an ack or nack
    /// before that delivery counts as failed.
    pub redelivery_timeout: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            max_message_bytes: 64 * 1024 * 1024,
            shutdown_timeout: Duration::from_secs(10),
            maintenance_interval: Duration::from_secs(30),
            group_offset_retention: Duration::from_secs(7 * 24 * 3600),
            redelivery_timeout: dlq::REDELIVERY_TIMEOUT,
        }
    }
}

/// Who may call, and over what.
#[derive(Debug, Clone)]
pub struct Security {
    /// Users, tokens and rules; with authentication off every caller is
    /// the anonymous superuser.
    pub auth: Arc<Authorizer>,
    /// TLS on the listener, if any.
    pub tls: Option<Arc<tls::ReloadingTls>>,
    /// How often the TLS files are checked for a change (SIGHUP reloads
    /// them at once).
    pub tls_poll: Duration,
    /// Whether reflection is served, and to whom.
    pub reflection: auth::Reflection,
}

impl Default for Security {
    /// No TLS, no authentication, public reflection: the broker as it was
    /// before issue 14, for tests that embed it.
    fn default() -> Self {
        Security {
            auth: Arc::new(Authorizer::disabled()),
            tls: None,
            tls_poll: Duration::from_secs(2),
            reflection: auth::Reflection::Public,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Runs `f` on the blocking pool: for calls that create, sync or read
/// files.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f).await.map_err(status::join)?
}

pub use dlq::finish_pending_dead_letters;

pub use crate::state::BrokerState;

/// Serves the broker's API on `listener` until `shutdown` completes.
pub async fn serve(
    state: BrokerState,
    listener: TcpListener,
    observability: Observability,
    settings: ServerSettings,
    security: Security,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let BrokerState {
        topics,
        groups,
        retries,
    } = state;
    let (stop, stopping) = watch::channel(false);
    let limit = settings.max_message_bytes;
    let access = auth::Access::new(Arc::clone(&security.auth));
    let metrics = observability.metrics;
    let rpc_metrics = metrics
        .as_ref()
        .map_or_else(RpcLayer::disabled, |m| m.rpc_layer());
    let admin = AdminServiceServer::new(admin::Admin {
        access: access.clone(),
        topics: Arc::clone(&topics),
        groups: Arc::clone(&groups),
        retries: Arc::clone(&retries),
        info: observability.status,
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let produce = ProduceServiceServer::new(produce::Produce {
        access: access.clone(),
        topics: Arc::clone(&topics),
        shutdown: stopping.clone(),
        metrics: metrics.as_ref().map(|m| m.produce.clone()),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let consume = ConsumeServiceServer::new(consume::Consume {
        access: access.clone(),
        topics: Arc::clone(&topics),
        shutdown: stopping.clone(),
        max_message_bytes: limit,
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    let group = GroupServiceServer::new(groups::Groups {
        access: access.clone(),
        topics: Arc::clone(&topics),
        groups: Arc::clone(&groups),
        retries: Arc::clone(&retries),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);
    let dead_letters = DeadLetterServiceServer::new(dlq::DeadLetters {
        access: access.clone(),
        topics: Arc::clone(&topics),
        groups: Arc::clone(&groups),
        retries: Arc::clone(&retries),
        redelivery_timeout: settings.redelivery_timeout,
        metrics: metrics.as_ref().map(|m| m.dlq.clone()),
    })
    .max_decoding_message_size(limit)
    .max_encoding_message_size(limit);

    let users = UserServiceServer::new(security::Users {
        access: access.clone(),
    });
    let acls = AclServiceServer::new(security::Acls { access });

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<AdminServiceServer<admin::Admin>>()
        .await;
    health
        .set_serving::<ProduceServiceServer<produce::Produce>>()
        .await;
    health
        .set_serving::<ConsumeServiceServer<consume::Consume>>()
        .await;
    health
        .set_serving::<GroupServiceServer<groups::Groups>>()
        .await;
    health
        .set_serving::<DeadLetterServiceServer<dlq::DeadLetters>>()
        .await;
    health
        .set_serving::<UserServiceServer<security::Users>>()
        .await;
    health
        .set_serving::<AclServiceServer<security::Acls>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(sluice_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let maintenance = tokio::spawn(maintain(
        Arc::clone(&topics),
        Arc::clone(&groups),
        retries,
        settings.clone(),
        stopping.clone(),
    ));
    let mut stopped = stopping.clone();
    let serve_until = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let serve_reflection = security.reflection != auth::Reflection::Off;
    let router = tonic::transport::Server::builder()
        .initial_stream_window_size(transport::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(transport::CONNECTION_WINDOW_BYTES)
        .max_frame_size(transport::MAX_FRAME_BYTES)
        .trace_fn(request_span::request_span)
        .layer(rpc_metrics)
        .layer(tower::util::MapResponseLayer::new(
            status::remap_message_limit,
        ))
        .layer(auth::AuthLayer::new(
            Arc::clone(&security.auth),
            security.reflection,
        ))
        .add_service(health_service)
        .add_optional_service(serve_reflection.then_some(reflection_v1))
        .add_optional_service(serve_reflection.then_some(reflection_v1alpha))
        .add_service(admin)
        .add_service(produce)
        .add_service(consume)
        .add_service(group)
        .add_service(dead_letters)
        .add_service(users)
        .add_service(acls);
    let server = match &security.tls {
        Some(tls) => {
            let (plaintext, plaintext_connections) = tokio::sync::mpsc::channel(16);
            tokio::spawn(tls::refuse_plaintext(
                plaintext_connections,
                stopping.clone(),
            ));
            tokio::spawn(tls::watch_files(
                Arc::clone(tls),
                security.tls_poll,
                stopping.clone(),
            ));
            let incoming = tls::incoming(listener, Arc::clone(tls), plaintext);
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, serve_until))
        }
        None => {
            // Without TCP_NODELAY a small response (a produce
            // acknowledgement) written behind an unacknowledged segment
            // waits for the client's delayed ACK: 20-40 ms added to
            // acknowledgements and pushes under a paced load (found by
            // sluice-bench).
            let incoming = TcpListenerStream::new(listener).map(|accepted| {
                let stream = accepted?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(stream)
            });
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, serve_until))
        }
    };
    let mut server = server;
    tokio::select! {
        result = &mut server => {
            let _ = stop.send(true);
            maintenance.abort();
            return result.unwrap_or(Ok(())).map_err(ServeError::from);
        }
        () = shutdown => {}
    }
    tracing::info!("shutting down: no new calls; ending subscriptions and streams");
    health
        .set_not_serving::<AdminServiceServer<admin::Admin>>()
        .await;
    health
        .set_not_serving::<ProduceServiceServer<produce::Produce>>()
        .await;
    health
        .set_not_serving::<ConsumeServiceServer<consume::Consume>>()
        .await;
    health
        .set_not_serving::<GroupServiceServer<groups::Groups>>()
        .await;
    health
        .set_not_serving::<DeadLetterServiceServer<dlq::DeadLetters>>()
        .await;
    health
        .set_not_serving::<UserServiceServer<security::Users>>()
        .await;
    health
        .set_not_serving::<AclServiceServer<security::Acls>>()
        .await;
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    let _ = stop.send(true);
    maintenance.abort();
    match tokio::time::timeout(settings.shutdown_timeout, &mut server).await {
        Ok(result) => result.unwrap_or(Ok(())).map_err(ServeError::from),
        Err(_) => {
            tracing::warn!(timeout = ?settings.shutdown_timeout, "calls still open at the shutdown deadline; dropping them");
            server.abort();
            Ok(())
        }
    }
}

/// Runs retention, producer-state snapshots, group offset expiry and
/// another try of undeliverable dead letters every maintenance interval,
/// and removes group members whose session timed out
/// every second (heartbeats do that too, but a group whose members all died
/// sends none).
async fn maintain(
    topics: Arc<TopicRegistry>,
    groups: Arc<GroupCoordinator>,
    retries: Arc<RetrySets>,
    settings: ServerSettings,
    mut stopping: watch::Receiver<bool>,
) {
    let mut ticks = tokio::time::interval(settings.maintenance_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut sessions = tokio::time::interval(Duration::from_secs(1));
    sessions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sessions.tick() => {
                groups.expire_sessions(std::time::Instant::now());
                continue;
            }
            _ = ticks.tick() => {}
            _ = stopping.wait_for(|stop| *stop) => return,
        }
        let topics = Arc::clone(&topics);
        let groups = Arc::clone(&groups);
        let retries = Arc::clone(&retries);
        let retention = settings.group_offset_retention;
        let _ = tokio::task::spawn_blocking(move || {
            let now_ms = convert::now_ms();
            topics.maintain(now_ms);
            if let Err(e) = groups.expire_offsets(std::time::Instant::now(), now_ms, retention) {
                tracing::warn!(error = %e, "expiring group offsets failed");
            }
            dlq::retry_undeliverable_dead_letters(&topics, &retries);
        })
        .await;
    }
}

/// A response stream that ends early, with the status `end` resolves to,
/// when `end` completes first (shutdown, a deleted topic), even if the
/// inner stream still has messages queued for a slow reader. It also ends
/// after the inner stream's first error.
pub(crate) struct EndsWith<S> {
    inner: S,
    end: Pin<Box<dyn Future<Output = Status> + Send>>,
    done: bool,
}

impl<S> EndsWith<S> {
    pub(crate) fn new(inner: S, end: impl Future<Output = Status> + Send + 'static) -> Self {
        EndsWith {
            inner,
            end: Box::pin(end),
            done: false,
        }
    }
}

impl<S, T> Stream for EndsWith<S>
where
    S: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(status) = self.end.as_mut().poll(cx) {
            self.done = true;
            return Poll::Ready(Some(Err(status)));
        }
        let next = Pin::new(&mut self.inner).poll_next(cx);
        if matches!(next, Poll::Ready(Some(Err(_)) | None)) {
            self.done = true;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use tokio_stream::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_stream_ends_with_the_status_when_its_end_comes_first() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<u32, Status>>(4);
        let (stop, stopped) = watch::channel(false);
        let mut stream = EndsWith::new(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            async move {
                let mut stopped = stopped;
                let _ = stopped.wait_for(|s| *s).await;
                Status::unavailable("stopping")
            },
        );
        tx.send(Ok(1)).await.unwrap();
        assert_eq!(stream.next().await.unwrap().unwrap(), 1);
        // Queued but never delivered: the end wins.
        tx.send(Ok(2)).await.unwrap();
        stop.send(true).unwrap();
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(stream.next().await.is_none());
    }
}
