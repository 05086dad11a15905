//! The span every gRPC call runs in, so each of its log lines carries the
//! call's request id, peer address, method, principal, topic and trace
//! context.
//!
//! `principal` is declared empty here and recorded by whoever
//! authenticates the call (`tracing::Span::current().record("principal",
//! ..)`); `topic` is recorded by the handler once it has read the request
//! ([`record_topic`]). A W3C `traceparent` in the call's metadata puts its
//! trace id and parent span id on the span, so the broker's lines join the
//! caller's trace.

use std::sync::atomic::{AtomicU64, Ordering};

use sluice_proto::trace::{TRACEPARENT, TraceParent};
use tonic::transport::server::TcpConnectInfo;

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn request_span(request: &http::Request<()>) -> tracing::Span {
    let request_id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    let peer = request
        .extensions()
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr);
    let span = tracing::info_span!(
        "grpc",
        request_id,
        peer = peer.map(tracing::field::display),
        path = %request.uri().path(),
        // Recorded by authentication (anonymous until then).
        principal = tracing::field::Empty,
        topic = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    if let Some(parent) = request
        .headers()
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceParent::parse)
    {
        span.record("trace_id", parent.trace_id_hex());
        span.record("parent_span_id", parent.parent_id_hex());
    }
    span
}

/// Records the call's topic on its span (a handler calls it once the
/// request is read).
pub(crate) fn record_topic(topic: &str) {
    tracing::Span::current().record("topic", topic);
}
