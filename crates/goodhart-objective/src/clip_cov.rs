//! Clip-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for
//! Reasoning Language Models", arXiv:2505.22617): PPO-clip that also removes the gradient
//! of a few random tokens whose advantage and log-probability covary strongly, the tokens
//! that drive entropy collapse.
//!
//! ```text
//! r       = exp(clamp(lp - lp_old, -20, 20))
//! L_t     = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))          (PPO-clip)
//! cov_t   = (A_t - mean(A)) (lp_t - mean(lp))        means over counted tokens
//! C       = counted tokens not clipped by PPO with lb < cov_t < ub
//! S       = max(floor(ratio * n), 1) tokens drawn from C without replacement (all of C
//!           when it is smaller), n the counted tokens
//! loss    = aggregation(L * 1[t not in S], m)
//! ```
//!
//! The draw uses the stream `clip_cov` of [`PolicyInputs::seed`], so a run repeats.
//! Source: verl 0.9.1 `compute_policy_loss_clip_cov` (from the paper's code), which
//! draws with `torch.randperm` and does not clamp the log-ratio.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{
    aggregate::LossAggregation,
    ops::{masked_mean, to_host},
    seed, GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::policy::{check_clip_range, PolicyInputs, PolicyLoss, PolicyMetrics};

/// Clip-Cov settings.
///
/// Defaults (verl's `policy_loss.clip_cov_*` and `clip_ratio`): `ratio = 2e-4` of the
/// counted tokens, covariance window `(1, 5)`, PPO clip `0.2 / 0.2`, `token-mean`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClipCovConfig {
    /// Fraction of counted tokens whose gradient is removed (verl `clip_cov_ratio`).
    pub ratio: f32,
    /// Lower bound of the covariance window (verl `clip_cov_lb`).
    pub lb: f32,
    /// Upper bound of the covariance window (verl `clip_cov_ub`).
    pub ub: f32,
    /// PPO's lower clip.
    pub eps_low: f32,
    /// PPO's upper clip.
    pub eps_high: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for ClipCovConfig {
    fn default() -> Self {
        Self {
            ratio: 2e-4,
            lb: 1.0,
            ub: 5.0,
            eps_low: 0.2,
            eps_high: 0.2,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

impl ClipCovConfig {
    /// Errors unless `0 < ratio <= 1`, `lb < ub` (finite) and the clip range is valid.
    pub fn validate(&self) -> Result<()> {
        check_clip_range(self.eps_low, self.eps_high)?;
        if !(self.ratio.is_finite() && self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(GoodhartError::invalid(
                "ratio",
                format!("must lie in (0, 1], got {}", self.ratio),
            ));
        }
        if !(self.lb.is_finite() && self.ub.is_finite() && self.lb < self.ub) {
            return Err(GoodhartError::invalid(
                "ub",
                format!(
                    "the window needs finite lb < ub, got ({}, {})",
                    self.lb, self.ub
                ),
            ));
        }
        Ok(())
    }

    /// The Clip-Cov loss; metrics as PPO-clip's (without dual-clip), plus `cov_frac`, the
    /// fraction of counted tokens whose gradient the covariance rule removed (verl's
    /// `pg_clipfrac` for this loss).
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let mask = &inputs.mask;
        let [b, t] = mask.dims();
        let ratio = inputs.log_ratio().exp();
        let adv = inputs.advantages.clone();
        let unclipped = -adv.clone() * ratio.clone();
        let clipped = -adv.clone() * ratio.clone().clamp(1.0 - self.eps_low, 1.0 + self.eps_high);
        let by_ppo = clipped.clone().greater(unclipped.clone()).float();
        let cov = inputs.advantage_logp_covariance();
        let host = to_host(Tensor::cat(vec![cov, by_ppo, mask.clone()], 0))?;
        let (cov, by_ppo, m) = (&host[..b * t], &host[b * t..2 * b * t], &host[2 * b * t..]);
        let counted = m.iter().filter(|&&x| x != 0.0).count();
        let mut candidates: Vec<usize> = (0..b * t)
            .filter(|&i| m[i] != 0.0 && by_ppo[i] == 0.0 && cov[i] > self.lb && cov[i] < self.ub)
            .collect();
        let take = ((self.ratio * counted as f32) as usize).max(1);
        seed::shuffle(&mut candidates, &mut seed::rng(inputs.seed, "clip_cov"));
        let mut keep = vec![1f32; b * t];
        for &i in candidates.iter().take(take) {
            keep[i] = 0.0;
        }
        let keep = Tensor::<B, 2>::from_data(TensorData::new(keep, [b, t]), &mask.device());
        let per_token = unclipped.max_pair(clipped) * keep.clone();
        let (neg, pos) = inputs.advantage_signs();
        let ratio = ratio.detach();
        let low = ratio.clone().lower_elem(1.0 - self.eps_low).bool_and(neg);
        let high = ratio.greater_elem(1.0 + self.eps_high).bool_and(pos);
        let mut metrics = PolicyMetrics::new(inputs, low, high, None);
        metrics.cov_frac = Some(masked_mean(keep.neg() + 1.0, mask));
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

    // lp_old = lp (ratio 1, nothing clipped by PPO). Counted tokens 0..4; token 5 padding.
    // mean A = 0.5, mean lp = -2.5; cov = (A - 0.5)(lp + 2.5):
    //   t0: ( 3.5)( 1.5) = 5.25  (above ub)     t1: ( 2.5)(0.5) = 1.25 (window)
    //   t2: (-2.5)(-0.5) = 1.25 (window)         t3: (-3.5)(-1.5) = 5.25 (above ub)
    //   t4: (0)(0) = 0 (below lb)
    const LP: [f32; 6] = [-1.0, -2.0, -3.0, -4.0, -2.5, f32::NAN];
    const ADV: [f32; 6] = [4.0, 3.0, -2.0, -3.0, 0.5, 1.0];
    const MASK: [f32; 6] = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];

    fn inputs<B: Backend>(lp: Tensor<B, 2>, device: &B::Device) -> PolicyInputs<B> {
        let old = LP
            .iter()
            .map(|x| if x.is_nan() { 0.0 } else { *x })
            .collect();
        PolicyInputs::new(
            lp,
            t2(old, 1, 6, device),
            t2(ADV.to_vec(), 1, 6, device),
            t2(MASK.to_vec(), 1, 6, device),
        )
        .unwrap()
    }

    goodhart_core::backend_test! {
        fn removes_the_gradient_of_window_tokens_only<B>(device) {
            let tol = tolerance(1e-5);
            // ratio 1: keep 1 token of 5 -> one of t1, t2 loses its gradient (-A / 5).
            let mut seen = [0; 2];
            for s in 0..16 {
                let lp = t2::<Autodiff<B>>(LP.to_vec(), 1, 6, device).require_grad();
                let x = inputs(lp.clone(), device).with_seed(s);
                let cfg = ClipCovConfig { ratio: 0.2, ..Default::default() };
                let out = cfg.loss(&x).unwrap();
                assert_close(&values(out.metrics.cov_frac.clone().unwrap()), &[0.2], tol);
                let g = values(lp.grad(&out.loss.backward()).unwrap());
                let full = [-4.0 / 5.0, -3.0 / 5.0, 2.0 / 5.0, 3.0 / 5.0, -0.5 / 5.0, 0.0];
                let dropped: Vec<usize> = (0..6).filter(|&i| (g[i] - full[i]).abs() > 1e-6).collect();
                assert_eq!(dropped.len(), 1, "{g:?}");
                assert!(dropped[0] == 1 || dropped[0] == 2, "{dropped:?}");
                assert_eq!(g[dropped[0]], 0.0);
                seen[dropped[0] - 1] += 1;
                // Same seed, same token.
                let again = cfg.loss(&inputs(t2::<B>(LP.to_vec(), 1, 6, device), device).with_seed(s)).unwrap();
                assert_eq!(values(again.loss), values(out.loss));
            }
            // Both window tokens get drawn over 16 seeds.
            assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
            // ratio 1: every window token (2 of 5) is removed; a wider window takes all 5.
            let x = inputs(t2::<B>(LP.to_vec(), 1, 6, device), device);
            let all = ClipCovConfig { ratio: 1.0, ..Default::default() }.loss(&x).unwrap();
            assert_close(&values(all.metrics.cov_frac.unwrap()), &[0.4], tol);
            // loss = token mean of -A over the kept tokens t0, t3, t4: (-4 + 3 - 0.5) / 5
            assert_close(&values(all.loss), &[-0.3], tol);
            let wide = ClipCovConfig { ratio: 1.0, lb: -1.0, ub: 10.0, ..Default::default() }.loss(&x).unwrap();
            assert_close(&values(wide.metrics.cov_frac.unwrap()), &[1.0], tol);
            assert!(ClipCovConfig { lb: 5.0, ub: 1.0, ..Default::default() }.loss(&x).is_err());
            assert!(ClipCovConfig { ratio: 0.0, ..Default::default() }.loss(&x).is_err());
        }
    }
}
