//! `cargo xtask generate MODEL_DIR --prompt TEXT`: what a model (a Hugging Face directory,
//! or a policy goodhart saved as one) writes after a prompt (`goodhart_policy::pipeline`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use goodhart_core::device::{dispatch, BackendJob, DeviceSpec};
use goodhart_policy::{Completion, TextModel};

pub const USAGE: &str = "usage: cargo xtask generate MODEL_DIR --prompt TEXT [--chat]
    [--max-new-tokens N] [--greedy | --temperature T --top-p P --top-k K] [--seed N]
    [--device D] [--json]

  --chat             send TEXT as a user message through the model's chat template
  --max-new-tokens   most tokens to write (default 64); it stops earlier at an EOS id
  --greedy           the most probable token at every step (default: sampling)
  --temperature, --top-p, --top-k   sampling settings (defaults 1, 1, 0 = off)
  --seed             the sampling stream (default 0)
  --json             one JSON object: `ids` (the new token ids), `logprobs` (one per new
                     token, under the model at temperature 1), `text`, `prompt_ids`

example: cargo xtask generate crates/goodhart-policy/fixtures/hf/qwen2 --prompt hello --greedy \
    --max-new-tokens 16 --json";

struct Args {
    dir: PathBuf,
    prompt: String,
    chat: bool,
    max_new_tokens: usize,
    greedy: bool,
    temperature: f64,
    top_p: f64,
    top_k: usize,
    seed: u64,
    json: bool,
}

fn parse(args: &[String]) -> Result<(Args, DeviceSpec)> {
    let mut args = args.to_vec();
    let device = crate::take_device(&mut args)?;
    let mut dir = None;
    let mut prompt = None;
    let mut parsed = Args {
        dir: PathBuf::new(),
        prompt: String::new(),
        chat: false,
        max_new_tokens: 64,
        greedy: false,
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        seed: 0,
        json: false,
    };
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .filter(|v| !v.starts_with("--"))
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--prompt" => prompt = Some(value("--prompt")?),
            "--chat" => parsed.chat = true,
            "--greedy" => parsed.greedy = true,
            "--json" => parsed.json = true,
            "--max-new-tokens" => {
                let v = value("--max-new-tokens")?;
                parsed.max_new_tokens =
                    v.parse().ok().filter(|&n: &usize| n > 0).with_context(|| {
                        format!("--max-new-tokens `{v}`: not a positive integer")
                    })?;
            }
            "--temperature" | "--top-p" => {
                let v = value(&a)?;
                let x: f64 = v
                    .parse()
                    .ok()
                    .filter(|x: &f64| x.is_finite())
                    .with_context(|| format!("{a} `{v}`: not a number"))?;
                if a == "--temperature" {
                    parsed.temperature = x;
                } else {
                    parsed.top_p = x;
                }
            }
            "--top-k" => {
                let v = value("--top-k")?;
                parsed.top_k = v
                    .parse()
                    .with_context(|| format!("--top-k `{v}`: not an integer"))?;
            }
            "--seed" => {
                let v = value("--seed")?;
                parsed.seed = v
                    .parse()
                    .with_context(|| format!("--seed `{v}`: not an integer"))?;
            }
            "-h" | "--help" => bail!("{USAGE}"),
            flag if flag.starts_with("--") => bail!("unknown flag `{flag}`\n{USAGE}"),
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            other => bail!("unexpected argument `{other}`\n{USAGE}"),
        }
    }
    parsed.dir = dir.with_context(|| format!("MODEL_DIR is missing\n{USAGE}"))?;
    parsed.prompt = prompt.with_context(|| format!("--prompt is missing\n{USAGE}"))?;
    if parsed.greedy && (parsed.temperature != 1.0 || parsed.top_p != 1.0 || parsed.top_k != 0) {
        bail!("--greedy takes the most probable token: it has no temperature, top-p or top-k");
    }
    Ok((parsed, device))
}

struct Job(Args);

impl BackendJob for Job {
    type Output = goodhart_core::Result<Completion>;
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Self::Output {
        let a = self.0;
        let model = TextModel::<B>::load(&a.dir, &device)?;
        let prompt = model.prompt_ids(&a.prompt, a.chat)?;
        let settings = model
            .generation_config(a.max_new_tokens)
            .with_greedy(a.greedy)
            .with_temperature(a.temperature)
            .with_top_p(a.top_p)
            .with_top_k(a.top_k);
        model.complete(&prompt, &settings, a.seed)
    }
}

/// Runs the command.
pub fn run(args: &[String]) -> Result<ExitCode> {
    let (args, device) = parse(args)?;
    let json = args.json;
    let completion = dispatch(device, Job(args))?.map_err(|e| anyhow!("{e}"))?;
    if json {
        println!("{}", serde_json::to_string(&completion)?);
    } else {
        println!("{}", completion.text);
    }
    Ok(ExitCode::SUCCESS)
}
