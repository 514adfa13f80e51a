//! Training reward models on preference pairs.
//!
//! [`Preferences`] holds (prompt, chosen, rejected) token sequences, built in memory or
//! read from a JSONL file (read only: the file is never written). [`train_reward_model`]
//! minimises the Bradley-Terry loss ([`bt_loss`]) with AdamW over shuffled mini-batches
//! (chosen and rejected responses of a batch go through the model in one forward pass),
//! then stores the training rewards' mean and std in the model and reports train and
//! held-out accuracy. [`train_ensemble`] trains `K` members that differ by seed
//! (initialisation and data order). [`relabel_noisy`] applies Secrets of RLHF II's
//! noisy-preference handling with an ensemble.

use std::path::Path;

use burn::{
    module::AutodiffModule,
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{
        backend::{AutodiffBackend, Backend},
        Tensor, TensorData,
    },
};
use goodhart_core::{seed, GoodhartError, Result};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::{
    bradley_terry::{
        adaptive_margin, bt_loss, flip_contradicted, pairwise_accuracy, preference_strength,
        BtLossConfig,
    },
    model::{RewardModel, RewardModelConfig},
    source::Sequences,
};

/// One preference: `chosen` is preferred to `rejected` as a response to `prompt`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferencePair {
    /// Prompt token ids (may be empty).
    pub prompt: Vec<u32>,
    /// Preferred response token ids (non-empty).
    pub chosen: Vec<u32>,
    /// Dispreferred response token ids (non-empty).
    pub rejected: Vec<u32>,
    /// Optional per-pair margin (TRL's `margin` column), added to the loss's margin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub margin: Option<f32>,
}

/// A validated, non-empty set of preference pairs.
#[derive(Debug, Clone, PartialEq)]
pub struct Preferences {
    pairs: Vec<PreferencePair>,
}

impl Preferences {
    /// Errors on an empty set, an empty response or a non-finite margin.
    pub fn new(pairs: Vec<PreferencePair>) -> Result<Self> {
        if pairs.is_empty() {
            return Err(GoodhartError::Empty {
                what: "preference pairs".into(),
            });
        }
        for (i, p) in pairs.iter().enumerate() {
            if p.chosen.is_empty() || p.rejected.is_empty() {
                return Err(GoodhartError::invalid(
                    format!("pairs[{i}]"),
                    "chosen and rejected responses must each hold at least one token",
                ));
            }
            if p.margin.is_some_and(|m| !m.is_finite()) {
                return Err(GoodhartError::NonFinite {
                    what: format!("pairs[{i}].margin"),
                });
            }
        }
        Ok(Self { pairs })
    }

    /// Pairs from three parallel columns; errors when their lengths differ.
    pub fn from_columns(
        prompts: Vec<Vec<u32>>,
        chosen: Vec<Vec<u32>>,
        rejected: Vec<Vec<u32>>,
    ) -> Result<Self> {
        let n = prompts.len();
        for (what, len) in [("chosen", chosen.len()), ("rejected", rejected.len())] {
            if len != n {
                return Err(GoodhartError::shape(
                    format!("{what} responses (one per prompt)"),
                    &[n],
                    &[len],
                ));
            }
        }
        Self::new(
            prompts
                .into_iter()
                .zip(chosen)
                .zip(rejected)
                .map(|((prompt, chosen), rejected)| PreferencePair {
                    prompt,
                    chosen,
                    rejected,
                    margin: None,
                })
                .collect(),
        )
    }

