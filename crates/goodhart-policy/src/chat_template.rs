//! Chat templates: a model's Jinja template rendered as transformers'
//! `apply_chat_template` renders it.
//!
//! transformers compiles templates with Jinja2 (`trim_blocks`, `lstrip_blocks`, loop
//! controls) and adds `raise_exception(message)`, `strftime_now(format)` and its own
//! `tojson` (Python's `json.dumps`: `", "` and `": "` separators, no HTML escaping,
//! `indent`, `sort_keys`). The render context is `messages`, `tools`, `documents`,
//! `add_generation_prompt`, the tokenizer's special tokens by name (`bos_token`,
//! `eos_token`, ...) and any extra variables (`enable_thinking`). [`ChatTemplate`] does
//! the same on minijinja, with minijinja-contrib's Python string methods (`strip`,
//! `split`, `startswith`, ...). A template that fails to parse, calls
//! `raise_exception`, or uses what minijinja lacks is an error naming the reason.

use std::collections::BTreeMap;

use goodhart_core::{GoodhartError, Result};
use minijinja::{
    value::{Kwargs, Serde},
    Environment, Error, ErrorKind, Value,
};
use serde::Serialize;

/// One chat message: a role (`system`, `user`, `assistant`, `tool`) and its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who speaks.
    pub role: String,
    /// What is said.
    pub content: String,
}

impl ChatMessage {
    /// A message of `role`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Special tokens by name (`bos_token`, `eos_token`, ...), passed to every render.
    pub special_tokens: BTreeMap<String, String>,
}

const NAME: &str = "chat_template";

fn template_error(e: Error) -> GoodhartError {
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    GoodhartError::invalid("chat_template", reason)
}

impl ChatTemplate {
    /// Compiles `source`; `special_tokens` are the names and texts of the tokenizer's
    /// special tokens.
    pub fn new(source: &str, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(template_error)?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(template_error)?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// The rendered conversation; `add_generation_prompt` appends the opening of the
    /// assistant's turn; `extra` adds variables (e.g. `enable_thinking = false`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String> {
        let mut context: BTreeMap<String, Value> = self
            .special_tokens
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        for (k, v) in extra {
            context.insert(k.clone(), Value::from(Serde(v)));
        }
        context.insert("messages".into(), Value::from(Serde(messages)));
        context.insert("tools".into(), Value::from(()));
        context.insert("documents".into(), Value::from(()));
        context.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        self.env
            .get_template(NAME)
            .and_then(|t| t.render(context))
            .map_err(template_error)
    }
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`, as
/// transformers' `tojson` filter calls it.
fn tojson(value: Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    python_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// Writes `v` as Python's `json.dumps` does: keys in insertion order (or sorted),
/// separators `", "` and `": "` (`","` and newlines under an indent), floats with a
/// decimal point, non-ASCII text as it is.
fn python_json(
    v: &Value,
    indent: Option<usize>,
    sort_keys: bool,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), Error> {
    use minijinja::value::ValueKind;
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    let quote = |s: &str| serde_json::to_string(s).expect("a string serialises");
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => {
            let f = f64::try_from(v.clone())?;
            if !f.is_finite() {
                // Python writes NaN, Infinity and -Infinity.
                out.push_str(if f.is_nan() {
                    "NaN"
                } else if f > 0.0 {
                    "Infinity"
                } else {
                    "-Infinity"
                });
            } else if f.fract() == 0.0 && f.abs() < 1e16 {
                out.push_str(&format!("{f:.1}"));
            } else {
                out.push_str(&format!("{f:?}"));
            }
        }
        ValueKind::String => out.push_str(&quote(v.as_str().unwrap_or_default())),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                out.push_str(&quote(&k.to_string()));
                out.push_str(": ");
                python_json(&v.get_item(k)?, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(sep);
                }
                newline(out, depth + 1);
                python_json(item, indent, sort_keys, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {other} value is not JSON"),
            ))
        }
    }
    Ok(())
}

/// `strftime_now(format)`: the current UTC time, for the codes templates use (`%d`, `%m`,
/// `%Y`, `%y`, `%b`, `%B`, `%H`, `%M`, `%S`, `%%`); transformers uses the local time.
fn strftime_now(format: String) -> std::result::Result<Value, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(Value::from(strftime(&format, secs)?))
}

/// `format` at `secs` seconds after the Unix epoch (UTC).
fn strftime(format: &str, secs: u64) -> std::result::Result<String, Error> {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Days to civil date (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let rem = secs % 86_400;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let name = MONTHS[(month - 1) as usize];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&name[..3]),
            Some('B') => out.push_str(name),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!("strftime_now: `%{}` is not supported", other.unwrap_or(' ')),
                ))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, messages: &[ChatMessage]) -> Result<String> {
        ChatTemplate::new(source, BTreeMap::new())?.render(messages, false, &Default::default())
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let m = [ChatMessage::new("user", "<b>é</b> & \"q\"")];
        // json.dumps({"role": "user", "content": "<b>é</b> & \"q\""}, ensure_ascii=False)
        assert_eq!(
            render("{{ messages[0] | tojson }}", &m).unwrap(),
            r#"{"role": "user", "content": "<b>é</b> & \"q\""}"#
        );
        // json.dumps(..., indent=2, sort_keys=True)
        assert_eq!(
            render("{{ messages[0] | tojson(indent=2, sort_keys=true) }}", &m).unwrap(),
            "{\n  \"content\": \"<b>é</b> & \\\"q\\\"\",\n  \"role\": \"user\"\n}"
        );
        // json.dumps([1, 2.0, [], {}, None, True])
        assert_eq!(
            render("{{ [1, 2.0, [], {}, none, true] | tojson }}", &[]).unwrap(),
            "[1, 2.0, [], {}, null, true]"
        );
    }

    #[test]
    fn raise_exception_and_bad_templates_are_errors() {
        let e = render("{{ raise_exception('roles must alternate') }}", &[]).unwrap_err();
        assert!(e.to_string().contains("roles must alternate"), "{e}");
        let e = ChatTemplate::new("{% for %}", BTreeMap::new()).unwrap_err();
        assert!(e.to_string().contains("chat_template"), "{e}");
    }

    #[test]
    fn strftime_formats_a_known_instant() {
        // 2024-07-26 13:05:09 UTC.
        assert_eq!(
            strftime("%d %b %Y, %B %m %y %H:%M:%S %%", 1_721_999_109).unwrap(),
            "26 Jul 2024, July 07 24 13:05:09 %"
        );
        assert_eq!(strftime("%Y-%m-%d", 951_782_400).unwrap(), "2000-02-29");
        assert!(strftime("%Q", 0).is_err());
    }
}
