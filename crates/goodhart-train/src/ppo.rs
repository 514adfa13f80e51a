//! PPO with a value head and GAE on the vectorised tomato gridworld (Laidlaw, Singhal,
//! Dragan 2024, "Correlated Proxies: A New Definition and Improved Mitigation for Reward
//! Hacking", ORPO), with the two regularisers that paper compares: action-distribution KL
//! to the base policy and chi-squared occupancy-measure regularisation.
//!
//! One iteration, top to bottom (CleanRL's `ppo.py` layout; Schulman et al. 2017):
//!
//! 1. **Rollout.** Reset `envs` environments and run the current policy for exactly
//!    `horizon` steps, so every environment holds one complete episode. An episode that
//!    terminates early (every tomato watered) is masked from then on; one that reaches the
//!    horizon is *truncated* and bootstrapped with `V(s_T)` (Pardo et al. 2018, "Time
//!    Limits in Reinforcement Learning"). With chi-squared regularisation a second batch of
//!    `envs` episodes is rolled out with the base policy, so half of all rollouts come from
//!    the base policy, as in ORPO.
//! 2. **Reward.** The true or the proxy reward per step ([`TrainReward`]); under
//!    `chi2_occupancy` (a goodhart-regularize [`RegularizerConfig`]) the discriminator `d(s, a) ~ log mu_pi / mu_base`
//!    first takes `disc_steps` Adam steps on current vs base state-action pairs, then each
//!    step's reward becomes `clip(r - coef * term(d), -clip, clip)`
//!    ([`goodhart_regularize::occupancy`]).
//! 3. **GAE** ([`goodhart_advantage::gae`]): `delta_t = r_t + gamma V_{t+1} - V_t`,
//!    `A_t = delta_t + gamma lambda A_{t+1}`, returns `A + V`; a truncated episode adds
//!    `gamma V(s_T)` to its last reward, a terminated one bootstraps with 0. Advantages are
//!    whitened over the batch.
//! 4. **Update.** `epochs` passes over the valid steps in `minibatches` shuffled
//!    minibatches, each one Adam step on
//!    `L = L_clip + value_coef L_V - entropy_coef mean H + L_reg`
//!    (PPO eq. 9): [`PpoClipConfig`] with symmetric range `clip` and no dual-clip,
//!    [`ValueLossConfig`], [`entropy_bonus`], and under `action_kl`
//!    `L_reg = coef / (1 - gamma) * mean_s KL(pi(.|s) || pi_base(.|s))`
//!    ([`goodhart_regularize::action_kl`]). Gradients are clipped to a global norm
//!    `max_grad_norm` over policy and value together (CleanRL's `clip_grad_norm_`).
//!
//! Every random draw comes from [`goodhart_core::seed`] streams named after the
//! iteration (`"ppo/<it>/policy/actions"`, `".../env"`, `"ppo/<it>/minibatch"`, ...), so an
//! iteration depends only on the agent, the optimiser state, the seed and its index: the
//! same call gives the same numbers on the same backend.
//!
//! Measured results of the `tomato` preset: `docs/lab.md`.

use burn::{
    module::{AutodiffModule, Module},
    optim::{AdamConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        cast::ToElement,
        Int, Tensor, TensorData,
    },
};
use goodhart_advantage::{
    gae::{gae, GaeConfig},
    AdvantageOutput, Whitening,
};
use goodhart_core::{
    aggregate::LossAggregation, params::clip_grad_norm, seed, GoodhartError, Result,
};
use goodhart_envs::tomato::{Board, TomatoConfig, TomatoVec, NUM_ACTIONS};
use goodhart_objective::{policy::PolicyInputs, ppo_clip::PpoClipConfig, value::ValueLossConfig};
use goodhart_policy::{
    mlp::{MlpConfig, MlpPolicy, MlpValue},
    score::logprobs_from_logits,
};
use goodhart_regularize::{
    action_kl::action_kl_per_state, entropy::entropy_bonus, RegInputs, RegularizerConfig,
};
use rand::seq::SliceRandom as _;
use serde::{Deserialize, Serialize};

/// PPO settings for the tomato gridworld.
///
/// Defaults: `gamma 0.99`, GAE `lambda 0.98`, `lr 1e-3`, `clip 0.05`, `entropy_coef 0.01`
/// are ORPO's tomato settings (METHODS.md; ORPO also leaves the value loss unclipped,
/// `vf_clip_param = inf`). The rest are goodhart's, sized so a run trains in seconds on
/// two CPU cores where ORPO runs 500 iterations of 3000 steps: 16 environments (1600
/// steps per iteration), 30 iterations, 4 epochs of 4 minibatches (CleanRL's
/// `update_epochs 4`, `num_minibatches 4`; ORPO 8 epochs of 128 steps), value coefficient
/// 0.5 and global gradient norm 0.5 (CleanRL), advantage whitening over the batch (verl,
/// TRL, RLlib), and tanh MLPs of two hidden layers of 256 (ORPO uses four of 512).
///
/// Measured on `rhard` (5 seeds, ndarray): the width matters. With 64-wide layers, PPO
/// on the proxy converges to the tomato-watering local optimum (true return 9.7) in 4 of
/// 5 seeds and never finds the bucket; with 256-wide layers it finds it. Where it starts
/// matters too: from a fresh agent it finds the bucket in 4 of 5 seeds with 16
/// environments and 5 of 5 with 32 (40 iterations); from a base policy of 2 iterations on
/// the true reward, in 2 of 5 after 40 or 80 iterations. The tomato experiment's
/// settings and figures are in the module docs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// PPO iterations (rollout + update). 0 returns the initial agent unchanged.
    pub iterations: usize,
    /// Environments rolled out per iteration (one episode each).
    pub envs: usize,
    /// Passes over each iteration's batch.
    pub epochs: usize,
    /// Minibatches per pass (at most one per valid step).
    pub minibatches: usize,
    /// Adam learning rate (ORPO 1e-3; Adam epsilon 1e-5 as CleanRL).
    pub lr: f64,
    /// Discount `gamma` in `[0, 1)` (ORPO 0.99).
    pub gamma: f32,
    /// GAE `lambda` in `[0, 1]` (ORPO 0.98).
    pub lambda: f32,
    /// PPO clip range `eps`: the ratio is clipped to `[1 - eps, 1 + eps]` (ORPO 0.05).
    pub clip: f32,
    /// Entropy bonus coefficient (ORPO 0.01).
    pub entropy_coef: f64,
    /// Value-loss coefficient (CleanRL 0.5).
    pub value_coef: f64,
    /// Global gradient-norm clip over policy and value parameters; 0 disables (CleanRL 0.5).
    pub max_grad_norm: f64,
    /// Hidden widths of the policy and value MLPs (default 256, 256; CleanRL 64, 64;
    /// ORPO four of 512).
    pub hidden: Vec<usize>,
    /// Whiten advantages over each iteration's valid steps (verl, TRL, CleanRL do).
    pub whiten_advantages: bool,
    /// Value clip window `c` around the rollout-time prediction (`None`: plain
    /// `0.5 (V - R)^2`, the default; verl uses 0.5, CleanRL the policy clip).
    pub value_clip: Option<f32>,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            iterations: 30,
            envs: 16,
            epochs: 4,
            minibatches: 4,
            lr: 1e-3,
            gamma: 0.99,
            lambda: 0.98,
            clip: 0.05,
            entropy_coef: 0.01,
            value_coef: 0.5,
            max_grad_norm: 0.5,
            hidden: vec![256, 256],
            whiten_advantages: true,
            value_clip: None,
        }
    }
}

