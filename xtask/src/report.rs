//! `cargo xtask report RUN_DIR`: (re)writes a run's self-contained `report.html` from its
//! `metrics.jsonl` and `summary.json` (see `goodhart_train::report`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Result};
use goodhart_train::{report::write_report, run_dir::RunDir};

/// `cargo xtask report`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  cargo xtask report runs/lab/s0")]
pub struct ReportArgs {
    /// A run directory
    #[arg(value_name = "RUN_DIR")]
    dir: PathBuf,
}

/// Renders the report of the run directory and prints the report's path.
pub fn run(args: ReportArgs) -> Result<ExitCode> {
    let dir = &args.dir;
    // The errors' messages already name the file, the line and the OS error; converting
    // them to text keeps `{:#}` from printing their source chain a second time.
    let run = RunDir::open(dir).map_err(|e| anyhow!("{e}"))?;
    let path = write_report(&run).map_err(|e| anyhow!("{e}"))?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
