//! A config's largest allocations, estimated before any work, so that an absurd size
//! (`rl.group_size = 1e9`, `language.words = 1e6`) is refused with the key that drives it
//! instead of aborting on allocation minutes into a run.
//!
//! Each term is one buffer family, in bytes, from the shapes the code allocates: the
//! language's transition tables (`topics x words x (words + 1)` f64), an RL step's logits
//! and activations (rows x length x vocabulary, rows x length x width x layers, rows x heads
//! x length^2 x layers, f32, times the copies the forward and backward passes keep), an SFT
//! batch and the SFT corpus, the preference pairs, a tomato rollout (environments x
//! horizon x observation), and the rubric lab's rubrics and evaluation samples. The copy factors are upper-end guesses (a logits tensor lives as
//! logits, log-softmax, entropy terms and their gradients): the estimate is for refusing
//! what cannot fit, not for planning to the byte.

use crate::{
    config::{ConfigError, ExperimentConfig},
    sft::PROMPT_LEN,
};

/// One buffer family of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Term {
    /// The key that sets its size, as written in the file.
    pub key: String,
    /// What it is.
    pub what: &'static str,
    /// Estimated bytes.
    pub bytes: f64,
}

const F32: f64 = 4.0;
const F64: f64 = 8.0;
const I64: f64 = 8.0;
/// Copies of a logits-sized tensor an autodiff step keeps (logits, log-softmax, entropy
/// terms, their gradients).
const LOGIT_COPIES: f64 = 8.0;
/// Activation tensors per layer of width `d` in a forward and backward pass.
const ACTIVATIONS_PER_LAYER: f64 = 16.0;
/// Attention-score tensors per layer (scores, softmax, their gradients).
const ATTENTION_COPIES: f64 = 4.0;

