//! Request coalescing for tower services: concurrent identical requests run the inner
//! service once, and every waiter gets the response, **streamed as it arrives**.
//!
//! The crate has two layers:
//!
//! - [`Group`], a runtime-agnostic core usable without HTTP: `group.run(key, || future)`.
//! - [`SingleflightLayer`] / [`Singleflight`], HTTP middleware on top of it, with no
//!   `Clone` bound on the response body and safety rules on by default.
//!
//! # The model
//!
//! Calls with equal keys made while a call for that key is in flight form one **flight**.
//! The first call is the **leader**: its closure creates the work. The others are
//! **followers**: they wait for the same output.
//!
//! - **The work belongs to the flight, not to a caller.** It keeps running while at least
//!   one caller (leader or follower) waits, and is dropped, which cancels it, when the last
//!   one leaves. A leader whose client disconnects therefore neither fails its followers
//!   nor makes them redo the work one at a time.
//! - **The callers drive the work themselves; no task is spawned.** One waiting caller, the
//!   *driver*, polls the shared future, with a waker of the flight's: when the future wakes
//!   it, the flight wakes the driver only. When the driver leaves, another waiter becomes
//!   driver (and is woken if a wake-up was pending). So the core runs on any executor, and
//!   needs no `'static` spawner. The work progresses while some caller is polled, which is
//!   always the case while anybody waits for it.
//! - **Every other waiter is woken exactly once**, when the work finishes. Nobody polls on
//!   a timer or wakes itself in a loop.
//! - **A panic** in the work (or in the closure creating it) becomes a [`FlightError`] for
//!   every waiter, the key is freed, and the process goes on. It never hangs or aborts.
//! - **Sharded state**: the key map is split into independently locked shards (by default
//!   four per CPU), so unrelated keys rarely contend; nothing else is shared between them
//!   (no global counter, unless `max_keys` is set). A key is hashed once per call, with a
//!   keyed SipHash, since keys are often chosen by clients. No lock is held while user code
//!   runs. A flight allocates itself and its boxed work, nothing more, until someone joins.
//! - **Bounds** ([`GroupBuilder`]): a maximum flight age after which the next caller
//!   starts a new flight, a maximum number of waiters per key and of keys in flight, and
//!   an [`OverflowPolicy`] (run unshared, or reject).
//!
//! ```
//! use tower_singleflight::Group;
//!
//! # futures::executor::block_on(async {
//! let group: Group<String, u64> = Group::new();
//! let load = |id: &str| {
//!     group.run(id.to_owned(), || async {
//!         // An expensive lookup, run once however many callers ask at the same time.
//!         42
//!     })
//! };
//! let (a, b) = futures::join!(load("user:7"), load("user:7"));
//! assert_eq!((a.unwrap(), b.unwrap()), (42, 42));
//! # });
//! ```
//!
//! # The HTTP layer
//!
//! The leader calls the inner service. When its response head arrives, the layer checks
//! whether the response may be shared. If so, every waiter gets a copy of the head
//! (`http::response::Parts` is `Clone`) and a body that **replays the leader's body frame
//! by frame as it arrives**; the body is never collected first, and it need not be
//! `Clone`. If not, the leader gets its response and the followers make their own calls,
//! **in parallel**.
//!
//! ## Streaming to every waiter
//!
//! The leader's body is pulled once and its `Bytes` frames go into a replay buffer of at
//! most [`max_shared_body`](SingleflightLayer::max_shared_body) bytes (default 8 MiB). Each
//! waiter reads from the buffer at its own pace; whichever reader reaches the end of what
//! is buffered pulls the next frame. Policy:
//!
//! - Frames are kept while the buffer is below its bound (so a waiter that starts reading
//!   late still gets the whole body), then dropped once every reader has read them.
//! - When the buffer is full because the slowest reader still needs its oldest frame, the
//!   faster readers wait for it for at most [`lag_timeout`](SingleflightLayer::lag_timeout)
//!   (default 1 s). Then every reader still needing that frame is **cut off**: its body
//!   ends with the [`Lagged`](error::Lagged) error, never with a clean (truncated) end.
//!   A slow client can thus delay the others by at most `lag_timeout` each time it holds
//!   the buffer up, and never by more than that in total before it is cut off.
//! - A body larger than the buffer is still shared as long as the readers keep within
//!   `max_shared_body` of each other.
//! - If the leader's body fails midway, every reader gets the error
//!   ([`SharedError`](error::SharedError)) after the frames before it: none sees a clean end.
//! - The leader's own client is just one reader: if it disconnects, the others go on.
//! - The leader's `is_end_stream` and `size_hint` are forwarded (the hint less what each
//!   reader has read).
//!
//! ## Safety rules, and how to opt out of each
//!
//! Checked **when a request arrives**:
//!
//! | Rule | Default | Opt-out |
//! |---|---|---|
//! | Only `GET` and `HEAD` join flights; a `HEAD` may join a `GET` flight and gets the head only | on | none |
//! | Requests with `Authorization` or `Cookie` never coalesce | on | [`CredentialPolicy::Partition`]: coalesce only with requests with identical credentials (compared by a 128-bit keyed hash) |
//! | `Range` / `If-Range` requests bypass | on | [`HeaderPolicy::Key`] via [`range`](SingleflightLayer::range): key on those values (and allow `206`) |
//! | Conditional requests (`If-None-Match`, `If-Modified-Since`, `If-Match`, `If-Unmodified-Since`) bypass | on | [`HeaderPolicy::Key`] via [`conditional`](SingleflightLayer::conditional): key on them (and allow `304`) |
//!
//! Checked **when the leader's response head arrives**, before anyone else sees it. A
//! response that fails one is **not shared**; its followers make their own calls, all at
//! once:
//!
//! | Rule | Opt-out |
//! |---|---|
//! | `Set-Cookie` | none: a response that sets a cookie belongs to one client |
//! | `Cache-Control: private`, `no-store` or `no-cache` | none: change the response instead |
//! | `Vary: *` | none |
//! | Status outside the allowed set (by default the RFC 9111 heuristically cacheable ones: 200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501) | [`allowed_status`](SingleflightLayer::allowed_status) |
//! | `Vary: a, b`: each follower's `a` and `b` must equal the leader's, or it makes its own call | key on those headers with [`DefaultKey::with_headers`] so they never meet |
//!
//! ## Keys
//!
//! A flight key is structured data: whether the request is `HEAD`, the credential
//! partition, the keyed `Range`/conditional headers, and a resource key. The resource key
//! is by default a [`RequestKey`] (scheme, authority from the URI or `Host`, path, query,
//! and chosen headers); a [`KeyFn`] (any `Fn(&Uri, &HeaderMap) -> Option<K>`) replaces it,
//! and returning `None` bypasses. A custom key can never merge two users or a `GET` with a
//! `HEAD`: the layer adds those parts itself. The key function runs right after the method
//! check, so a request on a route it leaves out skips the header rules (and is counted as
//! [`BypassReason::NoKey`]): putting the layer in front of a whole app costs such routes
//! next to nothing.
//!
//! ## Timeouts, bounds, errors
//!
//! - [`max_wait`](SingleflightLayer::max_wait): a follower waits at most this long for the
//!   leader's head, then makes its own call or answers `504` ([`WaitTimeoutPolicy`]).
//! - [`max_age`](SingleflightLayer::max_age): an older flight takes no new followers.
//! - [`max_followers`](SingleflightLayer::max_followers) per key and
//!   [`max_keys`](SingleflightLayer::max_keys) in flight, with an [`OverflowPolicy`]: run
//!   the request unshared, or answer `503`.
//! - [`errors`](SingleflightLayer::errors): every waiter gets the leader's error as a
//!   [`SharedError`](error::SharedError) whose `source()` is the original, or, with
//!   [`ErrorPolicy::Retry`], up to `max` followers retry with their own calls.
//!
//! The service's error type is [`BoxError`](error::BoxError): the inner service's error (for
//! a bypass or a follower's own call), a `SharedError`, or a [`FlightError`] (the shared
//! call panicked). Under axum, turn them into responses with `HandleErrorLayer`.
//!
//! ## Micro-cache (feature `micro-cache`)
//!
//! `SingleflightLayer::micro_cache(MicroCache::new(linger))` keeps a finished, shareable
//! response for a short `linger` (say one second), so a burst arriving just after a
//! flight ends is served too, like nginx micro-caching. Entries live in a bounded
//! [moka](https://docs.rs/moka) cache (by entries and by bytes). Only responses that passed
//! every share-time check, whose body ended cleanly and fitted in the replay buffer, are
//! kept, for at most their `Cache-Control: s-maxage`/`max-age` (`max-age=0`: not at all).
//! A hit is checked against `Vary` like a follower; a `HEAD` may be served from a `GET`
//! entry.
//!
//! ## Observability
//!
//! [`SingleflightLayer::stats`] returns a [`Stats`] handle: leaders, followers, bypasses by
//! [`BypassReason`], fallbacks (followers that made their own call), wait timeouts, shared
//! errors, lagged readers, micro-cache hits, and keys in flight now.
//! [`debug_header`](SingleflightLayer::debug_header) adds `x-singleflight:
//! leader | follower | bypass | fallback | cache | layer`. With the `tracing` feature, the leader's
//! call runs in a `singleflight.flight` span and each follower's current span gets a
//! follows-from link to it.
//!
//! ## Runtime
//!
//! The core needs no runtime. The HTTP layer uses tokio's timer for `max_wait`,
//! `max_age` and the lag timeout, so it must run inside a tokio runtime with time enabled.
//!
//! # Examples
//!
//! ## axum
//!
//! ```
//! use std::time::Duration;
//!
//! use axum::{error_handling::HandleErrorLayer, http::StatusCode, routing::get, BoxError, Router};
//! use tower::ServiceBuilder;
//! use tower_singleflight::{SingleflightLayer, WaitTimeoutPolicy};
//!
//! let singleflight = SingleflightLayer::new()
//!     .max_wait(Duration::from_secs(5), WaitTimeoutPolicy::OwnCall)
//!     .max_followers(10_000);
//! let stats = singleflight.stats(); // export these as metrics
//!
//! let app = Router::new()
//!     .route("/report", get(|| async { "an expensive report" }))
//!     .layer(
//!         ServiceBuilder::new()
//!             // Top runs first: errors of the layer below become responses.
//!             .layer(HandleErrorLayer::new(|err: BoxError| async move {
//!                 (StatusCode::BAD_GATEWAY, err.to_string())
//!             }))
//!             .layer(singleflight),
//!     );
//! # let _: Router = app;
//! # let _ = stats;
//! ```
//!
//! ## hyper
//!
//! ```no_run
//! use std::convert::Infallible;
//!
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use hyper::{body::Incoming, server::conn::http1};
//! use hyper_util::{rt::TokioIo, service::TowerToHyperService};
//! use tower::ServiceBuilder;
//! use tower_singleflight::SingleflightLayer;
//!
//! async fn expensive(_req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
//!     Ok(Response::new(Full::new(Bytes::from_static(b"computed once"))))
//! }
//!
//! # #[tokio::main]
//! # async fn main() -> std::io::Result<()> {
//! let svc = ServiceBuilder::new()
//!     .layer(SingleflightLayer::new())
//!     .service_fn(expensive);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! loop {
//!     let (stream, _) = listener.accept().await?;
//!     // Every connection's clone shares one flight map.
//!     let svc = TowerToHyperService::new(svc.clone());
//!     tokio::spawn(async move {
//!         let _ = http1::Builder::new()
//!             .serve_connection(TokioIo::new(stream), svc)
//!             .await;
//!     });
//! }
//! # }
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod body;
#[cfg(feature = "micro-cache")]
mod cache;
pub mod error;
mod flight;
pub mod future;
mod group;
mod key;
mod layer;
mod service;
mod share;
mod stats;
mod sync;

#[cfg(all(test, loom))]
mod loom_tests;

pub use crate::body::SingleflightBody;
#[cfg(feature = "micro-cache")]
#[cfg_attr(docsrs, doc(cfg(feature = "micro-cache")))]
pub use crate::cache::MicroCache;
pub use crate::error::FlightError;
pub use crate::group::{Group, GroupBuilder, OverflowPolicy, Role, Run};
pub use crate::key::{DefaultKey, KeyFn, RequestKey};
pub use crate::layer::{
    CredentialPolicy, ErrorPolicy, HeaderPolicy, SingleflightLayer, WaitTimeoutPolicy,
    DEFAULT_LAG_TIMEOUT, DEFAULT_MAX_SHARED_BODY,
};
pub use crate::service::Singleflight;
pub use crate::stats::{BypassReason, Stats};
