//! The DAA lab: direct alignment without a reward model ("Scaling Laws for Reward Model
//! Overoptimization in Direct Alignment Algorithms"; RPO from "Provably Mitigating
//! Overoptimization in RLHF"). For each method (a preference loss of
//! [`crate::preference`]), each `beta` of the sweep and each seed, a policy is trained on
//! preference pairs against its initial weights as the frozen reference, and every
//! `eval_every` steps the gold of fresh samples and the KL to the reference are measured:
//! gold against `d = sqrt(KL)` per beta, and within an epoch. SLiC has no `beta`: it runs
//! once per seed with its own settings.
//!
//! Two sources of policy and pairs:
//! - The synthetic language (the default): the seed's SFT base policy, and the
//!   gold-labelled pairs a proxy of `[proxy]` with the same `pairs` and `label_noise` is
//!   trained on (stream `proxy/pairs` of the seed), so a DAA run and a reward model see
//!   the same data. The proxy column of a trace is the step's implicit reward margin.
//! - A Hugging Face model directory (`[policy]`), a preference set (`[data]`, JSONL or
//!   Parquet: [`crate::data::DataConfig::read_preferences`], encoded by
//!   [`crate::task::encode_preferences`]) and `[rewards]`: the proxy and gold measured on
//!   the fresh samples of each evaluation, whose prompts are the set's distinct prompts in
//!   turn. Each trained policy is written as a model directory,
//!   `checkpoints/daa/{series}/policy/`.
//!
//! Evaluation: `eval_samples` prompts (the topics, or the set's prompts, in turn), one
//! response each at temperature 1 (at most `max_new_tokens` on a model directory); the
//! gold mean, and `KL(pi || pi_ref)` estimated by the mean over samples of
//! `sum_t log pi - log pi_ref` over the response (k1, unbiased).
//!
//! Stages: `daa/{method}/b{beta}/s{seed}` (SLiC: `daa/{method}/s{seed}`), after
//! `lm/sft/s{seed}` ([`super::lm`]) on the synthetic language.

use std::collections::BTreeMap;

use burn::{
    module::AutodiffModule,
    tensor::{
        backend::{AutodiffBackend, Backend},
        cast::ToElement,
        Int, Tensor, TensorData,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::{ops::zero_masked, seed};
use goodhart_envs::language::{Language, EOS, PAD};
use goodhart_metrics::{
    overopt::{OveroptFit, OveroptLaw},
    step,
};
use goodhart_objective::preference::{DpoConfig, IpoConfig, PreferenceLossConfig, RpoConfig};
use goodhart_policy::{
    generate, hf, score::score, Generation, GenerationConfig, HfTokenizer, TextModel, TransformerLm,
};

use super::{
    checkpoint_error,
    lm::{self, base_policy, load_base, Trace, TracePoint},
    mean_sd,
    overopt::fit_json,
    stage_error, table,
    train::{
        check_rows, hf_sections, load_reference, text_task, validate_policy, PolicyConfig,
        RewardsConfig,
    },
    Experiment, Logger, Part,
};
use crate::{
    config::{positive, section, ConfigError, ExperimentConfig},
    data::{DataConfig, PreferenceRow, PromptRow},
    policy_gradient::{gold_reward, host, host_rows, sample_and_score},
    preference::{self, PreferencePair, PreferenceTrainConfig},
    runner::{Result, Runner, StageLog},
    sft::PROMPT_LEN,
    task::{encode_preferences, Task, TextTaskSpec},
};

/// Direct alignment: methods x betas x seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaaExperiment {
    /// Seeds per method and beta.
    pub seeds: usize,
    /// Preference pairs, labelled by gold (synthetic language).
    pub pairs: usize,
    /// Probability that a pair's label is flipped (synthetic language).
    pub label_noise: f64,
    /// The `beta` of each run (each method with a `beta`).
    pub betas: Vec<f64>,
    /// The methods compared.
    pub methods: Vec<DaaMethod>,
    /// The trainer's settings; each method's `loss` replaces `train.loss`.
    pub train: PreferenceTrainConfig,
    /// Steps between evaluations (the first after step 0's update, and the last step is
    /// always evaluated).
    pub eval_every: usize,
    /// Samples per evaluation.
    pub eval_samples: usize,
    /// The longest response of an evaluation on a model directory (64 when unset; the
    /// synthetic language's own bound otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
}

impl Default for DaaExperiment {
    fn default() -> Self {
        let method = |name: &str, loss| DaaMethod {
            name: name.into(),
            loss,
        };
        Self {
            seeds: 3,
            pairs: 1000,
            label_noise: 0.1,
            betas: vec![0.01, 0.03, 0.1, 0.3, 1.0],
            methods: vec![
                method("dpo", PreferenceLossConfig::Dpo(DpoConfig::default())),
                method("ipo", PreferenceLossConfig::Ipo(IpoConfig::default())),
                method("rpo", PreferenceLossConfig::Rpo(RpoConfig::default())),
            ],
            train: PreferenceTrainConfig {
                epochs: 2,
                batch_size: 32,
                lr: 1e-3,
                ..PreferenceTrainConfig::default()
            },
            eval_every: 4,
            eval_samples: 128,
            max_new_tokens: None,
        }
    }
}

/// One method of the DAA lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaaMethod {
    /// Its name in tables, charts and stage names.
    pub name: String,
    /// Its loss (`beta` set by the sweep).
    pub loss: PreferenceLossConfig,
}