    /// Reads one JSON object per line (`{"prompt": [..], "chosen": [..], "rejected":
    /// [..], "margin": 0.5}`; blank lines skipped). The file is opened read-only. Errors
    /// name the line.
    pub fn from_jsonl(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            GoodhartError::invalid("preference file", format!("{}: {e}", path.display()))
        })?;
        let pairs = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| {
                    GoodhartError::invalid(
                        "preference file",
                        format!("{} line {}: {e}", path.display(), i + 1),
                    )
                })
            })
            .collect::<Result<Vec<PreferencePair>>>()?;
        Self::new(pairs).map_err(|e| match e {
            GoodhartError::Empty { .. } => GoodhartError::Empty {
                what: format!("preference file {}", path.display()),
            },
            e => e,
        })
    }

    /// The pairs.
    pub fn pairs(&self) -> &[PreferencePair] {
        &self.pairs
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Always false (an empty set cannot be built).
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Splits off the last `holdout` pairs after a seeded shuffle: `(train, held_out)`.
    /// Errors unless both parts are non-empty.
    pub fn split(&self, holdout: usize, seed: u64) -> Result<(Self, Self)> {
        if holdout == 0 || holdout >= self.len() {
            return Err(GoodhartError::invalid(
                "holdout",
                format!("must lie in 1..{} (both parts non-empty)", self.len()),
            ));
        }
        let mut pairs = self.pairs.clone();
        pairs.shuffle(&mut seed::rng(seed, "reward/split"));
        let held = pairs.split_off(self.len() - holdout);
        Ok((Self { pairs }, Self { pairs: held }))
    }

    /// Swaps chosen and rejected of the pairs at `indices` (out-of-range indices are an
    /// error).
    pub fn flip(&mut self, indices: &[usize]) -> Result<()> {
        if let Some(&bad) = indices.iter().find(|&&i| i >= self.len()) {
            return Err(GoodhartError::invalid(
                "flip indices",
                format!("{bad} is out of range for {} pairs", self.len()),
            ));
        }
        for &i in indices {
            let p = &mut self.pairs[i];
            std::mem::swap(&mut p.chosen, &mut p.rejected);
        }
        Ok(())
    }

    /// Sets every pair's margin (e.g. from [`adaptive_margin`]); errors on a length
    /// mismatch or a non-finite value.
    pub fn set_margins(&mut self, margins: &[f32]) -> Result<()> {
        if margins.len() != self.len() {
            return Err(GoodhartError::shape(
                "margins",
                &[self.len()],
                &[margins.len()],
            ));
        }
        if margins.iter().any(|m| !m.is_finite()) {
            return Err(GoodhartError::NonFinite {
                what: "margins".into(),
            });
        }
        for (p, &m) in self.pairs.iter_mut().zip(margins) {
            p.margin = Some(m);
        }
        Ok(())
    }

    /// The chosen (`rejected = false`) or rejected responses of `indices` as one padded
    /// batch (pad id 0).
    fn sequences<B: Backend>(
        &self,
        indices: &[usize],
        device: &B::Device,
    ) -> Result<(Sequences<B>, Sequences<B>)> {
        let take = |rejected: bool| -> Vec<(&[u32], &[u32])> {
            indices
                .iter()
                .map(|&i| {
                    let p = &self.pairs[i];
                    let r = if rejected { &p.rejected } else { &p.chosen };
                    (p.prompt.as_slice(), r.as_slice())
                })
                .collect()
        };
        Ok((
            Sequences::from_pairs(&take(false), 0, device)?,
            Sequences::from_pairs(&take(true), 0, device)?,
        ))
    }
}

/// Settings of [`train_reward_model`] (TOML under `[reward.train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardTrainConfig {
    /// Passes over the training pairs (default 1, as TRL's and OpenRLHF's RM recipes).
    pub epochs: usize,
    /// Pairs per optimiser step (default 32).
    pub batch_size: usize,
    /// AdamW learning rate (default 1e-3, for the small models this toolkit trains from
    /// scratch; TRL and OpenRLHF fine-tune pretrained models at ~1e-5).
    pub lr: f64,
    /// AdamW weight decay (default 0, OpenRLHF's RM default).
    pub weight_decay: f32,
    /// Seed of the data order and, in [`train_ensemble`], of the initialisation.
    pub seed: u64,
    /// The pairwise loss.
    pub loss: BtLossConfig,
    /// Batch size for scoring (normalisation statistics, accuracy; default 256).
    pub eval_batch_size: usize,
}

impl Default for RewardTrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            lr: 1e-3,
            weight_decay: 0.0,
            seed: 0,
            loss: BtLossConfig::default(),
            eval_batch_size: 256,
        }
    }
}

/// What training did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainReport {
    /// Loss of every optimiser step.
    pub losses: Vec<f32>,
    /// Accuracy on the training pairs after training.
    pub train_accuracy: f32,
    /// Accuracy on the held-out pairs, when given.
    pub eval_accuracy: Option<f32>,
    /// Mean of the raw training rewards (chosen and rejected), now stored in the model.
    pub reward_mean: f32,
    /// Their population std, now stored in the model.
    pub reward_std: f32,
    /// Pairs processed (epochs x pairs).
    pub pairs_seen: usize,
}

