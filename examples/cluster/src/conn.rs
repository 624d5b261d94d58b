//! Serving one connection: HTTP/1.1 and HTTP/2 prior knowledge through hyper-util's auto
//! builder, plus the connection limits hyper does not have in the form we want.
//!
//! # Timers
//!
//! Every connection is in one of four phases, each with at most one deadline:
//!
//! | phase | entered when | deadline | on expiry |
//! | --- | --- | --- | --- |
//! | `Head` | accepted; or (HTTP/1) the first byte of the next request arrives on an idle connection | `--header-timeout` (immediate drain: `--shutdown-idle-timeout`, if shorter) | connection dropped (like hyper and Go: no `408`) |
//! | `Busy` | a request head was parsed (the service was called) | none: handlers are bounded by the abort layer, not here | – |
//! | `Idle` | the last in-flight response body finished or was dropped | `--keep-alive-timeout` (immediate drain: `--shutdown-idle-timeout`, if shorter) | graceful close (HTTP/2: GOAWAY) |
//! | `Closing` | an idle connection was told to close | 1 s | connection dropped |
//!
//! The `Head` deadline starts at accept, so it also bounds a client that sends nothing at all
//! while hyper-util sniffs the protocol version (which has no timeout of its own). hyper's
//! own `header_read_timeout` is switched off: since hyper 1.6 it also restarts when a
//! connection goes idle, which would make the idle limit `min(header, keep-alive)`.
//!
//! Phases are changed by three observers: the service wrapper ([`ConnService`]) when a
//! request arrives, the body wrapper ([`TrackedBody`]) when a response ends, and the IO
//! wrapper ([`TimedIo`]) when bytes arrive on an idle HTTP/1 connection. The driver
//! ([`drive`]) owns one `Sleep`; it is only reset when a deadline moves *earlier* than the
//! armed one, and re-armed lazily when it fires early, so a busy connection pays no timer
//! work per request. Deadlines change inside the connection's poll (after which the driver
//! looks at them), except when an HTTP/2 stream ends on its own task, which wakes the driver.
//!
//! # Drain
//!
//! A worker-wide [`Signal`] is raised by shutdown or rolling restart:
//! - `Gentle` (the old worker of a rolling restart): HTTP/2 gets GOAWAY; an HTTP/1 connection
//!   answers its next request with `Connection: close` and an idle one closes at its
//!   advertised keep-alive deadline. Closing an idle HTTP/1 connection at an arbitrary moment
//!   races with a request the client may be sending; this way a client that honours
//!   `Connection: close` and `Keep-Alive: timeout=N` never loses a request.
//! - `Immediate` (SIGTERM/SIGINT): the same, but the idle timeout of HTTP/1 connections
//!   (and the head timeout of connections that have not sent a request yet) shrinks to
//!   `--shutdown-idle-timeout`, counted from when the phase began: a connection idle for
//!   longer closes at once. hyper's own graceful shutdown would close an HTTP/1 connection
//!   the moment its last response was handed to the kernel, including a response whose
//!   head went out before the drain and so could not say `Connection: close`: the client,
//!   still reading that body, writes its next request into a connection that is being
//!   closed, and loses it. Here it gets the answer, with `Connection: close`.
//! - `Force` (the grace period is over): the connection is dropped.

use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::num::NonZeroU64;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http::header::{HeaderValue, CONNECTION};
use http::{Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tower::util::Oneshot;
use tower::Service;

use crate::cli::ConnConfig;
use crate::metrics::WorkerMetrics;

/// How long an idle connection that was told to close may take to do so.
const CLOSING_GRACE: Duration = Duration::from_secs(1);

/// hyper's `DEFAULT_MAX_HEADERS`.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// `Keep-Alive` is not in `http::header`.
const KEEP_ALIVE: http::HeaderName = http::HeaderName::from_static("keep-alive");

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// ===== impl Settings =====

/// HTTP/2: streams opened and reset by the client before the server accepted them, at
/// once, beyond which the connection is closed with GOAWAY (h2's default, 20).
pub(crate) const H2_MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;
/// HTTP/2: streams the server reset because of client errors, per connection, beyond which
/// the connection is closed with GOAWAY (hyper's default, 1024).
pub(crate) const H2_MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;
/// HTTP/2: response bytes buffered per stream before the handler is made to wait (hyper's
/// default, 400 KiB).
pub(crate) const H2_MAX_SEND_BUF_SIZE: usize = 400 * 1024;

/// Per-worker connection settings, shared by every connection.
#[derive(Debug)]
pub(crate) struct Settings {
    config: ConnConfig,
    keep_alive_header: Option<HeaderValue>,
    builder: auto::Builder<TokioExecutor>,
    signal: Arc<Signal>,
    metrics: Arc<WorkerMetrics>,
}

impl Settings {
    /// The metrics of the worker these connections belong to.
    pub(crate) fn metrics(&self) -> &WorkerMetrics {
        &self.metrics
    }

    /// The worker's current drain level.
    pub(crate) fn signal_level(&self) -> DrainLevel {
        self.signal.level()
    }

    pub(crate) fn new(
        config: ConnConfig,
        signal: Arc<Signal>,
        metrics: Arc<WorkerMetrics>,
    ) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        let keep_alive = !config.keep_alive_timeout.is_zero();
        let mut http1 = builder.http1();
        http1
            .keep_alive(keep_alive)
            // Our driver enforces the header and idle timeouts (see the module docs).
            .header_read_timeout(None)
            .max_buf_size(config.max_head_size);
        // hyper parses into an inline array of its default size (100) unless a limit is
        // set, in which case it allocates and fills one per request: set only when needed.
        if config.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            http1.max_headers(config.max_headers);
        }
        // HTTP/2 limits, explicit so that they are reviewed here rather than inherited from
        // whatever hyper/h2 version is in the lock file.
        builder
            .http2()
            .max_header_list_size(u32::try_from(config.max_head_size).unwrap_or(u32::MAX))
            .max_concurrent_streams(config.h2_max_concurrent_streams)
            // Rapid reset (CVE-2023-44487): streams the client opened and reset before we
            // accepted them; past this many at once the connection gets GOAWAY
            // (ENHANCE_YOUR_CALM).
            .max_pending_accept_reset_streams(H2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            // The other side of it: streams we had to reset because the client misbehaved
            // (e.g. an oversized or malformed header block); past this many, GOAWAY.
            .max_local_error_reset_streams(H2_MAX_LOCAL_ERROR_RESET_STREAMS)
            .max_send_buf_size(H2_MAX_SEND_BUF_SIZE);
        let keep_alive_header = keep_alive.then(|| {
            // Rounded down: the client should give up on the connection before we do.
            // Leaked once per process so cloning it per response is a copy, not a refcount.
            let value: &'static str = Box::leak(
                format!("timeout={}", config.keep_alive_timeout.as_secs()).into_boxed_str(),
            );
            HeaderValue::from_static(value)
        });
        Settings {
            config,
            keep_alive_header,
            builder,
            signal,
            metrics,
        }
    }
}