/// One run: a method at one beta and seed, its evaluations as a trace (`proxy` holds the
/// proxy's mean on the samples on a model directory; on the synthetic language the mean
/// implicit reward margin of the step's batch, 0 before training).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DaaRun {
    /// The method's name.
    pub method: String,
    /// Its beta (`None` for a method without one).
    pub beta: Option<f64>,
    /// The seed.
    pub seed: u64,
    /// Gold and `d` per evaluation, the step's training figures in `metrics`.
    pub trace: Trace,
    /// Optimiser steps per epoch.
    pub steps_per_epoch: usize,
    /// The trained policy's model directory, relative to the run directory (runs on a
    /// model directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
}

impl DaaExperiment {
    /// Each run's loss: a method's loss at each beta, or once when it has no beta.
    fn runs(&self) -> Vec<(&DaaMethod, Option<f64>, PreferenceLossConfig)> {
        let mut out = Vec::new();
        for m in &self.methods {
            if m.loss.with_beta(1.0).is_some() {
                out.extend(
                    self.betas
                        .iter()
                        .filter_map(|&b| m.loss.with_beta(b as f32).map(|loss| (m, Some(b), loss))),
                );
            } else {
                out.push((m, None, m.loss));
            }
        }
        out
    }
}

impl Experiment for DaaExperiment {
    const NAME: &'static str = "daa";
    const SUMMARY: &'static str =
        "direct alignment (DPO, IPO, SLiC, RPO) over betas: gold vs sqrt(KL) without a reward model";
    type Output = Vec<DaaRun>;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("daa.seeds", self.seeds)?;
        positive("daa.pairs", self.pairs)?;
        positive("daa.eval_every", self.eval_every)?;
        positive("daa.eval_samples", self.eval_samples)?;
        if !(0.0..=1.0).contains(&self.label_noise) {
            return Err(ConfigError::invalid(
                "daa.label_noise",
                format!("{} is not a probability", self.label_noise),
            ));
        }
        if self.methods.is_empty() {
            return Err(ConfigError::invalid("daa.methods", "is empty"));
        }
        if self.betas.is_empty() && self.methods.iter().any(|m| m.loss.with_beta(1.0).is_some()) {
            return Err(ConfigError::invalid("daa.betas", "is empty"));
        }
        for (i, b) in self.betas.iter().enumerate() {
            if !(b.is_finite() && *b > 0.0) {
                return Err(ConfigError::invalid(
                    format!("daa.betas[{i}]"),
                    format!("{b} is not finite and > 0"),
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, m) in self.methods.iter().enumerate() {
            if m.name.is_empty() || m.name.contains('/') || !names.insert(m.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("daa.methods[{i}].name"),
                    format!("`{}` is empty, has a `/` or is used twice", m.name),
                ));
            }
            section(&format!("daa.methods[{i}].loss"), m.loss.validate())?;
        }
        section("daa.train", self.train.validate())?;
        // The loss, padding and data seed come from each method and run, not `train`.
        let defaults = PreferenceTrainConfig::default();
        for (key, set) in [
            ("loss", self.train.loss != defaults.loss),
            ("pad_id", self.train.pad_id != defaults.pad_id),
            ("seed", self.train.seed != defaults.seed),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    format!("daa.train.{key}"),
                    "is set by the lab (each method's `loss`, the model's padding, the run's \
                     seed): remove it",
                ));
            }
        }
        match hf_sections(config)? {
            Some((policy, data, rewards)) => self.validate_hf(policy, data, rewards).map(|_| ()),
            None => self.validate_language(config),
        }
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Vec<DaaRun>> {
        let hf = hf_sections(config)?;
        // A model directory's pairs, encoded once for every run.
        let encoded = match hf {
            Some((policy, data, rewards)) => Some(self.validate_hf(policy, data, rewards)?),
            None => None,
        };
        let pairs = encoded.as_ref().map_or(self.pairs, |(p, _)| p.len());
        let steps_per_epoch = pairs.div_ceil(self.train.batch_size);
        let mut out = Vec::new();
        for i in 0..self.seeds {
            let seed = config.seed + i as u64;
            if hf.is_none() {
                base_policy::<B>(runner, config, seed, device)?;
            }
            for (method, beta, loss) in self.runs() {
                let series = match beta {
                    Some(b) => format!("{}/b{b}/s{seed}", method.name),
                    None => format!("{}/s{seed}", method.name),
                };
                let (trace, policy) = match (hf, &encoded) {
                    (Some(sections), Some(data)) => {
                        hf_stage::<B>(runner, self, sections, data, &series, loss, seed, device)?
                    }
                    _ => (
                        language_stage::<B>(runner, config, self, &series, loss, seed, device)?,
                        None,
                    ),
                };
                out.push(DaaRun {
                    method: method.name.clone(),
                    beta,
                    seed,
                    trace,
                    steps_per_epoch,
                    policy,
                });
            }
        }
        Ok(out)
    }

    fn summarize(&self, runs: &Vec<DaaRun>) -> Part {
        summarize(self, runs)
    }
}

