//! The rubric-hacking lab ("Reward Hacking in Rubric-Based Reinforcement Learning",
//! METHODS-labs.md section 1) on goodhart-envs' rubric world ([`crate::rubric`]).
//!
//! Per seed, a base policy is fine-tuned on the world's generator in both contexts (the
//! rubric-conditioned one follows the rubric more). Per verifier (weak and strong by
//! default), GRPO (`[rl]`, with the verifier's overrides) trains it in the prompt-only
//! context against that verifier's rubric score, the reference's score (the truth) logged
//! as gold. Every `eval_every` steps (step 0 included) the checkpoint is evaluated on
//! fresh samples, `eval_samples` per prompt in the prompt-only context (one sampling
//! stream per seed, shared by the verifiers' runs), graded by the verifier (the same
//! blind spots; with random errors, a stream of its own) and the reference:
//! - the verifier's mean reward (the proxy) and the reference's;
//! - the exploitation rate against the previous checkpoint's verdicts on the same items
//!   (prompt, sample index), `sum w N J / sum w N`, and its weight by failure mode;
//! - the share of the credited weight the reference rejects;
//! - the self-internalisation gap on `gap_samples` samples per prompt drawn in the
//!   rubric-conditioned context.
//!
//! Over the checkpoints of a run: the peak of the reference smoothed by a centred moving
//! average of 3 checkpoints; the Pearson correlation of the gap with the reference
//! reward and with `sqrt(KL)` to the base policy; and the stopping regret (the smoothed
//! reference's peak less its value at the stop) of stopping at the gap's argmax and at
//! the training reward's (the verifier's) argmax.
//!
//! Stages: `rubric/sft/s{seed}` (the base policy, saved) and `rubric/{verifier}/s{seed}`
//! (RL and its checkpoints' evaluations; metric lines in series `{verifier}/s{seed}`,
//! evaluations in `{verifier}/s{seed}/eval`).

use std::{cell::RefCell, collections::BTreeMap};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::seed;
use goodhart_envs::rubric::{
    FailureMode, RubricWorld, RubricWorldConfig, Verdict, VerifierErrors, VerifierRates, EOS, PAD,
};
use goodhart_metrics::{
    evaluate::{smoothed_gold, GoldPeakRule, Run},
    stats::pearson,
    step::KEY_GOLD_MEAN,
};
use goodhart_policy::{checkpoint::save_module, GenerationConfig, TransformerLm};

use super::{
    checkpoint_error,
    lm::{load_sft_policy, record},
    mean_sd,
    mitigations::rl_with,
    stage_error, table, Experiment, Logger, Part,
};
use crate::{
    config::{at, positive, section, ConfigError, ExperimentConfig},
    policy_gradient::{self, sample_and_score, RlConfig},
    rubric::{
        exploitation, self_internalisation_gap, train_base, BaseReport, Exploitation, RubricTask,
        RubricVerifier,
    },
    runner::{Result, Runner},
};

/// `[rubric]`: RL against rubric verifiers of graded strength, exploitation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RubricExperiment {
    /// Seeds (`seed`, `seed + 1`, ...): each its base policy and one run per verifier.
    pub seeds: usize,
    /// The world.
    pub world: RubricWorldConfig,
    /// The verifiers trained against.
    pub verifiers: Vec<VerifierArm>,
    /// Steps between evaluated checkpoints.
    pub eval_every: usize,
    /// Evaluation samples per prompt (prompt-only context).
    pub eval_samples: usize,
    /// Samples per prompt of the self-internalisation gap (rubric-conditioned context).
    pub gap_samples: usize,
}

impl Default for RubricExperiment {
    fn default() -> Self {
        Self {
            seeds: 3,
            world: RubricWorldConfig::default(),
            verifiers: vec![
                VerifierArm {
                    name: "weak".into(),
                    rates: VerifierRates::weak(),
                    errors: VerifierErrors::Systematic,
                    rl: toml::Table::new(),
                },
                VerifierArm {
                    name: "strong".into(),
                    rates: VerifierRates::strong(),
                    errors: VerifierErrors::Systematic,
                    rl: toml::Table::new(),
                },
            ],
            eval_every: 10,
            eval_samples: 8,
            gap_samples: 4,
        }
    }
}