// ===== impl Signal =====

/// The worker-wide drain signal, observed by every connection.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    level: AtomicU8,
    conns: Mutex<slab_lite::Slab<Arc<AtomicWaker>>>,
}

/// Drain levels, in escalating order; a level never goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum DrainLevel {
    Serving = 0,
    Gentle = 1,
    Immediate = 2,
    Force = 3,
}

impl DrainLevel {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => DrainLevel::Serving,
            1 => DrainLevel::Gentle,
            2 => DrainLevel::Immediate,
            _ => DrainLevel::Force,
        }
    }
}

impl Signal {
    pub(crate) fn level(&self) -> DrainLevel {
        DrainLevel::from_u8(self.level.load(Ordering::Acquire))
    }

    /// Raises the level (never lowers it) and wakes every connection.
    pub(crate) fn raise(&self, level: DrainLevel) {
        let prev = self.level.fetch_max(level as u8, Ordering::AcqRel);
        if prev < level as u8 {
            let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
            for waker in conns.iter() {
                waker.wake();
            }
        }
    }

    fn register(&self, waker: Arc<AtomicWaker>) -> usize {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(waker)
    }

    fn unregister(&self, key: usize) {
        self.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }
}

/// A minimal slab: stable keys, reuse of freed entries.
mod slab_lite {
    #[derive(Debug)]
    pub(crate) struct Slab<T> {
        entries: Vec<Option<T>>,
        free: Vec<usize>,
    }

    impl<T> Default for Slab<T> {
        fn default() -> Self {
            Slab {
                entries: Vec::new(),
                free: Vec::new(),
            }
        }
    }

    impl<T> Slab<T> {
        pub(crate) fn insert(&mut self, value: T) -> usize {
            match self.free.pop() {
                Some(key) => {
                    self.entries[key] = Some(value);
                    key
                }
                None => {
                    self.entries.push(Some(value));
                    self.entries.len() - 1
                }
            }
        }

        pub(crate) fn remove(&mut self, key: usize) {
            if let Some(slot) = self.entries.get_mut(key) {
                if slot.take().is_some() {
                    self.free.push(key);
                }
            }
        }

        pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
            self.entries.iter().flatten()
        }

        #[cfg(test)]
        pub(crate) fn len(&self) -> usize {
            self.entries.len() - self.free.len()
        }
    }
}

// ===== impl ConnState =====

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Head,
    Busy,
    Idle,
    Closing,
}

#[derive(Debug)]
struct Timing {
    phase: Phase,
    /// When `phase` began.
    since: Instant,
    deadline: Option<Instant>,
    in_flight: usize,
}

/// What the driver must do when its timer fires.
#[derive(Debug, PartialEq, Eq)]
enum Expiry {
    /// No request head within the header timeout: drop the connection.
    Head,
    /// Idle too long: close gracefully.
    Idle,
    /// A graceful close took too long: drop the connection.
    Closing,
    /// Nothing expired; sleep until this deadline (or re-check later if `None`).
    NotYet(Option<Instant>),
}

/// State shared by one connection's driver, IO, service and bodies.
#[derive(Debug)]
pub(crate) struct ConnState {
    timing: Mutex<Timing>,
    /// `timing.deadline` as nanoseconds after `epoch` plus one (0 = none), so the driver
    /// reads it on every poll without taking the lock.
    deadline_hint: AtomicU64,
    epoch: Instant,
    header_timeout: Duration,
    keep_alive_timeout: Duration,
    /// Once an immediate drain began, the idle and head timeouts are at most this (so the
    /// idle one is at most `keep_alive_timeout` too; the head one of a connection that has
    /// not sent a request yet does not depend on keep-alive).
    drain_idle_timeout: Duration,
    /// An immediate drain began (set by the driver).
    draining: AtomicBool,
    /// Set while an HTTP/1 connection is idle, so `TimedIo` only locks on the first read.
    idle_h1: AtomicBool,
    h2: AtomicBool,
    requests: AtomicU64,
    close_requested: AtomicBool,
    waker: Arc<AtomicWaker>,
}

