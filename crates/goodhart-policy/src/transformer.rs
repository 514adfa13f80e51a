//! A decoder-only transformer language model (GPT-2 family), generic over the backend.
//!
//! `tokens [B, T] -> Trunk (embeddings, N blocks, final norm) -> hidden [B, T, D] ->
//! LmHead -> logits [B, T, V]`. Each block is
//!
//! ```text
//! pre-norm  (GPT-2):        x = x + Attn(LN1(x));  x = x + MLP(LN2(x))
//! post-norm (Vaswani 2017): x = LN1(x + Attn(x));  x = LN2(x + MLP(x))
//! ```
//!
//! with causal multi-head self-attention `softmax(Q K^T / sqrt(d_head) + bias) V`, where
//! `bias` is 0 where key `j` may be seen from query `i` (`j <= i` and key `j` is not
//! padding) and `-1e9` elsewhere, and an MLP `W2 GELU(W1 x)` of width `mlp_ratio * D`.
//!
//! Positions are counted over real tokens only: `pos_t = max(cumsum(mask)_t - 1, 0)`
//! (Hugging Face's `position_ids` for left padding), so a left-padded prompt gives the
//! same numbers as the unpadded one. Positions are either learned (GPT-2, Radford et al.
//! 2019) or rotary (RoFormer, Su et al. 2021; interleaved pairs `(x_2i, x_2i+1)` rotated by
//! `pos * theta^(-2i/d_head)`, burn's `RotaryEncoding` convention).
//!
//! The [`Trunk`] is reusable: goodhart-reward puts a scalar head on it for its reward
//! model, [`crate::mlp::LmValueModel`] a value head for PPO.
//!
//! Dropout (burn's `Dropout`) is active only on an autodiff backend; RL post-training
//! usually runs with `dropout = 0` (the default), as verl and TRL disable it for PPO.

