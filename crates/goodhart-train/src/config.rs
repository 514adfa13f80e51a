//! Experiment configuration: one TOML file (DESIGN.md, "Configuration and runs").
//!
//! ```toml
//! name = "lab"
//! seed = 0
//!
//! [tomato]            # ORPO's tomato gridworld: base policy, proxy PPO, KL vs chi2 sweep
//! seeds = 5
//! action_kl = [0.01, 0.1]
//! chi2 = [0.01, 0.1]
//!
//! [language]          # the synthetic language (shared by overopt and mitigations)
//! [sft]               # the base policy
//! [proxy]             # proxy reward models
//! [rl]                # the RL algorithm (critic-free, any advantage estimator)
//!
//! [overopt]           # Gao et al.: RL and best-of-n against proxies from more and more pairs
//! pairs = [100, 1000]
//!
//! [mitigations]       # peak and final gold per method, over seeds
//! [[mitigations.arms]]
//! name = "kl"
//! rl = { regularizers = [{ kind = "kl", controller = { kind = "fixed", coef = 0.1 } }] }
//!
//! [train]             # one RL run per seed, the trained policy saved; on a HF model with:
//! [policy]            #   path = "MODEL_DIR" (reference = "OTHER_DIR")
//! [data]              #   path = "prompts.jsonl", columns = { prompt = "question", answer = "answer" }
//! [rewards]           #   proxy = { kind = "format", ... }, gold = { kind = "math_verify" }
//!
//! [daa]               # DPO-family training over betas (synthetic language, or a HF model with
//!                     #   [policy], [data] = a preference set, [rewards])
//! [detector_corpus]   # RL traces split by seed: detectors calibrated, then tested
//! [rubric]            # RL against weak and strong rubric verifiers: exploitation, the
//!                     #   self-internalisation gap (reads [sft] and [rl])
//! [multiturn]         # RL on a tool-use world: outcome, dense, gated and turn-level rewards
//!                     #   (reads [sft] and [rl])
//!
//! [sweep]             # `cargo xtask sweep`: one run per point of the product
//! "rl.lr" = [1e-3, 3e-3]
//! ```
//!
//! Every table denies unknown fields. [`ExperimentConfig::parse`] applies `--set`
//! overrides (`path.to.key=value`, the value read as TOML, else as a string) and rejects a
//! bad file before any work starts with the key path and the reason
//! ([`ConfigError::Invalid`]).

use std::{collections::BTreeMap, path::Path};

use serde::{Deserialize, Serialize};

use goodhart_envs::language::LanguageConfig;