impl DaaExperiment {
    fn validate_language(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        if self.max_new_tokens.is_some() {
            return Err(ConfigError::invalid(
                "daa.max_new_tokens",
                "the synthetic language bounds its responses itself: remove it, or give \
                 [policy], [data] and [rewards]",
            ));
        }
        let lang = Language::new(config.language.clone())
            .map_err(|e| ConfigError::invalid("language", e.to_string()))?;
        section("sft", config.sft.validate(&lang))?;
        let need = PROMPT_LEN + lang.config().max_len + 1;
        if config.sft.max_seq_len < need {
            return Err(ConfigError::invalid(
                "sft.max_seq_len",
                format!("a prompt and the longest response take {need} positions"),
            ));
        }
        Ok(())
    }

    /// Checks a run on a model directory before any work, down to encoding every pair;
    /// returns the pairs and the evaluation's prompt rows.
    fn validate_hf(
        &self,
        policy: &PolicyConfig,
        data: &DataConfig,
        rewards: &RewardsConfig,
    ) -> std::result::Result<(Vec<PreferencePair>, Vec<PromptRow>), ConfigError> {
        let defaults = Self::default();
        for (key, set) in [
            ("pairs", self.pairs != defaults.pairs),
            ("label_noise", self.label_noise != defaults.label_noise),
        ] {
            if set {
                return Err(ConfigError::invalid(
                    format!("daa.{key}"),
                    "describes the synthetic language's pairs; a run on a model directory \
                     reads [data]: remove it",
                ));
            }
        }
        let model = validate_policy(policy)?;
        let max_new = self.max_new_tokens();
        positive("daa.max_new_tokens", max_new)?;
        let positions = model.model.max_seq_len;
        if max_new >= positions {
            return Err(ConfigError::invalid(
                "daa.max_new_tokens",
                format!(
                    "{max_new} leaves no room for a prompt in the model's {positions} positions"
                ),
            ));
        }
        section("rewards.proxy", rewards.proxy.validate())?;
        section("rewards.gold", rewards.gold.validate())?;
        let rows = data
            .read_preferences()
            .map_err(|e| ConfigError::invalid("data", e.to_string()))?;
        let tokenizer = HfTokenizer::from_dir(&policy.path)
            .map_err(|e| ConfigError::invalid("policy.path", e.to_string()))?;
        let pairs = encode_preferences(
            &tokenizer,
            &rows,
            data.chat,
            &model.eos_token_ids,
            positions,
        )
        .map_err(|e| ConfigError::invalid("data", e.to_string()))?;
        let prompts = distinct_prompts(&rows);
        check_rows(&prompts, rewards)?;
        Ok((pairs, prompts))
    }

