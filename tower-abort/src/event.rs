use std::fmt;
use std::time::Duration;

use http::{Method, Uri};
use tokio::time::Instant;

use crate::AbortReason;

/// What [`AbortLayer::on_abort`](crate::AbortLayer::on_abort) hands to its callback when a
/// request's signal fires.
///
/// This is how request logs get a line for a request that never produced a response: a
/// [`ClientGone`](AbortReason::ClientGone) request has no response for a tracing layer to
/// see, so log [`status`](Self::status) (`499`) from here.
pub struct AbortEvent<'a> {
    pub(crate) reason: AbortReason,
    pub(crate) method: &'a Method,
    pub(crate) uri: Option<&'a Uri>,
    pub(crate) elapsed: Option<Duration>,
    pub(crate) deadline: Option<Instant>,
}

impl AbortEvent<'_> {
    /// Why the signal fired.
    pub fn reason(&self) -> AbortReason {
        self.reason
    }

    /// The status code to log for this request; see [`AbortReason::log_status`].
    pub fn status(&self) -> u16 {
        self.reason.log_status()
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        self.method
    }

    /// The request's URI. Always present in events given to an `on_abort` callback: the
    /// layer keeps a copy of the URI only when such a callback is set.
    pub fn uri(&self) -> Option<&Uri> {
        self.uri
    }

    /// Time from the request entering the layer to the signal firing.
    ///
    /// Present when the request had a deadline, with an `on_abort` callback, or with the
    /// `tracing` feature while `debug` events are enabled when the request arrives; otherwise
    /// the layer skips reading the clock and this is `None`.
    pub fn elapsed(&self) -> Option<Duration> {
        self.elapsed
    }

    /// The request's deadline, if it had one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
}

impl fmt::Debug for AbortEvent<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AbortEvent")
            .field("reason", &self.reason)
            .field("status", &self.status())
            .field("method", self.method)
            .field("uri", &self.uri)
            .field("elapsed", &self.elapsed)
            .field("deadline", &self.deadline)
            .finish()
    }
}

// The `tracing` events, compiled away without the `tracing` feature.

#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
pub(crate) fn fired(event: &AbortEvent<'_>) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_abort",
        reason = event.reason.as_str(),
        status = event.status(),
        method = %event.method,
        uri = event.uri.map(tracing::field::display),
        elapsed_ms = event.elapsed.map(|e| e.as_millis() as u64),
        "request aborted"
    );
}

#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
pub(crate) fn callback_panicked(reason: AbortReason) {
    #[cfg(feature = "tracing")]
    tracing::error!(
        target: "tower_abort",
        reason = reason.as_str(),
        "the on_abort callback (or a tracing subscriber) panicked; the panic was caught"
    );
}

/// Whether a fired signal's event may be recorded, so the layer needs the request's start
/// time for its `elapsed_ms`: `debug` events are on for some subscriber. The static and the
/// global maximum level (one relaxed load); no callsite lookup.
pub(crate) fn wants_elapsed() -> bool {
    #[cfg(feature = "tracing")]
    return tracing::level_enabled!(tracing::Level::DEBUG);
    #[cfg(not(feature = "tracing"))]
    false
}

#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
pub(crate) fn deadline_overflow(timeout: Duration) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_abort",
        timeout_secs = timeout.as_secs(),
        "ignoring a deadline beyond what the clock can represent"
    );
}

pub(crate) fn root_shutdown() {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: "tower_abort", "abort root shut down; in-flight requests see Shutdown");
}

#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
pub(crate) fn bad_deadline_header(name: &http::HeaderName, value: &http::HeaderValue, why: &str) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: "tower_abort", header = %name, value = ?value, why, "ignoring deadline header");
}

#[cfg_attr(not(feature = "tracing"), allow(unused_variables))]
pub(crate) fn backstop(reason: AbortReason, grace: Duration) {
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_abort",
        reason = reason.as_str(),
        grace_ms = grace.as_millis() as u64,
        "handler still running after the grace period; dropping it"
    );
}
