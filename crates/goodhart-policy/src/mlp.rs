//! Policies and value functions for small environments, and a value head on the LM trunk.
//!
//! - [`MlpPolicy`]: observation `[B, d_obs]` -> categorical logits `[B, A]`, an MLP with
//!   tanh hidden layers. Defaults (two hidden layers of 64, tanh, orthogonal init with
//!   gain `sqrt 2`, policy head gain 0.01, value head gain 1, zero biases) are CleanRL's
//!   `ppo.py` (Huang et al. 2022, "The 37 implementation details of PPO").
//! - [`MlpValue`]: observation -> `V(s)` `[B]`, same body.
//! - [`LmValueModel`]: the transformer [`Trunk`] with a scalar [`ValueHead`] for PPO on
//!   language models. Values are aligned to tokens like log-probs: position `t` holds
//!   `V(token_<t)`, the value of the state in which token `t` was chosen, computed from
//!   the hidden state at `t - 1` (verl's critic and TRL's `PPOTrainer` slice
//!   `values[:, context - 1 : -1]` the same way); position 0 and padding hold 0.

use burn::{
    config::Config,
    module::Module,
    nn::{Initializer, Linear},
    tensor::{
        activation::{sigmoid, softmax},
        backend::Backend,
        Int, Tensor, TensorData,
    },
};
use goodhart_core::{
    ops::zero_masked, params::materialized, seed::ChaCha8Rng, GoodhartError, Result,
};
use rand::RngExt as _;

use crate::{
    generate::inverse_cdf,
    score::logprobs_from_logits,
    transformer::{linear, TransformerConfig, Trunk},
};

/// Configuration of an [`MlpPolicy`] or [`MlpValue`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Observation width.
    pub d_obs: usize,
    /// Hidden layer widths (CleanRL: 64, 64).
    #[config(default = "vec![64, 64]")]
    pub hidden: Vec<usize>,
}

impl MlpConfig {
    fn body<B: Backend>(&self, d_out: usize, head_gain: f64, device: &B::Device) -> Result<Mlp<B>> {
        if self.d_obs == 0 || d_out == 0 || self.hidden.contains(&0) {
            return Err(GoodhartError::invalid(
                "mlp",
                "every width must be at least 1",
            ));
        }
        let mut widths = vec![self.d_obs];
        widths.extend(&self.hidden);
        let gain = |g: f64| Initializer::Orthogonal { gain: g };
        let hidden = widths
            .windows(2)
            .map(|w| linear(w[0], w[1], true, gain(2f64.sqrt()), device))
            .collect();
        let head = linear(
            *widths.last().unwrap_or(&self.d_obs),
            d_out,
            true,
            gain(head_gain),
            device,
        );
        Ok(materialized(Mlp { hidden, head }))
    }

    /// A categorical policy over `n_actions` actions.
    pub fn init_policy<B: Backend>(
        &self,
        n_actions: usize,
        device: &B::Device,
    ) -> Result<MlpPolicy<B>> {
        Ok(MlpPolicy {
            mlp: self.body(n_actions, 0.01, device)?,
        })
    }

    /// A state-value function.
    pub fn init_value<B: Backend>(&self, device: &B::Device) -> Result<MlpValue<B>> {
        Ok(MlpValue {
            mlp: self.body(1, 1.0, device)?,
        })
    }
}

/// Tanh MLP body and linear head.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Hidden layers.
    pub hidden: Vec<Linear<B>>,
    /// Output layer.
    pub head: Linear<B>,
}

impl<B: Backend> Mlp<B> {
    /// `obs [B, d_obs] -> [B, d_out]`; errors on a width mismatch.
    pub fn forward(&self, obs: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        let d_in = self.hidden.first().unwrap_or(&self.head).weight.dims()[0];
        let [b, d] = obs.dims();
        if d != d_in {
            return Err(GoodhartError::shape("observations", &[b, d_in], &[b, d]));
        }
        let x = self.hidden.iter().fold(obs, |x, l| tanh(l.forward(x)));
        Ok(self.head.forward(x))
    }
}

/// `tanh(x) = 2 sigmoid(2x) - 1`, the same function through the backend's sigmoid: the
/// CPU backend computes `tanh` with a scalar `libm` `tanhf` per element and `sigmoid`
/// with the cheaper `expf` (the profile is in docs/speed.md).
fn tanh<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    sigmoid(x * 2.0) * 2.0 - 1.0
}

/// A categorical policy `pi(a | s) = softmax(MLP(s))_a`.
#[derive(Module, Debug)]
pub struct MlpPolicy<B: Backend> {
    /// The network producing logits.
    pub mlp: Mlp<B>,
}

