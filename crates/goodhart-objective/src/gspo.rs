//! GSPO: Group Sequence Policy Optimization (Zheng et al. 2025, arXiv:2507.18071).
//!
//! The importance ratio is taken per *sequence*, as the geometric mean of the token ratios,
//! and clipped per sequence:
//!
//! ```text
//! s_i      = exp( (1/|y_i|) sum_t m_t (lp_t - lp_old_t) )               (GSPO eq. 7)
//! s_i,t    = exp( lp_t - sg(lp_t) + sg(log s_i) )      value s_i, d s_i,t / d lp_t = s_i
//! L_t      = max(-A_t s_i,t, -A_t clip(s_i,t, 1 - eps_low, 1 + eps_high))
//! loss     = aggregation(L, m)          (seq-mean-token-mean by default)
//! ```
//!
//! The stop-gradient form (GSPO-token, eq. 13 of the paper; verl's
//! `compute_policy_loss_gspo`) has the value of the sequence ratio but sends every token the
//! gradient `s_i * grad lp_t`; with one advantage per response and seq-mean-token-mean
//! aggregation its gradient equals that of the sequence objective
//! `-A_i clip-min(s_i(theta))`, i.e. `-A_i s_i (1/|y_i|) sum_t grad lp_t`.
//! `log s_i,t` is clamped above at 10 before `exp`, as verl does; a clamped token passes no
//! gradient.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{aggregate::LossAggregation, ops::zero_masked, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{check_clip_range, PolicyInputs, PolicyLoss, PolicyMetrics};

/// Upper clamp on the sequence log-ratio before `exp` (verl's GSPO uses 10).
pub const SEQ_LOG_RATIO_MAX: f32 = 10.0;

/// GSPO settings.
///
/// Defaults: `eps_low = 3e-4`, `eps_high = 4e-4` (the GSPO paper's range, used by verl's
/// GSPO recipe; sequence ratios stay much closer to 1 than token ratios, hence the small
/// range); aggregation `seq-mean-token-mean` (the paper's `1/|y_i|` normalisation; verl
/// 0.9.1 applies its configured `loss_agg_mode`, `token-mean` unless set).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GspoConfig {
    /// Lower clip of the sequence ratio: `1 - eps_low`.
    pub eps_low: f32,
    /// Upper clip of the sequence ratio: `1 + eps_high`.
    pub eps_high: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for GspoConfig {
    fn default() -> Self {
        Self {
            eps_low: 3e-4,
            eps_high: 4e-4,
            aggregation: LossAggregation::SeqMeanTokenMean,
        }
    }
}

impl GspoConfig {
    /// Errors unless `0 <= eps_low <= 1` and `eps_high >= 0`, finite.
    pub fn validate(&self) -> Result<()> {
        check_clip_range(self.eps_low, self.eps_high)
    }

    /// The sequence log-ratio `log s_i = mean over counted tokens of (lp - lp_old)`, `[B, 1]`
    /// (0 for a response with no counted token). Carries the gradient of `lp`.
    pub fn seq_log_ratio<B: Backend>(inputs: &PolicyInputs<B>) -> Tensor<B, 2> {
        let d = zero_masked(inputs.logp.clone() - inputs.logp_old.clone(), &inputs.mask);
        d.sum_dim(1) / inputs.mask.clone().sum_dim(1).clamp_min(1.0)
    }

