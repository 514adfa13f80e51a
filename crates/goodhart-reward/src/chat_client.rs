//! A client for OpenAI-compatible chat-completions endpoints (vLLM, SGLang, llama.cpp's
//! server, `cargo xtask serve`, hosted APIs): what the LLM-judge rewards ([`crate::llm_judge`],
//! [`crate::rubric`]) send their prompts through.
//!
//! Each request is `POST {base_url}/chat/completions` with `model`, `messages`,
//! `temperature`, `max_tokens` and, when set, `seed`; a batch goes out on at most
//! `concurrency` threads. The API key is read from the environment variable that
//! `api_key_env` names and sent as `Authorization: Bearer`; only the variable's name is
//! in the config, and the key is never written anywhere.
//!
//! **Failures.** A transport error (connection refused or reset, a timeout after
//! `timeout_s`) or a status 408, 429 or 5xx is retried up to `max_retries` times, the
//! k-th after `backoff_s * 2^(k-1)` seconds (at most `max_backoff_s`; longer when the
//! server's `Retry-After` asks for it, up to the same cap). Any other status fails at
//! once with the server's message. When a request has used its retries the batch stops:
//! no new request is sent, and the error names the endpoint, the attempts and the last
//! failure.
//!
//! **Malformed answers.** The caller parses each answer; one it cannot parse is asked
//! for again up to `malformed_retries` times, then returned as [`Malformed`] with the
//! parser's reason and the text, for the caller to count and report.
//!
//! **The cache** (a JSON-lines file, `cache`): every answer that parsed is appended and
//! flushed with its request body (the key is not part of it) under the body's 64-bit
//! FNV-1a hash; a request whose body is in the file is answered from it without a call,
//! so a rerun or a resumed run pays only for what it has not asked before. With
//! `temperature > 0`, a repeated request gets the cached sample. A line cut short by a
//! killed process (the file's last, without its newline) is dropped; any other line
//! that does not read is an error naming the file and the line.
//!
//! **Usage**: running totals of the HTTP requests sent, cache hits, retries, re-asks
//! for malformed answers and answers given up as malformed, the prompt and completion
//! tokens the endpoint reports, and their cost at the configured prices per million
//! tokens.

use std::{
    collections::HashMap,
    fs::{self, File, OpenOptions},
    hash::Hasher,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::Duration,
};

use goodhart_core::{GoodhartError, Result};
use goodhart_policy::ChatMessage;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Where and how to reach a chat-completions endpoint (`endpoint = { ... }` of a judge).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EndpointConfig {
    /// The API's base URL, up to and including `/v1` (`http://127.0.0.1:8000/v1`).
    pub base_url: String,
    /// The model name sent with every request.
    pub model: String,
    /// The environment variable holding the API key, if the endpoint needs one.
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Retries of a request after a transport error or a status 408, 429 or 5xx.
    pub max_retries: u32,
    /// The first retry's delay in seconds; each further retry doubles it.
    pub backoff_s: f64,
    /// The longest delay before a retry, in seconds.
    pub max_backoff_s: f64,
    /// Seconds a request may take, connection and answer included.
    pub timeout_s: f64,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
    /// The most tokens an answer may have.
    pub max_tokens: u32,
    /// A sampling seed sent with every request, if set.
    pub seed: Option<u64>,
    /// Times a malformed answer is asked for again before it is given up.
    pub malformed_retries: u32,
    /// The cache file (JSON lines); none when unset. An experiment sets one in its run
    /// directory.
    pub cache: Option<PathBuf>,
    /// US dollars per million prompt tokens.
    pub price_input_per_mtok: f64,
    /// US dollars per million completion tokens.
    pub price_output_per_mtok: f64,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            base_url: String::new(),
            model: String::new(),
            api_key_env: None,
            concurrency: 8,
            max_retries: 5,
            backoff_s: 1.0,
            max_backoff_s: 60.0,
            timeout_s: 120.0,
            temperature: 0.0,
            max_tokens: 1024,
            seed: None,
            malformed_retries: 2,
            cache: None,
            price_input_per_mtok: 0.0,
            price_output_per_mtok: 0.0,
        }
    }
}

