//! `rubric`: a judge checks each of a prompt's weighted criteria, and the reward is
//! their weighted share ("Reward Hacking in Rubric-Based Reinforcement Learning",
//! METHODS-labs.md section 1).
//!
//! A prompt's rubric `C = {(c_k, w_k)}` comes from the dataset (`[data] columns.rubric`,
//! see [`Rubric::from_json`]): `w > 0` a property the response should have, `w < 0` one
//! it should not. One request per response grades every criterion: the template gets
//! `{{question}}`, `{{response}}` and `{{criteria}}` (numbered `k. [w] c_k`), and the
//! judge answers one JSON object `{"<k>": {"criteria_met": bool, "explanation": str}}`,
//! `criteria_met` meaning "the described property is present" for negative criteria
//! too. The reward, in `[0, 1]`, is
//!
//! `R = (sum_{w_k > 0} w_k g_k + sum_{w_k < 0} |w_k| (1 - g_k)) / sum_k |w_k|`.
//!
//! A verdict that is not such an object, misses a criterion, names one the rubric does
//! not have or has a `criteria_met` that is not a boolean is malformed: asked for again,
//! then handled as `on_malformed` says ([`crate::llm_judge`]).

use burn::tensor::backend::Backend;
use goodhart_core::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    chat_client::{ChatClient, EndpointConfig},
    llm_judge::{check_template, fill, messages, resolve, OnMalformed},
    source::{RewardOutput, RewardSource},
    text::Texts,
};

/// One criterion of a rubric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Criterion {
    /// What the response should (weight > 0) or should not (weight < 0) have.
    pub text: String,
    /// Its weight `w_k` (finite).
    pub weight: f64,
}

/// A prompt's weighted criteria.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rubric {
    /// The criteria, numbered from 1 in the judge's prompt.
    pub criteria: Vec<Criterion>,
}

impl Rubric {
    /// A rubric; errors on no criterion, an empty text, a weight that is not finite, or
    /// weights that are all 0.
    pub fn new(criteria: Vec<Criterion>) -> std::result::Result<Self, String> {
        if criteria.is_empty() {
            return Err("the rubric has no criterion".into());
        }
        for (k, c) in criteria.iter().enumerate() {
            if c.text.trim().is_empty() {
                return Err(format!("criterion {} has no text", k + 1));
            }
            if !c.weight.is_finite() {
                return Err(format!("criterion {} has weight {}", k + 1, c.weight));
            }
        }
        if criteria.iter().all(|c| c.weight == 0.0) {
            return Err("every weight is 0".into());
        }
        Ok(Self { criteria })
    }

    /// A rubric from a dataset cell: a list of objects with the criterion's text under
    /// `criterion`, `text` or `description` and its weight under `weight` or `points`
    /// (HealthBench's name), or a string holding such a list as JSON.
    pub fn from_json(cell: &Value) -> std::result::Result<Self, String> {
        let parsed;
        let cell = match cell {
            Value::String(s) => {
                parsed = serde_json::from_str::<Value>(s)
                    .map_err(|e| format!("the rubric string is not JSON: {e}"))?;
                &parsed
            }
            other => other,
        };
        let items = cell
            .as_array()
            .ok_or("the rubric is not a list of criteria")?;
        let criteria = items
            .iter()
            .enumerate()
            .map(|(k, item)| {
                let field = |names: &[&str]| names.iter().find_map(|n| item.get(*n));
                let text = field(&["criterion", "text", "description"])
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        format!("criterion {} has no `criterion` (or `text`) string", k + 1)
                    })?;
                let weight = field(&["weight", "points"])
                    .and_then(Value::as_f64)
                    .ok_or_else(|| {
                        format!("criterion {} has no `weight` (or `points`) number", k + 1)
                    })?;
                Ok(Criterion {
                    text: text.to_string(),
                    weight,
                })
            })
            .collect::<std::result::Result<Vec<_>, String>>()?;
        Self::new(criteria)
    }

    /// The criteria as the judge's prompt lists them: `k. [w] text`, one per line.
    pub fn render(&self) -> String {
        self.criteria
            .iter()
            .enumerate()
            .map(|(k, c)| format!("{}. [{:+}] {}", k + 1, c.weight, c.text))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The reward of the verdicts `met[k]` (see the module docs).
    pub fn score(&self, met: &[bool]) -> f64 {
        let (mut got, mut total) = (0.0, 0.0);
        for (c, &g) in self.criteria.iter().zip(met) {
            let w = c.weight;
            total += w.abs();
            // A positive criterion counts when met, a negative one when absent.
            if (w > 0.0) == g {
                got += w.abs();
            }
        }
        got / total
    }
}

