//! The proxy reward model of the overoptimisation experiment: a Bradley-Terry reward
//! model (goodhart-reward) trained on gold-labelled, noisy preference pairs of the
//! synthetic language ([`Language::preference_pairs`]).
//!
//! Gao, Schulman & Hilton (2022) vary the proxy's training data and size and watch where
//! RL and best-of-n against it stop improving the gold reward; here the knob is the number
//! of pairs (`pairs`). The loss is `-log sigma(r_c - r_r)` (goodhart-reward's
//! [`train_reward_model`], AdamW, TRL / OpenRLHF convention); after training the raw
//! rewards' mean and population std over the training responses are stored in the model
//! (OpenRLHF's `normalize_reward`), so [`RewardModel::scores`] is standardised on the
//! generator's distribution.
//!
//! The report gives the training accuracy (against the noisy labels), the held-out
//! accuracy on fresh *clean* pairs (noise 0: how often the proxy agrees with the gold),
//! and the Pearson correlation between proxy and gold on fresh generator samples (the
//! on-distribution fit that RL then leaves behind).
//!
//! Streams of `seed`: pairs `proxy/pairs`, held-out pairs `proxy/heldout`, correlation
//! samples `proxy/pearson`, initialisation `proxy/init`, data order `proxy/order`. An
//! ensemble ([`train_proxy_ensemble`]) shares the pairs and differs by member seeds (init
//! and order), as Coste et al. (2024) train their members.

use burn::{
    module::AutodiffModule,
    tensor::backend::{AutodiffBackend, Backend},
};
use goodhart_core::{params::materialized, seed, GoodhartError, Result};
use goodhart_envs::language::{Language, PAD};
use goodhart_policy::{transformer::Trunk, Positions, TransformerConfig, TransformerLm};
use goodhart_reward::{
    model::{RewardModel, RewardModelConfig},
    source::Sequences,
    train::{train_reward_model, PreferencePair, Preferences, RewardTrainConfig},
};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::sft::{train_lm, SftConfig, SftReport, PROMPT_LEN};

/// Settings of a proxy reward model (TOML under `[proxy]`).
///
/// Defaults (goodhart's choice): 200 pairs, label noise 0.1, a 1-layer width-32 2-head
/// trunk, 8 epochs of batches of 32 at lr 1e-3 (AdamW, goodhart-reward's defaults
/// otherwise), 512 clean held-out pairs and 512 samples for the gold correlation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Training pairs.
    pub pairs: usize,
    /// Probability that a pair's label is flipped.
    pub label_noise: f64,
    /// Transformer blocks of the trunk.
    pub layers: usize,
    /// Trunk width.
    pub d_model: usize,
    /// Attention heads.
    pub heads: usize,
    /// Longest sequence the trunk accepts (must cover what the policy generates).
    pub max_seq_len: usize,
    /// Learned absolute positions (GPT-2) instead of rotary ones: the score at `EOS`
    /// then sees the response length directly.
    pub learned_positions: bool,
    /// Passes over the pairs.
    pub epochs: usize,
    /// Pairs per optimiser step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Clean held-out pairs for the reported accuracy.
    pub heldout_pairs: usize,
    /// Generator samples for the reported proxy-gold correlation.
    pub pearson_samples: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            pairs: 200,
            label_noise: 0.1,
            layers: 1,
            d_model: 32,
            heads: 2,
            max_seq_len: 32,
            learned_positions: false,
            epochs: 8,
            batch: 32,
            lr: 1e-3,
            weight_decay: 0.0,
            heldout_pairs: 512,
            pearson_samples: 512,
        }
    }
}

impl ProxyConfig {
    /// The reward model for `lang`'s vocabulary.
    pub fn model(&self, lang: &Language) -> RewardModelConfig {
        let positions = if self.learned_positions {
            Positions::Learned
        } else {
            Positions::Rotary
        };
        RewardModelConfig::new(
            TransformerConfig::new(
                lang.vocab_size(),
                self.d_model,
                self.layers,
                self.heads,
                self.max_seq_len,
            )
            .with_positions(positions),
        )
    }

