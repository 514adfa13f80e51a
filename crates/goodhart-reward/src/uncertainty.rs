//! Uncertainty-aware reward weighting (Ctrl-U; Zhang et al. 2024, "Ctrl-U: Robust
//! Conditional Image Generation via Uncertainty-aware Reward Modeling").
//!
//! Ctrl-U estimates a reward's uncertainty `U` from the disagreement between rewards of
//! samples generated under the same condition, and lets uncertain rewards count less:
//! `r' = exp(-beta U) r`. Here `U` is any non-negative per-response signal; the usual
//! choice in this toolkit is the ensemble members' variance
//! ([`member_variance`](crate::ensemble::member_variance),
//! [`RewardOutput::uncertainty`](crate::source::RewardOutput::uncertainty)). Ctrl-U
//! applies the weight to its reward *loss*; using it on the RL reward, as here, follows
//! METHODS.md ("weight rewards by exp(-U)").

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    ops::{check_finite, check_same_shape},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// Settings of [`ctrl_u`] (TOML: `kind = "ctrl_u"`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtrlUConfig {
    /// Scale `beta` of the uncertainty in the exponent (1 = Ctrl-U's `exp(-U)`).
    #[serde(default = "one")]
    pub beta: f32,
}

fn one() -> f32 {
    1.0
}

impl Default for CtrlUConfig {
    fn default() -> Self {
        Self { beta: 1.0 }
    }
}

/// `r * exp(-beta U)` elementwise over `rewards [N]` and `uncertainty [N]`.
///
/// A response with `U = 0` keeps its reward; larger `U` shrinks it toward 0. Errors on
/// mismatched shapes, non-finite inputs, a negative `U` or a negative / non-finite `beta`.
pub fn ctrl_u<B: Backend>(
    rewards: Tensor<B, 1>,
    uncertainty: Tensor<B, 1>,
    config: &CtrlUConfig,
) -> Result<Tensor<B, 1>> {
    check_same_shape(&rewards, "rewards", &uncertainty, "uncertainty")?;
    check_finite(&rewards, "rewards")?;
    check_finite(&uncertainty, "uncertainty")?;
    if !(config.beta.is_finite() && config.beta >= 0.0) {
        return Err(GoodhartError::invalid(
            "ctrl_u.beta",
            format!("must be finite and non-negative, got {}", config.beta),
        ));
    }
    if uncertainty.dims()[0] > 0
        && burn::tensor::cast::ToElement::to_f32(&uncertainty.clone().min().into_scalar()) < 0.0
    {
        return Err(GoodhartError::invalid(
            "uncertainty",
            "must be non-negative",
        ));
    }
    Ok(rewards * (uncertainty * (-config.beta)).exp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn ctrl_u_scales_by_exp_minus_u<B>(device) {
            let r = Tensor::<B, 1>::from_floats([2.0, 2.0, -1.0], device);
            let u = Tensor::<B, 1>::from_floats([0.0, 1.0, 2.0], device);
            // 2 * e^0 = 2 ; 2 * e^-1 = 0.7358 ; -1 * e^-2 = -0.1353
            let out = ctrl_u(r.clone(), u.clone(), &CtrlUConfig::default()).unwrap();
            assert_close(&values(out), &[2.0, 2.0 * (-1f32).exp(), -(-2f32).exp()], tolerance(1e-6));
            // beta 0.5: 2 e^-0.5
            let half = ctrl_u(r.clone(), u, &CtrlUConfig { beta: 0.5 }).unwrap();
            assert_close(&values(half)[1..2], &[2.0 * (-0.5f32).exp()], tolerance(1e-6));
            let neg = Tensor::<B, 1>::from_floats([0.0, -0.1, 0.0], device);
            assert!(matches!(ctrl_u(r.clone(), neg, &CtrlUConfig::default()), Err(GoodhartError::InvalidArgument { .. })));
            let short = Tensor::<B, 1>::from_floats([0.0], device);
            assert!(matches!(ctrl_u(r, short, &CtrlUConfig::default()), Err(GoodhartError::ShapeMismatch { .. })));
        }
    }
}
