//! Mitigations compared on the overoptimisation task: for each arm (the `[rl]` algorithm
//! with the arm's overrides, against a proxy of `ensemble` reward models combined by the
//! arm's aggregation) and each seed, one RL run from that seed's base policy. The table
//! gives peak and final gold per arm, mean and standard deviation over seeds.
//!
//! Stages: `lm/sft/s{seed}` and `lm/proxy/p{pairs}/k{k}/s{seed}` ([`super::lm`]), then
//! `mitigations/{arm}/s{seed}`.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_reward::Aggregator;

use super::{
    lm::{self, base_policy, proxies, rl_stage, ProxySpec, Trace},
    mean_sd, table, Experiment, Part,
};
use crate::{
    config::{from_toml, merge, positive, ConfigError, ExperimentConfig},
    policy_gradient::RlConfig,
    runner::{Result, Runner},
};

/// Mitigations on the overoptimisation task: each arm is the `[rl]` algorithm with
/// overrides and a proxy of one or more reward models, over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MitigationsExperiment {
    /// Seeds per arm.
    pub seeds: usize,
    /// Preference pairs of each proxy reward model.
    pub pairs: usize,
    /// The methods compared.
    pub arms: Vec<Arm>,
}

impl Default for MitigationsExperiment {
    fn default() -> Self {
        let arm = |name: &str, rl: &str, ensemble: usize, aggregation: Aggregator| Arm {
            name: name.into(),
            rl: rl.parse().expect("built-in arm overrides are valid TOML"),
            ensemble,
            aggregation,
        };
        Self {
            seeds: 3,
            pairs: 200,
            arms: vec![
                arm("none", "", 1, Aggregator::Mean),
                arm(
                    "kl",
                    "regularizers = [{ kind = \"kl\", estimator = \"k1\", placement = \"reward\", \
                     controller = { kind = \"fixed\", coef = 0.05 } }]",
                    1,
                    Aggregator::Mean,
                ),
                arm(
                    "ensemble-uwo",
                    "",
                    3,
                    Aggregator::Uwo {
                        lambda: 0.1,
                        unbiased: false,
                    },
                ),
                arm(
                    "par",
                    "reward_shaping = { kind = \"par\" }",
                    1,
                    Aggregator::Mean,
                ),
                arm(
                    "sequence-chi2",
                    "regularizers = [{ kind = \"sequence_chi2\", coef = 0.1 }]",
                    1,
                    Aggregator::Mean,
                ),
            ],
        }
    }
}

/// One method of the mitigations experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    /// Its name in tables and charts.
    pub name: String,
    /// Keys of `[rl]` this arm overrides (merged key by key).
    #[serde(default)]
    pub rl: toml::Table,
    /// Reward models in the proxy (different seeds); 1 is a single model.
    #[serde(default = "one")]
    pub ensemble: usize,
    /// How the members' rewards are combined.
    #[serde(default)]
    pub aggregation: Aggregator,
}

fn one() -> usize {
    1
}

impl Arm {
    /// The `[rl]` algorithm with this arm's overrides.
    pub fn rl_config(
        &self,
        base: &RlConfig,
        index: usize,
    ) -> std::result::Result<RlConfig, ConfigError> {
        rl_with(base, &self.rl, &format!("mitigations.arms[{index}].rl"))
    }
}

/// `base` with the keys of `over` merged in (key by key; see [`merge`]); errors name
/// `path`.
pub(crate) fn rl_with(
    base: &RlConfig,
    over: &toml::Table,
    path: &str,
) -> std::result::Result<RlConfig, ConfigError> {
    let mut table = toml::Table::try_from(base)
        .map_err(|e| ConfigError::invalid(path, format!("cannot serialise [rl]: {e}")))?;
    merge(&mut table, over);
    let text = toml::to_string(&table)
        .map_err(|e| ConfigError::invalid(path, format!("cannot serialise: {e}")))?;
    from_toml(&text, path)
}

/// One RL run of one arm.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArmRun {
    /// The arm's name.
    pub arm: String,
    /// The seed.
    pub seed: u64,
    /// The trace.
    pub trace: Trace,
}

