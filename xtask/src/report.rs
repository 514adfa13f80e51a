//! `cargo xtask report RUN_DIR`: (re)writes a run's self-contained `report.html` from its
//! `metrics.jsonl`, `summary.json` and `samples.jsonl` (see `goodhart_train::report`), and
//! with `--tensorboard DIR` TensorBoard event files of its metrics.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Result};
use goodhart_metrics::{sink::read_lines, tensorboard::export};
use goodhart_train::{report::write_report, run_dir::RunDir};

/// `cargo xtask report`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  cargo xtask report runs/lab/s0
  cargo xtask report runs/lab/s0 --tensorboard tb/lab   then: tensorboard --logdir tb")]
pub struct ReportArgs {
    /// A run directory
    #[arg(value_name = "RUN_DIR")]
    dir: PathBuf,
    /// Also write TensorBoard event files of metrics.jsonl under DIR (one TensorBoard run
    /// per experiment and series)
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
}

/// Renders the report of the run directory and prints the report's path.
pub fn run(args: ReportArgs) -> Result<ExitCode> {
    let dir = &args.dir;
    // The errors' messages already name the file, the line and the OS error; converting
    // them to text keeps `{:#}` from printing their source chain a second time.
    let run = RunDir::open(dir).map_err(|e| anyhow!("{e}"))?;
    let path = write_report(&run).map_err(|e| anyhow!("{e}"))?;
    println!("{}", path.display());
    if let Some(tb) = &args.tensorboard {
        let lines = read_lines(run.metrics()).map_err(|e| anyhow!("{e}"))?;
        for file in export(&lines, tb).map_err(|e| anyhow!("{e}"))? {
            println!("{}", file.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
