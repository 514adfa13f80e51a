//! The base (SFT) policy of the overoptimisation experiment: a small transformer LM
//! trained by supervised fine-tuning on samples of the synthetic language's generator
//! ([`goodhart_envs::language`]).
//!
//! Data: `examples` sequences `[BOS, topic, SEP, w_1 .. w_L, EOS]`, the topic drawn
//! uniformly and the response from [`Language::sample_response`] (stream
//! `seed::rng(seed, "sft/examples")`). The loss is the token-mean negative log-likelihood
//! of the *response* tokens only (words and `EOS`; the prompt is context, as TRL's
//! `SFTTrainer` with `completion_only_loss` and verl's SFT trainer with a prompt mask):
//!
//! ```text
//! L = - sum_{b,t} m_{b,t} log pi(x_{b,t} | x_{b,<t}) / sum_{b,t} m_{b,t},   m = 1 on the response
//! ```
//!
//! optimised by goodhart-policy's [`goodhart_policy::sft::train`] (AdamW, PyTorch betas,
//! gradient-norm clip 1.0, constant learning rate). The report compares the held-out NLL
//! per response token with the language's exact entropy rate
//! ([`Language::entropy_per_token`]), the floor no model can beat: a base policy within a
//! few percent of it samples the generator's distribution, which is what the proxy is
//! trained on.

use burn::tensor::backend::AutodiffBackend;
use goodhart_core::{seed, GoodhartError, Result};
use goodhart_envs::language::{Language, LanguageConfig, EOS};
use goodhart_policy::{
    sft::{evaluate, inference, train, SftExample},
    TransformerConfig, TransformerLm,
};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

/// The language the lab's defaults ([`SftConfig`], `ProxyConfig`, `RlConfig`) were
/// measured on: goodhart-envs' default language (4 topics, 16 words, 3 favoured per
/// topic, max 16 words, gold target length 8) with `eos_logit = 1.5` and
/// `favour_bias = 0.5`, so generator responses average 8 words (the gold's sweet spot)
/// and favoured words are common enough that a proxy learns relevance from a few hundred
/// pairs (measured: Pearson(proxy, gold) 0.55 from 200 pairs, 0.69 from 1000; with the
/// envs default, where responses run to the 16-word cap and favoured words are rare,
/// 0.04 and 0.37).
pub fn lab_language() -> LanguageConfig {
    LanguageConfig {
        eos_logit: 1.5,
        favour_bias: 0.5,
        ..LanguageConfig::default()
    }
}

/// Width of a prompt `[BOS, topic, SEP]`.
pub const PROMPT_LEN: usize = 3;

/// Settings of the base policy and its SFT run (TOML under `[sft]`).
///
/// Defaults (goodhart's choice for a laptop CPU): a 2-layer, width-32, 2-head rotary
/// transformer (GPT-2 init, pre-norm, tied embeddings: [`TransformerConfig`]'s defaults),
/// 4096 generator samples, 400 AdamW steps of 64 sequences at lr 3e-3 (~6 epochs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Transformer blocks.
    pub layers: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads (`d_model / heads` must be even: rotary positions).
    pub heads: usize,
    /// Longest sequence (prompt + response) the model accepts; at least
    /// `3 + max_len + 1` of the language, more to let RL run past the generator's cap.
    pub max_seq_len: usize,
    /// Training sequences drawn from the generator.
    pub examples: usize,
    /// Held-out sequences for the reported NLL.
    pub heldout: usize,
    /// AdamW steps.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Learning rate.
    pub lr: f64,
}

impl Default for SftConfig {
    fn default() -> Self {
        Self {
            layers: 2,
            d_model: 32,
            heads: 2,
            max_seq_len: 32,
            examples: 4096,
            heldout: 512,
            steps: 400,
            batch: 64,
            lr: 3e-3,
        }
    }
}

impl SftConfig {
    /// The transformer for `lang`'s vocabulary with these sizes.
    pub fn model(&self, lang: &Language) -> TransformerConfig {
        self.transformer(lang.vocab_size())
    }

    /// The transformer for a vocabulary of `vocab` tokens with these sizes.
    pub fn transformer(&self, vocab: usize) -> TransformerConfig {
        TransformerConfig::new(
            vocab,
            self.d_model,
            self.layers,
            self.heads,
            self.max_seq_len,
        )
    }

    /// Errors on sizes that cannot make a model or a run for `lang`.
    pub fn validate(&self, lang: &Language) -> Result<()> {
        self.validate_for(lang.vocab_size(), PROMPT_LEN + lang.config().max_len + 1)
    }

