//! Preference losses over (chosen, rejected) pairs: DPO, IPO, SLiC hinge, RPO.
//!
//! Inputs are per-sequence log-probabilities (the sum over response tokens) of the chosen
//! and rejected responses under the policy (`lp_c`, `lp_r`, carry the gradient) and the
//! frozen reference (`lr_c`, `lr_r`). With `x = (lp_c - lr_c) - (lp_r - lr_r)`:
//!
//! | kind | per-pair loss | `beta` means |
//! |---|---|---|
//! | `dpo` | `-(1-e) log sig(beta x) - e log sig(-beta x)` | inverse KL strength (TRL default 0.1) |
//! | `ipo` | `(x - 1/(2 beta))^2` | IPO's `tau`: the target margin is `1/(2 beta)`, so a *larger* beta means a *smaller* margin, the opposite of DPO's sharpness |
//! | `slic` | `max(0, delta - (lp_c - lp_r)) + lambda NLL(chosen)` | (none; margin `delta`) |
//! | `rpo` | DPO + `alpha` NLL(chosen) | as DPO |
//!
//! `e` is cDPO's label smoothing (TRL `label_smoothing`). NLL(chosen) is the per-token
//! negative log-likelihood of the chosen responses, `-sum(lp_c) / sum(|y_c|)` over the
//! batch (TRL's RPO: a cross-entropy averaged over all chosen tokens). The batch loss is
//! the mean over pairs (plus the NLL term).
//!
//! Metrics (TRL's `rewards/*`): implicit rewards `beta (lp - lr)` for chosen and rejected
//! (`beta = 1` for SLiC, which has none), their margin, and the reward accuracy
//! `mean(1[r_c > r_r])`.

