//! SFT anchoring: add the negative log-likelihood of baseline (reference or chosen)
//! responses to the loss, `coef * agg(-lp)`, so the policy keeps assigning them
//! probability while it chases the proxy. RPO (Pang et al. 2024, "Iterative Reasoning
//! Preference Optimization") adds this NLL on the chosen response to DPO; TRL exposes it
//! as `rpo_alpha` (paper value 1.0, the default here).

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    aggregate::LossAggregation, ops::check_finite_masked, ops::check_same_shape, Result,
};
use serde::{Deserialize, Serialize};

use crate::kl::check_coef;

/// `coef * agg(-logp)` over the baseline responses' valid tokens (`logp`, `mask` `[B, T]`).
pub fn sft_anchor_loss<B: Backend>(
    logp: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    coef: f64,
    aggregation: LossAggregation,
) -> Result<Tensor<B, 1>> {
    check_same_shape(mask, "mask", &logp, "baseline logp")?;
    check_finite_masked(&logp, mask, "baseline logp")?;
    check_coef("coef", coef)?;
    Ok(aggregation.aggregate(logp.neg(), mask)? * coef)
}

/// Config of the `sft_anchor` regulariser (coefficient 1.0 as RPO; token-mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftAnchorConfig {
    /// Coefficient (RPO's alpha).
    #[serde(default = "default_coef")]
    pub coef: f64,
    /// Aggregation of the NLL.
    #[serde(default)]
    pub aggregation: LossAggregation,
}

fn default_coef() -> f64 {
    1.0
}

impl Default for SftAnchorConfig {
    fn default() -> Self {
        Self {
            coef: 1.0,
            aggregation: LossAggregation::default(),
        }
    }
}

impl SftAnchorConfig {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<SftAnchorRegularizer> {
        check_coef("coef", self.coef)?;
        Ok(SftAnchorRegularizer {
            config: self.clone(),
            last_nll: None,
        })
    }
}

/// The `sft_anchor` regulariser, over `baseline_logp` / `baseline_mask`.
#[derive(Debug, Clone)]
pub struct SftAnchorRegularizer {
    config: SftAnchorConfig,
    last_nll: Option<f64>,
}

impl<B: Backend> crate::Regularizer<B> for SftAnchorRegularizer {
    fn name(&self) -> &'static str {
        "sft_anchor"
    }

    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        use burn::tensor::cast::ToElement;
        let lp = crate::need(&x.baseline_logp, "baseline_logp", "sft_anchor")?;
        let mask = crate::need(&x.baseline_mask, "baseline_mask", "sft_anchor")?;
        let nll = sft_anchor_loss(lp, &mask, 1.0, self.config.aggregation)?;
        self.last_nll = Some(nll.clone().detach().into_scalar().to_f64());
        Ok(Some(nll * self.config.coef))
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        self.last_nll
            .map(|v| ("sft_anchor/nll".to_string(), v))
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::{
        testing::{assert_close, tolerance, values},
        GoodhartError,
    };

    goodhart_core::backend_test! {
        fn nll_by_hand<B>(device) {
            let lp = Tensor::<B, 2>::from_floats([[-1.0, -2.0, f32::NAN], [-0.5, -0.5, -3.0]], device);
            let m = Tensor::<B, 2>::from_floats([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], device);
            // NLL sum 1 + 2 + 0.5 + 0.5 + 3 = 7 over 5 tokens -> 1.4; coef 0.5 -> 0.7
            assert_close(&values(sft_anchor_loss(lp.clone(), &m, 0.5, LossAggregation::TokenMean).unwrap()), &[0.7], tolerance(1e-6));
            // per-sequence sums 3 and 4 -> mean 3.5
            assert_close(&values(sft_anchor_loss(lp.clone(), &m, 1.0, LossAggregation::SeqMeanTokenSum).unwrap()), &[3.5], tolerance(1e-6));
            let full = Tensor::<B, 2>::ones([2, 3], device);
            assert!(matches!(sft_anchor_loss(lp, &full, 1.0, LossAggregation::TokenMean), Err(GoodhartError::NonFinite { .. })));
        }
    }
}
