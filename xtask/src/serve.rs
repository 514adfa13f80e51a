//! `cargo xtask serve MODEL_DIR [--port P] [--host H] [--name NAME] [--device D]`: an
//! OpenAI-compatible server over a model directory (`goodhart_serve`).

use std::{path::PathBuf, process::ExitCode};

use anyhow::{anyhow, bail, Context, Result};
use goodhart_core::device::{dispatch, BackendJob};
use goodhart_policy::TextModel;

pub const USAGE: &str = "usage: cargo xtask serve MODEL_DIR [--port P] [--host H] [--name NAME]
    [--device D]

  --port     the TCP port (default 8000)
  --host     the address to listen on (default 127.0.0.1)
  --name     the model's name in /v1/models and responses (default: the directory's name)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (log-probs with
`logprobs`), GET /health.

example: cargo xtask serve crates/goodhart-policy/fixtures/hf/qwen2 --port 8000
         curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
             -d '{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}], \"max_tokens\": 8}'";

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
pub fn run(args: &[String]) -> Result<ExitCode> {
    let mut args = args.to_vec();
    let device = crate::take_device(&mut args)?;
    let (mut dir, mut port, mut host, mut name) = (None, 8000u16, "127.0.0.1".to_string(), None);
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let mut value = |flag: &str| {
            it.next()
                .filter(|v| !v.starts_with("--"))
                .with_context(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--port" => {
                let v = value("--port")?;
                port = v
                    .parse()
                    .with_context(|| format!("--port `{v}`: not a port"))?;
            }
            "--host" => host = value("--host")?,
            "--name" => name = Some(value("--name")?),
            "-h" | "--help" => bail!("{USAGE}"),
            flag if flag.starts_with("--") => bail!("unknown flag `{flag}`\n{USAGE}"),
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            other => bail!("unexpected argument `{other}`\n{USAGE}"),
        }
    }
    let dir = dir.with_context(|| format!("MODEL_DIR is missing\n{USAGE}"))?;
    let name = name.unwrap_or_else(|| {
        dir.file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    let job = Job {
        dir,
        addr: format!("{host}:{port}"),
        name,
    };
    dispatch(device, job)??;
    Ok(ExitCode::SUCCESS)
}
