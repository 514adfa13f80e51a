//! Statistics on plain series (`&[f64]`): validation, summaries, the median with a
//! bootstrap interval, Wilcoxon's signed-rank test, Pearson and Spearman correlation, the
//! least-squares slope, and the small least-squares solver the overoptimisation fits use.
//!
//! Everything here works on host memory: the series are per-step or per-response values
//! that are already scalars (a run's gold curve, a batch's rewards read back once).

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

/// Error unless `x` is non-empty and every value is finite.
pub fn check_series(x: &[f64], what: &str) -> Result<()> {
    if x.is_empty() {
        return Err(GoodhartError::Empty { what: what.into() });
    }
    if x.iter().any(|v| !v.is_finite()) {
        return Err(GoodhartError::NonFinite { what: what.into() });
    }
    Ok(())
}

/// Error unless `a` and `b` are valid series ([`check_series`]) of the same length.
pub fn check_pair(a: &[f64], a_name: &str, b: &[f64], b_name: &str) -> Result<()> {
    check_series(a, a_name)?;
    check_series(b, b_name)?;
    if a.len() != b.len() {
        return Err(GoodhartError::shape(
            format!("{b_name} (to match {a_name})"),
            &[a.len()],
            &[b.len()],
        ));
    }
    Ok(())
}

/// Arithmetic mean of a valid series.
pub fn mean(x: &[f64]) -> Result<f64> {
    check_series(x, "series")?;
    Ok(x.iter().sum::<f64>() / x.len() as f64)
}

