//! Negative- and positive-sample reinforcement: train on one sign of the advantage only.
//!
//! NSR keeps only responses with negative advantage, so the update only *lowers* the
//! probability of bad responses and redistributes that mass by the model's own prior;
//! PSR, its mirror, keeps only positive-advantage responses (an on-policy rejection-sampling
//! fine-tune). "The Debate on RLVR Reasoning Capability Boundary" (2025) argues that
//! training on relative negative gradients alone prolongs the exploration stage and avoids
//! the capability-boundary shrinkage that positive reinforcement causes.
//!
//! Both are mask transforms: the new mask `m' = m * 1[A < 0]` (NSR) or `m * 1[A > 0]` (PSR)
//! goes to any policy loss in place of `m`. Zero advantages (a group whose responses all
//! scored the same) belong to neither. Note the aggregation then normalises over the kept
//! tokens: under `token-mean` the denominator is the number of kept tokens, under
//! `seq-mean-token-sum-norm` it stays `B * T`. The weighted variant (W-REINFORCE) is not
//! implemented: neither METHODS.md nor the seed papers document it.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{
    ops::{check_finite, check_finite_masked, check_same_shape},
    registry::MethodInfo,
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// Which samples a policy loss trains on; `"all"`, `"nsr"` or `"psr"` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleFilter {
    /// Every counted token (the mask unchanged).
    #[default]
    All,
    /// Negative-sample reinforcement: only tokens with `A < 0`.
    Nsr,
    /// Positive-sample reinforcement: only tokens with `A > 0`.
    Psr,
}

/// The sample-filter registry.
pub const REGISTRY: &[MethodInfo] = &[
    MethodInfo {
        name: "all",
        summary: "train on every response (mask unchanged)",
        source: "standard policy gradient",
    },
    MethodInfo {
        name: "nsr",
        summary: "negative-sample reinforcement: mask m * 1[A < 0]",
        source: "The Debate on RLVR Reasoning Capability Boundary (2025); Zhu et al. 2025 (NSR)",
    },
    MethodInfo {
        name: "psr",
        summary: "positive-sample reinforcement: mask m * 1[A > 0]",
        source: "The Debate on RLVR Reasoning Capability Boundary (2025); Zhu et al. 2025 (PSR)",
    },
];

