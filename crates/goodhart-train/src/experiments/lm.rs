//! The stages the language-model experiments share ([`super::overopt`],
//! [`super::mitigations`]): the base policy, proxy reward models, an RL run against them,
//! and the checks of the sections they read (`[language]`, `[sft]`, `[proxy]`, `[rl]`).
//!
//! Stages:
//! - `lm/sft/s{seed}`: the base (SFT) policy, saved;
//! - `lm/rm-pretrain[/l{layers}d{d_model}]/t{i}/s{seed}`: a pretrained trunk for reward
//!   models (an LM of their architecture), saved, when a proxy's [`EnsembleKind`] needs it;
//! - `lm/proxy/p{pairs}/k{members}[/l{layers}d{d_model}][/{kind}][/n{noise}]/s{seed}`:
//!   proxy reward models trained on `pairs` gold-labelled pairs, saved (the size part for
//!   a [`ProxySize`] other than `[proxy]`'s, the kind part for `pretrain` and `finetune`,
//!   the noise part for a label noise other than `[proxy]`'s);
//! - `lm/heldout/p{pairs}[/n{noise}]/s{seed}`: a held-out proxy on other pairs, to
//!   monitor with;
//! - an RL stage named by its experiment: RL from the base policy against a proxy, gold
//!   measured on every sample; its step lines go to `metrics.jsonl`, its samples to
//!   `samples.jsonl`.

use std::{collections::BTreeMap, path::Path};

use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use goodhart_core::seed;
use goodhart_envs::language::{Language, PAD};
use goodhart_metrics::{
    evaluate::{gold_peak, smoothed_gold, GoldPeak, GoldPeakRule, Run},
    step::{KEY_GOLD_MEAN, KEY_KL, KEY_KL_D, KEY_PROXY_MEAN},
};
use goodhart_policy::{
    checkpoint::{load_module, save_module},
    transformer::TransformerLm,
};
use goodhart_reward::{Aggregator, Sequences};

use super::{checkpoint_error, overopt::BestOfNConfig, stage_error, Logger};
use crate::{
    best_of_n::{best_of_n, BonPoint},
    config::{at, section, ConfigError, ExperimentConfig},
    policy_gradient::{self, LanguageGold, Proxy, RlConfig},
    reward_model::{
        pretrain_trunk, train_proxy, train_proxy_ensemble, train_proxy_ensemble_on, ProxyConfig,
        ProxyReport,
    },
    runner::{Result, Runner},
    sft::{train_base, SftReport, PROMPT_LEN},
    task::{EmbeddingOod, LanguageTask, Monitor},
};

/// Checks the sections every language-model experiment reads, and `[rl]` against a proxy
/// of `members` reward models.
pub(crate) fn validate(
    config: &ExperimentConfig,
    rl: &RlConfig,
    path: &str,
    members: usize,
) -> std::result::Result<(), ConfigError> {
    let lang = Language::new(config.language.clone()).map_err(|e| at("language", e))?;
    section("sft", config.sft.validate(&lang))?;
    section("proxy", config.proxy.validate(&lang))?;
    let need = PROMPT_LEN + rl.max_new_tokens;
    for (what, len) in [
        ("sft.max_seq_len", config.sft.max_seq_len),
        ("proxy.max_seq_len", config.proxy.max_seq_len),
    ] {
        if len < need {
            return Err(ConfigError::invalid(
                format!("{path}.max_new_tokens"),
                format!(
                    "prompt {PROMPT_LEN} + {} tokens exceeds {what} = {len}",
                    rl.max_new_tokens
                ),
            ));
        }
    }
    section(path, rl.validate(members))
}

/// One point of an RL trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TracePoint {
    /// RL step.
    pub step: u64,
    /// `sqrt(KL(pi || pi_base))`.
    pub d: f64,
    /// Mean proxy reward of the batch.
    pub proxy: f64,
    /// Mean gold reward of the same samples.
    pub gold: f64,
    /// Every other number logged at the step (entropy, length, ensemble disagreement,
    /// ...): with the fields above, what the detectors read when replayed over the trace.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metrics: BTreeMap<String, f64>,
}

