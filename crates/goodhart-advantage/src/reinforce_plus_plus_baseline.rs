//! REINFORCE++-baseline (Hu et al. 2025, arXiv:2501.03262), as verl's
//! `reinforce_plus_plus_baseline`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{group_stats, masked_whiten, per_response, Whitening},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{broadcast, check_outcome, Lone, SingletonGroups},
    AdvantageOutput,
};

/// Configuration of [`reinforce_plus_plus_baseline`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReinforcePlusPlusBaselineConfig {
    /// Whitening formula for the batch normalisation. Default unbiased (verl).
    pub whitening: Whitening,
    /// Groups of one. Default [`SingletonGroups::Reward`]: baseline 0 (verl).
    pub singleton: SingletonGroups,
}

impl Default for ReinforcePlusPlusBaselineConfig {
    fn default() -> Self {
        Self {
            whitening: Whitening::Unbiased,
            singleton: SingletonGroups::Reward,
        }
    }
}

/// REINFORCE++-baseline: `r - mu_group` broadcast over the response's tokens, then
/// whitened over all valid tokens of the batch (so long responses weigh more in the
/// batch statistics, as in verl). Returns equal the advantages, as in verl.
pub fn reinforce_plus_plus_baseline<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &ReinforcePlusPlusBaselineConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    let lone = Lone::new(
        groups,
        config.singleton,
        "reinforce_plus_plus_baseline",
        &rewards.device(),
    )?;
    let stats = group_stats(rewards.clone(), groups)?;
    let centred = lone.finish(
        rewards - per_response(lone.patch(stats.mean, 0.0), groups),
        groups,
    );
    let advantages = masked_whiten(broadcast(centred, mask), mask, true, config.whitening);
    Ok(AdvantageOutput::tokens(advantages, None))
}
