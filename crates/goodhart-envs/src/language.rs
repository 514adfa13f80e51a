//! A synthetic preference language in the spirit of Gao, Schulman & Hilton (2022):
//! a small language with a known generator, prompts, and a known gold reward whose
//! structure a learned proxy fits on-distribution but gets wrong off-distribution.
//!
//! **Tokens.** `PAD`, `BOS`, `EOS`, `SEP`, then one token per topic, then the words.
//! A prompt is `[BOS, topic, SEP]`; a response is a sequence of words ended by `EOS`.
//!
//! **Generator** (the "pretraining" distribution, used to make the base/SFT policy).
//! For each topic an order-1 Markov chain over words and `EOS`: the first word is drawn
//! from `start[topic]`, each next token from `next[topic][previous word]`; rows are
//! softmaxes of seeded Gaussian logits (scale `sharpness`), with the topic's favoured
//! words boosted by `favour_bias` and `EOS` given logit `eos_logit`. Responses are cut
//! at `max_len` words (EOS then forced). Because the chain is known, the expected
//! per-token entropy of the language is computed exactly ([`Language::entropy_per_token`]),
//! which is the floor a model's held-out NLL can reach.
//!
//! **Gold reward** `g(prompt, response)` (known, never trained on unless a config says so):
//! - relevance with diminishing returns: `sum_{w in favoured(topic)} ln(1 + count_w)`;
//! - a repetition penalty: `-rep_penalty * (number of immediate repeats y_t == y_{t-1})`;
//! - a length sweet spot: `-len_penalty * ((len - target_len) / target_len)^2`.
//!
//! On the generator's samples favoured words are rare and repeats uncommon, so a proxy
//! fitted there learns "more favoured words is better" almost linearly; a policy that
//! optimises the proxy piles up and repeats favoured words and runs long, where the
//! gold's concave relevance, repetition penalty and length term turn against it.
//!
//! **Preference pairs**: two generator samples for one prompt, labelled by the gold
//! reward (ties broken by a coin), then flipped with probability `label_noise`.

use goodhart_core::{seed, GoodhartError, Result};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

/// Padding token id.
pub const PAD: u32 = 0;
/// Beginning-of-sequence token id.
pub const BOS: u32 = 1;
/// End-of-sequence token id.
pub const EOS: u32 = 2;
/// Prompt/response separator token id.
pub const SEP: u32 = 3;
/// Number of special tokens (ids below it); topic tokens follow, then words.
pub const NUM_SPECIAL: u32 = 4;

/// Configuration of the synthetic language and its gold reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LanguageConfig {
    /// Number of topics (prompts).
    pub topics: usize,
    /// Number of words.
    pub words: usize,
    /// Favoured words per topic (the gold's relevance counts them).
    pub favoured_per_topic: usize,
    /// Standard deviation of the transition logits: higher is a lower-entropy language.
    pub sharpness: f64,
    /// Logit added to a topic's favoured words in its chain.
    pub favour_bias: f64,
    /// Logit of `EOS` after a word (sets the mean length).
    pub eos_logit: f64,
    /// Longest response in words; `EOS` is forced after it.
    pub max_len: usize,
    /// Gold: weight of each immediate repeat.
    pub rep_penalty: f64,
    /// Gold: length at which the length term is 0.
    pub target_len: f64,
    /// Gold: weight of the squared relative length error.
    pub len_penalty: f64,
    /// Seed of the language (its chains and favoured words).
    pub seed: u64,
}

impl Default for LanguageConfig {
    fn default() -> Self {
        Self {
            topics: 4,
            words: 16,
            favoured_per_topic: 3,
            sharpness: 1.0,
            favour_bias: -1.0,
            eos_logit: -0.5,
            max_len: 16,
            rep_penalty: 0.5,
            target_len: 8.0,
            len_penalty: 1.0,
            seed: 0,
        }
    }
}

