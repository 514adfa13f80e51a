//! A2TGPO: turn-group normalisation with variance-rescaled discounted accumulation plus
//! the group-normalised outcome, for multi-turn agents (METHODS-labs.md section 3; the
//! adaptive turn-level clipping belongs to the surrogate loss, not here).

use burn::tensor::{backend::Backend, Int, Tensor};
use goodhart_core::{groups::Groups, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{
        check_outcome, check_positive, check_rows, check_tokens, check_unit, group_column_keys,
        keyed_zscore, reverse_recursion, turns_to_tokens, SingletonGroups,
    },
    grpo::{group_normalise, GrpoConfig},
    AdvantageOutput,
};

/// Configuration of [`a2tgpo`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct A2tgpoConfig {
    /// Discount over turns, in `[0, 1]`. Default 1.0.
    pub gamma: f32,
    /// Added to each (prompt, turn) group's std. Default 1e-6 (verl's GRPO epsilon).
    pub eps: f32,
    /// Bessel-corrected std. Default true (`torch.std`).
    pub unbiased_std: bool,
    /// Divide the accumulated sum by `sqrt(number of terms)`. Default true (the method).
    pub rescale: bool,
    /// A (prompt, turn) group with one member (only one response reached that turn).
    /// Default [`SingletonGroups::Zero`]: nothing to compare with (goodhart's choice).
    pub singleton: SingletonGroups,
    /// Weight `alpha` of the turn-level part. Default 0.3 (the method's script).
    pub alpha: f32,
    /// Add the outcome, z-scored within each prompt group, to every turn's advantage
    /// (the method: `A_k = alpha S_k + A_out`). Default true; the estimator then needs the
    /// outcome reward.
    pub outcome: bool,
}

impl Default for A2tgpoConfig {
    fn default() -> Self {
        Self {
            gamma: 1.0,
            eps: 1e-6,
            unbiased_std: true,
            rescale: true,
            singleton: SingletonGroups::Zero,
            alpha: 0.3,
            outcome: true,
        }
    }
}

/// Checks `[N, K]` turn data against the batch.
pub(crate) fn check_turns<B: Backend>(
    turn_values: &Tensor<B, 2>,
    what: &str,
    turn_mask: &Tensor<B, 2>,
    groups: &Groups,
) -> Result<()> {
    check_rows(turn_mask, groups.len(), "turn_mask")?;
    check_tokens(turn_values, what, turn_mask)?;
    if turn_mask.dims()[1] == 0 {
        return Err(GoodhartError::Empty {
            what: "turn_mask".into(),
        });
    }
    Ok(())
}

/// Discounted accumulation over turns, `S_k = sum_{j >= k} gamma^{j - k} z_j` over valid
/// turns, divided by `sqrt(#terms)` when `rescale` (so the sum of unit-variance terms
/// keeps unit scale). Shared with IGPO (which does not rescale).
pub(crate) fn accumulate_turns<B: Backend>(
    z: Tensor<B, 2>,
    turn_mask: &Tensor<B, 2>,
    gamma: f32,
    rescale: bool,
) -> Tensor<B, 2> {
    let acc = reverse_recursion(&z, None, turn_mask, gamma, 1.0);
    if rescale {
        let valid = turn_mask.clone().not_equal_elem(0.0).float();
        let terms = reverse_recursion(&valid, None, turn_mask, 1.0, 1.0);
        acc / terms.clamp_min(1.0).sqrt()
    } else {
        acc
    }
}

/// A2TGPO's normalised turn signal `[N, K]`: `s` z-scored within each (prompt, turn
/// index) group, `(s - mu_{g,k}) / (sigma_{g,k} + eps)` (the std and lone groups as
/// `config` says); what the advantage accumulates and what scales the turn-level clip
/// range (`goodhart_objective::turn_clip`).
pub fn turn_zscores<B: Backend>(
    turn_signal: Tensor<B, 2>,
    turn_mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &A2tgpoConfig,
) -> Result<Tensor<B, 2>> {
    check_positive("eps", config.eps)?;
    check_turns(&turn_signal, "turn_rewards", turn_mask, groups)?;
    let k = turn_mask.dims()[1];
    let device = turn_signal.device();
    keyed_zscore(
        turn_signal,
        turn_mask,
        group_column_keys::<B>(groups, k, &device),
        groups.num_groups() * k,
        config.eps,
        config.unbiased_std,
        config.singleton,
        "a2tgpo",
        groups,
        k,
    )
}

/// A2TGPO: a per-turn signal `s [N, K]` is z-scored within each (prompt, turn index)
/// group, `z = (s - mu_{g,k}) / (sigma_{g,k} + eps)`; each turn accumulates the discounted
/// normalised values of it and the later turns, divided by the square root of the number
/// of terms, `S_k = sum_{j >= k} gamma^{j-k} z_j / sqrt(#{j >= k})`; its advantage is
/// `A_k = alpha S_k`, plus, given `outcome [N]`, the outcome z-scored within its prompt
/// group (GRPO's normalisation with this `eps` and std); every token of turn `k` gets
/// `A_k` (`token_turn [N, T]` names each token's turn). Comparing turn `k` only with turn
/// `k` of the other responses removes the drift of the signal along the dialogue.
#[allow(clippy::too_many_arguments)]
pub fn a2tgpo<B: Backend>(
    outcome: Option<Tensor<B, 1>>,
    turn_signal: Tensor<B, 2>,
    turn_mask: &Tensor<B, 2>,
    token_turn: &Tensor<B, 2, Int>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &A2tgpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_unit("gamma", config.gamma)?;
    check_rows(mask, groups.len(), "mask")?;
    let z = turn_zscores(turn_signal, turn_mask, groups, config)?;
    if !config.alpha.is_finite() {
        return Err(GoodhartError::invalid("alpha", "must be finite"));
    }
    let mut per_turn = accumulate_turns(z, turn_mask, config.gamma, config.rescale) * config.alpha;
    if let Some(outcome) = outcome {
        check_outcome(&outcome, mask, groups)?;
        let grpo = GrpoConfig {
            eps: config.eps,
            unbiased_std: config.unbiased_std,
            ..Default::default()
        };
        let out = group_normalise(outcome, groups, &grpo, "a2tgpo")?;
        let n = out.dims()[0];
        per_turn = per_turn + out.reshape([n, 1]);
    }
    Ok(AdvantageOutput::tokens(
        turns_to_tokens(per_turn, token_turn, mask)?,
        None,
    ))
}
