//! Chi-squared occupancy-measure regularisation (ORPO; Laidlaw, Singhal, Dragan 2024,
//! "Correlated Proxies: A New Definition and Improved Mitigation for Reward Hacking").
//!
//! A [`Discriminator`] `d(s, a)` is trained to separate state-action pairs of the current
//! policy from those of the base policy with the logistic loss
//! `E_pi[softplus(-d)] + E_base[softplus(d)]`, whose minimiser is
//! `d = log mu_pi(s,a) / mu_base(s,a)`. With `w = exp(d)` the density ratio, each visited
//! pair gets a penalty term ([`OccupancyDivergence`]):
//!
//! | name | term | gradient of |
//! |---|---|---|
//! | `chi2` | `w - 1` | `chi2(mu_pi || mu_base) = E_pi[w] - 1` |
//! | `sqrt_chi2` | `(w - 1) / sqrt(trimmed_mean(w - 1))` | `2 sqrt(chi2)` (ORPO's main objective) |
//! | `kl` | `d` | `KL(mu_pi || mu_base)` |
//! | `tv` | `sign(d)` | total variation |
//!
//! and the reward becomes `r' = clip(r - coef * term, -clip, clip)`. ORPO's theory gives
//! `max J(pi, R~) - lambda sqrt(chi2(mu_pi || mu_ref))` with `lambda = sigma_R~ sqrt(1 - r^2)`;
//! in its experiments half the rollouts come from the base policy, and the discriminator
//! is an MLP of width 256 and depth 2 over the observation and the one-hot action.
//! Works with any environment whose observations are vectors.
//!
//! Through the [`crate::Regularizer`] trait one call does both halves of a step: given
//! reference-policy episodes (`ref_observations`, `ref_tokens`, `ref_mask`), the
//! discriminator first takes `disc_steps` Adam steps, each on `disc_batch` valid pairs
//! drawn without replacement from either side ([`OccupancyRegularizer::fit`]); then the
//! current episodes' rewards are penalised.

use burn::{
    module::Module,
    nn::{Linear, LinearConfig},
    optim::{adaptor::OptimizerAdaptor, Adam, AdamConfig, GradientsParams, Optimizer},
    prelude::Config,
    tensor::{
        activation::{relu, softplus},
        backend::{AutodiffBackend, Backend},
        cast::ToElement,
        Int, Tensor,
    },
};
use goodhart_core::{ops::check_finite, seed, GoodhartError, Result};
use serde::{Deserialize, Serialize};

/// Configuration of the occupancy [`Discriminator`] (ORPO: width 256, depth 2).
#[derive(Config, Debug)]
pub struct DiscriminatorConfig {
    /// Length of the observation vector.
    pub obs_dim: usize,
    /// Number of discrete actions, appended one-hot to the observation; `None` for a
    /// state-only discriminator `d(s)`.
    #[config(default = "None")]
    pub num_actions: Option<usize>,
    /// Hidden width.
    #[config(default = 256)]
    pub width: usize,
    /// Number of hidden layers.
    #[config(default = 2)]
    pub depth: usize,
}

impl DiscriminatorConfig {
    /// Builds the MLP `input -> (Linear, ReLU) x depth -> Linear -> 1` on `device`
    /// (burn's default Kaiming-uniform initialisation, seeded by the backend RNG). The
    /// parameters are drawn now (burn initialises lazily otherwise), so seeding the backend
    /// right before this call fixes them.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Discriminator<B> {
        let d_in = self.obs_dim + self.num_actions.unwrap_or(0);
        let hidden = (0..self.depth)
            .map(|i| {
                let d = if i == 0 { d_in } else { self.width };
                LinearConfig::new(d, self.width).init(device)
            })
            .collect();
        let last = if self.depth == 0 { d_in } else { self.width };
        goodhart_core::params::materialized(Discriminator {
            hidden,
            output: LinearConfig::new(last, 1).init(device),
            obs_dim: self.obs_dim,
            num_actions: self.num_actions,
        })
    }
}

/// The occupancy discriminator `d(s, a) ~ log mu_pi(s,a) / mu_base(s,a)`.
#[derive(Module, Debug)]
pub struct Discriminator<B: Backend> {
    hidden: Vec<Linear<B>>,
    output: Linear<B>,
    obs_dim: usize,
    num_actions: Option<usize>,
}

