//! GARDO: gated and adaptive regularisation with diversity-aware optimisation (2025,
//! "GARDO: Reinforcing Diffusion Models without Reward Hacking").
//!
//! 1. **Gating.** KL applies only to the samples whose rank under the trained (proxy)
//!    reward most exceeds their rank under auxiliary rewards: `u_i = rank_main(i) -
//!    mean_k rank_aux_k(i)` ([`rank_disagreement`]; ranks 0-based ascending, ties by sort
//!    order); the gate holds the `ceil(beta N)` samples of largest `u` among those with
//!    `u >= 0` ([`gate`]).
//! 2. **Adaptive gate fraction** ([`GateFraction`]) *(adaptation rule unverified; this
//!    is goodhart's)*: `beta` in `[0.02, 0.2]`; every 20 steps the mean of the monitored
//!    signal (by default the batch KL of gated samples) over the window is compared with
//!    the previous window's: if it rose, `beta <- 1.1 beta` (regularise more samples),
//!    otherwise `beta <- 0.9 beta`; clamped to the range.
//! 3. **Reference reset** when the KL passes a threshold or every K steps: see
//!    [`crate::reference::ResetRule`] / [`crate::reference::ReferencePolicy`].
//! 4. **Diversity-aware amplification** ([`amplify_advantages`]) *(form unverified)*:
//!    for samples whose advantage is above their group's mean,
//!    `A_i <- A_i (1 + w d_i / mean_g(d))` with `d_i >= 0` a diversity score (e.g. the
//!    distance to the nearest other sample of the group); other advantages unchanged.

use std::collections::VecDeque;

