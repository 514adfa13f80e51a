//! A2TGPO's turn-level surrogate: a turn-level importance ratio and a clip range scaled
//! per turn from the turn's normalised signal (METHODS-labs.md section 3).
//!
//! Per token of turn `k` of response `i`, with `d = clamp(lp - lp_old, -20, 20)`:
//!
//! ```text
//! r = exp(lp - sg(lp) + sg(min(mean_{tokens of turn k} d, 10)))   turn-level ratio
//! c = 1 + beta (2 sigmoid(z_{i,k}) - 1)        (1 on fixed turns: the answer turn)
//! L = max(-A r, -A clip(r, 1 - eps_low c, 1 + eps_high c))
//! loss = aggregation(L, m)
//! ```
//!
//! `r` takes the value of the turn's geometric-mean ratio and each token's own gradient;
//! `z_{i,k}` is the turn's signal z-scored within its (prompt, turn index) group
//! (`goodhart_advantage::a2tgpo::turn_zscores`), so turns that gained more get a wider
//! range (`c` in `(1 - beta, 1 + beta)`). Defaults from the method's script: `eps_low =
//! 3e-3`, `eps_high = 4e-3` (GSPO's turn scale), `beta = 0.3`, token-mean.

use burn::tensor::{activation::sigmoid, backend::Backend, Int, Tensor};
use goodhart_core::{aggregate::LossAggregation, GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::policy::{check_clip_range, PolicyInputs, PolicyLoss, PolicyMetrics};

/// The largest turn-level log-ratio (the method's clamp).
const TURN_LOG_RATIO_MAX: f32 = 10.0;

/// Settings of [`TurnClipConfig::loss`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnClipConfig {
    /// Lower clip before scaling.
    pub eps_low: f32,
    /// Upper clip before scaling.
    pub eps_high: f32,
    /// How far a turn's signal moves its range: `c` in `(1 - beta, 1 + beta)`, in `[0, 1)`.
    pub beta: f32,
    /// How per-token losses become one scalar.
    pub aggregation: LossAggregation,
}

impl Default for TurnClipConfig {
    fn default() -> Self {
        Self {
            eps_low: 3e-3,
            eps_high: 4e-3,
            beta: 0.3,
            aggregation: LossAggregation::TokenMean,
        }
    }
}

/// The turn structure the loss reads ([`PolicyInputs::with_turns`]).
#[derive(Debug, Clone)]
pub struct TurnInputs<B: Backend> {
    /// `[B, T]`: each token's turn (read only where the mask is set).
    pub token_turn: Tensor<B, 2, Int>,
    /// `[B, K]`: each turn's normalised signal.
    pub turn_z: Tensor<B, 2>,
    /// `[B, K]`: 1 on turns whose range is not scaled (`c = 1`: the answer turn).
    pub fixed: Tensor<B, 2>,
}

impl TurnClipConfig {
    /// Errors unless the clip range is valid and `0 <= beta < 1`.
    pub fn validate(&self) -> Result<()> {
        check_clip_range(self.eps_low, self.eps_high)?;
        if !(self.beta.is_finite() && (0.0..1.0).contains(&self.beta)) {
            return Err(GoodhartError::invalid(
                "beta",
                format!("must lie in [0, 1), got {}", self.beta),
            ));
        }
        Ok(())
    }

    /// Each token's scale `c` `[B, T]` (see the module docs).
    pub fn clip_scale<B: Backend>(&self, turns: &TurnInputs<B>) -> Tensor<B, 2> {
        let k = turns.turn_z.dims()[1];
        let c = (sigmoid(turns.turn_z.clone()) * 2.0 - 1.0) * self.beta + 1.0;
        let c = c.mask_fill(turns.fixed.clone().greater_elem(0.5), 1.0);
        c.gather(1, turns.token_turn.clone().clamp(0, k as i64 - 1))
    }

    /// The loss and its metrics (clip fractions low and high, approximate KL). Errors
    /// when the inputs carry no turns.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        self.validate()?;
        let turns = inputs.turns.as_ref().ok_or_else(|| {
            GoodhartError::invalid(
                "loss",
                "`a2tgpo_clip` needs each token's turn (a multi-turn task)",
            )
        })?;
        let [b, t] = inputs.logp.dims();
        let k = turns.turn_z.dims()[1];
        let device = inputs.logp.device();
        let index = turns.token_turn.clone().clamp(0, k as i64 - 1);
        // One-hot turn of each counted token, [B, T, K].
        let ks = Tensor::<B, 1, Int>::arange(0..k as i64, &device).reshape([1, 1, k]);
        let onehot = index.clone().reshape([b, t, 1]).equal(ks).float()
            * inputs.mask.clone().reshape([b, t, 1]);
        let d = inputs.log_ratio().detach().reshape([b, t, 1]);
        let sums = (d * onehot.clone()).sum_dim(1).reshape([b, k]);
        let counts = onehot.sum_dim(1).reshape([b, k]).clamp_min(1.0);
        let turn_log_ratio = (sums / counts)
            .clamp_max(TURN_LOG_RATIO_MAX)
            .gather(1, index);
        let lp = inputs.logp.clone();
        let ratio = (lp.clone() - lp.detach() + turn_log_ratio).exp();
        let c = self.clip_scale(turns);
        let lo = -(c.clone() * self.eps_low) + 1.0;
        let hi = c * self.eps_high + 1.0;
        let adv = inputs.advantages.clone();
        let clipped = ratio.clone().max_pair(lo.clone()).min_pair(hi.clone());
        let per_token = (-adv.clone() * ratio.clone()).max_pair(-adv * clipped);
        let (neg, pos) = inputs.advantage_signs();
        let low = ratio.clone().lower(lo).bool_and(neg);
        let high = ratio.greater(hi).bool_and(pos);
        Ok(PolicyLoss {
            loss: inputs.aggregate(self.aggregation, per_token)?,
            metrics: PolicyMetrics::new(inputs, low, high, None),
        })
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::TensorData;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    use super::*;
    use crate::testutil::{ratio_inputs, scalar, t2};

