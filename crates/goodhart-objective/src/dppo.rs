//! DPPO: divergence-constrained PPO (arXiv:2602.04879), verl's `dppo_tv` and `dppo_kl`.
//!
//! Instead of clipping the ratio, a token leaves the loss when its *probability* moved too
//! far from the rollout policy, in the direction its advantage pushes; the tokens that
//! stay get a REINFORCE gradient with a truncated, detached importance weight:
//!
//! ```text
//! r     = exp(clamp(lp - lp_old, -20, 20)),   w = sg(min(r, c))
//! p     = exp(lp), p_old = exp(lp_old)
//! TV:   valid = p - p_old <= eps_high            if A > 0
//!               p - p_old >= -eps_low            otherwise
//! KL:   D     = p_old (lp_old - lp) + (1 - p_old) ln((1 - p_old + 1e-8) / (1 - p + 1e-8))
//!       valid = D <= eps_high or p <= p_old      if A > 0
//!               D <= eps_low  or p >= p_old      otherwise
//! L     = -A w lp sg(valid)
//! loss  = aggregation(L, m)
//! ```
//!
//! `D` is the KL divergence between the Bernoulli distributions "this token or another"
//! under the old and the new policy. A token moving against its advantage (probability
//! falling under `A > 0`) is never masked by the KL rule. As in CISPO, the loss value is
//! `-A w lp`; only its gradient is meaningful. Source: verl 0.9.1
//! `compute_policy_loss_dppo_tv` / `compute_policy_loss_dppo_kl`.

use burn::tensor::backend::Backend;
use goodhart_core::{aggregate::LossAggregation, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{check_clip_range, PolicyInputs, PolicyLoss, PolicyMetrics};

/// Which divergence bounds the trust region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divergence {
    /// Total variation of the token's probability: `|p - p_old|` (`dppo_tv`).
    Tv,
    /// Binary KL divergence of the token's probability (`dppo_kl`).
    Kl,
}

/// DPPO settings (the same for both divergences).
///
/// Defaults: `eps_low = eps_high = 0.2` (verl passes its `clip_ratio`, default 0.2, as the
/// divergence threshold); `clip_ratio_c = 20`, the truncation verl's DPPO code falls back
/// to and its comment recommends ("a large threshold", paper section 5.4; verl's
/// `ActorConfig` carries `clip_ratio_c = 3` for dual-clip PPO, which then takes
/// precedence unless set); aggregation `token-mean` (verl).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DppoConfig {
    /// Divergence bound for tokens with `A <= 0`.
    pub eps_low: f32,
    /// Divergence bound for tokens with `A > 0`.
    pub eps_high: f32,
    /// Cap `c` on the detached importance weight.
    pub clip_ratio_c: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for DppoConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            clip_ratio_c: 20.0,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

impl DppoConfig {
    /// Errors unless `0 <= eps_low <= 1`, `eps_high >= 0` and `c > 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        check_clip_range(self.eps_low, self.eps_high)?;
        if !(self.clip_ratio_c.is_finite() && self.clip_ratio_c > 0.0) {
            return Err(GoodhartError::invalid(
                "clip_ratio_c",
                format!("must be finite and > 0, got {}", self.clip_ratio_c),
            ));
        }
        Ok(())
    }

    /// The DPPO loss under `divergence`. Metrics: `clip_frac_high` / `clip_frac_low` are
    /// the tokens masked out with `A > 0` / `A <= 0` (their sum is verl's `pg_clipfrac`),
    /// `dual_clip_frac` the kept tokens whose weight was truncated at `c` (verl's
    /// `pg_clipfrac_lower`).
    pub fn loss<B: Backend>(
        &self,
        inputs: &PolicyInputs<B>,
        divergence: Divergence,
    ) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let ratio = inputs.log_ratio().exp().detach();
        let weight = ratio.clone().clamp_max(self.clip_ratio_c);
        let lp = inputs.logp.clone().detach();
        let lp_old = inputs.logp_old.clone();
        let (p, p_old) = (lp.clone().exp(), lp_old.clone().exp());
        let (_, pos) = inputs.advantage_signs();
        let valid = match divergence {
            Divergence::Tv => {
                let moved = p - p_old;
                let ok_pos = moved.clone().lower_equal_elem(self.eps_high);
                let ok_neg = moved.greater_equal_elem(-self.eps_low);
                ok_neg.mask_where(pos.clone(), ok_pos)
            }
            Divergence::Kl => {
                let d = p_old.clone() * (lp_old - lp)
                    + (p_old.clone().neg() + 1.0)
                        * ((p_old.clone().neg() + 1.0 + 1e-8) / (p.clone().neg() + 1.0 + 1e-8))
                            .log();
                let ok_pos = d
                    .clone()
                    .lower_equal_elem(self.eps_high)
                    .bool_or(p.clone().lower_equal(p_old.clone()));
                let ok_neg = d
                    .lower_equal_elem(self.eps_low)
                    .bool_or(p.greater_equal(p_old));
                ok_neg.mask_where(pos.clone(), ok_pos)
            }
        };
        let keep = valid.clone().float();
        let per_token = -inputs.advantages.clone() * weight * keep * inputs.logp.clone();
        let dropped = valid.clone().bool_not();
        let high = dropped.clone().bool_and(pos.clone());
        let low = dropped.bool_and(pos.bool_not());
        let truncated = ratio.greater_elem(self.clip_ratio_c).bool_and(valid);
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics: PolicyMetrics::new(inputs, low, high, Some(truncated)),
        })
    }
}

