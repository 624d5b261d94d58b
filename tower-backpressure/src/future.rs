//! Response futures: wait for admission, ready and call the inner service, hand the permit
//! to the response body.
//!
//! The fast path (admitted at once, or bypassed) calls the inner service inside `call`, so
//! the future is just the inner future and the two-word permit: no larger than tower's
//! `ConcurrencyLimit` future, which matters because futures up to 128 bytes are moved with
//! a few register stores and larger ones with `memcpy`. Everything a queued or shed request
//! needs (its request, service, timer, the shed reason) lives in one box, and the layer's
//! HTTP settings are read through the permit's limiter rather than copied into the future.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::acquire::Acquire;
use crate::adaptive::Outcome;
use crate::body::{BodyMeter, MeteredBody, ResponseBody};
use crate::builder::PermitRelease;
use crate::error::{Overloaded, ShedReason};
use crate::layer::HttpShared;
use crate::limiter::{Admission, Granted, Permit};
use std::sync::Arc;

type Meter = Arc<dyn std::any::Any + Send + Sync>;

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        // With a permit if admitted, without one if bypassed.
        Called { #[pin] fut: S::Future, permit: Option<Permit> },
        Slow { slow: Box<Slow<S, Req>> },
    }
}

/// A request that has not reached its inner service.
enum Slow<S, Req> {
    Waiting(Waiting<S, Req>),
    /// Shed at once, with the HTTP status to answer.
    Shed(Overloaded, StatusCode),
    Done,
}

/// A queued request: its wait, then its wait for the inner service to be ready again.
struct Waiting<S, Req> {
    acquire: Acquire,
    /// The service readied before the request queued, and the request.
    pending: Option<(S, Req)>,
    /// Set once admitted.
    granted: Option<Granted>,
    /// The request-body meter of an HTTP layer that meters bodies.
    meter: Option<Meter>,
    /// The HTTP status to answer if shed.
    status: StatusCode,
}

/// Why a request never reached its inner service.
enum Stop<E> {
    Shed(Overloaded, StatusCode),
    /// The inner service failed `poll_ready`.
    NotReady(E),
}

impl<S, Req> Waiting<S, Req>
where
    S: Service<Req>,
{
    /// Waits for a permit, then for the inner service to be ready, then calls it. Waiting
    /// for readiness is bounded like waiting in the queue: by the queue timeout (counted
    /// from when the request queued) and the request's own deadline.
    fn poll_call(
        &mut self,
        cx: &mut Context<'_>,
        wrap: impl FnOnce(Req, &mut Permit, &Option<Meter>) -> Req,
    ) -> Poll<Result<(S::Future, Permit), Stop<S::Error>>> {
        if self.granted.is_none() {
            match ready!(self.acquire.poll_acquire(cx)) {
                Ok(granted) => self.granted = Some(granted),
                Err(overloaded) => return Poll::Ready(Err(Stop::Shed(overloaded, self.status))),
            }
        }
        let (service, _) = self.pending.as_mut().expect("present until called");
        // Readied before queueing; polled again because time has passed.
        match service.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                let (mut service, request) = self.pending.take().expect("present until called");
                let mut permit = self.granted.take().expect("granted above").permit;
                let request = wrap(request, &mut permit, &self.meter);
                Poll::Ready(Ok((service.call(request), permit)))
            }
            Poll::Ready(Err(e)) => {
                let mut permit = self.granted.take().expect("granted above").permit;
                permit.finish(|| Outcome::Overload);
                Poll::Ready(Err(Stop::NotReady(e)))
            }
            Poll::Pending => {
                let granted = self.granted.as_ref().expect("granted above");
                let Some((at, reason)) = granted.ready_by else {
                    return Poll::Pending;
                };
                ready!(self.acquire.poll_timer(cx, at));
                // An inner service not ready within the queue timeout is overloaded itself.
                let mut permit = self.granted.take().expect("granted above").permit;
                permit.finish(|| Outcome::Overload);
                let overloaded = permit.limiter().shed_admitted(reason);
                drop(permit);
                Poll::Ready(Err(Stop::Shed(overloaded, self.status)))
            }
        }
    }
}

