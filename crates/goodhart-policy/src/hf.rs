//! Hugging Face model directories: `config.json` and safetensors weights into a
//! [`TransformerLm`].
//!
//! The families (by `config.json`'s `architectures`):
//!
//! | architecture | norm | MLP | attention | positions |
//! |---|---|---|---|---|
//! | `GPT2LMHeadModel` | LayerNorm | GELU (tanh) | fused `c_attn`, biases | learned |
//! | `LlamaForCausalLM` (Llama 2/3.x, SmolLM2) | RMSNorm | SwiGLU | GQA, `attention_bias` | RoPE, `rope_scaling` (`linear`, `llama3`) |
//! | `MistralForCausalLM` | RMSNorm | SwiGLU | GQA, `sliding_window` | RoPE |
//! | `Qwen2ForCausalLM` (Qwen2, Qwen2.5) | RMSNorm | SwiGLU | GQA, q/k/v biases | RoPE |
//! | `Qwen3ForCausalLM` | RMSNorm | SwiGLU | GQA, q/k RMSNorm, `head_dim` | RoPE |
//!
//! [`HfConfig::parse`] reads both spellings transformers has written: `rope_theta` and
//! `rope_scaling` at the top level (4.x) or inside `rope_parameters` (5.x), `torch_dtype`
//! or `dtype`. A value the decoder cannot reproduce (another architecture, activation or
//! rope type, a per-layer sliding window) is refused with the key named, never
//! approximated.
//!
//! [`load`] reads `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`, converting f32, bf16, f16 and f64 tensors to f32 (the
//! backend's float type), and maps the tensors onto the decoder's fused layout:
//! `q_proj`, `k_proj`, `v_proj` into one `[D, (H + 2 H_kv) d_head]` projection (query
//! heads reordered as [`crate::transformer::Attention`] documents), `gate_proj` and
//! `up_proj` into one `[D, 2M]` projection, and every `[out, in]` weight transposed to
//! burn's `[in, out]` (GPT-2's `Conv1D` weights are `[in, out]` already). A missing
//! tensor, one of the wrong shape or dtype, and one the model has no place for are errors
//! naming the file and the tensor. `generation_config.json`, when present, adds its EOS
//! ids to `config.json`'s.
//!
//! Reward models: `LlamaForSequenceClassification`, `MistralForSequenceClassification`,
//! `Qwen2ForSequenceClassification` and `Qwen3ForSequenceClassification` with one label
//! are the same decoders with a `score` head `[1, D]` instead of `lm_head`;
//! [`load_reward_model`] reads the trunk and that head ([`load`] refuses them, and
//! [`load_reward_model`] a causal LM).
//!
//! [`save`] writes a model back as a directory transformers loads: the `config.json` it
//! was read from (dtype float32), `generation_config.json` with its BOS and EOS ids,
//! `model.safetensors` in f32 with Hugging Face's names and layouts (the inverse of the
//! mapping above), and the source directory's tokenizer files.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use burn::{
    module::Param,
    nn::Linear,
    tensor::{backend::Backend, bf16, f16, Tensor, TensorData},
};
use safetensors::{Dtype, SafeTensors};
use serde_json::{Map, Value};

use crate::{
    checkpoint::CheckpointError,
    transformer::{Norm, RopeScaling, TransformerConfig, TransformerLm},
};

/// A decoder family goodhart loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `GPT2LMHeadModel`.
    Gpt2,
    /// `LlamaForCausalLM` (Llama 2, Llama 3.x, SmolLM2).
    Llama,
    /// `MistralForCausalLM`.
    Mistral,
    /// `Qwen2ForCausalLM` (Qwen2, Qwen2.5).
    Qwen2,
    /// `Qwen3ForCausalLM`.
    Qwen3,
}

impl Family {
    /// Every family, with its `architectures` name.
    pub const ALL: [(&'static str, Family); 5] = [
        ("GPT2LMHeadModel", Family::Gpt2),
        ("LlamaForCausalLM", Family::Llama),
        ("MistralForCausalLM", Family::Mistral),
        ("Qwen2ForCausalLM", Family::Qwen2),
        ("Qwen3ForCausalLM", Family::Qwen3),
    ];

    /// The sequence-classification (reward model) architectures, with their family.
    pub const REWARD_MODELS: [(&'static str, Family); 4] = [
        ("LlamaForSequenceClassification", Family::Llama),
        ("MistralForSequenceClassification", Family::Mistral),
        ("Qwen2ForSequenceClassification", Family::Qwen2),
        ("Qwen3ForSequenceClassification", Family::Qwen3),
    ];
}

/// What a model directory's `config.json` (and `generation_config.json`) say.
#[derive(Debug, Clone)]
pub struct HfConfig {
    /// The family.
    pub family: Family,
    /// The decoder that reproduces it.
    pub model: TransformerConfig,
    /// The stored dtype (`torch_dtype` / `dtype`), if given.
    pub dtype: Option<String>,
    /// Beginning-of-sequence id, if given.
    pub bos_token_id: Option<u32>,
    /// Every end-of-sequence id of `config.json` and `generation_config.json`, in order.
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if given.
    pub pad_token_id: Option<u32>,
    /// For a sequence-classification architecture, its number of labels (`num_labels`,
    /// or the length of `id2label`; transformers' default 2); `None` for a causal LM.
    pub num_labels: Option<usize>,
    /// `config.json` as read; [`save`] writes it back (with `dtype` float32).
    pub raw: Map<String, Value>,
    /// The directory it was read from, if any: [`save`] copies its tokenizer files.
    pub dir: Option<PathBuf>,
}

/// `config.json`'s fields, read with the file named in every error.
struct Fields<'a> {
    map: &'a Map<String, Value>,
    file: &'a Path,
}

impl Fields<'_> {
    fn error(&self, key: &str, reason: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::File {
            path: self.file.to_path_buf(),
            reason: format!("`{key}`: {reason}"),
        }
    }

    /// The first of `keys` present and not null.
    fn find<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        keys.iter()
            .find_map(|k| self.map.get(*k).filter(|v| !v.is_null()).map(|v| (*k, v)))
    }

    fn usize_opt(&self, keys: &[&str]) -> Result<Option<usize>, CheckpointError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.error(k, format!("{v} is not a non-negative integer"))),
        }
    }

    fn usize(&self, keys: &[&str]) -> Result<usize, CheckpointError> {
        self.usize_opt(keys)?
            .ok_or_else(|| self.error(keys[0], "is missing"))
    }

    fn f64_opt(&self, keys: &[&str]) -> Result<Option<f64>, CheckpointError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(k, format!("{v} is not a number"))),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, CheckpointError> {
        match self.find(&[key]) {
            None => Ok(default),
            Some((k, v)) => v
                .as_bool()
                .ok_or_else(|| self.error(k, format!("{v} is not a boolean"))),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>, CheckpointError> {
        match self.find(&[key]) {
            None => Ok(None),
            Some((k, v)) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(k, format!("{v} is not a string"))),
        }
    }

    /// Token ids under `key`: one integer or a list of them.
    fn ids(&self, key: &str) -> Result<Vec<u32>, CheckpointError> {
        let bad = |v: &Value| self.error(key, format!("{v} is not a token id or a list of them"));
        match self.find(&[key]) {
            None => Ok(Vec::new()),
            Some((_, Value::Array(items))) => items
                .iter()
                .map(|v| v.as_u64().map(|n| n as u32).ok_or_else(|| bad(v)))
                .collect(),
            Some((_, v)) => Ok(vec![v.as_u64().ok_or_else(|| bad(v))? as u32]),
        }
    }
}