impl<B: Backend> Discriminator<B> {
    /// The network input `[N, obs_dim (+ num_actions)]`: observations `[N, obs_dim]`
    /// concatenated with one-hot `actions [N]` (required iff the config has
    /// `num_actions`). Errors on wrong shapes, non-finite observations, a missing or
    /// superfluous action tensor, or an action id out of range.
    pub fn features(
        &self,
        obs: Tensor<B, 2>,
        actions: Option<Tensor<B, 1, Int>>,
    ) -> Result<Tensor<B, 2>> {
        let [n, k] = obs.dims();
        if k != self.obs_dim {
            return Err(GoodhartError::shape(
                "observations",
                &[n, self.obs_dim],
                &[n, k],
            ));
        }
        if n == 0 {
            return Err(GoodhartError::Empty {
                what: "observations".into(),
            });
        }
        check_finite(&obs, "observations")?;
        match (self.num_actions, actions) {
            (None, None) => Ok(obs),
            (Some(num), Some(a)) => {
                if a.dims() != [n] {
                    return Err(GoodhartError::shape("actions", &[n], &a.dims()));
                }
                let out_of_range = a
                    .clone()
                    .lower_elem(0)
                    .bool_or(a.clone().greater_equal_elem(num as i64))
                    .any()
                    .into_scalar()
                    .to_bool();
                if out_of_range {
                    return Err(GoodhartError::invalid(
                        "actions",
                        format!("action ids must lie in [0, {num})"),
                    ));
                }
                let onehot = a.one_hot::<2>(num).float();
                Ok(Tensor::cat(vec![obs, onehot], 1))
            }
            (None, Some(_)) => Err(GoodhartError::invalid(
                "actions",
                "this discriminator is state-only (num_actions = None)",
            )),
            (Some(_), None) => Err(GoodhartError::invalid(
                "actions",
                "this discriminator needs the actions (num_actions is set)",
            )),
        }
    }

    /// `d` for each row of `features [N, D]` (see [`Discriminator::features`]), `[N]`.
    pub fn forward(&self, features: Tensor<B, 2>) -> Tensor<B, 1> {
        let x = self
            .hidden
            .iter()
            .fold(features, |x, layer| relu(layer.forward(x)));
        let n = x.dims()[0];
        self.output.forward(x).reshape([n])
    }
}

/// The discriminator loss `mean softplus(-d(current)) + mean softplus(d(base))`.
pub fn discriminator_loss<B: Backend>(
    d_current: Tensor<B, 1>,
    d_base: Tensor<B, 1>,
) -> Tensor<B, 1> {
    softplus(d_current.neg(), 1.0).mean() + softplus(d_base, 1.0).mean()
}

/// Which divergence's per-sample term penalises the reward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OccupancyDivergence {
    /// `exp(d) - 1`.
    Chi2,
    /// `(exp(d) - 1) / sqrt(trimmed mean of exp(d) - 1)`; the default (ORPO's
    /// recommended regulariser is `sqrt(chi2)`).
    #[default]
    SqrtChi2,
    /// `d`.
    Kl,
    /// `sign(d)`.
    Tv,
}

/// Fraction trimmed at each end before averaging `exp(d) - 1` for `sqrt_chi2` (ORPO: 1%).
pub const TRIM_FRACTION: f64 = 0.01;
/// Floor on the chi-squared estimate under the square root of `sqrt_chi2` (goodhart's
/// choice, the same floor as [`crate::sequence_chi2`]).
pub const CHI2_FLOOR: f64 = 1e-4;

/// Mean of `x` over the entries where `valid` is set, after dropping the
/// `floor(trim * n_valid)` smallest and largest of them. Errors when nothing is valid.
pub fn trimmed_mean<B: Backend>(
    x: Tensor<B, 1>,
    valid: &Tensor<B, 1>,
    trim: f64,
) -> Result<Tensor<B, 1>> {
    let keep = valid.clone().not_equal_elem(0.0);
    let n = keep.clone().int().sum().into_scalar().to_i64() as usize;
    if n == 0 {
        return Err(GoodhartError::Empty {
            what: "samples for the trimmed mean".into(),
        });
    }
    let k = ((trim * n as f64).floor() as usize).min((n - 1) / 2);
    // Invalid entries sort to the end.
    let sorted = x.mask_fill(keep.bool_not(), f32::MAX).sort(0);
    Ok(sorted.slice(k..n - k).mean())
}

