//! What an RL run samples and scores ([`Task`]): its prompts, how a response ends, and
//! the proxy and gold rewards of a batch. The trainer ([`crate::policy_gradient`]) and
//! best-of-n sampling read a task and nothing else about the data.
//!
//! - [`LanguageTask`]: the synthetic language's topics, a proxy of learned reward models
//!   and the language's gold (the lab's default);
//! - [`TextTask`]: a prompt set ([`crate::data`]) encoded by a Hugging Face tokenizer
//!   (chat prompts through its chat template), with text rewards
//!   ([`goodhart_reward::TextRewardConfig`]) as proxy and gold on the decoded responses.
//!
//! Every prompt is left-padded to the task's [`Task::prompt_width`], so the responses of
//! all batches start at the same column. A task may also name monitors
//! ([`Task::monitors`]: scores of every sample, never trained on; on the language task a
//! held-out proxy, a reward, and [`EmbeddingOod`], how far the proxy's embedding of a
//! sample lies from its embeddings of the data it was trained on). [`encode_preferences`]
//! encodes a preference set for the offline preference trainer the way [`TextTask`]
//! encodes prompts.

use burn::tensor::{backend::Backend, Tensor};
use goodhart_core::{seed, GoodhartError, Result};
use goodhart_envs::language::{Language, EOS, PAD};
use goodhart_metrics::ood::Mahalanobis;
use goodhart_policy::{
    chat_template::ChatMessage, tokenizer::Tokenizer, GenerationConfig, HfTokenizer, TransformerLm,
};
use goodhart_reward::{rubric::Rubric, Composite, RewardModel, RewardSource, Sequences, Texts};

use crate::{
    data::{PreferenceRow, PromptRow, Text},
    policy_gradient::{host, response_words, Proxy, Scored},
    preference::PreferencePair,
    sft::{generator_examples, PROMPT_LEN},
};

/// The scores of one batch.
#[derive(Debug, Clone)]
pub struct TaskScores<B: Backend> {
    /// Every proxy member's score `[K, N]` (`K = 1` for a single source).
    pub members: Tensor<B, 2>,
    /// The proxy `[N]`.
    pub proxy: Tensor<B, 1>,
    /// The gold of each row.
    pub gold: Vec<f64>,
    /// Whether each response is ill-formed (the task says what that means).
    pub ill_formed: Vec<bool>,
    /// The proxy's named components `[P, N]`, in [`Task::proxy_parts`] order (`None`
    /// when it names none).
    pub parts: Option<Tensor<B, 2>>,
    /// Each monitor's score of each row, in [`Task::monitors`] order (none by default).
    pub monitors: Vec<Vec<f64>>,
}

