//! Batched sampling from a [`TransformerLm`], with or without a KV cache.
//!
//! Per step, for every row: `p = softmax(logits / tau)`; the sampler keeps the `top_k`
//! most probable tokens (if `top_k > 0`), renormalises, keeps the smallest set of most
//! probable tokens whose mass reaches `top_p` (if `top_p < 1`), renormalises, and draws by
//! inverse CDF with one uniform number per row per step from the caller's stream
//! (experiments use `goodhart_core::seed::rng(seed, "sample")`). The order
//! temperature -> top-k -> top-p is Hugging Face `generate`'s and vLLM's. Greedy decoding
//! takes the most probable token and draws nothing. [`sample`] does this as tensor ops
//! on the device (only the uniform numbers go up, nothing comes back); [`pick`] is the
//! same rule for one row on the host, in f64. With an EOS id, one flag per step comes
//! back to stop when every row has ended.
//!
//! **Log-probs.** The returned log-prob of a sampled token is
//! `log softmax(logits / tau)[token]`: the temperature-`tau` policy distribution *before*
//! top-k / top-p truncation, computed by the same function as [`crate::score::score`],
//! so `score(tokens, mask, tau)` reproduces it (verl and TRL also recompute old log-probs
//! at the rollout temperature without truncation). With `tau = 1` it is the policy's own
//! log-prob.
//!
//! **Shapes and masks.** Prompts are left-padded `[B, P]` with a mask (every row needs at
//! least one real token, and its last column must be real). Generation stops after
//! `max_new_tokens` steps or when every row has emitted `eos_id` (or one of `stop_ids`); a
//! row that has emitted one (which is kept, mask 1) emits `pad_id` afterwards with mask 0
//! and log-prob 0. All
//! outputs are aligned to the full sequence `[B, P + N]` (`N <= max_new_tokens`) as a
//! [`goodhart_core::batch::RolloutBatch`] expects: the response mask is 0 on the prompt.
//!
//! Same stream state, same model, same backend: the same samples. The cached and the
//! uncached paths give the same tokens (tested); the uncached path recomputes the whole
//! prefix at every step and exists to check the cache.

use burn::{
    config::Config,
    tensor::{activation::softmax, backend::Backend, cast::ToElement, Int, Tensor, TensorData},
};
use goodhart_core::{ops::zero_masked, seed::ChaCha8Rng, GoodhartError, Result};
use rand::RngExt as _;

use crate::{
    kv_cache::KvCache,
    score::{check_temperature, logprobs_from_logits},
    transformer::TransformerLm,
};

/// Sampling settings.
///
/// Defaults: temperature 1, no top-k (0), no top-p (1.0), sampling (not greedy), no EOS,
/// pad id 0, KV cache on: the plain policy distribution, as TRL's and verl's rollout
/// defaults.
#[derive(Config, Debug)]
pub struct GenerationConfig {
    /// Most tokens to generate per row.
    pub max_new_tokens: usize,
    /// Softmax temperature `tau > 0`.
    #[config(default = 1.0)]
    pub temperature: f64,
    /// Keep only the `k` most probable tokens (0 = all).
    #[config(default = 0)]
    pub top_k: usize,
    /// Nucleus mass in `(0, 1]` (1 = off).
    #[config(default = 1.0)]
    pub top_p: f64,
    /// Take the most probable token instead of sampling.
    #[config(default = false)]
    pub greedy: bool,
    /// Token that ends a response.
    #[config(default = "None")]
    pub eos_id: Option<usize>,
    /// Further tokens that end a response, as `eos_id` does (a model's other EOS ids:
    /// Llama 3 stops at `<|end_of_text|>` and `<|eot_id|>`).
    #[config(default = "Vec::new()")]
    pub stop_ids: Vec<usize>,
    /// Token emitted after EOS.
    #[config(default = 0)]
    pub pad_id: usize,
    /// Incremental decoding with a KV cache (false recomputes every prefix).
    #[config(default = true)]
    pub use_cache: bool,
}

