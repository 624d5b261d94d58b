use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tokio::time::Instant;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::AbortBody;
use crate::future::{ResponseFuture, TimeoutAnswer};
use crate::layer::Shared;
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

    #[inline]
    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        // Client deadline headers first: they are relative, so the clock is read only when
        // some deadline applies (or something will report the elapsed time). Reading it is
        // the layer's most expensive step on some machines.
        let read = if config.grpc_timeout || config.header.is_some() {
            deadline::from_headers(req.headers(), config.grpc_timeout, config.header.as_ref())
        } else {
            deadline::FromHeaders::default()
        };
        let client = read.timeout;
        let timeout = match (config.timeout, client) {
            (Some(server), Some(client)) => Some(server.min(client)),
            (server, client) => server.or(client),
        };
        let started =
            (timeout.is_some() || config.on_abort.is_some() || crate::event::wants_elapsed())
                .then(Instant::now);
        let deadline = match (started, timeout) {
            (Some(now), Some(timeout)) => {
                let deadline = now.checked_add(timeout);
                if deadline.is_none() {
                    crate::event::deadline_overflow(timeout);
                }
                deadline
            }
            _ => None,
        };
        let answer = if read.grpc_call {
            TimeoutAnswer::Grpc
        } else {
            TimeoutAnswer::Status(config.timeout_status)
        };
        // Boxed at once: an `Option<Uri>` is large to move around.
        let uri =
            |req: &Request<ReqBody>| config.on_abort.as_ref().map(|_| req.uri().clone().into());
        // One map operation on the fast path: the signal goes in as a child of the root. If
        // an outer layer's signal was there, ours becomes a child of it instead and replaces
        // it; the first one, never fired nor handed out, goes back to the pool.
        let first = AbortSignal::for_request(
            &self.shared,
            None,
            deadline,
            started,
            req.method().clone(),
            uri(&req),
        );
        let signal = match req.extensions_mut().insert(first.clone()) {
            None => first,
            Some(outer) => {
                let signal = AbortSignal::for_request(
                    &self.shared,
                    Some(&outer),
                    deadline,
                    started,
                    req.method().clone(),
                    uri(&req),
                );
                // Replaces (and drops) the clone of `first`.
                req.extensions_mut().insert(signal.clone());
                first.release();
                signal
            }
        };
        // The deadline is the server's timeout from now (not shortened by a client header or
        // an outer layer): it can share the per-thread timer lists (see `timer.rs`).
        let server_deadline =
            deadline.is_some() && timeout == config.timeout && signal.deadline() == deadline;
        ResponseFuture::new(self.inner.call(req), signal, server_deadline, answer)
    }
}
