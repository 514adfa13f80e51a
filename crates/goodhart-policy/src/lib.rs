//! # goodhart-policy
//!
//! Policies for RL post-training, generic over the burn backend:
//!
//! - [`transformer`]: a decoder-only transformer LM ([`TransformerLm`]) whose [`Trunk`]
//!   goodhart-reward reuses for its reward model;
//! - [`kv_cache`] and [`generate`]: batched sampling with incremental decoding
//!   (temperature, top-k, top-p, greedy, EOS), seeded from `goodhart_core::seed`;
//! - [`score`]: teacher-forced per-token log-probs and entropies (current, old and
//!   reference policies);
//! - [`mlp`]: categorical MLP policies and value heads for small environments, and a value
//!   head on the LM trunk for PPO;
//! - [`reference`]: frozen reference snapshots with EMA update and reset;
//! - [`tokenizer`]: built-in character / word tokenizers and Hugging Face `tokenizer.json`;
//! - [`chat_template`]: chat templates rendered as transformers' `apply_chat_template`;
//! - [`checkpoint`]: save / load with burn's recorders and GPT-2 safetensors import;
//! - [`hf`]: Hugging Face model directories (GPT-2, Llama, Mistral, Qwen2, Qwen3) in and
//!   out;
//! - [`pipeline`]: a model directory's model and tokenizer together, text in and out;
//! - [`sft`]: supervised fine-tuning (next-token NLL) to make base and SFT policies.

pub mod chat_template;
pub mod checkpoint;
pub mod generate;
pub mod hf;
pub mod kv_cache;
pub mod mlp;
pub mod pipeline;
pub mod reference;
pub mod score;
pub mod sft;
pub mod tokenizer;
pub mod transformer;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use checkpoint::CheckpointError;
pub use generate::{generate, Generation, GenerationConfig};
pub use kv_cache::KvCache;
pub use mlp::{LmValueModel, MlpConfig, MlpPolicy, MlpValue, ValueHead};
pub use pipeline::{Completion, TextModel};
pub use reference::Reference;
pub use score::{score, TokenScores};
pub use sft::{SftConfig, SftExample};
pub use tokenizer::{CharTokenizer, HfTokenizer, SpecialTokens, Tokenizer, WordTokenizer};
pub use transformer::{
    NormKind, Positions, RopeLayout, RopeScaling, TransformerConfig, TransformerLm, Trunk,
};
