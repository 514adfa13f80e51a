//! `math_verify`: is a response's final answer the reference answer?
//!
//! Three steps, as Hugging Face's Math-Verify and verl's `math_dapo` / `gsm8k` scorers do
//! them:
//!
//! 1. **Extract** the final answer with the first [`Extractor`] that finds one (default
//!    order: the last `\boxed{...}` / `\fbox{...}`, GSM8K's `#### ...`, "the answer is
//!    ...", the last number). A `\boxed{` whose braces never close extracts nothing.
//! 2. **Normalise** it: `$`, `\left` / `\right`, spacing commands, `\text{...}` and
//!    `\mathrm{...}` wrappers, `^\circ`, trailing units and full stops go; `\dfrac` /
//!    `\tfrac` become `\frac`; thousands separators go.
//! 3. **Compare** with the reference (extracted the same way when it holds a `\boxed{}`
//!    or a `####`, else taken whole): as numbers when both parse ([`parse_number`]:
//!    integers, decimals, scientific notation, `a/b`, `\frac{a}{b}`, mixed numbers,
//!    percentages), within `|a - b| <= tolerance * max(1, |b|)`; element by element for
//!    tuples and intervals of the same length and brackets; otherwise as normalised
//!    strings (case-insensitive, so `(B)` and `b` agree). No symbolic algebra: `x + 1`
//!    and `1 + x` differ.
//!
//! The reward is 1 for a match and 0 otherwise; [`verify`] also says why.

use burn::tensor::backend::Backend;
use goodhart_core::{GoodhartError, Result};
use serde::{Deserialize, Serialize};

use crate::{
    source::{RewardOutput, RewardSource},
    text::Texts,
};

/// Where to look for the final answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extractor {
    /// The last `\boxed{...}` or `\fbox{...}` (braces matched).
    Boxed,
    /// The text after the last `####` (GSM8K), to the end of its line.
    Hash,
    /// The text after the last "the answer is" / "answer:" (any case), to the end of its
    /// sentence or line.
    AnswerIs,
    /// The last number in the text.
    LastNumber,
}

/// `kind = "math_verify"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MathVerifyConfig {
    /// Extractors tried in order; the first that finds an answer wins.
    #[serde(default = "default_extract")]
    pub extract: Vec<Extractor>,
    /// Numbers match when `|a - b| <= tolerance * max(1, |b|)`.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn default_extract() -> Vec<Extractor> {
    vec![
        Extractor::Boxed,
        Extractor::Hash,
        Extractor::AnswerIs,
        Extractor::LastNumber,
    ]
}

fn default_tolerance() -> f64 {
    1e-6
}

impl Default for MathVerifyConfig {
    fn default() -> Self {
        Self {
            extract: default_extract(),
            tolerance: default_tolerance(),
        }
    }
}

impl MathVerifyConfig {
    /// Errors on no extractor or a tolerance that is negative or not finite.
    pub fn validate(&self) -> Result<()> {
        if self.extract.is_empty() {
            return Err(GoodhartError::invalid(
                "extract",
                "name at least one extractor",
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(GoodhartError::invalid(
                "tolerance",
                format!("must be finite and >= 0, got {}", self.tolerance),
            ));
        }
        Ok(())
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Whether the answer matches.
    pub correct: bool,
    /// The answer extracted from the response (before normalisation), if any.
    pub extracted: Option<String>,
    /// Why: how it was compared, or what was missing.
    pub reason: String,
}

impl Verdict {
    fn no(extracted: Option<String>, reason: impl Into<String>) -> Self {
        Self {
            correct: false,
            extracted,
            reason: reason.into(),
        }
    }
}

/// The content of the last `\boxed{...}` / `\fbox{...}` of `text` (also `\boxed 5`);
/// `Err` when its braces never close.
fn last_boxed(text: &str) -> Option<std::result::Result<String, ()>> {
    let at = ["\\boxed", "\\fbox"]
        .iter()
        .filter_map(|m| text.rfind(m).map(|i| (i, m.len())))
        .max()?;
    let rest = &text[at.0 + at.1..];
    if let Some(inner) = rest.strip_prefix('{') {
        let mut depth = 1usize;
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(Ok(inner[..i].to_string()));
                    }
                }
                _ => {}
            }
        }
        return Some(Err(()));
    }
    // `\boxed 5`: the next whitespace-delimited token.
    let token: String = rest
        .strip_prefix(' ')?
        .trim_start()
        .chars()
        .take_while(|c| !c.is_whitespace() && *c != '$')
        .collect();
    (!token.is_empty()).then_some(Ok(token))
}

