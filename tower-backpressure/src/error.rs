//! Errors: why a request was shed.
//!
//! HTTP services never see these (a shed request is answered with a response, see
//! [`BackpressureLayer`](crate::BackpressureLayer)); services behind
//! [`TypedBackpressure`](crate::TypedBackpressure) get an [`Overloaded`] boxed into their
//! error and detect it with `err.is::<Overloaded>()`.

use std::fmt;
use std::time::Duration;

/// Why a request was shed instead of being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ShedReason {
    /// The limit was reached and the queue was full: the request would have been served
    /// last (the newcomer in FIFO order, the oldest waiter in LIFO order, a normal waiter
    /// displaced by a high-priority request).
    QueueFull,
    /// The request waited in the queue longer than the queue timeout (or, in
    /// [`QueueOrder::Adaptive`](crate::QueueOrder::Adaptive) with a standing queue, longer
    /// than the CoDel target).
    QueueTimeout,
    /// The request's own deadline would pass (or passed) before it could be served.
    DeadlineUnreachable,
    /// The declared request body is larger than the whole byte budget, so it can never be
    /// admitted.
    TooLarge,
    /// The limiter was closed (for example during graceful shutdown).
    Closed,
}

impl ShedReason {
    /// Every reason, in a stable order (the order of the metrics labels).
    pub const ALL: [ShedReason; 5] = [
        ShedReason::QueueFull,
        ShedReason::QueueTimeout,
        ShedReason::DeadlineUnreachable,
        ShedReason::TooLarge,
        ShedReason::Closed,
    ];

    /// A short `snake_case` label for metrics, e.g. `queue_full`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ShedReason::QueueFull => "queue_full",
            ShedReason::QueueTimeout => "queue_timeout",
            ShedReason::DeadlineUnreachable => "deadline_unreachable",
            ShedReason::TooLarge => "too_large",
            ShedReason::Closed => "closed",
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            ShedReason::QueueFull => 0,
            ShedReason::QueueTimeout => 1,
            ShedReason::DeadlineUnreachable => 2,
            ShedReason::TooLarge => 3,
            ShedReason::Closed => 4,
        }
    }
}

impl fmt::Display for ShedReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ShedReason::QueueFull => "queue full",
            ShedReason::QueueTimeout => "queue timeout",
            ShedReason::DeadlineUnreachable => "deadline unreachable",
            ShedReason::TooLarge => "request body larger than the byte budget",
            ShedReason::Closed => "limiter closed",
        })
    }
}

/// The error a [`TypedBackpressure`](crate::TypedBackpressure) service returns for a shed
/// request.
///
/// It says why ([`reason`](Overloaded::reason)), what the limit was, and how long a client
/// should wait before retrying, computed from the current drain rate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Overloaded {
    reason: ShedReason,
    limit: usize,
    retry_after: Duration,
}

impl Overloaded {
    pub(crate) fn new(reason: ShedReason, limit: usize, retry_after: Duration) -> Self {
        Overloaded {
            reason,
            limit,
            retry_after,
        }
    }

    /// Why the request was shed.
    pub fn reason(&self) -> ShedReason {
        self.reason
    }

    /// The concurrency limit in force when the request was shed.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How long to wait before retrying: the time the current queue needs to drain at the
    /// measured service rate, rounded up to whole seconds, at least one second.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service overloaded: {} (limit {}, retry after {}s)",
            self.reason,
            self.limit,
            self.retry_after.as_secs()
        )
    }
}

impl std::error::Error for Overloaded {}

/// A builder setting outside its documented range, such as a
/// [`high_priority_share`](crate::BackpressureBuilder::high_priority_share) of `1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    setting: &'static str,
    value: String,
    expected: &'static str,
}

impl ConfigError {
    pub(crate) fn new(setting: &'static str, value: String, expected: &'static str) -> Self {
        ConfigError {
            setting,
            value,
            expected,
        }
    }

    /// The name of the builder method whose argument was invalid.
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {}: {} (must be {})",
            self.setting, self.value, self.expected
        )
    }
}

impl std::error::Error for ConfigError {}

/// The error a metered request body yields when streaming it would take the bytes in
/// flight past the byte budget (see
/// [`BackpressureBuilder::meter_bodies_with`](crate::BackpressureBuilder::meter_bodies_with)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BudgetExceeded {
    pub(crate) max_bytes: u64,
}

impl BudgetExceeded {
    /// The byte budget that would have been exceeded.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }
}

impl fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "request bodies in flight would exceed the byte budget of {} bytes",
            self.max_bytes
        )
    }
}

impl std::error::Error for BudgetExceeded {}
