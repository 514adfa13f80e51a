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
use goodhart_metrics::step::{KEY_GOLD_MEAN, KEY_PROXY_MEAN};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{
    config::ExperimentConfig,
    policy_gradient::OnNan,
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
    /// Another process holds the run directory.
    #[error("`{path}` is being written by another process (it holds `checkpoints/lock`)")]
    Locked {
        /// The run directory.
        path: PathBuf,
    },
    /// `config.toml` was edited after the run started, in sections completed stages read.
    #[error("cannot resume `{path}`: config.toml differs from the configuration the run started with, at {}; completed stages that read it: {} (`--rerun-changed` runs them and every later stage again)", keys.join(", "), stages.join(", "))]
    ConfigChanged {
        /// The run directory.
        path: PathBuf,
        /// The changed key paths.
        keys: Vec<String>,
        /// The completed stages whose config sections changed.
        stages: Vec<String>,
    },
    /// A file written by a completed stage no longer matches its checksum.
    #[error("stage `{stage}`: `{file}` is damaged ({reason}); resuming with repair (the default; `cargo xtask run --resume` without `--no-repair`) re-runs the stage")]
    Damaged {
        /// The stage that wrote it.
        stage: String,
        /// The file, under `checkpoints/`.
        file: String,
        /// What is wrong.
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

const LOCK: &str = "lock";

#[derive(Debug, Default, Serialize, Deserialize)]
struct Progress {
    /// The resolved configuration the stages ran with (`config.toml` as created).
    #[serde(default)]
    config: Option<String>,
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
    /// The result as JSON, for reading (JSON has no NaN, and its floats may not read back
    /// to the same bits: `result` is what a resumed run returns).
    output: Value,
    /// The result exactly: MessagePack, as hex.
    #[serde(default)]
    result: Option<String>,
    /// CRC-32 of `result`'s bytes.
    #[serde(default)]
    result_crc: Option<u32>,
    /// The files the stage wrote under `checkpoints/`, with their CRC-32.
    #[serde(default)]
    files: BTreeMap<String, u32>,
    /// CRC-32 of the config sections the stage reads ([`sections_crc`]); `None` in runs
    /// from before it was recorded (then any edit counts as touching the stage).
    #[serde(default)]
    config_crc: Option<u32>,
}

/// The top-level config sections a stage reads, by its name's experiment prefix; `None`
/// (every section) for a name no experiment writes.
fn stage_sections(name: &str) -> Option<&'static [&'static str]> {
    let mut parts = name.split('/');
    Some(match (parts.next(), parts.next()) {
        (Some("tomato"), _) => &["seed", "tomato"],
        (Some("lm"), Some("sft")) => &["seed", "language", "sft"],
        (Some("lm"), Some("proxy")) => &["seed", "language", "proxy"],
        (Some("lm"), Some("heldout")) => &["seed", "language", "proxy"],
        (Some("lm"), Some("rm-pretrain")) => &["seed", "language", "sft", "proxy"],
        (Some("overopt"), Some("bon")) => &["seed", "language", "sft", "proxy", "overopt"],
        (Some("overopt"), _) => &["seed", "language", "sft", "proxy", "rl", "overopt"],
        (Some("mitigations"), _) => &["seed", "language", "sft", "proxy", "rl", "mitigations"],
        (Some("corpus"), _) => &["seed", "language", "sft", "proxy", "rl", "detector_corpus"],
        (Some("rubric"), Some("sft")) => &["seed", "sft", "rubric"],
        (Some("rubric"), _) => &["seed", "sft", "rl", "rubric"],
        _ => return None,
    })
}

/// CRC-32 of the TOML of the sections of `config` that stage `name` reads.
fn sections_crc(config: &str, name: &str) -> u32 {
    let table: toml::Table = config.parse().unwrap_or_default();
    let picked: toml::Table = match stage_sections(name) {
        Some(keys) => keys
            .iter()
            .filter_map(|k| table.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect(),
        None => table,
    };
    crc(toml::to_string(&picked).unwrap_or_default().as_bytes())
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Every file under `dir` (recursively) by its path relative to `root`, `/`-separated.
fn files_under(root: &Path, dir: &Path, out: &mut Vec<String>) -> std::io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files_under(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    Ok(())
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
    /// Completed stages re-run because a file they wrote was damaged.
    repaired: usize,
    /// Whether a damaged file re-runs its stage (else it is an error).
    repair: bool,
    /// What the RL stages do with a non-finite reward, advantage, loss or gradient.
    on_nan: OnNan,
    /// Records whose checksums hold in this process: written by it, or checked once.
    checked: std::collections::BTreeSet<usize>,
    reporter: Box<dyn Reporter>,
    /// Where TensorBoard event files mirroring `metrics.jsonl` go, if anywhere.
    tensorboard: Option<PathBuf>,
    started: Instant,
    /// Held for the runner's life: a second process writing the run is refused.
    _lock: fs::File,
}

/// What a run reports while it goes (on stderr, never in its files): its own lines, and
/// each stage's start, expected length, metric lines and end. `cargo xtask run` draws
/// progress bars from it on a terminal; [`Lines`] prints plain lines.
pub trait Reporter: Send {
    /// A line of the run's own: an experiment starting, a stage done or redone.
    fn say(&mut self, line: &str);
    /// Stage `stage` starts (it runs; a stage read back from its checkpoint does not).
    fn stage_started(&mut self, _stage: &str) {}
    /// Stage `stage` will log `total` metric lines (its steps), when it knows.
    fn stage_total(&mut self, _stage: &str, _total: u64) {}
    /// Stage `stage` logged a metrics line.
    fn line(&mut self, _stage: &str, _line: &Line) {}
    /// Stage `stage` ended after `seconds`.
    fn stage_finished(&mut self, _stage: &str, _seconds: f64) {}
}

/// Plain progress: [`Reporter::say`]'s lines on stderr, and on a terminal a status line
/// (the stage, its step, the latest proxy and gold) refreshed at most 4 times a second.
#[derive(Debug, Default)]
pub struct Lines {
    last_status: Option<Instant>,
}

impl Reporter for Lines {
    fn say(&mut self, line: &str) {
        eprintln!("{line}");
    }

    fn line(&mut self, stage: &str, line: &Line) {
        if !std::io::stderr().is_terminal()
            || self
                .last_status
                .is_some_and(|t| t.elapsed().as_millis() <= 250)
        {
            return;
        }
        self.last_status = Some(Instant::now());
        let show = |k: &str| {
            line.metrics
                .get(k)
                .map_or(String::from("-"), |v| format!("{v:.3}"))
        };
        eprint!(
            "\r\x1b[K  ...   {stage}  step {}  proxy {}  gold {}",
            line.step,
            show(KEY_PROXY_MEAN),
            show(KEY_GOLD_MEAN)
        );
    }

    fn stage_finished(&mut self, _stage: &str, _seconds: f64) {
        if self.last_status.take().is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

/// No progress at all (`--quiet`, tests).
#[derive(Debug, Default)]
pub struct Silent;

impl Reporter for Silent {
    fn say(&mut self, _line: &str) {}
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
    /// resolved `config.toml`. A config whose estimated memory exceeds
    /// [`crate::memory::default_limit`] is refused ([`Runner::create_limited`]).
    pub fn create(root: &Path, config: ExperimentConfig) -> Result<Self> {
        Self::create_limited(root, config, crate::memory::default_limit())
    }

    /// [`Runner::create`] refusing configs whose estimated memory exceeds `limit` bytes
    /// ([`crate::memory::check`]).
    pub fn create_limited(root: &Path, config: ExperimentConfig, limit: f64) -> Result<Self> {
        config.validate()?;
        crate::memory::check(&config, limit)?;
        let dir = RunDir::create(root, &config.name, config.seed)?;
        let lock = lock(&dir)?;
        let text = config.to_toml();
        dir.write("config.toml", text.as_bytes())?;
        let progress = Progress {
            config: Some(text),
            stages: Vec::new(),
        };
        let runner = Self::new(dir, config, progress, lock);
        runner.save_progress()?;
        let dir = &runner.dir;
        fs::File::create(dir.metrics()).map_err(io_err(&dir.metrics()))?;
        fs::File::create(dir.samples()).map_err(io_err(&dir.samples()))?;
        Ok(runner)
    }

    /// Reopens an interrupted run: reads its `config.toml` and progress and cuts
    /// `metrics.jsonl` and `samples.jsonl` back to the lines of its completed stages.
    ///
    /// An edited `config.toml` is taken when no completed stage reads the sections it
    /// changed (the stages still to run use it); otherwise [`RunError::ConfigChanged`]
    /// names the keys and those stages. See [`resume_rerunning_changed`](Self::resume_rerunning_changed).
    pub fn resume(path: &Path) -> Result<Self> {
        Self::reopen(path, false)
    }

    /// [`resume`](Self::resume), but an edit that touches completed stages drops the first
    /// of them and every later one (their lines too), which then run again with the new
    /// config (`cargo xtask run --resume DIR --rerun-changed`).
    pub fn resume_rerunning_changed(path: &Path) -> Result<Self> {
        Self::reopen(path, true)
    }

    fn reopen(path: &Path, rerun_changed: bool) -> Result<Self> {
        let dir = RunDir::open(path)?;
        let bad = |reason: String| RunError::Resume {
            path: path.to_path_buf(),
            reason,
        };
        let lock = lock(&dir)?;
        let text = fs::read_to_string(dir.config())
            .map_err(|e| bad(format!("reading config.toml: {e}")))?;
        let config = ExperimentConfig::parse(&text, &[])?;
        let progress_path = dir.checkpoints().join(PROGRESS);
        let mut progress: Progress = match fs::read_to_string(&progress_path) {
            Ok(t) => serde_json::from_str(&t)
                .map_err(|e| bad(format!("{}: {e}", progress_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(format!(
                    "{} is missing: the run's progress is unknown",
                    progress_path.display()
                )))
            }
            Err(e) => return Err(bad(format!("{}: {e}", progress_path.display()))),
        };
        let now = config.to_toml();
        if let Some(started) = &progress.config {
            let keys = changed_keys(started, &now);
            if !keys.is_empty() {
                let touched: Vec<usize> = (0..progress.stages.len())
                    .filter(|&i| {
                        let s = &progress.stages[i];
                        s.config_crc != Some(sections_crc(&now, &s.name))
                    })
                    .collect();
                if let Some(&first) = touched.first() {
                    if !rerun_changed {
                        return Err(RunError::ConfigChanged {
                            path: path.to_path_buf(),
                            keys,
                            stages: touched
                                .iter()
                                .map(|&i| progress.stages[i].name.clone())
                                .collect(),
                        });
                    }
                    progress.stages.truncate(first);
                }
                progress.config = Some(now.clone());
                let bytes = serde_json::to_vec_pretty(&progress).map_err(|e| bad(e.to_string()))?;
                write_atomic(&progress_path, &bytes)?;
            }
        }
        let keep = progress.stages.last().map_or(0, |s| s.lines);
        let keep_samples = progress.stages.last().map_or(0, |s| s.samples);
        truncate_lines(dir.metrics(), keep).map_err(|e| bad(e.to_string()))?;
        truncate_lines(dir.samples(), keep_samples).map_err(|e| bad(e.to_string()))?;
        let mut runner = Self::new(dir, config, progress, lock);
        runner.lines = keep;
        runner.samples = keep_samples;
        Ok(runner)
    }

    fn new(dir: RunDir, config: ExperimentConfig, progress: Progress, lock: fs::File) -> Self {
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
            repaired: 0,
            repair: true,
            on_nan: OnNan::Error,
            checked: Default::default(),
            reporter: Box::new(Lines::default()),
            tensorboard: None,
            started: Instant::now(),
            _lock: lock,
        }
    }

    /// Silences the progress lines on stderr (tests).
    pub fn quiet(self, quiet: bool) -> Self {
        if quiet {
            self.with_reporter(Box::new(Silent))
        } else {
            self
        }
    }

    /// Reports progress to `reporter` instead of plain lines on stderr ([`Lines`]).
    pub fn with_reporter(mut self, reporter: Box<dyn Reporter>) -> Self {
        self.reporter = reporter;
        self
    }

    /// Also writes TensorBoard event files mirroring `metrics.jsonl` under `dir`
    /// ([`goodhart_metrics::tensorboard::export`]), rewritten after every stage and at
    /// the end.
    pub fn tensorboard(mut self, dir: Option<PathBuf>) -> Self {
        self.tensorboard = dir;
        self
    }

    /// Rewrites the TensorBoard event files from `metrics.jsonl` (when asked for).
    fn export_tensorboard(&self) -> Result<()> {
        let Some(dir) = &self.tensorboard else {
            return Ok(());
        };
        let fail = |reason: String| RunError::Checkpoint {
            stage: "tensorboard".into(),
            reason,
        };
        let path = self.dir.metrics();
        let lines = match fs::read_to_string(&path) {
            Ok(text) => goodhart_metrics::sink::parse_lines(&text, &path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => return Err(fail(format!("{}: {e}", path.display()))),
        }
        .map_err(|e| fail(e.to_string()))?;
        goodhart_metrics::tensorboard::export(&lines, dir).map_err(|e| fail(e.to_string()))?;
        Ok(())
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

    /// How many completed stages this process re-ran because a file they wrote (or their
    /// recorded result) no longer matched its checksum.
    pub fn repaired(&self) -> usize {
        self.repaired
    }

    /// Whether a damaged file of a completed stage re-runs the stage (default) or is an
    /// error ([`RunError::Damaged`]).
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        self
    }

    /// What the RL stages do with a non-finite reward, advantage, loss or gradient
    /// (default [`OnNan::Error`]: the stage fails, naming the step and the quantity, and
    /// `--resume` runs it again).
    pub fn on_nan(mut self, on_nan: OnNan) -> Self {
        self.on_nan = on_nan;
        self
    }

    /// The policy set by [`on_nan`](Self::on_nan).
    pub fn nan_policy(&self) -> OnNan {
        self.on_nan
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
    ///
    /// A completed stage whose recorded result or one of whose files under `checkpoints/`
    /// no longer matches its checksum is run again (unless [`Runner::repair`] is off):
    /// its files and result are rewritten, and the lines it logs are discarded, as the
    /// files keep the ones it logged the first time.
    pub fn stage<T, F>(&mut self, name: &str, f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce(&mut StageLog<'_>) -> Result<T>,
    {
        let redo = match self.done.get(name).copied() {
            None => None,
            // Checked once per process: a shared stage is asked for again and again.
            Some(i) => match (!self.checked.contains(&i))
                .then(|| self.damage(i))
                .flatten()
            {
                None => match self.recorded::<T>(i) {
                    Ok(out) => {
                        self.checked.insert(i);
                        if i < self.resumed {
                            self.skipped += 1;
                            tracing::info!(stage = name, "stage read from its checkpoint");
                            self.say(&format!("  done  {name} (from checkpoint)"));
                        }
                        return Ok(out);
                    }
                    // A run from before exact results whose JSON result does not read
                    // back (a NaN stored as `null`): the stage is deterministic, so
                    // running it again gives the result back.
                    Err(reason) => {
                        self.say(&format!("  redo  {name} ({reason})"));
                        Some(i)
                    }
                },
                Some((file, reason)) if !self.repair => {
                    return Err(RunError::Damaged {
                        stage: name.into(),
                        file,
                        reason,
                    })
                }
                Some((file, reason)) => {
                    self.say(&format!("  redo  {name} ({file}: {reason})"));
                    Some(i)
                }
            },
        };
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
            discard: redo.is_some(),
            reporter: self.reporter.as_mut(),
        };
        log.reporter.stage_started(name);
        tracing::info!(stage = name, redo = redo.is_some(), "stage started");
        let out = f(&mut log);
        log.reporter
            .stage_finished(name, t0.elapsed().as_secs_f64());
        match &out {
            Ok(_) => tracing::info!(
                stage = name,
                seconds = t0.elapsed().as_secs_f64(),
                lines = log.lines,
                "stage finished"
            ),
            Err(e) => tracing::warn!(stage = name, error = %e, "stage failed"),
        }
        let out = out?;
        log.metrics.sync().map_err(sink_err)?;
        log.samples.sync().map_err(sink_err)?;
        let (log_lines, log_samples) = (log.lines, log.sample_lines);
        drop(log);
        let unserialisable = |e: &dyn std::fmt::Display| RunError::Checkpoint {
            stage: name.into(),
            reason: format!("result not serialisable: {e}"),
        };
        let output = serde_json::to_value(&out).map_err(|e| unserialisable(&e))?;
        let exact = rmp_serde::to_vec_named(&out).map_err(|e| unserialisable(&e))?;
        let seconds = t0.elapsed().as_secs_f64();
        let mut files = self.unowned_files()?;
        if let Some(i) = redo {
            files.extend(self.progress.stages[i].files.keys().cloned());
            let crcs = self.dir_crcs(&files)?;
            let rec = &mut self.progress.stages[i];
            rec.files = crcs;
            rec.result_crc = Some(crc(&exact));
            rec.result = Some(to_hex(&exact));
            rec.output = output;
            self.repaired += 1;
            self.checked.insert(i);
        } else {
            self.lines += log_lines;
            self.samples += log_samples;
            let files = self.dir_crcs(&files)?;
            self.progress.stages.push(StageRecord {
                name: name.to_string(),
                lines: self.lines,
                samples: self.samples,
                seconds,
                output,
                result_crc: Some(crc(&exact)),
                result: Some(to_hex(&exact)),
                files,
                config_crc: Some(sections_crc(&self.config.to_toml(), name)),
            });
            self.done
                .insert(name.to_string(), self.progress.stages.len() - 1);
            self.checked.insert(self.progress.stages.len() - 1);
        }
        self.save_progress()?;
        self.export_tensorboard()?;
        self.say(&format!(
            "  {:>5.1}s {name}  [{:.0}s total]",
            seconds,
            self.started.elapsed().as_secs_f64()
        ));
        Ok(out)
    }

    /// The recorded result of completed stage `i` (checked by [`Runner::damage`]).
    fn recorded<T: DeserializeOwned>(&self, i: usize) -> std::result::Result<T, String> {
        let rec = &self.progress.stages[i];
        match rec.result.as_deref().and_then(from_hex) {
            Some(bytes) => rmp_serde::from_slice(&bytes)
                .map_err(|e| format!("recorded result unreadable: {e}")),
            None => serde_json::from_value(rec.output.clone())
                .map_err(|e| format!("recorded result unreadable: {e}")),
        }
    }

    /// The first file (or the result) of completed stage `i` that does not match its
    /// checksum, and why.
    fn damage(&self, i: usize) -> Option<(String, String)> {
        let rec = &self.progress.stages[i];
        if let Some(hex) = &rec.result {
            match from_hex(hex) {
                Some(bytes) if rec.result_crc == Some(crc(&bytes)) => {}
                _ => {
                    return Some((
                        PROGRESS.into(),
                        "the recorded result's checksum differs".into(),
                    ))
                }
            }
        }
        for (file, want) in &rec.files {
            match fs::read(self.dir.checkpoints().join(file)) {
                Err(e) => return Some((file.clone(), format!("unreadable: {e}"))),
                Ok(bytes) if crc(&bytes) != *want => {
                    return Some((file.clone(), "checksum differs".into()))
                }
                Ok(_) => {}
            }
        }
        None
    }

    /// Files under `checkpoints/` that no stage record owns (the runner's own excepted).
    fn unowned_files(&self) -> Result<Vec<String>> {
        let root = self.dir.checkpoints();
        let mut all = Vec::new();
        files_under(&root, &root, &mut all).map_err(io_err(&root))?;
        Ok(all
            .into_iter()
            .filter(|f| f != PROGRESS && f != LOCK && !f.starts_with(&format!(".{PROGRESS}")))
            .filter(|f| !self.progress.stages.iter().any(|r| r.files.contains_key(f)))
            .collect())
    }

    /// The CRC-32 of each file under `checkpoints/` (missing files are skipped).
    fn dir_crcs(&self, files: &[String]) -> Result<BTreeMap<String, u32>> {
        let mut out = BTreeMap::new();
        for f in files {
            let path = self.dir.checkpoints().join(f);
            match fs::read(&path) {
                Ok(bytes) => {
                    out.insert(f.clone(), crc(&bytes));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Ok(out)
    }

    fn save_progress(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.progress).expect("progress serialises");
        write_atomic(&self.dir.checkpoints().join(PROGRESS), &bytes)?;
        Ok(())
    }

    /// Reports a line of the run's own ([`Reporter::say`]).
    pub fn say(&mut self, line: &str) {
        self.reporter.say(line);
    }

    /// Writes `summary.json` (atomically) and `report.html`.
    pub fn finish(&self, summary: &Value) -> Result<PathBuf> {
        let bytes = serde_json::to_vec_pretty(summary).expect("summary serialises");
        self.dir.write("summary.json", &bytes)?;
        self.export_tensorboard()?;
        crate::report::write_report(&self.dir).map_err(|e| RunError::Checkpoint {
            stage: "report".into(),
            reason: e.to_string(),
        })
    }
}

/// What a running stage logs through: its metric lines go to `metrics.jsonl`, its samples
/// to `samples.jsonl`, and each metric line to the run's [`Reporter`].
pub struct StageLog<'a> {
    stage: &'a str,
    metrics: JsonlSink,
    lines: usize,
    samples: JsonlFile,
    sample_lines: usize,
    /// A completed stage run again to rebuild its files: its lines are already written.
    discard: bool,
    reporter: &'a mut dyn Reporter,
}

impl StageLog<'_> {
    /// The stage's name.
    pub fn stage(&self) -> &str {
        self.stage
    }

    /// Says how many metric lines (steps) the stage will log, for a progress bar's length
    /// and ETA.
    pub fn expect_lines(&mut self, total: u64) {
        self.reporter.stage_total(self.stage, total);
    }

    /// Appends one metrics line and reports it to the run's progress.
    pub fn log(&mut self, line: &Line) -> Result<()> {
        if !self.discard {
            self.metrics
                .log_line(line)
                .map_err(|e| RunError::Log(Box::new(e)))?;
        }
        self.lines += 1;
        tracing::debug!(
            stage = self.stage,
            step = line.step,
            proxy = line.metrics.get(KEY_PROXY_MEAN).copied(),
            gold = line.metrics.get(KEY_GOLD_MEAN).copied(),
            "metrics line"
        );
        self.reporter.line(self.stage, line);
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
        if !self.discard {
            self.samples
                .append(&objects)
                .map_err(|e| RunError::Log(Box::new(e)))?;
        }
        self.sample_lines += samples.len();
        Ok(())
    }
}

/// Takes the run directory's lock (`checkpoints/lock`), or errors when another process
/// holds it. The operating system releases it when the process ends, however it ends.
fn lock(dir: &RunDir) -> Result<fs::File> {
    let checkpoints = dir.checkpoints();
    fs::create_dir_all(&checkpoints).map_err(io_err(&checkpoints))?;
    let path = checkpoints.join(LOCK);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(fs::TryLockError::WouldBlock) => Err(RunError::Locked {
            path: dir.path().to_path_buf(),
        }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// The dotted key paths whose values differ between two TOML documents (a key present in
/// one only counts).
fn changed_keys(a: &str, b: &str) -> Vec<String> {
    fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let flat = |text: &str| {
        let mut out = BTreeMap::new();
        match text.parse::<toml::Table>() {
            Ok(t) => flatten("", &toml::Value::Table(t), &mut out),
            Err(_) => {
                out.insert("(the whole file)".into(), text.to_string());
            }
        }
        out
    };
    let (a, b) = (flat(a), flat(b));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// Converts a serialisable metrics struct into a JSON object (for [`StageLog::log`]).
pub fn to_map<T: Serialize>(value: &T) -> Map<String, Value> {
    match serde_json::to_value(value) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("goodhart-runner-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        p
    }

    fn config() -> ExperimentConfig {
        ExperimentConfig::parse("name = \"runner\"\nseed = 3\n[overopt]\n", &[]).unwrap()
    }

    /// Two stages: `one` writes a file and logs a line; `two` reads the file. `calls`
    /// counts the stage bodies that ran.
    fn two_stages(runner: &mut Runner, calls: &Cell<usize>) -> Result<u64> {
        let path = runner.artifact("a/weights.bin")?;
        let one: u64 = runner.stage("one", |log| {
            calls.set(calls.get() + 1);
            log.log(&Line::new(0, BTreeMap::from([("x".to_string(), 1.5)])))?;
            fs::write(&path, b"weights of one").map_err(io_err(&path))?;
            Ok(7)
        })?;
        runner.stage("two", |_| {
            calls.set(calls.get() + 1);
            let bytes = fs::read(&path).map_err(io_err(&path))?;
            Ok(one + bytes.len() as u64)
        })
    }

    /// Every reporter call, as text.
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

    impl Reporter for Recorder {
        fn say(&mut self, line: &str) {
            self.0.lock().unwrap().push(format!("say {}", line.trim()));
        }
        fn stage_started(&mut self, stage: &str) {
            self.0.lock().unwrap().push(format!("start {stage}"));
        }
        fn stage_total(&mut self, stage: &str, total: u64) {
            self.0
                .lock()
                .unwrap()
                .push(format!("total {stage} {total}"));
        }
        fn line(&mut self, stage: &str, line: &Line) {
            let v = line.metrics["x"];
            self.0
                .lock()
                .unwrap()
                .push(format!("line {stage} {} {v}", line.step));
        }
        fn stage_finished(&mut self, stage: &str, _seconds: f64) {
            self.0.lock().unwrap().push(format!("end {stage}"));
        }
    }

    #[test]
    fn the_reporter_sees_stages_their_lengths_and_lines() {
        let root = scratch("reporter");
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stage = |r: &mut Runner| {
            r.stage("s", |log| {
                log.expect_lines(2);
                for step in 0..2u64 {
                    let metrics =
                        std::collections::BTreeMap::from([("x".to_string(), step as f64)]);
                    log.log(&Line::new(step, metrics))?;
                }
                Ok(5usize)
            })
        };
        let dir = {
            let mut r = Runner::create(&root, config())
                .unwrap()
                .with_reporter(Box::new(Recorder(events.clone())));
            assert_eq!(stage(&mut r).unwrap(), 5);
            r.dir().path().to_path_buf()
        };
        let got = events.lock().unwrap().clone();
        assert_eq!(
            got[..5],
            ["start s", "total s 2", "line s 0 0", "line s 1 1", "end s"]
        );
        assert!(
            got[5].starts_with("say ") && got[5].ends_with("s  [0s total]"),
            "{got:?}"
        );
        // A stage read back from its checkpoint runs nothing: one line says so.
        events.lock().unwrap().clear();
        let mut r = Runner::resume(&dir)
            .unwrap()
            .with_reporter(Box::new(Recorder(events.clone())));
        assert_eq!(stage(&mut r).unwrap(), 5);
        assert_eq!(*events.lock().unwrap(), ["say done  s (from checkpoint)"]);
        drop(r);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_second_writer_is_refused_until_the_first_is_gone() {
        let root = scratch("lock");
        let calls = Cell::new(0);
        let mut first = Runner::create(&root, config()).unwrap().quiet(true);
        let dir = first.dir().path().to_path_buf();
        assert!(matches!(Runner::resume(&dir), Err(RunError::Locked { .. })));
        assert_eq!(two_stages(&mut first, &calls).unwrap(), 7 + 14);
        drop(first);
        let mut again = Runner::resume(&dir).unwrap().quiet(true);
        assert_eq!(two_stages(&mut again, &calls).unwrap(), 21);
        assert_eq!((calls.get(), again.skipped()), (2, 2));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_edited_config_is_refused_naming_the_keys() {
        let root = scratch("config");
        let dir = {
            let r = Runner::create(&root, config()).unwrap();
            r.dir().path().to_path_buf()
        };
        let path = dir.join("config.toml");
        let text = fs::read_to_string(&path).unwrap();
        let edited = text.replacen("seed = 3", "seed = 4", 1);
        assert_ne!(text, edited);
        fs::write(&path, &edited).unwrap();
        // No stage has completed: nothing read the seed yet, the edit is taken.
        drop(Runner::resume(&dir).unwrap());
        fs::write(&path, &text).unwrap();
        drop(Runner::resume(&dir).unwrap());
        // A completed stage (unknown to the experiments: it reads every section).
        let calls = Cell::new(0);
        {
            let mut r = Runner::resume(&dir).unwrap().quiet(true);
            two_stages(&mut r, &calls).unwrap();
        }
        fs::write(&path, &edited).unwrap();
        match Runner::resume(&dir) {
            Err(RunError::ConfigChanged { keys, stages, .. }) => {
                assert_eq!(keys, ["seed"]);
                assert_eq!(stages, ["one", "two"]);
            }
            other => panic!("{other:?}"),
        }
        fs::write(&path, &text).unwrap();
        // A missing progress.json is not a fresh start.
        fs::write(&path, text).unwrap();
        fs::remove_file(dir.join("checkpoints").join(PROGRESS)).unwrap();
        assert!(matches!(Runner::resume(&dir), Err(RunError::Resume { .. })));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn an_edit_reruns_only_from_the_first_stage_that_reads_it() {
        let root = scratch("sections");
        let calls: BTreeMap<&str, Cell<usize>> =
            ["lm/sft/s3", "lm/proxy/p1/k1/s3", "mitigations/a/s3"]
                .into_iter()
                .map(|n| (n, Cell::new(0)))
                .collect();
        let run = |r: &mut Runner| -> Result<Vec<f64>> {
            let steps = r.config().sft.steps as f64;
            calls
                .iter()
                .map(|(name, c)| {
                    r.stage(name, |log| {
                        c.set(c.get() + 1);
                        log.log(&Line::new(0, BTreeMap::from([("v".to_string(), steps)])))?;
                        Ok(steps)
                    })
                })
                .collect()
        };
        let dir = {
            let mut r = Runner::create(&root, config()).unwrap().quiet(true);
            run(&mut r).unwrap();
            r.dir().path().to_path_buf()
        };
        let path = dir.join("config.toml");
        let text = fs::read_to_string(&path).unwrap();
        let mut edited: toml::Table = text.parse().unwrap();
        edited["sft"]["steps"] = toml::Value::Integer(7);
        fs::write(&path, toml::to_string(&edited).unwrap()).unwrap();
        // The stages are iterated by name: lm/proxy, lm/sft, mitigations. lm/sft and
        // mitigations read [sft]; lm/proxy does not.
        match Runner::resume(&dir) {
            Err(RunError::ConfigChanged { keys, stages, .. }) => {
                assert_eq!(keys, ["sft.steps"]);
                assert_eq!(stages, ["lm/sft/s3", "mitigations/a/s3"]);
            }
            other => panic!("{other:?}"),
        }
        let mut r = Runner::resume_rerunning_changed(&dir).unwrap().quiet(true);
        let first = config().sft.steps as f64;
        assert_ne!(first, 7.0);
        assert_eq!(run(&mut r).unwrap(), [first, 7.0, 7.0]);
        drop(r);
        let counts: Vec<usize> = calls.values().map(Cell::get).collect();
        // lm/proxy kept its result (1 call); the two after it ran again.
        assert_eq!(counts, [1, 2, 2]);
        // The lines: lm/proxy's first line, then the re-run stages' lines with 7.
        let lines = goodhart_metrics::sink::read_lines(dir.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.len(), 3);
        // The edited config is now the run's: resuming again changes nothing.
        drop(Runner::resume(&dir).unwrap());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_nan_result_reads_back_exactly() {
        let root = scratch("nan");
        let calls = Cell::new(0);
        let nan = |r: &mut Runner| {
            r.stage("nan", |_| {
                calls.set(calls.get() + 1);
                Ok(vec![1.0, f64::NAN])
            })
        };
        let dir = {
            let mut r = Runner::create(&root, config()).unwrap().quiet(true);
            assert!(nan(&mut r).unwrap()[1].is_nan());
            r.dir().path().to_path_buf()
        };
        let mut r = Runner::resume(&dir).unwrap().quiet(true);
        let again = nan(&mut r).unwrap();
        assert_eq!((again[0], again[1].is_nan(), calls.get()), (1.0, true, 1));
        // The JSON copy, for reading, holds `null`.
        let text = fs::read_to_string(dir.join("checkpoints").join(PROGRESS)).unwrap();
        assert!(text.contains("null"), "{text}");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_damaged_file_reruns_its_stage_and_keeps_the_lines() {
        let root = scratch("damage");
        let calls = Cell::new(0);
        let dir = {
            let mut r = Runner::create(&root, config()).unwrap().quiet(true);
            two_stages(&mut r, &calls).unwrap();
            r.dir().path().to_path_buf()
        };
        let weights = dir.join("checkpoints/a/weights.bin");
        let metrics = fs::read(dir.join("metrics.jsonl")).unwrap();
        let progress = dir.join("checkpoints").join(PROGRESS);
        let recorded: Value = serde_json::from_slice(&fs::read(&progress).unwrap()).unwrap();
        assert_eq!(
            recorded["stages"][0]["files"]["a/weights.bin"],
            crc(b"weights of one")
        );
        // Same length, other bytes.
        fs::write(&weights, b"weights of 0ne").unwrap();
        let strict = Runner::resume(&dir).unwrap().quiet(true).repair(false);
        let mut strict = strict;
        match two_stages(&mut strict, &calls) {
            Err(RunError::Damaged { stage, file, .. }) => {
                assert_eq!((stage.as_str(), file.as_str()), ("one", "a/weights.bin"))
            }
            other => panic!("{other:?}"),
        }
        drop(strict);
        let mut r = Runner::resume(&dir).unwrap().quiet(true);
        calls.set(0);
        assert_eq!(two_stages(&mut r, &calls).unwrap(), 21);
        assert_eq!((calls.get(), r.repaired(), r.skipped()), (1, 1, 1));
        assert_eq!(fs::read(&weights).unwrap(), b"weights of one");
        assert_eq!(fs::read(dir.join("metrics.jsonl")).unwrap(), metrics);
        drop(r);
        // A recorded result that does not match its checksum re-runs its stage too (7
        // is MessagePack's positive fixint 0x07).
        let text = fs::read_to_string(&progress).unwrap();
        let edited = text.replacen("\"result\": \"07\"", "\"result\": \"08\"", 1);
        assert_ne!(text, edited);
        fs::write(&progress, edited).unwrap();
        let mut r = Runner::resume(&dir).unwrap().quiet(true);
        calls.set(0);
        assert_eq!(two_stages(&mut r, &calls).unwrap(), 21);
        assert_eq!((calls.get(), r.repaired()), (1, 1));
        fs::remove_dir_all(&root).unwrap();
    }
}
