//! Metric sinks: where each step's flat metric map goes.
//!
//! - [`JsonlSink`]: `metrics.jsonl`, one JSON object per step (`{"step": 3, "kl/ref": ...}`).
//!   Each step is written as one complete line in a single `write` to a file opened in
//!   append mode, then flushed and fsynced. Should the process die mid-write, the torn
//!   tail (bytes after the last newline) is ignored by [`read_jsonl`] and cut off when
//!   the sink is reopened, so a resumed run appends after the last complete step.
//! - [`write_csv`] / [`to_csv`]: CSV export, `step` then the sorted union of keys as
//!   columns, an empty cell where a step lacks a key; written atomically (temp file,
//!   fsync, rename) as DESIGN.md asks of run files.
//! - [`MemorySink`]: keeps the rows in memory (tests, reports, detector replay).
//!
//! Non-finite values are logged, not rejected (a NaN is exactly what one wants to see in
//! the log of a diverging run): JSON has no NaN, so they are written as `null` and read
//! back as NaN; CSV writes `NaN`, `inf`, `-inf`.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use goodhart_core::GoodhartError;

/// One logged step.
pub type Row = (u64, BTreeMap<String, f64>);

/// Errors of the file sinks.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The file system refused.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A complete line of a metrics file is not a valid step object.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// Bad input (e.g. a metric named `step`).
    #[error(transparent)]
    Invalid(#[from] GoodhartError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SinkError + '_ {
    move |source| SinkError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where per-step metrics go.
pub trait MetricSink {
    /// Records the metrics of `step`. A metric may not be named `step` (the key that holds
    /// the step number).
    fn log(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<(), SinkError>;
}

fn check_keys(metrics: &BTreeMap<String, f64>) -> Result<(), SinkError> {
    if metrics.contains_key("step") {
        return Err(GoodhartError::invalid("metrics", "a metric may not be named `step`").into());
    }
    Ok(())
}

/// JSON-lines sink (see the module docs for the durability guarantee).
#[derive(Debug)]
pub struct JsonlSink {
    file: File,
    path: PathBuf,
}

impl JsonlSink {
    /// Opens `path` for appending, creating it if needed; a torn last line left by an
    /// interrupted writer is cut off first.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        let path = path.as_ref().to_path_buf();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io(&path))?;
        let mut bytes = Vec::new();
        file.seek(SeekFrom::Start(0)).map_err(io(&path))?;
        file.read_to_end(&mut bytes).map_err(io(&path))?;
        if bytes.last().is_some_and(|&b| b != b'\n') {
            let keep = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            file.set_len(keep as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        Ok(Self { file, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl MetricSink for JsonlSink {
    fn log(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<(), SinkError> {
        check_keys(metrics)?;
        let mut obj = serde_json::Map::new();
        obj.insert("step".into(), step.into());
        for (k, v) in metrics {
            let value = serde_json::Number::from_f64(*v)
                .map_or(serde_json::Value::Null, serde_json::Value::Number);
            obj.insert(k.clone(), value);
        }
        let mut line = serde_json::Value::Object(obj).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// Reads a metrics file written by [`JsonlSink`]: every complete line must be an object
/// with an unsigned integer `step` and number (or `null`, read as NaN) values; a torn last
/// line (no newline) is ignored.
pub fn read_jsonl(path: impl AsRef<Path>) -> Result<Vec<Row>, SinkError> {
    let path = path.as_ref();
    let text = fs::read_to_string(path).map_err(io(path))?;
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    let parse_err = |line: usize, reason: String| SinkError::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    };
    let mut rows = Vec::new();
    for (i, line) in complete
        .split('\n')
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| parse_err(i + 1, e.to_string()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| parse_err(i + 1, "not a JSON object".into()))?;
        let step = obj
            .get("step")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| parse_err(i + 1, "no unsigned integer `step`".into()))?;
        let mut metrics = BTreeMap::new();
        for (k, v) in obj.iter().filter(|(k, _)| k.as_str() != "step") {
            let x = match v {
                serde_json::Value::Null => f64::NAN,
                v => v
                    .as_f64()
                    .ok_or_else(|| parse_err(i + 1, format!("`{k}` is not a number")))?,
            };
            metrics.insert(k.clone(), x);
        }
        rows.push((step, metrics));
    }
    Ok(rows)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV text of `rows`: header `step` then the sorted union of metric keys; one line per
/// row; an empty cell where a row lacks a key; values in Rust's shortest round-trip form
/// (`NaN`, `inf`, `-inf` for non-finite). Fields with commas or quotes are quoted
/// (RFC 4180).
pub fn to_csv(rows: &[Row]) -> String {
    let keys: BTreeSet<&String> = rows.iter().flat_map(|(_, m)| m.keys()).collect();
    let mut out = String::from("step");
    for k in &keys {
        out.push(',');
        out.push_str(&csv_field(k));
    }
    out.push('\n');
    for (step, m) in rows {
        out.push_str(&step.to_string());
        for k in &keys {
            out.push(',');
            if let Some(v) = m.get(*k) {
                out.push_str(&v.to_string());
            }
        }
        out.push('\n');
    }
    out
}

/// Writes [`to_csv`] of `rows` to `path` atomically (temp file beside it, fsync, rename).
pub fn write_csv(rows: &[Row], path: impl AsRef<Path>) -> Result<(), SinkError> {
    let path = path.as_ref();
    let tmp = path.with_extension("csv.tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(to_csv(rows).as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// In-memory sink.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemorySink {
    rows: Vec<Row>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The rows logged so far, in order.
    pub fn rows(&self) -> &[Row] {
        &self.rows
    }
}

impl MetricSink for MemorySink {
    fn log(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<(), SinkError> {
        check_keys(metrics)?;
        self.rows.push((step, metrics.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("goodhart-metrics-{}-{name}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn row(step: u64, kv: &[(&str, f64)]) -> Row {
        (step, kv.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    fn same(a: &[Row], b: &[Row]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|((s, m), (t, n))| {
                s == t
                    && m.len() == n.len()
                    && m.iter().all(|(k, v)| {
                        n.get(k)
                            .is_some_and(|w| v == w || (v.is_nan() && w.is_nan()))
                    })
            })
    }

    #[test]
    fn jsonl_round_trip_torn_line_and_reopen() {
        let dir = temp("jsonl");
        let path = dir.join("metrics.jsonl");
        let _ = fs::remove_file(&path);
        let rows = vec![
            row(0, &[("reward/proxy/mean", 0.1), ("kl/ref", 0.0)]),
            row(
                1,
                &[
                    ("reward/proxy/mean", 0.30000000000000004),
                    ("loss", f64::NAN),
                ],
            ),
            row(5, &[("entropy", -1e-300)]),
        ];
        let mut sink = JsonlSink::open(&path).unwrap();
        for (s, m) in &rows {
            sink.log(*s, m).unwrap();
        }
        assert!(same(&read_jsonl(&path).unwrap(), &rows));
        let text = fs::read_to_string(&path).unwrap();
        let first = text.lines().next().unwrap();
        assert!(
            first.contains(r#""step":0"#) && first.contains(r#""reward/proxy/mean":0.1"#),
            "{first}"
        );
        assert!(text.contains(r#""loss":null"#));
        // a torn line from an interrupted writer: ignored on read, cut off on reopen
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"step":6,"entr"#)
            .unwrap();
        assert!(same(&read_jsonl(&path).unwrap(), &rows));
        let mut sink = JsonlSink::open(&path).unwrap();
        sink.log(6, &row(6, &[("entropy", 2.0)]).1).unwrap();
        let mut all = rows.clone();
        all.push(row(6, &[("entropy", 2.0)]));
        assert!(same(&read_jsonl(&path).unwrap(), &all));
        assert!(sink.log(7, &row(7, &[("step", 1.0)]).1).is_err());
        // a corrupt complete line is an error naming the line
        fs::write(&path, "{\"step\":0}\nnot json\n").unwrap();
        assert!(matches!(
            read_jsonl(&path),
            Err(SinkError::Parse { line: 2, .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn csv_union_of_keys_and_memory_sink() {
        let mut mem = MemorySink::new();
        mem.log(0, &row(0, &[("b", 1.5), ("a", 2.0)]).1).unwrap();
        mem.log(1, &row(1, &[("c,d", f64::INFINITY), ("a", -0.25)]).1)
            .unwrap();
        assert_eq!(mem.rows().len(), 2);
        assert_eq!(
            to_csv(mem.rows()),
            "step,a,b,\"c,d\"\n0,2,1.5,\n1,-0.25,,inf\n"
        );
        let dir = temp("csv");
        let path = dir.join("metrics.csv");
        write_csv(mem.rows(), &path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), to_csv(mem.rows()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
