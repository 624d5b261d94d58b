use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::AbortBody;
use crate::future::{ResponseFuture, TimeoutAnswer};
use crate::layer::Shared;
use crate::signal::min_deadline;
use crate::{deadline, AbortLayer, AbortRoot, AbortSignal};

/// Puts an [`AbortSignal`] into every request and fires it when the client goes away, the
/// deadline passes or the root shuts down. Built by [`AbortLayer`]; see the
/// [crate docs](crate).
///
/// It never fails on its own: it passes the inner service's error through, and answers a
/// request whose deadline passed with the configured status (504 by default).
///
/// Clones share their root and configuration.
#[derive(Clone, Debug)]
pub struct Abort<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Abort<S> {
    /// Wraps `inner` with a default [`AbortLayer`] (and a new root).
    pub fn new(inner: S) -> Self {
        AbortLayer::new().layer(inner)
    }

    /// A default [`AbortLayer`], to configure.
    pub fn layer() -> AbortLayer {
        AbortLayer::new()
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<Shared>) -> Self {
        Abort { inner, shared }
    }

    /// The root this service's signals descend from.
    pub fn root(&self) -> AbortRoot {
        self.shared.root.clone()
    }

    /// A reference to the inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// A mutable reference to the inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Abort<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body,
{
    type Response = Response<AbortBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        let client_headers = config.grpc_timeout || config.header.is_some();
        // Reading the clock is the layer's most expensive step on some machines; skip it
        // when nothing needs the time.
        let started = (config.timeout.is_some()
            || client_headers
            || config.on_abort.is_some()
            || cfg!(feature = "tracing"))
        .then(Instant::now);
        let mut deadline = None;
        if let Some(now) = started {
            deadline = config.timeout.and_then(|t| now.checked_add(t));
            if client_headers {
                let client = deadline::from_headers(
                    req.headers(),
                    now,
                    config.grpc_timeout,
                    config.header.as_ref(),
                );
                deadline = min_deadline(deadline, client);
            }
        }
        let uri = config.on_abort.as_ref().map(|_| req.uri().clone());
        let signal = AbortSignal::for_request(
            &self.shared,
            req.extensions().get::<AbortSignal>(),
            deadline,
            started,
            req.method().clone(),
            uri,
        );
        req.extensions_mut().insert(signal.clone());
        let timeout = if config.grpc_timeout && is_grpc(&req) {
            TimeoutAnswer::Grpc
        } else {
            TimeoutAnswer::Status(config.timeout_status)
        };
        ResponseFuture::new(self.inner.call(req), signal, config.mode, timeout)
    }
}

/// Whether the request is a gRPC call (`content-type: application/grpc[+proto|...]`).
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