/// Text after the last `marker` (ASCII, any case) in `text`, up to the end of its line.
fn after_last(text: &str, marker: &str) -> Option<String> {
    let lower = text.to_ascii_lowercase();
    let i = lower.rfind(marker)? + marker.len();
    Some(text[i..].lines().next().unwrap_or("").to_string())
}

/// The last number of `text` (with its sign, `−` read as `-`, decimals, exponent, fraction or thousands
/// separators).
fn last_number(text: &str) -> Option<String> {
    let text = text.replace('\u{2212}', "-");
    number_regex()
        .find_iter(&text)
        .last()
        .map(|m| m.as_str().to_string())
}

fn number_regex() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(
            r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:/\d+)?|-?\.\d+",
        )
        .expect("a valid regex")
    })
}

/// The final answer of `text` by `extractor`. `Err` names a malformed answer.
pub fn extract(text: &str, extractor: Extractor) -> Option<std::result::Result<String, String>> {
    match extractor {
        Extractor::Boxed => {
            last_boxed(text).map(|r| r.map_err(|()| "unbalanced braces in \\boxed{".to_string()))
        }
        Extractor::Hash => after_last(text, "####").map(Ok),
        Extractor::AnswerIs => ["the answer is", "answer:"]
            .iter()
            .filter_map(|m| {
                let lower = text.to_ascii_lowercase();
                lower.rfind(m).map(|i| (i, *m))
            })
            .max()
            .map(|(i, m)| {
                let rest = text[i + m.len()..].lines().next().unwrap_or("");
                // To the end of the sentence: a full stop followed by a space.
                let end = rest.find(". ").unwrap_or(rest.len());
                Ok(rest[..end].trim_start_matches(':').to_string())
            }),
        Extractor::LastNumber => last_number(text).map(Ok),
    }
}

/// Removes every `\cmd{...}` wrapper of `s`, keeping what it wraps.
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = s.to_string();
    while let Some(i) = out.find(cmd) {
        let open = i + cmd.len();
        if !out[open..].starts_with('{') {
            out.replace_range(i..open, "");
            continue;
        }
        let mut depth = 0usize;
        let mut close = None;
        for (j, c) in out[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + j);
                        break;
                    }
                }
                _ => {}
            }
        }
        match close {
            Some(c) => {
                let inner = out[open + 1..c].to_string();
                out.replace_range(i..=c, &inner);
            }
            None => break,
        }
    }
    out
}

/// The normalised form of an answer (see the module docs).
pub fn normalise(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    for cmd in ["\\text", "\\textbf", "\\mathrm", "\\mathbf", "\\boxed"] {
        s = unwrap_command(&s, cmd);
    }
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\:", ""),
        ("\\ ", ""),
        ("\\%", "%"),
        ("\\$", ""),
        ("$", ""),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("°", ""),
        ("\u{2212}", "-"),
        ("\\cdot", "\\times"),
    ] {
        s = s.replace(from, to);
    }
    let mut s = s.trim().trim_end_matches('.').trim().to_string();
    // A number followed by a unit (`5 cm`, `12 dollars`): the number.
    if let Some(m) = number_regex().find(&s) {
        let tail = s[m.end()..].trim();
        if m.start() == 0
            && !tail.is_empty()
            && tail
                .chars()
                .all(|c| c.is_ascii_alphabetic() || c == ' ' || c == '^' || c.is_ascii_digit())
            && tail.starts_with(|c: char| c.is_ascii_alphabetic())
        {
            s = m.as_str().to_string();
        }
    }
    s.retain(|c| !c.is_whitespace());
    if is_thousands(&s) {
        s.retain(|c| c != ',');
    }
    s
}

/// `1,234` or `-12,345,678.5`: digits grouped by three.
fn is_thousands(s: &str) -> bool {
    let body = s.strip_prefix('-').unwrap_or(s);
    let int = body.split('.').next().unwrap_or("");
    let groups: Vec<&str> = int.split(',').collect();
    groups.len() > 1
        && (1..=3).contains(&groups[0].len())
        && groups[1..].iter().all(|g| g.len() == 3)
        && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_digit()))
        && body
            .split('.')
            .nth(1)
            .is_none_or(|f| f.chars().all(|c| c.is_ascii_digit()))
}

