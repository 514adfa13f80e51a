//! `cargo xtask`: the goodhart command line.
//!
//! Subcommands (`cargo xtask --help`, `cargo xtask <command> --help` for each one's flags
//! and an example): `run`, `sweep`, `list`, `test`, `bench`, `report`, `detect`, `fuzz`,
//! `generate`, `serve`, `completions`. The arguments are parsed by clap (derive).
//!
//! `cargo xtask` builds with the ndarray and wgpu backends, the same feature set as the
//! test binaries, so the two share one build of burn. For CUDA:
//! `cargo run -p xtask --features cuda -- run --device cuda`.

/// mimalloc, and it keeps what is freed for reuse (see `main`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, v3): -1 never returns freed memory to
/// the OS. burn-flex allocates every op's output afresh; returned memory comes back as new
/// zeroed pages (35,000 page faults per `bench policy` at config S, 1,000 without).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

mod bench;
mod detect;
mod fuzz;
mod generate;
mod list;
mod progress;
mod report;
mod run;
mod serve;
mod test;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use goodhart_core::device::DeviceSpec;

/// The goodhart command line: experiments, benchmarks, tests, detectors and models.
#[derive(Parser, Debug)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    version,
    after_help = "Examples:
  cargo xtask run                        the default preset (lab)
  cargo xtask run rubric --seed 1        a preset with another seed
  cargo xtask run my.toml --set rl.lr=1e-3 --device wgpu
  cargo xtask list                       presets and every method name
  cargo xtask completions bash > ~/.local/share/bash-completion/completions/cargo-xtask"
)]
struct Cli {
    /// Log what runs do on stderr: -v stages, -vv every metrics line (RUST_LOG, when set,
    /// decides instead, e.g. RUST_LOG=goodhart_train=debug)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// `tracing`'s logs on stderr: RUST_LOG's filter when set, else warnings, with `-v` the
/// library's info events (stages), with `-vv` its debug events (every metrics line).
fn logs(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(match verbose {
            0 => "warn",
            1 => "warn,goodhart_train=info",
            _ => "warn,goodhart_train=debug",
        })
    });
    // Only this call installs a subscriber; were one there, its logs would stay.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run an experiment: a preset or a TOML file (default preset: lab)
    Run(run::RunArgs),
    /// One run per point of the config's [sweep] section
    Sweep(run::SweepArgs),
    /// The presets and every registered method
    List,
    /// All tests on ndarray, then the backend tests on wgpu when a Vulkan driver is present
    Test(test::TestArgs),
    /// Throughput benchmarks (`bench --list` names them; `bench policy` against PyTorch)
    Bench(bench::BenchArgs),
    /// Write RUN_DIR/report.html and print its path
    Report(report::ReportArgs),
    /// A hacking detector on a training log (JSONL or CSV, any trainer's)
    Detect(detect::DetectArgs),
    /// The cargo-fuzz targets (nightly; not in CI)
    Fuzz(fuzz::FuzzArgs),
    /// What a Hugging Face model directory writes after a prompt
    Generate(generate::GenerateArgs),
    /// An OpenAI-compatible server over a model directory
    Serve(serve::ServeArgs),
    /// Shell completions for `cargo xtask` (bash, zsh, fish, elvish, powershell)
    #[command(
        after_help = "Example:\n  cargo xtask completions bash > ~/.local/share/bash-completion/completions/cargo-xtask"
    )]
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

/// The device flag every command that computes takes.
#[derive(clap::Args, Debug, Clone, Copy)]
pub(crate) struct DeviceArg {
    /// The backend: cpu, wgpu[:N] or cuda[:N]
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceSpec,
}

/// A positive integer (a clap value parser).
pub(crate) fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("`{s}` is not a positive integer")),
    }
}

/// A finite number (a clap value parser).
pub(crate) fn finite(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() => Ok(x),
        _ => Err(format!("`{s}` is not a finite number")),
    }
}

/// The first panic's message and place since the last [`take_panic`], kept by [`main`]'s
/// hook (a GPU runtime's worker thread often panics first, with the reason).
static FIRST_PANIC: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// The message of the first panic since the last call, if any.
pub(crate) fn take_panic() -> Option<String> {
    FIRST_PANIC.lock().ok().and_then(|mut p| p.take())
}

/// Runs the command; an error, or a panic in a dependency (burn, cubecl, a GPU runtime),
/// ends it with one `error:` line. With `RUST_BACKTRACE` set, panics print as usual.
fn main() -> ExitCode {
    // SAFETY: sets one of mimalloc's options; no allocation is in flight.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    // Rust ignores SIGPIPE, so printing into a closed pipe (`| head`) would panic; the
    // default action ends the process quietly, as for any Unix tool.
    // SAFETY: restores a signal's default disposition before any thread starts.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if std::env::var_os("RUST_BACKTRACE").is_none() {
        std::panic::set_hook(Box::new(|info| {
            if let Ok(mut first) = FIRST_PANIC.lock() {
                first.get_or_insert_with(|| info.to_string());
            }
        }));
    }
    match std::panic::catch_unwind(real_main) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(_) => {
            let what = take_panic().unwrap_or_else(|| "no message".into());
            eprintln!(
                "error: internal panic ({what}); the run directory, if any, can be resumed \
                 with --resume; set RUST_BACKTRACE=1 for a backtrace"
            );
            ExitCode::from(101)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    // Errors and `--help` print in clap's style and exit (2 for a usage error).
    let cli = Cli::parse();
    logs(cli.verbose);
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Sweep(args) => run::sweep(args),
        Command::List => {
            list::print();
            Ok(ExitCode::SUCCESS)
        }
        Command::Test(_) => {
            // clap drops a leading `--`; `cargo test` needs it (what follows goes to the
            // test binaries), so the words after `test` are passed on as typed.
            let raw: Vec<String> = std::env::args()
                .skip(1)
                .skip_while(|a| a != "test")
                .skip(1)
                .collect();
            test::run(&raw)
        }
        Command::Bench(args) => bench::run(args),
        Command::Report(args) => report::run(args),
        Command::Detect(args) => detect::run(args),
        Command::Fuzz(args) => fuzz::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "cargo-xtask",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A `cargo` command (the `cargo` running xtask, when known) in the environment a `cargo`
/// typed in the shell gets: without the variables `cargo run` sets for xtask itself
/// (`CARGO_PKG_*`, `CARGO_MANIFEST_DIR`, ...). Build scripts that watch them (ring's)
/// would otherwise see them change and rebuild their crate and every crate above it, once
/// for `cargo xtask test` and again for the next plain `cargo test`.
pub(crate) fn cargo_command() -> std::process::Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_run = key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "OUT_DIR"
            );
        if set_by_cargo_run {
            cmd.env_remove(key);
        }
    }
    cmd
}
