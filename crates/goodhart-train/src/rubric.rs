//! The rubric lab's rewards, task and measurements on goodhart-envs' rubric world
//! ([`goodhart_envs::rubric`]), after "Reward Hacking in Rubric-Based Reinforcement
//! Learning" (METHODS-labs.md section 1).
//!
//! - [`RubricVerifier`]: a [`RewardSource`] that grades every criterion of a response's
//!   rubric, a verifier with failure rates (the proxy) or the reference (the truth, the
//!   paper's unanimous panel); the reward is goodhart-reward's rubric score
//!   ([`Rubric::score`]) of its verdicts,
//!   `R = (sum_{w>0} w g + sum_{w<0} |w| (1 - g)) / sum |w|`.
//! - [`RubricTask`]: the world's prompts for the trainer ([`Task`]), in the prompt-only
//!   context (RL's) or the rubric-conditioned one.
//! - [`exploitation`]: the paper's exploitation rate between two checkpoints' verdicts on
//!   the same evaluation items (prompt and sample index), `sum w N J / sum w N` with
//!   `N = S(t) (1 - S(t-1))` the newly credited criteria and `J` the reference's
//!   rejection, and the exploited weight by failure mode.
//! - [`self_internalisation_gap`]: `mean_{i,j} [l_prompt(o_ij) - l_cond(o_ij)]`, the
//!   per-token mean log-probabilities under the policy of responses sampled in the
//!   rubric-conditioned context, scored in both contexts.
//! - [`base_examples`] and [`train_base`]: the base policy, SFT on the world's generator
//!   in both contexts.

use std::{collections::BTreeMap, sync::Mutex};

use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    Tensor, TensorData,
};
use goodhart_core::{seed, GoodhartError, Result};
use goodhart_envs::rubric::{
    systematic_uniform, FailureMode, RubricWorld, Verdict, VerifierErrors, VerifierRates, EOS, PAD,
};
use goodhart_policy::{score::score, sft::SftExample, TransformerLm};
use goodhart_reward::{
    rubric::{Criterion, Rubric},
    RewardOutput, RewardSource, Sequences,
};
use rand::RngExt as _;
use serde::{Deserialize, Serialize};

use crate::{
    policy_gradient::{host, host_rows},
    sft::{fine_tune, SftConfig},
    task::{token_texts, Task, TaskScores},
};

/// A verifier of the rubric world's criteria (see the module docs).
pub struct RubricVerifier<'a> {
    world: &'a RubricWorld,
    rubrics: Vec<Rubric>,
    rates: Option<VerifierRates>,
    draw: Draw,
    name: String,
}

/// Where a verifier's uniforms come from.
enum Draw {
    Systematic(u64),
    Random(Box<Mutex<seed::ChaCha8Rng>>),
}

impl<'a> RubricVerifier<'a> {
    /// A verifier named `name` crediting unmet criteria at `rates`, its errors fixed by
    /// the evidence or drawn afresh (`errors`), from `seed` (stream `rubric/verifier`
    /// for random errors). Errors on a rate that is not a probability or a prompt whose
    /// rubric is empty.
    pub fn new(
        world: &'a RubricWorld,
        name: &str,
        rates: VerifierRates,
        errors: VerifierErrors,
        seed: u64,
    ) -> Result<Self> {
        rates.validate("rates")?;
        let draw = match errors {
            VerifierErrors::Systematic => Draw::Systematic(seed),
            VerifierErrors::Random => {
                Draw::Random(Box::new(Mutex::new(seed::rng(seed, "rubric/verifier"))))
            }
        };
        Self::build(world, name, Some(rates), draw)
    }

    /// The reference: every criterion's truth.
    pub fn reference(world: &'a RubricWorld) -> Result<Self> {
        Self::build(world, "reference", None, Draw::Systematic(0))
    }

