//! RL for language models against a proxy reward (TOML `[rl]`), composed from the
//! library's own types: any goodhart-advantage estimator ([`AdvantageConfig`]), any
//! goodhart-objective policy loss ([`PolicyLossConfig`], with its aggregation and a
//! [`SampleFilter`]), any list of goodhart-regularize regularisers ([`RegularizerConfig`],
//! through the [`Regularizer`] trait), and goodhart-reward's aggregators, Ctrl-U, shaping
//! and length methods. The gold reward of every sample is measured and logged; it never
//! enters training unless `components` names it.
//!
//! One step (DESIGN.md, "Data flow of one RL step"):
//!
//! ```text
//! 1. prompts: P of the task's prompts drawn uniformly (stream "pg/prompts"), each
//!    repeated G times (group = prompt), N = P G rows, left-padded to the task's prompt
//!    width ([`crate::task`]; the synthetic language's are [BOS, topic, SEP]);
//! 2. rollout: y ~ pi_theta(. | x) at temperature tau (stream "pg/sample", KV cache);
//! 3. rewards: proxy = aggregate(members)            (one RM, or an ensemble: mean, UWO, ...)
//!             proxy' = ctrl_u(fimi(proxy), std(members))  (`length_penalty = fimi`, `ctrl_u`)
//!             r = penalty(shaping(proxy'))          (`reward_shaping`, `length_penalty`)
//!             train = sum_i w_i c_i                 (`components`; default: r alone)
//!    gold g(x, y) on every sample. With `dynamic_sampling` (DAPO), groups whose train
//!    rewards have zero spread are dropped and more prompts drawn, up to `max_batches`
//!    rollouts, the batch then filled with dropped groups;
//! 4. lp_old, entropy = score(pi_theta), lr = score(pi_init) at tau; per-token rewards
//!    train at the last token, then each regulariser's in-reward term (KL in the reward);
//! 5. advantages A = estimator(token rewards, groups [, values | greedy baseline |
//!    components]); constrained RLHF mixes per-component advantages by its multipliers;
//! 6. `epochs` passes over the batch:
//!      L = loss(lp, lp_old, A; filter(mask)) + sum of the regularisers' loss terms
//!    AdamW step (PyTorch betas, eps 1e-8, no weight decay) after clipping the gradient
//!    norm over all parameters; with `gae` the value head takes its own step on the
//!    clipped value loss;
//! 7. the regularisers observe the step (KL controllers, multipliers, gates).
//! ```
//!
//! Each step yields one [`StepLine`]: the flat metrics of goodhart-metrics'
//! [`batch_metrics`] (proxy and gold, their gap and correlation, zero-std groups,
//! advantage statistics, KL, entropy, length, ensemble disagreement) plus the loss's,
//! the regularisers' and the trainer's own, and one [`Sample`] per response; with
//! `[rl] eval` ([`EvalConfig`]), the proxy and gold of an evaluation batch the step
//! never trains on.
//!
//! Sources: Schulman et al. 2017 (PPO); Shao et al. 2024 (GRPO); Yu et al. 2025 (DAPO:
//! dynamic sampling, overlong filtering); Ziegler et al. 2019 and verl (KL in the reward
//! or the loss); Li et al. 2024 (ReMax's greedy baseline); Gao, Schulman & Hilton 2022
//! (`d = sqrt(KL(pi || pi_init))`, logged so gold can be fitted against it).
//!
//! A response is the generated tokens up to and including the task's first end id
//! (`EOS`; or `max_new_tokens` tokens). The task says which responses are ill-formed,
//! and the fraction of them is logged (`response/ill_formed`). On the synthetic language
//! gold is defined on words: a response that emits a non-word token (a special or topic
//! token) before `EOS` is ill-formed, its gold that of the words before the offending
//! token (see [`gold_reward`]).

use std::{collections::BTreeMap, time::Instant};

use burn::{
    module::AutodiffModule,
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        Int, Tensor, TensorData,
    },
};
use goodhart_advantage::{common::outcome_at_last_token, AdvantageConfig, AdvantageInput};
use goodhart_core::{
    aggregate::{EmptyRows, GlobalBatch, LossAggregation},
    batch::RolloutBatch,
    groups::Groups,
    ops::{check_finite, check_finite_masked, group_stats, zero_masked},
    params::clip_grad_norm,
    seed, GoodhartError, Result,
};
use goodhart_envs::language::{Language, EOS};
use goodhart_metrics::{
    detect::{Detector, DetectorConfig},
    step::{batch_metrics, StepInputs, GOLD, PROXY},
};
use goodhart_objective::{
    policy::PolicyInputs, turn_clip::TurnInputs, PolicyLossConfig, RolloutIsConfig, SampleFilter,
    ValueLossConfig,
};
use goodhart_policy::{
    generate, score,
    score::{logprobs_from_logits, sum_pi_squared},
    Generation, GenerationConfig, LmValueModel, TransformerLm,
};
use goodhart_regularize::{
    constrained::ConstrainedRlhf, kl::KlPlacement, RegInputs, Regularizer, RegularizerConfig,
    StepStats,
};
use goodhart_reward::{
    ctrl_u,
    ensemble::member_variance,
    length::{fit_length_bias, LengthBias},
    shaping::Shaper,
    source::FnReward,
    Aggregator, Component, Composite, CtrlUConfig, LengthConfig, RewardEnsemble, RewardModel,
    RewardOutput, RewardSource, Sequences, ShapingConfig,
};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::{sft::PROMPT_LEN, task::Task};

/// Settings of an RL run (TOML `[rl]`; every key optional).
///
/// Defaults: 16 prompts x 8 responses per step (GRPO's group of 8), 80 steps, lr 3e-4
/// (small model trained from scratch), one epoch per batch (verl `ppo_epochs = 1`),
/// GRPO advantages and the PPO-clip loss with verl's defaults (clip 0.2, dual-clip
/// `c = 3`, token-mean), temperature 1, 24 new tokens, no regulariser, no shaping: the
/// unregularised run that overoptimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RlConfig {
    /// RL steps (one batch each).
    pub steps: usize,
    /// Prompts per step (`P`).
    pub prompts_per_step: usize,
    /// Responses per prompt (`G`, the group).
    pub group_size: usize,
    /// AdamW learning rate of the policy.
    pub lr: f64,
    /// Epochs over each batch (full batch).
    pub epochs: usize,
    /// The advantage estimator (`kind = "grpo"`, `"rloo"`, `"gae"`, ...). With `remax`,
    /// each prompt's greedy response goes through the same reward pipeline as the
    /// samples (running shaping statistics see it too).
    pub advantage: AdvantageConfig,
    /// The policy loss (`kind = "ppo_clip" | "gspo" | "cispo" | "sapo" | "clip_cov" |
    /// "kl_cov" | "geo_mean" | "dppo_tv" | "dppo_kl"` with its options).
    pub loss: PolicyLossConfig,
    /// Overrides the loss's own aggregation (`"token-mean"`, `"token-sum"`,
    /// `"seq-mean-token-sum"`, `"seq-mean-token-mean"`, `"seq-mean-token-sum-norm"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregation: Option<LossAggregation>,
    /// Whether responses left without a counted token (by `overlong_filter` or
    /// `sample_filter`) count in the seq-mean modes' mean: `"count"` (verl's trainer) or
    /// `"skip"` (verl's `agg_loss` without a global batch size).
    pub empty_rows: EmptyRows,
    /// `seq-mean-token-sum-norm`'s constant; `None`: the padded response width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale_factor: Option<f64>,
    /// Rollout importance weights between the sampler's log-probs (cached decoding) and
    /// the teacher-forced `lp_old` (`{ level = "token", threshold = 2.0 }`, see
    /// [`RolloutIsConfig`]); `None` = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_is: Option<RolloutIsConfig>,
    /// Which responses the loss trains on (`"all"`, `"nsr"`, `"psr"`).
    pub sample_filter: SampleFilter,
    /// Regularisers, each `{ kind = "kl" | "entropy" | "sequence_chi2" | "sft_anchor" |
    /// "gardo" | "lp_reg" | "constrained", ... }`.
    pub regularizers: Vec<RegularizerConfig>,
    /// Sampling temperature (log-probs are scored at it too, as verl and TRL do).
    pub temperature: f64,
    /// Longest response in tokens (`EOS` included).
    pub max_new_tokens: usize,
    /// Reward shaping (`kind = "par"`, ...); references are `m` responses per prompt
    /// sampled once from the initial policy (stream `pg/references`). `None` = raw proxy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reward_shaping: Option<ShapingConfig>,
    /// A length method (`kind = "linear_length" | "dapo_overlong" | "fimi"`): the two
    /// penalties after shaping; `fimi`, fitted once on 256 responses of the initial
    /// policy, is subtracted from the proxy before Ctrl-U and shaping.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub length_penalty: Option<LengthConfig>,
    /// Ctrl-U: the proxy times `exp(-beta U)`, `U` the ensemble members' standard
    /// deviation (needs an ensemble proxy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ctrl_u: Option<CtrlUConfig>,
    /// The trained reward as a weighted sum of named components; empty = the proxy
    /// alone. GDPO normalises each component, constrained RLHF puts one constraint on
    /// each, GARDO reads the components after the first as its auxiliary rewards.
    pub components: Vec<RewardComponent>,
    /// DAPO's dynamic sampling; `None` = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_sampling: Option<DynamicSampling>,
    /// DAPO's overlong filtering: responses cut at `max_new_tokens` without `EOS` get
    /// no loss (they still count in their group's advantages).
    pub overlong_filter: bool,
    /// The value head of `advantage = { kind = "gae" }` (ignored otherwise).
    pub critic: CriticConfig,
    /// What a non-finite reward, advantage, loss or gradient does: set by `cargo xtask run
    /// --on-nan`, not by the config file (it changes nothing in a run without one).
    #[serde(skip)]
    pub on_nan: OnNan,
    /// Clip of the gradient norm over all parameters together
    /// ([`goodhart_core::params::clip_grad_norm`], as verl and TRL clip; 0 = off; default
    /// 1.0, their value).
    pub max_grad_norm: f64,
    /// Hacking detectors run online on every step's metrics line (`kind = "proxy-only" |
    /// "gold-aware"` with their settings, as under `[overopt] detectors`; one of each
    /// kind). Each logs `detector/<kind>/score` (once it can score) and
    /// `detector/<kind>/fired` (0 before its firing, 1 from it on); a non-finite metric
    /// is a missing one to them.
    pub detectors: Vec<DetectorConfig>,
    /// What a detector's firing does ([`OnAlarm`]).
    pub on_alarm: OnAlarm,
    /// `rollback`: how many steps before the firing step the returned policy is from
    /// (default 5; the trainer keeps that many recent policies, plus one, in memory).
    pub rollback_steps: usize,
    /// `raise_kl`: the factor on the `kl` regulariser's coefficient at each firing
    /// (default 10).
    pub kl_raise: f64,
    /// Log `hidden/effective_rank` on every step: the effective rank
    /// ([`goodhart_metrics::effective_rank`]) of the sampling policy's final hidden states
    /// that generated each response, mean-pooled per response (`[N, D]`); a gold-free
    /// signal of the samples' diversity. One more forward pass per step; off by default.
    pub effective_rank: bool,
    /// An evaluation batch, never trained on, measured before each due step's update
    /// (`eval = { samples = 1024, every = 1 }`, [`EvalConfig`]); `None` = off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalConfig>,
}

/// The evaluation batch of an RL run (`[rl] eval`): on every `every`-th step, before the
/// update, the sampling policy answers `samples` prompts and the task scores each
/// response (proxy, gold and the task's monitors); the step logs
/// `eval/{gold,proxy}/{mean,std,min,max}`, `eval/<monitor>/{mean,std,min,max}` for each
/// of the task's monitors ([`Task::monitors`]) and `eval/gap/<monitor>` (the proxy's mean
/// minus the monitor's) for each reward monitor. Row `i` answers prompt `i mod prompts`, at every
/// evaluation, with the same uniforms (stream `pg/eval`, restarted at each evaluation:
/// common random numbers, so two evaluations differ by what the policy changed and not by
/// fresh draws). Nothing is trained on it and it draws from no stream of the training
/// batch, so a run's training is the same with it as without.
///
/// Why: the training batch's mean gold carries the noise of its few prompts and their
/// samples, so where a gold curve peaks is partly noise; an evaluation batch several
/// times larger, on fixed prompts and uniforms, places the peak by the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Responses per evaluation (1 to 65536).
    pub samples: usize,
    /// Evaluate on steps `0, every, 2 every, ...` (default 1: every step).
    #[serde(default = "every_step")]
    pub every: usize,
}

/// The largest [`EvalConfig::samples`] (its scores are held until the step's line).
pub const MAX_EVAL_SAMPLES: usize = 1 << 16;

fn every_step() -> usize {
    1
}

/// What a detector's firing does to an RL run (`[rl] on_alarm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnAlarm {
    /// Nothing beyond the logged firing (the default).
    #[default]
    Log,
    /// Training ends at the firing step: the policy returned (and saved) is the one its
    /// update produced.
    Stop,
    /// Training ends at the firing step, and the policy returned is the one that began
    /// step `firing - rollback_steps` (or the first kept one): the policy before the
    /// signals turned.
    Rollback,
    /// The `kl` regulariser's coefficient is multiplied by `kl_raise` and training goes
    /// on (once per firing detector).
    RaiseKl,
}

impl OnAlarm {
    /// Its name in TOML.
    pub fn name(self) -> &'static str {
        match self {
            Self::Log => "log",
            Self::Stop => "stop",
            Self::Rollback => "rollback",
            Self::RaiseKl => "raise_kl",
        }
    }
}

impl Default for RlConfig {
    fn default() -> Self {
        Self {
            steps: 80,
            prompts_per_step: 16,
            group_size: 8,
            lr: 3e-4,
            epochs: 1,
            advantage: AdvantageConfig::default(),
            loss: PolicyLossConfig::default(),
            aggregation: None,
            empty_rows: EmptyRows::Count,
            loss_scale_factor: None,
            rollout_is: None,
            sample_filter: SampleFilter::All,
            regularizers: Vec::new(),
            temperature: 1.0,
            max_new_tokens: 24,
            reward_shaping: None,
            length_penalty: None,
            ctrl_u: None,
            components: Vec::new(),
            dynamic_sampling: None,
            overlong_filter: false,
            critic: CriticConfig::default(),
            on_nan: OnNan::Error,
            max_grad_norm: 1.0,
            detectors: Vec::new(),
            on_alarm: OnAlarm::Log,
            rollback_steps: 5,
            kl_raise: 10.0,
            effective_rank: false,
            eval: None,
        }
    }
}

/// One named reward component with its weight in the trained reward.
///
/// Names: `proxy` (after Ctrl-U, shaping and the length method), `member<k>` (ensemble
/// member `k`'s normalised score), `length` (response tokens), `gold` (the true reward:
/// naming it trains on it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardComponent {
    /// Which reward.
    pub name: String,
    /// Its weight (default 1).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

/// DAPO's dynamic sampling (verl `filter_groups`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicSampling {
    /// Most rollouts per step (verl `max_num_gen_batches`; default 4).
    pub max_batches: usize,
}

impl Default for DynamicSampling {
    fn default() -> Self {
        Self { max_batches: 4 }
    }
}

/// The value head of GAE: the policy's trunk copied at the start plus a fresh scalar
/// head ([`LmValueModel`]), trained by its own AdamW on the clipped value loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CriticConfig {
    /// Learning rate (default 1e-3, goodhart's choice for the lab's small models).
    pub lr: f64,
    /// The value loss (verl's defaults: clipped at 0.5, token-mean).
    pub value_loss: ValueLossConfig,
}

impl Default for CriticConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            value_loss: ValueLossConfig::default(),
        }
    }
}

/// What a non-finite reward, advantage, loss or gradient does to an RL step
/// (`cargo xtask run --on-nan error|skip-batch`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnNan {
    /// Stop with [`GoodhartError::NonFinite`] naming the step and the quantity, before
    /// any update from the batch (the default).
    #[default]
    Error,
    /// Drop the batch: no update from it (an epoch already taken on it stays), no line for
    /// its step, and every later line counts the dropped batches in `nan/skipped`. State
    /// the batch already fed (running reward statistics of shaping) is not rolled back.
    SkipBatch,
}

/// Under [`OnNan::Error`], the error for a non-finite `what` at `step`; under
/// [`OnNan::SkipBatch`], `Ok` with the batch counted in `skipped` (the caller drops it).
fn drop_batch(on_nan: OnNan, step: usize, what: &str, skipped: &mut usize) -> Result<()> {
    match on_nan {
        OnNan::Error => Err(GoodhartError::NonFinite {
            what: format!(
                "{what} at rl step {step} (no update was made from that batch; \
                 `--on-nan skip-batch` drops such batches instead)"
            ),
        }),
        OnNan::SkipBatch => {
            *skipped += 1;
            Ok(())
        }
    }
}

/// For an estimator that needs data the language task does not have, what it needs.
pub fn unsupported_estimator_name(name: &str) -> Option<&'static str> {
    match name {
        "gra" => Some("per-turn step rewards from a multi-turn environment"),
        "a2tgpo" => Some("per-turn signals from a multi-turn environment"),
        "igpo" => Some("per-turn ground-truth answer probabilities from a multi-turn environment"),
        "verpo" => Some("unit-test outcomes (the multi-turn task's checks)"),
        _ => None,
    }
}

impl RlConfig {
    /// The policy loss with `aggregation` applied (an error names `rl.aggregation` when
    /// the loss takes none).
    pub fn policy_loss(&self) -> Result<PolicyLossConfig> {
        match self.aggregation {
            Some(a) => self
                .loss
                .with_aggregation(a)
                .map_err(|e| GoodhartError::invalid("rl.aggregation", e.to_string())),
            None => Ok(self.loss),
        }
    }