impl ConnState {
    fn new(
        header_timeout: Duration,
        keep_alive_timeout: Duration,
        shutdown_idle_timeout: Duration,
        now: Instant,
    ) -> Self {
        ConnState {
            timing: Mutex::new(Timing {
                phase: Phase::Head,
                since: now,
                deadline: Some(now + header_timeout),
                in_flight: 0,
            }),
            deadline_hint: AtomicU64::new(encode_deadline(now, Some(now + header_timeout))),
            epoch: now,
            header_timeout,
            keep_alive_timeout,
            drain_idle_timeout: shutdown_idle_timeout,
            draining: AtomicBool::new(false),
            idle_h1: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            close_requested: AtomicBool::new(false),
            waker: Arc::new(AtomicWaker::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Timing> {
        self.timing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current deadline, without locking.
    fn deadline(&self) -> Option<Instant> {
        match self.deadline_hint.load(Ordering::Acquire) {
            0 => None,
            n => Some(self.epoch + Duration::from_nanos(n - 1)),
        }
    }

    /// Sets the deadline; the caller holds the lock (`t`).
    fn set_deadline(&self, t: &mut Timing, deadline: Option<Instant>) {
        t.deadline = deadline;
        self.deadline_hint
            .store(encode_deadline(self.epoch, deadline), Ordering::Release);
    }

    #[cfg(test)]
    fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// A request head was parsed; returns how many requests this connection has served.
    fn on_request(&self, version: Version) -> u64 {
        if version == Version::HTTP_2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        let mut t = self.lock();
        t.in_flight += 1;
        t.phase = Phase::Busy;
        self.set_deadline(&mut t, None);
        // (`since` only matters for the idle and head phases.)
        self.idle_h1.store(false, Ordering::Relaxed);
        drop(t);
        self.requests.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A response body ended or was dropped.
    fn on_response_done(&self) {
        let mut t = self.lock();
        t.in_flight = t.in_flight.saturating_sub(1);
        if t.in_flight == 0 && t.phase == Phase::Busy {
            let now = Instant::now();
            t.phase = Phase::Idle;
            t.since = now;
            self.set_deadline(&mut t, Some(now + self.limit(self.keep_alive_timeout)));
            let h2 = self.h2.load(Ordering::Relaxed);
            self.idle_h1.store(!h2, Ordering::Relaxed);
            drop(t);
            // HTTP/1 bodies end inside the connection's poll, after which the driver looks
            // at the new deadline anyway. HTTP/2 bodies end on their stream's task: wake the
            // driver, whose armed timer may be later than the new idle deadline.
            if h2 {
                self.waker.wake();
            }
        }
    }

    /// Bytes arrived on an idle HTTP/1 connection: the next request head has started.
    fn on_bytes_while_idle(&self) {
        let mut t = self.lock();
        if t.phase == Phase::Idle {
            let now = Instant::now();
            t.phase = Phase::Head;
            t.since = now;
            self.set_deadline(&mut t, Some(now + self.limit(self.header_timeout)));
        }
        self.idle_h1.store(false, Ordering::Relaxed);
    }

    /// `timeout`, shortened to `drain_idle_timeout` once an immediate drain began.
    fn limit(&self, timeout: Duration) -> Duration {
        if self.draining.load(Ordering::Relaxed) {
            timeout.min(self.drain_idle_timeout)
        } else {
            timeout
        }
    }

    /// An immediate drain began: an idle connection, or one still waiting for a request
    /// head, gets `drain_idle_timeout` from the start of that phase (at once if it has been
    /// in it longer); later phases get it too (see [`limit`](Self::limit)).
    fn on_drain(&self) {
        let mut t = self.lock();
        self.draining.store(true, Ordering::Relaxed);
        if matches!(t.phase, Phase::Idle | Phase::Head) {
            let cap = t.since + self.drain_idle_timeout;
            if t.deadline.map_or(true, |d| cap < d) {
                self.set_deadline(&mut t, Some(cap));
            }
        }
    }

    fn expire(&self, now: Instant) -> Expiry {
        let mut t = self.lock();
        match t.deadline {
            Some(d) if d <= now => match t.phase {
                Phase::Head => Expiry::Head,
                Phase::Idle => {
                    t.phase = Phase::Closing;
                    t.since = now;
                    self.set_deadline(&mut t, Some(now + CLOSING_GRACE));
                    self.idle_h1.store(false, Ordering::Relaxed);
                    Expiry::Idle
                }
                Phase::Closing => Expiry::Closing,
                Phase::Busy => Expiry::NotYet(None),
            },
            other => Expiry::NotYet(other),
        }
    }
}

fn encode_deadline(epoch: Instant, deadline: Option<Instant>) -> u64 {
    deadline.map_or(0, |d| {
        u64::try_from(d.saturating_duration_since(epoch).as_nanos())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    })
}

// ===== impl TimedIo =====

pin_project_lite::pin_project! {
    /// The connection's IO, noticing the first bytes of a request on an idle HTTP/1
    /// connection. Everything else, including vectored writes, is forwarded untouched.
    #[derive(Debug)]
    pub(crate) struct TimedIo<IO> {
        #[pin]
        io: IO,
        state: Arc<ConnState>,
    }
}

impl<IO: AsyncRead> AsyncRead for TimedIo<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let res = this.io.poll_read(cx, buf);
        if buf.filled().len() > before && this.state.idle_h1.load(Ordering::Relaxed) {
            this.state.on_bytes_while_idle();
        }
        res
    }
}

impl<IO: AsyncWrite> AsyncWrite for TimedIo<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

// ===== impl ConnService =====

/// Wraps the application service for one connection: tracks requests for the timers,
/// counts responses, and adds `Keep-Alive` / `Connection: close` on HTTP/1.
#[derive(Debug)]
pub(crate) struct ConnService<S> {
    /// The connection's own copy of the application, called in place: hyper calls with
    /// `&self`, and a clone per request would bump every `Arc` in the layer stack twice.
    /// The lock is never contended (hyper calls from the connection's task) and never
    /// held across an await.
    inner: Mutex<S>,
    state: Arc<ConnState>,
    settings: &'static Settings,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for ConnService<S>
where
    S: Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody<B>>;
    type Error = Infallible;
    type Future = ConnFuture<S>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let version = req.version();
        let served = self.state.on_request(version);
        let last = self
            .settings
            .config
            .max_requests_per_connection
            .is_some_and(|max: NonZeroU64| served >= max.get());
        if last {
            // The driver sends GOAWAY on HTTP/2; HTTP/1 also gets `Connection: close` below.
            self.state.close_requested.store(true, Ordering::Release);
        }
        let h1_keep_alive = match version {
            Version::HTTP_11 => !connection_has(&req, "close"),
            Version::HTTP_10 => connection_has(&req, "keep-alive"),
            _ => false,
        };
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        ConnFuture {
            inner: Call::start(&mut inner, req),
            guard: Some(InFlight(self.state.clone())),
            settings: self.settings,
            http1: matches!(version, Version::HTTP_10 | Version::HTTP_11),
            h1_keep_alive,
            last,
        }
    }
}

fn connection_has<B>(req: &Request<B>, token: &str) -> bool {
    let lists = |v: &HeaderValue| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let headers = req.headers();
    if headers.len() <= SCAN_HEADERS {
        headers.iter().any(|(n, v)| n == CONNECTION && lists(v))
    } else {
        headers.get_all(CONNECTION).iter().any(lists)
    }
}

/// Up to this many header values, finding one by comparing names in order is cheaper than
/// hashing the name for the map's index (`callgrind`, `GET /` from `wrk`: about 90 fewer
/// instructions per request).
const SCAN_HEADERS: usize = 8;

/// Whether `headers` has `name`; see [`SCAN_HEADERS`].
fn has_header(headers: &http::HeaderMap, name: &http::header::HeaderName) -> bool {
    if headers.len() <= SCAN_HEADERS {
        headers.keys().any(|n| n == name)
    } else {
        headers.contains_key(name)
    }
}

pin_project_lite::pin_project! {
    /// The application's response future, started as early as possible.
    ///
    /// Between handing a request to the service and polling its response future, hyper
    /// probes the socket for end of stream, reading into its buffer. A request still held
    /// then (as a lazy [`Oneshot`] would hold it) shares that buffer, so hyper has to
    /// allocate a fresh one for every request; calling the service at once, when it is
    /// ready, lets a handler drop the request first.
    #[project = CallProj]
    enum Call<S: Service<Request<Incoming>>> {
        Called { #[pin] fut: S::Future },
        // Boxed: it holds the request and a copy of the whole stack, and is rare.
        Waiting { fut: Pin<Box<Oneshot<S, Request<Incoming>>>> },
        Failed { error: Option<BoxError> },
    }
}

impl<S> Call<S>
where
    S: Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    fn start(service: &mut S, req: Request<Incoming>) -> Self
    where
        S: Clone,
    {
        // A no-op waker is enough: a service that is not ready goes on waiting in
        // `Oneshot`, which asks again with the waker of the task polling the response.
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match service.poll_ready(&mut cx) {
            Poll::Ready(Ok(())) => Call::Called {
                fut: service.call(req),
            },
            Poll::Ready(Err(e)) => {
                // tower: a service whose readiness failed is to be discarded; the next
                // request gets a fresh copy (clones reset per-instance readiness).
                *service = service.clone();
                Call::Failed {
                    error: Some(e.into()),
                }
            }
            Poll::Pending => {
                // The copy just polled may hold what its `poll_ready` reserved or queued
                // for (tower's `ConcurrencyLimit`: a permit, or a place in the semaphore's
                // queue that is later handed a permit). It waits in `Oneshot`, so the
                // reservation is used or released with this request; left here, it would
                // sit unused until this connection's next request, or forever.
                let fresh = service.clone();
                Call::Waiting {
                    fut: Box::pin(Oneshot::new(std::mem::replace(service, fresh), req)),
                }
            }
        }
    }
}

impl<S> Future for Call<S>
where
    S: Service<Request<Incoming>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            CallProj::Called { fut } => fut.poll(cx).map_err(Into::into),
            CallProj::Waiting { fut } => fut.as_mut().poll(cx).map_err(Into::into),
            CallProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion")))
            }
        }
    }
}