/// Prompts, response ends and rewards of an RL run.
pub trait Task<B: Backend> {
    /// Number of prompts; the trainer draws prompt indices in `0..prompts()`.
    fn prompts(&self) -> usize;
    /// The token ids of prompt `i` (non-empty, at most [`Task::prompt_width`]).
    fn prompt(&self, i: usize) -> &[u32];
    /// The width prompts are left-padded to: the longest prompt's length.
    fn prompt_width(&self) -> usize;
    /// The vocabulary size the policy must have.
    fn vocab_size(&self) -> usize;
    /// The ids that end a response; the first is the generation's EOS.
    fn end_ids(&self) -> &[u32];
    /// The padding id.
    fn pad_id(&self) -> u32;
    /// Number of proxy members (1 for a single source).
    fn proxy_members(&self) -> usize;
    /// The longest sequence the proxy reads, when it is bounded.
    fn proxy_max_seq_len(&self) -> Option<usize>;
    /// The names of the proxy's components, logged one by one (`reward/proxy/<name>`);
    /// none by default.
    fn proxy_parts(&self) -> &[String] {
        &[]
    }
    /// Scores a batch: row `r` answers prompt `prompts[r]`; `batch` holds the prompts
    /// (left-padded to [`Task::prompt_width`]) and responses; `responses[r]` is row `r`'s
    /// response up to and including its end id.
    fn score(
        &self,
        prompts: &[usize],
        batch: &Sequences<B>,
        responses: &[Vec<u32>],
    ) -> Result<TaskScores<B>>;
    /// The names of scores measured on every sample but never trained on, logged as
    /// `reward/<name>/{mean,std,min,max}` and `gap/<name>` when monitor `i` is a reward
    /// ([`Task::monitor_is_reward`]; a held-out proxy: a gold-free view of how far the
    /// training proxy can be trusted), else as `<name>/{mean,std,min,max}`; none by
    /// default.
    fn monitors(&self) -> &[String] {
        &[]
    }
    /// Whether monitor `i` of [`Task::monitors`] is a reward (true by default).
    fn monitor_is_reward(&self, _i: usize) -> bool {
        true
    }
    /// A response as text (`samples.jsonl`).
    fn text(&self, response: &[u32]) -> String;
    /// What scoring has cost so far ([`RewardSource::usage`]), keyed `proxy/<...>` and
    /// `gold/<...>`; none by default.
    fn reward_usage(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
    /// `n` sequences of the data the base policy was fine-tuned on, each with its prompt
    /// length (SFT anchoring); errors for a task without such data.
    fn anchor_examples(
        &self,
        n: usize,
        rng: &mut seed::ChaCha8Rng,
    ) -> Result<Vec<(Vec<u32>, usize)>>;
    /// Whether responses are episodes of turns ([`Task::sample_turns`]); the turn-level
    /// estimators (`gra`, `a2tgpo`, `igpo`) need such a task. False by default.
    fn multi_turn(&self) -> bool {
        false
    }
    /// For a multi-turn task: samples and scores one episode per prompt index, turn by
    /// turn, with its turn data ([`Scored::turns`]). `None` (the default): the trainer
    /// samples one response per prompt ([`crate::policy_gradient::sample_and_score`]).
    fn sample_turns(
        &self,
        _policy: &TransformerLm<B>,
        _prompts: &[usize],
        _generation: &GenerationConfig,
        _rng: &mut seed::ChaCha8Rng,
        _device: &B::Device,
    ) -> Option<Result<Scored<B>>> {
        None
    }
}

/// The synthetic language: prompt `t` is topic `t`'s `[BOS, topic, SEP]`; the proxy an
/// ensemble of reward models; gold [`crate::policy_gradient::gold_reward`] (any source of [`Sequences`] in
/// tests). A response is ill-formed when a non-word token comes before `EOS`.
pub struct LanguageTask<'a, B: Backend> {
    lang: &'a Language,
    proxy: &'a Proxy<B>,
    gold: &'a dyn RewardSource<B>,
    prompts: Vec<Vec<u32>>,
    monitor_names: Vec<String>,
    monitors: Vec<Monitor<'a, B>>,
}

