//! What every policy-gradient surrogate shares: validated inputs ([`PolicyInputs`]), the
//! output with its metrics ([`PolicyLoss`], [`PolicyMetrics`]), the config enum a TOML file
//! picks a loss with ([`PolicyLossConfig`], `kind = "ppo_clip" | "gspo" | ...`) and the
//! family's [`REGISTRY`].
//!
//! Conventions (verl `core_algos.py`): every tensor is `[B, T]` (responses x padded
//! response tokens); `mask` is 1 on response tokens that count and 0 on padding (or tool
//! output in multi-turn rollouts); per-response advantages are broadcast to tokens by the
//! caller. The per-token log-ratio is `d = lp - lp_old`, the ratio `exp(clamp(d, -20, 20))`
//! (verl's clamp, so a stale `lp_old` cannot overflow `exp`).

use burn::tensor::{backend::Backend, cast::ToElement, Bool, Tensor};
use goodhart_core::{
    aggregate::{GlobalBatch, LossAggregation},
    ops::{check_finite, check_finite_masked, check_same_shape, masked_mean},
    registry::MethodInfo,
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

use crate::{
    cispo::CispoConfig,
    clip_cov::ClipCovConfig,
    dppo::{Divergence, DppoConfig},
    geo_mean::GeoMeanConfig,
    gspo::GspoConfig,
    kl_cov::KlCovConfig,
    ppo_clip::PpoClipConfig,
    sapo::SapoConfig,
    turn_clip::{TurnClipConfig, TurnInputs},
};

/// Bound on the per-token log-ratio before `exp` (verl's `clamp(-20, 20)`).
pub const LOG_RATIO_CLAMP: f32 = 20.0;

/// The inputs of a policy loss, checked once: four `[B, T]` tensors of one shape, finite
/// wherever `mask` is non-zero.
///
/// Masked positions are replaced by 0 at construction (as a `mask_fill`, which passes a
/// zero gradient), so padding may hold NaN or garbage: it changes neither the loss nor
/// the gradient that reaches the model.
///
/// Optional parts, set with the `with_*` methods: per-token importance weights between
/// the rollout engine and the trainer ([`with_rollout_is_weights`](Self::with_rollout_is_weights),
/// from [`crate::rollout_is`]), the global batch's normalisers
/// ([`with_global_batch`](Self::with_global_batch)) and the seed of a loss that draws at
/// random ([`with_seed`](Self::with_seed), `clip_cov`).
#[derive(Debug, Clone)]
pub struct PolicyInputs<B: Backend> {
    /// `lp`: log-probabilities of the sampled tokens under the policy being trained
    /// (carries the gradient).
    pub logp: Tensor<B, 2>,
    /// `lp_old`: log-probabilities under the policy that sampled the rollout (no gradient).
    pub logp_old: Tensor<B, 2>,
    /// Per-token advantages `A` (no gradient).
    pub advantages: Tensor<B, 2>,
    /// 0/1 response mask `m`.
    pub mask: Tensor<B, 2>,
    /// verl's `rollout_is_weights`: a detached weight per token multiplying its loss
    /// before aggregation (0 at masked positions); `None` = 1 everywhere.
    pub rollout_is_weights: Option<Tensor<B, 2>>,
    /// The normalisers of the aggregation and the empty-row convention.
    pub global: GlobalBatch,
    /// Seed of the random choices a loss makes (`clip_cov`'s tokens); default 0.
    pub seed: u64,
    /// Each token's turn and each turn's signal, for the turn-level losses (none by
    /// default).
    pub turns: Option<TurnInputs<B>>,
}

impl<B: Backend> PolicyInputs<B> {
    /// Checks shapes and finiteness and zeroes masked positions.
    ///
    /// Errors: [`GoodhartError::ShapeMismatch`] when any tensor's shape differs from
    /// `logp`'s, [`GoodhartError::NonFinite`] when `mask` is not finite or a log-prob or
    /// advantage is NaN/infinite at an unmasked position, [`GoodhartError::Empty`] when
    /// the batch has no element.
    pub fn new(
        logp: Tensor<B, 2>,
        logp_old: Tensor<B, 2>,
        advantages: Tensor<B, 2>,
        mask: Tensor<B, 2>,
    ) -> Result<Self> {
        check_same_shape(&logp, "logp", &logp_old, "logp_old")?;
        check_same_shape(&logp, "logp", &advantages, "advantages")?;
        check_same_shape(&logp, "logp", &mask, "mask")?;
        if logp.dims().contains(&0) {
            return Err(GoodhartError::Empty {
                what: "logp".into(),
            });
        }
        check_finite(&mask, "mask")?;
        check_finite_masked(&logp, &mask, "logp")?;
        check_finite_masked(&logp_old, &mask, "logp_old")?;
        check_finite_masked(&advantages, &mask, "advantages")?;
        let pad = mask.clone().equal_elem(0.0);
        Ok(Self {
            logp: logp.mask_fill(pad.clone(), 0.0),
            logp_old: logp_old.mask_fill(pad.clone(), 0.0).detach(),
            advantages: advantages.mask_fill(pad, 0.0).detach(),
            mask: mask.detach(),
            rollout_is_weights: None,
            global: GlobalBatch::default(),
            seed: 0,
            turns: None,
        })
    }

    /// Sets each token's turn `[B, T]` and each turn's normalised signal and fixed flag
    /// `[B, K]` (detached). Errors on shapes that do not match the batch.
    pub fn with_turns(mut self, turns: TurnInputs<B>) -> Result<Self> {
        let [b, t] = self.logp.dims();
        if turns.token_turn.dims() != [b, t] {
            return Err(GoodhartError::shape(
                "token_turn",
                &[b, t],
                &turns.token_turn.dims(),
            ));
        }
        let k = turns.turn_z.dims()[1];
        if turns.turn_z.dims()[0] != b || k == 0 || turns.fixed.dims() != [b, k] {
            return Err(GoodhartError::shape(
                "turn_z / fixed",
                &[b, k.max(1)],
                &turns.fixed.dims(),
            ));
        }
        self.turns = Some(TurnInputs {
            turn_z: turns.turn_z.detach(),
            fixed: turns.fixed.detach(),
            token_turn: turns.token_turn,
        });
        Ok(self)
    }

    /// Sets per-token importance weights `[B, T]` (detached; masked positions become 0).
    ///
    /// Errors: a shape other than `logp`'s, or a weight that is NaN, infinite or negative
    /// at a counted position.
    pub fn with_rollout_is_weights(mut self, weights: Tensor<B, 2>) -> Result<Self> {
        check_same_shape(&self.logp, "logp", &weights, "rollout_is_weights")?;
        check_finite_masked(&weights, &self.mask, "rollout_is_weights")?;
        let pad = self.mask.clone().equal_elem(0.0);
        let weights = weights.mask_fill(pad, 0.0).detach();
        if weights
            .clone()
            .lower_elem(0.0)
            .any()
            .into_scalar()
            .to_bool()
        {
            return Err(GoodhartError::invalid(
                "rollout_is_weights",
                "must be >= 0 at every counted token",
            ));
        }
        self.rollout_is_weights = Some(weights);
        Ok(self)
    }

    /// Sets the global batch's normalisers (errors if they are invalid).
    pub fn with_global_batch(mut self, global: GlobalBatch) -> Result<Self> {
        global.validate()?;
        self.global = global;
        Ok(self)
    }

    /// Sets the seed of the losses that draw at random.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Per-token losses `[B, T]` weighted by the rollout IS weights (as every verl policy
    /// loss does before `agg_loss`) and aggregated under the mask and global batch.
    pub fn aggregate(
        &self,
        mode: LossAggregation,
        per_token: Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>> {
        let per_token = match &self.rollout_is_weights {
            Some(w) => per_token * w.clone(),
            None => per_token,
        };
        mode.aggregate_global(per_token, &self.mask, &self.global)
    }

    /// Per-token log-ratio `d = clamp(lp - lp_old, -20, 20)`.
    pub fn log_ratio(&self) -> Tensor<B, 2> {
        (self.logp.clone() - self.logp_old.clone()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    }

    /// Masked mean of a 0/1 flag, detached: the fraction of counted tokens where `flag`
    /// holds.
    pub(crate) fn fraction(&self, flag: Tensor<B, 2, Bool>) -> Tensor<B, 1> {
        masked_mean(flag.float(), &self.mask).detach()
    }

    /// `(A - mean A)(lp - mean lp)` per token, the means over counted tokens, detached: the
    /// covariance that `clip_cov` and `kl_cov` select tokens by.
    pub(crate) fn advantage_logp_covariance(&self) -> Tensor<B, 2> {
        let adv = self.advantages.clone();
        let lp = self.logp.clone().detach();
        (adv.clone() - masked_mean(adv, &self.mask).reshape([1, 1]))
            * (lp.clone() - masked_mean(lp, &self.mask).reshape([1, 1]))
    }

    /// A flag that holds nowhere (the clip fractions of a loss that clips nothing).
    pub(crate) fn no_tokens(&self) -> Tensor<B, 2, Bool> {
        self.mask.zeros_like().bool()
    }

    /// `A < 0` and `A > 0`, per token.
    pub(crate) fn advantage_signs(&self) -> (Tensor<B, 2, Bool>, Tensor<B, 2, Bool>) {
        (
            self.advantages.clone().lower_elem(0.0),
            self.advantages.clone().greater_elem(0.0),
        )
    }
}

/// Diagnostics of a policy loss, each a detached one-element tensor averaged over counted
/// tokens only (so reading them forces no device sync until the caller asks).
#[derive(Debug, Clone)]
pub struct PolicyMetrics<B: Backend> {
    /// Fraction of tokens whose lower clip bound is active (for PPO-clip/GSPO: `A < 0` and
    /// ratio `< 1 - eps_low`; TRL's `clip_ratio/low_mean`).
    pub clip_frac_low: Tensor<B, 1>,
    /// Fraction of tokens whose upper clip bound is active (PPO-clip/GSPO: `A > 0` and
    /// ratio `> 1 + eps_high`; CISPO: the IS weight was truncated). verl's `pg_clipfrac` is
    /// `clip_frac_low + clip_frac_high`.
    pub clip_frac_high: Tensor<B, 1>,
    /// Fraction of tokens where dual-clip bounds the loss (`A < 0`, ratio beyond `c`);
    /// verl's `pg_clipfrac_lower`. 0 for losses without dual-clip.
    pub dual_clip_frac: Tensor<B, 1>,
    /// `k1` estimate of `KL(pi_old || pi)`: mean of `lp_old - lp` (verl's `ppo_kl`).
    pub approx_kl_k1: Tensor<B, 1>,
    /// `k3` estimate of `KL(pi_old || pi)`: mean of `exp(d) - 1 - d`, `d = lp - lp_old`
    /// (non-negative, low variance; Schulman's estimator with `r = pi / pi_old`).
    pub approx_kl_k3: Tensor<B, 1>,
    /// Fraction of counted tokens the covariance rule picked (`clip_cov`: gradient
    /// removed; `kl_cov`: KL penalty added); `None` for the other losses.
    pub cov_frac: Option<Tensor<B, 1>>,
}

impl<B: Backend> PolicyMetrics<B> {
    /// Metrics from the clip flags; the KL estimates come from the token log-ratio.
    pub(crate) fn new(
        inputs: &PolicyInputs<B>,
        low: Tensor<B, 2, Bool>,
        high: Tensor<B, 2, Bool>,
        dual: Option<Tensor<B, 2, Bool>>,
    ) -> Self {
        let d = inputs.log_ratio().detach();
        let mask = &inputs.mask;
        let zero = || Tensor::zeros([1], &mask.device());
        Self {
            clip_frac_low: inputs.fraction(low),
            clip_frac_high: inputs.fraction(high),
            dual_clip_frac: dual.map_or_else(zero, |f| inputs.fraction(f)),
            approx_kl_k1: masked_mean(-d.clone(), mask),
            approx_kl_k3: masked_mean(d.clone().exp() - 1.0 - d, mask),
            cov_frac: None,
        }
    }
}

/// A policy loss: the differentiable scalar to minimise and its detached metrics.
#[derive(Debug, Clone)]
pub struct PolicyLoss<B: Backend> {
    /// One-element loss tensor; `loss.backward()` differentiates through `logp`.
    pub loss: Tensor<B, 1>,
    /// Clip fractions and approximate KL, detached.
    pub metrics: PolicyMetrics<B>,
}

/// Which policy-gradient surrogate to use, chosen in TOML by `kind`:
///
/// ```toml
/// [objective]
/// kind = "ppo_clip"
/// eps_high = 0.28   # DAPO clip-higher
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum PolicyLossConfig {
    /// PPO-clip with asymmetric range and dual-clip ([`crate::ppo_clip`]).
    PpoClip(PpoClipConfig),
    /// Sequence-level ratio, sequence-level clipping ([`crate::gspo`]).
    Gspo(GspoConfig),
    /// REINFORCE with a truncated, detached importance weight ([`crate::cispo`]).
    Cispo(CispoConfig),
    /// A smooth sigmoid gate instead of the clip ([`crate::sapo`]).
    Sapo(SapoConfig),
    /// PPO-clip that detaches a few high-covariance tokens ([`crate::clip_cov`]).
    ClipCov(ClipCovConfig),
    /// The policy gradient with a KL penalty on high-covariance tokens ([`crate::kl_cov`]).
    KlCov(KlCovConfig),
    /// GMPO: the clipped geometric mean of the token ratios ([`crate::geo_mean`]).
    GeoMean(GeoMeanConfig),
    /// DPPO with a total-variation trust region ([`crate::dppo`]).
    DppoTv(DppoConfig),
    /// DPPO with a binary-KL trust region ([`crate::dppo`]).
    DppoKl(DppoConfig),
    /// A2TGPO's turn-level ratio and per-turn clip range ([`crate::turn_clip`]; needs
    /// turns).
    A2tgpoClip(TurnClipConfig),
}

impl Default for PolicyLossConfig {
    /// PPO-clip with its defaults (verl's vanilla policy loss).
    fn default() -> Self {
        Self::PpoClip(PpoClipConfig::default())
    }
}

impl PolicyLossConfig {
    /// The registry name (`"ppo_clip"`, `"gspo"`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Self::PpoClip(_) => "ppo_clip",
            Self::Gspo(_) => "gspo",
            Self::Cispo(_) => "cispo",
            Self::Sapo(_) => "sapo",
            Self::ClipCov(_) => "clip_cov",
            Self::KlCov(_) => "kl_cov",
            Self::GeoMean(_) => "geo_mean",
            Self::DppoTv(_) => "dppo_tv",
            Self::DppoKl(_) => "dppo_kl",
            Self::A2tgpoClip(_) => "a2tgpo_clip",
        }
    }

    /// Errors if a parameter is out of range (see each config's `validate`).
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::PpoClip(c) => c.validate(),
            Self::Gspo(c) => c.validate(),
            Self::Cispo(c) => c.validate(),
            Self::Sapo(c) => c.validate(),
            Self::ClipCov(c) => c.validate(),
            Self::KlCov(c) => c.validate(),
            Self::GeoMean(c) => c.validate(),
            Self::DppoTv(c) | Self::DppoKl(c) => c.validate(),
            Self::A2tgpoClip(c) => c.validate(),
        }
    }

    /// The loss with its aggregation replaced by `aggregation`. Errors for `geo_mean`,
    /// whose objective is a mean over sequences and takes no aggregation.
    pub fn with_aggregation(mut self, aggregation: LossAggregation) -> Result<Self> {
        match &mut self {
            Self::PpoClip(c) => c.aggregation = aggregation,
            Self::Gspo(c) => c.aggregation = aggregation,
            Self::Cispo(c) => c.aggregation = aggregation,
            Self::Sapo(c) => c.aggregation = aggregation,
            Self::ClipCov(c) => c.aggregation = aggregation,
            Self::KlCov(c) => c.aggregation = aggregation,
            Self::DppoTv(c) | Self::DppoKl(c) => c.aggregation = aggregation,
            Self::A2tgpoClip(c) => c.aggregation = aggregation,
            Self::GeoMean(_) => {
                return Err(GoodhartError::invalid(
                    "aggregation",
                    "geo_mean averages over sequences and takes no aggregation",
                ))
            }
        }
        Ok(self)
    }

    /// Computes the chosen loss.
    pub fn loss<B: Backend>(&self, inputs: &PolicyInputs<B>) -> Result<PolicyLoss<B>> {
        match self {
            Self::PpoClip(c) => c.loss(inputs),
            Self::Gspo(c) => c.loss(inputs),
            Self::Cispo(c) => c.loss(inputs),
            Self::Sapo(c) => c.loss(inputs),
            Self::ClipCov(c) => c.loss(inputs),
            Self::KlCov(c) => c.loss(inputs),
            Self::GeoMean(c) => c.loss(inputs),
            Self::DppoTv(c) => c.loss(inputs, Divergence::Tv),
            Self::DppoKl(c) => c.loss(inputs, Divergence::Kl),
            Self::A2tgpoClip(c) => c.loss(inputs),
        }
    }

    /// Whether the loss reads each token's turn ([`PolicyInputs::with_turns`]).
    pub fn needs_turns(&self) -> bool {
        matches!(self, Self::A2tgpoClip(_))
    }
}