impl HfConfig {
    /// The id to pad with: `pad_token_id`, else the first EOS id, else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id
            .or(self.eos_token_ids.first().copied())
            .unwrap_or(0)
    }

    /// Why this is not a one-label sequence classifier (a reward model), if it is not.
    pub fn reward_model_check(&self) -> Result<(), String> {
        match self.num_labels {
            Some(1) => Ok(()),
            Some(n) => Err(format!("`num_labels` is {n}: a reward model has one label")),
            None => Err("a causal LM, not a sequence-classification (reward) model".into()),
        }
    }

    /// Reads `dir/config.json` and, when present, `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self, CheckpointError> {
        let path = dir.join("config.json");
        let mut config = Self::parse(&read_text(&path)?, &path)?;
        config.dir = Some(dir.to_path_buf());
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let map = json_object(&read_text(&gen_path)?, &gen_path)?;
            let fields = Fields {
                map: &map,
                file: &gen_path,
            };
            for id in fields.ids("eos_token_id")? {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
        }
        Ok(config)
    }

    /// Parses the text of a `config.json` (`file` names it in errors).
    pub fn parse(text: &str, file: &Path) -> Result<Self, CheckpointError> {
        let map = json_object(text, file)?;
        let f = Fields { map: &map, file };
        let (family, classifier) = family(&f)?;
        let model = match family {
            Family::Gpt2 => gpt2_config(&f)?,
            _ => llama_config(&f, family)?,
        };
        model
            .validate()
            .map_err(|e| f.error("config", format!("does not describe a model: {e}")))?;
        let dtype = f
            .str_opt("dtype")?
            .or(f.str_opt("torch_dtype")?)
            .map(str::to_string);
        let id = |key: &str| -> Result<Option<u32>, CheckpointError> {
            Ok(f.ids(key)?.first().copied())
        };
        let num_labels = if classifier {
            Some(
                match (f.usize_opt(&["num_labels"])?, f.find(&["id2label"])) {
                    (Some(n), _) => n,
                    (None, Some((_, Value::Object(labels)))) => labels.len(),
                    (None, _) => 2,
                },
            )
        } else {
            None
        };
        Ok(Self {
            family,
            model,
            dtype,
            bos_token_id: id("bos_token_id")?,
            eos_token_ids: f.ids("eos_token_id")?,
            pad_token_id: id("pad_token_id")?,
            num_labels,
            raw: map.clone(),
            dir: None,
        })
    }
}

