//! Per-token KL estimators between the policy and a reference, and their two placements.
//!
//! With `d = lp - lr` (`lp = log pi(token)`, `lr = log pi_ref(token)`, the token sampled
//! from `pi`), Schulman's estimators of `KL(pi || pi_ref)` are
//!
//! | name | value | notes |
//! |---|---|---|
//! | `k1` | `d` | unbiased, high variance, can be negative (verl `kl`/`k1`) |
//! | `abs` | `abs(d)` | verl `abs` |
//! | `k2` | `d^2 / 2` | biased, low variance (verl `mse`/`k2`) |
//! | `k3` | `exp(-d) + d - 1` | unbiased, low variance, `>= 0` (verl `low_var_kl`/`k3`) |
//! | `k1+`, `k3+` | value of k1 / k3, gradient of k2 | straight-through: `k2 + (k - k2).detach()` (verl's `+` suffix) |
//!
//! verl clamps k3's input `-d` to `[-20, 20]` and its output to `[-10, 10]`
//! ([`KlEstimator::estimate`] with `clamp = true`, the default of [`KlConfig`]).
//!
//! Placement (verl `use_kl_in_reward` vs `use_kl_loss`): in the reward, `r_t - beta kl_t`
//! per token ([`kl_in_reward`], PPO-style RLHF, Ziegler et al. 2019); in the loss,
//! `beta * agg(kl)` with a [`LossAggregation`] ([`kl_in_loss`], GRPO-style).

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    aggregate::LossAggregation,
    ops::{check_finite_masked, check_same_shape, zero_masked},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// verl's clamp on k3's exponent `lr - lp`.
pub const K3_INPUT_CLAMP: f32 = 20.0;
/// verl's clamp on k3's value.
pub const K3_OUTPUT_CLAMP: f32 = 10.0;

/// A per-token KL estimator; serialised as the field names it (`"k3"`, `"k3+"`), with
/// verl's names (`"kl"`, `"mse"`, `"low_var_kl"`) accepted as aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum KlEstimator {
    /// `d` (verl `kl`).
    #[serde(rename = "k1", alias = "kl")]
    K1,
    /// `|d|`.
    #[serde(rename = "abs")]
    Abs,
    /// `d^2 / 2` (verl `mse`).
    #[serde(rename = "k2", alias = "mse")]
    K2,
    /// `exp(-d) + d - 1` (verl `low_var_kl`); the default, as verl's `kl_loss_type`.
    #[default]
    #[serde(rename = "k3", alias = "low_var_kl")]
    K3,
    /// Value of k1, gradient of k2.
    #[serde(rename = "k1+")]
    K1Plus,
    /// Value of k3, gradient of k2.
    #[serde(rename = "k3+")]
    K3Plus,
}