impl EndpointConfig {
    /// The API key from the environment variable `api_key_env` names (none when unset);
    /// errors when the variable is empty or not set.
    pub fn api_key(&self) -> Result<Option<String>> {
        let Some(var) = &self.api_key_env else {
            return Ok(None);
        };
        match std::env::var(var) {
            Ok(key) if !key.is_empty() => Ok(Some(key)),
            _ => Err(GoodhartError::invalid(
                "endpoint.api_key_env",
                format!("the environment variable `{var}` is empty or not set"),
            )),
        }
    }

    /// Errors naming the key: a base URL that is not `http://` or `https://`, no model,
    /// a zero concurrency or `max_tokens`, a delay, timeout, temperature or price that
    /// is negative or not finite, an `api_key_env` that is empty or not set.
    pub fn validate(&self) -> Result<()> {
        let key = |k: &str| format!("endpoint.{k}");
        if !(self.base_url.starts_with("http://") || self.base_url.starts_with("https://")) {
            return Err(GoodhartError::invalid(
                key("base_url"),
                format!(
                    "`{}` is not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)",
                    self.base_url
                ),
            ));
        }
        if self.model.is_empty() {
            return Err(GoodhartError::invalid(key("model"), "is empty"));
        }
        self.api_key()?;
        for (k, v) in [
            ("concurrency", self.concurrency as u64),
            ("max_tokens", self.max_tokens as u64),
        ] {
            if v == 0 {
                return Err(GoodhartError::invalid(key(k), "must be at least 1"));
            }
        }
        for (k, v, positive) in [
            ("backoff_s", self.backoff_s, false),
            ("max_backoff_s", self.max_backoff_s, false),
            ("timeout_s", self.timeout_s, true),
            ("temperature", self.temperature, false),
            ("price_input_per_mtok", self.price_input_per_mtok, false),
            ("price_output_per_mtok", self.price_output_per_mtok, false),
        ] {
            if !v.is_finite() || v < 0.0 || (positive && v == 0.0) {
                return Err(GoodhartError::invalid(
                    key(k),
                    format!(
                        "must be finite and {}, got {v}",
                        if positive { "> 0" } else { ">= 0" }
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// An answer the caller's parser refused on every try.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    /// Why the last answer did not parse.
    pub reason: String,
    /// The last answer.
    pub content: String,
}

/// Running totals of what a client has asked and paid.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Usage {
    /// HTTP requests sent (retries included).
    pub requests: u64,
    /// Requests answered from the cache.
    pub cache_hits: u64,
    /// Retries after a transport error or a retryable status.
    pub retries: u64,
    /// Malformed answers asked for again.
    pub malformed_retries: u64,
    /// Answers given up as malformed.
    pub malformed: u64,
    /// Prompt tokens, as the endpoint reports them.
    pub prompt_tokens: u64,
    /// Completion tokens, as the endpoint reports them.
    pub completion_tokens: u64,
    /// Their cost in US dollars at the configured prices.
    pub cost_usd: f64,
}

impl Usage {
    /// The totals by name, for metrics.
    pub fn entries(&self) -> Vec<(String, f64)> {
        [
            ("requests", self.requests as f64),
            ("cache_hits", self.cache_hits as f64),
            ("retries", self.retries as f64),
            ("malformed_retries", self.malformed_retries as f64),
            ("malformed", self.malformed as f64),
            ("prompt_tokens", self.prompt_tokens as f64),
            ("completion_tokens", self.completion_tokens as f64),
            ("cost_usd", self.cost_usd),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// A client of one endpoint (see the module docs).
pub struct ChatClient {
    config: EndpointConfig,
    url: String,
    key: Option<String>,
    agent: ureq::Agent,
    cache: Option<Mutex<Cache>>,
    usage: Mutex<Usage>,
}

/// Why a request got no answer.
enum Failure {
    /// It was not sent: another request of the batch failed first.
    Stopped,
    /// It failed.
    Error(GoodhartError),
}

impl ChatClient {
    /// A client for `config`; errors on an invalid config, an `api_key_env` that is not
    /// set, or a cache file that does not read.
    pub fn new(config: &EndpointConfig) -> Result<Self> {
        config.validate()?;
        let key = config.api_key()?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(config.timeout_s)))
            .http_status_as_error(false)
            .max_idle_connections_per_host(config.concurrency)
            .build()
            .into();
        Ok(Self {
            url: format!("{}/chat/completions", config.base_url.trim_end_matches('/')),
            key,
            agent,
            cache: config
                .cache
                .as_deref()
                .map(Cache::open)
                .transpose()?
                .map(Mutex::new),
            usage: Mutex::new(Usage::default()),
            config: config.clone(),
        })
    }

    /// The totals so far.
    pub fn usage(&self) -> Usage {
        self.usage.lock().expect("usage").clone()
    }

    /// Asks every conversation of `requests` and parses each answer with `parse(i,
    /// text)`: per request, the parsed value or [`Malformed`]. Errors (as
    /// [`GoodhartError::Remote`] under `service`) when a request fails for good or the
    /// cache cannot be written.
    pub fn ask<T: Send>(
        &self,
        service: &str,
        requests: &[Vec<ChatMessage>],
        parse: impl Fn(usize, &str) -> std::result::Result<T, String> + Sync,
    ) -> Result<Vec<std::result::Result<T, Malformed>>> {
        let stop = AtomicBool::new(false);
        let answers = crate::workers::map(self.config.concurrency, requests.len(), |i| {
            let r = self.ask_one(service, &requests[i], |text| parse(i, text), &stop);
            if r.is_err() {
                stop.store(true, Ordering::SeqCst);
            }
            r
        });
        let mut out = Vec::with_capacity(answers.len());
        let mut failed = None;
        for a in answers {
            match a {
                Ok(v) => out.push(v),
                Err(Failure::Error(e)) => {
                    failed.get_or_insert(e);
                }
                Err(Failure::Stopped) => {}
            }
        }
        match failed {
            Some(e) => Err(e),
            None if out.len() == requests.len() => Ok(out),
            None => Err(GoodhartError::Remote {
                service: service.to_string(),
                reason: "requests were stopped without a failure".into(),
            }),
        }
    }

    fn ask_one<T>(
        &self,
        service: &str,
        messages: &[ChatMessage],
        parse: impl Fn(&str) -> std::result::Result<T, String>,
        stop: &AtomicBool,
    ) -> std::result::Result<std::result::Result<T, Malformed>, Failure> {
        let mut body = json!({
            "model": self.config.model,
            "messages": messages,
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        });
        if let Some(seed) = self.config.seed {
            body["seed"] = json!(seed);
        }
        if let Some(cache) = &self.cache {
            let hit = cache.lock().expect("cache").get(&body);
            if let Some(Ok(v)) = hit.as_deref().map(&parse) {
                self.usage.lock().expect("usage").cache_hits += 1;
                return Ok(Ok(v));
            }
        }
        let text = body.to_string();
        let mut last = None;
        for attempt in 0..=self.config.malformed_retries {
            if attempt > 0 {
                self.usage.lock().expect("usage").malformed_retries += 1;
            }
            let content = self.send(service, &text, stop)?;
            match parse(&content) {
                Ok(v) => {
                    if let Some(cache) = &self.cache {
                        cache
                            .lock()
                            .expect("cache")
                            .put(&body, &content)
                            .map_err(Failure::Error)?;
                    }
                    return Ok(Ok(v));
                }
                Err(reason) => last = Some(Malformed { reason, content }),
            }
        }
        self.usage.lock().expect("usage").malformed += 1;
        Ok(Err(last.expect("at least one attempt")))
    }

    /// One request with its retries: the answer's text.
    fn send(
        &self,
        service: &str,
        body: &str,
        stop: &AtomicBool,
    ) -> std::result::Result<String, Failure> {
        let remote = |reason: String| {
            Failure::Error(GoodhartError::Remote {
                service: service.to_string(),
                reason,
            })
        };
        let mut delay = Duration::ZERO;
        let mut last = String::new();
        for attempt in 0..=self.config.max_retries {
            if attempt > 0 {
                let backoff = self.config.backoff_s * 2f64.powi(attempt as i32 - 1);
                std::thread::sleep(
                    delay
                        .max(Duration::from_secs_f64(backoff))
                        .min(Duration::from_secs_f64(self.config.max_backoff_s)),
                );
                self.usage.lock().expect("usage").retries += 1;
            }
            if stop.load(Ordering::SeqCst) {
                return Err(Failure::Stopped);
            }
            let mut request = self
                .agent
                .post(&self.url)
                .header("Content-Type", "application/json");
            if let Some(key) = &self.key {
                request = request.header("Authorization", format!("Bearer {key}"));
            }
            self.usage.lock().expect("usage").requests += 1;
            let mut response = match request.send(body) {
                Ok(r) => r,
                Err(e) => {
                    last = e.to_string();
                    delay = Duration::ZERO;
                    continue;
                }
            };
            let status = response.status().as_u16();
            delay = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|s| s.is_finite() && *s >= 0.0)
                .map(Duration::from_secs_f64)
                .unwrap_or(Duration::ZERO);
            let text = match response
                .body_mut()
                .with_config()
                .limit(64 << 20)
                .read_to_string()
            {
                Ok(t) => t,
                Err(e) => {
                    last = format!("status {status}, and its body did not read: {e}");
                    continue;
                }
            };
            match status {
                200 => {
                    return self
                        .answer(&text)
                        .map_err(|why| remote(format!("POST {}: {why}", self.url)))
                }
                408 | 429 | 500..=599 => last = format!("status {status}: {}", excerpt(&text)),
                _ => {
                    return Err(remote(format!(
                        "POST {}: status {status}: {}",
                        self.url,
                        excerpt(&text)
                    )))
                }
            }
        }
        Err(remote(format!(
            "POST {} failed {} times; the last: {last}",
            self.url,
            self.config.max_retries + 1
        )))
    }

    /// The text of a 200 answer, its token counts added to the usage.
    fn answer(&self, text: &str) -> std::result::Result<String, String> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| format!("the answer is not JSON ({e}): {}", excerpt(text)))?;
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .ok_or_else(|| {
                format!(
                    "the answer has no `choices[0].message.content` string: {}",
                    excerpt(text)
                )
            })?;
        let tokens = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
        let mut usage = self.usage.lock().expect("usage");
        let (p, c) = (tokens("prompt_tokens"), tokens("completion_tokens"));
        usage.prompt_tokens += p;
        usage.completion_tokens += c;
        usage.cost_usd += (p as f64 * self.config.price_input_per_mtok
            + c as f64 * self.config.price_output_per_mtok)
            / 1e6;
        Ok(content.to_string())
    }
}

/// The first 300 characters of `text`.
fn excerpt(text: &str) -> String {
    let mut chars = text.chars();
    let head: String = chars.by_ref().take(300).collect();
    if chars.next().is_some() {
        format!("{head}...")
    } else {
        head
    }
}

/// The 64-bit FNV-1a hash of a request body, in hex.
fn hash(body: &Value) -> String {
    let mut h = fnv::FnvHasher::default();
    h.write(body.to_string().as_bytes());
    format!("{:016x}", h.finish())
}

/// The cache file and what it holds: by hash, each request body with its answer.
struct Cache {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Vec<(Value, String)>>,
}

impl Cache {
    fn open(path: &Path) -> Result<Self> {
        let bad =
            |reason: String| GoodhartError::invalid(format!("cache `{}`", path.display()), reason);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        }
        let text = match fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(bad(e.to_string())),
        };
        // A last line without its newline was cut short: drop it.
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        let mut entries: HashMap<String, Vec<(Value, String)>> = HashMap::new();
        for (n, line) in text[..whole].lines().enumerate() {
            let entry: Value =
                serde_json::from_str(line).map_err(|e| bad(format!("line {}: {e}", n + 1)))?;
            match (&entry["key"], &entry["request"], &entry["content"]) {
                (Value::String(key), request @ Value::Object(_), Value::String(content)) => entries
                    .entry(key.clone())
                    .or_default()
                    .push((request.clone(), content.clone())),
                _ => {
                    return Err(bad(format!(
                        "line {}: not a {{\"key\", \"request\", \"content\"}} entry",
                        n + 1
                    )))
                }
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| bad(e.to_string()))?;
        file.set_len(whole as u64).map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            entries,
        })
    }