/// A number and whether it was written as a percentage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Number {
    /// Its value (a percentage's number, not divided by 100).
    pub value: f64,
    /// Written with a trailing `%`.
    pub percent: bool,
}

/// `{a}{b}` or `ab` (one character each) after `\frac`: `(a, b, rest)`.
fn frac_args(s: &str) -> Option<(String, String, &str)> {
    fn arg(s: &str) -> Option<(String, &str)> {
        if let Some(inner) = s.strip_prefix('{') {
            let mut depth = 1usize;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some((inner[..i].to_string(), &inner[i + 1..]));
                        }
                    }
                    _ => {}
                }
            }
            None
        } else {
            let c = s.chars().next()?;
            Some((c.to_string(), &s[c.len_utf8()..]))
        }
    }
    let (a, rest) = arg(s)?;
    let (b, rest) = arg(rest)?;
    Some((a, b, rest))
}

fn plain_number(s: &str) -> Option<f64> {
    let s = s.strip_prefix('+').unwrap_or(s);
    let ok = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | 'e' | 'E' | '+'))
        && s.chars().any(|c| c.is_ascii_digit());
    ok.then(|| s.parse::<f64>().ok()).flatten()
}

fn value(s: &str) -> Option<f64> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Some(inner) = s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        return value(inner);
    }
    if let Some(rest) = s.strip_prefix('-') {
        if !rest.starts_with('-') {
            return value(rest).map(|v| -v);
        }
    }
    if let Some(v) = plain_number(s) {
        return Some(v);
    }
    // `\frac{a}{b}`, and a mixed number `2\frac{1}{2}`.
    if let Some(i) = s.find("\\frac") {
        let (whole, after) = (&s[..i], &s[i + 5..]);
        let (a, b, rest) = frac_args(after)?;
        if !rest.trim().is_empty() {
            return None;
        }
        let f = value(&a)? / value(&b)?;
        return if whole.is_empty() {
            Some(f)
        } else {
            let w = plain_number(whole)?;
            (w.fract() == 0.0 && w >= 0.0).then_some(w + f)
        };
    }
    // `a/b`.
    if let Some((a, b)) = s.split_once('/') {
        return Some(value(a)? / value(b)?);
    }
    // `a\times10^{k}`, `10^k`.
    if let Some((m, e)) = s.split_once("\\times10^") {
        let e = e.trim_start_matches('{').trim_end_matches('}');
        return Some(value(m)? * 10f64.powf(plain_number(e)?));
    }
    if let Some(e) = s.strip_prefix("10^") {
        let e = e.trim_start_matches('{').trim_end_matches('}');
        return Some(10f64.powf(plain_number(e)?));
    }
    None
}

/// The number a normalised answer writes, if it writes one.
pub fn parse_number(normalised: &str) -> Option<Number> {
    let (body, percent) = match normalised.strip_suffix('%') {
        Some(b) => (b, true),
        None => (normalised, false),
    };
    value(body)
        .filter(|v| v.is_finite())
        .map(|value| Number { value, percent })
}

fn numbers_match(a: Number, b: Number, tolerance: f64) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= tolerance * y.abs().max(1.0);
    // `50%` matches `50` and `0.5`.
    let values = |n: Number| [Some(n.value), n.percent.then_some(n.value / 100.0)];
    let ys = values(b);
    values(a)
        .iter()
        .flatten()
        .any(|&x| ys.iter().flatten().any(|&y| close(x, y)))
}

/// The elements of a tuple or interval `(a,b)`, `[a,b)`, ... split at top-level commas,
/// with its brackets.
fn elements(s: &str) -> Option<(char, Vec<&str>, char)> {
    let open = s.chars().next()?;
    let close = s.chars().last()?;
    if !matches!(open, '(' | '[') || !matches!(close, ')' | ']') || s.len() < 2 {
        return None;
    }
    let inner = &s[1..s.len() - 1];
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in inner.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&inner[start..]);
    (out.len() > 1).then_some((open, out, close))
}