    /// The aggregation's normalisers of one process: the empty-row convention and the
    /// scale factor.
    pub fn global_batch(&self) -> GlobalBatch {
        GlobalBatch {
            empty_rows: self.empty_rows,
            loss_scale_factor: self.loss_scale_factor,
            ..Default::default()
        }
    }

    /// Errors on settings that cannot run against a proxy of `members` reward models,
    /// naming the key (`rl.<key>`).
    pub fn validate(&self, members: usize) -> Result<()> {
        self.validate_for(members, false)
    }

    /// [`validate`](Self::validate) for a task whose responses are episodes of turns
    /// (`multi_turn`), where the turn-level estimators can run.
    pub fn validate_for(&self, members: usize, multi_turn: bool) -> Result<()> {
        let bad = |k: &str, why: String| GoodhartError::invalid(format!("rl.{k}"), why);
        for (k, v) in [
            ("steps", self.steps),
            ("prompts_per_step", self.prompts_per_step),
            ("group_size", self.group_size),
            ("epochs", self.epochs),
            ("max_new_tokens", self.max_new_tokens),
        ] {
            if v == 0 {
                return Err(bad(k, "must be at least 1".into()));
            }
        }
        for (k, v) in [("lr", self.lr), ("critic.lr", self.critic.lr)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(bad(k, format!("must be finite and positive, got {v}")));
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad("temperature", "must be finite and positive".into()));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(bad("max_grad_norm", "must be finite and >= 0".into()));
        }
        if let Some(e) = &self.eval {
            if !(1..=MAX_EVAL_SAMPLES).contains(&e.samples) {
                return Err(bad(
                    "eval.samples",
                    format!("must be 1 to {MAX_EVAL_SAMPLES}, got {}", e.samples),
                ));
            }
            if e.every == 0 {
                return Err(bad("eval.every", "must be at least 1".into()));
            }
        }
        let sub = |k: &str, e: GoodhartError| match e {
            GoodhartError::InvalidArgument { name, reason } => {
                let leaf = name.rsplit('.').next().unwrap_or(&name).to_string();
                GoodhartError::invalid(format!("rl.{k}.{leaf}"), reason)
            }
            other => GoodhartError::invalid(format!("rl.{k}"), other.to_string()),
        };
        self.policy_loss()?.validate().map_err(|e| sub("loss", e))?;
        self.global_batch()
            .validate()
            .map_err(|e| sub("loss_scale_factor", e))?;
        if let Some(r) = &self.rollout_is {
            r.validate().map_err(|e| sub("rollout_is", e))?;
        }
        if self.advantage.name() == "gae" {
            self.critic
                .value_loss
                .validate()
                .map_err(|e| sub("critic.value_loss", e))?;
        }
        if self.loss.needs_turns() && !multi_turn {
            return Err(bad(
                "loss.kind",
                format!(
                    "`{}` needs each token's turn; the language task has single-turn responses",
                    self.loss.name()
                ),
            ));
        }
        if let Some(need) =
            unsupported_estimator_name(self.advantage.name()).filter(|_| !multi_turn)
        {
            return Err(bad(
                "advantage.kind",
                format!(
                    "`{}` needs {need}; the language task has single-turn responses and \
                     one reward per response",
                    self.advantage.name()
                ),
            ));
        }
        // Components.
        for (i, c) in self.components.iter().enumerate() {
            let known = matches!(c.name.as_str(), "proxy" | "length" | "gold")
                || c.name
                    .strip_prefix("member")
                    .and_then(|k| k.parse::<usize>().ok())
                    .is_some_and(|k| k < members);
            if !known {
                return Err(bad(
                    &format!("components[{i}].name"),
                    format!(
                        "`{}` is not a reward of this task: proxy, length, gold or member<k> \
                         with k < {members} (the proxy's members)",
                        c.name
                    ),
                ));
            }
            if !c.weight.is_finite() {
                return Err(bad(
                    &format!("components[{i}].weight"),
                    "must be finite".into(),
                ));
            }
        }
        let k = self.components.len();
        match &self.advantage {
            AdvantageConfig::Gdpo(g) => {
                if k < 2 {
                    return Err(bad(
                        "components",
                        format!("gdpo normalises each named reward component: give at least two, got {k}"),
                    ));
                }
                if !g.weights.is_empty() && g.weights.len() != k {
                    return Err(bad(
                        "advantage.weights",
                        format!("{} weights for {k} components (or leave it empty to use the components' weights)", g.weights.len()),
                    ));
                }
            }
            AdvantageConfig::Bnpo(b) => {
                let bounded = matches!(
                    self.reward_shaping,
                    Some(ShapingConfig::Par { .. }) | Some(ShapingConfig::Minmax)
                ) && self.length_penalty.is_none()
                    && self.components.is_empty()
                    && b.reward_range[0] <= 0.0
                    && b.reward_range[1] >= 1.0;
                let kl_in_reward = self.regularizers.iter().any(|r| {
                    matches!(r, RegularizerConfig::Kl(kl) if kl.placement == KlPlacement::Reward)
                });
                if !bounded || kl_in_reward {
                    return Err(bad(
                        "advantage.kind",
                        format!(
                            "bnpo reads rewards in advantage.reward_range {:?}, and a reward \
                             model's are unbounded: set rl.reward_shaping = {{ kind = \"par\" }} \
                             (or \"minmax\"), bounded in [0, 1], with no length_penalty, no \
                             components and no KL in the reward",
                            b.reward_range
                        ),
                    ));
                }
            }
            _ => {}
        }
        // Regularisers.
        for (i, r) in self.regularizers.iter().enumerate() {
            let path = format!("regularizers[{i}]");
            let checked = match r {
                RegularizerConfig::Chi2Occupancy(_) | RegularizerConfig::ActionKl(_) => {
                    return Err(bad(
                        &format!("{path}.kind"),
                        format!(
                            "`{}` regularises the occupancy of an environment's states and \
                             actions: it belongs to [tomato], not to the language task",
                            r.name()
                        ),
                    ))
                }
                RegularizerConfig::Kl(c) => c.init().map(drop),
                RegularizerConfig::Entropy(c) => c.init().map(drop),
                RegularizerConfig::SequenceChi2(c) => c.init().map(drop),
                RegularizerConfig::SftAnchor(c) => c.init().map(drop),
                RegularizerConfig::LpReg(c) => c.init().map(drop),
                RegularizerConfig::Gardo(c) => {
                    if k < 2 {
                        return Err(bad(
                            &path,
                            "gardo compares the proxy's ranks with auxiliary rewards: name at \
                             least two components (the first is the proxy, the rest auxiliary)"
                                .into(),
                        ));
                    }
                    c.init().map(drop)
                }
                RegularizerConfig::Constrained(c) => {
                    if c.constraints.len() != k {
                        return Err(bad(
                            &format!("{path}.constraints"),
                            format!(
                                "one constraint per reward component: {} constraints, {k} components",
                                c.constraints.len()
                            ),
                        ));
                    }
                    c.init().map(drop)
                }
            };
            checked.map_err(|e| sub(&path, e))?;
        }
        if self
            .regularizers
            .iter()
            .filter(|r| matches!(r, RegularizerConfig::Constrained(_)))
            .count()
            > 1
        {
            return Err(bad("regularizers", "at most one `constrained`".into()));
        }
        // Rewards.
        if let Some(s) = &self.reward_shaping {
            if s.needs_references() && references_per_prompt(s) == 0 {
                return Err(bad("reward_shaping.m", "must be at least 1".into()));
            }
        }
        if let Some(c) = &self.ctrl_u {
            if members < 2 {
                return Err(bad(
                    "ctrl_u",
                    format!("Ctrl-U weights by the ensemble's disagreement: it needs a proxy of at least two members, this one has {members}"),
                ));
            }
            if !(c.beta.is_finite() && c.beta >= 0.0) {
                return Err(bad("ctrl_u.beta", "must be finite and >= 0".into()));
            }
        }
        if let Some(d) = &self.dynamic_sampling {
            if d.max_batches == 0 {
                return Err(bad(
                    "dynamic_sampling.max_batches",
                    "must be at least 1".into(),
                ));
            }
        }
        // The alarm.
        check_detectors("rl.detectors", &self.detectors, &self.logged_keys())?;
        let mut kinds = std::collections::BTreeSet::new();
        for (i, d) in self.detectors.iter().enumerate() {
            if !kinds.insert(d.build()?.name()) {
                return Err(bad(
                    &format!("detectors[{i}].kind"),
                    "one detector of each kind: this kind is already listed".into(),
                ));
            }
        }
        if self.on_alarm != OnAlarm::Log && self.detectors.is_empty() {
            return Err(bad(
                "on_alarm",
                "acts on a detector's firing: list one under rl.detectors".into(),
            ));
        }
        if self.on_alarm == OnAlarm::Rollback && self.rollback_steps == 0 {
            return Err(bad("rollback_steps", "must be at least 1".into()));
        }
        // Settings of an action the run does not take are refused, not ignored.
        let defaults = Self::default();
        for (key, set, action) in [
            (
                "rollback_steps",
                self.rollback_steps != defaults.rollback_steps,
                OnAlarm::Rollback,
            ),
            (
                "kl_raise",
                self.kl_raise != defaults.kl_raise,
                OnAlarm::RaiseKl,
            ),
        ] {
            if set && self.on_alarm != action {
                return Err(bad(
                    key,
                    format!(
                        "is read only with on_alarm = \"{}\", and on_alarm is \"{}\"",
                        action.name(),
                        self.on_alarm.name()
                    ),
                ));
            }
        }
        if self.on_alarm == OnAlarm::RaiseKl {
            if !self
                .regularizers
                .iter()
                .any(|r| matches!(r, RegularizerConfig::Kl(_)))
            {
                return Err(bad(
                    "on_alarm",
                    "raise_kl raises the `kl` regulariser's coefficient: add one to \
                     rl.regularizers"
                        .into(),
                ));
            }
            if !(self.kl_raise.is_finite() && self.kl_raise >= 1.0) {
                return Err(bad("kl_raise", "must be finite and >= 1".into()));
            }
        }
        Ok(())
    }
}