    fn build(
        world: &'a RubricWorld,
        name: &str,
        rates: Option<VerifierRates>,
        draw: Draw,
    ) -> Result<Self> {
        let rubrics = (0..world.config().prompts)
            .map(|i| {
                Rubric::new(
                    world
                        .rubric(i)
                        .iter()
                        .map(|w| Criterion {
                            text: world.criterion_text(w.criterion),
                            weight: w.weight,
                        })
                        .collect(),
                )
                .map_err(|e| GoodhartError::invalid("rubric.world.criteria", e))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            world,
            rubrics,
            rates,
            draw,
            name: name.into(),
        })
    }

    /// The verdicts on prompt `i`'s criteria for a response saying `concepts`.
    pub fn judge(&self, i: usize, concepts: &[usize]) -> Vec<Verdict> {
        let rates = self.rates.as_ref();
        match &self.draw {
            Draw::Systematic(seed) => self
                .world
                .judge(i, concepts, rates, &mut |e| systematic_uniform(*seed, e)),
            Draw::Random(rng) => {
                let mut rng = rng.lock().unwrap_or_else(|e| e.into_inner());
                self.world
                    .judge(i, concepts, rates, &mut |_| rng.random::<f64>())
            }
        }
    }

    /// The rubric score of prompt `i` for verdicts `credited`.
    pub fn reward(&self, i: usize, credited: &[bool]) -> f64 {
        self.rubrics[i].score(credited)
    }
}

impl<B: Backend> RewardSource<B> for RubricVerifier<'_> {
    fn name(&self) -> &str {
        &self.name
    }

    /// Each row's context (its real tokens outside the response) names the prompt; its
    /// response tokens are parsed up to `EOS`.
    fn score(&self, input: &Sequences<B>) -> Result<RewardOutput<B>> {
        let rows = host_rows(&input.tokens)?;
        let [n, t] = input.tokens.dims();
        let real = host(input.attention_mask.clone())?;
        let response = host(input.response_mask.clone())?;
        let rewards = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let at = |k: usize| r * t + k;
                let context: Vec<u32> = (0..t)
                    .filter(|&k| real[at(k)] > 0.5 && response[at(k)] < 0.5)
                    .map(|k| row[k])
                    .collect();
                let said: Vec<u32> = (0..t)
                    .filter(|&k| response[at(k)] > 0.5)
                    .map(|k| row[k])
                    .collect();
                let i = self.world.prompt_of(&context)?;
                let (concepts, _) = self.world.parse(&said);
                let credited: Vec<bool> = self
                    .judge(i, &concepts)
                    .iter()
                    .map(|v| v.credited)
                    .collect();
                Ok(self.reward(i, &credited) as f32)
            })
            .collect::<Result<Vec<f32>>>()?;
        RewardOutput::scalar(Tensor::from_data(
            TensorData::new(rewards, [n]),
            &input.tokens.device(),
        ))
    }
}

/// The rubric world's prompts against a verifier (the proxy), the reference as gold. A
/// response is ill-formed when a non-concept token comes before its `EOS`.
pub struct RubricTask<'a> {
    world: &'a RubricWorld,
    proxy: &'a RubricVerifier<'a>,
    gold: &'a RubricVerifier<'a>,
    prompts: Vec<Vec<u32>>,
    width: usize,
}

impl<'a> RubricTask<'a> {
    /// The task in the prompt-only context, or the rubric-conditioned one when
    /// `with_rubric`.
    pub fn new(
        world: &'a RubricWorld,
        proxy: &'a RubricVerifier<'a>,
        gold: &'a RubricVerifier<'a>,
        with_rubric: bool,
    ) -> Self {
        let prompts: Vec<Vec<u32>> = (0..world.config().prompts)
            .map(|i| {
                if with_rubric {
                    world.prompt_with_rubric(i)
                } else {
                    world.prompt(i)
                }
            })
            .collect();
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            world,
            proxy,
            gold,
            prompts,
            width,
        }
    }
}

