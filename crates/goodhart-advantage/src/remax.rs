//! ReMax (Li et al. 2024, "ReMax: A Simple, Effective, and Efficient Reinforcement
//! Learning Method for Aligning Large Language Models", arXiv:2310.10505), as verl's
//! `remax`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{ops::check_finite, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{broadcast, check_rows},
    reinforce::discounted_returns,
    AdvantageOutput,
};

/// Configuration of [`remax`]: none; the baseline comes with the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemaxConfig {}

/// ReMax: `A_t = G_t - b` with `G_t = sum_{s >= t} r_s` (undiscounted reward-to-go, as
/// verl) and `b` the reward of the greedy response to the same prompt, one per response
/// `[N]` (`reward_baselines` in verl). Returns are `G_t`. A critic-free baseline that
/// costs one extra greedy generation per prompt.
pub fn remax<B: Backend>(
    token_rewards: Tensor<B, 2>,
    baselines: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    _config: &RemaxConfig,
) -> Result<AdvantageOutput<B>> {
    check_rows(&baselines, mask.dims()[0], "baseline_rewards")?;
    check_finite(&baselines, "baseline_rewards")?;
    let returns = discounted_returns(token_rewards, mask, 1.0)?;
    let advantages = returns.clone() - broadcast(baselines, mask);
    Ok(AdvantageOutput::tokens(advantages, Some(returns)))
}