pub use crate::experiments::{
    daa::{DaaExperiment, DaaMethod},
    detector_corpus::DetectorCorpusExperiment,
    mitigations::{Arm, MitigationsExperiment},
    multiturn::{MultiturnExperiment, TurnArm},
    overopt::{BestOfNConfig, OveroptExperiment},
    rubric::{RubricExperiment, VerifierArm},
    tomato::{ProxyInit, TomatoExperiment},
    train::{PolicyConfig, RewardsConfig, TrainExperiment},
};
use crate::{
    experiments::{Experiment, Visitor},
    policy_gradient::RlConfig,
    reward_model::ProxyConfig,
    sft::SftConfig,
};

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// Not valid TOML.
    #[error("not valid TOML: {0}")]
    Syntax(String),
    /// A `--set` override is malformed.
    #[error("--set `{arg}`: {reason}")]
    Override {
        /// The argument as given.
        arg: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A key has a wrong type or value, is unknown, or is missing.
    #[error("`{path}`: {reason}")]
    Invalid {
        /// Dotted key path (`tomato.ppo.lr`; `[i]` indexes arrays of tables).
        path: String,
        /// The reason.
        reason: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(path: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

type Result<T> = std::result::Result<T, ConfigError>;

/// A whole experiment. Each optional section adds one experiment to the run; a run with
/// none of them is rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The run's name: runs go to `runs/<name>/<id>/`.
    pub name: String,
    /// Base seed; arm `i` of an experiment with `seeds = k` uses `seed + i`.
    #[serde(default)]
    pub seed: u64,
    /// The tomato-watering experiment of ORPO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tomato: Option<TomatoExperiment>,
    /// The synthetic language of the language-model experiments; keys not given keep the
    /// values of [`crate::sft::lab_language`], on which the lab's defaults were measured.
    #[serde(default = "crate::sft::lab_language")]
    pub language: LanguageConfig,
    /// Supervised fine-tuning of the base policy.
    #[serde(default)]
    pub sft: SftConfig,
    /// Proxy reward models (the number of pairs is set by each experiment).
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// The RL algorithm of the language-model experiments.
    #[serde(default)]
    pub rl: RlConfig,
    /// Overoptimisation curves (Gao, Schulman & Hilton 2022).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overopt: Option<OveroptExperiment>,
    /// Mitigations compared on the overoptimisation task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mitigations: Option<MitigationsExperiment>,
    /// A Hugging Face model directory to train instead of the synthetic language's policy
    /// (`[train]` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
    /// The prompt set of a run on a model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::data::DataConfig>,
    /// The text rewards (proxy and gold) of a run on a model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewards: Option<RewardsConfig>,
    /// One RL run per seed, the trained policy saved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<TrainExperiment>,
    /// Direct alignment over betas on the synthetic language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daa: Option<DaaExperiment>,
    /// RL traces with known gold: detectors calibrated and tested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detector_corpus: Option<DetectorCorpusExperiment>,
    /// RL against rubric verifiers of graded strength: exploitation and the
    /// self-internalisation gap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rubric: Option<RubricExperiment>,
    /// RL on a tool-use world: outcome-only, ungated dense, gated (G-RA) and turn-level
    /// (IGPO, A2TGPO) rewards.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiturn: Option<MultiturnExperiment>,
    /// `cargo xtask sweep`: dotted key path -> values; one run per point of the product.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sweep: BTreeMap<String, Vec<toml::Value>>,
}

/// Replaces table `key` of `table`, if it is a table, by `defaults` with its keys merged in.
fn with_defaults<T: Serialize>(table: &mut toml::Table, key: &str, defaults: T) -> Result<()> {
    if let Some(toml::Value::Table(given)) = table.get(key) {
        let mut full =
            toml::Table::try_from(defaults).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        merge(&mut full, given);
        table.insert(key.into(), toml::Value::Table(full));
    }
    Ok(())
}

/// Deep-merges `over` into `base`: tables merge key by key, anything else replaces. A
/// table whose `kind` differs from the one it overrides (another estimator, loss,
/// controller...) replaces it whole: the old kind's options do not carry over.
pub(crate) fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o))
                if o.get("kind").is_none_or(|kind| b.get("kind") == Some(kind)) =>
            {
                merge(b, o)
            }
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Deserialises canonical TOML (as written by `toml::to_string`), mapping an error to
/// the key path of the line it points at.
pub(crate) fn from_toml<T: for<'de> Deserialize<'de>>(text: &str, prefix: &str) -> Result<T> {
    toml::from_str(text).map_err(|e| {
        let path = e
            .span()
            .map(|span| key_path(text, span.start))
            .unwrap_or_default();
        let path = match (prefix.is_empty(), path.is_empty()) {
            (true, _) => path,
            (false, true) => prefix.to_string(),
            (false, false) => format!("{prefix}.{path}"),
        };
        let path = if path.is_empty() {
            "(top level)".into()
        } else {
            path
        };
        ConfigError::invalid(path, e.message().trim())
    })
}

/// The dotted key path of the entry at byte `offset` of canonical TOML: the nearest table
/// header above it (`[a.b]`, or `[[a.b]]` counted into `a.b[i]`) plus the key on the line.
fn key_path(text: &str, offset: usize) -> String {
    let line_start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("");
    let mut header = String::new();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for l in text[..line_start].lines() {
        let l = l.trim();
        if let Some(h) = l.strip_prefix("[[").and_then(|s| s.strip_suffix("]]")) {
            let n = counts.entry(h.to_string()).or_insert(0);
            header = format!("{h}[{n}]");
            *n += 1;
        } else if let Some(h) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            header = h.to_string();
        }
    }
    let line = line.trim();
    let key = if line.starts_with('[') {
        // The error is about a table itself (e.g. an unknown section).
        let h = line.trim_start_matches('[').trim_end_matches(']');
        return h.to_string();
    } else {
        line.split('=')
            .next()
            .unwrap_or("")
            .trim()
            .trim_matches('"')
    };
    match (header.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => header,
        (false, false) => format!("{header}.{key}"),
    }
}