impl<B: Backend> Task<B> for RubricTask<'_> {
    fn prompts(&self) -> usize {
        self.prompts.len()
    }

    fn prompt(&self, i: usize) -> &[u32] {
        &self.prompts[i]
    }

    fn prompt_width(&self) -> usize {
        self.width
    }

    fn vocab_size(&self) -> usize {
        self.world.vocab_size()
    }

    fn end_ids(&self) -> &[u32] {
        &[EOS]
    }

    fn pad_id(&self) -> u32 {
        PAD
    }

    fn proxy_members(&self) -> usize {
        1
    }

    fn proxy_max_seq_len(&self) -> Option<usize> {
        None
    }

    fn score(
        &self,
        _prompts: &[usize],
        batch: &Sequences<B>,
        responses: &[Vec<u32>],
    ) -> Result<TaskScores<B>> {
        let proxy = RewardSource::<B>::score(self.proxy, batch)?.reward;
        let gold = host(RewardSource::<B>::score(self.gold, batch)?.reward)?;
        Ok(TaskScores {
            members: proxy.clone().unsqueeze_dim(0),
            proxy,
            gold,
            ill_formed: responses.iter().map(|r| self.world.parse(r).1).collect(),
            parts: None,
            monitors: Vec::new(),
        })
    }

    fn text(&self, response: &[u32]) -> String {
        token_texts(response, |t| self.world.token_text(t))
    }

    fn anchor_examples(
        &self,
        n: usize,
        rng: &mut seed::ChaCha8Rng,
    ) -> Result<Vec<(Vec<u32>, usize)>> {
        Ok(base_examples(self.world, n, rng)
            .into_iter()
            .map(|(e, prompt_len)| (e.tokens.iter().map(|&t| t as u32).collect(), prompt_len))
            .collect())
    }
}

/// What the exploitation rate reads between two checkpoints.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Exploitation {
    /// `sum w N`: the weight of newly credited criteria.
    pub newly_credited: f64,
    /// `sum w N J`: the part of it the reference rejects.
    pub exploited: f64,
    /// `sum w N J` by failure mode (its name).
    pub by_mode: BTreeMap<String, f64>,
}

impl Exploitation {
    /// `sum w N J / sum w N`; `None` when nothing was newly credited.
    pub fn rate(&self) -> Option<f64> {
        (self.newly_credited > 0.0).then(|| self.exploited / self.newly_credited)
    }
}

/// The exploitation between the verdicts `before` and `now` on the same items (item `r`
/// answers prompt `prompts[r]`, its verdicts in rubric order); errors when the lists do
/// not line up.
pub fn exploitation(
    world: &RubricWorld,
    prompts: &[usize],
    before: &[Vec<Verdict>],
    now: &[Vec<Verdict>],
) -> Result<Exploitation> {
    if before.len() != prompts.len() || now.len() != prompts.len() {
        return Err(GoodhartError::shape(
            "verdicts",
            &[prompts.len()],
            &[before.len().min(now.len())],
        ));
    }
    let mut out = Exploitation::default();
    for ((&i, b), v) in prompts.iter().zip(before).zip(now) {
        let rubric = world.rubric(i);
        if b.len() != rubric.len() || v.len() != rubric.len() {
            return Err(GoodhartError::shape(
                "verdicts of a rubric",
                &[rubric.len()],
                &[v.len()],
            ));
        }
        for ((w, b), v) in rubric.iter().zip(b).zip(v) {
            if v.credited && !b.credited {
                out.newly_credited += w.weight;
                if !v.truth {
                    out.exploited += w.weight;
                    let mode = v.mode.map_or("none", FailureMode::name);
                    *out.by_mode.entry(mode.into()).or_default() += w.weight;
                }
            }
        }
    }
    Ok(out)
}

