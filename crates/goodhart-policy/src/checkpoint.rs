//! Checkpoints: save / load with burn's recorders, and import of GPT-2 safetensors.
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
//! **GPT-2 import.** [`import_gpt2`] loads a Hugging Face GPT-2 `model.safetensors` (keys
//! `wte.weight`, `wpe.weight`, `h.{i}.ln_1.{weight,bias}`, `h.{i}.attn.c_attn.{weight,bias}`,
//! `h.{i}.attn.c_proj.*`, `h.{i}.ln_2.*`, `h.{i}.mlp.c_fc.*`, `h.{i}.mlp.c_proj.*`,
//! `ln_f.*`, optionally prefixed `transformer.`) into a [`TransformerLm`] built from
//! [`TransformerConfig::gpt2`], through burn-store's key remapping ([`GPT2_KEYS`]). GPT-2's
//! `Conv1D` stores weights `[in, out]`, which is burn's `Linear` layout, and its fused
//! `c_attn` (`[D, 3D]`, columns `Q | K | V`, heads contiguous within each) is kept fused
//! in [`crate::transformer::Attention::qkv`] and split the same way in the forward pass,
//! so no transpose or split of the stored tensors is needed; LayerNorm `weight / bias`
//! map to burn's `gamma / beta`. The causal-mask buffers (`attn.bias`,
//! `attn.masked_bias`) and a separate `lm_head.weight` (equal to `wte` in GPT-2, whose
//! embeddings are tied) are ignored.

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
use burn_store::{ApplyError, ModuleSnapshot, SafetensorsStore};
use goodhart_core::GoodhartError;
use thiserror::Error;

use crate::transformer::{Positions, TransformerConfig, TransformerLm};

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

/// GPT-2 parameter names (`{i}` a layer index) and the [`TransformerLm`] paths they map to.
pub const GPT2_KEYS: &[(&str, &str)] = &[
    ("wte.weight", "trunk.tok_emb.weight"),
    ("wpe.weight", "trunk.pos_emb.weight"),
    ("h.{i}.ln_1.weight", "trunk.blocks.{i}.norm_attn.gamma"),
    ("h.{i}.ln_1.bias", "trunk.blocks.{i}.norm_attn.beta"),
    (
        "h.{i}.attn.c_attn.weight",
        "trunk.blocks.{i}.attn.qkv.weight",
    ),
    ("h.{i}.attn.c_attn.bias", "trunk.blocks.{i}.attn.qkv.bias"),
    (
        "h.{i}.attn.c_proj.weight",
        "trunk.blocks.{i}.attn.out.weight",
    ),
    ("h.{i}.attn.c_proj.bias", "trunk.blocks.{i}.attn.out.bias"),
    ("h.{i}.ln_2.weight", "trunk.blocks.{i}.norm_mlp.gamma"),
    ("h.{i}.ln_2.bias", "trunk.blocks.{i}.norm_mlp.beta"),
    ("h.{i}.mlp.c_fc.weight", "trunk.blocks.{i}.mlp.fc.weight"),
    ("h.{i}.mlp.c_fc.bias", "trunk.blocks.{i}.mlp.fc.bias"),
    (
        "h.{i}.mlp.c_proj.weight",
        "trunk.blocks.{i}.mlp.proj.weight",
    ),
    ("h.{i}.mlp.c_proj.bias", "trunk.blocks.{i}.mlp.proj.bias"),
    ("ln_f.weight", "trunk.norm_f.gamma"),
    ("ln_f.bias", "trunk.norm_f.beta"),
];

/// The GPT-2 name of a [`TransformerLm`] parameter path (the path itself if none maps).
pub fn gpt2_key(path: &str) -> String {
    GPT2_KEYS
        .iter()
        .find_map(|(gpt2, ours)| {
            let index = match_template(ours, path)?;
            Some(gpt2.replace("{i}", &index))
        })
        .unwrap_or_else(|| path.to_string())
}

