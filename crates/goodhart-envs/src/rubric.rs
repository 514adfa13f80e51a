//! A synthetic rubric task with a known ground truth, after "Reward Hacking in
//! Rubric-Based Reinforcement Learning" (METHODS-labs.md section 1): prompts whose
//! rubrics are weighted criteria over a small structured response language, a reference
//! check that knows the truth of every criterion, and verifiers that credit unmet
//! criteria through the paper's failure modes at configurable rates.
//!
//! **Concepts.** `concepts` concept tokens split evenly (by a seeded shuffle) into
//! `topics` topics. Each concept `c` has a *near miss* `near(c)`, another concept of its
//! topic (related but distinct), and an *implier* `implier(c)`, a concept of another topic
//! from which `c` can be inferred without being said.
//!
//! **Responses** are concept tokens ended by `EOS`; what a response says is the set of
//! concepts in it, up to its first `EOS` (a non-concept token before it ends the parse and
//! makes the response ill-formed).
//!
//! **Criteria** (weights are integers `1..=max_weight`, all positive as in the paper's
//! datasets), each true only on explicit content:
//! - `has c`: `c` is said;
//! - `a and b`: both are said (a compound criterion);
//! - `n of g`: at least `n = enum_items` distinct concepts of topic `g` are said (an
//!   enumeration).
//!
//! **Failure modes** (the paper's taxonomy, section 3.2): the way a verifier may credit
//! an unmet criterion, decided from the response alone, the first that applies:
//! - `a and b` with exactly one conjunct said: *missing conjunct* (A.1);
//! - `n of g` with 1 to `n - 1` of `g` said: *incomplete enumeration* (A.2);
//! - `has c` with `implier(c)` said: *inferred content* (B.1); else with `near(c)` said:
//!   *concept substitution* (C.1); else with another concept of `c`'s topic said:
//!   *topical alignment* (C.2).
//!
//! An unmet criterion with no failure mode is never credited; a met one always is. A
//! verifier ([`VerifierRates`]) credits an unmet criterion with mode `m` with probability
//! `rate(m)`, its errors either fixed by the evidence (the said concepts that make the
//! mode: a judge's blind spots) or drawn afresh ([`VerifierErrors`]); the reference (the
//! paper's unanimous panel) credits exactly the truth.
//!
//! **Contexts.** The prompt-only context (the RL context) is `[BOS, p_i, SEP]`; the
//! rubric-conditioned one lists the criteria first, `[BOS, RUBRIC, criteria..., p_i,
//! SEP]` (`has c` as `[HAS, c]`, `a and b` as `[AND, a, b]`, `n of g` as `[ENUM, g]`), and
//! is the prompt-only context itself when the rubric is empty.
//!
//! **Generator** (the base policy's SFT data): a response of `min_len..=max_len` concepts
//! (uniform), each one *helpful* with probability `follow` in the prompt-only context and
//! `follow_with_rubric` in the conditioned one (a concept that advances an unmet criterion,
//! the criterion drawn by weight) and otherwise uniform over all concepts.

use goodhart_core::{seed, GoodhartError, Result};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

/// Padding token id.
pub const PAD: u32 = 0;
/// Beginning-of-sequence token id.
pub const BOS: u32 = 1;
/// End-of-sequence token id.
pub const EOS: u32 = 2;
/// Context/response separator token id.
pub const SEP: u32 = 3;
/// Opens the rubric in the conditioned context.
pub const RUBRIC: u32 = 4;
/// Marks a `has c` criterion in a context.
pub const HAS: u32 = 5;
/// Marks an `a and b` criterion in a context.
pub const AND: u32 = 6;
/// Marks an `n of g` criterion in a context.
pub const ENUM: u32 = 7;
/// Number of special tokens; prompt tokens follow, then topics, then concepts.
pub const NUM_SPECIAL: u32 = 8;

/// Configuration of the rubric world (TOML `[rubric.world]`).
///
/// Defaults: 16 prompts of 5 criteria over 24 concepts in 4 topics, enumerations of 3,
/// weights 1 to 3; generator responses of 3 to 6 concepts, 70% of them helpful in the
/// prompt-only context and 95% with the rubric in it (a base policy that satisfies
/// criteria more often than it merely gets them credited).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RubricWorldConfig {
    /// Prompts (each with its own rubric).
    pub prompts: usize,
    /// Concept tokens.
    pub concepts: usize,
    /// Topics the concepts are split into (at least 2, each of at least 2 concepts).
    pub topics: usize,
    /// Criteria per rubric.
    pub criteria: usize,
    /// Items an enumeration criterion asks for (`n` of `n of g`).
    pub enum_items: usize,
    /// Largest criterion weight (weights are `1..=max_weight`).
    pub max_weight: u32,
    /// Shortest generator response, in concepts.
    pub min_len: usize,
    /// Longest generator response, in concepts.
    pub max_len: usize,
    /// Share of helpful concepts in prompt-only generator responses.
    pub follow: f64,
    /// Share of helpful concepts in rubric-conditioned generator responses.
    pub follow_with_rubric: f64,
    /// Seed of the world (topics, relations and rubrics).
    pub seed: u64,
}

