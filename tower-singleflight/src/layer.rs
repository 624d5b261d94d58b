//! [`SingleflightLayer`]: configuration and the state shared by every service it makes.

use std::{fmt, sync::Arc, time::Duration};

use http::StatusCode;
use tower_layer::Layer;

use crate::{
    group::{Group, OverflowPolicy},
    key::{CredentialHasher, DefaultKey, FlightKey, KeyFn},
    service::Singleflight,
    share::Outcome,
    stats::{Counters, Stats},
};

/// The default bound of a shared body's replay buffer: 8 MiB.
pub const DEFAULT_MAX_SHARED_BODY: usize = 8 * 1024 * 1024;

/// The default time the readers of a full replay buffer wait for the slowest: 1 s.
pub const DEFAULT_LAG_TIMEOUT: Duration = Duration::from_secs(1);

/// Requests carrying `Authorization` or `Cookie`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum CredentialPolicy {
    /// They never coalesce (the default).
    #[default]
    Bypass,
    /// They coalesce only with requests whose `Authorization` and `Cookie` values are
    /// identical, compared by a 128-bit keyed hash (the credentials are not stored). Use it
    /// only if the inner service's response depends on nothing else about the user.
    Partition,
}

/// Requests carrying a given kind of header (`Range`; or the conditional `If-*` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum HeaderPolicy {
    /// They never coalesce (the default).
    #[default]
    Bypass,
    /// The header values become part of the key: only identical requests coalesce, and
    /// the matching partial (`206`) or not-modified (`304`) status is allowed to be shared.
    Key,
}

/// What a follower does when its maximum wait elapses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WaitTimeoutPolicy {
    /// Leave the flight and call the inner service itself (the default).
    #[default]
    OwnCall,
    /// Answer `504 Gateway Timeout`.
    GatewayTimeout,
}

/// What followers get when the leader's call fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ErrorPolicy {
    /// Every follower gets the leader's error, as a [`SharedError`](crate::error::SharedError)
    /// (the default).
    #[default]
    Share,
    /// Up to `max` followers (in the order they see the failure) retry with their own
    /// call, in parallel; the rest get the shared error.
    Retry {
        /// The most followers that retry per failed flight.
        max: usize,
    },
}

/// The configuration every service of one layer uses.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_shared_body: usize,
    pub(crate) lag_timeout: Duration,
    pub(crate) credentials: CredentialPolicy,
    pub(crate) range: HeaderPolicy,
    pub(crate) conditional: HeaderPolicy,
    pub(crate) allowed_status: Option<Arc<dyn Fn(StatusCode) -> bool + Send + Sync>>,
    pub(crate) max_wait: Option<Duration>,
    pub(crate) on_wait_timeout: WaitTimeoutPolicy,
    pub(crate) errors: ErrorPolicy,
    pub(crate) debug_header: bool,
    pub(crate) max_age: Option<Duration>,
    pub(crate) max_followers: Option<usize>,
    pub(crate) max_keys: Option<usize>,
    pub(crate) overflow: OverflowPolicy,
    #[cfg(feature = "micro-cache")]
    pub(crate) cache: Option<crate::cache::MicroCache>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_shared_body: DEFAULT_MAX_SHARED_BODY,
            lag_timeout: DEFAULT_LAG_TIMEOUT,
            credentials: CredentialPolicy::Bypass,
            range: HeaderPolicy::Bypass,
            conditional: HeaderPolicy::Bypass,
            allowed_status: None,
            max_wait: None,
            on_wait_timeout: WaitTimeoutPolicy::OwnCall,
            errors: ErrorPolicy::Share,
            debug_header: false,
            max_age: None,
            max_followers: None,
            max_keys: None,
            overflow: OverflowPolicy::RunAlone,
            #[cfg(feature = "micro-cache")]
            cache: None,
        }
    }
}

