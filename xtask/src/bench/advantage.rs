//! goodhart-advantage: GRPO, RLOO and GAE throughput.

use anyhow::Result;
use burn::tensor::{backend::Backend, Distribution, Tensor};
use goodhart_advantage::{
    gae::{gae, GaeConfig},
    grpo::{grpo, GrpoConfig},
    rloo::{rloo, RlooConfig},
    AdvantageOutput,
};
use goodhart_core::{
    device::{dispatch, BackendJob, DeviceSpec},
    groups::Groups,
};

use super::{time_median, Bench};

/// Responses per batch (1M) and tokens per response.
const N: usize = 1 << 20;
const T: usize = 64;
/// Responses per prompt.
const GROUP: usize = 8;

pub const BENCHES: &[Bench] = &[
    Bench {
        name: "grpo",
        about: "GRPO on 1M responses in groups of 8, broadcast over 1M x 64 tokens",
        run: |d| outcome_bench(d, Outcome::Grpo),
    },
    Bench {
        name: "rloo",
        about: "RLOO on 1M responses in groups of 8, broadcast over 1M x 64 tokens",
        run: |d| outcome_bench(d, Outcome::Rloo),
    },
    Bench {
        name: "gae",
        about: "GAE (gamma 1, lambda 0.95, whitened) on 1M x 64 = 64M tokens",
        run: gae_bench,
    },
];

#[derive(Clone, Copy)]
enum Outcome {
    Grpo,
    Rloo,
}

/// Forces the computation and reads one scalar back, so lazy backends do the work.
fn sync<B: Backend>(out: AdvantageOutput<B>) {
    let _ = out.advantages.sum().into_scalar();
}

fn report(secs: f64, tokens: usize) {
    println!(
        "  {N} responses x {T} tokens: {:.1} ms, {:.2} M responses/s, {:.1} M tokens/s",
        secs * 1e3,
        N as f64 / secs / 1e6,
        tokens as f64 / secs / 1e6
    );
}

/// A right-padded mask with lengths spread over 1..=T.
fn ragged_mask<B: Backend>(device: &B::Device) -> Tensor<B, 2> {
    let len = Tensor::<B, 1>::random([N], Distribution::Uniform(1.0, T as f64 + 1.0), device)
        .floor()
        .reshape([N, 1]);
    let pos = Tensor::<B, 1, burn::tensor::Int>::arange(0..T as i64, device)
        .float()
        .reshape([1, T]);
    pos.lower(len).float()
}

fn outcome_bench(device: DeviceSpec, which: Outcome) -> Result<()> {
    struct Job(Outcome);
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            let groups = Groups::contiguous(N / GROUP, GROUP)?;
            let r = Tensor::<B, 1>::random([N], Distribution::Bernoulli(0.4), &device);
            let mask = ragged_mask::<B>(&device);
            let tokens = mask.clone().sum().into_scalar().to_f64_lossy() as usize;
            let secs = time_median(5, || {
                let out = match self.0 {
                    Outcome::Grpo => grpo(r.clone(), &mask, &groups, &GrpoConfig::default()),
                    Outcome::Rloo => rloo(r.clone(), &mask, &groups, &RlooConfig::default()),
                };
                sync(out.expect("valid inputs"));
            });
            report(secs, tokens);
            Ok(())
        }
    }
    dispatch(device, Job(which))?
}

fn gae_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            let mask = ragged_mask::<B>(&device);
            let r = Tensor::<B, 2>::random([N, T], Distribution::Normal(0.0, 1.0), &device);
            let v = Tensor::<B, 2>::random([N, T], Distribution::Normal(0.0, 1.0), &device);
            let tokens = mask.clone().sum().into_scalar().to_f64_lossy() as usize;
            let cfg = GaeConfig {
                lambda: 0.95,
                ..GaeConfig::default()
            };
            let secs = time_median(3, || {
                sync(gae(r.clone(), v.clone(), &mask, &cfg).expect("valid inputs"));
            });
            report(secs, tokens);
            Ok(())
        }
    }
    dispatch(device, Job)?
}

/// `f64` of a backend scalar.
trait ToF64 {
    fn to_f64_lossy(self) -> f64;
}

impl<E: burn::tensor::ElementConversion> ToF64 for E {
    fn to_f64_lossy(self) -> f64 {
        self.elem::<f64>()
    }
}
