//! A handle to read and steer a running limiter.

use std::time::Duration;

use crate::error::ShedReason;
use crate::limiter::Limiter;
use crate::stats::Summary;

/// Live view of a limiter: gauges, counters, latency summaries, and run-time resizing.
///
/// Get one from [`BackpressureLayer::handle`](crate::BackpressureLayer::handle) (or the
/// typed layer's); it is cheap to clone and shares the layer's state.
#[derive(Clone, Debug)]
pub struct BackpressureHandle {
    pub(crate) limiter: Limiter,
}

impl BackpressureHandle {
    /// Requests inside the inner service now (holding a permit).
    pub fn in_flight(&self) -> usize {
        self.limiter.snapshot().in_flight
    }

    /// Requests waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.limiter.snapshot().queued
    }

    /// The concurrency limit now (moves with an adaptive strategy).
    pub fn limit(&self) -> usize {
        self.limiter.snapshot().limit
    }

    /// Sets the limit (at least 1). Raising it admits waiters at once; lowering it lets
    /// in-flight requests finish and admits no one until the count is below the new limit.
    /// An adaptive strategy continues from the new value.
    pub fn set_limit(&self, limit: usize) {
        self.limiter.set_limit(limit);
    }

    /// The queue bound now.
    pub fn max_queued(&self) -> usize {
        self.limiter.snapshot().max_queued
    }

    /// Changes the queue bound; waiters already queued stay.
    pub fn set_max_queued(&self, max_queued: usize) {
        self.limiter.set_max_queued(max_queued);
    }

    /// Bytes of request bodies reserved or counted as in flight now.
    pub fn bytes_in_flight(&self) -> u64 {
        self.limiter.snapshot().bytes_in_flight
    }

    /// Requests admitted so far (bypassed requests are not counted).
    pub fn admitted_total(&self) -> u64 {
        self.limiter.snapshot().admitted
    }

    /// Requests shed so far for `reason`.
    pub fn shed_count(&self, reason: ShedReason) -> u64 {
        self.limiter.snapshot().shed[reason.index()]
    }

    /// Requests shed so far, for any reason.
    pub fn shed_total(&self) -> u64 {
        self.limiter.snapshot().shed.iter().sum()
    }

    /// The highest `in_flight` seen since the limiter was built or [`reset_peaks`](Self::reset_peaks).
    pub fn peak_in_flight(&self) -> usize {
        self.limiter.snapshot().peak_in_flight
    }

    /// The highest `queued` seen since the limiter was built or [`reset_peaks`](Self::reset_peaks).
    pub fn peak_queued(&self) -> usize {
        self.limiter.snapshot().peak_queued
    }

    /// Resets both peaks to the current values.
    pub fn reset_peaks(&self) {
        self.limiter.reset_peaks();
    }

    /// Time admitted requests spent queued (zero for those admitted at once).
    pub fn queue_wait(&self) -> Summary {
        self.limiter.snapshot().queue_wait
    }

    /// Time from admission to permit release of requests that completed normally.
    ///
    /// Measured for every request that waited in the queue and, with an adaptive strategy,
    /// for every request; of the requests admitted at once, one in 64 is measured, so the
    /// uncontended path rarely reads the clock or takes a lock. The drain-rate estimate
    /// behind `Retry-After` uses the same samples.
    pub fn service_time(&self) -> Summary {
        self.limiter.snapshot().service_time
    }

    /// The `Retry-After` a request shed now would get.
    pub fn retry_after(&self) -> Duration {
        self.limiter.retry_after()
    }

    /// Stops admitting: queued requests and newcomers are shed with
    /// [`ShedReason::Closed`]; requests in flight finish normally. For graceful shutdown.
    pub fn close(&self) {
        self.limiter.close();
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.limiter.snapshot().closed
    }
}