/// A score of every sample of a [`LanguageTask`] that it does not train on.
#[derive(Clone, Copy)]
pub enum Monitor<'a, B: Backend> {
    /// A proxy's reward (e.g. a reward model trained on other pairs).
    Reward(&'a Proxy<B>),
    /// A reward model's out-of-distribution score ([`EmbeddingOod`]), not a reward.
    Ood(&'a EmbeddingOod<B>),
}

/// How far a reward model's embedding of a sample ([`RewardModel::embeddings`]) lies
/// from its embeddings of a reference sample: the Mahalanobis distance
/// ([`goodhart_metrics::ood::Mahalanobis`]) under the Gaussian fitted to the reference
/// embeddings. With the reference drawn from the distribution the reward model was
/// trained on, a policy that drifts to samples unlike that data scores high (Lee et al.
/// 2018's detector, on a reward model's features).
pub struct EmbeddingOod<B: Backend> {
    model: RewardModel<B>,
    gaussian: Mahalanobis,
}

impl<B: Backend> EmbeddingOod<B> {
    /// Fits the Gaussian to `model`'s embeddings of `reference`, its covariance shrunk by
    /// `shrinkage` (see [`Mahalanobis::fit`], whose errors it returns).
    pub fn fit(model: RewardModel<B>, reference: &Sequences<B>, shrinkage: f64) -> Result<Self> {
        let rows = embedding_rows(&model, reference)?;
        let gaussian = Mahalanobis::fit(&rows, shrinkage)?;
        Ok(Self { model, gaussian })
    }

    /// The distance of each row of `batch`.
    pub fn score(&self, batch: &Sequences<B>) -> Result<Vec<f64>> {
        embedding_rows(&self.model, batch)?
            .iter()
            .map(|r| self.gaussian.distance(r))
            .collect()
    }
}

/// `model`'s embedding of each row of `batch`, on the host.
fn embedding_rows<B: Backend>(
    model: &RewardModel<B>,
    batch: &Sequences<B>,
) -> Result<Vec<Vec<f64>>> {
    let e = model.embeddings(batch.tokens.clone(), batch.attention_mask.clone())?;
    let [n, d] = e.dims();
    let flat = host(e.reshape([n * d]))?;
    Ok(flat.chunks(d.max(1)).map(<[f64]>::to_vec).collect())
}

impl<'a, B: Backend> LanguageTask<'a, B> {
    /// The task of `lang` against `proxy`, gold measured by `gold`.
    pub fn new(lang: &'a Language, proxy: &'a Proxy<B>, gold: &'a dyn RewardSource<B>) -> Self {
        let prompts = (0..lang.config().topics).map(|t| lang.prompt(t)).collect();
        Self {
            lang,
            proxy,
            gold,
            prompts,
            monitor_names: Vec::new(),
            monitors: Vec::new(),
        }
    }

    /// The task with `monitor` (e.g. a proxy trained on other pairs) scoring every
    /// sample as [`Task::monitors`]' `name`.
    pub fn with_monitor(mut self, name: &str, monitor: Monitor<'a, B>) -> Self {
        self.monitor_names.push(name.into());
        self.monitors.push(monitor);
        self
    }
}

impl<B: Backend> Task<B> for LanguageTask<'_, B> {
    fn prompts(&self) -> usize {
        self.prompts.len()
    }

    fn prompt(&self, i: usize) -> &[u32] {
        &self.prompts[i]
    }

    fn prompt_width(&self) -> usize {
        PROMPT_LEN
    }

    fn vocab_size(&self) -> usize {
        self.lang.vocab_size()
    }

    fn end_ids(&self) -> &[u32] {
        &[EOS]
    }

    fn pad_id(&self) -> u32 {
        PAD
    }

    fn proxy_members(&self) -> usize {
        self.proxy.members().len()
    }

    fn proxy_max_seq_len(&self) -> Option<usize> {
        self.proxy
            .members()
            .iter()
            .map(|m| m.trunk.max_seq_len())
            .min()
    }

    fn score(
        &self,
        _prompts: &[usize],
        batch: &Sequences<B>,
        responses: &[Vec<u32>],
    ) -> Result<TaskScores<B>> {
        let scored = self.proxy.score(batch)?;
        let members = scored
            .members
            .unwrap_or_else(|| scored.reward.clone().unsqueeze_dim(0));
        let gold = host(self.gold.score(batch)?.reward)?;
        let ill_formed = responses
            .iter()
            .map(|r| response_words(self.lang, r).1)
            .collect();
        let monitors = self
            .monitors
            .iter()
            .map(|m| match m {
                Monitor::Reward(p) => host(p.score(batch)?.reward),
                Monitor::Ood(o) => o.score(batch),
            })
            .collect::<Result<_>>()?;
        Ok(TaskScores {
            members,
            proxy: scored.reward,
            gold,
            ill_formed,
            parts: None,
            monitors,
        })
    }

    fn monitors(&self) -> &[String] {
        &self.monitor_names
    }

    fn monitor_is_reward(&self, i: usize) -> bool {
        matches!(self.monitors.get(i), Some(Monitor::Reward(_)))
    }

    fn text(&self, response: &[u32]) -> String {
        token_texts(response, |t| self.lang.token_text(t))
    }

    fn anchor_examples(
        &self,
        n: usize,
        rng: &mut seed::ChaCha8Rng,
    ) -> Result<Vec<(Vec<u32>, usize)>> {
        Ok(generator_examples(self.lang, n, rng)
            .into_iter()
            .map(|e| (e.tokens.iter().map(|&t| t as u32).collect(), PROMPT_LEN))
            .collect())
    }
}