/// An RL run's trace.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Trace {
    /// Its series name in `metrics.jsonl`.
    pub series: String,
    /// The points, in step order.
    pub points: Vec<TracePoint>,
}

impl Trace {
    /// The gold peak of the curve smoothed by a centred mean of 5 steps (goodhart-metrics'
    /// [`gold_peak`] with the default rule), with its interval: not the largest single
    /// batch mean, which noise biases upwards. `None` without a finite gold value.
    pub fn peak(&self) -> Option<GoldPeak> {
        gold_peak(&self.gold_run(), &GoldPeakRule::default()).ok()
    }

    /// The steps with a finite gold, as a [`Run`] of gold alone.
    fn gold_run(&self) -> Run {
        Run {
            name: self.series.clone(),
            steps: self
                .points
                .iter()
                .filter(|p| p.gold.is_finite())
                .map(|p| {
                    (
                        p.step,
                        BTreeMap::from([(KEY_GOLD_MEAN.to_string(), p.gold)]),
                    )
                })
                .collect(),
        }
    }

    /// The trace as goodhart-metrics' [`Run`] (named by its series): each step's metrics
    /// with the proxy, gold, `kl/d` and (when absent) `kl/ref = d^2`: what a detector
    /// read online.
    pub fn to_run(&self) -> Run {
        Run {
            name: self.series.clone(),
            steps: self
                .points
                .iter()
                .map(|p| {
                    let mut m = p.metrics.clone();
                    m.insert(KEY_PROXY_MEAN.into(), p.proxy);
                    m.insert(KEY_GOLD_MEAN.into(), p.gold);
                    m.insert(KEY_KL_D.into(), p.d);
                    m.entry(KEY_KL.into()).or_insert(p.d * p.d);
                    (p.step, m)
                })
                .collect(),
        }
    }

    /// `(peak - final) / (peak - initial)` on the smoothed gold of [`Trace::peak`]: the
    /// fraction of the gold gained that was lost again (0 when gold never rose).
    pub fn drop_fraction(&self) -> Option<f64> {
        let run = self.gold_run();
        let rule = GoldPeakRule::default();
        let first = smoothed_gold(&run, &rule).ok()?.first()?.1;
        let peak = gold_peak(&run, &rule).ok()?;
        let gain = peak.value - first;
        Some(if gain > 0.0 {
            (peak.value - peak.final_value) / gain
        } else {
            0.0
        })
    }
}

pub(crate) fn language(config: &ExperimentConfig, stage: &str) -> Result<Language> {
    Language::new(config.language.clone()).map_err(stage_error(stage))
}

/// Stage `lm/sft/s{seed}`: trains and saves the base policy.
pub(crate) fn base_policy<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    seed: u64,
    device: &B::Device,
) -> Result<SftReport> {
    let name = format!("lm/sft/s{seed}");
    let path = runner.artifact(&format!("lm/s{seed}/base"))?;
    runner.stage(&name, |_| {
        let lang = language(config, &name)?;
        let (model, report) =
            train_base::<B>(&lang, &config.sft, seed, device).map_err(stage_error(&name))?;
        save_module(&model, &path).map_err(checkpoint_error(&name))?;
        Ok(report)
    })
}

/// Loads the base policy saved by [`base_policy`] from the run's `checkpoints/`.
pub(crate) fn load_base<B: Backend>(
    checkpoints: &Path,
    config: &ExperimentConfig,
    seed: u64,
    device: &B::Device,
    stage: &str,
) -> Result<TransformerLm<B>> {
    let lang = language(config, stage)?;
    let path = checkpoints.join(format!("lm/s{seed}/base"));
    load_sft_policy(&path, config, lang.vocab_size(), device, stage)
}

/// Loads a policy fine-tuned with `config.sft` over `vocab` tokens from `path` (a base
/// policy saved by a lab's SFT stage).
pub(crate) fn load_sft_policy<B: Backend>(
    path: &Path,
    config: &ExperimentConfig,
    vocab: usize,
    device: &B::Device,
    stage: &str,
) -> Result<TransformerLm<B>> {
    let template = config
        .sft
        .transformer(vocab)
        .init::<B>(device)
        .map_err(stage_error(stage))?;
    load_module(template, path, device).map_err(checkpoint_error(stage))
}

