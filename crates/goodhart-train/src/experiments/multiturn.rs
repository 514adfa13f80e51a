//! The multi-turn agentic lab (METHODS-labs.md sections 2-4) on goodhart-envs' tool-use
//! world ([`crate::multiturn`]): outcome-only GRPO, GRPO on ungated dense step rewards,
//! G-RA's gated step rewards, IGPO and A2TGPO, each from the same base policy.
//!
//! Per seed, a base policy is fine-tuned on the world's generator episodes (the loss on
//! the policy's turns only). Per arm, the RL trainer (`[rl]` with the arm's overrides;
//! `max_new_tokens` set to the world's longest episode) trains it on episodes: the
//! outcome is gold; the proxy is the outcome, plus the episode's dense step rewards for a
//! `dense` arm; the per-turn signal is the dense reward (G-RA) or the information gain
//! (`signal = "information_gain"`: IGPO, A2TGPO, whose arm also uses its turn-level
//! surrogate `a2tgpo_clip`). Every `eval_every` steps (step 0
//! included) the checkpoint plays `eval_episodes` fresh episodes per question (one
//! sampling stream per seed, shared by the arms): the outcome, the dense reward (the
//! `[multiturn.reward]` weights), tool calls, relevant searches, turns and the share that
//! answered, per episode.
//!
//! Stages: `multiturn/sft/s{seed}` (the base policy, saved) and `multiturn/{arm}/s{seed}`
//! (RL and its evaluations; metric lines in series `{arm}/s{seed}`, evaluations in
//! `{arm}/s{seed}/eval`).

use std::{cell::RefCell, collections::BTreeMap};

use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use goodhart_core::seed;
use goodhart_envs::multihop::{MultihopWorld, MultihopWorldConfig};
use goodhart_metrics::{
    evaluate::{gold_peak, GoldPeakRule, Run},
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
    multiturn::{rollout, train_base, EpisodeStats, MultiturnTask, TurnRewardConfig, TurnSignal},
    policy_gradient::{self, RlConfig},
    rubric::BaseReport,
    runner::{Result, Runner},
    task::Task,
};

/// `[multiturn]`: RL on a tool-use world with outcome, dense, gated and turn-level
/// rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultiturnExperiment {
    /// Seeds (`seed`, `seed + 1`, ...): each its base policy and one run per arm.
    pub seeds: usize,
    /// The world.
    pub world: MultihopWorldConfig,
    /// The dense step rewards' weights (a dense arm's proxy, G-RA's step rewards, the
    /// evaluation's dense reward).
    pub reward: TurnRewardConfig,
    /// The arms.
    pub arms: Vec<TurnArm>,
    /// Steps between evaluated checkpoints.
    pub eval_every: usize,
    /// Evaluation episodes per question.
    pub eval_episodes: usize,
}

/// One arm: how its runs are rewarded and which estimator trains them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnArm {
    /// Its name in tables, series and stage names.
    pub name: String,
    /// The proxy adds the dense step rewards to the outcome (ungated).
    #[serde(default)]
    pub dense: bool,
    /// The per-turn signal its batches carry.
    #[serde(default = "dense_signal")]
    pub signal: TurnSignal,
    /// Overrides of `[rl]` for its runs (`advantage = { kind = "gra" }`, ...).
    #[serde(default)]
    pub rl: toml::Table,
}

fn dense_signal() -> TurnSignal {
    TurnSignal::Dense
}

fn arm(name: &str, dense: bool, signal: TurnSignal, advantage: &str) -> TurnArm {
    let mut rl = toml::Table::new();
    let mut adv = toml::Table::new();
    adv.insert("kind".into(), advantage.into());
    rl.insert("advantage".into(), adv.into());
    TurnArm {
        name: name.into(),
        dense,
        signal,
        rl,
    }
}

impl Default for MultiturnExperiment {
    fn default() -> Self {
        Self {
            seeds: 3,
            world: MultihopWorldConfig::default(),
            reward: TurnRewardConfig::default(),
            arms: vec![
                arm("outcome", false, TurnSignal::Dense, "grpo"),
                arm("dense", true, TurnSignal::Dense, "grpo"),
                arm("gra", false, TurnSignal::Dense, "gra"),
                arm("igpo", false, TurnSignal::InformationGain, "igpo"),
                {
                    // A2TGPO's own surrogate: the turn-level ratio and clip range.
                    let mut a = arm("a2tgpo", false, TurnSignal::InformationGain, "a2tgpo");
                    let mut loss = toml::Table::new();
                    loss.insert("kind".into(), "a2tgpo_clip".into());
                    a.rl.insert("loss".into(), loss.into());
                    a
                },
            ],
            eval_every: 10,
            eval_episodes: 4,
        }
    }
}

