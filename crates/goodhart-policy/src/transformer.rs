//! A decoder-only transformer language model, generic over the backend: one configurable
//! decoder for the families people post-train (GPT-2, Llama 2/3.x, Mistral, Qwen2/2.5,
//! Qwen3, SmolLM2; [`crate::hf`] maps their `config.json` onto [`TransformerConfig`]).
//!
//! `tokens [B, T] -> Trunk (embeddings, N blocks, final norm) -> hidden [B, T, D] ->
//! LmHead -> logits [B, T, V]`. Each block is
//!
//! ```text
//! pre-norm  (GPT-2, Llama):  x = x + Attn(N1(x));  x = x + MLP(N2(x))
//! post-norm (Vaswani 2017):  x = N1(x + Attn(x));  x = N2(x + MLP(x))
//! ```
//!
//! - Norms `N` are LayerNorm (GPT-2) or RMSNorm `x / sqrt(mean(x^2) + eps) * g` (Llama,
//!   Zhang and Sennrich 2019).
//! - Attention is causal grouped-query attention (Ainslie et al. 2023):
//!   `softmax(Q K^T / sqrt(d_head) + bias) V` with `H` query heads sharing `H_kv` key/value
//!   heads (`H_kv = H` is multi-head attention), where `bias` is 0 where key `j` may be seen
//!   from query `i` (`j <= i`, key `j` is not padding, and `i - j < window` under a sliding
//!   window, Mistral) and `-1e9` elsewhere. Optional q/k/v and output biases (GPT-2: both;
//!   Qwen2: q/k/v), optional RMSNorm of each query and key head before the rotation
//!   (Qwen3), and a head width `d_head` that need not be `D / H` (Qwen3).
//! - The MLP is `W2 GELU(W1 x)` (GPT-2) or SwiGLU `W_down (SiLU(W_gate x) * W_up x)`
//!   (Shazeer 2020; Llama), of width `intermediate_size` (default `mlp_ratio * D`).
//!
//! Positions are counted over real tokens only: `pos_t = max(cumsum(mask)_t - 1, 0)`
//! (Hugging Face's `position_ids` for left padding), so a left-padded prompt gives the
//! same numbers as the unpadded one. Positions are either learned (GPT-2, Radford et al.
//! 2019) or rotary (RoFormer, Su et al. 2021): pairs rotated by `pos * theta^(-2i/d_head)`,
//! either interleaved `(x_2i, x_2i+1)` (burn's `RotaryEncoding`) or the two halves
//! `(x_i, x_{i + d/2})` (Hugging Face's `rotate_half`), with the frequencies optionally
//! rescaled (linear, or Llama 3's `rope_scaling`).
//!
//! The [`Trunk`] is reusable: goodhart-reward puts a scalar head on it for its reward
//! model, [`crate::mlp::LmValueModel`] a value head for PPO.
//!
//! Dropout (burn's `Dropout`) is active only on an autodiff backend; RL post-training
//! usually runs with `dropout = 0` (the default), as verl and TRL disable it for PPO.

use burn::{
    config::Config,
    module::{Module, Param},
    nn::{Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, Linear, LinearConfig},
    tensor::{
        activation::{gelu, gelu_approximate, silu, softmax},
        backend::Backend,
        cast::ToElement,
        Int, Tensor, TensorPrimitive,
    },
};
use goodhart_core::{params::materialized, GoodhartError, Result};

use crate::kv_cache::{KvCache, LayerCache};

/// How the model knows where a token is.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum Positions {
    /// Rotary position embedding applied to queries and keys (RoFormer; LLaMA-style
    /// models). No parameters; any length up to `max_seq_len`.
    Rotary,
    /// A learned table of `max_seq_len` position vectors added to the token embeddings
    /// (GPT-2).
    Learned,
}

/// The normalisation of the blocks and of the final norm.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum NormKind {
    /// LayerNorm `(x - mean) / sqrt(var + eps) * g + b` (GPT-2).
    Layer,
    /// RMSNorm `x / sqrt(mean(x^2) + eps) * g`, no bias (Llama, Mistral, Qwen).
    Rms,
}

/// Which coordinates a rotary position embedding rotates together.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum RopeLayout {
    /// Pairs `(x_2i, x_2i+1)` (RoFormer, burn's `RotaryEncoding`).
    Interleaved,
    /// Pairs `(x_i, x_{i + d/2})`: Hugging Face's `rotate_half` (Llama, Mistral, Qwen).
    Half,
}

/// Rescaled rotary frequencies `inv_freq_i = theta^(-2i/d_head)` (Hugging Face's
/// `rope_scaling` / `rope_parameters`).
#[derive(Config, Debug, Copy, PartialEq)]
pub enum RopeScaling {
    /// Every frequency divided by `factor` (position interpolation, Chen et al. 2023).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1's scaling: wavelengths `2 pi / inv_freq` longer than
    /// `original / low_freq_factor` are divided by `factor`, those shorter than
    /// `original / high_freq_factor` are kept, and those between are interpolated with
    /// `s = (original / wavelength - low) / (high - low)`:
    /// `(1 - s) inv_freq / factor + s inv_freq` (transformers'
    /// `_compute_llama3_parameters`).
    Llama3 {
        /// The divisor of the low frequencies.
        factor: f64,
        /// Sets the longest wavelength kept unscaled's bound.
        low_freq_factor: f64,
        /// Sets the shortest wavelength that is scaled.
        high_freq_factor: f64,
        /// The context length the model was trained at.
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// Applies the scaling to the frequencies `inv_freq`.
    pub fn apply(&self, inv_freq: &mut [f64]) {
        match *self {
            Self::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            Self::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            } => {
                let original = original as f64;
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let s = (original / wavelen - low) / (high - low);
                        *f = (1.0 - s) * *f / factor + s * *f;
                    }
                }
            }
        }
    }

    fn validate(&self) -> Result<()> {
        let ok = match *self {
            Self::Linear { factor } => factor > 0.0,
            Self::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                factor > 0.0
                    && low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && original_max_position_embeddings > 0
            }
        };
        if ok {
            Ok(())
        } else {
            Err(GoodhartError::invalid(
                "rope_scaling",
                format!(
                    "{self:?}: factors must be positive, high_freq_factor above \
                     low_freq_factor, and the original length at least 1"
                ),
            ))
        }
    }
}

