//! Sequence-level chi-squared regularisation for language models (ORPO's RLHF variant;
//! Laidlaw et al. 2024).
//!
//! Per response, the sequence likelihood ratio `rho = exp(sum_t (lp - lr) m_t)`, clipped
//! at 10; the symmetric chi-squared estimate `chi2 = mean_i((rho_i - 1) + (1/rho_i - 1))`
//! over the batch; the loss term `coef * sqrt(max(chi2, 1e-4))`. For responses sampled
//! from `pi`, `E[rho - 1]` is `chi2(pi || pi_ref)` and `E[1/rho - 1] = 0` at
//! the optimum, so the second term is a control variate that keeps the estimate
//! non-negative (`rho + 1/rho >= 2`).
//!
//! Clip: the log-ratio sum is clamped to `[-20, ln 10]` before `exp`, i.e. `rho` is
//! clipped at 10 as ORPO does; the lower bound `e^-20` is goodhart's guard so `1/rho` stays
//! finite (not in ORPO). No gradient flows through a clipped ratio.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{ops::zero_masked, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::kl::{check_coef, check_logprobs};

/// ORPO's clip on the sequence ratio.
pub const RHO_CLIP: f64 = 10.0;
/// Floor under the square root.
pub const CHI2_FLOOR: f64 = 1e-4;
/// goodhart's floor on the log-ratio sum (`rho >= e^-20`).
pub const LOG_RATIO_FLOOR: f64 = -20.0;

/// Sequence ratios `rho [B]` from per-token `lp`, `lr` and `mask` `[B, T]`, clipped to
/// `[e^-20, rho_clip]`.
pub fn sequence_ratio<B: Backend>(
    lp: Tensor<B, 2>,
    lr: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    rho_clip: f64,
) -> Result<Tensor<B, 1>> {
    check_logprobs(&lp, &lr, mask)?;
    if !(rho_clip.is_finite() && rho_clip > 1.0) {
        return Err(GoodhartError::invalid(
            "rho_clip",
            format!("must be finite and > 1, got {rho_clip}"),
        ));
    }
    let b = lp.dims()[0];
    let s = zero_masked(lp - lr, mask).sum_dim(1).reshape([b]);
    Ok(s.clamp(LOG_RATIO_FLOOR, rho_clip.ln()).exp())
}

/// The batch estimate `chi2 = mean((rho - 1) + (1/rho - 1))`, one element.
pub fn sequence_chi2<B: Backend>(
    lp: Tensor<B, 2>,
    lr: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    rho_clip: f64,
) -> Result<Tensor<B, 1>> {
    let rho = sequence_ratio(lp, lr, mask, rho_clip)?;
    Ok((rho.clone() + rho.recip() - 2.0).mean())
}

/// The loss term `coef * sqrt(max(chi2, 1e-4))` (ORPO's RLHF regulariser).
pub fn sequence_chi2_loss<B: Backend>(
    lp: Tensor<B, 2>,
    lr: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    coef: f64,
    rho_clip: f64,
) -> Result<Tensor<B, 1>> {
    check_coef("coef", coef)?;
    let chi2 = sequence_chi2(lp, lr, mask, rho_clip)?;
    Ok(chi2.clamp_min(CHI2_FLOOR).sqrt() * coef)
}

/// Config of the `sequence_chi2` regulariser (default coefficient 0.01, goodhart's choice;
/// clip 10 as ORPO).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequenceChi2Config {
    /// Coefficient.
    #[serde(default = "default_coef")]
    pub coef: f64,
    /// Clip on `rho`.
    #[serde(default = "default_clip")]
    pub rho_clip: f64,
}

fn default_coef() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    RHO_CLIP
}

impl Default for SequenceChi2Config {
    fn default() -> Self {
        Self {
            coef: default_coef(),
            rho_clip: RHO_CLIP,
        }
    }
}

impl SequenceChi2Config {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<SequenceChi2Regularizer> {
        check_coef("coef", self.coef)?;
        if !(self.rho_clip.is_finite() && self.rho_clip > 1.0) {
            return Err(GoodhartError::invalid("rho_clip", "must be finite and > 1"));
        }
        Ok(SequenceChi2Regularizer {
            config: self.clone(),
            last_chi2: None,
        })
    }
}

