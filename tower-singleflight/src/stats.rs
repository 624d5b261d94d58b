//! Counters of the HTTP layer, readable from a [`Stats`] handle.

use std::{
    fmt,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
};

/// Why a request did not get a shared response.
///
/// Request-time reasons (the request never joined a flight) are counted once per request;
/// share-time reasons (the leader's response may not be shared) once per refused response;
/// [`VaryMismatch`](BypassReason::VaryMismatch) once per follower that ran its own call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BypassReason {
    /// The method is neither `GET` nor `HEAD`.
    Method,
    /// The request has `Authorization` or `Cookie` and credential partitioning is off.
    Credentials,
    /// The request has `Range` and range requests bypass.
    Range,
    /// The request is conditional (`If-None-Match`, `If-Modified-Since`, ...) and
    /// conditional requests bypass.
    Conditional,
    /// The custom key function returned `None`.
    NoKey,
    /// The maximum number of keys in flight or of followers for the key was reached.
    Overflow,
    /// The response status is not in the allowed set.
    Status,
    /// The response has `Set-Cookie`.
    SetCookie,
    /// The response has `Cache-Control: private`, `no-store` or `no-cache`.
    CacheControl,
    /// The response has `Vary: *`.
    VaryStar,
    /// A follower's request differs from the leader's in a header the response varies on.
    VaryMismatch,
}

impl BypassReason {
    /// Every reason, in a fixed order (for exporting counters).
    pub const ALL: [BypassReason; 11] = [
        BypassReason::Method,
        BypassReason::Credentials,
        BypassReason::Range,
        BypassReason::Conditional,
        BypassReason::NoKey,
        BypassReason::Overflow,
        BypassReason::Status,
        BypassReason::SetCookie,
        BypassReason::CacheControl,
        BypassReason::VaryStar,
        BypassReason::VaryMismatch,
    ];

    /// A short lowercase label, suitable as a metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            BypassReason::Method => "method",
            BypassReason::Credentials => "credentials",
            BypassReason::Range => "range",
            BypassReason::Conditional => "conditional",
            BypassReason::NoKey => "no_key",
            BypassReason::Overflow => "overflow",
            BypassReason::Status => "status",
            BypassReason::SetCookie => "set_cookie",
            BypassReason::CacheControl => "cache_control",
            BypassReason::VaryStar => "vary_star",
            BypassReason::VaryMismatch => "vary_mismatch",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for BypassReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Default)]
pub(crate) struct Counters {
    leaders: AtomicU64,
    followers: AtomicU64,
    fallbacks: AtomicU64,
    wait_timeouts: AtomicU64,
    shared_errors: AtomicU64,
    lagged: AtomicU64,
    cache_hits: AtomicU64,
    bypass: [AtomicU64; BypassReason::ALL.len()],
}

impl Counters {
    pub(crate) fn leader(&self) {
        self.leaders.fetch_add(1, Relaxed);
    }
    pub(crate) fn follower(&self) {
        self.followers.fetch_add(1, Relaxed);
    }
    pub(crate) fn fallback(&self) {
        self.fallbacks.fetch_add(1, Relaxed);
    }
    pub(crate) fn wait_timeout(&self) {
        self.wait_timeouts.fetch_add(1, Relaxed);
    }
    pub(crate) fn shared_error(&self) {
        self.shared_errors.fetch_add(1, Relaxed);
    }
    pub(crate) fn lagged(&self) {
        self.lagged.fetch_add(1, Relaxed);
    }
    #[cfg_attr(not(feature = "micro-cache"), allow(dead_code))]
    pub(crate) fn cache_hit(&self) {
        self.cache_hits.fetch_add(1, Relaxed);
    }
    pub(crate) fn bypass(&self, reason: BypassReason) {
        self.bypass[reason.index()].fetch_add(1, Relaxed);
    }
}

/// A handle on the counters of one [`SingleflightLayer`](crate::SingleflightLayer) and every
/// service it made. Cheap to clone; reads are relaxed snapshots.
#[derive(Clone)]
pub struct Stats {
    pub(crate) counters: Arc<Counters>,
    pub(crate) in_flight: Arc<dyn Fn() -> usize + Send + Sync>,
}

impl Stats {
    /// Requests that started a flight (called the inner service on behalf of others).
    pub fn leaders(&self) -> u64 {
        self.counters.leaders.load(Relaxed)
    }

    /// Requests that joined a flight instead of calling the inner service.
    pub fn followers(&self) -> u64 {
        self.counters.followers.load(Relaxed)
    }

    /// Requests that did not get a shared response, for `reason`.
    pub fn bypassed(&self, reason: BypassReason) -> u64 {
        self.counters.bypass[reason.index()].load(Relaxed)
    }

    /// Followers that ran their own call after all: the response was not shareable, it
    /// varied on a header they differ in, their wait timed out, or they retried an error.
    pub fn fallbacks(&self) -> u64 {
        self.counters.fallbacks.load(Relaxed)
    }

    /// Followers whose maximum wait elapsed.
    pub fn wait_timeouts(&self) -> u64 {
        self.counters.wait_timeouts.load(Relaxed)
    }

    /// Followers that got the leader's error.
    pub fn shared_errors(&self) -> u64 {
        self.counters.shared_errors.load(Relaxed)
    }

    /// Readers of a shared body cut off because they fell more than `max_shared_body`
    /// behind.
    pub fn lagged(&self) -> u64 {
        self.counters.lagged.load(Relaxed)
    }

    /// Requests served from the micro-cache (feature `micro-cache`).
    pub fn cache_hits(&self) -> u64 {
        self.counters.cache_hits.load(Relaxed)
    }

    /// Keys in flight now.
    pub fn in_flight(&self) -> usize {
        (self.in_flight)()
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Stats");
        s.field("leaders", &self.leaders())
            .field("followers", &self.followers())
            .field("fallbacks", &self.fallbacks())
            .field("wait_timeouts", &self.wait_timeouts())
            .field("shared_errors", &self.shared_errors())
            .field("lagged", &self.lagged())
            .field("cache_hits", &self.cache_hits())
            .field("in_flight", &self.in_flight());
        for reason in BypassReason::ALL {
            s.field(reason.as_str(), &self.bypassed(reason));
        }
        s.finish()
    }
}
