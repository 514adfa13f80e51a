//! The experiments a config enables, run as checkpointed stages ([`crate::runner`]), and
//! the `summary.json` they produce.
//!
//! Each experiment is one module holding its TOML section's schema and its code, and
//! implements [`Experiment`] (validate, run, summarise); [`visit`] is the list of them.
//!
//! - [`tomato`]: ORPO's gridworld, hacking and the KL vs chi-squared comparison.
//! - [`overopt`]: Gao et al.'s overoptimisation curves (RL and best-of-n, fitted laws,
//!   detectors).
//! - [`mitigations`]: peak and final gold of each mitigation, over seeds.
//! - [`train`]: one RL run per seed on a policy and prompt set (a Hugging Face model and
//!   a dataset, or the synthetic language), the trained policy saved.
//! - [`daa`]: direct alignment (DPO, IPO, SLiC, RPO) over betas on the synthetic
//!   language's preference pairs, gold and KL of fresh samples.
//! - [`rubric`]: RL against weak and strong rubric verifiers on the rubric world,
//!   exploitation rate by failure mode and the self-internalisation gap.
//! - [`multiturn`]: RL on the tool-use world with outcome, ungated dense, gated (G-RA) and
//!   turn-level (IGPO, A2TGPO) rewards.
//! - [`lm`]: the stages the language-model experiments share.
//!
//! A new experiment is a module here with its section struct implementing
//! [`Experiment`], one line in [`visit`] and [`EXPERIMENTS`], and its field in
//! [`ExperimentConfig`].

pub mod daa;
pub mod detector_corpus;
pub mod lm;
pub mod mitigations;
pub mod multiturn;
pub mod overopt;
pub mod rubric;
pub mod tomato;
pub mod train;

use std::{collections::BTreeMap, fmt::Write as _};

use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Map, Value};

use goodhart_core::GoodhartError;
use goodhart_metrics::sink::Line;

use crate::{
    config::{ConfigError, ExperimentConfig},
    runner::{Result, RunError, Runner, StageLog},
};

/// One experiment: the section of the config that enables it, its checks, its stages
/// and its part of `summary.json`.
pub trait Experiment {
    /// Its section in the TOML file.
    const NAME: &'static str;
    /// One line on what it measures (progress output, `cargo xtask list`).
    const SUMMARY: &'static str;
    /// What its stages produce.
    type Output;
    /// Checks against the whole config (sections it reads included), before any work;
    /// errors name the key path.
    fn validate(&self, config: &ExperimentConfig) -> std::result::Result<(), ConfigError>;
    /// Runs its stages on `device`.
    fn run<B: AutodiffBackend>(
        &self,
        runner: &mut Runner,
        config: &ExperimentConfig,
        device: &B::Device,
    ) -> Result<Self::Output>;
    /// Its figures, tables, fits and detector firings.
    fn summarize(&self, output: &Self::Output) -> Part;
}

/// What an experiment adds to `summary.json`.
#[derive(Debug, Clone, Default)]
pub struct Part {
    /// Scalar figures, under the experiment's name.
    pub figures: Value,
    /// Tables (`report.html` draws them; [`text_tables`] prints them).
    pub tables: Vec<Value>,
    /// Fits, in the report's format.
    pub fits: Vec<Value>,
    /// Detector firings, in the report's format.
    pub detections: Vec<Value>,
    /// Charts, in the report's format ([`crate::report::ChartSpec`]).
    pub charts: Vec<Value>,
}

/// Something done to every enabled experiment ([`visit`]).
pub trait Visitor {
    /// Its error.
    type Error;
    /// Called once per enabled experiment, in [`EXPERIMENTS`] order.
    fn visit<E: Experiment>(&mut self, experiment: &E) -> std::result::Result<(), Self::Error>;
}

/// Every experiment: its section name and summary.
pub const EXPERIMENTS: [(&str, &str); 8] = [
    (
        tomato::TomatoExperiment::NAME,
        tomato::TomatoExperiment::SUMMARY,
    ),
    (
        overopt::OveroptExperiment::NAME,
        overopt::OveroptExperiment::SUMMARY,
    ),
    (
        mitigations::MitigationsExperiment::NAME,
        mitigations::MitigationsExperiment::SUMMARY,
    ),
    (
        train::TrainExperiment::NAME,
        train::TrainExperiment::SUMMARY,
    ),
    (daa::DaaExperiment::NAME, daa::DaaExperiment::SUMMARY),
    (
        detector_corpus::DetectorCorpusExperiment::NAME,
        detector_corpus::DetectorCorpusExperiment::SUMMARY,
    ),
    (
        rubric::RubricExperiment::NAME,
        rubric::RubricExperiment::SUMMARY,
    ),
    (
        multiturn::MultiturnExperiment::NAME,
        multiturn::MultiturnExperiment::SUMMARY,
    ),
];

