//! The optional micro-cache: finished, shareable responses kept for a short `linger`, so
//! requests arriving just after a flight ends are served too (like nginx micro-caching).

use std::{fmt, hash::Hash, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header::CACHE_CONTROL, response::Parts, HeaderMap};
use tokio::time::Instant;

use crate::key::FlightKey;

/// Configuration of the micro-cache (feature `micro-cache`): how long a finished response
/// lingers, and how many entries and bytes the cache holds at most.
///
/// Only responses that passed every share-time check are kept, only if their whole body
/// fitted in the replay buffer and arrived without error, and never longer than their
/// `Cache-Control: max-age` / `s-maxage` allow (`max-age=0` means not at all). A hit is
/// checked against the response's `Vary`, like a follower.
#[derive(Debug, Clone, Copy)]
pub struct MicroCache {
    pub(crate) linger: Duration,
    pub(crate) max_entries: u64,
    pub(crate) max_bytes: u64,
}

impl MicroCache {
    /// Keep responses for `linger` (say one second), with at most 1,000 entries and 64 MiB.
    pub fn new(linger: Duration) -> Self {
        Self {
            linger,
            max_entries: 1_000,
            max_bytes: 64 * 1024 * 1024,
        }
    }

    /// At most `max` entries.
    pub fn max_entries(mut self, max: u64) -> Self {
        self.max_entries = max.max(1);
        self
    }

    /// At most `max` bytes of bodies (plus a per-entry allowance for heads).
    pub fn max_bytes(mut self, max: u64) -> Self {
        self.max_bytes = max.max(1);
        self
    }

    /// Whether a body of `bytes` may be kept: one larger than the whole byte bound never
    /// is (the cache would take it, then evict it, serving it meanwhile).
    pub(crate) fn admits(&self, bytes: usize) -> bool {
        u64::try_from(bytes).is_ok_and(|bytes| bytes <= self.max_bytes)
    }

    pub(crate) fn build<K>(&self) -> moka::sync::Cache<K, Arc<Cached>>
    where
        K: Hash + Eq + Send + Sync + 'static,
    {
        // Every entry weighs at least `max_bytes / max_entries`, so the byte bound also
        // bounds the number of entries.
        let floor = (self.max_bytes / self.max_entries).clamp(1, u64::from(u32::MAX));
        moka::sync::Cache::builder()
            .max_capacity(self.max_bytes)
            .weigher(move |_key, value: &Arc<Cached>| {
                let weight = (value.bytes as u64).max(floor);
                u32::try_from(weight).unwrap_or(u32::MAX)
            })
            // A backstop for memory; freshness is checked on every hit with tokio's clock.
            .time_to_live(self.linger)
            .build()
    }
}

/// A finished response kept in the micro-cache.
pub(crate) struct Cached {
    pub(crate) head: Parts,
    pub(crate) leader_headers: HeaderMap,
    pub(crate) chunks: Vec<Bytes>,
    pub(crate) trailers: Option<HeaderMap>,
    pub(crate) bytes: usize,
    pub(crate) expires_at: Instant,
}

impl fmt::Debug for Cached {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cached")
            .field("status", &self.head.status)
            .field("bytes", &self.bytes)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// How long a response may linger: `linger`, capped by `s-maxage` or `max-age`.
pub(crate) fn freshness(headers: &HeaderMap, linger: Duration) -> Duration {
    let mut max_age = None;
    let mut s_maxage = None;
    for value in headers.get_all(CACHE_CONTROL) {
        let Ok(value) = value.to_str() else {
            return Duration::ZERO;
        };
        for directive in value.split(',') {
            let mut parts = directive.splitn(2, '=');
            let name = parts.next().unwrap_or("").trim();
            let seconds = parts
                .next()
                .map(|v| v.trim().trim_matches('"').parse::<u64>().unwrap_or(0));
            if name.eq_ignore_ascii_case("max-age") {
                max_age = Some(seconds.unwrap_or(0));
            } else if name.eq_ignore_ascii_case("s-maxage") {
                s_maxage = Some(seconds.unwrap_or(0));
            }
        }
    }
    match s_maxage.or(max_age) {
        Some(seconds) => linger.min(Duration::from_secs(seconds)),
        None => linger,
    }
}

/// A fresh cached response for `key` that the request's headers agree with on `Vary`; a
/// `HEAD` may be served from the `GET` entry.
pub(crate) fn lookup<K>(
    cache: &moka::sync::Cache<FlightKey<K>, Arc<Cached>>,
    key: &FlightKey<K>,
    request: &HeaderMap,
) -> Option<Arc<Cached>>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    let get_key;
    let candidates: [Option<&FlightKey<K>>; 2] = if key.head {
        get_key = FlightKey {
            head: false,
            ..key.clone()
        };
        [Some(&get_key), Some(key)]
    } else {
        [Some(key), None]
    };
    for candidate in candidates.into_iter().flatten() {
        let Some(hit) = cache.get(candidate) else {
            continue;
        };
        if hit.expires_at <= Instant::now() {
            cache.invalidate(candidate);
            continue;
        }
        if crate::share::vary_matches(&hit.head.headers, &hit.leader_headers, request) {
            return Some(hit);
        }
    }
    None
}