impl GenerationConfig {
    /// Checks the settings against a vocabulary of `vocab` tokens.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        check_temperature(self.temperature)?;
        if self.max_new_tokens == 0 {
            return Err(GoodhartError::invalid(
                "max_new_tokens",
                "must be at least 1",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(GoodhartError::invalid("top_p", "must lie in (0, 1]"));
        }
        let stops = self.stop_ids.iter().map(|&id| ("stop_ids", Some(id)));
        for (name, id) in [("pad_id", Some(self.pad_id)), ("eos_id", self.eos_id)]
            .into_iter()
            .chain(stops)
        {
            if id.is_some_and(|id| id >= vocab) {
                return Err(GoodhartError::invalid(
                    name,
                    format!("outside the vocabulary 0..{vocab}"),
                ));
            }
        }
        Ok(())
    }
}

/// Prompts followed by sampled responses, everything `[B, P + N]`.
#[derive(Debug, Clone)]
pub struct Generation<B: Backend> {
    /// Prompt tokens then response tokens (`pad_id` after EOS).
    pub tokens: Tensor<B, 2, Int>,
    /// 1 on real tokens (prompt and response up to and including EOS).
    pub attention_mask: Tensor<B, 2>,
    /// 1 on generated tokens up to and including EOS; 0 on the prompt and after EOS.
    pub response_mask: Tensor<B, 2>,
    /// Log-prob of each generated token (see the module docs); 0 where the response mask
    /// is 0.
    pub logprobs: Tensor<B, 2>,
    /// Prompt width `P`.
    pub prompt_len: usize,
    /// Number of decoding steps run, `N`.
    pub response_len: usize,
}

/// Samples up to `config.max_new_tokens` tokens after each left-padded prompt.
pub fn generate<B: Backend>(
    model: &TransformerLm<B>,
    prompt: Tensor<B, 2, Int>,
    prompt_mask: Tensor<B, 2>,
    config: &GenerationConfig,
    rng: &mut ChaCha8Rng,
) -> Result<Generation<B>> {
    let vocab = model.vocab_size();
    config.validate(vocab)?;
    let [b, p] = prompt.dims();
    if prompt_mask.dims() != [b, p] {
        return Err(GoodhartError::shape(
            "prompt_mask",
            &[b, p],
            &prompt_mask.dims(),
        ));
    }
    if b == 0 || p == 0 {
        return Err(GoodhartError::Empty {
            what: "prompt".into(),
        });
    }
    if p + config.max_new_tokens > model.trunk.max_seq_len() {
        return Err(GoodhartError::invalid(
            "max_new_tokens",
            format!(
                "prompt {p} + {} new tokens exceeds max_seq_len {}",
                config.max_new_tokens,
                model.trunk.max_seq_len()
            ),
        ));
    }
    let last: Vec<f32> = host(prompt_mask.clone().narrow(1, p - 1, 1));
    if last.contains(&0.0) {
        return Err(GoodhartError::invalid(
            "prompt_mask",
            "prompts must be left-padded with a real last token",
        ));
    }
    let device = prompt.device();
    let mut cache = KvCache::new(model.trunk.blocks.len(), p + config.max_new_tokens);
    let mut logits = if config.use_cache {
        model.forward_cached(prompt.clone(), prompt_mask.clone(), &mut cache)?
    } else {
        model.forward(prompt.clone(), prompt_mask.clone())?
    }
    .narrow(1, p - 1, 1);

    let mut tokens = prompt.clone();
    let mut mask = prompt_mask.clone();
    // 1 on rows that have emitted EOS.
    let mut finished = Tensor::<B, 2>::zeros([b, 1], &device);
    let mut step_tokens: Vec<Tensor<B, 2, Int>> = Vec::new();
    let mut step_masks: Vec<Tensor<B, 2>> = Vec::new();
    let mut step_logprobs: Vec<Tensor<B, 2>> = Vec::new();
    let stops: Vec<usize> = config
        .eos_id
        .iter()
        .chain(&config.stop_ids)
        .copied()
        .collect();
    for step in 0..config.max_new_tokens {
        let u: Vec<f32> = if config.greedy {
            vec![0.0; b]
        } else {
            (0..b).map(|_| rng.random::<f64>() as f32).collect()
        };
        let u = Tensor::<B, 2>::from_data(TensorData::new(u, [b, 1]), &device);
        let done = finished.clone().greater_elem(0.5);
        let ids = sample(logits.clone().reshape([b, vocab]), u, config)
            .mask_fill(done, config.pad_id as i64);
        let live = finished.clone().neg() + 1.0;
        let (lp, _) = logprobs_from_logits(logits, ids.clone(), config.temperature);
        step_tokens.push(ids.clone());
        step_masks.push(live.clone());
        step_logprobs.push(zero_masked(lp, &live));
        if step + 1 == config.max_new_tokens {
            break;
        }
        for &eos in &stops {
            finished = finished.max_pair(ids.clone().equal_elem(eos as i64).float());
        }
        // One read-back per step, only when rows can end.
        if !stops.is_empty() && finished.clone().min().into_scalar().to_f32() > 0.5 {
            break;
        }
        logits = if config.use_cache {
            model
                .trunk
                .forward_cached_unchecked(ids, live, &mut cache)
                .map(|h| model.logits(h))?
        } else {
            tokens = Tensor::cat(vec![tokens, ids], 1);
            mask = Tensor::cat(vec![mask, live], 1);
            let t = p + step + 1;
            model
                .forward(tokens.clone(), mask.clone())?
                .narrow(1, t - 1, 1)
        };
    }
    let n = step_tokens.len();
    let response_mask = Tensor::cat(step_masks, 1);
    Ok(Generation {
        tokens: Tensor::cat(vec![prompt, Tensor::cat(step_tokens, 1)], 1),
        attention_mask: Tensor::cat(vec![prompt_mask, response_mask.clone()], 1),
        response_mask: Tensor::cat(vec![Tensor::zeros([b, p], &device), response_mask], 1),
        logprobs: Tensor::cat(
            vec![
                Tensor::zeros([b, p], &device),
                Tensor::cat(step_logprobs, 1),
            ],
            1,
        ),
        prompt_len: p,
        response_len: n,
    })
}

/// The index that uniform draw `u in [0, 1)` selects from probabilities `probs` by
/// inverse CDF in index order (no truncation).
pub fn inverse_cdf(probs: &[f32], u: f64) -> usize {
    pick(probs, u, &GenerationConfig::new(1))
}

/// A float tensor's values on the host.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap_or_default()
}