    fn get(&self, body: &Value) -> Option<String> {
        self.entries
            .get(&hash(body))?
            .iter()
            .find(|(request, _)| request == body)
            .map(|(_, content)| content.clone())
    }

    fn put(&mut self, body: &Value, content: &str) -> Result<()> {
        let key = hash(body);
        let mut line = json!({"key": key, "request": body, "content": content}).to_string();
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.flush())
            .map_err(|e| {
                GoodhartError::invalid(format!("cache `{}`", self.path.display()), e.to_string())
            })?;
        self.entries
            .entry(key)
            .or_default()
            .push((body.clone(), content.to_string()));
        Ok(())
    }
}

/// A scripted OpenAI-compatible endpoint on loopback for the judges' tests: each
/// request gets what `answer(n, body)` returns (`n` counts requests from 0).
#[cfg(test)]
pub(crate) mod scripted {
    use std::{
        io::{BufRead, BufReader, Read, Write},
        net::TcpListener,
        sync::{
            atomic::{AtomicUsize, Ordering},
            Arc, Mutex,
        },
    };

    use serde_json::{json, Value};

    /// A reply: status, extra headers, body.
    pub(crate) type Reply = (u16, Vec<(String, String)>, String);

    /// A 200 chat completion holding `content`, 10 prompt and 5 completion tokens.
    pub(crate) fn completion(content: &str) -> Reply {
        let body = json!({
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        });
        (200, Vec::new(), body.to_string())
    }

