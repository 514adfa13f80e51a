//! Mitigations compared on the overoptimisation task: for each arm (the `[rl]` algorithm
//! with the arm's overrides, against a proxy of `ensemble` reward models of the arm's
//! [`EnsembleKind`] combined by the arm's aggregation) and each seed, one RL run from that
//! seed's base policy, and with `best_of_n` set, best-of-n against each distinct proxy.
//! The tables give peak and final gold per arm, mean and standard deviation over seeds,
//! and each arm's final gold minus that of the arm it is compared with (`compare_to`,
//! default the first arm), paired by seed, with a bootstrap interval.
//!
//! Stages: `lm/sft/s{seed}`, the proxies' `lm/rm-pretrain/...` and `lm/proxy/...`
//! ([`super::lm`]), then `mitigations/{arm}/s{seed}` and `mitigations/bon/{arm}/s{seed}`.

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_reward::Aggregator;

use super::{
    lm::{
        self, base_policy, bon_stage, proxies, rl_stage, EnsembleKind, Monitors, ProxySpec, Trace,
    },
    mean_sd,
    overopt::BestOfNConfig,
    seed_mean, table, Experiment, Part,
};
use crate::{
    best_of_n::BonPoint,
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
    /// Best-of-n from the base policy against each distinct proxy of the arms (none when
    /// absent).
    pub best_of_n: Option<BestOfNConfig>,
}