/// Configuration of a [`TransformerLm`] (and of its [`Trunk`]).
///
/// Defaults follow GPT-2 (pre-norm, LayerNorm eps 1e-5, tied embeddings, biases on every
/// projection, GELU MLP of ratio 4, multi-head attention, init N(0, 0.02)) except positions
/// (rotary, interleaved) and the GELU form (exact erf GELU; GPT-2 uses the tanh
/// approximation, which [`TransformerConfig::gpt2`] selects). [`crate::hf`] sets every
/// field from a Hugging Face `config.json`.
#[derive(Config, Debug)]
pub struct TransformerConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Model width `D`.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of attention (query) heads `H`.
    pub n_heads: usize,
    /// Longest sequence (prompt + response) the model accepts.
    pub max_seq_len: usize,
    /// Position encoding.
    #[config(default = "Positions::Rotary")]
    pub positions: Positions,
    /// Pre-norm (GPT-2) when true, post-norm (original transformer) when false.
    #[config(default = true)]
    pub pre_norm: bool,
    /// Use the token embedding matrix as the output projection (GPT-2).
    #[config(default = true)]
    pub tie_embeddings: bool,
    /// Dropout probability on attention weights and residual branches.
    #[config(default = 0.0)]
    pub dropout: f64,
    /// MLP hidden width as a multiple of `D` (when `intermediate_size` is not set).
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Use the tanh approximation of GELU (GPT-2's `gelu_new`).
    #[config(default = false)]
    pub gelu_tanh: bool,
    /// Norm epsilon (LayerNorm or RMSNorm).
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Rotary base `theta`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
    /// LayerNorm or RMSNorm.
    #[config(default = "NormKind::Layer")]
    pub norm: NormKind,
    /// SwiGLU MLP (`W_down (SiLU(W_gate x) * W_up x)`) instead of `W2 GELU(W1 x)`.
    #[config(default = false)]
    pub gated_mlp: bool,
    /// MLP hidden width; `mlp_ratio * D` when unset.
    pub intermediate_size: Option<usize>,
    /// Key/value heads `H_kv` (grouped-query attention; must divide `H`); `H` when unset.
    pub n_kv_heads: Option<usize>,
    /// Width of one head; `D / H` when unset.
    pub head_dim: Option<usize>,
    /// Biases on the query, key and value projections.
    #[config(default = true)]
    pub qkv_bias: bool,
    /// A bias on the attention output projection.
    #[config(default = true)]
    pub out_bias: bool,
    /// Biases on the MLP projections.
    #[config(default = true)]
    pub mlp_bias: bool,
    /// RMSNorm of each query and key head (over `d_head`) before the rotation (Qwen3).
    #[config(default = false)]
    pub qk_norm: bool,
    /// Which coordinates the rotary embedding pairs.
    #[config(default = "RopeLayout::Interleaved")]
    pub rope_layout: RopeLayout,
    /// Rescaled rotary frequencies, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Each query sees at most this many keys, its own included (Mistral); all when unset.
    pub sliding_window: Option<usize>,
}

impl TransformerConfig {
    /// The GPT-2 architecture with the given sizes: learned positions, pre-norm, tied
    /// embeddings, tanh GELU, LayerNorm eps 1e-5 (GPT-2 small: `V = 50257, D = 768,
    /// 12 layers, 12 heads, 1024 positions`).
    pub fn gpt2(
        vocab_size: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        max_seq_len: usize,
    ) -> Self {
        Self::new(vocab_size, d_model, n_layers, n_heads, max_seq_len)
            .with_positions(Positions::Learned)
            .with_gelu_tanh(true)
    }

    /// The Llama architecture with the given sizes: rotary positions (`rotate_half`
    /// pairs), pre-norm RMSNorm (eps 1e-5), SwiGLU MLP of width `intermediate`, no biases,
    /// untied embeddings, `n_kv_heads` key/value heads.
    pub fn llama(
        vocab_size: usize,
        d_model: usize,
        n_layers: usize,
        n_heads: usize,
        n_kv_heads: usize,
        intermediate: usize,
        max_seq_len: usize,
    ) -> Self {
        Self::new(vocab_size, d_model, n_layers, n_heads, max_seq_len)
            .with_norm(NormKind::Rms)
            .with_gated_mlp(true)
            .with_intermediate_size(Some(intermediate))
            .with_n_kv_heads(Some(n_kv_heads))
            .with_qkv_bias(false)
            .with_out_bias(false)
            .with_mlp_bias(false)
            .with_rope_layout(RopeLayout::Half)
            .with_tie_embeddings(false)
    }

    /// Width of one head: `head_dim`, or `D / n_heads`.
    pub fn d_head(&self) -> usize {
        self.head_dim.unwrap_or(self.d_model / self.n_heads.max(1))
    }

    /// Key/value heads: `n_kv_heads`, or `n_heads`.
    pub fn kv_heads(&self) -> usize {
        self.n_kv_heads.unwrap_or(self.n_heads)
    }

    /// MLP hidden width: `intermediate_size`, or `mlp_ratio * D`.
    pub fn mlp_width(&self) -> usize {
        self.intermediate_size
            .unwrap_or(self.mlp_ratio * self.d_model)
    }

