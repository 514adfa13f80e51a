//! The DAA lab: direct alignment without a reward model ("Scaling Laws for Reward Model
//! Overoptimization in Direct Alignment Algorithms"; RPO from "Provably Mitigating
//! Overoptimization in RLHF"). For each method (a preference loss of
//! [`crate::preference`]), each `beta` of the sweep and each seed, the base policy is
//! trained on the synthetic language's gold-labelled, noisy preference pairs against
//! itself as the frozen reference, and every `eval_every` steps the gold of fresh samples
//! and the KL to the reference are measured: gold against `d = sqrt(KL)` per beta, and
//! within an epoch.
//!
//! The pairs are those a proxy of `[proxy]` with the same `pairs` and `label_noise` is
//! trained on (stream `proxy/pairs` of the seed): a DAA run and a reward model see the
//! same data. SLiC has no `beta`: it runs once per seed with its own settings.
//!
//! Evaluation: `eval_samples` prompts (the topics in turn), one response each at
//! temperature 1; the gold mean, and `KL(pi || pi_ref)` estimated by the mean over samples
//! of `sum_t log pi - log pi_ref` over the response (k1, unbiased).
//!
//! Stages: `lm/sft/s{seed}` ([`super::lm`]), then `daa/{method}/b{beta}/s{seed}` (SLiC:
//! `daa/{method}/s{seed}`).

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
use goodhart_metrics::overopt::OveroptLaw;
use goodhart_objective::preference::{DpoConfig, IpoConfig, PreferenceLossConfig, RpoConfig};
use goodhart_policy::{generate, score::score, GenerationConfig, TransformerLm};

use super::{
    lm::{self, base_policy, load_base, Trace, TracePoint},
    mean_sd,
    overopt::fit_json,
    stage_error, table, Experiment, Logger, Part,
};
use crate::{
    config::{positive, section, ConfigError, ExperimentConfig},
    policy_gradient::{gold_reward, host_rows},
    preference::{self, PreferencePair, PreferenceTrainConfig},
    runner::{Result, Runner},
    sft::PROMPT_LEN,
};

/// Direct alignment on the synthetic language: methods x betas x seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaaExperiment {
    /// Seeds per method and beta.
    pub seeds: usize,
    /// Preference pairs, labelled by gold.
    pub pairs: usize,
    /// Probability that a pair's label is flipped.
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
/// mean implicit reward margin of the step's batch, 0 before training).
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
                    "is set by the lab (each method's `loss`, the language's padding, the \
                     run's seed): remove it",
                ));
            }
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

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Vec<DaaRun>> {
        let mut out = Vec::new();
        for i in 0..self.seeds {
            let seed = config.seed + i as u64;
            base_policy::<B>(runner, config, seed, device)?;
            for (method, beta, loss) in self.runs() {
                let series = match beta {
                    Some(b) => format!("{}/b{b}/s{seed}", method.name),
                    None => format!("{}/s{seed}", method.name),
                };
                let trace = daa_stage::<B>(runner, config, self, &series, loss, seed, device)?;
                out.push(DaaRun {
                    method: method.name.clone(),
                    beta,
                    seed,
                    trace,
                });
            }
        }
        Ok(out)
    }

    fn summarize(&self, runs: &Vec<DaaRun>) -> Part {
        summarize(self, runs)
    }
}