/// A verifier trained against.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierArm {
    /// Its name in tables, series and stage names.
    pub name: String,
    /// Its failure rates.
    #[serde(default)]
    pub rates: VerifierRates,
    /// Whether its errors are fixed by the evidence (`"systematic"`, the default: a
    /// judge's blind spots) or drawn afresh at each grading (`"random"`).
    #[serde(default)]
    pub errors: VerifierErrors,
    /// Overrides of `[rl]` for its runs.
    #[serde(default)]
    pub rl: toml::Table,
}

/// One evaluated checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RubricCheckpoint {
    /// Steps trained.
    pub step: u64,
    /// The verifier's mean reward on the evaluation samples.
    pub proxy: f64,
    /// The reference's mean reward on the same samples.
    pub reference: f64,
    /// The exploitation against the previous checkpoint (none at the first).
    pub exploitation: Option<Exploitation>,
    /// The share of the verifier's credited weight the reference rejects.
    pub false_credit: f64,
    /// The self-internalisation gap.
    pub gap: f64,
    /// The reference's mean reward on the gap's samples (drawn with the rubric in the
    /// context).
    pub reference_with_rubric: f64,
    /// `sqrt(KL)` to the base policy of the training batch at this step (`kl/d`; none
    /// for the final policy, which samples no batch).
    pub kl_d: Option<f64>,
}

/// One run: a verifier and a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RubricRun {
    /// The verifier's name.
    pub verifier: String,
    /// The seed.
    pub seed: u64,
    /// Its checkpoints, in step order.
    pub checkpoints: Vec<RubricCheckpoint>,
}

/// What the experiment produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RubricOutput {
    /// Each seed's base policy report.
    pub bases: Vec<BaseReport>,
    /// Every run.
    pub runs: Vec<RubricRun>,
}

impl RubricExperiment {
    fn rl(&self, base: &RlConfig, i: usize) -> std::result::Result<RlConfig, ConfigError> {
        rl_with(
            base,
            &self.verifiers[i].rl,
            &format!("rubric.verifiers[{i}].rl"),
        )
    }
}

impl Experiment for RubricExperiment {
    const NAME: &'static str = "rubric";
    const SUMMARY: &'static str =
        "RL against weak and strong rubric verifiers: proxy vs reference reward, exploitation rate by failure mode, self-internalisation gap";
    type Output = RubricOutput;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("rubric.seeds", self.seeds)?;
        positive("rubric.eval_every", self.eval_every)?;
        positive("rubric.eval_samples", self.eval_samples)?;
        positive("rubric.gap_samples", self.gap_samples)?;
        let world = RubricWorld::new(self.world.clone()).map_err(|e| at("rubric", e))?;
        positive("rubric.world.criteria", self.world.criteria)?;
        if self.verifiers.is_empty() {
            return Err(ConfigError::invalid("rubric.verifiers", "is empty"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, v) in self.verifiers.iter().enumerate() {
            let path = format!("rubric.verifiers[{i}]");
            if v.name.is_empty() || v.name.contains('/') || !names.insert(v.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{path}.name"),
                    format!("`{}` is empty, has a `/` or is used twice", v.name),
                ));
            }
            section("rubric", v.rates.validate(&format!("{path}.rates")))?;
            let rl = self.rl(&config.rl, i)?;
            section(&format!("{path}.rl"), rl.validate(1))?;
            let need = world.max_prompt_len() + rl.max_new_tokens.max(self.world.max_len + 1);
            section("sft", config.sft.validate_for(world.vocab_size(), need))?;
        }
        Ok(())
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<RubricOutput> {
        let mut out = RubricOutput {
            bases: Vec::new(),
            runs: Vec::new(),
        };
        for s in 0..self.seeds {
            let seed = config.seed + s as u64;
            out.bases
                .push(base_stage::<B>(runner, config, self, seed, device)?);
            for i in 0..self.verifiers.len() {
                out.runs
                    .push(rl_stage::<B>(runner, config, self, i, seed, device)?);
            }
        }
        Ok(out)
    }

