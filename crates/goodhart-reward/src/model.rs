//! The learned reward model: goodhart-policy's transformer [`Trunk`] with a scalar head.
//!
//! `tokens [N, T] -> Trunk -> hidden [N, T, D] -> head (D -> 1) -> score at the last
//! valid token`, the layout of TRL's `AutoModelForSequenceClassification` reward models
//! and OpenRLHF's `RewardModel` (score read at the last token of the attention mask, so
//! left and right padding both work). The trunk is the same module the policy LM uses, not
//! a second transformer: a reward model can start from a policy's trunk
//! ([`RewardModel::from_trunk`]).
//!
//! After training, the mean and std of the training rewards are stored in the model
//! (OpenRLHF's `normalize_reward`), and [`RewardModel::scores`] returns
//! `(raw - mean) / std`; [`RewardModel::raw_scores`] skips the normalisation. They are
//! parameters of the module (frozen, no gradient), so checkpoints carry them.

use std::path::Path;

use burn::{
    config::Config,
    module::{Module, Param},
    nn::{Initializer, Linear, LinearConfig},
    record::{FullPrecisionSettings, NamedMpkFileRecorder},
    tensor::{backend::Backend, cast::ToElement, Int, Tensor, TensorData},
};
use goodhart_core::{params::materialize, GoodhartError, Result};
use goodhart_policy::{TransformerConfig, Trunk};

use crate::source::{RewardOutput, RewardSource, Sequences};

/// Configuration of a [`RewardModel`].
#[derive(Config, Debug)]
pub struct RewardModelConfig {
    /// The trunk (same configuration type as the policy LM's; its LM-head settings are
    /// unused).
    pub trunk: TransformerConfig,
}

impl RewardModelConfig {
    /// A reward model with a freshly initialised trunk (GPT-2 init) and head.
    ///
    /// The head is `D -> 1` without bias, weights `N(0, 1/(D + 1))` in std (OpenRLHF's
    /// value-head init). Normalisation starts as mean 0, std 1. All parameters are drawn
    /// now (burn initialises lazily otherwise), so seeding the backend right before this
    /// call fixes them.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Result<RewardModel<B>> {
        let trunk = self.trunk.init_trunk(device)?;
        let model = RewardModel::from_trunk(trunk, device);
        materialize(&model);
        Ok(model)
    }
}

/// A transformer trunk with a scalar head; see the module docs.
#[derive(Module, Debug)]
pub struct RewardModel<B: Backend> {
    /// The shared transformer trunk (goodhart-policy).
    pub trunk: Trunk<B>,
    /// The scalar head `D -> 1`.
    pub head: Linear<B>,
    /// Stored normalisation `[mean, std]` (frozen).
    normalization: Param<Tensor<B, 1>>,
}

