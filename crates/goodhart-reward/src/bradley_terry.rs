//! The Bradley-Terry pairwise loss for reward models, and the noisy-preference tools of
//! "Secrets of RLHF in Large Language Models Part II: Reward Modeling" (Wang et al. 2024).
//!
//! With `d = r_c - r_r` the reward gap of a (chosen, rejected) pair:
//!
//! | term | formula | peers |
//! |---|---|---|
//! | `bradley_terry` | `-log sigmoid(d - margin)` | TRL `RewardTrainer` (margin column), OpenRLHF `PairWiseLoss` |
//! | `log_exp` | `log(1 + exp(-d))`, margin ignored | OpenRLHF `LogExpLoss` |
//! | label smoothing `eps` | `-(1 - eps) log sigmoid(d - margin) - eps log sigmoid(-(d - margin))` | Secrets of RLHF II; cDPO |
//! | centring `c` | `+ c mean((r_c + r_r)^2)` | TRL `center_rewards_coefficient` (Eisenstein et al. use 0.01) |
//!
//! The loss is the mean over pairs. Noisy preferences: the *preference strength* of a pair
//! is the mean gap over an ensemble of reward models ([`preference_strength`]); pairs with
//! a strongly negative strength are probably mislabelled and are flipped
//! ([`flip_contradicted`]); an *adaptive margin* proportional to the strength
//! ([`adaptive_margin`]) asks for larger gaps on clear pairs. The paper's exact
//! thresholds and margin scale are *(unverified)*: they are parameters here.

use burn::tensor::{activation::log_sigmoid, backend::Backend, Tensor};
use goodhart_core::{
    ops::{check_finite, check_same_shape},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// Which pairwise form (TOML: `variant = "bradley_terry" | "log_exp"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BtVariant {
    /// `-log sigmoid(r_c - r_r - margin)` (TRL, OpenRLHF `PairWiseLoss`).
    #[default]
    BradleyTerry,
    /// `log(1 + exp(r_r - r_c))` (OpenRLHF `LogExpLoss`): the same function without a
    /// margin; any margin is ignored, as OpenRLHF does. Computed stably as
    /// `max(x, 0) + log1p(exp(-|x|))`.
    LogExp,
}

/// Settings of the pairwise loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BtLossConfig {
    /// The pairwise form.
    #[serde(default)]
    pub variant: BtVariant,
    /// A constant margin added to every pair's per-pair margin (default 0).
    #[serde(default)]
    pub margin: f32,
    /// Label smoothing `eps` in `[0, 0.5)` (default 0).
    #[serde(default)]
    pub label_smoothing: f32,
    /// Reward-centring coefficient `c` (default 0, off; TRL's default is off too).
    #[serde(default)]
    pub center_coef: f32,
}

impl Default for BtLossConfig {
    fn default() -> Self {
        Self {
            variant: BtVariant::BradleyTerry,
            margin: 0.0,
            label_smoothing: 0.0,
            center_coef: 0.0,
        }
    }
}

impl BtLossConfig {
    /// Errors on a parameter out of range.
    pub fn validate(&self) -> Result<()> {
        if !self.margin.is_finite() {
            return Err(GoodhartError::invalid("loss.margin", "must be finite"));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(GoodhartError::invalid(
                "loss.label_smoothing",
                format!("must lie in [0, 0.5), got {}", self.label_smoothing),
            ));
        }
        if !(self.center_coef.is_finite() && self.center_coef >= 0.0) {
            return Err(GoodhartError::invalid(
                "loss.center_coef",
                "must be finite and non-negative",
            ));
        }
        Ok(())
    }
}

/// The mean pairwise loss over `P` pairs: `chosen [P]`, `rejected [P]` rewards and an
/// optional per-pair `margin [P]` (added to the constant margin). Gradients flow through
/// the rewards. Errors on mismatched or empty inputs, non-finite values or a bad config.
pub fn bt_loss<B: Backend>(
    chosen: Tensor<B, 1>,
    rejected: Tensor<B, 1>,
    margin: Option<Tensor<B, 1>>,
    config: &BtLossConfig,
) -> Result<Tensor<B, 1>> {
    config.validate()?;
    check_same_shape(&chosen, "chosen rewards", &rejected, "rejected rewards")?;
    if chosen.dims()[0] == 0 {
        return Err(GoodhartError::Empty {
            what: "preference pairs".into(),
        });
    }
    check_finite(&chosen, "chosen rewards")?;
    check_finite(&rejected, "rejected rewards")?;
    let gap = chosen.clone() - rejected.clone();
    let per_pair = match config.variant {
        BtVariant::LogExp => {
            let x = -gap;
            x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p()
        }
        BtVariant::BradleyTerry => {
            let mut z = gap - config.margin;
            if let Some(m) = margin {
                check_same_shape(&chosen, "chosen rewards", &m, "margins")?;
                check_finite(&m, "margins")?;
                z = z - m;
            }
            let eps = config.label_smoothing;
            let nll = -log_sigmoid(z.clone());
            if eps > 0.0 {
                nll * (1.0 - eps) - log_sigmoid(-z) * eps
            } else {
                nll
            }
        }
    };
    let mut loss = per_pair.mean();
    if config.center_coef > 0.0 {
        loss = loss + (chosen + rejected).powi_scalar(2).mean() * config.center_coef;
    }
    Ok(loss)
}

