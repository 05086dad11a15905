//! Authentication at the gRPC door, and the per-call checks handlers make.
//!
//! `AuthLayer` wraps every service: it reads `authorization: Bearer
//! <token>` (or, without one, the TLS client certificate the listener
//! verified), asks [`crate::auth`] who that is, and puts the `Caller` in
//! the request's extensions; a call that does not authenticate never
//! reaches a handler (UNAUTHENTICATED). Health is always open, reflection
//! when configured so. Handlers then ask `Access` whether the caller may
//! do what the call does to the resources it names (PERMISSION_DENIED
//! names the operation and the resource).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Request, Status};

use crate::auth::{AuthError, AuthMode, Authorizer, Operation, Principal, Resource};

/// Whether server reflection needs authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reflection {
    /// Served to anyone (it describes the API, no data).
    #[default]
    Public,
    /// Served to authenticated callers only.
    Authenticated,
    /// Not served.
    Off,
}

impl Reflection {
    pub fn as_str(self) -> &'static str {
        match self {
            Reflection::Public => "public",
            Reflection::Authenticated => "authenticated",
            Reflection::Off => "off",
        }
    }
}

impl std::str::FromStr for Reflection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "public" => Ok(Reflection::Public),
            "authenticated" => Ok(Reflection::Authenticated),
            "off" => Ok(Reflection::Off),
            other => Err(format!(
                "reflection {other:?} is not one of: public, authenticated, off"
            )),
        }
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub(crate) struct Caller(pub(crate) Arc<Principal>);

/// The peer of a request, on a plain or a TLS connection.
pub(crate) fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|i| i.get_ref().remote_addr())
        })
}

/// The name a verified client certificate gives its holder: the subject's
/// common name, else its first DNS name.
fn certificate_principal(extensions: &http::Extensions) -> Option<String> {
    let certs = extensions
        .get::<TlsConnectInfo<TcpConnectInfo>>()?
        .peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
    {
        return Some(cn.to_owned());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        x509_parser::extensions::GeneralName::DNSName(dns) => Some((*dns).to_owned()),
        _ => None,
    })
}

const HEALTH_PREFIX: &str = "/grpc.health.v1.Health/";
const REFLECTION_PREFIX: &str = "/grpc.reflection.";

/// Authenticates every call before it reaches a service.
#[derive(Clone)]
pub(crate) struct AuthLayer {
    auth: Arc<Authorizer>,
    public_reflection: bool,
}

impl AuthLayer {
    pub(crate) fn new(auth: Arc<Authorizer>, reflection: Reflection) -> Self {
        AuthLayer {
            auth,
            public_reflection: reflection == Reflection::Public,
        }
    }

    /// Who the request is from, or why it is refused.
    fn authenticate(
        &self,
        request: &http::Request<impl Sized>,
    ) -> Result<Option<Principal>, AuthError> {
        let path = request.uri().path();
        if path.starts_with(HEALTH_PREFIX)
            || (self.public_reflection && path.starts_with(REFLECTION_PREFIX))
        {
            return Ok(None);
        }
        if self.auth.mode() == AuthMode::Off {
            return Ok(Some(Principal::anonymous()));
        }
        if let Some(value) = request.headers().get(http::header::AUTHORIZATION) {
            let token = value
                .to_str()
                .ok()
                .and_then(|v| {
                    let (scheme, token) = v.split_once(' ')?;
                    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                })
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    AuthError::Unauthenticated(
                        "malformed authorization metadata: expected \"Bearer <token>\"".into(),
                    )
                })?;
            return self.auth.authenticate_token(token).map(Some);
        }
        if let Some(name) = certificate_principal(request.extensions()) {
            return Ok(Some(self.auth.authenticate_certificate(&name)));
        }
        Err(AuthError::Unauthenticated(
            "no credentials: send \"authorization: Bearer <token>\" metadata, or connect with a \
             client certificate"
                .into(),
        ))
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Authenticate<S>;
    fn layer(&self, inner: S) -> Authenticate<S> {
        Authenticate {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Authenticate<S> {
    inner: S,
    layer: AuthLayer,
}

type ResponseFuture<E> =
    Pin<Box<dyn Future<Output = Result<http::Response<tonic::body::Body>, E>> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for Authenticate<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        // Inside the future: tonic enters the call's span only while
        // polling it, and the principal belongs on that span.
        Box::pin(async move {
            match layer.authenticate(&request) {
                Ok(principal) => {
                    if let Some(principal) = principal {
                        tracing::Span::current().record("principal", principal.name.as_str());
                        request.extensions_mut().insert(Caller(Arc::new(principal)));
                    }
                    inner.call(request).await
                }
                Err(error) => {
                    let peer = peer_addr(request.extensions());
                    tracing::warn!(
                        peer = ?peer,
                        path = request.uri().path(),
                        reason = %error,
                        "authentication failed"
                    );
                    Ok(super::status::auth(error).into_http())
                }
            }
        })
    }
}