    fn turns<B: Backend>(z: [f32; 2], fixed: [f32; 2], device: &B::Device) -> TurnInputs<B> {
        TurnInputs {
            token_turn: Tensor::from_data(TensorData::new(vec![0i64, 0, 1], [1, 3]), device),
            turn_z: t2(z.to_vec(), 1, 2, device),
            fixed: t2(fixed.to_vec(), 1, 2, device),
        }
    }

    goodhart_core::backend_test! {
        fn turn_ratio_and_scaled_range_by_hand<B>(device) {
            // One response, tokens of turns 0, 0, 1; ratios 1.1, 1.3 (turn 0) and 0.9.
            // Turn 0's ratio is exp(mean(ln 1.1, ln 1.3)) = sqrt(1.43) = 1.195826.
            // z = (2, -1), beta 0.3: c0 = 1 + 0.3 (2 sigmoid(2) - 1) = 1.228478,
            // c1 = 1 + 0.3 (2 sigmoid(-1) - 1) = 0.861364. eps 0.1 / 0.1:
            //   turn 0: [0.877152, 1.122848]; r 1.195826, A 1 -> clipped: -1.122848 (twice)
            //   turn 1: [0.913864, 1.086136]; r 0.9, A -1 -> max(0.9, 0.913864) = 0.913864
            // token-mean: (-2 * 1.122848 + 0.913864) / 3 = -0.443944.
            let cfg = TurnClipConfig { eps_low: 0.1, eps_high: 0.1, ..Default::default() };
            let inputs = ratio_inputs::<B>(vec![1.1, 1.3, 0.9], vec![1.0, 1.0, -1.0], vec![1.0; 3], 1, 3, device)
                .with_turns(turns([2.0, -1.0], [0.0, 0.0], device))
                .unwrap();
            let c = values(cfg.clip_scale(inputs.turns.as_ref().unwrap()));
            assert_close(&c, &[1.228_478, 1.228_478, 0.861_364], tolerance(1e-5));
            let out = cfg.loss(&inputs).unwrap();
            assert_close(&values(out.loss), &[-0.443_944], tolerance(1e-5));
            assert_close(&values(out.metrics.clip_frac_high.clone()), &[2.0 / 3.0], tolerance(1e-6));
            assert_close(&values(out.metrics.clip_frac_low.clone()), &[1.0 / 3.0], tolerance(1e-6));
            // A fixed turn keeps c = 1.
            let fixed = ratio_inputs::<B>(vec![1.1, 1.3, 0.9], vec![1.0, 1.0, -1.0], vec![1.0; 3], 1, 3, device)
                .with_turns(turns([2.0, -1.0], [0.0, 1.0], device))
                .unwrap();
            assert_close(&values(cfg.clip_scale(fixed.turns.as_ref().unwrap())), &[1.228_478, 1.228_478, 1.0], tolerance(1e-5));
            // Without turns: an error naming the need.
            let plain = ratio_inputs::<B>(vec![1.0; 3], vec![1.0; 3], vec![1.0; 3], 1, 3, device);
            assert!(cfg.loss(&plain).unwrap_err().to_string().contains("turn"));
            assert!(TurnClipConfig { beta: 1.0, ..Default::default() }.validate().is_err());
        }
    }

    /// Inside the range, each token's gradient is `-A r / n` with `r` its turn's ratio.
    #[test]
    fn unclipped_gradient_is_the_turn_ratio() {
        type A = Autodiff<goodhart_core::device::Dispatch>;
        let device = goodhart_core::device::cpu();
        let lp = t2::<A>(vec![1.1f32.ln(), 1.3f32.ln(), 0.9f32.ln()], 1, 3, &device).require_grad();
        let inputs = PolicyInputs::new(
            lp.clone(),
            Tensor::zeros([1, 3], &device),
            t2(vec![1.0, 2.0, -1.0], 1, 3, &device),
            t2(vec![1.0; 3], 1, 3, &device),
        )
        .unwrap()
        .with_turns(turns([0.0, 0.0], [0.0, 0.0], &device))
        .unwrap();
        let cfg = TurnClipConfig {
            eps_low: 0.5,
            eps_high: 0.5,
            ..Default::default()
        };
        let loss = cfg.loss(&inputs).unwrap().loss;
        let r0 = (1.1f32 * 1.3).sqrt();
        assert!((scalar(loss.clone().inner()) - (-(r0 + 2.0 * r0) + 0.9) / 3.0).abs() < 1e-5);
        let g = lp.grad(&loss.backward()).unwrap();
        assert_close(
            &values(g),
            &[-r0 / 3.0, -2.0 * r0 / 3.0, 0.9 / 3.0],
            tolerance(1e-5),
        );
    }
}
