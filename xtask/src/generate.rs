//! `cargo xtask generate MODEL_DIR --prompt TEXT`: what a model (a Hugging Face directory,
//! or a policy goodhart saved as one) writes after a prompt (`goodhart_policy::pipeline`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Result};
use goodhart_core::device::{dispatch, BackendJob};
use goodhart_policy::{Completion, TextModel};

/// `cargo xtask generate`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Example:
  cargo xtask generate crates/goodhart-policy/fixtures/hf/qwen2 --prompt hello --greedy \\
      --max-new-tokens 16 --json")]
pub struct GenerateArgs {
    /// A Hugging Face model directory (or a policy goodhart saved as one)
    #[arg(value_name = "MODEL_DIR")]
    dir: PathBuf,
    /// The prompt
    #[arg(long)]
    prompt: String,
    /// Send the prompt as a user message through the model's chat template
    #[arg(long)]
    chat: bool,
    /// Most tokens to write; it stops earlier at an EOS id
    #[arg(long, default_value_t = 64, value_parser = crate::positive)]
    max_new_tokens: usize,
    /// The most probable token at every step (default: sampling)
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sampling temperature
    #[arg(long, default_value_t = 1.0, value_parser = crate::finite)]
    temperature: f64,
    /// Nucleus sampling's probability mass (1 = off)
    #[arg(long, default_value_t = 1.0, value_parser = crate::finite)]
    top_p: f64,
    /// Sample among the K most probable tokens (0 = off)
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// The sampling stream
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// One JSON object: `ids` (the new token ids), `logprobs` (one per new token, under the
    /// model at temperature 1), `text`, `prompt_ids`
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: crate::DeviceArg,
}

struct Job(GenerateArgs);

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
pub fn run(args: GenerateArgs) -> Result<ExitCode> {
    let device = args.device.device;
    let json = args.json;
    let completion = dispatch(device, Job(args))?.map_err(|e| anyhow!("{e}"))?;
    if json {
        println!("{}", serde_json::to_string(&completion)?);
    } else {
        println!("{}", completion.text);
    }
    Ok(ExitCode::SUCCESS)
}
