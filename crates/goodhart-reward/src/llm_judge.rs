//! `llm_judge`: an LLM grades each response, through an OpenAI-compatible endpoint
//! ([`crate::chat_client`]).
//!
//! The judge gets an optional `system` message and one user message: `template` with
//! `{{question}}` (the prompt as the user wrote it; a chat as `role: content` lines),
//! `{{response}}` and `{{answer}}` (the reference answer) filled in, in one pass, so a
//! response that contains `{{question}}` stays as written. The score is the last match
//! of `pattern`'s first group in the answer, a number in `[min, max]`, rescaled to
//! `(s - min) / (max - min)` in `[0, 1]`. An answer without one is malformed: asked for
//! again (`endpoint.malformed_retries`), then counted in the usage and, by
//! `on_malformed`, an error naming the response and what the judge wrote (`error`, the
//! default) or scored with the mean of the batch's parsed scores (`neutral`: a zero
//! advantage under group normalisation), never silently 0.

use burn::tensor::backend::Backend;
use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    chat_client::{ChatClient, EndpointConfig, Malformed},
    source::{RewardOutput, RewardSource},
    text::Texts,
};
use goodhart_policy::ChatMessage;

/// What a judge's reward does with an answer that stayed malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMalformed {
    /// The batch fails with an error naming the response and the judge's text.
    #[default]
    Error,
    /// The response gets the mean of the batch's parsed scores (counted in the usage).
    Neutral,
}

/// The default `llm_judge` system message.
pub const JUDGE_SYSTEM: &str =
    "You are an impartial judge of the quality of an AI assistant's answers.";

/// The default `llm_judge` template.
pub const JUDGE_TEMPLATE: &str = "[Question]\n{{question}}\n\n[Answer]\n{{response}}\n\n\
Rate the answer from 1 to 10 for helpfulness, correctness and clarity. Explain your \
rating in a few sentences, then end with a line `Score: N`.";

/// `kind = "llm_judge"` (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmJudgeConfig {
    /// The judge's endpoint.
    pub endpoint: EndpointConfig,
    /// The system message; none when empty.
    pub system: String,
    /// The user message, with `{{question}}`, `{{response}}`, `{{answer}}`.
    pub template: String,
    /// A regular expression whose first group is the score; its last match counts.
    pub pattern: String,
    /// The lowest score.
    pub min: f64,
    /// The highest score.
    pub max: f64,
    /// What a malformed answer does.
    pub on_malformed: OnMalformed,
}

impl Default for LlmJudgeConfig {
    fn default() -> Self {
        Self {
            endpoint: EndpointConfig::default(),
            system: JUDGE_SYSTEM.into(),
            template: JUDGE_TEMPLATE.into(),
            pattern: r"(?i)score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)".into(),
            min: 1.0,
            max: 10.0,
            on_malformed: OnMalformed::Error,
        }
    }
}

impl LlmJudgeConfig {
    /// Errors naming the key: the endpoint's, a template without `{{response}}` or with
    /// a placeholder it does not know, a pattern without a group, `min >= max`.
    pub fn validate(&self) -> Result<()> {
        self.endpoint.validate()?;
        check_template(&self.template, &["question", "response", "answer"])?;
        self.regex()?;
        if !(self.min.is_finite() && self.max.is_finite() && self.min < self.max) {
            return Err(GoodhartError::invalid(
                "min",
                format!(
                    "[min, max] = [{}, {}] is not a finite range",
                    self.min, self.max
                ),
            ));
        }
        Ok(())
    }

    /// Whether the template reads the reference answer.
    pub fn needs_answers(&self) -> bool {
        placeholders(&self.template).any(|p| p == "answer")
    }

    fn regex(&self) -> Result<regex::Regex> {
        let re = regex::Regex::new(&self.pattern)
            .map_err(|e| GoodhartError::invalid("pattern", e.to_string()))?;
        if re.captures_len() < 2 {
            return Err(GoodhartError::invalid(
                "pattern",
                "has no group: the first group is the score",
            ));
        }
        Ok(re)
    }
}

/// The `{{name}}` placeholders of a template.
pub(crate) fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template
        .split("{{")
        .skip(1)
        .filter_map(|s| s.split_once("}}").map(|(name, _)| name.trim()))
}