impl Config {
    /// The `x-singleflight` value to add to a response, if the debug header is on.
    pub(crate) fn label(&self, label: &'static str) -> Option<&'static str> {
        self.debug_header.then_some(label)
    }

    pub(crate) fn status_allowed(&self, status: StatusCode) -> bool {
        if let Some(allowed) = &self.allowed_status {
            return allowed(status);
        }
        match status.as_u16() {
            // Heuristically cacheable statuses (RFC 9111 section 4.2.2): the same for everyone.
            200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501 => true,
            206 => self.range == HeaderPolicy::Key,
            304 => self.conditional == HeaderPolicy::Key,
            _ => false,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("max_shared_body", &self.max_shared_body)
            .field("lag_timeout", &self.lag_timeout)
            .field("credentials", &self.credentials)
            .field("range", &self.range)
            .field("conditional", &self.conditional)
            .field("custom_allowed_status", &self.allowed_status.is_some())
            .field("max_wait", &self.max_wait)
            .field("on_wait_timeout", &self.on_wait_timeout)
            .field("errors", &self.errors)
            .field("debug_header", &self.debug_header)
            .field("max_age", &self.max_age)
            .field("max_followers", &self.max_followers)
            .field("max_keys", &self.max_keys)
            .field("overflow", &self.overflow)
            .finish()
    }
}

/// The state every service made by one layer shares: the flight map and the counters.
pub(crate) struct Shared<K> {
    pub(crate) group: Group<FlightKey<K>, Outcome>,
    pub(crate) config: Arc<Config>,
    pub(crate) counters: Arc<Counters>,
    pub(crate) credentials: CredentialHasher,
    #[cfg(feature = "micro-cache")]
    pub(crate) cache: Option<moka::sync::Cache<FlightKey<K>, Arc<crate::cache::Cached>>>,
}

/// Applies [`Singleflight`] to a service. See the [crate documentation](crate) for the
/// model, the safety rules and how to opt out of each.
///
/// Every service this layer makes (and every clone of them) shares one flight map, so
/// requests coalesce across connections. Configure the layer fully before taking its
/// [`stats`](SingleflightLayer::stats) handle or applying it: each builder method starts
/// a fresh map.
#[derive(Clone)]
pub struct SingleflightLayer<K: KeyFn = DefaultKey> {
    key_fn: K,
    config: Config,
    counters: Arc<Counters>,
    shared: Arc<Shared<K::Key>>,
}

impl<K: KeyFn + fmt::Debug> fmt::Debug for SingleflightLayer<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleflightLayer")
            .field("key_fn", &self.key_fn)
            .field("config", &self.config)
            .field("in_flight", &self.shared.group.len())
            .finish()
    }
}

impl Default for SingleflightLayer<DefaultKey> {
    fn default() -> Self {
        Self::new()
    }
}

impl SingleflightLayer<DefaultKey> {
    /// A layer with the safe defaults: `GET`/`HEAD` only; no coalescing of requests with
    /// credentials, `Range` or conditional headers; the [`DefaultKey`].
    pub fn new() -> Self {
        Self::build(DefaultKey::new(), Config::default(), Arc::default())
    }
}

impl<K: KeyFn> SingleflightLayer<K> {
    fn build(key_fn: K, config: Config, counters: Arc<Counters>) -> Self {
        let mut builder = Group::builder().clock(|| tokio::time::Instant::now().into_std());
        if let Some(max_age) = config.max_age {
            builder = builder.max_age(max_age);
        }
        if let Some(max) = config.max_followers {
            // The leader counts as a waiter of its flight.
            builder = builder.max_waiters_per_key(max.saturating_add(1));
        }
        if let Some(max) = config.max_keys {
            builder = builder.max_keys(max);
        }
        builder = builder.overflow(config.overflow);
        let shared = Arc::new(Shared {
            group: builder.build(),
            config: Arc::new(config.clone()),
            counters: Arc::clone(&counters),
            credentials: CredentialHasher::new(),
            #[cfg(feature = "micro-cache")]
            cache: config.cache.as_ref().map(crate::cache::MicroCache::build),
        });
        Self {
            key_fn,
            config,
            counters,
            shared,
        }
    }

    fn with(self, change: impl FnOnce(&mut Config)) -> Self {
        let mut config = self.config;
        change(&mut config);
        Self::build(self.key_fn, config, self.counters)
    }

    /// Uses `key_fn` to compute the resource part of the key (see [`KeyFn`]).
    pub fn key_fn<K2: KeyFn>(self, key_fn: K2) -> SingleflightLayer<K2> {
        SingleflightLayer::build(key_fn, self.config, self.counters)
    }

    /// The bound, in bytes, of a shared body's replay buffer (default
    /// [`DEFAULT_MAX_SHARED_BODY`], 8 MiB). When the fastest reader is this far ahead of
    /// the slowest, the fast ones wait for it up to the
    /// [`lag_timeout`](SingleflightLayer::lag_timeout); then it is cut off with
    /// [`Lagged`](crate::error::Lagged).
    pub fn max_shared_body(self, bytes: usize) -> Self {
        self.with(|c| c.max_shared_body = bytes)
    }

