//! `cargo xtask test`: every test on ndarray, then the backend-matrix tests on wgpu, then
//! the doc tests, then every crate's examples (built with the tests' feature set, each run
//! and checked for a zero exit).

use std::{path::Path, process::ExitCode};

use anyhow::{Context, Result};
use goodhart_core::testing::{BACKEND_TEST_FILTER, TEST_DEVICE_ENV};

/// `cargo xtask test`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  cargo xtask test                             every test, ndarray then wgpu
  cargo xtask test -- tiny_rubric              the tests whose names contain tiny_rubric
  cargo xtask test --no-fail-fast -- --nocapture")]
pub struct TestArgs {
    /// Passed to `cargo test` as typed (those after `--` to the test binaries)
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    args: Vec<String>,
}

/// Runs the workspace tests; extra `args` go to `cargo test` (before any `--`).
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut report = Vec::new();
    let cpu_ok = cargo_test(args, "cpu", None)?;
    report.push(format!("ndarray (cpu): {}", verdict(cpu_ok)));
    let mut all_ok = cpu_ok;
    match vulkan_driver() {
        Ok(icd) => {
            println!("\n== backend-matrix tests on wgpu (Vulkan driver: {icd})");
            let ok = cargo_test(args, "wgpu", Some(BACKEND_TEST_FILTER))?;
            report.push(format!("wgpu (Vulkan, {icd}): {}", verdict(ok)));
            all_ok &= ok;
        }
        Err(why) => {
            report.push(format!("wgpu: skipped, {why}"));
        }
    }
    if args.is_empty() {
        let ok = run_doctests()?;
        report.push(format!("doc tests (on cpu): {}", verdict(ok)));
        all_ok &= ok;
        let (ok, n) = run_examples()?;
        report.push(format!("examples ({n}, on cpu): {}", verdict(ok)));
        all_ok &= ok;
    } else {
        report.push("doc tests and examples: skipped (test arguments given)".into());
    }
    report.push(format!(
        "cuda: {}",
        if cfg!(feature = "cuda") {
            "compiled in; not run by `xtask test` (run the suite with GOODHART_TEST_DEVICE=cuda)"
        } else {
            "not compiled in (feature `cuda`)"
        }
    ));
    println!("\n== backends");
    for line in &report {
        println!("  {line}");
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "passed"
    } else {
        "FAILED"
    }
}

fn cargo_test(args: &[String], device: &str, filter: Option<&str>) -> Result<bool> {
    let (cargo_args, test_args) = match args.iter().position(|a| a == "--") {
        Some(i) => (&args[..i], &args[i + 1..]),
        None => (args, &[][..]),
    };
    let mut cmd = crate::cargo_command();
    // Library, binary and integration tests; the doc tests run once, on the CPU
    // ([`run_doctests`]).
    cmd.args([
        "test",
        "--workspace",
        "--lib",
        "--bins",
        "--tests",
        "--no-fail-fast",
    ])
    .args(cargo_args)
    .arg("--")
    .args(test_args)
    .env(TEST_DEVICE_ENV, device);
    if let Some(f) = filter {
        cmd.arg(f);
    }
    println!("== {TEST_DEVICE_ENV}={device} {cmd:?}");
    let status = cmd.status().context("running cargo test")?;
    Ok(status.success())
}

/// Runs the public items' examples in the docs (`cargo test --doc`); whether all passed.
fn run_doctests() -> Result<bool> {
    let mut cmd = crate::cargo_command();
    cmd.args(["test", "--workspace", "--doc", "--no-fail-fast"])
        .env(TEST_DEVICE_ENV, "cpu");
    println!("\n== doc tests: {cmd:?}");
    Ok(cmd.status().context("running the doc tests")?.success())
}

/// Builds every crate's examples (`crates/*/examples/*.rs`) with the tests' feature set
/// (one build of burn) and runs each; whether all exit 0, and how many there are.
fn run_examples() -> Result<(bool, usize)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut names = Vec::new();
    for krate in std::fs::read_dir(root.join("crates")).context("listing crates/")? {
        let dir = krate?.path().join("examples");
        let Ok(files) = std::fs::read_dir(&dir) else {
            continue;
        };
        for f in files {
            let path = f?.path();
            if path.extension().is_some_and(|e| e == "rs") {
                if let Some(stem) = path.file_stem() {
                    names.push(stem.to_string_lossy().into_owned());
                }
            }
        }
    }
    names.sort();
    println!("\n== examples: {}", names.join(", "));
    let mut cmd = crate::cargo_command();
    cmd.args(["build", "--workspace", "--examples"])
        .current_dir(&root);
    if !cmd.status().context("building the examples")?.success() {
        return Ok((false, names.len()));
    }
    // This binary's own profile directory holds them (`target/<profile>/examples/`).
    let exe = std::env::current_exe().context("locating xtask")?;
    let dir = exe.parent().context("xtask's directory")?.join("examples");
    let mut ok = true;
    for name in &names {
        println!("== example {name}");
        let status = std::process::Command::new(dir.join(name))
            .current_dir(&root)
            .status()
            .with_context(|| format!("running example {name}"))?;
        if !status.success() {
            println!("== example {name} FAILED ({status})");
            ok = false;
        }
    }
    Ok((ok, names.len()))
}

/// The Vulkan ICD manifest wgpu would load, or why there is none.
fn vulkan_driver() -> Result<String, String> {
    let loader = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib/x86_64-linux-gnu",
    ]
    .iter()
    .any(|d| Path::new(d).join("libvulkan.so.1").exists());
    if !loader {
        return Err("no Vulkan loader (libvulkan.so.1); on Debian: apt-get install libvulkan1 mesa-vulkan-drivers".into());
    }
    let dirs: Vec<String> =
        match std::env::var("VK_ICD_FILENAMES").or_else(|_| std::env::var("VK_DRIVER_FILES")) {
            Ok(files) if !files.is_empty() => return Ok(files),
            _ => [
                "/usr/share/vulkan/icd.d",
                "/etc/vulkan/icd.d",
                "/usr/local/share/vulkan/icd.d",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        };
    let icds: Vec<String> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    if icds.is_empty() {
        Err(
            "no Vulkan driver (ICD) installed; on Debian: apt-get install mesa-vulkan-drivers"
                .into(),
        )
    } else {
        Ok(icds.join(", "))
    }
}
