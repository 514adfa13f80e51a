use super::*;
use serde_json::Value;

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("goodhart-report-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).unwrap();
    p
}

/// Two methods over steps 0..=10: proxy rises linearly; gold follows the best-of-n law
/// `d (alpha - 0.2 d)` in `d = sqrt_kl`, so it rises then falls. `grpo` (d = 0.5 s,
/// alpha = 1) peaks at d = 2.5 (step 5) and logs gold as `null` (NaN) at step 4; its
/// gold-aware detector turns on at step 6 and stays on. `<evil>&` has d = 0.4 s and
/// alpha = 0.8.
fn synthetic_metrics() -> String {
    let mut lines = Vec::new();
    for s in 0..=10 {
        let sf = s as f64;
        let d = 0.5 * sf;
        let gold = if s == 4 {
            "null".to_string()
        } else {
            format!("{}", d * (1.0 - 0.2 * d))
        };
        let fired = u8::from(s >= 6);
        lines.push(format!(
            r#"{{"step":{s},"method":"grpo","run":"seed-0","reward/proxy/mean":{},"reward/gold/mean":{gold},"sqrt_kl":{d},"kl/ref":{},"entropy":{},"detector/gold-aware/fired":{fired}}}"#,
            0.1 * sf,
            d * d,
            2.0 - 0.1 * sf
        ));
        let d = 0.4 * sf;
        lines.push(format!(
            r#"{{"step":{s},"method":"<evil>&","reward/proxy/mean":{},"reward/gold/mean":{},"sqrt_kl":{d},"kl/ref":{},"entropy":{}}}"#,
            0.08 * sf,
            d * (0.8 - 0.2 * d),
            d * d,
            2.0 - 0.05 * sf
        ));
    }
    lines.join("\n") + "\n"
}

const SUMMARY: &str = r#"{
    "name": "lab <tiny>",
    "peak": {"gold": 1.25, "step": 5},
    "fit": [{"series": "grpo", "form": "bon", "alpha": 1.0, "beta": 0.2, "r2": 0.97}],
    "detections": [
        {"detector": "gold-aware", "step": 6, "series": "grpo", "reason": "gold fell"},
        {"detector": "proxy-only", "step": 8, "series": "<evil>&"}
    ],
    "tables": [{"title": "Tomato: true return", "columns": ["method", "coef", "true return"],
                "rows": [["chi2", 0.1, 3.25], ["<kl>", 0.01, null]]}]
}"#;

/// The JSON the page's script draws from.
fn page_data(html: &str) -> Value {
    let start = html.find(r#"id="goodhart-data">"#).unwrap() + r#"id="goodhart-data">"#.len();
    let end = start + html[start..].find("</script>").unwrap();
    serde_json::from_str(&html[start..end]).unwrap()
}

fn chart<'a>(data: &'a Value, id: &str) -> &'a Value {
    data["charts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no chart {id}"))
}