/// A synthetic task's response as text: each token's name, space-separated.
pub(crate) fn token_texts(response: &[u32], name: impl Fn(u32) -> String) -> String {
    response
        .iter()
        .map(|&t| name(t))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A prompt set encoded by a Hugging Face tokenizer, scored on the decoded responses.
///
/// A chat row (a `messages` list) is rendered with the tokenizer's chat template, the
/// generation prompt added; a plain row is encoded as `tokenizer(text)` does, or as one
/// user message through the chat template when `chat` is set. A response is decoded
/// with special tokens skipped; it is ill-formed when its bytes are not valid UTF-8
/// (the decoder then writes U+FFFD) or it holds an id past the tokenizer's vocabulary
/// (a padded embedding row, decoded as nothing).
pub struct TextTask<B: Backend> {
    tokenizer: HfTokenizer,
    prompts: Vec<Vec<u32>>,
    prompt_texts: Vec<String>,
    questions: Vec<String>,
    answers: Vec<Option<String>>,
    rubrics: Vec<Option<Rubric>>,
    width: usize,
    vocab: usize,
    end: Vec<u32>,
    pad: u32,
    proxy: Composite<B, Texts<B>>,
    parts: Vec<String>,
    gold: Box<dyn RewardSource<B, Texts<B>>>,
}

/// How a [`TextTask`] encodes and ends its prompts and responses.
#[derive(Debug, Clone)]
pub struct TextTaskSpec {
    /// The policy's vocabulary size (at least the tokenizer's).
    pub vocab_size: usize,
    /// Ids that end a response (the model's EOS ids); at least one.
    pub end_ids: Vec<u32>,
    /// The padding id.
    pub pad_id: u32,
    /// Render plain prompts as a user message through the chat template.
    pub chat: bool,
    /// The longest prompt allowed, in tokens.
    pub max_prompt_len: usize,
}

impl<B: Backend> TextTask<B> {
    /// Encodes `rows` with `tokenizer`, against `proxy` (its components named `parts`
    /// are logged one by one; give none for a single reward). Errors name the row: a
    /// prompt that encodes to no tokens or to more than `spec.max_prompt_len`, a chat
    /// prompt without a chat template; and an empty set or no end id.
    pub fn new(
        tokenizer: HfTokenizer,
        rows: &[PromptRow],
        spec: &TextTaskSpec,
        proxy: (Composite<B, Texts<B>>, Vec<String>),
        gold: Box<dyn RewardSource<B, Texts<B>>>,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(GoodhartError::Empty {
                what: "prompt set".into(),
            });
        }
        if spec.end_ids.is_empty() {
            return Err(GoodhartError::invalid(
                "policy",
                "the model names no EOS id (config.json / generation_config.json)",
            ));
        }
        let mut prompts = Vec::with_capacity(rows.len());
        let mut prompt_texts = Vec::with_capacity(rows.len());
        let mut questions = Vec::with_capacity(rows.len());
        for row in rows {
            let at = |reason: String| GoodhartError::invalid(format!("data ({})", row.at), reason);
            let (text, ids) = encode_prompt(&tokenizer, &row.prompt, spec.chat).map_err(at)?;
            if ids.len() > spec.max_prompt_len {
                return Err(at(format!(
                    "the prompt is {} tokens, over the {} that fit before max_new_tokens",
                    ids.len(),
                    spec.max_prompt_len
                )));
            }
            prompts.push(ids);
            prompt_texts.push(text);
            questions.push(match &row.prompt {
                Text::Plain(p) => p.clone(),
                Text::Chat(messages) => messages
                    .iter()
                    .map(|m| format!("{}: {}", m.role, m.content))
                    .collect::<Vec<_>>()
                    .join("\n"),
            });
        }
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        Ok(Self {
            tokenizer,
            prompts,
            prompt_texts,
            questions,
            answers: rows.iter().map(|r| r.answer.clone()).collect(),
            rubrics: rows.iter().map(|r| r.rubric.clone()).collect(),
            width,
            vocab: spec.vocab_size,
            end: spec.end_ids.clone(),
            pad: spec.pad_id,
            proxy: proxy.0,
            parts: proxy.1,
            gold,
        })
    }

    /// The decoded text of `ids` (special tokens skipped).
    fn decode(&self, ids: &[u32]) -> Result<String> {
        let ids: Vec<u32> = ids
            .iter()
            .copied()
            .filter(|t| !self.end.contains(t))
            .collect();
        self.tokenizer.decode(&ids)
    }
}

