//! `cargo xtask bench`: throughput benchmarks.
//!
//! Benchmarks run in the same optimised profile and feature set as everything else (no
//! second build of burn). Each prints its figures; compare figures from one run only.

use std::{process::ExitCode, time::Instant};

use anyhow::{bail, Result};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use goodhart_core::{
    device::{dispatch, BackendJob, DeviceSpec},
    groups::Groups,
    ops::group_stats,
};

struct Bench {
    name: &'static str,
    about: &'static str,
    run: fn(DeviceSpec) -> Result<()>,
}

const BENCHES: &[Bench] = &[Bench {
    name: "group-stats",
    about: "per-group mean and variance of 1M rewards in 250k groups (scatter-add)",
    run: group_stats_bench,
}];

/// Runs the benchmarks named in `args` (all when none).
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut args = args.to_vec();
    let device = crate::take_device(&mut args)?;
    if args.iter().any(|a| a == "--list") {
        for b in BENCHES {
            println!("{:<16} {}", b.name, b.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    for name in &args {
        if !BENCHES.iter().any(|b| b.name == name) {
            bail!("unknown benchmark `{name}` (cargo xtask bench --list)");
        }
    }
    for b in BENCHES
        .iter()
        .filter(|b| args.is_empty() || args.iter().any(|a| a == b.name))
    {
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

fn group_stats_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            let n = 1 << 20;
            let groups = Groups::contiguous(n / 4, 4)?;
            let r = Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
            let secs = time_median(5, || {
                let s = group_stats(r.clone(), &groups).expect("lengths match");
                let _ = s.var(true).sum().into_scalar();
            });
            println!(
                "  {n} responses: {:.1} ms, {:.1} M responses/s",
                secs * 1e3,
                n as f64 / secs / 1e6
            );
            Ok(())
        }
    }
    dispatch(device, Job)?
}
