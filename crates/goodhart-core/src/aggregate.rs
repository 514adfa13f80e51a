//! Loss aggregation: how per-token losses `L [B, T]` and a response mask `m` become
//! one scalar. The choice changes the gradient's weighting between long and short
//! responses (DAPO, Dr.GRPO), so it is explicit and named as in verl's `agg_loss`.
//!
//! | name | formula |
//! |---|---|
//! | `token-mean` | `sum(L m) / sum(m)` |
//! | `seq-mean-token-sum` | mean over sequences of `sum_t L m` |
//! | `seq-mean-token-mean` | mean over sequences with at least one valid token of their per-token mean |
//! | `seq-mean-token-sum-norm` | `sum(L m) / (B * T)` (Dr.GRPO's constant normaliser; `T` the padded length, as verl when no scale factor is set) |

use burn::tensor::{backend::Backend, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    error::Result,
    ops::{check_same_shape, zero_masked},
};

/// A loss aggregation mode; serialised in kebab-case (`"token-mean"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossAggregation {
    /// `sum(L m) / sum(m)` (verl's and TRL's default; DAPO).
    #[default]
    TokenMean,
    /// Mean over sequences of the per-sequence token sum.
    SeqMeanTokenSum,
    /// Mean over sequences of the per-sequence token mean (original GRPO); fully
    /// masked sequences are excluded from the outer mean.
    SeqMeanTokenMean,
    /// `sum(L m) / (B * T)`: Dr.GRPO's constant normaliser.
    SeqMeanTokenSumNorm,
}

impl LossAggregation {
    /// Every mode with its name, for listings.
    pub const ALL: [(&'static str, LossAggregation); 4] = [
        ("token-mean", Self::TokenMean),
        ("seq-mean-token-sum", Self::SeqMeanTokenSum),
        ("seq-mean-token-mean", Self::SeqMeanTokenMean),
        ("seq-mean-token-sum-norm", Self::SeqMeanTokenSumNorm),
    ];

    /// Aggregates per-token `loss [B, T]` under `mask [B, T]` into a one-element tensor.
    /// Gradients flow through `loss`; masked positions (even NaN ones) contribute nothing.
    pub fn aggregate<B: Backend>(
        &self,
        loss: Tensor<B, 2>,
        mask: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>> {
        check_same_shape(mask, "mask", &loss, "loss")?;
        let [b, t] = loss.dims();
        let masked = zero_masked(loss, mask);
        Ok(match self {
            Self::TokenMean => masked.sum() / mask.clone().sum().clamp_min(1e-8),
            Self::SeqMeanTokenSum => masked.sum_dim(1).mean().reshape([1]),
            Self::SeqMeanTokenMean => {
                let tokens = mask.clone().sum_dim(1);
                let valid = tokens.clone().greater_elem(0.0).float();
                let per_seq = masked.sum_dim(1) / tokens.clamp_min(1e-8);
                (per_seq * valid.clone()).sum() / valid.sum().clamp_min(1.0)
            }
            Self::SeqMeanTokenSumNorm => masked.sum() / ((b * t).max(1) as f32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, tolerance, values};

    crate::backend_test! {
        fn every_mode_by_hand<B>(device) {
            let loss = Tensor::<B, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, f32::NAN, 6.0], [7.0, 8.0, 9.0]], device);
            let mask = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device);
            let tol = tolerance(1e-6);
            let agg = |m: LossAggregation| values(m.aggregate(loss.clone(), &mask).unwrap());
            // valid: 1 2 3 | 4  -> sum 10 over 4 tokens
            assert_close(&agg(LossAggregation::TokenMean), &[2.5], tol);
            // per-sequence sums 6, 4, 0 over 3 sequences
            assert_close(&agg(LossAggregation::SeqMeanTokenSum), &[10.0 / 3.0], tol);
            // per-sequence means 2, 4; the empty third is excluded
            assert_close(&agg(LossAggregation::SeqMeanTokenMean), &[3.0], tol);
            // 10 / (3 * 3)
            assert_close(&agg(LossAggregation::SeqMeanTokenSumNorm), &[10.0 / 9.0], tol);
            let short = Tensor::<B, 2>::zeros([3, 2], device);
            assert!(LossAggregation::TokenMean.aggregate(loss, &short).is_err());
        }
    }

    #[test]
    fn names_round_trip_through_serde() {
        for (name, mode) in LossAggregation::ALL {
            let v: LossAggregation = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(v, mode);
        }
    }
}