    fn max_new_tokens(&self) -> usize {
        self.max_new_tokens.unwrap_or(64)
    }
}

/// The distinct prompts of a preference set, in order of first appearance, as a prompt
/// set (no answers or rubrics).
fn distinct_prompts(rows: &[PreferenceRow]) -> Vec<PromptRow> {
    let mut out: Vec<PromptRow> = Vec::new();
    for row in rows {
        if !out.iter().any(|p| p.prompt == row.prompt) {
            out.push(PromptRow {
                at: row.at.clone(),
                prompt: row.prompt.clone(),
                answer: None,
                rubric: None,
            });
        }
    }
    out
}

/// One evaluation: gold and KL on fresh samples, and the proxy's mean where the run has
/// a proxy.
struct Eval {
    gold: f64,
    kl: f64,
    proxy: Option<f64>,
}

/// Trains `policy` on `pairs` with `train`, evaluating it by `evaluate` before the first
/// step and every `eval_every` steps (and after the last), each evaluation logged as one
/// line of `series`; returns the trace and the trained policy.
#[allow(clippy::too_many_arguments)]
fn train_and_evaluate<B: AutodiffBackend>(
    log: &mut StageLog<'_>,
    cfg: &DaaExperiment,
    series: &str,
    policy: TransformerLm<B>,
    reference: &TransformerLm<B::InnerBackend>,
    pairs: &[PreferencePair],
    train: &PreferenceTrainConfig,
    mut evaluate: impl FnMut(&TransformerLm<B::InnerBackend>) -> goodhart_core::Result<Eval>,
) -> goodhart_core::Result<(Trace, TransformerLm<B>)> {
    let last = train.steps(pairs.len()) - 1;
    let mut logger = Logger::new(log, DaaExperiment::NAME, series);
    let mut points = Vec::new();
    // Before any step: the initial policy itself (KL 0).
    let e = evaluate(&policy.valid())?;
    points.push(point(0, e, 0.0, BTreeMap::new()));
    let trained = preference::train(policy, reference, pairs, train, |policy, step| {
        if (step.step + 1) % cfg.eval_every != 0 && step.step != last {
            return Ok(());
        }
        let e = evaluate(&policy.valid())?;
        let mut metrics: BTreeMap<String, f64> = step
            .metrics()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        metrics.insert("epoch".into(), step.epoch as f64);
        let has_proxy = e.proxy.is_some();
        let p = point(step.step as u64 + 1, e, step.margin, metrics);
        let mut line = p.metrics.clone();
        line.insert(step::KEY_GOLD_MEAN.into(), p.gold);
        line.insert(step::KEY_KL_D.into(), p.d);
        if has_proxy {
            line.insert(step::KEY_PROXY_MEAN.into(), p.proxy);
        }
        logger.log(p.step, line)?;
        points.push(p);
        Ok(())
    })?;
    Ok((
        Trace {
            series: series.to_string(),
            points,
        },
        trained,
    ))
}

