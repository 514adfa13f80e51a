//! KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
//! Reasoning Language Models", arXiv:2505.22617): the unclipped policy gradient, with a
//! penalty on the log-ratio of the tokens whose advantage and log-probability covary most.
//!
//! ```text
//! d       = clamp(lp - lp_old, -20, 20),  r = exp(d)
//! cov_t   = (A_t - mean(A)) (lp_t - mean(lp))        means over counted tokens
//! S       = the max(floor(ratio * n), 1) counted tokens of largest cov_t
//! L_t     = -A r + coef |d| 1[t in S]
//! loss    = aggregation(L, m)
//! ```
//!
//! Ties in `cov` go to the earlier token (row-major). Source: verl 0.9.1
//! `compute_policy_loss_kl_cov` (from the paper's code), which takes the top-k with
//! `torch.topk` and does not clamp the log-ratio.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{
    aggregate::LossAggregation,
    ops::{masked_mean, to_host},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::policy::{PolicyInputs, PolicyLoss, PolicyMetrics};

/// KL-Cov settings.
///
/// Defaults (verl's `policy_loss` config): `ratio = 2e-4` of the counted tokens,
/// `ppo_kl_coef = 0.1` (verl's config value; its function falls back to 1.0 when the key
/// is unset), `token-mean`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KlCovConfig {
    /// Fraction of counted tokens that get the penalty (verl `kl_cov_ratio`).
    pub ratio: f32,
    /// Coefficient of `|d|` on those tokens (verl `ppo_kl_coef`).
    pub ppo_kl_coef: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for KlCovConfig {
    fn default() -> Self {
        Self {
            ratio: 2e-4,
            ppo_kl_coef: 0.1,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

impl KlCovConfig {
    /// Errors unless `0 < ratio <= 1` and `ppo_kl_coef >= 0`, finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.ratio.is_finite() && self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(GoodhartError::invalid(
                "ratio",
                format!("must lie in (0, 1], got {}", self.ratio),
            ));
        }
        if !(self.ppo_kl_coef.is_finite() && self.ppo_kl_coef >= 0.0) {
            return Err(GoodhartError::invalid(
                "ppo_kl_coef",
                format!("must be finite and >= 0, got {}", self.ppo_kl_coef),
            ));
        }
        Ok(())
    }

    /// The KL-Cov loss. Nothing is clipped (clip fractions 0); `cov_frac` is the fraction
    /// of counted tokens that got the penalty.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let mask = &inputs.mask;
        let [b, t] = mask.dims();
        let d = inputs.log_ratio();
        let adv = inputs.advantages.clone();
        let cov = inputs.advantage_logp_covariance();
        let host = to_host(Tensor::cat(vec![cov, mask.clone()], 0))?;
        let (cov, m) = (&host[..b * t], &host[b * t..]);
        let mut counted: Vec<usize> = (0..b * t).filter(|&i| m[i] != 0.0).collect();
        let take = ((self.ratio * counted.len() as f32) as usize).max(1);
        // Largest covariance first; the sort is stable, so ties keep row-major order.
        counted.sort_by(|&i, &j| cov[j].total_cmp(&cov[i]));
        let mut picked = vec![0f32; b * t];
        for &i in counted.iter().take(take) {
            picked[i] = 1.0;
        }
        let picked = Tensor::<B, 2>::from_data(TensorData::new(picked, [b, t]), &mask.device());
        let per_token = -adv * d.clone().exp() + d.abs() * picked.clone() * self.ppo_kl_coef;
        let mut metrics = PolicyMetrics::new(inputs, inputs.no_tokens(), inputs.no_tokens(), None);
        metrics.cov_frac = Some(masked_mean(picked, mask));
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::t2;

    goodhart_core::backend_test! {
        fn penalises_the_top_covariance_tokens<B>(device) {
            // lp = -1, -2, -3, -4 (mean -2.5), A = 4, 3, -2, -3 (mean 0.5); padding NaN.
            // cov = 5.25, 1.25, 1.25, 5.25: ties at the top go to t0, then t3.
            // lp_old = lp - 0.1 on every token: d = 0.1, r = e^0.1.
            let lp_v = vec![-1.0f32, -2.0, -3.0, -4.0, f32::NAN];
            let lp = t2::<Autodiff<B>>(lp_v.clone(), 1, 5, device).require_grad();
            let old: Vec<f32> = lp_v.iter().map(|x| if x.is_nan() { 0.0 } else { x - 0.1 }).collect();
            let x = PolicyInputs::new(
                lp.clone(),
                t2(old, 1, 5, device),
                t2(vec![4.0, 3.0, -2.0, -3.0, 0.0], 1, 5, device),
                t2(vec![1.0, 1.0, 1.0, 1.0, 0.0], 1, 5, device),
            )
            .unwrap();
            let cfg = KlCovConfig { ratio: 0.5, ppo_kl_coef: 2.0, ..Default::default() };
            let out = cfg.loss(&x).unwrap();
            let r = 0.1f64.exp();
            // -A r summed: -(4 + 3 - 2 - 3) r = -2r; penalty 2 * 0.1 on t0 and t3.
            let tol = tolerance(1e-5);
            assert_close(&values(out.loss.clone()), &[((-2.0 * r + 0.4) / 4.0) as f32], tol);
            assert_close(&values(out.metrics.cov_frac.clone().unwrap()), &[0.5], tol);
            // Gradient: (-A r + coef sign(d) on picked) / 4.
            let g = values(lp.grad(&out.loss.backward()).unwrap());
            let want = [(-4.0 * r + 2.0) / 4.0, -3.0 * r / 4.0, 2.0 * r / 4.0, (3.0 * r + 2.0) / 4.0, 0.0].map(|v| v as f32);
            assert_close(&g, &want, tol);
            // The default ratio picks max(floor(2e-4 * 4), 1) = 1 token: t0.
            let one = KlCovConfig::default().loss(&x).unwrap();
            assert_close(&values(one.metrics.cov_frac.unwrap()), &[0.25], tol);
            assert!(KlCovConfig { ppo_kl_coef: -1.0, ..Default::default() }.loss(&x).is_err());
        }
    }
}