/// The chi-squared estimate `chi2(mu_pi || mu_base) = E_pi[exp(d)] - 1`, as the mean of
/// `exp(d) - 1` over discriminator outputs `d` of current-policy samples (where `valid`).
pub fn chi2_estimate<B: Backend>(
    d_current: Tensor<B, 1>,
    valid: &Tensor<B, 1>,
) -> Result<Tensor<B, 1>> {
    trimmed_mean(d_current.exp() - 1.0, valid, 0.0)
}

impl OccupancyDivergence {
    /// Per-sample terms `[N]` from discriminator outputs `d [N]` of current-policy samples.
    /// For `sqrt_chi2` the normaliser is `sqrt(max(m, 1e-4))`, where `m` is the mean of
    /// `exp(d) - 1` over the valid samples of this batch after dropping the
    /// `floor(0.01 n)` smallest and largest (the trimmed estimate of `chi2(mu_pi ||
    /// mu_base)`); it is a constant (no gradient flows through it).
    pub fn terms<B: Backend>(&self, d: Tensor<B, 1>, valid: &Tensor<B, 1>) -> Result<Tensor<B, 1>> {
        Ok(match self {
            Self::Chi2 => d.exp() - 1.0,
            Self::SqrtChi2 => {
                let w1 = d.exp() - 1.0;
                let m = trimmed_mean(w1.clone().detach(), valid, TRIM_FRACTION)?;
                w1 / m.clamp_min(CHI2_FLOOR).sqrt().unsqueeze()
            }
            Self::Kl => d,
            Self::Tv => d.sign(),
        })
    }
}

/// `r' = clip(r - coef * term, -clip, clip)` (ORPO's penalised reward).
pub fn penalize<B: Backend, const D: usize>(
    rewards: Tensor<B, D>,
    terms: Tensor<B, D>,
    coef: f64,
    clip: f64,
) -> Tensor<B, D> {
    (rewards - terms * coef).clamp(-clip, clip)
}

/// Config of the `chi2_occupancy` regulariser. The discriminator shape follows ORPO
/// (width 256, depth 2); the coefficient, clip and Adam learning rate are goodhart's
/// defaults (tune `coef`; ORPO sweeps it), not a published setting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OccupancyConfig {
    /// Observation vector length.
    pub obs_dim: usize,
    /// Discrete action count for a state-action discriminator; absent for state-only.
    #[serde(default)]
    pub num_actions: Option<usize>,
    /// Hidden width (ORPO 256).
    #[serde(default = "default_width")]
    pub width: usize,
    /// Hidden layers (ORPO 2).
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// Adam learning rate of the discriminator (default 1e-3).
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Which per-sample term.
    #[serde(default)]
    pub divergence: OccupancyDivergence,
    /// Penalty coefficient (default 0.01).
    #[serde(default = "default_coef")]
    pub coef: f64,
    /// Clip of the penalised reward (default 10).
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Discriminator Adam steps per [`OccupancyRegularizer::fit`] (default 5, goodhart's).
    #[serde(default = "default_disc_steps")]
    pub disc_steps: usize,
    /// Pairs drawn from each side for one discriminator step, without replacement
    /// (default 256, goodhart's; ORPO trains it on PPO's 128-step minibatches).
    #[serde(default = "default_disc_batch")]
    pub disc_batch: usize,
    /// Seed of the discriminator's initialisation and of its minibatch draws.
    #[serde(default)]
    pub seed: u64,
}

fn default_disc_steps() -> usize {
    5
}
fn default_disc_batch() -> usize {
    256
}

fn default_width() -> usize {
    256
}
fn default_depth() -> usize {
    2
}
fn default_lr() -> f64 {
    1e-3
}
fn default_coef() -> f64 {
    0.01
}
fn default_clip() -> f64 {
    10.0
}

impl OccupancyConfig {
    /// A config with every default for observations of length `obs_dim`.
    pub fn new(obs_dim: usize) -> Self {
        Self {
            obs_dim,
            num_actions: None,
            width: default_width(),
            depth: default_depth(),
            lr: default_lr(),
            divergence: OccupancyDivergence::default(),
            coef: default_coef(),
            clip: default_clip(),
            disc_steps: default_disc_steps(),
            disc_batch: default_disc_batch(),
            seed: 0,
        }
    }

