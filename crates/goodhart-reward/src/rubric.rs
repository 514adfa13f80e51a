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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat_client::scripted::{completion, start};
    use goodhart_core::{
        device::{cpu, Dispatch},
        GoodhartError,
    };
    use serde_json::json;

    fn rubric(criteria: &[(&str, f64)]) -> Rubric {
        Rubric::new(
            criteria
                .iter()
                .map(|(t, w)| Criterion {
                    text: t.to_string(),
                    weight: *w,
                })
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn the_score_is_the_formula_by_hand() {
        // Weights +3, +2, -1: sum |w| = 6.
        let r = rubric(&[
            ("Says hello", 3.0),
            ("Names a colour", 2.0),
            ("Is rude", -1.0),
        ]);
        for (met, want) in [
            ([true, false, true], 3.0 / 6.0),   // hello; rude counts against
            ([true, true, false], 6.0 / 6.0),   // everything good, nothing bad
            ([false, false, true], 0.0),        // nothing good, the bad thing present
            ([false, false, false], 1.0 / 6.0), // only the absent bad thing
            ([false, true, false], 3.0 / 6.0),
        ] {
            assert!((r.score(&met) - want).abs() < 1e-12, "{met:?}");
        }
        // Only negative criteria: absent everywhere is 1, (w=-2 present, w=-1 absent) 1/3.
        let r = rubric(&[("Rambles", -2.0), ("Is rude", -1.0)]);
        assert_eq!(r.score(&[false, false]), 1.0);
        assert!((r.score(&[true, false]) - 1.0 / 3.0).abs() < 1e-12);
        // A zero weight counts for nothing either way.
        let r = rubric(&[("a", 1.0), ("b", 0.0)]);
        assert_eq!(
            (r.score(&[true, true]), r.score(&[true, false])),
            (1.0, 1.0)
        );
    }

    #[test]
    fn rubrics_from_the_data_in_every_spelling() {
        let want = rubric(&[("Gives a number", 1.0), ("Rambles", -2.0)]);
        for cell in [
            json!([{"criterion": "Gives a number", "weight": 1}, {"criterion": "Rambles", "weight": -2}]),
            json!([{"text": "Gives a number", "points": 1.0}, {"description": "Rambles", "points": -2}]),
            json!("[{\"criterion\": \"Gives a number\", \"points\": 1}, {\"criterion\": \"Rambles\", \"weight\": -2}]"),
        ] {
            assert_eq!(Rubric::from_json(&cell).unwrap(), want, "{cell}");
        }
        assert_eq!(want.render(), "1. [+1] Gives a number\n2. [-2] Rambles");
        for (cell, says) in [
            (json!("[{"), "not JSON"),
            (json!({"criterion": "x", "weight": 1}), "not a list"),
            (json!([]), "no criterion"),
            (json!([{"criterion": "x"}]), "criterion 1 has no `weight`"),
            (
                json!([{"criterion": "x", "weight": 1}, {"weight": 1}]),
                "criterion 2 has no `criterion`",
            ),
            (json!([{"criterion": "x", "weight": "1"}]), "no `weight`"),
            (
                json!([{"criterion": " ", "weight": 1}]),
                "criterion 1 has no text",
            ),
            (
                json!([{"criterion": "x", "weight": 0}, {"criterion": "y", "weight": 0}]),
                "every weight is 0",
            ),
        ] {
            let err = Rubric::from_json(&cell).unwrap_err();
            assert!(err.contains(says), "{cell}: {err}");
        }
        let err = Rubric::new(vec![Criterion {
            text: "x".into(),
            weight: f64::INFINITY,
        }])
        .unwrap_err();
        assert!(err.contains("weight inf"), "{err}");
    }

    #[test]
    fn verdicts_parse_or_say_why_not() {
        let good = [
            r#"{"1": {"criteria_met": true}, "2": {"criteria_met": false}}"#,
            "Here is my grading:\n```json\n{\"2\": {\"explanation\": \"no {colour}\", \"criteria_met\": false},\n \"1\": {\"explanation\": \"says hi\", \"criteria_met\": true}}\n```",
        ];
        for answer in good {
            assert_eq!(parse_verdict(answer, 2), Ok(vec![true, false]), "{answer}");
        }
        for (answer, says) in [
            ("I think both are met.", "no JSON object"),
            ("} backwards {", "no JSON object"),
            (r#"{"1": {"criteria_met": true},}"#, "not JSON"),
            (
                r#"{"1": {"criteria_met": true}}"#,
                "no verdict for criterion 2",
            ),
            (
                r#"{"1": {"criteria_met": true}, "2": {"criteria_met": "yes"}}"#,
                "criterion 2: `criteria_met` is \"yes\"",
            ),
            (
                r#"{"1": {"criteria_met": true}, "2": true}"#,
                "criterion 2: `criteria_met` is null",
            ),
            (
                r#"{"1": {"criteria_met": true}, "2": {"criteria_met": false}, "3": {"criteria_met": true}}"#,
                "`3` is not a criterion number 1 to 2",
            ),
            (
                r#"{"0": {"criteria_met": true}, "1": {"criteria_met": true}, "2": {"criteria_met": true}}"#,
                "`0` is not",
            ),
            (r#"{"a": {"criteria_met": true}}"#, "`a` is not"),
        ] {
            let err = parse_verdict(answer, 2).unwrap_err();
            assert!(err.contains(says), "{answer}: {err}");
        }
    }

    fn texts(responses: &[&str], rubrics: Vec<Option<Rubric>>) -> Texts<Dispatch> {
        let n = responses.len();
        Texts::new(
            vec!["p".into(); n],
            responses.iter().map(|r| r.to_string()).collect(),
            vec![None; n],
            &cpu(),
        )
        .unwrap()
        .with_context((0..n).map(|i| format!("question {i}")).collect(), rubrics)
        .unwrap()
    }

    fn scores(out: RewardOutput<Dispatch>) -> Vec<f32> {
        out.reward.into_data().convert::<f32>().into_vec().unwrap()
    }

    #[test]
    fn a_batch_is_graded_through_the_endpoint() {
        // The judge meets criterion 1 of every rubric, and criterion 2 when the response
        // mentions a colour; it garbles its answer for "garble".
        let (url, seen) = start(|_, body| {
            let prompt = body["messages"][0]["content"].as_str().unwrap();
            if prompt.contains("garble") {
                return completion("criteria: all good");
            }
            let colour = prompt.contains("blue");
            completion(&format!(
                "{{\"1\": {{\"criteria_met\": true}}, \"2\": {{\"criteria_met\": {colour}}}, \"3\": {{\"criteria_met\": false}}}}"
            ))
        });
        let config = RubricConfig {
            endpoint: EndpointConfig {
                base_url: url,
                model: "judge".into(),
                backoff_s: 0.01,
                ..Default::default()
            },
            template: "{{criteria}}\n---\n{{response}}\n---\n{{question}}".into(),
            ..Default::default()
        };
        let r = rubric(&[
            ("Says hello", 3.0),
            ("Names a colour", 2.0),
            ("Is rude", -1.0),
        ]);
        let judge = RubricJudge::new("rubric", &config).unwrap();
        let input = texts(
            &["hello", "hello, blue sky"],
            vec![Some(r.clone()), Some(r.clone())],
        );
        // (3 + 0 + 1) / 6 and (3 + 2 + 1) / 6.
        let got = scores(RewardSource::<Dispatch, _>::score(&judge, &input).unwrap());
        assert!(
            (got[0] - 4.0 / 6.0).abs() < 1e-6 && (got[1] - 1.0).abs() < 1e-6,
            "{got:?}"
        );
        let prompts: Vec<String> = seen
            .lock()
            .unwrap()
            .bodies
            .iter()
            .map(|b| b["messages"][0]["content"].as_str().unwrap().to_string())
            .collect();
        assert!(
            prompts.contains(&format!("{}\n---\nhello\n---\nquestion 0", r.render())),
            "{prompts:?}"
        );
        let usage: std::collections::HashMap<_, _> =
            RewardSource::<Dispatch, Texts<Dispatch>>::usage(&judge)
                .into_iter()
                .collect();
        assert_eq!((usage["requests"], usage["completion_tokens"]), (2.0, 10.0));

        // A verdict that stays malformed: an error naming the response and the text
        // (3 tries), or with `neutral` the mean of the others.
        let input = texts(&["hello", "garble"], vec![Some(r.clone()), Some(r.clone())]);
        let err = RewardSource::<Dispatch, _>::score(&judge, &input).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, GoodhartError::Remote { .. }), "{text}");
        assert!(
            text.contains("1 of 2 answers stayed malformed after 3 tries")
                && text.contains("response 1: no JSON object")
                && text.contains("criteria: all good"),
            "{text}"
        );
        let neutral = RubricJudge::new(
            "rubric",
            &RubricConfig {
                on_malformed: OnMalformed::Neutral,
                ..config.clone()
            },
        )
        .unwrap();
        let got = scores(RewardSource::<Dispatch, _>::score(&neutral, &input).unwrap());
        assert!(
            (got[0] - 4.0 / 6.0).abs() < 1e-6 && (got[1] - got[0]).abs() < 1e-6,
            "{got:?}"
        );
        let usage: std::collections::HashMap<_, _> =
            RewardSource::<Dispatch, Texts<Dispatch>>::usage(&neutral)
                .into_iter()
                .collect();
        assert_eq!((usage["malformed"], usage["malformed_retries"]), (1.0, 2.0));

        // A response without a rubric is an error before any request.
        let before = seen.lock().unwrap().bodies.len();
        let err =
            RewardSource::<Dispatch, _>::score(&judge, &texts(&["x"], vec![None])).unwrap_err();
        assert!(err.to_string().contains("no rubric"), "{err}");
        assert_eq!(seen.lock().unwrap().bodies.len(), before);
    }

    #[test]
    fn templates_are_checked() {
        let endpoint = EndpointConfig {
            base_url: "http://127.0.0.1:1/v1".into(),
            model: "judge".into(),
            ..Default::default()
        };
        let ok = RubricConfig {
            endpoint,
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        for (template, says) in [
            ("{{criteria}}", "has no `{{response}}`"),
            (
                "{{response}} {{answer}}",
                "`{{answer}}` is not a placeholder",
            ),
        ] {
            let bad = RubricConfig {
                template: template.into(),
                ..ok.clone()
            };
            match bad.validate() {
                Err(GoodhartError::InvalidArgument { name, reason }) => {
                    assert_eq!(name, "template");
                    assert!(reason.contains(says), "{reason}");
                }
                other => panic!("{template}: {other:?}"),
            }
        }
    }
}