    /// How long the readers of a full replay buffer wait for the slowest reader before it
    /// is cut off with [`Lagged`](crate::error::Lagged) (default [`DEFAULT_LAG_TIMEOUT`],
    /// 1 s). This is the most a slow client can stall the others, per time it holds the
    /// buffer up.
    pub fn lag_timeout(self, timeout: Duration) -> Self {
        self.with(|c| c.lag_timeout = timeout)
    }

    /// What to do with requests carrying `Authorization` or `Cookie`.
    pub fn credentials(self, policy: CredentialPolicy) -> Self {
        self.with(|c| c.credentials = policy)
    }

    /// What to do with `Range` (and `If-Range`) requests.
    pub fn range(self, policy: HeaderPolicy) -> Self {
        self.with(|c| c.range = policy)
    }

    /// What to do with conditional requests (`If-None-Match`, `If-Modified-Since`,
    /// `If-Match`, `If-Unmodified-Since`).
    pub fn conditional(self, policy: HeaderPolicy) -> Self {
        self.with(|c| c.conditional = policy)
    }

    /// Which response statuses may be shared. The default allows the statuses RFC 9111
    /// calls heuristically cacheable (200, 203, 204, 300, 301, 308, 404, 405, 410, 414,
    /// 501), plus 206 and 304 when `Range` or conditional requests are keyed.
    pub fn allowed_status<F>(self, allowed: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        let allowed: Arc<dyn Fn(StatusCode) -> bool + Send + Sync> = Arc::new(allowed);
        self.with(move |c| c.allowed_status = Some(allowed))
    }

    /// The longest a follower waits for the leader's response head, then `policy`
    /// applies. Default: no limit (the flight's own bounds apply).
    pub fn max_wait(self, max: Duration, policy: WaitTimeoutPolicy) -> Self {
        self.with(|c| {
            c.max_wait = Some(max);
            c.on_wait_timeout = policy;
        })
    }

    /// After `max_age`, a flight takes no new followers and the next request starts a new
    /// flight. Bounds how long a stuck call can hold a key. Default: no limit.
    pub fn max_age(self, max_age: Duration) -> Self {
        self.with(|c| c.max_age = Some(max_age))
    }

    /// At most `max` followers per flight; the overflow policy applies to the next.
    pub fn max_followers(self, max: usize) -> Self {
        self.with(|c| c.max_followers = Some(max))
    }

    /// At most `max` keys in flight; the overflow policy applies to a request that would
    /// start another.
    pub fn max_keys(self, max: usize) -> Self {
        self.with(|c| c.max_keys = Some(max))
    }

    /// When a bound is reached: [`OverflowPolicy::RunAlone`] (the default) calls the inner
    /// service unshared; [`OverflowPolicy::Reject`] answers `503 Service Unavailable`.
    pub fn overflow(self, policy: OverflowPolicy) -> Self {
        self.with(|c| c.overflow = policy)
    }

    /// What followers get when the leader's call fails.
    pub fn errors(self, policy: ErrorPolicy) -> Self {
        self.with(|c| c.errors = policy)
    }

    /// Adds `x-singleflight: leader | follower | bypass | fallback | cache | layer` to every
    /// response, for
    /// debugging. Off by default.
    pub fn debug_header(self, on: bool) -> Self {
        self.with(|c| c.debug_header = on)
    }

    /// Keeps finished, shareable responses for a short linger (see [`MicroCache`]), so
    /// requests arriving just after a flight ends coalesce too. Off by default.
    ///
    /// [`MicroCache`]: crate::MicroCache
    #[cfg(feature = "micro-cache")]
    #[cfg_attr(docsrs, doc(cfg(feature = "micro-cache")))]
    pub fn micro_cache(self, cache: crate::cache::MicroCache) -> Self {
        self.with(|c| c.cache = Some(cache))
    }

    /// The counters of this layer and every service it makes.
    pub fn stats(&self) -> Stats {
        let shared = Arc::clone(&self.shared);
        Stats {
            counters: Arc::clone(&self.counters),
            in_flight: Arc::new(move || shared.group.len()),
        }
    }
}

impl<K: KeyFn> SingleflightLayer<K> {
    pub(crate) fn key_fn_ref(&self) -> &K {
        &self.key_fn
    }

    pub(crate) fn shared_ref(&self) -> Arc<Shared<K::Key>> {
        Arc::clone(&self.shared)
    }
}

impl<S, K: KeyFn + Clone> Layer<S> for SingleflightLayer<K> {
    type Service = Singleflight<S, K>;

    fn layer(&self, inner: S) -> Self::Service {
        Singleflight::from_parts(inner, self.key_fn.clone(), Arc::clone(&self.shared))
    }
}