impl KlEstimator {
    /// Every estimator with its name, for listings and tests.
    pub const ALL: [(&'static str, KlEstimator); 6] = [
        ("k1", Self::K1),
        ("abs", Self::Abs),
        ("k2", Self::K2),
        ("k3", Self::K3),
        ("k1+", Self::K1Plus),
        ("k3+", Self::K3Plus),
    ];

    /// The per-element estimate from `lp` and `lr` (any shape, no checks; see
    /// [`kl_per_token`] for the checked, masked version). `clamp` applies verl's k3 clamps
    /// (to k3 and to the value of k3+); the other estimators are never clamped, as in verl.
    pub fn estimate<B: Backend, const D: usize>(
        &self,
        lp: Tensor<B, D>,
        lr: Tensor<B, D>,
        clamp: bool,
    ) -> Tensor<B, D> {
        let d = lp - lr;
        let k2 = |d: Tensor<B, D>| d.powi_scalar(2) * 0.5;
        let k3 = |d: Tensor<B, D>| {
            let neg = d.neg();
            let neg = if clamp {
                neg.clamp(-K3_INPUT_CLAMP, K3_INPUT_CLAMP)
            } else {
                neg
            };
            let v = neg.clone().exp() - neg - 1.0;
            if clamp {
                v.clamp(-K3_OUTPUT_CLAMP, K3_OUTPUT_CLAMP)
            } else {
                v
            }
        };
        // Straight-through: forward value `value`, backward through `k2`.
        let straight = |d: Tensor<B, D>, value: Tensor<B, D>| {
            let g = k2(d);
            g.clone() + (value - g).detach()
        };
        match self {
            Self::K1 => d,
            Self::Abs => d.abs(),
            Self::K2 => k2(d),
            Self::K3 => k3(d),
            Self::K1Plus => straight(d.clone(), d),
            Self::K3Plus => straight(d.clone(), k3(d)),
        }
    }
}

/// Checks `lp`, `lr` and `mask` agree in shape and the log-probs are finite where the
/// mask is set; shared by every log-prob based regulariser.
pub(crate) fn check_logprobs<B: Backend>(
    lp: &Tensor<B, 2>,
    lr: &Tensor<B, 2>,
    mask: &Tensor<B, 2>,
) -> Result<()> {
    check_same_shape(lp, "logp", lr, "logp_ref")?;
    check_same_shape(lp, "logp", mask, "mask")?;
    check_finite_masked(lp, mask, "logp")?;
    check_finite_masked(lr, mask, "logp_ref")
}

/// Per-token KL estimate `[B, T]`, zero where `mask` is zero (padding may hold anything).
/// Errors on mismatched shapes or non-finite log-probs at valid positions.
///
/// ```
/// use burn::tensor::{Tensor, TensorData};
/// use goodhart_core::device::{cpu, Dispatch};
/// use goodhart_regularize::kl::{kl_per_token, KlEstimator};
/// // k3 = exp(-d) + d - 1 with d = logp - logp_ref; the padded last token gives 0.
/// let device = cpu();
/// let t = |x: [f32; 3]| Tensor::<Dispatch, 2>::from_data(TensorData::new(x.to_vec(), [1, 3]), &device);
/// let kl = kl_per_token(t([-1.0, -0.5, 0.0]), t([-1.2, -0.5, -3.0]), &t([1.0, 1.0, 0.0]), KlEstimator::K3, true)?;
/// let v: Vec<f32> = kl.into_data().convert::<f32>().into_vec().unwrap();
/// assert!((v[0] - ((-0.2f32).exp() + 0.2 - 1.0)).abs() < 1e-6);
/// assert_eq!(&v[1..], &[0.0, 0.0]);
/// # Ok::<(), goodhart_core::GoodhartError>(())
/// ```
pub fn kl_per_token<B: Backend>(
    lp: Tensor<B, 2>,
    lr: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    estimator: KlEstimator,
    clamp: bool,
) -> Result<Tensor<B, 2>> {
    check_logprobs(&lp, &lr, mask)?;
    // Zero padding before the estimate so exp() never sees garbage.
    let (lp, lr) = (zero_masked(lp, mask), zero_masked(lr, mask));
    Ok(zero_masked(estimator.estimate(lp, lr, clamp), mask))
}

/// In-reward placement: per-token rewards `r_t - beta kl_t` (`[B, T]`; the KL is zero
/// off the mask, so padding keeps its reward). Use for PPO-style RLHF (verl
/// `use_kl_in_reward`, TRL PPO); the KL is treated as a reward, so callers usually pass
/// detached log-probs.
pub fn kl_in_reward<B: Backend>(
    rewards: Tensor<B, 2>,
    lp: Tensor<B, 2>,
    lr: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    beta: f64,
    estimator: KlEstimator,
    clamp: bool,
) -> Result<Tensor<B, 2>> {
    check_same_shape(mask, "mask", &rewards, "rewards")?;
    check_coef("beta", beta)?;
    Ok(rewards - kl_per_token(lp, lr, mask, estimator, clamp)? * beta)
}

/// In-loss placement: `beta * agg(kl_t)` with `aggregation` (verl `use_kl_loss`, GRPO).
pub fn kl_in_loss<B: Backend>(
    lp: Tensor<B, 2>,
    lr: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    beta: f64,
    estimator: KlEstimator,
    clamp: bool,
    aggregation: LossAggregation,
) -> Result<Tensor<B, 1>> {
    check_coef("beta", beta)?;
    let kl = kl_per_token(lp, lr, mask, estimator, clamp)?;
    Ok(aggregation.aggregate(kl, mask)? * beta)
}

/// Errors unless `value` is finite and `>= 0`.
pub(crate) fn check_coef(name: &str, value: f64) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be finite and >= 0, got {value}"),
        ))
    }
}

