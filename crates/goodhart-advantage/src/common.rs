//! Pieces the estimators share: input checks, the group-of-one policy, broadcasting a
//! per-response value over its tokens, the reverse (GAE-style) recursion, masked group
//! moments over arbitrary keys, and turn-to-token mapping for multi-turn estimators.

use burn::tensor::{backend::Backend, cast::ToElement, Bool, Int, Tensor, TensorData};
use goodhart_core::{
    groups::Groups,
    ops::{check_finite, check_finite_masked, check_same_shape, group_sum, to_host, zero_masked},
    GoodhartError, Result,
};
use serde::{Deserialize, Serialize};

/// What an estimator does with a group that holds a single response.
///
/// A lone response has no peer to be compared with, and the libraries disagree: verl
/// takes baseline 0 and scale 1 for it (so GRPO gives `r / (1 + eps)` and RLOO gives
/// `r`), TRL computes `torch.std` of one value, which is NaN. goodhart never returns
/// NaN silently: pick one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SingletonGroups {
    /// Baseline 0 and scale 1 for the lone group, so its advantage is (a scaling of) its
    /// raw reward, as verl does. The default of the verl-registered estimators.
    #[default]
    Reward,
    /// Advantage 0 for the lone response: it carries no group-relative signal.
    Zero,
    /// Refuse with [`GoodhartError::GroupTooSmall`].
    Error,
}

/// The groups of one of a batch, as a `[G]` boolean mask, with the policy to apply.
pub(crate) struct Lone<B: Backend> {
    policy: SingletonGroups,
    /// `None` when no group is a singleton (then nothing is patched).
    per_group: Option<Tensor<B, 1, Bool>>,
}

impl<B: Backend> Lone<B> {
    /// Finds the groups of one; errors at once under [`SingletonGroups::Error`].
    pub(crate) fn new(
        groups: &Groups,
        policy: SingletonGroups,
        method: &str,
        device: &B::Device,
    ) -> Result<Self> {
        if !groups.sizes().contains(&1) {
            return Ok(Self {
                policy,
                per_group: None,
            });
        }
        if policy == SingletonGroups::Error {
            groups.require_min_size(2, method)?;
        }
        let lone: Vec<bool> = groups.sizes().iter().map(|&s| s == 1).collect();
        let per_group = Tensor::from_data(TensorData::new(lone, [groups.num_groups()]), device);
        Ok(Self {
            policy,
            per_group: Some(per_group),
        })
    }

    /// Replaces a per-group statistic `[G]` by `value` in the groups of one (baseline 0,
    /// scale 1), so no NaN from an unbiased std of one value survives.
    pub(crate) fn patch(&self, stat: Tensor<B, 1>, value: f32) -> Tensor<B, 1> {
        match &self.per_group {
            Some(lone) => stat.mask_fill(lone.clone(), value),
            None => stat,
        }
    }

    /// Applies the policy to per-response advantages `[N]`: zero for lone responses under
    /// [`SingletonGroups::Zero`], unchanged otherwise.
    pub(crate) fn finish(&self, adv: Tensor<B, 1>, groups: &Groups) -> Tensor<B, 1> {
        match (&self.per_group, self.policy) {
            (Some(lone), SingletonGroups::Zero) => {
                let index = groups.index_tensor::<B>(&adv.device());
                let lone_resp = lone.clone().int().select(0, index).bool();
                adv.mask_fill(lone_resp, 0.0)
            }
            _ => adv,
        }
    }
}

/// Error unless `x` is finite and `>= 0` (weights).
pub(crate) fn check_nonneg(name: &str, x: f32) -> Result<()> {
    if x.is_finite() && x >= 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be finite and >= 0, got {x}"),
        ))
    }
}

/// Error unless `x` is finite and `> 0` (epsilons added to a std: with 0, a group of
/// equal rewards would give 0 / 0).
pub(crate) fn check_positive(name: &str, x: f32) -> Result<()> {
    if x.is_finite() && x > 0.0 {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be finite and > 0, got {x}"),
        ))
    }
}

