//! Effective rank of hidden states and its dynamics, ERV and ERA ("Beyond the
//! Exploration-Exploitation Trade-off: A Hidden State Approach for LLM Reasoning in RLVR",
//! after Roy & Vetterli's effective rank).
//!
//! `ER(H) = exp(-sum_i p_i log p_i)`, `p_i = s_i / sum_j s_j`, over the singular values
//! `s_i` of the mean-centred matrix `H - mean_rows(H)`. ER is 1 for a rank-one cloud and
//! `n` for an isotropic one spanning `n` dimensions.
//!
//! The singular values come from the small Gram matrix: on the device, `C C^T` (`[n, n]`)
//! when there are fewer rows than columns, else `C^T C` (`[d, d]`); it is read back and
//! diagonalised on the host by cyclic Jacobi in f64 (`s_i = sqrt(lambda_i)`). The Gram is
//! f32 on the device, so eigenvalues below `1e-5 lambda_max` (singular values below about
//! 0.3% of the largest) are treated as zero: that is the f32 Gram's noise floor, and such
//! values would add only noise to the entropy. Cost: one `k x k` read-back and `O(k^3)`
//! per sweep with `k = min(n, d)`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{ops::check_finite, GoodhartError, Result};
use serde::{Deserialize, Serialize};

/// Relative eigenvalue floor of the f32 Gram matrix (see the module docs).
const EIGEN_FLOOR: f64 = 1e-5;

/// Effective rank of `hidden` `[n, d]` (rows are tokens or samples). A matrix without
/// spread (all rows equal, or a single row) has no singular value above the floor: its
/// effective rank is reported as 0 (rank 0). Errors on an empty or non-finite matrix.
pub fn effective_rank<B: Backend>(hidden: Tensor<B, 2>) -> Result<f64> {
    let [n, d] = hidden.dims();
    if n == 0 || d == 0 {
        return Err(GoodhartError::Empty {
            what: "hidden states".into(),
        });
    }
    check_finite(&hidden, "hidden states")?;
    let centred = hidden.clone() - hidden.mean_dim(0);
    let (gram, k) = if n <= d {
        (centred.clone().matmul(centred.transpose()), n)
    } else {
        (centred.clone().transpose().matmul(centred), d)
    };
    let a: Vec<f64> = gram
        .into_data()
        .convert::<f64>()
        .into_vec()
        .unwrap_or_default();
    Ok(effective_rank_of_eigenvalues(&sym_eigenvalues(a, k)))
}

/// `exp(entropy)` of the singular-value distribution from Gram eigenvalues.
fn effective_rank_of_eigenvalues(lambda: &[f64]) -> f64 {
    let max = lambda.iter().cloned().fold(0.0, f64::max);
    if max <= 0.0 {
        return 0.0;
    }
    let s: Vec<f64> = lambda
        .iter()
        .filter(|&&l| l > EIGEN_FLOOR * max)
        .map(|l| l.sqrt())
        .collect();
    let total: f64 = s.iter().sum();
    let h: f64 = s.iter().map(|v| v / total).map(|p| -p * p.ln()).sum();
    h.exp()
}

/// Eigenvalues of a symmetric `k x k` matrix (row-major) by cyclic Jacobi rotations.
fn sym_eigenvalues(mut a: Vec<f64>, k: usize) -> Vec<f64> {
    // symmetrise: the f32 product need not be exactly symmetric
    for p in 0..k {
        for q in p + 1..k {
            let m = 0.5 * (a[p * k + q] + a[q * k + p]);
            a[p * k + q] = m;
            a[q * k + p] = m;
        }
    }
    let total: f64 = a.iter().map(|v| v * v).sum();
    for _sweep in 0..100 {
        let off: f64 = (0..k)
            .flat_map(|p| (0..k).filter(move |&q| q != p).map(move |q| (p, q)))
            .map(|(p, q)| a[p * k + q].powi(2))
            .sum();
        if off <= 1e-30 * total || total == 0.0 {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                // Numerical Recipes' rotation: theta = (a_qq - a_pp) / (2 a_pq)
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let (arp, arq) = (a[r * k + p], a[r * k + q]);
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let (apr, aqr) = (a[p * k + r], a[q * k + r]);
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
            }
        }
    }
    (0..k).map(|i| a[i * k + i]).collect()
}

