//! The optimal token baseline (OTB), verl's `optimal_token_baseline`: a baseline per
//! prompt group *and* token position that weights each response's return by how much
//! gradient variance its path has accumulated so far.
//!
//! ```text
//! G_t   = sum_{s >= t} m_s r_s                          (reward-to-go)
//! w_t   = 1 - 2 pi_t + sum_v pi(v)^2                    (|| d log pi_t ||^2 of the logits,
//!                                                        pi_t the sampled token's prob.)
//! w_t  *= rho_t^2                                       (with rollout IS weights rho)
//! W_t   = sum_{s <= t} m_s w_s                          (cumulative path variance)
//! B_t   = sum_i m G_t W_t / (sum_i m W_t + eps)         (over the group's responses)
//! A_t   = (G_t - B_t) m_t
//! ```
//!
//! A group of one gets no baseline (`A = G`). With `handle_zero_tail`, the group's single
//! longest response (when it is strictly longer than the second longest, of length `L2`)
//! gets no baseline after its `L2`-th valid token: past that only it has tokens, and its
//! own return would be its baseline. `pi_t` and `sum_v pi^2` come from the policy that
//! sampled (`logp_old`, and `goodhart_policy::score::sum_pi_squared` over the whole
//! vocabulary). Source: verl 0.9.1 `compute_optimal_token_baseline_advantage`; checked
//! against its outputs (`src/tests.rs`).

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{
    groups::Groups,
    ops::{to_host, zero_masked},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::{common::check_tokens, AdvantageOutput};

/// Configuration of [`optimal_token_baseline`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimalTokenBaselineConfig {
    /// Drop the baseline on the lone tail of a group's longest response (verl default
    /// true).
    pub handle_zero_tail: bool,
    /// Added to the baseline's denominator (verl 1e-8).
    pub eps: f32,
}

impl Default for OptimalTokenBaselineConfig {
    fn default() -> Self {
        Self {
            handle_zero_tail: true,
            eps: 1e-8,
        }
    }
}

/// The OTB advantages and the reward-to-go returns.
///
/// `token_rewards`, `logp_old`, `sum_pi_squared` and the optional `is_weights` are
/// `[N, T]` like `mask`; padding may hold anything. Errors on a shape mismatch, a
/// non-finite value at a counted token, a group table of another length, or `eps < 0`.
pub fn optimal_token_baseline<B: Backend>(
    token_rewards: Tensor<B, 2>,
    logp_old: Tensor<B, 2>,
    sum_pi_squared: Tensor<B, 2>,
    is_weights: Option<Tensor<B, 2>>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &OptimalTokenBaselineConfig,
) -> Result<AdvantageOutput<B>> {
    if !(config.eps.is_finite() && config.eps >= 0.0) {
        return Err(GoodhartError::invalid("eps", "must be finite and >= 0"));
    }
    check_tokens(&token_rewards, "token_rewards", mask)?;
    check_tokens(&logp_old, "logp_old", mask)?;
    check_tokens(&sum_pi_squared, "sum_pi_squared", mask)?;
    if let Some(w) = &is_weights {
        check_tokens(w, "rollout_is_weights", mask)?;
    }
    let [n, t] = mask.dims();
    if groups.len() != n {
        return Err(GoodhartError::shape("groups", &[n], &[groups.len()]));
    }
    let device = mask.device();
    let returns = zero_masked(token_rewards, mask)
        .flip([1])
        .cumsum(1)
        .flip([1]);
    let mut w = zero_masked(
        sum_pi_squared - zero_masked(logp_old, mask).exp() * 2.0 + 1.0,
        mask,
    );
    if let Some(rho) = is_weights {
        w = w * zero_masked(rho, mask).powi_scalar(2);
    }
    let path = w.cumsum(1) * mask.clone();
    // Group sums over responses as products with the [G, N] membership matrix.
    let k = groups.num_groups();
    let mut member = vec![0f32; k * n];
    for (i, &g) in groups.dense().iter().enumerate() {
        member[g * n + i] = 1.0;
    }
    let member = Tensor::<B, 2>::from_data(TensorData::new(member, [k, n]), &device);
    let num = member.clone().matmul(returns.clone() * path.clone());
    let den = member.matmul(path) + config.eps;
    let index = groups.index_tensor::<B>(&device);
    let mut baseline = (num / den).select(0, index);
    // No baseline for groups of one, nor on the lone tail of a longest response.
    let lengths = to_host(mask.clone().sum_dim(1))?;
    let mut keep = vec![1f32; n * t];
    let mut rows: Vec<Vec<usize>> = vec![Vec::new(); k];
    for (i, &g) in groups.dense().iter().enumerate() {
        rows[g].push(i);
    }
    let valid_before = to_host(mask.clone().cumsum(1))?;
    for members in rows {
        if members.len() == 1 {
            keep[members[0] * t..(members[0] + 1) * t].fill(0.0);
            continue;
        }
        if !config.handle_zero_tail {
            continue;
        }
        let mut sorted: Vec<f32> = members.iter().map(|&i| lengths[i]).collect();
        sorted.sort_by(f32::total_cmp);
        let (longest, second) = (sorted[sorted.len() - 1], sorted[sorted.len() - 2]);
        let at_max: Vec<usize> = members
            .iter()
            .copied()
            .filter(|&i| lengths[i] == longest)
            .collect();
        if at_max.len() == 1 && longest > second {
            let i = at_max[0];
            for j in 0..t {
                if valid_before[i * t + j] > second {
                    keep[i * t + j] = 0.0;
                }
            }
        }
    }
    baseline = baseline * Tensor::<B, 2>::from_data(TensorData::new(keep, [n, t]), &device);
    let advantages = zero_masked(returns.clone() - baseline, mask);
    Ok(AdvantageOutput {
        advantages,
        returns: Some(returns),
        per_response: None,
    })
}
