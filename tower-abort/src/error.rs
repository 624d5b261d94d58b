//! Errors.
//!
//! The [`Abort`](crate::Abort) service itself cannot fail: it passes the inner service's
//! error through and answers a deadline with a response. Errors appear in two places: the
//! response body, when a deadline passes after the headers were sent, and the outgoing
//! call made through [`PropagateAbort`](crate::PropagateAbort). [`InvalidTimeout`] is what
//! [`TimeoutFormat::parse`](crate::TimeoutFormat::parse) says about a malformed header
//! value (the layer ignores such values).

use std::fmt;

use crate::AbortReason;

/// A boxed error, as tower uses.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request's signal fired: the body was ended, or the outgoing call was cancelled.
///
/// Detect it with `err.is::<Aborted>()` or `err.downcast_ref::<Aborted>()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Aborted {
    reason: AbortReason,
}

impl Aborted {
    pub(crate) fn new(reason: AbortReason) -> Self {
        Aborted { reason }
    }

    /// Why the signal fired.
    pub fn reason(&self) -> AbortReason {
        self.reason
    }
}

impl fmt::Display for Aborted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request aborted: {}", self.reason)
    }
}

impl std::error::Error for Aborted {}

/// A deadline header value that [`TimeoutFormat::parse`](crate::TimeoutFormat::parse)
/// rejects: not the format's digits and unit, or too many digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidTimeout {
    why: &'static str,
}

impl InvalidTimeout {
    pub(crate) fn new(why: &'static str) -> Self {
        InvalidTimeout { why }
    }

    /// Why the value was rejected, for logs.
    pub fn why(&self) -> &'static str {
        self.why
    }
}

impl fmt::Display for InvalidTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid timeout header value: {}", self.why)
    }
}

impl std::error::Error for InvalidTimeout {}