/// Marks one request in flight until dropped.
#[derive(Debug)]
struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.on_response_done();
    }
}

pin_project_lite::pin_project! {
    /// Response future of [`ConnService`].
    #[must_use = "futures do nothing unless polled"]
    pub(crate) struct ConnFuture<S: Service<Request<Incoming>>> {
        #[pin]
        inner: Call<S>,
        guard: Option<InFlight>,
        settings: &'static Settings,
        http1: bool,
        h1_keep_alive: bool,
        last: bool,
    }
}

impl<S, B> Future for ConnFuture<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<TrackedBody<B>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut res = match ready!(this.inner.poll(cx)) {
            Ok(res) => res.map(|body| Inner::App { body }),
            Err(e) => {
                // hyper would close the connection on a service error; a layer's failure
                // becomes an ordinary 500 instead, and is logged.
                tracing::error!(error = %e, "service error: answering 500");
                let mut res = Response::new(Inner::Empty);
                *res.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                res
            }
        };
        this.settings.metrics.count_response(res.status().as_u16());
        if *this.http1 {
            let draining = this.settings.signal.level() != DrainLevel::Serving;
            let headers = res.headers_mut();
            if *this.last || draining {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            } else if let (true, Some(v)) = (*this.h1_keep_alive, &this.settings.keep_alive_header)
            {
                if !has_header(headers, &CONNECTION) {
                    headers.insert(KEEP_ALIVE, v.clone());
                }
            }
        }
        let guard = this.guard.take();
        Poll::Ready(Ok(res.map(|inner| TrackedBody { inner, guard })))
    }
}

// ===== impl TrackedBody =====

pin_project_lite::pin_project! {
    /// A response body that ends its request's "in flight" mark when it finishes or is dropped.
    #[derive(Debug)]
    pub(crate) struct TrackedBody<B> {
        #[pin]
        inner: Inner<B>,
        guard: Option<InFlight>,
    }
}

pin_project_lite::pin_project! {
    /// The application's body, or the empty body of a `500` for a service error.
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        App { #[pin] body: B },
        Empty,
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let res = match this.inner.project() {
            InnerProj::App { body } => ready!(body.poll_frame(cx)),
            InnerProj::Empty => None,
        };
        if res.is_none() {
            this.guard.take();
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::App { body } => body.is_end_stream(),
            Inner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::App { body } => body.size_hint(),
            Inner::Empty => SizeHint::with_exact(0),
        }
    }
}

// ===== serving =====

/// Why a connection ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// hyper finished the connection (the client closed, or a graceful close completed).
    Closed(Result<(), BoxError>),
    /// No complete request head within the header timeout.
    HeaderTimeout,
    /// A graceful close of an idle connection did not finish in time.
    CloseTimeout,
    /// Dropped at the end of the shutdown grace period.
    Forced,
}

/// Serves one accepted connection until it ends, applying the timers and drain signal.
pub(crate) async fn serve_connection<IO, S, B>(
    io: IO,
    service: S,
    settings: &'static Settings,
) -> Outcome
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let state = Arc::new(ConnState::new(
        settings.config.header_timeout,
        settings.config.keep_alive_timeout,
        settings.config.shutdown_idle_timeout,
        Instant::now(),
    ));
    let key = settings.signal.register(state.waker.clone());
    settings.metrics.connections_open.inc();
    let _open = scopeguard(|| {
        settings.signal.unregister(key);
        settings.metrics.connections_open.dec();
    });
    let io = TokioIo::new(TimedIo {
        io,
        state: state.clone(),
    });
    let svc = ConnService {
        inner: Mutex::new(service),
        state: state.clone(),
        settings,
    };
    let conn = settings.builder.serve_connection(io, svc);
    let outcome = drive(conn, |c| c.graceful_shutdown(), &state, &settings.signal).await;
    if let Outcome::Closed(Err(e)) = &outcome {
        // hyper answered a malformed or oversized head itself; count what it sent.
        if let Some(e) = e.downcast_ref::<hyper::Error>() {
            if e.is_parse_too_large() {
                settings.metrics.count_response(431);
            } else if e.is_parse() {
                settings.metrics.count_response(400);
            }
        }
    }
    outcome
}

/// Runs `f` when dropped (also when the connection task is aborted).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// Polls `conn` while enforcing the phase deadlines and reacting to the drain signal;
/// `graceful` starts the connection's graceful shutdown (hyper's `graceful_shutdown`).
pub(crate) async fn drive<C, G>(conn: C, graceful: G, state: &ConnState, signal: &Signal) -> Outcome
where
    C: Future<Output = Result<(), BoxError>>,
    G: Fn(Pin<&mut C>),
{
    let mut conn = pin!(conn);
    let mut armed = state
        .deadline()
        .unwrap_or_else(|| Instant::now() + recheck(state));
    let mut sleep = pin!(tokio::time::sleep_until(armed));
    let mut seen = DrainLevel::Serving;
    let mut close_sent = false;
    let mut goaway_sent = false;
    poll_fn(|cx| {
        state.waker.register(cx.waker());
        loop {
            let level = signal.level();
            if level != seen {
                seen = level;
                match level {
                    DrainLevel::Force => return Poll::Ready(Outcome::Forced),
                    // HTTP/2: GOAWAY. hyper first announces the highest stream id and sends
                    // the final GOAWAY a round trip later, so streams crossing it are served.
                    DrainLevel::Immediate | DrainLevel::Gentle
                        if state.h2.load(Ordering::Relaxed) =>
                    {
                        goaway_sent = true;
                        graceful(conn.as_mut())
                    }
                    // HTTP/1 (or not known yet): every answer from now on carries
                    // `Connection: close` (see `ConnFuture`); an idle connection closes at
                    // its deadline, shortened by an immediate drain. Not hyper's graceful
                    // shutdown: see the module docs.
                    DrainLevel::Immediate => state.on_drain(),
                    DrainLevel::Gentle | DrainLevel::Serving => {}
                }
            }
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(Outcome::Closed(res));
            }
            if !close_sent && state.close_requested.load(Ordering::Acquire) {
                close_sent = true;
                graceful(conn.as_mut());
                continue;
            }
            // A drain seen while the protocol was unknown (a connection accepted from the
            // queue at SIGTERM, or an HTTP/2 client that had not opened a stream yet): its
            // first stream, parsed in the poll above, shows it is HTTP/2; GOAWAY now, or a
            // client that keeps streams open would be served until the grace period ends.
            if !goaway_sent && seen >= DrainLevel::Gentle && state.h2.load(Ordering::Relaxed) {
                goaway_sent = true;
                graceful(conn.as_mut());
                continue;
            }
            // Timers: reset only when a deadline moved earlier than the armed one.
            if let Some(d) = state.deadline() {
                if d < armed {
                    armed = d;
                    sleep.as_mut().reset(d);
                }
            }
            loop {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let now = Instant::now();
                match state.expire(now) {
                    Expiry::Head => return Poll::Ready(Outcome::HeaderTimeout),
                    Expiry::Closing => return Poll::Ready(Outcome::CloseTimeout),
                    Expiry::Idle => {
                        graceful(conn.as_mut());
                        armed = now + CLOSING_GRACE;
                        sleep.as_mut().reset(armed);
                        break; // poll the connection again so it can close
                    }
                    Expiry::NotYet(next) => {
                        armed = next.unwrap_or_else(|| now + recheck(state));
                        sleep.as_mut().reset(armed);
                    }
                }
            }
        }
    })
    .await
}