/// The architecture of a proxy's reward models when it is not `[proxy]`'s own (the
/// overopt experiment's reward-model sizes); every other setting is `[proxy]`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySize {
    /// Transformer blocks of the trunk.
    pub layers: usize,
    /// Trunk width.
    pub d_model: usize,
}

impl ProxySize {
    /// Its name in stage, artifact and series names: `l{layers}d{d_model}`.
    pub fn tag(&self) -> String {
        format!("l{}d{}", self.layers, self.d_model)
    }
}

/// How the reward models of a proxy start and what their members share: the
/// "pretrain" and "finetune" ensembles of "Helping or Herding? Reward Model Ensembles
/// Mitigate but do not Eliminate Reward Hacking" (Eisenstein et al. 2023).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsembleKind {
    /// Trained from a fresh initialisation; members differ in initialisation and data
    /// order.
    #[default]
    Scratch,
    /// Member `i` fine-tuned from its own pretrained trunk `t{i}` (pretraining seeds
    /// differ, and fine-tuning seeds: head initialisation and data order).
    Pretrain,
    /// Every member fine-tuned from the one pretrained trunk `t0`: only the fine-tuning
    /// seed differs.
    Finetune,
}

impl EnsembleKind {
    /// Its TOML name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scratch => "scratch",
            Self::Pretrain => "pretrain",
            Self::Finetune => "finetune",
        }
    }

    /// The pretrained trunks `members` reward models of this kind start from.
    fn trunks(self, members: usize) -> usize {
        match self {
            Self::Scratch => 0,
            Self::Pretrain => members,
            Self::Finetune => 1,
        }
    }
}

/// A proxy: `members` reward models trained on `pairs` pairs (different seeds; 1 is a
/// single model) starting as `kind` says, combined by `aggregation`, of `size` (`None`:
/// `[proxy]`'s), on pairs whose labels flip with probability `label_noise` (`None`:
/// `[proxy]`'s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ProxySpec {
    pub pairs: usize,
    pub members: usize,
    pub aggregation: Aggregator,
    pub size: Option<ProxySize>,
    pub kind: EnsembleKind,
    pub label_noise: Option<f64>,
}

impl ProxySpec {
    /// One reward model of `[proxy]`'s size on `pairs` pairs.
    pub fn single(pairs: usize) -> Self {
        Self::ensemble(pairs, 1, Aggregator::Mean)
    }

    /// `members` reward models of `[proxy]`'s size on `pairs` pairs.
    pub fn ensemble(pairs: usize, members: usize, aggregation: Aggregator) -> Self {
        Self {
            pairs,
            members,
            aggregation,
            size: None,
            kind: EnsembleKind::Scratch,
            label_noise: None,
        }
    }

    /// The same proxy with reward models that start as `kind` says.
    pub fn of_kind(self, kind: EnsembleKind) -> Self {
        Self { kind, ..self }
    }

    /// The same proxy with reward models of `size`.
    pub fn sized(self, size: Option<ProxySize>) -> Self {
        Self { size, ..self }
    }

    /// The same proxy trained on labels that flip with probability `label_noise`
    /// (`None`: `[proxy]`'s).
    pub fn noisy(self, label_noise: Option<f64>) -> Self {
        Self {
            label_noise,
            ..self
        }
    }

    /// `[proxy]` with this proxy's pairs, size and label noise.
    pub fn config(&self, config: &ExperimentConfig) -> ProxyConfig {
        let base = ProxyConfig {
            pairs: self.pairs,
            label_noise: self.label_noise.unwrap_or(config.proxy.label_noise),
            ..config.proxy.clone()
        };
        match self.size {
            Some(s) => ProxyConfig {
                layers: s.layers,
                d_model: s.d_model,
                ..base
            },
            None => base,
        }
    }

    /// The size's, kind's and label noise's parts of stage and artifact names (none for
    /// `[proxy]`'s size, [`EnsembleKind::Scratch`] and `[proxy]`'s label noise).
    fn tag(&self, sep: char) -> String {
        let mut tag = self
            .size
            .map_or(String::new(), |s| format!("{sep}{}", s.tag()));
        if self.kind != EnsembleKind::Scratch {
            tag += &format!("{sep}{}", self.kind.name());
        }
        tag + &self.noise_tag(sep)
    }