/// The policy-loss registry: the names a TOML `kind` accepts, with summary and source.
pub const REGISTRY: &[MethodInfo] = &[
    MethodInfo {
        name: "ppo_clip",
        summary: "max(-A r, -A clip(r, 1-eps_low, 1+eps_high)), dual-clip min(., -A c) for A<0; r = exp(clamp(lp - lp_old, +-20))",
        source: "Schulman et al. 2017 (PPO); DAPO clip-higher (Yu et al. 2025); dual-clip (Ye et al. 2020); defaults verl (0.2/0.2, c = 3)",
    },
    MethodInfo {
        name: "gspo",
        summary: "PPO-clip on the sequence ratio s = exp(mean_t(lp - lp_old)), token gradient via exp(lp - sg(lp) + sg(log s))",
        source: "Zheng et al. 2025 (GSPO, arXiv:2507.18071); verl compute_policy_loss_gspo; defaults 3e-4/4e-4 from the paper",
    },
    MethodInfo {
        name: "cispo",
        summary: "-sg(clip(r, eps_min, eps_max)) A lp: REINFORCE with a truncated, detached importance weight",
        source: "MiniMax-M1 (arXiv:2506.13585); TRL loss_type = \"cispo\" (cap on the weight itself)",
    },
    MethodInfo {
        name: "sapo",
        summary: "-A f(r), f(r) = sigmoid(tau (r - 1)) 4 / tau, tau = tau_pos (A > 0) or tau_neg: a soft gate in place of the clip",
        source: "Gao et al. 2025 (SAPO, arXiv:2511.20347); verl compute_policy_loss_sapo; defaults verl (1.0 / 1.05)",
    },
    MethodInfo {
        name: "clip_cov",
        summary: "PPO-clip; the gradient of a random ratio * n tokens with cov(A, lp) in (lb, ub) is removed",
        source: "Cui et al. 2025 (Entropy Mechanism of RL, arXiv:2505.22617); verl compute_policy_loss_clip_cov; defaults verl (2e-4, 1, 5)",
    },
    MethodInfo {
        name: "kl_cov",
        summary: "-A r, plus coef |lp - lp_old| on the ratio * n tokens of largest cov(A, lp)",
        source: "Cui et al. 2025 (Entropy Mechanism of RL, arXiv:2505.22617); verl compute_policy_loss_kl_cov; defaults verl (2e-4, 0.1)",
    },
    MethodInfo {
        name: "geo_mean",
        summary: "GMPO: -A_i exp(mean_t sgn(A) min(sgn(A) d, sgn(A) clip(d, -eps, eps))), a mean over sequences",
        source: "Zhao et al. 2025 (GMPO, arXiv:2507.20673); verl compute_policy_loss_geo_mean; eps 0.4 from the paper",
    },
    MethodInfo {
        name: "dppo_tv",
        summary: "-A sg(min(r, c)) lp on tokens whose probability moved by at most eps (total variation) in the advantage's direction",
        source: "DPPO (arXiv:2602.04879); verl compute_policy_loss_dppo_tv; defaults verl (0.2, c = 20)",
    },
    MethodInfo {
        name: "dppo_kl",
        summary: "-A sg(min(r, c)) lp on tokens whose binary KL to the old probability is at most eps, or that moved against A",
        source: "DPPO (arXiv:2602.04879); verl compute_policy_loss_dppo_kl; defaults verl (0.2, c = 20)",
    },
    MethodInfo {
        name: "a2tgpo_clip",
        summary: "max(-A r, -A clip(r, 1 - eps_low c, 1 + eps_high c)), r the turn's geometric-mean ratio (token gradient), c = 1 + beta (2 sigmoid(z_turn) - 1)",
        source: "A2TGPO (arXiv 2605.06200; METHODS-labs.md section 3): turn-level IS and adaptive turn-level clipping; defaults from its script (3e-3 / 4e-3, beta 0.3)",
    },
];