use burn::tensor::{
    activation::{log_sigmoid, relu},
    backend::Backend,
    cast::ToElement,
    Tensor,
};
use goodhart_core::{
    ops::{check_finite, check_same_shape},
    registry::MethodInfo,
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// Per-sequence log-probabilities of a batch of preference pairs, `[N]` each, checked.
#[derive(Debug, Clone)]
pub struct PreferenceInputs<B: Backend> {
    /// `lp_c`: policy log-prob of each chosen response (sum over its tokens).
    pub policy_chosen: Tensor<B, 1>,
    /// `lp_r`: policy log-prob of each rejected response.
    pub policy_rejected: Tensor<B, 1>,
    /// `lr_c`: reference log-prob of each chosen response (no gradient).
    pub reference_chosen: Tensor<B, 1>,
    /// `lr_r`: reference log-prob of each rejected response (no gradient).
    pub reference_rejected: Tensor<B, 1>,
    /// Token counts `|y_c|`, `|y_r|`: needed by RPO and SLiC's regulariser (per-token
    /// NLL) and by IPO's length normalisation. Set with [`PreferenceInputs::with_lengths`].
    pub lengths: Option<(Tensor<B, 1>, Tensor<B, 1>)>,
}

impl<B: Backend> PreferenceInputs<B> {
    /// Checks that the four tensors share one non-empty shape and are finite.
    pub fn new(
        policy_chosen: Tensor<B, 1>,
        policy_rejected: Tensor<B, 1>,
        reference_chosen: Tensor<B, 1>,
        reference_rejected: Tensor<B, 1>,
    ) -> Result<Self> {
        let all = [
            (&policy_chosen, "policy_chosen"),
            (&policy_rejected, "policy_rejected"),
            (&reference_chosen, "reference_chosen"),
            (&reference_rejected, "reference_rejected"),
        ];
        if policy_chosen.dims()[0] == 0 {
            return Err(GoodhartError::Empty {
                what: "policy_chosen".into(),
            });
        }
        for (t, name) in all {
            check_same_shape(&policy_chosen, "policy_chosen", t, name)?;
            check_finite(t, name)?;
        }
        Ok(Self {
            reference_chosen: reference_chosen.detach(),
            reference_rejected: reference_rejected.detach(),
            policy_chosen,
            policy_rejected,
            lengths: None,
        })
    }

    /// Adds the token counts of the chosen and rejected responses (each `[N]`, >= 1).
    pub fn with_lengths(mut self, chosen: Tensor<B, 1>, rejected: Tensor<B, 1>) -> Result<Self> {
        for (t, name) in [(&chosen, "chosen_lengths"), (&rejected, "rejected_lengths")] {
            check_same_shape(&self.policy_chosen, "policy_chosen", t, name)?;
            check_finite(t, name)?;
            if t.clone().lower_elem(1.0).any().into_scalar().to_bool() {
                return Err(GoodhartError::invalid(
                    name,
                    "every response needs >= 1 token",
                ));
            }
        }
        self.lengths = Some((chosen, rejected));
        Ok(self)
    }

    /// `x = (lp_c - lr_c) - (lp_r - lr_r)`, per pair.
    pub fn log_ratio_margin(&self) -> Tensor<B, 1> {
        self.chosen_log_ratio() - self.rejected_log_ratio()
    }

    fn chosen_log_ratio(&self) -> Tensor<B, 1> {
        self.policy_chosen.clone() - self.reference_chosen.clone()
    }

    fn rejected_log_ratio(&self) -> Tensor<B, 1> {
        self.policy_rejected.clone() - self.reference_rejected.clone()
    }

    fn lengths(&self, method: &str) -> Result<&(Tensor<B, 1>, Tensor<B, 1>)> {
        self.lengths.as_ref().ok_or_else(|| {
            GoodhartError::invalid(
                "lengths",
                format!("{method} needs the token counts: call PreferenceInputs::with_lengths"),
            )
        })
    }

    /// Per-token NLL of the chosen responses over the batch: `-sum(lp_c) / sum(|y_c|)`.
    pub fn chosen_nll(&self, method: &str) -> Result<Tensor<B, 1>> {
        let (len_c, _) = self.lengths(method)?;
        Ok(-self.policy_chosen.clone().sum() / len_c.clone().sum())
    }
}

/// A preference loss with TRL-style metrics.
#[derive(Debug, Clone)]
pub struct PreferenceLoss<B: Backend> {
    /// One-element differentiable loss (mean over pairs, plus any NLL term).
    pub loss: Tensor<B, 1>,
    /// Per-pair loss before the mean (without the batch-level NLL term), `[N]`.
    pub per_pair: Tensor<B, 1>,
    /// Mean implicit reward of the chosen responses, `beta (lp_c - lr_c)`. Detached.
    pub chosen_reward: Tensor<B, 1>,
    /// Mean implicit reward of the rejected responses, `beta (lp_r - lr_r)`. Detached.
    pub rejected_reward: Tensor<B, 1>,
    /// Mean of `chosen - rejected` implicit rewards. Detached.
    pub margin: Tensor<B, 1>,
    /// Fraction of pairs whose chosen implicit reward is strictly the larger. Detached.
    pub accuracy: Tensor<B, 1>,
}

impl<B: Backend> PreferenceLoss<B> {
    fn new(
        inputs: &PreferenceInputs<B>,
        per_pair: Tensor<B, 1>,
        beta: f32,
        extra: Option<Tensor<B, 1>>,
    ) -> Self {
        let chosen = inputs.chosen_log_ratio().detach() * beta;
        let rejected = inputs.rejected_log_ratio().detach() * beta;
        let mut loss = per_pair.clone().mean();
        if let Some(e) = extra {
            loss = loss + e;
        }
        Self {
            loss,
            per_pair,
            accuracy: chosen.clone().greater(rejected.clone()).float().mean(),
            margin: (chosen.clone() - rejected.clone()).mean(),
            chosen_reward: chosen.mean(),
            rejected_reward: rejected.mean(),
        }
    }
}

fn check_beta(beta: f32) -> Result<()> {
    if beta.is_finite() && beta > 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            "beta",
            format!("must be finite and > 0, got {beta}"),
        ))
    }
}

fn check_weight(name: &str, w: f32) -> Result<()> {
    if w.is_finite() && w >= 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be finite and >= 0, got {w}"),
        ))
    }
}

/// `-(1-e) log sig(beta x) - e log sig(-beta x)`, per pair.
fn dpo_per_pair<B: Backend>(x: Tensor<B, 1>, beta: f32, label_smoothing: f32) -> Tensor<B, 1> {
    let z = x * beta;
    let loss = -log_sigmoid(z.clone()) * (1.0 - label_smoothing);
    if label_smoothing > 0.0 {
        loss - log_sigmoid(-z) * label_smoothing
    } else {
        loss
    }
}