use burn::tensor::{backend::Backend, cast::ToElement, Tensor};
use goodhart_core::{
    groups::Groups,
    ops::{check_finite, group_stats, per_response},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::entropy::top_k_mask;

/// 0-based ascending ranks `[N]` (the smallest value has rank 0).
pub fn ranks<B: Backend>(x: Tensor<B, 1>) -> Tensor<B, 1> {
    x.argsort(0).argsort(0).float()
}

/// `u = rank(main) - mean_k rank(aux_k)` `[N]`. Errors on mismatched lengths, no
/// auxiliary reward, or non-finite rewards.
pub fn rank_disagreement<B: Backend>(
    main: Tensor<B, 1>,
    aux: &[Tensor<B, 1>],
) -> Result<Tensor<B, 1>> {
    if aux.is_empty() {
        return Err(GoodhartError::Empty {
            what: "auxiliary rewards".into(),
        });
    }
    check_finite(&main, "main reward")?;
    let n = main.dims()[0];
    let mut mean = Tensor::<B, 1>::zeros([n], &main.device());
    for a in aux {
        if a.dims() != [n] {
            return Err(GoodhartError::shape("auxiliary reward", &[n], &a.dims()));
        }
        check_finite(a, "auxiliary reward")?;
        mean = mean + ranks(a.clone());
    }
    Ok(ranks(main) - mean / aux.len() as f64)
}

/// The gate `[N]` (0/1): the `ceil(beta N)` samples of largest `u` among `u >= 0`.
pub fn gate<B: Backend>(u: Tensor<B, 1>, beta: f64) -> Result<Tensor<B, 1>> {
    if !(0.0..=1.0).contains(&beta) {
        return Err(GoodhartError::invalid(
            "beta",
            format!("must be in [0, 1], got {beta}"),
        ));
    }
    let n = u.dims()[0];
    let k = (beta * n as f64).ceil() as usize;
    let candidates = u.clone().greater_equal_elem(0.0).float().reshape([1, n]);
    Ok(top_k_mask(u.reshape([1, n]), &candidates, k)?.reshape([n]))
}

/// Per-token KL `[N, T]` restricted to the gated samples `gate [N]`.
pub fn gated_kl<B: Backend>(kl: Tensor<B, 2>, gate: &Tensor<B, 1>) -> Result<Tensor<B, 2>> {
    let [n, t] = kl.dims();
    if gate.dims() != [n] {
        return Err(GoodhartError::shape("gate", &[n], &gate.dims()));
    }
    Ok(kl * gate.clone().reshape([n, 1]).expand([n, t]))
}

/// The adaptive gate fraction (rule in the module doc; *unverified*).
#[derive(Debug, Clone, PartialEq)]
pub struct GateFraction {
    beta: f64,
    min: f64,
    max: f64,
    window: usize,
    current: VecDeque<f64>,
    previous: Option<f64>,
}

impl GateFraction {
    /// Starts at `beta`, bounded to `[min, max]`, adapting every `window` steps
    /// (GARDO: `[0.02, 0.2]`, 20).
    pub fn new(beta: f64, min: f64, max: f64, window: usize) -> Result<Self> {
        if !(0.0 < min && min <= beta && beta <= max && max <= 1.0) || window == 0 {
            return Err(GoodhartError::invalid(
                "gate fraction",
                format!("need 0 < min <= beta <= max <= 1 and window > 0, got {min} <= {beta} <= {max}, {window}"),
            ));
        }
        Ok(Self {
            beta,
            min,
            max,
            window,
            current: VecDeque::new(),
            previous: None,
        })
    }

    /// The current fraction.
    pub fn value(&self) -> f64 {
        self.beta
    }

    /// Records one step's signal; at the end of each window compares its mean with the
    /// previous window's and scales `beta` by 1.1 (rose) or 0.9 (did not). Returns `beta`.
    pub fn observe(&mut self, signal: f64) -> Result<f64> {
        if !signal.is_finite() {
            return Err(GoodhartError::NonFinite {
                what: "gate signal".into(),
            });
        }
        self.current.push_back(signal);
        if self.current.len() == self.window {
            let mean = self.current.drain(..).sum::<f64>() / self.window as f64;
            if let Some(prev) = self.previous {
                let factor = if mean > prev { 1.1 } else { 0.9 };
                self.beta = (self.beta * factor).clamp(self.min, self.max);
            }
            self.previous = Some(mean);
        }
        Ok(self.beta)
    }
}

/// Diversity-aware amplification (*unverified form*, module doc): `A_i (1 + w d_i /
/// mean_g(d))` where `A_i` exceeds its group's mean advantage; a group whose mean
/// diversity is 0 is left unchanged. Errors on lengths, negative or non-finite
/// diversity, or a negative weight.
pub fn amplify_advantages<B: Backend>(
    advantages: Tensor<B, 1>,
    diversity: Tensor<B, 1>,
    groups: &Groups,
    weight: f64,
) -> Result<Tensor<B, 1>> {
    crate::kl::check_coef("weight", weight)?;
    let n = advantages.dims()[0];
    if diversity.dims() != [n] {
        return Err(GoodhartError::shape("diversity", &[n], &diversity.dims()));
    }
    check_finite(&advantages, "advantages")?;
    check_finite(&diversity, "diversity")?;
    if diversity
        .clone()
        .lower_elem(0.0)
        .any()
        .into_scalar()
        .to_bool()
    {
        return Err(GoodhartError::invalid("diversity", "must be >= 0"));
    }
    let a_mean = per_response(group_stats(advantages.clone(), groups)?.mean, groups);
    let d_mean = per_response(group_stats(diversity.clone(), groups)?.mean, groups);
    let scaled =
        (diversity / d_mean.clone().clamp_min(1e-12)).mask_fill(d_mean.equal_elem(0.0), 0.0);
    let above = advantages.clone().greater(a_mean).float();
    Ok(advantages.clone() + advantages * scaled * above * weight)
}

/// Config of the `gardo` regulariser: gated KL with an adaptive fraction (reference
/// reset lives in the reference config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GardoConfig {
    /// KL estimator of the gated penalty.
    #[serde(default)]
    pub estimator: crate::kl::KlEstimator,
    /// KL coefficient.
    #[serde(default = "default_coef")]
    pub coef: f64,
    /// Initial gate fraction.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Bounds of the gate fraction (GARDO: 0.02, 0.2).
    #[serde(default = "default_min")]
    pub beta_min: f64,
    /// Upper bound.
    #[serde(default = "default_max")]
    pub beta_max: f64,
    /// Adaptation window in steps (GARDO: 20).
    #[serde(default = "default_window")]
    pub window: usize,
    /// Amplification weight `w` (default 1.0, unverified).
    #[serde(default = "default_w")]
    pub diversity_weight: f64,
}

