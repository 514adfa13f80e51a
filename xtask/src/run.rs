//! `cargo xtask run` and `cargo xtask sweep`: resolve the config, then run the experiments
//! through `goodhart_train::experiments` on the chosen backend.
//!
//! Flags: `cargo xtask run --help`, `cargo xtask sweep --help`.

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use goodhart_core::device::DeviceSpec;
use goodhart_train::{
    config::ExperimentConfig,
    experiments,
    policy_gradient::OnNan,
    presets,
    runner::{Lines, Reporter, Runner, Silent},
};
use serde_json::Value;

use crate::DeviceArg;

/// What `run` and `sweep` read: the config and where its runs go.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// A preset (`cargo xtask list` names them) or a TOML file [default: lab]
    #[arg(value_name = "PRESET | FILE.toml")]
    target: Option<String>,
    /// Set a config key: KEY=VALUE, the value read as TOML, else as a string (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// The base seed (the same as --set seed=N)
    #[arg(long)]
    seed: Option<u64>,
    /// Where run directories go
    #[arg(long, value_name = "DIR", default_value = "runs")]
    out: PathBuf,
    /// The most memory the config's estimate may need, in GiB [default: 3/4 of this machine's]
    #[arg(long, value_name = "GIB", value_parser = gib)]
    max_memory: Option<f64>,
    /// What an RL step with a non-finite reward, advantage, loss or gradient does
    #[arg(long, value_enum, default_value = "error")]
    on_nan: NanArg,
    /// No progress output (the tables and the run directory's paths still print)
    #[arg(long, short)]
    quiet: bool,
    /// Also write TensorBoard event files under DIR, rewritten from metrics.jsonl after
    /// every stage: one TensorBoard run per experiment and series (`tensorboard --logdir DIR`)
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

/// `--on-nan`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum NanArg {
    /// Stop the run with an error naming the quantity
    Error,
    /// Drop the batch and go on (counted in the metrics)
    SkipBatch,
}

/// `cargo xtask run`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  cargo xtask run                              the default preset (lab), on the CPU
  cargo xtask run rubric --seed 3              a preset with another base seed
  cargo xtask run my.toml --set rl.lr=1e-3 --set rl.steps=200 --device wgpu
  cargo xtask run --resume runs/lab/s0         continue a run where it stopped
  cargo xtask run rubric --tensorboard tb      also TensorBoard files: tensorboard --logdir tb")]
pub struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Continue the run in RUN_DIR with its own config.toml
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["target", "sets", "seed", "out"])]
    resume: Option<PathBuf>,
    /// With --resume: a damaged checkpoint is an error instead of re-running its stage
    #[arg(long, requires = "resume")]
    no_repair: bool,
    /// With --resume: an edited config re-runs the completed stages that read what
    /// changed (and every later one) instead of being refused
    #[arg(long, requires = "resume")]
    rerun_changed: bool,
}

/// `cargo xtask sweep`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  cargo xtask sweep my.toml                    one run per point of its [sweep] section
  cargo xtask sweep lab --set 'sweep.\"rl.lr\"=[1e-3, 3e-3]'")]
pub struct SweepArgs {
    #[command(flatten)]
    config: ConfigArgs,
}

/// A positive number of GiB, in bytes (a clap value parser).
fn gib(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok(g * 1024.0 * 1024.0 * 1024.0),
        _ => Err(format!("`{s}` is not a positive number of GiB")),
    }
}

impl ConfigArgs {
    /// The `--set` overrides, `--seed` last.
    fn sets(&self) -> Vec<String> {
        let mut sets = self.sets.clone();
        if let Some(s) = self.seed {
            sets.push(format!("seed={s}"));
        }
        sets
    }

    fn max_memory(&self) -> f64 {
        self.max_memory
            .unwrap_or_else(goodhart_train::memory::default_limit)
    }

    /// Progress bars on a terminal, plain lines elsewhere, nothing with `--quiet`.
    fn reporter(&self) -> Box<dyn Reporter> {
        if self.quiet {
            Box::new(Silent)
        } else if std::io::stderr().is_terminal() {
            Box::new(crate::progress::Bars::new())
        } else {
            Box::new(Lines::default())
        }
    }

    fn on_nan(&self) -> OnNan {
        match self.on_nan {
            NanArg::Error => OnNan::Error,
            NanArg::SkipBatch => OnNan::SkipBatch,
        }
    }
}