impl Experiment for MitigationsExperiment {
    const NAME: &'static str = "mitigations";
    const SUMMARY: &'static str =
        "each mitigation against the same proxy task, peak and final gold over seeds";
    type Output = Vec<ArmRun>;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("mitigations.seeds", self.seeds)?;
        positive("mitigations.pairs", self.pairs)?;
        if self.arms.is_empty() {
            return Err(ConfigError::invalid("mitigations.arms", "is empty"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, arm) in self.arms.iter().enumerate() {
            positive(&format!("mitigations.arms[{i}].ensemble"), arm.ensemble)?;
            if !names.insert(arm.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("mitigations.arms[{i}].name"),
                    format!("`{}` is used by two arms", arm.name),
                ));
            }
            let rl = arm.rl_config(&config.rl, i)?;
            lm::validate(
                config,
                &rl,
                &format!("mitigations.arms[{i}].rl"),
                arm.ensemble,
            )?;
        }
        Ok(())
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Vec<ArmRun>> {
        run::<B>(runner, config, self, device)
    }

    fn summarize(&self, runs: &Vec<ArmRun>) -> Part {
        let (figures, table) = summarize(self, runs);
        Part {
            figures,
            tables: vec![table],
            ..Part::default()
        }
    }
}

/// Runs every arm over every seed.
pub fn run<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &MitigationsExperiment,
    device: &B::Device,
) -> Result<Vec<ArmRun>> {
    let mut out = Vec::new();
    for i in 0..cfg.seeds {
        let seed = config.seed + i as u64;
        base_policy::<B>(runner, config, seed, device)?;
        for (a, arm) in cfg.arms.iter().enumerate() {
            let proxy = ProxySpec::ensemble(cfg.pairs, arm.ensemble, arm.aggregation);
            proxies::<B>(runner, config, proxy, seed, device)?;
            let pg = arm.rl_config(&config.rl, a)?;
            let trace = rl_stage::<B>(
                runner,
                config,
                &format!("mitigations/{}/s{seed}", arm.name),
                "mitigations",
                &format!("{}/s{seed}", arm.name),
                &pg,
                seed,
                proxy,
                None,
                false,
                device,
            )?;
            out.push(ArmRun {
                arm: arm.name.clone(),
                seed,
                trace,
            });
        }
    }
    Ok(out)
}

/// Figures and the table of peak and final gold per arm.
pub fn summarize(cfg: &MitigationsExperiment, runs: &[ArmRun]) -> (Value, Value) {
    let mut figures = serde_json::Map::new();
    let mut rows = Vec::new();
    for arm in &cfg.arms {
        let mine: Vec<&ArmRun> = runs.iter().filter(|r| r.arm == arm.name).collect();
        let peak = mean_sd(mine.iter().filter_map(|r| r.trace.peak()).map(|p| p.value));
        let fin = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.last())
                .map(|p| p.gold),
        );
        let proxy = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.last())
                .map(|p| p.proxy),
        );
        let d = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.last())
                .map(|p| p.d),
        );
        let initial = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.first())
                .map(|p| p.gold),
        );
        figures.insert(
            arm.name.clone(),
            json!({"gold_peak": peak.0, "gold_peak_sd": peak.1, "gold_final": fin.0,
                   "gold_final_sd": fin.1, "proxy_final": proxy.0, "d_final": d.0}),
        );
        rows.push(json!([
            arm.name,
            initial.0,
            peak.0,
            peak.1,
            fin.0,
            fin.1,
            proxy.0,
            d.0,
            mine.len()
        ]));
    }
    let table = table(
        &format!(
            "Mitigations: gold per method ({} seeds, proxy from {} pairs)",
            cfg.seeds, cfg.pairs
        ),
        &[
            "method",
            "gold initial",
            "gold peak (smoothed)",
            "sd",
            "gold final",
            "sd",
            "proxy final",
            "d final",
            "seeds",
        ],
        rows,
    );
    (Value::Object(figures), table)
}
