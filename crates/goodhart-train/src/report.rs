//! The self-contained HTML report of a run: `report.html` next to `metrics.jsonl` and
//! `summary.json` (DESIGN.md, "Configuration and runs").
//!
//! One file, readable offline: inline CSS and hand-written inline SVG, no scripts, fonts,
//! images or links. It shows
//! - proxy (dashed) and gold (solid) reward against step, one colour per series;
//! - the summary's own charts (`charts`);
//! - every other numeric metric against step, as small multiples;
//! - gold against `d = sqrt(KL)`, with the fitted Gao et al. (2022) law and its peak
//!   when `summary.json` holds a fit;
//! - vertical markers where detectors fired;
//! - the summary's scalar figures and tables (e.g. the tomato table).
//!
//! # Input
//!
//! `metrics.jsonl`: metrics lines as `goodhart_metrics::sink` writes and reads them (an
//! unsigned integer `step`, string labels, numbers or `null`).
//! - `step`: the x axis.
//! - `series` (or, when absent, `method`): the label naming the curve the line belongs to,
//!   so one file can hold several methods or seeds; lines without either form one
//!   series, shown as `run`. Other labels (`experiment`, ...) are not drawn.
//! - Every number is a metric; `null` (what is written for NaN) is a missing value, and
//!   missing points are skipped.
//! - `detector/<name>/fired` = 1 marks a detector firing; a marker is drawn where it
//!   turns on (its rising edge), not at every step it stays on.
//! - `d` for the gold-vs-KL chart is `kl/d`, else `sqrt_kl`, else `sqrt(kl/ref)` (a
//!   negative k1 estimate has no square root and is skipped).
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
//! Every string from the files is HTML-escaped.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
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
const KEY_PROXY: &str = "reward/proxy/mean";
const KEY_GOLD: &str = "reward/gold/mean";
const KEY_D: [&str; 2] = ["kl/d", "sqrt_kl"];
const KEY_KL: &str = "kl/ref";
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
// Scales, ticks and the SVG chart builder
// ---------------------------------------------------------------------------------------

/// A linear map from a domain `[d0, d1]` to a range `[r0, r1]` (pixels; `r0 > r1` for
/// a y axis pointing up).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearScale {
    /// Domain start.
    pub d0: f64,
    /// Domain end.
    pub d1: f64,
    /// Range start.
    pub r0: f64,
    /// Range end.
    pub r1: f64,
}

impl LinearScale {
    /// The scale mapping `domain` onto `range`.
    pub fn new(domain: (f64, f64), range: (f64, f64)) -> Self {
        Self {
            d0: domain.0,
            d1: domain.1,
            r0: range.0,
            r1: range.1,
        }
    }

    /// `r0 + (x - d0) / (d1 - d0) * (r1 - r0)`; the middle of the range for an empty
    /// domain.
    pub fn map(&self, x: f64) -> f64 {
        let span = self.d1 - self.d0;
        if span == 0.0 {
            return (self.r0 + self.r1) / 2.0;
        }
        self.r0 + (x - self.d0) / span * (self.r1 - self.r0)
    }
}

/// A tick spacing `m * 10^e` with `m` in {1, 2, 5}.
#[derive(Debug, Clone, Copy, PartialEq)]
struct TickStep {
    m: i64,
    e: i32,
}

impl TickStep {
    /// The spacing giving about `count` intervals over `[lo, hi]` (the 1-2-5 rule: the
    /// raw spacing's mantissa rounds to 1, 2, 5 or 10 at the geometric midpoints
    /// sqrt(2), sqrt(10), sqrt(50), as in d3's `tickIncrement`).
    fn new(lo: f64, hi: f64, count: usize) -> Self {
        let raw = (hi - lo) / count.max(1) as f64;
        let e = raw.log10().floor() as i32;
        let err = raw / 10f64.powi(e);
        let m = if err >= 50f64.sqrt() {
            10
        } else if err >= 10f64.sqrt() {
            5
        } else if err >= 2f64.sqrt() {
            2
        } else {
            1
        };
        if m == 10 {
            Self { m: 1, e: e + 1 }
        } else {
            Self { m, e }
        }
    }

    /// `k * m * 10^e`, computed as an integer divided by a power of ten so that ticks
    /// are the doubles nearest the decimals they print as (0.6, not 0.6000000000000001).
    fn at(self, k: i64) -> f64 {
        let n = (k * self.m) as f64;
        if self.e >= 0 {
            n * 10f64.powi(self.e)
        } else {
            n / 10f64.powi(-self.e)
        }
    }

    /// `x / step`, as a multiple count.
    fn multiples(self, x: f64) -> f64 {
        if self.e >= 0 {
            x / 10f64.powi(self.e) / self.m as f64
        } else {
            x * 10f64.powi(-self.e) / self.m as f64
        }
    }

    fn decimals(self) -> usize {
        (-self.e).max(0) as usize
    }
}

const TICK_EPS: f64 = 1e-9;

/// Ticks: the multiples of a 1-2-5 spacing (about `count` intervals) that lie in
/// `[lo, hi]`. Empty for an empty, reversed or non-finite interval.
pub fn nice_ticks(lo: f64, hi: f64, count: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && hi > lo) {
        return Vec::new();
    }
    let step = TickStep::new(lo, hi, count);
    let k0 = (step.multiples(lo) - TICK_EPS).ceil() as i64;
    let k1 = (step.multiples(hi) + TICK_EPS).floor() as i64;
    (k0..=k1).map(|k| step.at(k)).collect()
}

