//! G-RA: gated reward accumulation ("Stabilizing Long-term Multi-turn Reinforcement
//! Learning with Gated Rewards", Sun et al. 2025, arXiv:2508.10548).

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{groups::Groups, ops::zero_masked, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, check_tokens},
    grpo::{group_normalise, GrpoConfig},
    AdvantageOutput,
};

/// Configuration of [`gra`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GraConfig {
    /// Gate `delta` on the outcome (high-level) reward: step rewards count only when
    /// `r_high >= delta`. Default 1.0 (a binary outcome must succeed; goodhart's choice).
    pub delta: f32,
    /// How the gated return becomes an advantage: GRPO group normalisation (a nested
    /// `[grpo]` table). Default [`GrpoConfig::default`] (verl's GRPO).
    pub grpo: GrpoConfig,
}

impl Default for GraConfig {
    fn default() -> Self {
        Self {
            delta: 1.0,
            grpo: GrpoConfig::default(),
        }
    }
}

/// G-RA: the gated return `R = r_high + 1[r_high >= delta] sum_k r_low,k` (step rewards
/// `[N, K]` under `step_mask`), then GRPO's group normalisation of `R`, broadcast over
/// tokens. Step (process) rewards are easy to hack when they are always paid; the gate
/// pays them only on trajectories whose outcome is good. The normalisation step is
/// goodhart's choice (the gate is the method).
pub fn gra<B: Backend>(
    outcome: Tensor<B, 1>,
    step_rewards: Tensor<B, 2>,
    step_mask: &Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &GraConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&outcome, mask, groups)?;
    if !config.delta.is_finite() {
        return Err(GoodhartError::invalid("delta", "must be finite"));
    }
    let [n] = outcome.dims();
    if step_mask.dims()[0] != n {
        return Err(GoodhartError::shape(
            "turn_mask",
            &[n, step_mask.dims()[1]],
            &step_mask.dims(),
        ));
    }
    check_tokens(&step_rewards, "turn_rewards", step_mask)?;
    let steps = zero_masked(step_rewards, step_mask).sum_dim(1).reshape([n]);
    let gate = outcome.clone().greater_equal_elem(config.delta).float();
    let gated = outcome + gate * steps;
    let adv = group_normalise(gated, groups, &config.grpo, "gra")?;
    Ok(AdvantageOutput::outcome(adv, mask))
}