/// Where a KL penalty goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlPlacement {
    /// Subtracted from the per-token reward (verl `use_kl_in_reward`).
    Reward,
    /// Added to the loss (verl `use_kl_loss`); the default, as GRPO.
    #[default]
    Loss,
}

/// Config of the `kl` regulariser. Defaults: k3 with verl's clamps, in the loss with
/// token-mean aggregation, fixed coefficient 0.001 (verl's `kl_loss_coef` and `kl_coef`
/// defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KlConfig {
    /// Which estimator.
    #[serde(default)]
    pub estimator: KlEstimator,
    /// Apply verl's k3 clamps.
    #[serde(default = "yes")]
    pub clamp: bool,
    /// Reward or loss.
    #[serde(default)]
    pub placement: KlPlacement,
    /// Aggregation for the in-loss placement.
    #[serde(default)]
    pub aggregation: LossAggregation,
    /// How the coefficient `beta` evolves.
    #[serde(default)]
    pub controller: crate::controller::ControllerConfig,
}

fn yes() -> bool {
    true
}

impl Default for KlConfig {
    fn default() -> Self {
        Self {
            estimator: KlEstimator::default(),
            clamp: true,
            placement: KlPlacement::default(),
            aggregation: LossAggregation::default(),
            controller: crate::controller::ControllerConfig::default(),
        }
    }
}

impl KlConfig {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<KlRegularizer> {
        Ok(KlRegularizer {
            controller: self.controller.init()?,
            config: self.clone(),
            last_kl: None,
        })
    }
}

/// The `kl` regulariser: a [`KlConfig`] with its coefficient controller.
#[derive(Debug, Clone)]
pub struct KlRegularizer {
    config: KlConfig,
    controller: crate::controller::Controller,
    last_kl: Option<f64>,
}

impl KlRegularizer {
    /// The current coefficient `beta`.
    pub fn coef(&self) -> f64 {
        self.controller.value()
    }

    fn inputs<B: Backend>(
        &self,
        x: &crate::RegInputs<B>,
    ) -> Result<(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 2>)> {
        Ok((
            crate::need(&x.logp, "logp", "kl")?,
            crate::need(&x.logp_ref, "logp_ref", "kl")?,
            crate::need(&x.mask, "mask", "kl")?,
        ))
    }

    fn record<B: Backend>(&mut self, kl: &Tensor<B, 2>, mask: &Tensor<B, 2>) {
        use burn::tensor::cast::ToElement;
        let mean = goodhart_core::ops::masked_mean(kl.clone().detach(), mask);
        self.last_kl = Some(mean.into_scalar().to_f64());
    }
}

