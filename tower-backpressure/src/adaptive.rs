//! Adaptive limits: strategies that move the concurrency limit from observed latency and
//! outcomes, inside fixed `[min, max]` clamps.
//!
//! Each finished request gives one sample: its service time (admission to permit release)
//! and its [`Outcome`]. `Overload` samples (5xx, 429, errors, timeouts) make the limit
//! back off multiplicatively; `Ignore` samples (4xx, client cancels) are not fed to the
//! strategy at all, so a client that gives up never teaches the server to shrink.
//!
//! - [`Aimd`]: additive increase (about `+increase_by` per round trip while the limit is
//!   actually used), multiplicative decrease on overload or when latency passes a
//!   threshold. Predictable; the right default when you know your latency budget.
//! - [`Gradient`]: compares the smoothed service time with the minimum seen in a window
//!   (Netflix's Gradient2 / Envoy's adaptive concurrency): the limit moves towards
//!   `limit * clamp(min_rtt * (1 + tolerance) / rtt, 0.5, 1) + sqrt(limit)`, so it grows by
//!   about `sqrt(limit)` while latency stays near the minimum and shrinks once queueing
//!   shows; overload backs off multiplicatively and freezes growth for one round trip.
//!   Finds the latency knee with no threshold to configure.
//!
//! Decreases happen at most once per smoothed round trip, so a burst of failures from one
//! overload episode backs off once rather than collapsing the limit to its minimum.

use std::time::Duration;

use tokio::time::Instant;

/// How a finished request should be counted by an adaptive limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Served normally: a latency sample for the strategy.
    Success,
    /// A sign of overload downstream (5xx, 429, an error or a timeout): the limit backs off.
    Overload,
    /// Says nothing about capacity (4xx, client cancelled, body dropped early): not sampled.
    Ignore,
}

/// The default classification of HTTP responses: `429` and `5xx` are overload, other
/// `4xx` are ignored, everything else is a success.
pub fn classify_status(status: http::StatusCode) -> Outcome {
    if status == http::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        Outcome::Overload
    } else if status.is_client_error() {
        Outcome::Ignore
    } else {
        Outcome::Success
    }
}

/// How the concurrency limit is chosen.
#[derive(Clone, Copy, Debug, Default)]
#[non_exhaustive]
pub enum LimitStrategy {
    /// The limit stays at what the layer was built with (or what
    /// [`BackpressureHandle::set_limit`](crate::BackpressureHandle::set_limit) sets).
    #[default]
    Fixed,
    /// Additive increase, multiplicative decrease.
    Aimd(Aimd),
    /// Gradient against the minimum observed service time.
    Gradient(Gradient),
}

/// Additive-increase / multiplicative-decrease limit. See the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct Aimd {
    pub(crate) min_limit: usize,
    pub(crate) max_limit: usize,
    pub(crate) increase_by: f64,
    pub(crate) backoff_ratio: f64,
    pub(crate) latency_threshold: Option<Duration>,
}

impl Default for Aimd {
    fn default() -> Self {
        Aimd::new()
    }
}

impl Aimd {
    /// Defaults: limits `1..=1000`, `+1` per round trip, `x0.9` on overload, no latency
    /// threshold (only outcomes make it back off).
    pub const fn new() -> Self {
        Aimd {
            min_limit: 1,
            max_limit: 1000,
            increase_by: 1.0,
            backoff_ratio: 0.9,
            latency_threshold: None,
        }
    }

    /// Clamps the limit to `min..=max` (`min` is raised to at least 1, `max` to at least `min`).
    pub fn limits(mut self, min: usize, max: usize) -> Self {
        self.min_limit = min.max(1);
        self.max_limit = max.max(self.min_limit);
        self
    }

    /// How much the limit grows per round trip while it is in use (default `1`).
    pub fn increase_by(mut self, step: f64) -> Self {
        self.increase_by = if step.is_finite() && step > 0.0 {
            step
        } else {
            1.0
        };
        self
    }

    /// The factor applied on overload, in `(0, 1)` (default `0.9`); out-of-range values are
    /// clamped to `[0.5, 0.99]`.
    pub fn backoff_ratio(mut self, ratio: f64) -> Self {
        self.backoff_ratio = if ratio.is_finite() {
            ratio.clamp(0.5, 0.99)
        } else {
            0.9
        };
        self
    }

