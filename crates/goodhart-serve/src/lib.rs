//! # goodhart-serve
//!
//! An OpenAI-compatible HTTP server over a [`TextModel`] (any model directory goodhart
//! loads, a policy it trained included), on axum and tokio, so any OpenAI client can
//! sample a policy.
//!
//! Endpoints:
//! - `GET /v1/models`: the one model, under its name;
//! - `POST /v1/completions`: `prompt` (a string, or a list of one), `max_tokens`
//!   (default 16), `temperature` (default 1; 0 is greedy), `top_p`, `seed`, `logprobs`
//!   (0: each new token's log-prob in `choices[0].logprobs`);
//! - `POST /v1/chat/completions`: `messages` rendered with the model's chat template
//!   (generation prompt added), `max_tokens` or `max_completion_tokens` (default 256),
//!   `temperature`, `top_p`, `seed`, `logprobs` (true: `choices[0].logprobs.content`).
//!
//! Every response has `usage` (prompt, completion and total tokens) and `finish_reason`
//! (`stop` at an EOS id, else `length`). Log-probs are the model's own at temperature 1
//! (as [`TextModel::complete`] gives them). Requests run one at a time on the model; a
//! request without a `seed` takes the next of a counter, so a server's answers are the
//! same from one start to the next. What is not supported is refused with a 400 and an
//! OpenAI-style error naming the field: `stream`, `n` other than 1, `stop`, top
//! alternatives (`logprobs` > 0 on completions, `top_logprobs` > 0), a prompt and
//! `max_tokens` beyond the model's positions.

use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc, Mutex,
};

use axum::{
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use burn::tensor::backend::Backend;
use goodhart_policy::{ChatMessage, Completion, TextModel, Tokenizer};
use serde_json::{json, Value};

/// What the handlers share.
struct Server<B: Backend> {
    model: Mutex<TextModel<B>>,
    name: String,
    requests: AtomicU64,
    in_flight: AtomicUsize,
    peak_in_flight: AtomicUsize,
}

/// A request refused: its status and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
}

impl ApiError {
    fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: Some(param.into()),
        }
    }

    fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            param: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = if self.status == StatusCode::BAD_REQUEST {
            "invalid_request_error"
        } else {
            "server_error"
        };
        let body = json!({"error": {"message": self.message, "type": kind, "param": self.param, "code": null}});
        (self.status, Json(body)).into_response()
    }
}

type Reply = Result<Json<Value>, ApiError>;

/// The router of the endpoints over `model`, served under `name`.
pub fn router<B: Backend>(model: TextModel<B>, name: &str) -> Router
where
    TextModel<B>: Send,
{
    let state = Arc::new(Server {
        model: Mutex::new(model),
        name: name.into(),
        requests: AtomicU64::new(0),
        in_flight: AtomicUsize::new(0),
        peak_in_flight: AtomicUsize::new(0),
    });
    Router::new()
        .route("/v1/models", get(models::<B>))
        .route("/v1/completions", post(completions::<B>))
        .route("/v1/chat/completions", post(chat_completions::<B>))
        .route("/health", get(health::<B>))
        .with_state(state)
}

/// Serves `router` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router).await
}

/// Serves `router` on a bound standard-library `listener` until the process ends, on a
/// multi-threaded tokio runtime of its own: for callers without one (`cargo xtask serve`,
/// tests that start a server in a thread or a child process).
pub fn serve_blocking(listener: std::net::TcpListener, router: Router) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    listener.set_nonblocking(true)?;
    runtime.block_on(async { serve(tokio::net::TcpListener::from_std(listener)?, router).await })
}

async fn models<B: Backend>(State(s): State<Arc<Server<B>>>) -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": s.name, "object": "model", "owned_by": "goodhart"}]}),
    )
}

/// Requests served and the most that were ever in flight at once.
async fn health<B: Backend>(State(s): State<Arc<Server<B>>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "requests": s.requests.load(Ordering::Relaxed),
        "peak_in_flight": s.peak_in_flight.load(Ordering::Relaxed),
    }))
}

/// The sampling settings of a request.
struct Settings {
    max_tokens: usize,
    temperature: f64,
    top_p: f64,
    seed: Option<u64>,
}