/// Joins every relative `path` / `reference` string under `value` to `base`.
fn paths_under(value: &mut toml::Value, base: &Path) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                match v {
                    toml::Value::String(p)
                        if (k == "path" || k == "reference")
                            && Path::new(p.as_str()).is_relative() =>
                    {
                        *p = base.join(p.as_str()).to_string_lossy().into_owned();
                    }
                    other => paths_under(other, base),
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|v| paths_under(v, base)),
        _ => {}
    }
}

/// Parses a `--set path.to.key=value` argument and applies it to `table`.
pub fn apply_override(table: &mut toml::Table, arg: &str) -> Result<()> {
    let bad = |reason: &str| ConfigError::Override {
        arg: arg.into(),
        reason: reason.into(),
    };
    let (path, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected `path.to.key=value`"))?;
    let keys: Vec<&str> = path.trim().split('.').map(str::trim).collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(bad("empty key in the path"));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let (last, parents) = keys.split_last().expect("split gives at least one key");
    let mut node = table;
    for (i, k) in parents.iter().enumerate() {
        let entry = node
            .entry(k.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = match entry {
            toml::Value::Table(t) => t,
            other => {
                return Err(bad(&format!(
                    "`{}` is not a table (it holds a {})",
                    keys[..=i].join("."),
                    other.type_str()
                )))
            }
        };
    }
    node.insert(last.to_string(), value);
    Ok(())
}

impl ExperimentConfig {
    /// Parses `text`, applies the `--set` overrides in order, and validates. Relative
    /// paths are the working directory's.
    pub fn parse(text: &str, overrides: &[String]) -> Result<Self> {
        Self::parse_at(text, overrides, Path::new(""))
    }

    /// [`ExperimentConfig::parse`] with relative paths (the `path` and `reference` keys of
    /// `[policy]`, `[data]` and `[rewards]`, at any depth) taken under `base` (`cargo
    /// xtask run` resolves a preset's under the repository and a file's under the working
    /// directory, so the run's `config.toml` holds absolute paths).
    pub fn parse_at(text: &str, overrides: &[String], base: &Path) -> Result<Self> {
        let mut table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax(e.to_string()))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        for section in ["policy", "data", "rewards"] {
            if let Some(v) = table.get_mut(section) {
                paths_under(v, base);
            }
        }
        Self::from_table(&table)
    }

    /// Deserialises and validates a table. A partial `[language]` or `[tomato]` table
    /// keeps the defaults of the keys it does not give, down to nested tables: with
    /// `tomato.ppo = { lr = 3e-4 }` the proxy PPO keeps the tomato experiment's 40
    /// iterations and 32 environments, not [`PpoConfig`]'s own defaults.
    pub fn from_table(table: &toml::Table) -> Result<Self> {
        let mut table = table.clone();
        with_defaults(&mut table, "language", crate::sft::lab_language())?;
        with_defaults(&mut table, "tomato", TomatoExperiment::default())?;
        let text = toml::to_string(&table).map_err(|e| ConfigError::Syntax(e.to_string()))?;
        let config: Self = from_toml(&text, "")?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved configuration as TOML (what `config.toml` of a run holds).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("an experiment config always serialises to TOML")
    }

    /// Semantic checks that serde cannot express, each naming its key path.
    pub fn validate(&self) -> Result<()> {
        struct Validate<'a>(&'a ExperimentConfig);
        impl Visitor for Validate<'_> {
            type Error = ConfigError;
            fn visit<E: Experiment>(&mut self, e: &E) -> Result<()> {
                e.validate(self.0)
            }
        }
        // First, before a check builds anything of the config's size (the language):
        // nothing larger than the machine's memory.
        crate::memory::check(self, crate::memory::machine_memory())?;
        if crate::experiments::visit(self, &mut Validate(self))? == 0 {
            let names: Vec<String> = crate::experiments::EXPERIMENTS
                .iter()
                .map(|(n, _)| format!("[{n}]"))
                .collect();
            return Err(ConfigError::invalid(
                "(top level)",
                format!("no experiment: add at least one of {}", names.join(", ")),
            ));
        }
        if self.train.is_none() && self.daa.is_none() {
            for (key, given) in [
                ("policy", self.policy.is_some()),
                ("data", self.data.is_some()),
                ("rewards", self.rewards.is_some()),
            ] {
                if given {
                    return Err(ConfigError::invalid(
                        key,
                        format!("[{key}] is read only by [train] and [daa]: add one of them"),
                    ));
                }
            }
        }
        for (key, values) in &self.sweep {
            if values.is_empty() {
                return Err(ConfigError::invalid(
                    format!("sweep.{key}"),
                    "has no values",
                ));
            }
        }
        Ok(())
    }

    /// The configurations of a sweep: one per point of the product of `[sweep]`, each
    /// with its label (`key=value,...`) and without the sweep section. A config without a
    /// sweep gives itself.
    pub fn expand_sweep(&self) -> Result<Vec<(String, Self)>> {
        let mut base = self.clone();
        base.sweep.clear();
        let mut points: Vec<(String, toml::Table)> = vec![(
            String::new(),
            toml::Table::try_from(&base).map_err(|e| ConfigError::Syntax(e.to_string()))?,
        )];
        for (key, values) in &self.sweep {
            let mut next = Vec::with_capacity(points.len() * values.len());
            for (label, table) in &points {
                for v in values {
                    let mut t = table.clone();
                    let shown = match v {
                        toml::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    apply_override(&mut t, &format!("{key}={v}"))?;
                    let sep = if label.is_empty() { "" } else { "," };
                    next.push((format!("{label}{sep}{key}={shown}"), t));
                }
            }
            points = next;
        }
        points
            .into_iter()
            .map(|(label, t)| Ok((label, Self::from_table(&t)?)))
            .collect()
    }
}