    /// The label noise's part of stage and artifact names: `{sep}n{label_noise}` with `p`
    /// for the decimal point (`n0p3`: file names take what follows a `.` for an
    /// extension), none for `[proxy]`'s.
    fn noise_tag(&self, sep: char) -> String {
        self.label_noise.map_or(String::new(), |n| {
            format!("{sep}n{}", n.to_string().replace('.', "p"))
        })
    }

    /// Pretrained trunk `i` of this proxy's size: its stage and artifact names.
    fn trunk(&self, seed: u64, i: usize) -> (String, String) {
        let size = self.size.map_or(String::new(), |s| format!("/{}", s.tag()));
        let file = self.size.map_or(String::new(), |s| format!("-{}", s.tag()));
        (
            format!("lm/rm-pretrain{size}/t{i}/s{seed}"),
            format!("lm/s{seed}/rm-trunk{file}-t{i}"),
        )
    }

    fn stage(&self, seed: u64) -> String {
        format!(
            "lm/proxy/p{}/k{}{}/s{seed}",
            self.pairs,
            self.members,
            self.tag('/')
        )
    }

    fn artifact(&self, seed: u64, member: usize) -> String {
        format!(
            "lm/s{seed}/proxy-p{}-k{}{}-m{member}",
            self.pairs,
            self.members,
            self.tag('-')
        )
    }
}

/// Stage `lm/rm-pretrain[/{size}]/t{i}/s{seed}`: pretrains and saves trunk `i` of the
/// reward models of `spec`'s size (an LM of that architecture trained as the base policy
/// is, with `[sft]`'s data and optimiser settings and the seed `derive(seed,
/// "rm-pretrain/t{i}")`).
fn pretrained_trunk<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    spec: ProxySpec,
    i: usize,
    seed: u64,
    device: &B::Device,
) -> Result<SftReport> {
    let (name, artifact) = spec.trunk(seed, i);
    let path = runner.artifact(&artifact)?;
    runner.stage(&name, |_| {
        let lang = language(config, &name)?;
        let s = seed::derive(seed, &format!("rm-pretrain/t{i}"));
        let (model, report) =
            pretrain_trunk::<B>(&lang, &spec.config(config), &config.sft, s, device)
                .map_err(stage_error(&name))?;
        save_module(&model, &path).map_err(checkpoint_error(&name))?;
        Ok(report)
    })
}

/// Stage `lm/proxy/p{pairs}/k{k}[/{size}][/{kind}][/n{noise}]/s{seed}`: trains and saves
/// the reward models of `spec` (one plain model when `k = 1`), after the pretrained
/// trunks they start from ([`EnsembleKind`]), each its own stage.
pub(crate) fn proxies<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    spec: ProxySpec,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<ProxyReport>> {
    let k = spec.members;
    for i in 0..spec.kind.trunks(k) {
        pretrained_trunk::<B>(runner, config, spec, i, seed, device)?;
    }
    let name = spec.stage(seed);
    let paths = (0..k)
        .map(|m| runner.artifact(&spec.artifact(seed, m)))
        .collect::<Result<Vec<_>>>()?;
    let checkpoints = runner.dir().checkpoints();
    runner.stage(&name, |_| {
        let lang = language(config, &name)?;
        let cfg = spec.config(config);
        let members = if spec.kind != EnsembleKind::Scratch {
            let trunks = (0..k)
                .map(|m| {
                    let t = if spec.kind == EnsembleKind::Pretrain {
                        m
                    } else {
                        0
                    };
                    let path = checkpoints.join(spec.trunk(seed, t).1);
                    let template = cfg
                        .model(&lang)
                        .trunk
                        .init::<B>(device)
                        .map_err(stage_error(&name))?;
                    let lm =
                        load_module(template, &path, device).map_err(checkpoint_error(&name))?;
                    Ok(lm.trunk)
                })
                .collect::<Result<Vec<_>>>()?;
            train_proxy_ensemble_on::<B>(&lang, &cfg, trunks, seed, device)
                .map_err(stage_error(&name))?
        } else if k == 1 {
            vec![train_proxy::<B>(&lang, &cfg, seed, device).map_err(stage_error(&name))?]
        } else {
            train_proxy_ensemble::<B>(&lang, &cfg, k, seed, device).map_err(stage_error(&name))?
        };
        let mut reports = Vec::with_capacity(k);
        for ((model, report), path) in members.into_iter().zip(&paths) {
            model.save(path).map_err(stage_error(&name))?;
            reports.push(report);
        }
        Ok(reports)
    })
}