    /// What the server saw: each request's body and `Authorization` header.
    #[derive(Default)]
    pub(crate) struct Seen {
        pub bodies: Vec<Value>,
        pub auth: Vec<Option<String>>,
    }

    /// Starts the server; its base URL (`.../v1`) and what it saw.
    pub(crate) fn start(
        answer: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Seen>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Seen::default()));
        let answer = Arc::new(answer);
        let count = Arc::new(AtomicUsize::new(0));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (answer, count, log) = (answer.clone(), count.clone(), log.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let (mut length, mut auth) = (0, None);
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        let (k, v) = line.split_once(':').unwrap_or((line, ""));
                        match k.to_ascii_lowercase().as_str() {
                            "content-length" => length = v.trim().parse().unwrap(),
                            "authorization" => auth = Some(v.trim().to_string()),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    let body: Value = serde_json::from_slice(&body).unwrap();
                    let n = count.fetch_add(1, Ordering::SeqCst);
                    {
                        let mut log = log.lock().unwrap();
                        log.bodies.push(body.clone());
                        log.auth.push(auth);
                    }
                    let (status, headers, text) = answer(n, &body);
                    let extra: String = headers
                        .iter()
                        .map(|(k, v)| format!("{k}: {v}\r\n"))
                        .collect();
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                         {extra}Connection: close\r\n\r\n{text}",
                        text.len()
                    );
                });
            }
        });
        (url, seen)
    }
}