/// Maps an algorithm's own validation error to the key path of its config section: the
/// algorithms name keys under their own prefix (`pg.lr`, `ppo.clip`), which becomes
/// `section.lr`.
pub(crate) fn section(path: &str, checked: goodhart_core::Result<()>) -> Result<()> {
    checked.map_err(|e| at(path, e))
}

pub(crate) fn at(path: &str, e: goodhart_core::GoodhartError) -> ConfigError {
    match e {
        goodhart_core::GoodhartError::InvalidArgument { name, reason } => {
            let key = name.split_once('.').map_or(name.as_str(), |(_, k)| k);
            ConfigError::invalid(format!("{path}.{key}"), reason)
        }
        other => ConfigError::invalid(path, other.to_string()),
    }
}

pub(crate) fn positive(path: &str, v: usize) -> Result<()> {
    if v == 0 {
        return Err(ConfigError::invalid(path, "must be at least 1"));
    }
    Ok(())
}

pub(crate) fn coefficients(path: &str, v: &[f64]) -> Result<()> {
    for (i, c) in v.iter().enumerate() {
        if !(c.is_finite() && *c >= 0.0) {
            return Err(ConfigError::invalid(
                format!("{path}[{i}]"),
                format!("{c} is not a finite, non-negative coefficient"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "name = \"t\"\n[tomato]\nseeds = 2\n";

    fn err(text: &str, sets: &[&str]) -> ConfigError {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        ExperimentConfig::parse(text, &sets).unwrap_err()
    }

    #[test]
    fn merge_keeps_options_of_the_same_kind_only() {
        let mut base: toml::Table =
            "a = { kind = \"grpo\", eps = 1e-6, norm = true }\nb = 1\nc = { x = 1, y = 2 }"
                .parse()
                .unwrap();
        let over: toml::Table = "a = { kind = \"gae\", lambda = 0.9 }\nc = { y = 3 }"
            .parse()
            .unwrap();
        merge(&mut base, &over);
        let want: toml::Table = "a = { kind = \"gae\", lambda = 0.9 }\nb = 1\nc = { x = 1, y = 3 }"
            .parse()
            .unwrap();
        assert_eq!(base, want);
        let same: toml::Table = "a = { kind = \"gae\", gamma = 0.5 }".parse().unwrap();
        merge(&mut base, &same);
        assert_eq!(base["a"]["lambda"].as_float(), Some(0.9));
        assert_eq!(base["a"]["gamma"].as_float(), Some(0.5));
    }

    fn path_of(e: ConfigError) -> String {
        match e {
            ConfigError::Invalid { path, .. } => path,
            other => panic!("expected a key-path error, got {other}"),
        }
    }

    #[test]
    fn errors_name_the_key_path() {
        assert_eq!(
            path_of(err(MINIMAL, &["tomato.ppo.lrr=1"])),
            "tomato.ppo.lrr"
        );
        assert_eq!(path_of(err(MINIMAL, &["rl.lr=\"fast\""])), "rl.lr");
        assert_eq!(
            path_of(err("name = \"t\"\nbogus = 1\n[tomato]\n", &[])),
            "bogus"
        );
        assert_eq!(
            path_of(err(
                "name = \"t\"\n[mitigations]\n[[mitigations.arms]]\nname = \"a\"\n[[mitigations.arms]]\nname = \"b\"\nensembl = 2\n",
                &[]
            )),
            "mitigations.arms[1].ensembl"
        );
        assert_eq!(
            path_of(err(
                "name = \"t\"\n[mitigations]\narms = [{ name = \"a\", rl = { stepz = 3 } }]\n",
                &[]
            )),
            "mitigations.arms[0].rl.stepz"
        );
        assert_eq!(path_of(err(MINIMAL, &["tomato.seeds=0"])), "tomato.seeds");
        // The algorithms' own checks run before any work, under the TOML key path.
        let lm = "name = \"t\"\n[overopt]\n";
        assert_eq!(path_of(err(lm, &["rl.steps=0"])), "rl.steps");
        assert_eq!(path_of(err(lm, &["sft.batch=0"])), "sft.batch");
        assert_eq!(
            path_of(err(MINIMAL, &["tomato.ppo.envs=0"])),
            "tomato.ppo.envs"
        );
        assert_eq!(
            path_of(err(MINIMAL, &["tomato.chi2=[0.1, -1]"])),
            "tomato.chi2[1]"
        );
        let det = "name = \"t\"\n[overopt]\ndetectors = [{ kind = \"gold-aware\" }, \
                   { kind = \"proxy-only\", warmup = 1 }]\n";
        assert_eq!(path_of(err(det, &[])), "overopt.detectors[1].warmup");
        assert_eq!(
            path_of(err(
                MINIMAL,
                &["tomato.proxy_init=\"base\"", "tomato.ppo.hidden=[64, 64]"]
            )),
            "tomato.ppo.hidden"
        );
        assert_eq!(
            path_of(err(MINIMAL, &["tomato.proxy_init=\"bas\""])),
            "tomato.proxy_init"
        );
        assert_eq!(path_of(err("name = \"t\"\n", &[])), "(top level)");
        assert!(matches!(err("name = ", &[]), ConfigError::Syntax(_)));
        assert!(matches!(
            err(MINIMAL, &["novalue"]),
            ConfigError::Override { .. }
        ));
        assert!(matches!(
            err(MINIMAL, &["name.x=1"]),
            ConfigError::Override { .. }
        ));
    }

    #[test]
    fn overrides_read_toml_values_else_strings() {
        let c = ExperimentConfig::parse(
            MINIMAL,
            &[
                "seed=9".into(),
                "tomato.chi2=[0.5]".into(),
                "name=other".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.seed, 9);
        assert_eq!(c.tomato.as_ref().unwrap().chi2, vec![0.5]);
        assert_eq!(c.name, "other");
        // Unset keys keep their defaults; the resolved config round-trips.
        assert_eq!(c.tomato.as_ref().unwrap().base_eps, 0.1);
        // A partial table keeps the experiment's defaults, nested tables included.
        let t = ExperimentConfig::parse(MINIMAL, &["tomato.ppo={ lr = 3e-4 }".into()])
            .unwrap()
            .tomato
            .unwrap();
        let d = TomatoExperiment::default();
        assert_eq!((t.ppo.lr, t.ppo.iterations, t.ppo.envs), (3e-4, 40, 32));
        assert_eq!((t.seeds, t.base), (2, d.base));
        assert_eq!(c.language, crate::sft::lab_language());
        let c2 = ExperimentConfig::parse(MINIMAL, &["language.topics=3".into()]).unwrap();
        assert_eq!(c2.language.topics, 3);
        assert_eq!(c2.language.eos_logit, crate::sft::lab_language().eos_logit);
        assert_eq!(ExperimentConfig::parse(&c.to_toml(), &[]).unwrap(), c);
    }

    #[test]
    fn arms_override_rl_key_by_key() {
        let c = ExperimentConfig::parse(
            "name = \"t\"\n[rl]\nsteps = 7\n[mitigations]\narms = [{ name = \"kl\", rl = { regularizers = [{ kind = \"kl\", controller = { kind = \"fixed\", coef = 0.3 } }] } }]\n",
            &[],
        )
        .unwrap();
        let arm = &c.mitigations.as_ref().unwrap().arms[0];
        let pg = arm.rl_config(&c.rl, 0).unwrap();
        assert_eq!(pg.steps, 7, "kept from [rl]");
        assert_eq!(
            pg.regularizers,
            [goodhart_regularize::RegularizerConfig::Kl(
                goodhart_regularize::kl::KlConfig {
                    controller: goodhart_regularize::controller::ControllerConfig::Fixed {
                        coef: 0.3
                    },
                    ..Default::default()
                }
            )]
        );
        assert_eq!(arm.ensemble, 1);
    }

    #[test]
    fn cross_section_checks_name_the_key() {
        for (text, path) in [
            // A detector reading a key the trainer never logs.
            ("name = \"t\"\n[overopt]\ndetectors = [{ kind = \"proxy-only\", signals = [{ key = \"entropi\", transform = \"level\", direction = \"down\" }] }]\n", "overopt.detectors[0].signals[0].key"),
            ("name = \"t\"\n[overopt]\ndetectors = [{ kind = \"gold-aware\", gold_key = \"gold\" }]\n", "overopt.detectors[0].gold_key"),
            // Responses longer than the models.
            ("name = \"t\"\n[overopt]\n[rl]\nmax_new_tokens = 40\n", "rl.max_new_tokens"),
            // Refused estimators, and an arm's ensemble too small for Ctrl-U.
            ("name = \"t\"\n[overopt]\n[rl]\nadvantage = { kind = \"igpo\" }\n", "rl.advantage.kind"),
            ("name = \"t\"\n[mitigations]\narms = [{ name = \"u\", rl = { ctrl_u = {} } }]\n", "mitigations.arms[0].rl.ctrl_u"),
            // The gridworld's own settings, under the key as written.
            ("name = \"t\"\n[tomato]\nenv = { horizon = 0 }\n", "tomato.env.horizon"),
            ("name = \"t\"\n[tomato]\nenv = { eps = 1.5 }\n", "tomato.env.eps"),
            ("name = \"t\"\n[tomato]\nenv = { dry_distance = -1.0 }\n", "tomato.env.dry_distance"),
        ] {
            assert_eq!(path_of(ExperimentConfig::parse(text, &[]).unwrap_err()), path, "{text}");
        }
        // A regulariser's own metrics are keys a detector may read.
        let ok = "name = \"t\"\n[overopt]\ndetectors = [{ kind = \"proxy-only\", signals = [{ key = \"kl/coef\", transform = \"level\", direction = \"up\" }] }]\n[rl]\nregularizers = [{ kind = \"kl\" }]\n";
        ExperimentConfig::parse(ok, &[]).unwrap();
        let ok = ExperimentConfig::parse("name = \"t\"\n[mitigations]\narms = [{ name = \"u\", rl = { ctrl_u = {} }, ensemble = 3 }]\n", &[]);
        assert!(ok.is_ok(), "{ok:?}");
    }

    #[test]
    fn sweeps_expand_to_the_product() {
        let c = ExperimentConfig::parse(
            "name = \"t\"\n[tomato]\n[sweep]\n\"tomato.seeds\" = [1, 2]\nseed = [0, 5, 6]\n",
            &[],
        )
        .unwrap();
        let points = c.expand_sweep().unwrap();
        assert_eq!(points.len(), 6);
        assert_eq!(points[0].0, "seed=0,tomato.seeds=1");
        assert_eq!(points[5].0, "seed=6,tomato.seeds=2");
        assert_eq!(points[5].1.seed, 6);
        assert_eq!(points[5].1.tomato.as_ref().unwrap().seeds, 2);
        assert!(points.iter().all(|(_, p)| p.sweep.is_empty()));
        // A bad point is rejected with its key path.
        let bad = ExperimentConfig::parse(
            "name = \"t\"\n[tomato]\n[sweep]\n\"tomato.seeds\" = [1, 0]\n",
            &[],
        )
        .unwrap();
        assert_eq!(path_of(bad.expand_sweep().unwrap_err()), "tomato.seeds");
    }
}