/// The self-internalisation gap of `policy` over `rows` (prompt, response tokens):
/// the mean over rows of the per-token mean log-probability of the response after the
/// prompt-only context less that after the rubric-conditioned one. 0 for a prompt whose
/// rubric is empty (the two contexts are one).
pub fn self_internalisation_gap<B: Backend>(
    policy: &TransformerLm<B>,
    world: &RubricWorld,
    rows: &[(usize, Vec<u32>)],
    device: &B::Device,
) -> Result<f64> {
    if rows.is_empty() || rows.iter().any(|(_, r)| r.is_empty()) {
        return Err(GoodhartError::Empty {
            what: "responses of the self-internalisation gap".into(),
        });
    }
    let mean_logprob = |context: &dyn Fn(usize) -> Vec<u32>| -> Result<Vec<f64>> {
        let contexts: Vec<Vec<u32>> = rows.iter().map(|(i, _)| context(*i)).collect();
        let pairs: Vec<(&[u32], &[u32])> = contexts
            .iter()
            .zip(rows)
            .map(|(c, (_, r))| (c.as_slice(), r.as_slice()))
            .collect();
        let seq = Sequences::<B>::from_pairs(&pairs, PAD, device)?;
        let lp = score(policy, seq.tokens, seq.attention_mask, 1.0)?.logprobs;
        let per_token = (lp * seq.response_mask.clone()).sum_dim(1) / seq.response_mask.sum_dim(1);
        host(per_token)
    };
    let prompt_only = mean_logprob(&|i| world.prompt(i))?;
    let conditioned = mean_logprob(&|i| world.prompt_with_rubric(i))?;
    let n = rows.len() as f64;
    Ok(prompt_only
        .iter()
        .zip(&conditioned)
        .map(|(p, c)| p - c)
        .sum::<f64>()
        / n)
}

/// `n` generator sequences (context then response), half in each context (a coin per
/// sequence), prompts uniform, each with its context's length: the base policy's data.
pub fn base_examples(
    world: &RubricWorld,
    n: usize,
    rng: &mut seed::ChaCha8Rng,
) -> Vec<(SftExample, usize)> {
    (0..n)
        .map(|_| {
            let i = rng.random_range(0..world.config().prompts);
            let with_rubric = rng.random::<bool>();
            let context = if with_rubric {
                world.prompt_with_rubric(i)
            } else {
                world.prompt(i)
            };
            let response = world.sample_response(i, with_rubric, rng);
            let tokens: Vec<usize> = context
                .iter()
                .chain(&response)
                .map(|&x| x as usize)
                .collect();
            let mut mask = vec![0.0; tokens.len()];
            mask[context.len()..].iter_mut().for_each(|m| *m = 1.0);
            (
                SftExample {
                    tokens,
                    loss_mask: Some(mask),
                },
                context.len(),
            )
        })
        .collect()
}

/// What the base policy's SFT reached.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseReport {
    /// Held-out NLL per response token before training (about `ln V`).
    pub initial_nll: f64,
    /// Held-out NLL per response token after.
    pub heldout_nll: f64,
}

