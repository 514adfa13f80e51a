//! [`RewardSource`]: one trait for every reward, learned or not.
//!
//! A learned reward model, an ensemble of them, a rule (length, format, a verifier) and an
//! environment's own reward all score the same input and return a [`RewardOutput`]: one
//! value per response (or episode), optionally per token / step and per turn, and, for
//! ensembles, every member's score so the disagreement can serve as an uncertainty
//! signal. The trainer holds a proxy and a gold source of the same input type and treats
//! them alike: it trains on one and logs both (DESIGN.md, "Data flow of one RL step").
//!
//! Two input types cover the toolkit: [`Sequences`] (prompt + response token ids, for
//! language tasks) and [`Trajectories`] (observation / action / step-reward episodes, for
//! environments). Sources are generic over the input, so a source written for one type can
//! only be composed with sources of the same type, which the compiler checks.

use burn::tensor::{backend::Backend, Int, Tensor};
use goodhart_core::{groups::Groups, ops::check_finite, GoodhartError, Result};

use crate::ensemble::member_variance;

/// A batch of `N` token sequences (prompt followed by response, padded to `T`).
#[derive(Debug, Clone)]
pub struct Sequences<B: Backend> {
    /// Token ids `[N, T]`.
    pub tokens: Tensor<B, 2, Int>,
    /// 1 on real tokens (prompt and response), 0 on padding, `[N, T]`.
    pub attention_mask: Tensor<B, 2>,
    /// 1 on response tokens (those the policy generated), `[N, T]`.
    pub response_mask: Tensor<B, 2>,
    /// Which responses answer the same prompt, if known.
    pub groups: Option<Groups>,
    /// Turn index of every token (`-1` outside assistant turns), for multi-turn rollouts.
    pub turns: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> Sequences<B> {
    /// A batch from token ids and the two masks; errors unless the shapes agree and the
    /// batch holds at least one token.
    pub fn new(
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
        response_mask: Tensor<B, 2>,
    ) -> Result<Self> {
        let dims = tokens.dims();
        if dims[0] == 0 || dims[1] == 0 {
            return Err(GoodhartError::Empty {
                what: "sequences".into(),
            });
        }
        for (what, m) in [
            ("attention_mask", &attention_mask),
            ("response_mask", &response_mask),
        ] {
            if m.dims() != dims {
                return Err(GoodhartError::shape(what, &dims, &m.dims()));
            }
        }
        Ok(Self {
            tokens,
            attention_mask,
            response_mask,
            groups: None,
            turns: None,
        })
    }

    /// Builds a right-padded batch from host token lists `(prompt, response)`, padding
    /// with `pad_id`. Errors on an empty list or a pair with no token at all.
    pub fn from_pairs(pairs: &[(&[u32], &[u32])], pad_id: u32, device: &B::Device) -> Result<Self> {
        if pairs.is_empty() {
            return Err(GoodhartError::Empty {
                what: "sequences".into(),
            });
        }
        let t = pairs
            .iter()
            .map(|(p, r)| p.len() + r.len())
            .max()
            .unwrap_or(0);
        if t == 0 {
            return Err(GoodhartError::Empty {
                what: "sequences (every prompt and response is empty)".into(),
            });
        }
        let n = pairs.len();
        let mut tokens = vec![pad_id as i64; n * t];
        let mut attn = vec![0.0f32; n * t];
        let mut resp = vec![0.0f32; n * t];
        for (i, (p, r)) in pairs.iter().enumerate() {
            for (j, &tok) in p.iter().chain(r.iter()).enumerate() {
                tokens[i * t + j] = tok as i64;
                attn[i * t + j] = 1.0;
                resp[i * t + j] = if j >= p.len() { 1.0 } else { 0.0 };
            }
        }
        use burn::tensor::TensorData;
        Self::new(
            Tensor::from_data(TensorData::new(tokens, [n, t]), device),
            Tensor::from_data(TensorData::new(attn, [n, t]), device),
            Tensor::from_data(TensorData::new(resp, [n, t]), device),
        )
    }

    /// Sets the group of each sequence.
    pub fn with_groups(mut self, groups: Groups) -> Result<Self> {
        groups.require_len(self.len(), "group ids (one per sequence)")?;
        self.groups = Some(groups);
        Ok(self)
    }

    /// Number of sequences `N`.
    pub fn len(&self) -> usize {
        self.tokens.dims()[0]
    }

    /// Always false: [`Sequences::new`] rejects an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Response lengths `sum_t response_mask` `[N]`.
    pub fn response_lengths(&self) -> Tensor<B, 1> {
        self.response_mask.clone().sum_dim(1).squeeze_dim(1)
    }
}

/// A batch of `N` episodes of at most `T` steps (environments).
#[derive(Debug, Clone)]
pub struct Trajectories<B: Backend> {
    /// Observation before each step `[N, T, K]`.
    pub observations: Tensor<B, 3>,
    /// Action taken at each step `[N, T]`.
    pub actions: Tensor<B, 2, Int>,
    /// Observation after each step `[N, T, K]` (what potential-based shaping reads).
    pub next_observations: Tensor<B, 3>,
    /// 1 on real steps, 0 after the episode ended `[N, T]`.
    pub mask: Tensor<B, 2>,
    /// Rewards the environment recorded while stepping, by name (e.g. `"proxy"`,
    /// `"true"`), each `[N, T]`; [`RecordedReward`] exposes one as a source.
    pub step_rewards: std::collections::BTreeMap<String, Tensor<B, 2>>,
}

/// What a source returns for a batch.
#[derive(Debug, Clone)]
pub struct RewardOutput<B: Backend> {
    /// One reward per response / episode, `[N]`.
    pub reward: Tensor<B, 1>,
    /// Per-token (sequences) or per-step (trajectories) rewards `[N, T]`, when the source
    /// has them; `reward` is then their masked sum.
    pub token_rewards: Option<Tensor<B, 2>>,
    /// Per-turn rewards `[N, K]` for multi-turn rollouts, when the source has them.
    pub turn_rewards: Option<Tensor<B, 2>>,
    /// Every ensemble member's score `[K, N]`, when the source is an ensemble.
    pub members: Option<Tensor<B, 2>>,
}

impl<B: Backend> RewardOutput<B> {
    /// An output holding only per-response rewards; errors on a non-finite value.
    pub fn scalar(reward: Tensor<B, 1>) -> Result<Self> {
        check_finite(&reward, "reward")?;
        Ok(Self {
            reward,
            token_rewards: None,
            turn_rewards: None,
            members: None,
        })
    }

