//! `cargo xtask run` and `cargo xtask sweep`: resolve the config, then run the experiments
//! through `goodhart_train::experiments` on the chosen backend.
//!
//! ```text
//! cargo xtask run [PRESET | FILE.toml] [--device D] [--set key=value]... [--seed N]
//!                 [--out DIR] [--resume RUN_DIR [--no-repair] [--rerun-changed]]
//!                 [--max-memory GIB] [--on-nan error|skip-batch]
//! cargo xtask sweep [PRESET | FILE.toml] [--device D] [--set key=value]... [--seed N] [--out DIR]
//! ```

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use goodhart_core::device::DeviceSpec;
use goodhart_train::{
    config::ExperimentConfig, experiments, policy_gradient::OnNan, presets, runner::Runner,
};
use serde_json::Value;

use crate::take_device;

/// The parsed command line of `run` / `sweep`.
struct Args {
    target: Option<String>,
    device: DeviceSpec,
    sets: Vec<String>,
    out: PathBuf,
    /// Whether `--out` was given.
    out_given: bool,
    resume: Option<PathBuf>,
    /// `--no-repair`: a damaged checkpoint is an error instead of re-running its stage.
    no_repair: bool,
    /// `--rerun-changed`: with `--resume`, an edited config re-runs the completed stages
    /// that read what changed (and every later one) instead of being refused.
    rerun_changed: bool,
    /// `--max-memory GIB`: the estimate a config may need (default: 3/4 of the machine's).
    max_memory: f64,
    /// `--on-nan error|skip-batch`: what an RL step with a non-finite quantity does.
    on_nan: OnNan,
}

fn parse_args(args: &[String]) -> Result<Args> {
    let mut args = args.to_vec();
    let device = take_device(&mut args)?;
    let mut parsed = Args {
        target: None,
        device,
        sets: Vec::new(),
        out: PathBuf::from("runs"),
        out_given: false,
        resume: None,
        no_repair: false,
        rerun_changed: false,
        max_memory: goodhart_train::memory::default_limit(),
        on_nan: OnNan::Error,
    };
    let mut seed = None;
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| match it.next() {
            Some(v) if !v.starts_with("--") => Ok(v),
            _ => Err(anyhow!("{flag} needs a value")),
        };
        match a.as_str() {
            "--set" => parsed.sets.push(value("--set")?),
            "--seed" => {
                let v = value("--seed")?;
                seed = Some(
                    v.parse::<u64>()
                        .with_context(|| format!("--seed `{v}`: not an unsigned integer"))?,
                );
            }
            "--out" => {
                parsed.out = PathBuf::from(value("--out")?);
                parsed.out_given = true;
            }
            "--resume" => parsed.resume = Some(PathBuf::from(value("--resume")?)),
            "--no-repair" => parsed.no_repair = true,
            "--rerun-changed" => parsed.rerun_changed = true,
            "--on-nan" => {
                let v = value("--on-nan")?;
                parsed.on_nan = match v.as_str() {
                    "error" => OnNan::Error,
                    "skip-batch" => OnNan::SkipBatch,
                    _ => bail!("--on-nan `{v}`: expected `error` or `skip-batch`"),
                };
            }
            "--max-memory" => {
                let v = value("--max-memory")?;
                let gib: f64 = v
                    .parse()
                    .ok()
                    .filter(|g: &f64| g.is_finite() && *g > 0.0)
                    .with_context(|| format!("--max-memory `{v}`: not a positive number of GiB"))?;
                parsed.max_memory = gib * 1024.0 * 1024.0 * 1024.0;
            }
            flag if flag.starts_with("--") => bail!("unknown option `{flag}`"),
            _ if parsed.target.is_none() => parsed.target = Some(a),
            _ => bail!("unexpected argument `{a}`: give one preset or config file"),
        }
    }
    if let Some(s) = seed {
        parsed.sets.push(format!("seed={s}"));
    }
    Ok(parsed)
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
pub fn run(args: &[String]) -> Result<ExitCode> {
    let args = parse_args(args)?;
    check_device(args.device)?;
    probe_device(args.device)?;
    if args.rerun_changed && args.resume.is_none() {
        bail!("--rerun-changed goes with --resume RUN_DIR");
    }
    let runner = if let Some(dir) = &args.resume {
        if args.target.is_some() || !args.sets.is_empty() || args.out_given {
            bail!("--resume continues a run in its own directory with its own config.toml: drop the preset, file, --set, --seed and --out");
        }
        let reopen = if args.rerun_changed {
            Runner::resume_rerunning_changed
        } else {
            Runner::resume
        };
        reopen(dir)
            .map_err(|e| anyhow!("{e}"))?
            .repair(!args.no_repair)
            .on_nan(args.on_nan)
    } else {
        let (text, origin, base) = config_text(args.target.as_deref())?;
        let config = ExperimentConfig::parse_at(&text, &args.sets, &base)
            .map_err(|e| anyhow!("{origin}: {e}"))?;
        Runner::create_limited(&args.out, config, args.max_memory)
            .map_err(|e| anyhow!("{e}"))?
            .on_nan(args.on_nan)
    };
    execute(runner, args.device)?;
    Ok(ExitCode::SUCCESS)
}

/// `cargo xtask sweep`: one run per point of the config's `[sweep]` product, under
/// `<out>/<name>-sweep/<point>/`.
pub fn sweep(args: &[String]) -> Result<ExitCode> {
    let args = parse_args(args)?;
    check_device(args.device)?;
    if args.resume.is_some() || args.no_repair || args.rerun_changed {
        bail!("resume one point of a sweep with `cargo xtask run --resume RUN_DIR`");
    }
    probe_device(args.device)?;
    let (text, origin, base) = config_text(args.target.as_deref())?;
    let config = ExperimentConfig::parse_at(&text, &args.sets, &base)
        .map_err(|e| anyhow!("{origin}: {e}"))?;
    if config.sweep.is_empty() {
        bail!("{origin} has no [sweep] section: add e.g. `[sweep]\\n\"rl.lr\" = [1e-3, 3e-3]`, or use --set sweep.KEY=[...]");
    }
    let points = config
        .expand_sweep()
        .map_err(|e| anyhow!("{origin}: {e}"))?;
    let root = args.out.join(format!("{}-sweep", config.name));
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
        let runner = Runner::create_limited(&root, point, args.max_memory)
            .map_err(|e| anyhow!("{e}"))?
            .on_nan(args.on_nan);
        execute(runner, args.device)?;
    }
    Ok(ExitCode::SUCCESS)
}
