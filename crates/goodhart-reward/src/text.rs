//! Rewards on text: the input type [`Texts`] (decoded responses with their prompts and
//! reference answers), the `format` rule, and [`TextRewardConfig`], the TOML choice of a
//! text reward by `kind`: `math_verify`, `format`, `hf_reward_model`, `unit_tests`,
//! `llm_judge`, `rubric`, and `weighted_sum` of named text rewards.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    compose::{Component, Composite},
    hf_reward::{HfRewardModel, HfRewardModelConfig},
    llm_judge::{LlmJudge, LlmJudgeConfig},
    math_verify::{MathVerify, MathVerifyConfig},
    rubric::{Rubric, RubricConfig, RubricJudge},
    source::{RewardOutput, RewardSource},
    unit_tests::{UnitTests, UnitTestsConfig},
};

/// A batch of `N` responses as text.
#[derive(Debug, Clone)]
pub struct Texts<B: Backend> {
    /// Each response's prompt (as the policy saw it, chat template included).
    pub prompts: Vec<String>,
    /// The responses, special tokens removed.
    pub responses: Vec<String>,
    /// Each prompt's reference answer, when the dataset has one.
    pub answers: Vec<Option<String>>,
    /// Each prompt as its user wrote it, for a judge (a chat as `role: content` lines);
    /// by default the prompts.
    pub questions: Vec<String>,
    /// Each prompt's rubric, when the dataset has one.
    pub rubrics: Vec<Option<Rubric>>,
    /// Where the scores go.
    pub device: B::Device,
}

impl<B: Backend> Texts<B> {
    /// A batch; errors when the three lists differ in length or are empty.
    pub fn new(
        prompts: Vec<String>,
        responses: Vec<String>,
        answers: Vec<Option<String>>,
        device: &B::Device,
    ) -> Result<Self> {
        if responses.is_empty() {
            return Err(GoodhartError::Empty {
                what: "texts".into(),
            });
        }
        if prompts.len() != responses.len() || answers.len() != responses.len() {
            return Err(GoodhartError::shape(
                "texts (prompts, answers)",
                &[responses.len(), responses.len()],
                &[prompts.len(), answers.len()],
            ));
        }
        Ok(Self {
            questions: prompts.clone(),
            rubrics: vec![None; responses.len()],
            prompts,
            responses,
            answers,
            device: device.clone(),
        })
    }

    /// The batch with each prompt's text for a judge and its rubric; errors unless there
    /// is one of each per response.
    pub fn with_context(
        mut self,
        questions: Vec<String>,
        rubrics: Vec<Option<Rubric>>,
    ) -> Result<Self> {
        let n = self.responses.len();
        if questions.len() != n || rubrics.len() != n {
            return Err(GoodhartError::shape(
                "texts (questions, rubrics)",
                &[n, n],
                &[questions.len(), rubrics.len()],
            ));
        }
        self.questions = questions;
        self.rubrics = rubrics;
        Ok(self)
    }

    /// Response `i`'s rubric; errors naming `source` when it has none.
    pub fn rubric(&self, i: usize, source: &str) -> Result<&Rubric> {
        self.rubrics[i].as_ref().ok_or_else(|| {
            GoodhartError::invalid(
                source,
                format!(
                    "response {i} has no rubric (map the dataset's column to \
                     `[data] columns.rubric`)"
                ),
            )
        })
    }

    /// Response `i`'s reference answer; errors naming `source` when it has none.
    pub fn answer(&self, i: usize, source: &str) -> Result<&str> {
        self.answers[i].as_deref().ok_or_else(|| {
            GoodhartError::invalid(
                source,
                format!(
                    "response {i} has no reference answer (map the dataset's column to \
                     `[data] columns.answer`)"
                ),
            )
        })
    }

    /// One score per response as a [`RewardOutput`] on the batch's device.
    pub fn output(&self, scores: Vec<f32>) -> Result<RewardOutput<B>> {
        let n = scores.len();
        RewardOutput::scalar(Tensor::from_data(
            TensorData::new(scores, [n]),
            &self.device,
        ))
    }
}