/// Error unless `x` is in `[0, 1]` (discounts, GAE lambda).
pub(crate) fn check_unit(name: &str, x: f32) -> Result<()> {
    if (0.0..=1.0).contains(&x) {
        Ok(())
    } else {
        Err(GoodhartError::invalid(
            name,
            format!("must be in [0, 1], got {x}"),
        ))
    }
}

/// Checks the inputs every outcome estimator takes: one finite reward per response, one
/// group id and one mask row per response, a finite mask.
pub(crate) fn check_outcome<B: Backend>(
    rewards: &Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    groups: &Groups,
) -> Result<()> {
    let [n] = rewards.dims();
    if n == 0 {
        return Err(GoodhartError::Empty {
            what: "rewards".into(),
        });
    }
    groups.require_len(n, "rewards (one per group id)")?;
    check_rows(mask, n, "mask")?;
    check_finite(mask, "mask")?;
    check_finite(rewards, "rewards")
}

/// Error unless `x` has `n` rows.
pub(crate) fn check_rows<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    n: usize,
    what: &str,
) -> Result<()> {
    let dims = x.dims();
    if dims[0] == n {
        Ok(())
    } else {
        let mut expected = dims.to_vec();
        expected[0] = n;
        Err(GoodhartError::shape(what, &expected, &dims))
    }
}

/// Checks a per-token input against the mask: same shape, finite where the mask is set.
pub(crate) fn check_tokens<B: Backend>(
    x: &Tensor<B, 2>,
    what: &str,
    mask: &Tensor<B, 2>,
) -> Result<()> {
    check_same_shape(mask, "mask", x, what)?;
    check_finite_masked(x, mask, what)
}

/// Broadcasts a per-response value `[N]` over the response's tokens `[N, T]`; masked
/// positions are 0.
pub fn broadcast<B: Backend>(per_response: Tensor<B, 1>, mask: &Tensor<B, 2>) -> Tensor<B, 2> {
    let [n, t] = mask.dims();
    zero_masked(per_response.reshape([n, 1]).expand([n, t]), mask)
}

/// Per-response outcome from per-token rewards: `sum_t r_t m_t`, over counted positions
/// only, so padding may hold anything. verl sums every position of
/// `token_level_rewards`; a reward on a masked token counts there, not here.
pub fn outcome_from_tokens<B: Backend>(
    token_rewards: Tensor<B, 2>,
    mask: &Tensor<B, 2>,
) -> Tensor<B, 1> {
    let [n, _] = mask.dims();
    zero_masked(token_rewards, mask).sum_dim(1).reshape([n])
}

/// Per-token rewards from an outcome: `r` on each response's last valid token, 0
/// elsewhere (how RLHF pipelines place a sequence-level score).
pub fn outcome_at_last_token<B: Backend>(
    rewards: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
) -> Tensor<B, 2> {
    let [n, t] = mask.dims();
    let device = mask.device();
    let pos = Tensor::<B, 1, Int>::arange(1..t as i64 + 1, &device)
        .float()
        .reshape([1, t]);
    // The last valid token has the largest (t + 1) m_t.
    let last = (mask.clone().not_equal_elem(0.0).float() * pos).argmax(1);
    let one_hot = Tensor::<B, 1, Int>::arange(0..t as i64, &device)
        .reshape([1, t])
        .expand([n, t])
        .equal(last.expand([n, t]))
        .float();
    zero_masked(one_hot * rewards.reshape([n, 1]), mask)
}

