//! # goodhart-reward
//!
//! Reward models and reward functions, the proxies that get hacked and the tools that
//! make them harder to hack. Formulas and sources: `docs/reward.md`.
//!
//! - [`source`]: the [`RewardSource`](source::RewardSource) trait every reward implements
//!   (learned, rule-based, environment), so proxy and gold are treated alike;
//! - [`model`]: the learned reward model, goodhart-policy's transformer trunk with a
//!   scalar head, with stored reward normalisation and checkpoints;
//! - [`bradley_terry`] and [`train`]: the Bradley-Terry loss (margin, LogExp, centring,
//!   label smoothing), training on preference pairs, and Secrets of RLHF II's
//!   noisy-preference handling;
//! - [`ensemble`]: ensembles and their aggregators (mean, median, worst case, UWO) and
//!   the member disagreement;
//! - [`shaping`]: PAR and the other shaping transforms, and potential-based shaping;
//! - [`length`]: linear and DAPO overlong penalties, FiMi-style length debiasing;
//! - [`uncertainty`]: Ctrl-U's `exp(-U)` weighting;
//! - [`compose`]: weighted sums of named sources, every component kept;
//! - [`text`], [`math_verify`] and [`hf_reward`]: rewards on decoded text, the `format`
//!   rule, the final-answer checker and Hugging Face sequence-classification reward
//!   models; [`unit_tests`]: Python programs against their tests in a sandbox;
//!   [`llm_judge`] and [`rubric`]: LLM judges through [`chat_client`], a client for
//!   OpenAI-compatible endpoints.
//!
//! Each family's config picks a method by name (`kind = "uwo"`); [`REGISTRY`] lists them
//! all for `cargo xtask list`.

use goodhart_core::registry::MethodInfo;

pub mod bradley_terry;
pub mod chat_client;
pub mod compose;
pub mod ensemble;
pub mod hf_reward;
pub mod length;
pub mod llm_judge;
pub mod math_verify;
pub mod model;
pub mod rubric;
pub mod shaping;
pub mod source;
pub mod text;
pub mod train;
pub mod uncertainty;
pub mod unit_tests;
mod workers;

pub use bradley_terry::{bt_loss, BtLossConfig, BtVariant};
pub use compose::{Component, Composite};
pub use ensemble::{member_variance, Aggregator, RewardEnsemble};
pub use length::LengthConfig;
pub use model::{RewardModel, RewardModelConfig};
pub use shaping::{Shaper, ShapingConfig};
pub use source::{RewardOutput, RewardSource, Sequences, Trajectories};
pub use text::{TextRewardConfig, Texts};
pub use train::{train_ensemble, train_reward_model, Preferences, RewardTrainConfig};
pub use uncertainty::{ctrl_u, CtrlUConfig};