/// Median of a valid series (the mean of the two middle values for an even count).
pub fn median(x: &[f64]) -> Result<f64> {
    check_series(x, "series")?;
    let mut v = x.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Ok(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// A statistic with its percentile-bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    /// The statistic on the sample.
    pub value: f64,
    /// Lower end of the interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
}

/// The percentile-bootstrap interval of `statistic` on `x`: `resamples` resamples of `x`
/// with replacement drawn from the stream `stream` of `seed`, nearest-rank quantiles of
/// the resampled statistic at `(1 - level)/2` and `(1 + level)/2`. Errors on an empty or
/// non-finite series, `resamples = 0` or a level outside (0, 1).
pub fn bootstrap(
    x: &[f64],
    statistic: impl Fn(&[f64]) -> f64,
    resamples: usize,
    level: f64,
    seed: u64,
    stream: &str,
) -> Result<(f64, f64)> {
    use rand::RngExt as _;
    check_series(x, "series")?;
    if resamples == 0 {
        return Err(GoodhartError::invalid("resamples", "must be at least 1"));
    }
    if !(level > 0.0 && level < 1.0) {
        return Err(GoodhartError::invalid("level", "must be in (0, 1)"));
    }
    let n = x.len();
    let mut rng = goodhart_core::seed::rng(seed, stream);
    let mut draw = vec![0.0; n];
    let mut boot: Vec<f64> = (0..resamples)
        .map(|_| {
            for d in draw.iter_mut() {
                *d = x[rng.random_range(0..n)];
            }
            statistic(&draw)
        })
        .collect();
    boot.sort_by(f64::total_cmp);
    let q = |p: f64| boot[((p * resamples as f64).ceil() as usize).clamp(1, resamples) - 1];
    Ok((q((1.0 - level) / 2.0), q((1.0 + level) / 2.0)))
}

/// The median of `x` with its percentile-bootstrap interval ([`bootstrap`], stream
/// `"metrics/median"` of `seed`: same seed, same interval).
pub fn median_interval(x: &[f64], resamples: usize, level: f64, seed: u64) -> Result<Interval> {
    let value = median(x)?;
    let (lo, hi) = bootstrap(
        x,
        |d| median(d).unwrap_or(f64::NAN),
        resamples,
        level,
        seed,
        "metrics/median",
    )?;
    Ok(Interval { value, lo, hi })
}

/// Count, mean, standard deviation, minimum and maximum of a series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Number of values.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Sample standard deviation (`n - 1` divisor, as `torch.std` and TRL's logged
    /// `reward_std`); 0 for a single value.
    pub std: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

/// [`Summary`] of a non-empty, finite series (two passes, no cancellation).
pub fn summary(x: &[f64]) -> Result<Summary> {
    check_series(x, "series")?;
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let ss: f64 = x.iter().map(|v| (v - mean).powi(2)).sum();
    let std = if x.len() > 1 {
        (ss / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let (min, max) = x
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    Ok(Summary {
        count: x.len(),
        mean,
        std,
        min,
        max,
    })
}

/// Pearson correlation `sum (x - mx)(y - my) / sqrt(sum (x - mx)^2 sum (y - my)^2)`.
///
/// Errors on empty, non-finite or mismatched input, and with `InvalidArgument` when
/// either series is constant (the correlation is undefined there; scipy returns NaN).
///
/// ```
/// use goodhart_metrics::stats::pearson;
/// // Deviations -1, 0, 1 and -13/6, -1/6, 14/6: r = 4.5 / sqrt(2 * 61 / 6).
/// let r = pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5])?;
/// assert!((r - 4.5 / (61.0f64 / 3.0).sqrt()).abs() < 1e-12);
/// // A constant series has no correlation: an error, not NaN.
/// assert!(pearson(&[1.0, 1.0], &[0.0, 1.0]).is_err());
/// # Ok::<(), goodhart_core::GoodhartError>(())
/// ```
pub fn pearson(x: &[f64], y: &[f64]) -> Result<f64> {
    check_pair(x, "x", y, "y")?;
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        let (da, db) = (a - mx, b - my);
        sxy += da * db;
        sxx += da * da;
        syy += db * db;
    }
    if sxx == 0.0 || syy == 0.0 {
        return Err(GoodhartError::invalid(
            if sxx == 0.0 { "x" } else { "y" },
            "constant series: correlation is undefined",
        ));
    }
    Ok((sxy / (sxx.sqrt() * syy.sqrt())).clamp(-1.0, 1.0))
}

/// The least-squares slope of `y` on `x` with an intercept, `S_xy / S_xx`. Errors on
/// empty, non-finite or mismatched input, and with `InvalidArgument` when `x` is constant
/// (one point included: the slope is undefined).
///
/// ```
/// use goodhart_metrics::stats::slope;
/// // Deviations of x: -1, 0, 1, so S_xx = 2 and S_xy = -2 + 6.5 = 4.5 (the deviations
/// // sum to 0, so y's mean drops out): 4.5 / 2.
/// assert!((slope(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.5])? - 2.25).abs() < 1e-12);
/// assert!(slope(&[1.0, 1.0], &[0.0, 1.0]).is_err());
/// # Ok::<(), goodhart_core::GoodhartError>(())
/// ```
pub fn slope(x: &[f64], y: &[f64]) -> Result<f64> {
    check_pair(x, "x", y, "y")?;
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (a, b) in x.iter().zip(y) {
        sxy += (a - mx) * (b - my);
        sxx += (a - mx) * (a - mx);
    }
    if sxx == 0.0 {
        return Err(GoodhartError::invalid(
            "x",
            "constant series: the slope is undefined",
        ));
    }
    Ok(sxy / sxx)
}

/// 1-based ranks with ties given the average of the ranks they span (`scipy.stats.rankdata`
/// `method="average"`). Input must be finite.
pub fn ranks(x: &[f64]) -> Result<Vec<f64>> {
    check_series(x, "x")?;
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[a].total_cmp(&x[b]));
    let mut out = vec![0.0; x.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && x[order[j + 1]] == x[order[i]] {
            j += 1;
        }
        // positions i..=j (0-based) share ranks i+1 ..= j+1: average (i + j)/2 + 1.
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &order[i..=j] {
            out[k] = r;
        }
        i = j + 1;
    }
    Ok(out)
}

/// Spearman rank correlation: Pearson correlation of the average ranks ([`ranks`]).
/// Errors as [`pearson`] does (a constant series has constant ranks).
pub fn spearman(x: &[f64], y: &[f64]) -> Result<f64> {
    check_pair(x, "x", y, "y")?;
    pearson(&ranks(x)?, &ranks(y)?)
}

/// Wilcoxon's signed-rank test of paired differences: statistic and two-sided p-value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SignedRank {
    /// The smaller of the positive and negative differences' rank sums.
    pub statistic: f64,
    /// Two-sided p-value against differences symmetric about 0.
    pub p_value: f64,
    /// Non-zero differences ranked.
    pub n: usize,
    /// Whether the p-value is exact (no zeros, no ties, `n <= 50`) or the normal
    /// approximation.
    pub exact: bool,
}

