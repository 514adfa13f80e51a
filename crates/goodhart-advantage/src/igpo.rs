//! IGPO: information-gain-based policy optimisation (Wang et al. 2025, "Information
//! Gain-based Policy Optimization: A Simple and Effective Approach for Multi-Turn LLM
//! Agents", arXiv:2510.14967).

use burn::tensor::{backend::Backend, Int, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{check_finite_masked, zero_masked},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    a2tgpo::{accumulate_turns, check_turns},
    common::{
        check_outcome, check_positive, check_unit, group_row_keys, keyed_zscore, turns_to_tokens,
        SingletonGroups,
    },
    AdvantageOutput,
};

/// Configuration of [`igpo`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IgpoConfig {
    /// Discount over turns, in `[0, 1]`. Default 1.0.
    pub gamma: f32,
    /// Added to the group std. Default 1e-6 (verl's GRPO epsilon).
    pub eps: f32,
    /// Bessel-corrected std. Default true (`torch.std`).
    pub unbiased_std: bool,
    /// A prompt group with a single valid turn. Default [`SingletonGroups::Zero`].
    pub singleton: SingletonGroups,
}

impl Default for IgpoConfig {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            eps: 1e-6,
            unbiased_std: true,
            singleton: SingletonGroups::Zero,
        }
    }
}

/// The IGPO turn rewards `[N, K]`: `p_k - p_{k-1}` (the gain of the policy's probability
/// of the ground-truth answer over turn `k`; `answer_prob [N, K + 1]`, column 0 before the
/// first turn) on every valid turn but the last, and the outcome reward on the last
/// valid turn. Valid turns must form a prefix of each row. 0 where `turn_mask` is 0.
pub fn igpo_turn_rewards<B: Backend>(
    answer_prob: Tensor<B, 2>,
    outcome: Tensor<B, 1>,
    turn_mask: &Tensor<B, 2>,
) -> Result<Tensor<B, 2>> {
    let [n, k] = turn_mask.dims();
    let dims = answer_prob.dims();
    if dims != [n, k + 1] {
        return Err(GoodhartError::shape("answer_prob", &[n, k + 1], &dims));
    }
    let device = turn_mask.device();
    let seen = Tensor::cat(vec![Tensor::ones([n, 1], &device), turn_mask.clone()], 1);
    check_finite_masked(&answer_prob, &seen, "answer_prob")?;
    let p = zero_masked(answer_prob, &seen);
    let gain = p.clone().slice_dim(1, 1..k + 1) - p.slice_dim(1, 0..k);
    let valid = turn_mask.clone().not_equal_elem(0.0).float();
    let next = Tensor::cat(
        vec![
            valid.clone().slice_dim(1, 1..k),
            Tensor::zeros([n, 1], &device),
        ],
        1,
    );
    let last = valid.clone() * (-next + 1.0);
    let turn = gain * (-last.clone() + 1.0) + last * outcome.reshape([n, 1]);
    Ok(zero_masked(turn, &valid))
}

/// IGPO: turn rewards from [`igpo_turn_rewards`] are z-scored within each prompt group,
/// pooling every valid turn of every response to the prompt, then accumulated with
/// discount `gamma`, `A_k = sum_{j >= k} gamma^{j - k} z_j`, and each token of turn `k` gets
/// `A_k`. Dense, ground-truth-aware credit per turn without a critic or a process reward
/// model; it keeps a signal where all outcomes of a group tie (GRPO's advantage
/// collapse). The pooled normalisation follows the paper's description (*unverified*
/// against its code).
#[allow(clippy::too_many_arguments)]
pub fn igpo<B: Backend>(
    answer_prob: Tensor<B, 2>,
    outcome: Tensor<B, 1>,
    turn_mask: &Tensor<B, 2>,
    token_turn: &Tensor<B, 2, Int>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &IgpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_unit("gamma", config.gamma)?;
    check_positive("eps", config.eps)?;
    check_outcome(&outcome, mask, groups)?;
    let rewards = igpo_turn_rewards(answer_prob, outcome, turn_mask)?;
    check_turns(&rewards, "turn rewards", turn_mask, groups)?;
    let k = turn_mask.dims()[1];
    let z = keyed_zscore(
        rewards,
        turn_mask,
        group_row_keys::<B>(groups, k, &turn_mask.device()),
        groups.num_groups(),
        config.eps,
        config.unbiased_std,
        config.singleton,
        "igpo",
        groups,
        1,
    )?;
    let per_turn = accumulate_turns(z, turn_mask, config.gamma, false);
    Ok(AdvantageOutput::tokens(
        turns_to_tokens(per_turn, token_turn, mask)?,
        None,
    ))
}