    /// Checks that the sizes make a model.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("max_seq_len", self.max_seq_len),
            ("mlp_ratio", self.mlp_ratio),
            ("intermediate_size", self.mlp_width()),
            ("n_kv_heads", self.kv_heads()),
            ("head_dim", self.d_head()),
            ("sliding_window", self.sliding_window.unwrap_or(1)),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(GoodhartError::invalid(name, "must be at least 1"));
            }
        }
        if self.head_dim.is_none() && !self.d_model.is_multiple_of(self.n_heads) {
            return Err(GoodhartError::invalid(
                "d_model",
                format!(
                    "{} is not divisible by n_heads = {} (set head_dim)",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if !self.n_heads.is_multiple_of(self.kv_heads()) {
            return Err(GoodhartError::invalid(
                "n_kv_heads",
                format!(
                    "{} does not divide n_heads = {}",
                    self.kv_heads(),
                    self.n_heads
                ),
            ));
        }
        if self.positions == Positions::Rotary && !self.d_head().is_multiple_of(2) {
            return Err(GoodhartError::invalid(
                "d_model",
                "rotary positions need an even head width",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(GoodhartError::invalid("dropout", "must lie in [0, 1)"));
        }
        if !(self.rope_theta > 0.0 && self.layer_norm_eps > 0.0) {
            return Err(GoodhartError::invalid(
                "rope_theta / layer_norm_eps",
                "must be positive",
            ));
        }
        if let Some(scaling) = &self.rope_scaling {
            scaling.validate()?;
        }
        Ok(())
    }

    /// The rotary frequencies `theta^(-2i/d_head)`, rescaled by `rope_scaling`.
    pub fn rope_frequencies(&self) -> Vec<f64> {
        let d = self.d_head();
        let mut inv: Vec<f64> = (0..d / 2)
            .map(|i| self.rope_theta.powf(-2.0 * i as f64 / d as f64))
            .collect();
        if let Some(scaling) = &self.rope_scaling {
            scaling.apply(&mut inv);
        }
        inv
    }

    /// A [`Trunk`] with weights drawn as GPT-2 draws them (normal, std 0.02; biases 0;
    /// norm weights 1).
    pub fn init_trunk<B: Backend>(&self, device: &B::Device) -> Result<Trunk<B>> {
        self.trunk_with(GPT2_INIT, device)
    }

    /// A [`TransformerLm`] (trunk and LM head) with GPT-2's initialisation.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TransformerLm<B>> {
        self.init_with(GPT2_INIT, device)
    }

    /// A [`TransformerLm`] whose weight matrices come from `init` (biases 0, norm weights
    /// 1): [`crate::hf::load`] starts from zeros, which it overwrites, rather than from
    /// random draws.
    pub(crate) fn init_with<B: Backend>(
        &self,
        init: Initializer,
        device: &B::Device,
    ) -> Result<TransformerLm<B>> {
        let trunk = self.trunk_with(init.clone(), device)?;
        let proj = (!self.tie_embeddings).then(|| {
            LinearConfig::new(self.d_model, self.vocab_size)
                .with_bias(false)
                .with_initializer(init)
                .init(device)
        });
        Ok(materialized(TransformerLm {
            trunk,
            head: LmHead { proj },
        }))
    }

    fn trunk_with<B: Backend>(&self, init: Initializer, device: &B::Device) -> Result<Trunk<B>> {
        self.validate()?;
        let linear = |i: usize, o: usize, bias: bool| linear(i, o, bias, init.clone(), device);
        let norm = |d: usize| Norm::new(self.norm, d, self.layer_norm_eps, device);
        let (d, h, kv, dh, m) = (
            self.d_model,
            self.n_heads,
            self.kv_heads(),
            self.d_head(),
            self.mlp_width(),
        );
        let head_norm = || {
            self.qk_norm
                .then(|| Norm::new(NormKind::Rms, dh, self.layer_norm_eps, device))
        };
        let gates = if self.gated_mlp { 2 } else { 1 };
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                norm_attn: norm(d),
                attn: Attention {
                    qkv: linear(d, (h + 2 * kv) * dh, self.qkv_bias),
                    out: linear(h * dh, d, self.out_bias),
                    q_norm: head_norm(),
                    k_norm: head_norm(),
                    dropout: DropoutConfig::new(self.dropout).init(),
                    n_heads: h,
                    n_kv_heads: kv,
                },
                norm_mlp: norm(d),
                mlp: FeedForward {
                    fc: linear(d, gates * m, self.mlp_bias),
                    proj: linear(m, d, self.mlp_bias),
                    gelu_tanh: self.gelu_tanh,
                    gated: self.gated_mlp,
                },
                dropout: DropoutConfig::new(self.dropout).init(),
                pre_norm: self.pre_norm,
            })
            .collect();
        let emb = |n: usize| {
            EmbeddingConfig::new(n, d)
                .with_initializer(init.clone())
                .init(device)
        };
        let rope = (self.positions == Positions::Rotary).then(|| RopeSpec {
            inv_freq: self.rope_frequencies(),
            half: self.rope_layout == RopeLayout::Half,
            heads: h + kv,
        });
        Ok(materialized(Trunk {
            tok_emb: emb(self.vocab_size),
            pos_emb: (self.positions == Positions::Learned).then(|| emb(self.max_seq_len)),
            blocks,
            norm_f: norm(d),
            dropout: DropoutConfig::new(self.dropout).init(),
            rope,
            sliding_window: self.sliding_window,
            max_seq_len: self.max_seq_len,
        }))
    }
}

/// GPT-2's initialisation of weight matrices and embeddings, N(0, 0.02).
const GPT2_INIT: Initializer = Initializer::Normal {
    mean: 0.0,
    std: 0.02,
};

/// A `Linear [i, o]` with weights from `init` and, when `bias`, a zero bias (GPT-2's and
/// CleanRL's bias initialisation).
pub(crate) fn linear<B: Backend>(
    i: usize,
    o: usize,
    bias: bool,
    init: Initializer,
    device: &B::Device,
) -> Linear<B> {
    let mut l = LinearConfig::new(i, o)
        .with_bias(bias)
        .with_initializer(init)
        .init(device);
    // A fresh parameter: the dropped one is never drawn (an orthogonal initializer has
    // no meaning for a vector).
    l.bias = l
        .bias
        .map(|_| Param::from_tensor(Tensor::zeros([o], device)));
    l
}

/// `linear` applied to `x [B, T, D_in]` as one `[B T, D_in] x [D_in, D_out]` product
/// (burn's `Linear` on a 3-d input multiplies each of the `B` rows separately).
pub fn linear_3d<B: Backend>(linear: &Linear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [b, t, d] = x.dims();
    let y = linear.forward(x.reshape([b * t, d]));
    let o = y.dims()[1];
    y.reshape([b, t, o])
}

/// `x [N, D_in]` times the output columns `at..at + n` of `linear` (a view of its weight
/// and bias), `[N, n]`. For a fused projection whose blocks are used separately (Q, K, V;
/// SwiGLU's gate and up): each block's gradient is then its own `[N, n]`, where blocks
/// narrowed out of one fused output would each take a zero-filled gradient of the whole
/// output, summed, in the backward pass.
fn linear_columns<B: Backend>(
    linear: &Linear<B>,
    x: Tensor<B, 2>,
    at: usize,
    n: usize,
) -> Tensor<B, 2> {
    burn::tensor::module::linear(
        x,
        linear.weight.val().narrow(1, at, n),
        linear.bias.as_ref().map(|bias| bias.val().narrow(0, at, n)),
    )
}

/// LayerNorm or RMSNorm over the last dimension, with weight `gamma` and, if set, bias
/// `beta` (LayerNorm has one; the RMSNorms of Llama and Qwen have none); the parameter
/// names are burn's `LayerNorm`'s.
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    /// Scale `[d]`.
    pub gamma: Param<Tensor<B, 1>>,
    /// Shift `[d]` (LayerNorm).
    pub beta: Option<Param<Tensor<B, 1>>>,
    #[module(skip)]
    rms: bool,
    #[module(skip)]
    epsilon: f64,
}