/// `[lo, hi]` widened outward to multiples of its tick spacing, so that the axes end on
/// ticks (repeated until the spacing settles, as widening can change it). A single
/// value is first padded by 10% of its magnitude (or 1 at 0).
pub fn nice_domain(lo: f64, hi: f64, count: usize) -> (f64, f64) {
    let (mut lo, mut hi) = if hi > lo {
        (lo, hi)
    } else {
        let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        (lo - pad, lo + pad)
    };
    let mut prev = None;
    for _ in 0..10 {
        let step = TickStep::new(lo, hi, count);
        if prev == Some(step) {
            break;
        }
        prev = Some(step);
        lo = step.at((step.multiples(lo) + TICK_EPS).floor() as i64);
        hi = step.at((step.multiples(hi) - TICK_EPS).ceil() as i64);
    }
    (lo, hi)
}

fn tick_label(v: f64, decimals: usize) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if v.abs() >= 1e6 || decimals > 6 {
        return format!("{v:.1e}");
    }
    format!("{v:.decimals$}")
}

/// The smallest interval holding every finite value, or `None`.
fn extent(values: impl IntoIterator<Item = f64>) -> Option<(f64, f64)> {
    values
        .into_iter()
        .filter(|v| v.is_finite())
        .fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
        })
}

/// Space around the plot area (pixels): top (title), right, bottom (x labels), left
/// (y labels).
const MARGIN: (f64, f64, f64, f64) = (28.0, 24.0, 40.0, 56.0);

/// An inline SVG chart with linear axes, built by hand.
#[derive(Debug, Clone)]
pub struct Chart {
    width: f64,
    height: f64,
    /// Maps x values to pixels.
    pub x: LinearScale,
    /// Maps y values to pixels (upward).
    pub y: LinearScale,
    x_ticks: Vec<f64>,
    y_ticks: Vec<f64>,
    x_dec: usize,
    y_dec: usize,
    title: String,
    x_label: String,
    body: String,
    labels: usize,
}

fn px(v: f64) -> String {
    format!("{v:.1}")
}

impl Chart {
    /// A `width` x `height` chart whose axes cover `x` and `y` (widened to nice ticks).
    /// `title` and `x_label` are plain text (escaped here).
    pub fn new(
        title: &str,
        x_label: &str,
        (width, height): (f64, f64),
        x: (f64, f64),
        y: (f64, f64),
    ) -> Self {
        let (top, right, bottom, left) = MARGIN;
        let x_count = ((width - left - right) / 90.0).round().max(2.0) as usize;
        let y_count = ((height - top - bottom) / 50.0).round().max(2.0) as usize;
        let xd = nice_domain(x.0, x.1, x_count);
        let yd = nice_domain(y.0, y.1, y_count);
        Self {
            width,
            height,
            x: LinearScale::new(xd, (left, width - right)),
            y: LinearScale::new(yd, (height - bottom, top)),
            x_ticks: nice_ticks(xd.0, xd.1, x_count),
            y_ticks: nice_ticks(yd.0, yd.1, y_count),
            x_dec: TickStep::new(xd.0, xd.1, x_count).decimals(),
            y_dec: TickStep::new(yd.0, yd.1, y_count).decimals(),
            title: title.into(),
            x_label: x_label.into(),
            body: String::new(),
            labels: 0,
        }
    }

    fn path_data(&self, points: &[(f64, f64)]) -> String {
        let mut d = String::new();
        for (i, &(x, y)) in points.iter().enumerate() {
            let cmd = if i == 0 { 'M' } else { 'L' };
            let _ = write!(d, "{cmd}{},{}", px(self.x.map(x)), px(self.y.map(y)));
        }
        d
    }

    /// A polyline through the finite `points` (others skipped), dashed if asked; a
    /// single point is drawn as a dot.
    pub fn line(&mut self, points: &[(f64, f64)], color: &str, dashed: bool) {
        let pts: Vec<_> = points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        match pts.len() {
            0 => {}
            1 => self.dots(&pts, color),
            _ => {
                let dash = if dashed {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                };
                let _ = writeln!(
                    self.body,
                    r#"<path class="series" d="{}" stroke="{color}"{dash}/>"#,
                    self.path_data(&pts)
                );
            }
        }
    }

    /// A dot at each finite point.
    pub fn dots(&mut self, points: &[(f64, f64)], color: &str) {
        for &(x, y) in points {
            if x.is_finite() && y.is_finite() {
                let _ = writeln!(
                    self.body,
                    r#"<circle class="dot" cx="{}" cy="{}" r="2.5" fill="{color}"/>"#,
                    px(self.x.map(x)),
                    px(self.y.map(y))
                );
            }
        }
    }

    fn in_x(&self, x: f64) -> bool {
        x.is_finite() && x >= self.x.d0.min(self.x.d1) && x <= self.x.d0.max(self.x.d1)
    }

    /// A vertical dashed marker at `x` (a detector firing), with `label` at its top
    /// when given. Outside the x domain nothing is drawn.
    pub fn vline(&mut self, x: f64, label: Option<&str>) {
        if !self.in_x(x) {
            return;
        }
        let xp = px(self.x.map(x));
        let _ = write!(
            self.body,
            r#"<g class="detection"><line x1="{xp}" x2="{xp}" y1="{}" y2="{}"/>"#,
            px(self.y.r1),
            px(self.y.r0)
        );
        if let Some(label) = label {
            // Stagger labels so that nearby markers stay readable.
            let yp = self.y.r1 + 10.0 + 11.0 * (self.labels % 3) as f64;
            self.labels += 1;
            let _ = write!(
                self.body,
                r#"<text x="{}" y="{}">{}</text>"#,
                px(self.x.map(x) + 3.0),
                px(yp),
                escape(label)
            );
        }
        self.body.push_str("</g>\n");
    }