    /// A service time above `threshold` counts as overload (default: none).
    pub fn latency_threshold(mut self, threshold: Duration) -> Self {
        self.latency_threshold = Some(threshold);
        self
    }
}

/// Gradient limit against the minimum observed service time. See the [module docs](self).
#[derive(Clone, Copy, Debug)]
pub struct Gradient {
    pub(crate) min_limit: usize,
    pub(crate) max_limit: usize,
    pub(crate) tolerance: f64,
    pub(crate) smoothing: f64,
    pub(crate) backoff_ratio: f64,
    pub(crate) min_rtt_window: Duration,
}

impl Default for Gradient {
    fn default() -> Self {
        Gradient::new()
    }
}

impl Gradient {
    /// Defaults: limits `1..=1000`, tolerance `0.25` (samples up to 25 % above the minimum
    /// count as no queueing), smoothing `0.2`, `x0.9` on overload, minimum re-measured
    /// every 30 s.
    pub const fn new() -> Self {
        Gradient {
            min_limit: 1,
            max_limit: 1000,
            tolerance: 0.25,
            smoothing: 0.2,
            backoff_ratio: 0.9,
            min_rtt_window: Duration::from_secs(30),
        }
    }

    /// Clamps the limit to `min..=max` (`min` is raised to at least 1, `max` to at least `min`).
    pub fn limits(mut self, min: usize, max: usize) -> Self {
        self.min_limit = min.max(1);
        self.max_limit = max.max(self.min_limit);
        self
    }

    /// How far above the minimum service time a sample may be before the limit shrinks,
    /// as a fraction (default `0.25`), clamped to `[0, 10]`.
    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = if tolerance.is_finite() {
            tolerance.clamp(0.0, 10.0)
        } else {
            0.25
        };
        self
    }

    /// How far the limit moves towards its target per round trip, in `(0, 1]` (default `0.2`).
    pub fn smoothing(mut self, smoothing: f64) -> Self {
        self.smoothing = if smoothing.is_finite() {
            smoothing.clamp(0.01, 1.0)
        } else {
            0.2
        };
        self
    }

    /// How often the minimum service time is forgotten and re-measured (default 30 s), so
    /// a service that got permanently slower is not held to an old best case.
    pub fn min_rtt_window(mut self, window: Duration) -> Self {
        self.min_rtt_window = window.max(Duration::from_millis(1));
        self
    }
}

/// The running state of an adaptive strategy; lives inside the limiter's lock.
#[derive(Debug)]
pub(crate) struct AdaptiveState {
    limit: f64,
    smoothed_rtt: Option<f64>,
    last_decrease: Option<Instant>,
    min_rtt: Option<(f64, Instant)>,
}

impl AdaptiveState {
    pub(crate) fn new(initial: usize) -> Self {
        AdaptiveState {
            limit: initial as f64,
            smoothed_rtt: None,
            last_decrease: None,
            min_rtt: None,
        }
    }

    /// Resets the fractional limit after a manual resize.
    pub(crate) fn set(&mut self, limit: usize) {
        self.limit = limit as f64;
    }