/// Stage `daa/{series}` on the synthetic language: one preference run from the seed's
/// base policy.
fn language_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &DaaExperiment,
    series: &str,
    loss: PreferenceLossConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Trace> {
    let name = format!("daa/{series}");
    let checkpoints = runner.dir().checkpoints();
    runner.stage(&name, |log| {
        let policy = load_base::<B>(&checkpoints, config, seed, device, &name)?;
        let reference = load_base::<B::InnerBackend>(&checkpoints, config, seed, device, &name)?;
        let lang = lm::language(config, &name)?;
        let pairs: Vec<PreferencePair> = lang
            .preference_pairs(
                cfg.pairs,
                cfg.label_noise,
                seed::derive(seed, "proxy/pairs"),
            )
            .map_err(stage_error(&name))?
            .into_iter()
            .map(|p| {
                let ids = |v: Vec<u32>| v.into_iter().map(|t| t as usize).collect();
                PreferencePair {
                    prompt: ids(p.prompt),
                    chosen: ids(p.chosen),
                    rejected: ids(p.rejected),
                }
            })
            .collect();
        let train = PreferenceTrainConfig {
            loss,
            pad_id: PAD as usize,
            seed: seed::derive(seed, &name),
            ..cfg.train.clone()
        };
        // Every run of a seed samples its evaluations from one stream: the same base
        // policy gives every run the same initial point.
        let mut rng = seed::rng(seed, "daa/eval");
        let evaluate = |policy: &TransformerLm<B::InnerBackend>| {
            evaluate_language(&lang, policy, &reference, cfg.eval_samples, &mut rng)
        };
        let (trace, _) = train_and_evaluate::<B>(
            log, cfg, series, policy, &reference, &pairs, &train, evaluate,
        )
        .map_err(stage_error(&name))?;
        Ok(trace)
    })
}

/// Stage `daa/{series}` on a model directory: one preference run from its weights on
/// the set's pairs, the trained policy saved as a model directory.
#[allow(clippy::too_many_arguments)]
fn hf_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    cfg: &DaaExperiment,
    (policy_cfg, data, rewards): (&PolicyConfig, &DataConfig, &RewardsConfig),
    (pairs, prompts): &(Vec<PreferencePair>, Vec<PromptRow>),
    series: &str,
    loss: PreferenceLossConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(Trace, Option<String>)> {
    let name = format!("daa/{series}");
    let rel = format!("{name}/policy");
    let dir = runner.artifact(&rel)?;
    let run_dir = runner.dir().path().to_path_buf();
    let trace = runner.stage(&name, |log| {
        let model = TextModel::<B>::load(&policy_cfg.path, device).map_err(stage_error(&name))?;
        let generation = model.generation_config(cfg.max_new_tokens());
        let TextModel {
            model: policy,
            config: hf_config,
            tokenizer,
        } = model;
        let reference = load_reference(policy_cfg, &policy, &name, device)?;
        let spec = TextTaskSpec {
            vocab_size: policy.vocab_size(),
            pad_id: hf_config.pad_id(),
            end_ids: hf_config.eos_token_ids.clone(),
            chat: data.chat,
            max_prompt_len: policy.trunk.max_seq_len() - cfg.max_new_tokens(),
        };
        let task = text_task::<B::InnerBackend>(
            tokenizer, prompts, &spec, rewards, &run_dir, &name, device,
        )?;
        let train = PreferenceTrainConfig {
            loss,
            pad_id: hf_config.pad_id() as usize,
            seed: seed::derive(seed, &name),
            ..cfg.train.clone()
        };
        let mut rng = seed::rng(seed, "daa/eval");
        let evaluate = |policy: &TransformerLm<B::InnerBackend>| {
            let idx: Vec<usize> = (0..cfg.eval_samples).map(|i| i % task.prompts()).collect();
            let s = sample_and_score(policy, &task, &idx, &generation, &mut rng, device)?;
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            Ok(Eval {
                gold: mean(&s.gold),
                kl: kl_to(&reference, &s.generation)?,
                proxy: Some(mean(&host(s.proxy)?)),
            })
        };
        let (trace, trained) = train_and_evaluate::<B>(
            log, cfg, series, policy, &reference, pairs, &train, evaluate,
        )
        .map_err(stage_error(&name))?;
        hf::save(&trained, &hf_config, &dir).map_err(|e| checkpoint_error(&name)(e))?;
        Ok(trace)
    })?;
    Ok((trace, Some(format!("checkpoints/{rel}"))))
}

