//! GRPO pass@k (Chen et al. 2025, "Pass@k Training for Adaptively Balancing Exploration
//! and Exploitation", arXiv:2503.19595 as cited by verl), as verl's `grpo_passk`.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{
    groups::Groups,
    ops::{group_stats, per_response, to_host},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, check_positive},
    AdvantageOutput,
};

/// Configuration of [`grpo_passk`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoPasskConfig {
    /// Divide by the group's unbiased std + eps. Default true (verl's
    /// `norm_adv_by_std_in_grpo`).
    pub normalize: bool,
    /// Added to the std. Default 1e-6 (verl).
    pub eps: f32,
}

impl Default for GrpoPasskConfig {
    fn default() -> Self {
        Self {
            normalize: true,
            eps: 1e-6,
        }
    }
}

/// GRPO pass@k: only the best response of each group gets a non-zero advantage,
/// `r_max - r_second` (divided by `sigma_group + eps` when `normalize`), so the policy is
/// pushed towards the one sample that would make pass@k succeed. Every group needs at
/// least two responses ([`GroupTooSmall`](goodhart_core::GoodhartError::GroupTooSmall)
/// otherwise, as verl raises). Among tied maxima the first response gets the (zero)
/// advantage.
///
/// The per-group top-2 is found on the host from one read-back of the `[N]` rewards
/// (burn has no scatter-max); the std and the broadcast stay on the device.
pub fn grpo_passk<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &GrpoPasskConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    check_positive("eps", config.eps)?;
    groups.require_min_size(2, "grpo_passk")?;
    let device = rewards.device();
    let host = to_host(rewards.clone())?;
    let g = groups.num_groups();
    // best[g] = (index, value) of the maximum; second[g] = the runner-up value.
    let mut best: Vec<Option<(usize, f32)>> = vec![None; g];
    let mut second = vec![f32::NEG_INFINITY; g];
    for (i, (&r, &k)) in host.iter().zip(groups.dense()).enumerate() {
        match best[k] {
            Some((_, b)) if r <= b => second[k] = second[k].max(r),
            Some((_, b)) => {
                second[k] = b;
                best[k] = Some((i, r));
            }
            None => best[k] = Some((i, r)),
        }
    }
    let mut winner = vec![0.0f32; host.len()];
    let mut gap = vec![0.0f32; g];
    for k in 0..g {
        if let Some((i, b)) = best[k] {
            winner[i] = 1.0;
            gap[k] = b - second[k];
        }
    }
    let mut gap = Tensor::<B, 1>::from_data(TensorData::new(gap, [g]), &device);
    if config.normalize {
        gap = gap / (group_stats(rewards, groups)?.std(true) + config.eps);
    }
    let winner = Tensor::<B, 1>::from_data(TensorData::new(winner, [host.len()]), &device);
    Ok(AdvantageOutput::outcome(
        per_response(gap, groups) * winner,
        mask,
    ))
}
