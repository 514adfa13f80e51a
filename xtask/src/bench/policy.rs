//! `cargo xtask bench policy`: generation, scoring and train-step throughput of the policy
//! LM, the same three figures as the PyTorch-eager twin (`benches/torch_twin.py`), and
//! `--vs-torch` to measure both alternately and print the ratios: whole runs in turn, or
//! with `--interleave` single measurements of each figure in turn between two long-lived
//! processes (`benches/twin_calls.py` serves the twin's).
//!
//! The model is the twin's: decoder-only, pre-norm, LayerNorm, fused QKV with biases,
//! exact GELU MLP of width 4D, untied LM head without bias. Figures, each after a warm-up:
//! - `gen_tok_s`: new tokens per second of `reps` calls of [`generate`] (KV cache,
//!   sampling at temperature 1) after random prompts;
//! - `score_tok_s`: tokens per second of `reps` teacher-forced [`score`] calls on the
//!   prompts and their sampled responses;
//! - `train_tok_s`: tokens per second of `reps` SFT steps on those sequences (forward,
//!   backward, AdamW at lr 1e-4).

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use burn::{
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::{backend::Backend, Distribution, Int, Tensor},
};
use goodhart_core::{
    device::{dispatch, Autodiff, BackendJob, DeviceSpec},
    seed,
};
use goodhart_metrics::stats::{median_interval, Interval};
use goodhart_policy::{
    generate, score::score, sft, GenerationConfig, Positions, TransformerConfig,
};
use serde::{Deserialize, Serialize};

use super::Bench;

pub const BENCHES: &[Bench] = &[Bench {
    name: "policy",
    about: "generation, scoring and train-step tokens/s of the policy LM (flags: bench policy --help; --vs-torch for ratios to PyTorch eager)",
    run: default_run,
}];

/// The model and batch shape (flags of the same names; defaults: config S).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Shape {
    pub batch: usize,
    pub prompt: usize,
    pub response: usize,
    pub layers: usize,
    pub width: usize,
    pub heads: usize,
    pub vocab: usize,
    #[serde(serialize_with = "positions_name")]
    pub positions: Positions,
    pub reps: usize,
}

fn positions_name<S: serde::Serializer>(p: &Positions, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match p {
        Positions::Learned => "learned",
        Positions::Rotary => "rotary",
    })
}

impl Default for Shape {
    fn default() -> Self {
        Self {
            batch: 64,
            prompt: 16,
            response: 64,
            layers: 4,
            width: 128,
            heads: 4,
            vocab: 64,
            positions: Positions::Learned,
            reps: 3,
        }
    }
}

impl Shape {
    fn model(&self) -> TransformerConfig {
        TransformerConfig::new(
            self.vocab,
            self.width,
            self.layers,
            self.heads,
            self.prompt + self.response,
        )
        .with_positions(self.positions)
        .with_tie_embeddings(false)
    }

    /// The twin's flags for this shape.
    fn torch_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, v) in [
            ("--batch", self.batch),
            ("--prompt", self.prompt),
            ("--response", self.response),
            ("--layers", self.layers),
            ("--width", self.width),
            ("--heads", self.heads),
            ("--vocab", self.vocab),
            ("--reps", self.reps),
        ] {
            args.push(flag.to_string());
            args.push(v.to_string());
        }
        args
    }
}

/// The three figures of one measurement (the twin's JSON keys).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Figures {
    pub gen_tok_s: f64,
    pub score_tok_s: f64,
    pub train_tok_s: f64,
}

impl From<[f64; 3]> for Figures {
    fn from([gen_tok_s, score_tok_s, train_tok_s]: [f64; 3]) -> Self {
        Self {
            gen_tok_s,
            score_tok_s,
            train_tok_s,
        }
    }
}

