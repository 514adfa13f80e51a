//! CISPO: REINFORCE with a clipped, detached importance-sampling weight (MiniMax-M1,
//! arXiv:2506.13585, eq. 4).
//!
//! ```text
//! r   = exp(clamp(lp - lp_old, -20, 20))
//! w   = sg(min(r, eps_max))            (and max(., eps_min) when a lower bound is set)
//! L_t = -w A_t lp_t
//! loss = aggregation(L, m)             (token-mean: the paper normalises by sum |o_i|)
//! ```
//!
//! Unlike PPO-clip, no token loses its gradient: a token whose ratio left the trust region
//! keeps `grad = -w A grad lp`, only with a truncated weight. So low-probability "fork"
//! tokens (the paper's "However", "Wait") keep contributing after the first update. The
//! loss *value* is `-w A lp`, not a ratio objective; only its gradient is meaningful.

use burn::tensor::backend::Backend;
use goodhart_core::{aggregate::LossAggregation, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{PolicyInputs, PolicyLoss, PolicyMetrics};

/// CISPO settings.
///
/// Defaults: `eps_max = 5.0`, the cap TRL's docs recommend for `loss_type = "cispo"`
/// (after ScaleRL's CISPO; *unverified* here). TRL clamps the weight at its `epsilon_high`
/// used as the cap itself, as `eps_max` is here; Trinity-RFT's CISPO caps at `1 + 0.28`;
/// verl 0.9.1 clamps the weight to `[1 - clip_ratio_low, 1 + clip_ratio_high]`, which
/// `eps_min = 0.8, eps_max = 1.2` reproduce (checked against its outputs).
/// `eps_min = None`: no lower bound, as MiniMax-M1 ("we did not impose a lower bound on
/// the IS weight ... we only tuned eps_high"). Aggregation `token-mean` (MiniMax-M1's
/// `1 / sum_i |o_i|`, TRL's CISPO normaliser).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CispoConfig {
    /// Upper cap on the importance weight (> 0). MiniMax-M1's `1 + eps_high^IS`.
    pub eps_max: f32,
    /// Optional lower bound on the weight (`1 - eps_low^IS`); `None` leaves it unbounded.
    pub eps_min: Option<f32>,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for CispoConfig {
    fn default() -> Self {
        Self {
            eps_max: 5.0,
            eps_min: None,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

impl CispoConfig {
    /// Errors unless `eps_max > 0` and, when set, `0 <= eps_min <= eps_max`, finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.eps_max.is_finite() && self.eps_max > 0.0) {
            return Err(GoodhartError::invalid(
                "eps_max",
                format!("must be finite and > 0, got {}", self.eps_max),
            ));
        }
        if let Some(lo) = self.eps_min {
            if !(lo.is_finite() && (0.0..=self.eps_max).contains(&lo)) {
                return Err(GoodhartError::invalid(
                    "eps_min",
                    format!("must lie in [0, eps_max = {}], got {lo}", self.eps_max),
                ));
            }
        }
        Ok(())
    }

    /// The CISPO loss and metrics: `clip_frac_high` is the fraction of tokens whose weight
    /// was truncated at `eps_max`, `clip_frac_low` those raised to `eps_min` (0 without a
    /// lower bound); both regardless of the advantage's sign.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let ratio = inputs.log_ratio().exp().detach();
        let mut weight = ratio.clone().clamp_max(self.eps_max);
        let high = ratio.clone().greater_elem(self.eps_max);
        let low = match self.eps_min {
            Some(lo) => {
                weight = weight.clamp_min(lo);
                ratio.lower_elem(lo)
            }
            // ratio >= exp(-20) > 0: no token is raised without a lower bound.
            None => ratio.lower_elem(0.0),
        };
        let per_token = -weight * inputs.advantages.clone() * inputs.logp.clone();
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics: PolicyMetrics::new(inputs, low, high, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::{scalar, t2};

    // lp and ratios r = exp(lp - lp_old): lp_old = lp - ln r. Token 3 is padding.
    const LP: [f32; 4] = [-1.0, -2.0, -0.5, f32::NAN];
    const R: [f32; 4] = [2.0, 0.5, 8.0, 1.0];
    const ADV: [f32; 4] = [1.0, -1.0, 1.0, f32::NAN];
    const MASK: [f32; 4] = [1.0, 1.0, 1.0, 0.0];

    fn inputs<B: Backend>(lp: Tensor<B, 2>, device: &B::Device) -> PolicyInputs<B> {
        let old: Vec<f32> = LP.iter().zip(R).map(|(l, r)| l - r.ln()).collect();
        PolicyInputs::new(
            lp,
            t2(old, 1, 4, device),
            t2(ADV.to_vec(), 1, 4, device),
            t2(MASK.to_vec(), 1, 4, device),
        )
        .unwrap()
    }

    goodhart_core::backend_test! {
        fn hand_computed_vector_and_gradient<B>(device) {
            let lp = t2::<Autodiff<B>>(LP.to_vec(), 1, 4, device).require_grad();
            let x = inputs(lp.clone(), device);
            // eps_max 5: weights w = min(r, 5) = 2, 0.5, 5 (truncated);
            // -w A lp = -2*1*(-1) = 2, -0.5*(-1)*(-2) = -1, -5*1*(-0.5) = 2.5
            // token-mean (2 - 1 + 2.5)/3 = 7/6
            let out = CispoConfig::default().loss(&x).unwrap();
            let tol = tolerance(1e-5);
            assert_close(&values(out.loss.clone()), &[7.0 / 6.0], tol);
            assert_close(&values(out.metrics.clip_frac_high.clone()), &[1.0 / 3.0], tol);
            assert_close(&values(out.metrics.clip_frac_low.clone()), &[0.0], 0.0);
            // The weight is detached: d/d lp = -w A / 3 = -2/3, 1/6, -5/3 (padding 0).
            // Unlike PPO-clip the truncated token keeps its gradient.
            let g = values(lp.grad(&out.loss.backward()).unwrap());
            assert_close(&g, &[-2.0 / 3.0, 0.5 / 3.0, -5.0 / 3.0, 0.0], tol);

            // A lower bound 0.6 raises token 1's weight: -0.6*(-1)*(-2) = -1.2,
            // (2 - 1.2 + 2.5)/3 = 1.1, and one token in three is clipped low.
            let lo = CispoConfig { eps_min: Some(0.6), ..Default::default() };
            let out = lo.loss(&x).unwrap();
            assert_close(&values(out.loss), &[1.1], tol);
            assert_close(&values(out.metrics.clip_frac_low), &[1.0 / 3.0], tol);
            // TRL-like cap 1.28 truncates tokens 0 and 2.
            let capped = CispoConfig { eps_max: 1.28, ..Default::default() };
            assert_close(&values(capped.loss(&x).unwrap().metrics.clip_frac_high), &[2.0 / 3.0], tol);
        }
    }

    goodhart_core::backend_test! {
        fn masked_garbage_and_bad_config<B>(device) {
            let clean = scalar(CispoConfig::default().loss(&inputs(t2::<B>(LP.to_vec(), 1, 4, device), device)).unwrap().loss);
            let mut lp = LP;
            lp[3] = 1e30;
            let dirty = scalar(CispoConfig::default().loss(&inputs(t2::<B>(lp.to_vec(), 1, 4, device), device)).unwrap().loss);
            assert_eq!(clean, dirty);
            let x = inputs(t2::<B>(LP.to_vec(), 1, 4, device), device);
            for bad in [
                CispoConfig { eps_max: 0.0, ..Default::default() },
                CispoConfig { eps_min: Some(6.0), ..Default::default() },
                CispoConfig { eps_min: Some(-1.0), ..Default::default() },
            ] {
                assert!(matches!(bad.loss(&x), Err(GoodhartError::InvalidArgument { .. })), "{bad:?}");
            }
        }
    }
}
