//! # goodhart-advantage
//!
//! Advantage estimators of the field behind one signature, with the conventions the
//! libraries differ on (std epsilon, biased or unbiased variance, groups of one, masked
//! tokens in multi-turn rollouts) explicit and documented.
//!
//! Each estimator is a function over burn tensors in its own file, named as the field
//! names it ([`grpo::grpo`], [`gae::gae`], ...), generic over `B: Backend`: rewards per
//! response `[N]` or per token `[N, T]`, a 0/1 response mask `[N, T]`, explicit group ids
//! ([`Groups`]), values where needed. Each returns an [`AdvantageOutput`]: advantages
//! `[N, T]` (outcome estimators broadcast their per-response value over the response's
//! tokens; masked positions are 0) and returns where the method has them.
//!
//! A TOML file picks an estimator by name (`kind = "grpo"`, verl's registry names) through
//! [`AdvantageConfig`]; [`compute`] runs it on an [`AdvantageInput`]; [`REGISTRY`] lists
//! every name with a summary and source. Loss aggregation ([`LossAggregation`]) lives in
//! goodhart-core and is re-exported here. See `docs/advantage.md` for the table.

pub mod a2tgpo;
pub mod bnpo;
pub mod common;
pub mod dr_grpo;
pub mod gae;
pub mod gdpo;
pub mod gpg;
pub mod gra;
pub mod grpo;
pub mod grpo_passk;
pub mod igpo;
pub mod opo;
pub mod optimal_token_baseline;
pub mod reinforce;
pub mod reinforce_plus_plus;
pub mod reinforce_plus_plus_baseline;
pub mod remax;
pub mod rloo;
pub mod verpo;

mod config;

pub use common::SingletonGroups;
pub use config::{compute, AdvantageConfig, AdvantageInput, Turns, UnitTests};
pub use goodhart_core::aggregate::LossAggregation;
pub use goodhart_core::groups::Groups;
pub use goodhart_core::ops::Whitening;

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::registry::MethodInfo;

/// What an estimator returns.
#[derive(Debug, Clone)]
pub struct AdvantageOutput<B: Backend> {
    /// Advantages `[N, T]`; 0 at masked positions.
    pub advantages: Tensor<B, 2>,
    /// Returns `[N, T]` (value targets) for the estimators that have them (GAE, REINFORCE,
    /// REINFORCE++, ReMax); `None` otherwise.
    pub returns: Option<Tensor<B, 2>>,
    /// The per-response advantage `[N]` of outcome estimators, before broadcasting;
    /// `None` for token- and turn-level estimators.
    pub per_response: Option<Tensor<B, 1>>,
}

const fn info(name: &'static str, summary: &'static str, source: &'static str) -> MethodInfo {
    MethodInfo {
        name,
        summary,
        source,
    }
}

/// Every advantage estimator, by the name a config uses (`kind = "<name>"`).
pub const REGISTRY: &[MethodInfo] = &[
    info("gae", "generalised advantage estimation with a critic; masked tokens carry the recursion", "Schulman et al. 2016; defaults gamma = lambda = 1 and whitening (verl)"),
    info("reinforce", "discounted return G_t as the advantage, no baseline", "Williams 1992"),
    info("reinforce_plus_plus", "discounted return whitened over all valid tokens of the batch", "Hu et al. 2025 (arXiv:2501.03262); verl reinforce_plus_plus"),
    info("reinforce_plus_plus_baseline", "r minus the group mean, broadcast, then batch whitening", "Hu et al. 2025 (arXiv:2501.03262); verl reinforce_plus_plus_baseline"),
    info("rloo", "r minus the mean of the other responses of the group", "Kool et al. 2019; Ahmadian et al. 2024; verl rloo"),
    info("grpo", "(r - group mean) / (std + eps), std of the group or the batch, or none", "Shao et al. 2024 (DeepSeekMath); eps 1e-6 verl, TRL scale_rewards"),
    info("dr_grpo", "r minus the group mean, no std division", "Liu et al. 2025 (arXiv:2503.20783); verl norm_adv_by_std_in_grpo = false"),
    info("bnpo", "(r - p_q) / BetaPDF(p_q) with Beta fitted to the batch of success rates", "Xiao et al. 2025 (arXiv:2506.02864)"),
    info("opo", "r minus the length-weighted group mean reward", "Hao et al. 2025 (arXiv:2505.23585); verl opo"),
    info("remax", "reward-to-go minus the greedy response's reward", "Li et al. 2024 (arXiv:2310.10505); verl remax"),
    info("gpg", "(r - group mean) scaled by B / number of non-zero rewards", "Chu et al. 2025 (arXiv:2504.02546); verl gpg"),
    info("grpo_passk", "only the best response of a group gets r_max - r_second (/ std)", "Chen et al. 2025 (arXiv:2503.19595); verl grpo_passk"),
    info("gdpo", "z-score each reward component in its group, weighted sum, z-score over the batch", "GDPO (arXiv:2601.05242); TRL normalize_then_sum"),
    info("gra", "outcome plus step rewards gated on the outcome clearing delta, group-normalised", "G-RA, Sun et al. 2025 (arXiv:2508.10548)"),
    info("a2tgpo", "per-turn signal normalised within (prompt, turn) groups, discounted sum / sqrt(terms)", "A2TGPO (METHODS.md; clip schedule unverified)"),
    info("igpo", "turn rewards = gain in ground-truth probability, outcome on the last turn; group z-score, discounted sum", "Wang et al. 2025 (arXiv:2510.14967)"),
    info("verpo", "outcome plus difficulty-weighted unit-test partial credit, group-normalised", "VeRPO (METHODS.md; combination unverified)"),
    info("optimal_token_baseline", "reward-to-go minus a per-group, per-position baseline weighted by cumulative path variance 1 - 2 pi_t + sum pi^2", "verl 0.9.1 compute_optimal_token_baseline_advantage (OTB)"),
];

#[cfg(test)]
mod tests;