/// DPO (Rafailov et al. 2023), with cDPO label smoothing.
///
/// Defaults: `beta = 0.1`, `label_smoothing = 0` (TRL `DPOConfig`; OpenRLHF also 0.1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DpoConfig {
    /// Inverse strength of the implicit KL constraint (> 0).
    pub beta: f32,
    /// cDPO / robust-label smoothing `e` in `[0, 0.5]`: the probability that a label is
    /// flipped (TRL `label_smoothing`).
    pub label_smoothing: f32,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            label_smoothing: 0.0,
        }
    }
}

impl DpoConfig {
    /// Errors unless `beta > 0` and `0 <= label_smoothing <= 0.5`.
    pub fn validate(&self) -> Result<()> {
        check_beta(self.beta)?;
        if !(0.0..=0.5).contains(&self.label_smoothing) {
            return Err(GoodhartError::invalid(
                "label_smoothing",
                format!("must lie in [0, 0.5], got {}", self.label_smoothing),
            ));
        }
        Ok(())
    }

    /// The DPO loss `mean(-(1-e) log sig(beta x) - e log sig(-beta x))`.
    pub fn loss<B: Backend>(&self, inputs: &PreferenceInputs<B>) -> Result<PreferenceLoss<B>> {
        self.validate()?;
        let per_pair = dpo_per_pair(inputs.log_ratio_margin(), self.beta, self.label_smoothing);
        Ok(PreferenceLoss::new(inputs, per_pair, self.beta, None))
    }
}

/// IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
/// Preferences"): regress the log-ratio margin onto `1/(2 beta)`.
///
/// `beta` is IPO's `tau`; the loss is minimised at `x = 1/(2 beta)`. Defaults:
/// `beta = 0.1` (TRL), `length_normalize = true`: TRL's IPO averages each response's
/// log-probs over its tokens (policy and reference) before forming `x`; this needs
/// [`PreferenceInputs::with_lengths`]. With `false`, `x` uses the sums as given (the paper).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IpoConfig {
    /// IPO's regularisation `tau` (> 0); target margin `1/(2 beta)`.
    pub beta: f32,
    /// Use per-token mean log-probs (TRL) instead of sums.
    pub length_normalize: bool,
}

impl Default for IpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            length_normalize: true,
        }
    }
}

impl IpoConfig {
    /// Errors unless `beta > 0`.
    pub fn validate(&self) -> Result<()> {
        check_beta(self.beta)
    }

    /// The IPO loss `mean((x - 1/(2 beta))^2)`.
    pub fn loss<B: Backend>(&self, inputs: &PreferenceInputs<B>) -> Result<PreferenceLoss<B>> {
        self.validate()?;
        let x = if self.length_normalize {
            let (len_c, len_r) = inputs.lengths("ipo with length_normalize")?;
            inputs.chosen_log_ratio() / len_c.clone() - inputs.rejected_log_ratio() / len_r.clone()
        } else {
            inputs.log_ratio_margin()
        };
        let per_pair = (x - 1.0 / (2.0 * self.beta)).powi_scalar(2);
        Ok(PreferenceLoss::new(inputs, per_pair, self.beta, None))
    }
}

/// SLiC-HF hinge (Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human
/// Feedback"): `max(0, delta - (lp_c - lp_r))`, optionally `+ lambda NLL(chosen)`.
///
/// The paper's calibration loss uses no reference model; its regulariser is the NLL of a
/// target sequence, here the chosen response. Defaults: `delta = 1.0` (the paper),
/// `reg_weight = 0` (no regulariser; needs lengths when > 0). TRL's `loss_type = "hinge"`
/// is a different, reference-relative form `max(0, 1 - beta x)`; it equals `beta` times
/// this hinge applied to `x` with `delta = 1/beta`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SlicConfig {
    /// Margin `delta` (>= 0).
    pub delta: f32,
    /// Weight `lambda` of the chosen-response NLL regulariser (>= 0).
    pub reg_weight: f32,
}

impl Default for SlicConfig {
    fn default() -> Self {
        Self {
            delta: 1.0,
            reg_weight: 0.0,
        }
    }
}