impl<B: Backend> RewardModel<B> {
    /// A reward model on an existing trunk (e.g. an SFT policy's) with a new head.
    pub fn from_trunk(trunk: Trunk<B>, device: &B::Device) -> Self {
        let d = trunk.d_model();
        let head = LinearConfig::new(d, 1)
            .with_bias(false)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 1.0 / (d as f64 + 1.0),
            })
            .init(device);
        let normalization =
            Param::from_tensor(Tensor::from_floats([0.0, 1.0], device)).set_require_grad(false);
        Self {
            trunk,
            head,
            normalization,
        }
    }

    /// Unnormalised scores `[N]`: the head applied to the hidden state of each row's last
    /// token with `attention_mask = 1`. Gradients flow (train with this).
    ///
    /// Errors on mismatched shapes, a row without any valid token, a sequence longer than
    /// the trunk's `max_seq_len`, or a token id outside the vocabulary.
    pub fn raw_scores(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>> {
        let [n, t] = tokens.dims();
        let last = last_valid(&tokens, &attention_mask)?;
        let hidden = self.trunk.forward(tokens, attention_mask)?;
        let per_token = self.head.forward(hidden).reshape([n, t]);
        Ok(per_token.gather(1, last).reshape([n]))
    }

    /// The hidden state `[N, D]` the head reads: each row's at its last token with
    /// `attention_mask = 1` (an embedding of the sequence, e.g. for an out-of-distribution
    /// score). Errors as [`RewardModel::raw_scores`].
    pub fn embeddings(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 2>> {
        let n = tokens.dims()[0];
        let last = last_valid(&tokens, &attention_mask)?;
        let hidden = self.trunk.forward(tokens, attention_mask)?;
        let d = hidden.dims()[2];
        let at = last.reshape([n, 1, 1]).repeat_dim(2, d);
        Ok(hidden.gather(1, at).reshape([n, d]))
    }

    /// Normalised scores `(raw - mean) / std` with the stored statistics.
    pub fn scores(
        &self,
        tokens: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>> {
        let raw = self.raw_scores(tokens, attention_mask)?;
        let norm = self.normalization.val();
        let mean = norm.clone().narrow(0, 0, 1);
        let std = norm.narrow(0, 1, 1);
        Ok((raw - mean) / std)
    }

    /// The stored `(mean, std)` (0 and 1 before training).
    pub fn normalization(&self) -> (f32, f32) {
        let v = self
            .normalization
            .val()
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_else(|_| vec![0.0, 1.0]);
        (v[0], v[1])
    }

    /// Stores `mean` and `std` for [`RewardModel::scores`]. Errors on a non-finite mean
    /// or a std that is not positive and finite.
    pub fn with_normalization(mut self, mean: f32, std: f32) -> Result<Self> {
        if !(mean.is_finite() && std.is_finite() && std > 0.0) {
            return Err(GoodhartError::invalid(
                "reward normalisation",
                format!("need a finite mean and a positive std, got ({mean}, {std})"),
            ));
        }
        let device = self.head.weight.device();
        self.normalization = Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![mean, std], [2]),
            &device,
        ))
        .set_require_grad(false);
        Ok(self)
    }

    /// Writes the model to `<path>.mpk` (burn's named MessagePack recorder, full
    /// precision). The file is first written in a temporary sibling directory and then
    /// renamed, so a reader never sees a half-written checkpoint.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let io = |e: &dyn std::fmt::Display| {
            GoodhartError::invalid("checkpoint", format!("{}: {e}", path.display()))
        };
        let stem = path
            .file_name()
            .ok_or_else(|| io(&"the path has no file name"))?;
        let parent = path.parent().unwrap_or(Path::new("."));
        let tmp_dir = parent.join(format!(".tmp-{}", stem.to_string_lossy()));
        std::fs::create_dir_all(&tmp_dir).map_err(|e| io(&e))?;
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        // Parameter ids from the file's name: the same weights give the same bytes.
        goodhart_core::params::with_stable_ids(self.clone(), &stem.to_string_lossy())
            .save_file(tmp_dir.join(stem), &recorder)
            .map_err(|e| io(&e))?;
        let mut file = std::path::PathBuf::from(stem);
        file.set_extension("mpk");
        std::fs::rename(tmp_dir.join(&file), parent.join(&file)).map_err(|e| io(&e))?;
        std::fs::remove_dir(&tmp_dir).map_err(|e| io(&e))
    }

    /// Loads the weights and normalisation saved by [`RewardModel::save`] into this
    /// model (which must have the same architecture).
    pub fn load(self, path: impl AsRef<Path>, device: &B::Device) -> Result<Self> {
        let path = path.as_ref();
        let recorder = NamedMpkFileRecorder::<FullPrecisionSettings>::new();
        let bad = |why: String| {
            GoodhartError::invalid("checkpoint", format!("{}: {why}", path.display()))
        };
        // burn panics on some corrupt records (an invalid parameter id): an error here.
        goodhart_core::error::catch_panic(|| self.load_file(path.to_path_buf(), &recorder, device))
            .map_err(|why| bad(format!("corrupt record ({why})")))?
            .map_err(|e| bad(e.to_string()))
    }
}

impl<B: Backend> RewardSource<B> for RewardModel<B> {
    fn name(&self) -> &str {
        "reward_model"
    }

    /// Normalised scores of every sequence.
    fn score(&self, input: &Sequences<B>) -> Result<RewardOutput<B>> {
        RewardOutput::scalar(self.scores(input.tokens.clone(), input.attention_mask.clone())?)
    }
}

