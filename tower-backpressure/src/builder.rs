//! Configuration of a limiter, with every default documented.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use crate::adaptive::{LimitStrategy, Outcome};
use crate::body::MeteredBody;
use crate::classify::{Classify, DefaultClassify, RequestHead};
use crate::error::ConfigError;
use crate::layer::{BackpressureLayer, TypedBackpressureLayer};
use crate::limiter::{Config, Limiter};
use crate::order::{Priority, QueueOrder};

pub(crate) type HeadFn<T> = Arc<dyn Fn(&RequestHead<'_>) -> T + Send + Sync>;

/// When an HTTP request's permit is returned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PermitRelease {
    /// When the response body ends or is dropped (the default): a streamed response stays
    /// inside the limit for as long as it streams.
    #[default]
    BodyEnd,
    /// When the response head is ready, as tower's `ConcurrencyLimit` does. Streaming
    /// responses then escape the limit.
    Head,
}

/// HTTP-only settings, shared by every clone of a [`BackpressureLayer`].
pub(crate) struct HttpPolicy {
    pub(crate) bypass: Option<HeadFn<bool>>,
    pub(crate) priority: Option<HeadFn<Priority>>,
    pub(crate) deadline: Option<HeadFn<Option<Instant>>>,
    pub(crate) unknown_length_bytes: u64,
    /// A `fn(MeteredBody<B>) -> B` for the one request body type `B` being metered.
    pub(crate) meter: Option<Arc<dyn Any + Send + Sync>>,
}

impl HttpPolicy {
    /// Whether any setting looks at the request head.
    #[inline]
    pub(crate) fn reads_head(&self) -> bool {
        self.bypass.is_some() || self.priority.is_some() || self.deadline.is_some()
    }
}

impl fmt::Debug for HttpPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpPolicy")
            .field("bypass", &self.bypass.is_some())
            .field("priority", &self.priority.is_some())
            .field("deadline", &self.deadline.is_some())
            .field("unknown_length_bytes", &self.unknown_length_bytes)
            .field("meter", &self.meter.is_some())
            .finish()
    }
}

/// Builds a [`BackpressureLayer`] (HTTP) or a [`TypedBackpressureLayer`] (any request type).
///
/// Start from [`BackpressureLayer::builder`]. Every setting has a default; the builder
/// creates the shared state once, in [`build`](Self::build), so every clone of the layer
/// and of the services it makes share one budget.
#[derive(Debug)]
pub struct BackpressureBuilder {
    config: Config,
    http: HttpPolicy,
}

impl BackpressureBuilder {
    pub(crate) fn new(max_in_flight: usize) -> Self {
        BackpressureBuilder {
            config: Config::new(max_in_flight),
            http: HttpPolicy {
                bypass: None,
                priority: None,
                deadline: None,
                unknown_length_bytes: 0,
                meter: None,
            },
        }
    }

    /// At most this many requests wait for a slot (default: the same as `max_in_flight`).
    /// Beyond it the request that would be served last is shed at once with
    /// [`ShedReason::QueueFull`](crate::ShedReason::QueueFull): the newcomer in FIFO
    /// order, the oldest waiter in LIFO order (see [`QueueOrder`]). `0` means never queue:
    /// shed as soon as the limit is reached.
    pub fn max_queued(mut self, max_queued: usize) -> Self {
        self.config.max_queued = max_queued;
        self
    }

