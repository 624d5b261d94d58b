//! Latency summaries: a log-scale histogram cheap enough to update on every request under
//! the limiter's lock, read into a [`Summary`] by the handle.

use std::time::Duration;

const BUCKETS: usize = 40;

/// A histogram of durations in power-of-two microsecond buckets (`[2^i, 2^(i+1))` µs).
#[derive(Clone, Debug)]
pub(crate) struct Histogram {
    counts: [u64; BUCKETS],
    count: u64,
    sum_micros: u128,
    max_micros: u64,
}

impl Histogram {
    pub(crate) const fn new() -> Self {
        Histogram {
            counts: [0; BUCKETS],
            count: 0,
            sum_micros: 0,
            max_micros: 0,
        }
    }

    pub(crate) fn record(&mut self, d: Duration) {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let bucket = (64 - micros.leading_zeros() as usize).min(BUCKETS - 1);
        self.counts[bucket] += 1;
        self.count += 1;
        self.sum_micros += u128::from(micros);
        self.max_micros = self.max_micros.max(micros);
    }

    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// The summary of these durations plus `zeros` more observations of zero.
    pub(crate) fn summary_with_zeros(&self, zeros: u64) -> Summary {
        if zeros == 0 {
            return self.summary();
        }
        let mut h = self.clone();
        h.counts[0] += zeros;
        h.count += zeros;
        h.summary()
    }

    fn quantile(&self, q: f64) -> Duration {
        if self.count == 0 {
            return Duration::ZERO;
        }
        let rank = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // Upper bound of the bucket, but never above the true maximum.
                let upper = if i == 0 { 0 } else { (1u64 << i) - 1 };
                return Duration::from_micros(upper.min(self.max_micros));
            }
        }
        Duration::from_micros(self.max_micros)
    }

    pub(crate) fn summary(&self) -> Summary {
        Summary {
            count: self.count,
            mean: if self.count == 0 {
                Duration::ZERO
            } else {
                Duration::from_micros((self.sum_micros / u128::from(self.count)) as u64)
            },
            p50: self.quantile(0.50),
            p90: self.quantile(0.90),
            p99: self.quantile(0.99),
            max: Duration::from_micros(self.max_micros),
        }
    }
}

/// A summary of observed durations since the limiter was built.
///
/// Quantiles come from power-of-two buckets, so they are upper bounds accurate to within a
/// factor of two (never above `max`); `mean` and `max` are exact to the microsecond.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Number of observations.
    pub count: u64,
    /// Mean.
    pub mean: Duration,
    /// Median (bucket upper bound).
    pub p50: Duration,
    /// 90th percentile (bucket upper bound).
    pub p90: Duration,
    /// 99th percentile (bucket upper bound).
    pub p99: Duration,
    /// Maximum.
    pub max: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_values() {
        let mut h = Histogram::new();
        for ms in 1..=100u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.max, Duration::from_millis(100));
        assert_eq!(s.mean, Duration::from_micros(50_500));
        // 50 ms lies in [32768, 65536) µs.
        assert_eq!(s.p50, Duration::from_micros(65_535));
        assert_eq!(s.p99, Duration::from_millis(100));
        assert_eq!(Histogram::new().summary(), Summary::default());
    }
}
