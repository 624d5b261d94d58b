use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use tower_layer::Layer;

use crate::{AbortEvent, AbortRoot, TimeoutFormat};

/// What the layer does to a handler that is still running when its deadline passes.
///
/// In both modes the signal fires first, so spawned work and outgoing calls tied to it
/// stop; the modes differ in what happens to the handler's own future.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TimeoutMode {
    /// Fire the signal and keep polling the handler so it can clean up (roll back, release
    /// a connection at a safe point) and return. Whatever it returns is replaced by the
    /// timeout response. If it is still running `grace` after the deadline, drop it: the
    /// hard backstop.
    Cooperative {
        /// How long past the deadline the handler may keep running.
        grace: Duration,
    },
    /// Fire the signal and drop the handler at once, like `tower::timeout::Timeout`.
    Drop,
}

impl TimeoutMode {
    /// The default grace of [`TimeoutMode::Cooperative`]: one second.
    pub const DEFAULT_GRACE: Duration = Duration::from_secs(1);

    pub(crate) fn grace(self) -> Duration {
        match self {
            TimeoutMode::Cooperative { grace } => grace,
            TimeoutMode::Drop => Duration::ZERO,
        }
    }
}

impl Default for TimeoutMode {
    /// Cooperative, with [`DEFAULT_GRACE`](Self::DEFAULT_GRACE).
    fn default() -> Self {
        TimeoutMode::Cooperative {
            grace: Self::DEFAULT_GRACE,
        }
    }
}

pub(crate) type OnAbort = Arc<dyn Fn(&AbortEvent<'_>) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) timeout: Option<Duration>,
    pub(crate) grpc_timeout: bool,
    pub(crate) header: Option<(HeaderName, TimeoutFormat)>,
    pub(crate) mode: TimeoutMode,
    pub(crate) timeout_status: StatusCode,
    pub(crate) on_abort: Option<OnAbort>,
}

/// What every clone of one `Abort` service shares; one allocation per `layer()` call.
pub(crate) struct Shared {
    pub(crate) root: AbortRoot,
    pub(crate) config: Config,
}

/// Adds an [`AbortSignal`](crate::AbortSignal) to every request; see the
/// [crate docs](crate) for the model.
///
/// Every service this layer builds, and every clone of them, shares the layer's
/// [`AbortRoot`], so one [`AbortRoot::shutdown`] reaches every request, wherever the layer
/// was applied (`Router::layer` applies it to each route separately).
///
/// # Defaults
///
/// No deadline; client deadline headers ignored; [`TimeoutMode::Cooperative`] with a 1 s
/// grace; `504 Gateway Timeout` for a request whose deadline passed; no `on_abort`
/// callback.
///
/// # Runtime
///
/// Deadlines use tokio's timer: a service with a deadline must be polled inside a tokio
/// runtime with the time driver enabled (as every hyper and axum server is).
///
/// # Backstops
///
/// The grace-then-drop backstop of [`TimeoutMode::Cooperative`] applies to deadlines. A
/// [`Shutdown`](crate::AbortReason::Shutdown) only fires the signal: the server's own hard
/// close at the end of its drain is the backstop there, and a
/// [`ClientGone`](crate::AbortReason::ClientGone) already means the server dropped the
/// request.
///
/// # Nesting
///
/// If a request already carries an [`AbortSignal`](crate::AbortSignal) when it reaches
/// the layer (an outer `AbortLayer` ran first), the layer's signal is a
/// [`child`](crate::AbortSignal::child) of it with the sooner of both deadlines, and it
/// follows the outer layer's root rather than its own. Nested layers should share one
/// root ([`with_root`](Self::with_root)). A request is reported once however many layers
/// it crosses: it is counted (in [`stats`](AbortRoot::stats)), traced and passed to
/// [`on_abort`](Self::on_abort) by the layer whose signal fired first, which for a cause
/// both see (the client going away, a shutdown) is the outer one.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use tower_abort::{AbortLayer, TimeoutFormat, TimeoutMode};
///
/// let (layer, root) = AbortLayer::pair();
/// let layer = layer
///     .with_timeout(Duration::from_secs(10))
///     .with_grpc_timeout(true)
///     .with_timeout_header(
///         http::HeaderName::from_static("request-timeout"),
///         TimeoutFormat::Milliseconds,
///     )
///     .with_mode(TimeoutMode::Cooperative { grace: Duration::from_millis(500) });
/// # let _ = (layer, root);
/// ```
#[derive(Clone)]
pub struct AbortLayer {
    root: AbortRoot,
    config: Config,
}