#[cfg(test)]
mod tests {
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::t2;

    // Old and new token probabilities, advantages; the last token is padding.
    const P_OLD: [f64; 5] = [0.5, 0.5, 0.5, 0.5, 0.1];
    const P: [f64; 5] = [0.8, 0.6, 0.1, 0.45, 0.9];
    const ADV: [f32; 5] = [1.0, 1.0, -1.0, -1.0, 7.0];
    const MASK: [f32; 5] = [1.0, 1.0, 1.0, 1.0, 0.0];

    fn run<B: Backend>(
        cfg: DppoConfig,
        div: Divergence,
        device: &B::Device,
    ) -> (Vec<f32>, Vec<f32>, PolicyLoss<Autodiff<B>>) {
        let lp = t2::<Autodiff<B>>(P.iter().map(|p| p.ln() as f32).collect(), 1, 5, device)
            .require_grad();
        let inputs = PolicyInputs::new(
            lp.clone(),
            t2(P_OLD.iter().map(|p| p.ln() as f32).collect(), 1, 5, device),
            t2(ADV.to_vec(), 1, 5, device),
            t2(MASK.to_vec(), 1, 5, device),
        )
        .unwrap();
        let out = cfg.loss(&inputs, div).unwrap();
        let g = values(lp.grad(&out.loss.backward()).unwrap());
        (values(out.loss.clone()), g, out)
    }

    goodhart_core::backend_test! {
        fn tv_and_binary_kl_by_hand<B>(device) {
            let tol = tolerance(1e-5);
            // TV, eps 0.2: moves +0.3 (A > 0: dropped), +0.1 (kept), -0.4 (A < 0: dropped),
            // -0.05 (kept). Weights r = 1.2 and 0.9; L = -A w lp.
            let (loss, g, out) = run::<B>(DppoConfig::default(), Divergence::Tv, device);
            let l1 = -1.2 * 0.6f64.ln();
            let l3 = 1.0 * 0.9 * 0.45f64.ln();
            assert_close(&loss, &[((l1 + l3) / 4.0) as f32], tol);
            assert_close(&g, &[0.0, -1.2 / 4.0, 0.0, 0.9 / 4.0, 0.0], tol);
            assert_close(&values(out.metrics.clip_frac_high.clone()), &[0.25], tol);
            assert_close(&values(out.metrics.clip_frac_low.clone()), &[0.25], tol);
            assert_close(&values(out.metrics.dual_clip_frac.clone()), &[0.0], 0.0);

            // Binary KL, eps 0.2: D(0.5 -> 0.8) = 0.5 ln(0.5/0.8) + 0.5 ln(0.5/0.2) = 0.2231
            // (> 0.2, rising under A > 0: dropped); D(0.5 -> 0.6) = 0.0204 (kept);
            // D(0.5 -> 0.1) = 0.5108 (falling under A < 0: dropped); D(0.5 -> 0.45) = 0.005.
            let bkl = |q: f64, p: f64| q * (q / p).ln() + (1.0 - q) * ((1.0 - q) / (1.0 - p)).ln();
            assert!(bkl(0.5, 0.8) > 0.2 && bkl(0.5, 0.6) < 0.2 && bkl(0.5, 0.1) > 0.2);
            let (loss_kl, g_kl, _) = run::<B>(DppoConfig::default(), Divergence::Kl, device);
            assert_close(&loss_kl, &loss, tol);
            assert_close(&g_kl, &g, tol);
            // A looser KL bound (0.3) keeps token 0: its weight 1.6 joins the gradient.
            let (_, g, _) = run::<B>(DppoConfig { eps_high: 0.3, ..Default::default() }, Divergence::Kl, device);
            assert_close(&g, &[-1.6 / 4.0, -1.2 / 4.0, 0.0, 0.9 / 4.0, 0.0], tol);
            // Truncation at c = 1: weights 1.2 -> 1 on the kept A > 0 token.
            let (_, g, out) = run::<B>(DppoConfig { clip_ratio_c: 1.0, ..Default::default() }, Divergence::Tv, device);
            assert_close(&g, &[0.0, -1.0 / 4.0, 0.0, 0.9 / 4.0, 0.0], tol);
            assert_close(&values(out.metrics.dual_clip_frac), &[0.25], tol);
            assert!(DppoConfig { clip_ratio_c: 0.0, ..Default::default() }.validate().is_err());
        }
    }

    goodhart_core::backend_test! {
        fn against_the_advantage_is_never_masked_by_kl<B>(device) {
            // p falls from 0.5 to 0.8 -> 0.05 under A > 0: D is large, but the KL rule keeps
            // it (p <= p_old); TV keeps it too (p - p_old < eps_high).
            let lp = t2::<B>(vec![0.05f32.ln()], 1, 1, device);
            let inputs = PolicyInputs::new(lp, t2(vec![0.8f32.ln()], 1, 1, device), t2(vec![1.0], 1, 1, device), t2(vec![1.0], 1, 1, device)).unwrap();
            for div in [Divergence::Tv, Divergence::Kl] {
                let out = DppoConfig::default().loss(&inputs, div).unwrap();
                assert_close(&values(out.metrics.clip_frac_high), &[0.0], 0.0);
                // L = -1 * (0.05/0.8) * ln 0.05
                assert_close(&values(out.loss), &[-(0.0625 * 0.05f32.ln())], tolerance(1e-5));
            }
        }
    }
}
