//! Metric sinks, and the one JSON-lines module of the project: every `metrics.jsonl` and
//! `samples.jsonl` is written and read here.
//!
//! - [`Line`]: one metrics line: a step, string labels (`experiment`, `series`, ...) and
//!   numeric metrics.
//! - [`JsonlFile`]: a JSON-lines file open for appending. Each [`JsonlFile::append`] is one
//!   `write` of complete lines; should the process die mid-write, the torn tail (bytes after
//!   the last newline) is ignored by the readers and cut off when the file is reopened, so a
//!   resumed writer appends after the last complete line. [`truncate_lines`] cuts a file
//!   back to its first lines (a resumed run drops the lines of unfinished work).
//! - [`JsonlSink`]: [`Line`]s to a [`JsonlFile`], flushed, and fsynced after every line
//!   unless [`JsonlSink::sync_every_line`] turns that off (then [`JsonlSink::sync`]).
//!   [`read_lines`] / [`parse_lines`] read them back; [`read_objects`] reads any JSON-lines
//!   file (such as `samples.jsonl`) as objects.
//! - [`write_csv`] / [`to_csv`]: CSV export, `step`, the sorted labels, then the sorted
//!   union of metric keys as columns, an empty cell where a line lacks a key; written
//!   atomically (temp file, fsync, rename) as DESIGN.md asks of run files.
//! - [`MemorySink`]: keeps the lines in memory (tests, reports, detector replay).
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
use serde_json::{Map, Value};

/// The key that holds a line's step.
pub const KEY_STEP: &str = "step";

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Line {
    /// The step.
    pub step: u64,
    /// String fields: what the line belongs to (`experiment`, `series`, ...).
    pub labels: BTreeMap<String, String>,
    /// Numeric fields (NaN for a JSON `null`).
    pub metrics: BTreeMap<String, f64>,
}

impl Line {
    /// A line of `step` with `metrics` and no labels.
    pub fn new(step: u64, metrics: BTreeMap<String, f64>) -> Self {
        Self {
            step,
            labels: BTreeMap::new(),
            metrics,
        }
    }

    /// Adds label `key = value`.
    pub fn with_label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// A metric by key (NaN when absent).
    pub fn get(&self, key: &str) -> f64 {
        self.metrics.get(key).copied().unwrap_or(f64::NAN)
    }

    /// Errors when a key is `step` or is both a label and a metric.
    fn check(&self) -> Result<(), SinkError> {
        if self.labels.contains_key(KEY_STEP) || self.metrics.contains_key(KEY_STEP) {
            return Err(
                GoodhartError::invalid("metrics", "a field may not be named `step`").into(),
            );
        }
        if let Some(k) = self.labels.keys().find(|k| self.metrics.contains_key(*k)) {
            return Err(GoodhartError::invalid(
                "metrics",
                format!("`{k}` is both a label and a metric"),
            )
            .into());
        }
        Ok(())
    }