/// Trains `model` on `train` and evaluates it on `eval`; see the module docs. Returns
/// the trained model (normalisation stored) and a [`TrainReport`].
///
/// Errors on a zero batch size or epoch count, a bad loss config, or any model error
/// (a sequence longer than the trunk accepts, a token outside the vocabulary).
pub fn train_reward_model<B: AutodiffBackend>(
    mut model: RewardModel<B>,
    train: &Preferences,
    eval: Option<&Preferences>,
    config: &RewardTrainConfig,
) -> Result<(RewardModel<B>, TrainReport)> {
    if config.batch_size == 0 || config.epochs == 0 || config.eval_batch_size == 0 {
        return Err(GoodhartError::invalid(
            "reward.train",
            "epochs, batch_size and eval_batch_size must be at least 1",
        ));
    }
    config.loss.validate()?;
    let device = model.head.weight.device();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay)
        .init::<B, RewardModel<B>>();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = seed::rng(config.seed, "reward/data");
    let mut losses = Vec::new();
    for _ in 0..config.epochs {
        order.shuffle(&mut rng);
        for batch in order.chunks(config.batch_size) {
            let (chosen, rejected) = train.sequences::<B>(batch, &device)?;
            let b = batch.len();
            let (tokens, mask) = stack_pair(&chosen, &rejected);
            let scores = model.raw_scores(tokens, mask)?;
            let margins: Vec<f32> = batch
                .iter()
                .map(|&i| train.pairs[i].margin.unwrap_or(0.0))
                .collect();
            let margins = Tensor::from_data(TensorData::new(margins, [b]), &device);
            let loss = bt_loss(
                scores.clone().narrow(0, 0, b),
                scores.narrow(0, b, b),
                Some(margins),
                &config.loss,
            )?;
            let value = burn::tensor::cast::ToElement::to_f32(&loss.clone().into_scalar());
            if !value.is_finite() {
                return Err(GoodhartError::NonFinite {
                    what: format!("reward-model loss at batch {}", losses.len()),
                });
            }
            losses.push(value);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(config.lr, model, grads);
        }
    }
    let inner = model.valid();
    let (chosen, rejected) = raw_pair_scores(&inner, train, config.eval_batch_size)?;
    let train_accuracy = pairwise_accuracy(chosen.clone(), rejected.clone())?;
    let all = Tensor::cat(vec![chosen, rejected], 0);
    let mean = all.clone().mean();
    let std = (all - mean.clone()).powi_scalar(2).mean().sqrt();
    let reward_mean = burn::tensor::cast::ToElement::to_f32(&mean.into_scalar());
    let reward_std = burn::tensor::cast::ToElement::to_f32(&std.into_scalar()).max(1e-6);
    let eval_accuracy = eval
        .map(|e| {
            let (c, r) = raw_pair_scores(&inner, e, config.eval_batch_size)?;
            pairwise_accuracy(c, r)
        })
        .transpose()?;
    let model = model.with_normalization(reward_mean, reward_std)?;
    Ok((
        model,
        TrainReport {
            losses,
            train_accuracy,
            eval_accuracy,
            reward_mean,
            reward_std,
            pairs_seen: config.epochs * train.len(),
        },
    ))
}

/// Chosen then rejected rows, padded to a common length: `(tokens [2b, T], mask)`.
fn stack_pair<B: Backend>(
    a: &Sequences<B>,
    b: &Sequences<B>,
) -> (Tensor<B, 2, burn::tensor::Int>, Tensor<B, 2>) {
    let t = a.tokens.dims()[1].max(b.tokens.dims()[1]);
    let pad_tokens = |s: &Sequences<B>| {
        let [n, ts] = s.tokens.dims();
        if ts == t {
            s.tokens.clone()
        } else {
            Tensor::cat(
                vec![
                    s.tokens.clone(),
                    Tensor::zeros([n, t - ts], &s.tokens.device()),
                ],
                1,
            )
        }
    };
    let pad_mask = |s: &Sequences<B>| {
        let [n, ts] = s.attention_mask.dims();
        if ts == t {
            s.attention_mask.clone()
        } else {
            Tensor::cat(
                vec![
                    s.attention_mask.clone(),
                    Tensor::zeros([n, t - ts], &s.tokens.device()),
                ],
                1,
            )
        }
    };
    (
        Tensor::cat(vec![pad_tokens(a), pad_tokens(b)], 0),
        Tensor::cat(vec![pad_mask(a), pad_mask(b)], 0),
    )
}

