//! `cargo xtask bench`: throughput benchmarks.
//!
//! Benchmarks run in the same optimised profile and feature set as everything else (no
//! second build of burn). Each prints its figures; compare figures from one run only.

use std::{process::ExitCode, time::Instant};

use anyhow::{bail, Result};
use goodhart_core::device::DeviceSpec;

mod advantage;
mod core;
mod policy;
mod reward;
mod train;

/// One benchmark: a name for the command line, a line for `--list`, and its body.
pub struct Bench {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(DeviceSpec) -> Result<()>,
}

/// Every benchmark, one module per crate.
const BENCHES: &[&[Bench]] = &[
    core::BENCHES,
    advantage::BENCHES,
    policy::BENCHES,
    reward::BENCHES,
    train::BENCHES,
];

/// `cargo xtask bench`.
#[derive(clap::Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Examples:
  cargo xtask bench --list                     the benchmarks
  cargo xtask bench grpo rloo                  two of them
  cargo xtask bench policy --vs-torch          the policy against PyTorch eager (`bench policy --help`)"
)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Option<BenchCommand>,
    /// The benchmarks to run [default: all]
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Name every benchmark and what it measures
    #[arg(long)]
    list: bool,
    #[command(flatten)]
    device: crate::DeviceArg,
}

#[derive(clap::Subcommand, Debug)]
enum BenchCommand {
    /// The policy LM at a chosen shape, or a Hugging Face architecture, optionally
    /// against its PyTorch twin
    Policy(policy::PolicyArgs),
}

/// Runs the benchmarks named in `args` (all when none).
pub fn run(args: BenchArgs) -> Result<ExitCode> {
    if let Some(BenchCommand::Policy(p)) = args.command {
        policy::command(p)?;
        return Ok(ExitCode::SUCCESS);
    }
    let device = args.device.device;
    if args.list {
        for b in BENCHES.iter().copied().flatten() {
            println!("{:<16} {}", b.name, b.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    for name in &args.names {
        if !BENCHES.iter().copied().flatten().any(|b| b.name == name) {
            bail!("unknown benchmark `{name}` (cargo xtask bench --list)");
        }
    }
    let selected = BENCHES.iter().copied().flatten();
    for b in selected.filter(|b| args.names.is_empty() || args.names.iter().any(|a| a == b.name)) {
        println!("== {} on {device}: {}", b.name, b.about);
        (b.run)(device)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Median wall time of `reps` calls of `f` (after one warm-up call), in seconds.
pub fn time_median(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}
