//! # goodhart-regularize
//!
//! The regularisers that hold a policy near where its proxy reward is trustworthy: KL
//! estimators and coefficient controllers ([`kl`], [`controller`]), the entropy bonus
//! ([`entropy`]), ORPO's chi-squared occupancy regularisation ([`occupancy`]) and its
//! sequence-level LM variant ([`sequence_chi2`]), the action-distribution KL ORPO compares
//! against ([`action_kl`]), SFT anchoring ([`sft_anchor`]), GARDO's gated and adaptive KL
//! ([`gardo`]), Lp-Reg ([`lp_reg`]), constrained RLHF ([`constrained`]), gradient
//! penalties for learned rewards ([`lipschitz`]) and reference-policy management
//! ([`reference`]). Formulas and sources: `docs/regularize.md`.
//!
//! Every policy regulariser implements one trait, [`Regularizer`]: an in-reward term
//! (shaping per-token rewards), an in-loss term, or both, plus its metrics; a TOML file
//! picks one with `kind = "<name>"` ([`RegularizerConfig`], [`REGISTRY`]).

use std::collections::BTreeMap;

use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    Int, Tensor,
};
use goodhart_core::{registry::MethodInfo, GoodhartError, Result};
use serde::{Deserialize, Serialize};

pub mod action_kl;
pub mod constrained;
pub mod controller;
pub mod entropy;
pub mod gardo;
pub mod kl;
pub mod lipschitz;
pub mod lp_reg;
pub mod occupancy;
pub mod reference;
pub mod sequence_chi2;
pub mod sft_anchor;

/// What a regulariser may read from a step. Every field is optional; a regulariser
/// that needs a missing one returns [`GoodhartError::InvalidArgument`] naming it.
/// Shapes: `N` sequences (or episodes) of `T` tokens (or steps), vocabulary (or action
/// count) `V`, observation length `K`.
#[derive(Debug, Clone)]
pub struct RegInputs<B: Backend> {
    /// Response mask `[N, T]` (1 on policy-generated tokens / valid steps).
    pub mask: Option<Tensor<B, 2>>,
    /// Log-probabilities of the sampled tokens under the policy `[N, T]`.
    pub logp: Option<Tensor<B, 2>>,
    /// ... under the reference `[N, T]`.
    pub logp_ref: Option<Tensor<B, 2>>,
    /// Per-token policy entropy `[N, T]`.
    pub entropy: Option<Tensor<B, 2>>,
    /// Full policy logits `[N, T, V]`.
    pub logits: Option<Tensor<B, 3>>,
    /// Full reference / base-policy logits `[N, T, V]`.
    pub ref_logits: Option<Tensor<B, 3>>,
    /// Sampled tokens or actions `[N, T]`.
    pub tokens: Option<Tensor<B, 2, Int>>,
    /// Observation vectors `[N, T, K]` (environments with vector observations).
    pub observations: Option<Tensor<B, 3>>,
    /// Observations `[M, T', K]` of reference-policy (base-policy) episodes, the other
    /// side of an occupancy discriminator.
    pub ref_observations: Option<Tensor<B, 3>>,
    /// Their actions `[M, T']`.
    pub ref_tokens: Option<Tensor<B, 2, Int>>,
    /// Their mask `[M, T']` (all ones when absent).
    pub ref_mask: Option<Tensor<B, 2>>,
    /// Policy log-probabilities of baseline responses `[M, T']` (SFT anchoring).
    pub baseline_logp: Option<Tensor<B, 2>>,
    /// Their mask `[M, T']`.
    pub baseline_mask: Option<Tensor<B, 2>>,
    /// The trained (proxy) reward per sequence `[N]` (GARDO).
    pub reward_main: Option<Tensor<B, 1>>,
    /// Auxiliary rewards per sequence, each `[N]` (GARDO).
    pub rewards_aux: Vec<Tensor<B, 1>>,
}

impl<B: Backend> Default for RegInputs<B> {
    fn default() -> Self {
        Self {
            mask: None,
            logp: None,
            logp_ref: None,
            entropy: None,
            logits: None,
            ref_logits: None,
            tokens: None,
            observations: None,
            ref_observations: None,
            ref_tokens: None,
            ref_mask: None,
            baseline_logp: None,
            baseline_mask: None,
            reward_main: None,
            rewards_aux: Vec::new(),
        }
    }
}

/// `field` cloned, or an error naming it and the regulariser that needs it.
pub(crate) fn need<T: Clone>(field: &Option<T>, name: &str, by: &str) -> Result<T> {
    field
        .clone()
        .ok_or_else(|| GoodhartError::invalid(name, format!("required by the `{by}` regulariser")))
}

