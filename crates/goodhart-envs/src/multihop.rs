//! A multi-turn tool-use task with a known answer (the environment of the multi-turn lab,
//! METHODS-labs.md sections 2-4): multi-hop questions over a generated knowledge base, a
//! `search` tool the policy calls in a small fixed grammar, the outcome (exact match of
//! the final answer) as gold, and step rewards that can be farmed without answering as
//! proxies.
//!
//! **Knowledge base.** `entities` entity tokens and `relations` relation tokens; every
//! pair `(e, r)` has one object `kb(e, r)`, another entity, drawn uniformly at random.
//!
//! **Questions.** A question is a start entity `s` and a path of `hops` relations
//! `r_1..r_h` (`min_hops..=max_hops`); its answer is `kb(..kb(kb(s, r_1), r_2).., r_h)`,
//! and its *chain* the `h` lookups that reach it: `(s, r_1)`, `(kb(s, r_1), r_2)`, ...
//! The questions of a world are distinct.
//!
//! **Episodes.** The context starts `[BOS, s, r_1, .., r_h, SEP]`. The policy then acts in
//! turns, each a command ended by `EOS`:
//! - `[SEARCH, e, r, EOS]` calls the tool, which appends its observation `[RESULT,
//!   kb(e, r)]`;
//! - `[ANSWER, e, EOS]` answers and ends the episode;
//! - anything else (up to the first `EOS`, or `max_turn_tokens` tokens) is ill-formed: the
//!   tool appends `[RESULT, NONE]` and the episode goes on.
//!
//! An episode also ends after `max_turns` policy turns. Observation tokens are the tool's,
//! not the policy's: [`Transcript::policy_mask`] marks them 0 so they carry no gradient.
//!
//! **Rewards.** Gold is the outcome: 1 when the episode ends with the right answer, else 0
//! (exact match; for one-entity answers it equals token F1). The step rewards of a turn
//! ([`StepRewards`]) are the hackable proxies the G-RA paper gates: `format` (1 for a
//! well-formed command), `tool_call` (1 for a search) and `relevant` (1 for a search of a
//! lookup on the question's chain, a "relevant key"). Repeating one relevant search every
//! turn earns all three on every turn and never answers.
//!
//! **Generator** (the base policy's SFT data, [`MultihopWorld::sample_episode`]): each turn
//! is, with probability `follow`, the right next command (the next lookup of the chain, or
//! the answer once the chain is done), otherwise a uniformly random well-formed command
//! (search of a random pair, 3 in 4; an answer of a random entity, 1 in 4).

use goodhart_core::{seed, GoodhartError, Result};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

/// Padding token id.
pub const PAD: u32 = 0;
/// Beginning-of-sequence token id.
pub const BOS: u32 = 1;
/// Ends a turn (and a question's context is ended by [`SEP`]).
pub const EOS: u32 = 2;
/// Ends the question in the context.
pub const SEP: u32 = 3;
/// Opens a search command.
pub const SEARCH: u32 = 4;
/// Opens an answer command.
pub const ANSWER: u32 = 5;
/// Opens the tool's observation.
pub const RESULT: u32 = 6;
/// The tool's observation of an ill-formed command.
pub const NONE: u32 = 7;
/// Number of special tokens; relation tokens follow, then entity tokens.
pub const NUM_SPECIAL: u32 = 8;

/// Configuration of the multi-hop world (TOML `[multiturn.world]`).
///
/// Defaults: 24 entities, 4 relations, 32 questions of 1 or 2 hops, at most 4 turns of at
/// most 4 tokens, a generator that takes the right command 60% of the time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MultihopWorldConfig {
    /// Entity tokens.
    pub entities: usize,
    /// Relation tokens.
    pub relations: usize,
    /// Questions.
    pub questions: usize,
    /// Fewest hops of a question.
    pub min_hops: usize,
    /// Most hops of a question.
    pub max_hops: usize,
    /// Most policy turns of an episode.
    pub max_turns: usize,
    /// Most tokens of one turn (a command has 3 or 4 with its `EOS`).
    pub max_turn_tokens: usize,
    /// Probability that a generator turn is the right command.
    pub follow: f64,
    /// Seed of the world (knowledge base and questions).
    pub seed: u64,
}

