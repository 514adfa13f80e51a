//! The self-contained HTML report of a run: `report.html` next to `metrics.jsonl` and
//! `summary.json` (DESIGN.md, "Configuration and runs").
//!
//! One file, readable offline: inline CSS, the data as inline JSON, and inline scripts
//! (the vendored [uPlot](uplot/LICENSE) chart library and `report.js`); no fonts, images,
//! links or requests. In order it shows
//! - a summary ([`outcome`]): per experiment, which series hacked (by
//!   [`goodhart_metrics::evaluate::gold_peak`]'s rule), the proxy's change, the gold peak
//!   and final gold, which series held, each detector's lead on the gold peak, and a
//!   one-line verdict;
//! - proxy (dashed) and gold (solid) reward against step, one chart per experiment, with
//!   detector firings and gold peaks marked;
//! - the summary's own charts (`charts`);
//! - gold against `d = sqrt(KL)`, with the fitted Gao et al. (2022) laws and their peaks;
//! - the responses the proxy rated furthest above the gold ([`samples`]);
//! - detections, the summary's tables and its scalar figures;
//! - every other numeric metric against step, as small multiples.
//!
//! The step charts share a smoothing slider (TensorBoard's debiased EMA, [`ema`]), a
//! linked cursor and linked zoom (drag to zoom, double-click to reset); clicking a legend
//! entry hides its line; hovering shows the values in the legend.
//!
//! # Input
//!
//! `metrics.jsonl`: metrics lines as `goodhart_metrics::sink` writes and reads them (an
//! unsigned integer `step`, string labels, numbers or `null`).
//! - `step`: the x axis.
//! - `series` (or, when absent, `method`): the label naming the curve the line belongs to,
//!   so one file can hold several methods or seeds; lines without either form one
//!   series, shown as `run`. `experiment` groups series into one reward chart and one
//!   verdict. Other labels are not drawn.
//! - Every number is a metric; `null` (what is written for NaN) is a missing value, and
//!   missing points are skipped.
//! - `detector/<name>/fired` = 1 marks a detector firing; a marker is drawn where it
//!   turns on (its rising edge), not at every step it stays on.
//! - `d` for the gold-vs-KL chart is `kl/d`, else `sqrt_kl`, else `sqrt(kl/ref)` (a
//!   negative k1 estimate has no square root and is skipped).
//!
//! `samples.jsonl` (optional): one object per sampled response with `step`, `series`,
//! `experiment`, `prompt`, `text` and `rewards` (`proxy`, `gold`), as the runner writes it.
//!
//! `summary.json` (optional): an object.
//! - `fit`: one fit or a list of them, each `{"form": "rl" | "bon", "alpha", "beta",
//!   "r2"?, "peak_d"?, "offset"?, "series"?}`; the field names of
//!   `goodhart_metrics::overopt::OveroptFit` (`law`: `"rl"` | `"best-of-n"`,
//!   `r_squared`) are accepted too. RL: `R(d) = c + d (alpha - beta ln d)`; best-of-n:
//!   `R(d) = c + d (alpha - beta d)` (Gao, Schulman & Hilton 2022, eqs. 1-2). Without
//!   `peak_d` the peak is the law's maximum: `exp(alpha / beta - 1)` (RL) or
//!   `alpha / (2 beta)` (best-of-n).
//! - `detections`: `[{"detector", "step", "series"?, "reason"?}]` (the fields of
//!   `goodhart_metrics::detect::Firing`), merged with the firings in the metrics.
//! - `tables`: `[{"title", "columns": [..], "rows": [[..], ..]}]`, drawn as HTML tables.
//! - `charts`: `[{"title", "x_label", "lines": [{"label", "points": [[x, y], ..],
//!   "dashed"?}], "marks"?: [{"x", "label"?}]}]`: curves an experiment computed (e.g.
//!   means over seeds), each drawn as a line chart with its own legend and vertical marks.
//! - Every other scalar (nested objects flattened to `a/b`) goes into the figures table.
//!
//! Every string from the files is HTML-escaped in the page and `<`-escaped in its JSON.

pub mod outcome;
mod page;
pub mod samples;

use page::cell;
pub use page::{chart_ids, ema, escape, render};

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use serde_json::Value;

use goodhart_metrics::{
    overopt::{OveroptFit, OveroptLaw},
    sink::{parse_lines, Line, SinkError},
};

use crate::run_dir::{RunDir, RunDirError};