/// Every term of `config` (before any work; sizes as `usize` products saturate in `f64`).
pub fn estimate(config: &ExperimentConfig) -> Vec<Term> {
    let mut terms = Vec::new();
    let mut add = |key: &str, what: &'static str, bytes: f64| {
        terms.push(Term {
            key: key.into(),
            what,
            bytes,
        })
    };
    let lm = config.overopt.is_some()
        || config.mitigations.is_some()
        || config.detector_corpus.is_some();
    if lm {
        let l = &config.language;
        let (topics, words) = (l.topics as f64, l.words as f64);
        add(
            "language.words",
            "the language's transition tables",
            topics * (words + 1.0) * (words + 1.0) * F64,
        );
        let vocab = goodhart_envs::language::NUM_SPECIAL as f64 + topics + words;
        model_terms(config, vocab, PROMPT_LEN as f64, &mut add);
        let pairs = config
            .overopt
            .iter()
            .flat_map(|o| o.pairs.iter().copied())
            .chain(config.mitigations.iter().map(|m| m.pairs))
            .chain(
                config
                    .detector_corpus
                    .iter()
                    .flat_map(|c| c.settings.iter().map(|s| s.pairs)),
            )
            .max()
            .unwrap_or(0);
        let key = if config
            .overopt
            .as_ref()
            .is_some_and(|o| o.pairs.contains(&pairs))
        {
            "overopt.pairs"
        } else if config
            .mitigations
            .as_ref()
            .is_some_and(|m| m.pairs == pairs)
        {
            "mitigations.pairs"
        } else {
            "detector_corpus.settings.pairs"
        };
        let p = &config.proxy;
        add(
            key,
            "the preference pairs (tokens and masks)",
            pairs as f64 * 2.0 * p.max_seq_len as f64 * (I64 + 2.0 * F32),
        );
    }
    if let Some(r) = &config.rubric {
        let w = &r.world;
        let (prompts, criteria) = (w.prompts as f64, w.criteria as f64);
        add(
            "rubric.world.prompts",
            "the rubrics and the rubric-conditioned contexts",
            prompts * criteria * (32.0 + 3.0 * I64),
        );
        let vocab = goodhart_envs::rubric::NUM_SPECIAL as f64
            + prompts
            + w.topics as f64
            + w.concepts as f64;
        let prompt_len = 4.0 + 3.0 * criteria;
        model_terms(config, vocab, prompt_len, &mut add);
        // An evaluation samples and scores without autodiff: logits and their
        // log-softmax.
        let len = prompt_len + config.rl.max_new_tokens as f64;
        for (key, per_prompt) in [
            ("rubric.eval_samples", r.eval_samples),
            ("rubric.gap_samples", r.gap_samples),
        ] {
            add(
                key,
                "an evaluation's samples and their logits",
                prompts * per_prompt as f64 * len * (vocab * 2.0 + 16.0) * F32,
            );
        }
    }
    if let Some(m) = &config.multiturn {
        let w = &m.world;
        let vocab =
            goodhart_envs::multihop::NUM_SPECIAL as f64 + w.entities as f64 + w.relations as f64;
        add(
            "multiturn.world.entities",
            "the knowledge base",
            w.entities as f64 * w.relations as f64 * I64,
        );
        let context = w.max_hops as f64 + 3.0;
        model_terms(config, vocab, context, &mut add);
        // An evaluation plays episodes without autodiff: logits and their log-softmax
        // over each round's transcripts.
        let len = context + w.max_turns as f64 * (w.max_turn_tokens as f64 + 2.0);
        add(
            "multiturn.eval_episodes",
            "an evaluation's episodes and their logits",
            w.questions as f64 * m.eval_episodes as f64 * len * (vocab * 2.0 + 16.0) * F32,
        );
    }
    if let Some(t) = &config.tomato {
        let obs = goodhart_envs::tomato::Board::parse(&t.env.board)
            .map(|b| b.obs_dim())
            .unwrap_or(0) as f64;
        let horizon = t.env.horizon as f64;
        for (key, ppo) in [("tomato.base.envs", &t.base), ("tomato.ppo.envs", &t.ppo)] {
            let width = ppo.hidden.iter().copied().max().unwrap_or(1) as f64;
            add(
                key,
                "a PPO rollout and its minibatch activations",
                ppo.envs as f64 * horizon * (obs + width * ACTIVATIONS_PER_LAYER + 16.0) * F32,
            );
        }
    }
    terms
}

/// The terms of the policy's training: an RL step's logits, activations and attention
/// scores (prompts of `prompt_len` tokens), an SFT step and the SFT corpus.
fn model_terms(
    config: &ExperimentConfig,
    vocab: f64,
    prompt_len: f64,
    add: &mut dyn FnMut(&str, &'static str, f64),
) {
    let rl = &config.rl;
    let rounds = rl.dynamic_sampling.as_ref().map_or(1, |d| d.max_batches) as f64;
    let rows = (rl.prompts_per_step as f64) * (rl.group_size as f64) * rounds;
    let len = prompt_len + rl.max_new_tokens as f64;
    let key = if rl.group_size >= rl.prompts_per_step {
        "rl.group_size"
    } else {
        "rl.prompts_per_step"
    };
    let s = &config.sft;
    let (d, layers, heads) = (s.d_model as f64, s.layers as f64, s.heads as f64);
    add(
        key,
        "an RL step's logits, activations and attention scores",
        rows * len * vocab * F32 * LOGIT_COPIES
            + rows * len * d * layers * F32 * ACTIVATIONS_PER_LAYER
            + rows * heads * len * len * layers * F32 * ATTENTION_COPIES,
    );
    let sft_len = s.max_seq_len as f64;
    add(
        "sft.batch",
        "an SFT step's logits and activations",
        s.batch as f64
            * sft_len
            * (vocab * F32 * LOGIT_COPIES + d * layers * F32 * ACTIVATIONS_PER_LAYER),
    );
    add(
        "sft.examples",
        "the SFT corpus (tokens and masks)",
        (s.examples + s.heldout) as f64 * sft_len * (I64 + 2.0 * F32),
    );
}

/// Errors when a term exceeds `limit` bytes, at the key of the largest one.
pub fn check(config: &ExperimentConfig, limit: f64) -> Result<(), ConfigError> {
    let terms = estimate(config);
    let Some(worst) = terms.iter().max_by(|a, b| a.bytes.total_cmp(&b.bytes)) else {
        return Ok(());
    };
    if worst.bytes > limit {
        return Err(ConfigError::invalid(
            &worst.key,
            format!(
                "{} would need about {}, over the limit of {} (when the file is parsed: this \
                 machine's memory; for a run: `--max-memory`, by default 3/4 of it)",
                worst.what,
                human(worst.bytes),
                human(limit)
            ),
        ));
    }
    Ok(())
}

/// This machine's memory in bytes (`MemTotal` of `/proc/meminfo`), or 64 GiB where that
/// cannot be read. `ExperimentConfig::validate` refuses any term above it.
pub fn machine_memory() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(64.0 * GIB, |kib| kib * 1024.0)
}

