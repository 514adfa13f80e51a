//! # goodhart-metrics
//!
//! Measure the proxy-gold gap, fit the known overoptimisation laws to it, and detect its
//! onset. Formulas and sources: `docs/metrics.md`.
//!
//! - [`step`]: per-step metrics of a batch (KL to the reference, entropy, clip fractions,
//!   rewards per source, proxy-gold gap and correlation, lengths, zero-std groups,
//!   ensemble disagreement, advantage moments) as one flat map of `metrics.jsonl`.
//! - [`stats`]: summaries, Pearson and Spearman correlation on plain series.
//! - [`hacking`]: the ORPO definition of reward hacking.
//! - [`overopt`]: Gao et al.'s best-of-n and RL laws, best-of-n KL, unbiased best-of-n.
//! - [`detect`]: online hacking detectors (gold-aware, proxy-only, [`cusum`], [`shift`],
//!   [`logistic`]); [`evaluate`]: their lead / lag against the gold peak, false alarms
//!   and stopping regret over logged runs; [`training_log`]: any trainer's JSONL or CSV
//!   log as such a run.
//! - [`effective_rank`]: effective rank of hidden states, ERV and ERA; [`ood`]: the
//!   Mahalanobis distance of a row from a reference sample.
//! - [`pass_at_k`], [`win_rate`], [`ope`]: unbiased pass@k, bootstrap win rate,
//!   off-policy estimators (IPS, SNIPS, doubly robust).
//! - [`sink`]: JSONL, CSV and in-memory metric sinks; [`tensorboard`]: TensorBoard event
//!   files mirroring `metrics.jsonl`.

use goodhart_core::registry::MethodInfo;

pub mod cusum;
pub mod detect;
pub mod effective_rank;
pub mod evaluate;
pub mod hacking;
pub mod logistic;
pub mod ood;
pub mod ope;
pub mod overopt;
pub mod pass_at_k;
pub mod shift;
pub mod sink;
pub mod stats;
pub mod step;
pub mod tensorboard;
pub mod training_log;
pub mod win_rate;

#[cfg(test)]
mod testing;

/// The detectors (by the `kind` a config uses) and the fits and estimators of this crate.
pub const REGISTRY: &[MethodInfo] = &[
    MethodInfo {
        name: "gold-aware",
        summary: "detector: proxy still rising while EMA-smoothed gold fell from its running peak by max(abs, rel * gain, noise)",
        source: "ORPO definition of hacking (Laidlaw et al., Correlated Proxies); Gao et al. 2022 overoptimisation; defaults goodhart's own",
    },
    MethodInfo {
        name: "proxy-only",
        summary: "detector: RMS of warm-up z-scores of KL acceleration, entropy collapse, ensemble disagreement, length drift, advantage skew",
        source: "goodhart heuristic over symptoms reported in seeds/papers.txt (entropy collapse, length hacking, ensemble disagreement)",
    },
    MethodInfo {
        name: "cusum",
        summary: "detector: one-sided CUSUM max(0, S + z - k) of one signal's warm-up z-scores, fires at S >= h",
        source: "Page 1954, Continuous inspection schemes; defaults goodhart's own (kl/ref growth, k 0.5, h 5)",
    },
    MethodInfo {
        name: "shift",
        summary: "detector: mean of one signal's last `window` values moved >= threshold (its units) from the mean of its first `warmup`",
        source: "goodhart's own; defaults advantage/skew falling by 0.5, warmup 5, window 5",
    },
    MethodInfo {
        name: "logistic",
        summary: "detector: sigmoid(bias + w . features) >= threshold, features the recent means of gold-free signals (level, log, change, ratio, diff)",
        source: "goodhart's own; weights fitted by Newton's method with a ridge on the detector corpus's calibration traces",
    },
    MethodInfo {
        name: "bon-fit",
        summary: "least-squares fit of gold = d (alpha - beta d), d = sqrt(KL); peak d* = alpha / (2 beta)",
        source: "Gao, Schulman & Hilton 2022, Scaling Laws for Reward Model Overoptimization",
    },
    MethodInfo {
        name: "rl-fit",
        summary: "least-squares fit of gold = d (alpha - beta log d); peak d* = exp(alpha / beta - 1)",
        source: "Gao, Schulman & Hilton 2022, Scaling Laws for Reward Model Overoptimization",
    },
    MethodInfo {
        name: "bon-kl",
        summary: "KL of best-of-n from the base policy, log n - (n - 1)/n",
        source: "Stiennon et al. 2020; Gao et al. 2022",
    },
    MethodInfo {
        name: "bon-unbiased",
        summary: "unbiased best-of-n gold from N >= n samples, sum_{i>=n} C(i-1, n-1)/C(N, n) gold_(i)",
        source: "Gao et al. 2022, appendix",
    },
    MethodInfo {
        name: "orpo-hacking",
        summary: "proxy-true correlation under the base policy; hacked iff the policy's true return < the base policy's",
        source: "Laidlaw, Singhal & Dragan, Correlated Proxies (ORPO)",
    },
    MethodInfo {
        name: "effective-rank",
        summary: "exp(entropy) of normalised singular values of centred hidden states; ERV / ERA over prefixes",
        source: "Roy & Vetterli 2007; ERV/ERA from the VERL hidden-state paper (reading unverified)",
    },
    MethodInfo {
        name: "pass-at-k",
        summary: "unbiased pass@k, 1 - C(n - c, k)/C(n, k) in product form",
        source: "Chen et al. 2021 (Codex)",
    },
    MethodInfo {
        name: "win-rate",
        summary: "paired win rate (ties 1/2) with a seeded percentile-bootstrap interval",
        source: "standard percentile bootstrap (Efron)",
    },
    MethodInfo {
        name: "ips",
        summary: "inverse propensity scoring, mean w r",
        source: "Horvitz & Thompson 1952",
    },
    MethodInfo {
        name: "snips",
        summary: "self-normalised IPS, sum w r / sum w",
        source: "Swaminathan & Joachims 2015",
    },
    MethodInfo {
        name: "dr",
        summary: "doubly robust, mean v_hat + w (r - q_hat)",
        source: "Dudik, Langford & Li 2011",
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_detectors_build_by_name() {
        let mut names: Vec<_> = REGISTRY.iter().map(|m| m.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        for kind in ["gold-aware", "proxy-only"] {
            goodhart_core::registry::lookup(REGISTRY, "metric", kind).unwrap();
            let cfg: detect::DetectorConfig =
                serde_json::from_str(&format!(r#"{{"kind": "{kind}"}}"#)).unwrap();
            assert_eq!(cfg.build().unwrap().name(), kind);
        }
    }
}