/// Calls `v` on every experiment `config` enables, in [`EXPERIMENTS`] order; returns how
/// many.
pub fn visit<V: Visitor>(
    config: &ExperimentConfig,
    v: &mut V,
) -> std::result::Result<usize, V::Error> {
    let mut n = 0;
    if let Some(e) = &config.tomato {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.overopt {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.mitigations {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.train {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.daa {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.detector_corpus {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.rubric {
        v.visit(e)?;
        n += 1;
    }
    if let Some(e) = &config.multiturn {
        v.visit(e)?;
        n += 1;
    }
    Ok(n)
}

/// Which experiments take the method `name` of `family` (a family of
/// `cargo xtask list`), with the key that names it.
pub fn accepting(family: &str, name: &str) -> Vec<String> {
    let rl = |key: &str| {
        vec![
            format!("overopt (rl.{key})"),
            format!("mitigations (arms.rl.{key})"),
            format!("train (rl.{key})"),
        ]
    };
    match family {
        "advantage" => match crate::policy_gradient::unsupported_estimator_name(name) {
            Some(_) => vec!["multiturn (multiturn.arms.rl.advantage)".into()],
            None => {
                let mut by = rl("advantage");
                by.push("multiturn (multiturn.arms.rl.advantage)".into());
                by
            }
        },
        "policy loss" => match name {
            "a2tgpo_clip" => vec!["multiturn (multiturn.arms.rl.loss)".into()],
            _ => {
                let mut by = rl("loss");
                by.push("multiturn (multiturn.arms.rl.loss)".into());
                by
            }
        },
        "sample filter" => rl("sample_filter"),
        "aggregation" => rl("aggregation"),
        "regularizer" => match name {
            "action_kl" | "chi2_occupancy" => vec![format!("tomato (action_kl / chi2 sweeps)")],
            _ => rl("regularizers"),
        },
        "reward" => match name {
            "mean" | "median" | "worst_case" | "uwo" => {
                vec!["mitigations (arms.aggregation)".into()]
            }
            "linear_length" | "dapo_overlong" | "fimi" => rl("length_penalty"),
            "weighted_sum" => {
                let mut by = rl("components");
                by.push("train (rewards.proxy, rewards.gold)".into());
                by
            }
            "math_verify" | "format" | "hf_reward_model" | "unit_tests" | "llm_judge"
            | "rubric" => {
                vec!["train (rewards.proxy, rewards.gold)".into()]
            }
            "ctrl_u" => vec!["mitigations (arms.rl.ctrl_u, with ensemble >= 2)".into()],
            "bradley_terry" => vec!["overopt, mitigations (the proxy reward models' loss)".into()],
            "par" | "centred" | "meanstd" | "clip" | "minmax" | "ceil" | "lsc" | "tanh" => {
                rl("reward_shaping")
            }
            _ => Vec::new(),
        },
        "preference loss" => vec!["daa (methods.loss)".into()],
        "metric" => match name {
            "gold-aware" | "proxy-only" | "cusum" | "shift" | "logistic" => {
                let mut by = vec!["overopt (overopt.detectors)".to_string()];
                by.extend(rl("detectors"));
                by.push("detector_corpus (detector_corpus.detectors)".into());
                by
            }
            "rl-fit" | "bon-fit" | "bon-kl" => vec!["overopt (its summary)".into()],
            _ => Vec::new(),
        },
        _ => Vec::new(),
    }
}

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
    struct Run<'a, B: AutodiffBackend> {
        runner: &'a mut Runner,
        config: ExperimentConfig,
        device: &'a B::Device,
        summary: Map<String, Value>,
        part: Part,
    }
    impl<B: AutodiffBackend> Visitor for Run<'_, B> {
        type Error = RunError;
        fn visit<E: Experiment>(&mut self, e: &E) -> Result<()> {
            self.runner.say(&format!("{}: {}", E::NAME, E::SUMMARY));
            let out = e.run::<B>(self.runner, &self.config, self.device)?;
            let part = e.summarize(&out);
            self.summary.insert(E::NAME.into(), part.figures);
            self.part.tables.extend(part.tables);
            self.part.fits.extend(part.fits);
            self.part.detections.extend(part.detections);
            self.part.charts.extend(part.charts);
            Ok(())
        }
    }
    let config = runner.config().clone();
    let mut summary = Map::new();
    summary.insert("name".into(), json!(config.name));
    summary.insert("seed".into(), json!(config.seed));
    let mut v = Run::<B> {
        runner,
        config: config.clone(),
        device,
        summary,
        part: Part::default(),
    };
    visit(&config, &mut v)?;
    let Run {
        runner,
        mut summary,
        part,
        ..
    } = v;
    summary.insert("tables".into(), Value::Array(part.tables));
    summary.insert("fit".into(), Value::Array(part.fits));
    summary.insert("detections".into(), Value::Array(part.detections));
    if !part.charts.is_empty() {
        summary.insert("charts".into(), Value::Array(part.charts));
    }
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

    /// Appends one line, labelled with the experiment and the series; a write failure
    /// becomes the algorithm's error type, so training loops can log through their
    /// callbacks.
    pub(crate) fn log(
        &mut self,
        step: u64,
        metrics: BTreeMap<String, f64>,
    ) -> goodhart_core::Result<()> {
        let series = self.series;
        self.log_as(series, step, metrics)
    }

    /// [`Logger::log`] under another series of the same experiment.
    pub(crate) fn log_as(
        &mut self,
        series: &str,
        step: u64,
        metrics: BTreeMap<String, f64>,
    ) -> goodhart_core::Result<()> {
        let line = Line::new(step, metrics)
            .with_label("experiment", self.experiment)
            .with_label("series", series);
        self.log
            .log(&line)
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

/// Resamples of [`seed_mean`]'s bootstrap interval.
const SEED_RESAMPLES: usize = 10_000;

/// The mean of one value per seed (or of paired per-seed differences), its 95%
/// percentile-bootstrap interval over the seeds (10,000 resamples) and how many values
/// are positive.
#[derive(Debug, Clone, PartialEq)]
pub struct SeedMean {
    /// Mean.
    pub mean: f64,
    /// Lower end of the interval.
    pub lo: f64,
    /// Upper end.
    pub hi: f64,
    /// Positive values.
    pub positive: usize,
    /// Values.
    pub n: usize,
}

impl SeedMean {
    /// The interval as a table cell, `[lo, hi]`.
    pub fn interval(&self) -> String {
        format!("[{:.3}, {:.3}]", self.lo, self.hi)
    }
}

/// The [`SeedMean`] of `values`, its resamples drawn from the stream `stream` of seed 0
/// (same values and stream, same interval); `None` without a value or with a non-finite
/// one.
pub fn seed_mean(values: &[f64], stream: &str) -> Option<SeedMean> {
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    let (lo, hi) =
        goodhart_metrics::stats::bootstrap(values, mean, SEED_RESAMPLES, 0.95, 0, stream).ok()?;
    Some(SeedMean {
        mean: mean(values),
        lo,
        hi,
        positive: values.iter().filter(|&&d| d > 0.0).count(),
        n: values.len(),
    })
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
    fn seed_mean_by_hand() {
        // Equal values: a zero-width interval at them.
        let p = seed_mean(&[0.5, 0.5, 0.5], "s").unwrap();
        assert_eq!((p.mean, p.lo, p.hi, p.positive, p.n), (0.5, 0.5, 0.5, 3, 3));
        assert_eq!(p.interval(), "[0.500, 0.500]");
        let p = seed_mean(&[-1.0, 0.0, 1.0, 2.0], "s").unwrap();
        assert_eq!((p.mean, p.positive), (0.5, 2));
        assert!(p.lo < 0.5 && p.hi > 0.5 && p.lo >= -1.0 && p.hi <= 2.0);
        assert_eq!(seed_mean(&[], "s"), None);
        assert_eq!(seed_mean(&[1.0, f64::NAN], "s"), None);
        // Same values and stream, same interval.
        assert_eq!(seed_mean(&[-1.0, 0.0, 1.0, 2.0], "s"), Some(p));
    }

    #[test]
    fn every_listed_name_says_who_takes_it() {
        // The [rl] families go to the three language-model experiments and the
        // multi-turn lab; what needs turns only to the multi-turn lab.
        let turns = "multiturn (multiturn.arms.rl.advantage)".to_string();
        let all = [
            "overopt (rl.advantage)".to_string(),
            "mitigations (arms.rl.advantage)".into(),
            "train (rl.advantage)".into(),
            turns.clone(),
        ];
        for m in goodhart_advantage::REGISTRY {
            let by = accepting("advantage", m.name);
            match m.name {
                "gra" | "a2tgpo" | "igpo" | "verpo" => {
                    assert_eq!(by, std::slice::from_ref(&turns), "{}", m.name)
                }
                _ => assert_eq!(by, all, "{}", m.name),
            }
        }
        for m in goodhart_objective::policy::REGISTRY {
            let by = accepting("policy loss", m.name);
            assert_eq!(
                by.len(),
                if m.name == "a2tgpo_clip" { 1 } else { 4 },
                "{}",
                m.name
            );
            assert_eq!(by.last().unwrap(), "multiturn (multiturn.arms.rl.loss)");
        }
        for m in goodhart_regularize::REGISTRY {
            let by = accepting("regularizer", m.name);
            assert_eq!(
                by.len(),
                if matches!(m.name, "action_kl" | "chi2_occupancy") {
                    1
                } else {
                    3
                },
                "{}",
                m.name
            );
        }
        // Every reward transform, aggregator and length method has a home, except the
        // pairwise loss the proxies do not use.
        for m in goodhart_reward::REGISTRY {
            let by = accepting("reward", m.name);
            assert_eq!(by.is_empty(), m.name == "log_exp", "{}: {by:?}", m.name);
        }
        for m in goodhart_objective::preference::REGISTRY {
            assert_eq!(
                accepting("preference loss", m.name),
                ["daa (methods.loss)"],
                "{}",
                m.name
            );
        }
        assert_eq!(
            accepting("metric", "gold-aware"),
            [
                "overopt (overopt.detectors)",
                "overopt (rl.detectors)",
                "mitigations (arms.rl.detectors)",
                "train (rl.detectors)",
                "detector_corpus (detector_corpus.detectors)"
            ]
        );
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