    /// Validates the config, seeds the backend stream `"discriminator"` and builds the
    /// regulariser with a fresh discriminator and Adam state.
    pub fn init<B: AutodiffBackend>(&self, device: &B::Device) -> Result<OccupancyRegularizer<B>> {
        if self.obs_dim == 0 || self.width == 0 || self.num_actions == Some(0) {
            return Err(GoodhartError::invalid(
                "chi2_occupancy",
                "obs_dim, width and num_actions must be positive",
            ));
        }
        for (name, v) in [("lr", self.lr), ("coef", self.coef), ("clip", self.clip)] {
            crate::kl::check_coef(name, v)?;
        }
        if self.lr == 0.0 || self.clip == 0.0 {
            return Err(GoodhartError::invalid("lr/clip", "must be > 0"));
        }
        if self.disc_steps == 0 || self.disc_batch == 0 {
            return Err(GoodhartError::invalid(
                "disc_steps / disc_batch",
                "must be at least 1",
            ));
        }
        let discriminator =
            goodhart_core::seed::seeded::<B, _>(device, self.seed, "discriminator", || {
                DiscriminatorConfig::new(self.obs_dim)
                    .with_num_actions(self.num_actions)
                    .with_width(self.width)
                    .with_depth(self.depth)
                    .init(device)
            });
        Ok(OccupancyRegularizer {
            discriminator,
            optimizer: AdamConfig::new().init(),
            config: self.clone(),
            rng: seed::rng(self.seed, "discriminator/minibatch"),
            last_loss: None,
            last_chi2: None,
        })
    }
}

/// The ORPO regulariser: a discriminator, its Adam state, and the reward penalty.
pub struct OccupancyRegularizer<B: AutodiffBackend> {
    discriminator: Discriminator<B>,
    optimizer: OptimizerAdaptor<Adam, Discriminator<B>, B>,
    config: OccupancyConfig,
    rng: seed::ChaCha8Rng,
    last_loss: Option<f64>,
    last_chi2: Option<f64>,
}

/// The discriminator inputs of the valid steps of episodes `obs [N, T, K]`, `actions
/// [N, T]`, `mask [N, T]` (all ones when absent).
fn valid_features<B: AutodiffBackend>(
    d: &Discriminator<B>,
    obs: Tensor<B, 3>,
    actions: Option<Tensor<B, 2, Int>>,
    mask: Option<&Tensor<B, 2>>,
) -> Result<Tensor<B, 2>> {
    let [n, t, k] = obs.dims();
    if let Some(m) = mask {
        if m.dims() != [n, t] {
            return Err(GoodhartError::shape("mask", &[n, t], &m.dims()));
        }
    }
    let features = d.features(obs.reshape([n * t, k]), actions.map(|a| a.reshape([n * t])))?;
    let Some(mask) = mask else {
        return Ok(features);
    };
    let keep: Vec<i64> = mask
        .clone()
        .reshape([n * t])
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| GoodhartError::invalid("mask", format!("{e:?}")))?
        .iter()
        .enumerate()
        .filter(|(_, &m)| m != 0.0)
        .map(|(i, _)| i as i64)
        .collect();
    let m = keep.len();
    let device = features.device();
    Ok(features.select(
        0,
        Tensor::from_data(burn::tensor::TensorData::new(keep, [m]), &device),
    ))
}

impl<B: AutodiffBackend> OccupancyRegularizer<B> {
    /// The discriminator.
    pub fn discriminator(&self) -> &Discriminator<B> {
        &self.discriminator
    }

    /// The config.
    pub fn config(&self) -> &OccupancyConfig {
        &self.config
    }