impl Figures {
    const NAMES: [&'static str; 3] = ["gen_tok_s", "score_tok_s", "train_tok_s"];

    fn get(&self, i: usize) -> f64 {
        [self.gen_tok_s, self.score_tok_s, self.train_tok_s][i]
    }
}

/// `cargo xtask bench policy`: generation (KV cache), teacher-forced scoring and one SFT
/// train step of the policy LM.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Defaults: config S (4 layers, width 128, 4 heads, vocabulary 64, learned \
positions, batch 64, prompt 16, 64 new tokens, 3 reps). --vs-torch runs this and the PyTorch-eager \
twin (benches/torch_twin.py) alternately, --runs times each, and prints the medians, their \
ratios, the lowest and highest ratio of one run to the twin's beside it, and those ratios' median \
with a 95% bootstrap interval. With --interleave, one twin process (benches/twin_calls.py, beside \
the twin) serves single measurements, and each figure of each of --runs rounds is measured by both \
sides back to back, each side going first in alternate rounds. --hf MODEL_DIR \
measures the architecture a Hugging Face config.json describes (random weights; --batch, --prompt, \
--response and --reps still apply) against transformers' own model of it (benches/hf_twin.py).

Examples:
  cargo xtask bench policy --vs-torch
  cargo xtask bench policy --vs-torch --interleave --runs 15
  cargo xtask bench policy --batch 16 --response 32 --positions rotary --json
  cargo xtask bench policy --hf /tmp/smollm2 --batch 8 --vs-torch"
)]
pub struct PolicyArgs {
    /// Sequences per batch [default: 64]
    #[arg(long, value_parser = crate::positive)]
    batch: Option<usize>,
    /// Prompt tokens [default: 16]
    #[arg(long, value_parser = crate::positive)]
    prompt: Option<usize>,
    /// New tokens [default: 64]
    #[arg(long, value_parser = crate::positive)]
    response: Option<usize>,
    /// Transformer blocks [default: 4]
    #[arg(long, value_parser = crate::positive)]
    layers: Option<usize>,
    /// Model width [default: 128]
    #[arg(long, value_parser = crate::positive)]
    width: Option<usize>,
    /// Attention heads [default: 4]
    #[arg(long, value_parser = crate::positive)]
    heads: Option<usize>,
    /// Vocabulary size [default: 64]
    #[arg(long, value_parser = crate::positive)]
    vocab: Option<usize>,
    /// Position encoding [default: learned]
    #[arg(long, value_enum)]
    positions: Option<PositionsArg>,
    /// Timed repetitions per figure [default: 3]
    #[arg(long, value_parser = crate::positive)]
    reps: Option<usize>,
    /// One JSON object of the figures
    #[arg(long)]
    json: bool,
    /// Alternate with the PyTorch-eager twin and print the ratios
    #[arg(long)]
    vs_torch: bool,
    /// With --vs-torch: runs of each side (rounds with --interleave)
    #[arg(long, default_value_t = 3, value_parser = crate::positive)]
    runs: usize,
    /// With --vs-torch: keep one process per side and alternate single measurements of
    /// each figure between them, instead of alternating whole runs (benches/twin_calls.py)
    #[arg(long, requires = "vs_torch", conflicts_with = "hf")]
    interleave: bool,
    /// With --vs-torch: the Python that runs the twin
    #[arg(long, default_value = "python3")]
    python: String,
    /// With --vs-torch: the twin's script [default: benches/torch_twin.py, or hf_twin.py with --hf]
    #[arg(long)]
    twin: Option<PathBuf>,
    /// A Hugging Face model directory whose config.json gives the architecture
    #[arg(long, value_name = "MODEL_DIR")]
    hf: Option<PathBuf>,
    #[command(flatten)]
    device: crate::DeviceArg,
}

/// `--positions`.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum PositionsArg {
    /// Learned absolute positions
    Learned,
    /// Rotary positions
    Rotary,
}

