//! [`ResponseFuture`]: a request's way through its flight.

use std::{
    fmt,
    future::Future,
    hash::Hash,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
};

use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::{
    body::SingleflightBody,
    error::{BoxError, SharedError},
    group::Run,
    key::FlightKey,
    layer::{Config, Shared, WaitTimeoutPolicy},
    share::{self, Outcome, OutcomeKind},
    stats::{BypassReason, Counters},
};

const DEBUG_HEADER: HeaderName = HeaderName::from_static("x-singleflight");

pin_project! {
    /// The response future of [`Singleflight`](crate::Singleflight).
    ///
    /// Dropping it leaves the flight (the shared call goes on while other requests wait
    /// for it, and stops when none does).
    #[must_use = "futures do nothing unless polled"]
    pub struct ResponseFuture<S, ReqB, K>
    where
        S: Service<Request<ReqB>>,
        K: Hash,
        K: Eq,
    {
        #[pin]
        state: State<S, ReqB, K>,
        config: Arc<Config>,
        counters: Arc<Counters>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqB, K>
    where
        S: Service<Request<ReqB>>,
        K: Hash,
        K: Eq,
    {
        // The inner service's own call: a bypass, or a follower's fallback.
        Direct { #[pin] fut: S::Future, label: &'static str },
        // The leader (or a caller running alone after an overflow).
        Lead { run: Run<FlightKey<K>, Outcome>, label: &'static str },
        // A follower: waits for the flight, keeping its request for a call of its own.
        Follow {
            run: Run<FlightKey<K>, Outcome>,
            #[pin]
            deadline: Option<Sleep>,
            svc: Option<S>,
            req: Option<Request<ReqB>>,
            head_only: bool,
        },
        // A follower making its own call: waiting for the service to be ready.
        Fallback { svc: Option<S>, req: Option<Request<ReqB>> },
        // A response of the layer's own (`503` overflow, `504` wait timeout).
        Immediate { status: StatusCode },
        // A micro-cache hit.
        Cached { hit: Option<CacheHit>, head_only: bool },
    }
}

impl<S, ReqB, K> ResponseFuture<S, ReqB, K>
where
    S: Service<Request<ReqB>>,
    K: Hash + Eq,
{
    fn new(state: State<S, ReqB, K>, shared: &Shared<K>) -> Self {
        Self {
            state,
            config: Arc::clone(&shared.config),
            counters: Arc::clone(&shared.counters),
        }
    }

    pub(crate) fn direct(fut: S::Future, shared: &Shared<K>, label: &'static str) -> Self {
        Self::new(State::Direct { fut, label }, shared)
    }

    pub(crate) fn lead(
        run: Run<FlightKey<K>, Outcome>,
        shared: &Shared<K>,
        label: &'static str,
    ) -> Self {
        Self::new(State::Lead { run, label }, shared)
    }

    pub(crate) fn follow(
        run: Run<FlightKey<K>, Outcome>,
        svc: S,
        req: Request<ReqB>,
        head_only: bool,
        shared: &Shared<K>,
    ) -> Self {
        let deadline = shared.config.max_wait.map(tokio::time::sleep);
        Self::new(
            State::Follow {
                run,
                deadline,
                svc: Some(svc),
                req: Some(req),
                head_only,
            },
            shared,
        )
    }

    #[cfg(feature = "micro-cache")]
    pub(crate) fn cached(hit: CacheHit, head_only: bool, shared: &Shared<K>) -> Self {
        Self::new(
            State::Cached {
                hit: Some(hit),
                head_only,
            },
            shared,
        )
    }

    pub(crate) fn rejected(shared: &Shared<K>) -> Self {
        Self::new(
            State::Immediate {
                status: StatusCode::SERVICE_UNAVAILABLE,
            },
            shared,
        )
    }
}

impl<S, ReqB, K> fmt::Debug for ResponseFuture<S, ReqB, K>
where
    S: Service<Request<ReqB>>,
    K: Hash + Eq,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Direct { .. } => "direct",
            State::Lead { .. } => "lead",
            State::Follow { .. } => "follow",
            State::Fallback { .. } => "fallback",
            State::Immediate { .. } => "immediate",
            State::Cached { .. } => "cached",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl<S, ReqB, K, ResB> Future for ResponseFuture<S, ReqB, K>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: Body + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Into<BoxError>,
    K: Hash + Eq,
{
    type Output = Result<Response<SingleflightBody<ResB>>, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let config = &**this.config;
            let counters = &**this.counters;
            let next = match this.state.as_mut().project() {
                StateProj::Direct { fut, label } => {
                    let response = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let response = response.map(SingleflightBody::inner);
                    return Poll::Ready(Ok(labelled(response, label, config)));
                }
                StateProj::Lead { run, label } => {
                    let outcome = ready!(Pin::new(&mut *run).poll(cx)).map_err(BoxError::from)?;
                    return Poll::Ready(lead_response(&outcome, run.was_alone(), label, config));
                }
                StateProj::Follow {
                    run,
                    deadline,
                    svc,
                    req,
                    head_only,
                } => {
                    let timed_out = deadline.as_pin_mut().is_some_and(|d| d.poll(cx).is_ready());
                    if timed_out {
                        counters.wait_timeout();
                        match config.on_wait_timeout {
                            WaitTimeoutPolicy::GatewayTimeout => State::Immediate {
                                status: StatusCode::GATEWAY_TIMEOUT,
                            },
                            WaitTimeoutPolicy::OwnCall => {
                                counters.fallback();
                                State::Fallback {
                                    svc: svc.take(),
                                    req: req.take(),
                                }
                            }
                        }
                    } else {
                        let outcome = ready!(Pin::new(run).poll(cx)).map_err(BoxError::from)?;
                        let request = req.as_ref().expect("a follower keeps its request");
                        match &*outcome.0 {
                            OutcomeKind::Shared(shared) => {
                                #[cfg(feature = "tracing")]
                                tracing::Span::current().follows_from(&shared.span);
                                let fanned = shared.fanned_out::<ResB>();
                                if let Some((head, fanout)) = fanned.filter(|(head, _)| {
                                    share::vary_matches(
                                        &head.headers,
                                        &shared.leader_headers,
                                        request.headers(),
                                    )
                                }) {
                                    let body = if *head_only {
                                        SingleflightBody::empty()
                                    } else {
                                        SingleflightBody::shared(fanout.reader())
                                    };
                                    let response = Response::from_parts(head, body);
                                    return Poll::Ready(Ok(labelled(response, "follower", config)));
                                }
                                counters.bypass(BypassReason::VaryMismatch);
                                counters.fallback();
                                State::Fallback {
                                    svc: svc.take(),
                                    req: req.take(),
                                }
                            }
                            OutcomeKind::NotShared { .. } => {
                                counters.fallback();
                                State::Fallback {
                                    svc: svc.take(),
                                    req: req.take(),
                                }
                            }
                            OutcomeKind::Failed { shared, .. } => {
                                if outcome.try_retry() {
                                    counters.fallback();
                                    State::Fallback {
                                        svc: svc.take(),
                                        req: req.take(),
                                    }
                                } else {
                                    counters.shared_error();
                                    return Poll::Ready(Err(SharedError::from_arc(Arc::clone(
                                        shared,
                                    ))
                                    .into()));
                                }
                            }
                        }
                    }
                }
                StateProj::Fallback { svc, req } => {
                    let ready_svc = svc.as_mut().expect("polled after completion");
                    ready!(ready_svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("polled after completion");
                    State::Direct {
                        fut: ready_svc.call(req),
                        label: "fallback",
                    }
                }
                StateProj::Cached { hit, head_only } => {
                    let hit = hit.take().expect("polled after completion");
                    return Poll::Ready(Ok(labelled(
                        cached_response(&hit, *head_only, this.counters),
                        "cache",
                        config,
                    )));
                }
                StateProj::Immediate { status } => {
                    let mut response = Response::new(SingleflightBody::empty());
                    *response.status_mut() = *status;
                    return Poll::Ready(Ok(labelled(response, "layer", config)));
                }
            };
            this.state.set(next);
        }
    }
}

#[cfg(feature = "micro-cache")]
type CacheHit = Arc<crate::cache::Cached>;
/// Without the micro-cache there are no hits: never constructed.
#[cfg(not(feature = "micro-cache"))]
#[allow(dead_code)]
struct CacheHit;

#[cfg(feature = "micro-cache")]
fn cached_response<B>(
    hit: &crate::cache::Cached,
    head_only: bool,
    counters: &Arc<Counters>,
) -> Response<SingleflightBody<B>> {
    let body = if head_only {
        SingleflightBody::empty()
    } else {
        let fanout =
            crate::body::Fanout::completed(&hit.chunks, hit.trailers.clone(), Arc::clone(counters));
        SingleflightBody::shared(fanout.reader())
    };
    Response::from_parts(hit.head.clone(), body)
}

#[cfg(not(feature = "micro-cache"))]
fn cached_response<B>(
    _hit: &CacheHit,
    _head_only: bool,
    _counters: &Arc<Counters>,
) -> Response<SingleflightBody<B>> {
    Response::new(SingleflightBody::empty())
}

fn lead_response<B>(
    outcome: &Outcome,
    alone: bool,
    label: &'static str,
    config: &Config,
) -> Result<Response<SingleflightBody<B>>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    match &*outcome.0 {
        OutcomeKind::Shared(shared) => {
            // Nobody else waited: the response is the leader's, untouched.
            if let Some(response) = alone.then(|| shared.take_whole::<B>()).flatten() {
                return Ok(labelled(
                    response.map(SingleflightBody::inner),
                    label,
                    config,
                ));
            }
            match shared.fanned_out::<B>() {
                Some((head, fanout)) => {
                    let body = SingleflightBody::shared(fanout.reader());
                    Ok(labelled(Response::from_parts(head, body), label, config))
                }
                None => Err("singleflight: the leader's response was already taken".into()),
            }
        }
        OutcomeKind::NotShared { response } => {
            let taken = response
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            match taken.map(|r| r.downcast::<Response<B>>()) {
                Some(Ok(response)) => Ok(labelled(
                    response.map(SingleflightBody::inner),
                    label,
                    config,
                )),
                // Only the leader takes it, once; anything else is a bug, not a hang.
                _ => Err("singleflight: the leader's response was already taken".into()),
            }
        }
        OutcomeKind::Failed { shared, .. } => Err(SharedError::from_arc(Arc::clone(shared)).into()),
    }
}

fn labelled<B>(mut response: Response<B>, label: &'static str, config: &Config) -> Response<B> {
    if config.debug_header {
        response
            .headers_mut()
            .insert(DEBUG_HEADER, HeaderValue::from_static(label));
    }
    response
}