impl<B: Backend> Norm<B> {
    /// A norm of width `d` with weight 1 (and, for LayerNorm, bias 0).
    pub fn new(kind: NormKind, d: usize, epsilon: f64, device: &B::Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([d], device)),
            beta: (kind == NormKind::Layer).then(|| Param::from_tensor(Tensor::zeros([d], device))),
            rms: kind == NormKind::Rms,
            epsilon,
        }
    }

    /// Normalises `x [..., d]` over its last dimension.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        if self.rms {
            let rms = (x.clone().square().mean_dim(D - 1) + self.epsilon).sqrt();
            let y = x / rms * self.gamma.val().unsqueeze();
            match &self.beta {
                Some(beta) => y + beta.val().unsqueeze(),
                None => y,
            }
        } else {
            // The backend's fused op, as burn's `LayerNorm` runs it.
            Tensor::from_primitive(TensorPrimitive::Float(B::layer_norm(
                x.into_primitive().tensor(),
                self.gamma.val().into_primitive().tensor(),
                self.beta
                    .as_ref()
                    .map(|b| b.val().into_primitive().tensor()),
                self.epsilon,
            )))
        }
    }
}

/// Causal grouped-query self-attention with a fused QKV projection.
///
/// The fused projection's columns are `Q | K | V` (GPT-2's `c_attn` when `H_kv = H`): the
/// `H_kv` key heads, then the `H_kv` value heads, after `H` query heads ordered so that
/// the query head of column block `j H_kv + k` is the `j`-th of the `H / H_kv` heads
/// sharing key/value head `k` (Hugging Face head `k H / H_kv + j`, see [`crate::hf`]).
/// Query heads are in Hugging Face's order in the output projection.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `x -> [Q | K | V]`, weight `[D, (H + 2 H_kv) d_head]`.
    pub qkv: Linear<B>,
    /// Output projection, weight `[H d_head, D]`.
    pub out: Linear<B>,
    /// RMSNorm of each query head (Qwen3), weight `[d_head]`.
    pub q_norm: Option<Norm<B>>,
    /// RMSNorm of each key head (Qwen3), weight `[d_head]`.
    pub k_norm: Option<Norm<B>>,
    dropout: Dropout,
    #[module(skip)]
    n_heads: usize,
    #[module(skip)]
    n_kv_heads: usize,
}

/// The position-wise MLP: `W2 GELU(W1 x)`, or SwiGLU with `W1 = [W_gate | W_up]`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `W1`, `[D, M]`; for SwiGLU `[W_gate | W_up]`, `[D, 2M]`.
    pub fc: Linear<B>,
    /// `W2` (`W_down`), `[M, D]`.
    pub proj: Linear<B>,
    #[module(skip)]
    gelu_tanh: bool,
    #[module(skip)]
    gated: bool,
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before (pre-norm) or after (post-norm) attention.
    pub norm_attn: Norm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before (pre-norm) or after (post-norm) the MLP.
    pub norm_mlp: Norm<B>,
    /// MLP.
    pub mlp: FeedForward<B>,
    dropout: Dropout,
    #[module(skip)]
    pre_norm: bool,
}

/// The rotary frequencies and pairing of a trunk.
#[derive(Debug, Clone, PartialEq)]
struct RopeSpec {
    inv_freq: Vec<f64>,
    half: bool,
    /// Query and key heads per token, `H + H_kv`: the rows a token's rotation covers.
    heads: usize,
}

/// Embeddings, blocks and final norm: `tokens [B, T] -> hidden [B, T, D]`.
///
/// Shared by the LM ([`TransformerLm`]), the PPO value model and goodhart-reward's
/// reward model. The final norm is applied in both norm placements.
#[derive(Module, Debug)]
pub struct Trunk<B: Backend> {
    /// Token embeddings `[V, D]` (GPT-2 `wte`).
    pub tok_emb: Embedding<B>,
    /// Learned position embeddings `[max_seq_len, D]` (GPT-2 `wpe`), if used.
    pub pos_emb: Option<Embedding<B>>,
    /// The blocks (GPT-2 `h`).
    pub blocks: Vec<Block<B>>,
    /// Final norm (GPT-2 `ln_f`).
    pub norm_f: Norm<B>,
    dropout: Dropout,
    #[module(skip)]
    rope: Option<RopeSpec>,
    #[module(skip)]
    sliding_window: Option<usize>,
    #[module(skip)]
    max_seq_len: usize,
}