/// Validation shared by the clip-range configs.
pub(crate) fn check_clip_range(eps_low: f32, eps_high: f32) -> Result<()> {
    if !(eps_low.is_finite() && (0.0..=1.0).contains(&eps_low)) {
        return Err(GoodhartError::invalid(
            "eps_low",
            format!("must lie in [0, 1] (lower bound 1 - eps_low >= 0), got {eps_low}"),
        ));
    }
    if !(eps_high.is_finite() && eps_high >= 0.0) {
        return Err(GoodhartError::invalid(
            "eps_high",
            format!("must be finite and >= 0, got {eps_high}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registry_name_deserialises_from_toml() {
        for info in REGISTRY {
            let cfg: PolicyLossConfig =
                toml::from_str(&format!("kind = \"{}\"", info.name)).unwrap();
            assert_eq!(cfg.name(), info.name);
            cfg.validate().unwrap();
        }
        assert_eq!(REGISTRY.len(), 10);
        let cfg: PolicyLossConfig =
            toml::from_str("kind = \"ppo_clip\"\neps_high = 0.28\ndual_clip = false\naggregation = \"seq-mean-token-sum-norm\"").unwrap();
        assert_eq!(
            cfg,
            PolicyLossConfig::PpoClip(PpoClipConfig {
                eps_high: 0.28,
                dual_clip: false,
                aggregation: goodhart_core::aggregate::LossAggregation::SeqMeanTokenSumNorm,
                ..Default::default()
            })
        );
        let cfg: PolicyLossConfig = toml::from_str("kind = \"cispo\"\neps_min = 0.5").unwrap();
        assert_eq!(
            cfg,
            PolicyLossConfig::Cispo(CispoConfig {
                eps_min: Some(0.5),
                ..Default::default()
            })
        );
        // Unknown keys and unknown kinds are rejected, naming the culprit.
        let err = toml::from_str::<PolicyLossConfig>("kind = \"gspo\"\nclip = 0.1").unwrap_err();
        assert!(err.to_string().contains("clip"), "{err}");
        let err = toml::from_str::<PolicyLossConfig>("kind = \"ppo\"").unwrap_err();
        assert!(err.to_string().contains("ppo_clip"), "{err}");
        assert!(PolicyLossConfig::Gspo(GspoConfig {
            eps_low: 2.0,
            ..Default::default()
        })
        .validate()
        .is_err());
    }
}