    /// A waiter older than this is shed with
    /// [`ShedReason::QueueTimeout`](crate::ShedReason::QueueTimeout) (default: 1 s).
    /// Choose it below your clients' timeout: work for a client that has left is wasted.
    ///
    /// It also bounds a queued request's wait for the inner service after admission: the
    /// permit is handed over when one is released, but the request still needs its inner
    /// service to be ready. If it is not ready by the time the queue timeout (counted from
    /// when the request queued) runs out, the request is shed with `QueueTimeout` and the
    /// permit goes to the next waiter. (Requests admitted at once are called at once: the
    /// caller readied the service before `call`.)
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.config.queue_timeout = Some(timeout);
        self
    }

    /// Lets waiters wait for as long as their client does (still bounded in number by
    /// [`max_queued`](Self::max_queued)); an admitted request then also waits for its inner
    /// service to be ready for as long as its client does (or until its own deadline).
    pub fn no_queue_timeout(mut self) -> Self {
        self.config.queue_timeout = None;
        self
    }

    /// Which waiter is served next (default: [`QueueOrder::Fifo`]).
    pub fn queue_order(mut self, order: QueueOrder) -> Self {
        self.config.order = order;
        self
    }

    /// The share of the limit reserved for [`Priority::High`] requests, at least `0` and
    /// below `1` (default `0`). With a limit of 10 and a share of `0.2`, normal requests stop
    /// at 8 in flight and the last 2 slots are only for high-priority ones. Normal requests
    /// always keep at least one slot.
    ///
    /// # Errors
    ///
    /// A share outside `[0, 1)` (including NaN) is a [`ConfigError`]: reserving the whole
    /// limit would leave normal requests nothing.
    ///
    /// ```
    /// use tower_backpressure::BackpressureLayer;
    ///
    /// # fn main() -> Result<(), tower_backpressure::ConfigError> {
    /// let layer = BackpressureLayer::builder(10).high_priority_share(0.2)?.build();
    /// assert!(BackpressureLayer::builder(10).high_priority_share(1.0).is_err());
    /// # let _ = layer;
    /// # Ok(())
    /// # }
    /// ```
    pub fn high_priority_share(mut self, share: f64) -> Result<Self, ConfigError> {
        if !(0.0..1.0).contains(&share) {
            return Err(ConfigError::new(
                "high_priority_share",
                share.to_string(),
                "at least 0 and below 1",
            ));
        }
        self.config.high_priority_share = share;
        Ok(self)
    }

    /// Caps the bytes of request bodies in flight (default: no cap).
    ///
    /// Each HTTP request reserves its `Content-Length` (or its body's exact size hint, or
    /// [`unknown_length_bytes`](Self::unknown_length_bytes)) at admission and waits while
    /// the reservation does not fit; a request declaring more than the whole budget is
    /// answered `413 Payload Too Large` (without `Retry-After`: waiting cannot help). With
    /// [`meter_bodies_with`](Self::meter_bodies_with), bytes streamed beyond the
    /// reservation are counted too. Reservations return when the permit does.
    ///
    /// # Order
    ///
    /// Bytes are handed out in serving order (see [`QueueOrder`]): a request whose body
    /// does not fit holds up the requests behind it that also reserve bytes, even smaller
    /// ones that would fit, so a large upload is never starved by a stream of small ones
    /// (the same rule as tokio's `Semaphore::acquire_many`). It does not hold up requests
    /// that reserve nothing (a `GET`, or a body of unknown length with the default
    /// `unknown_length_bytes` of 0): they need only a slot and cannot delay it, so they
    /// are admitted past it while slots are free. If large uploads should not delay small
    /// bodies at all, give them their own layer (a route-level budget) instead. Bytes
    /// charged while a body streams (metering) are counted as they are read, whatever is
    /// queued; reserve them with `unknown_length_bytes` to make such bodies queue like
    /// declared ones.
    pub fn max_request_bytes(mut self, max_bytes: u64) -> Self {
        self.config.max_bytes = Some(max_bytes);
        self
    }

    /// Bytes reserved for a request body of unknown length when a byte budget is set
    /// (default `0`: such bodies are only counted as they stream, if metered).
    pub fn unknown_length_bytes(mut self, bytes: u64) -> Self {
        self.http.unknown_length_bytes = bytes;
        self
    }

    /// Counts request body bytes as they are read, for the body type `B` your inner
    /// service takes, by wrapping each body in a [`MeteredBody`] and converting it back
    /// with `rewrap`. For axum: `.meter_bodies_with(axum::body::Body::new)`.
    ///
    /// A body that streams past the budget fails with
    /// [`BudgetExceeded`](crate::BudgetExceeded) (so extractors answer 4xx/5xx instead of
    /// buffering without bound). Requests with any other body type are not metered.
    pub fn meter_bodies_with<B: 'static>(mut self, rewrap: fn(MeteredBody<B>) -> B) -> Self {
        self.http.meter = Some(Arc::new(rewrap));
        self.config.track_bytes = true;
        self
    }

    /// The status of a shed HTTP response (default `503 Service Unavailable`; `429 Too
    /// Many Requests` is the other common choice). A request larger than the byte budget
    /// always gets `413`.
    pub fn shed_status(mut self, status: StatusCode) -> Self {
        self.config.http.shed_status = status;
        self
    }

    /// When an HTTP request's permit is returned (default [`PermitRelease::BodyEnd`]).
    pub fn permit_release(mut self, release: PermitRelease) -> Self {
        self.config.http.release = release;
        self
    }

    /// Requests for which `bypass` returns `true` (health checks, metrics, admin) are
    /// never limited, queued or shed, and are not counted.
    pub fn bypass<F>(mut self, bypass: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> bool + Send + Sync + 'static,
    {
        self.http.bypass = Some(Arc::new(bypass));
        self
    }

    /// Chooses each HTTP request's [`Priority`] (default: all [`Priority::Normal`]).
    pub fn priority<F>(mut self, priority: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Priority + Send + Sync + 'static,
    {
        self.http.priority = Some(Arc::new(priority));
        self
    }

    /// Reads each HTTP request's own deadline (default: none).
    ///
    /// A request whose deadline has passed, or would pass before it can be served at the
    /// current drain rate, is shed at once with
    /// [`ShedReason::DeadlineUnreachable`](crate::ShedReason::DeadlineUnreachable); a
    /// queued request is shed when its deadline arrives. With `tower-abort` in front of
    /// this layer, read its signal from the extensions
    /// (`AbortSignal::deadline()` returns `Option<tokio::time::Instant>`):
    ///
    /// ```
    /// # // A stand-in with the shape of `tower_abort::AbortSignal`.
    /// # #[derive(Clone)] struct AbortSignal;
    /// # impl AbortSignal { fn deadline(&self) -> Option<tokio::time::Instant> { None } }
    /// use tower_backpressure::BackpressureLayer;
    ///
    /// let layer = BackpressureLayer::builder(64)
    ///     .deadline(|head| head.extensions().get::<AbortSignal>()?.deadline())
    ///     .build();
    /// # let _ = layer;
    /// ```
    pub fn deadline<F>(mut self, deadline: F) -> Self
    where
        F: Fn(&RequestHead<'_>) -> Option<Instant> + Send + Sync + 'static,
    {
        self.http.deadline = Some(Arc::new(deadline));
        self
    }

    /// How responses feed an adaptive limit (default
    /// [`classify_status`](crate::adaptive::classify_status): `429` and `5xx` are overload,
    /// other `4xx` ignored).
    pub fn classify_outcome(mut self, classify: fn(StatusCode) -> Outcome) -> Self {
        self.config.http.classify = classify;
        self
    }

    /// How the limit is chosen (default [`LimitStrategy::Fixed`]). With an adaptive
    /// strategy, `max_in_flight` is the starting limit.
    pub fn limit_strategy(mut self, strategy: LimitStrategy) -> Self {
        self.config.strategy = strategy;
        self
    }

    /// Builds the HTTP layer.
    pub fn build(self) -> BackpressureLayer {
        BackpressureLayer::from_parts(Limiter::new(self.config), self.http)
    }

    /// Builds a layer for any request type, failing shed requests with
    /// [`Overloaded`](crate::Overloaded), every request [`RequestClass::normal`](crate::RequestClass::normal).
    /// HTTP-only settings are ignored.
    pub fn build_typed(self) -> TypedBackpressureLayer<DefaultClassify> {
        self.build_typed_with(DefaultClassify)
    }

    /// Like [`build_typed`](Self::build_typed), classifying requests with `classify`.
    pub fn build_typed_with<C>(self, classify: C) -> TypedBackpressureLayer<C> {
        TypedBackpressureLayer::from_parts(Limiter::new(self.config), classify)
    }
}

/// Makes sure `Classify` stays implementable by closures over any request.
#[allow(dead_code)]
fn assert_closure_classifies() {
    fn takes<C: Classify<u8>>(_: C) {}
    takes(|_: &u8| crate::RequestClass::normal());
}
