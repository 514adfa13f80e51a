//! Prompt and preference datasets from JSON-lines and Parquet files, with the columns
//! named in the config (`[data]`):
//!
//! ```toml
//! [data]
//! path = "prompts.jsonl"          # or .parquet
//! format = "jsonl"                # jsonl | parquet; from the extension when unset
//! columns = { prompt = "question", answer = "answer", rubric = "rubric" }
//! ```
//!
//! A text field is a string, or a chat: a list of `{"role", "content"}` messages (TRL's
//! conversational format; `messages` names such a column for the prompt). A prompt set
//! reads `prompt` (or `messages`) and, when named, `answer` (a string or a number) and
//! `rubric` (weighted criteria, `goodhart_reward::rubric::Rubric::from_json`); a
//! preference set reads `prompt`, `chosen` and `rejected` (a missing `prompt` column is
//! allowed when `chosen` and `rejected` are chats: their last message is the response
//! and the messages before it, which must agree, the prompt). Every bad row is reported
//! with its line (JSONL, 1-based, blank lines counted) or row (Parquet, 0-based) number,
//! up to ten of them in one error; an empty set is an error. Parquet files are read
//! row by row through the `parquet` crate (snappy-compressed or uncompressed, as
//! `datasets` and pyarrow write them by default).

use std::path::{Path, PathBuf};

use goodhart_core::GoodhartError;
use goodhart_policy::ChatMessage;
use goodhart_reward::rubric::Rubric;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use thiserror::Error;

/// The file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// One JSON object per line.
    Jsonl,
    /// Apache Parquet.
    Parquet,
}

/// Which column holds what (defaults: the names TRL's datasets use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Columns {
    /// The prompt (text or chat).
    pub prompt: String,
    /// A chat prompt column, read instead of `prompt` when set.
    pub messages: Option<String>,
    /// The reference answer, if the set has one.
    pub answer: Option<String>,
    /// The rubric (weighted criteria), if the set has one.
    pub rubric: Option<String>,
    /// The preferred response.
    pub chosen: String,
    /// The other response.
    pub rejected: String,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            prompt: "prompt".into(),
            messages: None,
            answer: None,
            rubric: None,
            chosen: "chosen".into(),
            rejected: "rejected".into(),
        }
    }
}

/// A dataset's file and columns (`[data]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The file.
    pub path: PathBuf,
    /// Its format; from the extension (`.jsonl`, `.json`, `.parquet`) when unset.
    #[serde(default)]
    pub format: Option<DataFormat>,
    /// The column mapping.
    #[serde(default)]
    pub columns: Columns,
    /// Render plain-text prompts as one user message through the tokenizer's chat
    /// template (`messages` prompts always go through it).
    #[serde(default)]
    pub chat: bool,
}

/// What can be wrong with a dataset.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum DataError {
    /// The file cannot be read, or is not of its format, or holds no row.
    #[error("`{path}`: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Rows that cannot be used.
    #[error("`{path}`: {}{}", .rows.iter().map(|(r, why)| format!("\n  {r}: {why}")).collect::<String>(), if *.more > 0 { format!("\n  and {} more", .more) } else { String::new() })]
    Rows {
        /// The file.
        path: PathBuf,
        /// Up to ten bad rows: where (`line 7`, `row 3`) and why.
        rows: Vec<(String, String)>,
        /// How many more bad rows there are.
        more: usize,
    },
}

impl From<DataError> for GoodhartError {
    fn from(e: DataError) -> Self {
        GoodhartError::invalid("data", e.to_string())
    }
}

/// A prompt or response: plain text or a chat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Text {
    /// A string.
    Plain(String),
    /// Messages.
    Chat(Vec<ChatMessage>),
}

/// One prompt of a prompt set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptRow {
    /// Where it is in the file (`line 3`, `row 2`).
    pub at: String,
    /// The prompt.
    pub prompt: Text,
    /// Its reference answer, when the set has one.
    pub answer: Option<String>,
    /// Its rubric, when the set has one.
    pub rubric: Option<Rubric>,
}

/// One pair of a preference set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PreferenceRow {
    /// Where it is in the file.
    pub at: String,
    /// The prompt.
    pub prompt: Text,
    /// The preferred response.
    pub chosen: Text,
    /// The other response.
    pub rejected: Text,
}

const SHOWN: usize = 10;