/// The checks handlers make: may the caller do this?
#[derive(Debug, Clone)]
pub(crate) struct Access {
    auth: Arc<Authorizer>,
}

/// How often a long call (a subscription) checks its caller's rights
/// again, besides at every change of users, tokens or rules.
const RECHECK_EVERY: Duration = Duration::from_secs(1);

impl Access {
    pub(crate) fn new(auth: Arc<Authorizer>) -> Self {
        Access { auth }
    }

    pub(crate) fn authorizer(&self) -> &Arc<Authorizer> {
        &self.auth
    }

    /// The caller of `request`.
    pub(crate) fn caller<T>(&self, request: &Request<T>) -> Result<Arc<Principal>, Status> {
        match request.extensions().get::<Caller>() {
            Some(caller) => Ok(Arc::clone(&caller.0)),
            // Only calls the layer let through (health) have none, and
            // they never ask.
            None => Err(Status::unauthenticated("the call was not authenticated")),
        }
    }

    /// The caller of `request`, if it may do `operation` on `resource`.
    pub(crate) fn check<T>(
        &self,
        request: &Request<T>,
        operation: Operation,
        resource: Resource,
    ) -> Result<Arc<Principal>, Status> {
        let caller = self.caller(request)?;
        self.check_principal(&caller, operation, resource)?;
        Ok(caller)
    }

    pub(crate) fn check_principal(
        &self,
        principal: &Principal,
        operation: Operation,
        resource: Resource,
    ) -> Result<(), Status> {
        self.auth
            .authorize(principal, operation, resource)
            .map_err(super::status::auth)
    }

    /// For a call that outlives its authentication (a stream): the
    /// caller's token still stands and it may still do this.
    pub(crate) fn recheck(
        &self,
        principal: &Principal,
        operation: Operation,
        resource: Resource,
    ) -> Result<(), Status> {
        self.auth
            .still_authenticated(principal)
            .map_err(super::status::auth)?;
        self.check_principal(principal, operation, resource)
    }

    pub(crate) fn allowed(
        &self,
        principal: &Principal,
        operation: Operation,
        resource: Resource,
    ) -> bool {
        self.auth.allowed(principal, operation, resource)
    }

    /// Resolves, with the status to end the call with, once `principal`
    /// may no longer do `operation` on `resource`: its token revoked or
    /// expired, or a rule changed. Checked at every change and every
    /// second.
    pub(crate) fn revoked(
        &self,
        principal: Arc<Principal>,
        operation: Operation,
        resource_type: crate::auth::ResourceType,
        resource_name: String,
    ) -> impl Future<Output = Status> + Send + 'static {
        let access = self.clone();
        let mut changes = access.auth.changes();
        async move {
            let mut ticks = tokio::time::interval(RECHECK_EVERY);
            loop {
                tokio::select! {
                    _ = ticks.tick() => {}
                    changed = changes.changed() => {
                        if changed.is_err() {
                            // The authorizer is gone: the broker is
                            // stopping, which ends the call anyway.
                            std::future::pending::<()>().await;
                        }
                    }
                }
                let resource = Resource {
                    kind: resource_type,
                    name: &resource_name,
                };
                if let Err(status) = access.recheck(&principal, operation, resource) {
                    tracing::info!(principal = %principal, reason = status.message(), "ending a call whose rights were revoked");
                    return status;
                }
            }
        }
    }
}
