//! Rollout importance sampling: per-token weights `pi_train / pi_rollout` that correct for
//! the rollout engine sampling from a slightly different distribution than the trainer
//! scores (another engine, lower precision, asynchronous or stale weights).
//!
//! ```text
//! d      = lp_old - lp_rollout                        (trainer's log-prob minus the engine's)
//! token:     w_t = exp(clamp(d_t, -20, 20))
//! sequence:  w_t = exp(clamp(sum_t m d_t, -20, 20))   (one weight per response)
//! TIS:       w = min(w, threshold)                    (truncation, the default)
//! IcePop:    w = w if lower <= w <= threshold, else 0
//! batch_normalize: w / mean(w)                        (over tokens, or over responses)
//! ```
//!
//! The weights are detached and 0 at masked positions; pass them to
//! [`PolicyInputs::with_rollout_is_weights`](crate::PolicyInputs::with_rollout_is_weights),
//! which multiplies each token's loss by its weight before aggregation, in every policy
//! loss. Source: verl 0.9.1 `compute_rollout_correction_weights`
//! (`rollout_corr_helper.py`), whose `rollout_is`, `rollout_is_threshold` (`"lower_upper"`
//! for IcePop) and `rollout_is_batch_normalize` these fields mirror.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    ops::{check_finite_masked, check_same_shape, masked_mean, zero_masked},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::policy::LOG_RATIO_CLAMP;

/// One weight per token or one per response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IsLevel {
    /// Per-token ratios (biased, low variance; verl's default).
    #[default]
    Token,
    /// The product of a response's token ratios on each of its tokens (unbiased, high
    /// variance).
    Sequence,
}

/// Rollout-IS settings.
///
/// Defaults: token level, truncated at 2 (verl's `rollout_is_threshold`), no lower bound,
/// no batch normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RolloutIsConfig {
    /// Token or sequence weights.
    pub level: IsLevel,
    /// Upper bound: weights above are truncated to it (TIS), or zeroed with `lower` set.
    pub threshold: f32,
    /// With a lower bound, weights outside `[lower, threshold]` become 0 (IcePop).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lower: Option<f32>,
    /// Divide the weights by their mean so they average 1.
    pub batch_normalize: bool,
}

impl Default for RolloutIsConfig {
    fn default() -> Self {
        Self {
            level: IsLevel::Token,
            threshold: 2.0,
            lower: None,
            batch_normalize: false,
        }
    }
}

/// The weights and what they did.
#[derive(Debug, Clone)]
pub struct RolloutIsWeights<B: Backend> {
    /// `[B, T]` detached weights, 0 at masked positions.
    pub weights: Tensor<B, 2>,
    /// Mean weight over counted tokens, before batch normalisation.
    pub mean: Tensor<B, 1>,
    /// Fraction of counted tokens whose raw weight lay above `threshold` (truncated or
    /// zeroed) or below `lower` (zeroed).
    pub out_of_bounds: Tensor<B, 1>,
}

impl RolloutIsConfig {
    /// Errors unless `threshold > 0` and, when set, `0 < lower <= threshold`, finite.
    pub fn validate(&self) -> Result<()> {
        if !(self.threshold.is_finite() && self.threshold > 0.0) {
            return Err(GoodhartError::invalid(
                "threshold",
                format!("must be finite and > 0, got {}", self.threshold),
            ));
        }
        if let Some(lo) = self.lower {
            if !(lo.is_finite() && lo > 0.0 && lo <= self.threshold) {
                return Err(GoodhartError::invalid(
                    "lower",
                    format!("must lie in (0, threshold = {}], got {lo}", self.threshold),
                ));
            }
        }
        Ok(())
    }

    /// The weights from the trainer's log-probs of the sampled tokens under the rollout
    /// policy (`logp_old`) and the engine's (`logp_rollout`), `[B, T]` each.
    ///
    /// Errors: an invalid config, a shape mismatch, or a NaN/infinite log-prob at a
    /// counted position.
    pub fn weights<B: Backend>(
        &self,
        logp_old: &Tensor<B, 2>,
        logp_rollout: &Tensor<B, 2>,
        mask: &Tensor<B, 2>,
    ) -> Result<RolloutIsWeights<B>> {
        self.validate()?;
        check_same_shape(logp_old, "logp_old", logp_rollout, "logp_rollout")?;
        check_same_shape(logp_old, "logp_old", mask, "mask")?;
        check_finite_masked(logp_old, mask, "logp_old")?;
        check_finite_masked(logp_rollout, mask, "logp_rollout")?;
        let [b, t] = mask.dims();
        let d = zero_masked(logp_old.clone() - logp_rollout.clone(), mask).detach();
        let d = match self.level {
            IsLevel::Token => d,
            IsLevel::Sequence => d.sum_dim(1).expand([b, t]),
        };
        let raw = zero_masked(d.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp(), mask);
        let above = raw.clone().greater_elem(self.threshold);
        let (weights, out) = match self.lower {
            None => (raw.clone().clamp_max(self.threshold), above),
            Some(lo) => {
                let out = above.bool_or(raw.clone().lower_elem(lo));
                (raw.clone().mask_fill(out.clone(), 0.0), out)
            }
        };
        let weights = zero_masked(weights, mask);
        let mean = masked_mean(weights.clone(), mask);
        let out_of_bounds = masked_mean(out.float(), mask);
        let weights = if self.batch_normalize {
            let norm = match self.level {
                IsLevel::Token => mean.clone(),
                // One weight per response: the mean over responses with a counted token.
                IsLevel::Sequence => {
                    let tokens = mask.clone().sum_dim(1);
                    let has = tokens.clone().greater_elem(0.0).float();
                    let per_row = weights.clone().sum_dim(1) / tokens.clamp_min(1e-8);
                    (per_row * has.clone()).sum() / has.sum().clamp_min(1e-8)
                }
            };
            // verl leaves the weights alone when their mean is (near) zero.
            let norm = norm.clone().mask_fill(norm.lower_equal_elem(1e-8), 1.0);
            weights / norm.reshape([1, 1])
        } else {
            weights
        };
        Ok(RolloutIsWeights {
            weights,
            mean,
            out_of_bounds,
        })
    }
}

