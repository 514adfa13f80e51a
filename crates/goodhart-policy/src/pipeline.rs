//! Text in, text out: a Hugging Face model directory's model, tokenizer and special ids
//! together, as `cargo xtask generate` uses them (transformers' `text-generation`
//! pipeline).
//!
//! A plain prompt is encoded as transformers' `tokenizer(text)` encodes it (the
//! tokenizer's post-processor adds what the model expects, e.g. Llama's BOS); a chat
//! prompt is rendered with the chat template, generation prompt included, and encoded
//! without added tokens (the template writes them). Generation stops at any of the
//! model's EOS ids. The returned log-probs are those of the new tokens under the model at
//! temperature 1, whatever temperature sampled them: the sampler's own at temperature 1
//! (untruncated, see [`crate::generate`]), otherwise scored teacher-forced
//! ([`crate::score::score`]).

use std::path::Path;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use goodhart_core::{ops::to_host, seed, GoodhartError, Result};
use serde::Serialize;

use crate::{
    chat_template::ChatMessage,
    generate::{generate, GenerationConfig},
    hf::{self, HfConfig},
    score::score,
    tokenizer::{HfTokenizer, Tokenizer},
    transformer::TransformerLm,
};

/// A model, its tokenizer and its config.
#[derive(Debug)]
pub struct TextModel<B: Backend> {
    /// The decoder.
    pub model: TransformerLm<B>,
    /// `config.json` and `generation_config.json`.
    pub config: HfConfig,
    /// `tokenizer.json`, special tokens and chat template.
    pub tokenizer: HfTokenizer,
}

/// What the model wrote after a prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The new token ids, up to and including an EOS.
    pub ids: Vec<u32>,
    /// `log pi(id | prefix)` of each new token at temperature 1.
    pub logprobs: Vec<f32>,
    /// The new tokens' text, special tokens skipped.
    pub text: String,
}

/// Errors unless every id of `tokenizer` has a row in a vocabulary of `vocab_size`.
pub fn check_vocab(tokenizer: &HfTokenizer, vocab_size: usize) -> Result<()> {
    let vocab = tokenizer.vocab_size();
    if vocab > vocab_size {
        return Err(GoodhartError::invalid(
            "tokenizer.json",
            format!("holds {vocab} tokens, the model's vocabulary only {vocab_size}"),
        ));
    }
    Ok(())
}

impl<B: Backend> TextModel<B> {
    /// Loads the model and tokenizer of directory `dir` onto `device`.
    pub fn load(dir: &Path, device: &B::Device) -> Result<Self> {
        let (model, config) = hf::load::<B>(dir, device)?;
        let tokenizer = HfTokenizer::from_dir(dir)?;
        check_vocab(&tokenizer, model.vocab_size())?;
        Ok(Self {
            model,
            config,
            tokenizer,
        })
    }

    /// The token ids of `prompt`: as a user message through the chat template when
    /// `chat`, otherwise as plain text (see the module docs).
    pub fn prompt_ids(&self, prompt: &str, chat: bool) -> Result<Vec<u32>> {
        let ids = if chat {
            let messages = [ChatMessage::new("user", prompt)];
            let (_, ids) =
                self.tokenizer
                    .apply_chat_template(&messages, true, &Default::default())?;
            ids
        } else {
            self.tokenizer.encode_with_special_tokens(prompt)?
        };
        if ids.is_empty() {
            return Err(GoodhartError::invalid(
                "prompt",
                "encodes to no tokens: give some text",
            ));
        }
        Ok(ids)
    }

    /// A [`GenerationConfig`] of `max_new_tokens` that stops at every EOS id of the model
    /// and pads with its pad id (or its first EOS id, or 0).
    pub fn generation_config(&self, max_new_tokens: usize) -> GenerationConfig {
        let eos: Vec<usize> = self
            .config
            .eos_token_ids
            .iter()
            .map(|&id| id as usize)
            .collect();
        let pad = self.config.pad_id() as usize;
        GenerationConfig::new(max_new_tokens)
            .with_eos_id(eos.first().copied())
            .with_stop_ids(eos.iter().skip(1).copied().collect())
            .with_pad_id(pad)
    }