/// The config text of a preset name or a TOML file, with where it came from and the
/// directory its relative paths are under: the working directory for a file, the
/// repository for a preset (its paths name the repository's fixtures).
fn config_text(target: Option<&str>) -> Result<(String, String, PathBuf)> {
    let target = target.unwrap_or("lab");
    let path = Path::new(target);
    if target.ends_with(".toml") || path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file `{target}`"))?;
        let cwd = std::env::current_dir().context("reading the working directory")?;
        return Ok((text, target.to_string(), cwd));
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the repository")
        .to_path_buf();
    match presets::preset(target) {
        Some(text) => Ok((text.to_string(), format!("preset `{target}`"), repo)),
        None => bail!(
            "`{target}` is neither a preset ({}) nor a TOML file",
            presets::names().join(", ")
        ),
    }
}

fn execute(mut runner: Runner, device: DeviceSpec) -> Result<Value> {
    let t0 = Instant::now();
    let path = runner.dir().path().to_path_buf();
    eprintln!("run directory: {}  (device {device})", path.display());
    let summary = experiments::run_on(&mut runner, device)?.map_err(|e| anyhow!("{e}"))?;
    print!("{}", experiments::text_tables(&summary));
    println!(
        "\nfinished in {:.0} s ({} stages from checkpoints)\n  {}\n  {}\n  {}",
        t0.elapsed().as_secs_f64(),
        runner.skipped(),
        runner.dir().metrics().display(),
        runner.dir().summary().display(),
        runner.dir().report().display()
    );
    Ok(summary)
}

fn check_device(device: DeviceSpec) -> Result<()> {
    if !device.is_compiled() {
        bail!(goodhart_core::GoodhartError::BackendNotCompiled {
            backend: device.to_string(),
            feature: device.feature().into(),
        });
    }
    Ok(())
}

/// Opens the device once (a GPU runtime that finds no adapter errors here, before any
/// run directory exists).
fn probe_device(device: DeviceSpec) -> Result<()> {
    struct Nothing;
    impl goodhart_core::device::BackendJob for Nothing {
        type Output = ();
        fn run<B: burn::tensor::backend::Backend>(self, _: B::Device) {}
    }
    goodhart_core::device::dispatch(device, Nothing).map_err(|e| match crate::take_panic() {
        Some(first) => anyhow!("{e} (first, in the runtime: {first})"),
        None => anyhow!("{e}"),
    })
}

/// `cargo xtask run`.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let c = &args.config;
    let device = c.device.device;
    check_device(device)?;
    probe_device(device)?;
    let runner = if let Some(dir) = &args.resume {
        let reopen = if args.rerun_changed {
            Runner::resume_rerunning_changed
        } else {
            Runner::resume
        };
        reopen(dir)
            .map_err(|e| anyhow!("{e}"))?
            .repair(!args.no_repair)
            .on_nan(c.on_nan())
            .tensorboard(c.tensorboard.clone())
            .with_reporter(c.reporter())
    } else {
        let (text, origin, base) = config_text(c.target.as_deref())?;
        let config = ExperimentConfig::parse_at(&text, &c.sets(), &base)
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        Runner::create_limited(&c.out, config, c.max_memory())
            .map_err(|e| anyhow!("{e}"))?
            .on_nan(c.on_nan())
            .tensorboard(c.tensorboard.clone())
            .with_reporter(c.reporter())
    };
    execute(runner, device)?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask sweep`: one run per point of the config's `[sweep]` product, under
/// `<out>/<name>-sweep/<point>/`.
pub fn sweep(args: SweepArgs) -> Result<ExitCode> {
    let c = &args.config;
    let device = c.device.device;
    check_device(device)?;
    probe_device(device)?;
    let (text, origin, base) = config_text(c.target.as_deref())?;
    let config = ExperimentConfig::parse_at(&text, &c.sets(), &base)
        .map_err(|e| anyhow!("{origin}: {e}"))?;
    if config.sweep.is_empty() {
        bail!("{origin} has no [sweep] section: add e.g. `[sweep]\\n\"rl.lr\" = [1e-3, 3e-3]`, or use --set sweep.KEY=[...]");
    }
    let points = config
        .expand_sweep()
        .map_err(|e| anyhow!("{origin}: {e}"))?;
    let root = c.out.join(format!("{}-sweep", config.name));
    let total = points.len();
    eprintln!("sweep: {total} runs under {}", root.display());
    for (i, (label, mut point)) in points.into_iter().enumerate() {
        eprintln!("\n[{}/{total}] {label}", i + 1);
        point.name = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let tensorboard = c.tensorboard.as_ref().map(|d| d.join(&point.name));
        let runner = Runner::create_limited(&root, point, c.max_memory())
            .map_err(|e| anyhow!("{e}"))?
            .on_nan(c.on_nan())
            .tensorboard(tensorboard)
            .with_reporter(c.reporter());
        execute(runner, device)?;
    }
    Ok(ExitCode::SUCCESS)
}