/// The name of the monitor a held-out proxy is logged under ([`crate::task::Task::monitors`]).
pub(crate) const HELDOUT: &str = "heldout";

/// The name of the out-of-distribution monitor ([`crate::task::EmbeddingOod`]):
/// `ood/{mean,std,min,max}`.
pub(crate) const OOD: &str = "ood";

/// Pairs drawn for the out-of-distribution monitor's reference sample (both responses of
/// each: 1024 sequences).
const OOD_REFERENCE_PAIRS: usize = 512;

/// Shrinkage of the out-of-distribution monitor's covariance toward a multiple of the
/// identity ([`goodhart_metrics::ood::Mahalanobis::fit`]).
const OOD_SHRINKAGE: f64 = 0.1;

/// The monitors an RL stage scores every sample with (none by default).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Monitors {
    /// The held-out proxy of [`heldout_proxy`] (same pairs count, label noise and seed), as
    /// [`HELDOUT`].
    pub heldout: bool,
    /// The proxy's first reward model's out-of-distribution score ([`OOD`]), its
    /// reference [`OOD_REFERENCE_PAIRS`] fresh pairs of the language's generator (the
    /// distribution its training pairs come from).
    pub ood: bool,
}

/// `model`'s out-of-distribution score against its embeddings of the reference sample
/// of [`Monitors::ood`] (stream `ood/reference` of `seed`).
fn ood_monitor<B: Backend>(
    lang: &Language,
    model: goodhart_reward::RewardModel<B>,
    seed: u64,
    device: &B::Device,
) -> goodhart_core::Result<EmbeddingOod<B>> {
    let pairs = lang.preference_pairs(
        OOD_REFERENCE_PAIRS,
        0.0,
        seed::derive(seed, "ood/reference"),
    )?;
    let items: Vec<(&[u32], &[u32])> = pairs
        .iter()
        .flat_map(|p| {
            [
                (&p.prompt[..], &p.chosen[..]),
                (&p.prompt[..], &p.rejected[..]),
            ]
        })
        .collect();
    let reference = Sequences::<B>::from_pairs(&items, PAD, device)?;
    EmbeddingOod::fit(model, &reference, OOD_SHRINKAGE)
}

fn heldout_name(spec: ProxySpec, seed: u64) -> String {
    format!("lm/s{seed}/heldout-p{}{}", spec.pairs, spec.noise_tag('-'))
}

/// Stage `lm/heldout/p{pairs}[/n{label_noise}]/s{seed}`: a held-out proxy for `spec`,
/// one reward model of `[proxy]`'s size trained like the proxies of [`proxies`] on
/// `spec`'s count of other pairs with `spec`'s label noise (the seed
/// `seed::derive(seed, "heldout")`'s pairs and initialisation), saved. Never trained on:
/// it monitors.
pub(crate) fn heldout_proxy<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    spec: ProxySpec,
    seed: u64,
    device: &B::Device,
) -> Result<ProxyReport> {
    let name = format!("lm/heldout/p{}{}/s{seed}", spec.pairs, spec.noise_tag('/'));
    let path = runner.artifact(&heldout_name(spec, seed))?;
    runner.stage(&name, |_| {
        let lang = language(config, &name)?;
        let cfg = ProxySpec::single(spec.pairs)
            .noisy(spec.label_noise)
            .config(config);
        let (model, report) = train_proxy::<B>(&lang, &cfg, seed::derive(seed, HELDOUT), device)
            .map_err(stage_error(&name))?;
        model.save(&path).map_err(stage_error(&name))?;
        Ok(report)
    })
}