/// `kind = "format"`: 1 when the response has the required shape, else 0. Give a
/// `pattern` (a regular expression, Rust `regex` syntax, searched anywhere unless
/// anchored with `^...$`) or `tags`: the response is then each `<tag>...</tag>` in
/// order and nothing else but whitespace (DeepSeek-R1's
/// `<think>...</think><answer>...</answer>` is `tags = ["think", "answer"]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    /// A regular expression the response must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
    /// Tags the response must consist of, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl FormatConfig {
    /// The regular expression the config describes; errors unless exactly one of
    /// `pattern` and `tags` is given, on a tag that is not a plain name, or on a pattern
    /// that does not compile.
    pub fn regex(&self) -> Result<regex::Regex> {
        let pattern = match (&self.pattern, self.tags.is_empty()) {
            (Some(p), true) => p.clone(),
            (None, false) => {
                if let Some(bad) = self.tags.iter().find(|t| {
                    t.is_empty()
                        || !t
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                }) {
                    return Err(GoodhartError::invalid(
                        "tags",
                        format!("`{bad}` is not a tag name (letters, digits, `_`, `-`)"),
                    ));
                }
                let body: String = self
                    .tags
                    .iter()
                    .map(|t| format!(r"\s*<{t}>.*?</{t}>"))
                    .collect();
                format!(r"(?s)\A{body}\s*\z")
            }
            _ => {
                return Err(GoodhartError::invalid(
                    "format",
                    "give exactly one of `pattern` and `tags`",
                ))
            }
        };
        regex::Regex::new(&pattern).map_err(|e| GoodhartError::invalid("pattern", e.to_string()))
    }
}

/// The `format` rule as a reward source.
#[derive(Debug, Clone)]
pub struct Format {
    name: String,
    regex: regex::Regex,
}

impl Format {
    /// A source named `name`; errors on an invalid config ([`FormatConfig::regex`]).
    pub fn new(name: impl Into<String>, config: &FormatConfig) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            regex: config.regex()?,
        })
    }

    /// Whether `response` has the format.
    pub fn matches(&self, response: &str) -> bool {
        self.regex.is_match(response)
    }
}

impl<B: Backend> RewardSource<B, Texts<B>> for Format {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &Texts<B>) -> Result<RewardOutput<B>> {
        input.output(
            input
                .responses
                .iter()
                .map(|r| if self.matches(r) { 1.0 } else { 0.0 })
                .collect(),
        )
    }
}

/// A text reward chosen by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TextRewardConfig {
    /// The final answer checked against the reference ([`crate::math_verify`]).
    MathVerify(MathVerifyConfig),
    /// A regular expression or required tags ([`FormatConfig`]).
    Format(FormatConfig),
    /// A Hugging Face sequence-classification reward model ([`crate::hf_reward`]).
    HfRewardModel(HfRewardModelConfig),
    /// The fraction of the reference's unit tests a response's program passes, run in a
    /// sandbox ([`crate::unit_tests`]).
    UnitTests(UnitTestsConfig),
    /// An LLM's score through an OpenAI-compatible endpoint ([`crate::llm_judge`]).
    LlmJudge(LlmJudgeConfig),
    /// The weighted share of a prompt's rubric criteria an LLM judge finds met
    /// ([`crate::rubric`]).
    Rubric(RubricConfig),
    /// `sum_i w_i r_i` of named text rewards ([`Composite`]).
    WeightedSum(WeightedSumConfig),
}

/// `kind = "weighted_sum"`: `components = [{ name = "format", weight = 0.5, reward = {
/// kind = "format", ... } }, ...]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedSumConfig {
    /// The components, each named (unique) and weighted.
    pub components: Vec<TextComponent>,
}

/// One weighted component of a `weighted_sum`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextComponent {
    /// Its name (unique in the sum).
    pub name: String,
    /// Its weight `w_i` (finite).
    #[serde(default = "one")]
    pub weight: f64,
    /// The reward.
    pub reward: TextRewardConfig,
}

fn one() -> f64 {
    1.0
}

/// The prefix of a `weighted_sum`'s error keys: a key path `a.b` is reported under its
/// section as `b` (the convention of `GoodhartError::InvalidArgument` names).
const SUM: &str = "weighted_sum.";