/// If `path` matches `template` (dot-separated, `{i}` standing for a number), the number
/// (empty when the template has none).
fn match_template(template: &str, path: &str) -> Option<String> {
    let (t, p): (Vec<&str>, Vec<&str>) = (template.split('.').collect(), path.split('.').collect());
    if t.len() != p.len() {
        return None;
    }
    let mut index = String::new();
    for (a, b) in t.iter().zip(&p) {
        if *a == "{i}" && !b.is_empty() && b.bytes().all(|c| c.is_ascii_digit()) {
            index = b.to_string();
        } else if a != b {
            return None;
        }
    }
    Some(index)
}

/// Imports GPT-2 weights from a safetensors file into a model of architecture `config`
/// (learned positions, pre-norm and tied embeddings are required; build it with
/// [`TransformerConfig::gpt2`]). Errors name the GPT-2 key that is missing or has the
/// wrong shape.
pub fn import_gpt2<B: Backend>(
    path: &Path,
    config: &TransformerConfig,
    device: &B::Device,
) -> Result<TransformerLm<B>, CheckpointError> {
    if config.positions != Positions::Learned || !config.pre_norm || !config.tie_embeddings {
        return Err(GoodhartError::invalid(
            "config",
            "GPT-2 has learned positions, pre-norm and tied embeddings",
        )
        .into());
    }
    if !path.is_file() {
        return Err(file_error(path, "no such file"));
    }
    let mut store = SafetensorsStore::from_file(path)
        .validate(false)
        .allow_partial(true);
    for (gpt2, ours) in GPT2_KEYS {
        let from = format!(
            r"^(?:transformer\.)?{}$",
            gpt2.replace('.', r"\.").replace("{i}", r"(\d+)")
        );
        store = store.with_key_remapping(from, ours.replace("{i}", "${1}"));
    }
    let mut model = config.init(device)?;
    let result = model
        .load_from(&mut store)
        .map_err(|e| file_error(path, e))?;
    if let Some(e) = result.errors.first() {
        return Err(match e {
            ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => CheckpointError::WrongShape {
                key: gpt2_key(path),
                expected: expected.to_vec(),
                got: found.to_vec(),
            },
            ApplyError::DTypeMismatch { path, .. }
            | ApplyError::AdapterError { path, .. }
            | ApplyError::LoadError { path, .. } => CheckpointError::BadTensor {
                key: gpt2_key(path),
                reason: e.to_string(),
            },
        });
    }
    if let Some((missing, _)) = result.missing.first() {
        return Err(CheckpointError::MissingKey {
            key: gpt2_key(missing),
        });
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transformer::tests::{floats, ints, tiny};
    use burn::tensor::{Int, Tensor};
    use goodhart_core::testing::{assert_close, tolerance, values};
    use rand::RngExt as _;
    use safetensors::{tensor::TensorView, Dtype};

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "goodhart-policy-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
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

    /// GPT-2 tensors for `V = 7, D = 8, 1 layer, 2 heads, 6 positions`, drawn at random.
    fn gpt2_tensors() -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = goodhart_core::seed::rng(3, "gpt2-test");
        let mut t = |name: &str, shape: Vec<usize>, centre: f32| {
            let n = shape.iter().product();
            let v = (0..n).map(|_| centre + rng.random::<f32>() - 0.5).collect();
            (name.to_string(), shape, v)
        };
        let (v, d) = (7, 8);
        vec![
            t("wte.weight", vec![v, d], 0.0),
            t("wpe.weight", vec![6, d], 0.0),
            t("h.0.ln_1.weight", vec![d], 1.0),
            t("h.0.ln_1.bias", vec![d], 0.0),
            t("h.0.attn.c_attn.weight", vec![d, 3 * d], 0.0),
            t("h.0.attn.c_attn.bias", vec![3 * d], 0.0),
            t("h.0.attn.c_proj.weight", vec![d, d], 0.0),
            t("h.0.attn.c_proj.bias", vec![d], 0.0),
            t("h.0.ln_2.weight", vec![d], 1.0),
            t("h.0.ln_2.bias", vec![d], 0.0),
            t("h.0.mlp.c_fc.weight", vec![d, 4 * d], 0.0),
            t("h.0.mlp.c_fc.bias", vec![4 * d], 0.0),
            t("h.0.mlp.c_proj.weight", vec![4 * d, d], 0.0),
            t("h.0.mlp.c_proj.bias", vec![d], 0.0),
            t("ln_f.weight", vec![d], 1.0),
            t("ln_f.bias", vec![d], 0.0),
            // Buffers a Hugging Face checkpoint also holds; the import ignores them.
            t("h.0.attn.bias", vec![1, 1, 6, 6], 0.0),
        ]
    }

    fn write(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], prefix: &str) {
        let bytes: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let views = tensors.iter().zip(&bytes).map(|((name, shape, _), b)| {
            (
                format!("{prefix}{name}"),
                TensorView::new(Dtype::F32, shape.clone(), b).unwrap(),
            )
        });
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    /// GPT-2's forward pass written out on the host in f64, straight from the tensors.
    fn gpt2_reference(w: &BTreeMap<String, Vec<f32>>, tokens: &[usize]) -> Vec<f32> {
        let (v, d, h) = (7, 8, 2);
        let dh = d / h;
        let g = |k: &str| -> Vec<f64> { w[k].iter().map(|&x| f64::from(x)).collect() };
        let ln = |x: &[f64], wt: &[f64], b: &[f64]| -> Vec<f64> {
            let m = x.iter().sum::<f64>() / d as f64;
            let var = x.iter().map(|a| (a - m).powi(2)).sum::<f64>() / d as f64;
            (0..d)
                .map(|i| (x[i] - m) / (var + 1e-5).sqrt() * wt[i] + b[i])
                .collect()
        };
        // y = x W + b with W stored [in, out] (Conv1D).
        let mm = |x: &[f64], wt: &[f64], b: &[f64], out: usize| -> Vec<f64> {
            (0..out)
                .map(|o| {
                    b[o] + x
                        .iter()
                        .enumerate()
                        .map(|(i, a)| a * wt[i * out + o])
                        .sum::<f64>()
                })
                .collect()
        };
        let gelu = |x: f64| {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
        };
        let (wte, wpe) = (g("wte.weight"), g("wpe.weight"));
        let mut x: Vec<Vec<f64>> = tokens
            .iter()
            .enumerate()
            .map(|(t, &id)| (0..d).map(|i| wte[id * d + i] + wpe[t * d + i]).collect())
            .collect();
        let a: Vec<Vec<f64>> = x
            .iter()
            .map(|r| ln(r, &g("h.0.ln_1.weight"), &g("h.0.ln_1.bias")))
            .collect();
        let qkv: Vec<Vec<f64>> = a
            .iter()
            .map(|r| {
                mm(
                    r,
                    &g("h.0.attn.c_attn.weight"),
                    &g("h.0.attn.c_attn.bias"),
                    3 * d,
                )
            })
            .collect();
        let mut o = vec![vec![0.0; d]; tokens.len()];
        for head in 0..h {
            for i in 0..tokens.len() {
                let q = &qkv[i][head * dh..(head + 1) * dh];
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        q.iter()
                            .zip(&qkv[j][d + head * dh..d + (head + 1) * dh])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (dh as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = s.iter().map(|a| (a - mx).exp()).sum();
                for (j, sj) in s.iter().enumerate() {
                    for c in 0..dh {
                        o[i][head * dh + c] += (sj - mx).exp() / z * qkv[j][2 * d + head * dh + c];
                    }
                }
            }
        }
        for (xi, oi) in x.iter_mut().zip(&o) {
            let p = mm(
                oi,
                &g("h.0.attn.c_proj.weight"),
                &g("h.0.attn.c_proj.bias"),
                d,
            );
            xi.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            let m = ln(xi, &g("h.0.ln_2.weight"), &g("h.0.ln_2.bias"));
            let f: Vec<f64> = mm(
                &m,
                &g("h.0.mlp.c_fc.weight"),
                &g("h.0.mlp.c_fc.bias"),
                4 * d,
            )
            .into_iter()
            .map(gelu)
            .collect();
            let p = mm(
                &f,
                &g("h.0.mlp.c_proj.weight"),
                &g("h.0.mlp.c_proj.bias"),
                d,
            );
            xi.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        let wte = &wte;
        x.iter()
            .flat_map(|r| {
                let y = ln(r, &g("ln_f.weight"), &g("ln_f.bias"));
                (0..v)
                    .map(move |t| (0..d).map(|i| y[i] * wte[t * d + i]).sum::<f64>() as f32)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    goodhart_core::backend_test! {
        fn gpt2_import_matches_a_direct_computation<B>(device) {
            let dir = temp_dir("gpt2");
            let tensors = gpt2_tensors();
            let weights: BTreeMap<String, Vec<f32>> = tensors.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
            let cfg = TransformerConfig::gpt2(7, 8, 1, 2, 6);
            let tokens = [3usize, 0, 6, 2, 5];
            let expected = gpt2_reference(&weights, &tokens);
            for prefix in ["", "transformer."] {
                let path = dir.join(format!("{prefix}model.safetensors"));
                write(&path, &tensors, prefix);
                let model = import_gpt2::<B>(&path, &cfg, device).unwrap();
                let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
                let logits = model
                    .forward(Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, 5]), floats::<B>(&[&[1.0; 5]], device))
                    .unwrap();
                assert_close(&values(logits), &expected, tolerance(1e-4));
            }
        }
    }

    goodhart_core::backend_test! {
        fn gpt2_import_names_the_bad_key<B>(device) {
            let dir = temp_dir("gpt2bad");
            let cfg = TransformerConfig::gpt2(7, 8, 1, 2, 6);
            let mut tensors = gpt2_tensors();
            tensors.retain(|(n, _, _)| n != "h.0.mlp.c_fc.bias");
            let path = dir.join("missing.safetensors");
            write(&path, &tensors, "transformer.");
            let err = import_gpt2::<B>(&path, &cfg, device).unwrap_err();
            assert_eq!(err, CheckpointError::MissingKey { key: "h.0.mlp.c_fc.bias".into() });

            let mut tensors = gpt2_tensors();
            tensors[0] = ("wte.weight".into(), vec![8, 8], vec![0.0; 64]);
            let path = dir.join("shape.safetensors");
            write(&path, &tensors, "");
            let err = import_gpt2::<B>(&path, &cfg, device).unwrap_err();
            assert_eq!(err, CheckpointError::WrongShape { key: "wte.weight".into(), expected: vec![7, 8], got: vec![8, 8] });
            assert!(err.to_string().contains("`wte.weight`"));

            let rotary = cfg.clone().with_positions(Positions::Rotary);
            assert!(matches!(import_gpt2::<B>(&path, &rotary, device), Err(CheckpointError::Config(_))));
            assert!(matches!(import_gpt2::<B>(&dir.join("none"), &cfg, device), Err(CheckpointError::File { .. })));
        }
    }

    #[test]
    fn gpt2_keys_invert() {
        assert_eq!(
            gpt2_key("trunk.blocks.11.attn.qkv.weight"),
            "h.11.attn.c_attn.weight"
        );
        assert_eq!(gpt2_key("trunk.norm_f.beta"), "ln_f.bias");
        assert_eq!(gpt2_key("head.proj.weight"), "head.proj.weight");
        assert_eq!(
            gpt2_key("trunk.blocks.x.attn.qkv.weight"),
            "trunk.blocks.x.attn.qkv.weight"
        );
    }
}