/// The verdict `criteria_met` of each of `n` criteria in a judge's answer: the JSON
/// object in it (fenced or not), keyed `"1"` to `"n"`.
pub fn parse_verdict(answer: &str, n: usize) -> std::result::Result<Vec<bool>, String> {
    let (start, end) = match (answer.find('{'), answer.rfind('}')) {
        (Some(s), Some(e)) if s < e => (s, e),
        _ => return Err("no JSON object in the answer".into()),
    };
    let v: Value = serde_json::from_str(&answer[start..=end])
        .map_err(|e| format!("the verdict is not JSON: {e}"))?;
    let map = v.as_object().ok_or("the verdict is not an object")?;
    if let Some(extra) = map
        .keys()
        .find(|k| !k.parse::<usize>().is_ok_and(|k| (1..=n).contains(&k)))
    {
        return Err(format!("`{extra}` is not a criterion number 1 to {n}"));
    }
    (1..=n)
        .map(
            |k| match map.get(&k.to_string()).map(|e| &e["criteria_met"]) {
                Some(Value::Bool(b)) => Ok(*b),
                None => Err(format!("no verdict for criterion {k}")),
                Some(other) => Err(format!(
                    "criterion {k}: `criteria_met` is {other}, not a boolean"
                )),
            },
        )
        .collect()
}

/// The default `rubric` template.
pub const RUBRIC_TEMPLATE: &str = "Grade an AI assistant's response against a rubric.\n\n\
<conversation>\n{{question}}\n</conversation>\n\n<response>\n{{response}}\n</response>\n\n\
<criteria>\n{{criteria}}\n</criteria>\n\n\
For each numbered criterion, decide whether the response meets it. A criterion with several \
parts is met only when every part is, unless it gives examples (\"such as\", \"for example\", \
\"including\"): then one of them suffices. A criterion with a negative weight describes \
something undesirable: say whether the response has it (a good response does not). Judge \
only what the response states, not what it implies.\n\n\
Answer with one JSON object and nothing else, keyed by criterion number, for example:\n\
{\"1\": {\"explanation\": \"...\", \"criteria_met\": true}, \"2\": {\"explanation\": \"...\", \
\"criteria_met\": false}}";

/// `kind = "rubric"` (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RubricConfig {
    /// The judge's endpoint.
    pub endpoint: EndpointConfig,
    /// The system message; none when empty.
    pub system: String,
    /// The user message, with `{{question}}`, `{{response}}`, `{{criteria}}`.
    pub template: String,
    /// What a malformed verdict does.
    pub on_malformed: OnMalformed,
}

impl Default for RubricConfig {
    fn default() -> Self {
        Self {
            endpoint: EndpointConfig::default(),
            system: String::new(),
            template: RUBRIC_TEMPLATE.into(),
            on_malformed: OnMalformed::Error,
        }
    }
}

impl RubricConfig {
    /// Errors naming the key: the endpoint's, or a template without `{{response}}` or
    /// with a placeholder it does not know.
    pub fn validate(&self) -> Result<()> {
        self.endpoint.validate()?;
        check_template(&self.template, &["question", "response", "criteria"])
    }
}

/// The `rubric` reward.
pub struct RubricJudge {
    name: String,
    config: RubricConfig,
    client: ChatClient,
}

impl RubricJudge {
    /// A judge named `name`; errors on an invalid config or one the client refuses.
    pub fn new(name: impl Into<String>, config: &RubricConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            name: name.into(),
            client: ChatClient::new(&config.endpoint)?,
            config: config.clone(),
        })
    }
}

impl<B: Backend> RewardSource<B, Texts<B>> for RubricJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &Texts<B>) -> Result<RewardOutput<B>> {
        let rubrics = (0..input.responses.len())
            .map(|i| input.rubric(i, &self.name))
            .collect::<Result<Vec<_>>>()?;
        let requests: Vec<_> = rubrics
            .iter()
            .enumerate()
            .map(|(i, rubric)| {
                messages(
                    &self.config.system,
                    fill(
                        &self.config.template,
                        &[
                            ("question", &input.questions[i]),
                            ("response", &input.responses[i]),
                            ("criteria", &rubric.render()),
                        ],
                    ),
                )
            })
            .collect();
        let service = format!("{} ({})", self.name, self.config.endpoint.base_url);
        let answers = self.client.ask(&service, &requests, |i, a| {
            parse_verdict(a, rubrics[i].criteria.len()).map(|met| rubrics[i].score(&met))
        })?;
        let scores = resolve(
            &service,
            answers,
            self.config.on_malformed,
            self.config.endpoint.malformed_retries + 1,
        )?;
        input.output(scores)
    }

    fn usage(&self) -> Vec<(String, f64)> {
        self.client.usage().entries()
    }
}