    /// Feeds one sample; returns the new integer limit.
    pub(crate) fn sample(
        &mut self,
        strategy: &LimitStrategy,
        now: Instant,
        rtt: Duration,
        outcome: Outcome,
        in_flight: usize,
    ) -> Option<usize> {
        let rtt = rtt.as_secs_f64();
        let (min, max) = match strategy {
            LimitStrategy::Fixed => return None,
            LimitStrategy::Aimd(a) => (a.min_limit, a.max_limit),
            LimitStrategy::Gradient(g) => (g.min_limit, g.max_limit),
        };
        if outcome == Outcome::Ignore {
            return None;
        }
        let overloaded = outcome == Outcome::Overload
            || matches!(strategy, LimitStrategy::Aimd(Aimd { latency_threshold: Some(t), .. })
                if rtt > t.as_secs_f64());
        if !overloaded {
            self.smoothed_rtt = Some(match self.smoothed_rtt {
                Some(s) => s * 0.8 + rtt * 0.2,
                None => rtt,
            });
        }
        // A limit that is not used says nothing about whether a larger one would be safe.
        let utilised = (in_flight as f64) * 2.0 >= self.limit;
        if overloaded {
            let window = self.smoothed_rtt.unwrap_or(rtt);
            let due = match self.last_decrease {
                Some(at) => now.saturating_duration_since(at).as_secs_f64() >= window,
                None => true,
            };
            if due {
                let ratio = match strategy {
                    LimitStrategy::Aimd(a) => a.backoff_ratio,
                    LimitStrategy::Gradient(g) => g.backoff_ratio,
                    LimitStrategy::Fixed => 1.0,
                };
                self.limit *= ratio;
                self.last_decrease = Some(now);
            }
        } else {
            match strategy {
                LimitStrategy::Aimd(a) => {
                    if utilised {
                        self.limit += a.increase_by / self.limit.max(1.0);
                    }
                }
                LimitStrategy::Gradient(g) => {
                    let min_rtt = match self.min_rtt {
                        Some((m, since))
                            if now.saturating_duration_since(since) < g.min_rtt_window =>
                        {
                            if rtt < m {
                                self.min_rtt = Some((rtt, since));
                                rtt
                            } else {
                                m
                            }
                        }
                        _ => {
                            self.min_rtt = Some((rtt, now));
                            rtt
                        }
                    };
                    // The smoothed service time, so one slow request does not swing the limit.
                    let recent = self.smoothed_rtt.unwrap_or(rtt);
                    let gradient = if recent > 0.0 {
                        (min_rtt * (1.0 + g.tolerance) / recent).clamp(0.5, 1.0)
                    } else {
                        1.0
                    };
                    let headroom = self.limit.sqrt();
                    let target = self.limit * gradient + headroom;
                    // No growth for one round trip after backing off: the successes of
                    // that round trip were admitted at the old, too-high limit.
                    let settling = self
                        .last_decrease
                        .is_some_and(|at| now.saturating_duration_since(at).as_secs_f64() < recent);
                    if target < self.limit || (utilised && !settling) {
                        // About `limit` samples arrive per round trip; weighting each by
                        // `1 / limit` moves the limit `smoothing` of the way per round
                        // trip, which keeps the loop from overshooting its own lag.
                        let weight = g.smoothing / self.limit.max(1.0);
                        self.limit += (target - self.limit) * weight;
                    }
                }
                LimitStrategy::Fixed => {}
            }
        }
        self.limit = self.limit.clamp(min as f64, max as f64);
        Some(self.limit.floor() as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_classification() {
        use http::StatusCode;
        assert_eq!(classify_status(StatusCode::OK), Outcome::Success);
        assert_eq!(classify_status(StatusCode::NOT_FOUND), Outcome::Ignore);
        assert_eq!(classify_status(StatusCode::BAD_REQUEST), Outcome::Ignore);
        assert_eq!(
            classify_status(StatusCode::TOO_MANY_REQUESTS),
            Outcome::Overload
        );
        assert_eq!(
            classify_status(StatusCode::SERVICE_UNAVAILABLE),
            Outcome::Overload
        );
        assert_eq!(
            classify_status(StatusCode::GATEWAY_TIMEOUT),
            Outcome::Overload
        );
    }

    #[test]
    fn aimd_clamps_and_backs_off_once_per_round_trip() {
        let strategy = LimitStrategy::Aimd(Aimd::new().limits(2, 5));
        let mut state = AdaptiveState::new(4);
        let t0 = Instant::now();
        let rtt = Duration::from_millis(10);
        for _ in 0..1000 {
            state.sample(&strategy, t0, rtt, Outcome::Success, 10);
        }
        assert_eq!(state.limit.floor() as usize, 5, "clamped at max");
        // Two overload samples in the same round trip back off once.
        state.sample(&strategy, t0, rtt, Outcome::Overload, 5);
        state.sample(&strategy, t0, rtt, Outcome::Overload, 5);
        assert!((state.limit - 4.5).abs() < 1e-9, "{}", state.limit);
        for i in 0..100 {
            state.sample(
                &strategy,
                t0 + Duration::from_millis(20 * (i + 1)),
                rtt,
                Outcome::Overload,
                5,
            );
        }
        assert_eq!(state.limit, 2.0, "clamped at min");
        // Ignored samples change nothing.
        assert_eq!(state.sample(&strategy, t0, rtt, Outcome::Ignore, 5), None);
    }

    #[test]
    fn unused_limit_does_not_grow() {
        let strategy = LimitStrategy::Aimd(Aimd::new());
        let mut state = AdaptiveState::new(10);
        let t0 = Instant::now();
        for _ in 0..1000 {
            state.sample(&strategy, t0, Duration::from_millis(1), Outcome::Success, 1);
        }
        assert_eq!(state.limit, 10.0);
    }
}