    /// The peak marker of a fit at `(x, y)`: a vertical guide, a ring and a label.
    pub fn peak(&mut self, x: f64, y: f64, color: &str, label: &str) {
        if !self.in_x(x) || !y.is_finite() {
            return;
        }
        let (xp, yp) = (px(self.x.map(x)), px(self.y.map(y)));
        let anchor = if self.x.map(x) > (self.x.r0 + self.x.r1) / 2.0 {
            ("end", -6.0)
        } else {
            ("start", 6.0)
        };
        let _ = writeln!(
            self.body,
            r#"<g class="peak" data-d="{x}"><line x1="{xp}" x2="{xp}" y1="{}" y2="{}" stroke="{color}"/><circle cx="{xp}" cy="{yp}" r="6" stroke="{color}"/><text x="{}" y="{}" text-anchor="{}">{}</text></g>"#,
            px(self.y.r1),
            px(self.y.r0),
            px(self.x.map(x) + anchor.1),
            px(self.y.map(y) - 10.0),
            anchor.0,
            escape(label)
        );
    }

    /// The finished `<svg>` element.
    pub fn finish(self) -> String {
        let (w, h) = (self.width, self.height);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg class="chart" viewBox="0 0 {w} {h}" role="img" aria-label="{t}">"#,
            t = escape(&self.title)
        );
        let _ = writeln!(
            s,
            r#"<text class="title" x="{}" y="17">{}</text>"#,
            px(self.x.r0),
            escape(&self.title)
        );
        let (left, right) = (self.x.r0, self.x.r1);
        let (bottom, top) = (self.y.r0, self.y.r1);
        s.push_str(r#"<g class="grid">"#);
        for &t in &self.y_ticks {
            let y = px(self.y.map(t));
            let _ = write!(
                s,
                r#"<line x1="{}" x2="{}" y1="{y}" y2="{y}"/>"#,
                px(left),
                px(right)
            );
        }
        s.push_str("</g>\n<g class=\"axis\">");
        let _ = write!(
            s,
            r#"<line x1="{l}" x2="{r}" y1="{b}" y2="{b}"/><line x1="{l}" x2="{l}" y1="{t}" y2="{b}"/>"#,
            l = px(left),
            r = px(right),
            b = px(bottom),
            t = px(top)
        );
        for &t in &self.x_ticks {
            let x = px(self.x.map(t));
            let _ = write!(
                s,
                r#"<line x1="{x}" x2="{x}" y1="{}" y2="{}"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"#,
                px(bottom),
                px(bottom + 4.0),
                px(bottom + 16.0),
                tick_label(t, self.x_dec)
            );
        }
        for &t in &self.y_ticks {
            let y = self.y.map(t);
            let _ = write!(
                s,
                r#"<line x1="{}" x2="{}" y1="{yp}" y2="{yp}"/><text x="{}" y="{}" text-anchor="end">{}</text>"#,
                px(left - 4.0),
                px(left),
                px(left - 6.0),
                px(y + 4.0),
                tick_label(t, self.y_dec),
                yp = px(y)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text></g>"#,
            px((left + right) / 2.0),
            px(h - 6.0),
            escape(&self.x_label)
        );
        s.push_str(&self.body);
        s.push_str("</svg>\n");
        s
    }
}

// ---------------------------------------------------------------------------------------
// HTML
// ---------------------------------------------------------------------------------------

/// HTML-escapes `&`, `<`, `>`, `"` and `'`.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for a table: integers exactly, others to 4 significant digits.
fn number(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == v.trunc() && v.abs() < 1e15 {
        return format!("{v:.0}");
    }
    let mag = v.abs().log10().floor() as i32;
    if !(-3..6).contains(&mag) {
        return format!("{v:.3e}");
    }
    let dec = (3 - mag).max(0) as usize;
    let s = format!("{v:.dec$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A JSON value as table text (not yet escaped).
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.to_string(),
            None => number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#9c755f",
    "#ff9da7", "#bab0ac",
];
const NEUTRAL: &str = "#555555";
const WIDE: (f64, f64) = (680.0, 360.0);
const SMALL: (f64, f64) = (340.0, 220.0);

const CSS: &str = "
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1120px;padding:0 16px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:13px}
svg.chart{width:100%;height:auto;display:block}
.wide{max-width:760px}
.grid-charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:12px}
svg text{font-size:11px;fill:#444}
svg text.title{font-size:13px;font-weight:600;fill:#222}
.grid line{stroke:#eee}
.axis line{stroke:#888}
path.series{fill:none;stroke-width:2;stroke-linejoin:round}
circle.dot{fill-opacity:.75}
.detection line{stroke:#c0392b;stroke-dasharray:3 3;stroke-width:1.2}
.detection text{fill:#c0392b;font-size:10px}
.peak line{stroke-dasharray:2 3;stroke-width:1.2}
.peak circle{fill:none;stroke-width:2}
.peak text{font-size:11px;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:6px 16px;font-size:13px;margin:4px 0 8px}
.key{display:inline-flex;align-items:center;gap:6px}
.swatch{display:inline-block;width:26px;border-top-width:3px;border-top-style:solid}
.swatch.dashed{border-top-style:dashed}
.swatch.det{border-top:2px dashed #c0392b}
table{border-collapse:collapse;font-size:13px;margin:6px 0 16px}
caption{text-align:left;font-weight:600;padding:4px 0}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:left}
th{background:#f5f5f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{color:#666;font-size:13px}
";

fn swatch(color: &str, class: &str, label: &str) -> String {
    format!(
        r#"<span class="key"><span class="swatch{class}" style="border-top-color:{color}"></span>{}</span>"#,
        escape(label)
    )
}

fn table_html(title: &str, columns: &[String], rows: &[Vec<String>]) -> String {
    let mut s = String::from("<table>");
    if !title.is_empty() {
        let _ = write!(s, "<caption>{}</caption>", escape(title));
    }
    s.push_str("<thead><tr>");
    for c in columns {
        let _ = write!(s, "<th>{}</th>", escape(c));
    }
    s.push_str("</tr></thead><tbody>\n");
    for row in rows {
        s.push_str("<tr>");
        for c in row {
            let class = if c.parse::<f64>().is_ok() {
                r#" class="num""#
            } else {
                ""
            };
            let _ = write!(s, "<td{class}>{}</td>", escape(c));
        }
        // Short rows are padded so the grid stays rectangular.
        for _ in row.len()..columns.len() {
            s.push_str("<td></td>");
        }
        s.push_str("</tr>\n");
    }
    s.push_str("</tbody></table>\n");
    s
}

/// A firing to mark: detector, series (if known) and step.
struct Marker {
    detector: String,
    series: Option<String>,
    step: f64,
    reason: Option<String>,
}

fn markers(metrics: &Metrics, summary: Option<&Summary>) -> Vec<Marker> {
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
    fn label(&self) -> String {
        match &self.series {
            Some(s) => format!("{} ({s})", self.detector),
            None => self.detector.clone(),
        }
    }
}

/// A chart of `summary.json` with its legend (nothing when it has no finite point).
fn spec_chart(spec: &ChartSpec) -> String {
    let lines: Vec<Vec<(f64, f64)>> = spec
        .lines
        .iter()
        .map(|l| {
            l.points
                .iter()
                .filter_map(|p| Some((p[0]?, p[1]?)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let (Some(x), Some(y)) = (
        extent(lines.iter().flatten().map(|p| p.0)),
        extent(lines.iter().flatten().map(|p| p.1)),
    ) else {
        return String::new();
    };
    let color = |i: usize| PALETTE[i % PALETTE.len()];
    let mut html = format!("<h2>{}</h2>\n", escape(&spec.title));
    html.push_str(r#"<div class="legend">"#);
    for (i, l) in spec.lines.iter().enumerate() {
        let class = if l.dashed { " dashed" } else { "" };
        html.push_str(&swatch(color(i), class, &l.label));
    }
    html.push_str("</div>\n");
    let mut chart = Chart::new(&spec.title, &spec.x_label, WIDE, x, y);
    for m in &spec.marks {
        chart.vline(m.x, m.label.as_deref());
    }
    for (i, (l, pts)) in spec.lines.iter().zip(&lines).enumerate() {
        chart.line(pts, color(i), l.dashed);
        chart.dots(pts, color(i));
    }
    let _ = write!(html, r#"<div class="wide">{}</div>"#, chart.finish());
    html
}

/// Renders the report of `metrics` and `summary` as one self-contained HTML page;
/// `title` names the run (escaped here).
pub fn render(title: &str, metrics: &Metrics, summary: Option<&Summary>) -> String {
    let color = |i: usize| PALETTE[i % PALETTE.len()];
    let color_of = |name: &str| {
        metrics
            .series
            .iter()
            .position(|s| s.name == name)
            .map_or(NEUTRAL, color)
    };
    let marks = markers(metrics, summary);
    let step_extent = extent(
        metrics
            .series
            .iter()
            .flat_map(|s| s.rows.iter().map(|r| r.step as f64)),
    );

    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{t} · goodhart report</title>\n<style>{CSS}</style>\n</head>\n<body>\n\
         <h1>{t}</h1>\n<p class=\"meta\">goodhart run report · {n} series · {k} steps logged</p>\n",
        t = escape(title),
        n = metrics.series.len(),
        k = metrics.series.iter().map(|s| s.rows.len()).sum::<usize>(),
    );

    // Series legend, shared by every chart.
    let mut legend = String::from(r#"<div class="legend">"#);
    for (i, s) in metrics.series.iter().enumerate() {
        legend.push_str(&swatch(color(i), "", &s.name));
    }
    legend.push_str("</div>\n");

    // Proxy and gold against step, one chart per experiment.
    let mut groups: Vec<Option<&str>> = Vec::new();
    for s in &metrics.series {
        if !groups.contains(&s.group.as_deref()) {
            groups.push(s.group.as_deref());
        }
    }
    for group in groups {
        let members: Vec<usize> = (0..metrics.series.len())
            .filter(|&i| metrics.series[i].group.as_deref() == group)
            .collect();
        let reward_pts: Vec<(usize, Vec<(f64, f64)>, Vec<(f64, f64)>)> = members
            .iter()
            .map(|&i| {
                let s = &metrics.series[i];
                (i, s.points(KEY_PROXY), s.points(KEY_GOLD))
            })
            .collect();
        let y = extent(
            reward_pts
                .iter()
                .flat_map(|(_, p, g)| p.iter().chain(g).map(|pt| pt.1)),
        );
        let x = extent(
            members
                .iter()
                .flat_map(|&i| metrics.series[i].rows.iter().map(|r| r.step as f64)),
        );
        let (Some(y), Some(x)) = (y, x) else {
            continue;
        };
        let title = match group {
            Some(g) => format!("Proxy and gold reward: {g}"),
            None => "Proxy and gold reward".to_string(),
        };
        let _ = writeln!(html, "<h2>{}</h2>", escape(&title));
        html.push_str(r#"<div class="legend">"#);
        for &i in &members {
            html.push_str(&swatch(color(i), "", &metrics.series[i].name));
        }
        html.push_str("</div>\n");
        html.push_str(r#"<div class="legend">"#);
        html.push_str(&swatch(NEUTRAL, "", "gold (solid)"));
        html.push_str(&swatch(NEUTRAL, " dashed", "proxy (dashed)"));
        let group_marks: Vec<&Marker> = marks
            .iter()
            .filter(|m| {
                m.series
                    .as_deref()
                    .is_none_or(|name| members.iter().any(|&i| metrics.series[i].name == name))
            })
            .collect();
        if !group_marks.is_empty() {
            html.push_str(
                r#"<span class="key"><span class="swatch det"></span>detector fired</span>"#,
            );
        }
        html.push_str("</div>\n");
        let mut chart = Chart::new(&title, "step", WIDE, x, y);
        for m in group_marks {
            chart.vline(m.step, Some(&m.label()));
        }
        for (i, proxy, gold) in &reward_pts {
            chart.line(proxy, color(*i), true);
            chart.line(gold, color(*i), false);
        }
        let _ = write!(html, r#"<div class="wide">{}</div>"#, chart.finish());
    }

    // The summary's own charts.
    for spec in summary.map(|s| s.charts.as_slice()).unwrap_or_default() {
        html.push_str(&spec_chart(spec));
    }

    // Gold against sqrt(KL), with the fits.
    let fits = summary.map(|s| s.fits.as_slice()).unwrap_or_default();
    let gold_d: Vec<Vec<(f64, f64)>> = metrics.series.iter().map(Series::gold_vs_d).collect();
    let peaks: Vec<Option<f64>> = fits.iter().map(Fit::peak).collect();
    let x = extent(
        gold_d
            .iter()
            .flatten()
            .map(|p| p.0)
            .chain(peaks.iter().flatten().copied())
            .chain((!fits.is_empty()).then_some(0.0)),
    );
    if let Some(x) = x {
        let samples: Vec<Vec<(f64, f64)>> = fits
            .iter()
            .map(|f| {
                let lo = x.0.max(0.0);
                (0..=120)
                    .map(|i| lo + (x.1 - lo) * i as f64 / 120.0)
                    .map(|d| (d, f.eval(d)))
                    .collect()
            })
            .collect();
        let peak_pts: Vec<(f64, f64)> = fits
            .iter()
            .zip(&peaks)
            .filter_map(|(f, p)| p.map(|d| (d, f.eval(d))))
            .collect();
        let y = extent(
            gold_d
                .iter()
                .flatten()
                .chain(samples.iter().flatten())
                .chain(&peak_pts)
                .map(|p| p.1),
        );
        if let Some(y) = y {
            html.push_str("<h2>Gold reward against √KL</h2>\n");
            html.push_str(r#"<div class="legend">"#);
            for (i, s) in metrics.series.iter().enumerate() {
                if !gold_d[i].is_empty() {
                    html.push_str(&swatch(color(i), "", &s.name));
                }
            }
            html.push_str("</div>\n");
            let mut chart = Chart::new(
                "Gold reward against d = √KL",
                "d = √KL(π ‖ π_ref)",
                WIDE,
                x,
                y,
            );
            for (i, pts) in gold_d.iter().enumerate() {
                chart.dots(pts, color(i));
            }
            for (f, pts) in fits.iter().zip(&samples) {
                let c = f.series.as_deref().map_or(NEUTRAL, color_of);
                chart.line(pts, c, false);
            }
            for (f, p) in fits.iter().zip(&peaks) {
                if let Some(d) = p {
                    let c = f.series.as_deref().map_or(NEUTRAL, color_of);
                    chart.peak(*d, f.eval(*d), c, &format!("peak d* = {}", number(*d)));
                }
            }
            let _ = write!(html, r#"<div class="wide">{}</div>"#, chart.finish());
            if !fits.is_empty() {
                let cols = [
                    "series",
                    "law",
                    "alpha",
                    "beta",
                    "offset",
                    "R²",
                    "peak d*",
                    "gold at peak",
                ];
                let rows: Vec<Vec<String>> = fits
                    .iter()
                    .zip(&peaks)
                    .map(|(f, p)| {
                        let law = match f.form {
                            FitForm::Rl => "RL: c + d (α − β ln d)",
                            FitForm::Bon => "best-of-n: c + d (α − β d)",
                        };
                        vec![
                            f.series.clone().unwrap_or_else(|| "–".into()),
                            law.into(),
                            number(f.alpha),
                            number(f.beta),
                            number(f.offset),
                            f.r2.map_or("–".into(), number),
                            p.map_or("none".into(), number),
                            p.map_or("–".into(), |d| number(f.eval(d))),
                        ]
                    })
                    .collect();
                let cols: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
                html.push_str(&table_html("Fitted laws (Gao et al. 2022)", &cols, &rows));
            }
        }
    }

    // Detections.
    if !marks.is_empty() {
        html.push_str("<h2>Detections</h2>\n");
        let cols: Vec<String> = ["detector", "series", "step", "reason"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        let rows: Vec<Vec<String>> = marks
            .iter()
            .map(|m| {
                vec![
                    m.detector.clone(),
                    m.series.clone().unwrap_or_else(|| "–".into()),
                    number(m.step),
                    m.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        html.push_str(&table_html("", &cols, &rows));
    }

    // Summary figures and tables.
    if let Some(s) = summary {
        if !s.scalars.is_empty() || !s.tables.is_empty() {
            html.push_str("<h2>Summary</h2>\n");
        }
        if !s.scalars.is_empty() {
            let rows: Vec<Vec<String>> = s
                .scalars
                .iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect();
            html.push_str(&table_html(
                "Figures",
                &["figure".into(), "value".into()],
                &rows,
            ));
        }
        for t in &s.tables {
            let cols: Vec<String> = t.columns.iter().map(cell).collect();
            let rows: Vec<Vec<String>> = t
                .rows
                .iter()
                .map(|r| r.iter().map(cell).collect())
                .collect();
            html.push_str(&table_html(&t.title, &cols, &rows));
        }
    }

    // Small multiples: every other metric against step.
    let others: Vec<&String> = metrics
        .keys
        .iter()
        .filter(|k| *k != KEY_PROXY && *k != KEY_GOLD && detector_name(k).is_none())
        .collect();
    if let (false, Some(x)) = (others.is_empty(), step_extent) {
        html.push_str("<h2>Metrics</h2>\n");
        html.push_str(&legend);
        html.push_str(r#"<div class="grid-charts">"#);
        for key in others {
            let pts: Vec<Vec<(f64, f64)>> = metrics.series.iter().map(|s| s.points(key)).collect();
            let Some(y) = extent(pts.iter().flatten().map(|p| p.1)) else {
                // Only missing values: say so instead of an empty chart.
                let _ = write!(
                    html,
                    r#"<p class="note">{}: no finite values</p>"#,
                    escape(key)
                );
                continue;
            };
            let mut chart = Chart::new(key, "step", SMALL, x, y);
            for m in &marks {
                chart.vline(m.step, None);
            }
            for (i, p) in pts.iter().enumerate() {
                chart.line(p, color(i), false);
            }
            html.push_str(&chart.finish());
        }
        html.push_str("</div>\n");
    }

    html.push_str("</body>\n</html>\n");
    html
}

/// Reads `run`'s `metrics.jsonl` and `summary.json` (if any), renders the report and
/// writes `report.html` atomically; returns its path. The run's other files are only
/// read.
pub fn write_report(run: &RunDir) -> Result<PathBuf> {
    let metrics = Metrics::read(&run.metrics())?;
    let summary = Summary::read(&run.summary())?;
    let title = run_title(run.path());
    let html = render(&title, &metrics, summary.as_ref());
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
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("goodhart-report-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// Two methods over steps 0..=10: proxy rises linearly; gold follows the best-of-n law
    /// `d (alpha - 0.2 d)` in `d = sqrt_kl`, so it rises then falls. `grpo` (d = 0.5 s,
    /// alpha = 1) peaks at d = 2.5 (step 5) and logs gold as `null` (NaN) at step 4; its
    /// gold-aware detector turns on at step 6 and stays on. `<evil>&` has d = 0.4 s and
    /// alpha = 0.8.
    fn synthetic_metrics() -> String {
        let mut lines = Vec::new();
        for s in 0..=10 {
            let sf = s as f64;
            let d = 0.5 * sf;
            let gold = if s == 4 {
                "null".to_string()
            } else {
                format!("{}", d * (1.0 - 0.2 * d))
            };
            let fired = u8::from(s >= 6);
            lines.push(format!(
                r#"{{"step":{s},"method":"grpo","run":"seed-0","reward/proxy/mean":{},"reward/gold/mean":{gold},"sqrt_kl":{d},"kl/ref":{},"entropy":{},"detector/gold-aware/fired":{fired}}}"#,
                0.1 * sf,
                d * d,
                2.0 - 0.1 * sf
            ));
            let d = 0.4 * sf;
            lines.push(format!(
                r#"{{"step":{s},"method":"<evil>&","reward/proxy/mean":{},"reward/gold/mean":{},"sqrt_kl":{d},"kl/ref":{},"entropy":{}}}"#,
                0.08 * sf,
                d * (0.8 - 0.2 * d),
                d * d,
                2.0 - 0.05 * sf
            ));
        }
        lines.join("\n") + "\n"
    }

    const SUMMARY: &str = r#"{
        "name": "lab <tiny>",
        "peak": {"gold": 1.25, "step": 5},
        "fit": [{"series": "grpo", "form": "bon", "alpha": 1.0, "beta": 0.2, "r2": 0.97}],
        "detections": [
            {"detector": "gold-aware", "step": 6, "series": "grpo", "reason": "gold fell"},
            {"detector": "proxy-only", "step": 8, "series": "<evil>&"}
        ],
        "tables": [{"title": "Tomato: true return", "columns": ["method", "coef", "true return"],
                    "rows": [["chi2", 0.1, 3.25], ["<kl>", 0.01, null]]}]
    }"#;

    #[test]
    fn scale_maps_by_hand() {
        // [0, 10] -> [40, 640]: 40 + 2.5 / 10 * 600 = 190.
        let s = LinearScale::new((0.0, 10.0), (40.0, 640.0));
        assert_eq!(s.map(2.5), 190.0);
        assert_eq!(s.map(0.0), 40.0);
        assert_eq!(s.map(10.0), 640.0);
        // A y scale points up: [0, 2] -> [300, 20]; 0.5 -> 300 - 0.25 * 280 = 230.
        assert_eq!(LinearScale::new((0.0, 2.0), (300.0, 20.0)).map(0.5), 230.0);
        // An empty domain maps to the middle of the range.
        assert_eq!(LinearScale::new((3.0, 3.0), (0.0, 100.0)).map(3.0), 50.0);
    }

    #[test]
    fn nice_ticks_follow_the_1_2_5_rule() {
        // [0, 0.93] in ~5 intervals: raw 0.186 = 1.86e-1; 1.86 >= sqrt 2 -> step 0.2.
        assert_eq!(nice_ticks(0.0, 0.93, 5), vec![0.0, 0.2, 0.4, 0.6, 0.8]);
        assert_eq!(nice_domain(0.0, 0.93, 5), (0.0, 1.0));
        // [-1.3, 7.2]: raw 1.7 -> step 2; multiples inside: 0, 2, 4, 6.
        assert_eq!(nice_ticks(-1.3, 7.2, 5), vec![0.0, 2.0, 4.0, 6.0]);
        assert_eq!(nice_domain(-1.3, 7.2, 5), (-2.0, 8.0));
        // [0, 5] in ~7 intervals: raw 0.714; 7.14 >= sqrt 50 -> step 1.
        assert_eq!(nice_ticks(0.0, 5.0, 7), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        // Large values: [0, 2300] in ~4: raw 575 -> 5.75e2 >= sqrt 10 -> 500.
        assert_eq!(
            nice_ticks(0.0, 2300.0, 4),
            vec![0.0, 500.0, 1000.0, 1500.0, 2000.0]
        );
        // A single value is padded by 10%: 3 -> [2.7, 3.3], ticks 0.1 apart.
        assert_eq!(nice_domain(3.0, 3.0, 5), (2.7, 3.3));
        assert_eq!(nice_domain(0.0, 0.0, 4), (-1.0, 1.0));
        assert!(nice_ticks(1.0, 1.0, 5).is_empty());
        assert!(nice_ticks(f64::NAN, 1.0, 5).is_empty());
    }

    #[test]
    fn fit_laws_and_peaks() {
        let rl = Fit {
            series: None,
            form: FitForm::Rl,
            alpha: 1.0,
            beta: 0.5,
            offset: 0.1,
            r2: None,
            peak_d: None,
        };
        // d* = exp(alpha / beta - 1) = e; R(e) = 0.1 + e (1 - 0.5) = 0.1 + e / 2.
        assert!((rl.peak().unwrap() - std::f64::consts::E).abs() < 1e-12);
        assert!((rl.eval(std::f64::consts::E) - (0.1 + std::f64::consts::E / 2.0)).abs() < 1e-12);
        assert_eq!(rl.eval(0.0), 0.1);
        let bon = Fit {
            form: FitForm::Bon,
            beta: 0.2,
            offset: 0.0,
            ..rl.clone()
        };
        // d* = alpha / (2 beta) = 2.5; R(2.5) = 2.5 (1 - 0.5) = 1.25.
        assert_eq!(bon.peak(), Some(2.5));
        assert_eq!(bon.eval(2.5), 1.25);
        assert_eq!(
            Fit {
                beta: 0.0,
                ..bon.clone()
            }
            .peak(),
            None
        );
        assert_eq!(
            Fit {
                alpha: -1.0,
                ..bon.clone()
            }
            .peak(),
            None
        );
        assert_eq!(
            Fit {
                peak_d: Some(3.0),
                ..bon
            }
            .peak(),
            Some(3.0)
        );
        // OveroptFit's field names parse too.
        let f: Fit = serde_json::from_str(
            r#"{"law":"best-of-n","alpha":1,"beta":0.25,"offset":0,"r_squared":0.9,"points":7}"#,
        )
        .unwrap();
        assert_eq!(
            (f.form, f.r2, f.peak()),
            (FitForm::Bon, Some(0.9), Some(2.0))
        );
    }

    #[test]
    fn report_of_two_methods() {
        let dir = scratch("two");
        let run = RunDir::open(&dir).unwrap();
        let metrics_text = synthetic_metrics();
        run.write("metrics.jsonl", metrics_text.as_bytes()).unwrap();
        run.write("summary.json", SUMMARY.as_bytes()).unwrap();
        let path = write_report(&run).unwrap();
        assert_eq!(path, run.report());
        // The metrics file is only read.
        assert_eq!(fs::read_to_string(run.metrics()).unwrap(), metrics_text);
        let html = fs::read_to_string(&path).unwrap();

        let m = Metrics::read(&run.metrics()).unwrap();
        let names: Vec<_> = m.series.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["grpo", "<evil>&"]);
        assert_eq!(
            m.keys,
            [
                "detector/gold-aware/fired",
                "entropy",
                "kl/ref",
                "reward/gold/mean",
                "reward/proxy/mean",
                "sqrt_kl"
            ]
        );
        // 11 lines, gold null at step 4: 10 gold points; one rising edge of the detector.
        assert_eq!(m.series[0].points(KEY_GOLD).len(), 10);
        assert_eq!(m.series[0].firings(), vec![("gold-aware".to_string(), 6.0)]);

        // Self-contained: no scripts, links, external URLs or imports.
        for bad in ["<script", "src=", "href=", "http", "url(", "@import", "NaN"] {
            assert!(!html.contains(bad), "report contains {bad}");
        }
        // One chart for rewards, one for gold vs sqrt(KL), one per other metric
        // (entropy, kl/ref, sqrt_kl; the detector flag is drawn as markers).
        assert_eq!(html.matches("<svg").count(), 5);
        assert_eq!(html.matches("</svg>").count(), 5);
        // Escaped method name, never raw.
        assert!(html.contains("&lt;evil&gt;&amp;"));
        assert!(!html.contains("<evil>"));
        assert!(html.contains("lab &lt;tiny&gt;"));
        // Summary table cells and scalars.
        assert!(html.contains("<caption>Tomato: true return</caption>"));
        assert!(html.contains("<td>chi2</td><td class=\"num\">0.1</td><td class=\"num\">3.25</td>"));
        assert!(html.contains("<td>&lt;kl&gt;</td><td class=\"num\">0.01</td><td>–</td>"));
        assert!(html.contains("<td>peak/gold</td><td class=\"num\">1.25</td>"));
        // The peak marker: d* = 1 / (2 * 0.2) = 2.5; the x axis covers [0, 5] (max
        // sqrt_kl 0.5 * 10; ticks 1 apart) on pixels [56, 656]: 56 + 2.5 / 5 * 600 = 356.
        let peak = &html[html.find(r#"<g class="peak" data-d="2.5">"#).unwrap()..];
        assert!(
            peak.starts_with(r#"<g class="peak" data-d="2.5"><line x1="356.0" x2="356.0""#),
            "{}",
            &peak[..120]
        );
        assert_eq!(html.matches(r#"class="peak""#).count(), 1);
        // Detector markers: gold-aware at step 6 (metrics and summary agree: once) and
        // proxy-only at step 8 (summary only), in the reward chart and the 3 metric
        // charts. Steps [0, 10]: on the wide chart pixels [56, 656], 6 -> 416, 8 -> 536;
        // on the small ones [56, 316], 6 -> 56 + 0.6 * 260 = 212, 8 -> 264.
        assert_eq!(html.matches(r#"<g class="detection">"#).count(), 8);
        for (x, n) in [("416.0", 1), ("536.0", 1), ("212.0", 3), ("264.0", 3)] {
            let marker = format!(r#"<g class="detection"><line x1="{x}""#);
            assert_eq!(html.matches(&marker).count(), n, "{x}");
        }
        assert!(html.contains("proxy-only (&lt;evil&gt;&amp;)"));
        assert!(html.contains("<td>gold fell</td>"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn summary_charts_are_drawn_with_their_legends_and_marks() {
        let m =
            Metrics::parse("{\"step\": 0, \"reward/gold/mean\": 1.0}\n", Path::new("m")).unwrap();
        let summary = r#"{"charts": [{"title": "gold <per> beta", "x_label": "step",
            "lines": [{"label": "b = 0.1", "points": [[0, 1.0], [5, null], [10, 3.0]]},
                      {"label": "b = 1", "points": [[0, 1.0], [10, 2.0]], "dashed": true}],
            "marks": [{"x": 5, "label": "epoch 2"}]},
            {"title": "empty", "x_label": "x", "lines": [{"label": "none", "points": []}]}]}"#;
        let s = Summary::parse(summary, Path::new("summary.json")).unwrap();
        assert_eq!(s.charts.len(), 2);
        assert!(s.scalars.is_empty(), "{:?}", s.scalars);
        let html = render("t", &m, Some(&s));
        assert!(html.contains("<h2>gold &lt;per&gt; beta</h2>"));
        assert!(
            !html.contains("<h2>empty</h2>"),
            "a chart without points is left out"
        );
        assert!(html.contains(">b = 0.1</span>") && html.contains(">b = 1</span>"));
        // Two lines (the null point skipped), the second dashed; steps [0, 10] on pixels
        // [56, 656]: the mark at 5 is at 356.
        let chart = &html[html.find("gold &lt;per&gt; beta</text>").unwrap()..];
        let chart = &chart[..chart.find("</svg>").unwrap()];
        assert_eq!(chart.matches(r#"<path class="series""#).count(), 2);
        assert_eq!(chart.matches("stroke-dasharray").count(), 1);
        assert_eq!(chart.matches(r#"<circle class="dot""#).count(), 4);
        assert!(chart.contains(r#"<g class="detection"><line x1="356.0""#));
        assert!(chart.contains(">epoch 2</text>"));
        // A chart of the wrong shape is an error naming the field.
        let bad = Summary::parse(r#"{"charts": [{"title": "t"}]}"#, Path::new("summary.json"));
        assert!(
            matches!(
                bad,
                Err(ReportError::SummaryField {
                    field: "charts",
                    ..
                })
            ),
            "{bad:?}"
        );
    }

    #[test]
    fn a_single_point_and_no_summary() {
        let m = Metrics::parse(
            "{\"step\":3,\"reward/proxy/mean\":0.5,\"reward/gold/mean\":null,\"entropy\":null}\n",
            Path::new("m.jsonl"),
        )
        .unwrap();
        let html = render("one", &m, None);
        // A reward chart with one proxy dot; entropy has no finite value: a note, no chart;
        // no sqrt(KL) chart.
        assert_eq!(html.matches("<svg").count(), 1);
        assert_eq!(html.matches(r#"<circle class="dot""#).count(), 1);
        assert!(html.contains("entropy: no finite values"));
        assert!(!html.contains("NaN"));
        assert_eq!(m.series[0].name, "run");
    }

    #[test]
    fn bad_metrics_are_typed_errors() {
        let p = Path::new("runs/x/metrics.jsonl");
        let err = Metrics::parse("{\"step\":0}\n{\"step\":1}\n{oops\n", p).unwrap_err();
        assert!(
            matches!(err, ReportError::Line(SinkError::Parse { line: 3, .. })),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(":3:") && msg.contains("runs/x/metrics.jsonl"),
            "{msg}"
        );
        let err = Metrics::parse("{\"step\":0,\"method\":[1]}\n", p).unwrap_err();
        assert!(err.to_string().contains("`method`"), "{err}");
        assert!(matches!(
            Metrics::parse("\n \n", p),
            Err(ReportError::EmptyMetrics { .. })
        ));

        let dir = scratch("bad");
        let run = RunDir::open(&dir).unwrap();
        let err = write_report(&run).unwrap_err();
        assert!(matches!(err, ReportError::MissingMetrics { .. }), "{err:?}");
        assert!(err.to_string().contains("metrics.jsonl"));
        run.write("metrics.jsonl", b"{\"step\":0,\"entropy\":1}\n")
            .unwrap();
        run.write(
            "summary.json",
            b"{\"fit\": {\"form\": \"cubic\", \"alpha\": 1, \"beta\": 1}}",
        )
        .unwrap();
        let err = write_report(&run).unwrap_err();
        assert!(
            matches!(err, ReportError::SummaryField { field: "fit", .. }),
            "{err:?}"
        );
        run.write("summary.json", b"[1]").unwrap();
        assert!(matches!(
            write_report(&run),
            Err(ReportError::Summary { .. })
        ));
        assert!(!run.report().exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