impl Default for MultihopWorldConfig {
    fn default() -> Self {
        Self {
            entities: 24,
            relations: 4,
            questions: 32,
            min_hops: 1,
            max_hops: 2,
            max_turns: 4,
            max_turn_tokens: 4,
            follow: 0.6,
            seed: 0,
        }
    }
}

/// A question: a start entity and a path of relations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// The start entity.
    pub start: usize,
    /// The relations to follow, in order.
    pub path: Vec<usize>,
}

/// A parsed policy turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Turn {
    /// `SEARCH e r EOS`.
    Search {
        /// The entity searched.
        entity: usize,
        /// The relation searched.
        relation: usize,
    },
    /// `ANSWER e EOS`.
    Answer {
        /// The entity answered.
        entity: usize,
    },
    /// Anything else.
    Malformed,
}

/// The step rewards of one turn (each 0 or 1; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StepRewards {
    /// A well-formed command.
    pub format: f64,
    /// A search.
    pub tool_call: f64,
    /// A search of a lookup on the question's chain.
    pub relevant: f64,
}

/// An episode as tokens: the context, then each turn and its observation.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transcript {
    /// Every token, the question's context first.
    pub tokens: Vec<u32>,
    /// 1 on the policy's tokens (its turns), 0 on the context and the tool's observations.
    pub policy_mask: Vec<f32>,
    /// Per token, the index of the turn it belongs to (observations belong to the turn
    /// that called the tool); `None` on the context.
    pub turn: Vec<Option<usize>>,
    /// Per turn, the index one past its last policy token (where its observation starts).
    pub turn_ends: Vec<usize>,
}

/// The world: a knowledge base and its questions.
#[derive(Debug, Clone)]
pub struct MultihopWorld {
    config: MultihopWorldConfig,
    /// `kb[e][r]`: the object of `(e, r)`.
    kb: Vec<Vec<usize>>,
    questions: Vec<Question>,
}

