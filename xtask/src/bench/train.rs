//! goodhart-train: the RL trainer's own cost, beside the model work of one step.

use std::time::Instant;

use anyhow::Result;
use burn::{
    module::AutodiffModule,
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{backend::Backend, Int, Tensor, TensorData},
};
use goodhart_core::{
    device::{dispatch, Autodiff, BackendJob, DeviceSpec},
    params::clip_grad_norm,
    seed,
};
use goodhart_envs::language::{Language, EOS, PAD};
use goodhart_policy::{generate, score, GenerationConfig};
use goodhart_reward::{Aggregator, RewardSource, Sequences};
use goodhart_train::{
    policy_gradient::{proxy, train, LanguageGold, RlConfig, StepTimings},
    reward_model::ProxyConfig,
    sft::{lab_language, SftConfig, PROMPT_LEN},
    task::LanguageTask,
};

use super::Bench;

pub const BENCHES: &[Bench] = &[Bench {
    name: "rl-overhead",
    about: "one RL step at the overopt preset's size vs its model work alone (sampling, scoring, forward, backward, AdamW)",
    run: overhead_bench,
}];

fn overhead_bench(device: DeviceSpec) -> Result<()> {
    struct Job;
    impl BackendJob for Job {
        type Output = Result<()>;
        fn run<B: Backend>(self, device: B::Device) -> Result<()> {
            type A<B> = Autodiff<B>;
            let lang = Language::new(lab_language())?;
            let (sft, rm) = (SftConfig::default(), ProxyConfig::default());
            let (policy, reward_model) = seed::seeded::<A<B>, _>(&device, 0, "bench", || {
                Ok::<_, goodhart_core::GoodhartError>((
                    sft.model(&lang).init::<A<B>>(&device)?,
                    rm.model(&lang).init::<B>(&device)?,
                ))
            })?;
            let reference = policy.valid();
            let proxy = proxy(vec![reward_model], Aggregator::Mean)?;
            let gold = LanguageGold::new(&lang);
            let cfg = RlConfig::default();
            let (n, reps) = (cfg.prompts_per_step * cfg.group_size, 7);

            // Two measures. The trainer's own: each step times its phases (sampling, forward
            // passes, forward + backward + AdamW) and the rest is overhead. Independent of
            // it: the trainer's step is the wall time between its second and third step lines
            // (the first includes the setup). The model work alone: sample the batch,
            // score it by the proxy, score it under the sampler and the reference, one
            // forward and backward of the policy, the global clip and an AdamW step.
            // Measured alternately, `reps` times each, so a change in the machine's load
            // falls on both.
            let run = RlConfig {
                steps: 3,
                ..cfg.clone()
            };
            let generation = GenerationConfig::new(cfg.max_new_tokens)
                .with_eos_id(Some(EOS as usize))
                .with_pad_id(PAD as usize);
            let ids: Vec<i64> = (0..n)
                .flat_map(|i| lang.prompt(i % lang.config().topics))
                .map(i64::from)
                .collect();
            let prompt =
                Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [n, PROMPT_LEN]), &device);
            let mut rng = seed::rng(0, "bench/sample");
            let mut optim = AdamWConfig::new().init();
            let mut model = Some(policy.clone());
            let (mut steps, mut works, mut timed) = (Vec::new(), Vec::new(), Vec::new());
            for rep in 0..reps {
                let mut stamps = Vec::new();
                train::<A<B>>(
                    &run,
                    &LanguageTask::new(&lang, &proxy, &gold),
                    policy.clone(),
                    &reference,
                    rep as u64,
                    &device,
                    &mut |line| {
                        stamps.push(Instant::now());
                        if line.step > 0 {
                            timed.push(line.timings);
                        }
                        Ok(())
                    },
                )?;
                steps.push((stamps[2] - stamps[1]).as_secs_f64());
                let t0 = Instant::now();
                {
                    let m = model.take().expect("model");
                    let sampler = m.valid();
                    let g = generate(
                        &sampler,
                        prompt.clone(),
                        Tensor::ones([n, PROMPT_LEN], &device),
                        &generation,
                        &mut rng,
                    )
                    .expect("valid generation");
                    let batch = Sequences::new(
                        g.tokens.clone(),
                        g.attention_mask.clone(),
                        g.response_mask.clone(),
                    )
                    .expect("valid batch");
                    let r = proxy.score(&batch).expect("valid batch").reward;
                    let old = score(&sampler, g.tokens.clone(), g.attention_mask.clone(), 1.0)
                        .expect("scores");
                    let lr = score(&reference, g.tokens.clone(), g.attention_mask.clone(), 1.0)
                        .expect("scores");
                    let tokens = Tensor::<A<B>, 2, Int>::from_inner(g.tokens);
                    let attention = Tensor::<A<B>, 2>::from_inner(g.attention_mask);
                    let lp = score(&m, tokens, attention, 1.0).expect("scores").logprobs;
                    let mask = Tensor::<A<B>, 2>::from_inner(g.response_mask);
                    let loss = (lp * mask).sum();
                    let grads = GradientsParams::from_grads(loss.backward(), &m);
                    let (grads, _) = clip_grad_norm(&m, grads, 1.0).expect("finite gradients");
                    let m = optim.step(cfg.lr, m, grads);
                    let _ = (r.sum() + old.logprobs.sum() + lr.logprobs.sum()).into_scalar();
                    let _ = m.trunk.norm_f.gamma.val().sum().into_scalar();
                    model = Some(m);
                }
                works.push(t0.elapsed().as_secs_f64());
            }
            let sorted = |mut v: Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v
            };
            // The trainer's own account: each step's phases, timed inside the step.
            let share = sorted(timed.iter().map(|t| t.overhead() / t.total).collect());
            let mean = |f: fn(&StepTimings) -> f64| {
                timed.iter().map(f).sum::<f64>() / timed.len() as f64 * 1e3
            };
            println!(
                "  timed inside {} steps: sample {:.1} ms, score {:.1} ms, update {:.1} ms, total {:.1} ms (means); trainer overhead median {:.1}%, max {:.1}%",
                timed.len(),
                mean(|t| t.sample),
                mean(|t| t.score),
                mean(|t| t.update),
                mean(|t| t.total),
                100.0 * share[share.len() / 2],
                100.0 * share[share.len() - 1]
            );
            let (steps, works) = (sorted(steps), sorted(works));
            // The fastest of each is the least disturbed by other work on the machine.
            let (step, model_work) = (steps[0], works[0]);
            println!(
                "  {} prompts x {} responses, {} new tokens, fastest of {reps}: RL step {:.1} ms, its model work {:.1} ms, trainer overhead {:.1}% (medians {:.1} and {:.1} ms)",
                cfg.prompts_per_step,
                cfg.group_size,
                cfg.max_new_tokens,
                step * 1e3,
                model_work * 1e3,
                100.0 * (step - model_work) / step,
                steps[reps / 2] * 1e3,
                works[reps / 2] * 1e3
            );
            Ok(())
        }
    }
    dispatch(device, Job)?
}
