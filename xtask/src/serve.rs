//! `cargo xtask serve MODEL_DIR`: an OpenAI-compatible server over a model directory
//! (`goodhart_serve`); flags: `cargo xtask serve --help`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, Context, Result};
use goodhart_core::device::{dispatch, BackendJob};
use goodhart_policy::TextModel;

/// `cargo xtask serve`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions \
(log-probs with `logprobs`), GET /health.

Example:
  cargo xtask serve crates/goodhart-policy/fixtures/hf/qwen2 --port 8000
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
      -d '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 8}'"
)]
pub struct ServeArgs {
    /// A Hugging Face model directory (or a policy goodhart saved as one)
    #[arg(value_name = "MODEL_DIR")]
    dir: PathBuf,
    /// The TCP port
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// The address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The model's name in /v1/models and responses [default: the directory's name]
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    device: crate::DeviceArg,
}

struct Job {
    dir: PathBuf,
    addr: String,
    name: String,
}

impl BackendJob for Job {
    type Output = Result<()>;
    fn run<B: burn::tensor::backend::Backend>(self, device: B::Device) -> Result<()> {
        let model = TextModel::<B>::load(&self.dir, &device).map_err(|e| anyhow!("{e}"))?;
        let listener = std::net::TcpListener::bind(&self.addr)
            .with_context(|| format!("listening on {}", self.addr))?;
        eprintln!(
            "serving {} as `{}` on http://{}",
            self.dir.display(),
            self.name,
            listener.local_addr()?
        );
        goodhart_serve::serve_blocking(listener, goodhart_serve::router(model, &self.name))
            .context("serving")
    }
}

/// Runs the command.
pub fn run(args: ServeArgs) -> Result<ExitCode> {
    let ServeArgs {
        dir,
        port,
        host,
        name,
        device,
    } = args;
    let name = name.unwrap_or_else(|| {
        dir.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let job = Job {
        dir,
        addr: format!("{host}:{port}"),
        name,
    };
    dispatch(device.device, job)??;
    Ok(ExitCode::SUCCESS)
}