    /// Continues `prompt_ids` with `settings` (sampling draws from `seed`).
    pub fn complete(
        &self,
        prompt_ids: &[u32],
        settings: &GenerationConfig,
        seed: u64,
    ) -> Result<Completion> {
        let device = self.model.trunk.tok_emb.weight.device();
        let p = prompt_ids.len();
        let prompt = Tensor::<B, 2, Int>::from_data(
            TensorData::new(prompt_ids.iter().map(|&i| i as i64).collect(), [1, p]),
            &device,
        );
        let mask = Tensor::<B, 2>::ones([1, p], &device);
        let mut rng = seed::rng(seed, "generate");
        let out = generate(&self.model, prompt, mask, settings, &mut rng)?;
        let keep = to_host(out.response_mask.clone())?;
        // The sampler's log-probs are at its temperature, before truncation: at 1 they are
        // the model's own; otherwise the sequence is scored once more at 1.
        let logprobs = if settings.temperature == 1.0 {
            out.logprobs.clone()
        } else {
            score(
                &self.model,
                out.tokens.clone(),
                out.attention_mask.clone(),
                1.0,
            )?
            .logprobs
        };
        let logprobs = to_host(logprobs)?;
        let tokens = to_host(out.tokens.float())?;
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        for t in p..tokens.len() {
            if keep[t] > 0.5 {
                ids.push(tokens[t] as u32);
                lps.push(logprobs[t]);
            }
        }
        let text = self.tokenizer.decode(&ids)?;
        Ok(Completion {
            prompt_ids: prompt_ids.to_vec(),
            ids,
            logprobs: lps,
            text,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    goodhart_core::backend_test! {
        fn greedy_continuations_match_transformers<B>(device) {
            for name in ["gpt2", "llama", "mistral", "qwen2", "qwen3", "smollm2", "llama-bf16-sharded"] {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf").join(name);
                let r: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
                let g = &r["greedy"];
                let ids = |v: &Value| -> Vec<u32> { v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect() };
                let m = TextModel::<B>::load(&dir, device).unwrap();
                let prompt = m.prompt_ids(g["prompt"].as_str().unwrap(), false).unwrap();
                assert_eq!(prompt, ids(&g["prompt_ids"]), "{name}");
                let settings = m.generation_config(8).with_greedy(true);
                let c = m.complete(&prompt, &settings, 0).unwrap();
                assert_eq!(c.ids, ids(&g["ids"]), "{name}");
                let expected: Vec<f32> = g["logprobs"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
                for (a, e) in c.logprobs.iter().zip(&expected) {
                    assert!((a - e).abs() <= 1e-3, "{name}: log-prob {a} against {e}");
                }
                assert_eq!(c.text, g["text"].as_str().unwrap(), "{name}");
            }
        }
    }

    goodhart_core::backend_test! {
        fn chat_prompts_use_the_template_and_sampling_is_seeded<B>(device) {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hf/qwen2");
            let m = TextModel::<B>::load(&dir, device).unwrap();
            let chat = m.prompt_ids("What is two plus two?", true).unwrap();
            let (text, ids) = m
                .tokenizer
                .apply_chat_template(&[ChatMessage::new("user", "What is two plus two?")], true, &Default::default())
                .unwrap();
            assert_eq!(chat, ids);
            assert!(text.ends_with("<|im_start|>assistant\n"), "{text:?}");
            let settings = m.generation_config(6).with_temperature(0.7).with_top_p(0.9);
            let a = m.complete(&chat, &settings, 5).unwrap();
            assert_eq!(a, m.complete(&chat, &settings, 5).unwrap());
            assert!(!a.ids.is_empty() && a.ids.len() == a.logprobs.len());
            assert!(a.logprobs.iter().all(|&lp| lp < 0.0 && lp.is_finite()));
            let err = TextModel::<B>::load(&dir, device).unwrap().prompt_ids("", false).unwrap_err();
            assert!(err.to_string().contains("no tokens"), "{err}");
            let gpt2 = TextModel::<B>::load(&dir.with_file_name("gpt2"), device).unwrap();
            assert!(gpt2.prompt_ids("hi", true).unwrap_err().to_string().contains("chat template"));
        }
    }
}