impl<B: Backend> crate::Regularizer<B> for KlRegularizer {
    fn name(&self) -> &'static str {
        "kl"
    }

    /// `r_t - beta kl_t` with detached log-probs, when placed in the reward.
    fn shape_rewards(
        &mut self,
        rewards: Tensor<B, 2>,
        x: &crate::RegInputs<B>,
    ) -> Result<Tensor<B, 2>> {
        if self.config.placement != KlPlacement::Reward {
            return Ok(rewards);
        }
        let (lp, lr, mask) = self.inputs(x)?;
        check_same_shape(&mask, "mask", &rewards, "rewards")?;
        let kl = kl_per_token(
            lp.detach(),
            lr.detach(),
            &mask,
            self.config.estimator,
            self.config.clamp,
        )?;
        self.record(&kl, &mask);
        Ok(rewards - kl * self.coef())
    }

    /// `beta * agg(kl)`, when placed in the loss.
    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        if self.config.placement != KlPlacement::Loss {
            return Ok(None);
        }
        let (lp, lr, mask) = self.inputs(x)?;
        let kl = kl_per_token(lp, lr, &mask, self.config.estimator, self.config.clamp)?;
        self.record(&kl, &mask);
        Ok(Some(
            self.config.aggregation.aggregate(kl, &mask)? * self.coef(),
        ))
    }

    fn observe(&mut self, stats: &crate::StepStats) -> Result<()> {
        self.controller
            .update(crate::controller::ControllerObservation {
                kl: stats.kl,
                reward: stats.reward,
                n_steps: stats.n_samples,
            })
            .map(|_| ())
    }

    /// `beta <- factor * beta` (an adaptive controller goes on from there).
    fn raise_coefficient(&mut self, factor: f64) {
        self.controller.scale(factor);
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let mut m = std::collections::BTreeMap::from([("kl/coef".to_string(), self.coef())]);
        if let Some(kl) = self.last_kl {
            m.insert("kl/mean".into(), kl);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    // d = lp - lr for the four columns: 0, 0.5, -1, 2.
    fn inputs<B: Backend>(device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
        (
            Tensor::from_floats([[-1.0, -0.5, -2.0, -0.1]], device),
            Tensor::from_floats([[-1.0, -1.0, -1.0, -2.1]], device),
        )
    }

    goodhart_core::backend_test! {
        fn estimators_by_hand<B>(device) {
            let (lp, lr) = inputs::<B>(device);
            let tol = tolerance(1e-6);
            let est = |e: KlEstimator, clamp| values(e.estimate(lp.clone(), lr.clone(), clamp));
            assert_close(&est(KlEstimator::K1, true), &[0.0, 0.5, -1.0, 2.0], tol);
            assert_close(&est(KlEstimator::Abs, true), &[0.0, 0.5, 1.0, 2.0], tol);
            // d^2/2: 0, 0.125, 0.5, 2
            assert_close(&est(KlEstimator::K2, true), &[0.0, 0.125, 0.5, 2.0], tol);
            // exp(-d)+d-1: 0; e^-0.5 - 0.5 = 0.1065307; e^1 - 2 = 0.7182818; e^-2 + 1 = 1.1353353
            let k3 = [0.0, 0.106_530_66, 0.718_281_8, 1.135_335_3];
            assert_close(&est(KlEstimator::K3, true), &k3, tol);
            assert_close(&est(KlEstimator::K3, false), &k3, tol);
            assert_close(&est(KlEstimator::K1Plus, true), &[0.0, 0.5, -1.0, 2.0], tol);
            assert_close(&est(KlEstimator::K3Plus, true), &k3, tol);
        }
    }

    goodhart_core::backend_test! {
        fn verl_clamps<B>(device) {
            // d = -30: exponent 30 clamped to 20, e^20 - 20 - 1 clamped to 10.
            // d = 30: exponent -30 clamped to -20: e^-20 + 20 - 1 = 19.000000002 -> 10.
            let lp = Tensor::<B, 2>::from_floats([[-30.0, 0.0]], device);
            let lr = Tensor::<B, 2>::from_floats([[0.0, -30.0]], device);
            let v = values(KlEstimator::K3.estimate(lp.clone(), lr.clone(), true));
            assert_close(&v, &[10.0, 10.0], 0.0);
            let v = values(KlEstimator::K3.estimate(lp, lr, false));
            assert!(v[0] > 1e12, "unclamped e^30 - 31, got {}", v[0]);
            assert_close(&v[1..], &[29.0], tolerance(1e-5));
        }
    }

    goodhart_core::backend_test! {
        fn straight_through_gradients_are_k2s<B>(device) {
            type A<B> = Autodiff<B>;
            let (lp, lr) = inputs::<A<B>>(device);
            let d = [0.0f32, 0.5, -1.0, 2.0];
            let tol = tolerance(1e-5);
            for (est, grad) in [
                // d k1/dlp = 1; d k3/dlp = 1 - exp(-d); d k2/dlp = d
                (KlEstimator::K1, vec![1.0; 4]),
                (KlEstimator::K3, d.iter().map(|d| 1.0 - (-d).exp()).collect()),
                (KlEstimator::K2, d.to_vec()),
                (KlEstimator::K1Plus, d.to_vec()),
                (KlEstimator::K3Plus, d.to_vec()),
            ] {
                let x = lp.clone().require_grad();
                let g = est.estimate(x.clone(), lr.clone(), true).sum().backward();
                assert_close(&values(x.grad(&g).unwrap()), &grad, tol);
            }
        }
    }

    goodhart_core::backend_test! {
        fn k3_is_nonnegative_and_second_order_close_to_k2<B>(device) {
            use proptest::test_runner::{Config, TestRunner};
            let mut runner = TestRunner::new(Config { cases: 64, ..Default::default() });
            runner
                .run(&(-15.0f32..15.0, -15.0f32..15.0), |(a, b)| {
                    let lp = Tensor::<B, 1>::from_floats([a], device);
                    let lr = Tensor::<B, 1>::from_floats([b], device);
                    let v = values(KlEstimator::K3.estimate(lp, lr, false))[0];
                    proptest::prop_assert!(v >= -1e-6 * (1.0 + v.abs()), "k3({a},{b}) = {v}");
                    Ok(())
                })
                .unwrap();
            // k3 - k2 = -d^3/6 + O(d^4): for d = 0.01 the gap is ~1.7e-7 against k2 = 5e-5.
            for d in [1e-2f32, -1e-2, 5e-2] {
                let lp = Tensor::<B, 1>::from_floats([d], device);
                let lr = Tensor::<B, 1>::zeros([1], device);
                let k2 = values(KlEstimator::K2.estimate(lp.clone(), lr.clone(), true))[0];
                let k3 = values(KlEstimator::K3.estimate(lp, lr, true))[0];
                assert!((k3 - k2).abs() <= 0.25 * d.abs().powi(3) + 2e-6, "d={d}: k2 {k2} k3 {k3}");
            }
        }
    }

    goodhart_core::backend_test! {
        fn placements_and_bad_input<B>(device) {
            let (lp, lr) = inputs::<B>(device);
            let mask = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0, 0.0]], device);
            let r = Tensor::<B, 2>::from_floats([[0.0, 0.0, 0.0, 1.0]], device);
            let tol = tolerance(1e-6);
            // k1 on valid tokens 0, 0.5, -1; beta 0.1 -> rewards 0, -0.05, 0.1; padding keeps 1.
            let shaped = kl_in_reward(r.clone(), lp.clone(), lr.clone(), &mask, 0.1, KlEstimator::K1, true).unwrap();
            assert_close(&values(shaped), &[0.0, -0.05, 0.1, 1.0], tol);
            // token-mean of k2 over 0, 0.125, 0.5 = 0.208333; times 2
            let loss = kl_in_loss(lp.clone(), lr.clone(), &mask, 2.0, KlEstimator::K2, true, LossAggregation::TokenMean).unwrap();
            assert_close(&values(loss), &[0.625 / 3.0 * 2.0], tol);
            // NaN under the mask is fine, at a valid position an error.
            let nan = Tensor::<B, 2>::from_floats([[-1.0, -0.5, -2.0, f32::NAN]], device);
            assert!(kl_per_token(nan.clone(), lr.clone(), &mask, KlEstimator::K3, true).is_ok());
            let full = Tensor::<B, 2>::ones([1, 4], device);
            assert!(matches!(kl_per_token(nan, lr.clone(), &full, KlEstimator::K3, true), Err(GoodhartError::NonFinite { .. })));
            let short = Tensor::<B, 2>::zeros([1, 3], device);
            assert!(matches!(kl_per_token(lp.clone(), short, &mask, KlEstimator::K3, true), Err(GoodhartError::ShapeMismatch { .. })));
            assert!(matches!(kl_in_loss(lp, lr, &mask, -1.0, KlEstimator::K3, true, LossAggregation::TokenMean), Err(GoodhartError::InvalidArgument { .. })));
        }
    }

    #[test]
    fn estimator_names_round_trip() {
        for (name, est) in KlEstimator::ALL {
            let v: KlEstimator = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(v, est);
        }
        let v: KlEstimator = serde_json::from_str("\"low_var_kl\"").unwrap();
        assert_eq!(v, KlEstimator::K3);
    }
}
