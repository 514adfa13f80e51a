//! Training logs from anywhere as [`Run`]s: a TRL, verl or OpenRLHF run exported to JSON
//! lines or CSV, its column names mapped to the metric keys a detector reads, so the
//! detectors ([`crate::detect`]) and their evaluation ([`crate::evaluate`]) run on it.
//!
//! - JSON lines: one object per non-empty line; numbers are values, `null` or an absent
//!   key is a missing value.
//! - CSV: a header row, then one record per row (the `csv` crate's RFC 4180 reader); an
//!   empty cell is a missing value, any other cell must parse as a number.
//!
//! With a `filter`, only the rows whose filter column holds the given value are read (one
//! series of a goodhart `metrics.jsonl`, one run of an export). The step of a row is its
//! `step_key` column: a non-negative integer (`12` or `12.0`).
//! Consecutive rows of one step are merged (loggers often write a step's metrics in
//! several rows); a value given twice for one step with two different numbers, or a step
//! smaller than the one before, is an error naming the row. A mapped column that no row
//! has is an error naming it and listing the log's columns, and a value that is not a
//! finite number (`NaN`, `inf`, text) is an error naming its row and column: never a
//! silent gap that would keep a detector from firing.
//!
//! [`proxy_only_for`] and [`columns_for`] choose a detector's signals and their columns
//! from `(signal, column)` pairs (what `cargo xtask detect --map` gives).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    detect::{DetectorConfig, ProxyOnlyConfig},
    evaluate::Run,
};

/// The file formats of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

impl LogFormat {
    /// The format a file's extension names (`.jsonl`, `.json`, `.csv`).
    pub fn from_path(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "jsonl" | "json" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            _ => None,
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "jsonl" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            other => Err(format!("`{other}` is not a log format: jsonl or csv")),
        }
    }
}

/// How to read a log: its format, its step column, and which column holds each metric.
#[derive(Debug, Clone, PartialEq)]
pub struct LogSpec {
    /// The format; from the extension when unset.
    pub format: Option<LogFormat>,
    /// The column holding the step.
    pub step_key: String,
    /// `(metric key, column)`: the run's metric `key` is the log's `column`.
    pub columns: Vec<(String, String)>,
    /// `(column, value)`: only rows whose `column` holds `value` (as text: `grpo`, `3`)
    /// are read, e.g. one series of a log that holds several.
    pub filter: Option<(String, String)>,
}

/// What can be wrong with a log.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum LogError {
    /// The file cannot be read, or its format is unknown.
    #[error("`{path}`: {reason}")]
    File {
        /// The log.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A row that cannot be used.
    #[error("`{path}`, {at}: {reason}")]
    Row {
        /// The log.
        path: PathBuf,
        /// Where (`line 3`, `row 2`).
        at: String,
        /// Why.
        reason: String,
    },
    /// A mapped column that no row has.
    #[error("`{path}` has no column `{column}` (for `{key}`); its columns: {}", .available.join(", "))]
    MissingColumn {
        /// The log.
        path: PathBuf,
        /// The column.
        column: String,
        /// The metric key it was to hold.
        key: String,
        /// The columns the log has, sorted.
        available: Vec<String>,
    },
}

/// The proxy-only detector's defaults ([`ProxyOnlyConfig::default`]) reading only the
/// signals `maps` names (`(signal, column)` pairs); errors naming a signal it does not
/// read, or when `maps` is empty.
pub fn proxy_only_for(maps: &[(String, String)]) -> Result<DetectorConfig, String> {
    let mut c = ProxyOnlyConfig::default();
    let known: Vec<String> = c.signals.iter().map(|s| s.key.clone()).collect();
    if let Some((signal, _)) = maps.iter().find(|m| !known.contains(&m.0)) {
        return Err(format!(
            "the proxy-only detector reads no signal `{signal}`; it reads {}",
            known.join(", ")
        ));
    }
    c.signals.retain(|s| maps.iter().any(|m| m.0 == s.key));
    if c.signals.is_empty() {
        return Err(format!(
            "map at least one of the proxy-only detector's signals: {}",
            known.join(", ")
        ));
    }
    Ok(DetectorConfig::ProxyOnly(c))
}