    /// Per-token rewards `[N, T]` under `mask`; the per-response reward is their masked
    /// sum (verl's `token_level_rewards.sum(-1)`). Errors on mismatched shapes or a
    /// non-finite value under the mask.
    pub fn per_token(token_rewards: Tensor<B, 2>, mask: &Tensor<B, 2>) -> Result<Self> {
        goodhart_core::ops::check_same_shape(mask, "mask", &token_rewards, "token_rewards")?;
        goodhart_core::ops::check_finite_masked(&token_rewards, mask, "token_rewards")?;
        let token_rewards = goodhart_core::ops::zero_masked(token_rewards, mask);
        Ok(Self {
            reward: token_rewards.clone().sum_dim(1).squeeze_dim(1),
            token_rewards: Some(token_rewards),
            turn_rewards: None,
            members: None,
        })
    }

    /// Number of responses `N`.
    pub fn len(&self) -> usize {
        self.reward.dims()[0]
    }

    /// True when the output holds no response.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The members' disagreement per response, `Var_k(r_k)` (population when `unbiased`
    /// is false), or `None` for a source that is not an ensemble. See
    /// [`member_variance`].
    pub fn uncertainty(&self, unbiased: bool) -> Option<Result<Tensor<B, 1>>> {
        self.members.clone().map(|m| member_variance(m, unbiased))
    }
}

/// Anything that scores a batch of `I` (default: [`Sequences`]).
///
/// Implement [`RewardSource::score`]; the trait is object safe, so a trainer may hold
/// `Box<dyn RewardSource<B>>` for proxy and gold alike.
pub trait RewardSource<B: Backend, I = Sequences<B>> {
    /// A short name for metrics (`reward/<name>/mean`).
    fn name(&self) -> &str;

    /// Scores every response of `input`. Implementations return one finite value per
    /// response, and a typed error on bad input.
    fn score(&self, input: &I) -> Result<RewardOutput<B>>;