/// What a regulariser observes after a step (for controllers, multipliers, gates).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepStats {
    /// Mean KL to the reference.
    pub kl: f64,
    /// Mean proxy reward.
    pub reward: f64,
    /// Samples in the step (verl's `n_steps` for the adaptive controller).
    pub n_samples: f64,
    /// Mean return of each constrained component reward.
    pub component_returns: Vec<f64>,
}

/// A regulariser: an in-reward term, an in-loss term, or both, plus its metrics.
pub trait Regularizer<B: Backend> {
    /// Its registry name.
    fn name(&self) -> &'static str;

    /// In-reward term: the per-token `rewards [N, T]` after shaping (identity by default).
    fn shape_rewards(
        &mut self,
        rewards: Tensor<B, 2>,
        inputs: &RegInputs<B>,
    ) -> Result<Tensor<B, 2>> {
        let _ = inputs;
        Ok(rewards)
    }

    /// In-loss term (one element), to add to the policy loss; `None` if it has none.
    fn loss(&mut self, inputs: &RegInputs<B>) -> Result<Option<Tensor<B, 1>>> {
        let _ = inputs;
        Ok(None)
    }

    /// Updates its state (coefficients, multipliers, gates) after a step.
    fn observe(&mut self, stats: &StepStats) -> Result<()> {
        let _ = stats;
        Ok(())
    }

    /// Multiplies its KL-to-the-reference coefficient by `factor` (an RL run's
    /// `on_alarm = "raise_kl"`); does nothing for a regulariser without one (the default).
    fn raise_coefficient(&mut self, factor: f64) {
        let _ = factor;
    }

    /// Metrics of the last step, keys `<name>/<metric>`.
    fn metrics(&self) -> BTreeMap<String, f64>;
}

/// A regulariser chosen by name (`kind = "<name>"` in TOML, snake_case).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RegularizerConfig {
    /// Per-token KL to the reference ([`kl`]).
    Kl(kl::KlConfig),
    /// Entropy bonus ([`entropy`]).
    Entropy(entropy::EntropyConfig),
    /// ORPO occupancy-measure chi-squared ([`occupancy`]).
    Chi2Occupancy(occupancy::OccupancyConfig),
    /// ORPO sequence-level chi-squared ([`sequence_chi2`]).
    SequenceChi2(sequence_chi2::SequenceChi2Config),
    /// Action-distribution KL to the base policy ([`action_kl`]).
    ActionKl(action_kl::ActionKlConfig),
    /// SFT anchoring on baseline responses ([`sft_anchor`]).
    SftAnchor(sft_anchor::SftAnchorConfig),
    /// GARDO gated KL ([`gardo`]).
    Gardo(gardo::GardoConfig),
    /// Lp-Reg ([`lp_reg`]).
    LpReg(lp_reg::LpRegConfig),
    /// Constrained RLHF multipliers ([`constrained`]).
    Constrained(constrained::ConstrainedConfig),
}

/// The regularisers a config can name.
pub const REGISTRY: &[MethodInfo] = &[
    MethodInfo { name: "kl", summary: "per-token KL estimator (k1, abs, k2, k3, k1+, k3+) in the reward or the loss, with a coefficient controller", source: "Schulman's KL approximations; Ziegler et al. 2019 adaptive controller; verl core_algos conventions (k3 clamps, target 0.1, horizon 10000)" },
    MethodInfo { name: "entropy", summary: "entropy bonus -c * agg(H), optionally over the top-q highest-entropy tokens", source: "verl entropy_coeff; Wang et al. 2025 (80/20 high-entropy tokens)" },
    MethodInfo { name: "chi2_occupancy", summary: "discriminator-estimated chi-squared between occupancy measures, as a per-step reward penalty", source: "Laidlaw, Singhal, Dragan 2024 (ORPO, Correlated Proxies)" },
    MethodInfo { name: "sequence_chi2", summary: "coef * sqrt(chi2) of clipped sequence likelihood ratios", source: "ORPO's RLHF variant (Laidlaw et al. 2024)" },
    MethodInfo { name: "action_kl", summary: "coef/(1-gamma) * mean exact KL(pi(.|s) || pi_base(.|s))", source: "the action-distribution KL baseline of ORPO (Laidlaw et al. 2024)" },
    MethodInfo { name: "sft_anchor", summary: "coef * NLL of baseline responses", source: "RPO (Pang et al. 2024); TRL rpo_alpha" },
    MethodInfo { name: "gardo", summary: "KL only on samples whose proxy rank most exceeds auxiliary ranks, adaptive gate fraction", source: "GARDO (2025); adaptation rule and amplification form unverified" },
    MethodInfo { name: "lp_reg", summary: "forward KL(pi_proxy || pi) to the threshold-filtered proxy on low-probability tokens", source: "Lp-Reg (Huang et al. 2025); selection rule unverified" },
    MethodInfo { name: "constrained", summary: "Lagrange multipliers per component reward (sigmoid / tanh), mixed advantage", source: "Moskovitz et al. 2023 (Constrained RLHF)" },
];