/// The text of `path`.
fn read_text(path: &Path) -> Result<String, CheckpointError> {
    std::fs::read_to_string(path).map_err(|e| CheckpointError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// `text` as a JSON object (`path` names it in errors).
fn json_object(text: &str, path: &Path) -> Result<Map<String, Value>, CheckpointError> {
    let error = |reason: String| CheckpointError::File {
        path: path.to_path_buf(),
        reason,
    };
    match serde_json::from_str(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(error("not a JSON object".into())),
        Err(e) => Err(error(format!("not JSON: {e}"))),
    }
}

/// The family of `architectures`, and whether it is a sequence classifier.
fn family(f: &Fields) -> Result<(Family, bool), CheckpointError> {
    let known = || {
        Family::ALL
            .iter()
            .chain(&Family::REWARD_MODELS)
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let arch = match f.find(&["architectures"]) {
        Some((_, Value::Array(a))) => a.first().and_then(Value::as_str).map(str::to_string),
        Some((k, v)) => return Err(f.error(k, format!("{v} is not a list of names"))),
        None => None,
    };
    let arch = arch.ok_or_else(|| f.error("architectures", "is missing or empty"))?;
    let find = |list: &[(&str, Family)]| list.iter().find(|(n, _)| *n == arch).map(|(_, f)| *f);
    find(&Family::ALL)
        .map(|fam| (fam, false))
        .or_else(|| find(&Family::REWARD_MODELS).map(|fam| (fam, true)))
        .ok_or_else(|| {
            f.error(
                "architectures",
                format!("`{arch}` is not supported; goodhart loads {}", known()),
            )
        })
}

fn gpt2_config(f: &Fields) -> Result<TransformerConfig, CheckpointError> {
    let d = f.usize(&["n_embd", "hidden_size"])?;
    let activation = f.str_opt("activation_function")?.unwrap_or("gelu_new");
    let gelu_tanh = match activation {
        "gelu_new" | "gelu_pytorch_tanh" => true,
        "gelu" => false,
        other => {
            return Err(f.error(
                "activation_function",
                format!("`{other}` is not supported (gelu_new, gelu_pytorch_tanh, gelu)"),
            ))
        }
    };
    for (key, value, default) in [
        ("scale_attn_weights", true, true),
        ("scale_attn_by_inverse_layer_idx", false, false),
    ] {
        if f.bool_or(key, default)? != value {
            return Err(f.error(key, format!("only {value} is supported")));
        }
    }
    Ok(TransformerConfig::gpt2(
        f.usize(&["vocab_size"])?,
        d,
        f.usize(&["n_layer", "num_hidden_layers"])?,
        f.usize(&["n_head", "num_attention_heads"])?,
        f.usize(&["n_positions", "n_ctx", "max_position_embeddings"])?,
    )
    .with_intermediate_size(Some(f.usize_opt(&["n_inner"])?.unwrap_or(4 * d)))
    .with_layer_norm_eps(f.f64_opt(&["layer_norm_epsilon"])?.unwrap_or(1e-5))
    .with_gelu_tanh(gelu_tanh)
    .with_tie_embeddings(f.bool_or("tie_word_embeddings", true)?))
}

fn llama_config(f: &Fields, family: Family) -> Result<TransformerConfig, CheckpointError> {
    if let Some(act) = f.str_opt("hidden_act")? {
        if act != "silu" {
            return Err(f.error("hidden_act", format!("`{act}` is not supported (silu)")));
        }
    }
    let heads = f.usize(&["num_attention_heads"])?;
    let d = f.usize(&["hidden_size"])?;
    // The rotary parameters: `rope_parameters` (transformers 5) or top-level
    // `rope_theta` / `rope_scaling` (4.x).
    let rope = match f.find(&["rope_parameters"]) {
        Some((_, Value::Object(m))) => Some(("rope_parameters", m)),
        Some((k, v)) => return Err(f.error(k, format!("{v} is not an object"))),
        None => None,
    };
    let theta = match rope {
        Some((_, m)) => m.get("rope_theta").and_then(Value::as_f64),
        None => None,
    }
    .or(f.f64_opt(&["rope_theta"])?)
    .unwrap_or(10000.0);
    let scaling_map = match rope {
        Some(r) => Some(r),
        None => match f.find(&["rope_scaling"]) {
            Some((_, Value::Object(m))) => Some(("rope_scaling", m)),
            Some((k, v)) => return Err(f.error(k, format!("{v} is not an object"))),
            None => None,
        },
    };
    let scaling = match scaling_map {
        None => None,
        Some((key, m)) => rope_scaling(f, key, m)?,
    };
    // A sliding window on some layers only (Qwen2's `use_sliding_window` with
    // `max_window_layers`, or mixed `layer_types`) is not one decoder.
    if let Some((k, Value::Array(types))) = f.find(&["layer_types"]) {
        if types.iter().any(|t| t.as_str() != Some("full_attention")) {
            return Err(f.error(k, "layers other than `full_attention` are not supported"));
        }
    }
    let window = match family {
        Family::Mistral => f.usize_opt(&["sliding_window"])?,
        _ => {
            if f.bool_or("use_sliding_window", false)? {
                return Err(f.error("use_sliding_window", "only false is supported"));
            }
            None
        }
    };
    let attention_bias = f.bool_or("attention_bias", false)?;
    let (qkv_bias, out_bias) = match family {
        Family::Qwen2 => (true, false),
        _ => (attention_bias, attention_bias),
    };
    Ok(TransformerConfig::llama(
        f.usize(&["vocab_size"])?,
        d,
        f.usize(&["num_hidden_layers"])?,
        heads,
        f.usize_opt(&["num_key_value_heads"])?.unwrap_or(heads),
        f.usize(&["intermediate_size"])?,
        f.usize(&["max_position_embeddings"])?,
    )
    .with_head_dim(Some(
        f.usize_opt(&["head_dim"])?.unwrap_or(d / heads.max(1)),
    ))
    .with_layer_norm_eps(f.f64_opt(&["rms_norm_eps"])?.unwrap_or(1e-6))
    .with_rope_theta(theta)
    .with_rope_scaling(scaling)
    .with_sliding_window(window)
    .with_qkv_bias(qkv_bias)
    .with_out_bias(out_bias)
    .with_mlp_bias(family == Family::Llama && f.bool_or("mlp_bias", false)?)
    .with_qk_norm(family == Family::Qwen3)
    .with_tie_embeddings(f.bool_or("tie_word_embeddings", false)?))
}

fn rope_scaling(
    f: &Fields,
    key: &str,
    m: &Map<String, Value>,
) -> Result<Option<RopeScaling>, CheckpointError> {
    let kind = m
        .get("rope_type")
        .or(m.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |name: &str| {
        m.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| f.error(&format!("{key}.{name}"), "is missing or not a number"))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => {
            return Err(f.error(
                &format!("{key}.rope_type"),
                format!("`{other}` is not supported (default, linear, llama3)"),
            ))
        }
    })
}

/// The tensors of a model directory, converted to f32, each with the file it came from.
struct Weights {
    tensors: BTreeMap<String, (PathBuf, Vec<usize>, Vec<f32>)>,
    /// The file a missing tensor is reported against.
    source: PathBuf,
}

fn tensor_error(file: &Path, key: &str, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Tensor {
        file: file.to_path_buf(),
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl Weights {
    /// Reads `model.safetensors`, or every shard `model.safetensors.index.json` lists.
    fn read(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let file_error = |path: &Path, reason: String| CheckpointError::File {
            path: path.to_path_buf(),
            reason,
        };
        let (files, source, map): (Vec<PathBuf>, PathBuf, Option<BTreeMap<String, PathBuf>>) =
            if index.exists() {
                let value = json_object(&read_text(&index)?, &index)?;
                let map = value
                    .get("weight_map")
                    .and_then(Value::as_object)
                    .ok_or_else(|| file_error(&index, "`weight_map` is missing".into()))?;
                let mut weight_map = BTreeMap::new();
                for (name, file) in map {
                    let file = file.as_str().ok_or_else(|| {
                        file_error(&index, format!("`weight_map.{name}` is not a file name"))
                    })?;
                    if file.contains('/') || file.contains('\\') || file.starts_with('.') {
                        return Err(file_error(
                            &index,
                            format!(
                                "`weight_map.{name}`: `{file}` is not a file of this directory"
                            ),
                        ));
                    }
                    weight_map.insert(name.clone(), dir.join(file));
                }
                let mut files: Vec<PathBuf> = weight_map.values().cloned().collect();
                files.sort();
                files.dedup();
                (files, index.clone(), Some(weight_map))
            } else if single.exists() {
                (vec![single.clone()], single.clone(), None)
            } else {
                return Err(file_error(
                    dir,
                    "holds neither model.safetensors nor model.safetensors.index.json".into(),
                ));
            };
        let mut tensors = BTreeMap::new();
        for file in &files {
            let bytes = std::fs::read(file).map_err(|e| file_error(file, e.to_string()))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| file_error(file, format!("not a safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let values = to_f32(view.dtype(), view.data())
                    .map_err(|reason| tensor_error(file, &name, reason))?;
                tensors.insert(name, (file.clone(), view.shape().to_vec(), values));
            }
        }
        if let Some(map) = map {
            for (name, file) in map {
                match tensors.get(&name) {
                    Some((found, _, _)) if *found == file => {}
                    _ => {
                        return Err(tensor_error(
                            &file,
                            &name,
                            "is listed in model.safetensors.index.json but not in this file",
                        ))
                    }
                }
            }
        }
        Ok(Self { tensors, source })
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Removes tensor `name`, which must have `shape`.
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, CheckpointError> {
        let (file, got, values) = self
            .tensors
            .remove(name)
            .ok_or_else(|| tensor_error(&self.source, name, "is missing"))?;
        if got != shape {
            return Err(tensor_error(
                &file,
                name,
                format!("has shape {got:?}; the config needs {shape:?}"),
            ));
        }
        Ok(values)
    }

    /// Errors on a tensor no parameter took, unless `ignored` says it is a buffer.
    fn finish(self, ignored: impl Fn(&str) -> bool) -> Result<(), CheckpointError> {
        match self.tensors.iter().find(|(name, _)| !ignored(name)) {
            None => Ok(()),
            Some((name, (file, _, _))) => Err(tensor_error(
                file,
                name,
                "has no place in the model the config describes",
            )),
        }
    }
}

/// Little-endian `bytes` of `dtype` as f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let words = |n: usize| bytes.chunks_exact(n);
    Ok(match dtype {
        Dtype::F32 => words(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => words(2)
            .map(|b| bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F16 => words(2)
            .map(|b| f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        Dtype::F64 => words(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(format!(
                "dtype {other:?} is not a float type goodhart loads"
            ))
        }
    })
}

/// `[rows, cols]` row-major to `[cols, rows]`.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

/// Hugging Face `q_proj`, `k_proj`, `v_proj` weights (`[out, D]`, or biases with `d = 1`)
/// as the fused `[D, (H + 2 H_kv) d_head]` projection: query head `k G + j` of Hugging Face
/// goes to column block `j H_kv + k`.
fn fuse_qkv(q: &[f32], k: &[f32], v: &[f32], heads: (usize, usize, usize), d: usize) -> Vec<f32> {
    let (h, kv, dh) = heads;
    let g = h / kv;
    let cols = (h + 2 * kv) * dh;
    let mut out = vec![0.0; d * cols];
    let mut put = |src: &[f32], src_row: usize, col: usize| {
        for i in 0..d {
            out[i * cols + col] = src[src_row * d + i];
        }
    };
    for kvi in 0..kv {
        for j in 0..g {
            for e in 0..dh {
                put(q, (kvi * g + j) * dh + e, (j * kv + kvi) * dh + e);
            }
        }
    }
    for r in 0..kv * dh {
        put(k, r, h * dh + r);
        put(v, r, (h + kv) * dh + r);
    }
    out
}

fn tensor<B: Backend, const D: usize>(
    values: Vec<f32>,
    shape: [usize; D],
    device: &B::Device,
) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

fn set_linear<B: Backend>(
    linear: &mut Linear<B>,
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    device: &B::Device,
) {
    let [i, o] = linear.weight.dims();
    linear.weight = tensor(weight, [i, o], device);
    linear.bias = bias.map(|b| tensor(b, [o], device));
}

fn set_norm<B: Backend>(
    norm: &mut Norm<B>,
    gamma: Vec<f32>,
    beta: Option<Vec<f32>>,
    device: &B::Device,
) {
    let [d] = norm.gamma.dims();
    norm.gamma = tensor(gamma, [d], device);
    norm.beta = beta.map(|b| tensor(b, [d], device));
}

/// Loads the model in `dir` (see the module docs) onto `device`.
pub fn load<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(TransformerLm<B>, HfConfig), CheckpointError> {
    let config = HfConfig::from_dir(dir)?;
    if config.num_labels.is_some() {
        return Err(CheckpointError::File {
            path: dir.join("config.json"),
            reason: "`architectures`: a sequence-classification (reward) model, not a causal \
                     LM: load it as a reward model (`kind = \"hf_reward_model\"`)"
                .into(),
        });
    }
    let mut weights = Weights::read(dir)?;
    let mut model = config
        .model
        .init_with::<B>(burn::nn::Initializer::Zeros, device)?;
    match config.family {
        Family::Gpt2 => load_gpt2(&mut model, &config.model, &mut weights, device)?,
        _ => load_llama(&mut model, &config.model, &mut weights, device)?,
    }
    let tied = config.model.tie_embeddings;
    weights.finish(|name| {
        name.ends_with(".attn.bias")
            || name.ends_with(".attn.masked_bias")
            || name.ends_with("rotary_emb.inv_freq")
            || (tied && name == "lm_head.weight")
    })?;
    Ok((model, config))
}

/// Loads the one-label sequence-classification model in `dir` onto `device`: its decoder
/// (the trunk; no LM head) and its `score.weight` `[1, D]`, as `D` values.
pub fn load_reward_model<B: Backend>(
    dir: &Path,
    device: &B::Device,
) -> Result<(TransformerLm<B>, Vec<f32>, HfConfig), CheckpointError> {
    let config = HfConfig::from_dir(dir)?;
    let file_error = |reason: String| CheckpointError::File {
        path: dir.join("config.json"),
        reason,
    };
    config.reward_model_check().map_err(file_error)?;
    let mut weights = Weights::read(dir)?;
    // The decoder without an LM head: the config's embeddings tied, so none is built.
    let mut decoder = config.model.clone();
    decoder.tie_embeddings = true;
    let mut model = decoder.init_with::<B>(burn::nn::Initializer::Zeros, device)?;
    load_llama(&mut model, &decoder, &mut weights, device)?;
    let score = weights.take("score.weight", &[1, decoder.d_model])?;
    weights.finish(|name| name.ends_with("rotary_emb.inv_freq"))?;
    Ok((model, score, config))
}

fn load_gpt2<B: Backend>(
    model: &mut TransformerLm<B>,
    cfg: &TransformerConfig,
    w: &mut Weights,
    device: &B::Device,
) -> Result<(), CheckpointError> {
    let p = if w.has("transformer.wte.weight") {
        "transformer."
    } else {
        ""
    };
    let (v, d) = (cfg.vocab_size, cfg.d_model);
    let trunk = &mut model.trunk;
    trunk.tok_emb.weight = tensor(w.take(&format!("{p}wte.weight"), &[v, d])?, [v, d], device);
    let n = cfg.max_seq_len;
    if let Some(pe) = trunk.pos_emb.as_mut() {
        pe.weight = tensor(w.take(&format!("{p}wpe.weight"), &[n, d])?, [n, d], device);
    }
    // LayerNorm `weight` and `bias` into the norm the config built.
    let norm = |w: &mut Weights, norm: &mut Norm<B>, name: String| -> Result<(), CheckpointError> {
        let gamma = w.take(&format!("{name}.weight"), &[d])?;
        let beta = w.take(&format!("{name}.bias"), &[d])?;
        set_norm(norm, gamma, Some(beta), device);
        Ok(())
    };
    for (i, block) in trunk.blocks.iter_mut().enumerate() {
        let b = format!("{p}h.{i}.");
        norm(w, &mut block.norm_attn, format!("{b}ln_1"))?;
        norm(w, &mut block.norm_mlp, format!("{b}ln_2"))?;
        let conv = |w: &mut Weights, linear: &mut Linear<B>, name: &str| {
            let [i, o] = linear.weight.dims();
            let weight = w.take(&format!("{b}{name}.weight"), &[i, o])?;
            let bias = w.take(&format!("{b}{name}.bias"), &[o])?;
            set_linear(linear, weight, Some(bias), device);
            Ok::<_, CheckpointError>(())
        };
        conv(w, &mut block.attn.qkv, "attn.c_attn")?;
        conv(w, &mut block.attn.out, "attn.c_proj")?;
        conv(w, &mut block.mlp.fc, "mlp.c_fc")?;
        conv(w, &mut block.mlp.proj, "mlp.c_proj")?;
    }
    norm(w, &mut trunk.norm_f, format!("{p}ln_f"))?;
    if let Some(proj) = model.head.proj.as_mut() {
        let weight = w.take("lm_head.weight", &[v, d])?;
        set_linear(proj, transpose(&weight, v, d), None, device);
    }
    Ok(())
}

fn load_llama<B: Backend>(
    model: &mut TransformerLm<B>,
    cfg: &TransformerConfig,
    w: &mut Weights,
    device: &B::Device,
) -> Result<(), CheckpointError> {
    let (v, d, m) = (cfg.vocab_size, cfg.d_model, cfg.mlp_width());
    let (h, kv, dh) = (cfg.n_heads, cfg.kv_heads(), cfg.d_head());
    // RMSNorm `weight` into the norm the config built.
    let rms = |w: &mut Weights, norm: &mut Norm<B>, name: &str| -> Result<(), CheckpointError> {
        let [n] = norm.gamma.dims();
        set_norm(norm, w.take(name, &[n])?, None, device);
        Ok(())
    };
    let trunk = &mut model.trunk;
    trunk.tok_emb.weight = tensor(
        w.take("model.embed_tokens.weight", &[v, d])?,
        [v, d],
        device,
    );
    for (i, block) in trunk.blocks.iter_mut().enumerate() {
        let b = format!("model.layers.{i}.");
        rms(
            w,
            &mut block.norm_attn,
            &format!("{b}input_layernorm.weight"),
        )?;
        rms(
            w,
            &mut block.norm_mlp,
            &format!("{b}post_attention_layernorm.weight"),
        )?;
        let a = format!("{b}self_attn.");
        let q = w.take(&format!("{a}q_proj.weight"), &[h * dh, d])?;
        let k = w.take(&format!("{a}k_proj.weight"), &[kv * dh, d])?;
        let vv = w.take(&format!("{a}v_proj.weight"), &[kv * dh, d])?;
        let bias = if cfg.qkv_bias {
            let q = w.take(&format!("{a}q_proj.bias"), &[h * dh])?;
            let k = w.take(&format!("{a}k_proj.bias"), &[kv * dh])?;
            let vv = w.take(&format!("{a}v_proj.bias"), &[kv * dh])?;
            Some(fuse_qkv(&q, &k, &vv, (h, kv, dh), 1))
        } else {
            None
        };
        set_linear(
            &mut block.attn.qkv,
            fuse_qkv(&q, &k, &vv, (h, kv, dh), d),
            bias,
            device,
        );
        let o = w.take(&format!("{a}o_proj.weight"), &[d, h * dh])?;
        let o_bias = if cfg.out_bias {
            Some(w.take(&format!("{a}o_proj.bias"), &[d])?)
        } else {
            None
        };
        set_linear(
            &mut block.attn.out,
            transpose(&o, d, h * dh),
            o_bias,
            device,
        );
        if let Some(q_norm) = block.attn.q_norm.as_mut() {
            rms(w, q_norm, &format!("{a}q_norm.weight"))?;
        }
        if let Some(k_norm) = block.attn.k_norm.as_mut() {
            rms(w, k_norm, &format!("{a}k_norm.weight"))?;
        }
        let mp = format!("{b}mlp.");
        let gate = w.take(&format!("{mp}gate_proj.weight"), &[m, d])?;
        let up = w.take(&format!("{mp}up_proj.weight"), &[m, d])?;
        let down = w.take(&format!("{mp}down_proj.weight"), &[d, m])?;
        // [gate | up] as one [D, 2M] projection: the rows of [gate; up], transposed.
        let gate_up = transpose(&[gate, up].concat(), 2 * m, d);
        let (gate_up_bias, down_bias) = if cfg.mlp_bias {
            let gb = w.take(&format!("{mp}gate_proj.bias"), &[m])?;
            let ub = w.take(&format!("{mp}up_proj.bias"), &[m])?;
            (
                Some([gb, ub].concat()),
                Some(w.take(&format!("{mp}down_proj.bias"), &[d])?),
            )
        } else {
            (None, None)
        };
        set_linear(&mut block.mlp.fc, gate_up, gate_up_bias, device);
        set_linear(
            &mut block.mlp.proj,
            transpose(&down, d, m),
            down_bias,
            device,
        );
    }
    rms(w, &mut trunk.norm_f, "model.norm.weight")?;
    if let Some(proj) = model.head.proj.as_mut() {
        let weight = w.take("lm_head.weight", &[v, d])?;
        set_linear(proj, transpose(&weight, v, d), None, device);
    }
    Ok(())
}

/// The tokenizer files [`save`] copies from the source directory when it has them.
pub const TOKENIZER_FILES: [&str; 7] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// Host values of a parameter.
fn host<B: Backend, const D: usize>(p: &Param<Tensor<B, D>>) -> Result<Vec<f32>, CheckpointError> {
    Ok(goodhart_core::ops::to_host(p.val())?)
}

/// The inverse of [`fuse_qkv`]: `(q, k, v)` as Hugging Face `[out, d]` rows.
fn unfuse_qkv(
    fused: &[f32],
    heads: (usize, usize, usize),
    d: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (h, kv, dh) = heads;
    let g = h / kv;
    let cols = (h + 2 * kv) * dh;
    let column = |col: usize| (0..d).map(move |i| fused[i * cols + col]);
    let mut q = vec![0.0; h * dh * d];
    for kvi in 0..kv {
        for j in 0..g {
            for e in 0..dh {
                let row = (kvi * g + j) * dh + e;
                for (i, x) in column((j * kv + kvi) * dh + e).enumerate() {
                    q[row * d + i] = x;
                }
            }
        }
    }
    let rows = |start: usize| -> Vec<f32> {
        (0..kv * dh)
            .flat_map(|r| column(start + r).collect::<Vec<_>>())
            .collect()
    };
    (q, rows(h * dh), rows((h + kv) * dh))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let partial = path.with_extension("partial");
    let error = |e: std::io::Error| CheckpointError::File {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    std::fs::write(&partial, bytes).map_err(error)?;
    std::fs::rename(&partial, path).map_err(error)
}

/// Writes `model` to directory `dir` as a Hugging Face model directory of `config`'s
/// family (see the module docs).
pub fn save<B: Backend>(
    model: &TransformerLm<B>,
    config: &HfConfig,
    dir: &Path,
) -> Result<(), CheckpointError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    match config.family {
        Family::Gpt2 => export_gpt2(model, &mut tensors)?,
        _ => export_llama(model, &config.model, &mut tensors)?,
    }
    std::fs::create_dir_all(dir).map_err(|e| CheckpointError::File {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), b)
                .map(|view| (name.clone(), view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CheckpointError::File {
            path: dir.join("model.safetensors"),
            reason: e.to_string(),
        })?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let st = safetensors::serialize(views, metadata).map_err(|e| CheckpointError::File {
        path: dir.join("model.safetensors"),
        reason: e.to_string(),
    })?;
    write_file(&dir.join("model.safetensors"), &st)?;
    let mut raw = config.raw.clone();
    raw.remove("torch_dtype");
    raw.insert("dtype".into(), "float32".into());
    let json = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialise");
    write_file(
        &dir.join("config.json"),
        json(&Value::Object(raw)).as_bytes(),
    )?;
    let mut generation = Map::new();
    if let Some(bos) = config.bos_token_id {
        generation.insert("bos_token_id".into(), bos.into());
    }
    generation.insert(
        "eos_token_id".into(),
        match config.eos_token_ids.as_slice() {
            [one] => (*one).into(),
            ids => ids.to_vec().into(),
        },
    );
    write_file(
        &dir.join("generation_config.json"),
        json(&Value::Object(generation)).as_bytes(),
    )?;
    if let Some(source) = config.dir.as_deref().filter(|s| *s != dir) {
        for name in TOKENIZER_FILES {
            let from = source.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(|e| CheckpointError::File {
                    path: from.clone(),
                    reason: e.to_string(),
                })?;
            }
        }
    }
    Ok(())
}

fn export_gpt2<B: Backend>(
    model: &TransformerLm<B>,
    out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<(), CheckpointError> {
    let trunk = &model.trunk;
    let mut put2 = |name: String, p: &Param<Tensor<B, 2>>| {
        host(p).map(|values| out.push((name, p.dims().to_vec(), values)))
    };
    put2("transformer.wte.weight".into(), &trunk.tok_emb.weight)?;
    if let Some(pe) = &trunk.pos_emb {
        put2("transformer.wpe.weight".into(), &pe.weight)?;
    }
    // GPT-2's Conv1D weights are `[in, out]`, burn's layout.
    let mut vectors: Vec<(String, &Param<Tensor<B, 1>>)> = Vec::new();
    for (i, block) in trunk.blocks.iter().enumerate() {
        let b = format!("transformer.h.{i}.");
        for (name, linear) in [
            ("attn.c_attn", &block.attn.qkv),
            ("attn.c_proj", &block.attn.out),
            ("mlp.c_fc", &block.mlp.fc),
            ("mlp.c_proj", &block.mlp.proj),
        ] {
            put2(format!("{b}{name}.weight"), &linear.weight)?;
            vectors.extend(linear.bias.iter().map(|p| (format!("{b}{name}.bias"), p)));
        }
        for (name, norm) in [("ln_1", &block.norm_attn), ("ln_2", &block.norm_mlp)] {
            vectors.push((format!("{b}{name}.weight"), &norm.gamma));
            vectors.extend(norm.beta.iter().map(|p| (format!("{b}{name}.bias"), p)));
        }
    }
    vectors.push(("transformer.ln_f.weight".into(), &trunk.norm_f.gamma));
    vectors.extend(
        trunk
            .norm_f
            .beta
            .iter()
            .map(|p| ("transformer.ln_f.bias".into(), p)),
    );
    for (name, p) in vectors {
        out.push((name, p.dims().to_vec(), host(p)?));
    }
    if let Some(proj) = &model.head.proj {
        let [d, v] = proj.weight.dims();
        out.push((
            "lm_head.weight".into(),
            vec![v, d],
            transpose(&host(&proj.weight)?, d, v),
        ));
    }
    Ok(())
}

fn export_llama<B: Backend>(
    model: &TransformerLm<B>,
    cfg: &TransformerConfig,
    out: &mut Vec<(String, Vec<usize>, Vec<f32>)>,
) -> Result<(), CheckpointError> {
    let (d, m) = (cfg.d_model, cfg.mlp_width());
    let heads = (cfg.n_heads, cfg.kv_heads(), cfg.d_head());
    let (h, kv, dh) = heads;
    let trunk = &model.trunk;
    let [v, _] = trunk.tok_emb.weight.dims();
    out.push((
        "model.embed_tokens.weight".into(),
        vec![v, d],
        host(&trunk.tok_emb.weight)?,
    ));
    // `[in, out]` burn weight as a Hugging Face `[out, in]` one.
    let hf_linear = |w: &Param<Tensor<B, 2>>| -> Result<Vec<f32>, CheckpointError> {
        let [i, o] = w.dims();
        Ok(transpose(&host(w)?, i, o))
    };
    for (i, block) in trunk.blocks.iter().enumerate() {
        let b = format!("model.layers.{i}.");
        let a = format!("{b}self_attn.");
        out.push((
            format!("{b}input_layernorm.weight"),
            vec![d],
            host(&block.norm_attn.gamma)?,
        ));
        out.push((
            format!("{b}post_attention_layernorm.weight"),
            vec![d],
            host(&block.norm_mlp.gamma)?,
        ));
        let (q, k, vv) = unfuse_qkv(&host(&block.attn.qkv.weight)?, heads, d);
        out.push((format!("{a}q_proj.weight"), vec![h * dh, d], q));
        out.push((format!("{a}k_proj.weight"), vec![kv * dh, d], k));
        out.push((format!("{a}v_proj.weight"), vec![kv * dh, d], vv));
        if let Some(bias) = &block.attn.qkv.bias {
            let (q, k, vv) = unfuse_qkv(&host(bias)?, heads, 1);
            out.push((format!("{a}q_proj.bias"), vec![h * dh], q));
            out.push((format!("{a}k_proj.bias"), vec![kv * dh], k));
            out.push((format!("{a}v_proj.bias"), vec![kv * dh], vv));
        }
        out.push((
            format!("{a}o_proj.weight"),
            vec![d, h * dh],
            hf_linear(&block.attn.out.weight)?,
        ));
        if let Some(bias) = &block.attn.out.bias {
            out.push((format!("{a}o_proj.bias"), vec![d], host(bias)?));
        }
        for (name, norm) in [
            ("q_norm", &block.attn.q_norm),
            ("k_norm", &block.attn.k_norm),
        ] {
            if let Some(norm) = norm {
                out.push((format!("{a}{name}.weight"), vec![dh], host(&norm.gamma)?));
            }
        }
        let mp = format!("{b}mlp.");
        let gate_up = hf_linear(&block.mlp.fc.weight)?; // [2M, D]: gate rows, then up rows
        out.push((
            format!("{mp}gate_proj.weight"),
            vec![m, d],
            gate_up[..m * d].to_vec(),
        ));
        out.push((
            format!("{mp}up_proj.weight"),
            vec![m, d],
            gate_up[m * d..].to_vec(),
        ));
        out.push((
            format!("{mp}down_proj.weight"),
            vec![d, m],
            hf_linear(&block.mlp.proj.weight)?,
        ));
        if let (Some(fc), Some(proj)) = (&block.mlp.fc.bias, &block.mlp.proj.bias) {
            let fc = host(fc)?;
            out.push((format!("{mp}gate_proj.bias"), vec![m], fc[..m].to_vec()));
            out.push((format!("{mp}up_proj.bias"), vec![m], fc[m..].to_vec()));
            out.push((format!("{mp}down_proj.bias"), vec![d], host(proj)?));
        }
    }
    out.push((
        "model.norm.weight".into(),
        vec![d],
        host(&trunk.norm_f.gamma)?,
    ));
    if let Some(proj) = &model.head.proj {
        out.push((
            "lm_head.weight".into(),
            vec![v, d],
            hf_linear(&proj.weight)?,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Int;
    use goodhart_core::testing::{assert_close, tolerance, values};
    use rand::RngExt as _;
    use safetensors::tensor::TensorView;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/hf")
            .join(name)
    }

    fn reference_json(name: &str) -> Value {
        let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn ids_of(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    #[test]
    fn tokenizers_and_chat_templates_match_transformers() {
        use crate::{tokenizer::Tokenizer as _, ChatMessage, HfTokenizer};
        for name in FAMILIES {
            let r = reference_json(name);
            let tok = HfTokenizer::from_dir(&fixture(name)).unwrap();
            let text = r["text"].as_str().unwrap();
            assert_eq!(tok.encode(text).unwrap(), ids_of(&r["text_ids"]), "{name}");
            assert_eq!(tok.decode(&ids_of(&r["text_ids"])).unwrap(), text, "{name}");
            let Some(messages) = r.get("messages") else {
                assert!(tok.chat_template().is_none(), "{name}");
                continue;
            };
            let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
            for (key, generation) in [("chat", false), ("chat_generation", true)] {
                let (text, ids) = tok
                    .apply_chat_template(&messages, generation, &Default::default())
                    .unwrap();
                assert_eq!(text, r[key]["text"].as_str().unwrap(), "{name} {key}");
                assert_eq!(ids, ids_of(&r[key]["ids"]), "{name} {key}");
            }
        }
        // Mistral's template refuses roles that do not alternate, with its own message.
        let tok = HfTokenizer::from_dir(&fixture("mistral")).unwrap();
        let twice = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
        let e = tok
            .apply_chat_template(&twice, false, &Default::default())
            .unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
        // Qwen3's reasoning switch, an extra variable of the render.
        let tok = HfTokenizer::from_dir(&fixture("qwen3")).unwrap();
        let extra = serde_json::json!({"enable_thinking": false});
        let (text, _) = tok
            .apply_chat_template(&twice, true, extra.as_object().unwrap())
            .unwrap();
        assert!(
            text.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
            "{text:?}"
        );
        // GPT-2 has no template.
        let tok = HfTokenizer::from_dir(&fixture("gpt2")).unwrap();
        assert!(tok
            .apply_chat_template(&twice, false, &Default::default())
            .is_err());
    }

    /// transformers' logits for the fixture's `input_ids`.
    fn reference(name: &str) -> (Vec<Vec<i64>>, Vec<f32>) {
        let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let ids = v["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_i64().unwrap())
                    .collect()
            })
            .collect();
        let logits = v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        (ids, logits)
    }

    const FAMILIES: [&str; 7] = [
        "gpt2",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "smollm2",
        "llama-bf16-sharded",
    ];

    goodhart_core::backend_test! {
        fn every_family_matches_transformers_logits<B>(device) {
            for name in FAMILIES {
                let (model, config) = load::<B>(&fixture(name), device)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let (ids, expected) = reference(name);
                let rows: Vec<&[i64]> = ids.iter().map(|r| r.as_slice()).collect();
                let tokens = crate::transformer::tests::ints::<B>(&rows, device);
                let [b, t] = tokens.dims();
                let mask = Tensor::ones([b, t], device);
                let logits = model.forward(tokens, mask).unwrap();
                assert_eq!(logits.dims(), [b, t, config.model.vocab_size], "{name}");
                let got = values(logits);
                let worst = got
                    .iter()
                    .zip(&expected)
                    .map(|(a, e)| (a - e).abs())
                    .fold(0.0f32, f32::max);
                assert!(worst <= tolerance(1e-4), "{name}: largest difference {worst}");
                let mut eos = config.eos_token_ids.clone();
                eos.sort();
                assert_eq!(eos, ids_of(&reference_json(name)["eos_token_ids"]), "{name}");
            }
        }
    }

    goodhart_core::backend_test! {
        fn the_cache_gives_the_same_logits<B>(device) {
            for name in ["llama", "mistral", "qwen3"] {
                let (model, _) = load::<B>(&fixture(name), device).unwrap();
                let seq: &[i64] = &[1, 5, 17, 33, 2, 90];
                let plain = model
                    .forward(
                        crate::transformer::tests::ints::<B>(&[seq], device),
                        Tensor::ones([1, 6], device),
                    )
                    .unwrap();
                let mut cache = crate::KvCache::new(2, 6);
                let steps: Vec<Tensor<B, 3>> = seq
                    .iter()
                    .map(|&id| {
                        model
                            .forward_cached(
                                crate::transformer::tests::ints::<B>(&[&[id]], device),
                                Tensor::ones([1, 1], device),
                                &mut cache,
                            )
                            .unwrap()
                    })
                    .collect();
                assert_close(&values(Tensor::cat(steps, 1)), &values(plain), tolerance(1e-5));
            }
        }
    }

    /// A copy of fixture `name` with `edit` applied to its `config.json`.
    fn edited(
        name: &str,
        tag: &str,
        edit: impl Fn(&mut Map<String, Value>),
    ) -> crate::checkpoint::tests::TempDir {
        let dir = crate::checkpoint::tests::temp_dir(&format!("hf-{name}-{tag}"));
        for entry in std::fs::read_dir(fixture(name)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        let path = dir.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        edit(config.as_object_mut().unwrap());
        std::fs::write(&path, serde_json::to_string(&config).unwrap()).unwrap();
        dir
    }

    fn logits<B: Backend>(dir: &Path, device: &B::Device) -> Vec<f32> {
        let (model, _) = load::<B>(dir, device).unwrap();
        let (ids, _) = reference("mistral");
        let rows: Vec<&[i64]> = ids.iter().map(|r| r.as_slice()).collect();
        let tokens = crate::transformer::tests::ints::<B>(&rows, device);
        let mask = Tensor::ones(tokens.dims(), device);
        values(model.forward(tokens, mask).unwrap())
    }

    goodhart_core::backend_test! {
        fn the_old_config_spellings_load_the_same_model<B>(device) {
            // transformers 4.x: `rope_theta` and `rope_scaling` at the top level,
            // `torch_dtype`, and the scaling's kind under `type`.
            let dir = edited("llama", "old", |c| {
                let mut rope = c.remove("rope_parameters").unwrap();
                let rope = rope.as_object_mut().unwrap();
                c.insert("rope_theta".into(), rope.remove("rope_theta").unwrap());
                rope.remove("rope_type");
                rope.insert("type".into(), "llama3".into());
                c.insert("rope_scaling".into(), Value::Object(rope.clone()));
                let dtype = c.remove("dtype").unwrap();
                c.insert("torch_dtype".into(), dtype);
            });
            let old = HfConfig::from_dir(&dir).unwrap();
            let new = HfConfig::from_dir(&fixture("llama")).unwrap();
            assert_eq!(format!("{:?}", old.model), format!("{:?}", new.model));
            assert_eq!(old.dtype.as_deref(), Some("float32"));
            assert_eq!(
                new.model.rope_scaling,
                Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 16,
                })
            );
            // Without the scaling the logits change: the fixture's frequencies are in the
            // scaled band.
            let plain = edited("llama", "plain", |c| {
                c["rope_parameters"]["rope_type"] = "default".into();
            });
            let (a, b) = (logits::<B>(&fixture("llama"), device), logits::<B>(&plain, device));
            let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            assert!(diff > 1e-2, "rope scaling made no difference ({diff})");
        }
    }

    goodhart_core::backend_test! {
        fn the_sliding_window_hides_keys_four_back<B>(device) {
            // Window 4: query i sees keys i-3..=i, so the first 4 positions are as without
            // a window and every later one differs.
            let full = edited("mistral", "full", |c| {
                c.insert("sliding_window".into(), Value::Null);
            });
            let (windowed, unwindowed) = (logits::<B>(&fixture("mistral"), device), logits::<B>(&full, device));
            let v = windowed.len() / 18;
            for row in 0..2 {
                for t in 0..9 {
                    let at = |x: &[f32]| x[(row * 9 + t) * v..(row * 9 + t + 1) * v].to_vec();
                    let diff = at(&windowed)
                        .iter()
                        .zip(at(&unwindowed))
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0f32, f32::max);
                    if t < 4 {
                        assert!(diff <= tolerance(1e-5), "row {row} position {t}: {diff}");
                    } else {
                        assert!(diff > 1e-3, "row {row} position {t}: {diff}");
                    }
                }
            }
        }
    }

    goodhart_core::backend_test! {
        fn bad_directories_name_the_file_and_key<B>(device) {
            let err = |dir: crate::checkpoint::tests::TempDir| load::<B>(&dir, device).map(|_| ()).unwrap_err().to_string();
            let e = err(edited("llama", "arch", |c| {
                c["architectures"] = serde_json::json!(["GemmaForCausalLM"]);
            }));
            assert!(e.contains("config.json") && e.contains("`architectures`")
                && e.contains("GemmaForCausalLM") && e.contains("Qwen3ForCausalLM"), "{e}");
            let e = err(edited("llama", "act", |c| { c["hidden_act"] = "gelu".into(); }));
            assert!(e.contains("`hidden_act`") && e.contains("gelu"), "{e}");
            let e = err(edited("llama", "yarn", |c| {
                c["rope_parameters"]["rope_type"] = "yarn".into();
            }));
            assert!(e.contains("`rope_parameters.rope_type`") && e.contains("yarn"), "{e}");
            let e = err(edited("llama", "heads", |c| { c["num_key_value_heads"] = 3.into(); }));
            assert!(e.contains("n_kv_heads") && e.contains("does not divide"), "{e}");
            // A config that disagrees with the tensors: the file, the tensor and both shapes.
            let e = err(edited("llama", "kv", |c| { c["num_key_value_heads"] = 4.into(); }));
            assert!(e.contains("model.safetensors") && e.contains("`model.layers.0.self_attn.k_proj.weight`")
                && e.contains("[16, 32]") && e.contains("[32, 32]"), "{e}");
            // Tied embeddings declared untied: the head is missing.
            let e = err(edited("qwen2", "untied", |c| { c["tie_word_embeddings"] = false.into(); }));
            assert!(e.contains("`lm_head.weight` is missing"), "{e}");
            // A tensor with no place: Qwen2's q/k/v biases under Llama.
            let e = err(edited("qwen2", "asllama", |c| {
                c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
            }));
            assert!(e.contains("self_attn.") && e.contains("_proj.bias` has no place"), "{e}");
            // A truncated file, and a shard the index lists that is not there.
            let dir = edited("llama", "cut", |_| {});
            let path = dir.join("model.safetensors");
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
            let e = err(dir);
            assert!(e.contains("model.safetensors") && e.contains("not a safetensors file"), "{e}");
            let dir = edited("llama-bf16-sharded", "shard", |_| {});
            std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
            let e = err(dir);
            assert!(e.contains("model-00002-of-00002.safetensors"), "{e}");
            let e = err(crate::checkpoint::tests::temp_dir("hf-empty"));
            assert!(e.contains("config.json"), "{e}");
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
        fn gpt2_matches_a_direct_computation<B>(device) {
            let tensors = gpt2_tensors();
            let weights: BTreeMap<String, Vec<f32>> = tensors.iter().map(|(n, _, v)| (n.clone(), v.clone())).collect();
            let tokens = [3usize, 0, 6, 2, 5];
            let expected = gpt2_reference(&weights, &tokens);
            for prefix in ["", "transformer."] {
                let dir = crate::checkpoint::tests::temp_dir(&format!("gpt2{prefix}"));
                std::fs::write(
                    dir.join("config.json"),
                    r#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 7, "n_embd": 8,
                        "n_layer": 1, "n_head": 2, "n_positions": 6}"#,
                )
                .unwrap();
                write(&dir.join("model.safetensors"), &tensors, prefix);
                let (model, _) = load::<B>(&dir, device).unwrap();
                let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
                let logits = model
                    .forward(Tensor::<B, 1, Int>::from_ints(ids.as_slice(), device).reshape([1, 5]), Tensor::ones([1, 5], device))
                    .unwrap();
                assert_close(&values(logits), &expected, tolerance(1e-4));
            }
        }
    }

    goodhart_core::backend_test! {
        fn save_then_load_gives_the_same_logits<B>(device) {
            for name in FAMILIES {
                let (model, config) = load::<B>(&fixture(name), device).unwrap();
                let dir = crate::checkpoint::tests::temp_dir(&format!("hf-save-{name}"));
                save(&model, &config, &dir).unwrap();
                let (again, config2) = load::<B>(&dir, device).unwrap();
                assert_eq!(format!("{:?}", config.model), format!("{:?}", config2.model), "{name}");
                assert_eq!(config2.dtype.as_deref(), Some("float32"));
                assert_eq!(config2.eos_token_ids, config.eos_token_ids);
                let (ids, _) = reference(name);
                let rows: Vec<&[i64]> = ids.iter().map(|r| r.as_slice()).collect();
                let tokens = crate::transformer::tests::ints::<B>(&rows, device);
                let mask = Tensor::ones(tokens.dims(), device);
                let a = values(model.forward(tokens.clone(), mask.clone()).unwrap());
                let b = values(again.forward(tokens, mask).unwrap());
                assert_eq!(a, b, "{name}");
            }
        }
    }
}
