//! `cargo xtask`: the goodhart command line.
//!
//! ```text
//! cargo xtask run [PRESET | FILE.toml] [--device cpu|wgpu|cuda[:N]] [--set k=v]... [--seed N]
//!                 [--out DIR] [--resume RUN_DIR [--no-repair] [--rerun-changed]]
//!                 [--max-memory GIB] [--on-nan error|skip-batch]       run an experiment (default: lab)
//! cargo xtask list                                                     presets and every registered method
//! cargo xtask test [ARGS...]                                           all tests, on every available backend
//! cargo xtask bench [NAME...] [--device D]                             benchmarks
//! cargo xtask report RUN_DIR                                           write RUN_DIR/report.html
//! cargo xtask fuzz [TARGET...] [--runs N]                              the cargo-fuzz targets (nightly)
//! cargo xtask generate MODEL_DIR --prompt TEXT [--chat] [--json] ...   what a model writes after a prompt
//! cargo xtask sweep [PRESET | FILE.toml] [--set k=v]... [--device D]  one run per [sweep] point
//! cargo xtask detect LOG --map SIGNAL=COLUMN... [--gold COLUMN] [--json] a detector on any trainer's log
//! ```
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
mod report;
mod run;
mod serve;
mod test;

use std::process::ExitCode;

use anyhow::{Context, Result};
use goodhart_core::device::DeviceSpec;

const USAGE: &str =
    "usage: cargo xtask <run|list|test|bench|sweep|report|detect|fuzz|generate|serve> [ARGS...]

  run [PRESET | FILE.toml] [--device cpu|wgpu|cuda[:N]] [--set key=value]... [--seed N]
      [--out DIR] [--resume RUN_DIR [--no-repair] [--rerun-changed]]
      [--max-memory GIB] [--on-nan error|skip-batch]     run an experiment (default preset: lab)
  sweep [PRESET | FILE.toml] [--set key=value]...        one run per point of the [sweep] section
  list                                                   presets and every registered method
  test [ARGS...]                                         all tests on ndarray, then on wgpu if a
                                                         Vulkan driver is present
  bench [NAME...] [--device D]                           benchmarks (`bench --list` names them)
  report RUN_DIR                                         write RUN_DIR/report.html, print its path
  detect LOG --map SIGNAL[=COLUMN]... [--gold COLUMN]    a hacking detector on a training log
      [--format jsonl|csv] [--step-key KEY] [--json]     (JSONL or CSV, any trainer's: `detect --help`)
  fuzz [TARGET...] [--runs N]                            the cargo-fuzz targets (nightly; not in CI)
  generate MODEL_DIR --prompt TEXT [--chat] [--json]     what a Hugging Face model directory writes
      [--max-new-tokens N] [--greedy | --temperature T   after a prompt (`generate --help`)
      --top-p P --top-k K] [--seed N] [--device D]
  serve MODEL_DIR [--port P] [--host H] [--name NAME]    an OpenAI-compatible server over a model
      [--device D]                                       directory (`serve --help`)";

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
    let mut args = std::env::args().skip(1);
    let Some(cmd) = args.next() else {
        eprintln!("{USAGE}");
        return Ok(ExitCode::from(2));
    };
    let rest: Vec<String> = args.collect();
    match cmd.as_str() {
        "run" => run::run(&rest),
        "list" => {
            list::print();
            Ok(ExitCode::SUCCESS)
        }
        "test" => test::run(&rest),
        "bench" => bench::run(&rest),
        "report" => report::run(&rest),
        "detect" => detect::run(&rest),
        "sweep" => run::sweep(&rest),
        "fuzz" => fuzz::run(&rest),
        "generate" => generate::run(&rest),
        "serve" => serve::run(&rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => {
            eprintln!("unknown subcommand `{other}`\n{USAGE}");
            Ok(ExitCode::from(2))
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

/// Takes `--device VALUE` / `--device=VALUE` out of `args`.
pub(crate) fn take_device(args: &mut Vec<String>) -> Result<DeviceSpec> {
    let mut spec = DeviceSpec::Cpu;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--device" {
            let v = args
                .get(i + 1)
                .context("--device needs a value: cpu, wgpu[:N] or cuda[:N]")?;
            spec = v.parse()?;
            args.drain(i..i + 2);
        } else if let Some(v) = args[i].strip_prefix("--device=") {
            spec = v.parse()?;
            args.remove(i);
        } else {
            i += 1;
        }
    }
    Ok(spec)
}
