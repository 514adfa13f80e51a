//! goodhart-core: grouped statistics.

use anyhow::Result;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use goodhart_core::{
    device::{dispatch, BackendJob, DeviceSpec},
    groups::Groups,
    ops::group_stats,
};

use super::{time_median, Bench};

pub const BENCHES: &[Bench] = &[Bench {
    name: "group-stats",
    about: "per-group mean and variance of 1M rewards in 256k groups (scatter-add)",
    run: group_stats_bench,
}];

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