/// Checks `detectors` (at config path `path`) before a run: each builds, and every
/// metric it reads is one the trainer logs (`logged`); errors name the key
/// (`<path>[i].signals[1].key`).
pub fn check_detectors(
    path: &str,
    detectors: &[DetectorConfig],
    logged: &LoggedKeys,
) -> Result<()> {
    for (i, d) in detectors.iter().enumerate() {
        let at = format!("{path}[{i}]");
        d.build().map_err(|e| match e {
            GoodhartError::InvalidArgument { name, reason } => {
                GoodhartError::invalid(format!("{at}.{name}"), reason)
            }
            other => GoodhartError::invalid(&at, other.to_string()),
        })?;
        for (key, field) in d.keys() {
            if !logged.accepts(&key) {
                return Err(GoodhartError::invalid(
                    format!("{at}.{field}"),
                    format!(
                        "`{key}` is not a metric the RL trainer logs with this [rl]; it logs {}",
                        logged.describe()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The metric keys a run of an [`RlConfig`] logs on every step (see
/// [`RlConfig::logged_keys`]).
#[derive(Debug, Clone)]
pub struct LoggedKeys {
    keys: std::collections::BTreeSet<String>,
    /// Regulariser names whose own metrics (`<name>/...`) are logged too.
    prefixes: Vec<String>,
    /// Whether an evaluation batch is logged (`eval/...`, monitors included).
    eval: bool,
}

impl LoggedKeys {
    /// Whether `key` is on every step line.
    pub fn accepts(&self, key: &str) -> bool {
        self.keys.contains(key)
            || self.prefixes.iter().any(|p| {
                key.strip_prefix(p.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
    }

    /// These keys with those of the monitors `names` ([`Task::monitors`]):
    /// `reward/<name>/{mean,std,min,max}` and `gap/<name>`; with an evaluation batch, also
    /// `eval/<name>/{mean,std,min,max}` and `eval/gap/<name>`.
    pub fn with_monitors(mut self, names: &[&str]) -> Self {
        for name in names {
            for stat in ["mean", "std", "min", "max"] {
                self.keys.insert(format!("reward/{name}/{stat}"));
            }
            self.keys.insert(format!("gap/{name}"));
            if self.eval {
                self.keys.insert(format!("eval/gap/{name}"));
            }
        }
        self.with_eval_scores(names)
    }

    /// These keys with those of the non-reward monitors `names`
    /// ([`Task::monitor_is_reward`]): `<name>/{mean,std,min,max}`; with an evaluation
    /// batch, also `eval/<name>/{mean,std,min,max}`.
    pub fn with_scores(mut self, names: &[&str]) -> Self {
        for name in names {
            for stat in ["mean", "std", "min", "max"] {
                self.keys.insert(format!("{name}/{stat}"));
            }
        }
        self.with_eval_scores(names)
    }

    fn with_eval_scores(mut self, names: &[&str]) -> Self {
        if self.eval {
            for name in names {
                for stat in ["mean", "std", "min", "max"] {
                    self.keys.insert(format!("eval/{name}/{stat}"));
                }
            }
        }
        self
    }

    /// The keys, for an error message.
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self.keys.iter().map(|k| format!("`{k}`")).collect();
        parts.extend(self.prefixes.iter().map(|p| format!("`{p}/...`")));
        parts.join(", ")
    }
}

impl RlConfig {
    /// The metric keys [`train`] logs on every step with this config: goodhart-metrics'
    /// [`batch_metrics`] of the batch (rewards `proxy`, `gold`, `train`, and `shaped` when
    /// the proxy is transformed), the loss's and the trainer's own, and each
    /// regulariser's (`<name>/...`); with [`RlConfig::eval`], its keys (on the steps it
    /// evaluates).
    pub fn logged_keys(&self) -> LoggedKeys {
        let mut keys = std::collections::BTreeSet::new();
        let mut sources = vec![PROXY, GOLD, "train"];
        if self.reward_shaping.is_some() || self.length_penalty.is_some() || self.ctrl_u.is_some() {
            sources.push("shaped");
        }
        for s in sources {
            for stat in ["mean", "std", "min", "max"] {
                keys.insert(format!("reward/{s}/{stat}"));
            }
        }
        for stat in ["mean", "std", "min", "max"] {
            keys.insert(format!("length/{stat}"));
        }
        for k in [
            goodhart_metrics::step::KEY_GAP,
            "corr/proxy_gold/pearson",
            "corr/proxy_gold/spearman",
            "groups/zero_std_frac",
            goodhart_metrics::step::KEY_KL,
            "kl/ref/token",
            "kl/ref/k3",
            "kl/ref/k3_token",
            goodhart_metrics::step::KEY_KL_D,
            goodhart_metrics::step::KEY_ENTROPY,
            "advantage/mean",
            "advantage/std",
            goodhart_metrics::step::KEY_ADVANTAGE_SKEW,
            "advantage/pos_frac",
            goodhart_metrics::step::KEY_DISAGREEMENT,
            "loss",
            "loss/policy",
            "clip/low",
            "clip/high",
            "clip/dual",
            "clip/frac",
            "ppo_kl",
            "response/ill_formed",
            "response/truncated",
        ] {
            keys.insert(k.to_string());
        }
        if self.max_grad_norm > 0.0 {
            keys.insert("grad_norm".into());
        }
        if self.effective_rank {
            keys.insert(KEY_EFFECTIVE_RANK.into());
        }
        if self.eval.is_some() {
            for s in [PROXY, GOLD] {
                for stat in ["mean", "std", "min", "max"] {
                    keys.insert(format!("eval/{s}/{stat}"));
                }
            }
        }
        if self.dynamic_sampling.is_some() {
            keys.insert("sampling/rollouts".into());
            keys.insert("sampling/spread_share".into());
        }
        if matches!(self.advantage, AdvantageConfig::Gae(_)) {
            keys.insert("critic/value_loss".into());
            keys.insert("critic/clip_frac".into());
        }
        for c in &self.components {
            keys.insert(format!("reward/component/{}", c.name));
        }
        let mut prefixes = Vec::new();
        for r in &self.regularizers {
            prefixes.push(r.name().to_string());
            let in_loss = match r {
                RegularizerConfig::Kl(c) => c.placement == KlPlacement::Loss,
                RegularizerConfig::Constrained(_) => false,
                _ => true,
            };
            if in_loss {
                keys.insert(format!("loss/{}", r.name()));
            }
        }
        for d in &self.detectors {
            if let Ok(det) = d.build() {
                for k in ["score", "fired"] {
                    keys.insert(format!("detector/{}/{k}", det.name()));
                }
            }
        }
        LoggedKeys {
            keys,
            prefixes,
            eval: self.eval.is_some(),
        }
    }
}

/// Number of reference responses per prompt a shaping transform reads (0 if none).
fn references_per_prompt(s: &ShapingConfig) -> usize {
    match *s {
        ShapingConfig::Par { m, .. }
        | ShapingConfig::Centred { m }
        | ShapingConfig::Lsc { m }
        | ShapingConfig::Tanh { centred: true, m } => m,
        _ => 0,
    }
}
/// The proxy the policy is trained against: one reward model, or an ensemble of them
/// combined per response by an [`Aggregator`] (`mean`, `median`, `worst_case`, `uwo`,
/// Coste et al. 2024): goodhart-reward's [`RewardEnsemble`], whose output carries every
/// member's normalised score ([`RewardModel::scores`]).
pub type Proxy<B> = RewardEnsemble<RewardModel<B>>;

/// A proxy named `proxy` from `members`; errors when there are none.
pub fn proxy<B: Backend>(
    members: Vec<RewardModel<B>>,
    aggregation: Aggregator,
) -> Result<Proxy<B>> {
    RewardEnsemble::new(PROXY, members, aggregation)
}

/// The words of a generated response (tokens after the prompt) and whether it was
/// ill-formed: words are read up to the first `EOS`; a non-word token before it ends the
/// response there (ill-formed).
pub(crate) fn response_words(lang: &Language, response: &[u32]) -> (Vec<u32>, bool) {
    let mut words: Vec<u32> = Vec::with_capacity(response.len() + 1);
    for &tok in response {
        if tok == EOS {
            break;
        }
        if lang.word_of(tok).is_none() {
            return (words, true);
        }
        words.push(tok);
    }
    (words, false)
}

/// The gold reward of a generated response (tokens after the prompt) and whether it was
/// ill-formed (see [`response_words`]): the gold of the words, `EOS` appended. Errors only
/// on a malformed prompt.
pub fn gold_reward(lang: &Language, prompt: &[u32], response: &[u32]) -> Result<(f64, bool)> {
    let (mut words, ill) = response_words(lang, response);
    words.push(EOS);
    Ok((lang.gold(prompt, &words)?, ill))
}

/// The synthetic language's true reward as a [`RewardSource`]: [`gold_reward`] of each
/// row of a batch of `[BOS, topic, SEP]` prompts and their responses.
#[derive(Debug, Clone, Copy)]
pub struct LanguageGold<'a> {
    lang: &'a Language,
}

impl<'a> LanguageGold<'a> {
    /// The gold reward of `lang`.
    pub fn new(lang: &'a Language) -> Self {
        Self { lang }
    }
}

/// The rows of an `[N, T]` id tensor on the host.
pub(crate) fn host_rows<B: Backend>(t: &Tensor<B, 2, Int>) -> Result<Vec<Vec<u32>>> {
    let [n, w] = t.dims();
    let flat: Vec<i64> = t
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .map_err(|e| GoodhartError::invalid("tokens", format!("{e:?}")))?;
    Ok((0..n)
        .map(|r| flat[r * w..(r + 1) * w].iter().map(|&x| x as u32).collect())
        .collect())
}

impl<B: Backend> RewardSource<B> for LanguageGold<'_> {
    fn name(&self) -> &str {
        GOLD
    }

    fn score(&self, input: &Sequences<B>) -> Result<RewardOutput<B>> {
        let rows = host_rows(&input.tokens)?;
        let gold = rows
            .iter()
            .map(|row| {
                if row.len() < PROMPT_LEN {
                    return Err(GoodhartError::invalid("tokens", "shorter than a prompt"));
                }
                let (p, r) = row.split_at(PROMPT_LEN);
                gold_reward(self.lang, p, r).map(|(g, _)| g as f32)
            })
            .collect::<Result<Vec<_>>>()?;
        let n = gold.len();
        RewardOutput::scalar(Tensor::from_data(
            TensorData::new(gold, [n]),
            &input.tokens.device(),
        ))
    }
}

/// Samples of one batch of prompts, scored by proxy and gold (inner backend).
#[derive(Debug, Clone)]
pub struct Scored<B: Backend> {
    /// The prompt index of each row.
    pub prompts: Vec<usize>,
    /// The generation (tokens, masks, sampling log-probs).
    pub generation: Generation<B>,
    /// Member scores `[K, N]`.
    pub members: Tensor<B, 2>,
    /// Aggregated proxy `[N]`.
    pub proxy: Tensor<B, 1>,
    /// Gold of each row.
    pub gold: Vec<f64>,
    /// Whether each row is ill-formed.
    pub ill_formed: Vec<bool>,
    /// Each row's response tokens, up to and including its end id.
    pub responses: Vec<Vec<u32>>,
    /// The proxy's named components `[P, N]` ([`Task::proxy_parts`]), if any.
    pub parts: Option<Tensor<B, 2>>,
    /// Each monitor's score of each row ([`Task::monitors`]).
    pub monitors: Vec<Vec<f64>>,
    /// Seconds spent generating.
    pub sample_seconds: f64,
    /// Seconds spent scoring (proxy and gold).
    pub score_seconds: f64,
    /// The turn data of a multi-turn task's episodes ([`Task::sample_turns`]).
    pub turns: Option<crate::multiturn::TurnBatch<B>>,
}

/// The prompts `prompts` of `task`, left-padded to its prompt width: ids and mask.
fn prompt_batch<B: Backend>(
    task: &dyn Task<B>,
    prompts: &[usize],
    device: &B::Device,
) -> Result<(Tensor<B, 2, Int>, Tensor<B, 2>)> {
    let (n, w) = (prompts.len(), task.prompt_width());
    let mut ids = vec![task.pad_id() as i64; n * w];
    let mut mask = vec![0f32; n * w];
    for (r, &p) in prompts.iter().enumerate() {
        if p >= task.prompts() {
            return Err(GoodhartError::invalid(
                "prompt",
                format!("index {p} of a task of {} prompts", task.prompts()),
            ));
        }
        let prompt = task.prompt(p);
        if prompt.is_empty() || prompt.len() > w {
            return Err(GoodhartError::invalid(
                "prompt",
                format!(
                    "prompt {p} is {} tokens; a task's prompts are 1 to its width {w}",
                    prompt.len()
                ),
            ));
        }
        let start = (r + 1) * w - prompt.len();
        for (j, &t) in prompt.iter().enumerate() {
            ids[start + j] = t as i64;
            mask[start + j] = 1.0;
        }
    }
    Ok((
        Tensor::from_data(TensorData::new(ids, [n, w]), device),
        Tensor::from_data(TensorData::new(mask, [n, w]), device),
    ))
}

/// Samples one response to each prompt index of `prompts` from `policy` and scores it
/// by `task`.
pub fn sample_and_score<B: Backend>(
    policy: &TransformerLm<B>,
    task: &dyn Task<B>,
    prompts: &[usize],
    generation: &GenerationConfig,
    rng: &mut seed::ChaCha8Rng,
    device: &B::Device,
) -> Result<Scored<B>> {
    if prompts.is_empty() {
        return Err(GoodhartError::Empty {
            what: "prompts".into(),
        });
    }
    let (prompt, mask) = prompt_batch(task, prompts, device)?;
    let t0 = clock::<B>(device)?;
    let gen = generate(policy, prompt, mask, generation, rng)?;
    let sample_seconds = since::<B>(t0, device)?;
    let batch = Sequences::new(
        gen.tokens.clone(),
        gen.attention_mask.clone(),
        gen.response_mask.clone(),
    )?;
    let width = task.prompt_width();
    let end = task.end_ids();
    let responses: Vec<Vec<u32>> = host_rows(&gen.tokens)?
        .iter()
        .map(|row| {
            let mut r = Vec::new();
            for &t in &row[width..] {
                r.push(t);
                if end.contains(&t) {
                    break;
                }
            }
            r
        })
        .collect();
    let t0 = clock::<B>(device)?;
    let scores = task.score(prompts, &batch, &responses)?;
    let score_seconds = since::<B>(t0, device)?;
    Ok(Scored {
        prompts: prompts.to_vec(),
        generation: gen,
        members: scores.members,
        proxy: scores.proxy,
        gold: scores.gold,
        ill_formed: scores.ill_formed,
        responses,
        parts: scores.parts,
        monitors: scores.monitors,
        sample_seconds,
        score_seconds,
        turns: None,
    })
}

/// Samples and scores one response (a multi-turn task: one episode) per prompt index of
/// `prompts`: the task's own sampler when it has one ([`Task::sample_turns`]), else
/// [`sample_and_score`].
pub fn sample_task<B: Backend>(
    policy: &TransformerLm<B>,
    task: &dyn Task<B>,
    prompts: &[usize],
    generation: &GenerationConfig,
    rng: &mut seed::ChaCha8Rng,
    device: &B::Device,
) -> Result<Scored<B>> {
    match task.sample_turns(policy, prompts, generation, rng, device) {
        Some(scored) => scored,
        None => sample_and_score(policy, task, prompts, generation, rng, device),
    }
}

/// The scores of one evaluation batch ([`EvalConfig`]), each response's.
#[derive(Debug, Default)]
struct Evaluation {
    proxy: Vec<f64>,
    gold: Vec<f64>,
    /// Per monitor of [`Task::monitors`].
    monitors: Vec<Vec<f64>>,
}

/// `<prefix>/{mean,std,min,max}` of `values` (non-empty and finite) into `metrics`.
fn insert_summary(metrics: &mut BTreeMap<String, f64>, prefix: &str, values: &[f64]) -> Result<()> {
    let s = goodhart_metrics::stats::summary(values)?;
    for (stat, v) in [
        ("mean", s.mean),
        ("std", s.std),
        ("min", s.min),
        ("max", s.max),
    ] {
        metrics.insert(format!("{prefix}/{stat}"), v);
    }
    Ok(())
}

/// The key of [`RlConfig::effective_rank`]'s metric.
pub const KEY_EFFECTIVE_RANK: &str = "hidden/effective_rank";

/// The effective rank of `policy`'s final hidden states that generated each response
/// (the state at `t - 1` predicts token `t`; `response [N, T]` marks the response
/// tokens), mean-pooled per response: a `[N, D]` matrix.
fn response_effective_rank<B: Backend>(
    policy: &TransformerLm<B>,
    tokens: &Tensor<B, 2, Int>,
    attention: &Tensor<B, 2>,
    response: &Tensor<B, 2>,
) -> Result<f64> {
    let [n, t] = tokens.dims();
    if t < 2 {
        return Err(GoodhartError::Empty {
            what: "responses (the batch has no response token)".into(),
        });
    }
    let hidden = policy
        .trunk
        .forward(tokens.clone(), attention.clone())?
        .narrow(1, 0, t - 1);
    let d = hidden.dims()[2];
    let generated = response.clone().narrow(1, 1, t - 1).reshape([n, t - 1, 1]);
    let count = generated.clone().sum_dim(1).reshape([n, 1]).clamp_min(1.0);
    let pooled = (hidden * generated).sum_dim(1).reshape([n, d]) / count;
    goodhart_metrics::effective_rank::effective_rank(pooled)
}

/// A tensor's values on the host as `f64`.
pub(crate) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f64>> {
    t.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| GoodhartError::invalid("tensor data", format!("{e:?}")))
}

/// One step's record: its flat metrics (one `metrics.jsonl` line), its samples (one
/// `samples.jsonl` line each) and where its time went (not logged: wall time differs
/// between two runs of one seed, the logged numbers do not).
#[derive(Debug, Clone)]
pub struct StepLine {
    /// Step index (0-based).
    pub step: usize,
    /// Metrics keyed as goodhart-metrics names them (`reward/proxy/mean`, `kl/d`, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Every response of the step.
    pub samples: Vec<Sample>,
    /// Wall time of the step's phases.
    pub timings: StepTimings,
}

/// Wall-clock seconds of one step: the model's work (sampling, forward passes, backward
/// passes and optimiser steps) and the whole step. Each phase ends with a device sync, so
/// the seconds are the device's too on asynchronous backends.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimings {
    /// Generating the responses (ReMax's greedy ones and the evaluation batch's included).
    pub sample: f64,
    /// Forward passes without gradients: the proxy's members (on the evaluation batch
    /// too), the sampler's and the reference's log-probs, the critic's values.
    pub score: f64,
    /// The policy's forward, backward and AdamW step in each epoch, and the critic's.
    pub update: f64,
    /// The whole step, from drawing its prompts to its [`StepLine`].
    pub total: f64,
}

impl StepTimings {
    /// What the trainer itself spends: `total` less the model's work.
    pub fn overhead(&self) -> f64 {
        self.total - self.sample - self.score - self.update
    }
}

/// The time after the device finished its queued work.
fn clock<B: Backend>(device: &B::Device) -> Result<Instant> {
    B::sync(device).map_err(|e| GoodhartError::invalid("device", format!("sync failed: {e:?}")))?;
    Ok(Instant::now())
}

/// Seconds from `t0` to when the device is done.
fn since<B: Backend>(t0: Instant, device: &B::Device) -> Result<f64> {
    Ok((clock::<B>(device)? - t0).as_secs_f64())
}

impl StepLine {
    /// A metric by key (NaN when absent).
    pub fn get(&self, key: &str) -> f64 {
        self.metrics.get(key).copied().unwrap_or(f64::NAN)
    }
}

/// One response of a step, with every reward it got (a `samples.jsonl` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// RL step.
    pub step: usize,
    /// The prompt's id (its topic).
    pub prompt: usize,
    /// The response's tokens (up to and including `EOS`).
    pub tokens: Vec<u32>,
    /// The response as text ([`Language::token_text`], space-separated).
    pub text: String,
    /// `proxy` (the aggregated proxy score), `gold`, `reward` (the proxy after Ctrl-U,
    /// shaping and the length method), `train` (the trained reward before in-reward
    /// regularisers), `component/<name>` per component, `baseline` (ReMax's greedy reward),
    /// `proxy/<name>` per component of the task's proxy ([`Task::proxy_parts`]), and each
    /// monitor's score under its name ([`Task::monitors`]).
    pub rewards: BTreeMap<String, f64>,
    /// Its advantage: the mean over its tokens (an outcome estimator's one value).
    pub advantage: f64,
    /// `sum_t log pi_old(y_t | ...)` at the sampling temperature.
    pub logprob: f64,
    /// `sum_t (log pi_old - log pi_init)`: k1 KL to the reference.
    pub kl: f64,
    /// Response length in tokens.
    pub length: usize,
}

/// The reward side of the trainer: the proxy through FiMi debiasing, Ctrl-U, shaping and
/// a length penalty, and the weighted components (inner backend).
struct Rewards<B: Backend> {
    shaper: Option<Shaper>,
    /// Reference rewards `[prompts][m]` for shaping.
    references: Option<Vec<Vec<f32>>>,
    penalty: Option<LengthConfig>,
    bias: Option<LengthBias<B>>,
    ctrl_u: Option<CtrlUConfig>,
    /// The trained reward as goodhart-reward's weighted sum of the named components
    /// (`None`: the reward alone), with the names in `[rl] components` order.
    components: Option<Components<B>>,
}

/// The trained reward's [`Composite`] and its component names in `[rl]` order.
type Components<B> = (Composite<B, Parts<B>>, Vec<String>);

/// What a reward component can name, for one batch (each `[N]`; `members` `[K, N]`).
struct Parts<B: Backend> {
    proxy: Tensor<B, 1>,
    length: Tensor<B, 1>,
    gold: Tensor<B, 1>,
    members: Tensor<B, 2>,
}

/// The source of component `name` ([`RewardComponent`]'s names).
fn part<B: Backend>(name: &str) -> Result<Box<dyn RewardSource<B, Parts<B>>>> {
    Ok(match name {
        "proxy" => Box::new(FnReward::new(name, |p: &Parts<B>| Ok(p.proxy.clone()))),
        "length" => Box::new(FnReward::new(name, |p: &Parts<B>| Ok(p.length.clone()))),
        "gold" => Box::new(FnReward::new(name, |p: &Parts<B>| Ok(p.gold.clone()))),
        member => {
            let k: usize = member
                .strip_prefix("member")
                .and_then(|k| k.parse().ok())
                .ok_or_else(|| GoodhartError::invalid("rl.components", member))?;
            Box::new(FnReward::new(name, move |p: &Parts<B>| {
                let [members, n] = p.members.dims();
                if k >= members {
                    return Err(GoodhartError::invalid(
                        "rl.components",
                        format!("member{k} of an ensemble of {members}"),
                    ));
                }
                Ok(p.members.clone().narrow(0, k, 1).reshape([n]))
            }))
        }
    })
}

/// The [`Composite`] of `[rl] components` (`None` when there are none).
fn composite<B: Backend>(components: &[RewardComponent]) -> Result<Option<Components<B>>> {
    if components.is_empty() {
        return Ok(None);
    }
    let parts = components
        .iter()
        .map(|c| {
            Ok(Component {
                name: c.name.clone(),
                weight: c.weight as f32,
                source: part::<B>(&c.name)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let names = components.iter().map(|c| c.name.clone()).collect();
    Ok(Some((Composite::new("train", parts)?, names)))
}

/// A batch's rewards, each `[N]`.
#[derive(Debug, Clone)]
struct Scores<B: Backend> {
    reward: Tensor<B, 1>,
    components: Vec<Tensor<B, 1>>,
    train: Tensor<B, 1>,
}

fn lengths_of<B: Backend>(mask: &Tensor<B, 2>) -> Tensor<B, 1> {
    let n = mask.dims()[0];
    mask.clone().sum_dim(1).reshape([n])
}

impl<B: Backend> Rewards<B> {
    /// The proxy after FiMi debiasing and Ctrl-U (what references and batches share).
    fn base(&self, s: &Scored<B>) -> Result<Tensor<B, 1>> {
        let mut r = s.proxy.clone();
        if let Some(bias) = &self.bias {
            r = bias.debias(r, lengths_of(&s.generation.response_mask))?;
        }
        if let Some(c) = &self.ctrl_u {
            let u = member_variance(s.members.clone(), false)?.sqrt();
            r = ctrl_u(r, u, c)?;
        }
        Ok(r)
    }

    fn score(&mut self, s: &Scored<B>, device: &B::Device) -> Result<Scores<B>> {
        let n = s.prompts.len();
        let mut r = self.base(s)?;
        if let Some(shaper) = self.shaper.as_mut() {
            let refs = self.references.as_ref().map(|refs| {
                let m = refs[0].len();
                let flat: Vec<f32> = s
                    .prompts
                    .iter()
                    .flat_map(|&t| refs[t].iter().copied())
                    .collect();
                Tensor::<B, 2>::from_data(TensorData::new(flat, [n, m]), device)
            });
            r = shaper.apply(r, refs.as_ref())?;
        }
        let lengths = lengths_of(&s.generation.response_mask);
        if let Some(p) = self
            .penalty
            .as_ref()
            .filter(|p| !matches!(p, LengthConfig::Fimi(_)))
        {
            r = p.penalise(r, lengths.clone())?;
        }
        let Some((composite, names)) = &self.components else {
            return Ok(Scores {
                train: r.clone(),
                reward: r,
                components: Vec::new(),
            });
        };
        let parts = Parts {
            proxy: r.clone(),
            length: lengths,
            gold: Tensor::from_data(
                TensorData::new(s.gold.iter().map(|&g| g as f32).collect(), [n]),
                device,
            ),
            members: s.members.clone(),
        };
        let mut out = composite.score_components(&parts)?;
        let components = names
            .iter()
            .map(|name| {
                out.components
                    .remove(name)
                    .map(|o| o.reward)
                    .expect("one output per named component")
            })
            .collect();
        Ok(Scores {
            reward: r,
            components,
            train: out.total,
        })
    }
}

/// Samples of one or more rollouts with their rewards, `N` rows (inner backend).
#[derive(Debug, Clone)]
struct Rollout<B: Backend> {
    prompts: Vec<usize>,
    tokens: Tensor<B, 2, Int>,
    attention: Tensor<B, 2>,
    response: Tensor<B, 2>,
    /// The sampler's log-prob of each response token (0 elsewhere).
    logprobs: Tensor<B, 2>,
    members: Tensor<B, 2>,
    proxy: Tensor<B, 1>,
    scores: Scores<B>,
    gold: Vec<f64>,
    ill_formed: Vec<bool>,
    /// Response tokens per row, up to and including the end id.
    responses: Vec<Vec<u32>>,
    /// The proxy's named components `[P, N]`, if any.
    parts: Option<Tensor<B, 2>>,
    /// Each monitor's score of each row.
    monitors: Vec<Vec<f64>>,
    /// The turn data of a multi-turn task.
    turns: Option<crate::multiturn::TurnBatch<B>>,
}

fn pad_cols<B: Backend, K: burn::tensor::TensorKind<B> + burn::tensor::BasicOps<B>>(
    t: Tensor<B, 2, K>,
    width: usize,
) -> Tensor<B, 2, K> {
    let [n, w] = t.dims();
    if w >= width {
        return t;
    }
    // PAD is 0: zeros pad tokens and masks alike.
    let zeros = Tensor::<B, 2, K>::empty([n, width - w], &t.device()).zeros_like();
    Tensor::cat(vec![t, zeros], 1)
}

impl<B: Backend> Rollout<B> {
    fn new(s: Scored<B>, scores: Scores<B>) -> Self {
        Self {
            prompts: s.prompts,
            tokens: s.generation.tokens,
            attention: s.generation.attention_mask,
            response: s.generation.response_mask,
            logprobs: s.generation.logprobs,
            members: s.members,
            proxy: s.proxy,
            scores,
            gold: s.gold,
            ill_formed: s.ill_formed,
            responses: s.responses,
            parts: s.parts,
            monitors: s.monitors,
            turns: s.turns,
        }
    }

    /// The rows `rows`, in order.
    fn select(&self, rows: &[usize]) -> Self {
        let device = self.tokens.device();
        let idx = Tensor::<B, 1, Int>::from_data(
            TensorData::new(rows.iter().map(|&r| r as i64).collect(), [rows.len()]),
            &device,
        );
        let pick = |t: &Tensor<B, 1>| t.clone().select(0, idx.clone());
        Self {
            prompts: rows.iter().map(|&r| self.prompts[r]).collect(),
            tokens: self.tokens.clone().select(0, idx.clone()),
            attention: self.attention.clone().select(0, idx.clone()),
            response: self.response.clone().select(0, idx.clone()),
            logprobs: self.logprobs.clone().select(0, idx.clone()),
            members: self.members.clone().select(1, idx.clone()),
            proxy: pick(&self.proxy),
            scores: Scores {
                reward: pick(&self.scores.reward),
                components: self.scores.components.iter().map(pick).collect(),
                train: pick(&self.scores.train),
            },
            gold: rows.iter().map(|&r| self.gold[r]).collect(),
            ill_formed: rows.iter().map(|&r| self.ill_formed[r]).collect(),
            responses: rows.iter().map(|&r| self.responses[r].clone()).collect(),
            monitors: self
                .monitors
                .iter()
                .map(|m| rows.iter().map(|&r| m[r]).collect())
                .collect(),
            parts: self
                .parts
                .as_ref()
                .map(|p| p.clone().select(1, idx.clone())),
            turns: self.turns.as_ref().map(|t| crate::multiturn::TurnBatch {
                turn_mask: t.turn_mask.clone().select(0, idx.clone()),
                token_turn: t.token_turn.clone().select(0, idx.clone()),
                turn_rewards: t.turn_rewards.clone().select(0, idx.clone()),
                answer_prob: t.answer_prob.clone().map(|p| p.select(0, idx.clone())),
                answer_turn: t.answer_turn.clone().select(0, idx.clone()),
                checks: t.checks.clone().select(0, idx.clone()),
                checks_mask: t.checks_mask.clone().select(0, idx.clone()),
            }),
        }
    }

    /// The rollouts one after the other, padded to the widest (at least one).
    fn cat(parts: Vec<Self>) -> Self {
        if parts.len() == 1 {
            return parts.into_iter().next().expect("one part");
        }
        let width = parts.iter().map(|p| p.tokens.dims()[1]).max().unwrap_or(0);
        let cat1 =
            |f: &dyn Fn(&Self) -> Tensor<B, 1>| Tensor::cat(parts.iter().map(f).collect(), 0);
        let k = parts[0].scores.components.len();
        Self {
            prompts: parts.iter().flat_map(|p| p.prompts.clone()).collect(),
            tokens: Tensor::cat(
                parts
                    .iter()
                    .map(|p| pad_cols(p.tokens.clone(), width))
                    .collect(),
                0,
            ),
            attention: Tensor::cat(
                parts
                    .iter()
                    .map(|p| pad_cols(p.attention.clone(), width))
                    .collect(),
                0,
            ),
            response: Tensor::cat(
                parts
                    .iter()
                    .map(|p| pad_cols(p.response.clone(), width))
                    .collect(),
                0,
            ),
            logprobs: Tensor::cat(
                parts
                    .iter()
                    .map(|p| pad_cols(p.logprobs.clone(), width))
                    .collect(),
                0,
            ),
            members: Tensor::cat(parts.iter().map(|p| p.members.clone()).collect(), 1),
            proxy: cat1(&|p| p.proxy.clone()),
            scores: Scores {
                reward: cat1(&|p| p.scores.reward.clone()),
                components: (0..k)
                    .map(|i| cat1(&|p| p.scores.components[i].clone()))
                    .collect(),
                train: cat1(&|p| p.scores.train.clone()),
            },
            gold: parts.iter().flat_map(|p| p.gold.clone()).collect(),
            ill_formed: parts.iter().flat_map(|p| p.ill_formed.clone()).collect(),
            responses: parts.iter().flat_map(|p| p.responses.clone()).collect(),
            monitors: (0..parts[0].monitors.len())
                .map(|m| parts.iter().flat_map(|p| p.monitors[m].clone()).collect())
                .collect(),
            parts: parts[0].parts.as_ref().map(|_| {
                Tensor::cat(
                    parts
                        .iter()
                        .map(|p| {
                            p.parts
                                .clone()
                                .expect("every rollout of a task has its parts")
                        })
                        .collect(),
                    1,
                )
            }),
            turns: parts[0].turns.as_ref().map(|_| {
                let turns: Vec<&crate::multiturn::TurnBatch<B>> = parts
                    .iter()
                    .map(|p| p.turns.as_ref().expect("every rollout of a task has turns"))
                    .collect();
                let k = turns
                    .iter()
                    .map(|t| t.turn_mask.dims()[1])
                    .max()
                    .unwrap_or(0);
                let cat = |f: &dyn Fn(&crate::multiturn::TurnBatch<B>) -> Tensor<B, 2>,
                           w: usize| {
                    Tensor::cat(turns.iter().map(|t| pad_cols(f(t), w)).collect(), 0)
                };
                crate::multiturn::TurnBatch {
                    turn_mask: cat(&|t| t.turn_mask.clone(), k),
                    token_turn: Tensor::cat(
                        turns
                            .iter()
                            .map(|t| pad_cols(t.token_turn.clone(), width))
                            .collect(),
                        0,
                    ),
                    turn_rewards: cat(&|t| t.turn_rewards.clone(), k),
                    answer_prob: turns[0]
                        .answer_prob
                        .as_ref()
                        .map(|_| cat(&|t| t.answer_prob.clone().expect("answer probs"), k + 1)),
                    answer_turn: cat(&|t| t.answer_turn.clone(), k),
                    checks: Tensor::cat(turns.iter().map(|t| t.checks.clone()).collect(), 0),
                    checks_mask: Tensor::cat(
                        turns.iter().map(|t| t.checks_mask.clone()).collect(),
                        0,
                    ),
                }
            }),
        }
    }
}

/// Reference rewards `[prompts][m]`: [`Rewards::base`] of `m` responses per prompt
/// sampled from the initial policy (shaping's reference responses; stream
/// `pg/references`).
fn reference_rewards<B: Backend>(
    rewards: &Rewards<B>,
    reference: &TransformerLm<B>,
    task: &dyn Task<B>,
    m: usize,
    generation: &GenerationConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<Vec<f32>>> {
    let prompts = task.prompts();
    let rows: Vec<usize> = (0..prompts)
        .flat_map(|t| std::iter::repeat_n(t, m))
        .collect();
    let mut rng = seed::rng(seed, "pg/references");
    let s = sample_task(reference, task, &rows, generation, &mut rng, device)?;
    let r: Vec<f32> = host(rewards.base(&s)?)?
        .into_iter()
        .map(|x| x as f32)
        .collect();
    Ok((0..prompts)
        .map(|t| r[t * m..(t + 1) * m].to_vec())
        .collect())
}

/// Responses per fit of FiMi's length model, sampled from the initial policy.
const FIMI_SAMPLES: usize = 256;

/// DAPO's filter: whether each group's trained rewards spread, by the rule
/// goodhart-metrics' `groups/zero_std_frac` counts (population std above 1e-6).
fn groups_with_spread<B: Backend>(train: Tensor<B, 1>, groups: &Groups) -> Result<Vec<bool>> {
    let std = host(group_stats(train, groups)?.std(false))?;
    Ok(std.into_iter().map(|s| s > 1e-6).collect())
}

/// Steps 1-3: a batch of `P` groups of `G` responses, with dynamic sampling when set.
/// Returns the batch, the rollouts drawn and the share of drawn groups with spread.
#[allow(clippy::too_many_arguments)]
fn collect<B: Backend>(
    cfg: &RlConfig,
    sampler: &TransformerLm<B>,
    task: &dyn Task<B>,
    rewards: &mut Rewards<B>,
    generation: &GenerationConfig,
    prompt_rng: &mut seed::ChaCha8Rng,
    sample_rng: &mut seed::ChaCha8Rng,
    timings: &mut StepTimings,
    device: &B::Device,
) -> Result<(Rollout<B>, usize, f64)> {
    let (p, g) = (cfg.prompts_per_step, cfg.group_size);
    let prompts_n = task.prompts();
    let rounds = cfg.dynamic_sampling.as_ref().map_or(1, |d| d.max_batches);
    let groups = Groups::contiguous(p, g)?;
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    let (mut kept_groups, mut drawn) = (0, 0);
    for round in 1..=rounds {
        let prompts: Vec<usize> = (0..p)
            .flat_map(|_| std::iter::repeat_n(prompt_rng.random_range(0..prompts_n), g))
            .collect();
        let s = sample_task(sampler, task, &prompts, generation, sample_rng, device)?;
        timings.sample += s.sample_seconds;
        timings.score += s.score_seconds;
        let scores = rewards.score(&s, device)?;
        let r = Rollout::new(s, scores);
        if cfg.dynamic_sampling.is_none() {
            return Ok((r, 1, f64::NAN));
        }
        let spread = groups_with_spread(r.scores.train.clone(), &groups)?;
        drawn += p;
        let rows = |keep: bool| -> Vec<usize> {
            spread
                .iter()
                .enumerate()
                .filter(|(_, &s)| s == keep)
                .flat_map(|(i, _)| i * g..(i + 1) * g)
                .collect()
        };
        let (yes, no) = (rows(true), rows(false));
        kept_groups += yes.len() / g;
        if !yes.is_empty() {
            kept.push(r.select(&yes));
        }
        if !no.is_empty() {
            dropped.push(r.select(&no));
        }
        if kept_groups >= p || round == rounds {
            let share = kept_groups as f64 / drawn as f64;
            // Kept groups first; a short batch is filled with dropped ones.
            kept.extend(dropped);
            let all = Rollout::cat(kept);
            let first: Vec<usize> = (0..p * g).collect();
            return Ok((all.select(&first), round, share));
        }
    }
    Err(GoodhartError::invalid(
        "rl.dynamic_sampling.max_batches",
        "must be at least 1",
    ))
}

/// Trains `policy` on `task`'s prompts against its proxy for `cfg.steps` steps (see the
/// module docs), calling `log` with each step's [`StepLine`]; returns the trained policy.
///
/// `reference` is the initial policy (frozen, inner backend): KL terms, the chi-squared
/// term, shaping's references and the reported `kl/ref` are measured against it.
/// Deterministic in `seed` on a given backend (streams `pg/init`, `pg/prompts`,
/// `pg/sample`, `pg/greedy`, `pg/references`, `pg/fimi`, `pg/anchor`, `pg/eval`).
///
/// Errors on a bad config, a vocabulary other than the task's, a prompt plus
/// `max_new_tokens` longer than the policy's or a proxy member's `max_seq_len`,
/// non-finite rewards or losses, or an error from `log` (which stops the run).
pub fn train<B: AutodiffBackend>(
    cfg: &RlConfig,
    task: &dyn Task<B::InnerBackend>,
    policy: TransformerLm<B>,
    reference: &TransformerLm<B::InnerBackend>,
    seed: u64,
    device: &B::Device,
    log: &mut dyn FnMut(&StepLine) -> Result<()>,
) -> Result<TransformerLm<B>> {
    train_with_checkpoints(
        cfg,
        task,
        policy,
        reference,
        seed,
        device,
        log,
        0,
        &mut |_, _| Ok(()),
    )
}

/// The callback of [`train_with_checkpoints`]: `checkpoint(s, policy)`.
type CheckpointFn<'a, B> = dyn FnMut(usize, &TransformerLm<B>) -> Result<()> + 'a;

/// [`train`], also calling `checkpoint(s, policy)` with the policy after `s` steps for
/// every `s` that is a multiple of `every` (`s = 0` the initial policy, `s = steps` the
/// final one when the run goes to its end; never when `every` is 0). The callback draws
/// nothing from the run's streams: a run gives the same steps with or without it. An
/// error from it stops the run.
#[allow(clippy::too_many_arguments)]
pub fn train_with_checkpoints<B: AutodiffBackend>(
    cfg: &RlConfig,
    task: &dyn Task<B::InnerBackend>,
    mut policy: TransformerLm<B>,
    reference: &TransformerLm<B::InnerBackend>,
    seed: u64,
    device: &B::Device,
    log: &mut dyn FnMut(&StepLine) -> Result<()>,
    every: usize,
    checkpoint: &mut CheckpointFn<'_, B::InnerBackend>,
) -> Result<TransformerLm<B>> {
    let due = |s: usize| every > 0 && s.is_multiple_of(every);
    cfg.validate_for(task.proxy_members(), task.multi_turn())?;
    let width = task.prompt_width();
    let need = width + cfg.max_new_tokens;
    for (what, len) in [
        ("policy", Some(policy.trunk.max_seq_len())),
        ("reference", Some(reference.trunk.max_seq_len())),
        ("proxy", task.proxy_max_seq_len()),
    ] {
        if let Some(len) = len.filter(|&len| len < need) {
            return Err(GoodhartError::invalid(
                "rl.max_new_tokens",
                format!(
                    "prompt {width} + {} tokens exceeds the {what}'s max_seq_len {len}",
                    cfg.max_new_tokens
                ),
            ));
        }
    }
    if policy.vocab_size() != task.vocab_size() || reference.vocab_size() != task.vocab_size() {
        return Err(GoodhartError::shape(
            "policy / reference vocabulary",
            &[task.vocab_size()],
            &[policy.vocab_size()],
        ));
    }
    seed::seed_backend::<B>(device, seed, "pg/init");
    let end = task.end_ids();
    let generation = GenerationConfig::new(cfg.max_new_tokens)
        .with_temperature(cfg.temperature)
        .with_eos_id(end.first().map(|&e| e as usize))
        .with_stop_ids(end.iter().skip(1).map(|&e| e as usize).collect())
        .with_pad_id(task.pad_id() as usize);
    let ended = |r: &[u32]| r.last().is_some_and(|t| end.contains(t));
    let objective = cfg.policy_loss()?;
    // Rewards: FiMi's length model is fitted first (shaping's references read it).
    let mut rewards = Rewards::<B::InnerBackend> {
        shaper: cfg.reward_shaping.clone().map(Shaper::new),
        references: None,
        penalty: cfg.length_penalty.clone(),
        bias: None,
        ctrl_u: cfg.ctrl_u,
        components: composite(&cfg.components)?,
    };
    if let Some(LengthConfig::Fimi(f)) = &cfg.length_penalty {
        let prompts = task.prompts();
        let rows: Vec<usize> = (0..FIMI_SAMPLES).map(|i| i % prompts).collect();
        let mut rng = seed::rng(seed, "pg/fimi");
        let s = sample_task(reference, task, &rows, &generation, &mut rng, device)?;
        let lengths = lengths_of(&s.generation.response_mask);
        rewards.bias = Some(fit_length_bias::<B>(
            Tensor::from_inner(s.proxy),
            Tensor::from_inner(lengths),
            f,
        )?);
    }
    if let Some(s) = cfg.reward_shaping.as_ref().filter(|s| s.needs_references()) {
        let m = references_per_prompt(s);
        rewards.references = Some(reference_rewards(
            &rewards,
            reference,
            task,
            m,
            &generation,
            seed,
            device,
        )?);
    }
    // Regularisers: every one through the trait; constrained RLHF's multipliers also mix
    // the advantages, so it is held as its own type.
    let mut regularizers: Vec<Box<dyn Regularizer<B>>> = Vec::new();
    let mut constrained: Option<ConstrainedRlhf> = None;
    for r in &cfg.regularizers {
        match r {
            RegularizerConfig::Constrained(c) => constrained = Some(c.init()?),
            other => regularizers.push(other.build::<B>(device)?),
        }
    }
    let needs_logits = cfg
        .regularizers
        .iter()
        .any(|r| matches!(r, RegularizerConfig::LpReg(_)));
    let anchor = cfg
        .regularizers
        .iter()
        .any(|r| matches!(r, RegularizerConfig::SftAnchor(_)));
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<B, TransformerLm<B>>();
    // GAE's value head, on a copy of the policy's trunk.
    let gae = matches!(cfg.advantage, AdvantageConfig::Gae(_));
    let mut critic = gae.then(|| {
        (
            LmValueModel::from_trunk(policy.trunk.clone()),
            AdamWConfig::new()
                .with_epsilon(1e-8)
                .with_weight_decay(0.0)
                .init::<B, LmValueModel<B>>(),
        )
    });
    let mut prompt_rng = seed::rng(seed, "pg/prompts");
    let mut sample_rng = seed::rng(seed, "pg/sample");
    let mut greedy_rng = seed::rng(seed, "pg/greedy");
    let mut anchor_rng = seed::rng(seed, "pg/anchor");
    let (p, g) = (cfg.prompts_per_step, cfg.group_size);
    let groups = Groups::contiguous(p, g)?;
    let n = p * g;
    let to_ad = |t: Tensor<B::InnerBackend, 2>| Tensor::<B, 2>::from_inner(t);
    let to_ad1 = |t: Tensor<B::InnerBackend, 1>| Tensor::<B, 1>::from_inner(t);
    // Batches dropped for a non-finite quantity (`OnNan::SkipBatch`).
    let mut skipped = 0usize;
    // The alarm: the detectors, and for `rollback` the policies that began recent steps.
    let mut detectors: Vec<Box<dyn Detector>> = cfg
        .detectors
        .iter()
        .map(DetectorConfig::build)
        .collect::<Result<_>>()?;
    let mut recent: std::collections::VecDeque<(usize, TransformerLm<B>)> =
        std::collections::VecDeque::new();
    // Whether an alarm ended the run before its last step.
    let mut stopped = false;
    // The evaluation batch's prompts: every prompt in turn, the same at every evaluation.
    let eval_prompts: Vec<usize> = cfg.eval.map_or_else(Vec::new, |e| {
        (0..e.samples).map(|i| i % task.prompts().max(1)).collect()
    });
    'steps: for step in 0..cfg.steps {
        let mut timings = StepTimings::default();
        let t_step = clock::<B>(device)?;
        if cfg.on_alarm == OnAlarm::Rollback {
            recent.push_back((step, policy.clone()));
            if recent.len() > cfg.rollback_steps + 1 {
                recent.pop_front();
            }
        }
        // 1-3. Prompts, rollout with the current policy (no autodiff), rewards.
        let sampler = policy.valid();
        if due(step) {
            checkpoint(step, &sampler)?;
        }
        let (batch, rollouts, spread_share) = collect(
            cfg,
            &sampler,
            task,
            &mut rewards,
            &generation,
            &mut prompt_rng,
            &mut sample_rng,
            &mut timings,
            device,
        )?;
        // The evaluation batch, in chunks of the training batch's size (its memory):
        // proxy, gold and each monitor's score of every response.
        let mut evaluation: Option<Evaluation> = None;
        if cfg.eval.is_some_and(|e| step.is_multiple_of(e.every)) {
            let mut rng = seed::rng(seed, "pg/eval");
            let mut e = Evaluation {
                monitors: vec![Vec::new(); task.monitors().len()],
                ..Default::default()
            };
            for rows in eval_prompts.chunks(n) {
                let s = sample_task(&sampler, task, rows, &generation, &mut rng, device)?;
                timings.sample += s.sample_seconds;
                timings.score += s.score_seconds;
                e.proxy.extend(host(s.proxy)?);
                e.gold.extend(s.gold);
                for (all, chunk) in e.monitors.iter_mut().zip(s.monitors) {
                    all.extend(chunk);
                }
            }
            evaluation = Some(e);
        }
        let mask = batch.response.clone();
        for (what, finite) in [
            ("proxy reward", check_finite(&batch.proxy, "").is_ok()),
            (
                "trained reward",
                check_finite(&batch.scores.train, "").is_ok(),
            ),
            ("gold reward", batch.gold.iter().all(|g| g.is_finite())),
            (
                "monitor reward",
                batch.monitors.iter().flatten().all(|g| g.is_finite()),
            ),
            (
                "evaluation reward",
                evaluation.iter().all(|e| {
                    e.proxy
                        .iter()
                        .chain(&e.gold)
                        .chain(e.monitors.iter().flatten())
                        .all(|v| v.is_finite())
                }),
            ),
        ] {
            if !finite {
                drop_batch(cfg.on_nan, step, what, &mut skipped)?;
                continue 'steps;
            }
        }
        let effective_rank = if cfg.effective_rank {
            let t0 = clock::<B>(device)?;
            let er = response_effective_rank(&sampler, &batch.tokens, &batch.attention, &mask)?;
            timings.score += since::<B>(t0, device)?;
            Some(er)
        } else {
            None
        };
        // 4. Log-probs of the sampling policy and the reference.
        let t0 = clock::<B>(device)?;
        let old = score(
            &sampler,
            batch.tokens.clone(),
            batch.attention.clone(),
            cfg.temperature,
        )?;
        let lp_old = zero_masked(old.logprobs, &mask);
        let lr = zero_masked(
            score(
                reference,
                batch.tokens.clone(),
                batch.attention.clone(),
                cfg.temperature,
            )?
            .logprobs,
            &mask,
        );
        timings.score += since::<B>(t0, device)?;
        // Rollout IS: the sampler's cached-decoding log-probs against the teacher-forced
        // ones; the weights and their (mean, out-of-bounds fraction).
        let rollout_is = cfg
            .rollout_is
            .as_ref()
            .map(|r| -> Result<_> {
                let w = r.weights(&lp_old, &batch.logprobs, &mask)?;
                let stats = host(Tensor::cat(vec![w.mean, w.out_of_bounds], 0))?;
                Ok((to_ad(w.weights), stats))
            })
            .transpose()?;
        let is_weights = rollout_is.as_ref().map(|(w, _)| w);
        // A turn-level loss reads each token's turn and each turn's normalised signal (as
        // A2TGPO normalises it, with the estimator's settings when it is A2TGPO).
        let turn_inputs = match (&batch.turns, objective.needs_turns()) {
            (Some(t), true) => {
                let a2 = match &cfg.advantage {
                    AdvantageConfig::A2tgpo(c) => *c,
                    _ => Default::default(),
                };
                let z = goodhart_advantage::a2tgpo::turn_zscores(
                    t.turn_rewards.clone(),
                    &t.turn_mask,
                    &groups,
                    &a2,
                )?;
                Some(TurnInputs {
                    token_turn: Tensor::<B, 2, Int>::from_inner(t.token_turn.clone()),
                    turn_z: to_ad(z),
                    fixed: to_ad(t.answer_turn.clone()),
                })
            }
            (None, true) => {
                return Err(GoodhartError::invalid(
                    "rl.loss",
                    format!("`{}` needs a multi-turn task", objective.name()),
                ))
            }
            _ => None,
        };
        let (tokens, attention, mask_ad) = (
            Tensor::<B, 2, Int>::from_inner(batch.tokens.clone()),
            to_ad(batch.attention.clone()),
            to_ad(mask.clone()),
        );
        let (lp_old_ad, lr_ad) = (to_ad(lp_old.clone()), to_ad(lr.clone()));
        let reward_main = to_ad1(batch.scores.train.clone());
        let rewards_aux: Vec<Tensor<B, 1>> = batch
            .scores
            .components
            .iter()
            .skip(1)
            .map(|c| to_ad1(c.clone()))
            .collect();
        let sampled = RegInputs::<B> {
            mask: Some(mask_ad.clone()),
            logp: Some(lp_old_ad.clone()),
            logp_ref: Some(lr_ad.clone()),
            entropy: Some(to_ad(old.entropy.clone())),
            tokens: Some(tokens.clone()),
            reward_main: Some(reward_main.clone()),
            rewards_aux: rewards_aux.clone(),
            ..Default::default()
        };
        let outcome = outcome_at_last_token(reward_main.clone(), &mask_ad);
        let mut token_rewards = outcome.clone();
        for r in regularizers.iter_mut() {
            token_rewards = r.shape_rewards(token_rewards, &sampled)?;
        }
        let token_rewards = token_rewards.inner();
        // 5. Advantages.
        let mut input =
            AdvantageInput::new(mask.clone(), &groups).with_token_rewards(token_rewards.clone());
        if let Some(t) = &batch.turns {
            input = input.with_turns(t.turns()).with_unit_tests(t.unit_tests());
        }
        let t0 = clock::<B>(device)?;
        let old_values = critic
            .as_ref()
            .map(|(c, _)| {
                c.valid()
                    .forward(batch.tokens.clone(), batch.attention.clone())
            })
            .transpose()?
            .map(|v| zero_masked(v, &mask));
        timings.score += since::<B>(t0, device)?;
        if let Some(v) = &old_values {
            input = input.with_values(v.clone());
        }
        if matches!(cfg.advantage, AdvantageConfig::OptimalTokenBaseline(_)) {
            // OTB: the sampler's collision probability sum_v pi^2 at each token.
            let t0 = clock::<B>(device)?;
            let sp = sum_pi_squared(
                &sampler,
                batch.tokens.clone(),
                batch.attention.clone(),
                cfg.temperature,
            )?;
            timings.score += since::<B>(t0, device)?;
            input = input.with_policy_stats(lp_old.clone(), zero_masked(sp, &mask));
            if let Some(w) = is_weights {
                input = input.with_rollout_is_weights(w.clone().inner());
            }
        }
        let mut baseline = None;
        if matches!(cfg.advantage, AdvantageConfig::Remax(_)) {
            // ReMax: the reward of the greedy response to each prompt.
            let prompts: Vec<usize> = batch.prompts.iter().step_by(g).copied().collect();
            let greedy = generation.clone().with_greedy(true);
            let s = sample_task(&sampler, task, &prompts, &greedy, &mut greedy_rng, device)?;
            timings.sample += s.sample_seconds;
            timings.score += s.score_seconds;
            let per_prompt = rewards.score(&s, device)?.train;
            let rows = Tensor::<B::InnerBackend, 1, Int>::from_data(
                TensorData::new((0..n).map(|i| (i / g) as i64).collect(), [n]),
                device,
            );
            let b = per_prompt.select(0, rows);
            input = input.with_baseline_rewards(b.clone());
            baseline = Some(host(b)?);
        }
        let estimator = match &cfg.advantage {
            AdvantageConfig::Gdpo(c) if c.weights.is_empty() => {
                let mut c = c.clone();
                c.weights = cfg.components.iter().map(|w| w.weight as f32).collect();
                AdvantageConfig::Gdpo(c)
            }
            other => other.clone(),
        };
        if matches!(estimator, AdvantageConfig::Gdpo(_)) {
            let cols: Vec<Tensor<B::InnerBackend, 2>> = batch
                .scores
                .components
                .iter()
                .map(|c| c.clone().reshape([n, 1]))
                .collect();
            input = input.with_reward_components(Tensor::cat(cols, 1));
        }
        let out = estimator.compute(&input)?;
        let returns = out.returns;
        let mut adv = out.advantages;
        if let Some(c) = &constrained {
            // Moskovitz et al.: (N - sum lambda) A_KL + sum lambda_i A_i, A_KL from the
            // in-reward regularisers' terms alone, A_i from each component alone.
            let kl_only = token_rewards.clone() - outcome.clone().inner();
            let a_kl = estimator
                .compute(&AdvantageInput::new(mask.clone(), &groups).with_token_rewards(kl_only))?
                .advantages;
            let parts = batch
                .scores
                .components
                .iter()
                .map(|r| {
                    let t = outcome_at_last_token(r.clone(), &mask);
                    Ok(estimator
                        .compute(&AdvantageInput::new(mask.clone(), &groups).with_token_rewards(t))?
                        .advantages)
                })
                .collect::<Result<Vec<_>>>()?;
            adv = c.mix_advantages(a_kl, &parts)?;
        }
        if check_finite_masked(&adv, &mask, "").is_err() {
            drop_batch(cfg.on_nan, step, "advantages", &mut skipped)?;
            continue 'steps;
        }
        // The loss mask: overlong filtering, then the sample filter.
        let mut loss_mask = mask.clone();
        if cfg.overlong_filter {
            let keep: Vec<f32> = batch
                .responses
                .iter()
                .map(|r| if ended(r) { 1.0 } else { 0.0 })
                .collect();
            let keep = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(keep, [n]), device);
            loss_mask = loss_mask * keep.reshape([n, 1]);
        }
        let loss_mask = cfg.sample_filter.apply(&adv, &loss_mask)?;
        let loss_mask_ad = to_ad(loss_mask.clone());
        let adv_ad = to_ad(adv.clone());
        // SFT anchoring: sequences of the base policy's SFT data, one per row.
        let baseline_batch = if anchor {
            let ex = task.anchor_examples(n, &mut anchor_rng)?;
            let w = ex.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
            let mut ids = vec![task.pad_id() as i64; n * w];
            let (mut attn, mut resp) = (vec![0f32; n * w], vec![0f32; n * w]);
            for (i, (tokens, prompt_len)) in ex.iter().enumerate() {
                for (j, &t) in tokens.iter().enumerate() {
                    ids[i * w + j] = t as i64;
                    attn[i * w + j] = 1.0;
                    resp[i * w + j] = if j >= *prompt_len { 1.0 } else { 0.0 };
                }
            }
            Some((
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, w]), device),
                Tensor::<B, 2>::from_data(TensorData::new(attn, [n, w]), device),
                Tensor::<B, 2>::from_data(TensorData::new(resp, [n, w]), device),
            ))
        } else {
            None
        };
        // 6. Epochs on the autodiff backend.
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut add = |k: &str, v: f64| *sums.entry(k.to_string()).or_insert(0.0) += v;
        let width = batch.tokens.dims()[1];
        for epoch in 0..cfg.epochs {
            let t0 = clock::<B>(device)?;
            let logits = policy.forward(tokens.clone(), attention.clone())?;
            timings.update += since::<B>(t0, device)?;
            let (lp, entropy) = logprobs_from_logits(
                logits.clone().narrow(1, 0, width - 1),
                tokens.clone().narrow(1, 1, width - 1),
                cfg.temperature,
            );
            let zero = Tensor::<B, 2>::zeros([n, 1], device);
            let align =
                |x: Tensor<B, 2>| zero_masked(Tensor::cat(vec![zero.clone(), x], 1), &attention);
            let (lp, entropy) = (align(lp), align(entropy));
            let mut inputs = PolicyInputs::new(
                lp.clone(),
                lp_old_ad.clone(),
                adv_ad.clone(),
                loss_mask_ad.clone(),
            )?
            .with_global_batch(cfg.global_batch())?
            .with_seed(seed::derive(seed, &format!("pg/loss/{step}/{epoch}")));
            if let Some(w) = is_weights {
                inputs = inputs.with_rollout_is_weights(w.clone())?;
            }
            if let Some(t) = &turn_inputs {
                inputs = inputs.with_turns(t.clone())?;
            }
            let out = objective.loss(&inputs)?;
            let current = RegInputs::<B> {
                mask: Some(loss_mask_ad.clone()),
                logp: Some(lp),
                logp_ref: Some(lr_ad.clone()),
                entropy: Some(entropy),
                logits: needs_logits.then(|| {
                    let v = logits.dims()[2];
                    Tensor::cat(
                        vec![
                            Tensor::<B, 3>::zeros([n, 1, v], device),
                            logits.clone().narrow(1, 0, width - 1) / cfg.temperature,
                        ],
                        1,
                    )
                }),
                tokens: Some(tokens.clone()),
                baseline_logp: baseline_batch
                    .as_ref()
                    .map(|(t, a, _)| score(&policy, t.clone(), a.clone(), 1.0).map(|s| s.logprobs))
                    .transpose()?,
                baseline_mask: baseline_batch.as_ref().map(|(_, _, m)| m.clone()),
                reward_main: Some(reward_main.clone()),
                rewards_aux: rewards_aux.clone(),
                ..Default::default()
            };
            let mut loss = out.loss.clone();
            let mut parts = vec![
                out.loss.inner(),
                out.metrics.clip_frac_low.inner(),
                out.metrics.clip_frac_high.inner(),
                out.metrics.dual_clip_frac.inner(),
                out.metrics.approx_kl_k3.inner(),
            ];
            let mut names = vec![
                "loss/policy",
                "clip/low",
                "clip/high",
                "clip/dual",
                "ppo_kl",
            ];
            if let Some(c) = &out.metrics.cov_frac {
                parts.push(c.clone().inner());
                names.push("clip/cov");
            }
            for r in regularizers.iter_mut() {
                if let Some(term) = r.loss(&current)? {
                    parts.push(term.clone().inner());
                    names.push(r.name());
                    loss = loss + term;
                }
            }
            parts.insert(0, loss.clone().inner());
            names.insert(0, "loss");
            let values = host(Tensor::cat(parts, 0))?;
            if !values[0].is_finite() {
                drop_batch(cfg.on_nan, step, "rl loss", &mut skipped)?;
                continue 'steps;
            }
            for (name, v) in names.iter().zip(&values) {
                let key = match *name {
                    "loss" | "loss/policy" | "clip/low" | "clip/high" | "clip/dual"
                    | "clip/cov" | "ppo_kl" => name.to_string(),
                    reg => format!("loss/{reg}"),
                };
                add(&key, *v);
            }
            let t0 = clock::<B>(device)?;
            let grads = GradientsParams::from_grads(loss.backward(), &policy);
            timings.update += since::<B>(t0, device)?;
            let (grads, norm) = match clip_grad_norm(&policy, grads, cfg.max_grad_norm) {
                Err(GoodhartError::NonFinite { .. }) => {
                    drop_batch(cfg.on_nan, step, "policy gradient", &mut skipped)?;
                    continue 'steps;
                }
                other => other?,
            };
            if let Some(norm) = norm {
                add("grad_norm", norm);
            }
            let t0 = clock::<B>(device)?;
            policy = optim.step(cfg.lr, policy, grads);
            timings.update += since::<B>(t0, device)?;
            if let Some((model, mut opt)) = critic.take() {
                let t0 = clock::<B>(device)?;
                // GAE returns its value targets; the critic stays untouched otherwise.
                let (Some(v_old), Some(ret)) = (old_values.as_ref(), returns.as_ref()) else {
                    return Err(GoodhartError::invalid(
                        "rl.advantage",
                        "the value head needs the estimator's returns",
                    ));
                };
                let v = model.forward(tokens.clone(), attention.clone())?;
                let vl = cfg.critic.value_loss.loss(
                    v,
                    to_ad(v_old.clone()),
                    to_ad(ret.clone()),
                    &mask_ad,
                )?;
                let values = host(Tensor::cat(
                    vec![vl.loss.clone().inner(), vl.clip_frac.clone().inner()],
                    0,
                ))?;
                let grads = GradientsParams::from_grads(vl.loss.backward(), &model);
                let grads = match clip_grad_norm(&model, grads, cfg.max_grad_norm) {
                    Ok((grads, _)) if values[0].is_finite() => grads,
                    Ok(_) | Err(GoodhartError::NonFinite { .. }) => {
                        drop_batch(cfg.on_nan, step, "value loss or gradient", &mut skipped)?;
                        critic = Some((model, opt));
                        continue 'steps;
                    }
                    Err(e) => return Err(e),
                };
                add("critic/value_loss", values[0]);
                add("critic/clip_frac", values[1]);
                let model = opt.step(cfg.critic.lr, model, grads);
                timings.update += since::<B>(t0, device)?;
                critic = Some((model, opt));
            }
        }
        // 7. Metrics of the samples of this step, then the regularisers observe it.
        let mut rollout = RolloutBatch::new(batch.tokens.clone(), mask.clone(), groups.clone())?
            .with_reward(PROXY, batch.proxy.clone())?
            .with_reward(
                GOLD,
                Tensor::from_data(
                    TensorData::new(batch.gold.iter().map(|&x| x as f32).collect(), [n]),
                    device,
                ),
            )?
            .with_reward("train", batch.scores.train.clone())?
            .with_logp_ref(lr.clone())?;
        if cfg.reward_shaping.is_some() || cfg.length_penalty.is_some() || cfg.ctrl_u.is_some() {
            rollout = rollout.with_reward("shaped", batch.scores.reward.clone())?;
        }
        for (i, (name, values)) in task.monitors().iter().zip(&batch.monitors).enumerate() {
            if !task.monitor_is_reward(i) {
                continue;
            }
            let values = values.iter().map(|&x| x as f32).collect();
            rollout = rollout.with_reward(
                name,
                Tensor::from_data(TensorData::new(values, [n]), device),
            )?;
        }
        let mut metrics = batch_metrics(
            &rollout,
            &StepInputs {
                logp: Some(lp_old.clone()),
                entropy: Some(old.entropy.clone()),
                advantages: Some(adv.clone()),
                ensemble: (batch.members.dims()[0] > 1).then(|| batch.members.clone()),
            },
        )?;
        metrics
            .entry(goodhart_metrics::step::KEY_DISAGREEMENT.into())
            .or_insert(0.0);
        // Turn-level KL: the per-token KL to the reference over each turn index's policy
        // tokens (a turn index no episode reached is left out).
        if let Some(t) = &batch.turns {
            for k in 0..t.turn_mask.dims()[1] {
                let on_turn = mask.clone() * t.token_turn.clone().equal_elem(k as i64).float();
                if host(on_turn.clone().sum())?[0] == 0.0 {
                    continue;
                }
                let kl = goodhart_metrics::step::kl_to_ref(lp_old.clone(), lr.clone(), &on_turn)?;
                metrics.insert(format!("kl/ref/turn{k}"), kl.k1_token);
            }
        }
        for (k, v) in sums {
            metrics.insert(k, v / cfg.epochs as f64);
        }
        if cfg.on_nan == OnNan::SkipBatch {
            metrics.insert("nan/skipped".into(), skipped as f64);
        }
        if let Some((_, stats)) = &rollout_is {
            metrics.insert("rollout_is/mean".into(), stats[0]);
            metrics.insert("rollout_is/out_of_bounds".into(), stats[1]);
        }
        metrics.insert(
            "clip/frac".into(),
            metrics.get("clip/low").copied().unwrap_or(0.0)
                + metrics.get("clip/high").copied().unwrap_or(0.0),
        );
        let ill = batch.ill_formed.iter().filter(|&&x| x).count() as f64 / n as f64;
        metrics.insert("response/ill_formed".into(), ill);
        let truncated = batch.responses.iter().filter(|r| !ended(r)).count();
        metrics.insert("response/truncated".into(), truncated as f64 / n as f64);
        if cfg.dynamic_sampling.is_some() {
            metrics.insert("sampling/rollouts".into(), rollouts as f64);
            metrics.insert("sampling/spread_share".into(), spread_share);
        }
        let component_returns: Vec<f64> = batch
            .scores
            .components
            .iter()
            .map(|c| host(c.clone().mean()).map(|v| v[0]))
            .collect::<Result<_>>()?;
        for (c, v) in cfg.components.iter().zip(&component_returns) {
            metrics.insert(format!("reward/component/{}", c.name), *v);
        }
        if let Some(er) = effective_rank {
            metrics.insert(KEY_EFFECTIVE_RANK.into(), er);
        }
        if let Some(e) = &evaluation {
            insert_summary(&mut metrics, &format!("eval/{PROXY}"), &e.proxy)?;
            insert_summary(&mut metrics, &format!("eval/{GOLD}"), &e.gold)?;
            // A reward monitor's gap: the proxy's logged mean minus the monitor's.
            for (i, (name, values)) in task.monitors().iter().zip(&e.monitors).enumerate() {
                insert_summary(&mut metrics, &format!("eval/{name}"), values)?;
                if task.monitor_is_reward(i) {
                    let gap = metrics[&format!("eval/{PROXY}/mean")]
                        - metrics[&format!("eval/{name}/mean")];
                    metrics.insert(format!("eval/gap/{name}"), gap);
                }
            }
        }
        // The mean of the proxy minus each reward monitor's (their means are the
        // rollout's); the other monitors' summaries.
        for (i, name) in task.monitors().iter().enumerate() {
            if !task.monitor_is_reward(i) {
                insert_summary(&mut metrics, name, &batch.monitors[i])?;
                continue;
            }
            let get = |k: &str| metrics.get(k).copied().unwrap_or(f64::NAN);
            let gap =
                get(goodhart_metrics::step::KEY_PROXY_MEAN) - get(&format!("reward/{name}/mean"));
            metrics.insert(format!("gap/{name}"), gap);
        }
        // The proxy's own components, one row each.
        let proxy_parts = batch.parts.clone().map(host).transpose()?;
        if let Some(values) = &proxy_parts {
            for (name, row) in task.proxy_parts().iter().zip(values.chunks(n)) {
                metrics.insert(
                    format!("reward/proxy/{name}/mean"),
                    row.iter().sum::<f64>() / n as f64,
                );
            }
        }
        // What the rewards have cost so far (an LLM judge's requests, tokens, dollars).
        for (key, v) in task.reward_usage() {
            metrics.insert(format!("reward/usage/{key}"), v);
        }
        let stats = StepStats {
            kl: metrics.get("kl/ref/token").copied().unwrap_or(0.0),
            reward: metrics.get("reward/proxy/mean").copied().unwrap_or(0.0),
            n_samples: n as f64,
            component_returns: component_returns.clone(),
        };
        for r in regularizers.iter_mut() {
            r.observe(&stats)?;
            metrics.extend(r.metrics());
        }
        if let Some(c) = constrained.as_mut() {
            Regularizer::<B>::observe(c, &stats)?;
            metrics.extend(Regularizer::<B>::metrics(c));
        }
        // Samples.
        // Every per-sample number in one transfer: rows of an [R, N] tensor.
        let mut rows = vec![
            lp_old.clone().sum_dim(1).reshape([n]),
            (lp_old - lr).sum_dim(1).reshape([n]),
            (adv.clone() * mask.clone()).sum_dim(1).reshape([n]) / lengths_of(&mask).clamp_min(1.0),
            batch.proxy.clone(),
            batch.scores.reward.clone(),
            batch.scores.train.clone(),
        ];
        rows.extend(batch.scores.components.iter().cloned());
        let flat = host(Tensor::cat(rows, 0))?;
        let mut row = flat.chunks(n);
        let mut next = || row.next().map(<[f64]>::to_vec).unwrap_or_default();
        let (lp_seq, kl_seq, adv_h, proxy_h, reward_h, train_h) =
            (next(), next(), next(), next(), next(), next());
        let comps_h: Vec<Vec<f64>> = (0..batch.scores.components.len()).map(|_| next()).collect();
        let samples = (0..n)
            .map(|i| {
                let mut r = BTreeMap::from([
                    ("proxy".to_string(), proxy_h[i]),
                    ("gold".to_string(), batch.gold[i]),
                    ("reward".to_string(), reward_h[i]),
                    ("train".to_string(), train_h[i]),
                ]);
                for (c, v) in cfg.components.iter().zip(&comps_h) {
                    r.insert(format!("component/{}", c.name), v[i]);
                }
                if let Some(b) = &baseline {
                    r.insert("baseline".into(), b[i]);
                }
                for (name, values) in task.monitors().iter().zip(&batch.monitors) {
                    r.insert(name.clone(), values[i]);
                }
                if let Some(values) = &proxy_parts {
                    for (name, row) in task.proxy_parts().iter().zip(values.chunks(n)) {
                        r.insert(format!("proxy/{name}"), row[i]);
                    }
                }
                let tokens = batch.responses[i].clone();
                Sample {
                    step,
                    prompt: batch.prompts[i],
                    text: task.text(&tokens),
                    length: tokens.len(),
                    tokens,
                    rewards: r,
                    advantage: adv_h[i],
                    logprob: lp_seq[i],
                    kl: kl_seq[i],
                }
            })
            .collect();
        // The detectors read the step's line (a non-finite value as a missing one).
        let finite: BTreeMap<String, f64> = metrics
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let mut fired = Vec::new();
        for det in detectors.iter_mut() {
            if let Some(f) = det.update(step as u64, &finite)? {
                fired.push(f);
            }
            let name = det.name();
            if let Some(score) = det.score() {
                metrics.insert(format!("detector/{name}/score"), score);
            }
            let on = det.fired().is_some();
            metrics.insert(format!("detector/{name}/fired"), f64::from(u8::from(on)));
        }
        timings.total = since::<B>(t_step, device)?;
        log(&StepLine {
            step,
            metrics,
            samples,
            timings,
        })?;
        if fired.is_empty() {
            continue;
        }
        match cfg.on_alarm {
            OnAlarm::Log => {}
            OnAlarm::Stop => {
                stopped = true;
                break;
            }
            OnAlarm::Rollback => {
                stopped = true;
                let back = step.saturating_sub(cfg.rollback_steps);
                if let Some((_, p)) = recent.iter().find(|(s, _)| *s >= back) {
                    policy = p.clone();
                }
                break;
            }
            OnAlarm::RaiseKl => {
                for r in regularizers.iter_mut() {
                    for _ in &fired {
                        r.raise_coefficient(cfg.kl_raise);
                    }
                }
            }
        }
    }
    if !stopped && due(cfg.steps) {
        checkpoint(cfg.steps, &policy.valid())?;
    }
    Ok(policy)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_model::ProxyConfig;
    use crate::task::LanguageTask;
    use goodhart_core::device::{cpu, Autodiff, Dispatch};
    use goodhart_core::testing::test_device;
    use goodhart_envs::language::LanguageConfig;
    use goodhart_envs::language::PAD;
    use goodhart_policy::TransformerConfig;

    fn lang() -> Language {
        Language::new(LanguageConfig::default()).unwrap()
    }

    /// A small random policy and `k` random reward models.
    fn setup<B: AutodiffBackend>(
        lang: &Language,
        k: usize,
        device: &B::Device,
    ) -> (
        TransformerLm<B>,
        TransformerLm<B::InnerBackend>,
        Proxy<B::InnerBackend>,
    ) {
        let policy = seed::seeded::<B, _>(device, 11, "test", || {
            TransformerConfig::new(lang.vocab_size(), 16, 1, 2, 32).init::<B>(device)
        })
        .unwrap();
        let reference = policy.valid();
        let members = (0..k)
            .map(|i| {
                let rm = seed::seeded::<B::InnerBackend, _>(device, 12 + i as u64, "test", || {
                    ProxyConfig {
                        d_model: 16,
                        ..Default::default()
                    }
                    .model(lang)
                    .init::<B::InnerBackend>(device)
                })
                .unwrap();
                // Raw scores of a fresh head spread by ~0.01: standardise them to about
                // unit scale.
                rm.with_normalization(0.0, 0.01).unwrap()
            })
            .collect();
        let aggregation = if k == 1 {
            Aggregator::Mean
        } else {
            Aggregator::uwo_ppo()
        };
        (policy, reference, proxy(members, aggregation).unwrap())
    }

    fn small() -> RlConfig {
        RlConfig {
            steps: 2,
            prompts_per_step: 4,
            group_size: 4,
            max_new_tokens: 12,
            ..Default::default()
        }
    }

    /// `small()` with the `[rl]` keys of `toml` on top.
    fn rl(toml: &str) -> RlConfig {
        let mut base = toml::Table::try_from(small()).unwrap();
        for (k, v) in toml.parse::<toml::Table>().unwrap() {
            base.insert(k, v);
        }
        base.try_into().unwrap_or_else(|e| panic!("{toml}: {e}"))
    }

    type Cpu = Autodiff<Dispatch>;

    /// Runs `cfg` on the CPU against a proxy of `k` members; every step's line.
    fn run_cpu(cfg: &RlConfig, k: usize) -> Result<Vec<StepLine>> {
        run_cpu_trained(cfg, k).map(|(lines, _)| lines)
    }

    /// [`run_cpu`], also returning the trained policy.
    fn run_cpu_trained(cfg: &RlConfig, k: usize) -> Result<(Vec<StepLine>, TransformerLm<Cpu>)> {
        let device = cpu();
        let l = lang();
        let (policy, reference, proxy) = setup::<Cpu>(&l, k, &device);
        let mut out = Vec::new();
        let trained = train::<Cpu>(
            cfg,
            &LanguageTask::new(&l, &proxy, &LanguageGold::new(&l)),
            policy,
            &reference,
            5,
            &device,
            &mut |m| {
                out.push(m.clone());
                Ok(())
            },
        )?;
        Ok((out, trained))
    }

    /// [`run_cpu`] with one member, also returning the trained policy's embedding.
    fn run_cpu_policy(cfg: &RlConfig) -> (Vec<StepLine>, Vec<f32>) {
        let (lines, trained) = run_cpu_trained(cfg, 1).unwrap();
        let emb = trained
            .trunk
            .tok_emb
            .weight
            .val()
            .into_data()
            .convert::<f32>();
        (lines, emb.into_vec().unwrap())
    }

    /// A detector that fires at step 2: any change of the proxy mean after a 2-step
    /// warm-up is past its threshold.
    const AT_STEP_2: &str = "detectors = [{ kind = \"proxy-only\", warmup = 2, threshold = 1e-9, \
        patience = 1, signals = [{ key = \"reward/proxy/mean\", transform = \"level\", \
        direction = \"both\" }] }]";

    #[test]
    fn on_alarm_logs_stops_rolls_back_or_raises_the_kl() {
        let fired = |lines: &[StepLine]| -> Vec<f64> {
            lines
                .iter()
                .map(|l| l.get("detector/proxy-only/fired"))
                .collect()
        };
        // log: every step runs; the firing is logged from step 2 on, the score once the
        // warm-up is done.
        let (log, _) = run_cpu_policy(&rl(&format!("steps = 5\n{AT_STEP_2}")));
        assert_eq!(fired(&log), [0.0, 0.0, 1.0, 1.0, 1.0]);
        assert!(!log[1].metrics.contains_key("detector/proxy-only/score"));
        assert!(log[2].get("detector/proxy-only/score") >= 1e-9);
        // stop: training ends at the firing step, with the numbers of the run that logs.
        let (stop, stopped) =
            run_cpu_policy(&rl(&format!("steps = 5\non_alarm = \"stop\"\n{AT_STEP_2}")));
        assert_eq!(stop.len(), 3);
        for (a, b) in stop.iter().zip(&log) {
            assert_eq!(a.metrics, b.metrics);
        }
        let (_, three) = run_cpu_policy(&rl(&format!("steps = 3\n{AT_STEP_2}")));
        assert_eq!(stopped, three, "the policy after the firing step's update");
        // rollback: ends there too, returning the policy that began step 2 - 1 = 1 (the
        // one step 0's update made).
        let (back, rolled) = run_cpu_policy(&rl(&format!(
            "steps = 5\non_alarm = \"rollback\"\nrollback_steps = 1\n{AT_STEP_2}"
        )));
        assert_eq!(back.len(), 3);
        let (_, one) = run_cpu_policy(&rl(&format!("steps = 1\n{AT_STEP_2}")));
        assert_eq!(rolled, one);
        assert_ne!(rolled, stopped);
        // raise_kl: the coefficient is 10x from the step after the firing.
        let (raised, _) = run_cpu_policy(&rl(&format!(
            "steps = 4\non_alarm = \"raise_kl\"\nregularizers = [{{ kind = \"kl\", placement = \"loss\", controller = {{ kind = \"fixed\", coef = 0.01 }} }}]\n{AT_STEP_2}"
        )));
        let coef: Vec<f64> = raised.iter().map(|l| l.get("kl/coef")).collect();
        assert_eq!(&coef[..3], [0.01; 3]);
        assert!((coef[3] - 0.1).abs() < 1e-15, "{coef:?}");
    }

    #[test]
    fn alarm_settings_are_checked_before_a_run() {
        let err = |toml: &str| rl(toml).validate(1).unwrap_err().to_string();
        let e = err("on_alarm = \"stop\"");
        assert!(
            e.contains("rl.on_alarm") && e.contains("rl.detectors"),
            "{e}"
        );
        let e = err(&format!("on_alarm = \"raise_kl\"\n{AT_STEP_2}"));
        assert!(e.contains("rl.on_alarm") && e.contains("`kl`"), "{e}");
        let e = err(&AT_STEP_2.replace("reward/proxy/mean", "reward/proxy/mena"));
        assert!(
            e.contains("rl.detectors[0].signals[0].key") && e.contains("reward/proxy/mena"),
            "{e}"
        );
        let e = err(&AT_STEP_2.replace("threshold = 1e-9", "threshold = -1"));
        assert!(e.contains("rl.detectors[0].threshold"), "{e}");
        let twice = AT_STEP_2.replace("}] }]", "}] }, { kind = \"proxy-only\" }]");
        let e = err(&twice);
        assert!(e.contains("rl.detectors[1].kind"), "{e}");
        let e = err(&format!(
            "on_alarm = \"rollback\"\nrollback_steps = 0\n{AT_STEP_2}"
        ));
        assert!(e.contains("rl.rollback_steps"), "{e}");
        let e = err(&format!(
            "on_alarm = \"stop\"\nrollback_steps = 3\n{AT_STEP_2}"
        ));
        assert!(
            e.contains("rl.rollback_steps") && e.contains("\"rollback\""),
            "{e}"
        );
        let e = err(&format!("kl_raise = 2.0\n{AT_STEP_2}"));
        assert!(
            e.contains("rl.kl_raise") && e.contains("\"raise_kl\""),
            "{e}"
        );
    }

    #[test]
    fn a_detector_stops_a_run_on_the_evaluation_batch() {
        let on_eval = AT_STEP_2.replace("reward/proxy/mean", "eval/gold/mean");
        // Without the evaluation batch the key is not logged: refused, named.
        let e = rl(&on_eval).validate(1).unwrap_err().to_string();
        assert!(
            e.contains("rl.detectors[0]") && e.contains("eval/gold/mean"),
            "{e}"
        );
        let cfg = rl(&format!(
            "steps = 5\nlr = 1e-2\non_alarm = \"stop\"\neval = {{ samples = 8 }}\n{on_eval}"
        ));
        let lines = run_cpu(&cfg, 1).unwrap();
        // Any change of the evaluation gold after the warm-up fires at step 2; the run
        // stops there.
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].get("detector/proxy-only/fired"), 1.0);
        assert_ne!(
            lines[2].get("eval/gold/mean"),
            lines[1].get("eval/gold/mean")
        );
    }

    #[test]
    fn a_shift_detector_reads_the_advantages_skew_and_stops_the_run() {
        let shift = |key: &str| {
            format!(
                "detectors = [{{ kind = \"shift\", key = \"{key}\", direction = \"both\", \
                 warmup = 1, window = 1, threshold = 1e-9 }}]"
            )
        };
        // A misspelt key is refused before any work, named.
        let e = rl(&shift("advantage/skw"))
            .validate(1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rl.detectors[0].key") && e.contains("advantage/skw"),
            "{e}"
        );
        let cfg = rl(&format!(
            "steps = 4\nlr = 1e-2\non_alarm = \"stop\"\n{}",
            shift("advantage/skew")
        ));
        let lines = run_cpu(&cfg, 1).unwrap();
        // Step 0 is the baseline; at step 1 the skew has moved from it (by more than
        // 1e-9): the run stops there, its score the move over the threshold.
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].get("detector/shift/fired"), 1.0);
        let moved = (lines[1].get("advantage/skew") - lines[0].get("advantage/skew")).abs();
        assert!(moved > 1e-6, "{moved}");
        let score = lines[1].get("detector/shift/score");
        assert!(
            (score - moved / 1e-9).abs() <= 1e-9 * score,
            "{score} {moved}"
        );
    }

    #[test]
    fn a_logistic_detector_reads_every_rl_run_and_stops_once_its_features_are_defined() {
        // Its default features are signals every RL run logs.
        rl("detectors = [{ kind = \"logistic\" }]")
            .validate(1)
            .unwrap();
        let logistic = |key: &str| {
            format!(
                "detectors = [{{ kind = \"logistic\", features = [{{ key = \"{key}\", \
                 transform = \"change\", window = 3 }}], weights = [0.0], bias = 5.0, \
                 threshold = 0.5 }}]"
            )
        };
        // A misspelt key is refused before any work, named by its place.
        let e = rl(&logistic("kl/rf")).validate(1).unwrap_err().to_string();
        assert!(
            e.contains("rl.detectors[0].features[0].key") && e.contains("kl/rf"),
            "{e}"
        );
        let cfg = rl(&format!(
            "steps = 6\nlr = 1e-2\non_alarm = \"stop\"\n{}",
            logistic("kl/ref")
        ));
        let lines = run_cpu(&cfg, 1).unwrap();
        // p = sigmoid(5) > 0.5 from the first step with the change defined, the third
        // (its baseline is the mean of three): the run stops there.
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].get("detector/logistic/fired"), 1.0);
        let p = 1.0 / (1.0 + (-5f64).exp());
        let score = lines[2].get("detector/logistic/score");
        assert!((score - p / 0.5).abs() < 1e-9, "{score}");
    }

    /// The language's gold, but NaN for every response on call `nan_at` (a source that
    /// breaks the finite-values contract).
    struct FlakyGold<'a> {
        inner: LanguageGold<'a>,
        calls: std::cell::Cell<usize>,
        nan_at: usize,
    }

    impl<B: Backend> RewardSource<B> for FlakyGold<'_> {
        fn name(&self) -> &str {
            GOLD
        }

        fn score(&self, input: &Sequences<B>) -> Result<RewardOutput<B>> {
            let mut out = RewardSource::<B>::score(&self.inner, input)?;
            let call = self.calls.replace(self.calls.get() + 1);
            if call == self.nan_at {
                out.reward = out.reward * f32::NAN;
            }
            Ok(out)
        }
    }

    #[test]
    fn a_non_finite_reward_stops_the_run_or_drops_its_batch() {
        let device = cpu();
        let l = lang();
        let run = |on_nan: OnNan| {
            let (policy, reference, proxy) = setup::<Cpu>(&l, 1, &device);
            let gold = FlakyGold {
                inner: LanguageGold::new(&l),
                calls: Default::default(),
                nan_at: 1,
            };
            let cfg = RlConfig {
                steps: 3,
                on_nan,
                ..small()
            };
            let mut lines = Vec::new();
            train::<Cpu>(
                &cfg,
                &LanguageTask::new(&l, &proxy, &gold),
                policy,
                &reference,
                5,
                &device,
                &mut |m| {
                    lines.push(m.clone());
                    Ok(())
                },
            )
            .map(|_| lines)
        };
        let err = run(OnNan::Error).unwrap_err().to_string();
        assert!(
            err.contains("gold reward at rl step 1") && err.contains("--on-nan skip-batch"),
            "{err}"
        );
        // Skipping: step 1 has no line and no update; the next line counts it.
        let lines = run(OnNan::SkipBatch).unwrap();
        let steps: Vec<usize> = lines.iter().map(|l| l.step).collect();
        assert_eq!(steps, [0, 2]);
        assert_eq!(lines[0].get("nan/skipped"), 0.0);
        assert_eq!(lines[1].get("nan/skipped"), 1.0);
        assert!(lines[1].get("loss").is_finite());
        // Without a fault, skip-batch changes nothing but the added count.
        let clean = run_cpu(
            &RlConfig {
                steps: 3,
                ..small()
            },
            1,
        )
        .unwrap();
        let quiet = run_cpu(
            &RlConfig {
                steps: 3,
                on_nan: OnNan::SkipBatch,
                ..small()
            },
            1,
        )
        .unwrap();
        for (a, b) in clean.iter().zip(&quiet) {
            let mut b = b.metrics.clone();
            assert_eq!(b.remove("nan/skipped"), Some(0.0));
            assert_eq!(a.metrics, b);
        }
    }

    #[test]
    fn gold_of_generated_responses() {
        let l = lang();
        let p = l.prompt(1);
        let w = l.word_token(0);
        // Words then EOS then padding: the padding is ignored.
        let (g, ill) = gold_reward(&l, &p, &[w, EOS, PAD, PAD]).unwrap();
        assert_eq!((g, ill), (l.gold(&p, &[w, EOS]).unwrap(), false));
        // No EOS within max_new_tokens: every token is a word.
        assert_eq!(
            gold_reward(&l, &p, &[w, w]).unwrap(),
            (l.gold(&p, &[w, w, EOS]).unwrap(), false)
        );
        // A special token mid-response ends it there and marks it ill-formed.
        let (g, ill) = gold_reward(&l, &p, &[w, SEP_TOKEN, w, EOS]).unwrap();
        assert_eq!((g, ill), (l.gold(&p, &[w, EOS]).unwrap(), true));
        assert!(gold_reward(&l, &[1, 2], &[w]).is_err());
    }
    const SEP_TOKEN: u32 = goodhart_envs::language::SEP;

    /// The key path a rejected config names.
    fn rejected(toml: &str, members: usize) -> String {
        let cfg: RlConfig = match toml::from_str(toml) {
            Ok(c) => c,
            Err(e) => return format!("parse: {e}"),
        };
        match cfg.validate(members) {
            Err(GoodhartError::InvalidArgument { name, .. }) => name,
            other => panic!("{toml}: expected a typed error, got {other:?}"),
        }
    }

    #[test]
    fn bad_configs_name_their_key() {
        for (toml, members, key) in [
            ("steps = 0", 1, "rl.steps"),
            ("group_size = 0", 1, "rl.group_size"),
            ("lr = nan", 1, "rl.lr"),
            ("temperature = 0.0", 1, "rl.temperature"),
            ("critic = { lr = -1.0 }", 1, "rl.critic.lr"),
            ("loss = { kind = \"ppo_clip\", eps_low = 2.0 }", 1, "rl.loss.eps_low"),
            ("advantage = { kind = \"gra\" }", 1, "rl.advantage.kind"),
            ("advantage = { kind = \"a2tgpo\" }", 1, "rl.advantage.kind"),
            ("advantage = { kind = \"igpo\" }", 1, "rl.advantage.kind"),
            ("advantage = { kind = \"verpo\" }", 1, "rl.advantage.kind"),
            ("advantage = { kind = \"gdpo\" }", 1, "rl.components"),
            (
                "advantage = { kind = \"gdpo\", weights = [1.0] }\ncomponents = [{ name = \"proxy\" }, { name = \"length\" }]",
                1,
                "rl.advantage.weights",
            ),
            ("advantage = { kind = \"bnpo\" }", 1, "rl.advantage.kind"),
            (
                "advantage = { kind = \"bnpo\" }\nreward_shaping = { kind = \"par\" }\nregularizers = [{ kind = \"kl\", placement = \"reward\" }]",
                1,
                "rl.advantage.kind",
            ),
            ("components = [{ name = \"member1\" }]", 1, "rl.components[0].name"),
            ("components = [{ name = \"proxy\", weight = inf }]", 1, "rl.components[0].weight"),
            ("ctrl_u = {}", 1, "rl.ctrl_u"),
            ("regularizers = [{ kind = \"chi2_occupancy\", obs_dim = 2, num_actions = 2 }]", 1, "rl.regularizers[0].kind"),
            ("regularizers = [{ kind = \"action_kl\" }]", 1, "rl.regularizers[0].kind"),
            ("regularizers = [{ kind = \"gardo\" }]", 1, "rl.regularizers[0]"),
            ("regularizers = [{ kind = \"constrained\", constraints = [{ threshold = 0.5 }] }]", 1, "rl.regularizers[0].constraints"),
            ("regularizers = [{ kind = \"entropy\", coef = -1.0 }]", 1, "rl.regularizers[0].coef"),
            ("reward_shaping = { kind = \"par\", m = 0 }", 1, "rl.reward_shaping.m"),
            ("dynamic_sampling = { max_batches = 0 }", 1, "rl.dynamic_sampling.max_batches"),
            ("eval = { samples = 0 }", 1, "rl.eval.samples"),
            ("eval = { samples = 65537 }", 1, "rl.eval.samples"),
            ("eval = { samples = 64, every = 0 }", 1, "rl.eval.every"),
        ] {
            assert_eq!(rejected(toml, members), key, "{toml}");
        }
        // Unknown keys and names fail to parse.
        for toml in [
            "step = 3",
            "clip = 0.2",
            "loss = { kind = \"ppo\" }",
            "aggregation = \"mean\"",
            "sample_filter = \"neg\"",
            "eval = { every = 2 }",
            "eval = { samples = 64, batch = 8 }",
        ] {
            assert!(toml::from_str::<RlConfig>(toml).is_err(), "{toml}");
        }
        // What the refusals ask for is accepted.
        let ok: RlConfig =
            toml::from_str("advantage = { kind = \"bnpo\" }\nreward_shaping = { kind = \"par\" }")
                .unwrap();
        ok.validate(1).unwrap();
        let ok: RlConfig = toml::from_str("ctrl_u = { beta = 0.5 }").unwrap();
        ok.validate(3).unwrap();
        let agg: RlConfig =
            toml::from_str("aggregation = \"seq-mean-token-sum\"\nloss = { kind = \"cispo\" }")
                .unwrap();
        match agg.policy_loss().unwrap() {
            PolicyLossConfig::Cispo(c) => {
                assert_eq!(c.aggregation, LossAggregation::SeqMeanTokenSum)
            }
            other => panic!("{other:?}"),
        }
        // GMPO is a mean over sequences: an aggregation for it is refused by key.
        let geo: RlConfig =
            toml::from_str("aggregation = \"token-mean\"\nloss = { kind = \"geo_mean\" }").unwrap();
        let err = geo.validate(1).unwrap_err().to_string();
        assert!(
            err.contains("rl.aggregation") && err.contains("geo_mean"),
            "{err}"
        );
        let bad: RlConfig = toml::from_str("loss_scale_factor = 0.0").unwrap();
        assert!(bad
            .validate(1)
            .unwrap_err()
            .to_string()
            .contains("loss_scale_factor"));
        let bad: RlConfig = toml::from_str("rollout_is = { threshold = -1.0 }").unwrap();
        assert!(bad
            .validate(1)
            .unwrap_err()
            .to_string()
            .contains("rl.rollout_is.threshold"));
        assert!(toml::from_str::<RlConfig>("empty_rows = \"drop\"").is_err());
        assert!(proxy::<Dispatch>(vec![], Aggregator::Mean).is_err());
    }

    /// The aggregators of an ensemble proxy each run (the proxy is built by the
    /// experiment; the trainer reads its aggregated score).
    #[test]
    fn every_aggregator_runs() {
        let device = cpu();
        let l = lang();
        let (policy, reference, proxy) = setup::<Cpu>(&l, 3, &device);
        for a in ["mean", "median", "worst_case", "uwo"] {
            let agg: Aggregator =
                toml::from_str::<toml::Table>(&format!("a = {{ kind = \"{a}\" }}")).unwrap()["a"]
                    .clone()
                    .try_into()
                    .unwrap();
            let p = super::proxy(proxy.members().to_vec(), agg).unwrap();
            let mut lines = Vec::new();
            train::<Cpu>(
                &RlConfig {
                    steps: 3,
                    ..small()
                },
                &LanguageTask::new(&l, &p, &LanguageGold::new(&l)),
                policy.clone(),
                &reference,
                5,
                &device,
                &mut |m| {
                    lines.push(m.clone());
                    Ok(())
                },
            )
            .unwrap();
            assert!(
                lines
                    .iter()
                    .all(|m| m.get("loss").is_finite()
                        && m.get("reward/ensemble/disagreement") > 0.0),
                "{a}"
            );
        }
    }

    #[test]
    fn samples_hold_every_reward_and_match_the_step_means() {
        let cfg = rl("reward_shaping = { kind = \"par\", m = 2 }\ncomponents = [{ name = \"proxy\" }, { name = \"length\", weight = -0.1 }]");
        let lines = run_cpu(&cfg, 1).unwrap();
        for line in &lines {
            assert_eq!(line.samples.len(), 16);
            let mean = |k: &str| line.samples.iter().map(|s| s.rewards[k]).sum::<f64>() / 16.0;
            for (sample_key, step_key) in [
                ("proxy", "reward/proxy/mean"),
                ("gold", "reward/gold/mean"),
                ("train", "reward/train/mean"),
                ("reward", "reward/shaped/mean"),
            ] {
                let (a, b) = (mean(sample_key), line.get(step_key));
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{sample_key}: {a} vs {step_key} {b}"
                );
            }
            let len = line.samples.iter().map(|s| s.length as f64).sum::<f64>() / 16.0;
            assert!((len - line.get("length/mean")).abs() < 1e-9);
            let kl = line.samples.iter().map(|s| s.kl).sum::<f64>() / 16.0;
            assert!(
                (kl - line.get("kl/ref")).abs() < 1e-4,
                "{kl} vs {}",
                line.get("kl/ref")
            );
            for s in &line.samples {
                // train = proxy' - 0.1 L, the weighted components.
                let t = s.rewards["component/proxy"] - 0.1 * s.rewards["component/length"];
                assert!((s.rewards["train"] - t).abs() < 1e-5);
                assert_eq!(s.rewards["component/length"], s.length as f64);
                assert_eq!(s.text.split(' ').count(), s.tokens.len());
                assert!(s.tokens.len() == 12 || s.text.ends_with("<eos>"));
            }
        }
        // The policy starts at the reference: KL 0 (up to rounding) and no clipping.
        assert!(lines[0].get("kl/ref").abs() < 1e-4);
        assert_eq!(lines[0].get("clip/frac"), 0.0);
    }

    #[test]
    fn the_evaluation_batch_is_measured_apart_from_training() {
        let plain = rl("steps = 3");
        // 40 rows: chunks of the training batch's 16, 16 and 8.
        let with = rl("steps = 3\neval = { samples = 40, every = 2 }");
        let (a, b) = (run_cpu(&plain, 1).unwrap(), run_cpu(&with, 1).unwrap());
        let keys = with.logged_keys();
        for (x, y) in a.iter().zip(&b) {
            // Training is the same, draw for draw.
            let trained: BTreeMap<_, _> = y
                .metrics
                .iter()
                .filter(|(k, _)| !k.starts_with("eval/"))
                .collect();
            assert_eq!(trained, x.metrics.iter().collect::<BTreeMap<_, _>>());
            assert_eq!(
                x.samples.iter().map(|s| &s.tokens).collect::<Vec<_>>(),
                y.samples.iter().map(|s| &s.tokens).collect::<Vec<_>>()
            );
            // Steps 0 and 2 evaluate, step 1 does not; the keys are the config's.
            let logged: Vec<&String> = y
                .metrics
                .keys()
                .filter(|k| k.starts_with("eval/"))
                .collect();
            assert_eq!(
                logged.len(),
                if y.step == 1 { 0 } else { 8 },
                "step {}",
                y.step
            );
            assert!(logged.iter().all(|k| keys.accepts(k)));
        }
        // Step 0's policy is the reference: its evaluation is the reference's 40 responses
        // to prompts 0, 1, ... in turn, drawn from `pg/eval` in chunks of 16.
        let device = cpu();
        let l = lang();
        let (_, reference, proxy) = setup::<Cpu>(&l, 1, &device);
        let gold = LanguageGold::new(&l);
        let task = LanguageTask::new(&l, &proxy, &gold);
        let prompts: Vec<usize> = (0..40)
            .map(|i| i % Task::<Dispatch>::prompts(&task))
            .collect();
        let generation = GenerationConfig::new(12)
            .with_eos_id(Some(goodhart_envs::language::EOS as usize))
            .with_pad_id(PAD as usize);
        let mut rng = seed::rng(5, "pg/eval");
        let mut golds = Vec::new();
        for rows in prompts.chunks(16) {
            golds.extend(
                sample_task(&reference, &task, rows, &generation, &mut rng, &device)
                    .unwrap()
                    .gold,
            );
        }
        let s = goodhart_metrics::stats::summary(&golds).unwrap();
        assert_eq!(b[0].get("eval/gold/mean"), s.mean);
        assert_eq!(b[0].get("eval/gold/max"), s.max);
        // Common random numbers: a policy that does not move evaluates to the same numbers.
        let still = rl("steps = 3\nlr = 1e-30\neval = { samples = 40, every = 2 }");
        let c = run_cpu(&still, 1).unwrap();
        assert_eq!(c[0].get("eval/gold/mean"), s.mean);
        for k in ["eval/gold/mean", "eval/gold/std", "eval/proxy/mean"] {
            assert_eq!(c[2].get(k), c[0].get(k), "{k}");
        }
        // While two training batches of that policy differ in their draws.
        assert_ne!(c[2].get("reward/gold/mean"), c[0].get("reward/gold/mean"));
    }

    #[test]
    fn remax_subtracts_the_greedy_responses_reward() {
        let device = cpu();
        let l = lang();
        let (policy, reference, proxy) = setup::<Cpu>(&l, 1, &device);
        let cfg = RlConfig {
            steps: 1,
            ..rl("advantage = { kind = \"remax\" }")
        };
        let mut lines = Vec::new();
        train::<Cpu>(
            &cfg,
            &LanguageTask::new(&l, &proxy, &LanguageGold::new(&l)),
            policy,
            &reference,
            5,
            &device,
            &mut |m| {
                lines.push(m.clone());
                Ok(())
            },
        )
        .unwrap();
        // At step 0 the policy is the reference: its greedy response to each prompt,
        // scored by the proxy, is the baseline of every response to that prompt.
        let samples = &lines[0].samples;
        let topics: Vec<usize> = samples.iter().step_by(4).map(|s| s.prompt).collect();
        let greedy = GenerationConfig::new(12)
            .with_eos_id(Some(EOS as usize))
            .with_pad_id(PAD as usize)
            .with_greedy(true);
        let s = sample_and_score(
            &reference,
            &LanguageTask::new(&l, &proxy, &LanguageGold::new(&l)),
            &topics,
            &greedy,
            &mut seed::rng(0, "x"),
            &device,
        )
        .unwrap();
        let b = host(s.proxy).unwrap();
        for (i, sample) in samples.iter().enumerate() {
            assert!(
                (sample.rewards["baseline"] - b[i / 4]).abs() < 1e-5,
                "row {i}"
            );
            // No KL: every token's advantage is r - b (to f32 rounding: |r - b| is ~60).
            let a = sample.rewards["train"] - sample.rewards["baseline"];
            assert!(
                (sample.advantage - a).abs() < 1e-6 * a.abs().max(10.0),
                "row {i}: {} vs {a}",
                sample.advantage
            );
        }
    }

    #[test]
    fn gdpo_normalises_each_component_in_its_group() {
        let cfg = RlConfig {
            steps: 1,
            ..rl("advantage = { kind = \"gdpo\" }\ncomponents = [{ name = \"proxy\", weight = 1.0 }, { name = \"length\", weight = 0.5 }]")
        };
        let lines = run_cpu(&cfg, 1).unwrap();
        let samples = &lines[0].samples;
        // By hand: z-score each component in its group of 4 (unbiased std, eps 1e-4),
        // weighted sum, z-score over the batch.
        let z = |xs: &[f64]| -> Vec<f64> {
            let m = xs.iter().sum::<f64>() / xs.len() as f64;
            let sd =
                (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() as f64 - 1.0)).sqrt();
            xs.iter().map(|x| (x - m) / (sd + 1e-4)).collect()
        };
        let col = |k: &str| -> Vec<f64> {
            samples
                .chunks(4)
                .flat_map(|g| z(&g.iter().map(|s| s.rewards[k]).collect::<Vec<_>>()))
                .collect()
        };
        let (a, b) = (col("component/proxy"), col("component/length"));
        let s: Vec<f64> = a.iter().zip(&b).map(|(x, y)| x + 0.5 * y).collect();
        let want = z(&s);
        for (sample, w) in samples.iter().zip(&want) {
            assert!(
                (sample.advantage - w).abs() < 1e-3,
                "{} vs {w}",
                sample.advantage
            );
        }
    }

    #[test]
    fn gae_trains_its_value_head() {
        let cfg = RlConfig {
            steps: 12,
            lr: 1e-6,
            critic: CriticConfig { lr: 1e-2, ..Default::default() },
            // The random proxy's scores reach +-30: scaled to about unit size, so the value
            // clip (0.5 per step) does not bound the fit.
            ..rl("advantage = { kind = \"gae\" }\ncomponents = [{ name = \"proxy\", weight = 0.05 }]")
        };
        let lines = run_cpu(&cfg, 1).unwrap();
        let v: Vec<f64> = lines.iter().map(|l| l.get("critic/value_loss")).collect();
        let (first, last) = ((v[0] + v[1] + v[2]) / 3.0, (v[9] + v[10] + v[11]) / 3.0);
        assert!(last < 0.5 * first, "value loss {first} -> {last}: {v:?}");
    }

    #[test]
    fn dynamic_sampling_keeps_groups_with_spread() {
        // A constant reward (length weight 0 on the proxy) has no spread in any group:
        // every rollout is drawn and the batch filled with dropped groups.
        let flat = rl("dynamic_sampling = { max_batches = 3 }\ncomponents = [{ name = \"proxy\", weight = 0.0 }]");
        let lines = run_cpu(&flat, 1).unwrap();
        assert!(lines
            .iter()
            .all(|l| l.get("sampling/rollouts") == 3.0 && l.get("sampling/spread_share") == 0.0));
        assert!(lines.iter().all(|l| l.samples.len() == 16));
        // Continuous proxy rewards always spread: one rollout suffices.
        let lines = run_cpu(&rl("dynamic_sampling = {}"), 1).unwrap();
        assert!(lines
            .iter()
            .all(|l| l.get("sampling/rollouts") == 1.0 && l.get("sampling/spread_share") == 1.0));
        let train = Tensor::<Dispatch, 1>::from_floats([1.0, 1.0, 0.0, 1.0, 2.0, 2.0], &cpu());
        assert_eq!(
            groups_with_spread(train, &Groups::contiguous(3, 2).unwrap()).unwrap(),
            [false, true, false]
        );
    }

    #[test]
    fn checkpoints_are_seen_at_their_steps_and_change_nothing() {
        // 5 steps, a checkpoint every 2: the policies after 0, 2 and 4 steps (not 5), and
        // the same step lines as a run without the callback. The policy at checkpoint s
        // samples step s: its greedy response to a prompt is the one the trainer's own
        // copy gives, and it differs from the initial policy's after training.
        let cfg = RlConfig {
            steps: 5,
            ..small()
        };
        let device = cpu();
        let l = lang();
        let (policy, reference, proxy) = setup::<Cpu>(&l, 1, &device);
        let gold = LanguageGold::new(&l);
        let task = LanguageTask::new(&l, &proxy, &gold);
        let mut lines = Vec::new();
        let mut seen = Vec::new();
        train_with_checkpoints::<Cpu>(
            &cfg,
            &task,
            policy,
            &reference,
            5,
            &device,
            &mut |m| {
                lines.push(m.clone());
                Ok(())
            },
            2,
            &mut |s, p| {
                seen.push((s, p.trunk.tok_emb.weight.val().into_data().convert::<f32>()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 2, 4]);
        let plain = run_cpu(&cfg, 1).unwrap();
        let numbers = |v: &[StepLine]| {
            v.iter()
                .map(|l| (l.metrics.clone(), l.samples.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(numbers(&lines), numbers(&plain));
        let initial = reference
            .trunk
            .tok_emb
            .weight
            .val()
            .into_data()
            .convert::<f32>();
        assert_eq!(seen[0].1, initial);
        assert_ne!(seen[2].1, initial);
        // Every 5: the initial and the final policy.
        let mut at = Vec::new();
        let fin = train_with_checkpoints::<Cpu>(
            &cfg,
            &task,
            setup::<Cpu>(&l, 1, &device).0,
            &reference,
            5,
            &device,
            &mut |_| Ok(()),
            5,
            &mut |s, p| {
                at.push((s, p.trunk.tok_emb.weight.val().into_data().convert::<f32>()));
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(at.iter().map(|s| s.0).collect::<Vec<_>>(), [0, 5]);
        let last = fin.trunk.tok_emb.weight.val().into_data().convert::<f32>();
        assert_eq!(at[1].1, last);
        // An error from the callback stops the run.
        assert!(train_with_checkpoints::<Cpu>(
            &cfg,
            &task,
            setup::<Cpu>(&l, 1, &device).0,
            &reference,
            5,
            &device,
            &mut |_| Ok(()),
            1,
            &mut |s, _| if s == 1 {
                Err(GoodhartError::invalid("eval", "disk full"))
            } else {
                Ok(())
            },
        )
        .is_err());
    }

    #[test]
    fn logged_keys_are_the_keys_a_run_logs() {
        // What validation accepts for detectors is what the trainer writes, both ways.
        let cfg = rl("advantage = { kind = \"gae\" }\nreward_shaping = { kind = \"meanstd\" }\ndynamic_sampling = {}\ncomponents = [{ name = \"proxy\" }, { name = \"length\", weight = -0.1 }]\nregularizers = [{ kind = \"kl\", placement = \"loss\" }, { kind = \"entropy\", coef = 0.01 }]");
        let lines = run_cpu(&cfg, 1).unwrap();
        let logged = cfg.logged_keys();
        for l in &lines {
            for k in l.metrics.keys() {
                assert!(logged.accepts(k), "{k} is logged but not in logged_keys");
            }
        }
        for k in &logged.keys {
            assert!(
                lines.iter().any(|l| l.metrics.contains_key(k)),
                "{k} is in logged_keys but never logged"
            );
        }
    }

    goodhart_core::backend_test! {
        fn effective_rank_reads_the_states_that_generated_each_response<B>(device) {
            let policy = TransformerConfig::new(16, 16, 1, 2, 32).init::<B>(device).unwrap();
            // Prompt [1 2], response of 3 tokens; the state at t - 1 generates token t.
            let er = |rows: [[i64; 5]; 2]| {
                let tokens = Tensor::<B, 2, Int>::from_ints(rows, device);
                let attention = Tensor::<B, 2>::ones([2, 5], device);
                let response = Tensor::<B, 2>::from_floats([[0.0, 0.0, 1.0, 1.0, 1.0]; 2], device);
                response_effective_rank(&policy, &tokens, &attention, &response).unwrap()
            };
            // Responses that differ in their first token: the states generating the second
            // and third differ, two distinct pooled rows, a centred matrix of rank 1.
            assert!((er([[1, 2, 3, 4, 5], [1, 2, 6, 4, 5]]) - 1.0).abs() < 1e-6);
            // Responses that differ only in their last token: no state reads it, the pooled
            // rows are equal, no spread.
            assert_eq!(er([[1, 2, 3, 4, 5], [1, 2, 3, 4, 9]]), 0.0);
            let one = Tensor::<B, 2, Int>::from_ints([[1]], device);
            assert!(response_effective_rank(&policy, &one, &Tensor::ones([1, 1], device), &Tensor::zeros([1, 1], device)).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn runs_are_deterministic_and_validate_lengths<B>(device) {
            type A<B> = Autodiff<B>;
            let l = lang();
            let (policy, reference, proxy) = setup::<A<B>>(&l, 1, device);
            let run = |cfg: &RlConfig| {
                let mut out = Vec::new();
                train::<A<B>>(cfg, &LanguageTask::new(&l, &proxy, &LanguageGold::new(&l)), policy.clone(), &reference, 5, device, &mut |m| {
                    out.push(m.clone());
                    Ok(())
                })
                .map(|_| out)
            };
            let a = run(&small()).unwrap();
            let b = run(&small()).unwrap();
            assert_eq!(a.len(), 2);
            // Same seed, same numbers.
            let numbers = |v: &[StepLine]| v.iter().map(|l| (l.metrics.clone(), l.samples.clone())).collect::<Vec<_>>();
            assert_eq!(numbers(&a), numbers(&b));
            assert!(a.iter().all(|l| l.timings.total > 0.0 && l.timings.sample > 0.0 && l.timings.overhead() < l.timings.total));
            assert!(a[0].get("length/mean") >= 1.0 && a[0].get("length/mean") <= 12.0);
            // Too long for the 32-token models.
            let long = RlConfig { max_new_tokens: 30, ..small() };
            assert!(matches!(run(&long), Err(GoodhartError::InvalidArgument { name, .. }) if name == "rl.max_new_tokens"));
            // An error from the log callback stops the run.
            let mut calls = 0;
            let r = train::<A<B>>(&small(), &LanguageTask::new(&l, &proxy, &LanguageGold::new(&l)), policy.clone(), &reference, 5, device, &mut |_| {
                calls += 1;
                Err(GoodhartError::invalid("log", "disk full"))
            });
            assert!(r.is_err());
            assert_eq!(calls, 1);
            // Regularisers and shaping together, two epochs.
            let all = RlConfig { epochs: 2, ..rl("reward_shaping = { kind = \"par\", m = 2 }\nregularizers = [{ kind = \"kl\", estimator = \"k1\", placement = \"reward\", controller = { kind = \"fixed\", coef = 0.05 } }, { kind = \"sequence_chi2\", coef = 0.01 }]") };
            let m = run(&all).unwrap();
            assert!(m.iter().all(|s| s.get("loss").is_finite() && s.get("reward/train/mean") > 0.0 && s.get("reward/train/mean") < 1.0), "{m:?}");
            assert!(m.iter().all(|s| s.get("kl/coef") == 0.05 && s.get("loss/sequence_chi2").is_finite()));
        }
    }

    goodhart_core::backend_test! {
        fn rl_raises_the_proxy<B>(device) {
            // CPU only: dozens of optimiser steps are slow on lavapipe.
            if test_device() != goodhart_core::device::DeviceSpec::Cpu {
                return;
            }
            type A<B> = Autodiff<B>;
            let l = lang();
            let (policy, reference, proxy) = setup::<A<B>>(&l, 1, device);
            let cfg = RlConfig { steps: 20, prompts_per_step: 8, group_size: 8, lr: 1e-2, max_new_tokens: 12, ..Default::default() };
            let mut m = Vec::new();
            train::<A<B>>(&cfg, &LanguageTask::new(&l, &proxy, &LanguageGold::new(&l)), policy, &reference, 1, device, &mut |s| {
                m.push(s.clone());
                Ok(())
            })
            .unwrap();
            let p = |i: usize| m[i].get("reward/proxy/mean");
            let first = (p(0) + p(1) + p(2)) / 3.0;
            let last = (p(17) + p(18) + p(19)) / 3.0;
            eprintln!("proxy {first:.3} -> {last:.3}; kl {:.3}", m[19].get("kl/ref"));
            // Measured on ndarray: 1.8 -> 12.0 (raw +0.10).
            assert!(last > first + 5.0, "proxy {first} -> {last}");
            assert!(m[19].get("kl/ref") > 0.0);
        }
    }
}
