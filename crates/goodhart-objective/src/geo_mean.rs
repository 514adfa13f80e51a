//! GMPO: Geometric-Mean Policy Optimization (Zhao et al. 2025, arXiv:2507.20673), verl's
//! `geo_mean` loss.
//!
//! The sequence objective uses the geometric mean of the token ratios, each clipped in log
//! space in the direction the advantage pushes, so one outlier token cannot dominate:
//!
//! ```text
//! d_t   = clamp(lp_t - lp_old_t, -20, 20)
//! c_t   = sgn(A) min(sgn(A) d_t, sgn(A) clamp(d_t, -eps_low, eps_high))
//! s_i   = exp( sum_t m c_t / sum_t m )           (the clipped geometric-mean ratio)
//! A_i   = sum_t m A_t / sum_t m
//! L_i   = -A_i s_i
//! loss  = sum_i L_i / N                          (N: the seq-mean modes' row count)
//! ```
//!
//! Rollout IS weights enter per sequence, as their geometric mean
//! `exp(sum_t m ln(w_t + 1e-10) / sum_t m)`, as verl does. Source: verl 0.9.1
//! `compute_policy_loss_geo_mean`, which takes no `loss_agg_mode` and averages over the
//! local rows (`torch.mean`); here the row count follows [`GlobalBatch`]'s convention
//! (empty rows counted by default, which is `torch.mean`). verl does not clamp `d` at
//! +-20; the two differ only past that.
//!
//! [`GlobalBatch`]: goodhart_core::aggregate::GlobalBatch

use burn::tensor::backend::Backend;
use goodhart_core::{aggregate::LossAggregation, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{check_clip_range, PolicyInputs, PolicyLoss, PolicyMetrics};

/// GMPO settings.
///
/// Defaults: `eps_low = eps_high = 0.4`, the clip range `(e^-0.4, e^0.4)` of the GMPO
/// paper (verl reads its `clip_ratio`, default 0.2, as this log-space range).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GeoMeanConfig {
    /// Lower clip of the token log-ratio: `-eps_low`.
    pub eps_low: f32,
    /// Upper clip of the token log-ratio: `eps_high`.
    pub eps_high: f32,
}

impl Default for GeoMeanConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.4,
            eps_high: 0.4,
        }
    }
}

impl GeoMeanConfig {
    /// Errors unless `0 <= eps_low <= 1` and `eps_high >= 0`, finite.
    pub fn validate(&self) -> Result<()> {
        check_clip_range(self.eps_low, self.eps_high)
    }

    /// The GMPO loss and metrics: a token counts as clipped (high for `A > 0`, low for
    /// `A < 0`) where its log-ratio lies outside `[-eps_low, eps_high]`, as verl counts.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let d = inputs.log_ratio();
        let sign = inputs.advantages.clone().sign();
        let d_clip = d.clone().clamp(-self.eps_low, self.eps_high);
        let c = (sign.clone() * d.clone()).min_pair(sign.clone() * d_clip.clone()) * sign;
        let counts = inputs.mask.clone().sum_dim(1);
        let tokens = counts.clone().clamp_min(1e-8);
        let seq_ratio = ((c * inputs.mask.clone()).sum_dim(1) / tokens.clone()).exp();
        let seq_adv = (inputs.advantages.clone() * inputs.mask.clone()).sum_dim(1) / tokens.clone();
        let mut per_seq = -seq_adv * seq_ratio;
        if let Some(w) = &inputs.rollout_is_weights {
            let log_w = (w.clone() + 1e-10).log() * inputs.mask.clone();
            per_seq = per_seq * (log_w.sum_dim(1) / tokens).exp();
        }
        // One "token" per row: the sequence mean is seq-mean-token-sum over [B, 1].
        let has_token = counts.greater_elem(0.0).float();
        let loss = LossAggregation::SeqMeanTokenSum.aggregate_global(
            per_seq,
            &has_token,
            &inputs.global,
        )?;
        let clipped = d.detach().not_equal(d_clip.detach());
        let (neg, pos) = inputs.advantage_signs();
        let low = clipped.clone().bool_and(neg);
        let high = clipped.bool_and(pos);
        Ok(PolicyLoss {
            loss,
            metrics: PolicyMetrics::new(inputs, low, high, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use goodhart_core::aggregate::{EmptyRows, GlobalBatch};
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::t2;

    goodhart_core::backend_test! {
        fn hand_computed_value_gradient_and_weights<B>(device) {
            // Row 0 (A = 1): d = ln 2, 0.1 -> clip to 0.4 above: c = 0.4, 0.1;
            //   s = exp(0.25), L = -exp(0.25).
            // Row 1 (A = -1): d = -1, 0.2 -> for A < 0 the clip binds below: c = max(d, clamp(d))
            //   = -0.4, 0.2; s = exp(-0.1), L = +exp(-0.1).
            // Row 2: empty (NaN padding). Mean over 3 rows (empty counted).
            let d = [2f32.ln(), 0.1, -1.0, 0.2, f32::NAN, f32::NAN];
            let lp = t2::<Autodiff<B>>(d.to_vec(), 3, 2, device).require_grad();
            let inputs = PolicyInputs::new(
                lp.clone(),
                Tensor::zeros([3, 2], device),
                t2(vec![1.0, 1.0, -1.0, -1.0, 0.0, 0.0], 3, 2, device),
                t2(vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 3, 2, device),
            )
            .unwrap();
            let out = GeoMeanConfig::default().loss(&inputs).unwrap();
            let (l0, l1) = (-(0.25f64).exp(), (-0.1f64).exp());
            let tol = tolerance(1e-6);
            assert_close(&values(out.loss.clone()), &[((l0 + l1) / 3.0) as f32], tol);
            // Gradient flows only through unclipped tokens: d L_i / d lp_t = -A_i s_i / (2 * 3).
            let g = values(lp.grad(&out.loss.backward()).unwrap());
            let want = [0.0, l0 / 6.0, 0.0, l1 / 6.0, 0.0, 0.0].map(|x| x as f32);
            assert_close(&g, &want, tol);
            // clipped: token 0 (A > 0) high, token 2 (A < 0) low; 1 of 4 each.
            assert_close(&values(out.metrics.clip_frac_high.clone()), &[0.25], tol);
            assert_close(&values(out.metrics.clip_frac_low.clone()), &[0.25], tol);
            // Skipping the empty row: divide by 2.
            let skip = inputs.clone().with_global_batch(GlobalBatch { empty_rows: EmptyRows::Skip, ..Default::default() }).unwrap();
            assert_close(&values(GeoMeanConfig::default().loss(&skip).unwrap().loss), &[((l0 + l1) / 2.0) as f32], tol);
            // IS weights 4 and 1 on row 0 scale it by their geometric mean 2; row 1 by 1.
            let w = t2(vec![4.0, 1.0, 1.0, 1.0, 0.0, 0.0], 3, 2, device);
            let weighted = inputs.with_rollout_is_weights(w).unwrap();
            assert_close(&values(GeoMeanConfig::default().loss(&weighted).unwrap().loss), &[((2.0 * l0 + l1) / 3.0) as f32], tolerance(1e-5));
        }
    }
}