impl DataConfig {
    /// The format: `format`, or the one the extension names.
    pub fn format(&self) -> Result<DataFormat, DataError> {
        if let Some(f) = self.format {
            return Ok(f);
        }
        match self.path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json" | "ndjson") => Ok(DataFormat::Jsonl),
            Some("parquet") => Ok(DataFormat::Parquet),
            _ => Err(DataError::File {
                path: self.path.clone(),
                reason: "set `data.format` (jsonl or parquet): the extension names neither".into(),
            }),
        }
    }

    /// The file's records with where each is (`line N` or `row N`); a line that is not a
    /// JSON object is its error.
    fn records(&self) -> Result<Vec<(String, Parsed)>, DataError> {
        let file_error = |reason: String| DataError::File {
            path: self.path.clone(),
            reason,
        };
        let records = match self.format()? {
            DataFormat::Jsonl => {
                let text =
                    std::fs::read_to_string(&self.path).map_err(|e| file_error(e.to_string()))?;
                let mut records = Vec::new();
                for (i, line) in text.lines().enumerate() {
                    if line.trim().is_empty() {
                        continue;
                    }
                    let record = match serde_json::from_str::<Value>(line) {
                        Ok(Value::Object(m)) => Ok(m),
                        Ok(_) => Err("not a JSON object".to_string()),
                        Err(e) => Err(format!("not valid JSON: {e}")),
                    };
                    records.push((format!("line {}", i + 1), record));
                }
                records
            }
            DataFormat::Parquet => read_parquet(&self.path)
                .map_err(file_error)?
                .into_iter()
                .map(|(at, m)| (at, Ok(m)))
                .collect(),
        };
        if records.is_empty() {
            return Err(file_error("holds no rows".into()));
        }
        Ok(records)
    }

    fn refuse(&self, mut bad: Vec<(String, String)>) -> Result<(), DataError> {
        if bad.is_empty() {
            return Ok(());
        }
        let more = bad.len().saturating_sub(SHOWN);
        bad.truncate(SHOWN);
        Err(DataError::Rows {
            path: self.path.clone(),
            rows: bad,
            more,
        })
    }

    /// `read` of every record, where it is in the file; every bad row refused at once.
    fn rows<T>(
        &self,
        read: impl Fn(&str, &Map<String, Value>) -> Result<T, String>,
    ) -> Result<Vec<T>, DataError> {
        let mut rows = Vec::new();
        let mut bad = Vec::new();
        for (at, record) in self.records()? {
            match record.and_then(|r| read(&at, &r)) {
                Ok(row) => rows.push(row),
                Err(why) => bad.push((at, why)),
            }
        }
        self.refuse(bad)?;
        Ok(rows)
    }

    /// Every row as a prompt (see the module docs).
    pub fn read_prompts(&self) -> Result<Vec<PromptRow>, DataError> {
        let c = &self.columns;
        let prompt_column = c.messages.as_deref().unwrap_or(&c.prompt);
        self.rows(|at, record| {
            Ok(PromptRow {
                at: at.to_string(),
                prompt: text(record, prompt_column)?,
                answer: match c.answer.as_deref() {
                    None => None,
                    Some(col) => Some(answer(record, col)?),
                },
                rubric: match c.rubric.as_deref() {
                    None => None,
                    Some(col) => Some(
                        Rubric::from_json(
                            record
                                .get(col)
                                .ok_or_else(|| format!("no `{col}` column"))?,
                        )
                        .map_err(|why| format!("`{col}`: {why}"))?,
                    ),
                },
            })
        })
    }

    /// Every row as a preference pair (see the module docs).
    pub fn read_preferences(&self) -> Result<Vec<PreferenceRow>, DataError> {
        let c = &self.columns;
        let column = c.messages.as_deref().unwrap_or(&c.prompt);
        self.rows(|at, record| {
            let chosen = text(record, &c.chosen)?;
            let rejected = text(record, &c.rejected)?;
            // Parquet writes an absent column of a row as null.
            let (prompt, chosen, rejected) = if record.get(column).is_some_and(|v| !v.is_null()) {
                (text(record, column)?, chosen, rejected)
            } else {
                implicit_prompt(chosen, rejected)
                    .map_err(|why| format!("no `{column}` column, and {why}"))?
            };
            Ok(PreferenceRow {
                at: at.to_string(),
                prompt,
                chosen,
                rejected,
            })
        })
    }
}

