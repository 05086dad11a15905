//! The span every gRPC call runs in, so each of its log lines carries the
//! call's request id, peer address, method, principal, topic and trace
//! context.
//!
//! `principal` is declared empty here and recorded by whoever
//! authenticates the call (`tracing::Span::current().record("principal",
//! ..)`); `topic` is recorded by the handler once it has read the request
//! ([`record_topic`]). A W3C `traceparent` in the call's metadata puts its
//! trace id and parent span id on the span, so the broker's lines join the
//! caller's trace; with the `otlp` feature it also becomes the parent of
//! the exported span.

use std::sync::atomic::{AtomicU64, Ordering};

use sluice_proto::trace::{TRACEPARENT, TraceParent};

static NEXT_REQUEST_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn request_span(request: &http::Request<()>) -> tracing::Span {
    let request_id = NEXT_REQUEST_ID.fetch_add(1, Ordering::Relaxed);
    // On a plain or a TLS connection.
    let peer = super::auth::peer_addr(request.extensions());
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
        #[cfg(feature = "otlp")]
        crate::otlp::set_parent(&span, &parent);
    }
    span
}

/// Records the call's topic on its span (a handler calls it once the
/// request is read).
pub(crate) fn record_topic(topic: &str) {
    tracing::Span::current().record("topic", topic);
}

#[cfg(all(test, feature = "otlp"))]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanId, TraceId};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    /// Keeps what it is handed.
    #[derive(Debug, Clone, Default)]
    struct Collected(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Collected {
        fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
            self.0.lock().unwrap().extend(batch);
            std::future::ready(Ok(()))
        }
    }

    fn request(traceparent: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::builder()
            .uri("/sluice.v1.ProduceService/InitProducer")
            .body(())
            .unwrap();
        if let Some(value) = traceparent {
            request
                .headers_mut()
                .insert(TRACEPARENT, value.parse().unwrap());
        }
        request
    }

    #[test]
    fn a_calls_span_is_a_child_of_the_span_its_traceparent_names() {
        let collected = Collected::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(collected.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(crate::otlp::layer(&provider));
        tracing::subscriber::with_default(subscriber, || {
            drop(request_span(&request(Some(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ))));
            drop(request_span(&request(None)));
        });
        provider.force_flush().unwrap();
        let spans = collected.0.lock().unwrap().clone();
        assert_eq!(spans.len(), 2, "{spans:?}");
        let child = &spans[0];
        assert_eq!(child.name, "grpc");
        assert_eq!(
            child.span_context.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            child.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(child.parent_span_is_remote);
        // Without one, a call starts a trace of its own.
        let root = &spans[1];
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_ne!(root.span_context.trace_id(), child.span_context.trace_id());
    }
}
