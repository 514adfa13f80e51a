//! VeRPO: difficulty-weighted partial credit from unit tests, combined with the global
//! pass/fail outcome (METHODS.md; the exact combination is goodhart's reading and
//! *unverified* against the paper's code).

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{groups::Groups, ops::zero_masked, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    common::{
        check_nonneg, check_outcome, check_rows, check_tokens, group_column_keys, KeyedMoments,
    },
    grpo::{group_normalise, GrpoConfig},
    AdvantageOutput,
};

/// Configuration of [`verpo`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerpoConfig {
    /// Weight of the dense partial credit added to the outcome. Default 1.0.
    pub dense_weight: f32,
    /// Group normalisation of the combined reward (a nested `[grpo]` table). Default
    /// [`GrpoConfig::default`] (verl's GRPO).
    pub grpo: GrpoConfig,
}

impl Default for VerpoConfig {
    fn default() -> Self {
        Self {
            dense_weight: 1.0,
            grpo: GrpoConfig::default(),
        }
    }
}

/// VeRPO's dense reward `[N]`: each unit test `u` of a prompt weighs `w_u = 1 - p_u`, with
/// `p_u` the fraction of the prompt's responses that pass it (hard tests weigh more);
/// `d_i = sum_u w_u pass_{i,u} / sum_u w_u` over the prompt's tests (`test_mask`), 0 when
/// every test is passed by every response (all weights 0).
pub fn verpo_dense<B: Backend>(
    passed: Tensor<B, 2>,
    test_mask: &Tensor<B, 2>,
    groups: &Groups,
) -> Result<Tensor<B, 1>> {
    check_rows(test_mask, groups.len(), "unit_tests.mask")?;
    check_tokens(&passed, "unit_tests.passed", test_mask)?;
    let [n, u] = passed.dims();
    if u == 0 {
        return Err(GoodhartError::Empty {
            what: "unit_tests".into(),
        });
    }
    let passed = zero_masked(passed, test_mask);
    let key = group_column_keys::<B>(groups, u, &passed.device()).reshape([n * u]);
    let rate = KeyedMoments::new(
        passed.clone().reshape([n * u]),
        test_mask.clone().reshape([n * u]),
        &key,
        groups.num_groups() * u,
    )
    .mean;
    let weight = zero_masked((-rate.select(0, key) + 1.0).reshape([n, u]), test_mask);
    let earned = (weight.clone() * passed).sum_dim(1).reshape([n]);
    let total = weight.sum_dim(1).reshape([n]);
    Ok(earned / total.clamp_min(1e-8))
}

/// VeRPO: the reward `R = outcome + dense_weight * d` (with `d` from [`verpo_dense`]) is
/// group-normalised as GRPO does and broadcast over tokens. Partial credit keeps a
/// gradient on prompts where no response passes every test, and the difficulty weights
/// stop easy tests from dominating it (a cheap way to hack an unweighted pass fraction).
pub fn verpo<B: Backend>(
    outcome: Tensor<B, 1>,
    passed: Tensor<B, 2>,
    test_mask: &Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &VerpoConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&outcome, mask, groups)?;
    check_nonneg("dense_weight", config.dense_weight)?;
    let dense = verpo_dense(passed, test_mask, groups)?;
    let reward = outcome + dense * config.dense_weight;
    let adv = group_normalise(reward, groups, &config.grpo, "verpo")?;
    Ok(AdvantageOutput::outcome(adv, mask))
}
