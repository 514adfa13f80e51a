//! Paired win rate with a percentile-bootstrap confidence interval.

use goodhart_core::Result;
use serde::{Deserialize, Serialize};

use crate::stats::{bootstrap, check_pair};

/// A win rate and its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WinRate {
    /// Fraction of pairs where `a` beats `b`, ties counting one half.
    pub rate: f64,
    /// Lower end of the percentile-bootstrap interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Confidence level of the interval.
    pub level: f64,
}

/// Win rate of `a` over `b` on paired samples (same prompts): score 1 if `a_i > b_i`,
/// 1/2 on a tie, 0 otherwise; the rate is the mean score. The interval is the
/// percentile bootstrap over `resamples` resamples of the pairs with replacement
/// (nearest-rank quantiles at `(1 - level)/2` and `(1 + level)/2`), drawn from the stream
/// `"metrics/win-rate"` of `seed` ([`goodhart_core::seed::rng`]): same seed, same
/// interval. Errors on empty, non-finite or mismatched input, `resamples = 0` or a level
/// outside (0, 1).
pub fn win_rate(a: &[f64], b: &[f64], resamples: usize, level: f64, seed: u64) -> Result<WinRate> {
    check_pair(a, "a", b, "b")?;
    let scores: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            if x > y {
                1.0
            } else if x == y {
                0.5
            } else {
                0.0
            }
        })
        .collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    let (lo, hi) = bootstrap(&scores, mean, resamples, level, seed, "metrics/win-rate")?;
    Ok(WinRate {
        rate: mean(&scores),
        lo,
        hi,
        level,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn win_rate_by_hand_and_interval_width() {
        // scores 1, 1/2, 0, 1 -> 0.625
        let w = win_rate(&[1.0, 2.0, 3.0, 4.0], &[0.0, 2.0, 5.0, 1.0], 500, 0.95, 1).unwrap();
        assert_eq!(w.rate, 0.625);
        assert!(w.lo <= w.rate && w.rate <= w.hi && w.lo >= 0.0 && w.hi <= 1.0);
        assert_eq!(
            w,
            win_rate(&[1.0, 2.0, 3.0, 4.0], &[0.0, 2.0, 5.0, 1.0], 500, 0.95, 1).unwrap()
        );
        // all wins: a degenerate interval at 1
        let w = win_rate(&[2.0; 10], &[1.0; 10], 200, 0.9, 0).unwrap();
        assert_eq!((w.rate, w.lo, w.hi), (1.0, 1.0, 1.0));
        // 400 pairs, half wins: se = sqrt(.25/400) = .025, 95% width about 4 se = .098
        let a: Vec<f64> = (0..400).map(|i| (i % 2) as f64).collect();
        let w = win_rate(&a, &[0.5; 400], 2000, 0.95, 7).unwrap();
        assert_eq!(w.rate, 0.5);
        assert!((w.hi - w.lo - 0.098).abs() < 0.015, "{w:?}");
        assert!(win_rate(&[], &[], 10, 0.95, 0).is_err());
        assert!(win_rate(&[1.0], &[1.0], 0, 0.95, 0).is_err());
        assert!(win_rate(&[1.0], &[1.0], 10, 1.0, 0).is_err());
    }
}
