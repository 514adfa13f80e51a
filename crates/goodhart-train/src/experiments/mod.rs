//! The experiments a config enables, run as checkpointed stages ([`crate::runner`]), and
//! the `summary.json` they produce.
//!
//! - [`tomato`]: ORPO's gridworld, hacking and the KL vs chi-squared comparison.
//! - [`overopt`]: Gao et al.'s overoptimisation curves (RL and best-of-n, fitted laws,
//!   detectors).
//! - [`mitigations`]: peak and final gold of each mitigation, over seeds.

pub mod mitigations;
pub mod overopt;
pub mod tomato;

use std::fmt::Write as _;

use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Map, Value};

use goodhart_core::GoodhartError;

use crate::runner::{Result, RunError, Runner, StageLog};

/// [`run`] on the device `spec` names: burn's runtime `Dispatch` backend, with autodiff.
/// The experiments are instantiated here, in this library, so a binary that calls this
/// only links them (xtask's own build is then seconds). The outer error is the backend's
/// (not compiled in, no device found), the inner one the run's.
#[cfg(any(feature = "ndarray", feature = "wgpu", feature = "cuda"))]
pub fn run_on(
    runner: &mut Runner,
    spec: goodhart_core::device::DeviceSpec,
) -> goodhart_core::Result<Result<Value>> {
    use goodhart_core::device::{dispatch, Autodiff, BackendJob};
    struct Job<'a>(&'a mut Runner);
    impl BackendJob for Job<'_> {
        type Output = Result<Value>;
        fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Result<Value> {
            run::<Autodiff<B>>(self.0, &device)
        }
    }
    dispatch(spec, Job(runner))
}

/// Runs every experiment of the runner's config on `device` and returns the summary
/// (also written to `summary.json`, with `report.html`, by [`Runner::finish`]).
pub fn run<B: AutodiffBackend>(runner: &mut Runner, device: &B::Device) -> Result<Value> {
    let config = runner.config().clone();
    let mut summary = Map::new();
    summary.insert("name".into(), json!(config.name));
    summary.insert("seed".into(), json!(config.seed));
    let mut tables = Vec::new();
    let mut fits = Vec::new();
    let mut detections = Vec::new();
    if let Some(t) = &config.tomato {
        runner.say("tomato: base policy, proxy PPO, action-KL and chi-squared sweeps");
        let evals = tomato::run::<B>(runner, t, config.seed, device)?;
        let (figures, table) = tomato::summarize(t, &evals);
        summary.insert("tomato".into(), figures);
        tables.push(table);
    }
    if let Some(o) = &config.overopt {
        runner.say("overopt: base policy, proxies, RL and best-of-n against each proxy");
        let out = overopt::run::<B>(runner, &config, o, device)?;
        let s = overopt::summarize(o, &out);
        summary.insert("overopt".into(), s.figures);
        tables.extend(s.tables);
        fits.extend(s.fits);
        detections.extend(s.detections);
    }
    if let Some(m) = &config.mitigations {
        runner.say("mitigations: each method against the same proxy task, over seeds");
        let out = mitigations::run::<B>(runner, &config, m, device)?;
        let (figures, table) = mitigations::summarize(m, &out);
        summary.insert("mitigations".into(), figures);
        tables.push(table);
    }
    summary.insert("tables".into(), Value::Array(tables));
    summary.insert("fit".into(), Value::Array(fits));
    summary.insert("detections".into(), Value::Array(detections));
    let summary = Value::Object(summary);
    runner.finish(&summary)?;
    Ok(summary)
}

/// Logs the metric lines of one series of one experiment from inside a stage.
pub(crate) struct Logger<'a, 'b> {
    log: &'a mut StageLog<'b>,
    experiment: &'a str,
    series: &'a str,
}

impl<'a, 'b> Logger<'a, 'b> {
    pub(crate) fn new(log: &'a mut StageLog<'b>, experiment: &'a str, series: &'a str) -> Self {
        Self {
            log,
            experiment,
            series,
        }
    }

    pub(crate) fn stage(&self) -> &str {
        self.log.stage()
    }

