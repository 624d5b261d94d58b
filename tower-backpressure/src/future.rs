//! Response futures: wait for admission, ready and call the inner service, hand the permit
//! to the response body.
//!
//! The fast path (admitted at once, or bypassed) calls the inner service inside `call`, so
//! the future is just the inner future and the permit. Only a queued request keeps its
//! request and service, boxed, until it is admitted, which keeps the future small.

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
use crate::limiter::{Admission, Permit};
use std::sync::Arc;

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Waiting { acquire: Acquire, pending: Option<Box<(S, Req)>> },
        Ready { pending: Option<Box<(S, Req)>>, permit: Option<Permit> },
        Called { #[pin] fut: S::Future, permit: Option<Permit> },
        Shed { overloaded: Option<Overloaded> },
        Done,
    }
}

impl<S, Req> State<S, Req>
where
    S: Service<Req>,
{
    /// Acts on an admission decision. `svc` must have been driven to readiness by the
    /// caller's `poll_ready`, as the `Service` contract requires before `call`.
    #[inline]
    fn start(
        admission: Admission,
        svc: &mut S,
        req: Req,
        wrap: impl FnOnce(Req, &mut Permit) -> Req,
    ) -> Self
    where
        S: Clone,
    {
        match admission {
            Admission::Admitted(mut permit) => {
                let req = wrap(req, &mut permit);
                State::Called {
                    fut: svc.call(req),
                    permit: Some(permit),
                }
            }
            Admission::Queued(waiter) => {
                // Keep the readied service for when we are admitted; leave a clone behind.
                let fresh = svc.clone();
                let readied = std::mem::replace(svc, fresh);
                State::Waiting {
                    acquire: Acquire::new(waiter),
                    pending: Some(Box::new((readied, req))),
                }
            }
            Admission::Shed(overloaded) => State::Shed {
                overloaded: Some(overloaded),
            },
        }
    }

    #[inline]
    fn bypass(svc: &mut S, req: Req) -> Self {
        State::Called {
            fut: svc.call(req),
            permit: None,
        }
    }
}

/// One step of the shared state machine.
enum Step<F> {
    /// The inner future finished with its permit (if any).
    Finished(F, Option<Permit>),
    /// The request was shed.
    Shed(Overloaded),
    /// The inner service failed `poll_ready`.
    NotReady(F),
}

/// Drives waiting, readiness and the call; `wrap` may rewrite the request once admitted.
#[inline]
fn poll_state<S, Req>(
    mut state: Pin<&mut State<S, Req>>,
    cx: &mut Context<'_>,
    wrap: impl Fn(Req, &mut Permit) -> Req,
) -> Poll<Step<Result<S::Response, S::Error>>>
where
    S: Service<Req>,
{
    loop {
        match state.as_mut().project() {
            StateProj::Waiting { acquire, pending } => match ready!(acquire.poll_acquire(cx)) {
                Ok(permit) => {
                    let next = State::Ready {
                        pending: pending.take(),
                        permit: Some(permit),
                    };
                    state.set(next);
                }
                Err(overloaded) => {
                    state.set(State::Done);
                    return Poll::Ready(Step::Shed(overloaded));
                }
            },
            StateProj::Ready { pending, permit } => {
                let (service, _) = &mut **pending.as_mut().expect("present until called");
                // Readied before queueing; polled again because time has passed.
                if let Err(e) = ready!(service.poll_ready(cx)) {
                    if let Some(p) = permit.as_mut() {
                        p.set_outcome(Outcome::Overload);
                        p.complete();
                    }
                    state.set(State::Done);
                    return Poll::Ready(Step::NotReady(Err(e)));
                }
                let (mut service, mut request) = *pending.take().expect("present until called");
                let mut permit = permit.take();
                if let Some(p) = permit.as_mut() {
                    request = wrap(request, p);
                }
                let fut = service.call(request);
                state.set(State::Called { fut, permit });
            }
            StateProj::Called { fut, permit } => {
                let result = ready!(fut.poll(cx));
                let permit = permit.take();
                state.set(State::Done);
                return Poll::Ready(Step::Finished(result, permit));
            }
            StateProj::Shed { overloaded } => {
                let overloaded = overloaded.take().expect("polled after completion");
                state.set(State::Done);
                return Poll::Ready(Step::Shed(overloaded));
            }
            StateProj::Done => panic!("response future polled after completion"),
        }
    }
}

