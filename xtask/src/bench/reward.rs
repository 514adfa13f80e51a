//! goodhart-reward: reward-model training and scoring throughput.

use super::{time_median, Bench};
use anyhow::Result;
use burn::{module::AutodiffModule, tensor::backend::Backend};
use goodhart_core::{
    device::{dispatch, Autodiff, BackendJob, DeviceSpec},
    seed,
};
use goodhart_policy::TransformerConfig;
use goodhart_reward::{
    train::{raw_pair_scores, PreferencePair},
    train_reward_model, Preferences, RewardModelConfig, RewardTrainConfig,
};

pub const BENCHES: &[Bench] = &[
    Bench {
        name: "rm-train",
        about: "Bradley-Terry training of a 2-layer d64 reward model, 512 pairs of <=32 tokens, batch 32 (pairs/s)",
        run: train_bench,
    },
    Bench {
        name: "rm-score",
        about: "scoring 2048 responses of <=32 tokens with the same model, batch 256 (responses/s)",
        run: score_bench,
    },
    Bench {
        name: "unit-tests",
        about: "64 trivial Python programs against 3 tests each in the unit_tests sandbox, 1 and 4 workers (programs/s)",
        run: unit_tests_bench,
    },
];

/// Programs per second of the sandbox: startup, namespaces, harness and teardown.
fn unit_tests_bench(_: DeviceSpec) -> Result<()> {
    use goodhart_reward::unit_tests::{Sandbox, UnitTestsConfig};
    let jobs: Vec<(String, Vec<String>)> = (0..64)
        .map(|i| {
            (
                format!("def f(x):\n    return x + {i}\n"),
                (0..3)
                    .map(|t| format!("assert f({t}) == {}", t + i))
                    .collect(),
            )
        })
        .collect();
    for workers in [1, 4] {
        let sandbox = Sandbox::new(UnitTestsConfig {
            workers,
            ..Default::default()
        })?;
        let mut passed = 0.0;
        let t = time_median(3, || {
            let reports = sandbox.run_all(&jobs).expect("the sandbox runs");
            passed = reports.iter().map(|r| r.score()).sum::<f64>();
        });
        println!(
            "workers {workers}: {:.1} programs/s ({:.0} ms per batch of 64; sandboxed: {}, all passed: {})",
            64.0 / t,
            t * 1e3,
            sandbox.sandboxed(),
            passed == 64.0
        );
    }
    Ok(())
}

fn model_config() -> RewardModelConfig {
    RewardModelConfig::new(TransformerConfig::new(64, 64, 2, 4, 32))
}

/// Random pairs: a prompt of 8 tokens and two responses of 8..=24 tokens.
fn pairs(n: usize) -> Result<Preferences> {
    // Pseudo-random draws from the seed derivation (xtask has no rand dependency).
    let mut counter = 0u64;
    let mut draw = |n: u64| {
        counter += 1;
        seed::derive(counter, "bench/reward") % n
    };
    let mut seq = |lo: usize, hi: usize| -> Vec<u32> {
        let len = lo + draw((hi - lo + 1) as u64) as usize;
        (0..len).map(|_| 1 + draw(63) as u32).collect()
    };
    let pairs = (0..n)
        .map(|_| PreferencePair {
            prompt: seq(8, 8),
            chosen: seq(8, 24),
            rejected: seq(8, 24),
            margin: None,
        })
        .collect();
    Ok(Preferences::new(pairs)?)
}

fn train_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            let data = pairs(512)?;
            let config = RewardTrainConfig::default();
            let secs = time_median(3, || {
                let model = model_config()
                    .init::<Autodiff<B>>(&device)
                    .expect("valid config");
                let _ = train_reward_model(model, &data, None, &config).expect("trains");
            });
            println!(
                "  {} pairs, 1 epoch: {:.2} s, {:.0} pairs/s",
                data.len(),
                secs,
                data.len() as f64 / secs
            );
            Ok(())
        }
    }
    dispatch(device, Job)?
}

fn score_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            let data = pairs(1024)?;
            let model = model_config().init::<Autodiff<B>>(&device)?.valid();
            let secs = time_median(5, || {
                let (c, _) = raw_pair_scores(&model, &data, 128).expect("scores");
                let _ = c.sum().into_scalar();
            });
            let n = 2 * data.len();
            println!(
                "  {n} responses: {:.1} ms, {:.0} responses/s",
                secs * 1e3,
                n as f64 / secs
            );
            Ok(())
        }
    }
    dispatch(device, Job)?
}