/// The tokens `[B, 1]` that uniform draws `u [B, 1]` select from next-token logits
/// `[B, V]` under `config`, as tensor ops on the device: the same rule as [`pick`]
/// (temperature, top-k, top-p, inverse CDF), in f32.
pub fn sample<B: Backend>(
    logits: Tensor<B, 2>,
    u: Tensor<B, 2>,
    config: &GenerationConfig,
) -> Tensor<B, 2, Int> {
    let [b, v] = logits.dims();
    if config.greedy {
        return logits.argmax(1);
    }
    let probs = softmax(logits / config.temperature, 1);
    let truncate = config.top_k > 0 || config.top_p < 1.0;
    // Candidates in the order the inverse CDF walks them: vocabulary order when nothing
    // is truncated, most probable first otherwise.
    let (weights, order) = if truncate {
        let (sorted, order) = probs.sort_descending_with_indices(1);
        let device = sorted.device();
        let rank = Tensor::<B, 1, Int>::arange(0..v as i64, &device)
            .reshape([1, v])
            .expand([b, v]);
        let mut keep = if config.top_k > 0 {
            rank.lower_elem(config.top_k as i64).float()
        } else {
            Tensor::ones([b, v], &device)
        };
        if config.top_p < 1.0 {
            // Keep rank j while the renormalised mass before it is below top_p (1e-6
            // absorbs the f32 rounding of probabilities that sum to top_p exactly).
            let kept = sorted.clone() * keep.clone();
            let before = (kept.clone().cumsum(1) - kept.clone()) / kept.sum_dim(1).expand([b, v]);
            keep = keep * before.lower_elem(config.top_p - 1e-6).float();
        }
        (sorted * keep, Some(order))
    } else {
        (probs, None)
    };
    let cdf = weights.clone().cumsum(1);
    let target = u * cdf.clone().narrow(1, v - 1, 1);
    // The first index whose cumulative mass exceeds the target, or, where rounding left
    // the target past the last sum, the last index with mass.
    let passed = cdf.lower_equal(target.expand([b, v])).int().sum_dim(1);
    let index = Tensor::<B, 1, Int>::arange(0..v as i64, &weights.device()).reshape([1, v]);
    let last = (weights.greater_elem(0.0).int() * index).max_dim(1);
    let at = passed.min_pair(last);
    match order {
        Some(order) => order.gather(1, at),
        None => at,
    }
}

