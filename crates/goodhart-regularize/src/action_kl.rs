//! Action-distribution KL to a base policy, the regulariser ORPO compares against
//! (Laidlaw et al. 2024): `(1 / (1 - gamma)) * coef * mean_s KL(pi(.|s) || pi_base(.|s))`,
//! the exact KL between full categorical distributions at each visited state (or token
//! position), averaged over valid states. The `1/(1-gamma)` factor turns the per-state
//! KL into the discounted-occupancy scale of ORPO's comparison; use `gamma = 0` for the
//! plain mean (e.g. per-token full-vocabulary KL in an LM).

use burn::tensor::{activation::log_softmax, backend::Backend, Tensor};
use goodhart_core::{
    ops::{check_finite_masked, check_same_shape, masked_mean},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::kl::check_coef;

/// Exact `KL(pi(.|s) || pi_base(.|s))` per row of `logits [N, A]` and `base_logits [N, A]`,
/// `[N]`. The base side is detached.
pub fn action_kl_per_state<B: Backend>(
    logits: Tensor<B, 2>,
    base_logits: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let n = logits.dims()[0];
    let logp = log_softmax(logits, 1);
    let logq = log_softmax(base_logits.detach(), 1);
    (logp.clone().exp() * (logp - logq)).sum_dim(1).reshape([n])
}

/// The loss term `coef / (1 - gamma) * masked_mean_s KL(pi || pi_base)` over `mask [N]`
/// (all states when `None`). Errors on mismatched shapes, non-finite logits at valid
/// rows, `gamma` outside `[0, 1)` or a negative coefficient.
pub fn action_kl<B: Backend>(
    logits: Tensor<B, 2>,
    base_logits: Tensor<B, 2>,
    mask: Option<&Tensor<B, 1>>,
    gamma: f64,
    coef: f64,
) -> Result<Tensor<B, 1>> {
    check_same_shape(&logits, "logits", &base_logits, "base_logits")?;
    if !(0.0..1.0).contains(&gamma) {
        return Err(GoodhartError::invalid(
            "gamma",
            format!("must be in [0, 1), got {gamma}"),
        ));
    }
    check_coef("coef", coef)?;
    let [n, a] = logits.dims();
    let mask = match mask {
        Some(m) if m.dims() != [n] => return Err(GoodhartError::shape("mask", &[n], &m.dims())),
        Some(m) => m.clone(),
        None => Tensor::ones([n], &logits.device()),
    };
    let row_mask = mask.clone().reshape([n, 1]).expand([n, a]);
    check_finite_masked(&logits, &row_mask, "logits")?;
    check_finite_masked(&base_logits, &row_mask, "base_logits")?;
    let kl = action_kl_per_state(
        logits.mask_fill(row_mask.clone().equal_elem(0.0), 0.0),
        base_logits.mask_fill(row_mask.equal_elem(0.0), 0.0),
    );
    Ok(masked_mean(kl, &mask) * (coef / (1.0 - gamma)))
}

/// Config of the `action_kl` regulariser (ORPO's tomato setting: gamma 0.99; the
/// coefficient default 0.01 is goodhart's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionKlConfig {
    /// Coefficient.
    #[serde(default = "default_coef")]
    pub coef: f64,
    /// Discount of the occupancy scale.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
}

fn default_coef() -> f64 {
    0.01
}
fn default_gamma() -> f64 {
    0.99
}

impl Default for ActionKlConfig {
    fn default() -> Self {
        Self {
            coef: default_coef(),
            gamma: default_gamma(),
        }
    }
}

impl ActionKlConfig {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<ActionKlRegularizer> {
        check_coef("coef", self.coef)?;
        if !(0.0..1.0).contains(&self.gamma) {
            return Err(GoodhartError::invalid("gamma", "must be in [0, 1)"));
        }
        Ok(ActionKlRegularizer {
            config: self.clone(),
        })
    }
}

/// The `action_kl` regulariser, over `logits` / `ref_logits` `[N, T, V]` and `mask`.
#[derive(Debug, Clone)]
pub struct ActionKlRegularizer {
    config: ActionKlConfig,
}

impl<B: Backend> crate::Regularizer<B> for ActionKlRegularizer {
    fn name(&self) -> &'static str {
        "action_kl"
    }

    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        let logits = crate::need(&x.logits, "logits", "action_kl")?;
        let base = crate::need(&x.ref_logits, "ref_logits", "action_kl")?;
        check_same_shape(&logits, "logits", &base, "ref_logits")?;
        let [n, t, v] = logits.dims();
        let mask = match &x.mask {
            Some(m) if m.dims() != [n, t] => {
                return Err(GoodhartError::shape("mask", &[n, t], &m.dims()))
            }
            Some(m) => m.clone().reshape([n * t]),
            None => Tensor::ones([n * t], &logits.device()),
        };
        let loss = action_kl(
            logits.reshape([n * t, v]),
            base.reshape([n * t, v]),
            Some(&mask),
            self.config.gamma,
            self.config.coef,
        )?;
        Ok(Some(loss))
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        std::collections::BTreeMap::from([("action_kl/coef".to_string(), self.config.coef)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::check_gradient;
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn kl_by_hand<B>(device) {
            // row 0: p = (0.75, 0.25), q = (0.5, 0.5): 0.75 ln 1.5 + 0.25 ln 0.5 = 0.1308334
            // row 1: identical -> 0; row 2 masked (garbage)
            let l = Tensor::<B, 2>::from_floats([[1.098_612_3, 0.0], [0.3, -0.2], [f32::NAN, 0.0]], device);
            let q = Tensor::<B, 2>::from_floats([[0.0, 0.0], [0.3, -0.2], [0.0, 0.0]], device);
            let m = Tensor::<B, 1>::from_floats([1.0, 1.0, 0.0], device);
            let v = values(action_kl(l.clone(), q.clone(), Some(&m), 0.5, 0.1).unwrap());
            // mean over 2 valid rows = 0.0654167; * 0.1 / 0.5
            assert_close(&v, &[0.130_812 / 2.0 * 0.2], tolerance(1e-6));
            assert!(matches!(action_kl(l.clone(), q.clone(), None, 0.5, 0.1), Err(GoodhartError::NonFinite { .. })));
            assert!(matches!(action_kl(l.clone(), q.clone(), Some(&m), 1.0, 0.1), Err(GoodhartError::InvalidArgument { .. })));
            let short = Tensor::<B, 2>::zeros([3, 3], device);
            assert!(matches!(action_kl(l, short, Some(&m), 0.5, 0.1), Err(GoodhartError::ShapeMismatch { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn gradient_matches_finite_differences<B>(device) {
            let base = Tensor::<B, 2>::from_floats([[0.1, -0.4, 0.9], [0.0, 0.5, -0.5]], device);
            check_gradient::<B, _>(&[0.3, 0.2, -0.6, 1.0, -0.3, 0.4], [2, 3], device, |x| {
                let base = Tensor::from_data(base.to_data(), &x.device());
                action_kl(x, base, None, 0.9, 0.5).unwrap()
            });
        }
    }
}
