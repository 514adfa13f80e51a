//! Off-policy estimates of a target policy's value from samples logged under a
//! behaviour policy (contextual-bandit form: one action, one reward per sample), with
//! importance weights `w_i = pi_target(a_i | x_i) / pi_behaviour(a_i | x_i)` given as log
//! ratios `log pi_target - log pi_behaviour` (for sequences, the sum of token log-prob
//! differences).
//!
//! - IPS (Horvitz-Thompson): `mean_i w_i r_i`; unbiased, high variance.
//! - SNIPS (self-normalised): `sum_i w_i r_i / sum_i w_i`; biased, consistent, lower
//!   variance.
//! - Doubly robust (Dudik, Langford & Li 2011): `mean_i v_hat(x_i) + w_i (r_i - q_hat(x_i, a_i))`,
//!   with `q_hat` a reward model's prediction for the logged action and
//!   `v_hat(x) = E_{a ~ pi_target} q_hat(x, a)`; unbiased if either the weights or the model
//!   are right.

use goodhart_core::{GoodhartError, Result};

use crate::stats::check_pair;

fn weights(rewards: &[f64], log_ratios: &[f64]) -> Result<Vec<f64>> {
    check_pair(rewards, "rewards", log_ratios, "log_ratios")?;
    let w: Vec<f64> = log_ratios.iter().map(|l| l.exp()).collect();
    if w.iter().any(|v| !v.is_finite()) {
        return Err(GoodhartError::NonFinite {
            what: "importance weights exp(log_ratios) (overflow)".into(),
        });
    }
    Ok(w)
}

/// Inverse propensity scoring `mean_i w_i r_i`. Errors on empty, non-finite or mismatched
/// input and on weights that overflow.
pub fn ips(rewards: &[f64], log_ratios: &[f64]) -> Result<f64> {
    let w = weights(rewards, log_ratios)?;
    Ok(w.iter().zip(rewards).map(|(w, r)| w * r).sum::<f64>() / rewards.len() as f64)
}

/// Self-normalised IPS `sum_i w_i r_i / sum_i w_i`. Errors as [`ips`] does; weights
/// are positive, so the denominator is too.
pub fn snips(rewards: &[f64], log_ratios: &[f64]) -> Result<f64> {
    let w = weights(rewards, log_ratios)?;
    Ok(w.iter().zip(rewards).map(|(w, r)| w * r).sum::<f64>() / w.iter().sum::<f64>())
}

/// Doubly robust `mean_i v_hat_i + w_i (r_i - q_hat_i)`: `q_logged` is the model's reward
/// for the logged action, `v_target` its expected reward under the target policy.
/// Errors on empty, non-finite or mismatched input.
pub fn doubly_robust(
    rewards: &[f64],
    log_ratios: &[f64],
    q_logged: &[f64],
    v_target: &[f64],
) -> Result<f64> {
    let w = weights(rewards, log_ratios)?;
    check_pair(rewards, "rewards", q_logged, "q_logged")?;
    check_pair(rewards, "rewards", v_target, "v_target")?;
    let total: f64 = (0..rewards.len())
        .map(|i| v_target[i] + w[i] * (rewards[i] - q_logged[i]))
        .sum();
    Ok(total / rewards.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn estimators_by_hand() {
        // w = 2, .5, 1; r = 1, 0, 1: w r = 2, 0, 1
        let (r, l) = ([1.0, 0.0, 1.0], [2f64.ln(), 0.5f64.ln(), 0.0]);
        assert!((ips(&r, &l).unwrap() - 1.0).abs() < 1e-12);
        assert!((snips(&r, &l).unwrap() - 3.0 / 3.5).abs() < 1e-12);
        // DR with q = .5, v = .6: .6 + 2(.5) = 1.6; .6 + .5(-.5) = .35; .6 + 1(.5) = 1.1 -> 3.05/3
        let dr = doubly_robust(&r, &l, &[0.5; 3], &[0.6; 3]).unwrap();
        assert!((dr - 3.05 / 3.0).abs() < 1e-12);
        // model-free DR is IPS; a perfect model (q = r) gives mean(v)
        assert!((doubly_robust(&r, &l, &[0.0; 3], &[0.0; 3]).unwrap() - 1.0).abs() < 1e-12);
        assert!((doubly_robust(&r, &l, &r, &[0.2, 0.4, 0.9]).unwrap() - 0.5).abs() < 1e-12);
        assert!(ips(&[1.0], &[1000.0]).is_err());
        assert!(snips(&[1.0, 2.0], &[0.0]).is_err());
        assert!(doubly_robust(&r, &l, &[0.5; 2], &[0.6; 3]).is_err());
    }
}