/// The metric holding an evaluation's `KL(pi || pi_ref)`.
const KL: &str = "kl/ref";

fn point(step: u64, e: Eval, margin: f64, metrics: BTreeMap<String, f64>) -> TracePoint {
    TracePoint {
        step,
        d: e.kl.max(0.0).sqrt(),
        proxy: e.proxy.unwrap_or(margin),
        gold: e.gold,
        metrics: metrics
            .into_iter()
            .chain([(KL.to_string(), e.kl)])
            .collect(),
    }
}

/// `KL(pi || pi_ref)` of a generation: the mean over rows of `sum_t log pi - log pi_ref`
/// over the response, the policy's log-probs those the sampler recorded (temperature 1).
fn kl_to<B: Backend>(
    reference: &TransformerLm<B>,
    g: &Generation<B>,
) -> goodhart_core::Result<f64> {
    let n = g.tokens.dims()[0];
    let ref_lp = score(reference, g.tokens.clone(), g.attention_mask.clone(), 1.0)?.logprobs;
    Ok(zero_masked(g.logprobs.clone() - ref_lp, &g.response_mask)
        .sum()
        .into_scalar()
        .to_f64()
        / n as f64)
}

/// Gold mean and `KL(pi || pi_ref)` of `policy` on `n` fresh samples of the synthetic
/// language (see the module docs).
fn evaluate_language<B: Backend>(
    lang: &Language,
    policy: &TransformerLm<B>,
    reference: &TransformerLm<B>,
    n: usize,
    rng: &mut seed::ChaCha8Rng,
) -> goodhart_core::Result<Eval> {
    let device = policy.trunk.tok_emb.weight.device();
    let topics = lang.config().topics;
    let prompts: Vec<i64> = (0..n)
        .flat_map(|i| lang.prompt(i % topics))
        .map(i64::from)
        .collect();
    let prompt = Tensor::<B, 2, Int>::from_data(TensorData::new(prompts, [n, PROMPT_LEN]), &device);
    let mask = Tensor::<B, 2>::ones([n, PROMPT_LEN], &device);
    let config = GenerationConfig::new(lang.config().max_len + 1)
        .with_eos_id(Some(EOS as usize))
        .with_pad_id(PAD as usize);
    let g = generate(policy, prompt, mask, &config, rng)?;
    let kl = kl_to(reference, &g)?;
    let mut gold = 0.0;
    for row in host_rows(&g.tokens)? {
        let (p, r) = row.split_at(PROMPT_LEN);
        gold += gold_reward(lang, p, r)?.0;
    }
    Ok(Eval {
        gold: gold / n as f64,
        kl,
        proxy: None,
    })
}

