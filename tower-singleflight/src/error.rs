//! Errors of the core [`Group`](crate::Group) and of the HTTP layer.

use std::{fmt, sync::Arc};

/// The error every waiter of a flight gets when the shared work could not produce a value.
///
/// Every waiter of one flight gets an equal error (they share one `Arc`), so a panic in the
/// work becomes an error for each of them rather than a hang or a process abort.
#[derive(Debug)]
pub struct FlightError {
    kind: Failure,
}

/// Why a flight failed; cloned into every waiter.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The shared future (or the closure creating it) panicked; the payload's message.
    Panicked(Arc<str>),
    /// The group's bounds were reached and its overflow policy is to reject.
    Overflow,
}

impl FlightError {
    pub(crate) fn new(kind: Failure) -> Self {
        Self { kind }
    }

    /// Whether the shared work panicked.
    pub fn is_panic(&self) -> bool {
        matches!(self.kind, Failure::Panicked(_))
    }

    /// Whether the call was refused because a bound of the group was reached
    /// ([`OverflowPolicy::Reject`](crate::OverflowPolicy::Reject)).
    pub fn is_overflow(&self) -> bool {
        matches!(self.kind, Failure::Overflow)
    }

    /// The panic message, when the shared work panicked with a string payload.
    pub fn panic_message(&self) -> Option<&str> {
        match &self.kind {
            Failure::Panicked(msg) => Some(msg),
            Failure::Overflow => None,
        }
    }
}

impl fmt::Display for FlightError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Failure::Panicked(msg) => write!(f, "shared work panicked: {msg}"),
            Failure::Overflow => f.write_str("singleflight bounds reached"),
        }
    }
}

impl std::error::Error for FlightError {}

impl Failure {
    pub(crate) fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let msg: Arc<str> = if let Some(s) = payload.downcast_ref::<&'static str>() {
            Arc::from(*s)
        } else if let Some(s) = payload.downcast_ref::<String>() {
            Arc::from(s.as_str())
        } else {
            Arc::from("non-string panic payload")
        };
        Failure::Panicked(msg)
    }
}

/// The boxed error type of the HTTP layer, as in tower.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// An error of the leader's call or of its response body, as every follower sees it.
///
/// All followers of one flight share one error (an `Arc`); the original is its
/// [`source`](std::error::Error::source). Detect it with `err.is::<SharedError>()`.
#[derive(Debug, Clone)]
pub struct SharedError {
    inner: Arc<BoxError>,
}

impl SharedError {
    pub(crate) fn new(inner: BoxError) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    pub(crate) fn from_arc(inner: Arc<BoxError>) -> Self {
        Self { inner }
    }
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shared call failed: {}", self.inner)
    }
}

impl std::error::Error for SharedError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&**self.inner)
    }
}

/// A reader of a shared response body fell more than `max_shared_body` bytes behind the
/// fastest reader and was cut off, so that it cannot stall the others. Its response ends
/// with this error, never with a clean (truncated) end.
#[derive(Debug)]
pub struct Lagged {
    max_shared_body: usize,
}

impl Lagged {
    pub(crate) fn new(max_shared_body: usize) -> Self {
        Self { max_shared_body }
    }
}

impl fmt::Display for Lagged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fell more than {} bytes behind the shared response body",
            self.max_shared_body
        )
    }
}

impl std::error::Error for Lagged {}
