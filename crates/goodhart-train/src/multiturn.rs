//! Multi-turn rollouts of the tool-use world ([`goodhart_envs::multihop`]): the policy
//! acts turn by turn, the tool's observation is appended after each turn, and the episode
//! is laid out as one sequence for the trainer, with the tool's tokens masked out of the
//! loss and every policy token tagged with its turn.
//!
//! **Generation.** Each round, every episode that is not over is continued from its whole
//! transcript so far (context, turns and observations, left-padded to the round's longest),
//! for at most `max_turn_tokens` tokens ending at `EOS`; the tokens up to and including
//! the first `EOS` (all of them when there is none: an ill-formed turn) are the turn.
//!
//! **Layout** (`[N, P + R]`): the contexts left-padded to the widest `P`, then each
//! episode's turns and observations, right-padded to the longest `R`. The attention mask
//! is 1 on every real token (the tool's included: the policy reads them); the response
//! mask is 1 on the policy's tokens only, so observation tokens carry no gradient; the
//! batch's `turns` hold each policy token's turn index (`-1` elsewhere).
//!
//! **Turn data** ([`TurnRollout::turn_data`]): what the turn-level advantage estimators
//! read ([`goodhart_advantage::Turns`]): a turn mask `[N, K]` (`K` the most turns of a
//! row), each token's turn `[N, P + R]`, a signal per turn and, for IGPO, the policy's
//! probability of the ground-truth answer before the first turn and after each
//! ([`answer_probs`]: the geometric mean of the answer turn's token probabilities after the
//! transcript so far, one extra scoring pass).
//!
//! **The task** ([`MultiturnTask`]): the RL trainer's [`Task`] over the world's questions.
//! It samples episodes itself ([`Task::sample_turns`]); an episode's gold is its outcome,
//! each turn's dense reward the weighted sum of its step rewards ([`TurnRewardConfig`]),
//! and its proxy the outcome plus, with `dense`, the sum of its turns' dense rewards
//! (ungated step rewards); the turn data carries a signal per turn ([`TurnSignal`]: the
//! dense rewards, for G-RA, or the information gain, for A2TGPO) and with the information
//! gain IGPO's answer probabilities.

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use goodhart_advantage::Turns;
use goodhart_core::{ops::zero_masked, seed, GoodhartError, Result};
use goodhart_envs::multihop::{MultihopWorld, StepRewards, Transcript, Turn, EOS, PAD};
use goodhart_policy::{generate, score, Generation, GenerationConfig, TransformerLm};
use goodhart_reward::Sequences;
use serde::{Deserialize, Serialize};

use burn::tensor::backend::AutodiffBackend;
use goodhart_policy::sft::SftExample;

use crate::{
    policy_gradient::{host_rows, Scored},
    rubric::BaseReport,
    sft::{fine_tune, SftConfig},
    task::{token_texts, Task, TaskScores},
};

/// Episodes of the tool-use world, rolled out and laid out for the trainer.
#[derive(Debug, Clone)]
pub struct TurnRollout<B: Backend> {
    /// The question of each row.
    pub questions: Vec<usize>,
    /// Each row's turns, parsed.
    pub turns: Vec<Vec<Turn>>,
    /// Each row's turns as the policy wrote them.
    pub turn_tokens: Vec<Vec<Vec<u32>>>,
    /// Each row's transcript (unpadded).
    pub transcripts: Vec<Transcript>,
    /// The batch `[N, P + R]` (see the module docs), its `turns` set.
    pub batch: Sequences<B>,
    /// The context width `P`.
    pub context_width: usize,
    /// The outcome (gold) of each row.
    pub gold: Vec<f64>,
    /// The step rewards of each row's turns.
    pub steps: Vec<Vec<StepRewards>>,
}

/// Checks that `policy` can roll out episodes of `world`: its vocabulary holds the
/// world's tokens and its context the longest transcript.
pub fn check_policy<B: Backend>(policy: &TransformerLm<B>, world: &MultihopWorld) -> Result<()> {
    if policy.vocab_size() < world.vocab_size() {
        return Err(GoodhartError::invalid(
            "policy.vocab",
            format!(
                "{} tokens; the tool-use world needs {}",
                policy.vocab_size(),
                world.vocab_size()
            ),
        ));
    }
    // The longest transcript, plus the answer turn IGPO's scoring appends.
    let need = world.max_transcript_len() + 3;
    if policy.trunk.max_seq_len() < need {
        return Err(GoodhartError::invalid(
            "policy.max_seq_len",
            format!(
                "{} positions; episodes of {} turns of {} tokens need {need}",
                policy.trunk.max_seq_len(),
                world.config().max_turns,
                world.config().max_turn_tokens
            ),
        ));
    }
    Ok(())
}

/// Left-pads `rows` to their longest: token ids and attention mask `[n, w]`.
fn left_padded<B: Backend>(
    rows: &[Vec<u32>],
    device: &B::Device,
) -> (Tensor<B, 2, Int>, Tensor<B, 2>, usize) {
    let w = rows.iter().map(Vec::len).max().unwrap_or(0);
    let n = rows.len();
    let mut ids = vec![PAD as i64; n * w];
    let mut mask = vec![0f32; n * w];
    for (r, row) in rows.iter().enumerate() {
        let start = (r + 1) * w - row.len();
        for (j, &t) in row.iter().enumerate() {
            ids[start + j] = t as i64;
            mask[start + j] = 1.0;
        }
    }
    (
        Tensor::from_data(TensorData::new(ids, [n, w]), device),
        Tensor::from_data(TensorData::new(mask, [n, w]), device),
        w,
    )
}

/// Rolls out one episode of each question of `questions` with `policy`, sampling as
/// `generation` says (its `max_new_tokens`, `eos_id` and `pad_id` are the world's:
/// `max_turn_tokens`, `EOS`, `PAD`).
pub fn rollout<B: Backend>(
    policy: &TransformerLm<B>,
    world: &MultihopWorld,
    questions: &[usize],
    generation: &GenerationConfig,
    rng: &mut seed::ChaCha8Rng,
    device: &B::Device,
) -> Result<TurnRollout<B>> {
    if questions.is_empty() {
        return Err(GoodhartError::Empty {
            what: "questions".into(),
        });
    }
    if let Some(&q) = questions.iter().find(|&&q| q >= world.questions().len()) {
        return Err(GoodhartError::invalid(
            "question",
            format!(
                "index {q} of a world of {} questions",
                world.questions().len()
            ),
        ));
    }
    check_policy(policy, world)?;
    let mut config = generation.clone();
    config.max_new_tokens = world.config().max_turn_tokens;
    config.eos_id = Some(EOS as usize);
    config.stop_ids = Vec::new();
    config.pad_id = PAD as usize;
    let n = questions.len();
    let mut turns: Vec<Vec<Turn>> = vec![Vec::new(); n];
    let mut tokens: Vec<Vec<Vec<u32>>> = vec![Vec::new(); n];
    loop {
        let active: Vec<usize> = (0..n).filter(|&r| !world.is_done(&turns[r])).collect();
        if active.is_empty() {
            break;
        }
        let prefixes: Vec<Vec<u32>> = active
            .iter()
            .map(|&r| world.transcript(questions[r], &tokens[r]).tokens)
            .collect();
        let (ids, mask, w) = left_padded::<B>(&prefixes, device);
        let gen = generate(policy, ids, mask, &config, rng)?;
        for (row, &r) in host_rows(&gen.tokens)?.iter().zip(&active) {
            let mut turn = Vec::new();
            for &t in &row[w..] {
                turn.push(t);
                if t == EOS {
                    break;
                }
            }
            turns[r].push(world.parse_turn(&turn));
            tokens[r].push(turn);
        }
    }
    layout(world, questions, turns, tokens, device)
}