/// Pairwise accuracy: the fraction of pairs with `r_c > r_r` (ties count as wrong, as
/// TRL's and OpenRLHF's `chosen > rejected`). Errors on mismatched or empty inputs or a
/// non-finite reward.
pub fn pairwise_accuracy<B: Backend>(chosen: Tensor<B, 1>, rejected: Tensor<B, 1>) -> Result<f32> {
    check_same_shape(&chosen, "chosen rewards", &rejected, "rejected rewards")?;
    let p = chosen.dims()[0];
    if p == 0 {
        return Err(GoodhartError::Empty {
            what: "preference pairs".into(),
        });
    }
    check_finite(&chosen, "chosen rewards")?;
    check_finite(&rejected, "rejected rewards")?;
    let right = chosen.greater(rejected).float().sum();
    Ok(burn::tensor::cast::ToElement::to_f32(&right.into_scalar()) / p as f32)
}

/// Preference strength of each pair (Secrets of RLHF II): the mean over `K` ensemble
/// members of `r_c,k - r_r,k`, from `chosen [K, P]` and `rejected [K, P]`. Returns
/// `(mean [P], std [P])`, the std (population) saying how much the members agree.
pub fn preference_strength<B: Backend>(
    chosen: Tensor<B, 2>,
    rejected: Tensor<B, 2>,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>)> {
    check_same_shape(
        &chosen,
        "chosen member scores",
        &rejected,
        "rejected member scores",
    )?;
    let [k, p] = chosen.dims();
    if k == 0 || p == 0 {
        return Err(GoodhartError::Empty {
            what: "preference strength inputs".into(),
        });
    }
    check_finite(&chosen, "chosen member scores")?;
    check_finite(&rejected, "rejected member scores")?;
    let gaps = chosen - rejected;
    let mean = gaps.clone().mean_dim(0);
    let std = (gaps - mean.clone()).powi_scalar(2).mean_dim(0).sqrt();
    Ok((mean.reshape([p]), std.reshape([p])))
}

/// Indices of the pairs whose strength is below `-threshold` (`threshold >= 0`): the
/// ensemble confidently prefers the "rejected" response, so the label is probably wrong
/// and the pair should be flipped (swap chosen and rejected). Read back to the host.
pub fn flip_contradicted<B: Backend>(strength: Tensor<B, 1>, threshold: f32) -> Result<Vec<usize>> {
    if !(threshold.is_finite() && threshold >= 0.0) {
        return Err(GoodhartError::invalid(
            "flip threshold",
            "must be finite and non-negative",
        ));
    }
    check_finite(&strength, "preference strength")?;
    let s = goodhart_core::ops::to_host(strength)?;
    Ok(s.iter()
        .enumerate()
        .filter(|(_, &v)| v < -threshold)
        .map(|(i, _)| i)
        .collect())
}

