//! Order statistics over repeated runs, and ratios computed pair by pair within one run.
//!
//! Absolute numbers on a shared machine drift between runs; a ratio of two cases measured back to
//! back in the same round cancels most of that drift, which is why [`paired_ratios`] pairs the
//! samples of the same round instead of dividing two medians.

use serde::{Deserialize, Serialize};

/// The median and range of a set of samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    /// Median (the mean of the two middle samples for an even count).
    pub median: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub n: usize,
}

impl Spread {
    /// Summarises `samples`, ignoring NaNs; `None` when no finite sample is left.
    pub fn of(samples: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Spread {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }
}

/// The `q`-quantile (`0.0..=1.0`) of already sorted samples, by the nearest-rank method, which
/// always returns an observed value (as wrk and HdrHistogram do). `None` for no samples.
pub fn quantile_sorted<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let q = q.clamp(0.0, 1.0);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Ratios `case[i] / baseline[i]` for the rounds where both samples exist and the baseline is
/// non-zero. Samples are indexed by round, so each ratio compares two runs made back to back.
pub fn paired_ratios(case: &[Option<f64>], baseline: &[Option<f64>]) -> Vec<f64> {
    case.iter()
        .zip(baseline)
        .filter_map(|(c, b)| match (c, b) {
            (Some(c), Some(b)) if *b != 0.0 && c.is_finite() && b.is_finite() => Some(c / b),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_of_odd_and_even_counts() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.5, 1.0, 4.0, 4));
    }

    #[test]
    fn spread_ignores_nan_and_rejects_empty() {
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
        let s = Spread::of(&[f64::NAN, 5.0]).unwrap();
        assert_eq!((s.median, s.n), (5.0, 1));
    }

    #[test]
    fn nearest_rank_quantiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile_sorted(&v, 0.5), Some(50));
        assert_eq!(quantile_sorted(&v, 0.99), Some(99));
        assert_eq!(quantile_sorted(&v, 1.0), Some(100));
        assert_eq!(quantile_sorted(&v, 0.0), Some(1));
        assert_eq!(quantile_sorted(&[7u32], 0.99), Some(7));
        assert_eq!(quantile_sorted::<u32>(&[], 0.5), None);
    }

    #[test]
    fn ratios_pair_rounds_and_skip_gaps() {
        let case = [Some(200.0), None, Some(90.0), Some(10.0)];
        let base = [Some(100.0), Some(50.0), Some(100.0), Some(0.0)];
        assert_eq!(paired_ratios(&case, &base), vec![2.0, 0.9]);
    }

    #[test]
    fn paired_ratios_cancel_round_drift() {
        // The machine slows down by half in round 2; both cases do, the ratio does not move.
        let case = [Some(200.0), Some(100.0), Some(210.0)];
        let base = [Some(100.0), Some(50.0), Some(105.0)];
        let r = Spread::of(&paired_ratios(&case, &base)).unwrap();
        assert_eq!((r.min, r.max), (2.0, 2.0));
    }
}