    /// The GSPO loss and metrics. Clip fractions count tokens (each token of a clipped
    /// sequence counts once), as the GSPO paper's clipping-fraction figure does; the KL
    /// estimates use token ratios.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let seq = Self::seq_log_ratio(inputs).detach();
        let logp = inputs.logp.clone();
        let ratio = (logp.clone() - logp.detach() + seq)
            .clamp_max(SEQ_LOG_RATIO_MAX)
            .exp();
        let adv = inputs.advantages.clone();
        let unclipped = -adv.clone() * ratio.clone();
        let clipped = -adv * ratio.clone().clamp(1.0 - self.eps_low, 1.0 + self.eps_high);
        let per_token = unclipped.max_pair(clipped);
        let (neg, pos) = inputs.advantage_signs();
        let ratio = ratio.detach();
        let low = ratio.clone().lower_elem(1.0 - self.eps_low).bool_and(neg);
        let high = ratio.greater_elem(1.0 + self.eps_high).bool_and(pos);
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics: PolicyMetrics::new(inputs, low, high, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::{ratio_inputs, scalar, t2};

    goodhart_core::backend_test! {
        fn hand_computed_vector<B>(device) {
            // Row 0: token ratios 4 and 1, s = exp((ln 4 + 0)/2) = 2, A = 1:
            //   max(-2, -clip(2, 0.8, 1.2)) = -1.2 on both tokens (clipped high).
            // Row 1: one counted token, ratio 0.9 (padding NaN), s = 0.9, A = -1:
            //   max(0.9, 0.9) = 0.9.
            // seq-mean-token-mean: (-1.2 + 0.9) / 2 = -0.15; 2 of 3 tokens clipped high.
            let inputs = ratio_inputs::<B>(
                vec![4.0, 1.0, 0.9, f32::NAN],
                vec![1.0, 1.0, -1.0, -1.0],
                vec![1.0, 1.0, 1.0, 0.0],
                2,
                2,
                device,
            );
            let cfg = GspoConfig { eps_low: 0.2, eps_high: 0.2, ..Default::default() };
            let out = cfg.loss(&inputs).unwrap();
            let tol = tolerance(1e-6);
            assert_close(&values(out.loss), &[-0.15], tol);
            assert_close(&values(out.metrics.clip_frac_high), &[2.0 / 3.0], tol);
            assert_close(&values(out.metrics.clip_frac_low), &[0.0], tol);
            assert_close(&values(GspoConfig::seq_log_ratio(&inputs)), &[2f32.ln(), 0.9f32.ln()], tolerance(1e-6));
            // With the paper's range 3e-4/4e-4 row 1 (s = 0.9, A < 0) is clipped low too:
            // max(0.9, 0.9997) = 0.9997, so the loss is (-1.0004 + 0.9997) / 2.
            let out = GspoConfig::default().loss(&inputs).unwrap();
            assert_close(&values(out.loss), &[(-1.0004 + 0.9997) / 2.0], tolerance(1e-6));
            assert_close(&values(out.metrics.clip_frac_low), &[1.0 / 3.0], tol);
        }
    }

    goodhart_core::backend_test! {
        fn token_gradient_is_the_sequence_gradient<B>(device) {
            // One response, three tokens, A = 0.5, a range wide enough that nothing clips.
            // The sequence objective f(lp) = -A exp(mean(lp - lp_old)) has
            // df/dlp_t = -A s / T, the same for every token (token ratios would give
            // -A r_t / T instead). Checked against central finite differences of f.
            let d = [0.1f64, -0.2, 0.05];
            let a = 0.5f64;
            let f = |d: &[f64]| -a * (d.iter().sum::<f64>() / 3.0).exp();
            let fd: Vec<f32> = (0..3)
                .map(|i| {
                    let h = 1e-5;
                    let (mut up, mut dn) = (d, d);
                    up[i] += h;
                    dn[i] -= h;
                    ((f(&up) - f(&dn)) / (2.0 * h)) as f32
                })
                .collect();
            let s = (d.iter().sum::<f64>() / 3.0).exp();
            assert_close(&fd, &[(-a * s / 3.0) as f32; 3], 1e-6);

            let lp = t2::<Autodiff<B>>(d.iter().map(|&x| x as f32).collect(), 1, 3, device).require_grad();
            let inputs = PolicyInputs::new(
                lp.clone(),
                Tensor::zeros([1, 3], device),
                Tensor::ones([1, 3], device) * 0.5,
                Tensor::ones([1, 3], device),
            )
            .unwrap();
            let cfg = GspoConfig { eps_low: 1.0, eps_high: 10.0, ..Default::default() };
            let out = cfg.loss(&inputs).unwrap();
            assert_close(&values(out.loss.clone()), &[f(&d) as f32], tolerance(1e-6));
            let g = values(lp.grad(&out.loss.backward()).unwrap());
            assert_close(&g, &fd, tolerance(1e-5));

            // A clipped sequence passes no gradient.
            let tight = GspoConfig { eps_low: 0.2, eps_high: 0.0, ..Default::default() };
            let inputs = PolicyInputs::new(
                lp.clone() + 1.0,
                Tensor::zeros([1, 3], device),
                Tensor::ones([1, 3], device),
                Tensor::ones([1, 3], device),
            )
            .unwrap();
            let out = tight.loss(&inputs).unwrap();
            let g = values(lp.grad(&out.loss.backward()).unwrap());
            assert_close(&g, &[0.0; 3], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn unit_ratio_and_masked_garbage<B>(device) {
            // lp == lp_old: s = 1 and the loss is -seq_mean_token_mean(A); with advantage
            // rows [1, 3] and [4, pad]: (-(1 + 3)/2 - 4)/2 = -3.
            let lp = |pad: f32| t2::<B>(vec![-1.0, -2.0, -0.5, pad], 2, 2, device);
            let make = |pad: f32| {
                PolicyInputs::new(
                    lp(pad),
                    lp(pad * 2.0),
                    t2(vec![1.0, 3.0, 4.0, pad], 2, 2, device),
                    t2(vec![1.0, 1.0, 1.0, 0.0], 2, 2, device),
                )
                .unwrap()
            };
            let cfg = GspoConfig::default();
            let clean = cfg.loss(&make(0.0)).unwrap();
            assert_close(&values(clean.loss.clone()), &[-3.0], tolerance(1e-6));
            assert_eq!(scalar(clean.metrics.clip_frac_high), 0.0);
            let dirty = cfg.loss(&make(f32::NAN)).unwrap();
            assert_eq!(scalar(dirty.loss), scalar(clean.loss));
            let dirty = cfg.loss(&make(123.0)).unwrap();
            assert_close(&values(dirty.loss), &[-3.0], tolerance(1e-6));
        }
    }
}