/// `cargo xtask bench policy ARGS`.
pub fn command(args: PolicyArgs) -> Result<()> {
    let device = args.device.device;
    let d = Shape::default();
    let shape = Shape {
        batch: args.batch.unwrap_or(d.batch),
        prompt: args.prompt.unwrap_or(d.prompt),
        response: args.response.unwrap_or(d.response),
        layers: args.layers.unwrap_or(d.layers),
        width: args.width.unwrap_or(d.width),
        heads: args.heads.unwrap_or(d.heads),
        vocab: args.vocab.unwrap_or(d.vocab),
        positions: match args.positions {
            None => d.positions,
            Some(PositionsArg::Learned) => Positions::Learned,
            Some(PositionsArg::Rotary) => Positions::Rotary,
        },
        reps: args.reps.unwrap_or(d.reps),
    };
    let (json, vs_torch, runs, python, hf, interleave) = (
        args.json,
        args.vs_torch,
        args.runs,
        args.python,
        args.hf,
        args.interleave,
    );
    let mut twin = args.twin.unwrap_or_else(default_twin);
    // The model, and the twin that builds the same one: goodhart's own shape against
    // `torch_twin.py`, or a Hugging Face config against transformers (`hf_twin.py`).
    let (model, twin_args) = match &hf {
        None => {
            let model = shape.model();
            model.validate()?;
            (model, shape.torch_args())
        }
        Some(dir) => {
            let model = goodhart_policy::hf::HfConfig::from_dir(dir)?.model;
            if shape.prompt + shape.response > model.max_seq_len {
                bail!(
                    "--prompt + --response exceed the model's {} positions",
                    model.max_seq_len
                );
            }
            if twin == default_twin() {
                twin = twin.with_file_name("hf_twin.py");
            }
            let mut args = vec!["--hf".to_string(), dir.display().to_string()];
            for (flag, v) in [
                ("--batch", shape.batch),
                ("--prompt", shape.prompt),
                ("--response", shape.response),
                ("--reps", shape.reps),
            ] {
                args.extend([flag.to_string(), v.to_string()]);
            }
            (model, args)
        }
    };
    // With --hf the architecture is the config's: only the batch shape is reported.
    let shape_json = match &hf {
        None => serde_json::to_value(shape)?,
        Some(dir) => serde_json::json!({
            "model": dir.display().to_string(), "batch": shape.batch, "prompt": shape.prompt,
            "response": shape.response, "reps": shape.reps,
        }),
    };
    if !vs_torch {
        let f = measure_model(device, shape, model)?;
        if json {
            let mut out = serde_json::to_value(Report::new(device, shape, f))?;
            if hf.is_some() {
                out["shape"] = shape_json;
            }
            println!("{out}");
        } else {
            print_figures(&format!("goodhart on {device}"), &f);
        }
        return Ok(());
    }
    if hf.is_none() && shape.positions != Positions::Learned {
        bail!("--vs-torch: the twin has learned positions only");
    }
    if !twin.is_file() {
        bail!(
            "--vs-torch: the PyTorch twin {} is not there (--twin FILE)",
            twin.display()
        );
    }
    let torch_device = match device {
        DeviceSpec::Cpu => "cpu".to_string(),
        DeviceSpec::Cuda(n) => format!("cuda:{n}"),
        DeviceSpec::Wgpu(_) => bail!("--vs-torch: PyTorch has no wgpu device; use cpu or cuda"),
    };
    let (ours, theirs) = if interleave {
        let server = twin.with_file_name("twin_calls.py");
        if !server.is_file() {
            bail!(
                "--interleave: the twin's server {} is not there (beside --twin FILE)",
                server.display()
            );
        }
        let mut calls = TwinCalls::start(&python, &server, &twin, &twin_args, &torch_device)?;
        measure_rounds(device, shape, model, Some(&mut calls), runs)?
    } else {
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let timed = |who: &str, f: &dyn Fn() -> Result<Figures>| {
                let start = Instant::now();
                let out = f()?;
                eprintln!(
                    "run {run}/{runs} {who:<9} {:.1} / {:.1} / {:.1} tokens/s ({:.1} s)",
                    out.gen_tok_s,
                    out.score_tok_s,
                    out.train_tok_s,
                    start.elapsed().as_secs_f64()
                );
                anyhow::Ok(out)
            };
            ours.push(timed("goodhart:", &|| {
                measure_model(device, shape, model.clone())
            })?);
            theirs.push(timed("torch:", &|| {
                run_twin(&python, &twin, &twin_args, &torch_device)
            })?);
        }
        (ours, theirs)
    };
    let pairs = (0..3)
        .map(|i| PairRatios::new(&ours, &theirs, i))
        .collect::<Result<Vec<_>>>()?;
    let (ours, theirs) = (median(&ours), median(&theirs));
    if json {
        let ratio = |i: usize| ours.get(i) / theirs.get(i);
        let range = |i: usize| {
            let p = &pairs[i];
            serde_json::json!({
                "min": p.min, "max": p.max,
                "median": p.median.value, "median_lo": p.median.lo, "median_hi": p.median.hi,
            })
        };
        let out = serde_json::json!({
            "shape": shape_json,
            "device": device.to_string(),
            "runs": runs,
            "interleave": interleave,
            "threads": threads(),
            "goodhart": ours,
            "torch": theirs,
            "ratio": {
                "gen": ratio(0),
                "score": ratio(1),
                "train": ratio(2),
            },
            "pair_ratio": {
                "gen": range(0),
                "score": range(1),
                "train": range(2),
            },
            "peak_rss_mib": peak_rss_mib(),
        });
        println!("{out}");
    } else {
        println!(
            "medians of {runs} alternating {}, {} threads, {shape_json}",
            if interleave {
                "rounds of single measurements"
            } else {
                "runs"
            },
            threads()
        );
        println!(
            "{:<12} {:>14} {:>14} {:>8} {:>15} {:>24}",
            "figure", "goodhart", "torch eager", "ratio", "runs' ratios", "their median [95% CI]"
        );
        for (i, name) in Figures::NAMES.iter().enumerate() {
            let p = &pairs[i];
            println!(
                "{name:<12} {:>14.1} {:>14.1} {:>7.2}x {:>8.2}-{:.2}x {:>9.2}x [{:.2}, {:.2}]",
                ours.get(i),
                theirs.get(i),
                ours.get(i) / theirs.get(i),
                p.min,
                p.max,
                p.median.value,
                p.median.lo,
                p.median.hi
            );
        }
    }
    Ok(())
}

