//! GDPO: group reward-decoupled normalisation for multi-reward RL (NVIDIA 2026,
//! arXiv:2601.05242), TRL's `multi_objective_aggregation = "normalize_then_sum"`.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{groups::Groups, ops::check_finite, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{
        check_outcome, check_positive, check_rows, group_column_keys, keyed_zscore, SingletonGroups,
    },
    grpo::batch_std,
    AdvantageOutput,
};

/// Configuration of [`gdpo`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GdpoConfig {
    /// Weight of each reward component; empty means all 1. Default empty (TRL's
    /// `reward_weights = None`).
    pub weights: Vec<f32>,
    /// Added to every std. Default 1e-4 (TRL).
    pub eps: f32,
    /// Bessel-corrected stds. Default true (`torch.std`, TRL).
    pub unbiased_std: bool,
    /// Groups of one in the per-component step. Default [`SingletonGroups::Reward`]
    /// (mean 0, std 1 there; TRL gives NaN).
    pub singleton: SingletonGroups,
}

impl Default for GdpoConfig {
    fn default() -> Self {
        Self {
            weights: Vec::new(),
            eps: 1e-4,
            unbiased_std: true,
            singleton: SingletonGroups::Reward,
        }
    }
}

/// GDPO: z-score each reward component `c_k [N]` within its group,
/// `z_k = (c_k - mu_k) / (sigma_k + eps)`, take the weighted sum `s = sum_k w_k z_k`, then
/// z-score `s` over the batch, `A = (s - mean(s)) / (std(s) + eps)`; broadcast over
/// tokens. Summing normalised components keeps a rare component's signal from being
/// swamped by a dense one, which GRPO on the summed reward suffers ("reward collapse").
/// `components` is `[N, K]`, one column per reward.
pub fn gdpo<B: Backend>(
    components: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &GdpoConfig,
) -> Result<AdvantageOutput<B>> {
    let [n, k] = components.dims();
    check_positive("eps", config.eps)?;
    check_rows(&components, groups.len(), "reward_components")?;
    check_finite(&components, "reward_components")?;
    if k == 0 {
        return Err(GoodhartError::Empty {
            what: "reward_components".into(),
        });
    }
    let weights = if config.weights.is_empty() {
        vec![1.0; k]
    } else if config.weights.len() == k {
        config.weights.clone()
    } else {
        return Err(GoodhartError::shape(
            "weights",
            &[k],
            &[config.weights.len()],
        ));
    };
    let device = components.device();
    let z = keyed_zscore(
        components.clone(),
        &components.ones_like(),
        group_column_keys::<B>(groups, k, &device),
        groups.num_groups() * k,
        config.eps,
        config.unbiased_std,
        config.singleton,
        "gdpo",
        groups,
        k,
    )?;
    let w = Tensor::<B, 2>::from_data(TensorData::new(weights, [1, k]), &device);
    let s = (z * w).sum_dim(1).reshape([n]);
    check_outcome(&s, mask, groups)?;
    let adv = (s.clone() - s.clone().mean().unsqueeze())
        / (batch_std(s, config.unbiased_std) + config.eps).unsqueeze();
    Ok(AdvantageOutput::outcome(adv, mask))
}