/// Lays out episodes given their turns' tokens (see the module docs).
pub fn layout<B: Backend>(
    world: &MultihopWorld,
    questions: &[usize],
    turns: Vec<Vec<Turn>>,
    turn_tokens: Vec<Vec<Vec<u32>>>,
    device: &B::Device,
) -> Result<TurnRollout<B>> {
    let n = questions.len();
    if turns.len() != n || turn_tokens.len() != n {
        return Err(GoodhartError::invalid(
            "turns",
            format!(
                "{} and {} rows of turns for {n} questions",
                turns.len(),
                turn_tokens.len()
            ),
        ));
    }
    let transcripts: Vec<Transcript> = questions
        .iter()
        .zip(&turn_tokens)
        .map(|(&q, t)| world.transcript(q, t))
        .collect();
    let contexts: Vec<usize> = questions.iter().map(|&q| world.context(q).len()).collect();
    let p = contexts.iter().copied().max().unwrap_or(0);
    let r_len = transcripts
        .iter()
        .zip(&contexts)
        .map(|(t, c)| t.tokens.len() - c)
        .max()
        .unwrap_or(0)
        .max(1);
    let width = p + r_len;
    let mut ids = vec![PAD as i64; n * width];
    let mut attention = vec![0f32; n * width];
    let mut response = vec![0f32; n * width];
    let mut turn_of = vec![-1i64; n * width];
    for (r, (t, &c)) in transcripts.iter().zip(&contexts).enumerate() {
        // Context right-aligned at `p`, the rest from `p` on.
        let offset = r * width + p - c;
        for (j, &tok) in t.tokens.iter().enumerate() {
            ids[offset + j] = tok as i64;
            attention[offset + j] = 1.0;
            response[offset + j] = t.policy_mask[j];
            if t.policy_mask[j] > 0.0 {
                turn_of[offset + j] = t.turn[j].map_or(-1, |k| k as i64);
            }
        }
    }
    let batch = Sequences::new(
        Tensor::from_data(TensorData::new(ids, [n, width]), device),
        Tensor::from_data(TensorData::new(attention, [n, width]), device),
        Tensor::from_data(TensorData::new(response, [n, width]), device),
    )?;
    let batch = Sequences {
        turns: Some(Tensor::from_data(
            TensorData::new(turn_of, [n, width]),
            device,
        )),
        ..batch
    };
    let gold = questions
        .iter()
        .zip(&turns)
        .map(|(&q, t)| world.outcome(q, t))
        .collect();
    let steps = questions
        .iter()
        .zip(&turns)
        .map(|(&q, t)| t.iter().map(|&turn| world.step_rewards(q, turn)).collect())
        .collect();
    Ok(TurnRollout {
        questions: questions.to_vec(),
        turns,
        turn_tokens,
        transcripts,
        batch,
        context_width: p,
        gold,
        steps,
    })
}

impl<B: Backend> TurnRollout<B> {
    /// `[N, K]`: 1 on each row's answer turns.
    pub fn answer_turns(&self) -> Tensor<B, 2> {
        let (n, k) = (self.turns.len(), self.max_turns().max(1));
        let mut v = vec![0f32; n * k];
        for (r, t) in self.turns.iter().enumerate() {
            for (j, turn) in t.iter().enumerate() {
                if matches!(turn, Turn::Answer { .. }) {
                    v[r * k + j] = 1.0;
                }
            }
        }
        Tensor::from_data(TensorData::new(v, [n, k]), &self.batch.tokens.device())
    }