fn number(body: &Value, key: &str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|x| x.is_finite())
            .map(Some)
            .ok_or_else(|| ApiError::bad(key, format!("`{key}` must be a number, got {v}"))),
    }
}

fn whole(body: &Value, key: &str) -> Result<Option<u64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad(
                key,
                format!("`{key}` must be a non-negative integer, got {v}"),
            )
        }),
    }
}

/// The settings every endpoint reads, and the refusals they share.
fn settings(body: &Value, default_max: usize, max_keys: &[&str]) -> Result<Settings, ApiError> {
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(ApiError::bad("stream", "streaming is not supported"));
    }
    if let Some(n) = whole(body, "n")? {
        if n != 1 {
            return Err(ApiError::bad(
                "n",
                format!("one choice per request, got n = {n}"),
            ));
        }
    }
    if !matches!(body.get("stop"), None | Some(Value::Null)) {
        return Err(ApiError::bad(
            "stop",
            "stop sequences are not supported (responses end at the model's EOS ids)",
        ));
    }
    let mut max_tokens = default_max;
    for key in max_keys {
        if let Some(m) = whole(body, key)? {
            if m == 0 {
                return Err(ApiError::bad(key, format!("`{key}` must be at least 1")));
            }
            max_tokens = m as usize;
        }
    }
    let temperature = number(body, "temperature")?.unwrap_or(1.0);
    if temperature < 0.0 {
        return Err(ApiError::bad(
            "temperature",
            format!("must be >= 0, got {temperature}"),
        ));
    }
    let top_p = number(body, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(
            "top_p",
            format!("must be in (0, 1], got {top_p}"),
        ));
    }
    Ok(Settings {
        max_tokens,
        temperature,
        top_p,
        seed: whole(body, "seed")?,
    })
}

/// A request in flight, counted from the handler's start to its end (`/health`).
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl<B: Backend> Server<B> {
    /// Counts a request in flight until the guard drops.
    fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(&self.in_flight)
    }
}

/// Runs `work` with the model and the request's number on a blocking thread: requests
/// wait for the model there, never on one of the runtime's workers.
async fn on_model<B: Backend, T: Send + 'static>(
    s: &Arc<Server<B>>,
    work: impl FnOnce(&TextModel<B>, u64) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError>
where
    TextModel<B>: Send,
{
    let id = s.requests.fetch_add(1, Ordering::Relaxed);
    let server = s.clone();
    tokio::task::spawn_blocking(move || {
        let model = server
            .model
            .lock()
            .map_err(|_| ApiError::internal("the model lock is poisoned"))?;
        work(&model, id)
    })
    .await
    .map_err(|e| ApiError::internal(format!("generation failed: {e}")))?
}

/// Generates after `prompt_ids` (a request without a seed takes its number): the
/// completion, and whether it stopped at an EOS id.
fn complete<B: Backend>(
    model: &TextModel<B>,
    prompt_ids: Vec<u32>,
    settings: &Settings,
    id: u64,
) -> Result<(Completion, bool), ApiError> {
    let positions = model.model.trunk.max_seq_len();
    if prompt_ids.len() + settings.max_tokens > positions {
        return Err(ApiError::bad(
            "max_tokens",
            format!(
                "the prompt's {} tokens and max_tokens {} exceed the model's {positions} positions",
                prompt_ids.len(),
                settings.max_tokens
            ),
        ));
    }
    let mut config = model.generation_config(settings.max_tokens);
    config = if settings.temperature == 0.0 {
        config.with_greedy(true)
    } else {
        config
            .with_temperature(settings.temperature)
            .with_top_p(settings.top_p)
    };
    let done = model
        .complete(&prompt_ids, &config, settings.seed.unwrap_or(id))
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let stopped = done
        .ids
        .last()
        .is_some_and(|t| model.config.eos_token_ids.contains(t));
    Ok((done, stopped))
}

fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.prompt_ids.len(),
        "completion_tokens": c.ids.len(),
        "total_tokens": c.prompt_ids.len() + c.ids.len(),
    })
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Each new token's text, decoded alone.
fn token_texts<B: Backend>(model: &TextModel<B>, ids: &[u32]) -> Result<Vec<String>, ApiError> {
    ids.iter()
        .map(|&id| {
            model
                .tokenizer
                .decode(&[id])
                .map_err(|e| ApiError::internal(e.to_string()))
        })
        .collect()
}