/// Raw scores of every pair's chosen and rejected response, `([P], [P])`, in batches.
pub fn raw_pair_scores<B: Backend>(
    model: &RewardModel<B>,
    pairs: &Preferences,
    batch_size: usize,
) -> Result<(Tensor<B, 1>, Tensor<B, 1>)> {
    if batch_size == 0 {
        return Err(GoodhartError::invalid("batch_size", "must be at least 1"));
    }
    let device = model.head.weight.device();
    let idx: Vec<usize> = (0..pairs.len()).collect();
    let mut c = Vec::new();
    let mut r = Vec::new();
    for batch in idx.chunks(batch_size) {
        let (chosen, rejected) = pairs.sequences::<B>(batch, &device)?;
        let (tokens, mask) = stack_pair(&chosen, &rejected);
        let s = model.raw_scores(tokens, mask)?;
        let b = batch.len();
        c.push(s.clone().narrow(0, 0, b));
        r.push(s.narrow(0, b, b));
    }
    Ok((Tensor::cat(c, 0), Tensor::cat(r, 0)))
}

/// Trains `k` reward models that differ by seed: member `i` draws its initialisation
/// from stream `reward/member/i/init` and its data order from its own seed
/// (`derive(config.seed, "reward/member/i")`). Returns the members and their reports.
pub fn train_ensemble<B: AutodiffBackend>(
    model_config: &RewardModelConfig,
    k: usize,
    train: &Preferences,
    eval: Option<&Preferences>,
    config: &RewardTrainConfig,
    device: &B::Device,
) -> Result<Vec<(RewardModel<B>, TrainReport)>> {
    if k == 0 {
        return Err(GoodhartError::invalid(
            "ensemble size",
            "must be at least 1",
        ));
    }
    (0..k)
        .map(|i| {
            let stream = format!("reward/member/{i}/init");
            let model = seed::seeded::<B, _>(device, config.seed, &stream, || {
                model_config.init::<B>(device)
            })?;
            let member = RewardTrainConfig {
                seed: seed::derive(config.seed, &format!("reward/member/{i}")),
                ..config.clone()
            };
            train_reward_model(model, train, eval, &member)
        })
        .collect()
}

/// Settings of [`relabel_noisy`] (Secrets of RLHF II).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NoisyPreferenceConfig {
    /// Flip pairs whose preference strength (mean ensemble gap, in normalised reward
    /// units) is below `-flip_threshold` (default 1; *unverified*, the paper flips its
    /// lowest-strength bucket).
    pub flip_threshold: f32,
    /// Adaptive margin scale: margin `= scale * max(strength, 0)` (default 0, off).
    pub margin_scale: f32,
}

impl Default for NoisyPreferenceConfig {
    fn default() -> Self {
        Self {
            flip_threshold: 1.0,
            margin_scale: 0.0,
        }
    }
}