    fn summarize(&self, output: &RubricOutput) -> Part {
        summarize(self, output)
    }
}

fn world(cfg: &RubricExperiment, stage: &str) -> Result<RubricWorld> {
    RubricWorld::new(cfg.world.clone()).map_err(stage_error(stage))
}

fn base_path(seed: u64) -> String {
    format!("rubric/s{seed}/base")
}

/// Stage `rubric/sft/s{seed}`: the base policy, saved.
fn base_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &RubricExperiment,
    seed: u64,
    device: &B::Device,
) -> Result<BaseReport> {
    let name = format!("rubric/sft/s{seed}");
    let path = runner.artifact(&base_path(seed))?;
    runner.stage(&name, |_| {
        let world = world(cfg, &name)?;
        let (model, report) =
            train_base::<B>(&world, &config.sft, seed, device).map_err(stage_error(&name))?;
        save_module(&model, &path).map_err(checkpoint_error(&name))?;
        Ok(report)
    })
}

/// Stage `rubric/{verifier}/s{seed}`: RL against the verifier, checkpoints evaluated.
fn rl_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &RubricExperiment,
    index: usize,
    seed: u64,
    device: &B::Device,
) -> Result<RubricRun> {
    let arm = &cfg.verifiers[index];
    let name = format!("rubric/{}/s{seed}", arm.name);
    let rl = RlConfig {
        on_nan: runner.nan_policy(),
        ..cfg.rl(&config.rl, index).map_err(|e| {
            stage_error(&name)(goodhart_core::GoodhartError::invalid("rl", e.to_string()))
        })?
    };
    let world = world(cfg, &name)?;
    let base = runner.dir().checkpoints().join(base_path(seed));
    let series = format!("{}/s{seed}", arm.name);
    let eval_series = format!("{series}/eval");
    runner.stage(&name, |log| {
        log.expect_lines(rl.steps as u64);
        let err = stage_error(&name);
        // Loaded only when the stage runs: a completed stage needs neither.
        let policy = load_sft_policy::<B>(&base, config, world.vocab_size(), device, &name)?;
        let reference =
            load_sft_policy::<B::InnerBackend>(&base, config, world.vocab_size(), device, &name)?;
        // The verifier's blind spots (or its random stream) come from the seed and its
        // name, so training and evaluation see the same verifier.
        let verifier_seed = seed::derive(seed, &format!("rubric/verifier/{}", arm.name));
        let proxy = RubricVerifier::new(&world, &arm.name, arm.rates, arm.errors, verifier_seed)
            .map_err(stage_error(&name))?;
        let gold = RubricVerifier::reference(&world).map_err(stage_error(&name))?;
        let task = RubricTask::new(&world, &proxy, &gold, false);
        // The evaluation's copy of the verifier: the same blind spots, and with random
        // errors its own stream, so training sees the same verdicts with or without it.
        let eval_proxy = RubricVerifier::new(
            &world,
            &arm.name,
            arm.rates,
            arm.errors,
            match arm.errors {
                VerifierErrors::Systematic => verifier_seed,
                VerifierErrors::Random => seed::derive(verifier_seed, "eval"),
            },
        )
        .map_err(stage_error(&name))?;
        let eval_task = RubricTask::new(&world, &eval_proxy, &gold, false);
        let gap_task = RubricTask::new(&world, &eval_proxy, &gold, true);
        let generation = GenerationConfig::new(rl.max_new_tokens)
            .with_temperature(rl.temperature)
            .with_eos_id(Some(EOS as usize))
            .with_pad_id(PAD as usize);
        let prompts = world.config().prompts;
        let rows: Vec<usize> = (0..prompts)
            .flat_map(|i| std::iter::repeat_n(i, cfg.eval_samples))
            .collect();
        let gap_rows: Vec<usize> = (0..prompts)
            .flat_map(|i| std::iter::repeat_n(i, cfg.gap_samples))
            .collect();
        // One sampling stream per seed, whatever the verifier: every run's step-0
        // evaluation draws the same samples from the same base policy.
        let mut eval_rng = seed::rng(seed, "rubric/eval");
        let logger = RefCell::new(Logger::new(log, RubricExperiment::NAME, &series));
        let mut checkpoints = Vec::new();
        let mut before: Option<Vec<Vec<Verdict>>> = None;
        let mut points = Vec::new();
        let mut evaluate =
            |step: usize, policy: &TransformerLm<B::InnerBackend>| -> goodhart_core::Result<()> {
                let s = sample_and_score(
                    policy,
                    &eval_task,
                    &rows,
                    &generation,
                    &mut eval_rng,
                    device,
                )?;
                let now: Vec<Vec<Verdict>> = rows
                    .iter()
                    .zip(&s.responses)
                    .map(|(&i, r)| eval_proxy.judge(i, &world.parse(r).0))
                    .collect();
                let (mut proxy_sum, mut reference_sum) = (0.0, 0.0);
                let (mut credited, mut rejected) = (0.0, 0.0);
                for (&i, v) in rows.iter().zip(&now) {
                    let credit: Vec<bool> = v.iter().map(|v| v.credited).collect();
                    let truth: Vec<bool> = v.iter().map(|v| v.truth).collect();
                    proxy_sum += eval_proxy.reward(i, &credit);
                    reference_sum += eval_proxy.reward(i, &truth);
                    for (w, v) in world.rubric(i).iter().zip(v) {
                        if v.credited {
                            credited += w.weight;
                            if !v.truth {
                                rejected += w.weight;
                            }
                        }
                    }
                }
                let exploited = before
                    .as_ref()
                    .map(|b| exploitation(&world, &rows, b, &now))
                    .transpose()?;
                before = Some(now);
                let g = sample_and_score(
                    policy,
                    &gap_task,
                    &gap_rows,
                    &generation,
                    &mut eval_rng,
                    device,
                )?;
                let reference_with_rubric = g.gold.iter().sum::<f64>() / g.gold.len() as f64;
                let gap_samples: Vec<(usize, Vec<u32>)> =
                    gap_rows.iter().copied().zip(g.responses).collect();
                let gap = self_internalisation_gap(policy, &world, &gap_samples, device)?;
                let n = rows.len() as f64;
                let point = RubricCheckpoint {
                    step: step as u64,
                    proxy: proxy_sum / n,
                    reference: reference_sum / n,
                    exploitation: exploited,
                    false_credit: if credited > 0.0 {
                        rejected / credited
                    } else {
                        0.0
                    },
                    gap,
                    reference_with_rubric,
                    kl_d: None,
                };
                let mut metrics = BTreeMap::from([
                    ("eval/proxy".to_string(), point.proxy),
                    ("eval/reference".to_string(), point.reference),
                    ("eval/false_credit".to_string(), point.false_credit),
                    ("eval/gap".to_string(), point.gap),
                    (
                        "eval/reference_with_rubric".to_string(),
                        point.reference_with_rubric,
                    ),
                ]);
                if let Some(rate) = point.exploitation.as_ref().and_then(Exploitation::rate) {
                    metrics.insert("eval/exploitation".into(), rate);
                }
                logger
                    .borrow_mut()
                    .log_as(&eval_series, step as u64, metrics)?;
                checkpoints.push(point);
                Ok(())
            };
        policy_gradient::train_with_checkpoints(
            &rl,
            &task,
            policy,
            &reference,
            seed::derive(seed, &name),
            device,
            &mut |line: &policy_gradient::StepLine| {
                record(line, &mut points, &mut logger.borrow_mut())
            },
            cfg.eval_every,
            &mut evaluate,
        )
        .map_err(err)?;
        for c in &mut checkpoints {
            c.kl_d = points.get(c.step as usize).map(|p| p.d);
        }
        Ok(RubricRun {
            verifier: arm.name.clone(),
            seed,
            checkpoints,
        })
    })
}