fn default_coef() -> f64 {
    0.01
}
fn default_beta() -> f64 {
    0.1
}
fn default_min() -> f64 {
    0.02
}
fn default_max() -> f64 {
    0.2
}
fn default_window() -> usize {
    20
}
fn default_w() -> f64 {
    1.0
}

impl Default for GardoConfig {
    fn default() -> Self {
        Self {
            estimator: crate::kl::KlEstimator::default(),
            coef: default_coef(),
            beta: default_beta(),
            beta_min: default_min(),
            beta_max: default_max(),
            window: default_window(),
            diversity_weight: default_w(),
        }
    }
}

impl GardoConfig {
    /// Validates the config and builds the regulariser.
    pub fn init(&self) -> Result<GardoRegularizer> {
        crate::kl::check_coef("coef", self.coef)?;
        crate::kl::check_coef("diversity_weight", self.diversity_weight)?;
        Ok(GardoRegularizer {
            fraction: GateFraction::new(self.beta, self.beta_min, self.beta_max, self.window)?,
            config: self.clone(),
            last_gated_kl: None,
            last_gated: None,
        })
    }
}

/// The `gardo` regulariser: `coef * token-mean` of the per-token KL over the gated
/// samples' valid tokens; the gate fraction adapts on the gated KL (or, before any loss
/// call, on [`crate::StepStats::kl`]). Advantage amplification is
/// [`amplify_advantages`], called by the algorithm on its advantages.
#[derive(Debug, Clone)]
pub struct GardoRegularizer {
    config: GardoConfig,
    fraction: GateFraction,
    last_gated_kl: Option<f64>,
    last_gated: Option<f64>,
}

impl GardoRegularizer {
    /// The current gate fraction.
    pub fn beta(&self) -> f64 {
        self.fraction.value()
    }
}