/// The benchmark as part of `cargo xtask bench` (config S, plain output).
pub fn default_run(device: DeviceSpec) -> Result<()> {
    print_figures(
        &format!("goodhart on {device}"),
        &measure(device, Shape::default())?,
    );
    Ok(())
}

#[derive(Serialize)]
struct Report {
    #[serde(flatten)]
    figures: Figures,
    #[serde(flatten)]
    shape: Shape,
    device: String,
    threads: usize,
    peak_rss_mib: Option<f64>,
}

impl Report {
    fn new(device: DeviceSpec, shape: Shape, figures: Figures) -> Self {
        Self {
            figures,
            shape,
            device: device.to_string(),
            threads: threads(),
            peak_rss_mib: peak_rss_mib(),
        }
    }
}

fn print_figures(who: &str, f: &Figures) {
    println!(
        "  {who}: generation {:.0}, scoring {:.0}, train step {:.0} tokens/s",
        f.gen_tok_s, f.score_tok_s, f.train_tok_s
    );
}

/// The per-figure median of several measurements.
fn median(runs: &[Figures]) -> Figures {
    let m = |i: usize| {
        let mut v: Vec<f64> = runs.iter().map(|f| f.get(i)).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Figures {
        gen_tok_s: m(0),
        score_tok_s: m(1),
        train_tok_s: m(2),
    }
}

/// The ratios `ours / theirs` of one figure over the alternating runs (goodhart's run
/// `k` against the twin's run `k`): the spread behind the ratio of the medians.
struct PairRatios {
    min: f64,
    max: f64,
    /// Their median, with a 95% percentile-bootstrap interval (2,000 resamples, seed 0).
    median: Interval,
}

impl PairRatios {
    fn new(ours: &[Figures], theirs: &[Figures], i: usize) -> Result<Self> {
        let r: Vec<f64> = ours
            .iter()
            .zip(theirs)
            .map(|(a, b)| a.get(i) / b.get(i))
            .collect();
        let median = median_interval(&r, 2_000, 0.95, 0)
            .with_context(|| format!("the runs' ratios of {}: {r:?}", Figures::NAMES[i]))?;
        Ok(Self {
            min: r.iter().copied().fold(f64::INFINITY, f64::min),
            max: r.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            median,
        })
    }
}

/// Threads the CPU backend uses (rayon's pool: `RAYON_NUM_THREADS` or every core).
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Peak resident memory of this process (`VmHWM`), where Linux reports it.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// `benches/torch_twin.py` of this workspace.
fn default_twin() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("benches")
        .join("torch_twin.py")
}