/// Wilcoxon's signed-rank test of `d` (paired differences, e.g. one per seed) against a
/// distribution symmetric about 0. Zeros are dropped (Wilcoxon's convention, scipy's
/// `zero_method="wilcox"`); the absolute values are ranked with ties at their average rank
/// ([`ranks`]). Without zeros or ties and with at most 50 values, the p-value is exact: the
/// share of the `2^n` sign assignments whose smaller rank sum is at most the statistic,
/// doubled. Otherwise it is the normal approximation with the tie-corrected variance
/// `n(n+1)(2n+1)/24 - sum(t^3 - t)/48` and no continuity correction (scipy's
/// `method="approx"`). Errors on an empty or non-finite series, or when every difference
/// is 0.
pub fn wilcoxon_signed_rank(d: &[f64]) -> Result<SignedRank> {
    check_series(d, "differences")?;
    let nz: Vec<f64> = d.iter().copied().filter(|&v| v != 0.0).collect();
    if nz.is_empty() {
        return Err(GoodhartError::invalid(
            "differences",
            "every difference is 0: the signed-rank test is undefined",
        ));
    }
    let n = nz.len();
    let r = ranks(&nz.iter().map(|v| v.abs()).collect::<Vec<_>>())?;
    let plus: f64 = nz
        .iter()
        .zip(&r)
        .filter(|(v, _)| **v > 0.0)
        .map(|(_, r)| r)
        .sum();
    let total = (n * (n + 1)) as f64 / 2.0;
    let statistic = plus.min(total - plus);
    // Tie groups: sizes of the runs of equal absolute values.
    let mut abs: Vec<f64> = nz.iter().map(|v| v.abs()).collect();
    abs.sort_by(f64::total_cmp);
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < n {
        let j = abs[i..].iter().take_while(|&&a| a == abs[i]).count();
        tie_term += (j * j * j - j) as f64;
        i += j;
    }
    let exact = tie_term == 0.0 && n == d.len() && n <= 50;
    let p_value = if exact {
        // counts[s]: sign assignments whose positive ranks sum to s (ranks 1..=n); f64
        // holds them exactly up to 2^53.
        let max = n * (n + 1) / 2;
        let mut counts = vec![0.0f64; max + 1];
        counts[0] = 1.0;
        for k in 1..=n {
            for s in (k..=max).rev() {
                counts[s] += counts[s - k];
            }
        }
        let below: f64 = counts[..=statistic as usize].iter().sum();
        (2.0 * below / 2f64.powi(n as i32)).min(1.0)
    } else {
        let nf = n as f64;
        let mean = nf * (nf + 1.0) / 4.0;
        let var = nf * (nf + 1.0) * (2.0 * nf + 1.0) / 24.0 - tie_term / 48.0;
        let z = (statistic - mean) / var.sqrt();
        statrs::function::erf::erfc(z.abs() / std::f64::consts::SQRT_2).min(1.0)
    };
    Ok(SignedRank {
        statistic,
        p_value,
        n,
        exact,
    })
}

