//! `cargo xtask fuzz [TARGET...] [--runs N]`: runs the cargo-fuzz targets in
//! `fuzz/` (the config parser with `--set` overrides, the run directory's JSON readers,
//! the checkpoint loader) for `--runs` inputs each (default 1,000,000), starting from and
//! adding to the kept corpus `fuzz/corpus/<target>`. A crash leaves its input in
//! `fuzz/artifacts/<target>/` and fails the command. Needs a nightly toolchain and
//! `cargo install cargo-fuzz`; not part of `cargo xtask test` or CI.

use std::{path::Path, process::Command};

use anyhow::{bail, Context, Result};

/// The targets, in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 3] = ["config", "jsonl", "checkpoint"];

/// `cargo xtask fuzz`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  cargo xtask fuzz config --runs 100000")]
pub struct FuzzArgs {
    /// The targets [default: all]
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// Inputs per target
    #[arg(long, default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..))]
    runs: u64,
}

pub fn run(args: FuzzArgs) -> Result<std::process::ExitCode> {
    let runs = args.runs;
    let mut targets = args.targets;
    if targets.is_empty() {
        targets = TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let probe = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .current_dir(&root)
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        bail!("cargo-fuzz on a nightly toolchain is needed: `rustup toolchain install nightly` and `cargo install cargo-fuzz`");
    }
    for target in &targets {
        let corpus = root.join("fuzz").join("corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        println!("== fuzz {target}: {runs} inputs from {}", corpus.display());
        // No sanitizer: the crates are safe Rust, and the targets look for panics and
        // aborts, which libFuzzer catches alone; the build is then about twice as fast.
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "--sanitizer", "none", target])
            .arg(&corpus)
            .args([
                "--",
                &format!("-runs={runs}"),
                "-rss_limit_mb=4096",
                "-max_len=65536",
            ])
            .current_dir(&root)
            .status()
            .context("running cargo fuzz")?;
        if !status.success() {
            bail!("fuzz target `{target}` failed: its input is in fuzz/artifacts/{target}/");
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}