/// Loads the reward model of `proxy`'s architecture saved as `name` (under the run's
/// `checkpoints/`).
fn load_reward_model<B: Backend>(
    checkpoints: &Path,
    config: &ExperimentConfig,
    proxy: &ProxyConfig,
    name: &str,
    device: &B::Device,
    stage: &str,
) -> Result<goodhart_reward::RewardModel<B>> {
    let lang = language(config, stage)?;
    let template = proxy
        .model(&lang)
        .init::<B>(device)
        .map_err(stage_error(stage))?;
    let path = checkpoints.join(name).with_extension("mpk");
    template.load(&path, device).map_err(stage_error(stage))
}

/// Loads the reward models of `spec` saved by [`proxies`] from the run's `checkpoints/`
/// as one (aggregated) proxy.
pub(crate) fn load_proxy<B: Backend>(
    checkpoints: &Path,
    config: &ExperimentConfig,
    spec: ProxySpec,
    seed: u64,
    device: &B::Device,
    stage: &str,
) -> Result<Proxy<B>> {
    let proxy = spec.config(config);
    let members = (0..spec.members)
        .map(|m| {
            let name = spec.artifact(seed, m);
            load_reward_model(checkpoints, config, &proxy, &name, device, stage)
        })
        .collect::<Result<Vec<_>>>()?;
    policy_gradient::proxy(members, spec.aggregation).map_err(stage_error(stage))
}

/// Loads the held-out proxy for `spec` saved by [`heldout_proxy`].
fn load_heldout<B: Backend>(
    checkpoints: &Path,
    config: &ExperimentConfig,
    spec: ProxySpec,
    seed: u64,
    device: &B::Device,
    stage: &str,
) -> Result<Proxy<B>> {
    let name = heldout_name(spec, seed);
    let model = load_reward_model(checkpoints, config, &config.proxy, &name, device, stage)?;
    policy_gradient::proxy(vec![model], Aggregator::Mean).map_err(stage_error(stage))
}

/// A stage that runs RL from the base policy against the proxy `spec` and returns its
/// trace; the trained policy is saved to `save_to` when given. `monitors` score every
/// sample ([`Monitors`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn rl_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    name: &str,
    experiment: &str,
    series: &str,
    pg: &RlConfig,
    seed: u64,
    spec: ProxySpec,
    save_to: Option<std::path::PathBuf>,
    monitors: Monitors,
    device: &B::Device,
) -> Result<Trace> {
    let checkpoints = runner.dir().checkpoints();
    let pg = &RlConfig {
        on_nan: runner.nan_policy(),
        ..pg.clone()
    };
    runner.stage(name, |log| {
        log.expect_lines(pg.steps as u64);
        // Loaded only when the stage runs: a completed stage needs none of them.
        let policy = load_base::<B>(&checkpoints, config, seed, device, name)?;
        let reference = load_base::<B::InnerBackend>(&checkpoints, config, seed, device, name)?;
        let proxy = load_proxy::<B::InnerBackend>(&checkpoints, config, spec, seed, device, name)?;
        let monitor = monitors
            .heldout
            .then(|| {
                load_heldout::<B::InnerBackend>(&checkpoints, config, spec, seed, device, name)
            })
            .transpose()?;
        let lang = language(config, name)?;
        let ood = monitors
            .ood
            .then(|| {
                let model = proxy.members()[0].clone();
                ood_monitor(&lang, model, seed, device).map_err(stage_error(name))
            })
            .transpose()?;
        let mut logger = Logger::new(log, experiment, series);
        let mut points = Vec::new();
        let gold = LanguageGold::new(&lang);
        let mut task = LanguageTask::new(&lang, &proxy, &gold);
        if let Some(m) = &monitor {
            task = task.with_monitor(HELDOUT, Monitor::Reward(m));
        }
        if let Some(o) = &ood {
            task = task.with_monitor(OOD, Monitor::Ood(o));
        }
        let trained = policy_gradient::train(
            pg,
            &task,
            policy,
            &reference,
            seed::derive(seed, name),
            device,
            &mut |line: &policy_gradient::StepLine| record(line, &mut points, &mut logger),
        )
        .map_err(stage_error(name))?;
        if let Some(path) = &save_to {
            save_module(&trained, path).map_err(checkpoint_error(name))?;
        }
        Ok(Trace {
            series: series.to_string(),
            points,
        })
    })
}

