//! GAE: generalised advantage estimation (Schulman et al. 2016, "High-Dimensional
//! Continuous Control Using Generalized Advantage Estimation"), multi-turn aware as in
//! verl's `compute_gae_advantage_return`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    ops::{masked_whiten, zero_masked, Whitening},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_tokens, check_unit, reverse_recursion},
    AdvantageOutput,
};

/// Configuration of [`gae`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GaeConfig {
    /// Discount `gamma` in `[0, 1]`. Default 1.0 (verl's `algorithm.gamma`; TRL's PPO also
    /// uses 1.0).
    pub gamma: f32,
    /// GAE `lambda` in `[0, 1]`. Default 1.0 (verl's `algorithm.lam`); TRL's PPO uses 0.95.
    pub lambda: f32,
    /// Whiten the advantages over all valid tokens of the batch after the recursion.
    /// Default true (verl and TRL both whiten GAE advantages); returns are never whitened.
    pub whiten: bool,
    /// Whitening formula when `whiten` is set. Default unbiased variance (verl, TRL).
    pub whitening: Whitening,
}

impl Default for GaeConfig {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            lambda: 1.0,
            whiten: true,
            whitening: Whitening::Unbiased,
        }
    }
}

/// Generalised advantage estimation over per-token rewards and values `[N, T]`.
///
/// `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lambda A_{t+1}`,
/// returns `R_t = A_t + V_t` (before any whitening), then `A` is whitened over the valid
/// tokens if `config.whiten`. Positions with `m_t = 0` inside a response (tool output in
/// a multi-turn rollout) carry `A` and `V` through unchanged, as verl does, so the
/// recursion skips them; values and rewards there are never read (NaN is fine).
/// Advantages and returns are 0 at masked positions.
///
/// Use it for PPO with a critic. With `gamma = lambda = 1` and no whitening,
/// `A_t = sum_{s >= t} r_s - V_t`.
pub fn gae<B: Backend>(
    token_rewards: Tensor<B, 2>,
    values: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    config: &GaeConfig,
) -> Result<AdvantageOutput<B>> {
    check_unit("gamma", config.gamma)?;
    check_unit("lambda", config.lambda)?;
    check_tokens(&token_rewards, "token_rewards", mask)?;
    check_tokens(&values, "values", mask)?;
    let rewards = zero_masked(token_rewards, mask);
    let values = zero_masked(values, mask);
    let adv = reverse_recursion(&rewards, Some(&values), mask, config.gamma, config.lambda);
    let returns = zero_masked(adv.clone() + values, mask);
    let advantages = if config.whiten {
        masked_whiten(adv, mask, true, config.whitening)
    } else {
        zero_masked(adv, mask)
    };
    Ok(AdvantageOutput::tokens(advantages, Some(returns)))
}
