//! A shared concurrency limit with a bounded queue and load shedding for tower services.
//!
//! [`BackpressureLayer`] admits at most `max_in_flight` requests into the service it wraps.
//! Up to `max_queued` more wait in a queue, each for at most `queue_timeout`; everything
//! beyond is shed at once with `503 Service Unavailable` (or `429`, configurable) and a
//! `Retry-After` computed from the current drain rate. The permit is held until the
//! response **body** ends, so streamed responses stay inside the limit, and an optional
//! byte budget bounds the request bodies in flight. One `Arc`'d state, created by the
//! layer, is shared by every clone and every service the layer makes; there is no worker
//! task.
//!
//! ```
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_backpressure::BackpressureLayer;
//!
//! let backpressure = BackpressureLayer::builder(64)   // at most 64 handlers at once
//!     .max_queued(128)                                 // at most 128 waiting
//!     .queue_timeout(Duration::from_millis(500))       // none waiting longer than 500 ms
//!     .bypass(|head| head.uri().path() == "/healthz")  // never limit health checks
//!     .build();
//! let stats = backpressure.handle();                   // gauges, counters, resizing
//!
//! let app: Router = Router::new()
//!     .route("/", get(|| async { "Hello, World!" }))
//!     .route("/healthz", get(|| async { "ok" }))
//!     .layer(backpressure);                            // no HandleErrorLayer needed
//! # let _ = (stats, app);
//! ```
//!
//! # What happens to a request
//!
//! 1. A request the bypass predicate matches goes straight through, uncounted.
//! 2. If a slot is free (and its priority class may use it, and its declared body fits the
//!    byte budget) and nobody of its class is waiting, it is admitted. A request that
//!    reserves no bytes is also admitted past waiters held up only by the byte budget;
//!    bytes themselves go strictly in serving order, so a large body is never starved.
//! 3. Otherwise it is queued if the queue has room; a request whose own deadline cannot be
//!    met at the current drain rate is shed instead
//!    ([`ShedReason::DeadlineUnreachable`]).
//! 4. Otherwise the queue is full, and whoever would be served last is shed
//!    ([`ShedReason::QueueFull`]): the newcomer in FIFO order; in LIFO order the oldest
//!    waiter of its class, whose place it takes. A high-priority newcomer takes the place of
//!    the normal-priority waiter served last.
//! 5. A waiter is admitted when a permit is released: the permit is handed to it directly
//!    (nobody can overtake it), in [`QueueOrder`]. It is shed when its queue timeout or its
//!    deadline passes. If its client leaves, its queue slot is freed at once. Once admitted
//!    it waits for the inner service to be ready again (it was ready when the request
//!    queued); that wait is bounded by the same queue timeout, counted from when the
//!    request queued, and deadline, and a request shed then returns its permit at once.
//! 6. An admitted request keeps its permit until its response body ends or is dropped
//!    ([`PermitRelease::BodyEnd`], the default) or until the head is ready
//!    ([`PermitRelease::Head`]).
//!
//! Waiting happens inside the response future, never in `poll_ready` (which only forwards
//! the inner service's readiness and takes no permit): axum drives readiness inside `call`,
//! and hyper polls readiness on idle keep-alive connections, which would otherwise hold
//! permits. An admitted request is handed to the inner service inside `call` itself; a
//! queued one keeps the readied service (boxed with its request) until it is admitted.
//!
//! # Where to put it in an axum app
//!
//! axum applies a layer lazily: to every route's handler, and again for every connection
//! that `axum::serve(listener, router)` accepts. A limiter whose state is created in
//! `Layer::layer` (tower's `ConcurrencyLimitLayer`, `Buffer`) therefore becomes one limiter
//! per connection, and limits nothing. This layer creates its state when it is *built*, so
//! every placement below shares one budget. Each row is checked by
//! `tests/axum_placements.rs` (limit 2 + queue 3, 20 simultaneous 300 ms requests: at most 2
//! inside, at most 3 waiting, exactly 5 served, 15 answered `503` + `Retry-After` at once),
//! both in-process under paused time and through `axum::serve` over real sockets.
//!
//! | Placement | One shared budget | What it covers |
//! |---|---|---|
//! | `Router::layer(layer)` | yes | every route, including the fallback (404s count) |
//! | `Router::route_layer(layer)` | yes | matched routes only; 404s are never limited |
//! | `get(handler).layer(layer)` (`MethodRouter::layer`) | yes | that route only: give an expensive route its own budget |
//! | `axum::serve(listener, router)` with any of the above | yes | (tower's `ConcurrencyLimitLayer` admits all 10 of 10 here) |
//! | whole app: `ServiceBuilder::new().map_response(IntoResponse::into_response).layer(layer).service(router)` | yes | everything, before routing; shed requests cost least |
//!
//! Guidance:
//!
//! - **Outermost is cheapest.** Put it outside anything that does work per request (body
//!   buffering, decompression, auth lookups): a shed request should cost almost nothing.
//!   Keep tracing and metrics *outside* it so shed requests are still observed.
//! - **Timeouts go inside.** A `TimeoutLayer` inside this one releases the permit when it
//!   fires, and its `504`/`408` feeds an adaptive limit as overload.
//! - **Cancellation and deadlines go outside.** Put `tower-abort` in front so
//!   [`BackpressureBuilder::deadline`] can read the request's deadline from its signal in
//!   the extensions.
//! - **Separate budgets are separate layers.** Build one layer per budget (say, one for
//!   `/search`, one for the rest); clones of one layer always share.
//! - The response body type becomes [`ResponseBody<B>`]; `Router::layer` converts it back
//!   for you, and for the whole-app placement `map_response(IntoResponse::into_response)`
//!   does (as above) so `axum::serve` accepts it.
//!
//! # How to choose the limits
//!
//! - **`max_in_flight`**: the concurrency at which your service is at its throughput knee,
//!   by Little's law `throughput × service time` at that point (for example 2,000 req/s ×
//!   25 ms = 50). Above it, requests only queue inside your process, where they cost
//!   memory and add latency. If you do not know it, or it moves, use
//!   [`LimitStrategy::Aimd`] with a latency threshold or [`LimitStrategy::Gradient`] and let
//!   the limit find it; `max_in_flight` is then the starting point.
//! - **`max_queued`**: enough to absorb bursts without a standing queue; a waiter adds one
//!   service time per `max_in_flight` ahead of it, so `max_queued ≈ max_in_flight ×
//!   (latency you accept on top / service time)`. The default equals `max_in_flight`.
//! - **`queue_timeout`**: below your clients' timeout (work for a client that left is
//!   wasted). Default 1 s. With [`QueueOrder::adaptive`], sustained overload switches to
//!   LIFO with a 5 ms bound, so the queue stops adding latency at all.
//! - **`max_request_bytes`**: the memory you are willing to spend on request bodies at
//!   once. Reservations use `Content-Length`; meter chunked bodies with
//!   [`BackpressureBuilder::meter_bodies_with`]. Bytes go in serving order, so a large
//!   upload waiting for bytes holds up smaller bodies (not bodiless requests); give large
//!   uploads their own layer if that matters.
//! - **Priorities**: reserve a share ([`BackpressureBuilder::high_priority_share`]) for
//!   traffic that must get through under overload; bypass only what is trivially cheap.
//!
//! # Errors
//!
//! The HTTP service ([`Backpressure`]) keeps its inner service's error type and answers
//! shed requests itself, so with axum it is `Infallible`. Services of other request types
//! use [`TypedBackpressure`] (from [`BackpressureBuilder::build_typed`]), whose shed
//! requests fail with a boxed [`Overloaded`] carrying the [`ShedReason`], the limit and the
//! retry delay.
//!
//! # Observability
//!
//! [`BackpressureHandle`] reads in-flight, queued, limit, bytes in flight, shed counts by
//! reason, peaks, and queue-wait and service-time [`Summary`]s, and can resize the limit or
//! close the limiter at run time.
//!
//! # Bodies
//!
//! [`channel_body`] builds a response body fed through a buffer bounded in bytes: the
//! producer waits at the high-water mark and fails once the client is gone, like Node's
//! `pipe()`.
//!
//! # Cancellation safety
//!
//! Dropping a response future or body at any point returns whatever it held: a queue slot
//! (at once), a permit handed to it but not yet observed (passed to the next waiter), a
//! permit and its byte reservation. A panic in the inner service unwinds through the same
//! drops. The queue, its lock-free fast path and the channel body are modelled with loom
//! (`src/tests/loom_*.rs`).

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod acquire;
pub mod adaptive;
mod body;
mod builder;
mod channel;
mod classify;
pub mod error;
pub mod future;
mod handle;
mod layer;
mod limiter;
mod order;
mod service;
mod stats;
mod sync;

#[cfg(all(test, loom))]
mod tests;

pub use adaptive::{Aimd, Gradient, LimitStrategy, Outcome};
pub use body::{BodyMeter, MeteredBody, ResponseBody};
pub use builder::{BackpressureBuilder, PermitRelease};
pub use channel::{channel_body, BodySender, ChannelBody, Closed, TrySendError};
pub use classify::{Classify, DefaultClassify, RequestClass, RequestHead};
pub use error::{BudgetExceeded, ConfigError, Overloaded, ShedReason};
pub use handle::BackpressureHandle;
pub use layer::{BackpressureLayer, TypedBackpressureLayer};
pub use order::{Priority, QueueOrder};
pub use service::{Backpressure, TypedBackpressure};
pub use stats::Summary;

/// The boxed error type of [`TypedBackpressure`], as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