/// Errors of reading a run for its report: the file, the line where it applies, and the
/// reason.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The run has no `metrics.jsonl`.
    #[error("`{path}` does not exist: the run has logged no metrics")]
    MissingMetrics {
        /// The expected metrics file.
        path: PathBuf,
    },
    /// `metrics.jsonl` holds no JSON object.
    #[error("`{path}` is empty: the run has logged no metrics")]
    EmptyMetrics {
        /// The metrics file.
        path: PathBuf,
    },
    /// A line of `metrics.jsonl` is not a metrics line.
    #[error(transparent)]
    Line(#[from] SinkError),
    /// `summary.json` is not valid JSON, or not an object.
    #[error("`{path}`: {reason}")]
    Summary {
        /// The summary file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A known field of `summary.json` (`fit`, `detections`, `tables`) has the wrong shape.
    #[error("`{path}`: field `{field}`: {reason}")]
    SummaryField {
        /// The summary file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// The deserializer's message.
        reason: String,
    },
    /// A line of `samples.jsonl` is not a sample object.
    #[error("`{path}`:{line}: {reason}")]
    Samples {
        /// The samples file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// Reading a file failed.
    #[error("reading `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing the report failed.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
}

type Result<T> = std::result::Result<T, ReportError>;

const KEY_SERIES: &str = "series";
const KEY_METHOD: &str = "method";
const KEY_GROUP: &str = "experiment";
const KEY_PROXY: &str = goodhart_metrics::step::KEY_PROXY_MEAN;
const KEY_GOLD: &str = goodhart_metrics::step::KEY_GOLD_MEAN;
const KEY_D: [&str; 2] = [goodhart_metrics::step::KEY_KL_D, "sqrt_kl"];
const KEY_KL: &str = goodhart_metrics::step::KEY_KL;
const DEFAULT_SERIES: &str = "run";

// ---------------------------------------------------------------------------------------
// Metrics
// ---------------------------------------------------------------------------------------

/// The lines of one series (method, seed...), in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its name (`series`, else `method`, else `run`).
    pub name: String,
    /// The `experiment` label of its first line (each experiment gets its own reward
    /// chart, as tomato returns and language-model rewards do not share a scale).
    pub group: Option<String>,
    /// Its lines.
    pub rows: Vec<Line>,
}

impl Series {
    /// `(step, value)` of `key`, skipping lines where it is missing or not finite.
    pub fn points(&self, key: &str) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| r.metrics.get(key).map(|&v| (r.step as f64, v)))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    }

    /// `(d, gold)` points: `d` from `kl/d`, `sqrt_kl` or `sqrt(kl/ref)`.
    pub fn gold_vs_d(&self) -> Vec<(f64, f64)> {
        self.rows
            .iter()
            .filter_map(|r| {
                let d = KEY_D
                    .iter()
                    .find_map(|k| r.metrics.get(*k).copied().filter(|v| v.is_finite()))
                    .or_else(|| r.metrics.get(KEY_KL).map(|kl| kl.sqrt()))?;
                Some((d, *r.metrics.get(KEY_GOLD)?))
            })
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect()
    }

    /// Steps where `detector/<name>/fired` turns on (from `< 0.5` or absent to `>= 0.5`),
    /// as `(name, step)`.
    pub fn firings(&self) -> Vec<(String, f64)> {
        let mut on: BTreeMap<&str, bool> = BTreeMap::new();
        let mut out = Vec::new();
        for r in &self.rows {
            for (k, &v) in &r.metrics {
                let Some(name) = detector_name(k) else {
                    continue;
                };
                let now = v >= 0.5;
                let was = on.insert(name, now).unwrap_or(false);
                if now && !was {
                    out.push((name.to_string(), r.step as f64));
                }
            }
        }
        out
    }
}

fn detector_name(key: &str) -> Option<&str> {
    key.strip_prefix("detector/")?.strip_suffix("/fired")
}

/// The contents of `metrics.jsonl`, grouped into series.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metrics {
    /// Series in order of first appearance.
    pub series: Vec<Series>,
    /// Numeric keys (not `step`) in order of first appearance (alphabetical within a
    /// line, as serde_json reads objects).
    pub keys: Vec<String>,
}