    /// What scoring has cost so far, as named running totals (an LLM judge's
    /// `requests`, `cache_hits`, `prompt_tokens`, `cost_usd`, ...); empty for a source
    /// that costs nothing but compute. The trainer logs them every step.
    fn usage(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
}

/// A rule-based reward from a closure over the input: a verifier, a format check, a
/// length rule. The closure returns one value per response.
pub struct FnReward<F> {
    name: String,
    f: F,
}

impl<F> FnReward<F> {
    /// Wraps `f` under `name`.
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<B, I, F> RewardSource<B, I> for FnReward<F>
where
    B: Backend,
    F: Fn(&I) -> Result<Tensor<B, 1>>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &I) -> Result<RewardOutput<B>> {
        RewardOutput::scalar((self.f)(input)?)
    }
}

/// An environment reward recorded during the rollout (`Trajectories::step_rewards`),
/// exposed as a source: per-step rewards, summed over each episode's valid steps.
#[derive(Debug, Clone)]
pub struct RecordedReward {
    key: String,
}

impl RecordedReward {
    /// The recorded reward stored under `key`.
    pub fn new(key: impl Into<String>) -> Self {
        Self { key: key.into() }
    }
}

impl<B: Backend> RewardSource<B, Trajectories<B>> for RecordedReward {
    fn name(&self) -> &str {
        &self.key
    }

    fn score(&self, input: &Trajectories<B>) -> Result<RewardOutput<B>> {
        let r = input
            .step_rewards
            .get(&self.key)
            .ok_or_else(|| GoodhartError::UnknownMethod {
                family: "recorded reward".into(),
                name: self.key.clone(),
                known: input
                    .step_rewards
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        RewardOutput::per_token(r.clone(), &input.mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, values};

    goodhart_core::backend_test! {
        fn sequences_and_rule_rewards<B>(device) {
            let prompts: [&[u32]; 2] = [&[1, 2], &[3]];
            let responses: [&[u32]; 2] = [&[4], &[5, 6, 7]];
            let pairs: Vec<(&[u32], &[u32])> = prompts.iter().copied().zip(responses.iter().copied()).collect();
            let s = Sequences::<B>::from_pairs(&pairs, 0, device).unwrap();
            // lengths 3 and 4 -> T = 4; response masks [0,0,1,0] and [0,1,1,1]
            assert_close(&values(s.response_mask.clone().reshape([8])), &[0., 0., 1., 0., 0., 1., 1., 1.], 0.0);
            assert_close(&values(s.attention_mask.clone().reshape([8])), &[1., 1., 1., 0., 1., 1., 1., 1.], 0.0);
            assert_close(&values(s.response_lengths()), &[1.0, 3.0], 0.0);
            let len = FnReward::new("length", |s: &Sequences<B>| Ok(s.response_lengths() * 0.5));
            let src: &dyn RewardSource<B> = &len;
            assert_eq!(src.name(), "length");
            assert_close(&values(src.score(&s).unwrap().reward), &[0.5, 1.5], 0.0);
            let nan = FnReward::new("nan", |s: &Sequences<B>| Ok(s.response_lengths() * f32::NAN));
            assert!(matches!(RewardSource::<B>::score(&nan, &s), Err(GoodhartError::NonFinite { .. })));
            assert!(matches!(Sequences::<B>::from_pairs(&[], 0, device), Err(GoodhartError::Empty { .. })));
            let bad = Sequences::new(s.tokens.clone(), s.attention_mask.clone(), Tensor::zeros([2, 3], device));
            assert!(matches!(bad, Err(GoodhartError::ShapeMismatch { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn recorded_reward_sums_valid_steps<B>(device) {
            let mut step_rewards = std::collections::BTreeMap::new();
            step_rewards.insert("true".to_string(),
                Tensor::<B, 2>::from_floats([[1.0, 2.0, f32::NAN], [0.5, 0.5, 0.5]], device));
            let traj = Trajectories {
                observations: Tensor::zeros([2, 3, 1], device),
                actions: Tensor::zeros([2, 3], device),
                next_observations: Tensor::zeros([2, 3, 1], device),
                mask: Tensor::from_floats([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], device),
                step_rewards,
            };
            // 1 + 2 (the NaN step is past the end) and 0.5 * 3
            let out = RecordedReward::new("true").score(&traj).unwrap();
            assert_close(&values(out.reward), &[3.0, 1.5], 0.0);
            assert!(matches!(RecordedReward::new("proxy").score(&traj), Err(GoodhartError::UnknownMethod { .. })));
        }
    }
}