impl SlicConfig {
    /// Errors unless `delta` and `reg_weight` are finite and >= 0.
    pub fn validate(&self) -> Result<()> {
        check_weight("delta", self.delta)?;
        check_weight("reg_weight", self.reg_weight)
    }

    /// The SLiC loss `mean(max(0, delta - (lp_c - lp_r))) + lambda NLL(chosen)`.
    pub fn loss<B: Backend>(&self, inputs: &PreferenceInputs<B>) -> Result<PreferenceLoss<B>> {
        self.validate()?;
        let diff = inputs.policy_chosen.clone() - inputs.policy_rejected.clone();
        let per_pair = relu(-diff + self.delta);
        let reg = if self.reg_weight > 0.0 {
            Some(inputs.chosen_nll("slic with reg_weight > 0")? * self.reg_weight)
        } else {
            None
        };
        Ok(PreferenceLoss::new(inputs, per_pair, 1.0, reg))
    }
}

/// RPO (Liu et al. 2024, "Provably Mitigating Overoptimization in RLHF"): DPO plus `alpha`
/// times the per-token NLL of the chosen responses, which anchors the policy to the
/// preferred data and counters the likelihood decrease DPO causes.
///
/// Defaults: `beta = 0.1` (TRL), `alpha = 1.0` (TRL's `rpo_alpha` recommendation, from the
/// paper), `label_smoothing = 0`. Needs [`PreferenceInputs::with_lengths`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RpoConfig {
    /// DPO's `beta` (> 0).
    pub beta: f32,
    /// Weight `alpha` of the SFT NLL term (>= 0).
    pub alpha: f32,
    /// cDPO label smoothing, as [`DpoConfig::label_smoothing`].
    pub label_smoothing: f32,
}

impl Default for RpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            alpha: 1.0,
            label_smoothing: 0.0,
        }
    }
}

impl RpoConfig {
    /// Errors unless `beta > 0`, `alpha >= 0`, `0 <= label_smoothing <= 0.5`.
    pub fn validate(&self) -> Result<()> {
        check_weight("alpha", self.alpha)?;
        self.dpo().validate()
    }

    fn dpo(&self) -> DpoConfig {
        DpoConfig {
            beta: self.beta,
            label_smoothing: self.label_smoothing,
        }
    }

    /// The RPO loss `DPO + alpha NLL(chosen)`.
    pub fn loss<B: Backend>(&self, inputs: &PreferenceInputs<B>) -> Result<PreferenceLoss<B>> {
        self.validate()?;
        let nll = inputs.chosen_nll("rpo")? * self.alpha;
        let per_pair = dpo_per_pair(inputs.log_ratio_margin(), self.beta, self.label_smoothing);
        Ok(PreferenceLoss::new(inputs, per_pair, self.beta, Some(nll)))
    }
}

/// Which preference loss to use; TOML `kind = "dpo" | "ipo" | "slic" | "rpo"`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PreferenceLossConfig {
    /// [`DpoConfig`].
    Dpo(DpoConfig),
    /// [`IpoConfig`].
    Ipo(IpoConfig),
    /// [`SlicConfig`].
    Slic(SlicConfig),
    /// [`RpoConfig`].
    Rpo(RpoConfig),
}

impl Default for PreferenceLossConfig {
    /// DPO with TRL's defaults.
    fn default() -> Self {
        Self::Dpo(DpoConfig::default())
    }
}

impl PreferenceLossConfig {
    /// The registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Dpo(_) => "dpo",
            Self::Ipo(_) => "ipo",
            Self::Slic(_) => "slic",
            Self::Rpo(_) => "rpo",
        }
    }

    /// The loss with its `beta` set (DPO, cDPO, IPO, RPO); `None` for SLiC, which has
    /// none.
    pub fn with_beta(self, beta: f32) -> Option<Self> {
        match self {
            Self::Dpo(c) => Some(Self::Dpo(DpoConfig { beta, ..c })),
            Self::Ipo(c) => Some(Self::Ipo(IpoConfig { beta, ..c })),
            Self::Rpo(c) => Some(Self::Rpo(RpoConfig { beta, ..c })),
            Self::Slic(_) => None,
        }
    }

    /// Errors if a parameter is out of range.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Dpo(c) => c.validate(),
            Self::Ipo(c) => c.validate(),
            Self::Slic(c) => c.validate(),
            Self::Rpo(c) => c.validate(),
        }
    }

    /// Computes the chosen loss.
    pub fn loss<B: Backend>(&self, inputs: &PreferenceInputs<B>) -> Result<PreferenceLoss<B>> {
        match self {
            Self::Dpo(c) => c.loss(inputs),
            Self::Ipo(c) => c.loss(inputs),
            Self::Slic(c) => c.loss(inputs),
            Self::Rpo(c) => c.loss(inputs),
        }
    }
}