/// The output projection: tied to the token embeddings (`logits = h E^T`) or its own
/// `[D, V]` matrix.
#[derive(Module, Debug)]
pub struct LmHead<B: Backend> {
    /// The untied projection; `None` when tied to the embeddings.
    pub proj: Option<Linear<B>>,
}

impl<B: Backend> LmHead<B> {
    /// `hidden [B, T, D] -> logits [B, T, V]`; `embedding` is used when tied.
    pub fn forward(&self, hidden: Tensor<B, 3>, embedding: &Embedding<B>) -> Tensor<B, 3> {
        match &self.proj {
            Some(proj) => linear_3d(proj, hidden),
            None => {
                let [b, t, d] = hidden.dims();
                let logits = hidden
                    .reshape([b * t, d])
                    .matmul(embedding.weight.val().transpose());
                let v = logits.dims()[1];
                logits.reshape([b, t, v])
            }
        }
    }
}

/// A decoder-only transformer language model.
#[derive(Module, Debug)]
pub struct TransformerLm<B: Backend> {
    /// Embeddings, blocks, final norm.
    pub trunk: Trunk<B>,
    /// Output projection.
    pub head: LmHead<B>,
}

impl<B: Backend> TransformerLm<B> {
    /// Next-token logits `[B, T, V]`: `logits[b, t]` predicts token `t + 1`.
    ///
    /// `attention_mask [B, T]` is 1 on real tokens and 0 on padding (left or right).
    /// Errors on a shape mismatch, a sequence longer than `max_seq_len`, or a token id
    /// outside the vocabulary.
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 3>> {
        let hidden = self.trunk.forward(tokens, attention_mask)?;
        Ok(self.logits(hidden))
    }

    /// Logits from hidden states of the trunk.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head.forward(hidden, &self.trunk.tok_emb)
    }

    /// Runs `tokens [B, T_new]` after what `cache` holds, appends their keys and values
    /// to it, and returns their logits `[B, T_new, V]` (incremental decoding).
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        let hidden = self.trunk.forward_cached(tokens, attention_mask, cache)?;
        Ok(self.logits(hidden))
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.trunk.tok_emb.weight.dims()[0]
    }
}

impl<B: Backend> Trunk<B> {
    /// Hidden states `[B, T, D]` after the final norm. See [`TransformerLm::forward`].
    pub fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 3>> {
        self.check_tokens(&tokens)?;
        self.run(tokens, attention_mask, None)
    }

    /// Hidden states of `tokens [B, T_new]` that follow the cached prefix; writes their
    /// keys, values and mask into `cache`.
    pub fn forward_cached(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        self.check_tokens(&tokens)?;
        self.forward_cached_unchecked(tokens, attention_mask, cache)
    }

    /// [`Trunk::forward_cached`] without the check of the token ids (one read-back from
    /// the device): for ids the sampler drew from this model's vocabulary.
    pub(crate) fn forward_cached_unchecked(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
        cache: &mut KvCache<B>,
    ) -> Result<Tensor<B, 3>> {
        if cache.layers.len() != self.blocks.len() {
            return Err(GoodhartError::invalid(
                "cache",
                format!(
                    "holds {} layers, the model has {}",
                    cache.layers.len(),
                    self.blocks.len()
                ),
            ));
        }
        let [b, t] = tokens.dims();
        cache.check_room(b, t)?;
        self.run(tokens, attention_mask, Some(cache))
    }

    /// Width `D`.
    pub fn d_model(&self) -> usize {
        self.tok_emb.weight.dims()[1]
    }

    /// Longest accepted sequence.
    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Error unless every id is in `0..V` (one device reduction).
    fn check_tokens(&self, tokens: &Tensor<B, 2, Int>) -> Result<()> {
        let [b, t] = tokens.dims();
        if b == 0 || t == 0 {
            return Err(GoodhartError::Empty {
                what: "tokens".into(),
            });
        }
        let vocab = self.tok_emb.weight.dims()[0] as i64;
        let bad = tokens
            .clone()
            .lower_elem(0)
            .bool_or(tokens.clone().greater_equal_elem(vocab));
        if bad.any().into_scalar().to_bool() {
            return Err(GoodhartError::invalid(
                "tokens",
                format!("a token id lies outside the vocabulary 0..{vocab}"),
            ));
        }
        Ok(())
    }

