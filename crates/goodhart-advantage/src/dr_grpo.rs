//! Dr.GRPO: "Understanding R1-Zero-Like Training: A Critical Perspective" (Liu et al.
//! 2025, arXiv:2503.20783): GRPO without the std division.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{groups::Groups, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, SingletonGroups},
    grpo::{group_normalise, GrpoConfig, GrpoScale},
    AdvantageOutput,
};

/// Configuration of [`dr_grpo`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrGrpoConfig {
    /// Groups of one. Default [`SingletonGroups::Reward`]: mean 0, so `A = r` (verl's
    /// `grpo` with `norm_adv_by_std_in_grpo = false`).
    pub singleton: SingletonGroups,
}

/// Dr.GRPO: `A = r - mu_group`, broadcast over tokens. The std division of GRPO biases
/// towards questions that are too easy or too hard; Dr.GRPO drops it and pairs the
/// advantage with the constant-normaliser loss aggregation
/// ([`LossAggregation::SeqMeanTokenSumNorm`](crate::LossAggregation::SeqMeanTokenSumNorm)).
pub fn dr_grpo<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &DrGrpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    let grpo = GrpoConfig {
        scale: GrpoScale::None,
        singleton: config.singleton,
        ..GrpoConfig::default()
    };
    Ok(AdvantageOutput::outcome(
        group_normalise(rewards, groups, &grpo, "dr_grpo")?,
        mask,
    ))
}