impl TextRewardConfig {
    /// Its registry name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::MathVerify(_) => "math_verify",
            Self::Format(_) => "format",
            Self::HfRewardModel(_) => "hf_reward_model",
            Self::UnitTests(_) => "unit_tests",
            Self::LlmJudge(_) => "llm_judge",
            Self::Rubric(_) => "rubric",
            Self::WeightedSum(_) => "weighted_sum",
        }
    }

    /// The names of a `weighted_sum`'s components, in order (empty for any other kind).
    pub fn component_names(&self) -> Vec<String> {
        match self {
            Self::WeightedSum(c) => c.components.iter().map(|c| c.name.clone()).collect(),
            _ => Vec::new(),
        }
    }

    /// Whether it reads the reference answers.
    pub fn needs_answers(&self) -> bool {
        match self {
            Self::MathVerify(_) | Self::UnitTests(_) => true,
            Self::LlmJudge(c) => c.needs_answers(),
            Self::WeightedSum(c) => c.components.iter().any(|c| c.reward.needs_answers()),
            Self::Format(_) | Self::HfRewardModel(_) | Self::Rubric(_) => false,
        }
    }

    /// Whether it reads the prompts' rubrics.
    pub fn needs_rubrics(&self) -> bool {
        match self {
            Self::Rubric(_) => true,
            Self::WeightedSum(c) => c.components.iter().any(|c| c.reward.needs_rubrics()),
            _ => false,
        }
    }

    /// Gives every judge without a `cache` file one in `dir`: `<name>.jsonl`, a
    /// `weighted_sum`'s components as `<name>.<component>.jsonl`.
    pub fn set_cache_dir(&mut self, dir: &std::path::Path, name: &str) {
        match self {
            Self::LlmJudge(LlmJudgeConfig { endpoint, .. })
            | Self::Rubric(RubricConfig { endpoint, .. }) => {
                endpoint
                    .cache
                    .get_or_insert_with(|| dir.join(format!("{name}.jsonl")));
            }
            Self::WeightedSum(c) => {
                for comp in &mut c.components {
                    comp.reward
                        .set_cache_dir(dir, &format!("{name}.{}", comp.name));
                }
            }
            _ => {}
        }
    }

    /// Errors on an invalid config (a bad tolerance, a pattern that does not compile, a
    /// directory that is not a reward model, a sum without components, with a repeated
    /// name or a weight that is not finite), the key named.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::MathVerify(c) => c.validate(),
            Self::Format(c) => c.regex().map(|_| ()),
            Self::HfRewardModel(c) => c.validate(),
            Self::UnitTests(c) => c.validate(),
            Self::LlmJudge(c) => c.validate(),
            Self::Rubric(c) => c.validate(),
            Self::WeightedSum(c) => {
                if c.components.is_empty() {
                    return Err(GoodhartError::invalid("components", "is empty"));
                }
                let mut names = std::collections::BTreeSet::new();
                for (i, comp) in c.components.iter().enumerate() {
                    if comp.name.is_empty() || !names.insert(comp.name.as_str()) {
                        return Err(GoodhartError::invalid(
                            format!("{SUM}components[{i}].name"),
                            format!("`{}` is empty or used twice", comp.name),
                        ));
                    }
                    if !comp.weight.is_finite() {
                        return Err(GoodhartError::invalid(
                            format!("{SUM}components[{i}].weight"),
                            format!("{} is not finite", comp.weight),
                        ));
                    }
                    comp.reward.validate().map_err(|e| match e {
                        GoodhartError::InvalidArgument { name, reason } => {
                            let name = name.strip_prefix(SUM).unwrap_or(&name);
                            GoodhartError::invalid(
                                format!("{SUM}components[{i}].reward.{name}"),
                                reason,
                            )
                        }
                        other => other,
                    })?;
                }
                Ok(())
            }
        }
    }

    /// The reward as a [`Composite`] named `name`: a `weighted_sum`'s components, or this
    /// reward alone (weight 1, named by its kind), so a caller can log every component.
    pub fn composite<B: Backend>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Composite<B, Texts<B>>> {
        let parts = match self {
            Self::WeightedSum(c) => c
                .components
                .iter()
                .map(|comp| {
                    Ok(Component {
                        name: comp.name.clone(),
                        weight: comp.weight as f32,
                        source: comp.reward.build::<B>(&comp.name, device)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?,
            other => vec![Component {
                name: other.name().into(),
                weight: 1.0,
                source: other.build::<B>(other.name(), device)?,
            }],
        };
        Composite::new(name, parts)
    }

    /// The source, named `name`, on `device` (where a reward model loads); errors on an
    /// invalid config.
    pub fn build<B: Backend>(
        &self,
        name: &str,
        device: &B::Device,
    ) -> Result<Box<dyn RewardSource<B, Texts<B>>>> {
        Ok(match self {
            Self::MathVerify(c) => Box::new(MathVerify::new(name, c.clone())?),
            Self::Format(c) => Box::new(Format::new(name, c)?),
            Self::HfRewardModel(c) => Box::new(HfRewardModel::<B>::load(name, c, device)?),
            Self::UnitTests(c) => Box::new(UnitTests::new(name, c)?),
            Self::LlmJudge(c) => Box::new(LlmJudge::new(name, c)?),
            Self::Rubric(c) => Box::new(RubricJudge::new(name, c)?),
            Self::WeightedSum(_) => Box::new(self.composite::<B>(name, device)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_by_tags_and_by_pattern() {
        let tags = Format::new(
            "format",
            &FormatConfig {
                tags: vec!["think".into(), "answer".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(tags.matches("<think>2+2 is 4</think><answer>4</answer>"));
        assert!(tags.matches(" <think>a\nb</think>\n<answer>4</answer>\n"));
        assert!(!tags.matches("<answer>4</answer><think>x</think>"), "order");
        assert!(!tags.matches("<think>x</think>"), "a tag missing");
        assert!(
            !tags.matches("<think>x</think><answer>4</answer> and more"),
            "text after"
        );
        assert!(!tags.matches("<think>x<answer>4</answer>"), "unclosed");
        let pattern = Format::new(
            "format",
            &FormatConfig {
                pattern: Some(r"^Final: \d+$".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(pattern.matches("Final: 12"));
        assert!(!pattern.matches("Final: twelve"));
        for bad in [
            FormatConfig::default(),
            FormatConfig {
                pattern: Some("x".into()),
                tags: vec!["a".into()],
            },
            FormatConfig {
                pattern: Some("(unclosed".into()),
                ..Default::default()
            },
            FormatConfig {
                tags: vec!["a b".into()],
                ..Default::default()
            },
        ] {
            assert!(Format::new("f", &bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn text_rewards_are_chosen_by_kind() {
        let c: TextRewardConfig = toml::from_str("kind = \"format\"\ntags = [\"answer\"]").unwrap();
        assert_eq!(c.name(), "format");
        assert!(!c.needs_answers());
        let c: TextRewardConfig = toml::from_str("kind = \"math_verify\"").unwrap();
        assert_eq!(c, TextRewardConfig::MathVerify(MathVerifyConfig::default()));
        assert!(c.needs_answers());
        assert!(toml::from_str::<TextRewardConfig>("kind = \"judge\"").is_err());
        assert!(toml::from_str::<TextRewardConfig>("kind = \"format\"\ntag = [\"a\"]").is_err());
    }

    goodhart_core::backend_test! {
        fn format_scores_a_batch<B>(device) {
            let texts = Texts::<B>::new(
                vec![String::new(); 2],
                vec!["<answer>1</answer>".into(), "1".into()],
                vec![None, None],
                device,
            )
            .unwrap();
            let f = TextRewardConfig::Format(FormatConfig { tags: vec!["answer".into()], ..Default::default() })
                .build::<B>("proxy", device)
                .unwrap();
            assert_eq!(f.name(), "proxy");
            let got: Vec<f32> = f.score(&texts).unwrap().reward.into_data().convert::<f32>().into_vec().unwrap();
            assert_eq!(got, vec![1.0, 0.0]);
            assert!(Texts::<B>::new(vec![], vec![], vec![], device).is_err());
            assert!(Texts::<B>::new(vec![String::new()], vec![String::new(); 2], vec![None; 2], device).is_err());
        }
    }
}
