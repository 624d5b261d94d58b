//! Which waiter is served next: queue order and priority classes.

use std::time::Duration;

/// The order in which queued requests are served when a slot frees up, and so who is shed
/// when the queue is full.
///
/// A full queue always sheds the request that would be served last: in FIFO order that is
/// the newcomer (everyone queued is ahead of it), in LIFO order the oldest waiter of the
/// newcomer's class, whose place the newcomer takes. Either way the queue keeps the
/// requests it would serve first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum QueueOrder {
    /// Oldest first (the default). Fair, but under sustained overload every request waits
    /// the whole queue and many are answered after their client gave up.
    #[default]
    Fifo,
    /// Newest first. Under overload the requests most likely to still have a client are
    /// served, and the oldest ones time out in the queue or, when the queue is full, are
    /// shed to make room for newcomers.
    Lifo,
    /// FIFO while the queue drains, LIFO with a short sojourn bound once a standing queue
    /// forms (Facebook's adaptive LIFO with CoDel, "Fail at Scale").
    ///
    /// A *standing queue* means the queue has not been empty for `interval`. While it
    /// stands, the newest waiter is served first (a full queue sheds its oldest waiter for
    /// a newcomer, as in [`Lifo`](QueueOrder::Lifo)), and any waiter queued for longer
    /// than `target` is shed with [`ShedReason::QueueTimeout`](crate::ShedReason::QueueTimeout)
    /// (or earlier if the queue timeout is shorter). As soon as the queue empties the
    /// limiter returns to FIFO with the normal queue timeout.
    Adaptive {
        /// The sojourn bound while a standing queue exists (Facebook: 5 ms).
        target: Duration,
        /// How long the queue must stay non-empty to count as standing (Facebook: 100 ms).
        interval: Duration,
    },
}

impl QueueOrder {
    /// Adaptive order with Facebook's published numbers: 5 ms target, 100 ms interval.
    pub const fn adaptive() -> Self {
        QueueOrder::Adaptive {
            target: Duration::from_millis(5),
            interval: Duration::from_millis(100),
        }
    }
}

/// A request's priority class.
///
/// High-priority requests may use the whole limit; normal ones leave the reserved share
/// (see [`BackpressureBuilder::high_priority_share`](crate::BackpressureBuilder::high_priority_share))
/// free for them. High-priority waiters are always served before normal ones, so a
/// high-priority request that finds the queue full takes the place of the normal waiter
/// that would be served last (the newest in FIFO order, the oldest in LIFO order), which is
/// shed. A normal request never displaces a high-priority one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    /// Ordinary traffic (the default).
    #[default]
    Normal,
    /// Traffic that must get through under overload (admin, paying tenants, retries of
    /// critical work).
    High,
}

impl Priority {
    pub(crate) const fn index(self) -> usize {
        match self {
            Priority::Normal => 0,
            Priority::High => 1,
        }
    }
}