    /// The most turns of a row, `K`.
    pub fn max_turns(&self) -> usize {
        self.turns.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// The turn data of the advantage estimators: the turn mask `[N, K]`, each token's
    /// turn `[N, P + R]` (0 off the policy's tokens, where the estimators do not read),
    /// `signal[r][k]` as the per-turn rewards (missing turns 0), and IGPO's answer
    /// probabilities `[N, K + 1]` when given. Errors when a signal row does not have one
    /// value per turn of its row, or is not finite.
    pub fn turn_data(
        &self,
        signal: Option<&[Vec<f64>]>,
        answer_prob: Option<Tensor<B, 2>>,
    ) -> Result<Turns<B>> {
        let n = self.turns.len();
        let k = self.max_turns().max(1);
        let device = self.batch.tokens.device();
        let mut mask = vec![0f32; n * k];
        for (r, t) in self.turns.iter().enumerate() {
            for j in 0..t.len() {
                mask[r * k + j] = 1.0;
            }
        }
        let turn_mask = Tensor::from_data(TensorData::new(mask, [n, k]), &device);
        let token_turn = self
            .batch
            .turns
            .clone()
            .expect("a rollout's batch has turns")
            .clamp_min(0);
        let turn_rewards = match signal {
            None => None,
            Some(rows) => {
                if rows.len() != n {
                    return Err(GoodhartError::shape("turn signal", &[n], &[rows.len()]));
                }
                let mut v = vec![0f32; n * k];
                for (r, (row, t)) in rows.iter().zip(&self.turns).enumerate() {
                    if row.len() != t.len() {
                        return Err(GoodhartError::invalid(
                            "turn signal",
                            format!("row {r} has {} values for {} turns", row.len(), t.len()),
                        ));
                    }
                    if let Some(x) = row.iter().find(|x| !x.is_finite()) {
                        return Err(GoodhartError::invalid(
                            "turn signal",
                            format!("row {r} holds {x}"),
                        ));
                    }
                    for (j, &x) in row.iter().enumerate() {
                        v[r * k + j] = x as f32;
                    }
                }
                Some(Tensor::from_data(TensorData::new(v, [n, k]), &device))
            }
        };
        if let Some(p) = &answer_prob {
            if p.dims() != [n, k + 1] {
                return Err(GoodhartError::shape("answer_prob", &[n, k + 1], &p.dims()));
            }
        }
        Ok(Turns {
            turn_mask,
            token_turn: Some(token_turn),
            turn_rewards,
            answer_prob,
        })
    }
}

/// IGPO's answer probabilities `[N, K + 1]`: for each row, the geometric mean of the
/// probabilities of the answer turn's tokens (`world.answer_tokens`) after the context
/// (column 0) and after each of its turns with its observation (column `k`); a row's
/// columns after its last turn repeat its last value. One scoring pass over the `N (K +
/// 1)` sequences, right-padded.
pub fn answer_probs<B: Backend>(
    policy: &TransformerLm<B>,
    world: &MultihopWorld,
    rollout: &TurnRollout<B>,
) -> Result<Tensor<B, 2>> {
    let n = rollout.turns.len();
    let k = rollout.max_turns().max(1);
    let device = rollout.batch.tokens.device();
    // Each row's prefixes: the context, then after each turn (its observation included).
    let mut seqs: Vec<Vec<u32>> = Vec::with_capacity(n * (k + 1));
    let mut answer_len = Vec::with_capacity(n * (k + 1));
    for (r, &q) in rollout.questions.iter().enumerate() {
        let t = &rollout.transcripts[r];
        let context = world.context(q).len();
        let answer = world.answer_tokens(q);
        for j in 0..=k {
            let cut = match j {
                0 => context,
                j => {
                    let last = j.min(rollout.turns[r].len());
                    if last == 0 {
                        context
                    } else {
                        // After turn `last`: its observation too (up to the next turn).
                        t.turn_ends.get(last).map_or(t.tokens.len(), |&next_end| {
                            next_end - rollout.turn_tokens[r][last].len()
                        })
                    }
                }
            };
            let mut s = t.tokens[..cut].to_vec();
            s.extend(&answer);
            answer_len.push(answer.len());
            seqs.push(s);
        }
    }
    let width = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let m = seqs.len();
    let mut ids = vec![PAD as i64; m * width];
    let mut mask = vec![0f32; m * width];
    for (i, s) in seqs.iter().enumerate() {
        for (j, &tok) in s.iter().enumerate() {
            ids[i * width + j] = tok as i64;
            mask[i * width + j] = 1.0;
        }
    }
    let scores = score(
        policy,
        Tensor::from_data(TensorData::new(ids, [m, width]), &device),
        Tensor::from_data(TensorData::new(mask, [m, width]), &device),
        1.0,
    )?;
    let lp: Vec<f32> = scores
        .logprobs
        .into_data()
        .convert::<f32>()
        .into_vec()
        .map_err(|e| GoodhartError::invalid("logprobs", format!("{e:?}")))?;
    let probs: Vec<f32> = seqs
        .iter()
        .zip(&answer_len)
        .enumerate()
        .map(|(i, (s, &a))| {
            let row = &lp[i * width..i * width + s.len()];
            let mean = row[s.len() - a..].iter().sum::<f32>() / a as f32;
            mean.exp()
        })
        .collect();
    Ok(Tensor::from_data(
        TensorData::new(probs, [n, k + 1]),
        &device,
    ))
}

/// How the tool-use task rewards episodes (TOML `[multiturn.reward]`).
///
/// Defaults: a turn's dense reward is `0.1 format + 0.2 tool_call + 0.3 relevant`; the
/// proxy is the outcome alone (`dense = false`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnRewardConfig {
    /// Weight of a well-formed command.
    pub format: f64,
    /// Weight of a search.
    pub tool_call: f64,
    /// Weight of a search on the question's chain.
    pub relevant: f64,
    /// Whether the proxy adds the episode's dense rewards to the outcome (ungated step
    /// rewards).
    pub dense: bool,
}

impl Default for TurnRewardConfig {
    fn default() -> Self {
        Self {
            format: 0.1,
            tool_call: 0.2,
            relevant: 0.3,
            dense: false,
        }
    }
}

impl TurnRewardConfig {
    /// A turn's dense reward.
    pub fn turn_reward(&self, s: &StepRewards) -> f64 {
        self.format * s.format + self.tool_call * s.tool_call + self.relevant * s.relevant
    }

    /// Errors unless every weight is finite.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("format", self.format),
            ("tool_call", self.tool_call),
            ("relevant", self.relevant),
        ] {
            if !v.is_finite() {
                return Err(GoodhartError::invalid(
                    format!("multiturn.reward.{k}"),
                    format!("{v} is not finite"),
                ));
            }
        }
        Ok(())
    }
}

/// The turn data of a sampled batch, carried through the trainer with its rows.
#[derive(Debug, Clone)]
pub struct TurnBatch<B: Backend> {
    /// `[N, K]`: 1 for each row's turns.
    pub turn_mask: Tensor<B, 2>,
    /// `[N, T]`: each token's turn (0 off the policy's tokens).
    pub token_turn: Tensor<B, 2, Int>,
    /// `[N, K]`: each turn's dense reward.
    pub turn_rewards: Tensor<B, 2>,
    /// `[N, K + 1]`: IGPO's answer probabilities, when the task computes them.
    pub answer_prob: Option<Tensor<B, 2>>,
    /// `[N, K]`: 1 on answer turns (whose clip range the turn-level loss leaves as is).
    pub answer_turn: Tensor<B, 2>,
    /// `[N, U]`: the question's checks each episode passes, as unit tests (VeRPO): each
    /// lookup of its chain, then the answer ([`MultihopWorld::checks_passed`]).
    pub checks: Tensor<B, 2>,
    /// `[N, U]`: 1 for the checks its question has (`hops + 1`).
    pub checks_mask: Tensor<B, 2>,
}

impl<B: Backend> TurnBatch<B> {
    /// The checks as unit tests, as VeRPO reads them.
    pub fn unit_tests(&self) -> goodhart_advantage::UnitTests<B> {
        goodhart_advantage::UnitTests {
            passed: self.checks.clone(),
            mask: self.checks_mask.clone(),
        }
    }

    /// As the advantage estimators read it.
    pub fn turns(&self) -> Turns<B> {
        Turns {
            turn_mask: self.turn_mask.clone(),
            token_turn: Some(self.token_turn.clone()),
            turn_rewards: Some(self.turn_rewards.clone()),
            answer_prob: self.answer_prob.clone(),
        }
    }
}

/// What a batch's per-turn signal (`turn_rewards`, read by G-RA and A2TGPO) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnSignal {
    /// Each turn's dense reward ([`TurnRewardConfig::turn_reward`]).
    Dense,
    /// Each turn's information gain, `ln P_k - ln P_{k-1}` of the answer probabilities
    /// ([`answer_probs`], computed for every batch: IGPO's and A2TGPO's signal); 0 for
    /// an answer turn, which retrieves nothing.
    InformationGain,
}

