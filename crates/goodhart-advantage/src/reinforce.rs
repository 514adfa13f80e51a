//! REINFORCE (Williams 1992): the discounted return of each token as its advantage.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{ops::zero_masked, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_tokens, check_unit, reverse_recursion},
    AdvantageOutput,
};

/// Configuration of [`reinforce`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReinforceConfig {
    /// Discount `gamma` in `[0, 1]`. Default 1.0 (verl's `algorithm.gamma`).
    pub gamma: f32,
}

impl Default for ReinforceConfig {
    fn default() -> Self {
        Self { gamma: 1.0 }
    }
}

/// Discounted returns `G_t = r_t + gamma G_{t+1}` over per-token rewards `[N, T]`.
///
/// Masked positions inside a response carry `G` through unchanged and add no reward of
/// their own (verl 0.9.1's GAE and REINFORCE++ do the same), which matters only for masks
/// with holes, i.e. multi-turn rollouts. Returns are 0 at masked positions.
pub fn discounted_returns<B: Backend>(
    token_rewards: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    gamma: f32,
) -> Result<Tensor<B, 2>> {
    check_unit("gamma", gamma)?;
    check_tokens(&token_rewards, "token_rewards", mask)?;
    let rewards = zero_masked(token_rewards, mask);
    Ok(zero_masked(
        reverse_recursion(&rewards, None, mask, gamma, 1.0),
        mask,
    ))
}

/// REINFORCE without a baseline: `A_t = G_t`, the discounted return (returns equal the
/// advantages). Unbiased but high-variance; the baseline-free reference point for the
/// other estimators.
pub fn reinforce<B: Backend>(
    token_rewards: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    config: &ReinforceConfig,
) -> Result<AdvantageOutput<B>> {
    let returns = discounted_returns(token_rewards, mask, config.gamma)?;
    Ok(AdvantageOutput::tokens(returns.clone(), Some(returns)))
}
