//! Reward-model overoptimisation laws (Gao, Schulman & Hilton, "Scaling Laws for Reward
//! Model Overoptimization", 2022): fits of gold reward against `d = sqrt(KL(pi || pi_init))`,
//! the best-of-n KL, and the unbiased best-of-n estimator.
//!
//! Both laws are linear in `(alpha, beta)`, so they are fitted by ordinary least squares
//! (QR), with no iterative solver:
//! - best-of-n: `R(d) = d (alpha - beta d)` = `alpha * d - beta * d^2`;
//! - RL: `R(d) = d (alpha - beta log d)` = `alpha * d - beta * d log d`.
//!
//! Gao et al. measure gold *relative to the initial policy*, so `R(0) = 0` and the laws
//! have no intercept. When gold is logged in absolute units, fit with
//! `intercept = true`: `R(d) = c + d (...)`, where `c` estimates the initial policy's gold
//! reward; the peak location does not depend on `c`, the gold reward at the peak does.

use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::stats::{check_pair, least_squares};

/// Which functional form of gold reward against `d` to fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OveroptLaw {
    /// `R(d) = d (alpha - beta d)`: best-of-n sampling (Gao et al. 2022, eq. 1).
    BestOfN,
    /// `R(d) = d (alpha - beta log d)`: RL against the proxy (Gao et al. 2022, eq. 2).
    Rl,
}

/// The peak of a fitted law: where gold reward stops rising.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Peak {
    /// `d*`: `alpha / (2 beta)` for best-of-n, `exp(alpha / beta - 1)` for RL.
    pub d: f64,
    /// The KL there, `d*^2` (nats).
    pub kl: f64,
    /// Gold reward at `d*`: `offset + alpha^2 / (4 beta)` (best-of-n) or
    /// `offset + beta d*` (RL).
    pub gold: f64,
}

/// A fitted overoptimisation law.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OveroptFit {
    /// The functional form.
    pub law: OveroptLaw,
    /// Fitted `alpha` (initial slope of gold in `d`).
    pub alpha: f64,
    /// Fitted `beta` (strength of the overoptimisation term).
    pub beta: f64,
    /// Fitted intercept `c` (0 when fitted without one).
    pub offset: f64,
    /// Coefficient of determination `1 - SS_res / SS_tot` (SS_tot around the mean gold).
    pub r_squared: f64,
    /// Number of points fitted.
    pub points: usize,
}

impl OveroptFit {
    /// The fitted gold reward at `d` (`d >= 0`; for the RL law `d log d` is taken as its
    /// limit 0 at `d = 0`).
    pub fn predict(&self, d: f64) -> f64 {
        let curvature = match self.law {
            OveroptLaw::BestOfN => d * d,
            OveroptLaw::Rl => d_log_d(d),
        };
        self.offset + self.alpha * d - self.beta * curvature
    }

    /// The interior maximum of the fitted law, or `None` when the fit has none
    /// (`beta <= 0`: gold never turns down; or, for best-of-n, `alpha <= 0`: gold
    /// falls from the start).
    pub fn peak(&self) -> Option<Peak> {
        if self.beta <= 0.0 || !self.beta.is_finite() {
            return None;
        }
        let (d, gold) = match self.law {
            OveroptLaw::BestOfN if self.alpha > 0.0 => {
                let d = self.alpha / (2.0 * self.beta);
                (d, self.alpha * self.alpha / (4.0 * self.beta))
            }
            OveroptLaw::BestOfN => return None,
            // dR/dd = alpha - beta (log d + 1) = 0; R(d*) = d* (alpha - (alpha - beta)).
            OveroptLaw::Rl => {
                let d = (self.alpha / self.beta - 1.0).exp();
                (d, self.beta * d)
            }
        };
        d.is_finite().then_some(Peak {
            d,
            kl: d * d,
            gold: self.offset + gold,
        })
    }
}

fn d_log_d(d: f64) -> f64 {
    if d == 0.0 {
        0.0
    } else {
        d * d.ln()
    }
}