    /// Appends one line; a write failure becomes the algorithm's error type, so training
    /// loops can log through their callbacks.
    pub(crate) fn log(
        &mut self,
        step: u64,
        metrics: Map<String, Value>,
    ) -> goodhart_core::Result<()> {
        self.log
            .log(
                step,
                &[("experiment", self.experiment), ("series", self.series)],
                &metrics,
            )
            .map_err(|e| GoodhartError::invalid("metrics.jsonl", e.to_string()))
    }
}

impl Logger<'_, '_> {
    /// Appends the samples of one step to `samples.jsonl`, labelled like the metrics.
    pub(crate) fn samples<T: serde::Serialize>(
        &mut self,
        samples: &[T],
    ) -> goodhart_core::Result<()> {
        self.log
            .samples(
                &[("experiment", self.experiment), ("series", self.series)],
                samples,
            )
            .map_err(|e| GoodhartError::invalid("samples.jsonl", e.to_string()))
    }
}

pub(crate) fn stage_error(stage: &str) -> impl FnOnce(GoodhartError) -> RunError + '_ {
    move |source| RunError::Stage {
        stage: stage.into(),
        source,
    }
}

pub(crate) fn checkpoint_error<E: std::fmt::Display>(
    stage: &str,
) -> impl FnOnce(E) -> RunError + '_ {
    move |e| RunError::Checkpoint {
        stage: stage.into(),
        reason: e.to_string(),
    }
}

/// Mean and sample standard deviation (`n - 1`; 0 for one value, NaN for none).
pub(crate) fn mean_sd(values: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let v: Vec<f64> = values.into_iter().collect();
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() == 1 {
        return (mean, 0.0);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A `summary.json` table (`report.html` draws it; [`text_tables`] prints it).
pub(crate) fn table(title: &str, columns: &[&str], rows: Vec<Value>) -> Value {
    json!({"title": title, "columns": columns, "rows": rows})
}

fn cell(v: &Value) -> String {
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            if n.is_u64() || n.is_i64() {
                n.to_string()
            } else if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e5) {
                format!("{x:.3e}")
            } else {
                format!("{x:.4}")
            }
        }
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The summary's tables as aligned plain text, for the terminal.
pub fn text_tables(summary: &Value) -> String {
    let mut out = String::new();
    let tables = summary
        .get("tables")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for t in &tables {
        let title = t.get("title").and_then(Value::as_str).unwrap_or("");
        let cols: Vec<String> = t
            .get("columns")
            .and_then(Value::as_array)
            .map(|c| c.iter().map(cell).collect())
            .unwrap_or_default();
        let rows: Vec<Vec<String>> = t
            .get("rows")
            .and_then(Value::as_array)
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        r.as_array()
                            .map(|r| r.iter().map(cell).collect())
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mut width: Vec<usize> = cols.iter().map(String::len).collect();
        for r in &rows {
            for (i, c) in r.iter().enumerate() {
                if i < width.len() {
                    width[i] = width[i].max(c.len());
                }
            }
        }
        let _ = writeln!(out, "\n{title}");
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(&width)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect::<Vec<_>>()
                .join("  ")
        };
        let _ = writeln!(out, "{}", line(&cols));
        let _ = writeln!(
            out,
            "{}",
            "-".repeat(width.iter().sum::<usize>() + 2 * width.len().saturating_sub(1))
        );
        for r in &rows {
            let _ = writeln!(out, "{}", line(r));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_sd() {
        // (1 + 2 + 3 + 6) / 4 = 3; squared deviations 4 + 1 + 0 + 9 = 14; 14 / 3.
        let (m, sd) = mean_sd([1.0, 2.0, 3.0, 6.0]);
        assert_eq!(m, 3.0);
        assert!((sd - (14.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(mean_sd([5.0]), (5.0, 0.0));
        assert!(mean_sd([]).0.is_nan());
    }

    #[test]
    fn tables_print_aligned() {
        let s = json!({"tables": [table("T", &["method", "gold"], vec![json!(["kl", 0.5]), json!(["none", null])])]});
        let text = text_tables(&s);
        assert_eq!(
            text,
            "\nT\nmethod    gold\n--------------\n    kl  0.5000\n  none       -\n"
        );
    }
}