/// Wraps the request body in a [`MeteredBody`] when the layer meters bodies of this type.
#[inline]
pub(crate) fn meter_request<ReqB: 'static>(
    meter: &Option<Meter>,
    req: Request<ReqB>,
    permit: &mut Permit,
) -> Request<ReqB> {
    let Some(meter) = meter else {
        return req;
    };
    let Some(rewrap) = meter.downcast_ref::<fn(MeteredBody<ReqB>) -> ReqB>() else {
        return req;
    };
    let body_meter = BodyMeter::new(permit);
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
        policy: ResponsePolicy,
        // Only set when bodies are metered and the request is still queued.
        meter: Option<Meter>,
    }
}

type Meter = Arc<dyn std::any::Any + Send + Sync>;

/// What the future needs from the layer's settings once the inner service answers; copied
/// so the fast path does not touch the shared state's reference count.
#[derive(Clone, Copy)]
struct ResponsePolicy {
    status: StatusCode,
    release: PermitRelease,
    classify_outcome: fn(StatusCode) -> Outcome,
}

impl ResponsePolicy {
    fn of(shared: &HttpShared) -> Self {
        ResponsePolicy {
            status: shared.policy.status,
            release: shared.policy.release,
            classify_outcome: shared.policy.classify_outcome,
        }
    }
}

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
    ReqB: 'static,
{
    #[inline]
    pub(crate) fn start(
        admission: Admission,
        svc: &mut S,
        req: Request<ReqB>,
        shared: &HttpShared,
    ) -> Self
    where
        S: Clone,
    {
        let queued = matches!(admission, Admission::Queued(_));
        let state = State::start(admission, svc, req, |req, permit| {
            meter_request(&shared.policy.meter, req, permit)
        });
        ResponseFuture {
            state,
            policy: ResponsePolicy::of(shared),
            meter: if queued {
                shared.policy.meter.clone()
            } else {
                None
            },
        }
    }

    #[inline]
    pub(crate) fn bypass(svc: &mut S, req: Request<ReqB>, shared: &HttpShared) -> Self {
        ResponseFuture {
            state: State::bypass(svc, req),
            policy: ResponsePolicy::of(shared),
            meter: None,
        }
    }
}

/// The answer to a shed HTTP request: `Retry-After` only where waiting can help, so not
/// on a `413` for a body larger than the whole byte budget.
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
        let this = self.project();
        let policy = *this.policy;
        let meter: &Option<Meter> = this.meter;
        let wrap = |req, permit: &mut Permit| meter_request(meter, req, permit);
        match ready!(poll_state(this.state, cx, wrap)) {
            Step::Shed(overloaded) => Poll::Ready(Ok(shed_response(&overloaded, policy.status))),
            Step::NotReady(Err(e)) | Step::Finished(Err(e), _) => Poll::Ready(Err(e)),
            Step::NotReady(Ok(_)) => unreachable!("NotReady always carries an error"),
            Step::Finished(Ok(response), permit) => {
                let Some(mut permit) = permit else {
                    return Poll::Ready(Ok(response.map(ResponseBody::unlimited)));
                };
                permit.set_outcome((policy.classify_outcome)(response.status()));
                if policy.release == PermitRelease::Head {
                    permit.complete();
                    drop(permit);
                    return Poll::Ready(Ok(response.map(ResponseBody::unlimited)));
                }
                Poll::Ready(Ok(response.map(|body| ResponseBody::limited(body, permit))))
            }
        }
    }
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

impl<S, Req> TypedResponseFuture<S, Req>
where
    S: Service<Req>,
{
    #[inline]
    pub(crate) fn start(admission: Admission, svc: &mut S, req: Req) -> Self
    where
        S: Clone,
    {
        TypedResponseFuture {
            state: State::start(admission, svc, req, |req, _| req),
        }
    }

    pub(crate) fn bypass(svc: &mut S, req: Req) -> Self {
        TypedResponseFuture {
            state: State::bypass(svc, req),
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
        match ready!(poll_state(self.project().state, cx, |req, _| req)) {
            Step::Shed(overloaded) => Poll::Ready(Err(overloaded.into())),
            Step::NotReady(result) => Poll::Ready(result.map_err(Into::into)),
            Step::Finished(result, permit) => {
                if let Some(mut permit) = permit {
                    permit.set_outcome(if result.is_ok() {
                        Outcome::Success
                    } else {
                        Outcome::Overload
                    });
                    permit.complete();
                }
                Poll::Ready(result.map_err(Into::into))
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