/// Fits `law` to points `(d_i, gold_i)` by least squares, with an intercept if asked.
///
/// Errors on empty, non-finite or mismatched input, on a negative `d`, on too few
/// distinct `d` values for the coefficients, and on constant gold (R^2 undefined).
pub fn fit(law: OveroptLaw, d: &[f64], gold: &[f64], intercept: bool) -> Result<OveroptFit> {
    check_pair(d, "d", gold, "gold")?;
    if d.iter().any(|&v| v < 0.0) {
        return Err(GoodhartError::invalid("d", "must be >= 0 (d = sqrt(KL))"));
    }
    let curvature: Vec<f64> = match law {
        OveroptLaw::BestOfN => d.iter().map(|v| -v * v).collect(),
        OveroptLaw::Rl => d.iter().map(|&v| -d_log_d(v)).collect(),
    };
    let mut columns = vec![d.to_vec(), curvature];
    if intercept {
        columns.push(vec![1.0; d.len()]);
    }
    let (c, r_squared) = least_squares(&columns, gold)?;
    Ok(OveroptFit {
        law,
        alpha: c[0],
        beta: c[1],
        offset: if intercept { c[2] } else { 0.0 },
        r_squared,
        points: d.len(),
    })
}

/// [`fit`] of the best-of-n law `R(d) = d (alpha - beta d)` without intercept.
pub fn fit_bon(d: &[f64], gold: &[f64]) -> Result<OveroptFit> {
    fit(OveroptLaw::BestOfN, d, gold, false)
}

/// [`fit`] of the RL law `R(d) = d (alpha - beta log d)` without intercept.
///
/// ```
/// use goodhart_metrics::overopt::fit_rl;
/// // Gold on the RL law with alpha = 1, beta = 0.5 exactly: the fit recovers them, and
/// // gold peaks at d* = exp(alpha / beta - 1) = e.
/// let d: Vec<f64> = (1..=20).map(|i| 0.25 * i as f64).collect();
/// let gold: Vec<f64> = d.iter().map(|d| d * (1.0 - 0.5 * d.ln())).collect();
/// let fit = fit_rl(&d, &gold)?;
/// assert!((fit.alpha - 1.0).abs() < 1e-9 && (fit.beta - 0.5).abs() < 1e-9);
/// assert!((fit.peak().unwrap().d - std::f64::consts::E).abs() < 1e-9);
/// # Ok::<(), goodhart_core::GoodhartError>(())
/// ```
pub fn fit_rl(d: &[f64], gold: &[f64]) -> Result<OveroptFit> {
    fit(OveroptLaw::Rl, d, gold, false)
}

/// KL of the best-of-n policy from the sampling policy, `log n - (n - 1)/n` nats
/// (Gao et al. 2022, after Stiennon et al. 2020; an upper bound, exact for continuous
/// proxy scores without ties). Errors for `n = 0`.
pub fn bon_kl(n: usize) -> Result<f64> {
    if n == 0 {
        return Err(GoodhartError::invalid("n", "best-of-n needs n >= 1"));
    }
    let n = n as f64;
    Ok(n.ln() - (n - 1.0) / n)
}