/// Peak and final gold and the final KL per method and beta, over seeds; Gao's laws per
/// method; and the figures.
fn summarize(cfg: &DaaExperiment, runs: &[DaaRun]) -> Part {
    let mut figures = serde_json::Map::new();
    let mut rows = Vec::new();
    for (method, beta, _) in cfg.runs() {
        let mine: Vec<&DaaRun> = runs
            .iter()
            .filter(|r| r.method == method.name && r.beta == beta)
            .collect();
        let last = |f: fn(&TracePoint) -> f64| {
            mean_sd(mine.iter().filter_map(|r| r.trace.points.last()).map(f))
        };
        let initial = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.first())
                .map(|p| p.gold),
        );
        let peak = mean_sd(mine.iter().filter_map(|r| r.trace.peak()).map(|p| p.value));
        // Where gold peaked, in epochs: within the first epoch below 1.
        let peak_epochs = mean_sd(mine.iter().filter_map(|r| {
            let p = r.trace.peak()?;
            Some(p.step as f64 / r.steps_per_epoch as f64)
        }));
        let fin = last(|p| p.gold);
        let kl = last(|p| p.metrics.get(KL).copied().unwrap_or(f64::NAN));
        let key = match beta {
            Some(b) => format!("{}/b{b}", method.name),
            None => method.name.clone(),
        };
        figures.insert(
            key,
            json!({"gold_initial": initial.0, "gold_peak": peak.0, "gold_peak_sd": peak.1,
                   "gold_peak_epochs": peak_epochs.0, "gold_final": fin.0, "gold_final_sd": fin.1, "kl_final": kl.0,
                   "kl_final_sd": kl.1}),
        );
        rows.push(json!([
            method.name,
            beta,
            initial.0,
            peak.0,
            peak.1,
            peak_epochs.0,
            fin.0,
            fin.1,
            kl.0,
            kl.1,
            mine.len()
        ]));
    }
    // Gao's laws, fitted per method to every evaluation of every beta and seed: gold
    // relative to the run's initial point, against d (the report draws them from the
    // mean initial gold).
    let mut fits = Vec::new();
    let mut fit_rows = Vec::new();
    let mut charts = Vec::new();
    for method in &cfg.methods {
        let mine: Vec<&DaaRun> = runs.iter().filter(|r| r.method == method.name).collect();
        let g0 = mean_sd(
            mine.iter()
                .filter_map(|r| r.trace.points.first())
                .map(|p| p.gold),
        )
        .0;
        let (mut d, mut gold) = (Vec::new(), Vec::new());
        for r in &mine {
            let start = r.trace.points.first().map_or(f64::NAN, |p| p.gold);
            for p in &r.trace.points {
                d.push(p.d);
                gold.push(p.gold - start + g0);
            }
        }
        let rl = fit_json(&method.name, OveroptLaw::Rl, &d, &gold, g0);
        let bon = fit_json(
            &format!("{} (bon form)", method.name),
            OveroptLaw::BestOfN,
            &d,
            &gold,
            g0,
        );
        let coef = |f: &Option<(Value, OveroptFit)>, k: &str| {
            f.as_ref().map_or(Value::Null, |f| f.0[k].clone())
        };
        fit_rows.push(json!([
            method.name,
            d.len(),
            coef(&rl, "alpha"),
            coef(&rl, "beta"),
            coef(&rl, "r2"),
            coef(&rl, "peak_d"),
            coef(&bon, "alpha"),
            coef(&bon, "beta"),
            coef(&bon, "r2"),
        ]));
        figures.insert(
            format!("{}/fit", method.name),
            json!({"rl_r2": coef(&rl, "r2"), "rl_peak_d": coef(&rl, "peak_d"),
                   "bon_r2": coef(&bon, "r2")}),
        );
        charts.extend(method_charts(cfg, method, runs, rl.as_ref().map(|f| &f.0)));
        fits.extend(rl.map(|f| f.0));
        fits.extend(bon.map(|f| f.0));
    }
    let policies: Vec<&str> = runs.iter().filter_map(|r| r.policy.as_deref()).collect();
    if !policies.is_empty() {
        figures.insert("policies".into(), json!(policies));
    }
    Part {
        figures: Value::Object(figures),
        fits,
        charts,
        tables: vec![table(
            &if runs.iter().any(|r| r.policy.is_some()) {
                format!("DAA: gold per method and beta ({} seeds, the pairs of [data])", cfg.seeds)
            } else {
                format!(
                    "DAA: gold per method and beta ({} seeds, {} pairs, label noise {})",
                    cfg.seeds, cfg.pairs, cfg.label_noise
                )
            },
            &[
                "method",
                "beta",
                "gold initial",
                "gold peak (smoothed)",
                "sd",
                "peak at (epochs)",
                "gold final",
                "sd",
                "KL final",
                "sd",
                "seeds",
            ],
            rows,
        ), table(
            "DAA: Gao's laws fitted to gold vs d per method (every beta, seed and evaluation; gold relative to each run's start)",
            &[
                "method",
                "points",
                "rl alpha",
                "rl beta",
                "rl R^2",
                "rl peak d",
                "bon alpha",
                "bon beta",
                "bon R^2",
            ],
            fit_rows,
        )],
        ..Part::default()
    }
}