/// Whether two normalised answers agree, and how they were compared.
fn same(a: &str, b: &str, tolerance: f64) -> (bool, String) {
    if let (Some(x), Some(y)) = (parse_number(a), parse_number(b)) {
        let ok = numbers_match(x, y, tolerance);
        let rel = if ok { "=" } else { "!=" };
        return (ok, format!("numbers: {a} {rel} {b}"));
    }
    if let (Some((o1, e1, c1)), Some((o2, e2, c2))) = (elements(a), elements(b)) {
        if (o1, c1) != (o2, c2) || e1.len() != e2.len() {
            return (
                false,
                format!("tuples differ in brackets or length: {a} vs {b}"),
            );
        }
        for (x, y) in e1.iter().zip(&e2) {
            let (ok, why) = same(x, y, tolerance);
            if !ok {
                return (false, format!("tuple element: {why}"));
            }
        }
        return (true, format!("tuples: {a} = {b}"));
    }
    let bare = |s: &str| {
        let s = s.to_lowercase();
        match s.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
            Some(inner) if inner.chars().count() == 1 => inner.to_string(),
            _ => s,
        }
    };
    let ok = bare(a) == bare(b);
    (ok, format!("text: {a} {} {b}", if ok { "=" } else { "!=" }))
}

/// The reference's own answer: extracted when it holds a `\boxed{}` or a `####` (a full
/// worked solution), else the whole string.
fn reference_answer(reference: &str) -> String {
    for e in [Extractor::Boxed, Extractor::Hash] {
        if let Some(Ok(a)) = extract(reference, e) {
            return a;
        }
    }
    reference.to_string()
}

/// Whether the final answer of `response` is `reference` (see the module docs).
pub fn verify(response: &str, reference: &str, config: &MathVerifyConfig) -> Verdict {
    let mut found = None;
    for &e in &config.extract {
        match extract(response, e) {
            Some(Ok(a)) => {
                found = Some(a);
                break;
            }
            Some(Err(why)) => return Verdict::no(None, why),
            None => {}
        }
    }
    let Some(answer) = found else {
        return Verdict::no(None, "no answer found");
    };
    let (a, b) = (normalise(&answer), normalise(&reference_answer(reference)));
    if a.is_empty() {
        return Verdict::no(Some(answer), "empty answer");
    }
    if b.is_empty() {
        return Verdict::no(Some(answer), "empty reference answer");
    }
    let (correct, reason) = same(&a, &b, config.tolerance);
    Verdict {
        correct,
        extracted: Some(answer),
        reason,
    }
}

/// [`verify`] as a reward source over texts with reference answers: 1 when correct, 0
/// otherwise. Errors on a row without a reference answer.
#[derive(Debug, Clone)]
pub struct MathVerify {
    name: String,
    config: MathVerifyConfig,
}

impl MathVerify {
    /// A source named `name`; errors on an invalid config.
    pub fn new(name: impl Into<String>, config: MathVerifyConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            name: name.into(),
            config,
        })
    }
}

impl<B: Backend> RewardSource<B, Texts<B>> for MathVerify {
    fn name(&self) -> &str {
        &self.name
    }