impl AbortLayer {
    /// A layer with a new [`AbortRoot`] and the [defaults](#defaults).
    pub fn new() -> Self {
        Self::with_root(AbortRoot::new())
    }

    /// A layer and its root: keep the root for shutdown and metrics.
    pub fn pair() -> (Self, AbortRoot) {
        let layer = Self::new();
        let root = layer.root();
        (layer, root)
    }

    /// A layer under an existing root, for several layers (say, one per listener) that
    /// shut down and count together.
    pub fn with_root(root: AbortRoot) -> Self {
        AbortLayer {
            root,
            config: Config {
                timeout: None,
                grpc_timeout: false,
                header: None,
                mode: TimeoutMode::default(),
                timeout_status: StatusCode::GATEWAY_TIMEOUT,
                on_abort: None,
            },
        }
    }

    /// The layer's root.
    pub fn root(&self) -> AbortRoot {
        self.root.clone()
    }

    /// The server's deadline for every request, measured from when the request enters the
    /// layer. A client deadline header can only shorten it.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = Some(timeout);
        self
    }

    /// Whether to honour a `grpc-timeout` request header (off by default). It can only
    /// shorten the server's [`with_timeout`](Self::with_timeout), never lengthen it.
    ///
    /// With this on, a gRPC call (`content-type: application/grpc...`) whose deadline
    /// passes before it answered gets what gRPC clients expect: a trailers-only response,
    /// `200` with `grpc-status: 4` (`DEADLINE_EXCEEDED`), instead of the HTTP timeout
    /// status.
    pub fn with_grpc_timeout(mut self, honour: bool) -> Self {
        self.config.grpc_timeout = honour;
        self
    }

    /// Also honour a deadline header of your own, such as `request-timeout`, in `format`.
    /// When several deadline headers are present the soonest wins.
    pub fn with_timeout_header(mut self, name: HeaderName, format: TimeoutFormat) -> Self {
        self.config.header = Some((name, format));
        self
    }

    /// What happens to a handler still running at its deadline; see [`TimeoutMode`].
    pub fn with_mode(mut self, mode: TimeoutMode) -> Self {
        self.config.mode = mode;
        self
    }

    /// The status of the response sent when a deadline passes before the handler answered;
    /// `504 Gateway Timeout` by default.
    ///
    /// `503 Service Unavailable` is the other sensible choice. Avoid `408 Request Timeout`:
    /// it means the client was too slow sending its request, and browsers retry it.
    pub fn with_timeout_status(mut self, status: StatusCode) -> Self {
        self.config.timeout_status = status;
        self
    }

    /// Calls `callback` when a request's signal fires, with the reason, the request line
    /// and the time it ran: the place to log `499` for clients that went away and to feed
    /// metrics beyond [`AbortRoot::stats`].
    ///
    /// The callback runs on the thread that fired the signal, possibly inside a `Drop`
    /// (the server dropping the request): keep it short. A panic in it is caught (and
    /// logged with the `tracing` feature), never propagated into that `Drop`, where it
    /// would take down the connection, or abort the process during unwinding. Setting one
    /// makes the layer keep a clone of each request's URI.
    ///
    /// ```
    /// use tower_abort::AbortLayer;
    ///
    /// let layer = AbortLayer::new().on_abort(|event| {
    ///     eprintln!(
    ///         "{} {} {} after {:?} ({})",
    ///         event.status(),
    ///         event.method(),
    ///         event.uri().map(|u| u.path()).unwrap_or("-"),
    ///         event.elapsed(),
    ///         event.reason(),
    ///     );
    /// });
    /// # let _ = layer;
    /// ```
    pub fn on_abort<F>(mut self, callback: F) -> Self
    where
        F: Fn(&AbortEvent<'_>) + Send + Sync + 'static,
    {
        self.config.on_abort = Some(Arc::new(callback));
        self
    }
}

impl AbortLayer {
    /// What the services this layer builds share.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            root: self.root.clone(),
            config: self.config.clone(),
        })
    }
}

impl Default for AbortLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for AbortLayer {
    type Service = crate::Abort<S>;

    fn layer(&self, inner: S) -> Self::Service {
        crate::Abort::from_shared(inner, self.shared())
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("timeout", &self.timeout)
            .field("grpc_timeout", &self.grpc_timeout)
            .field("header", &self.header)
            .field("mode", &self.mode)
            .field("timeout_status", &self.timeout_status)
            .field("on_abort", &self.on_abort.as_ref().map(|_| ".."))
            .finish()
    }
}

impl fmt::Debug for AbortLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortLayer")
            .field("root", &self.root)
            .field("config", &self.config)
            .finish()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("root", &self.root)
            .field("config", &self.config)
            .finish()
    }
}
