//! `hf_reward_model`: a Hugging Face sequence-classification reward model
//! (`LlamaForSequenceClassification`, `Qwen2ForSequenceClassification`, ... with one
//! label) scoring text.
//!
//! Each response is scored with its prompt as `tokenizer(prompt + response)` encodes it
//! (the reward model's own tokenizer, so it need not share the policy's), in batches of
//! `batch_size` right-padded rows. The score is the `score` head at the last token whose
//! id is not the pad id, as transformers reads it (so with the pad id equal to EOS, a
//! trailing EOS is skipped); without a pad id, at the last token. The raw scores are
//! returned, without normalisation.

use std::path::PathBuf;

use burn::{
    module::Param,
    tensor::{backend::Backend, Int, Tensor, TensorData},
};
use goodhart_core::{ops::to_host, GoodhartError, Result};
use goodhart_policy::{hf, HfTokenizer};
use serde::{Deserialize, Serialize};

use crate::{
    model::RewardModel,
    source::{RewardOutput, RewardSource},
    text::Texts,
};

/// `kind = "hf_reward_model"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfRewardModelConfig {
    /// The model directory (`config.json`, safetensors, `tokenizer.json`).
    pub path: PathBuf,
    /// Rows per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_batch() -> usize {
    16
}

impl HfRewardModelConfig {
    /// Errors on a zero batch size or a directory whose `config.json` is not a one-label
    /// sequence classifier (read without loading the weights).
    pub fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(GoodhartError::invalid("batch_size", "must be at least 1"));
        }
        hf::HfConfig::from_dir(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|c| c.reward_model_check())
            .map_err(|reason| GoodhartError::invalid("path", reason))
    }
}

/// A loaded reward model with its tokenizer.
#[derive(Debug)]
pub struct HfRewardModel<B: Backend> {
    name: String,
    model: RewardModel<B>,
    tokenizer: HfTokenizer,
    pad: Option<u32>,
    batch_size: usize,
}

impl<B: Backend> HfRewardModel<B> {
    /// Loads `config.path` onto `device` as source `name`.
    pub fn load(name: &str, config: &HfRewardModelConfig, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let (decoder, score, hf_config) = hf::load_reward_model::<B>(&config.path, device)?;
        let tokenizer = HfTokenizer::from_dir(&config.path)?;
        let mut model = RewardModel::from_trunk(decoder.trunk, device);
        let d = score.len();
        model.head.weight =
            Param::from_tensor(Tensor::from_data(TensorData::new(score, [d, 1]), device));
        Ok(Self {
            name: name.into(),
            model,
            tokenizer,
            pad: hf_config.pad_token_id,
            batch_size: config.batch_size,
        })
    }

    /// Its tokenizer.
    pub fn tokenizer(&self) -> &HfTokenizer {
        &self.tokenizer
    }

    /// Raw scores of token sequences (see the module docs); errors on an empty
    /// sequence or one longer than the model's positions.
    pub fn score_ids(&self, rows: &[Vec<u32>], device: &B::Device) -> Result<Vec<f32>> {
        let max = self.model.trunk.max_seq_len();
        let mut out = Vec::with_capacity(rows.len());
        for (b, chunk) in rows.chunks(self.batch_size).enumerate() {
            let t = chunk.iter().map(Vec::len).max().unwrap_or(0);
            let n = chunk.len();
            let mut ids = vec![self.pad.unwrap_or(0) as i64; n * t];
            let mut mask = vec![0f32; n * t];
            for (i, row) in chunk.iter().enumerate() {
                let r = b * self.batch_size + i;
                if row.is_empty() || row.len() > max {
                    return Err(GoodhartError::invalid(
                        "hf_reward_model",
                        format!(
                            "row {r} is {} tokens; the reward model reads 1 to {max}",
                            row.len()
                        ),
                    ));
                }
                // transformers' rule: the last token that is not the pad id (0 if all are).
                let last = match self.pad {
                    Some(p) => row.iter().rposition(|&id| id != p).unwrap_or(0),
                    None => row.len() - 1,
                };
                for (j, &id) in row.iter().enumerate() {
                    ids[i * t + j] = id as i64;
                    mask[i * t + j] = if j <= last { 1.0 } else { 0.0 };
                }
            }
            let scores = self.model.raw_scores(
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, t]), device),
                Tensor::from_data(TensorData::new(mask, [n, t]), device),
            )?;
            out.extend(to_host(scores)?);
        }
        Ok(out)
    }
}