impl Metrics {
    /// Groups metrics lines into series ([`goodhart_metrics::sink::parse_lines`]); `path`
    /// only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut m = Metrics::default();
        let mut index: BTreeMap<String, usize> = BTreeMap::new();
        for line in parse_lines(text, path)? {
            let name = line
                .labels
                .get(KEY_SERIES)
                .or_else(|| line.labels.get(KEY_METHOD))
                .cloned()
                .unwrap_or_else(|| DEFAULT_SERIES.to_string());
            let s = *index.entry(name.clone()).or_insert_with(|| {
                m.series.push(Series {
                    name,
                    group: line.labels.get(KEY_GROUP).cloned(),
                    rows: Vec::new(),
                });
                m.series.len() - 1
            });
            for k in line.metrics.keys() {
                if !m.keys.contains(k) {
                    m.keys.push(k.clone());
                }
            }
            m.series[s].rows.push(line);
        }
        if m.series.is_empty() {
            return Err(ReportError::EmptyMetrics { path: path.into() });
        }
        Ok(m)
    }

    /// Reads `metrics.jsonl` (read only; never modified).
    pub fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ReportError::MissingMetrics { path: path.into() }
            } else {
                ReportError::Io {
                    path: path.into(),
                    source,
                }
            }
        })?;
        Self::parse(&text, path)
    }
}

// ---------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Which Gao et al. (2022) law a fit uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum FitForm {
    /// `R(d) = c + d (alpha - beta ln d)`: RL against the proxy (eq. 2).
    #[serde(rename = "rl")]
    Rl,
    /// `R(d) = c + d (alpha - beta d)`: best-of-n (eq. 1).
    #[serde(rename = "bon", alias = "best-of-n", alias = "best_of_n")]
    Bon,
}

/// A fitted law of gold reward against `d = sqrt(KL)`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Fit {
    /// The series it was fitted to (its curve takes that series' colour).
    #[serde(default, alias = "method", alias = "label")]
    pub series: Option<String>,
    /// The law (`form`, or `law` as in `goodhart_metrics::overopt::OveroptFit`).
    #[serde(alias = "law")]
    pub form: FitForm,
    /// Initial slope in `d`.
    pub alpha: f64,
    /// Strength of the overoptimisation term.
    pub beta: f64,
    /// Intercept `c` (0 when absent).
    #[serde(default)]
    pub offset: f64,
    /// Coefficient of determination.
    #[serde(default, alias = "r_squared")]
    pub r2: Option<f64>,
    /// Where gold peaks; computed from the law when absent.
    #[serde(default)]
    pub peak_d: Option<f64>,
}

impl Fit {
    /// The law as `goodhart_metrics`' fit, which evaluates it.
    fn law(&self) -> OveroptFit {
        OveroptFit {
            law: match self.form {
                FitForm::Rl => OveroptLaw::Rl,
                FitForm::Bon => OveroptLaw::BestOfN,
            },
            alpha: self.alpha,
            beta: self.beta,
            offset: self.offset,
            r_squared: self.r2.unwrap_or(f64::NAN),
            points: 0,
        }
    }

    /// `R(d)` (`OveroptFit::predict`; `d ln d` is taken as its limit 0 at `d = 0`).
    pub fn eval(&self, d: f64) -> f64 {
        self.law().predict(d)
    }

    /// The peak `d*`: `peak_d` if given, else the law's maximum (`OveroptFit::peak`):
    /// `exp(alpha / beta - 1)` (RL) or `alpha / (2 beta)` (best-of-n); `None` when the
    /// law has none (`beta <= 0`, or best-of-n with `alpha <= 0`).
    pub fn peak(&self) -> Option<f64> {
        match self.peak_d {
            Some(d) => (d.is_finite() && d >= 0.0).then_some(d),
            None => self.law().peak().map(|p| p.d),
        }
    }
}

/// A detector firing listed in `summary.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Detection {
    /// The detector's name.
    pub detector: String,
    /// The step it fired at.
    pub step: f64,
    /// The series it fired in, if the run holds several.
    #[serde(default, alias = "method")]
    pub series: Option<String>,
    /// Why it fired.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A table from `summary.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Table {
    /// Its caption.
    #[serde(default)]
    pub title: String,
    /// Column headers.
    pub columns: Vec<Value>,
    /// Rows of cells (any JSON scalar).
    pub rows: Vec<Vec<Value>>,
}

/// A line of a [`ChartSpec`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartLine {
    /// Its legend entry.
    pub label: String,
    /// `[x, y]` points, in drawing order (`null` coordinates are skipped).
    pub points: Vec<[Option<f64>; 2]>,
    /// Drawn dashed.
    #[serde(default)]
    pub dashed: bool,
}

/// A vertical mark of a [`ChartSpec`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartMark {
    /// Where.
    pub x: f64,
    /// Its label, if any.
    #[serde(default)]
    pub label: Option<String>,
}

/// A chart from `summary.json`: curves an experiment computed.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChartSpec {
    /// Its title.
    pub title: String,
    /// What the x axis holds.
    pub x_label: String,
    /// The curves, one colour each.
    pub lines: Vec<ChartLine>,
    /// Vertical marks.
    #[serde(default)]
    pub marks: Vec<ChartMark>,
}

