//! Entropy bonus: the loss term `-c * agg(H_t)`, optionally over the top-q
//! highest-entropy valid tokens only.
//!
//! `H_t = -sum_v pi(v | s_t) log pi(v | s_t)` ([`entropy_from_logits`]). The full bonus is
//! verl's `entropy_coeff` term (aggregated like the policy loss; verl default coefficient
//! 0). Restricting it to the highest-entropy "forking" tokens follows the 80/20 entropy
//! analysis of RLVR (Wang et al. 2025, "Beyond the 80/20 rule"), where the top 20% of
//! tokens by entropy carry the exploration.

use burn::tensor::{activation::log_softmax, backend::Backend, cast::ToElement, Tensor};
use goodhart_core::{
    aggregate::LossAggregation,
    ops::{check_finite_masked, check_same_shape},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::kl::check_coef;

/// Per-position entropy `[B, T]` of the categorical distributions given by `logits [B, T, V]`.
pub fn entropy_from_logits<B: Backend>(logits: Tensor<B, 3>) -> Tensor<B, 2> {
    let logp = log_softmax(logits, 2);
    (logp.clone().exp() * logp)
        .sum_dim(2)
        .squeeze_dim::<2>(2)
        .neg()
}

/// A 0/1 mask `[B, T]` of the valid positions whose `score` is among the top fraction
/// `q` of valid scores: the `k = ceil(q * n_valid)` largest, plus any ties with the k-th
/// (so ties never make the selection depend on sort order). `q` must lie in `(0, 1]`;
/// an all-zero mask gives an all-zero selection. One scalar (`n_valid`) is read back.
pub fn top_fraction_mask<B: Backend>(
    score: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    q: f64,
) -> Result<Tensor<B, 2>> {
    check_same_shape(mask, "mask", &score, "score")?;
    if !(q > 0.0 && q <= 1.0) {
        return Err(GoodhartError::invalid(
            "top_q",
            format!("must be in (0, 1], got {q}"),
        ));
    }
    let n_valid = count_valid(mask);
    let k = ((q * n_valid as f64).ceil() as usize).min(n_valid);
    top_k_mask(score, mask, k)
}

/// Number of non-zero entries of `mask` (one scalar read back).
pub(crate) fn count_valid<B: Backend, const D: usize>(mask: &Tensor<B, D>) -> usize {
    mask.clone()
        .not_equal_elem(0.0)
        .int()
        .sum()
        .into_scalar()
        .to_i64() as usize
}

/// A 0/1 mask `[B, T]` of the `k` valid positions with the largest `score` (plus ties
/// with the k-th); all zero when `k = 0` or nothing is valid; every valid position when
/// `k >= n_valid`.
pub fn top_k_mask<B: Backend>(
    score: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    k: usize,
) -> Result<Tensor<B, 2>> {
    check_same_shape(mask, "mask", &score, "score")?;
    let valid = mask.clone().not_equal_elem(0.0);
    let k = k.min(count_valid(mask));
    if k == 0 {
        return Ok(mask.zeros_like());
    }
    let [b, t] = score.dims();
    let ranked = score
        .clone()
        .mask_fill(valid.clone().bool_not(), f32::MIN)
        .reshape([b * t])
        .sort_descending(0);
    let threshold = ranked.slice(k - 1..k).reshape([1, 1]);
    let keep = score
        .greater_equal(threshold.expand([b, t]))
        .bool_and(valid);
    Ok(keep.float())
}

/// The entropy loss term `-coef * agg(H)` over `mask` (or, with `top_q`, over the
/// [`top_fraction_mask`] of the highest-entropy valid tokens). Adding it to the loss
/// rewards entropy. Errors on shape mismatch, non-finite entropy at a valid position,
/// a negative coefficient or `top_q` outside `(0, 1]`.
pub fn entropy_bonus<B: Backend>(
    entropy: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
    coef: f64,
    aggregation: LossAggregation,
    top_q: Option<f64>,
) -> Result<Tensor<B, 1>> {
    check_same_shape(mask, "mask", &entropy, "entropy")?;
    check_finite_masked(&entropy, mask, "entropy")?;
    check_coef("entropy coef", coef)?;
    let mask = match top_q {
        Some(q) => top_fraction_mask(entropy.clone().detach(), mask, q)?,
        None => mask.clone(),
    };
    Ok(aggregation.aggregate(entropy, &mask)? * (-coef))
}

/// Config of the `entropy` regulariser (default coefficient 0.001, no top-q filter,
/// token-mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    /// Coefficient `c`.
    #[serde(default = "default_coef")]
    pub coef: f64,
    /// Keep only the top fraction `q` of valid tokens by entropy (0.2 in the 80/20 paper).
    #[serde(default)]
    pub top_q: Option<f64>,
    /// Loss aggregation.
    #[serde(default)]
    pub aggregation: LossAggregation,
}

