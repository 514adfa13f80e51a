//! Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on
//! Code"): from `n` samples of which `c` pass, `pass@k = 1 - C(n - c, k) / C(n, k)`, the
//! probability that at least one of `k` samples drawn without replacement passes.

use goodhart_core::{GoodhartError, Result};

/// Unbiased pass@k in the numerically stable product form
/// `1 - prod_{i = n-c+1}^{n} (1 - k / i)` (1 when `n - c < k`), as in Chen et al.'s code.
/// Errors unless `1 <= k <= n` and `c <= n`.
pub fn pass_at_k(n: u64, c: u64, k: u64) -> Result<f64> {
    if n == 0 || k == 0 || k > n {
        return Err(GoodhartError::invalid(
            "k",
            format!("need 1 <= k <= n, got k = {k}, n = {n}"),
        ));
    }
    if c > n {
        return Err(GoodhartError::invalid(
            "c",
            format!("{c} passing samples out of n = {n}"),
        ));
    }
    if n - c < k {
        return Ok(1.0);
    }
    let miss: f64 = (n - c + 1..=n).map(|i| 1.0 - k as f64 / i as f64).product();
    Ok(1.0 - miss)
}

/// Mean pass@k over problems, each given as `(n, c)`. Errors on an empty list or any
/// invalid problem.
pub fn mean_pass_at_k(problems: &[(u64, u64)], k: u64) -> Result<f64> {
    if problems.is_empty() {
        return Err(GoodhartError::Empty {
            what: "problems".into(),
        });
    }
    let total = problems
        .iter()
        .map(|&(n, c)| pass_at_k(n, c, k))
        .sum::<Result<f64>>()?;
    Ok(total / problems.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hand_computed_values() {
        // n 5, c 2, k 2: 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
        assert!((pass_at_k(5, 2, 2).unwrap() - 0.7).abs() < 1e-12);
        // k = 1 is c / n
        assert!((pass_at_k(10, 3, 1).unwrap() - 0.3).abs() < 1e-12);
        // n 10, c 3, k 5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
        assert!((pass_at_k(10, 3, 5).unwrap() - 11.0 / 12.0).abs() < 1e-12);
        assert_eq!(pass_at_k(10, 0, 4).unwrap(), 0.0);
        assert_eq!(pass_at_k(10, 8, 3).unwrap(), 1.0); // n - c = 2 < 3
        assert!(
            (mean_pass_at_k(&[(5, 2), (10, 3)], 2).unwrap() - (0.7 + (1.0 - 21.0 / 45.0)) / 2.0)
                .abs()
                < 1e-12
        );
        assert!(pass_at_k(5, 6, 1).is_err());
        assert!(pass_at_k(5, 1, 0).is_err());
        assert!(pass_at_k(5, 1, 6).is_err());
        assert!(mean_pass_at_k(&[], 1).is_err());
        // large n stays finite and in [0, 1]
        let p = pass_at_k(100_000, 17, 1000).unwrap();
        assert!(p > 0.0 && p < 1.0);
    }

    proptest! {
        #[test]
        fn monotone_in_k_and_in_unit_interval(n in 1u64..200, c_frac in 0.0f64..=1.0) {
            let c = ((n as f64) * c_frac).floor() as u64;
            let mut prev = 0.0;
            for k in 1..=n {
                let p = pass_at_k(n, c, k).unwrap();
                prop_assert!((0.0..=1.0).contains(&p));
                prop_assert!(p >= prev - 1e-12, "k {} p {} prev {}", k, p, prev);
                prev = p;
            }
        }
    }
}