/// A prompt's text and token ids as [`TextTask`] encodes them: a chat through the chat
/// template with the generation prompt added; plain text as `tokenizer(text)` does, or
/// as one user message through the template when `chat`. Errors say why (no template,
/// no tokens).
fn encode_prompt(
    tokenizer: &HfTokenizer,
    prompt: &Text,
    chat: bool,
) -> std::result::Result<(String, Vec<u32>), String> {
    let template = |messages: &[ChatMessage]| {
        tokenizer
            .apply_chat_template(messages, true, &Default::default())
            .map_err(|e| e.to_string())
    };
    let (text, ids) = match prompt {
        Text::Chat(messages) => template(messages)?,
        Text::Plain(p) if chat => template(&[ChatMessage::new("user", p.as_str())])?,
        Text::Plain(p) => (
            p.clone(),
            tokenizer
                .encode_with_special_tokens(p)
                .map_err(|e| e.to_string())?,
        ),
    };
    if ids.is_empty() {
        return Err("the prompt encodes to no tokens".into());
    }
    Ok((text, ids))
}

/// A response's token ids after its prompt, ending with an end id.
///
/// Plain text is encoded without added special tokens and the first of `end_ids`
/// appended. A chat (the assistant's messages) is rendered after the prompt's messages
/// through the chat template, and the part past `head` (the prompt as [`encode_prompt`]
/// rendered it, generation prompt included) is encoded, as TRL does for conversational
/// pairs; it is cut after its first
/// end id (the template's end-of-turn), or given one when it has none.
fn encode_response(
    tokenizer: &HfTokenizer,
    prompt: &Text,
    head: &str,
    response: &Text,
    chat: bool,
    end_ids: &[u32],
) -> std::result::Result<Vec<u32>, String> {
    let mut ids = match response {
        Text::Plain(r) => tokenizer.encode(r).map_err(|e| e.to_string())?,
        Text::Chat(reply) => {
            let mut messages = match prompt {
                Text::Chat(m) => m.clone(),
                Text::Plain(p) if chat => vec![ChatMessage::new("user", p.as_str())],
                Text::Plain(_) => {
                    return Err(
                        "a chat response needs a chat prompt (or `data.chat = true`)".into(),
                    )
                }
            };
            messages.extend(reply.iter().cloned());
            let template = tokenizer
                .chat_template()
                .ok_or("the tokenizer has no chat template")?;
            let full = template
                .render(&messages, false, &Default::default())
                .map_err(|e| e.to_string())?;
            let tail = full.strip_prefix(head).ok_or(
                "the chat template renders the prompt differently once the response follows it",
            )?;
            tokenizer.encode(tail).map_err(|e| e.to_string())?
        }
    };
    match ids.iter().position(|t| end_ids.contains(t)) {
        Some(i) => ids.truncate(i + 1),
        None => ids.push(end_ids[0]),
    }
    if ids.len() < 2 {
        return Err("the response encodes to no tokens".into());
    }
    Ok(ids)
}

/// The pairs of a preference set encoded for [`crate::preference::train`]: prompts as
/// [`TextTask`] encodes them, responses by `encode_response` (ending with one of
/// `end_ids`, the first appended where a response has none). Errors name the row: a
/// prompt or response that encodes to nothing, a pair longer than `max_len` tokens, no
/// chat template for a chat.
pub fn encode_preferences(
    tokenizer: &HfTokenizer,
    rows: &[PreferenceRow],
    chat: bool,
    end_ids: &[u32],
    max_len: usize,
) -> Result<Vec<PreferencePair>> {
    if end_ids.is_empty() {
        return Err(GoodhartError::invalid(
            "policy",
            "the model names no EOS id (config.json / generation_config.json)",
        ));
    }
    rows.iter()
        .map(|row| {
            let at = |what: &str, reason: String| {
                GoodhartError::invalid(format!("data ({}, {what})", row.at), reason)
            };
            let (head, prompt) =
                encode_prompt(tokenizer, &row.prompt, chat).map_err(|e| at("prompt", e))?;
            let side = |what: &str, r: &Text| {
                let ids = encode_response(tokenizer, &row.prompt, &head, r, chat, end_ids)
                    .map_err(|e| at(what, e))?;
                if prompt.len() + ids.len() > max_len {
                    return Err(at(
                        what,
                        format!(
                            "prompt and response are {} tokens, over the model's {max_len} positions",
                            prompt.len() + ids.len()
                        ),
                    ));
                }
                Ok(ids.into_iter().map(|t| t as usize).collect())
            };
            Ok(PreferencePair {
                chosen: side("chosen", &row.chosen)?,
                rejected: side("rejected", &row.rejected)?,
                prompt: prompt.into_iter().map(|t| t as usize).collect(),
            })
        })
        .collect()
}