/// The text in `column`: a non-empty string, or a non-empty list of messages.
fn text(record: &Map<String, Value>, column: &str) -> Result<Text, String> {
    match record.get(column) {
        None => {
            let mut have: Vec<&str> = record.keys().map(String::as_str).collect();
            have.sort();
            Err(format!("no `{column}` column (it has {})", have.join(", ")))
        }
        Some(Value::String(s)) if s.is_empty() => Err(format!("`{column}` is empty")),
        Some(Value::String(s)) => Ok(Text::Plain(s.clone())),
        Some(Value::Array(items)) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let field = |name: &str| {
                    m.get(name)
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| {
                            format!("`{column}[{i}]` is not a message with a string `{name}`")
                        })
                };
                Ok(ChatMessage::new(field("role")?, field("content")?))
            })
            .collect::<Result<_, String>>()
            .map(Text::Chat),
        Some(other) => Err(format!(
            "`{column}` is {}, not a string or a list of messages",
            kind(other)
        )),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an empty list",
        Value::Object(_) => "an object",
    }
}

/// A reference answer: a string, or a number written as text.
fn answer(record: &Map<String, Value>, column: &str) -> Result<String, String> {
    match record.get(column) {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(other) => Err(format!(
            "`{column}` is {}, not a string or a number",
            kind(other)
        )),
        None => Err(format!("no `{column}` column")),
    }
}

/// `(prompt, chosen, rejected)` from two chats that share every message but their last.
fn implicit_prompt(chosen: Text, rejected: Text) -> Result<(Text, Text, Text), String> {
    let (Text::Chat(mut c), Text::Chat(mut r)) = (chosen, rejected) else {
        return Err("`chosen` and `rejected` are not both chats".into());
    };
    let (Some(c_last), Some(r_last)) = (c.pop(), r.pop()) else {
        return Err("a chat is empty".into());
    };
    if c != r || c.is_empty() {
        return Err("`chosen` and `rejected` do not share their prompt messages".into());
    }
    Ok((
        Text::Chat(c),
        Text::Chat(vec![c_last]),
        Text::Chat(vec![r_last]),
    ))
}

/// One row of a data file (a JSONL line or a Parquet row) as a JSON object.
type Record = Map<String, Value>;

/// A record, or why its line is not one.
type Parsed = Result<Record, String>;

/// The rows of a Parquet file as JSON objects, with their row numbers.
fn read_parquet(path: &Path) -> Result<Vec<(String, Record)>, String> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let reader = SerializedFileReader::new(file).map_err(|e| format!("not a Parquet file: {e}"))?;
    let rows = reader.get_row_iter(None).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| format!("row {i}: {e}"))?;
        let record = row
            .get_column_iter()
            .map(|(name, field)| Ok((name.clone(), json(field)?)))
            .collect::<Result<Record, String>>()
            .map_err(|e| format!("row {i}: {e}"))?;
        out.push((format!("row {i}"), record));
    }
    Ok(out)
}

