//! SAPO: Soft Adaptive Policy Optimization (Gao et al. 2025, arXiv:2511.20347).
//!
//! A smooth gate replaces PPO's hard clip: far from the trust region the gradient fades
//! instead of stopping. Per token, with `r = exp(clamp(lp - lp_old, -20, 20))`:
//!
//! ```text
//! tau   = tau_pos if A > 0, else tau_neg
//! f(r)  = sigmoid(tau (r - 1)) * 4 / tau
//! L     = -f(r) A
//! loss  = aggregation(L, m)            (seq-mean-token-mean by default)
//! ```
//!
//! `d f / d lp = 4 sigmoid(.) (1 - sigmoid(.)) r`: exactly `r` at `r = 1` (the on-policy
//! gradient of PPO), falling off on both sides, faster for negative advantages when
//! `tau_neg > tau_pos`. Checked against verl 0.9.1's `compute_policy_loss_sapo`.

use burn::tensor::{activation::sigmoid, backend::Backend};
use goodhart_core::{aggregate::LossAggregation, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{PolicyInputs, PolicyLoss, PolicyMetrics};

/// SAPO settings.
///
/// Defaults: `tau_pos = 1.0`, `tau_neg = 1.05` (verl's `actor.tau_pos` / `tau_neg`);
/// aggregation `seq-mean-token-mean` (the paper's sequence mean; verl 0.9.1 forces this
/// mode for SAPO whatever `loss_agg_mode` says, here it is configurable).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SapoConfig {
    /// Gate temperature for tokens with `A > 0`.
    pub tau_pos: f32,
    /// Gate temperature for tokens with `A <= 0`.
    pub tau_neg: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for SapoConfig {
    fn default() -> Self {
        Self {
            tau_pos: 1.0,
            tau_neg: 1.05,
            aggregation: LossAggregation::SeqMeanTokenMean,
        }
    }
}

impl SapoConfig {
    /// Errors unless both temperatures are finite and positive.
    pub fn validate(&self) -> Result<()> {
        for (name, tau) in [("tau_pos", self.tau_pos), ("tau_neg", self.tau_neg)] {
            if !(tau.is_finite() && tau > 0.0) {
                return Err(GoodhartError::invalid(
                    name,
                    format!("must be finite and > 0, got {tau}"),
                ));
            }
        }
        Ok(())
    }

    /// The SAPO loss. No token is clipped, so the clip fractions are 0; the KL estimates
    /// are the token ones.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let ratio = inputs.log_ratio().exp();
        let (_, pos) = inputs.advantage_signs();
        let tau = inputs
            .advantages
            .zeros_like()
            .add_scalar(self.tau_neg)
            .mask_fill(pos, self.tau_pos);
        let gate = sigmoid((ratio - 1.0) * tau.clone()) * tau.recip() * 4.0;
        let per_token = -gate * inputs.advantages.clone();
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics: PolicyMetrics::new(inputs, inputs.no_tokens(), inputs.no_tokens(), None),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::t2;

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    goodhart_core::backend_test! {
        fn hand_computed_value_and_gradient<B>(device) {
            // One row of ratios 1, 2, 0.5 (lp_old = 0) and a padded NaN; A = 1, -2, 3.
            let r = [1.0f64, 2.0, 0.5];
            let a = [1.0f64, -2.0, 3.0];
            let lp = t2::<Autodiff<B>>(vec![0.0, 2f32.ln(), 0.5f32.ln(), f32::NAN], 1, 4, device).require_grad();
            let inputs = PolicyInputs::new(
                lp.clone(),
                Tensor::zeros([1, 4], device),
                t2(vec![1.0, -2.0, 3.0, 9.0], 1, 4, device),
                t2(vec![1.0, 1.0, 1.0, 0.0], 1, 4, device),
            )
            .unwrap();
            let out = SapoConfig::default().loss(&inputs).unwrap();
            // f = sigmoid(tau (r - 1)) 4 / tau with tau 1 (A > 0) or 1.05 (A < 0);
            // one row: seq-mean-token-mean = token mean.
            let tau = [1.0, 1.05, 1.0];
            let f: Vec<f64> = (0..3).map(|i| sig(tau[i] * (r[i] - 1.0)) * 4.0 / tau[i]).collect();
            let want = -(0..3).map(|i| f[i] * a[i]).sum::<f64>() / 3.0;
            assert_close(&values(out.loss.clone()), &[want as f32], tolerance(1e-6));
            // d/d lp = -A 4 s (1 - s) r / 3; at r = 1 that is -A / 3, PPO's on-policy gradient.
            let g = values(lp.grad(&out.loss.backward()).unwrap());
            let want: Vec<f32> = (0..3)
                .map(|i| {
                    let s = sig(tau[i] * (r[i] - 1.0));
                    (-a[i] * 4.0 * s * (1.0 - s) * r[i] / 3.0) as f32
                })
                .chain([0.0])
                .collect();
            assert_close(&g, &want, tolerance(1e-6));
            assert_close(&g[..1], &[-1.0 / 3.0], tolerance(1e-6));
            assert_close(&values(out.metrics.clip_frac_high), &[0.0], 0.0);
            assert!(SapoConfig { tau_neg: 0.0, ..Default::default() }.loss(&inputs).is_err());
        }
    }
}