/// Noisy-preference handling with an ensemble (Secrets of RLHF II): scores every pair
/// with every member (normalised scores), computes the preference strength, flips the
/// strongly contradicted pairs and, when `margin_scale > 0`, sets adaptive margins
/// (computed after flipping, so a flipped pair's strength is positive). Returns the new
/// set and the indices flipped; `pairs` itself is untouched. Label smoothing is the
/// loss's `label_smoothing`.
pub fn relabel_noisy<B: Backend>(
    members: &[RewardModel<B>],
    pairs: &Preferences,
    config: &NoisyPreferenceConfig,
    batch_size: usize,
) -> Result<(Preferences, Vec<usize>)> {
    if members.is_empty() {
        return Err(GoodhartError::Empty {
            what: "ensemble members".into(),
        });
    }
    let mut chosen = Vec::new();
    let mut rejected = Vec::new();
    for m in members {
        let (c, r) = raw_pair_scores(m, pairs, batch_size)?;
        let (mean, std) = m.normalization();
        chosen.push(((c - mean) / std).unsqueeze_dim(0));
        rejected.push(((r - mean) / std).unsqueeze_dim(0));
    }
    let (strength, _) = preference_strength(Tensor::cat(chosen, 0), Tensor::cat(rejected, 0))?;
    let flipped = flip_contradicted(strength.clone(), config.flip_threshold)?;
    let mut out = pairs.clone();
    out.flip(&flipped)?;
    if config.margin_scale > 0.0 {
        let mut s = goodhart_core::ops::to_host(strength)?;
        for &i in &flipped {
            s[i] = -s[i];
        }
        let device = members[0].head.weight.device();
        let s = Tensor::<B, 1>::from_data(TensorData::new(s, [pairs.len()]), &device);
        out.set_margins(&goodhart_core::ops::to_host(adaptive_margin(
            s,
            config.margin_scale,
        )?)?)?;
    }
    Ok((out, flipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_policy::TransformerConfig;
    use rand::RngExt as _;

    /// Synthetic preference task: responses are 4..=10 tokens from a vocabulary of 8;
    /// the hidden score is a linear function of token counts, `sum_t w[tok_t]` with
    /// `w = (0, 1, -1, 0.5, -0.5, 2, -2, 0)`. Ties are dropped.
    fn synthetic(n: usize, seed_: u64) -> Preferences {
        const W: [f32; 8] = [0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.0];
        let mut rng = seed::rng(seed_, "test/synthetic");
        let mut pairs = Vec::with_capacity(n);
        while pairs.len() < n {
            let mut resp = || -> Vec<u32> {
                let len = rng.random_range(4..=10);
                (0..len).map(|_| rng.random_range(1..8u32)).collect()
            };
            let (a, b) = (resp(), resp());
            let score = |r: &[u32]| r.iter().map(|&t| W[t as usize]).sum::<f32>();
            let (sa, sb) = (score(&a), score(&b));
            if sa == sb {
                continue;
            }
            let (chosen, rejected) = if sa > sb { (a, b) } else { (b, a) };
            pairs.push(PreferencePair {
                prompt: vec![7],
                chosen,
                rejected,
                margin: None,
            });
        }
        Preferences::new(pairs).unwrap()
    }

    fn tiny_config() -> RewardModelConfig {
        RewardModelConfig::new(TransformerConfig::new(8, 16, 1, 2, 16))
    }

    goodhart_core::backend_test! {
        fn learns_a_hidden_linear_preference<B>(device) {
            use goodhart_core::device::Autodiff;
            let data = synthetic(2_200, 1);
            let (train, held_out) = data.split(200, 1).unwrap();
            assert_eq!(train.len(), 2_000);
            let model = seed::seeded::<Autodiff<B>, _>(device, 3, "test/init", || {
                tiny_config().init::<Autodiff<B>>(device)
            })
            .unwrap();
            let config = RewardTrainConfig { epochs: 1, batch_size: 32, lr: 5e-3, ..Default::default() };
            let (model, report) = train_reward_model(model, &train, Some(&held_out), &config).unwrap();
            let acc = report.eval_accuracy.unwrap();
            eprintln!("held-out accuracy {acc:.3}, train accuracy {:.3}, first loss {:.3}, last loss {:.3}",
                report.train_accuracy, report.losses[0], report.losses.last().unwrap());
            assert!(acc > 0.75, "held-out accuracy {acc}");
            assert_eq!(report.pairs_seen, 2_000);
            assert_eq!(report.losses.len(), 2_000usize.div_ceil(32));
            // Stored normalisation: training rewards now have mean 0 and std 1.
            assert_eq!(model.normalization(), (report.reward_mean, report.reward_std));
            let inner = model.valid();
            let (c, r) = raw_pair_scores(&inner, &train, 256).unwrap();
            let all = goodhart_core::ops::to_host(Tensor::cat(vec![c, r], 0)).unwrap();
            let z: Vec<f32> = all.iter().map(|x| (x - report.reward_mean) / report.reward_std).collect();
            let m = z.iter().sum::<f32>() / z.len() as f32;
            let v = z.iter().map(|x| (x - m).powi(2)).sum::<f32>() / z.len() as f32;
            assert!(m.abs() < 1e-3 && (v - 1.0).abs() < 1e-2, "mean {m} var {v}");
        }
    }

    goodhart_core::backend_test! {
        fn noisy_labels_are_flipped_by_a_confident_ensemble<B>(device) {
            use goodhart_core::device::Autodiff;
            let data = synthetic(400, 2);
            let config = RewardTrainConfig { epochs: 2, lr: 3e-3, ..Default::default() };
            let members = train_ensemble::<Autodiff<B>>(&tiny_config(), 2, &data, None, &config, device).unwrap();
            let members: Vec<_> = members.into_iter().map(|(m, _)| m.valid()).collect();
            // Corrupt 20 labels; the ensemble should flip mostly those back.
            let mut noisy = data.clone();
            let corrupted: Vec<usize> = (0..20).map(|i| i * 20).collect();
            noisy.flip(&corrupted).unwrap();
            let cfg = NoisyPreferenceConfig { flip_threshold: 0.5, margin_scale: 0.5 };
            let (fixed, flipped) = relabel_noisy(&members, &noisy, &cfg, 256).unwrap();
            let hits = flipped.iter().filter(|i| corrupted.contains(i)).count();
            eprintln!("flipped {} pairs, {hits} of them corrupted", flipped.len());
            // Corrupted pairs are 5% of the set; flipped ones must be mostly corrupted (ndarray:
            // 13 of 16 flipped, wgpu: 10 of 14).
            assert!(hits >= 8, "{hits} of 20 corrupted pairs recovered");
            assert!(hits * 10 >= flipped.len() * 6, "precision: {hits} of {}", flipped.len());
            assert!(fixed.pairs().iter().all(|p| p.margin.is_some_and(|m| m >= 0.0)));
            assert_ne!(noisy, fixed);
        }
    }

    #[test]
    fn bad_preference_data_is_a_typed_error() {
        assert!(matches!(
            Preferences::new(vec![]),
            Err(GoodhartError::Empty { .. })
        ));
        assert!(matches!(
            Preferences::from_columns(
                vec![vec![1], vec![2]],
                vec![vec![1]],
                vec![vec![1], vec![2]]
            ),
            Err(GoodhartError::ShapeMismatch { .. })
        ));
        let nan = PreferencePair {
            prompt: vec![],
            chosen: vec![1],
            rejected: vec![2],
            margin: Some(f32::NAN),
        };
        assert!(matches!(
            Preferences::new(vec![nan]),
            Err(GoodhartError::NonFinite { .. })
        ));
        let empty = PreferencePair {
            prompt: vec![1],
            chosen: vec![],
            rejected: vec![2],
            margin: None,
        };
        assert!(Preferences::new(vec![empty]).is_err());
        let p = synthetic(10, 0);
        assert!(p.split(0, 0).is_err() && p.split(10, 0).is_err());
        let mut q = p.clone();
        assert!(q.flip(&[10]).is_err());
        assert!(q.set_margins(&[1.0]).is_err());
    }

    #[test]
    fn jsonl_files_are_read_and_never_modified() {
        let dir =
            std::env::temp_dir().join(format!("goodhart-reward-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pairs.jsonl");
        let text = "{\"prompt\": [1], \"chosen\": [2, 3], \"rejected\": [4]}\n\n{\"prompt\": [], \"chosen\": [5], \"rejected\": [6], \"margin\": 0.5}\n";
        std::fs::write(&path, text).unwrap();
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        let p = Preferences::from_jsonl(&path).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p.pairs()[1].margin, Some(0.5));
        let (mut a, _) = p.split(1, 0).unwrap();
        a.flip(&[0]).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        assert_eq!(
            std::fs::metadata(&path).unwrap().modified().unwrap(),
            before
        );
        // empty file, bad line, unknown key: typed errors naming the problem
        std::fs::write(dir.join("empty.jsonl"), "\n").unwrap();
        assert!(matches!(
            Preferences::from_jsonl(dir.join("empty.jsonl")),
            Err(GoodhartError::Empty { .. })
        ));
        std::fs::write(
            dir.join("bad.jsonl"),
            "{\"prompt\": [1], \"chosen\": [2]}\n",
        )
        .unwrap();
        let e = Preferences::from_jsonl(dir.join("bad.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::write(
            dir.join("extra.jsonl"),
            "{\"prompt\": [1], \"chosen\": [2], \"rejected\": [3], \"x\": 1}\n",
        )
        .unwrap();
        assert!(Preferences::from_jsonl(dir.join("extra.jsonl")).is_err());
        assert!(Preferences::from_jsonl(dir.join("missing.jsonl")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