/// The tool-use world as an RL task (see the module docs).
pub struct MultiturnTask<'a> {
    world: &'a MultihopWorld,
    contexts: Vec<Vec<u32>>,
    rewards: TurnRewardConfig,
    signal: TurnSignal,
}

impl<'a> MultiturnTask<'a> {
    /// The task over `world`'s questions, rewarding as `rewards` says, with `signal` as
    /// each batch's per-turn signal.
    pub fn new(
        world: &'a MultihopWorld,
        rewards: TurnRewardConfig,
        signal: TurnSignal,
    ) -> Result<Self> {
        rewards.validate()?;
        Ok(Self {
            world,
            contexts: (0..world.questions().len())
                .map(|i| world.context(i))
                .collect(),
            rewards,
            signal,
        })
    }

    /// Splits a response (the transcript after the context) into its turns' tokens, as
    /// [`rollout`] wrote them: each turn up to its `EOS` or `max_turn_tokens` tokens,
    /// followed by the tool's observation unless it answers.
    pub fn split_response(&self, response: &[u32]) -> Vec<Vec<u32>> {
        let max = self.world.config().max_turn_tokens;
        let mut turns = Vec::new();
        let mut at = 0;
        while at < response.len() && !self.world.is_done(&self.parse(&turns)) {
            let end = response[at..]
                .iter()
                .take(max)
                .position(|&t| t == EOS)
                .map_or((at + max).min(response.len()), |j| at + j + 1);
            let turn = response[at..end].to_vec();
            at = end + self.world.observe(self.world.parse_turn(&turn)).len();
            turns.push(turn);
        }
        turns
    }

    fn parse(&self, turns: &[Vec<u32>]) -> Vec<Turn> {
        turns.iter().map(|t| self.world.parse_turn(t)).collect()
    }

    /// The proxy of an episode of question `q` with these turns.
    fn proxy(&self, q: usize, turns: &[Turn]) -> f64 {
        let outcome = self.world.outcome(q, turns);
        if self.rewards.dense {
            outcome
                + turns
                    .iter()
                    .map(|&t| self.rewards.turn_reward(&self.world.step_rewards(q, t)))
                    .sum::<f64>()
        } else {
            outcome
        }
    }
}

impl<B: Backend> Task<B> for MultiturnTask<'_> {
    fn prompts(&self) -> usize {
        self.contexts.len()
    }

    fn prompt(&self, i: usize) -> &[u32] {
        &self.contexts[i]
    }

    fn prompt_width(&self) -> usize {
        self.contexts.iter().map(Vec::len).max().unwrap_or(0)
    }

    fn vocab_size(&self) -> usize {
        self.world.vocab_size()
    }

    fn end_ids(&self) -> &[u32] {
        &[EOS]
    }

    fn pad_id(&self) -> u32 {
        PAD
    }

    fn proxy_members(&self) -> usize {
        1
    }

    fn proxy_max_seq_len(&self) -> Option<usize> {
        None
    }

    fn score(
        &self,
        prompts: &[usize],
        batch: &Sequences<B>,
        responses: &[Vec<u32>],
    ) -> Result<TaskScores<B>> {
        if prompts.len() != responses.len() {
            return Err(GoodhartError::shape(
                "responses",
                &[prompts.len()],
                &[responses.len()],
            ));
        }
        let device = batch.tokens.device();
        let mut proxy = Vec::with_capacity(prompts.len());
        let mut gold = Vec::with_capacity(prompts.len());
        let mut ill_formed = Vec::with_capacity(prompts.len());
        for (&q, response) in prompts.iter().zip(responses) {
            let turns = self.parse(&self.split_response(response));
            proxy.push(self.proxy(q, &turns) as f32);
            gold.push(self.world.outcome(q, &turns));
            ill_formed.push(turns.contains(&Turn::Malformed));
        }
        let n = proxy.len();
        let proxy = Tensor::<B, 1>::from_data(TensorData::new(proxy, [n]), &device);
        Ok(TaskScores {
            members: proxy.clone().reshape([1, n]),
            proxy,
            gold,
            ill_formed,
            parts: None,
            monitors: Vec::new(),
        })
    }

    fn text(&self, response: &[u32]) -> String {
        token_texts(response, |t| self.world.token_text(t))
    }

    fn anchor_examples(
        &self,
        n: usize,
        rng: &mut seed::ChaCha8Rng,
    ) -> Result<Vec<(Vec<u32>, usize)>> {
        let q = self.contexts.len();
        Ok((0..n)
            .map(|k| {
                let i = k % q;
                let turns = self.world.sample_episode(i, rng);
                (
                    self.world.transcript(i, &turns).tokens,
                    self.contexts[i].len(),
                )
            })
            .collect())
    }

    fn multi_turn(&self) -> bool {
        true
    }

    fn sample_turns(
        &self,
        policy: &TransformerLm<B>,
        prompts: &[usize],
        generation: &GenerationConfig,
        rng: &mut seed::ChaCha8Rng,
        device: &B::Device,
    ) -> Option<Result<Scored<B>>> {
        Some(self.sample_episodes(policy, prompts, generation, rng, device))
    }
}

