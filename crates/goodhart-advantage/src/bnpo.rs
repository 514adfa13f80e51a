//! BNPO: beta normalisation policy optimisation (Xiao et al. 2025, "BNPO: Beta
//! Normalization Policy Optimization", arXiv:2506.02864).

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{
    groups::Groups,
    ops::{group_stats, per_response, to_host},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, Lone, SingletonGroups},
    AdvantageOutput,
};

/// Configuration of [`bnpo`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BnpoConfig {
    /// The reward range `[lo, hi]` mapped linearly onto `[0, 1]`; rewards outside it are
    /// an error. Default `[0, 1]` (binary verifiable rewards, as in the paper).
    pub reward_range: [f32; 2],
    /// Upper clamp of `1 / BetaPDF(p)`. Default 1e6 (as in METHODS.md).
    pub max_inverse_pdf: f32,
    /// Groups of one. Default [`SingletonGroups::Zero`]: a lone response's `p` is its own
    /// reward, so `r - p = 0` anyway (goodhart's choice; verl has no BNPO).
    /// [`SingletonGroups::Reward`] takes baseline 0 there: `A = r' / pdf`.
    pub singleton: SingletonGroups,
}

impl Default for BnpoConfig {
    fn default() -> Self {
        Self {
            reward_range: [0.0, 1.0],
            max_inverse_pdf: 1e6,
            singleton: SingletonGroups::Zero,
        }
    }
}

/// The Beta parameters BNPO fits to the batch of group success rates `p_q` by the method
/// of moments: with mean `m` and population variance `v` over groups,
/// `c = m (1 - m) / v - 1`, `alpha = max(1, 1 + c m / 3)`, `beta = max(1, 1 + c (1 - m) / 3)`.
/// A degenerate batch (fewer than two groups, `v = 0`, or `m` in {0, 1}) gives Beta(1, 1).
pub fn bnpo_beta_params(success_rates: &[f32]) -> (f64, f64) {
    let g = success_rates.len() as f64;
    if success_rates.len() < 2 {
        return (1.0, 1.0);
    }
    let m = success_rates.iter().map(|&p| p as f64).sum::<f64>() / g;
    let v = success_rates
        .iter()
        .map(|&p| (p as f64 - m).powi(2))
        .sum::<f64>()
        / g;
    if v <= 1e-12 || m <= 0.0 || m >= 1.0 {
        return (1.0, 1.0);
    }
    let c = m * (1.0 - m) / v - 1.0;
    (
        (1.0 + c * m / 3.0).max(1.0),
        (1.0 + c * (1.0 - m) / 3.0).max(1.0),
    )
}

/// BNPO: `A = (r' - p_q) / BetaPDF(p_q; alpha, beta)` with `r'` the reward rescaled to
/// `[0, 1]`, `p_q` its group mean, and `(alpha, beta)` from [`bnpo_beta_params`] over the
/// batch of `p_q` (one per group); `1 / pdf` is clamped at `max_inverse_pdf`. With
/// Beta(1, 1) it reduces to `r' - p_q`. Normalises by how informative a prompt's success
/// rate is under the batch's Beta fit instead of by the group std.
///
/// The moments are taken over groups (one `p_q` per prompt), the population variance, as
/// METHODS.md reads the paper. Two scalars (alpha, beta) are fitted on the host from the
/// `[G]` success rates, and `1 / pdf` of each rate is computed there in f64.
pub fn bnpo<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &BnpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    let [lo, hi] = config.reward_range;
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Err(GoodhartError::invalid(
            "reward_range",
            format!("needs finite lo < hi, got [{lo}, {hi}]"),
        ));
    }
    if config.max_inverse_pdf.is_nan() || config.max_inverse_pdf <= 0.0 {
        return Err(GoodhartError::invalid("max_inverse_pdf", "must be > 0"));
    }
    let r = (rewards - lo) / (hi - lo);
    let outside = r
        .clone()
        .lower_elem(-1e-6)
        .bool_or(r.clone().greater_elem(1.0 + 1e-6));
    if to_host(outside.float().sum())?[0] > 0.0 {
        return Err(GoodhartError::invalid(
            "rewards",
            format!("BNPO needs rewards inside reward_range [{lo}, {hi}]"),
        ));
    }
    let r = r.clamp(0.0, 1.0);
    let lone = Lone::new(groups, config.singleton, "bnpo", &r.device())?;
    let p = group_stats(r.clone(), groups)?.mean;
    let rates = to_host(p.clone())?;
    let (alpha, beta) = bnpo_beta_params(&rates);
    let ln_b = statrs::function::beta::ln_beta(alpha, beta);
    let max_ln = (config.max_inverse_pdf as f64).ln();
    // ln(1 / pdf) = ln B(a, b) - (a - 1) ln p - (b - 1) ln(1 - p), on the host in f64: with
    // nearly equal group rates the fit's alpha and beta reach 1e7 and more, and the terms
    // cancel far below f32's precision. A term with exponent 0 is skipped so that 0 * ln 0
    // never makes a NaN.
    let inv_pdf: Vec<f32> = rates
        .iter()
        .map(|&q| {
            let q = q as f64;
            let mut neg_log_pdf = ln_b;
            if alpha > 1.0 {
                neg_log_pdf -= (alpha - 1.0) * q.ln();
            }
            if beta > 1.0 {
                neg_log_pdf -= (beta - 1.0) * (1.0 - q).ln();
            }
            neg_log_pdf.min(max_ln).exp() as f32
        })
        .collect();
    let inv_pdf = Tensor::<B, 1>::from_data(TensorData::new(inv_pdf, [rates.len()]), &p.device());
    let baseline = lone.patch(p, 0.0);
    let adv = (r - per_response(baseline, groups)) * per_response(inv_pdf, groups);
    Ok(AdvantageOutput::outcome(lone.finish(adv, groups), mask))
}
