//! A report in a real browser: headless Chromium driven through ChromeDriver (the
//! W3C WebDriver protocol over HTTP). `.ci/run` installs Debian's `chromium` and
//! `chromium-driver`; `GOODHART_BROWSER=off` skips these checks where they are not
//! installed (and says so).
//!
//! [`check_report`] opens a run's `report.html`, fails on any console error, on a chart
//! container uPlot did not draw into, or on a summary without a verdict per experiment,
//! and saves a screenshot of the whole page as `report.png` in the run directory and in
//! `target/tmp/report-screenshots/`.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{json, Value};

/// Where the screenshots are kept after the test's scratch directories go.
pub fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("report-screenshots")
}

/// A ChromeDriver process with one headless Chromium session; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    profile: PathBuf,
}

const CHROMIUM_ARGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1600",
];

impl Browser {
    /// Starts ChromeDriver and a session, or `None` when `GOODHART_BROWSER=off`. Panics
    /// with what to install when ChromeDriver or Chromium is missing.
    pub fn start() -> Option<Self> {
        if std::env::var("GOODHART_BROWSER").is_ok_and(|v| v == "off") {
            eprintln!("GOODHART_BROWSER=off: the report's browser checks are skipped");
            return None;
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        // A free port, then ChromeDriver on it; tests run in parallel, so another test's
        // driver may take the port first: ours then exits and the next try takes another.
        let mut tries = 0;
        let mut browser = loop {
            tries += 1;
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let driver = Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start chromedriver ({e}): install Debian's chromium and \
                         chromium-driver as .ci/run does, or set GOODHART_BROWSER=off"
                    )
                });
            let mut browser = Self {
                driver,
                base: format!("http://127.0.0.1:{port}"),
                session: String::new(),
                agent: agent.clone(),
                profile: std::env::temp_dir().join(format!("goodhart-chromium-{port}")),
            };
            let t0 = Instant::now();
            let mut up = false;
            while t0.elapsed() < Duration::from_secs(20) {
                if browser.driver.try_wait().ok().flatten().is_some() {
                    break;
                }
                if browser.raw("GET", "/status", None).is_ok() {
                    // Answered by our driver, not one that took the port first.
                    up = browser.driver.try_wait().ok().flatten().is_none();
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            if up {
                break browser;
            }
            assert!(tries < 5, "chromedriver did not start (5 tries)");
        };
        let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("Chromium at /usr/bin/chromium: install Debian's chromium as .ci/run does");
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|a| a.to_string()).collect();
        args.push(format!("--user-data-dir={}", browser.profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": binary, "args": args},
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let v = browser.call("POST", "/session", Some(caps));
        browser.session = v["sessionId"]
            .as_str()
            .expect("a WebDriver session id")
            .to_string();
        Some(browser)
    }

    fn raw(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let response = match (method, body) {
            ("GET", _) => self.agent.get(&url).call(),
            ("DELETE", _) => self.agent.delete(&url).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string()),
        };
        let mut response = response.map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
        if status.is_success() {
            Ok(v["value"].clone())
        } else {
            Err(format!("{method} {path}: {status}: {}", v["value"]))
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.raw(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver: {e}"))
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    pub fn eval(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            &self.session_path("/execute/sync"),
            Some(json!({"script": script, "args": args})),
        )
    }

    /// Opens a file and waits until the report's script has drawn every chart.
    pub fn open(&self, file: &Path) {
        let url = format!("file://{}", file.canonicalize().unwrap().display());
        self.call(
            "POST",
            &self.session_path("/url"),
            Some(json!({ "url": url })),
        );
        let t0 = Instant::now();
        while self.eval(
            "return !!(window.goodhartReport && window.goodhartReport.ready);",
            json!([]),
        ) != json!(true)
        {
            if t0.elapsed() > Duration::from_secs(20) {
                panic!(
                    "the report's script never finished; console: {:?}",
                    self.console_errors()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the first element matching `css` (scrolled into view, as a user would).
    pub fn click(&self, css: &str) {
        let el = self.call(
            "POST",
            &self.session_path("/element"),
            Some(json!({"using": "css selector", "value": css})),
        );
        let id = el
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element `{css}`"))
            .to_string();
        self.call(
            "POST",
            &self.session_path(&format!("/element/{id}/click")),
            None,
        );
    }

    /// The console's errors since the last call (ChromeDriver's `browser` log, SEVERE).
    pub fn console_errors(&self) -> Vec<String> {
        let logs = self.call(
            "POST",
            &self.session_path("/se/log"),
            Some(json!({"type": "browser"})),
        );
        logs.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Saves a PNG of the whole page (the window made as tall as the page, at most
    /// 16,000 pixels).
    pub fn screenshot(&self, to: &Path) {
        let height = self
            .eval(
                "return Math.min(16000, document.documentElement.scrollHeight);",
                json!([]),
            )
            .as_u64()
            .unwrap();
        self.call(
            "POST",
            &self.session_path("/window/rect"),
            Some(json!({"width": 1280, "height": height + 140})),
        );
        let png = self.call("GET", &self.session_path("/screenshot"), None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().expect("base64 PNG"))
            .expect("base64 PNG");
        assert_eq!(&bytes[1..4], b"PNG", "a PNG screenshot");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.raw("DELETE", &self.session_path(""), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Opens `dir/report.html` and checks it (see the module docs); `name` names the
/// screenshot. Returns the browser, on the page, for further checks; `None` when the
/// checks are switched off.
pub fn check_report(dir: &Path, name: &str) -> Option<Browser> {
    let browser = Browser::start()?;
    let page = dir.join("report.html");
    browser.open(&page);
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "{name}: console errors: {errors:?}");

    // Every chart container the page declares holds a drawn uPlot canvas.
    let html = std::fs::read_to_string(&page).unwrap();
    let ids = goodhart_train::report::chart_ids(&html);
    assert!(!ids.is_empty(), "{name}: the report declares no chart");
    let drawn = browser.eval(
        "return [...document.querySelectorAll('[data-chart]')]
            .filter(el => el.querySelector('.uplot canvas') && el.querySelector('canvas').width > 0)
            .map(el => el.dataset.chart);",
        json!([]),
    );
    let drawn: Vec<String> = serde_json::from_value(drawn).unwrap();
    assert_eq!(drawn, ids, "{name}: charts not drawn");

    // The summary: a verdict per experiment, with the table answering what hacked, the
    // gold peak and final gold, and the detectors' leads.
    let verdicts = browser.eval(
        "return [...document.querySelectorAll('#summary .verdict')].map(v => ({
            name: v.querySelector('h3').textContent,
            line: v.querySelector('.line').textContent,
            heads: [...v.querySelectorAll('th')].map(th => th.textContent),
        }));",
        json!([]),
    );
    let verdicts = verdicts.as_array().unwrap();
    assert!(!verdicts.is_empty(), "{name}: no verdict in the summary");
    for v in verdicts {
        let line = v["line"].as_str().unwrap();
        assert!(
            line.contains("hacked") || line.contains("nothing to judge"),
            "{name}: verdict `{line}`"
        );
        if line.contains("hacked") {
            let heads: Vec<&str> = v["heads"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_str().unwrap())
                .collect();
            for h in ["gold peak", "gold last", "hacked", "detectors"] {
                assert!(heads.contains(&h), "{name}: no `{h}` column: {heads:?}");
            }
        }
    }

    browser.screenshot(&dir.join("report.png"));
    std::fs::create_dir_all(screenshot_dir()).unwrap();
    std::fs::copy(
        dir.join("report.png"),
        screenshot_dir().join(format!("{name}.png")),
    )
    .unwrap();
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "{name}: console errors: {errors:?}");
    Some(browser)
}
