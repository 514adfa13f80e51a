//! OPO: on-policy RL with the optimal reward baseline (Hao et al. 2025, "On-Policy RL
//! with Optimal Reward Baseline", arXiv:2505.23585), as verl's `opo`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{group_sum, per_response, zero_masked},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, Lone, SingletonGroups},
    AdvantageOutput,
};

/// Configuration of [`opo`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpoConfig {
    /// Groups of one. Default [`SingletonGroups::Reward`]: baseline 0, so `A = r` (verl).
    pub singleton: SingletonGroups,
}

/// OPO: `A_i = r_i - b`, with the length-weighted baseline
/// `b = sum_j |y_j| r_j / sum_j |y_j|` over the group (`|y_j|` = number of valid tokens of
/// response `j`), the variance-optimal baseline for sequence-level rewards; broadcast over
/// tokens. A group whose responses are all empty gets baseline 0.
pub fn opo<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &OpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    let device = rewards.device();
    let lone = Lone::new(groups, config.singleton, "opo", &device)?;
    let [n, _] = mask.dims();
    let len = zero_masked(mask.clone(), mask).sum_dim(1).reshape([n]);
    let index = groups.index_tensor::<B>(&device);
    let g = groups.num_groups();
    let weighted = group_sum(len.clone() * rewards.clone(), &index, g);
    let total = group_sum(len, &index, g);
    let baseline = lone.patch(weighted / total.clamp_min(1e-8), 0.0);
    let adv = lone.finish(rewards - per_response(baseline, groups), groups);
    Ok(AdvantageOutput::outcome(adv, mask))
}