/// Each row's last position with `attention_mask = 1`, `[N, 1]`: the argmax over `t` of
/// `mask_t * (t + 1)`. Errors unless the mask has `tokens`' shape and every row has a
/// valid token.
fn last_valid<B: Backend>(
    tokens: &Tensor<B, 2, Int>,
    attention_mask: &Tensor<B, 2>,
) -> Result<Tensor<B, 2, Int>> {
    let [n, t] = tokens.dims();
    if attention_mask.dims() != [n, t] {
        return Err(GoodhartError::shape(
            "attention_mask",
            &[n, t],
            &attention_mask.dims(),
        ));
    }
    if n > 0
        && attention_mask
            .clone()
            .sum_dim(1)
            .min()
            .into_scalar()
            .to_f32()
            <= 0.0
    {
        return Err(GoodhartError::Empty {
            what: "a sequence of the batch (no token with attention_mask = 1)".into(),
        });
    }
    let pos = Tensor::<B, 1, Int>::arange(1..t as i64 + 1, &tokens.device())
        .float()
        .reshape([1, t]);
    Ok((attention_mask.clone().greater_elem(0.0).float() * pos).argmax(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::testing::{assert_close, tolerance, values};

    pub(crate) fn tiny() -> RewardModelConfig {
        RewardModelConfig::new(TransformerConfig::new(8, 16, 1, 2, 16))
    }

    goodhart_core::backend_test! {
        fn score_is_read_at_the_last_valid_token<B>(device) {
            let model = tiny().init::<B>(device).unwrap();
            // Right padding: the score of [1 2 3 pad] equals that of [1 2 3] alone.
            let padded = Tensor::<B, 2, Int>::from_ints([[1, 2, 3, 0], [4, 5, 6, 7]], device);
            let mask = Tensor::<B, 2>::from_floats([[1.0, 1.0, 1.0, 0.0], [1.0; 4]], device);
            let s = values(model.raw_scores(padded, mask).unwrap());
            let alone = values(model.raw_scores(
                Tensor::<B, 2, Int>::from_ints([[1, 2, 3]], device),
                Tensor::<B, 2>::ones([1, 3], device)).unwrap());
            assert_close(&s[..1], &alone, tolerance(1e-5));
            // ... and left padding gives the same number (positions count real tokens).
            let left = values(model.raw_scores(
                Tensor::<B, 2, Int>::from_ints([[0, 1, 2, 3]], device),
                Tensor::<B, 2>::from_floats([[0.0, 1.0, 1.0, 1.0]], device)).unwrap());
            assert_close(&left, &alone, tolerance(1e-5));
            // normalisation: (raw - 1) / 2
            let model = model.with_normalization(1.0, 2.0).unwrap();
            assert_eq!(model.normalization(), (1.0, 2.0));
            let n = values(model.scores(
                Tensor::<B, 2, Int>::from_ints([[1, 2, 3]], device),
                Tensor::<B, 2>::ones([1, 3], device)).unwrap());
            assert_close(&n, &[(alone[0] - 1.0) / 2.0], tolerance(1e-5));
            assert!(model.clone().with_normalization(0.0, 0.0).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn embeddings_are_what_the_head_reads<B>(device) {
            let model = tiny().init::<B>(device).unwrap();
            let tokens = Tensor::<B, 2, Int>::from_ints([[0, 1, 2, 3], [4, 5, 6, 7]], device);
            let mask = Tensor::<B, 2>::from_floats([[0.0, 1.0, 1.0, 1.0], [1.0; 4]], device);
            let e = model.embeddings(tokens.clone(), mask.clone()).unwrap();
            assert_eq!(e.dims(), [2, 16]);
            // The head on the embedding is the raw score.
            let via = values(model.head.forward(e.clone()).reshape([2]));
            let raw = values(model.raw_scores(tokens, mask).unwrap());
            assert_close(&via, &raw, tolerance(1e-5));
            // Left padding: the embedding of [pad 1 2 3] is that of [1 2 3] alone.
            let alone = values(model.embeddings(
                Tensor::<B, 2, Int>::from_ints([[1, 2, 3]], device),
                Tensor::<B, 2>::ones([1, 3], device)).unwrap().reshape([16]));
            assert_close(&values(e.slice(0..1).reshape([16])), &alone, tolerance(1e-5));
            let none = Tensor::<B, 2>::from_floats([[1.0, 1.0], [0.0, 0.0]], device);
            let t = Tensor::<B, 2, Int>::from_ints([[1, 2], [3, 4]], device);
            assert!(matches!(model.embeddings(t.clone(), none), Err(GoodhartError::Empty { .. })));
            assert!(matches!(model.embeddings(t, Tensor::ones([2, 3], device)),
                Err(GoodhartError::ShapeMismatch { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn bad_batches_are_typed_errors<B>(device) {
            let model = tiny().init::<B>(device).unwrap();
            let tokens = Tensor::<B, 2, Int>::from_ints([[1, 2], [3, 4]], device);
            let no_token = Tensor::<B, 2>::from_floats([[1.0, 1.0], [0.0, 0.0]], device);
            assert!(matches!(model.raw_scores(tokens.clone(), no_token), Err(GoodhartError::Empty { .. })));
            assert!(matches!(model.raw_scores(tokens, Tensor::ones([2, 3], device)),
                Err(GoodhartError::ShapeMismatch { .. })));
            let oov = Tensor::<B, 2, Int>::from_ints([[1, 99]], device);
            assert!(model.raw_scores(oov, Tensor::ones([1, 2], device)).is_err());
        }
    }

    goodhart_core::backend_test! {
        fn checkpoints_round_trip<B>(device) {
            let dir = std::env::temp_dir().join(format!("goodhart-reward-ckpt-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let model = tiny().init::<B>(device).unwrap().with_normalization(0.5, 3.0).unwrap();
            model.save(dir.join("rm")).unwrap();
            assert!(dir.join("rm.mpk").exists());
            let fresh = tiny().init::<B>(device).unwrap();
            let loaded = fresh.load(dir.join("rm.mpk"), device).unwrap();
            assert_eq!(loaded.normalization(), (0.5, 3.0));
            let tokens = Tensor::<B, 2, Int>::from_ints([[1, 2, 3]], device);
            let mask = Tensor::<B, 2>::ones([1, 3], device);
            assert_close(&values(loaded.scores(tokens.clone(), mask.clone()).unwrap()),
                &values(model.scores(tokens, mask).unwrap()), 1e-6);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