impl RegularizerConfig {
    /// Its registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Kl(_) => "kl",
            Self::Entropy(_) => "entropy",
            Self::Chi2Occupancy(_) => "chi2_occupancy",
            Self::SequenceChi2(_) => "sequence_chi2",
            Self::ActionKl(_) => "action_kl",
            Self::SftAnchor(_) => "sft_anchor",
            Self::Gardo(_) => "gardo",
            Self::LpReg(_) => "lp_reg",
            Self::Constrained(_) => "constrained",
        }
    }

    /// Validates the config and builds the regulariser on `device`.
    pub fn build<B: AutodiffBackend>(&self, device: &B::Device) -> Result<Box<dyn Regularizer<B>>> {
        Ok(match self {
            Self::Kl(c) => Box::new(c.init()?),
            Self::Entropy(c) => Box::new(c.init()?),
            Self::Chi2Occupancy(c) => Box::new(c.init::<B>(device)?),
            Self::SequenceChi2(c) => Box::new(c.init()?),
            Self::ActionKl(c) => Box::new(c.init()?),
            Self::SftAnchor(c) => Box::new(c.init()?),
            Self::Gardo(c) => Box::new(c.init()?),
            Self::LpReg(c) => Box::new(c.init()?),
            Self::Constrained(c) => Box::new(c.init()?),
        })
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use burn::tensor::{backend::Backend, Tensor};
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{tolerance, values};

    /// Asserts the autodiff gradient of `f` at `x0` (shape `shape`) matches central finite
    /// differences (step 1e-2, f32).
    pub fn check_gradient<B: Backend, F>(x0: &[f32], shape: [usize; 2], device: &B::Device, f: F)
    where
        F: Fn(Tensor<Autodiff<B>, 2>) -> Tensor<Autodiff<B>, 1>,
    {
        let make = |v: &[f32]| Tensor::<Autodiff<B>, 1>::from_floats(v, device).reshape(shape);
        let x = make(x0).require_grad();
        let grads = f(x.clone()).backward();
        let g = values(x.grad(&grads).expect("f depends on x"));
        let h = 1e-2f32;
        for i in 0..x0.len() {
            let (mut up, mut down) = (x0.to_vec(), x0.to_vec());
            up[i] += h;
            down[i] -= h;
            let fd = (values(f(make(&up)))[0] - values(f(make(&down)))[0]) / (2.0 * h);
            let tol = tolerance(2e-3) * (1.0 + g[i].abs());
            assert!(
                (fd - g[i]).abs() <= tol,
                "index {i}: autodiff {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registered_name_deserialises_from_toml() {
        let bodies = [
            (
                "kl",
                "estimator = \"k3+\"\nplacement = \"reward\"\n[controller]\nkind = \"adaptive\"\n",
            ),
            ("entropy", "coef = 0.01\ntop_q = 0.2\n"),
            (
                "chi2_occupancy",
                "obs_dim = 12\nnum_actions = 4\ndivergence = \"chi2\"\ndisc_steps = 3\n",
            ),
            ("sequence_chi2", "coef = 0.1\n"),
            ("action_kl", "gamma = 0.99\n"),
            (
                "sft_anchor",
                "coef = 1.0\naggregation = \"seq-mean-token-sum\"\n",
            ),
            ("gardo", "beta = 0.05\n"),
            (
                "lp_reg",
                "rho = 0.02\n[threshold]\nmode = \"fixed\"\ntau = 0.01\n",
            ),
            (
                "constrained",
                "[[constraints]]\nthreshold = 0.5\nkind = \"equality\"\n",
            ),
        ];
        assert_eq!(bodies.len(), REGISTRY.len());
        for ((name, body), info) in bodies.iter().zip(REGISTRY) {
            assert_eq!(*name, info.name);
            let text = format!("kind = \"{name}\"\n{body}");
            let c: RegularizerConfig =
                toml::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(c.name(), *name);
            // unknown keys are rejected
            let bad = format!("kind = \"{name}\"\nbogus = 1\n{body}");
            assert!(
                toml::from_str::<RegularizerConfig>(&bad).is_err(),
                "{name} accepted an unknown key"
            );
        }
        assert!(toml::from_str::<RegularizerConfig>("kind = \"nope\"\n").is_err());
        let kl: RegularizerConfig = toml::from_str("kind = \"kl\"\n").unwrap();
        assert_eq!(kl, RegularizerConfig::Kl(kl::KlConfig::default()));
    }

    goodhart_core::backend_test! {
        fn built_regularizers_run_through_the_trait<B>(device) {
            use goodhart_core::device::Autodiff;
            use goodhart_core::testing::{assert_close, tolerance, values};
            type A<B> = Autodiff<B>;
            let tol = tolerance(1e-5);
            let build = |text: &str| toml::from_str::<RegularizerConfig>(text).unwrap().build::<A<B>>(device).unwrap();
            // d = lp - lr = (0.5, -1 | 2, pad)
            let inputs = RegInputs::<A<B>> {
                logp: Some(Tensor::from_floats([[-0.5, -2.0], [-0.1, 0.0]], device)),
                logp_ref: Some(Tensor::from_floats([[-1.0, -1.0], [-2.1, 0.0]], device)),
                mask: Some(Tensor::from_floats([[1.0, 1.0], [1.0, 0.0]], device)),
                entropy: Some(Tensor::from_floats([[1.0, 2.0], [3.0, 9.0]], device)),
                ..Default::default()
            };
            // kl in the reward, k1, fixed beta 0.1: r - 0.1 d; padding keeps its reward
            let mut kl = build("kind = \"kl\"\nestimator = \"k1\"\nplacement = \"reward\"\n[controller]\nkind = \"fixed\"\ncoef = 0.1\n");
            let r = Tensor::<A<B>, 2>::ones([2, 2], device);
            assert_close(&values(kl.shape_rewards(r, &inputs).unwrap()), &[0.95, 1.1, 0.8, 1.0], tol);
            assert!(kl.loss(&inputs).unwrap().is_none());
            // token mean of d = 1.5 / 3 = 0.5
            assert!((kl.metrics()["kl/mean"] - 0.5).abs() < 1e-5);
            // kl in the loss with the adaptive controller: beta 0.001 * (1 + 0.2 * 100 / 1e4) after KL 1.0
            let mut kl = build("kind = \"kl\"\n[controller]\nkind = \"adaptive\"\n");
            // k3: e^-0.5 - 0.5 = 0.1065307, e^1 - 2 = 0.7182818, e^-2 + 1 = 1.1353353 -> mean 0.6533826
            let loss = kl.loss(&inputs).unwrap().unwrap();
            assert_close(&values(loss), &[0.001 * 0.653_382_6], 1e-6);
            kl.observe(&StepStats { kl: 1.0, n_samples: 100.0, ..Default::default() }).unwrap();
            assert!((kl.metrics()["kl/coef"] - 0.001 * 1.002).abs() < 1e-12);
            // entropy bonus: -0.5 * mean(1, 2, 3)
            let mut h = build("kind = \"entropy\"\ncoef = 0.5\n");
            assert_close(&values(h.loss(&inputs).unwrap().unwrap()), &[-1.0], tol);
            // a missing input is a typed error naming it
            let mut anchor = build("kind = \"sft_anchor\"\n");
            match anchor.loss(&inputs) {
                Err(GoodhartError::InvalidArgument { name, .. }) => assert_eq!(name, "baseline_logp"),
                other => panic!("expected a missing-input error, got {other:?}"),
            }
            // constrained: a violated constraint raises lambda from 0.5
            let mut c = build("kind = \"constrained\"\n[[constraints]]\nthreshold = 1.0\n");
            c.observe(&StepStats { component_returns: vec![0.0], ..Default::default() }).unwrap();
            assert!(c.metrics()["constrained/lambda_0"] > 0.5);
            // gardo: main ranks (1, 0) vs aux ranks (0, 1): u = (1, -1); beta 0.1 of 2 -> k 1:
            // only sequence 0 is regularised: k3 mean over its tokens (0.1065307 + 0.7182818)/2
            let mut g = build("kind = \"gardo\"\ncoef = 1.0\n");
            let gin = RegInputs::<A<B>> {
                reward_main: Some(Tensor::from_floats([1.0, 0.0], device)),
                rewards_aux: vec![Tensor::from_floats([0.0, 1.0], device)],
                ..inputs.clone()
            };
            assert_close(&values(g.loss(&gin).unwrap().unwrap()), &[0.412_406_3], tol);
            assert!((g.metrics()["gardo/gated_share"] - 0.5).abs() < 1e-12);
        }
    }
}