    fn run(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
        mut cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>> {
        let [b, t] = tokens.dims();
        if attention_mask.dims() != [b, t] {
            return Err(GoodhartError::shape(
                "attention_mask",
                &[b, t],
                &attention_mask.dims(),
            ));
        }
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let total = offset + t;
        if total > self.max_seq_len {
            return Err(GoodhartError::invalid(
                "tokens",
                format!(
                    "sequence length {total} exceeds max_seq_len {}",
                    self.max_seq_len
                ),
            ));
        }
        // Positions count real tokens: earlier real tokens in the cache plus this chunk's
        // running count, minus one, clamped at 0 for leading padding.
        let pos = (attention_mask.clone().cumsum(1) - 1.0).clamp_min(0.0);
        let pos = match cache.as_ref().and_then(|c| c.real_tokens()) {
            Some(n) => pos + n,
            None => pos,
        };
        let key_mask = match cache.as_mut() {
            Some(c) => c.write_mask(attention_mask),
            None => attention_mask,
        };
        let bias = attention_bias(&key_mask, offset, t, self.sliding_window);
        let rope = self.rope.as_ref().map(|spec| Rope::new(pos.clone(), spec));

        let mut x = self.tok_emb.forward(tokens);
        if let Some(pe) = &self.pos_emb {
            x = x + pe.forward(pos.int());
        }
        x = self.dropout.forward(x);
        match cache {
            Some(cache) => {
                let capacity = cache.capacity();
                for (block, layer) in self.blocks.iter().zip(cache.layers.iter_mut()) {
                    x = block.forward(x, &bias, rope.as_ref(), Some((layer, offset, capacity)));
                }
                cache.advance(t);
            }
            None => {
                for block in &self.blocks {
                    x = block.forward(x, &bias, rope.as_ref(), None);
                }
            }
        }
        Ok(self.norm_f.forward(x))
    }
}

/// Additive attention bias, flattened to `[1, B T T_k]` (one row, repeated for every
/// head), shared by every layer of one forward pass: 0 where query `i` (at absolute index
/// `offset + i`) may attend key `j` (`j <= offset + i`, `key_mask[b, j] = 1`, and
/// `offset + i - j < window` under a sliding window), `-1e9` elsewhere. A query that may
/// attend nothing (leading padding) gets a uniform average, finite and ignored downstream.
fn attention_bias<B: Backend>(
    key_mask: &Tensor<B, 2>,
    offset: usize,
    t: usize,
    window: Option<usize>,
) -> Tensor<B, 2> {
    let [b, tk] = key_mask.dims();
    let device = key_mask.device();
    let q =
        Tensor::<B, 1, Int>::arange(offset as i64..(offset + t) as i64, &device).reshape([1, t, 1]);
    let k = Tensor::<B, 1, Int>::arange(0..tk as i64, &device).reshape([1, 1, tk]);
    let distance = q - k;
    let mut causal = distance.clone().greater_equal_elem(0).float(); // [1, T, Tk]
    if let Some(w) = window {
        causal = causal * distance.lower_elem(w as i64).float();
    }
    // [B, T Tk]: the key mask repeated per query row (a copy of rows), times the causal
    // pattern as one shared row (a broadcast the CPU backend vectorises; the product of
    // the `[1, T, Tk]` and `[B, 1, Tk]` broadcasts it walks element by element).
    let allowed = key_mask
        .clone()
        .reshape([b, 1, tk])
        .repeat_dim(1, t)
        .reshape([b, t * tk])
        * causal.reshape([1, t * tk]);
    ((allowed - 1.0) * 1e9).reshape([1, b * t * tk])
}

/// Rotation tables for one forward pass, shared by every layer, for the query and key
/// heads laid out as rows `[B T (H + H_kv), d_head]` (the fused projection's order).
///
/// `rope(x) = x cos + rotate(x) sin`, with each coordinate's angle `pos * inv_freq_i` and
/// `rotate(x) = x R` for the signed permutation `R` that maps each coordinate to its
/// partner: `rotate_half(x) = [-x_2, x_1]` in the half layout (Llama's), `(-x_{2i+1},
/// x_{2i})` in the interleaved one (GPT-J's). A product with `R` and three element-wise
/// ops on contiguous rows replace slicing the halves out of a strided view (which the
/// CPU backend walks element by element) and concatenating them back; the values are the
/// same (`R`'s products with 0 add nothing).
struct Rope<B: Backend> {
    /// `cos` of each row's angles, `[B T (H + H_kv), d_head]`.
    cos: Tensor<B, 2>,
    /// `sin` of each row's angles.
    sin: Tensor<B, 2>,
    /// `R`, `[d_head, d_head]`.
    rotate: Tensor<B, 2>,
}

impl<B: Backend> Rope<B> {
    /// `angle[b t, head, i] = pos[b, t] * inv_freq_i`: one rank-1 product `pos [B T, 1] x
    /// freq [1, (H + H_kv) d_head]`, so the tables are built without a broadcast copy.
    fn new(pos: Tensor<B, 2>, spec: &RopeSpec) -> Self {
        let [b, t] = pos.dims();
        let device = pos.device();
        let half = spec.inv_freq.len();
        let d = 2 * half;
        // Coordinate j's frequency, and its partner with the sign of its term.
        let coordinate = |j: usize| {
            if spec.half {
                (j % half, (j + half) % d, if j < half { -1.0 } else { 1.0 })
            } else {
                (j / 2, j ^ 1, if j.is_multiple_of(2) { -1.0 } else { 1.0 })
            }
        };
        let freq: Vec<f32> = (0..spec.heads)
            .flat_map(|_| (0..d).map(|j| spec.inv_freq[coordinate(j).0] as f32))
            .collect();
        let freq =
            Tensor::<B, 1>::from_floats(freq.as_slice(), &device).reshape([1, spec.heads * d]);
        let angle = pos
            .reshape([b * t, 1])
            .matmul(freq)
            .reshape([b * t * spec.heads, d]);
        // rotate(x)_j = sign_j x_partner(j): R[partner(j), j] = sign_j.
        let mut r = vec![0f32; d * d];
        for j in 0..d {
            let (_, partner, sign) = coordinate(j);
            r[partner * d + j] = sign;
        }
        Self {
            cos: angle.clone().cos(),
            sin: angle.sin(),
            rotate: Tensor::<B, 1>::from_floats(r.as_slice(), &device).reshape([d, d]),
        }
    }