/// Stage `daa/{series}`: one preference run from the seed's base policy, evaluated every
/// `eval_every` steps.
fn daa_stage<B: AutodiffBackend>(
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
        let last = train.steps(pairs.len()) - 1;
        // Every run of a seed samples its evaluations from one stream: the same base
        // policy gives every run the same initial point.
        let mut rng = seed::rng(seed, "daa/eval");
        let mut logger = Logger::new(log, DaaExperiment::NAME, series);
        let mut points = Vec::new();
        // Before any step: the base policy itself (KL 0).
        let (gold, kl) = evaluate(&lang, &reference, &reference, cfg.eval_samples, &mut rng)
            .map_err(stage_error(&name))?;
        points.push(point(0, gold, kl, 0.0, BTreeMap::new()));
        preference::train(policy, &reference, &pairs, &train, |policy, step| {
            if (step.step + 1) % cfg.eval_every != 0 && step.step != last {
                return Ok(());
            }
            let (gold, kl) = evaluate(
                &lang,
                &policy.valid(),
                &reference,
                cfg.eval_samples,
                &mut rng,
            )?;
            let mut metrics: BTreeMap<String, f64> = step
                .metrics()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            metrics.insert("epoch".into(), step.epoch as f64);
            let p = point(step.step as u64 + 1, gold, kl, step.margin, metrics);
            let mut line = p.metrics.clone();
            line.insert(goodhart_metrics::step::KEY_GOLD_MEAN.into(), p.gold);
            line.insert(goodhart_metrics::step::KEY_KL_D.into(), p.d);
            logger.log(p.step, line)?;
            points.push(p);
            Ok(())
        })
        .map_err(stage_error(&name))?;
        Ok(Trace {
            series: series.to_string(),
            points,
        })
    })
}

/// The metric holding an evaluation's `KL(pi || pi_ref)`.
const KL: &str = "kl/ref";

fn point(step: u64, gold: f64, kl: f64, margin: f64, metrics: BTreeMap<String, f64>) -> TracePoint {
    TracePoint {
        step,
        d: kl.max(0.0).sqrt(),
        proxy: margin,
        gold,
        metrics: metrics.into_iter().chain([(KL.to_string(), kl)]).collect(),
    }
}

/// Gold mean and `KL(pi || pi_ref)` of `policy` on `n` fresh samples (see the module
/// docs).
fn evaluate<B: Backend>(
    lang: &Language,
    policy: &TransformerLm<B>,
    reference: &TransformerLm<B>,
    n: usize,
    rng: &mut seed::ChaCha8Rng,
) -> goodhart_core::Result<(f64, f64)> {
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
    let ref_lp = score(reference, g.tokens.clone(), g.attention_mask.clone(), 1.0)?.logprobs;
    let kl: f64 = zero_masked(g.logprobs.clone() - ref_lp, &g.response_mask)
        .sum()
        .into_scalar()
        .to_f64()
        / n as f64;
    let mut gold = 0.0;
    for row in host_rows(&g.tokens)? {
        let (p, r) = row.split_at(PROMPT_LEN);
        gold += gold_reward(lang, p, r)?.0;
    }
    Ok((gold / n as f64, kl))
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
        let peak = mean_sd(mine.iter().filter_map(|r| r.trace.peak()).map(|p| p.gold));
        let fin = last(|p| p.gold);
        let kl = last(|p| p.metrics.get(KL).copied().unwrap_or(f64::NAN));
        let key = match beta {
            Some(b) => format!("{}/b{b}", method.name),
            None => method.name.clone(),
        };
        figures.insert(
            key,
            json!({"gold_initial": initial.0, "gold_peak": peak.0, "gold_peak_sd": peak.1,
                   "gold_final": fin.0, "gold_final_sd": fin.1, "kl_final": kl.0,
                   "kl_final_sd": kl.1}),
        );
        rows.push(json!([
            method.name,
            beta,
            initial.0,
            peak.0,
            peak.1,
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
        let coef = |f: &Option<(Value, f64, Option<f64>)>, k: &str| {
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
        fits.extend(rl.map(|f| f.0));
        fits.extend(bon.map(|f| f.0));
    }
    Part {
        figures: Value::Object(figures),
        fits,
        tables: vec![table(
            &format!(
                "DAA: gold per method and beta ({} seeds, {} pairs, label noise {})",
                cfg.seeds, cfg.pairs, cfg.label_noise
            ),
            &[
                "method",
                "beta",
                "gold initial",
                "gold peak",
                "sd",
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