/// One run of a PyTorch twin with `args`, on `device`, with as many threads as ours.
fn run_twin(python: &str, twin: &Path, args: &[String], device: &str) -> Result<Figures> {
    let out = Command::new(python)
        .arg(twin)
        .args(args)
        .args(["--device", device, "--threads", &threads().to_string()])
        .output()
        .with_context(|| format!("could not start `{python}` for the PyTorch twin"))?;
    if !out.status.success() {
        bail!(
            "the PyTorch twin failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("the PyTorch twin printed no JSON line")?;
    serde_json::from_str(line).with_context(|| format!("the twin's output: {line}"))
}

/// A long-lived PyTorch-eager twin (`benches/twin_calls.py` around the twin's model) that
/// measures one figure per request, for `--interleave`.
struct TwinCalls {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl TwinCalls {
    /// Starts `server` with the twin's script and flags, and waits for its warm-ups.
    fn start(
        python: &str,
        server: &Path,
        twin: &Path,
        args: &[String],
        device: &str,
    ) -> Result<Self> {
        let mut child = Command::new(python)
            .arg(server)
            .arg("--twin")
            .arg(twin)
            .args(args)
            .args(["--device", device, "--threads", &threads().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("could not start `{python}` for the PyTorch twin"))?;
        let stdin = child.stdin.take().context("the twin's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the twin's stdout")?);
        let mut twin = Self {
            child,
            stdin,
            stdout,
        };
        let line = twin.line()?;
        if line != "ready" {
            bail!(
                "the PyTorch twin {} did not start: {line:?}",
                server.display()
            );
        }
        Ok(twin)
    }

    /// The twin's next output line, or why there is none.
    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let status = self.child.wait()?;
            bail!("the PyTorch twin exited ({status}); its error is above");
        }
        Ok(line.trim().to_string())
    }

    /// One measurement of `figure` (a [`Figures`] key) by the twin.
    fn measure(&mut self, figure: &str) -> Result<f64> {
        writeln!(self.stdin, "{figure}")?;
        self.stdin.flush()?;
        let line = self.line()?;
        line.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0)
            .with_context(|| format!("the PyTorch twin's {figure}: {line:?}"))
    }
}