impl PpoConfig {
    /// Errors ([`GoodhartError::InvalidArgument`], naming the key) unless `envs`, `epochs`
    /// and `minibatches` are positive, `lr` is finite and positive, `gamma` is in
    /// `[0, 1)`, `lambda` in `[0, 1]`, `clip` finite and positive, the coefficients and the
    /// gradient norm finite and non-negative, every hidden width positive and the value
    /// clip (if any) finite and non-negative.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |key: &str, reason: String| Err(GoodhartError::invalid(format!("ppo.{key}"), reason));
        for (key, v) in [
            ("envs", self.envs),
            ("epochs", self.epochs),
            ("minibatches", self.minibatches),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", format!("must be finite and > 0, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.gamma) {
            return bad("gamma", format!("must be in [0, 1), got {}", self.gamma));
        }
        if !(0.0..=1.0).contains(&self.lambda) {
            return bad("lambda", format!("must be in [0, 1], got {}", self.lambda));
        }
        if !(self.clip.is_finite() && self.clip > 0.0) {
            return bad("clip", format!("must be finite and > 0, got {}", self.clip));
        }
        for (key, v) in [
            ("entropy_coef", self.entropy_coef),
            ("value_coef", self.value_coef),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(key, format!("must be finite and >= 0, got {v}"));
            }
        }
        if self.hidden.contains(&0) {
            return bad("hidden", "every width must be at least 1".into());
        }
        if let Some(c) = self.value_clip {
            if !(c.is_finite() && c >= 0.0) {
                return bad("value_clip", format!("must be finite and >= 0, got {c}"));
            }
        }
        Ok(())
    }
}

/// Which of the environment's rewards PPO maximises; the other is still measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainReward {
    /// The true reward (watered tomatoes): how the base policy is trained.
    True,
    /// The proxy (the bucket pays as if every cell held a watered tomato): the hackable one.
    Proxy,
}

/// The PPO agent: a categorical policy and a separate state-value network over the
/// tomato observation.
#[derive(Module, Debug)]
pub struct Agent<B: Backend> {
    /// `pi(a | s)`.
    pub policy: MlpPolicy<B>,
    /// `V(s)`.
    pub value: MlpValue<B>,
}

/// What one PPO iteration reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IterationMetrics {
    /// Iteration index, from 0.
    pub iteration: usize,
    /// Environment steps of the trained policy so far, this iteration's included.
    pub timesteps: usize,
    /// Mean undiscounted true return per episode of this iteration's rollouts.
    pub true_return: f64,
    /// Mean undiscounted proxy return per episode.
    pub proxy_return: f64,
    /// Fraction of this iteration's episodes that visited the bucket.
    pub bucket_rate: f64,
    /// PPO-clip loss, mean over minibatch steps.
    pub policy_loss: f64,
    /// Value loss, mean over minibatch steps.
    pub value_loss: f64,
    /// Mean policy entropy over the minibatches (nats).
    pub entropy: f64,
    /// `k3` estimate of `KL(pi_old || pi)`, mean over minibatch steps.
    pub approx_kl: f64,
    /// Fraction of steps whose clip bound was active, mean over minibatch steps.
    pub clip_frac: f64,
    /// The regulariser's quantity before the update: mean action KL to the base policy
    /// (action KL) or the discriminator's chi-squared estimate (chi-squared occupancy);
    /// `None` without regularisation.
    pub reg_term: Option<f64>,
    /// Mean `KL(pi(.|s) || pi_base(.|s))` over this iteration's states, whenever a base
    /// policy is given.
    pub kl_base: Option<f64>,
    /// Discriminator loss after this iteration's steps (chi-squared occupancy only).
    pub disc_loss: Option<f64>,
}

/// Evaluation of a policy on fresh episodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Returns {
    /// Mean undiscounted true return per episode.
    pub true_return: f64,
    /// Mean undiscounted proxy return per episode.
    pub proxy_return: f64,
    /// Standard deviation of the true return over episodes (unbiased, `n - 1`; 0 for one
    /// episode).
    pub true_sd: f64,
    /// Fraction of episodes that visit the bucket.
    pub bucket_rate: f64,
}

/// A fresh agent for `env`'s observations: policy and value MLPs of widths
/// `config.hidden` with CleanRL's orthogonal initialisation
/// ([`goodhart_policy::mlp`]). The weights are drawn from the backend RNG: call it inside
/// [`goodhart_core::seed::seeded`], or call [`init_agent_seeded`].
pub fn init_agent<B: Backend>(
    config: &PpoConfig,
    env: &TomatoConfig,
    device: &B::Device,
) -> Result<Agent<B>> {
    config.validate()?;
    let board = Board::parse(&env.board)?;
    let mlp = MlpConfig::new(board.obs_dim()).with_hidden(config.hidden.clone());
    Ok(Agent {
        policy: mlp.init_policy(NUM_ACTIONS, device)?,
        value: mlp.init_value(device)?,
    })
}

/// [`init_agent`] after seeding the backend with stream `"ppo/init"` of `seed`.
pub fn init_agent_seeded<B: Backend>(
    config: &PpoConfig,
    env: &TomatoConfig,
    seed: u64,
    device: &B::Device,
) -> Result<Agent<B>> {
    seed::seeded::<B, _>(device, seed, "ppo/init", || init_agent(config, env, device))
}

/// One batch of complete episodes, env-major (`[N, T, ...]`, row `i` is environment `i`).
#[derive(Debug, Clone)]
struct Rollout {
    envs: usize,
    horizon: usize,
    obs_dim: usize,
    /// `s_t`, the state in which `a_t` was chosen, `[N, T, K]` (0 where masked).
    obs: Vec<f32>,
    /// `s_T` after the last step, `[N, K]` (meaningful where `truncated`).
    final_obs: Vec<f32>,
    /// `a_t`, `[N, T]`.
    actions: Vec<i64>,
    /// True and proxy reward of each step, `[N, T]`.
    true_reward: Vec<f32>,
    proxy_reward: Vec<f32>,
    /// 1 on the steps of the episode, 0 after an early termination, `[N, T]`.
    mask: Vec<f32>,
    /// The episode ran to the horizon (bootstrap with `V(s_T)`), `[N]`.
    truncated: Vec<bool>,
    /// The episode visited the bucket, `[N]`.
    bucket: Vec<bool>,
}

