//! Checkpoints: save / load with burn's recorders.
//!
//! **Own checkpoints.** [`save`] writes a directory with `config.json` (the
//! [`TransformerConfig`]) and `model.mpk` (burn's `NamedMpkFileRecorder` at full
//! precision, so a save / load round trip is bit-identical). Files are written under a
//! temporary name and renamed, so a crash never leaves a half-written `model.mpk`.
//! [`load`] rebuilds the model from the config, loads the record and checks every
//! parameter against the config: a missing parameter or one of the wrong shape is an error
//! naming its key (burn's own loader would silently accept a wrong shape). [`save_module`]
//! and [`load_module`] do the same for any module (MLP policies, value heads, reward
//! models) given a freshly initialised template.
//!
//! Hugging Face model directories (GPT-2 and the Llama-style families) load through
//! [`crate::hf`], whose errors are this type's [`CheckpointError::Tensor`] and
//! [`CheckpointError::File`].

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use burn::{
    config::Config,
    module::Module,
    record::{FullPrecisionSettings, NamedMpkFileRecorder},
    tensor::backend::Backend,
};
use burn_store::ModuleSnapshot;
use goodhart_core::GoodhartError;
use thiserror::Error;

use crate::transformer::{TransformerConfig, TransformerLm};

/// What can go wrong with a checkpoint.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CheckpointError {
    /// The model needs a parameter the checkpoint does not hold.
    #[error("checkpoint key `{key}` is missing")]
    MissingKey {
        /// The key, in the checkpoint's own naming.
        key: String,
    },
    /// A parameter has another shape than the model needs.
    #[error("checkpoint key `{key}` has shape {got:?}; the model needs {expected:?}")]
    WrongShape {
        /// The key, in the checkpoint's own naming.
        key: String,
        /// Shape the model needs.
        expected: Vec<usize>,
        /// Shape in the checkpoint.
        got: Vec<usize>,
    },
    /// A parameter could not be read (wrong dtype, corrupt data).
    #[error("checkpoint key `{key}`: {reason}")]
    BadTensor {
        /// The key.
        key: String,
        /// What went wrong.
        reason: String,
    },
    /// A tensor of a Hugging Face model directory is missing, misshaped, of another dtype
    /// or has no place in the model.
    #[error("`{file}`: tensor `{key}` {reason}")]
    Tensor {
        /// The file that holds (or should hold) it.
        file: PathBuf,
        /// The tensor's name in the file.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed, or its format is wrong.
    #[error("checkpoint `{path}`: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The configuration does not describe a loadable model.
    #[error(transparent)]
    Config(#[from] GoodhartError),
}

impl From<CheckpointError> for GoodhartError {
    fn from(e: CheckpointError) -> Self {
        match e {
            CheckpointError::MissingKey { key } => {
                GoodhartError::invalid(key, "missing from the checkpoint")
            }
            CheckpointError::WrongShape { key, expected, got } => {
                GoodhartError::shape(key, &expected, &got)
            }
            CheckpointError::BadTensor { key, reason } => GoodhartError::invalid(key, reason),
            CheckpointError::File { path, reason } => {
                GoodhartError::invalid(path.display().to_string(), reason)
            }
            CheckpointError::Tensor { file, key, reason } => {
                GoodhartError::invalid(format!("{} `{key}`", file.display()), reason)
            }
            CheckpointError::Config(e) => e,
        }
    }
}

type Recorder = NamedMpkFileRecorder<FullPrecisionSettings>;

fn file_error(path: &Path, e: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// Saves `module` to `<path>.mpk` (burn's named MessagePack, full precision), writing a
/// temporary file first and renaming it.
pub fn save_module<B: Backend, M: Module<B>>(
    module: &M,
    path: &Path,
) -> Result<(), CheckpointError> {
    let final_path = path.with_extension("mpk");
    // The recorder sets the extension itself: write `<stem>-partial.mpk`, then rename.
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let partial = path.with_file_name(format!("{stem}-partial.mpk"));
    // Parameter ids from the file's name: the same weights give the same bytes.
    goodhart_core::params::with_stable_ids(module.clone(), &stem)
        .save_file(&partial, &Recorder::new())
        .map_err(|e| file_error(&final_path, e))?;
    std::fs::rename(&partial, &final_path).map_err(|e| file_error(&final_path, e))
}

/// Loads `<path>.mpk` into `template` (a freshly initialised module of the expected
/// architecture), checking that every parameter is present with the template's shape.
pub fn load_module<B: Backend, M: Module<B> + ModuleSnapshot<B>>(
    template: M,
    path: &Path,
    device: &B::Device,
) -> Result<M, CheckpointError> {
    let path = path.with_extension("mpk");
    let expected = shapes(&template);
    // burn panics on some corrupt records (an invalid parameter id): an error here.
    let loaded =
        goodhart_core::error::catch_panic(|| template.load_file(&path, &Recorder::new(), device))
            .map_err(|why| file_error(&path, format!("corrupt record ({why})")))?
            .map_err(|e| file_error(&path, e))?;
    let got = shapes(&loaded);
    for (key, shape) in expected {
        match got.get(&key) {
            None => return Err(CheckpointError::MissingKey { key }),
            Some(g) if *g != shape => {
                return Err(CheckpointError::WrongShape {
                    key,
                    expected: shape,
                    got: g.clone(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(loaded)
}

/// Parameter shapes by path (no data is read).
fn shapes<B: Backend, M: ModuleSnapshot<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    module
        .collect(None, None, false)
        .into_iter()
        .map(|s| (s.full_path(), s.shape.to_vec()))
        .collect()
}

/// Saves a transformer and its config to directory `dir` (`config.json`, `model.mpk`).
pub fn save<B: Backend>(
    model: &TransformerLm<B>,
    config: &TransformerConfig,
    dir: &Path,
) -> Result<(), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let cfg = dir.join("config.json");
    let partial = dir.join("config.json.partial");
    config.save(&partial).map_err(|e| file_error(&cfg, e))?;
    std::fs::rename(&partial, &cfg).map_err(|e| file_error(&cfg, e))?;
    save_module(model, &dir.join("model"))
}

/// Loads a transformer saved by [`save`] from directory `dir`.
pub fn load<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(TransformerLm<B>, TransformerConfig), CheckpointError> {
    let cfg = dir.join("config.json");
    let config = TransformerConfig::load(&cfg).map_err(|e| file_error(&cfg, e))?;
    let template = config.init(device)?;
    let model = load_module(template, &dir.join("model"), device)?;
    Ok((model, config))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::transformer::tests::{floats, ints, tiny};
    use crate::transformer::Positions;
    use goodhart_core::testing::values;

    pub(crate) use goodhart_core::testing::TempDir;

    /// A fresh [`TempDir`] named after the test.
    pub(crate) fn temp_dir(name: &str) -> TempDir {
        TempDir::new(&format!("policy-{name}"))
    }

    goodhart_core::backend_test! {
        fn save_then_load_is_bit_identical<B>(device) {
            let dir = temp_dir("roundtrip");
            for positions in [Positions::Rotary, Positions::Learned] {
                let cfg = tiny(positions).with_tie_embeddings(positions == Positions::Learned);
                B::seed(device, 21);
                let model = cfg.init::<B>(device).unwrap();
                save(&model, &cfg, &dir).unwrap();
                let (loaded, cfg2) = load::<B>(&dir, device).unwrap();
                assert_eq!(cfg2.positions, positions);
                let tokens = ints::<B>(&[&[1, 2, 3, 4, 5]], device);
                let mask = floats::<B>(&[&[1.0; 5]], device);
                let a = values(model.forward(tokens.clone(), mask.clone()).unwrap());
                let b = values(loaded.forward(tokens, mask).unwrap());
                assert_eq!(a, b, "bit-identical logits");
                assert!(!dir.join("model-partial.mpk").exists());
            }
        }
    }

    goodhart_core::backend_test! {
        fn wrong_shape_or_missing_parameter_names_the_key<B>(device) {
            let dir = temp_dir("badckpt");
            let cfg = tiny(Positions::Rotary);
            save(&cfg.init::<B>(device).unwrap(), &cfg, &dir).unwrap();
            // The config now claims 12 tokens; the weights hold 11.
            TransformerConfig { vocab_size: 12, ..cfg.clone() }.save(dir.join("config.json")).unwrap();
            let err = load::<B>(&dir, device).unwrap_err();
            assert_eq!(
                err,
                CheckpointError::WrongShape { key: "trunk.tok_emb.weight".into(), expected: vec![12, 16], got: vec![11, 16] }
            );
            // The config now wants an untied head the tied checkpoint never had.
            cfg.clone().with_tie_embeddings(false).save(dir.join("config.json")).unwrap();
            let err = load::<B>(&dir, device).unwrap_err();
            assert_eq!(err, CheckpointError::MissingKey { key: "head.proj.weight".into() });
            let g: GoodhartError = err.into();
            assert!(g.to_string().contains("head.proj.weight"));
            assert!(matches!(load::<B>(&dir.join("nowhere"), device), Err(CheckpointError::File { .. })));
        }
    }

    goodhart_core::backend_test! {
        fn fuzz_findings_are_errors<B>(device) {
            // Found by `cargo xtask fuzz checkpoint`: a record whose parameter id is not
            // valid base32, on which burn's decoder panics ("Invalid id.").
            let dir = temp_dir("fuzzfound");
            std::fs::copy(
                concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/fuzz-invalid-param-id.mpk"),
                dir.join("model.mpk"),
            )
            .unwrap();
            let template = tiny(Positions::Learned).init::<B>(device).unwrap();
            match load_module(template, &dir.join("model"), device) {
                Err(CheckpointError::File { reason, .. }) => assert!(reason.contains("corrupt record"), "{reason}"),
                other => panic!("{:?}", other.map(|_| ())),
            }
        }
    }
}
