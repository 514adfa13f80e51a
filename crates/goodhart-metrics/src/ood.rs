//! Out-of-distribution scores: how far a point lies from a reference sample.
//!
//! [`Mahalanobis`] fits a Gaussian to reference rows (a reward model's embeddings of the
//! data it was trained on) and scores a row by its Mahalanobis distance
//! `sqrt((x - mu)^T S^-1 (x - mu))` (Lee et al. 2018 score OOD inputs this way; Ren et al.
//! 2021 do it on the embeddings of a language model). `S` is the sample covariance
//! shrunk toward a multiple of the identity, `S = (1 - rho) C + rho (tr C / d) I`
//! (Ledoit & Wolf's target, with a fixed `rho`), so fewer rows than dimensions still give
//! a positive-definite matrix. Host memory, f64, a Cholesky factor of `S`.

use goodhart_core::{GoodhartError, Result};

/// A Gaussian fitted to reference rows; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Mahalanobis {
    mean: Vec<f64>,
    /// Lower-triangular Cholesky factor `L` of the shrunk covariance, row-major `d x d`.
    chol: Vec<f64>,
}

impl Mahalanobis {
    /// Fits the mean and the covariance shrunk by `shrinkage` (`rho` in `[0, 1]`) to
    /// `rows` (each of the same length `d`).
    ///
    /// Errors: fewer than two rows, rows of different or zero length, a non-finite value,
    /// `shrinkage` outside `[0, 1]`, and a covariance that is not positive definite (no
    /// spread in some direction with `shrinkage = 0`, or none at all).
    pub fn fit(rows: &[Vec<f64>], shrinkage: f64) -> Result<Self> {
        if rows.len() < 2 {
            return Err(GoodhartError::invalid(
                "reference rows",
                format!("need at least 2 to fit a covariance, got {}", rows.len()),
            ));
        }
        if !(0.0..=1.0).contains(&shrinkage) {
            return Err(GoodhartError::invalid(
                "shrinkage",
                format!("{shrinkage} is not in [0, 1]"),
            ));
        }
        let d = rows[0].len();
        if d == 0 {
            return Err(GoodhartError::Empty {
                what: "reference row".into(),
            });
        }
        for (i, r) in rows.iter().enumerate() {
            if r.len() != d {
                return Err(GoodhartError::shape(
                    format!("reference row {i}"),
                    &[d],
                    &[r.len()],
                ));
            }
            if r.iter().any(|v| !v.is_finite()) {
                return Err(GoodhartError::NonFinite {
                    what: format!("reference row {i}"),
                });
            }
        }
        let n = rows.len() as f64;
        let mut mean = vec![0.0; d];
        for r in rows {
            for (m, v) in mean.iter_mut().zip(r) {
                *m += v / n;
            }
        }
        let mut cov = vec![0.0; d * d];
        for r in rows {
            for i in 0..d {
                let di = r[i] - mean[i];
                for j in 0..=i {
                    cov[i * d + j] += di * (r[j] - mean[j]) / (n - 1.0);
                }
            }
        }
        let scale = (0..d).map(|i| cov[i * d + i]).sum::<f64>() / d as f64;
        for i in 0..d {
            for j in 0..=i {
                let target = if i == j { scale } else { 0.0 };
                cov[i * d + j] = (1.0 - shrinkage) * cov[i * d + j] + shrinkage * target;
            }
        }
        // Cholesky (lower triangle of `cov` holds the matrix).
        let mut chol = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..=i {
                let s = cov[i * d + j]
                    - (0..j)
                        .map(|k| chol[i * d + k] * chol[j * d + k])
                        .sum::<f64>();
                if i == j {
                    // A pivot at the rounding level of the diagonal's scale is zero.
                    let positive = s > 1e-12 * scale.max(f64::MIN_POSITIVE);
                    if !positive {
                        return Err(GoodhartError::invalid(
                            "reference rows",
                            format!(
                                "their covariance is not positive definite (no spread along dimension {i} \
                                 given the others); use a shrinkage above 0 or more varied rows"
                            ),
                        ));
                    }
                    chol[i * d + i] = s.sqrt();
                } else {
                    chol[i * d + j] = s / chol[j * d + j];
                }
            }
        }
        Ok(Self { mean, chol })
    }

    /// The dimension of the rows it scores.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// The Mahalanobis distance of `x` from the reference mean. Errors on a length other
    /// than [`Mahalanobis::dim`] or a non-finite value.
    pub fn distance(&self, x: &[f64]) -> Result<f64> {
        let d = self.dim();
        if x.len() != d {
            return Err(GoodhartError::shape("row", &[d], &[x.len()]));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(GoodhartError::NonFinite { what: "row".into() });
        }
        // Solve L z = x - mu; the squared distance is |z|^2.
        let mut z = vec![0.0; d];
        for i in 0..d {
            let s =
                (x[i] - self.mean[i]) - (0..i).map(|k| self.chol[i * d + k] * z[k]).sum::<f64>();
            z[i] = s / self.chol[i * d + i];
        }
        Ok(z.iter().map(|v| v * v).sum::<f64>().sqrt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::normal;

    #[test]
    fn distances_by_hand() {
        // Mean (1, 2); covariance diag(1, 4) with zero correlation.
        let rows = vec![
            vec![0.0, 0.0],
            vec![2.0, 0.0],
            vec![0.0, 4.0],
            vec![2.0, 4.0],
        ];
        // Sample covariance (n - 1 = 3): var x = 4/3, var y = 16/3, cov 0.
        let m = Mahalanobis::fit(&rows, 0.0).unwrap();
        let d = m.distance(&[1.0 + (4.0f64 / 3.0).sqrt(), 2.0]).unwrap();
        assert!((d - 1.0).abs() < 1e-12, "{d}");
        let d = m
            .distance(&[1.0, 2.0 - 2.0 * (16.0f64 / 3.0).sqrt()])
            .unwrap();
        assert!((d - 2.0).abs() < 1e-12, "{d}");
        assert_eq!(m.distance(&[1.0, 2.0]).unwrap(), 0.0);
        // Full shrinkage: S = (tr C / d) I = (20/3 / 2) I = 10/3 I.
        let m = Mahalanobis::fit(&rows, 1.0).unwrap();
        let d = m.distance(&[1.0 + 3.0, 2.0 + 4.0]).unwrap();
        assert!((d - 5.0 / (10.0f64 / 3.0).sqrt()).abs() < 1e-12, "{d}");
    }

    #[test]
    fn correlated_gaussian_matches_its_quadratic_form() {
        // Rows x = A g with g standard normal: the fitted distance approaches
        // |A^-1 (x - 0)| for A = [[2, 0], [1, 1]].
        let mut rng = goodhart_core::seed::rng(7, "ood-test");
        let rows: Vec<Vec<f64>> = (0..200_000)
            .map(|_| {
                let (a, b) = (normal(&mut rng), normal(&mut rng));
                vec![2.0 * a, a + b]
            })
            .collect();
        let m = Mahalanobis::fit(&rows, 0.0).unwrap();
        // x = A (1, 2) = (2, 3): distance sqrt(5).
        let d = m.distance(&[2.0, 3.0]).unwrap();
        assert!((d - 5f64.sqrt()).abs() < 0.02, "{d}");
    }

    #[test]
    fn squared_distances_of_the_reference_sum_to_n_minus_one_times_d() {
        // sum_i (x_i - m)^T C^-1 (x_i - m) = tr(C^-1 (n - 1) C) = (n - 1) d for the sample
        // covariance C (no shrinkage), whatever the rows.
        let mut rng = goodhart_core::seed::rng(3, "ood-trace");
        let rows: Vec<Vec<f64>> = (0..50)
            .map(|_| {
                let (a, b, c) = (normal(&mut rng), normal(&mut rng), normal(&mut rng));
                vec![a + 3.0, 0.5 * a + b, c - 2.0 * b + 1.0]
            })
            .collect();
        let m = Mahalanobis::fit(&rows, 0.0).unwrap();
        let sum: f64 = rows.iter().map(|r| m.distance(r).unwrap().powi(2)).sum();
        assert!((sum - 49.0 * 3.0).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let ok = vec![vec![0.0, 1.0], vec![1.0, 0.0], vec![2.0, 2.0]];
        assert!(Mahalanobis::fit(&ok[..1], 0.1).is_err());
        assert!(Mahalanobis::fit(&ok, 1.5).is_err());
        assert!(Mahalanobis::fit(&[vec![0.0, 1.0], vec![1.0]], 0.1).is_err());
        assert!(matches!(
            Mahalanobis::fit(&[vec![0.0, f64::NAN], vec![1.0, 0.0]], 0.1),
            Err(GoodhartError::NonFinite { .. })
        ));
        // No spread along y: singular without shrinkage, fine with it.
        let flat = vec![vec![0.0, 1.0], vec![1.0, 1.0], vec![2.0, 1.0]];
        let e = Mahalanobis::fit(&flat, 0.0).unwrap_err().to_string();
        assert!(e.contains("positive definite"), "{e}");
        assert!(Mahalanobis::fit(&flat, 0.1).is_ok());
        // No spread at all: singular at any shrinkage.
        assert!(Mahalanobis::fit(&[vec![1.0, 1.0], vec![1.0, 1.0]], 0.5).is_err());
        let m = Mahalanobis::fit(&ok, 0.1).unwrap();
        assert!(m.distance(&[1.0]).is_err());
        assert!(m.distance(&[1.0, f64::INFINITY]).is_err());
    }
}