impl Rollout {
    /// Undiscounted return of each episode.
    fn returns(&self, rewards: &[f32]) -> Vec<f64> {
        rewards
            .chunks(self.horizon)
            .zip(self.mask.chunks(self.horizon))
            .map(|(r, m)| r.iter().zip(m).map(|(&r, &m)| f64::from(r * m)).sum())
            .collect()
    }

    fn bucket_rate(&self) -> f64 {
        self.bucket.iter().filter(|&&b| b).count() as f64 / self.envs as f64
    }

    /// Flat indices `i * T + t` of the valid steps, `[M]`.
    fn valid<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1, Int> {
        let ids: Vec<i64> = (0..self.mask.len())
            .filter(|&j| self.mask[j] != 0.0)
            .map(|j| j as i64)
            .collect();
        let m = ids.len();
        Tensor::from_data(TensorData::new(ids, [m]), device)
    }

    fn tensor2<B: Backend>(&self, data: &[f32], device: &B::Device) -> Tensor<B, 2> {
        Tensor::from_data(
            TensorData::new(data.to_vec(), [self.envs, self.horizon]),
            device,
        )
    }

    fn obs_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3> {
        let shape = [self.envs, self.horizon, self.obs_dim];
        Tensor::from_data(TensorData::new(self.obs.clone(), shape), device)
    }

    fn actions_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2, Int> {
        let shape = [self.envs, self.horizon];
        Tensor::from_data(TensorData::new(self.actions.clone(), shape), device)
    }

    /// Observations `[M, K]` and actions `[M]` of the valid steps.
    fn valid_pairs<B: Backend>(
        &self,
        valid: &Tensor<B, 1, Int>,
        device: &B::Device,
    ) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
        let (n, t, k) = (self.envs, self.horizon, self.obs_dim);
        let obs = self.obs_tensor::<B>(device).reshape([n * t, k]);
        let actions = self.actions_tensor::<B>(device).reshape([n * t]);
        (
            obs.select(0, valid.clone()),
            actions.select(0, valid.clone()),
        )
    }
}

/// Runs `policy` (sampling) in `n` fresh environments for exactly `env.horizon` steps.
/// Streams: `"<stream>/env"` for the environments' action noise, `"<stream>/actions"` for
/// the policy's samples.
fn rollout<B: Backend>(
    policy: &MlpPolicy<B>,
    env: &TomatoConfig,
    n: usize,
    seed: u64,
    stream: &str,
    device: &B::Device,
) -> Result<Rollout> {
    let horizon = env.horizon;
    // The vectorised environment never truncates inside the rollout (its limit is one
    // past ours), so the observation after the last step is the real `s_T`, not the
    // first state of a reset episode; truncation at `horizon` is marked here.
    let inner = TomatoConfig {
        horizon: horizon.saturating_add(1),
        ..env.clone()
    };
    let mut vec = TomatoVec::new(inner, n, seed::derive(seed, &format!("{stream}/env")))?;
    let mut rng = seed::rng(seed, &format!("{stream}/actions"));
    let k = vec.obs_dim();
    let bucket_bit = k - 1;
    let mut out = Rollout {
        envs: n,
        horizon,
        obs_dim: k,
        obs: vec![0.0; n * horizon * k],
        final_obs: vec![0.0; n * k],
        actions: vec![0; n * horizon],
        true_reward: vec![0.0; n * horizon],
        proxy_reward: vec![0.0; n * horizon],
        mask: vec![0.0; n * horizon],
        truncated: vec![false; n],
        bucket: vec![false; n],
    };
    let mut alive = vec![true; n];
    let mut obs = vec.reset();
    for t in 0..horizon {
        let input = Tensor::<B, 2>::from_data(TensorData::new(obs.clone(), [n, k]), device);
        let (actions, _) = policy.sample(input, &mut rng)?;
        let step = vec.step(&actions)?;
        for i in 0..n {
            if !alive[i] {
                continue;
            }
            let j = i * horizon + t;
            let s = &obs[i * k..(i + 1) * k];
            out.obs[j * k..(j + 1) * k].copy_from_slice(s);
            out.actions[j] = actions[i] as i64;
            out.true_reward[j] = step.true_reward[i];
            out.proxy_reward[j] = step.proxy_reward[i];
            out.mask[j] = 1.0;
            // The bucket bit is sticky, so reading it before each step and after the
            // last one sees every visit. A terminal step never lands on the bucket: it
            // waters no tomato there, so every tomato was already watered before it and
            // the episode would have ended a step earlier.
            out.bucket[i] |= s[bucket_bit] != 0.0;
            if step.terminated[i] {
                alive[i] = false;
            } else if t + 1 == horizon {
                let s_t = &step.obs[i * k..(i + 1) * k];
                out.final_obs[i * k..(i + 1) * k].copy_from_slice(s_t);
                out.truncated[i] = true;
                out.bucket[i] |= s_t[bucket_bit] != 0.0;
            }
        }
        obs = step.obs;
    }
    Ok(out)
}

/// GAE over one batch of episodes `[N, T]` with truncation bootstrapping: the last step of
/// each episode that reached the horizon gets `r_{T-1} + gamma V(s_T)` (`bootstrap [N]`
/// holds `V(s_T)` there and 0 for terminated episodes), then [`gae`] runs with `V_T = 0`.
/// Steps with `mask = 0` (after an early termination) get advantage and return 0.
fn advantages<B: Backend>(
    rewards: Tensor<B, 2>,
    values: Tensor<B, 2>,
    bootstrap: Tensor<B, 1>,
    mask: &Tensor<B, 2>,
    config: &PpoConfig,
) -> Result<AdvantageOutput<B>> {
    let [n, t] = rewards.dims();
    let device = rewards.device();
    let last = bootstrap.reshape([n, 1]) * config.gamma;
    let bonus = Tensor::cat(vec![Tensor::zeros([n, t - 1], &device), last], 1);
    let gae_config = GaeConfig {
        gamma: config.gamma,
        lambda: config.lambda,
        whiten: config.whiten_advantages,
        whitening: Whitening::Unbiased,
    };
    gae(rewards + bonus, values, mask, &gae_config)
}