/// The `(metric key, column)` pairs `config` reads: each key's column from `maps`, else a
/// column of the key's own name. A signal in `maps` the detector does not read is an
/// error naming it (a misspelt signal must not go unread).
pub fn columns_for(
    config: &DetectorConfig,
    maps: &[(String, String)],
) -> Result<Vec<(String, String)>, String> {
    let reads: Vec<String> = config.keys().into_iter().map(|k| k.0).collect();
    if let Some((signal, _)) = maps.iter().find(|m| !reads.contains(&m.0)) {
        return Err(format!(
            "the detector reads no signal `{signal}`; it reads {}",
            reads.join(", ")
        ));
    }
    Ok(reads
        .into_iter()
        .map(|key| {
            let column = maps
                .iter()
                .find(|m| m.0 == key)
                .map_or_else(|| key.clone(), |m| m.1.clone());
            (key, column)
        })
        .collect())
}

/// One row: where it is, its step, and its mapped values.
type Row = (String, u64, BTreeMap<String, f64>);

/// Reads the log at `path` as a [`Run`] named by its file name, its metrics keyed by
/// `spec.columns`' metric keys (see the module docs for the rules and errors).
pub fn read_log(path: &Path, spec: &LogSpec) -> Result<Run, LogError> {
    let file = |reason: String| LogError::File {
        path: path.into(),
        reason,
    };
    let mut keys = BTreeSet::new();
    for (key, _) in &spec.columns {
        if !keys.insert(key) {
            return Err(file(format!("`{key}` is mapped to two columns")));
        }
    }
    let format = match spec.format {
        Some(f) => f,
        None => LogFormat::from_path(path).ok_or_else(|| {
            file("cannot tell the format from the extension: give jsonl or csv".into())
        })?,
    };
    let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
    let (rows, columns) = match format {
        LogFormat::Jsonl => jsonl_rows(path, &text, spec)?,
        LogFormat::Csv => csv_rows(path, &text, spec)?,
    };
    for (key, column) in &spec.columns {
        if !columns.contains(column) {
            return Err(LogError::MissingColumn {
                path: path.into(),
                column: column.clone(),
                key: key.clone(),
                available: columns.iter().cloned().collect(),
            });
        }
    }
    if let Some((column, want)) = &spec.filter {
        if !columns.contains(column) {
            return Err(LogError::MissingColumn {
                path: path.into(),
                column: column.clone(),
                key: format!("the filter {column}={want}"),
                available: columns.iter().cloned().collect(),
            });
        }
    }
    if rows.is_empty() {
        return Err(file(match &spec.filter {
            Some((c, v)) => format!("holds no row with {c}={v}"),
            None => "holds no row".into(),
        }));
    }
    let mut steps: Vec<(u64, BTreeMap<String, f64>)> = Vec::new();
    for (at, step, values) in rows {
        let row_error = |reason: String| LogError::Row {
            path: path.into(),
            at: at.clone(),
            reason,
        };
        match steps.last_mut() {
            Some((last, merged)) if *last == step => {
                for (k, v) in values {
                    match merged.get(&k) {
                        Some(old) if *old != v => {
                            return Err(row_error(format!(
                                "step {step} gives `{k}` twice: {old} and {v}"
                            )))
                        }
                        _ => {
                            merged.insert(k, v);
                        }
                    }
                }
            }
            Some((last, _)) if *last > step => {
                return Err(row_error(format!(
                    "step {step} comes after step {last}: steps must not decrease"
                )))
            }
            _ => steps.push((step, values)),
        }
    }
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    Ok(Run { name, steps })
}

/// A step from a number: a non-negative integer, possibly written as `12.0`.
fn step_of(x: f64) -> Result<u64, String> {
    if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 2f64.powi(53) {
        Ok(x as u64)
    } else {
        Err(format!("{x} is not a step (a non-negative integer)"))
    }
}

fn finite(column: &str, x: f64) -> Result<f64, String> {
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("`{column}` is {x}, not a finite number"))
    }
}