/// ER over growing prefixes of a sequence's hidden states, with its velocity and
/// acceleration.
///
/// Our reading of the paper's definition (its abstract only is at hand, so this is
/// *(unverified)*): with `ER_j` the effective rank of the first `prefixes[j]` rows,
/// `ERV_j = ER_j - mean(ER_0 .. ER_{j-1})` (first difference against the running mean of
/// the history), and `ERA_j = ERV_j - mean(ERV_1 .. ERV_{j-1})` (the same difference taken
/// once more). ERV is defined from the second prefix on, ERA from the third; earlier
/// entries are 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErDynamics {
    /// Prefix lengths (rows).
    pub prefixes: Vec<usize>,
    /// ER of each prefix.
    pub er: Vec<f64>,
    /// Effective rank velocity at each prefix.
    pub erv: Vec<f64>,
    /// Effective rank acceleration at each prefix.
    pub era: Vec<f64>,
}

impl ErDynamics {
    /// Mean ERV over the prefixes where it is defined (0 if none).
    pub fn mean_erv(&self) -> f64 {
        mean_from(&self.erv, 1)
    }

    /// Mean ERA over the prefixes where it is defined (0 if none).
    pub fn mean_era(&self) -> f64 {
        mean_from(&self.era, 2)
    }
}

fn mean_from(x: &[f64], start: usize) -> f64 {
    if x.len() <= start {
        0.0
    } else {
        x[start..].iter().sum::<f64>() / (x.len() - start) as f64
    }
}