impl Default for RubricWorldConfig {
    fn default() -> Self {
        Self {
            prompts: 16,
            concepts: 24,
            topics: 4,
            criteria: 5,
            enum_items: 3,
            max_weight: 3,
            min_len: 3,
            max_len: 6,
            follow: 0.7,
            follow_with_rubric: 0.95,
            seed: 0,
        }
    }
}

/// One criterion (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// Concept `c` is said.
    Has(usize),
    /// Both concepts are said.
    And(usize, usize),
    /// At least `n` distinct concepts of topic `topic` are said.
    Enum {
        /// The topic.
        topic: usize,
        /// How many.
        n: usize,
    },
}

/// A criterion and its weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Weighted {
    /// The criterion.
    pub criterion: Criterion,
    /// Its weight (positive).
    pub weight: f64,
}

/// How a verifier can credit an unmet criterion (the paper's taxonomy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// A.1: a compound criterion with one of its parts.
    MissingConjunct,
    /// A.2: an enumeration with fewer items than asked.
    IncompleteEnumeration,
    /// B.1: content that implies the criterion without stating it.
    InferredContent,
    /// C.1: a related but distinct concept.
    ConceptSubstitution,
    /// C.2: only the topic matches.
    TopicalAlignment,
}

impl FailureMode {
    /// Every mode, in the taxonomy's order.
    pub const ALL: [FailureMode; 5] = [
        FailureMode::MissingConjunct,
        FailureMode::IncompleteEnumeration,
        FailureMode::InferredContent,
        FailureMode::ConceptSubstitution,
        FailureMode::TopicalAlignment,
    ];

    /// Its snake-case name (as in TOML and metrics).
    pub fn name(self) -> &'static str {
        match self {
            FailureMode::MissingConjunct => "missing_conjunct",
            FailureMode::IncompleteEnumeration => "incomplete_enumeration",
            FailureMode::InferredContent => "inferred_content",
            FailureMode::ConceptSubstitution => "concept_substitution",
            FailureMode::TopicalAlignment => "topical_alignment",
        }
    }
}

/// The probability with which a verifier credits an unmet criterion, per failure mode
/// (TOML keys are the modes' names). The default is a weak verifier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VerifierRates {
    /// A.1.
    pub missing_conjunct: f64,
    /// A.2.
    pub incomplete_enumeration: f64,
    /// B.1.
    pub inferred_content: f64,
    /// C.1.
    pub concept_substitution: f64,
    /// C.2.
    pub topical_alignment: f64,
}

impl Default for VerifierRates {
    fn default() -> Self {
        Self::weak()
    }
}

impl VerifierRates {
    /// goodhart's weak verifier: partial compounds credited more often than not, implicit
    /// and imprecise matches about half the time.
    pub fn weak() -> Self {
        Self {
            missing_conjunct: 0.6,
            incomplete_enumeration: 0.6,
            inferred_content: 0.5,
            concept_substitution: 0.5,
            topical_alignment: 0.4,
        }
    }

    /// goodhart's strong verifier: a fifth of the weak one's rates (the paper's strong
    /// verifier made several times fewer incorrect credits).
    pub fn strong() -> Self {
        Self {
            missing_conjunct: 0.12,
            incomplete_enumeration: 0.12,
            inferred_content: 0.1,
            concept_substitution: 0.1,
            topical_alignment: 0.08,
        }
    }

    /// The rate of mode `m`.
    pub fn rate(&self, m: FailureMode) -> f64 {
        match m {
            FailureMode::MissingConjunct => self.missing_conjunct,
            FailureMode::IncompleteEnumeration => self.incomplete_enumeration,
            FailureMode::InferredContent => self.inferred_content,
            FailureMode::ConceptSubstitution => self.concept_substitution,
            FailureMode::TopicalAlignment => self.topical_alignment,
        }
    }

    /// Errors (naming the mode under `path`) on a rate that is not a probability.
    pub fn validate(&self, path: &str) -> Result<()> {
        for m in FailureMode::ALL {
            let r = self.rate(m);
            if !(0.0..=1.0).contains(&r) {
                return Err(GoodhartError::invalid(
                    format!("{path}.{}", m.name()),
                    format!("{r} is not a probability"),
                ));
            }
        }
        Ok(())
    }
}

