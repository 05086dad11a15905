//! The gRPC server's tower layer: requests, errors by status code and
//! latency per method.
//!
//! A call is finished when its response body is: the latency of a
//! streaming call is its whole life, and its status is the one in its
//! trailers (or in the headers of a trailers-only answer, which is how an
//! error returned by a handler goes out). A body dropped before its
//! trailers is a call the client cancelled. Handles are resolved once per
//! known method at start-up; a path outside the served API (reflection, a
//! mistyped method) is counted as `method="other"`, so a client cannot
//! create series.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use prost::Message;
use tonic::Code;

type Labels = Vec<(&'static str, String)>;

/// One method's pre-resolved handles.
#[derive(Debug)]
struct MethodMetrics {
    service: String,
    method: String,
    requests: Counter,
    latency: Histogram,
}

#[derive(Debug)]
pub(crate) struct RpcMetrics {
    methods: HashMap<String, Arc<MethodMetrics>>,
    other: Arc<MethodMetrics>,
    errors: Family<Labels, Counter>,
}

/// `(service, method)` of every method the broker serves: its own API and
/// health.
fn served_methods() -> Vec<(String, String)> {
    let mut methods = Vec::new();
    for set in [
        sluice_proto::v1::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ] {
        let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
            continue;
        };
        for file in set.file {
            let package = file.package();
            for service in &file.service {
                let service_name = format!("{package}.{}", service.name());
                for method in &service.method {
                    methods.push((service_name.clone(), method.name().to_owned()));
                }
            }
        }
    }
    methods
}

impl RpcMetrics {
    pub(crate) fn new(registry: &mut Registry) -> RpcMetrics {
        let requests = Family::<Labels, Counter>::default();
        let latency = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(super::latency_buckets())
        });
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "sluice_rpc_requests",
            "gRPC calls started, by service and method",
            requests.clone(),
        );
        registry.register(
            "sluice_rpc_errors",
            "gRPC calls that ended with a status other than OK, by service, method and code",
            errors.clone(),
        );
        registry.register(
            "sluice_rpc_duration_seconds",
            "gRPC call time, from the request to the end of the response (a stream's whole life)",
            latency.clone(),
        );
        let resolve = |service: String, method: String| {
            let labels = vec![("service", service.clone()), ("method", method.clone())];
            Arc::new(MethodMetrics {
                requests: requests.get_or_create(&labels).clone(),
                latency: latency.get_or_create(&labels).clone(),
                service,
                method,
            })
        };
        let methods = served_methods()
            .into_iter()
            .map(|(service, method)| {
                (
                    format!("/{service}/{method}"),
                    resolve(service.clone(), method.clone()),
                )
            })
            .collect();
        RpcMetrics {
            methods,
            other: resolve("other".into(), "other".into()),
            errors,
        }
    }

    fn start(self: &Arc<Self>, path: &str) -> Call {
        let method = Arc::clone(self.methods.get(path).unwrap_or(&self.other));
        method.requests.inc();
        Call {
            metrics: Arc::clone(self),
            method,
            started: Instant::now(),
            code: None,
        }
    }
}

/// A call in flight.
struct Call {
    metrics: Arc<RpcMetrics>,
    method: Arc<MethodMetrics>,
    started: Instant,
    code: Option<Code>,
}

impl Call {
    fn finish(self) {
        let method = &self.method;
        method.latency.observe(self.started.elapsed().as_secs_f64());
        let code = self.code.unwrap_or(Code::Cancelled);
        if code != Code::Ok {
            let labels = vec![
                ("service", method.service.clone()),
                ("method", method.method.clone()),
                ("code", format!("{code:?}")),
            ];
            self.metrics.errors.get_or_create(&labels).inc();
        }
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// Records every call of the service it wraps; with no metrics it passes
/// calls through untouched.
#[derive(Debug, Clone)]
pub struct RpcLayer {
    metrics: Option<Arc<RpcMetrics>>,
}

impl RpcLayer {
    pub(crate) fn new(metrics: Option<Arc<RpcMetrics>>) -> RpcLayer {
        RpcLayer { metrics }
    }

    /// A layer that records nothing (metrics turned off).
    pub fn disabled() -> RpcLayer {
        RpcLayer { metrics: None }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for RpcService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<RpcBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let call = self
            .metrics
            .as_ref()
            .map(|metrics| metrics.start(request.uri().path()));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let Some(mut call) = call else {
                return response.map(|r| r.map(|inner| RpcBody { inner, call: None }));
            };
            match response {
                Ok(response) => {
                    // A trailers-only answer (a handler's error) carries
                    // its status in the headers.
                    call.code = grpc_status(response.headers());
                    Ok(response.map(|inner| RpcBody {
                        inner,
                        call: Some(call),
                    }))
                }
                Err(e) => {
                    call.code = Some(Code::Internal);
                    call.finish();
                    Err(e)
                }
            }
        })
    }
}

/// A response body that finishes its call's record when it is done.
pub struct RpcBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B> Drop for RpcBody<B> {
    fn drop(&mut self) {
        if let Some(call) = self.call.take() {
            call.finish();
        }
    }
}

impl<B> http_body::Body for RpcBody<B>
where
    B: http_body::Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(trailers) = frame.trailers_ref()
            && let Some(call) = this.call.as_mut()
        {
            call.code = grpc_status(trailers).or(call.code);
        }
        if let Poll::Ready(None) = &polled
            && let Some(call) = this.call.as_mut()
        {
            // Ended without trailers: the status came in the headers or
            // the call was whole (a plain OK).
            call.code.get_or_insert(Code::Ok);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
