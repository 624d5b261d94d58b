//! A per-request cancellation signal for tower services, like the web's `AbortSignal`,
//! Go's `r.Context()` or ASP.NET's `RequestAborted`.
//!
//! [`AbortLayer`] puts an [`AbortSignal`] into every request's extensions. The signal
//! fires exactly once, with an [`AbortReason`], when
//!
//! 1. **the client goes away** ([`ClientGone`](AbortReason::ClientGone)): the response
//!    future is dropped before it completed, or the response body is dropped before its
//!    end (a streaming or SSE response);
//! 2. **a deadline passes** ([`DeadlineExceeded`](AbortReason::DeadlineExceeded)): the
//!    server's [`with_timeout`](AbortLayer::with_timeout), shortened by a deadline the
//!    client sent (`grpc-timeout`, or a header of your choice) if you enable them;
//! 3. **the server shuts down** ([`Shutdown`](AbortReason::Shutdown)): every request signal
//!    descends from an [`AbortRoot`] that your shutdown code cancels when the drain grace
//!    period runs out;
//! 4. **somebody calls [`abort`](AbortSignal::abort)** ([`Explicit`](AbortReason::Explicit)).
//!
//! It never fires for a request that completed normally: a response whose body was read to
//! its end.
//!
//! # The model: a cooperative signal, with drop as the backstop
//!
//! Rust servers cancel a request by dropping its future. That stops the handler at
//! whatever `.await` it was on, which is unsafe for code with "before/after" bookkeeping
//! (a database transaction, a pooled connection mid-query), does not stop tasks or
//! `spawn_blocking` work it started, and tells nobody why.
//!
//! The signal lets work stop at points it chooses. Pass it along, check
//! [`is_aborted`](AbortSignal::is_aborted) between steps or `select!` on
//! [`aborted`](AbortSignal::aborted), and let detached work follow it with
//! [`spawn`](AbortSignal::spawn), [`spawn_blocking`](AbortSignal::spawn_blocking) and
//! [`run_until_aborted`](AbortSignal::run_until_aborted). Outgoing calls follow it through
//! [`PropagateAbortLayer`], which also passes the remaining time on as `grpc-timeout`.
//! Work shared with other requests (a singleflight leader's upstream call) takes
//! [`detached`](AbortSignal::detached) instead, so that one client leaving does not cancel
//! it for everyone.
//!
//! Dropping stays the backstop. A client that goes away still gets its handler dropped by
//! the server; the signal fires as it happens, so the work the handler spawned stops too.
//! For deadlines you choose a [`TimeoutMode`]: [`Cooperative`](TimeoutMode::Cooperative)
//! (the default) fires the signal and lets the handler wind down for a grace period
//! before dropping it; [`Drop`](TimeoutMode::Drop) drops it at once, like tower's
//! `Timeout`. Either way the client gets `504 Gateway Timeout` (configurable with
//! [`with_timeout_status`](AbortLayer::with_timeout_status); never `408`, which means the
//! *client* was slow); a gRPC call gets `grpc-status: 4` (`DEADLINE_EXCEEDED`) when
//! [`with_grpc_timeout`](AbortLayer::with_grpc_timeout) is on. If the response headers were
//! already sent, the body is ended with an [`error::Aborted`] instead.
//!
//! # How the signal relates to tokio-util's `CancellationToken`
//!
//! An [`AbortSignal`] is not a [`CancellationToken`](tokio_util::sync::CancellationToken),
//! and does not contain one: per request it is a single pooled node, which is what keeps the
//! layer's cost at one allocation (see [Cost](#cost)); a token per request would add an
//! allocation, and a lock shared by every request. The server-wide [`AbortRoot`] does hold a
//! token ([`AbortRoot::from_token`], [`AbortRoot::child_token`]). The two meet in both
//! directions, with no task per request:
//!
//! - [`AbortSignal::cancellation_token`] gives a `CancellationToken` that is cancelled when
//!   the signal fires (for any reason), for code and libraries that take one
//!   (`run_until_cancelled`, `with_cancellation_token`). It is made on first use and kept
//!   with the signal, so requests that never ask pay nothing.
//! - [`AbortSignal::from_token`] gives a signal that fires when a token of yours is
//!   cancelled; combine it with the request's signal through [`AbortSignal::any`].
//!
//! What a token lacks, and the signal adds: the [reason](AbortSignal::reason), the
//! [deadline](AbortSignal::deadline), several parents ([`any`](AbortSignal::any)),
//! [`detached`](AbortSignal::detached), and waiters woken exactly once.
//!
//! # What hyper lets us see
//!
//! A client disconnect reaches the signal only when the server drops the request's future
//! or body. With hyper 1.x (and so axum), that depends on the protocol. Each row is checked
//! by a test against a real hyper server on 127.0.0.1 (`tests/hyper_visibility.rs`):
//!
//! | Situation | Seen? | Why |
//! |---|---|---|
//! | HTTP/1, request body fully received (GET, small POST), client closes | yes | hyper reads the socket while the handler runs and sees EOF |
//! | HTTP/1, streaming response (SSE), client closes | yes | hyper notices EOF while writing the body |
//! | HTTP/1, large request body the handler has not read, client closes | **no** | hyper stops reading the socket until the handler reads the body (backpressure), so the FIN is never seen; the handler runs to completion |
//! | HTTP/1, pipelined request queued behind the running one, client closes | **no** | hyper does not look for EOF while unparsed bytes are buffered |
//! | HTTP/1, client half-closes (`shutdown(Write)`) and waits | yes, as a disconnect | hyper's default `half_close(false)` treats the FIN as an abort |
//! | HTTP/2, stream reset (response future or streaming body dropped) or connection closed, even with a large unread request body | **always** | each stream watches for `RST_STREAM` and connection EOF independently of the body |
//!
//! For the two invisible cases, a deadline is the only bound: always set
//! [`with_timeout`](AbortLayer::with_timeout) on routes that accept large bodies.
//!
//! # Examples
//!
//! With axum (feature `axum` for the extractor):
//!
//! ```
//! # #[cfg(feature = "axum")] {
//! use std::time::Duration;
//! use axum::{routing::get, Router};
//! use tower_abort::{AbortLayer, AbortSignal};
//!
//! async fn report(signal: AbortSignal) -> String {
//!     let mut rows = 0;
//!     while rows < 1_000 {
//!         tokio::select! {
//!             reason = signal.aborted() => return format!("stopped after {rows} rows: {reason}"),
//!             _ = tokio::time::sleep(Duration::from_millis(1)) => rows += 1,
//!         }
//!     }
//!     format!("{rows} rows")
//! }
//!
//! let (abort, root) = AbortLayer::pair();
//! let app = Router::new()
//!     .route("/report", get(report))
//!     .layer(abort.with_timeout(Duration::from_secs(10)));
//! // In your graceful-shutdown code, once the drain grace has run out:
//! root.shutdown();
//! # let _: Router = app;
//! # }
//! ```
//!
//! Around a whole app, so that routing and 404s are covered too, as
//! `ServiceBuilder::new().layer(abort).service(app)`; and with a plain hyper service:
//!
//! ```no_run
//! use std::convert::Infallible;
//! use http_body_util::Full;
//! use hyper::{body::Incoming, server::conn::http1, Request, Response};
//! use hyper_util::{rt::TokioIo, service::TowerToHyperService};
//! use tower::{service_fn, ServiceBuilder};
//! use tower_abort::{AbortLayer, AbortSignal};
//!
//! async fn handle(req: Request<Incoming>) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
//!     let signal = req.extensions().get::<AbortSignal>().unwrap().clone();
//!     let work = signal.spawn(async { /* expensive, stops when the client leaves */ 42 });
//!     let body = match work.await {
//!         Ok(n) => n.to_string(),
//!         Err(reason) => reason.to_string(), // nobody will read it if the client left
//!     };
//!     Ok(Response::new(Full::from(body)))
//! }
//!
//! async fn drain_grace_over() {
//!     // Your shutdown logic: a signal, then the graceful-shutdown grace period.
//! #   std::future::pending::<()>().await
//! }
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     let (abort, root) = AbortLayer::pair();
//!     tokio::spawn(async move {
//!         drain_grace_over().await;
//!         root.shutdown(); // every request still running sees AbortReason::Shutdown
//!     });
//!     let service = ServiceBuilder::new().layer(abort).service(service_fn(handle));
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     loop {
//!         let (stream, _) = listener.accept().await?;
//!         let service = TowerToHyperService::new(service.clone());
//!         tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
//!     }
//! }
//! ```
//!
//! # Observability
//!
//! - [`AbortRoot::stats`] counts signals per reason, for an `abort_total{reason}` metric.
//! - With the `tracing` feature, a `debug` event (target `tower_abort`) is emitted at the
//!   moment a request's signal fires, with the reason and the status to log (`499` for a
//!   client that went away), and when a malformed deadline header is ignored.
//! - [`AbortLayer::on_abort`] calls back with an [`AbortEvent`]: method, URI, elapsed time
//!   and [`status`](AbortEvent::status). Since a request whose client went away never gets
//!   a response, this is where a request log writes its `499` line.
//!
//! # Cost
//!
//! Per request on the fast path (no deadline header, the response completes): one
//! allocation, the box the `http` crate makes for every extension value; the signal reuses
//! a node from a small per-thread pool. No lock, no clock read unless a deadline applies,
//! no timer until the handler is first pending; then a request under the server timeout
//! joins a per-thread first-in-first-out deadline list instead of getting a timer of its
//! own. A handler that waits on its signal links one wait cell into one of the root's
//! shards. Figures are in the README and `benches/benches/abort.rs`.
//!
//! # Features
//!
//! - `axum`: `AbortSignal` implements axum's `FromRequestParts` (and the optional form).
//! - `tracing`: the events above.

#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![doc(test(no_crate_inject, attr(deny(warnings, rust_2018_idioms))))]

mod body;
mod deadline;
pub mod error;
mod event;
#[cfg(feature = "axum")]
mod extract;
pub mod future;
mod guard;
mod layer;
#[cfg(all(test, loom))]
mod loom_tests;
mod propagate;
mod reason;
mod root;
mod service;
mod signal;
mod sync;
mod task;
mod timer;
mod wait;

pub use body::AbortBody;
pub use deadline::TimeoutFormat;
pub use event::AbortEvent;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use extract::MissingAbortSignal;
pub use layer::{AbortLayer, TimeoutMode};
pub use propagate::{PropagateAbort, PropagateAbortLayer};
pub use reason::AbortReason;
pub use root::{AbortRoot, AbortStats};
pub use service::Abort;
pub use signal::AbortSignal;
