//! Stages, checkpoints and resume: how an experiment survives being killed.
//!
//! An experiment is a fixed sequence of named **stages** (train the base policy of seed 0,
//! train a proxy on 100 pairs, one RL run, ...). A stage
//! - appends its metric lines to `metrics.jsonl` (and an RL stage one line per sampled
//!   response to `samples.jsonl`);
//! - writes the modules later stages need under `checkpoints/` (later stages always load
//!   them from there, so a resumed run reads exactly what an uninterrupted one reads);
//! - returns a small serialisable result, recorded with the number of metric and sample
//!   lines in `checkpoints/progress.json` (written atomically) when the stage completes.
//!
//! `--resume` reopens the run, cuts both files back to the lines of the completed
//! stages, returns the recorded results of completed stages without running them, and
//! runs the rest. Each stage seeds its randomness from the run seed and its own name, so
//! it computes the same numbers whether or not earlier stages ran in this process.

use std::{
    collections::BTreeMap,
    fs::{self, OpenOptions},
    io::{IsTerminal as _, Write as _},
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    config::ExperimentConfig,
    run_dir::{write_atomic, RunDir, RunDirError},
};

/// Errors of running an experiment.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A run-directory file could not be read or written.
    #[error(transparent)]
    RunDir(#[from] RunDirError),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// An algorithm rejected its input or failed.
    #[error("stage `{stage}`: {source}")]
    Stage {
        /// The stage.
        stage: String,
        /// The error.
        source: goodhart_core::GoodhartError,
    },
    /// A checkpoint could not be saved or loaded.
    #[error("stage `{stage}`: {reason}")]
    Checkpoint {
        /// The stage.
        stage: String,
        /// Why.
        reason: String,
    },
    /// `progress.json` or a recorded stage result is unreadable.
    #[error("cannot resume `{path}`: {reason}")]
    Resume {
        /// The run directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Writing a metric line failed.
    #[error("writing `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// `Result` of the runner.
pub type Result<T, E = RunError> = std::result::Result<T, E>;

const PROGRESS: &str = "progress.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    stages: Vec<StageRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StageRecord {
    name: String,
    /// Lines in `metrics.jsonl` once the stage completed.
    lines: usize,
    /// Lines in `samples.jsonl` once the stage completed.
    #[serde(default)]
    samples: usize,
    seconds: f64,
    output: Value,
}

/// A run in progress: its directory, the completed stages and the metrics file.
pub struct Runner {
    dir: RunDir,
    config: ExperimentConfig,
    progress: Progress,
    done: BTreeMap<String, usize>,
    lines: usize,
    samples: usize,
    /// Stages completed by an earlier process (the checkpoint resumed from).
    resumed: usize,
    skipped: usize,
    quiet: bool,
    started: Instant,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("dir", &self.dir)
            .field("stages_done", &self.progress.stages.len())
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |source| RunError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Runner {
    /// Starts a new run of `config` under `root` (`<root>/<name>/<id>/`), writing the
    /// resolved `config.toml`.
    pub fn create(root: &Path, config: ExperimentConfig) -> Result<Self> {
        config.validate()?;
        let dir = RunDir::create(root, &config.name, config.seed)?;
        dir.write("config.toml", config.to_toml().as_bytes())?;
        fs::File::create(dir.metrics()).map_err(io_err(&dir.metrics()))?;
        fs::File::create(dir.samples()).map_err(io_err(&dir.samples()))?;
        Ok(Self::new(dir, config, Progress::default()))
    }

    /// Reopens an interrupted run: reads its `config.toml` and progress and cuts
    /// `metrics.jsonl` back to the lines of its completed stages.
    pub fn resume(path: &Path) -> Result<Self> {
        let dir = RunDir::open(path)?;
        let bad = |reason: String| RunError::Resume {
            path: path.to_path_buf(),
            reason,
        };
        let text = fs::read_to_string(dir.config())
            .map_err(|e| bad(format!("reading config.toml: {e}")))?;
        let config = ExperimentConfig::parse(&text, &[])?;
        let progress_path = dir.checkpoints().join(PROGRESS);
        let progress: Progress = match fs::read_to_string(&progress_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| bad(format!("{}: {e}", progress_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Progress::default(),
            Err(e) => return Err(bad(format!("{}: {e}", progress_path.display()))),
        };
        let keep = progress.stages.last().map_or(0, |s| s.lines);
        let keep_samples = progress.stages.last().map_or(0, |s| s.samples);
        cut_lines(&dir.metrics(), keep).map_err(|e| bad(format!("metrics.jsonl {e}")))?;
        cut_lines(&dir.samples(), keep_samples).map_err(|e| bad(format!("samples.jsonl {e}")))?;
        let mut runner = Self::new(dir, config, progress);
        runner.lines = keep;
        runner.samples = keep_samples;
        Ok(runner)
    }

    fn new(dir: RunDir, config: ExperimentConfig, progress: Progress) -> Self {
        let done = progress
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        Self {
            dir,
            config,
            resumed: progress.stages.len(),
            progress,
            done,
            lines: 0,
            samples: 0,
            skipped: 0,
            quiet: false,
            started: Instant::now(),
        }
    }

    /// Silences the progress lines on stderr (tests).
    pub fn quiet(mut self, quiet: bool) -> Self {
        self.quiet = quiet;
        self
    }

    /// The run directory.
    pub fn dir(&self) -> &RunDir {
        &self.dir
    }

    /// The (resolved) configuration.
    pub fn config(&self) -> &ExperimentConfig {
        &self.config
    }

    /// How many stages this process skipped because an earlier process completed them.
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// The path of checkpoint `name` (under `checkpoints/`; sub-directories are created).
    pub fn artifact(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.checkpoints().join(name);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        Ok(path)
    }

    /// Runs stage `name` unless it already completed (then returns its recorded result).
    pub fn stage<T, F>(&mut self, name: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut StageLog<'_>) -> Result<T>,
    {
        if let Some(&i) = self.done.get(name) {
            let rec = &self.progress.stages[i];
            if i < self.resumed {
                self.skipped += 1;
                self.say(&format!("  done  {name} (from checkpoint)"));
            }
            return serde_json::from_value(rec.output.clone()).map_err(|e| RunError::Resume {
                path: self.dir.path().to_path_buf(),
                reason: format!("stage `{name}`: recorded result unreadable: {e}"),
            });
        }
        let t0 = Instant::now();
        let metrics = self.dir.metrics();
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&metrics)
            .map_err(io_err(&metrics))?;
        let samples = self.dir.samples();
        let samples_file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&samples)
            .map_err(io_err(&samples))?;
        let mut log = StageLog {
            stage: name,
            file,
            path: metrics,
            lines: 0,
            samples_file,
            samples_path: samples,
            sample_lines: 0,
            status: !self.quiet && std::io::stderr().is_terminal(),
            last_status: None,
        };
        let out = f(&mut log)?;
        log.file.sync_data().map_err(io_err(&log.path))?;
        log.samples_file
            .sync_data()
            .map_err(io_err(&log.samples_path))?;
        if log.last_status.is_some() && !self.quiet {
            eprint!("\r\x1b[K");
        }
        self.lines += log.lines;
        self.samples += log.sample_lines;
        let seconds = t0.elapsed().as_secs_f64();
        self.progress.stages.push(StageRecord {
            name: name.to_string(),
            lines: self.lines,
            samples: self.samples,
            seconds,
            output: serde_json::to_value(&out).map_err(|e| RunError::Checkpoint {
                stage: name.into(),
                reason: format!("result not serialisable: {e}"),
            })?,
        });
        self.done
            .insert(name.to_string(), self.progress.stages.len() - 1);
        let bytes = serde_json::to_vec_pretty(&self.progress).expect("progress serialises");
        write_atomic(&self.dir.checkpoints().join(PROGRESS), &bytes)?;
        self.say(&format!(
            "  {:>5.1}s {name}  [{:.0}s total]",
            seconds,
            self.started.elapsed().as_secs_f64()
        ));
        Ok(out)
    }

    /// Prints a progress line on stderr (unless quiet).
    pub fn say(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// Writes `summary.json` (atomically) and `report.html`.
    pub fn finish(&self, summary: &Value) -> Result<PathBuf> {
        let bytes = serde_json::to_vec_pretty(summary).expect("summary serialises");
        self.dir.write("summary.json", &bytes)?;
        crate::report::write_report(&self.dir).map_err(|e| RunError::Checkpoint {
            stage: "report".into(),
            reason: e.to_string(),
        })
    }
}

/// What a running stage logs through: one JSON object per line of `metrics.jsonl`, and
/// of `samples.jsonl`.
pub struct StageLog<'a> {
    stage: &'a str,
    file: fs::File,
    path: PathBuf,
    lines: usize,
    samples_file: fs::File,
    samples_path: PathBuf,
    sample_lines: usize,
    /// Whether to refresh a status line on stderr (a terminal, not quiet).
    status: bool,
    last_status: Option<Instant>,
}

impl StageLog<'_> {
    /// The stage's name.
    pub fn stage(&self) -> &str {
        self.stage
    }

    /// Appends one line: `labels` (strings such as `experiment`, `series`), the step, and
    /// the metrics (non-finite numbers become `null`). Also refreshes the status line.
    pub fn log(
        &mut self,
        step: u64,
        labels: &[(&str, &str)],
        metrics: &Map<String, Value>,
    ) -> Result<()> {
        let mut obj = Map::new();
        for (k, v) in labels {
            obj.insert((*k).into(), Value::String((*v).into()));
        }
        obj.insert("step".into(), step.into());
        for (k, v) in metrics {
            obj.insert(k.clone(), v.clone());
        }
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(io_err(&self.path))?;
        self.lines += 1;
        if self.status
            && self
                .last_status
                .is_none_or(|t| t.elapsed().as_millis() > 250)
        {
            self.last_status = Some(Instant::now());
            let show = |k: &str| {
                metrics
                    .get(k)
                    .and_then(Value::as_f64)
                    .map_or(String::from("-"), |v| format!("{v:.3}"))
            };
            eprint!(
                "\r\x1b[K  ...   {}  step {step}  proxy {}  gold {}",
                self.stage,
                show("reward/proxy/mean"),
                show("reward/gold/mean")
            );
        }
        Ok(())
    }
}

impl StageLog<'_> {
    /// Appends one line per sample to `samples.jsonl`, each `labels` then the sample's
    /// own fields, in one write.
    pub fn samples<T: Serialize>(&mut self, labels: &[(&str, &str)], samples: &[T]) -> Result<()> {
        let mut text = String::new();
        for s in samples {
            let mut obj = Map::new();
            for (k, v) in labels {
                obj.insert((*k).into(), Value::String((*v).into()));
            }
            obj.extend(to_map(s));
            text.push_str(&Value::Object(obj).to_string());
            text.push('\n');
        }
        self.samples_file
            .write_all(text.as_bytes())
            .map_err(io_err(&self.samples_path))?;
        self.sample_lines += samples.len();
        Ok(())
    }
}

/// Keeps the first `keep` complete lines of `path` (a missing file holds none). Errors
/// when it has fewer.
fn cut_lines(path: &Path, keep: usize) -> std::result::Result<(), String> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && keep == 0 => return Ok(()),
        Err(e) => return Err(e.to_string()),
    };
    let (mut cut, mut seen) = (0usize, 0usize);
    for (i, &b) in text.iter().enumerate() {
        if seen == keep {
            break;
        }
        if b == b'\n' {
            seen += 1;
            cut = i + 1;
        }
    }
    if seen < keep {
        return Err(format!(
            "has {seen} complete lines, but the completed stages wrote {keep}"
        ));
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    file.set_len(cut as u64).map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())
}

/// Converts a serialisable metrics struct into a JSON object (for [`StageLog::log`]).
pub fn to_map<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