fn numbers(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[test]
fn ema_is_tensorboards_debiased_average() {
    // w = 0.5: m1 = 0.5 -> 0.5 / 0.5 = 1; m2 = 0.25 + 1 = 1.25 -> 1.25 / 0.75 = 5/3;
    // m3 = 0.625 + 2 = 2.625 -> 2.625 / 0.875 = 3.
    let s = ema(&[1.0, 2.0, 4.0], 0.5);
    assert_eq!(s[0], 1.0);
    assert!((s[1] - 5.0 / 3.0).abs() < 1e-12);
    assert!((s[2] - 3.0).abs() < 1e-12);
    assert_eq!(ema(&[1.0, 2.0, 4.0], 0.0), [1.0, 2.0, 4.0]);
    // A constant stays constant at any weight.
    assert!(ema(&[2.5; 7], 0.9).iter().all(|v| (v - 2.5).abs() < 1e-12));
}

/// `none` hacks: gold 0 1 2 3 4 3 2 1 0 over steps 0..=8, a detector on at step 2;
/// `kl` holds: gold 0 1 2 3 4 4 4 4 4; `noisy` only zig-zags: 0 2 0 2 0 2 0 2 0. The proxy
/// is the step in all three.
fn hacking_metrics() -> String {
    let gold = [
        [0.0, 1.0, 2.0, 3.0, 4.0, 3.0, 2.0, 1.0, 0.0],
        [0.0, 1.0, 2.0, 3.0, 4.0, 4.0, 4.0, 4.0, 4.0],
        [0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0, 2.0, 0.0],
    ];
    let mut text = String::new();
    for s in 0..9 {
        for (name, g) in ["none", "kl", "noisy"].iter().zip(&gold) {
            let fired = u8::from(*name == "none" && s >= 2);
            text.push_str(&format!(
                r#"{{"step":{s},"experiment":"mitigations","series":"{name}","reward/proxy/mean":{s},"reward/gold/mean":{},"detector/cusum/fired":{fired}}}"#,
                g[s]
            ));
            text.push('\n');
        }
    }
    text
}

#[test]
fn verdicts_by_hand() {
    let m = Metrics::parse(&hacking_metrics(), Path::new("m")).unwrap();
    let marks = markers(&m, None);
    let v = outcome::verdicts(&m, &marks);
    assert_eq!(v.len(), 1);
    let v = &v[0];
    assert_eq!(v.group.as_deref(), Some("mitigations"));
    // Centred means of 5 (truncated at the ends) of `none`'s gold: 1, 1.5, 2, 2.6, 2.8,
    // 2.6, 2, 1.5, 1: peak 2.8 at step 4, final 1; it fell 1.8 >= 0.1 (2.8 - 1).
    let none = &v.outcomes[0];
    assert_eq!(none.series, "none");
    assert_eq!(none.peak.step, 4);
    assert!((none.peak.value - 2.8).abs() < 1e-12);
    assert!((none.peak.final_value - 1.0).abs() < 1e-12);
    assert!(none.peak.hacked);
    // Residuals -1, -0.5, 0, 0.4, 1.2, 0.4, 0, -0.5, -1: sd = sqrt(4.26 / 8); the drop
    // 1.8 is above 2 sd sqrt(2 / 5) = 0.923.
    assert!((none.noise - (4.26_f64 / 8.0).sqrt()).abs() < 1e-12);
    assert!(none.hacked);
    assert_eq!(none.gold_first, 1.0);
    // Proxy 0..8 smoothed: (0+1+2)/3 = 1 first, (6+7+8)/3 = 7 last.
    assert_eq!(none.proxy, Some((1.0, 7.0)));
    // The detector turned on at step 2: 4 - 2 = 2 steps before the peak.
    assert_eq!(
        none.leads,
        [outcome::Lead {
            detector: "cusum".into(),
            step: 2.0,
            lead: 2.0
        }]
    );
    // `kl`: 1, 1.5, 2, 2.8, 3.4, 3.8, 4, 4, 4: first maximum at step 6, final 4: held.
    let kl = &v.outcomes[1];
    assert_eq!(
        (kl.peak.step, kl.peak.value, kl.peak.hacked),
        (6, 4.0, false)
    );
    assert!(!kl.hacked);
    assert!(kl.leads.is_empty());
    // `noisy`: 2/3, 1, 0.8, 1.2, 0.8, 1.2, 0.8, 1, 2/3: the rule sees a drop of 0.533
    // from the peak 1.2 at step 3 (over 0.1 of the gain), but the residuals' sd is
    // sqrt(6.0889 / 8) = 0.872, so twice the drop's standard error is 1.10: noise.
    let noisy = &v.outcomes[2];
    assert_eq!(noisy.peak.step, 3);
    assert!(noisy.peak.hacked);
    let ss = 2.0 * (2.0_f64 / 3.0).powi(2) + 2.0 + 5.0 * 0.64;
    assert!((noisy.noise - (ss / 8.0).sqrt()).abs() < 1e-12);
    assert!(!noisy.hacked);
    assert_eq!(
        v.line,
        "1 of 3 hacked: worst none, gold 2.800 at step 4 → 1.000 at the end while the proxy \
         went 1.000 → 7.000. Held: kl, noisy (best final gold: kl, 4.000). Earliest \
         detector: cusum in none, 2 steps before the gold peak."
    );
    assert_eq!(outcome::lead_text(-1.0), "1 step after the gold peak");
    assert_eq!(outcome::lead_text(0.0), "at the gold peak");

    // The page: the verdict first, then the charts; the gold peaks are marked with dots.
    let html = render("t", &m, None, &[]);
    let summary = html.find(r#"<section id="summary">"#).unwrap();
    assert!(summary < html.find("data-chart=").unwrap());
    assert!(html.contains("<span class=\"badge hacked\">hacked</span>"));
    assert!(html.contains("cusum @ 2: 2 steps before the gold peak"));
    let data = page_data(&html);
    let rewards = chart(&data, "rewards-0");
    let peaks: Vec<(f64, f64)> = rewards["marks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| !k["y"].is_null())
        .map(|k| (k["x"].as_f64().unwrap(), k["y"].as_f64().unwrap()))
        .collect();
    assert_eq!(peaks.len(), 3);
    assert_eq!(peaks[0].0, 4.0);
    assert!((peaks[0].1 - 2.8).abs() < 1e-12);
    assert_eq!(peaks[1], (6.0, 4.0));

    // Nothing to judge without gold.
    let m = Metrics::parse("{\"step\":0,\"reward/proxy/mean\":1}\n", Path::new("m")).unwrap();
    let v = outcome::verdicts(&m, &[]);
    assert_eq!(v[0].line, "No gold reward was logged: nothing to judge.");
    assert_eq!(
        v[0].unjudged,
        [("run".to_string(), "no gold reward logged".to_string())]
    );
}

#[test]
fn report_of_two_methods() {
    let dir = scratch("two");
    let run = RunDir::open(&dir).unwrap();
    let metrics_text = synthetic_metrics();
    run.write("metrics.jsonl", metrics_text.as_bytes()).unwrap();
    run.write("summary.json", SUMMARY.as_bytes()).unwrap();
    let path = write_report(&run).unwrap();
    assert_eq!(path, run.report());
    // The metrics file is only read.
    assert_eq!(fs::read_to_string(run.metrics()).unwrap(), metrics_text);
    let html = fs::read_to_string(&path).unwrap();

    let m = Metrics::read(&run.metrics()).unwrap();
    let names: Vec<_> = m.series.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["grpo", "<evil>&"]);
    assert_eq!(
        m.keys,
        [
            "detector/gold-aware/fired",
            "entropy",
            "kl/ref",
            "reward/gold/mean",
            "reward/proxy/mean",
            "sqrt_kl"
        ]
    );
    // 11 lines, gold null at step 4: 10 gold points; one rising edge of the detector.
    assert_eq!(m.series[0].points(KEY_GOLD).len(), 10);
    assert_eq!(m.series[0].firings(), vec![("gold-aware".to_string(), 6.0)]);

    // Self-contained: no external scripts, links, imports or requests.
    for bad in [
        "src=",
        "href=",
        "url(",
        "@import",
        "fetch(",
        "XMLHttpRequest",
        "NaN",
    ] {
        assert!(!html.contains(bad), "report contains {bad}");
    }
    // One chart for rewards, one for gold vs sqrt(KL), one per other metric (entropy,
    // kl/ref, sqrt_kl; the detector flag is drawn as markers).
    assert_eq!(
        chart_ids(&html),
        ["rewards-0", "gold-d", "metric-0", "metric-1", "metric-2"]
    );
    let data = page_data(&html);
    assert_eq!(data["charts"].as_array().unwrap().len(), 5);
    assert_eq!(data["smoothing"], 0.6);
    // Escaped names, never raw in the page (the JSON escapes `<`).
    assert!(html.contains("&lt;evil&gt;&amp;"));
    assert!(!html.contains("<evil>"));
    assert!(html.contains("lab &lt;tiny&gt;"));
    let rewards = chart(&data, "rewards-0");
    let labels: Vec<&str> = rewards["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["label"].as_str().unwrap())
        .collect();
    assert_eq!(
        labels,
        ["grpo gold", "grpo proxy", "<evil>& gold", "<evil>& proxy"]
    );
    // grpo's gold skips the null at step 4; its proxy is dashed.
    let grpo_gold = &rewards["lines"][0];
    assert_eq!(
        numbers(&grpo_gold["x"]),
        [0.0, 1.0, 2.0, 3.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    );
    assert_eq!(rewards["lines"][1]["dash"], true);
    assert_eq!(rewards["step"], true);
    // Detector markers: gold-aware at step 6 in grpo (metrics and summary agree: once),
    // proxy-only at 8 in <evil>& (summary only), each hidden with its series' gold line.
    let det: Vec<(f64, &str, u64)> = rewards["marks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["y"].is_null())
        .map(|k| {
            (
                k["x"].as_f64().unwrap(),
                k["label"].as_str().unwrap(),
                k["line"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        det,
        [
            (6.0, "gold-aware (grpo)", 0),
            (8.0, "proxy-only (<evil>&)", 2)
        ]
    );
    // Each small multiple marks both firings, without labels.
    for id in ["metric-0", "metric-1", "metric-2"] {
        let xs: Vec<f64> = chart(&data, id)["marks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["x"].as_f64().unwrap())
            .collect();
        assert_eq!(xs, [6.0, 8.0], "{id}");
    }
    // Gold against d: dots per series, the fitted best-of-n law with its peak at
    // d* = 1 / (2 * 0.2) = 2.5, R(2.5) = 2.5 (1 - 0.5) = 1.25, in grpo's colour.
    let gd = chart(&data, "gold-d");
    assert_eq!(gd["lines"][0]["dots"], true);
    assert_eq!(gd["lines"][2]["label"], "grpo fit");
    assert_eq!(gd["lines"][2]["color"], gd["lines"][0]["color"]);
    assert_eq!(gd["marks"][0]["x"], 2.5);
    assert_eq!(gd["marks"][0]["y"], 1.25);
    assert_eq!(gd["marks"][0]["label"], "peak d* = 2.5");
    // The fit's curve spans [0, max d] = [0, 5] in 121 points: R(5) = 5 (1 - 1) = 0.
    assert_eq!(numbers(&gd["lines"][2]["x"]).len(), 121);
    assert_eq!(numbers(&gd["lines"][2]["y"])[120], 0.0);
    // Summary table cells and scalars.
    assert!(html.contains("<caption>Tomato: true return</caption>"));
    assert!(html.contains("<td>chi2</td><td class=\"num\">0.1</td><td class=\"num\">3.25</td>"));
    assert!(html.contains("<td>&lt;kl&gt;</td><td class=\"num\">0.01</td><td>–</td>"));
    assert!(html.contains("<td>peak/gold</td><td class=\"num\">1.25</td>"));
    assert!(html.contains("<td>gold fell</td>"));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn samples_show_the_most_overrated_distinct_responses() {
    let dir = scratch("samples");
    let path = dir.join("samples.jsonl");
    let line = |step: u64, series: &str, text: &str, proxy: &str, gold: &str| {
        format!(
            r#"{{"step":{step},"experiment":"rubric","series":"{series}","prompt":3,"text":"{text}","rewards":{{"proxy":{proxy},"gold":{gold}}}}}"#
        )
    };
    let text = [
        line(0, "weak", "a b", "0.5", "0.5"),
        line(1, "weak", "hack", "0.9", "0.1"),
        // The same response later with the same gap: the earlier one is kept.
        line(2, "weak", "hack", "0.9", "0.1"),
        // The same text in another series is another row.
        line(2, "strong", "hack", "0.6", "0.1"),
        line(3, "weak", "c <d>", "0.8", "0.2"),
        line(3, "weak", "no gold", "0.8", "null"),
        r#"{"step":4,"experiment":"tomato","rewards":{"proxy":1}}"#.to_string(),
        String::new(),
    ]
    .join("\n");
    fs::write(&path, text).unwrap();
    let hacks = samples::read_hacks(&path, 3).unwrap();
    // The tomato sample has no gold: that experiment has nothing to show.
    assert_eq!(hacks.len(), 1);
    let h = &hacks[0];
    assert_eq!(h.group.as_deref(), Some("rubric"));
    assert_eq!(h.scored, 5);
    let top: Vec<(&str, u64, &str, f64)> = h
        .top
        .iter()
        .map(|x| (x.series.as_str(), x.step, x.text.as_str(), x.gap()))
        .collect();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert_eq!(top.len(), 3);
    assert_eq!((top[0].0, top[0].1, top[0].2), ("weak", 1, "hack"));
    assert!(close(top[0].3, 0.8));
    assert_eq!((top[1].0, top[1].2), ("weak", "c <d>"));
    assert!(close(top[1].3, 0.6));
    assert_eq!((top[2].0, top[2].2), ("strong", "hack"));
    assert_eq!(h.top[0].prompt, "3");
    // Drawn as text, escaped.
    let m = Metrics::parse("{\"step\":0,\"reward/gold/mean\":1}\n", Path::new("m")).unwrap();
    let html = render("t", &m, None, &hacks);
    assert!(html.contains("<td>c &lt;d&gt;</td>"));
    assert!(html.contains("rubric: the responses the proxy overrated most"));
    // No file: nothing; a broken line: an error naming it.
    assert!(samples::read_hacks(&dir.join("none.jsonl"), 3)
        .unwrap()
        .is_empty());
    fs::write(&path, "{\"step\":0}\n{\"step\":\"x\"}\n").unwrap();
    let err = samples::read_hacks(&path, 3).unwrap_err();
    assert!(
        matches!(err, ReportError::Samples { line: 2, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("samples.jsonl`:2:"), "{err}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn summary_charts_are_drawn_with_their_legends_and_marks() {
    let m = Metrics::parse("{\"step\": 0, \"reward/gold/mean\": 1.0}\n", Path::new("m")).unwrap();
    let summary = r#"{"charts": [{"title": "gold <per> beta", "x_label": "step",
        "lines": [{"label": "b = 0.1", "points": [[10, 3.0], [5, null], [0, 1.0]]},
                  {"label": "b = 1", "points": [[0, 1.0], [10, 2.0]], "dashed": true}],
        "marks": [{"x": 5, "label": "epoch 2"}]},
        {"title": "empty", "x_label": "x", "lines": [{"label": "none", "points": []}]}]}"#;
    let s = Summary::parse(summary, Path::new("summary.json")).unwrap();
    assert_eq!(s.charts.len(), 2);
    assert!(s.scalars.is_empty(), "{:?}", s.scalars);
    let html = render("t", &m, Some(&s), &[]);
    assert!(html.contains("<h2>gold &lt;per&gt; beta</h2>"));
    assert!(
        !html.contains("<h2>empty</h2>"),
        "a chart without points is left out"
    );
    let data = page_data(&html);
    let c = chart(&data, "summary-0");
    assert_eq!(c["step"], false);
    assert_eq!(c["x_label"], "step");
    // The null point is skipped and the points sorted by x; the second line is dashed.
    assert_eq!(numbers(&c["lines"][0]["x"]), [0.0, 10.0]);
    assert_eq!(numbers(&c["lines"][0]["y"]), [1.0, 3.0]);
    assert_eq!(c["lines"][0]["dash"], false);
    assert_eq!(c["lines"][1]["dash"], true);
    assert_eq!(c["marks"][0]["x"], 5.0);
    assert_eq!(c["marks"][0]["label"], "epoch 2");
    assert!(!chart_ids(&html).contains(&"summary-1".to_string()));
    // A chart of the wrong shape is an error naming the field.
    let bad = Summary::parse(r#"{"charts": [{"title": "t"}]}"#, Path::new("summary.json"));
    assert!(
        matches!(
            bad,
            Err(ReportError::SummaryField {
                field: "charts",
                ..
            })
        ),
        "{bad:?}"
    );
}

#[test]
fn a_single_point_and_no_summary() {
    let m = Metrics::parse(
        "{\"step\":3,\"reward/proxy/mean\":0.5,\"reward/gold/mean\":null,\"entropy\":null}\n",
        Path::new("m.jsonl"),
    )
    .unwrap();
    let html = render("one", &m, None, &[]);
    // A reward chart with one proxy point; entropy has no finite value: a note, no chart;
    // no sqrt(KL) chart.
    assert_eq!(chart_ids(&html), ["rewards-0"]);
    let data = page_data(&html);
    let line = &chart(&data, "rewards-0")["lines"][0];
    assert_eq!(line["label"], "run proxy");
    assert_eq!(numbers(&line["x"]), [3.0]);
    assert!(html.contains("No finite values: entropy"));
    assert!(!html.contains("NaN"));
    assert_eq!(m.series[0].name, "run");
    assert!(html.contains("No gold reward was logged: nothing to judge."));
}

#[test]
fn fit_laws_and_peaks() {
    let rl = Fit {
        series: None,
        form: FitForm::Rl,
        alpha: 1.0,
        beta: 0.5,
        offset: 0.1,
        r2: None,
        peak_d: None,
    };
    // d* = exp(alpha / beta - 1) = e; R(e) = 0.1 + e (1 - 0.5) = 0.1 + e / 2.
    assert!((rl.peak().unwrap() - std::f64::consts::E).abs() < 1e-12);
    assert!((rl.eval(std::f64::consts::E) - (0.1 + std::f64::consts::E / 2.0)).abs() < 1e-12);
    assert_eq!(rl.eval(0.0), 0.1);
    let bon = Fit {
        form: FitForm::Bon,
        beta: 0.2,
        offset: 0.0,
        ..rl.clone()
    };
    // d* = alpha / (2 beta) = 2.5; R(2.5) = 2.5 (1 - 0.5) = 1.25.
    assert_eq!(bon.peak(), Some(2.5));
    assert_eq!(bon.eval(2.5), 1.25);
    assert_eq!(
        Fit {
            beta: 0.0,
            ..bon.clone()
        }
        .peak(),
        None
    );
    assert_eq!(
        Fit {
            alpha: -1.0,
            ..bon.clone()
        }
        .peak(),
        None
    );
    assert_eq!(
        Fit {
            peak_d: Some(3.0),
            ..bon
        }
        .peak(),
        Some(3.0)
    );
    // OveroptFit's field names parse too.
    let f: Fit = serde_json::from_str(
        r#"{"law":"best-of-n","alpha":1,"beta":0.25,"offset":0,"r_squared":0.9,"points":7}"#,
    )
    .unwrap();
    assert_eq!(
        (f.form, f.r2, f.peak()),
        (FitForm::Bon, Some(0.9), Some(2.0))
    );
}

#[test]
fn bad_metrics_are_typed_errors() {
    let p = Path::new("runs/x/metrics.jsonl");
    let err = Metrics::parse("{\"step\":0}\n{\"step\":1}\n{oops\n", p).unwrap_err();
    assert!(
        matches!(err, ReportError::Line(SinkError::Parse { line: 3, .. })),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(":3:") && msg.contains("runs/x/metrics.jsonl"),
        "{msg}"
    );
    let err = Metrics::parse("{\"step\":0,\"method\":[1]}\n", p).unwrap_err();
    assert!(err.to_string().contains("`method`"), "{err}");
    assert!(matches!(
        Metrics::parse("\n \n", p),
        Err(ReportError::EmptyMetrics { .. })
    ));

    let dir = scratch("bad");
    let run = RunDir::open(&dir).unwrap();
    let err = write_report(&run).unwrap_err();
    assert!(matches!(err, ReportError::MissingMetrics { .. }), "{err:?}");
    assert!(err.to_string().contains("metrics.jsonl"));
    run.write("metrics.jsonl", b"{\"step\":0,\"entropy\":1}\n")
        .unwrap();
    run.write(
        "summary.json",
        b"{\"fit\": {\"form\": \"cubic\", \"alpha\": 1, \"beta\": 1}}",
    )
    .unwrap();
    let err = write_report(&run).unwrap_err();
    assert!(
        matches!(err, ReportError::SummaryField { field: "fit", .. }),
        "{err:?}"
    );
    run.write("summary.json", b"[1]").unwrap();
    assert!(matches!(
        write_report(&run),
        Err(ReportError::Summary { .. })
    ));
    assert!(!run.report().exists());
    fs::remove_dir_all(&dir).unwrap();
}