    /// Rotates the rows `x [B T (H + H_kv), d_head]`.
    fn apply(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let rotated = x.clone().matmul(self.rotate.clone());
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// A layer's cache, the position its new keys go to, and the cache's capacity.
type CacheSlot<'a, B> = Option<(&'a mut LayerCache<B>, usize, usize)>;

impl<B: Backend> Block<B> {
    fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: &Tensor<B, 2>,
        rope: Option<&Rope<B>>,
        cache: CacheSlot<'_, B>,
    ) -> Tensor<B, 3> {
        if self.pre_norm {
            let a = self
                .attn
                .forward(self.norm_attn.forward(x.clone()), bias, rope, cache);
            let x = x + self.dropout.forward(a);
            let m = self.mlp.forward(self.norm_mlp.forward(x.clone()));
            x + self.dropout.forward(m)
        } else {
            let a = self.attn.forward(x.clone(), bias, rope, cache);
            let x = self.norm_attn.forward(x + self.dropout.forward(a));
            let m = self.mlp.forward(x.clone());
            self.norm_mlp.forward(x + self.dropout.forward(m))
        }
    }
}

impl<B: Backend> Attention<B> {
    /// Heads are laid out `[1, H_kv, G, B, T, d_head]` with `G = H / H_kv` query heads
    /// per key/value head (`G = 1` for keys and values): queries, keys and values are
    /// products with column blocks of the fused projection ([`linear_columns`]; queries
    /// and keys one product when they are normed or rotated, see [`Rope`]), the `G`
    /// query heads of a group share its keys by a broadcast product, the scores
    /// `[1, H_kv, G, B, T, T_k]` take the bias `[B, T, T_k]` as one row repeated per head,
    /// and the heads' outputs are copied side by side into `[B T, H d_head]` (rows of
    /// `d_head`) for one product with the output projection.
    fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: &Tensor<B, 2>,
        rope: Option<&Rope<B>>,
        cache: CacheSlot<'_, B>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let (h, kv) = (self.n_heads, self.n_kv_heads);
        let g = h / kv;
        let width = self.qkv.weight.dims()[1];
        let dh = width / (h + 2 * kv);
        let x = x.reshape([b * t, d]);
        let project = |at: usize, n: usize| linear_columns(&self.qkv, x.clone(), at, n);
        // `[B T, n H_kv dh]` as `[1, H_kv, n, B, T, dh]`.
        let heads =
            |x: Tensor<B, 2>, n: usize| x.reshape([b, t, 1, n, kv, dh]).permute([2, 4, 3, 0, 1, 5]);
        let v = heads(project((h + kv) * dh, kv * dh), 1);
        // Queries taken as they come out of their product are scaled by `1/sqrt(dh)` there
        // (`[B T, H dh]`, fewer elements than the scores `[H, B T, T_k]`); the scores of
        // normed or rotated ones are divided by `sqrt(dh)`.
        let scale = 1.0 / (dh as f64).sqrt();
        let plain = rope.is_none() && self.q_norm.is_none() && self.k_norm.is_none();
        let (q, k) = if plain {
            (
                heads(project(0, h * dh) * scale, g),
                heads(project(h * dh, kv * dh), 1),
            )
        } else {
            // The per-head norms and the rotation run on the query and key heads as
            // contiguous rows `[B T, H + H_kv, dh]`.
            let mut qk = project(0, (h + kv) * dh).reshape([b * t, h + kv, dh]);
            if self.q_norm.is_some() || self.k_norm.is_some() {
                let norm = |n: &Option<Norm<B>>, x: Tensor<B, 3>| match n {
                    Some(n) => n.forward(x),
                    None => x,
                };
                qk = Tensor::cat(
                    vec![
                        norm(&self.q_norm, qk.clone().narrow(1, 0, h)),
                        norm(&self.k_norm, qk.narrow(1, h, kv)),
                    ],
                    1,
                );
            }
            let mut qk = qk.reshape([b * t * (h + kv), dh]);
            if let Some(rope) = rope {
                qk = rope.apply(qk);
            }
            let qk = heads(qk.reshape([b * t, (h + kv) * dh]), g + 1);
            (qk.clone().narrow(2, 0, g), qk.narrow(2, g, 1))
        };
        let (k, v) = match cache {
            Some((layer, at, capacity)) => layer.write(k, v, at, capacity),
            None => (k, v),
        };
        let tk = k.dims()[4];
        let scores = q.matmul(k.swap_dims(4, 5)).reshape([h, b * t * tk]);
        let scores = if plain {
            scores
        } else {
            scores / (dh as f64).sqrt()
        };
        let scores = (scores + bias.clone()).reshape([1, kv, g, b, t, tk]);
        // [1, H_kv, G, B, T, dh]
        let y = self.dropout.forward(softmax(scores, 5)).matmul(v);
        // Heads side by side, `[B T, H dh]` (one copy, a row of `dh` at a time), then one
        // product with the output projection.
        let y = y
            .reshape([h, b * t, dh])
            .swap_dims(0, 1)
            .reshape([b * t, h * dh]);
        self.out.forward(y).reshape([b, t, d])
    }
}