/// The reverse recursion behind GAE and discounted returns, over the last axis of
/// `[N, T]` tensors, with `zero_masked` rewards (and values):
///
/// `delta_t = r_t + gamma V_{t+1} - V_t`, `A_t = delta_t + gamma lambda A_{t+1}` on
/// positions with `m_t = 1`; where `m_t = 0` both `A` and `V` are carried through from
/// `t + 1` unchanged (verl's multi-turn rule: tool output tokens do not break the
/// recursion). Without values it gives the discounted return `G_t = r_t + gamma G_{t+1}`.
/// One pass over `T` with `[N]` slices; no per-element host loop.
pub(crate) fn reverse_recursion<B: Backend>(
    rewards: &Tensor<B, 2>,
    values: Option<&Tensor<B, 2>>,
    mask: &Tensor<B, 2>,
    gamma: f32,
    lambda: f32,
) -> Tensor<B, 2> {
    let [n, t] = rewards.dims();
    let device = rewards.device();
    // Time-major copies `[T, N]`, so each step reads one contiguous row instead of a
    // strided column (ten times faster on ndarray for 1M x 64).
    let time_major = |x: Tensor<B, 2>| x.swap_dims(0, 1).reshape([n * t]).reshape([t, n]);
    let valid = time_major(mask.clone().not_equal_elem(0.0).float());
    let rewards = time_major(rewards.clone());
    let values = values.map(|v| time_major(v.clone()));
    let mut next_v = Tensor::<B, 2>::zeros([1, n], &device);
    let mut last = Tensor::<B, 2>::zeros([1, n], &device);
    let mut rows = Vec::with_capacity(t);
    for i in (0..t).rev() {
        let m = valid.clone().slice_dim(0, i..i + 1);
        let r = rewards.clone().slice_dim(0, i..i + 1);
        let candidate = match &values {
            Some(v) => {
                let v = v.clone().slice_dim(0, i..i + 1);
                let delta = r + next_v.clone() * gamma - v.clone();
                next_v = next_v.clone() + (v - next_v) * m.clone();
                delta + last.clone() * (gamma * lambda)
            }
            None => r + last.clone() * gamma,
        };
        last = last.clone() + (candidate - last) * m;
        rows.push(last.clone());
    }
    rows.reverse();
    Tensor::cat(rows, 0).swap_dims(0, 1)
}

/// Mean and standard deviation per key of `x` (flattened), counting only positions with
/// `w != 0`; `key` holds dense keys in `0..num_keys`. Used for (prompt, turn) groups,
/// (prompt, unit test) pass rates and pooled per-prompt turn statistics.
pub(crate) struct KeyedMoments<B: Backend> {
    /// Members per key, `[K]`.
    pub count: Tensor<B, 1>,
    /// Mean per key, `[K]` (0 for keys without members).
    pub mean: Tensor<B, 1>,
    /// Sum of squared deviations per key, `[K]`.
    pub sq_dev: Tensor<B, 1>,
}

impl<B: Backend> KeyedMoments<B> {
    pub(crate) fn new(x: Tensor<B, 1>, w: Tensor<B, 1>, key: &Tensor<B, 1, Int>, k: usize) -> Self {
        let valid = w.not_equal_elem(0.0).float();
        let x = x.mask_fill(valid.clone().equal_elem(0.0), 0.0);
        let count = group_sum(valid.clone(), key, k);
        let mean = group_sum(x.clone(), key, k) / count.clone().clamp_min(1.0);
        let dev = (x - mean.clone().select(0, key.clone())) * valid;
        let sq_dev = group_sum(dev.powi_scalar(2), key, k);
        Self {
            count,
            mean,
            sq_dev,
        }
    }

    /// Standard deviation per key, unbiased (`n - 1`) or not; keys with fewer than two
    /// members get 0 (their z-scores are then decided by the caller's policy).
    pub(crate) fn std(&self, unbiased: bool) -> Tensor<B, 1> {
        let denom = if unbiased {
            self.count.clone() - 1.0
        } else {
            self.count.clone()
        };
        (self.sq_dev.clone() / denom.clamp_min(1.0)).sqrt()
    }
}

