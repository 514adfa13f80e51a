//! RLOO: REINFORCE leave-one-out (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
//! Baseline for Free!"; Ahmadian et al. 2024, arXiv:2402.14740), as verl's `rloo`.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{group_stats, per_response},
    Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    common::{broadcast, check_outcome, Lone, SingletonGroups},
    AdvantageOutput,
};

/// Configuration of [`rloo`].
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RlooConfig {
    /// Groups of one. Default [`SingletonGroups::Reward`]: the advantage is `r`, as verl's
    /// `compute_rloo_outcome_advantage` (its vectorised variant gives 0: pick
    /// [`SingletonGroups::Zero`] for that).
    pub singleton: SingletonGroups,
}

/// RLOO: each response is compared with the mean of the *other* responses to its prompt,
/// `A_i = r_i - (sum_j r_j - r_i) / (n - 1) = (r_i - mu) n / (n - 1)`, broadcast over the
/// response's tokens. An unbiased baseline (it does not depend on the response itself).
///
/// ```
/// use burn::tensor::{Tensor, TensorData};
/// use goodhart_advantage::{rloo::{rloo, RlooConfig}, Groups};
/// use goodhart_core::device::{cpu, Dispatch};
/// // One prompt, four responses: each reward minus the mean of the other three.
/// let device = cpu();
/// let r = Tensor::<Dispatch, 1>::from_data(TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0], [4]), &device);
/// let mask = Tensor::<Dispatch, 2>::ones([4, 1], &device);
/// let out = rloo(r, &mask, &Groups::contiguous(1, 4)?, &RlooConfig::default())?;
/// let a: Vec<f32> = out.per_response.unwrap().into_data().convert::<f32>().into_vec().unwrap();
/// assert!((a[0] - (1.0 - 1.0 / 3.0)).abs() < 1e-6);
/// assert!((a[1] - (0.0 - 2.0 / 3.0)).abs() < 1e-6);
/// # Ok::<(), goodhart_core::GoodhartError>(())
/// ```
pub fn rloo<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
    config: &RlooConfig,
) -> Result<AdvantageOutput<B>> {
    check_outcome(&rewards, mask, groups)?;
    let lone = Lone::new(groups, config.singleton, "rloo", &rewards.device())?;
    let stats = group_stats(rewards.clone(), groups)?;
    // n / (n - 1), patched to 1 (and the mean to 0) for groups of one.
    let factor = lone.patch(
        stats.count.clone() / (stats.count.clone() - 1.0).clamp_min(1.0),
        1.0,
    );
    let mean = lone.patch(stats.mean, 0.0);
    let adv = (rewards - per_response(mean, groups)) * per_response(factor, groups);
    let adv = lone.finish(adv, groups);
    Ok(AdvantageOutput::outcome(adv, mask))
}

impl<B: Backend> AdvantageOutput<B> {
    /// Output of an outcome estimator: the per-response advantage and its broadcast.
    pub(crate) fn outcome(per_response: Tensor<B, 1>, mask: &Tensor<B, 2>) -> Self {
        Self {
            advantages: broadcast(per_response.clone(), mask),
            returns: None,
            per_response: Some(per_response),
        }
    }

    /// Output of a token-level estimator.
    pub(crate) fn tokens(advantages: Tensor<B, 2>, returns: Option<Tensor<B, 2>>) -> Self {
        Self {
            advantages,
            returns,
            per_response: None,
        }
    }
}
