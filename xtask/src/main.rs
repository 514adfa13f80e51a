//! `cargo xtask`: the goodhart command line.
//!
//! ```text
//! cargo xtask run [PRESET | FILE.toml] [--device cpu|wgpu|cuda[:N]]   run an experiment
//! cargo xtask list                                                     presets and every registered method
//! cargo xtask test [ARGS...]                                           all tests, on every available backend
//! cargo xtask bench [NAME...] [--device D]                             benchmarks
//! cargo xtask report RUN_DIR                                           write RUN_DIR/report.html
//! cargo xtask sweep                                                    (not implemented yet)
//! ```
//!
//! `cargo xtask` builds with the ndarray and wgpu backends, the same feature set as the
//! test binaries, so the two share one build of burn. For CUDA:
//! `cargo run -p xtask --features cuda -- run --device cuda`.

mod bench;
mod list;
mod report;
mod test;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use goodhart_core::device::DeviceSpec;

const USAGE: &str = "usage: cargo xtask <run|list|test|bench|sweep|report> [ARGS...]

  run [PRESET | FILE.toml] [--device cpu|wgpu|cuda[:N]]   run an experiment
  list                                                   presets and every registered method
  test [ARGS...]                                         all tests on ndarray, then on wgpu if a
                                                         Vulkan driver is present
  bench [NAME...] [--device D]                           benchmarks (`bench --list` names them)
  report RUN_DIR                                         write RUN_DIR/report.html, print its path";

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
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
        "run" => run(&rest),
        "list" => {
            list::print();
            Ok(ExitCode::SUCCESS)
        }
        "test" => test::run(&rest),
        "bench" => bench::run(&rest),
        "report" => report::run(&rest),
        "sweep" => not_implemented(&cmd),
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

fn run(args: &[String]) -> Result<ExitCode> {
    let mut args = args.to_vec();
    let device = take_device(&mut args)?;
    if !device.is_compiled() {
        bail!(goodhart_core::GoodhartError::BackendNotCompiled {
            backend: device.to_string(),
            feature: device.feature().into(),
        });
    }
    not_implemented("run")
}

fn not_implemented(cmd: &str) -> Result<ExitCode> {
    eprintln!(
        "`cargo xtask {cmd}` is not implemented yet: the experiment runner (environments, \
         training algorithms, presets, reports) is still to be written (issue: the goodhart lab)."
    );
    Ok(ExitCode::from(2))
}