impl<B: Backend> RewardSource<B, Texts<B>> for HfRewardModel<B> {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &Texts<B>) -> Result<RewardOutput<B>> {
        let rows = input
            .prompts
            .iter()
            .zip(&input.responses)
            .map(|(p, r)| {
                self.tokenizer
                    .encode_with_special_tokens(&format!("{p}{r}"))
            })
            .collect::<Result<Vec<_>>>()?;
        input.output(self.score_ids(&rows, &input.device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture(name: &str) -> PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../goodhart-policy/fixtures/hf")
            .join(name)
    }

    goodhart_core::backend_test! {
        fn scores_match_transformers<B>(device) {
            // Qwen2 with its own pad id; Llama whose pad is its EOS (the last text ends in
            // it, and is scored at the token before).
            for name in ["qwen2-rm", "llama-rm"] {
                let dir = fixture(name);
                let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
                let strings = |k: &str| -> Vec<String> {
                    reference[k].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
                };
                // Batches of 3: one full, one partial.
                let config = HfRewardModelConfig { path: dir.clone(), batch_size: 3 };
                let rm = HfRewardModel::<B>::load("rm", &config, device).unwrap();
                let (prompts, responses) = (strings("prompts"), strings("responses"));
                let n = prompts.len();
                let texts = Texts::<B>::new(prompts.clone(), responses.clone(), vec![None; n], device).unwrap();
                // The same ids as transformers' tokenizer.
                for (i, want) in reference["ids"].as_array().unwrap().iter().enumerate() {
                    let got = rm.tokenizer.encode_with_special_tokens(&format!("{}{}", prompts[i], responses[i])).unwrap();
                    let want: Vec<u32> = want.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
                    assert_eq!(got, want, "{name} row {i}");
                }
                let got: Vec<f32> = rm.score(&texts).unwrap().reward.into_data().convert::<f32>().into_vec().unwrap();
                for (i, want) in reference["scores"].as_array().unwrap().iter().enumerate() {
                    let want = want.as_f64().unwrap() as f32;
                    assert!((got[i] - want).abs() < 1e-4, "{name} row {i}: {} vs {want}", got[i]);
                }
            }
        }
    }

    #[test]
    fn configs_name_what_is_wrong() {
        let bad = |path: PathBuf, batch_size: usize| {
            HfRewardModelConfig { path, batch_size }
                .validate()
                .unwrap_err()
                .to_string()
        };
        assert!(bad(fixture("qwen2"), 4).contains("a causal LM"));
        assert!(bad(fixture("qwen2-rm"), 0).contains("at least 1"));
        assert!(bad(fixture("none"), 4).contains("config.json"));
        type B = goodhart_core::device::Dispatch;
        let device = goodhart_core::device::cpu();
        // A causal LM directory is refused by the reward-model loader, and a reward model
        // by the LM loader.
        assert!(hf::load_reward_model::<B>(&fixture("qwen2"), &device).is_err());
        let e = hf::load::<B>(&fixture("qwen2-rm"), &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hf_reward_model"), "{e}");
        let rm = HfRewardModel::<B>::load(
            "rm",
            &HfRewardModelConfig {
                path: fixture("qwen2-rm"),
                batch_size: 2,
            },
            &device,
        )
        .unwrap();
        let e = rm
            .score_ids(&[vec![1; 65]], &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 0 is 65 tokens"), "{e}");
    }
}
