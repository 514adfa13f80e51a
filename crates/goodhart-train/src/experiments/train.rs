//! One RL run per seed of the `[rl]` algorithm, on a policy and a prompt set, against a
//! proxy with the gold measured on every sample; the trained policy is saved.
//!
//! - With `[policy]`, `[data]` and `[rewards]`: the policy is a Hugging Face model
//!   directory (`[policy] path`; the frozen reference from `reference`, by default the
//!   same weights), the prompts a JSONL or Parquet set encoded by its tokenizer
//!   ([`crate::task::TextTask`]), proxy and gold text rewards (`math_verify`, `format`)
//!   on the decoded responses. The trained policy is written as a model directory
//!   transformers loads: `checkpoints/train/s{seed}/policy/`.
//! - Without them: the synthetic language's SFT base policy against a learned proxy of
//!   `pairs` pairs, its gold measured (`checkpoints/train/s{seed}/policy.mpk`).
//!
//! Stages: `train/s{seed}` (and, on the synthetic language, the base and proxy stages of
//! [`super::lm`]).

use std::path::PathBuf;

use burn::{module::AutodiffModule, tensor::backend::AutodiffBackend};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::seed;
use goodhart_policy::{hf, pipeline::check_vocab, HfTokenizer, TextModel};
use goodhart_regularize::RegularizerConfig;
use goodhart_reward::TextRewardConfig;

use super::{
    checkpoint_error,
    lm::{self, base_policy, proxies, record, rl_stage, Monitors, ProxySpec, Trace, TracePoint},
    mean_sd, stage_error, table, Experiment, Logger, Part,
};
use crate::{
    config::{positive, section, ConfigError, ExperimentConfig},
    data::{DataConfig, PromptRow},
    policy_gradient::{self, RlConfig},
    runner::{Result, Runner},
    task::{TextTask, TextTaskSpec},
};

/// `[train]`: one RL run per seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainExperiment {
    /// Runs, from seeds `seed`, `seed + 1`, ...
    pub seeds: usize,
    /// Preference pairs of the learned proxy (synthetic language only).
    pub pairs: usize,
}

impl Default for TrainExperiment {
    fn default() -> Self {
        Self {
            seeds: 1,
            pairs: 200,
        }
    }
}

/// `[policy]`: a Hugging Face model directory to train.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The model directory (`config.json`, safetensors, `tokenizer.json`).
    pub path: PathBuf,
    /// The frozen reference's model directory (same architecture and vocabulary); the
    /// policy's own initial weights when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PathBuf>,
}

/// `[rewards]`: the text rewards of a run on a prompt set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardsConfig {
    /// What the policy is trained on.
    pub proxy: TextRewardConfig,
    /// What is measured on every sample (and trained on only if `[rl] components` names
    /// `gold`).
    pub gold: TextRewardConfig,
}

/// One seed's run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainRun {
    /// The seed.
    pub seed: u64,
    /// The trace.
    pub trace: Trace,
    /// Where the trained policy is, relative to the run directory.
    pub policy: String,
}

/// The HF sections when all three are given; `None` when none is; an error naming the
/// missing ones otherwise.
pub(super) fn hf_sections(
    config: &ExperimentConfig,
) -> std::result::Result<Option<(&PolicyConfig, &DataConfig, &RewardsConfig)>, ConfigError> {
    match (&config.policy, &config.data, &config.rewards) {
        (Some(p), Some(d), Some(r)) => Ok(Some((p, d, r))),
        (None, None, None) => Ok(None),
        (p, d, r) => {
            let missing: Vec<&str> = [
                ("[policy]", p.is_none()),
                ("[data]", d.is_none()),
                ("[rewards]", r.is_none()),
            ]
            .iter()
            .filter(|(_, m)| *m)
            .map(|(n, _)| *n)
            .collect();
            Err(ConfigError::invalid(
                "train",
                format!(
                    "a run on a model directory needs [policy], [data] and [rewards] together: \
                     missing {}",
                    missing.join(", ")
                ),
            ))
        }
    }
}

