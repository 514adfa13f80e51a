//! Critic-free RL for language models against a proxy reward, with any goodhart-advantage
//! estimator (GRPO, RLOO, REINFORCE++, BNPO, Dr.GRPO, ...) picked by name, the PPO-clip
//! surrogate, and the regularisers and shaping of the overoptimisation literature. The
//! gold reward of every sample is measured and logged; it never enters training.
//!
//! One step (DESIGN.md, "Data flow of one RL step"):
//!
//! ```text
//! 1. prompts: P topics drawn uniformly (stream "pg/prompts"), each repeated G times
//!    (group = prompt), N = P G rows [BOS, topic, SEP];
//! 2. rollout: y ~ pi_theta(. | x) at temperature tau (stream "pg/sample", KV cache);
//!    lp_old, entropy = score(pi_theta), lr = score(pi_init) at tau (teacher-forced);
//! 3. rewards: r = proxy(x, y) (one RM, or an ensemble aggregated by mean / UWO / ...);
//!    gold g(x, y) logged; r' = shaping(r) (PAR etc., against M reference responses per
//!    prompt sampled once from pi_init);
//!    KL in reward:  r'_t = r' 1[t = last] - beta kl_t,  kl_t = k1 | k3 of (lp_old - lr);
//! 4. advantages A = estimator(r', groups)  (GRPO by default: (r - mu_g)/(sigma_g + eps));
//! 5. `epochs` passes over the batch:
//!      L = PPO-clip(lp, lp_old, A; eps) [token-mean, dual-clip c = 3: verl's defaults]
//!        + beta agg(kl_t(lp, lr))            (KL in loss, GRPO-style)
//!        + coef sqrt(max(chi2_seq, 1e-4))    (ORPO's sequence-level chi-squared)
//!    AdamW step (PyTorch betas, eps 1e-8, no weight decay, grad-norm clip 1.0).
//! ```
//!
//! Sources: Schulman et al. 2017 (PPO); Shao et al. 2024 (GRPO); Ziegler et al. 2019 and
//! verl (`use_kl_in_reward` / `use_kl_loss`, k1/k3 estimators); Laidlaw et al. 2024
//! (ORPO, sequence chi-squared); Fu et al. 2025 (PAR); Coste et al. 2024 (UWO ensembles);
//! Gao, Schulman & Hilton 2022 (`d = sqrt(KL(pi || pi_init))`, what [`StepMetrics`]
//! reports so gold can be fitted against it).
//!
//! A response is the generated tokens up to and including `EOS` (or `max_new_tokens`
//! tokens). Gold is defined on words; a response that emits a non-word token (a special
//! or topic token) before `EOS` is *ill-formed*: its gold is that of the words before the
//! offending token (see [`gold_reward`]), and the fraction of such responses is logged
//! (`response/ill_formed`).

use burn::{
    module::AutodiffModule,
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        Int, Tensor, TensorData,
    },
};
use goodhart_advantage::{AdvantageConfig, AdvantageInput};
use goodhart_core::{
    aggregate::LossAggregation,
    groups::Groups,
    ops::{masked_mean, zero_masked},
    params::clip_grad_norm,
    seed, GoodhartError, Result,
};
use goodhart_envs::language::{Language, EOS, PAD};
use goodhart_objective::{policy::PolicyInputs, ppo_clip::PpoClipConfig};
use goodhart_policy::{generate, score, Generation, GenerationConfig, TransformerLm};
use goodhart_regularize::{
    kl::{kl_in_loss, kl_per_token, KlEstimator, KlPlacement},
    sequence_chi2::{sequence_chi2_loss, RHO_CLIP},
};
use goodhart_reward::{
    ensemble::member_variance, shaping::Shaper, Aggregator, RewardModel, ShapingConfig,
};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::sft::PROMPT_LEN;

/// A KL penalty to the initial policy (TOML `[pg.kl]`).
///
/// Per token `kl_t` from `d = lp - lr` with Schulman's `k1 = d` or `k3 = exp(-d) + d - 1`
/// (verl's clamps), placed in the reward (`r_t - coef kl_t`, PPO-RLHF, verl
/// `use_kl_in_reward`, on the sampling policy's log-probs) or in the loss
/// (`coef * token-mean(kl_t)` on the current log-probs, GRPO, verl `use_kl_loss`).
/// Defaults: coef 0.05 (goodhart's choice for the lab), k1 in the reward (verl's
/// `kl_penalty = "kl"` with `use_kl_in_reward`; Gao et al. and Ziegler et al. penalise in
/// the reward). In the reward use k1: with a score-function gradient its expectation is
/// the gradient of `KL(pi || pi_ref)`, while k3 as a reward is not (measured here: k3 in
/// the reward at 0.2 ended at a *larger* KL than at 0.05). k3 belongs in the loss (verl's
/// `kl_loss_type = "low_var_kl"`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KlConfig {
    /// Coefficient `beta >= 0`.
    pub coef: f64,
    /// `k1`, `k3` (or any other goodhart-regularize estimator name).
    pub estimator: KlEstimator,
    /// `reward` or `loss`.
    pub placement: KlPlacement,
}

