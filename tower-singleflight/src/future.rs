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
    }
}

/// The `x-singleflight` value to add, when the debug header is on.
type Label = Option<&'static str>;

pin_project! {
    // The states a bypass or a leader goes through are kept small and free of reference
    // counts, so that those paths cost next to nothing; a follower's state is boxed.
    #[project = StateProj]
    enum State<S, ReqB, K>
    where
        S: Service<Request<ReqB>>,
        K: Hash,
        K: Eq,
    {
        // The inner service's own call: a bypass, or a follower's fallback.
        Direct { #[pin] fut: S::Future, label: Label },
        // The leader (or a caller running alone after an overflow).
        Lead { run: Run<FlightKey<K>, Outcome>, label: Label },
        // A follower: waits for the flight, keeping its request for a call of its own.
        Follow { follow: Pin<Box<Following<S, ReqB, K>>> },
        // A follower making its own call: waiting for the service to be ready.
        Fallback { fallback: Box<(S, Option<Request<ReqB>>)>, label: Label },
        // A response of the layer's own (`503` overflow, `504` wait timeout).
        Immediate { status: StatusCode, label: Label },
        // A micro-cache hit.
        Cached { hit: Option<CacheHit>, head_only: bool, counters: Arc<Counters>, label: Label },
    }
}

pin_project! {
    /// What a follower keeps while it waits.
    struct Following<S, ReqB, K>
    where
        K: Hash,
        K: Eq,
    {
        run: Run<FlightKey<K>, Outcome>,
        #[pin]
        deadline: Option<Sleep>,
        svc: Option<S>,
        req: Option<Request<ReqB>>,
        head_only: bool,
        config: Arc<Config>,
        counters: Arc<Counters>,
    }
}

impl<S, ReqB, K> ResponseFuture<S, ReqB, K>
where
    S: Service<Request<ReqB>>,
    K: Hash + Eq,
{
    fn new(state: State<S, ReqB, K>) -> Self {
        Self { state }
    }

    pub(crate) fn direct(fut: S::Future, config: &Config, label: &'static str) -> Self {
        Self::new(State::Direct {
            fut,
            label: config.label(label),
        })
    }

    pub(crate) fn lead(
        run: Run<FlightKey<K>, Outcome>,
        config: &Config,
        label: &'static str,
    ) -> Self {
        Self::new(State::Lead {
            run,
            label: config.label(label),
        })
    }

    pub(crate) fn follow(
        run: Run<FlightKey<K>, Outcome>,
        svc: S,
        req: Request<ReqB>,
        head_only: bool,
        shared: &Shared<K>,
    ) -> Self {
        let deadline = shared.config.max_wait.map(tokio::time::sleep);
        Self::new(State::Follow {
            follow: Box::pin(Following {
                run,
                deadline,
                svc: Some(svc),
                req: Some(req),
                head_only,
                config: Arc::clone(&shared.config),
                counters: Arc::clone(&shared.counters),
            }),
        })
    }

    #[cfg(feature = "micro-cache")]
    pub(crate) fn cached(hit: CacheHit, head_only: bool, shared: &Shared<K>) -> Self {
        Self::new(State::Cached {
            hit: Some(hit),
            head_only,
            counters: Arc::clone(&shared.counters),
            label: shared.config.label("cache"),
        })
    }

    pub(crate) fn rejected(config: &Config) -> Self {
        Self::new(State::Immediate {
            status: StatusCode::SERVICE_UNAVAILABLE,
            label: config.label("layer"),
        })
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

    #[inline]
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            let next = match this.state.as_mut().project() {
                StateProj::Direct { fut, label } => {
                    let response = ready!(fut.poll(cx)).map_err(Into::into)?;
                    let response = response.map(SingleflightBody::inner);
                    return Poll::Ready(Ok(labelled(response, *label)));
                }
                StateProj::Lead { run, label } => {
                    let outcome = ready!(Pin::new(&mut *run).poll(cx)).map_err(BoxError::from)?;
                    return Poll::Ready(lead_response(&outcome, run.was_alone(), *label));
                }
                StateProj::Follow { follow } => {
                    let f = follow.as_mut().project();
                    let (config, counters) = (&**f.config, &**f.counters);
                    let timed_out = f
                        .deadline
                        .as_pin_mut()
                        .is_some_and(|d| d.poll(cx).is_ready());
                    let fallback = |svc: &mut Option<S>, req: &mut Option<Request<ReqB>>| {
                        counters.fallback();
                        State::Fallback {
                            fallback: Box::new((
                                svc.take().expect("a follower keeps its service"),
                                req.take(),
                            )),
                            label: config.label("fallback"),
                        }
                    };
                    if timed_out {
                        counters.wait_timeout();
                        match config.on_wait_timeout {
                            WaitTimeoutPolicy::GatewayTimeout => State::Immediate {
                                status: StatusCode::GATEWAY_TIMEOUT,
                                label: config.label("layer"),
                            },
                            WaitTimeoutPolicy::OwnCall => fallback(f.svc, f.req),
                        }
                    } else {
                        let outcome =
                            ready!(Pin::new(&mut *f.run).poll(cx)).map_err(BoxError::from)?;
                        let request = f.req.as_ref().expect("a follower keeps its request");
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
                                    let body = if *f.head_only {
                                        SingleflightBody::empty()
                                    } else {
                                        SingleflightBody::shared(fanout.reader())
                                    };
                                    let response = Response::from_parts(head, body);
                                    return Poll::Ready(Ok(labelled(
                                        response,
                                        config.label("follower"),
                                    )));
                                }
                                counters.bypass(BypassReason::VaryMismatch);
                                fallback(f.svc, f.req)
                            }
                            OutcomeKind::NotShared { .. } => fallback(f.svc, f.req),
                            OutcomeKind::Failed { shared, .. } => {
                                if outcome.try_retry() {
                                    fallback(f.svc, f.req)
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
                StateProj::Fallback { fallback, label } => {
                    let (svc, req) = &mut **fallback;
                    ready!(svc.poll_ready(cx)).map_err(Into::into)?;
                    let req = req.take().expect("polled after completion");
                    State::Direct {
                        fut: svc.call(req),
                        label: *label,
                    }
                }
                StateProj::Cached {
                    hit,
                    head_only,
                    counters,
                    label,
                } => {
                    let hit = hit.take().expect("polled after completion");
                    return Poll::Ready(Ok(labelled(
                        cached_response(&hit, *head_only, counters),
                        *label,
                    )));
                }
                StateProj::Immediate { status, label } => {
                    let mut response = Response::new(SingleflightBody::empty());
                    *response.status_mut() = *status;
                    return Poll::Ready(Ok(labelled(response, *label)));
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
    label: Label,
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
                return Ok(labelled(response.map(SingleflightBody::inner), label));
            }
            match shared.fanned_out::<B>() {
                Some((head, fanout)) => {
                    let body = SingleflightBody::shared(fanout.reader());
                    Ok(labelled(Response::from_parts(head, body), label))
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
                Some(Ok(response)) => Ok(labelled(response.map(SingleflightBody::inner), label)),
                // Only the leader takes it, once; anything else is a bug, not a hang.
                _ => Err("singleflight: the leader's response was already taken".into()),
            }
        }
        OutcomeKind::Failed { shared, .. } => Err(SharedError::from_arc(Arc::clone(shared)).into()),
    }
}

#[inline]
fn labelled<B>(mut response: Response<B>, label: Label) -> Response<B> {
    if let Some(label) = label {
        response
            .headers_mut()
            .insert(DEBUG_HEADER, HeaderValue::from_static(label));
    }
    response
}