impl Drop for TwinCalls {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

/// Seconds that `reps` calls of `f` take, after one untimed call first when `warm_up`.
fn time_calls(reps: usize, warm_up: bool, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    if warm_up {
        f()?;
    }
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    Ok(start.elapsed().as_secs_f64())
}

fn sync<B: Backend>(device: &B::Device) -> Result<()> {
    B::sync(device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"))
}

/// Measures the three figures at `shape` on `device`.
pub fn measure(device: DeviceSpec, shape: Shape) -> Result<Figures> {
    measure_model(device, shape, shape.model())
}

/// Measures the three figures of a model of architecture `cfg` (random weights) with
/// `shape`'s batch, prompt, response and reps.
fn measure_model(device: DeviceSpec, shape: Shape, cfg: TransformerConfig) -> Result<Figures> {
    let (ours, _) = measure_rounds(device, shape, cfg, None, 1)?;
    Ok(ours[0])
}

/// The three figures of a model of architecture `cfg` (random weights) with `shape`'s
/// batch, prompt, response and reps, measured `rounds` times in one process. With `twin`,
/// the twin measures each figure right after goodhart in even rounds and right before it
/// in odd ones. Returns goodhart's figures and the twin's (none without a twin), a
/// [`Figures`] per round each.
fn measure_rounds(
    device: DeviceSpec,
    shape: Shape,
    cfg: TransformerConfig,
    twin: Option<&mut TwinCalls>,
    rounds: usize,
) -> Result<(Vec<Figures>, Vec<Figures>)> {
    struct Job<'a>(Shape, TransformerConfig, Option<&'a mut TwinCalls>, usize);
    impl BackendJob for Job<'_> {
        type Output = Result<(Vec<Figures>, Vec<Figures>)>;
        fn run<B: Backend>(self, device: B::Device) -> Self::Output {
            let (s, cfg, mut twin, rounds) = (self.0, self.1, self.2, self.3);
            B::seed(&device, 0);
            let model = cfg.init::<B>(&device)?;
            let prompt = Tensor::<B, 2, Int>::random(
                [s.batch, s.prompt],
                Distribution::Uniform(0.0, cfg.vocab_size as f64),
                &device,
            );
            let mask = Tensor::<B, 2>::ones([s.batch, s.prompt], &device);
            let mut rng = seed::rng(0, "sample");
            let run = |n: usize, rng: &mut _| {
                let g = generate(
                    &model,
                    prompt.clone(),
                    mask.clone(),
                    &GenerationConfig::new(n),
                    rng,
                )?;
                sync::<B>(&device)?;
                anyhow::Ok(g)
            };
            run(8.min(s.response), &mut rng)?;
            let full = s.batch * (s.prompt + s.response);
            // Filled by the first round: the sequences scored and trained on, and the
            // trained model with its optimizer and batch (after a warm-up each).
            let mut sequences = None;
            let mut trainer = None;
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            for round in 0..rounds {
                let (mut mine, mut other) = ([0.0; 3], [0.0; 3]);
                let twin_first = round % 2 == 1;
                for (i, name) in Figures::NAMES.iter().enumerate() {
                    if let (true, Some(t)) = (twin_first, twin.as_deref_mut()) {
                        other[i] = t.measure(name)?;
                    }
                    mine[i] = match i {
                        0 => {
                            let secs = time_calls(s.reps, false, || {
                                sequences = Some(run(s.response, &mut rng)?);
                                Ok(())
                            })?;
                            (s.reps * s.batch * s.response) as f64 / secs
                        }
                        1 => {
                            let g = sequences.as_ref().expect("generation runs first");
                            let secs = time_calls(s.reps, round == 0, || {
                                score(&model, g.tokens.clone(), g.attention_mask.clone(), 1.0)?;
                                sync::<B>(&device)
                            })?;
                            (s.reps * full) as f64 / secs
                        }
                        _ => {
                            if trainer.is_none() {
                                let g = sequences.as_ref().expect("generation runs first");
                                let ids: Vec<i64> =
                                    g.tokens.to_data().convert::<i64>().into_vec()?;
                                let examples: Vec<sft::SftExample> = ids
                                    .chunks(s.prompt + g.response_len)
                                    .map(|row| {
                                        sft::SftExample::new(
                                            row.iter().map(|&t| t as usize).collect(),
                                        )
                                    })
                                    .collect();
                                let refs: Vec<&sft::SftExample> = examples.iter().collect();
                                let batch = sft::collate::<Autodiff<B>>(&refs, 0, &device)?;
                                let model = cfg.init::<Autodiff<B>>(&device)?;
                                trainer = Some((Some(model), AdamWConfig::new().init(), batch));
                            }
                            let (model, optim, batch) =
                                trainer.as_mut().expect("the trainer is set up above");
                            let secs = time_calls(s.reps, round == 0, || {
                                let m = model.take().expect("model");
                                let loss = sft::nll(&m, batch)?;
                                let grads = GradientsParams::from_grads(loss.backward(), &m);
                                *model = Some(optim.step(1e-4, m, grads));
                                sync::<B>(&device)
                            })?;
                            (s.reps * full) as f64 / secs
                        }
                    };
                    if let (false, Some(t)) = (twin_first, twin.as_deref_mut()) {
                        other[i] = t.measure(name)?;
                    }
                }
                let (a, b) = (Figures::from(mine), Figures::from(other));
                ours.push(a);
                if twin.is_some() {
                    for (who, f) in [("goodhart:", &a), ("torch:", &b)] {
                        eprintln!(
                            "round {}/{rounds} {who:<9} {:.1} / {:.1} / {:.1} tokens/s",
                            round + 1,
                            f.gen_tok_s,
                            f.score_tok_s,
                            f.train_tok_s
                        );
                    }
                    theirs.push(b);
                }
            }
            Ok((ours, theirs))
        }
    }
    dispatch(device, Job(shape, cfg, twin, rounds))?
}