impl Default for KlConfig {
    fn default() -> Self {
        Self {
            coef: 0.05,
            estimator: KlEstimator::K1,
            placement: KlPlacement::Reward,
        }
    }
}

/// Settings of a policy-gradient run (TOML `[pg]`).
///
/// Defaults: 16 prompts x 8 responses per step (GRPO's group of 8), 80 steps, lr 3e-4
/// (small model trained from scratch), one PPO epoch per batch (verl `ppo_epochs = 1`),
/// clip 0.2 (verl, TRL, OpenRLHF), GRPO advantages with verl's defaults, temperature 1,
/// 24 new tokens, no KL, no chi-squared, no shaping: the unregularised run that
/// overoptimises.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    /// RL steps (one batch each).
    pub steps: usize,
    /// Prompts per step (`P`).
    pub prompts_per_step: usize,
    /// Responses per prompt (`G`, the group).
    pub group_size: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// PPO epochs over each batch (full batch).
    pub epochs: usize,
    /// PPO clip `eps` (symmetric; dual-clip `c = 3` as verl).
    pub clip: f32,
    /// The advantage estimator, by name (`kind = "grpo"`, `"rloo"`, ...).
    pub advantage: AdvantageConfig,
    /// Sampling temperature (log-probs are scored at it too, as verl and TRL do).
    pub temperature: f64,
    /// Longest response in tokens (`EOS` included).
    pub max_new_tokens: usize,
    /// KL penalty to the initial policy; `None` = no KL.
    pub kl: Option<KlConfig>,
    /// Coefficient of ORPO's sequence-level chi-squared in the loss; `None` = off.
    pub sequence_chi2: Option<f64>,
    /// Reward shaping (`kind = "par"`, ...); references are `m` responses per prompt
    /// sampled once from the initial policy (stream `pg/references`). `None` = raw proxy.
    pub reward_shaping: Option<ShapingConfig>,
    /// Clip of the gradient norm over all parameters together
    /// ([`goodhart_core::params::clip_grad_norm`], as verl and TRL clip; 0 = off; default
    /// 1.0, their value).
    pub max_grad_norm: f64,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            steps: 80,
            prompts_per_step: 16,
            group_size: 8,
            lr: 3e-4,
            epochs: 1,
            clip: 0.2,
            advantage: AdvantageConfig::default(),
            temperature: 1.0,
            max_new_tokens: 24,
            kl: None,
            sequence_chi2: None,
            reward_shaping: None,
            max_grad_norm: 1.0,
        }
    }
}