/// While busy there is no deadline. Every later deadline is set either inside the
/// connection's poll (after which the driver compares it with the armed one) or, for an
/// HTTP/2 stream ending on its own task, together with a wake-up; so this is only a
/// long safety net and a long-running request costs no periodic wake-ups.
fn recheck(state: &ConnState) -> Duration {
    state
        .header_timeout
        .max(state.keep_alive_timeout)
        .max(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Builds a request with `extra` filler headers before the `Connection` values, so both
    /// the scan (few headers) and the index (many) are taken.
    fn with_connection(extra: usize, values: &[&str]) -> Request<()> {
        let mut req = Request::new(());
        for i in 0..extra {
            let name = http::header::HeaderName::try_from(format!("x-filler-{i}")).unwrap();
            req.headers_mut()
                .insert(name, HeaderValue::from_static("1"));
        }
        for v in values {
            req.headers_mut()
                .append(CONNECTION, HeaderValue::from_str(v).unwrap());
        }
        req
    }

    #[test]
    fn connection_tokens_found_by_scan_and_by_index() {
        for extra in [0, SCAN_HEADERS - 2, SCAN_HEADERS + 5] {
            let close = with_connection(extra, &["Upgrade", " x, Close "]);
            assert!(connection_has(&close, "close"), "{extra} filler headers");
            assert!(!connection_has(&close, "keep-alive"), "{extra}");
            assert!(has_header(close.headers(), &CONNECTION), "{extra}");
            let none = with_connection(extra, &[]);
            assert!(!connection_has(&none, "close"), "{extra}");
            assert!(!has_header(none.headers(), &CONNECTION), "{extra}");
            let opaque = with_connection(extra, &["closed, keep-alivex"]);
            assert!(!connection_has(&opaque, "close"), "{extra}");
            assert!(!connection_has(&opaque, "keep-alive"), "{extra}");
        }
    }

    /// A fake hyper connection: pending until told to finish; counts graceful shutdowns.
    struct FakeConn {
        shutdowns: Arc<AtomicUsize>,
        finish_on_shutdown: bool,
    }

    impl Future for FakeConn {
        type Output = Result<(), BoxError>;
        fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
            if self.finish_on_shutdown && self.shutdowns.load(Ordering::SeqCst) > 0 {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }
    }

    fn graceful(conn: Pin<&mut FakeConn>) {
        conn.shutdowns.fetch_add(1, Ordering::SeqCst);
    }

    /// Drives `conn` on its own task; the task yields the outcome and how long it took.
    fn spawn_drive(
        state: &Arc<ConnState>,
        signal: Arc<Signal>,
        conn: FakeConn,
    ) -> tokio::task::JoinHandle<(Outcome, Duration)> {
        let state = state.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let outcome = drive(conn, graceful, &state, &signal).await;
            (outcome, start.elapsed())
        })
    }

    /// `--shutdown-idle-timeout` in these tests.
    const DRAIN_IDLE: Duration = Duration::from_secs(1);

    fn setup(
        header: u64,
        keep_alive: u64,
        finish_on_shutdown: bool,
    ) -> (Arc<ConnState>, Arc<Signal>, FakeConn, Arc<AtomicUsize>) {
        let state = Arc::new(ConnState::new(
            Duration::from_secs(header),
            Duration::from_secs(keep_alive),
            DRAIN_IDLE,
            Instant::now(),
        ));
        let shutdowns = Arc::new(AtomicUsize::new(0));
        let conn = FakeConn {
            shutdowns: shutdowns.clone(),
            finish_on_shutdown,
        };
        (state, Arc::new(Signal::default()), conn, shutdowns)
    }

    #[tokio::test(start_paused = true)]
    async fn silent_connection_is_dropped_at_the_header_timeout() {
        let (state, signal, conn, _) = setup(3, 5, true);
        let start = Instant::now();
        let outcome = drive(conn, graceful, &state, &signal).await;
        assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_timeout_is_separate_from_and_longer_than_header_timeout() {
        // header 2 s, keep-alive 7 s: an idle connection must live 7 s, not 2 s.
        let (state, signal, conn, shutdowns) = setup(2, 7, true);
        let task = spawn_drive(&state, signal, conn);
        tokio::time::sleep(Duration::from_secs(1)).await;
        state.on_request(Version::HTTP_11);
        // A slow handler is not limited by either timer.
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(state.phase(), Phase::Busy);
        assert_eq!(shutdowns.load(Ordering::SeqCst), 0);
        state.on_response_done(); // idle from t = 31 s
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_secs(31 + 7));
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn next_request_bytes_start_the_header_timer() {
        let (state, signal, conn, _) = setup(2, 10, true);
        state.on_request(Version::HTTP_11);
        state.on_response_done();
        assert!(state.idle_h1.load(Ordering::Relaxed));
        let task = spawn_drive(&state, signal, conn);
        tokio::time::sleep(Duration::from_secs(4)).await;
        state.on_bytes_while_idle(); // half a head at t = 4 s, then nothing
                                     // In a server the read happens inside the connection's poll, on the driver's task;
                                     // here it happens on another task, so wake the driver like that poll would.
        state.waker.wake();
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn http2_idle_reads_do_not_arm_the_header_timer() {
        let (state, _signal, _conn, _) = setup(2, 10, true);
        state.on_request(Version::HTTP_2);
        state.on_response_done();
        assert!(!state.idle_h1.load(Ordering::Relaxed));
        assert_eq!(state.phase(), Phase::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_idle_deadline_set_on_another_task_is_not_missed() {
        // header 10 s, keep-alive 1 s: the driver's timer is armed at 10 s when the stream
        // task ends the only response at 0.2 s; the idle close must still come at 1.2 s.
        let (state, signal, conn, shutdowns) = setup(10, 1, true);
        let task = spawn_drive(&state, signal, conn);
        tokio::time::sleep(Duration::from_millis(100)).await;
        state.on_request(Version::HTTP_2);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let stream_task = {
            let state = state.clone();
            tokio::spawn(async move { drop(InFlight(state)) })
        };
        stream_task.await.unwrap();
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_millis(1200));
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_close_that_hangs_is_dropped() {
        let (state, signal, conn, shutdowns) = setup(2, 3, false);
        state.on_request(Version::HTTP_11);
        state.on_response_done();
        let start = Instant::now();
        let outcome = drive(conn, graceful, &state, &signal).await;
        assert!(matches!(outcome, Outcome::CloseTimeout), "{outcome:?}");
        assert_eq!(start.elapsed(), Duration::from_secs(3) + CLOSING_GRACE);
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn drain_levels_escalate() {
        let (state, signal, conn, shutdowns) = setup(100, 100, false);
        state.on_request(Version::HTTP_11);
        let task = {
            let (state, signal) = (state.clone(), signal.clone());
            tokio::spawn(async move { drive(conn, graceful, &state, &signal).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(
            signal.conns.lock().unwrap().len(),
            0,
            "drive does not register"
        );
        let key = signal.register(state.waker.clone());
        signal.raise(DrainLevel::Gentle);
        tokio::task::yield_now().await;
        assert_eq!(
            shutdowns.load(Ordering::SeqCst),
            0,
            "HTTP/1 gentle: no shutdown"
        );
        signal.raise(DrainLevel::Immediate);
        tokio::task::yield_now().await;
        assert_eq!(
            shutdowns.load(Ordering::SeqCst),
            0,
            "HTTP/1 immediate, busy: its answer says close, no shutdown"
        );
        signal.raise(DrainLevel::Gentle); // never lowers
        assert_eq!(signal.level(), DrainLevel::Immediate);
        signal.raise(DrainLevel::Force);
        let outcome = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Forced), "{outcome:?}");
        signal.unregister(key);
        assert_eq!(signal.conns.lock().unwrap().len(), 0);
    }

    /// Drives a connection of `state` that registered with `signal` (as `serve_connection`
    /// does), so raising the signal wakes it.
    fn spawn_registered(
        state: &Arc<ConnState>,
        signal: &Arc<Signal>,
        conn: FakeConn,
    ) -> tokio::task::JoinHandle<(Outcome, Duration)> {
        signal.register(state.waker.clone());
        spawn_drive(state, signal.clone(), conn)
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_lets_a_busy_http1_connection_idle_for_the_shutdown_idle_timeout() {
        // A response whose head went out before the drain: the connection must stay open
        // for the client's next request (answered with `Connection: close`), not close the
        // moment the body is handed over.
        let (state, signal, conn, shutdowns) = setup(100, 100, true);
        state.on_request(Version::HTTP_11);
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_secs(1)).await;
        signal.raise(DrainLevel::Immediate);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(shutdowns.load(Ordering::SeqCst), 0, "busy: no shutdown");
        state.on_response_done(); // idle from t = 6 s
                                  // In a server the HTTP/1 body ends inside the connection's poll, on the driver's
                                  // task; here it ends on another task, so wake the driver like that poll would.
        state.waker.wake();
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_secs(6) + DRAIN_IDLE);
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_closes_a_recently_idle_connection_when_its_shortened_deadline_passes()
    {
        let (state, signal, conn, shutdowns) = setup(100, 100, true);
        state.on_request(Version::HTTP_11);
        state.on_response_done(); // idle from t = 0, keep-alive deadline 100 s
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_millis(300)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(
            elapsed, DRAIN_IDLE,
            "idle since 0: closed at 0 + DRAIN_IDLE"
        );
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_closes_a_long_idle_connection_at_once() {
        let (state, signal, conn, shutdowns) = setup(100, 100, true);
        state.on_request(Version::HTTP_11);
        state.on_response_done();
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_secs(5)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_secs(5));
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_gives_a_silent_new_connection_the_shutdown_idle_timeout() {
        let (state, signal, conn, _) = setup(100, 100, true);
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
        assert_eq!(
            elapsed, DRAIN_IDLE,
            "accepted at 0: dropped at 0 + DRAIN_IDLE"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_gives_a_new_connection_time_for_its_request_without_keep_alive_too() {
        // `--keep-alive-timeout 0s` caps idle time, not the wait for a first request.
        let (state, signal, conn, _) = setup(100, 0, true);
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
        assert_eq!(elapsed, DRAIN_IDLE);
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_keeps_a_shorter_keep_alive_deadline() {
        // keep-alive 0.5 s < shutdown idle timeout 1 s: the idle connection closes at 0.5 s.
        let state = Arc::new(ConnState::new(
            Duration::from_secs(100),
            Duration::from_millis(500),
            DRAIN_IDLE,
            Instant::now(),
        ));
        let signal = Arc::new(Signal::default());
        let conn = FakeConn {
            shutdowns: Arc::new(AtomicUsize::new(0)),
            finish_on_shutdown: true,
        };
        state.on_request(Version::HTTP_11);
        state.on_response_done();
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_millis(100)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn immediate_drain_sends_goaway_on_http2_at_once() {
        let (state, signal, conn, shutdowns) = setup(100, 100, true);
        state.on_request(Version::HTTP_2);
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_millis(200)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_millis(200));
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn zero_shutdown_idle_timeout_closes_idle_connections_at_once() {
        let state = Arc::new(ConnState::new(
            Duration::from_secs(100),
            Duration::from_secs(100),
            Duration::ZERO,
            Instant::now(),
        ));
        let signal = Arc::new(Signal::default());
        let shutdowns = Arc::new(AtomicUsize::new(0));
        let conn = FakeConn {
            shutdowns: shutdowns.clone(),
            finish_on_shutdown: true,
        };
        state.on_request(Version::HTTP_11);
        state.on_response_done();
        let task = spawn_registered(&state, &signal, conn);
        tokio::time::sleep(Duration::from_millis(10)).await;
        signal.raise(DrainLevel::Immediate);
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_millis(10));
        assert_eq!(shutdowns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_seen_before_the_protocol_is_known_still_sends_goaway_once_it_is_http2() {
        // A connection taken from the accept queue at SIGTERM, or an HTTP/2 client that had
        // not opened a stream when the drain began: the driver sees the drain level while
        // the protocol is still unknown. Its first stream shows it is HTTP/2; it must get
        // GOAWAY then, not keep serving new streams until the grace period ends.
        for level in [DrainLevel::Gentle, DrainLevel::Immediate] {
            let (state, signal, conn, shutdowns) = setup(100, 100, false);
            let task = spawn_registered(&state, &signal, conn);
            tokio::time::sleep(Duration::from_millis(10)).await;
            signal.raise(level);
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(
                shutdowns.load(Ordering::SeqCst),
                0,
                "{level:?}: protocol unknown"
            );
            // In a server the stream arrives inside the connection's poll, on the driver's
            // task; here it arrives on another task, so wake the driver like that poll would.
            state.on_request(Version::HTTP_2);
            state.waker.wake();
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert_eq!(
                shutdowns.load(Ordering::SeqCst),
                1,
                "{level:?}: GOAWAY once the first stream showed HTTP/2"
            );
            signal.raise(DrainLevel::Force);
            assert!(matches!(task.await.unwrap().0, Outcome::Forced));
        }
    }

    // ----- the real hyper stack over an in-memory pipe, in paused time -----

    fn settings(header: u64, keep_alive: u64, max_requests: Option<u64>) -> &'static Settings {
        let config = ConnConfig {
            keep_alive_timeout: Duration::from_secs(keep_alive),
            header_timeout: Duration::from_secs(header),
            shutdown_idle_timeout: DRAIN_IDLE,
            max_requests_per_connection: max_requests.and_then(NonZeroU64::new),
            max_head_size: 16 * 1024,
            max_headers: 100,
            h2_max_concurrent_streams: 200,
        };
        Box::leak(Box::new(Settings::new(
            config,
            Arc::new(Signal::default()),
            Arc::new(WorkerMetrics::new()),
        )))
    }

    fn serve(
        settings: &'static Settings,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<(Outcome, Duration)>,
    ) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let app = crate::routes::test_app(Duration::from_secs(60));
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let outcome = serve_connection(server, app, settings).await;
            (outcome, start.elapsed())
        });
        (client, task)
    }

    async fn read_until_eof(client: &mut tokio::io::DuplexStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_stack_silent_client_closed_at_header_timeout() {
        let (mut client, task) = serve(settings(3, 5, None));
        assert_eq!(read_until_eof(&mut client).await, "");
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::HeaderTimeout), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_stack_idle_close_after_keep_alive_with_header_values() {
        use tokio::io::AsyncWriteExt;
        // keep-alive 7 s > header 2 s: the idle connection must live 7 s.
        let (mut client, task) = serve(settings(2, 7, None));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let text = read_until_eof(&mut client).await;
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("keep-alive: timeout=7\r\n"), "{text}");
        assert!(text.ends_with("Hello, World!"), "{text}");
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(elapsed, Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_stack_last_allowed_request_gets_connection_close() {
        use tokio::io::AsyncWriteExt;
        let (mut client, task) = serve(settings(2, 7, Some(2)));
        // Two pipelined requests; the second is the last allowed one.
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let text = read_until_eof(&mut client).await;
        let (first, second) = text.split_once("Hello, World!").unwrap();
        assert!(first.contains("keep-alive: timeout=7"), "{first}");
        assert!(second.contains("connection: close"), "{second}");
        assert!(!second.contains("keep-alive"), "{second}");
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(
            elapsed,
            Duration::ZERO,
            "closed right after the last response"
        );
    }

    /// Reads one `GET /` answer (it ends with the body `Hello, World!`).
    async fn read_hello(client: &mut tokio::io::DuplexStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        while !out.ends_with(b"Hello, World!") {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_stack_immediate_drain_answers_the_next_request_with_close() {
        use tokio::io::AsyncWriteExt;
        let settings = settings(10, 30, None);
        let (mut client, task) = serve(settings);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let first = read_hello(&mut client).await;
        assert!(first.contains("keep-alive: timeout=30\r\n"), "{first}");
        // SIGTERM while the client has just read its answer: its next request, written
        // 0.5 s later, is answered (with `Connection: close`), not lost to a close.
        settings.signal.raise(DrainLevel::Immediate);
        tokio::time::sleep(Duration::from_millis(500)).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let second = read_until_eof(&mut client).await;
        assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
        assert!(second.contains("connection: close\r\n"), "{second}");
        assert!(!second.contains("keep-alive"), "{second}");
        assert!(second.ends_with("Hello, World!"), "{second}");
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(
            elapsed,
            Duration::from_millis(500),
            "closed after that answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_stack_immediate_drain_closes_an_idle_connection_after_the_shutdown_idle_timeout()
    {
        use tokio::io::AsyncWriteExt;
        let settings = settings(10, 30, None);
        let (mut client, task) = serve(settings);
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        read_hello(&mut client).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        settings.signal.raise(DrainLevel::Immediate);
        assert_eq!(read_until_eof(&mut client).await, "");
        let (outcome, elapsed) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
        assert_eq!(
            elapsed, DRAIN_IDLE,
            "idle since 0: closed at 0 + DRAIN_IDLE"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hyper_stack_http2_connection_accepted_while_draining_gets_goaway_with_its_first_stream(
    ) {
        // As for a connection taken from the accept queue at SIGTERM: the drain began before
        // the connection was first polled. Its first stream is answered and the connection
        // is told to go (GOAWAY) then, not only once it has been idle for
        // --shutdown-idle-timeout: a client that keeps streams open would never be idle.
        let settings = settings(10, 30, None);
        settings.signal.raise(DrainLevel::Immediate);
        let (client, task) = serve(settings);
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(client),
        )
        .await
        .unwrap();
        let start = Instant::now();
        let client_conn = tokio::spawn(conn);
        let req = Request::get("http://t/")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let res = send.send_request(req).await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        // The client's connection ends when the server has sent GOAWAY and closed.
        client_conn.await.unwrap().unwrap();
        assert!(
            start.elapsed() < DRAIN_IDLE,
            "GOAWAY came only with the idle timeout ({:?})",
            start.elapsed()
        );
        let (outcome, _) = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(Ok(()))), "{outcome:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_error_is_a_500_and_the_connection_lives_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let settings = settings(2, 5, None);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let failing = tower::service_fn(|req: Request<Incoming>| async move {
            if req.uri().path() == "/fail" {
                Err(std::io::Error::other("boom"))
            } else {
                Ok(Response::new(http_body_util::Full::new(
                    Bytes::from_static(b"fine"),
                )))
            }
        });
        let task = tokio::spawn(serve_connection(server, failing, settings));
        client
            .write_all(b"GET /fail HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(
            out.starts_with("HTTP/1.1 500 Internal Server Error\r\n"),
            "{out}"
        );
        assert!(out.contains("content-length: 0\r\n"), "{out}");
        assert!(
            out.ends_with("fine"),
            "second request served on the same connection: {out}"
        );
        assert!(matches!(task.await.unwrap(), Outcome::Closed(Ok(()))));
    }

    /// A service that is not ready at first (it readies itself on a later poll, waking the
    /// connection), or whose readiness fails: both answered, on the same connection.
    #[derive(Clone)]
    struct SlowToReady {
        polls: Arc<AtomicU64>,
        fail: bool,
    }

    impl Service<Request<Incoming>> for SlowToReady {
        type Response = Response<http_body_util::Full<Bytes>>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.polls.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.fail {
                return Poll::Ready(Err(std::io::Error::other("not ready, ever")));
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<Incoming>) -> Self::Future {
            std::future::ready(Ok(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ready"),
            ))))
        }
    }

    #[tokio::test]
    async fn a_service_not_ready_at_once_is_awaited_and_a_readiness_error_is_a_500() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for (fail, expected) in [(false, "HTTP/1.1 200 OK\r\n"), (true, "HTTP/1.1 500 ")] {
            let (mut client, server) = tokio::io::duplex(64 * 1024);
            let polls = Arc::new(AtomicU64::new(0));
            let svc = SlowToReady {
                polls: polls.clone(),
                fail,
            };
            let task = tokio::spawn(serve_connection(server, svc, settings(2, 5, None)));
            client
                .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            client.read_to_string(&mut out).await.unwrap();
            assert_eq!(out.matches(expected).count(), 2, "{out}");
            assert!(polls.load(Ordering::Relaxed) >= 4, "readiness asked again");
            assert!(matches!(task.await.unwrap(), Outcome::Closed(Ok(()))));
        }
    }

    /// One request on its own connection to `app` (with `Connection: close`); the answer.
    async fn one_request<S, B>(app: S, target: &str) -> String
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve_connection(server, app, settings(30, 30, None)));
        let head = format!("GET {target} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        client.write_all(head.as_bytes()).await.unwrap();
        let out = read_until_eof(&mut client).await;
        assert!(matches!(task.await.unwrap(), Outcome::Closed(Ok(()))));
        out
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_that_reserves_in_poll_ready_and_is_not_ready_leaks_no_reservation() {
        // tower's ConcurrencyLimit queues for a semaphore permit in `poll_ready`. A
        // connection that finds it not ready must not leave that place in the queue (and
        // the permit it is later given) with a copy of the service nobody polls: with a
        // limit of 1, the second connection would then wait forever, and so would every
        // later request of the worker.
        let slow = tower::service_fn(|req: Request<Incoming>| async move {
            let ms = req.uri().query().and_then(|q| q.strip_prefix("ms="));
            let ms: u64 = ms.unwrap_or("0").parse().unwrap();
            tokio::time::sleep(Duration::from_millis(ms)).await;
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"done"),
            )))
        });
        let app = tower::limit::ConcurrencyLimit::new(slow, 1);
        let start = Instant::now();
        let first = tokio::spawn(one_request(app.clone(), "/?ms=100"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Not ready now: the first request holds the only permit until t = 100 ms.
        let second = tokio::spawn(one_request(app.clone(), "/?ms=0"));
        let second = tokio::time::timeout(Duration::from_secs(5), second)
            .await
            .expect("the second connection waited forever for a permit")
            .unwrap();
        assert!(second.ends_with("done"), "{second}");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        assert!(first.await.unwrap().ends_with("done"));
        // Nothing was left behind: a third request gets the permit at once.
        let third = tokio::time::timeout(Duration::from_secs(5), one_request(app, "/?ms=0"))
            .await
            .expect("a permit was leaked");
        assert!(third.ends_with("done"), "{third}");
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn an_http2_stream_reset_while_its_service_is_not_ready_gives_its_place_back() {
        // One HTTP/2 connection: stream 1 holds the only permit for 100 ms; stream 2 waits
        // for one and is reset by the client. The connection stays open, so whatever stream
        // 2's wait queued for must go with its dropped future: once stream 1 is done the
        // permit is free again.
        let sem = Arc::new(tokio::sync::Semaphore::new(1));
        let slow = tower::service_fn(|_req: Request<Incoming>| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, Infallible>(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"done"),
            )))
        });
        let app = tower::limit::ConcurrencyLimit::with_semaphore(slow, sem.clone());
        let (client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve_connection(server, app, settings(30, 30, None)));
        let (mut h2, conn) = h2::client::handshake(client).await.unwrap();
        let client_conn = tokio::spawn(conn);
        let get = || Request::get("http://t/").body(()).unwrap();
        let (first, _) = h2.send_request(get(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (second, mut second_stream) = h2.send_request(get(), true).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(sem.available_permits(), 0);
        second_stream.send_reset(h2::Reason::CANCEL);
        drop(second);
        let res = first.await.unwrap();
        assert_eq!(res.status(), http::StatusCode::OK);
        let mut body = res.into_body();
        while let Some(chunk) = body.data().await {
            chunk.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!task.is_finished(), "the connection is still open");
        assert_eq!(
            sem.available_permits(),
            1,
            "the permit was left with a reset stream"
        );
        drop(h2);
        client_conn.await.unwrap().unwrap();
        let outcome = task.await.unwrap();
        assert!(matches!(outcome, Outcome::Closed(_)), "{outcome:?}");
    }

    /// A service whose readiness fails once; a failed instance that is polled again (tower:
    /// "the caller should discard the service instance") records it. Clones start afresh.
    struct FailsOnce {
        failed: bool,
        first: Arc<AtomicBool>,
        reused_after_error: Arc<AtomicBool>,
    }

    impl Clone for FailsOnce {
        fn clone(&self) -> Self {
            FailsOnce {
                failed: false,
                first: self.first.clone(),
                reused_after_error: self.reused_after_error.clone(),
            }
        }
    }

    impl Service<Request<Incoming>> for FailsOnce {
        type Response = Response<http_body_util::Full<Bytes>>;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            if self.failed {
                self.reused_after_error.store(true, Ordering::SeqCst);
                return Poll::Ready(Err(std::io::Error::other("polled after failing")));
            }
            if self.first.swap(false, Ordering::SeqCst) {
                self.failed = true;
                return Poll::Ready(Err(std::io::Error::other("not ready")));
            }
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<Incoming>) -> Self::Future {
            std::future::ready(Ok(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"fine"),
            ))))
        }
    }

    #[tokio::test]
    async fn a_service_whose_readiness_failed_is_discarded() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let reused = Arc::new(AtomicBool::new(false));
        let svc = FailsOnce {
            failed: false,
            first: Arc::new(AtomicBool::new(true)),
            reused_after_error: reused.clone(),
        };
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve_connection(server, svc, settings(2, 5, None)));
        client
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 500 "), "{out}");
        assert!(
            out.ends_with("fine"),
            "the next request got a fresh copy: {out}"
        );
        assert!(
            !reused.load(Ordering::SeqCst),
            "a failed instance was polled again"
        );
        assert!(matches!(task.await.unwrap(), Outcome::Closed(Ok(()))));
    }

    #[test]
    fn in_flight_mark_released_when_the_future_is_dropped() {
        let state = Arc::new(ConnState::new(
            Duration::from_secs(1),
            Duration::from_secs(1),
            DRAIN_IDLE,
            Instant::now(),
        ));
        state.on_request(Version::HTTP_2);
        state.on_request(Version::HTTP_2);
        let a = InFlight(state.clone());
        let b = InFlight(state.clone());
        drop(a);
        assert_eq!(state.phase(), Phase::Busy);
        drop(b);
        assert_eq!(state.phase(), Phase::Idle);
    }
}