/// The preference-loss registry.
pub const REGISTRY: &[MethodInfo] = &[
    MethodInfo {
        name: "dpo",
        summary: "-(1-e) log sig(beta x) - e log sig(-beta x), x = (lp_c - lr_c) - (lp_r - lr_r)",
        source: "Rafailov et al. 2023 (DPO); cDPO label smoothing; defaults TRL (beta 0.1)",
    },
    MethodInfo {
        name: "ipo",
        summary: "(x - 1/(2 beta))^2 on length-normalised log-ratios; beta is IPO's tau",
        source: "Azar et al. 2023 (IPO); TRL loss_type = \"ipo\" (beta 0.1, mean log-probs)",
    },
    MethodInfo {
        name: "slic",
        summary: "max(0, delta - (lp_c - lp_r)) + lambda NLL(chosen)",
        source: "Zhao et al. 2023 (SLiC-HF); delta 1",
    },
    MethodInfo {
        name: "rpo",
        summary: "DPO + alpha * per-token NLL of the chosen responses",
        source:
            "Liu et al. 2024 (RPO, Provably Mitigating Overoptimization in RLHF); TRL rpo_alpha 1.0",
    },
];

#[cfg(test)]
mod tests {
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};
    use proptest::{
        collection::vec,
        test_runner::{Config, TestRunner},
    };

    use super::*;
    use crate::testutil::{scalar, t1};

    // Two pairs: x = (lp_c - lr_c) - (lp_r - lr_r) = (0.5 + 0.5, -1 - 1) = (1, -2).
    fn pairs<B: Backend>(lp_c: Tensor<B, 1>, device: &B::Device) -> PreferenceInputs<B> {
        PreferenceInputs::new(
            lp_c,
            t1(vec![-2.0, -1.0], device),
            t1(vec![-1.5, -2.0], device),
            t1(vec![-1.5, -2.0], device),
        )
        .unwrap()
    }

    fn lengths<B: Backend>(p: PreferenceInputs<B>, device: &B::Device) -> PreferenceInputs<B> {
        p.with_lengths(t1(vec![2.0, 4.0], device), t1(vec![1.0, 2.0], device))
            .unwrap()
    }

    goodhart_core::backend_test! {
        fn hand_computed_vectors<B>(device) {
            let x = lengths(pairs(t1::<B>(vec![-1.0, -3.0], device), device), device);
            let tol = tolerance(1e-5);
            // DPO beta 0.1: beta x = (0.1, -0.2); -log sig(0.1) = ln(1 + e^-0.1) = 0.644397,
            // -log sig(-0.2) = ln(1 + e^0.2) = 0.798139; mean 0.721268.
            let dpo = DpoConfig::default().loss(&x).unwrap();
            assert_close(&values(dpo.per_pair.clone()), &[0.644_396_7, 0.798_138_9], tol);
            assert_close(&values(dpo.loss.clone()), &[0.721_267_8], tol);
            // implicit rewards beta (lp - lr): chosen (0.05, -0.1), rejected (-0.05, 0.1)
            assert_close(&values(dpo.chosen_reward), &[-0.025], tol);
            assert_close(&values(dpo.rejected_reward), &[0.025], tol);
            assert_close(&values(dpo.margin), &[-0.05], tol);
            assert_close(&values(dpo.accuracy), &[0.5], 0.0);
            // cDPO e = 0.1: (1-e)(-log sig z) + e(-log sig -z) = -log sig z + e z:
            // 0.644397 + 0.01 = 0.654397, 0.798139 - 0.02 = 0.778139; mean 0.716268.
            let cdpo = DpoConfig { label_smoothing: 0.1, ..Default::default() }.loss(&x).unwrap();
            assert_close(&values(cdpo.loss), &[0.716_267_8], tol);
            // IPO beta 0.5 (target 1) on sums: (1-1)^2, (-2-1)^2 -> mean 4.5.
            let ipo = IpoConfig { beta: 0.5, length_normalize: false }.loss(&x).unwrap();
            assert_close(&values(ipo.loss), &[4.5], tol);
            // Length-normalised (TRL): chosen ratios (0.5, -1)/(2, 4) = (0.25, -0.25),
            // rejected (-0.5, 1)/(1, 2) = (-0.5, 0.5); x = (0.75, -0.75);
            // ((0.75-1)^2 + (-0.75-1)^2)/2 = (0.0625 + 3.0625)/2 = 1.5625.
            let ipo = IpoConfig { beta: 0.5, length_normalize: true }.loss(&x).unwrap();
            assert_close(&values(ipo.loss), &[1.5625], tol);
            // SLiC delta 1: lp_c - lp_r = (1, -2): relu(0), relu(3) -> 1.5;
            // + 0.5 * NLL, NLL = -(-1 - 3)/(2 + 4) = 2/3 -> 1.5 + 1/3.
            assert_close(&values(SlicConfig::default().loss(&x).unwrap().loss), &[1.5], tol);
            let slic = SlicConfig { reg_weight: 0.5, ..Default::default() }.loss(&x).unwrap();
            assert_close(&values(slic.loss), &[1.5 + 1.0 / 3.0], tol);
            // RPO alpha 1: DPO + NLL = 0.721268 + 0.666667.
            assert_close(&values(RpoConfig::default().loss(&x).unwrap().loss), &[1.387_934_4], tol);
        }
    }

    goodhart_core::backend_test! {
        fn dpo_gradient_by_hand<B>(device) {
            // d/d lp_c mean(-log sig(beta x)) = -(beta/N) sig(-beta x):
            //   -0.05 sig(-0.1) = -0.0237510, -0.05 sig(0.2) = -0.0274917.
            let lp_c = t1::<Autodiff<B>>(vec![-1.0, -3.0], device).require_grad();
            let out = DpoConfig::default().loss(&pairs(lp_c.clone(), device)).unwrap();
            let g = values(lp_c.grad(&out.loss.backward()).unwrap());
            assert_close(&g, &[-0.023_751_04, -0.027_491_7], tolerance(1e-6));
            // RPO adds alpha * d/d lp_c(-sum lp_c / 6) = -1/6 to each.
            let lp_c = t1::<Autodiff<B>>(vec![-1.0, -3.0], device).require_grad();
            let out = RpoConfig::default().loss(&lengths(pairs(lp_c.clone(), device), device)).unwrap();
            let g = values(lp_c.grad(&out.loss.backward()).unwrap());
            assert_close(&g, &[-0.023_751_04 - 1.0 / 6.0, -0.027_491_7 - 1.0 / 6.0], tolerance(1e-6));
        }
    }

    goodhart_core::backend_test! {
        fn swap_symmetry_and_ipo_minimum<B>(device) {
            let mut runner = TestRunner::new(Config { cases: 48, ..Default::default() });
            let strategy = (vec(-20.0f32..0.0, 16), 0.01f32..2.0, -3.0f32..3.0);
            runner
                .run(&strategy, |(lp, beta, h)| {
                    let v = |r: std::ops::Range<usize>| t1::<B>(lp[r].to_vec(), device);
                    let fwd = PreferenceInputs::new(v(0..4), v(4..8), v(8..12), v(12..16)).unwrap();
                    let rev = PreferenceInputs::new(v(4..8), v(0..4), v(12..16), v(8..12)).unwrap();
                    let x = values(fwd.log_ratio_margin());
                    let cfg = DpoConfig { beta, label_smoothing: 0.0 };
                    let (a, b) = (values(cfg.loss(&fwd).unwrap().per_pair), values(cfg.loss(&rev).unwrap().per_pair));
                    // -log sig(z) - (-log sig(-z)) = -z, with z = beta x.
                    let want: Vec<f32> = x.iter().map(|x| -beta * x).collect();
                    let got: Vec<f32> = a.iter().zip(&b).map(|(a, b)| a - b).collect();
                    assert_close(&got, &want, tolerance(1e-4));
                    // Swapping flips the accuracy (no ties in random data).
                    let acc = scalar(cfg.loss(&fwd).unwrap().accuracy) + scalar(cfg.loss(&rev).unwrap().accuracy);
                    assert!(x.contains(&0.0) || (acc - 1.0).abs() < 1e-6);
                    // IPO is minimised (at 0) where x = 1/(2 beta): shift the chosen
                    // policy log-prob so that x hits the target, then by h.
                    let target = 1.0 / (2.0 * beta);
                    let ipo = IpoConfig { beta, length_normalize: false };
                    let at = |shift: f32| {
                        let pc: Vec<f32> = (0..4).map(|i| lp[i] - x[i] + target + shift).collect();
                        let p = PreferenceInputs::new(t1(pc, device), v(4..8), v(8..12), v(12..16)).unwrap();
                        values(ipo.loss(&p).unwrap().per_pair)
                    };
                    let tol = tolerance(1e-3) * (1.0 + target * target);
                    assert_close(&at(0.0), &[0.0; 4], tol);
                    assert_close(&at(h), &[h * h; 4], tol);
                    Ok(())
                })
                .unwrap();
        }
    }

    goodhart_core::backend_test! {
        fn bad_input_is_a_typed_error<B>(device) {
            let one = |v: f32| t1::<B>(vec![v, v], device);
            let e = PreferenceInputs::new(one(0.0), t1(vec![0.0], device), one(0.0), one(0.0)).unwrap_err();
            assert!(matches!(e, GoodhartError::ShapeMismatch { .. }), "{e}");
            let e = PreferenceInputs::new(one(0.0), one(0.0), one(f32::NAN), one(0.0)).unwrap_err();
            assert_eq!(e, GoodhartError::NonFinite { what: "reference_chosen".into() });
            let empty = t1::<B>(vec![], device);
            assert!(matches!(
                PreferenceInputs::new(empty.clone(), empty.clone(), empty.clone(), empty),
                Err(GoodhartError::Empty { .. })
            ));
            let x = PreferenceInputs::new(one(-1.0), one(-2.0), one(-1.0), one(-1.0)).unwrap();
            // RPO, SLiC's regulariser and length-normalised IPO need the token counts.
            for cfg in [
                PreferenceLossConfig::Rpo(RpoConfig::default()),
                PreferenceLossConfig::Ipo(IpoConfig::default()),
                PreferenceLossConfig::Slic(SlicConfig { reg_weight: 1.0, ..Default::default() }),
                PreferenceLossConfig::Dpo(DpoConfig { beta: 0.0, ..Default::default() }),
                PreferenceLossConfig::Dpo(DpoConfig { label_smoothing: 0.7, ..Default::default() }),
                PreferenceLossConfig::Rpo(RpoConfig { alpha: -1.0, ..Default::default() }),
            ] {
                assert!(matches!(cfg.loss(&x), Err(GoodhartError::InvalidArgument { .. })), "{cfg:?}");
            }
            assert!(matches!(
                x.clone().with_lengths(one(0.0), one(1.0)),
                Err(GoodhartError::InvalidArgument { .. })
            ));
        }
    }

    #[test]
    fn every_registry_name_deserialises_from_toml() {
        for info in REGISTRY {
            let cfg: PreferenceLossConfig =
                toml::from_str(&format!("kind = \"{}\"", info.name)).unwrap();
            assert_eq!(cfg.name(), info.name);
            cfg.validate().unwrap();
        }
        assert_eq!(REGISTRY.len(), 4);
        let cfg: PreferenceLossConfig =
            toml::from_str("kind = \"dpo\"\nbeta = 0.5\nlabel_smoothing = 0.1").unwrap();
        assert_eq!(
            cfg,
            PreferenceLossConfig::Dpo(DpoConfig {
                beta: 0.5,
                label_smoothing: 0.1
            })
        );
        assert!(toml::from_str::<PreferenceLossConfig>("kind = \"ipo\"\nalpha = 1.0").is_err());
    }
}