#[cfg(test)]
mod tests {
    use super::{scripted::*, *};

    fn config(url: &str) -> EndpointConfig {
        EndpointConfig {
            base_url: url.into(),
            model: "judge".into(),
            backoff_s: 0.01,
            max_retries: 2,
            price_input_per_mtok: 1.0,
            price_output_per_mtok: 4.0,
            ..Default::default()
        }
    }

    fn ask(client: &ChatClient, n: usize) -> Result<Vec<std::result::Result<String, Malformed>>> {
        let requests: Vec<_> = (0..n)
            .map(|i| vec![ChatMessage::new("user", format!("question {i}"))])
            .collect();
        client.ask("judge", &requests, |_, a| {
            a.strip_prefix("ok ")
                .map(str::to_string)
                .ok_or_else(|| "no `ok`".to_string())
        })
    }

    #[test]
    fn retries_429_and_5xx_then_fails_with_the_attempts() {
        // 429 (asking for a 0.05 s wait), then 503, then an answer.
        let (url, seen) = start(|n, _| match n {
            0 => (
                429,
                vec![("Retry-After".into(), "0.05".into())],
                "slow down".into(),
            ),
            1 => (503, Vec::new(), "busy".into()),
            _ => completion("ok 1"),
        });
        let client = ChatClient::new(&config(&url)).unwrap();
        let started = std::time::Instant::now();
        assert_eq!(ask(&client, 1).unwrap(), vec![Ok("1".to_string())]);
        assert!(
            started.elapsed() >= Duration::from_millis(50),
            "Retry-After is honoured"
        );
        let u = client.usage();
        assert_eq!(
            (u.requests, u.retries, u.prompt_tokens, u.completion_tokens),
            (3, 2, 10, 5)
        );
        assert!((u.cost_usd - (10.0 * 1.0 + 5.0 * 4.0) / 1e6).abs() < 1e-15);
        let body = seen.lock().unwrap().bodies[0].clone();
        assert_eq!(body["model"], "judge");
        assert_eq!(body["messages"][0]["content"], "question 0");
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["max_tokens"], 1024);