    /// The line as a JSON object (non-finite metrics as `null`).
    pub fn to_json(&self) -> Map<String, Value> {
        let mut obj = Map::new();
        for (k, v) in &self.labels {
            obj.insert(k.clone(), Value::String(v.clone()));
        }
        obj.insert(KEY_STEP.into(), self.step.into());
        for (k, v) in &self.metrics {
            let value = serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number);
            obj.insert(k.clone(), value);
        }
        obj
    }

    /// A line from a JSON object: an unsigned integer `step`, strings as labels, numbers
    /// (or `null`, read as NaN) as metrics; anything else is an error naming the field.
    pub fn from_json(obj: &Map<String, Value>) -> Result<Self, String> {
        let step = obj
            .get(KEY_STEP)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("field `{KEY_STEP}` must be an unsigned integer"))?;
        let mut line = Line {
            step,
            ..Line::default()
        };
        for (k, v) in obj.iter().filter(|(k, _)| k.as_str() != KEY_STEP) {
            match v {
                Value::String(s) => {
                    line.labels.insert(k.clone(), s.clone());
                }
                Value::Null => {
                    line.metrics.insert(k.clone(), f64::NAN);
                }
                Value::Number(n) => {
                    line.metrics
                        .insert(k.clone(), n.as_f64().unwrap_or(f64::NAN));
                }
                _ => return Err(format!("field `{k}` must be a number, null or a string")),
            }
        }
        Ok(line)
    }
}

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
    /// A complete line of a JSON-lines file is not what it should be.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A file holds fewer complete lines than it should.
    #[error("{path}: has {found} complete lines, expected at least {expected}")]
    Short {
        /// The file.
        path: PathBuf,
        /// Complete lines in the file.
        found: usize,
        /// Lines expected.
        expected: usize,
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
    /// Records one line. No field may be named `step` (the key that holds the step
    /// number), and no key may be both a label and a metric.
    fn log_line(&mut self, line: &Line) -> Result<(), SinkError>;

    /// Records the metrics of `step`, unlabelled.
    fn log(&mut self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<(), SinkError> {
        self.log_line(&Line::new(step, metrics.clone()))
    }
}

/// A JSON-lines file open for appending (see the module docs for the guarantees).
#[derive(Debug)]
pub struct JsonlFile {
    file: File,
    path: PathBuf,
}

impl JsonlFile {
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
        // Only the tail is read: back from the end, a block at a time, to the last newline.
        const BLOCK: u64 = 64 * 1024;
        let len = file.metadata().map_err(io(&path))?.len();
        let (mut end, mut keep) = (len, None);
        let mut block = Vec::new();
        while end > 0 && keep.is_none() {
            let start = end.saturating_sub(BLOCK);
            block.resize((end - start) as usize, 0);
            file.seek(SeekFrom::Start(start)).map_err(io(&path))?;
            file.read_exact(&mut block).map_err(io(&path))?;
            if end == len && block.last() == Some(&b'\n') {
                keep = Some(len);
            } else if let Some(i) = block.iter().rposition(|&b| b == b'\n') {
                keep = Some(start + i as u64 + 1);
            }
            end = start;
        }
        let keep = keep.unwrap_or(0);
        if keep < len {
            file.set_len(keep).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        Ok(Self { file, path })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line per object, in one write, and flushes.
    pub fn append(&mut self, objects: &[Map<String, Value>]) -> Result<(), SinkError> {
        let mut text = String::new();
        for obj in objects {
            // A map of JSON values always serialises.
            text.push_str(&serde_json::to_string(obj).expect("a JSON map serialises"));
            text.push('\n');
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(io(&self.path))?;
        self.file.flush().map_err(io(&self.path))
    }

    /// Makes what was appended durable (fsync).
    pub fn sync(&self) -> Result<(), SinkError> {
        self.file.sync_data().map_err(io(&self.path))
    }
}

/// Keeps the first `keep` complete lines of `path` (a missing file holds none) and fsyncs
/// it. Errors when it has fewer.
pub fn truncate_lines(path: impl AsRef<Path>, keep: usize) -> Result<(), SinkError> {
    let path = path.as_ref();
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && keep == 0 => return Ok(()),
        Err(e) => return Err(io(path)(e)),
    };
    let (mut cut, mut seen) = (0usize, 0usize);
    for (i, &b) in bytes.iter().enumerate() {
        if seen == keep {
            break;
        }
        if b == b'\n' {
            seen += 1;
            cut = i + 1;
        }
    }
    if seen < keep {
        return Err(SinkError::Short {
            path: path.to_path_buf(),
            found: seen,
            expected: keep,
        });
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    file.set_len(cut as u64).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// JSON-lines sink of [`Line`]s (see the module docs for the durability guarantee).
#[derive(Debug)]
pub struct JsonlSink {
    file: JsonlFile,
    sync_every_line: bool,
}

impl JsonlSink {
    /// Opens `path` for appending ([`JsonlFile::open`]); every line is fsynced.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SinkError> {
        Ok(Self {
            file: JsonlFile::open(path)?,
            sync_every_line: true,
        })
    }

    /// Whether each line is fsynced as it is written (default); without, call
    /// [`JsonlSink::sync`] where the lines must be durable.
    pub fn sync_every_line(mut self, yes: bool) -> Self {
        self.sync_every_line = yes;
        self
    }

    /// Makes the lines written so far durable.
    pub fn sync(&self) -> Result<(), SinkError> {
        self.file.sync()
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

impl MetricSink for JsonlSink {
    fn log_line(&mut self, line: &Line) -> Result<(), SinkError> {
        line.check()?;
        self.file.append(&[line.to_json()])?;
        if self.sync_every_line {
            self.file.sync()?;
        }
        Ok(())
    }
}

/// The non-blank complete lines of `text` with their 1-based numbers (a torn last line,
/// one without a newline, is left out).
fn complete_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let complete = text.rfind('\n').map_or("", |i| &text[..i]);
    complete
        .split('\n')
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty())
}

fn parse_error(path: &Path, line: usize, reason: String) -> SinkError {
    SinkError::Parse {
        path: path.to_path_buf(),
        line,
        reason,
    }
}

fn object(path: &Path, line: usize, raw: &str) -> Result<Map<String, Value>, SinkError> {
    match serde_json::from_str::<Value>(raw) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(parse_error(path, line, "not a JSON object".into())),
        Err(e) => Err(parse_error(path, line, format!("not valid JSON: {e}"))),
    }
}

/// The JSON objects of the complete lines of `text` (blank lines skipped; a torn last
/// line ignored); `path` only names the file in errors.
pub fn parse_objects(text: &str, path: &Path) -> Result<Vec<Map<String, Value>>, SinkError> {
    complete_lines(text)
        .map(|(i, raw)| object(path, i, raw))
        .collect()
}

/// Reads the objects of a JSON-lines file ([`parse_objects`]).
pub fn read_objects(path: impl AsRef<Path>) -> Result<Vec<Map<String, Value>>, SinkError> {
    let path = path.as_ref();
    let text = fs::read_to_string(path).map_err(io(path))?;
    parse_objects(&text, path)
}

/// The [`Line`]s of metrics text (each object through [`Line::from_json`]); `path` only
/// names the file in errors.
pub fn parse_lines(text: &str, path: &Path) -> Result<Vec<Line>, SinkError> {
    complete_lines(text)
        .map(|(i, raw)| {
            Line::from_json(&object(path, i, raw)?).map_err(|reason| parse_error(path, i, reason))
        })
        .collect()
}

/// Reads a metrics file written by [`JsonlSink`] ([`parse_lines`]).
pub fn read_lines(path: impl AsRef<Path>) -> Result<Vec<Line>, SinkError> {
    let path = path.as_ref();
    let text = fs::read_to_string(path).map_err(io(path))?;
    parse_lines(&text, path)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// CSV text of `lines`: header `step`, the sorted union of label keys, then the sorted
/// union of metric keys; one row per line; an empty cell where a line lacks a key; values
/// in Rust's shortest round-trip form (`NaN`, `inf`, `-inf` for non-finite). Fields with
/// commas or quotes are quoted (RFC 4180).
pub fn to_csv(lines: &[Line]) -> String {
    let labels: BTreeSet<&String> = lines.iter().flat_map(|l| l.labels.keys()).collect();
    let keys: BTreeSet<&String> = lines.iter().flat_map(|l| l.metrics.keys()).collect();
    let mut out = String::from(KEY_STEP);
    for k in labels.iter().chain(&keys) {
        out.push(',');
        out.push_str(&csv_field(k));
    }
    out.push('\n');
    for l in lines {
        out.push_str(&l.step.to_string());
        for k in &labels {
            out.push(',');
            if let Some(v) = l.labels.get(*k) {
                out.push_str(&csv_field(v));
            }
        }
        for k in &keys {
            out.push(',');
            if let Some(v) = l.metrics.get(*k) {
                out.push_str(&v.to_string());
            }
        }
        out.push('\n');
    }
    out
}

/// Writes [`to_csv`] of `lines` to `path` atomically (temp file beside it, fsync, rename).
pub fn write_csv(lines: &[Line], path: impl AsRef<Path>) -> Result<(), SinkError> {
    let path = path.as_ref();
    let tmp = path.with_extension("csv.tmp");
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(to_csv(lines).as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))
}

/// In-memory sink.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemorySink {
    lines: Vec<Line>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// The lines logged so far, in order.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }
}

impl MetricSink for MemorySink {
    fn log_line(&mut self, line: &Line) -> Result<(), SinkError> {
        line.check()?;
        self.lines.push(line.clone());
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

    fn line(step: u64, kv: &[(&str, f64)]) -> Line {
        Line::new(step, kv.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    fn same(a: &[Line], b: &[Line]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                x.step == y.step
                    && x.labels == y.labels
                    && x.metrics.len() == y.metrics.len()
                    && x.metrics.iter().all(|(k, v)| {
                        y.metrics
                            .get(k)
                            .is_some_and(|w| v == w || (v.is_nan() && w.is_nan()))
                    })
            })
    }

    #[test]
    fn jsonl_round_trip_torn_line_and_reopen() {
        let dir = temp("jsonl");
        let path = dir.join("metrics.jsonl");
        let _ = fs::remove_file(&path);
        let lines = vec![
            line(0, &[("reward/proxy/mean", 0.1), ("kl/ref", 0.0)]).with_label("series", "a"),
            line(
                1,
                &[
                    ("reward/proxy/mean", 0.30000000000000004),
                    ("loss", f64::NAN),
                ],
            ),
            line(5, &[("entropy", -1e-300)]),
        ];
        let mut sink = JsonlSink::open(&path).unwrap();
        for l in &lines {
            sink.log_line(l).unwrap();
        }
        assert!(same(&read_lines(&path).unwrap(), &lines));
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.lines().next().unwrap(),
            r#"{"kl/ref":0.0,"reward/proxy/mean":0.1,"series":"a","step":0}"#
        );
        assert!(text.contains(r#""loss":null"#));
        // a torn line from an interrupted writer: ignored on read, cut off on reopen
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(br#"{"step":6,"entr"#)
            .unwrap();
        assert!(same(&read_lines(&path).unwrap(), &lines));
        assert_eq!(read_objects(&path).unwrap().len(), 3);
        let mut sink = JsonlSink::open(&path).unwrap().sync_every_line(false);
        sink.log(6, &line(6, &[("entropy", 2.0)]).metrics).unwrap();
        sink.sync().unwrap();
        let mut all = lines.clone();
        all.push(line(6, &[("entropy", 2.0)]));
        assert!(same(&read_lines(&path).unwrap(), &all));
        assert!(sink.log(7, &line(7, &[("step", 1.0)]).metrics).is_err());
        assert!(sink
            .log_line(&line(7, &[("series", 1.0)]).with_label("series", "a"))
            .is_err());
        // cut back to the first two lines; asking for more than there are is an error
        truncate_lines(&path, 2).unwrap();
        assert!(same(&read_lines(&path).unwrap(), &lines[..2]));
        assert!(matches!(
            truncate_lines(&path, 3),
            Err(SinkError::Short {
                found: 2,
                expected: 3,
                ..
            })
        ));
        truncate_lines(dir.join("missing.jsonl"), 0).unwrap();
        // a corrupt complete line is an error naming the line and what is wrong
        for (text, line_no, reason) in [
            ("{\"step\":0}\nnot json\n", 2, "not valid JSON"),
            ("\n[1, 2]\n", 2, "not a JSON object"),
            (
                "{\"step\":\"one\"}\n",
                1,
                "`step` must be an unsigned integer",
            ),
            (
                "{\"step\":0,\"method\":[1]}\n",
                1,
                "`method` must be a number",
            ),
        ] {
            fs::write(&path, text).unwrap();
            match read_lines(&path) {
                Err(SinkError::Parse {
                    line, reason: r, ..
                }) => {
                    assert_eq!(line, line_no, "{text}");
                    assert!(r.contains(reason), "{text}: {r}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn csv_union_of_keys_and_memory_sink() {
        let mut mem = MemorySink::new();
        mem.log(0, &line(0, &[("b", 1.5), ("a", 2.0)]).metrics)
            .unwrap();
        mem.log_line(&line(1, &[("c,d", f64::INFINITY), ("a", -0.25)]).with_label("series", "x"))
            .unwrap();
        assert_eq!(mem.lines().len(), 2);
        assert_eq!(
            to_csv(mem.lines()),
            "step,series,a,b,\"c,d\"\n0,,2,1.5,\n1,x,-0.25,,inf\n"
        );
        let dir = temp("csv");
        let path = dir.join("metrics.csv");
        write_csv(mem.lines(), &path).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), to_csv(mem.lines()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
