//! [`RolloutBatch`]: what one RL step passes between the crates.
//!
//! `N` sequences of `T` tokens (prompt and response, right-padded). Per-token tensors
//! are aligned with `tokens`: position `t` holds the quantity for token `t` (e.g. the
//! log-probability of `tokens[t]` given `tokens[..t]`). The response mask is 1 on
//! tokens the policy generated and 0 on prompt, padding and, in multi-turn rollouts,
//! tool or environment output, which the policy did not produce.
//!
//! Every reward source is kept under its own name, so the proxy trains the policy while
//! the gold reward is measured on the very same samples.

use std::collections::BTreeMap;

use burn::tensor::{backend::Backend, Int, Tensor};

use crate::{
    error::{GoodhartError, Result},
    groups::Groups,
    ops::check_finite,
};

/// One batch of rollouts with everything the estimators need.
#[derive(Debug, Clone)]
pub struct RolloutBatch<B: Backend> {
    tokens: Tensor<B, 2, Int>,
    response_mask: Tensor<B, 2>,
    groups: Groups,
    rewards: BTreeMap<String, Tensor<B, 1>>,
    token_rewards: BTreeMap<String, Tensor<B, 2>>,
    logp_old: Option<Tensor<B, 2>>,
    logp_ref: Option<Tensor<B, 2>>,
    turns: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> RolloutBatch<B> {
    /// A batch of `tokens [N, T]` with `response_mask [N, T]` and one group id per row.
    pub fn new(
        tokens: Tensor<B, 2, Int>,
        response_mask: Tensor<B, 2>,
        groups: Groups,
    ) -> Result<Self> {
        let dims = tokens.dims();
        if response_mask.dims() != dims {
            return Err(GoodhartError::shape(
                "response_mask",
                &dims,
                &response_mask.dims(),
            ));
        }
        groups.require_len(dims[0], "group ids (one per sequence)")?;
        Ok(Self {
            tokens,
            response_mask,
            groups,
            rewards: BTreeMap::new(),
            token_rewards: BTreeMap::new(),
            logp_old: None,
            logp_ref: None,
            turns: None,
        })
    }

    /// Number of sequences `N`.
    pub fn len(&self) -> usize {
        self.tokens.dims()[0]
    }

    /// Always false: a batch has at least one sequence (its groups cannot be empty).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Padded sequence length `T`.
    pub fn seq_len(&self) -> usize {
        self.tokens.dims()[1]
    }

    /// Token ids `[N, T]`.
    pub fn tokens(&self) -> &Tensor<B, 2, Int> {
        &self.tokens
    }

    /// Response mask `[N, T]` (1 on policy-generated tokens).
    pub fn response_mask(&self) -> &Tensor<B, 2> {
        &self.response_mask
    }

    /// Group of each sequence.
    pub fn groups(&self) -> &Groups {
        &self.groups
    }

    /// Response lengths (number of masked-in tokens) `[N]`.
    pub fn response_lengths(&self) -> Tensor<B, 1> {
        self.response_mask.clone().sum_dim(1).squeeze_dim(1)
    }

    /// Adds the per-response reward of source `name` (e.g. `"proxy"`, `"gold"`).
    /// Errors on a wrong length or a non-finite value.
    pub fn with_reward(mut self, name: impl Into<String>, reward: Tensor<B, 1>) -> Result<Self> {
        let name = name.into();
        let what = format!("reward `{name}`");
        if reward.dims()[0] != self.len() {
            return Err(GoodhartError::shape(what, &[self.len()], &reward.dims()));
        }
        check_finite(&reward, &what)?;
        self.rewards.insert(name, reward);
        Ok(self)
    }

    /// Adds a per-token reward of source `name`, aligned with `tokens`.
    pub fn with_token_reward(
        mut self,
        name: impl Into<String>,
        reward: Tensor<B, 2>,
    ) -> Result<Self> {
        let name = name.into();
        let what = format!("token reward `{name}`");
        self.check_token_shape(&reward.dims(), &what)?;
        check_finite(&reward, &what)?;
        self.token_rewards.insert(name, reward);
        Ok(self)
    }

    /// Sets the log-probabilities of the behaviour (old) policy `[N, T]`.
    pub fn with_logp_old(mut self, logp: Tensor<B, 2>) -> Result<Self> {
        self.check_token_shape(&logp.dims(), "logp_old")?;
        self.logp_old = Some(logp);
        Ok(self)
    }

    /// Sets the log-probabilities of the reference policy `[N, T]`.
    pub fn with_logp_ref(mut self, logp: Tensor<B, 2>) -> Result<Self> {
        self.check_token_shape(&logp.dims(), "logp_ref")?;
        self.logp_ref = Some(logp);
        Ok(self)
    }

    /// Sets the turn index of every token `[N, T]` for multi-turn rollouts (-1 outside
    /// any assistant turn).
    pub fn with_turns(mut self, turns: Tensor<B, 2, Int>) -> Result<Self> {
        self.check_token_shape(&turns.dims(), "turns")?;
        self.turns = Some(turns);
        Ok(self)
    }

    /// The per-response reward of source `name`.
    pub fn reward(&self, name: &str) -> Result<&Tensor<B, 1>> {
        self.rewards
            .get(name)
            .ok_or_else(|| self.unknown_source(name, self.rewards.keys()))
    }

    /// The per-token reward of source `name`.
    pub fn token_reward(&self, name: &str) -> Result<&Tensor<B, 2>> {
        self.token_rewards
            .get(name)
            .ok_or_else(|| self.unknown_source(name, self.token_rewards.keys()))
    }

    /// Every per-response reward, by source name.
    pub fn rewards(&self) -> &BTreeMap<String, Tensor<B, 1>> {
        &self.rewards
    }

    /// Log-probabilities of the behaviour policy, if set.
    pub fn logp_old(&self) -> Option<&Tensor<B, 2>> {
        self.logp_old.as_ref()
    }

    /// Log-probabilities of the reference policy, if set.
    pub fn logp_ref(&self) -> Option<&Tensor<B, 2>> {
        self.logp_ref.as_ref()
    }

    /// Turn index of every token, if set.
    pub fn turns(&self) -> Option<&Tensor<B, 2, Int>> {
        self.turns.as_ref()
    }

    fn check_token_shape(&self, got: &[usize], what: &str) -> Result<()> {
        let dims = self.tokens.dims();
        if got == dims {
            Ok(())
        } else {
            Err(GoodhartError::shape(what, &dims, got))
        }
    }

    fn unknown_source<'a>(
        &self,
        name: &str,
        known: impl Iterator<Item = &'a String>,
    ) -> GoodhartError {
        GoodhartError::UnknownMethod {
            family: "reward source".into(),
            name: name.into(),
            known: known.cloned().collect::<Vec<_>>().join(", "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_close, values};

    crate::backend_test! {
        fn batch_validates_what_it_is_given<B>(device) {
            let tokens = Tensor::<B, 2, Int>::from_ints([[1, 2, 3], [1, 4, 0]], device);
            let mask = Tensor::<B, 2>::from_floats([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device);
            let groups = Groups::new(vec![0, 0]).unwrap();
            let batch = RolloutBatch::new(tokens.clone(), mask.clone(), groups.clone()).unwrap()
                .with_reward("proxy", Tensor::from_floats([1.0, 0.5], device)).unwrap()
                .with_reward("gold", Tensor::from_floats([0.2, 0.9], device)).unwrap();
            assert_close(&values(batch.response_lengths()), &[2.0, 1.0], 0.0);
            assert_close(&values(batch.reward("gold").unwrap().clone()), &[0.2, 0.9], 0.0);
            assert_eq!(batch.reward("rubric").unwrap_err().to_string(),
                "unknown reward source `rubric`; known: gold, proxy");
            assert!(matches!(
                batch.clone().with_reward("nan", Tensor::from_floats([f32::NAN, 0.0], device)),
                Err(GoodhartError::NonFinite { .. })));
            assert!(matches!(
                batch.clone().with_reward("short", Tensor::from_floats([0.0], device)),
                Err(GoodhartError::ShapeMismatch { .. })));
            assert!(batch.with_logp_ref(Tensor::zeros([2, 2], device)).is_err());
            let three = Groups::new(vec![0, 0, 1]).unwrap();
            assert!(RolloutBatch::new(tokens, mask, three).is_err());
        }
    }
}