impl Default for MitigationsExperiment {
    fn default() -> Self {
        let arm = |name: &str, rl: &str, ensemble: usize, aggregation: Aggregator| Arm {
            name: name.into(),
            rl: rl.parse().expect("built-in arm overrides are valid TOML"),
            ensemble,
            ensemble_kind: EnsembleKind::Scratch,
            aggregation,
            compare_to: None,
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
            best_of_n: None,
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
    /// How they start and what they share: `"scratch"` (fresh initialisations, the
    /// default), `"pretrain"` (each from its own pretrained trunk) or `"finetune"` (all
    /// from one pretrained trunk).
    #[serde(default)]
    pub ensemble_kind: EnsembleKind,
    /// How the members' rewards are combined.
    #[serde(default)]
    pub aggregation: Aggregator,
    /// The arm it is compared with, paired by seed (default: the first arm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compare_to: Option<String>,
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
    /// Best-of-n against its proxy (the curve of the first arm with the same proxy), when
    /// `best_of_n` is set.
    pub bon: Option<Vec<BonPoint>>,
}

impl Arm {
    /// The arm it is compared with: `compare_to`, else the first of `arms` (`None` for
    /// the first arm itself).
    fn reference<'a>(&'a self, arms: &'a [Arm]) -> Option<&'a str> {
        let name = self.compare_to.as_deref().unwrap_or(&arms[0].name);
        (name != self.name).then_some(name)
    }

    /// Its proxy.
    fn proxy(&self, pairs: usize) -> ProxySpec {
        ProxySpec::ensemble(pairs, self.ensemble, self.aggregation).of_kind(self.ensemble_kind)
    }
}

impl Experiment for MitigationsExperiment {
    const NAME: &'static str = "mitigations";
    const SUMMARY: &'static str =
        "each mitigation against the same proxy task, peak and final gold over seeds";
    type Output = Vec<ArmRun>;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("mitigations.seeds", self.seeds)?;
        positive("mitigations.pairs", self.pairs)?;
        if let Some(b) = &self.best_of_n {
            b.validate("mitigations.best_of_n")?;
        }
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
            if let Some(other) = &arm.compare_to {
                if other == &arm.name || !self.arms.iter().any(|a| &a.name == other) {
                    return Err(ConfigError::invalid(
                        format!("mitigations.arms[{i}].compare_to"),
                        format!("`{other}` is not another arm's name"),
                    ));
                }
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
        let (figures, tables) = summarize(self, runs);
        Part {
            figures,
            tables,
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
        // Best-of-n per distinct proxy: the first arm with it names the stage.
        let mut bons: Vec<(ProxySpec, Vec<BonPoint>)> = Vec::new();
        for (a, arm) in cfg.arms.iter().enumerate() {
            let proxy = arm.proxy(cfg.pairs);
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
                Monitors::default(),
                device,
            )?;
            let bon = match &cfg.best_of_n {
                Some(bon_cfg) => Some(match bons.iter().find(|b| b.0 == proxy) {
                    Some(b) => b.1.clone(),
                    None => {
                        let points = bon_stage::<B>(
                            runner,
                            config,
                            &format!("mitigations/bon/{}/s{seed}", arm.name),
                            "mitigations",
                            &format!("bon {}/s{seed}", arm.name),
                            proxy,
                            seed,
                            bon_cfg,
                            device,
                        )?;
                        bons.push((proxy, points.clone()));
                        points
                    }
                }),
                None => None,
            };
            out.push(ArmRun {
                arm: arm.name.clone(),
                seed,
                trace,
                bon,
            });
        }
    }
    Ok(out)
}

/// The mean and sample sd over `runs` of `get`, where it has a value.
fn over<'a>(runs: &[&'a ArmRun], get: impl Fn(&'a ArmRun) -> Option<f64>) -> (f64, f64) {
    mean_sd(runs.iter().filter_map(|r| get(r)))
}

/// Per seed, `get` of `arm`'s run minus `get` of `first`'s (seeds where both have one).
fn paired<'a>(
    arm: &[&'a ArmRun],
    first: &[&'a ArmRun],
    get: impl Fn(&'a ArmRun) -> Option<f64>,
) -> Vec<f64> {
    arm.iter()
        .filter_map(|r| {
            let f = first.iter().find(|f| f.seed == r.seed)?;
            Some(get(r)? - get(f)?)
        })
        .collect()
}

/// Figures and tables: peak and final gold per arm with the paired difference of final
/// gold to that of the arm it is compared with ([`Arm::compare_to`]); with best-of-n, the
/// gold it reached per distinct proxy.
pub fn summarize(cfg: &MitigationsExperiment, runs: &[ArmRun]) -> (Value, Vec<Value>) {
    let mut figures = serde_json::Map::new();
    let mut rows = Vec::new();
    let of = |name: &str| -> Vec<&ArmRun> { runs.iter().filter(|r| r.arm == name).collect() };
    let final_gold = |r: &ArmRun| r.trace.points.last().map(|p| p.gold);
    for arm in &cfg.arms {
        let mine = of(&arm.name);
        let peak = over(&mine, |r| r.trace.peak().map(|p| p.value));
        let fin = over(&mine, final_gold);
        let proxy = over(&mine, |r| r.trace.points.last().map(|p| p.proxy));
        let d = over(&mine, |r| r.trace.points.last().map(|p| p.d));
        let initial = over(&mine, |r| r.trace.points.first().map(|p| p.gold));
        let reference = arm.reference(&cfg.arms);
        let vs = reference.and_then(|other| {
            let diffs = paired(&mine, &of(other), final_gold);
            seed_mean(&diffs, &format!("mitigations/{}/final", arm.name))
        });
        figures.insert(
            arm.name.clone(),
            json!({"gold_peak": peak.0, "gold_peak_sd": peak.1, "gold_final": fin.0,
                   "gold_final_sd": fin.1, "proxy_final": proxy.0, "d_final": d.0,
                   "compared_with": reference,
                   "gold_final_difference": vs.as_ref().map(|m| m.mean),
                   "gold_final_difference_interval": vs.as_ref().map(|m| [m.lo, m.hi])}),
        );
        rows.push(json!([
            arm.name,
            initial.0,
            peak.0,
            peak.1,
            fin.0,
            fin.1,
            reference,
            vs.as_ref().map(|m| m.mean),
            vs.as_ref().map(|m| m.interval()),
            vs.as_ref().map(|m| format!("{} of {}", m.positive, m.n)),
            proxy.0,
            d.0,
            mine.len()
        ]));
    }
    let mut tables = vec![table(
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
            "compared with",
            "final difference (paired)",
            "95%",
            "higher in",
            "proxy final",
            "d final",
            "seeds",
        ],
        rows,
    )];
    if cfg.best_of_n.is_some() {
        tables.push(best_of_n_table(cfg, runs, &mut figures));
    }
    (Value::Object(figures), tables)
}

/// Best-of-n per distinct proxy (the arms sharing it named together): gold at n = 1 and
/// at the largest n (not the largest over n, which noise biases upwards), mean and sd
/// over seeds, and gold at the largest n minus that of the proxy of the arm its first arm
/// is compared with, paired by seed. Figures `bon/{arm}`.
fn best_of_n_table(
    cfg: &MitigationsExperiment,
    runs: &[ArmRun],
    figures: &mut serde_json::Map<String, Value>,
) -> Value {
    let mut groups: Vec<(ProxySpec, Vec<&Arm>)> = Vec::new();
    for arm in &cfg.arms {
        let spec = arm.proxy(cfg.pairs);
        match groups.iter_mut().find(|g| g.0 == spec) {
            Some(g) => g.1.push(arm),
            None => groups.push((spec, vec![arm])),
        }
    }
    let of = |name: &str| -> Vec<&ArmRun> { runs.iter().filter(|r| r.arm == name).collect() };
    let at = |r: &ArmRun, pick: fn(&[BonPoint]) -> Option<f64>| r.bon.as_deref().and_then(pick);
    let n1: fn(&[BonPoint]) -> Option<f64> = |b| b.first().map(|p| p.gold);
    let last: fn(&[BonPoint]) -> Option<f64> = |b| b.last().map(|p| p.gold);
    let mut rows = Vec::new();
    for (spec, arms) in &groups {
        let mine = of(&arms[0].name);
        let names: Vec<&str> = arms.iter().map(|a| a.name.as_str()).collect();
        let (g1, gl) = (over(&mine, |r| at(r, n1)), over(&mine, |r| at(r, last)));
        // The proxy of the arm the group's first arm is compared with, unless its own.
        let reference = arms[0].reference(&cfg.arms).and_then(|other| {
            let group = groups
                .iter()
                .find(|g| g.1.iter().any(|a| a.name == other))?;
            (group.0 != *spec).then_some(group.1[0].name.as_str())
        });
        let vs = reference.and_then(|other| {
            let diffs = paired(&mine, &of(other), |r| at(r, last));
            seed_mean(&diffs, &format!("mitigations/bon/{}", arms[0].name))
        });
        figures.insert(
            format!("bon/{}", arms[0].name),
            json!({"gold_n1": g1.0, "gold_largest_n": gl.0, "gold_largest_n_sd": gl.1,
                   "compared_with": reference,
                   "gold_largest_n_difference": vs.as_ref().map(|m| m.mean)}),
        );
        rows.push(json!([
            names.join(", "),
            spec.members,
            spec.kind.name(),
            spec.aggregation.name(),
            g1.0,
            gl.0,
            gl.1,
            reference,
            vs.as_ref().map(|m| m.mean),
            vs.as_ref().map(|m| m.interval()),
            vs.as_ref().map(|m| format!("{} of {}", m.positive, m.n)),
        ]));
    }
    let largest = cfg
        .best_of_n
        .as_ref()
        .and_then(|b| b.ns.iter().max().copied())
        .unwrap_or(0);
    table(
        &format!("Best-of-n against each proxy (largest n = {largest})"),
        &[
            "arms",
            "members",
            "kind",
            "aggregation",
            "gold n = 1",
            "gold at largest n",
            "sd",
            "compared with",
            "largest n difference (paired)",
            "95%",
            "higher in",
        ],
        rows,
    )
}