/// One evaluated checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnCheckpoint {
    /// Steps trained.
    pub step: u64,
    /// What its episodes did.
    pub stats: EpisodeStats,
}

/// One run: an arm and a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRun {
    /// The arm's name.
    pub arm: String,
    /// The seed.
    pub seed: u64,
    /// Its checkpoints, in step order.
    pub checkpoints: Vec<TurnCheckpoint>,
}

/// What the experiment produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiturnOutput {
    /// Each seed's base policy report.
    pub bases: Vec<BaseReport>,
    /// Every run.
    pub runs: Vec<TurnRun>,
}

impl MultiturnExperiment {
    fn rl(
        &self,
        base: &RlConfig,
        i: usize,
        world: &MultihopWorld,
    ) -> std::result::Result<RlConfig, ConfigError> {
        let rl = rl_with(base, &self.arms[i].rl, &format!("multiturn.arms[{i}].rl"))?;
        // The trainer's length check reads the episode's response region.
        Ok(RlConfig {
            max_new_tokens: world.max_transcript_len() - world.max_context_len(),
            ..rl
        })
    }
}

impl Experiment for MultiturnExperiment {
    const NAME: &'static str = "multiturn";
    const SUMMARY: &'static str =
        "RL on a tool-use world: outcome-only GRPO, ungated dense step rewards, G-RA gating, IGPO and A2TGPO; outcome, farming and tool calls per episode";
    type Output = MultiturnOutput;

    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError> {
        positive("multiturn.seeds", self.seeds)?;
        positive("multiturn.eval_every", self.eval_every)?;
        positive("multiturn.eval_episodes", self.eval_episodes)?;
        let world = MultihopWorld::new(self.world.clone()).map_err(|e| at("multiturn", e))?;
        section("multiturn", self.reward.validate())?;
        if self.arms.is_empty() {
            return Err(ConfigError::invalid("multiturn.arms", "is empty"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, a) in self.arms.iter().enumerate() {
            let path = format!("multiturn.arms[{i}]");
            if a.name.is_empty() || a.name.contains('/') || !names.insert(a.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{path}.name"),
                    format!("`{}` is empty, has a `/` or is used twice", a.name),
                ));
            }
            let rl = self.rl(&config.rl, i, &world)?;
            section(&format!("{path}.rl"), rl.validate_for(1, true))?;
        }
        section(
            "sft",
            config
                .sft
                .validate_for(world.vocab_size(), world.max_transcript_len() + 3),
        )?;
        Ok(())
    }

    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<MultiturnOutput> {
        let mut out = MultiturnOutput {
            bases: Vec::new(),
            runs: Vec::new(),
        };
        for s in 0..self.seeds {
            let seed = config.seed + s as u64;
            out.bases
                .push(base_stage::<B>(runner, config, self, seed, device)?);
            for i in 0..self.arms.len() {
                out.runs
                    .push(rl_stage::<B>(runner, config, self, i, seed, device)?);
            }
        }
        Ok(out)
    }

    fn summarize(&self, output: &MultiturnOutput) -> Part {
        summarize(self, output)
    }
}

fn world(cfg: &MultiturnExperiment, stage: &str) -> Result<MultihopWorld> {
    MultihopWorld::new(cfg.world.clone()).map_err(stage_error(stage))
}

fn base_path(seed: u64) -> String {
    format!("multiturn/s{seed}/base")
}

/// Stage `multiturn/sft/s{seed}`: the base policy, saved.
fn base_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &MultiturnExperiment,
    seed: u64,
    device: &B::Device,
) -> Result<BaseReport> {
    let name = format!("multiturn/sft/s{seed}");
    let path = runner.artifact(&base_path(seed))?;
    runner.stage(&name, |_| {
        let world = world(cfg, &name)?;
        let (model, report) =
            train_base::<B>(&world, &config.sft, seed, device).map_err(stage_error(&name))?;
        save_module(&model, &path).map_err(checkpoint_error(&name))?;
        Ok(report)
    })
}