impl PgConfig {
    /// Errors on settings that cannot run.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, why: String| GoodhartError::invalid(format!("pg.{k}"), why);
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
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "lr",
                format!("must be finite and positive, got {}", self.lr),
            ));
        }
        if !(self.clip.is_finite() && self.clip > 0.0 && self.clip <= 1.0) {
            return Err(bad(
                "clip",
                format!("must lie in (0, 1], got {}", self.clip),
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(bad("temperature", "must be finite and positive".into()));
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            return Err(bad("max_grad_norm", "must be finite and >= 0".into()));
        }
        if let Some(kl) = &self.kl {
            if !(kl.coef.is_finite() && kl.coef >= 0.0) {
                return Err(bad(
                    "kl.coef",
                    format!("must be finite and >= 0, got {}", kl.coef),
                ));
            }
        }
        if let Some(c) = self.sequence_chi2 {
            if !(c.is_finite() && c >= 0.0) {
                return Err(bad(
                    "sequence_chi2",
                    format!("must be finite and >= 0, got {c}"),
                ));
            }
        }
        if let Some(s) = &self.reward_shaping {
            if s.needs_references() && references_per_prompt(s) == 0 {
                return Err(bad("reward_shaping.m", "must be at least 1".into()));
            }
        }
        Ok(())
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
/// combined per response by `aggregation` (`mean`, `median`, `worst_case`, `uwo`:
/// goodhart-reward's [`Aggregator`], Coste et al. 2024). Scores are the members'
/// normalised scores ([`RewardModel::scores`]).
#[derive(Debug, Clone)]
pub struct Proxy<B: Backend> {
    /// The reward models (at least one).
    pub members: Vec<RewardModel<B>>,
    /// How member scores become one reward.
    pub aggregation: Aggregator,
}

impl<B: Backend> Proxy<B> {
    /// A proxy from `members`; errors when there are none.
    pub fn new(members: Vec<RewardModel<B>>, aggregation: Aggregator) -> Result<Self> {
        if members.is_empty() {
            return Err(GoodhartError::Empty {
                what: "proxy members".into(),
            });
        }
        Ok(Self {
            members,
            aggregation,
        })
    }

    /// A single reward model (its own score).
    pub fn single(model: RewardModel<B>) -> Self {
        Self {
            members: vec![model],
            aggregation: Aggregator::Mean,
        }
    }

    /// Every member's normalised score of `tokens` (read at each row's last token with
    /// `attention_mask = 1`), `[K, N]`.
    pub fn member_scores(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        let rows = self
            .members
            .iter()
            .map(|m| {
                Ok(m.scores(tokens.clone(), attention_mask.clone())?
                    .unsqueeze_dim(0))
            })
            .collect::<Result<Vec<_>>>()?;
        if rows.is_empty() {
            return Err(GoodhartError::Empty {
                what: "proxy members".into(),
            });
        }
        Ok(Tensor::cat(rows, 0))
    }

    /// The aggregated proxy reward `[N]`.
    pub fn score(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>> {
        self.aggregation
            .aggregate(self.member_scores(tokens, attention_mask)?)
    }
}

impl<B: AutodiffBackend> Proxy<B> {
    /// The same proxy on the inner backend (no autodiff), as [`train`] takes it.
    pub fn valid(&self) -> Proxy<B::InnerBackend> {
        Proxy {
            members: self.members.iter().map(|m| m.valid()).collect(),
            aggregation: self.aggregation,
        }
    }
}

/// Metrics of one RL step, on the samples of that step. [`StepMetrics::to_json`] gives
/// the flat map of one `metrics.jsonl` line with goodhart-metrics' keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    /// Step index (0-based).
    pub step: usize,
    /// `reward/proxy/mean`: mean proxy reward (aggregated, before shaping and penalties).
    #[serde(rename = "reward/proxy/mean")]
    pub proxy_mean: f64,
    /// `reward/gold/mean`: mean gold reward of the same samples (never trained on).
    #[serde(rename = "reward/gold/mean")]
    pub gold_mean: f64,
    /// `reward/train/mean`: mean reward the advantages were computed from (after shaping
    /// and an in-reward KL penalty).
    #[serde(rename = "reward/train/mean")]
    pub train_reward_mean: f64,
    /// `kl/ref`: mean over responses of `sum_t (lp - lr)` (k1 at the sequence level, nats),
    /// an estimate of `KL(pi || pi_init)`.
    #[serde(rename = "kl/ref")]
    pub kl_ref: f64,
    /// `kl/d`: `sqrt(max(kl/ref, 0))`, Gao et al.'s distance.
    #[serde(rename = "kl/d")]
    pub kl_d: f64,
    /// `entropy`: token-mean entropy of the sampling policy over response tokens.
    pub entropy: f64,
    /// `length/mean`: mean response length in tokens (`EOS` included).
    #[serde(rename = "length/mean")]
    pub length_mean: f64,
    /// `loss`: total loss, mean over the PPO epochs.
    pub loss: f64,
    /// `clip/frac`: fraction of response tokens with an active PPO clip bound (low +
    /// high, verl's `pg_clipfrac`), mean over epochs.
    #[serde(rename = "clip/frac")]
    pub clip_frac: f64,
    /// `reward/ensemble/disagreement`: mean member variance of the proxy (0 for one
    /// member).
    #[serde(rename = "reward/ensemble/disagreement")]
    pub disagreement: f64,
    /// `response/ill_formed`: fraction of responses with a non-word token before `EOS`.
    #[serde(rename = "response/ill_formed")]
    pub ill_formed: f64,
}

impl StepMetrics {
    /// The metrics as a flat JSON object keyed as the field docs say.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        }
    }
}

/// The gold reward of a generated response (tokens after the prompt) and whether it was
/// ill-formed: words are read up to the first `EOS`; a non-word token before it ends the
/// response there (ill-formed). Errors only on a malformed prompt.
pub fn gold_reward(lang: &Language, prompt: &[u32], response: &[u32]) -> Result<(f64, bool)> {
    let mut words: Vec<u32> = Vec::with_capacity(response.len() + 1);
    let mut ill = false;
    for &tok in response {
        if tok == EOS {
            break;
        }
        if lang.word_of(tok).is_none() {
            ill = true;
            break;
        }
        words.push(tok);
    }
    words.push(EOS);
    Ok((lang.gold(prompt, &words)?, ill))
}

/// Samples of one batch of prompts, scored by proxy and gold (inner backend).
#[derive(Debug, Clone)]
pub struct Scored<B: Backend> {
    /// Topic of each row.
    pub topics: Vec<usize>,
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
}

/// Samples one response per entry of `topics` from `policy` and scores it by `proxy` and
/// by the gold reward.
pub fn sample_and_score<B: Backend>(
    policy: &TransformerLm<B>,
    lang: &Language,
    proxy: &Proxy<B>,
    topics: &[usize],
    generation: &GenerationConfig,
    rng: &mut seed::ChaCha8Rng,
    device: &B::Device,
) -> Result<Scored<B>> {
    if topics.is_empty() {
        return Err(GoodhartError::Empty {
            what: "prompts".into(),
        });
    }
    let n = topics.len();
    let mut ids = Vec::with_capacity(n * PROMPT_LEN);
    for &t in topics {
        ids.extend(lang.prompt(t).into_iter().map(i64::from));
    }
    let prompt = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, PROMPT_LEN]), device);
    let gen = generate(
        policy,
        prompt,
        Tensor::ones([n, PROMPT_LEN], device),
        generation,
        rng,
    )?;
    let members = proxy.member_scores(gen.tokens.clone(), gen.attention_mask.clone())?;
    let agg = proxy.aggregation.aggregate(members.clone())?;
    let width = PROMPT_LEN + gen.response_len;
    let toks: Vec<i64> = gen
        .tokens
        .clone()
        .into_data()
        .convert::<i64>()
        .into_vec()
        .map_err(|e| GoodhartError::invalid("tokens", format!("{e:?}")))?;
    let mut gold = Vec::with_capacity(n);
    let mut ill_formed = Vec::with_capacity(n);
    for (row, &t) in topics.iter().enumerate() {
        let response: Vec<u32> = toks[row * width + PROMPT_LEN..(row + 1) * width]
            .iter()
            .map(|&x| x as u32)
            .collect();
        let (g, ill) = gold_reward(lang, &lang.prompt(t), &response)?;
        gold.push(g);
        ill_formed.push(ill);
    }
    Ok(Scored {
        topics: topics.to_vec(),
        generation: gen,
        members,
        proxy: agg,
        gold,
        ill_formed,
    })
}