    /// Errors on sizes that cannot make a model of `vocab` tokens or a run on sequences
    /// of up to `need` tokens (a prompt and a full response).
    pub fn validate_for(&self, vocab: usize, need: usize) -> Result<()> {
        let bad = |k: &str, why: String| GoodhartError::invalid(format!("sft.{k}"), why);
        for (k, v) in [
            ("examples", self.examples),
            ("heldout", self.heldout),
            ("steps", self.steps),
            ("batch", self.batch),
        ] {
            if v == 0 {
                return Err(bad(k, "must be at least 1".into()));
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "lr",
                format!("must be finite and positive, got {}", self.lr),
            ));
        }
        if self.max_seq_len < need {
            return Err(bad(
                "max_seq_len",
                format!(
                    "{} cannot hold a prompt and a full response ({need} tokens)",
                    self.max_seq_len
                ),
            ));
        }
        self.transformer(vocab).validate()
    }
}

/// What SFT reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftReport {
    /// Held-out NLL per response token (nats), words and `EOS`.
    pub heldout_nll: f64,
    /// The language's exact entropy per response token (the floor of `heldout_nll`).
    pub entropy_rate: f64,
    /// Held-out NLL of the untrained model (about `ln V`).
    pub initial_nll: f64,
    /// Loss of the last optimiser step.
    pub final_loss: f64,
}

/// `n` generator sequences `[BOS, topic, SEP, response..., EOS]` with the loss on the
/// response, topics uniform, from `rng`.
pub fn generator_examples(
    lang: &Language,
    n: usize,
    rng: &mut seed::ChaCha8Rng,
) -> Vec<SftExample> {
    (0..n)
        .map(|_| {
            let t = rng.random_range(0..lang.config().topics);
            let response = lang.sample_response(t, rng);
            debug_assert_eq!(response.last(), Some(&EOS));
            let tokens: Vec<usize> = lang
                .prompt(t)
                .iter()
                .chain(&response)
                .map(|&x| x as usize)
                .collect();
            let mut mask = vec![0.0; tokens.len()];
            mask[PROMPT_LEN..].iter_mut().for_each(|m| *m = 1.0);
            SftExample {
                tokens,
                loss_mask: Some(mask),
            }
        })
        .collect()
}

