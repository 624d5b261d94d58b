//! What one flight of the HTTP layer produces, and the share-time safety checks.

use std::{
    any::Any,
    future::Future,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
};

use http::{
    header::{CACHE_CONTROL, SET_COOKIE, VARY},
    response::Parts,
    HeaderMap, Response,
};
use http_body::Body;

use crate::{
    body::{BoxBody, Fanout, IntoBytes},
    error::BoxError,
    layer::{Config, ErrorPolicy},
    stats::{BypassReason, Counters},
};

/// The value of a flight, cloned (an `Arc`) into every waiter.
#[derive(Clone)]
pub(crate) struct Outcome(pub(crate) Arc<OutcomeKind>);

// One per flight, behind an `Arc`: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum OutcomeKind {
    /// The leader's response may be shared.
    Shared(SharedResponse),
    /// The response belongs to the leader alone; followers make their own calls.
    NotShared {
        /// The leader's response (a `Response<B>`), taken by the leader if it still waits.
        response: Mutex<Option<Box<dyn Any + Send>>>,
    },
    /// The call failed.
    Failed {
        /// The error, shared by the leader and every follower.
        shared: Arc<BoxError>,
        /// How many followers may still retry (under [`ErrorPolicy::Retry`]).
        retries_left: AtomicUsize,
    },
}

/// A shareable response: kept whole until someone other than a lone leader needs it, then
/// split into a head to copy and a body to fan out.
pub(crate) struct SharedResponse {
    share: Mutex<Share>,
    /// The leader's request headers, to check each follower against `Vary`.
    pub(crate) leader_headers: HeaderMap,
    /// The leader's flight span, kept open so followers can link to it.
    #[cfg(feature = "tracing")]
    pub(crate) span: tracing::Span,
    config: Arc<Config>,
    counters: Arc<Counters>,
}

enum Share {
    /// The leader's `Response<B>`, untouched.
    Whole {
        response: Box<dyn Any + Send>,
        #[cfg(feature = "micro-cache")]
        store: Option<CacheStore>,
    },
    /// Split: the head to copy, the body being fanned out.
    FannedOut { head: Parts, fanout: Arc<Fanout> },
    /// Taken by a leader that finished alone.
    Taken,
}

impl SharedResponse {
    /// The whole response, for a leader that finished with nobody else waiting (so nobody
    /// else can ever ask for it): no copy, no fan-out. `None` once it was split, or when
    /// the micro-cache wants the body.
    pub(crate) fn take_whole<B: 'static>(&self) -> Option<Response<B>> {
        let mut share = self.share.lock().unwrap_or_else(|p| p.into_inner());
        #[cfg(feature = "micro-cache")]
        if let Share::Whole { store: Some(_), .. } = &*share {
            return None;
        }
        if !matches!(&*share, Share::Whole { .. }) {
            return None;
        }
        let Share::Whole { response, .. } = std::mem::replace(&mut *share, Share::Taken) else {
            unreachable!("checked above")
        };
        response.downcast::<Response<B>>().ok().map(|r| *r)
    }

    /// A copy of the head and the body's fan-out, splitting the response on first use.
    pub(crate) fn fanned_out<B>(&self) -> Option<(Parts, Arc<Fanout>)>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let mut share = self.share.lock().unwrap_or_else(|p| p.into_inner());
        if let Share::Whole { .. } = &*share {
            let Share::Whole {
                response,
                #[cfg(feature = "micro-cache")]
                store,
            } = std::mem::replace(&mut *share, Share::Taken)
            else {
                unreachable!("checked above")
            };
            let response = response.downcast::<Response<B>>().ok()?;
            let (head, body) = response.into_parts();
            let body: BoxBody = Box::pin(IntoBytes::new(body));
            let fanout = Fanout::new(
                body,
                self.config.max_shared_body,
                self.config.lag_timeout,
                Arc::clone(&self.counters),
            );
            #[cfg(feature = "micro-cache")]
            if let (Some(store), Some(cache)) = (store, &self.config.cache) {
                let fresh_for = crate::cache::freshness(&head.headers, cache.linger);
                if !fresh_for.is_zero() {
                    let (head, leader_headers) = (head.clone(), self.leader_headers.clone());
                    let cache = *cache;
                    fanout.on_complete(Box::new(move |chunks, trailers| {
                        let bytes = chunks.iter().map(bytes::Bytes::len).sum();
                        if !cache.admits(bytes) {
                            return;
                        }
                        store(Arc::new(crate::cache::Cached {
                            head,
                            leader_headers,
                            chunks,
                            trailers,
                            bytes,
                            expires_at: tokio::time::Instant::now() + fresh_for,
                        }));
                    }));
                }
            }
            *share = Share::FannedOut { head, fanout };
        }
        match &*share {
            Share::FannedOut { head, fanout } => Some((head.clone(), Arc::clone(fanout))),
            _ => None,
        }
    }
}

