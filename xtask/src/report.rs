//! `cargo xtask report RUN_DIR`: (re)writes a run's self-contained `report.html` from its
//! `metrics.jsonl` and `summary.json` (see `goodhart_train::report`).

use std::{path::Path, process::ExitCode};

use anyhow::{anyhow, bail, Result};
use goodhart_train::{report::write_report, run_dir::RunDir};

/// Renders the report of the run directory in `args` and prints the report's path.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let [dir] = args else {
        bail!("usage: cargo xtask report RUN_DIR (e.g. runs/lab/s0)");
    };
    // The errors' messages already name the file, the line and the OS error; converting
    // them to text keeps `{:#}` from printing their source chain a second time.
    let run = RunDir::open(Path::new(dir)).map_err(|e| anyhow!("{e}"))?;
    let path = write_report(&run).map_err(|e| anyhow!("{e}"))?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