/// Z-scores `x [N, K]` within keys `key [N*K]` over positions where `w [N, K]` is set:
/// `(x - mu_key) / (sigma_key + eps)`. Keys with one member follow `singleton` (`Reward`:
/// mean 0 and std 1; `Zero`: 0; `Error`: [`GoodhartError::GroupTooSmall`] naming the
/// prompt). Returns 0 where `w` is 0.
#[allow(clippy::too_many_arguments)]
pub(crate) fn keyed_zscore<B: Backend>(
    x: Tensor<B, 2>,
    w: &Tensor<B, 2>,
    key: Tensor<B, 2, Int>,
    num_keys: usize,
    eps: f32,
    unbiased: bool,
    singleton: SingletonGroups,
    method: &str,
    groups: &Groups,
    keys_per_group: usize,
) -> Result<Tensor<B, 2>> {
    let [n, k] = x.dims();
    let key = key.reshape([n * k]);
    let flat_w = w.clone().reshape([n * k]);
    let flat_x = x.reshape([n * k]);
    let m = KeyedMoments::new(flat_x.clone(), flat_w.clone(), &key, num_keys);
    let lone = m.count.clone().equal_elem(1.0);
    if singleton == SingletonGroups::Error {
        let counts = to_host(m.count.clone())?;
        if let Some(i) = counts.iter().position(|&c| c == 1.0) {
            return Err(GoodhartError::GroupTooSmall {
                group: groups.label(i / keys_per_group),
                size: 1,
                min: 2,
                method: method.into(),
            });
        }
    }
    let mean = m.mean.clone().mask_fill(lone.clone(), 0.0);
    let std = m.std(unbiased).mask_fill(lone.clone(), 1.0);
    let mut z = (flat_x - mean.select(0, key.clone())) / (std.select(0, key.clone()) + eps);
    if singleton == SingletonGroups::Zero {
        z = z.mask_fill(lone.int().select(0, key).bool(), 0.0);
    }
    Ok(zero_masked(z, &flat_w).reshape([n, k]))
}

/// Keys `g * k + j` for a `[N, k]` table whose rows belong to the groups: one key per
/// (prompt, column) pair, built on the device.
pub(crate) fn group_column_keys<B: Backend>(
    groups: &Groups,
    k: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let n = groups.len();
    let g = groups.index_tensor::<B>(device).reshape([n, 1]) * (k as i64);
    g.expand([n, k]) + Tensor::<B, 1, Int>::arange(0..k as i64, device).reshape([1, k])
}

/// The group key of every cell of a `[N, k]` table (all columns of a row share it).
pub(crate) fn group_row_keys<B: Backend>(
    groups: &Groups,
    k: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    let n = groups.len();
    groups
        .index_tensor::<B>(device)
        .reshape([n, 1])
        .expand([n, k])
}

/// Spreads per-turn values `[N, K]` over tokens: token `(i, t)` gets
/// `turn_values[i, token_turn[i, t]]`; masked tokens are 0. Errors if a valid token names
/// a turn outside `0..K`.
pub fn turns_to_tokens<B: Backend>(
    turn_values: Tensor<B, 2>,
    token_turn: &Tensor<B, 2, Int>,
    mask: &Tensor<B, 2>,
) -> Result<Tensor<B, 2>> {
    let [n, k] = turn_values.dims();
    let [nm, t] = mask.dims();
    let dims = token_turn.dims();
    if dims != [nm, t] {
        return Err(GoodhartError::shape(
            "token_turn (to match mask)",
            &[nm, t],
            &dims,
        ));
    }
    if n != nm {
        return Err(GoodhartError::shape("turn values", &[nm, k], &[n, k]));
    }
    let valid = mask.clone().not_equal_elem(0.0);
    let out_of_range = token_turn
        .clone()
        .lower_elem(0)
        .bool_or(token_turn.clone().greater_equal_elem(k as i64))
        .bool_and(valid);
    if out_of_range.any().into_scalar().to_bool() {
        return Err(GoodhartError::invalid(
            "token_turn",
            format!("a response token names a turn outside 0..{k}"),
        ));
    }
    let idx = token_turn.clone().clamp(0, k.max(1) as i64 - 1);
    Ok(zero_masked(turn_values.gather(1, idx), mask))
}