impl<B: Backend> MlpPolicy<B> {
    /// Action logits `[B, A]`.
    pub fn logits(&self, obs: Tensor<B, 2>) -> Result<Tensor<B, 2>> {
        self.mlp.forward(obs)
    }

    /// `log pi(a | s)` and the entropy of `pi(. | s)`, each `[B]`, for `actions [B]`.
    pub fn log_prob_entropy(
        &self,
        obs: Tensor<B, 2>,
        actions: Tensor<B, 1, Int>,
    ) -> Result<(Tensor<B, 1>, Tensor<B, 1>)> {
        let logits = self.logits(obs)?;
        let [b, a] = logits.dims();
        if actions.dims() != [b] {
            return Err(GoodhartError::shape("actions", &[b], &actions.dims()));
        }
        let (lp, h) = logprobs_from_logits(logits.reshape([b, 1, a]), actions.reshape([b, 1]), 1.0);
        Ok((lp.reshape([b]), h.reshape([b])))
    }

    /// Samples one action per row by inverse CDF (one uniform draw per row from `rng`);
    /// returns the actions and their log-probs `[B]`.
    pub fn sample(
        &self,
        obs: Tensor<B, 2>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Vec<usize>, Tensor<B, 1>)> {
        let logits = self.logits(obs.clone())?;
        let [b, a] = logits.dims();
        let probs: Vec<f32> = softmax(logits, 1)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap_or_default();
        let actions: Vec<usize> = (0..b)
            .map(|row| inverse_cdf(&probs[row * a..(row + 1) * a], rng.random()))
            .collect();
        let ids: Vec<i64> = actions.iter().map(|&x| x as i64).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [b]), &obs.device());
        let (lp, _) = self.log_prob_entropy(obs, ids)?;
        Ok((actions, lp))
    }
}

/// A state-value function `V(s) = MLP(s)`.
#[derive(Module, Debug)]
pub struct MlpValue<B: Backend> {
    /// The network.
    pub mlp: Mlp<B>,
}

impl<B: Backend> MlpValue<B> {
    /// `V(s)`, `[B]`.
    pub fn forward(&self, obs: Tensor<B, 2>) -> Result<Tensor<B, 1>> {
        let v = self.mlp.forward(obs)?;
        let b = v.dims()[0];
        Ok(v.reshape([b]))
    }
}

/// A scalar head `v = w . h + c` on hidden states.
#[derive(Module, Debug)]
pub struct ValueHead<B: Backend> {
    /// `[D, 1]` projection.
    pub proj: Linear<B>,
}

impl<B: Backend> ValueHead<B> {
    /// A head on width `d_model`, initialised to zero so every value starts at 0.
    pub fn new(d_model: usize, device: &B::Device) -> Self {
        Self {
            proj: materialized(linear(d_model, 1, true, Initializer::Zeros, device)),
        }
    }

    /// `hidden [B, T, D] -> [B, T]`.
    pub fn forward(&self, hidden: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, t, _] = hidden.dims();
        self.proj.forward(hidden).reshape([b, t])
    }
}

/// The LM trunk with a value head: the PPO critic.
#[derive(Module, Debug)]
pub struct LmValueModel<B: Backend> {
    /// Shared architecture with the policy.
    pub trunk: Trunk<B>,
    /// Scalar head.
    pub head: ValueHead<B>,
}

impl<B: Backend> LmValueModel<B> {
    /// A fresh critic of architecture `config`.
    pub fn new(config: &TransformerConfig, device: &B::Device) -> Result<Self> {
        Ok(Self::from_trunk(config.init_trunk(device)?))
    }

    /// A critic on an existing trunk (e.g. a copy of the SFT policy's or the reward
    /// model's, as InstructGPT initialises its value function from the reward model).
    pub fn from_trunk(trunk: Trunk<B>) -> Self {
        let device = trunk.tok_emb.weight.device();
        let head = ValueHead::new(trunk.d_model(), &device);
        Self { trunk, head }
    }

    /// Values aligned to tokens `[B, T]` (see the module docs).
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        let [b, t] = tokens.dims();
        let v = self
            .head
            .forward(self.trunk.forward(tokens, attention_mask.clone())?);
        let zero = Tensor::<B, 2>::zeros([b, 1], &v.device());
        let shifted = Tensor::cat(vec![zero, v.narrow(1, 0, t - 1)], 1);
        Ok(zero_masked(shifted, &attention_mask))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::{
        tests::{floats, ints, tiny},
        Positions,
    };
    use burn::module::Param;
    use goodhart_core::{
        seed::rng,
        testing::{assert_close, tolerance, values},
    };

