//! GPG: group policy gradient (Chu et al. 2025, "GPG: A Simple and Strong Reinforcement
//! Learning Baseline for Model Reasoning", arXiv:2504.02546), as verl's `gpg`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{group_stats, per_response},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, Lone, SingletonGroups},
    AdvantageOutput,
};

/// Configuration of [`gpg`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GpgConfig {
    /// Divisor `f_norm` (> 0). Default 1.0 (verl).
    pub f_norm: f32,
    /// Groups of one. Default [`SingletonGroups::Reward`]: mean 0 (verl).
    pub singleton: SingletonGroups,
}

impl Default for GpgConfig {
    fn default() -> Self {
        Self {
            f_norm: 1.0,
            singleton: SingletonGroups::Reward,
        }
    }
}

/// GPG: `A = alpha (r - mu_group) / f_norm` with `alpha = N / max(1, #{i: r_i != 0})`,
/// which rescales the gradient up when few responses of the batch are rewarded (the
/// paper's correction for groups with zero advantage); broadcast over tokens.
pub fn gpg<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &GpgConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    if !(config.f_norm > 0.0 && config.f_norm.is_finite()) {
        return Err(GoodhartError::invalid("f_norm", "must be finite and > 0"));
    }
    let [n] = rewards.dims();
    let lone = Lone::new(groups, config.singleton, "gpg", &rewards.device())?;
    let stats = group_stats(rewards.clone(), groups)?;
    let nonzero = rewards
        .clone()
        .not_equal_elem(0.0)
        .float()
        .sum()
        .clamp_min(1.0);
    let alpha = nonzero.recip() * (n as f32 / config.f_norm);
    let centred = rewards - per_response(lone.patch(stats.mean, 0.0), groups);
    let adv = lone.finish(centred * alpha.unsqueeze(), groups);
    Ok(AdvantageOutput::outcome(adv, mask))
}