/// The token a row's probabilities `probs` and uniform draw `u in [0, 1)` select under
/// `config` (greedy, top-k, top-p); see the module docs.
pub fn pick(probs: &[f32], u: f64, config: &GenerationConfig) -> usize {
    if config.greedy {
        return probs
            .iter()
            .enumerate()
            .fold(0, |best, (i, &p)| if p > probs[best] { i } else { best });
    }
    let truncate = config.top_k > 0 || config.top_p < 1.0;
    // Candidates in the order the inverse CDF walks them: vocabulary order when nothing
    // is truncated, most probable first (ties: lower id first) otherwise.
    let mut order: Vec<usize> = (0..probs.len()).collect();
    if truncate {
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        if config.top_k > 0 {
            order.truncate(config.top_k);
        }
        if config.top_p < 1.0 {
            let kept: f64 = order.iter().map(|&i| f64::from(probs[i])).sum();
            let mut acc = 0.0;
            let mut keep = order.len();
            for (j, &i) in order.iter().enumerate() {
                acc += f64::from(probs[i]) / kept;
                // 1e-6 absorbs the f32 rounding of probabilities that sum to top_p exactly.
                if acc >= config.top_p - 1e-6 {
                    keep = j + 1;
                    break;
                }
            }
            order.truncate(keep);
        }
    }
    let total: f64 = order.iter().map(|&i| f64::from(probs[i])).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &i in &order {
        acc += f64::from(probs[i]);
        if target < acc {
            return i;
        }
    }
    // Rounding left `target` past the last cumulative sum: the last candidate with mass.
    order
        .iter()
        .rev()
        .copied()
        .find(|&i| probs[i] > 0.0)
        .unwrap_or(order[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        score::score,
        transformer::{
            tests::{floats, ints, tiny},
            Positions,
        },
    };
    use burn::nn::Linear;
    use goodhart_core::{
        seed::rng,
        testing::{assert_close, tolerance, values},
    };

    fn int_values<B: Backend>(t: Tensor<B, 2, Int>) -> Vec<i64> {
        t.into_data().convert::<i64>().into_vec().unwrap()
    }

    #[test]
    fn sampler_follows_the_inverse_cdf() {
        let p = [0.1f32, 0.2, 0.3, 0.4];
        let cfg = GenerationConfig::new(1);
        // Vocabulary order, cumulative 0.1, 0.3, 0.6, 1.0.
        assert_eq!(pick(&p, 0.05, &cfg), 0);
        assert_eq!(pick(&p, 0.25, &cfg), 1);
        assert_eq!(pick(&p, 0.59, &cfg), 2);
        assert_eq!(pick(&p, 0.999, &cfg), 3);
        // top-k 2 keeps {3: 0.4, 2: 0.3}, mass 0.7: u = 0.5 -> 0.35 < 0.4 -> 3; u = 0.6 -> 0.42 -> 2.
        let k2 = GenerationConfig::new(1).with_top_k(2);
        assert_eq!(pick(&p, 0.5, &k2), 3);
        assert_eq!(pick(&p, 0.6, &k2), 2);
        // top-p 0.5: sorted 0.4, then 0.4 + 0.3 = 0.7 >= 0.5 -> keeps {3, 2}.
        let p5 = GenerationConfig::new(1).with_top_p(0.5);
        assert_eq!(pick(&p, 0.6, &p5), 2);
        assert_eq!(pick(&p, 0.99, &p5), 2);
        // top-p 0.4 keeps only the mode.
        assert_eq!(pick(&p, 0.99, &GenerationConfig::new(1).with_top_p(0.4)), 3);
        // top-k 3 then top-p 0.5 on the renormalised {0.4, 0.3, 0.2}/0.9: 0.444, 0.778 -> {3, 2}.
        let kp = GenerationConfig::new(1).with_top_k(3).with_top_p(0.5);
        assert_eq!(pick(&p, 0.99, &kp), 2);
        // Greedy: the first maximum.
        let g = GenerationConfig::new(1).with_greedy(true);
        assert_eq!(pick(&p, 0.0, &g), 3);
        assert_eq!(pick(&[0.5, 0.5], 0.0, &g), 0);
        // Zero-probability tokens are never drawn, even at u -> 1.
        assert_eq!(pick(&[0.5, 0.5, 0.0], 0.999_999_9, &cfg), 1);
    }

    /// Chi-squared statistic of `counts` against probabilities `expected` (the cells
    /// with zero probability must be empty).
    fn chi_squared(counts: &[usize], expected: &[f64]) -> f64 {
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .zip(expected)
            .map(|(&c, &p)| {
                if p == 0.0 {
                    assert_eq!(c, 0, "a token of probability 0 was drawn");
                    0.0
                } else {
                    let e = p * n as f64;
                    (c as f64 - e).powi(2) / e
                }
            })
            .sum()
    }

    goodhart_core::backend_test! {
        fn device_sampler_draws_the_truncated_distribution<B>(device) {
            // p = softmax(logits) over 8 tokens = (1, 2, ..., 8) / 36; 20,000 draws each.
            let p: Vec<f64> = (1..=8).map(|i| i as f64 / 36.0).collect();
            let logits: Vec<f32> = p.iter().map(|&q| q.ln() as f32).collect();
            let n = 20_000;
            let rows = Tensor::<B, 1>::from_floats(logits.as_slice(), device)
                .reshape([1, 8])
                .expand([n, 8]);
            let mut r = rng(3, "sample");
            // (config, the distribution it must draw): plain; top-k 3 keeps {8, 7, 6}/21;
            // top-p 0.5 keeps 8, 7, 6 (mass 21/36 >= 0.5 first at the third); greedy: 7.
            let cases: Vec<(GenerationConfig, Vec<f64>)> = vec![
                (GenerationConfig::new(1), p.clone()),
                (GenerationConfig::new(1).with_top_k(3), [0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0, 8.0].map(|w| w / 21.0).to_vec()),
                (GenerationConfig::new(1).with_top_p(0.5), [0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0, 8.0].map(|w| w / 21.0).to_vec()),
            ];
            for (cfg, expected) in &cases {
                let u: Vec<f32> = (0..n).map(|_| r.random::<f64>() as f32).collect();
                let u = Tensor::<B, 2>::from_data(TensorData::new(u, [n, 1]), device);
                let ids = int_values(sample(rows.clone(), u, cfg));
                let mut counts = [0usize; 8];
                for id in ids {
                    counts[id as usize] += 1;
                }
                let df = expected.iter().filter(|&&q| q > 0.0).count() - 1;
                // Critical values of chi-squared at p = 0.001: df 7 -> 24.32, df 2 -> 13.82.
                let critical = if df == 7 { 24.32 } else { 13.82 };
                let stat = chi_squared(&counts, expected);
                assert!(stat < critical, "{cfg:?}: chi-squared {stat:.2} >= {critical} (counts {counts:?})");
            }
            let u = Tensor::<B, 2>::zeros([2, 1], device);
            let greedy = sample(rows.narrow(0, 0, 2), u, &GenerationConfig::new(1).with_greedy(true));
            assert_eq!(int_values(greedy), vec![7, 7]);
        }
    }

    goodhart_core::backend_test! {
        fn device_sampler_agrees_with_the_host_rule<B>(device) {
            // Random logits over 16 tokens at temperature 0.8, one draw per row: `sample`
            // (f32, on the device) and `pick` (f64, on the host) choose the same token
            // except where `u` falls within rounding of a cumulative boundary.
            let (n, v) = (3000, 16);
            let mut r = rng(9, "sample");
            let logits: Vec<f32> = (0..n * v).map(|_| (r.random::<f64>() * 6.0 - 3.0) as f32).collect();
            let logits = Tensor::<B, 2>::from_data(TensorData::new(logits, [n, v]), device);
            for cfg in [
                GenerationConfig::new(1).with_temperature(0.8),
                GenerationConfig::new(1).with_temperature(0.8).with_top_k(5),
                GenerationConfig::new(1).with_temperature(0.8).with_top_p(0.7),
                GenerationConfig::new(1).with_temperature(0.8).with_top_k(6).with_top_p(0.9),
            ] {
                let u: Vec<f32> = (0..n).map(|_| r.random::<f64>() as f32).collect();
                let probs = values(softmax(logits.clone() / cfg.temperature, 1));
                let ids = int_values(sample(logits.clone(), Tensor::from_data(TensorData::new(u.clone(), [n, 1]), device), &cfg));
                let differ = (0..n)
                    .filter(|&row| pick(&probs[row * v..(row + 1) * v], f64::from(u[row]), &cfg) as i64 != ids[row])
                    .count();
                assert!(differ <= 3, "{cfg:?}: {differ} of {n} draws differ from the host rule");
            }
        }
    }

    goodhart_core::backend_test! {
        fn generation_logprobs_equal_teacher_forced_scores<B>(device) {
            // ndarray: max abs diff < 1e-4 (the acceptance bound); wgpu: 1e-3 via tolerance().
            let tol = tolerance(1e-4);
            for positions in [Positions::Rotary, Positions::Learned] {
                B::seed(device, 11);
                let model = tiny(positions).init::<B>(device).unwrap();
                let prompt = ints::<B>(&[&[0, 0, 5, 6], &[1, 2, 3, 4], &[0, 7, 8, 9]], device);
                let mask = floats::<B>(&[&[0.0, 0.0, 1.0, 1.0], &[1.0; 4], &[0.0, 1.0, 1.0, 1.0]], device);
                for (temperature, top_k, top_p) in [(1.0, 0, 1.0), (0.7, 5, 0.9)] {
                    let cfg = GenerationConfig::new(12)
                        .with_temperature(temperature)
                        .with_top_k(top_k)
                        .with_top_p(top_p)
                        .with_eos_id(Some(10));
                    let g = generate(&model, prompt.clone(), mask.clone(), &cfg, &mut rng(5, "sample")).unwrap();
                    let s = score(&model, g.tokens.clone(), g.attention_mask.clone(), temperature).unwrap();
                    let teacher = values(s.logprobs * g.response_mask.clone());
                    let sampled = values(g.logprobs.clone());
                    assert_close(&sampled, &teacher, tol);
                    // Something was generated and scored: the log-probs are not all zero.
                    assert!(sampled.iter().filter(|v| **v < -1e-3).count() >= 3 * g.response_len / 2);
                }
            }
        }
    }

    goodhart_core::backend_test! {
        fn cache_and_recompute_give_the_same_tokens<B>(device) {
            for positions in [Positions::Rotary, Positions::Learned] {
                B::seed(device, 13);
                let model = tiny(positions).init::<B>(device).unwrap();
                let prompt = ints::<B>(&[&[0, 5, 6], &[1, 2, 3]], device);
                let mask = floats::<B>(&[&[0.0, 1.0, 1.0], &[1.0; 3]], device);
                let run = |use_cache: bool, seed: u64| {
                    let cfg = GenerationConfig::new(20).with_use_cache(use_cache).with_top_p(0.95);
                    let g = generate(&model, prompt.clone(), mask.clone(), &cfg, &mut rng(seed, "sample")).unwrap();
                    (int_values(g.tokens), values(g.logprobs))
                };
                let (cached, lp_cached) = run(true, 1);
                let (plain, lp_plain) = run(false, 1);
                assert_eq!(cached, plain);
                assert_close(&lp_cached, &lp_plain, tolerance(1e-5));
                // Same seed, same samples; another seed, other samples.
                assert_eq!(run(true, 1).0, cached);
                assert_ne!(run(true, 2).0, cached);
                assert_eq!(cached.len(), 2 * 23);
            }
        }
    }

    goodhart_core::backend_test! {
        fn eos_ends_a_row_with_padding<B>(device) {
            // A zero output projection makes every next-token distribution uniform over
            // V = 11 tokens: each sampled log-prob is -ln 11 = -2.3979.
            let mut model = tiny(Positions::Rotary).with_tie_embeddings(false).init::<B>(device).unwrap();
            let proj = model.head.proj.take().unwrap();
            model.head.proj = Some(Linear { weight: proj.weight.map(|w| w.zeros_like()), bias: None });
            let prompt = ints::<B>(&[&[1], &[2], &[3], &[4]], device);
            let mask = floats::<B>(&[&[1.0], &[1.0], &[1.0], &[1.0]], device);
            let cfg = GenerationConfig::new(28).with_eos_id(Some(10)).with_pad_id(0);
            let g = generate(&model, prompt, mask, &cfg, &mut rng(0, "sample")).unwrap();
            let n = g.response_len;
            let tokens = int_values(g.tokens.clone());
            let rmask = values(g.response_mask.clone());
            let amask = values(g.attention_mask.clone());
            let lps = values(g.logprobs.clone());
            let width = n + 1;
            let mut ended = 0;
            for row in 0..4 {
                assert_eq!(rmask[row * width], 0.0, "the prompt is not a response token");
                let mut done = false;
                for t in 1..width {
                    let i = row * width + t;
                    if done {
                        assert_eq!((tokens[i], rmask[i], amask[i], lps[i]), (0, 0.0, 0.0, 0.0));
                    } else {
                        assert_eq!((rmask[i], amask[i]), (1.0, 1.0));
                        assert_close(&[lps[i]], &[-(11f32).ln()], tolerance(1e-5));
                        done = tokens[i] == 10;
                    }
                }
                ended += usize::from(done);
            }
            // Seed 0 ends every row before 28 steps, and generation stops at the last EOS.
            assert_eq!(ended, 4);
            assert!(n < 28);
            assert!((0..4).any(|row| tokens[row * width + n] == 10));
        }
    }

    goodhart_core::backend_test! {
        fn bad_generation_requests_are_errors<B>(device) {
            let model = tiny(Positions::Learned).init::<B>(device).unwrap();
            let prompt = ints::<B>(&[&[1, 0]], device);
            let mut r = rng(0, "sample");
            let right_padded = floats::<B>(&[&[1.0, 0.0]], device);
            let err = generate(&model, prompt.clone(), right_padded, &GenerationConfig::new(4), &mut r).unwrap_err();
            assert!(err.to_string().contains("left-padded"), "{err}");
            let ok = floats::<B>(&[&[1.0, 1.0]], device);
            assert!(generate(&model, prompt.clone(), ok.clone(), &GenerationConfig::new(31), &mut r).is_err());
            assert!(generate(&model, prompt.clone(), ok.clone(), &GenerationConfig::new(4).with_temperature(0.0), &mut r).is_err());
            assert!(generate(&model, prompt.clone(), ok.clone(), &GenerationConfig::new(4).with_top_p(0.0), &mut r).is_err());
            assert!(generate(&model, prompt, ok, &GenerationConfig::new(4).with_eos_id(Some(11)), &mut r).is_err());
        }
    }
}