/// Trains the base policy on generator samples (see the module docs); deterministic in
/// `seed` (initialisation stream `sft/init`, data `sft/examples` and `sft/heldout`, order
/// `sft/order`).
pub fn train_base<B: AutodiffBackend>(
    lang: &Language,
    cfg: &SftConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(TransformerLm<B>, SftReport)> {
    cfg.validate(lang)?;
    train_lm(lang, &cfg.model(lang), cfg, seed, device)
}

/// An LM of architecture `model` trained as the base policy is (its sizes are `model`'s;
/// `cfg` gives the examples, held-out sequences, steps, batch and learning rate), with
/// [`train_base`]'s streams of `seed`: a reward model's pretrained trunk.
pub fn train_lm<B: AutodiffBackend>(
    lang: &Language,
    model: &TransformerConfig,
    cfg: &SftConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(TransformerLm<B>, SftReport)> {
    let model = seed::seeded::<B, _>(device, seed, "sft/init", || model.init::<B>(device))?;
    let data = generator_examples(lang, cfg.examples, &mut seed::rng(seed, "sft/examples"));
    let held = generator_examples(lang, cfg.heldout, &mut seed::rng(seed, "sft/heldout"));
    let pad = goodhart_envs::language::PAD as usize;
    let fit = fine_tune(
        model,
        &data,
        &held,
        cfg,
        pad,
        seed::derive(seed, "sft/order"),
    )?;
    Ok((
        fit.model,
        SftReport {
            heldout_nll: fit.heldout_nll,
            entropy_rate: lang.entropy_per_token(),
            initial_nll: fit.initial_nll,
            final_loss: fit.final_loss,
        },
    ))
}

/// A fine-tuned model and its held-out NLL per learned token before and after.
pub(crate) struct Fit<B: AutodiffBackend> {
    pub(crate) model: TransformerLm<B>,
    pub(crate) initial_nll: f64,
    pub(crate) heldout_nll: f64,
    pub(crate) final_loss: f64,
}

/// SFT of `model` on `data` with `cfg`'s steps, batch and learning rate (padding `pad`,
/// data order from `order_seed`), `held` evaluated before and after.
pub(crate) fn fine_tune<B: AutodiffBackend>(
    model: TransformerLm<B>,
    data: &[SftExample],
    held: &[SftExample],
    cfg: &SftConfig,
    pad: usize,
    order_seed: u64,
) -> Result<Fit<B>> {
    let initial_nll = evaluate(&inference(&model), held, 256, pad)?;
    let policy_cfg = goodhart_policy::SftConfig::new()
        .with_lr(cfg.lr)
        .with_steps(cfg.steps)
        .with_batch_size(cfg.batch)
        .with_pad_id(pad)
        .with_seed(order_seed);
    let (model, losses) = train(model, data, &policy_cfg)?;
    let heldout_nll = evaluate(&inference(&model), held, 256, pad)?;
    Ok(Fit {
        model,
        initial_nll,
        heldout_nll,
        final_loss: losses.last().copied().unwrap_or(f32::NAN) as f64,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_core::device::DeviceSpec;
    use goodhart_core::testing::test_device;
    use goodhart_envs::language::{BOS, SEP};

    /// `GOODHART_<KEY>` from the environment, or `default` (knobs of the measurements).
    pub(crate) fn knob<T: std::str::FromStr>(key: &str, default: T) -> T {
        std::env::var(format!("GOODHART_{key}"))
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// [`lab_language`] with knobs `GOODHART_LANG_{EOS, FAV, SHARP, REP, LEN, TARGET, MAXLEN}`.
    pub(crate) fn knob_language() -> Language {
        let d = lab_language();
        Language::new(LanguageConfig {
            eos_logit: knob("LANG_EOS", d.eos_logit),
            favour_bias: knob("LANG_FAV", d.favour_bias),
            sharpness: knob("LANG_SHARP", d.sharpness),
            rep_penalty: knob("LANG_REP", d.rep_penalty),
            len_penalty: knob("LANG_LEN", d.len_penalty),
            target_len: knob("LANG_TARGET", d.target_len),
            max_len: knob("LANG_MAXLEN", d.max_len),
            ..d
        })
        .unwrap()
    }

    fn lang() -> Language {
        Language::new(LanguageConfig::default()).unwrap()
    }

    #[test]
    fn examples_mask_the_prompt() {
        let l = lang();
        let ex = generator_examples(&l, 20, &mut seed::rng(1, "x"));
        for e in &ex {
            assert_eq!(e.tokens[0], BOS as usize);
            assert_eq!(e.tokens[2], SEP as usize);
            assert_eq!(*e.tokens.last().unwrap(), EOS as usize);
            let m = e.loss_mask.as_ref().unwrap();
            assert_eq!(&m[..3], &[0.0; 3]);
            assert!(m[3..].iter().all(|&x| x == 1.0));
            assert!(e.tokens.len() >= 5 && e.tokens.len() <= 3 + 16 + 1);
        }
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let l = lang();
        for cfg in [
            SftConfig {
                steps: 0,
                ..Default::default()
            },
            SftConfig {
                lr: -1.0,
                ..Default::default()
            },
            SftConfig {
                lr: f64::NAN,
                ..Default::default()
            },
            SftConfig {
                max_seq_len: 10,
                ..Default::default()
            },
            SftConfig {
                d_model: 30,
                heads: 4,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(cfg.validate(&l), Err(GoodhartError::InvalidArgument { .. })),
                "{cfg:?}"
            );
        }
        let toml_cfg: SftConfig = toml::from_str("steps = 7").unwrap();
        assert_eq!(toml_cfg.steps, 7);
        assert_eq!(toml_cfg.d_model, 32);
        assert!(toml::from_str::<SftConfig>("stepz = 7").is_err());
    }

    goodhart_core::backend_test! {
        fn sft_approaches_the_entropy_rate<B>(device) {
            // CPU only: hundreds of optimiser steps are slow on lavapipe.
            if test_device() != DeviceSpec::Cpu {
                return;
            }
            let l = lang();
            let cfg = SftConfig { examples: 2048, heldout: 256, steps: 150, ..Default::default() };
            let (_, r) = train_base::<Autodiff<B>>(&l, &cfg, 3, device).unwrap();
            eprintln!("{r:?}");
            // Untrained: about ln V = ln 24 = 3.18; the floor is the entropy rate.
            assert!((r.initial_nll - 24f64.ln()).abs() < 0.1, "{r:?}");
            assert!(r.heldout_nll > 0.97 * r.entropy_rate, "{r:?}");
            assert!(r.heldout_nll < 1.15 * r.entropy_rate, "{r:?}");
            let (_, again) = train_base::<Autodiff<B>>(&l, &SftConfig { steps: 5, ..cfg.clone() }, 3, device).unwrap();
            let (_, twice) = train_base::<Autodiff<B>>(&l, &SftConfig { steps: 5, ..cfg }, 3, device).unwrap();
            // Same seed: the same run (up to the float rounding of threaded reductions).
            assert_eq!(again.final_loss, twice.final_loss);
            assert!((again.heldout_nll - twice.heldout_nll).abs() < 1e-5, "{again:?} {twice:?}");
        }
    }
}
