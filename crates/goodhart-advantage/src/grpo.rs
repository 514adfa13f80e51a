//! GRPO: group relative policy optimisation (Shao et al. 2024, "DeepSeekMath",
//! arXiv:2402.03300), with the scale options of TRL's `scale_rewards` and verl's `grpo`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{group_stats, per_response},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{check_outcome, check_positive, Lone, SingletonGroups},
    AdvantageOutput,
};

/// What GRPO divides the centred reward by (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrpoScale {
    /// The group's std (original GRPO; verl `norm_adv_by_std_in_grpo = true`, TRL `"group"`).
    #[default]
    Group,
    /// The std of all rewards of the batch (TRL `"batch"`, after "Tricks or Traps").
    Batch,
    /// No scaling: `r - mu` (TRL `"none"`, verl `norm_adv_by_std_in_grpo = false`; Dr.GRPO).
    None,
}

/// Configuration of [`grpo`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoConfig {
    /// Denominator. Default [`GrpoScale::Group`] (verl, TRL).
    pub scale: GrpoScale,
    /// Added to the std. Default 1e-6 (verl); TRL uses 1e-4, OpenRLHF 1e-9.
    pub eps: f32,
    /// Bessel-corrected std (`n - 1`). Default true (`torch.std`: verl, TRL).
    pub unbiased_std: bool,
    /// Groups of one. Default [`SingletonGroups::Reward`]: mean 0 and std 1, so the
    /// advantage is `r / (1 + eps)` (verl); TRL yields NaN there.
    pub singleton: SingletonGroups,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            scale: GrpoScale::Group,
            eps: 1e-6,
            unbiased_std: true,
            singleton: SingletonGroups::Reward,
        }
    }
}

/// Std of all values of `x` as a one-element tensor (`n - 1` when `unbiased` and `n > 1`).
pub(crate) fn batch_std<B: Backend>(x: Tensor<B, 1>, unbiased: bool) -> Tensor<B, 1> {
    let [n] = x.dims();
    let centred = x.clone() - x.mean().unsqueeze();
    let denom = if unbiased && n > 1 { n - 1 } else { n };
    (centred.powi_scalar(2).sum() / denom as f32).sqrt()
}

/// GRPO's per-response advantage `[N]`: `(r - mu_group) / (sigma + eps)` with `sigma` the
/// group's or the batch's std, or `r - mu_group` for [`GrpoScale::None`].
pub fn grpo_scores<B: Backend>(
    rewards: Tensor<B, 1>,
    groups: &Groups,
    config: &GrpoConfig,
) -> Result<Tensor<B, 1>> {
    group_normalise(rewards, groups, config, "grpo")
}

/// [`grpo_scores`] for the estimators built on it, with their name in errors.
pub(crate) fn group_normalise<B: Backend>(
    rewards: Tensor<B, 1>,
    groups: &Groups,
    config: &GrpoConfig,
    method: &str,
) -> Result<Tensor<B, 1>> {
    check_positive("eps", config.eps)?;
    groups.require_len(rewards.dims()[0], "rewards (one per group id)")?;
    let lone = Lone::new(groups, config.singleton, method, &rewards.device())?;
    let stats = group_stats(rewards.clone(), groups)?;
    let centred = rewards.clone() - per_response(lone.patch(stats.mean.clone(), 0.0), groups);
    let adv = match config.scale {
        GrpoScale::Group => {
            let std = lone.patch(stats.std(config.unbiased_std), 1.0);
            centred / (per_response(std, groups) + config.eps)
        }
        GrpoScale::Batch => {
            centred / (batch_std(rewards, config.unbiased_std) + config.eps).unsqueeze()
        }
        GrpoScale::None => centred,
    };
    Ok(lone.finish(adv, groups))
}

/// GRPO: the group-normalised outcome reward `(r - mu) / (sigma + eps)` broadcast over
/// the response's tokens. Groups are explicit ids (verl's `index`), not only contiguous
/// blocks. Reproduces TRL's values: `{1, 1, 2}` with eps 1e-4 gives
/// `(-0.5773, -0.5773, 1.1545)`.
pub fn grpo<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &GrpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    Ok(AdvantageOutput::outcome(
        grpo_scores(rewards, groups, config)?,
        mask,
    ))
}