impl<B: Backend> crate::Regularizer<B> for GardoRegularizer {
    fn name(&self) -> &'static str {
        "gardo"
    }

    fn loss(&mut self, x: &crate::RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        let main = crate::need(&x.reward_main, "reward_main", "gardo")?;
        let lp = crate::need(&x.logp, "logp", "gardo")?;
        let lr = crate::need(&x.logp_ref, "logp_ref", "gardo")?;
        let mask = crate::need(&x.mask, "mask", "gardo")?;
        let [n, t] = mask.dims();
        if main.dims() != [n] {
            return Err(GoodhartError::shape("reward_main", &[n], &main.dims()));
        }
        let g = gate(
            rank_disagreement(main, &x.rewards_aux)?,
            self.fraction.value(),
        )?;
        let kl = crate::kl::kl_per_token(lp, lr, &mask, self.config.estimator, true)?;
        let gated_mask = gated_kl(mask, &g)?;
        let loss = goodhart_core::aggregate::LossAggregation::TokenMean
            .aggregate(kl.clone(), &gated_mask)?;
        self.last_gated_kl = Some(loss.clone().detach().into_scalar().to_f64());
        self.last_gated = Some(g.sum().into_scalar().to_f64() / n.max(1) as f64);
        let _ = t;
        Ok(Some(loss * self.config.coef))
    }

    fn observe(&mut self, stats: &crate::StepStats) -> Result<()> {
        self.fraction
            .observe(self.last_gated_kl.unwrap_or(stats.kl))
            .map(|_| ())
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let mut m =
            std::collections::BTreeMap::from([("gardo/beta".to_string(), self.fraction.value())]);
        if let Some(v) = self.last_gated_kl {
            m.insert("gardo/gated_kl".into(), v);
        }
        if let Some(v) = self.last_gated {
            m.insert("gardo/gated_share".into(), v);
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};

    goodhart_core::backend_test! {
        fn disagreement_gate_and_amplification<B>(device) {
            // main ranks: (3, 0, 1, 2, 4); aux1 ranks (0, 1, 2, 3, 4); aux2 ranks (1, 0, 2, 4, 3)
            let main = Tensor::<B, 1>::from_floats([0.9, 0.1, 0.2, 0.5, 1.0], device);
            let a1 = Tensor::<B, 1>::from_floats([0.0, 1.0, 2.0, 3.0, 4.0], device);
            let a2 = Tensor::<B, 1>::from_floats([1.0, 0.0, 2.0, 9.0, 3.0], device);
            let u = rank_disagreement(main, &[a1, a2]).unwrap();
            // u = (3 - 0.5, 0 - 0.5, 1 - 2, 2 - 3.5, 4 - 3.5) = (2.5, -0.5, -1, -1.5, 0.5)
            assert_close(&values(u.clone()), &[2.5, -0.5, -1.0, -1.5, 0.5], tolerance(1e-6));
            // beta 0.2 of 5 -> k = 1: the first sample; beta 0.6 -> k = 3, but only 2 have u >= 0
            assert_close(&values(gate(u.clone(), 0.2).unwrap()), &[1.0, 0.0, 0.0, 0.0, 0.0], 0.0);
            assert_close(&values(gate(u.clone(), 0.6).unwrap()), &[1.0, 0.0, 0.0, 0.0, 1.0], 0.0);
            let kl = Tensor::<B, 2>::ones([5, 2], device);
            let g = gated_kl(kl, &gate(u, 0.2).unwrap()).unwrap();
            assert_close(&values(g), &[1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 0.0);

            // groups {0,1,2} and {3}: advantages (1, -1, 0 | 0); diversity (2, 1, 3 | 5)
            // group 0: mean A 0, mean d 2 -> only sample 0 above: 1 * (1 + 0.5 * 2/2) = 1.5
            let groups = Groups::new(vec![0, 0, 0, 1]).unwrap();
            let a = Tensor::<B, 1>::from_floats([1.0, -1.0, 0.0, 0.0], device);
            let d = Tensor::<B, 1>::from_floats([2.0, 1.0, 3.0, 5.0], device);
            let out = amplify_advantages(a.clone(), d, &groups, 0.5).unwrap();
            assert_close(&values(out), &[1.5, -1.0, 0.0, 0.0], tolerance(1e-6));
            let neg = Tensor::<B, 1>::from_floats([-2.0, 1.0, 3.0, 5.0], device);
            assert!(amplify_advantages(a, neg, &groups, 0.5).is_err());
        }
    }

    #[test]
    fn gate_fraction_adapts_per_window() {
        let mut g = GateFraction::new(0.1, 0.02, 0.2, 2).unwrap();
        // window 1 mean 1 (no previous) -> 0.1; window 2 mean 2 > 1 -> 0.11; window 3 mean 0.5 -> 0.099
        for (s, want) in [
            (1.0, 0.1),
            (1.0, 0.1),
            (2.0, 0.1),
            (2.0, 0.11),
            (0.5, 0.11),
            (0.5, 0.099),
        ] {
            assert!((g.observe(s).unwrap() - want).abs() < 1e-12);
        }
        // rising forever saturates at 0.2
        let mut g = GateFraction::new(0.19, 0.02, 0.2, 1).unwrap();
        for s in 0..5 {
            g.observe(s as f64).unwrap();
        }
        assert_eq!(g.value(), 0.2);
        assert!(GateFraction::new(0.5, 0.02, 0.2, 20).is_err());
    }
}