    /// One Adam step on `mean softplus(-d(current)) + mean softplus(d(base))`, from
    /// discriminator inputs of current-policy and base-policy samples (each
    /// `[N, obs_dim (+ num_actions)]`, see [`Discriminator::features`]). Returns the loss.
    pub fn train_step(&mut self, current: Tensor<B, 2>, base: Tensor<B, 2>) -> Result<f64> {
        let width = self.config.obs_dim + self.config.num_actions.unwrap_or(0);
        for (what, x) in [("current features", &current), ("base features", &base)] {
            let [n, k] = x.dims();
            if k != width {
                return Err(GoodhartError::shape(what, &[n, width], &[n, k]));
            }
            if n == 0 {
                return Err(GoodhartError::Empty { what: what.into() });
            }
            check_finite(x, what)?;
        }
        let loss = discriminator_loss(
            self.discriminator.forward(current),
            self.discriminator.forward(base),
        );
        let value = loss.clone().into_scalar().to_f64();
        let grads = GradientsParams::from_grads(loss.backward(), &self.discriminator);
        self.discriminator = self
            .optimizer
            .step(self.config.lr, self.discriminator.clone(), grads);
        self.last_loss = Some(value);
        Ok(value)
    }

    /// `disc_steps` discriminator steps ([`OccupancyRegularizer::train_step`]), each on
    /// `disc_batch` valid pairs drawn without replacement from the current episodes and
    /// as many from the reference episodes (stream `discriminator/minibatch` of the
    /// config's seed). Returns the last loss; errors on a side with no valid step.
    #[allow(clippy::too_many_arguments)]
    pub fn fit(
        &mut self,
        obs: Tensor<B, 3>,
        actions: Option<Tensor<B, 2, Int>>,
        mask: Option<&Tensor<B, 2>>,
        ref_obs: Tensor<B, 3>,
        ref_actions: Option<Tensor<B, 2, Int>>,
        ref_mask: Option<&Tensor<B, 2>>,
    ) -> Result<f64> {
        let current = valid_features(&self.discriminator, obs, actions, mask)?;
        let reference = valid_features(&self.discriminator, ref_obs, ref_actions, ref_mask)?;
        let mut loss = f64::NAN;
        for _ in 0..self.config.disc_steps {
            let mut draw = |x: &Tensor<B, 2>| {
                let n = x.dims()[0];
                let mut ids: Vec<i64> = (0..n as i64).collect();
                seed::shuffle(&mut ids, &mut self.rng);
                ids.truncate(self.config.disc_batch);
                let b = ids.len();
                let device = x.device();
                x.clone().select(
                    0,
                    Tensor::from_data(burn::tensor::TensorData::new(ids, [b]), &device),
                )
            };
            let (c, r) = (draw(&current), draw(&reference));
            loss = self.train_step(c, r)?;
        }
        Ok(loss)
    }

    /// Discriminator outputs `[N]` for `features`, detached.
    pub fn log_ratio(&self, features: Tensor<B, 2>) -> Tensor<B, 1> {
        self.discriminator.forward(features).detach()
    }

    /// Penalised per-step rewards `clip(r - coef * term, -clip, clip)` `[N, T]` for
    /// observations `[N, T, obs_dim]` and actions `[N, T]` of the current policy; positions
    /// where `mask [N, T]` is zero keep their reward. Records the batch's chi-squared
    /// estimate for [`OccupancyRegularizer::last_chi2`].
    pub fn penalize_rewards(
        &mut self,
        rewards: Tensor<B, 2>,
        obs: Tensor<B, 3>,
        actions: Option<Tensor<B, 2, Int>>,
        mask: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        let [n, t, k] = obs.dims();
        goodhart_core::ops::check_same_shape(&rewards, "rewards", mask, "mask")?;
        if rewards.dims() != [n, t] {
            return Err(GoodhartError::shape("rewards", &[n, t], &rewards.dims()));
        }
        if let Some(a) = &actions {
            if a.dims() != [n, t] {
                return Err(GoodhartError::shape("actions", &[n, t], &a.dims()));
            }
        }
        let obs = obs.reshape([n * t, k]);
        let actions = actions.map(|a| a.reshape([n * t]));
        let d = self.log_ratio(self.discriminator.features(obs, actions)?);
        let valid = mask.clone().reshape([n * t]);
        self.last_chi2 = Some(chi2_estimate(d.clone(), &valid)?.into_scalar().to_f64());
        let terms = self.config.divergence.terms(d, &valid)?.reshape([n, t]);
        let penalised = penalize(rewards.clone(), terms, self.config.coef, self.config.clip);
        Ok(penalised.mask_where(mask.clone().equal_elem(0.0), rewards))
    }

