//! The LLM-judge rewards (`rubric`, `llm_judge`) against goodhart's own OpenAI-compatible
//! server on loopback: `goodhart-serve`, what `cargo xtask serve` runs, in a child
//! process serving the `qwen2-judge` fixture, a Qwen2 model trained by `make_fixtures.py
//! --judge` to answer every chat prompt with one verdict on three criteria (met, not met,
//! met; `reference.json`). The child is this test binary, started again to run
//! `serve_child`, so a test can kill it with SIGKILL.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use goodhart_core::{
    device::{cpu, Dispatch},
    GoodhartError,
};
use goodhart_policy::{HfTokenizer, TextModel, Tokenizer};
use goodhart_reward::{
    chat_client::EndpointConfig,
    llm_judge::{LlmJudge, LlmJudgeConfig},
    rubric::{parse_verdict, Rubric, RubricConfig, RubricJudge},
    source::RewardSource,
    text::Texts,
};
use serde_json::Value;

const CHILD_ENV: &str = "GOODHART_SERVE_CHILD_MODEL";
/// The model's name on the server, sent with every request (and so part of the cache key).
const MODEL: &str = "qwen2-judge";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/goodhart-policy/fixtures/hf/qwen2-judge")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap())
        .unwrap()
}

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("goodhart-judge-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The child process of `Server::start`: serves the model directory `CHILD_ENV` names on
/// a free loopback port, and prints the port.
#[test]
#[ignore = "run by the judge tests in a child process"]
fn serve_child() {
    let dir = PathBuf::from(std::env::var(CHILD_ENV).expect("run by Server::start"));
    let model = TextModel::<Dispatch>::load(&dir, &cpu()).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    println!("serving on {}", listener.local_addr().unwrap());
    goodhart_serve::serve_blocking(listener, goodhart_serve::router(model, MODEL)).unwrap();
}

/// A `goodhart-serve` process over the judge fixture.
struct Server {
    child: Child,
    addr: String,
    _stdout: BufReader<ChildStdout>,
}

impl Server {
    fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "serve_child", "--ignored", "--nocapture"])
            .env(CHILD_ENV, fixture())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let addr = loop {
            let mut line = String::new();
            assert!(
                stdout.read_line(&mut line).unwrap() > 0,
                "the server exited"
            );
            if let Some(addr) = line.trim().strip_prefix("serving on ") {
                break addr.to_string();
            }
        };
        Self {
            child,
            addr,
            _stdout: stdout,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `GET /health`: requests served and the most ever in flight at once.
    fn health(&self) -> (u64, u64) {
        let text = ureq::get(format!("http://{}/health", self.addr))
            .call()
            .unwrap()
            .body_mut()
            .read_to_string()
            .unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        (
            v["requests"].as_u64().unwrap(),
            v["peak_in_flight"].as_u64().unwrap(),
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The judge's endpoint: fast retries for the tests.
fn endpoint(server: &Server, concurrency: usize, cache: Option<PathBuf>) -> EndpointConfig {
    EndpointConfig {
        base_url: server.url(),
        model: MODEL.into(),
        concurrency,
        max_retries: 2,
        backoff_s: 0.05,
        timeout_s: 60.0,
        max_tokens: 256,
        cache,
        ..Default::default()
    }
}

/// A rubric judge whose prompt is the criteria, a blank line and the response: the shape
/// of the fixture's `test_prompts`.
fn rubric_judge(endpoint: EndpointConfig) -> RubricJudge {
    RubricJudge::new(
        "rubric",
        &RubricConfig {
            endpoint,
            template: "{{criteria}}\n\n{{response}}".into(),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A rubric as a dataset holds it: `[{"criterion": ..., "weight": ...}, ...]`.
fn rubric(criteria: &[(&str, f64)]) -> Rubric {
    let cell: Vec<Value> = criteria
        .iter()
        .map(|(text, weight)| serde_json::json!({"criterion": text, "weight": weight}))
        .collect();
    Rubric::from_json(&Value::Array(cell)).unwrap()
}

/// The rubrics and responses of the fixture's two `test_prompts`.
fn cases() -> Vec<(Rubric, String)> {
    let cases = vec![
        (
            rubric(&[
                ("Says hello", 3.0),
                ("Names a colour", 2.0),
                ("Is rude", -1.0),
            ]),
            "Hello there, friend.".to_string(),
        ),
        (
            rubric(&[
                ("Gives a number", 1.0),
                ("Shows the steps", 1.0),
                ("Rambles", -2.0),
            ]),
            "The answer is 4.".to_string(),
        ),
    ];
    let prompts: Vec<String> = cases
        .iter()
        .map(|(r, response)| format!("{}\n\n{response}", r.render()))
        .collect();
    assert_eq!(
        serde_json::to_value(&prompts).unwrap(),
        reference()["test_prompts"],
        "the judge's prompts are the ones make_fixtures.py checked"
    );
    cases
}

fn texts(cases: &[(Rubric, String)]) -> Texts<Dispatch> {
    let n = cases.len();
    Texts::new(
        vec![String::new(); n],
        cases.iter().map(|(_, r)| r.clone()).collect(),
        vec![None; n],
        &cpu(),
    )
    .unwrap()
    .with_context(
        vec![String::new(); n],
        cases.iter().map(|(r, _)| Some(r.clone())).collect(),
    )
    .unwrap()
}

fn score<S: RewardSource<Dispatch, Texts<Dispatch>>>(
    judge: &S,
    input: &Texts<Dispatch>,
) -> goodhart_core::Result<Vec<f32>> {
    judge.score(input).map(|o| {
        o.reward
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap()
    })
}

fn usage<S: RewardSource<Dispatch, Texts<Dispatch>>>(judge: &S) -> HashMap<String, f64> {
    judge.usage().into_iter().collect()
}

/// The reward `R` of the fixture's verdict under each case's rubric, by the formula.
fn expected(cases: &[(Rubric, String)]) -> Vec<f32> {
    let met = parse_verdict(reference()["verdict"].as_str().unwrap(), 3).unwrap();
    assert_eq!(met, [true, false, true]);
    cases.iter().map(|(r, _)| r.score(&met) as f32).collect()
}

/// Tokens in the verdict and the EOS after it: the judge's completion tokens per answer.
fn verdict_tokens() -> f64 {
    let tokenizer = HfTokenizer::from_dir(&fixture()).unwrap();
    let ids = tokenizer
        .encode(reference()["verdict"].as_str().unwrap())
        .unwrap();
    (ids.len() + 1) as f64
}

/// Rubric verdicts parsed and scored as the formula says; at most `concurrency` requests
/// in flight; a rerun answered from the cache without a request; `llm_judge` on the same
/// server.
#[test]
fn rubric_and_llm_judge_against_goodhart_serve() {
    let server = Server::start();
    let two = cases();
    // Hand-computed: met, not met, met under (+3, +2, -1) is (3 + 0 + 0) / 6; under
    // (+1, +1, -2) it is (1 + 0 + 0) / 4.
    assert_eq!(expected(&two), vec![0.5, 0.25]);

    // Nine requests, at most three at a time. The server generates one answer at a time,
    // so while it works on one the client's other two wait on it: it sees three in flight.
    let nine: Vec<_> = (0..9).map(|i| two[i % 2].clone()).collect();
    let judge = rubric_judge(endpoint(&server, 3, None));
    assert_eq!(score(&judge, &texts(&nine)).unwrap(), expected(&nine));
    let u = usage(&judge);
    assert_eq!(
        (u["requests"], u["retries"], u["malformed"]),
        (9.0, 0.0, 0.0)
    );
    assert_eq!(u["completion_tokens"], 9.0 * verdict_tokens());
    assert_eq!(server.health(), (9, 3), "(requests, peak in flight)");

    // With a cache: the first run asks, a second judge (a resumed run) reads the file.
    let dir = scratch("cache");
    let cache = dir.join("rubric.jsonl");
    let first = rubric_judge(endpoint(&server, 3, Some(cache.clone())));
    assert_eq!(score(&first, &texts(&two)).unwrap(), vec![0.5, 0.25]);
    assert_eq!(usage(&first)["requests"], 2.0);
    let again = rubric_judge(endpoint(&server, 3, Some(cache.clone())));
    assert_eq!(score(&again, &texts(&two)).unwrap(), vec![0.5, 0.25]);
    let u = usage(&again);
    assert_eq!((u["requests"], u["cache_hits"]), (0.0, 2.0));
    assert_eq!(server.health().0, 11, "the rerun sent nothing");

    // `llm_judge` reading a number from the same answers: the last criterion marked met
    // (3 of criteria 1 to 3 is 1.0 on [1, 3]).
    let judge = LlmJudge::new(
        "judge",
        &LlmJudgeConfig {
            endpoint: endpoint(&server, 2, None),
            system: String::new(),
            template: "{{question}}{{response}}".into(),
            pattern: r#""(\d)": \{"criteria_met": true\}"#.into(),
            min: 1.0,
            max: 3.0,
            ..Default::default()
        },
    )
    .unwrap();
    let input = Texts::new(
        vec![String::new(); 2],
        vec![
            format!("{}\n\n{}", two[0].0.render(), two[0].1),
            format!("{}\n\n{}", two[1].0.render(), two[1].1),
        ],
        vec![None; 2],
        &cpu(),
    )
    .unwrap()
    .with_context(vec![String::new(); 2], vec![None; 2])
    .unwrap();
    assert_eq!(score(&judge, &input).unwrap(), vec![1.0, 1.0]);
    assert_eq!(server.health().0, 13);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A server killed in the middle of a batch: the request it was answering is retried,
/// then the batch fails with an error naming the endpoint and the attempts; what it had
/// answered is in the cache, so a rerun against a new server asks only for the rest.
#[test]
fn a_killed_server_gives_retries_then_a_clear_error() {
    let mut server = Server::start();
    let dir = scratch("killed");
    let cache = dir.join("rubric.jsonl");
    // 24 distinct requests (the cache keys them apart), one at a time.
    let base = cases().swap_remove(0);
    let many: Vec<_> = (0..24)
        .map(|i| (base.0.clone(), format!("Hello there, friend {i}.")))
        .collect();
    let lines = || {
        std::fs::read_to_string(&cache)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let judge = rubric_judge(endpoint(&server, 1, Some(cache.clone())));
    let url = server.url();
    let killed = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        s.spawn(|| {
            // Kill the server once four answers are cached.
            let start = Instant::now();
            while lines() < 4 && start.elapsed() < Duration::from_secs(120) {
                std::thread::sleep(Duration::from_millis(1));
            }
            server.kill();
            killed.store(true, Ordering::SeqCst);
        });
        score(&judge, &texts(&many))
    });
    assert!(killed.load(Ordering::SeqCst));
    let err = result.expect_err("the server was killed before the batch's end");
    assert!(matches!(err, GoodhartError::Remote { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("POST {url}/chat/completions failed 3 times")),
        "{text}"
    );
    let cached = lines();
    assert!((4..24).contains(&cached), "{cached} answers cached");
    // Every answer before the kill was cached; the one after it was sent three times.
    let u = usage(&judge);
    assert_eq!(
        (u["retries"], u["requests"]),
        (2.0, cached as f64 + 3.0),
        "{u:?}"
    );

    // A new server, the same cache: only what was not answered is asked.
    let server = Server::start();
    let judge = rubric_judge(endpoint(&server, 2, Some(cache.clone())));
    assert_eq!(score(&judge, &texts(&many)).unwrap(), vec![0.5; 24]);
    let u = usage(&judge);
    assert_eq!(
        (u["cache_hits"], u["requests"]),
        (cached as f64, 24.0 - cached as f64)
    );
    assert_eq!(lines(), 24);
    std::fs::remove_dir_all(dir).unwrap();
}

/// GRPO on the Qwen2 fixture with the rubric judge as the proxy, through `[train]` as
/// `cargo xtask run` runs it: every sample's proxy is the verdict's score, the judge's
/// usage is in each step's metrics, and its answers are cached in the run directory.
#[test]
fn a_grpo_run_with_a_rubric_judge_logs_its_usage_and_caches_in_the_run() {
    use goodhart_core::device::Autodiff;
    use goodhart_train::{config::ExperimentConfig, experiments, presets, runner::Runner};

    let server = Server::start();
    let dir = scratch("train");
    // Four prompts, each with the rubric (+3, +2, -1): the judge's verdict scores 0.5.
    let rubric = r#"[{"criterion": "Says hello", "weight": 3}, {"criterion": "Names a colour", "weight": 2}, {"criterion": "Is rude", "weight": -1}]"#;
    let data = dir.join("prompts.jsonl");
    std::fs::write(
        &data,
        (0..4)
            .map(|i| format!("{{\"question\": \"Say hello {i}.\", \"answer\": \"{i}\", \"rubric\": {rubric}}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let sets: Vec<String> = [
        format!("data.path={:?}", data.display().to_string()),
        "data.columns={prompt = \"question\", answer = \"answer\", rubric = \"rubric\"}".into(),
        format!(
            "rewards.proxy={{kind = \"rubric\", template = \"{{{{criteria}}}}\\n\\n{{{{response}}}}\", \
             on_malformed = \"neutral\", endpoint = {{base_url = \"{}\", model = \"{MODEL}\", \
             concurrency = 4, max_tokens = 256, max_retries = 2, backoff_s = 0.05}}}}",
            server.url()
        ),
        "rl.steps=2".into(),
    ]
    .into();
    let config = ExperimentConfig::parse_at(presets::preset("grpo-hf").unwrap(), &sets, &repo)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut runner = Runner::create(&dir.join("runs"), config)
        .unwrap()
        .quiet(true);
    experiments::run::<Autodiff<Dispatch>>(&mut runner, &cpu()).unwrap();
    let run = runner.dir().path().to_path_buf();

    let read = |file: &str| goodhart_metrics::sink::read_objects(run.join(file)).unwrap();
    let samples = read("samples.jsonl");
    assert_eq!(samples.len(), 2 * 4 * 4);
    for s in &samples {
        assert_eq!(s["rewards"]["proxy"], 0.5, "{s:?}");
    }
    // Cumulative usage per step: each sample so far was a cache hit or asked once (its
    // re-asks for a malformed answer and its retries are counted apart).
    let steps = read("metrics.jsonl");
    assert_eq!(steps.len(), 2);
    let mut asked = 0.0;
    for (k, m) in steps.iter().enumerate() {
        let usage = |u: &str| {
            m[&format!("reward/usage/proxy/rubric/{u}")]
                .as_f64()
                .unwrap()
        };
        assert_eq!(
            usage("requests") - usage("retries") - usage("malformed_retries") + usage("cache_hits"),
            16.0 * (k + 1) as f64,
            "{m:?}"
        );
        assert!(usage("prompt_tokens") > 0.0 && usage("completion_tokens") > 0.0);
        asked =
            usage("requests") - usage("retries") - usage("malformed_retries") - usage("malformed");
    }
    // Every answer that parsed is in the run's cache, under the reward's name.
    let cache = std::fs::read_to_string(run.join("judge_cache/proxy.jsonl")).unwrap();
    assert_eq!(cache.lines().count() as f64, asked);
    assert!(asked > 0.0);
    std::fs::remove_dir_all(dir).unwrap();
}