/// The index of the highest value, the first of ties.
fn argmax(values: &[f64]) -> Option<usize> {
    (0..values.len()).reduce(|best, i| if values[i] > values[best] { i } else { best })
}

/// What one run gives the summary.
struct RunFigures {
    proxy: (f64, f64),
    reference: (f64, f64),
    /// The peak of the smoothed reference: step and value.
    reference_peak: (u64, f64),
    /// The smoothed reference at the end, less its peak.
    reference_drop: f64,
    exploitation_first: Option<f64>,
    /// Mean exploitation rate over the first and the second half of the intervals.
    exploitation_halves: (Option<f64>, Option<f64>),
    /// False credit at step 0, after the first interval, at the end.
    false_credit: (f64, f64, f64),
    by_mode: BTreeMap<String, f64>,
    pearson: Option<f64>,
    pearson_kl: Option<f64>,
    with_rubric: (f64, f64),
    gap: (f64, f64),
    gap_stop: (u64, f64),
    train_stop: (u64, f64),
}

/// Checkpoints in a row a moving average of the reference is centred on (the peak
/// and the regrets read it, not single noisy evaluations).
const SMOOTHING: usize = 3;

fn run_figures(run: &RubricRun) -> Option<RunFigures> {
    let c = &run.checkpoints;
    let (first, last) = (c.first()?, c.last()?);
    // The reference smoothed by goodhart-metrics' centred moving average.
    let as_run = Run {
        name: run.verifier.clone(),
        steps: c
            .iter()
            .map(|p| {
                (
                    p.step,
                    BTreeMap::from([(KEY_GOLD_MEAN.to_string(), p.reference)]),
                )
            })
            .collect(),
    };
    let rule = GoldPeakRule {
        window: SMOOTHING,
        ..GoldPeakRule::default()
    };
    let smooth: Vec<f64> = smoothed_gold(&as_run, &rule)
        .ok()?
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    let peak = argmax(&smooth)?;
    let stop = |i: usize| (c[i].step, smooth[peak] - smooth[i]);
    let rates: Vec<f64> = c
        .iter()
        .skip(1)
        .map(|p| {
            p.exploitation
                .as_ref()
                .and_then(Exploitation::rate)
                .unwrap_or(f64::NAN)
        })
        .collect();
    let half = |v: &[f64]| {
        let v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut by_mode = BTreeMap::new();
    let mut exploited = 0.0;
    for e in c.iter().filter_map(|p| p.exploitation.as_ref()) {
        exploited += e.exploited;
        for (m, w) in &e.by_mode {
            *by_mode.entry(m.clone()).or_insert(0.0) += w;
        }
    }
    by_mode.values_mut().for_each(|w| *w /= exploited);
    let gaps: Vec<f64> = c.iter().map(|p| p.gap).collect();
    let proxies: Vec<f64> = c.iter().map(|p| p.proxy).collect();
    let refs: Vec<f64> = c.iter().map(|p| p.reference).collect();
    let (g, d): (Vec<f64>, Vec<f64>) = c.iter().filter_map(|p| Some((p.gap, p.kl_d?))).unzip();
    Some(RunFigures {
        proxy: (first.proxy, last.proxy),
        reference: (first.reference, last.reference),
        reference_peak: (c[peak].step, smooth[peak]),
        reference_drop: smooth[c.len() - 1] - smooth[peak],
        exploitation_first: rates.first().copied().filter(|r| r.is_finite()),
        exploitation_halves: (
            half(&rates[..rates.len() / 2]),
            half(&rates[rates.len() / 2..]),
        ),
        false_credit: (
            first.false_credit,
            c.get(1).map_or(f64::NAN, |p| p.false_credit),
            last.false_credit,
        ),
        by_mode,
        pearson: pearson(&gaps, &refs).ok(),
        pearson_kl: pearson(&g, &d).ok(),
        with_rubric: (first.reference_with_rubric, last.reference_with_rubric),
        gap: (first.gap, last.gap),
        gap_stop: stop(argmax(&gaps)?),
        train_stop: stop(argmax(&proxies)?),
    })
}

/// `mean ± sd` of the values, `-` for none.
fn spread(values: impl IntoIterator<Item = f64>) -> Value {
    let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    let (m, sd) = mean_sd(v);
    json!(format!("{m:.3} ± {sd:.3}"))
}

fn summarize(cfg: &RubricExperiment, output: &RubricOutput) -> Part {
    let mut figures = serde_json::Map::new();
    let (mut rewards, mut exploit, mut modes, mut gap_rows) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut charts = Vec::new();
    for arm in &cfg.verifiers {
        let runs: Vec<&RubricRun> = output
            .runs
            .iter()
            .filter(|r| r.verifier == arm.name)
            .collect();
        let f: Vec<RunFigures> = runs.iter().filter_map(|r| run_figures(r)).collect();
        let col = |g: &dyn Fn(&RunFigures) -> f64| spread(f.iter().map(g));
        let opt = |g: &dyn Fn(&RunFigures) -> Option<f64>| spread(f.iter().filter_map(g));
        rewards.push(json!([
            arm.name,
            f.len(),
            col(&|r| r.proxy.0),
            col(&|r| r.proxy.1),
            col(&|r| r.reference.0),
            col(&|r| r.reference_peak.1),
            col(&|r| r.reference_peak.0 as f64),
            col(&|r| r.reference.1),
            col(&|r| r.reference_drop),
            col(&|r| (r.proxy.1 - r.proxy.0) - (r.reference.1 - r.reference.0)),
        ]));
        exploit.push(json!([
            arm.name,
            opt(&|r| r.exploitation_first),
            opt(&|r| r.exploitation_halves.0),
            opt(&|r| r.exploitation_halves.1),
            col(&|r| r.false_credit.0),
            col(&|r| r.false_credit.1),
            col(&|r| r.false_credit.2),
        ]));
        let mut row = vec![json!(arm.name)];
        for m in FailureMode::ALL {
            row.push(col(&|r| r.by_mode.get(m.name()).copied().unwrap_or(0.0)));
        }
        modes.push(Value::Array(row));
        gap_rows.push(json!([
            arm.name,
            col(&|r| r.gap.0),
            col(&|r| r.gap.1),
            col(&|r| r.with_rubric.0),
            col(&|r| r.with_rubric.1),
            opt(&|r| r.pearson),
            opt(&|r| r.pearson_kl),
            col(&|r| r.reference_peak.0 as f64),
            col(&|r| r.gap_stop.0 as f64),
            col(&|r| r.gap_stop.1),
            col(&|r| r.train_stop.0 as f64),
            col(&|r| r.train_stop.1),
        ]));
        let mean = |g: &dyn Fn(&RunFigures) -> Option<f64>| {
            let v: Vec<f64> = f.iter().filter_map(g).filter(|x| x.is_finite()).collect();
            (!v.is_empty()).then(|| mean_sd(v).0)
        };
        figures.insert(
            arm.name.clone(),
            json!({
                "proxy_gain": mean(&|r| Some(r.proxy.1 - r.proxy.0)),
                "reference_gain": mean(&|r| Some(r.reference.1 - r.reference.0)),
                "reference_drop_from_peak": mean(&|r| Some(r.reference_drop)),
                "exploitation_first_interval": mean(&|r| r.exploitation_first),
                "exploitation_first_half": mean(&|r| r.exploitation_halves.0),
                "exploitation_second_half": mean(&|r| r.exploitation_halves.1),
                "false_credit_final": mean(&|r| Some(r.false_credit.2)),
                "gap_reference_pearson": mean(&|r| r.pearson),
                "gap_sqrt_kl_pearson": mean(&|r| r.pearson_kl),
                "regret_gap_stop": mean(&|r| Some(r.gap_stop.1)),
                "regret_train_stop": mean(&|r| Some(r.train_stop.1)),
            }),
        );
        // Curves: the mean over seeds at each checkpoint.
        let curve = |key: &dyn Fn(&RubricCheckpoint) -> Option<f64>| -> Vec<[Option<f64>; 2]> {
            let steps: Vec<u64> = runs
                .first()
                .map(|r| r.checkpoints.iter().map(|p| p.step).collect())
                .unwrap_or_default();
            steps
                .iter()
                .map(|&s| {
                    let v: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.checkpoints.iter().find(|p| p.step == s))
                        .filter_map(key)
                        .collect();
                    [Some(s as f64), (!v.is_empty()).then(|| mean_sd(v).0)]
                })
                .collect()
        };
        charts.push(json!({
            "title": format!("Rubric lab, {} verifier: rewards on fresh samples (mean of {} seeds)", arm.name, runs.len()),
            "x_label": "RL step",
            "lines": [
                {"label": "verifier (proxy)", "points": curve(&|p| Some(p.proxy))},
                {"label": "reference", "points": curve(&|p| Some(p.reference))},
                {"label": "exploitation rate", "points": curve(&|p| p.exploitation.as_ref()?.rate()), "dashed": true},
            ],
        }));
        charts.push(json!({
            "title": format!("Rubric lab, {} verifier: self-internalisation gap (mean of {} seeds)", arm.name, runs.len()),
            "x_label": "RL step",
            "lines": [{"label": "gap", "points": curve(&|p| Some(p.gap))}],
        }));
    }
    let bases: Vec<f64> = output.bases.iter().map(|b| b.heldout_nll).collect();
    figures.insert("base_heldout_nll".into(), json!(mean_sd(bases).0));
    let mut mode_columns = vec!["verifier".to_string()];
    mode_columns.extend(FailureMode::ALL.iter().map(|m| m.name().to_string()));
    let mode_columns: Vec<&str> = mode_columns.iter().map(String::as_str).collect();
    Part {
        figures: Value::Object(figures),
        tables: vec![
            table(
                "Rubric lab: verifier (proxy) and reference reward on fresh samples, mean ± sd over seeds (the reference smoothed over 3 checkpoints for its peak)",
                &[
                    "verifier",
                    "seeds",
                    "proxy, step 0",
                    "proxy, final",
                    "reference, step 0",
                    "reference, smoothed peak",
                    "peak step",
                    "reference, final",
                    "smoothed final - peak",
                    "proxy gain - reference gain",
                ],
                rewards,
            ),
            table(
                "Rubric lab: exploitation rate (newly credited weight the reference rejects) and false credit (credited weight it rejects)",
                &[
                    "verifier",
                    "exploitation, first interval",
                    "exploitation, first half (mean)",
                    "exploitation, second half (mean)",
                    "false credit, step 0",
                    "false credit, first interval",
                    "false credit, final",
                ],
                exploit,
            ),
            table(
                "Rubric lab: exploited weight by failure mode over the run (shares)",
                &mode_columns,
                modes,
            ),
            table(
                "Rubric lab: self-internalisation gap as a stopping rule (regret = smoothed reference peak - smoothed reference at the stop)",
                &[
                    "verifier",
                    "gap, step 0",
                    "gap, final",
                    "reference with the rubric in context, step 0",
                    "reference with the rubric in context, final",
                    "Pearson r(gap, reference)",
                    "Pearson r(gap, sqrt KL)",
                    "reference peak step",
                    "argmax-gap step",
                    "regret, argmax gap",
                    "argmax-training-reward step",
                    "regret, argmax training reward",
                ],
                gap_rows,
            ),
        ],
        charts,
        ..Part::default()
    }
}