/// A stage that runs best-of-n ([`best_of_n`], the unbiased estimator) from the base
/// policy against the proxy `spec` and logs one line per n (`n`, `kl/ref`, `kl/d` and
/// both rewards) under `series`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn bon_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    name: &str,
    experiment: &str,
    series: &str,
    spec: ProxySpec,
    seed: u64,
    bon: &BestOfNConfig,
    device: &B::Device,
) -> Result<Vec<BonPoint>> {
    let checkpoints = runner.dir().checkpoints();
    runner.stage(name, |log| {
        let policy = load_base::<B::InnerBackend>(&checkpoints, config, seed, device, name)?;
        let proxy = load_proxy::<B::InnerBackend>(&checkpoints, config, spec, seed, device, name)?;
        let lang = language(config, name)?;
        let mut logger = Logger::new(log, experiment, series);
        let points = best_of_n(
            &policy,
            &lang,
            &proxy,
            &LanguageGold::new(&lang),
            &bon.ns,
            bon.samples_per_prompt,
            bon.prompts,
            seed::derive(seed, name),
            device,
        )
        .map_err(stage_error(name))?;
        for p in &points {
            let m = BTreeMap::from([
                ("n".to_string(), p.n as f64),
                ("kl/ref".to_string(), p.kl),
                (KEY_KL_D.to_string(), p.d),
                (KEY_PROXY_MEAN.to_string(), p.proxy),
                (KEY_GOLD_MEAN.to_string(), p.gold),
            ]);
            logger.log(p.n as u64, m).map_err(stage_error(name))?;
        }
        Ok(points)
    })
}

/// Records one step: its trace point, its samples and its metrics line.
pub(crate) fn record(
    line: &policy_gradient::StepLine,
    points: &mut Vec<TracePoint>,
    logger: &mut Logger,
) -> goodhart_core::Result<()> {
    points.push(trace_point(line));
    logger.samples(&line.samples)?;
    logger.log(line.step as u64, line.metrics.clone())
}

/// The trace point of one step.
pub(crate) fn trace_point(line: &policy_gradient::StepLine) -> TracePoint {
    let get = |k: &str| line.get(k);
    TracePoint {
        step: line.step as u64,
        d: get(KEY_KL_D),
        proxy: get(KEY_PROXY_MEAN),
        gold: get(KEY_GOLD_MEAN),
        metrics: line
            .metrics
            .iter()
            .filter(|(k, _)| ![KEY_KL_D, KEY_PROXY_MEAN, KEY_GOLD_MEAN].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peak of the 5-step centred mean, not the largest single batch: a noisy spike at
    /// step 1 does not move it; the drop fraction is on the smoothed curve.
    #[test]
    fn trace_peak_is_the_smoothed_one() {
        let gold = [0.0, 3.0, 0.0, 1.0, 2.0, 2.0, 2.0, 1.0, 0.0];
        let trace = Trace {
            series: "t".into(),
            points: gold
                .iter()
                .enumerate()
                .map(|(i, &g)| TracePoint {
                    step: i as u64,
                    d: 0.0,
                    proxy: 0.0,
                    gold: g,
                    metrics: BTreeMap::new(),
                })
                .collect(),
        };
        // Centred means of 5 (truncated): 1, 1, 1.2, 1.6, 1.4, 1.6, 1.4, 1.25, 1 -> the
        // first maximum, 1.6 at step 3 (the raw maximum is 3 at step 1).
        let p = trace.peak().unwrap();
        assert_eq!(p.step, 3);
        assert!((p.value - 1.6).abs() < 1e-12);
        // Drop fraction: (1.6 - 1) / (1.6 - 1) = 1 on the smoothed curve.
        assert!((trace.drop_fraction().unwrap() - 1.0).abs() < 1e-12);
        // A non-finite gold is left out, not an error.
        let mut gap = trace.clone();
        gap.points[2].gold = f64::NAN;
        assert!(gap.peak().is_some());
    }
}