async fn completions<B: Backend>(State(s): State<Arc<Server<B>>>, Json(body): Json<Value>) -> Reply
where
    TextModel<B>: Send,
{
    let _in_flight = s.enter();
    let prompt = match body.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_string()
        }
        _ => {
            return Err(ApiError::bad(
                "prompt",
                "`prompt` must be a string (or a list of one)",
            ))
        }
    };
    let logprobs = whole(&body, "logprobs")?;
    if logprobs.is_some_and(|k| k > 0) {
        return Err(ApiError::bad(
            "logprobs",
            "top alternatives are not returned: use logprobs = 0 for each token's log-prob",
        ));
    }
    let settings = settings(&body, 16, &["max_tokens"])?;
    let prompt_len = prompt.len();
    let (done, stopped, tokens) = on_model(&s, move |model, id| {
        let ids = model
            .prompt_ids(&prompt, false)
            .map_err(|e| ApiError::bad("prompt", e.to_string()))?;
        let (done, stopped) = complete(model, ids, &settings, id)?;
        let tokens = match logprobs {
            Some(_) => token_texts(model, &done.ids)?,
            None => Vec::new(),
        };
        Ok((done, stopped, tokens))
    })
    .await?;
    let logprobs = match logprobs {
        Some(_) => {
            let mut offset = prompt_len;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let at = offset;
                    offset += t.len();
                    at
                })
                .collect();
            json!({"tokens": tokens, "token_logprobs": done.logprobs, "top_logprobs": null, "text_offset": offsets})
        }
        None => Value::Null,
    };
    Ok(Json(json!({
        "id": format!("cmpl-{}", s.requests.load(Ordering::Relaxed)),
        "object": "text_completion",
        "created": created(),
        "model": s.name,
        "choices": [{
            "index": 0,
            "text": done.text,
            "logprobs": logprobs,
            "finish_reason": if stopped { "stop" } else { "length" },
        }],
        "usage": usage(&done),
    })))
}