/// Unbiased estimate of the best-of-n gold reward from `N >= n` samples (Gao et al. 2022,
/// appendix): sort the samples ascending by proxy; then
/// `E[gold of best-of-n] = sum_{i=n}^{N} C(i-1, n-1) / C(N, n) * gold_(i)`,
/// the exact mean over all `C(N, n)` subsets of size `n` of the gold reward of the
/// subset's proxy-best sample.
///
/// The weights are computed in log space by the recurrence
/// `log w_n = -log C(N, n)`, `log w_{i+1} = log w_i + log i - log(i - n + 1)`, so `N` can be
/// many thousands. Ties in proxy are resolved as a uniformly random order would be: the
/// gold rewards of tied samples are replaced by their mean (the estimate is linear in
/// the sorted gold values, so this is the expectation over tie orders).
///
/// Errors on empty, non-finite or mismatched input and when `n` is 0 or exceeds `N`.
pub fn bon_unbiased(proxy: &[f64], gold: &[f64], n: usize) -> Result<f64> {
    check_pair(proxy, "proxy", gold, "gold")?;
    let big_n = proxy.len();
    if n == 0 || n > big_n {
        return Err(GoodhartError::invalid(
            "n",
            format!("best-of-n needs 1 <= n <= N = {big_n}, got {n}"),
        ));
    }
    let mut order: Vec<usize> = (0..big_n).collect();
    order.sort_by(|&a, &b| proxy[a].total_cmp(&proxy[b]));
    let mut sorted_gold: Vec<f64> = order.iter().map(|&i| gold[i]).collect();
    let mut i = 0;
    while i < big_n {
        let mut j = i;
        while j + 1 < big_n && proxy[order[j + 1]] == proxy[order[i]] {
            j += 1;
        }
        if j > i {
            let m = sorted_gold[i..=j].iter().sum::<f64>() / (j - i + 1) as f64;
            sorted_gold[i..=j].iter_mut().for_each(|g| *g = m);
        }
        i = j + 1;
    }
    // log C(N, n) = sum_{j=1}^{n} log((N - n + j) / j)
    let log_choose: f64 = (1..=n)
        .map(|j| ((big_n - n + j) as f64).ln() - (j as f64).ln())
        .sum();
    let mut log_w = -log_choose;
    let mut total = 0.0;
    // 1-based index i runs n..=N; sorted_gold is 0-based.
    for idx in n..=big_n {
        total += log_w.exp() * sorted_gold[idx - 1];
        log_w += (idx as f64).ln() - ((idx - n + 1) as f64).ln();
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::normal;
    use rand::RngExt as _;

    #[test]
    fn best_of_n_kl_matches_the_reference_values() {
        // METHODS.md: n = 1, 4, 16, 1000 -> 0, 0.636, 1.83, 5.91 nats, to the digits given
        // (log 16 - 15/16 = 1.83509 and log 1000 - 0.999 = 5.90876 are quoted to 2 places)
        for (n, want, tol) in [
            (1, 0.0, 1e-12),
            (4, 0.636, 5e-4),
            (16, 1.83, 1e-2),
            (1000, 5.91, 1e-2),
        ] {
            let kl = bon_kl(n).unwrap();
            assert!((kl - want).abs() < tol, "n = {n}: {kl}");
        }
        // log 4 - 3/4 exactly
        assert!((bon_kl(4).unwrap() - (4f64.ln() - 0.75)).abs() < 1e-15);
        assert!(bon_kl(0).is_err());
    }

    #[test]
    fn fits_recover_known_coefficients_at_low_noise() {
        let mut rng = goodhart_core::seed::rng(7, "overopt-fit");
        let d: Vec<f64> = (1..=40).map(|i| i as f64 * 0.25).collect(); // 0.25 ..= 10
        for (law, alpha, beta) in [(OveroptLaw::BestOfN, 1.2, 0.1), (OveroptLaw::Rl, 1.0, 0.35)] {
            let clean: Vec<f64> = d
                .iter()
                .map(|&x| {
                    OveroptFit {
                        law,
                        alpha,
                        beta,
                        offset: 0.0,
                        r_squared: 1.0,
                        points: 0,
                    }
                    .predict(x)
                })
                .collect();
            let gold: Vec<f64> = clean.iter().map(|g| g + 0.02 * normal(&mut rng)).collect();
            let f = fit(law, &d, &gold, false).unwrap();
            assert!(
                (f.alpha / alpha - 1.0).abs() < 0.05,
                "{law:?} alpha {}",
                f.alpha
            );
            assert!(
                (f.beta / beta - 1.0).abs() < 0.05,
                "{law:?} beta {}",
                f.beta
            );
            assert!(f.r_squared > 0.99, "{law:?} R^2 {}", f.r_squared);
            // with an offset of 0.5 added, the intercept fit recovers it as well
            let shifted: Vec<f64> = gold.iter().map(|g| g + 0.5).collect();
            let f = fit(law, &d, &shifted, true).unwrap();
            assert!((f.offset - 0.5).abs() < 0.05, "{law:?} offset {}", f.offset);
            assert!((f.alpha / alpha - 1.0).abs() < 0.05 && (f.beta / beta - 1.0).abs() < 0.05);
        }
        // RL law through d = 0 (d log d -> 0 there): exact data, exact fit
        let d = [0.0f64, 0.5, 1.0, 2.0, 4.0];
        let g: Vec<f64> = d
            .iter()
            .map(|&x| x * (1.0 - 0.5 * if x == 0.0 { 0.0 } else { x.ln() }))
            .collect();
        let f = fit_rl(&d, &g).unwrap();
        assert!((f.alpha - 1.0).abs() < 1e-10 && (f.beta - 0.5).abs() < 1e-10);
        assert!((f.r_squared - 1.0).abs() < 1e-12);
    }

    #[test]
    fn peaks_by_formula() {
        let bon = OveroptFit {
            law: OveroptLaw::BestOfN,
            alpha: 1.2,
            beta: 0.1,
            offset: 0.3,
            r_squared: 1.0,
            points: 3,
        };
        // d* = 1.2 / 0.2 = 6; R* = 0.3 + 1.44 / 0.4 = 3.9
        let p = bon.peak().unwrap();
        assert!(
            (p.d - 6.0).abs() < 1e-12 && (p.gold - 3.9).abs() < 1e-12 && (p.kl - 36.0).abs() < 1e-9
        );
        assert!((bon.predict(6.0) - 3.9).abs() < 1e-12);
        let rl = OveroptFit {
            law: OveroptLaw::Rl,
            alpha: 1.0,
            beta: 0.5,
            offset: 0.0,
            r_squared: 1.0,
            points: 3,
        };
        // d* = exp(1/0.5 - 1) = e; R* = 0.5 e
        let p = rl.peak().unwrap();
        assert!((p.d - std::f64::consts::E).abs() < 1e-12);
        assert!((p.gold - 0.5 * std::f64::consts::E).abs() < 1e-12);
        assert!((rl.predict(p.d) - p.gold).abs() < 1e-12);
        // the peak is a maximum
        assert!(rl.predict(p.d * 1.01) < p.gold && rl.predict(p.d * 0.99) < p.gold);
        assert!(OveroptFit { beta: -0.1, ..rl }.peak().is_none());
        assert!(OveroptFit { alpha: -1.0, ..bon }.peak().is_none());
    }

    #[test]
    fn fit_rejects_bad_input() {
        assert!(matches!(
            fit_bon(&[], &[]),
            Err(GoodhartError::Empty { .. })
        ));
        assert!(matches!(
            fit_bon(&[1.0, 2.0], &[1.0]),
            Err(GoodhartError::ShapeMismatch { .. })
        ));
        assert!(matches!(
            fit_rl(&[1.0, f64::INFINITY], &[1.0, 2.0]),
            Err(GoodhartError::NonFinite { .. })
        ));
        assert!(matches!(
            fit_rl(&[-1.0, 2.0], &[1.0, 2.0]),
            Err(GoodhartError::InvalidArgument { .. })
        ));
        // one distinct d cannot determine two coefficients
        assert!(fit_bon(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]).is_err());
    }

    #[test]
    fn unbiased_best_of_n_by_hand_and_against_monte_carlo() {
        // N = 3 sorted by proxy, gold (1, 2, 4); n = 2: weights C(i-1,1)/C(3,2) for i = 2, 3
        // = 1/3, 2/3: 2/3 + 8/3 = 10/3 (subsets {1,2}->2, {1,3}->4, {2,3}->4: mean 10/3)
        let e = bon_unbiased(&[0.3, 0.1, 0.2], &[4.0, 1.0, 2.0], 2).unwrap();
        assert!((e - 10.0 / 3.0).abs() < 1e-12, "{e}");
        // n = 1 is the plain mean, n = N the gold of the proxy-best sample
        assert!(
            (bon_unbiased(&[0.3, 0.1, 0.2], &[4.0, 1.0, 2.0], 1).unwrap() - 7.0 / 3.0).abs()
                < 1e-12
        );
        assert!((bon_unbiased(&[0.3, 0.1, 0.2], &[4.0, 1.0, 2.0], 3).unwrap() - 4.0).abs() < 1e-12);
        // ties: proxy (1, 1) with gold (0, 2): either order is equally likely -> 1
        assert!((bon_unbiased(&[1.0, 1.0], &[0.0, 2.0], 2).unwrap() - 1.0).abs() < 1e-12);
        assert!(bon_unbiased(&[1.0], &[1.0], 2).is_err());
        assert!(bon_unbiased(&[1.0], &[1.0], 0).is_err());

        // Monte Carlo: draw n of N without replacement, keep the proxy-best one's gold.
        let mut rng = goodhart_core::seed::rng(3, "bon-mc");
        let big_n = 2000;
        let gold: Vec<f64> = (0..big_n).map(|_| normal(&mut rng)).collect();
        let proxy: Vec<f64> = gold.iter().map(|g| g + normal(&mut rng)).collect();
        for n in [4usize, 16] {
            let est = bon_unbiased(&proxy, &gold, n).unwrap();
            let draws = 20_000;
            let mut vals = Vec::with_capacity(draws);
            for _ in 0..draws {
                let mut pick: Vec<usize> = Vec::with_capacity(n);
                while pick.len() < n {
                    let i = rng.random_range(0..big_n);
                    if !pick.contains(&i) {
                        pick.push(i);
                    }
                }
                let best = *pick
                    .iter()
                    .max_by(|&&a, &&b| proxy[a].total_cmp(&proxy[b]))
                    .unwrap();
                vals.push(gold[best]);
            }
            let s = crate::stats::summary(&vals).unwrap();
            let se = s.std / (draws as f64).sqrt();
            assert!(
                (est - s.mean).abs() < 2.0 * se,
                "n = {n}: {est} vs {} +- {se}",
                s.mean
            );
            // and best-of-n beats the mean
            assert!(est > crate::stats::mean(&gold).unwrap() + 0.3);
        }
    }
}