/// A tensor's values on the host as `f64`.
pub(crate) fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f64>> {
    t.into_data()
        .convert::<f64>()
        .into_vec::<f64>()
        .map_err(|e| GoodhartError::invalid("tensor data", format!("{e:?}")))
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

/// Reference rewards `[topics][m]`: proxy scores of `m` responses per topic sampled from
/// the initial policy (PAR's reference responses; stream `pg/references`).
fn reference_rewards<B: Backend>(
    reference: &TransformerLm<B>,
    lang: &Language,
    proxy: &Proxy<B>,
    m: usize,
    generation: &GenerationConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<Vec<f32>>> {
    let topics = lang.config().topics;
    let rows: Vec<usize> = (0..topics)
        .flat_map(|t| std::iter::repeat_n(t, m))
        .collect();
    let mut rng = seed::rng(seed, "pg/references");
    let s = sample_and_score(reference, lang, proxy, &rows, generation, &mut rng, device)?;
    let r = host(s.proxy)?;
    Ok((0..topics)
        .map(|t| r[t * m..(t + 1) * m].iter().map(|&x| x as f32).collect())
        .collect())
}

/// Trains `policy` against `proxy` for `cfg.steps` steps (see the module docs), calling
/// `log` with each step's metrics; returns the trained policy.
///
/// `reference` is the initial policy (frozen, inner backend): the KL penalties, the
/// chi-squared term, PAR's references and the reported `kl/ref` are measured against it.
/// Deterministic in `seed` on a given backend (streams `pg/init`, `pg/prompts`,
/// `pg/sample`, `pg/references`).
///
/// Errors on a bad config, a prompt plus `max_new_tokens` longer than the policy's or a
/// proxy member's `max_seq_len`, or an error from `log` (which stops the run).
#[allow(clippy::too_many_arguments)]
pub fn train<B: AutodiffBackend>(
    cfg: &PgConfig,
    lang: &Language,
    mut policy: TransformerLm<B>,
    reference: &TransformerLm<B::InnerBackend>,
    proxy: &Proxy<B::InnerBackend>,
    seed: u64,
    device: &B::Device,
    log: &mut dyn FnMut(&StepMetrics) -> Result<()>,
) -> Result<TransformerLm<B>> {
    cfg.validate()?;
    let need = PROMPT_LEN + cfg.max_new_tokens;
    for (what, len) in std::iter::once(("policy", policy.trunk.max_seq_len()))
        .chain(std::iter::once((
            "reference",
            reference.trunk.max_seq_len(),
        )))
        .chain(
            proxy
                .members
                .iter()
                .map(|m| ("proxy", m.trunk.max_seq_len())),
        )
    {
        if len < need {
            return Err(GoodhartError::invalid(
                "pg.max_new_tokens",
                format!(
                    "prompt {PROMPT_LEN} + {} tokens exceeds the {what}'s max_seq_len {len}",
                    cfg.max_new_tokens
                ),
            ));
        }
    }
    if policy.vocab_size() != lang.vocab_size() || reference.vocab_size() != lang.vocab_size() {
        return Err(GoodhartError::shape(
            "policy / reference vocabulary",
            &[lang.vocab_size()],
            &[policy.vocab_size()],
        ));
    }
    seed::seed_backend::<B>(device, seed, "pg/init");
    let generation = GenerationConfig::new(cfg.max_new_tokens)
        .with_temperature(cfg.temperature)
        .with_eos_id(Some(EOS as usize))
        .with_pad_id(PAD as usize);
    let objective = PpoClipConfig {
        eps_low: cfg.clip,
        eps_high: cfg.clip,
        ..PpoClipConfig::default()
    };
    let mut shaper = cfg.reward_shaping.clone().map(Shaper::new);
    let references = match &cfg.reward_shaping {
        Some(s) if s.needs_references() => Some(reference_rewards(
            reference,
            lang,
            proxy,
            references_per_prompt(s),
            &generation,
            seed,
            device,
        )?),
        _ => None,
    };
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init::<B, TransformerLm<B>>();
    let mut prompt_rng = seed::rng(seed, "pg/prompts");
    let mut sample_rng = seed::rng(seed, "pg/sample");
    let (p, g) = (cfg.prompts_per_step, cfg.group_size);
    let groups = Groups::contiguous(p, g)?;
    let topics_n = lang.config().topics;
    for step in 0..cfg.steps {
        // 1-2. Prompts and rollout with the current policy (no autodiff).
        let topics: Vec<usize> = (0..p)
            .flat_map(|_| std::iter::repeat_n(prompt_rng.random_range(0..topics_n), g))
            .collect();
        let sampler = policy.valid();
        let s = sample_and_score(
            &sampler,
            lang,
            proxy,
            &topics,
            &generation,
            &mut sample_rng,
            device,
        )?;
        let gen = &s.generation;
        let mask = gen.response_mask.clone();
        let old = score(
            &sampler,
            gen.tokens.clone(),
            gen.attention_mask.clone(),
            cfg.temperature,
        )?;
        let lp_old = zero_masked(old.logprobs, &mask);
        let lr = zero_masked(
            score(
                reference,
                gen.tokens.clone(),
                gen.attention_mask.clone(),
                cfg.temperature,
            )?
            .logprobs,
            &mask,
        );
        // 3. Rewards: shaping, then an in-reward KL penalty.
        let n = topics.len();
        let mut reward = s.proxy.clone();
        if let Some(shaper) = shaper.as_mut() {
            let refs = references.as_ref().map(|r| {
                let m = r[0].len();
                let flat: Vec<f32> = topics.iter().flat_map(|&t| r[t].iter().copied()).collect();
                Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(flat, [n, m]), device)
            });
            reward = shaper.apply(reward, refs.as_ref())?;
        }
        let mut input = AdvantageInput::new(mask.clone(), &groups);
        let train_reward = match &cfg.kl {
            Some(kl) if kl.placement == KlPlacement::Reward && kl.coef > 0.0 => {
                let per_token =
                    kl_per_token(lp_old.clone(), lr.clone(), &mask, kl.estimator, true)?;
                let seq = per_token.clone().sum_dim(1).reshape([n]);
                let tokens =
                    goodhart_advantage::common::outcome_at_last_token(reward.clone(), &mask)
                        - per_token * kl.coef;
                input = input.with_token_rewards(tokens);
                reward - seq * kl.coef
            }
            _ => {
                input = input.with_rewards(reward.clone());
                reward
            }
        };
        // 4. Advantages.
        let adv = cfg.advantage.compute(&input)?.advantages;
        // 5. PPO epochs on the autodiff backend.
        let to_ad = |t: Tensor<B::InnerBackend, 2>| Tensor::<B, 2>::from_inner(t);
        let tokens = Tensor::<B, 2, Int>::from_inner(gen.tokens.clone());
        let attention = to_ad(gen.attention_mask.clone());
        let (mask_ad, lp_old_ad, lr_ad, adv_ad) = (
            to_ad(mask.clone()),
            to_ad(lp_old.clone()),
            to_ad(lr.clone()),
            to_ad(adv),
        );
        let (mut loss_sum, mut clip_sum) = (0.0, 0.0);
        for _ in 0..cfg.epochs {
            let lp = score(&policy, tokens.clone(), attention.clone(), cfg.temperature)?.logprobs;
            let inputs = PolicyInputs::new(
                lp.clone(),
                lp_old_ad.clone(),
                adv_ad.clone(),
                mask_ad.clone(),
            )?;
            let out = objective.loss(&inputs)?;
            let mut loss = out.loss;
            if let Some(kl) = cfg.kl.as_ref().filter(|k| k.placement == KlPlacement::Loss) {
                loss = loss
                    + kl_in_loss(
                        lp.clone(),
                        lr_ad.clone(),
                        &mask_ad,
                        kl.coef,
                        kl.estimator,
                        true,
                        LossAggregation::TokenMean,
                    )?;
            }
            if let Some(coef) = cfg.sequence_chi2 {
                loss = loss + sequence_chi2_loss(lp, lr_ad.clone(), &mask_ad, coef, RHO_CLIP)?;
            }
            let parts = host(Tensor::cat(
                vec![
                    loss.clone().inner(),
                    out.metrics.clip_frac_low.inner(),
                    out.metrics.clip_frac_high.inner(),
                ],
                0,
            ))?;
            if !parts[0].is_finite() {
                return Err(GoodhartError::NonFinite {
                    what: format!("policy-gradient loss at step {step}"),
                });
            }
            loss_sum += parts[0];
            clip_sum += parts[1] + parts[2];
            let grads = GradientsParams::from_grads(loss.backward(), &policy);
            let (grads, _) = clip_grad_norm(&policy, grads, cfg.max_grad_norm)?;
            policy = optim.step(cfg.lr, policy, grads);
        }
        // Metrics of the samples of this step.
        let b = n;
        let seq_kl = (lp_old - lr).sum_dim(1).reshape([b]);
        let lengths = mask.clone().sum_dim(1).reshape([b]);
        let disagreement = member_variance(s.members.clone(), false)?.mean();
        let scalars = host(Tensor::cat(
            vec![
                s.proxy.clone().mean(),
                train_reward.mean(),
                seq_kl.mean(),
                masked_mean(old.entropy, &mask),
                lengths.mean(),
                disagreement,
            ],
            0,
        ))?;
        let kl = scalars[2];
        let m = StepMetrics {
            step,
            proxy_mean: scalars[0],
            gold_mean: mean(&s.gold),
            train_reward_mean: scalars[1],
            kl_ref: kl,
            kl_d: kl.max(0.0).sqrt(),
            entropy: scalars[3],
            length_mean: scalars[4],
            loss: loss_sum / cfg.epochs as f64,
            clip_frac: clip_sum / cfg.epochs as f64,
            disagreement: scalars[5],
            ill_formed: s.ill_formed.iter().filter(|&&x| x).count() as f64 / b as f64,
        };
        log(&m)?;
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward_model::ProxyConfig;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::test_device;
    use goodhart_envs::language::LanguageConfig;
    use goodhart_policy::TransformerConfig;

    fn lang() -> Language {
        Language::new(LanguageConfig::default()).unwrap()
    }

    /// A small random policy and a random reward model.
    fn setup<B: AutodiffBackend>(
        lang: &Language,
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
        let rm = seed::seeded::<B::InnerBackend, _>(device, 12, "test", || {
            ProxyConfig {
                d_model: 16,
                ..Default::default()
            }
            .model(lang)
            .init::<B::InnerBackend>(device)
        })
        .unwrap();
        // Raw scores of a fresh head spread by ~0.01: standardise them to about unit scale.
        (
            policy,
            reference,
            Proxy::single(rm.with_normalization(0.0, 0.01).unwrap()),
        )
    }

    fn small() -> PgConfig {
        PgConfig {
            steps: 2,
            prompts_per_step: 4,
            group_size: 4,
            max_new_tokens: 12,
            ..Default::default()
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

    #[test]
    fn metrics_serialise_with_slash_keys() {
        let m = StepMetrics {
            step: 3,
            proxy_mean: 1.0,
            gold_mean: 2.0,
            train_reward_mean: 0.5,
            kl_ref: 0.25,
            kl_d: 0.5,
            entropy: 1.5,
            length_mean: 7.0,
            loss: -0.1,
            clip_frac: 0.0,
            disagreement: 0.0,
            ill_formed: 0.0,
        };
        let j = m.to_json();
        let keys: Vec<&str> = j.keys().map(|k| k.as_str()).collect();
        for k in [
            "step",
            "reward/proxy/mean",
            "reward/gold/mean",
            "kl/ref",
            "kl/d",
            "entropy",
            "length/mean",
            "loss",
            "clip/frac",
        ] {
            assert!(keys.contains(&k), "{k} missing from {keys:?}");
        }
        assert_eq!(j["kl/d"], serde_json::json!(0.5));
        assert_eq!(j["step"], serde_json::json!(3));
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        for cfg in [
            PgConfig {
                steps: 0,
                ..Default::default()
            },
            PgConfig {
                group_size: 0,
                ..Default::default()
            },
            PgConfig {
                lr: f64::NAN,
                ..Default::default()
            },
            PgConfig {
                clip: 0.0,
                ..Default::default()
            },
            PgConfig {
                temperature: 0.0,
                ..Default::default()
            },
            PgConfig {
                kl: Some(KlConfig {
                    coef: -1.0,
                    ..Default::default()
                }),
                ..Default::default()
            },
            PgConfig {
                sequence_chi2: Some(f64::INFINITY),
                ..Default::default()
            },
            PgConfig {
                reward_shaping: Some(ShapingConfig::Par { m: 0, k: 1.0 }),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(cfg.validate(), Err(GoodhartError::InvalidArgument { .. })),
                "{cfg:?}"
            );
        }
        let t: PgConfig = toml::from_str(
            "steps = 3\n[advantage]\nkind = \"rloo\"\n[kl]\ncoef = 0.1\nestimator = \"k1\"\nplacement = \"loss\"\n[reward_shaping]\nkind = \"par\"",
        )
        .unwrap();
        assert_eq!(t.advantage.name(), "rloo");
        assert_eq!(t.kl.unwrap().estimator, KlEstimator::K1);
        assert_eq!(t.reward_shaping, Some(ShapingConfig::par()));
        assert!(toml::from_str::<PgConfig>("step = 3").is_err());
        assert!(Proxy::<goodhart_core::device::Dispatch>::new(vec![], Aggregator::Mean).is_err());
    }

    goodhart_core::backend_test! {
        fn runs_are_deterministic_and_validate_lengths<B>(device) {
            type A<B> = Autodiff<B>;
            let l = lang();
            let (policy, reference, proxy) = setup::<A<B>>(&l, device);
            let run = |cfg: &PgConfig| {
                let mut out = Vec::new();
                train::<A<B>>(cfg, &l, policy.clone(), &reference, &proxy, 5, device, &mut |m| {
                    out.push(m.clone());
                    Ok(())
                })
                .map(|_| out)
            };
            let a = run(&small()).unwrap();
            let b = run(&small()).unwrap();
            assert_eq!(a.len(), 2);
            // The first step samples from the same policy with the same stream.
            assert_eq!(a[0], b[0]);
            // The policy starts at the reference: KL 0 (up to rounding) and no clipping.
            assert!(a[0].kl_ref.abs() < 1e-4, "{:?}", a[0]);
            assert_eq!(a[0].clip_frac, 0.0);
            assert!(a[0].length_mean >= 1.0 && a[0].length_mean <= 12.0);
            // Too long for the 32-token models.
            let long = PgConfig { max_new_tokens: 30, ..small() };
            assert!(matches!(run(&long), Err(GoodhartError::InvalidArgument { .. })));
            // An error from the log callback stops the run.
            let mut calls = 0;
            let r = train::<A<B>>(&small(), &l, policy.clone(), &reference, &proxy, 5, device, &mut |_| {
                calls += 1;
                Err(GoodhartError::invalid("log", "disk full"))
            });
            assert!(r.is_err());
            assert_eq!(calls, 1);
            // Every regulariser and shaping path runs.
            let all = PgConfig {
                kl: Some(KlConfig::default()),
                sequence_chi2: Some(0.01),
                reward_shaping: Some(ShapingConfig::Par { m: 2, k: 1.0 }),
                epochs: 2,
                ..small()
            };
            let m = run(&all).unwrap();
            assert!(m.iter().all(|s| s.loss.is_finite() && s.train_reward_mean > 0.0 && s.train_reward_mean < 1.0), "{m:?}");
            let in_loss = PgConfig { kl: Some(KlConfig { placement: KlPlacement::Loss, estimator: KlEstimator::K1, coef: 0.1 }), ..small() };
            assert!(run(&in_loss).is_ok());
        }
    }

    goodhart_core::backend_test! {
        fn pg_raises_the_proxy<B>(device) {
            // CPU only: dozens of optimiser steps are slow on lavapipe.
            if test_device() != goodhart_core::device::DeviceSpec::Cpu {
                return;
            }
            type A<B> = Autodiff<B>;
            let l = lang();
            let (policy, reference, proxy) = setup::<A<B>>(&l, device);
            let cfg = PgConfig { steps: 20, prompts_per_step: 8, group_size: 8, lr: 1e-2, max_new_tokens: 12, ..Default::default() };
            let mut m = Vec::new();
            train::<A<B>>(&cfg, &l, policy, &reference, &proxy, 1, device, &mut |s| {
                m.push(s.clone());
                Ok(())
            })
            .unwrap();
            let first = (m[0].proxy_mean + m[1].proxy_mean + m[2].proxy_mean) / 3.0;
            let last = (m[17].proxy_mean + m[18].proxy_mean + m[19].proxy_mean) / 3.0;
            eprintln!("proxy {first:.3} -> {last:.3}; kl {:.3}", m[19].kl_ref);
            // Measured on ndarray: 1.8 -> 12.0 (raw +0.10).
            assert!(last > first + 5.0, "proxy {first} -> {last}");
            assert!(m[19].kl_ref > 0.0);
        }
    }

    use crate::sft::tests::knob;

    /// Gold rise, peak and fall of one run, and the Gao RL fit of gold (relative to the
    /// first steps) against `d` on 8-step bins.
    fn summarise(name: &str, m: &[StepMetrics], secs: f64) -> (f64, f64, f64, f64) {
        let w = 5.min(m.len());
        let avg = |s: &[StepMetrics], f: fn(&StepMetrics) -> f64| {
            s.iter().map(f).sum::<f64>() / s.len() as f64
        };
        let g0 = avg(&m[..w], |x| x.gold_mean);
        // Smoothed gold: centred moving average over 5 steps.
        let smooth: Vec<f64> = (0..m.len())
            .map(|i| {
                avg(&m[i.saturating_sub(2)..(i + 3).min(m.len())], |x| {
                    x.gold_mean
                })
            })
            .collect();
        let (ipk, gpk) =
            smooth
                .iter()
                .enumerate()
                .fold((0, f64::MIN), |a, (i, &g)| if g > a.1 { (i, g) } else { a });
        let gfin = avg(&m[m.len() - w..], |x| x.gold_mean);
        let bin = 8;
        let (mut d, mut g) = (vec![0.0], vec![0.0]);
        for c in m.chunks(bin) {
            d.push(avg(c, |x| x.kl_d));
            g.push(avg(c, |x| x.gold_mean) - g0);
        }
        let fit = goodhart_metrics::overopt::fit_rl(&d, &g);
        let r2 = fit.as_ref().map(|f| f.r_squared).unwrap_or(f64::NAN);
        let fall = if gpk > g0 {
            (gpk - gfin) / (gpk - g0)
        } else {
            f64::NAN
        };
        eprintln!(
            "{name}: {secs:.1}s proxy {:.2}->{:.2} gold {g0:.3} peak {gpk:.3} at step {ipk} (kl {:.2}) final {gfin:.3} fall/gain {fall:.2} kl_end {:.2} len {:.1}->{:.1} ill {:.2} | RL fit R2 {r2:.3} {:?}",
            avg(&m[..w], |x| x.proxy_mean),
            avg(&m[m.len() - w..], |x| x.proxy_mean),
            m[ipk].kl_ref,
            avg(&m[m.len() - w..], |x| x.kl_ref),
            avg(&m[..w], |x| x.length_mean),
            avg(&m[m.len() - w..], |x| x.length_mean),
            avg(&m[m.len() - w..], |x| x.ill_formed),
            fit.ok().map(|f| (f.alpha, f.beta, f.peak().map(|p| p.d)))
        );
        let every: Vec<String> = m
            .iter()
            .step_by(5)
            .map(|x| format!("{}:{:.2}/{:.1}", x.step, x.gold_mean, x.kl_ref))
            .collect();
        eprintln!("  gold/kl by step: {}", every.join(" "));
        (g0, gpk, gfin, r2)
    }

    /// The overoptimisation measurement of issue 8 (ignored: about a few minutes on 2
    /// cores). Knobs: `GOODHART_{PAIRS_FEW, PAIRS_MANY, STEPS, LR, SFT_STEPS, RM_EPOCHS,
    /// RM_LR, NOISE, MITIGATIONS, SEED}`.
    #[test]
    #[ignore]
    fn measure_overopt() {
        use crate::{
            best_of_n::best_of_n,
            reward_model::{train_proxy, train_proxy_ensemble},
            sft::{train_base, SftConfig},
        };
        use goodhart_core::device::{cpu, Dispatch as Cpu};
        use std::time::Instant;
        type A = Autodiff<Cpu>;
        let device = cpu();
        let seed: u64 = knob("SEED", 0);
        let lang = crate::sft::tests::knob_language();
        eprintln!("entropy/token {:.3}", lang.entropy_per_token());
        let t = Instant::now();
        let sft = SftConfig {
            steps: knob("SFT_STEPS", SftConfig::default().steps),
            ..Default::default()
        };
        let (base, report) = train_base::<A>(&lang, &sft, seed, &device).unwrap();
        eprintln!("SFT {:.1}s {report:?}", t.elapsed().as_secs_f64());
        let reference = base.valid();
        let pcfg = |pairs: usize| ProxyConfig {
            pairs,
            epochs: knob("RM_EPOCHS", ProxyConfig::default().epochs),
            lr: knob("RM_LR", ProxyConfig::default().lr),
            label_noise: knob("NOISE", ProxyConfig::default().label_noise),
            ..Default::default()
        };
        let pg = PgConfig {
            steps: knob("STEPS", PgConfig::default().steps),
            lr: knob("LR", PgConfig::default().lr),
            ..Default::default()
        };
        let run = |name: &str, cfg: &PgConfig, proxy: &Proxy<Cpu>| {
            let t = Instant::now();
            let mut m = Vec::new();
            train::<A>(
                cfg,
                &lang,
                base.clone(),
                &reference,
                proxy,
                seed,
                &device,
                &mut |s| {
                    m.push(s.clone());
                    Ok(())
                },
            )
            .unwrap();
            summarise(name, &m, t.elapsed().as_secs_f64())
        };
        let mut proxies = Vec::new();
        for pairs in [knob("PAIRS_FEW", 200usize), knob("PAIRS_MANY", 1000usize)] {
            let t = Instant::now();
            let (rm, r) = train_proxy::<A>(&lang, &pcfg(pairs), seed, &device).unwrap();
            eprintln!(
                "proxy {pairs} pairs {:.1}s {r:?}",
                t.elapsed().as_secs_f64()
            );
            let proxy = Proxy::single(rm.valid());
            let t = Instant::now();
            let bon = best_of_n(
                &reference,
                &lang,
                &proxy,
                &[1, 2, 4, 8, 16, 32, 64],
                128,
                8,
                seed,
                &device,
            )
            .unwrap();
            eprintln!(
                "BoN {pairs} {:.1}s: {}",
                t.elapsed().as_secs_f64(),
                bon.iter()
                    .map(|p| format!(
                        "n{} d{:.2} proxy {:.2} gold {:.3}",
                        p.n, p.d, p.proxy, p.gold
                    ))
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
            run(&format!("pg {pairs} pairs"), &pg, &proxy);
            proxies.push(proxy);
        }
        if knob("MITIGATIONS", 0) == 1 {
            let few = &proxies[0];
            let kl = |coef, estimator, placement| PgConfig {
                kl: Some(KlConfig {
                    coef,
                    estimator,
                    placement,
                }),
                ..pg.clone()
            };
            let runs = [
                (
                    "kl k1 in reward 0.05",
                    kl(0.05, KlEstimator::K1, KlPlacement::Reward),
                ),
                (
                    "kl k1 in reward 0.2",
                    kl(0.2, KlEstimator::K1, KlPlacement::Reward),
                ),
                (
                    "kl k3 in loss 0.2",
                    kl(0.2, KlEstimator::K3, KlPlacement::Loss),
                ),
                (
                    "par",
                    PgConfig {
                        reward_shaping: Some(ShapingConfig::par()),
                        ..pg.clone()
                    },
                ),
                (
                    "chi2 0.01",
                    PgConfig {
                        sequence_chi2: Some(0.01),
                        ..pg.clone()
                    },
                ),
            ];
            for (name, cfg) in &runs {
                run(name, cfg, few);
            }
            let t = Instant::now();
            let members = train_proxy_ensemble::<A>(
                &lang,
                &pcfg(knob("PAIRS_FEW", 200usize)),
                3,
                seed,
                &device,
            )
            .unwrap();
            eprintln!("ensemble of 3 {:.1}s", t.elapsed().as_secs_f64());
            let ens = Proxy::new(
                members.iter().map(|(m, _)| m.valid()).collect(),
                Aggregator::uwo_ppo(),
            )
            .unwrap();
            run("uwo 0.1 x3", &pg, &ens);
        }
    }
}