/// Errors unless `reg` is one this PPO runs (`action_kl` with the MDP's `gamma`, or a
/// state-action `chi2_occupancy` over the environment's observations), naming the key.
fn check_regularizer(reg: &RegularizerConfig, obs_dim: usize, gamma: f64) -> Result<()> {
    match reg {
        RegularizerConfig::ActionKl(c) if (c.gamma - gamma).abs() > 1e-6 => Err(GoodhartError::invalid(
            "reg.gamma",
            format!(
                "{} differs from the PPO discount {gamma}: coef / (1 - gamma) scales the KL to the occupancy of this MDP",
                c.gamma
            ),
        )),
        RegularizerConfig::ActionKl(_) => Ok(()),
        RegularizerConfig::Chi2Occupancy(c) if c.obs_dim != obs_dim => Err(GoodhartError::invalid(
            "reg.obs_dim",
            format!("{} differs from the environment's observation length {obs_dim}", c.obs_dim),
        )),
        RegularizerConfig::Chi2Occupancy(c) if c.num_actions != Some(NUM_ACTIONS) => {
            Err(GoodhartError::invalid(
                "reg.num_actions",
                format!("the discriminator reads state-action pairs: set {NUM_ACTIONS}, got {:?}", c.num_actions),
            ))
        }
        RegularizerConfig::Chi2Occupancy(_) => Ok(()),
        other => Err(GoodhartError::invalid(
            "reg.kind",
            format!(
                "`{}` does not apply to the tomato gridworld: use `action_kl` or `chi2_occupancy`",
                other.name()
            ),
        )),
    }
}

/// Trains `init` with PPO on `env` against `reward`, regularised by `reg` (a
/// goodhart-regularize [`RegularizerConfig`]: `action_kl` or `chi2_occupancy`) towards `base`,
/// for `config.iterations` iterations (see the module docs for one iteration); calls
/// `log` after each one and stops at its first error. Returns the trained agent.
///
/// Errors: an invalid `config` or `reg` ([`GoodhartError::InvalidArgument`]), `reg`
/// other than `None` without `base` ([`GoodhartError::InvalidArgument`] naming `base`),
/// an agent or base policy whose input width is not the environment's observation
/// length ([`GoodhartError::ShapeMismatch`]), a malformed environment, or non-finite
/// losses.
#[allow(clippy::too_many_arguments)]
pub fn train<B: AutodiffBackend>(
    config: &PpoConfig,
    env: &TomatoConfig,
    reward: TrainReward,
    reg: Option<&RegularizerConfig>,
    init: Agent<B>,
    base: Option<&MlpPolicy<B>>,
    seed: u64,
    device: &B::Device,
    log: &mut dyn FnMut(&IterationMetrics) -> Result<()>,
) -> Result<Agent<B>> {
    config.validate()?;
    if reg.is_some() && base.is_none() {
        return Err(GoodhartError::invalid(
            "base",
            "a regularised run needs the base policy",
        ));
    }
    let obs_dim = Board::parse(&env.board)?.obs_dim();
    if let Some(r) = reg {
        check_regularizer(r, obs_dim, f64::from(config.gamma))?;
    }
    seed::seed_backend::<B>(device, seed, "ppo");
    let mut regularizer = reg.map(|r| r.build::<B>(device)).transpose()?;
    let occupancy = matches!(reg, Some(RegularizerConfig::Chi2Occupancy(_)));
    let base = base.map(|b| b.valid());
    let mut optim = AdamConfig::new().with_epsilon(1e-5).init::<B, Agent<B>>();
    let ppo = PpoClipConfig {
        eps_low: config.clip,
        eps_high: config.clip,
        dual_clip: false,
        clip_ratio_c: 3.0,
        aggregation: LossAggregation::TokenMean,
    };
    let value_loss = ValueLossConfig {
        clip: config.value_clip.is_some(),
        cliprange_value: config.value_clip.unwrap_or(0.0),
        aggregation: LossAggregation::TokenMean,
    };
    let mut agent = init;
    let mut timesteps = 0;
    for it in 0..config.iterations {
        let stream = format!("ppo/{it}");
        let policy = agent.policy.valid();
        let ro = rollout(
            &policy,
            env,
            config.envs,
            seed,
            &format!("{stream}/policy"),
            device,
        )?;
        let (n, t, k) = (ro.envs, ro.horizon, ro.obs_dim);
        let valid = ro.valid::<B::InnerBackend>(device);
        let m = valid.dims()[0];
        timesteps += m;
        let mask = ro.tensor2::<B::InnerBackend>(&ro.mask, device);
        let trained = match reward {
            TrainReward::True => &ro.true_reward,
            TrainReward::Proxy => &ro.proxy_reward,
        };
        let mut rewards = ro.tensor2::<B::InnerBackend>(trained, device);
        let (obs, actions) = ro.valid_pairs::<B::InnerBackend>(&valid, device);
        // Step 2: the occupancy penalty, from a discriminator updated on this iteration's
        // current-policy and base-policy pairs.
        let (mut reg_term, mut disc_loss) = (None, None);
        if let (true, Some(reg), Some(base)) = (occupancy, regularizer.as_mut(), &base) {
            let base_ro = rollout(
                base,
                env,
                config.envs,
                seed,
                &format!("{stream}/base"),
                device,
            )?;
            let lift3 = |x: Tensor<B::InnerBackend, 3>| Tensor::<B, 3>::from_inner(x);
            let lift2i = |x: Tensor<B::InnerBackend, 2, Int>| Tensor::<B, 2, Int>::from_inner(x);
            let inputs = RegInputs::<B> {
                observations: Some(lift3(ro.obs_tensor(device))),
                tokens: Some(lift2i(ro.actions_tensor(device))),
                mask: Some(Tensor::from_inner(mask.clone())),
                ref_observations: Some(lift3(base_ro.obs_tensor(device))),
                ref_tokens: Some(lift2i(base_ro.actions_tensor(device))),
                ref_mask: Some(Tensor::from_inner(
                    base_ro.tensor2::<B::InnerBackend>(&base_ro.mask, device),
                )),
                ..Default::default()
            };
            rewards = reg
                .shape_rewards(Tensor::from_inner(rewards), &inputs)?
                .inner();
            let m = reg.metrics();
            reg_term = m.get("chi2_occupancy/chi2").copied();
            disc_loss = m.get("chi2_occupancy/disc_loss").copied();
        }
        // Step 3: values, bootstrap and GAE.
        let critic = agent.value.valid();
        let values = critic
            .forward(ro.obs_tensor::<B::InnerBackend>(device).reshape([n * t, k]))?
            .reshape([n, t]);
        let truncated: Vec<f32> = ro
            .truncated
            .iter()
            .map(|&x| f32::from(u8::from(x)))
            .collect();
        let final_obs = Tensor::from_data(TensorData::new(ro.final_obs.clone(), [n, k]), device);
        let bootstrap =
            critic.forward(final_obs)? * Tensor::from_data(TensorData::new(truncated, [n]), device);
        let out = advantages(rewards, values.clone(), bootstrap, &mask, config)?;
        let returns = out
            .returns
            .ok_or_else(|| GoodhartError::invalid("gae", "returned no returns"))?;
        let flat = |x: Tensor<B::InnerBackend, 2>| x.reshape([n * t]).select(0, valid.clone());
        let (adv, returns, values_old) = (flat(out.advantages), flat(returns), flat(values));
        let (logp_old, _) = policy.log_prob_entropy(obs.clone(), actions.clone())?;
        let base_logits = match &base {
            Some(b) => Some(b.logits(obs.clone())?),
            None => None,
        };
        let kl_base = match &base_logits {
            Some(bl) => Some(scalar(
                action_kl_per_state(policy.logits(obs.clone())?, bl.clone()).mean(),
            )),
            None => None,
        };
        if matches!(reg, Some(RegularizerConfig::ActionKl(_))) {
            reg_term = kl_base;
        }
        // Step 4: the update.
        let lift1 = |x: Tensor<B::InnerBackend, 1>| Tensor::<B, 1>::from_inner(x);
        let (obs, actions) = (
            Tensor::<B, 2>::from_inner(obs),
            Tensor::<B, 1, Int>::from_inner(actions),
        );
        let (adv, returns, values_old, logp_old) = (
            lift1(adv),
            lift1(returns),
            lift1(values_old),
            lift1(logp_old),
        );
        let base_logits = base_logits.map(Tensor::<B, 2>::from_inner);
        let mut rng = seed::rng(seed, &format!("{stream}/minibatch"));
        let mut order: Vec<i64> = (0..m as i64).collect();
        let size = m.div_ceil(config.minibatches.min(m));
        let mut stats: [Vec<Tensor<B::InnerBackend, 1>>; 5] = Default::default();
        for _ in 0..config.epochs {
            order.shuffle(&mut rng);
            for chunk in order.chunks(size) {
                let b = chunk.len();
                let idx =
                    Tensor::<B, 1, Int>::from_data(TensorData::new(chunk.to_vec(), [b]), device);
                let pick = |x: &Tensor<B, 1>| x.clone().select(0, idx.clone()).reshape([b, 1]);
                let mb_obs = obs.clone().select(0, idx.clone());
                let logits = agent.policy.logits(mb_obs.clone())?;
                let mb_actions = actions.clone().select(0, idx.clone()).reshape([b, 1]);
                let (lp, entropy) = logprobs_from_logits(
                    logits.clone().reshape([b, 1, NUM_ACTIONS]),
                    mb_actions,
                    1.0,
                );
                let ones = Tensor::<B, 2>::ones([b, 1], device);
                let inputs = PolicyInputs::new(lp, pick(&logp_old), pick(&adv), ones.clone())?;
                let pl = ppo.loss(&inputs)?;
                let v = agent.value.forward(mb_obs)?.reshape([b, 1]);
                let vl = value_loss.loss(v, pick(&values_old), pick(&returns), &ones)?;
                let bonus = entropy_bonus(
                    entropy.clone(),
                    &ones,
                    config.entropy_coef,
                    LossAggregation::TokenMean,
                    None,
                )?;
                let mut loss = pl.loss.clone() + vl.loss.clone() * config.value_coef + bonus;
                if let (false, Some(reg), Some(bl)) =
                    (occupancy, regularizer.as_mut(), &base_logits)
                {
                    let bl = bl.clone().select(0, idx.clone());
                    let inputs = RegInputs::<B> {
                        logits: Some(logits.reshape([b, 1, NUM_ACTIONS])),
                        ref_logits: Some(bl.reshape([b, 1, NUM_ACTIONS])),
                        mask: Some(ones.clone()),
                        ..Default::default()
                    };
                    if let Some(term) = reg.loss(&inputs)? {
                        loss = loss + term;
                    }
                }
                let grads = GradientsParams::from_grads(loss.backward(), &agent);
                let (grads, _) = clip_grad_norm(&agent, grads, config.max_grad_norm)?;
                agent = optim.step(config.lr, agent, grads);
                let m = pl.metrics;
                for (s, x) in stats.iter_mut().zip([
                    pl.loss,
                    vl.loss,
                    entropy.mean(),
                    m.approx_kl_k3,
                    m.clip_frac_low + m.clip_frac_high,
                ]) {
                    s.push(x.inner());
                }
            }
        }
        let [policy_loss, value_loss_mean, entropy, approx_kl, clip_frac] =
            stats.map(|s| scalar(Tensor::cat(s, 0).mean()));
        if !(policy_loss.is_finite() && value_loss_mean.is_finite()) {
            return Err(GoodhartError::NonFinite {
                what: format!("ppo losses at iteration {it}"),
            });
        }
        let mean = |x: Vec<f64>| x.iter().sum::<f64>() / x.len() as f64;
        log(&IterationMetrics {
            iteration: it,
            timesteps,
            true_return: mean(ro.returns(&ro.true_reward)),
            proxy_return: mean(ro.returns(&ro.proxy_reward)),
            bucket_rate: ro.bucket_rate(),
            policy_loss,
            value_loss: value_loss_mean,
            entropy,
            approx_kl,
            clip_frac,
            reg_term,
            kl_base,
            disc_loss,
        })?;
    }
    Ok(agent)
}