/// The `sequence_chi2` regulariser.
#[derive(Debug, Clone)]
pub struct SequenceChi2Regularizer {
    config: SequenceChi2Config,
    last_chi2: Option<f64>,
}

impl<B: Backend> crate::Regularizer<B> for SequenceChi2Regularizer {
    fn name(&self) -> &'static str {
        "sequence_chi2"
    }

    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        use burn::tensor::cast::ToElement;
        let lp = crate::need(&x.logp, "logp", "sequence_chi2")?;
        let lr = crate::need(&x.logp_ref, "logp_ref", "sequence_chi2")?;
        let mask = crate::need(&x.mask, "mask", "sequence_chi2")?;
        let chi2 = sequence_chi2(lp, lr, &mask, self.config.rho_clip)?;
        self.last_chi2 = Some(chi2.clone().detach().into_scalar().to_f64());
        Ok(Some(chi2.clamp_min(CHI2_FLOOR).sqrt() * self.config.coef))
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        self.last_chi2
            .map(|c| ("sequence_chi2/chi2".to_string(), c))
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::check_gradient;
    use goodhart_core::testing::{assert_close, tolerance, values};

    const LP: [f32; 6] = [-1.0, -0.7, -2.0, -0.2, -0.9, 3.0];
    const LR: [f32; 6] = [-1.2, -0.4, -1.5, -0.5, -0.6, 0.0];
    const MASK: [f32; 6] = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];

    goodhart_core::backend_test! {
        fn chi2_by_hand<B>(device) {
            let t = |x: [f32; 6]| Tensor::<B, 1>::from_floats(x, device).reshape([2, 3]);
            let m = t(MASK);
            // sums: 0.2 - 0.3 - 0.5 = -0.6; 0.3 - 0.3 (last masked) = 0
            let rho = values(sequence_ratio(t(LP), t(LR), &m, 10.0).unwrap());
            assert_close(&rho, &[(-0.6f32).exp(), 1.0], tolerance(1e-6));
            // (e^-0.6 + e^0.6 - 2 + 0)/2 = (0.5488116 + 1.8221188 - 2)/2 = 0.1854652
            let chi2 = values(sequence_chi2(t(LP), t(LR), &m, 10.0).unwrap());
            assert_close(&chi2, &[0.185_465_2], tolerance(1e-6));
            let loss = values(sequence_chi2_loss(t(LP), t(LR), &m, 0.5, 10.0).unwrap());
            assert_close(&loss, &[0.5 * 0.185_465_2f32.sqrt()], tolerance(1e-6));
            // clip: a sum of 5 gives rho = 10, 1/rho = 0.1 -> chi2 = (10 + 0.1 - 2) / 1
            let big = Tensor::<B, 2>::from_floats([[5.0]], device);
            let zero = Tensor::<B, 2>::zeros([1, 1], device);
            let one = Tensor::<B, 2>::ones([1, 1], device);
            assert_close(&values(sequence_chi2(big, zero.clone(), &one, 10.0).unwrap()), &[8.1], tolerance(1e-5));
            // identical policies: chi2 0, loss sqrt(1e-4) * coef
            assert_close(&values(sequence_chi2_loss(zero.clone(), zero.clone(), &one, 2.0, 10.0).unwrap()), &[0.02], tolerance(1e-6));
            let nan = Tensor::<B, 2>::from_floats([[f32::NAN]], device);
            assert!(matches!(sequence_chi2(nan, zero.clone(), &one, 10.0), Err(GoodhartError::NonFinite { .. })));
            assert!(matches!(sequence_chi2(t(LP), zero, &one, 10.0), Err(GoodhartError::ShapeMismatch { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn gradient_matches_finite_differences<B>(device) {
            let lr = Tensor::<B, 1>::from_floats(LR, device).reshape([2, 3]);
            let m = Tensor::<B, 1>::from_floats(MASK, device).reshape([2, 3]);
            check_gradient::<B, _>(&LP, [2, 3], device, |lp| {
                let lr = Tensor::from_data(lr.to_data(), &lp.device());
                let m = Tensor::from_data(m.to_data(), &lp.device());
                sequence_chi2_loss(lp, lr, &m, 0.7, 10.0).unwrap()
            });
        }
    }
}
