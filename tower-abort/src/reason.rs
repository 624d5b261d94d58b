use std::fmt;

/// Why an [`AbortSignal`](crate::AbortSignal) fired.
///
/// A signal fires at most once; its reason never changes afterwards. New reasons may be
/// added in minor releases, so match with a wildcard arm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AbortReason {
    /// Whoever was waiting for the response went away: the response future was dropped
    /// before it completed, or the response body was dropped before its end.
    ClientGone,
    /// The request's deadline passed: the server's default timeout or a deadline the
    /// client sent, whichever was sooner.
    DeadlineExceeded,
    /// The server-wide [`AbortRoot`](crate::AbortRoot) was shut down.
    Shutdown,
    /// Somebody called [`AbortSignal::abort`](crate::AbortSignal::abort).
    Explicit,
}

impl AbortReason {
    /// Every reason, in the order of their counters in [`AbortStats`](crate::AbortStats).
    pub const ALL: [AbortReason; 4] = [
        AbortReason::ClientGone,
        AbortReason::DeadlineExceeded,
        AbortReason::Shutdown,
        AbortReason::Explicit,
    ];

    /// A short `snake_case` name, stable across releases, for metric labels and logs.
    ///
    /// ```
    /// use tower_abort::AbortReason;
    /// assert_eq!(AbortReason::ClientGone.as_str(), "client_gone");
    /// ```
    pub const fn as_str(self) -> &'static str {
        match self {
            AbortReason::ClientGone => "client_gone",
            AbortReason::DeadlineExceeded => "deadline_exceeded",
            AbortReason::Shutdown => "shutdown",
            AbortReason::Explicit => "explicit",
        }
    }

    /// The status code a request log should record for a request aborted for this reason.
    ///
    /// `499` ("client closed request", as nginx logs it) for [`ClientGone`](Self::ClientGone)
    /// and [`Explicit`](Self::Explicit) (gRPC's `CANCELLED`), `504` for
    /// [`DeadlineExceeded`](Self::DeadlineExceeded), `503` for [`Shutdown`](Self::Shutdown).
    /// For a client that went away no response is sent at all; the number only exists for
    /// logs and metrics.
    pub const fn log_status(self) -> u16 {
        match self {
            AbortReason::ClientGone | AbortReason::Explicit => 499,
            AbortReason::DeadlineExceeded => 504,
            AbortReason::Shutdown => 503,
        }
    }

    pub(crate) const fn code(self) -> u8 {
        match self {
            AbortReason::ClientGone => 1,
            AbortReason::DeadlineExceeded => 2,
            AbortReason::Shutdown => 3,
            AbortReason::Explicit => 4,
        }
    }

    pub(crate) const fn from_code(code: u8) -> Option<AbortReason> {
        match code {
            1 => Some(AbortReason::ClientGone),
            2 => Some(AbortReason::DeadlineExceeded),
            3 => Some(AbortReason::Shutdown),
            4 => Some(AbortReason::Explicit),
            _ => None,
        }
    }

    pub(crate) const fn index(self) -> usize {
        self.code() as usize - 1
    }
}

impl fmt::Display for AbortReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AbortReason::ClientGone => "client gone",
            AbortReason::DeadlineExceeded => "deadline exceeded",
            AbortReason::Shutdown => "server shutting down",
            AbortReason::Explicit => "aborted explicitly",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_index_counters() {
        for (i, reason) in AbortReason::ALL.into_iter().enumerate() {
            assert_eq!(AbortReason::from_code(reason.code()), Some(reason));
            assert_eq!(reason.index(), i);
        }
        assert_eq!(AbortReason::from_code(0), None);
    }
}