impl<S, Req> State<S, Req>
where
    S: Service<Req>,
{
    #[inline]
    fn called(fut: S::Future, permit: Option<Permit>) -> Self {
        State::Called { fut, permit }
    }

    /// Acts on a decision to queue or shed. `svc` must have been driven to readiness by
    /// the caller's `poll_ready`, as the `Service` contract requires before `call`.
    fn not_admitted(
        admission: Admission,
        svc: &mut S,
        req: Req,
        meter: &Option<Meter>,
        status: StatusCode,
    ) -> Self
    where
        S: Clone,
    {
        let slow = match admission {
            Admission::Admitted(_) => unreachable!("admitted requests are called at once"),
            Admission::Queued(waiter) => {
                // Keep the readied service for when we are admitted; leave a clone behind.
                let fresh = svc.clone();
                let readied = std::mem::replace(svc, fresh);
                Slow::Waiting(Waiting {
                    acquire: Acquire::new(waiter),
                    pending: Some((readied, req)),
                    granted: None,
                    meter: meter.clone(),
                    status,
                })
            }
            Admission::Shed(overloaded) => Slow::Shed(overloaded, status),
        };
        State::Slow {
            slow: Box::new(slow),
        }
    }
}

/// Drives a request that is not (yet) calling its inner service: waits for admission and
/// readiness and calls the service (then the state is `Called` and this returns `None`),
/// or ends it (`Some`). `wrap` may rewrite the request once admitted.
#[inline(never)]
fn poll_not_called<S, Req>(
    mut state: Pin<&mut State<S, Req>>,
    cx: &mut Context<'_>,
    wrap: impl FnOnce(Req, &mut Permit, &Option<Meter>) -> Req,
) -> Poll<Option<Stop<S::Error>>>
where
    S: Service<Req>,
{
    let StateProj::Slow { slow } = state.as_mut().project() else {
        return Poll::Ready(None);
    };
    let stop = match &mut **slow {
        Slow::Waiting(waiting) => match ready!(waiting.poll_call(cx, wrap)) {
            Ok((fut, permit)) => {
                state.set(State::called(fut, Some(permit)));
                return Poll::Ready(None);
            }
            Err(stop) => stop,
        },
        Slow::Shed(..) => match std::mem::replace(&mut **slow, Slow::Done) {
            Slow::Shed(overloaded, status) => Stop::Shed(overloaded, status),
            _ => unreachable!("matched above"),
        },
        Slow::Done => panic!("response future polled after completion"),
    };
    **slow = Slow::Done;
    Poll::Ready(Some(stop))
}

/// Wraps the request body in a [`MeteredBody`] when the layer meters bodies of this type.
pub(crate) fn meter_request<ReqB: 'static>(
    req: Request<ReqB>,
    permit: &mut Permit,
    meter: &Option<Meter>,
) -> Request<ReqB> {
    let Some(meter) = meter else {
        return req;
    };
    let Some(rewrap) = meter.downcast_ref::<fn(MeteredBody<ReqB>) -> ReqB>() else {
        return req;
    };
    let Some(body_meter) = BodyMeter::new(permit) else {
        return req;
    };
    req.map(|body| rewrap(MeteredBody::new(body, body_meter)))
}