    /// Loss of the last [`OccupancyRegularizer::train_step`].
    pub fn last_loss(&self) -> Option<f64> {
        self.last_loss
    }

    /// Chi-squared estimate of the last [`OccupancyRegularizer::penalize_rewards`] batch.
    pub fn last_chi2(&self) -> Option<f64> {
        self.last_chi2
    }
}

impl<B: AutodiffBackend> crate::Regularizer<B> for OccupancyRegularizer<B> {
    fn name(&self) -> &'static str {
        "chi2_occupancy"
    }

    /// With reference episodes (`ref_observations`, and `ref_tokens` when the
    /// discriminator takes actions), [`OccupancyRegularizer::fit`] first; then
    /// [`OccupancyRegularizer::penalize_rewards`] from `observations`, `tokens` (the
    /// actions) and `mask` (all ones when absent).
    fn shape_rewards(
        &mut self,
        rewards: Tensor<B, 2>,
        x: &crate::RegInputs<B>,
    ) -> Result<Tensor<B, 2>> {
        let obs = crate::need(&x.observations, "observations", "chi2_occupancy")?;
        let actions = match self.config.num_actions {
            Some(_) => Some(crate::need(&x.tokens, "tokens", "chi2_occupancy")?),
            None => None,
        };
        if let Some(ref_obs) = &x.ref_observations {
            let ref_actions = match self.config.num_actions {
                Some(_) => Some(crate::need(&x.ref_tokens, "ref_tokens", "chi2_occupancy")?),
                None => None,
            };
            self.fit(
                obs.clone(),
                actions.clone(),
                x.mask.as_ref(),
                ref_obs.clone(),
                ref_actions,
                x.ref_mask.as_ref(),
            )?;
        }
        let mask = x.mask.clone().unwrap_or_else(|| rewards.ones_like());
        self.penalize_rewards(rewards, obs, actions, &mask)
    }

    fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        [
            ("chi2_occupancy/chi2", self.last_chi2),
            ("chi2_occupancy/disc_loss", self.last_loss),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_core::testing::{assert_close, tolerance, values};

    /// Rows of the 6x6 identity repeated `counts[s]` times.
    fn states<B: Backend>(counts: &[usize], device: &B::Device) -> Tensor<B, 2> {
        let ids: Vec<i64> = counts
            .iter()
            .enumerate()
            .flat_map(|(s, &c)| std::iter::repeat_n(s as i64, c))
            .collect();
        Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device)
            .one_hot::<2>(6)
            .float()
    }

    goodhart_core::backend_test! {
        fn discriminator_recovers_the_log_ratio_and_chi2<B>(device) {
            type A<B> = Autodiff<B>;
            // mu_pi = (6,4,3,3,2,2)/20, mu_base = (2,3,3,4,4,4)/20: batches hold each state
            // in exact proportion, so the loss is the population loss.
            let pi = [6usize, 4, 3, 3, 2, 2];
            let base = [2usize, 3, 3, 4, 4, 4];
            let mut config = OccupancyConfig::new(6);
            config.lr = 3e-3;
            config.seed = 7;
            let mut reg = config.init::<A<B>>(device).unwrap();
            let (cur, bas) = (states::<A<B>>(&pi, device), states::<A<B>>(&base, device));
            let first = reg.train_step(cur.clone(), bas.clone()).unwrap();
            for _ in 0..300 {
                reg.train_step(cur.clone(), bas.clone()).unwrap();
            }
            assert!(reg.last_loss().unwrap() < first);
            let eye = states::<A<B>>(&[1; 6], device);
            let d = values(reg.log_ratio(eye));
            // log(p/q): ln 3, ln 4/3, 0, ln 3/4, ln 1/2, ln 1/2
            let want: Vec<f32> = pi.iter().zip(base).map(|(&p, q)| (p as f32 / q as f32).ln()).collect();
            assert_close(&d, &want, 0.1);
            // closed form: sum p^2/q - 1 = (36/2 + 16/3 + 9/3 + 9/4 + 4/4 + 4/4)/20 - 1 = 0.529167
            let closed = pi.iter().zip(base).map(|(&p, q)| (p * p) as f64 / (q as f64 * 20.0)).sum::<f64>() - 1.0;
            assert!((closed - 0.529_166_7).abs() < 1e-6);
            let d_cur = reg.log_ratio(cur.clone());
            let valid = Tensor::<A<B>, 1>::ones([20], device);
            let est = values(chi2_estimate(d_cur, &valid).unwrap())[0] as f64;
            assert!((est - closed).abs() < 0.1 * closed, "chi2 estimate {est} vs closed form {closed}");
        }
    }

    goodhart_core::backend_test! {
        fn terms_penalty_and_trimmed_mean<B>(device) {
            let tol = tolerance(1e-5);
            let d = Tensor::<B, 1>::from_floats([0.0, std::f32::consts::LN_2, -std::f32::consts::LN_2, 1.0], device);
            let valid = Tensor::<B, 1>::ones([4], device);
            let e = std::f32::consts::E;
            // exp(d) - 1: 0, 1, -0.5, e - 1
            let chi = values(OccupancyDivergence::Chi2.terms(d.clone(), &valid).unwrap());
            assert_close(&chi, &[0.0, 1.0, -0.5, e - 1.0], tol);
            // n = 4 < 100: nothing trimmed; mean = (0 + 1 - 0.5 + 1.7182818)/4 = 0.55457045
            let m = (0.5 + e - 1.0) / 4.0;
            let sq = values(OccupancyDivergence::SqrtChi2.terms(d.clone(), &valid).unwrap());
            assert_close(&sq, &[0.0, 1.0 / m.sqrt(), -0.5 / m.sqrt(), (e - 1.0) / m.sqrt()], tol);
            assert_close(&values(OccupancyDivergence::Tv.terms(d.clone(), &valid).unwrap()), &[0.0, 1.0, -1.0, 1.0], 0.0);
            // r' = clip(r - 0.5 * term, -1, 1) with chi2 terms and r = (0, 0, 0, 0.2)
            let r = Tensor::<B, 1>::from_floats([0.0, 0.0, 0.0, 0.2], device);
            let p = values(penalize(r, Tensor::from_floats(chi.as_slice(), device), 0.5, 1.0));
            assert_close(&p, &[0.0, -0.5, 0.25, -0.659_140_9], tol);
            // 200 values 0..199 with 1% trimmed: drop 2 each end -> mean of 2..197 = 99.5;
            // masked entries (huge) are ignored.
            let mut xs: Vec<f32> = (0..200).map(|i| i as f32).collect();
            xs.push(1e9);
            let mut mask = vec![1.0f32; 200];
            mask.push(0.0);
            let x = Tensor::<B, 1>::from_floats(xs.as_slice(), device);
            let vm = Tensor::<B, 1>::from_floats(mask.as_slice(), device);
            assert_close(&values(trimmed_mean(x.clone(), &vm, TRIM_FRACTION).unwrap()), &[99.5], tol);
            assert!(trimmed_mean(x, &Tensor::zeros([201], device), 0.01).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn state_action_features_and_bad_input<B>(device) {
            type A<B> = Autodiff<B>;
            let mut config = OccupancyConfig::new(2);
            config.num_actions = Some(3);
            config.width = 8;
            config.divergence = OccupancyDivergence::Kl;
            config.coef = 1.0;
            let mut reg = config.init::<A<B>>(device).unwrap();
            let obs = Tensor::<A<B>, 2>::from_floats([[0.5, -1.0], [2.0, 0.0]], device);
            let acts = Tensor::<A<B>, 1, Int>::from_ints([2, 0], device);
            let f = reg.discriminator().features(obs.clone(), Some(acts)).unwrap();
            assert_close(&values(f.clone()), &[0.5, -1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 0.0], 0.0);
            let bad = Tensor::<A<B>, 1, Int>::from_ints([3, 0], device);
            assert!(matches!(reg.discriminator().features(obs.clone(), Some(bad)), Err(GoodhartError::InvalidArgument { .. })));
            assert!(reg.discriminator().features(obs.clone(), None).is_err());
            assert!(matches!(reg.train_step(obs.clone(), f.clone()), Err(GoodhartError::ShapeMismatch { .. })));
            // kl term with coef 1: r' = r - d on valid positions; the padded one keeps 5.
            let obs3 = obs.reshape([1, 2, 2]);
            let acts2 = Tensor::<A<B>, 2, Int>::from_ints([[2, 0]], device);
            let r = Tensor::<A<B>, 2>::from_floats([[1.0, 5.0]], device);
            let m = Tensor::<A<B>, 2>::from_floats([[1.0, 0.0]], device);
            let out = values(reg.penalize_rewards(r, obs3, Some(acts2), &m).unwrap());
            let d0 = values(reg.log_ratio(f))[0];
            assert_close(&out, &[1.0 - d0, 5.0], tolerance(1e-5));
            let nan = Tensor::<A<B>, 2>::from_floats([[f32::NAN, 0.0]], device);
            assert!(matches!(reg.discriminator().features(nan, Some(Tensor::from_ints([0], device))), Err(GoodhartError::NonFinite { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn init_is_seeded_while_other_threads_reseed<B>(device) {
            // burn draws parameters lazily; they must be drawn inside `seeded`'s lock, or a
            // thread reseeding the backend in between changes them (the lab's chi-squared
            // arm differed between two runs of one seed before this held).
            type A<B> = Autodiff<B>;
            let config = OccupancyConfig::new(6);
            let probe = |reg: &OccupancyRegularizer<A<B>>| {
                let x = Tensor::<A<B>, 2>::from_floats([[1.0, 0.0, 0.5, 0.0, 0.0, 2.0]], device);
                values(reg.log_ratio(x))
            };
            let expected = probe(&config.init::<A<B>>(device).unwrap());
            let got: Vec<Vec<f32>> = std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..20_000 {
                        goodhart_core::seed::seed_backend::<B>(device, i, "noise");
                    }
                });
                (0..20).map(|_| probe(&config.init::<A<B>>(device).unwrap())).collect()
            });
            for g in &got {
                assert_eq!(g, &expected);
            }
        }
    }

    goodhart_core::backend_test! {
        fn the_trait_fits_the_discriminator_on_valid_pairs<B>(device) {
            use crate::{RegInputs, Regularizer};
            type A<B> = Autodiff<B>;
            // Current episodes visit (obs (1, 0), action 0); reference episodes visit
            // (obs (0, 1), action 1), and hold current-like pairs only on masked steps.
            let config = OccupancyConfig {
                num_actions: Some(2),
                width: 16,
                depth: 1,
                lr: 1e-2,
                disc_steps: 60,
                disc_batch: 4,
                coef: 1.0,
                divergence: OccupancyDivergence::Kl,
                ..OccupancyConfig::new(2)
            };
            let obs = |x: [f32; 2]| Tensor::<A<B>, 3>::from_floats([[x, x, x]], device);
            let inputs = RegInputs::<A<B>> {
                observations: Some(obs([1.0, 0.0])),
                tokens: Some(Tensor::from_ints([[0, 0, 0]], device)),
                mask: Some(Tensor::from_floats([[1.0, 1.0, 1.0]], device)),
                ref_observations: Some(Tensor::from_floats([[[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]], device)),
                ref_tokens: Some(Tensor::from_ints([[1, 1, 0]], device)),
                ref_mask: Some(Tensor::from_floats([[1.0, 1.0, 0.0]], device)),
                ..Default::default()
            };
            let run = || {
                let mut reg = config.init::<A<B>>(device).unwrap();
                let r = reg.shape_rewards(Tensor::zeros([1, 3], device), &inputs).unwrap();
                (values(r), Regularizer::<A<B>>::metrics(&reg))
            };
            let (r, m) = run();
            // The logistic loss starts at 2 ln 2 = 1.386 and falls on separable pairs; the
            // masked reference step would make them inseparable. With the `kl` term the
            // penalty is -coef * d, d = log-ratio > 0 on current pairs.
            assert!(m["chi2_occupancy/disc_loss"] < 0.7, "{m:?}");
            assert!(r.iter().all(|&x| x < -0.5), "{r:?}");
            // Same config, same draws, same numbers.
            assert_eq!(run().0, r);
            // Reference episodes without actions, for a state-action discriminator.
            let mut reg = config.init::<A<B>>(device).unwrap();
            let no_actions = RegInputs { ref_tokens: None, ..inputs.clone() };
            match reg.shape_rewards(Tensor::zeros([1, 3], device), &no_actions) {
                Err(GoodhartError::InvalidArgument { name, .. }) => assert_eq!(name, "ref_tokens"),
                other => panic!("expected a missing-input error, got {other:?}"),
            }
        }
    }
}