/// The prompt set's rows, each with an answer and a rubric where a reward needs them.
fn prompt_rows(
    data: &DataConfig,
    rewards: &RewardsConfig,
) -> std::result::Result<Vec<PromptRow>, ConfigError> {
    let rows = data
        .read_prompts()
        .map_err(|e| ConfigError::invalid("data", e.to_string()))?;
    check_rows(&rows, rewards)?;
    Ok(rows)
}

/// An error naming the first row without the answer or rubric a reward needs.
pub(super) fn check_rows(
    rows: &[PromptRow],
    rewards: &RewardsConfig,
) -> std::result::Result<(), ConfigError> {
    /// Whether a row has the column a reward needs.
    type Has = fn(&PromptRow) -> bool;
    for (key, reward) in [("proxy", &rewards.proxy), ("gold", &rewards.gold)] {
        let needs: [(&str, bool, Has); 2] = [
            ("answer", reward.needs_answers(), |r| r.answer.is_some()),
            ("rubric", reward.needs_rubrics(), |r| r.rubric.is_some()),
        ];
        for (what, needed, has) in needs {
            if let Some(row) = rows.iter().find(|r| needed && !has(r)) {
                return Err(ConfigError::invalid(
                    format!("data.columns.{what}"),
                    format!(
                        "{} has no {what}, and rewards.{key} ({}) needs one for every prompt",
                        row.at,
                        reward.name()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The checks of `[policy]` before any work: the model's config (with an EOS id), its
/// tokenizer's vocabulary, and a reference of the same architecture; returns the
/// model's config.
pub(super) fn validate_policy(
    policy: &PolicyConfig,
) -> std::result::Result<hf::HfConfig, ConfigError> {
    let model = hf::HfConfig::from_dir(&policy.path)
        .map_err(|e| ConfigError::invalid("policy.path", e.to_string()))?;
    if model.eos_token_ids.is_empty() {
        return Err(ConfigError::invalid(
            "policy.path",
            "the model names no eos_token_id: a response could never end",
        ));
    }
    HfTokenizer::from_dir(&policy.path)
        .and_then(|t| check_vocab(&t, model.model.vocab_size))
        .map_err(|e| ConfigError::invalid("policy.path", e.to_string()))?;
    if let Some(dir) = &policy.reference {
        let reference = hf::HfConfig::from_dir(dir)
            .map_err(|e| ConfigError::invalid("policy.reference", e.to_string()))?;
        let json = |c: &goodhart_policy::TransformerConfig| serde_json::to_value(c).ok();
        if json(&reference.model) != json(&model.model) {
            return Err(ConfigError::invalid(
                "policy.reference",
                "its architecture (config.json) differs from the policy's",
            ));
        }
    }
    Ok(model)
}

/// The frozen reference of a run on a model directory: `[policy] reference`, or the
/// policy's own initial weights.
pub(super) fn load_reference<B: AutodiffBackend>(
    policy_cfg: &PolicyConfig,
    policy: &goodhart_policy::TransformerLm<B>,
    stage: &str,
    device: &B::Device,
) -> Result<goodhart_policy::TransformerLm<B::InnerBackend>> {
    Ok(match &policy_cfg.reference {
        Some(path) => {
            hf::load::<B::InnerBackend>(path, device)
                .map_err(|e| checkpoint_error(stage)(e))?
                .0
        }
        None => policy.valid(),
    })
}

fn validate_hf(
    config: &ExperimentConfig,
    policy: &PolicyConfig,
    data: &DataConfig,
    rewards: &RewardsConfig,
) -> std::result::Result<(), ConfigError> {
    let model = validate_policy(policy)?;
    section("rl", config.rl.validate(1))?;
    if config
        .rl
        .regularizers
        .iter()
        .any(|r| matches!(r, RegularizerConfig::SftAnchor(_)))
    {
        return Err(ConfigError::invalid(
            "rl.regularizers",
            "sft_anchor needs the base policy's SFT data, which only the synthetic language has",
        ));
    }
    if config.rl.max_new_tokens >= model.model.max_seq_len {
        return Err(ConfigError::invalid(
            "rl.max_new_tokens",
            format!(
                "{} leaves no room for a prompt in the model's {} positions",
                config.rl.max_new_tokens, model.model.max_seq_len
            ),
        ));
    }
    section("rewards.proxy", rewards.proxy.validate())?;
    section("rewards.gold", rewards.gold.validate())?;
    prompt_rows(data, rewards).map(|_| ())
}

impl Experiment for TrainExperiment {
    const NAME: &'static str = "train";
    const SUMMARY: &'static str =
        "one RL run per seed on a policy and prompt set, gold measured, the trained policy saved";
    type Output = Vec<TrainRun>;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("train.seeds", self.seeds)?;
        match hf_sections(config)? {
            Some((policy, data, rewards)) => validate_hf(config, policy, data, rewards),
            None => {
                positive("train.pairs", self.pairs)?;
                lm::validate(config, &config.rl, "rl", 1)
            }
        }
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Vec<TrainRun>> {
        let hf = hf_sections(config)?;
        let mut out = Vec::with_capacity(self.seeds);
        for i in 0..self.seeds {
            let seed = config.seed + i as u64;
            let name = format!("train/s{seed}");
            let run = match hf {
                Some((policy, data, rewards)) => {
                    hf_run::<B>(runner, config, policy, data, rewards, &name, seed, device)?
                }
                None => {
                    base_policy::<B>(runner, config, seed, device)?;
                    proxies::<B>(runner, config, ProxySpec::single(self.pairs), seed, device)?;
                    let rel = format!("{name}/policy");
                    let path = runner.artifact(&rel)?;
                    let trace = rl_stage::<B>(
                        runner,
                        config,
                        &name,
                        Self::NAME,
                        &format!("s{seed}"),
                        &config.rl,
                        seed,
                        ProxySpec::single(self.pairs),
                        Some(path),
                        Monitors::default(),
                        device,
                    )?;
                    TrainRun {
                        seed,
                        trace,
                        policy: format!("checkpoints/{rel}.mpk"),
                    }
                }
            };
            out.push(run);
        }
        Ok(out)
    }

    fn summarize(&self, runs: &Vec<TrainRun>) -> Part {
        let (figures, table) = summarize(runs);
        Part {
            figures,
            tables: vec![table],
            ..Part::default()
        }
    }
}

/// Stage `train/s{seed}` on a model directory and a prompt set.
#[allow(clippy::too_many_arguments)]
fn hf_run<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    policy_cfg: &PolicyConfig,
    data: &DataConfig,
    rewards: &RewardsConfig,
    name: &str,
    seed: u64,
    device: &B::Device,
) -> Result<TrainRun> {
    let rel = format!("{name}/policy");
    let dir = runner.artifact(&rel)?;
    let runner_dir = runner.dir().path().to_path_buf();
    let pg = RlConfig {
        on_nan: runner.nan_policy(),
        ..config.rl.clone()
    };
    let trace = runner.stage(name, |log| {
        log.expect_lines(pg.steps as u64);
        let TextModel {
            model: policy,
            config: hf_config,
            tokenizer,
        } = TextModel::<B>::load(&policy_cfg.path, device).map_err(stage_error(name))?;
        let reference = load_reference(policy_cfg, &policy, name, device)?;
        let rows = prompt_rows(data, rewards)?;
        let spec = TextTaskSpec {
            vocab_size: policy.vocab_size(),
            pad_id: hf_config.pad_id(),
            end_ids: hf_config.eos_token_ids.clone(),
            chat: data.chat,
            max_prompt_len: policy.trunk.max_seq_len().saturating_sub(pg.max_new_tokens),
        };
        let task = text_task::<B::InnerBackend>(
            tokenizer,
            &rows,
            &spec,
            rewards,
            &runner_dir,
            name,
            device,
        )?;
        let series = format!("s{seed}");
        let mut logger = Logger::new(log, TrainExperiment::NAME, &series);
        let mut points = Vec::new();
        let trained = policy_gradient::train(
            &pg,
            &task,
            policy,
            &reference,
            seed::derive(seed, name),
            device,
            &mut |line: &policy_gradient::StepLine| record(line, &mut points, &mut logger),
        )
        .map_err(stage_error(name))?;
        hf::save(&trained, &hf_config, &dir).map_err(|e| checkpoint_error(name)(e))?;
        Ok(Trace { series, points })
    })?;
    Ok(TrainRun {
        seed,
        trace,
        policy: format!("checkpoints/{rel}"),
    })
}

/// The task of a run on a model directory: `rows` encoded by `tokenizer`, scored by
/// `[rewards]`. LLM judges cache their answers in the run directory's `judge_cache/`, so
/// a resumed run does not pay for them twice.
pub(super) fn text_task<B: burn::tensor::backend::Backend>(
    tokenizer: HfTokenizer,
    rows: &[PromptRow],
    spec: &TextTaskSpec,
    rewards: &RewardsConfig,
    run_dir: &std::path::Path,
    stage: &str,
    device: &B::Device,
) -> Result<TextTask<B>> {
    let (mut proxy, mut gold) = (rewards.proxy.clone(), rewards.gold.clone());
    let cache = run_dir.join("judge_cache");
    proxy.set_cache_dir(&cache, goodhart_metrics::step::PROXY);
    gold.set_cache_dir(&cache, goodhart_metrics::step::GOLD);
    TextTask::new(
        tokenizer,
        rows,
        spec,
        (
            proxy
                .composite(goodhart_metrics::step::PROXY, device)
                .map_err(stage_error(stage))?,
            proxy.component_names(),
        ),
        gold.build(goodhart_metrics::step::GOLD, device)
            .map_err(stage_error(stage))?,
    )
    .map_err(stage_error(stage))
}

/// Figures (means and standard deviations over seeds) and the table of proxy and gold
/// per seed.
pub fn summarize(runs: &[TrainRun]) -> (Value, Value) {
    fn first(r: &TrainRun) -> Option<&TracePoint> {
        r.trace.points.first()
    }
    fn last(r: &TrainRun) -> Option<&TracePoint> {
        r.trace.points.last()
    }
    let stat = |f: &dyn Fn(&TrainRun) -> Option<f64>| {
        let (m, sd) = mean_sd(runs.iter().filter_map(f));
        json!({"mean": m, "sd": sd})
    };
    let figures = json!({
        "runs": runs.len(),
        "proxy_initial": stat(&|r| first(r).map(|p| p.proxy)),
        "proxy_final": stat(&|r| last(r).map(|p| p.proxy)),
        "gold_initial": stat(&|r| first(r).map(|p| p.gold)),
        "gold_peak": stat(&|r| r.trace.peak().map(|p| p.value)),
        "gold_final": stat(&|r| last(r).map(|p| p.gold)),
        "policies": runs.iter().map(|r| r.policy.clone()).collect::<Vec<_>>(),
    });
    let rows = runs
        .iter()
        .map(|r| {
            let (f, l) = (first(r), last(r));
            json!([
                r.seed,
                r.trace.points.len(),
                f.map(|p| p.proxy),
                l.map(|p| p.proxy),
                f.map(|p| p.gold),
                r.trace.peak().map(|p| p.value),
                l.map(|p| p.gold),
                r.policy,
            ])
        })
        .collect();
    let table = table(
        "train: proxy and gold per seed",
        &[
            "seed",
            "steps",
            "proxy first",
            "proxy final",
            "gold first",
            "gold peak (smoothed)",
            "gold final",
            "policy",
        ],
        rows,
    );
    (figures, table)
}
