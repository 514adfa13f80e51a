//! PPO-clip with an asymmetric clip range (DAPO clip-higher) and dual-clip.
//!
//! Per token, with `r = exp(clamp(lp - lp_old, -20, 20))`:
//!
//! ```text
//! L_clip = max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))          (PPO, eq. 7)
//! L      = min(L_clip, -A c)   if A < 0 and dual-clip is on           (dual-clip PPO)
//!        = L_clip              otherwise
//! loss   = aggregation(L, m)
//! ```
//!
//! Sources: Schulman et al. 2017 (PPO); Yu et al. 2025 (DAPO: decoupled `eps_low`,
//! `eps_high`, clip-higher 0.28); Ye et al. 2020 (dual-clip, `c = 3`). Checked against
//! verl's `compute_policy_loss_vanilla`, TRL's `GRPOTrainer` and OpenRLHF's `PolicyLoss`.

use burn::tensor::backend::Backend;
use goodhart_core::{aggregate::LossAggregation, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{check_clip_range, PolicyInputs, PolicyLoss, PolicyMetrics};

/// PPO-clip settings.
///
/// Defaults: `eps_low = eps_high = 0.2` (verl `clip_ratio`, TRL `epsilon`, OpenRLHF
/// `eps_clip`; set `eps_high = 0.28` for DAPO's clip-higher); dual-clip on with `c = 3`
/// (verl's vanilla loss always applies it with `clip_ratio_c = 3.0`; TRL has no dual-clip,
/// OpenRLHF has it off by default: set `dual_clip = false` to match them); aggregation
/// `token-mean` (verl and DAPO).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PpoClipConfig {
    /// Lower clip: the ratio is clipped below at `1 - eps_low`.
    pub eps_low: f32,
    /// Upper clip: the ratio is clipped above at `1 + eps_high`.
    pub eps_high: f32,
    /// Whether to bound the loss of negative-advantage tokens by `-A c` (dual-clip).
    pub dual_clip: bool,
    /// Dual-clip constant `c` (> 1).
    pub clip_ratio_c: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for PpoClipConfig {
    fn default() -> Self {
        Self {
            eps_low: 0.2,
            eps_high: 0.2,
            dual_clip: true,
            clip_ratio_c: 3.0,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

impl PpoClipConfig {
    /// Errors unless `0 <= eps_low <= 1`, `eps_high >= 0` and (when dual-clip is on)
    /// `c > 1` (verl asserts the same), all finite.
    pub fn validate(&self) -> Result<()> {
        check_clip_range(self.eps_low, self.eps_high)?;
        if self.dual_clip && !(self.clip_ratio_c.is_finite() && self.clip_ratio_c > 1.0) {
            return Err(GoodhartError::invalid(
                "clip_ratio_c",
                format!("dual-clip needs a finite c > 1, got {}", self.clip_ratio_c),
            ));
        }
        Ok(())
    }

    /// The PPO-clip loss and its metrics (clip fractions low/high, dual-clip fraction,
    /// approximate KL). The gradient is zero on tokens where a clip bound is active.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let ratio = inputs.log_ratio().exp();
        let adv = inputs.advantages.clone();
        let unclipped = -adv.clone() * ratio.clone();
        let clipped = -adv.clone() * ratio.clone().clamp(1.0 - self.eps_low, 1.0 + self.eps_high);
        let clip_loss = unclipped.max_pair(clipped);
        let (neg, pos) = inputs.advantage_signs();
        let (per_token, dual) = if self.dual_clip {
            let bound = -adv * self.clip_ratio_c;
            let dual = clip_loss
                .clone()
                .greater(bound.clone())
                .bool_and(neg.clone());
            (
                clip_loss.clone().mask_where(dual.clone(), bound),
                Some(dual),
            )
        } else {
            (clip_loss, None)
        };
        let low = ratio.clone().lower_elem(1.0 - self.eps_low).bool_and(neg);
        let high = ratio.greater_elem(1.0 + self.eps_high).bool_and(pos);
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics: PolicyMetrics::new(inputs, low, high, dual),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};
    use proptest::{
        collection::vec,
        test_runner::{Config, TestRunner},
    };

    use super::*;
    use crate::testutil::{ratio_inputs, scalar, t2};

    // ratios (lp_old = 0, lp = ln r) and advantages; (1, 2) is padding holding NaN.
    const RATIOS: [f32; 6] = [1.5, 0.5, 1.1, 0.7, 4.0, f32::NAN];
    const ADV: [f32; 6] = [1.0, -1.0, 2.0, 1.0, -1.0, 5.0];
    const MASK: [f32; 6] = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0];

    goodhart_core::backend_test! {
        fn hand_computed_vector_and_clip_fractions<B>(device) {
            let inputs = ratio_inputs::<B>(RATIOS.to_vec(), ADV.to_vec(), MASK.to_vec(), 2, 3, device);
            // eps 0.2/0.2, c = 3, per token max(-A r, -A clip(r, 0.8, 1.2)):
            //   r 1.5, A  1: max(-1.5, -1.2) = -1.2   (high clip)
            //   r 0.5, A -1: max( 0.5,  0.8) =  0.8   (low clip)
            //   r 1.1, A  2: max(-2.2, -2.2) = -2.2
            //   r 0.7, A  1: max(-0.7, -0.8) = -0.7   (A > 0 below the range: not clipped)
            //   r 4.0, A -1: max( 4.0,  1.2) =  4.0, dual: min(4.0, 3) = 3.0
            // token-mean: (-1.2 + 0.8 - 2.2 - 0.7 + 3.0) / 5 = -0.06
            let out = PpoClipConfig::default().loss(&inputs).unwrap();
            let tol = tolerance(1e-6);
            assert_close(&values(out.loss), &[-0.06], tol);
            let m = &out.metrics;
            assert_close(&values(m.clip_frac_low.clone()), &[0.2], tol);
            assert_close(&values(m.clip_frac_high.clone()), &[0.2], tol);
            assert_close(&values(m.dual_clip_frac.clone()), &[0.2], tol);
            // k1 = -sum(ln r)/5 = -ln(1.5*0.5*1.1*0.7*4)/5 = -ln(2.31)/5
            assert_close(&values(m.approx_kl_k1.clone()), &[-0.167_449_5], tolerance(1e-5));
            // k3 = sum(r - 1 - ln r)/5 = (7.8 - 5 - ln 2.31)/5
            assert_close(&values(m.approx_kl_k3.clone()), &[0.392_550_5], tolerance(1e-5));

            // Without dual-clip the last token keeps 4.0: (-0.3 - 3.0 + 4.0)/5 = 0.14.
            let no_dual = PpoClipConfig { dual_clip: false, ..Default::default() };
            let out = no_dual.loss(&inputs).unwrap();
            assert_close(&values(out.loss), &[0.14], tol);
            assert_close(&values(out.metrics.dual_clip_frac), &[0.0], 0.0);

            // DAPO clip-higher 0.28: r 1.5 is still clipped, at 1.28: (-1.28 + 0.8 - 2.2 - 0.7 + 3)/5
            let dapo = PpoClipConfig { eps_high: 0.28, ..Default::default() };
            assert_close(&values(dapo.loss(&inputs).unwrap().loss), &[-0.076], tol);

            // seq-mean-token-sum: rows (-1.2 + 0.8 - 2.2) and (-0.7 + 3.0), mean = -0.15
            let seq = PpoClipConfig { aggregation: LossAggregation::SeqMeanTokenSum, ..Default::default() };
            assert_close(&values(seq.loss(&inputs).unwrap().loss), &[-0.15], tol);
        }
    }

    goodhart_core::backend_test! {
        fn gradient_is_zero_on_clipped_tokens<B>(device) {
            type A<B> = Autodiff<B>;
            let lp = t2::<A<B>>(RATIOS.iter().map(|r| r.ln()).collect(), 2, 3, device).require_grad();
            let inputs = PolicyInputs::new(
                lp.clone(),
                Tensor::zeros([2, 3], device),
                t2(ADV.to_vec(), 2, 3, device),
                t2(MASK.to_vec(), 2, 3, device),
            )
            .unwrap();
            let out = PpoClipConfig::default().loss(&inputs).unwrap();
            let grads = out.loss.backward();
            // d/d lp of -A r / 5 is -A r / 5 on unclipped tokens, 0 on clipped,
            // dual-clipped and padded ones (the padded NaN must not leak):
            //   (0,2): -2 * 1.1 / 5 = -0.44     (1,0): -1 * 0.7 / 5 = -0.14
            let g = values(lp.grad(&grads).unwrap());
            assert_close(&g, &[0.0, 0.0, -0.44, -0.14, 0.0, 0.0], tolerance(1e-6));
        }
    }

    goodhart_core::backend_test! {
        fn invariants_hold_for_random_batches<B>(device) {
            let mut runner = TestRunner::new(Config { cases: 48, ..Default::default() });
            let strategy = (vec(-0.15f32..0.15, 12), vec(-3.0f32..3.0, 12), vec(0u8..2, 12), vec(-50.0f32..50.0, 12));
            runner
                .run(&strategy, |(d, adv, m, garbage)| {
                    let mask: Vec<f32> = m.iter().map(|&x| x as f32).collect();
                    let n: f32 = mask.iter().sum::<f32>().max(1e-8);
                    let cfg = PpoClipConfig::default();
                    // |d| < 0.15 keeps r inside [0.8, 1.2]: nothing is clipped and the loss
                    // is the token mean of -A r.
                    let want: f32 = (0..12).map(|i| -adv[i] * d[i].exp() * mask[i]).sum::<f32>() / n;
                    let make = |lp: Vec<f32>| {
                        PolicyInputs::new(
                            t2::<B>(lp, 3, 4, device),
                            Tensor::zeros([3, 4], device),
                            t2(adv.clone(), 3, 4, device),
                            t2(mask.clone(), 3, 4, device),
                        )
                        .unwrap()
                    };
                    let out = cfg.loss(&make(d.clone())).unwrap();
                    let got = scalar(out.loss.clone());
                    assert!((got - want).abs() <= tolerance(1e-5), "{got} vs {want}");
                    assert_eq!(scalar(out.metrics.clip_frac_low.clone()), 0.0);
                    assert_eq!(scalar(out.metrics.clip_frac_high.clone()), 0.0);
                    // Garbage (and NaN) at masked positions changes nothing.
                    let dirty: Vec<f32> = (0..12)
                        .map(|i| if mask[i] == 0.0 { if i % 2 == 0 { f32::NAN } else { garbage[i] } } else { d[i] })
                        .collect();
                    assert_eq!(scalar(cfg.loss(&make(dirty)).unwrap().loss), got);
                    // ratio 1 everywhere: loss = -token_mean(A), no clipping, zero KL.
                    let out = cfg.loss(&make(vec![0.0; 12])).unwrap();
                    let mean_adv: f32 = (0..12).map(|i| adv[i] * mask[i]).sum::<f32>() / n;
                    assert!((scalar(out.loss) + mean_adv).abs() <= tolerance(1e-5));
                    assert_eq!(scalar(out.metrics.clip_frac_low), 0.0);
                    assert_eq!(scalar(out.metrics.clip_frac_high), 0.0);
                    assert_eq!(scalar(out.metrics.dual_clip_frac), 0.0);
                    assert!(scalar(out.metrics.approx_kl_k3).abs() <= 1e-6);
                    Ok(())
                })
                .unwrap();
        }
    }

    goodhart_core::backend_test! {
        fn bad_input_is_a_typed_error<B>(device) {
            let z = |b, t| Tensor::<B, 2>::zeros([b, t], device);
            let e = PolicyInputs::new(z(2, 3), z(2, 3), z(2, 2), z(2, 3)).unwrap_err();
            assert!(matches!(e, GoodhartError::ShapeMismatch { .. }), "{e}");
            let nan = t2::<B>(vec![0.0, f32::NAN], 1, 2, device);
            let ones = t2::<B>(vec![1.0, 1.0], 1, 2, device);
            let e = PolicyInputs::new(nan.clone(), z(1, 2), z(1, 2), ones).unwrap_err();
            assert_eq!(e, GoodhartError::NonFinite { what: "logp".into() });
            let e = PolicyInputs::new(z(0, 3), z(0, 3), z(0, 3), z(0, 3)).unwrap_err();
            assert!(matches!(e, GoodhartError::Empty { .. }));
            let ok = PolicyInputs::new(z(1, 2), z(1, 2), z(1, 2), z(1, 2)).unwrap();
            for bad in [
                PpoClipConfig { eps_low: 1.5, ..Default::default() },
                PpoClipConfig { eps_high: -0.1, ..Default::default() },
                PpoClipConfig { clip_ratio_c: 1.0, ..Default::default() },
                PpoClipConfig { eps_high: f32::NAN, ..Default::default() },
            ] {
                assert!(matches!(bad.loss(&ok), Err(GoodhartError::InvalidArgument { .. })), "{bad:?}");
            }
        }
    }
}