/// The mean over `runs` (one method and beta, one run per seed) of `f` at each
/// evaluation: every seed evaluates at the same steps.
fn mean_curve(runs: &[&DaaRun], f: impl Fn(&TracePoint) -> (f64, f64)) -> Vec<[f64; 2]> {
    let n = runs.iter().map(|r| r.trace.points.len()).min().unwrap_or(0);
    (0..n)
        .map(|i| {
            let (x, y): (Vec<f64>, Vec<f64>) = runs.iter().map(|r| f(&r.trace.points[i])).unzip();
            [mean_sd(x).0, mean_sd(y).0]
        })
        .collect()
}

/// A method's two charts: gold against `d` (with the method's fitted RL law, dashed) and
/// gold against step, one line per beta (means over seeds), epochs marked on the second.
fn method_charts(
    cfg: &DaaExperiment,
    method: &DaaMethod,
    runs: &[DaaRun],
    rl_fit: Option<&Value>,
) -> Vec<Value> {
    let mut by_d = Vec::new();
    let mut by_step = Vec::new();
    let mut steps_per_epoch = 0;
    for (m, beta, _) in cfg.runs() {
        if m.name != method.name {
            continue;
        }
        let mine: Vec<&DaaRun> = runs
            .iter()
            .filter(|r| r.method == m.name && r.beta == beta)
            .collect();
        if let Some(r) = mine.first() {
            steps_per_epoch = r.steps_per_epoch;
        }
        let label = match beta {
            Some(b) => format!("β = {b}"),
            None => m.name.clone(),
        };
        by_d.push(json!({"label": label, "points": mean_curve(&mine, |p| (p.d, p.gold))}));
        by_step.push(
            json!({"label": label, "points": mean_curve(&mine, |p| (p.step as f64, p.gold))}),
        );
    }
    if by_d.is_empty() {
        return Vec::new();
    }
    if let Some(f) = rl_fit {
        let get = |k: &str| f[k].as_f64().unwrap_or(f64::NAN);
        let law = OveroptFit {
            law: OveroptLaw::Rl,
            alpha: get("alpha"),
            beta: get("beta"),
            offset: get("offset"),
            r_squared: get("r2"),
            points: 0,
        };
        let d_max = runs
            .iter()
            .filter(|r| r.method == method.name)
            .flat_map(|r| r.trace.points.iter().map(|p| p.d))
            .fold(0.0, f64::max);
        let points: Vec<[f64; 2]> = (0..=60)
            .map(|i| d_max * i as f64 / 60.0)
            .map(|d| [d, law.predict(d)])
            .collect();
        by_d.push(json!({
            "label": format!("Gao RL law, every run (R² {:.2})", law.r_squared),
            "points": points,
            "dashed": true,
        }));
    }
    let marks: Vec<Value> = (1..cfg.train.epochs)
        .map(|k| json!({"x": k * steps_per_epoch, "label": format!("epoch {}", k + 1)}))
        .collect();
    let seeds = format!("mean of {} seeds", cfg.seeds);
    vec![
        json!({
            "title": format!("DAA {}: gold against d = √KL per β ({seeds})", method.name),
            "x_label": "d = √KL(π ‖ π_ref)",
            "lines": by_d,
        }),
        json!({
            "title": format!("DAA {}: gold against step per β ({seeds}; {steps_per_epoch} steps an epoch)", method.name),
            "x_label": "step",
            "lines": by_step,
            "marks": marks,
        }),
    ]
}