#[cfg(test)]
mod tests {
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::t2;

    goodhart_core::backend_test! {
        fn truncation_icepop_sequence_and_normalisation_by_hand<B>(device) {
            // Trainer-over-engine ratios 4, 1, 0.25 | 0.5, (padding NaN).
            let ratios = [4.0f32, 1.0, 0.25, 0.5];
            let old = t2::<B>(vec![ratios[0].ln(), ratios[1].ln(), ratios[2].ln(), ratios[3].ln(), f32::NAN, f32::NAN], 2, 3, device);
            let rollout = t2::<B>(vec![0.0; 6], 2, 3, device);
            let mask = t2::<B>(vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 2, 3, device);
            let tol = tolerance(1e-5);
            let w = |c: RolloutIsConfig| c.weights(&old, &rollout, &mask).unwrap();
            // TIS at 2: 2, 1, 0.25 | 0.5; one token of 4 above.
            let tis = w(RolloutIsConfig::default());
            assert_close(&values(tis.weights.clone()), &[2.0, 1.0, 0.25, 0.5, 0.0, 0.0], tol);
            assert_close(&values(tis.mean), &[3.75 / 4.0], tol);
            assert_close(&values(tis.out_of_bounds), &[0.25], tol);
            // IcePop [0.5, 2]: 4 and 0.25 are zeroed.
            let ice = w(RolloutIsConfig { lower: Some(0.5), ..Default::default() });
            assert_close(&values(ice.weights), &[0.0, 1.0, 0.0, 0.5, 0.0, 0.0], tol);
            assert_close(&values(ice.out_of_bounds), &[0.5], tol);
            // Sequence level: row products 1 and 0.5, truncated at 2; normalised by their
            // mean over responses, 0.75.
            let seq = w(RolloutIsConfig { level: IsLevel::Sequence, batch_normalize: true, ..Default::default() });
            let (a, b) = (1.0 / 0.75, 0.5 / 0.75);
            assert_close(&values(seq.weights), &[a, a, a, b, 0.0, 0.0], tol);
            // Token normalisation: divide by 3.75 / 4.
            let norm = w(RolloutIsConfig { batch_normalize: true, ..Default::default() });
            let k = 4.0 / 3.75;
            assert_close(&values(norm.weights), &[2.0 * k, k, 0.25 * k, 0.5 * k, 0.0, 0.0], tol);
            for bad in [
                RolloutIsConfig { threshold: 0.0, ..Default::default() },
                RolloutIsConfig { lower: Some(3.0), ..Default::default() },
            ] {
                assert!(bad.weights(&old, &rollout, &mask).is_err());
            }
            let nan = t2::<B>(vec![f32::NAN; 6], 2, 3, device);
            assert!(RolloutIsConfig::default().weights(&old, &nan, &mask).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn every_policy_loss_multiplies_its_token_losses_by_the_weights<B>(device) {
            use crate::PolicyLossConfig;
            // Weights 2 on every counted token double the token-mean loss of every loss
            // that aggregates per token; weights 1 change nothing.
            let lp = t2::<B>(vec![-0.5, -1.0, -0.2, -2.0], 2, 2, device);
            let old = t2::<B>(vec![-0.6, -0.9, -0.25, -1.9], 2, 2, device);
            let adv = t2::<B>(vec![1.0, 1.0, -0.5, -0.5], 2, 2, device);
            let mask = t2::<B>(vec![1.0; 4], 2, 2, device);
            // Two turns per row (the turn-level loss reads them; the others ignore them).
            let turns = crate::turn_clip::TurnInputs {
                token_turn: Tensor::from_data(burn::tensor::TensorData::new(vec![0i64, 1, 0, 1], [2, 2]), device),
                turn_z: t2::<B>(vec![0.5, -0.5, 1.0, 0.0], 2, 2, device),
                fixed: t2::<B>(vec![0.0, 1.0, 0.0, 1.0], 2, 2, device),
            };
            let base = crate::PolicyInputs::new(lp, old, adv, mask.clone()).unwrap().with_turns(turns).unwrap();
            for info in crate::policy::REGISTRY {
                let cfg: PolicyLossConfig = toml::from_str(&format!("kind = \"{}\"", info.name)).unwrap();
                let plain = values(cfg.loss(&base).unwrap().loss)[0];
                let ones = base.clone().with_rollout_is_weights(mask.clone()).unwrap();
                assert_close(&values(cfg.loss(&ones).unwrap().loss), &[plain], tolerance(1e-6));
                let twos = base.clone().with_rollout_is_weights(mask.clone() * 2.0).unwrap();
                assert_close(&values(cfg.loss(&twos).unwrap().loss), &[2.0 * plain], tolerance(1e-5));
            }
            let neg = base.clone().with_rollout_is_weights(mask.clone() * -1.0);
            assert!(neg.is_err());
        }
    }
}
