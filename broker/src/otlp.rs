//! OTLP span export (cargo feature `otlp`, flag `--otlp-endpoint`): every
//! `tracing` span of the broker (a call's `grpc` span and the handler spans
//! under it) goes to an OpenTelemetry collector over OTLP/gRPC, and a call's
//! `traceparent` makes its `grpc` span a child of the caller's span.
//!
//! It owns the tracer provider and the exporter; the server only asks it
//! to parent a span (`set_parent`). The SDK's batch processor exports
//! from a thread of its own, while tonic's channel needs a tokio reactor:
//! [`OnRuntime`] runs each export on the broker's runtime.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use sluice_proto::trace::TraceParent;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the caller's span named by `parent`. Without
/// the OpenTelemetry layer installed this does nothing.
pub(crate) fn set_parent(span: &tracing::Span, parent: &TraceParent) {
    let remote = SpanContext::new(
        TraceId::from_bytes(parent.trace_id),
        SpanId::from_bytes(parent.parent_id),
        TraceFlags::new(parent.flags),
        true,
        TraceState::default(),
    );
    // Fails only when no OpenTelemetry layer is installed: nothing to do.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
}

/// Runs an exporter's exports on a tokio runtime, whatever thread calls.
#[derive(Debug)]
pub struct OnRuntime<E> {
    inner: E,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let result = match tokio::runtime::Handle::try_current() {
            // On a runtime thread already: blocking it on another of its
            // futures would stall it; the processor never calls from one.
            Ok(_) => Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                "span export called on a runtime thread".into(),
            )),
            Err(_) => self.runtime.block_on(self.inner.export(batch)),
        };
        std::future::ready(result)
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("OTLP exporter for {endpoint}: {source}")]
pub struct OtlpError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// A tracer provider exporting in batches to `endpoint` (an OTLP/gRPC URL
/// such as `http://127.0.0.1:4317`) from `runtime`. Call `shutdown` on it
/// before exiting, to send what is left.
pub fn provider(
    endpoint: &str,
    runtime: tokio::runtime::Handle,
) -> Result<SdkTracerProvider, OtlpError> {
    let exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|source| OtlpError {
                endpoint: endpoint.to_owned(),
                source,
            })?
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime {
            inner: exporter,
            runtime,
        })
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("sluice-broker")
                .build(),
        )
        .build())
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of
/// `provider`.
pub fn layer<S>(
    provider: &SdkTracerProvider,
) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("sluice-broker"))
}