async fn chat_completions<B: Backend>(
    State(s): State<Arc<Server<B>>>,
    Json(body): Json<Value>,
) -> Reply
where
    TextModel<B>: Send,
{
    let _in_flight = s.enter();
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad("messages", "`messages` must be a non-empty list"))?
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| {
                m.get(k).and_then(Value::as_str).ok_or_else(|| {
                    ApiError::bad("messages", format!("messages[{i}].{k} must be a string"))
                })
            };
            Ok(ChatMessage::new(field("role")?, field("content")?))
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    let logprobs = match body.get("logprobs") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ApiError::bad(
                "logprobs",
                format!("`logprobs` must be a boolean, got {v}"),
            ))
        }
    };
    if whole(&body, "top_logprobs")?.is_some_and(|k| k > 0) {
        return Err(ApiError::bad(
            "top_logprobs",
            "top alternatives are not returned",
        ));
    }
    let settings = settings(&body, 256, &["max_tokens", "max_completion_tokens"])?;
    let (done, stopped, tokens) = on_model(&s, move |model, id| {
        let (_, ids) = model
            .tokenizer
            .apply_chat_template(&messages, true, &Default::default())
            .map_err(|e| ApiError::bad("messages", e.to_string()))?;
        let (done, stopped) = complete(model, ids, &settings, id)?;
        let tokens = if logprobs {
            token_texts(model, &done.ids)?
        } else {
            Vec::new()
        };
        Ok((done, stopped, tokens))
    })
    .await?;
    let logprobs = if logprobs {
        let content: Vec<Value> = tokens
            .iter()
            .zip(&done.logprobs)
            .map(|(t, lp)| json!({"token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": []}))
            .collect();
        json!({"content": content})
    } else {
        Value::Null
    };
    Ok(Json(json!({
        "id": format!("chatcmpl-{}", s.requests.load(Ordering::Relaxed)),
        "object": "chat.completion",
        "created": created(),
        "model": s.name,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": done.text},
            "logprobs": logprobs,
            "finish_reason": if stopped { "stop" } else { "length" },
        }],
        "usage": usage(&done),
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use goodhart_core::device::{cpu, Dispatch};

    fn fixture() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../goodhart-policy/fixtures/hf/qwen2")
    }

    /// A server on a free loopback port, in a thread of its own; its base URL.
    fn start() -> String {
        let model = TextModel::<Dispatch>::load(&fixture(), &cpu()).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            serve_blocking(listener, router(model, "qwen2-fixture")).unwrap();
        });
        url
    }

    /// One HTTP/1.1 request on a fresh connection: status and JSON body.
    fn request(url: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        use std::io::{Read, Write};
        let addr = url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let body = body.map(Value::to_string).unwrap_or_default();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let (_, json) = response.split_once("\r\n\r\n").unwrap();
        (
            status,
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}")),
        )
    }

    fn post(url: &str, path: &str, body: Value) -> (u16, Value) {
        request(url, "POST", path, Some(&body))
    }

    fn get(url: &str, path: &str) -> Value {
        request(url, "GET", path, None).1
    }

    #[test]
    fn completions_match_the_model_and_bad_requests_name_the_field() {
        let url = start();
        let models = get(&url, "/v1/models");
        assert_eq!(models["data"][0]["id"], "qwen2-fixture");
        // Greedy, with log-probs: transformers' own greedy continuation of the fixture's
        // reference prompt (reference.json), ids through the tokens' texts.
        let reference: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture().join("reference.json")).unwrap(),
        )
        .unwrap();
        let greedy = &reference["greedy"];
        let (status, r) = post(
            &url,
            "/v1/completions",
            json!({"model": "qwen2-fixture", "prompt": greedy["prompt"], "max_tokens": 8, "temperature": 0, "logprobs": 0}),
        );
        assert_eq!(status, 200, "{r}");
        let choice = &r["choices"][0];
        assert_eq!(choice["text"], greedy["text"]);
        let want: Vec<f64> = greedy["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got: Vec<f64> = choice["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-3, "{got:?} vs {want:?}");
        }
        assert_eq!(r["usage"]["completion_tokens"], want.len());
        assert_eq!(
            r["usage"]["prompt_tokens"],
            greedy["prompt_ids"].as_array().unwrap().len()
        );
        // Sampling with a seed: the same answer twice.
        let sample = json!({"prompt": "Hello", "max_tokens": 12, "temperature": 1.0, "seed": 7});
        let (a, b) = (
            post(&url, "/v1/completions", sample.clone()).1,
            post(&url, "/v1/completions", sample).1,
        );
        assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
        // Chat: through the chat template, one log-prob per new token.
        let (status, c) = post(
            &url,
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "What is two plus two?"}], "max_tokens": 6, "logprobs": true, "seed": 1}),
        );
        assert_eq!(status, 200, "{c}");
        let n = c["usage"]["completion_tokens"].as_u64().unwrap() as usize;
        assert_eq!(
            c["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .len(),
            n
        );
        assert_eq!(c["choices"][0]["message"]["role"], "assistant");
        assert!(["stop", "length"].contains(&c["choices"][0]["finish_reason"].as_str().unwrap()));
        // Refusals, each naming its field.
        for (path, body, param) in [
            ("/v1/completions", json!({"prompt": "x", "n": 2}), "n"),
            (
                "/v1/completions",
                json!({"prompt": "x", "stream": true}),
                "stream",
            ),
            (
                "/v1/completions",
                json!({"prompt": "x", "max_tokens": 1000}),
                "max_tokens",
            ),
            (
                "/v1/completions",
                json!({"prompt": "x", "logprobs": 5}),
                "logprobs",
            ),
            (
                "/v1/completions",
                json!({"prompt": "x", "stop": ["\n"]}),
                "stop",
            ),
            ("/v1/completions", json!({"max_tokens": 3}), "prompt"),
            (
                "/v1/completions",
                json!({"prompt": "x", "temperature": "hot"}),
                "temperature",
            ),
            ("/v1/chat/completions", json!({"messages": []}), "messages"),
            (
                "/v1/chat/completions",
                json!({"messages": [{"role": "user"}]}),
                "messages",
            ),
        ] {
            let (status, e) = post(&url, path, body.clone());
            assert_eq!(status, 400, "{body}: {e}");
            assert_eq!(e["error"]["param"], param, "{body}: {e}");
            assert_eq!(e["error"]["type"], "invalid_request_error");
        }
        let health = get(&url, "/health");
        assert_eq!(
            health["peak_in_flight"], 1,
            "one request at a time here: {health}"
        );
    }
}
