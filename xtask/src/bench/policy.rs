//! goodhart-policy: generation (with and without the KV cache) and training throughput.

use anyhow::Result;
use burn::{
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{backend::Backend, Distribution, Int, Tensor},
};
use goodhart_core::{
    device::{dispatch, Autodiff, BackendJob, DeviceSpec},
    seed,
};
use goodhart_policy::{generate, sft, GenerationConfig, Positions, TransformerConfig};

use super::{time_median, Bench};

pub const BENCHES: &[Bench] = &[
    Bench {
        name: "policy-generate",
        about: "tokens/s sampling 64 and 256 tokens, KV cache vs recompute (small LM)",
        run: generate_bench,
    },
    Bench {
        name: "policy-train",
        about: "tokens/s of one SFT step (forward + backward + AdamW), small LM, batch 64 x 64",
        run: train_bench,
    },
];

/// The named small config: 4 layers, width 128, 4 heads, vocabulary 64, rotary positions.
fn small(max_seq_len: usize) -> TransformerConfig {
    TransformerConfig::new(64, 128, 4, 4, max_seq_len).with_positions(Positions::Rotary)
}

fn generate_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            let (batch, prompt_len) = (16, 8);
            B::seed(&device, 0);
            let model = small(prompt_len + 256).init::<B>(&device)?;
            let prompt = Tensor::<B, 2, Int>::random(
                [batch, prompt_len],
                Distribution::Uniform(0.0, 64.0),
                &device,
            );
            let mask = Tensor::<B, 2>::ones([batch, prompt_len], &device);
            for len in [64, 256] {
                let mut rates = Vec::new();
                for use_cache in [true, false] {
                    let cfg = GenerationConfig::new(len).with_use_cache(use_cache);
                    let mut rng = seed::rng(0, "sample");
                    let reps = if use_cache { 3 } else { 1 };
                    let secs = time_median(reps, || {
                        let g = generate(&model, prompt.clone(), mask.clone(), &cfg, &mut rng)
                            .expect("valid generation");
                        let _ = g.logprobs.sum().into_scalar();
                    });
                    let rate = (batch * len) as f64 / secs;
                    println!(
                        "  batch {batch}, {len} new tokens, cache {use_cache:>5}: {:8.1} ms, {rate:9.0} tokens/s",
                        secs * 1e3
                    );
                    rates.push(rate);
                }
                println!(
                    "  speed-up of the KV cache at {len} tokens: {:.1}x",
                    rates[0] / rates[1]
                );
            }
            Ok(())
        }
    }
    dispatch(device, Job)?
}

fn train_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            type A<B> = Autodiff<B>;
            let (batch, len) = (64, 64);
            B::seed(&device, 0);
            let mut model = Some(small(len).init::<A<B>>(&device)?);
            let mut optim = AdamWConfig::new().init();
            let data: Vec<sft::SftExample> = (0..batch)
                .map(|i| sft::SftExample::new((0..len).map(|t| (i * 7 + t * 3) % 64).collect()))
                .collect();
            let refs: Vec<&sft::SftExample> = data.iter().collect();
            let b = sft::collate::<A<B>>(&refs, 0, &device)?;
            let secs = time_median(5, || {
                let m = model.take().expect("model");
                let loss = sft::nll(&m, &b).expect("valid batch");
                let grads = GradientsParams::from_grads(loss.backward(), &m);
                let m = optim.step(1e-3, m, grads);
                let _ = m.trunk.norm_f.gamma.val().sum().into_scalar();
                model = Some(m);
            });
            println!(
                "  4 layers, width 128, 4 heads, vocab 64, batch {batch} x {len}: {:.1} ms/step, {:.0} tokens/s",
                secs * 1e3,
                (batch * len) as f64 / secs
            );
            Ok(())
        }
    }
    dispatch(device, Job)?
}