impl<B: Backend> Task<B> for TextTask<B> {
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
        self.vocab
    }

    fn end_ids(&self) -> &[u32] {
        &self.end
    }

    fn pad_id(&self) -> u32 {
        self.pad
    }

    fn proxy_members(&self) -> usize {
        1
    }

    fn proxy_max_seq_len(&self) -> Option<usize> {
        None
    }

    fn proxy_parts(&self) -> &[String] {
        &self.parts
    }

    fn score(
        &self,
        prompts: &[usize],
        batch: &Sequences<B>,
        responses: &[Vec<u32>],
    ) -> Result<TaskScores<B>> {
        let texts = responses
            .iter()
            .map(|r| self.decode(r))
            .collect::<Result<Vec<_>>>()?;
        let known = self.tokenizer.vocab_size() as u32;
        let ill_formed = texts
            .iter()
            .zip(responses)
            .map(|(t, r)| t.contains('\u{FFFD}') || r.iter().any(|&id| id >= known))
            .collect();
        let texts = Texts::new(
            prompts
                .iter()
                .map(|&p| self.prompt_texts[p].clone())
                .collect(),
            texts,
            prompts.iter().map(|&p| self.answers[p].clone()).collect(),
            &batch.tokens.device(),
        )?
        .with_context(
            prompts.iter().map(|&p| self.questions[p].clone()).collect(),
            prompts.iter().map(|&p| self.rubrics[p].clone()).collect(),
        )?;
        let mut proxy = self.proxy.score_components(&texts)?;
        let parts = (!self.parts.is_empty())
            .then(|| -> Result<Tensor<B, 2>> {
                let rows = self
                    .parts
                    .iter()
                    .map(|name| {
                        proxy
                            .components
                            .remove(name)
                            .map(|o| o.reward.unsqueeze_dim(0))
                            .ok_or_else(|| {
                                GoodhartError::invalid(
                                    "rewards.proxy",
                                    format!("no component `{name}`"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(rows, 0))
            })
            .transpose()?;
        let gold = host(self.gold.score(&texts)?.reward)?;
        Ok(TaskScores {
            members: proxy.total.clone().unsqueeze_dim(0),
            proxy: proxy.total,
            gold,
            ill_formed,
            parts,
            monitors: Vec::new(),
        })
    }

    fn text(&self, response: &[u32]) -> String {
        self.decode(response)
            .unwrap_or_else(|e| format!("<undecodable: {e}>"))
    }

    fn reward_usage(&self) -> Vec<(String, f64)> {
        let proxy = self
            .proxy
            .usage()
            .into_iter()
            .map(|(k, v)| (format!("proxy/{k}"), v));
        let gold = self
            .gold
            .usage()
            .into_iter()
            .map(|(k, v)| (format!("gold/{k}"), v));
        proxy.chain(gold).collect()
    }

    fn anchor_examples(
        &self,
        _n: usize,
        _rng: &mut seed::ChaCha8Rng,
    ) -> Result<Vec<(Vec<u32>, usize)>> {
        Err(GoodhartError::invalid(
            "rl.regularizers",
            "sft_anchor needs the base policy's SFT data, which only the synthetic language has",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_gradient::sample_and_score;
    use goodhart_policy::TextModel;
    use goodhart_reward::{text::FormatConfig, TextRewardConfig};

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../goodhart-policy/fixtures/hf/qwen2")
    }

    fn row(i: usize, prompt: Text, answer: Option<&str>) -> PromptRow {
        PromptRow {
            at: format!("line {}", i + 1),
            prompt,
            answer: answer.map(str::to_string),
            rubric: None,
        }
    }

    fn rows() -> Vec<PromptRow> {
        vec![
            row(0, Text::Plain("What is 2 + 3?".into()), Some("5")),
            row(
                1,
                Text::Plain("Add seven and twelve, then halve it.".into()),
                Some("9.5"),
            ),
            row(
                2,
                Text::Chat(vec![ChatMessage::new("user", "Hi")]),
                Some("0"),
            ),
        ]
    }

    fn spec(max_prompt_len: usize) -> TextTaskSpec {
        TextTaskSpec {
            vocab_size: 320,
            end_ids: vec![2],
            pad_id: 2,
            chat: false,
            max_prompt_len,
        }
    }

    fn task<B: Backend>(rows: &[PromptRow], spec: &TextTaskSpec) -> Result<TextTask<B>> {
        let format = TextRewardConfig::Format(FormatConfig {
            pattern: Some(r"\d".into()),
            ..Default::default()
        });
        let gold: TextRewardConfig = toml::from_str("kind = \"math_verify\"").unwrap();
        TextTask::new(
            HfTokenizer::from_dir(&fixture())?,
            rows,
            spec,
            (format.composite("proxy", &Default::default())?, Vec::new()),
            gold.build("gold", &Default::default())?,
        )
    }

    goodhart_core::backend_test! {
        fn text_task_encodes_pads_and_scores<B>(device) {
            let tok = HfTokenizer::from_dir(&fixture()).unwrap();
            let t = task::<B>(&rows(), &spec(56)).unwrap();
            // Plain rows as `tokenizer(text)`, chat rows through the template.
            assert_eq!(t.prompt(0), tok.encode_with_special_tokens("What is 2 + 3?").unwrap());
            let (_, chat) = tok
                .apply_chat_template(&[ChatMessage::new("user", "Hi")], true, &Default::default())
                .unwrap();
            assert_eq!(t.prompt(2), chat);
            let width = (0..3).map(|i| t.prompt(i).len()).max().unwrap();
            assert_eq!(t.prompt_width(), width);
            assert!((0..3).any(|i| t.prompt(i).len() < width), "the prompts differ in length");
            // Scores: the format rule and math_verify on the decoded responses (EOS kept
            // in the ids, not in the text).
            let five: Vec<u32> = tok.encode("the answer is 5").unwrap().into_iter().chain([2]).collect();
            let nine: Vec<u32> = tok.encode("9.5").unwrap();
            let word: Vec<u32> = tok.encode("no").unwrap().into_iter().chain([2]).collect();
            let pairs: Vec<(&[u32], &[u32])> = vec![(t.prompt(0), &five), (t.prompt(1), &nine), (t.prompt(0), &word)];
            let batch = Sequences::<B>::from_pairs(&pairs, 2, device).unwrap();
            let s = t.score(&[0, 1, 0], &batch, &[five.clone(), nine, word]).unwrap();
            let proxy: Vec<f64> = host(s.proxy).unwrap();
            assert_eq!(proxy, vec![1.0, 1.0, 0.0]);
            assert_eq!(s.gold, vec![1.0, 1.0, 0.0]);
            assert_eq!(s.ill_formed, vec![false; 3]);
            assert_eq!(t.text(&five), "the answer is 5");
            // A token that is part of a UTF-8 sequence decodes to U+FFFD: ill-formed.
            let broken = (0..320u32).find(|&id| tok.decode(&[id]).unwrap().contains('\u{FFFD}')).expect("a byte token");
            let broken_ids = [broken];
            let pairs: Vec<(&[u32], &[u32])> = vec![(t.prompt(0), &broken_ids)];
            let batch = Sequences::<B>::from_pairs(&pairs, 2, device).unwrap();
            assert_eq!(t.score(&[0], &batch, &[vec![broken]]).unwrap().ill_formed, vec![true]);
        }
    }

    goodhart_core::backend_test! {
        fn left_padded_batches_generate_what_each_prompt_does_alone<B>(device) {
            // Greedy responses to three prompts of different lengths, sampled together
            // (left-padded to the widest) and one at a time: the same tokens.
            let model = TextModel::<B>::load(&fixture(), device).unwrap();
            let t = task::<B>(&rows(), &spec(56)).unwrap();
            let greedy = model.generation_config(8).with_greedy(true);
            let mut rng = seed::rng(0, "test");
            let s = sample_and_score(&model.model, &t, &[0, 1, 2], &greedy, &mut rng, device).unwrap();
            for (r, p) in [0usize, 1, 2].iter().enumerate() {
                let alone = model.complete(t.prompt(*p), &greedy, 0).unwrap();
                assert_eq!(s.responses[r], alone.ids, "prompt {p}");
            }
        }
    }

    #[test]
    fn text_task_errors_name_the_row() {
        type B = goodhart_core::device::Dispatch;
        let long = task::<B>(&rows(), &spec(5)).err().unwrap().to_string();
        assert!(
            long.contains("line 1") && long.contains("over the 5"),
            "{long}"
        );
        let empty = vec![row(0, Text::Plain(String::new()), None)];
        let e = task::<B>(&empty, &spec(56)).err().unwrap().to_string();
        assert!(e.contains("line 1") && e.contains("no tokens"), "{e}");
        assert!(task::<B>(&[], &spec(56)).is_err());
        let no_end = TextTaskSpec {
            end_ids: vec![],
            ..spec(56)
        };
        assert!(task::<B>(&rows(), &no_end)
            .err()
            .unwrap()
            .to_string()
            .contains("EOS"));
    }

    fn pair(at: &str, prompt: Text, chosen: Text, rejected: Text) -> PreferenceRow {
        PreferenceRow {
            at: at.into(),
            prompt,
            chosen,
            rejected,
        }
    }

    #[test]
    fn preference_pairs_encode_as_trl_does() {
        let tok = HfTokenizer::from_dir(&fixture()).unwrap();
        let user = |c: &str| vec![ChatMessage::new("user", c)];
        let assistant = |c: &str| Text::Chat(vec![ChatMessage::new("assistant", c)]);
        let rows = [
            pair(
                "line 1",
                Text::Plain("Say hi.".into()),
                Text::Plain("Hi!".into()),
                Text::Plain("Go away.".into()),
            ),
            pair(
                "line 2",
                Text::Chat(user("What is 2 + 2?")),
                assistant("4"),
                assistant("5"),
            ),
        ];
        // The fixture's EOS is <|im_end|> (2), its template's end of turn.
        let pairs = encode_preferences(&tok, &rows, false, &[2], 64).unwrap();
        let ids = |v: Vec<u32>| v.into_iter().map(|t| t as usize).collect::<Vec<_>>();
        let with_end = |text: &str| {
            let mut v = ids(tok.encode(text).unwrap());
            v.push(2);
            v
        };
        // Plain: the prompt as `tokenizer(text)`, each response encoded alone then EOS.
        assert_eq!(
            pairs[0].prompt,
            ids(tok.encode_with_special_tokens("Say hi.").unwrap())
        );
        assert_eq!(pairs[0].chosen, with_end("Hi!"));
        assert_eq!(pairs[0].rejected, with_end("Go away."));
        // Chat: the prompt with its generation prompt; the response the rendered rest up
        // to its end of turn, so prompt + chosen is the conversation's own tokens.
        let (_, prompt) = tok
            .apply_chat_template(&user("What is 2 + 2?"), true, &Default::default())
            .unwrap();
        assert_eq!(pairs[1].prompt, ids(prompt));
        assert_eq!(pairs[1].chosen, with_end("4"));
        assert_eq!(pairs[1].rejected, with_end("5"));
        let mut messages = user("What is 2 + 2?");
        messages.push(ChatMessage::new("assistant", "4"));
        let (text, _) = tok
            .apply_chat_template(&messages, false, &Default::default())
            .unwrap();
        let whole = ids(tok.encode(text.trim_end_matches('\n')).unwrap());
        let mut joined = pairs[1].prompt.clone();
        joined.extend(&pairs[1].chosen);
        assert_eq!(joined, whole);
        // `chat` renders a plain prompt as a user message.
        let chat = encode_preferences(&tok, &rows[..1], true, &[2], 64).unwrap();
        let (_, say) = tok
            .apply_chat_template(&user("Say hi."), true, &Default::default())
            .unwrap();
        assert_eq!(chat[0].prompt, ids(say));
        // Errors name the row and the side.
        let long = encode_preferences(&tok, &rows, false, &[2], 20)
            .unwrap_err()
            .to_string();
        assert!(
            long.contains("line 2, chosen") && long.contains("20 positions"),
            "{long}"
        );
        let mixed = [pair(
            "line 3",
            Text::Plain("Hi".into()),
            assistant("Hello"),
            assistant("Bye"),
        )];
        let e = encode_preferences(&tok, &mixed, false, &[2], 64)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3, chosen") && e.contains("chat prompt"),
            "{e}"
        );
        assert!(encode_preferences(&tok, &rows, false, &[], 64).is_err());
    }
}
