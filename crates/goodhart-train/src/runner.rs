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
    fs,
    io::IsTerminal as _,
    path::{Path, PathBuf},
    time::Instant,
};

use goodhart_metrics::sink::{
    truncate_lines, JsonlFile, JsonlSink, Line, MetricSink as _, SinkError,
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
    /// Writing a metrics or samples line failed.
    #[error(transparent)]
    Log(Box<SinkError>),
    /// A run file could not be created.
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
    /// `metrics.jsonl` and `samples.jsonl` back to the lines of its completed stages.
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
        truncate_lines(dir.metrics(), keep).map_err(|e| bad(e.to_string()))?;
        truncate_lines(dir.samples(), keep_samples).map_err(|e| bad(e.to_string()))?;
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
        let sink_err = |e: SinkError| RunError::Log(Box::new(e));
        let mut log = StageLog {
            stage: name,
            metrics: JsonlSink::open(self.dir.metrics())
                .map_err(sink_err)?
                .sync_every_line(false),
            lines: 0,
            samples: JsonlFile::open(self.dir.samples()).map_err(sink_err)?,
            sample_lines: 0,
            status: !self.quiet && std::io::stderr().is_terminal(),
            last_status: None,
        };
        let out = f(&mut log)?;
        log.metrics.sync().map_err(sink_err)?;
        log.samples.sync().map_err(sink_err)?;
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

/// What a running stage logs through: its metric lines go to `metrics.jsonl`, its samples
/// to `samples.jsonl`.
pub struct StageLog<'a> {
    stage: &'a str,
    metrics: JsonlSink,
    lines: usize,
    samples: JsonlFile,
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

    /// Appends one metrics line. Also refreshes the status line.
    pub fn log(&mut self, line: &Line) -> Result<()> {
        self.metrics
            .log_line(line)
            .map_err(|e| RunError::Log(Box::new(e)))?;
        self.lines += 1;
        if self.status
            && self
                .last_status
                .is_none_or(|t| t.elapsed().as_millis() > 250)
        {
            self.last_status = Some(Instant::now());
            let show = |k: &str| {
                line.metrics
                    .get(k)
                    .map_or(String::from("-"), |v| format!("{v:.3}"))
            };
            eprint!(
                "\r\x1b[K  ...   {}  step {}  proxy {}  gold {}",
                self.stage,
                line.step,
                show("reward/proxy/mean"),
                show("reward/gold/mean")
            );
        }
        Ok(())
    }

    /// Appends one line per sample to `samples.jsonl`, each `labels` then the sample's
    /// own fields, in one write.
    pub fn samples<T: Serialize>(&mut self, labels: &[(&str, &str)], samples: &[T]) -> Result<()> {
        let objects: Vec<Map<String, Value>> = samples
            .iter()
            .map(|s| {
                let mut obj = Map::new();
                for (k, v) in labels {
                    obj.insert((*k).into(), Value::String((*v).into()));
                }
                obj.extend(to_map(s));
                obj
            })
            .collect();
        self.samples
            .append(&objects)
            .map_err(|e| RunError::Log(Box::new(e)))?;
        self.sample_lines += samples.len();
        Ok(())
    }
}

/// Converts a serialisable metrics struct into a JSON object (for [`StageLog::log`]).
pub fn to_map<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}