use burn::{
    config::Config,
    module::Module,
    nn::{
        Dropout, DropoutConfig, Embedding, EmbeddingConfig, Initializer, LayerNorm,
        LayerNormConfig, Linear, LinearConfig,
    },
    tensor::{
        activation::{gelu, gelu_approximate, softmax},
        backend::Backend,
        cast::ToElement,
        Int, Tensor,
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

/// Configuration of a [`TransformerLm`] (and of its [`Trunk`]).
///
/// Defaults follow GPT-2 (pre-norm, tied embeddings, LayerNorm eps 1e-5, MLP ratio 4,
/// init N(0, 0.02)) except positions (rotary) and the GELU form (exact erf GELU; GPT-2
/// uses the tanh approximation, which [`TransformerConfig::gpt2`] selects).
#[derive(Config, Debug)]
pub struct TransformerConfig {
    /// Vocabulary size `V`.
    pub vocab_size: usize,
    /// Model width `D`.
    pub d_model: usize,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Number of attention heads (`D` must divide by it).
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
    /// MLP hidden width as a multiple of `D`.
    #[config(default = 4)]
    pub mlp_ratio: usize,
    /// Use the tanh approximation of GELU (GPT-2's `gelu_new`).
    #[config(default = false)]
    pub gelu_tanh: bool,
    /// LayerNorm epsilon.
    #[config(default = 1e-5)]
    pub layer_norm_eps: f64,
    /// Rotary base `theta`.
    #[config(default = 10000.0)]
    pub rope_theta: f64,
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

    /// Width of one head, `D / n_heads`.
    pub fn d_head(&self) -> usize {
        self.d_model / self.n_heads.max(1)
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
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(GoodhartError::invalid(name, "must be at least 1"));
            }
        }
        if self.d_model % self.n_heads != 0 {
            return Err(GoodhartError::invalid(
                "d_model",
                format!(
                    "{} is not divisible by n_heads = {}",
                    self.d_model, self.n_heads
                ),
            ));
        }
        if self.positions == Positions::Rotary && self.d_head() % 2 != 0 {
            return Err(GoodhartError::invalid(
                "d_model",
                "rotary positions need an even head width d_model / n_heads",
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(GoodhartError::invalid("dropout", "must lie in [0, 1)"));
        }
        if !(self.rope_theta > 0.0) || !(self.layer_norm_eps > 0.0) {
            return Err(GoodhartError::invalid(
                "rope_theta / layer_norm_eps",
                "must be positive",
            ));
        }
        Ok(())
    }

    /// A [`Trunk`] with weights drawn as GPT-2 draws them (normal, std 0.02; biases 0;
    /// LayerNorm weight 1).
    pub fn init_trunk<B: Backend>(&self, device: &B::Device) -> Result<Trunk<B>> {
        self.validate()?;
        let init = Initializer::Normal {
            mean: 0.0,
            std: 0.02,
        };
        let linear = |i: usize, o: usize| linear(i, o, init.clone(), device);
        let norm = || {
            LayerNormConfig::new(self.d_model)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let d = self.d_model;
        let blocks = (0..self.n_layers)
            .map(|_| Block {
                norm_attn: norm(),
                attn: Attention {
                    qkv: linear(d, 3 * d),
                    out: linear(d, d),
                    dropout: DropoutConfig::new(self.dropout).init(),
                    n_heads: self.n_heads,
                },
                norm_mlp: norm(),
                mlp: FeedForward {
                    fc: linear(d, self.mlp_ratio * d),
                    proj: linear(self.mlp_ratio * d, d),
                    gelu_tanh: self.gelu_tanh,
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
        Ok(materialized(Trunk {
            tok_emb: emb(self.vocab_size),
            pos_emb: (self.positions == Positions::Learned).then(|| emb(self.max_seq_len)),
            blocks,
            norm_f: norm(),
            dropout: DropoutConfig::new(self.dropout).init(),
            rope_theta: (self.positions == Positions::Rotary).then_some(self.rope_theta),
            max_seq_len: self.max_seq_len,
        }))
    }

    /// A [`TransformerLm`] (trunk and LM head).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<TransformerLm<B>> {
        let trunk = self.init_trunk(device)?;
        let proj = (!self.tie_embeddings).then(|| {
            LinearConfig::new(self.d_model, self.vocab_size)
                .with_bias(false)
                .with_initializer(Initializer::Normal {
                    mean: 0.0,
                    std: 0.02,
                })
                .init(device)
        });
        Ok(materialized(TransformerLm {
            trunk,
            head: LmHead { proj },
        }))
    }
}

/// A `Linear [i, o]` with weights from `init` and a zero bias (GPT-2's and CleanRL's
/// bias initialisation).
pub(crate) fn linear<B: Backend>(
    i: usize,
    o: usize,
    init: Initializer,
    device: &B::Device,
) -> Linear<B> {
    let mut l = LinearConfig::new(i, o).with_initializer(init).init(device);
    // A fresh parameter: the dropped one is never drawn (an orthogonal initializer has
    // no meaning for a vector).
    l.bias = l
        .bias
        .map(|_| burn::module::Param::from_tensor(Tensor::zeros([o], device)));
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

/// Causal multi-head self-attention with a fused QKV projection (GPT-2's `c_attn`).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `x -> [Q | K | V]`, weight `[D, 3D]`.
    pub qkv: Linear<B>,
    /// Output projection, weight `[D, D]`.
    pub out: Linear<B>,
    dropout: Dropout,
    #[module(skip)]
    n_heads: usize,
}

/// The position-wise MLP `W2 GELU(W1 x)`.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// `W1`, `[D, mlp_ratio D]`.
    pub fc: Linear<B>,
    /// `W2`, `[mlp_ratio D, D]`.
    pub proj: Linear<B>,
    #[module(skip)]
    gelu_tanh: bool,
}

/// One transformer block.
#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    /// Norm before (pre-norm) or after (post-norm) attention.
    pub norm_attn: LayerNorm<B>,
    /// Self-attention.
    pub attn: Attention<B>,
    /// Norm before (pre-norm) or after (post-norm) the MLP.
    pub norm_mlp: LayerNorm<B>,
    /// MLP.
    pub mlp: FeedForward<B>,
    dropout: Dropout,
    #[module(skip)]
    pre_norm: bool,
}

/// Embeddings, blocks and final norm: `tokens [B, T] -> hidden [B, T, D]`.
///
/// Shared by the LM ([`TransformerLm`]), the PPO value model and goodhart-reward's
/// reward model. The final LayerNorm is applied in both norm placements.
#[derive(Module, Debug)]
pub struct Trunk<B: Backend> {
    /// Token embeddings `[V, D]` (GPT-2 `wte`).
    pub tok_emb: Embedding<B>,
    /// Learned position embeddings `[max_seq_len, D]` (GPT-2 `wpe`), if used.
    pub pos_emb: Option<Embedding<B>>,
    /// The blocks (GPT-2 `h`).
    pub blocks: Vec<Block<B>>,
    /// Final LayerNorm (GPT-2 `ln_f`).
    pub norm_f: LayerNorm<B>,
    dropout: Dropout,
    #[module(skip)]
    rope_theta: Option<f64>,
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
        let bias = attention_bias(&key_mask, offset, t);
        let rope = self.rope_theta.map(|theta| {
            let d_head = self.d_model() / self.blocks.first().map_or(1, |b| b.attn.n_heads);
            Rope::new(pos.clone(), d_head, theta)
        });

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
/// `offset + i`) may attend key `j` (`j <= offset + i` and `key_mask[b, j] = 1`), `-1e9`
/// elsewhere. A query that may attend nothing (leading padding) gets a uniform average,
/// finite and ignored downstream.
fn attention_bias<B: Backend>(key_mask: &Tensor<B, 2>, offset: usize, t: usize) -> Tensor<B, 2> {
    let [b, tk] = key_mask.dims();
    let device = key_mask.device();
    let q =
        Tensor::<B, 1, Int>::arange(offset as i64..(offset + t) as i64, &device).reshape([1, t, 1]);
    let k = Tensor::<B, 1, Int>::arange(0..tk as i64, &device).reshape([1, 1, tk]);
    let causal = (q - k).greater_equal_elem(0).float(); // [1, T, Tk]
    let allowed = causal * key_mask.clone().reshape([b, 1, tk]); // [B, T, Tk]
    ((allowed - 1.0) * 1e9).reshape([1, b * t * tk])
}

/// Rotation angles for one forward pass, shared by every layer.
struct Rope<B: Backend> {
    cos: Tensor<B, 6>,
    sin: Tensor<B, 6>,
}

impl<B: Backend> Rope<B> {
    /// `angle[b, t, i] = pos[b, t] * theta^(-2i / d_head)`, shaped
    /// `[1, 1, B, T, d_head/2, 1]`.
    fn new(pos: Tensor<B, 2>, d_head: usize, theta: f64) -> Self {
        let [b, t] = pos.dims();
        let half = d_head / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| theta.powf(-2.0 * i as f64 / d_head as f64) as f32)
            .collect();
        let inv = Tensor::<B, 1>::from_floats(inv.as_slice(), &pos.device()).reshape([1, 1, half]);
        let angle = pos.reshape([b, t, 1]) * inv;
        let angle = angle.reshape([1, 1, b, t, half, 1]);
        Self {
            cos: angle.clone().cos(),
            sin: angle.sin(),
        }
    }

    /// Rotates pairs `(x_2i, x_2i+1)` of `x [1, H, B, T, d_head]`.
    fn apply(&self, x: Tensor<B, 5>) -> Tensor<B, 5> {
        let [one, h, b, t, d] = x.dims();
        let x = x.reshape([one, h, b, t, d / 2, 2]);
        let x0 = x.clone().narrow(5, 0, 1);
        let x1 = x.narrow(5, 1, 1);
        let r0 = x0.clone() * self.cos.clone() - x1.clone() * self.sin.clone();
        let r1 = x0 * self.sin.clone() + x1 * self.cos.clone();
        Tensor::cat(vec![r0, r1], 5).reshape([one, h, b, t, d])
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
    /// Heads are laid out `[1, H, B, T, d_head]`: queries, keys and values are views of
    /// the fused projection (no copy), the scores `[1, H, B, T, T_k]` take the bias
    /// `[B, T, T_k]` as one row repeated per head, and the output projection runs per head
    /// and sums over heads, so no tensor is transposed into a new layout (a transposing
    /// copy is an element-by-element walk on the CPU backend).
    fn forward(
        &self,
        x: Tensor<B, 3>,
        bias: &Tensor<B, 2>,
        rope: Option<&Rope<B>>,
        cache: CacheSlot<'_, B>,
    ) -> Tensor<B, 3> {
        let [b, t, d] = x.dims();
        let h = self.n_heads;
        let dh = d / h;
        let qkv = linear_3d(&self.qkv, x)
            .reshape([b, t, 3, h, dh])
            .permute([2, 3, 0, 1, 4]);
        let part = |i: usize| qkv.clone().narrow(0, i, 1);
        let (mut q, mut k, v) = (part(0), part(1), part(2));
        if let Some(rope) = rope {
            q = rope.apply(q);
            k = rope.apply(k);
        }
        let (k, v) = match cache {
            Some((layer, at, capacity)) => layer.write(k, v, at, capacity),
            None => (k, v),
        };
        let tk = k.dims()[3];
        let scores = q.matmul(k.swap_dims(3, 4)).reshape([h, b * t * tk]);
        let scores = (scores / (dh as f64).sqrt() + bias.clone()).reshape([1, h, b, t, tk]);
        let y = self.dropout.forward(softmax(scores, 4)).matmul(v); // [1, H, B, T, dh]
        let w = self.out.weight.val().reshape([1, h, dh, d]);
        // [1, H, B T, D], summed over heads as a product with a row of ones: its gradient
        // is a product too, where `sum_dim`'s is a broadcast (slow on the CPU backend).
        let per_head = y.reshape([1, h, b * t, dh]).matmul(w);
        let ones = Tensor::<B, 2>::ones([1, h], &per_head.device());
        let y = ones
            .matmul(per_head.reshape([h, b * t * d]))
            .reshape([b, t, d]);
        match &self.out.bias {
            Some(bias) => y + bias.val().reshape([1, 1, d]),
            None => y,
        }
    }
}

impl<B: Backend> FeedForward<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let hidden = linear_3d(&self.fc, x);
        let hidden = if self.gelu_tanh {
            gelu_approximate(hidden)
        } else {
            gelu(hidden)
        };
        linear_3d(&self.proj, hidden)
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