impl MultiturnTask<'_> {
    /// Each episode's checks and their mask `[N, U]`, `U` the most checks of a question.
    fn checks<B: Backend>(&self, out: &TurnRollout<B>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let rows: Vec<Vec<bool>> = out
            .questions
            .iter()
            .zip(&out.turns)
            .map(|(&q, t)| self.world.checks_passed(q, t))
            .collect();
        let (n, u) = (rows.len(), self.world.config().max_hops + 1);
        let (mut passed, mut mask) = (vec![0f32; n * u], vec![0f32; n * u]);
        for (r, row) in rows.iter().enumerate() {
            for (j, &p) in row.iter().enumerate() {
                passed[r * u + j] = f32::from(u8::from(p));
                mask[r * u + j] = 1.0;
            }
        }
        let device = out.batch.tokens.device();
        (
            Tensor::from_data(TensorData::new(passed, [n, u]), &device),
            Tensor::from_data(TensorData::new(mask, [n, u]), &device),
        )
    }

    fn sample_episodes<B: Backend>(
        &self,
        policy: &TransformerLm<B>,
        prompts: &[usize],
        generation: &GenerationConfig,
        rng: &mut seed::ChaCha8Rng,
        device: &B::Device,
    ) -> Result<Scored<B>> {
        let t0 = std::time::Instant::now();
        let out = rollout(policy, self.world, prompts, generation, rng, device)?;
        // The sampler's log-prob of each policy token, scored in one pass.
        let batch = &out.batch;
        let logprobs = zero_masked(
            score(
                policy,
                batch.tokens.clone(),
                batch.attention_mask.clone(),
                generation.temperature,
            )?
            .logprobs,
            &batch.response_mask,
        );
        let answer_prob = match self.signal {
            TurnSignal::InformationGain => Some(answer_probs(policy, self.world, &out)?),
            TurnSignal::Dense => None,
        };
        let sample_seconds = t0.elapsed().as_secs_f64();
        let t0 = std::time::Instant::now();
        let signal: Vec<Vec<f64>> = match &answer_prob {
            None => out
                .steps
                .iter()
                .map(|t| t.iter().map(|s| self.rewards.turn_reward(s)).collect())
                .collect(),
            Some(p) => {
                let k = out.max_turns().max(1);
                let p: Vec<f32> = p
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .into_vec()
                    .map_err(|e| GoodhartError::invalid("answer_prob", format!("{e:?}")))?;
                // A turn's information gain; an answer retrieves nothing (0).
                out.turns
                    .iter()
                    .enumerate()
                    .map(|(r, t)| {
                        (0..t.len())
                            .map(|j| {
                                if matches!(t[j], Turn::Answer { .. }) {
                                    return 0.0;
                                }
                                let at = |c: usize| f64::from(p[r * (k + 1) + c]).max(1e-30).ln();
                                at(j + 1) - at(j)
                            })
                            .collect()
                    })
                    .collect()
            }
        };
        let turns = out.turn_data(Some(&signal), answer_prob)?;
        let width = out.context_width;
        let responses: Vec<Vec<u32>> = out
            .transcripts
            .iter()
            .zip(&out.questions)
            .map(|(t, &q)| t.tokens[self.world.context(q).len()..].to_vec())
            .collect();
        let scores = Task::<B>::score(self, prompts, batch, &responses)?;
        let checks = self.checks(&out);
        let score_seconds = t0.elapsed().as_secs_f64();
        let [_, total] = batch.tokens.dims();
        Ok(Scored {
            prompts: prompts.to_vec(),
            generation: Generation {
                tokens: batch.tokens.clone(),
                attention_mask: batch.attention_mask.clone(),
                response_mask: batch.response_mask.clone(),
                logprobs,
                prompt_len: width,
                response_len: total - width,
            },
            members: scores.members,
            proxy: scores.proxy,
            gold: scores.gold,
            ill_formed: scores.ill_formed,
            responses,
            parts: None,
            monitors: Vec::new(),
            sample_seconds,
            score_seconds,
            turns: Some(TurnBatch {
                turn_mask: turns.turn_mask,
                token_turn: turns.token_turn.expect("turn data has token turns"),
                turn_rewards: turns.turn_rewards.expect("turn data has a signal"),
                answer_prob: turns.answer_prob,
                answer_turn: out.answer_turns(),
                checks: checks.0,
                checks_mask: checks.1,
            }),
        })
    }
}

/// `n` generator episodes as SFT examples: each transcript with the loss on the policy's
/// tokens only (the context and the tool's observations masked), questions in turn from
/// `rng`.
pub fn base_examples(
    world: &MultihopWorld,
    n: usize,
    rng: &mut seed::ChaCha8Rng,
) -> Vec<SftExample> {
    let q = world.questions().len();
    (0..n)
        .map(|k| {
            let i = k % q;
            let turns = world.sample_episode(i, rng);
            let t = world.transcript(i, &turns);
            SftExample {
                tokens: t.tokens.iter().map(|&x| x as usize).collect(),
                loss_mask: Some(t.policy_mask),
            }
        })
        .collect()
}

/// The base policy: `cfg`'s transformer for the world's vocabulary, SFT on
/// [`base_examples`] (streams `multiturn/sft/init`, `multiturn/sft/examples`,
/// `multiturn/sft/heldout`, `multiturn/sft/order` of `seed`). Errors when the longest
/// episode and IGPO's answer turn do not fit `cfg.max_seq_len`.
pub fn train_base<B: AutodiffBackend>(
    world: &MultihopWorld,
    cfg: &SftConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(TransformerLm<B>, BaseReport)> {
    let need = world.max_transcript_len() + 3;
    if cfg.max_seq_len < need {
        return Err(GoodhartError::invalid(
            "sft.max_seq_len",
            format!(
                "{} cannot hold an episode of {} turns and an answer ({need} tokens)",
                cfg.max_seq_len,
                world.config().max_turns
            ),
        ));
    }
    let model = seed::seeded::<B, _>(device, seed, "multiturn/sft/init", || {
        cfg.transformer(world.vocab_size()).init::<B>(device)
    })?;
    let data = base_examples(
        world,
        cfg.examples,
        &mut seed::rng(seed, "multiturn/sft/examples"),
    );
    let held = base_examples(
        world,
        cfg.heldout,
        &mut seed::rng(seed, "multiturn/sft/heldout"),
    );
    let order = seed::derive(seed, "multiturn/sft/order");
    let fit = fine_tune(model, &data, &held, cfg, PAD as usize, order)?;
    Ok((
        fit.model,
        BaseReport {
            initial_nll: fit.initial_nll,
            heldout_nll: fit.heldout_nll,
        },
    ))
}

/// What a batch of episodes did, averaged per episode (an evaluation's figures).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct EpisodeStats {
    /// The outcome (gold).
    pub outcome: f64,
    /// The dense step rewards, summed over the episode's turns.
    pub dense: f64,
    /// Searches.
    pub tool_calls: f64,
    /// Searches on the question's chain.
    pub relevant: f64,
    /// Turns.
    pub turns: f64,
    /// The share of episodes that answered.
    pub answered: f64,
}