/// The language: its chains, favoured words and gold reward.
#[derive(Debug, Clone)]
pub struct Language {
    config: LanguageConfig,
    /// `start[topic][k]`, k over words then EOS (index `words`).
    start: Vec<Vec<f64>>,
    /// `next[topic][word][k]`, k over words then EOS.
    next: Vec<Vec<Vec<f64>>>,
    favoured: Vec<Vec<bool>>,
}

/// One gold-labelled preference pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferencePair {
    /// The prompt tokens `[BOS, topic, SEP]`.
    pub prompt: Vec<u32>,
    /// The preferred response (after label noise).
    pub chosen: Vec<u32>,
    /// The other response.
    pub rejected: Vec<u32>,
    /// Whether label noise flipped this pair (the gold prefers `rejected`).
    pub flipped: bool,
}

fn softmax(logits: &[f64]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

fn entropy(p: &[f64]) -> f64 {
    -p.iter()
        .filter(|&&x| x > 0.0)
        .map(|x| x * x.ln())
        .sum::<f64>()
}

fn sample(p: &[f64], u: f64) -> usize {
    let mut acc = 0.0;
    for (i, x) in p.iter().enumerate() {
        acc += x;
        if u < acc {
            return i;
        }
    }
    p.len() - 1
}

/// A standard normal draw (Box-Muller) from a uniform stream.
fn normal(rng: &mut seed::ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Language {
    /// Builds the language; errors on sizes that cannot make one.
    pub fn new(config: LanguageConfig) -> Result<Self> {
        let bad = |k: &str, why: &str| GoodhartError::invalid(format!("language.{k}"), why);
        if config.topics == 0 {
            return Err(bad("topics", "must be at least 1"));
        }
        if config.words < 2 {
            return Err(bad("words", "must be at least 2"));
        }
        if config.favoured_per_topic > config.words {
            return Err(bad("favoured_per_topic", "cannot exceed `words`"));
        }
        if config.max_len == 0 {
            return Err(bad("max_len", "must be at least 1"));
        }
        if config.target_len.is_nan() || config.target_len <= 0.0 {
            return Err(bad("target_len", "must be positive"));
        }
        for (k, v) in [
            ("sharpness", config.sharpness),
            ("favour_bias", config.favour_bias),
            ("eos_logit", config.eos_logit),
            ("rep_penalty", config.rep_penalty),
            ("len_penalty", config.len_penalty),
        ] {
            if !v.is_finite() {
                return Err(bad(k, "must be finite"));
            }
        }
        let mut rng = seed::rng(config.seed, "language");
        let w = config.words;
        let mut favoured = Vec::with_capacity(config.topics);
        for _ in 0..config.topics {
            // A seeded partial Fisher-Yates shuffle picks the favoured words.
            let mut idx: Vec<usize> = (0..w).collect();
            for i in 0..config.favoured_per_topic {
                let j = rng.random_range(i..w);
                idx.swap(i, j);
            }
            let mut f = vec![false; w];
            idx[..config.favoured_per_topic]
                .iter()
                .for_each(|&i| f[i] = true);
            favoured.push(f);
        }
        let row = |rng: &mut seed::ChaCha8Rng, fav: &[bool]| {
            let mut logits: Vec<f64> = (0..w)
                .map(|i| {
                    config.sharpness * normal(rng) + if fav[i] { config.favour_bias } else { 0.0 }
                })
                .collect();
            logits.push(config.eos_logit);
            softmax(&logits)
        };
        let mut start = Vec::new();
        let mut next = Vec::new();
        for fav in &favoured {
            // The first token is a word: EOS is removed from the start distribution.
            let mut s = row(&mut rng, fav);
            s[w] = 0.0;
            let z: f64 = s.iter().sum();
            start.push(s.into_iter().map(|x| x / z).collect());
            next.push((0..w).map(|_| row(&mut rng, fav)).collect());
        }
        Ok(Self {
            config,
            start,
            next,
            favoured,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LanguageConfig {
        &self.config
    }

    /// Vocabulary size (special tokens, topics, words).
    pub fn vocab_size(&self) -> usize {
        NUM_SPECIAL as usize + self.config.topics + self.config.words
    }

    /// Token id of topic `t`.
    pub fn topic_token(&self, t: usize) -> u32 {
        NUM_SPECIAL + t as u32
    }

    /// Token id of word `w`.
    pub fn word_token(&self, w: usize) -> u32 {
        NUM_SPECIAL + (self.config.topics + w) as u32
    }

    /// The word index of a token, if it is a word.
    pub fn word_of(&self, token: u32) -> Option<usize> {
        let first = NUM_SPECIAL as usize + self.config.topics;
        let t = token as usize;
        (first..first + self.config.words)
            .contains(&t)
            .then(|| t - first)
    }

    /// A readable name of token `tok`: `<pad>`, `<bos>`, `<eos>`, `<sep>`, `t<i>` for
    /// topic `i`, `w<i>` for word `i`, `<id>` for an id outside the vocabulary.
    pub fn token_text(&self, tok: u32) -> String {
        match tok {
            PAD => "<pad>".into(),
            BOS => "<bos>".into(),
            EOS => "<eos>".into(),
            SEP => "<sep>".into(),
            _ => match self.word_of(tok) {
                Some(w) => format!("w{w}"),
                None if (tok as usize) < NUM_SPECIAL as usize + self.config.topics => {
                    format!("t{}", tok - NUM_SPECIAL)
                }
                None => format!("<{tok}>"),
            },
        }
    }

    /// The prompt of topic `t`: `[BOS, topic, SEP]`.
    pub fn prompt(&self, t: usize) -> Vec<u32> {
        vec![BOS, self.topic_token(t), SEP]
    }

    /// Topic of a prompt, or an error naming what is wrong with it.
    pub fn topic_of(&self, prompt: &[u32]) -> Result<usize> {
        match prompt {
            [BOS, t, SEP] if (NUM_SPECIAL..NUM_SPECIAL + self.config.topics as u32).contains(t) => {
                Ok((t - NUM_SPECIAL) as usize)
            }
            _ => Err(GoodhartError::invalid(
                "prompt",
                format!("{prompt:?} is not [BOS, topic, SEP]"),
            )),
        }
    }

    /// Whether word `w` is favoured by topic `t`.
    pub fn is_favoured(&self, t: usize, w: usize) -> bool {
        self.favoured[t][w]
    }

    /// Samples a response (words then `EOS`) to topic `t` from the generator.
    pub fn sample_response(&self, t: usize, rng: &mut seed::ChaCha8Rng) -> Vec<u32> {
        let w = self.config.words;
        let mut out = Vec::new();
        let mut k = sample(&self.start[t], rng.random());
        loop {
            out.push(self.word_token(k));
            if out.len() == self.config.max_len {
                break;
            }
            k = sample(&self.next[t][k], rng.random());
            if k == w {
                break;
            }
        }
        out.push(EOS);
        out
    }

    /// Exact expected per-token entropy (nats) of responses, counting the `EOS` token,
    /// averaged uniformly over topics: `E[sum_t H(y_t | y_<t)] / E[len + 1]`. This is the
    /// lowest held-out NLL per response token any model of the language can reach.
    pub fn entropy_per_token(&self) -> f64 {
        let w = self.config.words;
        let (mut total_h, mut total_len) = (0.0, 0.0);
        for t in 0..self.config.topics {
            // dist[k]: probability that the current (latest) word is k and the
            // sequence is still running.
            let mut dist = self.start[t][..w].to_vec();
            let mut h = entropy(&self.start[t]);
            let mut len = 1.0; // the first word
            for pos in 1..=self.config.max_len {
                let alive: f64 = dist.iter().sum();
                if pos == self.config.max_len {
                    len += alive; // forced EOS, zero entropy
                    break;
                }
                let mut nd = vec![0.0; w];
                for (k, &p) in dist.iter().enumerate() {
                    if p == 0.0 {
                        continue;
                    }
                    let row = &self.next[t][k];
                    h += p * entropy(row);
                    for (j, &q) in row[..w].iter().enumerate() {
                        nd[j] += p * q;
                    }
                }
                len += alive; // one more token (a word or EOS) for every live sequence
                dist = nd;
            }
            total_h += h;
            total_len += len;
        }
        total_h / total_len
    }

    /// Gold reward of `response` to `prompt` (see the module docs). Tokens after the
    /// first `EOS` are ignored; a non-word token before it is an error.
    pub fn gold(&self, prompt: &[u32], response: &[u32]) -> Result<f64> {
        let t = self.topic_of(prompt)?;
        let words = self.words_of(response)?;
        let c = &self.config;
        let mut counts = vec![0usize; c.words];
        words.iter().for_each(|&w| counts[w] += 1);
        let relevance: f64 = counts
            .iter()
            .enumerate()
            .filter(|(w, _)| self.favoured[t][*w])
            .map(|(_, &n)| (1.0 + n as f64).ln())
            .sum();
        let repeats = words.windows(2).filter(|p| p[0] == p[1]).count() as f64;
        let len_err = (words.len() as f64 - c.target_len) / c.target_len;
        Ok(relevance - c.rep_penalty * repeats - c.len_penalty * len_err * len_err)
    }

    /// The words of a response up to its first `EOS`.
    pub fn words_of(&self, response: &[u32]) -> Result<Vec<usize>> {
        response
            .iter()
            .take_while(|&&tok| tok != EOS)
            .map(|&tok| {
                self.word_of(tok).ok_or_else(|| {
                    GoodhartError::invalid("response", format!("token {tok} is not a word"))
                })
            })
            .collect()
    }

    /// `n` preference pairs over uniformly drawn topics, labelled by the gold reward
    /// and flipped with probability `label_noise`; stream `"preferences"` of `seed`.
    pub fn preference_pairs(
        &self,
        n: usize,
        label_noise: f64,
        seed: u64,
    ) -> Result<Vec<PreferencePair>> {
        if !(0.0..=1.0).contains(&label_noise) {
            return Err(GoodhartError::invalid(
                "label_noise",
                format!("{label_noise} is not a probability"),
            ));
        }
        let mut rng = seed::rng(seed, "preferences");
        (0..n)
            .map(|_| {
                let t = rng.random_range(0..self.config.topics);
                let prompt = self.prompt(t);
                let a = self.sample_response(t, &mut rng);
                let b = self.sample_response(t, &mut rng);
                let (ga, gb) = (self.gold(&prompt, &a)?, self.gold(&prompt, &b)?);
                let a_wins = ga > gb || (ga == gb && rng.random::<bool>());
                let flipped = rng.random::<f64>() < label_noise;
                let (chosen, rejected) = if a_wins != flipped { (a, b) } else { (b, a) };
                Ok(PreferencePair {
                    prompt,
                    chosen,
                    rejected,
                    flipped,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lang() -> Language {
        Language::new(LanguageConfig::default()).unwrap()
    }

    #[test]
    fn gold_by_hand() {
        let l = lang();
        let t = 0;
        let fav: Vec<usize> = (0..16).filter(|&w| l.is_favoured(t, w)).collect();
        let other = (0..16).find(|&w| !l.is_favoured(t, w)).unwrap();
        assert_eq!(fav.len(), 3);
        let p = l.prompt(t);
        let (f0, f1, o) = (
            l.word_token(fav[0]),
            l.word_token(fav[1]),
            l.word_token(other),
        );
        // 8 words (the target length): f0 f0 f1 o o o o o -> relevance ln3 + ln2,
        // repeats: (f0,f0) and four (o,o) = 5 -> -2.5; length term 0.
        let r = [f0, f0, f1, o, o, o, o, o, EOS];
        let want = 3f64.ln() + 2f64.ln() - 0.5 * 5.0;
        assert!((l.gold(&p, &r).unwrap() - want).abs() < 1e-12);
        // 4 words: f0 o f1 o -> ln2 + ln2, no repeats, length error (4-8)/8 = -0.5 -> -0.25.
        let r = [f0, o, f1, o, EOS, PAD, PAD];
        let want = 2.0 * 2f64.ln() - 0.25;
        assert!((l.gold(&p, &r).unwrap() - want).abs() < 1e-12);
        // Diminishing returns: with the length term off, the (n+1)-th favoured word adds
        // ln((n+2)/(n+1)) (alternating with another word, so no repeats).
        let flat = Language::new(LanguageConfig {
            len_penalty: 0.0,
            ..LanguageConfig::default()
        })
        .unwrap();
        let with = |n: usize| {
            let mut r: Vec<u32> = [f0, o].repeat(n);
            r.push(EOS);
            flat.gold(&p, &r).unwrap()
        };
        for n in 1..5 {
            let gain = with(n + 1) - with(n);
            assert!((gain - ((n as f64 + 2.0) / (n as f64 + 1.0)).ln()).abs() < 1e-12);
        }
        assert!(l.gold(&[BOS, SEP], &r).is_err());
        assert!(l.gold(&p, &[BOS, EOS]).is_err());
    }

    #[test]
    fn exact_entropy_matches_monte_carlo() {
        let l = lang();
        let exact = l.entropy_per_token();
        // Monte Carlo: the NLL of the generator's own samples under the generator.
        let mut rng = seed::rng(7, "mc");
        let (mut nll, mut tokens) = (0.0, 0usize);
        let mut per_seq = Vec::new();
        for i in 0..20_000 {
            let t = i % l.config.topics;
            let r = l.sample_response(t, &mut rng);
            let words = l.words_of(&r).unwrap();
            let mut s = -l.start[t][words[0]].ln();
            for k in 1..words.len() {
                s -= l.next[t][words[k - 1]][words[k]].ln();
            }
            if words.len() < l.config.max_len {
                s -= l.next[t][*words.last().unwrap()][l.config.words].ln();
            }
            nll += s;
            tokens += r.len();
            per_seq.push((s, r.len() as f64));
        }
        let mc = nll / tokens as f64;
        // Ratio estimator's standard error by the delta method.
        let n = per_seq.len() as f64;
        let mean_len = tokens as f64 / n;
        let var = per_seq
            .iter()
            .map(|(s, len)| (s - mc * len).powi(2))
            .sum::<f64>()
            / (n - 1.0);
        let se = (var / n).sqrt() / mean_len;
        assert!(
            (mc - exact).abs() < 3.0 * se,
            "exact {exact}, Monte Carlo {mc} +- {se}"
        );
        assert!(exact > 0.5 && exact < (17f64).ln(), "{exact}");
    }

    #[test]
    fn preference_labels_follow_gold_and_noise() {
        let l = lang();
        let clean = l.preference_pairs(2000, 0.0, 1).unwrap();
        for p in &clean {
            assert!(
                l.gold(&p.prompt, &p.chosen).unwrap() >= l.gold(&p.prompt, &p.rejected).unwrap()
            );
            assert!(!p.flipped);
        }
        let noisy = l.preference_pairs(4000, 0.25, 1).unwrap();
        let flipped = noisy.iter().filter(|p| p.flipped).count() as f64 / 4000.0;
        // 0.25 +- 3 sd (sd = sqrt(0.25 * 0.75 / 4000) = 0.0068)
        assert!((flipped - 0.25).abs() < 0.021, "{flipped}");
        assert_eq!(
            l.preference_pairs(10, 0.25, 1).unwrap(),
            l.preference_pairs(10, 0.25, 1).unwrap()
        );
        assert!(l.preference_pairs(1, 1.5, 1).is_err());
    }

    #[test]
    fn bad_configs_are_rejected() {
        for cfg in [
            LanguageConfig {
                topics: 0,
                ..Default::default()
            },
            LanguageConfig {
                words: 1,
                ..Default::default()
            },
            LanguageConfig {
                favoured_per_topic: 17,
                ..Default::default()
            },
            LanguageConfig {
                max_len: 0,
                ..Default::default()
            },
            LanguageConfig {
                sharpness: f64::NAN,
                ..Default::default()
            },
        ] {
            assert!(Language::new(cfg).is_err());
        }
    }
}