        // Always 500: 1 + max_retries attempts, then an error that says so.
        let (url, _) = start(|_, _| (500, Vec::new(), "internal".into()));
        let client = ChatClient::new(&config(&url)).unwrap();
        let err = ask(&client, 1).unwrap_err().to_string();
        assert!(
            err.contains("failed 3 times") && err.contains("status 500: internal"),
            "{err}"
        );
        assert_eq!(client.usage().requests, 3);

        // A 401 is not retried.
        let (url, _) = start(|_, _| (401, Vec::new(), "{\"error\": \"bad key\"}".into()));
        let client = ChatClient::new(&config(&url)).unwrap();
        let err = ask(&client, 2).unwrap_err().to_string();
        assert!(
            err.contains("status 401") && err.contains("bad key"),
            "{err}"
        );
        assert!(client.usage().requests <= 2, "one try per request at most");
    }

    #[test]
    fn nothing_listening_is_retried_then_a_clear_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let client = ChatClient::new(&config(&format!("http://127.0.0.1:{port}/v1"))).unwrap();
        let err = ask(&client, 3).unwrap_err();
        assert!(matches!(err, GoodhartError::Remote { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&format!(
                "127.0.0.1:{port}/v1/chat/completions failed 3 times"
            )),
            "{text}"
        );
        let u = client.usage();
        assert!(u.requests >= 3 && u.requests <= 9, "{u:?}");
    }

    #[test]
    fn malformed_answers_are_asked_again_then_returned() {
        // Request "question 0" is malformed once; "question 1" always.
        let (url, _) = start(|n, body| {
            let q = body["messages"][0]["content"].as_str().unwrap().to_string();
            match (q.as_str(), n) {
                ("question 0", 0) => completion("garbage"),
                ("question 0", _) => completion("ok zero"),
                _ => completion("still garbage"),
            }
        });
        let client = ChatClient::new(&EndpointConfig {
            concurrency: 1,
            ..config(&url)
        })
        .unwrap();
        let got = ask(&client, 2).unwrap();
        assert_eq!(got[0], Ok("zero".to_string()));
        assert_eq!(
            got[1],
            Err(Malformed {
                reason: "no `ok`".into(),
                content: "still garbage".into()
            })
        );
        let u = client.usage();
        // 2 tries for the first, 1 + malformed_retries (2) for the second.
        assert_eq!((u.requests, u.malformed_retries, u.malformed), (5, 3, 1));
    }

    #[test]
    fn the_cache_answers_a_rerun_and_survives_a_cut_line() {
        let dir = std::env::temp_dir().join(format!("goodhart-cache-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("judge.jsonl");
        let (url, _) = start(|n, _| completion(&format!("ok {n}")));
        std::env::set_var("GOODHART_TEST_JUDGE_KEY", "sk-secret");
        let cfg = EndpointConfig {
            cache: Some(path.clone()),
            api_key_env: Some("GOODHART_TEST_JUDGE_KEY".into()),
            concurrency: 1,
            ..config(&url)
        };
        let first = ask(&ChatClient::new(&cfg).unwrap(), 3).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(!text.contains("sk-secret"), "the key is never stored");
        // A rerun asks nothing.
        let client = ChatClient::new(&cfg).unwrap();
        assert_eq!(ask(&client, 3).unwrap(), first);
        assert_eq!((client.usage().requests, client.usage().cache_hits), (0, 3));
        // A killed process left half a line: it is dropped, and its request asked again.
        let cut = text.rfind("{\"content").unwrap() + 20;
        fs::write(&path, &text[..cut]).unwrap();
        let client = ChatClient::new(&cfg).unwrap();
        assert_eq!(ask(&client, 3).unwrap().len(), 3);
        assert_eq!((client.usage().requests, client.usage().cache_hits), (1, 2));
        assert_eq!(fs::read_to_string(&path).unwrap().lines().count(), 3);
        // Any other bad line is an error naming it.
        fs::write(&path, "{\"key\": 1}\n").unwrap();
        let err = ChatClient::new(&cfg).err().unwrap().to_string();
        assert!(
            err.contains("judge.jsonl") && err.contains("line 1"),
            "{err}"
        );
        std::env::remove_var("GOODHART_TEST_JUDGE_KEY");
        let err = ChatClient::new(&cfg).err().unwrap().to_string();
        assert!(err.contains("GOODHART_TEST_JUDGE_KEY"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_key_goes_in_the_authorization_header() {
        let (url, seen) = start(|_, _| completion("ok"));
        std::env::set_var("GOODHART_TEST_HEADER_KEY", "sk-abc");
        let cfg = EndpointConfig {
            api_key_env: Some("GOODHART_TEST_HEADER_KEY".into()),
            ..config(&url)
        };
        let client = ChatClient::new(&cfg).unwrap();
        client
            .ask("judge", &[vec![ChatMessage::new("user", "hi")]], |_, a| {
                Ok::<_, String>(a.to_string())
            })
            .unwrap();
        assert_eq!(
            seen.lock().unwrap().auth[0].as_deref(),
            Some("Bearer sk-abc")
        );
        let client = ChatClient::new(&config(&url)).unwrap();
        client
            .ask("judge", &[vec![ChatMessage::new("user", "hi")]], |_, a| {
                Ok::<_, String>(a.to_string())
            })
            .unwrap();
        assert_eq!(seen.lock().unwrap().auth[1], None);
    }

    #[test]
    fn bad_configs_name_their_key() {
        for (cfg, key) in [
            (
                EndpointConfig {
                    model: "m".into(),
                    ..Default::default()
                },
                "endpoint.base_url",
            ),
            (
                EndpointConfig {
                    base_url: "ftp://x".into(),
                    model: "m".into(),
                    ..Default::default()
                },
                "endpoint.base_url",
            ),
            (
                config("http://x/v1").tap(|c| c.model.clear()),
                "endpoint.model",
            ),
            (
                config("http://x/v1").tap(|c| c.concurrency = 0),
                "endpoint.concurrency",
            ),
            (
                config("http://x/v1").tap(|c| c.timeout_s = 0.0),
                "endpoint.timeout_s",
            ),
            (
                config("http://x/v1").tap(|c| c.backoff_s = f64::NAN),
                "endpoint.backoff_s",
            ),
            (
                config("http://x/v1").tap(|c| c.price_output_per_mtok = -1.0),
                "endpoint.price_output_per_mtok",
            ),
            (
                config("http://x/v1").tap(|c| c.api_key_env = Some("GOODHART_NO_SUCH_VAR".into())),
                "endpoint.api_key_env",
            ),
        ] {
            match cfg.validate() {
                Err(GoodhartError::InvalidArgument { name, .. }) => assert_eq!(name, key),
                other => panic!("{key}: {other:?}"),
            }
        }
        assert!(config("https://api.example.com/v1").validate().is_ok());
        // A variable that is set but empty holds no key.
        std::env::set_var("GOODHART_TEST_EMPTY_KEY", "");
        let err = config("http://x/v1")
            .tap(|c| c.api_key_env = Some("GOODHART_TEST_EMPTY_KEY".into()))
            .validate()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("`GOODHART_TEST_EMPTY_KEY` is empty or not set"),
            "{err}"
        );
    }

    trait Tap: Sized {
        fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
    }
    impl Tap for EndpointConfig {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
}