impl EpisodeStats {
    /// The means over `rollout`'s episodes, the dense rewards weighted by `rewards`.
    pub fn of<B: Backend>(rollout: &TurnRollout<B>, rewards: &TurnRewardConfig) -> Self {
        let n = rollout.turns.len().max(1) as f64;
        let mut s = Self::default();
        for (turns, steps) in rollout.turns.iter().zip(&rollout.steps) {
            s.dense += steps.iter().map(|x| rewards.turn_reward(x)).sum::<f64>();
            s.tool_calls += steps.iter().map(|x| x.tool_call).sum::<f64>();
            s.relevant += steps.iter().map(|x| x.relevant).sum::<f64>();
            s.turns += turns.len() as f64;
            s.answered += f64::from(u8::from(
                turns.iter().any(|t| matches!(t, Turn::Answer { .. })),
            ));
        }
        s.outcome = rollout.gold.iter().sum::<f64>();
        for v in [
            &mut s.outcome,
            &mut s.dense,
            &mut s.tool_calls,
            &mut s.relevant,
            &mut s.turns,
            &mut s.answered,
        ] {
            *v /= n;
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::{cpu, Autodiff, Dispatch};
    use goodhart_envs::multihop::MultihopWorldConfig;
    use goodhart_objective::policy::{PolicyInputs, PolicyLossConfig};
    use goodhart_policy::transformer::TransformerConfig;

    type B = Dispatch;

    fn world() -> MultihopWorld {
        MultihopWorld::new(MultihopWorldConfig::default()).unwrap()
    }

    fn policy<Bk: Backend>(w: &MultihopWorld, device: &Bk::Device) -> TransformerLm<Bk> {
        goodhart_core::seed::seeded::<Bk, _>(device, 7, "test-policy", || {
            TransformerConfig::new(w.vocab_size(), 16, 1, 2, w.max_transcript_len() + 3)
                .init::<Bk>(device)
        })
        .unwrap()
    }

    fn host_f32<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
        t.into_data().convert::<f32>().into_vec().unwrap()
    }

    fn host_i64(t: Tensor<B, 2, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().into_vec().unwrap()
    }

    /// A batch of questions of 1 and 2 hops: each row's tokens are its transcript, the
    /// context right-aligned at the widest; the response mask is the transcript's policy
    /// mask (0 on `RESULT e` observations); each policy token carries its turn index.
    #[test]
    fn episodes_lay_out_with_observations_masked_and_turns_tagged() {
        let device = cpu();
        let w = world();
        let lm = policy::<B>(&w, &device);
        let qs: Vec<usize> = (0..8).collect();
        assert!(qs.iter().any(|&q| w.questions()[q].path.len() == 1));
        assert!(qs.iter().any(|&q| w.questions()[q].path.len() == 2));
        let gen = GenerationConfig::new(1);
        let mut rng = seed::rng(1, "test");
        let out = rollout(&lm, &w, &qs, &gen, &mut rng, &device).unwrap();
        let [n, width] = out.batch.tokens.dims();
        assert_eq!(n, 8);
        assert_eq!(out.context_width, w.max_context_len());
        let ids: Vec<i64> = host_i64(out.batch.tokens.clone());
        let resp = host_f32(out.batch.response_mask.clone());
        let att = host_f32(out.batch.attention_mask.clone());
        let turns: Vec<i64> = host_i64(out.batch.turns.clone().unwrap());
        let mut observations = 0;
        for r in 0..n {
            let q = qs[r];
            assert!(w.is_done(&out.turns[r]));
            assert_eq!(out.gold[r], w.outcome(q, &out.turns[r]));
            let t = &out.transcripts[r];
            assert_eq!(*t, w.transcript(q, &out.turn_tokens[r]));
            let c = w.context(q).len();
            let start = out.context_width - c;
            let row = &ids[r * width..(r + 1) * width];
            let got: Vec<u32> = row[start..start + t.tokens.len()]
                .iter()
                .map(|&x| x as u32)
                .collect();
            assert_eq!(got, t.tokens);
            for j in 0..width {
                let in_t = j >= start && j < start + t.tokens.len();
                assert_eq!(
                    att[r * width + j],
                    f32::from(u8::from(in_t)),
                    "row {r} col {j}"
                );
                if in_t {
                    let jj = j - start;
                    assert_eq!(resp[r * width + j], t.policy_mask[jj]);
                    if t.policy_mask[jj] > 0.0 {
                        assert_eq!(turns[r * width + j], t.turn[jj].unwrap() as i64);
                    }
                } else {
                    assert_eq!((resp[r * width + j], turns[r * width + j]), (0.0, -1));
                }
            }
            // Each turn's tokens are the policy's, tagged with the turn; the tool's
            // observation follows it, masked, with no turn index.
            for (k, turn) in out.turn_tokens[r].iter().enumerate() {
                let at = start + t.turn_ends[k];
                for j in at - turn.len()..at {
                    assert_eq!((resp[r * width + j], turns[r * width + j]), (1.0, k as i64));
                }
                let obs = w.observe(w.parse_turn(turn));
                let got: Vec<u32> = row[at..at + obs.len()].iter().map(|&x| x as u32).collect();
                assert_eq!(got, obs);
                for j in at..at + obs.len() {
                    assert_eq!(resp[r * width + j], 0.0, "the tool's token is masked");
                    assert_eq!(turns[r * width + j], -1);
                    observations += 1;
                }
            }
        }
        assert!(
            observations > 0,
            "an untrained policy calls the tool or errs"
        );
        // Same seed, same episodes.
        let again = rollout(&lm, &w, &qs, &gen, &mut seed::rng(1, "test"), &device).unwrap();
        assert_eq!(again.turn_tokens, out.turn_tokens);
    }

    /// Greedy episodes of questions batched together equal each question rolled out
    /// alone: the turns, their boundaries and the turn data survive batching and padding.
    #[test]
    fn turn_boundaries_survive_batching_and_padding() {
        let device = cpu();
        let w = world();
        let lm = policy::<B>(&w, &device);
        let qs = [0usize, 1, 2, 3, 4, 5];
        let greedy = GenerationConfig::new(1).with_greedy(true);
        let mut rng = seed::rng(0, "test");
        let all = rollout(&lm, &w, &qs, &greedy, &mut rng, &device).unwrap();
        for (r, &q) in qs.iter().enumerate() {
            let alone = rollout(&lm, &w, &[q], &greedy, &mut rng, &device).unwrap();
            assert_eq!(alone.turn_tokens[0], all.turn_tokens[r], "question {q}");
            assert_eq!(alone.transcripts[0].turn_ends, all.transcripts[r].turn_ends);
        }
        // Turn data by hand: the mask marks each row's turns; token turns agree with the
        // batch's (clamped to 0 off the policy's tokens); the signal lands per turn.
        let signal: Vec<Vec<f64>> = all
            .turns
            .iter()
            .map(|t| (0..t.len()).map(|j| j as f64 + 0.5).collect())
            .collect();
        let td = all.turn_data(Some(&signal), None).unwrap();
        let k = all.max_turns();
        assert_eq!(td.turn_mask.dims(), [qs.len(), k]);
        let mask = host_f32(td.turn_mask);
        let rewards = host_f32(td.turn_rewards.unwrap());
        for (r, t) in all.turns.iter().enumerate() {
            for j in 0..k {
                let has = j < t.len();
                assert_eq!(mask[r * k + j], f32::from(u8::from(has)));
                assert_eq!(rewards[r * k + j], if has { j as f32 + 0.5 } else { 0.0 });
            }
        }
        let bad = vec![vec![1.0]; qs.len() - 1];
        assert!(all.turn_data(Some(&bad), None).is_err());
    }

    /// The PPO-clip loss of a rollout has no gradient at the tool's tokens and some at
    /// each policy token.
    #[test]
    fn tool_output_tokens_carry_no_gradient() {
        type A = Autodiff<Dispatch>;
        let device = cpu();
        let w = world();
        let lm = policy::<A>(&w, &device);
        let mut rng = seed::rng(2, "test");
        let out: TurnRollout<A> = rollout(
            &lm,
            &w,
            &[0, 1, 2, 3],
            &GenerationConfig::new(1),
            &mut rng,
            &device,
        )
        .unwrap();
        let scores = score(
            &lm,
            out.batch.tokens.clone(),
            out.batch.attention_mask.clone(),
            1.0,
        )
        .unwrap();
        let lp = scores.logprobs.detach().require_grad();
        let mask = out.batch.response_mask.clone();
        let adv = Tensor::<A, 2>::ones(mask.dims(), &device);
        let inputs = PolicyInputs::new(lp.clone(), lp.clone().detach(), adv, mask.clone()).unwrap();
        let loss = PolicyLossConfig::PpoClip(Default::default())
            .loss(&inputs)
            .unwrap()
            .loss;
        let grads = loss.backward();
        let g: Vec<f32> = lp
            .grad(&grads)
            .unwrap()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let m: Vec<f32> = mask
            .inner()
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let att: Vec<f32> = out
            .batch
            .attention_mask
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        let mut tool = 0;
        for (j, (&gj, &mj)) in g.iter().zip(&m).enumerate() {
            if mj > 0.0 {
                assert!(gj != 0.0, "policy token {j} has no gradient");
            } else {
                assert_eq!(gj, 0.0, "token {j} off the policy's has a gradient");
                tool += usize::from(att[j] > 0.0);
            }
        }
        assert!(tool > 0);
    }

    /// IGPO's probabilities by hand for one row: column 0 scores the answer after the
    /// context, column 1 after the first turn and its observation.
    #[test]
    fn answer_probabilities_score_the_answer_after_each_turn() {
        let device = cpu();
        let w = world();
        let lm = policy::<B>(&w, &device);
        let q = 1;
        let (e, rel) = w.chain(q)[0];
        let turns = vec![
            Turn::Search {
                entity: e,
                relation: rel,
            },
            Turn::Answer { entity: 0 },
        ];
        let tokens: Vec<Vec<u32>> = turns.iter().map(|&t| w.turn_tokens(t)).collect();
        let out = layout::<B>(&w, &[q], vec![turns], vec![tokens.clone()], &device).unwrap();
        let probs = host_f32(answer_probs(&lm, &w, &out).unwrap());
        assert_eq!(probs.len(), 3);
        let by_hand = |prefix: Vec<u32>| -> f32 {
            let mut s = prefix;
            let a = w.answer_tokens(q);
            s.extend(&a);
            let len = s.len();
            let ids = Tensor::<B, 2, Int>::from_data(
                TensorData::new(s.iter().map(|&x| x as i64).collect::<Vec<_>>(), [1, len]),
                &device,
            );
            let lp = host_f32(
                score(&lm, ids, Tensor::ones([1, len], &device), 1.0)
                    .unwrap()
                    .logprobs,
            );
            (lp[len - a.len()..].iter().sum::<f32>() / a.len() as f32).exp()
        };
        let ctx = w.context(q);
        assert!((probs[0] - by_hand(ctx.clone())).abs() < 1e-5);
        let mut after = ctx;
        after.extend(&tokens[0]);
        after.extend(w.observe(w.parse_turn(&tokens[0])));
        assert!((probs[1] - by_hand(after)).abs() < 1e-5, "{probs:?}");
        // The last column: after the answer turn (no observation).
        let full = out.transcripts[0].tokens.clone();
        assert!((probs[2] - by_hand(full)).abs() < 1e-5);
        // IGPO's turn rewards from them: the search turn gains p1 - p0; the last (answer)
        // turn gets the outcome, 0 for the wrong answer e0 (the answer is not e0).
        assert_ne!(w.answer(q), 0);
        let td = out
            .turn_data(None, Some(answer_probs(&lm, &w, &out).unwrap()))
            .unwrap();
        let outcome = Tensor::<B, 1>::from_data(
            TensorData::new(out.gold.iter().map(|&g| g as f32).collect::<Vec<_>>(), [1]),
            &device,
        );
        let gains = host_f32(
            goodhart_advantage::igpo::igpo_turn_rewards(
                td.answer_prob.unwrap(),
                outcome,
                &td.turn_mask,
            )
            .unwrap(),
        );
        assert!((gains[0] - (probs[1] - probs[0])).abs() < 1e-6, "{gains:?}");
        assert_eq!(gains[1], 0.0);
    }

    /// The turn-level estimators run on a real rollout's turn data: G-RA on the outcome
    /// and the step rewards, A2TGPO on the information gain per turn, IGPO on the answer
    /// probabilities. Each gives finite advantages, 0 off the policy's tokens (the tool's
    /// included), one value per turn for the turn-level two.
    #[test]
    fn turn_estimators_run_on_rollouts() {
        use goodhart_advantage::{
            common::outcome_at_last_token, AdvantageConfig, AdvantageInput, Groups,
        };
        let device = cpu();
        let w = world();
        let lm = policy::<B>(&w, &device);
        let qs: Vec<usize> = [0usize, 1, 2, 3].iter().flat_map(|&q| [q; 4]).collect();
        let mut rng = seed::rng(4, "test");
        let out = rollout(&lm, &w, &qs, &GenerationConfig::new(1), &mut rng, &device).unwrap();
        let mask = out.batch.response_mask.clone();
        let groups = Groups::contiguous(4, 4).unwrap();
        let outcome = Tensor::<B, 1>::from_data(
            TensorData::new(out.gold.iter().map(|&g| g as f32).collect::<Vec<_>>(), [16]),
            &device,
        );
        let steps: Vec<Vec<f64>> = out
            .steps
            .iter()
            .map(|t| {
                t.iter()
                    .map(|s| s.format + s.tool_call + s.relevant)
                    .collect()
            })
            .collect();
        let probs = answer_probs(&lm, &w, &out).unwrap();
        let p = host_f32(probs.clone());
        let k = out.max_turns();
        let gain: Vec<Vec<f64>> = out
            .turns
            .iter()
            .enumerate()
            .map(|(r, t)| {
                (0..t.len())
                    .map(|j| f64::from(p[r * (k + 1) + j + 1] - p[r * (k + 1) + j]))
                    .collect()
            })
            .collect();
        let token_turn: Vec<i64> = host_i64(out.batch.turns.clone().unwrap());
        let m = host_f32(mask.clone());
        for (config, signal, turn_level) in [
            (
                AdvantageConfig::Gra(Default::default()),
                Some(&steps),
                false,
            ),
            (
                AdvantageConfig::A2tgpo(Default::default()),
                Some(&gain),
                true,
            ),
            (AdvantageConfig::Igpo(Default::default()), None, true),
        ] {
            let input = AdvantageInput::new(mask.clone(), &groups)
                .with_token_rewards(outcome_at_last_token(outcome.clone(), &mask))
                .with_turns(
                    out.turn_data(signal.map(|s| s.as_slice()), Some(probs.clone()))
                        .unwrap(),
                );
            let adv = host_f32(config.compute(&input).unwrap().advantages);
            let width = m.len() / 16;
            for r in 0..16 {
                let mut per_turn: Vec<Option<f32>> = vec![None; k];
                for j in 0..width {
                    let (a, on) = (adv[r * width + j], m[r * width + j] > 0.0);
                    assert!(a.is_finite());
                    if !on {
                        assert_eq!(a, 0.0, "{config:?}: row {r} col {j}");
                    } else if turn_level {
                        let t = token_turn[r * width + j] as usize;
                        let first = *per_turn[t].get_or_insert(a);
                        assert!((a - first).abs() < 1e-6, "one value per turn");
                    }
                }
            }
        }
    }

    /// The RL trainer on the tool-use task: outcome-only GRPO, GRPO on ungated dense
    /// rewards, G-RA, A2TGPO and IGPO each train 2 steps; every sample's gold is its
    /// episode's outcome and its proxy the outcome plus (ungated) the dense rewards; two
    /// runs of one config log the same numbers.
    #[test]
    fn the_trainer_runs_turn_level_estimators_on_episodes() {
        use crate::policy_gradient::{train, RlConfig, StepLine};
        type A = Autodiff<Dispatch>;
        let device = cpu();
        let w = world();
        let run = |kind: &str, signal: TurnSignal, dense: bool| -> Vec<StepLine> {
            let rewards = TurnRewardConfig {
                dense,
                ..Default::default()
            };
            let task = MultiturnTask::new(&w, rewards, signal).unwrap();
            let width = Task::<B>::prompt_width(&task);
            let cfg: RlConfig = toml::from_str(&format!(
                "steps = 2\nprompts_per_step = 2\ngroup_size = 4\nmax_new_tokens = {}\n\
                 [advantage]\nkind = \"{kind}\"",
                w.max_transcript_len() + 3 - width
            ))
            .unwrap();
            let lm = policy::<A>(&w, &device);
            let reference = policy::<B>(&w, &device);
            let mut lines = Vec::new();
            train::<A>(&cfg, &task, lm, &reference, 3, &device, &mut |l| {
                lines.push(l.clone());
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
            lines
        };
        for (kind, signal, dense) in [
            ("grpo", TurnSignal::Dense, false),
            ("grpo", TurnSignal::Dense, true),
            ("gra", TurnSignal::Dense, false),
            ("a2tgpo", TurnSignal::InformationGain, false),
            (
                "a2tgpo\"\n[loss]\nkind = \"a2tgpo_clip",
                TurnSignal::InformationGain,
                false,
            ),
            ("igpo", TurnSignal::InformationGain, false),
            ("verpo", TurnSignal::Dense, false),
        ] {
            let lines = run(kind, signal, dense);
            assert_eq!(lines.len(), 2, "{kind}");
            for l in &lines {
                assert!(l.metrics["loss"].is_finite(), "{kind}: {:?}", l.metrics);
                // Turn-level KL: the token-mean KL is a weighted mean of the turns'.
                let per_turn: Vec<f64> = (0..w.config().max_turns)
                    .filter_map(|k| l.metrics.get(&format!("kl/ref/turn{k}")).copied())
                    .collect();
                assert!(l.metrics.contains_key("kl/ref/turn0"), "{kind}");
                let lo = per_turn.iter().copied().fold(f64::INFINITY, f64::min);
                let hi = per_turn.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let all = l.metrics["kl/ref/token"];
                assert!(
                    lo - 1e-6 <= all && all <= hi + 1e-6,
                    "{kind}: {per_turn:?} {all}"
                );
                assert_eq!(l.samples.len(), 8);
                for sample in &l.samples {
                    let task = MultiturnTask::new(&w, TurnRewardConfig::default(), signal).unwrap();
                    let turns = task.parse(&task.split_response(&sample.tokens));
                    let gold = w.outcome(sample.prompt, &turns);
                    assert_eq!(sample.rewards["gold"], gold, "{kind}");
                    let dense_sum: f64 = turns
                        .iter()
                        .map(|&t| {
                            TurnRewardConfig::default()
                                .turn_reward(&w.step_rewards(sample.prompt, t))
                        })
                        .sum();
                    let want = if dense { gold + dense_sum } else { gold };
                    assert!(
                        (sample.rewards["proxy"] - want).abs() < 1e-5,
                        "{kind}: {:?}",
                        sample.rewards
                    );
                }
            }
            let again = run(kind, signal, dense);
            assert_eq!(
                lines.iter().map(|l| &l.metrics).collect::<Vec<_>>(),
                again.iter().map(|l| &l.metrics).collect::<Vec<_>>(),
                "{kind}: same seed, same numbers"
            );
        }
    }

    /// The turn-level loss needs a multi-turn task: refused for a single-turn one before
    /// any work.
    #[test]
    fn the_turn_level_loss_is_refused_without_turns() {
        let cfg: RlConfigAlias = toml::from_str("[loss]\nkind = \"a2tgpo_clip\"").unwrap();
        let err = cfg.validate(1).unwrap_err().to_string();
        assert!(
            err.contains("rl.loss.kind") && err.contains("a2tgpo_clip"),
            "{err}"
        );
        cfg.validate_for(1, true).unwrap();
    }

    type RlConfigAlias = crate::policy_gradient::RlConfig;

    /// A response splits back into the turns that wrote it, observations skipped.
    #[test]
    fn responses_split_into_their_turns() {
        let w = world();
        let task = MultiturnTask::new(&w, TurnRewardConfig::default(), TurnSignal::Dense).unwrap();
        let mut rng = seed::rng(9, "test");
        for i in 0..w.questions().len() {
            let turns = w.sample_episode(i, &mut rng);
            let t = w.transcript(i, &turns);
            let response = &t.tokens[w.context(i).len()..];
            assert_eq!(task.split_response(response), turns, "question {i}");
        }
        // A turn without EOS is cut at max_turn_tokens.
        let long = vec![w.entity_token(1); 6];
        let split = task.split_response(&long);
        assert_eq!(split[0].len(), w.config().max_turn_tokens);
        assert!(TurnRewardConfig {
            relevant: f64::NAN,
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn bad_inputs_are_errors() {
        let device = cpu();
        let w = world();
        let small = TransformerConfig::new(w.vocab_size(), 16, 1, 2, 8)
            .init::<B>(&device)
            .unwrap();
        let gen = GenerationConfig::new(1);
        let mut rng = seed::rng(0, "test");
        let err = rollout(&small, &w, &[0], &gen, &mut rng, &device).unwrap_err();
        assert!(err.to_string().contains("policy.max_seq_len"), "{err}");
        let lm = policy::<B>(&w, &device);
        let err = rollout(&lm, &w, &[99], &gen, &mut rng, &device).unwrap_err();
        assert!(err.to_string().contains("index 99"), "{err}");
        assert!(rollout(&lm, &w, &[], &gen, &mut rng, &device).is_err());
    }
}