/// Adaptive margin `scale * max(strength, 0)` per pair: clear pairs (large positive
/// strength) must be separated by more, ambiguous or contradicted ones by nothing.
/// Secrets of RLHF II derives the margin from the strength; the clamp at 0 and the linear
/// scale are this toolkit's choice *(paper's exact form unverified)*.
pub fn adaptive_margin<B: Backend>(strength: Tensor<B, 1>, scale: f32) -> Result<Tensor<B, 1>> {
    if !(scale.is_finite() && scale >= 0.0) {
        return Err(GoodhartError::invalid(
            "margin scale",
            "must be finite and non-negative",
        ));
    }
    check_finite(&strength, "preference strength")?;
    Ok(strength.clamp_min(0.0) * scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};

    fn nls(x: f32) -> f32 {
        (1.0 + (-x).exp()).ln()
    }

    goodhart_core::backend_test! {
        fn bt_loss_hand_values<B>(device) {
            let tol = tolerance(1e-5);
            let c = Tensor::<B, 1>::from_floats([2.0, 0.0], device);
            let r = Tensor::<B, 1>::from_floats([1.0, 1.0], device);
            // gaps (1, -1): mean(-log sig(1), -log sig(-1)) = (0.3133 + 1.3133)/2
            let plain = bt_loss(c.clone(), r.clone(), None, &BtLossConfig::default()).unwrap();
            assert_close(&values(plain), &[(nls(1.0) + nls(-1.0)) / 2.0], tol);
            // constant margin 0.5 plus per-pair (0, 1): z = (0.5, -2.5)
            let cfg = BtLossConfig { margin: 0.5, ..Default::default() };
            let m = Tensor::<B, 1>::from_floats([0.0, 1.0], device);
            let l = bt_loss(c.clone(), r.clone(), Some(m), &cfg).unwrap();
            assert_close(&values(l), &[(nls(0.5) + nls(-2.5)) / 2.0], tol);
            // log_exp: same as plain, margin ignored
            let le = BtLossConfig { variant: BtVariant::LogExp, margin: 3.0, ..Default::default() };
            let l = bt_loss(c.clone(), r.clone(), None, &le).unwrap();
            assert_close(&values(l), &[(nls(1.0) + nls(-1.0)) / 2.0], tol);
            // label smoothing 0.1: 0.9 nls(z) + 0.1 nls(-z)
            let ls = BtLossConfig { label_smoothing: 0.1, ..Default::default() };
            let l = bt_loss(c.clone(), r.clone(), None, &ls).unwrap();
            let e = (0.9 * nls(1.0) + 0.1 * nls(-1.0) + 0.9 * nls(-1.0) + 0.1 * nls(1.0)) / 2.0;
            assert_close(&values(l), &[e], tol);
            // centring 0.01: + 0.01 * mean((2+1)^2, (0+1)^2) = 0.01 * 5
            let cc = BtLossConfig { center_coef: 0.01, ..Default::default() };
            let l = bt_loss(c.clone(), r.clone(), None, &cc).unwrap();
            assert_close(&values(l), &[(nls(1.0) + nls(-1.0)) / 2.0 + 0.05], tol);
            // log_exp stays finite for huge gaps: x = -200 -> 0, x = 200 -> 200
            let big = bt_loss(Tensor::<B, 1>::from_floats([200.0, -200.0], device),
                Tensor::zeros([2], device), None, &le).unwrap();
            assert_close(&values(big), &[100.0], tolerance(1e-3));
            assert_close(&[pairwise_accuracy(c, r).unwrap()], &[0.5], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn bt_loss_gradient_pushes_the_gap<B>(device) {
            use goodhart_core::device::Autodiff;
            // d/dc of -log sig(c - r) = -(1 - sig(c - r)) = -sig(r - c); at c = r: -0.5
            let c = Tensor::<Autodiff<B>, 1>::from_floats([0.0], device).require_grad();
            let r = Tensor::<Autodiff<B>, 1>::from_floats([0.0], device).require_grad();
            let g = bt_loss(c.clone(), r.clone(), None, &BtLossConfig::default()).unwrap().backward();
            assert_close(&values(c.grad(&g).unwrap()), &[-0.5], tolerance(1e-6));
            assert_close(&values(r.grad(&g).unwrap()), &[0.5], tolerance(1e-6));
        }
    }

    goodhart_core::backend_test! {
        fn noisy_preference_tools<B>(device) {
            // 2 members, 3 pairs: gaps member 0 (1, -3, 0.2), member 1 (3, -1, -0.2)
            let c = Tensor::<B, 2>::from_floats([[1.0, 0.0, 0.2], [3.0, 0.0, 0.0]], device);
            let r = Tensor::<B, 2>::from_floats([[0.0, 3.0, 0.0], [0.0, 1.0, 0.2]], device);
            let (mean, std) = preference_strength(c, r).unwrap();
            // means (2, -2, 0), population std (1, 1, 0.2)
            assert_close(&values(mean.clone()), &[2.0, -2.0, 0.0], tolerance(1e-6));
            assert_close(&values(std), &[1.0, 1.0, 0.2], tolerance(1e-6));
            assert_eq!(flip_contradicted(mean.clone(), 1.0).unwrap(), vec![1]);
            assert_eq!(flip_contradicted(mean.clone(), 3.0).unwrap(), Vec::<usize>::new());
            assert_close(&values(adaptive_margin(mean, 0.5).unwrap()), &[1.0, 0.0, 0.0], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn bad_pairs_are_typed_errors<B>(device) {
            let two = Tensor::<B, 1>::from_floats([1.0, 2.0], device);
            let three = Tensor::<B, 1>::from_floats([1.0, 2.0, 3.0], device);
            let nan = Tensor::<B, 1>::from_floats([1.0, f32::NAN], device);
            let d = BtLossConfig::default();
            assert!(matches!(bt_loss(two.clone(), three, None, &d), Err(GoodhartError::ShapeMismatch { .. })));
            assert!(matches!(bt_loss(two.clone(), nan.clone(), None, &d), Err(GoodhartError::NonFinite { .. })));
            let e = Tensor::<B, 1>::zeros([0], device);
            assert!(matches!(bt_loss(e.clone(), e.clone(), None, &d), Err(GoodhartError::Empty { .. })));
            assert!(matches!(pairwise_accuracy(e.clone(), e), Err(GoodhartError::Empty { .. })));
            let bad = BtLossConfig { label_smoothing: 0.7, ..Default::default() };
            assert!(matches!(bt_loss(two.clone(), two, None, &bad), Err(GoodhartError::InvalidArgument { .. })));
            assert!(flip_contradicted(nan, 0.0).is_err());
        }
    }
}
