//! REINFORCE++ (Hu et al. 2025, "REINFORCE++: A Simple and Efficient Approach for
//! Aligning Large Language Models", arXiv:2501.03262), as verl's `reinforce_plus_plus`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    ops::{masked_whiten, Whitening},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{reinforce::discounted_returns, AdvantageOutput};

/// Configuration of [`reinforce_plus_plus`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReinforcePlusPlusConfig {
    /// Discount `gamma` in `[0, 1]`. Default 1.0 (verl's `algorithm.gamma`).
    pub gamma: f32,
    /// Whitening formula. Default unbiased variance, `+ 1e-8` inside the rsqrt (verl).
    pub whitening: Whitening,
}

impl Default for ReinforcePlusPlusConfig {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            whitening: Whitening::Unbiased,
        }
    }
}

/// REINFORCE++: discounted returns `G_t` whitened over all valid tokens of the batch,
/// `A = (G - mean) * rsqrt(var + 1e-8)` (global batch normalisation instead of a critic
/// or a group baseline). Returns are the unwhitened `G_t`.
pub fn reinforce_plus_plus<B: Backend>(
    token_rewards: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    config: &ReinforcePlusPlusConfig,
) -> Result<AdvantageOutput<B>> {
    let returns = discounted_returns(token_rewards, mask, config.gamma)?;
    let advantages = masked_whiten(returns.clone(), mask, true, config.whitening);
    Ok(AdvantageOutput::tokens(advantages, Some(returns)))
}
