//! Value (critic) loss with value clipping, as in PPO implementations since OpenAI
//! baselines.
//!
//! ```text
//! v_clip = clip(v, v_old - c, v_old + c)
//! L_t    = 0.5 * max((v - R)^2, (v_clip - R)^2)
//! loss   = aggregation(L, m)
//! ```
//!
//! `v` the critic's current predictions (carry the gradient), `v_old` the predictions made
//! at rollout time, `R` the returns (e.g. GAE's `A + V`). Taking the max makes the clipped
//! term a pessimistic bound: a prediction that moved more than `c` from `v_old` stops
//! receiving gradient when moving it back toward `R` would not help. Checked against verl's
//! `compute_value_loss` (which applies the `0.5` after aggregation: the same number).

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    aggregate::LossAggregation,
    ops::{check_finite, check_finite_masked, check_same_shape, masked_mean},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// Value-loss settings.
///
/// Defaults: clipping on with `cliprange_value = 0.5` (verl `critic.cliprange_value`; TRL's
/// PPO uses 0.2); aggregation `token-mean` (verl's critic default).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ValueLossConfig {
    /// Whether to clip the prediction around `v_old`; off gives `0.5 (v - R)^2`.
    pub clip: bool,
    /// Half-width `c` of the clip window (>= 0).
    pub cliprange_value: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for ValueLossConfig {
    fn default() -> Self {
        Self {
            clip: true,
            cliprange_value: 0.5,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

/// The value loss and its metric.
#[derive(Debug, Clone)]
pub struct ValueLoss<B: Backend> {
    /// One-element differentiable loss.
    pub loss: Tensor<B, 1>,
    /// Fraction of counted tokens where the clipped term is the larger one (so the
    /// clipped prediction decides the loss); verl's `vf_clipfrac`. Detached.
    pub clip_frac: Tensor<B, 1>,
}

impl ValueLossConfig {
    /// Errors unless `cliprange_value` is finite and >= 0.
    pub fn validate(&self) -> Result<()> {
        if !(self.cliprange_value.is_finite() && self.cliprange_value >= 0.0) {
            return Err(GoodhartError::invalid(
                "cliprange_value",
                format!("must be finite and >= 0, got {}", self.cliprange_value),
            ));
        }
        Ok(())
    }

    /// Computes the loss over `[B, T]` tensors of one shape. Errors on shape mismatch or
    /// on a non-finite value at an unmasked position; masked positions may hold anything.
    pub fn loss<B: Backend>(
        &self,
        values: Tensor<B, 2>,
        values_old: Tensor<B, 2>,
        returns: Tensor<B, 2>,
        mask: &Tensor<B, 2>,
    ) -> Result<ValueLoss<B>> {
        self.validate()?;
        check_same_shape(&values, "values", &values_old, "values_old")?;
        check_same_shape(&values, "values", &returns, "returns")?;
        check_same_shape(&values, "values", mask, "mask")?;
        check_finite(mask, "mask")?;
        check_finite_masked(&values, mask, "values")?;
        check_finite_masked(&values_old, mask, "values_old")?;
        check_finite_masked(&returns, mask, "returns")?;
        let pad = mask.clone().equal_elem(0.0);
        let v = values.mask_fill(pad.clone(), 0.0);
        let v_old = values_old.mask_fill(pad.clone(), 0.0).detach();
        let ret = returns.mask_fill(pad, 0.0).detach();
        let unclipped = (v.clone() - ret.clone()).powi_scalar(2);
        let (per_token, clip_frac) = if self.clip {
            let c = self.cliprange_value;
            // clip(v, v_old - c, v_old + c) = v_old + clamp(v - v_old, -c, c)
            let v_clip = v_old.clone() + (v - v_old).clamp(-c, c);
            let clipped = (v_clip - ret).powi_scalar(2);
            let frac = masked_mean(clipped.clone().greater(unclipped.clone()).float(), mask);
            (unclipped.max_pair(clipped), frac.detach())
        } else {
            (unclipped, Tensor::zeros([1], &mask.device()))
        };
        Ok(ValueLoss {
            loss: self.aggregation.aggregate(per_token * 0.5, mask)?,
            clip_frac,
        })
    }
}

#[cfg(test)]
mod tests {
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::t2;

    goodhart_core::backend_test! {
        fn hand_computed_vector<B>(device) {
            // c = 0.5; token 3 is padding holding NaN.
            //   v 1.0, v_old 0.0, R 1.2: (1-1.2)^2 = 0.04; clip to 0.5: (0.5-1.2)^2 = 0.49 -> 0.49 (clipped)
            //   v 2.0, v_old 2.2, R 1.0: (2-1)^2 = 1; inside [1.7, 2.7]: 1 -> 1
            //   v 0.0, v_old 0.0, R 5.0: 25; inside: 25 -> 25
            // 0.5 * (0.49 + 1 + 25) / 3 = 4.415; clip fraction 1/3
            let v = t2::<Autodiff<B>>(vec![1.0, 2.0, 0.0, f32::NAN], 1, 4, device).require_grad();
            let v_old = t2(vec![0.0, 2.2, 0.0, f32::NAN], 1, 4, device);
            let ret = t2(vec![1.2, 1.0, 5.0, f32::NAN], 1, 4, device);
            let mask = t2(vec![1.0, 1.0, 1.0, 0.0], 1, 4, device);
            let out = ValueLossConfig::default().loss(v.clone(), v_old.clone(), ret.clone(), &mask).unwrap();
            let tol = tolerance(1e-5);
            assert_close(&values(out.loss.clone()), &[4.415], tol);
            assert_close(&values(out.clip_frac), &[1.0 / 3.0], tol);
            // Gradient: the clipped token passes none; (v - R)/3 on the others.
            let g = values(v.grad(&out.loss.backward()).unwrap());
            assert_close(&g, &[0.0, 1.0 / 3.0, -5.0 / 3.0, 0.0], tol);
            // Without clipping: 0.5 * (0.04 + 1 + 25) / 3 = 4.34.
            let plain = ValueLossConfig { clip: false, ..Default::default() };
            let out = plain.loss(v.clone(), v_old.clone(), ret.clone(), &mask).unwrap();
            assert_close(&values(out.loss), &[4.34], tol);
            assert_close(&values(out.clip_frac), &[0.0], 0.0);
            // Errors.
            let short = t2(vec![0.0; 3], 1, 3, device);
            assert!(matches!(
                ValueLossConfig::default().loss(v.clone(), short, ret.clone(), &mask),
                Err(GoodhartError::ShapeMismatch { .. })
            ));
            let bad_ret = t2(vec![f32::NAN, 1.0, 5.0, 0.0], 1, 4, device);
            assert_eq!(
                ValueLossConfig::default().loss(v.clone(), v_old.clone(), bad_ret, &mask).unwrap_err(),
                GoodhartError::NonFinite { what: "returns".into() }
            );
            let neg = ValueLossConfig { cliprange_value: -1.0, ..Default::default() };
            assert!(matches!(neg.loss(v, v_old, ret, &mask), Err(GoodhartError::InvalidArgument { .. })));
        }
    }
}