fn jsonl_rows(
    path: &Path,
    text: &str,
    spec: &LogSpec,
) -> Result<(Vec<Row>, BTreeSet<String>), LogError> {
    let mut rows = Vec::new();
    let mut columns = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = format!("line {}", i + 1);
        let error = |reason: String| LogError::Row {
            path: path.into(),
            at: at.clone(),
            reason,
        };
        let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
            return Err(error("not a JSON object".into()));
        };
        columns.extend(obj.keys().cloned());
        if let Some((column, want)) = &spec.filter {
            let text = match obj.get(column) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                _ => continue,
            };
            if &text != want {
                continue;
            }
        }
        let step = match obj.get(&spec.step_key) {
            Some(Value::Number(n)) => step_of(n.as_f64().unwrap_or(f64::NAN)).map_err(&error)?,
            Some(other) => {
                return Err(error(format!(
                    "step `{}` is {other}, not a number",
                    spec.step_key
                )))
            }
            None => return Err(error(format!("no step `{}`", spec.step_key))),
        };
        let mut values = BTreeMap::new();
        for (key, column) in &spec.columns {
            let x = match obj.get(column) {
                None | Some(Value::Null) => continue,
                Some(Value::Number(n)) => n.as_f64().unwrap_or(f64::NAN),
                Some(Value::String(s)) => s
                    .trim()
                    .parse::<f64>()
                    .map_err(|_| error(format!("`{column}` is {s:?}, not a number")))?,
                Some(other) => return Err(error(format!("`{column}` is {other}, not a number"))),
            };
            values.insert(key.clone(), finite(column, x).map_err(&error)?);
        }
        rows.push((at, step, values));
    }
    Ok((rows, columns))
}