/// Errors unless `template` has `{{response}}` and only placeholders among `known`.
pub(crate) fn check_template(template: &str, known: &[&str]) -> Result<()> {
    if let Some(bad) = placeholders(template).find(|p| !known.contains(p)) {
        return Err(GoodhartError::invalid(
            "template",
            format!(
                "`{{{{{bad}}}}}` is not a placeholder (known: {})",
                known
                    .iter()
                    .map(|k| format!("{{{{{k}}}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if !placeholders(template).any(|p| p == "response") {
        return Err(GoodhartError::invalid("template", "has no `{{response}}`"));
    }
    Ok(())
}

/// `template` with each `{{name}}` replaced by its value, in one pass.
pub(crate) fn fill(template: &str, values: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.split_once("}}") {
            Some((name, tail)) => {
                match values.iter().find(|(k, _)| *k == name.trim()) {
                    Some((_, v)) => out.push_str(v),
                    None => {
                        out.push_str("{{");
                        out.push_str(name);
                        out.push_str("}}");
                    }
                }
                rest = tail;
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// The judge's messages: `system` (when not empty), then the filled template.
pub(crate) fn messages(system: &str, user: String) -> Vec<ChatMessage> {
    let mut m = Vec::with_capacity(2);
    if !system.is_empty() {
        m.push(ChatMessage::new("system", system));
    }
    m.push(ChatMessage::new("user", user));
    m
}

/// One score per response from parsed-or-malformed answers, by `on_malformed`.
pub(crate) fn resolve(
    service: &str,
    answers: Vec<std::result::Result<f64, Malformed>>,
    on_malformed: OnMalformed,
    tries: u32,
) -> Result<Vec<f32>> {
    let parsed: Vec<f64> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().copied())
        .collect();
    let bad: Vec<(usize, &Malformed)> = answers
        .iter()
        .enumerate()
        .filter_map(|(i, a)| a.as_ref().err().map(|m| (i, m)))
        .collect();
    if let Some(&(i, m)) = bad.first() {
        if on_malformed == OnMalformed::Error || parsed.is_empty() {
            return Err(GoodhartError::Remote {
                service: service.to_string(),
                reason: format!(
                    "{} of {} answers stayed malformed after {tries} tries; response {i}: {}; \
                     the judge wrote: {:?}",
                    bad.len(),
                    answers.len(),
                    m.reason,
                    m.content.chars().take(300).collect::<String>(),
                ),
            });
        }
    }
    let neutral = parsed.iter().sum::<f64>() / parsed.len().max(1) as f64;
    Ok(answers
        .iter()
        .map(|a| *a.as_ref().unwrap_or(&neutral) as f32)
        .collect())
}

/// The `llm_judge` reward.
pub struct LlmJudge {
    name: String,
    config: LlmJudgeConfig,
    regex: regex::Regex,
    client: ChatClient,
}

impl LlmJudge {
    /// A judge named `name`; errors on an invalid config or one the client refuses.
    pub fn new(name: impl Into<String>, config: &LlmJudgeConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            name: name.into(),
            regex: config.regex()?,
            client: ChatClient::new(&config.endpoint)?,
            config: config.clone(),
        })
    }

    /// The score in `[0, 1]` an answer gives, or why it gives none.
    pub fn parse(&self, answer: &str) -> std::result::Result<f64, String> {
        let found = self
            .regex
            .captures_iter(answer)
            .last()
            .and_then(|c| c.get(1))
            .ok_or_else(|| format!("no match of `{}`", self.config.pattern))?;
        let s: f64 = found
            .as_str()
            .trim()
            .parse()
            .map_err(|_| format!("`{}` is not a number", found.as_str()))?;
        let (lo, hi) = (self.config.min, self.config.max);
        if !(lo..=hi).contains(&s) {
            return Err(format!("score {s} is outside [{lo}, {hi}]"));
        }
        Ok((s - lo) / (hi - lo))
    }

    /// The service name errors carry.
    fn service(&self) -> String {
        format!("{} ({})", self.name, self.config.endpoint.base_url)
    }
}

impl<B: Backend> RewardSource<B, Texts<B>> for LlmJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &Texts<B>) -> Result<RewardOutput<B>> {
        let needs_answer = self.config.needs_answers();
        let requests = (0..input.responses.len())
            .map(|i| {
                let answer = if needs_answer {
                    input.answer(i, &self.name)?
                } else {
                    ""
                };
                Ok(messages(
                    &self.config.system,
                    fill(
                        &self.config.template,
                        &[
                            ("question", &input.questions[i]),
                            ("response", &input.responses[i]),
                            ("answer", answer),
                        ],
                    ),
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let service = self.service();
        let answers = self.client.ask(&service, &requests, |_, a| self.parse(a))?;
        input.output(resolve(
            &service,
            answers,
            self.config.on_malformed,
            self.config.endpoint.malformed_retries + 1,
        )?)
    }

    fn usage(&self) -> Vec<(String, f64)> {
        self.client.usage().entries()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat_client::scripted::{completion, start};
    use goodhart_core::device::{cpu, Dispatch};

    fn endpoint(url: &str) -> EndpointConfig {
        EndpointConfig {
            base_url: url.into(),
            model: "judge".into(),
            backoff_s: 0.01,
            ..Default::default()
        }
    }

    fn judge(config: LlmJudgeConfig) -> LlmJudge {
        LlmJudge::new("judge", &config).unwrap()
    }

    #[test]
    fn the_last_score_in_range_is_rescaled() {
        let j = judge(LlmJudgeConfig {
            endpoint: endpoint("http://127.0.0.1:1/v1"),
            ..Default::default()
        });
        for (answer, want) in [
            ("Clear and correct.\nScore: 7", 6.0 / 9.0),
            ("**Score:** 10", 1.0),
            ("score=1", 0.0),
            ("SCORE : 7.5", 6.5 / 9.0),
            // The last match counts: a judge that revises itself.
            ("Score: 3. On reflection, Score: 9", 8.0 / 9.0),
        ] {
            let got = j.parse(answer).unwrap();
            assert!((got - want).abs() < 1e-12, "{answer}: {got}");
        }
        for (answer, says) in [
            ("Excellent answer.", "no match"),
            ("Score: 11", "score 11 is outside [1, 10]"),
            ("Score: 0", "score 0 is outside"),
            ("Score: 2, then Score: -3", "score -3 is outside"),
        ] {
            let err = j.parse(answer).unwrap_err();
            assert!(err.contains(says), "{answer}: {err}");
        }
        // Another scale and pattern: a grade out of 5 in a tag.
        let j = judge(LlmJudgeConfig {
            endpoint: endpoint("http://127.0.0.1:1/v1"),
            pattern: r"<grade>(\d+)</grade>".into(),
            min: 0.0,
            max: 5.0,
            ..Default::default()
        });
        assert_eq!(j.parse("<grade>4</grade>"), Ok(0.8));
    }

    #[test]
    fn templates_are_filled_in_one_pass() {
        let t = "Q: {{question}}\nA: {{ response }}\nRef: {{answer}}";
        // A response that quotes a placeholder keeps it: nothing is filled twice.
        assert_eq!(
            fill(
                t,
                &[
                    ("question", "2+2?"),
                    ("response", "{{answer}}"),
                    ("answer", "4")
                ]
            ),
            "Q: 2+2?\nA: {{answer}}\nRef: 4"
        );
        // A placeholder without a value, and an unclosed `{{`, stay as written.
        assert_eq!(fill("{{x}} and {{y", &[("y", "Y")]), "{{x}} and {{y");
        assert_eq!(
            placeholders(t).collect::<Vec<_>>(),
            ["question", "response", "answer"]
        );
        assert!(check_template(t, &["question", "response", "answer"]).is_ok());
        let err = check_template("{{question}}", &["question", "response"]).unwrap_err();
        assert!(err.to_string().contains("no `{{response}}`"), "{err}");
        let err = check_template("{{response}} {{criteria}}", &["response"]).unwrap_err();
        assert!(
            err.to_string()
                .contains("`{{criteria}}` is not a placeholder (known: {{response}})"),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_name_their_key() {
        let ok = LlmJudgeConfig {
            endpoint: endpoint("http://127.0.0.1:1/v1"),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        assert!(!ok.needs_answers());
        for (bad, key) in [
            (
                LlmJudgeConfig {
                    pattern: r"score: \d+".into(),
                    ..ok.clone()
                },
                "pattern",
            ),
            (
                LlmJudgeConfig {
                    pattern: "(unclosed".into(),
                    ..ok.clone()
                },
                "pattern",
            ),
            (
                LlmJudgeConfig {
                    min: 5.0,
                    max: 5.0,
                    ..ok.clone()
                },
                "min",
            ),
            (
                LlmJudgeConfig {
                    max: f64::NAN,
                    ..ok.clone()
                },
                "min",
            ),
            (
                LlmJudgeConfig {
                    template: "{{question}}".into(),
                    ..ok.clone()
                },
                "template",
            ),
            (
                LlmJudgeConfig {
                    endpoint: EndpointConfig {
                        model: String::new(),
                        ..ok.endpoint.clone()
                    },
                    ..ok.clone()
                },
                "endpoint.model",
            ),
        ] {
            match bad.validate() {
                Err(GoodhartError::InvalidArgument { name, .. }) => assert_eq!(name, key),
                other => panic!("{key}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_batch_is_judged_through_the_endpoint() {
        // The judge gives 10 to a response that states the reference answer, 1 otherwise,
        // and never a score to "mumble".
        let (url, seen) = start(|_, body| {
            let prompt = body["messages"][1]["content"].as_str().unwrap();
            let (response, reference) = prompt.split_once(" | ").unwrap();
            completion(&match response {
                "mumble" => "I cannot say.".to_string(),
                r if r.contains(reference) => "Right.\nScore: 10".to_string(),
                _ => "Wrong.\nScore: 1".to_string(),
            })
        });
        let config = LlmJudgeConfig {
            endpoint: endpoint(&url),
            template: "{{response}} | {{answer}}".into(),
            ..Default::default()
        };
        assert!(config.needs_answers());
        let j = judge(config.clone());
        let texts = |responses: &[&str], answers: Vec<Option<&str>>| {
            Texts::<Dispatch>::new(
                vec!["q".into(); responses.len()],
                responses.iter().map(|r| r.to_string()).collect(),
                answers.into_iter().map(|a| a.map(str::to_string)).collect(),
                &cpu(),
            )
            .unwrap()
        };
        let score = |j: &LlmJudge, t: &Texts<Dispatch>| {
            RewardSource::<Dispatch, _>::score(j, t).map(|o| {
                o.reward
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .unwrap()
            })
        };
        let input = texts(&["it is 4", "it is 5", "4!"], vec![Some("4"); 3]);
        assert_eq!(score(&j, &input).unwrap(), vec![1.0, 0.0, 1.0]);
        let body = seen.lock().unwrap().bodies[0].clone();
        assert_eq!(body["messages"][0]["role"], "system");
        assert_eq!(body["messages"][0]["content"], JUDGE_SYSTEM);

        // Malformed: an error by default; with `neutral`, the batch's mean of the others.
        let input = texts(&["it is 4", "it is 5", "mumble"], vec![Some("4"); 3]);
        let err = score(&j, &input).unwrap_err().to_string();
        assert!(
            err.contains("response 2: no match") && err.contains("I cannot say."),
            "{err}"
        );
        let neutral = judge(LlmJudgeConfig {
            on_malformed: OnMalformed::Neutral,
            ..config.clone()
        });
        assert_eq!(score(&neutral, &input).unwrap(), vec![1.0, 0.0, 0.5]);
        // Every answer malformed: nothing to take the mean of, so an error even then.
        let err = score(&neutral, &texts(&["mumble"], vec![Some("4")])).unwrap_err();
        assert!(err.to_string().contains("1 of 1 answers"), "{err}");
        // A missing reference answer is an error before any request.
        let before = seen.lock().unwrap().bodies.len();
        let err = score(&j, &texts(&["x"], vec![None])).unwrap_err();
        assert!(err.to_string().contains("no reference answer"), "{err}");
        assert_eq!(seen.lock().unwrap().bodies.len(), before);
    }

    #[test]
    fn resolve_counts_what_stayed_malformed() {
        let m = |r: &str| {
            Err(Malformed {
                reason: r.into(),
                content: "x".repeat(400),
            })
        };
        let answers = vec![Ok(0.2), m("bad"), Ok(0.6), m("worse")];
        let err = resolve("j", answers.clone(), OnMalformed::Error, 3)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 of 4 answers stayed malformed after 3 tries; response 1: bad"),
            "{err}"
        );
        // The judge's text is cut to 300 characters.
        assert!(
            err.contains(&"x".repeat(300)) && !err.contains(&"x".repeat(301)),
            "{err}"
        );
        let got = resolve("j", answers, OnMalformed::Neutral, 3).unwrap();
        let want = [0.2f32, 0.4, 0.6, 0.4];
        assert!(
            got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-6),
            "{got:?}"
        );
    }
}