/// Stage `multiturn/{arm}/s{seed}`: RL, checkpoints evaluated.
fn rl_stage<B: AutodiffBackend>(
    runner: &mut Runner,
    config: &ExperimentConfig,
    cfg: &MultiturnExperiment,
    index: usize,
    seed: u64,
    device: &B::Device,
) -> Result<TurnRun> {
    let arm = &cfg.arms[index];
    let name = format!("multiturn/{}/s{seed}", arm.name);
    let world = world(cfg, &name)?;
    let rl = RlConfig {
        on_nan: runner.nan_policy(),
        ..cfg.rl(&config.rl, index, &world).map_err(|e| {
            stage_error(&name)(goodhart_core::GoodhartError::invalid("rl", e.to_string()))
        })?
    };
    let base = runner.dir().checkpoints().join(base_path(seed));
    let series = format!("{}/s{seed}", arm.name);
    let eval_series = format!("{series}/eval");
    runner.stage(&name, |log| {
        log.expect_lines(rl.steps as u64);
        let err = stage_error(&name);
        let policy = load_sft_policy::<B>(&base, config, world.vocab_size(), device, &name)?;
        let reference =
            load_sft_policy::<B::InnerBackend>(&base, config, world.vocab_size(), device, &name)?;
        let rewards = TurnRewardConfig {
            dense: arm.dense,
            ..cfg.reward.clone()
        };
        let task = MultiturnTask::new(&world, rewards, arm.signal).map_err(stage_error(&name))?;
        let generation = GenerationConfig::new(1).with_temperature(rl.temperature);
        let questions = Task::<B::InnerBackend>::prompts(&task);
        let rows: Vec<usize> = (0..questions)
            .flat_map(|q| std::iter::repeat_n(q, cfg.eval_episodes))
            .collect();
        // One sampling stream per seed, whatever the arm: every run's step-0 evaluation
        // plays the same episodes with the same base policy.
        let mut eval_rng = seed::rng(seed, "multiturn/eval");
        let logger = RefCell::new(Logger::new(log, MultiturnExperiment::NAME, &series));
        let mut checkpoints = Vec::new();
        let mut points = Vec::new();
        let mut evaluate =
            |step: usize, policy: &TransformerLm<B::InnerBackend>| -> goodhart_core::Result<()> {
                let out = rollout(policy, &world, &rows, &generation, &mut eval_rng, device)?;
                let stats = EpisodeStats::of(&out, &cfg.reward);
                let metrics = BTreeMap::from([
                    ("eval/outcome".to_string(), stats.outcome),
                    ("eval/dense".to_string(), stats.dense),
                    ("eval/tool_calls".to_string(), stats.tool_calls),
                    ("eval/relevant".to_string(), stats.relevant),
                    ("eval/turns".to_string(), stats.turns),
                    ("eval/answered".to_string(), stats.answered),
                ]);
                logger
                    .borrow_mut()
                    .log_as(&eval_series, step as u64, metrics)?;
                checkpoints.push(TurnCheckpoint {
                    step: step as u64,
                    stats,
                });
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
        Ok(TurnRun {
            arm: arm.name.clone(),
            seed,
            checkpoints,
        })
    })
}

/// `mean ± sd` of the values, `null` for none.
fn spread(values: impl IntoIterator<Item = f64>) -> Value {
    let v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    let (m, sd) = mean_sd(v);
    json!(format!("{m:.3} ± {sd:.3}"))
}

fn summarize(cfg: &MultiturnExperiment, output: &MultiturnOutput) -> Part {
    let mut figures = serde_json::Map::new();
    let mut rows = Vec::new();
    let mut outcome_lines = Vec::new();
    let mut dense_lines = Vec::new();
    let mut calls_lines = Vec::new();
    for a in &cfg.arms {
        let runs: Vec<&TurnRun> = output
            .runs
            .iter()
            .filter(|r| r.arm == a.name && !r.checkpoints.is_empty())
            .collect();
        let col = |f: &dyn Fn(&TurnRun) -> f64| spread(runs.iter().map(|r| f(r)));
        let first = |g: fn(&EpisodeStats) -> f64| move |r: &TurnRun| g(&r.checkpoints[0].stats);
        let last = |g: fn(&EpisodeStats) -> f64| {
            move |r: &TurnRun| g(&r.checkpoints[r.checkpoints.len() - 1].stats)
        };
        // The peak of the outcome curve smoothed over 3 evaluations (a centred mean), not
        // the largest single evaluation, which noise biases upwards.
        let peak = |r: &TurnRun| {
            let rows = r
                .checkpoints
                .iter()
                .map(|c| BTreeMap::from([(KEY_GOLD_MEAN.to_string(), c.stats.outcome)]));
            let rule = GoldPeakRule {
                window: 3,
                ..Default::default()
            };
            gold_peak(&Run::from_rows(&r.arm, rows.collect()), &rule).map_or(f64::NAN, |p| p.value)
        };
        // Sample efficiency: the mean outcome over the checkpoints (the area under the
        // evaluation curve, per checkpoint).
        let area = |r: &TurnRun| {
            r.checkpoints.iter().map(|c| c.stats.outcome).sum::<f64>() / r.checkpoints.len() as f64
        };
        rows.push(json!([
            a.name,
            runs.len(),
            col(&first(|s| s.outcome)),
            col(&peak),
            col(&last(|s| s.outcome)),
            col(&area),
            col(&first(|s| s.dense)),
            col(&last(|s| s.dense)),
            col(&last(|s| s.tool_calls)),
            col(&last(|s| s.relevant)),
            col(&last(|s| s.turns)),
            col(&last(|s| s.answered)),
        ]));
        let mean = |f: &dyn Fn(&TurnRun) -> f64| {
            let v: Vec<f64> = runs.iter().map(|r| f(r)).collect();
            (!v.is_empty()).then(|| mean_sd(v).0)
        };
        figures.insert(
            a.name.clone(),
            json!({
                "outcome_first": mean(&first(|s| s.outcome)),
                "outcome_peak": mean(&peak),
                "outcome_last": mean(&last(|s| s.outcome)),
                "outcome_area": mean(&area),
                "dense_first": mean(&first(|s| s.dense)),
                "dense_last": mean(&last(|s| s.dense)),
                "tool_calls_last": mean(&last(|s| s.tool_calls)),
                "answered_last": mean(&last(|s| s.answered)),
            }),
        );
        // Curves: the mean over seeds at each checkpoint.
        let steps: Vec<u64> = runs
            .first()
            .map(|r| r.checkpoints.iter().map(|c| c.step).collect())
            .unwrap_or_default();
        let curve = |g: fn(&EpisodeStats) -> f64| -> Vec<[Option<f64>; 2]> {
            steps
                .iter()
                .enumerate()
                .map(|(k, &s)| {
                    let v: Vec<f64> = runs
                        .iter()
                        .filter_map(|r| r.checkpoints.get(k).map(|c| g(&c.stats)))
                        .collect();
                    [Some(s as f64), (!v.is_empty()).then(|| mean_sd(v).0)]
                })
                .collect()
        };
        outcome_lines.push(json!({"label": a.name, "points": curve(|s| s.outcome)}));
        dense_lines.push(json!({"label": a.name, "points": curve(|s| s.dense), "dashed": true}));
        calls_lines.push(json!({"label": a.name, "points": curve(|s| s.tool_calls)}));
    }
    let seeds = cfg.seeds;
    Part {
        figures: Value::Object(figures),
        tables: vec![table(
            &format!(
                "Multi-turn: outcome and step rewards per episode on fresh episodes ({seeds} seeds)"
            ),
            &[
                "arm",
                "runs",
                "outcome first",
                "outcome peak (smoothed)",
                "outcome last",
                "outcome mean",
                "dense first",
                "dense last",
                "tool calls last",
                "relevant last",
                "turns last",
                "answered last",
            ],
            rows,
        )],
        charts: vec![
            json!({
                "title": format!("Multi-turn: outcome (gold) on fresh episodes (mean of {seeds} seeds)"),
                "x_label": "RL step",
                "lines": outcome_lines,
            }),
            json!({
                "title": format!("Multi-turn: dense step reward per episode (mean of {seeds} seeds)"),
                "x_label": "RL step",
                "lines": dense_lines,
            }),
            json!({
                "title": format!("Multi-turn: tool calls per episode (mean of {seeds} seeds)"),
                "x_label": "RL step",
                "lines": calls_lines,
            }),
        ],
        ..Default::default()
    }
}