/// The base policy: `cfg`'s transformer for the world's vocabulary, SFT on
/// [`base_examples`] (streams `rubric/sft/init`, `rubric/sft/examples`,
/// `rubric/sft/heldout`, `rubric/sft/order` of `seed`). Errors when the longest context
/// and a generator response do not fit `cfg.max_seq_len`.
pub fn train_base<B: AutodiffBackend>(
    world: &RubricWorld,
    cfg: &SftConfig,
    seed: u64,
    device: &B::Device,
) -> Result<(TransformerLm<B>, BaseReport)> {
    let need = world.max_prompt_len() + world.config().max_len + 1;
    if cfg.max_seq_len < need {
        return Err(GoodhartError::invalid(
            "sft.max_seq_len",
            format!(
                "{} cannot hold a rubric-conditioned context and a response ({need} tokens)",
                cfg.max_seq_len
            ),
        ));
    }
    let model = seed::seeded::<B, _>(device, seed, "rubric/sft/init", || {
        cfg.transformer(world.vocab_size()).init::<B>(device)
    })?;
    let examples = |n: usize, stream: &str| -> Vec<SftExample> {
        base_examples(world, n, &mut seed::rng(seed, stream))
            .into_iter()
            .map(|(e, _)| e)
            .collect()
    };
    let data = examples(cfg.examples, "rubric/sft/examples");
    let held = examples(cfg.heldout, "rubric/sft/heldout");
    let order = seed::derive(seed, "rubric/sft/order");
    let fit = fine_tune(model, &data, &held, cfg, PAD as usize, order)?;
    Ok((
        fit.model,
        BaseReport {
            initial_nll: fit.initial_nll,
            heldout_nll: fit.heldout_nll,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::{cpu, Autodiff, Dispatch};
    use goodhart_envs::rubric::{Criterion as WorldCriterion, RubricWorldConfig};
    use goodhart_policy::TransformerConfig;

    fn world() -> RubricWorld {
        RubricWorld::new(RubricWorldConfig::default()).unwrap()
    }

    #[test]
    fn the_reward_is_the_rubric_score_by_hand() {
        let w = world();
        let reference = RubricVerifier::reference(&w).unwrap();
        // Prompt 0's weights, and a response that says the first criterion's concepts
        // only: the score is the met weight over the total.
        let rubric = w.rubric(0);
        let total: f64 = rubric.iter().map(|c| c.weight).sum();
        let said: Vec<usize> = match rubric[0].criterion {
            WorldCriterion::Has(c) => vec![c],
            WorldCriterion::And(a, b) => vec![a, b],
            WorldCriterion::Enum { topic, n } => w.members(topic)[..n].to_vec(),
        };
        let verdicts = reference.judge(0, &said);
        let met: f64 = rubric
            .iter()
            .zip(&verdicts)
            .filter(|(_, v)| v.truth)
            .map(|(c, _)| c.weight)
            .sum();
        assert!(verdicts[0].truth);
        let credited: Vec<bool> = verdicts.iter().map(|v| v.credited).collect();
        assert_eq!(reference.reward(0, &credited), met / total);
        // By hand on made-up weights 2, 1, 3 with the first and last met: 5 / 6.
        let r = Rubric::new(
            [2.0, 1.0, 3.0]
                .iter()
                .map(|&weight| Criterion {
                    text: "x".into(),
                    weight,
                })
                .collect(),
        )
        .unwrap();
        assert_eq!(r.score(&[true, false, true]), 5.0 / 6.0);
        // Through the RewardSource: a batch of left-padded contexts and responses.
        type B = Dispatch;
        let device = cpu();
        let t = |c: usize| w.concept_token(c);
        let mut resp: Vec<u32> = said.iter().map(|&c| t(c)).collect();
        resp.push(EOS);
        let cond = w.prompt_with_rubric(0);
        let pairs: Vec<(&[u32], &[u32])> = vec![(&cond, &resp), (&[1, 8 + 1, 3], &[EOS])];
        let seq = Sequences::<B>::from_pairs(&pairs, PAD, &device).unwrap();
        let got = host(RewardSource::<B>::score(&reference, &seq).unwrap().reward).unwrap();
        assert!((got[0] - met / total).abs() < 1e-6, "{got:?}");
        assert_eq!(got[1], 0.0);
        // An empty rubric has no reward: the verifier refuses the world.
        let none = RubricWorld::new(RubricWorldConfig {
            criteria: 0,
            ..Default::default()
        })
        .unwrap();
        assert!(RubricVerifier::reference(&none).is_err());
    }

    fn verdict(truth: bool, credited: bool, mode: Option<FailureMode>) -> Verdict {
        Verdict {
            truth,
            credited,
            mode,
        }
    }

    #[test]
    fn exploitation_rate_by_hand() {
        let w = world();
        let weights: Vec<f64> = w.rubric(0).iter().map(|c| c.weight).collect();
        let (f, t) = (false, true);
        use FailureMode::*;
        // Item 0 answers prompt 0. Criterion 0 newly credited and true; 1 newly credited,
        // false (missing conjunct); 2 credited before and now, false; 3 newly credited,
        // false (topical); 4 not credited.
        let before = vec![vec![
            verdict(f, f, None),
            verdict(f, f, None),
            verdict(f, t, Some(TopicalAlignment)),
            verdict(f, f, None),
            verdict(f, f, None),
        ]];
        let now = vec![vec![
            verdict(t, t, None),
            verdict(f, t, Some(MissingConjunct)),
            verdict(f, t, Some(TopicalAlignment)),
            verdict(f, t, Some(TopicalAlignment)),
            verdict(f, f, Some(InferredContent)),
        ]];
        let e = exploitation(&w, &[0], &before, &now).unwrap();
        let newly = weights[0] + weights[1] + weights[3];
        assert_eq!(e.newly_credited, newly);
        assert_eq!(e.exploited, weights[1] + weights[3]);
        assert_eq!(e.rate(), Some((weights[1] + weights[3]) / newly));
        assert_eq!(e.by_mode["missing_conjunct"], weights[1]);
        assert_eq!(e.by_mode["topical_alignment"], weights[3]);
        assert_eq!(e.by_mode.len(), 2);
        // Nothing newly credited: no rate.
        assert_eq!(exploitation(&w, &[0], &now, &now).unwrap().rate(), None);
        assert!(exploitation(&w, &[0, 1], &before, &now).is_err());
    }

    #[test]
    fn the_gap_is_zero_without_a_rubric_and_a_kl_estimate_with_one() {
        type B = Dispatch;
        let device = cpu();
        let none = RubricWorld::new(RubricWorldConfig {
            criteria: 0,
            ..Default::default()
        })
        .unwrap();
        let w = world();
        let policy = seed::seeded::<B, _>(&device, 3, "test", || {
            TransformerConfig::new(w.vocab_size(), 16, 1, 2, 32).init::<B>(&device)
        })
        .unwrap();
        let mut rng = seed::rng(0, "r");
        let rows: Vec<(usize, Vec<u32>)> = (0..12)
            .map(|k| (k % 16, none.sample_response(k % 16, true, &mut rng)))
            .collect();
        assert_eq!(
            self_internalisation_gap(&policy, &none, &rows, &device).unwrap(),
            0.0
        );
        // With rubrics: the mean of per-row differences, computed row by row.
        let rows: Vec<(usize, Vec<u32>)> = (0..6)
            .map(|k| (k, w.sample_response(k, true, &mut rng)))
            .collect();
        let gap = self_internalisation_gap(&policy, &w, &rows, &device).unwrap();
        let one = |ctx: Vec<u32>, r: &[u32]| -> f64 {
            let pairs: Vec<(&[u32], &[u32])> = vec![(&ctx, r)];
            let s = Sequences::<B>::from_pairs(&pairs, PAD, &device).unwrap();
            let lp = host(
                score(&policy, s.tokens, s.attention_mask, 1.0)
                    .unwrap()
                    .logprobs,
            )
            .unwrap();
            lp[ctx.len()..].iter().sum::<f64>() / r.len() as f64
        };
        let want = rows
            .iter()
            .map(|(i, r)| one(w.prompt(*i), r) - one(w.prompt_with_rubric(*i), r))
            .sum::<f64>()
            / 6.0;
        assert!((gap - want).abs() < 1e-5, "{gap} vs {want}");
        assert!(gap != 0.0);
        assert!(self_internalisation_gap(&policy, &w, &[], &device).is_err());
    }

    #[test]
    fn base_policy_learns_both_contexts() {
        type A = Autodiff<Dispatch>;
        let device = cpu();
        let w = world();
        let cfg = SftConfig {
            steps: 150,
            examples: 2048,
            heldout: 256,
            ..SftConfig::default()
        };
        let (_, report) = train_base::<A>(&w, &cfg, 0, &device).unwrap();
        // ln V is the untrained NLL; the generator's responses are far from uniform.
        let ln_v = (w.vocab_size() as f64).ln();
        assert!((report.initial_nll - ln_v).abs() < 0.3, "{report:?}");
        assert!(report.heldout_nll < report.initial_nll - 0.3, "{report:?}");
        let short = SftConfig {
            max_seq_len: 12,
            ..cfg
        };
        let e = train_base::<A>(&w, &short, 0, &device)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sft.max_seq_len"), "{e}");
    }
}