pin_project! {
    /// The response future of [`Backpressure`](crate::Backpressure).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, Request<ReqB>>,
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
    ReqB: 'static,
{
    /// Acts on an admission decision made by the general path.
    pub(crate) fn start(
        admission: Admission,
        svc: &mut S,
        req: Request<ReqB>,
        shared: &HttpShared,
    ) -> Self
    where
        S: Clone,
    {
        let config = shared.limiter.config();
        let state = match admission {
            Admission::Admitted(mut permit) => {
                let req = meter_request(req, &mut permit, &shared.policy.meter);
                State::called(svc.call(req), Some(permit))
            }
            other => State::not_admitted(
                other,
                svc,
                req,
                &shared.policy.meter,
                config.http.shed_status,
            ),
        };
        ResponseFuture { state }
    }

    /// A request whose inner service has been called, with its permit unless bypassed.
    #[inline]
    pub(crate) fn called(fut: S::Future, permit: Option<Permit>) -> Self {
        ResponseFuture {
            state: State::called(fut, permit),
        }
    }
}

/// The answer to a shed HTTP request: `Retry-After` only where waiting can help, so not
/// on a `413` for a body larger than the whole byte budget.
#[cold]
fn shed_response<B>(overloaded: &Overloaded, status: StatusCode) -> Response<ResponseBody<B>> {
    let too_large = overloaded.reason() == ShedReason::TooLarge;
    let status = if too_large {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        status
    };
    let message = Bytes::from(format!("{overloaded}\n"));
    let mut response = Response::new(ResponseBody::shed(message));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if !too_large {
        headers.insert(
            header::RETRY_AFTER,
            HeaderValue::from(overloaded.retry_after().as_secs().max(1)),
        );
    }
    response
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body,
    ReqB: 'static,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            // The fast path: a completed inner future is not polled again, so the state can
            // stay as it is (no drop, no move).
            if let StateProj::Called { fut, permit } = state.as_mut().project() {
                let result = ready!(fut.poll(cx));
                return Poll::Ready(respond(result, permit.take()));
            }
            match ready!(poll_not_called(state.as_mut(), cx, meter_request)) {
                None => continue,
                Some(Stop::Shed(overloaded, status)) => {
                    return Poll::Ready(Ok(shed_response(&overloaded, status)))
                }
                Some(Stop::NotReady(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The response of a request that reached its inner service.
#[inline]
fn respond<B, E>(
    result: Result<Response<B>, E>,
    permit: Option<Permit>,
) -> Result<Response<ResponseBody<B>>, E>
where
    B: http_body::Body,
{
    // An error is the connection's business, not a sample: the permit is released
    // unfinished, which adaptive limits ignore.
    let response = result?;
    let Some(mut permit) = permit else {
        return Ok(response.map(ResponseBody::unlimited));
    };
    let policy = permit.limiter().config().http;
    permit.set_outcome(|| (policy.classify)(response.status()));
    if policy.release == PermitRelease::Head {
        permit.complete();
        drop(permit);
        return Ok(response.map(ResponseBody::unlimited));
    }
    Ok(response.map(|body| ResponseBody::limited(body, permit)))
}

impl<S, ReqB> fmt::Debug for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// The response future of [`TypedBackpressure`](crate::TypedBackpressure).
    #[must_use = "futures do nothing unless polled"]
    pub struct TypedResponseFuture<S, Req>
    where
        S: Service<Req>,
    {
        #[pin]
        state: State<S, Req>,
    }
}

fn unchanged<Req>(req: Req, _: &mut Permit, _: &Option<Meter>) -> Req {
    req
}

impl<S, Req> TypedResponseFuture<S, Req>
where
    S: Service<Req>,
{
    #[inline]
    pub(crate) fn start(admission: Admission, svc: &mut S, req: Req) -> Self
    where
        S: Clone,
    {
        let state = match admission {
            Admission::Admitted(permit) => State::called(svc.call(req), Some(permit)),
            // The status is for HTTP; a typed shed is an error.
            other => State::not_admitted(other, svc, req, &None, StatusCode::SERVICE_UNAVAILABLE),
        };
        TypedResponseFuture { state }
    }

    pub(crate) fn bypass(svc: &mut S, req: Req) -> Self {
        TypedResponseFuture {
            state: State::called(svc.call(req), None),
        }
    }
}

impl<S, Req> Future for TypedResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<crate::BoxError>,
{
    type Output = Result<S::Response, crate::BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut state = self.project().state;
        loop {
            if let StateProj::Called { fut, permit } = state.as_mut().project() {
                let result = ready!(fut.poll(cx));
                if let Some(mut permit) = permit.take() {
                    permit.finish(|| {
                        if result.is_ok() {
                            Outcome::Success
                        } else {
                            Outcome::Overload
                        }
                    });
                }
                return Poll::Ready(result.map_err(Into::into));
            }
            match ready!(poll_not_called(state.as_mut(), cx, unchanged)) {
                None => continue,
                Some(Stop::Shed(overloaded, _)) => return Poll::Ready(Err(overloaded.into())),
                Some(Stop::NotReady(e)) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl<S, Req> fmt::Debug for TypedResponseFuture<S, Req>
where
    S: Service<Req>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TypedResponseFuture")
            .finish_non_exhaustive()
    }
}