    /// Errors on settings that cannot train a model for `lang`.
    pub fn validate(&self, lang: &Language) -> Result<()> {
        let bad = |k: &str, why: String| GoodhartError::invalid(format!("proxy.{k}"), why);
        for (k, v) in [
            ("pairs", self.pairs),
            ("epochs", self.epochs),
            ("batch", self.batch),
            ("heldout_pairs", self.heldout_pairs),
        ] {
            if v == 0 {
                return Err(bad(k, "must be at least 1".into()));
            }
        }
        if self.pearson_samples < 2 {
            return Err(bad("pearson_samples", "must be at least 2".into()));
        }
        if !(0.0..=1.0).contains(&self.label_noise) {
            return Err(bad(
                "label_noise",
                format!("{} is not a probability", self.label_noise),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(bad(
                "lr",
                format!("must be finite and positive, got {}", self.lr),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(bad("weight_decay", "must be finite and >= 0".into()));
        }
        let need = PROMPT_LEN + lang.config().max_len + 1;
        if self.max_seq_len < need {
            return Err(bad(
                "max_seq_len",
                format!(
                    "{} cannot hold a generator sequence ({need} tokens)",
                    self.max_seq_len
                ),
            ));
        }
        self.model(lang).trunk.validate()
    }

    fn train_config(&self, seed: u64) -> RewardTrainConfig {
        RewardTrainConfig {
            epochs: self.epochs,
            batch_size: self.batch,
            lr: self.lr,
            weight_decay: self.weight_decay,
            seed,
            ..RewardTrainConfig::default()
        }
    }
}

/// How well a proxy fits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// Accuracy on the (noisy) training pairs.
    pub train_acc: f64,
    /// Accuracy on fresh clean pairs (agreement with the gold's preference).
    pub heldout_acc: f64,
    /// Pearson correlation of proxy and gold on fresh generator samples.
    pub gold_pearson: f64,
    /// Training pairs.
    pub pairs: usize,
}

/// goodhart-envs pairs as goodhart-reward [`Preferences`].
pub fn to_preferences(pairs: Vec<goodhart_envs::language::PreferencePair>) -> Result<Preferences> {
    Preferences::new(
        pairs
            .into_iter()
            .map(|p| PreferencePair {
                prompt: p.prompt,
                chosen: p.chosen,
                rejected: p.rejected,
                margin: None,
            })
            .collect(),
    )
}

/// Normalised proxy scores of `(prompt, response)` pairs, in batches of 256.
pub fn score_responses<B: Backend>(
    model: &RewardModel<B>,
    items: &[(Vec<u32>, Vec<u32>)],
    device: &B::Device,
) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(256) {
        let refs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let s = Sequences::<B>::from_pairs(&refs, PAD, device)?;
        let v = model.scores(s.tokens, s.attention_mask)?;
        out.extend(
            v.into_data()
                .convert::<f64>()
                .into_vec::<f64>()
                .map_err(|e| GoodhartError::invalid("scores", format!("{e:?}")))?,
        );
    }
    Ok(out)
}

/// One member: trained on `train` from `trunk` with a new head (`None`: from a fresh
/// model), evaluated on `held` and `samples`.
#[allow(clippy::too_many_arguments)]
fn fit_member<B: AutodiffBackend>(
    lang: &Language,
    cfg: &ProxyConfig,
    train: &Preferences,
    held: &Preferences,
    samples: &Samples,
    member_seed: u64,
    trunk: Option<Trunk<B>>,
    device: &B::Device,
) -> Result<(RewardModel<B>, ProxyReport)> {
    let model = seed::seeded::<B, _>(device, member_seed, "proxy/init", || match trunk {
        Some(trunk) => Ok(materialized(RewardModel::from_trunk(trunk, device))),
        None => cfg.model(lang).init::<B>(device),
    })?;
    let (model, report) = train_reward_model(
        model,
        train,
        Some(held),
        &cfg.train_config(seed::derive(member_seed, "proxy/order")),
    )?;
    let inner = model.valid();
    let proxy = score_responses(&inner, &samples.responses, device)?;
    if proxy.iter().all(|&x| x == proxy[0]) {
        return Err(GoodhartError::invalid(
            "proxy",
            format!(
                "the trained proxy (seed {member_seed}) gives every one of the {} \
                 correlation samples the same score {}: it learned no preference \
                 (proxy.lr, proxy.epochs, proxy.pairs)",
                proxy.len(),
                proxy[0]
            ),
        ));
    }
    let gold = &samples.gold;
    Ok((
        model,
        ProxyReport {
            train_acc: report.train_accuracy as f64,
            heldout_acc: report.eval_accuracy.unwrap_or(f32::NAN) as f64,
            gold_pearson: goodhart_metrics::stats::pearson(&proxy, gold)?,
            pairs: train.len(),
        },
    ))
}

/// Responses of the language and their gold, on which a proxy's correlation with gold is
/// measured.
struct Samples {
    responses: Vec<(Vec<u32>, Vec<u32>)>,
    gold: Vec<f64>,
}

/// The data of a proxy run: training pairs, clean held-out pairs, correlation samples.
/// Errors before any training when the samples' gold has no spread (the correlation
/// would be undefined).
fn proxy_data(
    lang: &Language,
    cfg: &ProxyConfig,
    seed: u64,
) -> Result<(Preferences, Preferences, Samples)> {
    cfg.validate(lang)?;
    let train = to_preferences(lang.preference_pairs(
        cfg.pairs,
        cfg.label_noise,
        seed::derive(seed, "proxy/pairs"),
    )?)?;
    let held = to_preferences(lang.preference_pairs(
        cfg.heldout_pairs,
        0.0,
        seed::derive(seed, "proxy/heldout"),
    )?)?;
    let mut rng = seed::rng(seed, "proxy/pearson");
    let responses: Vec<_> = (0..cfg.pearson_samples)
        .map(|_| {
            let t = rng.random_range(0..lang.config().topics);
            (lang.prompt(t), lang.sample_response(t, &mut rng))
        })
        .collect();
    let gold = responses
        .iter()
        .map(|(p, r)| lang.gold(p, r))
        .collect::<Result<Vec<_>>>()?;
    if gold.iter().all(|&g| g == gold[0]) {
        return Err(GoodhartError::invalid(
            "language",
            format!(
                "every one of the {} correlation samples (proxy.pearson_samples) has gold {}: \
                 this language's gold has no spread to learn or to measure against",
                gold.len(),
                gold[0]
            ),
        ));
    }
    Ok((train, held, Samples { responses, gold }))
}

/// Trains one proxy reward model on `cfg.pairs` noisy gold-labelled pairs (see the module
/// docs); deterministic in `seed`.
pub fn train_proxy<B: AutodiffBackend>(
    lang: &Language,
    cfg: &ProxyConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(RewardModel<B>, ProxyReport)> {
    let (train, held, samples) = proxy_data(lang, cfg, seed)?;
    fit_member(lang, cfg, &train, &held, &samples, seed, None, device)
}

/// An LM of the architecture of `cfg`'s reward-model trunk, trained on the language's
/// generator sequences as the base policy is (`sft`'s examples, steps, batch and learning
/// rate; [`crate::sft::train_lm`]) with seed `seed`: a pretrained trunk for
/// [`train_proxy_ensemble_on`].
pub fn pretrain_trunk<B: AutodiffBackend>(
    lang: &Language,
    cfg: &ProxyConfig,
    sft: &SftConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(TransformerLm<B>, SftReport)> {
    cfg.validate(lang)?;
    train_lm(lang, &cfg.model(lang).trunk, sft, seed, device)
}

/// Trains `k` proxies on the same pairs (those of [`train_proxy`] with `seed`) that differ
/// by initialisation and data order (member `i` uses seed `derive(seed, "proxy/member/i")`),
/// for ensemble aggregation (mean, UWO; Coste et al. 2024). Errors for `k = 0`.
pub fn train_proxy_ensemble<B: AutodiffBackend>(
    lang: &Language,
    cfg: &ProxyConfig,
    k: usize,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<(RewardModel<B>, ProxyReport)>> {
    if k == 0 {
        return Err(GoodhartError::invalid(
            "ensemble size",
            "must be at least 1",
        ));
    }
    let (train, held, samples) = proxy_data(lang, cfg, seed)?;
    (0..k)
        .map(|i| {
            let s = seed::derive(seed, &format!("proxy/member/{i}"));
            fit_member(lang, cfg, &train, &held, &samples, s, None, device)
        })
        .collect()
}

/// One proxy per trunk of `trunks` (pretrained ones, [`pretrain_trunk`]), each the trunk
/// with a new head, fine-tuned on the pairs of [`train_proxy`] with `seed`; member `i`'s
/// head and data order come from the seed of [`train_proxy_ensemble`]'s member `i`. The
/// same trunk `k` times makes an ensemble that differs only in fine-tuning, `k` trunks
/// pretrained with different seeds one that differs in pretraining too ("Helping or
/// Herding?", Eisenstein et al. 2023). Errors without a trunk.
pub fn train_proxy_ensemble_on<B: AutodiffBackend>(
    lang: &Language,
    cfg: &ProxyConfig,
    trunks: Vec<Trunk<B>>,
    seed: u64,
    device: &B::Device,
) -> Result<Vec<(RewardModel<B>, ProxyReport)>> {
    if trunks.is_empty() {
        return Err(GoodhartError::invalid(
            "ensemble size",
            "must be at least 1",
        ));
    }
    let (train, held, samples) = proxy_data(lang, cfg, seed)?;
    trunks
        .into_iter()
        .enumerate()
        .map(|(i, trunk)| {
            let s = seed::derive(seed, &format!("proxy/member/{i}"));
            fit_member(lang, cfg, &train, &held, &samples, s, Some(trunk), device)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::Autodiff;
    use goodhart_core::device::DeviceSpec;
    use goodhart_core::testing::test_device;
    use goodhart_envs::language::LanguageConfig;

    fn lang() -> Language {
        Language::new(LanguageConfig::default()).unwrap()
    }

    #[test]
    fn a_gold_without_spread_is_refused_before_training() {
        // No favoured words and no penalties: every response's gold is 0. pearson used to
        // fail after training, naming its argument `y`.
        let flat = Language::new(LanguageConfig {
            favoured_per_topic: 0,
            rep_penalty: 0.0,
            len_penalty: 0.0,
            ..Default::default()
        })
        .unwrap();
        let device = goodhart_core::device::cpu();
        let err = train_proxy::<Autodiff<goodhart_core::device::Dispatch>>(
            &flat,
            &ProxyConfig::default(),
            0,
            &device,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("`language`") && err.contains("no spread"),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let l = lang();
        for cfg in [
            ProxyConfig {
                pairs: 0,
                ..Default::default()
            },
            ProxyConfig {
                label_noise: 1.5,
                ..Default::default()
            },
            ProxyConfig {
                lr: 0.0,
                ..Default::default()
            },
            ProxyConfig {
                max_seq_len: 8,
                ..Default::default()
            },
            ProxyConfig {
                pearson_samples: 1,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(cfg.validate(&l), Err(GoodhartError::InvalidArgument { .. })),
                "{cfg:?}"
            );
        }
        assert!(toml::from_str::<ProxyConfig>("pairs = 10\nnoise = 0.1").is_err());
        assert_eq!(
            toml::from_str::<ProxyConfig>("pairs = 10").unwrap().pairs,
            10
        );
    }

    goodhart_core::backend_test! {
        fn proxy_learns_the_gold_preference<B>(device) {
            if test_device() != DeviceSpec::Cpu {
                return;
            }
            let l = Language::new(crate::sft::lab_language()).unwrap();
            let cfg = ProxyConfig { pairs: 1000, epochs: 3, heldout_pairs: 256, pearson_samples: 256, ..Default::default() };
            let (model, r) = train_proxy::<Autodiff<B>>(&l, &cfg, 1, device).unwrap();
            eprintln!("{r:?}");
            // Clean pairs are tied or random at 0.5; a fitted proxy agrees with gold well above.
            assert!(r.heldout_acc > 0.68, "{r:?}"); // measured 0.727
            assert!(r.gold_pearson > 0.6, "{r:?}"); // measured 0.714
            // Normalised on the training responses: mean ~0, std ~1 there.
            let (mean, std) = model.normalization();
            assert!(std > 0.0 && mean.is_finite());
            let ens = train_proxy_ensemble::<Autodiff<B>>(&l, &ProxyConfig { pairs: 50, epochs: 1, ..cfg }, 2, 1, device).unwrap();
            assert_eq!(ens.len(), 2);
            assert_ne!(ens[0].1.gold_pearson, ens[1].1.gold_pearson, "members differ by seed");
        }
    }

    goodhart_core::backend_test! {
        fn members_start_from_the_trunks_they_are_given<B>(device) {
            if test_device() != DeviceSpec::Cpu {
                return;
            }
            let l = Language::new(crate::sft::lab_language()).unwrap();
            // A learning rate of 1e-12: fine-tuning leaves each trunk where it started.
            let cfg = ProxyConfig { pairs: 64, epochs: 1, heldout_pairs: 16, pearson_samples: 32, lr: 1e-12, ..Default::default() };
            let sft = SftConfig { examples: 64, heldout: 16, steps: 4, batch: 8, ..Default::default() };
            let (a, _) = pretrain_trunk::<Autodiff<B>>(&l, &cfg, &sft, 1, device).unwrap();
            let (b, _) = pretrain_trunk::<Autodiff<B>>(&l, &cfg, &sft, 2, device).unwrap();
            let emb = |t: &Trunk<Autodiff<B>>| t.tok_emb.weight.val().into_data().into_vec::<f32>().unwrap();
            let (ea, eb) = (emb(&a.trunk), emb(&b.trunk));
            assert_ne!(ea, eb, "pretraining seeds differ");
            let trunks = vec![a.trunk.clone(), a.trunk, b.trunk];
            let members = train_proxy_ensemble_on::<Autodiff<B>>(&l, &cfg, trunks, 3, device).unwrap();
            let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-6);
            for (m, want) in members.iter().zip([&ea, &ea, &eb]) {
                assert!(close(&emb(&m.0.trunk), want));
            }
            // Members 0 and 1 share a trunk but not their heads (fine-tuning seeds differ).
            let head = |i: usize| members[i].0.head.weight.val().into_data().into_vec::<f32>().unwrap();
            assert_ne!(head(0), head(1));
            assert!(train_proxy_ensemble_on::<Autodiff<B>>(&l, &cfg, Vec::new(), 3, device).is_err());
        }
    }

    /// Proxy fit against the number of pairs (ignored; knobs `GOODHART_{RM_EPOCHS, RM_LR,
    /// RM_LEARNED, RM_LAYERS, NOISE}`).
    #[test]
    #[ignore]
    fn measure_proxy_fit() {
        use crate::sft::tests::{knob, knob_language};
        use goodhart_core::device::{cpu, Dispatch as Cpu};
        let l = knob_language();
        // The generator's statistics: length, gold spread, tied clean pairs.
        let pairs = l.preference_pairs(4000, 0.0, 9).unwrap();
        let gold = |p: &goodhart_envs::language::PreferencePair, c: bool| {
            l.gold(&p.prompt, if c { &p.chosen } else { &p.rejected })
                .unwrap()
        };
        let golds: Vec<f64> = pairs.iter().map(|p| gold(p, true)).collect();
        let ties = pairs
            .iter()
            .filter(|p| gold(p, true) == gold(p, false))
            .count();
        let len = pairs
            .iter()
            .map(|p| p.chosen.len() as f64 - 1.0)
            .sum::<f64>()
            / 4000.0;
        let gm = golds.iter().sum::<f64>() / 4000.0;
        let gs = (golds.iter().map(|g| (g - gm).powi(2)).sum::<f64>() / 4000.0).sqrt();
        eprintln!(
            "entropy {:.3} mean length {len:.2} chosen gold {gm:.3} +- {gs:.3} ties {:.3}",
            l.entropy_per_token(),
            ties as f64 / 4000.0
        );
        let d = ProxyConfig::default();
        for pairs in [200, 1000, 3000] {
            let cfg = ProxyConfig {
                pairs,
                epochs: knob("RM_EPOCHS", d.epochs),
                lr: knob("RM_LR", d.lr),
                learned_positions: knob("RM_LEARNED", d.learned_positions),
                layers: knob("RM_LAYERS", d.layers),
                label_noise: knob("NOISE", d.label_noise),
                ..d.clone()
            };
            let t = std::time::Instant::now();
            let (_, r) = train_proxy::<Autodiff<Cpu>>(&l, &cfg, 0, &cpu()).unwrap();
            eprintln!("{pairs} pairs {:.1}s {r:?}", t.elapsed().as_secs_f64());
        }
    }
}