/// Every named method of this crate, by family: ensemble aggregators
/// ([`Aggregator`]), shaping transforms ([`ShapingConfig`]), length methods
/// ([`LengthConfig`]), pairwise losses ([`BtVariant`]), Ctrl-U and composition.
pub const REGISTRY: &[MethodInfo] = &[
    MethodInfo {
        name: "mean",
        summary: "ensemble aggregator: mean_k r_k",
        source: "Coste et al. 2024 (Reward Model Ensembles Help Mitigate Overoptimization)",
    },
    MethodInfo {
        name: "median",
        summary: "ensemble aggregator: median over members (numpy convention for even K)",
        source: "robust aggregate; numpy.median",
    },
    MethodInfo {
        name: "worst_case",
        summary: "ensemble aggregator: min_k r_k (WCO)",
        source: "Coste et al. 2024",
    },
    MethodInfo {
        name: "uwo",
        summary: "ensemble aggregator: mean_k r_k - lambda Var_k(r_k) (variance, population by default)",
        source: "Coste et al. 2024; lambda 0.5 for best-of-n, 0.1 for PPO",
    },
    MethodInfo {
        name: "par",
        summary: "shaping: (1/M) sum_m sigmoid(k (r - r_ref,m)), bounded in (0,1)",
        source: "Fu et al. 2025 (Reward Shaping to Mitigate Reward Hacking in RLHF); M 10, k 1",
    },
    MethodInfo {
        name: "centred",
        summary: "shaping: mean_m (r - r_ref,m)",
        source: "Fu et al. 2025",
    },
    MethodInfo {
        name: "meanstd",
        summary: "shaping: (r - mu) / sigma with running statistics",
        source: "Fu et al. 2025 (PAR code's running mean/std)",
    },
    MethodInfo {
        name: "clip",
        summary: "shaping: clamp(r, mu - sigma, mu + sigma), running",
        source: "Fu et al. 2025 (PAR code)",
    },
    MethodInfo {
        name: "minmax",
        summary: "shaping: (r - min) / (max - min), running range",
        source: "Fu et al. 2025 (PAR code)",
    },
    MethodInfo {
        name: "ceil",
        summary: "shaping: min(r, value)",
        source: "Fu et al. 2025 (PAR code's reward_ceil)",
    },
    MethodInfo {
        name: "lsc",
        summary: "shaping: log sigmoid(r - q), q the 85th percentile of a Normal fit to references",
        source: "Fu et al. 2025 (PAR code)",
    },
    MethodInfo {
        name: "tanh",
        summary: "shaping: tanh(r), or mean_m tanh(r - r_ref,m) when centred",
        source: "Fu et al. 2025 (PAR code)",
    },
    MethodInfo {
        name: "linear_length",
        summary: "length: r - coef * max(L - free, 0)",
        source: "PAR code's penalty_per_token; common linear length penalty",
    },
    MethodInfo {
        name: "dapo_overlong",
        summary: "length: DAPO soft overlong penalty, 0 / linear ramp over the buffer / -f",
        source: "Yu et al. 2025 (DAPO); verl overlong_buffer; Lmax 20480, Lbuf 4096, f 1",
    },
    MethodInfo {
        name: "fimi",
        summary: "length: r - f(L), f an MLP on a sinusoidal length encoding (loss -|pearson| + MSE)",
        source: "FiMi-RM (Bias Fitting to Mitigate Length Bias of Reward Model in RLHF); debias form unverified",
    },
    MethodInfo {
        name: "bradley_terry",
        summary: "pairwise loss: -log sigmoid(r_c - r_r - margin), label smoothing, centring",
        source: "TRL RewardTrainer, OpenRLHF PairWiseLoss; Secrets of RLHF II",
    },
    MethodInfo {
        name: "log_exp",
        summary: "pairwise loss: log(1 + exp(r_r - r_c)), no margin",
        source: "OpenRLHF LogExpLoss",
    },
    MethodInfo {
        name: "ctrl_u",
        summary: "uncertainty weighting: r * exp(-beta U)",
        source: "Zhang et al. 2024 (Ctrl-U)",
    },
    MethodInfo {
        name: "weighted_sum",
        summary: "composition: sum_i w_i r_i over named sources, every component kept",
        source: "goodhart",
    },
    MethodInfo {
        name: "math_verify",
        summary: "text reward: 1 if the final answer (boxed, ####, 'the answer is', last number) equals the reference, numerically or as normalised text",
        source: "HF Math-Verify; verl math_dapo / gsm8k scorers",
    },
    MethodInfo {
        name: "format",
        summary: "text reward: 1 if the response matches a regex or consists of the given <tag>...</tag> blocks",
        source: "DeepSeek-R1 format reward; TRL/open-r1 format_reward",
    },
    MethodInfo {
        name: "hf_reward_model",
        summary: "text reward: a HF *ForSequenceClassification model's score at the last non-pad token of tokenizer(prompt + response)",
        source: "transformers sequence classification; TRL RewardTrainer models",
    },
    MethodInfo {
        name: "unit_tests",
        summary: "text reward: fraction of the reference's unit tests the response's Python program passes, in a namespace sandbox with resource limits",
        source: "RLVR code rewards (VeRPO, verl sandbox_fusion); goodhart's sandbox",
    },
    MethodInfo {
        name: "llm_judge",
        summary: "text reward: an LLM judge's score (last `Score: N`, rescaled to [0, 1]) through an OpenAI-compatible endpoint, with retries, a cache and token/cost accounting",
        source: "LLM-as-a-judge (Zheng et al. 2023, MT-Bench); OpenAI chat-completions API",
    },
    MethodInfo {
        name: "rubric",
        summary: "text reward: (sum_{w>0} w g + sum_{w<0} |w| (1-g)) / sum |w| over a prompt's weighted criteria, one judge verdict {\"k\": {criteria_met}} per criterion",
        source: "Reward Hacking in Rubric-Based RL (arXiv 2605.12474); HealthBench rubrics",
    },
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// The config of each family, keyed by registry name, deserialised from TOML.
    #[derive(Debug, Deserialize)]
    #[serde(untagged)]
    enum AnyConfig {
        Aggregator(Aggregator),
        Shaping(ShapingConfig),
        Length(LengthConfig),
        Text(Box<TextRewardConfig>),
    }

    #[test]
    fn every_registered_name_deserialises_from_toml() {
        #[derive(Deserialize)]
        struct Wrap {
            method: toml::Value,
        }
        for m in REGISTRY {
            let body = match m.name {
                "ceil" => "kind = \"ceil\"\nvalue = 1.5".to_string(),
                "linear_length" => "kind = \"linear_length\"\ncoef = 0.01".to_string(),
                "bradley_terry" | "log_exp" => format!("variant = \"{}\"\nmargin = 0.0", m.name),
                "ctrl_u" => "beta = 0.5".to_string(),
                "weighted_sum" => continue,
                "hf_reward_model" => continue,
                "unit_tests" => "kind = \"unit_tests\"".to_string(),
                n => format!("kind = \"{n}\""),
            };
            let doc: Wrap = toml::from_str(&format!("[method]\n{body}\n")).unwrap();
            let value = doc.method;
            match m.name {
                "bradley_terry" | "log_exp" => {
                    let c: BtLossConfig = value.try_into().unwrap();
                    let expect = if m.name == "log_exp" {
                        BtVariant::LogExp
                    } else {
                        BtVariant::BradleyTerry
                    };
                    assert_eq!(c.variant, expect);
                }
                "ctrl_u" => {
                    let c: CtrlUConfig = value.try_into().unwrap();
                    assert_eq!(c.beta, 0.5);
                }
                name => {
                    let c: AnyConfig = value
                        .clone()
                        .try_into()
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    let got = match c {
                        AnyConfig::Aggregator(a) => a.name(),
                        AnyConfig::Shaping(s) => s.name(),
                        AnyConfig::Length(l) => l.name(),
                        AnyConfig::Text(t) => t.name(),
                    };
                    assert_eq!(got, name);
                }
            }
        }
    }

    #[test]
    fn configs_reject_unknown_keys_and_names_and_keep_defaults() {
        let uwo: Aggregator = toml::from_str("kind = \"uwo\"").unwrap();
        assert_eq!(
            uwo,
            Aggregator::Uwo {
                lambda: 0.1,
                unbiased: false
            }
        );
        let uwo: Aggregator =
            toml::from_str("kind = \"uwo\"\nlambda = 0.5\nunbiased = true").unwrap();
        assert_eq!(
            uwo,
            Aggregator::Uwo {
                lambda: 0.5,
                unbiased: true
            }
        );
        assert!(toml::from_str::<Aggregator>("kind = \"uwo\"\nlamda = 0.5").is_err());
        assert!(toml::from_str::<Aggregator>("kind = \"max\"").is_err());
        let par: ShapingConfig = toml::from_str("kind = \"par\"").unwrap();
        assert_eq!(par, ShapingConfig::Par { m: 10, k: 1.0 });
        assert!(toml::from_str::<ShapingConfig>("kind = \"par\"\nbeta = 1").is_err());
        let dapo: LengthConfig = toml::from_str("kind = \"dapo_overlong\"").unwrap();
        assert_eq!(
            dapo,
            LengthConfig::DapoOverlong(length::OverlongConfig {
                max_len: 20480.0,
                buffer: 4096.0,
                factor: 1.0
            })
        );
        assert!(toml::from_str::<LengthConfig>("kind = \"fimi\"\nwidth = 3").is_err());
        assert!(toml::from_str::<BtLossConfig>("variant = \"hinge\"").is_err());
        let names: std::collections::BTreeSet<_> = REGISTRY.iter().map(|m| m.name).collect();
        assert_eq!(names.len(), REGISTRY.len(), "registry names are unique");
    }
}