impl SampleFilter {
    /// The registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Nsr => "nsr",
            Self::Psr => "psr",
        }
    }

    /// Token-level filter: `mask [B, T]` restricted by the sign of `advantages [B, T]`.
    /// With outcome advantages broadcast over a response (GRPO, RLOO, ...) this selects
    /// whole responses. Errors on shape mismatch or a non-finite advantage at an unmasked
    /// position; masked positions stay 0 whatever the advantage holds there.
    pub fn apply<B: Backend>(
        &self,
        advantages: &Tensor<B, 2>,
        mask: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        check_same_shape(mask, "mask", advantages, "advantages")?;
        check_finite(mask, "mask")?;
        check_finite_masked(advantages, mask, "advantages")?;
        Ok(self.keep(advantages.clone(), mask.clone()))
    }

    /// Response-level filter: keeps whole rows of `mask [B, T]` by the sign of one
    /// advantage (or reward minus baseline) per response, `advantages [B]`. Use it when
    /// token advantages differ within a response (GAE) but responses are to be chosen by an
    /// outcome. Errors on length mismatch or a non-finite advantage.
    pub fn apply_per_response<B: Backend>(
        &self,
        advantages: &Tensor<B, 1>,
        mask: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        let [b, t] = mask.dims();
        if advantages.dims()[0] != b {
            return Err(GoodhartError::shape(
                "advantages (one per response row of mask)",
                &[b],
                &advantages.dims(),
            ));
        }
        check_finite(mask, "mask")?;
        check_finite(advantages, "advantages")?;
        let rows = advantages.clone().reshape([b, 1]).expand([b, t]);
        Ok(self.keep(rows, mask.clone()))
    }

    fn keep<B: Backend>(&self, advantages: Tensor<B, 2>, mask: Tensor<B, 2>) -> Tensor<B, 2> {
        let drop = match self {
            Self::All => return mask,
            Self::Nsr => advantages.greater_equal_elem(0.0),
            Self::Psr => advantages.lower_equal_elem(0.0),
        };
        // NaN advantages can only sit under the mask, where the value is 0 already.
        mask.mask_fill(drop, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::{
        policy::PolicyInputs,
        ppo_clip::PpoClipConfig,
        testutil::{scalar, t1, t2},
    };

    goodhart_core::backend_test! {
        fn filters_by_advantage_sign<B>(device) {
            let adv = t2::<B>(vec![1.0, -1.0, 0.0, -2.0, -2.0, f32::NAN], 2, 3, device);
            let mask = t2::<B>(vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 2, 3, device);
            let f = |s: SampleFilter| values(s.apply(&adv, &mask).unwrap());
            assert_close(&f(SampleFilter::All), &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0], 0.0);
            // zero advantage is in neither; masked tokens stay masked.
            assert_close(&f(SampleFilter::Nsr), &[0.0, 1.0, 0.0, 1.0, 0.0, 0.0], 0.0);
            assert_close(&f(SampleFilter::Psr), &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0.0);
            let per = t1::<B>(vec![0.5, -0.5], device);
            let rows = |s: SampleFilter| values(s.apply_per_response(&per, &mask).unwrap());
            assert_close(&rows(SampleFilter::Nsr), &[0.0, 0.0, 0.0, 1.0, 0.0, 0.0], 0.0);
            assert_close(&rows(SampleFilter::Psr), &[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], 0.0);
            assert!(matches!(
                SampleFilter::Nsr.apply_per_response(&t1::<B>(vec![1.0], device), &mask),
                Err(GoodhartError::ShapeMismatch { .. })
            ));
            let nan_adv = t2::<B>(vec![f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0], 2, 3, device);
            assert!(matches!(SampleFilter::Nsr.apply(&nan_adv, &mask), Err(GoodhartError::NonFinite { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn nsr_with_ppo_trains_on_negatives_only<B>(device) {
            // Outcome advantages broadcast to tokens: responses +1, -0.5, -2 (two tokens each).
            // At ratio 1 PPO's loss is -token_mean(A) over the kept tokens:
            //   NSR keeps the last four: -(-0.5*2 - 2*2)/4 = 1.25; PSR keeps two: -1.
            let adv = t2::<B>(vec![1.0, 1.0, -0.5, -0.5, -2.0, -2.0], 3, 2, device);
            let mask = Tensor::<B, 2>::ones([3, 2], device);
            let lp = Tensor::<B, 2>::zeros([3, 2], device);
            let loss = |s: SampleFilter| {
                let m = s.apply(&adv, &mask).unwrap();
                let x = PolicyInputs::new(lp.clone(), lp.clone(), adv.clone(), m).unwrap();
                scalar(PpoClipConfig::default().loss(&x).unwrap().loss)
            };
            let tol = tolerance(1e-6);
            assert_close(&[loss(SampleFilter::Nsr)], &[1.25], tol);
            assert_close(&[loss(SampleFilter::Psr)], &[-1.0], tol);
            assert_close(&[loss(SampleFilter::All)], &[0.5], tol); // -(2 - 1 - 4)/6
        }
    }

    #[test]
    fn names_match_serde_and_registry() {
        for (info, f) in
            REGISTRY
                .iter()
                .zip([SampleFilter::All, SampleFilter::Nsr, SampleFilter::Psr])
        {
            assert_eq!(info.name, f.name());
            #[derive(Deserialize)]
            struct W {
                filter: SampleFilter,
            }
            let w: W = toml::from_str(&format!("filter = \"{}\"", info.name)).unwrap();
            assert_eq!(w.filter, f);
        }
    }
}