fn default_coef() -> f64 {
    0.001
}

impl Default for EntropyConfig {
    fn default() -> Self {
        Self {
            coef: default_coef(),
            top_q: None,
            aggregation: LossAggregation::default(),
        }
    }
}

impl EntropyConfig {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<EntropyRegularizer> {
        check_coef("coef", self.coef)?;
        if let Some(q) = self.top_q {
            if !(q > 0.0 && q <= 1.0) {
                return Err(GoodhartError::invalid(
                    "top_q",
                    format!("must be in (0, 1], got {q}"),
                ));
            }
        }
        Ok(EntropyRegularizer {
            config: self.clone(),
            last_entropy: None,
        })
    }
}

/// The `entropy` regulariser.
#[derive(Debug, Clone)]
pub struct EntropyRegularizer {
    config: EntropyConfig,
    last_entropy: Option<f64>,
}

impl<B: Backend> crate::Regularizer<B> for EntropyRegularizer {
    fn name(&self) -> &'static str {
        "entropy"
    }

    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        let h = crate::need(&x.entropy, "entropy", "entropy")?;
        let mask = crate::need(&x.mask, "mask", "entropy")?;
        let c = &self.config;
        let loss = entropy_bonus(h.clone(), &mask, c.coef, c.aggregation, c.top_q)?;
        self.last_entropy = Some(
            goodhart_core::ops::masked_mean(h.detach(), &mask)
                .into_scalar()
                .to_f64(),
        );
        Ok(Some(loss))
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        self.last_entropy
            .map(|h| ("entropy/mean".to_string(), h))
            .into_iter()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn entropy_of_known_distributions<B>(device) {
            // uniform over 4: ln 4 = 1.3862944; one-hot (logits 0, -100, ...): ~0;
            // (ln 3, 0): p = (0.75, 0.25) -> -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.5623351
            let logits = Tensor::<B, 3>::from_floats(
                [[[0.0, 0.0, 0.0, 0.0], [0.0, -100.0, -100.0, -100.0], [1.098_612_3, 0.0, -100.0, -100.0]]],
                device,
            );
            assert_close(&values(entropy_from_logits(logits)), &[1.386_294_4, 0.0, 0.562_335_1], tolerance(1e-5));
        }
    }

    goodhart_core::backend_test! {
        fn bonus_and_top_q<B>(device) {
            let h = Tensor::<B, 2>::from_floats([[0.1, 0.9, 0.5, 7.0], [0.3, 0.8, 0.2, 0.4]], device);
            let m = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]], device);
            let tol = tolerance(1e-6);
            // 7 valid entropies sum 3.2 -> mean 0.457142857; bonus -0.5 * mean
            let all = entropy_bonus(h.clone(), &m, 0.5, LossAggregation::TokenMean, None).unwrap();
            assert_close(&values(all), &[-0.5 * 3.2 / 7.0], tol);
            // q = 0.3 of 7 -> k = ceil(2.1) = 3: 0.9, 0.8, 0.5 (7.0 is padding) -> mean 2.2/3
            let sel = top_fraction_mask(h.clone(), &m, 0.3).unwrap();
            assert_close(&values(sel), &[0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0], 0.0);
            let top = entropy_bonus(h.clone(), &m, 1.0, LossAggregation::TokenMean, Some(0.3)).unwrap();
            assert_close(&values(top), &[-2.2 / 3.0], tol);
            assert!(matches!(entropy_bonus(h.clone(), &m, 1.0, LossAggregation::TokenMean, Some(0.0)), Err(GoodhartError::InvalidArgument { .. })));
            let bad = Tensor::<B, 2>::from_floats([[f32::NAN, 0.0, 0.0, 0.0], [0.0; 4]], device);
            assert!(matches!(entropy_bonus(bad, &m, 1.0, LossAggregation::TokenMean, None), Err(GoodhartError::NonFinite { .. })));
        }
    }
}