/// `summary.json`, split into what the report draws.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Scalar figures, `(key path, formatted value)`, sorted by key path.
    pub scalars: Vec<(String, String)>,
    /// Fitted laws.
    pub fits: Vec<Fit>,
    /// Detector firings.
    pub detections: Vec<Detection>,
    /// Tables.
    pub tables: Vec<Table>,
    /// Charts.
    pub charts: Vec<ChartSpec>,
}

fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}/{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => out.push((prefix.to_string(), cell(other))),
    }
}

impl Summary {
    /// Parses `summary.json`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| ReportError::Summary {
            path: path.into(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = value else {
            return Err(ReportError::Summary {
                path: path.into(),
                reason: format!("expected a JSON object, found {}", json_type(&value)),
            });
        };
        fn field<T: for<'de> Deserialize<'de>>(
            path: &Path,
            name: &'static str,
            v: &Value,
        ) -> Result<T> {
            T::deserialize(v).map_err(|e| ReportError::SummaryField {
                path: path.into(),
                field: name,
                reason: e.to_string(),
            })
        }
        let mut s = Summary::default();
        for (k, v) in &obj {
            match k.as_str() {
                "fit" | "fits" => match v {
                    Value::Array(_) => s.fits.extend(field::<Vec<Fit>>(path, "fit", v)?),
                    Value::Null => {}
                    _ => s.fits.push(field(path, "fit", v)?),
                },
                "detections" => s.detections = field(path, "detections", v)?,
                "tables" => s.tables = field(path, "tables", v)?,
                "charts" => s.charts = field(path, "charts", v)?,
                _ => flatten(k, v, &mut s.scalars),
            }
        }
        Ok(s)
    }

    /// Reads `summary.json`, or `None` when the run has none.
    pub fn read(path: &Path) -> Result<Option<Self>> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ReportError::Io {
                path: path.into(),
                source,
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Detector firings
// ---------------------------------------------------------------------------------------

/// A firing to mark: detector, series (if known) and step.
pub struct Marker {
    /// The detector.
    pub detector: String,
    /// The series it fired in (`None`: the run's only series, or the summary did not say).
    pub series: Option<String>,
    /// The step.
    pub step: f64,
    /// Why it fired, when the summary says.
    pub reason: Option<String>,
}

/// The detector firings of the metrics (rising edges) and of the summary, each once.
pub fn markers(metrics: &Metrics, summary: Option<&Summary>) -> Vec<Marker> {
    let several = metrics.series.len() > 1;
    let mut out: Vec<Marker> = Vec::new();
    for s in &metrics.series {
        for (detector, step) in s.firings() {
            out.push(Marker {
                detector,
                series: several.then(|| s.name.clone()),
                step,
                reason: None,
            });
        }
    }
    for d in summary.map(|s| s.detections.as_slice()).unwrap_or_default() {
        // A firing both logged in the metrics and listed in the summary is marked once.
        let same = |m: &&mut Marker| {
            m.detector == d.detector
                && m.step == d.step
                && (m.series.is_none() || d.series.is_none() || m.series == d.series)
        };
        if let Some(m) = out.iter_mut().find(same) {
            m.reason = m.reason.take().or_else(|| d.reason.clone());
        } else if d.step.is_finite() {
            out.push(Marker {
                detector: d.detector.clone(),
                series: d.series.clone(),
                step: d.step,
                reason: d.reason.clone(),
            });
        }
    }
    out
}

impl Marker {
    /// `detector (series)`.
    pub fn label(&self) -> String {
        match &self.series {
            Some(s) => format!("{} ({s})", self.detector),
            None => self.detector.clone(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------

/// Reads `run`'s `metrics.jsonl`, `summary.json` and `samples.jsonl` (the last two if
/// present), renders the report and writes `report.html` atomically; returns its path.
/// The run's other files are only read.
pub fn write_report(run: &RunDir) -> Result<PathBuf> {
    let metrics = Metrics::read(&run.metrics())?;
    let summary = Summary::read(&run.summary())?;
    let hacks = samples::read_hacks(&run.samples(), samples::SHOWN)?;
    let title = run_title(run.path());
    let html = render(&title, &metrics, summary.as_ref(), &hacks);
    Ok(run.write("report.html", html.as_bytes())?)
}

/// `<name>/<id>` from `runs/<name>/<id>/` (the last two path components).
fn run_title(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            std::path::Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .take(2)
        .collect();
    if parts.is_empty() {
        return "run".into();
    }
    parts.into_iter().rev().collect::<Vec<_>>().join("/")
}

#[cfg(test)]
mod tests;