impl Outcome {
    /// Takes one retry permit, if the error policy still allows one.
    pub(crate) fn try_retry(&self) -> bool {
        match &*self.0 {
            OutcomeKind::Failed { retries_left, .. } => retries_left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok(),
            _ => false,
        }
    }
}

/// Stores a finished response in the micro-cache under the flight's key.
#[cfg(feature = "micro-cache")]
pub(crate) type CacheStore = Box<dyn FnOnce(Arc<crate::cache::Cached>) + Send>;

/// The shared work of a flight: the leader's call, then the share-time checks.
pub(crate) async fn work<F, B, E>(
    call: F,
    leader_headers: HeaderMap,
    config: Arc<Config>,
    counters: Arc<Counters>,
    #[cfg(feature = "tracing")] span: tracing::Span,
    #[cfg(feature = "micro-cache")] store: Option<CacheStore>,
) -> Outcome
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let kind = match call.await {
        Err(err) => OutcomeKind::Failed {
            shared: Arc::new(err.into()),
            retries_left: AtomicUsize::new(match config.errors {
                ErrorPolicy::Share => 0,
                ErrorPolicy::Retry { max } => max,
            }),
        },
        Ok(response) => match refusal(response.headers(), response.status(), &config) {
            Some(reason) => {
                counters.bypass(reason);
                OutcomeKind::NotShared {
                    response: Mutex::new(Some(Box::new(response))),
                }
            }
            None => OutcomeKind::Shared(SharedResponse {
                share: Mutex::new(Share::Whole {
                    response: Box::new(response),
                    #[cfg(feature = "micro-cache")]
                    store,
                }),
                leader_headers,
                #[cfg(feature = "tracing")]
                span,
                config,
                counters,
            }),
        },
    };
    Outcome(Arc::new(kind))
}

/// Why a response must not be shared, if it must not.
pub(crate) fn refusal(
    headers: &HeaderMap,
    status: http::StatusCode,
    config: &Config,
) -> Option<BypassReason> {
    if !config.status_allowed(status) {
        return Some(BypassReason::Status);
    }
    if headers.contains_key(SET_COOKIE) {
        return Some(BypassReason::SetCookie);
    }
    let private = directives(headers, &CACHE_CONTROL).any(|d| {
        let name = d.split('=').next().unwrap_or("").trim();
        ["private", "no-store", "no-cache"]
            .iter()
            .any(|p| name.eq_ignore_ascii_case(p))
    });
    if private {
        return Some(BypassReason::CacheControl);
    }
    if directives(headers, &VARY).any(|d| d == "*") {
        return Some(BypassReason::VaryStar);
    }
    None
}

/// Whether a follower's request agrees with the leader's on every header the response
/// varies on.
pub(crate) fn vary_matches(response: &HeaderMap, leader: &HeaderMap, follower: &HeaderMap) -> bool {
    directives(response, &VARY).all(|name| {
        leader
            .get_all(name)
            .iter()
            .eq(follower.get_all(name).iter())
    })
}

/// The comma-separated items of every value of `name`, trimmed; unparsable values count as
/// one item that matches nothing sensible (and so never looks shareable).
fn directives<'a>(
    headers: &'a HeaderMap,
    name: &'a http::HeaderName,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("*, no-store").split(','))
        .map(str::trim)
        .filter(|d| !d.is_empty())
}