impl MultihopWorld {
    /// Builds the world; errors on sizes that cannot make one, naming the key.
    pub fn new(config: MultihopWorldConfig) -> Result<Self> {
        let bad =
            |k: &str, why: String| GoodhartError::invalid(format!("multiturn.world.{k}"), why);
        let c = &config;
        if !(2..=100_000).contains(&c.entities) {
            return Err(bad(
                "entities",
                format!("{} is not 2 to 100,000", c.entities),
            ));
        }
        if !(1..=1_000).contains(&c.relations) {
            return Err(bad(
                "relations",
                format!("{} is not 1 to 1,000", c.relations),
            ));
        }
        if c.min_hops == 0 || c.max_hops < c.min_hops || c.max_hops > 8 {
            return Err(bad(
                "max_hops",
                format!(
                    "min_hops {} to max_hops {} is not a range of hops in 1 to 8",
                    c.min_hops, c.max_hops
                ),
            ));
        }
        // Distinct questions: start x paths of each length.
        let distinct: f64 = (c.min_hops..=c.max_hops)
            .map(|h| c.entities as f64 * (c.relations as f64).powi(h as i32))
            .sum();
        if c.questions == 0 || c.questions > 1_000_000 || c.questions as f64 > distinct {
            return Err(bad(
                "questions",
                format!(
                    "{} is not 1 to min(1,000,000, the {distinct} distinct questions)",
                    c.questions
                ),
            ));
        }
        if c.max_turns == 0 || c.max_turns > 64 {
            return Err(bad("max_turns", format!("{} is not 1 to 64", c.max_turns)));
        }
        if !(4..=64).contains(&c.max_turn_tokens) {
            return Err(bad(
                "max_turn_tokens",
                format!("{} is not 4 (the longest command) to 64", c.max_turn_tokens),
            ));
        }
        if !(0.0..=1.0).contains(&c.follow) {
            return Err(bad("follow", format!("{} is not a probability", c.follow)));
        }
        let mut rng = seed::rng(c.seed, "multihop-world");
        let kb: Vec<Vec<usize>> = (0..c.entities)
            .map(|e| {
                (0..c.relations)
                    .map(|_| {
                        // Another entity, uniformly.
                        let o = rng.random_range(0..c.entities - 1);
                        if o >= e {
                            o + 1
                        } else {
                            o
                        }
                    })
                    .collect()
            })
            .collect();
        let mut questions: Vec<Question> = Vec::with_capacity(c.questions);
        while questions.len() < c.questions {
            let hops = rng.random_range(c.min_hops..=c.max_hops);
            let q = Question {
                start: rng.random_range(0..c.entities),
                path: (0..hops)
                    .map(|_| rng.random_range(0..c.relations))
                    .collect(),
            };
            if !questions.contains(&q) {
                questions.push(q);
            }
        }
        Ok(Self {
            config,
            kb,
            questions,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &MultihopWorldConfig {
        &self.config
    }

    /// Vocabulary size (special tokens, relations, entities).
    pub fn vocab_size(&self) -> usize {
        NUM_SPECIAL as usize + self.config.relations + self.config.entities
    }

    /// Token id of relation `r`.
    pub fn relation_token(&self, r: usize) -> u32 {
        NUM_SPECIAL + r as u32
    }

    /// Token id of entity `e`.
    pub fn entity_token(&self, e: usize) -> u32 {
        NUM_SPECIAL + (self.config.relations + e) as u32
    }

    /// The relation a token names, if it names one.
    pub fn relation_of(&self, token: u32) -> Option<usize> {
        let r = token.checked_sub(NUM_SPECIAL)? as usize;
        (r < self.config.relations).then_some(r)
    }

    /// The entity a token names, if it names one.
    pub fn entity_of(&self, token: u32) -> Option<usize> {
        let e = (token.checked_sub(NUM_SPECIAL)? as usize).checked_sub(self.config.relations)?;
        (e < self.config.entities).then_some(e)
    }

    /// The tool: the object of `(entity, relation)`.
    pub fn lookup(&self, entity: usize, relation: usize) -> usize {
        self.kb[entity][relation]
    }

    /// The questions.
    pub fn questions(&self) -> &[Question] {
        &self.questions
    }

    /// The lookups that answer question `i`, in order: `(entity, relation)` pairs.
    pub fn chain(&self, i: usize) -> Vec<(usize, usize)> {
        let q = &self.questions[i];
        let mut at = q.start;
        q.path
            .iter()
            .map(|&r| {
                let step = (at, r);
                at = self.lookup(at, r);
                step
            })
            .collect()
    }

    /// The answer to question `i`.
    pub fn answer(&self, i: usize) -> usize {
        let q = &self.questions[i];
        q.path.iter().fold(q.start, |e, &r| self.lookup(e, r))
    }

    /// The answer turn's tokens `[ANSWER, answer, EOS]` (IGPO's pseudo-response scores
    /// them after each turn).
    pub fn answer_tokens(&self, i: usize) -> Vec<u32> {
        vec![ANSWER, self.entity_token(self.answer(i)), EOS]
    }

    /// The context of question `i`: `[BOS, s, r_1, .., r_h, SEP]`.
    pub fn context(&self, i: usize) -> Vec<u32> {
        let q = &self.questions[i];
        let mut out = vec![BOS, self.entity_token(q.start)];
        out.extend(q.path.iter().map(|&r| self.relation_token(r)));
        out.push(SEP);
        out
    }

    /// The longest context.
    pub fn max_context_len(&self) -> usize {
        self.config.max_hops + 3
    }

    /// The longest episode transcript: the context, then `max_turns` turns of
    /// `max_turn_tokens` tokens, each with a two-token observation.
    pub fn max_transcript_len(&self) -> usize {
        self.max_context_len() + self.config.max_turns * (self.config.max_turn_tokens + 2)
    }

    /// The question a context asks; errors when it is none of the world's.
    pub fn question_of(&self, context: &[u32]) -> Result<usize> {
        (0..self.questions.len())
            .find(|&i| self.context(i) == context)
            .ok_or_else(|| {
                GoodhartError::invalid("multihop context", "not a question of this world")
            })
    }

    /// Parses a turn: its tokens up to and including the first `EOS` (a turn without one
    /// is ill-formed).
    pub fn parse_turn(&self, tokens: &[u32]) -> Turn {
        let end = tokens.iter().position(|&t| t == EOS);
        match (end, tokens) {
            (Some(3), [SEARCH, e, r, ..]) => match (self.entity_of(*e), self.relation_of(*r)) {
                (Some(entity), Some(relation)) => Turn::Search { entity, relation },
                _ => Turn::Malformed,
            },
            (Some(2), [ANSWER, e, ..]) => match self.entity_of(*e) {
                Some(entity) => Turn::Answer { entity },
                None => Turn::Malformed,
            },
            _ => Turn::Malformed,
        }
    }

    /// The tool's observation of a turn: `[RESULT, object]` for a search, `[RESULT,
    /// NONE]` for an ill-formed turn, nothing for an answer.
    pub fn observe(&self, turn: Turn) -> Vec<u32> {
        match turn {
            Turn::Search { entity, relation } => {
                vec![RESULT, self.entity_token(self.lookup(entity, relation))]
            }
            Turn::Malformed => vec![RESULT, NONE],
            Turn::Answer { .. } => Vec::new(),
        }
    }

    /// The step rewards of a turn of question `i`.
    pub fn step_rewards(&self, i: usize, turn: Turn) -> StepRewards {
        match turn {
            Turn::Search { entity, relation } => StepRewards {
                format: 1.0,
                tool_call: 1.0,
                relevant: f64::from(u8::from(self.chain(i).contains(&(entity, relation)))),
            },
            Turn::Answer { .. } => StepRewards {
                format: 1.0,
                ..Default::default()
            },
            Turn::Malformed => StepRewards::default(),
        }
    }

    /// The outcome (gold) of an episode of question `i` given its turns: 1 when the last
    /// turn answers right, else 0. Turns after an answer are not part of an episode and
    /// make it wrong.
    pub fn outcome(&self, i: usize, turns: &[Turn]) -> f64 {
        let answered = turns.iter().position(|t| matches!(t, Turn::Answer { .. }));
        match (answered, turns.last()) {
            (Some(at), Some(Turn::Answer { entity }))
                if at + 1 == turns.len() && *entity == self.answer(i) =>
            {
                1.0
            }
            _ => 0.0,
        }
    }

    /// The checks of question `i` an episode with these turns passes, as unit tests (VeRPO's
    /// partial credit): one per lookup of its chain (searched at some turn), then the
    /// answer (the outcome). `hops + 1` values.
    pub fn checks_passed(&self, i: usize, turns: &[Turn]) -> Vec<bool> {
        let mut out: Vec<bool> = self
            .chain(i)
            .into_iter()
            .map(|(entity, relation)| turns.contains(&Turn::Search { entity, relation }))
            .collect();
        out.push(self.outcome(i, turns) == 1.0);
        out
    }

    /// Whether an episode with these turns is over: it answered, or used `max_turns`.
    pub fn is_done(&self, turns: &[Turn]) -> bool {
        turns.len() >= self.config.max_turns
            || turns.iter().any(|t| matches!(t, Turn::Answer { .. }))
    }

    /// The transcript of question `i` with these turns' tokens (each as the policy wrote
    /// it), the tool's observations appended after each.
    pub fn transcript(&self, i: usize, turns: &[Vec<u32>]) -> Transcript {
        let mut t = Transcript::default();
        for tok in self.context(i) {
            t.tokens.push(tok);
            t.policy_mask.push(0.0);
            t.turn.push(None);
        }
        for (k, turn) in turns.iter().enumerate() {
            for &tok in turn {
                t.tokens.push(tok);
                t.policy_mask.push(1.0);
                t.turn.push(Some(k));
            }
            t.turn_ends.push(t.tokens.len());
            for tok in self.observe(self.parse_turn(turn)) {
                t.tokens.push(tok);
                t.policy_mask.push(0.0);
                t.turn.push(Some(k));
            }
        }
        t
    }

    /// A command's tokens.
    pub fn turn_tokens(&self, turn: Turn) -> Vec<u32> {
        match turn {
            Turn::Search { entity, relation } => vec![
                SEARCH,
                self.entity_token(entity),
                self.relation_token(relation),
                EOS,
            ],
            Turn::Answer { entity } => vec![ANSWER, self.entity_token(entity), EOS],
            Turn::Malformed => vec![NONE, EOS],
        }
    }

    /// The right next command of question `i` after these turns: the first lookup of the
    /// chain whose object has not been observed yet in order, else the answer.
    pub fn next_right(&self, i: usize, turns: &[Turn]) -> Turn {
        let chain = self.chain(i);
        // How far along the chain the searches so far got.
        let mut done = 0;
        for t in turns {
            if let Turn::Search { entity, relation } = *t {
                if done < chain.len() && chain[done] == (entity, relation) {
                    done += 1;
                }
            }
        }
        match chain.get(done) {
            Some(&(entity, relation)) => Turn::Search { entity, relation },
            None => Turn::Answer {
                entity: self.answer(i),
            },
        }
    }

    /// A generator episode of question `i` (see the module docs): its turns' tokens.
    pub fn sample_episode(&self, i: usize, rng: &mut seed::ChaCha8Rng) -> Vec<Vec<u32>> {
        let c = &self.config;
        let mut turns: Vec<Turn> = Vec::new();
        while !self.is_done(&turns) {
            let turn = if rng.random::<f64>() < c.follow {
                self.next_right(i, &turns)
            } else if rng.random_range(0..4) < 3 {
                Turn::Search {
                    entity: rng.random_range(0..c.entities),
                    relation: rng.random_range(0..c.relations),
                }
            } else {
                Turn::Answer {
                    entity: rng.random_range(0..c.entities),
                }
            };
            turns.push(turn);
        }
        turns.into_iter().map(|t| self.turn_tokens(t)).collect()
    }

    /// A readable name of a token.
    pub fn token_text(&self, tok: u32) -> String {
        let names = [
            "<pad>", "<bos>", "<eos>", "<sep>", "search", "answer", "=", "none",
        ];
        if let Some(n) = names.get(tok as usize) {
            return (*n).into();
        }
        if let Some(r) = self.relation_of(tok) {
            return format!("r{r}");
        }
        match self.entity_of(tok) {
            Some(e) => format!("e{e}"),
            None => format!("<{tok}>"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> MultihopWorld {
        MultihopWorld::new(MultihopWorldConfig::default()).unwrap()
    }

    #[test]
    fn chains_and_answers_follow_the_knowledge_base() {
        let w = world();
        assert_eq!(w.vocab_size(), 8 + 4 + 24);
        for (e, objects) in w.kb.iter().enumerate() {
            assert!(objects.iter().all(|&o| o != e && o < 24));
        }
        let mut seen = Vec::new();
        for (i, q) in w.questions().iter().enumerate() {
            assert!((1..=2).contains(&q.path.len()));
            assert!(!seen.contains(q), "questions are distinct");
            seen.push(q.clone());
            // By hand: follow the relations one lookup at a time.
            let mut at = q.start;
            for (k, &r) in q.path.iter().enumerate() {
                assert_eq!(w.chain(i)[k], (at, r));
                at = w.kb[at][r];
            }
            assert_eq!(w.answer(i), at);
            assert_eq!(
                w.answer_tokens(i),
                [ANSWER, NUM_SPECIAL + 4 + at as u32, EOS]
            );
            assert_eq!(w.question_of(&w.context(i)).unwrap(), i);
            assert!(w.context(i).len() <= w.max_context_len());
        }
        assert!(w.question_of(&[BOS, SEP]).is_err());
        // The same seed, the same world; another seed, another.
        let again = world();
        assert_eq!((&again.kb, again.questions()), (&w.kb, w.questions()));
        let other = MultihopWorld::new(MultihopWorldConfig {
            seed: 1,
            ..Default::default()
        })
        .unwrap();
        assert_ne!(other.kb, w.kb);
    }

    #[test]
    fn the_grammar_parses_commands_and_nothing_else() {
        let w = world();
        let (e3, e5, r1) = (w.entity_token(3), w.entity_token(5), w.relation_token(1));
        assert_eq!(
            w.parse_turn(&[SEARCH, e3, r1, EOS]),
            Turn::Search {
                entity: 3,
                relation: 1
            }
        );
        assert_eq!(
            w.parse_turn(&[ANSWER, e5, EOS, PAD]),
            Turn::Answer { entity: 5 }
        );
        for bad in [
            vec![SEARCH, r1, e3, EOS],     // arguments swapped
            vec![SEARCH, e3, r1],          // no EOS
            vec![SEARCH, e3, r1, e5, EOS], // too long
            vec![ANSWER, r1, EOS],         // not an entity
            vec![ANSWER, e5, e3, EOS],
            vec![EOS],
            vec![],
        ] {
            assert_eq!(w.parse_turn(&bad), Turn::Malformed, "{bad:?}");
        }
        // Every command's tokens parse back to it.
        for t in [
            Turn::Search {
                entity: 0,
                relation: 3,
            },
            Turn::Answer { entity: 23 },
        ] {
            assert_eq!(w.parse_turn(&w.turn_tokens(t)), t);
        }
        assert_eq!(w.token_text(e3), "e3");
        assert_eq!(w.token_text(r1), "r1");
        assert_eq!(w.token_text(SEARCH), "search");
    }

    /// The right episode earns the outcome; farming one relevant search earns every step
    /// reward on every turn and no outcome; the tool's tokens are masked from the policy.
    #[test]
    fn right_answers_score_gold_and_farming_scores_only_steps() {
        let w = world();
        let i = (0..w.questions().len())
            .find(|&i| w.questions()[i].path.len() == 2)
            .unwrap();
        let chain = w.chain(i);
        let right: Vec<Turn> = chain
            .iter()
            .map(|&(entity, relation)| Turn::Search { entity, relation })
            .chain([Turn::Answer {
                entity: w.answer(i),
            }])
            .collect();
        // next_right walks the same chain.
        for k in 0..right.len() {
            assert_eq!(w.next_right(i, &right[..k]), right[k]);
        }
        assert_eq!(w.outcome(i, &right), 1.0);
        assert!(w.is_done(&right));
        assert_eq!(w.checks_passed(i, &right), [true, true, true]);
        let steps: Vec<StepRewards> = right.iter().map(|&t| w.step_rewards(i, t)).collect();
        assert_eq!(
            steps.iter().map(|s| s.relevant).sum::<f64>(),
            2.0,
            "both lookups are relevant"
        );
        assert_eq!(steps[2].tool_call, 0.0);
        assert_eq!(steps[2].format, 1.0);

        let (entity, relation) = chain[0];
        let farm = vec![Turn::Search { entity, relation }; w.config().max_turns];
        assert!(w.is_done(&farm));
        assert_eq!(w.outcome(i, &farm), 0.0);
        assert_eq!(w.checks_passed(i, &farm), [true, false, false]);
        for t in &farm {
            let s = w.step_rewards(i, *t);
            assert_eq!((s.format, s.tool_call, s.relevant), (1.0, 1.0, 1.0));
        }
        // A wrong answer, and a right answer followed by more turns, are wrong.
        let wrong = (w.answer(i) + 1) % 24;
        assert_eq!(w.outcome(i, &[Turn::Answer { entity: wrong }]), 0.0);
        let mut late = right.clone();
        late.push(Turn::Malformed);
        assert_eq!(w.outcome(i, &late), 0.0);
        assert_eq!(w.step_rewards(i, Turn::Malformed), StepRewards::default());

        // The transcript: context, then each turn and its observation.
        let tokens: Vec<Vec<u32>> = right.iter().map(|&t| w.turn_tokens(t)).collect();
        let tr = w.transcript(i, &tokens);
        let ctx = w.context(i).len();
        let mid = w.lookup(chain[0].0, chain[0].1);
        let mut want = w.context(i);
        want.extend(&tokens[0]);
        want.extend([RESULT, w.entity_token(mid)]);
        want.extend(&tokens[1]);
        want.extend([RESULT, w.entity_token(w.answer(i))]);
        want.extend(&tokens[2]);
        assert_eq!(tr.tokens, want);
        assert_eq!(tr.turn_ends, [ctx + 4, ctx + 10, ctx + 15]);
        // Policy tokens 1, the context and the tool's tokens 0.
        let mask: Vec<f32> = [
            vec![0.0; ctx],
            vec![1.0; 4],
            vec![0.0; 2],
            vec![1.0; 4],
            vec![0.0; 2],
            vec![1.0; 3],
        ]
        .concat();
        assert_eq!(tr.policy_mask, mask);
        assert_eq!(tr.turn[ctx - 1], None);
        assert_eq!(tr.turn[ctx + 4], Some(0), "the observation is its turn's");
        assert_eq!(tr.turn[ctx + 6], Some(1));
        assert!(tr.tokens.len() <= w.max_transcript_len());
    }

    /// The generator takes the right command at rate `follow`: with follow 1 every
    /// episode is right; at 0.6 the share of right first turns is 0.6 + 0.4 * (3/4 of a
    /// random search hitting the one right pair, 1 / (24 * 4)) within 4 standard errors.
    #[test]
    fn the_generator_follows_at_its_rate() {
        let sure = MultihopWorld::new(MultihopWorldConfig {
            follow: 1.0,
            ..Default::default()
        })
        .unwrap();
        let mut rng = seed::rng(3, "test");
        for i in 0..sure.questions().len() {
            let turns: Vec<Turn> = sure
                .sample_episode(i, &mut rng)
                .iter()
                .map(|t| sure.parse_turn(t))
                .collect();
            assert_eq!(sure.outcome(i, &turns), 1.0);
        }
        let w = world();
        let n = 20_000;
        let mut right = 0;
        for k in 0..n {
            let i = k % w.questions().len();
            let first = w.parse_turn(&w.sample_episode(i, &mut rng)[0]);
            right += usize::from(first == w.next_right(i, &[]));
        }
        let p = 0.6 + 0.4 * 0.75 / (24.0 * 4.0);
        let se = (p * (1.0 - p) / n as f64).sqrt();
        let got = right as f64 / n as f64;
        assert!((got - p).abs() < 4.0 * se, "{got} vs {p}");
    }

    #[test]
    fn bad_configs_name_their_key() {
        for (config, key) in [
            (
                MultihopWorldConfig {
                    entities: 1,
                    ..Default::default()
                },
                "entities",
            ),
            (
                MultihopWorldConfig {
                    min_hops: 3,
                    max_hops: 2,
                    ..Default::default()
                },
                "max_hops",
            ),
            (
                MultihopWorldConfig {
                    entities: 2,
                    relations: 1,
                    min_hops: 1,
                    max_hops: 1,
                    questions: 3,
                    ..Default::default()
                },
                "questions",
            ),
            (
                MultihopWorldConfig {
                    max_turn_tokens: 3,
                    ..Default::default()
                },
                "max_turn_tokens",
            ),
            (
                MultihopWorldConfig {
                    follow: 1.5,
                    ..Default::default()
                },
                "follow",
            ),
        ] {
            let err = MultihopWorld::new(config).unwrap_err().to_string();
            assert!(err.contains(&format!("multiturn.world.{key}")), "{err}");
        }
    }
}
