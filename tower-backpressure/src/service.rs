//! The services: HTTP ([`Backpressure`]) and any request type ([`TypedBackpressure`]).

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, Request};
use tokio::time::Instant;
use tower_service::Service;

use crate::body::ResponseBody;
use crate::classify::{Classify, DefaultClassify, RequestHead};
use crate::future::{ResponseFuture, TypedResponseFuture};
use crate::handle::BackpressureHandle;
use crate::layer::{BackpressureLayer, FastPath, HttpShared};
use crate::limiter::{Limiter, Ticket};
use crate::order::Priority;

/// An HTTP service that admits at most `max_in_flight` requests into `S`, queues a bounded
/// number more, and answers the rest with `503` (configurable) and `Retry-After`.
///
/// Its error type is `S`'s, so with an `Infallible` inner service (axum) it is
/// `Infallible` too and needs no `HandleErrorLayer`. `poll_ready` only forwards the inner
/// service's readiness and never takes a permit: waiting happens in the response future,
/// where axum drives readiness, and idle keep-alive connections hold nothing. `S` must be
/// `Clone` (axum's routes are): a queued request keeps the readied service and leaves a
/// clone behind. See the [crate docs](crate).
#[derive(Debug)]
pub struct Backpressure<S> {
    inner: S,
    shared: Arc<HttpShared>,
}

impl<S: Clone> Clone for Backpressure<S> {
    fn clone(&self) -> Self {
        Backpressure {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S> Backpressure<S> {
    /// Wraps `inner` with a limiter of its own admitting `max_in_flight` requests at once,
    /// every other setting at its default. Use [`BackpressureLayer::builder`] to configure.
    pub fn new(inner: S, max_in_flight: usize) -> Self {
        tower_layer::Layer::layer(&BackpressureLayer::new(max_in_flight), inner)
    }

    /// A layer admitting `max_in_flight` requests at once; the same as
    /// [`BackpressureLayer::new`].
    pub fn layer(max_in_flight: usize) -> BackpressureLayer {
        BackpressureLayer::new(max_in_flight)
    }

    pub(crate) fn from_shared(inner: S, shared: Arc<HttpShared>) -> Self {
        Backpressure { inner, shared }
    }

    /// A handle on the shared state.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            limiter: self.shared.limiter.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn declared_bytes<B: http_body::Body>(req: &Request<B>, unknown: u64) -> u64 {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        return len;
    }
    http_body::Body::size_hint(req.body())
        .exact()
        .unwrap_or(unknown)
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Backpressure<S>
where
    S: Service<Request<ReqB>, Response = http::Response<ResB>> + Clone,
    ReqB: http_body::Body + 'static,
    ResB: http_body::Body,
{
    type Response = http::Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    #[inline]
    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let shared = &*self.shared;
        let bypass_asked = match shared.fast {
            FastPath::Blind => false,
            FastPath::Bypass => {
                let bypass = shared.policy.bypass.as_ref();
                if bypass.is_some_and(|f| f(&RequestHead::new(&req))) {
                    return ResponseFuture::called(self.inner.call(req), None);
                }
                true
            }
            FastPath::Slow => return self.call_slow(req, false),
        };
        if let Some(permit) = shared.limiter.try_admit() {
            return ResponseFuture::called(self.inner.call(req), Some(permit));
        }
        self.call_slow(req, bypass_asked)
    }
}

impl<S> Backpressure<S> {
    /// Every request the lock-free path could not admit at once. `bypass_asked`: the
    /// bypass function has already answered `false` for this request (it is asked once).
    #[inline(never)]
    fn call_slow<ReqB>(&mut self, req: Request<ReqB>, bypass_asked: bool) -> ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>> + Clone,
        ReqB: http_body::Body + 'static,
    {
        let policy = &self.shared.policy;
        let mut ticket = Ticket {
            priority: Priority::Normal,
            deadline: None,
            bytes: 0,
        };
        if policy.reads_head() {
            let head = RequestHead::new(&req);
            if !bypass_asked && policy.bypass.as_ref().is_some_and(|f| f(&head)) {
                return ResponseFuture::called(self.inner.call(req), None);
            }
            if let Some(f) = &policy.priority {
                ticket.priority = f(&head);
            }
            if let Some(f) = &policy.deadline {
                ticket.deadline = f(&head);
            }
        }
        if self.shared.limiter.config().track_bytes {
            ticket.bytes = declared_bytes(&req, policy.unknown_length_bytes);
        }
        let admission = self.shared.limiter.admit_with(ticket, Instant::now);
        ResponseFuture::start(admission, &mut self.inner, req, &self.shared)
    }
}

/// A service of any request type with the same admission control as [`Backpressure`];
/// a shed request fails with [`Overloaded`](crate::Overloaded) (boxed, detect it with
/// `err.is::<Overloaded>()`). The permit is held until the response future completes.
#[derive(Debug)]
pub struct TypedBackpressure<S, C> {
    inner: S,
    limiter: Limiter,
    classify: C,
}

impl<S: Clone, C: Clone> Clone for TypedBackpressure<S, C> {
    fn clone(&self) -> Self {
        TypedBackpressure {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            classify: self.classify.clone(),
        }
    }
}

impl<S> TypedBackpressure<S, DefaultClassify> {
    /// Wraps `inner` with a limiter of its own admitting `max_in_flight` requests at once,
    /// every request normal, every other setting at its default. Use
    /// [`BackpressureLayer::builder`] and [`build_typed`](crate::BackpressureBuilder::build_typed)
    /// to configure.
    pub fn new(inner: S, max_in_flight: usize) -> Self {
        tower_layer::Layer::layer(
            &BackpressureLayer::builder(max_in_flight).build_typed(),
            inner,
        )
    }
}

impl<S, C> TypedBackpressure<S, C> {
    pub(crate) fn from_parts(inner: S, limiter: Limiter, classify: C) -> Self {
        TypedBackpressure {
            inner,
            limiter,
            classify,
        }
    }

    /// A handle on the shared state.
    pub fn handle(&self) -> BackpressureHandle {
        BackpressureHandle {
            limiter: self.limiter.clone(),
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes `self`, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, C, Req> Service<Req> for TypedBackpressure<S, C>
where
    S: Service<Req> + Clone,
    S::Error: Into<crate::BoxError>,
    C: Classify<Req>,
{
    type Response = S::Response;
    type Error = crate::BoxError;
    type Future = TypedResponseFuture<S, Req>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    #[inline]
    fn call(&mut self, req: Req) -> Self::Future {
        let class = self.classify.classify(&req);
        if class.bypass {
            return TypedResponseFuture::bypass(&mut self.inner, req);
        }
        let ticket = Ticket {
            priority: class.priority,
            deadline: class.deadline,
            bytes: class.bytes,
        };
        let admission = self.limiter.admit_with(ticket, Instant::now);
        TypedResponseFuture::start(admission, &mut self.inner, req)
    }
}