/// A Parquet field as JSON: groups as objects, lists as arrays, numbers and strings as
/// they are; other types (bytes, decimals, times, maps) are refused.
fn json(field: &parquet::record::Field) -> Result<Value, String> {
    use parquet::record::Field as F;
    Ok(match field {
        F::Null => Value::Null,
        F::Bool(b) => Value::Bool(*b),
        F::Byte(x) => (*x).into(),
        F::Short(x) => (*x).into(),
        F::Int(x) => (*x).into(),
        F::Long(x) => (*x).into(),
        F::UByte(x) => (*x).into(),
        F::UShort(x) => (*x).into(),
        F::UInt(x) => (*x).into(),
        F::ULong(x) => (*x).into(),
        F::Float(x) => f64::from(*x).into(),
        F::Double(x) => (*x).into(),
        F::Str(s) => Value::String(s.clone()),
        F::Group(row) => Value::Object(
            row.get_column_iter()
                .map(|(name, f)| Ok((name.clone(), json(f)?)))
                .collect::<Result<_, String>>()?,
        ),
        F::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .map(json)
                .collect::<Result<_, String>>()?,
        ),
        other => {
            return Err(format!(
                "a column holds {other:?}, which is not text or a number"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/data")
            .join(name)
    }

    fn config(toml_text: &str) -> DataConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn prompt_sets_read_the_same_from_jsonl_and_parquet() {
        for file in ["prompts.jsonl", "prompts.parquet"] {
            let c = config(&format!(
                "path = {:?}\ncolumns = {{ prompt = \"question\", answer = \"answer\" }}",
                fixture(file)
            ));
            let rows = c.read_prompts().unwrap();
            assert_eq!(rows.len(), 8, "{file}");
            assert_eq!(
                rows[0].prompt,
                Text::Plain("What is 2 + 3?".into()),
                "{file}"
            );
            assert_eq!(rows[0].answer.as_deref(), Some("5"), "{file}");
            // A number in the answer column becomes its text.
            assert_eq!(rows[7].answer.as_deref(), Some("12"), "{file}");
        }
        let jsonl = config(&format!("path = {:?}", fixture("prompts.jsonl")));
        assert_eq!(jsonl.format().unwrap(), DataFormat::Jsonl);
        // Line numbers count from 1 and count blank lines; rows count from 0.
        let rows = config(&format!(
            "path = {:?}\ncolumns = {{ prompt = \"question\" }}",
            fixture("prompts.jsonl")
        ))
        .read_prompts()
        .unwrap();
        assert_eq!(rows[0].at, "line 1");
        assert_eq!(rows[4].at, "line 6");
        let rows = config(&format!(
            "path = {:?}\ncolumns = {{ prompt = \"question\" }}",
            fixture("prompts.parquet")
        ))
        .read_prompts()
        .unwrap();
        assert_eq!(rows[4].at, "row 4");
    }

    #[test]
    fn chat_prompts_and_preferences_are_read() {
        for file in ["preferences.jsonl", "preferences.parquet"] {
            let rows = config(&format!("path = {:?}", fixture(file)))
                .read_preferences()
                .unwrap();
            assert_eq!(rows.len(), 3, "{file}");
            if file.ends_with("jsonl") {
                // An explicit string prompt.
                assert_eq!(rows[0].prompt, Text::Plain("Say hi.".into()));
                assert_eq!(rows[0].chosen, Text::Plain("Hi!".into()));
            } else {
                // Parquet's column types: the same pair as a chat.
                assert_eq!(
                    rows[0].prompt,
                    Text::Chat(vec![ChatMessage::new("user", "Say hi.")])
                );
            }
            // Rows 1, 2: conversational, the prompt implied by the shared messages.
            assert_eq!(
                rows[1].prompt,
                Text::Chat(vec![ChatMessage::new("user", "What is 2 + 2?")])
            );
            assert_eq!(
                rows[1].rejected,
                Text::Chat(vec![ChatMessage::new("assistant", "5")])
            );
        }
        let chats = config(&format!(
            "path = {:?}\ncolumns = {{ messages = \"messages\" }}",
            fixture("chats.jsonl")
        ))
        .read_prompts()
        .unwrap();
        assert_eq!(
            chats[0].prompt,
            Text::Chat(vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Name a colour.")
            ])
        );
    }

    #[test]
    fn bad_rows_are_reported_with_their_line() {
        let c = config(&format!(
            "path = {:?}\ncolumns = {{ prompt = \"question\", answer = \"answer\" }}",
            fixture("bad.jsonl")
        ));
        let e = c.read_prompts().unwrap_err().to_string();
        for want in [
            "line 2: not valid JSON",
            "line 3: no `question` column (it has answer, q)",
            "line 4: `question` is empty",
            "line 5: `question` is a number, not a string or a list of messages",
            "line 6: `question[0]` is not a message with a string `content`",
            "line 7: `answer` is null, not a string or a number",
            "line 8: not a JSON object",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        assert!(!e.contains("line 1:"), "{e}");
        // More than ten bad rows: ten shown and the rest counted.
        let path = std::env::temp_dir().join(format!("goodhart-data-{}.jsonl", std::process::id()));
        std::fs::write(&path, "[]\n".repeat(13)).unwrap();
        let c = DataConfig {
            path: path.clone(),
            ..c
        };
        match c.read_prompts().unwrap_err() {
            DataError::Rows { rows, more, .. } => assert_eq!((rows.len(), more), (10, 3)),
            e => panic!("{e}"),
        }
        // No rows, an unknown extension, a missing file, a file that is not Parquet.
        std::fs::write(&path, "\n\n").unwrap();
        assert!(c
            .read_prompts()
            .unwrap_err()
            .to_string()
            .contains("holds no rows"));
        let odd = DataConfig {
            path: path.with_extension("csv"),
            ..c.clone()
        };
        assert!(odd
            .read_prompts()
            .unwrap_err()
            .to_string()
            .contains("data.format"));
        let parquet = DataConfig {
            path: fixture("prompts.jsonl"),
            format: Some(DataFormat::Parquet),
            ..c.clone()
        };
        assert!(parquet
            .read_prompts()
            .unwrap_err()
            .to_string()
            .contains("not a Parquet file"));
        let missing = DataConfig {
            path: fixture("none.jsonl"),
            ..c
        };
        assert!(matches!(
            missing.read_prompts(),
            Err(DataError::File { .. })
        ));
        assert!(toml::from_str::<DataConfig>("path = \"a.jsonl\"\ncolumn = {}").is_err());
    }
}