/// [`ErDynamics`] of `hidden` `[T, d]` at the given prefix lengths (strictly increasing,
/// each in `2..=T`; a one-row prefix has no spread). Errors on bad prefixes and on an
/// empty or non-finite matrix.
pub fn er_dynamics<B: Backend>(hidden: Tensor<B, 2>, prefixes: &[usize]) -> Result<ErDynamics> {
    let [t, _] = hidden.dims();
    if prefixes.is_empty() {
        return Err(GoodhartError::Empty {
            what: "prefixes".into(),
        });
    }
    if prefixes.windows(2).any(|w| w[1] <= w[0])
        || prefixes[0] < 2
        || prefixes[prefixes.len() - 1] > t
    {
        return Err(GoodhartError::invalid(
            "prefixes",
            format!("must increase strictly within 2..={t}"),
        ));
    }
    let er: Vec<f64> = prefixes
        .iter()
        .map(|&p| effective_rank(hidden.clone().slice(0..p)))
        .collect::<Result<_>>()?;
    let diff_against_history = |x: &[f64], start: usize| -> Vec<f64> {
        (0..x.len())
            .map(|j| {
                if j <= start {
                    0.0
                } else {
                    x[j] - x[start..j].iter().sum::<f64>() / (j - start) as f64
                }
            })
            .collect()
    };
    let erv = diff_against_history(&er, 0);
    let era = diff_against_history(&erv, 1);
    Ok(ErDynamics {
        prefixes: prefixes.to_vec(),
        er,
        erv,
        era,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use goodhart_core::testing::tolerance;
    use proptest::test_runner::{Config, TestRunner};

    fn matrix<B: Backend>(rows: &[Vec<f32>], device: &B::Device) -> Tensor<B, 2> {
        let (n, d) = (rows.len(), rows[0].len());
        Tensor::from_data(TensorData::new(rows.concat(), [n, d]), device)
    }

    #[test]
    fn jacobi_eigenvalues_by_hand() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3
        let mut e = sym_eigenvalues(vec![2.0, 1.0, 1.0, 2.0], 2);
        e.sort_by(f64::total_cmp);
        assert!((e[0] - 1.0).abs() < 1e-12 && (e[1] - 3.0).abs() < 1e-12);
        // p = (1/2, 1/4, 1/4) from singular values 2, 1, 1 (eigenvalues 4, 1, 1):
        // H = -(.5 ln .5 + .5 ln .25) = 1.5 ln 2 -> ER = 2^1.5
        assert!((effective_rank_of_eigenvalues(&[4.0, 1.0, 1.0]) - 2f64.powf(1.5)).abs() < 1e-12);
    }

    goodhart_core::backend_test! {
        fn isotropic_rank_n_and_rank_one<B>(device) {
            let tol = tolerance(1e-4) as f64;
            // rows +-e_i for i < 3 in R^dim: mean 0, C^T C = 2 I_3 -> singular values all
            // sqrt 2 -> ER 3. dim 5 (6 rows > 5 cols: the C^T C path) and dim 8 (C C^T path).
            for dim in [5, 8] {
                let mut rows = Vec::new();
                for i in 0..3 {
                    for sign in [1.0f32, -1.0] {
                        let mut r = vec![0.0; dim];
                        r[i] = sign;
                        rows.push(r);
                    }
                }
                let er = effective_rank(matrix::<B>(&rows, device)).unwrap();
                assert!((er - 3.0).abs() < tol, "dim {dim}: {er}");
            }
            // rank one: rows c_i v with varying c, plus an offset (removed by centring)
            let v = [0.3f32, -1.0, 2.0, 0.5];
            let rows: Vec<Vec<f32>> = [1.0f32, -2.0, 0.5, 3.0, 1.5].iter().map(|c| v.iter().map(|x| c * x + 7.0).collect()).collect();
            let er = effective_rank(matrix::<B>(&rows, device)).unwrap();
            assert!((er - 1.0).abs() < tol, "{er}");
            // no spread
            assert_eq!(effective_rank(matrix::<B>(&[vec![1.0, 2.0], vec![1.0, 2.0]], device)).unwrap(), 0.0);
            assert!(matches!(effective_rank(Tensor::<B, 2>::zeros([0, 3], device)), Err(GoodhartError::Empty { .. })));
            assert!(matches!(effective_rank(matrix::<B>(&[vec![f32::NAN, 0.0], vec![1.0, 2.0]], device)), Err(GoodhartError::NonFinite { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn er_dynamics_by_hand<B>(device) {
            let tol = tolerance(1e-4) as f64;
            // rows e1, -e1, e2, -e2, e3, -e3: prefixes 2, 4, 6 have ER 1, 2, 3
            // (prefix 4: e1, -e1, e2, -e2 centred at 0, C^T C = diag(2, 2)).
            let mut rows = Vec::new();
            for i in 0..3 {
                for sign in [1.0f32, -1.0] {
                    let mut r = vec![0.0; 4];
                    r[i] = sign;
                    rows.push(r);
                }
            }
            let dynm = er_dynamics(matrix::<B>(&rows, device), &[2, 4, 6]).unwrap();
            for (a, b) in dynm.er.iter().zip([1.0, 2.0, 3.0]) {
                assert!((a - b).abs() < tol, "{:?}", dynm.er);
            }
            // ERV: 0, 2 - 1 = 1, 3 - (1 + 2)/2 = 1.5; ERA: 0, 0, 1.5 - 1 = 0.5
            assert!((dynm.erv[1] - 1.0).abs() < tol && (dynm.erv[2] - 1.5).abs() < tol);
            assert!((dynm.era[2] - 0.5).abs() < tol);
            assert!((dynm.mean_erv() - 1.25).abs() < tol);
            assert!(er_dynamics(matrix::<B>(&rows, device), &[1, 4]).is_err());
            assert!(er_dynamics(matrix::<B>(&rows, device), &[4, 4]).is_err());
            assert!(er_dynamics(matrix::<B>(&rows, device), &[2, 7]).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn effective_rank_lies_between_one_and_min_dim<B>(device) {
            use proptest::prelude::*;
            let mut runner = TestRunner::new(Config { cases: 32, ..Default::default() });
            let strategy = (2usize..8, 1usize..8).prop_flat_map(|(n, d)| {
                (Just(n), Just(d), proptest::collection::vec(-10.0f32..10.0, n * d))
            });
            runner.run(&strategy, |(n, d, data)| {
                let h = Tensor::<B, 2>::from_data(TensorData::new(data, [n, d]), device);
                let er = effective_rank(h).unwrap();
                // 0 only without spread; else within [1, min(n, d)] (up to rounding)
                prop_assert!(er == 0.0 || (er >= 1.0 - 1e-6 && er <= n.min(d) as f64 + 1e-6), "{} for {}x{}", er, n, d);
                Ok(())
            }).unwrap();
        }
    }
}