impl<B: Backend> FeedForward<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let x = x.reshape([b * t, d]);
        let hidden = if self.gated {
            let m = self.fc.weight.dims()[1] / 2;
            silu(linear_columns(&self.fc, x.clone(), 0, m)) * linear_columns(&self.fc, x, m, m)
        } else if self.gelu_tanh {
            gelu_approximate(self.fc.forward(x))
        } else {
            gelu(self.fc.forward(x))
        };
        self.proj.forward(hidden).reshape([b, t, d])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use goodhart_core::testing::{assert_close, tolerance, values};

    /// A tiny model for tests: V = 11, D = 16, 2 layers, 2 heads, 32 positions.
    pub(crate) fn tiny(positions: Positions) -> TransformerConfig {
        TransformerConfig::new(11, 16, 2, 2, 32).with_positions(positions)
    }

    pub(crate) fn ints<B: Backend>(rows: &[&[i64]], device: &B::Device) -> Tensor<B, 2, Int> {
        let (b, t) = (rows.len(), rows[0].len());
        let flat: Vec<i64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [b, t]), device)
    }

    pub(crate) fn floats<B: Backend>(rows: &[&[f32]], device: &B::Device) -> Tensor<B, 2> {
        let (b, t) = (rows.len(), rows[0].len());
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_data(TensorData::new(flat, [b, t]), device)
    }

    goodhart_core::backend_test! {
        fn rope_rotates_each_layouts_pairs_by_hand<B>(device) {
            // d_head 4, frequencies (1, 0.5), positions 0, 1, 2 of one sequence, two heads
            // per token; row (t, head) is (1, 2, 3, 4) * (head + 1).
            let x: Vec<[f64; 4]> = (0..3)
                .flat_map(|_| (1..=2).map(|m| [1.0, 2.0, 3.0, 4.0].map(|v| v * m as f64)))
                .collect();
            let flat: Vec<f32> = x.iter().flatten().map(|&v| v as f32).collect();
            for half in [true, false] {
                let spec = RopeSpec { inv_freq: vec![1.0, 0.5], half, heads: 2 };
                let rope = Rope::<B>::new(floats(&[&[0.0, 1.0, 2.0]], device), &spec);
                let got = rope.apply(Tensor::<B, 1>::from_floats(flat.as_slice(), device).reshape([6, 4]));
                // Half layout: pairs (0, 2) at frequency 1 and (1, 3) at 0.5; interleaved:
                // (0, 1) at 1 and (2, 3) at 0.5. (a, b) -> (a cos - b sin, b cos + a sin).
                let pairs = if half { [(0, 2, 1.0), (1, 3, 0.5)] } else { [(0, 1, 1.0), (2, 3, 0.5)] };
                let want: Vec<f32> = x
                    .iter()
                    .enumerate()
                    .flat_map(|(row, r)| {
                        let p = (row / 2) as f64;
                        let mut out = [0.0; 4];
                        for (i, j, f) in pairs {
                            let (c, s) = ((p * f).cos(), (p * f).sin());
                            out[i] = r[i] * c - r[j] * s;
                            out[j] = r[j] * c + r[i] * s;
                        }
                        out.map(|v| v as f32)
                    })
                    .collect();
                assert_close(&values(got.reshape([24])), &want, 1e-5);
            }
        }
    }

    goodhart_core::backend_test! {
        fn left_padding_and_cache_do_not_change_logits<B>(device) {
            for positions in [Positions::Rotary, Positions::Learned] {
                let cfg = tiny(positions).with_pre_norm(positions == Positions::Rotary);
                B::seed(device, 7);
                let model = cfg.init::<B>(device).unwrap();
                let seq: &[i64] = &[3, 1, 4, 1, 5];
                let plain = model
                    .forward(ints::<B>(&[seq], device), floats::<B>(&[&[1.0; 5]], device))
                    .unwrap();
                // The same sequence behind two pads, with any ids in the padding.
                let padded = model
                    .forward(
                        ints::<B>(&[&[9, 2, 3, 1, 4, 1, 5]], device),
                        floats::<B>(&[&[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]], device),
                    )
                    .unwrap()
                    .narrow(1, 2, 5);
                let tol = tolerance(1e-5);
                assert_close(&values(padded), &values(plain.clone()), tol);
                // One token at a time through the cache: the same logits.
                let mut cache = KvCache::new(2, 5);
                let steps: Vec<Tensor<B, 3>> = seq
                    .iter()
                    .map(|&id| {
                        model
                            .forward_cached(ints::<B>(&[&[id]], device), floats::<B>(&[&[1.0]], device), &mut cache)
                            .unwrap()
                    })
                    .collect();
                assert_eq!(cache.len(), 5);
                assert_close(&values(Tensor::cat(steps, 1)), &values(plain), tol);
            }
        }
    }

    goodhart_core::backend_test! {
        fn attention_is_causal<B>(device) {
            B::seed(device, 3);
            let model = tiny(Positions::Rotary).init::<B>(device).unwrap();
            let mask = floats::<B>(&[&[1.0; 4]], device);
            let a = model.forward(ints::<B>(&[&[1, 2, 3, 4]], device), mask.clone()).unwrap();
            let b = model.forward(ints::<B>(&[&[1, 2, 3, 9]], device), mask).unwrap();
            // Changing token 3 leaves the logits at positions 0..3 alone and changes position 3.
            assert_close(&values(a.clone().narrow(1, 0, 3)), &values(b.clone().narrow(1, 0, 3)), tolerance(1e-6));
            let diff: f32 = values(a.narrow(1, 3, 1) - b.narrow(1, 3, 1)).iter().map(|d| d.abs()).sum();
            assert!(diff > 1e-3, "the last position must see its own token (diff {diff})");
        }
    }

    goodhart_core::backend_test! {
        fn untied_zero_head_gives_uniform_logits<B>(device) {
            // logits = h W with W = 0: every logit 0, whatever the trunk computes.
            let mut model = tiny(Positions::Learned).with_tie_embeddings(false).init::<B>(device).unwrap();
            let proj = model.head.proj.take().unwrap();
            model.head.proj = Some(Linear { weight: proj.weight.map(|w| w.zeros_like()), bias: None });
            let logits = model.forward(ints::<B>(&[&[1, 2]], device), floats::<B>(&[&[1.0, 1.0]], device)).unwrap();
            assert_eq!(logits.dims(), [1, 2, 11]);
            assert_close(&values(logits), &[0.0; 22], 0.0);
        }
    }

    goodhart_core::backend_test! {
        fn bad_input_is_an_error<B>(device) {
            let model = tiny(Positions::Learned).init::<B>(device).unwrap();
            let ok_mask = floats::<B>(&[&[1.0, 1.0]], device);
            let err = model.forward(ints::<B>(&[&[1, 11]], device), ok_mask.clone()).unwrap_err();
            assert!(matches!(err, GoodhartError::InvalidArgument { ref name, .. } if name == "tokens"), "{err}");
            let err = model.forward(ints::<B>(&[&[1, 2]], device), floats::<B>(&[&[1.0, 1.0, 1.0]], device)).unwrap_err();
            assert_eq!(err, GoodhartError::shape("attention_mask", &[1, 2], &[1, 3]));
            let long = vec![1i64; 33];
            let err = model.forward(ints::<B>(&[&long], device), floats::<B>(&[&[1.0; 33]], device)).unwrap_err();
            assert!(err.to_string().contains("exceeds max_seq_len 32"), "{err}");
        }
    }

    #[test]
    fn config_is_validated() {
        let ok = TransformerConfig::new(8, 16, 1, 4, 8);
        assert!(ok.validate().is_ok());
        assert!(TransformerConfig::new(8, 16, 1, 3, 8).validate().is_err());
        // d_head = 3 is odd: rotary cannot pair it, learned positions can.
        let odd = TransformerConfig::new(8, 6, 1, 2, 8);
        assert!(odd.validate().is_err());
        assert!(odd.with_positions(Positions::Learned).validate().is_ok());
        assert!(ok.clone().with_dropout(1.0).validate().is_err());
        assert!(TransformerConfig::new(0, 16, 1, 4, 8).validate().is_err());
    }
}