    goodhart_core::backend_test! {
        fn policy_log_probs_and_entropy_by_hand<B>(device) {
            let mut policy = MlpConfig::new(2).with_hidden(vec![]).init_policy::<B>(3, device).unwrap();
            // logits = obs W: obs (1, 0) -> (0, ln 2, ln 3) -> p = (1, 2, 3)/6.
            let w = [[0.0, 2f32.ln(), 3f32.ln()], [0.0, 0.0, 0.0]];
            policy.mlp.head.weight = Param::from_tensor(Tensor::from_floats(w, device));
            let obs = Tensor::<B, 2>::from_floats([[1.0, 0.0], [0.0, 1.0]], device);
            let actions = Tensor::<B, 1, Int>::from_ints([2, 0], device);
            let (lp, h) = policy.log_prob_entropy(obs.clone(), actions).unwrap();
            // row 0: log(1/2); row 1: uniform, log(1/3). Entropies 1.011404 and ln 3.
            let tol = tolerance(1e-5);
            assert_close(&values(lp), &[0.5f32.ln(), (1.0f32 / 3.0).ln()], tol);
            assert_close(&values(h), &[1.011_404, 3f32.ln()], tol);
            // Sampling: empirical frequencies of row 0 approach (1, 2, 3)/6.
            let mut r = rng(0, "sample");
            let mut counts = [0usize; 3];
            let many = Tensor::<B, 2>::from_floats([[1.0, 0.0]], device).repeat_dim(0, 3000);
            let (acts, lps) = policy.sample(many, &mut r).unwrap();
            acts.iter().for_each(|&a| counts[a] += 1);
            for (c, p) in counts.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
                assert!((*c as f64 / 3000.0 - p).abs() < 0.03, "{counts:?}");
            }
            let expect: Vec<f32> = acts.iter().map(|&a| ((a + 1) as f32 / 6.0).ln()).collect();
            assert_close(&values(lps), &expect, tol);
            assert!(policy.logits(Tensor::zeros([1, 3], device)).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn sigmoid_form_is_tanh<B>(device) {
            // Across the range, saturation included, 2 sigmoid(2x) - 1 is tanh to within
            // f32 rounding.
            let xs: Vec<f32> = (-400..=400).map(|i| i as f32 * 0.05).chain([-90.0, 90.0]).collect();
            let x = Tensor::<B, 1>::from_floats(xs.as_slice(), device).reshape([1, xs.len()]);
            let want: Vec<f32> = xs.iter().map(|v| v.tanh()).collect();
            assert_close(&values(tanh(x)), &want, tolerance(3e-7));
        }
    }

    goodhart_core::backend_test! {
        fn cleanrl_initialisation<B>(device) {
            B::seed(device, 0);
            let cfg = MlpConfig::new(4);
            let policy = cfg.init_policy::<B>(2, device).unwrap();
            // Orthogonal rows/columns with gain sqrt 2: W^T W = 2 I for the [4, 64] first layer.
            let w = policy.mlp.hidden[0].weight.val();
            let gram = values(w.clone().matmul(w.transpose()));
            let eye: Vec<f32> = (0..16).map(|i| if i % 5 == 0 { 2.0 } else { 0.0 }).collect();
            assert_close(&gram, &eye, tolerance(1e-4));
            assert_close(&values(policy.mlp.hidden[0].bias.as_ref().unwrap().val()), &[0.0; 64], 0.0);
            // Policy head gain 0.01: logits start near uniform.
            let logits = values(policy.logits(Tensor::ones([1, 4], device)).unwrap());
            assert!(logits.iter().all(|l| l.abs() < 0.1), "{logits:?}");
            let value = cfg.init_value::<B>(device).unwrap();
            assert_eq!(value.forward(Tensor::ones([5, 4], device)).unwrap().dims(), [5]);
        }
    }

    goodhart_core::backend_test! {
        fn lm_values_are_aligned_to_tokens<B>(device) {
            let mut critic = LmValueModel::<B>::new(&tiny(Positions::Rotary), device).unwrap();
            // A head with bias 1.5 and no weight: V = 1.5 at every state.
            critic.head.proj.bias = Some(Param::from_tensor(Tensor::full([1], 1.5, device)));
            let v = critic
                .forward(ints::<B>(&[&[1, 2, 3], &[0, 4, 5]], device), floats::<B>(&[&[1.0; 3], &[0.0, 1.0, 1.0]], device))
                .unwrap();
            assert_close(&values(v), &[0.0, 1.5, 1.5, 0.0, 1.5, 1.5], tolerance(1e-6));
        }
    }
}