    fn score(&self, input: &Texts<B>) -> Result<RewardOutput<B>> {
        let scores = (0..input.responses.len())
            .map(|i| {
                let answer = input.answer(i, "math_verify")?;
                let correct = verify(&input.responses[i], answer, &self.config).correct;
                Ok(if correct { 1.0f32 } else { 0.0 })
            })
            .collect::<Result<Vec<f32>>>()?;
        input.output(scores)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `(response, reference, correct)`: answer formats of real model outputs and
    /// datasets (GSM8K, MATH, DAPO-Math), each verdict decided by hand.
    const CASES: &[(&str, &str, bool)] = &[
        // \boxed{}, as MATH solutions and R1-style models write it.
        ("So the total is $\\boxed{42}$.", "42", true),
        ("\\boxed{42}", "41", false),
        ("The answer is $\\boxed{\\frac{1}{2}}$", "0.5", true),
        ("$\\boxed{\\dfrac{3}{4}}$", "\\frac{3}{4}", true),
        ("$\\boxed{\\tfrac{3}{4}}$", "0.75", true),
        ("\\boxed{\\frac12}", "1/2", true),
        ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", true),
        ("\\boxed{-\\frac{1}{3}}", "-1/3", true),
        ("\\boxed{\\frac{-1}{3}}", "-\\frac{1}{3}", true),
        ("\\boxed{2\\frac{1}{2}}", "2.5", true),
        ("\\boxed{\\left( 3, 4 \\right)}", "(3,4)", true),
        ("\\boxed{(3, 5)}", "(3,4)", false),
        ("\\boxed{[1, 2)}", "[1,2)", true),
        ("\\boxed{[1, 2]}", "[1,2)", false),
        ("\\boxed{(1,2,3)}", "(1,2)", false),
        ("\\boxed{\\text{(B)}}", "B", true),
        ("\\boxed{B}", "(B)", true),
        ("\\boxed{C}", "B", false),
        ("\\boxed{90^\\circ}", "90", true),
        ("\\boxed{90^{\\circ}}", "90", true),
        ("\\boxed{5\\text{ cm}}", "5", true),
        ("\\boxed{\\$18}", "18", true),
        ("\\boxed{1,000,000}", "1000000", true),
        ("\\boxed{1{,}000}", "1000", false),
        ("\\boxed{50\\%}", "50", true),
        ("\\boxed{50\\%}", "0.5", true),
        ("\\boxed{25\\%}", "0.5", false),
        ("\\boxed{1.5\\times10^{3}}", "1500", true),
        ("\\boxed{1.5 \\cdot 10^3}", "1500", true),
        ("\\boxed{10^{-2}}", "0.01", true),
        ("\\boxed{0.333}", "1/3", false),
        ("\\boxed{0.3333333}", "1/3", true),
        ("\\boxed{3.0}", "3", true),
        ("\\boxed{x+1}", "x+1", true),
        ("\\boxed{x + 1}", "1+x", false),
        ("\\boxed{\\sqrt{2}}", "\\sqrt{2}", true),
        ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", false),
        // Several boxed answers: the last one counts.
        ("First \\boxed{3}, then I fixed it: \\boxed{4}", "4", true),
        (
            "First \\boxed{4}, then I changed it: \\boxed{3}",
            "4",
            false,
        ),
        ("\\fbox{7}", "7", true),
        ("\\boxed 7", "7", true),
        // Unbalanced braces: no answer, whatever follows.
        ("\\boxed{\\frac{1}{2}", "1/2", false),
        ("\\boxed{42", "42", false),
        // Empty answers.
        ("\\boxed{}", "0", false),
        ("\\boxed{ }", "0", false),
        ("#### ", "5", false),
        ("", "5", false),
        ("I cannot solve this.", "5", false),
        // GSM8K's ####, and references that are whole worked solutions.
        ("She has 3 + 2 = 5 apples.\n#### 5", "5", true),
        ("#### 1,234", "1234", true),
        (
            "#### 72",
            "Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72",
            true,
        ),
        (
            "#### 71",
            "Natalia sold 48/2 = 24 clips in May.\n48+24 = 72\n#### 72",
            false,
        ),
        (
            "The result is \\boxed{10}.",
            "Adding gives $\\boxed{10}$.",
            true,
        ),
        // "The answer is".
        ("The answer is 12.", "12", true),
        ("Thus, the answer is 3/4. I checked it twice.", "0.75", true),
        ("Answer: -7", "-7", true),
        ("answer: 8 dollars", "8", true),
        ("The answer is $2.50.", "2.5", true),
        ("The answer is 13", "12", false),
        ("THE ANSWER IS 9", "9", true),
        // The last number.
        ("3 + 4 = 7", "7", true),
        ("I got 7, no wait, 8", "8", true),
        ("I got 8, no wait, 7", "8", false),
        ("The temperature dropped to -3 degrees", "-3", true),
        ("It costs 1,250 dollars", "1250", true),
        ("about 6.02e23 of them", "6.02e23", true),
        ("half of them: 1/2", "0.5", true),
        ("\u{2212}4", "-4", true),
        // Tolerance.
        ("\\boxed{3.1415926}", "3.14159265", true),
        ("\\boxed{3.14}", "3.14159265", false),
    ];

    #[test]
    fn verdicts_on_real_answer_formats() {
        assert!(CASES.len() >= 60, "{} cases", CASES.len());
        let cfg = MathVerifyConfig::default();
        let wrong: Vec<String> = CASES
            .iter()
            .filter_map(|&(resp, reference, want)| {
                let v = verify(resp, reference, &cfg);
                (v.correct != want).then(|| format!("{resp:?} vs {reference:?}: {v:?}"))
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{} wrong:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    #[test]
    fn reasons_name_what_happened() {
        let cfg = MathVerifyConfig::default();
        let v = verify("\\boxed{\\frac{1}{2}", "1/2", &cfg);
        assert_eq!(v.reason, "unbalanced braces in \\boxed{");
        assert_eq!(
            verify("no digits here", "1", &cfg).reason,
            "no answer found"
        );
        let v = verify("\\boxed{}", "1", &cfg);
        assert_eq!(
            (v.extracted.as_deref(), v.reason.as_str()),
            (Some(""), "empty answer")
        );
        let v = verify("\\boxed{\\dfrac{1}{2}}", "0.5", &cfg);
        assert_eq!(v.extracted.as_deref(), Some("\\dfrac{1}{2}"));
        assert_eq!(v.reason, "numbers: \\frac{1}{2} = 0.5");
        assert!(verify("\\boxed{A}", "B", &cfg).reason.starts_with("text:"));
    }

    #[test]
    fn extractors_are_configurable_and_checked() {
        // Only `####`: a boxed answer is not read, the last number is not either.
        let hash = MathVerifyConfig {
            extract: vec![Extractor::Hash],
            ..Default::default()
        };
        assert!(!verify("\\boxed{5}", "5", &hash).correct);
        assert!(verify("so\n#### 5", "5", &hash).correct);
        let loose = MathVerifyConfig {
            tolerance: 0.01,
            ..Default::default()
        };
        assert!(verify("\\boxed{3.14}", "3.14159", &loose).correct);
        assert!(MathVerifyConfig {
            extract: vec![],
            ..Default::default()
        }
        .validate()
        .is_err());
        for t in [-1.0, f64::NAN, f64::INFINITY] {
            assert!(MathVerifyConfig {
                tolerance: t,
                ..Default::default()
            }
            .validate()
            .is_err());
        }
        let c: MathVerifyConfig = toml::from_str("extract = [\"boxed\", \"last_number\"]").unwrap();
        assert_eq!(c.extract, vec![Extractor::Boxed, Extractor::LastNumber]);
        assert_eq!(c.tolerance, 1e-6);
        assert!(toml::from_str::<MathVerifyConfig>("extract = [\"bxd\"]").is_err());
        assert!(toml::from_str::<MathVerifyConfig>("tol = 1").is_err());
    }

    #[test]
    fn numbers_parse_by_hand() {
        let n = |s: &str| parse_number(&normalise(s)).map(|n| (n.value, n.percent));
        assert_eq!(n("\\frac{3}{4}"), Some((0.75, false)));
        assert_eq!(n("1\\frac{1}{4}"), Some((1.25, false)));
        assert_eq!(n("12.5\\%"), Some((12.5, true)));
        assert_eq!(n("-2,500"), Some((-2500.0, false)));
        assert_eq!(n("2.5e-3"), Some((0.0025, false)));
        assert_eq!(n("1/0"), None, "not finite");
        assert_eq!(n("x"), None);
        assert_eq!(n("1,23"), None, "not a thousands grouping");
    }

    goodhart_core::backend_test! {
        fn math_verify_scores_a_batch_and_needs_answers<B>(device) {
            let texts = Texts::<B>::new(
                vec!["q".into(); 3],
                vec!["\\boxed{2}".into(), "#### 3".into(), "no".into()],
                vec![Some("2".into()), Some("4".into()), Some("1".into())],
                device,
            )
            .unwrap();
            let mv = MathVerify::new("gold", MathVerifyConfig::default()).unwrap();
            let out = RewardSource::<B, Texts<B>>::score(&mv, &texts).unwrap();
            let got: Vec<f32> = out.reward.into_data().convert::<f32>().into_vec().unwrap();
            assert_eq!(got, vec![1.0, 0.0, 0.0]);
            let missing = Texts::<B>::new(vec!["q".into()], vec!["1".into()], vec![None], device).unwrap();
            let err = RewardSource::<B, Texts<B>>::score(&mv, &missing).unwrap_err();
            assert!(err.to_string().contains("no reference answer"), "{err}");
        }
    }
}
