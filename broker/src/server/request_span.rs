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

use tonic::transport::server::TcpConnectInfo;

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

/// A parsed W3C `traceparent`: `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TraceParent<'a> {
    pub(crate) trace_id: &'a str,
    pub(crate) parent_id: &'a str,
    pub(crate) sampled: bool,
}

/// Parses a `traceparent` value; `None` for anything the W3C Trace Context
/// spec says to ignore (a bad length, non-hex, all-zero ids, version ff).
pub(crate) fn parse_traceparent(value: &str) -> Option<TraceParent<'_>> {
    let mut parts = value.trim().split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    // Version 00 has exactly four parts; later versions may add more.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(parent_id, 16) || !hex(flags, 2) {
        return None;
    }
    if trace_id.bytes().all(|b| b == b'0') || parent_id.bytes().all(|b| b == b'0') {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    Some(TraceParent {
        trace_id,
        parent_id,
        sampled: flags & 1 == 1,
    })
}

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
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
    {
        span.record("trace_id", parent.trace_id);
        span.record("parent_span_id", parent.parent_id);
    }
    span
}

/// Records the call's topic on its span (a handler calls it once the
/// request is read).
pub(crate) fn record_topic(topic: &str) {
    tracing::Span::current().record("topic", topic);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_or_ignored_as_the_spec_says() {
        let parent =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(parent.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(parent.parent_id, "00f067aa0ba902b7");
        assert!(parent.sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }
}
