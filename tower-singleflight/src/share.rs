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
    /// The leader's response may be shared: its head, and its body being fanned out.
    Shared {
        head: Parts,
        fanout: Arc<Fanout>,
        /// The leader's request headers, to check each follower against `Vary`.
        leader_headers: HeaderMap,
        #[cfg(feature = "tracing")]
        span: tracing::Span,
    },
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
            None => {
                let (head, body) = response.into_parts();
                let body: BoxBody = Box::pin(IntoBytes::new(body));
                let fanout =
                    Fanout::new(body, config.max_shared_body, config.lag_timeout, counters);
                #[cfg(feature = "micro-cache")]
                if let (Some(store), Some(cache)) = (store, &config.cache) {
                    let fresh_for = crate::cache::freshness(&head.headers, cache.linger);
                    if !fresh_for.is_zero() {
                        let (head, leader_headers) = (head.clone(), leader_headers.clone());
                        fanout.on_complete(Box::new(move |chunks, trailers| {
                            let bytes = chunks.iter().map(bytes::Bytes::len).sum();
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
                OutcomeKind::Shared {
                    head,
                    fanout,
                    leader_headers,
                    #[cfg(feature = "tracing")]
                    span,
                }
            }
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