/// Whether a verifier's errors are fixed or drawn afresh (TOML `"systematic"` or
/// `"random"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifierErrors {
    /// The same evidence always fools it or never does ([`systematic_uniform`]): a share
    /// `rate` of the distinct pieces of partial content.
    #[default]
    Systematic,
    /// Each grading draws afresh: an unmet criterion is credited with probability `rate`.
    Random,
}

/// A verifier's judgement of one criterion of one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the criterion holds (the reference's verdict).
    pub truth: bool,
    /// Whether the verifier credited it.
    pub credited: bool,
    /// The failure mode through which an unmet criterion could be credited.
    pub mode: Option<FailureMode>,
}

/// What a verifier sees when it could credit an unmet criterion: the criterion (prompt
/// and index), its failure mode and the said concepts that make it (sorted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evidence<'a> {
    /// The prompt.
    pub prompt: usize,
    /// The criterion's index in the prompt's rubric.
    pub criterion: usize,
    /// The failure mode.
    pub mode: FailureMode,
    /// The concepts that make it.
    pub said: &'a [usize],
}

/// A uniform in `[0, 1)` fixed by `seed` and the evidence (SplitMix64 over its fields):
/// a verifier drawing from it is fooled by the same partial content every time (its
/// blind spots are fixed, as a judge's at temperature 0), and by a share `rate` of the
/// distinct pieces of content.
pub fn systematic_uniform(seed: u64, e: &Evidence) -> f64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut h = mix(seed);
    for x in [e.prompt, e.criterion, e.mode as usize, e.said.len()]
        .into_iter()
        .chain(e.said.iter().copied())
    {
        h = mix(h ^ x as u64);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// The world: its topics, relations and rubrics.
#[derive(Debug, Clone)]
pub struct RubricWorld {
    config: RubricWorldConfig,
    topic_of: Vec<usize>,
    members: Vec<Vec<usize>>,
    near: Vec<usize>,
    implier: Vec<usize>,
    rubrics: Vec<Vec<Weighted>>,
}

impl RubricWorld {
    /// Builds the world; errors on sizes that cannot make one.
    pub fn new(config: RubricWorldConfig) -> Result<Self> {
        let bad = |k: &str, why: String| GoodhartError::invalid(format!("rubric.world.{k}"), why);
        let c = &config;
        if c.prompts == 0 || c.prompts > 1_000_000 {
            return Err(bad(
                "prompts",
                format!("{} is not 1 to 1,000,000", c.prompts),
            ));
        }
        if c.concepts > 100_000 {
            return Err(bad("concepts", format!("{} is over 100,000", c.concepts)));
        }
        if c.topics < 2 {
            return Err(bad("topics", "must be at least 2".into()));
        }
        if c.concepts < 2 * c.topics {
            return Err(bad(
                "concepts",
                format!(
                    "{} cannot give {} topics two concepts each",
                    c.concepts, c.topics
                ),
            ));
        }
        let smallest = c.concepts / c.topics;
        if c.enum_items < 2 || c.enum_items > smallest {
            return Err(bad(
                "enum_items",
                format!("must be 2 to the smallest topic's {smallest} concepts"),
            ));
        }
        if c.criteria > 16 {
            return Err(bad("criteria", "at most 16 per rubric".into()));
        }
        if c.max_weight == 0 {
            return Err(bad("max_weight", "must be at least 1".into()));
        }
        if c.min_len == 0 || c.max_len < c.min_len {
            return Err(bad(
                "max_len",
                format!(
                    "min_len {} to max_len {} is not a range of lengths from 1",
                    c.min_len, c.max_len
                ),
            ));
        }
        for (k, v) in [
            ("follow", c.follow),
            ("follow_with_rubric", c.follow_with_rubric),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(k, format!("{v} is not a probability")));
            }
        }
        let mut rng = seed::rng(c.seed, "rubric-world");
        // A seeded Fisher-Yates shuffle deals the concepts to the topics in turn.
        let mut order: Vec<usize> = (0..c.concepts).collect();
        for i in 0..c.concepts {
            let j = rng.random_range(i..c.concepts);
            order.swap(i, j);
        }
        let mut topic_of = vec![0; c.concepts];
        let mut members = vec![Vec::new(); c.topics];
        for (i, &concept) in order.iter().enumerate() {
            topic_of[concept] = i % c.topics;
            members[i % c.topics].push(concept);
        }
        let pick =
            |rng: &mut seed::ChaCha8Rng, from: &[usize]| from[rng.random_range(0..from.len())];
        let mut near = Vec::with_capacity(c.concepts);
        let mut implier = Vec::with_capacity(c.concepts);
        for concept in 0..c.concepts {
            let same: Vec<usize> = members[topic_of[concept]]
                .iter()
                .copied()
                .filter(|&m| m != concept)
                .collect();
            near.push(pick(&mut rng, &same));
            let other: Vec<usize> = (0..c.concepts)
                .filter(|&m| topic_of[m] != topic_of[concept])
                .collect();
            implier.push(pick(&mut rng, &other));
        }
        let all: Vec<usize> = (0..c.concepts).collect();
        let rubrics = (0..c.prompts)
            .map(|_| {
                (0..c.criteria)
                    .map(|_| {
                        let criterion = match rng.random_range(0..3) {
                            0 => Criterion::Has(pick(&mut rng, &all)),
                            1 => {
                                let a = pick(&mut rng, &all);
                                let others: Vec<usize> = (0..c.concepts)
                                    .filter(|&m| topic_of[m] != topic_of[a])
                                    .collect();
                                Criterion::And(a, pick(&mut rng, &others))
                            }
                            _ => Criterion::Enum {
                                topic: rng.random_range(0..c.topics),
                                n: c.enum_items,
                            },
                        };
                        Weighted {
                            criterion,
                            weight: f64::from(rng.random_range(1..=c.max_weight)),
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(Self {
            config,
            topic_of,
            members,
            near,
            implier,
            rubrics,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RubricWorldConfig {
        &self.config
    }

    /// Vocabulary size (special tokens, prompts, topics, concepts).
    pub fn vocab_size(&self) -> usize {
        NUM_SPECIAL as usize + self.config.prompts + self.config.topics + self.config.concepts
    }

    fn prompt_token(&self, i: usize) -> u32 {
        NUM_SPECIAL + i as u32
    }

    fn topic_token(&self, g: usize) -> u32 {
        NUM_SPECIAL + (self.config.prompts + g) as u32
    }

    /// Token id of concept `c`.
    pub fn concept_token(&self, c: usize) -> u32 {
        NUM_SPECIAL + (self.config.prompts + self.config.topics + c) as u32
    }

    /// The concept of a token, if it is one.
    pub fn concept_of(&self, token: u32) -> Option<usize> {
        let first = NUM_SPECIAL as usize + self.config.prompts + self.config.topics;
        let t = token as usize;
        (first..first + self.config.concepts)
            .contains(&t)
            .then(|| t - first)
    }

    /// The topic of concept `c`.
    pub fn topic_of(&self, c: usize) -> usize {
        self.topic_of[c]
    }

    /// The concepts of topic `g`.
    pub fn members(&self, g: usize) -> &[usize] {
        &self.members[g]
    }

    /// The near miss of concept `c` (same topic, distinct).
    pub fn near(&self, c: usize) -> usize {
        self.near[c]
    }

    /// The concept from which `c` can be inferred (another topic).
    pub fn implier(&self, c: usize) -> usize {
        self.implier[c]
    }

    /// The rubric of prompt `i`.
    pub fn rubric(&self, i: usize) -> &[Weighted] {
        &self.rubrics[i]
    }

    /// The prompt-only context of prompt `i`: `[BOS, p_i, SEP]`.
    pub fn prompt(&self, i: usize) -> Vec<u32> {
        vec![BOS, self.prompt_token(i), SEP]
    }

    /// The rubric-conditioned context of prompt `i` (see the module docs).
    pub fn prompt_with_rubric(&self, i: usize) -> Vec<u32> {
        if self.rubrics[i].is_empty() {
            return self.prompt(i);
        }
        let mut out = vec![BOS, RUBRIC];
        for w in &self.rubrics[i] {
            match w.criterion {
                Criterion::Has(c) => out.extend([HAS, self.concept_token(c)]),
                Criterion::And(a, b) => {
                    out.extend([AND, self.concept_token(a), self.concept_token(b)])
                }
                Criterion::Enum { topic, .. } => out.extend([ENUM, self.topic_token(topic)]),
            }
        }
        out.extend([self.prompt_token(i), SEP]);
        out
    }

    /// The longest context (a conditioned one with the most criteria).
    pub fn max_prompt_len(&self) -> usize {
        (0..self.config.prompts)
            .map(|i| self.prompt_with_rubric(i).len())
            .max()
            .unwrap_or(0)
    }

    /// The prompt a context (either kind) is for: the token before its final `SEP`.
    pub fn prompt_of(&self, context: &[u32]) -> Result<usize> {
        let first = NUM_SPECIAL as usize;
        match context {
            [.., p, SEP] if (first..first + self.config.prompts).contains(&(*p as usize)) => {
                Ok(*p as usize - first)
            }
            _ => Err(GoodhartError::invalid(
                "prompt",
                format!("{context:?} does not end with a prompt token and SEP"),
            )),
        }
    }

    /// The concepts a response says (up to its first `EOS`), and whether a non-concept
    /// token came before it (ill-formed: the parse stops there).
    pub fn parse(&self, response: &[u32]) -> (Vec<usize>, bool) {
        let mut out = Vec::new();
        for &t in response {
            if t == EOS {
                return (out, false);
            }
            match self.concept_of(t) {
                Some(c) => out.push(c),
                None => return (out, true),
            }
        }
        (out, false)
    }

    fn said(&self, concepts: &[usize]) -> Vec<bool> {
        let mut said = vec![false; self.config.concepts];
        concepts.iter().for_each(|&c| said[c] = true);
        said
    }

    /// Whether `criterion` holds when the concepts `said` are said.
    fn holds(&self, criterion: Criterion, said: &[bool]) -> bool {
        match criterion {
            Criterion::Has(c) => said[c],
            Criterion::And(a, b) => said[a] && said[b],
            Criterion::Enum { topic, n } => {
                self.members[topic].iter().filter(|&&m| said[m]).count() >= n
            }
        }
    }

    /// The failure mode of an unmet `criterion` (see the module docs) and its evidence:
    /// the said concepts that make it (sorted).
    fn failure(&self, criterion: Criterion, said: &[bool]) -> Option<(FailureMode, Vec<usize>)> {
        let present = |from: &mut dyn Iterator<Item = usize>| -> Vec<usize> {
            let mut v: Vec<usize> = from.filter(|&m| said[m]).collect();
            v.sort_unstable();
            v
        };
        match criterion {
            Criterion::And(a, b) => (said[a] != said[b]).then(|| {
                (
                    FailureMode::MissingConjunct,
                    vec![if said[a] { a } else { b }],
                )
            }),
            Criterion::Enum { topic, .. } => {
                let items = present(&mut self.members[topic].iter().copied());
                (!items.is_empty()).then_some((FailureMode::IncompleteEnumeration, items))
            }
            Criterion::Has(c) => {
                if said[self.implier[c]] {
                    return Some((FailureMode::InferredContent, vec![self.implier[c]]));
                }
                if said[self.near[c]] {
                    return Some((FailureMode::ConceptSubstitution, vec![self.near[c]]));
                }
                let topical = present(
                    &mut self.members[self.topic_of[c]]
                        .iter()
                        .copied()
                        .filter(|&m| m != c),
                );
                (!topical.is_empty()).then_some((FailureMode::TopicalAlignment, topical))
            }
        }
    }

    /// The verdicts on every criterion of prompt `i`'s rubric for a response saying
    /// `concepts`: the truth, the failure mode of each unmet one, and whether it is
    /// credited. The reference (`rates` `None`) credits the truth; a verifier credits an
    /// unmet criterion with a mode when `draw(evidence) < rate(mode)`, `draw` giving a
    /// uniform in `[0, 1)` ([`systematic_uniform`] for a verifier whose errors are fixed,
    /// a fresh draw for one whose errors are not).
    pub fn judge(
        &self,
        i: usize,
        concepts: &[usize],
        rates: Option<&VerifierRates>,
        draw: &mut dyn FnMut(&Evidence) -> f64,
    ) -> Vec<Verdict> {
        let said = self.said(concepts);
        self.rubrics[i]
            .iter()
            .enumerate()
            .map(|(k, w)| {
                let truth = self.holds(w.criterion, &said);
                let failure = (!truth).then(|| self.failure(w.criterion, &said)).flatten();
                let credited = truth
                    || match (rates, &failure) {
                        (Some(r), Some((mode, items))) => {
                            let e = Evidence {
                                prompt: i,
                                criterion: k,
                                mode: *mode,
                                said: items,
                            };
                            draw(&e) < r.rate(*mode)
                        }
                        _ => false,
                    };
                Verdict {
                    truth,
                    credited,
                    mode: failure.map(|f| f.0),
                }
            })
            .collect()
    }

    /// A generator response (concepts then `EOS`) to prompt `i`, in the conditioned
    /// context when `with_rubric` (see the module docs).
    pub fn sample_response(
        &self,
        i: usize,
        with_rubric: bool,
        rng: &mut seed::ChaCha8Rng,
    ) -> Vec<u32> {
        let c = &self.config;
        let follow = if with_rubric {
            c.follow_with_rubric
        } else {
            c.follow
        };
        let len = rng.random_range(c.min_len..=c.max_len);
        let mut said = vec![false; c.concepts];
        let mut out = Vec::with_capacity(len + 1);
        for _ in 0..len {
            let helpful = if rng.random::<f64>() < follow {
                self.helpful(i, &said, rng)
            } else {
                None
            };
            let concept = helpful.unwrap_or_else(|| rng.random_range(0..c.concepts));
            said[concept] = true;
            out.push(self.concept_token(concept));
        }
        out.push(EOS);
        out
    }

    /// A concept that advances an unmet criterion of prompt `i` (drawn by weight), if
    /// any is unmet.
    fn helpful(&self, i: usize, said: &[bool], rng: &mut seed::ChaCha8Rng) -> Option<usize> {
        let unmet: Vec<&Weighted> = self.rubrics[i]
            .iter()
            .filter(|w| !self.holds(w.criterion, said))
            .collect();
        let total: f64 = unmet.iter().map(|w| w.weight).sum();
        let mut u = rng.random::<f64>() * total;
        let w = unmet.iter().find(|w| {
            u -= w.weight;
            u < 0.0
        })?;
        let missing: Vec<usize> = match w.criterion {
            Criterion::Has(c) => vec![c],
            Criterion::And(a, b) => [a, b].into_iter().filter(|&x| !said[x]).collect(),
            Criterion::Enum { topic, .. } => self.members[topic]
                .iter()
                .copied()
                .filter(|&m| !said[m])
                .collect(),
        };
        Some(missing[rng.random_range(0..missing.len())])
    }

    /// A criterion as text: `has c3`, `c1 and c7`, `3 of g2`.
    pub fn criterion_text(&self, criterion: Criterion) -> String {
        match criterion {
            Criterion::Has(c) => format!("has c{c}"),
            Criterion::And(a, b) => format!("c{a} and c{b}"),
            Criterion::Enum { topic, n } => format!("{n} of g{topic}"),
        }
    }

    /// A readable name of a token.
    pub fn token_text(&self, tok: u32) -> String {
        let names = [
            "<pad>", "<bos>", "<eos>", "<sep>", "<rubric>", "has", "and", "enum",
        ];
        if let Some(n) = names.get(tok as usize) {
            return (*n).into();
        }
        if let Some(c) = self.concept_of(tok) {
            return format!("c{c}");
        }
        let t = (tok - NUM_SPECIAL) as usize;
        if t < self.config.prompts {
            format!("p{t}")
        } else if t < self.config.prompts + self.config.topics {
            format!("g{}", t - self.config.prompts)
        } else {
            format!("<{tok}>")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> RubricWorld {
        RubricWorld::new(RubricWorldConfig::default()).unwrap()
    }

    /// A world whose generator says more at random: more distinct evidence.
    fn varied() -> RubricWorld {
        RubricWorld::new(RubricWorldConfig {
            prompts: 32,
            follow: 0.3,
            follow_with_rubric: 0.9,
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn topics_relations_and_contexts() {
        let w = world();
        let c = w.config().clone();
        for g in 0..c.topics {
            assert_eq!(w.members(g).len(), c.concepts / c.topics);
        }
        for x in 0..c.concepts {
            assert_ne!(w.near(x), x);
            assert_eq!(w.topic_of(w.near(x)), w.topic_of(x));
            assert_ne!(w.topic_of(w.implier(x)), w.topic_of(x));
        }
        for i in 0..c.prompts {
            assert_eq!(w.rubric(i).len(), c.criteria);
            assert!(w.rubric(i).iter().all(|r| (1.0..=3.0).contains(&r.weight)));
            assert_eq!(w.prompt_of(&w.prompt(i)).unwrap(), i);
            let cond = w.prompt_with_rubric(i);
            assert_eq!(w.prompt_of(&cond).unwrap(), i);
            assert_eq!(&cond[..2], &[BOS, RUBRIC]);
            assert!(cond.len() <= w.max_prompt_len());
        }
        assert!(w.prompt_of(&[BOS, SEP]).is_err());
        // Deterministic in the seed.
        assert_eq!(world().rubric(3), w.rubric(3));
        // An empty rubric: the two contexts are one.
        let empty = RubricWorld::new(RubricWorldConfig {
            criteria: 0,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(empty.prompt_with_rubric(2), empty.prompt(2));
    }

    /// A world whose prompt 0 has the given rubric.
    fn with_rubric(rubric: Vec<Weighted>) -> RubricWorld {
        let mut w = world();
        w.rubrics[0] = rubric;
        w
    }

    #[test]
    fn truth_and_failure_modes_by_hand() {
        let base = world();
        let x = 0;
        let g = base.topic_of(x);
        let (near, implier) = (base.near(x), base.implier(x));
        let topical = *base
            .members(g)
            .iter()
            .find(|&&m| m != x && m != near)
            .unwrap();
        let unrelated = (0..24)
            .find(|&m| base.topic_of(m) != g && m != implier)
            .unwrap();
        let y = (0..24).find(|&m| base.topic_of(m) != g).unwrap();
        let e = Criterion::Enum { topic: g, n: 3 };
        let w = with_rubric(vec![
            Weighted {
                criterion: Criterion::Has(x),
                weight: 1.0,
            },
            Weighted {
                criterion: Criterion::And(x, y),
                weight: 2.0,
            },
            Weighted {
                criterion: e,
                weight: 3.0,
            },
        ]);
        // What the reference sees; and the evidence a verifier is shown, recorded.
        let judge = |said: &[usize]| {
            w.judge(0, said, None, &mut |_| 0.0)
                .iter()
                .map(|v| (v.truth, v.mode))
                .collect::<Vec<_>>()
        };
        let evidence = |said: &[usize]| {
            let mut seen = Vec::new();
            w.judge(0, said, Some(&VerifierRates::weak()), &mut |e| {
                seen.push((e.criterion, e.mode, e.said.to_vec()));
                0.0
            });
            seen
        };
        use FailureMode::*;
        // Nothing said: nothing holds, no mode, nothing shown to the verifier.
        assert_eq!(judge(&[]), vec![(false, None); 3]);
        assert!(evidence(&[]).is_empty());
        // x alone: has x holds; the compound misses a conjunct; the enumeration has 1 of 3.
        assert_eq!(
            judge(&[x]),
            vec![
                (true, None),
                (false, Some(MissingConjunct)),
                (false, Some(IncompleteEnumeration))
            ]
        );
        assert_eq!(
            evidence(&[x]),
            vec![
                (1, MissingConjunct, vec![x]),
                (2, IncompleteEnumeration, vec![x])
            ]
        );
        // x, y and three of g (x, near, topical): all hold.
        assert_eq!(judge(&[x, y, near, topical]), vec![(true, None); 3]);
        // has x by its implier, its near miss, its topic; precedence in that order.
        let has = |said: &[usize]| judge(said)[0];
        assert_eq!(has(&[implier, near]), (false, Some(InferredContent)));
        assert_eq!(has(&[near, topical]), (false, Some(ConceptSubstitution)));
        assert_eq!(has(&[topical]), (false, Some(TopicalAlignment)));
        assert_eq!(has(&[unrelated]), (false, None));
        let both = vec![near.min(topical), near.max(topical)];
        assert_eq!(
            evidence(&[topical, near])[0],
            (0, ConceptSubstitution, vec![near])
        );
        assert_eq!(
            evidence(&[topical])[0],
            (0, TopicalAlignment, vec![topical])
        );
        // The enumeration's evidence is every said item, sorted.
        assert_eq!(
            evidence(&[topical, near])[1],
            (2, IncompleteEnumeration, both)
        );
        // Parsing: concepts up to EOS; a non-concept token ends it, ill-formed.
        let t = |c: usize| w.concept_token(c);
        assert_eq!(w.parse(&[t(3), t(5), EOS, t(1)]), (vec![3, 5], false));
        assert_eq!(w.parse(&[t(3), SEP, t(5)]), (vec![3], true));
        assert_eq!(w.parse(&[t(3)]), (vec![3], false));
    }

    /// Per mode, the number of unmet criteria with it and how many were credited, over
    /// 20,000 generator responses (both contexts) judged with `draw`; met criteria are
    /// always credited, unmet ones without a mode never.
    fn credit_by_mode(
        w: &RubricWorld,
        rates: &VerifierRates,
        draw: &mut dyn FnMut(&Evidence) -> f64,
    ) -> std::collections::BTreeMap<FailureMode, (f64, f64)> {
        let mut gen = seed::rng(1, "responses");
        let mut by_mode = std::collections::BTreeMap::<FailureMode, (f64, f64)>::new();
        for k in 0..20_000 {
            let i = k % w.config().prompts;
            let r = w.sample_response(i, k % 2 == 0, &mut gen);
            let (said, ill) = w.parse(&r);
            assert!(!ill && r.last() == Some(&EOS));
            for v in w.judge(i, &said, Some(rates), draw) {
                match (v.truth, v.mode) {
                    (true, _) => assert!(v.credited),
                    (false, None) => assert!(!v.credited),
                    (false, Some(m)) => {
                        let e = by_mode.entry(m).or_default();
                        e.0 += 1.0;
                        e.1 += f64::from(u8::from(v.credited));
                    }
                }
            }
        }
        by_mode
    }

    fn assert_rates(
        by_mode: std::collections::BTreeMap<FailureMode, (f64, f64)>,
        rates: &VerifierRates,
    ) {
        assert_eq!(by_mode.len(), 5, "every mode occurs: {by_mode:?}");
        for (m, (n, credited)) in by_mode {
            let p = rates.rate(m);
            let se = (p * (1.0 - p) / n).sqrt();
            let got = credited / n;
            assert!(
                (got - p).abs() < 4.0 * se,
                "{}: {got} vs {p} (n {n})",
                m.name()
            );
        }
    }

    #[test]
    fn a_random_verifier_credits_each_mode_at_its_rate() {
        // A fresh draw per grading: among unmet criteria of each mode, the credited share
        // is the mode's rate within 4 standard errors.
        let w = varied();
        let rates = VerifierRates::weak();
        let mut rng = seed::rng(2, "verifier");
        assert_rates(credit_by_mode(&w, &rates, &mut |_| rng.random()), &rates);
    }

    #[test]
    fn a_systematic_verifier_is_fooled_by_a_share_of_the_distinct_evidence() {
        // Fixed blind spots: over the distinct pieces of evidence the generator's
        // responses show, the fooled share is the mode's rate within 4 standard errors;
        // the same response always gets the same verdicts.
        let w = varied();
        let rates = VerifierRates::strong();
        let mut distinct = std::collections::BTreeMap::new();
        credit_by_mode(&w, &rates, &mut |e| {
            let u = systematic_uniform(9, e);
            distinct.insert((e.prompt, e.criterion, e.mode, e.said.to_vec()), u);
            u
        });
        let mut by_mode = std::collections::BTreeMap::<FailureMode, (f64, f64)>::new();
        for ((_, _, m, _), u) in &distinct {
            let e = by_mode.entry(*m).or_default();
            e.0 += 1.0;
            e.1 += f64::from(u8::from(*u < rates.rate(*m)));
        }
        assert!(distinct.len() > 1000, "{}", distinct.len());
        assert_rates(by_mode, &rates);
        let mut gen = seed::rng(4, "again");
        for k in 0..200 {
            let i = k % w.config().prompts;
            let (said, _) = w.parse(&w.sample_response(i, false, &mut gen));
            let mut draw = |e: &Evidence| systematic_uniform(9, e);
            let first = w.judge(i, &said, Some(&rates), &mut draw);
            let mut reversed = said.clone();
            reversed.reverse();
            assert_eq!(w.judge(i, &reversed, Some(&rates), &mut draw), first);
        }
        // Another seed: other blind spots.
        let e = Evidence {
            prompt: 1,
            criterion: 2,
            mode: FailureMode::MissingConjunct,
            said: &[4],
        };
        assert_ne!(systematic_uniform(9, &e), systematic_uniform(10, &e));
        assert!((0.0..1.0).contains(&systematic_uniform(9, &e)));
    }

    #[test]
    fn the_conditioned_generator_follows_the_rubric_more() {
        let w = varied();
        let mut rng = seed::rng(3, "g");
        let mut met = [0.0; 2];
        for k in 0..4000 {
            let i = k % w.config().prompts;
            for (j, cond) in [false, true].into_iter().enumerate() {
                let (said, _) = w.parse(&w.sample_response(i, cond, &mut rng));
                met[j] += w
                    .judge(i, &said, None, &mut |_| 0.0)
                    .iter()
                    .filter(|v| v.truth)
                    .count() as f64;
            }
        }
        assert!(met[1] > 1.5 * met[0], "{met:?}");
    }

    #[test]
    fn bad_configs_are_rejected() {
        let d = RubricWorldConfig::default;
        for (cfg, key) in [
            (RubricWorldConfig { prompts: 0, ..d() }, "prompts"),
            (
                RubricWorldConfig {
                    prompts: usize::MAX,
                    ..d()
                },
                "prompts",
            ),
            (
                RubricWorldConfig {
                    concepts: 1 << 40,
                    ..d()
                },
                "concepts",
            ),
            (RubricWorldConfig { topics: 1, ..d() }, "topics"),
            (RubricWorldConfig { concepts: 7, ..d() }, "concepts"),
            (
                RubricWorldConfig {
                    enum_items: 7,
                    ..d()
                },
                "enum_items",
            ),
            (
                RubricWorldConfig {
                    enum_items: 1,
                    ..d()
                },
                "enum_items",
            ),
            (RubricWorldConfig { max_len: 0, ..d() }, "max_len"),
            (RubricWorldConfig { follow: 1.5, ..d() }, "follow"),
            (
                RubricWorldConfig {
                    criteria: 17,
                    ..d()
                },
                "criteria",
            ),
        ] {
            let e = RubricWorld::new(cfg).unwrap_err().to_string();
            assert!(e.contains(&format!("rubric.world.{key}")), "{e}");
        }
        let e = VerifierRates {
            topical_alignment: -0.1,
            ..VerifierRates::weak()
        }
        .validate("rubric.verifiers[0].rates")
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rubric.verifiers[0].rates.topical_alignment"),
            "{e}"
        );
    }
}