fn csv_rows(
    path: &Path,
    text: &str,
    spec: &LogSpec,
) -> Result<(Vec<Row>, BTreeSet<String>), LogError> {
    let file = |reason: String| LogError::File {
        path: path.into(),
        reason,
    };
    let mut reader = csv::ReaderBuilder::new().from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| file(e.to_string()))?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let index = |column: &str| header.iter().position(|h| h == column);
    let step_at = index(&spec.step_key).ok_or_else(|| {
        file(format!(
            "no step column `{}`; its columns: {}",
            spec.step_key,
            header.join(", ")
        ))
    })?;
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        // The header is row 1 of the file.
        let at = format!("row {}", i + 2);
        let error = |reason: String| LogError::Row {
            path: path.into(),
            at: at.clone(),
            reason,
        };
        let record = record.map_err(|e| error(e.to_string()))?;
        let cell = |j: usize| record.get(j).map(str::trim).unwrap_or("");
        if let Some((column, want)) = &spec.filter {
            if index(column).map(cell) != Some(want.as_str()) {
                continue;
            }
        }
        let step_text = cell(step_at);
        let step = step_text
            .parse::<f64>()
            .map_err(|_| format!("step `{}` is {step_text:?}, not a number", spec.step_key))
            .and_then(step_of)
            .map_err(&error)?;
        let mut values = BTreeMap::new();
        for (key, column) in &spec.columns {
            let Some(j) = index(column) else { continue };
            let text = cell(j);
            if text.is_empty() {
                continue;
            }
            let x = text
                .parse::<f64>()
                .map_err(|_| error(format!("`{column}` is {text:?}, not a number")))?;
            values.insert(key.clone(), finite(column, x).map_err(&error)?);
        }
        rows.push((at, step, values));
    }
    Ok((rows, header.into_iter().collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("goodhart-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn spec(columns: &[(&str, &str)]) -> LogSpec {
        LogSpec {
            format: None,
            step_key: "step".into(),
            filter: None,
            columns: columns
                .iter()
                .map(|(k, c)| (k.to_string(), c.to_string()))
                .collect(),
        }
    }

    #[test]
    fn csv_and_jsonl_read_to_the_same_run() {
        let csv = write(
            "log.csv",
            "step,kl,entropy,note\n0,0.0,2.5,a\n1,0.1,,b\n1,,2.4,b\n2.0,0.3,2.2,\"x, y\"\n",
        );
        let jsonl = write(
            "log.jsonl",
            "{\"step\": 0, \"kl\": 0.0, \"entropy\": 2.5}\n\n{\"step\": 1, \"kl\": 0.1, \"entropy\": null}\n{\"step\": 1, \"entropy\": \"2.4\"}\n{\"step\": 2, \"kl\": 0.3, \"entropy\": 2.2}\n",
        );
        let s = spec(&[("kl/ref", "kl"), ("entropy", "entropy")]);
        let a = read_log(&csv, &s).unwrap();
        let b = read_log(&jsonl, &s).unwrap();
        assert_eq!(a.steps, b.steps);
        assert_eq!((a.name.as_str(), b.name.as_str()), ("log.csv", "log.jsonl"));
        // Step 1's two rows merged; keys renamed to the metric keys.
        let want: Vec<(u64, BTreeMap<String, f64>)> = vec![
            (0, [("kl/ref".into(), 0.0), ("entropy".into(), 2.5)].into()),
            (1, [("kl/ref".into(), 0.1), ("entropy".into(), 2.4)].into()),
            (2, [("kl/ref".into(), 0.3), ("entropy".into(), 2.2)].into()),
        ];
        assert_eq!(a.steps, want);
    }

    #[test]
    fn bad_logs_are_errors_naming_the_row_or_column() {
        let s = spec(&[("kl/ref", "kl")]);
        let err = |name: &str, text: &str, s: &LogSpec| {
            read_log(&write(name, text), s).unwrap_err().to_string()
        };
        // A misspelt column: named, with the log's columns.
        let e = err("a.csv", "step,kl\n0,1\n", &spec(&[("kl/ref", "kll")]));
        assert!(
            e.contains("no column `kll` (for `kl/ref`); its columns: kl, step"),
            "{e}"
        );
        let e = err(
            "b.jsonl",
            "{\"step\": 0, \"kl\": 1}\n",
            &spec(&[("kl/ref", "KL")]),
        );
        assert!(
            e.contains("no column `KL`") && e.contains("kl, step"),
            "{e}"
        );
        for (name, text, want) in [
            ("c.csv", "step,kl\n0,1\n1,nan\n", "row 3: `kl` is NaN"),
            ("d.csv", "step,kl\n0,1\n1,abc\n", "row 3: `kl` is \"abc\""),
            (
                "e.csv",
                "step,kl\n1,1\n0,2\n",
                "row 3: step 0 comes after step 1",
            ),
            (
                "f.csv",
                "step,kl\n0,1\n0,2\n",
                "row 3: step 0 gives `kl/ref` twice",
            ),
            ("g.csv", "step,kl\n-1,1\n", "row 2: -1 is not a step"),
            ("h.csv", "epoch,kl\n0,1\n", "no step column `step`"),
            (
                "i.jsonl",
                "{\"step\": 0, \"kl\": 1}\n[1]\n",
                "line 2: not a JSON object",
            ),
            ("j.jsonl", "{\"kl\": 1}\n", "line 1: no step `step`"),
            (
                "k.jsonl",
                "{\"step\": 0.5, \"kl\": 1}\n",
                "0.5 is not a step",
            ),
            ("l.jsonl", "{\"step\": 0, \"kl\": true}\n", "`kl` is true"),
            ("m.csv", "step,kl\n", "holds no row"),
            ("n.txt", "step,kl\n0,1\n", "cannot tell the format"),
        ] {
            let e = err(name, text, &s);
            assert!(e.contains(want), "{name}: {e}");
        }
        // A filter keeps one series; steps repeat across series.
        let two = "{\"step\": 0, \"series\": \"a\", \"kl\": 1}\n{\"step\": 0, \"series\": \"b\", \"kl\": 5}\n{\"step\": 1, \"series\": \"a\", \"kl\": 2}\n";
        let path = write("p.jsonl", two);
        assert!(read_log(&path, &s)
            .unwrap_err()
            .to_string()
            .contains("gives `kl/ref` twice"));
        let b = LogSpec {
            filter: Some(("series".into(), "b".into())),
            ..s.clone()
        };
        assert_eq!(
            read_log(&path, &b).unwrap().steps,
            vec![(0, [("kl/ref".to_string(), 5.0)].into())]
        );
        let c = LogSpec {
            filter: Some(("series".into(), "c".into())),
            ..s.clone()
        };
        assert!(read_log(&path, &c)
            .unwrap_err()
            .to_string()
            .contains("no row with series=c"));
        let twice = spec(&[("kl/ref", "kl"), ("kl/ref", "kl2")]);
        assert!(err("o.csv", "step,kl\n0,1\n", &twice).contains("mapped to two columns"));
    }
}