/// The single value of a one-element tensor, as `f64`.
fn scalar<B: Backend>(x: Tensor<B, 1>) -> f64 {
    x.into_scalar().to_f64()
}

/// Runs `policy` (sampling, as ORPO evaluates) for `episodes` fresh episodes of `env` and
/// reports the mean true and proxy returns, the true return's spread and how often the
/// bucket is visited. Random streams `"evaluate/env"` and `"evaluate/actions"` of `seed`.
/// Errors on zero episodes ([`GoodhartError::Empty`]), a malformed environment or a
/// policy whose input width is not the observation length.
pub fn evaluate<B: Backend>(
    policy: &MlpPolicy<B>,
    env: &TomatoConfig,
    episodes: usize,
    seed: u64,
    device: &B::Device,
) -> Result<Returns> {
    if episodes == 0 {
        return Err(GoodhartError::Empty {
            what: "evaluation episodes".into(),
        });
    }
    let ro = rollout(policy, env, episodes, seed, "evaluate", device)?;
    let gold = ro.returns(&ro.true_reward);
    let proxy = ro.returns(&ro.proxy_reward);
    let n = episodes as f64;
    let mean = gold.iter().sum::<f64>() / n;
    let sd = if episodes > 1 {
        (gold.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    Ok(Returns {
        true_return: mean,
        proxy_return: proxy.iter().sum::<f64>() / n,
        true_sd: sd,
        bucket_rate: ro.bucket_rate(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_regularize::occupancy::{OccupancyConfig, OccupancyDivergence};

    use burn::module::Param;
    use goodhart_core::testing::{assert_close, tolerance, values};
    use goodhart_envs::tomato::RHARD;

    const RIGHT: usize = 0;
    const LEFT: usize = 1;
    const DOWN: usize = 2;

    /// Observation index of cell `(r, c)` on RHARD: tomatoes row-major, the bucket, empty
    /// cells row-major, the start (the order `goodhart_envs::tomato` documents).
    fn cell_index(r: usize, c: usize) -> usize {
        let cells: Vec<(usize, usize, char)> = RHARD
            .lines()
            .enumerate()
            .flat_map(|(i, l)| l.chars().enumerate().map(move |(j, ch)| (i, j, ch)))
            .collect();
        let order: Vec<(usize, usize)> = ['t', 'O', '.', 'A']
            .iter()
            .flat_map(|&k| cells.iter().filter(move |x| x.2 == k).map(|x| (x.0, x.1)))
            .collect();
        order.iter().position(|&x| x == (r, c)).unwrap()
    }

    /// A linear policy that plays `script[cell]` with probability 1 - 3e-22 (logit 50),
    /// and `default` in every other cell.
    fn tabular<B: Backend>(
        script: &[((usize, usize), usize)],
        default: usize,
        device: &B::Device,
    ) -> MlpPolicy<B> {
        let mut policy = MlpConfig::new(36)
            .with_hidden(vec![])
            .init_policy::<B>(NUM_ACTIONS, device)
            .unwrap();
        let mut w = vec![0.0f32; 36 * NUM_ACTIONS];
        for cell in 0..26 {
            w[cell * NUM_ACTIONS + default] = 50.0;
        }
        for &((r, c), a) in script {
            let i = cell_index(r, c);
            w[i * NUM_ACTIONS..(i + 1) * NUM_ACTIONS]
                .iter_mut()
                .for_each(|x| *x = 0.0);
            w[i * NUM_ACTIONS + a] = 50.0;
        }
        policy.mlp.head.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(w, [36, NUM_ACTIONS]),
            device,
        ));
        policy.mlp.head.bias = Some(Param::from_tensor(Tensor::zeros([NUM_ACTIONS], device)));
        policy
    }

    goodhart_core::backend_test! {
        fn gae_bootstraps_truncated_episodes_only<B>(device) {
            // gamma = lambda = 0.5, no whitening. Env 0 reaches the horizon (T = 3) with
            // V(s_T) = 4; env 1 terminates after step 1 (mask 1, 1, 0; its garbage at t = 2
            // and its bootstrap slot are ignored).
            let config = PpoConfig { gamma: 0.5, lambda: 0.5, whiten_advantages: false, ..Default::default() };
            let r = Tensor::<B, 2>::from_floats([[1.0, 0.0, 2.0], [1.0, 1.0, 9.0]], device);
            let v = Tensor::<B, 2>::from_floats([[1.0, 2.0, 0.0], [2.0, 1.0, 7.0]], device);
            let boot = Tensor::<B, 1>::from_floats([4.0, 0.0], device);
            let mask = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], device);
            let out = advantages(r, v, boot, &mask, &config).unwrap();
            // env 0: r'_2 = 2 + 0.5 * 4 = 4.
            //   d2 = 4 - 0 = 4                     A2 = 4
            //   d1 = 0 + 0.5 * 0 - 2 = -2          A1 = -2 + 0.25 * 4 = -1
            //   d0 = 1 + 0.5 * 2 - 1 = 1           A0 = 1 + 0.25 * (-1) = 0.75
            //   returns A + V = 1.75, 1, 4
            // env 1: d1 = 1 - 1 = 0, A1 = 0; d0 = 1 + 0.5 * 1 - 2 = -0.5, A0 = -0.5;
            //   returns 1.5, 1, (masked) 0
            let tol = tolerance(1e-6);
            assert_close(&values(out.advantages), &[0.75, -1.0, 4.0, -0.5, 0.0, 0.0], tol);
            assert_close(&values(out.returns.unwrap()), &[1.75, 1.0, 4.0, 1.5, 1.0, 0.0], tol);
        }
    }

    goodhart_core::backend_test! {
        fn scripted_policies_give_hand_computed_returns<B>(device) {
            let env = TomatoConfig { horizon: 20, ..Default::default() };
            // Always down: (4,1) -> the tomato at (5,1), then the wall below keeps it there,
            // watered: 0.02 on each of the 20 steps = 0.4, never the bucket.
            let down = tabular::<B>(&[], DOWN, device);
            let r = evaluate(&down, &env, 3, 0, device).unwrap();
            assert!((r.true_return - 0.4).abs() < 1e-5 && (r.proxy_return - 0.4).abs() < 1e-5, "{r:?}");
            assert_eq!((r.true_sd, r.bucket_rate), (0.0, 0.0));
            // The walk of the environment's own test: right x4, down x3, left x4 reaches the
            // bucket at step 11 with true rewards (0,0,0,0,f,f,f,f,f,0,0): 5f = 0.1. It then
            // pushes left into the wall: true 0 and proxy 26f = 0.52 on steps 11..20, so
            // the proxy return is 0.1 + 10 * 0.52 = 5.3.
            let walk = [
                ((4, 1), RIGHT), ((4, 2), RIGHT), ((4, 3), RIGHT), ((4, 4), RIGHT), ((4, 5), DOWN),
                ((5, 5), DOWN), ((6, 5), DOWN), ((7, 5), LEFT), ((7, 4), LEFT), ((7, 3), LEFT),
                ((7, 2), LEFT), ((7, 1), LEFT),
            ];
            let hack = tabular::<B>(&walk, LEFT, device);
            let r = evaluate(&hack, &env, 2, 0, device).unwrap();
            assert!((r.true_return - 0.1).abs() < 1e-5, "{r:?}");
            assert!((r.proxy_return - 5.3).abs() < 1e-4, "{r:?}");
            assert_eq!(r.bucket_rate, 1.0);
            // The rollout's own bookkeeping: one episode per environment, truncated at the
            // horizon, with the state after the last step kept for the bootstrap.
            let ro = rollout(&hack, &env, 2, 0, "test", device).unwrap();
            assert_eq!(ro.truncated, vec![true, true]);
            assert_eq!(ro.mask.iter().sum::<f32>(), 40.0);
            assert_eq!(ro.final_obs[cell_index(7, 1)], 1.0);
            assert_eq!(ro.obs[cell_index(4, 1)], 1.0); // s_0 is the start
            assert_eq!(ro.actions[..5], [0, 0, 0, 0, 2]);
        }
    }

    goodhart_core::backend_test! {
        fn early_termination_is_masked<B>(device) {
            // "#At.#": stepping right waters the only tomato and ends the episode at step 1.
            let env = TomatoConfig { board: "#####\n#At.#\n#####".into(), horizon: 5, ..Default::default() };
            let mut policy = MlpConfig::new(5).with_hidden(vec![]).init_policy::<B>(NUM_ACTIONS, device).unwrap();
            policy.mlp.head.bias = Some(Param::from_tensor(Tensor::from_floats([50.0, 0.0, 0.0, 0.0], device)));
            let ro = rollout(&policy, &env, 2, 0, "test", device).unwrap();
            assert_eq!(ro.mask, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
            assert_eq!(ro.truncated, vec![false, false]);
            let r = evaluate(&policy, &env, 2, 0, device).unwrap();
            assert!((r.true_return - 0.02).abs() < 1e-6, "{r:?}");
        }
    }

    #[test]
    fn bad_config_is_a_typed_error() {
        let bad = [
            PpoConfig {
                envs: 0,
                ..Default::default()
            },
            PpoConfig {
                epochs: 0,
                ..Default::default()
            },
            PpoConfig {
                minibatches: 0,
                ..Default::default()
            },
            PpoConfig {
                lr: f64::NAN,
                ..Default::default()
            },
            PpoConfig {
                lr: 0.0,
                ..Default::default()
            },
            PpoConfig {
                gamma: 1.0,
                ..Default::default()
            },
            PpoConfig {
                lambda: 1.5,
                ..Default::default()
            },
            PpoConfig {
                clip: 0.0,
                ..Default::default()
            },
            PpoConfig {
                entropy_coef: -1.0,
                ..Default::default()
            },
            PpoConfig {
                max_grad_norm: f64::INFINITY,
                ..Default::default()
            },
            PpoConfig {
                hidden: vec![64, 0],
                ..Default::default()
            },
            PpoConfig {
                value_clip: Some(-0.1),
                ..Default::default()
            },
        ];
        for c in bad {
            assert!(
                matches!(c.validate(), Err(GoodhartError::InvalidArgument { .. })),
                "{c:?}"
            );
        }
        assert_eq!(PpoConfig::default().validate(), Ok(()));
    }

    #[test]
    fn configs_read_from_toml() {
        let c: PpoConfig = toml::from_str("iterations = 3\nhidden = [8]").unwrap();
        assert_eq!((c.iterations, c.hidden.clone(), c.clip), (3, vec![8], 0.05));
        assert!(toml::from_str::<PpoConfig>("iteration = 3").is_err());
        assert_eq!(
            serde_json::to_string(&TrainReward::Proxy).unwrap(),
            "\"proxy\""
        );
    }

    /// A small, fast setting for the determinism and error tests.
    fn tiny() -> (PpoConfig, TomatoConfig) {
        let config = PpoConfig {
            iterations: 2,
            envs: 3,
            epochs: 2,
            minibatches: 2,
            hidden: vec![16],
            ..Default::default()
        };
        (
            config,
            TomatoConfig {
                horizon: 12,
                ..Default::default()
            },
        )
    }

    goodhart_core::backend_test! {
        fn training_errors_are_typed<B>(device) {
            type A<B> = Autodiff<B>;
            let (config, env) = tiny();
            let agent = init_agent_seeded::<A<B>>(&config, &env, 0, device).unwrap();
            let mut log = |_: &IterationMetrics| Ok(());
            let kl = |text: &str| -> RegularizerConfig { toml::from_str(text).unwrap() };
            let e = train(&config, &env, TrainReward::Proxy, Some(&kl("kind = \"action_kl\"\ncoef = 0.1")), agent.clone(), None, 0, device, &mut log).unwrap_err();
            assert!(matches!(&e, GoodhartError::InvalidArgument { name, .. } if name == "base"), "{e}");
            // A bad coefficient, a discount other than the MDP's, a discriminator for
            // another observation, a regulariser of language models: each names its key.
            let obs = Board::parse(&env.board).unwrap().obs_dim();
            for (text, key) in [
                ("kind = \"action_kl\"\ncoef = -1.0".to_string(), "coef"),
                ("kind = \"action_kl\"\ngamma = 0.5".to_string(), "reg.gamma"),
                (format!("kind = \"chi2_occupancy\"\nobs_dim = {}\nnum_actions = 4", obs + 1), "reg.obs_dim"),
                (format!("kind = \"chi2_occupancy\"\nobs_dim = {obs}"), "reg.num_actions"),
                (format!("kind = \"chi2_occupancy\"\nobs_dim = {obs}\nnum_actions = 4\ndisc_steps = 0"), "disc_steps / disc_batch"),
                ("kind = \"entropy\"".to_string(), "reg.kind"),
            ] {
                let e = train(&config, &env, TrainReward::Proxy, Some(&kl(&text)), agent.clone(), Some(&agent.policy), 0, device, &mut log).unwrap_err();
                assert!(matches!(&e, GoodhartError::InvalidArgument { name, .. } if name == key), "{text}: {e}");
            }
            let bad = PpoConfig { envs: 0, ..config.clone() };
            assert!(train(&bad, &env, TrainReward::True, None, agent.clone(), None, 0, device, &mut log).is_err());
            // An agent built for another board does not fit this one's observations.
            let small = TomatoConfig { board: "#####\n#At.#\n#####".into(), ..Default::default() };
            let e = train(&config, &small, TrainReward::True, None, agent.clone(), None, 0, device, &mut log).unwrap_err();
            assert!(matches!(e, GoodhartError::ShapeMismatch { .. }), "{e}");
            assert!(matches!(evaluate(&agent.policy, &env, 0, 0, device), Err(GoodhartError::Empty { .. })));
            // The log's error stops training.
            let mut failing = |_: &IterationMetrics| Err(GoodhartError::invalid("sink", "full"));
            assert!(train(&config, &env, TrainReward::True, None, agent, None, 0, device, &mut failing).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn same_seed_same_metrics<B>(device) {
            type A<B> = Autodiff<B>;
            let (config, env) = tiny();
            // One initial agent for every run: the backend RNG is global, so a test on
            // another thread could draw from it between seeding and initialisation.
            let init = init_agent_seeded::<A<B>>(&config, &env, 1, device).unwrap();
            let run = |reg: Option<&RegularizerConfig>, seed: u64| {
                let agent = init.clone();
                let base = agent.policy.clone();
                let mut metrics = Vec::new();
                let mut log = |m: &IterationMetrics| {
                    metrics.push(m.clone());
                    Ok(())
                };
                let out = train(&config, &env, TrainReward::Proxy, reg, agent, Some(&base), seed, device, &mut log).unwrap();
                let eval = evaluate(&out.policy, &env, 4, 9, device).unwrap();
                (metrics, eval)
            };
            let obs = Board::parse(&env.board).unwrap().obs_dim();
            let chi2: RegularizerConfig = toml::from_str(&format!(
                "kind = \"chi2_occupancy\"\nobs_dim = {obs}\nnum_actions = 4\ncoef = 0.1\nwidth = 16\ndepth = 1\ndisc_steps = 2\ndisc_batch = 8"
            )).unwrap();
            let kl: RegularizerConfig = toml::from_str("kind = \"action_kl\"\ncoef = 0.1").unwrap();
            for reg in [None, Some(&kl), Some(&chi2)] {
                let (a, ea) = run(reg, 5);
                let (b, eb) = run(reg, 5);
                assert_eq!(a, b, "{reg:?}");
                assert_eq!(ea, eb);
                assert_eq!(a.len(), 2);
                assert_eq!(a[1].timesteps, 2 * 3 * 12);
                assert!(a.iter().all(|m| m.policy_loss.is_finite() && m.entropy > 0.0 && m.entropy <= 4f64.ln() + 1e-6));
                match reg {
                    None => assert!(a[0].reg_term.is_none() && a[0].kl_base.is_some()),
                    // Before the first update the policy is the base: KL 0.
                    Some(RegularizerConfig::ActionKl(_)) => {
                        assert!(a[0].reg_term.unwrap().abs() < 1e-6);
                        assert!(a[1].reg_term.unwrap() > 0.0);
                    }
                    Some(_) => assert!(a[0].reg_term.is_some() && a[0].disc_loss.is_some()),
                }
                let (c, _) = run(reg, 6);
                assert_ne!(a, c, "another seed, other rollouts");
            }
        }
    }

    goodhart_core::backend_test! {
        fn true_reward_ppo_beats_the_random_policy<B>(device) {
            type A<B> = Autodiff<B>;
            // Three iterations with a wider clip (0.2) keep this near 15 s on wgpu
            // (lavapipe), where each environment step costs a device round trip.
            let env = TomatoConfig::default();
            let train_env = TomatoConfig { eps: 0.1, ..env.clone() };
            let config = PpoConfig { iterations: 3, clip: 0.2, hidden: vec![64, 64], ..Default::default() };
            let agent = init_agent_seeded::<A<B>>(&config, &env, 0, device).unwrap();
            let before = evaluate(&agent.policy, &env, 64, 1, device).unwrap();
            let mut log = |_: &IterationMetrics| Ok(());
            let trained = train(&config, &train_env, TrainReward::True, None, agent, None, 0, device, &mut log).unwrap();
            let after = evaluate(&trained.policy, &env, 64, 1, device).unwrap();
            // Measured on cpu: random 5.32 (sd 2.0, so the mean of 64 is +- 0.25), trained
            // 7.57 (sd 1.4).
            assert!(after.true_return > before.true_return + 1.5, "{before:?} -> {after:?}");
        }
    }

    /// The tomato experiment end to end, printing the figures (run with
    /// `cargo test -p goodhart-train --lib ppo::tests::measure -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure() {
        type A = Autodiff<goodhart_core::device::Dispatch>;
        let device = goodhart_core::device::cpu();
        let parse = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.into());
        let seeds: Vec<u64> = parse("SEEDS", "0")
            .split(',')
            .map(|s| s.parse().unwrap())
            .collect();
        let base_iters: usize = parse("BASE_ITERS", "60").parse().unwrap();
        let proxy_iters: usize = parse("PROXY_ITERS", "60").parse().unwrap();
        let envs: usize = parse("ENVS", "16").parse().unwrap();
        let verbose = std::env::var("VERBOSE").is_ok();
        let kl_coefs: Vec<f64> = parse("KL", "0.001,0.01,0.1")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let chi_coefs: Vec<f64> = parse("CHI", "0.001,0.01,0.1")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect();
        let div = parse("DIV", "sqrt_chi2");
        let divergence: OccupancyDivergence = serde_json::from_str(&format!("\"{div}\"")).unwrap();
        let eval_env = TomatoConfig::default();
        let train_env = TomatoConfig {
            eps: 0.1,
            ..Default::default()
        };
        let mut cfg = PpoConfig {
            envs,
            iterations: base_iters,
            ..Default::default()
        };
        if let Ok(h) = std::env::var("HIDDEN") {
            cfg.hidden = h.split(',').map(|s| s.parse().unwrap()).collect();
        }
        if let Ok(e) = std::env::var("EPOCHS") {
            cfg.epochs = e.parse().unwrap();
        }
        if let Ok(e) = std::env::var("MB") {
            cfg.minibatches = e.parse().unwrap();
        }
        if let Ok(e) = std::env::var("GN") {
            cfg.max_grad_norm = e.parse().unwrap();
        }
        if let Ok(e) = std::env::var("VC") {
            cfg.value_coef = e.parse().unwrap();
        }
        let mut table: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
        let mut push = |name: String, r: Returns| {
            if let Some(row) = table.iter_mut().find(|row| row.0 == name) {
                row.1.push(r.true_return);
                row.2.push(r.bucket_rate);
            } else {
                table.push((name, vec![r.true_return], vec![r.bucket_rate]));
            }
        };
        for &seed in &seeds {
            let t0 = std::time::Instant::now();
            let init = init_agent_seeded::<A>(&cfg, &eval_env, seed, &device).unwrap();
            let r0 = evaluate(&init.policy, &eval_env, 200, seed, &device).unwrap();
            push("random".into(), r0);
            let mut logger = |m: &IterationMetrics| {
                if verbose && m.iteration % 10 == 9 {
                    println!("  it {} true {:.3} proxy {:.3} bucket {:.2} H {:.3} kl {:.4} clip {:.3} vl {:.4} reg {:?}", m.iteration, m.true_return, m.proxy_return, m.bucket_rate, m.entropy, m.approx_kl, m.clip_frac, m.value_loss, m.reg_term);
                }
                Ok(())
            };
            let base = train(
                &cfg,
                &train_env,
                TrainReward::True,
                None,
                init,
                None,
                seed,
                &device,
                &mut logger,
            )
            .unwrap();
            let rb = evaluate(&base.policy, &eval_env, 200, seed, &device).unwrap();
            println!(
                "seed {seed}: random {r0:?}\n  base {rb:?} ({:.1} s)",
                t0.elapsed().as_secs_f64()
            );
            push("base".into(), rb);
            let pcfg = PpoConfig {
                iterations: proxy_iters,
                ..cfg.clone()
            };
            let obs_dim = Board::parse(&eval_env.board).unwrap().obs_dim();
            let mut runs = vec![("none".to_string(), None)];
            runs.extend(kl_coefs.iter().map(|&c| {
                let r =
                    RegularizerConfig::ActionKl(goodhart_regularize::action_kl::ActionKlConfig {
                        coef: c,
                        gamma: f64::from(pcfg.gamma),
                    });
                (format!("kl {c}"), Some(r))
            }));
            runs.extend(chi_coefs.iter().map(|&c| {
                let r = RegularizerConfig::Chi2Occupancy(OccupancyConfig {
                    num_actions: Some(NUM_ACTIONS),
                    coef: c,
                    divergence,
                    seed,
                    ..OccupancyConfig::new(obs_dim)
                });
                (format!("{div} {c}"), Some(r))
            }));
            for (name, reg) in runs {
                let t1 = std::time::Instant::now();
                let agent = train(
                    &pcfg,
                    &eval_env,
                    TrainReward::Proxy,
                    reg.as_ref(),
                    base.clone(),
                    Some(&base.policy),
                    seed,
                    &device,
                    &mut logger,
                )
                .unwrap();
                let r = evaluate(&agent.policy, &eval_env, 200, seed, &device).unwrap();
                println!("  {name}: {r:?} ({:.1} s)", t1.elapsed().as_secs_f64());
                push(name, r);
            }
        }
        println!("\nmean over seeds {seeds:?}:");
        for (name, t, b) in &table {
            let n = t.len() as f64;
            println!(
                "{name:>16}: true {:.3} (per seed {:?}) bucket {:.2}",
                t.iter().sum::<f64>() / n,
                t.iter()
                    .map(|x| (x * 1000.0).round() / 1000.0)
                    .collect::<Vec<_>>(),
                b.iter().sum::<f64>() / n
            );
        }
    }
}