/// Ordinary least squares `y ~ sum_j c_j X_j` for a few feature columns, by modified
/// Gram-Schmidt QR (stabler than the normal equations). Returns the coefficients and
/// `R^2 = 1 - SS_res / SS_tot` (SS_tot around the mean of `y`, so a model without an
/// intercept can score below 0).
///
/// Errors when there are fewer points than columns, when the columns are (numerically)
/// linearly dependent, or when `y` is constant (R^2 undefined).
pub(crate) fn least_squares(columns: &[Vec<f64>], y: &[f64]) -> Result<(Vec<f64>, f64)> {
    let n = y.len();
    let k = columns.len();
    if n < k {
        return Err(GoodhartError::invalid(
            "points",
            format!("{n} point(s) cannot determine {k} coefficients"),
        ));
    }
    let mut q: Vec<Vec<f64>> = columns.to_vec();
    let mut r = vec![vec![0.0; k]; k];
    for j in 0..k {
        let norm0 = dot(&columns[j], &columns[j]).sqrt();
        for i in 0..j {
            r[i][j] = dot(&q[i], &q[j]);
            let (qi, qj) = (q[i].clone(), &mut q[j]);
            for (a, b) in qj.iter_mut().zip(&qi) {
                *a -= r[i][j] * b;
            }
        }
        let norm = dot(&q[j], &q[j]).sqrt();
        if norm0 == 0.0 || norm <= 1e-10 * norm0 {
            return Err(GoodhartError::invalid(
                "points",
                "the design is degenerate (too few distinct x values for the model)",
            ));
        }
        r[j][j] = norm;
        q[j].iter_mut().for_each(|v| *v /= norm);
    }
    let qty: Vec<f64> = q.iter().map(|col| dot(col, y)).collect();
    let mut coef = vec![0.0; k];
    for j in (0..k).rev() {
        let s: f64 = (j + 1..k).map(|i| r[j][i] * coef[i]).sum();
        coef[j] = (qty[j] - s) / r[j][j];
    }
    let my = y.iter().sum::<f64>() / n as f64;
    let ss_tot: f64 = y.iter().map(|v| (v - my).powi(2)).sum();
    if ss_tot == 0.0 {
        return Err(GoodhartError::invalid(
            "y",
            "constant series: R^2 is undefined",
        ));
    }
    let ss_res: f64 = (0..n)
        .map(|i| {
            let pred: f64 = (0..k).map(|j| coef[j] * columns[j][i]).sum();
            (y[i] - pred).powi(2)
        })
        .sum();
    Ok((coef, 1.0 - ss_res / ss_tot))
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn pearson_and_spearman_by_hand() {
        // x = 1,2,3,4 (mean 2.5), y = 2,4,5,9 (mean 5):
        // dx = -1.5,-.5,.5,1.5; dy = -3,-1,0,4
        // sxy = 4.5+.5+0+6 = 11; sxx = 5; syy = 9+1+0+16 = 26
        let r = pearson(&[1.0, 2.0, 3.0, 4.0], &[2.0, 4.0, 5.0, 9.0]).unwrap();
        assert!((r - 11.0 / (5.0f64 * 26.0).sqrt()).abs() < 1e-12, "{r}");
        // ranks of 10, 20, 20, 5 are 2, 3.5, 3.5, 1
        assert_eq!(
            ranks(&[10.0, 20.0, 20.0, 5.0]).unwrap(),
            vec![2.0, 3.5, 3.5, 1.0]
        );
        // monotone but non-linear: Spearman 1, Pearson < 1
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = [1.0, 8.0, 27.0, 64.0, 125.0];
        assert!((spearman(&x, &y).unwrap() - 1.0).abs() < 1e-12);
        assert!(pearson(&x, &y).unwrap() < 0.99);
        // with a tie: ranks x = 1,2,3,4; y = 1,2.5,2.5,4 ->
        // dx = -1.5,-.5,.5,1.5; dy = -1.5,0,0,1.5: sxy = 4.5, sxx = 5, syy = 4.5
        let s = spearman(&[1.0, 2.0, 3.0, 4.0], &[0.0, 7.0, 7.0, 9.0]).unwrap();
        assert!((s - 4.5 / (5.0f64 * 4.5).sqrt()).abs() < 1e-12, "{s}");
    }

    #[test]
    fn signed_rank_by_hand_and_against_scipy() {
        // d = 1, -2, 3: ranks 1, 2, 3; W+ = 4, W- = 2. The 8 sign assignments of ranks
        // {1, 2, 3} have positive sums 0, 1, 2, 3, 3, 4, 5, 6: three are <= 2, so
        // p = 2 * 3/8.
        let w = wilcoxon_signed_rank(&[1.0, -2.0, 3.0]).unwrap();
        assert_eq!((w.statistic, w.p_value, w.n, w.exact), (2.0, 0.75, 3, true));
        // All positive: only the empty set sums to 0, p = 2 / 2^n.
        let w = wilcoxon_signed_rank(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!((w.statistic, w.p_value), (0.0, 0.0625));
        // scipy.stats.wilcoxon 1.17 (exact): statistic 14, p 0.193359375 = 198/1024.
        let d = [-0.02, 1.38, -0.2, 1.21, -0.15, -0.3, 0.33, 0.68, 0.01, 0.61];
        let w = wilcoxon_signed_rank(&d).unwrap();
        assert_eq!(
            (w.statistic, w.p_value, w.exact),
            (14.0, 198.0 / 1024.0, true)
        );
        // Ties and a zero: scipy's method="approx" gives statistic 6.5, p
        // 0.0560482126217636 (the zero dropped, n = 9).
        let d = [1.0, 1.0, 2.0, -2.0, 3.0, 3.0, 3.0, -1.0, 4.0, 0.0];
        let w = wilcoxon_signed_rank(&d).unwrap();
        assert_eq!((w.statistic, w.n, w.exact), (6.5, 9, false));
        assert!(
            (w.p_value - 0.0560482126217636).abs() < 1e-9,
            "{}",
            w.p_value
        );
        assert!(matches!(
            wilcoxon_signed_rank(&[0.0, 0.0]),
            Err(GoodhartError::InvalidArgument { .. })
        ));
        assert!(matches!(
            wilcoxon_signed_rank(&[1.0, f64::NAN]),
            Err(GoodhartError::NonFinite { .. })
        ));
        assert!(matches!(
            wilcoxon_signed_rank(&[]),
            Err(GoodhartError::Empty { .. })
        ));
    }

    proptest! {
        /// Flipping every sign or scaling by a positive constant leaves the test as it is;
        /// the p-value is a probability.
        #[test]
        fn signed_rank_is_sign_and_scale_free(
            d in proptest::collection::vec(-5.0f64..5.0, 1..40),
            scale in 0.1f64..10.0,
        ) {
            prop_assume!(d.iter().any(|&v| v != 0.0));
            let w = wilcoxon_signed_rank(&d).unwrap();
            let flipped: Vec<f64> = d.iter().map(|v| -v).collect();
            let scaled: Vec<f64> = d.iter().map(|v| v * scale).collect();
            let f = wilcoxon_signed_rank(&flipped).unwrap();
            prop_assert_eq!(w, f);
            let s = wilcoxon_signed_rank(&scaled).unwrap();
            prop_assert_eq!(w.statistic, s.statistic);
            prop_assert!((w.p_value - s.p_value).abs() < 1e-12);
            prop_assert!(w.p_value > 0.0 && w.p_value <= 1.0);
        }
    }

    #[test]
    fn bad_series_are_typed_errors() {
        assert!(matches!(
            pearson(&[], &[]),
            Err(GoodhartError::Empty { .. })
        ));
        assert!(matches!(
            pearson(&[1.0, f64::NAN], &[1.0, 2.0]),
            Err(GoodhartError::NonFinite { .. })
        ));
        assert!(matches!(
            spearman(&[1.0, 2.0], &[1.0]),
            Err(GoodhartError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            pearson(&[1.0, 1.0], &[1.0, 2.0]),
            Err(GoodhartError::InvalidArgument { .. })
        ));
        let s = summary(&[1.0, 3.0]).unwrap();
        assert_eq!((s.mean, s.min, s.max, s.count), (2.0, 1.0, 3.0, 2));
        assert!((s.std - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(summary(&[4.0]).unwrap().std, 0.0);
    }

    #[test]
    fn least_squares_recovers_exact_coefficients() {
        // y = 2 x - 3 x^2 exactly
        let x = [0.5, 1.0, 1.5, 2.0];
        let y: Vec<f64> = x.iter().map(|v| 2.0 * v - 3.0 * v * v).collect();
        let (c, r2) = least_squares(&[x.to_vec(), x.iter().map(|v| v * v).collect()], &y).unwrap();
        assert!((c[0] - 2.0).abs() < 1e-12 && (c[1] + 3.0).abs() < 1e-12);
        assert!((r2 - 1.0).abs() < 1e-12);
        assert!(least_squares(&[vec![1.0, 1.0], vec![2.0, 2.0]], &[1.0, 2.0]).is_err());
    }

    proptest! {
        #[test]
        fn correlations_lie_in_unit_interval(
            xy in proptest::collection::vec((-1e3f64..1e3, -1e3f64..1e3), 2..40)
        ) {
            let (x, y): (Vec<f64>, Vec<f64>) = xy.into_iter().unzip();
            for r in [pearson(&x, &y), spearman(&x, &y)].into_iter().flatten() {
                prop_assert!((-1.0..=1.0).contains(&r), "{}", r);
            }
            if let Ok(r) = pearson(&x, &x) {
                prop_assert!((r - 1.0).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn median_and_its_bootstrap_interval() {
        assert_eq!(median(&[3.0, 1.0, 2.0]).unwrap(), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]).unwrap(), 2.5);
        assert!(median(&[]).is_err() && median(&[f64::NAN]).is_err());
        // A constant sample: a degenerate interval.
        let c = median_interval(&[5.0; 7], 100, 0.95, 0).unwrap();
        assert_eq!((c.value, c.lo, c.hi), (5.0, 5.0, 5.0));
        // 0..=100: the median 50; its 95% interval from the order statistics' binomial
        // spread, about 50 +- 1.96 * sqrt(101) / 2 = 50 +- 10.
        let x: Vec<f64> = (0..=100).map(f64::from).collect();
        let i = median_interval(&x, 2000, 0.95, 3).unwrap();
        assert_eq!(i.value, 50.0);
        assert!(i.lo < 50.0 && i.hi > 50.0, "{i:?}");
        assert!((i.hi - i.lo - 20.0).abs() < 6.0, "{i:?}");
        assert_eq!(i, median_interval(&x, 2000, 0.95, 3).unwrap());
        assert!(median_interval(&x, 0, 0.95, 3).is_err());
        assert!(median_interval(&x, 10, 1.0, 3).is_err());
    }
}
