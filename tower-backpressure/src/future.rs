//! Response futures: wait for admission, ready and call the inner service, hand the permit
//! to the response body.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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

pin_project! {
    /// The response future of [`Backpressure`](crate::Backpressure).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, ReqB>
    where
        S: Service<Request<ReqB>>,
    {
        #[pin]
        state: State<S, Request<ReqB>>,
        shared: Arc<HttpShared>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, Req>
    where
        S: Service<Req>,
    {
        Waiting { acquire: Acquire, svc: Option<S>, req: Option<Req> },
        Ready { svc: Option<S>, req: Option<Req>, permit: Option<Permit> },
        Called { #[pin] fut: S::Future, permit: Option<Permit> },
        Shed { overloaded: Option<Overloaded> },
        Done,
    }
}

impl<S, Req> State<S, Req>
where
    S: Service<Req>,
{
    fn from_admission(admission: Admission, svc: S, req: Req) -> Self {
        match admission {
            Admission::Admitted(permit) => State::Ready {
                svc: Some(svc),
                req: Some(req),
                permit: Some(permit),
            },
            Admission::Queued(waiter) => State::Waiting {
                acquire: Acquire::new(waiter),
                svc: Some(svc),
                req: Some(req),
            },
            Admission::Shed(overloaded) => State::Shed {
                overloaded: Some(overloaded),
            },
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
            StateProj::Waiting { acquire, svc, req } => match ready!(acquire.poll_acquire(cx)) {
                Ok(permit) => {
                    let next = State::Ready {
                        svc: svc.take(),
                        req: req.take(),
                        permit: Some(permit),
                    };
                    state.set(next);
                }
                Err(overloaded) => {
                    state.set(State::Done);
                    return Poll::Ready(Step::Shed(overloaded));
                }
            },
            StateProj::Ready { svc, req, permit } => {
                let service = svc.as_mut().expect("service present until called");
                if let Err(e) = ready!(service.poll_ready(cx)) {
                    if let Some(p) = permit.as_mut() {
                        p.set_outcome(Outcome::Overload);
                        p.complete();
                    }
                    state.set(State::Done);
                    return Poll::Ready(Step::NotReady(Err(e)));
                }
                let mut service = svc.take().expect("service present until called");
                let mut request = req.take().expect("request present until called");
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

impl<S, ReqB> ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>>,
{
    pub(crate) fn new(
        admission: Admission,
        svc: S,
        req: Request<ReqB>,
        shared: Arc<HttpShared>,
    ) -> Self {
        ResponseFuture {
            state: State::from_admission(admission, svc, req),
            shared,
        }
    }

    pub(crate) fn bypass(svc: S, req: Request<ReqB>, shared: Arc<HttpShared>) -> Self {
        ResponseFuture {
            state: State::Ready {
                svc: Some(svc),
                req: Some(req),
                permit: None,
            },
            shared,
        }
    }
}

/// The answer to a shed HTTP request.
fn shed_response<B>(overloaded: &Overloaded, status: StatusCode) -> Response<ResponseBody<B>> {
    let status = if overloaded.reason() == ShedReason::TooLarge {
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
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(overloaded.retry_after().as_secs().max(1)),
    );
    response
}

impl<S, ReqB, ResB> Future for ResponseFuture<S, ReqB>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    ResB: http_body::Body,
    ReqB: 'static,
{
    type Output = Result<Response<ResponseBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let shared: &HttpShared = this.shared;
        let wrap = |req: Request<ReqB>, permit: &mut Permit| -> Request<ReqB> {
            let Some(meter) = &shared.policy.meter else {
                return req;
            };
            let Some(rewrap) = meter.downcast_ref::<fn(MeteredBody<ReqB>) -> ReqB>() else {
                return req;
            };
            let body_meter = BodyMeter::new(permit);
            req.map(|body| rewrap(MeteredBody::new(body, body_meter)))
        };
        match ready!(poll_state(this.state, cx, wrap)) {
            Step::Shed(overloaded) => {
                Poll::Ready(Ok(shed_response(&overloaded, shared.policy.status)))
            }
            Step::NotReady(Err(e)) | Step::Finished(Err(e), _) => Poll::Ready(Err(e)),
            Step::NotReady(Ok(_)) => unreachable!("NotReady always carries an error"),
            Step::Finished(Ok(response), permit) => {
                let Some(mut permit) = permit else {
                    return Poll::Ready(Ok(response.map(ResponseBody::unlimited)));
                };
                permit.set_outcome((shared.policy.classify_outcome)(response.status()));
                if shared.policy.release == PermitRelease::Head {
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
    pub(crate) fn new(admission: Admission, svc: S, req: Req) -> Self {
        TypedResponseFuture {
            state: State::from_admission(admission, svc, req),
        }
    }

    pub(crate) fn bypass(svc: S, req: Req) -> Self {
        TypedResponseFuture {
            state: State::Ready {
                svc: Some(svc),
                req: Some(req),
                permit: None,
            },
        }
    }
}

impl<S, Req> Future for TypedResponseFuture<S, Req>
where
    S: Service<Req>,
    S::Error: Into<crate::BoxError>,
{
    type Output = Result<S::Response, crate::BoxError>;

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