/// The limit a new run is held to by default: three quarters of [`machine_memory`].
pub fn default_limit() -> f64 {
    0.75 * machine_memory()
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

/// Bytes as `12.3 GiB` (or MiB under a GiB).
pub fn human(bytes: f64) -> String {
    if bytes >= GIB {
        format!("{:.1} GiB", bytes / GIB)
    } else {
        format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The key an absurd size is refused at: when the file is parsed (over the machine's
    /// memory), or else by the check against 8 GiB.
    fn refused(sets: &[&str]) -> String {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let result = ExperimentConfig::parse(crate::presets::preset("lab").unwrap(), &sets)
            .and_then(|c| check(&c, 8.0 * GIB));
        match result {
            Err(ConfigError::Invalid { path, .. }) => path,
            other => panic!("{sets:?}: {other:?}"),
        }
    }

    #[test]
    fn absurd_sizes_are_refused_at_their_key() {
        // The lab preset fits in well under 8 GiB.
        let lab = ExperimentConfig::parse(crate::presets::preset("lab").unwrap(), &[]).unwrap();
        check(&lab, 8.0 * GIB).unwrap();
        let worst = estimate(&lab)
            .into_iter()
            .map(|t| t.bytes)
            .fold(0.0, f64::max);
        assert!(worst < 1.0 * GIB, "{}", human(worst));
        // The sizes the issue reports aborting on allocation.
        assert_eq!(refused(&["rl.group_size=1000000000"]), "rl.group_size");
        assert_eq!(refused(&["sft.examples=1000000000"]), "sft.examples");
        assert_eq!(
            refused(&["tomato.base.envs=1000000000"]),
            "tomato.base.envs"
        );
        assert_eq!(refused(&["language.words=1000000"]), "language.words");
        let rubric = |sets: &[&str]| {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            match ExperimentConfig::parse(crate::presets::preset("rubric").unwrap(), &sets)
                .and_then(|c| check(&c, 8.0 * GIB))
            {
                Err(ConfigError::Invalid { path, .. }) => path,
                other => panic!("{sets:?}: {other:?}"),
            }
        };
        assert_eq!(
            rubric(&["rubric.eval_samples=1000000000"]),
            "rubric.eval_samples"
        );
        assert_eq!(rubric(&["rl.group_size=1000000000"]), "rl.group_size");
        let preset =
            ExperimentConfig::parse(crate::presets::preset("rubric").unwrap(), &[]).unwrap();
        check(&preset, 1.0 * GIB).unwrap();
    }

    #[test]
    fn the_language_term_by_hand() {
        let c = ExperimentConfig::parse(
            "name = \"t\"\n[overopt]\n[language]\ntopics = 2\nwords = 9\n",
            &[],
        )
        .unwrap();
        let t = estimate(&c);
        // 2 topics x 10 x 10 f64 = 1600 bytes.
        assert_eq!(t[0].key, "language.words");
        assert_eq!(t[0].bytes, 1600.0);
        assert_eq!(human(1.5 * GIB), "1.5 GiB");
    }
}
